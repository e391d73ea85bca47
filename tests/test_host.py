"""The airlocks (orchestrator/host.py), alone over bytes and bound to wasm (orchestrator/capsule.py).

Layer 1, host.py with fakes (no wasm, no asyncio). A `HostContext` is built from a real
`PathGate` over a workspace in `tmp_path` (folders, files, symlinks, a folder outside it), a
real `TopicGate`, a `RateLimiter` on a fake clock, a real `EventBus` and a dict-backed KV
fake. For every function of `HOST_FUNCTIONS` (a guard test fails when one is added without
being listed here) the tests check:

* the allowed case, byte for byte: a HostResult is `0x00` + payload;
* the denied case: `CapabilityDenied` ("capability denied ...", `.capability`, `.target`)
  and exactly one `orch.audit.denied` event naming capsule, function, capability, target;
* malformed input, which must come back as `0x01` + message and never raise: keys (empty,
  4097 bytes, NUL, invalid UTF-8), values and payloads over 1 MiB, payloads that are not
  JSON, topics (wildcards, empty tokens, invalid UTF-8, too long), the publish rate limit,
  paths (empty, NUL, invalid UTF-8, foreign scheme, too long), files over 16 MiB (a sparse
  file), a directory read as a file, readdir on a file, missing files ("not found").

Paths are attacked with `..` (leading, middle, `cwd://..`, `cwd://notes/../../etc/passwd`),
absolute paths outside the workspace (`/etc/passwd`, `cwd:///etc/passwd`), symlinks inside a
granted folder that lead outside it (to a folder outside the workspace, to a sibling folder,
through a chain, dangling, in a loop), a prefix sibling (`notes-evil` next to `notes`), a
write to a read-only grant and a read from a write-only grant. `astrid_write_file` is
checked to be atomic (temp file renamed over the target, nothing left behind, the old file
intact when the rename fails) and to create missing parent folders only inside a grant
(re-checked after creating them, against a folder swapped for a symlink meanwhile).
`astrid_get_config` returns raw bytes, `astrid_clock_ms` the injected clock, and
`astrid_log` maps levels onto the logger (caplog).

Layer 2, through wasm: a capsule folder in `tmp_path` (Capsule.toml + a WAT module that
imports the kernel from `extism:host/env` and the airlocks from `extism:host/user`, with one
small export per scenario, each setting the raw result block as its output). Checked: an
offset that is not an allocated kernel block comes back to the guest as the HostResult
error (and traps for airlocks that return no HostResult), offset 0 is empty bytes, a denial
raises `CapabilityDenied` from `call_tool` and the capsule keeps working, KV writes are
committed when the call returns (seen by a second `KVStore` on the same file, also after a
call that failed), and one capsule never sees another's keys.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.capsule import Capsule
from orchestrator.capsule import airlocks as host
from orchestrator.capsule.airlocks import (
    AUDIT_TOPIC,
    HOST_FUNCTIONS,
    CallState,
    HostContext,
    astrid_clock_ms,
    astrid_fs_exists,
    astrid_fs_readdir,
    astrid_fs_stat,
    astrid_get_config,
    astrid_ipc_publish,
    astrid_kv_delete,
    astrid_kv_get,
    astrid_kv_list_keys,
    astrid_kv_set,
    astrid_log,
    astrid_read_file,
    astrid_write_file,
)
from orchestrator.capsule.bus import EventBus
from orchestrator.capsule.gate import PathGate, RateLimiter, TopicGate
from orchestrator.capsule.store import KVStore
from orchestrator.engine import WasmEngine
from orchestrator.errors import CapabilityDenied, CapsuleTrap

KIB = 1024
MIB = 1024 * KIB
MAX_FILE = 16 * MIB
CAPSULE = "tester"
FUNCTION = "tool"

# ---- layer 1: fakes and the workspace ----------------------------------------------------


class FakeClock:
    """A monotonic clock in seconds that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeKV:
    """A dict-backed `KVAccess` that records every operation it is asked for."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []

    def get(self, key: str) -> bytes | None:
        self.calls.append(("get", key))
        return self.data.get(key)

    def set(self, key: str, value: bytes) -> None:
        self.calls.append(("set", key))
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        self.data.pop(key, None)

    def keys(self, prefix: str) -> list[str]:
        self.calls.append(("keys", prefix))
        return sorted(key for key in self.data if key.startswith(prefix))


@dataclass
class Rig:
    """One capsule's host context over a workspace, with the fakes it is made of."""

    ws: Path
    outside: Path
    bus: EventBus
    kv: FakeKV
    clock: FakeClock
    log: logging.Logger
    config: dict[str, str] = field(default_factory=dict)

    def call(self, *, kv: bool = True, rate: RateLimiter | None = None, clock_ms: int = 1_700_000_000_123) -> CallState:
        context = HostContext(
            capsule=CAPSULE,
            config=self.config,
            paths=PathGate(workspace=self.ws, read=["cwd://notes", "both"], write=["cwd://out", "both"]),
            publish=TopicGate(["greetings.>", "orders.*.created"]),
            rate=rate or RateLimiter(messages_per_second=1000, bytes_per_second=8 * MIB, clock=self.clock),
            bus=self.bus,
            kv=self.kv if kv else None,
            log=self.log,
            clock_ms=lambda: clock_ms,
        )
        return CallState(host=context, function=FUNCTION)

    def published(self, pattern: str = ">") -> list[tuple[str, object, str]]:
        return [(e.topic, e.payload, e.source) for e in self.bus.history(pattern)]

    def audits(self) -> list[dict[str, object]]:
        return [e.payload for e in self.bus.history(AUDIT_TOPIC)]  # type: ignore[misc]


def build_workspace(root: Path) -> tuple[Path, Path]:
    """The workspace `root/ws` and a folder outside it, `root/outside`.

    ws/notes (read grant), ws/out (write grant), ws/both (read and write), ws/notes-evil and
    ws/other (no grant); symlinks in notes and out that lead out of their grant.
    """
    ws, outside = root / "ws", root / "outside"
    for folder in ("notes/sub/dir", "notes-evil", "out/dir", "both", "other"):
        (ws / folder).mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside secret")
    (ws / "notes" / "a.txt").write_bytes(b"alpha")
    (ws / "notes" / "sub" / "b.txt").write_bytes(b"beta")
    (ws / "notes" / "sub" / "é.txt").write_bytes(b"accent")
    (ws / "notes" / "sub" / ".hidden").write_bytes(b"")
    (ws / "notes-evil" / "secret.txt").write_bytes(b"evil")
    (ws / "other" / "c.txt").write_bytes(b"gamma")
    (ws / "out" / "existing.txt").write_bytes(b"old")
    (ws / "both" / "d.txt").write_bytes(b"delta")
    notes, out = ws / "notes", ws / "out"
    # leading out of the workspace
    (notes / "escape").symlink_to(outside / "secret.txt")
    (notes / "escape_dir").symlink_to(outside)
    (notes / "escape_rel").symlink_to("../../outside/secret.txt")
    # a chain whose last link leaves: chain1 -> chain2 -> chain3 -> outside/secret.txt
    (notes / "chain3").symlink_to(outside / "secret.txt")
    (notes / "chain2").symlink_to("chain3")
    (notes / "chain1").symlink_to("chain2")
    # a chain that stays inside the grant: inner1 -> inner2 -> a.txt
    (notes / "inner2").symlink_to("a.txt")
    (notes / "inner1").symlink_to("inner2")
    # inside the workspace but outside the grant (a sibling and a prefix sibling)
    (notes / "to_evil").symlink_to(ws / "notes-evil" / "secret.txt")
    (notes / "to_other").symlink_to("../other")
    # a loop
    (notes / "loop1").symlink_to("loop2")
    (notes / "loop2").symlink_to("loop1")
    # elsewhere in the workspace, pointing into a granted folder: denied (not under the grant)
    (ws / "other" / "into_notes").symlink_to(notes / "a.txt")
    # write side
    (out / "escape_dir").symlink_to(outside)
    (out / "dangling").symlink_to(outside / "created-through-link.txt")
    (out / "to_notes").symlink_to(notes / "a.txt")
    (out / "alias").symlink_to("real.txt")
    (out / "real.txt").write_bytes(b"real")
    return ws, outside


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    ws, outside = build_workspace(tmp_path)
    bus = EventBus()
    try:
        yield Rig(
            ws=ws,
            outside=outside,
            bus=bus,
            kv=FakeKV(),
            clock=FakeClock(),
            log=logging.getLogger("tests.host.capsule"),
            config={"greeting": "Hello", "accent": "héllo wörld", "blank": ""},
        )
    finally:
        bus.close()


