"""Clients of the control API: the CLI's operator verbs and the dashboard use them to talk to
a running orchestrator over its unix socket.

`Client` (aiohttp, async) serves the dashboard and tests: keep-alive connections, streams.
`SyncClient` (the standard library alone, blocking) serves the one-shot CLI verbs: one
request per connection, so `orch status` neither imports aiohttp nor starts an event loop
(start-up is most of a short command's time). Both speak the same endpoints and raise the
same errors. aiohttp is imported only when a `Client` is used.

Errors from the server arrive as `RemoteError` with the server's kind, message and HTTP
status; an absent orchestrator is `NotRunning`, whose message says how to start one; a
connection lost before the answer is `ConnectionLost` (a RemoteError with status 0). Event
streams are split into lines here, not by a library's line reader, so an event of any size
up to MAX_EVENT_BYTES arrives (aiohttp's readline refuses lines over 512 KiB).

`socket_for` finds the socket from a config without validating it (control.statedir's
`state_dir_of`): a config with a typo still leads to the orchestrator that runs.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from ..control.statedir import SOCKET, state_dir_of
from ..errors import OrchestratorError

if TYPE_CHECKING:
    import aiohttp

BASE = "http://orch"
MAX_EVENT_BYTES = 16 << 20
"""The longest SSE line accepted (a 1 MiB payload serialises to about 1 MiB)."""
MAX_HEADER_BYTES = 64 << 10
MAX_BODY_BYTES = 64 << 20
"""The largest answer SyncClient reads (a status of thousands of capsules is a few MiB)."""


class NotRunning(OrchestratorError):
    """Nothing answers on the socket."""


class RemoteError(OrchestratorError):
    """The orchestrator answered with an error."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class ConnectionLost(RemoteError):
    """The connection broke before the whole answer arrived (status 0)."""

    def __init__(self, what: str, error: BaseException) -> None:
        detail = " ".join(str(error).split()) or type(error).__name__
        super().__init__(
            0,
            "ConnectionLost",
            f"the connection to the orchestrator broke during {what} ({detail}); "
            "a request that changes something may or may not have been applied",
        )


def socket_for(config: Path | None = None, socket: Path | None = None) -> Path:
    """The control socket: `socket` if given, else `<state_dir>/orch.sock` of `config`, whose
    state_dir is read leniently (an invalid config still names its socket)."""
    if socket is not None:
        return Path(socket)
    return state_dir_of(config or Path("config.yaml")) / SOCKET


def not_running(socket_path: Path) -> NotRunning:
    return NotRunning(f"no orchestrator is running for {socket_path.parent}: start one with `orch up`")


def remote_error(status: int, body: bytes) -> RemoteError:
    """The error an answer `status` >= 400 with `body` stands for."""
    try:
        detail = json.loads(body)["error"]
        return RemoteError(status, str(detail["kind"]), str(detail["message"]))
    except (ValueError, KeyError, TypeError):
        return RemoteError(status, "HTTPError", body.decode(errors="replace")[:500])


def parse_json(status: int, body: bytes, what: str) -> Any:
    """The JSON of an answer; an answer that is not JSON is a RemoteError saying so."""
    try:
        return json.loads(body)
    except ValueError:
        raise RemoteError(status, "BadAnswer", f"the answer to {what} is not JSON ({len(body)} bytes)") from None


class SseParser:
    """Server-sent event lines -> items: an event's dict, `{"lost": {...}}`, `{"live": True}`."""

    def __init__(self) -> None:
        self._kind, self._data = "", ""

    def feed(self, raw: bytes) -> dict[str, Any] | None:
        """One line (without its newline); the item it completes, if any."""
        line = raw.decode().rstrip("\r")
        if line.startswith("event: "):
            self._kind = line[7:]
        elif line.startswith("data: "):
            self._data = line[6:]
        elif line == "" and self._data:
            payload: dict[str, Any] = json.loads(self._data)
            kind = self._kind
            self._kind, self._data = "", ""
            if kind == "lost":
                return {"lost": payload}
            if kind == "live":
                return {"live": True}
            return payload
        return None


