"""Desired state: config.yaml and Capsule.toml become frozen specs, and a PURE plan diffs them.

    config.py, yamlsource.py   config.yaml: models, a line-tracking YAML reader, references
    manifest.py, tomlsource.py Capsule.toml: models, parsing, configuration against [env]
    schema.py                  tool input schemas: checked at load, validated without runaway
    schemakeywords.py,         ... its JSON Schema keywords and step budget, and ECMA-262
      ecmaregex.py                 patterns on RE2 (linear time)
    common.py                  names, limits, nesting depth and problem helpers shared by all
    spec.py                    CapsuleSpec: one deployment's desired state and its spec hash
    load.py                    the one reader of capsule folders: files -> specs, read once
    plan.py, reasons.py        PURE: desired vs actual -> Plan (actions, reasons, waves)
    pins.py                    PURE: a rollback's pin overriding a deployment's desired spec

Nothing here runs a capsule; the capsule layer builds running versions from specs.

Names are imported lazily (orchestrator.lazy): importing the package costs nothing.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .config import LoadedConfig, OrchestratorConfig, load_config, parse_config
    from .load import DesiredState, load_desired, load_folder, read_capsule
    from .manifest import Manifest, load_manifest, mask_config, parse_manifest, resolve_config
    from .plan import Action, Plan, apply_plan
    from .schema import InputSchema, SchemaProblem, compile_schema
    from .spec import CapsuleSource, CapsuleSpec

__all__ = [
    "Action",
    "CapsuleSource",
    "CapsuleSpec",
    "DesiredState",
    "InputSchema",
    "LoadedConfig",
    "Manifest",
    "OrchestratorConfig",
    "Plan",
    "SchemaProblem",
    "apply_plan",
    "compile_schema",
    "load_config",
    "load_desired",
    "load_folder",
    "load_manifest",
    "mask_config",
    "parse_config",
    "parse_manifest",
    "read_capsule",
    "resolve_config",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "Action": "plan",
        "CapsuleSource": "spec",
        "CapsuleSpec": "spec",
        "DesiredState": "load",
        "InputSchema": "schema",
        "LoadedConfig": "config",
        "Manifest": "manifest",
        "OrchestratorConfig": "config",
        "Plan": "plan",
        "SchemaProblem": "schema",
        "apply_plan": "plan",
        "compile_schema": "schema",
        "load_config": "config",
        "load_desired": "load",
        "load_folder": "load",
        "load_manifest": "manifest",
        "mask_config": "manifest",
        "parse_config": "config",
        "parse_manifest": "manifest",
        "read_capsule": "load",
        "resolve_config": "manifest",
    },
)
