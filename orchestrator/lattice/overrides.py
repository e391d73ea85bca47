"""A deployment of a desired revision: its desired version, and what the lattice runs instead.

A deployment entry of the desired document (orchestrator.lattice.desiredstate) is its
*desired version*, what `orch apply` read from config.yaml and the capsule's files:

    {"record": <CapsuleSpec.record()>, "secrets": {KEY: VALUE}, "wasm": <sha256>, "manifest": <sha256>}

plus, when the lattice runs something else, the GitOps fields (each optional):

    "held": VERSION | null        what keeps running while the desired version waits
    "awaiting": {"spec_hash", "escalations", "since_ms"}   the desired version waits for `orch approve`
    "rejected": {"spec_hash", "escalations", "at_ms"}      ... or was refused by `orch reject`
    "pinned": VERSION + {"desired_hash", "since_ms", "revision"}   a rollback runs an earlier version
    "paused": true                hosts serve no call of it (a rollback restoring its data)
    "restoring": {"snapshot", "spec_hash", "revision", "since_ms"}   the restore under way
    "snapshot": {"spec_hash", "object", "keys", "bytes", "note"}   in the revision that replaced a
                                  version: the KV data that version left (orchestrator.lattice.snapshots)

VERSION is a desired version's four fields. `Deployment.runs()` is what hosts run: the pin,
else the held version while a change awaits approval or was rejected (None when nothing
ran before: a start that waits), else the desired version. Its wiring (enabled, hosts,
labels, depends_on: not part of the spec hash) always follows the desired version.

`parse_deployment` checks every field, and that the fields agree with each other (a hold
names the desired spec hash, a pin the desired spec it was made against, `paused` and
`restoring` come together), raising ValueError with a short reason: a stored document
that is not what this code writes is refused whole, and hosts keep running the last good one.

Pure values. Used by orchestrator.lattice.desiredstate (the document), .judge (approvals),
.share (what a host runs), .status, .snapshots and the operator's verbs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..control.approvals import Pending, Rejection
from ..desired.spec import CapsuleSpec
from ..limits import Limits
from .artifacts import SHA256

VERSION_KEYS = frozenset({"record", "secrets", "wasm", "manifest"})
OVERRIDE_KEYS = frozenset({"held", "awaiting", "rejected", "pinned", "paused", "restoring", "snapshot"})
PIN_KEYS = VERSION_KEYS | {"desired_hash", "since_ms", "revision"}
HASH = re.compile(r"[0-9a-f]{64}")
MAX_ESCALATIONS = 1000
MAX_TEXT = 4096
MAX_OBJECT_NAME = 1024


@dataclass(frozen=True)
class Version:
    """One version of a deployment: its spec (rebuilt from the record: no source, secrets as
    digests), the record itself, its secret values, and its artifacts' names."""

    spec: CapsuleSpec
    record: Mapping[str, Any]
    secrets: Mapping[str, str]
    wasm: str
    manifest: str

    def version_json(self) -> dict[str, Any]:
        return {
            "record": dict(self.record),
            "secrets": dict(self.secrets),
            "wasm": self.wasm,
            "manifest": self.manifest,
        }

    def as_version(self) -> Version:
        """This version alone (a Deployment without its GitOps fields)."""
        return Version(self.spec, self.record, self.secrets, self.wasm, self.manifest)


# The same values as on one host: a change waiting for the operator, a change refused.
Awaiting = Pending
Rejected = Rejection


@dataclass(frozen=True)
class Pinned:
    """A rollback: `version` (from revision `revision`) runs while the desired spec hash is
    `desired_hash`."""

    version: Version
    desired_hash: str
    since_ms: int
    revision: int

    def to_json(self) -> dict[str, Any]:
        fields = {"desired_hash": self.desired_hash, "since_ms": self.since_ms, "revision": self.revision}
        return self.version.version_json() | fields

    def to_status(self) -> dict[str, Any]:
        """What status shows (as on one host, plus the revision it came from)."""
        spec = self.version.spec
        return {
            "version": spec.version,
            "spec_hash": spec.spec_hash,
            "since_ms": self.since_ms,
            "revision": self.revision,
        }


@dataclass(frozen=True)
class Restoring:
    """A rollback with data under way: snapshot `snapshot` (of version `spec_hash`, taken
    when revision `revision` was replaced) goes back into the KV."""

    snapshot: str
    spec_hash: str
    revision: int
    since_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "snapshot": self.snapshot,
            "spec_hash": self.spec_hash,
            "revision": self.revision,
            "since_ms": self.since_ms,
        }


