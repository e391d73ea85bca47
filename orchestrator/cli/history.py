"""The version history verbs: clients of a running orchestrator's control API (contract).

    orch history NAME [--json] [--lattice URL [--lattice-name N] [--lattice-creds F]]
    orch rollback NAME [--to VERSION] [--with-data] [--lattice URL ...]
    orch unpin NAME [--lattice URL ...]

`history` lists the versions a deployment ran, newest first: entry, time, event, version,
spec hash, git revision, whether a KV snapshot of the data it left is kept, and the plan's
reasons. `rollback` runs an earlier version (by default the one before the version
running; VERSION is a version or spec hash as `history` shows it, at least 4 hex digits, or
@ID), pinned until the deployment's desired spec changes or `unpin`; `--with-data` also
puts back the KV data that version left. Socket and exit codes as for the other operator
verbs (orchestrator.cli.remote): no orchestrator, exit 3; a refusal, its message, exit 1.

With `--lattice URL` each works on a lattice instead (orchestrator.lattice.versions,
.rollback): the versions are the desired revisions that changed what runs (an entry's ID
is its revision; `--to` also takes @REVISION), a rollback publishes a pinned revision,
and `--with-data` pauses the deployment on every host while its snapshot is restored.

Registered by orchestrator.cli.main through `add_commands`. Part of the CLI layer: it prints.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..api.blocking import SyncClient

from .helptext import verb_help
from .lattice import add_lattice_options
from .output import EXIT_OK
from .remote import _connect, add_socket_options


def add_commands(verbs: Any) -> None:
    """Register `history`, `rollback` and `unpin` on the `orch` sub-parser set."""

    def verb(name: str, help_text: str, run: Callable[[argparse.Namespace, SyncClient], int]) -> Any:
        parser = verbs.add_parser(name, help=help_text, **verb_help(name))
        parser.add_argument("name", help="the deployment's name")
        add_socket_options(parser)
        add_lattice_options(parser)
        parser.set_defaults(run=lambda args: _connect(args, run))
        return parser

    history = verb("history", "the versions a capsule ran, with their KV snapshots", _history)
    history.add_argument("--json", action="store_true", help="the API's answer as JSON")
    rollback = verb("rollback", "run an earlier version of a capsule, pinned (optionally with its data)", _rollback)
    rollback.add_argument(
        "--to",
        metavar="VERSION",
        help="a version, spec hash (4+ hex digits) or @ID (on a lattice: @REVISION); default: the previous one",
    )
    rollback.add_argument("--with-data", action="store_true", help="also restore the KV data that version left")
    verb("unpin", "end a rollback's pin: the capsule's desired spec runs again", _unpin)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1 << 20):.1f} MiB"


def _snapshot(entry: dict[str, Any]) -> str:
    snapshot = entry.get("snapshot")
    if snapshot:
        return f"{snapshot['keys']} keys, {_size(snapshot['bytes'])}"
    return "-"


def _pinned(name: str, pinned: dict[str, Any] | None) -> str:
    if not pinned:
        return f"{name}: runs its desired spec (not pinned)"
    return (
        f"{name}: pinned to version {pinned['version']} since {_when(pinned['since_ms'])} by a rollback; "
        f"`orch unpin {name}` or a change to its desired spec ends it"
    )


def _history(args: argparse.Namespace, client: SyncClient) -> int:
    answer = client.history(args.name)
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    print(_pinned(answer["capsule"], answer.get("pinned")))
    rows = [("ID", "WHEN", "EVENT", "VERSION", "SPEC", "REVISION", "SNAPSHOT", "REASONS")]
    for entry in answer["entries"]:
        reasons = "; ".join(entry["reasons"]) or "-"
        if entry.get("note"):
            reasons += f" (snapshot {entry['note']})"
        if not entry.get("module_kept", True):
            reasons += " (module no longer kept)"
        rows.append(
            (
                f"@{entry['id']}" + ("*" if entry.get("current") else ""),
                _when(entry["at_ms"]),
                entry["event"],
                entry["version"],
                entry["spec_hash"][:12],
                (entry.get("revision") or "-")[:12],
                _snapshot(entry),
                " ".join(reasons.split())[:100],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if len(rows) == 1:
        print("(no versions recorded yet)")
    return EXIT_OK


def _rollback(args: argparse.Namespace, client: SyncClient) -> int:
    answer = client.rollback(args.name, to=args.to, with_data=args.with_data)
    entry, status = answer["entry"], answer["status"]
    data = f" with its data ({answer['restored_keys']} keys restored)" if answer["with_data"] else ""
    print(f"{answer['capsule']}: rolled back to version {entry['version']} (entry @{entry['id']}){data}")
    print(_pinned(answer["capsule"], status.get("pinned")))
    return EXIT_OK


def _unpin(args: argparse.Namespace, client: SyncClient) -> int:
    answer = client.unpin(args.name)
    status = answer.get("status") or {}
    print(f"{answer['capsule']}: unpinned; {status.get('phase', '?')} version {status.get('version') or '-'}")
    return EXIT_OK
