"""`orch up` in a terminal: run the orchestrator in the foreground and print its events.

With `--log-format json` every bus event goes to stdout as one JSON object per line
(`topic`, `payload`, `source`, `seq`, `timestamp_ms`), for scripts to follow; logs go to
stderr. With `text` (the default) events are printed as short readable lines. Output never
blocks the orchestrator: a reader that stops reading loses lines, counted (cli.printer).

Start-up: the state dir is checked and locked and the control API served before any
capsule loads; the capsules then load (concurrently, dependencies first) while it serves,
showing as Starting.

SIGINT or SIGTERM starts a phased shutdown with a deadline and the process exits 0; a
second signal exits at once (status 130). Part of the CLI layer: it prints.

With a `dashboard` (`orch up --dash`: the CLI passes `tui.run_dashboard`, so this module
never imports Textual), nothing is printed while it runs: the dashboard owns the terminal
as a client of the control socket, and quitting it shuts down as a signal does.

The source is a config.yaml, or a git branch to follow (`git+URL#BRANCH:PATH`, see
control.follow): then `--state-dir` (default ./.orch) and `--workspace` (default: the
current folder) say where its state and its `cwd://` root are, `--interval` how often it
fetches (default 30 s), and builds run only with `--allow-builds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..api.server import ControlServer
from ..capsule.bus import Event, Subscription
from ..control.follow import DEFAULT_INTERVAL_S, GitFollower, RevisionRejected
from ..control.gitsource import GitRef, is_git_source
from ..control.runtime import Orchestrator
from ..control.statedir import DEFAULT_STATE_DIR, LOG
from ..errors import ConfigError, OrchestratorError
from .output import clip
from .printer import LinePrinter

SHUTDOWN_SECONDS = 10.0
PAYLOAD_CHARS = 200  # an event's payload in a text line; longer ones are cut, with a marker
logger = logging.getLogger(__name__)


GIT_OPTIONS = ("state_dir", "workspace", "interval", "allow_builds")


def up_source(args: Any) -> Path | GitFollower:
    """What `orch up` runs: the config file, or a follower of the git branch `args.config`
    names (with its options). Raises OrchestratorError (a usage error) saying what is wrong."""
    text = str(args.config)
    if not is_git_source(text):
        given = [f"--{name.replace('_', '-')}" for name in GIT_OPTIONS if getattr(args, name, None)]
        if given:
            raise OrchestratorError(
                f"{', '.join(given)}: for a git source (git+URL#BRANCH:PATH) only; "
                f"a config.yaml names its own state_dir and workspace"
            )
        return Path(text)
    if args.workspace is not None and not args.workspace.is_dir():
        raise OrchestratorError(f"--workspace {args.workspace}: no such folder; create it, or choose another")
    return GitFollower(
        GitRef.parse(text),
        state_dir=args.state_dir or Path(DEFAULT_STATE_DIR),
        workspace=args.workspace or Path.cwd(),
        interval=args.interval or DEFAULT_INTERVAL_S,
    )


async def run_up(
    config: Path | GitFollower,
    *,
    log_format: str = "text",
    watch: bool = True,
    builds: bool = True,
    dashboard: Callable[..., Awaitable[None]] | None = None,
) -> int:
    if isinstance(config, GitFollower):  # following a branch: builds only if allowed (`builds`)
        orchestrator = Orchestrator(follow=config, builds=builds)
    else:
        orchestrator = Orchestrator(config, watch=watch, builds=builds)
    out = LinePrinter()
    events = orchestrator.bus.subscribe(">", queue_size=100_000)
    if dashboard is not None:
        events.close()  # the dashboard shows the events: nothing may print over it
    printer = asyncio.get_running_loop().create_task(_print_events(events, log_format, out))
    stop = asyncio.Event()
    _install_signals(stop)
    server: ControlServer | None = None
    try:
        await orchestrator.prepare()  # the state dir is locked before anything starts
        assert orchestrator.state is not None
        server = ControlServer(orchestrator, state_dir=orchestrator.state.path)
        await server.start()  # served from here on: capsules show as Starting while they load
    except OrchestratorError as error:
        await orchestrator.stop(SHUTDOWN_SECONDS)
        events.close()
        await printer
        out.close()
        _report(config, error)
        return 1
    first = asyncio.get_running_loop().create_task(_first_apply(orchestrator, server, log_format, dashboard, out))
    if dashboard is not None:  # until it quits (`q`), or a signal sets `stop`
        await dashboard(server.path, stop=stop, log_file=server.path.parent / LOG)
    else:
        await stop.wait()
    if log_format == "text":
        out.write("orch: stopping...")
    first.cancel()  # (the record of what was applied is written whole: the runtime shields it)
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await server.stop()
    await orchestrator.stop(SHUTDOWN_SECONDS)
    events.close()
    with contextlib.suppress(asyncio.CancelledError):
        await printer
    out.close()
    return 0


async def _first_apply(
    orchestrator: Orchestrator,
    server: ControlServer,
    log_format: str,
    dashboard: Callable[..., Awaitable[None]] | None,
    out: LinePrinter,
) -> None:
    """Apply the first plan while the API serves, then say what runs."""
    await orchestrator.run()
    # What start-up built (engines, modules, a thousand capsules' state) lives as long as
    # the process: keep it out of the cyclic collector's full passes, each of which would
    # otherwise stall the event loop (~150 ms with 1,000 capsules) in the middle of a reload.
    gc.collect()
    gc.freeze()
    if log_format == "text" and dashboard is None:
        assert orchestrator.reconciler is not None
        running = sum(1 for status in orchestrator.reconciler.status() if status["phase"] == "Running")
        follow = orchestrator.follow
        where, how = str(orchestrator.config_path), "; watching for changes" if orchestrator.watch else ""
        if follow is not None:
            where = f"{follow.ref} @ {(follow.applied_revision or 'none')[:12]}"
            how = f"; fetching every {follow.interval:g} s"
        out.write(
            f"orch: {running} capsule(s) running from {where}{how}; control API on {server.path}. Ctrl+C to stop."
        )


def _report(config: Path | GitFollower, error: OrchestratorError) -> None:
    shown = str(config.ref if isinstance(config, GitFollower) else config)
    if isinstance(error, ConfigError):
        what = f"{len(error.problems)} problem(s)"
        if isinstance(error, RevisionRejected):
            what = f"revision {error.revision[:12]} is rejected, {what}"
        print(f"orch: {shown}: {what}; nothing started", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
    else:
        print(f"orch: {error}", file=sys.stderr)


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(number: int) -> None:
        if stop.is_set():
            print("orch: second signal: exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        stop.set()

    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, on_signal, number)


async def _print_events(events: Subscription, log_format: str, out: LinePrinter) -> None:
    """Every event as a line, through the non-blocking printer (scripts follow it line by line)."""
    async for event in events:
        if log_format == "json":
            out.write(json.dumps(event.to_dict(), ensure_ascii=False, default=str))
        else:
            out.write(describe(event))


def describe(event: Event) -> str:
    """One readable line for an event."""
    clock = time.strftime("%H:%M:%S", time.localtime(event.timestamp_ms / 1000))
    payload: Any = event.payload
    parts = event.topic.split(".")
    if event.topic.startswith("orch.capsule.") and len(parts) == 4 and isinstance(payload, dict):
        name, what = parts[2], parts[3]
        detail = ""
        if what in ("running", "reloaded"):
            detail = f" version {payload.get('version')}"
        elif what in ("failed", "degraded"):
            detail = f": {payload.get('last_error')}"
            if payload.get("next_retry_ms"):
                wait = max(0.0, payload["next_retry_ms"] / 1000 - time.time())
                detail += f" (retry in {wait:.1f} s)"
        elif what == "build_failed":
            detail = f" (exit {payload.get('exit_code')}):\n{payload.get('output', '')}"
        elif what == "awaitingapproval":
            awaiting = payload.get("awaiting")
            grants = (_listed(awaiting.get("escalations")) if isinstance(awaiting, dict) else "") or "more"
            what = "awaiting approval"
            detail = f": it would grant {grants}; `orch approve {name}` or `orch reject {name}`"
        return f"{clock} {name:<16} {what}{detail}"
    if event.topic.startswith("orch.audit.") and isinstance(payload, dict):
        grants = _listed(payload.get("escalations"))
        capsule = str(payload.get("capsule"))
        if event.topic == "orch.audit.rejected":
            return f"{clock} {capsule:<16} rejected: {grants} (by the operator)"
        by = payload.get("granted_by")
        return f"{clock} {capsule:<16} " + (f"granted {grants} (by the {by})" if by else f"asks for {grants}")
    if event.topic == "orch.reconcile.started" and isinstance(payload, dict):
        actions = ", ".join(f"{a['action']} {a['capsule']}" for a in payload.get("actions", []))
        return f"{clock} reconcile        {actions}"
    if event.topic == "orch.reconcile.finished" and isinstance(payload, dict):
        failing, awaiting = payload.get("failing") or [], payload.get("awaiting") or []
        said = [f"failing: {', '.join(failing)}"] if failing else []
        said += [f"awaiting approval: {', '.join(awaiting)}"] if awaiting else []
        return f"{clock} reconciled       " + ("; ".join(said) or "all healthy")
    if event.topic == "orch.reconcile.rejected" and isinstance(payload, dict):
        return f"{clock} rejected         " + "\n    ".join(payload.get("problems", []))
    text = json.dumps(payload, ensure_ascii=False, default=str)
    return f"{clock} {event.topic} {clip(text, PAYLOAD_CHARS)} (from {event.source})"


def _listed(items: Any) -> str:
    """A list from an event's payload, comma-separated ("" when it is not a list)."""
    return ", ".join(str(item) for item in items) if isinstance(items, list) else ""
