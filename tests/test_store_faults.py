"""The KV store when things go wrong, on real filesystems and real SQLite files.

- A commit that fails is rolled back, and the calls it carried (and those staged after it)
  fail: on a small tmpfs filled until SQLite cannot commit, no failed write is readable
  right after the failure nor committed once space is freed, for plain writes and for the
  counter capsule's tool calls (whose events are not published either). With the write
  lock held by another connection, a commit in flight fails and takes with it the calls
  that read its writes: staged after it (they fail), or not yet staged (they conflict).
- A damaged database is refused when opened (quick_check), with one line naming the file
  and how to recover; a damaged value is never served (its checksum); `check_database`
  finds both read-only. A read-only state dir, a directory or a non-database file in place
  of the database: each one clear line with the real cause.

tmpfs mounts need root (the tests run as root, here and in CI); each is unmounted in
teardown.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sqlite3
import subprocess
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from orchestrator.capsule import Capsule
from orchestrator.capsule.bus import EventBus
from orchestrator.capsule.kv import CallKV
from orchestrator.capsule.store import CONFLICT, Batch, KVStore, StoreError, check_database
from orchestrator.engine import WasmEngine
from tests.conftest import CAPSULES

PAGE = 4096


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem has not one byte left; returns it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\xaa" * size)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                size //= 2
    finally:
        os.close(fd)
    return filler


def committed_rows(path: Path) -> dict[tuple[str, str], bytes]:
    """Everything committed in the file, read by a separate connection."""
    db = sqlite3.connect(path)
    try:
        return {(c, k): bytes(v) for c, k, v in db.execute("SELECT capsule, key, value FROM kv")}
    finally:
        db.close()


async def test_a_full_disk_fails_the_writes_and_never_commits_them_later(small_fs: Path) -> None:
    path = small_fs / "kv.sqlite3"
    store = await KVStore.open(path)
    try:
        await store.set("a", "before", b"1")
        filler = fill(small_fs)
        big = os.urandom(64 << 10)  # needs new WAL frames: cannot fit in what is left

        async def write(i: int) -> BaseException | None:
            try:
                await store.set("a", f"k{i}", big)
            except StoreError as error:
                return error
            return None

        outcomes = await asyncio.gather(*(write(i) for i in range(20)))
        assert all(isinstance(o, StoreError) and "database or disk is full" in str(o) for o in outcomes)
        assert store.stats["failed_commits"] >= 1
        # right after the failure: nothing of them, from any view
        assert [await store.get("a", f"k{i}") for i in range(20)] == [None] * 20
        assert await store.list_keys("a") == ["before"]
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, store.get_from_thread, "a", "k0") is None
        filler.unlink()  # space again: the next commit must not carry the failed writes
        await store.set("a", "after", b"2")
        assert await store.list_keys("a") == ["after", "before"]
    finally:
        await store.close()
    assert committed_rows(path) == {("a", "before"): b"1", ("a", "after"): b"2"}


async def test_counter_calls_fail_on_a_full_disk_and_leave_nothing_behind(small_fs: Path) -> None:
    path = small_fs / "kv.sqlite3"
    store = await KVStore.open(path)
    bus = EventBus()
    events = bus.subscribe("counter.>")
    with WasmEngine() as engine:
        counter = await Capsule.load(
            CAPSULES / "counter", engine=engine, bus=bus, store=store, workspace=small_fs, instances=2
        )
        try:
            for _ in range(3):
                await counter.call_tool("increment", {})
            filler = fill(small_fs)
            outcomes = await asyncio.gather(
                *(counter.call_tool("increment", {}) for _ in range(20)), return_exceptions=True
            )
            assert all(isinstance(o, StoreError) for o in outcomes), outcomes
            assert counter.errors == 20
            assert await store.get("counter", "count") == b"3"
            assert json.loads((await counter.call_tool("get", {})).output) == {"count": 3}
            filler.unlink()
            assert json.loads((await counter.call_tool("increment", {})).output) == {"count": 4}
        finally:
            await counter.close()
    await store.close()
    bus.close()
    assert [e.payload for e in events.drain()] == [{"count": n} for n in (1, 2, 3, 4)]  # none of the failed
    assert committed_rows(path) == {("counter", "count"): b"4"}


@pytest.fixture
async def locked_store(tmp_path: Path) -> AsyncIterator[tuple[KVStore, sqlite3.Connection]]:
    """A store whose commits fail after 2 s: another connection holds the write lock
    (`BEGIN IMMEDIATE`) until the test rolls it back."""
    path = tmp_path / "kv.sqlite3"
    store = await KVStore.open(path, busy_timeout_ms=2000)
    await store.set("a", "x", b"committed")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield store, blocker
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()
        await store.close()


async def wait_for_commit_in_flight(store: KVStore) -> None:
    async with asyncio.timeout(30):
        while not store.writing:
            await asyncio.sleep(0.005)


async def test_a_failed_commit_fails_the_calls_that_read_its_writes(
    locked_store: tuple[KVStore, sqlite3.Connection],
) -> None:
    store, blocker = locked_store
    loop = asyncio.get_running_loop()
    first = store.stage_set("a", "x", b"dirty")
    commit = asyncio.create_task(store.commit(first))
    await wait_for_commit_in_flight(store)  # blocked on the lock; it will time out and fail
    api_read = asyncio.create_task(store.get("a", "x"))  # a reader outside calls

    def derived_call() -> object:  # reads the write in flight, stages a write derived from it
        kv = CallKV(store, "a")
        seen = kv.get("x")
        assert seen == b"dirty"
        kv.set("y", seen + b" +1")
        return kv.finish()

    def reading_call() -> object:  # only reads it
        kv = CallKV(store, "a")
        assert kv.get("x") == b"dirty"
        return kv.finish()

    late = CallKV(store, "a")  # reads it now, stages only after the failure
    assert await loop.run_in_executor(None, late.get, "x") == b"dirty"
    derived = await loop.run_in_executor(None, derived_call)
    reading = await loop.run_in_executor(None, reading_call)
    assert isinstance(derived, Batch) and isinstance(reading, Batch)
    for ticket in (commit, store.commit(derived), store.commit(reading)):
        with pytest.raises(StoreError, match="database is locked"):
            await ticket
    assert await api_read == b"committed"  # never the value in flight
    late.set("z", b"from a dropped value")
    assert await loop.run_in_executor(None, late.finish) is CONFLICT  # it would re-run
    blocker.execute("ROLLBACK")
    assert await store.get("a", "x") == b"committed"
    assert await store.get("a", "y") is None
    assert await store.list_keys("a") == ["x"]
    await store.set("a", "x", b"later")  # the store goes on
    assert committed_rows(store.path) == {("a", "x"): b"later"}


async def test_a_failed_commit_publishes_none_of_its_events(
    locked_store: tuple[KVStore, sqlite3.Connection], tmp_path: Path
) -> None:
    store, blocker = locked_store
    bus = EventBus()
    with WasmEngine() as engine:
        milestones = await Capsule.load(
            CAPSULES / "milestones", engine=engine, bus=bus, store=store, workspace=tmp_path
        )
        counter = await Capsule.load(CAPSULES / "counter", engine=engine, bus=bus, store=store, workspace=tmp_path)
        try:
            with pytest.raises(StoreError, match="database is locked"):
                await counter.call_tool("increment", {"by": 10})  # would reach the milestone 10
            assert bus.history("counter.>") == []
            blocker.execute("ROLLBACK")
            await counter.call_tool("increment", {"by": 10})
            await milestones.caught_up(bus.last_seq)
            assert json.loads((await milestones.call_tool("status", {})).output) == {"last": 10, "seen": 1}
            assert [e.payload for e in bus.history("counter.>")] == [{"count": 10}]
            assert [e.payload for e in bus.history("milestones.>")] == [{"count": 10}]
        finally:
            await counter.close()
            await milestones.close()
    bus.close()


# ---- damaged, misplaced and unwritable databases -----------------------------------------------
async def make_database(path: Path, rows: int = 300) -> None:
    store = await KVStore.open(path)
    for i in range(rows):
        store.stage_set("a", f"key-{i:04}", f"value {i} ".encode() * 60)
    await store.set("a", "marker", b"MARKER-" + b"m" * 3000)
    await store.close()
    assert not Path(f"{path}-wal").exists()  # checkpointed into the file


def one_line(error: StoreError | str, path: Path) -> str:
    text = str(error)
    assert "\n" not in text and str(path) in text
    return text


async def test_a_corrupt_database_is_refused_with_how_to_recover(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    await make_database(path)
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * PAGE
    for page in (3, 5, 6):  # the header (page 1) stays intact
        data[(page - 1) * PAGE : (page - 1) * PAGE + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as caught:
        await KVStore.open(path)
    text = one_line(caught.value, path)
    assert f"the KV database {path} is corrupt (" in text
    assert text.endswith(": move it aside (the store then starts empty) or restore it from a backup")
    problem = check_database(path)
    assert problem is not None and f"the KV database {path} is corrupt (" in one_line(problem, path)
    assert path.read_bytes() == bytes(data)  # neither touched the file


async def test_a_damaged_value_is_never_served(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    await make_database(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"MARKER-") + 100
    data[at] ^= 0x01  # one bit inside the value: the page structure stays sound
    path.write_bytes(bytes(data))
    problem = check_database(path)
    assert problem is not None
    assert "1 value(s) fail their checksum (first: capsule 'a' key 'marker')" in one_line(problem, path)
    store = await KVStore.open(path)  # the structure is sound: it opens
    try:
        with pytest.raises(StoreError, match="fails its checksum") as caught:
            await store.get("a", "marker")
        assert "key 'marker'" in one_line(caught.value, path)
        assert await store.get("a", "key-0001") == b"value 1 " * 60  # the others are fine
        assert len(await store.list_keys("a")) == 301
        await store.set("a", "marker", b"new")  # setting it again repairs it
        assert await store.get("a", "marker") == b"new"
    finally:
        await store.close()
    assert check_database(path) is None


async def test_a_file_that_is_not_a_database_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    path.write_text("secret=hunter2\n" * 400)
    with pytest.raises(StoreError) as caught:
        await KVStore.open(path)
    assert one_line(caught.value, path) == (
        f"{path} is not an SQLite database: move it aside (the store then starts empty) or restore it from a backup"
    )
    assert "hunter2" not in str(check_database(path))


async def test_a_read_only_state_dir_is_named_as_the_cause(small_fs: Path) -> None:
    path = small_fs / "kv.sqlite3"
    await make_database(path, rows=3)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        with pytest.raises(StoreError) as caught:
            await KVStore.open(path)
        assert one_line(caught.value, path) == (
            f"the state dir {small_fs} is not writable (Read-only file system), so the KV database {path} "
            "cannot be opened: make the folder writable, or choose another state_dir"
        )
        with pytest.raises(StoreError, match=r"cannot create the state dir .*: Read-only file system"):
            await KVStore.open(small_fs / "new" / "kv.sqlite3")
        assert check_database(path) is None  # read-only is enough to check it
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)


async def test_check_database_on_sound_missing_and_misplaced_files(tmp_path: Path) -> None:
    assert check_database(tmp_path / "absent.sqlite3") is None
    (tmp_path / "dir.sqlite3").mkdir()
    assert check_database(tmp_path / "dir.sqlite3") == (
        f"{tmp_path / 'dir.sqlite3'} is a directory, not the KV database: move it aside (the store then starts empty)"
    )
    path = tmp_path / "kv.sqlite3"
    await make_database(path, rows=5)
    assert check_database(path) is None


async def test_a_database_from_before_checksums_gets_them(tmp_path: Path) -> None:
    path = tmp_path / "kv.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE kv (capsule TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, "
        "PRIMARY KEY (capsule, key)) WITHOUT ROWID"
    )
    db.execute("INSERT INTO kv VALUES ('a', 'k', x'0102')")
    db.commit()
    db.close()
    assert check_database(path) is None
    store = await KVStore.open(path)
    assert await store.get("a", "k") == b"\x01\x02"
    await store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT crc FROM kv").fetchall() == [(zlib.crc32(b"\x01\x02"),)]
    db.close()
