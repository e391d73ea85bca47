"""The blocking client of the control API, on the standard library alone: the CLI's one-shot
verbs use it (`orch status`, `call`, `events`, `plan`, ...).

One request per connection (`Connection: close`), so a verb neither imports aiohttp nor
starts an event loop: start-up is most of a short command's time. `_Response` reads an
HTTP/1.1 answer from the socket: status line and headers (at most MAX_HEADER_BYTES), then
the body by Content-Length, chunked, or up to the end of the connection (at most
MAX_BODY_BYTES); anything else is refused with a ValueError, turned into a RemoteError
(`ConnectionLost`) that the CLI prints as one line. Same endpoints and errors as
`.client.Client`, the async client.
"""

from __future__ import annotations

import json as _json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from .client import (
    MAX_EVENT_BYTES,
    ConnectionLost,
    Endpoints,
    RemoteError,
    SseParser,
    not_running,
    parse_json,
    remote_error,
)

MAX_HEADER_BYTES = 64 << 10
MAX_BODY_BYTES = 64 << 20
"""The largest answer read (a status of thousands of capsules is a few MiB)."""


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

    def history(self, name: str) -> Any:
        return self.json("GET", self._capsule(name, "history"))

    def rollback(self, name: str, *, to: str | None = None, with_data: bool = False) -> Any:
        body = _json.dumps({"to": to, "with_data": with_data}).encode()
        return self.json("POST", self._capsule(name, "rollback"), data=body)

    def unpin(self, name: str) -> Any:
        return self.json("POST", self._capsule(name, "unpin"))

    def approve(self, name: str, spec_hash: str | None = None) -> Any:
        return self.json("POST", self._capsule(name, "approve"), data=_change(spec_hash))

    def reject(self, name: str, spec_hash: str | None = None) -> Any:
        return self.json("POST", self._capsule(name, "reject"), data=_change(spec_hash))

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
                if not size_line or size_line.strip(b"0123456789abcdefABCDEF"):
                    raise ValueError(f"not a chunk size: {size_line[:20]!r}")
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


def _change(spec_hash: str | None) -> bytes | None:
    return _json.dumps({"spec_hash": spec_hash}).encode() if spec_hash is not None else None
