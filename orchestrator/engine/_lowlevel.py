"""The one place that uses wasmtime-py's private, low-level bindings.

The public wasmtime-py API costs 6-18 us per `Func.__call__` and about 2 us per
`Memory.read`/`write`. The per-call budget of a plugin call is a few microseconds, so the
hot path (arm fuel and the epoch deadline, call the export, read the fuel left, view the
kernel memory) goes through the ctypes bindings underneath: `wasmtime._bindings` and
`wasmtime._ffi`. Those are not a stable API, which is why wasmtime is pinned to the 50.x
line in pyproject.toml and why tests/test_lowlevel.py checks every function here against
the public API: a wasmtime upgrade that changes them fails that test, not a user's call.

Used only inside orchestrator.engine (instance, kernel, hostcall).
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import wasmtime
from wasmtime import Func, FuncType, Instance, InstancePre, Linker, Memory, Module, Store, Trap, WasmtimeError
from wasmtime import _bindings as bindings  # private: see the module docstring
from wasmtime import _func as func_module
from wasmtime._extern import get_extern_ptr, wrap_extern

_call_unchecked = bindings._wasmtime_func_call_unchecked
_set_fuel = bindings._wasmtime_context_set_fuel
_get_fuel = bindings._wasmtime_context_get_fuel
_set_epoch_deadline = bindings._wasmtime_context_set_epoch_deadline
_memory_data = bindings._wasmtime_memory_data
_memory_data_size = bindings._wasmtime_memory_data_size
_export_nth = bindings._wasmtime_instance_export_nth
# The same C function with the result slot typed as a plain address, so a slot of an
# extern array is passed without building a ctypes pointer object per import.
_export_nth_into = bindings.dll["wasmtime_instance_export_nth"]  # type: ignore[attr-defined]
_export_nth_into.restype = ctypes.c_bool
_export_nth_into.argtypes = [
    ctypes.POINTER(bindings.wasmtime_context_t),
    ctypes.POINTER(bindings.wasmtime_instance_t),
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.POINTER(ctypes.c_char)),
    ctypes.POINTER(ctypes.c_size_t),
    ctypes.c_void_p,
]
_export_get = bindings._wasmtime_instance_export_get
# wasmtime_linker_get with the result slot typed as a plain address (see _export_nth_into).
_linker_get_into = bindings.dll["wasmtime_linker_get"]  # type: ignore[attr-defined]
_linker_get_into.restype = ctypes.c_bool
_linker_get_into.argtypes = [
    ctypes.POINTER(bindings.wasmtime_linker_t),
    ctypes.POINTER(bindings.wasmtime_context_t),
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
]
_instance_new = bindings._wasmtime_instance_new
_instance_pre_instantiate = bindings._wasmtime_instance_pre_instantiate
_TrapPtr = ctypes.POINTER(bindings.wasm_trap_t)


def _raise_for(error: Any, trap: Any) -> None:
    """Raise what a raw call reported: a WasmtimeError (an error pointer) or a Trap (the trap
    pointer, whose ownership passes to the Trap object)."""
    if error:
        clear_host_exception()
        raise WasmtimeError._from_ptr(error)
    if trap:
        clear_host_exception()
        raise Trap._from_ptr(trap)


def clear_host_exception() -> None:
    """Forget the exception wasmtime-py parks globally when a host function raises.

    wasmtime-py stores it in a module global and re-raises it on the next call that traps,
    from whichever thread. Our host functions record their own exceptions per thread, so the
    global is cleared after every trap to keep one thread's error out of another's call.
    """
    func_module.LAST_EXCEPTION = None


class StoreHandle:
    """Fast access to one Store's context: fuel, epoch deadline."""

    __slots__ = ("_ctx", "_remaining", "_remaining_ref")

    def __init__(self, store: Store) -> None:
        self._ctx = store._context()
        self._remaining = ctypes.c_uint64(0)
        self._remaining_ref = ctypes.byref(self._remaining)

    @property
    def context(self) -> Any:
        return self._ctx

    def set_fuel(self, fuel: int) -> None:
        error = _set_fuel(self._ctx, fuel)
        if error:
            raise WasmtimeError._from_ptr(error)

    def get_fuel(self) -> int:
        error = _get_fuel(self._ctx, self._remaining_ref)
        if error:
            raise WasmtimeError._from_ptr(error)
        return self._remaining.value

    def set_epoch_deadline(self, ticks: int) -> None:
        _set_epoch_deadline(self._ctx, ticks)


