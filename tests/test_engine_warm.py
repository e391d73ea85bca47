"""Warm loads: no walk of a module's exports or imports after it is compiled, exports found
by name (`has_function`, first calls), the caller's digest trusted, and WASI output logged a
line at a time."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import wasmtime

from orchestrator import errors
from orchestrator.engine import WasmEngine
from orchestrator.engine.output import LINE_LIMIT, LineLog
from orchestrator.engine.plugin import MISSING_NAMES

SHAPES = b"""(module
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (memory (export "memory") 1)
  (global (export "g") i32 (i32.const 1))
  (table (export "t") 1 funcref)
  (global $ready (mut i32) (i32.const 0))
  (func (export "_initialize") (global.set $ready (i32.const 1)))
  (func (export "status") (result i32) (i32.sub (i32.const 1) (global.get $ready)))
  (func (export "nothing"))
  (func (export "takes") (param i32) (result i32) (local.get 0))
  (func (export "returns_i64") (result i64) (i64.const 1))
  (func (export "two") (result i32 i32) (i32.const 0) (i32.const 0)))"""

CALLABLE = ["status", "nothing"]
NOT_CALLABLE = ["takes", "returns_i64", "two", "memory", "g", "t", "_initialize", "missing", "", "\ud800", "x" * 5000]


def forbid_walks(monkeypatch: pytest.MonkeyPatch) -> None:
    def spy(self: wasmtime.Module) -> None:
        raise AssertionError("a warm load walked the module's exports or imports")

    monkeypatch.setattr(wasmtime.Module, "exports", property(spy))
    monkeypatch.setattr(wasmtime.Module, "imports", property(spy))


def test_warm_loads_never_walk_exports_or_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with WasmEngine(cache_dir=tmp_path) as cold:
        cold.load(SHAPES, name="shapes").close()  # compiled: imports read once, here
        warm_disk = WasmEngine(cache_dir=tmp_path)  # engine set-up reads its own kernel's exports
        forbid_walks(monkeypatch)
        with cold.load(SHAPES, name="shapes") as plugin:  # from memory
            assert plugin.call("status") == b""
            assert plugin.has_function("nothing")
        with warm_disk, warm_disk.load(SHAPES, name="shapes") as plugin:  # from disk
            assert warm_disk.cache.stats["disk_hits"] == 2  # the kernel and this module
            assert plugin.call("status") == b""
            assert plugin.call("nothing") == b""
            assert [plugin.has_function(n) for n in ("status", "takes")] == [True, False]


def test_exports_list_is_computed_only_when_asked() -> None:
    with WasmEngine() as engine, engine.load(SHAPES, name="shapes") as plugin:
        assert plugin.compiled._exports is None  # nothing listed by loading or calling
        plugin.call("status")
        plugin.has_function("takes")
        assert plugin.compiled._exports is None
        assert plugin.exports == tuple(CALLABLE)
        assert plugin.compiled._exports == tuple(CALLABLE)


@pytest.mark.parametrize("name", CALLABLE + NOT_CALLABLE)
def test_has_function_answers_exactly_what_call_finds(engine: WasmEngine, name: str) -> None:
    with engine.load(SHAPES, name="shapes") as plugin:
        expected = name in CALLABLE
        assert plugin.has_function(name) is expected
        assert plugin.has_function(name) is expected  # and again, from what it remembered
        if expected:
            assert plugin.call(name) == b""
        else:
            with pytest.raises(errors.UnknownFunction) as caught:
                plugin.call(name)
            assert caught.value.function == name
            assert "exported: status, nothing" in str(caught.value)


def test_has_function_remembers_answers_and_then_never_waits(engine: WasmEngine) -> None:
    """Once asked, a name is answered without an instance: even while every instance is busy."""
    with engine.load(SHAPES, name="shapes") as plugin:
        assert plugin.has_function("status") and not plugin.has_function("takes")
        busy = plugin._acquire()  # the only instance, as during a long call
        try:
            assert plugin.has_function("status") and not plugin.has_function("takes")
        finally:
            plugin._release(busy)


def test_has_function_remembers_a_bounded_number_of_absent_names(engine: WasmEngine) -> None:
    with engine.load(SHAPES, name="shapes") as plugin:
        for i in range(MISSING_NAMES + 100):
            assert not plugin.has_function(f"nope{i}")
        assert len(plugin.compiled.missing) == MISSING_NAMES


def test_has_function_on_a_closed_plugin_raises(engine: WasmEngine) -> None:
    plugin = engine.load(SHAPES, name="shapes")
    plugin.close()
    with pytest.raises(errors.PluginClosed):
        plugin.has_function("status")


def test_function_types_are_checked_once_per_module(engine: WasmEngine) -> None:
    with engine.load(SHAPES, name="a") as first, engine.load(SHAPES, name="b") as second:
        first.call("status")
        assert first.compiled is second.compiled
        assert second.compiled.kinds["status"] is True
        assert "takes" not in second.compiled.kinds  # only callable functions are remembered


def test_initialize_with_a_wrong_type_is_refused(engine: WasmEngine) -> None:
    wat = b'(module (func (export "_initialize") (param i32)) (func (export "run") (result i32) (i32.const 0)))'
    with pytest.raises(errors.InvalidModule, match="_initialize"):
        engine.load(wat, name="badinit")


def test_unknown_function_message_names_a_bounded_number_of_exports(engine: WasmEngine) -> None:
    functions = " ".join(f'(func (export "f{i}") (result i32) (i32.const 0))' for i in range(300))
    with (
        engine.load(f"(module {functions})".encode(), name="many") as plugin,
        pytest.raises(errors.UnknownFunction) as caught,
    ):
        plugin.call("nope")
    message = str(caught.value)
    assert "f0, f1" in message and "f49" in message and "f50," not in message
    assert "(250 more)" in message


def test_a_given_digest_is_trusted_and_the_file_not_read_again(tmp_path: Path) -> None:
    wasm_file = tmp_path / "shapes.wasm"
    wasm_file.write_bytes(wasmtime.wat2wasm(SHAPES.decode()))
    digest = hashlib.sha256(wasm_file.read_bytes()).hexdigest()
    with WasmEngine(cache_dir=tmp_path / "cache") as engine:
        engine.load(wasm_file, name="shapes", digest=digest).close()
        wasm_file.unlink()  # a memory hit needs neither the bytes nor a hash of them
        with engine.load(wasm_file, name="shapes", digest=digest) as plugin:
            assert plugin.call("status") == b""
    with WasmEngine(cache_dir=tmp_path / "cache") as fresh:  # nor does a disk hit
        with fresh.load(wasm_file, name="shapes", digest=digest) as plugin:
            assert plugin.call("status") == b""
        assert fresh.cache.stats["disk_hits"] == 2  # the kernel and this module
        with pytest.raises(errors.InvalidModule, match="No such file"):
            fresh.load(wasm_file, name="shapes", digest="0" * 64)  # unknown: must be read


def test_record_carries_imports_and_counts(tmp_path: Path) -> None:
    with WasmEngine(cache_dir=tmp_path) as engine:
        engine.load(SHAPES, name="shapes").close()
        key = engine.cache.key(hashlib.sha256(SHAPES).hexdigest())
    record = json.loads((tmp_path / f"{key}.json").read_text())
    [entry] = record["imports"]
    assert entry[:5] == ["extism:host/env", "output_set", True, ["i64", "i64"], []]
    assert record["counts"] == {"size": len(wasmtime.wat2wasm(SHAPES.decode())), "functions": 6, "exports": 9}


# ---- WASI output, a line at a time ---------------------------------------------------------

WRITER = b"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (memory (export "memory") 4)
  (func $emit (param $fd i32) (param $start i32) (param $end i32)
    (i32.store (i32.const 0) (local.get $start))
    (i32.store (i32.const 4) (i32.sub (local.get $end) (local.get $start)))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  ;; Input: one byte (the fd: 1 or 2), then pieces separated by NUL; one fd_write per piece.
  (func $write_all (local $n i32) (local $i i32) (local $start i32) (local $fd i32)
    (local.set $n (i32.wrap_i64 (call $input_length)))
    (block $done (loop $copy
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store8 (i32.add (i32.const 1024) (local.get $i)) (call $input_load_u8 (i64.extend_i32_u (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $copy)))
    (local.set $fd (i32.load8_u (i32.const 1024)))
    (local.set $start (i32.const 1025))
    (local.set $i (i32.const 1025))
    (block $end (loop $scan
      (br_if $end (i32.ge_u (local.get $i) (i32.add (i32.const 1024) (local.get $n))))
      (if (i32.eqz (i32.load8_u (local.get $i)))
        (then (call $emit (local.get $fd) (local.get $start) (local.get $i))
              (local.set $start (i32.add (local.get $i) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $scan)))
    (call $emit (local.get $fd) (local.get $start) (local.get $i)))
  (func (export "write") (result i32) (call $write_all) (i32.const 0))
  (func (export "write_then_trap") (result i32) (call $write_all) unreachable))"""


