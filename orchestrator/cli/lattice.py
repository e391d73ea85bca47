"""The lattice verbs of the `orch` command (a contract: README, "Lattice").

    orch apply CONFIG --lattice URL [--lattice-name N] [--lattice-creds FILE]
    orch apply git+URL#BRANCH:PATH --lattice URL --follow [--interval SECONDS]
    orch host --lattice URL [--lattice-name N] [--lattice-creds FILE] [--host-id ID]
              [--label KEY=VALUE]... [--state-dir DIR] [--drain-seconds S]

and, for the operator verbs that take `--lattice URL` (`add_lattice_options`):

    orch status --lattice URL [--json]                      -> run_status(args)
    orch plan CONFIG --lattice URL [--json] [--exit-code]   -> run_plan(args)

`apply` validates CONFIG exactly as `orch validate` does (config, manifests, modules; the
state dir plays no part in a lattice) and on any problem prints them all, publishes
nothing and exits 1; otherwise it publishes the artifacts and the desired state and exits
0 once the lattice has taken it. With `--follow` (a git source only) it also records that
the lattice follows the branch: the host holding the scheduler lease publishes each new
valid revision from then on (orchestrator.lattice.follow); an `orch apply` without
`--follow` ends that, and says so. `host` runs in the foreground until SIGTERM or SIGINT,
then drains (its capsules move to other hosts first) and exits 0; a second signal exits
at once (130). An unreachable lattice is one line and exit 1.

`main(argv)` runs these verbs alone (`python -m orchestrator.cli.lattice host ...`), for
tests and benches until they are registered in `orch`. Part of the CLI layer: it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

from ..errors import ConfigError, GateError, OrchestratorError
from .helptext import verb_help
from .output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, one_line, print_actions, print_problems

EXIT_INTERRUPTED = 130
DEFAULT_STATE_DIR = Path(".orch-host")


def add_lattice_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """`--lattice URL`, `--lattice-name N`, `--lattice-creds FILE` on a verb's parser."""
    parser.add_argument(
        "--lattice",
        required=required,
        metavar="URL",
        help="NATS server URL(s) of the lattice, comma-separated (nats://host:4222)",
    )
    parser.add_argument("--lattice-name", default="default", metavar="N", help="the lattice's name (default: default)")
    parser.add_argument("--lattice-creds", type=Path, metavar="FILE", help="NATS credentials file (.creds)")
    add_tls_options(parser)


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """`--lattice-tls-ca|cert|key FILE`: TLS to the NATS servers (a CA to trust, a client
    certificate and its key). A `tls://` URL, or a CA alone, turns TLS on."""
    parser.add_argument("--lattice-tls-ca", type=Path, metavar="FILE", help="CA certificate(s) to trust (PEM)")
    parser.add_argument("--lattice-tls-cert", type=Path, metavar="FILE", help="client certificate (PEM), for mTLS")
    parser.add_argument("--lattice-tls-key", type=Path, metavar="FILE", help="the client certificate's key (PEM)")


def address_of(args: argparse.Namespace) -> Any:
    """The LatticeAddress the options name. Raises OrchestratorError (GateError) when malformed."""
    from ..lattice.connection import LatticeAddress

    files = {
        "creds": args.lattice_creds,
        "tls_ca": getattr(args, "lattice_tls_ca", None),
        "tls_cert": getattr(args, "lattice_tls_cert", None),
        "tls_key": getattr(args, "lattice_tls_key", None),
    }
    for option, path in files.items():
        if path is not None and not path.is_file():
            flag = "--lattice-" + option.replace("_", "-")
            raise GateError(f"{flag} {path}: no such file; give the path of an existing file")
    if files["tls_key"] is not None and files["tls_cert"] is None:
        raise GateError("--lattice-tls-key needs --lattice-tls-cert (the certificate the key belongs to)")
    return LatticeAddress.parse(args.lattice, name=args.lattice_name, **files)


