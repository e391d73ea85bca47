"""Per-capsule isolation and failures you can see (the operator's and author's day).

Through the real runtime and watcher: a broken manifest of one capsule leaves it on its
last good version, shown `Degraded` with the reason, while an unrelated change in the same
save applies; only a broken config.yaml holds a change back, and the status says so with
its problems; fixing things is said once. A new capsule whose module does not exist yet is
built at start (and on a source change); a failed build shows in the health. Calls and
interceptor runs count, and the last error carries its tool and time.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.capsule.bus import Event
from orchestrator.control.reconciler import FAILURE_LOG_SECONDS
from orchestrator.control.runtime import Orchestrator
from orchestrator.errors import ToolInputError
from tests.conftest import CAPSULES
from tests.test_orchestrate import MANIFEST, Running, module, replace_atomically, started, write_capsule

TWO = """version: 1
state_dir: state
capsules:
  ver:
    path: caps/ver
  two:
    path: caps/two
"""


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[Running]:
    write_capsule(tmp_path / "caps" / "ver", 1)
    write_capsule(tmp_path / "caps" / "two", 2, name="two")
    async with started(tmp_path, TWO) as run:
        yield run


async def test_a_broken_manifest_holds_back_only_its_own_capsule(two: Running) -> None:
    root = two.root
    replace_atomically(root / "caps" / "ver" / "Capsule.toml", "[package]\nname = 'ver'\nversion = 'nope'\n")
    degraded = await two.wait_topic("orch.capsule.ver.degraded")
    assert "package.version" in degraded.payload["last_error"]
    assert degraded.payload["last_error_tool"] is None and degraded.payload["last_error_at_ms"] > 0
    replace_atomically(root / "caps" / "two" / "v.wat", module(9))  # an unrelated change, after it
    await two.wait_topic("orch.capsule.two.reloaded")
    assert await two.version("two") == "9"  # applied
    assert await two.version() == "1" and two.phase() == "Degraded"  # the last good version serves
    health = two.orchestrator.info()["desired"]
    assert health["state"] == "accepted" and list(health["broken"]) == ["ver"]

    replace_atomically(root / "caps" / "ver" / "Capsule.toml", MANIFEST.format(name="ver", description="v", extra=""))
    await two.wait_topic("orch.reconcile.accepted")  # fixed: said once
    assert two.phase() == "Running"
    status = next(s for s in two.orchestrator.reconciler.status() if s["name"] == "ver")  # type: ignore[union-attr]
    assert status["last_error"] is None
    assert two.orchestrator.info()["desired"]["broken"] == {}


async def test_a_broken_manifest_does_not_hold_back_a_config_yaml_change_to_another_capsule(two: Running) -> None:
    root = two.root
    replace_atomically(root / "caps" / "ver" / "Capsule.toml", "[package]\nname = 'ver'\nversion = 'nope'\n")
    await two.wait_topic("orch.capsule.ver.degraded")
    before = two.orchestrator.desired.specs["two"].spec_hash  # type: ignore[union-attr]
    replace_atomically(root / "config.yaml", TWO + "    limits: {fuel: 5000000}\n")  # the case that was seen
    await two.wait_topic("orch.capsule.two.reloaded")
    spec = two.orchestrator.desired.specs["two"]  # type: ignore[union-attr]
    assert spec.spec_hash != before and spec.limits["fuel"] == 5_000_000
    assert await two.version("two") == "2" and await two.version() == "1"  # ver: its last good version
    health = two.orchestrator.info()["desired"]
    assert health["state"] == "accepted" and list(health["broken"]) == ["ver"]


async def test_a_rejected_config_is_in_the_status_until_it_is_fixed(two: Running) -> None:
    config = two.root / "config.yaml"
    accepted = two.orchestrator.info()["desired"]["accepted_at_ms"]
    replace_atomically(config, TWO + "    instance: 3\n")  # a typo: nothing of the change applies
    await two.wait_topic("orch.reconcile.rejected")
    health = two.orchestrator.info()["desired"]
    assert health["state"] == "rejected" and health["rejected"]["count"] == 1
    assert (
        "config.yaml:8" in health["rejected"]["problems"][0]
        and "did you mean 'instances'" in health["rejected"]["problems"][0]
    )
    assert health["accepted_at_ms"] == accepted  # when it was last accepted
    assert two.phase() == "Running" and two.phase("two") == "Running"
    replace_atomically(config, TWO + "    instances: 2\n")
    await two.wait_topic("orch.reconcile.accepted")
    health = two.orchestrator.info()["desired"]
    assert health["state"] == "accepted" and health["rejected"] is None and health["accepted_at_ms"] > accepted


BUILT = """version: 1
state_dir: state
capsules:
  fresh:
    path: caps/fresh
