"""A deployment's versions on a lattice, read from the desired bucket's history.

The desired bucket keeps the last DESIRED_HISTORY revisions; each says what the lattice
runs for every deployment (`Deployment.runs()`). A deployment's *versions* are the
revisions where that changed (`orch history NAME --lattice`): the revision, when, by whom,
the event that made it (apply, approve, rollback, unpin, restore), the git commit when the
revision's source names one (`git+URL#REV:PATH @ <commit>`), the version and spec hash, the
plan's reasons against the version before, and the KV snapshot of the data it left when it
was replaced (recorded in the revision that replaced it, and still in the snapshots store).

`Versions.find(to)` is what a rollback goes back to: by default the version before the one
running; `@N` (or a number of at most 3 digits) the version revision N ran; otherwise a
version or spec hash as `orch history` shows it (at least 4 hex digits). It returns the
newest revision that ran it, whose record, secrets and artifacts the pin takes. Revisions
that cannot be read are skipped (and counted).

Used by the operator's verbs (orchestrator.lattice.rollback, the CLI through LatticeClient).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors

from ..control.history import HEX, NoSnapshot, RollbackRefused, UnknownVersion
from ..desired.reasons import reload_reasons
from ..errors import UnknownCapsule
from .artifacts import LatticeDataError
from .connection import Lattice
from .desiredstate import KEY, DesiredDoc, Version, desired_bucket
from .overrides import SnapshotNote
from .snapshots import stored

logger = logging.getLogger(__name__)

COMMIT = re.compile(r" @ ([0-9a-f]{7,64})$")


@dataclass
class Entry:
    """One version of the deployment: the revision that started running it."""

    revision: int
    doc: DesiredDoc
    version: Version
    reasons: list[str]
    last: int  # the last revision that ran it (before it was replaced, or the newest)
    snapshot: SnapshotNote | None = None  # the data it left, when a later revision replaced it
    snapshot_stored: bool = False

    @property
    def spec_hash(self) -> str:
        return self.version.spec.spec_hash

    def to_dict(self, *, current: bool, module_kept: bool) -> dict[str, Any]:
        """As `orch history` prints it (the control API's entry, plus who and where)."""
        snapshot = self.snapshot if self.snapshot is not None and self.snapshot_stored else None
        note = ""
        if self.snapshot is not None and self.snapshot.object is None:
            note = self.snapshot.note
        elif self.snapshot is not None and not self.snapshot_stored:
            note = "evicted: newer snapshots fill history.snapshots / snapshot_max_mib"
        commit = COMMIT.search(self.doc.source)
        return {
            "id": self.revision,
            "at_ms": self.doc.applied_at_ms,
            "event": self.doc.event,
            "version": self.version.spec.version,
            "spec_hash": self.spec_hash,
            "wasm_sha256": self.version.wasm,
            "revision": commit.group(1) if commit else None,
            "reasons": list(self.reasons),
            "snapshot": {"id": self.last, "keys": snapshot.keys, "bytes": snapshot.bytes, "object": snapshot.object}
            if snapshot is not None
            else None,
            "note": note,
            "module_kept": module_kept,
            "current": current,
            "by": self.doc.applied_by,
            "source": self.doc.source,
        }


@dataclass
class Versions:
    """The versions of deployment `name` (oldest first) and the current revision."""

    name: str
    entries: list[Entry]
    current: DesiredDoc | None
    docs: dict[int, DesiredDoc] = field(default_factory=dict)
    unreadable: int = 0

    def running(self) -> str | None:
        """The spec hash the lattice runs for it now (None: nothing)."""
        deployment = self.current.deployments.get(self.name) if self.current else None
        version = deployment.runs() if deployment is not None and deployment.spec.enabled else None
        return version.spec.spec_hash if version is not None else None

    def find(self, to: str | None, *, with_data: bool) -> Entry:
        """The entry a rollback goes to (see the module docstring). Raises UnknownVersion,
        RollbackRefused (ambiguous) or NoSnapshot."""
        running = self.running()
        earlier = [e for e in self.entries if e.spec_hash != running]
        if not earlier:
            raise UnknownVersion(
                f"capsule {self.name!r} has no earlier version in the lattice's history to roll back to"
            )
        chosen = earlier[-1] if to is None else self._named(to.strip().lower(), earlier)
        if with_data and not chosen.snapshot_stored:
            with_snapshot = [e for e in reversed(earlier) if e.spec_hash == chosen.spec_hash and e.snapshot_stored]
            if not with_snapshot:
                why = chosen.to_dict(current=False, module_kept=True)["note"]
                raise NoSnapshot(
                    f"capsule {self.name!r}: no snapshot of the data of version {chosen.version.spec.version} is kept"
                    + (f" ({why})" if why else " (one is taken when a revision replaces a version)")
                    + f"; roll back without --with-data, or choose a version that has one (`orch history {self.name}`)"
                )
            chosen = with_snapshot[0]
        return chosen

    def _named(self, text: str, earlier: list[Entry]) -> Entry:
        if text.startswith("@"):
            at = self._at(text[1:], earlier)
            if at is None:
                raise UnknownVersion(
                    f"capsule {self.name!r}: revision {text[1:21]} ran no earlier version of it in the lattice's "
                    f"history (`orch history {self.name} --lattice URL`)"
                )
            return at
        at = self._at(text, earlier)
        if text.isdigit() and len(text) <= 3:
            if at is None:
                raise UnknownVersion(f"capsule {self.name!r}: revision {text} ran no earlier version of it")
            return at
        if not HEX.fullmatch(text):
            raise UnknownVersion(
                f"capsule {self.name!r}: {text[:80]!r} is not a revision or version: give @REVISION, or a version or "
                f"spec hash as `orch history {self.name}` shows it (at least 4 hex digits)"
            )
        hashes = {e.spec_hash for e in earlier if e.version.wasm.startswith(text) or e.spec_hash.startswith(text)}
        if at is not None and hashes and hashes != {at.spec_hash}:
            raise RollbackRefused(
                f"capsule {self.name!r}: {text} is a revision and a version: write @{text} for the revision"
            )
        if at is not None:
            return at
        if not hashes:
            known = ", ".join(dict.fromkeys(e.version.spec.version for e in reversed(earlier)))
            raise UnknownVersion(
                f"capsule {self.name!r} has no earlier version {text} in its history (versions: {known})"
            )
        if len(hashes) > 1:
            raise RollbackRefused(
                f"capsule {self.name!r}: {text} matches {len(hashes)} different specs: give more of the spec hash, "
                f"or @REVISION (`orch history {self.name}`)"
            )
        digest = hashes.pop()
        return next(e for e in reversed(earlier) if e.spec_hash == digest)

    @staticmethod
    def _at(text: str, earlier: list[Entry]) -> Entry | None:
        """The entry that revision `text` ran, if it is a revision number and ran one."""
        if not text.isdigit() or len(text) > 19:
            return None
        wanted = int(text)
        return next((e for e in reversed(earlier) if e.revision <= wanted <= e.last), None)


async def revisions(lattice: Lattice) -> tuple[list[DesiredDoc], int]:
    """Every stored desired revision that can be read, oldest first, and how many cannot."""
    await desired_bucket(lattice)
    names = lattice.names
    stream, subject = f"KV_{names.desired}", f"$KV.{names.desired}.{KEY}"
    docs: list[DesiredDoc] = []
    unreadable = seq = 0
    while True:
        try:
            message = await lattice.js.get_msg(stream, seq=seq + 1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        seq = int(message.seq or 0)
        if not message.data or (message.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            continue
        try:
            docs.append(DesiredDoc.parse(message.data, revision=seq, where=f"{names.desired}.{KEY}"))
        except LatticeDataError:
            unreadable += 1
    return docs, unreadable


async def versions_of(lattice: Lattice, name: str) -> Versions:
    """Deployment `name`'s versions (see the module docstring). UnknownCapsule when no
    stored revision names it."""
    try:
        docs, unreadable = await revisions(lattice)
        kept = {s.object for s in await stored(lattice, name)}
    except (nats.errors.Error, TimeoutError) as error:
        raise RollbackRefused(f"cannot read the lattice's history: {type(error).__name__}: {error}") from None
    result = Versions(name, [], docs[-1] if docs else None, {d.revision: d for d in docs}, unreadable)
    if not any(name in d.deployments for d in docs):
        raise UnknownCapsule(f"no capsule {name!r} in the lattice's desired state or its history")
    for doc in docs:
        deployment = doc.deployments.get(name)
        if deployment is not None and deployment.snapshot is not None:
            for entry in reversed(result.entries):
                if entry.spec_hash == deployment.snapshot.spec_hash and entry.snapshot is None:
                    entry.snapshot = deployment.snapshot
                    entry.snapshot_stored = deployment.snapshot.object in kept
                    break
        version = deployment.runs() if deployment is not None and deployment.spec.enabled else None
        if version is None:
            continue
        last = result.entries[-1] if result.entries else None
        if last is not None and last.spec_hash == version.spec.spec_hash:
            last.last = doc.revision
            continue
        reasons = list(reload_reasons(last.version.spec, version.spec)[0]) if last is not None else []
        result.entries.append(Entry(doc.revision, doc, version, reasons, doc.revision))
    return result
