"""Race-free file access beneath a directory: resolve and act in one step, never by path twice.

A path that is checked and then opened by name can be swapped in between (a folder replaced
by a symlink to elsewhere), and the swap wins the race. Here nothing is checked by path and
then opened by path. Every operation walks from a descriptor of the workspace, one component
at a time, with `openat(..., O_NOFOLLOW)` relative to the descriptor of the folder it has
already opened, and acts on the last component relative to its parent's descriptor
(`os.open`/`os.stat`/`os.mkdir`/`os.rename` with `dir_fd`, `os.scandir` of a descriptor).
A symlink is never followed by the kernel: the walk reads it (`readlink` at the parent's
descriptor) and splices a *relative* target into the components still to walk; `..` in a
target goes back to a descriptor the walk already holds. So a swap can make an operation
fail or be denied, but never reach anything the walk did not decide to reach.

The policy is the caller's (orchestrator.capsule.gate), given as a `Place`:

- `base`: the workspace's real path, where every walk starts (opened with O_NOFOLLOW);
- `parts`: the components below it: the grant's real components, then the guest's;
- `floor`: how many of `parts` are the grant. Those must be real folders (the grant's last
  component may be a file): a symlink there is an `Escape("grant_link")`, never followed.
  Below them, relative symlinks are followed while they stay beneath the grant: a `..`
  that would climb out of it is `Escape("leaves")`, an absolute target `Escape("absolute")`,
  more than `MAX_SYMLINKS` links `Escape("loop")`;
- `guard`: called with the real components (below `base`) of every entry before the walk
  touches it, and with `()` for the workspace itself: a reason when it is protected (the
  walk then stops with `Escape("protected", reason)`); `list_dir` leaves such entries out;
- `deny`: turns an `Escape` into the exception to raise (a `CapabilityDenied`).

Linux: intermediate folders are opened `O_PATH` (no read permission needed, as with the
kernel's own lookup). Elsewhere `O_RDONLY` is used. `openat2(RESOLVE_BENEATH)` is not used:
the walk must see each component to keep protected entries out, which the kernel's own
resolution would hide.

Operations: `open_file` (a descriptor of the entry, opened O_NONBLOCK so a FIFO never
hangs), `list_dir`, `stat`, `replace_file` (a temp file created O_EXCL|O_NOFOLLOW in the
parent's descriptor, renamed over the target with both descriptors; missing folders are
created on the way with `mkdir` at the parent's descriptor), and `resolve` (the real path a
walk reaches, without opening the last entry; advisory, for display and tests).

Used by the gate (`PathGate.place` builds the `Place`) and the file airlocks. Imports
nothing of ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat as statmod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MAX_SYMLINKS = 40  # as Linux's MAXSYMLINKS
MAX_RETRIES = 100  # an entry that keeps changing kind while we look at it

_O_PATH = getattr(os, "O_PATH", 0)
_DIR_FLAGS = (_O_PATH or os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_NAME_BYTES = 100  # of the target's name kept in the temp file's name (NAME_MAX is 255)

EscapeKind = Literal["leaves", "absolute", "loop", "protected", "grant_link"]


class Escape(Exception):
    """Why a walk stopped before leaving its bounds (the caller turns it into a denial).

    `link` is the real components (below `base`) of the symlink involved, if any; `target`
    its target; `reason` the guard's reason for "protected".
    """

    def __init__(self, kind: EscapeKind, *, link: tuple[str, ...] = (), target: str = "", reason: str = "") -> None:
        super().__init__(kind)
        self.kind: EscapeKind = kind
        self.link = link
        self.target = target
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Place:
    """A guest path, decided by the gate: where to walk and under which rules."""

    base: Path
    parts: tuple[str, ...]
    floor: int
    guard: Callable[[tuple[str, ...]], str | None]
    deny: Callable[[Escape], Exception]


class _Retry(Exception):
    """The entry changed kind between two looks: walk it again."""


class _Walk:
    """One walk: the descriptors it holds (`fds[0]` is the base), the real names below the
    base (`names[i]` is `fds[i + 1]`), and the components still to walk (a stack)."""

    def __init__(self, place: Place, *, create: bool = False) -> None:
        self.place = place
        self.create = create
        self.fds: list[int] = []
        self.names: list[str] = []
        self.todo: list[str] = list(reversed(place.parts)) or ["."]  # no parts: the base itself
        self.links = 0
        self.retries = 0
        self.current = ""  # the component being walked when an error stopped the walk

    def __enter__(self) -> _Walk:
        self._guard(())
        self.fds.append(os.open(self.place.base, _DIR_FLAGS))
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    # -- the rules ---------------------------------------------------------------------------
    def _escape(self, escape: Escape) -> Exception:
        return self.place.deny(escape)

    def _guard(self, rel: tuple[str, ...]) -> None:
        reason = self.place.guard(rel)
        if reason is not None:
            raise self._escape(Escape("protected", reason=reason))

    def _retry(self) -> None:
        self.retries += 1
        if self.retries > MAX_RETRIES:
            raise OSError(errno.EAGAIN, "the path kept changing while it was being opened")

    # -- walking -----------------------------------------------------------------------------
    def parent_of_last(self) -> tuple[int, str]:
        """Walk every component but the last; (descriptor of its folder, last name).

        The last name is "." when the walk ends on a folder it holds (the workspace, or
        after a `..`). Every name returned or entered has passed the guard.
        """
        while True:
            name = self.todo.pop()
            self.current = name
            if name in ("", "."):
                if not self.todo:
                    return self.fds[-1], "."
                continue
            if name == "..":  # only ever from a symlink's target: the guest's `..` is denied
                if len(self.names) - 1 < self.place.floor:
                    raise self._escape(Escape("leaves"))
                os.close(self.fds.pop())
                self.names.pop()
                if not self.todo:
                    return self.fds[-1], "."
                continue
            self._guard((*self.names, name))
            if not self.todo:
                return self.fds[-1], name
            try:
                self._enter(name)
            except _Retry:
                self.todo.append(name)

    def _enter(self, name: str) -> None:
        parent = self.fds[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not self.create:
                raise
            with contextlib.suppress(FileExistsError):  # made meanwhile: fine, walk it
                os.mkdir(name, 0o777, dir_fd=parent)  # the umask applies
            self._retry()
            raise _Retry from None
        except OSError as error:
            if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            if not self.follow(name):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
            return
        self.fds.append(fd)
        self.names.append(name)

    def follow(self, name: str) -> bool:
        """`name` (in the folder on top) was refused as a symlink: when it is one, splice its
        target into the walk and return True. True also when it changed kind meanwhile (it is
        walked again); False when it is something else (a file where a folder was needed)."""
        parent = self.fds[-1]
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            self._retry()
            self.todo.append(name)
            return True
        if not statmod.S_ISLNK(info.st_mode):
            if statmod.S_ISDIR(info.st_mode):  # swapped back to a folder: look again
                self._retry()
                self.todo.append(name)
                return True
            return False
        link = (*self.names, name)
        if len(self.names) < self.place.floor:
            raise self._escape(Escape("grant_link", link=link))
        try:
            target = os.readlink(name, dir_fd=parent)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOENT):
                raise
            self._retry()  # no longer a symlink: look again
            self.todo.append(name)
            return True
        self.links += 1
        if self.links > MAX_SYMLINKS:
            raise self._escape(Escape("loop", link=link, target=target))
        if target.startswith("/"):
            raise self._escape(Escape("absolute", link=link, target=target))
        self.todo.extend(reversed(target.split("/")))
        return True

    def follow_last(self, name: str) -> None:
        """The last component is (or was) a symlink: walk on into its target."""
        if not self.follow(name):
            self._retry()
            self.todo.append(name)

    def real(self, name: str) -> tuple[str, ...]:
        """The real components (below the base) of entry `name` of the folder on top."""
        return tuple(self.names) if name == "." else (*self.names, name)

    def lexical(self) -> tuple[str, ...]:
        """What is left once a component is missing: its rest, taken literally (as
        realpath does), `..` still bounded by the floor and every name still guarded."""
        names = list(self.names)
        for name in [self.current, *reversed(self.todo)]:
            if name in ("", "."):
                continue
            if name == "..":
                if len(names) - 1 < self.place.floor:
                    raise self._escape(Escape("leaves"))
                names.pop()
                continue
            self._guard((*names, name))
            names.append(name)
        self.todo.clear()
        return tuple(names)


# -- operations ------------------------------------------------------------------------------


def resolve(place: Place) -> Path:
    """The real path the walk reaches, without opening the last entry. Missing parts (and
    parts that cannot be looked at) are appended as given. Advisory: between this answer
    and any later use by path, anything can change; the operations below do not have that
    gap."""
    walk = _Walk(place)
    try:
        with walk:
            while True:
                parent, name = walk.parent_of_last()
                if name == ".":
                    return place.base.joinpath(*walk.names)
                try:
                    info = os.stat(name, dir_fd=parent, follow_symlinks=False)
                except OSError:
                    return place.base.joinpath(*walk.names, name)
                if not statmod.S_ISLNK(info.st_mode):
                    return place.base.joinpath(*walk.names, name)
                walk.follow_last(name)
    except OSError:  # the descriptors are closed; what was walked is still known
        return place.base.joinpath(*walk.lexical())


def open_file(place: Place) -> int:
    """A descriptor of the entry, opened O_RDONLY|O_NONBLOCK without following a symlink
    the walk did not decide to follow. The caller checks its kind (fstat) and closes it."""
    with _Walk(place) as walk:
        while True:
            parent, name = walk.parent_of_last()
            try:
                return os.open(name, _READ_FLAGS, dir_fd=parent)
            except OSError as error:
                if error.errno != errno.ELOOP:
                    raise
            walk.follow_last(name)


def stat(place: Place) -> os.stat_result:
    """The entry's status, symlinks followed by the walk (not by the kernel)."""
    with _Walk(place) as walk:
        while True:
            parent, name = walk.parent_of_last()
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not statmod.S_ISLNK(info.st_mode):
                return info
            walk.follow_last(name)


