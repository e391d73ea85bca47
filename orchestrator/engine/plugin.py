"""One loaded plugin: its compiled module, its configuration and vars, and a pool of instances.

An *instance* is one wasmtime Store holding a kernel instance linked to a plugin instance.
A Store is used by one thread at a time; `Plugin.call` takes an idle instance from the pool
(creating one, up to `instances`, when none is idle; waiting when all are busy), so calls
from several threads are safe and use several cores when `instances > 1`. A call that traps
discards its instance (its memory may be inconsistent); the next call builds a fresh one.
Vars belong to the plugin, not an instance, so they survive traps and are shared by all of
its instances.

The per-call path is kept short: write the input and the kernel header in bulk, arm fuel and
the epoch deadline, call the export through the low-level binding, read the header back.

Used through orchestrator.engine.WasmEngine.load.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import wasmtime
from wasmtime import Func, FuncType, Store, Trap, TrapCode, ValType, WasmtimeError

from ..errors import (
    CallTimeout,
    CapsuleError,
    CapsuleTrap,
    FuelExhausted,
    GuestError,
    InvalidModule,
    KernelFault,
    MemoryLimitExceeded,
    PluginClosed,
    UnknownFunction,
)
from . import _lowlevel
from .hostfn import HostCall, HostFunction
from .kernel import KernelMemory
from .limits import Limits
from .shape import ModuleShape

if TYPE_CHECKING:
    from .engine import WasmEngine

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
VARS_LIMIT = MIB  # total bytes of var keys and values per plugin
TABLE_ELEMENTS = 1 << 20  # per table: 8 MiB of host memory at most
ENV = "extism:host/env"
WASI = "wasi_snapshot_preview1"

_SLOT = object()  # in the idle queue: a free slot; whoever takes it builds a fresh instance
_WAIT = object()
_current = threading.local()  # .instance: the _Instance whose guest code this thread runs


def current_instance() -> _Instance:
    instance: _Instance | None = getattr(_current, "instance", None)
    if instance is None:  # only reachable if wasm calls a host function outside a call
        raise RuntimeError("host function called outside a plugin call")
    return instance


def _valtype(kind: str) -> ValType:
    return {"i32": ValType.i32(), "i64": ValType.i64(), "f32": ValType.f32(), "f64": ValType.f64()}[kind]


class Plugin:
    """A loaded plugin. Create with `WasmEngine.load`; call with `call`; `close` when done."""

    def __init__(
        self,
        *,
        engine: WasmEngine,
        module: wasmtime.Module,
        name: str,
        config: Mapping[str, str],
        limits: Limits,
        wasi: bool,
        host_functions: Sequence[HostFunction],
        instances: int,
    ) -> None:
        if instances < 1:
            raise ValueError(f"plugin {name!r}: instances must be at least 1, got {instances}")
        self.name = name
        self.limits = limits
        self.wasi = wasi
        self.engine = engine
        self.module = module
        self.config: dict[str, str] = dict(config)
        self.log = logging.getLogger(f"orchestrator.plugin.{name}")
        self.last_fuel_used = 0
        self.calls = 0
        self._config_bytes = {k.encode(): v.encode() for k, v in self.config.items()}
        self._vars: dict[bytes, bytes] = {}
        self._vars_size = 0
        self._vars_lock = threading.Lock()
        self._fuel_on = engine.fuel_enabled
        self._deadline_ticks = engine.ticks_for(limits.timeout_ms)
        self._memory_limit = limits.memory_mib * MIB
        shape = engine.shape(module)
        self._imports = self._plan_imports(shape, {f.namespace + "::" + f.name: f for f in host_functions})
        self._callable = shape.callable
        self.exports = shape.functions
        self._memory_export = shape.memory_export
        self._initialize_export = shape.initialize_export
        self._max_instances = instances
        self._created = 0
        self._closed = False
        self._lock = threading.Lock()
        self._idle: queue.SimpleQueue[_Instance | object | None] = queue.SimpleQueue()
        # Build the first instance now, so a module that cannot link or start fails to load.
        try:
            first = _Instance(self)
        except CapsuleError as error:
            raise InvalidModule(f"{name}: the module failed to start: {error}") from error
        self._created = 1
        self._idle.put(first)

    # -- loading -------------------------------------------------------------------------
    def _plan_imports(self, shape: ModuleShape, host: dict[str, HostFunction]) -> list[tuple[str, str, Any]]:
        """How to satisfy each import: ("kernel", name, index) | ("host", name, fn) | ("wasi", name, None)."""
        kernel_exports = self.engine.kernel_exports
        plan: list[tuple[str, str, Any]] = []
        problems: list[str] = []
        for imp in shape.imports:
            mod, field = imp.module, imp.name
            if mod == ENV and field in kernel_exports and field != "memory":
                plan.append(("kernel", field, kernel_exports[field]))
            elif imp.key in host:
                fn = host[imp.key]
                if not imp.is_function or imp.params != fn.params or imp.results != fn.results:
                    problems.append(
                        f"{mod}::{field} is imported as {imp.described} but the host function takes "
                        f"({', '.join(fn.params)}) -> ({', '.join(fn.results)})"
                    )
                plan.append(("host", field, fn))
            elif mod == WASI and self.wasi:
                plan.append(("wasi", field, None))
            elif mod == WASI:
                problems.append(f"{mod}::{field} (a WASI import): load the plugin with wasi=True (--wasi)")
            else:
                problems.append(f"{mod}::{field}")
        if problems:
            offered = ", ".join(sorted(kernel_exports))
            raise InvalidModule(
                f"{self.name}: the module imports what this host does not provide: "
                + "; ".join(problems)
                + f". Provided in {ENV}: {offered}"
                + (f"; host functions: {', '.join(sorted(host))}" if host else "")
            )
        return plan

    # -- calling -------------------------------------------------------------------------
    def call(self, function: str, data: bytes | str = b"", *, context: Any = None) -> bytes:
        """Call export `function` with `data` as input; return its output.

        `context` is handed to host functions as `HostCall.context` during this call (the
        capsule layer passes its per-call state this way).

        Raises a `CapsuleError`: `UnknownFunction`, `GuestError`, `FuelExhausted`,
        `CallTimeout`, `MemoryLimitExceeded`, `KernelFault`, `CapsuleTrap`, `PluginClosed`.
        """
        return self.call_metered(function, data, context=context)[0]

    def call_metered(self, function: str, data: bytes | str = b"", *, context: Any = None) -> tuple[bytes, int]:
        """Like `call`, but also returns the fuel this call burned (safe under threads)."""
        if isinstance(data, str):
            data = data.encode()
        instance = self._acquire()
        try:
            output, fuel = instance.call(function, data, context)
        except CapsuleError as error:
            self.last_fuel_used = error.fuel_used
            raise
        finally:
            self._release(instance)
        self.last_fuel_used = fuel
        return output, fuel

    def _acquire(self) -> _Instance:
        inside = getattr(_current, "instance", None)
        if inside is not None and inside.plugin is self:
            raise CapsuleError(
                f"plugin {self.name!r}: a host function called back into the plugin it serves "
                f"(during {inside.function}); that would deadlock, so it is refused",
                plugin=self.name,
            )
        try:
            item = self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                if self._closed:
                    item = None
                elif self._created < self._max_instances:
                    self._created += 1
                    item = _SLOT
                else:
                    item = _WAIT
            if item is _WAIT:
                item = self._idle.get()
        if item is None:
            self._idle.put(None)  # wake the next waiter too
            raise PluginClosed(f"plugin {self.name!r} is closed", plugin=self.name)
        if item is _SLOT:
            try:
                return _Instance(self)
            except BaseException:
                self._idle.put(_SLOT)
                raise
        assert isinstance(item, _Instance)
        return item

    def _release(self, instance: _Instance) -> None:
        if self._closed:
            instance.close()
        elif instance.broken:
            instance.close()
            self._idle.put(_SLOT)  # the next caller builds a fresh instance in its place
        else:
            self._idle.put(instance)

    def close(self) -> None:
        """Drop every instance. Calls in flight finish; later calls raise PluginClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:
            try:
                instance = self._idle.get_nowait()
            except queue.Empty:
                break
            if isinstance(instance, _Instance):
                instance.close()
        self._idle.put(None)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Plugin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- kernel services (called from host functions on the calling thread) ---------------
    def var_get(self, key: bytes) -> bytes | None:
        return self._vars.get(key)

    def var_set(self, key: bytes, value: bytes | None) -> None:
        with self._vars_lock:
            old = self._vars.get(key)
            size = self._vars_size - (len(key) + len(old) if old is not None else 0)
            if value is None:
                self._vars.pop(key, None)
                self._vars_size = size
                return
            size += len(key) + len(value)
            if size > VARS_LIMIT:
                raise CapsuleTrap(
                    f"var_set({key[:64]!r}): vars would hold {size} bytes, over the limit of "
                    f"{VARS_LIMIT} bytes per plugin; remove vars you no longer need",
                    plugin=self.name,
                )
            self._vars[key] = value
            self._vars_size = size

    def config_value(self, key: bytes) -> bytes | None:
        return self._config_bytes.get(key)

    def wasi_config(self) -> wasmtime.WasiConfig:
        """WASI with nothing granted: no directories, no environment, stdout/stderr to the log."""
        config = wasmtime.WasiConfig()
        config.stdout_custom = self._log_stream(logging.INFO, "stdout")
        config.stderr_custom = self._log_stream(logging.WARNING, "stderr")
        return config

    def _log_stream(self, level: int, stream: str) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            for line in data.decode("utf-8", "replace").splitlines():
                self.log.log(level, "%s: %s", stream, line)

        return write


