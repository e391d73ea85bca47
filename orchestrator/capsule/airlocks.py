"""The host functions ("airlocks") a capsule imports from `extism:host/user`, as plain Python
over bytes.

Each function takes the per-call `CallState` and its arguments as bytes (the capsule layer
reads them from kernel memory) and returns bytes, an int, or None. Functions that return
data return a **HostResult**: `0x00` + payload, or `0x01` + a UTF-8 message for a recoverable
error (not found, too large, invalid key, invalid path, rate limited, I/O error). A
**capability denial** raises `CapabilityDenied` (the guest's call traps) after publishing
an `orch.audit.denied` event: a denial is a configuration error to be seen, not something for
guest code to work around. The ABI is documented for capsule authors in docs/abi.md.

No wasm and no asyncio here, so every function is testable with fakes: the KV store is
reached through `KVAccess`, the bus through `Publisher`.

Used by orchestrator.capsule.binding, which binds `HOST_FUNCTIONS` to the engine.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import CapabilityDenied, GateError
from . import sandbox
from .gate import (
    MAX_FILE_BYTES,
    MAX_KEY_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_VALUE_BYTES,
    PathGate,
    RateLimiter,
    TopicGate,
    check_key,
    check_size,
)
from .sandbox import Place

OK, ERR = b"\x00", b"\x01"
LOG_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import (os.umask can only be read by setting it)
AUDIT_TOPIC = "orch.audit.denied"


class KVAccess(Protocol):
    """One capsule's view of the KV store, from a worker thread."""

    def get(self, key: str) -> bytes | None: ...
    def set(self, key: str, value: bytes) -> None: ...
    def delete(self, key: str) -> None: ...
    def keys(self, prefix: str) -> list[str]: ...


class Publisher(Protocol):
    def publish(self, topic: str, payload: Any = None, *, source: str = "orch", size: int | None = None) -> Any: ...


@dataclass
class HostContext:
    """Everything the airlocks of one capsule may reach. Built once per capsule."""

    capsule: str
    config: Mapping[str, str]
    paths: PathGate
    publish: TopicGate
    rate: RateLimiter
    bus: Publisher
    kv: KVAccess | None = None  # None: the manifest does not grant kv
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("orchestrator.capsule"))
    clock_ms: Callable[[], int] = field(default_factory=lambda: lambda: int(time.time() * 1000))


@dataclass
class CallState:
    """One call's view: the capsule's context plus what this call did (for the commit).

    `outbox`, when given, buffers the call's publishes as (topic, payload, size): the capsule
    layer publishes them, in order, only once the call succeeded and its KV writes
    committed (a failed or conflicted attempt publishes nothing). Without it, a publish
    goes to the bus at once."""

    host: HostContext
    function: str = ""
    kv: KVAccess | None = None  # this call's own view of the KV (its writes kept until it ends)
    outbox: list[tuple[str, Any, int]] | None = None  # (topic, payload, its size in bytes)


def ok(payload: bytes = b"") -> bytes:
    return OK + payload


def err(message: str) -> bytes:
    return ERR + message.encode("utf-8", "replace")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise GateError(f"{what} is not valid UTF-8 (byte {error.start})") from None


def deny(call: CallState, error: CapabilityDenied) -> CapabilityDenied:
    """Publish the audit event for a denial and hand the error back for raising."""
    host = call.host
    host.bus.publish(
        AUDIT_TOPIC,
        {
            "capsule": host.capsule,
            "function": call.function,
            "capability": error.capability,
            "target": error.target,
            "message": str(error),
        },
        source="orch",
    )
    host.log.debug("capsule %s: %s", host.capsule, error)  # the audit event is the record
    return error


# -- logging, config, clock --------------------------------------------------------------
def astrid_log(call: CallState, level: bytes, message: bytes) -> None:
    name = level.decode("utf-8", "replace").strip().lower()
    call.host.log.log(LOG_LEVELS.get(name, logging.INFO), "%s", message[:65536].decode("utf-8", "replace"))


def astrid_get_config(call: CallState, key: bytes) -> bytes:
    try:
        value = call.host.config.get(key.decode("utf-8"))
    except UnicodeDecodeError:
        return b""  # no declared key is invalid UTF-8
    return value.encode() if value else b""


