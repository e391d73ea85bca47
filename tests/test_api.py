"""The control API as its clients meet it: a real aiohttp server on a real unix socket.

Most tests run an Orchestrator on a copy of the example deployment (counter, milestones,
notes) plus `oddball`, a small WAT capsule whose tools succeed, fail with a guest error or
spin until their fuel runs out, and whose config holds a secret. A ControlServer serves it on
`<tmp_path>/.orch/orch.sock`; requests go through `orchestrator.api.client.Client` or, where the
exact bytes matter (path tricks, half requests, odd methods), through a raw socket.

Covered: every endpoint's success shape, the status-code mapping of every error kind, the
socket's safety (mode, private state dir, one server per socket, stale sockets, path tricks,
idle and truncated connections), concurrent clients and reloads under load, durability of
acknowledged calls across a SIGKILL of a separate `orch up`, event streams (history then
live, topic filters, disconnects, slow readers losing events) and the operator CLI verbs.
Waits are on responses, events or polled conditions with a deadline, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.api.client import Client, NotRunning, RemoteError
from orchestrator.api.server import MAX_HISTORY, ControlServer, socket_alive
from orchestrator.control.runtime import Orchestrator
from orchestrator.errors import OrchestratorError
from tests.processes import spawn_up, stop_up, wait_serving
from tests.test_cli import example_deployment

DEADLINE = 15.0
SECRET = "hunter2-very-secret"
SECRET_DEFAULT = "default-secret-value"

# -- a capsule in WAT: ok (outputs "ok"), fail (sets the error "boom", returns 1), spin (forever), trap
ODDBALL_WAT = """(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output (param i64 i64)))
  (import "extism:host/env" "error_set" (func $error_set (param i64)))
  (func $two (param $a i32) (param $b i32) (result i64) (local $p i64)
    (local.set $p (call $alloc (i64.const 2)))
    (call $store (local.get $p) (local.get $a))
    (call $store (i64.add (local.get $p) (i64.const 1)) (local.get $b))
    (local.get $p))
  (func (export "ok") (result i32)
    (call $output (call $two (i32.const 0x6f) (i32.const 0x6b)) (i64.const 2))
    (i32.const 0))
  (func (export "fail") (result i32) (local $p i64)
    (local.set $p (call $alloc (i64.const 4)))
    (call $store (local.get $p) (i32.const 0x62))
    (call $store (i64.add (local.get $p) (i64.const 1)) (i32.const 0x6f))
    (call $store (i64.add (local.get $p) (i64.const 2)) (i32.const 0x6f))
    (call $store (i64.add (local.get $p) (i64.const 3)) (i32.const 0x6d))
    (call $error_set (local.get $p))
    (i32.const 1))
  (func (export "spin") (result i32)
    (loop $forever (br $forever))
    (i32.const 0))
  (func (export "trap") (result i32)
    (unreachable)))
"""

ODDBALL_MANIFEST = f"""[package]
name = "oddball"
version = "1.0.0"
description = "succeeds, fails, spins"

[[component]]
file = "oddball.wat"

[env.token]
type = "secret"
default = "{SECRET_DEFAULT}"
description = "an API token"

[env.greeting]
type = "string"
default = "hello"

[limits]
fuel = 1000000

[[tool]]
name = "ok"

[[tool]]
name = "fail"

[[tool]]
name = "spin"

[[tool]]
name = "trap"
"""

ODDBALL_DEPLOYMENT = f"""  oddball:
    path: capsules/oddball
    config: {{token: "{SECRET}", greeting: "hi"}}
"""


def add_oddball(root: Path) -> Path:
    """The example deployment plus `oddball`, under `root`; returns config.yaml."""
    config = example_deployment(root)
    folder = root / "capsules" / "oddball"
    folder.mkdir(parents=True)
    (folder / "oddball.wat").write_text(ODDBALL_WAT)
    (folder / "Capsule.toml").write_text(ODDBALL_MANIFEST)
    config.write_text(config.read_text() + ODDBALL_DEPLOYMENT)
    return config


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str, deadline: float = DEADLINE) -> None:
    """Poll `check` until it holds; fail naming `what` after `deadline` seconds."""
    end = time.monotonic() + deadline
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        await asyncio.sleep(0.01)


# -- raw HTTP over the socket ----------------------------------------------------------------
class Raw:
    """One raw HTTP/1.1 exchange: status, headers (lower-case names), body."""

    def __init__(self, data: bytes) -> None:
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith(("HTTP/1.1 ", "HTTP/1.0 ")), data[:200]
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def error(self) -> dict[str, str]:
        assert self.headers.get("content-type", "").startswith("application/json"), (self.status, self.body)
        detail = json.loads(self.body)["error"]
        assert set(detail) == {"kind", "message"}
        return dict(detail)


def request_bytes(method: str, target: str, body: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: orch\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


async def raw(sock: Path, method: str, target: str, body: bytes = b"") -> Raw:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(request_bytes(method, target, body))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Raw(data)


# -- server-sent events -----------------------------------------------------------------------
class EventStream:
    """GET /v1/events on its own connection; `message()` is the next SSE message's fields."""

    def __init__(self, sock: Path, params: dict[str, str]) -> None:
        self.sock, self.params = sock, params
        self.seen = 0  # messages returned so far
        self.live_after: int | None = None  # how many had been returned when `event: live` came
        self.session: aiohttp.ClientSession | None = None
        self.response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> EventStream:
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.sock)))
        self.response = await asyncio.wait_for(self.session.get("http://orch/v1/events", params=self.params), DEADLINE)
        assert self.response.status == 200, await self.response.read()
        assert self.response.headers["Content-Type"] == "text/event-stream"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.response is not None:
            self.response.close()
        if self.session is not None:
            await self.session.close()

    async def message(self, timeout: float = DEADLINE) -> dict[str, str]:
        assert self.response is not None
        fields: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), timeout)
            if not line:
                raise AssertionError(f"the stream ended; fields so far {fields}")
            text = line.decode().rstrip("\n")
            if not text:
                if fields.get("event") == "live":  # the end-of-history marker
                    self.live_after = self.seen
                    fields = {}
                    continue
                if fields:
                    self.seen += 1
                    return fields
                continue
            if text.startswith(":"):  # a keep-alive comment
                continue
            name, _, value = text.partition(": ")
            assert name not in fields, f"repeated field {name!r} in one message"
            fields[name] = value

    async def event(self, timeout: float = DEADLINE) -> dict[str, Any]:
        """The next ordinary event (its `id:` checked against its seq)."""
        fields = await self.message(timeout)
        assert set(fields) == {"id", "data"}, fields
        event: dict[str, Any] = json.loads(fields["data"])
        assert int(fields["id"]) == event["seq"]
        return event


