"""The capability gate: what a capsule may touch, decided before anything is touched.

Deny by default. Everything here is a pure decision over values (the only I/O is
`os.path.realpath`, to see through symlinks), so it is cheap to call on every host-function
call and easy to test. It owns:

- the size limits of DESIGN.md §3.3 (`check_key`, `check_size`);
- the `ipc_publish` grant check (`TopicGate`; subject syntax is orchestrator.topics);
- guest path resolution and the `fs_read`/`fs_write` grant checks (`PathGate`);
- a token-bucket publish rate limit (`RateLimiter`).

Two kinds of failure: `GateError` for malformed input (a bad key, bad topic syntax, too
large, bad path syntax), which a host function reports to the guest as a HostResult error;
and `CapabilityDenied` for a well-formed request that the grants do not allow, which traps
the call and is audited. Used by the host functions (orchestrator/host.py), the manifest
loader (validating grants).

Path policy, in short (details on `PathGate`): `cwd://x`, `x` and `./x` are relative to the
workspace; absolute paths must lie inside it; any `..` component is denied, never
normalised; grants are compared component-wise against the *real* path (symlinks resolved),
and the real path is what the caller gets back, so it opens exactly what was checked.
A backslash is an ordinary filename character (POSIX semantics), not a separator; `~` and
`%xx` are literal too. Windows is not supported.
"""

from __future__ import annotations

import errno
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import CapabilityDenied, GateError
from ..topics import check_pattern, check_topic, shown, topic_matches

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 20
MAX_FILE_BYTES = 16 << 20
MAX_PATH_BYTES = 4096

CWD_SCHEME = "cwd://"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


