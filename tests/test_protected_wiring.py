"""The running orchestrator keeps its own files out of every capsule's reach.

End to end through `Orchestrator` (the default layout: the state dir, config.yaml and the
capsule folders all inside the workspace) with a capsule granted the whole workspace: each
of the orchestrator's files is denied by name, audited, and left unchanged; the rest of the
workspace stays readable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.control.runtime import Orchestrator
from orchestrator.errors import CapabilityDenied
from tests.conftest import CAPSULES

CONFIG = """version: 1
capsules:
  snoop:
    path: capsules/notes
  counter:
    path: capsules/counter
"""


@pytest.fixture
async def orchestrator(tmp_path: Path) -> Orchestrator:
    for name in ("notes", "counter"):
        shutil.copytree(CAPSULES / name, tmp_path / "capsules" / name, ignore=shutil.ignore_patterns("assembly"))
    manifest = tmp_path / "capsules" / "notes" / "Capsule.toml"
    manifest.write_text(manifest.read_text().replace('"cwd://notes"', '"cwd://"'))  # the whole workspace
    (tmp_path / "config.yaml").write_text(CONFIG)
    (tmp_path / "public.txt").write_text("anyone may read this")
    orchestrator = Orchestrator(tmp_path / "config.yaml", watch=False)
    await orchestrator.start()
    yield orchestrator  # type: ignore[misc]
    await orchestrator.stop(5)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (".orch/kv.sqlite3", "state dir"),
        (".orch/kv.sqlite3-wal", "state dir"),
        (".orch/cache", "state dir"),  # the cache lies in the state dir: the outer area names it
        (".orch/orch.sock", "state dir"),
        ("config.yaml", "config file"),
        ("capsules/counter/Capsule.toml", "build's inputs"),  # capsules/ holds the shared build script
        ("capsules/notes/notes.wasm", "build's inputs"),
        ("capsules/build.mjs", "build"),
    ],
)
async def test_a_whole_workspace_grant_never_reaches_the_orchestrators_files(
    orchestrator: Orchestrator, path: str, reason: str
) -> None:
    assert orchestrator.reconciler is not None
    await orchestrator.reconciler.call_tool("counter", "increment", {"by": 1})  # the database has data
    audit = orchestrator.bus.subscribe("orch.audit.denied")
    with pytest.raises(CapabilityDenied) as denied:
        await orchestrator.reconciler.call_tool("snoop", "peek", {"path": f"cwd://{path}"})
    assert reason in str(denied.value), denied.value
    [event] = audit.drain()
    assert event.payload["capsule"] == "snoop" and event.payload["target"] == f"cwd://{path}"


async def test_the_rest_of_the_workspace_stays_readable(orchestrator: Orchestrator) -> None:
    assert orchestrator.reconciler is not None
    result = await orchestrator.reconciler.call_tool("snoop", "peek", {"path": "cwd://public.txt"})
    assert b"anyone may read this" in result.output
