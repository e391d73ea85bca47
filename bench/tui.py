"""Dashboard benchmark under an event flood: prints one JSON object.

    .venv/bin/python bench/tui.py [--rate N] [--seconds S] [--rounds R]

The worst case of `orch up --dash`: an Orchestrator, its ControlServer and the dashboard
(`tui.Dashboard`, headless, 100x30, on its events view) share ONE event loop in this
process, on a copy of the example deployment; `orchestrator.bus.publish` is called from
that loop at a paced `--rate` events a second (default 10,000) for `--seconds` (default 4).
While it runs, `space` is pressed 10 times (pause, resume, ...), each posted as the terminal
driver would post it.

Reported per round, then the median over rounds:
- published_per_s: the rate the publisher achieved (it shares the loop: below `--rate`
  when the loop is saturated);
- received_per_s: events that reached the dashboard's feed, per second of flood;
- lost: events the server dropped for the dashboard's stream (announced to it), and
  accounted: whether received + lost == published once the stream drained;
- key_ms: p50 and max, from a key press being posted to its action running;
- view_lag_ms: p50 and max, sampled every 100 ms: how old the newest line on screen is
  (its event's timestamp against the wall clock);
- catch_up_ms: from the end of the flood until the view shows the last event.

The machine is shared (2 cores, other work): compare ratios between runs, not absolute
numbers. tests/test_tui.py checks the behaviour (keys work under a flood, nothing is lost
silently, the buffers stay bounded); this script measures how fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from textual import events  # noqa: E402

from orchestrator.api.server import ControlServer  # noqa: E402
from orchestrator.control.runtime import Orchestrator  # noqa: E402
from tui import Dashboard, connect_to  # noqa: E402
from tui.eventlog import EventLog  # noqa: E402
from tui.events import EventsScreen  # noqa: E402

KEYS = 10
TIMEOUT_S = 60.0


def write_deployment(base: Path) -> Path:
    for name in ("counter", "milestones", "notes"):
        shutil.copytree(ROOT / "capsules" / name, base / "capsules" / name, ignore=shutil.ignore_patterns("assembly"))
    shutil.copy(ROOT / "config.yaml", base / "config.yaml")
    return base / "config.yaml"


async def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def percentiles_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "max": None}
    return {"p50": round(statistics.median(values) * 1000, 1), "max": round(max(values) * 1000, 1)}


async def one_round(rate: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        config = write_deployment(Path(folder))
        orchestrator = Orchestrator(config, watch=False)
        await orchestrator.start()
        assert orchestrator.desired is not None
        server = ControlServer(orchestrator, state_dir=orchestrator.desired.config.state_dir)
        await server.start()
        try:
            socket = Path(folder) / ".orch" / "orch.sock"
            app = Dashboard(connect_to(socket), where=str(socket), poll_interval=0.5, frame_interval=0.25)
            async with app.run_test(size=(100, 30)) as pilot:
                return await flood_round(app, pilot, orchestrator, rate, seconds)
        finally:
            await orchestrator.stop(5)
            await server.stop()


async def flood_round(
    app: Dashboard, pilot: Any, orchestrator: Orchestrator, rate: int, seconds: float
) -> dict[str, Any]:
    bus = orchestrator.bus
    await wait_for(lambda: app.connected, "the dashboard to connect")
    await pilot.press("e")
    screen = app.screen
    assert isinstance(screen, EventsScreen)
    log = screen.query_one(EventLog)
    ticks = 0
    add = app.feed.add

    def counting(item: dict[str, Any]) -> None:
        nonlocal ticks
        ticks += item.get("topic") == "bench.tick"
        add(item)

    app.feed.add = counting  # type: ignore[method-assign]
    bus.publish("bench.start", {}, source="bench")
    await wait_for(lambda: any(r.topic == "bench.start" for r in app.feed.rows), "the stream to be live")
    lost_before = app.feed.lost

    effects: list[float] = []
    pause = screen.action_pause

    def timed_pause() -> None:
        effects.append(time.perf_counter())
        pause()

    screen.action_pause = timed_pause  # type: ignore[method-assign]

    published = 0
    flooding = True
    lags: list[float] = []

    async def flood() -> None:
        nonlocal published
        started = time.monotonic()
        while flooding:
            for _ in range(100):
                bus.publish("bench.tick", {"n": published, "pad": "x" * 40}, source="bench")
                published += 1
            await asyncio.sleep(max(0.0, started + published / rate - time.monotonic()))

    async def sample_lag() -> None:
        while flooding:
            await asyncio.sleep(0.1)
            if log.rows and log.rows[-1].timestamp_ms and not screen.paused:
                lags.append(time.time() - log.rows[-1].timestamp_ms / 1000)

    started = time.monotonic()
    tasks = [asyncio.get_running_loop().create_task(flood()), asyncio.get_running_loop().create_task(sample_lag())]
    latencies: list[float] = []
    try:
        await asyncio.sleep(seconds / 4)
        for _ in range(KEYS):
            was = len(effects)
            key = events.Key("space", " ")
            key.set_sender(app)
            posted = time.perf_counter()
            app.post_message(key)
            await wait_for(lambda w=was: len(effects) > w, "a key press")
            latencies.append(effects[-1] - posted)
            await asyncio.sleep(seconds / 2 / KEYS)
        if screen.paused:
            screen.action_pause()
        await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
    finally:
        flooding = False
        await asyncio.gather(*tasks)
    flood_s = time.monotonic() - started
    ended = time.monotonic()
    bus.publish("bench.end", {}, source="bench")
    await wait_for(lambda: log.rows and log.rows[-1].topic == "bench.end", "the view to show the end")
    catch_up = time.monotonic() - ended
    lost = app.feed.lost - lost_before
    return {
        "published_per_s": round(published / flood_s),
        "received_per_s": round(ticks / flood_s),
        "lost": lost,
        "accounted": ticks + lost == published,
        "key_ms": percentiles_ms(latencies),
        "view_lag_ms": percentiles_ms(lags),
        "catch_up_ms": round(catch_up * 1000, 1),
    }


def median_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(path: tuple[str, ...]) -> Any:
        values = []
        for result in rounds:
            value: Any = result
            for key in path:
                value = value[key]
            values.append(value)
        if all(isinstance(v, bool) for v in values):
            return all(values)
        numbers = [v for v in values if v is not None]
        return round(statistics.median(numbers), 1) if numbers else None

    first = rounds[0]
    return {
        key: ({k: pick((key, k)) for k in value} if isinstance(value, dict) else pick((key,)))
        for key, value in first.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    rounds = [asyncio.run(one_round(options.rate, options.seconds)) for _ in range(options.rounds)]
    report = {
        "setup": {
            "rate": options.rate,
            "seconds": options.seconds,
            "rounds": options.rounds,
            "keys": KEYS,
            "one_event_loop": "orchestrator + API + dashboard (orch up --dash)",
        },
        "median": median_of(rounds),
        "rounds": rounds,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
