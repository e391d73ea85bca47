"""The control API against hostile and careless clients (security review findings 13 and 14).

A real ControlServer serves an Orchestrator on a real unix socket (as in tests/test_api.py),
with small ServerLimits where a test needs a cap or a timeout to be reached; raw sockets
play the clients whose exact bytes matter: malformed JSON, queries and HTTP; idle,
trickling and flooding connections; event readers that do not read. One test runs
`orch up` in its own process with a low file-descriptor limit. Assertions are on answers,
counters and what the server holds (buffers, queues), never on timing or memory use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api.client import Client, RemoteError
from orchestrator.api.connections import connection_cap, describe_parser_error
from orchestrator.api.inputs import MAX_JSON_DEPTH, parse_json
from orchestrator.api.responses import ApiError
from orchestrator.api.server import MAX_BODY, ControlServer, ServerLimits
from orchestrator.control.runtime import Orchestrator
from tests.test_api import DEADLINE, Raw, Served, add_oddball, eventually, raw, replace_atomically, serve
from tests.test_cli import example_deployment

MIB = 1 << 20


@contextlib.asynccontextmanager
async def serve_with(root: Path, limits: ServerLimits | None = None) -> AsyncIterator[Served]:
    add_oddball(root)
    config = root / "config.yaml"
    orchestrator = Orchestrator(config, watch=False)
    await orchestrator.start()
    server = ControlServer(orchestrator, state_dir=root / ".orch", limits=limits)
    try:
        await server.start()
        yield Served(root, config, orchestrator, server)
    finally:
        await server.stop()
        await orchestrator.stop(2)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve_with(tmp_path) as running:
        yield running


async def connect(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(served.sock))


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE)
    except (ConnectionResetError, BrokenPipeError):  # closed while we were writing
        return b""


def flood(path: Path, count: int, *, head: bytes = b"") -> list[socket.socket]:
    """`count` connections made with blocking connects (so each waits for room in the listen
    backlog rather than failing), every other one sending `head`. Run it in a thread."""
    sockets = []
    for i in range(count):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))  # blocking: with a timeout set, a full backlog fails at once
        client.settimeout(DEADLINE)
        if head and i % 2:
            client.sendall(head)
        sockets.append(client)
    return sockets


def closed(client: socket.socket) -> bool:
    """Whether the server closed this connection (waits for it, up to DEADLINE)."""
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def lines(reader: asyncio.StreamReader) -> AsyncIterator[str]:
    """The lines of an event stream, however long (StreamReader.readline stops at 64 KiB)."""
    pending = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(1 << 16), DEADLINE)
        assert chunk, "the stream ended"
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            yield line.decode()


def stats(served: Served) -> dict[str, int]:
    assert served.server.guard is not None
    return served.server.guard.stats()


# == finding 13: JSON that is not JSON ===========================================================
INCREMENT = "/v1/capsules/counter/tools/increment"


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        (b'{"by": "\\ud800"}', ["/by", "lone UTF-16 surrogate"]),
        (b'{"by": 1, "tags": ["ok", "\\udfff"]}', ["/tags/1", "surrogate"]),
        (b'{"\\ud800": 1}', ["name", "surrogate"]),
        (b'{"by": NaN}', ["NaN is not a JSON number", "/by"]),
        (b'{"by": Infinity}', ["Infinity", "/by"]),
        (b'{"by": [-Infinity]}', ["-Infinity", "/by/0"]),
        (b'{"by": 1e999}', ["1e999", "range", "/by"]),
        (b'{"by": -1e999}', ["-1e999", "/by"]),
        (b"\xef\xbb\xbf{}", ["byte-order mark"]),
        (b'{"by": "caf\xe9"}', ["not UTF-8", "byte 11"]),
        (b'{"by": ' + b"9" * 5000 + b"}", ["more than 4300 digits"]),
        (b'{"by": 1', ["line 1 column 9"]),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), ["deeper than 64 levels", "/0/0/0"]),
        (b"[" * MAX_BODY, ["deeper than 64 levels"]),  # a whole MiB of '['
        (b"[" * (MAX_BODY // 2) + b"]" * (MAX_BODY // 2), ["deeper than 64 levels"]),
    ],
)
async def test_a_body_that_is_not_exactly_json_is_400_naming_the_problem(
    served: Served, body: bytes, needles: list[str]
) -> None:
    answer = await raw(served.sock, "POST", INCREMENT, body)
    assert answer.status == 400, (answer.status, answer.body[:300])
    error = answer.error()
    assert error["kind"] == "BadJson" and error["message"].startswith("the body is not valid JSON: ")
    for needle in needles:
        assert needle in error["message"], error["message"]
    assert len(error["message"]) < 300  # never an echo of the body
    assert await served.count() == 0  # the guest never ran
    assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4


def test_valid_json_at_the_edges_is_accepted() -> None:
    assert parse_json(b'"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair is one character
    assert parse_json(b"[1.7e308, -0.0, 5e-324, 123456789012345678901234567890]") == [
        1.7e308,
        -0.0,
        5e-324,
        123456789012345678901234567890,
    ]
    deepest = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    value = parse_json(deepest)
    for _ in range(MAX_JSON_DEPTH - 1):
        value = value[0]
    assert value == []
    assert parse_json(b'{"nan": "NaN", "text": "\\u00e9\\u4e2d", "list": [{"a": [{}]}] }')["text"] == "é中"
    assert parse_json(json.dumps([{"k": i} for i in range(1000)]).encode())[999] == {"k": 999}  # many brackets, shallow
    with pytest.raises(ApiError, match="deeper"):
        parse_json(b'{"a": ' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1))


async def test_a_lone_surrogate_no_longer_reaches_the_guest_as_a_500(served: Served) -> None:
    async with served.client() as api:
        with pytest.raises(RemoteError) as caught:
            await api.call("oddball", "ok", b'{"text": "\\udc80"}')
    assert (caught.value.status, caught.value.kind) == (400, "BadJson")
    async with served.client() as api:  # and the capsule still serves
        assert (await api.call("oddball", "ok", b'{"text": "fine"}'))[0] == b"ok"


# == finding 13: queries that are not UTF-8 ======================================================
@pytest.mark.parametrize(
    ("target", "kind", "needles"),
    [
        ("/v1/kv/counter?prefix=%ff", "BadQuery", ["'prefix'", "not UTF-8", "byte 0"]),
        ("/v1/events?topic=%ff", "BadQuery", ["'topic'", "not UTF-8"]),
        ("/v1/events?topic=counter.%C3", "BadQuery", ["'topic'", "byte 8"]),
        ("/v1/events?%ff=1", "BadQuery", ["name", "not UTF-8"]),
        ("/v1/events?topik=a", "BadQuery", ['"topik"', "history, topic"]),
        ("/v1/events?topic=a&topic=b", "BadQuery", ["'topic'", "more than once"]),
        ("/v1/kv/counter?prefix=a&prefix=b", "BadQuery", ["more than once"]),
        ("/v1/kv/counter?prefix=%00", "BadQuery", ["NUL"]),
        ("/v1/kv/counter?prefix=" + "a" * 4097, "BadQuery", ["4096 bytes"]),
        ("/v1/events?history=%2B5", "BadRequest", ["history", "between 0 and"]),
        ("/v1/events?history=1_0", "BadRequest", ["history"]),
        ("/v1/events?history=%D9%A3", "BadRequest", ["history"]),  # an Arabic-Indic digit: int() takes it
        ("/v1/events?history=%205", "BadRequest", ["history"]),
    ],
)
async def test_a_bad_query_is_400_naming_the_parameter(
    served: Served, target: str, kind: str, needles: list[str]
) -> None:
    answer = await raw(served.sock, "GET", target)
    assert answer.status == 400, (answer.status, answer.body[:300])
    error = answer.error()
    assert error["kind"] == kind
    for needle in needles:
        assert needle in error["message"], error["message"]
    assert served.server.api.streams == 0


async def test_percent_encoded_utf8_queries_work(served: Served) -> None:
    async with served.client() as api:
        await api.kv_set("counter", "é/one two", b"1")
        await api.kv_set("counter", "e/plain", b"2")
        assert (await api.kv_list("counter", "é"))["keys"] == ["é/one two"]
    answer = await raw(served.sock, "GET", "/v1/kv/counter?prefix=%C3%A9%2Fone+two")
    assert answer.status == 200 and json.loads(answer.body)["keys"] == ["é/one two"]


# == aiohttp's parser: JSON 400s, one warning ======================================================
PARSER_REFUSES = [
    b"BREW /v1/status HTTP/1.1\r\nHost: orch\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 TLS client hello\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: orch\r\nX-Big: " + b"x" * 10_000 + b"\r\n\r\n",
    b"GET /v1/kv/counter/" + b"k" * 20_000 + b" HTTP/1.1\r\nHost: orch\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n",
    b"GET /v1/kv/counter?prefix=\xff HTTP/1.1\r\nHost: orch\r\n\r\n",
    b"POST /v1/kv/counter/k HTTP/1.1\r\nHost: orch\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
]


async def test_requests_the_parser_refuses_get_json_errors_and_one_rate_limited_warning(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    caplog.set_level(logging.WARNING, logger="orchestrator.api")
    messages = []
    for _ in range(2):
        for request in PARSER_REFUSES:
            reader, writer = await connect(served)
            writer.write(request)
            await writer.drain()
            answer = Raw(await closed_by_server(reader))
            writer.close()
            assert answer.status == 400, answer.body
            error = answer.error()
            assert error["kind"] == "BadHttp"
            assert "TLS client" not in error["message"] and "xxxx" not in error["message"]
            messages.append(error["message"])
    assert any("TLS is not spoken" in m for m in messages)
    assert any("16384 bytes" in m and "8190 bytes" in m for m in messages)
    assert any("too many headers" in m for m in messages)
    assert stats(served)["bad_requests"] == 2 * len(PARSER_REFUSES)
    warnings = [r for r in caplog.records if r.name == "orchestrator.api.connections"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # the rest held back
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.WARNING]
    assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4


def test_parser_errors_are_described_without_the_clients_bytes() -> None:
    from aiohttp import http_exceptions

    assert "TLS" in describe_parser_error(http_exceptions.BadHttpMethod("\x16\x03\x01secret"))
    assert "secret" not in describe_parser_error(http_exceptions.BadStatusLine("secret"))
    assert describe_parser_error(None) == "the request is not valid HTTP/1.1"


async def test_an_unexpected_failure_is_a_json_500_logged_as_an_error(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(served.orchestrator, "info", broken)
    with caplog.at_level(logging.ERROR, logger="orchestrator.api"):
        answer = await raw(served.sock, "GET", "/v1/status")
    assert answer.status == 500
    error = answer.error()
    assert error["kind"] == "InternalError" and "a bug" not in error["message"]
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


# == finding 14: connections =======================================================================
async def test_an_idle_and_trickling_flood_is_capped_and_clients_are_still_served(tmp_path: Path) -> None:
    limits = ServerLimits(max_connections=32)
    async with serve_with(tmp_path, limits) as served, served.client() as api:
        assert json.loads((await api.call("counter", "increment", b'{"by": 1}'))[0]) == {"count": 1}
        # 400 connections, half of them starting a request head they never finish
        sockets = await asyncio.to_thread(flood, served.sock, 400, head=b"GET /v1/status HTTP/1.1\r\nX-Slow: ")
        await eventually(lambda: stats(served)["evicted"] >= 400 - 31, "the flood evicted down to the cap")
        assert stats(served)["connections"] <= 32 and stats(served)["refused"] == 0
        # the client's keep-alive connection outlived the flood: a POST on it still works
        assert json.loads((await api.call("counter", "increment", b'{"by": 1}'))[0]) == {"count": 2}
        async with served.client() as fresh:  # and a new client is served amid the flood
            status = await fresh.status()
            assert len(status["capsules"]) == 4 and status["api"]["max_connections"] == 32
        oldest = await asyncio.gather(*(asyncio.to_thread(closed, client) for client in sockets[:300]))
        assert all(oldest)  # the oldest flood connections were closed to make room
        for client in sockets:
            client.close()
        await eventually(lambda: stats(served)["connections"] == 1, "only the client's connection is left")


async def test_a_trickled_request_head_is_cut_off(tmp_path: Path) -> None:
    limits = ServerLimits(head_timeout=0.3, idle_timeout=300)
    async with serve_with(tmp_path, limits) as served:
        reader, writer = await connect(served)
        stop = asyncio.Event()

        async def trickle() -> None:
            writer.write(b"GET /v1/status HTTP/1.1\r\nHost: orch\r\n")
            while not stop.is_set():  # a header byte every 50 ms: never a whole head
                with contextlib.suppress(ConnectionError):
                    writer.write(b"X")
                    await writer.drain()
                await asyncio.sleep(0.05)

        task = asyncio.create_task(trickle())
        assert await closed_by_server(reader) == b""  # closed, though bytes kept coming
        stop.set()
        await task
        writer.close()
        assert stats(served)["head_timeouts"] == 1 and stats(served)["idle_timeouts"] == 0
        assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4


async def test_idle_connections_are_closed_and_keep_alive_still_works(tmp_path: Path) -> None:
    limits = ServerLimits(idle_timeout=0.3, head_timeout=300)
    async with serve_with(tmp_path, limits) as served:
        silent_reader, silent = await connect(served)  # never sends a byte
        reader, writer = await connect(served)
        for _ in range(3):  # keep-alive: three requests on one connection
            writer.write(b"GET /v1/status HTTP/1.1\r\nHost: orch\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            length = int(Raw(head).headers["content-length"])
            assert json.loads(await reader.readexactly(length))["capsules"]
        assert await closed_by_server(reader) == b""  # then idle: closed
        assert await closed_by_server(silent_reader) == b""
        silent.close()
        writer.close()
        assert stats(served)["idle_timeouts"] == 2 and stats(served)["head_timeouts"] == 0


async def test_a_body_that_does_not_arrive_is_408(tmp_path: Path) -> None:
    async with serve_with(tmp_path, ServerLimits(body_timeout=0.3)) as served:
        for method, target, part in (("POST", INCREMENT, b'{"by": 5'), ("PUT", "/v1/kv/counter/slow", b"")):
            reader, writer = await connect(served)
            head = f"{method} {target} HTTP/1.1\r\nHost: orch\r\nContent-Length: 100\r\n\r\n"
            writer.write(head.encode() + part)  # and the rest never comes
            answer = Raw(await closed_by_server(reader))
            writer.close()
            assert answer.status == 408, answer.body
            error = answer.error()
            assert error["kind"] == "Timeout" and "100 bytes" in error["message"]
        assert await served.count() == 0
        async with served.client() as api:
            assert "slow" not in (await api.kv_list("counter"))["keys"]  # the PUT never happened


async def test_when_every_connection_is_busy_a_new_one_gets_a_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ServerLimits(max_connections=8)
    async with serve_with(tmp_path, limits) as served:
        streams = []
        for _ in range(8):  # event streams: requests that stay in progress
            reader, writer = await connect(served)
            writer.write(b"GET /v1/events HTTP/1.1\r\nHost: orch\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            streams.append((reader, writer))
        with caplog.at_level(logging.WARNING, logger="orchestrator.api.connections"):
            for _ in range(3):
                answer = await raw(served.sock, "GET", "/v1/status")
                assert answer.status == 503 and answer.headers["retry-after"] == "1"
                assert answer.error()["kind"] == "Busy" and "8 connections" in answer.error()["message"]
        assert stats(served)["refused"] == 3 and stats(served)["evicted"] == 0
        assert len([r for r in caplog.records if "refused a connection" in r.getMessage()]) == 1
        streams.pop()[1].close()  # one stream ends: room again
        await eventually(lambda: served.server.api.streams == 7, "the stream ended")
        assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4
        for _, writer in streams:
            writer.close()


async def test_event_streams_are_capped(tmp_path: Path) -> None:
    async with serve_with(tmp_path, ServerLimits(max_event_streams=2)) as served:
        open_streams = []
        for _ in range(2):
            reader, writer = await connect(served)
            writer.write(b"GET /v1/events HTTP/1.1\r\nHost: orch\r\n\r\n")
            assert Raw(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)).status == 200
            open_streams.append(writer)
        error = await served.error("GET", "/v1/events")
        assert (error.status, error.kind) == (503, "Busy") and "2 event streams" in str(error)
        status = await served.json("GET", "/v1/status")
        assert status["api"]["event_streams"] == 2 and status["api"]["max_event_streams"] == 2
        for writer in open_streams:
            writer.close()


def test_the_cap_stays_below_the_file_descriptor_limit(caplog: pytest.LogCaptureFixture) -> None:
    limits = ServerLimits(max_connections=512, fd_reserve=256)
    assert connection_cap(limits, 65536, 40) == 512
    assert connection_cap(limits, 1024, 40) == 512
    assert connection_cap(limits, 700, 40) == 700 - 40 - 256
    with caplog.at_level(logging.WARNING):
        assert connection_cap(limits, 300, 40) == 8
    assert "ulimit -n" in caplog.text


def test_the_soft_file_limit_is_raised_towards_the_hard_limit() -> None:
    script = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 700))\n"
        "from orchestrator.api.connections import raise_fd_limit\n"
        "print(raise_fd_limit(8192), resource.getrlimit(resource.RLIMIT_NOFILE)[0], raise_fd_limit(300))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["700", "700", "700"]


def append_custom_section(wasm: Path) -> None:
    """A different but equivalent module: the same code plus a custom section."""
    name = b"orch-test"
    wasm.write_bytes(wasm.read_bytes() + bytes([0, len(name) + 1, len(name)]) + name)


UP_WITH_512_FILES = """import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
sys.argv = ["orch", *sys.argv[1:]]
runpy.run_module("orchestrator", run_name="__main__")
"""


@pytest.fixture
def files_for_a_flood() -> Iterator[None]:
    """Room in this process for the client ends of a flood (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_orch_up_with_a_low_fd_limit_keeps_serving_and_reloading_during_a_flood(
    tmp_path: Path, files_for_a_flood: None
) -> None:
    root = tmp_path / "deployment"  # watched: the log goes outside it
    root.mkdir()
    config = example_deployment(root)
    sock, log = root / ".orch" / "orch.sock", tmp_path / "up.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", UP_WITH_512_FILES, "up", str(config), "--log-format", "json"],
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    sockets: list[socket.socket] = []
    try:
        await eventually(lambda: sock.exists() or process.poll() is not None, "orch up serving", deadline=60)
        assert process.poll() is None, log.read_text()[-3000:]
        async with Client(sock) as api:
            before = await eventually_status(api)
            cap = before["api"]["max_connections"]
            assert cap <= 512 - 256
            sockets = await asyncio.to_thread(flood, sock, cap + 300)  # 300 more than the cap allows

            async def all_accepted() -> bool:  # (the last ones may still wait in the listen backlog)
                return bool((await api.status())["api"]["evicted"] >= 300)

            await eventually(all_accepted, "the flood accepted (and evicted down to the cap)")
            status = await api.status()  # served amid the flood
            assert status["api"]["connections"] <= cap
            counter = next(c for c in status["capsules"] if c["name"] == "counter")
            append_custom_section(root / "capsules" / "counter" / "counter.wasm")  # the watcher must see it

            async def reloaded() -> bool:
                now = next(c for c in (await api.status())["capsules"] if c["name"] == "counter")
                return bool(now["version"] != counter["version"] and now["phase"] == "Running")

            await eventually(reloaded, "the counter reloaded during the flood", deadline=60)
            body, _ = await api.call("counter", "increment", b'{"by": 2}')
            assert json.loads(body) == {"count": 2}
    finally:
        for client in sockets:
            client.close()
        process.send_signal(2)
        try:
            await asyncio.to_thread(process.wait, 30)
        finally:
            process.kill()
    text = log.read_text(errors="replace")
    assert "Too many open files" not in text and "Errno 24" not in text, text[-3000:]


