"""Interceptors on real capsules (a small WAT module on the real engine and bus): each event
once and in bus order across patterns, losses counted and announced exactly, failures
rate-limited, a failing interceptor backing off, a capsule never fed its own failure events,
a handover between versions exactly once.

Waits are on bus events or `caught_up`; the backoff is observed through an injected sleep
that records what it was asked to wait (counts and delays, never elapsed time).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.capsule import Capsule
from orchestrator.capsule.bus import EventBus, Subscription
from orchestrator.capsule.interceptors import INTERCEPTOR_QUEUE, InterceptorRunner, subscription_patterns
from orchestrator.engine import WasmEngine

DEADLINE = 15.0

MODULE = """(module
  (func (export "ok") (result i32) (i32.const 0))
  (func (export "also") (result i32) (i32.const 0))
  (func (export "boom") (result i32) unreachable))
"""


def write_capsule(folder: Path, name: str, interceptors: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "m.wat").write_text(MODULE)
    grants = sorted({event for event, _ in interceptors})
    text = f'[package]\nname = "{name}"\nversion = "1.0.0"\n[[component]]\nfile = "m.wat"\n'
    text += f"[capabilities]\nipc_subscribe = {json.dumps(grants)}\n"
    for event, action in interceptors:
        text += f'[[interceptor]]\nevent = "{event}"\naction = "{action}"\n'
    (folder / "Capsule.toml").write_text(text)
    return folder


class Host:
    def __init__(self, engine: WasmEngine, bus: EventBus, root: Path) -> None:
        self.engine, self.bus, self.root = engine, bus, root
        self.capsules: list[Capsule] = []
        self.runners: list[InterceptorRunner] = []

    async def capsule(self, name: str, interceptors: list[tuple[str, str]], *, start: bool = True) -> Capsule:
        folder = write_capsule(self.root / name, name, interceptors)
        capsule = await Capsule.load(
            folder, engine=self.engine, bus=self.bus, store=None, workspace=self.root, interceptors=start
        )
        self.capsules.append(capsule)
        return capsule

    def runner(
        self, capsule: Capsule, run: Callable[[str, bytes], Awaitable[Any]] | None = None, **options: Any
    ) -> InterceptorRunner:
        runner = InterceptorRunner(
            name=capsule.name,
            interceptors=capsule.manifest.interceptors,
            bus=self.bus,
            run=run or capsule._run_interceptor,
            **options,
        )
        self.runners.append(runner)
        return runner


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    bus = EventBus(history=10_000)
    with WasmEngine() as engine:
        made = Host(engine, bus, tmp_path)
        yield made
        for runner in made.runners:
            await runner.stop()
        for capsule in made.capsules:
            await capsule.close()
    bus.close()


async def next_event(events: Subscription) -> dict[str, Any]:
    event = await asyncio.wait_for(events.get(), DEADLINE)
    return dict(event.payload)


class Recorder:
    """A `run` that records (action, seq) and calls the capsule's real export."""

    def __init__(self, capsule: Capsule) -> None:
        self.capsule = capsule
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, action: str, data: bytes) -> Any:
        self.calls.append((action, json.loads(data)["seq"]))
        return await self.capsule._run_interceptor(action, data)