def list_dir(place: Place) -> list[str]:
    """The names in the folder, sorted, without the entries the guard protects."""
    with _Walk(place) as walk:
        while True:
            parent, name = walk.parent_of_last()
            try:
                fd = os.open(name, _LIST_FLAGS, dir_fd=parent)
            except OSError as error:
                if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                if not walk.follow(name):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
                continue
            try:
                folder = walk.real(name)
                with os.scandir(fd) as entries:
                    names = [entry.name for entry in entries]
            finally:
                os.close(fd)
            return sorted(entry for entry in names if place.guard((*folder, entry)) is None)


def replace_file(place: Place, data: bytes, *, mode: int) -> None:
    """Write `data` to a new file beside the entry and rename it over the entry (readers see
    the old file or the new one). An existing file keeps its mode; a new one gets `mode`.
    Missing folders on the way are created. A symlink as the last entry is followed by the
    walk (the file it leads to is replaced, the link stays)."""
    with _Walk(place, create=True) as walk:
        while True:
            parent, name = walk.parent_of_last()
            if name == ".":
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            try:
                info: os.stat_result | None = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                info = None
            if info is not None and statmod.S_ISLNK(info.st_mode):
                walk.follow_last(name)
                continue
            if info is not None and statmod.S_ISDIR(info.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
            _write_beside(parent, name, data, statmod.S_IMODE(info.st_mode) if info is not None else mode)
            return


def _write_beside(parent: int, name: str, data: bytes, mode: int) -> None:
    stem = os.fsdecode(os.fsencode(name)[:_TEMP_NAME_BYTES])
    for _ in range(100):
        temp = f".{stem}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(temp, _TEMP_FLAGS, 0o600, dir_fd=parent)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(errno.EEXIST, "no free temporary name")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=parent)
        raise
