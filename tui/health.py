"""The desired state's health as the dashboard shows it: whether the orchestrator accepted the
latest config.yaml, which capsules have a broken manifest, which builds failed.

It reads `orchestrator.desired` of `GET /v1/status`:

    {"state": "accepted" | "rejected", "accepted_at_ms": int | null,
     "rejected": null | {"at_ms": int, "count": int, "problems": [str, ...]},
     "broken": {capsule: {"at_ms": int, "problems": [str, ...]}},
     "builds_failed": {capsule: {"at_ms": int, "exit_code": int, "output": str}}}

An orchestrator following a git branch also sends `orchestrator.git` (`{source,
applied_revision, fetched_revision, rejected: null | {revision, problems, count, at_ms},
error, ...}`): the revision applied and the one fetched, a rejected revision (its problems
are the config's rejection, said as that revision's) and a fetch that fails.

An older orchestrator sends no such section, and any part of it may be missing or
malformed: then nothing is said rather than something wrong. Pure functions over plain data
(Rich text only), used by the top bar (one line: `header`) and the problems dialog
(`report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .format import Clock

MAX_OUTPUT_LINES = 60  # the tail of a failed build's output shown in the dialog
MAX_PROBLEMS = 200  # problems listed per file (the count says how many there were)


@dataclass(frozen=True)
class Rejected:
    at_ms: int | None
    count: int
    problems: tuple[str, ...]
    revision: str | None = None  # the git commit rejected, when following a branch


@dataclass(frozen=True)
class Broken:
    capsule: str
    at_ms: int | None
    problems: tuple[str, ...]


@dataclass(frozen=True)
class BuildFailed:
    capsule: str
    at_ms: int | None
    exit_code: int | None
    output: str


@dataclass(frozen=True)
class GitFollow:
    """What `orchestrator.git` says: the branch followed and its revisions."""

    source: str
    applied: str | None
    fetched: str | None
    error: str | None
    error_at_ms: int | None


@dataclass(frozen=True)
class Health:
    """What `orchestrator.desired` says, checked: the parts that were well-formed."""

    accepted_at_ms: int | None
    rejected: Rejected | None
    broken: tuple[Broken, ...]
    builds_failed: tuple[BuildFailed, ...]
    git: GitFollow | None = None

    @property
    def troubled(self) -> bool:
        return bool(self.rejected or self.broken or self.builds_failed or (self.git and self.git.error))


def read_git(status: Any) -> GitFollow | None:
    """The followed branch from a status reply; None when the orchestrator follows none."""
    info = status.get("orchestrator") if isinstance(status, Mapping) else None
    git = info.get("git") if isinstance(info, Mapping) else None
    if not isinstance(git, Mapping) or not isinstance(git.get("source"), str):
        return None
    return GitFollow(
        str(git["source"]),
        _text(git.get("applied_revision")),
        _text(git.get("fetched_revision")),
        _text(git.get("error")),
        _int(git.get("error_at_ms")),
    )


def read_health(status: Any) -> Health | None:
    """The desired state's health from a status reply; None when the server does not say."""
    if not isinstance(status, Mapping):
        return None
    info = status.get("orchestrator")
    desired = info.get("desired") if isinstance(info, Mapping) else None
    if not isinstance(desired, Mapping):
        return None
    rejected = None
    raw = desired.get("rejected")
    state = desired.get("state")
    if state == "rejected" or (state is None and isinstance(raw, Mapping)):  # "accepted" wins over a stale report
        raw = raw if isinstance(raw, Mapping) else {}
        problems = _strings(raw.get("problems"))
        count = _int(raw.get("count"))
        revision = _text(raw.get("revision"))
        rejected = Rejected(_int(raw.get("at_ms")), count if count is not None else len(problems), problems, revision)
    broken = tuple(
        Broken(name, _int(entry.get("at_ms")), _strings(entry.get("problems")))
        for name, entry in _entries(desired.get("broken"))
    )
    builds = tuple(
        BuildFailed(name, _int(entry.get("at_ms")), _int(entry.get("exit_code")), str(entry.get("output") or ""))
        for name, entry in _entries(desired.get("builds_failed"))
    )
    return Health(_int(desired.get("accepted_at_ms")), rejected, broken, builds, read_git(status))


def header(health: Health | None, clock: Clock) -> Text:
    """One line for the top bar: `✖ config rejected: 3 problems (config.yaml:12: …)` and
    `✖ build failed: notes` in red, or `config accepted 12:04:31` quietly ("" when unknown)."""
    if health is None:
        return Text()
    parts: list[Text] = []
    if health.git is not None and health.git.error:
        parts.append(Text("✖ fetch failed"))
    if health.rejected is not None:
        count = health.rejected.count
        what = f"revision {health.rejected.revision[:12]}" if health.rejected.revision else "config"
        part = Text(f"✖ {what} rejected: {count} problem{'s' if count != 1 else ''}")
        if health.rejected.problems:
            part.append(f" ({short_problem(health.rejected.problems[0])})")
        parts.append(part)
    if health.builds_failed:
        parts.append(Text("✖ build failed: " + ", ".join(b.capsule for b in health.builds_failed)))
    if health.broken:
        parts.append(Text("✖ manifest invalid: " + ", ".join(b.capsule for b in health.broken)))
    if parts:
        return Text(" · ").join(parts)
    if health.accepted_at_ms:
        return Text(f"config accepted {clock.hms(health.accepted_at_ms)[:8]}", style="dim")
    return Text("config accepted", style="dim")


