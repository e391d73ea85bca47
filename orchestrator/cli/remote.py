"""The operator's CLI verbs: clients of a running orchestrator's control API (contract).

    orch status [--json]
    orch call NAME TOOL [JSON | -]
    orch events [--follow] [--topic PATTERN] [--history N] [--json]
    orch kv ls|get|set|del NAME [KEY] [VALUE]
    orch reconcile
    orch restart NAME

Each finds the socket from `CONFIG` (default ./config.yaml: `<state_dir>/orch.sock`) or takes
`--socket PATH`. Without a running orchestrator: one line, exit 3. A failed request: one
line with the server's message, exit 1. Part of the CLI layer: it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..api.client import Client, NotRunning, RemoteError, socket_for
from ..errors import OrchestratorError
from .output import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE


def add_commands(verbs: Any) -> None:
    """Register the verbs on the `orch` sub-parser set."""

    def verb(name: str, help_text: str, run: Callable[[argparse.Namespace, Client], Awaitable[int]]) -> Any:
        parser = verbs.add_parser(name, help=help_text)
        parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="find the socket from this config")
        parser.add_argument("--socket", type=Path, help="the control socket (instead of --config)")
        parser.set_defaults(run=lambda args: _connect(args, run))
        return parser

    status = verb("status", "what runs, and how it is doing", _status)
    status.add_argument("--json", action="store_true")

    call = verb("call", "call a capsule's tool on the running orchestrator", _call)
    call.add_argument("name")
    call.add_argument("tool")
    call.add_argument("arguments", nargs="?", default="", metavar="JSON", help="'-' reads stdin")

    events = verb("events", "recent and live bus events", _events)
    events.add_argument("--follow", "-f", action="store_true", help="keep streaming live events")
    events.add_argument("--topic", default=">", help="NATS pattern, e.g. 'orch.capsule.>'")
    events.add_argument("--history", type=int, default=100, help="events from history first (default 100)")
    events.add_argument("--json", action="store_true", help="one JSON object per line")

    kv = verb("kv", "a capsule's key-value store", _kv)
    kv.add_argument("op", choices=("ls", "get", "set", "del"))
    kv.add_argument("name")
    kv.add_argument("key", nargs="?", default="")
    kv.add_argument("value", nargs="?", help="for set ('-' reads stdin)")

    verb("reconcile", "re-read the files now and apply; prints the plan", _reconcile)
    restart = verb("restart", "build a fresh version of a capsule and swap to it", _restart)
    restart.add_argument("name")


def _connect(args: argparse.Namespace, run: Callable[[argparse.Namespace, Client], Awaitable[int]]) -> int:
    try:
        path = socket_for(args.config, args.socket)
    except OrchestratorError as error:
        print(f"orch: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        async with Client(path) as client:
            return await run(args, client)

    try:
        return asyncio.run(main())
    except NotRunning as error:
        print(f"orch: {error}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except RemoteError as error:
        print(f"orch: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


async def _status(args: argparse.Namespace, client: Client) -> int:
    status = await client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    info = status["orchestrator"]
    revision = f" @ {info['git_revision']}" if info.get("git_revision") else ""
    print(f"{info['config_path']}{revision}  config {str(info.get('config_sha256'))[:12]}  up {info['uptime_s']:.0f} s")
    rows = [("NAME", "PHASE", "VERSION", "INST", "CALLS", "ERRORS", "FUEL/CALL", "LAST ERROR")]
    for c in status["capsules"]:
        rows.append(
            (
                c["name"],
                c["phase"],
                (c["version"] or "-")[:12],
                str(c["instances"]),
                str(c["calls"]),
                str(c["errors"]),
                f"{c['fuel_mean']:,}",
                " ".join(str(c["last_error"] or "").split())[:60],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


async def _call(args: argparse.Namespace, client: Client) -> int:
    text = sys.stdin.read() if args.arguments == "-" else args.arguments
    output, _ = await client.call(args.name, args.tool, text.encode())
    sys.stdout.buffer.write(output)
    if sys.stdout.isatty() and not output.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return EXIT_OK


async def _events(args: argparse.Namespace, client: Client) -> int:
    async for item in client.events(args.topic, args.history):
        if "live" in item:
            if not args.follow:
                break  # the history is shown; without --follow that is all
            continue
        if "lost" in item:
            print(f"orch: {item['lost']['dropped']} event(s) lost (this client was too slow)", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(item, ensure_ascii=False), flush=True)
        else:
            clock = time.strftime("%H:%M:%S", time.localtime(item["timestamp_ms"] / 1000))
            payload = json.dumps(item["payload"], ensure_ascii=False)
            print(f"{clock} #{item['seq']} {item['topic']} {payload[:300]} (from {item['source']})", flush=True)
    return EXIT_OK


async def _kv(args: argparse.Namespace, client: Client) -> int:
    if args.op == "ls":
        for key in (await client.kv_list(args.name, args.key))["keys"]:
            print(key)
        return EXIT_OK
    if not args.key:
        print(f"orch: kv {args.op} needs a KEY", file=sys.stderr)
        return EXIT_USAGE
    if args.op == "get":
        sys.stdout.buffer.write(await client.kv_get(args.name, args.key))
        sys.stdout.flush()
    elif args.op == "set":
        if args.value is None:
            print("orch: kv set needs a VALUE ('-' reads stdin)", file=sys.stderr)
            return EXIT_USAGE
        value = sys.stdin.buffer.read() if args.value == "-" else args.value.encode()
        await client.kv_set(args.name, args.key, value)
    else:
        await client.kv_delete(args.name, args.key)
    return EXIT_OK


async def _reconcile(args: argparse.Namespace, client: Client) -> int:
    plan = await client.reconcile()
    print_actions(plan["actions"])
    return EXIT_OK


async def _restart(args: argparse.Namespace, client: Client) -> int:
    status = await client.restart(args.name)
    print(f"{status['name']}: {status['phase']} version {status['version']} (reloads: {status['reload_count']})")
    return EXIT_OK


def print_actions(actions: list[dict[str, Any]]) -> None:
    symbols = {"start": "+", "reload": "~", "stop": "-", "keep": "="}
    changes = [a for a in actions if a["action"] != "keep" or a["reasons"]]
    if not any(a["action"] != "keep" for a in actions):
        print("no changes")
    for action in changes:
        print(
            f"{symbols[action['action']]} {action['capsule']:<20} {action['action']:<7} {'; '.join(action['reasons'])}"
        )
        for escalation in action.get("escalations", []):
            print(f"    ! escalation: {escalation}")


async def remote_plan(socket: Path) -> dict[str, Any] | None:
    """The running orchestrator's plan, or None when none runs (for `orch plan`)."""
    try:
        async with Client(socket, timeout=10) as client:
            plan: dict[str, Any] = await client.plan()
            return plan
    except NotRunning:
        return None
