"""The operator's answers to the escalation gate: clients of a running orchestrator (contract).

    orch approve NAME [--spec-hash HASH] [--lattice URL [--lattice-name N] [--lattice-creds F]]
    orch reject NAME [--spec-hash HASH] [--lattice URL ...]

`approve` grants what capsule NAME waits for (`AwaitingApproval`: a start or reload that
would grant more than runs now, beyond the approval policy in force) and starts or reloads
it at once; `reject` refuses it: what runs keeps running, and the change stays refused until
the capsule's desired spec changes again. `--spec-hash` (the hash shown by `orch status
--json` under `awaiting`, or a prefix of at least 6 digits) answers only if that is still
the change waiting, so an answer never applies to a change nobody looked at.

Each finds the socket as the other operator verbs do (`--config`, `--state-dir` or
`--socket`: orchestrator.cli.remote); with `--lattice URL` it answers the lattice's gate
instead (orchestrator.lattice.answers: a new desired revision; `approve` waits until the
lattice serves the change). Exit 0 when done; 1 when the request failed (a capsule
awaiting no approval: the server's message, 409) or an approved version failed to load; 3
without a running orchestrator. Registered by orchestrator.cli.main (`add_commands`).
Part of the CLI layer: it prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..api.blocking import SyncClient

from .helptext import verb_help
from .lattice import add_lattice_options
from .output import EXIT_FAILED, EXIT_OK
from .remote import _connect, add_socket_options


def add_commands(verbs: Any) -> None:
    """Register `approve` and `reject` on the `orch` sub-parser set."""
    answers: tuple[tuple[str, str, Callable[[argparse.Namespace, SyncClient], int]], ...] = (
        ("approve", "grant the capabilities a capsule's change waits for, and run it", _approve),
        ("reject", "refuse a capsule's change that waits for approval; what runs keeps running", _reject),
    )
    for name, help_text, run in answers:
        parser = verbs.add_parser(name, help=help_text, **verb_help(name))
        parser.add_argument("name", help="the capsule (deployment) awaiting approval")
        parser.add_argument(
            "--spec-hash", metavar="HASH", help="only if this is the change waiting (its spec hash, or a prefix)"
        )
        add_socket_options(parser)
        add_lattice_options(parser)
        parser.set_defaults(run=lambda args, run=run: _connect(args, run))


def _approve(args: argparse.Namespace, client: SyncClient) -> int:
    status = client.approve(args.name, args.spec_hash)
    approved = status.get("approved") or {}
    print(
        f"{args.name}: approved change {str(approved.get('spec_hash'))[:12]}, "
        f"granting {', '.join(approved.get('escalations', [])) or 'nothing new'}"
    )
    return _outcome(status)


def _reject(args: argparse.Namespace, client: SyncClient) -> int:
    status = client.reject(args.name, args.spec_hash)
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