def short_problem(problem: str) -> str:
    """`/srv/deploy/config.yaml:12: capsules.x: …` -> `config.yaml:12: capsules.x: …` (the
    file's name, not its folder, so the line fits the top bar)."""
    first, sep, rest = problem.partition(": ")
    if sep and "/" in first and " " not in first:
        return first.rsplit("/", 1)[1] + sep + rest
    return problem


def report(health: Health | None, clock: Clock) -> RenderableType:
    """Everything the dialog shows: every problem of a rejected config (and which config
    keeps running meanwhile), each broken manifest's problems, each failed build's exit code
    and the end of its output."""
    if health is None:
        return Text("This orchestrator does not report the health of its desired state (an older version).", "dim")
    blocks: list[RenderableType] = []
    accepted = f"the config accepted at {_when(health.accepted_at_ms, clock)}" if health.accepted_at_ms else None
    git = health.git
    if git is not None and git.error:
        blocks.append(Text(f"fetching {git.source} fails since {_when(git.error_at_ms, clock)}", style="bold red"))
        blocks.append(_problem_lines((git.error,), 1))
        blocks.append(Text("The revision applied keeps serving; fetching is tried again.\n", style="dim"))
    if health.rejected is not None:
        rejected = health.rejected
        when = _when(rejected.at_ms, clock)
        what = f"revision {rejected.revision} of {git.source if git else 'the branch'}" if rejected.revision else ""
        blocks.append(
            Text(f"{what or 'config.yaml'} rejected at {when}: {rejected.count} problem(s)", style="bold red")
        )
        blocks.append(_problem_lines(rejected.problems, rejected.count))
        if rejected.revision:
            running = f"revision {git.applied[:12]}" if git and git.applied else "the revision applied last"
            fix = f"Nothing of it was applied: {running} keeps running. Push a fixed commit (r fetches now)."
            blocks.append(Text(fix + "\n", style="dim"))
        else:
            keeps = f"Nothing changed: {accepted} keeps running." if accepted else "Nothing changed."
            blocks.append(Text(keeps + " Fix the file and save it: it is read again at once.\n", style="dim"))
    elif accepted:
        blocks.append(Text(f"config.yaml: {accepted} is running.\n", style="green"))
    for item in health.broken:
        blocks.append(Text(f"{item.capsule}: manifest invalid since {_when(item.at_ms, clock)}", style="bold red"))
        blocks.append(_problem_lines(item.problems, len(item.problems)))
        blocks.append(Text("Its running version (if any) keeps serving.\n", style="dim"))
    for build in health.builds_failed:
        code = f" (exit code {build.exit_code})" if build.exit_code is not None else ""
        blocks.append(Text(f"{build.capsule}: build failed at {_when(build.at_ms, clock)}{code}", style="bold red"))
        lines = build.output.splitlines()
        if len(lines) > MAX_OUTPUT_LINES:
            blocks.append(Text(f"… {len(lines) - MAX_OUTPUT_LINES} earlier line(s)", style="dim"))
            lines = lines[-MAX_OUTPUT_LINES:]
        blocks.append(Text("\n".join(lines) or "(no output)", style="dim" if not lines else ""))
        blocks.append(Text("Its running version (if any) keeps serving.\n", style="dim"))
    if not health.troubled:
        blocks.append(Text("No broken manifests, no failed builds.", style="green"))
    return Group(*blocks)


def _problem_lines(problems: tuple[str, ...], count: int) -> RenderableType:
    """One problem a row, wrapped lines indented under their own text."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for problem in problems[:MAX_PROBLEMS]:
        grid.add_row(Text("  ✖", style="red"), Text(problem))
    more = max(count, len(problems)) - min(len(problems), MAX_PROBLEMS)
    if more > 0:
        grid.add_row(Text(""), Text(f"… {more} more", style="dim"))
    return grid


def _when(ms: int | None, clock: Clock) -> str:
    if not ms:
        return "an unknown time"
    ago = clock.ago(ms)
    return f"{clock.hms(ms)[:8]} ({ago})" if ago else clock.hms(ms)[:8]


def _entries(value: Any) -> list[tuple[str, Mapping[str, Any]]]:
    if not isinstance(value, Mapping):
        return []
    return sorted((str(name), entry) for name, entry in value.items() if isinstance(entry, Mapping))


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        return ()
    return tuple(str(item) for item in value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