class Clock:
    """A monotonic clock that moves only when the injected sleep waits."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


# -- feeding itself, backing off -----------------------------------------------------------------


async def test_a_trapping_interceptor_is_never_fed_its_own_failure_events(host: Host) -> None:
    failed = host.bus.subscribe("orch.capsule.looper.interceptor_failed")
    looper = await host.capsule("looper", [("orch.capsule.>", "boom")])
    host.bus.publish("orch.capsule.other.running", {"capsule": "other"})
    report = await next_event(failed)
    assert report["action"] == "boom" and "unreachable" in report["error"].lower()
    await looper.caught_up(host.bus.last_seq)  # it has seen its own failure event go by
    assert (looper.calls, looper.errors) == (1, 1)
    assert len(host.bus.history("orch.capsule.looper.interceptor_failed")) == 1
    host.bus.publish("orch.capsule.other.interceptor_failed", {"capsule": "other"})  # not its own: delivered
    await looper.caught_up(host.bus.last_seq)
    assert looper.calls == 2


async def test_a_failing_interceptor_backs_off_and_a_success_resets_it(host: Host) -> None:
    capsule = await host.capsule("flaky", [("orders.bad", "boom"), ("orders.good", "ok")], start=False)
    clock = Clock()
    runner = host.runner(
        capsule, backoff_base=1.0, backoff_max=4.0, report_interval=0.0, clock=clock, sleep=clock.sleep
    )
    failed = host.bus.subscribe("orch.capsule.flaky.interceptor_failed")
    runner.start()
    for _ in range(6):
        host.bus.publish("orders.bad", {})
    await runner.caught_up(host.bus.last_seq)
    assert (capsule.calls, capsule.errors, runner.failures) == (6, 6, 6)
    assert clock.slept == [1.0, 2.0, 4.0, 4.0, 4.0]  # doubling, capped; one wait per failure after the first
    assert [e.payload["retry_in_s"] for e in failed.drain()] == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    host.bus.publish("orders.good", {})  # waits out the last backoff, then succeeds
    host.bus.publish("orders.bad", {})  # right after a success: no wait
    host.bus.publish("orders.bad", {})  # one failure in a row: the base delay
    await runner.caught_up(host.bus.last_seq)
    assert clock.slept == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 1.0]
    assert (capsule.calls, capsule.errors) == (9, 8)


async def test_events_arriving_during_a_backoff_wait_and_overflow_counts_as_lost(host: Host) -> None:
    capsule = await host.capsule("slow", [("orders.bad", "boom"), ("orders.good", "ok")], start=False)
    waiting, release = asyncio.Event(), asyncio.Event()

    async def sleep(seconds: float) -> None:
        waiting.set()
        await release.wait()

    runner = host.runner(capsule, queue_size=4, backoff_base=60.0, sleep=sleep)
    lost = host.bus.subscribe("orch.capsule.slow.events_lost")
    runner.start()
    host.bus.publish("orders.bad", {})
    host.bus.publish("orders.good", {"n": 0})
    await asyncio.wait_for(waiting.wait(), DEADLINE)  # backing off before good #0
    for n in range(1, 11):
        host.bus.publish("orders.good", {"n": n})  # 10 into a queue of 4: 6 lost
    release.set()
    await runner.caught_up(host.bus.last_seq)
    assert await next_event(lost) == {"capsule": "slow", "lost": 6, "total": 6}
    assert runner.lost == 6 and capsule.calls == 1 + 1 + 4
    assert lost.drain() == []


# -- losses -------------------------------------------------------------------------------------


async def test_losses_are_announced_with_exact_counts_and_unrelated_events_take_no_space(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    capsule = await host.capsule("counted", [("orders.*", "ok")], start=False)
    runner = host.runner(capsule, queue_size=100)
    lost = host.bus.subscribe("orch.capsule.counted.events_lost")
    runner.start()
    for n in range(1000):  # one burst: the runner cannot run in between
        host.bus.publish("orders.new", {"n": n})
        for _ in range(5):
            host.bus.publish("noise.tick", {})  # matches nothing: never queued, never lost
    await runner.caught_up(host.bus.last_seq)
    assert await next_event(lost) == {"capsule": "counted", "lost": 900, "total": 900}
    assert runner.lost == 900 and capsule.calls == 100
    warnings = [r for r in caplog.records if "lost before its interceptors saw them" in r.getMessage()]
    assert len(warnings) == 1 and "900 event(s)" in warnings[0].getMessage()


async def test_a_burst_of_three_thousand_events_is_delivered_whole(host: Host) -> None:
    assert INTERCEPTOR_QUEUE >= 3000
    capsule = await host.capsule("burst", [("orders.*", "ok")])  # the runner a Capsule makes
    for n in range(3000):
        host.bus.publish("orders.new", {"n": n})
        host.bus.publish("metrics.tick", {})
    await capsule.caught_up(host.bus.last_seq)
    assert capsule.calls == 3000
    assert host.bus.history("orch.capsule.burst.events_lost") == []


async def test_failure_reports_are_rate_limited_and_sum_what_they_hold_back(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    capsule = await host.capsule("noisy", [("orders.*", "boom")], start=False)
    clock = Clock()
    runner = host.runner(capsule, backoff_base=0.0, report_interval=3600.0, clock=clock, sleep=clock.sleep)
    runner.start()
    for _ in range(50):
        host.bus.publish("orders.new", {})
    await runner.caught_up(host.bus.last_seq)
    reports = host.bus.history("orch.capsule.noisy.interceptor_failed")
    assert [(r.payload["failures"], r.payload["total"]) for r in reports] == [(1, 1)]  # the rest held back
    await runner.stop()  # stopping reports what was held back
    reports = host.bus.history("orch.capsule.noisy.interceptor_failed")
    assert [(r.payload["failures"], r.payload["total"]) for r in reports] == [(1, 1), (49, 50)]
    assert len([r for r in caplog.records if "interceptor boom failed" in r.getMessage()]) == 2


# -- order, patterns, handover ----------------------------------------------------------------


def test_subscription_patterns_drop_what_another_covers() -> None:
    assert subscription_patterns(["orders.*", "orders.>", "orders.new", "payments.*", "orders.*"]) == [
        "orders.>",
        "payments.*",
    ]
    assert subscription_patterns(["a.*", "*.b"]) == ["*.b", "a.*"]  # partial overlap: both


async def test_events_arrive_once_and_in_bus_order_across_patterns(host: Host) -> None:
    capsule = await host.capsule("ordered", [("orders.*", "ok"), ("*.paid", "also"), ("payments.>", "ok")], start=False)
    recorder = Recorder(capsule)
    runner = host.runner(capsule, recorder)
    runner.start()
    published = []
    for n in range(200):
        for topic in ("orders.new", "payments.card.done", "orders.paid", "noise.x", "refunds.paid"):
            published.append((topic, host.bus.publish(topic, {"n": n}).seq))
        if n % 20 == 0:
            await runner.caught_up(host.bus.last_seq)  # rounds that end mid-stream, too
    await runner.caught_up(host.bus.last_seq)
    expected = []
    for topic, seq in published:
        expected += [(action, seq) for action in runner_actions(runner, topic)]
    assert recorder.calls == expected
    assert runner.lost == 0


def runner_actions(runner: InterceptorRunner, topic: str) -> list[str]:
    return [i.action for i in runner.matching(topic)]


async def test_stop_finishes_the_event_being_handled_and_a_new_version_resumes_after_it(host: Host) -> None:
    capsule = await host.capsule("handover", [("orders.*", "ok")], start=False)
    started, proceed = asyncio.Event(), asyncio.Event()
    seen: list[int] = []

    async def slow(action: str, data: bytes) -> Any:
        seen.append(json.loads(data)["seq"])
        started.set()
        await proceed.wait()
        return await capsule._run_interceptor(action, data)

    old = host.runner(capsule, slow)
    old.start()
    first = host.bus.publish("orders.new", {"n": 1}).seq
    host.bus.publish("orders.new", {"n": 2})
    await asyncio.wait_for(started.wait(), DEADLINE)
    stopping = asyncio.ensure_future(old.stop())
    proceed.set()
    handed_over = await asyncio.wait_for(stopping, DEADLINE)
    assert handed_over == first and seen == [first]  # the call in flight finished, nothing after it
    host.bus.publish("noise.x", {})
    host.bus.publish("orders.new", {"n": 3})
    host.bus.publish("noise.y", {})  # the last event matches nothing: caught_up still returns
    recorder = Recorder(capsule)
    new = host.runner(capsule, recorder)
    new.start(after_seq=handed_over)
    await new.caught_up(host.bus.last_seq)
    assert [seq for _, seq in recorder.calls] == [e.seq for e in host.bus.history("orders.*") if e.seq > handed_over]
    assert len(recorder.calls) == 2


async def test_caught_up_returns_when_the_bus_closes(host: Host) -> None:
    capsule = await host.capsule("closing", [("orders.*", "ok")])
    host.bus.close()
    await asyncio.wait_for(capsule.caught_up(host.bus.last_seq + 1), DEADLINE)


async def test_an_unencodable_or_huge_event_does_not_stop_delivery(host: Host) -> None:
    capsule = await host.capsule("robust", [("orders.*", "ok")])
    host.bus.publish("orders.bad", {"x": object()})  # no guest could read it
    host.bus.publish("orders.big", {"blob": "x" * (1 << 20)})
    host.bus.publish("orders.new", {})
    await capsule.caught_up(host.bus.last_seq)
    assert capsule.calls == 2 and capsule.errors == 0


async def test_a_failure_is_logged_with_capsule_action_and_event(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    capsule = await host.capsule("logged", [("orders.*", "boom")])
    event = host.bus.publish("orders.new", {})
    await capsule.caught_up(event.seq)
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING and "interceptor" in r.getMessage()]
    assert f"capsule logged: interceptor boom failed on event {event.seq}" in record.getMessage()
