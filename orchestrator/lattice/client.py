"""The operator's verbs against a lattice: the same methods as the socket's `SyncClient`.

`orch call|kv|events --lattice URL` work as they do against a local socket (README, "Lattice"):
the CLI gives a verb this client instead of `orchestrator.api.blocking.SyncClient`, and the
verb does not know the difference. It keeps one NATS connection on an event loop of its
own (a background thread), so its methods are plain blocking calls:

- `call(name, tool, arguments)`: request/reply to whichever host runs the deployment
  (orchestrator.lattice.calls), telling an unknown capsule from one no host runs;
- `kv_list|kv_get|kv_set|kv_delete`: the lattice's KV bucket (orchestrator.lattice.kvstore);
- `events(topic, history)`: the lattice's event history, then live events
  (orchestrator.lattice.history), as dicts shaped like the control API's SSE events;
- `approve|reject(name, spec_hash)`: answers to the escalation gate
  (orchestrator.lattice.answers); `history(name)`, `rollback(name, to=, with_data=)`,
  `unpin(name)`: the versions and rollbacks (orchestrator.lattice.versions, .rollback);
  each answer has the shape of the control API's;
- `reconcile()`: the lease holder fetches the followed git branch now
  (orchestrator.lattice.follow), answering with what came of it.

A call of a deployment no host runs because it is paused (a rollback restoring its data)
or waits for approval says so (409, with the command that ends it).

Errors are the lattice's (`LatticeCallError` has the status, kind and message a local
call would have); the CLI prints them as one line. Used by orchestrator.cli.remote.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import nats.js.errors

from ..errors import OrchestratorError
from .calls import LatticeCallError, call_tool
from .connection import Lattice, LatticeAddress
from .desiredstate import deployment_names, latest_good
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
            try:
                return await call_tool(lattice, name, tool, arguments, deployed=lambda: deployment_names(lattice))
            except LatticeCallError as error:
                if error.kind != "CapsuleNotRunning":
                    raise
                raise await _not_running(lattice, name, error) from None

        return self._run(call())

    # -- GitOps: approvals, history, rollback ----------------------------------------------
    def approve(self, name: str, spec_hash: str | None = None) -> dict[str, Any]:
        from .answers import approve

        return self._run(approve(self.lattice, name, spec_hash))

    def reject(self, name: str, spec_hash: str | None = None) -> dict[str, Any]:
        from .answers import reject

        return self._run(reject(self.lattice, name, spec_hash))

    def history(self, name: str) -> dict[str, Any]:
        return self._run(_history(self.lattice, name))

    def rollback(self, name: str, *, to: str | None = None, with_data: bool = False) -> dict[str, Any]:
        from .rollback import rollback

        return self._run(rollback(self.lattice, name, to=to, with_data=with_data))

    def unpin(self, name: str) -> dict[str, Any]:
        from .rollback import unpin

        return self._run(unpin(self.lattice, name))

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


async def _not_running(lattice: Lattice, name: str, error: LatticeCallError) -> LatticeCallError:
    """The 409 of a call nobody takes, saying why when the desired state does."""
    try:
        doc, _ = await latest_good(lattice)
    except OrchestratorError:
        return error
    deployment = doc.deployments.get(name) if doc is not None else None
    if deployment is None:
        return error
    why = None
    if deployment.paused:
        why = (
            f"capsule {name!r} is paused by `orch rollback {name} --with-data` while its data is restored: call "
            "again once the rollback finishes (`orch status --lattice URL`)"
        )
    elif deployment.runs() is None and deployment.awaiting is not None:
        why = f"capsule {name!r} is not running: its start awaits `orch approve {name}`"
    elif deployment.runs() is None and deployment.rejected is not None:
        why = f"capsule {name!r} is not running: its start was rejected; apply another change to propose one"
    return LatticeCallError(409, "CapsuleNotRunning", why) if why else error


async def _history(lattice: Lattice, name: str) -> dict[str, Any]:
    """`orch history NAME --lattice`: the versions, newest first, and the pin."""
    from .versions import versions_of

    versions = await versions_of(lattice, name)
    running = versions.running()
    store = await lattice.objects()
    kept: dict[str, bool] = {}
    for entry in versions.entries:
        if entry.version.wasm not in kept:
            try:
                info = await store.get_info(entry.version.wasm)
                kept[entry.version.wasm] = not info.deleted
            except nats.js.errors.NotFoundError:
                kept[entry.version.wasm] = False
    shown = [
        entry.to_dict(current=index == 0 and entry.spec_hash == running, module_kept=kept[entry.version.wasm])
        for index, entry in enumerate(reversed(versions.entries))
    ]
    deployment = versions.current.deployments.get(name) if versions.current else None
    pinned = deployment.pinned.to_status() if deployment is not None and deployment.pinned else None
    return {"capsule": name, "entries": shown, "pinned": pinned, "unreadable_revisions": versions.unreadable}
