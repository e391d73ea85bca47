"""The extension point for host functions (`extism:host/user` and friends).

A `HostFunction` is a Python callable that a plugin imports by name. Its arguments and
results are wasm numbers; as in every Extism host, data travels as offsets into the kernel
memory, which the callable reads and writes through the `HostCall` it receives first:

    def shout(call: HostCall, offset: int) -> int:
        text = call.read(offset)              # the block the guest passed
        return call.write(text.upper())       # a new block; its offset goes back

    engine.load(wasm, host_functions=[HostFunction("shout", ["i64"], ["i64"], shout)])

Raising `CapsuleError` (for example `CapabilityDenied`) from a host function traps the
guest's call, and the caller of `Plugin.call` receives that very error. Any other exception
becomes a `CapsuleTrap` naming the host function.

Used by orchestrator.engine.plugin (binding) and, later, orchestrator.host (the airlocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kernel import KernelMemory

VALUE_TYPES = ("i32", "i64", "f32", "f64")
USER_NAMESPACE = "extism:host/user"


@dataclass(frozen=True)
class HostFunction:
    """A function the host offers to plugins under `namespace`/`name`."""

    name: str
    params: Sequence[str]
    results: Sequence[str]
    callback: Callable[..., Any] = field(compare=False)
    namespace: str = USER_NAMESPACE

    def __post_init__(self) -> None:
        for kind in (*self.params, *self.results):
            if kind not in VALUE_TYPES:
                raise ValueError(
                    f"host function {self.namespace}::{self.name}: value type {kind!r} "
                    f"is not one of {', '.join(VALUE_TYPES)}"
                )
        if len(self.results) > 1:
            raise ValueError(f"host function {self.namespace}::{self.name}: at most one result")
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "results", tuple(self.results))


class HostCall:
    """What a host function sees of the call it serves: the plugin, the export being run,
    and the kernel memory (read a block by offset, allocate and write a new one)."""

    __slots__ = ("_alloc", "_memory", "context", "function", "plugin")

    def __init__(
        self,
        plugin: str,
        function: str,
        memory: KernelMemory,
        alloc: Callable[[int], int],
        context: Any = None,
    ) -> None:
        self.plugin = plugin
        self.function = function
        self.context = context  # what the caller passed to Plugin.call(..., context=...)
        self._memory = memory
        self._alloc = alloc

    def length(self, offset: int) -> int | None:
        """The length of the kernel block at `offset`, None when it is not a live block."""
        return self._memory.block_length(offset)

    def read(self, offset: int) -> bytes:
        """The bytes of the kernel block at `offset` (an offset the guest passed).

        Raises ValueError when `offset` is not a live block.
        """
        data = self._memory.read_block(offset)
        if data is None:
            raise ValueError(f"offset {offset} is not an allocated kernel memory block")
        return data

    def read_range(self, offset: int, length: int) -> bytes:
        """`length` raw bytes at `offset` of the kernel memory (IndexError if outside)."""
        return self._memory.read(offset, length)

    def write(self, data: bytes) -> int:
        """Allocate a kernel block, copy `data` into it and return its offset (0 for empty
        data, as Extism does). Raises MemoryError when the kernel cannot allocate."""
        if not data:
            return 0
        offset = self._alloc(len(data))
        if offset == 0:
            raise MemoryError(f"the kernel could not allocate {len(data)} bytes (memory limit reached)")
        self._memory.write(offset, data)
        return offset
