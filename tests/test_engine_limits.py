"""Module limits (size, declared functions and exports, read from the section headers before
compiling) and error messages that never quote the file they refuse."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import wasmtime

from orchestrator.engine import WasmEngine
from orchestrator.engine.modulelimits import MAX_SECTIONS, ModuleLimits, module_counts
from orchestrator.errors import InvalidModule
from tests.conftest import capsule_wasm

HEADER = b"\0asm\x01\0\0\0"


def leb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def section(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + leb(len(payload)) + payload


def module(*, functions: int = 1, exports: int = 0, pad: int = 0, customs: int = 0) -> bytes:
    """A valid binary module: `functions` empty `() -> ()` functions, `exports` exports of
    them ("e0", "e1", ...), optionally `customs` empty custom sections first and a custom
    section of `pad` bytes last."""
    body = HEADER + section(0, b"\x01c") * customs
    body += section(1, leb(1) + b"\x60\x00\x00")
    body += section(3, leb(functions) + b"\x00" * functions)
    names = (f"e{i}".encode() for i in range(exports))
    body += section(
        7, leb(exports) + b"".join(leb(len(n)) + n + b"\x00" + leb(i % functions) for i, n in enumerate(names))
    )
    body += section(10, leb(functions) + b"\x02\x00\x0b" * functions)
    if pad:
        body += section(0, b"\x03pad" + b"\0" * pad)
    return body


def test_counts_are_read_from_the_headers() -> None:
    assert module_counts(module(functions=3, exports=5), name="m").functions == 3
    assert module_counts(module(functions=3, exports=5), name="m").exports == 5
    greet = capsule_wasm("greet").read_bytes()
    compiled = wasmtime.Module(wasmtime.Engine(), greet)
    counts = module_counts(greet, name="greet")
    assert counts.exports == len(compiled.exports)
    assert counts.size == len(greet)
    assert counts.functions > 0


def test_the_100k_export_module_is_refused_by_default_without_compiling(engine: WasmEngine) -> None:
    compiled = engine.cache.stats["compiled"]
    with pytest.raises(InvalidModule) as caught:
        engine.load(module(exports=100_000), name="exporter")
    message = str(caught.value)
    assert message.startswith("exporter: ")
    assert "100,000" in message and "10,000" in message
    assert "max_exports" in message and "WasmEngine(max_exports=...)" in message
    assert engine.cache.stats["compiled"] == compiled


def test_too_many_functions_are_refused(engine: WasmEngine) -> None:
    with pytest.raises(InvalidModule) as caught:
        engine.load(module(functions=60_000), name="sprawl")
    assert "defines 60,000 functions" in str(caught.value)
    assert "50,000 (max_functions)" in str(caught.value)


def test_a_declared_count_alone_is_refused(engine: WasmEngine) -> None:
    """A function section claiming 2**32 - 1 functions is refused before wasmtime reads on."""
    wasm = HEADER + section(1, leb(1) + b"\x60\x00\x00") + section(3, leb(2**32 - 1))
    with pytest.raises(InvalidModule, match="max_functions"):
        engine.load(wasm, name="liar")


def test_raised_limits_let_a_module_through() -> None:
    wasm = module(exports=12_000)
    with WasmEngine() as strict, pytest.raises(InvalidModule, match="12,000"):
        strict.load(wasm, name="wide")
    with WasmEngine(max_exports=12_000) as lenient, lenient.load(wasm, name="wide") as plugin:
        assert plugin.call("e11999") == b""
        assert plugin.has_function("e5000")


def test_limits_apply_to_webassembly_text() -> None:
    wat = "(module " + " ".join(f'(func (export "f{i}"))' for i in range(11)) + ")"
    with WasmEngine(max_functions=10) as engine, pytest.raises(InvalidModule, match="defines 11 functions"):
        engine.load(wat.encode(), name="text")
    with WasmEngine(max_exports=10) as engine, pytest.raises(InvalidModule, match="exports 11 items"):
        engine.load(wat.encode(), name="text")


def test_size_limit_is_exact() -> None:
    wasm = module(exports=1, pad=2000)
    with WasmEngine(max_module_bytes=len(wasm)) as engine, engine.load(wasm, name="fits") as plugin:
        assert plugin.call("e0") == b""
    with WasmEngine(max_module_bytes=len(wasm) - 1) as engine, pytest.raises(InvalidModule) as caught:
        engine.load(wasm, name="over")
    assert f"is {len(wasm):,} bytes, over the limit of {len(wasm) - 1:,} bytes (max_module_bytes)" in str(caught.value)


def test_an_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    huge = tmp_path / "huge.wasm"
    with huge.open("wb") as handle:
        handle.write(HEADER)
        handle.truncate(64 * 1024 * 1024)  # sparse: 64 MiB
    with WasmEngine() as engine, pytest.raises(InvalidModule) as caught:
        engine.load(huge, name="huge")
    assert "67,108,864 bytes, over the limit of 33,554,432 bytes" in str(caught.value)


def test_disk_artifacts_obey_the_limits_in_force(tmp_path: Path) -> None:
    wasm = module(exports=12_000)
    digest = hashlib.sha256(wasm).hexdigest()
    with WasmEngine(cache_dir=tmp_path, max_exports=20_000) as lenient:
        lenient.load(wasm, name="wide", digest=digest).close()
    with WasmEngine(cache_dir=tmp_path) as strict:
        with pytest.raises(InvalidModule, match="max_exports"):
            strict.load(wasm, name="wide", digest=digest)
        assert strict.cache.stats["compiled"] == 0  # refused from the record's counts


def test_a_module_with_thousands_of_sections_is_refused(engine: WasmEngine) -> None:
    with engine.load(module(customs=10, exports=1), name="few") as plugin:
        assert plugin.call("e0") == b""
    with pytest.raises(InvalidModule, match=f"more than {MAX_SECTIONS:,} sections"):
        engine.load(module(customs=MAX_SECTIONS + 1), name="layers")


@pytest.mark.parametrize(
    "wasm",
    [
        HEADER + b"\x03\xff\xff\xff\xff\x7f",  # a section size over 32 bits
        HEADER + b"\x03\x05\x80\x80",  # a count cut short
        HEADER + section(1, leb(1) + b"\x60\x00\x00") + b"\x03\x10\x01\x00",  # a section past the end
        HEADER + b"\x0b",  # a section id and nothing more
    ],
    ids=["huge-size", "cut-count", "past-end", "bare-id"],
)
def test_malformed_headers_are_left_to_wasmtime(engine: WasmEngine, wasm: bytes) -> None:
    with pytest.raises(InvalidModule, match="invalid WebAssembly module"):
        engine.load(wasm, name="bent")


@pytest.mark.parametrize("kwargs", [{"max_functions": 0}, {"max_exports": -1}, {"max_module_bytes": True}])
def test_limits_must_be_positive_integers(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ModuleLimits(**kwargs)
    with pytest.raises(ValueError):
        WasmEngine(**kwargs)  # type: ignore[arg-type]


# ---- messages never quote the file -------------------------------------------------------


def test_a_symlink_to_a_secret_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    link = tmp_path / "plugin.wasm"
    link.symlink_to(secret)
    with WasmEngine() as engine, pytest.raises(InvalidModule) as caught:
        engine.load(link, name="sneaky")
    message = str(caught.value)
    assert "not a WebAssembly module" in message
    assert "root" not in message and "bash" not in message


@pytest.mark.parametrize(
    "text",
    [
        "(hunter2 is my password)",
        '(module (func (export "f") (call $hunter2)))',
        "(module (func hunter2))",
        '(module\n  (func (export "f")\n    (i32.const hunter2)))',
    ],
)
def test_broken_webassembly_text_is_not_quoted(engine: WasmEngine, text: str) -> None:
    with pytest.raises(InvalidModule) as caught:
        engine.load(text.encode(), name="wat")
    message = str(caught.value)
    assert "hunter2" not in message and "password" not in message
    assert "line " in message and "column " in message


def test_binary_garbage_is_not_quoted(engine: WasmEngine) -> None:
    with pytest.raises(InvalidModule) as caught:
        engine.load(b"PK\x03\x04 secret archive contents", name="zip")
    assert "secret" not in str(caught.value) and "PK" not in str(caught.value)


def test_webassembly_text_may_start_with_a_comment(tmp_path: Path) -> None:
    engine = WasmEngine(cache_dir=tmp_path / "cache")
    text = b';; a module with a comment first\n(module (func (export "f") (result i32) (i32.const 7)))'
    module = engine.compile(text, name="commented.wat")
    assert [export.name for export in module.exports] == ["f"]
    with pytest.raises(InvalidModule, match="neither binary WebAssembly"):
        engine.compile(b"# not a module", name="hash.wat")