# -- the orchestrator, served -----------------------------------------------------------------
class Served:
    def __init__(self, root: Path, config: Path, orchestrator: Orchestrator, server: ControlServer) -> None:
        self.root, self.config, self.orchestrator, self.server = root, config, orchestrator, server
        self.sock = server.path

    def client(self, **kwargs: Any) -> Client:
        return Client(self.sock, **kwargs)

    async def json(self, method: str, path: str, body: bytes = b"") -> Any:
        async with self.client() as api:
            return await api.json(method, path, data=body)

    async def error(self, method: str, path: str, body: bytes | None = None, **params: str) -> RemoteError:
        async with self.client() as api:
            with pytest.raises(RemoteError) as caught:
                await api.request(method, path, data=body, params=params or None)
        return caught.value

    async def count(self) -> int:
        async with self.client() as api:
            output, _ = await api.call("counter", "get", b"")
        return int(json.loads(output)["count"])


@contextlib.asynccontextmanager
async def serve(root: Path, *, watch: bool = False) -> AsyncIterator[Served]:
    config = root / "config.yaml"
    orchestrator = Orchestrator(config, watch=watch)
    await orchestrator.start()
    server = ControlServer(orchestrator, state_dir=root / ".orch")
    try:
        await server.start()
        yield Served(root, config, orchestrator, server)
    finally:
        await server.stop()
        await orchestrator.stop(2)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    add_oddball(tmp_path)
    async with serve(tmp_path) as running:
        yield running


# == 1. every endpoint's success shape =========================================================
async def test_status_describes_the_orchestrator_and_every_capsule(served: Served) -> None:
    status = await served.json("GET", "/v1/status")
    info = status["orchestrator"]
    assert info["config_path"] == str(served.config)
    assert info["config_sha256"] == hashlib.sha256(served.config.read_bytes()).hexdigest()
    assert isinstance(info["uptime_s"], float | int) and info["uptime_s"] >= 0
    capsules = status["capsules"]
    assert [c["name"] for c in capsules] == ["counter", "milestones", "notes", "oddball"]
    for capsule in capsules:
        assert capsule["phase"] == "Running" and capsule["instances"] == 1
        assert len(capsule["version"]) == 12 and capsule["reload_count"] == 0
    assert SECRET not in json.dumps(status)

    # commit the deployment: a reconcile records the revision, and "-dirty" once a tracked file changes
    git = [
        "git",
        "-C",
        str(served.root),
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "-c",
        "commit.gpgsign=false",
    ]
    for args in (["init", "-q"], ["add", "config.yaml", "capsules"], ["commit", "-q", "-m", "deploy"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], check=True, capture_output=True, text=True)
    await served.json("POST", "/v1/reconcile")
    assert (await served.json("GET", "/v1/status"))["orchestrator"]["git_revision"] == head.stdout.strip()
    served.config.write_text(served.config.read_text() + "\n")
    await served.json("POST", "/v1/reconcile")
    later = (await served.json("GET", "/v1/status"))["orchestrator"]
    assert later["git_revision"] == head.stdout.strip() + "-dirty"
    assert later["config_sha256"] == hashlib.sha256(served.config.read_bytes()).hexdigest()
    assert later["uptime_s"] >= info["uptime_s"]


async def test_capsule_detail_shows_tools_capabilities_limits_and_masks_secrets(served: Served) -> None:
    async with served.client() as api:
        _, _, body = await api.request("GET", "/v1/capsules/oddball")
        counter = await api.capsule("counter")
        milestones = await api.capsule("milestones")
    assert SECRET.encode() not in body and SECRET_DEFAULT.encode() not in body
    oddball = json.loads(body)
    assert oddball["config"] == {"token": "***", "greeting": "hi"}
    assert oddball["env"]["token"] == {"type": "secret", "description": "an API token"}  # no default shown
    assert oddball["limits"]["fuel"] == 1_000_000  # the manifest's [limits] over the config's defaults
    assert [t["name"] for t in oddball["tools"]] == ["ok", "fail", "spin", "trap"]
    assert oddball["status"]["phase"] == "Running" and oddball["enabled"] is True

    assert counter["package"]["name"] == "counter" and counter["package"]["version"] == "0.1.0"
    increment = next(t for t in counter["tools"] if t["name"] == "increment")
    assert increment["input_schema"]["properties"]["by"]["type"] == "integer"
    assert counter["capabilities"]["kv"] is True and counter["capabilities"]["ipc_publish"] == ["counter.*"]
    assert counter["limits"] == {"fuel": 100_000_000, "memory_mib": 64, "timeout_ms": 2000}
    assert counter["config"] == {"step": "1"} and counter["interceptors"] == []
    assert (
        counter["wasm_sha256"]
        == hashlib.sha256((served.root / "capsules/counter/counter.wasm").read_bytes()).hexdigest()
    )
    assert [h["event"] for h in counter["history"]] == ["starting", "running"]

    assert [(i["action"], i["priority"]) for i in milestones["interceptors"]] == [
        ("on_counter_changed_first", 10),
        ("on_counter_changed", 100),
    ]
    assert milestones["depends_on"] == ["counter"]


