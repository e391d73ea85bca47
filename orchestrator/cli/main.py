"""The `orch` command: the parser and dispatch.

    orch [--version] [--color auto|always|never] [-v] COMMAND ...
    orch wasm call FILE FUNCTION [--input TEXT | --input -] [--config KEY=VALUE]...
                   [--fuel N] [--timeout-ms N] [--memory-mib N] [--wasi]
                   [--cache-dir DIR] [--stats]
    orch capsule check DIR
    orch capsule call DIR TOOL [JSON | -] [--state-dir DIR] [--workspace DIR] [--config KEY=VALUE]...
    orch up [CONFIG] [--log-format text|json] [--no-watch] [--no-builds] [--dash]
    orch up git+URL#BRANCH:PATH [--state-dir DIR] [--workspace DIR] [--interval SECONDS]
            [--allow-builds] [--log-format text|json] [--dash]
    orch dash [CONFIG] [--state-dir DIR] [--socket PATH]
    orch dash --lattice URL [--lattice-name N] [--lattice-creds FILE]
    orch validate [CONFIG | git+URL#REV:PATH]
    orch plan [CONFIG | git+URL#REV:PATH] [--json] [--exit-code] [--state-dir DIR] [--socket PATH]
    orch status | describe | call | events | kv | reconcile | restart   (cli.remote)
    orch schema [--config | --manifest]                                  (cli.schema)
    orch completion bash|zsh|fish                                        (cli.completion)

Start-up is most of a short command's time, so building the parser imports nothing beyond
the standard library: each verb's module is imported when that verb runs (`_lazy`), and
the verb modules registering their own sub-commands (`VERB_MODULES`) import nothing heavy
at module level. `--color` and `-v` are accepted before or after the verb.

Every verb is safe under SIGPIPE: when the reader of standard output goes away (`orch
events | head -1`) the command exits 141 without a traceback. Third-party loggers stay at
WARNING unless `-v` (ours at INFO; `-v`: ours DEBUG, theirs INFO; `-vv`: everything DEBUG).

The only modules that print are this package's; this one alone configures logging.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import __version__
from .helptext import verb_help
from .output import COLOR_MODES, EXIT_BROKEN_PIPE, EXIT_USAGE, Colors

VERB_MODULES = ("remote", "history", "approvals", "lattice", "scaffold", "schema", "completion")
"""Modules under orchestrator.cli whose `add_commands(verbs)` registers their verbs, in the
order `orch --help` lists them. They must stay light to import (the parser is built for
every command)."""

OUR_LOGGERS = ("orchestrator", "tui")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            code = _run(argv)
        finally:
            sys.stdout.flush()  # here, not at exit: a closed pipe is caught below
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    args.colors = Colors.choose(args.color)
    args.parser = parser  # the whole parser: `orch completion` generates its scripts from it
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return int(args.run(args))


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def configure_logging(verbose: int) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A verb's handler, imported from orchestrator.cli.<module> only when it runs."""

    def run(args: argparse.Namespace) -> int:
        handler = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        return int(handler(args))

    return run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orch", description="A declarative WebAssembly capsule orchestrator.", **verb_help("")
    )
    parser.add_argument("--version", action="version", version=f"orch {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging: -v ours at DEBUG, -vv everything"
    )
    parser.add_argument("--color", choices=COLOR_MODES, default="auto", help="colour output (default: auto)")
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND")

    wasm = verbs.add_parser("wasm", help="run a plain Extism plugin (no manifest)", **verb_help("wasm"))
    wasm_verbs = wasm.add_subparsers(title="wasm commands", metavar="COMMAND")
    call = wasm_verbs.add_parser(
        "call", help="call one function of a plugin, like `extism call`", **verb_help("wasm call")
    )
    call.add_argument("file", type=Path, help="the .wasm (or .wat) file")
    call.add_argument("function", help="the exported function to call")
    call.add_argument("--input", default="", metavar="TEXT", help="input text; '-' reads stdin as bytes")
    call.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="a config value (repeatable)")
    call.add_argument("--fuel", type=_positive, help="fuel budget per call (default 1e9)")
    call.add_argument("--timeout-ms", type=_positive, help="wall-clock limit per call (default 5000)")
    call.add_argument("--memory-mib", type=_positive, help="memory cap per linear memory (default 64)")
    call.add_argument("--wasi", action="store_true", help="provide WASI preview 1 (nothing granted)")
    call.add_argument("--cache-dir", type=Path, help="on-disk compiled-module cache")
    call.add_argument("--stats", action="store_true", help='print {"fuel_used", "seconds"} to stderr')
    call.set_defaults(run=_lazy("author", "wasm_call"))

    capsule = verbs.add_parser(
        "capsule", help="check or call one capsule folder (for capsule authors)", **verb_help("capsule")
    )
    capsule_verbs = capsule.add_subparsers(title="capsule commands", metavar="COMMAND")
    check = capsule_verbs.add_parser(
        "check", help="validate a capsule and show what it may touch", **verb_help("capsule check")
    )
    check.add_argument("dir", type=Path, help="the capsule folder (with Capsule.toml)")
    check.set_defaults(run=_lazy("author", "capsule_check"))
    ccall = capsule_verbs.add_parser(
        "call", help="load a capsule once and call one of its tools", **verb_help("capsule call")
    )
    ccall.add_argument("dir", type=Path, help="the capsule folder (with Capsule.toml)")
    ccall.add_argument("tool", help="the tool's name")
    ccall.add_argument("arguments", nargs="?", default="", metavar="JSON", help="the arguments; '-' reads stdin")
    ccall.add_argument("--state-dir", type=Path, default=Path(".orch"), help="KV database and module cache")
    ccall.add_argument("--workspace", type=Path, default=Path("."), help="root of cwd:// paths")
    ccall.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="a config value (repeatable)")
    ccall.set_defaults(run=_lazy("author", "capsule_call"))

    up = verbs.add_parser("up", help="run the orchestrator on a config.yaml, in the foreground", **verb_help("up"))
    up.add_argument(
        "config",
        nargs="?",
        default="config.yaml",
        metavar="CONFIG",
        help="a config.yaml (default: ./config.yaml), or git+URL#BRANCH:PATH to follow a branch",
    )
    up.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="json: every bus event as a JSON line"
    )
    up.add_argument("--no-watch", action="store_true", help="do not watch files (apply once, then serve)")
    up.add_argument(
        "--no-builds", action="store_true", help="never run capsules' [build] commands (config.yaml: builds: false)"
    )
    up.add_argument("--dash", action="store_true", help="show the dashboard in this terminal; quitting it stops")
    git = up.add_argument_group("following a git branch (git+URL#BRANCH:PATH)")
    git.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="KV database, module cache, clone (default: ./.orch)"
    )
    git.add_argument("--workspace", type=Path, metavar="DIR", help="root of cwd:// paths (default: the current folder)")
    git.add_argument("--interval", type=_seconds, metavar="SECONDS", help="seconds between fetches (default: 30)")
    git.add_argument("--allow-builds", action="store_true", help="build capsules whose module a revision lacks")
    up.set_defaults(run=_up)

    dash = verbs.add_parser("dash", help="the terminal dashboard of a running orchestrator", **verb_help("dash"))
    dash.add_argument("config", nargs="?", type=Path, help="find the socket from it (default: ./config.yaml)")
    dash.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="the orchestrator's state dir (default: CONFIG's, else ./.orch)"
    )
    dash.add_argument("--socket", type=Path, help="the control socket (instead of CONFIG)")
    from .lattice import add_lattice_options  # light: argparse and the error types

    add_lattice_options(dash)
    dash.set_defaults(run=_dash)

    validate = verbs.add_parser(
        "validate", help="check a config.yaml and every capsule it names", **verb_help("validate")
    )
    validate.add_argument(
        "config", nargs="?", default="config.yaml", metavar="CONFIG", help="default: ./config.yaml; or git+URL#REV:PATH"
    )
    validate.set_defaults(run=_lazy("plan", "validate_verb"))

    plan = verbs.add_parser("plan", help="what applying a config.yaml would change", **verb_help("plan"))
    plan.add_argument(
        "config", nargs="?", default="config.yaml", metavar="CONFIG", help="default: ./config.yaml; or git+URL#REV:PATH"
    )
    plan.add_argument("--json", action="store_true", help='print {"config", "against", "actions": [...]}')
    plan.add_argument("--exit-code", action="store_true", help="exit 0: no changes, 2: changes, 1: errors")
    plan.add_argument("--socket", type=Path, help="compare with the orchestrator on this control socket")
    plan.add_argument("--lattice", metavar="URL", help="compare with the lattice's current revision")
    plan.add_argument("--lattice-name", default="default", metavar="N", help="the lattice's name (default: default)")
    plan.add_argument("--lattice-creds", type=Path, metavar="FILE", help="NATS credentials file (.creds)")
    importlib.import_module(f"{__package__}.lattice").add_tls_options(plan)
    plan.add_argument(
        "--state-dir", type=Path, metavar="DIR", help="for git+...: the state dir compared with (default: ./.orch)"
    )
    plan.set_defaults(run=_lazy("plan", "plan_verb"))

    for name in VERB_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_commands(verbs)
    _accept_everywhere(parser)
    return parser


