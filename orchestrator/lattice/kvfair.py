"""Fairness between hosts for a hot capsule: a host whose batch lost a conflict says so, and
the hosts that lost less give way to it until it has committed.

Why: optimistic commits favour the host that is ahead. Its calls read each other's staged
writes, so its next batch leaves the moment the previous one is acknowledged, while the
losing host's calls must run again, read, and send: under steady load on one key, the
losing host would lose every round, and its calls would give up after their attempts
(KVConflict).

So, on core NATS subjects `orch.<lattice>.kvx.<capsule>` (best effort, no JetStream): a
host whose batch was refused publishes `lost <n> <host>`, n being the conflicts it lost in
a row on that capsule; once it commits one, it publishes `done <host>`. A host gives way
to every host that lost more than itself (host ids break ties), from its `lost` until its
`done`, or for at most HOLD_COMMITS of its own recent commit round trips (between
HOLD_MIN_SECONDS and HOLD_MAX_SECONDS), should the `done` be lost. Giving way means holding back the batches
that touch the capsule, and the reads of its keys, so that they read what the other host
commits. Hosts that lost take turns in order of their losses.

This decides only who goes first, never what commits: a lost or late notice costs a
retry, not correctness. Used by orchestrator.lattice.kvcommit; started by kvstore.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .connection import barrier
from .kvkeys import capsule_token

logger = logging.getLogger(__name__)

HOLD_MIN_SECONDS = 0.005
HOLD_MAX_SECONDS = 0.1  # whatever the round trips (a slow commit during an election must not stall reads)
HOLD_COMMITS = 10.0  # at most this many commit round trips, when a `done` never comes


class Contention:
    """One host's side of the notices (see the module docstring). Event-loop only, but for
    `holding`, which reads."""

    def __init__(self, nc: Client, prefix: str) -> None:
        self._nc = nc
        self._prefix = prefix  # notices go to `<prefix>.<capsule token>`
        self._me = uuid.uuid4().hex.encode()
        self._ahead: dict[str, dict[bytes, float]] = {}  # capsule token -> hosts going first -> until
        self._losses: dict[str, int] = {}  # capsule token -> conflicts lost in a row here
        self._subscription: Subscription | None = None
        self.heard = 0
        self.commit_seconds = 0.001  # a recent commit's round trip (kvcommit keeps it current)

    async def start(self) -> None:
        self._subscription = await self._nc.subscribe(f"{self._prefix}.*", cb=self._heard)
        await barrier(self._nc)  # the server knows of it before this host commits anything

    async def close(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(nats.errors.Error):  # the connection is closing anyway
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _heard(self, message: Msg) -> None:
        words = message.data.split(b" ")
        token = message.subject[len(self._prefix) + 1 :]
        if len(words) == 3 and words[0] == b"lost" and words[1].isdigit() and words[2] != self._me:
            if (int(words[1]), words[2]) > (self._losses.get(token, 0), self._me):  # it has waited longer
                hold = min(max(HOLD_MIN_SECONDS, HOLD_COMMITS * self.commit_seconds), HOLD_MAX_SECONDS)
                hold *= random.uniform(0.8, 1.2)
                self._ahead = {**self._ahead, token: {**self._ahead.get(token, {}), words[2]: time.monotonic() + hold}}
                self.heard += 1
        elif len(words) == 2 and words[0] == b"done" and words[1] in self._ahead.get(token, {}):
            left = {host: until for host, until in self._ahead[token].items() if host != words[1]}
            self._ahead = {**self._ahead, token: left}

    def holding(self, capsule: str) -> float:
        """How long this host still gives way on `capsule` (any thread: the maps are only
        ever replaced, never changed in place)."""
        ahead = self._ahead.get(capsule_token(capsule)) if self._ahead else None
        if not ahead:
            return 0.0
        return max(max(ahead.values()) - time.monotonic(), 0.0)

    def delay(self, capsules: Iterable[str]) -> float:
        """How long to hold back a batch that touches `capsules`."""
        return max((self.holding(capsule) for capsule in capsules), default=0.0) if self._ahead else 0.0

    async def won(self, capsules: Iterable[str]) -> None:
        """A batch touching `capsules` committed here: the hosts giving way may go."""
        for capsule in capsules:
            token = capsule_token(capsule)
            if self._losses.pop(token, 0):
                await self._notify(token, b"done %s" % self._me)

    async def lost(self, capsules: Iterable[str]) -> None:
        """This host's batch touching `capsules` lost a conflict: the others give way."""
        for capsule in capsules:
            token = capsule_token(capsule)
            losses = self._losses[token] = self._losses.get(token, 0) + 1
            await self._notify(token, b"lost %d %s" % (losses, self._me))

    async def _notify(self, token: str, notice: bytes) -> None:
        try:
            await self._nc.publish(f"{self._prefix}.{token}", notice)
        except nats.errors.Error as error:  # best effort: only fairness depends on it
            logger.debug("lattice KV: a contention notice was not sent: %s", error)
