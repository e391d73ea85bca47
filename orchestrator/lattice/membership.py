"""Who is in the lattice: host ids, labels, and heartbeats with a per-message TTL.

Each host puts its `HostInfo` (id, labels, draining, when it started) under its id in the
hosts bucket every HEARTBEAT_SECONDS, as a message with a TTL of HOST_TTL_SECONDS
(`Nats-TTL`): when a host stops beating (crashed, cut off) the server removes its key by
itself, and `live_hosts` no longer lists it. A host that leaves cleanly deletes its key.

`live_hosts` lists the keys the hosts bucket holds now (one stream-info request with a
subject filter, then the last message of each): server-side truth, so a host that just
took the scheduler's lease sees the same live set as the one before it. A value that is
not a heartbeat this code wrote is reported, not trusted (`HostInfo.parse` raises).

Host ids and labels are checked where they enter (`check_host_id`, `parse_label`): an id
is one NATS token, so it is the key as is. Used by the host runtime, the scheduler and
lattice status.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from ..control.statedir import StateDirError
from ..errors import GateError
from ..files import FileReadError, read_regular, write_atomic
from .connection import Lattice, LatticeError

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
HOST_TTL_SECONDS = 3  # whole seconds (the server's unit); three missed beats and a host is gone
HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
MAX_LABEL_VALUE = 256
MAX_LABELS = 64
MAX_HEARTBEAT_BYTES = 64 << 10
HOST_ID_FILE = "host-id"  # in a host's state dir


def check_host_id(text: str) -> str:
    """`text` if it can be a host id (1-64 of letters, digits, '-', '_'; a letter or digit
    first), else GateError."""
    if not HOST_ID.match(text):
        raise GateError(f"host id {text[:80]!r}: use 1-64 letters, digits, '-' or '_', starting with a letter or digit")
    return text


def default_host_id(suffix: str) -> str:
    """This machine's name (made a valid id) with `suffix`."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]).strip("-_") or "host"
    return check_host_id(f"{name[: 63 - len(suffix)]}-{suffix}")


def parse_label(text: str) -> tuple[str, str]:
    """`KEY=VALUE` as (key, value). GateError when malformed."""
    key, sep, value = text.partition("=")
    if not sep:
        raise GateError(f"label {text[:80]!r}: write KEY=VALUE, e.g. --label zone=eu")
    check_label(key, value)
    return key, value


def check_label(key: str, value: str) -> None:
    if not LABEL_KEY.match(key):
        raise GateError(
            f"label key {key[:80]!r}: use 1-63 letters, digits, '-', '_', '.' or '/', starting with a letter or digit"
        )
    if len(value) > MAX_LABEL_VALUE or not value.isprintable():
        raise GateError(f"label {key}: the value must be printable text of at most {MAX_LABEL_VALUE} characters")


@dataclass(frozen=True)
class HostInfo:
    """One host's heartbeat."""

    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    draining: bool = False
    started_ms: int = 0
    hostname: str = ""
    pid: int = 0

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "labels": dict(self.labels),
                "draining": self.draining,
                "started_ms": self.started_ms,
                "hostname": self.hostname,
                "pid": self.pid,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def parse(cls, data: bytes, *, key: str) -> HostInfo:
        """A heartbeat read from key `key`. ValueError when it is not one (or not this key's)."""
        if len(data) > MAX_HEARTBEAT_BYTES:
            raise ValueError(f"{len(data)} bytes: over {MAX_HEARTBEAT_BYTES}")
        value: Any = json.loads(data)
        if not isinstance(value, dict) or value.get("id") != key:
            raise ValueError("not a heartbeat of this host id")
        labels = value.get("labels", {})
        if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
            raise ValueError("labels: not a mapping (or too many)")
        for k, v in labels.items():
            if not isinstance(v, str):
                raise ValueError(f"label {k!r}: not text")
            try:
                check_label(k, v)
            except GateError as error:
                raise ValueError(str(error)) from None
        draining, started, pid = value.get("draining", False), value.get("started_ms", 0), value.get("pid", 0)
        if not isinstance(draining, bool) or not isinstance(started, int) or not isinstance(pid, int):
            raise ValueError("draining, started_ms or pid of the wrong type")
        hostname = value.get("hostname", "")
        return cls(key, dict(labels), draining, started, str(hostname)[:255], pid)