def add_commands(verbs: Any) -> None:
    """Register `apply` and `host` on the `orch` sub-parser set."""
    apply = verbs.add_parser("apply", help="validate a config.yaml and publish it to a lattice", **verb_help("apply"))
    apply.add_argument(
        "config", nargs="?", default="config.yaml", metavar="CONFIG", help="default: ./config.yaml; or git+URL#REV:PATH"
    )
    add_lattice_options(apply, required=True)
    apply.add_argument(
        "--follow",
        action="store_true",
        help="git source only: keep following the branch (the lattice publishes each new valid revision)",
    )
    apply.add_argument(
        "--interval", type=_interval, metavar="SECONDS", help="with --follow: seconds between fetches (default: 30)"
    )
    apply.set_defaults(run=run_apply)

    host = verbs.add_parser("host", help="join a lattice and run what it assigns to this host", **verb_help("host"))
    add_lattice_options(host, required=True)
    host.add_argument("--host-id", metavar="ID", help="default: kept in the state dir (machine name + suffix)")
    host.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)")
    host.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="module cache, id, workspace")
    host.add_argument("--drain-seconds", type=float, default=30.0, help="how long SIGTERM waits for capsules to move")
    host.set_defaults(run=run_host)


def _interval(text: str) -> float:
    from ..lattice.followrecord import check_interval

    try:
        return check_interval(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


# -- orch apply --------------------------------------------------------------------------
def run_apply(args: argparse.Namespace) -> int:
    from ..control.gitsource import is_git_source

    following = bool(getattr(args, "follow", False))
    if following and not is_git_source(args.config):
        return fail(
            "--follow: for a git source (git+URL#BRANCH:PATH) only; a config.yaml is applied once "
            "(apply it again after a change)",
            EXIT_USAGE,
        )
    if getattr(args, "interval", None) is not None and not following:
        return fail("--interval: with --follow only (the seconds between fetches of the followed branch)", EXIT_USAGE)
    try:
        address = address_of(args)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE)
    try:
        if is_git_source(args.config):
            from ..control.gitsource import GitRef
            from .revisions import git_revision

            try:
                ref = GitRef.parse(args.config)
                if following:
                    from ..lattice.followrecord import check_source

                    check_source(args.config)
            except OrchestratorError as error:
                return fail(one_line(error), EXIT_USAGE)
            if following:
                return _apply_following(args, address, ref)
            # a temporary clone: the lattice keeps the artifacts, not the checkout
            with git_revision(args.config, state_dir=Path(DEFAULT_STATE_DIR)) as (desired, commit):
                source = f"{args.config} @ {commit[:12]}"
                return _apply(args, address, desired, shown=f"{args.config}: revision {commit[:12]}", source=source)
        from ..desired.load import load_desired

        return _apply(args, address, load_desired(Path(args.config)), shown=args.config, source=None)
    except ConfigError as error:
        print_problems(args.config, [str(p) for p in error.problems])
        print("orch: nothing was published", file=sys.stderr)
        return EXIT_FAILED
    except OrchestratorError as error:  # the repository cannot be fetched, or the lattice refused
        return fail(one_line(error), EXIT_FAILED)


def _apply_following(args: argparse.Namespace, address: Any, ref: Any) -> int:
    """`orch apply git+URL#BRANCH:PATH --follow`: the branch's revision, read as the hosts
    following it will read the next ones (no environment variables), published; then the
    lattice records that it follows the branch."""
    import getpass
    import socket

    from ..lattice.follow import DEFAULT_INTERVAL_S
    from ..lattice.followrecord import FollowRecord

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    with _followed_revision(ref) as (desired, commit):
        record = FollowRecord(
            source=str(ref),
            interval_s=args.interval or DEFAULT_INTERVAL_S,
            by=f"{user}@{socket.gethostname()}",
            at_ms=int(time.time() * 1000),
        )
        shown = f"{record.source}: revision {commit[:12]}"
        return _apply(
            args, address, desired, shown=shown, source=f"{record.source} @ {commit[:12]}", follow=(record, commit)
        )


@contextlib.contextmanager
def _followed_revision(ref: Any) -> Iterator[tuple[Any, str]]:
    """The branch's revision from a temporary clone, validated strictly without environment
    variables (as the host following it validates each revision: what a revision means must
    not depend on where it is read). Raises RevisionRejected or GitSourceError."""
    import tempfile

    from ..control.follow import load_revision
    from ..control.gitsource import GitSource

    with tempfile.TemporaryDirectory(prefix="orch-apply-") as folder:
        clone = GitSource(ref, Path(folder))
        checkout = clone.checkout(clone.fetch())
        state_dir = Path(DEFAULT_STATE_DIR).absolute()
        yield load_revision(checkout, state_dir=state_dir, workspace=Path.cwd(), environ={}), checkout.commit


