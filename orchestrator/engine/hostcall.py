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

Host functions are bound without wasmtime-py's trampoline: `binder(fn)` makes a raw
handler that unpacks the wasm values, calls the function with a `HostCall`, checks and
stores its result, and keeps any exception on the instance for the caller.

Used by orchestrator.engine.plugin (binding) and the capsule layer (the airlocks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wasmtime import Func, FuncType, Store, ValType

from . import _lowlevel
from .instance import Binder, current_instance
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


def binder(fn: HostFunction) -> Binder:
    """How to make `fn` a Func in a given store (one handler, shared by every store)."""
    handler = _host_handler(fn)
    ty = FuncType([_VALTYPES[p]() for p in fn.params], [_VALTYPES[r]() for r in fn.results])  # copied per store

    def bind(store: Store) -> Func:
        return _lowlevel.host_func(store, ty, handler)

    return bind


_VALTYPES = {"i32": ValType.i32, "i64": ValType.i64, "f32": ValType.f32, "f64": ValType.f64}


_READ = {"i32": "i32", "i64": "i64", "f32": "f32", "f64": "f64"}


def _host_handler(fn: HostFunction) -> _lowlevel.HostHandler:
    """The raw handler for `fn`: unpack the arguments, call it with a HostCall, check and
    store its result, and keep any exception on the instance for the caller."""
    callback = fn.callback
    source = f"{fn.namespace}::{fn.name}"
    check = _result_checker(fn)
    fields = [_READ[p] for p in fn.params]
    result_field = _READ[fn.results[0]] if fn.results else None

    def handle(context: Any, values: Any) -> None:
        instance = current_instance()
        try:
            args = [getattr(values[i], name) for i, name in enumerate(fields)]
            host = HostCall(
                instance.plugin.name,
                instance.function,
                instance.memory,
                functools.partial(instance.alloc_in, context),
                instance.context,
            )
            result = check(callback(host, *args))
            if result_field is not None:
                setattr(values[0], result_field, result)
        except BaseException as error:
            instance.host_error, instance.host_source = error, source
            raise

    return handle


_RANGES = {"i32": (-(2**31), 2**32 - 1), "i64": (-(2**63), 2**64 - 1)}


def _result_checker(fn: HostFunction) -> Callable[[Any], Any]:
    """Check a host function's return value before wasmtime converts it (which would wrap
    out-of-range integers silently and turn a wrong type into an anonymous error)."""
    kind = fn.results[0] if fn.results else None

    def check(value: Any) -> Any:
        if kind is None:
            if value is not None:
                raise TypeError(f"returned {value!r} but is declared with no result")
            return None
        if kind in _RANGES:
            low, high = _RANGES[kind]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise TypeError(f"returned {value!r}, not an {kind}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"returned {value!r}, not an {kind}")
        return value

    return check
