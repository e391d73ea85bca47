"""One atomic batch of the lattice KV: what a group of staged calls must check and write,
the messages that say so, sending them, and finding out what became of a batch whose
reply was lost.

`plan(calls)` merges the calls (in staging order) into one check per key: the key's base
is that of the first call that touched it, since the calls after it read what it left (or
conflicted locally); a key written by several calls is sent once, with its last value.
`build` turns the plan into messages: a written key carries `Nats-Expected-Last-Subject-
Sequence` with its expected revision (a key written blind expects the revision looked up
just before sending: it is still checked, so the server orders it against concurrent
batches); a key only read becomes a marker on a side subject whose expectation points at
the key (`...-Subject`); a capsule whose key set changes rewrites its listing guard
(expecting the guard's revision), and a listing without such a change checks it with a
marker; the last message, the commit, is the batch's record, which must be the first
message of its subject.

`send` publishes a batch (the commit as a request) and sorts the answer: committed (the
last message's stream sequence: the messages take consecutive sequences), `BatchConflict`
(10071 an expectation failed; 10164 a subject it checks is in another batch in flight),
`BatchUnavailable` (certainly not committed, worth retrying: no leader, incomplete batch,
too many batches in flight), `BatchRejected` (certainly not committed, permanent) or
`BatchUnknown` (no answer: it may have committed). `resolve` settles an unknown outcome
exactly: it writes a fence to the record's subject expecting it empty; the fence succeeds
only if the batch did not commit, and from then on it never can (its record's expectation
fails); if the record is there, the batch committed, at the record's sequence.

Used by orchestrator.lattice.kvstore.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from .kvkeys import (
    EXPECT,
    EXPECT_SUBJECT,
    MARKER_TTL,
    OPERATION,
    RECORD_TTL,
    Entry,
    KVSubjects,
    headers_size,
)
from .kvstage import BLIND, Base, Seen, StagedCall, Write

logger = logging.getLogger(__name__)

FENCE = b"fence"
WRONG_LAST = 10071  # an expectation failed
IN_FLIGHT = 10164  # a subject it checks is in a batch not yet applied
RETRYABLE = frozenset({10176, 10210})  # batch incomplete (lost part of it), too many batches in flight

Message = tuple[str, bytes, dict[str, str]]


class BatchConflict(Exception):
    """The server refused an expectation: nothing of the batch was written."""

    def __init__(self, description: str, *, in_flight: bool) -> None:
        super().__init__(description)
        self.in_flight = in_flight


class BatchUnavailable(Exception):
    """Certainly not committed, and worth trying again (no stream leader, a lost part)."""


class BatchRejected(Exception):
    """Certainly not committed, and trying again would not help (the message says why)."""


class BatchUnknown(Exception):
    """No answer: the batch may or may not have committed."""


def transient(error: BaseException) -> bool:
    """An error that a JetStream request may give while the cluster elects a leader or the
    connection moves to another server."""
    if isinstance(error, nats.js.errors.APIError):
        return error.code in (503, 429) or error.err_code in RETRYABLE
    return isinstance(
        error,
        (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.OutboundBufferLimitError,
            nats.errors.StaleConnectionError,
            nats.errors.ConnectionReconnectingError,
            nats.js.errors.NoStreamResponseError,
            TimeoutError,
        ),
    )


# -- the plan -----------------------------------------------------------------------------
@dataclass
class KeyPlan:
    entry: Entry
    base: Base  # what the first call to touch the key saw
    writes: list[Write] = field(default_factory=list)  # in staging order; the last one is sent


@dataclass
class Plan:
    keys: dict[Entry, KeyPlan]
    guards: dict[str, int]  # capsule -> the listing guard revision its listings expect

    @property
    def capsules(self) -> set[str]:
        return {entry[0] for entry in self.keys} | set(self.guards)

    @property
    def blind(self) -> bool:
        """Whether it checks nothing its calls read: every expectation is looked up just
        before sending (a conflict then only says another batch came in between)."""
        return not self.guards and all(plan.base is BLIND for plan in self.keys.values())

    def lookups(self, subjects: KVSubjects) -> list[str]:
        """Subjects whose current revision the batch needs: keys written blind, and the
        guards of capsules whose key set may change without a listing having read them."""
        wanted = []
        changing = set()
        for plan in self.keys.values():
            if not plan.writes:
                continue
            if plan.base is BLIND:
                wanted.append(subjects.key(*plan.entry))
                changing.add(plan.entry[0])
            elif _present(plan.base, {}, subjects, plan.entry) != (plan.writes[-1].value is not None):
                changing.add(plan.entry[0])
        wanted.extend(subjects.guard(capsule) for capsule in sorted(changing) if capsule not in self.guards)
        return wanted


def plan(calls: Iterable[StagedCall]) -> Plan:
    keys: dict[Entry, KeyPlan] = {}
    guards: dict[str, int] = {}
    for call in calls:
        for capsule, guard in call.guards.items():
            guards.setdefault(capsule, guard)
        for entry, base in call.bases.items():
            if entry not in keys:
                keys[entry] = KeyPlan(entry, base)
        for entry, write in call.writes.items():
            keys[entry].writes.append(write)
    return Plan(keys, guards)


def _present(base: Base, looked: dict[str, Seen], subjects: KVSubjects, entry: Entry) -> bool:
    if isinstance(base, Seen):
        return base.present
    if isinstance(base, Write):
        return base.value is not None
    return looked[subjects.key(*entry)].present


def _expected(base: Base, looked: dict[str, Seen], subject: str) -> int:
    if isinstance(base, Seen):
        return base.rev
    if isinstance(base, Write):
        if base.rev is None:  # its batch went first and committed, or this call was dropped with it
            raise AssertionError(f"{base!r} has no revision")
        return base.rev
    return looked[subject].rev


def build(
    plan: Plan, subjects: KVSubjects, txid: str, looked: dict[str, Seen]
) -> tuple[list[Message], list[tuple[int, KeyPlan]]]:
    """The batch's messages, and the key plans it writes with their message's index."""
    messages: list[Message] = []
    written: list[tuple[int, KeyPlan]] = []
    changed: set[str] = set()
    markers = 0
    for key_plan in plan.keys.values():
        subject = subjects.key(*key_plan.entry)
        expect = str(_expected(key_plan.base, looked, subject))
        if key_plan.writes:
            value = key_plan.writes[-1].value
            headers = {EXPECT: expect}
            if value is None:
                headers[OPERATION] = "DEL"
            written.append((len(messages), key_plan))
            messages.append((subject, value or b"", headers))
            if _present(key_plan.base, looked, subjects, key_plan.entry) != (value is not None):
                changed.add(key_plan.entry[0])
        else:
            messages.append(_marker(subjects, markers, subject, expect))
            markers += 1
    for capsule in sorted(changed | set(plan.guards)):
        guard = subjects.guard(capsule)
        if capsule in changed:
            guard_rev = plan.guards[capsule] if capsule in plan.guards else looked[guard].rev
            messages.append((guard, b"", {EXPECT: str(guard_rev)}))
        else:
            messages.append(_marker(subjects, markers, guard, str(plan.guards[capsule])))
            markers += 1
    messages.append((subjects.record(txid), b"", {EXPECT: "0", "Nats-TTL": RECORD_TTL}))
    for index, (_, _, headers) in enumerate(messages, 1):
        headers["Nats-Batch-Id"] = txid
        headers["Nats-Batch-Sequence"] = str(index)
    messages[-1][2]["Nats-Batch-Commit"] = "1"
    return messages, written


def _marker(subjects: KVSubjects, index: int, checked: str, expect: str) -> Message:
    """A message that only checks that `checked` is still at revision `expect`."""
    return subjects.marker(index), b"", {EXPECT: expect, EXPECT_SUBJECT: checked, "Nats-TTL": MARKER_TTL}


def oversized(messages: list[Message], max_payload: int) -> str | None:
    """What in `messages` would not fit the server's max_payload (nats-server closes the
    connection of a client that sends such a message): None when all fit."""
    for subject, data, headers in messages:
        size = len(data) + headers_size(headers)
        if size > max_payload:
            return f"a message of {size} bytes to {subject[:120]} exceeds the NATS server's max_payload ({max_payload})"
    return None


# -- sending ------------------------------------------------------------------------------
async def send(nc: Client, messages: list[Message], *, timeout: float) -> int:
    """Publish the batch; the stream sequence of its last message once committed."""
    try:
        for subject, data, headers in messages[:-1]:
            await nc.publish(subject, data, headers=headers)
    except nats.errors.Error as error:  # the commit was never sent
        raise BatchUnavailable(f"{type(error).__name__}: {error}") from None
    subject, data, headers = messages[-1]
    try:
        reply = await nc.request(subject, data, headers=headers, timeout=timeout)
    except nats.errors.NoRespondersError:
        raise BatchUnavailable("no stream leader answered (no responders)") from None
    except (nats.errors.Error, TimeoutError) as error:
        raise BatchUnknown(f"{type(error).__name__}: {error or 'no answer'}") from None
    try:
        body: dict[str, Any] = json.loads(reply.data)
    except ValueError:
        raise BatchUnknown(f"an answer that is not JSON ({len(reply.data)} bytes)") from None
    problem = body.get("error")
    if problem is None:
        return int(body["seq"])
    code, err_code = problem.get("code"), problem.get("err_code")
    description = f"{problem.get('description', 'refused')} (code {code}, err_code {err_code})"
    if err_code in (WRONG_LAST, IN_FLIGHT):
        raise BatchConflict(description, in_flight=err_code == IN_FLIGHT)
    if code in (503, 429) or err_code in RETRYABLE:
        raise BatchUnavailable(description)
    raise BatchRejected(description)


async def resolve(js: JetStreamContext, subjects: KVSubjects, txid: str, *, deadline: float) -> int | None:
    """Whether the batch `txid` committed: its record's sequence, or None (it did not, and
    now never will). BatchUnknown when the cluster gives no answer before `deadline`
    (time.monotonic())."""
    subject = subjects.record(txid)
    pause = 0.05
    fenced = False  # the subject has a message: the record, or a fence of ours that landed
    while True:
        try:
            if not fenced:
                await js.publish(subject, FENCE, headers={EXPECT: "0", "Nats-TTL": RECORD_TTL})
                return None
            found = await js.get_msg(subjects.stream, subject=subject)
            return None if found.data == FENCE else found.seq
        except nats.js.errors.BadRequestError as error:
            if error.err_code == WRONG_LAST:
                fenced = True
                continue
            if error.err_code != IN_FLIGHT:
                raise BatchUnknown(f"the fence was refused: {error.description}") from None
            logger.debug("resolving batch %s: %s", txid, error)
        except (nats.errors.Error, TimeoutError) as error:
            if not transient(error):
                raise BatchUnknown(f"{type(error).__name__}: {error}") from None
            logger.debug("resolving batch %s: %s: %s", txid, type(error).__name__, error)
        if time.monotonic() + pause > deadline:
            raise BatchUnknown("no JetStream leader answered in time")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)