class _Instance:
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
        "plugin",
        "store",
    )

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.function = "(start)"
        self.host_error: BaseException | None = None
        self.host_source = ""
        self.context: Any = None
        self.broken = False
        self.funcs: dict[str, _lowlevel.FastFunc | None] = {}
        engine = plugin.engine
        store = Store(engine.wasmtime)
        store.set_limits(
            memory_size=plugin._memory_limit,
            table_elements=TABLE_ELEMENTS,
            instances=2,  # the kernel and the plugin
            tables=4,
            memories=2,  # the kernel's and the plugin's own
        )
        if plugin.wasi:
            store.set_wasi(plugin.wasi_config())
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
            imports: list[Any] = []
            for kind, field, how in plugin._imports:
                if kind == "kernel":
                    imports.append(how)
                elif kind == "host":
                    imports.append(_bind_host_function(store, how))
                else:
                    imports.append(engine.wasi_linker.get(store, WASI, field))
            self.instance = _lowlevel.instantiate(store, plugin.module, kernel, imports)
            initialize = (
                export_at(store, self.instance, plugin._initialize_export)
                if plugin._initialize_export is not None
                else None
            )
            if isinstance(initialize, Func):
                self.function = "_initialize"
                initialize(store)
        except Trap as trap:
            raise self._trap_error(trap, self._fuel_used()) from None
        except WasmtimeError as error:
            if self.host_error is not None:  # a host function failed during start-up
                raise self._trap_error(error, self._fuel_used()) from None
            raise InvalidModule(f"{plugin.name}: cannot instantiate the module: {error}") from None
        finally:
            _current.instance = previous

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
        if self.plugin._fuel_on:
            self.handle.set_fuel(self.plugin.limits.fuel)
        self.handle.set_epoch_deadline(self.plugin._deadline_ticks)

    def close(self) -> None:
        self.funcs.clear()
        self.store.close()

    def _func(self, name: str) -> _lowlevel.FastFunc:
        try:
            func = self.funcs[name]
        except KeyError:
            func = None
            found = self.plugin._callable.get(name)
            if found is not None:
                index, returns_i32 = found
                export = _lowlevel.export_at(self.store, self.instance, index)
                assert isinstance(export, Func)
                func = _lowlevel.FastFunc(self.store, export, returns_i32=returns_i32)
            self.funcs[name] = func
        if func is None:
            known = ", ".join(self.plugin.exports) or "none"
            raise UnknownFunction(
                f"plugin {self.plugin.name!r} has no function {name!r} "
                f"(a callable export takes no arguments and returns an i32 or nothing; exported: {known})",
                plugin=self.plugin.name,
                function=name,
            )
        return func

    def call(self, name: str, data: bytes, context: Any = None) -> tuple[bytes, int]:
        plugin = self.plugin
        func = self._func(name)
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
        fuel = self._fuel_used() if plugin._fuel_on else 0
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
        if not self.plugin._fuel_on:
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
        index = self.plugin._memory_export
        if index is None or not hasattr(self, "instance"):
            return False
        memory = _lowlevel.export_at(self.store, self.instance, index)
        if not isinstance(memory, wasmtime.Memory):
            return False
        size = _lowlevel.memory_size(self.store, memory)
        return size + 65536 > self.plugin._memory_limit

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


def _bind_host_function(store: Store, fn: HostFunction) -> Func:
    ty = FuncType([_valtype(p) for p in fn.params], [_valtype(r) for r in fn.results])
    return _lowlevel.host_func(store, ty, _host_handler(fn))


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


def ticks_for(timeout_ms: int, tick_ms: float) -> int:
    """Epoch ticks that guarantee at least `timeout_ms` before an interrupt."""
    return math.ceil(timeout_ms / tick_ms) + 1
