"""Following a git branch: the fetch loop, strict validation of a revision, and the
bookkeeping of which revision was fetched, applied or rejected.

`GitFollower` wraps a `GitSource` (the bare clone in `<state_dir>/git`) for one source,
`git+URL#BRANCH:PATH`. Its caller (the runtime; later `orch apply --lattice` and a lattice
host) drives it: `fetch()` asks the repository where the branch is now, `load(commit)`
checks that revision out into a folder of its own and validates it strictly, and the
caller applies what it returns and says so (`applied(commit)`) or records the rejection
(`rejected_now`). `run(tick)` calls the caller's tick every `interval` seconds.

Strict: unlike local files (where one capsule's broken files hold back that capsule alone),
a revision with any problem — in config.yaml or in any capsule's files — is rejected as a
whole: `RevisionRejected` (a ConfigError) carries the revision and its problems, with
paths written `<commit>:<path in the repository>`. A revision must also be self-contained:
every capsule folder inside the repository. The revision's config.yaml does not choose the
state dir or the workspace (root of `cwd://`): the operator does (`--state-dir`,
`--workspace`), so both stay put from one revision to the next while capsule folders live
in each revision's checkout.

A fetch that fails (the network, a deleted branch) is recorded (`error`) and logged at most
once per `ERROR_LOG_SECONDS`; what runs keeps running. `to_dict()` is the status's
`orchestrator.git` and the `git` record of applied.json:

    {"source", "applied_revision", "applied_at_ms", "fetched_revision", "fetched_at_ms",
     "rejected": null | {"revision", "problems", "count", "at_ms"},
     "error": null | str, "error_at_ms", "interval_s"}

Used by the runtime and the CLI (`orch plan git+...`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..desired import DesiredState, load_desired
from ..desired.config import LoadedConfig, load_config
from ..desired.manifest import Manifest, load_manifest
from ..errors import ConfigError, ManifestError, Problem
from ..throttle import Throttle
from .builds import Builder, sources
from .gitsource import Checkout, GitRef, GitSource, GitSourceError
from .health import MAX_PROBLEMS
from .statedir import APPLIED

logger = logging.getLogger(__name__)

GIT_FOLDER = "git"
DEFAULT_INTERVAL_S = 30.0
ERROR_LOG_SECONDS = 300.0
SHORT = 12
_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")


class RevisionRejected(ConfigError):
    """A revision that is not applied: `revision` (the commit) and every problem found."""

    def __init__(self, revision: str, problems: list[Problem]) -> None:
        super().__init__(problems)
        self.revision = revision


def load_revision(
    checkout: Checkout, *, state_dir: Path, workspace: Path, environ: Mapping[str, str] | None = None
) -> DesiredState:
    """The desired state of one checked-out revision, validated strictly, with the operator's
    state dir and workspace. Raises RevisionRejected. Blocking."""
    try:
        config = load_config(checkout.config, environ=environ)
    except ConfigError as error:
        partial = error.partial if isinstance(error.partial, LoadedConfig) else None
        outside = _outside(partial, checkout) if partial is not None else []
        raise RevisionRejected(checkout.commit, _shown(list(error.problems) + outside, checkout)) from None
    if outside := _outside(config, checkout):  # before reading anything there
        raise RevisionRejected(checkout.commit, _shown(outside, checkout))
    try:
        desired = load_desired(checkout.config, environ=environ, strict=True)
    except ConfigError as error:
        raise RevisionRejected(checkout.commit, _shown(list(error.problems), checkout)) from None
    model = desired.config.model
    if model.state_dir != ".orch" or model.workspace != ".":
        logger.info(
            "revision %s: config.yaml's state_dir and workspace are not used with a git source "
            "(--state-dir %s, --workspace %s decide)",
            checkout.short,
            state_dir,
            workspace,
        )
    return replace(desired, config=replace(desired.config, state_dir=state_dir, workspace=workspace))


def _outside(config: LoadedConfig, checkout: Checkout) -> list[Problem]:
    """A problem for each capsule folder that is not inside the revision's checkout."""
    root = Path(os.path.realpath(checkout.folder))
    problems = []
    for name, deployment in config.model.capsules.items():
        real = Path(os.path.realpath(config.folder(name)))
        if real != root and root not in real.parents:
            problems.append(
                Problem(
                    f"the capsule folder {deployment.path!r} is outside the repository: with a git source "
                    "every capsule folder must be part of the revision (a path relative to config.yaml, inside it)",
                    file=str(config.path),
                    line=config.line_of("capsules", name, "path"),
                    field=f"capsules.{name}.path",
                )
            )
    return problems


