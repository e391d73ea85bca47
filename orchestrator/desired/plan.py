"""The plan: a pure diff from desired state to actual state (README, "Architecture", step 2).

`plan(desired, actual)` compares every deployment of the config (enabled or not) with the
specs that run now and returns an ordered `Plan` of actions: `start`, `reload`, `stop` or
`keep`, each with short field-level reasons that are safe to show (secrets print as `***`).
A reload also lists the capabilities it adds (`escalations`), so a caller can hold back or
flag a change that widens what a capsule may touch. `Plan.waves()` groups the changes for
execution: stops first (dependents before their dependencies, by the running specs'
`depends_on`), then starts and reloads (dependencies first, by the desired specs'
`depends_on`); the capsules of one wave never depend on each other.

The reasons themselves are orchestrator.desired.reasons. A deployment pinned by a rollback
(orchestrator.desired.pins) is planned towards its pinned spec and marked `overridden`.

No I/O, no clock, no asyncio, no logging: only values. Used by the reconciler (which
executes plans) and the CLI (`orch plan`).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .pins import Pin, overlay, override_reason
from .reasons import depends_reasons, reload_reasons
from .spec import CapsuleSpec

ActionKind = Literal["start", "reload", "stop", "keep"]


@dataclass(frozen=True)
class Action:
    """What to do with one capsule, and why."""

    capsule: str
    action: ActionKind
    reasons: tuple[str, ...] = ()
    escalations: tuple[str, ...] = ()  # capabilities a reload adds, e.g. "fs_write cwd://out"
    depends_on: tuple[str, ...] = ()  # ordering only (the running spec's for a stop); not in to_dict
    overridden: str = ""  # the pinned version, when a rollback overrides the desired spec

    def to_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "capsule": self.capsule,
            "action": self.action,
            "reasons": list(self.reasons),
            "escalations": list(self.escalations),
        }
        if self.overridden:
            shown["overridden"] = {"version": self.overridden}
        return shown


@dataclass(frozen=True)
class Plan:
    """Every deployment's action, in execution order."""

    actions: tuple[Action, ...]

    @property
    def changes(self) -> tuple[Action, ...]:
        """The actions that do something (all but `keep`)."""
        return tuple(a for a in self.actions if a.action != "keep")

    @property
    def has_changes(self) -> bool:
        return any(a.action != "keep" for a in self.actions)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of `orch plan --json` (contract)."""
        return {"actions": [a.to_dict() for a in self.actions]}

    def waves(self) -> list[list[Action]]:
        """The changes in groups that may run concurrently, earlier groups first."""
        stops = [a for a in self.actions if a.action == "stop"]
        others = [a for a in self.actions if a.action != "stop"]
        return _layers(stops, dependents_first=True) + _layers(others, dependents_first=False)


def plan(
    desired: Mapping[str, CapsuleSpec], actual: Mapping[str, CapsuleSpec], *, pins: Mapping[str, Pin] | None = None
) -> Plan:
    """The actions that turn `actual` (what runs) into `desired` (every deployment).

    `pins`: deployments held at a pinned spec by a rollback (the caller says which pins
    still hold: orchestrator.desired.pins.in_force). They are planned towards the pinned
    spec, and their action is marked `overridden`, naming the pinned version."""
    if pins:
        wanted, desired = desired, overlay(desired, pins)
    stops: list[Action] = []
    others: list[Action] = []
    for name in sorted(set(desired) | set(actual)):
        want, have = desired.get(name), actual.get(name)
        if want is None or not want.enabled:
            if have is not None:
                why = "removed from the config" if want is None else "disabled"
                stops.append(Action(name, "stop", (why,), depends_on=have.depends_on))
        elif have is None:
            others.append(Action(name, "start", ("new",), depends_on=want.depends_on))
        elif have.spec_hash == want.spec_hash:
            others.append(Action(name, "keep", tuple(depends_reasons(have, want)), depends_on=want.depends_on))
        else:
            reasons, escalations = reload_reasons(have, want)
            others.append(Action(name, "reload", reasons, escalations, depends_on=want.depends_on))
    if pins:
        others = [_overridden(a, pins[a.capsule], wanted.get(a.capsule)) if a.capsule in pins else a for a in others]
    return Plan(tuple(_ordered(stops, dependents_first=True) + _ordered(others, dependents_first=False)))


def _overridden(action: Action, pin: Pin, wanted: CapsuleSpec | None) -> Action:
    reason = override_reason(action.capsule, pin, wanted)
    return dataclasses.replace(action, reasons=(reason, *action.reasons), overridden=pin.version)


def apply_plan(
    actual: Mapping[str, CapsuleSpec], plan: Plan, desired: Mapping[str, CapsuleSpec]
) -> dict[str, CapsuleSpec]:
    """What runs once `plan` has been carried out: the pure model of applying it.

    start and reload take the desired spec; stop removes the capsule; keep leaves what runs
    alone, but records the desired spec when it has the same hash (so `depends_on` and the
    folder of the record follow the config, and the next plan has nothing to say).
    """
    result = dict(actual)
    for action in plan.actions:
        name = action.capsule
        if action.action in ("start", "reload"):
            if name not in desired:
                raise ValueError(f"the plan {action.action}s {name!r}, which is not in the desired state")
            result[name] = desired[name]
        elif action.action == "stop":
            result.pop(name, None)
        elif name in result and name in desired and desired[name].spec_hash == result[name].spec_hash:
            result[name] = desired[name]
    return result


# -- ordering ----------------------------------------------------------------------------
def _ordered(actions: list[Action], *, dependents_first: bool) -> list[Action]:
    by_name = {a.capsule: a for a in actions}
    return [by_name[n] for n in _topological(_blockers(actions, direct=True, dependents_first=dependents_first))]


def _blockers(actions: Iterable[Action], *, direct: bool, dependents_first: bool) -> dict[str, set[str]]:
    """For each capsule, the capsules among `actions` that must come before it: its
    dependencies (or, for `dependents_first`, its dependents); `direct=False` follows
    depends_on transitively through the other actions."""
    deps = {a.capsule: {d for d in a.depends_on if d != a.capsule} for a in actions}
    deps = {n: {d for d in ds if d in deps} for n, ds in deps.items()}
    if not direct:
        deps = {n: _reachable(n, deps) for n in deps}
    if not dependents_first:
        return deps
    blockers: dict[str, set[str]] = {n: set() for n in deps}
    for name, ds in deps.items():
        for dep in ds:
            blockers[dep].add(name)
    return blockers


def _reachable(start: str, deps: Mapping[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(deps[start])
    while todo:
        name = todo.pop()
        if name not in seen and name != start:
            seen.add(name)
            todo.extend(deps[name])
    return seen


def _topological(blockers: Mapping[str, set[str]]) -> list[str]:
    """Every name once, each after its blockers, ties by name. A cycle (which the config
    validator rejects) is broken at its smallest member, so this always terminates."""
    waiting = {n: set(b) for n, b in blockers.items()}
    followers: dict[str, list[str]] = {n: [] for n in waiting}
    for name, before in waiting.items():
        for blocker in before:
            followers[blocker].append(name)
    ready = sorted(n for n, before in waiting.items() if not before)
    done: list[str] = []
    placed: set[str] = set()
    while len(done) < len(waiting):
        name = heapq.heappop(ready) if ready else _cycle_member(waiting, placed)
        if name in placed:
            continue
        placed.add(name)
        done.append(name)
        for follower in followers[name]:
            waiting[follower].discard(name)
            if not waiting[follower] and follower not in placed:
                heapq.heappush(ready, follower)
    return done


def _cycle_member(waiting: Mapping[str, set[str]], placed: set[str]) -> str:
    """The smallest member of a cycle among the names left, none of which is ready: follow
    blockers from the smallest name until one repeats."""
    path = [min(n for n in waiting if n not in placed)]
    seen = {path[0]: 0}
    while True:
        name = min(waiting[path[-1]])
        if name in seen:
            return min(path[seen[name] :])
        seen[name] = len(path)
        path.append(name)


def _layers(actions: list[Action], *, dependents_first: bool) -> list[list[Action]]:
    """The changes among `actions` by level: each after every change it (transitively,
    through the other actions) waits for. Keeps take no wave but still link the chain."""
    changing = {a.capsule for a in actions if a.action != "keep"}
    blockers = _blockers(actions, direct=False, dependents_first=dependents_first)
    blockers = {n: b & changing for n, b in blockers.items() if n in changing}
    level: dict[str, int] = {}
    for name in _topological(blockers):
        level[name] = 1 + max((level[b] for b in blockers[name] if b in level), default=-1)
    waves: list[list[Action]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for action in actions:
        if action.capsule in level:
            waves[level[action.capsule]].append(action)
    return waves