class FastFunc:
    """A `() -> i32` or `() -> ()` export called through `wasmtime_func_call_unchecked` (~1 us).

    `returns_i32` says which, when the caller already knows the type; None inspects it.
    """

    __slots__ = ("_ctx", "_func", "_func_ref", "_returns", "_trap", "_trap_ref", "_vals")

    def __init__(self, store: Store, func: Func, *, returns_i32: bool | None = None) -> None:
        if returns_i32 is None:
            ty = func.type(store)
            results = [str(r) for r in ty.results]
            if ty.params or results not in ([], ["i32"]):
                raise TypeError("expected a () -> i32 or () -> () function")
            returns_i32 = bool(results)
        self._returns = returns_i32
        self._ctx = store._context()
        self._func = func._func
        self._func_ref = ctypes.byref(self._func)
        self._vals = (bindings.wasmtime_val_raw_t * 1)()
        self._trap = _TrapPtr()
        self._trap_ref = ctypes.byref(self._trap)

    def __call__(self) -> int:
        """Run it. Returns the i32 result (0 for a function without one); raises `Trap` or
        `WasmtimeError`."""
        error = _call_unchecked(self._ctx, self._func_ref, self._vals, 1, self._trap_ref)
        if error:
            clear_host_exception()
            raise WasmtimeError._from_ptr(error)
        if self._trap:
            trap = Trap._from_ptr(self._trap)  # takes ownership of the pointer
            self._trap = _TrapPtr()
            self._trap_ref = ctypes.byref(self._trap)
            clear_host_exception()
            raise trap
        return int(self._vals[0].i32) if self._returns else 0


# -- host functions without wasmtime-py's trampoline ----------------------------------------
# wasmtime-py wraps every host call in a Caller object and converts each argument and
# result through `Val` (~6 us per call). Host functions created here get the raw values:
# `handler(context, values)` reads its i32/i64 arguments from `values[i]` and writes its
# result to `values[0]`; `context` is the calling store's context (for calling back into
# the kernel). An exception becomes a trap carrying its message.
HostHandler = Callable[[Any, Any], None]
_handlers: dict[int, HostHandler] = {}
_handler_ids = itertools.count(1)
_caller_context = bindings._wasmtime_caller_context
_trap_new = bindings._wasmtime_trap_new
_func_new_unchecked = bindings._wasmtime_func_new_unchecked


@bindings.wasmtime_func_unchecked_callback_t  # type: ignore[untyped-decorator]
def _dispatch(env: int | None, caller: Any, values: Any, count: int) -> int:
    try:
        _handlers[env or 0](_caller_context(caller), values)
        return 0
    except BaseException as error:  # reported to the guest as a trap; the caller keeps the error
        message = f"host function failed: {type(error).__name__}".encode()
        trap = _trap_new(ctypes.create_string_buffer(message), len(message))
        return int(ctypes.cast(trap, ctypes.c_void_p).value or 0)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # type: ignore[untyped-decorator]
def _forget(env: int | None) -> None:
    _handlers.pop(env or 0, None)


def host_func(store: Store, ty: FuncType, handler: HostHandler) -> Func:
    """A Func in `store` that runs `handler(context, values)`; dropped with the store."""
    key = next(_handler_ids)
    _handlers[key] = handler
    func = bindings.wasmtime_func_t()
    _func_new_unchecked(store._context(), ty.ptr(), _dispatch, key, _forget, ctypes.byref(func))
    return Func._from_raw(func)


class FastCallI64:
    """An `(i64) -> i64` function (the kernel's `alloc`) called from inside a host function
    through the caller's context, without the public wrapper's ~10 us of conversions."""

    __slots__ = ("_func_ref", "_funcs", "_trap", "_trap_ref", "_vals")

    def __init__(self, func: Func) -> None:
        self._funcs = func._func
        self._func_ref = ctypes.byref(self._funcs)
        self._vals = (bindings.wasmtime_val_raw_t * 1)()
        self._trap = _TrapPtr()
        self._trap_ref = ctypes.byref(self._trap)

    def __call__(self, context: Any, value: int) -> int:
        """Call it in `context` (a store context, e.g. the one a host handler receives)."""
        vals = self._vals
        vals[0].i64 = value
        error = _call_unchecked(context, self._func_ref, vals, 1, self._trap_ref)
        if error:
            raise WasmtimeError._from_ptr(error)
        if self._trap:
            trap = Trap._from_ptr(self._trap)
            self._trap = _TrapPtr()
            self._trap_ref = ctypes.byref(self._trap)
            raise trap
        return int(vals[0].i64)


# A memoryview straight over foreign memory, without building a ctypes array type per view.
_view_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_view_from_memory.restype = ctypes.py_object
_view_from_memory.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PYBUF_WRITE = 0x200


