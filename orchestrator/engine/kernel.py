"""The Python side of the Extism kernel (kernel.wat): its memory layout and bulk access.

`KernelMemory` is how Python reads and writes the kernel's linear memory: once per call to
write the input and the header, once to read the output or the error, and from host
functions to read a block the guest passed by offset. The layout constants below must match
the comment at the top of kernel.wat; tests/test_kernel.py checks them against the module.

Used by orchestrator.engine.plugin.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from importlib import resources

import wasmtime

from . import _lowlevel

# Header offsets (see kernel.wat).
HEAP_TOP = 8
INPUT_OFFSET = 16
INPUT_LENGTH = 24
OUTPUT_OFFSET = 32
OUTPUT_LENGTH = 40
ERROR_OFFSET = 48
FAULT_CODE = 56
FAULT_A = 64
FAULT_B = 72
FREE_COUNT = 80
GENERATION = 88
ALLOC_FAILED = 96
HEAP = 128
BLOCK_HEADER = 16
FIRST_DATA = HEAP + BLOCK_HEADER
PAGE = 65536

# Everything from HEAP_TOP to ALLOC_FAILED in one pack: ten i64, the generation (i32),
# padding, the failed-alloc size.
_HEADER = struct.Struct("<10qiiq")
_BLOCK = struct.Struct("<iIq")
_GENERATION = struct.Struct("<i")
_TOP = struct.Struct("<q")
_RESULT = struct.Struct("<3q")  # output offset, output length, error offset
_FAULT = struct.Struct("<3q")  # code, a, b
_GEN_MASK = 0x3FFFFFFF

FAULTS: dict[int, Callable[[int, int], str]] = {
    1: lambda a, b: f"load of {b} byte(s) at offset {a} is outside the kernel memory",
    2: lambda a, b: (
        f"store of {b} byte(s) at offset {a} is outside the kernel heap "
        "(a write through a failed alloc, which returns 0?)"
    ),
    3: lambda a, b: f"output_set(offset={a}, length={b}) does not lie inside allocated kernel memory",
    4: lambda a, b: f"error_set(offset={a}) is not an allocated kernel block",
}


def kernel_wasm() -> bytes:
    """The kernel module, assembled from kernel.wat."""
    text = resources.files(__package__).joinpath("kernel.wat").read_text(encoding="utf-8")
    return bytes(wasmtime.wat2wasm(text))


class KernelMemory:
    """Bulk access to one kernel instance's memory (one per wasmtime Store)."""

    __slots__ = ("_memory", "_store", "view")

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self._store = store
        self._memory = memory
        self.view = _lowlevel.memory_view(store, memory)

    def refresh(self) -> memoryview:
        """Re-take the view after the memory grew (the base never moves)."""
        self.view = _lowlevel.memory_view(self._store, self._memory)
        return self.view

    def ensure(self, end: int) -> memoryview:
        """A view at least `end` bytes long, growing the memory if needed.

        Raises `wasmtime.WasmtimeError` when the store's memory limit refuses the growth.
        """
        view = self.view
        if end <= len(view):
            return view
        view = self.refresh()
        if end > len(view):
            self._memory.grow(self._store, (end - len(view) + PAGE - 1) // PAGE)
            view = self.refresh()
        return view

    def begin_call(self, data: bytes) -> None:
        """Reset the allocator and place `data` as the call's input (like Extism's reset +
        alloc + input_set, without a single wasm call)."""
        n = len(data)
        gen = (_GENERATION.unpack_from(self.view, GENERATION)[0] + 1) & _GEN_MASK
        if n:
            cap = (n + 7) & ~7
            view = self.ensure(FIRST_DATA + cap)
            _HEADER.pack_into(view, HEAP_TOP, FIRST_DATA + cap, FIRST_DATA, n, 0, 0, 0, 0, 0, 0, 0, gen, 0, 0)
            _BLOCK.pack_into(view, HEAP, (gen << 1) | 1, cap, n)
            view[FIRST_DATA : FIRST_DATA + n] = data
        else:
            _HEADER.pack_into(self.view, HEAP_TOP, HEAP, 0, 0, 0, 0, 0, 0, 0, 0, 0, gen, 0, 0)

    def result(self) -> tuple[int, int, int]:
        """(output offset, output length, error offset) as the guest left them."""
        output_offset, output_length, error_offset = _RESULT.unpack_from(self.view, OUTPUT_OFFSET)
        return int(output_offset), int(output_length), int(error_offset)

    def fault(self) -> str | None:
        """The kernel's description of a misuse that made it trap, if that is what happened."""
        code, a, b = _FAULT.unpack_from(self.view, FAULT_CODE)
        describe = FAULTS.get(code)
        return describe(a, b) if describe else None

    def alloc_failed(self) -> int:
        """Size of the last allocation the kernel refused (0 if none)."""
        return int(_TOP.unpack_from(self.view, ALLOC_FAILED)[0])

    def read(self, offset: int, length: int) -> bytes:
        """Copy `length` bytes at `offset`; IndexError if outside memory."""
        if offset < 0 or length < 0:
            raise IndexError(f"negative offset or length ({offset}, {length})")
        end = offset + length
        view = self.view if end <= len(self.view) else self.refresh()
        if end > len(view):
            raise IndexError(f"range {offset}..{end} is outside the kernel memory ({len(view)} bytes)")
        return bytes(view[offset:end])

    def block_length(self, offset: int) -> int | None:
        """The length of the live block at `offset`, or None if it is not one (kernel.wat's
        `$block_of`, in Python)."""
        view = self.view
        (top,) = _TOP.unpack_from(view, HEAP_TOP)
        if offset < FIRST_DATA or offset > top or offset & 7:
            return None
        if offset > len(view):
            view = self.refresh()
        tag, cap, used = _BLOCK.unpack_from(view, offset - BLOCK_HEADER)
        (gen,) = _GENERATION.unpack_from(view, GENERATION)
        if tag != ((gen << 1) | 1) or offset + cap > top or used > cap or used < 0:
            return None
        return int(used)

    def read_block(self, offset: int) -> bytes | None:
        """The bytes of the live block at `offset`, or None if `offset` is not one."""
        length = self.block_length(offset)
        return None if length is None else self.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        """Copy `data` to `offset` (inside a block the kernel allocated)."""
        end = offset + len(data)
        view = self.ensure(end)
        view[offset:end] = data
