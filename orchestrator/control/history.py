"""The version history: what each deployment ran, with its module, its record and its KV snapshot.

Every start, reload and rollback that puts a new spec in service adds an *entry* to the
deployment's history: when, the event, the spec hash and version, the git revision of the
config's repository, the plan's reasons, and the spec's record (no secret values: keyed
digests, see orchestrator.desired.spec). The module's bytes go to the content-addressed
artifact store (orchestrator.control.artifacts) the first time a version runs. A restart
(the same spec) adds nothing, and neither does a start of the spec the history ends with.

Before a version stops serving in favour of another (a reload or a rollback; and at a start
when the history ends with a different version, whose data the KV still holds), the data it
leaves is snapshotted (orchestrator.capsule.snapshots) and the snapshot is attached to its
entry: rolling back to that entry `--with-data` puts that data back.

Bounds (config.yaml `history:`): `versions` entries per deployment (the oldest go, with
their snapshots; a module no entry refers to is removed); `snapshots` snapshots per
deployment and `snapshot_max_mib` of them (the oldest go first; a capsule whose data alone
is over the bound is not snapshotted, and its entry says so).

Files: `<state_dir>/history/<name>.json` per deployment (entries, the records they refer to,
and the deployment's pin), written atomically, private. A file that cannot be read is moved
aside (`.unreadable`) and its history starts again; snapshots no entry refers to are
dropped when the history opens. Used by the runtime (hooks for the reconciler, `orch
history`) and the rollback (orchestrator.control.rollback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..capsule.snapshots import SnapshotStore, SnapshotTooLarge
from ..desired.config import HistorySettings
from ..desired.pins import Pin
from ..desired.spec import CapsuleSpec
from ..errors import OrchestratorError, StoreError
from ..files import FileReadError, read_regular, write_atomic
from .artifacts import ARTIFACTS, ArtifactStore, valid_digest

logger = logging.getLogger(__name__)

HISTORY = "history"
FORMAT = 1
MAX_FILE_BYTES = 256 << 20
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
HEX = re.compile(r"[0-9a-f]{4,64}")
EVENTS = ("start", "reload", "rollback")


class RollbackRefused(OrchestratorError):
    """A rollback (or unpin) that cannot be done; nothing was changed. `status` is the
    control API's answer."""

    status = 409


class UnknownVersion(RollbackRefused):
    """No entry of the deployment's history matches the version asked for."""

    status = 404


class NoSnapshot(RollbackRefused):
    """`--with-data`, but no snapshot of that version's data is kept."""


class ArtifactMissing(RollbackRefused):
    """The module of that version is no longer in the artifact store."""


class SecretsChanged(RollbackRefused):
    """A secret of that version differs from today's config (secret values are not kept)."""


class NotPinned(RollbackRefused):
    """`orch unpin` of a deployment that is not pinned."""


@dataclass
class Entry:
    """One version put in service. `snapshot` (id, created_ms, keys, bytes) is the data it
    left when it was replaced; `note` says why there is none when one was expected."""

    id: int
    at_ms: int
    event: str
    spec_hash: str
    wasm_sha256: str
    revision: str | None = None
    reasons: list[str] = field(default_factory=list)
    snapshot: dict[str, int] | None = None
    note: str = ""

    @property
    def version(self) -> str:
        return self.wasm_sha256[:12]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at_ms": self.at_ms,
            "event": self.event,
            "version": self.version,
            "spec_hash": self.spec_hash,
            "wasm_sha256": self.wasm_sha256,
            "revision": self.revision,
            "reasons": list(self.reasons),
            "snapshot": dict(self.snapshot) if self.snapshot is not None else None,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Entry:
        """Checked strictly: ValueError naming what is wrong."""
        _expect(isinstance(data, dict), "an entry is not an object")
        entry = cls(
            id=_int(data.get("id")),
            at_ms=_int(data.get("at_ms")),
            event=str(data.get("event")),
            spec_hash=str(data.get("spec_hash")),
            wasm_sha256=str(data.get("wasm_sha256")),
            revision=data.get("revision"),
            reasons=data.get("reasons", []),
            snapshot=data.get("snapshot"),
            note=data.get("note", ""),
        )
        _expect(entry.event in EVENTS, "an entry's event is unknown")
        _expect(valid_digest(entry.spec_hash) and valid_digest(entry.wasm_sha256), "an entry's hashes are not sha256")
        _expect(entry.revision is None or isinstance(entry.revision, str), "an entry's revision is not text")
        _expect(isinstance(entry.reasons, list) and all(isinstance(r, str) for r in entry.reasons), "bad reasons")
        _expect(isinstance(entry.note, str), "an entry's note is not text")
        snap = entry.snapshot
        if snap is not None:
            _expect(isinstance(snap, dict) and set(snap) == {"id", "created_ms", "keys", "bytes"}, "bad snapshot")
            entry.snapshot = {k: _int(v) for k, v in snap.items()}
        return entry


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _int(value: Any) -> int:
    _expect(type(value) is int and value >= 0, "a number is not a whole number >= 0")
    return int(value)


