"""The scheduler's lease: one key, created exclusively, with a per-message TTL, renewed.

`acquire` succeeds only when the key holds nothing live: absent, deleted or purged, or a
TTL marker. It compares-and-sets on the subject's last sequence
(`Nats-Expected-Last-Subject-Sequence`), so of two hosts racing for it exactly one wins.
It reads the raw last message instead of using `kv.get`/`kv.create`, which nats-py 2.16
gets wrong while a TTL marker exists (nats-notes §3). `renew` compare-and-sets on the
revision the holder got last: it fails once someone else holds the lease (the holder was
too slow and its message expired), and the holder stops scheduling at once. `release`
deletes it (compare-and-set too), so another host takes over without waiting for the TTL.

The TTL is LEASE_TTL_SECONDS; the holder renews every LEASE_RENEW_SECONDS. Used by the
scheduler and lattice status.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import nats.js.errors

from .connection import Lattice

logger = logging.getLogger(__name__)

KEY = "scheduler"
LEASE_TTL_SECONDS = 3  # whole seconds (the server's unit)
LEASE_RENEW_SECONDS = 1.0
EXPECTED = "Nats-Expected-Last-Subject-Sequence"
LOST = (10071, 10164)  # wrong last sequence: someone else wrote first


@dataclass(frozen=True)
class Held:
    """The lease as its holder knows it: the revision to renew on."""

    revision: int
    since_ms: int


async def _last(lattice: Lattice) -> tuple[int, dict[str, str], bytes]:
    """The lease subject's last message: (sequence, headers, data); (0, {}, b"") if none."""
    bucket = lattice.names.lease
    await lattice.bucket(bucket, history=1)
    try:
        message = await lattice.js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{KEY}")
    except nats.js.errors.NotFoundError:
        return 0, {}, b""
    return int(message.seq or 0), dict(message.headers or {}), message.data or b""


def _live(headers: dict[str, str]) -> bool:
    return not (headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers)


async def holder(lattice: Lattice) -> str | None:
    """The id of the host holding the lease now, if any."""
    seq, headers, data = await _last(lattice)
    if not seq or not _live(headers):
        return None
    try:
        value = json.loads(data)
        return str(value["host"]) if isinstance(value, dict) and "host" in value else None
    except ValueError:
        return None


async def _put(lattice: Lattice, host_id: str, expected: int, since_ms: int) -> int:
    bucket = lattice.names.lease
    data = json.dumps({"host": host_id, "since_ms": since_ms}).encode()
    ack = await lattice.js.publish(
        f"$KV.{bucket}.{KEY}", data, headers={EXPECTED: str(expected)}, msg_ttl=LEASE_TTL_SECONDS
    )
    return int(ack.seq)


async def acquire(lattice: Lattice, host_id: str) -> Held | None:
    """Take the lease if nobody holds it; None when someone does (or won the race)."""
    seq, headers, _ = await _last(lattice)
    if seq and _live(headers):
        return None
    since = int(time.time() * 1000)
    try:
        return Held(await _put(lattice, host_id, seq, since), since)
    except nats.js.errors.BadRequestError as error:
        if error.err_code in LOST:
            return None
        raise


async def renew(lattice: Lattice, host_id: str, held: Held) -> Held | None:
    """Renew; None when the lease was lost (it expired and someone else took it)."""
    try:
        return Held(await _put(lattice, host_id, held.revision, held.since_ms), held.since_ms)
    except nats.js.errors.BadRequestError as error:
        if error.err_code in LOST:
            return None
        raise


async def release(lattice: Lattice, held: Held) -> None:
    """Give the lease up (only if still held: compare-and-set)."""
    bucket = lattice.names.lease
    try:
        await lattice.js.publish(
            f"$KV.{bucket}.{KEY}", b"", headers={EXPECTED: str(held.revision), "KV-Operation": "DEL"}
        )
    except nats.js.errors.BadRequestError as error:
        if error.err_code not in LOST:
            raise