"""


def fresh_capsule(folder: Path, *, with_source: bool) -> None:
    """A capsule whose module `v.wat` is made by its build from `src/v.txt`."""
    folder.mkdir(parents=True)
    build = '[build]\ncommand = "cp src/v.txt v.wat"\nwatch = ["src/*.txt"]\n'
    (folder / "Capsule.toml").write_text(MANIFEST.format(name="fresh", description="new", extra=build))
    (folder / "src").mkdir()
    if with_source:
        (folder / "src" / "v.txt").write_text(module(3))


async def test_a_new_capsule_without_its_module_is_built_at_start(tmp_path: Path) -> None:
    fresh_capsule(tmp_path / "caps" / "fresh", with_source=True)
    async with started(tmp_path, BUILT) as run:  # starts, with `fresh` failed for now (no module yet)
        await run.wait_topic("orch.capsule.fresh.build_succeeded")
        await run.wait_topic("orch.capsule.fresh.running")
        assert await run.version("fresh") == "3"


@pytest.mark.parametrize("module_age", ["older", "newer"])
async def test_a_module_older_than_its_sources_is_rebuilt_at_start_and_a_newer_one_is_not(
    tmp_path: Path, module_age: str
) -> None:
    folder = tmp_path / "caps" / "fresh"
    fresh_capsule(folder, with_source=True)  # the sources say version 3
    (folder / "v.wat").write_text(module(1))  # a build from before
    source = folder / "src" / "v.txt"
    stamp = source.stat().st_mtime + (-60 if module_age == "older" else 60)
    os.utime(folder / "v.wat", (stamp, stamp))
    async with started(tmp_path, BUILT) as run:
        if module_age == "older":
            await run.wait_topic("orch.capsule.fresh.build_succeeded")
            await run.wait_topic("orch.capsule.fresh.reloaded")
            assert await run.version("fresh") == "3"
        else:
            await run.orchestrator.builder.idle()
            run.orchestrator.bus.publish("test.marker", None, source="test")
            builds: list[str] = []

            def marker(event: Event) -> bool:  # every event up to the marker is looked at
                if "build" in event.topic:
                    builds.append(event.topic)
                return event.topic == "test.marker"

            await run.wait_for(marker, "the marker published after start")
            assert builds == [] and await run.version("fresh") == "1"


async def test_touching_the_sources_of_a_capsule_without_a_module_builds_it(tmp_path: Path) -> None:
    fresh_capsule(tmp_path / "caps" / "fresh", with_source=False)
    async with started(tmp_path, BUILT) as run:
        assert run.phase("fresh") == "Failed"
        assert "v.wat" in str(run.orchestrator.info()["desired"]["broken"]["fresh"]["problems"])
        (tmp_path / "caps" / "fresh" / "src" / "v.txt").write_text(module(4))
        await run.wait_topic("orch.capsule.fresh.running")
        assert await run.version("fresh") == "4"


async def test_a_failed_build_is_in_the_health_until_a_build_succeeds(tmp_path: Path) -> None:
    folder = tmp_path / "caps" / "fresh"
    fresh_capsule(folder, with_source=True)
    shutil.copy(folder / "src" / "v.txt", folder / "v.wat")  # built already
    manifest = folder / "Capsule.toml"
    manifest.write_text(
        manifest.read_text().replace("cp src/v.txt v.wat", "grep -q module src/v.txt && cp src/v.txt v.wat")
    )
    async with started(tmp_path, BUILT) as run:
        (folder / "src" / "v.txt").write_text("garbage, no wasm text")
        await run.wait_topic("orch.capsule.fresh.build_failed")
        assert list(run.orchestrator.info()["desired"]["builds_failed"]) == ["fresh"]
        assert await run.version("fresh") == "3"  # the last good version serves
        (folder / "src" / "v.txt").write_text(module(5))
        await run.wait_topic("orch.reconcile.accepted")
        assert run.orchestrator.info()["desired"]["builds_failed"] == {}


async def test_calls_and_interceptor_runs_count_and_the_last_error_names_its_tool(tmp_path: Path) -> None:
    for name in ("counter", "milestones"):
        shutil.copytree(CAPSULES / name, tmp_path / "capsules" / name, ignore=shutil.ignore_patterns("assembly"))
    (tmp_path / "config.yaml").write_text(
        "version: 1\ncapsules:\n  counter: {path: capsules/counter}\n  milestones: {path: capsules/milestones}\n"
    )
    orchestrator = Orchestrator(tmp_path / "config.yaml", watch=False)
    await orchestrator.start()
    try:
        reconciler = orchestrator.reconciler
        assert reconciler is not None
        await reconciler.call_tool("counter", "increment", {"by": 1})
        await _caught_up(orchestrator)
        status = {s["name"]: s for s in reconciler.status()}
        assert status["counter"]["calls"] == 1
        assert status["milestones"]["calls"] == 2  # two interceptors ran on counter.changed
        with pytest.raises(ToolInputError):
            await reconciler.call_tool("counter", "increment", {"by": "x"})
        status = {s["name"]: s for s in reconciler.status()}
        assert status["counter"]["calls"] == 2 and status["counter"]["errors"] == 1
        assert status["counter"]["last_error_tool"] == "increment" and "/by" in status["counter"]["last_error"]
        assert status["counter"]["last_error_at_ms"] is not None and status["counter"]["last_error"]
    finally:
        await orchestrator.stop(2)


async def test_a_failed_call_is_logged_once_naming_capsule_and_tool_and_a_flood_is_held_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(CAPSULES / "counter", tmp_path / "capsules" / "counter", ignore=shutil.ignore_patterns("assembly"))
    (tmp_path / "config.yaml").write_text("version: 1\ncapsules:\n  counter: {path: capsules/counter}\n")
    orchestrator = Orchestrator(tmp_path / "config.yaml", watch=False)
    await orchestrator.start()
    try:
        reconciler = orchestrator.reconciler
        assert reconciler is not None
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="orchestrator.control.reconciler"):
            for _ in range(20):  # a failing client in a loop
                with pytest.raises(ToolInputError):
                    await reconciler.call_tool("counter", "increment", {"by": "x"})
        intervals = math.ceil((time.monotonic() - started) / FAILURE_LOG_SECONDS)  # 1 unless very slow
        lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator.control.reconciler"]
        failed = [line for line in lines if line.startswith("capsule counter: increment failed: ")]
        assert failed and "/by" in failed[0]
        assert len(failed) <= intervals  # one line per interval (of 10 s), not one per call
        assert {s["name"]: s for s in reconciler.status()}["counter"]["errors"] == 20  # every one counted
    finally:
        await orchestrator.stop(2)


async def _caught_up(orchestrator: Orchestrator) -> None:
    """Until milestones' interceptors have handled every event published so far."""
    reconciler = orchestrator.reconciler
    assert reconciler is not None
    slot = reconciler.slot("milestones")
    assert slot is not None and slot.handle is not None
    await slot.handle.caught_up(orchestrator.bus.last_seq)  # type: ignore[attr-defined]