def _accept_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let every verb take `--color` and `-v` after its name too (`orch status --color
    never`). SUPPRESS as the default: a verb that is not given them keeps the top level's.
    A verb without a description gets its one-line help as one (shown atop its --help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None and helps.get(name):
                    sub.description = str(helps[name])[:1].upper() + str(helps[name])[1:] + "."
                options = {o for a in sub._actions for o in a.option_strings}
                if "--color" not in options:
                    sub.add_argument("--color", choices=COLOR_MODES, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                if "--verbose" not in options and "-v" not in options:
                    sub.add_argument(
                        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS
                    )
                _accept_everywhere(sub)


def _up(args: argparse.Namespace) -> int:
    import asyncio

    from ..errors import OrchestratorError
    from .output import fail, one_line
    from .up import run_up, up_source

    try:
        source = up_source(args)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE, colors=args.colors)

    dashboard = None
    if args.dash and not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("orch: --dash needs a terminal; running without the dashboard", file=sys.stderr)
    elif args.dash:
        from tui import run_dashboard  # only `orch up --dash` and `orch dash` load Textual

        dashboard = run_dashboard
    return asyncio.run(
        run_up(
            source,
            log_format=args.log_format,
            watch=not args.no_watch,
            builds=args.allow_builds if not isinstance(source, Path) else not args.no_builds,
            dashboard=dashboard,
        )
    )


def _dash(args: argparse.Namespace) -> int:
    import asyncio

    from ..errors import OrchestratorError
    from .output import fail, one_line
    from .remote import socket_of

    if args.lattice is not None:
        return _dash_lattice(args)
    try:
        socket = socket_of(args)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE, colors=args.colors)
    from tui import run_dashboard

    asyncio.run(run_dashboard(socket))
    return 0


def _dash_lattice(args: argparse.Namespace) -> int:
    """`orch dash --lattice URL`: the dashboard of a whole lattice (a host column; calls,
    KV and events over NATS). nats and Textual are imported only here."""
    import asyncio

    from ..errors import OrchestratorError
    from .lattice import address_of
    from .output import fail, one_line

    given = [name for name, value in (("CONFIG", args.config), ("--state-dir", args.state_dir)) if value is not None]
    if args.socket is not None:
        given.append("--socket")
    if given:
        return fail(f"--lattice shows a lattice: drop {' and '.join(given)}", EXIT_USAGE, colors=args.colors)
    try:
        address = address_of(args)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_USAGE, colors=args.colors)
    from tui import run_dashboard

    from ..lattice.dashapi import connect_lattice

    where = f"lattice {address.name} at {address.shown}"
    asyncio.run(run_dashboard(connect=connect_lattice(address), where=where))
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0.05 <= value <= 86400:  # (NaN fails too)
        raise argparse.ArgumentTypeError(f"expected seconds between 0.05 and 86400, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
