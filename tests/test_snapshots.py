"""KV snapshots in the real store (real SQLite files): taking one copies exactly one capsule's
committed keys (staged writes are committed first; other capsules untouched); a capsule over
the bound is not copied at all; restoring makes the capsule's keys exactly the snapshot's in
one transaction, after the writes staged before it and before those staged after it, and
bumps the stamps so a running call that read a key it changes conflicts; a damaged
snapshot, one of another capsule, a failed take and a failed commit each change nothing.

What is on disk is read back through a separate sqlite3 connection, not through the store.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.capsule.kv import CallKV
from orchestrator.capsule.snapshots import SnapshotTooLarge
from orchestrator.capsule.store import CONFLICT, Batch, KVStore, StoreError


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[KVStore]:
    kv = await KVStore.open(tmp_path / "kv.sqlite3")
    yield kv
    await kv.close()


def on_disk(path: Path, query: str, *args: object) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return [tuple(row) for row in db.execute(query, args)]
    finally:
        db.close()


def live(path: Path, capsule: str) -> dict[str, bytes]:
    rows = on_disk(path, "SELECT key, value FROM kv WHERE capsule = ?", capsule)
    return {str(k): bytes(v) for k, v in rows}  # type: ignore[call-overload]


async def test_a_snapshot_copies_one_capsules_keys_including_what_was_staged(store: KVStore) -> None:
    await store.set("a", "x", b"1")
    await store.set("a", "é/ü", b"\x00\xff binary")
    await store.set("b", "x", b"other capsule")
    store.stage_set("a", "staged", b"not committed yet")
    info = await store.take_snapshot("a", created_ms=1234)
    assert (info.capsule, info.created_ms, info.keys) == ("a", 1234, 3)
    assert info.bytes == sum(len(k.encode()) + len(v) for k, v in live(store.path, "a").items())
    rows = on_disk(store.path, "SELECT key, value FROM kv_snapshot_rows WHERE snapshot = ?", info.id)
    assert {str(k): bytes(v) for k, v in rows} == {  # type: ignore[call-overload]
        "x": b"1",
        "é/ü": b"\x00\xff binary",
        "staged": b"not committed yet",
    }
    assert [s.id for s in await store.snapshot_infos("a")] == [info.id]
    assert await store.snapshot_infos("b") == []


async def test_restore_makes_the_keys_exactly_the_snapshots(store: KVStore) -> None:
    await store.set("a", "x", b"1")
    await store.set("a", "y", b"2")
    await store.set("b", "x", b"b before")
    info = await store.take_snapshot("a", created_ms=0)
    await store.set("a", "x", b"changed")
    await store.delete("a", "y")
    await store.set("a", "z", b"added later")
    await store.set("b", "x", b"b after")
    assert await store.get("a", "x") == b"changed"  # in the cache now
    assert await store.restore_snapshot("a", info.id) == 2
    assert await store.list_keys("a") == ["x", "y"]
    assert (await store.get("a", "x"), await store.get("a", "y"), await store.get("a", "z")) == (b"1", b"2", None)
    assert live(store.path, "a") == {"x": b"1", "y": b"2"}
    assert live(store.path, "b") == {"x": b"b after"}  # another capsule is not touched
    # the snapshot stays: it can be restored again
    await store.set("a", "x", b"again")
    await store.restore_snapshot("a", info.id)
    assert live(store.path, "a") == {"x": b"1", "y": b"2"}


async def test_an_empty_snapshot_empties_the_capsule(store: KVStore) -> None:
    info = await store.take_snapshot("a", created_ms=0)
    assert (info.keys, info.bytes) == (0, 0)
    await store.set("a", "x", b"1")
    await store.set("b", "x", b"kept")
    assert await store.restore_snapshot("a", info.id) == 0
    assert live(store.path, "a") == {} and await store.list_keys("a") == []
    assert live(store.path, "b") == {"x": b"kept"}


async def test_restore_conflicts_the_calls_that_read_what_it_changes(store: KVStore) -> None:
    await store.set("a", "x", b"1")
    info = await store.take_snapshot("a", created_ms=0)
    await store.set("a", "x", b"2")
    await store.set("a", "extra", b"gone after the restore")
    loop = asyncio.get_running_loop()
    reader = CallKV(store, "a")  # a call in flight that read x
    assert await loop.run_in_executor(None, reader.get, "x") == b"2"
    lister = CallKV(store, "a")  # and one that listed the keys
    assert await loop.run_in_executor(None, lister.keys, "") == ["extra", "x"]
    await store.restore_snapshot("a", info.id)
    reader.set("x", b"3")  # derived from the value it read, which the restore replaced
    lister.set("count", b"2")
    assert await loop.run_in_executor(None, reader.finish) is CONFLICT
    assert await loop.run_in_executor(None, lister.finish) is CONFLICT
    again = CallKV(store, "a")  # run again: it sees the restored value
    assert await loop.run_in_executor(None, again.get, "x") == b"1"
    again.set("x", b"2")
    ticket = await loop.run_in_executor(None, again.finish)
    assert isinstance(ticket, Batch)
    await store.commit(ticket)
    assert live(store.path, "a") == {"x": b"2"}


async def test_restore_comes_after_writes_staged_before_it_and_before_later_ones(store: KVStore) -> None:
    await store.set("a", "x", b"snapshot")
    info = await store.take_snapshot("a", created_ms=0)
    store.stage_set("a", "x", b"staged before the restore")
    store.stage_set("a", "early", b"staged before the restore")
    restore = asyncio.create_task(store.restore_snapshot("a", info.id))
    await restore
    later = store.stage_set("a", "late", b"staged after")
    await store.commit(later)
    assert live(store.path, "a") == {"x": b"snapshot", "late": b"staged after"}


async def test_a_capsule_over_the_bound_is_not_copied(store: KVStore) -> None:
    await store.set("a", "big", b"v" * 1000)
    with pytest.raises(SnapshotTooLarge, match="over the snapshot bound of 100 bytes"):
        await store.take_snapshot("a", created_ms=0, max_bytes=100)
    assert await store.snapshot_infos() == []
    assert on_disk(store.path, "SELECT COUNT(*) FROM kv_snapshot_rows") == [(0,)]
    info = await store.take_snapshot("a", created_ms=0, max_bytes=1003)  # exactly at the bound
    assert info.bytes == 1003


async def test_a_damaged_snapshot_is_refused_and_nothing_changes(store: KVStore) -> None:
    await store.set("a", "x", b"good")
    info = await store.take_snapshot("a", created_ms=0)
    await store.set("a", "x", b"now")
    db = sqlite3.connect(store.path)
    db.execute("UPDATE kv_snapshot_rows SET value = ? WHERE snapshot = ?", (b"evil", info.id))  # crc unchanged
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="is damaged: the value of key 'x' fails its checksum"):
        await store.restore_snapshot("a", info.id)
    assert live(store.path, "a") == {"x": b"now"} and await store.get("a", "x") == b"now"


async def test_only_the_capsules_own_snapshots_can_be_restored(store: KVStore) -> None:
    await store.set("a", "x", b"a's")
    info = await store.take_snapshot("a", created_ms=0)
    await store.set("b", "x", b"b's")
    with pytest.raises(StoreError, match="capsule 'b' has no snapshot"):
        await store.restore_snapshot("b", info.id)
    with pytest.raises(StoreError, match="capsule 'a' has no snapshot 999"):
        await store.restore_snapshot("a", 999)
    assert live(store.path, "b") == {"x": b"b's"}


async def test_dropped_snapshots_are_gone_and_the_rest_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    store = await KVStore.open(path)
    await store.set("a", "x", b"1")
    first = await store.take_snapshot("a", created_ms=1)
    await store.set("a", "x", b"2")
    second = await store.take_snapshot("a", created_ms=2)
    await store.drop_snapshots([first.id, 12345])
    await store.close()
    store = await KVStore.open(path)
    try:
        assert [s.id for s in await store.snapshot_infos()] == [second.id]
        assert on_disk(path, "SELECT DISTINCT snapshot FROM kv_snapshot_rows") == [(second.id,)]
        await store.set("a", "x", b"3")
        await store.restore_snapshot("a", second.id)
        assert await store.get("a", "x") == b"2"
    finally:
        await store.close()


@pytest.fixture
async def locked(tmp_path: Path) -> AsyncIterator[tuple[KVStore, sqlite3.Connection]]:
    """A store whose writes fail after 0.3 s: another connection holds the write lock."""
    path = tmp_path / "kv.sqlite3"
    store = await KVStore.open(path, busy_timeout_ms=300)
    await store.set("a", "x", b"1")
    await store.set("a", "y", b"2")
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        yield store, blocker
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        await store.close()


async def test_a_restore_whose_commit_fails_changes_nothing(locked: tuple[KVStore, sqlite3.Connection]) -> None:
    store, blocker = locked
    info = await store.take_snapshot("a", created_ms=0)
    await store.set("a", "x", b"changed")
    await store.set("a", "z", b"added")
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="database is locked"):
        await store.restore_snapshot("a", info.id)
    blocker.execute("ROLLBACK")
    # not one of its writes is visible or committed: the transaction was all or nothing
    assert live(store.path, "a") == {"x": b"changed", "y": b"2", "z": b"added"}
    assert (await store.get("a", "x"), await store.get("a", "z")) == (b"changed", b"added")
    await store.set("a", "w", b"the store goes on")
    await store.restore_snapshot("a", info.id)
    assert live(store.path, "a") == {"x": b"1", "y": b"2"}


async def test_a_take_that_fails_leaves_no_partial_snapshot(locked: tuple[KVStore, sqlite3.Connection]) -> None:
    store, blocker = locked
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="cannot take a snapshot of capsule 'a'"):
        await store.take_snapshot("a", created_ms=0)
    blocker.execute("ROLLBACK")
    assert await store.snapshot_infos() == []
    assert on_disk(store.path, "SELECT COUNT(*) FROM kv_snapshot_rows") == [(0,)]
    info = await store.take_snapshot("a", created_ms=0)
    assert info.keys == 2