async def test_tool_calls_return_the_output_with_fuel_and_content_type(served: Served) -> None:
    async with served.client() as api:
        status, headers, body = await api.request("POST", "/v1/capsules/counter/tools/increment", data=b'{"by": 2}')
        assert status == 200 and json.loads(body) == {"count": 2}
        assert headers["Content-Type"].startswith("application/json")
        assert int(headers["X-Fuel-Used"]) > 0 and float(headers["X-Seconds"]) >= 0
        body, _ = await api.call("counter", "increment", b"")  # no body: the `step` config (1)
        assert json.loads(body) == {"count": 3}
        body, headers = await api.call("oddball", "ok", b"")
        assert body == b"ok" and headers["Content-Type"] == "application/octet-stream"
        status_after = {c["name"]: c for c in (await api.status())["capsules"]}
    assert status_after["counter"]["calls"] == 2 and status_after["counter"]["errors"] == 0
    assert status_after["oddball"]["fuel_last"] == int(headers["X-Fuel-Used"])


async def test_kv_set_get_list_and_delete(served: Served) -> None:
    value = bytes(range(256)) + b"\x00end"
    async with served.client() as api:
        assert await api.kv_set("counter", "greeting", value) == {"capsule": "counter", "key": "greeting", "bytes": 260}
        status, headers, body = await api.request("GET", "/v1/kv/counter/greeting")
        assert (status, body) == (200, value) and headers["Content-Type"] == "application/octet-stream"
        await api.kv_set("counter", "a_b", b"1")
        await api.kv_set("counter", "axb", b"2")
        await api.kv_set("counter", "count", b"41")  # the capsule sees what the API wrote
        assert json.loads((await api.call("counter", "increment", b'{"by": 1}'))[0]) == {"count": 42}
        assert (await api.kv_list("counter"))["keys"] == ["a_b", "axb", "count", "greeting"]
        listed = await api.kv_list("counter", "a_")  # a prefix, not a LIKE pattern
        assert listed == {"capsule": "counter", "prefix": "a_", "keys": ["a_b"]}
        assert (await api.kv_list("counter", "gr"))["keys"] == ["greeting"]
        assert (await api.kv_list("notes"))["keys"] == []  # one capsule never sees another's keys
        assert await api.kv_delete("counter", "greeting") == {"capsule": "counter", "key": "greeting", "deleted": True}
        with pytest.raises(RemoteError) as missing:
            await api.kv_get("counter", "greeting")
        assert (missing.value.status, missing.value.kind) == (404, "NoSuchKey")
        with pytest.raises(RemoteError) as gone:
            await api.kv_delete("counter", "greeting")
        assert gone.value.status == 404
        assert (await api.kv_list("counter"))["keys"] == ["a_b", "axb", "count"]


async def test_plan_and_reconcile_apply_an_edited_config(served: Served) -> None:
    async with served.client() as api:
        assert {a["action"] for a in (await api.plan())["actions"]} == {"keep"}
        served.config.write_text(served.config.read_text().replace("step: 1", "step: 5"))
        planned = await api.plan()
        changed = [a for a in planned["actions"] if a["action"] != "keep"]
        assert [(a["capsule"], a["action"]) for a in changed] == [("counter", "reload")]
        assert any("config.step" in reason for reason in changed[0]["reasons"])
        applied = await api.reconcile()
        assert applied == planned  # the plan applied is the plan shown
        assert json.loads((await api.call("counter", "increment", b""))[0]) == {"count": 5}
        assert {a["action"] for a in (await api.plan())["actions"]} == {"keep"}
        counter = await api.capsule("counter")
        assert counter["config"] == {"step": "5"} and counter["status"]["reload_count"] == 1
        # a secret's new value never shows in a plan
        served.config.write_text(served.config.read_text().replace(SECRET, "another-" + SECRET))
        _, _, body = await api.request("POST", "/v1/reconcile")
    assert SECRET.encode() not in body
    reasons = next(a for a in json.loads(body)["actions"] if a["capsule"] == "oddball")["reasons"]
    assert any(r.startswith("config.token") for r in reasons), reasons


async def test_restart_swaps_to_a_fresh_version_and_keeps_state(served: Served) -> None:
    async with served.client() as api:
        await api.call("counter", "increment", b'{"by": 7}')
        first = await api.restart("counter")
        assert first["name"] == "counter" and first["phase"] == "Running" and first["reload_count"] == 1
        second = await api.restart("counter")
        assert second["reload_count"] == 2 and second["version"] == first["version"]
        assert json.loads((await api.call("counter", "get", b""))[0]) == {"count": 7}
        detail = await api.capsule("counter")
    assert [h["event"] for h in detail["history"]][-2:] == ["reloaded", "reloaded"]


async def test_events_stream_history_then_live_with_a_topic_filter(served: Served) -> None:
    async with served.client() as api:
        for _ in range(3):
            await api.call("counter", "increment", b'{"by": 1}')
    bus = served.orchestrator.bus
    before = bus.subscribers
    async with EventStream(served.sock, {"topic": "counter.changed", "history": "2"}) as stream:
        await eventually(lambda: bus.subscribers == before + 1, "the stream subscribed")
        history = [await stream.event(), await stream.event()]
        assert [e["payload"] for e in history] == [{"count": 2}, {"count": 3}]
        assert history[0]["seq"] < history[1]["seq"] and history[0]["source"] == "counter"
        bus.publish("other.topic", {"skip": True})
        async with served.client() as api:
            await api.call("counter", "increment", b'{"by": 1}')
        live = await stream.event()
        assert stream.live_after == 2  # the end-of-history marker came right after the history
        assert live["topic"] == "counter.changed" and live["payload"] == {"count": 4}
        assert set(live) == {"topic", "payload", "source", "seq", "timestamp_ms"}
        assert live["seq"] > history[1]["seq"]
    async with EventStream(served.sock, {"topic": "orch.capsule.*.running", "history": str(MAX_HISTORY)}) as stream:
        names = sorted([(await stream.event())["topic"].split(".")[2] for _ in range(4)])
        assert names == ["counter", "milestones", "notes", "oddball"]
    async with served.client() as api:  # the client helper yields the same events as dicts
        seen = []
        async for item in api.events("counter.changed", history=4):
            if "live" in item:
                continue
            seen.append(item["payload"]["count"])
            if len(seen) == 4:
                break
    assert seen == [1, 2, 3, 4]
    topics = ("counter.changed", "orch.capsule.test.running")
    await eventually(cleaned_while_events_flow(served, before, *topics), "every stream cleaned up")


