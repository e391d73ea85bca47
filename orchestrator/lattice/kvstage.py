"""The lattice KV's staging area on one host: calls validated locally and queued for the
group commit, the view of their uncommitted writes, and the version stamps of reads.

This is the local half of the isolation protocol (kvstore's docstring has the whole of
it). A call's read records a *token* naming what it read and its *base*, the version the
server-side check will expect: `Seen(rev, present)` for a committed value read from the
server, or the `Write` it read while that was staged on this host (a dirty read). Beside
the token, a read records the stamp of the key's stripe; staging a write, or dropping a
failed one, bumps its stripe and its capsule's listing stripe (STRIPES of them: bounded
memory, two keys sharing a stripe only cost a needless retry). `stage` validates a call's
stamps and stages its writes in one step under the lock, exactly as the local store
(orchestrator.capsule.store) does, so calls on one host see each other's staged writes
in staging order; a key written without being read gets as base the write staged before
it, or BLIND (its revision is looked up when the batch is sent).

Staged calls wait in a queue; the writer takes a prefix of it as one atomic batch. After
the batch commits, its writes get their revisions (bases of later dirty reads) and leave
the view; after it fails, its calls fail, and so does every queued call that read or
overwrote one of their writes (transitively); the stamps they touched are bumped.

Pure Python, any thread. Used by orchestrator.lattice.kvstore and .txn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..capsule.store import CONFLICT, Conflict
from ..errors import StoreError
from .kvkeys import Entry

STRIPES = 4096  # a power of two
KEY = "k"  # token kinds: (KEY, capsule, key, base) and (LISTING, capsule, guard revision)
LISTING = "l"
_LISTING = "\x00listing"  # a listing's stripe key (no real key holds a NUL)


@dataclass(frozen=True, slots=True)
class Seen:
    """A committed version read from the server: its revision (0: the key never had a
    message) and whether it holds a value (a deleted key holds none). Not `confirmed`: read
    from a replica that may be behind (during an election), so a commit must check it."""

    rev: int
    present: bool
    confirmed: bool = field(default=True, compare=False)


class Blind:
    """The base of a key written without being read: its revision is looked up at send."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BLIND"


BLIND = Blind()


class Write:
    """One staged write (`value` None: a delete). `rev` is set once its batch committed."""

    __slots__ = ("call", "entry", "failed", "rev", "value")

    def __init__(self, entry: Entry, value: bytes | None, call: StagedCall) -> None:
        self.entry = entry
        self.value = value
        self.call = call
        self.rev: int | None = None
        self.failed = False

    def __repr__(self) -> str:
        return f"Write({self.entry!r}, rev={self.rev})"


Base = Seen | Write | Blind


class StagedCall:
    """A call's reads and writes, queued for the group commit; the ticket to `commit`.

    `bases`: every key it touched, with the version its batch must expect; `guards`: the
    listing guard revision per capsule it listed; `writes`: its staged writes."""

    __slots__ = ("bases", "callbacks", "conflict", "done", "error", "guards", "writes")

    def __init__(self, bases: dict[Entry, Base], guards: dict[str, int]) -> None:
        self.bases = bases
        self.guards = guards
        self.writes: dict[Entry, Write] = {}
        self.callbacks: list[Callable[[], None]] = []
        self.done = False
        self.error: str | None = None
        self.conflict = False

    @property
    def size(self) -> int:
        """Messages it adds to a batch, at most (its keys, listings and a guard)."""
        return len(self.bases) + len(self.guards) + 1

    def depends_on(self, writes: set[Write]) -> bool:
        return any(isinstance(base, Write) and base in writes for base in self.bases.values())