def assert_denied(
    rig: Rig, function: object, *args: bytes, capability: str, target: str, kv: bool = True
) -> CapabilityDenied:
    """`function(call, *args)` raises CapabilityDenied and publishes exactly one audit event."""
    call = rig.call(kv=kv)
    before = len(rig.bus.history())
    with pytest.raises(CapabilityDenied) as info:
        function(call, *args)  # type: ignore[operator]
    error = info.value
    assert str(error).startswith("capability denied"), str(error)
    assert error.capability == capability
    assert error.target == target
    events = rig.bus.history()[before:]
    assert [(e.topic, e.source) for e in events] == [(AUDIT_TOPIC, "orch")]
    assert events[0].payload == {
        "capsule": CAPSULE,
        "function": FUNCTION,
        "capability": capability,
        "target": target,
        "message": str(error),
    }
    return error


def assert_error(result: bytes, *fragments: str) -> str:
    """`result` is a HostResult error whose UTF-8 message contains every fragment."""
    assert isinstance(result, bytes)
    assert result[:1] == b"\x01", result[:200]
    message = result[1:].decode("utf-8")
    for fragment in fragments:
        assert fragment in message, message
    return message


def ok_json(result: bytes) -> object:
    assert result[:1] == b"\x00", result[:200]
    return json.loads(result[1:].decode("utf-8"))


# ---- the list itself ------------------------------------------------------------------------

EXPECTED_AIRLOCKS = {
    # name: (arity, result kind)
    "astrid_log": (2, "none"),
    "astrid_get_config": (1, "data"),
    "astrid_clock_ms": (0, "i64"),
    "astrid_kv_get": (1, "result"),
    "astrid_kv_set": (2, "result"),
    "astrid_kv_delete": (1, "result"),
    "astrid_kv_list_keys": (1, "result"),
    "astrid_ipc_publish": (2, "result"),
    "astrid_read_file": (1, "result"),
    "astrid_write_file": (2, "result"),
    "astrid_fs_readdir": (1, "result"),
    "astrid_fs_stat": (1, "result"),
    "astrid_fs_exists": (1, "result"),
}


def test_host_functions_are_the_documented_airlocks() -> None:
    """Every airlock of the ABI (README, "The ABI"), with its arity and result kind, and nothing untested."""
    table = {a.name: (a.arity, a.result) for a in HOST_FUNCTIONS}
    assert table == EXPECTED_AIRLOCKS
    assert len(HOST_FUNCTIONS) == len(table)
    for airlock in HOST_FUNCTIONS:
        assert airlock.function.__name__ == airlock.name
        parameters = list(inspect.signature(airlock.function).parameters)
        assert len(parameters) == airlock.arity + 1  # the CallState first


# ---- astrid_log, astrid_get_config, astrid_clock_ms -------------------------------------------


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (b"debug", logging.DEBUG),
        (b"info", logging.INFO),
        (b"warn", logging.WARNING),
        (b"error", logging.ERROR),
        (b"WARN", logging.WARNING),
        (b" Error\n", logging.ERROR),
        (b"bogus", logging.INFO),
        (b"", logging.INFO),
        (b"\xff\xfe", logging.INFO),
    ],
)
def test_log_routes_levels_to_the_logger(
    rig: Rig, caplog: pytest.LogCaptureFixture, level: bytes, expected: int
) -> None:
    caplog.set_level(logging.DEBUG, logger=rig.log.name)
    assert astrid_log(rig.call(), level, "grüße".encode()) is None
    records = [r for r in caplog.records if r.name == rig.log.name]
    assert [(r.levelno, r.getMessage()) for r in records] == [(expected, "grüße")]
    assert rig.bus.history() == []


def test_log_message_is_decoded_leniently_and_truncated(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=rig.log.name)
    call = rig.call()
    astrid_log(call, b"info", b"bad \xff byte")
    astrid_log(call, b"info", b"x" * (64 * KIB + 100))
    astrid_log(call, b"info", b"")
    messages = [r.getMessage() for r in caplog.records if r.name == rig.log.name]
    assert messages == ["bad \ufffd byte", "x" * (64 * KIB), ""]


def test_log_debug_is_filtered_by_the_logger_level(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=rig.log.name)
    astrid_log(rig.call(), b"debug", b"quiet")
    astrid_log(rig.call(), b"info", b"loud")
    assert [r.getMessage() for r in caplog.records if r.name == rig.log.name] == ["loud"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"greeting", b"Hello"),
        (b"accent", "héllo wörld".encode()),
        (b"blank", b""),
        (b"missing", b""),
        (b"", b""),
        (b"\xff", b""),
        (b"greeting\x00", b""),
    ],
)
def test_get_config_returns_raw_bytes(rig: Rig, key: bytes, expected: bytes) -> None:
    """Raw data (no HostResult byte); empty when unset; no capability needed, nothing audited."""
    assert astrid_get_config(rig.call(kv=False), key) == expected
    assert rig.bus.history() == []


def test_clock_ms_is_the_injected_clock(rig: Rig) -> None:
    assert astrid_clock_ms(rig.call(clock_ms=42)) == 42
    value = astrid_clock_ms(rig.call(clock_ms=1_700_000_000_123))
    assert value == 1_700_000_000_123
    assert type(value) is int


def test_clock_ms_default_is_wall_clock_milliseconds(rig: Rig) -> None:
    context = HostContext(
        capsule=CAPSULE,
        config={},
        paths=PathGate(workspace=rig.ws),
        publish=TopicGate([]),
        rate=RateLimiter(clock=rig.clock),
        bus=rig.bus,
    )
    value = astrid_clock_ms(CallState(host=context))
    assert 1_600_000_000_000 < value < 10_000_000_000_000


# ---- key-value -----------------------------------------------------------------------------

BAD_KEYS = [
    pytest.param(b"", "key is empty", id="empty"),
    pytest.param(b"k" * 4097, "key of 4097 bytes exceeds the limit of 4096 bytes", id="4097-bytes"),
    pytest.param("é".encode() * 2049, "key of 4098 bytes exceeds", id="4098-bytes-non-ascii"),
    pytest.param(b"a\x00b", "NUL", id="nul"),
    pytest.param(b"\x00", "NUL", id="only-nul"),
    pytest.param(b"ok\xff\xfe", "not valid UTF-8", id="invalid-utf8"),
    pytest.param(b"\xed\xa0\x80", "not valid UTF-8", id="encoded-surrogate"),
]


