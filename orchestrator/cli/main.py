"""The `orch` command.

    orch wasm call FILE FUNCTION [--input TEXT | --input -] [--config KEY=VALUE]...
                   [--fuel N] [--timeout-ms N] [--memory-mib N] [--wasi]
                   [--cache-dir DIR] [--stats]
    orch capsule check DIR
    orch capsule call DIR TOOL [JSON | -] [--state-dir DIR] [--workspace DIR] [--config KEY=VALUE]...
    orch up [CONFIG] [--log-format text|json] [--no-watch] [--dash]
    orch dash [CONFIG] [--socket PATH]
    orch validate [CONFIG]
    orch plan [CONFIG] [--json] [--exit-code]

`wasm call` is like `extism call`: the output bytes go to stdout; a failed call prints one
line to stderr and exits 1; bad usage or an unreadable or invalid module exits 2;
`--stats` prints `{"fuel_used": N, "seconds": S}` to stderr.

The only module that prints, and the only one that configures logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import OrchestratorError
from . import author
from .output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail, one_line, print_problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orch", description="A declarative WebAssembly capsule orchestrator.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND")

    wasm = verbs.add_parser("wasm", help="run a plain Extism plugin (no manifest)")
    wasm_verbs = wasm.add_subparsers(title="wasm commands", metavar="COMMAND")
    call = wasm_verbs.add_parser("call", help="call one function of a plugin, like `extism call`")
    call.add_argument("file", help="the .wasm (or .wat) file")
    call.add_argument("function", help="the exported function to call")
    call.add_argument("--input", default="", metavar="TEXT", help="input text; '-' reads stdin as bytes")
    call.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="a config value (repeatable)")
    call.add_argument("--fuel", type=_positive, help="fuel budget per call (default 1e9)")
    call.add_argument("--timeout-ms", type=_positive, help="wall-clock limit per call (default 5000)")
    call.add_argument("--memory-mib", type=_positive, help="memory cap per linear memory (default 64)")
    call.add_argument("--wasi", action="store_true", help="provide WASI preview 1 (nothing granted)")
    call.add_argument("--cache-dir", type=Path, help="on-disk compiled-module cache")
    call.add_argument("--stats", action="store_true", help='print {"fuel_used", "seconds"} to stderr')
    call.set_defaults(run=author.wasm_call)

    capsule = verbs.add_parser("capsule", help="check or call one capsule folder (for capsule authors)")
    capsule_verbs = capsule.add_subparsers(title="capsule commands", metavar="COMMAND")
    check = capsule_verbs.add_parser("check", help="validate a capsule and show what it may touch")
    check.add_argument("dir", type=Path, help="the capsule folder (with Capsule.toml)")
    check.set_defaults(run=author.capsule_check)
    ccall = capsule_verbs.add_parser("call", help="load a capsule once and call one of its tools")
    ccall.add_argument("dir", type=Path, help="the capsule folder (with Capsule.toml)")
    ccall.add_argument("tool", help="the tool's name")
    ccall.add_argument("arguments", nargs="?", default="", metavar="JSON", help="the arguments; '-' reads stdin")
    ccall.add_argument("--state-dir", type=Path, default=Path(".orch"), help="KV database and module cache")
    ccall.add_argument("--workspace", type=Path, default=Path("."), help="root of cwd:// paths")
    ccall.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="a config value (repeatable)")
    ccall.set_defaults(run=author.capsule_call)

    up = verbs.add_parser("up", help="run the orchestrator on a config.yaml, in the foreground")
    up.add_argument("config", nargs="?", type=Path, default=Path("config.yaml"), help="default: ./config.yaml")
    up.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="json: every bus event as a JSON line"
    )
    up.add_argument("--no-watch", action="store_true", help="do not watch files (apply once, then serve)")
    up.add_argument(
        "--no-builds", action="store_true", help="never run capsules' [build] commands (config.yaml: builds: false)"
    )
    up.add_argument("--dash", action="store_true", help="show the dashboard in this terminal; quitting it stops")
    up.set_defaults(run=_up)

    dash = verbs.add_parser("dash", help="the terminal dashboard of a running orchestrator")
    dash.add_argument("config", nargs="?", type=Path, default=Path("config.yaml"), help="find the socket from it")
    dash.add_argument("--socket", type=Path, help="the control socket (instead of CONFIG)")
    dash.set_defaults(run=_dash)

    validate = verbs.add_parser("validate", help="check a config.yaml and every capsule it names")
    validate.add_argument("config", nargs="?", type=Path, default=Path("config.yaml"))
    validate.set_defaults(run=_validate)

    from .remote import add_commands

    add_commands(verbs)

    plan = verbs.add_parser("plan", help="what applying a config.yaml would change")
    plan.add_argument("config", nargs="?", type=Path, default=Path("config.yaml"))
    plan.add_argument("--json", action="store_true", help='print {"actions": [...]}')
    plan.add_argument("--exit-code", action="store_true", help="exit 0: no changes, 2: changes, 1: errors")
    plan.set_defaults(run=_plan)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _validate(args: argparse.Namespace) -> int:
    from ..capsule.kvfile import check_database
    from ..control.statedir import KV_DATABASE, check_state_dir
    from ..desired.config import LoadedConfig
    from ..desired.load import load_desired
    from ..errors import ConfigError, Problem

    problems: list[Problem] = []
    config: LoadedConfig | None = None
    try:
        desired = load_desired(args.config)
        config = desired.config
    except ConfigError as error:
        problems = list(error.problems)
        config = error.partial if isinstance(error.partial, LoadedConfig) else None
    if config is not None:
        trouble = check_state_dir(config.state_dir)
        if trouble is None and (config.state_dir / KV_DATABASE).is_file():
            trouble = check_database(config.state_dir / KV_DATABASE)
        if trouble is not None:
            line = config.line_of("state_dir")
            problems.append(Problem(trouble, file=str(config.path), line=line, field="state_dir"))
    if problems:
        return print_problems(args.config, [str(p) for p in problems])
    enabled = sum(1 for s in desired.specs.values() if s.enabled)
    print(f"{args.config}: valid ({len(desired.specs)} capsules, {enabled} enabled)")
    return EXIT_OK


def _plan(args: argparse.Namespace) -> int:
    """The plan of the running orchestrator when there is one, else against applied.json."""
    import asyncio

    from ..control.statedir import SOCKET, read_applied
    from ..desired.load import load_desired
    from ..desired.plan import plan
    from ..errors import ConfigError
    from .remote import remote_plan

    try:
        desired = load_desired(args.config)
    except ConfigError as error:
        print_problems(args.config, [str(p) for p in error.problems])
        return EXIT_FAILED
    remote = asyncio.run(remote_plan(desired.config.state_dir / SOCKET))
    if remote is not None:
        actions = remote["actions"]
    else:
        actions = plan(desired.specs, read_applied(desired.config.state_dir)).to_dict()["actions"]
    has_changes = any(a["action"] != "keep" for a in actions)
    if args.json:
        print(json.dumps({"actions": actions}, indent=2))
    else:
        from .remote import print_actions

        print_actions(actions)
    if args.exit_code:
        return 2 if has_changes else EXIT_OK
    return EXIT_OK


def _up(args: argparse.Namespace) -> int:
    import asyncio

    from .up import run_up

    dashboard = None
    if args.dash and not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("orch: --dash needs a terminal; running without the dashboard", file=sys.stderr)
    elif args.dash:
        from tui import run_dashboard  # only `orch up --dash` and `orch dash` load Textual

        dashboard = run_dashboard
    return asyncio.run(
        run_up(
            args.config,
            log_format=args.log_format,
            watch=not args.no_watch,
            builds=not args.no_builds,
            dashboard=dashboard,
        )
    )


def _dash(args: argparse.Namespace) -> int:
    import asyncio

    from ..api.client import socket_for

    try:
        socket = socket_for(args.config, args.socket)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE)
    from tui import run_dashboard

    asyncio.run(run_dashboard(socket))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