def _shown(problems: list[Problem], checkout: Checkout) -> list[Problem]:
    """`problems` with the checkout's folder written as `<commit>:` (git's REV:PATH), in the
    file and in the message: where the problem is in the repository, not in the state dir."""
    prefix, written = str(checkout.folder) + os.sep, f"{checkout.short}:"
    shown = []
    for problem in problems:
        file = problem.file.replace(prefix, written) if problem.file.startswith(prefix) else problem.file
        message = problem.message.replace(prefix, written)
        shown.append(Problem(message, file=file, line=problem.line, field=problem.field))
    return shown


async def build_missing(checkout: Checkout, builder: Builder, *, environ: Mapping[str, str] | None = None) -> None:
    """Run the `[build]` of each capsule of the revision whose module is not in it (the
    repository holds its sources only), in the checkout, and wait for the builds. A failed
    build leaves the module missing: the strict validation that follows rejects the revision."""
    try:
        desired = await asyncio.to_thread(load_desired, checkout.config, environ=environ, strict=False)
    except ConfigError:
        return  # the strict validation reports it
    seen: set[Path] = set()
    for name in desired.config.model.capsules:
        folder = desired.config.folder(name)
        if folder in seen:
            continue
        seen.add(folder)
        manifest = await asyncio.to_thread(_manifest_or_none, folder)
        if manifest is None or manifest.build is None or (folder / manifest.component.file).exists():
            continue
        names = [n for n in desired.config.model.capsules if desired.config.folder(n) == folder]
        found = await asyncio.to_thread(sources, folder, manifest.build)
        if found:  # (a build is known by its `watch` sources: without them, nothing to build from)
            logger.info("revision %s: %s has no module: building it (--allow-builds)", checkout.short, folder)
            builder.changed(folder, manifest.build, found, names)
    await builder.idle()


def _manifest_or_none(folder: Path) -> Manifest | None:
    try:
        return load_manifest(folder)
    except ManifestError:
        return None


def _first_line(error: Exception) -> str:
    if isinstance(error, RevisionRejected):
        return f"revision {error.revision[:SHORT]} is rejected ({len(error.problems)} problem(s))"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def last_applied_revision(state_dir: Path, source: GitRef) -> str | None:
    """The revision of `source` the last orchestrator on `state_dir` applied (applied.json),
    or None: where to start when the branch cannot be fetched or its revision is rejected."""
    try:
        record = json.loads((state_dir / APPLIED).read_text())
        git = record.get("git") or {}
        revision = git.get("applied_revision")
        if git.get("source") == str(source) and isinstance(revision, str) and _SHA.match(revision):
            return revision
    except (OSError, ValueError, AttributeError):
        pass
    return None