# == 2. errors: status codes and JSON bodies ===================================================
async def test_bad_input_is_400_naming_the_problem(served: Served) -> None:
    bad_json = await served.error("POST", "/v1/capsules/counter/tools/increment", b"{nope")
    assert (bad_json.status, bad_json.kind) == (400, "BadJson") and "not valid JSON" in str(bad_json)
    bad_field = await served.error("POST", "/v1/capsules/counter/tools/increment", b'{"by": "x"}')
    assert (bad_field.status, bad_field.kind) == (400, "ToolInputError") and "/by" in str(bad_field)
    not_object = await served.error("POST", "/v1/capsules/counter/tools/increment", b"[1, 2]")
    assert not_object.status == 400
    assert await served.count() == 0  # the guest never ran
    raw_answer = await raw(served.sock, "POST", "/v1/capsules/counter/tools/increment", b"\xff\xfe")
    assert raw_answer.status == 400 and raw_answer.error()["kind"] == "BadJson"


async def test_deeply_nested_json_is_400_not_a_crash(served: Served) -> None:
    depth = 100_000
    answer = await raw(served.sock, "POST", "/v1/capsules/counter/tools/increment", b"[" * depth + b"]" * depth)
    assert answer.status == 400, (answer.status, answer.body[:200])
    assert answer.error()["kind"] == "BadJson"
    assert await served.count() == 0


async def test_a_guest_trap_is_422_and_the_capsule_keeps_serving(served: Served) -> None:
    trapped = await served.error("POST", "/v1/capsules/oddball/tools/trap")
    assert (trapped.status, trapped.kind) == (422, "CapsuleTrap") and "unreachable" in str(trapped)
    overflow = await served.error("POST", "/v1/capsules/counter/tools/increment", b'{"by": 99999999999999999999999}')
    assert overflow.status == 422 and "must be an integer" in str(overflow)  # the guest's own abort
    async with served.client() as api:
        assert (await api.call("oddball", "ok", b""))[0] == b"ok"
    assert await served.count() == 0


async def test_capability_denied_is_403(served: Served) -> None:
    denied = await served.error("POST", "/v1/capsules/notes/tools/peek", json.dumps({"path": "/etc/passwd"}).encode())
    assert (denied.status, denied.kind) == (403, "CapabilityDenied")
    assert "/etc/passwd" in str(denied) or "denied" in str(denied)
    async with served.client() as api:  # inside its grant it works
        await api.call("notes", "write", b'{"name": "a", "text": "b"}')
        assert json.loads((await api.call("notes", "read", b'{"name": "a"}'))[0]) == {"name": "a", "text": "b"}


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("GET", "/v1/capsules/nope", "UnknownCapsule"),
        ("POST", "/v1/capsules/nope/tools/get", "UnknownCapsule"),
        ("POST", "/v1/capsules/nope/restart", "UnknownCapsule"),
        ("POST", "/v1/capsules/counter/tools/explode", "UnknownTool"),
        ("GET", "/v1/kv/counter/no-such-key", "NoSuchKey"),
        ("DELETE", "/v1/kv/counter/no-such-key", "NoSuchKey"),
        ("GET", "/v1/kv/nope", "UnknownCapsule"),
        ("PUT", "/v1/kv/nope/key", "UnknownCapsule"),
        ("GET", "/v1/nope", "NotFound"),
        ("GET", "/", "NotFound"),
        ("GET", "/v2/status", "NotFound"),
    ],
)
async def test_unknown_things_are_404(served: Served, method: str, path: str, kind: str) -> None:
    error = await served.error(method, path, b"x" if method == "PUT" else None)
    assert (error.status, error.kind) == (404, kind), str(error)
    assert str(error)


async def test_a_disabled_capsule_is_409(served: Served) -> None:
    text = served.config.read_text().replace(
        "    path: capsules/notes\n", "    path: capsules/notes\n    enabled: false\n"
    )
    served.config.write_text(text)
    applied = await served.json("POST", "/v1/reconcile")
    assert [(a["capsule"], a["action"]) for a in applied["actions"] if a["action"] != "keep"] == [("notes", "stop")]
    called = await served.error("POST", "/v1/capsules/notes/tools/list", b"{}")
    assert (called.status, called.kind) == (409, "CapsuleNotRunning")
    restarted = await served.error("POST", "/v1/capsules/notes/restart")
    assert (restarted.status, restarted.kind) == (409, "CapsuleNotRunning") and "enabled: false" in str(restarted)
    detail = await served.json("GET", "/v1/capsules/notes")
    assert detail["enabled"] is False and detail["status"]["phase"] == "Stopped"
    assert await served.count() == 0  # the others keep serving


async def test_bodies_over_the_cap_are_413(served: Served, tmp_path: Path) -> None:
    small_dir = tmp_path / "small"
    small_dir.mkdir(mode=0o700)
    small = ControlServer(served.orchestrator, state_dir=small_dir, max_body=1024)
    await small.start()
    try:
        async with Client(small.path) as api:
            assert (await api.kv_set("counter", "fits", b"x" * 1024))["bytes"] == 1024
            with pytest.raises(RemoteError) as kv:
                await api.kv_set("counter", "big", b"x" * 1025)
            assert (kv.value.status, kv.value.kind) == (413, "TooLarge")
            arguments = json.dumps({"by": 1, "pad": "x" * 4096}).encode()
            with pytest.raises(RemoteError) as call:
                await api.call("counter", "increment", arguments)
            assert call.value.status == 413
            assert (await api.kv_list("counter"))["keys"] == ["fits"]
            assert (await api.status())["capsules"][0]["calls"] == 0  # nothing ran
    finally:
        await small.stop()


