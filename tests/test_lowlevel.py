"""orchestrator.engine._lowlevel against wasmtime-py's public API.

_lowlevel uses private bindings (see its docstring). Each function here is checked to agree
with the public equivalent, so a wasmtime upgrade that changes those bindings fails in this
file, with a clear name, instead of in a user's call.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest
import wasmtime

from orchestrator.engine import _lowlevel

WAT = """
(module
  (memory (export "memory") 1 4)
  (global $g (mut i32) (i32.const 0))
  (func (export "seven") (result i32) (i32.const 7))
  (func (export "count") (result i32)
    (global.set $g (i32.add (global.get $g) (i32.const 1))) (global.get $g))
  (func (export "trap") (result i32) unreachable)
  (func (export "spin") (result i32) (loop $l (br $l)) (i32.const 0))
  (func (export "grow") (result i32) (memory.grow (i32.const 1)))
  (func (export "poke") (result i32) (i32.store8 (i32.const 3) (i32.const 42)) (i32.const 0))
  (func (export "args") (param i32) (result i32) (local.get 0)))
"""


def make(fuel: bool = True) -> tuple[wasmtime.Store, wasmtime.Instance]:
    config = wasmtime.Config()
    config.consume_fuel = fuel
    config.epoch_interruption = True
    config.memory_may_move = False
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    if fuel:
        store.set_fuel(10**6)
    store.set_epoch_deadline(10**6)
    return store, wasmtime.Instance(store, wasmtime.Module(engine, WAT), [])


def func(store: wasmtime.Store, instance: wasmtime.Instance, name: str) -> wasmtime.Func:
    item = instance.exports(store)[name]
    assert isinstance(item, wasmtime.Func)
    return item


def test_wasmtime_is_the_pinned_line() -> None:
    assert version("wasmtime").split(".")[0] == "50"


def test_fast_func_agrees_with_public_call() -> None:
    store, instance = make()
    fast = _lowlevel.FastFunc(store, func(store, instance, "seven"))
    assert fast() == func(store, instance, "seven")(store) == 7
    counter = _lowlevel.FastFunc(store, func(store, instance, "count"))
    assert [counter() for _ in range(3)] == [1, 2, 3]
    assert func(store, instance, "count")(store) == 4


def test_fast_func_refuses_other_signatures() -> None:
    store, instance = make()
    with pytest.raises(TypeError):
        _lowlevel.FastFunc(store, func(store, instance, "args"))  # takes a parameter


def test_fast_func_raises_traps_with_codes_and_recovers() -> None:
    store, instance = make()
    trap = _lowlevel.FastFunc(store, func(store, instance, "trap"))
    for _ in range(2):  # the trap slot is reset after each trap
        with pytest.raises(wasmtime.Trap) as caught:
            trap()
        assert caught.value.trap_code == wasmtime.TrapCode.UNREACHABLE
    assert _lowlevel.FastFunc(store, func(store, instance, "seven"))() == 7


def test_store_handle_fuel_matches_public_api() -> None:
    store, instance = make()
    handle = _lowlevel.StoreHandle(store)
    handle.set_fuel(5000)
    assert store.get_fuel() == handle.get_fuel() == 5000
    _lowlevel.FastFunc(store, func(store, instance, "seven"))()
    assert 0 < 5000 - handle.get_fuel() == 5000 - store.get_fuel()
    handle.set_fuel(100)
    with pytest.raises(wasmtime.Trap) as caught:
        _lowlevel.FastFunc(store, func(store, instance, "spin"))()
    assert caught.value.trap_code == wasmtime.TrapCode.OUT_OF_FUEL
    assert handle.get_fuel() == 0


def test_store_handle_fuel_errors_without_fuel() -> None:
    store, _ = make(fuel=False)
    with pytest.raises(wasmtime.WasmtimeError):
        _lowlevel.StoreHandle(store).set_fuel(1)


def test_epoch_deadline_interrupts() -> None:
    store, instance = make(fuel=False)
    handle = _lowlevel.StoreHandle(store)
    handle.set_epoch_deadline(1)
    store.engine.increment_epoch()
    with pytest.raises(wasmtime.Trap) as caught:
        _lowlevel.FastFunc(store, func(store, instance, "spin"))()
    assert caught.value.trap_code == wasmtime.TrapCode.INTERRUPT


def test_memory_view_is_live_and_writable() -> None:
    store, instance = make()
    memory = instance.exports(store)["memory"]
    assert isinstance(memory, wasmtime.Memory)
    view = _lowlevel.memory_view(store, memory)
    assert len(view) == memory.data_len(store) == _lowlevel.memory_size(store, memory)
    _lowlevel.FastFunc(store, func(store, instance, "poke"))()
    assert view[3] == 42 == memory.read(store, 3, 4)[0]
    view[10:15] = b"hello"
    assert memory.read(store, 10, 15) == b"hello"


def test_memory_does_not_move_when_it_grows() -> None:
    store, instance = make()
    memory = instance.exports(store)["memory"]
    assert isinstance(memory, wasmtime.Memory)
    before = _lowlevel.memory_view(store, memory)
    before[0:4] = b"keep"
    assert _lowlevel.FastFunc(store, func(store, instance, "grow"))() == 1
    after = _lowlevel.memory_view(store, memory)
    assert len(after) == 2 * 65536 == _lowlevel.memory_size(store, memory)
    assert bytes(before[0:4]) == bytes(after[0:4]) == b"keep"
    before[0:4] = b"same"  # the old view still addresses the same bytes
    assert bytes(after[0:4]) == b"same"


def test_export_at_matches_exports_by_index() -> None:
    store, instance = make()
    exports = instance.exports(store)
    for index in range(len(exports)):
        item = _lowlevel.export_at(store, instance, index)
        assert type(item) is type(exports.by_index[index])
    with pytest.raises(IndexError):
        _lowlevel.export_at(store, instance, 99)


def test_instantiate_links_exports_of_another_instance_and_objects() -> None:
    config = wasmtime.Config()
    engine = wasmtime.Engine(config)
    store = wasmtime.Store(engine)
    provider = wasmtime.Instance(
        store, wasmtime.Module(engine, '(module (func (export "five") (result i32) (i32.const 5)))'), []
    )
    host = wasmtime.Func(store, wasmtime.FuncType([], [wasmtime.ValType.i32()]), lambda: 6)
    user = wasmtime.Module(
        engine,
        """(module
             (import "a" "five" (func $five (result i32)))
             (import "b" "six" (func $six (result i32)))
             (func (export "sum") (result i32) (i32.add (call $five) (call $six))))""",
    )
    instance = _lowlevel.instantiate(store, user, provider, [0, host])
    assert func(store, instance, "sum")(store) == 11
    with pytest.raises(wasmtime.WasmtimeError):
        _lowlevel.instantiate(store, user, provider, [7, host])


def test_instantiate_reports_start_traps() -> None:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module(engine, "(module (func $s unreachable) (start $s))")
    empty = wasmtime.Instance(store, wasmtime.Module(engine, "(module)"), [])
    with pytest.raises(wasmtime.Trap):
        _lowlevel.instantiate(store, module, empty, [])


def test_instantiate_pre_matches_public_instantiate() -> None:
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_func("host", "six", wasmtime.FuncType([], [wasmtime.ValType.i32()]), lambda: 6)
    module = wasmtime.Module(
        engine,
        '(module (import "host" "six" (func $six (result i32))) (func (export "f") (result i32) (call $six)))',
    )
    pre = linker.instantiate_pre(module)
    store = wasmtime.Store(engine)
    fast = _lowlevel.instantiate_pre(store, pre)
    public = pre.instantiate(store)
    assert func(store, fast, "f")(store) == func(store, public, "f")(store) == 6
    trapping = linker.instantiate_pre(wasmtime.Module(engine, "(module (func $s unreachable) (start $s))"))
    with pytest.raises(wasmtime.Trap):
        _lowlevel.instantiate_pre(store, trapping)


def test_host_func_passes_raw_values_and_traps_on_exceptions() -> None:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    i64 = wasmtime.ValType.i64()
    seen: list[int] = []

    def double(context: object, values: object) -> None:
        seen.append(values[0].i64)  # type: ignore[index]
        if values[0].i64 < 0:  # type: ignore[index]
            raise ValueError("negative")
        values[0].i64 = values[0].i64 * 2  # type: ignore[index]

    host = _lowlevel.host_func(store, wasmtime.FuncType([i64], [i64]), double)
    module = wasmtime.Module(
        engine,
        '(module (import "h" "double" (func $d (param i64) (result i64)))'
        ' (func (export "f") (param i64) (result i64) (call $d (local.get 0))))',
    )
    instance = wasmtime.Instance(store, module, [host])
    f = instance.exports(store)["f"]
    assert isinstance(f, wasmtime.Func)
    assert f(store, 21) == 42
    assert f(store, 2**40) == 2**41
    with pytest.raises((wasmtime.Trap, wasmtime.WasmtimeError), match="host function failed: ValueError"):
        f(store, -1)
    assert seen == [21, 2**40, -1]
    before = len(_lowlevel._handlers)
    del instance, f, host
    store.close()  # dropping the store releases the handler
    assert len(_lowlevel._handlers) == before - 1


def test_fast_call_i64_from_a_store_context() -> None:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module(
        engine, '(module (func (export "inc") (param i64) (result i64) (i64.add (local.get 0) (i64.const 1))))'
    )
    inc = wasmtime.Instance(store, module, []).exports(store)["inc"]
    assert isinstance(inc, wasmtime.Func)
    assert _lowlevel.FastCallI64(inc)(store._context(), 41) == 42


def test_export_get_matches_exports_by_name() -> None:
    store, instance = make()
    exports = instance.exports(store)
    for name in ("memory", "seven", "args"):
        item = _lowlevel.export_get(store, instance, name)
        assert type(item) is type(exports[name])
    seven = _lowlevel.export_get(store, instance, "seven")
    assert isinstance(seven, wasmtime.Func)
    assert seven(store) == 7
    for missing in ("nope", "", "\ud800", "seven\0"):
        assert _lowlevel.export_get(store, instance, missing) is None


def test_instantiate_takes_imports_from_a_linker() -> None:
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    user = wasmtime.Module(
        engine,
        """(module
             (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "fill") (result i32) (call $random (i32.const 0) (i32.const 16))))""",
    )
    empty = wasmtime.Instance(store, wasmtime.Module(engine, "(module)"), [])
    wasi = b"wasi_snapshot_preview1"
    fast = _lowlevel.instantiate(store, user, empty, [_lowlevel.FromLinker(linker, wasi, b"random_get")])
    public = wasmtime.Instance(store, user, [linker.get(store, wasi.decode(), "random_get")])
    assert func(store, fast, "fill")(store) == func(store, public, "fill")(store) == 0
    memory = fast.exports(store)["memory"]
    assert isinstance(memory, wasmtime.Memory)
    assert memory.read(store, 0, 16) != bytes(16)  # random bytes were written
    with pytest.raises(wasmtime.WasmtimeError, match="defines no"):
        _lowlevel.instantiate(store, user, empty, [_lowlevel.FromLinker(linker, wasi, b"no_such")])
