"""What the capsule layer needs of a KV store: the local SQLite store or the lattice's.

A tool call reads through its `CallKV`, which records a version stamp for each read (a
`token` naming what was read: a key, a stripe of keys, a key listing; and its version),
then hands reads and writes to `stage_call`, which answers CONFLICT (something read has
changed: nothing staged, run the call again), None (nothing to wait for), or a ticket to
`commit`. The local store (orchestrator.capsule.store) validates at staging, under its
lock, and its commits only fail for I/O; a store whose validation happens at commit (the
lattice's JetStream KV checks revisions as part of an atomic batch) raises
`CommitConflict` from `commit`: nothing was written, and the call runs again.

`on_commit` callbacks (the call's outbox of events) run once its writes are durable, and
never when they fail. Used by orchestrator.capsule.capsule and .kv, and implemented by
orchestrator.capsule.store and orchestrator.lattice.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, Protocol


class CommitConflict(Exception):
    """The commit found that something the call read changed since it read it: nothing of
    the call was written. The capsule layer runs the call again."""


class KVBackend(Protocol):
    """The KV store a capsule's calls use (see the module docstring)."""

    # -- from a worker thread, inside a call ----------------------------------------------
    def read_from_thread(self, capsule: str, key: str) -> tuple[Hashable, int, bytes | None, bool]:
        """(token, version, value or None, dirty: the value is staged, not committed)."""
        ...

    def list_from_thread(self, capsule: str, prefix: str = "") -> tuple[Hashable, int, list[str], bool]:
        """(token, version, keys starting with `prefix`, dirty)."""
        ...

    def stage_call(
        self,
        capsule: str,
        *,
        reads: Mapping[Any, int],
        writes: Mapping[str, bytes | None],
        dirty: bool = False,
        on_commit: Callable[[], None] | None = None,
    ) -> Any:
        """CONFLICT, None, or a ticket for `commit` (see orchestrator.capsule.store)."""
        ...

    def get_from_thread(self, capsule: str, key: str) -> bytes | None: ...
    def list_keys_from_thread(self, capsule: str, prefix: str = "") -> list[str]: ...
    def stage_set(self, capsule: str, key: str, value: bytes) -> Any: ...
    def stage_delete(self, capsule: str, key: str) -> Any: ...

    # -- on the event loop ----------------------------------------------------------------
    async def commit(self, ticket: Any = None) -> None:
        """Until the ticket's writes are durable; CommitConflict or StoreError if not."""
        ...

    async def get(self, capsule: str, key: str) -> bytes | None: ...
    async def set(self, capsule: str, key: str, value: bytes) -> None: ...
    async def delete(self, capsule: str, key: str) -> bool: ...
    async def list_keys(self, capsule: str, prefix: str = "") -> list[str]: ...
    async def capsules(self) -> list[str]: ...
    async def close(self) -> None: ...
