"""The reconciler with a fake launcher: ordering, concurrency of independent capsules,
last-good reloads, calls in flight finishing on the old version, backoff with a fake clock,
stop and removal, and the events it publishes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from orchestrator.capsule.bus import EventBus
from orchestrator.capsule.capsule import CallOutcome
from orchestrator.control.reconciler import Reconciler
from orchestrator.desired.spec import CapsuleSpec
from orchestrator.errors import CapsuleNotRunning, InvalidModule, StaleSpec, UnknownCapsule


def spec(
    name: str, wasm: str = "a" * 64, *, depends_on: tuple[str, ...] = (), enabled: bool = True, **config: str
) -> CapsuleSpec:
    return CapsuleSpec(
        name=name,
        folder=f"/capsules/{name}",
        wasm_sha256=wasm,
        manifest={"package": {"name": name, "version": "1.0.0"}, "capabilities": {}},
        config=config,
        secret_keys=frozenset(),
        limits={"fuel": 10, "memory_mib": 1, "timeout_ms": 10},
        depends_on=depends_on,
        enabled=enabled,
    )


class FakeHandle:
    def __init__(self, spec: CapsuleSpec, log: list[str]) -> None:
        self.spec = spec
        self.log = log
        self.fuel_last = 7
        self.closed = False
        self.gate: asyncio.Event | None = None
        self.interceptors_from: int | str | None = "off"
        self.observer: Callable[[CallOutcome], None] | None = None
        self.waiting = 0  # calls held at `gate`

    async def call_tool(self, tool: str, arguments: Any = None) -> str:
        if self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        if self.closed:
            raise AssertionError("called a closed version")
        if self.observer is not None:  # as the real capsule reports every call
            self.observer(CallOutcome(tool, self.fuel_last, None, 1))
        return f"{self.spec.name}@{self.spec.wasm_sha256[:1]}"

    def observe(self, observer: Callable[[CallOutcome], None] | None) -> None:
        self.observer = observer

    def counters(self) -> dict[str, int]:
        return {"conflicts": 0, "events_lost": 0}

    def start_interceptors(self, after_seq: int | None = None) -> None:
        self.interceptors_from = after_seq

    async def stop_interceptors(self) -> int:
        return 41

    async def close(self) -> None:
        self.log.append(f"close {self.spec.name}@{self.spec.wasm_sha256[:1]}")
        self.closed = True


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` (a backstop of 10 s, never a count of event-loop turns)."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.001)
    assert condition(), what


async def settle() -> None:
    """Give scheduled work a chance to run before checking that something did NOT happen."""
    await asyncio.sleep(0.01)


class FakeLauncher:
    """Launches specs; `fail` names (or name@wasm) raise; `slow` ones wait for an event."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.fail: set[str] = set()
        self.stale: set[str] = set()
        self.handles: dict[str, FakeHandle] = {}
        self.concurrent = 0
        self.max_concurrent = 0
        self.release: asyncio.Event | None = None

    async def launch(self, spec: CapsuleSpec) -> FakeHandle:
        key = f"{spec.name}@{spec.wasm_sha256[:1]}"
        self.log.append(f"launch {key}")
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.release is not None:
                await self.release.wait()
            else:
                await asyncio.sleep(0)
        finally:
            self.concurrent -= 1
        if spec.name in self.stale or key in self.stale:
            raise StaleSpec(f"{key} changed while loading")
        if spec.name in self.fail or key in self.fail:
            raise InvalidModule(f"{key}: broken")
        handle = FakeHandle(spec, self.log)
        self.handles[spec.name] = handle
        return handle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.wake = asyncio.Event()

    def monotonic(self) -> float:
        return self.now

    def wall_ms(self) -> int:
        return int(self.now * 1000)

    async def sleep(self, seconds: float) -> None:
        if seconds == 0:  # the test runs a retry by hand
            return
        self.sleeps.append(seconds)
        self.wake.set()
        await asyncio.Event().wait()  # scheduled retries never wake: the test drives them


