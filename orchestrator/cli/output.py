"""How the CLI reports: one-line failures on stderr, problem lists, exit codes, colour,
truncation markers, and output bytes with the final newline a terminal needs.

Colour (`--color auto|always|never`, default auto): `auto` colours a stream only when it
is a terminal, `NO_COLOR` is unset or empty (no-color.org) and TERM is not `dumb`; `always`
colours even a pipe; `never` never does. Each stream is decided alone: `orch status 2>log`
on a terminal colours the table but not the log.

Used by every verb of the `orch` command. Imports nothing but the standard library.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 141
"""The reader of standard output went away (`orch events | head -1`): as a program killed by
SIGPIPE shows in the shell (128 + 13), without a traceback."""
COLOR_MODES = ("auto", "always", "never")

RESET = "\x1b[0m"
CODES = {
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
    "dim": "2",
    "bold": "1",
}
PHASE_COLORS = {
    "Running": "green",
    "Degraded": "yellow",
    "AwaitingApproval": "yellow",
    "Paused": "yellow",
    "Failed": "red",
    "Pending": "cyan",
    "Starting": "cyan",
    "Stopping": "dim",
    "Stopped": "dim",
}


class Style(NamedTuple):  # not a dataclass: `dataclasses` imports `inspect`, 5 ms of start-up
    """Colours for one stream: `style("text", "red")`, or the text as it is when off."""

    enabled: bool = False

    def __call__(self, text: str, *colors: str) -> str:
        if not self.enabled or not text:
            return text
        return "".join(f"\x1b[{CODES[c]}m" for c in colors) + text + RESET

    def phase(self, phase: str, text: str | None = None) -> str:
        """`text` (default: the phase) in the phase's colour."""
        color = PHASE_COLORS.get(phase)
        shown = phase if text is None else text
        return self(shown, color) if color else shown


class Colors(NamedTuple):
    """The styles of standard output and standard error."""

    out: Style = Style()
    err: Style = Style()

    @classmethod
    def choose(cls, mode: str = "auto", *, environ: Mapping[str, str] | None = None) -> Colors:
        env = os.environ if environ is None else environ
        return cls(out=Style(_wanted(mode, sys.stdout, env)), err=Style(_wanted(mode, sys.stderr, env)))


PLAIN = Colors()


def _wanted(mode: str, stream: IO[str], env: Mapping[str, str]) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def fail(message: str, code: int, *, colors: Colors = PLAIN) -> int:
    print(colors.err(f"orch: {message}", "red"), file=sys.stderr)
    return code


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def print_problems(folder: Path, problems: list[str], *, colors: Colors = PLAIN) -> int:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    print(f"{folder}: {colors.err(count, 'red', 'bold')}", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_FAILED


def clip(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters with an explicit marker of what was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def cell(text: str, limit: int) -> str:
    """`text` on one line of at most `limit` characters (a table cell); `…` marks a cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_output(data: bytes, *, newline: bool = False) -> None:
    """Output bytes as they are, plus a final newline when they lack one and standard
    output is a terminal (so the prompt does not land on the output's line) or `newline`
    asks for it. To a pipe or file the bytes stay exact unless `newline` is given."""
    out = sys.stdout.buffer
    out.write(data)
    if data and not data.endswith(b"\n") and (newline or sys.stdout.isatty()):
        out.write(b"\n")
    sys.stdout.flush()


def git_lines(git: dict[str, Any]) -> list[str]:
    """What `orch status` says of a followed branch: fetched (when it is not what runs), the
    rejected revision with its problems, a failing fetch."""
    lines = []
    fetched, applied = git.get("fetched_revision"), git.get("applied_revision")
    if fetched and fetched != applied:
        lines.append(f"fetched {str(fetched)[:12]} (applied: {str(applied or 'none')[:12]})")
    rejected = git.get("rejected")
    if isinstance(rejected, dict):
        count = rejected.get("count", len(rejected.get("problems") or []))
        lines.append(
            f"rejected {str(rejected.get('revision'))[:12]}: {count} problem(s); the applied revision keeps running"
        )
        lines += [f"  {problem}" for problem in rejected.get("problems") or []]
    if git.get("error"):
        lines.append(f"fetch failed: {git['error']}")
    return lines


ACTION_COLORS = {"start": "green", "reload": "yellow", "stop": "red", "keep": "dim"}


def print_actions(actions: list[dict[str, Any]], *, colors: Colors = PLAIN) -> None:
    """A plan's actions, one line each (`+` start, `~` reload, `-` stop, `=` kept with a
    reason), each escalation under its capsule; `no changes` when nothing would change."""
    style = colors.out
    symbols = {"start": "+", "reload": "~", "stop": "-", "keep": "="}
    changes = [a for a in actions if a["action"] != "keep" or a["reasons"]]
    if not any(a["action"] != "keep" for a in actions):
        print("no changes")
    for action in changes:
        kind = action["action"]
        head = style(f"{symbols[kind]} {action['capsule']:<20} {kind:<7}", ACTION_COLORS[kind])
        print(f"{head} {'; '.join(action['reasons'])}".rstrip())
        for escalation in action.get("escalations", []):
            print(style(f"    ! escalation: {escalation}", "red", "bold"))