def lines(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == f"orchestrator.plugin.{name}"]


def test_pieces_of_a_line_make_one_record(engine: WasmEngine, caplog: pytest.LogCaptureFixture) -> None:
    panic = b"\x02" + b"\0".join([b"panic: ", b"runtime error: index out of range", b" [5] with length 3", b"\n\n"])
    panic += b"\0goroutine 1 [running]:\nmain.main()\n\t/src/main.go:7 +0x1d\n\0exit status 2"
    with engine.load(WRITER, name="gopher", wasi=True) as plugin, caplog.at_level(logging.DEBUG):
        plugin.call("write", panic)
    assert lines(caplog, "gopher") == [
        (logging.WARNING, "stderr: panic: runtime error: index out of range [5] with length 3"),
        (logging.WARNING, "stderr: goroutine 1 [running]:"),
        (logging.WARNING, "stderr: main.main()"),
        (logging.WARNING, "stderr: \t/src/main.go:7 +0x1d"),
        (logging.WARNING, "stderr: exit status 2"),  # the partial line, flushed when the call ends
    ]


def test_partial_lines_do_not_leak_into_the_next_call(engine: WasmEngine, caplog: pytest.LogCaptureFixture) -> None:
    with engine.load(WRITER, name="calls", wasi=True) as plugin, caplog.at_level(logging.INFO):
        plugin.call("write", b"\x01first, no newline")
        plugin.call("write", b"\x01second\r\n")
    assert lines(caplog, "calls") == [(logging.INFO, "stdout: first, no newline"), (logging.INFO, "stdout: second")]


