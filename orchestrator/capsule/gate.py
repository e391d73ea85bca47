"""The capability gate: what a capsule may touch, decided before anything is touched.

Deny by default. It owns:

- the size limits of the ABI (README, "The ABI"): `check_key`, `check_size`;
- the `ipc_publish` grant check (`TopicGate`; subject syntax is orchestrator.topics);
- guest path parsing and the `fs_read`/`fs_write` grants (`PathGate`), with the paths no
  grant ever reaches (`ProtectedPaths`, orchestrator.capsule.protected);
- a token-bucket publish rate limit (`RateLimiter`).

Two kinds of failure: `GateError` for malformed input (a bad key, bad topic syntax, too
large, bad path syntax), which a host function reports to the guest as a HostResult error;
and `CapabilityDenied` for a well-formed request that the grants do not allow, which traps
the call and is audited. Used by the airlocks (orchestrator.capsule.airlocks) and the
capsule (building the gates from the manifest).

Path policy, in short (details on `PathGate`). `cwd://x`, `x` and `./x` are relative to the
workspace; absolute paths must lie inside it; any `..` component is denied, never
normalised. The grant that applies is decided from the guest path; `PathGate.place` turns
the path into a `Place` (the grant's real folder and the rest of the path), and the file
operations of orchestrator.capsule.sandbox resolve and act on it in one race-free walk from
a folder descriptor: there is no check by path followed by an open by path. Symlinks below
the grant are followed only while relative and beneath it. The protected paths (state dir,
module cache, config file, every capsule folder, every `.git`) are denied whatever the
grant, and hidden from folder listings. A backslash is an ordinary filename character
(POSIX semantics), not a separator; `~` and `%xx` are literal too. Windows is not supported.

Tightened compared with the first version (which checked the real path, then opened by
path):
- a symlink elsewhere in the workspace that points into a granted folder is denied (the
  guest path is not under the grant), as is a symlink inside one grant that leads into
  another grant (`notes/link` -> `sub` with only `notes/sub` granted for writing);
- absolute symlink targets are never followed, even when they point inside the grant;
- a grant whose folder (or a folder above it) is replaced by a symlink after the capsule
  started is denied until the capsule is relaunched;
- a `..` in a symlink's target may not climb above the grant, even to come back into it;
- new: the protected paths and every `.git` entry (compared without regard to case) are
  denied even under a grant that covers them.
"""

from __future__ import annotations

import errno
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CapabilityDenied, GateError
from ..topics import check_pattern, check_topic, shown, topic_matches
from . import sandbox
from .protected import ProtectedPaths, ProtectedSource
from .sandbox import MAX_SYMLINKS, Escape, Place

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


def _shown_real(parts: tuple[str, ...]) -> str:
    return shown(CWD_SCHEME + "/".join(parts))


@dataclass(frozen=True, slots=True)
class _Grant:
    written: str  # as in the manifest, for messages
    lexical: tuple[str, ...]  # its components below the workspace, as written
    real: tuple[str, ...]  # the components of its real path below the workspace