def test_kv_get_returns_the_value_or_empty(rig: Rig) -> None:
    rig.kv.data["greeting"] = b"hello \x00\xff binary"
    call = rig.call()
    assert astrid_kv_get(call, b"greeting") == b"\x00hello \x00\xff binary"
    assert astrid_kv_get(call, b"absent") == b"\x00"
    assert [op for op, _ in rig.kv.calls] == ["get", "get"]  # reads write nothing
    assert rig.bus.history() == []


def test_kv_keys_at_the_limits_are_accepted(rig: Rig) -> None:
    call = rig.call()
    for key in (b"k" * 4096, "é".encode() * 2048, "日本".encode(), b"with space/and.dots"):
        assert astrid_kv_set(call, key, b"v") == b"\x00"
        assert astrid_kv_get(call, key) == b"\x00v"
        assert key.decode() in rig.kv.data


def test_kv_set_stores_each_write(rig: Rig) -> None:
    call = rig.call()
    assert astrid_kv_set(call, b"a", b"1") == b"\x00"
    assert astrid_kv_set(call, b"b", b"") == b"\x00"
    assert rig.kv.data == {"a": b"1", "b": b""}
    assert astrid_kv_set(call, b"a", b"2") == b"\x00"
    assert rig.kv.data["a"] == b"2"
    assert rig.kv.calls == [("set", "a"), ("set", "b"), ("set", "a")]


def test_kv_value_limit_is_one_mib(rig: Rig) -> None:
    call = rig.call()
    assert astrid_kv_set(call, b"big", b"v" * MIB) == b"\x00"
    assert len(rig.kv.data["big"]) == MIB
    result = astrid_kv_set(call, b"big", b"w" * (MIB + 1))
    assert result == b"\x01value of 1048577 bytes exceeds the limit of 1048576 bytes"
    assert rig.kv.data["big"] == b"v" * MIB
    assert rig.kv.calls == [("set", "big")]  # the oversized value never reached the store


def test_kv_delete_removes_each_key(rig: Rig) -> None:
    rig.kv.data.update({"a": b"1", "b": b"2"})
    call = rig.call()
    assert astrid_kv_delete(call, b"a") == b"\x00"
    assert rig.kv.data == {"b": b"2"}
    assert astrid_kv_delete(call, b"never-there") == b"\x00"
    assert rig.kv.data == {"b": b"2"}
    assert rig.kv.calls == [("delete", "a"), ("delete", "never-there")]


def test_kv_list_keys_is_a_json_array(rig: Rig) -> None:
    rig.kv.data.update({"user:1": b"", "user:2": b"", "üser:3": b"", "other": b""})
    call = rig.call()
    assert ok_json(astrid_kv_list_keys(call, b"user:")) == ["user:1", "user:2"]
    assert ok_json(astrid_kv_list_keys(call, "ü".encode())) == ["üser:3"]
    assert ok_json(astrid_kv_list_keys(call, b"")) == ["other", "user:1", "user:2", "üser:3"]
    assert astrid_kv_list_keys(call, b"none") == b"\x00[]"
    assert ok_json(astrid_kv_list_keys(call, b"p" * 4096)) == []


@pytest.mark.parametrize(
    ("prefix", "fragment"),
    [
        (b"p" * 4097, "prefix of 4097 bytes exceeds the limit of 4096 bytes"),
        (b"user\xff", "prefix is not valid UTF-8"),
    ],
)
def test_kv_list_keys_rejects_bad_prefixes(rig: Rig, prefix: bytes, fragment: str) -> None:
    assert_error(astrid_kv_list_keys(rig.call(), prefix), fragment)
    assert rig.kv.calls == []


@pytest.mark.parametrize(("key", "fragment"), BAD_KEYS)
@pytest.mark.parametrize("operation", ["get", "set", "delete"])
def test_kv_rejects_bad_keys_without_touching_the_store(rig: Rig, operation: str, key: bytes, fragment: str) -> None:
    call = rig.call()
    if operation == "get":
        result = astrid_kv_get(call, key)
    elif operation == "set":
        result = astrid_kv_set(call, key, b"value")
    else:
        result = astrid_kv_delete(call, key)
    assert_error(result, fragment)
    assert rig.kv.calls == []
    assert rig.bus.history() == []  # malformed input is not a denial


KV_CALLS = [
    pytest.param(astrid_kv_get, (b"k",), id="get"),
    pytest.param(astrid_kv_set, (b"k", b"v"), id="set"),
    pytest.param(astrid_kv_delete, (b"k",), id="delete"),
    pytest.param(astrid_kv_list_keys, (b"",), id="list_keys"),
    pytest.param(astrid_kv_get, (b"",), id="get-bad-key"),  # the denial comes first
]


@pytest.mark.parametrize(("function", "args"), KV_CALLS)
def test_kv_not_granted_is_denied_and_audited(rig: Rig, function: object, args: tuple[bytes, ...]) -> None:
    error = assert_denied(rig, function, *args, capability="kv", target="", kv=False)
    assert "kv" in str(error)
    assert rig.kv.calls == []


# ---- publish -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "value"),
    [
        (b"greetings.hi", b'{"n": 1, "text": "h\xc3\xa9"}', {"n": 1, "text": "hé"}),
        (b"greetings.a.b.c", b"[1, 2]", [1, 2]),
        (b"greetings.hi", b"", None),
        (b"greetings.hi", b"null", None),
        (b"greetings.hi", b' "spaced" ', "spaced"),
        (b"orders.42.created", b"true", True),
        ("greetings.grüße".encode(), b"0", 0),
    ],
)
def test_publish_delivers_on_the_bus(rig: Rig, topic: bytes, payload: bytes, value: object) -> None:
    with rig.bus.subscribe(">") as sub:
        assert astrid_ipc_publish(rig.call(), topic, payload) == b"\x00"
        event = sub.get_nowait()
        assert event is not None
        assert (event.topic, event.payload, event.source) == (topic.decode(), value, CAPSULE)
        assert sub.get_nowait() is None


def test_publish_payload_limit_is_one_mib(rig: Rig) -> None:
    call = rig.call()
    exact = b'"' + b"a" * (MIB - 2) + b'"'
    assert astrid_ipc_publish(call, b"greetings.big", exact) == b"\x00"
    over = b'"' + b"a" * (MIB - 1) + b'"'
    result = astrid_ipc_publish(call, b"greetings.big", over)
    assert result == b"\x01payload of 1048577 bytes exceeds the limit of 1048576 bytes"
    assert len(rig.published("greetings.>")) == 1


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"'single'", b"{}{}", b"\xff", b'"\xff"', b"[1,", b"undefined"],
)
def test_publish_rejects_payloads_that_are_not_json(rig: Rig, payload: bytes) -> None:
    assert_error(astrid_ipc_publish(rig.call(), b"greetings.hi", payload), "payload is not valid JSON")
    assert rig.bus.history() == []


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [
        (b"", "topic is empty"),
        (b"greetings.*", "wildcard"),
        (b"greetings.>", "wildcard"),
        (b"greetings.a*", "wildcard"),
        (b">", "wildcard"),
        (b"greetings..hi", "empty token"),
        (b".greetings.hi", "empty token"),
        (b"greetings.hi.", "empty token"),
        (b"greetings.a b", "whitespace"),
        (b"greetings.\x00", "control character"),
        (b"greetings.\xff", "topic is not valid UTF-8"),
        (b"greetings." + b"t" * 247, "257 bytes exceeds the limit of 256 bytes"),
        (b"greetings" + b".t" * 16, "17 tokens"),
    ],
)
def test_publish_rejects_malformed_topics(rig: Rig, topic: bytes, fragment: str) -> None:
    """Malformed topics are errors for the guest, not denials, even under a granted prefix."""
    assert_error(astrid_ipc_publish(rig.call(), topic, b"{}"), fragment)
    assert rig.bus.history() == []


