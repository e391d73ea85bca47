"""One loaded plugin: its compiled module, its configuration and vars, and a pool of instances.

An *instance* (orchestrator.engine.instance) is one wasmtime Store holding a kernel instance
linked to a plugin instance. `Plugin.call` takes an idle instance from the pool (creating
one, up to `instances`, when none is idle; waiting when all are busy), so calls from several
threads are safe and use several cores when `instances > 1`. A call that traps discards its
instance (its memory may be inconsistent); the next call builds a fresh one. Vars belong to
the plugin, not an instance, so they survive traps and are shared by all of its instances.

Used through orchestrator.engine.WasmEngine.load.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import wasmtime

from ..errors import CapsuleError, CapsuleTrap, InvalidModule, PluginClosed
from ..limits import Limits
from .hostcall import HostFunction, binder
from .instance import WASI, EngineParts, Instance, running_instance
from .shape import ModuleShape

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
VARS_LIMIT = MIB  # total bytes of var keys and values per plugin
ENV = "extism:host/env"

_SLOT = object()  # in the idle queue: a free slot; whoever takes it builds a fresh instance
_WAIT = object()


class Plugin:
    """A loaded plugin. Create with `WasmEngine.load`; call with `call`; `close` when done."""

    def __init__(
        self,
        *,
        engine: EngineParts,
        module: wasmtime.Module,
        shape: ModuleShape,
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
        self.fuel_on = engine.fuel_enabled
        self.deadline_ticks = ticks_for(limits.timeout_ms, engine.tick_ms)
        self.memory_limit = limits.memory_mib * MIB
        host = {f.namespace + "::" + f.name: f for f in host_functions}
        self.imports: Sequence[tuple[str, str, Any]] = self._plan_imports(shape, host)
        self.callable: Mapping[str, tuple[int, bool]] = shape.callable
        self.exports = shape.functions
        self.memory_export = shape.memory_export
        self.initialize_export = shape.initialize_export
        self._max_instances = instances
        self._created = 0
        self._closed = False
        self._lock = threading.Lock()
        self._idle: queue.SimpleQueue[Instance | object | None] = queue.SimpleQueue()
        # Build the first instance now, so a module that cannot link or start fails to load.
        try:
            first = Instance(self)
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
                plan.append(("host", field, binder(fn)))
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

    def _acquire(self) -> Instance:
        inside = running_instance()
        if inside is not None and id(inside.plugin) == id(self):
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
                return Instance(self)
            except BaseException:
                self._idle.put(_SLOT)
                raise
        assert isinstance(item, Instance)
        return item

    def _release(self, instance: Instance) -> None:
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
            if isinstance(instance, Instance):
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


def ticks_for(timeout_ms: int, tick_ms: float) -> int:
    """Epoch ticks that guarantee at least `timeout_ms` before an interrupt."""
    return math.ceil(timeout_ms / tick_ms) + 1
