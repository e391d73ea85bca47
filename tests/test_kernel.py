"""The Extism kernel (kernel.wat) in isolation: allocator, blocks, input, output, errors, faults.

The kernel is instantiated alone, with stub host functions, and driven through its exports,
the same calls a PDK makes. KernelMemory (the Python side) is checked against it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import wasmtime

from orchestrator.engine import kernel as layout
from orchestrator.engine.kernel import KernelMemory, kernel_wasm


class Kernel:
    """A standalone kernel instance with its exports callable as methods."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.engine = wasmtime.Engine()
        self.store = wasmtime.Store(self.engine)
        self.store.set_limits(memory_size=max_bytes)
        linker = wasmtime.Linker(self.engine)
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        stubs: dict[str, tuple[list[Any], list[Any]]] = {
            "config_get": ([i64], [i64]),
            "var_get": ([i64], [i64]),
            "var_set": ([i64, i64], []),
            "log": ([i32, i64], []),
            "get_log_level": ([], [i32]),
            "http_request": ([i64, i64], [i64]),
            "http_status_code": ([], [i32]),
            "http_headers": ([], [i64]),
        }
        for name, (params, results) in stubs.items():
            linker.define_func(
                "orch:kernel", name, wasmtime.FuncType(params, results), lambda *a: 0 if results else None
            )
        module = wasmtime.Module(self.engine, kernel_wasm())
        self.instance = linker.instantiate(self.store, module)
        self.exports = self.instance.exports(self.store)
        memory = self.exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory_obj = memory
        self.py = KernelMemory(self.store, memory)

    def __getattr__(self, name: str) -> Any:
        func = self.exports[name]
        return lambda *args: func(self.store, *args)

    def write(self, offset: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            self.store_u8(offset + i, byte)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.load_u8(offset + i) for i in range(length))


@pytest.fixture
def k() -> Iterator[Kernel]:
    yield Kernel()


def test_layout_constants_match_the_wat_comment() -> None:
    from importlib import resources

    text = resources.files("orchestrator.engine").joinpath("kernel.wat").read_text()
    documented = {int(m.group(1)) for m in re.finditer(r";;\s+(\d+)\s+i(?:32|64)", text)}
    for name in ("HEAP_TOP", "INPUT_OFFSET", "OUTPUT_OFFSET", "ERROR_OFFSET", "FAULT_CODE", "GENERATION"):
        assert getattr(layout, name) in documented, name
    assert f";;   {layout.HEAP}  heap" in text


def test_alloc_returns_aligned_distinct_blocks(k: Kernel) -> None:
    offsets = [k.alloc(n) for n in (1, 7, 8, 9, 100, 4096)]
    assert offsets[0] == layout.FIRST_DATA
    assert all(o % 8 == 0 for o in offsets)
    assert offsets == sorted(set(offsets))
    assert [k.length(o) for o in offsets] == [1, 7, 8, 9, 100, 4096]
    assert [k.length_unsafe(o) for o in offsets] == [1, 7, 8, 9, 100, 4096]


def test_alloc_zero_and_impossible_sizes_return_zero(k: Kernel) -> None:
    assert k.alloc(0) == 0
    assert k.alloc(2**40) == 0
    assert k.alloc(-1) == 0  # u64 max
    assert k.py.alloc_failed() == 2**40 or k.py.alloc_failed() == -1


def test_alloc_grows_memory_and_fails_cleanly_at_the_limit() -> None:
    k = Kernel(max_bytes=2 << 20)
    big = k.alloc(1 << 20)
    assert big != 0 and k.memory_bytes() >= (1 << 20) + layout.FIRST_DATA
    assert k.alloc(4 << 20) == 0  # over the store limit: 0, no trap
    assert k.py.alloc_failed() == 4 << 20
    assert k.alloc(16) != 0  # still usable


def test_length_of_non_blocks_is_zero(k: Kernel) -> None:
    p = k.alloc(32)
    for bogus in (0, 1, p + 1, p + 8, p - 16, layout.HEAP, 2**40, -1, k.memory_bytes()):
        assert k.length(bogus) == 0, bogus


def test_free_last_block_gives_space_back(k: Kernel) -> None:
    a = k.alloc(16)
    b = k.alloc(16)
    k.free(b)
    assert k.length(b) == 0
    assert k.alloc(16) == b
    assert k.length(a) == 16


def test_freed_middle_block_is_reused(k: Kernel) -> None:
    a = k.alloc(64)
    b = k.alloc(16)
    k.free(a)
    assert k.length(a) == 0
    again = k.alloc(40)
    assert again == a and k.length(again) == 40
    assert k.length(b) == 16
    assert k.alloc(200) > b  # too big for any freed block: bump


def test_free_of_garbage_is_ignored(k: Kernel) -> None:
    a = k.alloc(8)
    for bogus in (0, 3, 2**50, a + 8):
        k.free(bogus)
    assert k.length(a) == 8


