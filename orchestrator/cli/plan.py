"""`orch validate` and `orch plan`: a config.yaml checked, and compared with what runs.

    orch validate [CONFIG | git+URL#REV:PATH]
    orch plan [CONFIG | git+URL#REV:PATH] [--json] [--exit-code] [--state-dir DIR] [--socket PATH]

`plan` loads CONFIG here (every capsule it names, hashed) and diffs it with the pure
`desired.plan.plan` against what runs: the specs of the orchestrator serving the state dir
CONFIG names (`GET /v1/specs`), or `--socket`'s; when none runs, the last applied state
recorded in that state dir (applied.json). It always answers for CONFIG, and its first line
(`against` in JSON) says what it compared with. Exit codes with `--exit-code`: 0 no
changes, 2 changes, 1 errors; 3 when `--socket` names no running orchestrator.

CONFIG may be a git revision, `git+URL#REV:PATH` (a branch, a tag or a commit): it is
cloned into a temporary folder, checked out and validated as a following orchestrator
would (strictly, every capsule folder inside the repository), and compared with the
orchestrator (or applied.json) of `--state-dir` (default ./.orch, as `orch up git+...`).

Imported when one of these verbs runs (it loads pydantic through the config loader).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api.blocking import SyncClient
from ..api.client import NotRunning, RemoteError
from ..control.gitsource import is_git_source
from ..control.statedir import APPLIED, DEFAULT_STATE_DIR, SOCKET, read_applied
from ..errors import ConfigError, OrchestratorError
from .output import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, fail, one_line, print_actions, print_problems
from .revisions import git_revision

if TYPE_CHECKING:
    from ..desired import DesiredState
    from ..desired.spec import CapsuleSpec

SPECS_TIMEOUT_S = 30.0
EXIT_CHANGES = 2


def validate_verb(args: argparse.Namespace) -> int:
    from ..capsule.kvfile import check_database
    from ..control.statedir import KV_DATABASE, check_state_dir
    from ..desired.config import LoadedConfig
    from ..desired.load import load_desired
    from ..errors import Problem

    if is_git_source(args.config):
        return _validate_git(args)
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
        return print_problems(args.config, [str(p) for p in problems], colors=args.colors)
    enabled = sum(1 for s in desired.specs.values() if s.enabled)
    print(f"{args.config}: valid ({len(desired.specs)} capsules, {enabled} enabled)")
    return EXIT_OK


def _validate_git(args: argparse.Namespace) -> int:
    try:
        with git_revision(args.config, state_dir=Path(DEFAULT_STATE_DIR)) as (desired, revision):
            enabled = sum(1 for s in desired.specs.values() if s.enabled)
            print(f"{args.config}: revision {revision[:12]} valid ({len(desired.specs)} capsules, {enabled} enabled)")
            return EXIT_OK
    except ConfigError as error:
        return print_problems(args.config, [str(p) for p in error.problems], colors=args.colors)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_FAILED, colors=args.colors)


def plan_verb(args: argparse.Namespace) -> int:
    if getattr(args, "lattice", None):
        from .lattice import run_plan

        return run_plan(args)  # against the lattice's current revision
    if not is_git_source(args.config):
        return _plan_file(args)
    try:
        with git_revision(args.config, state_dir=args.state_dir or Path(DEFAULT_STATE_DIR)) as (desired, revision):
            return _plan(args, desired, revision=revision)
    except ConfigError as error:
        return print_problems(args.config, [str(p) for p in error.problems], colors=args.colors)
    except OrchestratorError as error:
        return fail(one_line(error), EXIT_FAILED, colors=args.colors)


def _plan_file(args: argparse.Namespace) -> int:
    from ..desired.load import load_desired

    if args.state_dir is not None:
        return fail(
            "--state-dir: for a git source only; a config.yaml names its state_dir", EXIT_USAGE, colors=args.colors
        )
    try:
        desired = load_desired(args.config)
    except ConfigError as error:
        return print_problems(args.config, [str(p) for p in error.problems], colors=args.colors)
    return _plan(args, desired)


def _plan(args: argparse.Namespace, desired: DesiredState, *, revision: str | None = None) -> int:
    """Diff `desired` with what runs, print the plan; the exit code."""
    from ..desired.plan import plan

    state_dir = desired.config.state_dir
    socket = args.socket or state_dir / SOCKET
    try:
        actual, against = _running_specs(socket)
    except NotRunning as error:
        if args.socket is not None:
            return fail(str(error), EXIT_NOT_RUNNING, colors=args.colors)
        actual = read_applied(state_dir)
        applied = state_dir / APPLIED
        against = {
            "source": "applied" if applied.is_file() else "nothing",
            "path": str(applied),
            "text": f"the last applied state, {applied}"
            if applied.is_file()
            else f"nothing applied yet (no {applied})",
        }
    except OrchestratorError as error:
        return fail(
            f"cannot compare {args.config} with the orchestrator on {socket}: {one_line(error)}",
            EXIT_FAILED,
            colors=args.colors,
        )
    from ..control.history import saved_pins
    from ..desired.pins import in_force

    pins = in_force(desired.specs, saved_pins(state_dir))  # a rollback's pin overrides the file
    actions = plan(desired.specs, actual, pins=pins).to_dict()["actions"]
    if args.json:
        config = str(desired.config.path) if revision is None else str(args.config)
        shown: dict[str, Any] = {"config": config, "against": {k: against[k] for k in ("source", "path")}}
        if revision is not None:
            shown["revision"] = revision
        print(json.dumps({**shown, "actions": actions}, indent=2, ensure_ascii=False))
    else:
        at = f" (revision {revision[:12]})" if revision is not None else ""
        print(f"plan for {args.config}{at}, against {against['text']}:")
        print_actions(actions, colors=args.colors)
    if args.exit_code and any(a["action"] != "keep" for a in actions):
        return EXIT_CHANGES
    return EXIT_OK


def _running_specs(socket: Path) -> tuple[dict[str, CapsuleSpec], dict[str, str]]:
    """The specs the orchestrator on `socket` runs. Raises NotRunning, RemoteError, or
    OrchestratorError when its answer is not a set of spec records."""
    from ..desired.spec import CapsuleSpec

    with SyncClient(socket, timeout=SPECS_TIMEOUT_S) as api:
        answer: Any = api.specs()
    try:
        records = answer["capsules"]
        specs = {str(name): CapsuleSpec.from_record(record) for name, record in records.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RemoteError(0, "BadAnswer", f"its specs are not readable ({type(error).__name__}: {error})") from None
    return specs, {"source": "orchestrator", "path": str(socket), "text": f"the orchestrator running on {socket}"}
