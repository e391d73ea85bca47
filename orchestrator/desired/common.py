"""What config.yaml and Capsule.toml share: names, the limits model, the nesting limit, and
how problems point (lines, dotted fields, suggestions, short lists, a cap on their number).

Used by orchestrator.desired.config, .manifest, .yamlsource and .tomlsource.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import Problem
from ..limits import MAX_MEMORY_MIB

MANIFEST = "Capsule.toml"
NAME = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
"""A package or deployment name: lowercase letters, digits and '-' (not first or last), at most 64."""

Loc = tuple[str | int, ...]

MAX_DEPTH = 64
"""How deeply mappings and lists may nest in config.yaml and Capsule.toml (the document
itself counts 1). The parsers recurse; deeper input is refused before they run."""


class LimitsOverride(BaseModel):
    """Per-call limits; each one given overrides the layers below it (built-in < config.yaml
    `defaults.limits` < the manifest's `[limits]` < the deployment's `limits`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    fuel: int | None = Field(None, gt=0, description="a whole number > 0: WebAssembly instructions per call")
    memory_mib: int | None = Field(
        None, gt=0, le=MAX_MEMORY_MIB, description=f"a whole number 1..{MAX_MEMORY_MIB}: MiB per linear memory"
    )
    timeout_ms: int | None = Field(None, gt=0, description="a whole number > 0: wall-clock milliseconds per call")


MAX_PROBLEMS = 100
"""Problems listed for one file; past this, one more says how many were left out."""
MAX_SUGGEST = 500  # beyond this many candidates, comparing a typo to each costs too much


def suggest(key: str, allowed: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the nearest allowed key, or ``""``."""
    candidates = list(allowed)
    if len(candidates) > MAX_SUGGEST or len(key) > 200:
        return ""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def listed(names: Iterable[str], limit: int = 10) -> str:
    """`a, b, c` for at most `limit` names, then `, ... (N in all)`."""
    shown = list(names)
    if len(shown) <= limit:
        return ", ".join(shown)
    return ", ".join(shown[:limit]) + f", ... ({len(shown)} in all)"


def capped(problems: list[Problem], *, file: str) -> list[Problem]:
    """The first MAX_PROBLEMS problems, and one saying how many more there were."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - MAX_PROBLEMS
    return [*problems[:MAX_PROBLEMS], Problem(f"... and {more} more problems: fix these first", file=file)]


def line_at(lines: Mapping[Loc, int], loc: Loc) -> int | None:
    """The line of key path `loc`, or of its deepest ancestor that has one."""
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return lines[loc[:depth]]
    return None


def deepest(value: Any, limit: int = MAX_DEPTH) -> Loc | None:
    """The key path of the first mapping or list in `value` nested deeper than `limit`
    (`value` itself is level 1), or None. Iterative: any depth is safe to check."""
    stack: list[tuple[Any, int, Loc]] = [(value, 1, ())]
    while stack:
        item, depth, loc = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return loc
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((v, depth + 1, (*loc, k)) for k, v in pairs)
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_line(text: str) -> int | None:
    """The line of the first lone surrogate in `text` (text decoded from a file never has
    one; text handed in by a caller might, and it cannot be encoded or hashed), or None."""
    found = _SURROGATE.search(text)
    return text.count("\n", 0, found.start()) + 1 if found else None


def dotted(loc: tuple[Any, ...]) -> str:
    """`loc` as a dotted field; a key longer than 80 characters is abbreviated (a field is
    repeated in every problem below it, and keys can be as long as the file)."""
    return ".".join(text if len(text := str(p)) <= 80 else text[:77] + "..." for p in loc)