class PathGate:
    """Guest paths resolved under a workspace and checked against `fs_read`/`fs_write` grants.

    Accepted forms: `cwd://x/y`, `x/y`, `./x` (relative to the workspace; `cwd://` alone and
    `.` are the workspace itself; doubled and trailing slashes are ignored) and absolute
    paths that lie inside the workspace, lexically (under its real path or the path as
    given). `cwd:///etc/passwd` is the absolute path `/etc/passwd`, not a file in the
    workspace. Other schemes (`file://`, `http://`) are GateErrors. A backslash, `~` and
    `%2e` are ordinary characters.

    Which grant applies is decided from the guest path alone: its components must start
    with a grant's, as written in the manifest or as the grant's real path. Everything below
    the grant is then resolved beneath the grant's folder by orchestrator.capsule.sandbox,
    race-free: relative symlinks are followed while they stay beneath it, at most 40.

    Denied (CapabilityDenied): any `..` component in the guest path (even one that would
    stay inside), absolute paths outside the workspace, paths under no grant, a symlink
    that leads out of the grant (a relative target climbing above it, any absolute target,
    a loop), a grant whose folder was replaced by a symlink after the capsule started, and
    every protected path (`ProtectedPaths`: the state dir, module cache, config file,
    capsule folders, `.git`), whatever the grant, reached directly or through symlinks.

    A grant that itself lies inside a protected path is refused at construction (GateError
    naming the grant). If the protected paths change later so that a running capsule's
    grant falls inside one, every access under it is denied (with the protected reason).

    `protected` is a `ProtectedPaths` value or a holder whose `.current` is one (the
    runtime's `ProtectedHolder`), read at each access; by default `ProtectedPaths()`, which
    protects `.git` entries only. Grants are resolved once, at construction, to real paths
    inside the workspace. A `write` grant does not imply `read`.
    """

    def __init__(
        self,
        *,
        workspace: Path,
        read: Sequence[str] = (),
        write: Sequence[str] = (),
        protected: ProtectedSource | None = None,
    ) -> None:
        self.workspace = Path(os.path.realpath(workspace))
        self._workspace_as_given = Path(os.path.abspath(workspace))
        self._protected: ProtectedSource = protected if protected is not None else ProtectedPaths()
        self._guard_cache: tuple[ProtectedPaths, Callable[[tuple[str, ...]], str | None]] | None = None
        self._read = tuple(self._grant(g, "fs_read") for g in read)
        self._write = tuple(self._grant(g, "fs_write") for g in write)
        self.read_grants: tuple[Path, ...] = tuple(self.workspace.joinpath(*g.real) for g in self._read)
        self.write_grants: tuple[Path, ...] = tuple(self.workspace.joinpath(*g.real) for g in self._write)

    @property
    def protected(self) -> ProtectedPaths:
        """The protected paths in force now."""
        return self._protected.current

    def _grant(self, grant: str, capability: str) -> _Grant:
        what = f"{capability} grant"
        absolute, parts = _parse_path(grant, what)
        if absolute:
            raise GateError(f"{what} {shown(grant)} is absolute: use cwd://<folder> or a relative path")
        if ".." in parts:
            raise GateError(f"{what} {shown(grant)} contains '..'")
        lexical = self.workspace.joinpath(*parts)
        real = self._real(lexical)
        if real is None or not _within(real, self.workspace):
            raise GateError(f"{what} {shown(grant)} leaves the workspace {self.workspace}")
        protected = self.protected
        for path in (lexical, real):
            reason = protected.reason(path, workspace=self.workspace)
            if reason is not None:
                raise GateError(
                    f"{what} {shown(grant)} is refused: {reason}; remove it from [capabilities] in Capsule.toml"
                )
        return _Grant(grant, parts, real.relative_to(self.workspace).parts)

    @staticmethod
    def _real(path: Path) -> Path | None:
        """The real location of `path` (existing part resolved, rest appended); None on a loop."""
        try:
            return Path(os.path.realpath(path, strict=True))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None
        return Path(os.path.realpath(path))

    # -- deciding ---------------------------------------------------------------------------
    def place(self, path: str, *, write: bool = False) -> Place:
        """Where guest `path` is, under which grant, for the sandbox's operations.

        GateError for bad syntax; CapabilityDenied for `..`, a path outside the workspace or
        under no grant. Denials found while walking are raised by the sandbox operations.
        """
        capability = "fs_write" if write else "fs_read"
        relative = self._relative(path, capability)
        chosen: tuple[_Grant, int] | None = None
        for grant in self._write if write else self._read:
            for prefix in (grant.real, grant.lexical):
                if relative[: len(prefix)] == prefix and (chosen is None or len(grant.real) < len(chosen[0].real)):
                    chosen = (grant, len(prefix))
        if chosen is None:
            raise CapabilityDenied(f"capability denied: {capability} {shown(path)}", capability=capability, target=path)
        grant, matched = chosen
        return self._place(path, capability, grant, grant.real + relative[matched:])

    def _relative(self, path: str, capability: str) -> tuple[str, ...]:
        absolute, parts = _parse_path(path, "path")
        if ".." in parts:
            raise self._denied(path, capability, "'..' is not allowed in paths")
        if not absolute:
            return parts
        for root in (self.workspace, self._workspace_as_given):
            if parts[: len(root.parts) - 1] == root.parts[1:]:
                return parts[len(root.parts) - 1 :]
        raise self._denied(path, capability, "outside the workspace")

    def _place(self, path: str, capability: str, grant: _Grant | None, parts: tuple[str, ...]) -> Place:
        def deny(escape: Escape) -> Exception:
            return self._denied(path, capability, self._why(escape, grant))

        floor = len(grant.real) if grant else 0
        return Place(base=self.workspace, parts=parts, floor=floor, guard=self._guard(), deny=deny)

    def _guard(self) -> Callable[[tuple[str, ...]], str | None]:
        """The sandbox's guard for the protected paths in force now (built once per value:
        a lookup per component, by casefolded components below the workspace)."""
        protected = self.protected
        cached = self._guard_cache
        if cached is not None and cached[0] is protected:
            return cached[1]
        itself, below = protected.below(self.workspace)
        lengths = frozenset(len(key) for key in below)
        name = protected.name

        def guard(rel: tuple[str, ...]) -> str | None:
            if not rel:
                return itself
            found = name(rel[-1])
            if found is not None or len(rel) not in lengths:
                return found
            return below.get(tuple(part.casefold() for part in rel))

        self._guard_cache = (protected, guard)  # one assignment: safe across worker threads
        return guard

    def _why(self, escape: Escape, grant: _Grant | None) -> str:
        if escape.kind == "protected":
            return escape.reason
        if escape.kind == "loop":
            return f"symlink loop (more than {MAX_SYMLINKS} symlinks)"
        if escape.kind == "grant_link":
            written = shown(grant.written) if grant else "cwd://"
            return f"{_shown_real(escape.link)}, part of the granted folder {written}, has been replaced by a symlink"
        if escape.kind == "absolute":
            if not _within(Path(os.path.normpath(escape.target)), self.workspace):
                return "its real location leaves the workspace"
            return f"symlink {_shown_real(escape.link)} has an absolute target: only relative symlinks are followed"
        if grant is None or not grant.real:
            return "its real location leaves the workspace"
        return f"a symlink leads out of the granted folder {shown(grant.written)}"

    @staticmethod
    def _denied(path: str, capability: str, reason: str) -> CapabilityDenied:
        return CapabilityDenied(
            f"capability denied: {capability} {shown(path)} ({reason})", capability=capability, target=path
        )

    # -- advisory answers (by path: for display and tests; the airlocks use `place`) ---------
    def resolve(self, path: str, *, capability: str = "fs_read") -> Path:
        """The real absolute path of guest `path`, inside the workspace; no grant check
        (protected paths are still denied). GateError for bad syntax; CapabilityDenied
        (under `capability`) for an escape."""
        return sandbox.resolve(self._place(path, capability, None, self._relative(path, capability)))

    def check_read(self, path: str) -> Path:
        """The real path of `path` if it is under a `read` grant; else GateError/CapabilityDenied."""
        return sandbox.resolve(self.place(path))

    def check_write(self, path: str) -> Path:
        """The real path of `path` if it is under a `write` grant; else GateError/CapabilityDenied."""
        return sandbox.resolve(self.place(path, write=True))

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
