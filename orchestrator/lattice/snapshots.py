"""KV snapshots on a lattice: a deployment's keys copied into an object store, and put back.

When a new desired revision replaces the version a deployment runs (a reload, an approval,
a rollback), the revision's publisher first copies the deployment's keys from the lattice
KV into the object store `orch_<lattice>_snapshots` (`take`), as the object
`snapshot/<deployment>/<revision>` (`revision`: the last revision that ran the version
being replaced), and records it in the new revision (`SnapshotNote`). It is taken while the
old version still serves: writes between the snapshot and the hosts' swap are not in it.

Bounds (config.yaml `history:`, carried by the desired document): at most `snapshots`
snapshots per deployment and `snapshot_max_mib` of them (the newest are kept; a snapshot a
rollback is restoring is never dropped); a deployment whose data alone is over the bound
is not snapshotted, and the note says so.

An object is `MAGIC`, a JSON header line `{deployment, spec_hash, revision, created_ms,
keys, bytes}`, then each key and value (4-byte big-endian lengths, then the bytes), sorted
by key. Reading one back (`load`) fetches its chunks directly, checks the object's SHA-256
digest and every length: a damaged snapshot is refused, never restored.

`restore` makes a deployment's keys exactly a snapshot's: it reads what is stored now,
deletes the keys the snapshot lacks and writes those that differ, in JetStream atomic
batches of at most 1,000 messages, each also rewriting the deployment's listing guard
(orchestrator.lattice.kvkeys). It is not one transaction: the caller makes sure no call of
the deployment runs meanwhile (orchestrator.lattice.rollback pauses it first). It is
idempotent: running it again after a crash finishes the job.

Used by orchestrator.lattice.desiredstate (taking) and .rollback (restoring).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    ObjectInfo,
    ObjectMeta,
    ObjectMetaOptions,
    ObjectStoreConfig,
    StorageType,
)
from nats.js.object_store import ObjectStore

from ..control.history import NAME_RE
from ..desired.config import HistorySettings
from ..errors import OrchestratorError, StoreError
from . import txn
from .connection import Lattice
from .kvkeys import MAX_BATCH, OPERATION, KVSubjects, capsule_token
from .naming import decode_token
from .overrides import SnapshotNote

logger = logging.getLogger(__name__)

MAGIC = b"ORCHKV1\n"
PREFIX = "snapshot/"
CHUNK_BYTES = 512 << 10
FETCH = 256
BATCH_BYTES = 4 << 20  # a restore batch's values, at most
REQUEST_SECONDS = 5.0
RETRY_SECONDS = 30.0
MAX_HEADER = 64 << 10
Progress = Callable[[int, int], Awaitable[None]]


class SnapshotTooLarge(OrchestratorError):
    """The deployment's data is over the bound: no snapshot is taken."""


@dataclass(frozen=True)
class StoredSnapshot:
    """A snapshot object: its name, deployment, revision and size."""

    object: str
    deployment: str
    revision: int
    size: int


@dataclass(frozen=True)
class Snapshot:
    """A snapshot read back: whose, of which version, and its keys."""

    deployment: str
    spec_hash: str
    revision: int
    values: dict[str, bytes]


def object_name(deployment: str, revision: int) -> str:
    return f"{PREFIX}{deployment}/{revision}"


def snapshots_bucket(lattice: Lattice) -> str:
    return lattice.names.bucket("snapshots")


async def object_store(lattice: Lattice) -> ObjectStore:
    """The snapshots' object store (created if absent)."""
    name = snapshots_bucket(lattice)
    try:
        return await lattice.js.object_store(name)
    except nats.js.errors.BucketNotFoundError:
        try:
            return await lattice.js.create_object_store(name, config=ObjectStoreConfig(storage=StorageType.FILE))
        except nats.js.errors.BadRequestError:  # created meanwhile
            return await lattice.js.object_store(name)


