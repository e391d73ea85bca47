"""`orch up`'s output never blocks the orchestrator.

With `--log-format json` piped into a reader that stops reading, the pipe fills and a plain
write would block the event loop: the control API stopped answering. Output now goes
through a bounded queue and a writer thread; lines the reader cannot take are dropped and
counted, and the orchestrator keeps serving.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from orchestrator.cli.printer import LinePrinter
from tests.processes import DEADLINE, example_deployment, status_over, stop_up, wait_serving


def test_a_stalled_stdout_reader_never_stops_the_api(tmp_path: Path) -> None:
    config = example_deployment(tmp_path)
    text = config.read_text()
    config.write_text(
        text.replace("config: {step: 1}", "config: {step: 1}\n    publish_rate: {messages_per_second: 100000}")
    )
    sock = tmp_path / ".orch" / "orch.sock"
    with open(tmp_path / "err.log", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "up", str(config), "--log-format", "json", "--no-watch"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,  # never read: the pipe fills after a few hundred events
            stderr=err,
        )
    try:
        wait_serving(process, sock, tmp_path / "err.log")
        for _ in range(1500):  # each call publishes events: far more than a pipe holds
            reply = _call(sock, b"POST /v1/capsules/counter/tools/increment", b'{"by": 1}')
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        status = status_over(sock)
        counter = next(c for c in status["capsules"] if c["name"] == "counter")
        assert counter["calls"] == 1500
    finally:
        stop_up(process)
        assert process.stdout is not None
        process.stdout.close()
    assert process.returncode == 0


def _call(sock: Path, head: bytes, body: bytes) -> bytes:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(DEADLINE)
        conn.connect(str(sock))
        conn.sendall(
            head
            + b" HTTP/1.1\r\nHost: orch\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def test_the_printer_drops_and_counts_what_a_stalled_reader_cannot_take() -> None:
    read, write = os.pipe()
    printer = LinePrinter(write, capacity=10)
    try:
        for i in range(5000):  # nobody reads: the pipe fills, then the queue
            printer.write(f"line {i} " + "x" * 200)
        assert printer.dropped > 0
        assert printer.dropped <= 5000 - 10
        received = bytearray()
        done = threading.Event()

        def drain() -> None:
            while not done.is_set():
                chunk = os.read(read, 65536)
                if not chunk:
                    return
                received.extend(chunk)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        printer.close()  # the queued lines reach the reader now
        os.close(write)
        reader.join(DEADLINE)
        done.set()
        lines = bytes(received).decode().splitlines()
        assert lines[0] == "line 0 " + "x" * 200  # what was written is whole and in order
        assert len(lines) + printer.dropped == 5000
    finally:
        os.close(read)
