"""`orch host`: one member of a lattice. Joins, beats, schedules when it holds the lease,
runs its share with the existing reconciler, serves it, reports it, drains on request.

`await LatticeHost(...).start()` opens the state dir (locked; its module cache and the
host's id live there, and a `workspace/` folder that is the root of its capsules' `cwd://`
paths), connects, waits until no other live host uses its id, and starts:

- the heartbeat (orchestrator.lattice.membership), every HEARTBEAT_SECONDS;
- the scheduler (orchestrator.lattice.scheduler): contends for the lease, places;
- watches of the desired state and the assignments (each checked against a plain read
  every RESYNC_SECONDS: a watch can stall while a cluster elects a leader);
- the convergence loop: its share is (assigned to this host) ∩ (desired and enabled). The
  specs are rebuilt from the artifacts (fetched once per sha256) and handed to the
  existing `Reconciler.apply`: dependency order, backoff, and last-good reloads work as on
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
import errno
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from ..capsule.bus import EventBus
from ..capsule.capsule import Capsule
from ..capsule.kvbackend import KVBackend
from ..capsule.launcher import publish_limiter
from ..capsule.protected import ProtectedPaths
from ..control.reconciler import Reconciler
from ..control.statedir import CACHE, CACHE_KEY, StateDir, StateDirError
from ..desired.load import MAX_WASM_BYTES
from ..desired.manifest import MAX_MANIFEST_BYTES
from ..desired.spec import CapsuleSpec
from ..engine import WasmEngine, load_or_create_key
from ..errors import GateError, ManifestError, OrchestratorError
from ..files import FileReadError, read_regular, write_atomic
from ..throttle import Throttle
from .artifacts import LatticeDataError, fetch
from .connection import Lattice, LatticeAddress
from .desiredstate import KEY as DESIRED_KEY
from .desiredstate import Deployment, DesiredDoc, current, desired_bucket, rebuild_spec
from .membership import (
    HEARTBEAT_SECONDS,
    LATTICE_AWAY,
    HostInfo,
    beat,
    check_host_id,
    default_host_id,
    leave,
    wait_unused,
)
from .scheduler import KEY as ASSIGNMENTS_KEY
from .scheduler import Assignments, Scheduler, assignments_bucket
from .status import SERVING, STATUS_REFRESH_SECONDS, publish_status, read_reports, withdraw_status
from .wiring import Buses, CallServing, open_buses, open_calls, open_store

logger = logging.getLogger(__name__)

HOST_ID_FILE = "host-id"
WORKSPACE = "workspace"
HANDOVER_SECONDS = 10.0
DRAIN_SECONDS = 30.0
RESYNC_SECONDS = 5.0
CONVERGE_SECONDS = 5.0
STOP_SECONDS = 10.0


class HostLauncher:
    """The reconciler's launcher on a host: each capsule gets its deployment's bus."""

    def __init__(
        self, *, engine: WasmEngine, store: KVBackend, buses: Buses, workspace: Path, protected: ProtectedPaths
    ) -> None:
        self._engine, self._store, self._buses = engine, store, buses
        self._workspace, self._protected = workspace, protected

    async def launch(self, spec: CapsuleSpec) -> Capsule:
        return await Capsule.launch(
            spec,
            engine=self._engine,
            bus=self._buses.for_deployment(spec.name),
            store=self._store,
            workspace=self._workspace,
            rate=publish_limiter(spec),
            interceptors=False,
            protected=self._protected,
        )


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
        self._specs: dict[str, tuple[CapsuleSpec, CapsuleSpec]] = {}  # name -> (applied spec, runnable spec)
        self._blobs: dict[str, bytes] = {}
        self._served: set[str] = set()
        self._leaving: dict[str, float] = {}  # moved away, still serving here since (monotonic)
        self._kick = asyncio.Event()
        self._report = asyncio.Event()
        self._idle = asyncio.Event()  # draining and nothing left here
        self._warn = Throttle(logger, interval=10.0)

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
        buses = await open_buses(lattice, local=self.bus, host_id=self.id)
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
        self.scheduler = Scheduler(lattice=lattice, host_id=self.id)
        await beat(lattice, self._info())
        logger.info("host %s joined the lattice %s at %s", self.id, lattice.names.name, self.address.shown)
        events = self.bus.subscribe("orch.capsule.>", queue_size=10_000)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._beating(), name="heartbeat"),
            loop.create_task(self.scheduler.run(), name="scheduler"),
            loop.create_task(self._follow(desired_bucket, DESIRED_KEY, self._on_desired), name="desired"),
            loop.create_task(self._follow(assignments_bucket, ASSIGNMENTS_KEY, self._on_assignments), name="assign"),
            loop.create_task(self._converging(), name="converge"),
            loop.create_task(self._reporting(), name="status"),
            loop.create_task(self._noticing(events), name="events"),
        ]

    async def _first_desired(self) -> DesiredDoc | None:
        assert self.lattice is not None
        try:
            return await current(self.lattice)
        except LatticeDataError as error:
            logger.warning("%s", error)
            return None

    def _info(self) -> HostInfo:
        return HostInfo(self.id, self.labels, self.draining, self.started_ms, socket.gethostname(), os.getpid())

    # -- the loops -----------------------------------------------------------------------
    async def _beating(self) -> None:
        assert self.lattice is not None
        while True:
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
        while True:
            try:
                bucket = await bucket_of(self.lattice)
                watcher: Any = await bucket.watch(key)  # nats-py leaves its methods untyped
                try:
                    while True:
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
        while True:
            timeout = 0.2 if self._leaving else CONVERGE_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)
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
        """Run this host's share (see the module docstring)."""
        reconciler, calls, desired = self.reconciler, self._calls, self._desired
        assert reconciler is not None and calls is not None
        if desired is None:
            return
        enabled = {n for n, d in desired.deployments.items() if d.spec.enabled}
        assigned = self._assignments.mine(self.id) if self._assignments else set()
        wanted = set() if self.draining else assigned & enabled
        running = reconciler.actual()
        now = time.monotonic()
        for name in set(running) - wanted:
            self._leaving.setdefault(name, now)
        for name in list(self._leaving):
            if name in wanted or name not in running:
                del self._leaving[name]
        handed = await self._handed_over(enabled, now)
        specs: dict[str, CapsuleSpec] = {}
        broken: dict[str, str] = {}
        for name in wanted:
            try:
                specs[name] = await self._spec(desired.deployments[name])
            except (LatticeDataError, ManifestError) as error:
                broken[name] = str(error)
        for name in set(self._leaving) - handed:
            specs[name] = running[name]  # what serves here keeps serving until it serves elsewhere
        for name in set(running) - set(specs) - set(broken):
            await calls.unserve(name)  # no new calls here; those in flight finish before it stops
            self._served.discard(name)
        if broken != self._broken:
            for name, why in broken.items():
                logger.warning("capsule %s cannot be rebuilt from the lattice: %s", name, why)
        self._broken = broken
        await reconciler.apply(specs, broken=broken)
        for name in reconciler.actual():
            if name not in self._served:
                await calls.serve(name)
                self._served.add(name)
        self._prune(desired, specs)
        self._report.set()
        if self.draining and not reconciler.actual():
            self._idle.set()

    async def _handed_over(self, enabled: set[str], now: float) -> set[str]:
        """The leaving deployments that may stop here now: removed or disabled, serving on
        one of their new hosts, or leaving for longer than the handover (drain) allows."""
        if not self._leaving:
            return set()
        assert self.lattice is not None
        limit = self.drain_seconds if self.draining else self.handover_seconds
        done = {n for n, since in self._leaving.items() if n not in enabled or now - since >= limit}
        waiting = set(self._leaving) - done
        if waiting:
            placed = self._assignments.deployments if self._assignments else {}
            reports = await read_reports(self.lattice)
            for name in waiting:
                for host in placed.get(name, ()):
                    rows = reports.get(host, {}).get("capsules", []) if host != self.id else []
                    if any(r.get("name") == name and r.get("phase") in SERVING for r in rows):
                        done.add(name)
        return done

    async def _spec(self, deployment: Deployment) -> CapsuleSpec:
        cached = self._specs.get(deployment.spec.name)
        if cached is not None and cached[0] == deployment.spec and cached[0].spec_hash == deployment.spec.spec_hash:
            return cached[1]
        name = deployment.spec.name
        wasm = await self._blob(deployment.wasm, limit=MAX_WASM_BYTES, what=f"capsule {name}: module")
        manifest = await self._blob(deployment.manifest, limit=MAX_MANIFEST_BYTES, what=f"capsule {name}: manifest")
        spec = rebuild_spec(deployment, wasm=wasm, manifest=manifest)
        self._specs[name] = (deployment.spec, spec)
        return spec

    async def _blob(self, name: str, *, limit: int, what: str) -> bytes:
        found = self._blobs.get(name)
        if found is None:
            assert self.lattice is not None
            found = self._blobs[name] = await fetch(self.lattice, name, limit=limit, what=what)
        return found

    def _prune(self, desired: DesiredDoc, specs: Mapping[str, CapsuleSpec]) -> None:
        """Forget artifacts and specs nothing wants any more."""
        keep = {d.wasm for d in desired.deployments.values()} | {d.manifest for d in desired.deployments.values()}
        keep |= {s.wasm_sha256 for s in specs.values()}
        for sha in set(self._blobs) - keep:
            del self._blobs[sha]
        for name in set(self._specs) - set(desired.deployments) - set(specs):
            del self._specs[name]

    async def _noticing(self, events: Any) -> None:
        """Every phase change makes a new report."""
        async for _ in events:
            self._report.set()

    async def _reporting(self) -> None:
        assert self.lattice is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report.wait(), STATUS_REFRESH_SECONDS)
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
        try:
            await asyncio.wait_for(self._idle.wait(), self.drain_seconds + 1.0)
            logger.info("host %s: every capsule moved away", self.id)
        except TimeoutError:
            logger.warning("host %s: drain deadline (%g s) passed; stopping what is left", self.id, self.drain_seconds)
        await self.close()

    async def close(self) -> None:
        """Stop taking calls (finishing those in flight), stop the capsules, give up the
        lease, withdraw from the lattice, close everything. Idempotent."""
        for task in self._tasks:
            if task.get_name() != "scheduler":
                task.cancel()
        if self._calls is not None:
            await self._calls.close()
            self._calls = None
        if self.reconciler is not None:
            await self.reconciler.shutdown(STOP_SECONDS)
        for task in self._tasks:  # the scheduler last: a draining holder moved its own capsules
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
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