def resolve_host_id(state_dir: Path, given: str | None) -> str:
    """`given`, or the id kept in the state dir (made on first use: this machine's name and
    a short random suffix), so a host keeps its id across restarts. Raises GateError or
    StateDirError."""
    if given:
        return check_host_id(given)
    path = state_dir / HOST_ID_FILE
    try:
        data, _ = read_regular(path, limit=256, what="host id file")
    except FileReadError as error:
        if error.errno != errno.ENOENT:
            raise StateDirError(f"{path}: {error.reason}; remove it (a new host id is made) or fix it") from None
        made = default_host_id(secrets.token_hex(3))
        write_atomic(path, made.encode() + b"\n")
        return made
    try:
        return check_host_id(data.decode("utf-8", "replace").strip())
    except GateError as error:
        raise StateDirError(f"{path}: {error}; remove the file (a new id is made) or fix it") from None


async def beat(lattice: Lattice, info: HostInfo) -> None:
    """Put `info` under its id with the host TTL (raises nats errors when the lattice is away)."""
    await lattice.bucket(lattice.names.hosts, history=1)
    await lattice.js.publish(f"$KV.{lattice.names.hosts}.{info.id}", info.to_bytes(), msg_ttl=HOST_TTL_SECONDS)


async def leave(lattice: Lattice, host_id: str) -> None:
    """Remove this host's heartbeat now (a clean exit), instead of waiting for its TTL."""
    bucket = await lattice.bucket(lattice.names.hosts, history=1)
    await bucket.purge(host_id)


async def latest_values(lattice: Lattice, bucket: str) -> dict[str, bytes]:
    """Every live key of `bucket` (created with history 1 if absent) and its latest value:
    one stream-info request listing the subjects, then the last message of each. Keys
    whose last message is a delete, a purge or a TTL marker are left out."""
    await lattice.bucket(bucket, history=1)
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    info = await lattice.js.stream_info(stream, subjects_filter=f"{prefix}>")
    values: dict[str, bytes] = {}
    for subject in sorted(info.state.subjects or {}):
        try:
            message = await lattice.js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:  # expired between the listing and the read
            continue
        headers = message.headers or {}
        if headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers:
            continue
        values[subject[len(prefix) :]] = message.data or b""
    return values


async def live_hosts(lattice: Lattice) -> tuple[dict[str, HostInfo], dict[str, str]]:
    """The live hosts by id, and the keys whose value is not a heartbeat (key -> why)."""
    hosts: dict[str, HostInfo] = {}
    bad: dict[str, str] = {}
    for key, data in (await latest_values(lattice, lattice.names.hosts)).items():
        try:
            hosts[key] = HostInfo.parse(data, key=key)
        except ValueError as error:
            bad[key] = f"not a heartbeat: {error}"
    return hosts, bad


async def wait_unused(lattice: Lattice, host_id: str, *, me: HostInfo) -> None:
    """Until no other live host beats under `host_id`. A previous run of this host that was
    killed leaves a heartbeat that expires within HOST_TTL_SECONDS: wait for it. LatticeError
    when one is still beating after that (two hosts were given the same id)."""
    deadline = time.monotonic() + HOST_TTL_SECONDS + 1.5
    while True:
        hosts, _ = await live_hosts(lattice)
        other = hosts.get(host_id)
        if other is None or (other.pid, other.started_ms, other.hostname) == (me.pid, me.started_ms, me.hostname):
            return
        if time.monotonic() > deadline:
            raise LatticeError(
                f"host id {host_id} is in use by a live host (pid {other.pid} on {other.hostname or 'unknown'}): "
                "give this host another --host-id, or stop the other one"
            )
        await asyncio.sleep(0.25)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Until `event` is set (True) or `timeout` passes (False). Unlike `asyncio.wait_for`
    on Python 3.11, a cancellation that arrives as the event is set is never lost (a loop
    waiting here always ends when its task is cancelled)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
            return True
    except TimeoutError:
        return False


LATTICE_AWAY = (nats.errors.Error, OSError, TimeoutError)
"""What a lattice request raises while the servers are away or electing a leader: loops
log it (rate-limited) and try again on their next turn."""
