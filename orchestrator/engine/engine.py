"""WasmEngine: one wasmtime Engine, the kernel, the module cache and the epoch ticker.

One engine per process configuration. It compiles (through the cache) and loads plugins;
each `Plugin` then owns its Stores. The engine enables fuel metering and epoch
interruption; a daemon thread advances the epoch every `tick_ms`, which is what turns a
call's `timeout_ms` into an interrupt. Memories never move (`memory_may_move = False`), so
a view over the kernel memory stays valid as it grows.

Used by the CLI, the benchmarks and (later) the capsule layer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import FuncType, Linker, ValType

from ..errors import InvalidModule
from ..limits import Limits
from .cache import CompiledModuleCache
from .hostcall import HostFunction
from .kernel import kernel_wasm
from .kernel_services import KERNEL_HOST_FUNCTIONS
from .plugin import Plugin, ticks_for
from .shape import ModuleShape, module_shape

logger = logging.getLogger(__name__)

WasmSource = bytes | bytearray | memoryview | str | Path


class WasmEngine:
    """Loads Extism-ABI plugins onto wasmtime with fuel, limits and a compiled-module cache.

    `cache_dir`: a folder for compiled artifacts (created 0700), or None for memory only.
    `fuel`: meter instructions (on by default; off only to measure its cost).
    `tick_ms`: epoch tick, the resolution of call timeouts.
    """

    def __init__(self, cache_dir: Path | str | None = None, *, fuel: bool = True, tick_ms: float = 5.0) -> None:
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
        self.cache = CompiledModuleCache(
            self.wasmtime,
            fingerprint=self.fingerprint,
            directory=Path(cache_dir) if cache_dir is not None else None,
        )
        kernel_module = self.cache.get(kernel_wasm(), name="kernel")
        linker = Linker(self.wasmtime)
        for name, params, results, callback in KERNEL_HOST_FUNCTIONS:
            ty = FuncType([_VAL[p] for p in params], [_VAL[r] for r in results])
            linker.define_func("orch:kernel", name, ty, callback, access_caller=True)
        self.kernel_pre = linker.instantiate_pre(kernel_module)
        self.kernel_exports: Mapping[str, int] = {e.name: i for i, e in enumerate(kernel_module.exports)}
        self._shapes: weakref.WeakKeyDictionary[wasmtime.Module, ModuleShape] = weakref.WeakKeyDictionary()
        self._wasi_linker: Linker | None = None
        self._wasi_lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        interval = self.tick_ms / 1000
        while not self._stop.wait(interval):
            self.wasmtime.increment_epoch()

    def shape(self, module: wasmtime.Module) -> ModuleShape:
        """The module's imports and exports as the engine needs them (computed once)."""
        shape = self._shapes.get(module)
        if shape is None:
            shape = self._shapes[module] = module_shape(module)
        return shape

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
        return self.cache.get(read_wasm(wasm, name=name), name=name, digest=digest)

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
        module = self.compile(wasm, name=name, digest=digest)
        return Plugin(
            engine=self,
            module=module,
            shape=self.shape(module),
            name=name,
            config=dict(config or {}),
            limits=limits or Limits(),
            wasi=wasi,
            host_functions=host_functions,
            instances=instances,
        )

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


def read_wasm(wasm: WasmSource, *, name: str) -> bytes:
    if isinstance(wasm, (bytes, bytearray, memoryview)):
        return bytes(wasm)
    path = Path(wasm)
    try:
        return path.read_bytes()
    except OSError as error:
        raise InvalidModule(f"{name}: cannot read {path}: {error.strerror or error}") from None


_VAL = {"i32": ValType.i32(), "i64": ValType.i64(), "f32": ValType.f32(), "f64": ValType.f64()}
