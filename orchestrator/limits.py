"""Per-call resource limits of a plugin: fuel, wall-clock timeout, memory.

A frozen value; validated on construction so a bad number fails where it is written, with
the field's name. `Limits()` holds the built-in defaults. Used by the engine (which enforces
them), the desired-state loader (which layers config.yaml and manifests over the defaults)
and the capsule layer. Imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

MAX_FUEL = 2**63 - 1
MAX_MEMORY_MIB = 4096  # 32-bit linear memories
MAX_TIMEOUT_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class Limits:
    """What one call may use.

    fuel: instructions (wasmtime fuel units) per call; default 1e9.
    memory_mib: the cap of each linear memory of an instance (the plugin's own memory and
        the kernel's), in MiB; default 64.
    timeout_ms: wall-clock time per call, enforced by epoch interruption; default 5000.
    """

    fuel: int = 1_000_000_000
    memory_mib: int = 64
    timeout_ms: int = 5000

    def __post_init__(self) -> None:
        _check("fuel", self.fuel, MAX_FUEL)
        _check("memory_mib", self.memory_mib, MAX_MEMORY_MIB)
        _check("timeout_ms", self.timeout_ms, MAX_TIMEOUT_MS)

    @classmethod
    def layered(cls, *overrides: object) -> Limits:
        """The built-in defaults with each override's non-None values applied in order (a
        mapping or a model with `fuel`, `memory_mib`, `timeout_ms`)."""
        values = {"fuel": cls.fuel, "memory_mib": cls.memory_mib, "timeout_ms": cls.timeout_ms}
        for override in overrides:
            if override is None:
                continue
            items = (override if isinstance(override, Mapping) else override.model_dump()).items()  # type: ignore[attr-defined]
            values.update({k: v for k, v in items if k in values and v is not None})
        return cls(**values)

    def as_dict(self) -> dict[str, int]:
        return {"fuel": self.fuel, "memory_mib": self.memory_mib, "timeout_ms": self.timeout_ms}


def _check(field: str, value: object, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"limits.{field} must be an integer, got {value!r}")
    if not 1 <= value <= maximum:
        raise ValueError(f"limits.{field} must be between 1 and {maximum:,}, got {value:,}")