class GitFollower:
    """One followed source: fetches, checks out and validates its revisions, and remembers
    what was fetched, applied and rejected. Call from one event loop."""

    def __init__(
        self,
        ref: GitRef,
        *,
        state_dir: Path,
        workspace: Path,
        interval: float = DEFAULT_INTERVAL_S,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.ref = ref
        self.state_dir = Path(os.path.abspath(state_dir))
        self.workspace = Path(os.path.abspath(workspace))
        self.interval = interval
        self.source = GitSource(ref, self.state_dir / GIT_FOLDER)
        self._wall_ms = wall_ms
        self.applied_revision: str | None = None
        self.applied_at_ms: int | None = None
        self.fetched_revision: str | None = None
        self.fetched_at_ms: int | None = None
        self.rejected: dict[str, Any] | None = None
        self.error: str | None = None
        self.error_at_ms: int | None = None
        self.seen: str | None = None  # the last revision applied or rejected
        self.builder: Builder | None = None  # set by the caller that allows builds (`--allow-builds`)
        self._warnings = Throttle(logger, interval=ERROR_LOG_SECONDS)
        self._git = asyncio.Lock()  # one git command at a time on the clone (the interval, reconcile, plan)

    @property
    def folder(self) -> Path:
        """The bare clone and the checkouts: the orchestrator's own files."""
        return self.source.folder

    async def fetch(self) -> str:
        """Fetch the branch; the commit it points at. Raises GitSourceError (recorded,
        logged at most once per ERROR_LOG_SECONDS)."""
        try:
            async with self._git:
                commit = await asyncio.to_thread(self.source.fetch)
        except GitSourceError as error:
            self.error, self.error_at_ms = str(error), self._wall_ms()
            self._warnings.warning("fetch", "%s; the revision running keeps serving", error)
            raise
        if self.error is not None:
            logger.info("fetching %s works again", self.ref)
        self.error, self.error_at_ms = None, None
        self.fetched_revision, self.fetched_at_ms = commit, self._wall_ms()
        return commit

    async def load(self, commit: str, *, environ: Mapping[str, str] | None = None) -> DesiredState:
        """Check `commit` out and validate it strictly. Raises RevisionRejected (a ConfigError:
        the caller records it with `rejected_now`). With a `builder` (`--allow-builds`), the
        capsules whose module the revision lacks are built in its checkout first."""
        try:
            async with self._git:
                checkout = await asyncio.to_thread(self.source.checkout, commit)
        except GitSourceError as error:  # the revision's own files (a link out of it), or the disk
            raise RevisionRejected(commit, [Problem(str(error))]) from None
        if self.builder is not None:
            await build_missing(checkout, self.builder, environ=environ)
        return await asyncio.to_thread(
            load_revision, checkout, state_dir=self.state_dir, workspace=self.workspace, environ=environ
        )

    async def latest(self, *, environ: Mapping[str, str] | None = None) -> DesiredState:
        """`fetch`, then `load` what the branch points at."""
        return await self.load(await self.fetch(), environ=environ)

    async def next_revision(self, *, environ: Mapping[str, str] | None = None) -> DesiredState | None:
        """The fetch interval's question: the branch's revision, validated, when it is one not
        validated yet; None when it is not, or when the fetch fails (recorded and logged).
        Raises RevisionRejected."""
        try:
            commit = await self.fetch()
        except GitSourceError:
            return None
        return None if commit == self.seen else await self.load(commit, environ=environ)

    async def first(self, *, environ: Mapping[str, str] | None = None) -> tuple[DesiredState, RevisionRejected | None]:
        """At start: the branch's revision. When it cannot be fetched or is rejected, the
        revision the last orchestrator on this state dir applied, if usable (with the
        rejection, for the caller to record); else the error is raised."""
        try:
            return await self.latest(environ=environ), None
        except (GitSourceError, RevisionRejected) as error:
            fallback = await self.last_applied(environ=environ)
            if fallback is None:
                raise
            logger.warning(
                "%s; starting from the revision applied last, %s", _first_line(error), self.revision_of(fallback)
            )
            return fallback, error if isinstance(error, RevisionRejected) else None

    async def last_applied(self, *, environ: Mapping[str, str] | None = None) -> DesiredState | None:
        """The revision the last orchestrator on this state dir applied, from the local
        clone (no network), validated again; None when there is none or it cannot be used."""
        commit = await asyncio.to_thread(last_applied_revision, self.state_dir, self.ref)
        if commit is None:
            return None
        try:
            async with self._git:
                checkout = await asyncio.to_thread(self.source.checkout, commit)
            return await asyncio.to_thread(
                load_revision, checkout, state_dir=self.state_dir, workspace=self.workspace, environ=environ
            )
        except (GitSourceError, ConfigError) as error:
            logger.warning("the last applied revision %s cannot be used either: %s", commit[:SHORT], error)
            return None

    def rejected_now(self, error: RevisionRejected) -> None:
        problems = [str(p) for p in error.problems]
        self.rejected = {
            "revision": error.revision,
            "problems": problems[:MAX_PROBLEMS],
            "count": len(problems),
            "at_ms": self._wall_ms(),
        }
        self.seen = error.revision

    def revision_of(self, desired: DesiredState) -> str | None:
        """The commit `desired` was read from (its config file lies in that checkout)."""
        return self.source.commit_of(desired.config.path)

    def applied(self, commit: str) -> None:
        """`commit` now runs: it is the applied revision, and a rejection is over."""
        if self.rejected is not None:
            logger.info(
                "revision %s applied; the rejected revision %s is behind it", commit[:SHORT], self.rejected["revision"]
            )
        self.applied_revision, self.applied_at_ms, self.rejected = commit, self._wall_ms(), None
        self.seen = commit

    def prune(self, folders: Iterable[str]) -> None:
        """Remove old checkouts, keeping the applied one and those of `folders` (the folders
        of the versions serving now). Blocking."""
        keep = {c for f in folders if (c := self.source.commit_of(Path(f))) is not None}
        if self.applied_revision is not None:
            keep.add(self.applied_revision)
        self.source.prune(keep)

    async def run(self, tick: Callable[[], Awaitable[None]]) -> None:
        """Call `tick` every `interval` seconds (counted from the end of the last one), until
        cancelled. A tick that fails is logged; the next one comes all the same."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("following %s: the fetch interval's work failed", self.ref)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.ref),
            "applied_revision": self.applied_revision,
            "applied_at_ms": self.applied_at_ms,
            "fetched_revision": self.fetched_revision,
            "fetched_at_ms": self.fetched_at_ms,
            "rejected": self.rejected,
            "error": self.error,
            "error_at_ms": self.error_at_ms,
            "interval_s": self.interval,
        }
