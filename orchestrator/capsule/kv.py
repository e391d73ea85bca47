"""A capsule's view of the KV store from its worker threads, per call and per capsule, and
the gate that lets a call that keeps conflicting run alone.

`CallKV` is one tool call's view: its writes wait in a buffer, readable by the call itself;
every read it makes of the store records a version stamp (see orchestrator.capsule.store
for the isolation contract). `finish()` hands reads and writes to the store, which
validates the stamps and stages the writes in one step, or reports a conflict (nothing
staged: the capsule layer runs the call again). A failed call never reaches `finish`: its
writes are dropped, so a client may retry a failed call without doubling its effect.
`CapsuleKV` is the capsule's slice of the store without a call (writes staged at once).

`CallGate` admits a capsule's attempts: optimistic ones side by side, and a *solo* one
(after a few conflicts) with no other attempt of the capsule beside it, so a call that
keeps losing to its neighbours still makes progress.

Used by orchestrator.capsule.capsule (which hands a CallKV to each call's airlocks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any

from .kvbackend import KVBackend


class CallKV:
    """One call's view of its capsule's KV; see the module docstring."""

    def __init__(self, store: KVBackend, capsule: str) -> None:
        self._store = store
        self._capsule = capsule
        self.writes: dict[str, bytes | None] = {}
        self.reads: dict[Hashable, int] = {}  # token (a stripe, a key, a listing) -> the first version seen
        self.dirty = False  # read staged data not yet committed

    def get(self, key: str) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        stripe, version, value, dirty = self._store.read_from_thread(self._capsule, key)
        self._saw(stripe, version, dirty)
        return value

    def set(self, key: str, value: bytes) -> None:
        self.writes[key] = value

    def delete(self, key: str) -> None:
        self.writes[key] = None

    def keys(self, prefix: str) -> list[str]:
        stripe, version, listed, dirty = self._store.list_from_thread(self._capsule, prefix)
        self._saw(stripe, version, dirty)
        keys = set(listed)
        for key, value in self.writes.items():
            if key.startswith(prefix):
                if value is None:
                    keys.discard(key)
                else:
                    keys.add(key)
        return sorted(keys)

    def _saw(self, stripe: Hashable, version: int, dirty: bool) -> None:
        self.reads.setdefault(stripe, version)  # a later, newer stamp must not hide a change
        self.dirty = self.dirty or dirty

    def finish(self, on_commit: Callable[[], None] | None = None) -> Any:
        """Validate and stage (see `KVStore.stage_call`): CONFLICT, a ticket to commit, or
        None when there is nothing to wait for."""
        return self._store.stage_call(
            self._capsule, reads=self.reads, writes=self.writes, dirty=self.dirty, on_commit=on_commit
        )


class CapsuleKV:
    """One capsule's slice of the KVStore, for host functions on worker threads."""

    def __init__(self, store: KVBackend, capsule: str) -> None:
        self._store = store
        self._capsule = capsule

    def get(self, key: str) -> bytes | None:
        return self._store.get_from_thread(self._capsule, key)

    def set(self, key: str, value: bytes) -> None:
        self._store.stage_set(self._capsule, key, value)

    def delete(self, key: str) -> None:
        self._store.stage_delete(self._capsule, key)

    def keys(self, prefix: str) -> list[str]:
        return self._store.list_keys_from_thread(self._capsule, prefix)


class CallGate:
    """Shared attempts run side by side; a solo attempt waits until none runs, and shared
    attempts wait while a solo one waits or runs. Event-loop only."""

    def __init__(self) -> None:
        self._shared = 0
        self._solo_waiting = 0
        self._solo_lock = asyncio.Lock()
        self._open = asyncio.Event()
        self._open.set()
        self._drained: asyncio.Future[None] | None = None

    async def enter_shared(self) -> None:
        while self._solo_waiting:
            await self._open.wait()
        self._shared += 1

    def leave_shared(self) -> None:
        self._shared -= 1
        if self._shared == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def enter_solo(self) -> None:
        self._solo_waiting += 1
        self._open.clear()
        try:
            await self._solo_lock.acquire()
            try:
                while self._shared:
                    self._drained = asyncio.get_running_loop().create_future()
                    await self._drained
            except BaseException:
                self._solo_lock.release()
                raise
        except BaseException:
            self._leave_solo_waiting()
            raise

    def leave_solo(self) -> None:
        self._solo_lock.release()
        self._leave_solo_waiting()

    def _leave_solo_waiting(self) -> None:
        self._solo_waiting -= 1
        if not self._solo_waiting:
            self._open.set()
