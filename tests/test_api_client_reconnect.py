"""The control API client after the server closed its kept-alive connection: the server
evicts the idle connection that waited longest when it is full (api.connections), and the
client's next GET must still be answered (sent again, once, on a new connection)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from orchestrator.api.client import Client
from orchestrator.api.server import ServerLimits
from tests.test_api import DEADLINE, eventually
from tests.test_api_hardening import connect, serve_with, stats


async def test_a_get_on_an_evicted_keep_alive_connection_is_sent_again(tmp_path: Path) -> None:
    async with serve_with(tmp_path, ServerLimits(max_connections=8)) as served, Client(served.sock) as api:
        assert len((await api.status())["capsules"]) == 4  # its connection now idle, kept alive
        streams = []
        for _ in range(stats(served)["max_connections"] - 1):  # requests in progress: never evicted
            reader, writer = await connect(served)
            writer.write(b"GET /v1/events HTTP/1.1\r\nHost: orch\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            streams.append(writer)
        _, newcomer = await connect(served)  # one more: the client's idle connection makes room
        await eventually(lambda: stats(served)["evicted"] == 1, "the idle connection evicted")
        status = await api.status()
        assert len(status["capsules"]) == 4 and status["api"]["evicted"] >= 1
        for writer in [*streams, newcomer]:
            writer.close()
