"""The operator's verbs against a lattice: the same methods as the socket's `SyncClient`.

`orch call|kv|events --lattice URL` work as they do against a local socket (DESIGN §7):
the CLI gives a verb this client instead of `orchestrator.api.blocking.SyncClient`, and the
verb does not know the difference. It keeps one NATS connection on an event loop of its
own (a background thread), so its methods are plain blocking calls:

- `call(name, tool, arguments)`: request/reply to whichever host runs the deployment
  (orchestrator.lattice.calls), telling an unknown capsule from one no host runs;
- `kv_list|kv_get|kv_set|kv_delete`: the lattice's KV bucket (orchestrator.lattice.kvstore);
- `events(topic, history)`: the lattice's event history, then live events
  (orchestrator.lattice.history), as dicts shaped like the control API's SSE events;
- `reconcile()`: the lease holder fetches the followed git branch now
  (orchestrator.lattice.follow), answering with what came of it.

Errors are the lattice's (`LatticeCallError` has the status, kind and message a local
call would have); the CLI prints them as one line. Used by orchestrator.cli.remote.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from ..errors import OrchestratorError
from .calls import LatticeCallError, call_tool
from .connection import Lattice, LatticeAddress
from .desiredstate import deployment_names
from .history import events as lattice_events

T = TypeVar("T")
STOP = object()


class LatticeClient:
    """A blocking facade over one lattice connection. Use as a context manager."""

    def __init__(self, address: LatticeAddress) -> None:
        self.address = address
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lattice-client", daemon=True)
        self._thread.start()
        self._lattice: Lattice | None = None
        self._kv: Any = None

    def __enter__(self) -> LatticeClient:
        self._lattice = self._run(Lattice.connect(self.address))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._lattice is not None:
            lattice, self._lattice = self._lattice, None
            try:
                if self._kv is not None:
                    self._run(self._kv.close())
                self._run(lattice.close())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(5)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def lattice(self) -> Lattice:
        if self._lattice is None:
            raise OrchestratorError("the lattice client is not connected (use it as a context manager)")
        return self._lattice

    # -- calls ---------------------------------------------------------------------------
    def call(self, name: str, tool: str, arguments: bytes) -> tuple[bytes, dict[str, str]]:
        lattice = self.lattice

        async def call() -> tuple[bytes, dict[str, str]]:
            return await call_tool(lattice, name, tool, arguments, deployed=lambda: deployment_names(lattice))

        return self._run(call())

    # -- following git --------------------------------------------------------------------
    def reconcile(self) -> dict[str, Any]:
        """Ask the host holding the scheduler lease to fetch the followed branch now
        (orchestrator.lattice.follow): `{"outcome", "message", "git", "revision"}`, where
        `outcome` is `published` or `applied` when the branch's revision is the lattice's
        desired state. Raises LatticeError when no host answers."""
        from .follow import request_reconcile

        return self._run(request_reconcile(self.lattice)).to_dict()

    # -- KV ------------------------------------------------------------------------------
    def _store(self) -> Any:
        if self._kv is None:
            from .kvstore import JetStreamKV

            self._kv = self._run(JetStreamKV.open(self.lattice))
        return self._kv

    def kv_list(self, name: str, prefix: str = "") -> dict[str, Any]:
        return {"capsule": name, "prefix": prefix, "keys": self._run(self._store().list_keys(name, prefix))}

    def kv_get(self, name: str, key: str) -> bytes:
        value = self._run(self._store().get(name, key))
        if value is None:
            raise LatticeCallError(404, "NoSuchKey", f"capsule {name!r} has no key {key!r}")
        return bytes(value)

    def kv_set(self, name: str, key: str, value: bytes) -> dict[str, Any]:
        self._run(self._store().set(name, key, value))
        return {"capsule": name, "key": key, "bytes": len(value)}

    def kv_delete(self, name: str, key: str) -> dict[str, Any]:
        if not self._run(self._store().delete(name, key)):
            raise LatticeCallError(404, "NoSuchKey", f"capsule {name!r} has no key {key!r}")
        return {"capsule": name, "key": key, "deleted": True}

    # -- events --------------------------------------------------------------------------
    def events(
        self, topic: str = ">", history: int = 0, *, idle: Callable[[], None] | None = None, idle_every: float = 1.0
    ) -> Iterator[dict[str, Any]]:
        """History, `{"live": True}`, then live events; `idle` is called while none arrives."""
        lattice = self.lattice
        stream = lattice_events(lattice, topic, history)
        try:
            while True:
                future = asyncio.run_coroutine_threadsafe(_next(stream), self._loop)
                while True:
                    try:
                        item = future.result(idle_every if idle is not None else None)
                        break
                    except TimeoutError:
                        if idle is not None:
                            try:
                                idle()
                            except BaseException:
                                future.cancel()
                                raise
                if item is STOP:
                    return
                yield item
        finally:
            asyncio.run_coroutine_threadsafe(stream.aclose(), self._loop).result(5)  # type: ignore[attr-defined]


async def _next(stream: Any) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return STOP
