"""`orch describe NAME`: one capsule's summary (`GET /v1/capsules/{name}`) as readable text,
in the manner of `kubectl describe`: labelled fields, then sections.

Pure formatting: a dict in, text out (secrets arrive masked as `***` from the server and
are shown as they arrive). Whatever the server sends is shown defensively: a field of an
unexpected type prints as `-` or as its text, never as a traceback; input schemas are
summarised in one line (`{name: string, by?: integer}`), bounded in depth and length.
Used by orchestrator.cli.remote.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from .output import Style, clip

LABEL = 15  # the width of the labels column
SCHEMA_DEPTH = 3
SCHEMA_CHARS = 200
HISTORY = 10  # the most recent reload-history entries shown


def describe(name: str, summary: Mapping[str, Any], *, style: Style, now_ms: int | None = None) -> str:
    now = int(time.time() * 1000) if now_ms is None else now_ms
    lines: list[str] = []

    def field(label: str, value: str) -> None:
        lines.append(f"{style(f'{label}:'.ljust(LABEL), 'bold')}{value}")

    def section(title: str) -> None:
        lines.append(style(f"{title}:", "bold"))

    status = _mapping(summary.get("status"))
    package = _mapping(summary.get("package"))
    field("Name", name)
    title = f"{package.get('name', '-')} {package.get('version', '')}".strip()
    description = package.get("description")
    field("Package", f"{title}: {description}" if description else title)
    field("Folder", str(summary.get("folder", "-")))
    phase = str(status.get("phase", "-")) if status else "not running"
    since = status.get("since_ms")
    field("Phase", style.phase(phase) + (f" since {_when(since, now)}" if isinstance(since, int) else ""))
    field("Version", f"{status.get('version') or '-'}  (wasm sha256:{summary.get('wasm_sha256', '-')})")
    field("Enabled", "yes" if summary.get("enabled", True) else "no (stopped, state kept)")
    field("Instances", str(summary.get("instances", "-")))
    field("Depends on", ", ".join(map(str, _list(summary.get("depends_on")))) or "-")
    if status:
        fuel = status.get("fuel_mean", 0)
        fuel_text = f"{fuel:,}" if isinstance(fuel, int) else str(fuel)
        field("Calls", f"{status.get('calls', 0)}   errors {status.get('errors', 0)}   fuel/call {fuel_text}")
        field("Reloads", str(status.get("reload_count", 0)))
        error = status.get("last_error")
        field("Last error", style(" ".join(str(error).split()), "red") if error else "-")
        retry = status.get("next_retry_ms")
        if isinstance(retry, int):
            field("Next retry", _when(retry, now))
        pinned = _mapping(status.get("pinned"))
        if pinned:
            since = pinned.get("since_ms")
            field(
                "Pinned",
                f"version {pinned.get('version', '-')} by a rollback"
                + (f" since {_when(since, now)}" if isinstance(since, int) else "")
                + f" (`orch unpin {name}` runs the desired spec)",
            )
        awaiting = _mapping(status.get("awaiting"))
        if awaiting:
            grants = ", ".join(map(str, _list(awaiting.get("escalations")))) or "more"
            field(
                "Awaiting",
                style(f"approval of {str(awaiting.get('spec_hash', '-'))[:12]}, which would grant {grants}", "yellow")
                + f" (`orch approve {name}` or `orch reject {name}`)",
            )

    section("Tools")
    tools = [_mapping(t) for t in _list(summary.get("tools"))]
    width = max((len(str(t.get("name", "?"))) for t in tools), default=0)
    for tool in tools:
        tool_name = str(tool.get("name", "?"))
        lines.append(f"  {style(tool_name.ljust(width), 'cyan')}  {tool.get('description', '')}".rstrip())
        schema = tool.get("input_schema")
        lines.append(f"      input: {clip(summarize_schema(schema), SCHEMA_CHARS)}")
        for prop, text in _described_properties(schema):
            lines.append(f"        {prop}: {clip(' '.join(text.split()), SCHEMA_CHARS)}")
    if not tools:
        lines.append("  (none)")

    section("Interceptors")
    interceptors = [_mapping(i) for i in _list(summary.get("interceptors"))]
    for interceptor in interceptors:
        event, action = interceptor.get("event", "?"), interceptor.get("action", "?")
        lines.append(f"  {event} -> {action} (priority {interceptor.get('priority', '-')})")
    if not interceptors:
        lines.append("  (none)")

    section("Capabilities")
    capabilities = _mapping(summary.get("capabilities"))
    width = max((len(str(key)) for key in capabilities), default=0) + 2
    for key, value in capabilities.items():
        if isinstance(value, bool):
            shown = "yes" if value else "no"
        elif isinstance(value, list):
            shown = ", ".join(map(str, value)) or "-"
        else:
            shown = str(value)
        lines.append(f"  {f'{key}:'.ljust(width)}{shown}")
    if not capabilities:
        lines.append("  (none: it may touch nothing)")

    limits = _mapping(summary.get("limits"))
    field("Limits", _limits(limits))

    section("Config")
    config = _mapping(summary.get("config"))
    env = _mapping(summary.get("env"))
    for key in sorted(set(config) | set(env)):
        declared = _mapping(env.get(key))
        kind = f"  ({declared['type']})" if "type" in declared else ""
        value = config.get(key)
        lines.append(f"  {key} = {clip(str(value), SCHEMA_CHARS) if value is not None else '(unset)'}{kind}")
    if not config and not env:
        lines.append("  (none)")

    section("History")
    history = [_mapping(h) for h in _list(summary.get("history"))][-HISTORY:]
    for entry in history:
        at = entry.get("at_ms")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at / 1000)) if isinstance(at, int) else "-"
        event = str(entry.get("event", "?"))
        lines.append(f"  {stamp}  {style.phase(event.capitalize(), event.ljust(9))} {entry.get('version') or '-'}")
    if not history:
        lines.append("  (none)")
    return "\n".join(lines)


def summarize_schema(schema: Any, depth: int = 0) -> str:
    """A JSON schema in one line: `{name: string, by?: integer}`, `[string]`, `"a" | "b"`."""
    if not isinstance(schema, Mapping):
        return "any" if schema in (None, True, {}) else "nothing" if schema is False else "?"
    if depth >= SCHEMA_DEPTH:
        return "…"
    if "enum" in schema and isinstance(schema["enum"], list):
        return " | ".join(_literal(v) for v in schema["enum"][:8]) + (" | …" if len(schema["enum"]) > 8 else "")
    if "const" in schema:
        return _literal(schema["const"])
    for combinator in ("anyOf", "oneOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            return " | ".join(summarize_schema(o, depth + 1) for o in options[:8])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(summarize_schema({**schema, "type": k}, depth) for k in kind[:8] if isinstance(k, str))
    properties = schema.get("properties")
    if kind == "object" or isinstance(properties, Mapping):
        if not isinstance(properties, Mapping) or not properties:
            return "{}" if schema.get("additionalProperties") is False or kind == "object" else "object"
        required = schema.get("required")
        needed = set(required) if isinstance(required, list) else set()
        parts = [
            f"{key}{'' if key in needed else '?'}: {summarize_schema(value, depth + 1)}"
            for key, value in list(properties.items())[:20]
        ]
        return "{" + ", ".join(parts) + (", …" if len(properties) > 20 else "") + "}"
    if kind == "array":
        return f"[{summarize_schema(schema.get('items'), depth + 1)}]"
    return str(kind) if isinstance(kind, str) else "any"


def _described_properties(schema: Any) -> list[tuple[str, str]]:
    if not isinstance(schema, Mapping) or not isinstance(schema.get("properties"), Mapping):
        return []
    return [
        (str(key), value["description"])
        for key, value in list(schema["properties"].items())[:20]
        if isinstance(value, Mapping) and isinstance(value.get("description"), str)
    ]


def _literal(value: Any) -> str:
    return clip(json.dumps(value, ensure_ascii=False), 40)


def _limits(limits: Mapping[str, Any]) -> str:
    parts = []
    if isinstance(limits.get("fuel"), int):
        parts.append(f"fuel {limits['fuel']:,}")
    if "memory_mib" in limits:
        parts.append(f"memory {limits['memory_mib']} MiB")
    if "timeout_ms" in limits:
        parts.append(f"timeout {limits['timeout_ms']} ms")
    return " · ".join(parts) or "-"


def _when(ms: int, now_ms: int) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
    seconds = (now_ms - ms) / 1000
    if seconds >= 0:
        return f"{stamp} ({_span(seconds)} ago)"
    return f"{stamp} (in {_span(-seconds)})"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