async def test_guest_errors_are_422(served: Served) -> None:
    failed = await served.error("POST", "/v1/capsules/oddball/tools/fail")
    assert (failed.status, failed.kind) == (422, "GuestError") and "boom" in str(failed)
    oddball = await served.json("GET", "/v1/capsules/oddball")
    assert oddball["status"]["errors"] == 1 and oddball["status"]["phase"] == "Running"


async def test_an_invalid_config_on_reconcile_is_422_and_changes_nothing(served: Served) -> None:
    good = served.config.read_text()
    served.config.write_text(good.replace("depends_on: [counter]", "depends_on: [countr]"))
    rejected = await served.error("POST", "/v1/reconcile")
    assert (rejected.status, rejected.kind) == (422, "ConfigError")
    assert "countr" in str(rejected) and "config.yaml" in str(rejected)
    planned = await served.error("GET", "/v1/plan")
    assert planned.status == 422
    served.config.write_text("version: 1\ncapsules: [\n")
    assert (await served.error("POST", "/v1/reconcile")).status == 422
    status = await served.json("GET", "/v1/status")
    assert {c["phase"] for c in status["capsules"]} == {"Running"}
    assert await served.count() == 0


async def test_fuel_exhaustion_is_504(served: Served) -> None:
    spun = await served.error("POST", "/v1/capsules/oddball/tools/spin")
    assert (spun.status, spun.kind) == (504, "FuelExhausted") and "fuel" in str(spun)
    async with served.client() as api:  # the capsule keeps working
        assert (await api.call("oddball", "ok", b""))[0] == b"ok"


@pytest.mark.parametrize(
    ("params", "kind", "needle"),
    [
        ({"topic": "a..b"}, "BadPattern", "topic"),
        ({"topic": "a.>.b"}, "BadPattern", "'>'"),
        ({"topic": "a.b*"}, "BadPattern", "whole token"),
        ({"topic": ""}, "BadPattern", "empty"),
        ({"history": "-1"}, "BadRequest", "between"),
        ({"history": "lots"}, "BadRequest", "integer"),
        ({"history": str(MAX_HISTORY + 1)}, "BadRequest", "between"),
    ],
)
async def test_bad_event_queries_are_400(served: Served, params: dict[str, str], kind: str, needle: str) -> None:
    error = await served.error("GET", "/v1/events", **params)
    assert (error.status, error.kind) == (400, kind) and needle in str(error)
    assert served.server.api.streams == 0


# == 3. safety ==================================================================================
async def test_the_client_says_when_nothing_runs(tmp_path: Path) -> None:
    async with Client(tmp_path / "missing" / "orch.sock") as api:
        with pytest.raises(NotRunning, match="orch up"):
            await api.status()
        with pytest.raises(NotRunning):
            async for _ in api.events():
                pass


async def test_the_client_reports_a_refused_event_query_as_a_remote_error(served: Served) -> None:
    async with served.client() as api:
        with pytest.raises(RemoteError) as refused:
            async for _ in api.events("a.." + "b"):
                pass
        assert (refused.value.status, refused.value.kind) == (400, "BadPattern")
        with pytest.raises(RemoteError) as too_long:  # refused by the HTTP parser: not a JSON body
            async for _ in api.events("a" * 9000):
                pass
        assert too_long.value.status == 400


async def test_the_socket_is_private(served: Served) -> None:
    info = os.stat(served.sock)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(served.sock.parent).st_mode) & 0o077 == 0


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
async def test_a_state_dir_others_can_write_is_refused(served: Served, tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    server = ControlServer(served.orchestrator, state_dir=shared)
    with pytest.raises(OrchestratorError, match="chmod go-w"):
        await server.start()
    assert not (shared / "orch.sock").exists()
    await server.stop()


async def test_a_directory_where_the_socket_goes_is_an_orchestrator_error(served: Served, tmp_path: Path) -> None:
    odd = tmp_path / "odd"
    (odd / "orch.sock").mkdir(parents=True)
    os.chmod(odd, 0o700)
    server = ControlServer(served.orchestrator, state_dir=odd)
    with pytest.raises(OrchestratorError):  # `orch up` reports these in one line (not a traceback)
        await server.start()
    await server.stop()


async def test_a_second_server_on_the_same_socket_is_refused(served: Served) -> None:
    second = ControlServer(served.orchestrator, state_dir=served.sock.parent)
    with pytest.raises(OrchestratorError, match="already serving"):
        await second.start()
    assert served.sock.exists()
    assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4  # the first still serves


async def test_a_stale_socket_or_symlink_is_replaced(served: Served, tmp_path: Path) -> None:
    stale_dir = tmp_path / "stale"
    stale_dir.mkdir(mode=0o700)
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale_dir / "orch.sock"))  # bound, never listening: what a crash leaves
    leftover.close()
    assert not socket_alive(stale_dir / "orch.sock")
    server = ControlServer(served.orchestrator, state_dir=stale_dir)
    await server.start()
    try:
        async with Client(server.path) as api:
            assert len((await api.status())["capsules"]) == 4
    finally:
        await server.stop()
    assert not (stale_dir / "orch.sock").exists()

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (stale_dir / "orch.sock").symlink_to(target)
    server = ControlServer(served.orchestrator, state_dir=stale_dir)
    await server.start()
    try:
        assert stat.S_ISSOCK(os.lstat(server.path).st_mode)
        assert target.read_text() == "keep me"
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/v1/capsules/..%2F..%2Fetc"),
        ("GET", "/v1/capsules/%2E%2E"),
        ("GET", "/v1/capsules/counter%00"),
        ("POST", "/v1/capsules/..%2Fcounter/tools/get"),
        ("POST", "/v1/capsules/counter/tools/..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/v1/kv/..%2F..%2Fetc"),
        ("GET", "/v1/kv/..%2F..%2Fetc/passwd"),
        ("GET", "/v1/kv/counter/..%2F..%2Fetc%2Fpasswd"),
        ("GET", "/v1/kv/counter/../../../etc/passwd"),
        ("GET", "/v1/kv/counter/a%00b"),
        ("PUT", "/v1/kv/counter/a%00b"),
        ("GET", "/v1/kv/counter/%ff%fe"),
        ("GET", "/v1/kv/counter/" + "k" * 4097),
        ("PUT", "/v1/kv/counter/" + "k" * 5000),
    ],
    ids=lambda value: value if len(value) < 60 else f"{value[:30]}...({len(value)} chars)",
)
async def test_path_tricks_are_4xx_and_never_escape(served: Served, method: str, target: str) -> None:
    answer = await raw(served.sock, method, target, b"x" if method == "PUT" else b"")
    assert 400 <= answer.status < 500, (answer.status, answer.body[:300])
    detail = answer.error()
    assert detail["kind"] and detail["message"]
    if answer.status == 400:
        assert detail["kind"] == "GateError", detail
    async with served.client() as api:
        assert (await api.kv_list("counter"))["keys"] == []  # nothing written anywhere
    assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4


