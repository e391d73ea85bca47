"""A lattice follows a git branch: the host holding the scheduler lease fetches the source
`orch apply ... --follow` recorded (orchestrator.lattice.followrecord) and publishes each
new valid revision as the lattice's desired state.

Every host runs a `LatticeFollower`; it acts only while its host holds the scheduler lease
(the scheduler tells it, `lease_changed`). The holder, every `interval_s` of the record
(counted from the end of the last fetch), at once when the record changes or the lease is
taken, and on `orch reconcile --lattice URL`:

1. fetches the branch into `<state_dir>/git` (a `GitFollower` of orchestrator.control.follow:
   a bare clone, `git archive` checkouts; a failing fetch is recorded in the status and
   logged at most every few minutes, and nothing changes);
2. compares the commit with the applied one: the follow status's, or the source of the
   current desired revision (`<source> @ <commit12>`: what a holder killed between
   publishing and recording leaves), so a new holder never publishes a revision again;
3. checks a new commit out and validates it strictly (`load_revision`: any problem rejects
   the revision whole, recorded with its problems; the last good revision keeps running).
   No builds run (a revision must carry its modules), and no environment variable is read:
   `${VAR}` in its config.yaml takes its default or is a problem, so what a revision means
   does not depend on which host holds the lease, and no host's environment reaches the
   lattice;
4. renews the lease (a fence: a holder that lost it publishes nothing), checks that the
   follow record did not change meanwhile, and publishes the revision
   (`desiredstate.publish`, source `<source> @ <commit12>`);
5. writes the follow status (compare-and-set: a stale holder does not overwrite a newer one).

While it holds the lease it also answers `orch.<lattice>.follow.reconcile` (request/reply):
a fetch now, answered with an `Outcome` (`request_reconcile` asks it). Used by the host
runtime (orchestrator.lattice.host) and the lattice client (`orch reconcile --lattice`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors

from ..control.follow import DEFAULT_INTERVAL_S, GitFollower, RevisionRejected
from ..control.gitsource import GitSourceError
from ..errors import ConfigError
from ..throttle import Throttle
from .artifacts import LatticeDataError
from .connection import Lattice, LatticeError
from .desiredstate import current, manifest_texts, publish
from .followrecord import FollowRecord, check_source, match_replicas, read_record, read_status, write_status
from .lease import LEASE_TTL_SECONDS
from .membership import LATTICE_AWAY, wait_event

logger = logging.getLogger(__name__)
__all__ = ["DEFAULT_INTERVAL_S", "LatticeFollower", "Outcome", "reconcile_subject", "request_reconcile"]

IDLE_SECONDS = 30.0  # re-read the record this often when nothing is followed (its watch wakes us anyway)
RETRY_SECONDS = 2.0  # after the lattice did not answer
RECONCILE_SECONDS = 150.0  # a client's wait: a fetch may take GIT_SECONDS (120 s)
NO_HOLDER_SECONDS = LEASE_TTL_SECONDS + 3.0  # a client's wait for a (new) holder to answer
MAX_PENDING = 16  # reconcile requests waiting at the holder; more are answered "busy"
MAX_ANSWER_BYTES = 1 << 20
OK = ("published", "applied")
OUTCOMES = (*OK, "rejected", "failed", "not-following", "malformed", "not-holder", "superseded", "busy")


def reconcile_subject(lattice: Lattice) -> str:
    return lattice.names.subject("follow", "reconcile")


@dataclass(frozen=True)
class Outcome:
    """What one fetch of the followed branch came to (the answer to `orch reconcile`)."""

    outcome: str  # one of OUTCOMES
    message: str
    git: dict[str, Any] | None = None  # the follow status after it
    revision: int | None = None  # the lattice's desired revision, when published or applied

    @property
    def ok(self) -> bool:
        return self.outcome in OK

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "message": self.message, "git": self.git, "revision": self.revision}

    @classmethod
    def parse(cls, data: bytes) -> Outcome:
        """An answer of a holder; LatticeError when it is not one."""
        try:
            if len(data) > MAX_ANSWER_BYTES:
                raise ValueError("too large")
            value: Any = json.loads(data)
            if not isinstance(value, dict) or value.get("outcome") not in OUTCOMES:
                raise ValueError("no known outcome")
            message, git, revision = value.get("message"), value.get("git"), value.get("revision")
            if not isinstance(message, str) or not (git is None or isinstance(git, dict)):
                raise ValueError("message must be text, git a mapping or null")
            if revision is not None and (not isinstance(revision, int) or isinstance(revision, bool)):
                raise ValueError("revision must be a whole number or null")
            return cls(value["outcome"], message, git, revision)
        except (ValueError, RecursionError) as error:
            raise LatticeError(
                f"the lease holder's answer to reconcile is not one this orchestrator understands ({error}): "
                "are the hosts of the same version?"
            ) from None


class LatticeFollower:
    """Follows the recorded branch while this host holds the scheduler lease. `run()` until
    cancelled; `tick()` fetches now (and publishes a new valid revision)."""

    def __init__(
        self,
        *,
        lattice: Lattice,
        host_id: str,
        state_dir: Path,
        workspace: Path,
        fence: Callable[[], Awaitable[bool]],
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.lattice = lattice
        self.host_id = host_id
        self.state_dir = Path(state_dir)
        self.workspace = Path(workspace)
        self.git: GitFollower | None = None
        self._fence = fence  # renews the lease now: False when it was lost
        self._wall_ms = wall_ms
        self._holding = False
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one fetch at a time (interval, record change, reconcile)
        self._due = 0.0  # monotonic time of the next fetch
        self._record_seen: int | None = None
        self._subscription: Any = None
        self._answering: set[asyncio.Task[None]] = set()
        self._warn = Throttle(logger, interval=60.0)

    # -- what wakes it -------------------------------------------------------------------
    def lease_changed(self, holding: bool) -> None:
        """The scheduler took (True) or lost (False) the lease: follow from now on, or stop."""
        self._holding = holding
        self._due = 0.0
        self._wake.set()

    def record_changed(self, revision: int, value: bytes | None) -> None:
        """The follow key has a new revision (the host watches it): fetch at once."""
        if revision == self._record_seen:
            return
        self._record_seen = revision
        self._due = 0.0
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._serve(self._holding)
                except LATTICE_AWAY as error:
                    self._warn.warning("serve", "host %s: cannot serve reconcile requests (%s)", self.host_id, error)
                wait = self._due - time.monotonic() if self._holding else IDLE_SECONDS
                if wait > 0:
                    await wait_event(self._wake, wait)
                self._wake.clear()
                if not self._holding or time.monotonic() < self._due:
                    continue
                try:
                    await self.tick()
                except asyncio.CancelledError:
                    raise
                except LATTICE_AWAY as error:
                    self._warn.warning("away", "following git: the lattice is not answering (%s); again", error)
                    self._due = time.monotonic() + RETRY_SECONDS
                except Exception:
                    logger.exception("following git: a fetch failed unexpectedly; again after the interval")
                    self._due = time.monotonic() + (self.git.interval if self.git is not None else IDLE_SECONDS)
        finally:
            for task in self._answering:
                task.cancel()
            if self._subscription is not None:
                with contextlib.suppress(*LATTICE_AWAY):
                    await self._subscription.unsubscribe()
                self._subscription = None

    async def _serve(self, holding: bool) -> None:
        """Answer reconcile requests while holding the lease, and only then."""
        if holding and self._subscription is None:
            self._subscription = await self.lattice.nc.subscribe(reconcile_subject(self.lattice), cb=self._on_request)
        elif not holding and self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await subscription.unsubscribe()

    async def _on_request(self, message: Any) -> None:
        if not message.reply:
            return
        if len(self._answering) >= MAX_PENDING:
            busy = Outcome("busy", f"the lease holder {self.host_id} has {MAX_PENDING} reconcile requests waiting")
            with contextlib.suppress(*LATTICE_AWAY):
                await self.lattice.nc.publish(message.reply, json.dumps(busy.to_dict()).encode())
            return
        task = asyncio.get_running_loop().create_task(self._answer(message.reply))  # (callbacks run one at a time)
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, reply: str) -> None:
        try:
            outcome = await self.tick()
        except asyncio.CancelledError:
            raise
        except LATTICE_AWAY as error:
            outcome = Outcome("failed", f"the lattice did not answer the lease holder {self.host_id} ({error})")
        except Exception:
            logger.exception("following git: a reconcile request failed unexpectedly")
            outcome = Outcome("failed", f"the lease holder {self.host_id} failed; see its log")
        with contextlib.suppress(*LATTICE_AWAY):
            await self.lattice.nc.publish(reply, json.dumps(outcome.to_dict()).encode())

    # -- one fetch -----------------------------------------------------------------------
    async def tick(self) -> Outcome:
        """Fetch the followed branch now; publish its revision when it is new and valid."""
        async with self._lock:
            outcome = await self._tick()
            interval = self.git.interval if self.git is not None and outcome.outcome != "not-following" else None
            self._due = time.monotonic() + (interval or IDLE_SECONDS)
            if outcome.outcome == "superseded":
                self._due = 0.0
            return outcome

    async def _tick(self) -> Outcome:
        if not self._holding:
            return Outcome("not-holder", f"host {self.host_id} does not hold the scheduler lease")
        record_revision, record, problem = await read_record(self.lattice)
        self._record_seen = record_revision
        if problem is not None:
            self._warn.warning("record", "%s", problem)
            self.git = None
            return Outcome("malformed", problem)
        if record is None:
            self.git = None
            return Outcome("not-following", "not following a branch")
        git = self._follower_for(record)
        status_revision, status, status_problem = await read_status(self.lattice)
        if status_problem is not None:
            self._warn.warning("status", "%s", status_problem)
        if status is not None and status["source"] == record.source:
            _restore(git, status)
        try:
            commit = await git.fetch()  # (a failure is logged by the follower, rate-limited)
        except GitSourceError as error:
            return await self._done(git, status_revision, "failed", f"fetch failed: {error}")
        short = commit[:12]
        source = f"{record.source} @ {short}"
        running = await self._current_source()
        if commit == git.applied_revision or running[1] == source:
            if git.applied_revision != commit:
                git.applied(commit)  # published by a holder that died before recording it
            return await self._done(git, status_revision, "applied", f"revision {short} is applied", running[0])
        if git.rejected is not None and git.rejected["revision"] == commit:
            return await self._done(git, status_revision, "rejected", _rejected_line(git))
        try:
            desired = await git.load(commit, environ={})
            manifests = await asyncio.to_thread(manifest_texts, desired)
        except RevisionRejected as error:
            git.rejected_now(error)
            logger.warning("following %s: %s", record.source, _rejected_line(git))
            return await self._done(git, status_revision, "rejected", _rejected_line(git))
        except ConfigError as error:  # (the checkout changed while read: not expected)
            git.rejected_now(RevisionRejected(commit, list(error.problems)))
            return await self._done(git, status_revision, "rejected", _rejected_line(git))
        if not await self._fence():
            self._holding = False
            return Outcome("not-holder", f"host {self.host_id} lost the scheduler lease; the next holder follows")
        if (await read_record(self.lattice))[0] != record_revision:
            return Outcome("superseded", "the follow record changed meanwhile; fetching again")
        try:
            published = await publish(self.lattice, desired, manifests, source=source)
        except LatticeError as error:
            git.error, git.error_at_ms = f"publishing revision {short} failed: {error}", self._wall_ms()
            self._warn.warning("publish", "following %s: %s", record.source, git.error)
            return await self._done(git, status_revision, "failed", git.error)
        git.applied(commit)
        await asyncio.to_thread(git.prune, [])
        try:
            await match_replicas(self.lattice)  # (publish scales the lattice's buckets to lattice.replicas)
        except LATTICE_AWAY as error:
            self._warn.warning("replicas", "following git: the status bucket keeps its replicas (%s)", error)
        if published.unchanged:  # (a commit that changes nothing that runs, say a README)
            message = f"revision {short} is applied (it changes nothing: desired revision {published.revision} stays)"
            return await self._done(git, status_revision, "applied", message, published.revision)
        message = f"revision {short} published as desired revision {published.revision}"
        if published.waiting:  # held: what runs keeps running until an operator answers
            waits = "; ".join(
                f"{name} would grant {', '.join(grants)}" for name, grants in sorted(published.waiting.items())
            )
            message += f"; awaiting approval ({waits}): `orch approve NAME --lattice URL`"
        logger.info("following %s: %s", record.source, message)
        return await self._done(git, status_revision, "published", message, published.revision)

    async def _done(
        self, git: GitFollower, last: int, outcome: str, message: str, revision: int | None = None
    ) -> Outcome:
        """Record the status (compare-and-set on `last`) and say how the fetch went."""
        status = {**git.to_dict(), "host": self.host_id}
        if await write_status(self.lattice, status, last=last) is None:
            logger.info("following git: the follow status changed meanwhile (a new record?); not overwritten")
        return Outcome(outcome, message, status, revision)

    def _follower_for(self, record: FollowRecord) -> GitFollower:
        if self.git is None or str(self.git.ref) != record.source:
            self.git = GitFollower(
                check_source(record.source),
                state_dir=self.state_dir,
                workspace=self.workspace,
                interval=record.interval_s,
                wall_ms=self._wall_ms,
            )
        self.git.interval = record.interval_s
        return self.git

    async def _current_source(self) -> tuple[int | None, str | None]:
        """(revision, source) of the lattice's current desired revision, if readable."""
        try:
            doc = await current(self.lattice)
        except LatticeDataError:
            return None, None
        return (doc.revision, doc.source) if doc is not None else (None, None)


