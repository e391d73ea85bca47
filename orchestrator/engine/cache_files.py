"""The files of the compiled-module cache: its key, its folder, stamps, atomic writes, MACs.

- `load_or_create_key(path)`: the secret that authenticates the cache's records (HMAC-SHA256).
  It lives in the state dir, never in the cache folder it protects: 32 random bytes, created
  exclusively with mode 0600; an existing key file that is not a regular file we own with
  mode 0600 is refused (OrchestratorError naming the path and the fix).
- `private_dir`: the cache folder, created 0700; one owned by someone else is not used.
- `stamp`: what changes whenever a file is written, replaced, copied or restored.
- `write_new`: write a new file and rename it into place (never rewrite one in place:
  artifacts are memory-mapped, and rewriting a mapped file kills the process with SIGBUS);
  returns the stamp of the file *we* wrote, read from our own descriptor after the rename.
- `sign` / `read_small`: the record's MAC and a bounded, symlink-refusing read.

Used by orchestrator.engine.cache and .cache_index.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import stat
import tempfile
from pathlib import Path

from ..errors import OrchestratorError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
PROC_FD = Path("/proc/self/fd")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def load_or_create_key(path: Path) -> bytes:
    """The cache key at `path`, created (32 random bytes, mode 0600) when absent.

    Raises OrchestratorError when the file exists but is not a regular file owned by this
    user with mode 0600 and exactly 32 bytes, or cannot be read or created.
    """
    path = Path(path)
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL, 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(KEY_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first: use theirs
                os.link(tmp, path)  # exclusive and atomic: never a half-written key
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except OSError as error:
        raise OrchestratorError(
            f"module cache key {path}: cannot create it ({error.strerror or error}); "
            f"make its folder writable by this user"
        ) from None
    logger.debug("module cache: created the cache key %s", path)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    fix = f"remove {path} (a new key is then created, and the module cache is rebuilt)"
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OrchestratorError(f"module cache key {path} is a symbolic link, not a file of ours; {fix}") from None
        raise OrchestratorError(f"module cache key {path}: cannot read it ({error.strerror or error}); {fix}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OrchestratorError(f"module cache key {path} is not a regular file; {fix}")
        if info.st_uid != os.getuid():
            raise OrchestratorError(
                f"module cache key {path} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}); {fix}"
            )
        if stat.S_IMODE(info.st_mode) != 0o600:
            raise OrchestratorError(
                f"module cache key {path} has mode {stat.S_IMODE(info.st_mode):04o}, not 0600 (others could "
                f"read or change it); {fix}, or if it never left your control: chmod 600 {path}"
            )
        if info.st_size != KEY_BYTES:
            raise OrchestratorError(f"module cache key {path} is not {KEY_BYTES} bytes long; {fix}")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise OrchestratorError(f"module cache key {path} is not {KEY_BYTES} bytes long; {fix}")
    return key


def private_dir(directory: Path) -> Path | None:
    """Create `directory` 0700, or refuse (None) when it is not safely ours."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as error:
        logger.warning("module cache: cannot use %s (%s); caching in memory only", directory, error)
        return None
    if info.st_uid != os.getuid():
        logger.warning(
            "module cache: %s belongs to uid %d, not us; caching in memory only",
            directory,
            info.st_uid,
        )
        return None
    if stat.S_IMODE(info.st_mode) & 0o077:
        try:
            directory.chmod(0o700)
        except OSError as error:
            logger.warning("module cache: cannot make %s private (%s); not using it", directory, error)
            return None
        logger.info("module cache: made %s private (0700)", directory)
    return directory


def stamp(info: os.stat_result) -> list[int]:
    """What changes whenever a file is written, replaced, copied or restored: its inode,
    size and modification and status-change times (ctime cannot be set by user code)."""
    return [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def write_new(path: Path, data: bytes) -> list[int]:
    """Write `data` to a new file and rename it onto `path` (never rewrite in place).

    Returns the stamp of the file written, taken from our own descriptor after the rename
    (which may change its ctime), so a file someone swaps in at `path` meanwhile is never
    stamped as ours.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.replace(tmp, path)
            return stamp(os.fstat(handle.fileno()))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_small(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, refusing symlinks.

    Raises FileNotFoundError when absent, OSError (with a reason) otherwise.
    """
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        return read_fd(fd, limit)
    finally:
        os.close(fd)


def read_fd(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd`, from its current position."""
    chunks = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def open_artifact(path: Path) -> int:
    """A read-only descriptor of `path` (no symlinks). Raises OSError."""
    return os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)


def fd_path(fd: int, fallback: Path) -> str:
    """A path that opens exactly the file behind `fd` (Linux: /proc/self/fd/N), so what is
    mapped is the inode that was checked, whatever is renamed onto `fallback` meanwhile."""
    return str(PROC_FD / str(fd)) if _HAVE_PROC_FD else str(fallback)


def sign(key: bytes, record: dict[str, object]) -> str:
    """HMAC-SHA256 of the record's canonical JSON (sorted keys, no spaces)."""
    body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def encode_record(record: dict[str, object]) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def touch(path: Path) -> None:
    """Mark `path` as just used (its mtime: the LRU order that survives a restart)."""
    with contextlib.suppress(OSError, NotImplementedError):
        os.utime(path, follow_symlinks=False)


_HAVE_PROC_FD = PROC_FD.is_dir()
