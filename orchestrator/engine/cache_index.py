"""The disk cache's size bound: an in-memory index of its artifacts, least recently used first.

Built once when the cache opens, by listing the folder (artifact and record sizes; the
record's mtime, which a disk load touches, orders entries across restarts). After every
store, least recently used artifacts are deleted until the folder's artifacts and records
fit in `max_bytes`, skipping every *pinned* artifact: one a live plugin was loaded from
(pinned by `WasmEngine.load`, released by `Plugin.close`). Deleting an artifact that some
process has memory-mapped is safe (unlinking never truncates a mapping).

Several processes may share one folder: each keeps its own index, adds what it finds on a
disk load, and ignores files another process already deleted; the bound then holds per
process, and is exceeded at most by what the others wrote since.

Used by orchestrator.engine.cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path

logger = logging.getLogger(__name__)

ARTIFACT = ".cwasm"
RECORD = ".json"
STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a crash


class DiskIndex:
    """Sizes and LRU order of the artifacts in one cache folder, with pins."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"cache_max_bytes must be positive, got {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.evicted = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()  # key -> bytes on disk, LRU first
        self._pins: Counter[str] = Counter()
        self._total = 0
        self._lock = threading.Lock()
        self._scan()

    @property
    def total_bytes(self) -> int:
        return self._total

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        now = time.time()
        try:
            entries = list(os.scandir(self.directory))
        except OSError as error:
            logger.warning("module cache: cannot list %s: %s", self.directory, error)
            return
        names = {entry.name: entry for entry in entries}
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                if now - info.st_mtime > STALE_TEMP_SECONDS:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                continue
            if not entry.name.endswith(ARTIFACT):
                continue
            key = entry.name[: -len(ARTIFACT)]
            size, used = info.st_size, info.st_mtime
            record = names.get(key + RECORD)
            if record is not None:
                with contextlib.suppress(OSError):
                    record_info = record.stat(follow_symlinks=False)
                    size += record_info.st_size
                    used = record_info.st_mtime
            found.append((used, key, size))
        for _, key, size in sorted(found):
            self._sizes[key] = size
            self._total += size

    def used(self, key: str, size: int | None = None) -> None:
        """`key` was just loaded or stored (`size`: its bytes on disk, when known)."""
        with self._lock:
            if key in self._sizes:
                self._sizes.move_to_end(key)
                if size is not None:
                    self._total += size - self._sizes[key]
                    self._sizes[key] = size
                return
        if size is None:
            size = self._size_on_disk(key)
        with self._lock:
            self._total += size - self._sizes.get(key, 0)
            self._sizes[key] = size
            self._sizes.move_to_end(key)

    def pin(self, key: str) -> None:
        with self._lock:
            self._pins[key] += 1

    def release(self, key: str) -> None:
        with self._lock:
            if self._pins[key] <= 1:
                del self._pins[key]
            else:
                self._pins[key] -= 1

    def pinned(self, key: str) -> bool:
        return self._pins[key] > 0

    def forget(self, key: str) -> None:
        with self._lock:
            self._total -= self._sizes.pop(key, 0)

    def evict(self) -> list[str]:
        """Delete least recently used, unpinned artifacts until the folder fits the bound.
        Returns the keys deleted."""
        victims: list[str] = []
        with self._lock:
            if self._total <= self.max_bytes:
                return victims
            for key in list(self._sizes):
                if self._total <= self.max_bytes:
                    break
                if self._pins[key] > 0:
                    continue
                self._total -= self._sizes.pop(key)
                victims.append(key)
            self.evicted += len(victims)
        for key in victims:
            for suffix in (ARTIFACT, RECORD):
                try:
                    os.unlink(self.directory / f"{key}{suffix}")
                except FileNotFoundError:
                    pass  # another process evicted it first
                except OSError as error:
                    logger.warning("module cache: could not evict %s%s: %s", key, suffix, error)
        if victims:
            logger.debug("module cache: evicted %d artifact(s) to stay under %d bytes", len(victims), self.max_bytes)
        return victims

    def _size_on_disk(self, key: str) -> int:
        size = 0
        for suffix in (ARTIFACT, RECORD):
            with contextlib.suppress(OSError):
                size += os.stat(self.directory / f"{key}{suffix}", follow_symlinks=False).st_size
        return size