def make(jitter: float = 0.5) -> tuple[Reconciler, FakeLauncher, EventBus, Clock]:
    launcher, bus, clock = FakeLauncher(), EventBus(history=10_000), Clock()
    reconciler = Reconciler(
        launcher=launcher,
        bus=bus,
        wall_ms=clock.wall_ms,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        jitter=lambda: jitter,
    )
    return reconciler, launcher, bus, clock


def desired(*specs: CapsuleSpec) -> dict[str, CapsuleSpec]:
    return {s.name: s for s in specs}


def phases(bus: EventBus, name: str) -> list[str]:
    return [e.topic.split(".")[-1] for e in bus.history(f"orch.capsule.{name}.*")]


async def test_starts_dependencies_first_and_independents_together() -> None:
    reconciler, launcher, bus, _ = make()
    plan = await reconciler.apply(
        desired(spec("db"), spec("api", depends_on=("db",)), spec("web", depends_on=("api",)), spec("cache"))
    )
    launched = [line for line in launcher.log if line.startswith("launch")]
    assert launched.index("launch db@a") < launched.index("launch api@a") < launched.index("launch web@a")
    assert launcher.max_concurrent >= 2  # db and cache in one wave
    assert {s["name"]: s["phase"] for s in reconciler.status()} == dict.fromkeys(
        ["api", "cache", "db", "web"], "Running"
    )
    assert [a.action for a in plan.actions] == ["start"] * 4
    assert phases(bus, "db") == ["starting", "running"]
    started = bus.history("orch.reconcile.started")
    assert len(started) == 1 and {a["capsule"] for a in started[0].payload["actions"]} == {"db", "api", "web", "cache"}


async def test_unchanged_desired_state_is_a_no_op() -> None:
    reconciler, launcher, bus, _ = make()
    state = desired(spec("a"), spec("b"))
    await reconciler.apply(state)
    before = (list(launcher.log), bus.last_seq)
    plan = await reconciler.apply(state)
    assert not plan.has_changes
    assert (launcher.log, bus.last_seq) == before


async def test_reload_swaps_only_after_the_new_version_loaded() -> None:
    reconciler, launcher, bus, _ = make()
    await reconciler.apply(desired(spec("a", "1" * 64)))
    old = launcher.handles["a"]
    launcher.release = asyncio.Event()
    applying = asyncio.create_task(reconciler.apply(desired(spec("a", "2" * 64))))
    await until(lambda: launcher.concurrent == 1, "the new version is loading")
    assert await reconciler.call_tool("a", "t") == "a@1"  # still served by the old version
    launcher.release.set()
    await applying
    assert await reconciler.call_tool("a", "t") == "a@2"
    slot = reconciler.slot("a")
    assert slot is not None and slot.reload_count == 1 and slot.phase == "Running"
    await until(lambda: old.closed, "the old version closed")
    assert "reloaded" in phases(bus, "a")
    new = launcher.handles["a"]
    assert new.interceptors_from == 41  # interceptors resume after the old version's last event


async def test_failed_reload_keeps_the_old_version_serving() -> None:
    reconciler, launcher, bus, _ = make()
    await reconciler.apply(desired(spec("a", "1" * 64)))
    launcher.fail.add("a@2")
    await reconciler.apply(desired(spec("a", "2" * 64)))
    slot = reconciler.slot("a")
    assert slot is not None and slot.phase == "Degraded" and "broken" in (slot.last_error or "")
    assert await reconciler.call_tool("a", "t") == "a@1"
    assert not launcher.handles["a"].closed
    # going back to the serving version clears the degradation without a reload
    await reconciler.apply(desired(spec("a", "1" * 64)))
    assert slot.phase == "Running" and slot.last_error is None and slot.reload_count == 0
    # and a fixed version reloads
    await reconciler.apply(desired(spec("a", "3" * 64)))
    assert await reconciler.call_tool("a", "t") == "a@3"
    assert phases(bus, "a")[-3:] == ["running", "running", "reloaded"][-3:] or "reloaded" in phases(bus, "a")