def _apply(
    args: argparse.Namespace,
    address: Any,
    desired: Any,
    *,
    shown: str,
    source: str | None,
    follow: tuple[Any, str] | None = None,
) -> int:
    """Publish one validated desired state (ConfigError, OrchestratorError go to the caller);
    with `follow` (the record and the commit), record that the lattice follows the branch,
    else end any following."""
    import asyncio

    from ..lattice.desiredstate import manifest_texts

    manifests = manifest_texts(desired)
    enabled = sum(1 for s in desired.specs.values() if s.enabled)
    print(f"{shown}: valid ({len(desired.specs)} capsules, {enabled} enabled)")
    published, ended = asyncio.run(_publish(address, desired, manifests, source=source, follow=follow))
    where = f"lattice {address.name} at {address.shown}"
    if ended is not None:
        print(f"no longer following {ended.source}: an apply without --follow ends it")
    if published.unchanged:
        print(f"unchanged: {where} has this desired state already (revision {published.revision})")
    else:
        print(
            f"applied to {where}: revision {published.revision} "
            f"({published.uploaded} artifact(s) uploaded, {published.present} already there)"
        )
    for name, grants in sorted(published.waiting.items()):
        print(f"{name}: awaits `orch approve {name} --lattice ...`: would grant {', '.join(grants)}")
    if follow is not None:
        record = follow[0]
        print(
            f"following {record.source} every {record.interval_s:g} s: the host holding the scheduler lease "
            "publishes each new valid revision (`orch reconcile --lattice URL` fetches now)"
        )
    return EXIT_OK


async def _publish(
    address: Any, desired: Any, manifests: dict[str, bytes], *, source: str | None, follow: tuple[Any, str] | None
) -> tuple[Any, Any]:
    """(what `publish` says, the follow record this apply ended or None)."""
    from ..lattice.connection import Lattice
    from ..lattice.desiredstate import publish
    from ..lattice.followrecord import end_following, start_following

    lattice = await Lattice.connect(address)
    try:
        ended = await end_following(lattice) if follow is None else None  # first: no fetch publishes after this
        published = await publish(lattice, desired, manifests, source=source)
        if follow is not None:
            await start_following(lattice, *follow)
        return published, ended
    finally:
        await lattice.close()


# -- orch host ---------------------------------------------------------------------------
def run_host(args: argparse.Namespace) -> int:
    import asyncio

    from ..lattice.membership import check_host_id, parse_label

    try:
        address = address_of(args)
        labels = dict(parse_label(text) for text in args.label)
        if args.host_id is not None:
            check_host_id(args.host_id)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE)
    if args.drain_seconds < 0:
        return fail("--drain-seconds must be 0 or more", EXIT_USAGE)
    return asyncio.run(_host(args, address, labels))


async def _host(args: argparse.Namespace, address: Any, labels: dict[str, str]) -> int:
    import asyncio

    from ..lattice.host import LatticeHost

    host = LatticeHost(
        address=address, state_dir=args.state_dir, host_id=args.host_id, labels=labels, drain_seconds=args.drain_seconds
    )
    stop = asyncio.Event()
    _install_signals(stop)
    events = host.bus.subscribe("orch.capsule.>", queue_size=10_000)
    printer = asyncio.get_running_loop().create_task(_print_events(events))
    try:
        await host.start()
    except OrchestratorError as error:
        events.close()
        printer.cancel()
        return fail(one_line(error), EXIT_FAILED)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "no labels"
    print(
        f"orch: host {host.id} ({shown}) joined lattice {address.name} at {address.shown}; SIGTERM or Ctrl+C drains it",
        flush=True,
    )
    await stop.wait()
    print(f"orch: host {host.id} draining...", flush=True)
    await host.drain()
    events.close()
    printer.cancel()
    print(f"orch: host {host.id} left the lattice", flush=True)
    return EXIT_OK


def _install_signals(stop: asyncio.Event) -> None:
    import asyncio

    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            print("orch: second signal: exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        stop.set()

    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, on_signal)


async def _print_events(events: Any) -> None:
    async for event in events:
        parts = event.topic.split(".")
        payload = event.payload if isinstance(event.payload, dict) else {}
        if len(parts) != 4:
            continue
        clock = time.strftime("%H:%M:%S", time.localtime(event.timestamp_ms / 1000))
        detail = ""
        if parts[3] in ("running", "reloaded"):
            detail = f" version {payload.get('version')}"
        elif parts[3] in ("failed", "degraded"):
            detail = f": {payload.get('last_error')}"
        print(f"{clock} {parts[2]:<16} {parts[3]}{detail}", flush=True)


