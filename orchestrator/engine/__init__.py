"""The capsule engine: Extism-ABI plugins on wasmtime, the only package that imports wasmtime.

from orchestrator.engine import WasmEngine, Limits
engine = WasmEngine(cache_dir=None)        # a Path enables the on-disk module cache
plugin = engine.load(wasm, name="hello", config={"greeting": "Hi"}, limits=Limits(fuel=10**8))
out = plugin.call("greet", b"Ada")
plugin.last_fuel_used
plugin.close()
"""

from ..limits import Limits
from .engine import WasmEngine
from .hostcall import USER_NAMESPACE, HostCall, HostFunction
from .plugin import Plugin

__all__ = ["USER_NAMESPACE", "HostCall", "HostFunction", "Limits", "Plugin", "WasmEngine"]
