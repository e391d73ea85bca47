"""A config.yaml that lives in git: `git+URL#REF:PATH/config.yaml`, fetched and checked out.

The orchestrator (or `orch apply --lattice`, or a lattice host) follows a branch: it keeps
a bare clone of the repository in its state dir (`git/repo.git`), fetches the branch on an
interval and on demand, and checks each new revision out into a fresh folder of its own
(`git/checkouts/<sha>`, made with `git archive`: immutable, no worktree bookkeeping), from
which the revision is validated and applied. The last few checkouts are kept (the applied
one and those before it); older ones are removed.

`GitRef.parse` reads the source form: `git+file:///srv/repo.git#main:deploy/config.yaml`,
`git+https://host/org/repo#v1.2:config.yaml` (a branch, a tag or a commit; the path inside
the repository, default `config.yaml`). Every git command runs as a subprocess with a
timeout and a clean environment (no prompts); errors name the repository, the ref and
git's own last line. Blocking: call on a worker thread. Used by the runtime, the CLI
(`orch plan git+...`) and the lattice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import SourceError

logger = logging.getLogger(__name__)

PREFIX = "git+"
GIT_SECONDS = 120.0
KEEP_CHECKOUTS = 5
_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")


class GitSourceError(SourceError):
    """A git source that cannot be used; the message names the repository, ref and cause."""


def is_git_source(text: str) -> bool:
    return str(text).startswith(PREFIX)


@dataclass(frozen=True)
class GitRef:
    """Where the config lives: a repository URL, a ref (branch, tag or commit), a path."""

    url: str
    ref: str
    path: str = "config.yaml"

    @classmethod
    def parse(cls, text: str) -> GitRef:
        """`git+URL#REF:PATH`; GitSourceError saying what is wrong and the expected form."""
        form = "git+URL#BRANCH:PATH/config.yaml (e.g. git+file:///srv/deploy.git#main:config.yaml)"
        if not text.startswith(PREFIX):
            raise GitSourceError(f"{text!r} is not a git source: write {form}")
        url, sep, rest = text[len(PREFIX) :].rpartition("#")
        if not sep or not url:
            raise GitSourceError(f"{text!r} names no branch: write {form}")
        ref, _, path = rest.partition(":")
        path = path or "config.yaml"
        pure = PurePosixPath(path)
        if not ref or ref.startswith("-") or any(c in ref for c in " ~^:?*[\\") or ".." in ref:
            raise GitSourceError(f"{text!r}: {ref!r} is not a branch, tag or commit name")
        if pure.is_absolute() or ".." in pure.parts or "\0" in path:
            raise GitSourceError(f"{text!r}: the path {path!r} must be relative to the repository, without '..'")
        if url.startswith("-"):
            raise GitSourceError(f"{text!r}: the repository URL may not start with '-'")
        return cls(url, ref, str(pure))

    def __str__(self) -> str:
        return f"{PREFIX}{self.url}#{self.ref}:{self.path}"


@dataclass(frozen=True)
class Checkout:
    """One revision, checked out: its commit, its folder and its config file."""

    commit: str
    folder: Path
    config: Path

    @property
    def short(self) -> str:
        return self.commit[:12]


class GitSource:
    """A bare clone of `ref.url` in `folder`, fetched and checked out on request. Blocking."""

    def __init__(self, ref: GitRef, folder: Path) -> None:
        self.ref = ref
        self.folder = Path(folder)
        self.repo = self.folder / "repo.git"
        self.checkouts = self.folder / "checkouts"

    def _git(self, *args: str, capture: bool = True) -> subprocess.CompletedProcess[bytes]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.folder),
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "LC_ALL": "C",
        }
        for name in ("SSH_AUTH_SOCK", "GIT_SSH_COMMAND", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
            if name in os.environ:
                env[name] = os.environ[name]
        try:
            return subprocess.run(
                ["git", *args],
                capture_output=capture,
                env=env,
                timeout=GIT_SECONDS,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise GitSourceError("git is not installed: install git to follow a repository") from None
        except subprocess.TimeoutExpired:
            raise GitSourceError(f"git {args[0]} of {self.ref.url} took over {GIT_SECONDS:g} s") from None

    def _fail(self, what: str, done: subprocess.CompletedProcess[bytes]) -> GitSourceError:
        lines = [line for line in done.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
        cause = lines[-1].strip() if lines else f"exit {done.returncode}"
        return GitSourceError(f"cannot {what} {self.ref.url} ({self.ref.ref}): {cause}")

    def fetch(self) -> str:
        """Clone on first use, fetch `ref`, and return the commit it points at."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not (self.repo / "HEAD").exists():
            done = self._git("init", "--quiet", "--bare", str(self.repo))
            if done.returncode != 0:
                raise self._fail("prepare a clone of", done)
        target = "refs/orch/followed"
        done = self._git(
            "--git-dir", str(self.repo), "fetch", "--quiet", "--force", "--", self.ref.url, f"+{self.ref.ref}:{target}"
        )
        if done.returncode != 0:
            if _SHA.match(self.ref.ref):  # a commit: it may be fetchable only with the branch it is on
                done = self._git("--git-dir", str(self.repo), "fetch", "--quiet", "--", self.ref.url)
                if done.returncode == 0 and self._exists(self.ref.ref):
                    return self.ref.ref
            raise self._fail("fetch", done)
        resolved = self._git("--git-dir", str(self.repo), "rev-parse", "--verify", f"{target}^{{commit}}")
        if resolved.returncode != 0:
            raise self._fail("read what was fetched from", resolved)
        return resolved.stdout.decode().strip()

    def _exists(self, commit: str) -> bool:
        done = self._git("--git-dir", str(self.repo), "cat-file", "-e", f"{commit}^{{commit}}")
        return done.returncode == 0

    def checkout(self, commit: str) -> Checkout:
        """The revision `commit`, in a folder of its own (made once, then reused)."""
        if not _SHA.match(commit):
            raise GitSourceError(f"{commit!r} is not a commit id")
        folder = self.checkouts / commit
        if not folder.is_dir():
            self.checkouts.mkdir(mode=0o700, parents=True, exist_ok=True)
            tar = self.checkouts / f".{commit}.tar"  # on disk, not in memory: a revision may be large
            partial = self.checkouts / f".{commit}.partial"
            try:
                done = self._git("--git-dir", str(self.repo), "archive", "--format=tar", f"--output={tar}", commit)
                if done.returncode != 0:
                    raise self._fail(f"check out {commit[:12]} of", done)
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
                try:
                    with tarfile.open(tar) as archive:
                        archive.extractall(partial, filter="data")  # refuses absolute paths, '..', devices
                except (tarfile.TarError, OSError) as error:
                    raise GitSourceError(f"cannot check out {commit[:12]} of {self.ref.url}: {error}") from None
                os.replace(partial, folder)
            finally:
                with contextlib.suppress(OSError):
                    tar.unlink()
                shutil.rmtree(partial, ignore_errors=True)
        return Checkout(commit, folder, folder / self.ref.path)

    def commit_of(self, path: Path) -> str | None:
        """The commit whose checkout holds `path`, or None."""
        try:
            name = Path(path).relative_to(self.checkouts).parts[0]
        except (ValueError, IndexError):
            return None
        return name if _SHA.match(name) else None

    def prune(self, keep: set[str]) -> None:
        """Remove checkouts other than `keep` and the newest KEEP_CHECKOUTS."""
        if not self.checkouts.is_dir():
            return
        entries = sorted(
            (p for p in self.checkouts.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        for old in entries[:-KEEP_CHECKOUTS]:
            if old.name not in keep:
                with contextlib.suppress(OSError):
                    shutil.rmtree(old)