# -- reading the KV and the store ----------------------------------------------------------------
async def last_per_subject(lattice: Lattice, stream: str, subject: str, handle: Callable[[Msg], None]) -> None:
    """Hand `handle` the last message of every subject of `stream` matching `subject`, from
    one consistent snapshot (a pull consumer; its pending count at creation says when
    the snapshot ends)."""
    js = lattice.js
    name = "snap_" + secrets.token_hex(8)
    config = ConsumerConfig(
        name=name,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        filter_subject=subject,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=30.0,
    )
    info = await js.add_consumer(stream, config=config)
    try:
        pending = int(info.num_pending or 0)
        if not pending:
            return
        pull = await js.pull_subscribe_bind(consumer=name, stream=stream)
        try:
            while pending:
                messages = await pull.fetch(batch=min(FETCH, pending), timeout=REQUEST_SECONDS)
                for message in messages:
                    handle(message)
                pending = int(messages[-1].metadata.num_pending) if messages else pending
        finally:
            await pull.unsubscribe()
    finally:
        try:
            await js.delete_consumer(stream, name)
        except (nats.errors.Error, TimeoutError) as error:  # it goes away when idle
            logger.debug("snapshots: deleting consumer %s: %r", name, error)


async def read_values(lattice: Lattice, deployment: str, *, max_bytes: int | None = None) -> dict[str, bytes]:
    """Every committed key and value of `deployment` in the lattice KV. SnapshotTooLarge
    when keys and values pass `max_bytes`."""
    subjects = KVSubjects(lattice.names.kv)
    prefix = f"$KV.{subjects.bucket}.{capsule_token(deployment)}."
    values: dict[str, bytes] = {}
    size = 0

    def handle(message: Msg) -> None:
        nonlocal size
        headers = message.headers or {}
        token = message.subject[len(prefix) :]
        try:
            key = decode_token(token)
        except ValueError:  # not written by JetStreamKV
            return
        if headers.get(OPERATION) in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers:
            values.pop(key, None)
            return
        values[key] = message.data or b""
        size += len(key.encode("utf-8", "surrogatepass")) + len(message.data or b"")
        if max_bytes is not None and size > max_bytes:
            raise SnapshotTooLarge(f"capsule {deployment!r}: its KV data is over {max_bytes:,} bytes")

    try:
        await lattice.bucket(subjects.bucket, history=1)
        await last_per_subject(lattice, subjects.stream, prefix + "*", handle)
    except (nats.errors.Error, TimeoutError) as error:
        raise StoreError(
            f"cannot read the KV data of capsule {deployment!r}: {type(error).__name__}: {error}"
        ) from None
    return values


async def stored(lattice: Lattice, deployment: str | None = None) -> list[StoredSnapshot]:
    """The snapshot objects (of `deployment`, or all), newest revision first."""
    name = snapshots_bucket(lattice)
    found: list[StoredSnapshot] = []

    def handle(message: Msg) -> None:
        try:
            info = ObjectInfo.from_response(json.loads(message.data))
        except (ValueError, TypeError, KeyError):
            return
        parts = str(info.name).split("/")
        if info.deleted or len(parts) != 3 or parts[0] + "/" != PREFIX or not parts[2].isdigit():
            return
        if deployment is None or parts[1] == deployment:
            found.append(StoredSnapshot(str(info.name), parts[1], int(parts[2]), int(info.size or 0)))

    await object_store(lattice)
    await last_per_subject(lattice, f"OBJ_{name}", f"$O.{name}.M.>", handle)
    return sorted(found, key=lambda s: (s.deployment, -s.revision))


# -- taking ------------------------------------------------------------------------------------
def encode(deployment: str, spec_hash: str, revision: int, values: dict[str, bytes], *, created_ms: int) -> bytes:
    size = sum(len(k.encode("utf-8", "surrogatepass")) + len(v) for k, v in values.items())
    header = {
        "deployment": deployment,
        "spec_hash": spec_hash,
        "revision": revision,
        "created_ms": created_ms,
        "keys": len(values),
        "bytes": size,
    }
    parts = [MAGIC, json.dumps(header, separators=(",", ":")).encode(), b"\n"]
    for key in sorted(values):
        raw, value = key.encode("utf-8", "surrogatepass"), values[key]
        parts += [struct.pack(">II", len(raw), len(value)), raw, value]
    return b"".join(parts)


