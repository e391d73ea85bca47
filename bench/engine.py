"""Engine benchmark: prints one JSON object with figures and ratios.

    .venv/bin/python bench/engine.py [--rounds N] [--quick]

Measured in one process, interleaved round by round so both sides see the same machine
noise; every figure is the median over rounds.

- calls: per-call microseconds of our engine and of the official Extism SDK on the same
  plugin (capsules/vowels) and the same inputs (50 bytes and 64 KiB), for the streaming
  `count_vowels` and the PDK-style `count_vowels_naive`. Ratio = ours / extism (< 1 is
  faster). Targets: <= 0.5, and never > 1. `fuel_off_ratio` is the same with fuel metering
  off (which the SDK never does), to show what metering costs.
- load: loading a plugin whose module is already compiled, for both runtimes, on
  capsules/vowels (small) and on a generated PDK-like plugin of >= 1.5 MB (`pdk_plugin`:
  3,000+ functions, a 400 KB data segment, a table, WASI and Extism kernel imports, the
  exports `memory`, `_initialize`, `run`, `hello`, `say`; both runtimes load it and agree on
  its output). Ours: `WasmEngine.load(..., digest=...)` from the in-memory cache, and from
  the disk cache (memory layer dropped). Theirs: `extism.Plugin(CompiledPlugin)`. Only the
  creation is timed (each plugin is closed or dropped outside the timing). Targets:
  pdk `memory_ratio` (ours / theirs) <= 1; `ours_instantiate_us` (one more instance of the
  small plugin) <= 100 us.
- cache: compiling a generated module of >= 1 MB with 16,000 exported functions (the
  engine's `max_exports` raised for it) cold vs loading it from the warm disk cache (new
  engine, same folder) and from memory. Target: cold / warm-disk >= 100.
- fuel: a CPU-bound function with fuel metering on vs off (off is an engine option used only
  here); ratio = on / off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import extism  # noqa: E402
import wasmtime  # noqa: E402
from extism.extism import CompiledPlugin  # noqa: E402

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
    vowels_digest = hashlib.sha256(VOWELS).hexdigest()
    compiled_vowels = CompiledPlugin(VOWELS, wasi=False)
    ours_load, theirs_load, instantiate = [], [], []
    for _ in range(rounds):
        ours_load.append(median_of(lambda: engine.load(VOWELS, name="vowels", digest=vowels_digest), 100))
        theirs_load.append(median_of(lambda: extism.Plugin(compiled_vowels), 100))
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
        "vowels": {
            "module_bytes": len(VOWELS),
            "ours_memory_load_us": median(ours_load),
            "extism_compiled_load_us": median(theirs_load),
            "memory_ratio": round(median(ours_load) / median(theirs_load), 3),
        },
        "ours_instantiate_us": median(instantiate),
        "pdk": bench_pdk_load(rounds),
    }


def median_of(create: Callable[[], object], n: int) -> float:
    """Median microseconds of `create()`, each result closed (or dropped) untimed."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        made = create()
        times.append((time.perf_counter() - start) * 1e6)
        close = getattr(made, "close", None)
        if close is not None:
            close()
        del made
    return statistics.median(times)


def bench_pdk_load(rounds: int) -> dict[str, object]:
    wasm, functions = pdk_plugin()
    digest = hashlib.sha256(wasm).hexdigest()
    compiled = CompiledPlugin(wasm, wasi=True)
    with tempfile.TemporaryDirectory() as folder, WasmEngine(cache_dir=Path(folder)) as engine:
        ours = engine.load(wasm, name="pdk", wasi=True, digest=digest)
        theirs = extism.Plugin(compiled)
        for data in (b"", b"hello world", bytes(range(256))):  # both runtimes agree
            assert ours.call("run", data) == bytes(theirs.call("run", data)), data
        assert ours.call("hello") == bytes(theirs.call("hello", b"")) == b"hi"
        assert ours.has_function("run") and not ours.has_function("memory")
        ours.close()
        del theirs
        memory, disk, sdk = [], [], []
        for _ in range(rounds):
            memory.append(median_of(lambda: engine.load(wasm, name="pdk", wasi=True, digest=digest), 100))
            sdk.append(median_of(lambda: extism.Plugin(compiled), 100))
            disk_times = []
            for _ in range(20):
                engine.cache.forget_memory()
                start = time.perf_counter()
                plugin = engine.load(wasm, name="pdk", wasi=True, digest=digest)
                disk_times.append((time.perf_counter() - start) * 1e6)
                plugin.close()
            disk.append(statistics.median(disk_times))
        assert engine.cache.stats["disk_hits"] >= 20 * rounds
    return {
        "module_bytes": len(wasm),
        "functions": functions,
        "ours_memory_load_us": median(memory),
        "ours_disk_load_us": median(disk),
        "extism_compiled_load_us": median(sdk),
        "memory_ratio": round(median(memory) / median(sdk), 3),
        "disk_ratio": round(median(disk) / median(sdk), 3),
    }


