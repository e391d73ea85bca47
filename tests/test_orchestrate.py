"""The running orchestrator on real files: watch, reload, never break what works.

Each test writes a config.yaml and small capsules (WAT modules) into `tmp_path`, starts an
Orchestrator with file watching, changes files the way editors and build tools do, and
asserts what serves before and after. Waits are on bus events, with generous deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from orchestrator.capsule.bus import Event, Subscription
from orchestrator.control.runtime import Orchestrator
from orchestrator.control.statedir import read_applied
from orchestrator.errors import CapsuleNotRunning
from tests.awaiting import first_match
from tests.conftest import CAPSULES

DEADLINE = 15.0


def module(value: int) -> str:
    """A capsule module whose `version` tool outputs `value` (one byte, as a digit)."""
    return f"""(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output (param i64 i64)))
  (func (export "version") (result i32) (local $p i64)
    (local.set $p (call $alloc (i64.const 1)))
    (call $store (local.get $p) (i32.const {48 + value}))
    (call $output (local.get $p) (i64.const 1))
    (i32.const 0)))
"""


MANIFEST = """[package]
name = "{name}"
version = "1.0.0"
description = "{description}"

[[component]]
file = "v.wat"

[[tool]]
name = "version"
{extra}"""


def write_capsule(folder: Path, value: int, *, name: str = "ver", description: str = "v", extra: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "v.wat").write_text(module(value))
    (folder / "Capsule.toml").write_text(MANIFEST.format(name=name, description=description, extra=extra))


def replace_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Running:
    def __init__(self, orchestrator: Orchestrator, events: Subscription, root: Path) -> None:
        self.orchestrator = orchestrator
        self.events = events
        self.root = root

    async def version(self, name: str = "ver") -> str:
        assert self.orchestrator.reconciler is not None
        result = await self.orchestrator.reconciler.call_tool(name, "version", {})
        return str(result.output.decode())

    async def wait_for(self, predicate: Callable[[Event], bool], what: str) -> Event:
        return await first_match(aiter(self.events), predicate, f"an event: {what}", deadline=DEADLINE)

    async def wait_topic(self, topic: str) -> Event:
        return await self.wait_for(lambda e: e.topic == topic, topic)

    def phase(self, name: str = "ver") -> str:
        assert self.orchestrator.reconciler is not None
        slot = self.orchestrator.reconciler.slot(name)
        assert slot is not None
        return slot.phase


CONFIG = """version: 1
state_dir: state
capsules:
  ver:
    path: caps/ver
