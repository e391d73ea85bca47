"""The operator's answers to the escalation gate: clients of a running orchestrator (contract).

    orch approve NAME [--spec-hash HASH]
    orch reject NAME [--spec-hash HASH]

`approve` grants what capsule NAME waits for (`AwaitingApproval`: a start or reload that
would grant more than runs now, beyond the approval policy in force) and starts or reloads
it at once; `reject` refuses it: what runs keeps running, and the change stays refused until
the capsule's desired spec changes again. `--spec-hash` (the hash shown by `orch status
--json` under `awaiting`, or a prefix of at least 6 digits) answers only if that is still
the change waiting, so an answer never applies to a change nobody looked at.

Each finds the socket as the other operator verbs do (`--config CONFIG`, default
./config.yaml, or `--socket PATH`). Exit 0 when done; 1 when the request failed (a capsule
awaiting no approval: the server's message, 409) or an approved version failed to load; 3
without a running orchestrator. Registered by orchestrator.cli.main (`add_commands`).
Part of the CLI layer: it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..api.client import Client, NotRunning, RemoteError, socket_for
from ..errors import OrchestratorError
from .output import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, fail, one_line

Verb = Callable[[argparse.Namespace, Client], Awaitable[int]]


def add_commands(verbs: Any) -> None:
    """Register `approve` and `reject` on the `orch` sub-parser set."""
    for name, help_text, run in (
        ("approve", "grant the capabilities a capsule's change waits for, and run it", _approve),
        ("reject", "refuse a capsule's change that waits for approval; what runs keeps running", _reject),
    ):
        parser = verbs.add_parser(name, help=help_text)
        parser.add_argument("name", help="the capsule (deployment) awaiting approval")
        parser.add_argument(
            "--spec-hash", metavar="HASH", help="only if this is the change waiting (its spec hash, or a prefix)"
        )
        parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="find the socket from this config")
        parser.add_argument("--socket", type=Path, help="the control socket (instead of --config)")
        parser.set_defaults(run=_runner(run))


def _runner(run: Verb) -> Callable[[argparse.Namespace], int]:
    return lambda args: _connect(args, run)


def _connect(args: argparse.Namespace, run: Verb) -> int:
    try:
        path = socket_for(args.config, args.socket)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE)

    async def main() -> int:
        async with Client(path) as client:
            return await run(args, client)

    try:
        return asyncio.run(main())
    except NotRunning as error:
        return fail(str(error), EXIT_NOT_RUNNING)
    except RemoteError as error:
        return fail(one_line(error), EXIT_FAILED)
    except KeyboardInterrupt:
        return 130


async def _approve(args: argparse.Namespace, client: Client) -> int:
    status = await client.approve(args.name, args.spec_hash)
    approved = status.get("approved") or {}
    print(
        f"{args.name}: approved change {str(approved.get('spec_hash'))[:12]}, "
        f"granting {', '.join(approved.get('escalations', [])) or 'nothing new'}"
    )
    return _outcome(status)


async def _reject(args: argparse.Namespace, client: Client) -> int:
    status = await client.reject(args.name, args.spec_hash)
    rejected = status.get("rejected") or {}
    print(
        f"{args.name}: rejected change {str(rejected.get('spec_hash'))[:12]}, which would grant "
        f"{', '.join(rejected.get('escalations', []))}"
    )
    serving = f"version {status['version']} keeps serving" if status.get("version") else "nothing runs"
    print(f"{args.name}: {serving}; a new change to its files or config is judged again")
    return EXIT_OK


def _outcome(status: dict[str, Any]) -> int:
    """Exit 0 when the approved change runs; else say why (the old version, if any, serves)."""
    phase = status.get("phase")
    if phase == "Running":
        print(f"{status['name']}: running version {status.get('version')}")
        return EXIT_OK
    error = " ".join(str(status.get("last_error") or "").split())
    print(f"{status['name']}: {str(phase).lower()}" + (f": {error}" if error else ""), file=sys.stderr)
    return EXIT_FAILED