@pytest.mark.parametrize("topic", ["other.topic", "greetings", "orders.1.created.x", "orders.created", "Greetings.hi"])
def test_publish_outside_the_grant_is_denied_and_audited(rig: Rig, topic: str) -> None:
    assert_denied(rig, astrid_ipc_publish, topic.encode(), b"{}", capability="ipc_publish", target=topic)
    assert rig.published(topic) == []


def test_publish_denial_comes_before_the_json_check(rig: Rig) -> None:
    assert_denied(rig, astrid_ipc_publish, b"other.topic", b"{not json", capability="ipc_publish", target="other.topic")


def test_publish_rate_limit_is_an_error_and_refills(rig: Rig) -> None:
    limiter = RateLimiter(messages_per_second=2, bytes_per_second=MIB, burst_seconds=1, clock=rig.clock)
    call = rig.call(rate=limiter)
    assert astrid_ipc_publish(call, b"greetings.1", b"1") == b"\x00"
    assert astrid_ipc_publish(call, b"greetings.2", b"2") == b"\x00"
    assert_error(astrid_ipc_publish(call, b"greetings.3", b"3"), "publish rate limit exceeded", "2 messages/s")
    # refused publishes (not JSON, malformed topic) take no token
    rig.clock.now += 0.5
    assert_error(astrid_ipc_publish(call, b"greetings.x", b"{bad"), "not valid JSON")
    assert_error(astrid_ipc_publish(call, b"greetings..x", b"1"), "empty token")
    assert astrid_ipc_publish(call, b"greetings.4", b"4") == b"\x00"
    assert_error(astrid_ipc_publish(call, b"greetings.5", b"5"), "publish rate limit exceeded")
    assert [topic for topic, _, _ in rig.published()] == ["greetings.1", "greetings.2", "greetings.4"]


def test_publish_byte_rate_limit(rig: Rig) -> None:
    limiter = RateLimiter(messages_per_second=100, bytes_per_second=10, burst_seconds=1, clock=rig.clock)
    call = rig.call(rate=limiter)
    assert_error(astrid_ipc_publish(call, b"greetings.big", b'"123456789"'), "larger than the burst of 10 bytes")
    assert astrid_ipc_publish(call, b"greetings.ok", b'"1234567"') == b"\x00"  # 9 bytes
    assert_error(astrid_ipc_publish(call, b"greetings.ok", b"12"), "publish rate limit exceeded")
    rig.clock.now += 1
    assert astrid_ipc_publish(call, b"greetings.ok", b"12") == b"\x00"
    assert [payload for _, payload, _ in rig.published()] == ["1234567", 12]


# ---- files: allowed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "notes/a.txt",
        "cwd://notes/a.txt",
        "./notes/a.txt",
        "notes//a.txt",
        "notes/./a.txt",
        "cwd://./notes/a.txt",
        "notes/inner1",  # a symlink chain that stays inside the grant
        "ABSOLUTE",  # the absolute path inside the workspace
        "CWD-ABSOLUTE",  # cwd:// + the absolute path inside the workspace
    ],
)
def test_read_file_allowed_forms(rig: Rig, path: str) -> None:
    path = {"ABSOLUTE": str(rig.ws / "notes" / "a.txt"), "CWD-ABSOLUTE": f"cwd://{rig.ws}/notes/a.txt"}.get(path, path)
    assert astrid_read_file(rig.call(), path.encode()) == b"\x00alpha"
    assert rig.bus.history() == []


def test_read_file_binary_empty_and_read_write_grant(rig: Rig) -> None:
    (rig.ws / "notes" / "bin").write_bytes(bytes(range(256)))
    (rig.ws / "notes" / "empty").write_bytes(b"")
    call = rig.call()
    assert astrid_read_file(call, b"notes/bin") == b"\x00" + bytes(range(256))
    assert astrid_read_file(call, b"notes/empty") == b"\x00"
    assert astrid_read_file(call, "notes/sub/é.txt".encode()) == b"\x00accent"
    assert astrid_read_file(call, b"both/d.txt") == b"\x00delta"


def test_read_file_size_limit_is_16_mib(rig: Rig) -> None:
    """Sparse files: no 16 MiB is written to disk."""
    exact, over = rig.ws / "notes" / "exact.bin", rig.ws / "notes" / "over.bin"
    exact.touch()
    os.truncate(exact, MAX_FILE)
    over.touch()
    os.truncate(over, MAX_FILE + 1)
    call = rig.call()
    result = astrid_read_file(call, b"notes/over.bin")
    assert result == b"\x01file of 16777217 bytes exceeds the limit of 16777216 bytes"
    result = astrid_read_file(call, b"notes/exact.bin")
    assert len(result) == MAX_FILE + 1
    assert result[:1] == b"\x00"
    assert result.count(0) == MAX_FILE + 1


def test_read_file_errors(rig: Rig) -> None:
    call = rig.call()
    assert astrid_read_file(call, b"notes/missing.txt") == b"\x01not found: notes/missing.txt"
    assert astrid_read_file(call, b"notes/sub") == b"\x01is a directory: notes/sub"
    assert astrid_read_file(call, b"cwd://notes") == b"\x01is a directory: cwd://notes"
    assert_error(astrid_read_file(call, b"notes/a.txt/x"), "not a directory: notes/a.txt/x")
    assert_error(astrid_read_file(call, b"notes/" + b"n" * 300), "I/O error on notes/nnn", "too long")
    assert rig.bus.history() == []


def test_readdir_lists_sorted_names(rig: Rig) -> None:
    call = rig.call()
    expected = [".hidden", "b.txt", "dir", "é.txt"]
    assert ok_json(astrid_fs_readdir(call, b"notes/sub")) == expected
    assert ok_json(astrid_fs_readdir(call, b"cwd://notes/sub/")) == expected
    assert ok_json(astrid_fs_readdir(call, b"notes/sub/dir")) == []
    assert ok_json(astrid_fs_readdir(call, b"both")) == ["d.txt"]
    names = ok_json(astrid_fs_readdir(call, b"notes"))
    assert isinstance(names, list)
    assert {"a.txt", "sub", "escape", "loop1"} <= set(names)  # links are listed, not followed
    assert rig.bus.history() == []


def test_readdir_errors(rig: Rig) -> None:
    call = rig.call()
    assert astrid_fs_readdir(call, b"notes/a.txt") == b"\x01not a directory: notes/a.txt"
    assert astrid_fs_readdir(call, b"notes/nothing") == b"\x01not found: notes/nothing"


def test_stat_reports_size_kind_and_mtime(rig: Rig) -> None:
    os.utime(rig.ws / "notes" / "a.txt", ns=(1_600_000_000_000_000_000, 1_700_000_000_123_456_789))
    call = rig.call()
    assert ok_json(astrid_fs_stat(call, b"notes/a.txt")) == {
        "size": 5,
        "is_dir": False,
        "modified_ms": 1_700_000_000_123,
    }
    assert ok_json(astrid_fs_stat(call, b"notes/inner1")) == ok_json(astrid_fs_stat(call, b"notes/a.txt"))
    info = ok_json(astrid_fs_stat(call, b"notes/sub"))
    assert isinstance(info, dict)
    assert info["is_dir"] is True
    assert set(info) == {"size", "is_dir", "modified_ms"}
    assert astrid_fs_stat(call, b"notes/missing") == b"\x01not found: notes/missing"


