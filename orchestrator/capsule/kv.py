"""A capsule's view of the KV store from its worker threads: per call, and per capsule.

`CallKV` is one tool call's view: its writes wait in a buffer, readable by the call itself,
and reach the store only if the call succeeds (`stage`, then a commit); a failed call's
writes are dropped, so a client may retry a failed call without doubling its effect.
`CapsuleKV` is the capsule's slice of the store without a call (staged at once).

Used by orchestrator.capsule.capsule (which hands a CallKV to each call's airlocks).
"""

from __future__ import annotations

from .store import KVStore


class CallKV:
    """One call's view of its capsule's KV; see the module docstring."""

    def __init__(self, store: KVStore, capsule: str) -> None:
        self._store = store
        self._capsule = capsule
        self.writes: dict[str, bytes | None] = {}

    def get(self, key: str) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        return self._store.get_from_thread(self._capsule, key)

    def set(self, key: str, value: bytes) -> None:
        self.writes[key] = value

    def delete(self, key: str) -> None:
        self.writes[key] = None

    def keys(self, prefix: str) -> list[str]:
        keys = set(self._store.list_keys_from_thread(self._capsule, prefix))
        for key, value in self.writes.items():
            if key.startswith(prefix):
                if value is None:
                    keys.discard(key)
                else:
                    keys.add(key)
        return sorted(keys)

    def stage(self) -> int:
        """Hand the buffered writes to the store (visible to every reader from now on);
        returns the sequence number to commit, 0 when there were none."""
        seq = 0
        for key, value in self.writes.items():
            if value is None:
                seq = self._store.stage_delete(self._capsule, key)
            else:
                seq = self._store.stage_set(self._capsule, key, value)
        self.writes = {}
        return seq


class CapsuleKV:
    """One capsule's slice of the KVStore, for host functions on worker threads."""

    def __init__(self, store: KVStore, capsule: str) -> None:
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
