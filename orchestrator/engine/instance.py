"""One instance of a plugin: a wasmtime Store holding a kernel instance linked to the plugin's.

An `Instance` is used by one thread at a time (its plugin's pool hands it out). A call
writes the input and the kernel header in bulk, arms fuel and the epoch deadline, calls the
export through the low-level binding, and reads the header back. When the call fails, the
trap (or the error a host function raised) is named: `FuelExhausted`, `CallTimeout`,
`MemoryLimitExceeded`, `KernelFault`, `GuestError`, `CapsuleTrap`; the instance is then
`broken` and discarded by the pool.

`current_instance()` is how code running inside a guest call (the kernel's services, host
functions) finds the instance it serves: a thread-local set around every guest call.

Used by orchestrator.engine.plugin (the pool), .kernel_services and .hostcall.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import wasmtime
from wasmtime import Func, InstancePre, Linker, Store, Trap, TrapCode, WasmtimeError

from ..errors import (
    CallTimeout,
    CapsuleError,
    CapsuleTrap,
    FuelExhausted,
    GuestError,
    InvalidModule,
    KernelFault,
    MemoryLimitExceeded,
    UnknownFunction,
)
from ..limits import Limits
from . import _lowlevel
from .kernel import KernelMemory
from .output import LineLog
from .shape import CompiledModule, callable_kind

MIB = 1024 * 1024
TABLE_ELEMENTS = 1 << 20  # per table: 8 MiB of host memory at most
WASI = "wasi_snapshot_preview1"
SHOWN_EXPORTS = 50  # exports named in an UnknownFunction message

_current = threading.local()  # .instance: the Instance whose guest code this thread runs


def current_instance() -> Instance:
    instance: Instance | None = getattr(_current, "instance", None)
    if instance is None:  # only reachable if wasm calls a host function outside a call
        raise RuntimeError("host function called outside a plugin call")
    return instance


def running_instance() -> Instance | None:
    """The instance whose guest code this thread is running, if any."""
    return getattr(_current, "instance", None)


class EngineParts(Protocol):
    """What an instance needs of its engine (orchestrator.engine.WasmEngine)."""

    wasmtime: wasmtime.Engine
    kernel_pre: InstancePre
    kernel_exports: Mapping[str, int]
    fuel_enabled: bool
    tick_ms: float

    @property
    def wasi_linker(self) -> Linker: ...


Binder = Callable[[Store], Func]
# How each import is satisfied, in order: a kernel export's index (int), a Binder (called
# with the new store), or a _lowlevel.FromLinker (WASI).
ImportPlan = tuple[Any, ...]


class Owner(Protocol):
    """What an instance needs of its plugin (orchestrator.engine.plugin.Plugin)."""

    name: str
    limits: Limits
    engine: EngineParts
    compiled: CompiledModule
    link: ImportPlan
    memory_limit: int
    deadline_ticks: int
    fuel_on: bool
    wasi: bool
    log: logging.Logger

    @property
    def exports(self) -> tuple[str, ...]: ...
    def wasi_config(self) -> tuple[wasmtime.WasiConfig, tuple[LineLog, LineLog]]: ...
    def config_value(self, key: bytes) -> bytes | None: ...
    def var_get(self, key: bytes) -> bytes | None: ...
    def var_set(self, key: bytes, value: bytes | None) -> None: ...


class Instance:
    """One Store: a kernel instance and a plugin instance, used by one thread at a time."""

    __slots__ = (
        "_alloc",
        "broken",
        "context",
        "funcs",
        "function",
        "handle",
        "host_error",
        "host_source",
        "instance",
        "kernel",
        "memory",
        "output",
        "plugin",
        "store",
    )

    def __init__(self, plugin: Owner) -> None:
        self.plugin = plugin
        self.function = "(start)"
        self.host_error: BaseException | None = None
        self.host_source = ""
        self.context: Any = None
        self.broken = False
        self.funcs: dict[str, _lowlevel.FastFunc] = {}
        self.output: tuple[LineLog, LineLog] | None = None
        engine = plugin.engine
        store = Store(engine.wasmtime)
        store.set_limits(
            memory_size=plugin.memory_limit,
            table_elements=TABLE_ELEMENTS,
            instances=2,  # the kernel and the plugin
            tables=4,
            memories=2,  # the kernel's and the plugin's own
        )
        if plugin.wasi:
            wasi, self.output = plugin.wasi_config()
            store.set_wasi(wasi)
        self.store = store
        self.handle = _lowlevel.StoreHandle(store)
        self._arm()
        previous = getattr(_current, "instance", None)
        _current.instance = self
        try:
            kernel = _lowlevel.instantiate_pre(store, engine.kernel_pre)
            export_at = _lowlevel.export_at
            kernel_memory = export_at(store, kernel, engine.kernel_exports["memory"])
            assert isinstance(kernel_memory, wasmtime.Memory)
            self.memory = KernelMemory(store, kernel_memory)
            self.kernel = kernel
            self._alloc: _lowlevel.FastCallI64 | None = None
            imports = [item(store) if callable(item) else item for item in plugin.link]
            self.instance = _lowlevel.instantiate(store, plugin.compiled.module, kernel, imports)
            compiled = plugin.compiled
            initialize = self._lookup("_initialize") if compiled.initialize is not False else None
            compiled.initialize = initialize is not None
            if initialize is not None:
                self.function = "_initialize"
                initialize()
        except Trap as trap:
            raise self._trap_error(trap, self._fuel_used()) from None
        except WasmtimeError as error:
            if self.host_error is not None:  # a host function failed during start-up
                raise self._trap_error(error, self._fuel_used()) from None
            raise InvalidModule(f"{plugin.name}: cannot instantiate the module: {error}") from None
        finally:
            _current.instance = previous
            self.flush_output()

    def alloc(self, caller: wasmtime.Caller, size: int) -> int:
        """Allocate `size` bytes in the kernel memory from inside a (wasmtime-py) host function."""
        return self.alloc_in(caller._context(), size)

    def alloc_in(self, context: Any, size: int) -> int:
        """The same, given the calling store's raw context."""
        alloc = self._alloc
        if alloc is None:
            export = _lowlevel.export_at(self.store, self.kernel, self.plugin.engine.kernel_exports["alloc"])
            assert isinstance(export, Func)
            self._alloc = alloc = _lowlevel.FastCallI64(export)
        return alloc(context, size)

    def _arm(self) -> None:
        if self.plugin.fuel_on:
            self.handle.set_fuel(self.plugin.limits.fuel)
        self.handle.set_epoch_deadline(self.plugin.deadline_ticks)

    def close(self) -> None:
        self.funcs.clear()
        self.store.close()

    def flush_output(self) -> None:
        """Log the partial WASI output lines left (after a call, or start-up)."""
        if self.output is not None:
            self.output[0].flush()
            self.output[1].flush()

    def _lookup(self, name: str) -> _lowlevel.FastFunc | None:
        """Export `name` as a callable function, or None: one lookup by name; the function's
        type is checked once per module (`CompiledModule.kinds`)."""
        export = _lowlevel.export_get(self.store, self.instance, name)
        if not isinstance(export, Func):
            return None
        kinds = self.plugin.compiled.kinds
        returns_i32 = kinds.get(name)
        if returns_i32 is None:
            returns_i32 = callable_kind(export.type(self.store))
            if returns_i32 is None:
                if name == "_initialize":
                    raise InvalidModule(
                        f"{self.plugin.name}: the module exports _initialize with type "
                        f"{export.type(self.store)}; it must take no arguments and return nothing"
                    )
                return None
            kinds[name] = returns_i32
        return _lowlevel.FastFunc(self.store, export, returns_i32=returns_i32)

    def find(self, name: str) -> _lowlevel.FastFunc | None:
        """The callable export `name` (looked up on first use, then kept), or None."""
        func = self.funcs.get(name)
        if func is None and name != "_initialize":
            func = self._lookup(name)
            if func is not None:
                self.funcs[name] = func
        return func

    def func(self, name: str) -> _lowlevel.FastFunc:
        """The callable export `name`. Raises UnknownFunction (naming the exports)."""
        func = self.funcs.get(name) or self.find(name)
        if func is None:
            raise self._unknown(name)
        return func

    def _unknown(self, name: str) -> UnknownFunction:
        exports = self.plugin.exports
        known = ", ".join(exports[:SHOWN_EXPORTS]) or "none"
        if len(exports) > SHOWN_EXPORTS:
            known += f", ... ({len(exports) - SHOWN_EXPORTS:,} more)"
        return UnknownFunction(
            f"plugin {self.plugin.name!r} has no function {name!r} "
            f"(a callable export takes no arguments and returns an i32 or nothing; exported: {known})",
            plugin=self.plugin.name,
            function=name,
        )

    def call(self, name: str, data: bytes, context: Any = None) -> tuple[bytes, int]:
        plugin = self.plugin
        func = self.func(name)
        memory = self.memory
        try:
            memory.begin_call(data)
        except WasmtimeError:
            raise MemoryLimitExceeded(
                f"plugin {plugin.name!r}: an input of {len(data)} bytes does not fit in the "
                f"kernel memory limit of {plugin.limits.memory_mib} MiB; raise limits.memory_mib",
                limit_mib=plugin.limits.memory_mib,
                plugin=plugin.name,
                function=name,
            ) from None
        self._arm()
        self.function = name
        self.host_error = None
        self.context = context
        previous = getattr(_current, "instance", None)
        _current.instance = self
        try:
            code = func()
        except (Trap, WasmtimeError) as trap:
            raise self._trap_error(trap, self._fuel_used()) from None
        finally:
            _current.instance = previous
            self.context = None
            if self.output is not None:
                self.flush_output()
        fuel = self._fuel_used() if plugin.fuel_on else 0
        output_offset, output_length, error_offset = memory.result()
        if error_offset:
            message = memory.read_block(error_offset)
            text = message.decode("utf-8", "replace") if message else f"exit code {code}"
            raise GuestError(text, exit_code=code, plugin=plugin.name, function=name, fuel_used=fuel)
        if code != 0:
            raise GuestError(
                f"{name} returned non-zero exit code {code} without an error message",
                exit_code=code,
                plugin=plugin.name,
                function=name,
                fuel_used=fuel,
            )
        return memory.read(output_offset, output_length) if output_length else b"", fuel

    def _fuel_used(self) -> int:
        if not self.plugin.fuel_on:
            return 0
        return self.plugin.limits.fuel - self.handle.get_fuel()

    def _trap_error(self, trap: Trap | WasmtimeError, fuel: int) -> CapsuleError:
        """Name the trap (or the error wasmtime raises instead of one when a host function
        fails). The instance is discarded afterwards (`broken`). Ctrl+C or SystemExit raised
        inside a host function is re-raised as it is."""
        self.broken = True
        plugin, name, limits = self.plugin, self.function, self.plugin.limits
        where: dict[str, Any] = {"plugin": plugin.name, "function": name, "fuel_used": fuel}
        prefix = f"plugin {plugin.name!r}: {name}"
        if self.host_error is not None:
            error, source = self.host_error, self.host_source
            self.host_error = None
            if not isinstance(error, Exception):
                raise error  # KeyboardInterrupt, SystemExit: not the guest's business
            if isinstance(error, CapsuleError):
                error.plugin = error.plugin or plugin.name
                error.function = error.function or name
                error.fuel_used = fuel
                return error
            return CapsuleTrap(
                f"{prefix}: host function {source} failed: {type(error).__name__}: {error}",
                trap_code="HOST",
                **where,
            )
        if not isinstance(trap, Trap):
            return CapsuleTrap(f"{prefix} failed: {_one_line(str(trap))}", **where)
        code = trap.trap_code
        code_name = code.name if code is not None else ""
        if code == TrapCode.OUT_OF_FUEL:
            return FuelExhausted(
                f"{prefix} ran out of fuel (budget {limits.fuel:,} instructions); "
                "raise limits.fuel if the work is expected",
                budget=limits.fuel,
                **where,
            )
        if code == TrapCode.INTERRUPT:
            return CallTimeout(
                f"{prefix} ran past its timeout of {limits.timeout_ms} ms and was interrupted; "
                "raise limits.timeout_ms if the work is expected",
                timeout_ms=limits.timeout_ms,
                **where,
            )
        if code == TrapCode.STACK_OVERFLOW:
            return CapsuleTrap(
                f"{prefix} trapped: call stack exhausted (unbounded recursion?)", trap_code=code_name, **where
            )
        memory = getattr(self, "memory", None)
        fault = memory.fault() if memory is not None else None
        failed = memory.alloc_failed() if memory is not None else 0
        if fault is not None:
            hint = (
                f" (an earlier alloc of {failed} bytes failed: the kernel memory limit is {limits.memory_mib} MiB)"
                if failed
                else ""
            )
            return KernelFault(f"{prefix}: {fault}{hint}", trap_code=code_name, **where)
        guest = self._guest_message()
        if code == TrapCode.UNREACHABLE and not guest:
            # Out of memory usually ends here: a refused memory.grow or kernel alloc, then
            # the guest gives up with `unreachable`.
            if failed:
                return MemoryLimitExceeded(
                    f"{prefix} trapped after the kernel could not allocate {failed} bytes "
                    f"(memory limit {limits.memory_mib} MiB); raise limits.memory_mib",
                    limit_mib=limits.memory_mib,
                    **where,
                )
            if self._memory_exhausted():
                return MemoryLimitExceeded(
                    f"{prefix} trapped with its memory at the limit of {limits.memory_mib} MiB; "
                    "raise limits.memory_mib",
                    limit_mib=limits.memory_mib,
                    **where,
                )
        detail = guest or _trap_cause(trap)
        return CapsuleTrap(f"{prefix} trapped: {detail}", trap_code=code_name, **where)

    def _memory_exhausted(self) -> bool:
        if not hasattr(self, "instance"):
            return False
        memory = _lowlevel.export_get(self.store, self.instance, "memory")
        if not isinstance(memory, wasmtime.Memory):
            return False
        size = _lowlevel.memory_size(self.store, memory)
        return size + 65536 > self.plugin.memory_limit

    def _guest_message(self) -> str:
        """The error message the guest set before trapping (e.g. an AssemblyScript abort)."""
        if not hasattr(self, "memory"):
            return ""
        _, _, error_offset = self.memory.result()
        message = self.memory.read_block(error_offset) if error_offset else None
        return message.decode("utf-8", "replace") if message else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _trap_cause(trap: Trap) -> str:
    """wasmtime's cause line ("wasm `unreachable` instruction executed") and the innermost
    named frame, from its multi-line message."""
    lines = [line.strip() for line in trap.message.strip().splitlines() if line.strip()]
    cause = re.sub(r"^\d+:\s*", "", lines[-1]).removeprefix("wasm trap: ") if lines else "trap"
    frames = trap.frames
    name = next((f.func_name for f in frames if f.func_name), None)
    where = f" in {name}" if name else (f" in wasm function {frames[0].func_index}" if frames else "")
    return f"{cause}{where}"