def astrid_clock_ms(call: CallState) -> int:
    return call.host.clock_ms()


# -- key-value -----------------------------------------------------------------------------
def _kv(call: CallState) -> KVAccess:
    if call.host.kv is None:  # the grant is the capsule's; the view may be the call's own
        raise deny(
            call,
            CapabilityDenied(
                "capability denied: kv (add `kv = true` to [capabilities] in Capsule.toml)",
                capability="kv",
            ),
        )
    return call.kv if call.kv is not None else call.host.kv


def astrid_kv_get(call: CallState, key: bytes) -> bytes:
    kv = _kv(call)
    try:
        value = kv.get(check_key(key))
    except GateError as error:
        return err(str(error))
    return ok(value or b"")


def astrid_kv_set(call: CallState, key: bytes, value: bytes) -> bytes:
    kv = _kv(call)
    try:
        name = check_key(key)
        check_size("value", len(value), MAX_VALUE_BYTES)
    except GateError as error:
        return err(str(error))
    kv.set(name, value)
    return ok()


def astrid_kv_delete(call: CallState, key: bytes) -> bytes:
    kv = _kv(call)
    try:
        name = check_key(key)
    except GateError as error:
        return err(str(error))
    kv.delete(name)
    return ok()


def astrid_kv_list_keys(call: CallState, prefix: bytes) -> bytes:
    kv = _kv(call)
    try:
        check_size("prefix", len(prefix), MAX_KEY_BYTES)
        text = _text(prefix, "prefix")
    except GateError as error:
        return err(str(error))
    return ok(json.dumps(kv.keys(text), ensure_ascii=False).encode())