def test_exists(rig: Rig) -> None:
    call = rig.call()
    assert astrid_fs_exists(call, b"notes/a.txt") == b"\x00true"
    assert astrid_fs_exists(call, b"notes/sub") == b"\x00true"
    assert astrid_fs_exists(call, b"cwd://notes") == b"\x00true"
    assert astrid_fs_exists(call, b"notes/inner1") == b"\x00true"
    assert astrid_fs_exists(call, b"notes/missing") == b"\x00false"
    assert astrid_fs_exists(call, b"notes/a.txt/below-a-file") == b"\x00false"
    (rig.ws / "notes" / "dangling_inside").symlink_to("nowhere")
    assert astrid_fs_exists(call, b"notes/dangling_inside") == b"\x00false"
    assert rig.bus.history() == []


# ---- files: denied -------------------------------------------------------------------------

READ_DENIED = [
    "..",
    "../outside/secret.txt",
    "notes/../notes/a.txt",  # `..` is denied even when it would stay inside
    "notes/sub/../a.txt",
    "cwd://..",
    "cwd://../outside/secret.txt",
    "cwd://notes/../../etc/passwd",
    "/etc/passwd",
    "cwd:///etc/passwd",
    "OUTSIDE-ABSOLUTE",
    "notes/escape",
    "notes/escape_rel",
    "notes/escape_dir/secret.txt",
    "notes/escape_dir",
    "notes/chain1",
    "notes/chain2",
    "notes/loop1",
    "notes/to_evil",
    "notes/to_other/c.txt",
    "other/into_notes",  # a symlink elsewhere that points into the grant (allowed before the sandbox)
    "notes-evil/secret.txt",
    "notes-evil",
    "cwd://notes-evil",
    "notes-evil/../notes/a.txt",
    "out/existing.txt",  # write-only grant
    "out",
    "other/c.txt",
    "cwd://",
    ".",
    "/",
]


def _target(rig: Rig, path: str) -> str:
    return {"OUTSIDE-ABSOLUTE": str(rig.outside / "secret.txt")}.get(path, path)


@pytest.mark.parametrize("path", READ_DENIED)
@pytest.mark.parametrize(
    "function", [astrid_read_file, astrid_fs_readdir, astrid_fs_stat, astrid_fs_exists], ids=lambda f: f.__name__
)
def test_reading_outside_the_grants_is_denied_and_audited(rig: Rig, function: object, path: str) -> None:
    target = _target(rig, path)
    assert_denied(rig, function, target.encode(), capability="fs_read", target=target)


WRITE_DENIED = [
    "notes/a.txt",  # read-only grant
    "notes/new.txt",
    "../outside/new.txt",
    "out/../notes/a.txt",
    "out/sub/../x.txt",
    "cwd://..",
    "cwd://out/../../x.txt",
    "/etc/passwd",
    "cwd:///etc/passwd",
    "cwd:///tmp/new.txt",
    "OUTSIDE-ABSOLUTE",
    "out/escape_dir/new.txt",
    "out/escape_dir/deeper/new.txt",
    "out/dangling",
    "out/to_notes",
    "out-evil/x.txt",
    "notes-evil/x.txt",
    "other/deep/new.txt",
    "new.txt",
    "cwd://",
]


