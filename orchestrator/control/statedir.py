"""The state dir: checked, private and locked before anything runs; and its record of what
was applied (`applied.json`).

The state dir holds the KV database, the compiled-module cache, the control socket and the
applied state: whoever can write it can run code as the orchestrator, and whoever can read
it reads every capsule's data. So `StateDir.open` first refuses what cannot work (a file
where the folder should be, a folder under /proc, /sys or /dev, a read-only folder, a
folder where the database file should be) with one line that names the path and the fix;
then makes it private (0700; a folder owned by another user is refused); then takes an
exclusive `flock` on its `lock` file, so a second orchestrator on the same state dir exits
at once, naming the first one's PID, before it has started or written anything. The lock
is released when the process exits, however it exits. `check_state_dir` runs the same
checks without creating, changing or locking anything, for `orch validate`.

After every apply the runtime records what runs in `applied.json` (specs without secret
values, the config's hash and revision), written atomically off the event loop, private.

`state_dir_of` finds a config's state dir without validating the config (no pydantic):
the CLI's operator verbs and the dashboard use it to find the control socket, so a typo
saved in config.yaml never locks the operator out of the orchestrator still running.
`find_state_dir` is their whole rule: `--state-dir DIR`, else `--config`'s state dir, else
./config.yaml's when there is one, else `./.orch` (where `orch up git+...` keeps it by
default: an orchestrator that follows git has no config.yaml of its own to point at).

Used by the runtime, the CLI (`orch up`, `validate`, `plan`, `capsule call`) and the API
client (the socket's name and `state_dir_of`); kept light to import (yaml is imported by
`state_dir_of` alone, when called).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, OrchestratorError, Problem
from ..files import FileReadError, read_regular, write_atomic

if TYPE_CHECKING:
    from ..desired.spec import CapsuleSpec

logger = logging.getLogger(__name__)

APPLIED = "applied.json"
KV_DATABASE = "kv.sqlite3"
CACHE = "cache"
SOCKET = "orch.sock"
LOG = "orch.log"
LOCK = "lock"
CACHE_KEY = "cache.key"
VIRTUAL = (Path("/proc"), Path("/sys"), Path("/dev"))
DEFAULT_STATE_DIR = ".orch"
CONFIG_FILE = "config.yaml"
MAX_CONFIG_BYTES = 4 << 20  # as orchestrator.desired.config: no config is larger
_STATE_DIR_LINE = re.compile(r"^state_dir[ \t]*:[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_NULLS = ("", "~", "null", "Null", "NULL")


class StateDirError(OrchestratorError):
    """The state dir cannot be used; the message names the path and the fix."""


class StateDirBusy(StateDirError):
    """Another orchestrator holds the state dir's lock (`pid` when it could be read)."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _problem(path: Path, *, create: bool) -> str | None:
    """Why `path` cannot be a state dir (None when it can), without changing anything."""
    real = Path(os.path.realpath(path))
    for virtual in VIRTUAL:
        if _within(real, virtual):
            return f"the state dir {path} is under {virtual}, a virtual file system: choose a real folder for state_dir"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        parent = next((p for p in real.parents if p.exists()), None)
        if parent is None or not parent.is_dir():
            return f"the state dir {path} cannot be created: no existing folder above it"
        if not create and not os.access(parent, os.W_OK | os.X_OK):
            return f"the state dir {path} cannot be created: {parent} is not writable; create it or fix state_dir"
        return None
    except OSError as error:
        return f"the state dir {path} cannot be used: {error.strerror or error}; fix state_dir"
    if not stat.S_ISDIR(info.st_mode):
        return f"the state dir {path} is a file, not a folder: remove it, or point state_dir at a folder"
    if info.st_uid != os.getuid():
        return (
            f"the state dir {path} belongs to another user (uid {info.st_uid}): "
            "use a state_dir of your own; it holds every capsule's data"
        )
    if not os.access(path, os.W_OK | os.X_OK) or _read_only_mount(path) or (create and not _writable(path)):
        return (
            f"the state dir {path} is read-only: make it writable (chmod u+w, or remount), or choose another state_dir"
        )
    database = path / KV_DATABASE
    try:
        db_info = os.lstat(database)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot look at {database}: {error.strerror or error}"
    if not stat.S_ISREG(db_info.st_mode):
        return (
            f"{database} is not a regular file (the KV database must be one): "
            "move it away, and the orchestrator creates an empty database"
        )
    return None


