"""Per-call resource limits of a plugin: fuel, wall-clock timeout, memory.

A frozen value; validated on construction so a bad number fails where it is written, with
the field's name. Used by the engine, and later by the manifest and config loaders.
"""

from __future__ import annotations

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


def _check(field: str, value: object, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"limits.{field} must be an integer, got {value!r}")
    if not 1 <= value <= maximum:
        raise ValueError(f"limits.{field} must be between 1 and {maximum:,}, got {value:,}")
