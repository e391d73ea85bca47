"""A client of the control API (the only aiohttp client): the CLI's operator verbs and the
dashboard use it to talk to a running orchestrator over its unix socket.

Errors from the server arrive as `RemoteError` with the server's kind, message and HTTP
status; an absent orchestrator is `NotRunning`, whose message says how to start one; a
connection lost before the answer is `ConnectionLost` (a RemoteError with status 0). Event
streams are split into lines here, not by aiohttp's line reader, so an event of any size up
to MAX_EVENT_BYTES arrives (aiohttp's readline refuses lines over 512 KiB).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yarl

from ..control.statedir import SOCKET
from ..desired.config import load_config
from ..errors import OrchestratorError

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
    """The control socket: `socket` if given, else `<state_dir>/orch.sock` of `config`."""
    if socket is not None:
        return Path(socket)
    return load_config(config or Path("config.yaml")).state_dir / SOCKET


class Client:
    """`async with Client(path) as api: await api.status()`."""

    def __init__(self, socket_path: Path, *, timeout: float = 60.0) -> None:
        self.socket_path = Path(socket_path)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        connector = aiohttp.UnixConnector(path=str(self.socket_path))
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _not_running(self) -> NotRunning:
        return NotRunning(f"no orchestrator is running for {self.socket_path.parent}: start one with `orch up`")

    async def request(
        self, method: str, path: str, *, data: bytes | None = None, params: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
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
            try:
                detail = json.loads(body)["error"]
                raise RemoteError(status, str(detail["kind"]), str(detail["message"]))
            except (ValueError, KeyError, TypeError):
                raise RemoteError(status, "HTTPError", body.decode(errors="replace")[:500]) from None
        return status, headers, body

    async def json(
        self, method: str, path: str, *, data: bytes | None = None, params: dict[str, str] | None = None
    ) -> Any:
        _, _, body = await self.request(method, path, data=data, params=params)
        return json.loads(body)

    # -- the endpoints ---------------------------------------------------------------------
    async def status(self) -> Any:
        return await self.json("GET", "/v1/status")

    async def capsule(self, name: str) -> Any:
        return await self.json("GET", f"/v1/capsules/{quote(name, safe='')}")

    async def call(self, name: str, tool: str, arguments: bytes) -> tuple[bytes, dict[str, str]]:
        _, headers, body = await self.request(
            "POST", f"/v1/capsules/{quote(name, safe='')}/tools/{quote(tool, safe='')}", data=arguments
        )
        return body, headers

    async def restart(self, name: str) -> Any:
        return await self.json("POST", f"/v1/capsules/{quote(name, safe='')}/restart")

    async def approve(self, name: str, spec_hash: str | None = None) -> Any:
        """Grant the escalations `name` waits for (`spec_hash`: only if that is the change
        waiting). Returns its status; RemoteError 409 when it awaits no approval."""
        return await self.json("POST", f"/v1/capsules/{quote(name, safe='')}/approve", data=_change(spec_hash))

    async def reject(self, name: str, spec_hash: str | None = None) -> Any:
        """Refuse the change `name` waits for. Returns its status."""
        return await self.json("POST", f"/v1/capsules/{quote(name, safe='')}/reject", data=_change(spec_hash))

    async def reconcile(self) -> Any:
        return await self.json("POST", "/v1/reconcile")

    async def plan(self) -> Any:
        return await self.json("GET", "/v1/plan")

    async def kv_list(self, name: str, prefix: str = "") -> Any:
        return await self.json("GET", f"/v1/kv/{quote(name, safe='')}", params={"prefix": prefix})

    async def kv_get(self, name: str, key: str) -> bytes:
        return (await self.request("GET", _kv(name, key)))[2]

    async def kv_set(self, name: str, key: str, value: bytes) -> Any:
        return json.loads((await self.request("PUT", _kv(name, key), data=value))[2])

    async def kv_delete(self, name: str, key: str) -> Any:
        return json.loads((await self.request("DELETE", _kv(name, key)))[2])

    async def events(self, topic: str = ">", history: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Server-sent events as dicts. A loss notice is `{"lost": {"dropped", "total"}}`;
        `{"live": True}` marks the end of the history (everything after it is live)."""
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
                body = await response.read()
                try:
                    detail = json.loads(body)["error"]
                except (ValueError, KeyError, TypeError):
                    raise RemoteError(response.status, "HTTPError", body.decode(errors="replace")[:500]) from None
                raise RemoteError(response.status, detail["kind"], detail["message"])
            kind, data = "", ""
            try:
                async for raw in _lines(response.content):
                    line = raw.decode().rstrip("\r")
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif line == "" and data:
                        payload = json.loads(data)
                        if kind == "lost":
                            yield {"lost": payload}
                        elif kind == "live":
                            yield {"live": True}
                        else:
                            yield payload
                        kind, data = "", ""
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


def _kv(name: str, key: str) -> str:
    # "." and ".." are keys like any other: encode their dots so no URL library treats them
    # as path steps.
    return f"/v1/kv/{quote(name, safe='')}/{quote(key, safe='').replace('.', '%2E')}"