@dataclass(frozen=True)
class SnapshotNote:
    """In the revision that replaced version `spec_hash`: the KV data it left (`object` in
    the snapshots store), or why there is none (`note`)."""

    spec_hash: str
    object: str | None
    keys: int = 0
    bytes: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec_hash": self.spec_hash,
            "object": self.object,
            "keys": self.keys,
            "bytes": self.bytes,
            "note": self.note,
        }


@dataclass(frozen=True)
class Deployment(Version):
    """One deployment of a desired revision: its desired version and its GitOps fields."""

    held: Version | None = None
    awaiting: Awaiting | None = None
    rejected: Rejected | None = None
    pinned: Pinned | None = None
    paused: bool = False
    restoring: Restoring | None = None
    snapshot: SnapshotNote | None = None

    def runs(self) -> Version | None:
        """The version hosts run (see the module docstring); None when nothing may run."""
        if self.pinned is not None:
            return self.pinned.version
        if self.awaiting is not None or self.rejected is not None:
            return self.held
        return self.as_version()

    def replace(self, **changes: Any) -> Deployment:
        return dataclasses.replace(self, **changes)

    def with_desired(self, version: Version) -> Deployment:
        """The same GitOps fields over another desired version (to be judged again)."""
        return dataclasses.replace(
            self,
            spec=version.spec,
            record=version.record,
            secrets=version.secrets,
            wasm=version.wasm,
            manifest=version.manifest,
        )

    def plain(self) -> Deployment:
        """The desired version alone: no hold, pin, pause or snapshot."""
        return Deployment(self.spec, self.record, self.secrets, self.wasm, self.manifest)

    def to_json(self) -> dict[str, Any]:
        entry = self.version_json()
        if self.awaiting is not None or self.rejected is not None:
            entry["held"] = self.held.version_json() if self.held is not None else None
        if self.awaiting is not None:
            entry["awaiting"] = self.awaiting.to_dict()
        if self.rejected is not None:
            entry["rejected"] = self.rejected.to_dict()
        if self.pinned is not None:
            entry["pinned"] = self.pinned.to_json()
        if self.paused:
            entry["paused"] = True
        if self.restoring is not None:
            entry["restoring"] = self.restoring.to_dict()
        if self.snapshot is not None:
            entry["snapshot"] = self.snapshot.to_dict()
        return entry


# -- parsing -------------------------------------------------------------------------------
def parse_version(name: str, entry: Any, *, keys: frozenset[str] = VERSION_KEYS, what: str = "") -> Version:
    """A version of deployment `name` as stored. ValueError (naming `what`) otherwise."""
    where = f"{what}: " if what else ""
    if not isinstance(entry, dict) or set(entry) != keys:
        raise ValueError(f"{where}expected exactly the fields {', '.join(sorted(keys))}")
    record, secrets, wasm, manifest = entry["record"], entry["secrets"], entry["wasm"], entry["manifest"]
    if (
        not isinstance(wasm, str)
        or not SHA256.match(wasm)
        or not isinstance(manifest, str)
        or not SHA256.match(manifest)
    ):
        raise ValueError(f"{where}wasm and manifest must be sha256 artifact names")
    if not isinstance(secrets, dict) or not all(isinstance(v, str) for v in secrets.values()):
        raise ValueError(f"{where}secrets must be a mapping of text")
    if not isinstance(record, dict) or record.get("name") != name or record.get("wasm_sha256") != wasm:
        raise ValueError(f"{where}its record is not this deployment's (name or wasm differ)")
    try:
        spec = CapsuleSpec.from_record(record)
        Limits(**spec.limits)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{where}its record is malformed ({type(error).__name__}: {str(error)[:200]})") from None
    if set(secrets) != {k for k in spec.config if k in spec.secret_keys}:
        raise ValueError(f"{where}secrets must hold exactly the values of its secret config keys")
    if not 1 <= spec.instances <= 64 or not 1 <= spec.hosts <= 1000:
        raise ValueError(f"{where}instances or hosts out of range")
    if not isinstance(record.get("manifest"), dict) or spec.spec_hash != record.get("spec_hash"):
        raise ValueError(f"{where}its record does not hash to its spec_hash")
    return Version(spec, record, dict(secrets), wasm, manifest)


