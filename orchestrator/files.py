"""Reading and writing the orchestrator's own files safely: one helper for each, used everywhere.

`read_regular` reads a file that must be a regular file of bounded size: it opens without
blocking (a FIFO or a device never hangs the caller), refuses anything that is not a
regular file, and never reads past the cap (a symlink to /dev/zero cannot exhaust memory).
Its errors name the file and say what to do; they never quote the file's contents.

`write_atomic` writes a new file beside the target and renames it into place: readers see
the old file or the new one, never half of one, and a file that is memory-mapped (a
compiled module) is never rewritten in place. New files are created 0600 unless a mode is
given.

`FileStamp` is what changes whenever a file is written or replaced (inode, size, mtime,
ctime): comparing stamps tells "untouched since" without reading the file.

Used by the desired-state loader, the module cache and the state dir. Imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


class FileReadError(OSError):
    """A file that cannot be used: missing, not a regular file, too large or unreadable.

    `reason` is the human explanation (without the path); `str()` has both.
    """

    def __init__(self, path: Path | str, reason: str, *, errno_: int = 0) -> None:
        super().__init__(errno_, reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True, slots=True)
class FileStamp:
    """Identity and last change of a file; equal stamps mean nobody wrote it in between."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileStamp:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    @classmethod
    def at(cls, path: Path | str) -> FileStamp | None:
        """The stamp of `path` (following symlinks), None when it cannot be stat'ed."""
        try:
            return cls.of(os.stat(path))
        except OSError:
            return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_regular(path: Path | str, *, limit: int, what: str = "file") -> tuple[bytes, FileStamp]:
    """The bytes of regular file `path` (at most `limit`) and its stamp when opened.

    Raises FileReadError (an OSError; `errno` is ENOENT for a missing file) saying why.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileReadError(path, f"no such {what}", errno_=errno.ENOENT) from None
    except OSError as error:
        reason = f"cannot read: {error.strerror or error}"
        raise FileReadError(path, reason, errno_=error.errno or 0) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileReadError(path, f"is {_kind(info.st_mode)}, not a regular {what}: point it at a file")
        if info.st_size > limit:
            raise FileReadError(path, _too_large(what, info.st_size, limit))
        chunks: list[bytes] = []
        total = 0
        while True:  # a file that grows while being read is capped, not trusted
            chunk = os.read(fd, min(limit + 1 - total, 1 << 20) or 1)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise FileReadError(path, _too_large(what, total, limit))
        return b"".join(chunks), FileStamp.of(info)
    except OSError as error:
        if isinstance(error, FileReadError):
            raise
        reason = f"cannot read: {error.strerror or error}"
        raise FileReadError(path, reason, errno_=error.errno or 0) from None
    finally:
        os.close(fd)


def _too_large(what: str, size: int, limit: int) -> str:
    return f"the {what} is {_size(size)}, over the limit of {_size(limit)}"


def _size(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB" if n % MIB else f"{n // MIB} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"


def write_atomic(path: Path | str, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to a new file beside `path` and rename it onto `path` (never in place)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if mode != 0o600:
                os.fchmod(handle.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