# -- bus -----------------------------------------------------------------------------------
def astrid_ipc_publish(call: CallState, topic: bytes, payload: bytes) -> bytes:
    host = call.host
    try:
        name = _text(topic, "topic")
        check_size("payload", len(payload), MAX_PAYLOAD_BYTES)
        try:
            host.publish.check(name)
        except CapabilityDenied as denied:
            raise deny(call, denied) from None
        try:
            value = parse_json(payload) if payload else None
        except ValueError as error:
            return err(f"payload is not valid JSON: {error}")
        host.rate.check(len(payload))
    except GateError as error:
        return err(str(error))
    if call.outbox is not None:
        call.outbox.append((name, value, len(payload)))  # checked and counted now, published after the commit
    else:
        host.bus.publish(name, value, source=host.capsule, size=len(payload))
    return ok()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes) -> Any:
    """Strict JSON from UTF-8 bytes: no BOM, no NaN/Infinity, no lone surrogates (so every
    subscriber, in any language, can read it back)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 (byte {error.start})") from None
    value = json.loads(text, parse_constant=_no_constant)
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (\\uD800-\\uDFFF escape)") from None
    return value


# -- files ---------------------------------------------------------------------------------
# Each file airlock asks the gate where the path is (`PathGate.place`), then lets the sandbox
# resolve and act in one race-free walk; a denial from either is audited and raised.
def _place(call: CallState, data: bytes, *, write: bool) -> Place:
    """Where guest path `data` is, under its grant; GateError for malformed input."""
    return call.host.paths.place(_text(data, "path"), write=write)


def _io_error(path: bytes, error: OSError) -> bytes:
    shown = path.decode("utf-8", "replace")
    if isinstance(error, FileNotFoundError):
        return err(f"not found: {shown}")
    if isinstance(error, IsADirectoryError):
        return err(f"is a directory: {shown}")
    if isinstance(error, NotADirectoryError):
        return err(f"not a directory: {shown}")
    return err(f"I/O error on {shown}: {error.strerror or error}")


def _read_capped(fd: int, expected: int, limit: int) -> bytes:
    """Up to `limit + 1` bytes: a file that grows while being read is capped, not trusted."""
    chunks: list[bytes] = []
    total = 0
    want = min(expected + 1, limit + 1)  # one read for a file that does not change
    while total <= limit:
        chunk = os.read(fd, min(want, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = 1 << 20
    return b"".join(chunks)


def astrid_read_file(call: CallState, path: bytes) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO must not hang the worker thread; it is refused below.
        fd = sandbox.open_file(_place(call, path, write=False))
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError(21, "is a directory")
            if not stat.S_ISREG(info.st_mode):
                return err(f"not a regular file: {path.decode('utf-8', 'replace')}")
            check_size("file", info.st_size, MAX_FILE_BYTES)
            data = _read_capped(fd, info.st_size, MAX_FILE_BYTES)
        finally:
            os.close(fd)
        check_size("file", len(data), MAX_FILE_BYTES)
    except CapabilityDenied as denied:
        raise deny(call, denied) from None
    except GateError as error:
        return err(str(error))
    except OSError as error:
        return _io_error(path, error)
    return ok(data)


def astrid_write_file(call: CallState, path: bytes, data: bytes) -> bytes:
    try:
        check_size("file", len(data), MAX_FILE_BYTES)
        sandbox.replace_file(_place(call, path, write=True), data, mode=0o666 & ~_UMASK)
    except CapabilityDenied as denied:
        raise deny(call, denied) from None
    except GateError as error:
        return err(str(error))
    except OSError as error:
        return _io_error(path, error)
    return ok()


def astrid_fs_readdir(call: CallState, path: bytes) -> bytes:
    try:
        # Protected entries are left out. Names that are not UTF-8 cannot travel as JSON
        # text: they show with U+FFFD.
        found = sandbox.list_dir(_place(call, path, write=False))
        names = sorted(os.fsencode(name).decode("utf-8", "replace") for name in found)
    except CapabilityDenied as denied:
        raise deny(call, denied) from None
    except GateError as error:
        return err(str(error))
    except OSError as error:
        return _io_error(path, error)
    return ok(json.dumps(names, ensure_ascii=False).encode())


def astrid_fs_stat(call: CallState, path: bytes) -> bytes:
    try:
        info = sandbox.stat(_place(call, path, write=False))
    except CapabilityDenied as denied:
        raise deny(call, denied) from None
    except GateError as error:
        return err(str(error))
    except OSError as error:
        return _io_error(path, error)
    result = {
        "size": info.st_size,
        "is_dir": stat.S_ISDIR(info.st_mode),
        "modified_ms": int(info.st_mtime * 1000),
    }
    return ok(json.dumps(result).encode())


def astrid_fs_exists(call: CallState, path: bytes) -> bytes:
    try:
        sandbox.stat(_place(call, path, write=False))
    except CapabilityDenied as denied:
        raise deny(call, denied) from None
    except GateError as error:
        return err(str(error))
    except (FileNotFoundError, NotADirectoryError):
        return ok(b"false")
    except OSError as error:
        return _io_error(path, error)
    return ok(b"true")


@dataclass(frozen=True)
class Airlock:
    """How a host function is bound: its name, number of (offset) arguments and result kind
    ("result": a HostResult offset, "data": a raw data offset, "i64": a number, "none")."""

    name: str
    arity: int
    result: str
    function: Callable[..., Any]


HOST_FUNCTIONS: tuple[Airlock, ...] = (
    Airlock("astrid_log", 2, "none", astrid_log),
    Airlock("astrid_get_config", 1, "data", astrid_get_config),
    Airlock("astrid_clock_ms", 0, "i64", astrid_clock_ms),
    Airlock("astrid_kv_get", 1, "result", astrid_kv_get),
    Airlock("astrid_kv_set", 2, "result", astrid_kv_set),
    Airlock("astrid_kv_delete", 1, "result", astrid_kv_delete),
    Airlock("astrid_kv_list_keys", 1, "result", astrid_kv_list_keys),
    Airlock("astrid_ipc_publish", 2, "result", astrid_ipc_publish),
    Airlock("astrid_read_file", 1, "result", astrid_read_file),
    Airlock("astrid_write_file", 2, "result", astrid_write_file),
    Airlock("astrid_fs_readdir", 1, "result", astrid_fs_readdir),
    Airlock("astrid_fs_stat", 1, "result", astrid_fs_stat),
    Airlock("astrid_fs_exists", 1, "result", astrid_fs_exists),
)
