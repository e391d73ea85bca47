"""What the engine needs to know of a compiled module: its imports, read once per artifact.

Reading a module's imports or exports through wasmtime-py builds a wrapper object per item
(~20 us each: 16,000 exports cost ~310 ms). So:
- imports, needed to link every instance, are read once when the module is compiled and
  kept with it: in memory (`CompiledModule.imports`) and in the disk cache's record, so a
  warm load from either never walks them again;
- exports are never walked on a load: an instance looks each one up by name when first
  needed (orchestrator.engine.instance). The full list of callable exports is computed
  only when asked (`CompiledModule.exports`, for error messages), once per module.

Used by orchestrator.engine.cache, .plugin and .instance.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import wasmtime
from wasmtime import FuncType

VALUE_TYPES = frozenset({"i32", "i64", "f32", "f64", "v128", "funcref", "externref", "anyref", "exnref"})


@dataclass(frozen=True)
class Import:
    module: str
    name: str
    is_function: bool
    params: tuple[str, ...]
    results: tuple[str, ...]
    described: str  # how wasmtime prints its type, for messages

    @property
    def key(self) -> str:
        return f"{self.module}::{self.name}"

    def as_json(self) -> list[Any]:
        return [self.module, self.name, self.is_function, list(self.params), list(self.results), self.described]

    @classmethod
    def from_json(cls, item: object) -> Import:
        """Rebuild an import from a cache record; raises ValueError when it is malformed."""
        if not isinstance(item, list) or len(item) != 6:
            raise ValueError("an import is not a list of six items")
        module, name, is_function, params, results, described = item
        if not (isinstance(module, str) and isinstance(name, str) and isinstance(described, str)):
            raise ValueError("an import's names are not strings")
        if not isinstance(is_function, bool):
            raise ValueError("an import's kind is not a boolean")
        for types in (params, results):
            if not isinstance(types, list) or not all(isinstance(t, str) and t in VALUE_TYPES for t in types):
                raise ValueError("an import's types are not value types")
        return cls(module, name, is_function, tuple(params), tuple(results), described)


def read_imports(module: wasmtime.Module) -> tuple[Import, ...]:
    """The module's imports, through wasmtime-py (once per compiled artifact)."""
    imports = []
    for item in module.imports:
        ty = item.type
        is_function = isinstance(ty, FuncType)
        imports.append(
            Import(
                module=item.module,
                name=item.name or "",
                is_function=is_function,
                params=tuple(str(p) for p in ty.params) if isinstance(ty, FuncType) else (),
                results=tuple(str(r) for r in ty.results) if isinstance(ty, FuncType) else (),
                described=str(ty),
            )
        )
    return tuple(imports)


def callable_kind(ty: FuncType) -> bool | None:
    """For an export of type `ty`: True for `() -> i32`, False for `() -> ()`, None when it is
    not callable as an Extism function."""
    if ty.params:
        return None
    results = [str(r) for r in ty.results]
    if results == ["i32"]:
        return True
    return False if not results else None


class CompiledModule:
    """A compiled module with what the engine keeps beside it.

    `key`: the cache key (orchestrator.engine.cache). `imports`: read once at compile time.
    `kinds`: export name -> returns an i32 (True) or nothing (False), for the callable
    exports looked up so far; a function's type belongs to the module, so it is checked
    once per module, not per instance or plugin. `plans`: how its imports link, per host
    configuration (kept by orchestrator.engine.plugin).
    """

    __slots__ = ("_exports", "_lock", "imports", "initialize", "key", "kinds", "missing", "module", "plans")

    def __init__(self, *, key: str, module: wasmtime.Module, imports: tuple[Import, ...]) -> None:
        self.key = key
        self.module = module
        self.imports = imports
        self.kinds: dict[str, bool] = {}
        self.missing: set[str] = set()  # names known not to be callable exports (bounded by the plugin)
        self.plans: dict[object, tuple[Any, ...]] = {}  # how imports link (orchestrator.engine.plugin)
        self.initialize: bool | None = None  # exports `_initialize`? (None: not looked up yet)
        self._exports: tuple[str, ...] | None = None
        self._lock = threading.Lock()

    @property
    def exports(self) -> tuple[str, ...]:
        """The callable exports a user may name (`() -> i32` or `() -> ()`, not `_initialize`),
        in module order. Walks every export once per module (~20 us each): for messages."""
        with self._lock:
            if self._exports is None:
                names = []
                for export in self.module.exports:
                    ty = export.type
                    if export.name != "_initialize" and isinstance(ty, FuncType) and callable_kind(ty) is not None:
                        names.append(export.name)
                self._exports = tuple(names)
            return self._exports