async def take(
    lattice: Lattice,
    deployment: str,
    spec_hash: str,
    *,
    revision: int,
    settings: HistorySettings,
    keep: set[str],
    now_ms: int,
) -> SnapshotNote:
    """Snapshot `deployment`'s data (left by version `spec_hash`, run until revision
    `revision`), then apply the bounds. Never raises for a snapshot that cannot be taken:
    the note says why."""
    if settings.snapshots == 0:
        return SnapshotNote(spec_hash, None, note="not taken: history.snapshots is 0")
    if not NAME_RE.fullmatch(deployment):
        return SnapshotNote(spec_hash, None, note="not taken: not a deployment name")
    bound = settings.snapshot_max_mib << 20
    started = time.monotonic()
    try:
        values = await read_values(lattice, deployment, max_bytes=bound)
        data = encode(deployment, spec_hash, revision, values, created_ms=now_ms)
        name = object_name(deployment, revision)
        store = await object_store(lattice)
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
        await store.put(name, data, meta=meta)
    except SnapshotTooLarge:
        logger.warning("capsule %s: its KV data is over history.snapshot_max_mib: no snapshot taken", deployment)
        return SnapshotNote(spec_hash, None, note="not taken: its data is over history.snapshot_max_mib")
    except (StoreError, nats.errors.Error, TimeoutError, OSError) as error:
        logger.warning("capsule %s: no snapshot of its data: %s", deployment, error)
        return SnapshotNote(spec_hash, None, note=f"not taken: {type(error).__name__} (see the log)")
    size = len(data) - len(MAGIC)
    logger.info(
        "capsule %s: snapshot of %d keys (%d bytes) in %.2f s",
        deployment,
        len(values),
        size,
        time.monotonic() - started,
    )
    try:
        await prune(lattice, deployment, settings, keep=keep | {name})
    except (nats.errors.Error, TimeoutError) as error:  # pruned next time
        logger.warning("capsule %s: old snapshots not pruned: %r", deployment, error)
    total = sum(len(k.encode("utf-8", "surrogatepass")) + len(v) for k, v in values.items())
    return SnapshotNote(spec_hash, name, keys=len(values), bytes=total)


async def prune(lattice: Lattice, deployment: str, settings: HistorySettings, *, keep: set[str]) -> list[str]:
    """Drop the deployment's snapshots beyond the bounds (never those in `keep`)."""
    count = size = 0
    dropped = []
    store = await object_store(lattice)
    for snapshot in await stored(lattice, deployment):
        if snapshot.object in keep:
            continue
        if count < settings.snapshots and size + snapshot.size <= settings.snapshot_max_mib << 20:
            count, size = count + 1, size + snapshot.size
            continue
        await store.delete(snapshot.object)
        dropped.append(snapshot.object)
    return dropped


# -- reading one back --------------------------------------------------------------------------
async def load(lattice: Lattice, name: str, *, limit: int = 1 << 40) -> Snapshot:
    """The snapshot object `name`, checked. StoreError when it is missing or damaged."""
    bucket = snapshots_bucket(lattice)
    store = await object_store(lattice)
    try:
        info = await store.get_info(name)
    except nats.js.errors.NotFoundError:
        raise StoreError(f"the snapshot {name} is no longer in the object store {bucket}") from None
    if info.deleted or int(info.size or 0) > limit:
        raise StoreError(f"the snapshot {name} in {bucket} was deleted, or is larger than expected")
    digest = hashlib.sha256()
    parts: list[bytes] = []
    seq = 0
    subject = f"$O.{bucket}.C.{info.nuid}"
    for _ in range(int(info.chunks or 0)):
        message = await lattice.js.get_msg(f"OBJ_{bucket}", seq=seq + 1, subject=subject, next=True, direct=True)
        chunk = message.data or b""
        parts.append(chunk)
        digest.update(chunk)
        seq = int(message.seq or 0)
    if "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode() != info.digest:
        raise StoreError(f"the snapshot {name} in {bucket} is damaged (its digest does not match): not restored")
    try:
        return decode(b"".join(parts))
    except (ValueError, KeyError, TypeError, struct.error) as error:
        raise StoreError(f"the snapshot {name} in {bucket} is not a snapshot of this orchestrator ({error})") from None


