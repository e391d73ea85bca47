"""What a host plugs its capsules into: KV store, per-deployment bus, call serving.

The one place that chooses them: the lattice KV (`JetStreamKV`, kvstore.py), a bus per
deployment (`LatticeBus`, bus.py: events on NATS, interceptors served once per deployment)
and a call server (`CallServer`, calls.py: a queue group per deployment). Before a
deployment leaves a host, `release` stops its events arriving here and lets its capsule
handle those that did.

Used by the host runtime (orchestrator.lattice.host), its tests and bench/lattice.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..capsule.bus import EventBus
from ..capsule.kvbackend import KVBackend
from .bus import LatticeBus
from .calls import CallServer, call_tool
from .connection import Lattice
from .kvstore import JetStreamKV

logger = logging.getLogger(__name__)


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
    """The KV store the host's capsules use: the lattice's, so a capsule that moves keeps
    its data (`state_dir` holds none of it)."""
    store = await JetStreamKV.open(lattice, replicas=replicas)
    return Opened(store, store.close)


async def open_buses(lattice: Lattice, *, local: EventBus, host_id: str) -> Buses:
    buses = LatticeBus(lattice, local, host_id)
    await buses.start()
    return buses


async def release(buses: Buses, name: str, handle: Any) -> None:
    """Before deployment `name` stops on this host (moved away, removed, drained): stop
    receiving its events here, and let `handle` (its running Capsule) handle those that
    arrived."""
    bus = buses.for_deployment(name)
    await bus.stop_receiving()  # type: ignore[attr-defined]
    if handle is not None:
        await handle.caught_up(bus.last_seq)


def open_calls(lattice: Lattice, *, call: Call, host_id: str) -> CallServing:
    return CallServer(lattice, call, host_id)


__all__ = ["Buses", "CallServing", "call_tool", "open_buses", "open_calls", "open_store", "release"]
