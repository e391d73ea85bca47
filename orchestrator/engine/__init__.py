"""The capsule engine: Extism-ABI plugins on wasmtime, the only package that imports wasmtime.

from orchestrator.engine import WasmEngine, Limits, load_or_create_key
engine = WasmEngine(cache_dir=None)        # a Path enables the on-disk module cache
engine = WasmEngine(cache_dir=state / "modules", cache_key=load_or_create_key(state / "cache.key"))
plugin = engine.load(wasm, name="hello", config={"greeting": "Hi"}, limits=Limits(fuel=10**8))
plugin.has_function("greet")               # one lookup by name
out = plugin.call("greet", b"Ada")
plugin.last_fuel_used
plugin.close()
"""

from ..limits import Limits
from .cache import load_or_create_key
from .engine import WasmEngine
from .hostcall import USER_NAMESPACE, HostCall, HostFunction
from .plugin import Plugin

__all__ = ["USER_NAMESPACE", "HostCall", "HostFunction", "Limits", "Plugin", "WasmEngine", "load_or_create_key"]