async def test_keys_are_literal_text_slashes_and_dots_included(served: Served) -> None:
    async with served.client() as api:
        await api.kv_set("counter", "a/b/c", b"slashes")  # sent as a%2Fb%2Fc
        await api.kv_set("counter", "../../etc/passwd", b"dots")
        await api.kv_set("counter", "k" * 4096, b"longest")
        answer = await raw(served.sock, "GET", "/v1/kv/counter/a/b/c")  # plain slashes: the same key
        assert (answer.status, answer.body) == (200, b"slashes")
        assert await api.kv_get("counter", "../../etc/passwd") == b"dots"
        assert await api.kv_get("counter", "k" * 4096) == b"longest"
        assert (await api.kv_list("counter", "a/"))["keys"] == ["a/b/c"]
        assert (await api.kv_list("counter", "../"))["keys"] == ["../../etc/passwd"]
        with pytest.raises(RemoteError) as too_long:
            await api.kv_set("counter", "k" * 4097, b"x")
        assert (too_long.value.status, too_long.value.kind) == (400, "GateError") and "4096" in str(too_long.value)
    assert not (served.root / "etc").exists()


async def test_idle_and_truncated_connections_leave_the_server_healthy(served: Served) -> None:
    idle_reader, idle_writer = await asyncio.open_unix_connection(str(served.sock))
    half_reader, half_writer = await asyncio.open_unix_connection(str(served.sock))
    half_writer.write(
        b"POST /v1/capsules/counter/tools/increment HTTP/1.1\r\nHost: orch\r\nContent-Length: 100\r\n\r\n" + b'{"by": 5'
    )
    await half_writer.drain()
    half_writer.close()
    await half_writer.wait_closed()
    garbage_reader, garbage_writer = await asyncio.open_unix_connection(str(served.sock))
    garbage_writer.write(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 not http at all\r\n\r\n")
    await garbage_writer.drain()
    answer = await asyncio.wait_for(garbage_reader.read(), DEADLINE)
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")) or answer == b""
    garbage_writer.close()
    await garbage_writer.wait_closed()
    async with served.client() as api:  # while the idle connection is still open
        assert json.loads((await api.call("counter", "increment", b'{"by": 1}'))[0]) == {"count": 1}
        assert len((await api.status())["capsules"]) == 4
    idle_writer.close()
    await idle_writer.wait_closed()
    assert await served.count() == 1  # the truncated call never ran
    del idle_reader, half_reader


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("PATCH", "/v1/status"),
        ("DELETE", "/v1/status"),
        ("POST", "/v1/plan"),
        ("GET", "/v1/reconcile"),
        ("GET", "/v1/capsules/counter/tools/get"),
        ("GET", "/v1/capsules/counter/restart"),
        ("POST", "/v1/kv/counter/key"),
    ],
)
async def test_unknown_methods_are_405(served: Served, method: str, target: str) -> None:
    answer = await raw(served.sock, method, target)
    assert answer.status == 405
    assert answer.error()["kind"] == "MethodNotAllowed"
    assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4


async def test_a_405_names_the_allowed_methods(served: Served) -> None:
    answer = await raw(served.sock, "DELETE", "/v1/status")
    assert answer.status == 405
    assert set(answer.headers.get("allow", "").split(",")) == {"GET", "HEAD"}  # RFC 9110: a 405 carries Allow


async def test_requests_the_parser_refuses_are_400_and_harmless(served: Served) -> None:
    for request in (
        b"BREW /v1/status HTTP/1.1\r\nHost: orch\r\n\r\n",
        b"GET /v1/kv/counter/" + b"%C3%A9" * 4000 + b" HTTP/1.1\r\nHost: orch\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: orch\r\nX-Big: " + b"x" * 10_000 + b"\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: orch\r\n\r\n",
    ):
        reader, writer = await asyncio.open_unix_connection(str(served.sock))
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), DEADLINE)
        writer.close()
        await writer.wait_closed()
        assert Raw(answer).status == 400, answer[:200]
    assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4


async def test_a_valid_key_of_4096_bytes_works_whatever_its_characters(served: Served) -> None:
    key = "é" * 2048  # 4096 bytes of UTF-8: within the limit, but 12 KB once percent-encoded
    async with served.client() as api:
        await api.kv_set("counter", key, b"accented")
        assert await api.kv_get("counter", key) == b"accented"


async def test_a_key_that_is_not_utf8_is_400(served: Served) -> None:
    answer = await raw(served.sock, "PUT", "/v1/kv/counter/%ff%fe", b"x")
    assert answer.status == 400 and answer.error()["kind"] == "GateError", (answer.status, answer.body)
    async with served.client() as api:
        assert (await api.kv_list("counter"))["keys"] == []


async def test_keys_made_of_dots_work_through_the_client(served: Served) -> None:
    async with served.client() as api:
        for key in (".", ".."):
            await api.kv_set("counter", key, key.encode())
            assert await api.kv_get("counter", key) == key.encode()
        assert (await api.kv_list("counter"))["keys"] == [".", ".."]


