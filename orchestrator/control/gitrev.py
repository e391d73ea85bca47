"""The git revision a folder's repository is at, read from the repository's files.

The commit comes from the files: `.git/HEAD` names a ref (or is a detached commit); the ref
is a loose file under `refs/` or a line of `packed-refs`. Worktrees (`.git` as a file
pointing at the gitdir) and their shared `commondir` are followed. `GitRevision.current()`
re-reads only when HEAD, the ref or packed-refs changed (compared by stamp), so asking on
every apply costs a few `stat` calls.

`describe()` adds `-dirty` when tracked files differ from the commit. That takes `git
status`, so it runs only when HEAD, the ref, the index or the watched file (config.yaml)
changed since it last ran, and only where blocking is fine (the runtime calls it on a
worker thread); `last` is the most recent answer. `peek()` is for callers on the event
loop: HEAD re-read from its files (a commit made without touching config.yaml shows at
once), `last` while HEAD has not moved, and `stale` says when `describe` should run again.

Used by the runtime (status, applied.json).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ..files import FileStamp

_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
SHORT = 12


def find_gitdir(folder: Path) -> Path | None:
    """The git directory of the repository holding `folder`, or None."""
    for candidate in (folder, *folder.parents):
        dotgit = candidate / ".git"
        if dotgit.is_dir():
            return dotgit
        if dotgit.is_file():
            try:
                text = dotgit.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                return None
            if text.startswith("gitdir:"):
                target = Path(text[len("gitdir:") :].strip())
                return target if target.is_absolute() else (candidate / target).resolve()
            return None
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


class GitRevision:
    """The (short) commit of the repository holding `folder`; None outside a repository."""

    def __init__(self, folder: Path, *, watched: Path | None = None) -> None:
        self.folder = Path(folder)
        self.watched = watched
        self._gitdir: Path | None = None
        self._common: Path | None = None
        self._stamps: tuple[FileStamp | None, ...] | None = None
        self._value: str | None = None
        self._dirty_stamps: tuple[FileStamp | None, ...] | None = None
        self._dirty = False
        self._described: str | None = None  # the commit `last` is about
        self.last: str | None = None

    def _discover(self) -> bool:
        if self._gitdir is None:  # looked up again until found: the repository may come later
            self._gitdir = find_gitdir(self.folder)
            self._common = self._commondir(self._gitdir) if self._gitdir is not None else None
        return self._gitdir is not None

    @staticmethod
    def _commondir(gitdir: Path) -> Path:
        text = _read(gitdir / "commondir")
        if text is None:
            return gitdir
        common = Path(text.strip())
        return common if common.is_absolute() else (gitdir / common).resolve()

    def _watched(self, ref: str | None) -> list[Path]:
        assert self._gitdir is not None and self._common is not None
        paths = [self._gitdir / "HEAD", self._common / "packed-refs"]
        if ref:
            paths += [self._gitdir / ref, self._common / ref]
        return paths

    def current(self) -> str | None:
        """The short commit HEAD points at (re-read only if its files changed)."""
        if not self._discover():
            return None
        assert self._gitdir is not None
        head = _read(self._gitdir / "HEAD")
        ref = head[len("ref:") :].strip() if head is not None and head.startswith("ref:") else None
        stamps = tuple(FileStamp.at(p) for p in self._watched(ref))
        if stamps != self._stamps:  # the value first: a reader that sees the new stamps sees it too
            self._value = self._resolve(head, ref)
            self._stamps = stamps
        return self._value

    def peek(self) -> str | None:
        """What `describe` would say, cheaply (a read and a few `stat` calls, no subprocess:
        fine on the event loop): its last answer while HEAD has not moved since, else the
        new commit without `-dirty` (`stale` is then True until `describe` runs again)."""
        commit = self.current()
        return self.last if commit is not None and commit == self._described else commit

    @property
    def stale(self) -> bool:
        """Whether HEAD moved since `describe` last ran (as of the last `current` or `peek`)."""
        return self._value is not None and self._value != self._described

    def describe(self) -> str | None:
        """The short commit, with `-dirty` when tracked files have changes. Blocking."""
        commit = self.current()
        if commit is None:
            self.last = self._described = None
            return None
        assert self._gitdir is not None
        watched = [*(self._stamps or ()), FileStamp.at(self._gitdir / "index")]
        if self.watched is not None:
            watched.append(FileStamp.at(self.watched))
        stamps = tuple(watched)
        if stamps != self._dirty_stamps:
            self._dirty_stamps = stamps
            self._dirty = _has_changes(self.folder)
        self.last = commit + ("-dirty" if self._dirty else "")
        self._described = commit
        return self.last

    def _resolve(self, head: str | None, ref: str | None) -> str | None:
        assert self._gitdir is not None and self._common is not None
        if head is None:
            return None
        if ref is None:
            sha = head.strip()
            return sha[:SHORT] if _SHA.match(sha) else None
        for base in (self._gitdir, self._common):
            loose = _read(base / ref)
            if loose is not None and _SHA.match(loose.strip()):
                return loose.strip()[:SHORT]
        packed = _read(self._common / "packed-refs") or ""
        for line in packed.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref and _SHA.match(parts[0]):
                return parts[0][:SHORT]
        return None  # an unborn branch (no commit yet)


def _has_changes(folder: Path) -> bool:
    try:
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return status.returncode == 0 and bool(status.stdout.strip())
