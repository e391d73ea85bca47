"""Reading the lattice KV's committed data: a key's last message, a capsule's key listing
with its listing guard, the capsules that have keys.

Every read asks the stream leader (`STREAM.MSG.GET`, not a direct get, which a follower
may answer from behind): what a read returns includes every acknowledged commit. But for
a call's read while the stream has no leader (an election takes about 5 s, longer than a
call's time limit): that one asks any replica, and says the answer is unconfirmed, so the
call's commit checks it (txn's expectations) after the election. A key's
answer is its revision and value; a deleted key answers its delete marker's revision and
no value. A listing is one consistent snapshot (an ephemeral consumer delivering the last
message of each of the capsule's keys), taken after reading the capsule's listing guard,
so the guard revision is never newer than the listing. While the cluster elects a leader
(or the connection moves to another server) a read retries, until its deadline, then is a
StoreError that says so.

Used by orchestrator.lattice.kvstore and .kvcommit (lookups before a commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..errors import StoreError
from .kvkeys import OPERATION, KVSubjects, capsule_token
from .naming import decode_token
from .txn import transient

T = TypeVar("T")
REQUEST_SECONDS = 2.0  # one JetStream request
LEADER_SECONDS = 0.5  # a call's read waits this long for the stream leader before asking any replica
READ_SECONDS = 20.0  # retrying a read while the cluster has no leader
LISTING_SECONDS = 30.0  # a listing's consumer, if its deletion is lost, goes away when idle that long
NO_MESSAGE = 10037  # nats-server's "no message found"


class KVReader:
    """Reads of bucket `subjects.bucket` (see the module docstring)."""

    def __init__(self, *, nc: Client, js: JetStreamContext, subjects: KVSubjects, stats: dict[str, int]) -> None:
        self._nc = nc
        self._js = js
        self._quick = nc.jetstream(timeout=LEADER_SECONDS)
        self.subjects = subjects
        self._stats = stats

    async def last(self, subject: str, deadline: float | None = None) -> tuple[int, bytes | None]:
        """(revision, value or None) of the last message on `subject`, from the stream
        leader; (0, None) when it never had one."""
        return await self._retrying(lambda: self._ask(self._js, subject, direct=False), "read", deadline)

    async def last_in_call(self, subject: str) -> tuple[int, bytes | None, bool]:
        """A call's read: (revision, value or None, confirmed). From the stream leader if it
        answers within LEADER_SECONDS; else (an election) from any replica, unconfirmed:
        perhaps behind, so the call's commit must check it (it waits for the new leader
        there, outside the call's time limit). Keeps trying both until READ_SECONDS."""
        end = time.monotonic() + READ_SECONDS
        pause = 0.02
        while True:
            for direct in (False, True):
                try:
                    rev, value = await self._ask(self._quick, subject, direct=direct)
                    return rev, value, not direct
                except (nats.errors.Error, TimeoutError) as error:
                    if not transient(error):
                        raise self._failed("read", error) from None
                    if direct and time.monotonic() + pause > end:
                        raise self._gave_up("read", error) from None
            self._stats["retries"] += 1
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _ask(self, js: JetStreamContext, subject: str, *, direct: bool) -> tuple[int, bytes | None]:
        try:
            found = await js.get_msg(self.subjects.stream, subject=subject, direct=direct)
        except nats.js.errors.NotFoundError as error:
            if error.err_code in (NO_MESSAGE, None):  # a direct get's 404 carries no code
                return 0, None
            raise
        headers = found.headers or {}
        if headers.get(OPERATION) in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers:
            return int(found.seq or 0), None
        return int(found.seq or 0), found.data or b""

    async def listing(self, capsule: str) -> tuple[int, list[str]]:
        """(the capsule's listing guard revision, its keys), the guard read first: a key
        added or removed after it changes the guard, so the listing is never older."""
        guard, _ = await self.last(self.subjects.guard(capsule))
        prefix = capsule_token(capsule) + "."
        keys = []
        for found in await self.keys(self.subjects.capsule_keys(capsule)):
            rest = found[len(prefix) :]
            if found.startswith(prefix) and "." not in rest:
                try:
                    keys.append(decode_token(rest))
                except ValueError:  # not written by JetStreamKV
                    continue
        return guard, keys

    async def capsules(self) -> list[str]:
        """Names of the capsules that have keys."""
        names = set()
        for found in await self.keys(">"):
            token, _, rest = found.partition(".")
            if rest and "." not in rest:
                try:
                    names.add(decode_token(token))
                except ValueError:
                    continue
        return sorted(names)

    async def keys(self, pattern: str) -> list[str]:
        """The KV keys (encoded) matching `pattern` that hold a value, from one snapshot:
        an ephemeral consumer delivering the last message of each matching subject (its
        headers only). The snapshot ends at the message that leaves nothing pending (the
        consumer's count at creation says when there is none). nats-py's KV watch is not
        used: its end-of-snapshot marker races with delivery and can end a listing early."""

        async def snapshot() -> list[str]:
            inbox = self._nc.new_inbox()
            subscription = await self._nc.subscribe(inbox)
            name = ""
            try:
                info = await self._js.add_consumer(
                    self.subjects.stream,
                    config=ConsumerConfig(
                        deliver_subject=inbox,
                        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                        filter_subject=f"$KV.{self.subjects.bucket}.{pattern}",
                        ack_policy=AckPolicy.NONE,
                        headers_only=True,
                        mem_storage=True,
                        num_replicas=1,
                        inactive_threshold=LISTING_SECONDS,
                    ),
                )
                name = info.name or ""
                present: dict[str, bool] = {}  # in stream order: a later message of a key overrides
                pending = info.num_pending or 0
                skip = len(f"$KV.{self.subjects.bucket}.")
                while pending:
                    message = await subscription.next_msg(timeout=REQUEST_SECONDS)
                    headers = message.headers or {}
                    deleted = headers.get(OPERATION) in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers
                    present[message.subject[skip:]] = not deleted
                    pending = message.metadata.num_pending
                return [key for key, there in present.items() if there]
            finally:
                await subscription.unsubscribe()
                if name:
                    with contextlib.suppress(nats.errors.Error, TimeoutError):  # else it goes away when idle
                        await self._js.delete_consumer(self.subjects.stream, name)

        return await self._retrying(snapshot, "list", None)

    async def _retrying(self, operation: Callable[[], Coroutine[Any, Any, T]], what: str, deadline: float | None) -> T:
        end = time.monotonic() + READ_SECONDS if deadline is None else deadline
        pause = 0.02
        while True:
            try:
                return await operation()
            except (nats.errors.Error, TimeoutError) as error:
                if not transient(error):
                    raise self._failed(what, error) from None
                if time.monotonic() + pause > end:
                    raise self._gave_up(what, error) from None
            self._stats["retries"] += 1
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _failed(self, what: str, error: BaseException) -> StoreError:
        return StoreError(
            f"cannot {what} the lattice KV bucket {self.subjects.bucket}: {type(error).__name__}: {error}"
        )

    def _gave_up(self, what: str, error: BaseException) -> StoreError:
        return StoreError(
            f"cannot {what} the lattice KV bucket {self.subjects.bucket}: no JetStream server answered in time "
            f"({type(error).__name__}); is a majority of the cluster's servers up?"
        )
