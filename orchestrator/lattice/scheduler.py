"""The scheduler: one host at a time holds the lease and writes where each deployment runs.

Every host runs a `Scheduler`. While it does not hold the lease it tries to take it every
turn (orchestrator.lattice.lease); the one that holds it renews it every
LEASE_RENEW_SECONDS and, every turn (TICK_SECONDS, or at once when woken: a new desired
revision), reads the live hosts (heartbeats), the current desired revision and the stored
assignments, and places (orchestrator.lattice.placement, pure). When the result differs
from what is stored it renews the lease (a holder that lost it writes nothing) and writes
the new assignments with compare-and-set on the revision it read. A host that dies stops
beating, its heartbeat expires, and the next turn places its deployments elsewhere; a
holder that dies stops renewing, its lease expires, and another host takes it and carries
on from the stored assignments (placement keeps what runs where it runs).

The assignments are one entry (key `placement` in the assignments bucket, revisioned):

    {"format": 1, "deployments": {NAME: [HOST, ...]}, "problems": {NAME: WHY},
     "by": HOST, "at_ms": ..., "desired_revision": N}

Used by the host runtime; `read_assignments` also by lattice status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from ..throttle import Throttle
from .artifacts import LatticeDataError
from .connection import Lattice
from .desiredstate import KEY as DESIRED_KEY
from .desiredstate import DesiredDoc, desired_bucket, latest_good
from .lease import LEASE_RENEW_SECONDS, Held, acquire, release, renew
from .membership import LATTICE_AWAY, live_hosts, wait_event
from .placement import HostView, place

logger = logging.getLogger(__name__)

KEY = "placement"
HISTORY = 16
TICK_SECONDS = 0.5
MAX_ASSIGNMENTS_BYTES = 16 << 20


@dataclass(frozen=True)
class Assignments:
    """One revision of the assignments, checked."""

    revision: int
    deployments: dict[str, tuple[str, ...]]
    problems: dict[str, str]
    by: str = ""
    at_ms: int = 0
    desired_revision: int = 0

    def mine(self, host_id: str) -> set[str]:
        return {name for name, hosts in self.deployments.items() if host_id in hosts}

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": 1,
                "deployments": {n: list(h) for n, h in sorted(self.deployments.items())},
                "problems": dict(sorted(self.problems.items())),
                "by": self.by,
                "at_ms": self.at_ms,
                "desired_revision": self.desired_revision,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def parse(cls, data: bytes, *, revision: int) -> Assignments:
        """LatticeDataError when `data` is not assignments this code wrote."""
        try:
            if len(data) > MAX_ASSIGNMENTS_BYTES:
                raise ValueError("too large")
            value: Any = json.loads(data)
            if not isinstance(value, dict) or value.get("format") != 1:
                raise ValueError("not format 1")
            deployments, problems = value["deployments"], value["problems"]
            if not isinstance(deployments, dict) or not isinstance(problems, dict):
                raise ValueError("deployments and problems must be mappings")
            placed = {}
            for name, hosts in deployments.items():
                if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                    raise ValueError(f"{name[:80]!r}: not a list of host ids")
                placed[name] = tuple(hosts)
            at_ms, desired_revision = value.get("at_ms", 0), value.get("desired_revision", 0)
            if not isinstance(at_ms, int) or not isinstance(desired_revision, int):
                raise ValueError("at_ms and desired_revision must be whole numbers")
            return cls(
                revision,
                placed,
                {str(k): str(v) for k, v in problems.items()},
                str(value.get("by", "")),
                at_ms,
                desired_revision,
            )
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            raise LatticeDataError(
                f"the assignments (revision {revision}) are malformed ({error}); the scheduler rewrites them"
            ) from None


async def assignments_bucket(lattice: Lattice) -> KeyValue:
    return await lattice.bucket(lattice.names.assignments, history=HISTORY)


async def read_assignments(lattice: Lattice) -> tuple[int, Assignments | None]:
    """(revision of the key, or 0; the assignments, or None when absent or malformed)."""
    bucket = await assignments_bucket(lattice)
    try:
        entry = await bucket.get(KEY)
    except nats.js.errors.KeyNotFoundError as missing:
        return (int(missing.entry.revision or 0) if missing.entry else 0), None
    revision = int(entry.revision or 0)
    if entry.value is None:
        return revision, None
    try:
        return revision, Assignments.parse(entry.value, revision=revision)
    except LatticeDataError as error:
        logger.debug("%s", error)  # the scheduler writes new ones over them
        return revision, None


class Scheduler:
    """Contends for the lease; places while it holds it. `run()` until cancelled; `stop()`."""

    def __init__(
        self,
        *,
        lattice: Lattice,
        host_id: str,
        tick: float = TICK_SECONDS,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.lattice = lattice
        self.host_id = host_id
        self.tick = tick
        self.held: Held | None = None
        self.problems: dict[str, str] = {}  # placement problems as last written
        self._on_change = on_change  # told True/False when the lease is taken/lost
        self._wake = asyncio.Event()
        self._renewing = asyncio.Lock()  # one renewal at a time: two on one revision would look like a loss
        self._renewed = 0.0
        self._desired: DesiredDoc | None = None
        self._seen = 0  # the desired revision last read
        self._stopped = False
        self._warn = Throttle(logger, interval=10.0)

    @property
    def holding(self) -> bool:
        return self.held is not None

    def wake(self) -> None:
        """Place now (a new desired revision, a host draining)."""
        self._wake.set()

    async def run(self) -> None:
        while not self._stopped:
            self._wake.clear()  # a wake during the turn makes the next one come at once
            try:
                await self.turn()
            except asyncio.CancelledError:
                raise
            except LATTICE_AWAY as error:
                self._warn.warning("away", "scheduler: the lattice is not answering (%s); retrying", error)
            except Exception:
                logger.exception("scheduler turn failed")
            await wait_event(self._wake, self.tick)

    async def turn(self) -> None:
        """Take or renew the lease; place if held."""
        if self.held is None:
            self.held = await acquire(self.lattice, self.host_id)
            if self.held is None:
                return
            self._renewed = time.monotonic()
            logger.info("host %s holds the scheduler lease", self.host_id)
            self._changed(True)
        elif time.monotonic() - self._renewed >= LEASE_RENEW_SECONDS and not await self._renew():
            return
        await self._place()

    async def fence(self) -> bool:
        """Renew the lease now: True while this host still holds it. What a holder checks
        right before a write only the holder may make (the git follower's publish)."""
        return await self._renew()

    async def _renew(self) -> bool:
        async with self._renewing:
            if self.held is None:
                return False
            self.held = await renew(self.lattice, self.host_id, self.held)
            if self.held is None:
                logger.warning(
                    "host %s lost the scheduler lease (renewed too late); another host schedules", self.host_id
                )
                self._changed(False)
                return False
            self._renewed = time.monotonic()
            return True

    def _changed(self, holding: bool) -> None:
        if self._on_change is not None:
            self._on_change(holding)

    async def _place(self) -> None:
        hosts, bad = await live_hosts(self.lattice)
        for key, why in bad.items():
            self._warn.warning(f"bad:{key}", "scheduler: ignoring hosts bucket key %s: %s", key, why)
        desired = await self._current()
        revision, stored = await read_assignments(self.lattice)
        views = {h: HostView(dict(info.labels), info.draining) for h, info in hosts.items()}
        result = place(desired.wants() if desired else {}, views, stored.deployments if stored else {})
        self.problems = result.problems
        if stored is not None and stored.deployments == result.assignments and stored.problems == result.problems:
            return
        if not await self._renew():  # fence: a holder that lost the lease writes nothing
            return
        new = Assignments(
            0,
            result.assignments,
            result.problems,
            self.host_id,
            int(time.time() * 1000),
            desired.revision if desired else 0,
        )
        bucket = await assignments_bucket(self.lattice)
        try:
            if revision:
                written = await bucket.update(KEY, new.to_bytes(), last=revision)
            else:
                written = await bucket.create(KEY, new.to_bytes())
        except nats.js.errors.KeyWrongLastSequenceError:
            logger.info("scheduler: the assignments changed while placing; placing again")
            self._wake.set()
            return
        moved = _moves(stored.deployments if stored else {}, result.assignments)
        logger.info("scheduler: assignments revision %d%s", written, f": {moved}" if moved else "")
        for name, why in result.problems.items():
            self._warn.warning(f"short:{name}:{why}", "scheduler: %s %s", name, why)

    async def _current(self) -> DesiredDoc | None:
        """The desired revision to place, parsed once per revision. A revision that cannot
        be read leaves the last good one in force (from the bucket's history after a
        hand-over): hosts that die are still replaced meanwhile."""
        bucket = await desired_bucket(self.lattice)
        try:
            entry = await bucket.get(DESIRED_KEY)
        except nats.js.errors.KeyNotFoundError:
            return self._desired
        if entry.value is None or entry.revision == self._seen:
            return self._desired
        self._seen = int(entry.revision or 0)
        try:
            self._desired = DesiredDoc.parse(entry.value, revision=self._seen, where=self.lattice.names.desired)
        except LatticeDataError as error:
            self._warn.warning("desired", "scheduler: %s; placing the last good revision", error)
            if self._desired is None:
                self._desired, _ = await latest_good(self.lattice)
        return self._desired

    async def stop(self) -> None:
        """Give the lease up (another host takes it at once). Cancel `run()` first."""
        self._stopped = True
        self._wake.set()
        held, self.held = self.held, None
        if held is not None:
            try:
                await release(self.lattice, held)
                logger.info("host %s released the scheduler lease", self.host_id)
            except LATTICE_AWAY as error:
                logger.info("could not release the scheduler lease (%s): it expires by itself", error)


def _moves(old: dict[str, tuple[str, ...]], new: dict[str, tuple[str, ...]]) -> str:
    """`a: h1 -> h2, b: +h3` for the deployments whose hosts changed."""
    parts = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name, ()), new.get(name, ())
        if before != after:
            parts.append(f"{name}: {','.join(before) or '-'} -> {','.join(after) or '-'}")
    return "; ".join(parts)