WASI_IMPORTS = (
    ("fd_write", "(param i32 i32 i32 i32) (result i32)"),
    ("fd_close", "(param i32) (result i32)"),
    ("fd_seek", "(param i32 i64 i32 i32) (result i32)"),
    ("fd_fdstat_get", "(param i32 i32) (result i32)"),
    ("environ_get", "(param i32 i32) (result i32)"),
    ("environ_sizes_get", "(param i32 i32) (result i32)"),
    ("args_get", "(param i32 i32) (result i32)"),
    ("args_sizes_get", "(param i32 i32) (result i32)"),
    ("clock_time_get", "(param i32 i64 i32) (result i32)"),
    ("random_get", "(param i32 i32) (result i32)"),
    ("proc_exit", "(param i32)"),
    ("sched_yield", "(result i32)"),
)
KERNEL_IMPORTS = (
    ("input_length", "(result i64)"),
    ("input_load_u8", "(param i64) (result i32)"),
    ("input_load_u64", "(param i64) (result i64)"),
    ("alloc", "(param i64) (result i64)"),
    ("free", "(param i64)"),
    ("length", "(param i64) (result i64)"),
    ("load_u8", "(param i64) (result i32)"),
    ("load_u64", "(param i64) (result i64)"),
    ("store_u8", "(param i64 i32)"),
    ("store_u64", "(param i64 i64)"),
    ("output_set", "(param i64 i64)"),
    ("error_set", "(param i64)"),
    ("config_get", "(param i64) (result i64)"),
    ("var_get", "(param i64) (result i64)"),
    ("var_set", "(param i64 i64)"),
    ("log_info", "(param i64)"),
)
DATA_BASE = 1 << 20


def pdk_plugin(min_bytes: int = 1_600_000, data_bytes: int = 400_000, seed: int = 7) -> tuple[bytes, int]:
    """A valid Extism plugin shaped like a Rust or Go PDK build: thousands of internal
    functions (arithmetic, branches, loads from the data segment, short call chains), all
    in a table for `call_indirect`, a data segment of text, WASI and kernel imports, and a
    handful of exports. `run` folds its input through the table into 8 output bytes.
    Returns (wasm, number of functions)."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 12))) for _ in range(500)]
    data = bytearray()
    while len(data) < data_bytes:
        data += rng.choice(words) + b" "
    escaped = "".join(f"\\{b:02x}" for b in data[:data_bytes])
    mask = (1 << (data_bytes.bit_length() - 1)) - 8
    pages = (DATA_BASE + data_bytes) // 65536 + 2
    head = [f'(import "wasi_snapshot_preview1" "{n}" (func ${n} {t}))' for n, t in WASI_IMPORTS]
    head += [f'(import "extism:host/env" "{n}" (func ${n} {t}))' for n, t in KERNEL_IMPORTS]
    head += [
        f'(memory (export "memory") {pages})',
        f"(global $sp (mut i32) (i32.const {DATA_BASE}))",
        f'(data (i32.const {DATA_BASE}) "{escaped}")',
        "(type $t (func (param i64) (result i64)))",
    ]

    def function(i: int) -> str:
        parts = [f"(local.set $y (i64.xor (local.get $x) (i64.const {rng.getrandbits(62)})))"]
        for _ in range(6):
            parts.append(
                f"(local.set $k (i32.and (i32.wrap_i64 (local.get $y)) (i32.const {mask})))"
                f"(local.set $y (i64.add (local.get $y) (i64.load (i32.add (i32.const {DATA_BASE}) (local.get $k)))))"
                f"(if (i64.lt_u (local.get $y) (i64.const {rng.getrandbits(63)}))"
                f" (then (local.set $y (i64.mul (local.get $y) (i64.const {rng.getrandbits(31) | 1}))))"
                f" (else (local.set $y (i64.rotl (local.get $y) (i64.const {rng.randint(1, 63)})))))"
            )
        tail = (
            "(local.get $y)"
            if i % 8 == 0
            else f"(i64.add (local.get $y) (call $f{i - 1} (i64.shr_u (local.get $x) (i64.const 3))))"
        )
        return (
            f"(func $f{i} (type $t) (param $x i64) (result i64) (local $y i64) (local $k i32) {' '.join(parts)} {tail})"
        )

    def assemble(functions: list[str]) -> bytes:
        n = len(functions)
        table = f"(table {n} funcref) (elem (i32.const 0) func {' '.join(f'$f{i}' for i in range(n))})"
        exports = f"""
