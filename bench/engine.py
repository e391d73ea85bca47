"""Engine benchmark: prints one JSON object with figures and ratios.

    .venv/bin/python bench/engine.py [--rounds N] [--quick]

Measured in one process, interleaved round by round so both sides see the same machine
noise; every figure is the median over rounds.

- calls: per-call microseconds of our engine and of the official Extism SDK on the same
  plugin (capsules/vowels) and the same inputs (50 bytes and 64 KiB), for the streaming
  `count_vowels` and the PDK-style `count_vowels_naive`. Ratio = ours / extism (< 1 is
  faster). Targets: <= 0.5, and never > 1. `fuel_off_ratio` is the same with fuel metering
  off (which the SDK never does), to show what metering costs.
- load: loading a plugin (module already compiled in memory: kernel + plugin instance) for
  both, and instantiating one more instance of ours. Target: instantiate <= 50 us median.
- cache: compiling a generated module of >= 1 MB cold vs loading it from the warm disk
  cache (new engine, same folder) and from memory. Target: cold / warm-disk >= 100.
- fuel: a CPU-bound function with fuel metering on vs off (off is an engine option used only
  here); ratio = on / off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import extism  # noqa: E402
import wasmtime  # noqa: E402

from orchestrator.engine import WasmEngine  # noqa: E402
from orchestrator.engine.instance import Instance as _Instance  # noqa: E402

VOWELS = (ROOT / "capsules" / "vowels" / "vowels.wasm").read_bytes()
TEXT = b"The quick brown fox jumps over the lazy dog. "
INPUTS = {"50B": (TEXT * 2)[:50], "64KiB": (TEXT * 1500)[:65536]}


def per_call_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def timed_us(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def bench_calls(rounds: int, quick: bool) -> dict[str, object]:
    engine, unmetered = WasmEngine(), WasmEngine(fuel=False)
    ours = engine.load(VOWELS, name="vowels")
    ours_free = unmetered.load(VOWELS, name="vowels")
    theirs = extism.Plugin(VOWELS, wasi=False)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for function in ("count_vowels", "count_vowels_naive"):
            for label, data in INPUTS.items():
                expected = bytes(theirs.call(function, data))
                assert ours.call(function, data) == expected, (function, label)
                n = (2000 if label == "50B" else 40) // (4 if quick else 1)
                key = f"{function}/{label}"
                samples.setdefault(f"{key}/ours", []).append(per_call_us(lambda f=function, d=data: ours.call(f, d), n))
                samples.setdefault(f"{key}/extism", []).append(
                    per_call_us(lambda f=function, d=data: theirs.call(f, d), n)
                )
                samples.setdefault(f"{key}/ours_fuel_off", []).append(
                    per_call_us(lambda f=function, d=data: ours_free.call(f, d), n)
                )
    result: dict[str, object] = {}
    for function in ("count_vowels", "count_vowels_naive"):
        for label in INPUTS:
            key = f"{function}/{label}"
            mine, sdk = median(samples[f"{key}/ours"]), median(samples[f"{key}/extism"])
            free = median(samples[f"{key}/ours_fuel_off"])
            result[key] = {
                "ours_us": mine,
                "extism_us": sdk,
                "ratio": round(mine / sdk, 3),
                "ours_fuel_off_us": free,
                "fuel_off_ratio": round(free / sdk, 3),
            }
    ours.close()
    ours_free.close()
    engine.close()
    unmetered.close()
    return result


def bench_load(rounds: int) -> dict[str, object]:
    engine = WasmEngine()
    plugin = engine.load(VOWELS, name="vowels")  # compiled once; the rest is memory-cached
    ours_load, theirs_load, instantiate = [], [], []
    for _ in range(rounds):
        ours_load.append(timed_us(lambda: engine.load(VOWELS, name="vowels").close()))
        theirs_load.append(timed_us(lambda: extism.Plugin(VOWELS, wasi=False)))
        batch = []
        for _ in range(200):
            start = time.perf_counter()
            instance = _Instance(plugin)
            batch.append((time.perf_counter() - start) * 1e6)
            instance.close()
        instantiate.append(statistics.median(batch))
    plugin.close()
    engine.close()
    return {
        "ours_load_us": median(ours_load),
        "extism_load_us": median(theirs_load),
        "load_ratio": round(median(ours_load) / median(theirs_load), 3),
        "ours_instantiate_us": median(instantiate),
    }


def big_module(min_bytes: int = 1_100_000) -> bytes:
    """A valid module of at least `min_bytes`: many functions of straight-line arithmetic."""
    body = " ".join(
        f"(local.set $x (i64.add (i64.mul (local.get $x) (i64.const {i + 3})) (i64.const {i})))" for i in range(60)
    )
    functions = []
    count = 0
    while True:
        functions.append(f'(func (export "f{count}") (param $x i64) (result i64) {body} (local.get $x))')
        count += 1
        if count % 500 == 0:
            wasm = wasmtime.wat2wasm("(module " + " ".join(functions) + ")")
            if len(wasm) >= min_bytes:
                return bytes(wasm)


def bench_cache(rounds: int) -> dict[str, object]:
    wasm = big_module()
    cold, warm_disk, warm_memory = [], [], []
    for _ in range(max(2, rounds // 3)):
        with tempfile.TemporaryDirectory() as folder:
            with WasmEngine(cache_dir=Path(folder)) as first:
                cold.append(timed_us(lambda e=first: e.compile(wasm)))
                warm_memory.append(timed_us(lambda e=first: e.compile(wasm)))
            with WasmEngine(cache_dir=Path(folder)) as second:
                warm_disk.append(timed_us(lambda e=second: e.compile(wasm)))
                assert second.cache.stats["disk_hits"] >= 1
    return {
        "module_bytes": len(wasm),
        "cold_compile_ms": round(statistics.median(cold) / 1000, 2),
        "warm_disk_load_ms": round(statistics.median(warm_disk) / 1000, 3),
        "warm_memory_load_us": median(warm_memory),
        "cold_over_warm_disk": round(statistics.median(cold) / statistics.median(warm_disk), 1),
    }


SPIN = b"""(module
  (func (export "spin") (result i32) (local $i i32) (local $x i32)
    (loop $l
      (local.set $x (i32.add (i32.mul (local.get $x) (i32.const 31)) (local.get $i)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 2000000))))
    (i32.and (local.get $x) (i32.const 0))))"""


def bench_fuel(rounds: int) -> dict[str, object]:
    metered, free = WasmEngine(), WasmEngine(fuel=False)
    on_plugin, off_plugin = metered.load(SPIN), free.load(SPIN)
    on_vowels, off_vowels = metered.load(VOWELS), free.load(VOWELS)
    spin_on, spin_off, vow_on, vow_off = [], [], [], []
    for _ in range(rounds):
        spin_on.append(per_call_us(lambda: on_plugin.call("spin"), 5))
        spin_off.append(per_call_us(lambda: off_plugin.call("spin"), 5))
        vow_on.append(per_call_us(lambda: on_vowels.call("count_vowels_naive", INPUTS["64KiB"]), 20))
        vow_off.append(per_call_us(lambda: off_vowels.call("count_vowels_naive", INPUTS["64KiB"]), 20))
    for plugin in (on_plugin, off_plugin, on_vowels, off_vowels):
        plugin.close()
    metered.close()
    free.close()
    return {
        "spin_fuel_on_us": median(spin_on),
        "spin_fuel_off_us": median(spin_off),
        "spin_on_over_off": round(median(spin_on) / median(spin_off), 3),
        "vowels_naive_64KiB_fuel_on_us": median(vow_on),
        "vowels_naive_64KiB_fuel_off_us": median(vow_off),
        "vowels_naive_on_over_off": round(median(vow_on) / median(vow_off), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    report = {
        "wasmtime": wasmtime.__version__ if hasattr(wasmtime, "__version__") else "",
        "rounds": rounds,
        "calls": bench_calls(rounds, args.quick),
        "load": bench_load(rounds),
        "cache": bench_cache(rounds),
        "fuel": bench_fuel(rounds),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
