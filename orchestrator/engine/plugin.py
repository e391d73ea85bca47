"""One loaded plugin: its compiled module, its configuration and vars, and a pool of instances.

An *instance* (orchestrator.engine.instance) is one wasmtime Store holding a kernel instance
linked to a plugin instance. `Plugin.call` takes an idle instance from the pool (creating
one, up to `instances`, when none is idle; waiting when all are busy), so calls from several
threads are safe and use several cores when `instances > 1`. A call that traps discards its
instance (its memory may be inconsistent); the next call builds a fresh one. Vars belong to
the plugin, not an instance, so they survive traps and are shared by all of its instances.

Exports are never listed on a load: each is looked up by name when first called
(`has_function` asks the same question without calling); `exports`, the full list, is
computed only when asked, once per module. While the plugin lives, its compiled artifact is
pinned in the disk cache (never evicted); `close` releases it.

Used through orchestrator.engine.WasmEngine.load.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import wasmtime

from ..errors import CapsuleError, CapsuleTrap, InvalidModule, PluginClosed
from ..limits import Limits
from . import _lowlevel
from .hostcall import HostFunction, binder
from .instance import WASI, EngineParts, Instance, running_instance
from .output import LineLog
from .shape import CompiledModule

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
VARS_LIMIT = MIB  # total bytes of var keys and values per plugin
MISSING_NAMES = 1024  # names has_function remembers as absent, per module
ENV = "extism:host/env"

_SLOT = object()  # in the idle queue: a free slot; whoever takes it builds a fresh instance
_WAIT = object()


class Plugin:
    """A loaded plugin. Create with `WasmEngine.load`; call with `call`; `close` when done."""

    def __init__(
        self,
        *,
        engine: EngineParts,
        compiled: CompiledModule,
        name: str,
        config: Mapping[str, str],
        limits: Limits,
        wasi: bool,
        host_functions: Sequence[HostFunction],
        instances: int,
        release: Callable[[], None] | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError(f"plugin {name!r}: instances must be at least 1, got {instances}")
        self.name = name
        self.limits = limits
        self.wasi = wasi
        self.engine = engine
        self.compiled = compiled
        self.module = compiled.module
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
        self.link: tuple[Any, ...] = self._plan_imports(compiled, host)
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
        self._release_pin = weakref.finalize(self, release) if release is not None else None

    # -- loading -------------------------------------------------------------------------
    def _plan_imports(self, compiled: CompiledModule, host: dict[str, HostFunction]) -> tuple[Any, ...]:
        """How to satisfy each import, in order: a kernel export's index (int), a host
        function's binder (called with each new store), or a `FromLinker` (WASI).

        The resolution depends only on the module, `wasi` and the host functions'
        signatures, so it is kept with the module (a template whose host entries are the
        functions' keys) and a warm load only binds the host functions it imports."""
        signature = (self.wasi, frozenset((k, f.params, f.results) for k, f in host.items()))
        template = compiled.plans.get(signature)
        if template is None:
            template = self._resolve_imports(compiled, host)
            compiled.plans[signature] = template
        if not host:
            return template
        return tuple(binder(host[entry]) if type(entry) is str else entry for entry in template)

    def _resolve_imports(self, compiled: CompiledModule, host: dict[str, HostFunction]) -> tuple[Any, ...]:
        kernel_exports = self.engine.kernel_exports
        plan: list[Any] = []
        problems: list[str] = []
        wasi_linker = self.engine.wasi_linker if self.wasi else None
        for imp in compiled.imports:
            mod, field = imp.module, imp.name
            if mod == ENV and field in kernel_exports and field != "memory":
                plan.append(kernel_exports[field])
            elif imp.key in host:
                fn = host[imp.key]
                if not imp.is_function or imp.params != fn.params or imp.results != fn.results:
                    problems.append(
                        f"{mod}::{field} is imported as {imp.described} but the host function takes "
                        f"({', '.join(fn.params)}) -> ({', '.join(fn.results)})"
                    )
                plan.append(imp.key)
            elif mod == WASI and wasi_linker is not None:
                plan.append(_lowlevel.FromLinker(wasi_linker, WASI.encode(), field.encode()))
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
        return tuple(plan)

    # -- exports -------------------------------------------------------------------------
    @property
    def exports(self) -> tuple[str, ...]:
        """Every callable export (`() -> i32` or `() -> ()`, not `_initialize`), in module
        order. Computed on first use, once per module, by walking all exports (~20 us each):
        meant for messages. To ask about one name, use `has_function`."""
        return self.compiled.exports

    def has_function(self, name: str) -> bool:
        """Whether `call(name)` would find a function: `name` is an export of the module that
        is a function taking no arguments and returning an i32 or nothing, and is not
        `_initialize`. Answered by one lookup by name (never a walk of the exports) and
        remembered for the module (yes and no; no for up to MISSING_NAMES names), so asking
        again is a dict lookup. The first lookup of a name uses an idle instance, so it waits
        while every instance is busy, like a call. Raises PluginClosed on a closed plugin."""
        if self._closed:
            raise PluginClosed(f"plugin {self.name!r} is closed", plugin=self.name)
        compiled = self.compiled
        if name == "_initialize" or name in compiled.missing:
            return False
        if name in compiled.kinds:
            return True
        instance = self._acquire()
        try:
            found = instance.find(name) is not None
        finally:
            self._release(instance)
        if not found and len(compiled.missing) < MISSING_NAMES:
            compiled.missing.add(name)
        return found

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
        if self._release_pin is not None:
            self._release_pin()  # the artifact may be evicted from now on

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

    def wasi_config(self) -> tuple[wasmtime.WasiConfig, tuple[LineLog, LineLog]]:
        """WASI with nothing granted: no directories, no environment, and stdout (at INFO)
        and stderr (at WARNING) to the plugin's log, a line at a time. Returns the config
        and the two line collectors, which the instance flushes after each call."""
        config = wasmtime.WasiConfig()
        stdout = LineLog(self.log, logging.INFO, "stdout")
        stderr = LineLog(self.log, logging.WARNING, "stderr")
        config.stdout_custom = stdout.write
        config.stderr_custom = stderr.write
        return config, (stdout, stderr)


def ticks_for(timeout_ms: int, tick_ms: float) -> int:
    """Epoch ticks that guarantee at least `timeout_ms` before an interrupt."""
    return math.ceil(timeout_ms / tick_ms) + 1