class Staging:
    """The staged calls of one host's lattice KV (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # never held across an await
        self._stamps = [0] * STRIPES
        self._queue: list[StagedCall] = []  # staged, not yet taken
        self._inflight: list[StagedCall] = []  # taken by the writer
        self._view: dict[Entry, Write] = {}  # the latest uncommitted write of each key
        self.closed = ""  # why staging is refused, once closed
        self.stats = {"staged": 0, "conflicts": 0, "failed": 0}

    # -- reads (lock held by the caller, or not: a stale answer only costs a conflict) ----
    @staticmethod
    def stripe(entry: Entry) -> int:
        return hash(entry) & (STRIPES - 1)

    @staticmethod
    def listing_stripe(capsule: str) -> int:
        return hash((capsule, _LISTING)) & (STRIPES - 1)

    def read(self, entry: Entry) -> tuple[int, Write | None]:
        """The stamp of `entry`'s stripe and its staged write, if any (one consistent look)."""
        with self.lock:
            return self._stamps[self.stripe(entry)], self._view.get(entry)

    def listing(self, capsule: str) -> tuple[int, StagedCall | None]:
        """The capsule's listing stamp, and the last call that has uncommitted writes of it."""
        with self.lock:
            last = None
            for call in (*self._inflight, *self._queue):
                if any(entry[0] == capsule for entry in call.writes):
                    last = call
            return self._stamps[self.listing_stripe(capsule)], last

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def last(self) -> StagedCall | None:
        """The call staged last, not yet done (None: nothing is waiting)."""
        with self.lock:
            calls = self._queue or self._inflight
            return calls[-1] if calls else None

    # -- staging ---------------------------------------------------------------------------
    def stage(
        self,
        capsule: str,
        reads: Mapping[Any, int],
        writes: Mapping[str, bytes | None],
        on_commit: Callable[[], None] | None = None,
    ) -> Conflict | StagedCall | None:
        """Validate a call's reads and stage its writes, atomically: CONFLICT (nothing
        staged), None (nothing to commit or check: a single consistent read, or none), or
        the queued call."""
        with self.lock:
            if self.closed:
                raise StoreError(self.closed)
            bases: dict[Entry, Base] = {}
            guards: dict[str, int] = {}
            dirty = False
            for token, version in reads.items():
                if not isinstance(token, tuple):
                    raise TypeError(f"not a lattice KV read: {token!r}")
                if token[0] == KEY:
                    _, cap, key, base = token
                    entry = (cap, key)
                    if self._stamps[self.stripe(entry)] != version or (isinstance(base, Write) and base.failed):
                        return self._conflict()
                    if bases.setdefault(entry, base) != base:  # it saw the key change
                        return self._conflict()
                    dirty = dirty or isinstance(base, Write) or (isinstance(base, Seen) and not base.confirmed)
                else:
                    _, cap, guard = token
                    if self._stamps[self.listing_stripe(cap)] != version or guards.setdefault(cap, guard) != guard:
                        return self._conflict()
            if not writes and not dirty and len(bases) + len(guards) <= 1:
                return None  # one confirmed read is consistent on its own
            call = StagedCall(bases, guards)
            for key in writes:
                entry = (capsule, key)
                if entry not in bases:
                    staged = self._view.get(entry)
                    bases[entry] = BLIND if staged is None else staged
            stamps, mask = self._stamps, STRIPES - 1
            for key, value in writes.items():
                entry = (capsule, key)
                write = Write(entry, value, call)
                call.writes[entry] = write
                self._view[entry] = write
                stamps[hash(entry) & mask] += 1
            if writes:
                stamps[self.listing_stripe(capsule)] += 1
            if on_commit is not None:
                call.callbacks.append(on_commit)
            self._queue.append(call)
            self.stats["staged"] += 1
            return call

    def _conflict(self) -> Conflict:
        self.stats["conflicts"] += 1
        return CONFLICT

    # -- the writer ------------------------------------------------------------------------
    def take(self, room: int) -> list[StagedCall]:
        """The next batch: queued calls, in order, while their messages fit `room`."""
        with self.lock:
            taken: list[StagedCall] = []
            used = 0
            for call in self._queue:
                if taken and used + call.size > room:
                    break
                taken.append(call)
                used += call.size
            del self._queue[: len(taken)]
            self._inflight.extend(taken)
            return taken

    def committed(self, calls: list[StagedCall]) -> list[Callable[[], None]]:
        """The batch of `calls` committed (their writes' revisions are set): done, out of
        the view; returns their callbacks, in staging order, to run outside the lock."""
        with self.lock:
            callbacks = []
            for call in calls:
                for entry, write in call.writes.items():
                    if self._view.get(entry) is write:
                        del self._view[entry]
                call.done = True
                callbacks.extend(call.callbacks)
            self._inflight = [c for c in self._inflight if not c.done]
            return callbacks

    def failed(self, calls: list[StagedCall], error: str, *, conflict: bool) -> list[StagedCall]:
        """The batch of `calls` did not commit: fail them and every queued call that
        depends on their writes (a conflict when `conflict`, else `error`); bump the
        stamps of every dropped write. Returns the calls failed."""
        with self.lock:
            dropped: set[Write] = set()
            failed = list(calls)
            for call in calls:
                dropped.update(call.writes.values())
            kept = []
            for call in self._queue:
                if call.depends_on(dropped):
                    failed.append(call)
                    dropped.update(call.writes.values())
                else:
                    kept.append(call)
            self._queue = kept
            stamps = self._stamps
            for write in dropped:
                write.failed = True
                stamps[self.stripe(write.entry)] += 1
                stamps[self.listing_stripe(write.entry[0])] += 1
            failing = set(map(id, failed))
            self._inflight = [c for c in self._inflight if id(c) not in failing]
            self._view = {}
            for call in (*self._inflight, *self._queue):
                self._view.update(call.writes)
            for call in failed:
                call.conflict = conflict
                call.error = error
                call.done = True
            self.stats["failed"] += len(failed)
            return failed

    def close(self, why: str) -> None:
        with self.lock:
            self.closed = why