def _restore(git: GitFollower, status: dict[str, Any]) -> None:
    """Carry on from what the lattice recorded (by this host or the holder before it)."""
    git.applied_revision, git.applied_at_ms = status["applied_revision"], status["applied_at_ms"]
    git.fetched_revision, git.fetched_at_ms = status["fetched_revision"], status["fetched_at_ms"]
    git.rejected, git.error, git.error_at_ms = status["rejected"], status["error"], status["error_at_ms"]
    git.seen = git.rejected["revision"] if git.rejected is not None else git.applied_revision


def _rejected_line(git: GitFollower) -> str:
    rejected = git.rejected or {}
    applied = str(git.applied_revision or "none")[:12]
    return (
        f"revision {str(rejected.get('revision'))[:12]} is rejected ({rejected.get('count')} problem(s)); "
        f"the applied revision ({applied}) keeps running"
    )


# -- asking the holder (orch reconcile --lattice) ------------------------------------------
async def request_reconcile(lattice: Lattice, *, timeout: float = RECONCILE_SECONDS) -> Outcome:
    """Ask the lease holder to fetch now. An Outcome; `not-following` without asking when
    no branch is followed. Raises LatticeError when no host answers."""
    _, record, problem = await read_record(lattice)
    if problem is not None:
        return Outcome("malformed", problem)
    if record is None:
        return Outcome(
            "not-following",
            "not following a branch (`orch apply git+URL#BRANCH:PATH --lattice URL --follow` starts)",
        )
    end = time.monotonic() + NO_HOLDER_SECONDS
    while True:
        try:
            answer = await lattice.nc.request(reconcile_subject(lattice), b"", timeout=timeout)
        except nats.errors.NoRespondersError:
            if time.monotonic() > end:
                raise LatticeError(
                    f"no host holds the scheduler lease of lattice {lattice.names.name} "
                    f"(waited {NO_HOLDER_SECONDS:g} s): start an `orch host`, then reconcile again"
                ) from None
            await asyncio.sleep(0.2)
            continue
        except nats.errors.TimeoutError:
            raise LatticeError(
                f"the lease holder did not answer within {timeout:g} s (a slow fetch?): "
                "`orch status --lattice URL` shows what it fetched"
            ) from None
        outcome = Outcome.parse(answer.data)
        if outcome.outcome == "not-holder" and time.monotonic() < end:  # a hand-over under way
            await asyncio.sleep(0.2)
            continue
        return outcome
