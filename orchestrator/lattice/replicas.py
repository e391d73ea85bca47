"""The number of copies of every stream of a lattice (config.yaml `lattice.replicas`).

`scale(lattice, replicas)` gives every stream of the lattice that exists `replicas` copies:
the buckets of the desired state, hosts, lease, assignments, status and KV, and the object
stores of artifacts and KV snapshots. A change of replicas elects a leader anew; it
returns once there is one. Used by desired-state publishing (`orch apply`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors
import nats.js.errors

from .connection import Lattice, LatticeError

logger = logging.getLogger(__name__)

LEADER_SECONDS = 15.0


async def scale(lattice: Lattice, replicas: int) -> None:
    """Give every stream of the lattice `replicas` copies (those that exist). LatticeError
    when the cluster has too few servers for it."""
    names = lattice.names
    streams = [f"KV_{b}" for b in (names.desired, names.hosts, names.lease, names.assignments, names.status, names.kv)]
    await lattice.objects()
    streams += [f"OBJ_{names.artifacts}", f"OBJ_{names.bucket('snapshots')}"]
    for stream in streams:
        try:
            info = await lattice.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            continue
        if info.config.num_replicas == replicas:
            continue
        info.config.num_replicas = replicas
        try:
            await lattice.js.update_stream(info.config)
        except nats.js.errors.APIError as error:
            raise LatticeError(
                f"lattice.replicas: {replicas} copies of {stream} were refused by the lattice at "
                f"{lattice.address.shown} ({error.description or error}): a NATS cluster needs at least "
                f"{replicas} servers for it; lower lattice.replicas or add servers"
            ) from None
        await leader_elected(lattice, stream)
        logger.info("%s: now %d replicas", stream, replicas)


async def leader_elected(lattice: Lattice, stream: str, deadline: float = LEADER_SECONDS) -> None:
    """Until `stream` has a leader again (a change of replicas elects one anew; requests in
    between time out). LatticeError past the deadline."""
    end = time.monotonic() + deadline
    while True:
        with contextlib.suppress(nats.errors.TimeoutError):
            info = await lattice.js.stream_info(stream)
            if info.cluster is None or info.cluster.leader:
                return
        if time.monotonic() > end:
            raise LatticeError(f"{stream} elected no leader within {deadline:g} s after changing its replicas")
        await asyncio.sleep(0.05)
