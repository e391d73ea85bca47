"""KV snapshots: copies of one capsule's keys, kept in the KV database beside the live data.

A snapshot is taken when a reload (or a rollback) replaces a capsule's version, so that the
data that version left can be put back later (`orch rollback NAME --with-data`). It lives
in two tables of the store's own database (created with it: orchestrator.capsule.kvfile):

    kv_snapshot(id, capsule, created_ms, keys, bytes)        one row per snapshot
    kv_snapshot_rows(snapshot, key, value, crc)               its keys, with their checksums

Taking one is a single `INSERT ... SELECT` of the capsule's committed rows (no value passes
through Python), after a size check so that a capsule whose data exceeds the bound costs
nothing. Reading one back checks every value's CRC-32: a damaged snapshot is refused, never
restored. The restore itself (the capsule's keys becoming exactly the snapshot's, in one
transaction, with the version stamps of every key bumped) belongs to the store, which owns
staging and isolation: see `KVStore.restore_snapshot`.

These functions run SQL on the connection they are handed: the store's aiosqlite
connection, always under the store's database lock (this module imports no aiosqlite).
`SnapshotStore` is what the control layer needs of a store, so a lattice store can offer
the same. Used by orchestrator.capsule.store and orchestrator.control.history.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import OrchestratorError, StoreError
from .kvfile import RECOVER, crc

SIZE = "SELECT COUNT(*), COALESCE(SUM(length(CAST(key AS BLOB)) + length(value)), 0) FROM kv WHERE capsule = ?"


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot: whose, when, how many keys and how many bytes (keys plus values)."""

    id: int
    capsule: str
    created_ms: int
    keys: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "created_ms": self.created_ms, "keys": self.keys, "bytes": self.bytes}


class SnapshotTooLarge(OrchestratorError):
    """The capsule's data is over the size bound: no snapshot was taken (nothing copied)."""

    def __init__(self, capsule: str, size: int, bound: int) -> None:
        super().__init__(
            f"capsule {capsule!r}: its KV data ({size:,} bytes) is over the snapshot bound of {bound:,} bytes "
            "(history.snapshot_max_mib in config.yaml): no snapshot taken"
        )
        self.size, self.bound = size, bound


class SnapshotStore(Protocol):
    """What the version history needs of a KV store (orchestrator.capsule.store.KVStore)."""

    async def take_snapshot(self, capsule: str, *, created_ms: int, max_bytes: int | None = None) -> SnapshotInfo: ...
    async def restore_snapshot(self, capsule: str, snapshot: int) -> int: ...
    async def snapshot_infos(self, capsule: str | None = None) -> list[SnapshotInfo]: ...
    async def drop_snapshots(self, ids: Iterable[int]) -> None: ...


async def _rollback(db: Any) -> None:
    with contextlib.suppress(sqlite3.Error, ValueError):  # the store's next commit reports a broken connection
        await db.rollback()


async def take(db: Any, capsule: str, *, created_ms: int, max_bytes: int | None, path: object) -> SnapshotInfo:
    """Copy `capsule`'s committed rows into a new snapshot, in one transaction. Raises
    SnapshotTooLarge (nothing copied) or StoreError (rolled back)."""
    try:
        rows = await db.execute_fetchall(SIZE, (capsule,))
        keys, size = (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)
        if max_bytes is not None and size > max_bytes:
            raise SnapshotTooLarge(capsule, size, max_bytes)
        cursor = await db.execute(
            "INSERT INTO kv_snapshot (capsule, created_ms, keys, bytes) VALUES (?, ?, ?, ?)",
            (capsule, created_ms, keys, size),
        )
        snapshot = int(cursor.lastrowid)
        await cursor.close()
        await db.execute(
            "INSERT INTO kv_snapshot_rows (snapshot, key, value, crc) "
            "SELECT ?, key, value, crc FROM kv WHERE capsule = ?",
            (snapshot, capsule),
        )
        await db.commit()
    except (sqlite3.Error, OSError, ValueError) as error:
        await _rollback(db)
        raise StoreError(f"cannot take a snapshot of capsule {capsule!r} in the KV database {path}: {error}") from None
    return SnapshotInfo(snapshot, capsule, created_ms, keys, size)


async def infos(db: Any, capsule: str | None, *, path: object) -> list[SnapshotInfo]:
    """The snapshots (of `capsule`, or all), oldest first."""
    query = "SELECT id, capsule, created_ms, keys, bytes FROM kv_snapshot"
    try:
        if capsule is None:
            rows = await db.execute_fetchall(query + " ORDER BY id")
        else:
            rows = await db.execute_fetchall(query + " WHERE capsule = ? ORDER BY id", (capsule,))
    except (sqlite3.Error, ValueError) as error:
        raise StoreError(f"cannot list the snapshots in the KV database {path}: {error}") from None
    return [SnapshotInfo(int(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]


async def rows(db: Any, capsule: str, snapshot: int, *, path: object) -> dict[str, bytes]:
    """The keys and values of `snapshot`, every checksum checked. Raises StoreError when it
    does not exist, belongs to another capsule, or holds a damaged value."""
    try:
        owner = await db.execute_fetchall("SELECT capsule FROM kv_snapshot WHERE id = ?", (snapshot,))
        if not owner or owner[0][0] != capsule:
            raise StoreError(f"capsule {capsule!r} has no snapshot {snapshot} in the KV database {path}")
        found = await db.execute_fetchall(
            "SELECT key, value, crc FROM kv_snapshot_rows WHERE snapshot = ? ORDER BY key", (snapshot,)
        )
    except (sqlite3.Error, ValueError) as error:
        raise StoreError(f"cannot read snapshot {snapshot} in the KV database {path}: {error}") from None
    values: dict[str, bytes] = {}
    for key, value, stored in found:
        data = bytes(value)
        if stored is not None and crc(data) != stored:
            raise StoreError(
                f"snapshot {snapshot} of capsule {capsule!r} in the KV database {path} is damaged: the value of "
                f"key {str(key)[:60]!r} fails its checksum, so it is not restored ({RECOVER})"
            )
        values[str(key)] = data
    return values


async def drop(db: Any, ids: Iterable[int], *, path: object) -> None:
    """Delete snapshots `ids` (unknown ones are ignored), in one transaction."""
    chosen = [(int(i),) for i in ids]
    if not chosen:
        return
    try:
        await db.executemany("DELETE FROM kv_snapshot_rows WHERE snapshot = ?", chosen)
        await db.executemany("DELETE FROM kv_snapshot WHERE id = ?", chosen)
        await db.commit()
    except (sqlite3.Error, OSError, ValueError) as error:
        await _rollback(db)
        raise StoreError(f"cannot delete snapshots in the KV database {path}: {error}") from None
