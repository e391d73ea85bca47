"""Desired state: config.yaml plus every capsule's manifest and wasm, as CapsuleSpec values.

The one place that reads a capsule folder. `load_desired` reads the config
(orchestrator.desired.config), then for each deployment its `Capsule.toml` and component
wasm, once each: the wasm is hashed where it is read, its pin checked, its configuration
resolved against the manifest's `[env]`, its limits layered (built-in < config
`defaults.limits` < the manifest's `[limits]` < the deployment's `limits`). Each spec
carries what was read (`CapsuleSource`), so the capsule layer never goes back to the folder.

Reading again is cheap: given the `previous` state, a file whose stamp (inode, size, mtime,
ctime) has not changed is not read or hashed again, and with `only` the other deployments
keep their specs untouched (the watcher's path: a change in one capsule folder re-plans
that capsule alone). Every problem in every file is collected into one `ConfigError`, each
naming its file, line and field.

Reads files; plans nothing. Blocking: async callers run it on a worker thread. Used by the
runtime and the CLI (`validate`, `plan`, `capsule check|call`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ManifestError, Problem
from ..files import FileReadError, FileStamp, read_regular
from ..limits import Limits
from .common import MANIFEST
from .config import LoadedConfig, load_config
from .manifest import Manifest, read_manifest, resolve_config
from .spec import CapsuleSource, CapsuleSpec, secret_digest

MAX_WASM_BYTES = 64 << 20


@dataclass(frozen=True)
class DesiredState:
    """The whole desired state: the loaded config and a spec per deployment."""

    config: LoadedConfig
    specs: dict[str, CapsuleSpec]
    broken: dict[str, list[Problem]] = field(default_factory=dict)  # per deployment (`strict=False`)

    @property
    def enabled(self) -> dict[str, CapsuleSpec]:
        return {name: spec for name, spec in self.specs.items() if spec.enabled}

    def manifest(self, name: str) -> Manifest | None:
        source = self.specs[name].source if name in self.specs else None
        return source.manifest if source is not None else None


def load_desired(
    path: Path | str,
    *,
    environ: Mapping[str, str] | None = None,
    previous: DesiredState | None = None,
    only: Iterable[str] | None = None,
    strict: bool = True,
) -> DesiredState:
    """Read everything; raise ConfigError listing every problem found.

    With `strict=False` (the running orchestrator), a problem of one deployment's own
    files — its folder, manifest or module, or config keys its manifest does not declare —
    is recorded in `DesiredState.broken` and everything else loads: that capsule keeps its
    last good version while the rest of the change applies. Only a problem of config.yaml
    itself (syntax, unknown keys, dependencies) raises, holding back the whole change.
    """
    config_problems: list[Problem] = []
    broken: dict[str, list[Problem]] = {}
    if only is not None and previous is not None and _config_unchanged(previous):
        # Some capsule folders changed, config.yaml did not: its parse (and every other
        # deployment's spec) stands. Tens of milliseconds for a config of 1,000 capsules.
        desired = _reread(previous, set(only))
        if strict and desired.broken:
            raise ConfigError([p for name in sorted(desired.broken) for p in desired.broken[name]])
        return desired
    try:
        loaded = load_config(path, environ=environ)
    except ConfigError as error:
        if not isinstance(error.partial, LoadedConfig):
            raise
        loaded = error.partial  # well-formed, with reference problems: keep checking the capsules
        for problem in error.problems:
            owner = _deployment_of(problem)
            if owner is None:
                config_problems.append(problem)
            else:
                broken.setdefault(owner, []).append(problem)
    reread = set(only) if only is not None and previous is not None else None
    specs: dict[str, CapsuleSpec] = {}
    for name in loaded.model.capsules:
        if name in broken:
            continue
        old = previous.specs.get(name) if previous is not None else None
        unchanged = reread is not None and name not in reread and old is not None and previous is not None
        if unchanged and _same_deployment(previous.config, loaded, name):  # type: ignore[union-attr]
            specs[name] = old  # type: ignore[assignment]
            continue
        try:
            specs[name] = load_spec(loaded, name, previous=old.source if old is not None else None)
        except (ConfigError, ManifestError) as error:
            broken[name] = list(error.problems)
    if config_problems or (strict and broken):
        raise ConfigError(config_problems + [p for name in sorted(broken) for p in broken[name]])
    return DesiredState(config=loaded, specs=specs, broken=broken)


def _config_unchanged(previous: DesiredState) -> bool:
    """Whether config.yaml is still the file `previous` was read from (same stamp), and
    `previous` had no problems (a broken deployment is checked against the config again)."""
    stamp = previous.config.stamp
    return stamp is not None and not previous.broken and FileStamp.at(previous.config.path) == stamp


def _reread(previous: DesiredState, names: set[str]) -> DesiredState:
    """`previous` with the deployments `names` read again from their folders (a problem of
    one makes it broken, as in `load_desired(strict=False)`)."""
    specs = dict(previous.specs)
    broken: dict[str, list[Problem]] = {}
    for name in previous.config.model.capsules:
        if name not in names:
            continue
        old = previous.specs.get(name)
        try:
            specs[name] = load_spec(previous.config, name, previous=old.source if old is not None else None)
        except (ConfigError, ManifestError) as error:
            specs.pop(name, None)
            broken[name] = list(error.problems)
    return DesiredState(config=previous.config, specs=specs, broken=broken)


def _deployment_of(problem: Problem) -> str | None:
    """The deployment a config.yaml problem belongs to alone (its folder or its config
    keys), or None for a problem of the config as a whole (dependencies, syntax)."""
    parts = problem.field.split(".")
    if len(parts) >= 3 and parts[0] == "capsules" and parts[2] in ("path", "config"):
        return parts[1]
    return None


def read_capsule(
    folder: Path, *, previous: CapsuleSource | None = None, wasm_limit: int = MAX_WASM_BYTES
) -> CapsuleSource:
    """The manifest and wasm of `folder` (with the wasm's sha256), reusing `previous` for a
    file whose stamp has not changed. Raises ManifestError; a wasm that cannot be read is a
    ManifestError on `component.file`."""
    manifest_stamp = FileStamp.at(folder / MANIFEST)
    if previous is not None and manifest_stamp is not None and manifest_stamp == previous.manifest_stamp:
        manifest = previous.manifest
    else:
        manifest, manifest_stamp = read_manifest(folder)
    wasm, digest, wasm_path, wasm_stamp = read_component(folder, manifest, previous=previous, limit=wasm_limit)
    source = CapsuleSource(
        manifest=manifest,
        wasm=wasm,
        wasm_sha256=digest,
        wasm_path=wasm_path,
        wasm_stamp=wasm_stamp,
        manifest_stamp=manifest_stamp,
    )
    return source


def read_component(
    folder: Path, manifest: Manifest, *, previous: CapsuleSource | None = None, limit: int = MAX_WASM_BYTES
) -> tuple[bytes, str, str, FileStamp]:
    """The component's wasm bytes, sha256, path and stamp, checked against the manifest's
    hash pin; reused from `previous` when the file's stamp has not changed. Raises
    ManifestError (on `component.file` when it cannot be read)."""
    manifest_file = str(folder / MANIFEST)
    component = manifest.component
    wasm_path = folder / component.file
    wasm_stamp = FileStamp.at(wasm_path)
    if previous is not None and wasm_stamp is not None and wasm_stamp == previous.wasm_stamp:
        wasm, digest = previous.wasm, previous.wasm_sha256
    else:
        try:
            wasm, wasm_stamp = read_regular(wasm_path, limit=limit, what="WebAssembly module")
        except FileReadError as error:
            raise ManifestError(
                [Problem(f"cannot read {wasm_path}: {error.reason}", file=manifest_file, field="component.file")]
            ) from None
        if not _looks_like_a_module(wasm):  # never quoted: it may be any file (a link to /etc/passwd)
            raise ManifestError(
                [
                    Problem(
                        f"{wasm_path} is not a WebAssembly module: neither binary WebAssembly (no \\0asm header) "
                        "nor WebAssembly text; point component.file at the build's .wasm output",
                        file=manifest_file,
                        field="component.file",
                    )
                ]
            )
        digest = hashlib.sha256(wasm).hexdigest()
    if component.hash is not None and component.hash != f"sha256:{digest}":
        raise ManifestError(
            [
                Problem(
                    f"{component.file} has sha256:{digest}, but the manifest pins {component.hash}; "
                    "update the pin if the new build is intended",
                    file=manifest_file,
                    field="component.hash",
                )
            ]
        )
    return wasm, digest, str(wasm_path), wasm_stamp


def _looks_like_a_module(data: bytes) -> bool:
    """Binary WebAssembly or WebAssembly text, by its first bytes: the cheap check that lets
    `orch validate` refuse a file that is no module at all (the engine checks the rest)."""
    return data.startswith(b"\0asm") or data.lstrip()[:1] in (b"(", b";")


def load_spec(loaded: LoadedConfig, name: str, *, previous: CapsuleSource | None = None) -> CapsuleSpec:
    """One deployment's spec. Raises ConfigError or ManifestError."""
    deployment = loaded.model.capsules[name]
    folder = loaded.folder(name)
    try:
        source = read_capsule(folder, previous=previous, wasm_limit=loaded.model.engine.max_module_mib << 20)
    except ManifestError as error:
        if any(p.field == "component.file" for p in error.problems):  # point at the deployment too
            raise ConfigError(
                [
                    Problem(
                        f"{p.message} (the [[component]] file of {p.file})",
                        file=str(loaded.path),
                        line=loaded.line_of("capsules", name, "path"),
                        field=f"capsules.{name}.path",
                    )
                    if p.field == "component.file"
                    else p
                    for p in error.problems
                ]
            ) from None
        raise
    config = _resolve(loaded, name, source.manifest)
    return build_spec(
        name,
        folder,
        source,
        config=config,
        limits=Limits.layered(loaded.model.defaults.limits, source.manifest.limits, deployment.limits),
        instances=deployment.instances,
        publish_rate={
            k: v
            for layer in (loaded.model.defaults.publish_rate, deployment.publish_rate)
            for k, v in layer.model_dump().items()
            if v is not None
        },
        depends_on=tuple(deployment.depends_on),
        enabled=deployment.enabled,
        hosts=deployment.hosts,
        labels=dict(deployment.labels),
    )


def load_folder(
    folder: Path,
    *,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
    instances: int = 1,
) -> CapsuleSpec:
    """The spec of one capsule folder outside any config.yaml (`orch capsule check|call`):
    its manifest's defaults overlaid with `config` and `limits`. Raises ManifestError."""
    source = read_capsule(Path(folder))
    manifest = source.manifest
    resolved = resolve_config(manifest, config or {}, source=str(Path(folder) / MANIFEST))
    return build_spec(
        name or manifest.package.name,
        Path(folder),
        source,
        config=resolved,
        limits=Limits.layered(manifest.limits, limits),
        instances=instances,
    )


def build_spec(
    name: str,
    folder: Path,
    source: CapsuleSource,
    *,
    config: dict[str, str],
    limits: Limits,
    instances: int = 1,
    publish_rate: Mapping[str, float] | None = None,
    depends_on: tuple[str, ...] = (),
    enabled: bool = True,
    hosts: int = 1,
    labels: Mapping[str, str] | None = None,
) -> CapsuleSpec:
    manifest = source.manifest
    data = manifest.model_dump(by_alias=True, mode="json")
    for key in manifest.secret_keys:  # a secret's default never leaves this process in clear
        default = data["env"][key].get("default")
        if default is not None:
            data["env"][key]["default"] = secret_digest(name, key, str(default))
    return CapsuleSpec(
        name=name,
        folder=str(folder),
        wasm_sha256=source.wasm_sha256,
        manifest=data,
        config=config,
        secret_keys=manifest.secret_keys,
        limits=limits.as_dict(),
        instances=instances,
        publish_rate=dict(publish_rate or {}),
        depends_on=depends_on,
        enabled=enabled,
        hosts=hosts,
        labels=dict(labels or {}),
        source=source,
    )


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