def test_reset_forgets_blocks(k: Kernel) -> None:
    a = k.alloc(8)
    k.reset()
    assert k.length(a) == 0
    assert k.alloc(8) == a  # same place, new generation


def test_store_and_load_round_trip(k: Kernel) -> None:
    p = k.alloc(16)
    k.store_u64(p, 0x0102030405060708)
    k.write(p + 8, b"abcdefgh")
    assert k.load_u64(p) == 0x0102030405060708
    assert k.read(p, 16) == struct.pack("<Q", 0x0102030405060708) + b"abcdefgh"


@pytest.mark.parametrize(
    ("call", "args", "code"),
    [
        ("load_u8", (2**40,), 1),
        ("load_u64", (-1,), 1),
        ("load_u64", (2**32,), 1),
        ("store_u8", (0, 1), 2),
        ("store_u8", (layout.HEAP_TOP, 1), 2),
        ("store_u64", (layout.HEAP - 4, 1), 2),
        ("store_u64", (2**33, 1), 2),
        ("output_set", (layout.FIRST_DATA, 2**30), 3),
        ("output_set", (0, 5), 3),
        ("error_set", (12345,), 4),
    ],
)
def test_misuse_faults_with_a_code(k: Kernel, call: str, args: tuple[int, ...], code: int) -> None:
    with pytest.raises(wasmtime.Trap):
        getattr(k, call)(*args)
    recorded, a, b = struct.unpack_from("<3q", k.py.view, layout.FAULT_CODE)
    assert (recorded, a) == (code, args[0])
    assert k.py.fault() == layout.FAULTS[code](a, b)


def test_header_cannot_be_written_by_the_guest(k: Kernel) -> None:
    k.py.begin_call(b"input")
    for offset in range(0, layout.HEAP, 8):
        with pytest.raises(wasmtime.Trap):
            k.store_u64(offset, 0)
    assert k.input_length() == 5


def test_python_begin_call_sets_input_like_extism(k: Kernel) -> None:
    k.py.begin_call(b"hello, kernel!")
    assert k.input_length() == 14
    offset = k.input_offset()
    assert k.length(offset) == 14
    assert bytes(k.input_load_u8(i) for i in range(14)) == b"hello, kernel!"
    assert k.input_load_u64(0) == struct.unpack("<Q", b"hello, k")[0]
    # reads past the end return 0, as Extism's do
    assert k.input_load_u8(14) == 0
    assert k.input_load_u64(7) == 0
    assert k.input_load_u64(2**63) == 0
    # the input block is a normal block: allocations come after it
    assert k.alloc(4) > offset


def test_begin_call_invalidates_previous_blocks(k: Kernel) -> None:
    k.py.begin_call(b"")
    k.alloc(8)
    stale = k.alloc(8)
    k.py.begin_call(b"")
    covering = k.alloc(64)  # `stale`'s old header now lies inside this block's data
    assert covering < stale < covering + 64
    assert k.length(stale) == 0  # the generation tells a stale header from a live one
    assert k.py.block_length(stale) is None
    k.py.begin_call(b"x" * 40)
    assert k.input_length() == 40
    k.py.begin_call(b"")
    assert k.input_length() == 0 and k.input_offset() == 0


def test_output_and_error_round_trip_through_python(k: Kernel) -> None:
    k.py.begin_call(b"")
    p = k.alloc(5)
    k.write(p, b"hello")
    k.output_set(p, 5)
    e = k.alloc(4)
    k.write(e, b"oops")
    k.error_set(e)
    out_offset, out_length, error = k.py.result()
    assert (k.output_offset(), k.output_length(), k.error_get()) == (out_offset, out_length, error)
    assert k.py.read(out_offset, out_length) == b"hello"
    assert k.py.read_block(error) == b"oops"
    k.error_set(0)
    assert k.error_get() == 0


def test_output_may_be_part_of_a_block(k: Kernel) -> None:
    k.py.begin_call(b"")
    p = k.alloc(10)
    k.write(p, b"0123456789")
    k.output_set(p + 2, 3)
    offset, length, _ = k.py.result()
    assert k.py.read(offset, length) == b"234"


def test_python_block_checks_match_the_kernel(k: Kernel) -> None:
    k.py.begin_call(b"abc")
    blocks = [k.alloc(n) for n in (1, 17, 300)]
    k.free(blocks[1])
    for offset in [*blocks, 0, 1, blocks[0] + 8, 2**40, layout.FIRST_DATA]:
        expected = k.length(offset)
        got = k.py.block_length(offset)
        assert (got or 0) == expected, offset


def test_python_input_grows_kernel_memory(k: Kernel) -> None:
    data = bytes(range(256)) * 1024  # 256 KiB: beyond the first page
    k.py.begin_call(data)
    assert k.memory_bytes() >= len(data)
    assert k.input_length() == len(data)
    assert k.py.read(k.input_offset(), len(data)) == data