def memory_view(store: Store, memory: Memory) -> memoryview:
    """A writable view over the whole current linear memory, with no copy.

    Valid until the memory grows (then take a new one) and while the store lives. The
    engine disables moving memories (`memory_may_move = False`), so the base address is
    stable and only the length changes.
    """
    ctx = store._context()
    size = int(_memory_data_size(ctx, ctypes.byref(memory._memory)))
    if size == 0:
        return memoryview(bytearray())
    base = _memory_data(ctx, ctypes.byref(memory._memory))
    view: memoryview = _view_from_memory(ctypes.addressof(base.contents), size, _PYBUF_WRITE)
    return view


def memory_size(store: Store, memory: Memory) -> int:
    """Current byte length of a linear memory (one C call, no Python wrapper)."""
    return int(_memory_data_size(store._context(), ctypes.byref(memory._memory)))


class FromLinker(NamedTuple):
    """An import satisfied by what `linker` defines as `module`::`name` for the store (here
    WASI): fetched straight into the import array, ~1 us instead of ~4 us for `Linker.get`."""

    linker: Linker
    module: bytes
    name: bytes


def instantiate(store: Store, module: Module, source: Instance, imports: list[Any]) -> Instance:
    """Instantiate `module` in `store`. Each entry of `imports` is an int, the index of an
    export of `source` (another instance in the same store, here the kernel), a
    `FromLinker`, or a wasmtime extern object (Func, Memory, ...). Raw C calls throughout:
    the public `Instance.exports` + `Linker.get` + `Instance(...)` path costs ~50 us more.

    Raises `Trap` (a start function trapped) or `WasmtimeError` (linking failed).
    """
    ctx = store._context()
    count = len(imports)
    externs = (bindings.wasmtime_extern_t * count)()
    source_ref = ctypes.byref(source._instance)
    name = ctypes.POINTER(ctypes.c_char)()
    name_ref = ctypes.byref(name)
    length = ctypes.c_size_t(0)
    length_ref = ctypes.byref(length)
    size = ctypes.sizeof(bindings.wasmtime_extern_t)
    base = ctypes.addressof(externs)
    for i, item in enumerate(imports):
        if type(item) is int:
            if not _export_nth_into(ctx, source_ref, item, name_ref, length_ref, base + i * size):
                raise WasmtimeError(f"the source instance has no export number {item}")
        elif type(item) is FromLinker:
            linker, mod, field = item
            if not _linker_get_into(linker.ptr(), ctx, mod, len(mod), field, len(field), base + i * size):
                raise WasmtimeError(f"the linker defines no {mod.decode()}::{field.decode()}")
        else:
            externs[i] = get_extern_ptr(item)
    instance = bindings.wasmtime_instance_t()
    trap = _TrapPtr()
    _raise_for(_instance_new(ctx, module.ptr(), externs, count, ctypes.byref(instance), ctypes.byref(trap)), trap)
    return Instance._from_raw(instance)


def instantiate_pre(store: Store, pre: InstancePre) -> Instance:
    """`pre.instantiate(store)` without the Python context-manager wrapper (~3 us less)."""
    instance = bindings.wasmtime_instance_t()
    trap = _TrapPtr()
    _raise_for(_instance_pre_instantiate(pre.ptr(), store._context(), ctypes.byref(instance), ctypes.byref(trap)), trap)
    return Instance._from_raw(instance)


def export_at(store: Store, instance: Instance, index: int) -> Any:
    """Export number `index` of `instance` (module export order), without building the
    wrappers of every other export as `Instance.exports` does (~40 us for a kernel)."""
    item = bindings.wasmtime_extern_t()
    name = ctypes.POINTER(ctypes.c_char)()
    length = ctypes.c_size_t(0)
    ok = _export_nth(
        store._context(),
        ctypes.byref(instance._instance),
        index,
        ctypes.byref(name),
        ctypes.byref(length),
        ctypes.byref(item),
    )
    if not ok:
        raise IndexError(f"instance has no export number {index}")
    return wrap_extern(item)


def export_get(store: Store, instance: Instance, name: str) -> Any | None:
    """The export of `instance` called `name`, or None: one lookup by name
    (`wasmtime_instance_export_get`), whatever the number of exports."""
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        return None  # a name with lone surrogates names no export
    item = bindings.wasmtime_extern_t()
    if not _export_get(store._context(), ctypes.byref(instance._instance), raw, len(raw), ctypes.byref(item)):
        return None
    return wrap_extern(item)


__all__ = [
    "FastCallI64",
    "FastFunc",
    "FromLinker",
    "StoreHandle",
    "clear_host_exception",
    "export_at",
    "export_get",
    "host_func",
    "instantiate",
    "instantiate_pre",
    "memory_size",
    "memory_view",
    "wasmtime",
]
