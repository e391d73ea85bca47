"""The KV store: scoping, staging and group commit, reads from worker threads (the latest
staged view) and from outside calls (committed data only), private files, a directory in
place of the database refused without leaking a thread, and
durability against SIGKILL in a separate process."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite
import pytest

from orchestrator.capsule.store import KVStore, StoreError
from tests.conftest import REPO


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[KVStore]:
    kv = await KVStore.open(tmp_path / "kv.sqlite3")
    yield kv
    await kv.close()


async def test_set_get_delete_list(store: KVStore) -> None:
    await store.set("a", "x", b"1")
    await store.set("a", "y/z", b"\x00\xff binary")
    assert await store.get("a", "x") == b"1"
    assert await store.get("a", "y/z") == b"\x00\xff binary"
    assert await store.get("a", "missing") is None
    assert await store.list_keys("a") == ["x", "y/z"]
    assert await store.list_keys("a", "y/") == ["y/z"]
    assert await store.delete("a", "x") is True
    assert await store.delete("a", "x") is False
    assert await store.get("a", "x") is None
    assert await store.list_keys("a") == ["y/z"]


async def test_capsules_are_scoped(store: KVStore) -> None:
    await store.set("a", "k", b"from a")
    await store.set("b", "k", b"from b")
    assert await store.get("a", "k") == b"from a"
    assert await store.get("b", "k") == b"from b"
    assert await store.list_keys("c") == []
    assert await store.capsules() == ["a", "b"]


async def test_prefix_is_literal_not_a_pattern(store: KVStore) -> None:
    for key in ("100%", "100x", "a_b", "axb", "é/1", "é/2"):
        await store.set("a", key, b"v")
    assert await store.list_keys("a", "100%") == ["100%"]
    assert await store.list_keys("a", "a_") == ["a_b"]
    assert await store.list_keys("a", "é/") == ["é/1", "é/2"]


async def test_staged_writes_are_visible_to_calls_and_committed_data_to_readers(store: KVStore) -> None:
    await store.set("a", "gone", b"committed")
    store.stage_set("a", "k", b"staged")
    store.stage_delete("a", "gone")
    loop = asyncio.get_running_loop()
    # a call (on a worker thread) reads the latest staged view, flagged as uncommitted
    assert (await loop.run_in_executor(None, store.read_from_thread, "a", "k"))[2:] == (b"staged", True)
    assert await loop.run_in_executor(None, store.get_from_thread, "a", "gone") is None
    assert await loop.run_in_executor(None, store.list_keys_from_thread, "a", "") == ["k"]
    # readers outside calls (the control API) see committed data only
    assert await store.get("a", "k") is None
    assert await store.get("a", "gone") == b"committed"
    assert await store.list_keys("a") == ["gone"]
    commits = store.stats["commits"]
    await store.commit()
    assert store.stats["commits"] == commits + 1
    assert await store.get("a", "k") == b"staged"
    assert await store.get("a", "gone") is None
    assert await store.list_keys("a") == ["k"]


async def test_concurrent_commits_are_shared(store: KVStore) -> None:
    async def write(i: int) -> None:
        await store.commit(store.stage_set("a", f"k{i}", str(i).encode()))

    await asyncio.gather(*(write(i) for i in range(500)))
    assert store.stats["rows_written"] == 500
    assert store.stats["commits"] < 50  # many writes per transaction
    assert len(await store.list_keys("a")) == 500


async def test_large_values_round_trip(store: KVStore) -> None:
    value = os.urandom(1 << 20)
    await store.set("a", "big", value)
    assert await store.get("a", "big") == value


async def test_data_survives_reopen_and_close_commits_staged(tmp_path: Path) -> None:
    first = await KVStore.open(tmp_path / "kv.sqlite3")
    await first.set("a", "k", b"committed")
    first.stage_set("a", "late", b"staged only")
    await first.close()
    second = await KVStore.open(tmp_path / "kv.sqlite3")
    assert await second.get("a", "k") == b"committed"
    assert await second.get("a", "late") == b"staged only"
    await second.close()


async def test_database_is_wal_with_normal_sync(store: KVStore, tmp_path: Path) -> None:
    await store.set("a", "k", b"v")
    async with aiosqlite.connect(tmp_path / "kv.sqlite3") as db:
        rows = await db.execute_fetchall("PRAGMA journal_mode")
        assert next(iter(rows))[0] == "wal"
    assert (tmp_path / "kv.sqlite3-wal").exists()


async def test_database_and_its_wal_and_shm_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a umask that would leave them world-readable
    try:
        store = await KVStore.open(tmp_path / "state" / "kv.sqlite3")
        await store.set("a", "k", b"v")
        for name in ("kv.sqlite3", "kv.sqlite3-wal", "kv.sqlite3-shm"):
            assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600, name
        await store.close()
    finally:
        os.umask(old)


async def test_reads_from_worker_threads(store: KVStore) -> None:
    await store.set("a", "k", b"v")
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, store.get_from_thread, "a", "k") == b"v"
    assert await loop.run_in_executor(None, store.get_from_thread, "a", "absent") is None
    assert await loop.run_in_executor(None, store.list_keys_from_thread, "a", "") == ["k"]
    with pytest.raises(RuntimeError, match="event loop thread"):
        store.get_from_thread("a", "never-cached")


async def test_cached_reads_skip_the_database(store: KVStore) -> None:
    await store.set("a", "k", b"v")
    reads = store.stats["db_reads"]
    for _ in range(10):
        assert await store.get("a", "k") == b"v"
        assert await store.get("a", "nothing") is None
    assert store.stats["db_reads"] == reads + 1  # "nothing" once, then cached as absent


async def test_a_directory_in_place_of_the_database_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "kv.sqlite3").mkdir()
    with pytest.raises(StoreError) as caught:
        await KVStore.open(tmp_path / "kv.sqlite3")
    assert str(caught.value) == (
        f"{tmp_path / 'kv.sqlite3'} is a directory, not the KV database: move it aside (the store then starts empty)"
    )
    # no aiosqlite connection thread left running past the failure (or the test's loop)
    assert [t for t in threading.enumerate() if "connection_worker" in t.name] == []


async def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    kv = await KVStore.open(tmp_path / "kv.sqlite3")
    await kv.close()
    with pytest.raises(StoreError, match="closed"):
        kv.stage_set("a", "k", b"v")


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from orchestrator.capsule.store import KVStore

    async def main():
        store = await KVStore.open({db!r})
        i = 0
        while True:
            i += 1
            await store.set("writer", f"k{{i}}", str(i).encode())
            print(i, flush=True)  # acknowledged: the write is committed

    asyncio.run(main())
    """
)


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "kv.sqlite3"
    script = WRITER.format(repo=str(REPO), db=str(db))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    acknowledged = 0
    for line in process.stdout:
        acknowledged = int(line)
        if acknowledged >= 300:
            break
    process.send_signal(signal.SIGKILL)  # right after an acknowledged write
    process.wait(10)
    process.stdout.close()
    assert acknowledged >= 300

    async def check() -> list[str]:
        store = await KVStore.open(db)
        try:
            missing = [i for i in range(1, acknowledged + 1) if await store.get("writer", f"k{i}") != str(i).encode()]
            assert missing == []
            return await store.list_keys("writer")
        finally:
            await store.close()

    keys = asyncio.run(check())
    assert len(keys) >= acknowledged