def _utf8_len(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise GateError(f"{what} {shown(text)} is not valid UTF-8 (lone surrogate)") from exc


# --- sizes and keys -------------------------------------------------------------------------


def check_size(what: str, size: int, limit: int) -> None:
    """GateError when `size` bytes of `what` ("value", "payload", "file") exceed `limit`."""
    if size < 0:
        raise ValueError(f"negative {what} size {size}")
    if size > limit:
        raise GateError(f"{what} of {size} bytes exceeds the limit of {limit} bytes")


def check_key(key: bytes) -> str:
    """The KV key as text: 1..MAX_KEY_BYTES bytes, no NUL, strict UTF-8. Else GateError."""
    if not key:
        raise GateError("key is empty")
    if len(key) > MAX_KEY_BYTES:
        raise GateError(f"key of {len(key)} bytes exceeds the limit of {MAX_KEY_BYTES} bytes")
    if b"\x00" in key:
        raise GateError(f"key contains a NUL byte (at byte {bytes(key).index(0)})")
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GateError(f"key is not valid UTF-8 (at byte {exc.start})") from exc


# --- topics ---------------------------------------------------------------------------------


class TopicGate:
    """The subjects a capsule may use under one capability (`ipc_publish` by default)."""

    def __init__(self, patterns: Sequence[str], *, capability: str = "ipc_publish") -> None:
        for pattern in patterns:
            check_pattern(pattern)
        self.patterns: tuple[str, ...] = tuple(patterns)
        self.capability = capability

    def allows(self, topic: str) -> bool:
        """Whether `topic` is a valid concrete subject matched by a granted pattern."""
        try:
            check_topic(topic)
        except GateError:
            return False
        return any(topic_matches(pattern, topic) for pattern in self.patterns)

    def check(self, topic: str) -> None:
        """GateError for a malformed topic; CapabilityDenied when no granted pattern matches."""
        check_topic(topic)
        if not any(topic_matches(pattern, topic) for pattern in self.patterns):
            raise CapabilityDenied(
                f"capability denied: {self.capability} {shown(topic)}",
                capability=self.capability,
                target=topic,
            )


# --- paths ----------------------------------------------------------------------------------


def _parse_path(path: str, what: str) -> tuple[bool, tuple[str, ...]]:
    """(absolute, components without `.` and empties); GateError for empty, NUL, too long,
    not UTF-8 or a scheme other than cwd://."""
    if not path:
        raise GateError(f"{what} is empty")
    if "\x00" in path:
        raise GateError(f"{what} {shown(path)} contains a NUL byte")
    size = _utf8_len(path, what)
    if size > MAX_PATH_BYTES:
        raise GateError(f"{what} {shown(path)} of {size} bytes exceeds the limit of {MAX_PATH_BYTES} bytes")
    rest = path
    if path.startswith(CWD_SCHEME):
        rest = path[len(CWD_SCHEME) :]
    else:
        scheme = _SCHEME.match(path)
        if scheme:
            raise GateError(
                f"{what} {shown(path)} uses the scheme {scheme.group(0)!r}: "
                "only cwd:// and plain relative paths are supported"
            )
    return rest.startswith("/"), tuple(part for part in rest.split("/") if part not in ("", "."))


def _within(path: Path, root: Path) -> bool:
    """Component-wise containment: `root` itself or anything below it."""
    return path == root or root in path.parents


class PathGate:
    """Guest paths resolved under a workspace and checked against `fs_read`/`fs_write` grants.

    Accepted forms: `cwd://x/y`, `x/y`, `./x` (relative to the workspace; `cwd://` alone and
    `.` are the workspace itself; doubled and trailing slashes are ignored) and absolute
    paths that lie inside the workspace, lexically (under its real path or the path as
    given) and really. `cwd:///etc/passwd` is the absolute path `/etc/passwd`, not a file
    in the workspace. Other schemes (`file://`, `http://`) are GateErrors. A backslash, `~`
    and `%2e` are ordinary characters.

    Denied (CapabilityDenied): any `..` component (even one that would stay inside),
    absolute paths outside the workspace, and paths whose real location leaves the
    workspace: symlinks are resolved all the way, for a path that does not exist yet the
    existing part is resolved and the rest appended, and a dangling symlink counts as its
    target (writing through it would create the target). A symlink loop is denied.

    Symlink policy: grants are checked against the real path only. A symlink inside a
    granted folder that points outside it is denied; a symlink elsewhere in the workspace
    that points into a granted folder is allowed, because what is touched is under the
    grant. Grants are resolved once, at construction. The real path is returned, so the
    caller opens exactly what was checked; a symlink swapped in by someone else between the
    check and the open is outside this gate (capsules themselves cannot create symlinks).

    A `write` grant does not imply `read`.
    """

    def __init__(self, *, workspace: Path, read: Sequence[str] = (), write: Sequence[str] = ()) -> None:
        self.workspace = Path(os.path.realpath(workspace))
        self._workspace_as_given = Path(os.path.abspath(workspace))
        self.read_grants: tuple[Path, ...] = tuple(self._grant(g, "fs_read") for g in read)
        self.write_grants: tuple[Path, ...] = tuple(self._grant(g, "fs_write") for g in write)

    def _grant(self, grant: str, capability: str) -> Path:
        what = f"{capability} grant"
        absolute, parts = _parse_path(grant, what)
        if absolute:
            raise GateError(f"{what} {shown(grant)} is absolute: use cwd://<folder> or a relative path")
        if ".." in parts:
            raise GateError(f"{what} {shown(grant)} contains '..'")
        real = self._real(self.workspace.joinpath(*parts))
        if real is None or not _within(real, self.workspace):
            raise GateError(f"{what} {shown(grant)} leaves the workspace {self.workspace}")
        return real

    @staticmethod
    def _real(path: Path) -> Path | None:
        """The real location of `path` (existing part resolved, rest appended); None on a loop."""
        try:
            return Path(os.path.realpath(path, strict=True))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None
        return Path(os.path.realpath(path))

    def resolve(self, path: str, *, capability: str = "fs_read") -> Path:
        """The real absolute path of guest `path`, inside the workspace; no grant check.

        GateError for bad syntax; CapabilityDenied (under `capability`) for an escape.
        """

        def deny(reason: str) -> CapabilityDenied:
            return CapabilityDenied(
                f"capability denied: {capability} {shown(path)} ({reason})",
                capability=capability,
                target=path,
            )

        absolute, parts = _parse_path(path, "path")
        if ".." in parts:
            raise deny("'..' is not allowed in paths")
        if absolute:
            candidate = Path("/").joinpath(*parts)
            if not (_within(candidate, self.workspace) or _within(candidate, self._workspace_as_given)):
                raise deny("outside the workspace")
        else:
            candidate = self.workspace.joinpath(*parts)
        real = self._real(candidate)
        if real is None:
            raise deny("symlink loop")
        if not _within(real, self.workspace):
            raise deny("its real location leaves the workspace")
        return real

    def _check(self, path: str, capability: str, grants: tuple[Path, ...]) -> Path:
        real = self.resolve(path, capability=capability)
        if not any(_within(real, grant) for grant in grants):
            raise CapabilityDenied(f"capability denied: {capability} {shown(path)}", capability=capability, target=path)
        return real

    def check_read(self, path: str) -> Path:
        """The real path of `path` if it is under a `read` grant; else GateError/CapabilityDenied."""
        return self._check(path, "fs_read", self.read_grants)

    def check_write(self, path: str) -> Path:
        """The real path of `path` if it is under a `write` grant; else GateError/CapabilityDenied."""
        return self._check(path, "fs_write", self.write_grants)

    def readable(self, path: str) -> bool:
        """`check_read` as a yes/no answer."""
        return _passes(self.check_read, path)

    def writable(self, path: str) -> bool:
        """`check_write` as a yes/no answer."""
        return _passes(self.check_write, path)


def _passes(check: Callable[[str], object], path: str) -> bool:
    try:
        check(path)
    except (GateError, CapabilityDenied):
        return False
    return True


# --- publish rate ---------------------------------------------------------------------------


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


class RateLimiter:
    """Token buckets for a capsule's publishes: messages and bytes per second, with a burst.

    Both buckets start full and hold `burst_seconds` worth of their rate (the message bucket
    at least one message). A publish takes one message and its bytes from both, or nothing.
    Thread-safe; the clock is injected, so the limiter is otherwise pure.
    """

    def __init__(
        self,
        *,
        messages_per_second: float = 1000,
        bytes_per_second: float = 8 << 20,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("messages_per_second", messages_per_second),
            ("bytes_per_second", bytes_per_second),
            ("burst_seconds", burst_seconds),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, not {value!r}")
        self.messages_per_second = float(messages_per_second)
        self.bytes_per_second = float(bytes_per_second)
        self.message_capacity = max(1.0, self.messages_per_second * burst_seconds)
        self.byte_capacity = self.bytes_per_second * burst_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._messages = self.message_capacity
        self._bytes = self.byte_capacity
        self._last = clock()

    def try_acquire(self, nbytes: int) -> bool:
        """Take one message and `nbytes` if both are available; else take nothing, False."""
        if nbytes < 0:
            raise ValueError(f"negative publish size {nbytes}")
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._last)
            self._last = max(now, self._last)
            self._messages = min(self.message_capacity, self._messages + elapsed * self.messages_per_second)
            self._bytes = min(self.byte_capacity, self._bytes + elapsed * self.bytes_per_second)
            if self._messages < 1 or self._bytes < nbytes:
                return False
            self._messages -= 1
            self._bytes -= nbytes
            return True

    def check(self, nbytes: int) -> None:
        """`try_acquire`, or GateError naming the limits."""
        if self.try_acquire(nbytes):
            return
        limits = f"(limit {_number(self.messages_per_second)} messages/s, {_number(self.bytes_per_second)} bytes/s)"
        if nbytes > self.byte_capacity:
            raise GateError(
                f"publish rate limit exceeded: a publish of {nbytes} bytes is larger than the "
                f"burst of {_number(self.byte_capacity)} bytes {limits}"
            )
        raise GateError(f"publish rate limit exceeded: publish of {nbytes} bytes refused {limits}")
