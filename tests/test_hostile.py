"""Hostile plugins: what a malicious or broken module can do to the host, and what it must not.

Threat model. A plugin is untrusted code. It may be garbage rather than wasm, import things we
do not offer, spin forever, grow its memory without bound, recurse until the stack is gone,
ask the kernel for absurd allocations, hand the kernel offsets that point anywhere (into the
kernel's own header, past the end of memory, at negative or 64-bit addresses), fill the
plugin's vars, or call for capabilities it was not granted. Host functions may themselves
fail. For every such case the engine must:

* raise the named error from `orchestrator.errors` (never a bare wasmtime, struct or
  IndexError), with a message that says what happened;
* keep the process alive and the engine usable;
* keep the *same* plugin usable: the next ordinary call succeeds, and the plugin's vars
  (which belong to the plugin, not to the discarded instance) survive the failure;
* do all of the above from several threads at once.

Every hostile module here is a few lines of WAT built by `hostile_module`, which imports the
Extism kernel functions and adds the two well-behaved exports `ok` and `echo` used to check
that a plugin still works after a failure.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.engine import HostCall, HostFunction, Limits, Plugin, WasmEngine
from orchestrator.errors import (
    CallTimeout,
    CapabilityDenied,
    CapsuleError,
    CapsuleTrap,
    FuelExhausted,
    GuestError,
    InvalidModule,
    KernelFault,
    MemoryLimitExceeded,
    UnknownFunction,
)
from tests.conftest import capsule_wasm

MIB = 1024 * 1024
GREET = capsule_wasm("greet").read_bytes()

# ---- building hostile modules ------------------------------------------------------------

KERNEL_IMPORTS = {
    "alloc": "(param i64) (result i64)",
    "free": "(param i64)",
    "length": "(param i64) (result i64)",
    "load_u8": "(param i64) (result i32)",
    "load_u64": "(param i64) (result i64)",
    "store_u8": "(param i64 i32)",
    "store_u64": "(param i64 i64)",
    "input_offset": "(result i64)",
    "input_length": "(result i64)",
    "output_set": "(param i64 i64)",
    "error_set": "(param i64)",
    "var_get": "(param i64) (result i64)",
    "var_set": "(param i64 i64)",
    "http_request": "(param i64 i64) (result i64)",
}

# Small helpers every hostile module gets, next to the `ok` and `echo` exports.
HELPERS = """
  (func $key (param $char i32) (result i64) (local $p i64)
    (local.set $p (call $alloc (i64.const 1)))
    (call $store_u8 (local.get $p) (local.get $char))
    (local.get $p))
  (func $output_block (param $p i64) (call $output_set (local.get $p) (call $length (local.get $p))))
  (func $output_u64 (param $v i64) (local $p i64)
    (local.set $p (call $alloc (i64.const 8)))
    (call $store_u64 (local.get $p) (local.get $v))
    (call $output_set (local.get $p) (i64.const 8)))
  (func $freed_block (result i64) (local $p i64)
    (local.set $p (call $alloc (i64.const 64)))
    (call $free (local.get $p))
    (local.get $p))
