"""Reload benchmark: hot reload, reloads under load, startup and no-op reconciles; prints one JSON object.

    .venv/bin/python bench/reload.py [--rounds N] [--quick]

Everything runs on generated capsules: WAT text modules (no build tools) whose tool
`version` outputs a constant string, written into a temporary folder with their
`Capsule.toml` and a `config.yaml`.

- reload: an `Orchestrator` (watch=True) runs one capsule; each round rewrites its module
  atomically (temp file + `os.replace`) with a new constant and polls the tool in a tight
  loop (`asyncio.sleep(0)` between calls, no fixed sleeps) until it answers with that
  constant. Time from the replace to the first call served by the new version: median and
  p95 over all reloads. Targets: median <= 50 ms, p95 <= 100 ms.
- under_load: the same reloads while 4 OS threads call the tool continuously through the
  running loop (`run_coroutine_threadsafe(...).result()`). Every exception is a failed
  call (the poller's calls count too). Target: 0 failed. The reload figures under load are
  reported as well.
- startup_100: from `Orchestrator(...)` to `start()` returning with 100 distinct capsules
  (different module bytes, so each is compiled) all `Running`, cold (empty state dir: no
  module cache) and warm (the same state dir again: artifacts from the disk cache).
  Median over rounds. Target: warm <= 1 s.
- noop_reconcile_1000: a `Reconciler` with a fake launcher (handles that do nothing) has
  1,000 specs (loaded from a generated 1,000-deployment config) applied; then
  `apply(same specs)`, a plan with nothing to do, is timed. Target: median <= 50 ms.
  `load_desired` of that config is timed too, in full and re-reading one deployment (the
  watcher's path after a change in one capsule folder, part of every reload's latency).
- reload_among_1000: the reload of `reload`, in an orchestrator running all 1,000 of those
  capsules (no target; shows how reload latency grows with the size of the config).

`--quick` uses 10 reloads, 30 capsules for startup and 200 for the last two.

Figures are medians over rounds; the machine is shared, so treat single figures with care.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.capsule.bus import EventBus  # noqa: E402
from orchestrator.control.reconciler import Reconciler  # noqa: E402
from orchestrator.control.runtime import Orchestrator  # noqa: E402
from orchestrator.desired import load_desired  # noqa: E402
from orchestrator.desired.spec import CapsuleSpec  # noqa: E402

TOOL = "version"
SERVE_TIMEOUT_S = 10.0  # a reload not served by then counts as missed
CALLER_THREADS = 4


def module_wat(value: str) -> str:
    """A module whose `version` export outputs `value` (ASCII), through the Extism kernel."""
    data = value.encode("ascii")
    stores = "\n    ".join(
        f"(call $store_u8 (i64.add (local.get $p) (i64.const {i})) (i32.const {byte}))" for i, byte in enumerate(data)
    )
    return f"""(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (func (export "{TOOL}") (result i32) (local $p i64)
    (local.set $p (call $alloc (i64.const {len(data)})))
    {stores}
    (call $output_set (local.get $p) (i64.const {len(data)}))
    (i32.const 0)))
