"""What the engine needs to know of a compiled module's imports and exports, read once.

Reading imports and exports through wasmtime-py builds a wrapper object per item (~100 us
for a small module); a plugin load, a reload and every capsule of a large deployment would
pay it again. `ModuleShape` is computed once per compiled module and cached by the engine.

Used by orchestrator.engine.plugin and orchestrator.engine.engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import wasmtime
from wasmtime import FuncType


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


@dataclass(frozen=True)
class ModuleShape:
    imports: tuple[Import, ...]
    # Callable exports: name -> (export index, returns an i32). A callable export takes no
    # arguments and returns an i32 status or nothing, as in Extism.
    callable: dict[str, tuple[int, bool]]
    memory_export: int | None
    initialize_export: int | None

    @property
    def functions(self) -> tuple[str, ...]:
        """The callable exports a user may name (not `_initialize`)."""
        return tuple(name for name in self.callable if name != "_initialize")


def module_shape(module: wasmtime.Module) -> ModuleShape:
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
    callable_exports: dict[str, tuple[int, bool]] = {}
    indices: dict[str, int] = {}
    for index, export in enumerate(module.exports):
        indices[export.name] = index
        ty = export.type
        if isinstance(ty, FuncType) and not ty.params:
            results = [str(r) for r in ty.results]
            if results in ([], ["i32"]):
                callable_exports[export.name] = (index, bool(results))
    return ModuleShape(
        imports=tuple(imports),
        callable=callable_exports,
        memory_export=indices.get("memory"),
        initialize_export=indices.get("_initialize"),
    )