(func (export "_initialize") (global.set $sp (i32.const {DATA_BASE})))
(func (export "run") (result i32) (local $i i64) (local $n i64) (local $acc i64) (local $out i64)
  (local.set $n (call $input_length))
  (block $done (loop $l
    (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
    (local.set $acc (i64.add (local.get $acc)
      (call_indirect (type $t)
        (i64.add (local.get $acc) (i64.extend_i32_u (call $input_load_u8 (local.get $i))))
        (i32.rem_u (i32.mul (call $input_load_u8 (local.get $i)) (i32.add (i32.wrap_i64 (local.get $i)) (i32.const 31)))
                   (i32.const {n})))))
    (local.set $i (i64.add (local.get $i) (i64.const 1)))
    (br $l)))
  (local.set $out (call $alloc (i64.const 8)))
  (call $store_u64 (local.get $out) (local.get $acc))
  (call $output_set (local.get $out) (i64.const 8))
  (i32.const 0))
(func (export "hello") (result i32) (local $out i64)
  (local.set $out (call $alloc (i64.const 2)))
  (call $store_u8 (local.get $out) (i32.const 104))
  (call $store_u8 (i64.add (local.get $out) (i64.const 1)) (i32.const 105))
  (call $output_set (local.get $out) (i64.const 2)) (i32.const 0))
(func (export "say") (result i32)
  (i32.store (i32.const 64) (i32.const {DATA_BASE})) (i32.store (i32.const 68) (i32.const 40))
  (drop (call $fd_write (i32.const 1) (i32.const 64) (i32.const 1) (i32.const 72))) (i32.const 0))"""
        return bytes(wasmtime.wat2wasm("(module " + " ".join(head + functions) + table + exports + ")"))

    functions = [function(i) for i in range(250)]
    wasm = assemble(functions)
    while len(wasm) < min_bytes:  # grow by the estimated shortfall, plus a margin
        per_function = max(1, (len(wasm) - data_bytes) // len(functions))
        functions += [function(len(functions) + i) for i in range((min_bytes - len(wasm)) // per_function + 50)]
        wasm = assemble(functions)
    return wasm, len(functions)


def many_exports_module(exports: int = 16_000, min_bytes: int = 1_100_000) -> bytes:
    """A valid module of at least `min_bytes` with `exports` exported functions."""
    steps = max(1, min_bytes // exports // 5)
    while True:
        body = "(local.get $x)" + "".join(f" (i64.const {i + 1000}) i64.add" for i in range(steps))
        functions = [
            f'(func (export "f{i}") (param $x i64) (result i64) {body} (i64.const {i}) i64.xor)' for i in range(exports)
        ]
        wasm = bytes(wasmtime.wat2wasm("(module " + " ".join(functions) + ")"))
        if len(wasm) >= min_bytes:
            return wasm
        steps = steps * min_bytes // len(wasm) + 1


def bench_cache(rounds: int) -> dict[str, object]:
    wasm = many_exports_module()
    digest = hashlib.sha256(wasm).hexdigest()
    raised = {"max_exports": 20_000}
    cold, warm_disk, warm_memory, disk_plugin = [], [], [], []
    for _ in range(max(2, rounds // 3)):
        with tempfile.TemporaryDirectory() as folder:
            with WasmEngine(cache_dir=Path(folder), **raised) as first:
                cold.append(timed_us(lambda e=first: e.compile(wasm, digest=digest)))
                warm_memory.append(timed_us(lambda e=first: e.compile(wasm, digest=digest)))
            with WasmEngine(cache_dir=Path(folder), **raised) as second:
                warm_disk.append(timed_us(lambda e=second: e.compile(wasm, digest=digest)))
                assert second.cache.stats["disk_hits"] >= 1
                second.cache.forget_memory()
                start = time.perf_counter()
                plugin = second.load(wasm, name="exports", digest=digest)
                disk_plugin.append((time.perf_counter() - start) * 1e6)
                plugin.close()
    return {
        "module_bytes": len(wasm),
        "exports": 16_000,
        "cold_compile_ms": round(statistics.median(cold) / 1000, 2),
        "warm_disk_load_ms": round(statistics.median(warm_disk) / 1000, 3),
        "warm_disk_plugin_load_ms": round(statistics.median(disk_plugin) / 1000, 3),
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
        "wasmtime": version("wasmtime"),
        "extism": version("extism"),
        "rounds": rounds,
        "calls": bench_calls(rounds, args.quick),
        "load": bench_load(rounds),
        "cache": bench_cache(rounds),
        "fuel": bench_fuel(rounds),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
