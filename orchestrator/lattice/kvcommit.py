"""The lattice KV's group commit: one writer task per host takes the staged calls, in
order, as atomic batches (one in flight at a time), and settles each batch's calls.

A batch is planned (txn.plan), the revisions it must expect of keys written blind and of
listing guards are looked up, and it is sent (txn.build, txn.send). Then:
- committed: each write gets its revision (its message's stream sequence: a batch's
  messages take consecutive ones), the calls are done and their `on_commit` callbacks run,
  in staging order;
- a conflict: its calls (and the queued calls that depend on their writes) fail with
  CommitConflict, and their capsules run them again; the other hosts are told, so that
  they let this one go first (kvfair). Refusals that say nothing about what the calls
  read are first retried a few times (safe: nothing was written): a subject it checks is
  in another batch still being replicated (10164), and a conflict while a revision looked
  up just before sending (a blind write's, a guard's) has moved since (another host's
  write came in between: blind writes are last-writer-wins);
- no stream leader (an election after a server died), or a lost part of the batch: sent
  again after a backoff, for COMMIT_SECONDS at most, then a StoreError saying so;
- no reply: settled by txn.resolve (committed, or fenced so that it never will be, and
  sent again), within RESOLVE_SECONDS; a StoreError saying the outcome is unknown only if
  the cluster answers nothing that long;
- anything else the server refuses: a StoreError with its reason.

Used by orchestrator.lattice.kvstore.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from nats.aio.client import Client
from nats.js import JetStreamContext

from ..errors import StoreError
from . import txn
from .kvfair import Contention
from .kvkeys import MAX_BATCH, KVSubjects
from .kvread import KVReader
from .kvstage import Seen, StagedCall, Staging

logger = logging.getLogger(__name__)

COMMIT_REQUEST_SECONDS = 5.0  # a batch's commit request; past it, the outcome is resolved
COMMIT_SECONDS = 30.0  # sending a batch again while the cluster has no leader
RESOLVE_SECONDS = 30.0  # settling a batch whose reply was lost (well below kvkeys.RECORD_TTL)
RACE_RETRIES = 5  # a batch refused for another batch in flight, or one of blind writes only


class GroupCommit:
    """The writer of one host's lattice KV (see the module docstring). Event-loop only."""

    def __init__(
        self,
        *,
        nc: Client,
        js: JetStreamContext,
        subjects: KVSubjects,
        staging: Staging,
        reader: KVReader,
        contention: Contention,
        stats: dict[str, int],
    ) -> None:
        self._nc = nc
        self._js = js
        self.subjects = subjects
        self._staging = staging
        self._reader = reader
        self._contention = contention
        self._stats = stats
        self._loop = asyncio.get_running_loop()
        self._writer: asyncio.Task[None] | None = None
        self._tick: asyncio.Future[None] = self._loop.create_future()  # resolved after each batch

    def start(self) -> None:
        """Make sure the writer runs (it stops once nothing is staged)."""
        if self._writer is None:
            self._writer = self._loop.create_task(self._drain(), name="lattice-kv-commit")

    async def settle(self, call: StagedCall) -> None:
        """Until `call` is done (committed or failed); never raises its failure. A caller
        that is cancelled does not cancel the commit."""
        while not call.done:
            self.start()
            await asyncio.shield(self._tick)

    def _signal(self) -> None:
        tick, self._tick = self._tick, self._loop.create_future()
        tick.set_result(None)

    async def _drain(self) -> None:
        try:
            while calls := self._staging.take(MAX_BATCH - 1):  # one message is the batch's record
                try:
                    await self._commit(calls)
                except asyncio.CancelledError:
                    self._staging.failed(calls, "the commit was interrupted (the host is stopping)", conflict=False)
                    raise
                except Exception as error:
                    logger.exception("lattice KV %s: a commit failed unexpectedly", self.subjects.bucket)
                    self._staging.failed(calls, f"the commit failed unexpectedly: {error}", conflict=False)
                finally:
                    self._signal()
        finally:
            self._writer = None
            self._signal()

    async def _commit(self, calls: list[StagedCall]) -> None:
        plan = txn.plan(calls)
        started = time.monotonic()
        deadline = started + COMMIT_SECONDS
        attempts = raced = 0
        pause = 0.02
        capsules = plan.capsules
        wanted = plan.lookups(self.subjects)
        fresh: dict[str, Seen] | None = None  # lookups made since the last send
        while True:
            attempts += 1
            held = self._contention.delay(capsules)
            if held:  # another host lost a conflict on one of them: its turn first
                await asyncio.sleep(held)
            try:
                looked = fresh if fresh is not None else await self._lookup(wanted, deadline)
            except StoreError as error:
                self._fail(calls, f"{error}; nothing of the call was written")
                return
            fresh = None
            txid = uuid.uuid4().hex
            messages, written = txn.build(plan, self.subjects, txid, looked)
            too_big = txn.oversized(messages, self._nc.max_payload)
            if too_big is not None:
                self._fail(calls, f"cannot commit to the lattice KV bucket {self.subjects.bucket}: {too_big}")
                return
            sent = time.monotonic()
            try:
                seq = await txn.send(self._nc, messages, timeout=COMMIT_REQUEST_SECONDS)
                self._contention.commit_seconds = 0.8 * self._contention.commit_seconds + 0.2 * (
                    time.monotonic() - sent
                )
            except txn.BatchConflict as conflict:
                if raced < RACE_RETRIES:  # sending it again is safe: nothing was written
                    if conflict.in_flight or plan.blind:
                        raced += 1
                        await asyncio.sleep(0.001 * raced)
                        continue
                    if wanted:  # did a revision looked up move (a race), rather than one the calls read?
                        try:
                            fresh = await self._lookup(wanted, deadline)
                        except StoreError:
                            fresh = None
                        if fresh is not None and fresh != looked:
                            raced += 1
                            continue
                        fresh = None
                self._stats["conflicts"] += 1
                self._staging.failed(calls, f"a key it read changed: {conflict}", conflict=True)
                await self._contention.lost(capsules)
                return
            except txn.BatchRejected as error:
                self._fail(calls, f"the lattice KV bucket {self.subjects.bucket} refused the commit: {error}")
                return
            except txn.BatchUnavailable as error:
                if time.monotonic() + pause > deadline:
                    self._fail(calls, self._gave_up(started, attempts, error))
                    return
                self._stats["retries"] += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)
                continue
            except txn.BatchUnknown as error:
                self._stats["unknown"] += 1
                logger.warning("lattice KV %s: no answer to a commit (%s); resolving", self.subjects.bucket, error)
                try:
                    resolved = await txn.resolve(self._js, self.subjects, txid, deadline=sent + RESOLVE_SECONDS)
                except txn.BatchUnknown as still:
                    self._fail(
                        calls,
                        f"the lattice KV bucket {self.subjects.bucket} did not say whether a commit was applied "
                        f"within {RESOLVE_SECONDS:g} s ({still}): the call's writes may or may not be stored; "
                        "check them before calling again",
                    )
                    return
                if resolved is None:  # fenced: it never will be applied; send it again
                    if time.monotonic() > deadline:
                        self._fail(calls, self._gave_up(started, attempts, error))
                        return
                    continue
                seq = resolved
            self._committed(calls, messages, written, seq)
            await self._contention.won(capsules)
            if attempts > 1:
                logger.warning(
                    "lattice KV %s: a commit waited %.1f s for the cluster (%d attempts)",
                    self.subjects.bucket,
                    time.monotonic() - started,
                    attempts,
                )
            return

    async def _lookup(self, subjects: list[str], deadline: float) -> dict[str, Seen]:
        found = await asyncio.gather(*(self._reader.last(subject, deadline) for subject in subjects))
        return {s: Seen(rev, value is not None) for s, (rev, value) in zip(subjects, found, strict=True)}

    def _gave_up(self, started: float, attempts: int, error: BaseException) -> str:
        return (
            f"the lattice KV bucket {self.subjects.bucket} accepted no commit for {time.monotonic() - started:.0f} s "
            f"({attempts} attempts; last: {error}); is a majority of the cluster's servers up? nothing of the call "
            "was written"
        )

    def _fail(self, calls: list[StagedCall], message: str) -> None:
        logger.error("lattice KV %s: %s", self.subjects.bucket, message)
        self._staging.failed(calls, message, conflict=False)

    def _committed(
        self, calls: list[StagedCall], messages: list[txn.Message], written: list[tuple[int, txn.KeyPlan]], seq: int
    ) -> None:
        first = seq - len(messages) + 1  # a batch's messages take consecutive sequences
        for index, key_plan in written:
            for write in key_plan.writes:
                write.rev = first + index
        self._stats["batches"] += 1
        self._stats["calls"] += len(calls)
        self._stats["messages"] += len(messages)
        for callback in self._staging.committed(calls):
            try:
                callback()
            except Exception:
                logger.exception("lattice KV %s: a callback after a commit failed", self.subjects.bucket)
