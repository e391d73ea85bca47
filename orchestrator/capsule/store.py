"""The capsules' key-value store: one SQLite database through one aiosqlite connection.

Keys are scoped per capsule (the capsule's name is part of the primary key), so one capsule
never sees another's. The database runs in WAL mode with `synchronous=NORMAL`: a committed
write survives the process being killed (SIGKILL), which is what "durable" means here.

Writes are *staged* and committed in groups. Host functions run on wasm worker threads and
stage their writes without waiting (`stage_set`, `stage_delete`: a dict update under a
lock); the capsule layer then awaits `commit(seq)` before it returns the tool call's
result, so an acknowledged write is on disk. Concurrent calls share one commit: while a
commit runs, the next batch gathers, and one transaction writes it. Reads see staged and
in-flight writes first, then an LRU cache of committed values (absent keys included), then
the database; a worker thread that misses everything hops to the event loop for the query.

The only module that imports aiosqlite. Used by orchestrator.capsule (through
`CapsuleKV`), the CLI and, later, the control API.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import OrchestratorError

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    capsule TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   BLOB NOT NULL,
    PRIMARY KEY (capsule, key)
) WITHOUT ROWID
"""
_ABSENT = None  # a cached "no such key"
_MISS = object()  # not known without asking the database
CACHE_BYTES = 64 << 20
THREAD_WAIT_SECONDS = 30.0

Entry = tuple[str, str]  # (capsule, key)


class StoreError(OrchestratorError):
    """The database could not be opened, read or written (the message says which and why)."""


