"""The operator's CLI verbs: clients of a running orchestrator's control API (contract).

    orch status [--json]
    orch describe NAME [--json]
    orch call NAME TOOL [JSON | -] [--newline]
    orch events [--follow] [--topic PATTERN] [--history N] [--json] [--full]
    orch kv ls|get|set|del NAME [KEY] [VALUE] [--newline]
    orch reconcile [--lattice URL]
    orch restart NAME

Each finds the socket in a state dir: `--state-dir DIR`, else the one `--config CONFIG`
names (read leniently, so a config with a typo still leads to the orchestrator that runs),
else ./config.yaml's, else ./.orch (an orchestrator following git, `orch up git+...`); or
takes `--socket PATH`. Without a running orchestrator: one line, exit 3. A failed request: one
line with the server's message, exit 1. An unreadable config: exit 2.

They talk through `SyncClient` (the standard library, blocking), imported when a verb runs:
registering them imports nothing heavy, so `orch --help` and `orch status` start fast. Part
of the CLI layer: it prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .helptext import verb_help
from .lattice import add_lattice_options
from .output import (
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    PLAIN,
    Colors,
    cell,
    clip,
    fail,
    git_lines,
    one_line,
    print_actions,
    write_output,
)

if TYPE_CHECKING:
    from ..api.blocking import SyncClient

PAYLOAD_CHARS = 300  # an event's payload in a text line (`--full`: all of it)
ERROR_CELL = 60  # the LAST ERROR column of `status` (`describe` shows it whole)
BUILD_LINES = 10  # the end of a failed build's output shown by `status`
Verb = Callable[[argparse.Namespace, "SyncClient"], int]


def add_socket_options(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--state-dir` and `--socket`: how every verb that talks to a running
    orchestrator finds its control socket (see `socket_path`)."""
    parser.add_argument("--config", type=Path, help="find the socket from this config (default: ./config.yaml)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="the orchestrator's state dir (default: --config's, else ./.orch)",
    )
    parser.add_argument("--socket", type=Path, help="the control socket (instead of --config or --state-dir)")


def add_commands(verbs: Any) -> None:
    """Register the verbs on the `orch` sub-parser set."""

    def verb(name: str, help_text: str, run: Verb) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(name, help=help_text, **verb_help(name))
        add_socket_options(parser)
        parser.set_defaults(run=lambda args: _connect(args, run))
        return parser

    def capsule_name(parser: argparse.ArgumentParser) -> None:
        action = parser.add_argument("name", help="the capsule (deployment) name")
        action.complete = "capsule"  # type: ignore[attr-defined]  # completion scripts offer running capsules

    status = verb("status", "what runs, and how it is doing", _status)
    status.add_argument("--json", action="store_true", help="the whole status as JSON")
    add_lattice_options(status)

    describe = verb("describe", "everything about one capsule", _describe)
    capsule_name(describe)
    describe.add_argument("--json", action="store_true", help="GET /v1/capsules/NAME as it is")

    call = verb("call", "call a capsule's tool on the running orchestrator", _call)
    capsule_name(call)
    call.add_argument("tool", help="the tool's name")
    call.add_argument("arguments", nargs="?", default="", metavar="JSON", help="'-' reads stdin")
    call.add_argument("--newline", action="store_true", help="end the output with a newline even in a pipe")
    add_lattice_options(call)

    events = verb("events", "recent and live bus events", _events)
    events.add_argument("--follow", "-f", action="store_true", help="keep streaming live events")
    events.add_argument("--topic", default=">", help="NATS pattern, e.g. 'orch.capsule.>'")
    events.add_argument("--history", type=int, default=100, help="events from history first (default 100)")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument("--full", action="store_true", help=f"payloads whole (else cut at {PAYLOAD_CHARS} characters)")
    add_lattice_options(events)

    kv = verb("kv", "a capsule's key-value store", _kv)
    kv.add_argument("op", choices=("ls", "get", "set", "del"))
    capsule_name(kv)
    kv.add_argument("key", nargs="?", default="")
    kv.add_argument("value", nargs="?", help="for set ('-' reads stdin)")
    kv.add_argument("--newline", action="store_true", help="get: end the value with a newline even in a pipe")
    add_lattice_options(kv)

    reconcile = verb("reconcile", "re-read the files now and apply; prints the plan", _reconcile)
    add_lattice_options(reconcile)  # the lattice's followed branch: fetched now by the lease holder
    restart = verb("restart", "build a fresh version of a capsule and swap to it", _restart)
    capsule_name(restart)