async def eventually_status(api: Client) -> dict[str, Any]:
    for _ in range(600):
        with contextlib.suppress(RemoteError):
            status: dict[str, Any] = await api.status()
            return status
        await asyncio.sleep(0.05)
    raise AssertionError("orch up never answered")


# == finding 14: event streams in chunks ===========================================================
async def test_a_reader_that_does_not_read_makes_the_server_hold_one_chunk_not_the_history(served: Served) -> None:
    bus, count, size = served.orchestrator.bus, 64, 512 << 10
    payload = "x" * size
    first = bus.last_seq + 1
    for _ in range(count):  # 32 MiB of history, within the ring's 64 MiB
        bus.publish("big.blob", payload, size=size)
    reader, writer = await connect(served)
    writer.write(b"GET /v1/events?topic=big.%3E&history=64 HTTP/1.1\r\nHost: orch\r\n\r\n")
    assert Raw(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)).status == 200
    await eventually(lambda: served.server.api.streams == 1, "the stream is open")
    stream = next(iter(served.server.api.event_streams.active))
    await eventually(lambda: stream.writing > 0, "the stream waits for its reader")
    # the server holds about one event for this client, not the 32 MiB of history
    assert served.server.guard is not None
    busy = [h for h in served.server.guard.connections() if not h.waiting_for_request]
    assert len(busy) == 1 and busy[0].transport is not None
    assert busy[0].transport.get_write_buffer_size() <= size + 64 * 1024
    assert size < stream.writing <= size + 4096  # one event at a time
    assert stream.sent_events <= 1 and stream.replay.remaining >= count - 2  # the rest is still in the ring
    assert stream.subscription.queued_bytes == 0
    seqs = []
    async for line in lines(reader):  # now read it all: every event arrives, in order
        if line.startswith("id: "):
            seqs.append(int(line[4:]))
        if len(seqs) == count:
            break
    assert seqs == list(range(first, first + count))
    writer.close()
    await eventually(lambda: served.server.api.streams == 0 or not bus.publish("big.tick", None), "cleaned up")