"""


def export(name: str, body: str, status: int | None = 0) -> str:
    """A callable export, `() -> i32` as in Extism: runs `body`, then returns `status`
    (None: `body` leaves the result itself, or never returns)."""
    tail = "" if status is None else f" (i32.const {status})"
    return f'(func (export "{name}") (result i32) {body}{tail})'


def hostile_module(*items: str, imports: str = "") -> bytes:
    """WAT for a module importing the kernel, with `ok`, `echo` and then `items`.

    `imports` is spliced in after the kernel imports (imports must precede definitions).
    """
    kernel = "\n  ".join(
        f'(import "extism:host/env" "{name}" (func ${name} {signature}))' for name, signature in KERNEL_IMPORTS.items()
    )
    body = "\n  ".join(
        (
            export("ok", ""),
            export("echo", "(call $output_set (call $input_offset) (call $input_length))"),
            *items,
        )
    )
    return f"(module\n  {kernel}\n  {imports}\n{HELPERS}\n  {body})".encode()


K = ord("k")

# One module with every misbehaviour, each behind its own export.
GROW_UNTIL_REFUSED = "(loop $more (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))"

# One module with every misbehaviour, each behind its own export.
HOSTILE = hostile_module(
    '(memory (export "memory") 1)',
    # vars: "k" := input; read "k"; "b" := 1 MiB of zeros (over the per-plugin limit)
    export("set_var", f"(call $var_set (call $key (i32.const {K})) (call $input_offset))"),
    export("get_var", f"(call $output_block (call $var_get (call $key (i32.const {K}))))"),
    export("big_var", "(call $var_set (call $key (i32.const 98)) (call $alloc (i64.const 1048576)))"),
    # a well-formed failure: the input becomes the error message
    export("guest_error", "(call $error_set (call $input_offset))", status=1),
    # time and stack
    export("spin", "(loop $forever (br $forever))"),
    '(func $recurse (export "recurse") (result i32) (call $recurse))',
    # memory: grow until refused, then trap / report the size reached (in pages)
    export("grow_bomb", f"{GROW_UNTIL_REFUSED} unreachable", status=None),
    export("grow_pages", f"{GROW_UNTIL_REFUSED} (call $output_u64 (i64.extend_i32_u (memory.size)))"),
    # kernel misuse
    export("big_output", "(call $output_set (call $alloc (i64.const 104857600)) (i64.const 104857600))"),
    export("huge_alloc_store", "(call $store_u8 (call $alloc (i64.const 1099511627776)) (i32.const 1))"),
    export("output_past_heap", "(call $output_set (i64.const 1048576) (i64.const 10))"),
    export("output_too_long", "(call $output_set (call $input_offset) (i64.const 1073741824))"),
    export("load_u64_4gib", "(drop (call $load_u64 (i64.const 4294967296)))"),
    export("load_u64_minus_1", "(drop (call $load_u64 (i64.const -1)))"),
    export("store_header", "(call $store_u8 (i64.const 8) (i32.const 0))"),
    export("error_set_mid_block", "(call $error_set (i64.add (call $alloc (i64.const 64)) (i64.const 8)))", 1),
    export("error_set_freed", "(call $error_set (call $freed_block))", status=1),
    # capabilities
    export("http", "(drop (call $http_request (i64.const 0) (i64.const 0)))"),
    export("unreachable", "unreachable", status=None),
)

# Limits small enough that every bomb goes off in milliseconds.
TIGHT = Limits(fuel=2_000_000, memory_mib=4, timeout_ms=5000)


def assert_works(plugin: Plugin, data: bytes = b"still alive") -> None:
    """The plugin answers an ordinary call correctly."""
    assert plugin.call("ok") == b""
    assert plugin.call("echo", data) == data


def assert_engine_works(engine: WasmEngine) -> None:
    """The engine still loads and runs a real capsule."""
    with engine.load(GREET, name="greet") as greet:
        assert greet.call("greet", b"Ada") == b"Hello, Ada!"


@pytest.fixture
def hostile(engine: WasmEngine) -> Iterator[Plugin]:
    with engine.load(HOSTILE, name="hostile", limits=TIGHT) as plugin:
        yield plugin


# ---- loading: not wasm, broken wasm, imports we do not offer -----------------------------

NOT_WASM = {
    "empty": b"",
    "random": random.Random(1234).randbytes(256),
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06",
    "text": b"just some notes\nnot a module\n",
    "wasm magic, garbage body": b"\0asm" + random.Random(99).randbytes(64),
    "wasm magic only": b"\0asm",
    "broken wat": b"(module (func (export",
}


@pytest.mark.parametrize("data", list(NOT_WASM.values()), ids=list(NOT_WASM))
def test_not_wasm_is_invalid_module(engine: WasmEngine, data: bytes) -> None:
    with pytest.raises(InvalidModule) as caught:
        engine.load(data, name="junk")
    message = str(caught.value)
    assert message.startswith("junk: ")
    assert "not a WebAssembly module" in message or "invalid WebAssembly module" in message
    assert_engine_works(engine)


def test_text_file_path_is_invalid_module(engine: WasmEngine, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, I am a text file\n")
    with pytest.raises(InvalidModule, match="not a WebAssembly module"):
        engine.load(notes, name="notes")
    assert_engine_works(engine)


def test_nonexistent_path_is_invalid_module(engine: WasmEngine, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "plugin.wasm"
    with pytest.raises(InvalidModule) as caught:
        engine.load(missing, name="ghost")
    assert str(missing) in str(caught.value)
    assert "No such file" in str(caught.value)
    with pytest.raises(InvalidModule):
        engine.load(str(missing), name="ghost")
    assert_engine_works(engine)


@pytest.mark.parametrize("keep", [1, 4, 9, 300, len(GREET) // 2, len(GREET) - 1])
def test_truncated_module_is_invalid_module(engine: WasmEngine, keep: int) -> None:
    with pytest.raises(InvalidModule) as caught:
        engine.load(GREET[:keep], name="cut")
    assert str(caught.value).startswith("cut: ")
    assert_engine_works(engine)


def test_truncated_module_message_says_why(engine: WasmEngine) -> None:
    with pytest.raises(InvalidModule) as caught:
        engine.load(GREET[: len(GREET) // 2], name="cut")
    assert "end-of-file" in str(caught.value)


@pytest.mark.parametrize(
    ("wat", "named"),
    [
        ('(import "extism:host/env" "launch_missiles" (func))', "extism:host/env::launch_missiles"),
        ('(import "nowhere" "thing" (func (param i32)))', "nowhere::thing"),
        ('(import "env" "memory" (memory 1))', "env::memory"),
        ('(import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))', "wasi=True"),
    ],
    ids=["unknown kernel function", "unknown module", "foreign memory", "wasi without grant"],
)
def test_unknown_import_is_named(engine: WasmEngine, wat: str, named: str) -> None:
    with pytest.raises(InvalidModule) as caught:
        engine.load(f"(module {wat})".encode(), name="greedy")
    assert named in str(caught.value)
    assert_engine_works(engine)


@pytest.mark.parametrize(
    ("wat", "named"),
    [
        ('(import "extism:host/env" "alloc" (func (param i32) (result i32)))', "extism:host/env::alloc"),
        ('(import "extism:host/env" "output_set" (func (param i64)))', "extism:host/env::output_set"),
        ('(import "extism:host/env" "input_length" (global i64))', "extism:host/env::input_length"),
    ],
    ids=["alloc i32", "output_set one param", "function as global"],
)
def test_kernel_import_with_wrong_signature(engine: WasmEngine, wat: str, named: str) -> None:
    with pytest.raises(InvalidModule) as caught:
        engine.load(f"(module {wat})".encode(), name="mistyped")
    assert named in str(caught.value)
    assert_engine_works(engine)


def test_host_function_import_with_wrong_signature(engine: WasmEngine) -> None:
    double = HostFunction("double", ["i64"], ["i64"], lambda call, x: 2 * x)
    wat = b'(module (import "extism:host/user" "double" (func (param i32) (result i32))))'
    with pytest.raises(InvalidModule) as caught:
        engine.load(wat, name="mistyped", host_functions=[double])
    assert "extism:host/user::double" in str(caught.value)
    assert_engine_works(engine)


@pytest.mark.parametrize(
    ("start", "error"),
    [("(loop $forever (br $forever))", "ran out of fuel"), ("unreachable", "unreachable")],
    ids=["spins", "traps"],
)
def test_hostile_start_function_fails_the_load(engine: WasmEngine, start: str, error: str) -> None:
    wat = f'(module (func $start {start}) (start $start) (func (export "ok") (result i32) i32.const 0))'
    with pytest.raises(InvalidModule, match=error):
        engine.load(wat.encode(), name="starter", limits=TIGHT)
    assert_engine_works(engine)


# ---- time: fuel and wall clock ----------------------------------------------------------


def test_infinite_loop_exhausts_fuel(engine: WasmEngine) -> None:
    budget = 5_000_000
    with engine.load(HOSTILE, name="spinner", limits=Limits(fuel=budget)) as plugin:
        with pytest.raises(FuelExhausted) as caught:
            plugin.call("spin")
        error = caught.value
        assert error.budget == budget
        assert error.fuel_used >= budget * 0.99
        assert plugin.last_fuel_used == error.fuel_used
        assert (error.plugin, error.function) == ("spinner", "spin")
        assert "ran out of fuel" in str(error) and f"{budget:,}" in str(error)
        assert_works(plugin)
        assert plugin.last_fuel_used < budget


def test_infinite_loop_with_huge_fuel_times_out(engine: WasmEngine) -> None:
    limits = Limits(fuel=10**15, timeout_ms=200)
    with engine.load(HOSTILE, name="sleepless", limits=limits) as plugin:
        began = time.monotonic()
        with pytest.raises(CallTimeout) as caught:
            plugin.call("spin")
        elapsed = time.monotonic() - began
        assert elapsed >= 0.15  # stopped by the deadline, not by anything earlier
        assert caught.value.timeout_ms == 200
        assert (caught.value.plugin, caught.value.function) == ("sleepless", "spin")
        assert "200 ms" in str(caught.value)
        assert_works(plugin)


# ---- memory -----------------------------------------------------------------------------


def test_memory_grow_bomb_hits_the_limit(hostile: Plugin) -> None:
    with pytest.raises(MemoryLimitExceeded) as caught:
        hostile.call("grow_bomb")
    assert caught.value.limit_mib == 4
    assert "4 MiB" in str(caught.value)
    assert caught.value.function == "grow_bomb"
    assert_works(hostile)


def test_memory_grow_stops_exactly_at_the_cap(hostile: Plugin) -> None:
    (pages,) = struct.unpack("<q", hostile.call("grow_pages"))
    assert pages * 65536 == 4 * MIB
    assert_works(hostile)


def test_unbounded_recursion_overflows_the_stack(hostile: Plugin) -> None:
    with pytest.raises(CapsuleTrap) as caught:
        hostile.call("recurse")
    assert type(caught.value) is CapsuleTrap
    assert caught.value.trap_code == "STACK_OVERFLOW"
    assert "stack" in str(caught.value)
    assert_works(hostile)


def test_stack_overflow_is_not_blamed_on_a_full_memory(engine: WasmEngine) -> None:
    wat = b'(module (memory (export "memory") 64) (func $r (export "recurse") (result i32) (call $r)))'
    with engine.load(wat, name="full", limits=TIGHT) as plugin:
        with pytest.raises(CapsuleTrap) as caught:
            plugin.call("recurse")
        assert caught.value.trap_code == "STACK_OVERFLOW"


def test_input_too_large_for_the_kernel_memory(engine: WasmEngine) -> None:
    with engine.load(HOSTILE, name="small", limits=Limits(memory_mib=1)) as plugin:
        with pytest.raises(MemoryLimitExceeded) as caught:
            plugin.call("echo", b"x" * (2 * MIB))
        assert caught.value.limit_mib == 1
        assert str(2 * MIB) in str(caught.value) and "1 MiB" in str(caught.value)
        assert_works(plugin, b"small input")


def test_table_grow_bomb_is_refused(engine: WasmEngine) -> None:
    # 16 Mi funcref slots: 128 MiB of host memory
    grow = export(
        "table_bomb",
        "(if (i32.eq (table.grow $t (ref.null func) (i32.const 16777216)) (i32.const -1)) (then unreachable))",
    )
    limits = Limits(memory_mib=4)  # default fuel: the memory limit, not fuel, must stop this
    with engine.load(hostile_module("(table $t 0 funcref)", grow), name="tables", limits=limits) as plugin:
        with pytest.raises(CapsuleError):
            plugin.call("table_bomb")
        assert_works(plugin)


# ---- kernel misuse ----------------------------------------------------------------------

KERNEL_FAULTS = {
    # export: (input, words the message must contain)
    "big_output": (b"", ["output_set", "alloc of 104857600 bytes failed"]),
    "huge_alloc_store": (b"", ["store", "offset 0", "alloc of 1099511627776 bytes failed"]),
    "output_past_heap": (b"", ["output_set(offset=1048576, length=10)"]),
    "output_too_long": (b"abc", ["output_set(offset=144, length=1073741824)"]),
    "load_u64_4gib": (b"", ["load of 8 byte(s) at offset 4294967296"]),
    "load_u64_minus_1": (b"", ["load of 8 byte(s) at offset -1"]),
    "store_header": (b"", ["store of 1 byte(s) at offset 8", "outside the kernel heap"]),
    "error_set_mid_block": (b"", ["error_set(offset=", "not an allocated kernel block"]),
    "error_set_freed": (b"", ["error_set(offset=", "not an allocated kernel block"]),
}


@pytest.mark.parametrize("function", list(KERNEL_FAULTS))
def test_kernel_misuse_is_a_kernel_fault(hostile: Plugin, function: str) -> None:
    data, words = KERNEL_FAULTS[function]
    with pytest.raises(KernelFault) as caught:
        hostile.call(function, data)
    error = caught.value
    assert (error.plugin, error.function) == ("hostile", function)
    assert error.trap_code == "UNREACHABLE"
    for word in words:
        assert word in str(error)
    assert_works(hostile)


def test_plugin_cannot_forge_the_kernel_header(engine: WasmEngine) -> None:
    forge = hostile_module(
        # output at offset 2**40 (header words 32 and 40)
        export(
            "forge_output",
            "(i64.store (i32.const 32) (i64.const 1099511627776)) (i64.store (i32.const 40) (i64.const 16))",
        ),
        # heap top and error block at 2**40 (header words 8 and 48)
        export(
            "forge_error",
            "(i64.store (i32.const 8) (i64.const 1099511627776)) (i64.store (i32.const 48) (i64.const 1099511627776))",
            status=1,
        ),
        imports='(import "extism:host/env" "memory" (memory 1))',
    )
    try:
        plugin = engine.load(forge, name="forger")
    except InvalidModule as refused:  # refusing the import is a fine fix too
        assert "memory" in str(refused)
        return
    with plugin:
        for function in ("forge_output", "forge_error"):
            with pytest.raises(CapsuleError):
                plugin.call(function)
            assert_works(plugin)


# ---- vars, capabilities, guest errors ---------------------------------------------------


def test_var_replacement_is_accounted_once(hostile: Plugin) -> None:
    # 600 KB twice under the same key is 600 KB, not 1.2 MB over the 1 MiB limit
    hostile.call("set_var", b"x" * 600_000)
    hostile.call("set_var", b"y" * 600_000)
    assert hostile.call("get_var") == b"y" * 600_000


def test_var_limit_keeps_earlier_vars(hostile: Plugin) -> None:
    hostile.call("set_var", b"precious")
    with pytest.raises(CapsuleTrap):
        hostile.call("big_var")
    assert hostile.call("get_var") == b"precious"
    assert_works(hostile)


def test_var_limit_message_names_the_limit(hostile: Plugin) -> None:
    with pytest.raises(CapsuleTrap) as caught:
        hostile.call("big_var")
    assert "limit" in str(caught.value) and str(MIB) in str(caught.value)


def test_http_request_is_capability_denied(hostile: Plugin) -> None:
    with pytest.raises(CapabilityDenied) as caught:
        hostile.call("http")
    assert "network access not granted" in str(caught.value)
    assert caught.value.capability == "net"
    assert (caught.value.plugin, caught.value.function) == ("hostile", "http")
    assert_works(hostile)


def test_guest_error_carries_the_guest_message(hostile: Plugin) -> None:
    with pytest.raises(GuestError) as caught:
        hostile.call("guest_error", b"I refuse")
    assert str(caught.value) == "I refuse"
    assert caught.value.exit_code == 1
    assert_works(hostile)


@pytest.mark.parametrize("function", ["no_such_export", "memory", "_initialize", ""])
def test_unknown_function(hostile: Plugin, function: str) -> None:
    with pytest.raises(UnknownFunction) as caught:
        hostile.call(function)
    assert repr(function) in str(caught.value)
    assert_works(hostile)


# ---- host functions that fail -----------------------------------------------------------

CALL_HOST = export("call_host", "(drop (call $explode (call $input_offset)))")
HOST_IMPORT = '(import "extism:host/user" "explode" (func $explode (param i64) (result i64)))'


def load_with_host(engine: WasmEngine, callback: Callable[..., int], **options: object) -> Plugin:
    explode = HostFunction("explode", ["i64"], ["i64"], callback)
    wat = hostile_module(CALL_HOST, imports=HOST_IMPORT)
    return engine.load(wat, name="hosted", host_functions=[explode], **options)  # type: ignore[arg-type]


def test_host_function_failure_is_a_capsule_error(engine: WasmEngine) -> None:
    def explode(call: HostCall, offset: int) -> int:
        raise ValueError("kaboom")

    with load_with_host(engine, explode) as plugin:
        with pytest.raises(CapsuleError):
            plugin.call("call_host", b"go")
        assert_works(plugin)


def test_host_function_failure_names_the_host_function(engine: WasmEngine) -> None:
    def explode(call: HostCall, offset: int) -> int:
        raise ValueError("kaboom")

    with load_with_host(engine, explode) as plugin:
        with pytest.raises(CapsuleTrap) as caught:
            plugin.call("call_host", b"go")
        message = str(caught.value)
        assert "kaboom" in message and "ValueError" in message
        assert "explode" in message
        assert caught.value.trap_code == "HOST"
        assert_works(plugin)


def test_host_function_capability_denied_reaches_the_caller(engine: WasmEngine) -> None:
    denied = CapabilityDenied("file access not granted: /etc/passwd", capability="fs", target="/etc/passwd")

    def explode(call: HostCall, offset: int) -> int:
        raise denied

    with load_with_host(engine, explode) as plugin:
        with pytest.raises(CapabilityDenied) as caught:
            plugin.call("call_host", b"go")
        assert caught.value is denied
        assert (denied.plugin, denied.function) == ("hosted", "call_host")
        assert_works(plugin)


# ---- one plugin, every failure in a row -------------------------------------------------

# (export, input, expected error). Where a host function is involved the exact type is pinned
# by the tests above; here only "some CapsuleError, and the plugin lives on" is required.
GAUNTLET: list[tuple[str, bytes, type[CapsuleError]]] = [
    ("spin", b"", FuelExhausted),
    ("recurse", b"", CapsuleTrap),
    ("grow_bomb", b"", MemoryLimitExceeded),
    ("echo", b"z" * (5 * MIB), MemoryLimitExceeded),
    ("unreachable", b"", CapsuleTrap),
    ("guest_error", b"no", GuestError),
    ("big_var", b"", CapsuleError),
    ("http", b"", CapsuleError),
    ("no_such_export", b"", UnknownFunction),
    *((function, data, KernelFault) for function, (data, _) in KERNEL_FAULTS.items()),
]


def test_every_failure_in_a_row_leaves_plugin_and_vars_intact(hostile: Plugin) -> None:
    hostile.call("set_var", b"survivor")
    for round_ in range(2):
        for function, data, expected in GAUNTLET:
            with pytest.raises(expected):
                hostile.call(function, data)
            after = f"after {function} #{round_}".encode()
            assert hostile.call("echo", after) == after, function
            assert hostile.call("get_var") == b"survivor", function


# ---- concurrency ------------------------------------------------------------------------

# Successful calls interleaved with every kind of trap that does not involve a host function.
TRAPS: list[tuple[str, type[CapsuleError]]] = [
    ("unreachable", CapsuleTrap),
    ("store_header", KernelFault),
    ("spin", FuelExhausted),
    ("recurse", CapsuleTrap),
    ("grow_bomb", MemoryLimitExceeded),
    ("guest_error", GuestError),
]


def test_threads_mixing_successes_and_traps(engine: WasmEngine) -> None:
    limits = Limits(fuel=200_000, memory_mib=4)
    unexpected: list[BaseException] = []
    lock = threading.Lock()

    def worker(plugin: Plugin, thread: int) -> int:
        successes = 0
        for i in range(200):
            if i % 2 == 0:
                data = f"thread {thread} call {i}".encode()
                assert plugin.call("echo", data) == data
                successes += 1
                continue
            function, expected = TRAPS[(i // 2 + thread) % len(TRAPS)]
            try:
                plugin.call(function, b"boom")
            except expected:
                pass
            except BaseException as error:
                with lock:
                    unexpected.append(error)
            else:
                with lock:
                    unexpected.append(AssertionError(f"{function} did not fail"))
        return successes

    with engine.load(HOSTILE, name="crowd", limits=limits, instances=2) as plugin:
        plugin.call("set_var", b"shared")
        with ThreadPoolExecutor(max_workers=4) as pool:
            done = [pool.submit(worker, plugin, thread) for thread in range(4)]
            assert [future.result() for future in done] == [100] * 4
        assert unexpected == []
        assert plugin.call("get_var") == b"shared"
        assert_works(plugin)


def test_threads_each_get_their_own_host_error(engine: WasmEngine) -> None:
    def explode(call: HostCall, offset: int) -> int:
        raise ValueError(f"kaboom for {call.read(offset).decode()}")

    def worker(plugin: Plugin, thread: int) -> None:
        for i in range(50):
            tag = f"thread {thread} call {i}"
            if i % 2:
                assert plugin.call("echo", tag.encode()) == tag.encode()
                continue
            with pytest.raises(CapsuleTrap) as caught:
                plugin.call("call_host", tag.encode())
            assert f"kaboom for {tag}" in str(caught.value)

    with load_with_host(engine, explode, instances=2) as plugin, ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(worker, plugin, thread) for thread in range(4)]:
            future.result()