@dataclass
class DeploymentHistory:
    """One deployment's file: entries (oldest first), the records they name, its pin."""

    name: str
    entries: list[Entry] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # spec hash -> CapsuleSpec.record()
    next_id: int = 1
    pin: dict[str, Any] | None = None  # {spec_hash, desired_hash, since_ms, entry}

    def latest(self) -> Entry | None:
        return self.entries[-1] if self.entries else None

    def to_json(self) -> bytes:
        data = {
            "format": FORMAT,
            "name": self.name,
            "next_id": self.next_id,
            "entries": [e.to_dict() for e in self.entries],
            "records": self.records,
            "pin": self.pin,
        }
        return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, name: str, raw: bytes) -> DeploymentHistory:
        data = json.loads(raw)
        _expect(isinstance(data, dict) and data.get("format") == FORMAT, "not a history file of this format")
        _expect(data.get("name") == name, "the file names another deployment")
        records = data.get("records")
        _expect(isinstance(records, dict) and all(isinstance(r, dict) for r in records.values()), "bad records")
        entries = data.get("entries")
        _expect(isinstance(entries, list), "entries is not a list")
        history = cls(name, [Entry.from_dict(e) for e in entries], records, _int(data.get("next_id")))
        _expect(all(e.spec_hash in records for e in history.entries), "an entry's record is missing")
        pin = data.get("pin")
        if pin is not None:
            _expect(isinstance(pin, dict) and str(pin.get("spec_hash")) in records, "the pin names no record")
            _expect(isinstance(pin.get("desired_hash"), str), "the pin has no desired hash")
            pin = {"spec_hash": pin["spec_hash"], "desired_hash": pin["desired_hash"]} | {
                k: _int(pin.get(k)) for k in ("since_ms", "entry")
            }
        history.pin = pin
        return history


def read_histories(folder: Path, *, repair: bool) -> dict[str, DeploymentHistory]:
    """Every history file in `folder`. One that cannot be used is skipped, and with
    `repair` moved aside (`NAME.json.unreadable`) so its history starts again. Blocking."""
    found: dict[str, DeploymentHistory] = {}
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return found
    except OSError as error:
        logger.warning("cannot read the version history in %s: %s", folder, error.strerror or error)
        return found
    for file in names:
        name = file[:-5] if file.endswith(".json") else ""
        if not NAME_RE.fullmatch(name):
            continue
        path = folder / file
        try:
            raw, _ = read_regular(path, limit=MAX_FILE_BYTES, what="history file")
            found[name] = DeploymentHistory.from_json(name, raw)
        except (FileReadError, ValueError, TypeError, KeyError, RecursionError) as error:
            reason = error.reason if isinstance(error, FileReadError) else str(error)[:200]
            if not repair:
                logger.warning("ignoring the version history %s: %s", path, reason)
                continue
            aside = path.with_name(f"{file}.unreadable")
            logger.warning("version history %s cannot be used (%s): moved to %s; it starts again", path, reason, aside)
            try:
                os.replace(path, aside)
            except OSError as move_error:
                logger.warning("could not move %s aside: %s", path, move_error.strerror or move_error)
    return found


def saved_pins(state_dir: Path) -> dict[str, Pin]:
    """The pins a state dir records, their specs rebuilt from the records (no module, no
    secret values: enough to plan with, as `orch plan` does without a running orchestrator;
    pass them through orchestrator.desired.pins.in_force first). Blocking; changes nothing."""
    pins: dict[str, Pin] = {}
    for name, history in read_histories(Path(state_dir) / HISTORY, repair=False).items():
        pin = history.pin
        if pin is None:
            continue
        try:
            spec = CapsuleSpec.from_record(history.records[pin["spec_hash"]])
        except (KeyError, TypeError, ValueError, AttributeError):
            logger.warning("ignoring the pin of %s: its record is damaged", name)
            continue
        pins[name] = Pin(spec=spec, desired_hash=pin["desired_hash"], since_ms=pin["since_ms"], entry=pin["entry"])
    return pins


