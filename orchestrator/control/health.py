"""The health of the desired state: what the operator needs to see when files are broken.

A rejected config.yaml, a capsule whose manifest or module is broken, a build that failed:
the running capsules keep serving their last good versions, so none of these shows in a
capsule's phase alone. `DesiredHealth` keeps them, with times, for `orch status`, the
dashboard's header and `GET /v1/status` (`orchestrator.desired`):

    {"state": "accepted" | "rejected", "accepted_at_ms": int | None,
     "rejected": None | {"at_ms", "count", "problems": [str], "revision"?: str},
     "broken": {capsule: {"at_ms", "problems": [str]}},
     "builds_failed": {capsule: {"at_ms", "exit_code", "output"}}}

Each update returns whether things just became healthy again, so the runtime can say so
(a log line and `orch.reconcile.accepted`). Pure bookkeeping over values; the clock is
passed in. Used by the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

MAX_PROBLEMS = 20  # kept per rejection or capsule; `count` says how many there were


class DesiredHealth:
    """Accepted or rejected config, broken capsules and failed builds, with their times."""

    def __init__(self, *, wall_ms: Callable[[], int]) -> None:
        self._wall_ms = wall_ms
        self.accepted_at_ms: int | None = None
        self.rejected: dict[str, Any] | None = None
        self.broken: dict[str, dict[str, Any]] = {}
        self.builds_failed: dict[str, dict[str, Any]] = {}

    @property
    def healthy(self) -> bool:
        return self.rejected is None and not self.broken and not self.builds_failed

    def accepted(self, broken: Mapping[str, Sequence[object]]) -> bool:
        """A config was accepted (`broken`: the capsules whose own files have problems).
        True when this ends a rejection or a capsule's breakage."""
        was_healthy = self.healthy
        now = self._wall_ms()
        self.accepted_at_ms, self.rejected = now, None
        self.broken = {
            name: self.broken[name] if _same(self.broken.get(name), problems) else _entry(now, problems)
            for name, problems in broken.items()
        }
        return not was_healthy and self.healthy

    def rejected_config(self, problems: Sequence[object], *, revision: str | None = None) -> None:
        """config.yaml could not be used: nothing of the change was applied (`revision`: the
        git commit rejected, when the config comes from git)."""
        self.rejected = {**_entry(self._wall_ms(), problems), "count": len(problems)}
        if revision is not None:
            self.rejected["revision"] = revision

    def build_finished(self, name: str, *, exit_code: int, output: str = "") -> bool:
        """A build of `name` ended. True when a success ends a failure and all is healthy."""
        if exit_code != 0:
            self.builds_failed[name] = {"at_ms": self._wall_ms(), "exit_code": exit_code, "output": output}
            return False
        was = self.builds_failed.pop(name, None)
        return was is not None and self.healthy

    def forget(self, names: set[str]) -> None:
        """Capsules no longer in the config."""
        for table in (self.broken, self.builds_failed):
            for name in set(table) - names:
                del table[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": "rejected" if self.rejected is not None else "accepted",
            "accepted_at_ms": self.accepted_at_ms,
            "rejected": self.rejected,
            "broken": self.broken,
            "builds_failed": self.builds_failed,
        }


def _entry(now: int, problems: Sequence[object]) -> dict[str, Any]:
    return {"at_ms": now, "problems": [str(p) for p in problems[:MAX_PROBLEMS]]}


def _same(entry: dict[str, Any] | None, problems: Sequence[object]) -> bool:
    return entry is not None and entry["problems"] == [str(p) for p in problems[:MAX_PROBLEMS]]
