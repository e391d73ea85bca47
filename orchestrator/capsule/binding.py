"""The airlocks bound to the engine: each `extism:host/user` function as a `HostFunction`.

The engine calls a host function with kernel-memory offsets; this reads each argument block
(an offset that is not a live block is a HostResult error for functions that return one, a
trap otherwise), calls the airlock with the call's `CallState` (the `context` the capsule
passed to `Plugin.call`), and writes its result back as a new block.

Used by orchestrator.capsule.capsule and the CLI (`orch capsule check`).
"""

from __future__ import annotations

from typing import Any

from ..engine import HostCall, HostFunction
from ..errors import CapsuleTrap
from .airlocks import HOST_FUNCTIONS, Airlock, CallState, err


def bind_airlocks() -> list[HostFunction]:
    """The airlocks of orchestrator.capsule.airlocks as engine host functions."""
    return [
        HostFunction(a.name, ["i64"] * a.arity, [] if a.result == "none" else ["i64"], _bind(a)) for a in HOST_FUNCTIONS
    ]


def _bind(airlock: Airlock) -> Any:
    def call(host: HostCall, *offsets: int) -> int | None:
        state = host.context
        if not isinstance(state, CallState):
            raise CapsuleTrap(f"{airlock.name} was called outside a capsule tool call")
        args = []
        for position, offset in enumerate(offsets, start=1):
            if offset == 0:
                args.append(b"")
                continue
            data = host.length(offset)
            if data is None:
                message = f"{airlock.name}: argument {position} (offset {offset}) is not an allocated kernel block"
                if airlock.result == "result":
                    return host.write(err(message))
                raise CapsuleTrap(message)
            args.append(host.read(offset))
        result = airlock.function(state, *args)
        if airlock.result == "none":
            return None
        if airlock.result == "i64":
            return int(result)
        return host.write(result)

    return call
