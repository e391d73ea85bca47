"""The capsules' key-value store: one SQLite database through one aiosqlite connection.

Keys are scoped per capsule (the capsule's name is part of the primary key), so one capsule
never sees another's. The database runs in WAL mode with `synchronous=NORMAL`: a committed
write survives the process being killed (SIGKILL), which is what "durable" means here. Each
value carries a CRC-32, checked on every read from the database: a damaged value is an
error, never served. Opening checks the file (`PRAGMA quick_check`) and refuses a corrupt,
read-only or misplaced database with one line that names the file and what to do (see
orchestrator.capsule.kvfile; `check_database`, re-exported here, is `orch validate`'s
read-only check).

Writes are *staged* and committed in groups. Host functions run on wasm worker threads and
stage their writes without waiting (a dict update under a lock); the capsule layer then
awaits `commit(ticket)` before it returns the tool call's result, so an acknowledged write
is on disk. Concurrent calls share one commit: while a commit runs, the next batch gathers,
and one transaction writes it. A commit that fails is rolled back, and it fails the batch in
flight *and every batch staged after it* (whose calls may have read the failed writes):
their writes are dropped from every view, their calls fail, and nothing of them is ever
committed later.

Isolation (the KV contract for tool calls): **serializable, optimistic**. A call reads the
latest staged view (its own writes first, then staged, in-flight, cached, committed) and
records, for each read, a version stamp taken *before* the value; a key listing records its
capsule's listing stamp. Stamps live in a fixed table of hash stripes (bounded memory; two
keys sharing a stripe only cost a needless retry). `stage_call` validates every stamp and
stages the writes in one step under the store's lock: if anything the call read changed, it
stages nothing and reports a conflict, and the capsule layer runs the call again. The
staging order is a serial order of the calls. A call that read staged but uncommitted data
waits for that data's commit before it replies, and fails (or, not yet staged, conflicts)
if that commit fails. Readers outside calls (`get`, `list_keys`: the control API, the CLI)
see committed data only; their writes (`set`, `delete`) are blind and bump the stamps too.

Snapshots of a capsule's keys (orchestrator.capsule.snapshots) live in the same database;
`restore_snapshot` puts one back as a staged batch, so it obeys the same isolation.

The only module that imports aiosqlite. Used by orchestrator.capsule (through `CallKV` and
`CapsuleKV`), the control runtime, the control API and the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import KVConflict, StoreError  # StoreError, KVConflict: re-exported
from . import snapshots
from .kvfile import RECOVER, check_database, crc, prepare_database
from .snapshots import SnapshotInfo

logger = logging.getLogger(__name__)

UPSERT = (
    "INSERT INTO kv (capsule, key, value, crc) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (capsule, key) DO UPDATE SET value = excluded.value, crc = excluded.crc"
)
_MISS = object()  # not known without asking the database
CACHE_BYTES = 64 << 20
THREAD_WAIT_SECONDS = 30.0
STRIPES = 4096  # version stamps: a power of two
_LISTING = "\x00listing"  # the stripe key of a capsule's key listing (no real key has a NUL)

__all__ = ["CONFLICT", "Batch", "Conflict", "KVConflict", "KVStore", "Staged", "StoreError", "check_database"]

Entry = tuple[str, str]  # (capsule, key)
Read = tuple[int, int, Any, bool]  # (stripe, version before the read, value, from staged data)


class Batch:
    """Writes staged together and committed in one transaction; a call's commit ticket.

    `done` once its transaction committed or failed (`error`). `callbacks` run after a
    successful commit, in staging order (the calls' bus events)."""

    __slots__ = ("callbacks", "done", "error", "writes")

    def __init__(self) -> None:
        self.writes: dict[Entry, bytes | None] = {}
        self.callbacks: list[Callable[[], None]] = []
        self.done = False
        self.error: str | None = None


class Conflict:
    """`stage_call`'s answer when something the call read has changed: nothing was staged."""

    __slots__ = ()


CONFLICT = Conflict()
Staged = Batch | Conflict | None  # a ticket to commit, a conflict, or nothing to wait for


def _stripe(entry: Entry) -> int:
    return hash(entry) & (STRIPES - 1)


class KVStore:
    """Per-capsule key-value pairs in SQLite. Create with `await KVStore.open(path)`."""

    def __init__(self, db: aiosqlite.Connection, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self._db = db
        self._loop = loop
        self._loop_thread = threading.get_ident()  # created on the loop's thread (see open)
        self._lock = threading.Lock()  # staging, versions and views; never held across an await
        self._db_lock = asyncio.Lock()  # a transaction and the reads that must not see it
        self._versions = [0] * STRIPES
        self._pending = Batch()  # staged, not yet being written
        self._inflight: Batch | None = None  # being written by the running commit
        self._cache: dict[Entry, bytes | None] = {}  # committed values (None: absent), LRU order
        self._cache_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._broken = ""  # set when a failed transaction could not be rolled back
        self.stats = {"commits": 0, "rows_written": 0, "db_reads": 0, "conflicts": 0, "failed_commits": 0}

    @classmethod
    async def open(cls, path: Path, *, busy_timeout_ms: int = 5000) -> KVStore:
        """Open (creating if needed, private to this user) the database at `path`, after
        checking it; StoreError with one line naming the file and what to do otherwise."""
        path = Path(path)
        problem = await asyncio.to_thread(prepare_database, path)
        if problem is not None:
            raise StoreError(problem)
        connection = aiosqlite.connect(path)
        try:
            db = await connection
        except (sqlite3.Error, OSError) as error:
            await _join_worker(connection)
            raise StoreError(f"cannot open the KV database {path}: {error}") from None
        try:
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        except sqlite3.Error as error:
            await db.close()
            raise StoreError(f"cannot open the KV database {path}: {error}") from None
        return cls(db, path, asyncio.get_running_loop())

    async def close(self) -> None:
        """Refuse new writes, commit what is staged, then close the connection."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
        try:
            await self.commit()
        finally:
            await self._db.close()

    @property
    def writing(self) -> int:
        """How many writes the commit running now carries (0: none is running)."""
        batch = self._inflight
        return len(batch.writes) if batch is not None else 0

    # -- staging (any thread, never waits) ------------------------------------------------
    def stage_set(self, capsule: str, key: str, value: bytes) -> Batch:
        """Stage a blind write (no reads to validate); returns the ticket for `commit`."""
        return self._stage_blind(capsule, key, bytes(value))

    def stage_delete(self, capsule: str, key: str) -> Batch:
        return self._stage_blind(capsule, key, None)

    def _stage_blind(self, capsule: str, key: str, value: bytes | None) -> Batch:
        batch = self.stage_call(capsule, reads={}, writes={key: value})
        assert isinstance(batch, Batch)
        return batch

    def stage_call(
        self,
        capsule: str,
        *,
        reads: Mapping[int, int],
        writes: Mapping[str, bytes | None],
        dirty: bool = False,
        on_commit: Callable[[], None] | None = None,
    ) -> Staged:
        """Validate a call's reads and stage its writes, atomically.

        `reads` maps stripes to the versions the call saw; `dirty` says whether it read
        staged data. Returns CONFLICT (nothing staged) when a version changed; else the
        ticket to `commit` (with `on_commit` attached, run after the commit), or None when
        there is nothing to wait for (no writes, no uncommitted reads: run `on_commit` now).
        """
        with self._lock:
            self._check_open()
            versions = self._versions
            for stripe, version in reads.items():
                if versions[stripe] != version:
                    self.stats["conflicts"] += 1
                    return CONFLICT
            batch = self._pending
            if writes:
                self._stage(batch, capsule, writes)
            elif not (dirty and (batch.writes or self._inflight is not None)):
                return None  # what it read is committed (a failure would have changed a stamp)
            if on_commit is not None:
                batch.callbacks.append(on_commit)
            return batch

    def _stage(self, batch: Batch, capsule: str, writes: Mapping[str, bytes | None]) -> None:
        """Stage writes and bump the stamps they change (lock held)."""
        versions, staged, mask, miss = self._versions, batch.writes, STRIPES - 1, _MISS
        inflight = self._inflight.writes if self._inflight is not None else {}
        listing_changes = False
        for key, value in writes.items():
            entry = (capsule, key)
            versions[hash(entry) & mask] += 1
            if not listing_changes:  # unless the key's presence is known to stay the same
                old = staged.get(entry, miss)
                if old is miss:
                    old = inflight.get(entry, miss)
                    if old is miss:
                        old = self._cache.get(entry, miss)
                listing_changes = old is miss or (old is None) != (value is None)
            staged[entry] = value
        if listing_changes:
            versions[_stripe((capsule, _LISTING))] += 1

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the KV database {self.path} is closed")
        if self._broken:
            raise StoreError(self._broken)

    # -- committing ----------------------------------------------------------------------
    async def commit(self, ticket: Batch | None = None) -> None:
        """Return once `ticket` (default: everything staged so far) is committed; StoreError
        when its transaction, or one before it, failed. Concurrent callers share commits;
        a caller that is cancelled does not cancel the commit."""
        batch = self._pending if ticket is None else ticket
        while not batch.done:
            if self._writer is None:
                self._writer = self._loop.create_task(self._write_pending(), name="kv-commit")
            await asyncio.shield(self._writer)
        if batch.error is not None:
            raise StoreError(batch.error)

    async def _write_pending(self) -> None:
        try:
            with self._lock:
                batch, self._pending = self._pending, Batch()
                self._inflight = batch
            if batch.writes:
                async with self._db_lock:
                    try:
                        await self._write(batch)
                    except (sqlite3.Error, OSError, ValueError) as error:
                        await self._fail(batch, error)
                        return
                    except asyncio.CancelledError:  # the loop is stopping: its statements may
                        self._broken = f"a commit to the KV database {self.path} was interrupted"
                        self._drop([batch], self._broken)  # still run, so write no more
                        raise
            with self._lock:
                self._inflight = None
                for entry, value in batch.writes.items():
                    self._remember(entry, value)
                batch.done = True
            for callback in batch.callbacks:
                try:
                    callback()
                except Exception:
                    logger.exception("KV database %s: a callback after a commit failed", self.path)
        finally:
            self._writer = None

    async def _write(self, batch: Batch) -> None:
        sets = [(c, k, v, crc(v)) for (c, k), v in batch.writes.items() if v is not None]
        deletes = [(c, k) for (c, k), v in batch.writes.items() if v is None]
        if sets:
            await self._db.executemany(UPSERT, sets)
        if deletes:
            await self._db.executemany("DELETE FROM kv WHERE capsule = ? AND key = ?", deletes)
        await self._db.commit()
        self.stats["commits"] += 1
        self.stats["rows_written"] += len(batch.writes)

    async def _fail(self, batch: Batch, error: BaseException) -> None:
        """Roll back; fail `batch` and every batch staged after it (lock not held)."""
        try:
            await self._db.rollback()
        except (sqlite3.Error, ValueError) as rollback_error:
            logger.error("KV database %s: rollback failed: %s", self.path, rollback_error)
        if self._db.in_transaction:  # the failed writes must never ride along a later commit
            self._broken = (
                f"the KV database {self.path} could not roll back a failed commit ({error}): restart the orchestrator"
            )
        message = (
            f"cannot write the KV database {self.path}: {error} (this call's writes, and those of "
            "the calls committed with or staged after it, were dropped)"
        )
        self._drop([batch], message)
        logger.error("%s", message)

    def _drop(self, batches: list[Batch], message: str) -> None:
        """Fail `batches` and every batch staged after them; drop their writes from view."""
        with self._lock:
            failed = [*batches, self._pending]
            self._pending = Batch()
            self._inflight = None
            for each in failed:
                for entry in each.writes:  # readers of the dropped values conflict
                    self._versions[_stripe(entry)] += 1
                    self._versions[_stripe((entry[0], _LISTING))] += 1
                each.error = message
                each.done = True
            self.stats["failed_commits"] += 1

    # -- reading -------------------------------------------------------------------------
    def _cached(self, entry: Entry) -> Any:
        cache = self._cache
        if entry in cache:
            value = cache.pop(entry)  # move to the end: most recently used
            cache[entry] = value
            return value
        return _MISS

    def _remember(self, entry: Entry, value: bytes | None) -> None:
        """Cache a committed value (lock held)."""
        old = self._cache.pop(entry, _MISS)
        if isinstance(old, bytes):
            self._cache_bytes -= len(old)
        self._cache[entry] = value
        self._cache_bytes += len(value) if value else 0
        while self._cache_bytes > CACHE_BYTES and self._cache:
            dropped = self._cache.pop(next(iter(self._cache)))
            self._cache_bytes -= len(dropped) if dropped else 0

    async def _fetch(self, entry: Entry, version: int) -> bytes | None:
        """The committed value from the database; cached unless `entry` was staged since
        `version` was read."""
        async with self._db_lock:
            try:
                rows = await self._db.execute_fetchall("SELECT value, crc FROM kv WHERE capsule = ? AND key = ?", entry)
            except (sqlite3.Error, ValueError) as error:
                raise StoreError(f"cannot read the KV database {self.path}: {error}") from None
        self.stats["db_reads"] += 1
        value = None
        for row in rows:
            value = bytes(row[0])
            if row[1] is not None and crc(value) != row[1]:
                raise StoreError(
                    f"the KV database {self.path} is damaged: the value of capsule {entry[0]!r} key "
                    f"{entry[1]!r} fails its checksum; {RECOVER}, or set the key again"
                )
        stripe = _stripe(entry)
        with self._lock:
            if self._versions[stripe] == version:
                self._remember(entry, value)
        return value

    async def get(self, capsule: str, key: str) -> bytes | None:
        """The committed value, or None when the key is absent."""
        entry = (capsule, key)
        with self._lock:
            version = self._versions[_stripe(entry)]
            known = self._cached(entry)
        if known is not _MISS:
            return known  # type: ignore[no-any-return]
        return await self._fetch(entry, version)

    def read_from_thread(self, capsule: str, key: str) -> Read:
        """A call's read from a worker thread: the latest staged value, with the stamp taken
        before it; no hop to the event loop when the value is known."""
        entry = (capsule, key)
        stripe = _stripe(entry)
        with self._lock:
            version = self._versions[stripe]
            if entry in self._pending.writes:
                return stripe, version, self._pending.writes[entry], True
            if self._inflight is not None and entry in self._inflight.writes:
                return stripe, version, self._inflight.writes[entry], True
            known = self._cached(entry)
        if known is _MISS:
            known = self._from_thread(self._fetch(entry, version))
        return stripe, version, known, False

    def get_from_thread(self, capsule: str, key: str) -> bytes | None:
        """The latest staged value, from a worker thread."""
        return self.read_from_thread(capsule, key)[2]  # type: ignore[no-any-return]

    async def list_keys(self, capsule: str, prefix: str = "") -> list[str]:
        """Committed keys of `capsule` starting with `prefix`, sorted."""
        async with self._db_lock:
            return await self._select_keys(capsule, prefix)

    async def _select_keys(self, capsule: str, prefix: str) -> list[str]:
        try:
            rows = await self._db.execute_fetchall(
                "SELECT key FROM kv WHERE capsule = ? AND substr(key, 1, ?) = ? ORDER BY key",
                (capsule, len(prefix), prefix),
            )
        except (sqlite3.Error, ValueError) as error:
            raise StoreError(f"cannot read the KV database {self.path}: {error}") from None
        return [str(row[0]) for row in rows]

    async def _staged_keys(self, capsule: str, prefix: str) -> tuple[list[str], bool]:
        """Keys in the latest staged view, and whether staged data changed the answer."""
        async with self._db_lock:  # no commit between the query and the overlay
            keys = set(await self._select_keys(capsule, prefix))
            dirty = False
            with self._lock:
                batches = [b for b in (self._inflight, self._pending) if b is not None]  # newer last
                for batch in batches:
                    for (c, k), v in batch.writes.items():
                        if c == capsule and k.startswith(prefix):
                            dirty = True
                            if v is None:
                                keys.discard(k)
                            else:
                                keys.add(k)
        return sorted(keys), dirty

    def list_from_thread(self, capsule: str, prefix: str = "") -> tuple[int, int, list[str], bool]:
        """A call's key listing from a worker thread: (stripe, version, keys, dirty)."""
        stripe = _stripe((capsule, _LISTING))
        with self._lock:
            version = self._versions[stripe]
        keys, dirty = self._from_thread(self._staged_keys(capsule, prefix))
        return stripe, version, keys, dirty

    def list_keys_from_thread(self, capsule: str, prefix: str = "") -> list[str]:
        return self.list_from_thread(capsule, prefix)[2]

    async def set(self, capsule: str, key: str, value: bytes) -> None:
        """Write and commit."""
        await self.commit(self.stage_set(capsule, key, value))

    async def delete(self, capsule: str, key: str) -> bool:
        """Delete and commit; whether the key existed."""
        existed = await self.get(capsule, key) is not None
        await self.commit(self.stage_delete(capsule, key))
        return existed

    async def capsules(self) -> list[str]:
        """Names of the capsules that have committed keys."""
        async with self._db_lock:
            try:
                rows = await self._db.execute_fetchall("SELECT DISTINCT capsule FROM kv ORDER BY capsule")
            except (sqlite3.Error, ValueError) as error:
                raise StoreError(f"cannot read the KV database {self.path}: {error}") from None
        return [str(row[0]) for row in rows]

    # -- snapshots (orchestrator.capsule.snapshots) ----------------------------------------
    async def take_snapshot(self, capsule: str, *, created_ms: int, max_bytes: int | None = None) -> SnapshotInfo:
        """Commit what is staged, then copy `capsule`'s committed keys into a new snapshot
        (one transaction). Raises SnapshotTooLarge (nothing copied) or StoreError."""
        await self.commit()
        async with self._db_lock:
            self._check_open()
            return await snapshots.take(self._db, capsule, created_ms=created_ms, max_bytes=max_bytes, path=self.path)

    async def snapshot_infos(self, capsule: str | None = None) -> list[SnapshotInfo]:
        async with self._db_lock:
            return await snapshots.infos(self._db, capsule, path=self.path)

    async def drop_snapshots(self, ids: Iterable[int]) -> None:
        async with self._db_lock:
            self._check_open()
            await snapshots.drop(self._db, ids, path=self.path)

    async def restore_snapshot(self, capsule: str, snapshot: int) -> int:
        """Make `capsule`'s keys exactly those of `snapshot`, atomically; returns how many
        keys it holds. The restore is staged like a call's writes (a value for each key of
        the snapshot, a delete for each other key the capsule has, committed or staged), so
        it commits in one transaction after everything staged before it, readers see it at
        once, and the stamps of every key it touches (and the capsule's listing) are bumped:
        a running call that read one of them conflicts and runs again. Raises StoreError
        (nothing changed) when the snapshot is missing or damaged, or the commit fails."""
        async with self._db_lock:
            values = await snapshots.rows(self._db, capsule, snapshot, path=self.path)
        async with self._db_lock:  # no commit between listing the keys and staging
            present = set(await self._select_keys(capsule, ""))
            with self._lock:
                self._check_open()
                for batch in (self._inflight, self._pending):  # older first
                    for (owner, key), value in batch.writes.items() if batch is not None else ():
                        if owner == capsule:
                            (present.discard if value is None else present.add)(key)
                writes: dict[str, bytes | None] = dict.fromkeys(present - values.keys())
                writes.update(values)
                if not writes:
                    return 0
                ticket = self._pending
                self._stage(ticket, capsule, writes)
        await self.commit(ticket)
        return len(values)

    def _from_thread(self, coroutine: Any) -> Any:
        if threading.get_ident() == self._loop_thread:
            coroutine.close()
            raise RuntimeError("KVStore *_from_thread called on the event loop thread: await the async method")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(THREAD_WAIT_SECONDS)


async def _join_worker(connection: aiosqlite.Connection) -> None:
    """After a failed connect, wait for aiosqlite's worker thread to end (aiosqlite stops it
    without waiting; left running, it would report to a loop that may be closed by then)."""
    thread = getattr(connection, "_thread", None)  # aiosqlite >= 0.20 keeps its Thread here
    if isinstance(thread, threading.Thread) and thread.is_alive():
        await asyncio.to_thread(thread.join, THREAD_WAIT_SECONDS)
