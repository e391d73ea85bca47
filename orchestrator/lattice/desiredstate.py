"""The lattice's desired state: what `orch apply` publishes and what every host reads.

One key, `config`, in the desired bucket (history DESIRED_HISTORY): each revision is one
`orch apply`, so the bucket's history is the deployment history. A revision is a JSON
document (format 1):

    {"format": 1, "config_sha256": ..., "source": "<config.yaml path where applied>",
     "applied_at_ms": ..., "applied_by": "<user>@<machine>", "replicas": N,
     "deployments": {NAME: {"record": <CapsuleSpec.record()>, "secrets": {KEY: VALUE},
                            "wasm": <sha256>, "manifest": <sha256>}}}

`record` is the spec without secret values (the same record `applied.json` keeps: limits,
instances, publish_rate, depends_on, enabled, hosts, labels, spec_hash, the manifest as
data); `secrets` are the secret config values in clear (a host needs them to run the
capsule): **the desired bucket holds secrets, so protect the lattice with NATS
credentials**. `wasm` and `manifest` name the module and the Capsule.toml text in the
object store (orchestrator.lattice.artifacts).

`publish` (for `orch apply`, after local validation) uploads the artifacts the store lacks,
scales the lattice's buckets to `lattice.replicas`, and puts the document unless it equals
the current revision. `current` reads the latest revision; `DesiredDoc.parse` checks every
field and that each record rebuilds to its own spec hash, so a malformed or foreign value
is refused with one clear line and changes nothing that runs. `rebuild_spec` turns a
deployment back into a runnable CapsuleSpec from the fetched artifacts, and checks it hashes
to what was applied.

Used by the CLI (`orch apply`, `orch plan --lattice`), the scheduler, the host runtime and
lattice status.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from ..desired.load import DesiredState, build_spec
from ..desired.manifest import MAX_MANIFEST_BYTES, parse_manifest
from ..desired.spec import CapsuleSpec
from ..errors import ConfigError, Problem
from ..files import FileReadError, FileStamp, read_regular
from ..limits import Limits
from .artifacts import SHA256, LatticeDataError, LatticeSource, sha256_hex, upload
from .connection import Lattice, LatticeError
from .placement import Want

logger = logging.getLogger(__name__)

FORMAT = 1
KEY = "config"
DESIRED_HISTORY = 64
MAX_DOCUMENT_BYTES = 64 << 20
MAX_DEPLOYMENTS = 10_000
DEPLOYMENT_KEYS = {"record", "secrets", "wasm", "manifest"}
DOCUMENT_KEYS = {"format", "config_sha256", "source", "applied_at_ms", "applied_by", "replicas", "deployments"}


@dataclass(frozen=True)
class Deployment:
    """One deployment of a desired revision."""

    spec: CapsuleSpec  # rebuilt from the record: no source, secrets as digests
    record: Mapping[str, Any]
    secrets: Mapping[str, str]
    wasm: str
    manifest: str


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

    def specs(self) -> dict[str, CapsuleSpec]:
        """Every deployment's spec, without sources (for plans and status)."""
        return {name: d.spec for name, d in self.deployments.items()}

    def wants(self) -> dict[str, Want]:
        """What placement must place: the enabled deployments."""
        return {name: Want(d.spec.hosts, dict(d.spec.labels)) for name, d in self.deployments.items() if d.spec.enabled}

    def summary(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "config_sha256": self.config_sha256,
            "source": self.source,
            "applied_at_ms": self.applied_at_ms,
            "applied_by": self.applied_by,
            "deployments": len(self.deployments),
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
        if not isinstance(value, dict) or set(value) != DOCUMENT_KEYS:
            raise bad(f"expected exactly the fields {', '.join(sorted(DOCUMENT_KEYS))}")
        if value["format"] != FORMAT:
            raise bad(f"format {value['format']!r}; this orchestrator reads format {FORMAT} (upgrade it)")
        texts = {k: value[k] for k in ("config_sha256", "source", "applied_by")}
        numbers = {k: value[k] for k in ("applied_at_ms", "replicas")}
        if not all(isinstance(v, str) for v in texts.values()) or not all(_whole(v) for v in numbers.values()):
            raise bad("config_sha256, source, applied_by must be text; applied_at_ms, replicas whole numbers")
        deployments = value["deployments"]
        if not isinstance(deployments, dict) or len(deployments) > MAX_DEPLOYMENTS:
            raise bad(f"deployments must be a mapping of at most {MAX_DEPLOYMENTS:,}")
        parsed = {}
        for name, entry in deployments.items():
            try:
                parsed[name] = _deployment(name, entry)
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
        )


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _deployment(name: str, entry: Any) -> Deployment:
    if not isinstance(entry, dict) or set(entry) != DEPLOYMENT_KEYS:
        raise ValueError(f"expected exactly the fields {', '.join(sorted(DEPLOYMENT_KEYS))}")
    record, secrets, wasm, manifest = entry["record"], entry["secrets"], entry["wasm"], entry["manifest"]
    if (
        not isinstance(wasm, str)
        or not SHA256.match(wasm)
        or not isinstance(manifest, str)
        or not SHA256.match(manifest)
    ):
        raise ValueError("wasm and manifest must be sha256 artifact names")
    if not isinstance(secrets, dict) or not all(isinstance(v, str) for v in secrets.values()):
        raise ValueError("secrets must be a mapping of text")
    if not isinstance(record, dict) or record.get("name") != name or record.get("wasm_sha256") != wasm:
        raise ValueError("its record is not this deployment's (name or wasm differ)")
    try:
        spec = CapsuleSpec.from_record(record)
        Limits(**spec.limits)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"its record is malformed ({type(error).__name__}: {str(error)[:200]})") from None
    if set(secrets) != {k for k in spec.config if k in spec.secret_keys}:
        raise ValueError("secrets must hold exactly the values of its secret config keys")
    if not 1 <= spec.instances <= 64 or not 1 <= spec.hosts <= 1000:
        raise ValueError("instances or hosts out of range")
    if not isinstance(record.get("manifest"), dict) or spec.spec_hash != record.get("spec_hash"):
        raise ValueError("its record does not hash to its spec_hash")
    return Deployment(spec, record, dict(secrets), wasm, manifest)


