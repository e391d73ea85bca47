"""`[build]` runs only when the operator allows it: `builds: false` in config.yaml or
`orch up --no-builds` keeps every build command from running, while file changes are still
applied (a build command is a shell command from a manifest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.control.runtime import Orchestrator
from tests.test_orchestrate import CONFIG, Running, module, replace_atomically, write_capsule


@pytest.mark.parametrize("switch", ["config", "flag"])
async def test_builds_off_never_runs_a_build_but_still_applies_changes(tmp_path: Path, switch: str) -> None:
    folder = tmp_path / "caps" / "ver"
    marker = tmp_path / "build-ran"
    write_capsule(folder, 1, extra=f'[build]\ncommand = "touch {marker}"\nwatch = ["src/*.txt"]\n')
    (folder / "src").mkdir()
    (tmp_path / "config.yaml").write_text(CONFIG + ("builds: false\n" if switch == "config" else ""))
    orchestrator = Orchestrator(tmp_path / "config.yaml", builds=switch != "flag")
    events = orchestrator.bus.subscribe(">", queue_size=100_000)
    await orchestrator.start()
    run = Running(orchestrator, events, tmp_path)
    try:
        (folder / "src" / "v.txt").write_text("a source change")  # would trigger the build
        replace_atomically(folder / "v.wat", module(7))  # a change that is applied: awaited below
        await run.wait_topic("orch.capsule.ver.reloaded")
        assert await run.version() == "7"
        await orchestrator.builder.idle()
        assert orchestrator.bus.history("orch.capsule.ver.build_started") == []
        assert not marker.exists()
    finally:
        await orchestrator.stop(2)