async def test_the_client_reads_events_of_a_megabyte(served: Served) -> None:
    bus = served.orchestrator.bus
    bus.publish("big.one", "é" * (MIB // 2), size=MIB)
    bus.publish("big.two", {"n": 2})
    got = []
    async with served.client() as api:
        async for item in api.events("big.>", history=2):
            got.append(item)
            if len(got) == 3:
                break
    assert got[0]["payload"] == "é" * (MIB // 2) and got[1]["payload"] == {"n": 2} and got[2] == {"live": True}


async def test_history_that_leaves_the_ring_while_streaming_is_announced_lost(tmp_path: Path) -> None:
    async with serve_with(tmp_path, ServerLimits(stream_chunk_bytes=1)) as served:
        bus = served.orchestrator.bus
        payload = "x" * MIB  # 1 MiB sent per event, counted as 3 MiB: the 64 MiB ring holds 21
        for _ in range(20):
            bus.publish("gone.n", payload, size=3 * MIB)
        reader, writer = await connect(served)
        writer.write(b"GET /v1/events?topic=gone.%3E&history=20 HTTP/1.1\r\nHost: orch\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        await eventually(lambda: served.server.api.streams == 1, "the stream is open")
        stream = next(iter(served.server.api.event_streams.active))
        await eventually(lambda: stream.writing > 0, "the stream waits for its reader")
        assert stream.replay.remaining == 19
        for i in range(10):  # push 10 of the requested events out of the ring
            bus.publish("other.n", i, size=3 * MIB)
        delivered, lost = 0, 0
        event = ""
        async for line in lines(reader):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "live":
                    break
                if event == "lost":
                    lost += json.loads(line[6:])["dropped"]
                else:
                    delivered += 1
                event = ""
        writer.close()
    assert (delivered, lost) == (12, 8)  # the one being written and the 11 still in the ring; 8 gone


async def test_a_cancelled_stream_handler_reraises_and_unsubscribes(served: Served) -> None:
    bus = served.orchestrator.bus
    before = bus.subscribers
    reader, writer = await connect(served)
    writer.write(b"GET /v1/events HTTP/1.1\r\nHost: orch\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    await eventually(lambda: bus.subscribers == before + 1, "the stream subscribed")
    handlers = [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").endswith("RequestHandler._handle_request")
    ]
    assert len(handlers) == 1
    handlers[0].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await handlers[0]
    assert handlers[0].cancelled()  # the CancelledError went through
    assert bus.subscribers == before and served.server.api.streams == 0
    writer.close()
    assert len((await served.json("GET", "/v1/status"))["capsules"]) == 4


# == the client =====================================================================================
async def test_a_connection_that_breaks_before_the_answer_is_a_remote_error(tmp_path: Path) -> None:
    path = tmp_path / "half.sock"

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # read the request head, answer nothing, close
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        writer.close()

    server = await asyncio.start_unix_server(hang_up, str(path))
    try:
        async with Client(path) as api:
            with pytest.raises(RemoteError) as caught:
                await api.call("counter", "increment", b'{"by": 1}')
        assert (caught.value.status, caught.value.kind) == (0, "ConnectionLost")
        assert "may or may not have been applied" in str(caught.value)
    finally:
        server.close()
        await server.wait_closed()


def test_warnings_are_rate_limited_and_say_how_many_were_held_back(caplog: pytest.LogCaptureFixture) -> None:
    from orchestrator.throttle import Throttle

    now = [100.0]
    throttle = Throttle(logging.getLogger("test.throttle"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for _ in range(5):
            throttle.warning("a", "refused %s", "x")
        throttle.warning("b", "other")
        now[0] += 10
        throttle.warning("a", "refused %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x",
        "other",
        "refused y (and 4 more like it since the last such warning)",
    ]


async def test_the_api_answers_while_a_changed_config_is_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Finding 10: a running orchestrator read a 50 MB config.yaml on its event loop and its API
    # stalled for 15-48 s. Here the read of the saved config is held, as a huge file would
    # hold it, until the API has answered a status request and a call: were the read on the
    # event loop, neither would be answered and the test would fail at its deadline.
    import orchestrator.control.runtime as runtime

    reading, release = threading.Event(), threading.Event()
    real = runtime.load_desired

    def held(*args: Any, **kwargs: Any) -> Any:
        if not release.is_set():
            reading.set()
            release.wait(DEADLINE * 4)
        return real(*args, **kwargs)

    add_oddball(tmp_path)
    async with serve(tmp_path, watch=True) as served:
        before = (await served.json("GET", "/v1/status"))["orchestrator"]["config_sha256"]
        monkeypatch.setattr(runtime, "load_desired", held)
        replace_atomically(served.config, served.config.read_text().replace("step: 1", "step: 5"))
        try:
            assert await asyncio.to_thread(reading.wait, DEADLINE), "the saved config was never read"
            status = await served.json("GET", "/v1/status")  # answered while the read is held
            assert status["orchestrator"]["config_sha256"] == before
            async with served.client() as api:
                output, _ = await api.call("counter", "increment", b'{"by": 1}')
            assert json.loads(output) == {"count": 1}
        finally:
            release.set()

        async def applied() -> bool:
            counter = await served.json("GET", "/v1/capsules/counter")
            return bool(counter["config"] == {"step": "5"})

        await eventually(applied, "the new config applied once read")
