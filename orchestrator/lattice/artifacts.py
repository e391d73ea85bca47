"""Artifacts: wasm modules and manifest texts in the lattice's object store, by sha256.

`upload` puts each blob under its sha256 (hex), skipping what the store holds already
(content-addressed: an existing name is the same bytes). `fetch` reads one back by chunk
(direct gets: nats-py's own `get` stalls about 250 ms per flow-control window on large
objects, nats-notes §5), refuses more than `limit` bytes before reading them, and checks
the sha256 of what arrived against the name: a store that returns other bytes than were
put is an error (`LatticeDataError`), never a module that runs.

`LatticeSource` is the `CapsuleSource` of a spec rebuilt from the lattice: content-addressed
bytes never change under a loader, so it is never "caught mid-write".

Used by desired-state publishing (`orch apply`) and the host runtime.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import nats.js.errors
from nats.js.api import ObjectMeta, ObjectMetaOptions

from ..desired.spec import CapsuleSource
from ..errors import OrchestratorError
from .connection import Lattice

logger = logging.getLogger(__name__)

SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK_BYTES = 512 << 10  # below any server's max_payload (1 MiB by default)


class LatticeDataError(OrchestratorError):
    """What the lattice holds is not what this code wrote (missing, corrupt, malformed);
    the message names the bucket or object and what to do."""


@dataclass(frozen=True, slots=True)
class LatticeSource(CapsuleSource):
    """A capsule's manifest and wasm as fetched from the lattice (by sha256)."""

    def wasm_changed(self) -> bool:
        return False  # content-addressed: never rewritten in place


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def upload(lattice: Lattice, blobs: Mapping[str, bytes]) -> tuple[int, int]:
    """Put each blob (sha256 hex -> bytes) that the store lacks. Returns (uploaded, present)."""
    store = await lattice.objects()
    uploaded = present = 0
    for name, data in sorted(blobs.items()):
        if sha256_hex(data) != name:
            raise ValueError(f"artifact {name[:12]}: its bytes do not hash to its name")
        try:
            info = await store.get_info(name)
            if not info.deleted and info.size == len(data):
                present += 1
                continue
        except nats.js.errors.NotFoundError:
            pass
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
        await store.put(name, data, meta=meta)
        uploaded += 1
    return uploaded, present


async def fetch(lattice: Lattice, name: str, *, limit: int, what: str) -> bytes:
    """The artifact `name` (sha256 hex), checked. LatticeDataError when it is missing, larger
    than `limit`, or not the bytes its name says. `what` names it in messages."""
    if not SHA256.match(name):
        raise LatticeDataError(f"{what}: {name[:80]!r} is not a sha256 artifact name; run `orch apply` again")
    bucket = lattice.names.artifacts
    store = await lattice.objects()
    try:
        info = await store.get_info(name)
    except nats.js.errors.NotFoundError:
        raise LatticeDataError(
            f"{what}: artifact {name[:12]} is missing from the object store {bucket}; run `orch apply` again"
        ) from None
    if info.deleted:
        raise LatticeDataError(f"{what}: artifact {name[:12]} was deleted from {bucket}; run `orch apply` again")
    size = int(info.size or 0)
    if size > limit:
        raise LatticeDataError(f"{what}: artifact {name[:12]} is {size:,} bytes, over the limit of {limit:,}")
    parts: list[bytes] = []
    got = 0
    digest = hashlib.sha256()
    subject = f"$O.{bucket}.C.{info.nuid}"
    seq = 0
    for _ in range(int(info.chunks or 0)):
        message = await lattice.js.get_msg(f"OBJ_{bucket}", seq=seq + 1, subject=subject, next=True, direct=True)
        chunk = message.data or b""
        got += len(chunk)
        if got > limit:
            raise LatticeDataError(f"{what}: artifact {name[:12]} holds more than {limit:,} bytes")
        parts.append(chunk)
        digest.update(chunk)
        seq = int(message.seq or 0)
    if digest.hexdigest() != name:
        raise LatticeDataError(
            f"{what}: artifact {name[:12]} in {bucket} does not hash to its name (corrupt or replaced); "
            "run `orch apply` again"
        )
    return b"".join(parts)
