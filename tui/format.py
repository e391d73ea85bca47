"""How values look on screen: phases (a colour AND a symbol and a word, so they read without
colour), ages, fuel, byte values as text or hex. Pure functions over plain data, used by
every view of the dashboard; no Textual here, only Rich text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rich.text import Text

# phase -> (symbol, style); the word is the phase itself, lowercase
PHASES: dict[str, tuple[str, str]] = {
    "Running": ("●", "green"),
    "Degraded": ("◐", "yellow"),
    "Failed": ("✖", "bold red"),
    "Starting": ("◌", "cyan"),
    "Pending": ("○", "cyan"),
    "Stopping": ("◌", "magenta"),
    "Stopped": ("■", "dim"),
    "AwaitingApproval": ("◇", "bold yellow"),
    "Paused": ("‖", "magenta"),  # a lattice deployment whose data a rollback is restoring
}
UNKNOWN_PHASE = ("?", "dim")
WORDS = {"AwaitingApproval": "awaiting approval"}  # phases whose word is not just the lowercase name
SHORT_WORDS = {"AwaitingApproval": "awaiting"}  # in a table column
# the order phases are counted in and sorted by: the ones needing attention first
PHASE_ORDER = (
    "AwaitingApproval",
    "Failed",
    "Degraded",
    "Paused",
    "Pending",
    "Starting",
    "Stopping",
    "Running",
    "Stopped",
)
HEALTHY = frozenset({"Running", "Stopped"})


def phase_word(phase: str, *, short: bool = False) -> str:
    """`running`, `awaiting approval` (`awaiting` when `short`): the phase as a word."""
    return (short and SHORT_WORDS.get(phase)) or WORDS.get(phase, phase.lower())


def phase_text(phase: str, *, short: bool = False) -> Text:
    """`● running` in the phase's colour (`short`: a word that fits a table column)."""
    symbol, style = PHASES.get(phase, UNKNOWN_PHASE)
    return Text(f"{symbol} {phase_word(phase, short=short)}", style=style)


def phase_rank(phase: str) -> int:
    return PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER)


def is_healthy(phase: str) -> bool:
    """Running, or stopped on purpose (`enabled: false`): nothing to look at."""
    return phase in HEALTHY


def phase_counts(phases: list[str]) -> Text:
    """`● 2 running  ◐ 1 degraded`: the phases present, the ones needing attention first."""
    text = Text()
    for phase in sorted(set(phases), key=phase_rank):
        symbol, style = PHASES.get(phase, UNKNOWN_PHASE)
        if text:
            text.append("  ")
        text.append(f"{symbol} {phases.count(phase)} {phase_word(phase)}", style=style)
    return text or Text("no capsules", style="dim")


@dataclass(frozen=True)
class Clock:
    """The wall clock the views read (fixed in snapshot tests, so screenshots are stable)."""

    now: Callable[[], float] = time.time
    utc: bool = False

    def hms(self, ms: int) -> str:
        """`14:03:27.120` for a timestamp in milliseconds (local time unless utc)."""
        seconds = ms / 1000
        parts = time.gmtime(seconds) if self.utc else time.localtime(seconds)
        return time.strftime("%H:%M:%S", parts) + f".{int(ms) % 1000:03d}"

    def stamp(self, ms: int) -> str:
        """`2027-01-15 08:00:00.123 UTC`: the full time of a timestamp in milliseconds."""
        seconds = ms / 1000
        parts = time.gmtime(seconds) if self.utc else time.localtime(seconds)
        zone = "UTC" if self.utc else time.strftime("%Z", parts)
        return time.strftime("%Y-%m-%d %H:%M:%S", parts) + f".{int(ms) % 1000:03d} {zone}".rstrip()

    def ago(self, ms: int | None) -> str:
        """`12s ago` for a past timestamp in milliseconds, "" for none."""
        if not ms:
            return ""
        return f"{duration(self.now() - ms / 1000)} ago"

    def until(self, ms: int | None) -> str:
        """`in 4s` for a future timestamp in milliseconds ("now" once it has passed)."""
        if not ms:
            return ""
        left = ms / 1000 - self.now()
        return f"in {duration(left)}" if left >= 0.5 else "now"


def error_origin(capsule: Mapping[str, Any], clock: Clock) -> str:
    """`increment, 14:03:27, 5s ago`: which tool failed last and when ("" when the server
    does not say: older servers send neither field)."""
    parts = []
    tool = capsule.get("last_error_tool")
    if isinstance(tool, str) and tool:
        parts.append(tool)
    at_ms = capsule.get("last_error_at_ms")
    if isinstance(at_ms, int) and not isinstance(at_ms, bool) and at_ms > 0:
        parts.append(clock.hms(at_ms)[:8])
        parts.append(clock.ago(at_ms))
    return ", ".join(parts)


def counters(capsule: Mapping[str, Any]) -> str:
    """`2 conflicts · 15 events lost`: the counts that are not zero ("" when all are)."""
    parts = []
    for key, one, many in (("conflicts", "conflict", "conflicts"), ("events_lost", "event lost", "events lost")):
        value = capsule.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            parts.append(f"{value:,} {one if value == 1 else many}")
    return " · ".join(parts)