# -- orch status --lattice, orch plan --lattice -----------------------------------------
def run_status(args: argparse.Namespace) -> int:
    """`orch status --lattice URL [--json]`."""
    import asyncio

    from ..lattice.status import lattice_status

    try:
        address = address_of(args)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE)
    try:
        status = asyncio.run(lattice_status(address))
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_FAILED)
    if getattr(args, "json", False):
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print_status(status, where=f"lattice {address.name} at {address.shown}")
    return EXIT_OK


def print_status(status: dict[str, Any], *, where: str) -> None:
    desired = status.get("desired")
    if desired:
        applied = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(desired["applied_at_ms"] / 1000))
        config = desired["config_sha256"][:12]
        head = f"revision {desired['revision']} (config {config}, {applied} by {desired['applied_by']})"
    else:
        head = "nothing applied yet (orch apply CONFIG --lattice URL)"
    git = status.get("git") if isinstance(status.get("git"), dict) else None
    following = ""
    if git:
        applied = str(git.get("applied_revision") or "nothing applied yet")[:12]
        every = git.get("interval_s")
        every = f"{every:g}" if isinstance(every, int | float) else "?"
        following = f"; following {git.get('source')} @ {applied} (every {every} s)"
    print(f"{where}: {head}; scheduler: {status.get('scheduler') or 'none'}{following}")
    if git:
        from .output import git_lines

        for line in git_lines(git):
            print(line)
    _table(
        [("HOST", "ALIVE", "LABELS", "CAPSULES")]
        + [
            (
                h["id"],
                ("draining" if h["draining"] else "yes") if h["alive"] else "no",
                ",".join(f"{k}={v}" for k, v in sorted(h["labels"].items())) or "-",
                str(h["capsules"]),
            )
            for h in status["hosts"]
        ]
    )
    print()
    _table(
        [("CAPSULE", "PHASE", "HOSTS", "WANT", "VERSION", "NOTE")]
        + [
            (
                c["name"],
                c["phase"],
                ",".join(c["hosts"]) or "-",
                str(c["wanted"]),
                (c["version"] or "-")[:12] + (" (pinned)" if c.get("pinned") else ""),
                " ".join(str(c.get("message") or "").split())[:100],
            )
            for c in status["capsules"]
        ]
    )
    for problem in status.get("problems", []):
        print(f"! {' '.join(str(problem).split())[:300]}")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def run_plan(args: argparse.Namespace) -> int:
    """`orch plan CONFIG --lattice URL [--json] [--exit-code]`: what applying CONFIG would
    change against the lattice's current desired revision."""
    import asyncio

    from ..control.gitsource import is_git_source
    from ..desired.load import load_desired

    try:
        address = address_of(args)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE)
    try:
        if is_git_source(args.config):
            from .revisions import git_revision

            with git_revision(args.config, state_dir=DEFAULT_STATE_DIR) as (desired, _commit):
                result = asyncio.run(lattice_plan(address, desired))
        else:
            result = asyncio.run(lattice_plan(address, load_desired(Path(args.config))))
    except ConfigError as error:
        return print_problems(args.config, [str(p) for p in error.problems])
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_FAILED)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        print(f"against lattice {address.name} revision {result['revision'] or '(none)'}:")
        print_actions(result["actions"], colors=args.colors)
    if getattr(args, "exit_code", False):
        return 2 if any(a["action"] != "keep" for a in result["actions"]) else EXIT_OK
    return EXIT_OK


async def lattice_plan(address: Any, desired: Any) -> dict[str, Any]:
    """`{"actions": [...], "revision": N}`: the plan from the lattice's current desired
    revision (N, 0 when none) to `desired` (a DesiredState)."""
    from ..desired.plan import plan
    from ..lattice.connection import Lattice
    from ..lattice.desiredstate import current

    lattice = await Lattice.connect(address)
    try:
        doc = await current(lattice)
    finally:
        await lattice.close()
    actions = plan(desired.specs, doc.specs() if doc else {}).to_dict()["actions"]
    return {"actions": actions, "revision": doc.revision if doc else 0}
