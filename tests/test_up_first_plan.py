"""`orch up` serves its API from the start: while the first plan loads (finding 16 of the
attack: a module that took 24 s to start kept the API away for as long).

A real `orch up` process. The capsule `stuck` cannot start: its `_initialize` spins until
its time limit (`timeout_ms`, 8 s) ends it. While it spins the API answers, says
`ready: false` and shows `stuck` Starting, and `counter`, loaded concurrently, is Running and
answers calls. Then the start-up fails with a message naming the time limit, and the plan is
applied with `stuck` Failed. The time limit only bounds the test: nothing asserts a duration.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from orchestrator.api.client import Client
from orchestrator.api.server import socket_alive
from tests.conftest import CAPSULES
from tests.natsserver import wait_for
from tests.processes import spawn_up, stop_up

STUCK_WAT = """
(module
  (func (export "_initialize") (loop $forever (br $forever)))
  (func (export "version") (result i32) (i32.const 0))
)
"""

STUCK_TOML = """[package]
name = "stuck"
version = "0.1.0"
description = "never finishes starting"

[[component]]
id = "main"
file = "stuck.wat"

[[tool]]
name = "version"
description = "never reached"
"""

CONFIG = """version: 1
workspace: .
state_dir: .orch
capsules:
  counter:
    path: capsules/counter
  stuck:
    path: capsules/stuck
    limits: {fuel: 1000000000000000, timeout_ms: 8000}
"""


def phases(status: dict[str, Any]) -> dict[str, str]:
    return {capsule["name"]: capsule["phase"] for capsule in status["capsules"]}


async def test_the_api_answers_while_the_first_plan_loads_and_capsules_load_concurrently(tmp_path: Path) -> None:
    shutil.copytree(CAPSULES / "counter", tmp_path / "capsules" / "counter", ignore=shutil.ignore_patterns("assembly"))
    (tmp_path / "capsules" / "stuck").mkdir()
    (tmp_path / "capsules" / "stuck" / "stuck.wat").write_text(STUCK_WAT)
    (tmp_path / "capsules" / "stuck" / "Capsule.toml").write_text(STUCK_TOML)
    (tmp_path / "config.yaml").write_text(CONFIG)
    sock, log = tmp_path / ".orch" / "orch.sock", tmp_path / "up.log"
    process = spawn_up(tmp_path / "config.yaml", log)
    try:
        await wait_for(lambda: socket_alive(sock) or process.poll() is not None, "the API socket")
        assert process.poll() is None, log.read_text()
        async with Client(sock) as api:
            status = await api.status()
            assert status["orchestrator"]["ready"] is False  # served before the first plan is applied
            assert phases(status)["stuck"] == "Starting"

            async def counter_serves_while_stuck_starts() -> bool:
                now = await api.status()
                assert now["orchestrator"]["ready"] is False and phases(now)["stuck"] == "Starting"
                return phases(now)["counter"] == "Running"

            await wait_for(counter_serves_while_stuck_starts, "counter running while stuck starts")
            body, _ = await api.call("counter", "increment", b'{"by": 2}')
            assert json.loads(body) == {"count": 2}

            async def applied() -> bool:
                return bool((await api.status())["orchestrator"]["ready"])

            await wait_for(applied, "the first plan applied", deadline=60)
            status = await api.status()
            assert phases(status) == {"counter": "Running", "stuck": "Failed"}
            stuck = next(c for c in status["capsules"] if c["name"] == "stuck")
            assert "_initialize" in stuck["last_error"] and "8000" in stuck["last_error"], stuck["last_error"]
    finally:
        stop_up(process)