@pytest.mark.parametrize("path", WRITE_DENIED)
def test_writing_outside_the_grants_is_denied_and_changes_nothing(rig: Rig, path: str) -> None:
    target = _target(rig, path)
    before = _snapshot(rig.ws.parent)
    assert_denied(rig, astrid_write_file, target.encode(), b"pwned", capability="fs_write", target=target)
    assert _snapshot(rig.ws.parent) == before
    assert not (rig.outside / "created-through-link.txt").exists()


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: file contents, link targets, folders."""
    result: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                result[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                result[key] = "dir"
            else:
                result[key] = path.read_bytes()
    return result


# ---- files: malformed paths ---------------------------------------------------------------

BAD_PATHS = [
    pytest.param(b"", "path is empty", id="empty"),
    pytest.param(b"notes/\xff.txt", "path is not valid UTF-8", id="invalid-utf8"),
    pytest.param(b"notes/a\x00.txt", "NUL", id="nul"),
    pytest.param(b"file:///etc/passwd", "scheme", id="file-scheme"),
    pytest.param(b"http://example.com/x", "scheme", id="http-scheme"),
    pytest.param(b"notes/" + b"p" * 4100, "exceeds the limit of 4096 bytes", id="too-long"),
]


@pytest.mark.parametrize(("path", "fragment"), BAD_PATHS)
@pytest.mark.parametrize(
    ("function", "extra"),
    [
        pytest.param(astrid_read_file, (), id="read_file"),
        pytest.param(astrid_write_file, (b"data",), id="write_file"),
        pytest.param(astrid_fs_readdir, (), id="readdir"),
        pytest.param(astrid_fs_stat, (), id="stat"),
        pytest.param(astrid_fs_exists, (), id="exists"),
    ],
)
def test_malformed_paths_are_errors_not_denials(
    rig: Rig, function: object, extra: tuple[bytes, ...], path: bytes, fragment: str
) -> None:
    before = _snapshot(rig.ws.parent)
    assert_error(function(rig.call(), path, *extra), fragment)  # type: ignore[operator]
    assert rig.bus.history() == []
    assert _snapshot(rig.ws.parent) == before


# ---- write_file ---------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_write_file_creates_and_replaces_atomically(rig: Rig) -> None:
    call = rig.call()
    out = rig.ws / "out"
    assert astrid_write_file(call, b"out/new.txt", b"fresh \x00\xff") == b"\x00"
    assert (out / "new.txt").read_bytes() == b"fresh \x00\xff"
    old_inode = os.stat(out / "existing.txt").st_ino
    assert astrid_write_file(call, b"cwd://out/existing.txt", b"new") == b"\x00"
    assert (out / "existing.txt").read_bytes() == b"new"
    assert os.stat(out / "existing.txt").st_ino != old_inode  # a new file renamed over it
    assert astrid_write_file(call, b"out/existing.txt", b"") == b"\x00"
    assert (out / "existing.txt").read_bytes() == b""
    assert astrid_write_file(call, b"both/d.txt", b"DELTA") == b"\x00"
    assert astrid_read_file(call, b"both/d.txt") == b"\x00DELTA"
    assert astrid_write_file(call, str(out / "abs.txt").encode(), b"abs") == b"\x00"
    assert (out / "abs.txt").read_bytes() == b"abs"
    assert _leftovers(out) == []
    assert _leftovers(rig.ws / "both") == []
    assert rig.bus.history() == []


def test_write_file_through_an_inner_symlink_writes_the_real_file(rig: Rig) -> None:
    out = rig.ws / "out"
    assert astrid_write_file(rig.call(), b"out/alias", b"via link") == b"\x00"
    assert (out / "real.txt").read_bytes() == b"via link"
    assert (out / "alias").is_symlink()
    assert os.readlink(out / "alias") == "real.txt"


def test_write_file_creates_missing_parents_inside_the_grant(rig: Rig) -> None:
    call = rig.call()
    assert astrid_write_file(call, b"out/a/b/c/deep.txt", b"deep") == b"\x00"
    assert (rig.ws / "out" / "a" / "b" / "c" / "deep.txt").read_bytes() == b"deep"
    assert astrid_write_file(call, b"both/new/x.txt", b"x") == b"\x00"
    assert (rig.ws / "both" / "new" / "x.txt").read_bytes() == b"x"
    assert _leftovers(rig.ws / "out" / "a" / "b" / "c") == []


def test_write_file_outside_the_grant_creates_no_folders(rig: Rig) -> None:
    for path in ("other/deep/er/x.txt", "out-evil/sub/x.txt", "notes/newdir/x.txt", "newtop/x.txt"):
        with pytest.raises(CapabilityDenied):
            astrid_write_file(rig.call(), path.encode(), b"x")
    assert not (rig.ws / "other" / "deep").exists()
    assert not (rig.ws / "out-evil").exists()
    assert not (rig.ws / "notes" / "newdir").exists()
    assert not (rig.ws / "newtop").exists()
    assert len(rig.audits()) == 4


def test_write_file_rechecks_after_creating_folders(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder swapped for a symlink to the outside while the parents are being created
    (simulated in mkdir, which the sandbox calls at the parent's descriptor) is caught: the
    folder is opened without following symlinks, so nothing is written outside."""
    original = os.mkdir
    swapped: list[str] = []

    def mkdir_then_swap(path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        original(path, mode, dir_fd=dir_fd)
        if path == "racy" and not swapped:
            os.rmdir(path, dir_fd=dir_fd)
            os.symlink(rig.outside, path, dir_fd=dir_fd)
            swapped.append(path)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    assert_denied(rig, astrid_write_file, b"out/racy/x.txt", b"pwned", capability="fs_write", target="out/racy/x.txt")
    assert swapped == ["racy"]
    assert (rig.ws / "out" / "racy").is_symlink()
    assert sorted(os.listdir(rig.outside)) == ["secret.txt"]


def test_write_file_size_limit_is_16_mib(rig: Rig) -> None:
    call = rig.call()
    result = astrid_write_file(call, b"out/big.bin", bytes(MAX_FILE + 1))
    assert result == b"\x01file of 16777217 bytes exceeds the limit of 16777216 bytes"
    assert not (rig.ws / "out" / "big.bin").exists()
    assert astrid_write_file(call, b"out/big.bin", bytes(MAX_FILE)) == b"\x00"
    assert (rig.ws / "out" / "big.bin").stat().st_size == MAX_FILE
    # the size check comes before the grant check: an oversized denied write is an error
    assert_error(astrid_write_file(call, b"notes/x", bytes(MAX_FILE + 1)), "exceeds the limit")
    assert rig.bus.history() == []


def test_write_file_onto_a_directory_or_below_a_file_is_an_error(rig: Rig) -> None:
    call = rig.call()
    assert astrid_write_file(call, b"out/dir", b"x") == b"\x01is a directory: out/dir"
    assert (rig.ws / "out" / "dir").is_dir()
    assert_error(astrid_write_file(call, b"cwd://out", b"x"), "out")
    assert (rig.ws / "out").is_dir()
    assert_error(astrid_write_file(call, b"out/existing.txt/below", b"x"), "out/existing.txt/below")
    assert (rig.ws / "out" / "existing.txt").read_bytes() == b"old"
    assert _leftovers(rig.ws / "out") == []
    assert _leftovers(rig.ws) == []
    assert rig.bus.history() == []


def test_write_file_failed_rename_keeps_the_old_file_and_no_temp(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str]] = []

    def failing_rename(source: str, destination: str, *, src_dir_fd: int, dst_dir_fd: int) -> None:
        seen.append((source, destination))
        assert src_dir_fd == dst_dir_fd  # renamed within the parent's descriptor
        fd = os.open(source, os.O_RDONLY, dir_fd=src_dir_fd)
        try:
            assert os.read(fd, 100) == b"new content"  # fully written before the rename
        finally:
            os.close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "rename", failing_rename)
    result = astrid_write_file(rig.call(), b"out/existing.txt", b"new content")
    assert result == b"\x01I/O error on out/existing.txt: Input/output error"
    assert (rig.ws / "out" / "existing.txt").read_bytes() == b"old"
    assert _leftovers(rig.ws / "out") == []
    assert len(seen) == 1
    temp, destination = seen[0]
    assert temp.startswith(".existing.txt.")
    assert temp.endswith(".tmp")
    assert destination == "existing.txt"


def test_audit_with_a_recording_publisher(rig: Rig) -> None:
    """The audit goes through the `Publisher` protocol (any object with `publish`)."""

    class Recorder:
        def __init__(self) -> None:
            self.events: list[tuple[str, object, str]] = []

        def publish(self, topic: str, payload: object = None, *, source: str = "orch", size: int | None = None) -> None:
            self.events.append((topic, payload, source))

    recorder = Recorder()
    call = rig.call()
    call.host.bus = recorder
    with pytest.raises(CapabilityDenied) as info:
        astrid_read_file(call, b"/etc/passwd")
    assert recorder.events == [
        (
            AUDIT_TOPIC,
            {
                "capsule": CAPSULE,
                "function": FUNCTION,
                "capability": "fs_read",
                "target": "/etc/passwd",
                "message": str(info.value),
            },
            "orch",
        )
    ]


# ---- layer 2: through wasm ----------------------------------------------------------------

KERNEL_IMPORTS = {
    "alloc": "(param i64) (result i64)",
    "length": "(param i64) (result i64)",
    "store_u8": "(param i64 i32)",
    "store_u64": "(param i64 i64)",
    "output_set": "(param i64 i64)",
}

AIRLOCK_IMPORTS = {
    "astrid_log": "(param i64 i64)",
    "astrid_get_config": "(param i64) (result i64)",
    "astrid_clock_ms": "(result i64)",
    "astrid_kv_get": "(param i64) (result i64)",
    "astrid_kv_set": "(param i64 i64) (result i64)",
    "astrid_kv_delete": "(param i64) (result i64)",
    "astrid_kv_list_keys": "(param i64) (result i64)",
    "astrid_ipc_publish": "(param i64 i64) (result i64)",
    "astrid_read_file": "(param i64) (result i64)",
    "astrid_write_file": "(param i64 i64) (result i64)",
    "astrid_fs_readdir": "(param i64) (result i64)",
    "astrid_fs_stat": "(param i64) (result i64)",
    "astrid_fs_exists": "(param i64) (result i64)",
}

NOT_A_BLOCK = 12345
HUGE_OFFSET = 2**40


