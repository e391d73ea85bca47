"""Why a capsule reloads: field-level reasons from one spec to the next, safe to show.

`reload_reasons(old, new)` names each difference in a short, stable form: `wasm 3fa1c2→9b07de`,
`config.greeting "Hi"→"Hello"` (secrets as `***`), `capabilities +fs_write cwd://out` (each
added grant is also an *escalation*), `limits.fuel 1e9→5e7`, `tools +greet`, ... Values are
shortened and anything unprintable is escaped, so a reason is always one readable line.

Reasons of a reload, in this order (each group sorted by key):
  wasm, config.*, capabilities, limits.*, instances, manifest.* (other manifest fields),
  env, tools, interceptors, depends_on.

Pure. Used by orchestrator.desired.plan, and by the escalation gate (orchestrator.control.approvals:
`capability_grants`, what a start grants).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

from .spec import CapsuleSpec

MAX_VALUE: Final = 40  # characters of one rendered value in a reason, "…" included
MAX_LABEL: Final = 80  # characters of one name in a reason (a key, a tool, a grant)
_UNSET: Final = object()  # a key that one side does not have
_SPECIFIC: Final = frozenset({"capabilities", "env", "tool", "interceptor"})  # diffed by their own rules


def reload_reasons(old: CapsuleSpec, new: CapsuleSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
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
    reasons += depends_reasons(old, new)
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


def capability_grants(spec: CapsuleSpec) -> tuple[str, ...]:
    """Everything `spec` grants, labelled as escalations are (`kv`, `fs_write cwd://out`),
    sorted: what a start grants a capsule that runs nothing yet."""
    return tuple(sorted(_grants(_plain(spec.manifest).get("capabilities", _UNSET))))


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


def depends_reasons(old: CapsuleSpec, new: CapsuleSpec) -> list[str]:
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