def parse_deployment(name: str, entry: Any) -> Deployment:
    """A deployment entry as stored (see the module docstring). ValueError otherwise."""
    if not isinstance(entry, dict) or not set(entry) >= VERSION_KEYS or not set(entry) <= VERSION_KEYS | OVERRIDE_KEYS:
        raise ValueError(
            f"expected the fields {', '.join(sorted(VERSION_KEYS))}, "
            f"and only {', '.join(sorted(OVERRIDE_KEYS))} besides"
        )
    desired = parse_version(name, {k: entry[k] for k in VERSION_KEYS})
    digest = desired.spec.spec_hash
    awaiting = _hold(entry, "awaiting", "since_ms", Awaiting) if "awaiting" in entry else None
    rejected = _hold(entry, "rejected", "at_ms", Rejected) if "rejected" in entry else None
    if awaiting is not None and rejected is not None:
        raise ValueError("awaiting and rejected exclude each other")
    hold = awaiting or rejected
    if hold is not None and hold.spec_hash != digest:
        raise ValueError("awaiting/rejected names another spec than the desired one")
    if ("held" in entry) != (hold is not None):
        raise ValueError("held comes with awaiting or rejected, and only with them")
    held = entry.get("held")
    held_version = parse_version(name, held, what="held") if held is not None else None
    pinned = _pinned(name, entry["pinned"]) if "pinned" in entry else None
    if pinned is not None and hold is not None:
        raise ValueError("pinned excludes awaiting and rejected")
    if pinned is not None and pinned.desired_hash != digest:
        raise ValueError("pinned was made against another desired spec")
    paused = entry.get("paused", False)
    if not isinstance(paused, bool):
        raise ValueError("paused must be true or false")
    restoring = _restoring(entry["restoring"]) if "restoring" in entry else None
    if (restoring is not None) != paused:
        raise ValueError("paused and restoring come together (a rollback restoring data)")
    snapshot = _snapshot(entry["snapshot"]) if "snapshot" in entry else None
    return Deployment(
        desired.spec,
        desired.record,
        desired.secrets,
        desired.wasm,
        desired.manifest,
        held=held_version,
        awaiting=awaiting,
        rejected=rejected,
        pinned=pinned,
        paused=paused,
        restoring=restoring,
        snapshot=snapshot,
    )


def _hold(entry: Mapping[str, Any], field: str, when: str, kind: type[Awaiting] | type[Rejected]) -> Any:
    value = entry[field]
    if not isinstance(value, dict) or set(value) != {"spec_hash", "escalations", when}:
        raise ValueError(f"{field} must be {{spec_hash, escalations, {when}}}")
    escalations = value["escalations"]
    if (
        not isinstance(escalations, list)
        or len(escalations) > MAX_ESCALATIONS
        or not all(isinstance(e, str) and 0 < len(e) <= MAX_TEXT for e in escalations)
    ):
        raise ValueError(f"{field}.escalations must be a list of at most {MAX_ESCALATIONS} texts")
    return kind(
        _hash(value["spec_hash"], f"{field}.spec_hash"), tuple(escalations), _whole(value[when], f"{field}.{when}")
    )


def _pinned(name: str, value: Any) -> Pinned:
    if not isinstance(value, dict) or set(value) != PIN_KEYS:
        raise ValueError(f"pinned: expected exactly the fields {', '.join(sorted(PIN_KEYS))}")
    version = parse_version(name, {k: value[k] for k in VERSION_KEYS}, what="pinned")
    return Pinned(
        version,
        _hash(value["desired_hash"], "pinned.desired_hash"),
        _whole(value["since_ms"], "pinned.since_ms"),
        _whole(value["revision"], "pinned.revision"),
    )


def _restoring(value: Any) -> Restoring:
    if not isinstance(value, dict) or set(value) != {"snapshot", "spec_hash", "revision", "since_ms"}:
        raise ValueError("restoring must be {snapshot, spec_hash, revision, since_ms}")
    return Restoring(
        _object(value["snapshot"], "restoring.snapshot"),
        _hash(value["spec_hash"], "restoring.spec_hash"),
        _whole(value["revision"], "restoring.revision"),
        _whole(value["since_ms"], "restoring.since_ms"),
    )


def _snapshot(value: Any) -> SnapshotNote:
    if not isinstance(value, dict) or set(value) != {"spec_hash", "object", "keys", "bytes", "note"}:
        raise ValueError("snapshot must be {spec_hash, object, keys, bytes, note}")
    note = value["note"]
    if not isinstance(note, str) or len(note) > MAX_TEXT:
        raise ValueError("snapshot.note must be a short text")
    return SnapshotNote(
        _hash(value["spec_hash"], "snapshot.spec_hash"),
        None if value["object"] is None else _object(value["object"], "snapshot.object"),
        _whole(value["keys"], "snapshot.keys"),
        _whole(value["bytes"], "snapshot.bytes"),
        note,
    )


def _hash(value: Any, field: str) -> str:
    if not isinstance(value, str) or not HASH.fullmatch(value):
        raise ValueError(f"{field} must be 64 hex digits")
    return value


def _whole(value: Any, field: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 63:
        raise ValueError(f"{field} must be a whole number")
    return value


def _object(value: Any, field: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_OBJECT_NAME or not value.isprintable():
        raise ValueError(f"{field} must be an object name")
    return value