# -- building and publishing (orch apply) ------------------------------------------------
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
    """The JSON document of one revision (format 1). `source` says where the config came
    from (default: its path), e.g. `git+URL#main:config.yaml @ 3fa1c2d4e5f6`."""
    deployments = {}
    for name, spec in sorted(desired.specs.items()):
        deployments[name] = {
            "record": spec.record(),
            "secrets": {k: v for k, v in spec.config.items() if k in spec.secret_keys},
            "wasm": spec.wasm_sha256,
            "manifest": sha256_hex(manifests[name]),
        }
    return {
        "format": FORMAT,
        "config_sha256": desired.config.text_sha256,
        "source": source if source is not None else str(desired.config.path),
        "applied_at_ms": now_ms,
        "applied_by": f"{_user()}@{socket.gethostname()}",
        "replicas": desired.config.model.lattice.replicas,
        "deployments": deployments,
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class Published:
    revision: int
    uploaded: int  # artifacts put now
    present: int  # artifacts the store had already
    unchanged: bool  # the current revision said the same: nothing new was put


async def desired_bucket(lattice: Lattice) -> KeyValue:
    return await lattice.bucket(lattice.names.desired, history=DESIRED_HISTORY)


async def publish(
    lattice: Lattice, desired: DesiredState, manifests: Mapping[str, bytes], *, source: str | None = None
) -> Published:
    """Publish a validated desired state (see the module docstring); `source` as `document`'s.
    Raises LatticeError."""
    blobs = {sha256_hex(text): text for text in manifests.values()}
    for spec in desired.specs.values():
        assert spec.source is not None
        blobs[spec.wasm_sha256] = spec.source.wasm
    replicas = desired.config.model.lattice.replicas
    try:
        bucket = await desired_bucket(lattice)
        await scale(lattice, replicas)
        uploaded, present = await upload(lattice, blobs)
        new = document(desired, manifests, now_ms=int(time.time() * 1000), source=source)
        try:
            old = await current(lattice)
        except LatticeDataError as error:  # a new revision replaces it
            logger.warning("%s", error)
            old = None
        if old is not None and _same(old, new):
            return Published(old.revision, uploaded, present, unchanged=True)
        data = json.dumps(new, separators=(",", ":"), sort_keys=True).encode()
        if len(data) > lattice.nc.max_payload - 4096:
            raise LatticeError(
                f"the desired state is {len(data):,} bytes, more than the lattice's servers take in one message "
                f"(max_payload {lattice.nc.max_payload:,}): raise max_payload in the NATS server config "
                "(e.g. max_payload: 8MB), or split the config into several lattices"
            )
        revision = await bucket.put(KEY, data)
    except (nats.errors.Error, OSError, TimeoutError) as error:
        raise LatticeError(
            f"the lattice at {lattice.address.shown} did not take the desired state "
            f"({type(error).__name__}: {error or 'no answer'}); nothing changed unless it says otherwise: apply again"
        ) from None
    return Published(int(revision), uploaded, present, unchanged=False)


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
        and said(before) == said(json.loads(json.dumps(new["deployments"])))
    )


