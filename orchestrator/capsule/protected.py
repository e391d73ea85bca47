"""The places no capsule ever reaches through the file airlocks, whatever its grants.

A capsule that can write the orchestrator's own files can take over the host: plant a
compiled module in the cache (native code, outside every sandbox), rewrite a `Capsule.toml`
(grant itself more, or set a `[build] command` the watcher runs as a shell), rewrite the
config file (deploy a capsule of its own), read every capsule's KV from the database, or
add a git hook. `ProtectedPaths` is the list of those places, as an immutable value:

- areas, each an absolute path and the reason shown in a denial: the state dir (KV
  database and its WAL, module cache, control socket, applied state), the module cache
  (when configured elsewhere), the config file, and every capsule folder (manifest, wasm,
  build sources and outputs), and what a build command runs from outside its capsule's
  folder (`build_inputs`). `build` records each path both as given (made absolute) and as
  its real path (symlinks resolved), so a folder reached either way is covered;
- names protected anywhere below the workspace: `.git` (hooks and config run code). An
  entry of that name is protected whether it is a folder or a file (a worktree's `.git`
  file names its git dir).

Paths are compared component-wise and without regard to case (`.ORCH` is `.orch`: a
case-insensitive file system cannot be used to slip past; on a case-sensitive one this
only ever denies more). A protected area covers itself and everything below it.

One value is shared by every capsule of an orchestrator. When the config changes the
runtime builds a new value and swaps it into its `ProtectedHolder`; gates read `.current`
at each access (one attribute read: no lock is needed by worker threads, and each access
sees one consistent value). A `ProtectedPaths` is its own `.current`, so a fixed value can
be passed where a holder is expected.

Used by the gate (orchestrator.capsule.gate) and, to build and swap the value, the runtime.
Imports nothing of ours.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

STATE_DIR = "the orchestrator's state dir is never reachable by capsules"
MODULE_CACHE = "the compiled-module cache is never reachable by capsules"
CONFIG_FILE = "the orchestrator's config file is never reachable by capsules"
CAPSULE_FOLDER = "a capsule's folder (manifest, module, build sources) is never reachable by capsules"
BUILD_INPUT = "a capsule build's inputs are never reachable by capsules (builds run them)"
GIT = "git folders are never reachable by capsules (their hooks run code)"


def _key(parts: Iterable[str]) -> tuple[str, ...]:
    return tuple(part.casefold() for part in parts)


@dataclass(frozen=True, slots=True)
class ProtectedArea:
    """An absolute path no capsule reaches (nor anything below it), and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ProtectedPaths:
    """Immutable: the protected areas and names. Build with `ProtectedPaths.build(...)`."""

    areas: tuple[ProtectedArea, ...] = ()
    names: tuple[tuple[str, str], ...] = ((".git", GIT),)
    _index: dict[tuple[str, ...], str] = field(init=False, repr=False, compare=False)
    _names: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[tuple[str, ...], str] = {}
        for area in self.areas:
            if not area.path.is_absolute():
                raise ValueError(f"protected path {area.path} is not absolute")
            index.setdefault(_key(area.path.parts), area.reason)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_names", {name.casefold(): reason for name, reason in self.names})

    @classmethod
    def build(
        cls,
        *,
        state_dir: Path | None = None,
        cache_dir: Path | None = None,
        config_file: Path | None = None,
        capsule_folders: Iterable[Path] = (),
        build_inputs: Iterable[Path] = (),
        extra: Iterable[ProtectedArea] = (),
        git: bool = True,
    ) -> ProtectedPaths:
        """The value for one orchestrator; relative paths are taken from the current folder.

        `build_inputs`: files or folders outside the capsule folders that a `[build]
        command` runs or reads (a shared build script, package.json, node_modules, a shared
        SDK): the build command is a shell, so only the runtime can say what they are.

        Each path is recorded as given (made absolute) and as its real path. Paths that do
        not exist yet are protected all the same (their existing part resolved).
        """
        wanted: list[tuple[Path, str]] = []
        if state_dir is not None:
            wanted.append((state_dir, STATE_DIR))
        if cache_dir is not None:
            wanted.append((cache_dir, MODULE_CACHE))
        if config_file is not None:
            wanted.append((config_file, CONFIG_FILE))
        wanted += [(folder, CAPSULE_FOLDER) for folder in capsule_folders]
        wanted += [(path, BUILD_INPUT) for path in build_inputs]
        wanted += [(area.path, area.reason) for area in extra]
        areas: dict[Path, str] = {}
        for path, reason in wanted:
            for form in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
                areas.setdefault(form, reason)
        return cls(
            areas=tuple(ProtectedArea(path, reason) for path, reason in areas.items()),
            names=((".git", GIT),) if git else (),
        )

    @property
    def current(self) -> ProtectedPaths:
        """Itself: a fixed value stands where a holder is expected."""
        return self

    def exact(self, key: tuple[str, ...]) -> str | None:
        """The reason for the area at exactly `key` (casefolded absolute parts), if any."""
        return self._index.get(key)

    def name(self, name: str) -> str | None:
        """The reason when an entry called `name` is protected wherever it is."""
        return self._names.get(name.casefold()) if self._names else None

    def below(self, workspace: Path) -> tuple[str | None, dict[tuple[str, ...], str]]:
        """For walks that start at `workspace` (a real path): why the workspace itself is
        protected (or None), and the areas below it by casefolded relative components."""
        start = _key(workspace.parts)
        inside = {key[len(start) :]: why for key, why in self._index.items() if key[: len(start)] == start}
        return self.reason(workspace, workspace=workspace), {key: why for key, why in inside.items() if key}

    def reason(self, path: Path, *, workspace: Path) -> str | None:
        """Why absolute `path` is protected: it is or lies inside an area (checked over all
        its ancestors), or one of its components below `workspace` is a protected name."""
        parts = path.parts
        key = _key(parts)
        for end in range(1, len(key) + 1):
            found = self._index.get(key[:end])
            if found is not None:
                return found
        below = parts[len(workspace.parts) :] if key[: len(workspace.parts)] == _key(workspace.parts) else ()
        for part in below:
            found = self.name(part)
            if found is not None:
                return found
        return None


class ProtectedSource(Protocol):
    """Where a gate reads the protected paths at each access: a holder or a fixed value."""

    @property
    def current(self) -> ProtectedPaths: ...


class ProtectedHolder:
    """The runtime's mutable cell: assign a new `ProtectedPaths` to `current` to swap it."""

    __slots__ = ("current",)

    def __init__(self, value: ProtectedPaths | None = None) -> None:
        self.current: ProtectedPaths = value if value is not None else ProtectedPaths()
