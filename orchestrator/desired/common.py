"""What config.yaml and Capsule.toml share: names, the limits model, and how problems point.

Used by orchestrator.desired.config, .manifest and .yamlsource.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from ..limits import MAX_MEMORY_MIB

MANIFEST = "Capsule.toml"
NAME = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
"""A package or deployment name: lowercase letters, digits and '-' (not first or last), at most 64."""

Loc = tuple[str | int, ...]


class LimitsOverride(BaseModel):
    """Per-call limits; each one given overrides the layers below it (built-in < config.yaml
    `defaults.limits` < the manifest's `[limits]` < the deployment's `limits`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    fuel: int | None = Field(None, gt=0, description="a whole number > 0: WebAssembly instructions per call")
    memory_mib: int | None = Field(
        None, gt=0, le=MAX_MEMORY_MIB, description=f"a whole number 1..{MAX_MEMORY_MIB}: MiB per linear memory"
    )
    timeout_ms: int | None = Field(None, gt=0, description="a whole number > 0: wall-clock milliseconds per call")


def suggest(key: str, allowed: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the nearest allowed key, or ``""``."""
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def line_at(lines: Mapping[Loc, int], loc: Loc) -> int | None:
    """The line of key path `loc`, or of its deepest ancestor that has one."""
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in lines:
            return lines[loc[:depth]]
    return None


def dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc)
