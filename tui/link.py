"""The dashboard's connection to an orchestrator: the API it needs (what
`orchestrator.api.client.Client` offers; tests pass a fake with the same methods, and
`orch dash --lattice` a client of a whole lattice) and `Link`, which opens a client, polls
the status, notices when the orchestrator goes away and opens a fresh client when it comes
back. `remote_error` tells an answer's error (any Api's: status, kind, message) from a
broken connection.

Used by the app's polling and event-stream workers. No Textual here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from orchestrator.api.client import Client, NotRunning, RemoteError
from orchestrator.errors import OrchestratorError

logger = logging.getLogger(__name__)


class Api(Protocol):
    """The control API as the dashboard uses it (see orchestrator/client.py)."""

    async def status(self) -> Any: ...
    async def capsule(self, name: str) -> Any: ...
    async def call(self, name: str, tool: str, arguments: bytes) -> tuple[bytes, dict[str, str]]: ...
    async def restart(self, name: str) -> Any: ...
    async def approve(self, name: str, spec_hash: str | None = None) -> Any: ...
    async def reject(self, name: str, spec_hash: str | None = None) -> Any: ...
    async def reconcile(self) -> Any: ...
    async def plan(self) -> Any: ...
    async def kv_list(self, name: str, prefix: str = "") -> Any: ...
    async def kv_get(self, name: str, key: str) -> bytes: ...
    def events(self, topic: str = ">", history: int = 0) -> AsyncIterator[dict[str, Any]]: ...


Connect = Callable[[], AbstractAsyncContextManager[Api]]


def connect_to(socket: Path) -> Connect:
    """A `Connect` that opens a real client of the orchestrator serving `socket`."""
    return lambda: Client(socket)


def remote_error(error: BaseException) -> RemoteError | None:
    """`error` as an answer to a request (status, kind, message), or None when it is not
    one: a RemoteError, or an error of another Api (a lattice's) carrying an int `status`
    and a str `kind` as the control API's errors do."""
    if isinstance(error, RemoteError):
        return error
    status, kind = getattr(error, "status", None), getattr(error, "kind", None)
    if isinstance(error, OrchestratorError) and isinstance(status, int) and isinstance(kind, str):
        return RemoteError(status, kind, str(error))
    return None


class Link:
    """One orchestrator, maybe not (yet) running. `poll()` once a second or so."""

    def __init__(self, connect: Connect, *, where: str = "") -> None:
        self._connect = connect
        self._stack: contextlib.AsyncExitStack | None = None
        self.where = where
        self.api: Api | None = None
        self.connected = False
        self.problem = "connecting…"  # why we are not connected (or the last request's error)
        self._up = asyncio.Event()

    async def poll(self) -> Any | None:
        """The orchestrator's status, or None when it cannot be reached (then `problem` says why)."""
        if self.api is None:
            stack = contextlib.AsyncExitStack()
            try:
                self.api = await stack.enter_async_context(self._connect())
            except Exception as error:  # an unusable socket path, say
                await stack.aclose()
                self._down(error)
                return None
            self._stack = stack
        try:
            status = await self.api.status()
        except asyncio.CancelledError:
            raise
        except RemoteError as error:  # it answers, but not well: still connected
            self.problem = f"{error.kind}: {error}"
            return None
        except Exception as error:  # NotRunning, or the connection broke mid-request
            await self.close()
            self._down(error)
            return None
        self.connected, self.problem = True, ""
        self._up.set()
        return status

    def _down(self, error: BaseException) -> None:
        if self.connected:
            logger.info("lost the orchestrator: %s", error)
        self.connected = False
        self._up.clear()
        if isinstance(error, NotRunning):
            self.problem = f"no orchestrator at {self.where}" if self.where else "no orchestrator running"
        else:
            self.problem = " ".join(str(error).split()) or type(error).__name__

    async def connected_api(self) -> Api:
        """Wait until connected; the API to use."""
        while True:
            await self._up.wait()
            if self.api is not None and self.connected:
                return self.api
            self._up.clear()

    async def close(self) -> None:
        stack, self._stack, self.api = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()