"""


def manifest_toml(package: str) -> str:
    return (
        f'[package]\nname = "{package}"\nversion = "1.0.0"\n'
        '[[component]]\nfile = "v.wat"\n'
        f'[[tool]]\nname = "{TOOL}"\ndescription = "The constant this build outputs"\n'
        'input_schema = { type = "object" }\n'
    )


def write_capsule(folder: Path, package: str, value: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Capsule.toml").write_text(manifest_toml(package))
    (folder / "v.wat").write_text(module_wat(value))


def write_config(path: Path, names: list[str], folder_of: Mapping[str, str]) -> None:
    lines = ["version: 1", "workspace: .", "state_dir: .orch", "capsules:"]
    lines += [f"  {name}:\n    path: {folder_of[name]}" for name in names]
    path.write_text("\n".join(lines) + "\n")


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 3)


def p95_ms(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 3)


# -- reload ------------------------------------------------------------------------------
class Callers:
    """OS threads calling the tool through the running loop until stopped."""

    def __init__(self, orchestrator: Orchestrator, name: str, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self._orchestrator = orchestrator
        self.name = name
        self._loop = loop
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0
        self.failed = 0
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, name=f"caller-{i}", daemon=True) for i in range(count)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        reconciler = self._orchestrator.reconciler
        assert reconciler is not None
        while not self._stop.is_set():
            future = asyncio.run_coroutine_threadsafe(reconciler.call_tool(self.name, TOOL, {}), self._loop)
            try:
                future.result(timeout=30)
                ok = True
            except Exception as error:
                ok = False
                message = f"{type(error).__name__}: {error}"
            with self._lock:
                self.calls += 1
                if not ok:
                    self.failed += 1
                    if len(self.errors) < 5:
                        self.errors.append(message)

    async def stop(self) -> None:
        self._stop.set()
        while any(thread.is_alive() for thread in self._threads):  # they need the loop to finish
            await asyncio.sleep(0.001)


class Poller:
    """Calls the tool in a tight loop until it answers with the expected output."""

    def __init__(self, orchestrator: Orchestrator, name: str) -> None:
        self._orchestrator = orchestrator
        self.name = name
        self.calls = 0
        self.failed = 0
        self.errors: list[str] = []

    async def until(self, expected: bytes, deadline: float) -> float | None:
        reconciler = self._orchestrator.reconciler
        assert reconciler is not None
        while time.perf_counter() < deadline:
            self.calls += 1
            try:
                result = await reconciler.call_tool(self.name, TOOL, {})
            except Exception as error:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{type(error).__name__}: {error}")
            else:
                if result.output == expected:
                    return time.perf_counter()
            await asyncio.sleep(0)
        return None


async def until_watching(module: Path, poller: Poller) -> int:
    """Rewrite `module` until a change is served (the watch starts after `start()` returns);
    return the next unused constant."""
    for value in range(1, 21):
        replace_atomically(module, module_wat(f"v{value}"))
        if await poller.until(f"v{value}".encode(), time.perf_counter() + 1.0) is not None:
            return value + 1
    raise RuntimeError("the watcher never picked up a change")


async def reload_rounds(module: Path, poller: Poller, first: int, count: int) -> tuple[list[float], int]:
    """`count` reloads with constants first, first+1, ...: (seconds to serve each, missed)."""
    latencies: list[float] = []
    missed = 0
    for value in range(first, first + count):
        text = module_wat(f"v{value}")
        replace_atomically(module, text)
        replaced = time.perf_counter()
        served = await poller.until(f"v{value}".encode(), replaced + SERVE_TIMEOUT_S)
        if served is None:
            missed += 1
        else:
            latencies.append(served - replaced)
    return latencies, missed


async def bench_reload(reloads: int) -> tuple[dict[str, object], dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="orch-reload-") as tmp:
        base = Path(tmp)
        write_capsule(base / "v", "v", "v0")
        config = base / "config.yaml"
        write_config(config, ["v"], {"v": "v"})
        orchestrator = Orchestrator(config, watch=True, environ={})
        await orchestrator.start()
        poller = Poller(orchestrator, "v")
        try:
            module = base / "v" / "v.wat"
            first = await until_watching(module, poller)
            idle, idle_missed = await reload_rounds(module, poller, first, reloads)
            idle_poll = (poller.calls, poller.failed)

            callers = Callers(orchestrator, "v", asyncio.get_running_loop(), CALLER_THREADS)
            callers.start()
            try:
                loaded, loaded_missed = await reload_rounds(module, poller, first + reloads, reloads)
            finally:
                await callers.stop()
            slot = orchestrator.reconciler.slot("v") if orchestrator.reconciler else None
            reload_count = slot.reload_count if slot else 0
        finally:
            await orchestrator.stop()
    reload_report: dict[str, object] = {
        "reloads": reloads,
        "missed": idle_missed,
        "median_ms": median_ms(idle) if idle else None,
        "p95_ms": p95_ms(idle) if idle else None,
        "max_ms": round(max(idle) * 1000, 3) if idle else None,
        "poll_calls": idle_poll[0],
        "poll_failed": idle_poll[1],
        "reload_count": reload_count,
    }
    load_report: dict[str, object] = {
        "threads": CALLER_THREADS,
        "reloads": reloads,
        "missed": loaded_missed,
        "calls": callers.calls + poller.calls - idle_poll[0],
        "failed": callers.failed + poller.failed - idle_poll[1],
        "thread_calls": callers.calls,
        "thread_failed": callers.failed,
        "reload_median_ms": median_ms(loaded) if loaded else None,
        "reload_p95_ms": p95_ms(loaded) if loaded else None,
    }
    errors = callers.errors + poller.errors
    if errors:
        load_report["first_errors"] = errors[:5]
    return reload_report, load_report


# -- startup ---------------------------------------------------------------------------------
async def timed_start(config: Path) -> tuple[float, float, dict[str, int]]:
    """(seconds to start() with everything Running, seconds to stop(), module cache stats)."""
    started = time.perf_counter()
    orchestrator = Orchestrator(config, watch=False, environ={})
    try:
        await orchestrator.start()
        elapsed = time.perf_counter() - started
        assert orchestrator.reconciler is not None and orchestrator.engine is not None
        phases = {s["name"]: s["phase"] for s in orchestrator.reconciler.status()}
        not_running = {n: p for n, p in phases.items() if p != "Running"}
        if not_running:
            raise RuntimeError(f"not all capsules running after start(): {not_running}")
        first = next(iter(phases))
        result = await orchestrator.reconciler.call_tool(first, TOOL, {})
        assert result.output == f"v{first}".encode(), result.output
        stats = dict(orchestrator.engine.cache.stats)
    finally:
        stopping = time.perf_counter()
        await orchestrator.stop()
    return elapsed, time.perf_counter() - stopping, stats


async def bench_startup(count: int, rounds: int) -> dict[str, object]:
    cold, warm, stops = [], [], []
    cold_stats: dict[str, int] = {}
    warm_stats: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="orch-startup-") as tmp:
        base = Path(tmp)
        names = [f"c{i:03d}" for i in range(count)]
        for name in names:
            write_capsule(base / "caps" / name, name, f"v{name}")
        config = base / "config.yaml"
        write_config(config, names, {n: f"caps/{n}" for n in names})
        for _ in range(rounds):
            shutil.rmtree(base / ".orch", ignore_errors=True)
            seconds, stop_seconds, cold_stats = await timed_start(config)
            cold.append(seconds)
            stops.append(stop_seconds)
            seconds, stop_seconds, warm_stats = await timed_start(config)
            warm.append(seconds)
            stops.append(stop_seconds)
    return {
        "capsules": count,
        "rounds": rounds,
        "cold_s": round(statistics.median(cold), 4),
        "warm_s": round(statistics.median(warm), 4),
        "stop_s": round(statistics.median(stops), 4),
        "cold_cache": cold_stats,
        "warm_cache": warm_stats,
    }


# -- no-op reconcile ---------------------------------------------------------------------------
class FakeHandle:
    fuel_last = 0

    async def call_tool(self, tool: str, arguments: Any = None) -> Any:
        return None

    def start_interceptors(self, after_seq: int | None = None) -> None:
        pass

    async def stop_interceptors(self) -> int:
        return 0

    async def close(self) -> None:
        pass

    def observe(self, observer: Any) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {"conflicts": 0, "events_lost": 0}


class FakeLauncher:
    def __init__(self) -> None:
        self.launched = 0

    async def launch(self, spec: CapsuleSpec) -> FakeHandle:
        self.launched += 1
        return FakeHandle()


def timed(fn: Any, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


async def noop_reconcile(specs: Mapping[str, CapsuleSpec], rounds: int) -> dict[str, object]:
    """Apply `specs` to a Reconciler with a fake launcher, then time applies that change nothing."""
    bus = EventBus(history=10_000)
    launcher = FakeLauncher()
    reconciler = Reconciler(launcher=launcher, bus=bus)
    await reconciler.apply(specs)
    assert launcher.launched == len(specs) and all(s["phase"] == "Running" for s in reconciler.status())
    applies, plans = [], []
    for _ in range(max(5, rounds * 3)):
        started = time.perf_counter()
        result = await reconciler.apply(specs)
        applies.append(time.perf_counter() - started)
        assert not result.has_changes
        started = time.perf_counter()
        reconciler.plan(specs)
        plans.append(time.perf_counter() - started)
    assert launcher.launched == len(specs)
    await reconciler.shutdown()
    bus.close()
    return {"capsules": len(specs), "median_ms": median_ms(applies), "plan_median_ms": median_ms(plans)}


async def reload_among(config: Path, name: str, module: Path, reloads: int) -> dict[str, object]:
    """Reload latency of one capsule while the orchestrator runs every deployment of `config`."""
    started = time.perf_counter()
    orchestrator = Orchestrator(config, watch=True, environ={})
    await orchestrator.start()
    start_s = time.perf_counter() - started
    gc.collect()  # as `orch up` does once the first plan is applied
    gc.freeze()
    try:
        poller = Poller(orchestrator, name)
        first = await until_watching(module, poller)
        latencies, missed = await reload_rounds(module, poller, first, reloads)
    finally:
        await orchestrator.stop()
    return {
        "reloads": reloads,
        "missed": missed,
        "median_ms": median_ms(latencies) if latencies else None,
        "p95_ms": p95_ms(latencies) if latencies else None,
        "cold_start_s": round(start_s, 3),
        "failed": poller.failed,
    }


async def bench_scale(count: int, rounds: int, reloads: int) -> tuple[dict[str, object], dict[str, object]]:
    """The no-op reconcile of `count` specs (with `load_desired` timings), and a reload among
    `count` running capsules."""
    with tempfile.TemporaryDirectory(prefix="orch-scale-") as tmp:
        base = Path(tmp)
        names = [f"c{i:04d}" for i in range(count)]
        for name in names:
            write_capsule(base / "caps" / name, name, f"v{name}")
        config = base / "config.yaml"
        write_config(config, names, {n: f"caps/{n}" for n in names})
        desired = load_desired(config, environ={})
        full = timed(lambda: load_desired(config, environ={}), rounds)
        one = timed(lambda: load_desired(config, environ={}, previous=desired, only=[names[0]]), rounds)
        noop = await noop_reconcile(desired.specs, rounds)
        noop["load_desired_ms"] = median_ms(full)
        noop["load_desired_one_changed_ms"] = median_ms(one)
        among = await reload_among(config, names[0], base / "caps" / names[0] / "v.wat", reloads)
    return noop, {"capsules": count, **among}


# -- main ----------------------------------------------------------------------------------------
async def run(rounds: int, quick: bool) -> dict[str, Any]:
    reload_report, load_report = await bench_reload(10 if quick else 50)
    startup = await bench_startup(30 if quick else 100, 1 if quick else rounds)
    noop, scale = await bench_scale(200 if quick else 1000, rounds, 5 if quick else 10)
    median, p95 = reload_report["median_ms"], reload_report["p95_ms"]
    targets = {
        "reload_median_le_25ms": isinstance(median, float) and median <= 25 and reload_report["missed"] == 0,
        "reload_p95_le_50ms": isinstance(p95, float) and p95 <= 50 and reload_report["missed"] == 0,
        "no_failed_calls_while_reloading": load_report["failed"] == 0
        and load_report["missed"] == 0
        and reload_report["poll_failed"] == 0,
        "warm_startup_le_1s": float(startup["warm_s"]) <= 1.0,  # type: ignore[arg-type]
        "noop_reconcile_le_50ms": float(noop["median_ms"]) <= 50,  # type: ignore[arg-type]
    }
    return {
        "rounds": rounds,
        "quick": quick,
        "reload": reload_report,
        "under_load": load_report,
        "startup_100": startup,
        "noop_reconcile_1000": noop,
        "reload_among_1000": scale,
        "targets_met": targets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer reloads and capsules (smoke run)")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    with contextlib.redirect_stdout(sys.stderr):  # nothing but the report on stdout
        report = asyncio.run(run(rounds, args.quick))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
