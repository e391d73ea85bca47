"""`orch host`: one member of a lattice. Joins, beats, schedules when it holds the lease,
runs its share with the existing reconciler, serves it, reports it, drains on request.

`await LatticeHost(...).start()` opens the state dir (locked; its module cache and the
host's id live there, and a `workspace/` folder that is the root of its capsules' `cwd://`
paths), connects, waits until no other live host uses its id, and starts:

- the heartbeat (orchestrator.lattice.membership), every HEARTBEAT_SECONDS;
- the scheduler (orchestrator.lattice.scheduler): contends for the lease, places;
- the git follower (orchestrator.lattice.follow): while this host holds the lease, follows
  the branch `orch apply ... --follow` recorded (fetched into `<state_dir>/git`);
- watches of the desired state and the assignments (each checked against a plain read
  every RESYNC_SECONDS: a watch can stall while a cluster elects a leader);
- the convergence loop: its share (orchestrator.lattice.share) is (assigned to this host)
  ∩ (desired and enabled), rebuilt from the artifacts and handed to the existing
  `Reconciler.apply`: dependency order, backoff, and last-good reloads work as on
  one machine, so a revision whose wasm does not load keeps the last good version serving
  here (Degraded). A deployment whose artifacts cannot be used is passed as `broken` (its
  last good version serves). A deployment moved away keeps serving here until one of its
  new hosts reports it serving, or HANDOVER_SECONDS pass (so a move drops no call); then
  it stops taking calls here, its calls in flight finish, and it stops;
- status: its reconciler's status into the status bucket on every phase change and every
  STATUS_REFRESH_SECONDS (orchestrator.lattice.status).

`drain()` (SIGTERM) leaves in phases: mark itself draining in its heartbeat (the
scheduler moves its deployments and places nothing new here), keep serving each until it
serves elsewhere, up to `drain_seconds`; then stop taking calls and finish those in
flight, stop the capsules, give up the lease, withdraw the heartbeat and the report, and
close. What it plugs capsules into (KV, bus, calls) comes from orchestrator.lattice.wiring.

Used by the CLI (`orch host`), the lattice tests and bench/lattice.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from ..capsule.bus import EventBus
from ..capsule.protected import ProtectedPaths
from ..control.reconciler import Reconciler
from ..control.statedir import CACHE, CACHE_KEY, StateDir
from ..engine import WasmEngine, load_or_create_key
from ..errors import OrchestratorError
from ..throttle import Throttle
from .artifacts import LatticeDataError
from .connection import Lattice, LatticeAddress
from .desiredstate import KEY as DESIRED_KEY
from .desiredstate import DesiredDoc, desired_bucket, latest_good
from .follow import LatticeFollower
from .followrecord import RECORD_KEY as FOLLOW_KEY
from .membership import HEARTBEAT_SECONDS, LATTICE_AWAY, HostInfo, beat, leave, resolve_host_id, wait_event, wait_unused
from .scheduler import KEY as ASSIGNMENTS_KEY
from .scheduler import Assignments, Scheduler, assignments_bucket
from .share import HostLauncher, Share
from .status import STATUS_REFRESH_SECONDS, publish_status, withdraw_status
from .wiring import Buses, CallServing, open_buses, open_calls, open_store, release

logger = logging.getLogger(__name__)

WORKSPACE = "workspace"
HANDOVER_SECONDS = 10.0
DRAIN_SECONDS = 30.0
RESYNC_SECONDS = 5.0
CONVERGE_SECONDS = 5.0
STOP_SECONDS = 10.0


class LatticeHost:
    """One host of a lattice. `await start()`; then `await drain()` or `await close()`."""

    def __init__(
        self,
        *,
        address: LatticeAddress,
        state_dir: Path,
        host_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        drain_seconds: float = DRAIN_SECONDS,
        handover_seconds: float = HANDOVER_SECONDS,
    ) -> None:
        self.address = address
        self.state_dir = Path(state_dir)
        self.given_id = host_id
        self.id = host_id or ""
        self.labels = dict(labels or {})
        self.drain_seconds = drain_seconds
        self.handover_seconds = handover_seconds
        self.bus = EventBus(history=10_000)
        self.started_ms = int(time.time() * 1000)
        self.draining = False
        self.lattice: Lattice | None = None
        self.reconciler: Reconciler | None = None
        self.scheduler: Scheduler | None = None
        self.follower: LatticeFollower | None = None
        self._state: StateDir | None = None
        self._engine: WasmEngine | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._calls: CallServing | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._desired: DesiredDoc | None = None
        self._desired_seen = 0
        self._assignments: Assignments | None = None
        self._assignments_seen = 0
        self._problem: str | None = None  # the desired state as stored cannot be used
        self._broken: dict[str, str] = {}
        self._share: Share | None = None
        self._buses: Buses | None = None
        self._served: set[str] = set()
        self._kick = asyncio.Event()
        self._report = asyncio.Event()
        self._idle = asyncio.Event()  # draining and nothing left here
        self._warn = Throttle(logger, interval=10.0)
        self._closing = False

    # -- starting ------------------------------------------------------------------------
    async def start(self) -> None:
        """Join the lattice. Raises OrchestratorError (state dir, lattice, id in use) before
        anything runs; whatever was opened is closed again."""
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise

    async def _open(self) -> None:
        self._state = await asyncio.to_thread(StateDir.open, self.state_dir)
        state = self._state.path
        self.id = await asyncio.to_thread(resolve_host_id, state, self.given_id)
        workspace = state / WORKSPACE
        await asyncio.to_thread(workspace.mkdir, mode=0o700, exist_ok=True)
        self.lattice = lattice = await Lattice.connect(self.address)
        await wait_unused(lattice, self.id, me=self._info())
        key = await asyncio.to_thread(load_or_create_key, state / CACHE_KEY)
        self._engine = WasmEngine(cache_dir=state / CACHE, cache_key=key)
        desired = await self._first_desired()
        opened = await open_store(lattice, state_dir=state, replicas=desired.replicas if desired else 1)
        self._closers.append(opened.close)
        self._buses = buses = await open_buses(lattice, local=self.bus, host_id=self.id)
        self._closers.append(buses.close)
        launcher = HostLauncher(
            engine=self._engine,
            store=opened.store,
            buses=buses,
            workspace=workspace,
            protected=ProtectedPaths.build(cache_dir=state / CACHE),
        )
        self.reconciler = Reconciler(launcher=launcher, bus=self.bus)
        self._calls = open_calls(lattice, call=self.reconciler.call_tool, host_id=self.id)
        self.follower = follower = LatticeFollower(
            lattice=lattice, host_id=self.id, state_dir=state, workspace=workspace, fence=self._fence
        )
        self.scheduler = Scheduler(lattice=lattice, host_id=self.id, on_change=follower.lease_changed)
        self._share = Share(
            lattice=lattice,
            host_id=self.id,
            handover_seconds=self.handover_seconds,
            drain_seconds=self.drain_seconds,
        )
        await beat(lattice, self._info())
        logger.info("host %s joined the lattice %s at %s", self.id, lattice.names.name, self.address.shown)
        events = self.bus.subscribe("orch.capsule.>", queue_size=10_000)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._beating(), name="heartbeat"),
            loop.create_task(self.scheduler.run(), name="scheduler"),
            loop.create_task(self._follow(desired_bucket, DESIRED_KEY, self._on_desired), name="desired"),
            loop.create_task(self._follow(assignments_bucket, ASSIGNMENTS_KEY, self._on_assignments), name="assign"),
            loop.create_task(self._follow(desired_bucket, FOLLOW_KEY, follower.record_changed), name="follow-record"),
            loop.create_task(follower.run(), name="follow-git"),
            loop.create_task(self._converging(), name="converge"),
            loop.create_task(self._reporting(), name="status"),
            loop.create_task(self._noticing(events), name="events"),
        ]

    async def _first_desired(self) -> DesiredDoc | None:
        assert self.lattice is not None
        desired, problem = await latest_good(self.lattice)
        if problem is not None:
            logger.warning("%s; running revision %s", problem, desired.revision if desired else "(none)")
            self._problem = problem
        if desired is not None:
            self._desired = desired
            self._desired_seen = desired.revision
        return desired

    async def _fence(self) -> bool:
        return self.scheduler is not None and await self.scheduler.fence()

    def _info(self) -> HostInfo:
        return HostInfo(self.id, self.labels, self.draining, self.started_ms, socket.gethostname(), os.getpid())

    # -- the loops -----------------------------------------------------------------------
    async def _beating(self) -> None:
        assert self.lattice is not None
        while not self._closing:
            try:
                await beat(self.lattice, self._info())
            except LATTICE_AWAY as error:
                self._warn.warning("beat", "host %s: heartbeat not taken (%s); retrying", self.id, error)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _follow(
        self, bucket_of: Callable[[Lattice], Awaitable[KeyValue]], key: str, handle: Callable[[int, bytes | None], None]
    ) -> None:
        """Every new revision of `key` to `handle(revision, value or None when deleted)`."""
        assert self.lattice is not None
        while not self._closing:
            try:
                bucket = await bucket_of(self.lattice)
                watcher: Any = await bucket.watch(key)  # nats-py leaves its methods untyped
                try:
                    while not self._closing:
                        try:
                            entry = await watcher.updates(timeout=RESYNC_SECONDS)
                        except nats.errors.TimeoutError:
                            entry = await _read(bucket, key)
                        if entry is not None:
                            deleted = entry.operation in ("DEL", "PURGE") or entry.value is None
                            handle(int(entry.revision or 0), None if deleted else entry.value)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except asyncio.CancelledError:
                raise
            except LATTICE_AWAY as error:
                self._warn.warning(f"follow:{key}", "host %s: watching %s failed (%s); again", self.id, key, error)
                await asyncio.sleep(1.0)

    def _on_desired(self, revision: int, value: bytes | None) -> None:
        if revision <= self._desired_seen:
            return
        self._desired_seen = revision
        assert self.lattice is not None
        if value is None:
            logger.warning("the desired state was deleted (revision %d): what runs keeps running", revision)
            return
        try:
            self._desired = DesiredDoc.parse(value, revision=revision, where=f"{self.lattice.names.desired}.config")
            self._problem = None
        except LatticeDataError as error:
            self._problem = str(error)
            logger.warning("%s; the last good desired state keeps running", error)
            return
        logger.info("desired state revision %d (%d deployments)", revision, len(self._desired.deployments))
        self._kick.set()
        if self.scheduler is not None:
            self.scheduler.wake()

    def _on_assignments(self, revision: int, value: bytes | None) -> None:
        if revision <= self._assignments_seen or value is None:
            return
        self._assignments_seen = revision
        try:
            self._assignments = Assignments.parse(value, revision=revision)
        except LatticeDataError as error:
            logger.warning("%s", error)
            return
        self._kick.set()

    async def _converging(self) -> None:
        while not self._closing:
            timeout = 0.2 if self._share is not None and self._share.leaving else CONVERGE_SECONDS
            await wait_event(self._kick, timeout)
            self._kick.clear()
            try:
                await self.converge()
            except asyncio.CancelledError:
                raise
            except LATTICE_AWAY as error:
                self._warn.warning("converge", "host %s: the lattice is not answering (%s)", self.id, error)
            except Exception:
                logger.exception("host %s: converging failed", self.id)

    async def converge(self) -> None:
        """Run this host's share (orchestrator.lattice.share) with the reconciler; serve it."""
        reconciler, calls, share, desired = self.reconciler, self._calls, self._share, self._desired
        assert reconciler is not None and calls is not None and share is not None
        if desired is None:
            return
        step = await share.step(desired, self._assignments, reconciler.actual(), draining=self.draining)
        for name in step.stop:
            await calls.unserve(name)  # no new calls here; those in flight finish before it stops
            self._served.discard(name)
            slot = reconciler.slot(name)
            if self._buses is not None and slot is not None and slot.handle is not None:
                await release(self._buses, name, slot.handle)  # its events go to other hosts now
        for name, why in step.broken.items():
            if self._broken.get(name) != why:
                logger.warning("capsule %s cannot be rebuilt from the lattice: %s", name, why)
        self._broken = step.broken
        await reconciler.apply(step.specs, broken=step.broken)
        for name in reconciler.actual():
            if name not in self._served:
                await calls.serve(name)
                self._served.add(name)
        self._report.set()
        if self.draining and not reconciler.actual():
            self._idle.set()

    async def _noticing(self, events: Any) -> None:
        """Every phase change makes a new report."""
        async for _ in events:
            self._report.set()

    async def _reporting(self) -> None:
        assert self.lattice is not None
        while not self._closing:
            await wait_event(self._report, STATUS_REFRESH_SECONDS)
            self._report.clear()
            try:
                await publish_status(self.lattice, self.id, self.report())
            except LATTICE_AWAY as error:
                self._warn.warning("status", "host %s: status not published (%s)", self.id, error)

    def report(self) -> dict[str, Any]:
        """What this host says about itself in the status bucket."""
        problems = dict(self._broken)
        if self._problem:
            problems["(desired state)"] = self._problem
        return {
            "host": self.id,
            "labels": self.labels,
            "draining": self.draining,
            "at_ms": int(time.time() * 1000),
            "desired_revision": self._desired.revision if self._desired else 0,
            "assignments_revision": self._assignments.revision if self._assignments else 0,
            "scheduler": bool(self.scheduler and self.scheduler.holding),
            "capsules": self.reconciler.status() if self.reconciler else [],
            "problems": problems,
        }

    # -- leaving -------------------------------------------------------------------------
    async def drain(self) -> None:
        """Leave in phases (see the module docstring); then close."""
        if self.lattice is None or self.reconciler is None:
            await self.close()
            return
        logger.info("host %s draining: moving its capsules to other hosts", self.id)
        self.draining = True
        with contextlib.suppress(*LATTICE_AWAY):
            await beat(self.lattice, self._info())
        if self.scheduler is not None:
            self.scheduler.wake()
        self._kick.set()
        if await wait_event(self._idle, self.drain_seconds + 1.0):
            logger.info("host %s: every capsule moved away", self.id)
        else:
            logger.warning("host %s: drain deadline (%g s) passed; stopping what is left", self.id, self.drain_seconds)
        await self.close()

    async def close(self) -> None:
        """Stop taking calls (finishing those in flight), stop the capsules, give up the
        lease, withdraw from the lattice, close everything. Idempotent."""
        self._closing = True
        for task in self._tasks:
            if task.get_name() != "scheduler":
                task.cancel()
        if self._calls is not None:
            await self._calls.close()
            self._calls = None
        if self.reconciler is not None:
            for name in list(self.reconciler.actual()):
                slot = self.reconciler.slot(name)
                if self._buses is not None and slot is not None and slot.handle is not None:
                    with contextlib.suppress(*LATTICE_AWAY, OrchestratorError):
                        await release(self._buses, name, slot.handle)
            await self.reconciler.shutdown(STOP_SECONDS)
        for task in self._tasks:  # the scheduler last: a draining holder moved its own capsules
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_SECONDS)
            for task in stuck:
                logger.warning("host %s: task %s did not stop; leaving it", self.id, task.get_name())
        self._tasks = []
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.lattice is not None and self.id:
            with contextlib.suppress(*LATTICE_AWAY, OrchestratorError):
                await leave(self.lattice, self.id)
                await withdraw_status(self.lattice, self.id)
        for closer in reversed(self._closers):
            try:
                await closer()
            except Exception:
                logger.exception("closing failed")
        self._closers = []
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self.lattice is not None:
            with contextlib.suppress(*LATTICE_AWAY):
                await self.lattice.close()
            self.lattice = None
        if self._state is not None:
            self._state.close()
            self._state = None
        self.bus.close()


async def _read(bucket: KeyValue, key: str) -> Any:
    """The key's latest entry (None when absent): what a stalled watch may have missed."""
    try:
        return await bucket.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