class GuestModule:
    """A WAT module whose exports call airlocks with strings from its data segment.

    `text(s)` is a WAT expression that copies `s` into a new kernel block and yields its
    offset; `$out` sets a block as the call's output, so the guest hands back the raw
    HostResult.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.exports: dict[str, str] = {}

    def text(self, value: str | bytes) -> str:
        raw = value.encode() if isinstance(value, str) else value
        offset = len(self.data)
        self.data += raw
        return f"(call $block (i32.const {offset}) (i32.const {len(raw)}))"

    def export(self, name: str, body: str) -> None:
        self.exports[name] = body

    def wat(self) -> str:
        imports = [f'(import "extism:host/env" "{n}" (func ${n} {sig}))' for n, sig in KERNEL_IMPORTS.items()]
        imports += [f'(import "extism:host/user" "{n}" (func ${n} {sig}))' for n, sig in AIRLOCK_IMPORTS.items()]
        data = "".join(f"\\{byte:02x}" for byte in self.data)
        functions = [
            f'(func (export "{name}") (result i32)\n    {body}\n    (i32.const 0))'
            for name, body in self.exports.items()
        ]
        return "\n".join(
            [
                "(module",
                *imports,
                "(memory 1)",
                f'(data (i32.const 0) "{data}")',
                """
  (func $block (param $ptr i32) (param $len i32) (result i64) (local $p i64) (local $i i32)
    (local.set $p (call $alloc (i64.extend_i32_u (local.get $len))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (call $store_u8
          (i64.add (local.get $p) (i64.extend_i32_u (local.get $i)))
          (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $p))
  (func $out (param $p i64) (call $output_set (local.get $p) (call $length (local.get $p))))
  (func $out_u64 (param $v i64) (local $p i64)
    (local.set $p (call $alloc (i64.const 8)))
    (call $store_u64 (local.get $p) (local.get $v))
    (call $output_set (local.get $p) (i64.const 8)))""",
                *functions,
                ")",
            ]
        )


def guest_module() -> GuestModule:
    g = GuestModule()
    g.export("bad_offset", f"(call $out (call $astrid_kv_get (i64.const {NOT_A_BLOCK})))")
    g.export("huge_offset", f"(call $out (call $astrid_read_file (i64.const {HUGE_OFFSET})))")
    g.export("negative_offset", "(call $out (call $astrid_fs_exists (i64.const -8)))")
    g.export("bad_second_arg", f"(call $out (call $astrid_kv_set {g.text('k')} (i64.const {NOT_A_BLOCK})))")
    g.export("bad_log_offset", f"(call $astrid_log (i64.const {NOT_A_BLOCK}) {g.text('hi')})")
    g.export("bad_config_offset", f"(call $out (call $astrid_get_config (i64.const {NOT_A_BLOCK})))")
    g.export("zero_key", "(call $out (call $astrid_kv_get (i64.const 0)))")
    g.export("zero_path", "(call $out (call $astrid_fs_exists (i64.const 0)))")
    g.export(
        "zero_value",
        f"(drop (call $astrid_kv_set {g.text('empty')} (i64.const 0)))\n"
        f"    (call $out (call $astrid_kv_list_keys {g.text('empty')}))",
    )
    g.export("zero_log", "(call $astrid_log (i64.const 0) (i64.const 0))")
    g.export("log_warn", f"(call $astrid_log {g.text('warn')} {g.text('from wasm')})")
    g.export("put", f"(call $out (call $astrid_kv_set {g.text('greeting')} {g.text('hello')}))")
    g.export("get", f"(call $out (call $astrid_kv_get {g.text('greeting')}))")
    g.export("keys", "(call $out (call $astrid_kv_list_keys (i64.const 0)))")
    g.export("delete", f"(call $out (call $astrid_kv_delete {g.text('greeting')}))")
    g.export("denied_read", f"(call $out (call $astrid_read_file {g.text('/etc/passwd')}))")
    g.export(
        "put_then_deny",
        f"(drop (call $astrid_kv_set {g.text('before-denial')} {g.text('kept')}))\n"
        f"    (call $out (call $astrid_write_file {g.text('notes/x.txt')} {g.text('no')}))",
    )
    g.export("config", f"(call $out (call $astrid_get_config {g.text('greeting')}))")
    g.export("config_unset", f"(call $out (call $astrid_get_config {g.text('nope')}))")
    g.export("clock", "(call $out_u64 (call $astrid_clock_ms))")
    payload = g.text(b'{"n": 7}')
    g.export("publish", f"(call $out (call $astrid_ipc_publish {g.text('greetings.wasm')} {payload}))")
    g.export(
        "write_read",
        f"(drop (call $astrid_write_file {g.text('out/sub/w.txt')} {g.text('written by wasm')}))\n"
        f"    (call $out (call $astrid_read_file {g.text('out/sub/w.txt')}))",
    )
    g.export("readdir", f"(call $out (call $astrid_fs_readdir {g.text('notes')}))")
    return g


GUEST = guest_module()
GUEST_WAT = GUEST.wat()


def make_capsule_folder(root: Path, name: str, *, kv: bool = True) -> Path:
    folder = root / f"capsule-{name}"
    folder.mkdir()
    (folder / "x.wat").write_text(GUEST_WAT)
    tools = "".join(
        f'\n[[tool]]\nname = "{export}"\ninput_schema = {{ type = "object" }}\n' for export in GUEST.exports
    )
    (folder / "Capsule.toml").write_text(
        f"""[package]
name = "{name}"
version = "0.1.0"
description = "airlock test capsule"

[[component]]
id = "main"
file = "x.wat"

[env.greeting]
type = "string"
default = "Hello from config"

[capabilities]
kv = {"true" if kv else "false"}
fs_read = ["cwd://notes", "cwd://out"]
fs_write = ["cwd://out"]
ipc_publish = ["greetings.>"]
{tools}"""
    )
    return folder


@dataclass
class WasmRig:
    root: Path
    engine: WasmEngine
    bus: EventBus
    store: KVStore
    workspace: Path
    capsules: list[Capsule] = field(default_factory=list)

    async def load(self, name: str, *, kv: bool = True) -> Capsule:
        capsule = await Capsule.load(
            make_capsule_folder(self.root, name, kv=kv),
            engine=self.engine,
            bus=self.bus,
            store=self.store,
            workspace=self.workspace,
        )
        self.capsules.append(capsule)
        return capsule


@pytest.fixture
async def wasm(tmp_path: Path) -> AsyncIterator[WasmRig]:
    workspace = tmp_path / "ws"
    (workspace / "notes").mkdir(parents=True)
    (workspace / "notes" / "n.txt").write_bytes(b"note")
    (workspace / "out").mkdir()
    engine = WasmEngine()
    bus = EventBus()
    store = await KVStore.open(tmp_path / "kv.db")
    rig = WasmRig(root=tmp_path, engine=engine, bus=bus, store=store, workspace=workspace)
    try:
        yield rig
    finally:
        for capsule in rig.capsules:
            await capsule.close()
        await store.close()
        bus.close()
        engine.close()


async def test_wasm_offset_that_is_not_a_block_is_a_host_result_error(wasm: WasmRig) -> None:
    capsule = await wasm.load("alpha")
    result = await capsule.call_tool("bad_offset", {})
    assert result.output == (b"\x01astrid_kv_get: argument 1 (offset 12345) is not an allocated kernel block")
    result = await capsule.call_tool("huge_offset")
    assert result.output == (
        b"\x01astrid_read_file: argument 1 (offset 1099511627776) is not an allocated kernel block"
    )
    result = await capsule.call_tool("negative_offset")
    assert result.output == b"\x01astrid_fs_exists: argument 1 (offset -8) is not an allocated kernel block"
    result = await capsule.call_tool("bad_second_arg")
    assert result.output == (b"\x01astrid_kv_set: argument 2 (offset 12345) is not an allocated kernel block")
    assert await wasm.store.list_keys("alpha") == []  # nothing was written
    assert wasm.bus.history(AUDIT_TOPIC) == []


@pytest.mark.parametrize(
    ("tool", "airlock"), [("bad_log_offset", "astrid_log"), ("bad_config_offset", "astrid_get_config")]
)
async def test_wasm_bad_offset_to_an_airlock_without_host_result_traps(wasm: WasmRig, tool: str, airlock: str) -> None:
    capsule = await wasm.load("alpha")
    with pytest.raises(CapsuleTrap) as info:
        await capsule.call_tool(tool)
    assert f"{airlock}: argument 1 (offset 12345) is not an allocated kernel block" in str(info.value)
    assert not isinstance(info.value, CapabilityDenied)
    assert (await capsule.call_tool("config")).output == b"Hello from config"  # still works


async def test_wasm_offset_zero_is_empty_bytes(wasm: WasmRig, caplog: pytest.LogCaptureFixture) -> None:
    capsule = await wasm.load("alpha")
    assert (await capsule.call_tool("zero_key")).output == b"\x01key is empty"
    assert (await capsule.call_tool("zero_path")).output == b"\x01path is empty"
    assert (await capsule.call_tool("zero_value")).output == b'\x00["empty"]'
    assert await wasm.store.get("alpha", "empty") == b""
    caplog.set_level(logging.DEBUG, logger="orchestrator.capsule.alpha")
    assert (await capsule.call_tool("zero_log")).output == b""
    assert (await capsule.call_tool("log_warn")).output == b""
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "orchestrator.capsule.alpha"]
    assert records == [(logging.INFO, ""), (logging.WARNING, "from wasm")]


async def test_wasm_config_clock_publish_and_files(wasm: WasmRig) -> None:
    capsule = await wasm.load("alpha")
    assert (await capsule.call_tool("config")).output == b"Hello from config"
    assert (await capsule.call_tool("config_unset")).output == b""
    capsule.host.clock_ms = lambda: 1_234_567_890_123
    assert (await capsule.call_tool("clock")).output == struct.pack("<q", 1_234_567_890_123)
    assert (await capsule.call_tool("publish")).output == b"\x00"
    assert [(e.topic, e.payload, e.source) for e in wasm.bus.history("greetings.>")] == [
        ("greetings.wasm", {"n": 7}, "alpha")
    ]
    assert (await capsule.call_tool("write_read")).output == b"\x00written by wasm"
    assert (wasm.workspace / "out" / "sub" / "w.txt").read_bytes() == b"written by wasm"
    assert (await capsule.call_tool("readdir")).output == b'\x00["n.txt"]'


async def test_wasm_denial_raises_and_the_capsule_keeps_working(wasm: WasmRig) -> None:
    capsule = await wasm.load("alpha")
    with pytest.raises(CapabilityDenied) as info:
        await capsule.call_tool("denied_read")
    error = info.value
    assert str(error).startswith("capability denied: fs_read /etc/passwd")
    assert (error.capability, error.target) == ("fs_read", "/etc/passwd")
    assert [e.payload for e in wasm.bus.history(AUDIT_TOPIC)] == [
        {
            "capsule": "alpha",
            "function": "denied_read",
            "capability": "fs_read",
            "target": "/etc/passwd",
            "message": str(error),
        }
    ]
    assert (await capsule.call_tool("put")).output == b"\x00"
    assert (await capsule.call_tool("get")).output == b"\x00hello"
    with pytest.raises(CapabilityDenied):
        await capsule.call_tool("denied_read")
    assert (await capsule.call_tool("config")).output == b"Hello from config"
    assert len(wasm.bus.history(AUDIT_TOPIC)) == 2


async def test_wasm_kv_not_granted_is_denied(wasm: WasmRig) -> None:
    capsule = await wasm.load("nokv", kv=False)
    for tool in ("get", "put", "keys", "delete"):
        with pytest.raises(CapabilityDenied) as info:
            await capsule.call_tool(tool)
        assert info.value.capability == "kv"
    assert (await capsule.call_tool("config")).output == b"Hello from config"
    assert [e.payload["function"] for e in wasm.bus.history(AUDIT_TOPIC)] == ["get", "put", "keys", "delete"]
    assert await wasm.store.capsules() == []


async def test_wasm_kv_writes_are_committed_when_the_call_returns_and_dropped_when_it_fails(wasm: WasmRig) -> None:
    capsule = await wasm.load("alpha")
    assert (await capsule.call_tool("put")).output == b"\x00"
    other = await KVStore.open(wasm.store.path)  # a second connection sees only committed data
    try:
        assert await other.get("alpha", "greeting") == b"hello"
        with pytest.raises(CapabilityDenied):
            await capsule.call_tool("put_then_deny")  # a failed call's writes are dropped
        assert await other.get("alpha", "before-denial") is None
        assert await wasm.store.get("alpha", "before-denial") is None
        assert (await capsule.call_tool("delete")).output == b"\x00"
        assert await other.list_keys("alpha") == []
    finally:
        await other.close()


async def test_wasm_kv_is_scoped_per_capsule(wasm: WasmRig) -> None:
    alpha = await wasm.load("alpha")
    beta = await wasm.load("beta")
    assert (await alpha.call_tool("put")).output == b"\x00"
    assert (await alpha.call_tool("get")).output == b"\x00hello"
    assert (await beta.call_tool("get")).output == b"\x00"
    assert (await beta.call_tool("keys")).output == b"\x00[]"
    assert (await beta.call_tool("delete")).output == b"\x00"  # deletes beta's (absent) key only
    assert (await alpha.call_tool("get")).output == b"\x00hello"
    assert (await beta.call_tool("zero_value")).output == b'\x00["empty"]'
    assert (await alpha.call_tool("keys")).output == b'\x00["greeting"]'
    assert await wasm.store.get("beta", "greeting") is None
    assert await wasm.store.capsules() == ["alpha", "beta"]


# ---- regressions from review ---------------------------------------------------------------
def test_readdir_shows_non_utf8_names_with_a_replacement_character(rig: Rig) -> None:
    open(os.fsencode(rig.ws / "notes") + b"/\xff.txt", "wb").close()
    names = ok_json(host.astrid_fs_readdir(rig.call(), b"notes"))
    assert isinstance(names, list) and "\ufffd.txt" in names


def test_exists_reports_os_errors_instead_of_raising(rig: Rig) -> None:
    assert_error(host.astrid_fs_exists(rig.call(), b"notes/" + b"a" * 300), "I/O error")
    assert host.astrid_fs_exists(rig.call(), b"notes/a.txt/below") == b"\x00false"


@pytest.mark.parametrize(
    "payload",
    [b'"\\ud800"', b'"\xed\xa0\x80"', b"NaN", b"[Infinity]", b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16")],
)
def test_publish_refuses_json_other_languages_cannot_read(rig: Rig, payload: bytes) -> None:
    call = rig.call()
    call.host.publish = TopicGate(["greetings.>"])
    assert_error(host.astrid_ipc_publish(call, b"greetings.x", payload), "payload is not valid JSON")
    assert rig.published("greetings.>") == []


def test_reading_a_fifo_does_not_hang(rig: Rig) -> None:
    os.mkfifo(rig.ws / "notes" / "pipe")
    assert_error(host.astrid_read_file(rig.call(), b"notes/pipe"), "not a regular file")


def test_written_files_follow_the_umask_and_keep_their_mode(rig: Rig) -> None:
    call = rig.call()
    assert host.astrid_write_file(call, b"out/new.txt", b"1") == b"\x00"
    mode = (rig.ws / "out" / "new.txt").stat().st_mode & 0o777
    assert mode == 0o666 & ~host._UMASK
    (rig.ws / "out" / "new.txt").chmod(0o640)
    assert host.astrid_write_file(call, b"out/new.txt", b"2") == b"\x00"
    assert (rig.ws / "out" / "new.txt").stat().st_mode & 0o777 == 0o640


def test_config_keys_are_matched_exactly(rig: Rig) -> None:
    rig.config["a\ufffd"] = "replacement"
    assert host.astrid_get_config(rig.call(), b"a\xff") == b""


def test_warning_level_is_a_warning(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=rig.log.name):
        host.astrid_log(rig.call(), b"warning", b"careful")
    assert [r.levelno for r in caplog.records if r.getMessage() == "careful"] == [logging.WARNING]