async def test_calls_in_flight_finish_on_the_old_version() -> None:
    reconciler, launcher, _, _ = make()
    two = {"instances": 2}
    await reconciler.apply(desired(replace(spec("a", "1" * 64), **two)))
    old = launcher.handles["a"]
    old.gate = asyncio.Event()
    in_flight = asyncio.create_task(reconciler.call_tool("a", "t"))
    await until(lambda: old.waiting == 1, "the call is running")
    await reconciler.apply(desired(replace(spec("a", "2" * 64), **two)))
    assert await reconciler.call_tool("a", "t") == "a@2"  # a second instance's worth of room
    await settle()
    assert not old.closed  # its call is still running
    old.gate.set()
    assert await in_flight == "a@1"
    await until(lambda: old.closed, "the old version closed after its last call")


async def test_one_instance_means_one_call_at_a_time_even_across_a_reload() -> None:
    reconciler, launcher, _, _ = make()
    await reconciler.apply(desired(spec("a", "1" * 64)))
    old = launcher.handles["a"]
    old.gate = asyncio.Event()
    in_flight = asyncio.create_task(reconciler.call_tool("a", "t"))
    await until(lambda: old.waiting == 1, "the call is running")
    await reconciler.apply(desired(spec("a", "2" * 64)))
    queued = asyncio.create_task(reconciler.call_tool("a", "t"))
    await settle()
    assert not queued.done()  # waits for the call still running on the old version
    old.gate.set()
    assert await in_flight == "a@1"
    assert await queued == "a@2"  # then runs on the new version


async def test_start_failure_backs_off_doubling_to_a_minute() -> None:
    reconciler, launcher, bus, clock = make(jitter=0.5)  # jitter factor 1.0
    launcher.fail.add("a")
    await reconciler.apply(desired(spec("a")))
    slot = reconciler.slot("a")
    assert slot is not None and slot.phase == "Failed"
    assert slot.next_retry_ms == clock.wall_ms() + 1000
    delays = []
    for _ in range(8):
        await clock.wake.wait()
        clock.wake.clear()
        delays.append(clock.sleeps[-1])
        clock.now += clock.sleeps[-1]
        task = slot.retry_task
        assert task is not None
        task.cancel()  # the fake sleep never returns: run the retry by hand
        await reconciler._retry("a", 0)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert slot.attempts == 9 and slot.phase == "Failed"
    launcher.fail.clear()
    await clock.wake.wait()
    assert slot.retry_task is not None
    slot.retry_task.cancel()
    await reconciler._retry("a", 0)
    assert slot.phase == "Running" and slot.next_retry_ms is None and slot.attempts == 0
    assert phases(bus, "a").count("failed") == 9


async def test_backoff_has_jitter() -> None:
    low, _, _, _ = make(jitter=0.0)
    high, _, _, _ = make(jitter=1.0)
    for reconciler in (low, high):
        reconciler._launcher.fail.add("a")  # type: ignore[attr-defined]
        await reconciler.apply(desired(spec("a")))
    slow, fast = high.slot("a"), low.slot("a")
    assert slow is not None and fast is not None
    assert slow.next_retry_ms - fast.next_retry_ms == 400  # type: ignore[operator]  # 0.8 s vs 1.2 s


async def test_a_failed_start_is_not_retried_early_by_other_changes() -> None:
    reconciler, launcher, _, _ = make()
    launcher.fail.add("a")
    await reconciler.apply(desired(spec("a"), spec("b", "1" * 64)))
    await reconciler.apply(desired(spec("a"), spec("b", "2" * 64)))
    assert launcher.log.count("launch a@a") == 1
    # but a changed spec is tried at once
    await reconciler.apply(desired(spec("a", "9" * 64), spec("b", "2" * 64)))
    assert "launch a@9" in launcher.log


async def test_stale_files_change_nothing() -> None:
    reconciler, launcher, bus, _ = make()
    await reconciler.apply(desired(spec("a", "1" * 64)))
    launcher.stale.add("a@2")
    await reconciler.apply(desired(spec("a", "2" * 64)))
    slot = reconciler.slot("a")
    assert slot is not None and slot.phase == "Running" and slot.last_error is None
    assert await reconciler.call_tool("a", "t") == "a@1"
    assert "degraded" not in phases(bus, "a")


