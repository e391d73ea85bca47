"""WasmEngine: one wasmtime Engine, the kernel, the module cache and the epoch ticker.

One engine per process configuration. It compiles (through the cache) and loads plugins;
each `Plugin` then owns its Stores. The engine enables fuel metering and epoch
interruption; a daemon thread advances the epoch every `tick_ms`, which is what turns a
call's `timeout_ms` into an interrupt. Memories never move (`memory_may_move = False`), so
a view over the kernel memory stays valid as it grows.

The compiled-module cache (orchestrator.engine.cache) is configured here: its folder, the
key that authenticates its records, its size bound, and the module limits checked before
anything is compiled (orchestrator.engine.modulelimits).

Used by the CLI, the benchmarks and the capsule layer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import FuncType, Linker, ValType

from ..errors import InvalidModule
from ..limits import Limits
from .cache import DEFAULT_MAX_BYTES, CompiledModuleCache
from .hostcall import HostFunction
from .kernel import kernel_wasm
from .kernel_services import KERNEL_HOST_FUNCTIONS
from .modulelimits import ModuleLimits
from .plugin import Plugin, ticks_for
from .shape import CompiledModule

logger = logging.getLogger(__name__)

WasmSource = bytes | bytearray | memoryview | str | Path


class WasmEngine:
    """Loads Extism-ABI plugins onto wasmtime with fuel, limits and a compiled-module cache.

    `cache_dir`: a folder for compiled artifacts (created 0700), or None for memory only.
    `cache_key`: the secret that authenticates the disk cache's records (see
        `orchestrator.engine.cache.load_or_create_key`); None leaves them unauthenticated.
    `cache_max_bytes`: the disk cache's bound (1 GiB); least recently used artifacts go first.
    `max_module_bytes`, `max_functions`, `max_exports`: the largest module compiled
        (defaults in orchestrator.engine.modulelimits: 32 MiB, 50,000, 10,000).
    `fuel`: meter instructions (on by default; off only to measure its cost).
    `tick_ms`: epoch tick, the resolution of call timeouts.
    """

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        *,
        cache_key: bytes | None = None,
        cache_max_bytes: int = DEFAULT_MAX_BYTES,
        max_module_bytes: int = ModuleLimits.max_module_bytes,
        max_functions: int = ModuleLimits.max_functions,
        max_exports: int = ModuleLimits.max_exports,
        fuel: bool = True,
        tick_ms: float = 5.0,
    ) -> None:
        if tick_ms <= 0:
            raise ValueError("tick_ms must be positive")
        self.fuel_enabled = fuel
        self.tick_ms = tick_ms
        config = wasmtime.Config()
        config.consume_fuel = fuel
        config.epoch_interruption = True
        config.memory_may_move = False
        self.wasmtime = wasmtime.Engine(config)
        self.fingerprint = f"fuel={int(fuel)};epoch=1;memory_may_move=0"
        self.limits = ModuleLimits(
            max_module_bytes=max_module_bytes, max_functions=max_functions, max_exports=max_exports
        )
        self.cache = CompiledModuleCache(
            self.wasmtime,
            fingerprint=self.fingerprint,
            directory=Path(cache_dir) if cache_dir is not None else None,
            secret=cache_key,
            max_bytes=cache_max_bytes,
            limits=self.limits,
        )
        # Our own kernel: pinned for good, and not subject to the limits set for plugins.
        kernel_module = self.cache.get(kernel_wasm(), name="kernel", pin=True, limited=False).module
        linker = Linker(self.wasmtime)
        for name, params, results, callback in KERNEL_HOST_FUNCTIONS:
            ty = FuncType([_VAL[p] for p in params], [_VAL[r] for r in results])
            linker.define_func("orch:kernel", name, ty, callback, access_caller=True)
        self.kernel_pre = linker.instantiate_pre(kernel_module)
        self.kernel_exports: Mapping[str, int] = {e.name: i for i, e in enumerate(kernel_module.exports)}
        self._wasi_linker: Linker | None = None
        self._wasi_lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        interval = self.tick_ms / 1000
        while not self._stop.wait(interval):
            self.wasmtime.increment_epoch()

    def ticks_for(self, timeout_ms: int) -> int:
        return ticks_for(timeout_ms, self.tick_ms)

    @property
    def wasi_linker(self) -> Linker:
        with self._wasi_lock:
            if self._wasi_linker is None:
                linker = Linker(self.wasmtime)
                linker.define_wasi()
                self._wasi_linker = linker
            return self._wasi_linker

    def compile(self, wasm: WasmSource, *, name: str = "module", digest: str | None = None) -> wasmtime.Module:
        """The compiled module (through the cache). `digest`: the wasm's sha256 when known
        (never recomputed then). Raises InvalidModule."""
        return self._compiled(wasm, name=name, digest=digest).module

    def _compiled(self, wasm: WasmSource, *, name: str, digest: str | None, pin: bool = False) -> CompiledModule:
        if isinstance(wasm, (bytes, bytearray, memoryview)):
            data = bytes(wasm)
            return self.cache.get(data, name=name, digest=digest, pin=pin)
        # A path is read only when the module is not cached (given its digest).
        return self.cache.get(
            functools.partial(read_wasm, wasm, name=name, limits=self.limits), name=name, digest=digest, pin=pin
        )

    def load(
        self,
        wasm: WasmSource,
        *,
        name: str = "plugin",
        config: Mapping[str, str] | None = None,
        limits: Limits | None = None,
        wasi: bool = False,
        host_functions: Sequence[HostFunction] = (),
        instances: int = 1,
        digest: str | None = None,
    ) -> Plugin:
        """Compile (or fetch from the cache), link and instantiate a plugin.

        `wasm`: the module's bytes (binary or WAT text), or a path (str or Path) to a file.
        `config`: the values `config_get` returns. `instances`: how many calls may run at
        once (each on its own Store). `digest`: the wasm's sha256 when the caller has it.
        Raises InvalidModule.
        """
        compiled = self._compiled(wasm, name=name, digest=digest, pin=True)
        try:
            return Plugin(
                engine=self,
                compiled=compiled,
                name=name,
                config=config or {},
                limits=limits or Limits(),
                wasi=wasi,
                host_functions=host_functions,
                instances=instances,
                release=functools.partial(self.cache.release, compiled.key),
            )
        except BaseException:
            self.cache.release(compiled.key)
            raise

    async def load_async(self, wasm: WasmSource, **options: Any) -> Plugin:
        """`load` on a worker thread, so compiling never blocks the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(self.load, wasm, **options))

    def close(self) -> None:
        """Stop the epoch ticker. Plugins already loaded keep working, without timeouts."""
        self._stop.set()

    def __enter__(self) -> WasmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_wasm(wasm: WasmSource, *, name: str, limits: ModuleLimits | None = None) -> bytes:
    """The module's bytes; a file larger than `limits.max_module_bytes` is refused unread."""
    if isinstance(wasm, (bytes, bytearray, memoryview)):
        return bytes(wasm)
    path = Path(wasm)
    limits = limits or ModuleLimits()
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            if stat.S_ISREG(info.st_mode):
                limits.check_size(name, info.st_size)
            data = handle.read(limits.max_module_bytes + 1)
    except OSError as error:
        raise InvalidModule(f"{name}: cannot read {path}: {error.strerror or error}") from None
    limits.check_size(name, len(data))  # a file that grew, or a device
    return data


_VAL = {"i32": ValType.i32(), "i64": ValType.i64(), "f32": ValType.f32(), "f64": ValType.f64()}
