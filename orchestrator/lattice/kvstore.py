"""The capsules' KV store on a lattice: `JetStreamKV`, a KVBackend on the JetStream KV
bucket `names.kv`, so that capsules on several hosts share their keys exactly as calls
on one host share the local store (orchestrator.capsule.store).

Layout: a capsule's key is the subject `$KV.<bucket>.<capsule>.<key>`, both encoded as one
NATS token each (orchestrator.lattice.kvkeys); any valid capsule key (1-4096 bytes of
UTF-8, no NUL) whose encoded form fits 1,024 characters (ASCII letters, digits, '-' and
'_' take one, every other byte three) is accepted; a longer one is a GateError naming the
limit. Values up to the contract's 1 MiB need a server `max_payload` of at least 1 MiB plus
the headers (`max_payload: 2MB`); with nats-server's default of 1 MB, a value that does not
fit is refused before anything is sent (a StoreError naming the setting), since the server
answers an oversized message by closing the connection.

Per-call atomicity: a tool call's writes reach the bucket in one JetStream atomic batch,
committed before the call replies, or not at all; a failed call stages nothing. Several
calls' commits share a batch (group commit, up to 1,000 messages), each call still all or
nothing: a batch commits or fails as a whole.

Isolation: **serializable, optimistic**, across hosts. Each read records the version the
commit must still find: the key's revision (a value read from the bucket; a deleted key's
delete marker; 0 for a key that never had a message), or the write it read while that was
staged on this host. The commit's atomic batch checks every one of them on the server, at
commit, under the stream's lock (kvstage and txn say how): a written key carries
`Nats-Expected-Last-Subject-Sequence`; a key only read is checked by a marker message on a
side subject of the stream (`Nats-Expected-Last-Subject-Sequence-Subject`, TTL 1 s); a key
listing is checked through the capsule's *listing guard*, a subject that every batch adding
or removing one of the capsule's keys rewrites. A batch that fails a check (10071, or
10164: a key it checks is in another host's batch in flight) writes nothing and is a
`CommitConflict`: the capsule runs the call again. A key written without being read (a
blind write: the last committed write wins) still carries an expectation, the revision
looked up just before sending, so that the server orders it against concurrent batches; a
batch of blind writes only that loses such a race is sent again, not failed. On one host,
calls are validated and staged in one step (kvstage) as in the local store, so they read
each other's staged writes and conflict locally, before any round trip; a listing first
waits for this host's staged writes of the capsule to commit. A read-only call that read
one key (or one listing) needs no check; one that read more rides the next batch as checks
only (no skew). Under contention across hosts, hosts take turns (kvfair), so that no
host's calls lose every round.

Why a guard, not a wildcard expectation on `<capsule>.>` (the highest revision among the
capsule's keys): on a replicated stream, nats-server 2.15 checks a wildcard expectation only
against applied messages, not against batches still being replicated (it tracks those by
exact subject), and a measured race let such listings miss keys added concurrently (24 of
146 commits on a 3-node cluster). The guard is an exact subject, tracked like any key.

Durability and failures: a commit is acknowledged by the stream (its replicas' quorum)
before the call replies. While the cluster has no stream leader (an election after a node
died takes about 5 s) the commit retries, for COMMIT_SECONDS at most; a commit whose reply
was lost is settled exactly by txn.resolve (committed, or fenced so that it never will),
never guessed. Reads retry the same way (READ_SECONDS). Nothing is cached: every read of
committed data asks the stream leader (a follower could be behind), except a call's read
while there is none: it asks any replica and its commit checks what it read (kvread), so
calls keep running through an election and wait for the new leader only to commit.

Calls' reads run on worker threads and hop to the event loop (`run_coroutine_threadsafe`);
commits and the API methods (get, set, delete, list_keys, capsules: `orch kv --lattice`,
the dashboard) run on it. `on_commit` callbacks run after the batch's acknowledgement.
Every write must go through JetStreamKV: a plain `kv.put` to the bucket bypasses the
listing guards. Used by the lattice host runtime and the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Mapping
from typing import Any, TypeVar

import nats.errors
import nats.js.errors

from ..capsule.kvbackend import CommitConflict
from ..capsule.store import Conflict
from ..errors import KVConflict, StoreError
from .connection import Lattice, LatticeError
from .kvcommit import GroupCommit
from .kvfair import Contention
from .kvkeys import MAX_BATCH, MAX_CALL_MESSAGES, KVSubjects, check_value, key_token
from .kvread import REQUEST_SECONDS, KVReader
from .kvstage import KEY, LISTING, Seen, StagedCall, Staging
from .txn import transient

logger = logging.getLogger(__name__)

T = TypeVar("T")
THREAD_WAIT_SECONDS = 60.0  # a worker thread's hop to the event loop (reads retry for 20 s)
SETTLE_ROUNDS = 3  # a listing waits this many times for the capsule's staged writes
API_ATTEMPTS = 8  # a blind API write that keeps conflicting
OPEN_SECONDS = 30.0


class JetStreamKV:
    """The lattice's KVBackend. Create with `await JetStreamKV.open(lattice)`."""

    def __init__(self, *, lattice: Lattice, subjects: KVSubjects) -> None:
        self.lattice = lattice
        self.subjects = subjects
        self._nc = lattice.nc
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.stats = {"batches": 0, "calls": 0, "messages": 0, "conflicts": 0, "retries": 0, "unknown": 0}
        js = lattice.nc.jetstream(timeout=REQUEST_SECONDS)
        self._staging = Staging()
        self._reader = KVReader(nc=lattice.nc, js=js, subjects=subjects, stats=self.stats)
        self._contention = Contention(lattice.nc, lattice.names.subject("kvx"))
        self._writer = GroupCommit(
            nc=lattice.nc,
            js=js,
            subjects=subjects,
            staging=self._staging,
            reader=self._reader,
            contention=self._contention,
            stats=self.stats,
        )

    @classmethod
    async def open(cls, lattice: Lattice, *, replicas: int = 1) -> JetStreamKV:
        """Find or create the bucket (`replicas` copies) and turn its transactions on;
        retried for OPEN_SECONDS while the cluster is busy or has no leader."""
        name = lattice.names.kv
        subjects = KVSubjects(name)
        end = time.monotonic() + OPEN_SECONDS
        pause = 0.1
        while True:
            try:
                await lattice.bucket(name, history=1, replicas=replicas)
                await _enable_transactions(lattice, subjects)
                break
            except (nats.errors.Error, TimeoutError) as error:
                if not transient(error) or time.monotonic() + pause > end:
                    raise LatticeError(
                        f"cannot open the KV bucket {name} on the lattice at {lattice.address.shown}: "
                        f"{type(error).__name__}: {error or 'no answer'}"
                    ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
        store = cls(lattice=lattice, subjects=subjects)
        await store._contention.start()
        return store

    async def close(self) -> None:
        """Refuse new writes and commit what is staged (the lattice stays connected)."""
        self._staging.close(f"the lattice KV bucket {self.subjects.bucket} is closed")
        last = self._staging.last
        if last is not None:
            await self._writer.settle(last)
        await self._contention.close()

    # -- from worker threads, inside a call ------------------------------------------------
    def read_from_thread(self, capsule: str, key: str) -> tuple[Hashable, int, bytes | None, bool]:
        """(token, stamp, value, dirty): the latest staged value on this host, else the
        committed one (a hop to the event loop)."""
        subject = self.subjects.key(capsule, key)  # GateError for a key too long: the guest sees it
        stamp, staged = self._staging.read((capsule, key))
        if staged is not None:
            return (KEY, capsule, key, staged), stamp, staged.value, True
        held = self._contention.holding(capsule)
        if held:  # another host goes first on this capsule: read what it commits
            time.sleep(held)
        rev, value, confirmed = self._from_thread(self._reader.last_in_call(subject))
        return (KEY, capsule, key, Seen(rev, value is not None, confirmed)), stamp, value, False

    def list_from_thread(self, capsule: str, prefix: str = "") -> tuple[Hashable, int, list[str], bool]:
        """(token, stamp, keys starting with `prefix`, False): the committed listing, once
        this host's staged writes of the capsule are committed."""
        for _ in range(SETTLE_ROUNDS):
            stamp, last = self._staging.listing(capsule)
            if last is None:
                break
            self._from_thread(self._writer.settle(last))
        else:
            stamp = -1  # still writing: this listing cannot validate, the call runs again
        guard, keys = self._from_thread(self._reader.listing(capsule))
        return (LISTING, capsule, guard), stamp, sorted(k for k in keys if k.startswith(prefix)), False

    def stage_call(
        self,
        capsule: str,
        *,
        reads: Mapping[Any, int],
        writes: Mapping[str, bytes | None],
        dirty: bool = False,
        on_commit: Callable[[], None] | None = None,
    ) -> Conflict | StagedCall | None:
        """Validate a call's reads on this host and queue it for the group commit: CONFLICT,
        None (nothing to commit or check), or the ticket for `commit`."""
        if len(reads) + len(writes) > MAX_CALL_MESSAGES:
            raise StoreError(
                f"capsule {capsule!r}: a call that reads and writes {len(reads) + len(writes)} KV keys cannot commit "
                f"atomically on the lattice (at most {MAX_CALL_MESSAGES} per call: one atomic batch of "
                f"{MAX_BATCH} messages); nothing of it was written"
            )
        max_payload = self._nc.max_payload
        for key, value in writes.items():
            key_token(capsule, key)
            check_value(capsule, key, value, max_payload)
        return self._staging.stage(capsule, reads, writes, on_commit)

    def get_from_thread(self, capsule: str, key: str) -> bytes | None:
        """The latest staged value on this host, else the committed one (from the leader)."""
        subject = self.subjects.key(capsule, key)
        staged = self._staging.read((capsule, key))[1]
        if staged is not None:
            return staged.value
        return self._from_thread(self._reader.last(subject))[1]

    def list_keys_from_thread(self, capsule: str, prefix: str = "") -> list[str]:
        return self.list_from_thread(capsule, prefix)[2]

    def stage_set(self, capsule: str, key: str, value: bytes) -> StagedCall:
        """Stage a write outside any call (committed by the next batch)."""
        return self._stage_blind(capsule, key, bytes(value))

    def stage_delete(self, capsule: str, key: str) -> StagedCall:
        return self._stage_blind(capsule, key, None)

    def _stage_blind(self, capsule: str, key: str, value: bytes | None) -> StagedCall:
        call = self.stage_call(capsule, reads={}, writes={key: value})
        assert isinstance(call, StagedCall)
        self._loop.call_soon_threadsafe(self._writer.start)
        return call

    def _from_thread(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.get_ident() == self._loop_thread:
            coroutine.close()
            raise RuntimeError("JetStreamKV *_from_thread called on the event loop thread: await the async method")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(THREAD_WAIT_SECONDS)

    # -- on the event loop -----------------------------------------------------------------
    async def commit(self, ticket: Any = None) -> None:
        """Until `ticket` (default: everything staged) is committed. CommitConflict when the
        server refused what it read (nothing written: run the call again); StoreError when
        the commit failed otherwise."""
        call = self._staging.last if ticket is None else ticket
        if call is None:
            return
        await self._writer.settle(call)
        if call.error is not None:
            if call.conflict:
                raise CommitConflict(call.error)
            raise StoreError(call.error)

    async def get(self, capsule: str, key: str) -> bytes | None:
        """The committed value, or None when the key is absent."""
        return (await self._reader.last(self.subjects.key(capsule, key)))[1]

    async def set(self, capsule: str, key: str, value: bytes) -> None:
        """Write and commit (a blind write: the last committed write wins)."""
        await self._write(capsule, key, bytes(value))

    async def delete(self, capsule: str, key: str) -> bool:
        """Delete and commit; whether the key held a value."""
        existed = await self.get(capsule, key) is not None
        await self._write(capsule, key, None)
        return existed

    async def _write(self, capsule: str, key: str, value: bytes | None) -> None:
        for _ in range(API_ATTEMPTS):
            try:
                await self.commit(self._stage_blind(capsule, key, value))
                return
            except CommitConflict:
                continue
        raise KVConflict(
            f"capsule {capsule!r} key {key[:80]!r}: the write kept meeting concurrent writes of the same key "
            f"({API_ATTEMPTS} attempts); try again"
        )

    async def list_keys(self, capsule: str, prefix: str = "") -> list[str]:
        """Committed keys of `capsule` starting with `prefix`, sorted."""
        _, keys = await self._reader.listing(capsule)
        return sorted(k for k in keys if k.startswith(prefix))

    async def capsules(self) -> list[str]:
        """Names of the capsules that have keys."""
        return await self._reader.capsules()


async def _enable_transactions(lattice: Lattice, subjects: KVSubjects) -> None:
    """Atomic batches on the bucket's stream, and the side subjects for markers, guards
    and records (idempotent; hosts opening at once agree)."""
    info = await lattice.js.stream_info(subjects.stream)
    config = info.config
    if config.allow_atomic and config.allow_direct and subjects.side in (config.subjects or []):
        return
    config.allow_atomic = True
    config.allow_direct = True  # a call's reads fall back on any replica during an election (kvread)
    if subjects.side not in (config.subjects or []):
        config.subjects = [*(config.subjects or []), subjects.side]
    try:
        updated = await lattice.js.update_stream(config)
    except nats.js.errors.APIError as error:
        raise LatticeError(
            f"cannot enable atomic batches on the KV bucket {subjects.bucket}: {error.description} (nats-server "
            "2.12 or later is needed)"
        ) from None
    if not updated.config.allow_atomic:
        raise LatticeError(
            f"the NATS server {lattice.nc.connected_server_version} cannot commit atomic batches, which the lattice KV "
            "needs: run nats-server 2.12 or later"
        )
