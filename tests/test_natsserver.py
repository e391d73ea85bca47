"""The test harness's NATS servers: ports that nothing else takes, and a start that survives one taken anyway."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests import natsserver
from tests.natsserver import free_port, nats_servers


def test_ports_are_outside_the_range_outgoing_connections_use_and_never_handed_out_twice() -> None:
    low, high = natsserver._ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert not any(low <= port <= high for port in ports)


class SquatTheFirst(set[int]):
    """Takes the first port handed out right after its probe found it free: the race itself."""

    def __init__(self) -> None:
        super().__init__()
        self.squatter: socket.socket | None = None

    def add(self, port: int) -> None:
        super().add(port)
        if self.squatter is None:
            self.squatter = socket.socket()
            self.squatter.bind(("127.0.0.1", port))
            self.squatter.listen()


def test_a_server_whose_port_was_taken_before_it_bound_starts_again_on_fresh_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed = SquatTheFirst()
    monkeypatch.setattr(natsserver, "_handed_out", handed)
    try:
        with nats_servers(tmp_path, count=1) as servers:
            (node,) = servers.nodes
            assert handed.squatter is not None
            assert node.port != handed.squatter.getsockname()[1] and node.healthy()
            assert "address already in use" in (tmp_path / "try0" / "n1" / "log").read_text()
    finally:
        if handed.squatter is not None:
            handed.squatter.close()