class KVStore:
    """Per-capsule key-value pairs in SQLite. Create with `await KVStore.open(path)`."""

    def __init__(self, db: aiosqlite.Connection, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self._db = db
        self._loop = loop
        self._loop_thread = threading.get_ident()  # created on the loop's thread (see open)
        self._lock = threading.Lock()
        self._pending: dict[Entry, bytes | None] = {}  # staged, not yet being written
        self._inflight: dict[Entry, bytes | None] = {}  # being written by the running commit
        self._cache: OrderedDict[Entry, bytes | None] = OrderedDict()
        self._cache_bytes = 0
        self._staged_seq = 0
        self._committed_seq = 0
        self._committing: asyncio.Future[None] | None = None
        self._closed = False
        self.stats = {"commits": 0, "rows_written": 0, "db_reads": 0}

    @classmethod
    async def open(cls, path: Path) -> KVStore:
        """Open (creating if needed) the database at `path`."""
        path = Path(path)
        db: aiosqlite.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(path)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute(SCHEMA)
            await db.commit()
        except (OSError, aiosqlite.Error) as error:
            if db is not None:
                await db.close()
            raise StoreError(f"cannot open the KV database {path}: {error}") from None
        return cls(db, path, asyncio.get_running_loop())

    async def close(self) -> None:
        """Commit what is staged, then close the connection."""
        if self._closed:
            return
        await self.commit()
        self._closed = True
        await self._db.close()

    # -- staging (any thread, never waits) ------------------------------------------------
    def stage_set(self, capsule: str, key: str, value: bytes) -> int:
        """Stage a write; returns its sequence number for `commit`."""
        with self._lock:
            self._check_open()
            self._pending[(capsule, key)] = bytes(value)
            self._staged_seq += 1
            return self._staged_seq

    def stage_delete(self, capsule: str, key: str) -> int:
        with self._lock:
            self._check_open()
            self._pending[(capsule, key)] = None
            self._staged_seq += 1
            return self._staged_seq

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the KV database {self.path} is closed")

    # -- committing ----------------------------------------------------------------------
    async def commit(self, upto: int | None = None) -> None:
        """Return once every write staged up to `upto` (default: everything staged so far)
        is committed. Concurrent callers share commits."""
        target = self._staged_seq if upto is None else upto
        while self._committed_seq < target:
            running = self._committing
            if running is not None:
                await asyncio.shield(running)
                continue
            self._committing = self._loop.create_future()
            try:
                await self._write_batch()
                self._committing.set_result(None)
            except BaseException as error:
                self._committing.set_exception(error)
                self._committing.exception()  # retrieved: no "never retrieved" warning
                raise
            finally:
                self._committing = None

    async def _write_batch(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
            self._inflight = batch
            top = self._staged_seq
        try:
            if batch:
                sets = [(c, k, v) for (c, k), v in batch.items() if v is not None]
                deletes = [(c, k) for (c, k), v in batch.items() if v is None]
                if sets:
                    await self._db.executemany(
                        "INSERT INTO kv (capsule, key, value) VALUES (?, ?, ?) "
                        "ON CONFLICT (capsule, key) DO UPDATE SET value = excluded.value",
                        sets,
                    )
                if deletes:
                    await self._db.executemany("DELETE FROM kv WHERE capsule = ? AND key = ?", deletes)
                await self._db.commit()
                self.stats["commits"] += 1
                self.stats["rows_written"] += len(batch)
        except (aiosqlite.Error, OSError) as error:
            with self._lock:  # put the batch back under newer writes, for the next attempt
                self._pending = {**batch, **self._pending}
                self._inflight = {}
            raise StoreError(f"cannot write the KV database {self.path}: {error}") from None
        with self._lock:
            self._inflight = {}
            for entry, value in batch.items():
                self._remember(entry, value)
            self._committed_seq = max(self._committed_seq, top)

    # -- reading -------------------------------------------------------------------------
    def _known(self, entry: Entry) -> Any:
        """The value if staged, in flight or cached (None = absent); _MISS otherwise."""
        with self._lock:
            if entry in self._pending:
                return self._pending[entry]
            if entry in self._inflight:
                return self._inflight[entry]
            if entry in self._cache:
                self._cache.move_to_end(entry)
                return self._cache[entry]
        return _MISS

    def _remember(self, entry: Entry, value: bytes | None) -> None:
        """Cache a committed value (lock held)."""
        old = self._cache.pop(entry, _MISS)
        if isinstance(old, bytes):
            self._cache_bytes -= len(old)
        self._cache[entry] = value
        self._cache_bytes += len(value) if value else 0
        while self._cache_bytes > CACHE_BYTES and self._cache:
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= len(dropped) if dropped else 0

    async def get(self, capsule: str, key: str) -> bytes | None:
        """The value, or None when the key is absent."""
        known = self._known((capsule, key))
        if known is not _MISS:
            return known  # type: ignore[no-any-return]
        try:
            rows = await self._db.execute_fetchall("SELECT value FROM kv WHERE capsule = ? AND key = ?", (capsule, key))
        except (aiosqlite.Error, OSError) as error:
            raise StoreError(f"cannot read the KV database {self.path}: {error}") from None
        self.stats["db_reads"] += 1
        value = bytes(next(iter(rows))[0]) if rows else None
        with self._lock:
            if (capsule, key) not in self._pending and (capsule, key) not in self._inflight:
                self._remember((capsule, key), value)
        return value

    def get_from_thread(self, capsule: str, key: str) -> bytes | None:
        """`get` for a worker thread (a host function): no hop when the value is known."""
        known = self._known((capsule, key))
        if known is not _MISS:
            return known  # type: ignore[no-any-return]
        value: bytes | None = self._from_thread(self.get(capsule, key))
        return value

    async def list_keys(self, capsule: str, prefix: str = "") -> list[str]:
        """Keys of `capsule` starting with `prefix`, sorted."""
        try:
            rows = await self._db.execute_fetchall(
                "SELECT key FROM kv WHERE capsule = ? AND substr(key, 1, ?) = ? ORDER BY key",
                (capsule, len(prefix), prefix),
            )
        except (aiosqlite.Error, OSError) as error:
            raise StoreError(f"cannot read the KV database {self.path}: {error}") from None
        keys = {str(row[0]) for row in rows}
        with self._lock:
            for changes in (self._inflight, self._pending):  # newer last
                for (c, k), v in changes.items():
                    if c == capsule and k.startswith(prefix):
                        if v is None:
                            keys.discard(k)
                        else:
                            keys.add(k)
        return sorted(keys)

    def list_keys_from_thread(self, capsule: str, prefix: str = "") -> list[str]:
        keys: list[str] = self._from_thread(self.list_keys(capsule, prefix))
        return keys

    async def set(self, capsule: str, key: str, value: bytes) -> None:
        """Write and commit."""
        await self.commit(self.stage_set(capsule, key, value))

    async def delete(self, capsule: str, key: str) -> bool:
        """Delete and commit; whether the key existed."""
        existed = await self.get(capsule, key) is not None
        await self.commit(self.stage_delete(capsule, key))
        return existed

    async def capsules(self) -> list[str]:
        """Names of the capsules that have keys."""
        rows = await self._db.execute_fetchall("SELECT DISTINCT capsule FROM kv ORDER BY capsule")
        return [str(row[0]) for row in rows]

    def _from_thread(self, coroutine: Any) -> Any:
        if threading.get_ident() == self._loop_thread:
            coroutine.close()
            raise RuntimeError("KVStore *_from_thread called on the event loop thread: await the async method")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(THREAD_WAIT_SECONDS)