# == 4. load ====================================================================================
async def test_many_concurrent_clients_all_succeed(served: Served) -> None:
    clients, calls = 16, 50
    failures: list[BaseException] = []
    outputs: list[int] = []

    async def one_client() -> None:
        async with served.client() as api:
            for _ in range(calls):
                try:
                    body, _ = await api.call("counter", "increment", b'{"by": 1}')
                    outputs.append(json.loads(body)["count"])
                except RemoteError as error:
                    failures.append(error)

    await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(clients))), 60)
    assert failures == []
    assert sorted(outputs) == list(range(1, clients * calls + 1))  # every call saw its own count
    async with served.client() as api:
        assert await api.kv_get("counter", "count") == str(clients * calls).encode()
        counter = next(c for c in (await api.status())["capsules"] if c["name"] == "counter")
    assert counter["calls"] == clients * calls and counter["errors"] == 0


async def test_no_call_fails_while_the_capsule_reloads(served: Served) -> None:
    clients, at_least = 8, 20
    failures: list[BaseException] = []
    succeeded = 0
    reloads_done = asyncio.Event()

    async def caller() -> None:
        nonlocal succeeded
        async with served.client() as api:
            made = 0
            while made < at_least or not reloads_done.is_set():  # calls run before, during and after
                made += 1
                try:
                    await api.call("counter", "increment", b'{"by": 1}')
                    succeeded += 1
                except RemoteError as error:
                    failures.append(error)

    async def reloader() -> None:
        await eventually(lambda: succeeded >= clients, "calls under way")
        async with served.client() as api:
            for step in range(2, 6):
                assert (await api.restart("counter"))["phase"] == "Running"
                replace_atomically(
                    served.config, served.config.read_text().replace(f"step: {step - 1}", f"step: {step}")
                )
                applied = await api.reconcile()
                assert ("counter", "reload") in [(a["capsule"], a["action"]) for a in applied["actions"]]
        reloads_done.set()

    await asyncio.wait_for(asyncio.gather(reloader(), *(caller() for _ in range(clients))), 60)
    assert failures == []
    assert succeeded >= clients * at_least
    assert await served.count() == succeeded  # every acknowledged call counted once, across 8 versions
    counter = await served.json("GET", "/v1/capsules/counter")
    assert counter["status"]["reload_count"] == 8 and counter["status"]["errors"] == 0
    assert counter["status"]["phase"] == "Running" and counter["config"] == {"step": "5"}


# == 5. durability across a SIGKILL ==============================================================
async def test_acknowledged_calls_survive_a_sigkill(tmp_path: Path) -> None:
    config = example_deployment(tmp_path)
    sock = tmp_path / ".orch" / "orch.sock"
    process = spawn_up(config, tmp_path / "up.log")
    try:
        await asyncio.to_thread(wait_serving, process, sock, tmp_path / "up.log")
        calls = 40
        async with Client(sock) as api:
            for expected in range(1, calls + 1):
                body, _ = await api.call("counter", "increment", b'{"by": 1}')
                assert json.loads(body) == {"count": expected}
            process.send_signal(signal.SIGKILL)  # right after the last acknowledgement
    finally:
        process.kill()
        await asyncio.to_thread(process.wait, 30)
    assert process.returncode == -signal.SIGKILL
    assert sock.exists()  # a crash leaves the socket file behind
    async with Client(sock) as api:
        with pytest.raises(NotRunning):
            await api.status()
    async with serve(tmp_path) as again, again.client() as api:  # the stale socket is replaced
        assert await api.kv_get("counter", "count") == str(calls).encode()
        assert json.loads((await api.call("counter", "get", b""))[0]) == {"count": calls}


# == 6. streams =================================================================================
def cleaned_while_events_flow(served: Served, subscribers: int, *topics: str) -> Callable[[], bool]:
    """A check that every stream is gone, publishing on `topics` at each poll (a stream whose
    client went away notices when it writes)."""

    def check() -> bool:
        for topic in topics:
            served.orchestrator.bus.publish(topic, None)
        return served.server.api.streams == 0 and served.orchestrator.bus.subscribers == subscribers

    return check


async def test_a_disconnected_stream_is_cleaned_up_once_events_flow(served: Served) -> None:
    bus, api = served.orchestrator.bus, served.server.api
    before = bus.subscribers
    stream = EventStream(served.sock, {"topic": ">"})
    await stream.__aenter__()
    await eventually(lambda: api.streams == 1 and bus.subscribers == before + 1, "one stream open")
    bus.publish("test.first", 1)
    assert (await stream.event())["topic"] == "test.first"
    await stream.close()
    await eventually(cleaned_while_events_flow(served, before, "test.tick"), "the stream cleaned up")
    assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4


async def test_history_beyond_the_queue_is_delivered_or_announced_lost(served: Served) -> None:
    bus, wanted = served.orchestrator.bus, 5000
    for i in range(wanted):
        bus.publish("hist.tick", {"i": i})
    before = bus.subscribers
    async with EventStream(served.sock, {"topic": "hist.>", "history": str(wanted)}) as stream:
        await eventually(lambda: bus.subscribers == before + 1, "the stream subscribed")
        bus.publish("hist.end", None)
        delivered, dropped = 0, 0
        while True:
            fields = await stream.message()
            if fields.get("event") == "lost":
                dropped += json.loads(fields["data"])["dropped"]
                continue
            if json.loads(fields["data"])["topic"] == "hist.end":
                break
            delivered += 1
    assert (delivered, dropped) != (4096, 0), "history was cut to the queue size without a notice"
    assert delivered + dropped == wanted
    await eventually(cleaned_while_events_flow(served, before, "hist.tick"), "the stream cleaned up")


async def test_a_disconnected_stream_is_cleaned_up_without_further_events(served: Served) -> None:
    bus, api = served.orchestrator.bus, served.server.api
    before = bus.subscribers
    streams = [EventStream(served.sock, {"topic": "never.published.>"}) for _ in range(3)]
    for stream in streams:
        await stream.__aenter__()
    await eventually(lambda: api.streams == 3 and bus.subscribers == before + 3, "three streams open")
    for stream in streams:
        await stream.close()
    await eventually(lambda: api.streams == 0 and bus.subscribers == before, "the streams cleaned up", deadline=5)