"""


@contextlib.asynccontextmanager
async def started(root: Path, config: str) -> AsyncIterator[Running]:
    """An orchestrator on `config` (written to root/config.yaml), started, watching, with
    every event recorded; stopped at the end."""
    (root / "config.yaml").write_text(config)
    orchestrator = Orchestrator(root / "config.yaml")
    events = orchestrator.bus.subscribe(">", queue_size=100_000)
    await orchestrator.start()
    try:
        yield Running(orchestrator, events, root)
    finally:
        await orchestrator.stop(2)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    write_capsule(tmp_path / "caps" / "ver", 1)
    async with started(tmp_path, CONFIG) as run:
        yield run


async def test_starts_and_records_the_applied_state(running: Running) -> None:
    assert await running.version() == "1"
    applied = read_applied(running.root / "state")
    assert set(applied) == {"ver"}
    status = running.orchestrator.reconciler.status()  # type: ignore[union-attr]
    assert status[0]["phase"] == "Running" and status[0]["version"] == applied["ver"].version


async def test_atomic_wasm_replace_reloads(running: Running) -> None:
    replace_atomically(running.root / "caps" / "ver" / "v.wat", module(2))
    await running.wait_topic("orch.capsule.ver.reloaded")
    assert await running.version() == "2"
    assert read_applied(running.root / "state")["ver"].wasm_sha256 != ""


async def test_non_atomic_write_never_serves_garbage(running: Running) -> None:
    path = running.root / "caps" / "ver" / "v.wat"
    text = module(3).encode()
    with open(path, "wb") as handle:  # truncate, then write in pieces, as a slow tool would
        for start in range(0, len(text), 40):
            handle.write(text[start : start + 40])
            handle.flush()
            assert await running.version() in ("1", "3")  # the old version keeps serving
            await asyncio.sleep(0.02)
    await running.wait_for(
        lambda e: e.topic == "orch.capsule.ver.reloaded" and e.payload["version"] is not None, "reloaded"
    )
    assert await running.version() == "3"
    assert running.phase() == "Running"


async def test_garbage_wasm_degrades_and_a_fix_recovers(running: Running) -> None:
    path = running.root / "caps" / "ver" / "v.wat"
    replace_atomically(path, "(module this is not wasm")
    event = await running.wait_topic("orch.capsule.ver.degraded")
    assert "invalid WebAssembly module" in event.payload["last_error"]
    assert await running.version() == "1"  # the last good version serves
    replace_atomically(path, module(4))
    await running.wait_topic("orch.capsule.ver.reloaded")
    assert await running.version() == "4"
    assert running.phase() == "Running"


async def test_manifest_edit_reloads_and_invalid_manifest_changes_nothing(running: Running) -> None:
    manifest = running.root / "caps" / "ver" / "Capsule.toml"
    replace_atomically(manifest, MANIFEST.format(name="ver", description="edited", extra=""))
    await running.wait_topic("orch.capsule.ver.reloaded")
    spec = running.orchestrator.desired.specs["ver"]  # type: ignore[union-attr]
    assert spec.manifest["package"]["description"] == "edited"
    replace_atomically(manifest, "[package]\nname = 'ver'\nversion = 'nope'\n")
    event = await running.wait_topic("orch.capsule.ver.degraded")  # its own row says why (issue 11)
    assert "package.version" in event.payload["last_error"]
    assert await running.version() == "1" and running.phase() == "Degraded"  # the last good version serves
    health = running.orchestrator.info()["desired"]
    assert health["state"] == "accepted" and "package.version" in health["broken"]["ver"]["problems"][0]


async def test_broken_config_keeps_the_last_good_state(running: Running) -> None:
    config = running.root / "config.yaml"
    replace_atomically(config, CONFIG + "  broken: [\n")
    event = await running.wait_topic("orch.reconcile.rejected")
    assert "config.yaml" in event.payload["problems"][0]
    assert await running.version() == "1"
    write_capsule(running.root / "caps" / "two", 2, name="two")
    replace_atomically(config, CONFIG + "  two:\n    path: caps/two\n")
    await running.wait_for(lambda e: e.topic == "orch.capsule.two.running", "two running")
    assert await running.version("two") == "2" and await running.version() == "1"


async def test_deleting_a_capsule_folder_changes_nothing_that_runs(running: Running) -> None:
    shutil.rmtree(running.root / "caps" / "ver")
    event = await running.wait_topic("orch.capsule.ver.degraded")  # broken files: its own row says why
    assert "caps/ver" in event.payload["last_error"]
    assert await running.version() == "1"


async def test_removing_and_disabling_in_the_config_stops(running: Running) -> None:
    config = running.root / "config.yaml"
    replace_atomically(config, CONFIG + "    enabled: false\n")
    await running.wait_topic("orch.capsule.ver.stopped")
    with pytest.raises(CapsuleNotRunning):
        await running.version()
    replace_atomically(config, CONFIG)
    await running.wait_topic("orch.capsule.ver.running")
    assert await running.version() == "1"
    replace_atomically(config, "version: 1\nstate_dir: state\ncapsules: {}\n")
    await running.wait_topic("orch.capsule.ver.stopped")
    assert running.orchestrator.reconciler.status() == []  # type: ignore[union-attr]


async def test_build_step_runs_on_source_change_without_loops(tmp_path: Path) -> None:
    folder = tmp_path / "caps" / "ver"
    build = '[build]\ncommand = "cp src/v.txt v.wat"\nwatch = ["src/*.txt"]\n'
    write_capsule(folder, 1, extra=build)
    (folder / "src").mkdir()
    (folder / "src" / "v.txt").write_text(module(1))
    (folder / "v.wat").touch()  # built after its source: nothing to build at start
    (tmp_path / "config.yaml").write_text(CONFIG)
    orchestrator = Orchestrator(tmp_path / "config.yaml")
    events = orchestrator.bus.subscribe(">", queue_size=100_000)
    await orchestrator.start()
    run = Running(orchestrator, events, tmp_path)
    try:
        replace_atomically(folder / "src" / "v.txt", module(5))
        await run.wait_topic("orch.capsule.ver.build_succeeded")
        await run.wait_topic("orch.capsule.ver.reloaded")
        assert await run.version() == "5"
        await orchestrator.builder.idle()
        builds = [e for e in orchestrator.bus.history("orch.capsule.ver.build_started")]
        assert len(builds) == 1  # the build's own output did not trigger another build
        (folder / "src" / "v.txt").write_text("broken source")  # builds fine, loads badly
        await run.wait_topic("orch.capsule.ver.degraded")
        assert await run.version() == "5"  # the last good version keeps serving
        await orchestrator.builder.idle()
        assert len(orchestrator.bus.history("orch.capsule.ver.build_started")) == 2
    finally:
        await orchestrator.stop(2)


async def test_failing_build_output_is_shown(tmp_path: Path) -> None:
    folder = tmp_path / "caps" / "ver"
    write_capsule(folder, 1, extra='[build]\ncommand = "echo compile error here >&2; exit 3"\nwatch = ["*.src"]\n')
    (tmp_path / "config.yaml").write_text(CONFIG)
    orchestrator = Orchestrator(tmp_path / "config.yaml")
    events = orchestrator.bus.subscribe(">", queue_size=100_000)
    await orchestrator.start()
    run = Running(orchestrator, events, tmp_path)
    try:
        (folder / "main.src").write_text("x")
        failed = await run.wait_topic("orch.capsule.ver.build_failed")
        assert failed.payload["exit_code"] == 3 and "compile error here" in failed.payload["output"]
        assert await run.version() == "1"
    finally:
        await orchestrator.stop(2)


async def test_example_config_runs(tmp_path: Path) -> None:
    for name in ("counter", "milestones", "notes"):
        shutil.copytree(CAPSULES / name, tmp_path / "capsules" / name, ignore=shutil.ignore_patterns("assembly"))
    shutil.copy(CAPSULES.parent / "config.yaml", tmp_path / "config.yaml")
    orchestrator = Orchestrator(tmp_path / "config.yaml", watch=False)
    await orchestrator.start()
    try:
        assert orchestrator.reconciler is not None
        result = await orchestrator.reconciler.call_tool("counter", "increment", {"by": 10})
        assert json.loads(result.output) == {"count": 10}
        await orchestrator.reconciler.call_tool("notes", "write", {"name": "a", "text": "b"})
        assert (tmp_path / "notes" / "a").read_text() == "b"
        assert {s["name"]: s["phase"] for s in orchestrator.reconciler.status()} == {
            "counter": "Running",
            "milestones": "Running",
            "notes": "Running",
        }
    finally:
        await orchestrator.stop(2)


def test_publish_rate_from_the_config_reaches_the_capsule(tmp_path: Path) -> None:
    from orchestrator.capsule.launcher import publish_limiter
    from orchestrator.desired import load_desired

    write_capsule(tmp_path / "caps" / "ver", 1)
    (tmp_path / "config.yaml").write_text(
        CONFIG.replace("state_dir: state\n", "state_dir: state\ndefaults:\n  publish_rate: {bytes_per_second: 1000}\n")
        + "    publish_rate: {messages_per_second: 5}\n"
    )
    spec = load_desired(tmp_path / "config.yaml").specs["ver"]
    assert spec.publish_rate == {"messages_per_second": 5, "bytes_per_second": 1000}
    limiter = publish_limiter(spec)
    assert (limiter.messages_per_second, limiter.bytes_per_second) == (5, 1000)
    plain = load_desired(tmp_path / "config.yaml").specs["ver"]
    assert plain.spec_hash == spec.spec_hash