def _connect(args: argparse.Namespace, run: Verb) -> int:
    from ..api.blocking import SyncClient
    from ..api.client import NotRunning, RemoteError
    from ..errors import OrchestratorError

    colors: Colors = getattr(args, "colors", PLAIN)
    if getattr(args, "lattice", None):
        return _on_lattice(args, run, colors)
    try:
        path = socket_of(args)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE, colors=colors)
    try:
        with SyncClient(path) as client:
            return run(args, client)
    except NotRunning as error:
        return fail(str(error), EXIT_NOT_RUNNING, colors=colors)
    except RemoteError as error:
        return fail(one_line(error), EXIT_FAILED, colors=colors)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if getattr(args, "verbose", 0):
            raise  # -v: the traceback, for a bug report
        detail = one_line(error) or type(error).__name__
        message = (
            f"unexpected answer from {path}: {type(error).__name__}: {detail} (is it an orchestrator of this version?)"
        )
        return fail(message, EXIT_FAILED, colors=colors)


def _on_lattice(args: argparse.Namespace, run: Verb, colors: Colors) -> int:
    """The verb against a lattice (`--lattice URL`): the same verb, another client."""
    from ..errors import OrchestratorError
    from .lattice import address_of, run_status

    if run is _status:
        return run_status(args)  # the lattice's own view: hosts, and where each capsule runs
    if run is _reconcile:
        run = _reconcile_lattice  # the lease holder fetches the followed branch: another answer
    try:
        address = address_of(args)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE, colors=colors)
    try:
        from ..lattice.client import LatticeClient

        with LatticeClient(address) as client:
            return run(args, client)  # type: ignore[arg-type]
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_FAILED, colors=colors)


def socket_of(args: argparse.Namespace) -> Path:
    """The control socket a verb's `--socket`, `--state-dir` or `--config` point at (the
    rule: control.statedir.find_state_dir). Raises ConfigError when a config cannot be read."""
    from ..control.statedir import SOCKET, find_state_dir

    if getattr(args, "socket", None) is not None:
        return Path(args.socket)
    return find_state_dir(config=getattr(args, "config", None), state_dir=getattr(args, "state_dir", None)) / SOCKET