def _writable(path: Path) -> bool:
    """Whether a file can really be created in `path` (as root, permission bits do not say)."""
    try:
        fd = os.open(path / f".probe.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path / f".probe.{os.getpid()}")
    return True


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_state_dir(path: Path) -> str | None:
    """Why `path` cannot serve as a state dir, or None. Creates, changes and locks nothing
    (for `orch validate`); an orchestrator running on it is not a problem."""
    return _problem(Path(path), create=False)


class StateDir:
    """A checked, private, locked state dir. Create with `StateDir.open(path)`; the lock is
    held until `close()` or the process exits."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    @classmethod
    def open(cls, path: Path) -> StateDir:
        """Check, create (0700), make private and lock `path`. Raises StateDirError (or
        StateDirBusy) with one line naming the path and the fix."""
        path = Path(os.path.abspath(path))
        problem = _problem(path, create=True)
        if problem is not None:
            raise StateDirError(problem)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                path.chmod(0o700)
                logger.info("made the state dir %s private (0700): it holds every capsule's data", path)
        except OSError as error:
            raise StateDirError(f"cannot prepare the state dir {path}: {error.strerror or error}") from None
        return cls(path, _lock(path / LOCK))

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def close(self) -> None:
        """Release the lock (the process exiting releases it too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> StateDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise StateDirError(f"cannot open the lock file {path}: {error.strerror or error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _holder(fd)
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f" (pid {holder})" if holder is not None else ""
            raise StateDirBusy(
                f"the state dir {path.parent} is in use by another orchestrator{who}: "
                "stop it first, or give this one another state_dir",
                pid=holder,
            ) from None
        raise StateDirError(f"cannot lock {path}: {error.strerror or error}") from None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def write_applied(state_dir: Path, record: dict[str, Any]) -> None:
    """Write applied.json atomically (blocking: call it on a worker thread)."""
    path = state_dir / APPLIED
    try:
        write_atomic(path, json.dumps(record, separators=(",", ":"), sort_keys=True).encode())
    except OSError as error:
        logger.warning("could not record the applied state in %s: %s", path, error)


def read_applied(state_dir: Path) -> dict[str, CapsuleSpec]:
    """The specs recorded by the last apply (empty when there is none)."""
    from ..desired.spec import CapsuleSpec  # only `orch plan` needs it: keep this module light

    try:
        record = json.loads((state_dir / APPLIED).read_text())
        return {name: CapsuleSpec.from_record(r) for name, r in record.get("capsules", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring unreadable %s: %s", state_dir / APPLIED, error)
        return {}


def find_state_dir(*, config: Path | None = None, state_dir: Path | None = None) -> Path:
    """The state dir of the orchestrator an operator verb talks to: `state_dir` when given;
    else the one `config` names; else the one ./config.yaml names, when there is one; else
    ./.orch. Raises ConfigError (as `state_dir_of`) when a config cannot be read."""
    if state_dir is not None:
        return Path(os.path.abspath(state_dir))
    if config is None:
        if not os.path.lexists(CONFIG_FILE):
            return Path(os.path.abspath(DEFAULT_STATE_DIR))
        config = Path(CONFIG_FILE)
    return state_dir_of(config)


def state_dir_of(config: Path | str) -> Path:
    """The state dir named by `config` (a file, or a folder holding config.yaml), read
    leniently: no validation, so a config with a typo still names its state dir.

    The top-level `state_dir:` is taken from the YAML's parser events, stopping as soon as
    it is found (a mistake further down does not matter, and nothing is built or expanded);
    when the YAML cannot be parsed up to it, from the first line that starts `state_dir:`;
    else the default `.orch`. A relative state dir is relative to the config's folder, as
    in the orchestrator. Raises ConfigError (one Problem) when the file cannot be read.
    """
    path = Path(os.path.abspath(config))
    if path.is_dir():
        path = path / CONFIG_FILE
    try:
        data, _ = read_regular(path, limit=MAX_CONFIG_BYTES, what="config file")
    except FileReadError as error:
        hint = "pass --config FILE, or --socket PATH"
        reason = f"no such config file: {hint}" if error.errno == errno.ENOENT else f"{error.reason}; {hint}"
        raise ConfigError([Problem(reason, file=str(path))]) from None
    text = data.decode("utf-8", "replace").lstrip("\ufeff")
    value = _state_dir_from_yaml(text)
    if value is None:
        found = _STATE_DIR_LINE.search(text)
        value = _unquote(_uncomment(found.group(1))) if found else None
    if not value or "\0" in value:
        value = DEFAULT_STATE_DIR
    return Path(os.path.normpath(path.parent / value))


def _state_dir_from_yaml(text: str) -> str | None:
    """The top-level `state_dir` scalar, from the parser's events (no document is built, so
    no alias is expanded and no nesting recursed into); None if the YAML breaks before it."""
    import yaml

    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = 0  # 1: inside the top-level mapping
    at_key = True  # at depth 1: the next node is a key (else a value)
    wanted = False  # the key just read is `state_dir`
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.CollectionStartEvent):
                if depth == 0 and not isinstance(event, yaml.MappingStartEvent):
                    return ""  # a document that is not a mapping names no state dir
                if depth == 1 and wanted:
                    return ""  # state_dir is a mapping or a list: not a path
                depth += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                if depth == 0:
                    return ""  # the top-level mapping ended without a state_dir
                if depth == 1:
                    at_key = not at_key
            elif depth == 1 and isinstance(event, yaml.ScalarEvent | yaml.AliasEvent):
                if not at_key and wanted:
                    if isinstance(event, yaml.AliasEvent) or (event.implicit[0] and event.value in _NULLS):
                        return ""
                    return str(event.value)
                wanted = at_key and isinstance(event, yaml.ScalarEvent) and event.value == "state_dir"
                at_key = not at_key
    except (yaml.YAMLError, RecursionError, ValueError):
        return None
    return ""


def _uncomment(value: str) -> str:
    if value[:1] in ("'", '"'):
        return value
    return value.split(" #", 1)[0].split("\t#", 1)[0].rstrip() if not value.startswith("#") else ""


def _unquote(value: str) -> str:
    for quote in ("'", '"'):
        if len(value) >= 2 and value[0] == quote and quote in value[1:]:
            return value[1 : value.index(quote, 1)]
    return value
