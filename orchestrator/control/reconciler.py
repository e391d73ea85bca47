"""The reconciler: applies plans, keeps the last good version serving, reports status.

Every deployment has a *slot*: its phase, the version running now, counters, the last
error. `apply(desired)` plans against what runs (orchestrator.plan, pure) and executes the
plan wave by wave: stops first (dependents before their dependencies), then starts and
reloads (dependencies first); the capsules of one wave in parallel.

- start: `Starting`, then `Running`; if loading fails, `Failed` with the error and a retry
  after a backoff (1 s doubling to 60 s, ±20 % jitter), shown as `next_retry_ms`.
- reload: the new version is built completely *beside* the old one; only when it loaded
  does the slot switch to it (interceptors hand over at an exact bus sequence number).
  Calls already running finish on the old version, which is closed once they have. If
  loading fails, the old version keeps serving and the slot shows `Degraded` with the error.
- stop: `Stopping`, then `Stopped`; calls in flight finish first (bounded wait). KV is kept.
- a file caught mid-write (`StaleSpec`) changes nothing: the next change event retries.
- override (a rollback): an earlier spec runs in place of the desired one, *pinned* until
  that deployment's desired spec changes or it is unpinned (orchestrator.desired.pins).

A `VersionLog` (orchestrator.control.history) is told before a version serves instead of
another (it snapshots the data the old one leaves) and once it serves (the history).
- a start or reload that grants more than runs now, beyond what the approval policy allows
  (control.approvals), is held: `AwaitingApproval` (the old version, if any, keeps serving)
  until `approve` runs it or `reject` refuses it (then `Degraded`, or `Failed` when nothing
  runs, until the capsule's desired spec changes again).

Every phase change is published as `orch.capsule.<name>.<phase>` with the slot's status;
a successful swap as `orch.capsule.<name>.reloaded`; each apply as
`orch.reconcile.started` / `orch.reconcile.finished` with the plan.

Dependencies are passed in (`launcher`, `bus`, clocks, `sleep`, `random`) so tests drive it
with fakes and a fake clock. Used by the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..capsule.bus import EventBus
from ..desired.pins import Pin, in_force, overlay, pinned_spec
from ..desired.plan import Action, Plan, plan
from ..desired.spec import CapsuleSpec
from ..errors import CapsuleNotRunning, OrchestratorError, StaleSpec, UnknownCapsule
from ..throttle import Throttle
from .approvals import ApprovalGate, NotAwaitingApproval, Pending, Rejection

logger = logging.getLogger(__name__)

PENDING, STARTING, RUNNING, DEGRADED, FAILED, STOPPING, STOPPED = (
    "Pending",
    "Starting",
    "Running",
    "Degraded",
    "Failed",
    "Stopping",
    "Stopped",
)
AWAITING_APPROVAL = "AwaitingApproval"
PHASES = (PENDING, STARTING, RUNNING, DEGRADED, FAILED, STOPPING, STOPPED, AWAITING_APPROVAL)
DRAIN_SECONDS = 30.0
FAILURE_LOG_SECONDS = 10.0  # a failing call is logged at most this often per capsule and tool


class Handle(Protocol):
    """A running capsule version, as the reconciler sees it (orchestrator.capsule.Capsule)."""

    async def call_tool(self, tool: str, arguments: Any = None) -> Any: ...
    def observe(self, observer: Callable[[Any], None] | None) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def start_interceptors(self, after_seq: int | None = None) -> None: ...
    async def stop_interceptors(self) -> int: ...
    async def close(self) -> None: ...


class Launcher(Protocol):
    async def launch(self, spec: CapsuleSpec) -> Handle: ...


class VersionLog(Protocol):
    """Told when versions change hands (orchestrator.control.history): before a version
    serves instead of another (`old` None for a start), and once it serves."""

    async def replacing(
        self, name: str, old: CapsuleSpec | None, new: CapsuleSpec, *, always: bool = False
    ) -> None: ...
    async def serving(self, name: str, spec: CapsuleSpec, *, event: str, reasons: Iterable[str] = ()) -> None: ...


@dataclass
class Slot:
    """One deployment: what runs, and what people see of it."""

    name: str
    phase: str = PENDING
    spec: CapsuleSpec | None = None  # the version running now
    handle: Handle | None = None
    since_ms: int = 0
    last_error: str | None = None
    last_error_at_ms: int | None = None
    last_error_tool: str | None = None  # the tool (or "interceptor ACTION") whose call failed last
    next_retry_ms: int | None = None
    failed_hash: str | None = None  # the spec that failed to start, and when to retry it
    retry_at: float = 0.0
    attempts: int = 0
    reload_count: int = 0
    calls: int = 0
    errors: int = 0
    fuel_total: int = 0
    fuel_last: int = 0
    retry_task: asyncio.Task[None] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    retired: dict[str, int] = field(default_factory=dict)  # counters of versions no longer serving
    # At most `instances` calls run at once per deployment, across versions: while a reload
    # swaps versions, calls still running on the old one count too, so a capsule with one
    # instance never has two calls interleaving their reads and writes.
    gate: asyncio.Semaphore | None = None
    gate_size: int = 0
    pinned: dict[str, Any] | None = None  # a rollback's pin: {version, spec_hash, since_ms}
    awaiting: Pending | None = None  # a change waiting for the operator's approval
    rejected: Rejection | None = None  # a change the operator rejected

    def counters(self) -> dict[str, int]:
        """KV conflicts and lost interceptor events, over every version of this deployment."""
        live = self.handle.counters() if self.handle is not None else {}
        return {k: self.retired.get(k, 0) + live.get(k, 0) for k in ("conflicts", "events_lost")}

    def status(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": self.name,
            "phase": self.phase,
            "version": spec.version if spec else None,
            "spec_hash": spec.spec_hash if spec else None,
            "instances": spec.instances if spec else 0,
            "calls": self.calls,
            "errors": self.errors,
            "fuel_last": self.fuel_last,
            "fuel_mean": round(self.fuel_total / self.calls) if self.calls else 0,
            "last_error": self.last_error,
            "last_error_at_ms": self.last_error_at_ms,
            "last_error_tool": self.last_error_tool,
            **self.counters(),
            "since_ms": self.since_ms,
            "next_retry_ms": self.next_retry_ms,
            "reload_count": self.reload_count,
            "pinned": self.pinned,
            "awaiting": self.awaiting.to_dict() if self.awaiting else None,
            "rejected": self.rejected.to_dict() if self.rejected else None,
        }


class Reconciler:
    """Converges running capsules on desired specs. One per orchestrator."""

    def __init__(
        self,
        *,
        launcher: Launcher,
        bus: EventBus,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        versions: VersionLog | None = None,
        approvals: ApprovalGate | None = None,
    ) -> None:
        self._launcher = launcher
        self._versions = versions
        self._pins: dict[str, Pin] = {}  # deployments a rollback holds at an earlier version
        self._approvals = approvals  # None: every escalation goes ahead (unit tests)
        self._bus = bus
        self._wall_ms = wall_ms
        self._monotonic = monotonic
        self._sleep = sleep
        self._jitter = jitter
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._slots: dict[str, Slot] = {}
        self._desired: dict[str, CapsuleSpec] = {}
        self._lock = asyncio.Lock()
        self._inflight: dict[int, int] = {}  # id(handle) -> calls running on it
        self._drained: dict[int, asyncio.Event] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._warnings = Throttle(logger, interval=FAILURE_LOG_SECONDS)  # failed calls: one line each, rate-limited

    # -- what runs -----------------------------------------------------------------------
    def actual(self) -> dict[str, CapsuleSpec]:
        """The specs of the versions serving now (Running or Degraded)."""
        return {n: s.spec for n, s in self._slots.items() if s.handle is not None and s.spec is not None}

    def plan(self, desired: Mapping[str, CapsuleSpec], *, broken: Collection[str] = ()) -> Plan:
        return plan(desired, self.actual(), pins=in_force(desired, self._pins, keep=broken))

    def status(self) -> list[dict[str, Any]]:
        return [self._slots[name].status() for name in sorted(self._slots)]

    def slot(self, name: str) -> Slot | None:
        return self._slots.get(name)

    # -- applying ------------------------------------------------------------------------
    async def apply(self, desired: Mapping[str, CapsuleSpec], *, broken: Mapping[str, str] | None = None) -> Plan:
        """Converge on `desired` (every deployment, enabled or not). Returns the plan applied.

        `broken`: deployments whose files cannot be used now (name -> why). Each keeps the
        version it runs, if any, and shows the reason: `Degraded` while its last good version
        serves, `Failed` when nothing runs (no retry: only a change of its files can help).
        """
        broken = dict(broken or {})
        async with self._lock:
            desired = dict(desired)
            for name in broken:
                running = self._slots[name].spec if name in self._slots and self._slots[name].handle else None
                if running is not None:
                    desired[name] = running  # the last good version keeps serving
            self._end_pins(desired, keep=set(broken))
            self._desired = overlay(desired, self._pins)
            for name, spec in desired.items():
                if name not in self._slots:
                    self._slots[name] = Slot(name, phase=PENDING if spec.enabled else STOPPED, since_ms=self._wall_ms())
                if name in self._pins:
                    self._slots[name].pinned = self._pins[name].to_status()
            current = plan(desired, self.actual(), pins=self._pins)
            changes = [a.to_dict() for a in current.changes]
            if changes:
                self._bus.publish("orch.reconcile.started", {"actions": changes})
            for wave in current.waves():
                await asyncio.gather(*(self._execute(action) for action in wave))
            for action in current.actions:
                if action.action == "keep":
                    self._keep(action.capsule)
            self._forget_unwanted(desired, keep=set(broken))
            if self._approvals is not None:  # nothing waits for a capsule removed, disabled or changed
                for name in self._approvals.settle(desired, keep=set(broken)) & set(self._slots):
                    self._show_approval(self._slots[name])
            for name, why in broken.items():
                self._mark_broken(name, why)
            if changes:
                failed = [n for n, s in self._slots.items() if s.phase in (FAILED, DEGRADED)]
                awaiting = sorted(n for n, s in self._slots.items() if s.phase == AWAITING_APPROVAL)
                self._bus.publish(
                    "orch.reconcile.finished", {"actions": changes, "failing": sorted(failed), "awaiting": awaiting}
                )
            return current

    def _mark_broken(self, name: str, why: str) -> None:
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = Slot(name, since_ms=self._wall_ms())
        self._cancel_retry(slot)
        if slot.last_error == why and slot.phase in (DEGRADED, FAILED):
            return  # said already
        self._error(slot, why)
        self._set_phase(slot, DEGRADED if slot.handle is not None else FAILED)

    def _error(self, slot: Slot, message: str, tool: str | None = None) -> None:
        """Record the latest failure: of the capsule's files or loading (`tool` None), or of
        a call (the tool, or `interceptor ACTION`)."""
        slot.last_error, slot.last_error_at_ms, slot.last_error_tool = message, self._wall_ms(), tool

    def _clear_error(self, slot: Slot) -> None:
        """The capsule loaded again: forget a loading failure (a call's failure stays shown)."""
        if slot.last_error_tool is None:
            slot.last_error, slot.last_error_at_ms = None, None

    def _forget_unwanted(self, desired: Mapping[str, CapsuleSpec], *, keep: set[str]) -> None:
        """Slots with nothing running that are no longer wanted: stop retrying; forget those
        removed from the config, show the disabled ones as Stopped. `keep`: broken
        deployments, whose slots stay to show why."""
        for name, slot in list(self._slots.items()):
            spec = desired.get(name)
            if slot.handle is not None or (spec is not None and spec.enabled) or name in keep:
                continue
            self._cancel_retry(slot)
            slot.failed_hash = None
            if spec is None:
                del self._slots[name]
            elif slot.phase != STOPPED:
                self._set_phase(slot, STOPPED)

    async def _execute(self, action: Action) -> None:
        name = action.capsule
        if action.action in ("start", "reload") and not self._admitted(self._slots[name], self._desired[name]):
            return
        if action.action == "start":
            await self._start(self._slots[name], self._desired[name], reasons=action.reasons)
        elif action.action == "reload":
            await self._reload(self._slots[name], self._desired[name], reasons=action.reasons)
        elif action.action == "stop":
            await self._stop(self._slots[name], remove=name not in self._desired)

    def _keep(self, name: str) -> None:
        slot = self._slots[name]
        wanted = self._desired.get(name)
        if wanted is not None and slot.spec is not None and wanted.spec_hash == slot.spec.spec_hash:
            slot.spec = wanted  # same version; its depends_on may have changed
        if slot.phase == DEGRADED:  # the desired state went back to what is serving
            self._clear_error(slot)
            self._set_phase(slot, RUNNING)

    async def _start(self, slot: Slot, spec: CapsuleSpec, *, reasons: tuple[str, ...] = ()) -> None:
        if slot.failed_hash == spec.spec_hash and self._monotonic() < slot.retry_at:
            return  # the same spec failed recently: its retry is scheduled
        self._cancel_retry(slot)
        self._set_phase(slot, STARTING)
        try:
            handle = await self._launcher.launch(spec)
        except StaleSpec as error:
            logger.info("capsule %s: %s; waiting for the next change", slot.name, error)
            self._set_phase(slot, PENDING)
            return
        except OrchestratorError as error:
            self._failed(slot, spec, error)
            return
        if self._versions is not None:  # the data the history's last version left: snapshot
            await self._versions.replacing(slot.name, None, spec)
        handle.start_interceptors()
        self._serve(slot, handle, spec)
        slot.attempts, slot.failed_hash, slot.next_retry_ms = 0, None, None
        self._clear_error(slot)
        self._set_phase(slot, RUNNING)
        if self._versions is not None:
            await self._versions.serving(slot.name, spec, event="start", reasons=reasons)

    def _failed(self, slot: Slot, spec: CapsuleSpec, error: OrchestratorError) -> None:
        slot.attempts += 1
        delay = min(self._backoff_base * 2 ** (slot.attempts - 1), self._backoff_max)
        delay *= 0.8 + 0.4 * self._jitter()
        slot.failed_hash = spec.spec_hash
        slot.retry_at = self._monotonic() + delay
        slot.next_retry_ms = self._wall_ms() + int(delay * 1000)
        self._error(slot, str(error))
        self._set_phase(slot, FAILED)
        slot.retry_task = asyncio.get_running_loop().create_task(self._retry(slot.name, delay))

    async def _retry(self, name: str, delay: float) -> None:
        await self._sleep(delay)
        async with self._lock:
            slot = self._slots.get(name)
            spec = self._desired.get(name)
            if slot is None or spec is None or not spec.enabled or slot.handle is not None:
                return
            slot.retry_task = None
            slot.retry_at = 0.0
            await self._start(slot, spec)

    def _cancel_retry(self, slot: Slot) -> None:
        if slot.retry_task is not None and slot.retry_task is not asyncio.current_task():
            slot.retry_task.cancel()
        slot.retry_task = None

    async def _reload(self, slot: Slot, spec: CapsuleSpec, *, reasons: tuple[str, ...] = ()) -> None:
        old = slot.handle
        assert old is not None
        try:
            new = await self._launcher.launch(spec)
        except StaleSpec as error:
            logger.info("capsule %s: %s; waiting for the next change", slot.name, error)
            return
        except OrchestratorError as error:
            self._error(slot, str(error))
            self._set_phase(slot, DEGRADED)
            return
        if self._versions is not None:  # the data the old version leaves (not for a restart)
            await self._versions.replacing(slot.name, slot.spec, spec)
        handed_over = await old.stop_interceptors()
        new.start_interceptors(after_seq=handed_over)
        self._serve(slot, new, spec)  # new calls go to the new version from here on
        slot.reload_count += 1
        self._clear_error(slot)
        self._retire(slot, old)
        if slot.phase != RUNNING:
            self._set_phase(slot, RUNNING)
        self._publish(slot, "reloaded")
        if self._versions is not None:
            await self._versions.serving(slot.name, spec, event="reload", reasons=reasons)

    async def _stop(self, slot: Slot, *, remove: bool) -> None:
        self._cancel_retry(slot)
        handle = slot.handle
        self._set_phase(slot, STOPPING)
        slot.handle = None
        if handle is not None:
            await self._drain_and_close(handle, slot=slot)
        self._set_phase(slot, STOPPED)
        if remove:
            del self._slots[slot.name]

    def _retire(self, slot: Slot, handle: Handle) -> None:
        task = asyncio.get_running_loop().create_task(self._drain_and_close(handle, slot=slot))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _drain_and_close(self, handle: Handle, timeout: float = DRAIN_SECONDS, *, slot: Slot) -> None:
        key = id(handle)
        if self._inflight.get(key):
            drained = self._drained.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), timeout)
        try:
            await handle.close()
        except Exception:
            logger.exception("closing a capsule version failed")
        for counter, value in handle.counters().items():  # what the slot's status keeps showing
            slot.retired[counter] = slot.retired.get(counter, 0) + value

    async def restart(self, name: str) -> dict[str, Any]:
        """Build a fresh version of `name` (same spec) and swap to it, as a reload does; a
        capsule waiting to retry a failed start is started now. Returns its status."""
        async with self._lock:
            slot = self._slots.get(name)
            spec = self._desired.get(name)
            if slot is None or spec is None:
                raise UnknownCapsule(f"no capsule {name!r} (deployed: {', '.join(sorted(self._slots)) or 'none'})")
            if not spec.enabled:
                raise CapsuleNotRunning(f"capsule {name!r} is disabled in the config (enabled: false)")
            if slot.handle is None:
                if not self._admitted(slot, spec):
                    raise CapsuleNotRunning(f"capsule {name!r} cannot be restarted" + _why(slot))
                slot.failed_hash, slot.retry_at, slot.attempts = None, 0.0, 0
                await self._start(slot, spec)
            else:
                await self._reload(slot, slot.spec or spec)
                self._still_held(slot)  # a fresh copy of what runs answers nothing the gate asked
            return slot.status()

    # -- pins: a rollback overrides the desired state ------------------------------------
    @property
    def pins(self) -> dict[str, Pin]:
        return dict(self._pins)

    def restore_pins(self, pins: Mapping[str, Pin]) -> None:
        """Pins kept from an earlier run (call before the first apply)."""
        self._pins.update(pins)

    def _end_pins(self, desired: Mapping[str, CapsuleSpec], *, keep: Collection[str]) -> None:
        """Forget the pins whose deployment's desired spec changed (orchestrator.desired.pins)."""
        holding = in_force(desired, self._pins, keep=keep)
        for name in [n for n in self._pins if n not in holding]:
            self.unpin(name)

    def unpin(self, name: str) -> bool:
        """End `name`'s pin (whether it had one); the next apply converges on its desired spec."""
        if self._pins.pop(name, None) is None:
            return False
        slot = self._slots.get(name)
        if slot is not None:
            slot.pinned = None
            self._publish(slot, "unpinned")
        return True

    async def override(
        self,
        name: str,
        spec: CapsuleSpec,
        *,
        pin: Pin,
        reasons: tuple[str, ...] = (),
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Run `spec` for `name` instead of its desired spec, pinned (a rollback). The new
        version is built beside the one serving; then, while no call of the capsule runs,
        the serving version's data is snapshotted, `prepare` runs (the KV restore) and the
        versions swap. If building or `prepare` fails, nothing changed (the error is
        raised). Returns the capsule's status."""
        async with self._lock:
            slot = self._slots.get(name)
            if slot is None or name not in self._desired:
                raise UnknownCapsule(f"no capsule {name!r} (deployed: {', '.join(sorted(self._slots)) or 'none'})")
            new = await self._launcher.launch(spec)
            old = slot.handle
            try:
                async with self._quiet(slot):
                    if self._versions is not None:
                        replaced = slot.spec if old is not None else None
                        await self._versions.replacing(name, replaced, spec, always=prepare is not None)
                    handed_over = await old.stop_interceptors() if old is not None else None
                    try:
                        if prepare is not None:
                            await prepare()
                    except BaseException:
                        if old is not None:
                            old.start_interceptors(after_seq=handed_over)
                        raise
                    new.start_interceptors(after_seq=handed_over)
                    self._serve(slot, new, spec)
            except BaseException:
                await new.close()
                raise
            self._cancel_retry(slot)
            slot.attempts, slot.failed_hash, slot.next_retry_ms = 0, None, None
            self._pins[name] = pin
            self._desired[name] = pinned_spec(pin, self._desired.get(name))
            slot.pinned = pin.to_status()
            self._clear_error(slot)
            self._set_phase(slot, RUNNING)
            if old is not None:
                slot.reload_count += 1
                self._retire(slot, old)
                self._publish(slot, "reloaded")
            self._publish(slot, "pinned")
            if self._versions is not None:
                await self._versions.serving(name, spec, event="rollback", reasons=reasons)
            return slot.status()

    @contextlib.asynccontextmanager
    async def _quiet(self, slot: Slot) -> AsyncIterator[None]:
        """No call of `slot` runs inside: every permit of its gate is held (calls in flight
        finish first, within DRAIN_SECONDS; new ones wait)."""
        gate, taken = self._gate(slot), 0
        size = slot.gate_size
        try:
            try:
                async with asyncio.timeout(DRAIN_SECONDS):
                    while taken < size:
                        await gate.acquire()
                        taken += 1
            except TimeoutError:
                raise OrchestratorError(
                    f"capsule {slot.name!r}: its calls still run after {DRAIN_SECONDS:g} s; nothing was changed, "
                    "try again"
                ) from None
            yield
        finally:
            for _ in range(taken):
                gate.release()

    # -- the escalation gate ---------------------------------------------------------------
    def _admitted(self, slot: Slot, spec: CapsuleSpec) -> bool:
        """Whether `spec` may start or replace what `slot` runs (control.approvals); if not,
        the slot shows why and keeps what it runs."""
        if self._approvals is None:
            return True
        verdict = self._approvals.judge(slot.name, spec, slot.spec if slot.handle is not None else None)
        self._show_approval(slot)
        if verdict.go:
            return True
        self._cancel_retry(slot)
        slot.next_retry_ms = None
        if verdict.rejection is not None:
            self._mark_broken(slot.name, _rejected(slot.name, verdict.rejection, serving=slot.handle is not None))
        else:
            self._set_phase(slot, AWAITING_APPROVAL)
        return False

    def _still_held(self, slot: Slot) -> None:
        if slot.awaiting is not None:
            self._set_phase(slot, AWAITING_APPROVAL)
        elif slot.rejected is not None:
            self._mark_broken(slot.name, _rejected(slot.name, slot.rejected, serving=slot.handle is not None))

    def _show_approval(self, slot: Slot) -> None:
        assert self._approvals is not None
        was_rejected = slot.rejected is not None
        slot.awaiting, slot.rejected = self._approvals.pending(slot.name), self._approvals.rejection(slot.name)
        if was_rejected and slot.rejected is None:  # the rejected change is no longer wanted
            self._clear_error(slot)
        if slot.awaiting is None and slot.phase == AWAITING_APPROVAL:  # removed, disabled or changed meanwhile
            self._set_phase(slot, RUNNING if slot.handle is not None else PENDING)

    async def approve(self, name: str, spec_hash: str | None = None) -> dict[str, Any]:
        """Grant what `name` waits for (`spec_hash`: the change the operator looked at, or a
        prefix of its hash) and start or reload it now. Returns its status, with what was
        `approved`. Raises UnknownCapsule, NotAwaitingApproval."""
        async with self._lock:
            slot, spec = self._awaiting(name)
            assert self._approvals is not None
            approved = self._approvals.approve(name, spec, spec_hash)
            self._show_approval(slot)
            reasons = (f"approved by the operator: {', '.join(approved.escalations)}",)  # the history says why
            if slot.handle is None:
                slot.failed_hash, slot.retry_at, slot.attempts = None, 0.0, 0
                await self._start(slot, spec, reasons=reasons)
            else:
                await self._reload(slot, spec, reasons=reasons)
            if slot.phase == AWAITING_APPROVAL:  # its files were caught mid-write: the next change retries
                self._set_phase(slot, RUNNING if slot.handle is not None else PENDING)
            return {**slot.status(), "approved": approved.to_dict()}

    async def reject(self, name: str, spec_hash: str | None = None) -> dict[str, Any]:
        """Refuse what `name` waits for: what runs keeps running, and this change stays
        refused until the capsule's desired spec changes. Returns its status."""
        async with self._lock:
            slot, spec = self._awaiting(name)
            assert self._approvals is not None
            rejection = self._approvals.reject(name, spec, spec_hash)
            self._show_approval(slot)
            self._mark_broken(name, _rejected(name, rejection, serving=slot.handle is not None))
            return slot.status()

    def _awaiting(self, name: str) -> tuple[Slot, CapsuleSpec]:
        slot, spec = self._slots.get(name), self._desired.get(name)
        if slot is None or spec is None:
            raise UnknownCapsule(f"no capsule {name!r} (deployed: {', '.join(sorted(self._slots)) or 'none'})")
        if self._approvals is None or slot.awaiting is None:
            why = f"it is {slot.phase.lower()}"
            if slot.rejected is not None:
                why = f"its change to {slot.rejected.spec_hash[:12]} was rejected; change its files to propose another"
            raise NotAwaitingApproval(f"capsule {name!r} is not awaiting approval: {why}")
        return slot, spec

    # -- calls ---------------------------------------------------------------------------
    async def call_tool(self, name: str, tool: str, arguments: Any = None) -> Any:
        """Call `tool` on the version of `name` serving now. Raises UnknownCapsule,
        CapsuleNotRunning, or whatever the tool call raises."""
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownCapsule(f"no capsule {name!r} (deployed: {', '.join(sorted(self._slots)) or 'none'})")
        if slot.handle is None:
            raise CapsuleNotRunning(f"capsule {name!r} is {slot.phase.lower()}, not running" + _why(slot))
        async with self._gate(slot):
            return await self._call(slot, tool, arguments)

    def _gate(self, slot: Slot) -> asyncio.Semaphore:
        size = slot.spec.instances if slot.spec is not None else 1
        if slot.gate is None or slot.gate_size != size:
            slot.gate, slot.gate_size = asyncio.Semaphore(size), size
        return slot.gate

    async def _call(self, slot: Slot, tool: str, arguments: Any) -> Any:
        handle = slot.handle  # the version serving now (after any wait for the gate)
        if handle is None:
            raise CapsuleNotRunning(f"capsule {slot.name!r} is {slot.phase.lower()}, not running" + _why(slot))
        key = id(handle)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        try:
            return await handle.call_tool(tool, arguments)  # counted by the observer
        finally:
            left = self._inflight[key] - 1
            if left:
                self._inflight[key] = left
            else:
                del self._inflight[key]
                drained = self._drained.pop(key, None)
                if drained is not None:
                    drained.set()

    def _observed(self, slot: Slot, outcome: Any) -> None:
        """Every call of the slot's versions, tools and interceptors alike (CallOutcome)."""
        slot.calls += 1
        if outcome.error is not None:
            slot.errors += 1
            self._error(slot, outcome.error, outcome.label)
            self._warnings.warning(
                f"{slot.name}:{outcome.label}", "capsule %s: %s failed: %s", slot.name, outcome.label, outcome.error
            )
        else:
            slot.fuel_total += outcome.fuel
            slot.fuel_last = outcome.fuel

    def _serve(self, slot: Slot, handle: Handle, spec: CapsuleSpec) -> None:
        """`handle` is the version of `slot` serving from now on."""
        handle.observe(functools.partial(self._observed, slot))
        slot.handle, slot.spec = handle, spec

    # -- shutdown ------------------------------------------------------------------------
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every capsule (dependents first), waiting at most `timeout` for calls in flight."""
        async with self._lock:
            for slot in self._slots.values():
                self._cancel_retry(slot)
            current = plan({}, self.actual())
            for wave in current.waves():
                await asyncio.gather(*(self._stop_within(self._slots[a.capsule], timeout) for a in wave))
            for task in list(self._closing):
                task.cancel()

    async def _stop_within(self, slot: Slot, timeout: float) -> None:
        handle = slot.handle
        self._set_phase(slot, STOPPING)
        slot.handle = None
        if handle is not None:
            await self._drain_and_close(handle, timeout, slot=slot)
        self._set_phase(slot, STOPPED)

    # -- events --------------------------------------------------------------------------
    def _set_phase(self, slot: Slot, phase: str) -> None:
        if slot.phase == phase and phase not in (FAILED, DEGRADED):
            return
        slot.phase = phase
        slot.since_ms = self._wall_ms()
        if phase != FAILED:
            slot.next_retry_ms = None
        self._publish(slot, phase.lower())

    def _publish(self, slot: Slot, event: str) -> None:
        status = slot.status()
        slot.history.append({"event": event, "at_ms": self._wall_ms(), "version": status["version"]})
        del slot.history[:-50]
        self._bus.publish(f"orch.capsule.{slot.name}.{event}", status)


def _why(slot: Slot) -> str:
    if slot.awaiting is not None:
        return f": it waits for approval of {', '.join(slot.awaiting.escalations)} (`orch approve {slot.name}`)"
    if slot.last_error:
        return f": {slot.last_error}"
    return ""


def _rejected(name: str, rejection: Rejection, *, serving: bool) -> str:
    keeps = "the last approved version keeps serving" if serving else "nothing runs"
    return (
        f"the operator rejected the change to {rejection.spec_hash[:12]}, which would grant "
        f"{', '.join(rejection.escalations)}; {keeps}. Change the capsule's files or config to propose another"
    )
