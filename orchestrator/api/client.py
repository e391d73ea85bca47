"""Clients of the control API: the CLI's operator verbs and the dashboard use them to talk to
a running orchestrator over its unix socket.

`Client` (aiohttp, async) serves the dashboard and tests: keep-alive connections, streams.
`SyncClient` (.blocking: the standard library alone) serves the one-shot CLI verbs. Both
speak the same endpoints and raise the errors defined here. aiohttp is imported only when
a `Client` is used, so importing this module (for `socket_for`, the errors) costs little.

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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..control.statedir import SOCKET, state_dir_of
from ..errors import OrchestratorError

if TYPE_CHECKING:
    import aiohttp

BASE = "http://orch"
MAX_EVENT_BYTES = 16 << 20
"""The longest SSE line accepted (a 1 MiB payload serialises to about 1 MiB)."""


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
        url = yarl.URL(BASE + path, encoded=True)
        if params:
            url = url.with_query(params)
        # A GET may go again once when the server closed the kept-alive connection it was
        # sent on (it evicts idle connections when it is full): nothing ran for it.
        attempts = 2 if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                async with self._session.request(method, url, data=data) as response:
                    body = await response.read()
                    headers = dict(response.headers)
                    status = response.status
                break
            except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as error:
                raise self._not_running() from error
            except aiohttp.ServerDisconnectedError as error:
                if attempt == attempts:
                    raise ConnectionLost(f"{method} {path}", error) from error
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

    async def history(self, name: str) -> Any:
        return await self.json("GET", f"/v1/capsules/{quote(name, safe='')}/history")

    async def rollback(self, name: str, *, to: str | None = None, with_data: bool = False) -> Any:
        body = json.dumps({"to": to, "with_data": with_data}).encode()
        return await self.json("POST", f"/v1/capsules/{quote(name, safe='')}/rollback", data=body)

    async def unpin(self, name: str) -> Any:
        return await self.json("POST", f"/v1/capsules/{quote(name, safe='')}/unpin")

    async def approve(self, name: str, spec_hash: str | None = None) -> Any:
        """Grant the escalations `name` waits for (`spec_hash`: only if that is the change
        waiting). Returns its status; RemoteError 409 when it awaits no approval."""
        return await self.json("POST", self._capsule(name, "approve"), data=_change(spec_hash))

    async def reject(self, name: str, spec_hash: str | None = None) -> Any:
        """Refuse the change `name` waits for. Returns its status."""
        return await self.json("POST", self._capsule(name, "reject"), data=_change(spec_hash))

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


def _change(spec_hash: str | None) -> bytes | None:
    return json.dumps({"spec_hash": spec_hash}).encode() if spec_hash is not None else None
