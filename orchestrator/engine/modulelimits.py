"""Module limits: refuse a module too big to compile safely, before wasmtime sees it.

Compiling is the one step whose cost a module's author controls without bound: a module
with 100,000 exported functions took 23.7 s and 1.2 GiB of memory to compile. So before
compiling, the engine reads a module's size and two figures from its section headers: the
function section's count (functions the module defines) and the export section's count.
Those are LEB128 numbers at the start of their sections; reading them skips from header to
header and never parses a body, so it costs microseconds whatever the module's size.

The defaults pass every real Extism plugin with room to spare and refuse the pathological:
- `max_module_bytes` 32 MiB: Rust and AssemblyScript plugins weigh 0.1-3 MB and Go plugins
  2-10 MB.
- `max_functions` 50,000: a Go PDK plugin, the largest kind, defines on the order of
  10-20k functions; the 100,000-function module above is refused.
- `max_exports` 10,000: an Extism plugin exports a handful of functions (plus `memory`,
  `_initialize`, a few globals); a thousandfold margin still refuses modules that are
  mostly exports.
All three are `WasmEngine(...)` arguments, so a deployment (or bench/engine.py) that needs
more raises them.

Used by orchestrator.engine.cache (before compiling) and orchestrator.engine.engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidModule

MIB = 1024 * 1024
WASM_MAGIC = b"\0asm"
MODULE_VERSION = b"\x01\0\0\0"
FUNCTION_SECTION = 3
EXPORT_SECTION = 7
TAG_SECTION = 13  # the one section id above 7 that may come before the exports
MAX_SECTIONS = 1000  # before the export section; real modules have a few dozen in all


@dataclass(frozen=True)
class ModuleCounts:
    """What a module's headers declare: its size in bytes, the functions it defines (not
    counting imports) and its exports."""

    size: int
    functions: int
    exports: int


@dataclass(frozen=True)
class ModuleLimits:
    """The largest module the engine compiles (see the module docstring for the defaults)."""

    max_module_bytes: int = 32 * MIB
    max_functions: int = 50_000
    max_exports: int = 10_000

    def __post_init__(self) -> None:
        for field in ("max_module_bytes", "max_functions", "max_exports"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")

    def check_size(self, name: str, size: int) -> None:
        """Refuse a module (or a file about to be read as one) larger than the limit."""
        if size > self.max_module_bytes:
            raise InvalidModule(
                f"{name}: the module is {size:,} bytes, over the limit of {self.max_module_bytes:,} bytes "
                "(max_module_bytes); if it is genuine, raise the engine's limit: WasmEngine(max_module_bytes=...)"
            )

    def check(self, name: str, counts: ModuleCounts) -> None:
        """Refuse a module whose declared size or counts exceed the limits."""
        self.check_size(name, counts.size)
        for what, figure, limit, field in (
            ("defines", counts.functions, self.max_functions, "max_functions"),
            ("exports", counts.exports, self.max_exports, "max_exports"),
        ):
            if figure > limit:
                noun = "functions" if field == "max_functions" else "items"
                raise InvalidModule(
                    f"{name}: the module {what} {figure:,} {noun}, over the limit of {limit:,} ({field}); "
                    f"compiling it would take long and much memory. If it is genuine, raise the engine's "
                    f"limit: WasmEngine({field}=...)"
                )


def module_counts(wasm: bytes, *, name: str) -> ModuleCounts:
    """The declared counts of a binary module, read from its section headers.

    A header that is cut short or malformed ends the scan: wasmtime then refuses the module
    with its own, precise message. Raises InvalidModule for a module with more than
    MAX_SECTIONS sections before its export section (which no toolchain produces, and which
    could otherwise hide a count from this scan).
    """
    size = len(wasm)
    functions = exports = 0
    if not (wasm.startswith(WASM_MAGIC) and wasm[4:8] == MODULE_VERSION):
        return ModuleCounts(size, 0, 0)
    position, sections = 8, 0
    while position < size:
        section = wasm[position]
        length, start = _leb128(wasm, position + 1)
        if length is None or (section > EXPORT_SECTION and section != TAG_SECTION):
            break  # malformed, or past the export section (sections come in order)
        sections += 1
        if sections > MAX_SECTIONS:
            raise InvalidModule(
                f"{name}: the module has more than {MAX_SECTIONS:,} sections before its exports; "
                "no WebAssembly toolchain produces that, so it is refused"
            )
        if section in (FUNCTION_SECTION, EXPORT_SECTION):
            count, _ = _leb128(wasm, start)
            if count is None:
                break
            if section == FUNCTION_SECTION:
                functions = max(functions, count)
            else:
                exports = max(exports, count)
                break
        position = start + length
    return ModuleCounts(size, functions, exports)


def _leb128(data: bytes, position: int) -> tuple[int | None, int]:
    """An unsigned LEB128 u32 at `position`: (value, position after it), or (None, _)."""
    value = shift = 0
    for index in range(position, min(position + 5, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value, index + 1) if value < 2**32 else (None, index + 1)
        shift += 7
    return None, position
