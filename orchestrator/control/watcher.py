"""File watching: the only module that imports watchfiles.

Two watches feed one stream of coalesced `Changes`: the config file's folder (not
recursive, filtered to the config file, so editors that save by renaming are seen) and
every capsule folder (recursive, ignoring node_modules, VCS and cache folders). A batch is
reported 10-20 ms after a burst of writes ends (`debounce=50, step=10`; median 17 ms
measured here; watchfiles' defaults take ~100 ms).

Real paths are watched: a capsule folder that is a symlink is watched at its target, and a
change there is reported for every configured folder that resolves to it (twins deploying
the link and the real folder both see it). The config file's own folder and, when the file
is a symlink, its target's folder are both watched.

Each watch is a watchfiles backend (`RustNotify`) driven on the watcher's own threads. Its
constructor installs the OS watches before it returns, so `start()` awaits exactly that:
a change made after `start()` returns is reported. A watch is kept alive:
- an error (e.g. EMFILE, too many open files; an inotify watch limit) restarts it with
  exponential backoff (`RETRY_BASE_S` doubling to `RETRY_MAX_S`, reset once a watch runs);
- a watched root that is removed, replaced or (a symlink) retargeted is noticed after each
  batch and every `TICK_MS`, and the watch restarts on what is there now (a missing folder is
  watched once it exists again);
- after every restart the next batch is a **rescan** (`Changes.rescan`): events may have been
  missed, so the runtime must re-read everything. A rescan batch also has `config=True` and
  every configured folder in `folders` (with no paths), so a consumer that ignores `rescan`
  still re-reads everything; builds are the runtime's part (see `Builder.rescan`).
A change of the folder set (`set_folders`) starts the new watch before the old one stops
(no gap), and reports each newly configured folder once, with no paths, when its watch is
in place (what changed between the runtime reading it and the watch starting is re-read).

Watchers fire while a file is still being written; telling a half-written `.wasm` from a
finished one is the loader's job (see `StaleSpec`), not this module's.

Used by the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import platform
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles
from watchfiles._rust_notify import RustNotify

logger = logging.getLogger(__name__)

DEBOUNCE_MS = 50
STEP_MS = 10
TICK_MS = 250
"""How often an idle watch checks that its roots are still the folders it watches."""
RETRY_BASE_S = 0.1
RETRY_MAX_S = 30.0
IGNORED_DIRS = frozenset({"node_modules", ".git", ".hg", ".svn", "__pycache__", ".orch", ".venv", ".mypy_cache"})

Identity = tuple[int, int] | None  # (st_dev, st_ino) of a root folder; None when missing
Roots = dict[Path, tuple[Path, ...]]  # real root -> the configured paths that resolve to it


@dataclass
class Changes:
    """One coalesced batch: whether the config changed, and the changed files per folder.

    `rescan`: the watch was restarted and events may be missing; re-read everything (the
    batch then also has `config=True` and every configured folder, with no paths).
    A folder with an empty set of paths changed in an unknown way: re-read it.
    """

    config: bool = False
    folders: dict[Path, set[Path]] = field(default_factory=dict)
    rescan: bool = False

    def __bool__(self) -> bool:
        return self.config or self.rescan or bool(self.folders)


class _Filter(watchfiles.DefaultFilter):
    def __init__(self) -> None:
        super().__init__(ignore_dirs=tuple(IGNORED_DIRS))


def _identity(path: Path) -> Identity:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _polling() -> tuple[bool, int]:
    """Whether to poll instead of using OS notifications, and how often (ms): watchfiles'
    own rules (WATCHFILES_FORCE_POLLING, WATCHFILES_POLL_DELAY_MS; on by itself under WSL)."""
    forced = os.getenv("WATCHFILES_FORCE_POLLING")
    if forced:
        force = forced.lower() not in {"false", "disable", "disabled"}
    else:
        force = "microsoft-standard" in platform.uname().release.lower() and platform.system() == "Linux"
    delay = os.getenv("WATCHFILES_POLL_DELAY_MS", "")
    return force, int(delay) if delay.isdecimal() else 300


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


@dataclass
class _Generation:
    """One RustNotify over a fixed set of roots, and what they were when it started."""

    notify: RustNotify | None  # None when no root exists yet
    roots: Roots
    identities: dict[Path, Identity]
    retired: bool = False
    healthy: bool = False  # returned from a watch call at least once


class _Watch:
    """One set of roots, watched by one generation at a time, restarted when it fails or
    its roots change. `resolve()` (run on a worker thread) says what to watch now."""

    def __init__(
        self,
        *,
        name: str,
        recursive: bool,
        resolve: Callable[[], Roots],
        on_batch: Callable[[Roots, set[tuple[int, str]]], None],
        on_start: Callable[[Roots, Roots | None, bool], None],
        executor: ThreadPoolExecutor,
        closing: threading.Event,
        debounce_ms: int,
        step_ms: int,
        retry_base: float,
        retry_max: float,
    ) -> None:
        self.name = name
        self.up = False
        self.restarts = 0
        self._recursive = recursive
        self._resolve = resolve
        self._on_batch = on_batch
        self._on_start = on_start
        self._executor = executor
        self._closing = closing
        self._debounce, self._step = debounce_ms, step_ms
        self._retry_base, self._retry_max = retry_base, retry_max
        self._wake = asyncio.Event()
        self._wanted = 0  # bumped by want(); the supervisor attempts each version
        self._attempted = -1
        self._attempts = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"watch-{self.name}")

    def want(self) -> None:
        """The roots may have changed: start a new generation (before the old one stops)."""
        self._wanted += 1
        self._wake.set()

    async def ready(self) -> None:
        """Return once the roots wanted now have been attempted (watching, or failed and
        retrying in the background)."""
        version = self._wanted
        async with self._attempts:
            await self._attempts.wait_for(lambda: self._attempted >= version or self._task is None)

    async def close(self) -> None:
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        async with self._attempts:
            self._attempts.notify_all()

    # -- the supervisor ----------------------------------------------------------------
    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        rescan = False
        current: _Generation | None = None
        pump: asyncio.Task[str] | None = None
        retiring: set[asyncio.Task[str]] = set()
        try:
            while not self._closing.is_set():
                version = self._wanted
                self._wake.clear()
                try:
                    generation = await loop.run_in_executor(self._executor, self._open)
                except (OSError, RuntimeError) as error:  # WatchfilesRustInternalError is a RuntimeError
                    self.up, rescan, failures = False, True, failures + 1
                    if pump is not None:  # the roots changed and the new watch failed
                        self._retire(current, pump, retiring)
                        current, pump = None, None
                    await self._attempted_version(version)
                    await self._retry_later(error, failures)
                    continue
                previous = current
                if pump is not None:
                    self._retire(current, pump, retiring)
                current = generation
                pump = loop.create_task(self._pump(generation), name=f"watch-{self.name}-pump")
                self.up = True
                if rescan:
                    self.restarts += 1
                    logger.info("%s watch running again; rescanning", self.name)
                self._on_start(generation.roots, previous.roots if previous else None, rescan)
                rescan = False
                await self._attempted_version(version)
                waker = loop.create_task(self._wake.wait())
                await asyncio.wait({pump, waker}, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if not pump.done():
                    continue  # want() or close(): a new generation overlaps the old one
                failure = pump.exception()
                outcome, pump = (str(failure) if failure else pump.result()), None
                self._close(current)
                current = None
                if outcome == "stop":
                    return
                self.up, rescan = False, True
                if generation.healthy:
                    failures = 0
                if outcome != "stale":
                    failures += 1
                    await self._retry_later(outcome, failures)
        finally:
            for task in [*retiring, *([pump] if pump else [])]:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await task
            self._close(current)
            self.up = False

    def _retire(
        self, generation: _Generation | None, pump: asyncio.Task[str], retiring: set[asyncio.Task[str]]
    ) -> None:
        """Let the old generation finish its current watch call (and report its batch)."""
        if generation is None:
            return
        generation.retired = True
        retiring.add(pump)

        def closed(task: asyncio.Task[str]) -> None:
            retiring.discard(task)
            self._close(generation)

        pump.add_done_callback(closed)

    async def _attempted_version(self, version: int) -> None:
        async with self._attempts:
            self._attempted = max(self._attempted, version)
            self._attempts.notify_all()

    async def _retry_later(self, error: object, failures: int) -> None:
        """Log, then wait out the backoff for `failures` in a row (want() or close() end it)."""
        delay = min(self._retry_base * 2 ** (failures - 1), self._retry_max)
        logger.warning("%s watch failed (%s); retrying in %.3g s", self.name, error, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    # -- on the worker threads --------------------------------------------------------
    def _open(self) -> _Generation:
        roots = self._resolve()
        identities = {root: _identity(root) for root in roots}
        existing = [str(root) for root, identity in identities.items() if identity is not None]
        notify = None
        if existing:
            force_polling, poll_delay_ms = _polling()
            notify = RustNotify(existing, False, force_polling, poll_delay_ms, self._recursive, False)
        return _Generation(notify, roots, identities)

    def _watch_once(self, generation: _Generation) -> tuple[set[tuple[int, str]] | str, bool]:
        """One watch call (a batch, or a tick without one), then whether the roots went
        stale: a root removed, replaced or appeared, or a configured path retargeted."""
        if generation.notify is None:
            self._closing.wait(TICK_MS / 1000)
            result: set[tuple[int, str]] | str = "stop" if self._closing.is_set() else "timeout"
        else:
            result = generation.notify.watch(self._debounce, self._step, TICK_MS, self._closing)
        if result == "stop":
            return result, False
        roots = self._resolve()
        stale = roots != generation.roots or any(_identity(r) != i for r, i in generation.identities.items())
        return result, stale

    async def _pump(self, generation: _Generation) -> str:
        """Report this generation's batches until it is retired, stale, stopped or fails."""
        loop = asyncio.get_running_loop()
        while True:
            result, stale = await loop.run_in_executor(self._executor, self._watch_once, generation)
            generation.healthy = True
            if isinstance(result, set):
                self._on_batch(generation.roots, result)
            elif result == "stop":
                return "stop"
            elif result == "signal":
                raise RuntimeError("the watch thread received a signal")
            if stale and not generation.retired:
                logger.info("%s watch: a watched folder was removed, replaced or retargeted", self.name)
                return "stale"
            if generation.retired:
                return "retired"

    def _close(self, generation: _Generation | None) -> None:
        if generation is not None and generation.notify is not None:
            generation.notify.close()
            generation.notify = None