def test_output_is_flushed_when_the_call_traps(engine: WasmEngine, caplog: pytest.LogCaptureFixture) -> None:
    with engine.load(WRITER, name="trapper", wasi=True) as plugin, caplog.at_level(logging.INFO):
        with pytest.raises(errors.CapsuleTrap):
            plugin.call("write_then_trap", b"\x01about to fail\0 badly")
        plugin.call("write", b"\x01after\n")
    assert lines(caplog, "trapper") == [(logging.INFO, "stdout: about to fail badly"), (logging.INFO, "stdout: after")]


def test_a_long_line_is_cut_and_the_next_one_is_whole(engine: WasmEngine, caplog: pytest.LogCaptureFixture) -> None:
    long = b"x" * (3 * LINE_LIMIT)
    with engine.load(WRITER, name="long", wasi=True) as plugin, caplog.at_level(logging.INFO):
        plugin.call("write", b"\x01" + long[:5000] + b"\0" + long[5000:] + b"\nshort\n")
    records = lines(caplog, "long")
    assert records[0] == (logging.INFO, f"stdout: {'x' * LINE_LIMIT} [line cut at {LINE_LIMIT} bytes]")
    assert records[1:] == [(logging.INFO, "stdout: short")]


def test_line_log_buffer_stays_bounded(caplog: pytest.LogCaptureFixture) -> None:
    log = LineLog(logging.getLogger("orchestrator.plugin.unit"), logging.INFO, "stdout")
    with caplog.at_level(logging.INFO):
        for _ in range(256):
            log.write(b"y" * 4096)  # 1 MiB without a newline
            assert len(log._buffer) <= LINE_LIMIT
        log.write("é\nnext".encode())
        log.flush()
        log.flush()  # nothing left: no second record
    messages = [r.getMessage() for r in caplog.records if r.name == "orchestrator.plugin.unit"]
    assert messages == [f"stdout: {'y' * LINE_LIMIT} [line cut at {LINE_LIMIT} bytes]", "stdout: next"]


def test_line_log_skips_blank_lines_and_decodes_bad_utf8(caplog: pytest.LogCaptureFixture) -> None:
    log = LineLog(logging.getLogger("orchestrator.plugin.unit2"), logging.WARNING, "stderr")
    with caplog.at_level(logging.WARNING):
        log.write(b"\n\n   \n\xff\xfe bytes\n")
    messages = [r.getMessage() for r in caplog.records if r.name == "orchestrator.plugin.unit2"]
    assert messages == ["stderr: \ufffd\ufffd bytes"]


def test_output_below_the_log_level_is_dropped(engine: WasmEngine, caplog: pytest.LogCaptureFixture) -> None:
    with engine.load(WRITER, name="quiet2", wasi=True) as plugin, caplog.at_level(logging.WARNING):
        plugin.call("write", b"\x01info line\n")
        plugin.call("write", b"\x02warning line\n")
    assert lines(caplog, "quiet2") == [(logging.WARNING, "stderr: warning line")]
