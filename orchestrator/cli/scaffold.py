"""`orch new capsule NAME [--dir DIR]`: a working capsule folder, anywhere.

    orch new capsule NAME [--dir DIR]

Writes, into DIR (default ./NAME; it must not exist, or be empty):

    Capsule.toml          a tool `greet`, a config key, KV and a publish grant, a dev `[build]`
    assembly/index.ts     the tool, written with the SDK; assembly/tsconfig.json for editors
    package.json          build scripts and the exact tool versions the orchestrator's
    package-lock.json     examples are built with (`npm install` reproduces them)
    sdk/                  the guest SDK and its build script, vendored: a local npm package
                          (`"orch-capsule-sdk": "file:sdk"`), so the folder needs nothing of
                          the orchestrator's repository
    config.yaml           a deployment of this one capsule, for `orch up`
    README.md, .gitignore

After `npm install && npm run build` there, `orch capsule check DIR` passes and `orch capsule
call DIR greet '{"name": "Ada"}'` answers. The templates are package data
(`orchestrator/cli/templates/`); `{{name}}` in them is replaced by NAME.

An invalid NAME or a target that is not an empty folder is refused with one line, and nothing
is written. The files are written into a new folder beside the target and moved into place
at the end, so a failure leaves no half-made capsule. Part of the CLI: it prints.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from ..errors import OrchestratorError
from .helptext import verb_help
from .output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail

PLACEHOLDER = "{{name}}"
RENAMED = {"gitignore": ".gitignore"}  # dotfiles are not package data


class ScaffoldError(OrchestratorError):
    """The capsule cannot be created (an existing target, a file system error); one line."""


def add_commands(verbs: Any) -> None:
    """Register `orch new capsule` on the `orch` sub-parser set."""
    new = verbs.add_parser(
        "new", help="create a capsule folder from a template (for capsule authors)", **verb_help("new")
    )
    kinds = new.add_subparsers(title="templates", metavar="KIND")
    capsule = kinds.add_parser(
        "capsule",
        help="a capsule: manifest, a tool in AssemblyScript, the SDK, the build",
        **verb_help("new capsule"),
    )
    capsule.add_argument("name", help="the capsule's name: lowercase letters, digits and '-', at most 64")
    capsule.add_argument(
        "--dir", type=Path, help="the folder to create (default: ./NAME); it must not exist or be empty"
    )
    capsule.set_defaults(run=new_capsule)


def new_capsule(args: argparse.Namespace) -> int:
    name: str = args.name
    problem = name_problem(name)
    if problem is not None:
        return fail(problem, EXIT_USAGE)
    target: Path = args.dir if args.dir is not None else Path(name)
    try:
        written = create_capsule(name, target)
    except ScaffoldError as error:
        return fail(str(error), EXIT_FAILED)
    print(f"created capsule {name} in {target} ({len(written)} files). Next:")
    print(f"  cd {target}")
    print("  npm install && npm run build")
    print("  orch capsule check .")
    print('  orch capsule call . greet \'{"name": "Ada"}\'')
    print("  orch up              # the dev loop: edit assembly/index.ts and save")
    return EXIT_OK


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a capsule, or None."""
    from ..desired.common import NAME  # not at import: building the parser must stay light

    if re.fullmatch(NAME, name):  # not re.match: its `$` would accept a trailing newline
        return None
    shown = repr(name) if len(name) <= 80 else repr(name[:80]) + "..."  # repr: one line, whatever it holds
    return (
        f"invalid capsule name {shown}: use lowercase letters, digits and '-' "
        "(not first or last), at most 64 characters, e.g. 'hello' or 'order-tracker'"
    )


def templates() -> Traversable:
    """The templates folder (package data)."""
    return resources.files(__package__ or "orchestrator.cli") / "templates"


def create_capsule(name: str, target: Path) -> list[Path]:
    """Writes the capsule `name` into `target` (absent or an empty folder); returns the files
    written, relative to it. Raises ScaffoldError, having written nothing into `target`."""
    problem = name_problem(name)
    if problem is not None:
        raise ScaffoldError(problem)
    _check_target(target)
    parent = target.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{name}.new-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as error:
        raise ScaffoldError(f"cannot create {target}: {error.strerror or error}") from None
    try:
        _copy(templates() / "capsule", staging, name)
        _copy(templates() / "sdk", staging / "sdk", None)
        written = [p.relative_to(staging) for p in staging.rglob("*") if p.is_file()]
        _move_into_place(staging, target)
    except OSError as error:
        raise ScaffoldError(f"cannot create {target}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(written)


def _check_target(target: Path) -> None:
    try:
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise ScaffoldError(f"{target} exists and is not a folder: choose another --dir")
        if target.is_dir() and any(target.iterdir()):
            raise ScaffoldError(f"{target} exists and is not empty: choose another --dir (nothing was written)")
    except OSError as error:
        raise ScaffoldError(f"cannot create {target}: {error.strerror or error}") from None


def _copy(source: Traversable, destination: Path, name: str | None) -> None:
    """Copies a template tree; `{{name}}` in its files becomes `name` (when given)."""
    destination.mkdir(exist_ok=True)
    for entry in source.iterdir():
        out = destination / RENAMED.get(entry.name, entry.name)
        if entry.is_dir():
            _copy(entry, out, name)
            continue
        data = entry.read_bytes()
        if name is not None:
            data = data.replace(PLACEHOLDER.encode(), name.encode())
        out.write_bytes(data)


def _move_into_place(staging: Path, target: Path) -> None:
    """Renames the staging folder to `target`, or, when `target` is an empty folder, moves
    the staged entries into it (refusing if something appeared there meanwhile)."""
    if not target.exists():
        os.rename(staging, target)
        return
    _check_target(target)
    for entry in staging.iterdir():
        os.rename(entry, target / entry.name)
