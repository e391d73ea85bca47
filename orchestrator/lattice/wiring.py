"""What a host plugs its capsules into: KV store, per-deployment bus, call serving (the seam).

The host runtime needs three things from the other lattice modules (lattice.md,
"Interfaces"): the lattice KV (`JetStreamKV`, kvstore.py), a bus per deployment
(`LatticeBus`, bus.py) and a call server (`CallServer`, calls.py). This module is the one
place that chooses them, so wiring the real ones in is a few lines here:

    store = await JetStreamKV.open(lattice, replicas=replicas)          # open_store
    buses = LatticeBus(lattice, local, host_id); await buses.start()   # open_buses
    bus = buses.for_deployment(name); await bus.stop_receiving()         # release
    await handle.caught_up(bus.last_seq)                                 #   (same)
    CallServer(lattice, call, host_id)                                   # open_calls
    from .calls import call_tool                                         # call_tool

(Tried before hand-off: with the latcalls branch merged and latkv's kvstore.py beside it,
exactly these lines made the multi-process host tests pass.) Until they are merged it
uses the interim ones: the local SQLite `KVStore` in the host's
state dir (each host its own data: a moved capsule starts with the new host's data), the
host's local EventBus for every deployment (events stay on the host), and `InterimCalls`
below, a minimal request/reply server on `names.call(deployment)` in a queue group (so
"serving" in tests and benches means answering a call over NATS, as it will). Its envelope
is private to this module and its client `call_tool`: calls.py defines the real one.

Used by the host runtime (orchestrator.lattice.host), its tests and bench/lattice.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..capsule.bus import EventBus
from ..capsule.kvbackend import KVBackend
from ..capsule.store import KVStore
from ..errors import OrchestratorError, http_status
from .connection import Lattice

logger = logging.getLogger(__name__)

KV_DATABASE = "kv.sqlite3"  # the interim store's file in the host's state dir
QUEUE = "orch-hosts"
MAX_REQUEST_BYTES = 1 << 20

Call = Callable[[str, str, Any], Awaitable[Any]]


class CallServing(Protocol):
    """What the host needs of a call server (CallServer's interface in lattice.md)."""

    async def serve(self, deployment: str) -> None: ...
    async def unserve(self, deployment: str) -> None: ...
    async def close(self) -> None: ...


class Buses(Protocol):
    """A bus for each deployment's capsule (LatticeBus's interface in lattice.md)."""

    def for_deployment(self, name: str) -> EventBus: ...
    async def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class Opened:
    """A store and how to close it."""

    store: KVBackend
    close: Callable[[], Awaitable[None]]


async def open_store(lattice: Lattice, *, state_dir: Path, replicas: int) -> Opened:
    """The KV store the host's capsules use. Interim: the local store in the state dir."""
    store = await KVStore.open(state_dir / KV_DATABASE)
    return Opened(store, store.close)


@dataclass
class LocalBuses:
    """Interim: every deployment publishes on the host's own bus."""

    local: EventBus

    def for_deployment(self, name: str) -> EventBus:
        return self.local

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def open_buses(lattice: Lattice, *, local: EventBus, host_id: str) -> Buses:
    buses = LocalBuses(local)
    await buses.start()
    return buses


async def release(buses: Buses, name: str, handle: Any) -> None:
    """Before deployment `name` stops on this host (moved away, removed, drained): stop
    receiving its events here, and let `handle` (its running Capsule) handle those that
    arrived. Interim: events stay on the host, nothing to do."""
    return None


def open_calls(lattice: Lattice, *, call: Call, host_id: str) -> CallServing:
    return InterimCalls(lattice, call, host_id)


# -- the interim call server and client --------------------------------------------------
@dataclass
class InterimCalls:
    """Answers `{"tool", "arguments"}` requests on `names.call(deployment)`, queue group
    QUEUE; a reply is `{"output" (base64), "headers": {"X-Host", "X-Fuel-Used",
    "X-Seconds", "X-Attempts"}}` or `{"error": {"kind", "message", "status"}}`."""

    lattice: Lattice
    call: Call
    host_id: str
    _subs: dict[str, Subscription] = field(default_factory=dict)
    _running: dict[str, set[asyncio.Task[None]]] = field(default_factory=dict)

    async def serve(self, deployment: str) -> None:
        if deployment in self._subs:
            return

        async def on_request(msg: Msg) -> None:  # one task per request: calls run side by side
            task = asyncio.get_running_loop().create_task(self._answer(deployment, msg))
            tasks = self._running.setdefault(deployment, set())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        subject = self.lattice.names.call(deployment)
        self._subs[deployment] = await self.lattice.nc.subscribe(subject, queue=QUEUE, cb=on_request)

    async def unserve(self, deployment: str) -> None:
        """Stop taking calls for `deployment`; wait for those in flight."""
        sub = self._subs.pop(deployment, None)
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.drain()  # type: ignore[no-untyped-call]  # requests already routed here are answered
        running = list(self._running.pop(deployment, ()))
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    async def close(self) -> None:
        for deployment in list(self._subs):
            await self.unserve(deployment)

    async def _answer(self, deployment: str, msg: Msg) -> None:
        reply: dict[str, Any]
        try:
            if len(msg.data) > MAX_REQUEST_BYTES:
                raise ValueError(f"request of {len(msg.data):,} bytes: over {MAX_REQUEST_BYTES:,}")
            request = json.loads(msg.data)
            if not isinstance(request, dict) or not isinstance(request.get("tool"), str):
                raise ValueError('expected {"tool": NAME, "arguments": JSON text}')
            text = request.get("arguments") or "{}"
            arguments = json.loads(text) if isinstance(text, str) else None
            result = await self.call(deployment, request["tool"], arguments)
            reply = {
                "output": base64.b64encode(result.output).decode(),
                "headers": {
                    "X-Host": self.host_id,
                    "X-Fuel-Used": str(result.fuel_used),
                    "X-Seconds": f"{result.seconds:.6f}",
                    "X-Attempts": str(result.attempts),
                },
            }
        except asyncio.CancelledError:
            raise
        except (ValueError, RecursionError) as error:
            reply = {"error": {"kind": "BadRequest", "message": str(error)[:500], "status": 400}}
        except OrchestratorError as error:
            reply = {"error": {"kind": type(error).__name__, "message": str(error), "status": http_status(error)}}
        except Exception as error:
            logger.exception("lattice call to %s failed", deployment)
            reply = {"error": {"kind": type(error).__name__, "message": str(error), "status": 500}}
        if msg.reply:
            with contextlib.suppress(Exception):
                await self.lattice.nc.publish(msg.reply, json.dumps(reply).encode())


class InterimCallError(OrchestratorError):
    """A call over the lattice failed (`status`, `kind`, `message` as the host answered)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


async def call_tool(
    lattice: Lattice, deployment: str, tool: str, arguments: bytes, *, timeout: float
) -> tuple[bytes, dict[str, str]]:
    """Call `tool` of `deployment` on whichever host answers: (output, headers: X-Host,
    X-Fuel-Used, X-Seconds, X-Attempts, as calls.py's). Raises InterimCallError, or nats
    errors (no responders, timeout)."""
    request = json.dumps({"tool": tool, "arguments": arguments.decode()}).encode()
    answer = await lattice.nc.request(lattice.names.call(deployment), request, timeout=timeout)
    reply = json.loads(answer.data)
    if "error" in reply:
        error = reply["error"]
        raise InterimCallError(int(error["status"]), str(error["kind"]), str(error["message"]))
    return base64.b64decode(reply["output"]), {str(k): str(v) for k, v in reply["headers"].items()}
