"""The engine API (a contract): loading, calling, fuel, vars, config, logs, host functions,
WASI, threads and the instance pool."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

import orchestrator.engine as engine_api
from orchestrator import errors
from orchestrator.engine import HostCall, HostFunction, Limits, WasmEngine
from tests.conftest import capsule_wasm

CONFORMANCE = capsule_wasm("conformance")


def test_contract_names() -> None:
    assert {"WasmEngine", "Limits", "HostFunction", "HostCall", "Plugin"} <= set(engine_api.__all__)
    for name in (
        "CapsuleError",
        "FuelExhausted",
        "CallTimeout",
        "GuestError",
        "CapsuleTrap",
        "UnknownFunction",
        "InvalidModule",
    ):
        assert issubclass(getattr(errors, name), errors.OrchestratorError)
    for name in ("FuelExhausted", "CallTimeout", "GuestError", "CapsuleTrap", "UnknownFunction"):
        assert issubclass(getattr(errors, name), errors.CapsuleError)


@pytest.mark.parametrize("source", ["bytes", "str", "path"])
def test_load_accepts_bytes_str_and_path(engine: WasmEngine, source: str) -> None:
    wasm = {"bytes": CONFORMANCE.read_bytes(), "str": str(CONFORMANCE), "path": CONFORMANCE}[source]
    with engine.load(wasm, name="c") as plugin:
        assert plugin.call("echo", b"x") == b"x"
        assert plugin.call("echo", "é") == "é".encode()


def test_limits_defaults_and_validation() -> None:
    assert Limits() == Limits(fuel=1_000_000_000, memory_mib=64, timeout_ms=5000)
    for bad in ({"fuel": 0}, {"memory_mib": 0}, {"memory_mib": 5000}, {"timeout_ms": -1}, {"fuel": 1.5}):
        with pytest.raises(ValueError, match="limits\\."):
            Limits(**bad)  # type: ignore[arg-type]


LOOP_WAT = b"""(module
  (import "extism:host/env" "input_length" (func $len (result i64)))
  (func (export "spin") (result i32) (local $i i64)
    (loop $l
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if $l (i64.lt_u (local.get $i) (call $len))))
    (i32.const 0)))"""


def test_fuel_is_measured_per_call_and_deterministic(engine: WasmEngine) -> None:
    with engine.load(LOOP_WAT) as plugin:
        plugin.call("spin", b"a" * 1000)
        small = plugin.last_fuel_used
        plugin.call("spin", b"a" * 1000)
        assert plugin.last_fuel_used == small > 1000
        _, fuel = plugin.call_metered("spin", b"a" * 1000)
        assert fuel == small
        plugin.call("spin", b"a" * 10_000)
        assert 9 * small < plugin.last_fuel_used < 11 * small


def test_fuel_grows_with_the_work(engine: WasmEngine) -> None:
    with engine.load(capsule_wasm("vowels")) as plugin:
        plugin.call("count_vowels", b"a" * 1000)
        small = plugin.last_fuel_used
        plugin.call("count_vowels", b"a" * 100_000)
        assert plugin.last_fuel_used > 10 * small > 0


def test_fuel_budget_applies_per_call(engine: WasmEngine) -> None:
    with engine.load(CONFORMANCE, limits=Limits(fuel=200_000)) as plugin:
        for _ in range(20):  # each call gets a fresh budget
            plugin.call("echo", b"x" * 100)
        with pytest.raises(errors.FuelExhausted) as caught:
            plugin.call("big_output", b"1000000")
        assert caught.value.budget == 200_000
        assert caught.value.fuel_used == 200_000 == plugin.last_fuel_used
        assert plugin.call("echo", b"still") == b"still"


def test_fuel_off_engine_reports_zero() -> None:
    with WasmEngine(fuel=False) as free, free.load(CONFORMANCE) as plugin:
        assert plugin.call("echo", b"a") == b"a"
        assert plugin.last_fuel_used == 0


def test_vars_persist_across_calls_and_traps_but_not_plugins(engine: WasmEngine) -> None:
    with engine.load(CONFORMANCE) as plugin:
        assert [plugin.call("bump") for _ in range(3)] == [b"1", b"2", b"3"]
        with pytest.raises(errors.CapsuleTrap):
            plugin.call("bump_then_trap")
        assert plugin.call("get_var", "n") == b"4"
    with engine.load(CONFORMANCE) as fresh:
        assert fresh.call("get_var", "n") == b"<unset>"


def test_config_is_the_map_given_at_load(engine: WasmEngine) -> None:
    config = {"greeting": "Grüß Gott", "empty": ""}
    with engine.load(CONFORMANCE, config=config) as plugin:
        assert plugin.call("config", "greeting") == "Grüß Gott".encode()
        assert plugin.call("config", "empty") == b"<unset>"
        assert plugin.call("config", "absent") == b"<unset>"


def test_logs_go_to_the_plugin_logger(engine: WasmEngine, caplog: pytest.LogCaptureFixture) -> None:
    with engine.load(CONFORMANCE, name="loud") as plugin, caplog.at_level(logging.DEBUG):
        plugin.call("log", "hello logs")
    records = [r for r in caplog.records if r.name == "orchestrator.plugin.loud"]
    assert [r.levelno for r in records] == [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]
    assert all(r.getMessage() == "hello logs" for r in records)


def test_logs_below_the_level_are_not_even_read(engine: WasmEngine, caplog: pytest.LogCaptureFixture) -> None:
    with engine.load(CONFORMANCE, name="quiet") as plugin, caplog.at_level(logging.WARNING):
        plugin.call("log", "x")
    assert [r.levelno for r in caplog.records if r.name == "orchestrator.plugin.quiet"] == [
        logging.WARNING,
        logging.ERROR,
    ]


SHOUT_WAT = b"""(module
  (import "extism:host/env" "input_offset" (func $input (result i64)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/user" "shout" (func $shout (param i64) (result i64)))
  (func (export "run") (result i32) (local $r i64)
    (local.set $r (call $shout (call $input)))
    (call $output_set (local.get $r) (call $length (local.get $r)))
    (i32.const 0)))"""


def test_host_function_reads_and_writes_kernel_memory(engine: WasmEngine) -> None:
    seen: list[tuple[str, str]] = []

    def shout(call: HostCall, offset: int) -> int:
        seen.append((call.plugin, call.function))
        assert call.length(offset) == len(call.read(offset))
        return call.write(call.read(offset).decode().upper().encode() + b"!")

    host = HostFunction("shout", ["i64"], ["i64"], shout)
    with engine.load(SHOUT_WAT, name="shouty", host_functions=[host]) as plugin:
        assert plugin.call("run", b"hello") == b"HELLO!"
        assert plugin.call("run", "grüße") == "GRÜSSE!".encode()
    assert seen == [("shouty", "run"), ("shouty", "run")]


def test_host_function_signature_must_match(engine: WasmEngine) -> None:
    wrong = HostFunction("shout", ["i32"], ["i64"], lambda call, x: 0)
    with pytest.raises(errors.InvalidModule, match="extism:host/user::shout"):
        engine.load(SHOUT_WAT, host_functions=[wrong])


def test_host_function_definition_is_validated() -> None:
    with pytest.raises(ValueError, match="value type"):
        HostFunction("f", ["string"], [], lambda call: None)


def test_wasi_stdout_goes_to_the_log(engine: WasmEngine, caplog: pytest.LogCaptureFixture) -> None:
    wat = b"""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 16) "from wasi\\n")
      (func (export "run") (result i32)
        (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 10))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
        (i32.const 0)))"""
    with pytest.raises(errors.InvalidModule, match="wasi=True"):
        engine.load(wat)
    with engine.load(wat, name="w", wasi=True) as plugin, caplog.at_level(logging.INFO):
        plugin.call("run")
    assert "stdout: from wasi" in caplog.text


BLOCKING_WAT = b"""(module
  (import "extism:host/user" "wait" (func $wait (result i32)))
  (func (export "run") (result i32) (drop (call $wait)) (i32.const 0)))"""


def test_instances_run_calls_in_parallel(engine: WasmEngine) -> None:
    barrier = threading.Barrier(2, timeout=10)

    def wait(call: HostCall) -> int:
        barrier.wait()  # both calls must be inside the guest at the same time
        return 0

    host = [HostFunction("wait", [], ["i32"], wait)]
    with engine.load(BLOCKING_WAT, host_functions=host, instances=2) as plugin:
        threads = [threading.Thread(target=plugin.call, args=("run",)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert not barrier.broken


def test_one_instance_serialises_calls(engine: WasmEngine) -> None:
    inside = threading.Semaphore(0)
    release = threading.Event()
    concurrent = []
    active = [0]
    lock = threading.Lock()

    def wait(call: HostCall) -> int:
        with lock:
            active[0] += 1
            concurrent.append(active[0])
        inside.release()
        release.wait(10)
        with lock:
            active[0] -= 1
        return 0

    host = [HostFunction("wait", [], ["i32"], wait)]
    with engine.load(BLOCKING_WAT, host_functions=host, instances=1) as plugin:
        threads = [threading.Thread(target=plugin.call, args=("run",)) for _ in range(3)]
        for thread in threads:
            thread.start()
        assert inside.acquire(timeout=10)
        assert not inside.acquire(timeout=0.2)  # the others queue behind the first
        release.set()
        for thread in threads:
            thread.join(10)
    assert concurrent == [1, 1, 1]


def test_many_threads_share_a_pool(engine: WasmEngine) -> None:
    results: list[bytes] = []
    with engine.load(capsule_wasm("vowels"), instances=2) as plugin:

        def work(i: int) -> None:
            for _ in range(50):
                results.append(plugin.call("count_vowels", b"ae" * i))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert sorted(results) == sorted(f'{{"count":{2 * i}}}'.encode() for i in range(6) for _ in range(50))


def test_close_refuses_new_calls(engine: WasmEngine) -> None:
    plugin = engine.load(CONFORMANCE)
    plugin.close()
    plugin.close()  # idempotent
    assert plugin.closed
    with pytest.raises(errors.PluginClosed):
        plugin.call("echo", b"x")


def test_close_lets_a_call_in_flight_finish(engine: WasmEngine) -> None:
    entered, release = threading.Event(), threading.Event()

    def wait(call: HostCall) -> int:
        entered.set()
        release.wait(10)
        return 0

    outcome: list[object] = []
    plugin = engine.load(BLOCKING_WAT, host_functions=[HostFunction("wait", [], ["i32"], wait)])
    thread = threading.Thread(target=lambda: outcome.append(plugin.call("run")))
    thread.start()
    assert entered.wait(10)
    plugin.close()
    release.set()
    thread.join(10)
    assert outcome == [b""]


def test_unknown_function_lists_exports(engine: WasmEngine) -> None:
    with engine.load(capsule_wasm("tally")) as plugin, pytest.raises(errors.UnknownFunction) as caught:
        plugin.call("memory")
    assert "add, total, clear" in str(caught.value)
    assert caught.value.function == "memory"


def test_guest_error_carries_text_and_code(engine: WasmEngine) -> None:
    with engine.load(CONFORMANCE) as plugin:
        with pytest.raises(errors.GuestError) as caught:
            plugin.call("fail", "bad input")
        assert str(caught.value) == "failed: bad input"
        assert caught.value.exit_code == 1
        with pytest.raises(errors.GuestError) as caught:
            plugin.call("exit_code", "42")
        assert caught.value.exit_code == 42 and "42" in str(caught.value)


def test_start_function_that_traps_fails_the_load(engine: WasmEngine) -> None:
    with pytest.raises(errors.InvalidModule, match="failed to start"):
        engine.load(b"(module (func $s unreachable) (start $s))")


def test_initialize_export_runs_once_per_instance(engine: WasmEngine) -> None:
    wat = b"""(module
      (import "extism:host/env" "var_get" (func $vg (param i64) (result i64)))
      (global $ready (mut i32) (i32.const 0))
      (func (export "_initialize") (global.set $ready (i32.const 1)))
      (func (export "ready") (result i32) (i32.sub (i32.const 1) (global.get $ready))))"""
    with engine.load(wat) as plugin:
        assert plugin.call("ready") == b""
        assert "_initialize" not in plugin.exports


def test_engine_timeout_resolution(tmp_path: Path) -> None:
    with WasmEngine(tick_ms=2) as fine:
        assert fine.ticks_for(10) == 6
    with pytest.raises(ValueError):
        WasmEngine(tick_ms=0)


CALL_HOST_WAT = b"""(module
  (import "extism:host/user" "host" (func $host (result i64)))
  (func (export "run") (result i32) (drop (call $host)) (i32.const 0))
  (func (export "ok") (result i32) (i32.const 0)))"""


def test_host_function_calling_back_into_its_plugin_is_refused(engine: WasmEngine) -> None:
    holder: list[engine_api.Plugin] = []

    def host(call: HostCall) -> int:
        holder[0].call("ok")  # would deadlock with one instance
        return 0

    with engine.load(CALL_HOST_WAT, host_functions=[HostFunction("host", [], ["i64"], host)]) as plugin:
        holder.append(plugin)
        with pytest.raises(errors.CapsuleError, match="called back into the plugin"):
            plugin.call("run")
        assert plugin.call("ok") == b""


def test_keyboard_interrupt_in_a_host_function_is_not_swallowed(engine: WasmEngine) -> None:
    def host(call: HostCall) -> int:
        raise KeyboardInterrupt

    with engine.load(CALL_HOST_WAT, host_functions=[HostFunction("host", [], ["i64"], host)]) as plugin:
        with pytest.raises(KeyboardInterrupt):
            plugin.call("run")
        assert plugin.call("ok") == b""


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, None, "7", 3.5, True])
def test_host_function_results_are_checked(engine: WasmEngine, value: object) -> None:
    host = HostFunction("host", [], ["i64"], lambda call: value)
    with engine.load(CALL_HOST_WAT, host_functions=[host]) as plugin:
        with pytest.raises(errors.CapsuleTrap, match=r"extism:host/user::host failed: TypeError: returned"):
            plugin.call("run")
        assert plugin.call("ok") == b""


def test_kernel_memory_cannot_be_imported(engine: WasmEngine) -> None:
    wat = b"""(module (import "extism:host/env" "memory" (memory 1))
      (func (export "run") (result i32) (i32.const 0)))"""
    with pytest.raises(errors.InvalidModule, match="extism:host/env::memory"):
        engine.load(wat)


def test_a_second_plugin_memory_is_refused(engine: WasmEngine) -> None:
    wat = b"""(module (memory 1) (memory 1) (func (export "run") (result i32) (i32.const 0)))"""
    with pytest.raises(errors.InvalidModule, match="memor"):
        engine.load(wat)