def _status(args: argparse.Namespace, client: SyncClient) -> int:
    status = client.status()
    if args.json:
        print(json.dumps(status, indent=2, ensure_ascii=False))
        return EXIT_OK
    style = args.colors.out
    info = status["orchestrator"]
    revision = f" @ {info['git_revision']}" if info.get("git_revision") else ""
    git = info.get("git") if isinstance(info.get("git"), dict) else None
    where = git["source"] if git and git.get("source") else info["config_path"]
    print(f"{where}{revision}  config {str(info.get('config_sha256'))[:12]}  up {info['uptime_s']:.0f} s")
    lines = git_lines(git) if git else []
    desired = info.get("desired") if isinstance(info.get("desired"), dict) else None
    lines += desired_lines(desired, config=None if git else Path(str(info["config_path"])).name) if desired else []
    for line in lines:
        print(style(line, "red") if line.startswith(REPORTED) else line)
    rows = [("NAME", "PHASE", "VERSION", "INST", "CALLS", "ERRORS", "FUEL/CALL", "LAST ERROR")]
    for c in status["capsules"]:
        rows.append(
            (
                str(c["name"]),
                str(c["phase"]),
                str(c["version"] or "-")[:12] + (" (pinned)" if isinstance(c.get("pinned"), dict) else ""),
                str(c["instances"]),
                str(c["calls"]),
                str(c["errors"]),
                f"{c['fuel_mean']:,}",
                cell(_attention(c), ERROR_CELL),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [text.ljust(width) for text, width in zip(row, widths, strict=True)]
        if index == 0:
            cells = [style(text, "bold") for text in cells]
        else:
            cells[1] = style.phase(row[1], cells[1])
            if row[7]:
                cells[7] = style(cells[7], "red")
        print("  ".join(cells).rstrip())
    return EXIT_OK


def _attention(capsule: dict[str, Any]) -> str:
    """The LAST ERROR cell: the error, or what a change awaiting approval would grant."""
    awaiting = capsule.get("awaiting")
    if isinstance(awaiting, dict) and isinstance(awaiting.get("escalations"), list):
        grants = ", ".join(map(str, awaiting["escalations"]))
        return f"awaits `orch approve {capsule['name']}`: would grant {grants}"
    return str(capsule["last_error"] or "")


def _describe(args: argparse.Namespace, client: SyncClient) -> int:
    from .describe import describe

    summary = client.capsule(args.name)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(describe(args.name, summary, style=args.colors.out))
    return EXIT_OK


def _call(args: argparse.Namespace, client: SyncClient) -> int:
    text = sys.stdin.read() if args.arguments == "-" else args.arguments
    output, _ = client.call(args.name, args.tool, text.encode())
    write_output(output, newline=args.newline)
    return EXIT_OK


def _events(args: argparse.Namespace, client: SyncClient) -> int:
    style, err = args.colors.out, args.colors.err
    for item in client.events(args.topic, args.history, idle=stop_if_nobody_reads):
        if "live" in item:
            if not args.follow:
                break  # the history is shown; without --follow that is all
            continue
        if "lost" in item:
            print(
                err(f"orch: {item['lost']['dropped']} event(s) lost (this client was too slow)", "yellow"),
                file=sys.stderr,
            )
            continue
        if args.json:
            print(json.dumps(item, ensure_ascii=False), flush=True)
            continue
        clock = time.strftime("%H:%M:%S", time.localtime(item["timestamp_ms"] / 1000))
        payload = json.dumps(item["payload"], ensure_ascii=False)
        if not args.full:
            payload = clip(payload, PAYLOAD_CHARS)
        topic = item["topic"]
        phase = topic.rsplit(".", 1)[-1].capitalize() if topic.startswith("orch.capsule.") else ""
        shown = style.phase(phase, topic) if phase else style(topic, "bold")
        print(f"{style(clock, 'dim')} #{item['seq']} {shown} {payload} (from {item['source']})", flush=True)
    return EXIT_OK


def stop_if_nobody_reads() -> None:
    """Raise BrokenPipeError when the reader of standard output has gone (`orch events -f |
    head -2` on a quiet bus ends when `head` does, not at the next event)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # POLLERR and POLLHUP are always reported
        ready = poller.poll(0)
    except (OSError, ValueError, AttributeError):
        return
    if any(flags & select.POLLERR for _, flags in ready):
        raise BrokenPipeError(32, "the reader of standard output has gone")


def _kv(args: argparse.Namespace, client: SyncClient) -> int:
    if args.op == "ls":
        for key in client.kv_list(args.name, args.key)["keys"]:
            print(key)
        return EXIT_OK
    if not args.key:
        return fail(f"kv {args.op} needs a KEY", EXIT_USAGE, colors=args.colors)
    if args.op == "get":
        write_output(client.kv_get(args.name, args.key), newline=args.newline)
    elif args.op == "set":
        if args.value is None:
            return fail("kv set needs a VALUE ('-' reads stdin)", EXIT_USAGE, colors=args.colors)
        value = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()
        client.kv_set(args.name, args.key, value)
    else:
        client.kv_delete(args.name, args.key)
    return EXIT_OK


def _reconcile(args: argparse.Namespace, client: SyncClient) -> int:
    plan = client.reconcile()
    print_actions(plan["actions"], colors=args.colors)
    return EXIT_OK


def _reconcile_lattice(args: argparse.Namespace, client: Any) -> int:
    """`orch reconcile --lattice URL`: the host holding the scheduler lease fetches the
    followed branch now. Exit 0 when the branch's revision is the lattice's desired state
    (published now, or already), else 1 with the reason (rejected with its problems, the
    fetch failed, nothing is followed)."""
    answer = client.reconcile()
    git = answer.get("git") if isinstance(answer.get("git"), dict) else None
    source = f"{git['source']}: " if git and git.get("source") else ""
    if answer["outcome"] in ("published", "applied"):
        print(f"{source}{answer['message']}")
        return EXIT_OK
    fail(f"{source}{answer['message']}", EXIT_FAILED, colors=getattr(args, "colors", PLAIN))
    rejected = git.get("rejected") if git else None
    if answer["outcome"] == "rejected" and isinstance(rejected, dict):
        for problem in rejected.get("problems") or []:
            print(f"  {problem}", file=sys.stderr)
    return EXIT_FAILED


def _restart(args: argparse.Namespace, client: SyncClient) -> int:
    status = client.restart(args.name)
    phase = args.colors.out.phase(str(status["phase"]))
    print(f"{status['name']}: {phase} version {status['version']} (reloads: {status['reload_count']})")
    return EXIT_OK


REPORTED = ("rejected", "fetch failed", "broken", "build failed")  # status lines shown in red


def desired_lines(desired: dict[str, Any], *, config: str | None) -> list[str]:
    """What `orch status` says of the files: a rejected config (`config`: its file name;
    None when following git, whose lines say it already), capsules whose own files are
    broken, failed builds. Each with its problems: the capsules' rows show only a summary."""
    lines = []
    rejected = desired.get("rejected")
    if config is not None and isinstance(rejected, dict):
        count = rejected.get("count", len(rejected.get("problems") or []))
        lines.append(f"rejected {config}: {count} problem(s); what runs keeps running")
        lines += [f"  {problem}" for problem in rejected.get("problems") or []]
    for name, broken in sorted((desired.get("broken") or {}).items()):
        problems = broken.get("problems") or [] if isinstance(broken, dict) else []
        lines.append(f"broken {name}: its files cannot be used; the last good version keeps serving")
        lines += [f"  {problem}" for problem in problems]
    for name, failed in sorted((desired.get("builds_failed") or {}).items()):
        if isinstance(failed, dict):
            output = str(failed.get("output") or "").strip().splitlines()
            lines.append(f"build failed {name}: exit status {failed.get('exit_code')}")
            lines += [f"  {line}" for line in output[-BUILD_LINES:]]
    return lines
