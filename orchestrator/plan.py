"""The plan: a pure diff from desired state to actual state (DESIGN.md §2, step 2).

`plan(desired, actual)` compares every deployment of the config (enabled or not) with the
specs that run now and returns an ordered `Plan` of actions: `start`, `reload`, `stop` or
`keep`, each with short field-level reasons that are safe to show (secrets print as `***`).
A reload also lists the capabilities it adds (`escalations`), so a caller can hold back or
flag a change that widens what a capsule may touch. `Plan.waves()` groups the changes for
execution: stops first (dependents before their dependencies, by the running specs'
`depends_on`), then starts and reloads (dependencies first, by the desired specs'
`depends_on`); the capsules of one wave never depend on each other.

Reasons of a reload, in this order (each group sorted by key):
  wasm, config.*, capabilities, limits.*, instances, manifest.* (other manifest fields),
  env, tools, interceptors, depends_on.

No I/O, no clock, no asyncio, no logging: only values. Used by the reconciler (which
executes plans) and the CLI (`orch plan`).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from .spec import CapsuleSpec

ActionKind = Literal["start", "reload", "stop", "keep"]

MAX_VALUE: Final = 40  # characters of one rendered value in a reason, "…" included
MAX_LABEL: Final = 80  # characters of one name in a reason (a key, a tool, a grant)
_UNSET: Final = object()  # a key that one side does not have
_SPECIFIC: Final = frozenset({"capabilities", "env", "tool", "interceptor"})  # diffed by their own rules


@dataclass(frozen=True)
class Action:
    """What to do with one capsule, and why."""

    capsule: str
    action: ActionKind
    reasons: tuple[str, ...] = ()
    escalations: tuple[str, ...] = ()  # capabilities a reload adds, e.g. "fs_write cwd://out"
    depends_on: tuple[str, ...] = ()  # ordering only (the running spec's for a stop); not in to_dict

    def to_dict(self) -> dict[str, Any]:
        return {
            "capsule": self.capsule,
            "action": self.action,
            "reasons": list(self.reasons),
            "escalations": list(self.escalations),
        }


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


def plan(desired: Mapping[str, CapsuleSpec], actual: Mapping[str, CapsuleSpec]) -> Plan:
    """The actions that turn `actual` (what runs) into `desired` (every deployment)."""
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
            others.append(Action(name, "keep", tuple(_depends_reasons(have, want)), depends_on=want.depends_on))
        else:
            reasons, escalations = _reload_reasons(have, want)
            others.append(Action(name, "reload", reasons, escalations, depends_on=want.depends_on))
    return Plan(tuple(_ordered(stops, dependents_first=True) + _ordered(others, dependents_first=False)))


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


# -- reasons -----------------------------------------------------------------------------
def _reload_reasons(old: CapsuleSpec, new: CapsuleSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    reasons: list[str] = []
    if old.wasm_sha256 != new.wasm_sha256:
        reasons.append("wasm " + _short_hashes(old.wasm_sha256, new.wasm_sha256))
    reasons += _config_reasons(old, new)
    before, after = _plain(old.manifest), _plain(new.manifest)
    grants, escalations = _capability_reasons(before.get("capabilities", _UNSET), after.get("capabilities", _UNSET))
    reasons += grants
    reasons += _leaf_reasons("limits", dict(old.limits), dict(new.limits))
    if old.instances != new.instances:
        reasons.append(f"instances {_render(old.instances)}→{_render(new.instances)}")
    for key in sorted((set(before) | set(after)) - _SPECIFIC):
        reasons += _leaf_reasons(f"manifest.{_label(key)}", before.get(key, _UNSET), after.get(key, _UNSET))
    reasons += _env_reasons(before.get("env", _UNSET), after.get("env", _UNSET))
    reasons += _tool_reasons(before.get("tool", _UNSET), after.get("tool", _UNSET))
    reasons += _interceptor_reasons(before.get("interceptor", _UNSET), after.get("interceptor", _UNSET))
    reasons += _depends_reasons(old, new)
    return tuple(reasons or ["spec changed"]), escalations


def _short_hashes(old: str, new: str) -> str:
    """`3fa1c2→9b07de`: six characters of each, more if six do not tell them apart."""
    size = 6
    while old[:size] == new[:size] and size < max(len(old), len(new)):
        size += 1
    return f"{_safe(old[:size])}→{_safe(new[:size])}"


def _config_reasons(old: CapsuleSpec, new: CapsuleSpec) -> list[str]:
    before, after = old.config_view(), new.config_view()
    secrets = old.secret_keys | new.secret_keys
    reasons = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, _UNSET), after.get(key, _UNSET)
        if a == b:
            continue
        if key in secrets:  # the value and its digest never leave: only whether one is set
            reasons.append(f"config.{_label(key)} {_masked(a)}→{_masked(b)}")
        else:
            reasons.append(f"config.{_label(key)} {_render(a)}→{_render(b)}")
    return reasons


def _masked(value: Any) -> str:
    return "unset" if value is _UNSET else "***"


def _capability_reasons(old: Any, new: Any) -> tuple[list[str], tuple[str, ...]]:
    """`capabilities +fs_write cwd://out`, `capabilities -kv`; the additions are escalations."""
    before, after = _grants(old), _grants(new)
    changed = sorted((before ^ after), key=lambda g: (g, g in after))
    reasons = [f"capabilities {'+' if g in after else '-'}{_shorten(g, MAX_LABEL)}" for g in changed]
    escalations = tuple(g for g in changed if g in after)
    if not reasons and not _same(old, new):  # a list reordered, `[]` written out, …
        reasons = ["capabilities rewritten (same grants)"]
    return reasons, escalations


def _grants(capabilities: Any) -> set[str]:
    """One label per thing granted: `kv` for a true flag, `fs_write cwd://out` per list item
    (never shortened: these are the escalations)."""
    if not isinstance(capabilities, Mapping):
        return set()
    grants: set[str] = set()
    for name, value in capabilities.items():
        label = _safe(str(name))
        if value is True:
            grants.add(label)
        elif isinstance(value, list):
            grants.update(f"{label} {_safe(v) if isinstance(v, str) else _render(v)}" for v in value)
        elif value not in (None, False):
            grants.add(f"{label} {_render(value)}")
    return grants


def _env_reasons(old: Any, new: Any) -> list[str]:
    """`env +KEY`, `env -KEY`, `env ~KEY`: never a default (a secret's default is secret)."""
    before = {_label(str(k)): v for k, v in old.items()} if isinstance(old, Mapping) else {}
    after = {_label(str(k)): v for k, v in new.items()} if isinstance(new, Mapping) else {}
    return _members("env", before, after) or _unexplained("env", old, new)


def _tool_reasons(old: Any, new: Any) -> list[str]:
    """`tools +greet`, `tools -old`, `tools ~greet` (its description or schema changed)."""
    before, after = _keyed(old, lambda t: t.get("name")), _keyed(new, lambda t: t.get("name"))
    return _members("tools", before, after) or _unexplained("tools", old, new)


def _interceptor_reasons(old: Any, new: Any) -> list[str]:
    """`interceptors +orders.* → on_order`, `-…`, `~orders.* → on_order priority 100→50`."""

    def route(item: Mapping[str, Any]) -> str:
        return f"{_label(str(item.get('event')))} → {_label(str(item.get('action')))}"

    def priority(a: Any, b: Any) -> str:
        return f" priority {_priorities(a)}→{_priorities(b)}" if _priorities(a) != _priorities(b) else ""

    before, after = _keyed(old, route, many=True), _keyed(new, route, many=True)
    return _members("interceptors", before, after, priority) or _unexplained("interceptors", old, new)


def _members(
    section: str, before: Mapping[str, Any], after: Mapping[str, Any], detail: Callable[[Any, Any], str] | None = None
) -> list[str]:
    """`section +key`, `section -key`, `section ~key` for labelled members, sorted by label."""
    reasons = []
    for key in sorted(set(before) | set(after)):
        if key not in before:
            reasons.append(f"{section} +{key}")
        elif key not in after:
            reasons.append(f"{section} -{key}")
        elif not _same(before[key], after[key]):
            reasons.append(f"{section} ~{key}{detail(before[key], after[key]) if detail else ''}")
    return reasons


def _priorities(items: Any) -> str:
    return ",".join(_render(i.get("priority", _UNSET)) if isinstance(i, Mapping) else "?" for i in items)


def _keyed(items: Any, key: Callable[[Mapping[str, Any]], Any], *, many: bool = False) -> dict[str, Any]:
    """List items by a label (`many`: a list of the items sharing each label)."""
    keyed: dict[str, Any] = {}
    for item in items if isinstance(items, list) else []:
        label = key(item) if isinstance(item, Mapping) else None
        label = _label(label) if isinstance(label, str) else _render(item)
        if many:
            keyed.setdefault(label, []).append(item)
        else:
            keyed[label] = item
    return keyed


def _unexplained(label: str, old: Any, new: Any) -> list[str]:
    """A reason for a section that differs in nothing the rules above name."""
    if _same(old, new):
        return []
    if isinstance(old, list) and isinstance(new, list) and sorted(map(_canonical, old)) == sorted(map(_canonical, new)):
        return [f"{label} reordered"]
    return [f"{label} changed"]


def _depends_reasons(old: CapsuleSpec, new: CapsuleSpec) -> list[str]:
    """`depends_on []→[counter]`: ordering only, never a reason to reload by itself."""
    before, after = sorted(set(old.depends_on)), sorted(set(new.depends_on))
    if before == after:
        return []
    return [f"depends_on {_label('[' + ', '.join(before) + ']')}→{_label('[' + ', '.join(after) + ']')}"]


def _leaf_reasons(path: str, old: Any, new: Any) -> list[str]:
    """`path old→new` for every scalar that differs below `path` (mappings by key, lists of
    equal length by index); a whole value where the shapes differ."""
    if _same(old, new):
        return []
    reasons: list[str] = []
    if (isinstance(old, Mapping) or isinstance(new, Mapping)) and _table_like(old) and _table_like(new):
        a = old if isinstance(old, Mapping) else {}
        b = new if isinstance(new, Mapping) else {}
        for key in sorted(set(a) | set(b), key=str):
            reasons += _leaf_reasons(f"{path}.{_label(str(key))}", a.get(key, _UNSET), b.get(key, _UNSET))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            reasons += _leaf_reasons(f"{path}[{index}]", a, b)
    return reasons or [f"{path} {_render(old)}→{_render(new)}"]


def _table_like(value: Any) -> bool:
    """A mapping, or nothing in its place (a table added or removed is diffed key by key)."""
    return isinstance(value, Mapping) or value is None or value is _UNSET


# -- rendering ---------------------------------------------------------------------------
def _render(value: Any) -> str:
    """A value as a reason shows it: JSON-style, numbers short, at most MAX_VALUE characters."""
    if value is _UNSET:
        return "unset"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return _number(value)
    return _shorten(_safe(_canonical(value)), MAX_VALUE)


def _number(value: int) -> str:
    """`1e9` for a single digit times a power of ten from 10,000 up; else the plain integer."""
    digits = str(abs(value))
    if abs(value) >= 10_000 and digits[1:].strip("0") == "":
        return f"{'-' if value < 0 else ''}{digits[0]}e{len(digits) - 1}"
    return str(value)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _safe(text: str) -> str:
    """`text` with anything unprintable (controls, line separators, bidi marks) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _label(text: str) -> str:
    """A name in a reason (a key, a tool, a grant): printable, at most MAX_LABEL characters."""
    return _shorten(_safe(text), MAX_LABEL)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _same(a: Any, b: Any) -> bool:
    """Equal as the spec hash sees them (JSON): `true` is not `1`, a tuple is a list."""
    if a is _UNSET or b is _UNSET:
        return a is b
    return _canonical(a) == _canonical(b)


def _plain(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as the spec hash sees it: JSON types only (tuples become lists)."""
    plain = json.loads(_canonical(manifest))
    return plain if isinstance(plain, dict) else {}
