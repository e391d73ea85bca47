"""Rollback: run an earlier version of a deployment from its history, optionally with its data.

`roll_back` finds the entry (orchestrator.control.history: a version, a spec hash or `@ID`;
by default the version before the one running), rebuilds its spec from the entry's record
and the module bytes kept in the artifact store, and asks the reconciler to run it in place
of the desired spec, *pinned* (orchestrator.desired.pins): the next sync does not undo it;
a change of the deployment's desired spec, or `orch unpin`, ends it. With `with_data`, the
KV snapshot of that entry is restored between building the version and swapping to it,
while no call of the capsule runs, in one transaction.

Secret values are never kept in a record (only keyed digests), so each secret is taken from
today's config when its digest matches the record's; a version whose secrets differ cannot
be rolled back to, and the error names the key. Everything is checked before anything
changes: an unknown version, a module no longer kept, changed secrets, a missing snapshot
or a version that fails to load leave the running version, its data and any pin as they
were.

`restored_pins` rebuilds the saved pins when the orchestrator starts, so a restart keeps a
rollback in force (unless the desired spec changed meanwhile). Used by the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from ..capsule.snapshots import SnapshotStore
from ..desired.manifest import Manifest
from ..desired.pins import Pin
from ..desired.spec import SECRET_PREFIX, CapsuleSource, CapsuleSpec, secret_digest
from ..errors import OrchestratorError, StoreError, UnknownCapsule
from ..files import FileStamp
from .history import ArtifactMissing, Entry, NoSnapshot, RollbackRefused, SecretsChanged, VersionHistory
from .reconciler import Reconciler

logger = logging.getLogger(__name__)


def spec_from_record(
    record: Mapping[str, Any], *, wasm: bytes, wasm_path: str, current: CapsuleSpec, entry: Entry
) -> CapsuleSpec:
    """The spec of a history record, runnable: its module's bytes, today's secret values
    (checked against the record's digests), today's wiring (depends_on, enabled, hosts,
    labels). Raises SecretsChanged, or RollbackRefused when the record is damaged."""
    name = current.name
    try:
        saved = CapsuleSpec.from_record(record)
        manifest = Manifest.model_validate(record["manifest"])
    except (KeyError, TypeError, ValueError, ValidationError, AttributeError):
        raise RollbackRefused(f"capsule {name!r}: the history record of version {entry.version} is damaged") from None
    config = dict(saved.config)
    for key in sorted(saved.secret_keys):
        today = current.config.get(key) if key in current.secret_keys else None
        if today is None or _as_recorded(name, key, today) != config.get(key):
            raise SecretsChanged(
                f"capsule {name!r}: cannot roll back to version {entry.version}: its secret {key!r} differs from "
                "today's config (secret values are never stored); set it in config.yaml as it was then, or roll "
                "back to another version"
            )
        config[key] = today
    stamp = FileStamp.at(wasm_path) or FileStamp(0, 0, len(wasm), 0, 0)
    digest = hashlib.sha256(wasm).hexdigest()
    source = CapsuleSource(
        manifest=manifest, wasm=wasm, wasm_sha256=digest, wasm_path=wasm_path, wasm_stamp=stamp, manifest_stamp=stamp
    )
    spec = CapsuleSpec(
        name=name,
        folder=saved.folder,
        wasm_sha256=digest,
        manifest=saved.manifest,
        config=config,
        secret_keys=saved.secret_keys,
        limits=saved.limits,
        instances=saved.instances,
        publish_rate=saved.publish_rate,
        depends_on=current.depends_on,
        enabled=current.enabled,
        hosts=current.hosts,
        labels=current.labels,
        source=source,
    )
    if spec.spec_hash != entry.spec_hash or saved.name != name:
        raise RollbackRefused(
            f"capsule {name!r}: the history record of version {entry.version} does not reproduce its spec "
            "hash (damaged or edited): it cannot be rolled back to"
        )
    return spec


def _as_recorded(name: str, key: str, value: str) -> str:
    """A secret value as a record holds it (CapsuleSpec.config_view)."""
    return value if value.startswith(SECRET_PREFIX) else secret_digest(name, key, value)


async def runnable(history: VersionHistory, name: str, entry: Entry, current: CapsuleSpec) -> CapsuleSpec:
    """The spec of `entry`, its module read from the artifact store. Raises ArtifactMissing,
    SecretsChanged or RollbackRefused."""
    wasm = await asyncio.to_thread(history.artifacts.get, entry.wasm_sha256)
    if wasm is None:
        raise ArtifactMissing(
            f"capsule {name!r}: the module of version {entry.version} is no longer kept in the state dir "
            f"({history.artifacts.folder}): it cannot be rolled back to; history.versions in config.yaml keeps more"
        )
    path = str(history.artifacts.path(entry.wasm_sha256))
    return spec_from_record(history.record(name, entry), wasm=wasm, wasm_path=path, current=current, entry=entry)


async def roll_back(
    *,
    name: str,
    to: str | None,
    with_data: bool,
    desired: Mapping[str, CapsuleSpec],
    reconciler: Reconciler,
    history: VersionHistory,
    store: SnapshotStore,
    now_ms: int,
) -> dict[str, Any]:
    """Run the entry `to` designates in place of `name`'s desired spec, pinned; with its
    data when `with_data`. Returns {capsule, entry, with_data, restored_keys, status}."""
    current = desired.get(name)
    if current is None:
        raise UnknownCapsule(
            f"no capsule {name!r} with usable files in the config (a capsule whose files are broken keeps its "
            "last good version; fix its files, then roll back)"
        )
    if not current.enabled:
        raise RollbackRefused(f"capsule {name!r} is disabled in the config (enabled: false): enable it to roll back")
    slot = reconciler.slot(name)
    running = slot.spec.spec_hash if slot is not None and slot.handle is not None and slot.spec else None
    entry = history.find(name, to, with_data=with_data, running=running)
    spec = await runnable(history, name, entry, current)
    snapshot = entry.snapshot["id"] if with_data and entry.snapshot is not None else None
    if snapshot is not None and snapshot not in {i.id for i in await store.snapshot_infos(name)}:
        raise NoSnapshot(f"capsule {name!r}: the snapshot of version {entry.version} is no longer in the KV database")
    restored: list[int] = []

    async def restore() -> None:
        assert snapshot is not None
        restored.append(await store.restore_snapshot(name, snapshot))

    how = " with its data" if with_data else ""
    pin = Pin(spec=spec, desired_hash=current.spec_hash, since_ms=now_ms, entry=entry.id)
    try:
        async with history.keeping(name, snapshot) if snapshot is not None else contextlib.nullcontext():
            status = await reconciler.override(
                name,
                spec,
                pin=pin,
                reasons=(f"rollback to version {entry.version} (entry @{entry.id}){how}",),
                prepare=restore if snapshot is not None else None,
            )
    except StoreError as error:
        raise RollbackRefused(
            f"capsule {name!r}: the data of version {entry.version} was not restored: {error}"
        ) from None
    logger.info("capsule %s: rolled back to version %s (entry @%d)%s; pinned", name, entry.version, entry.id, how)
    return {
        "capsule": name,
        "entry": entry.to_dict(),
        "with_data": with_data,
        "restored_keys": restored[0] if restored else None,
        "status": status,
    }


async def restored_pins(history: VersionHistory, desired: Mapping[str, CapsuleSpec]) -> dict[str, Pin]:
    """The saved pins that still hold against `desired`, rebuilt (at start)."""
    pins: dict[str, Pin] = {}
    for name in history.pinned_names():
        saved = history.pinned(name)
        current = desired.get(name)
        assert saved is not None
        if current is None or not current.enabled or current.spec_hash != saved["desired_hash"]:
            logger.info("capsule %s: its desired spec changed while the orchestrator was stopped: unpinned", name)
            continue
        entry = next((e for e in reversed(history.entries(name)) if e.spec_hash == saved["spec_hash"]), None)
        try:
            if entry is None:
                raise RollbackRefused("its history entry is gone")
            spec = await runnable(history, name, entry, current)
        except OrchestratorError as error:
            logger.warning("capsule %s: its pin cannot be kept (%s): the desired spec runs", name, error)
            continue
        pins[name] = Pin(spec=spec, desired_hash=saved["desired_hash"], since_ms=saved["since_ms"], entry=entry.id)
    return pins
