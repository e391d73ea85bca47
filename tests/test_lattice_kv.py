"""The lattice KV store (JetStreamKV) on real nats-servers: keys and values at the limits
and hostile ones, the API methods, and the isolation protocol between two hosts (two
JetStreamKV instances on two connections), at the level of a call's `CallKV` view on a
worker thread, as the capsule layer uses it. The staging area's failure cascade is unit
tested on its own (it needs a batch to fail at an exact moment).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.capsule.kv import CallKV
from orchestrator.capsule.kvbackend import CommitConflict
from orchestrator.capsule.store import CONFLICT
from orchestrator.errors import GateError, StoreError
from orchestrator.lattice import kvfair, txn
from orchestrator.lattice.connection import Lattice, LatticeAddress
from orchestrator.lattice.kvkeys import EXPECT, EXPECT_SUBJECT, VALUE_HEADERS, KVSubjects
from orchestrator.lattice.kvstage import BLIND, KEY, LISTING, Seen, StagedCall, Staging, Write
from orchestrator.lattice.kvstore import JetStreamKV
from orchestrator.lattice.naming import decode_token
from tests.natsserver import NatsNode, NatsServers, wait_for

Hosts = tuple[JetStreamKV, JetStreamKV]


async def open_host(urls: str, *, name: str = "t", replicas: int = 1) -> JetStreamKV:
    return await JetStreamKV.open(await Lattice.connect(LatticeAddress.parse(urls, name=name)), replicas=replicas)


async def close_host(kv: JetStreamKV) -> None:
    await kv.close()
    await kv.lattice.close()


OpenHost = Callable[..., Awaitable[JetStreamKV]]


@contextlib.asynccontextmanager
async def opening_hosts() -> AsyncIterator[OpenHost]:
    """`await open_one(urls, replicas=...)`: a host (its own connection and staging),
    closed however the block ends."""
    opened: list[JetStreamKV] = []

    async def open_one(urls: str, **options: Any) -> JetStreamKV:
        opened.append(await open_host(urls, **options))
        return opened[-1]

    try:
        yield open_one
    finally:
        for kv in opened:
            await close_host(kv)


@pytest.fixture
async def open_hosts() -> AsyncIterator[OpenHost]:
    async with opening_hosts() as open_one:
        yield open_one


@pytest.fixture
async def hosts(nats_server: NatsServers, open_hosts: OpenHost) -> Hosts:
    """Two hosts of one lattice."""
    return await open_hosts(nats_server.urls), await open_hosts(nats_server.urls)


async def on_thread(function: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


async def finish(call: CallKV) -> Any:
    return await on_thread(call.finish)


# ---- keys and values --------------------------------------------------------------------------
HOSTILE_KEYS = [
    "a", "a.b", "a..b", ".", "..", "*", ">", "a.*.>", "x y", "tab\tkey", "new\nline", "=", "=41", "%41", "-_",
    "é", "日本語", "😀 emoji", "A" * 1024, "é" * 170, "\x7f\x01",
]  # fmt: skip
CAPSULE = "my.capsule é*>"


async def test_hostile_keys_and_values_round_trip_through_the_server(hosts: Hosts) -> None:
    a, b = hosts
    values = {key: f"value of {key}".encode() for key in HOSTILE_KEYS}
    values["a"] = b""
    values["a.b"] = bytes(range(256)) * 4  # NUL and every other byte
    values["*"] = b"\xff" * ((1 << 20) - 1) + b"!"  # the contract's largest value: 1 MiB
    await asyncio.gather(*(a.set(CAPSULE, key, value) for key, value in values.items()))
    await a.set("other", "a", b"not mine")
    for key, value in values.items():
        assert await b.get(CAPSULE, key) == value, key  # read by another host, through the server
    assert await b.list_keys(CAPSULE) == sorted(HOSTILE_KEYS)
    assert await b.capsules() == sorted([CAPSULE, "other"])
    # every key is one subject token on the server, and decodes back to what was written
    raw = await (await a.lattice.bucket(a.lattice.names.kv)).keys()
    decoded = sorted(tuple(decode_token(token) for token in key.split(".")) for key in raw)
    assert decoded == sorted([(CAPSULE, key) for key in HOSTILE_KEYS] + [("other", "a")])
    assert not any(key.startswith("$KVTX") for key in raw)  # markers, guards, records stay out of the KV
    # listings with prefixes that are NATS syntax or not ASCII
    listed = {prefix: await b.list_keys(CAPSULE, prefix) for prefix in ("a.", ".", "*", ">", "é", "=", "%", "zz")}
    assert listed == {
        "a.": ["a.*.>", "a..b", "a.b"],
        ".": [".", ".."],
        "*": ["*"],
        ">": [">"],
        "é": ["é", "é" * 170],
        "=": ["=", "=41"],
        "%": ["%41"],
        "zz": [],
    }
    assert await b.delete(CAPSULE, "a.*.>") is True
    assert await b.delete(CAPSULE, "a.*.>") is False
    assert await a.get(CAPSULE, "a.*.>") is None
    assert await a.list_keys(CAPSULE, "a.") == ["a..b", "a.b"]
    assert await a.list_keys("nobody") == [] and await a.get("nobody", "a") is None


@pytest.mark.parametrize("key", ["A" * 1025, "é" * 171, "k" * 4096, "😀" * 86])
async def test_a_key_too_long_for_nats_is_refused_naming_the_limit(hosts: Hosts, key: str) -> None:
    a, _ = hosts
    with pytest.raises(GateError, match=r"too long for the lattice KV: .* over the limit of 1024") as refused:
        await a.set("c", key, b"v")
    assert "'c'" in str(refused.value)
    with pytest.raises(GateError, match="over the limit of 1024"):
        await a.get("c", key)
    call = CallKV(a, "c")
    with pytest.raises(GateError, match="over the limit of 1024"):  # a guest's kv_get: a HostResult error
        await on_thread(call.get, key)
    call.set(key, b"v")  # a guest's kv_set is buffered: the call fails when it stages
    with pytest.raises(GateError, match="over the limit of 1024"):
        await finish(call)
    await a.set("c", "fine", b"v")  # nothing reached the server: the connection is intact
    assert await a.get("c", "fine") == b"v" and await a.list_keys("c") == ["fine"]


@pytest.fixture
def default_server(tmp_path: Path) -> Iterator[NatsServers]:
    """A nats-server with the default max_payload (1 MB)."""
    node = NatsNode("n1", tmp_path / "n1", max_payload="1MB")
    servers = NatsServers([node])
    try:
        node.start()
        servers.wait_ready()
        yield servers
    finally:
        servers.stop()


async def test_a_value_beyond_a_default_servers_max_payload_is_a_clear_error(
    default_server: NatsServers, open_hosts: OpenHost
) -> None:
    kv = await open_hosts(default_server.urls)
    with pytest.raises(StoreError, match=r"1048576 bytes .* max_payload of 1048576 .*max_payload: 2MB"):
        await kv.set("c", "big", b"x" * (1 << 20))
    call = CallKV(kv, "c")
    call.set("big", b"x" * (1 << 20))
    call.set("small", b"s")
    with pytest.raises(StoreError, match="nothing of this call was written"):
        await finish(call)
    largest = b"y" * ((1 << 20) - VALUE_HEADERS)
    await kv.set("c", "largest", largest)  # the connection was never dropped
    assert await kv.get("c", "largest") == largest
    assert await kv.list_keys("c") == ["largest"]


# ---- isolation between hosts ------------------------------------------------------------------
async def test_a_read_changed_on_another_host_conflicts_at_commit_and_writes_nothing(hosts: Hosts) -> None:
    a, b = hosts
    await a.set("c", "k", b"1")
    call = CallKV(a, "c")
    assert await on_thread(call.get, "k") == b"1"
    await b.set("c", "k", b"5")  # between the call's read and its commit, on another host
    call.set("k", b"2")
    call.set("other", b"x")
    ticket = await finish(call)  # this host knows nothing of it: the server decides
    with pytest.raises(CommitConflict):
        await a.commit(ticket)
    assert await b.get("c", "k") == b"5" and await a.get("c", "k") == b"5"
    assert await a.get("c", "other") is None and await a.list_keys("c") == ["k"]
    assert a.stats["conflicts"] == 1


async def test_a_read_changed_on_the_same_host_conflicts_before_any_round_trip(hosts: Hosts) -> None:
    a, _ = hosts
    call = CallKV(a, "c")
    assert await on_thread(call.get, "k") is None
    await a.set("c", "k", b"1")
    call.set("k", b"2")
    batches = a.stats["batches"]
    assert await finish(call) is CONFLICT
    assert a.stats["batches"] == batches and await a.get("c", "k") == b"1"


async def test_an_absent_or_deleted_key_read_conflicts_with_its_creation_elsewhere(hosts: Hosts) -> None:
    a, b = hosts
    for before in ("never", "deleted"):
        if before == "deleted":
            await a.set("c", "k", b"old")
            await a.delete("c", "k")
        call = CallKV(a, "c")
        assert await on_thread(call.get, "k") is None
        await b.set("c", "k", b"theirs")
        call.set("k", b"mine")
        with pytest.raises(CommitConflict):
            await a.commit(await finish(call))
        assert await a.get("c", "k") == b"theirs"
        await b.delete("c", "k")


async def test_disjoint_calls_and_blind_writes_on_two_hosts_commit_side_by_side(hosts: Hosts) -> None:
    a, b = hosts
    await a.set("c", "mine", b"0")
    await a.set("c", "theirs", b"0")

    async def count_on(host: JetStreamKV, key: str) -> None:
        call = CallKV(host, "c")
        value = await on_thread(call.get, key)
        call.set(key, str(int(value) + 1).encode())
        await host.commit(await finish(call))

    async def blind_on(host: JetStreamKV, value: bytes) -> None:
        call = CallKV(host, "c")
        call.set("blind", value)  # written without reading: the last write wins, no conflict
        call.set(value.decode(), value)
        await host.commit(await finish(call))

    for _ in range(10):
        await asyncio.gather(count_on(a, "mine"), count_on(b, "theirs"), blind_on(a, b"a"), blind_on(b, b"b"))
    assert await a.get("c", "mine") == b"10" and await b.get("c", "theirs") == b"10"
    assert await a.get("c", "blind") in (b"a", b"b")
    assert a.stats["conflicts"] == b.stats["conflicts"] == 0


async def test_a_listing_conflicts_with_a_key_added_or_removed_on_another_host(hosts: Hosts) -> None:
    a, b = hosts
    await a.set("c", "k1", b"1")
    for change in ("add", "remove"):
        call = CallKV(a, "c")
        listed = await on_thread(call.keys, "")
        call.set("count", str(len(listed)).encode())
        if change == "add":
            await b.set("c", "k2", b"2")
        else:
            await b.delete("c", "k2")
        with pytest.raises(CommitConflict):
            await a.commit(await finish(call))
    assert await a.get("c", "count") is None


async def test_a_listing_does_not_conflict_with_a_value_changing_on_another_host(hosts: Hosts) -> None:
    a, b = hosts
    await a.set("c", "k1", b"1")
    call = CallKV(a, "c")
    assert await on_thread(call.keys, "k") == ["k1"]
    await b.set("c", "k1", b"changed")  # the key set is the same
    call.set("count", b"1")
    await a.commit(await finish(call))
    assert await b.get("c", "count") == b"1"


async def test_a_read_only_call_sees_no_skew(hosts: Hosts) -> None:
    a, b = hosts
    await a.set("c", "x", b"1")
    await a.set("c", "y", b"1")
    call = CallKV(a, "c")
    assert await on_thread(call.get, "x") == b"1"
    both = CallKV(b, "c")  # another host moves x and y together
    both.set("x", b"2")
    both.set("y", b"2")
    await b.commit(await finish(both))
    assert await on_thread(call.get, "y") == b"2"  # x=1, y=2: a state that never existed
    with pytest.raises(CommitConflict):  # so the call is checked, and runs again
        await a.commit(await finish(call))
    single = CallKV(a, "c")
    assert await on_thread(single.get, "y") == b"2"
    assert await finish(single) is None  # one read is consistent on its own: nothing to wait for


async def test_calls_on_one_host_read_each_others_staged_writes(hosts: Hosts) -> None:
    a, b = hosts
    first = CallKV(a, "c")
    assert await on_thread(first.get, "n") is None
    first.set("n", b"1")
    ticket = await finish(first)
    second = CallKV(a, "c")
    assert await on_thread(second.get, "n") == b"1" and second.dirty  # staged, not yet committed
    await a.commit(ticket)  # the first commits alone; the second expects the revision it got
    second.set("n", b"2")
    await a.commit(await finish(second))
    assert await b.get("c", "n") == b"2"
    third = CallKV(a, "c")
    assert await on_thread(third.get, "n") == b"2" and not third.dirty
    await b.set("c", "n", b"9")
    third.set("n", b"3")
    with pytest.raises(CommitConflict):
        await a.commit(await finish(third))


async def test_concurrent_calls_share_batches_each_all_or_nothing(hosts: Hosts) -> None:
    a, b = hosts

    def call(i: int) -> Any:
        view = CallKV(a, "c")
        for part in ("x", "y", "z"):
            view.set(f"{part}{i}", str(i).encode())
        return view.finish()

    tickets = await asyncio.gather(*(on_thread(call, i) for i in range(60)))
    await asyncio.gather(*(a.commit(ticket) for ticket in tickets))
    assert a.stats["calls"] == 60 and a.stats["batches"] < 60  # group commit
    keys = await b.list_keys("c")
    assert keys == sorted(f"{part}{i}" for part in "xyz" for i in range(60))


async def test_close_commits_what_is_staged_and_refuses_more(hosts: Hosts) -> None:
    a, b = hosts
    a.stage_set("c", "k", b"staged")
    await a.close()
    with pytest.raises(StoreError, match="is closed"):
        a.stage_set("c", "k", b"late")
    assert await b.get("c", "k") == b"staged"


# ---- the staging area on its own --------------------------------------------------------------
def test_a_failed_batch_fails_the_queued_calls_that_depend_on_its_writes() -> None:
    staging = Staging()
    stamp, _ = staging.read(("c", "k"))
    first = staging.stage("c", {(KEY, "c", "k", Seen(3, True)): stamp}, {"k": b"1"})
    assert isinstance(first, StagedCall)
    assert staging.take(999) == [first]  # in flight
    stamp, staged = staging.read(("c", "k"))
    assert isinstance(staged, Write) and staged.value == b"1"
    reader = staging.stage("c", {(KEY, "c", "k", staged): stamp}, {"j": b"2"})  # read the staged write
    blind = staging.stage("c", {}, {"k": b"3"})  # overwrote it
    apart = staging.stage("c", {}, {"other": b"4"})
    chained = staging.stage(
        "c", {(KEY, "c", "j", staging.read(("c", "j"))[1]): staging.read(("c", "j"))[0]}, {"z": b""}
    )
    assert all(isinstance(c, StagedCall) for c in (reader, blind, apart, chained))
    assert isinstance(blind, StagedCall) and blind.bases[("c", "k")] is staged
    assert isinstance(apart, StagedCall) and apart.bases[("c", "other")] is BLIND
    failed = staging.failed([first], "refused", conflict=True)
    assert failed == [first, reader, blind, chained]  # transitively, in order; `apart` stays
    assert all(c.done and c.conflict for c in failed) and not apart.done
    assert staging.take(999) == [apart]
    assert staging.read(("c", "k"))[1] is None and staging.read(("c", "other"))[1] is not None
    late = staging.stage("c", {(KEY, "c", "k", staged): stamp}, {"k": b"5"})
    assert late is CONFLICT  # a read of a dropped write can never stage


def test_a_single_clean_read_needs_no_commit_and_two_reads_of_one_key_must_agree() -> None:
    staging = Staging()
    stamp, _ = staging.read(("c", "k"))
    assert staging.stage("c", {(KEY, "c", "k", Seen(3, True)): stamp}, {}) is None
    changed = {(KEY, "c", "k", Seen(3, True)): stamp, (KEY, "c", "k", Seen(4, True)): stamp}
    assert staging.stage("c", changed, {}) is CONFLICT


# ---- the atomic batch ---------------------------------------------------------------------------
def test_a_batch_checks_every_key_once_with_the_first_base_and_writes_the_last_value() -> None:
    subjects = KVSubjects("b")
    staging = Staging()
    first = staging.stage(
        "c",
        {(KEY, "c", "read", Seen(7, True)): 0, (KEY, "c", "rmw", Seen(5, True)): 0},
        {"rmw": b"1", "new": b"n"},
    )
    rmw_stamp, rmw_write = staging.read(("c", "rmw"))
    second = staging.stage("c", {(KEY, "c", "rmw", rmw_write): rmw_stamp}, {"rmw": b"2", "gone": None})
    listing = staging.stage("d", {(LISTING, "d", 11): 0, (KEY, "d", "x", Seen(3, False)): 0}, {})
    calls = staging.take(999)
    assert calls == [first, second, listing]
    plan = txn.plan(calls)
    wanted = plan.lookups(subjects)
    assert wanted == [subjects.key("c", "new"), subjects.key("c", "gone"), subjects.guard("c")]
    looked = {wanted[0]: Seen(0, False), wanted[1]: Seen(9, True), wanted[2]: Seen(4, True)}
    messages, written = txn.build(plan, subjects, "t" * 32, looked)
    sent = [
        (subject, data, {k: v for k, v in headers.items() if not k.startswith("Nats-Batch")})
        for subject, data, headers in messages
    ]
    assert sent == [
        (subjects.marker(0), b"", {EXPECT: "7", EXPECT_SUBJECT: subjects.key("c", "read"), "Nats-TTL": "1s"}),
        (subjects.key("c", "rmw"), b"2", {EXPECT: "5"}),  # once, its last value, the first call's base
        (subjects.key("c", "new"), b"n", {EXPECT: "0"}),  # blind: the revision looked up
        (subjects.key("c", "gone"), b"", {EXPECT: "9", "KV-Operation": "DEL"}),
        (subjects.marker(1), b"", {EXPECT: "3", EXPECT_SUBJECT: subjects.key("d", "x"), "Nats-TTL": "1s"}),
        (subjects.guard("c"), b"", {EXPECT: "4"}),  # c's key set changed (new, gone): its guard moves on
        (subjects.marker(2), b"", {EXPECT: "11", EXPECT_SUBJECT: subjects.guard("d"), "Nats-TTL": "1s"}),
        (subjects.record("t" * 32), b"", {EXPECT: "0", "Nats-TTL": "1m"}),
    ]
    assert [m[2]["Nats-Batch-Sequence"] for m in messages] == [str(i) for i in range(1, 9)]
    assert messages[-1][2]["Nats-Batch-Commit"] == "1" and "Nats-Batch-Commit" not in messages[0][2]
    assert [index for index, _ in written] == [1, 2, 3]
    assert not plan.blind and txn.plan([staging.stage("c", {}, {"z": b""})]).blind  # type: ignore[list-item]


async def test_a_commit_whose_reply_was_lost_is_settled_exactly(hosts: Hosts) -> None:
    a, _ = hosts
    nc, js, subjects = a.lattice.nc, a.lattice.js, a.subjects

    def batch(txid: str, key: str) -> list[txn.Message]:
        return [
            (subjects.key("c", key), b"v", {"Nats-Batch-Id": txid, "Nats-Batch-Sequence": "1"}),
            (
                subjects.record(txid),
                b"",
                {
                    EXPECT: "0",
                    "Nats-TTL": "1m",
                    "Nats-Batch-Id": txid,
                    "Nats-Batch-Sequence": "2",
                    "Nats-Batch-Commit": "1",
                },
            ),
        ]

    deadline = time.monotonic() + 20
    seq = await txn.send(nc, batch("a" * 32, "landed"), timeout=5)  # its reply, as if lost
    assert await txn.resolve(js, subjects, "a" * 32, deadline=deadline) == seq  # committed, at that sequence
    assert await txn.resolve(js, subjects, "b" * 32, deadline=deadline) is None  # never sent: fenced
    with pytest.raises(txn.BatchConflict):  # arriving late, it can never commit
        await txn.send(nc, batch("b" * 32, "late"), timeout=5)
    assert await txn.resolve(js, subjects, "b" * 32, deadline=deadline) is None  # its own fence, recognised
    assert await a.get("c", "landed") == b"v" and await a.get("c", "late") is None


async def test_hosts_that_lost_more_conflicts_go_first_until_they_commit(
    hosts: Hosts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kvfair, "HOLD_MIN_SECONDS", 60.0)  # only a `done` ends giving way here
    monkeypatch.setattr(kvfair, "HOLD_MAX_SECONDS", 60.0)
    a, b = hosts
    first, second = a._contention, b._contention
    await first.lost(["c"])  # a lost once on capsule c: b gives way to it
    await wait_for(lambda: second.holding("c") > 0, "b giving way")
    assert first.holding("c") == 0 and second.holding("other") == 0
    await first.won(["c"])  # a committed: b may go
    await wait_for(lambda: second.holding("c") == 0, "b going again")
    await second.lost(["c"])
    await second.lost(["c"])  # b lost twice, a none: a gives way
    await wait_for(lambda: first.holding("c") > 0, "a giving way")
    await first.lost(["c"])  # a lost once, fewer than b: b still goes first
    assert second.holding("c") == 0
    await second.won(["c"])
    await wait_for(lambda: first.holding("c") == 0, "a going again")
