"""The lattice's desired state: what `orch apply` publishes and what every host reads.

One key, `config`, in the desired bucket (history DESIRED_HISTORY): each revision is one
`orch apply` (or one answer of an operator: approve, reject, rollback, unpin), so the
bucket's history is the deployment history and its audit trail. A revision is a JSON
document (format 1):

    {"format": 1, "config_sha256": ..., "source": "<config.yaml path where applied>",
     "applied_at_ms": ..., "applied_by": "<user>@<machine>", "replicas": N,
     "approvals": {"escalations": "allow"|"ask", "allow": [...]},   the policy in force after it
     "history": {"versions", "snapshots", "snapshot_max_mib"},     the bounds of KV snapshots
     "event": "apply"|"approve"|"reject"|"rollback"|"unpin"|"restore",   what made it
     "deployments": {NAME: {"record": <CapsuleSpec.record()>, "secrets": {KEY: VALUE},
                            "wasm": <sha256>, "manifest": <sha256>, ...GitOps fields}}}

(`approvals`, `history` and `event` are absent from revisions of older orchestrators: allow,
the default bounds, apply). `record` is the spec without secret values (the same record
`applied.json` keeps); `secrets` are the secret config values in clear (a host needs them
to run the capsule): **the desired bucket holds secrets, so protect the lattice with NATS
credentials**. `wasm` and `manifest` name the module and the Capsule.toml text in the
object store (orchestrator.lattice.artifacts). The GitOps fields of a deployment (a change
held for approval, a rollback's pin, a pause, a snapshot) are orchestrator.lattice.overrides'.

Every revision is put by `commit_revision`: read the current revision, draft the new one,
judge it against what runs (orchestrator.lattice.judge: escalations wait for `orch approve`
unless the policy in force allows them), snapshot the KV data of each version it replaces
(orchestrator.lattice.snapshots), put it with compare-and-set on the revision read (a
concurrent writer makes it start again), then announce the audit events (.audit).
`publish` (for `orch apply` and a git follower, after local validation) uploads the
artifacts the store lacks, scales the lattice's streams to `lattice.replicas`, and commits
the document unless it says what the current revision says; the GitOps state carries over.

`current` reads the latest revision; `DesiredDoc.parse` checks every field and that each
record rebuilds to its own spec hash, so a malformed or foreign value is refused with one
clear line and changes nothing that runs. `rebuild_spec` turns a version back into a
runnable CapsuleSpec from the fetched artifacts, and checks it hashes to what was applied.

Used by the CLI (`orch apply`, `orch plan --lattice`), the scheduler, the host runtime,
lattice status and the operator's verbs (orchestrator.lattice.answers, .rollback).
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import ValidationError

from ..control.approvals import STRICTEST
from ..desired.config import ApprovalPolicy, HistorySettings
from ..desired.load import DesiredState, build_spec
from ..desired.manifest import MAX_MANIFEST_BYTES, parse_manifest
from ..desired.spec import CapsuleSpec
from ..errors import ConfigError, Problem
from ..files import FileReadError, FileStamp, read_regular
from ..limits import Limits
from .artifacts import LatticeDataError, LatticeSource, sha256_hex, upload
from .audit import announce
from .connection import Lattice, LatticeError
from .judge import Audit, settle
from .overrides import VERSION_KEYS, Deployment, Version, parse_deployment
from .placement import Want
from .replicas import scale
from .snapshots import take

logger = logging.getLogger(__name__)

FORMAT = 1
KEY = "config"
DESIRED_HISTORY = 64
MAX_DOCUMENT_BYTES = 64 << 20
MAX_DEPLOYMENTS = 10_000
DEPLOYMENT_KEYS = VERSION_KEYS
DOCUMENT_KEYS = {"format", "config_sha256", "source", "applied_at_ms", "applied_by", "replicas", "deployments"}
OPTIONAL_KEYS = {"approvals", "history", "event"}
EVENTS = ("apply", "approve", "reject", "rollback", "unpin", "restore")
CAS_ATTEMPTS = 8

__all__ = ["Deployment", "DesiredDoc", "Version", "commit_revision", "current", "latest_good", "publish", "scale"]


@dataclass(frozen=True)
class DesiredDoc:
    """One revision of the desired state, checked."""

    revision: int
    config_sha256: str
    source: str
    applied_at_ms: int
    applied_by: str
    replicas: int
    deployments: dict[str, Deployment]
    approvals: ApprovalPolicy = field(default_factory=ApprovalPolicy)
    history: HistorySettings = field(default_factory=HistorySettings)
    event: str = "apply"

    def specs(self) -> dict[str, CapsuleSpec]:
        """Every deployment's desired spec, without sources (for plans and status)."""
        return {name: d.spec for name, d in self.deployments.items()}

    def wants(self) -> dict[str, Want]:
        """What placement must place: the enabled deployments that have a version to run
        (not a start that waits for approval or was rejected)."""
        return {
            name: Want(d.spec.hosts, dict(d.spec.labels))
            for name, d in self.deployments.items()
            if d.spec.enabled and d.runs() is not None
        }

    def summary(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "config_sha256": self.config_sha256,
            "source": self.source,
            "applied_at_ms": self.applied_at_ms,
            "applied_by": self.applied_by,
            "deployments": len(self.deployments),
            "event": self.event,
        }

    def fields(self, *, event: str, now_ms: int) -> dict[str, Any]:
        """This revision's top-level fields for a new revision made by `event` now (an
        operator's answer: the config, its policy and bounds stay)."""
        return {
            "format": FORMAT,
            "config_sha256": self.config_sha256,
            "source": self.source,
            "applied_at_ms": now_ms,
            "applied_by": who(),
            "replicas": self.replicas,
            "approvals": self.approvals.model_dump(),
            "history": self.history.model_dump(),
            "event": event,
        }

    @classmethod
    def parse(cls, data: bytes, *, revision: int, where: str) -> DesiredDoc:
        """Check a stored revision. LatticeDataError (naming `where`) when it is not one."""

        def bad(why: str) -> LatticeDataError:
            return LatticeDataError(f"{where} (revision {revision}) is not a desired state: {why}; run `orch apply`")

        if len(data) > MAX_DOCUMENT_BYTES:
            raise bad(f"{len(data):,} bytes, over {MAX_DOCUMENT_BYTES:,}")
        try:
            value: Any = json.loads(data)
        except (ValueError, RecursionError):
            raise bad("not JSON") from None
        if (
            not isinstance(value, dict)
            or not set(value) >= DOCUMENT_KEYS
            or not set(value) <= DOCUMENT_KEYS | OPTIONAL_KEYS
        ):
            raise bad(
                f"expected the fields {', '.join(sorted(DOCUMENT_KEYS))} (and {', '.join(sorted(OPTIONAL_KEYS))})"
            )
        if value["format"] != FORMAT:
            raise bad(f"format {value['format']!r}; this orchestrator reads format {FORMAT} (upgrade it)")
        texts = {k: value[k] for k in ("config_sha256", "source", "applied_by")}
        numbers = {k: value[k] for k in ("applied_at_ms", "replicas")}
        if not all(isinstance(v, str) for v in texts.values()) or not all(_whole(v) for v in numbers.values()):
            raise bad("config_sha256, source, applied_by must be text; applied_at_ms, replicas whole numbers")
        try:
            approvals = ApprovalPolicy.model_validate(value.get("approvals", {}))
            history = HistorySettings.model_validate(value.get("history", {}))
        except (ValidationError, ValueError, TypeError, RecursionError):
            raise bad("approvals or history is not what config.yaml allows there") from None
        event = value.get("event", "apply")
        if event not in EVENTS:
            raise bad(f"event must be one of {', '.join(EVENTS)}")
        deployments = value["deployments"]
        if not isinstance(deployments, dict) or len(deployments) > MAX_DEPLOYMENTS:
            raise bad(f"deployments must be a mapping of at most {MAX_DEPLOYMENTS:,}")
        parsed = {}
        for name, entry in deployments.items():
            try:
                parsed[name] = parse_deployment(name, entry)
            except ValueError as error:
                raise bad(f"deployment {name[:80]!r}: {error}") from None
        return cls(
            revision=revision,
            config_sha256=texts["config_sha256"],
            source=texts["source"],
            applied_at_ms=numbers["applied_at_ms"],
            applied_by=texts["applied_by"],
            replicas=numbers["replicas"],
            deployments=parsed,
            approvals=approvals,
            history=history,
            event=event,
        )


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def who() -> str:
    """`user@machine`: who publishes a revision."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# -- building (orch apply) ---------------------------------------------------------------
def manifest_texts(desired: DesiredState) -> dict[str, bytes]:
    """Each deployment's Capsule.toml as the loader parsed it (blocking). ConfigError when a
    manifest changed since it was read (apply again)."""
    texts: dict[str, bytes] = {}
    for name, spec in desired.specs.items():
        assert spec.source is not None, "specs read from files carry their source"
        path = Path(spec.folder) / "Capsule.toml"
        try:
            data, stamp = read_regular(path, limit=MAX_MANIFEST_BYTES, what="manifest")
        except FileReadError as error:
            data, stamp = b"", None
            logger.debug("re-reading %s: %s", path, error)
        if stamp is None or stamp != spec.source.manifest_stamp:
            raise ConfigError([Problem("changed while `orch apply` read it: run `orch apply` again", file=str(path))])
        texts[name] = data
    return texts


def document(
    desired: DesiredState, manifests: Mapping[str, bytes], *, now_ms: int, source: str | None = None
) -> dict[str, Any]:
    """The JSON document of one applied revision (format 1), without GitOps state. `source`
    says where the config came from (default: its path), e.g. `git+URL#main:config.yaml @
    3fa1c2d4e5f6`."""
    deployments = {}
    for name, spec in sorted(desired.specs.items()):
        deployments[name] = {
            "record": spec.record(),
            "secrets": {k: v for k, v in spec.config.items() if k in spec.secret_keys},
            "wasm": spec.wasm_sha256,
            "manifest": sha256_hex(manifests[name]),
        }
    model = desired.config.model
    return {
        "format": FORMAT,
        "config_sha256": desired.config.text_sha256,
        "source": source if source is not None else str(desired.config.path),
        "applied_at_ms": now_ms,
        "applied_by": who(),
        "replicas": model.lattice.replicas,
        "approvals": model.approvals.model_dump(),
        "history": model.history.model_dump(),
        "event": "apply",
        "deployments": deployments,
    }


# -- committing a revision ---------------------------------------------------------------
@dataclass
class Draft:
    """A new revision before it is judged: its top-level fields (all but `deployments`),
    its deployments, what the operator grants (name -> spec hash), the new config's own
    policy (an apply's: it can tighten the judgement, never relax it), and audit events of
    its own (a rejection)."""

    fields: dict[str, Any]
    deployments: dict[str, Deployment]
    granted: dict[str, str] = field(default_factory=dict)
    proposed: ApprovalPolicy | None = None
    audits: list[Audit] = field(default_factory=list)


@dataclass(frozen=True)
class Committed:
    revision: int
    doc: DesiredDoc | None  # the revision now current (None: nothing was ever applied)
    unchanged: bool
    audits: tuple[Audit, ...] = ()


async def desired_bucket(lattice: Lattice) -> KeyValue:
    return await lattice.bucket(lattice.names.desired, history=DESIRED_HISTORY)


async def commit_revision(
    lattice: Lattice, make: Callable[[DesiredDoc | None], Draft | None], *, replace_unreadable: bool = False
) -> Committed:
    """Put the revision `make(current)` drafts (see the module docstring); None from `make`:
    nothing to change. `make` may raise to refuse (nothing changes). A latest revision that
    cannot be read is replaced only if `replace_unreadable` (`orch apply`: judged strictly
    against the last good one); otherwise its LatticeDataError is raised (an operator's
    answer must be about what the lattice says). Raises LatticeError."""
    where = f"{lattice.names.desired}.{KEY}"
    try:
        bucket = await desired_bucket(lattice)
        for _ in range(CAS_ATTEMPTS):
            last, before, unreadable = await _for_update(lattice, quiet=not replace_unreadable)
            draft = make(before)
            if draft is None:
                return Committed(before.revision if before else 0, before, unchanged=True)
            draft.deployments = {
                n: d.replace(snapshot=None) for n, d in draft.deployments.items()
            }  # this revision's own
            now_ms = int(time.time() * 1000)
            policy = STRICTEST if unreadable else before.approvals if before else draft.proposed or ApprovalPolicy()
            settled = settle(
                draft.deployments,
                before.deployments if before else None,
                policy=policy,
                proposed=draft.proposed,
                granted=draft.granted,
                now_ms=now_ms,
            )
            deployments = settled.deployments
            keep = {d.restoring.snapshot for d in deployments.values() if d.restoring is not None}
            bounds = HistorySettings.model_validate(draft.fields.get("history", {}))
            for replaced in settled.replaced:
                assert before is not None
                note = await take(
                    lattice,
                    replaced.name,
                    replaced.version.spec.spec_hash,
                    revision=before.revision,
                    settings=bounds,
                    keep=keep,
                    now_ms=now_ms,
                )
                deployments[replaced.name] = deployments[replaced.name].replace(snapshot=note)
            body = {**draft.fields, "deployments": {n: d.to_json() for n, d in sorted(deployments.items())}}
            data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
            _fits(lattice, data)
            try:
                revision = int(await bucket.update(KEY, data, last=last))
            except nats.js.errors.KeyWrongLastSequenceError:
                logger.info("the desired state changed while a revision was drafted; drafting it again")
                continue
            audits = (*settled.audits, *draft.audits)
            await announce(lattice, audits, by=str(draft.fields.get("applied_by", who())))
            return Committed(revision, DesiredDoc.parse(data, revision=revision, where=where), False, audits)
    except (nats.errors.Error, OSError, TimeoutError) as error:
        raise LatticeError(
            f"the lattice at {lattice.address.shown} did not take the desired state "
            f"({type(error).__name__}: {error or 'no answer'}); nothing changed unless it says otherwise: try again"
        ) from None
    raise LatticeError(
        f"the desired state of the lattice at {lattice.address.shown} kept changing while a revision was drafted "
        f"({CAS_ATTEMPTS} attempts); nothing changed: try again"
    )


def _fits(lattice: Lattice, data: bytes) -> None:
    if len(data) > lattice.nc.max_payload - 4096:
        raise LatticeError(
            f"the desired state is {len(data):,} bytes, more than the lattice's servers take in one message "
            f"(max_payload {lattice.nc.max_payload:,}): raise max_payload in the NATS server config "
            "(e.g. max_payload: 8MB), or split the config into several lattices"
        )


async def _for_update(lattice: Lattice, *, quiet: bool) -> tuple[int, DesiredDoc | None, bool]:
    """(the revision to expect, the revision to judge against, whether the latest one is
    unreadable or deleted: then the last good one is judged against, and strictly). With
    `quiet`, an unreadable one raises its LatticeDataError instead."""
    names = lattice.names
    try:
        found = await lattice.js.get_msg(f"KV_{names.desired}", subject=f"$KV.{names.desired}.{KEY}")
    except nats.js.errors.NotFoundError:
        return 0, None, False
    last = int(found.seq or 0)
    headers = found.headers or {}
    if not found.data or headers.get("KV-Operation") in ("DEL", "PURGE"):
        if quiet:
            raise LatticeDataError(f"the desired state of lattice {names.name} was deleted: run `orch apply`")
        good, _ = await latest_good(lattice)
        return last, good, True
    try:
        return last, DesiredDoc.parse(found.data, revision=last, where=f"{names.desired}.{KEY}"), False
    except LatticeDataError as error:
        if quiet:
            raise
        logger.warning("%s: judging the new revision against the last good one, strictly", error)
        good, _ = await latest_good(lattice)
        return last, good, True


# -- publishing (orch apply, a git follower) ---------------------------------------------
@dataclass(frozen=True)
class Published:
    revision: int
    uploaded: int  # artifacts put now
    present: int  # artifacts the store had already
    unchanged: bool  # the current revision said the same: nothing new was put
    waiting: dict[str, tuple[str, ...]] = field(default_factory=dict)  # deployment -> what it would grant


async def publish(
    lattice: Lattice, desired: DesiredState, manifests: Mapping[str, bytes], *, source: str | None = None
) -> Published:
    """Publish a validated desired state (see the module docstring); `source` as `document`'s.
    Raises LatticeError."""
    blobs = {sha256_hex(text): text for text in manifests.values()}
    for spec in desired.specs.values():
        assert spec.source is not None
        blobs[spec.wasm_sha256] = spec.source.wasm
    try:
        await desired_bucket(lattice)
        await scale(lattice, desired.config.model.lattice.replicas)
        uploaded, present = await upload(lattice, blobs)
    except (nats.errors.Error, OSError, TimeoutError) as error:
        raise LatticeError(
            f"the lattice at {lattice.address.shown} did not take the artifacts "
            f"({type(error).__name__}: {error or 'no answer'}); nothing was published: apply again"
        ) from None
    new = document(desired, manifests, now_ms=int(time.time() * 1000), source=source)
    versions = {name: parse_deployment(name, entry) for name, entry in new["deployments"].items()}
    fields = {k: v for k, v in new.items() if k != "deployments"}

    def make(before: DesiredDoc | None) -> Draft | None:
        if before is not None and _same(before, new):
            return None
        carried = {}
        for name, version in versions.items():
            old = before.deployments.get(name) if before is not None else None
            carried[name] = old.with_desired(version) if old is not None else version
        return Draft(fields, carried, proposed=desired.config.model.approvals)

    committed = await commit_revision(lattice, make, replace_unreadable=True)
    doc = committed.doc
    waiting = {n: d.awaiting.escalations for n, d in (doc.deployments.items() if doc else ()) if d.awaiting}
    return Published(committed.revision, uploaded, present, committed.unchanged, waiting)


def _same(old: DesiredDoc, new: Mapping[str, Any]) -> bool:
    """Whether `new` says what `old` says (ignoring when, where and by whom, and the folder a
    capsule was read from: a git revision is read from a temporary checkout each time)."""

    def said(deployments: Mapping[str, Any]) -> dict[str, Any]:
        return {
            name: {
                "record": {k: v for k, v in d["record"].items() if k != "folder"},
                "secrets": d["secrets"],
                "wasm": d["wasm"],
                "manifest": d["manifest"],
            }
            for name, d in deployments.items()
        }

    before = {
        name: {"record": d.record, "secrets": d.secrets, "wasm": d.wasm, "manifest": d.manifest}
        for name, d in old.deployments.items()
    }
    return bool(
        old.config_sha256 == new["config_sha256"]
        and old.replicas == new["replicas"]
        and old.approvals.model_dump() == new["approvals"]
        and old.history.model_dump() == new["history"]
        and said(before) == said(json.loads(json.dumps(new["deployments"])))
    )


# -- reading -------------------------------------------------------------------------------
async def current(lattice: Lattice) -> DesiredDoc | None:
    """The latest desired revision, or None when nothing was applied yet. Raises
    LatticeDataError when it cannot be read as one."""
    bucket = await desired_bucket(lattice)
    try:
        entry = await bucket.get(KEY)
    except nats.js.errors.KeyNotFoundError:
        return None
    if entry.value is None:
        return None
    return DesiredDoc.parse(entry.value, revision=int(entry.revision or 0), where=f"{lattice.names.desired}.{KEY}")


async def deployment_names(lattice: Lattice) -> set[str] | None:
    """The deployments of the last good desired revision (None when nothing was applied):
    what `calls.call_tool(deployed=...)` asks, to tell an unknown capsule from a stopped one."""
    desired, _ = await latest_good(lattice)
    return set(desired.deployments) if desired is not None else None


async def latest_good(lattice: Lattice) -> tuple[DesiredDoc | None, str | None]:
    """The newest desired revision that can be read (None when there is none), and why the
    latest revision cannot be (None when it can): what runs while a bad entry is stored."""
    try:
        return await current(lattice), None
    except LatticeDataError as error:
        problem = str(error)
    bucket = await desired_bucket(lattice)
    try:
        history = await bucket.history(KEY)
    except nats.js.errors.NoKeysError:
        return None, problem
    where = f"{lattice.names.desired}.{KEY}"
    for entry in reversed(history):
        if entry.value and entry.operation is None:
            try:
                return DesiredDoc.parse(entry.value, revision=int(entry.revision or 0), where=where), problem
            except LatticeDataError:
                continue
    return None, problem


def rebuild_spec(version: Version, *, wasm: bytes, manifest: bytes) -> CapsuleSpec:
    """The runnable spec of `version`, from its fetched artifacts: the manifest parsed, the
    secrets put back, checked against the spec hash that was applied. Raises
    LatticeDataError or ManifestError."""
    spec = version.spec
    where = str(Path(spec.folder) / "Capsule.toml")
    try:
        text = manifest.decode("utf-8")
    except UnicodeDecodeError:
        raise LatticeDataError(f"{spec.name}: artifact {version.manifest[:12]} is not a UTF-8 manifest") from None
    parsed = parse_manifest(text, file=f"{where} (artifact {version.manifest[:12]})")
    source = LatticeSource(
        manifest=parsed,
        wasm=wasm,
        wasm_sha256=sha256_hex(wasm),
        wasm_path=f"lattice artifact {version.wasm[:12]}",
        wasm_stamp=FileStamp(0, 0, len(wasm), 0, 0),
        manifest_stamp=FileStamp(0, 0, len(manifest), 0, 0),
    )
    config = {k: version.secrets.get(k, v) if k in spec.secret_keys else v for k, v in spec.config.items()}
    rebuilt = build_spec(
        spec.name,
        Path(spec.folder),
        source,
        config=config,
        limits=Limits(**spec.limits),
        instances=spec.instances,
        publish_rate=spec.publish_rate,
        depends_on=spec.depends_on,
        enabled=spec.enabled,
        hosts=spec.hosts,
        labels=spec.labels,
    )
    if rebuilt.spec_hash != spec.spec_hash:
        raise LatticeDataError(
            f"{spec.name}: its artifacts do not rebuild the spec that was applied "
            f"({rebuilt.spec_hash[:12]} != {spec.spec_hash[:12]}); run `orch apply` again"
        )
    return rebuilt