async def test_a_slow_reader_loses_events_with_a_notice_and_never_slows_the_orchestrator(served: Served) -> None:
    bus, total = served.orchestrator.bus, 50_000
    before = bus.subscribers
    async with EventStream(served.sock, {"topic": "flood.>"}) as stream:
        await eventually(lambda: bus.subscribers == before + 1, "the stream subscribed")
        first_seq = bus.last_seq + 1
        for start in range(0, total, 1000):  # the reader reads nothing meanwhile
            for i in range(start, start + 1000):
                bus.publish("flood.tick", {"i": i})
            await asyncio.sleep(0)
        last_seq = bus.last_seq
        async with served.client(timeout=DEADLINE) as api:  # responsive while the stream is stuck
            assert len((await api.status())["capsules"]) == 4
            assert json.loads((await api.call("counter", "increment", b'{"by": 1}'))[0]) == {"count": 1}
        delivered, dropped, notices, previous = 0, 0, 0, first_seq - 1
        while previous < last_seq:
            fields = await stream.message()
            if fields.get("event") == "lost":
                notice = json.loads(fields["data"])
                assert notice["dropped"] > 0 and notice["total"] == dropped + notice["dropped"]
                dropped += notice["dropped"]
                notices += 1
                continue
            event = json.loads(fields["data"])
            assert event["seq"] > previous and event["topic"] == "flood.tick"
            assert int(fields["id"]) == event["seq"]
            previous = event["seq"]
            delivered += 1
    assert notices >= 1 and dropped > 0
    assert delivered + dropped == total  # every event was delivered or counted as lost
    await eventually(cleaned_while_events_flow(served, before, "flood.tick"), "the stream closed")


# == 7. the operator CLI against `orch up` =======================================================
def orch(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def test_cli_verbs_against_a_running_orchestrator(tmp_path: Path) -> None:
    config = example_deployment(tmp_path)
    sock = tmp_path / ".orch" / "orch.sock"
    process = spawn_up(config, tmp_path / "up.log")
    try:
        wait_serving(process, sock, tmp_path / "up.log")
        table = orch("status", cwd=tmp_path)  # finds the socket from ./config.yaml
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].startswith(str(config)) and " up " in lines[0]
        assert lines[1].split() == ["NAME", "PHASE", "VERSION", "INST", "CALLS", "ERRORS", "FUEL/CALL", "LAST", "ERROR"]
        assert [line.split()[:2] for line in lines[2:]] == [
            ["counter", "Running"],
            ["milestones", "Running"],
            ["notes", "Running"],
        ]

        call = orch("call", "counter", "increment", '{"by":2}', cwd=tmp_path)
        assert (call.returncode, json.loads(call.stdout)) == (0, {"count": 2}), call.stderr
        bad = orch("call", "counter", "increment", '{"by":"x"}', cwd=tmp_path)
        assert bad.returncode == 1 and "/by" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

        as_json = json.loads(orch("status", "--json", "--config", str(config), cwd=tmp_path).stdout)
        counter = next(c for c in as_json["capsules"] if c["name"] == "counter")
        assert as_json["orchestrator"]["config_path"] == str(config) and counter["calls"] == 2

        assert orch("kv", "set", "counter", "note/1", "hello", cwd=tmp_path).returncode == 0
        assert orch("kv", "get", "counter", "note/1", cwd=tmp_path).stdout == "hello"
        assert orch("kv", "ls", "counter", cwd=tmp_path).stdout.split() == ["count", "note/1"]
        assert orch("kv", "ls", "counter", "note", cwd=tmp_path).stdout.split() == ["note/1"]
        assert orch("kv", "del", "counter", "note/1", cwd=tmp_path).returncode == 0
        missing = orch("kv", "get", "counter", "note/1", cwd=tmp_path)
        assert missing.returncode == 1 and "no key" in missing.stderr

        events = orch("events", "--history", "5", "--json", "--socket", str(sock), cwd=tmp_path)
        assert events.returncode == 0, events.stderr
        printed = [json.loads(line) for line in events.stdout.splitlines()]
        assert len(printed) == 5 and printed[-1]["topic"] == "counter.changed"
        assert [e["seq"] for e in printed] == sorted(e["seq"] for e in printed)

        assert orch("reconcile", cwd=tmp_path).stdout.strip() == "no changes"
        config.write_text(config.read_text().replace("step: 1", "step: 3"))
        reconciled = orch("reconcile", cwd=tmp_path)
        assert reconciled.returncode == 0 and reconciled.stdout.startswith("~ counter")
        assert "config.step" in reconciled.stdout

        restarted = orch("restart", "counter", cwd=tmp_path)
        assert restarted.returncode == 0, restarted.stderr
        assert restarted.stdout.startswith("counter: Running version ") and "(reloads: 2)" in restarted.stdout
        unknown = orch("restart", "nope", cwd=tmp_path)
        assert unknown.returncode == 1 and "no capsule 'nope'" in unknown.stderr
        assert json.loads(orch("call", "counter", "increment", cwd=tmp_path).stdout) == {"count": 5}
    finally:
        stop_up(process)
    assert process.returncode == 0
    assert not sock.exists()  # a clean stop removes the socket
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    for args in (
        ("status",),
        ("status", "--socket", str(tmp_path / "nowhere.sock")),
        ("call", "counter", "get", "--socket", str(tmp_path / "stale.sock")),
        ("kv", "ls", "counter"),
    ):
        gone = orch(*args, cwd=tmp_path)
        assert gone.returncode == 3, (args, gone.stdout, gone.stderr)
        assert "no orchestrator is running" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1


def test_cli_events_without_follow_exits_after_a_short_history(tmp_path: Path) -> None:
    config = example_deployment(tmp_path)
    sock = tmp_path / ".orch" / "orch.sock"
    process = spawn_up(config, tmp_path / "up.log")
    try:
        wait_serving(process, sock, tmp_path / "up.log")
        few = orch("events", "--topic", "counter.changed", "--history", "5", "--json", cwd=tmp_path, timeout=60)
        assert (few.returncode, few.stdout) == (0, "")
    finally:
        stop_up(process)
