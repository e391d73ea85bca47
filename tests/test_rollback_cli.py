"""History and rollback end to end: `orch up` in its own process on a copy of the example
deployment, driven by CLI subprocesses (`orch reconcile|plan|status`, and the history verbs
`history|rollback|unpin`) with the counter counted over the control socket.

The scenario: count to 5 on v1; reload to v2 (a snapshot of what v1 left is taken); count to
9; `rollback --to v1 --with-data`: the count is 5 and v1 serves, pinned, and `orch plan`
shows it as overridden; a change to another capsule does not undo the pin; a change to the
counter's own config ends it; a second rollback is ended by `unpin`. Refusals print one
line, exit 1 and change nothing.

`orch up` runs with --no-watch: every sync is an explicit `orch reconcile`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import DEADLINE, REPO, example_deployment, orch, spawn_up, status_over, stop_up, wait_serving
from tests.test_rollback import edit, new_version


def verbs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The history verbs, as the `orch` CLI runs them."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[Any]) -> str:
    out = result.stdout if isinstance(result.stdout, str) else result.stdout.decode()
    err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
    assert result.returncode == 0, (result.args, out, err)
    return out


class Up:
    def __init__(self, root: Path, process: subprocess.Popen[bytes]) -> None:
        self.root, self.process = root, process
        self.sock = root / ".orch" / "orch.sock"

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return orch(*args, cwd=self.root)

    def counter(self) -> dict[str, Any]:
        return next(c for c in status_over(self.sock)["capsules"] if c["name"] == "counter")  # type: ignore[no-any-return]

    def call(self, tool: str) -> int:
        """POST /v1/capsules/counter/tools/TOOL over the socket (the CLI is what is tested
        elsewhere; counting through it would only be slower)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(DEADLINE)
            conn.connect(str(self.sock))
            conn.sendall(
                f"POST /v1/capsules/counter/tools/{tool} HTTP/1.1\r\nHost: orch\r\nConnection: close\r\n"
                "Content-Length: 2\r\n\r\n{}".encode()
            )
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), data[:300]
        return int(json.loads(body)["count"])

    def count_to(self, target: int) -> None:
        count = self.call("get")
        while count < target:
            count = self.call("increment")
        assert count == target


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    config = example_deployment(tmp_path)
    log = tmp_path / "up.log"
    process = spawn_up(config, log)
    try:
        running = Up(tmp_path, process)
        wait_serving(process, running.sock, log)
        yield running
    finally:
        stop_up(process)


def test_rollback_with_data_pin_and_unpin_through_the_cli(up: Up) -> None:
    up.count_to(5)
    v1 = up.counter()["version"]
    new_version(up.root, "v2")
    assert "~ counter" in ok(up.cli("reconcile"))
    v2 = up.counter()["version"]
    up.count_to(9)
    listing = ok(verbs("history", "counter", cwd=up.root))
    assert "counter: runs its desired spec (not pinned)" in listing
    lines = listing.splitlines()
    assert lines[1].split()[:2] == ["ID", "WHEN"]
    assert v2 in lines[2] and "reload" in lines[2] and lines[2].startswith("@2*")
    assert v1 in lines[3] and "start" in lines[3] and "1 keys, 6 B" in lines[3]

    done = ok(verbs("rollback", "counter", "--to", v1, "--with-data", cwd=up.root))
    assert f"counter: rolled back to version {v1} (entry @1) with its data (1 keys restored)" in done
    assert f"pinned to version {v1}" in done
    assert up.call("get") == 5
    status = up.counter()
    assert (status["version"], status["pinned"]["version"], status["phase"]) == (v1, v1, "Running")
    status_json = json.loads(ok(up.cli("status", "--json")))
    assert next(c for c in status_json["capsules"] if c["name"] == "counter")["pinned"]["version"] == v1
    plan = json.loads(ok(up.cli("plan", "--json")))
    counter = next(a for a in plan["actions"] if a["capsule"] == "counter")
    assert counter["overridden"] == {"version": v1} and counter["action"] == "keep"
    text = ok(up.cli("plan"))
    assert f"overridden: pinned to version {v1} by a rollback instead of the desired {v2}" in text

    # another capsule's change, then a sync: the pin stays
    edit(up.root / "capsules" / "notes" / "Capsule.toml", "Text notes", "Notes")
    assert "~ notes" in ok(up.cli("reconcile"))
    assert up.counter()["pinned"]["version"] == v1 and up.call("increment") == 6
    # the counter's own desired spec changes: the pin ends, the desired spec runs
    edit(up.root / "config.yaml", "config: {step: 1}", "config: {step: 2}")
    ok(up.cli("reconcile"))
    status = up.counter()
    assert (status["version"], status["pinned"]) == (v2, None)
    assert up.call("increment") == 8

    ok(verbs("rollback", "counter", cwd=up.root))  # to the version before: v1 (step 1), pinned again
    assert up.counter()["pinned"]["version"] == v1 and up.call("increment") == 9
    assert "pinned to version" in ok(verbs("history", "counter", cwd=up.root)).splitlines()[0]
    unpinned = ok(verbs("unpin", "counter", cwd=up.root))
    assert f"counter: unpinned; Running version {v2}" in unpinned
    status = up.counter()
    assert (status["version"], status["pinned"]) == (v2, None) and up.call("increment") == 11
    history = json.loads(ok(verbs("history", "counter", "--json", cwd=up.root)))
    assert [e["event"] for e in history["entries"]][:3] == ["reload", "rollback", "reload"]


def test_refusals_print_one_line_and_change_nothing(up: Up) -> None:
    up.count_to(3)
    v1 = up.counter()["version"]
    new_version(up.root, "v2")
    ok(up.cli("reconcile"))
    fields = ("version", "spec_hash", "pinned", "reload_count", "phase", "since_ms")
    before = {k: up.counter()[k] for k in fields}, up.call("get")

    unknown = verbs("rollback", "counter", "--to", "deadbeef", "--with-data", cwd=up.root)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("orch: capsule 'counter' has no earlier version deadbeef in its history")
    assert len(unknown.stderr.strip().splitlines()) == 1
    entries = json.loads(ok(verbs("history", "counter", "--json", cwd=up.root)))["entries"]
    (up.root / ".orch" / "artifacts" / f"{entries[1]['wasm_sha256']}.wasm").unlink()
    evicted = verbs("rollback", "counter", "--to", v1, cwd=up.root)
    assert evicted.returncode == 1 and "the module of version" in evicted.stderr and "no longer kept" in evicted.stderr
    assert "(module no longer kept)" in ok(verbs("history", "counter", cwd=up.root))
    notpinned = verbs("unpin", "counter", cwd=up.root)
    assert notpinned.returncode == 1 and "is not pinned" in notpinned.stderr
    nosuch = verbs("history", "nope", cwd=up.root)
    assert nosuch.returncode == 1 and "no capsule 'nope'" in nosuch.stderr
    assert ({k: up.counter()[k] for k in fields}, up.call("get")) == before


def test_without_an_orchestrator_the_verbs_exit_3(tmp_path: Path) -> None:
    example_deployment(tmp_path)
    for args in (["history", "counter"], ["rollback", "counter", "--with-data"], ["unpin", "counter"]):
        result = verbs(*args, cwd=tmp_path)
        assert result.returncode == 3 and "no orchestrator is running" in result.stderr, (args, result)
    bad = verbs("rollback", cwd=REPO)
    assert bad.returncode == 2 and "name" in bad.stderr
