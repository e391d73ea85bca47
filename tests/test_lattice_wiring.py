"""The interim call server of the host seam (orchestrator.lattice.wiring) on a real
nats-server: malformed, oversized and hostile requests get an error reply and change
nothing; errors keep the control API's kind and status; unserve answers what was routed.

The tool call itself is a stand-in (this is the seam's unit test); the hosts' tests call
real capsules through it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from orchestrator.errors import UnknownTool
from orchestrator.lattice.connection import Lattice, LatticeAddress
from orchestrator.lattice.wiring import InterimCallError, InterimCalls, call_tool
from tests.natsserver import NatsServers


@dataclass
class Result:
    output: bytes
    fuel_used: int = 7
    seconds: float = 0.001
    attempts: int = 1


@pytest.fixture
async def lattice(nats_server: NatsServers) -> AsyncIterator[Lattice]:
    connected = await Lattice.connect(LatticeAddress.parse(nats_server.urls))
    try:
        yield connected
    finally:
        await connected.close()


async def test_requests_that_are_not_calls_get_an_error_and_nothing_runs(lattice: Lattice) -> None:
    seen: list[tuple[str, str, Any]] = []

    async def call(deployment: str, tool: str, arguments: Any) -> Result:
        seen.append((deployment, tool, arguments))
        if tool == "missing":
            raise UnknownTool(f"capsule {deployment!r} has no tool {tool!r}")
        return Result(json.dumps(arguments).encode())

    server = InterimCalls(lattice, call, "h1")
    await server.serve("app")
    subject = lattice.names.call("app")
    for hostile in (b"", b"nope", b"[]", b'{"tool": 5}', b'{"tool": "t", "arguments": "{bad"}', b"[" * 100_000):
        reply = json.loads((await lattice.nc.request(subject, hostile, timeout=5)).data)
        assert reply["error"]["status"] == 400 and reply["error"]["kind"] == "BadRequest", hostile[:20]
    oversized = json.dumps({"tool": "t", "arguments": "0" * (1 << 20)}).encode()
    reply = json.loads((await lattice.nc.request(subject, oversized, timeout=5)).data)
    assert reply["error"]["status"] == 400 and "over" in reply["error"]["message"]
    assert seen == []
    output, headers = await call_tool(lattice, "app", "echo", b'{"a": 1}', timeout=5)
    assert output == b'{"a": 1}' and headers["X-Host"] == "h1" and headers["X-Fuel-Used"] == "7"
    with pytest.raises(InterimCallError) as refused:
        await call_tool(lattice, "app", "missing", b"{}", timeout=5)
    assert (refused.value.status, refused.value.kind) == (404, "UnknownTool")
    await server.close()


async def test_unserve_answers_the_calls_already_taken(lattice: Lattice) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def call(deployment: str, tool: str, arguments: Any) -> Result:
        started.set()
        await release.wait()
        return Result(b"done")

    server = InterimCalls(lattice, call, "h1")
    await server.serve("app")
    pending = asyncio.get_running_loop().create_task(call_tool(lattice, "app", "slow", b"{}", timeout=10))
    await started.wait()
    leaving = asyncio.get_running_loop().create_task(server.unserve("app"))
    done, _ = await asyncio.wait([leaving], timeout=0.3)
    assert not done  # it waits for the call in flight
    release.set()
    await leaving
    assert (await pending)[0] == b"done"