class Endpoints:
    """The endpoints, over `request` and `json` (provided by each client)."""

    def _kv(self, name: str, key: str) -> str:
        # "." and ".." are keys like any other: encode their dots so no URL library treats
        # them as path steps.
        return f"/v1/kv/{quote(name, safe='')}/{quote(key, safe='').replace('.', '%2E')}"

    @staticmethod
    def _capsule(name: str, *rest: str) -> str:
        parts = (quote(part, safe="").replace(".", "%2E") for part in (name, *rest))
        return "/".join(("/v1/capsules", *parts))


class SyncClient(Endpoints):
    """`with SyncClient(path) as api: api.status()`: blocking, one connection per request,
    the standard library alone. `timeout` bounds each wait for the orchestrator."""

    def __init__(self, socket_path: Path, *, timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _open(self, method: str, path: str, data: bytes | None, params: dict[str, str] | None) -> _Response:
        target = path + (f"?{urlencode(params)}" if params else "")
        head = f"{method} {target} HTTP/1.1\r\nHost: orch\r\nConnection: close\r\n"
        if data is not None or method in ("POST", "PUT"):
            head += f"Content-Length: {len(data or b'')}\r\n"
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(self.timeout)
        try:
            conn.connect(str(self.socket_path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as error:
            conn.close()
            raise not_running(self.socket_path) from error
        except OSError as error:
            conn.close()
            raise RemoteError(
                0, "ConnectFailed", f"cannot connect to {self.socket_path}: {error.strerror or error}"
            ) from None
        try:
            conn.sendall(head.encode("latin-1") + b"\r\n" + (data or b""))
            return _Response(conn)
        except (OSError, ValueError) as error:
            conn.close()
            raise ConnectionLost(f"{method} {path}", error) from error

    def request(
        self, method: str, path: str, *, data: bytes | None = None, params: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        response = self._open(method, path, data, params)
        try:
            body = response.read_all(MAX_BODY_BYTES)
        except (OSError, ValueError) as error:
            raise ConnectionLost(f"{method} {path}", error) from error
        finally:
            response.close()
        if response.status >= 400:
            raise remote_error(response.status, body)
        return response.status, response.headers, body

    def json(self, method: str, path: str, *, data: bytes | None = None, params: dict[str, str] | None = None) -> Any:
        status, _, body = self.request(method, path, data=data, params=params)
        return parse_json(status, body, f"{method} {path}")

    # -- the endpoints ---------------------------------------------------------------------
    def status(self) -> Any:
        return self.json("GET", "/v1/status")

    def capsule(self, name: str) -> Any:
        return self.json("GET", self._capsule(name))

    def specs(self) -> Any:
        return self.json("GET", "/v1/specs")

    def call(self, name: str, tool: str, arguments: bytes) -> tuple[bytes, dict[str, str]]:
        _, headers, body = self.request("POST", self._capsule(name, "tools", tool), data=arguments)
        return body, headers

    def restart(self, name: str) -> Any:
        return self.json("POST", self._capsule(name, "restart"))

    def reconcile(self) -> Any:
        return self.json("POST", "/v1/reconcile")

    def plan(self) -> Any:
        return self.json("GET", "/v1/plan")

    def kv_list(self, name: str, prefix: str = "") -> Any:
        return self.json("GET", f"/v1/kv/{quote(name, safe='')}", params={"prefix": prefix})

    def kv_get(self, name: str, key: str) -> bytes:
        return self.request("GET", self._kv(name, key))[2]

    def kv_set(self, name: str, key: str, value: bytes) -> Any:
        return self.json("PUT", self._kv(name, key), data=value)

    def kv_delete(self, name: str, key: str) -> Any:
        return self.json("DELETE", self._kv(name, key))

    def events(
        self, topic: str = ">", history: int = 0, *, idle: Callable[[], None] | None = None, idle_every: float = 1.0
    ) -> Iterator[dict[str, Any]]:
        """As Client.events: history, `{"live": True}`, then live events until the caller
        stops or the orchestrator ends the stream. Live events may be minutes apart: while
        none arrives, `idle` is called every `idle_every` seconds (it may raise to stop)."""
        response = self._open("GET", "/v1/events", None, {"topic": topic, "history": str(history)})
        try:
            if response.status >= 400:
                raise remote_error(response.status, response.read_all(MAX_BODY_BYTES))
            response.conn.settimeout(idle_every if idle is not None else None)
            response.idle = idle
            parser = SseParser()
            try:
                for line in response.lines(MAX_EVENT_BYTES):
                    if (item := parser.feed(line)) is not None:
                        yield item
            except BrokenPipeError:
                raise  # from `idle`: the caller's own output has gone (a socket read never raises it)
            except (OSError, ValueError) as error:
                raise ConnectionLost("the event stream", error) from error
        finally:
            response.close()


class _Response:
    """An HTTP/1.1 answer read from a socket: status, headers, then the body (by length,
    chunked, or up to the end of the connection)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.idle: Callable[[], None] | None = None  # called when a wait times out (else: TimeoutError)
        self._buffer = bytearray()
        self._eof = False
        head = self._until(b"\r\n\r\n", MAX_HEADER_BYTES, "the answer's headers")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {lines[0][:80]!r}")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().title()] = value.strip()
        self._chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = self.headers.get("Content-Length")
        self._left = int(length) if length is not None and length.isdigit() else None

    def close(self) -> None:
        self.conn.close()

    def _fill(self) -> bool:
        if self._eof:
            return False
        while True:
            try:
                chunk = self.conn.recv(1 << 16)
                break
            except TimeoutError:
                if self.idle is None:
                    raise
                self.idle()
        if not chunk:
            self._eof = True
        self._buffer += chunk
        return bool(chunk)

    def _until(self, marker: bytes, limit: int, what: str) -> bytes:
        start = 0
        while (end := self._buffer.find(marker, start)) < 0:
            if len(self._buffer) > limit:
                raise ValueError(f"{what} is longer than {limit} bytes")
            start = max(0, len(self._buffer) - len(marker) + 1)
            if not self._fill():
                raise ConnectionError(f"the connection closed before the end of {what}")
        data = bytes(self._buffer[:end])
        del self._buffer[: end + len(marker)]
        return data

    def _exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not self._fill():
                raise ConnectionError("the connection closed before the end of the answer")
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def chunks(self, limit: int) -> Iterator[bytes]:
        """The body, in pieces as they arrive; more than `limit` bytes in one piece is refused."""
        if self._chunked:
            while True:
                size_line = self._until(b"\r\n", 1024, "a chunk size").split(b";", 1)[0].strip()
                size = int(size_line, 16)
                if size > limit:
                    raise ValueError(f"a chunk of {size} bytes is over the limit of {limit}")
                if size == 0:
                    return
                yield self._exactly(size)
                self._exactly(2)
        elif self._left is not None:
            if self._left > limit:
                raise ValueError(f"an answer of {self._left} bytes is over the limit of {limit}")
            yield self._exactly(self._left)
        else:
            while self._fill() or self._buffer:
                if len(self._buffer) > limit:
                    raise ValueError(f"an answer of more than {limit} bytes")
                yield bytes(self._buffer)
                self._buffer.clear()

    def read_all(self, limit: int) -> bytes:
        body = bytearray()
        for piece in self.chunks(limit):
            body += piece
            if len(body) > limit:
                raise ValueError(f"an answer of more than {limit} bytes")
        return bytes(body)

    def lines(self, limit: int) -> Iterator[bytes]:
        """The body's lines (without their newline), each at most `limit` bytes."""
        pending = bytearray()
        for piece in self.chunks(limit):
            start = len(pending)
            pending += piece
            while (end := pending.find(b"\n", start)) >= 0:
                yield bytes(pending[:end])
                del pending[: end + 1]
                start = 0
            if len(pending) > limit:
                raise ValueError(f"an event from the orchestrator is longer than {limit} bytes")
        if pending:
            yield bytes(pending)


class Client(Endpoints):
    """`async with Client(path) as api: await api.status()` (aiohttp: keep-alive, streams)."""

    def __init__(self, socket_path: Path, *, timeout: float = 60.0) -> None:
        import aiohttp

        self.socket_path = Path(socket_path)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        import aiohttp

        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _not_running(self) -> NotRunning:
        return not_running(self.socket_path)

    async def request(
        self, method: str, path: str, *, data: bytes | None = None, params: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        import aiohttp
        import yarl

        assert self._session is not None, "use `async with Client(...)`"
        try:
            url = yarl.URL(BASE + path, encoded=True)
            if params:
                url = url.with_query(params)
            async with self._session.request(method, url, data=data) as response:
                body = await response.read()
                headers = dict(response.headers)
                status = response.status
        except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as error:
            raise self._not_running() from error
        except (aiohttp.ClientError, ConnectionError) as error:
            raise ConnectionLost(f"{method} {path}", error) from error
        if status >= 400:
            raise remote_error(status, body)
        return status, headers, body

    async def json(
        self, method: str, path: str, *, data: bytes | None = None, params: dict[str, str] | None = None
    ) -> Any:
        status, _, body = await self.request(method, path, data=data, params=params)
        return parse_json(status, body, f"{method} {path}")

    # -- the endpoints ---------------------------------------------------------------------
    async def status(self) -> Any:
        return await self.json("GET", "/v1/status")

    async def capsule(self, name: str) -> Any:
        return await self.json("GET", self._capsule(name))

    async def specs(self) -> Any:
        return await self.json("GET", "/v1/specs")

    async def call(self, name: str, tool: str, arguments: bytes) -> tuple[bytes, dict[str, str]]:
        _, headers, body = await self.request("POST", self._capsule(name, "tools", tool), data=arguments)
        return body, headers

    async def restart(self, name: str) -> Any:
        return await self.json("POST", self._capsule(name, "restart"))

    async def reconcile(self) -> Any:
        return await self.json("POST", "/v1/reconcile")

    async def plan(self) -> Any:
        return await self.json("GET", "/v1/plan")

    async def kv_list(self, name: str, prefix: str = "") -> Any:
        return await self.json("GET", f"/v1/kv/{quote(name, safe='')}", params={"prefix": prefix})

    async def kv_get(self, name: str, key: str) -> bytes:
        return (await self.request("GET", self._kv(name, key)))[2]

    async def kv_set(self, name: str, key: str, value: bytes) -> Any:
        return await self.json("PUT", self._kv(name, key), data=value)

    async def kv_delete(self, name: str, key: str) -> Any:
        return await self.json("DELETE", self._kv(name, key))

    async def events(self, topic: str = ">", history: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Server-sent events as dicts. A loss notice is `{"lost": {"dropped", "total"}}`;
        `{"live": True}` marks the end of the history (everything after it is live)."""
        import aiohttp

        assert self._session is not None
        params = {"topic": topic, "history": str(history)}
        try:
            response = await self._session.get(
                BASE + "/v1/events", params=params, timeout=aiohttp.ClientTimeout(total=None)
            )
        except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as error:
            raise self._not_running() from error
        async with response:
            if response.status >= 400:
                raise remote_error(response.status, await response.read())
            parser = SseParser()
            try:
                async for raw in _lines(response.content):
                    if (item := parser.feed(raw)) is not None:
                        yield item
            except (aiohttp.ClientError, ConnectionError) as error:
                raise ConnectionLost("the event stream", error) from error


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The lines of a stream (without their newline), each at most MAX_EVENT_BYTES."""
    buffer = bytearray()
    async for chunk in content.iter_any():
        start = len(buffer)
        buffer += chunk
        while (end := buffer.find(b"\n", start)) >= 0:
            yield bytes(buffer[:end])
            del buffer[: end + 1]
            start = 0
        if len(buffer) > MAX_EVENT_BYTES:
            raise RemoteError(0, "TooLarge", f"an event from the orchestrator is longer than {MAX_EVENT_BYTES} bytes")
    if buffer:
        yield bytes(buffer)