class VersionHistory:
    """Every deployment's history in `<state_dir>/history`; `await open()` first."""

    def __init__(
        self,
        *,
        state_dir: Path,
        store: SnapshotStore,
        settings: Callable[[], HistorySettings],
        revision: Callable[[], str | None] = lambda: None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.folder = Path(state_dir) / HISTORY
        self.artifacts = ArtifactStore(Path(state_dir) / ARTIFACTS)
        self._store = store
        self._settings = settings
        self._revision = revision
        self._wall_ms = wall_ms
        self._lock = asyncio.Lock()
        self._histories: dict[str, DeploymentHistory] = {}
        self._kept: set[int] = set()  # snapshots a rollback is restoring: never dropped meanwhile

    # -- opening -------------------------------------------------------------------------
    async def open(self) -> None:
        """Read every history file, drop snapshots no entry refers to, forget snapshots the
        database no longer has, and remove modules no entry refers to."""
        async with self._lock:
            self._histories = await asyncio.to_thread(read_histories, self.folder, repair=True)
            try:
                kept = {info.id for info in await self._store.snapshot_infos()}
            except StoreError as error:
                logger.warning("version history: cannot list the KV snapshots: %s", error)
                return
            referred: set[int] = set()
            for history in self._histories.values():
                changed = False
                for entry in history.entries:
                    if entry.snapshot is not None and entry.snapshot["id"] not in kept:
                        entry.snapshot, entry.note, changed = None, "lost: not in the KV database", True
                    elif entry.snapshot is not None:
                        referred.add(entry.snapshot["id"])
                if changed:
                    await self._save(history)
            await self._drop(kept - referred)
            await asyncio.to_thread(self._collect_artifacts)

    # -- what the reconciler reports (control.reconciler.VersionLog) ---------------------
    async def replacing(self, name: str, old: CapsuleSpec | None, new: CapsuleSpec, *, always: bool = False) -> None:
        """`new` is about to serve instead of `old` (None: a start): snapshot the data the
        version being replaced leaves, onto its entry. Nothing for the same spec unless
        `always` (a rollback restores data: what it overwrites is kept first). Never raises
        for a snapshot that cannot be taken: the entry says why."""
        async with self._lock:
            history = self._history(name)
            current = history.latest()
            if old is not None and (current is None or current.spec_hash != old.spec_hash):
                current = await self._append(history, old, "start", ["running when its history began"])
            if current is None or (current.spec_hash == new.spec_hash and not always):
                return
            if old is None and not always and (current.snapshot is not None or current.note):
                return  # a start after a stop: its data was snapshotted (or tried) already
            previous, current.snapshot = current.snapshot, None  # (one from a rollback that failed: stale)
            current.note = await self._snapshot(name, current)
            if previous is not None:
                await self._bound(history, also_drop=[previous["id"]])
            # else the bounds apply (and the file is saved) once the new version serves: the
            # swap waits for nothing more (a snapshot no saved entry names is dropped at open)

    async def serving(self, name: str, spec: CapsuleSpec, *, event: str, reasons: Iterable[str] = ()) -> None:
        """`spec` serves `name` from now on: a new entry (none when the history already ends
        with this spec, except for a rollback)."""
        async with self._lock:
            history = self._history(name)
            current = history.latest()
            if current is not None and current.spec_hash == spec.spec_hash and event != "rollback":
                return
            await self._append(history, spec, event, list(reasons))

    async def _append(self, history: DeploymentHistory, spec: CapsuleSpec, event: str, reasons: list[str]) -> Entry:
        if spec.source is not None:
            try:
                await asyncio.to_thread(self.artifacts.put, spec.wasm_sha256, spec.source.wasm)
            except (OSError, ValueError) as error:
                logger.warning("capsule %s: cannot keep its module for rollbacks: %s", history.name, error)
        entry = Entry(
            id=history.next_id,
            at_ms=self._wall_ms(),
            event=event,
            spec_hash=spec.spec_hash,
            wasm_sha256=spec.wasm_sha256,
            revision=self._revision(),
            reasons=reasons,
        )
        history.next_id += 1
        history.entries.append(entry)
        history.records[spec.spec_hash] = spec.record()
        await self._bound(history)
        return entry

    async def _snapshot(self, name: str, entry: Entry) -> str:
        """Take the snapshot of `entry`; the note to show when there is none."""
        settings = self._settings()
        if settings.snapshots == 0:
            return "not taken: history.snapshots is 0"
        try:
            info = await self._store.take_snapshot(
                name, created_ms=self._wall_ms(), max_bytes=settings.snapshot_max_mib << 20
            )
        except SnapshotTooLarge as error:
            logger.warning("%s", error)
            return f"not taken: {error.size:,} bytes of data, over history.snapshot_max_mib"
        except StoreError as error:
            logger.warning("capsule %s: no snapshot of its data: %s", name, error)
            return "not taken: the KV database refused it (see the log)"
        entry.snapshot = info.to_dict()
        return ""

    async def _bound(self, history: DeploymentHistory, *, also_drop: Iterable[int] = ()) -> None:
        """Apply the bounds, drop what falls out (and `also_drop`), and save."""
        settings = self._settings()
        dropped: list[int] = list(also_drop)
        excess = len(history.entries) - settings.versions
        if excess > 0:
            for old in history.entries[:excess]:
                if old.snapshot is not None and old.snapshot["id"] not in self._kept:
                    dropped.append(old.snapshot["id"])
            del history.entries[:excess]
        count, size = 0, 0
        for entry in reversed(history.entries):
            if entry.snapshot is None or entry.snapshot["id"] in self._kept:
                continue
            if count < settings.snapshots and size + entry.snapshot["bytes"] <= settings.snapshot_max_mib << 20:
                count, size = count + 1, size + entry.snapshot["bytes"]
                continue
            dropped.append(entry.snapshot["id"])
            entry.snapshot, entry.note = None, "evicted: newer snapshots fill history.snapshots / snapshot_max_mib"
        wanted = {e.spec_hash for e in history.entries} | ({history.pin["spec_hash"]} if history.pin else set())
        history.records = {h: r for h, r in history.records.items() if h in wanted}
        await self._drop(dropped)
        await self._save(history)
        if excess > 0:
            await asyncio.to_thread(self._collect_artifacts)

    @contextlib.asynccontextmanager
    async def keeping(self, name: str, snapshot: int) -> AsyncIterator[None]:
        """While a rollback restores `snapshot`, the bounds never drop it (the snapshot
        the rollback takes first could otherwise push it out); they apply again after."""
        self._kept.add(snapshot)
        try:
            yield
        finally:
            self._kept.discard(snapshot)
            async with self._lock:
                history = self._histories.get(name)
                if history is not None:
                    if all(e.snapshot is None or e.snapshot["id"] != snapshot for e in history.entries):
                        await self._drop([snapshot])  # its entry went meanwhile
                    await self._bound(history)

    async def _drop(self, ids: Iterable[int]) -> None:
        ids = sorted(ids)
        if ids:
            try:
                await self._store.drop_snapshots(ids)
            except StoreError as error:  # dropped again at the next open (no entry refers to them)
                logger.warning("version history: cannot delete old snapshots: %s", error)

    def _collect_artifacts(self) -> None:
        wanted = {str(r.get("wasm_sha256")) for h in self._histories.values() for r in h.records.values()}
        for digest in self.artifacts.keep_only(wanted):
            logger.debug("version history: removed the module %s (no entry refers to it)", digest[:12])

    async def _save(self, history: DeploymentHistory) -> None:
        try:
            await asyncio.to_thread(self._write, history)
        except OSError as error:
            logger.warning("cannot write the version history of %s: %s", history.name, error.strerror or error)

    def _write(self, history: DeploymentHistory) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.folder / f"{history.name}.json", history.to_json())

    def _history(self, name: str) -> DeploymentHistory:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"not a deployment name: {name[:80]!r}")
        history = self._histories.get(name)
        if history is None:
            history = self._histories[name] = DeploymentHistory(name)
        return history

    # -- reading -------------------------------------------------------------------------
    def known(self, name: str) -> bool:
        return name in self._histories

    def entries(self, name: str) -> list[Entry]:
        """The deployment's entries, oldest first (a copy of the list)."""
        history = self._histories.get(name)
        return list(history.entries) if history is not None else []

    def record(self, name: str, entry: Entry) -> dict[str, Any]:
        return self._histories[name].records[entry.spec_hash]

    def pinned(self, name: str) -> dict[str, Any] | None:
        """The deployment's saved pin: {spec_hash, desired_hash, since_ms, entry}."""
        history = self._histories.get(name)
        return dict(history.pin) if history is not None and history.pin is not None else None

    def pinned_names(self) -> list[str]:
        return sorted(name for name, h in self._histories.items() if h.pin is not None)

    async def describe(self, name: str, *, running: str | None, pin: Pin | None) -> dict[str, Any]:
        """`GET /v1/capsules/{name}/history`: entries newest first, whether each one's module
        is kept and which one is serving now (`running`: its spec hash)."""
        entries = self.entries(name)
        kept = await asyncio.to_thread(lambda: {e.wasm_sha256: self.artifacts.has(e.wasm_sha256) for e in entries})
        shown = []
        for position, entry in enumerate(reversed(entries)):
            current = position == 0 and entry.spec_hash == running
            shown.append(entry.to_dict() | {"module_kept": kept[entry.wasm_sha256], "current": current})
        return {"capsule": name, "entries": shown, "pinned": pin.to_status() if pin is not None else None}

    def find(self, name: str, to: str | None, *, with_data: bool, running: str | None) -> Entry:
        """The entry a rollback goes to: `to` is a version or spec hash as `orch history`
        shows it (a prefix of at least 4 hex digits) or `@ID`; None means the version
        before the one running. The entry serving now is never the target; with
        `with_data`, the newest matching entry that has a snapshot. Raises UnknownVersion,
        RollbackRefused (ambiguous) or NoSnapshot."""
        entries = self.entries(name)
        if entries and entries[-1].spec_hash == running:
            entries = entries[:-1]
        if not entries:
            raise UnknownVersion(f"capsule {name!r} has no earlier version in its history to roll back to")
        target = self._target(name, to, entries, running)
        matching = [e for e in reversed(entries) if e.spec_hash == target]
        if with_data:
            with_snapshot = [e for e in matching if e.snapshot is not None]
            if not with_snapshot:
                why = next((e.note for e in matching if e.note), "")
                raise NoSnapshot(
                    f"capsule {name!r}: no snapshot of the data of version {matching[0].version} is kept"
                    + (f" ({why})" if why else " (a snapshot is taken when a reload replaces a version)")
                    + "; roll back without --with-data, or choose a version that has one (`orch history "
                    + f"{name}`)"
                )
            return with_snapshot[0]
        return matching[0]

    def _target(self, name: str, to: str | None, entries: list[Entry], running: str | None) -> str:
        """The spec hash `to` designates among `entries`."""
        if to is None:
            earlier = next((e for e in reversed(entries) if e.spec_hash != running), None)
            if earlier is None:
                raise UnknownVersion(f"capsule {name!r} has no earlier version than the one running")
            return earlier.spec_hash
        text = to.strip().lower()
        if text.startswith("@") and text[1:].isdigit() and len(text) <= 20:
            chosen = next((e for e in entries if e.id == int(text[1:])), None)
            if chosen is None:
                raise UnknownVersion(f"capsule {name!r} has no earlier history entry {text} (`orch history {name}`)")
            return chosen.spec_hash
        if not HEX.fullmatch(text):
            raise UnknownVersion(
                f"capsule {name!r}: {to[:80]!r} is not a version: give a version or spec hash as `orch history "
                f"{name}` shows it (at least 4 hex digits), or @ID"
            )
        hashes = {e.spec_hash for e in entries if e.wasm_sha256.startswith(text) or e.spec_hash.startswith(text)}
        if not hashes:
            known = ", ".join(dict.fromkeys(e.version for e in reversed(entries)))
            raise UnknownVersion(f"capsule {name!r} has no earlier version {text} in its history (versions: {known})")
        if len(hashes) > 1:
            raise RollbackRefused(
                f"capsule {name!r}: {text} matches {len(hashes)} different specs (the same module with other "
                "configs, or a short prefix): give more of the spec hash, or @ID (`orch history "
                f"{name}`)"
            )
        return hashes.pop()

    # -- pins ----------------------------------------------------------------------------
    async def save_pins(self, pins: Mapping[str, Pin]) -> None:
        """Record the pins in force (and forget the others), so a restart keeps them."""
        async with self._lock:
            for name in sorted(set(self._histories) | set(pins)):
                pin = pins.get(name)
                saved = (
                    {"spec_hash": pin.spec.spec_hash, "desired_hash": pin.desired_hash, "since_ms": pin.since_ms}
                    | {"entry": pin.entry}
                    if pin is not None
                    else None
                )
                history = self._history(name)
                if history.pin != saved:
                    if pin is not None:
                        history.records.setdefault(pin.spec.spec_hash, pin.spec.record())
                    history.pin = saved
                    await self._save(history)