class Watcher:
    """Watches the config file and the capsule folders; `changes()` yields batches."""

    def __init__(
        self,
        *,
        config_path: Path,
        debounce_ms: int = DEBOUNCE_MS,
        step_ms: int = STEP_MS,
        retry_base: float = RETRY_BASE_S,
        retry_max: float = RETRY_MAX_S,
    ) -> None:
        self.config_path = Path(config_path).absolute()
        self._queue: asyncio.Queue[tuple[str, Path | None]] = asyncio.Queue()
        self._folders: tuple[Path, ...] = ()
        self._stop = asyncio.Event()
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="watch")
        self._config_names: frozenset[Path] = frozenset()
        watch = functools.partial(
            _Watch,
            on_start=self._started,
            executor=self._executor,
            closing=self._closing,
            debounce_ms=debounce_ms,
            step_ms=step_ms,
            retry_base=retry_base,
            retry_max=retry_max,
        )
        self._config_watch = watch(
            name="config", recursive=False, resolve=self._config_roots, on_batch=self._config_batch
        )
        self._folder_watch = watch(
            name="capsule folder", recursive=True, resolve=self._folder_roots, on_batch=self._folder_batch
        )

    @property
    def watching(self) -> bool:
        """Whether both watches are running now (False while one is down and retrying)."""
        return self._config_watch.up and self._folder_watch.up

    @property
    def restarts(self) -> int:
        """How many times a watch came back after an error or a replaced folder."""
        return self._config_watch.restarts + self._folder_watch.restarts

    async def start(self, folders: Iterable[Path]) -> None:
        """Start watching; returns once the OS watches are in place, so a change made after
        this returns is reported. If a watch cannot start (e.g. EMFILE) this returns anyway
        and the watch is retried in the background; a rescan follows when it runs."""
        self._folders = tuple(sorted({Path(f).absolute() for f in folders}))
        self._config_watch.start()
        self._folder_watch.start()
        await asyncio.gather(self._config_watch.ready(), self._folder_watch.ready())

    def set_folders(self, folders: Iterable[Path]) -> None:
        """Watch exactly these capsule folders (each once it exists)."""
        wanted = tuple(sorted({Path(f).absolute() for f in folders}))
        if wanted == self._folders:
            return
        self._folders = wanted
        self._folder_watch.want()

    async def settled(self) -> None:
        """Return once the folders given last are watched (or their watch is retrying)."""
        await self._folder_watch.ready()

    # -- what to watch (worker threads) ------------------------------------------------
    def _config_roots(self) -> Roots:
        link, target = self.config_path, _real(self.config_path)
        self._config_names = frozenset({_real(link.parent) / link.name, target})
        roots: Roots = {}
        for parent in (link.parent, target.parent):
            roots.setdefault(_real(parent), (parent,))
        return roots

    def _folder_roots(self) -> Roots:
        roots: dict[Path, list[Path]] = {}
        for folder in self._folders:
            roots.setdefault(_real(folder), []).append(folder)
        return {root: tuple(folders) for root, folders in roots.items()}

    # -- batches (event loop) ---------------------------------------------------------
    def _config_batch(self, roots: Roots, batch: set[tuple[int, str]]) -> None:
        if any(Path(raw) in self._config_names for _, raw in batch):
            self._queue.put_nowait(("config", None))

    def _folder_batch(self, roots: Roots, batch: set[tuple[int, str]]) -> None:
        keep = _Filter()
        for change, raw in batch:
            if not keep(watchfiles.Change(change), raw):
                continue
            path = Path(raw)
            for root in (path, *path.parents):  # the innermost watched root holding it
                if root in roots:
                    relative = path.relative_to(root)
                    for folder in roots[root]:
                        self._queue.put_nowait(("folder", folder / relative))
                    break

    def _started(self, roots: Roots, previous: Roots | None, rescan: bool) -> None:
        if rescan:
            self._queue.put_nowait(("rescan", None))
        elif previous is not None:  # a new folder set: re-read the folders that joined it
            before = {folder for folders in previous.values() for folder in folders}
            for folders in roots.values():
                for folder in folders:
                    if folder not in before:
                        self._queue.put_nowait(("joined", folder))

    # -- the stream -------------------------------------------------------------------
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

    def _classify(self, items: list[tuple[str, Path | None]]) -> Changes:
        changes = Changes()
        folders = set(self._folders)
        for kind, path in items:
            if kind == "config":
                changes.config = True
            elif kind == "rescan":
                changes.rescan = changes.config = True
                for folder in self._folders:
                    changes.folders.setdefault(folder, set())
            elif kind == "joined" and path in folders:
                changes.folders.setdefault(path, set())
            elif kind == "folder" and path is not None:
                for folder in (path, *path.parents):  # the innermost watched folder holding it
                    if folder in folders:
                        changes.folders.setdefault(folder, set()).add(path)
                        break
        return changes

    async def close(self) -> None:
        """Stop both watches (within a step) and end `changes()`."""
        self._stop.set()
        self._closing.set()
        await asyncio.gather(self._config_watch.close(), self._folder_watch.close())
        self._executor.shutdown(wait=False)
