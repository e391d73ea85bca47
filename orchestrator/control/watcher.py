"""File watching: the only module that imports watchfiles.

Two watches feed one stream of coalesced `Changes`: the config file's folder (not
recursive, filtered to the config file, so editors that save by renaming are seen) and
every capsule folder (recursive, ignoring node_modules, VCS and cache folders). watchfiles'
defaults report a change after ~100 ms; `debounce=50, step=10` reports one after ~13 ms
(measured here) while still grouping a burst of writes into one batch. The set of capsule
folders follows the config: `set_folders` restarts that watch when it changes.

Watchers fire while a file is still being written; telling a half-written `.wasm` from a
finished one is the loader's job (see `StaleSpec`), not this module's.

Used by the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

logger = logging.getLogger(__name__)

DEBOUNCE_MS = 50
STEP_MS = 10
IGNORED_DIRS = {"node_modules", ".git", ".hg", ".svn", "__pycache__", ".orch", ".venv", ".mypy_cache"}


@dataclass
class Changes:
    """One coalesced batch: whether the config changed, and the changed files per folder."""

    config: bool = False
    folders: dict[Path, set[Path]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.config or bool(self.folders)


class _Filter(watchfiles.DefaultFilter):
    def __init__(self) -> None:
        super().__init__(ignore_dirs=tuple(IGNORED_DIRS))


class Watcher:
    """Watches the config file and the capsule folders; `changes()` yields batches."""

    def __init__(self, *, config_path: Path, debounce_ms: int = DEBOUNCE_MS, step_ms: int = STEP_MS) -> None:
        self.config_path = Path(config_path).absolute()
        self._debounce = debounce_ms
        self._step = step_ms
        self._queue: asyncio.Queue[tuple[str, Path]] = asyncio.Queue()
        self._folders: tuple[Path, ...] = ()
        self._stop = asyncio.Event()
        self._folder_stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._folder_task: asyncio.Task[None] | None = None

    async def start(self, folders: Iterable[Path]) -> None:
        """Start watching; returns once the watches are in place (a change made after this
        returns is reported)."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_config(), name="watch-config"))
        self.set_folders(folders)
        # watchfiles sets up its OS watches synchronously when its generator first runs,
        # before its first await: letting the new tasks run that far is enough.
        for _ in range(3):
            await asyncio.sleep(0)

    def set_folders(self, folders: Iterable[Path]) -> None:
        """Watch exactly these capsule folders (those that exist)."""
        wanted = tuple(sorted({Path(f).absolute() for f in folders}))
        if wanted == self._folders and self._folder_task is not None:
            return
        self._folders = wanted
        if self._folder_task is not None:
            self._folder_stop.set()
        self._folder_stop = asyncio.Event()
        existing = [f for f in wanted if f.is_dir()]
        if existing:
            self._folder_task = asyncio.get_running_loop().create_task(
                self._watch(existing, self._folder_stop, recursive=True), name="watch-capsules"
            )
        else:
            self._folder_task = None

    async def _watch_config(self) -> None:
        await self._watch([self.config_path.parent], self._stop, recursive=False)

    async def _watch(self, paths: list[Path], stop: asyncio.Event, *, recursive: bool) -> None:
        either = asyncio.Event()

        async def relay(event: asyncio.Event) -> None:
            await event.wait()
            either.set()

        relays = [asyncio.create_task(relay(stop)), asyncio.create_task(relay(self._stop))]
        try:
            async for batch in watchfiles.awatch(
                *paths,
                watch_filter=_Filter(),
                debounce=self._debounce,
                step=self._step,
                stop_event=either,
                recursive=recursive,
            ):
                for _, raw in batch:
                    path = Path(raw)
                    if not recursive and path != self.config_path:
                        continue
                    self._queue.put_nowait(("config" if not recursive else "folder", path))
        except (FileNotFoundError, OSError) as error:  # a watched folder vanished
            logger.warning("file watch stopped: %s", error)
        finally:
            for task in relays:
                task.cancel()

    async def changes(self) -> AsyncIterator[Changes]:
        """Batches of changes, until `close()`. Changes that arrive together are merged."""
        while not self._stop.is_set():
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(self._stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if getter not in done:
                getter.cancel()
                return
            items = [getter.result()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            yield self._classify(items)

    def _classify(self, items: list[tuple[str, Path]]) -> Changes:
        changes = Changes()
        folders = set(self._folders)
        for kind, path in items:
            if kind == "config":
                changes.config = True
                continue
            for folder in (path, *path.parents):  # the innermost watched folder holding it
                if folder in folders:
                    changes.folders.setdefault(folder, set()).add(path)
                    break
        return changes

    async def close(self) -> None:
        self._stop.set()
        self._folder_stop.set()
        tasks = [*self._tasks, *([self._folder_task] if self._folder_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