def duration(seconds: float) -> str:
    """`4s`, `3m`, `2h`, `5d`: coarse, as a status column wants."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h"
    return f"{seconds // 86400:.0f}d"


def compact(number: float) -> str:
    """`950`, `12.3k`, `4.56M`, `1.2G`: fuel and counts that fit a column."""
    value = float(number)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            scaled = value / limit
            return f"{scaled:.3g}{suffix}"
    return f"{value:.0f}"


def short_path(path: str, width: int) -> str:
    """The end of a long path, `…/deploy/config.yaml`, in at most `width` characters."""
    if len(path) <= width:
        return path
    return "…" + path[-(width - 1) :]


def is_text(value: bytes) -> bool:
    """UTF-8 without control characters (other than tab and newlines)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch >= " " or ch in "\t\r\n" for ch in text)


def hexdump(value: bytes, limit: int = 4096) -> str:
    """`00000000  de ad be ef …  |....|`, 16 bytes a line, at most `limit` bytes."""
    lines = []
    for offset in range(0, min(len(value), limit), 16):
        chunk = value[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        shown = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  |{shown}|")
    if len(value) > limit:
        lines.append(f"… {len(value) - limit} more bytes")
    return "\n".join(lines)


def preview(value: bytes, width: int = 60) -> str:
    """One line: the text (escaped newlines) or the first bytes in hex."""
    if is_text(value):
        text = value.decode("utf-8").replace("\n", "⏎").replace("\t", " ")
    else:
        text = "0x" + value[: width // 2].hex()
    return text if len(text) <= width else text[: width - 1] + "…"


# -- a lattice (`orch dash --lattice`): where capsules run ------------------------------------
HOSTS_WIDTH = 24  # the host column, at most


def lattice_of(status: Any) -> Mapping[str, Any] | None:
    """`orchestrator.lattice` of a status that comes from a lattice; None for one orchestrator."""
    info = status.get("orchestrator") if isinstance(status, Mapping) else None
    lattice = info.get("lattice") if isinstance(info, Mapping) else None
    return lattice if isinstance(lattice, Mapping) else None


def _names(value: Any) -> list[str]:
    return [str(item) for item in value] if isinstance(value, list | tuple) else []


def hosts_cell(capsule: Mapping[str, Any]) -> str:
    """`host-a,host-b`, `host-a (1/2)` when it wants more hosts than serve it, `-` for none."""
    hosts = _names(capsule.get("hosts"))
    wanted = capsule.get("wanted") if capsule.get("enabled") is not False else None
    text = ",".join(hosts) or "-"
    if isinstance(wanted, int) and not isinstance(wanted, bool) and len(hosts) < wanted:
        suffix = f" ({len(hosts)}/{wanted})"
        room = HOSTS_WIDTH - len(suffix)
        return (text if len(text) <= room else text[: room - 1] + "…") + suffix
    return text if len(text) <= HOSTS_WIDTH else text[: HOSTS_WIDTH - 1] + "…"


def hosts_detail(detail: Mapping[str, Any], clock: Clock) -> Text:
    """One line per host reporting the capsule (`host-a  ● running  1f1fc0008875`, its error
    under it), then what placement wants."""
    text = Text()
    for entry in detail.get("on") or []:
        if not isinstance(entry, Mapping):
            continue
        if text:
            text.append("\n")
        text.append(str(entry.get("host")), style="bold")
        text.append("  ")
        text.append_text(phase_text(str(entry.get("phase") or "?")))
        if entry.get("version"):
            text.append(f"  {str(entry['version'])[:12]}", style="dim")
        if entry.get("last_error"):
            text.append(f"\n  {entry['last_error']}", style="red")
    if not text:
        text.append("no host runs it", style="yellow")
    wanted = detail.get("wanted")
    placed = _names(detail.get("placed_on"))
    if detail.get("enabled") is False:
        text.append("\ndisabled: placed nowhere", style="dim")
    elif isinstance(wanted, int) and not isinstance(wanted, bool):
        text.append(f"\nwants {wanted} host{'s' if wanted != 1 else ''}", style="dim")
        text.append(f", placed on {', '.join(placed)}" if placed else ", placed nowhere yet", style="dim")
    return text


def lattice_text(lattice: Mapping[str, Any]) -> Text:
    """`lattice prod r12 · 2/3 hosts · ✖ 1 problem · scheduler host-a` for the top bar."""
    text = Text(f"lattice {lattice.get('name', '?')}", style="bold")
    revision = lattice.get("revision")
    text.append(f" r{revision}" if revision else " (nothing applied)", style="bold" if revision else "yellow")
    hosts = [h for h in lattice.get("hosts") or [] if isinstance(h, Mapping)]
    alive = sum(1 for h in hosts if h.get("alive") is True)
    text.append(f" · {alive}/{len(hosts)} host{'s' if len(hosts) != 1 else ''}", style="dim" if alive else "yellow")
    problems = lattice.get("problems") or []
    if problems:
        text.append(f" · ✖ {len(problems)} problem{'s' if len(problems) != 1 else ''}", style="bold red")
    if lattice.get("scheduler"):
        text.append(f" · scheduler {lattice['scheduler']}", style="dim")
    return text
