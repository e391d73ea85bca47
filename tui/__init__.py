"""The terminal dashboard (Textual): a client of a running orchestrator's control API and
nothing else. `orch dash` attaches to one; `orch up --dash` runs one with it in a process;
`orch dash --lattice URL` shows a whole lattice through a client the CLI passes in
(`connect`: the same methods, answered over NATS).

Only this package imports Textual; from `orchestrator` it imports only the client, the
errors, the topics and the tool input validator (orchestrator.desired.schema: the dashboard
checks arguments exactly as the orchestrator will), so the orchestrator runs without it and
`orch` without `dash` never loads Textual.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from textual.logging import TextualHandler

from .app import Dashboard
from .format import Clock
from .link import Api, Connect, connect_to

__all__ = ["Api", "Clock", "Connect", "Dashboard", "connect_to", "run_dashboard"]


async def run_dashboard(
    socket: Path | None = None,
    *,
    connect: Connect | None = None,
    where: str = "",
    stop: asyncio.Event | None = None,
    log_file: Path | None = None,
) -> None:
    """Run the dashboard on the orchestrator serving `socket` (or on what `connect` opens:
    `orch dash --lattice` passes a lattice's client, and `where` to name it) until `q` (or
    `stop` is set).

    While it owns the terminal, nothing may write over the screen: log records go to
    `log_file` (`orch up --dash`: the orchestrator in this process logs there) or else to
    Textual's own log (`textual console` shows it).
    """
    if connect is None:
        if socket is None:
            raise ValueError("run_dashboard: give the socket or connect")
        connect, where = connect_to(socket), where or str(socket)
    app = Dashboard(connect, where=where, stop=stop)
    root = logging.getLogger()
    saved = root.handlers[:]
    handler: logging.Handler
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = TextualHandler(stderr=False)
    root.handlers = [handler]
    try:
        await app.run_async()
    finally:
        root.handlers = saved
        handler.close()
