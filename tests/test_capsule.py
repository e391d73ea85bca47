"""Capsules end to end: the example capsules on the real engine, KV store, bus and files;
tool input validation, exports, the astrid_tool_call fallback, interceptors in priority
order, parallel instances, and acknowledged KV writes surviving SIGKILL."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.capsule import Capsule
from orchestrator.capsule.bus import EventBus
from orchestrator.capsule.store import KVStore
from orchestrator.engine import WasmEngine
from orchestrator.errors import (
    CapabilityDenied,
    CapsuleTrap,
    ManifestError,
    ToolInputError,
    UnknownTool,
)
from tests.conftest import CAPSULES, REPO


@dataclass
class Host:
    engine: WasmEngine
    bus: EventBus
    store: KVStore
    workspace: Path

    async def load(self, example: str, **options: object) -> Capsule:
        folder = options.pop("folder", CAPSULES / example)
        return await Capsule.load(
            folder,  # type: ignore[arg-type]
            engine=self.engine,
            bus=self.bus,
            store=self.store,
            workspace=self.workspace,
            **options,  # type: ignore[arg-type]
        )


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    store = await KVStore.open(tmp_path / "state" / "kv.sqlite3")
    bus = EventBus()
    with WasmEngine() as engine:
        yield Host(engine, bus, store, workspace)
    await store.close()
    bus.close()


async def call(capsule: Capsule, tool: str, arguments: object = None) -> object:
    return json.loads((await capsule.call_tool(tool, arguments)).output)


async def test_counter_counts_persists_and_publishes(host: Host) -> None:
    events = host.bus.subscribe("counter.>")
    counter = await host.load("counter")
    assert await call(counter, "increment") == {"count": 1}
    assert await call(counter, "increment", {"by": 5}) == {"count": 6}
    assert await call(counter, "get") == {"count": 6}
    published = events.drain()
    assert [(e.topic, e.payload, e.source) for e in published] == [
        ("counter.changed", {"count": 1}, "counter"),
        ("counter.changed", {"count": 6}, "counter"),
    ]
    await counter.close()
    again = await host.load("counter")  # the KV outlives the capsule
    assert await call(again, "get") == {"count": 6}
    await again.close()


async def test_config_reaches_the_guest(host: Host) -> None:
    counter = await host.load("counter", config={"step": 10})
    assert await call(counter, "increment") == {"count": 10}
    await counter.close()


async def test_kv_is_scoped_by_deployment_name(host: Host) -> None:
    first = await host.load("counter", name="first")
    second = await host.load("counter", name="second")
    await call(first, "increment", {"by": 3})
    assert await call(second, "get") == {"count": 0}
    assert await host.store.list_keys("first") != []
    assert await host.store.list_keys("second") == []
    await first.close()
    await second.close()


async def test_bad_input_never_reaches_the_guest(host: Host) -> None:
    counter = await host.load("counter")
    with pytest.raises(ToolInputError) as caught:
        await counter.call_tool("increment", {"by": "lots"})
    assert caught.value.field == "/by" and "'lots' is not of type 'integer'" in str(caught.value)
    with pytest.raises(ToolInputError, match="not of type 'object'"):
        await counter.call_tool("increment", [1, 2])
    with pytest.raises(UnknownTool, match="increment, get, reset"):
        await counter.call_tool("decrement", {})
    assert counter.calls == 0
    await counter.close()


async def test_notes_write_list_read_inside_their_folder(host: Host) -> None:
    notes = await host.load("notes")
    assert await call(notes, "write", {"name": "todo", "text": "buy milk ✓"}) == {"written": "todo", "bytes": 12}
    assert (host.workspace / "notes" / "todo").read_text() == "buy milk ✓"
    assert await call(notes, "list") == {"notes": ["todo"]}
    assert await call(notes, "read", {"name": "todo"}) == {"name": "todo", "text": "buy milk ✓"}
    await notes.close()


@pytest.mark.parametrize("path", ["secret.txt", "cwd://secret.txt", "../outside", "/etc/passwd", "notes/../secret.txt"])
async def test_notes_cannot_read_elsewhere(host: Host, path: str) -> None:
    (host.workspace / "secret.txt").write_text("top secret")
    audit = host.bus.subscribe("orch.audit.denied")
    notes = await host.load("notes")
    with pytest.raises(CapabilityDenied) as caught:
        await notes.call_tool("peek", {"path": path})
    assert str(caught.value).startswith("capability denied: fs_read")
    denied = audit.drain()
    assert len(denied) == 1 and denied[0].payload["capsule"] == "notes"
    assert await call(notes, "list") == {"notes": []}  # still works
    await notes.close()


async def test_note_names_are_checked_by_the_guest(host: Host) -> None:
    notes = await host.load("notes")
    with pytest.raises(CapsuleTrap, match="name"):
        await notes.call_tool("write", {"name": "../escape", "text": "x"})
    assert not (host.workspace.parent / "escape").exists()
    await notes.close()


async def test_interceptors_run_in_priority_order(host: Host) -> None:
    reached = host.bus.subscribe("milestones.>")
    milestones = await host.load("milestones")
    counter = await host.load("counter")
    await call(counter, "increment", {"by": 4})
    await call(counter, "increment", {"by": 6})
    await milestones.caught_up(host.bus.last_seq)
    status = await call(milestones, "status")
    assert status == {"last": 10, "seen": 2}
    order = await host.store.get("milestones", "order")
    assert order is not None and order.decode().startswith("first,second")
    assert [(e.topic, e.payload, e.source) for e in reached.drain()] == [
        ("milestones.reached", {"count": 10}, "milestones")
    ]
    await counter.close()
    await milestones.close()


async def test_tool_without_export_fails_the_load(host: Host, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(CAPSULES / "counter", folder, ignore=shutil.ignore_patterns("assembly"))
    manifest = folder / "Capsule.toml"
    manifest.write_text(manifest.read_text() + '\n[[tool]]\nname = "explode"\ndescription = "no export"\n')
    with pytest.raises(ManifestError, match="tool 'explode' has no export"):
        await host.load("counter", folder=folder)


async def test_hash_pin_is_enforced(host: Host, tmp_path: Path) -> None:
    folder = tmp_path / "pinned"
    shutil.copytree(CAPSULES / "counter", folder, ignore=shutil.ignore_patterns("assembly"))
    manifest = folder / "Capsule.toml"
    text = manifest.read_text()
    manifest.write_text(
        text.replace('file = "counter.wasm"', 'file = "counter.wasm"\nhash = "sha256:' + "0" * 64 + '"')
    )
    with pytest.raises(ManifestError, match="but the manifest pins sha256:0000"):
        await host.load("counter", folder=folder)


FALLBACK = """
(module
  (import "extism:host/env" "input_offset" (func $input (result i64)))
  (import "extism:host/env" "input_length" (func $length (result i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (func (export "astrid_tool_call") (result i32)
    (call $output_set (call $input) (call $length)) (i32.const 0)))
"""


async def test_tools_without_export_go_to_astrid_tool_call(host: Host, tmp_path: Path) -> None:
    folder = tmp_path / "router"
    folder.mkdir()
    (folder / "router.wat").write_text(FALLBACK)
    (folder / "Capsule.toml").write_text(
        '[package]\nname = "router"\nversion = "1.0.0"\n[[component]]\nfile = "router.wat"\n'
        '[[tool]]\nname = "anything"\ninput_schema = { type = "object" }\n'
    )
    router = await host.load("router", folder=folder)
    assert await call(router, "anything", {"x": [1, "é"]}) == {"name": "anything", "arguments": {"x": [1, "é"]}}
    await router.close()


SPIN = """
(module
  (import "extism:host/env" "input_length" (func $length (result i64)))
  (func (export "spin") (result i32) (local $i i64)
    (loop $l (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if $l (i64.lt_u (local.get $i) (i64.const 150000000))))
    (i32.const 0)))
"""


async def test_instances_serve_calls_in_parallel(host: Host, tmp_path: Path) -> None:
    folder = tmp_path / "spinner"
    folder.mkdir()
    (folder / "spinner.wat").write_text(SPIN)
    (folder / "Capsule.toml").write_text(
        '[package]\nname = "spinner"\nversion = "1.0.0"\n[[component]]\nfile = "spinner.wat"\n'
        '[[tool]]\nname = "spin"\n[limits]\nfuel = 10_000_000_000\n'
    )
    spinner = await host.load("spinner", folder=folder, instances=2)
    await asyncio.gather(spinner.call_tool("spin", {}), spinner.call_tool("spin", {}))
    assert spinner.plugin._created == 2  # the second call found the first instance busy
    await spinner.close()


def test_summary_masks_secrets(tmp_path: Path) -> None:
    async def main() -> dict[str, object]:
        folder = tmp_path / "secretive"
        shutil.copytree(CAPSULES / "counter", folder, ignore=shutil.ignore_patterns("assembly"))
        manifest = folder / "Capsule.toml"
        manifest.write_text(
            manifest.read_text().replace("[capabilities]", '[env.token]\ntype = "secret"\n\n[capabilities]')
        )
        store = await KVStore.open(tmp_path / "kv.db")
        with WasmEngine() as engine:
            capsule = await Capsule.load(
                folder, engine=engine, bus=EventBus(), store=store, workspace=tmp_path, config={"token": "hunter2"}
            )
            summary = capsule.summary()
            await capsule.close()
        await store.close()
        return summary

    summary = asyncio.run(main())
    assert summary["config"] == {"step": "1", "token": "***"}
    assert "hunter2" not in json.dumps(summary)


INCREMENTER = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from orchestrator.capsule.bus import EventBus
    from orchestrator.capsule import Capsule
    from orchestrator.engine import WasmEngine
    from orchestrator.capsule.store import KVStore

    async def main():
        store = await KVStore.open(Path({db!r}))
        capsule = await Capsule.load(Path({folder!r}), engine=WasmEngine(), bus=EventBus(), store=store,
                                     workspace=Path({workspace!r}))
        while True:
            result = await capsule.call_tool("increment", {{}})
            print(json.loads(result.output)["count"], flush=True)  # the reply: acknowledged

    asyncio.run(main())
    """
)


def test_acknowledged_tool_writes_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "kv.sqlite3"
    script = INCREMENTER.format(repo=str(REPO), db=str(db), folder=str(CAPSULES / "counter"), workspace=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    acknowledged = 0
    for line in process.stdout:
        acknowledged = int(line)
        if acknowledged >= 200:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    process.stdout.close()
    assert acknowledged >= 200

    async def count() -> int:
        store = await KVStore.open(db)
        try:
            value = await store.get("counter", "count")
        finally:
            await store.close()
        assert value is not None
        return int(value)

    assert asyncio.run(count()) >= acknowledged


async def test_an_unencodable_event_does_not_stop_interceptors(host: Host) -> None:
    milestones = await host.load("milestones")
    counter = await host.load("counter")
    host.bus.publish("counter.changed", "\ud800")  # no guest could read this
    await call(counter, "increment", {"by": 3})
    await milestones.caught_up(host.bus.last_seq)
    assert await call(milestones, "status") == {"last": 3, "seen": 1}
    await counter.close()
    await milestones.close()


async def test_a_failed_call_leaves_no_writes_behind(host: Host) -> None:
    from orchestrator.capsule.gate import RateLimiter

    clock = [0.0]
    rate = RateLimiter(messages_per_second=1, burst_seconds=1, clock=lambda: clock[0])
    counter = await host.load("counter", rate=rate)
    assert await call(counter, "increment") == {"count": 1}
    with pytest.raises(CapsuleTrap, match="publish rate limit exceeded"):
        await counter.call_tool("increment", {})  # wrote count=2, then its publish was refused
    assert await host.store.get("counter", "count") == b"1"
    clock[0] += 1.0
    assert await call(counter, "increment") == {"count": 2}  # a retry does not count twice
    await counter.close()