async def scale(lattice: Lattice, replicas: int) -> None:
    """Give every stream of the lattice `replicas` copies (those that exist: the KV, the
    object store, the buckets of hosts, lease, assignments, status, desired)."""
    names = lattice.names
    streams = [f"KV_{b}" for b in (names.desired, names.hosts, names.lease, names.assignments, names.status, names.kv)]
    await lattice.objects()
    streams.append(f"OBJ_{names.artifacts}")
    for stream in streams:
        try:
            info = await lattice.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            continue
        if info.config.num_replicas == replicas:
            continue
        info.config.num_replicas = replicas
        try:
            await lattice.js.update_stream(info.config)
        except nats.js.errors.APIError as error:
            raise LatticeError(
                f"lattice.replicas: {replicas} copies of {stream} were refused by the lattice at "
                f"{lattice.address.shown} ({error.description or error}): a NATS cluster needs at least "
                f"{replicas} servers for it; lower lattice.replicas or add servers"
            ) from None
        await _leader_elected(lattice, stream)
        logger.info("%s: now %d replicas", stream, replicas)


async def _leader_elected(lattice: Lattice, stream: str, deadline: float = 15.0) -> None:
    """Until `stream` has a leader again (a change of replicas elects one anew; requests in
    between time out). LatticeError past the deadline."""
    end = time.monotonic() + deadline
    while True:
        with contextlib.suppress(nats.errors.TimeoutError):
            info = await lattice.js.stream_info(stream)
            if info.cluster is None or info.cluster.leader:
                return
        if time.monotonic() > end:
            raise LatticeError(f"{stream} elected no leader within {deadline:g} s after changing its replicas")
        await asyncio.sleep(0.05)


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


def rebuild_spec(deployment: Deployment, *, wasm: bytes, manifest: bytes) -> CapsuleSpec:
    """The runnable spec of `deployment`, from its fetched artifacts: the manifest parsed,
    the secrets put back, checked against the spec hash that was applied. Raises
    LatticeDataError or ManifestError."""
    spec = deployment.spec
    where = str(Path(spec.folder) / "Capsule.toml")
    try:
        text = manifest.decode("utf-8")
    except UnicodeDecodeError:
        raise LatticeDataError(f"{spec.name}: artifact {deployment.manifest[:12]} is not a UTF-8 manifest") from None
    parsed = parse_manifest(text, file=f"{where} (artifact {deployment.manifest[:12]})")
    source = LatticeSource(
        manifest=parsed,
        wasm=wasm,
        wasm_sha256=sha256_hex(wasm),
        wasm_path=f"lattice artifact {deployment.wasm[:12]}",
        wasm_stamp=FileStamp(0, 0, len(wasm), 0, 0),
        manifest_stamp=FileStamp(0, 0, len(manifest), 0, 0),
    )
    config = {k: deployment.secrets.get(k, v) if k in spec.secret_keys else v for k, v in spec.config.items()}
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
