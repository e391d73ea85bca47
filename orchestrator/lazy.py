"""Lazy re-exports for package `__init__` modules.

A subpackage's `__init__` names its public surface, but importing the package must not
import everything behind it: `orch status` and the dashboard import the API client, which
sits in a package whose siblings load wasmtime. `lazy_exports` gives an `__init__` a module
`__getattr__` that imports a name's module on first use (PEP 562); the `__init__` also
imports the same names under `TYPE_CHECKING`, so type checkers see them as usual.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `exports` maps each name to its submodule."""

    def __getattr__(name: str) -> Any:  # noqa: N807  (the name PEP 562 requires)
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