async def test_stop_dependents_first_and_keep_disabled_visible() -> None:
    reconciler, launcher, _, _ = make()
    await reconciler.apply(desired(spec("db"), spec("api", depends_on=("db",))))
    launcher.log.clear()
    await reconciler.apply(desired(spec("db", enabled=False), spec("api", depends_on=("db",), enabled=False)))
    assert launcher.log == ["close api@a", "close db@a"]
    assert {s["name"]: s["phase"] for s in reconciler.status()} == {"api": "Stopped", "db": "Stopped"}
    with pytest.raises(CapsuleNotRunning, match="stopped"):
        await reconciler.call_tool("db", "t")
    await reconciler.apply({})
    assert reconciler.status() == []
    with pytest.raises(UnknownCapsule):
        await reconciler.call_tool("db", "t")


async def test_removed_failed_capsule_stops_retrying() -> None:
    reconciler, launcher, _, _ = make()
    launcher.fail.add("a")
    await reconciler.apply(desired(spec("a")))
    slot = reconciler.slot("a")
    assert slot is not None and slot.retry_task is not None
    task = slot.retry_task
    await reconciler.apply({})
    await until(task.done, "the retry was cancelled")
    assert task.cancelled() and reconciler.slot("a") is None


async def test_status_counts_calls_errors_and_fuel() -> None:
    reconciler, _, _, _ = make()
    await reconciler.apply(desired(spec("a")))
    for _ in range(3):
        await reconciler.call_tool("a", "t")
    (status,) = reconciler.status()
    assert status["calls"] == 3 and status["fuel_last"] == 7 and status["fuel_mean"] == 7
    assert status["version"] == "a" * 12 and status["instances"] == 1 and status["reload_count"] == 0


async def test_shutdown_stops_everything_dependents_first() -> None:
    reconciler, launcher, _, _ = make()
    await reconciler.apply(desired(spec("db"), spec("api", depends_on=("db",))))
    launcher.log.clear()
    await reconciler.shutdown(timeout=1)
    assert launcher.log == ["close api@a", "close db@a"]
    assert all(s["phase"] == "Stopped" for s in reconciler.status())


async def test_shutdown_waits_for_calls_in_flight_but_not_forever() -> None:
    reconciler, launcher, _, _ = make()
    await reconciler.apply(desired(spec("a")))
    launcher.handles["a"].gate = asyncio.Event()  # a call that never finishes
    hung = asyncio.create_task(reconciler.call_tool("a", "t"))
    await until(lambda: launcher.handles["a"].waiting == 1, "the call is running")
    await asyncio.wait_for(reconciler.shutdown(timeout=0.05), 5)
    assert launcher.handles["a"].closed
    hung.cancel()


AsyncFn = Callable[[], Awaitable[Any]]


async def test_restart_swaps_to_a_fresh_version_or_starts_a_failed_one() -> None:
    reconciler, launcher, bus, _ = make()
    await reconciler.apply(desired(spec("a"), spec("b")))
    first = launcher.handles["a"]
    status = await reconciler.restart("a")
    assert status["reload_count"] == 1 and launcher.handles["a"] is not first
    await until(lambda: first.closed, "the first version closed")
    launcher.fail.add("c")
    await reconciler.apply(desired(spec("a"), spec("b"), spec("c")))
    launcher.fail.clear()
    assert (await reconciler.restart("c"))["phase"] == "Running"
    with pytest.raises(UnknownCapsule):
        await reconciler.restart("zzz")
    assert "reloaded" in phases(bus, "a")


async def test_history_records_when_each_event_happened() -> None:
    reconciler, _, _, clock = make()
    await reconciler.apply(desired(spec("a", "1" * 64)))
    clock.now += 5
    await reconciler.apply(desired(spec("a", "2" * 64)))
    slot = reconciler.slot("a")
    assert slot is not None
    times = {entry["event"]: entry["at_ms"] for entry in slot.history}
    assert times["reloaded"] - times["running"] == 5000
