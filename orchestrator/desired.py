"""Desired state: config.yaml plus every capsule's manifest and wasm, as CapsuleSpec values.

`load_desired` reads the config (orchestrator.config), then for each deployment its
`Capsule.toml` and component wasm (hashed), resolves its configuration against the
manifest's `[env]` and merges limits (built-in < config `defaults.limits` < the manifest's
`[limits]` < the deployment's `limits`). Every problem in every file is collected into one
`ConfigError`, each naming its file, line and field. With `previous` and `only`, only the
named deployments are read again (the watcher's path: a change in one capsule folder
re-plans that capsule alone).

Reads files; plans nothing. Used by the runtime and the CLI (`validate`, `plan`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import LoadedConfig, load_config
from .engine import Limits
from .errors import ConfigError, ManifestError, Problem
from .manifest import Manifest, load_manifest, resolve_config
from .spec import CapsuleSpec, secret_digest


@dataclass(frozen=True)
class DesiredState:
    """The whole desired state: the loaded config and a spec per deployment."""

    config: LoadedConfig
    specs: dict[str, CapsuleSpec]
    manifests: dict[str, Manifest] = field(default_factory=dict)

    @property
    def enabled(self) -> dict[str, CapsuleSpec]:
        return {name: spec for name, spec in self.specs.items() if spec.enabled}


def load_desired(
    path: Path | str,
    *,
    environ: Mapping[str, str] | None = None,
    previous: DesiredState | None = None,
    only: Iterable[str] | None = None,
) -> DesiredState:
    """Read everything; raise ConfigError listing every problem found."""
    problems: list[Problem] = []
    try:
        loaded = load_config(path, environ=environ)
    except ConfigError as error:
        if not isinstance(error.partial, LoadedConfig):
            raise
        loaded, problems = error.partial, list(error.problems)  # keep checking the capsules
    reread = set(only) if only is not None and previous is not None else None
    specs: dict[str, CapsuleSpec] = {}
    manifests: dict[str, Manifest] = {}
    broken = {p.field.split(".")[1] for p in problems if p.field.startswith("capsules.") and p.field.endswith(".path")}
    for name in loaded.model.capsules:
        if name in broken:
            continue
        if reread is not None and name not in reread and name in previous.specs:  # type: ignore[union-attr]
            old = previous.specs[name]  # type: ignore[union-attr]
            if _same_deployment(previous.config, loaded, name):  # type: ignore[union-attr]
                specs[name] = old
                manifests[name] = previous.manifests[name]  # type: ignore[union-attr]
                continue
        try:
            manifests[name], specs[name] = load_spec(loaded, name)
        except (ConfigError, ManifestError) as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
    return DesiredState(config=loaded, specs=specs, manifests=manifests)


def load_spec(loaded: LoadedConfig, name: str) -> tuple[Manifest, CapsuleSpec]:
    """One deployment's manifest and spec. Raises ConfigError or ManifestError."""
    deployment = loaded.model.capsules[name]
    folder = loaded.folder(name)
    manifest = load_manifest(folder)
    wasm_path = folder / manifest.component.file
    try:
        wasm = wasm_path.read_bytes()
    except OSError as error:
        raise ConfigError(
            [
                Problem(
                    f"cannot read {wasm_path}: {error.strerror or error} (the [[component]] file of "
                    f"{folder / 'Capsule.toml'})",
                    file=str(loaded.path),
                    line=loaded.line_of("capsules", name, "path"),
                    field=f"capsules.{name}.path",
                )
            ]
        ) from None
    digest = hashlib.sha256(wasm).hexdigest()
    pin = manifest.component.hash
    if pin is not None and pin != f"sha256:{digest}":
        raise ManifestError(
            [
                Problem(
                    f"{manifest.component.file} has sha256:{digest}, but the manifest pins {pin}",
                    file=str(folder / "Capsule.toml"),
                    field="component.hash",
                )
            ]
        )
    config = _resolve(loaded, name, manifest)
    builtin = Limits()
    limits = {"fuel": builtin.fuel, "memory_mib": builtin.memory_mib, "timeout_ms": builtin.timeout_ms}
    for layer in (loaded.model.defaults.limits, manifest.limits, deployment.limits):
        limits.update({k: v for k, v in layer.model_dump().items() if v is not None})
    data = manifest.model_dump(by_alias=True, mode="json")
    for key in manifest.secret_keys:  # a secret's default never leaves this process in clear
        default = data["env"][key].get("default")
        if default is not None:
            data["env"][key]["default"] = secret_digest(name, key, str(default))
    spec = CapsuleSpec(
        name=name,
        folder=str(folder),
        wasm_sha256=digest,
        manifest=data,
        config=config,
        secret_keys=manifest.secret_keys,
        limits=limits,
        instances=deployment.instances,
        publish_rate={
            k: v
            for layer in (loaded.model.defaults.publish_rate, deployment.publish_rate)
            for k, v in layer.model_dump().items()
            if v is not None
        },
        depends_on=tuple(deployment.depends_on),
        enabled=deployment.enabled,
    )
    return manifest, spec


def _resolve(loaded: LoadedConfig, name: str, manifest: Manifest) -> dict[str, str]:
    """The deployment's config against the manifest's [env]; problems point into config.yaml."""

    def where(key: str) -> dict[str, Any]:
        return {
            "file": str(loaded.path),
            "line": loaded.line_of("capsules", name, "config", key),
            "field": f"capsules.{name}.config.{key}",
        }

    try:
        return resolve_config(manifest, loaded.model.capsules[name].config, where=where)
    except ManifestError as error:
        raise ConfigError(error.problems) from None


def _same_deployment(old: LoadedConfig, new: LoadedConfig, name: str) -> bool:
    return (
        name in old.model.capsules
        and old.model.capsules[name] == new.model.capsules[name]
        and old.model.defaults == new.model.defaults
        and old.folder(name) == new.folder(name)
    )