def decode(data: bytes) -> Snapshot:
    """ValueError for anything but what `encode` writes."""
    if not data.startswith(MAGIC):
        raise ValueError("no snapshot header")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise ValueError("no snapshot header")
    header = json.loads(data[len(MAGIC) : end])
    if not isinstance(header, dict):
        raise ValueError("a malformed header")
    deployment, spec_hash, revision, keys = (
        header["deployment"],
        header["spec_hash"],
        header["revision"],
        header["keys"],
    )
    if not isinstance(deployment, str) or not isinstance(spec_hash, str) or type(revision) is not int:
        raise ValueError("a malformed header")
    values: dict[str, bytes] = {}
    offset = end + 1
    while offset < len(data):
        key_size, value_size = struct.unpack_from(">II", data, offset)
        offset += 8
        if offset + key_size + value_size > len(data):
            raise ValueError("cut short")
        key = data[offset : offset + key_size].decode("utf-8")
        values[key] = data[offset + key_size : offset + key_size + value_size]
        offset += key_size + value_size
    if len(values) != keys:
        raise ValueError(f"{len(values)} keys, its header says {keys}")
    return Snapshot(deployment, spec_hash, revision, values)


# -- restoring ---------------------------------------------------------------------------------
async def restore(
    lattice: Lattice, deployment: str, values: dict[str, bytes], *, progress: Progress | None = None
) -> int:
    """Make `deployment`'s keys exactly `values` (see the module docstring); the number of
    keys written or deleted. StoreError when the lattice refuses a batch."""
    subjects = KVSubjects(lattice.names.kv)
    now = await read_values(lattice, deployment)
    changes: list[tuple[str, bytes | None]] = [(k, None) for k in sorted(set(now) - set(values))]
    changes += [(k, v) for k, v in sorted(values.items()) if now.get(k) != v]
    batches: list[list[tuple[str, bytes | None]]] = [[]]
    size = 0
    for change in changes:
        if len(batches[-1]) >= MAX_BATCH - 1 or (size + len(change[1] or b"") > BATCH_BYTES and batches[-1]):
            batches.append([])
            size = 0
        batches[-1].append(change)
        size += len(change[1] or b"")
    if not changes:
        batches = []
    else:  # the bucket takes atomic batches (no host may have opened it yet)
        from .kvstore import JetStreamKV

        await (await JetStreamKV.open(lattice)).close()
    for index, batch in enumerate(batches, 1):
        await _send(lattice, subjects, deployment, batch)
        if progress is not None:
            await progress(index, len(batches))
    return len(changes)


async def _send(lattice: Lattice, subjects: KVSubjects, deployment: str, batch: list[tuple[str, bytes | None]]) -> None:
    """One batch, sent again until it commits (it writes absolute values: idempotent)."""
    end = time.monotonic() + RETRY_SECONDS
    pause = 0.05
    while True:
        txid = uuid.uuid4().hex
        messages: list[txn.Message] = []
        for key, value in batch:
            headers = {} if value is not None else {OPERATION: "DEL"}
            messages.append((subjects.key(deployment, key), value or b"", headers))
        messages.append((subjects.guard(deployment), b"", {}))  # the listing changes: calls' listings must see it
        for index, (_, _, headers) in enumerate(messages, 1):
            headers["Nats-Batch-Id"] = txid
            headers["Nats-Batch-Sequence"] = str(index)
        messages[-1][2]["Nats-Batch-Commit"] = "1"
        try:
            await txn.send(lattice.nc, messages, timeout=REQUEST_SECONDS)
            return
        except (txn.BatchUnavailable, txn.BatchUnknown) as error:
            if time.monotonic() + pause > end:
                raise StoreError(
                    f"capsule {deployment!r}: the lattice KV took no restore batch for {RETRY_SECONDS:g} s ({error}); "
                    "it stays paused: run the rollback again to finish restoring"
                ) from None
            logger.warning("capsule %s: a restore batch is sent again (%s)", deployment, error)
        except (txn.BatchRejected, txn.BatchConflict) as error:
            raise StoreError(f"capsule {deployment!r}: the lattice KV refused a restore batch: {error}") from None
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


def describe(info: dict[str, Any] | None) -> str:
    """`12 keys, 3.4 KiB` for a SnapshotNote's dict, for messages."""
    if not info or not info.get("object"):
        return "none"
    return f"{info['keys']} keys, {info['bytes']:,} bytes"
