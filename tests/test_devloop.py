"""The dev loop: the SDK's two build profiles, the build's output, and a real `orch up` that
rebuilds and swaps a capsule in when its source is saved.

- The dev profile (each example's `[build] command`) builds modules that behave exactly as
  the committed release builds: the same calls give the same outputs, errors and events.
  It is really a different build (unoptimised, with function names, which a trap shows).
- A compile error prints the compiler's own messages and no Node stack trace; a build says
  how long it took; bad arguments and missing tools get one clear line.
- End to end: `orch up` on a copy of the example deployment; saving the counter's source
  puts the edited version in service; saving a broken one reports the compiler's message
  and the edited version keeps serving.

Speed is measured by bench/devloop.py, not here.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api.client import Client, socket_for
from orchestrator.capsule import Capsule
from orchestrator.capsule.bus import EventBus
from orchestrator.capsule.store import KVStore
from orchestrator.desired.manifest import load_manifest
from orchestrator.engine import WasmEngine
from orchestrator.errors import OrchestratorError
from tests.conftest import CAPSULES, REPO
from tests.test_capsules_build import npm_ready

SDK_PACKAGE = "orch-capsule-sdk"
BUILD_SECONDS = 300  # a backstop for builds on a busy 2-core machine (they take ~1 s idle)
NODE_STACK = re.compile(r"^\s+at .*(node:|\.m?js:\d+)", re.MULTILINE)


# -- helpers shared with test_scaffold ------------------------------------------------------


def link_tools(folder: Path) -> None:
    """`folder/node_modules`: the repository's installed build tools, linked one package at
    a time, and the SDK package pointing at `folder/sdk` (as `npm install` makes it)."""
    npm_ready()
    modules = folder / "node_modules"
    modules.mkdir()
    for entry in (CAPSULES / "node_modules").iterdir():
        if entry.name not in {SDK_PACKAGE, ".bin", ".package-lock.json"}:
            (modules / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    (modules / SDK_PACKAGE).symlink_to(Path("..") / "sdk", target_is_directory=True)


def run(command: list[str] | str, cwd: Path, timeout: float = BUILD_SECONDS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, shell=isinstance(command, str)
    )


class Up:
    """`orch up CONFIG` (text output) in its own process. `watching` is set when it prints
    its `watching for changes` line: its file watches are in place by then."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "up", str(config)],
            cwd=config.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.watching = threading.Event()
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if "watching for changes" in line:
                self.watching.set()

    async def wait_watching(self) -> None:
        ready = await asyncio.to_thread(self.watching.wait, 60)
        assert ready, "orch up is not watching:\n" + "\n".join(self.lines[-30:])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise
        finally:
            self._reader.join(10)
            assert self.process.stdout is not None
            self.process.stdout.close()


async def live_events(client: Client, topic: str) -> AsyncIterator[dict[str, Any]]:
    """The events on `topic` from the moment this returns (the stream is live)."""
    events = client.events(topic)
    async for item in events:
        if "live" in item:
            break
    return events


async def next_event(events: AsyncIterator[dict[str, Any]], *suffixes: str) -> dict[str, Any]:
    """The next event whose topic ends with one of `suffixes`."""
    async with asyncio.timeout(BUILD_SECONDS):
        async for item in events:
            if item.get("topic", "").endswith(suffixes):
                return item
    raise AssertionError("the event stream ended")


def tools_deployment(root: Path) -> Path:
    """The example deployment with its sources and build tools, copied under `root`."""
    capsules = root / "capsules"
    capsules.mkdir(parents=True)
    for name in ("counter", "milestones", "notes"):
        shutil.copytree(CAPSULES / name, capsules / name)
    shutil.copytree(CAPSULES / "sdk", capsules / "sdk")
    for name in ("build.mjs", "package.json"):
        shutil.copy(CAPSULES / name, capsules / name)
    link_tools(capsules)
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    return root / "config.yaml"


# -- the profiles ---------------------------------------------------------------------------


def test_examples_build_with_the_dev_profile_in_the_dev_loop_and_release_otherwise() -> None:
    for name in ("counter", "milestones", "notes"):
        build = load_manifest(CAPSULES / name).build
        assert build is not None
        assert build.command == f"node ../build.mjs --dev {name}"
    scripts = json.loads((CAPSULES / "package.json").read_text())["scripts"]
    assert scripts["build"] == "node build.mjs --release"


@pytest.fixture(scope="module")
def dev_builds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """counter, notes and conformance built with the dev profile."""
    npm_ready()
    out = tmp_path_factory.mktemp("dev")
    built = run(["node", "build.mjs", "--dev", "--out", str(out), "counter", "notes", "conformance"], CAPSULES)
    assert built.returncode == 0, built.stderr
    assert "3 of 3 built (dev, " in built.stdout
    return out


async def run_script(folder: Path, state: Path, script: list[tuple[str, object]]) -> list[object]:
    """Runs `script` (tool, arguments) on the capsule in `folder`: outcomes, then bus events."""
    workspace = state / "workspace"
    workspace.mkdir(parents=True)
    store = await KVStore.open(state / "kv.sqlite3")
    bus = EventBus()
    events = bus.subscribe(">")
    results: list[object] = []
    try:
        with WasmEngine() as engine:
            capsule = await Capsule.load(folder, engine=engine, bus=bus, store=store, workspace=workspace)
            try:
                for tool, arguments in script:
                    try:
                        results.append(("ok", (await capsule.call_tool(tool, arguments)).output))
                    except OrchestratorError as error:
                        results.append((type(error).__name__, str(error)))
            finally:
                await capsule.close()
    finally:
        await store.close()
        bus.close()
    return results + [(e.topic, e.payload) for e in events.drain() if not e.topic.startswith("orch.")]


SCRIPTS: dict[str, list[tuple[str, object]]] = {
    "counter": [
        ("increment", {}),
        ("increment", {"by": 5}),
        ("get", {}),
        ("increment", {"by": 9_223_372_036_854_775_807}),  # overflows: the guest throws
        ("reset", {}),
        ("get", {}),
    ],
    "notes": [
        ("write", {"name": "a", "text": "héllo ✓"}),
        ("read", {"name": "a"}),
        ("list", {}),
        ("read", {"name": "missing"}),  # a host error: the SDK throws it
        ("write", {"name": "../escape", "text": "x"}),
        ("peek", {"path": "/etc/passwd"}),  # denied: the host traps the call
    ],
}


@pytest.mark.timeout(BUILD_SECONDS + 60)
@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_a_dev_build_behaves_as_the_release_build(dev_builds: Path, tmp_path: Path, name: str) -> None:
    release = tmp_path / "release" / name
    dev = tmp_path / "dev" / name
    shutil.copytree(CAPSULES / name, release, ignore=shutil.ignore_patterns("assembly"))
    shutil.copytree(CAPSULES / name, dev, ignore=shutil.ignore_patterns("assembly"))
    shutil.copy(dev_builds / f"{name}.wasm", dev / f"{name}.wasm")
    assert (dev / f"{name}.wasm").read_bytes() != (release / f"{name}.wasm").read_bytes()
    want = await run_script(release, tmp_path / "release-state", SCRIPTS[name])
    got = await run_script(dev, tmp_path / "dev-state", SCRIPTS[name])
    assert got == want
    assert sum(1 for r in want if r[0] == "ok") >= 3 and any(r[0] != "ok" for r in want)  # the script exercises both


@pytest.mark.timeout(BUILD_SECONDS + 60)
def test_a_dev_build_of_a_plain_plugin_behaves_as_the_release_build(dev_builds: Path) -> None:
    calls = [("echo", b"hello"), ("reverse", "añb✓".encode()), ("config", b"greeting"), ("config", b"other")]
    calls += [("bump", b""), ("bump", b""), ("get_var", b"n"), ("fail", b"why"), ("exit_code", b"7")]
    calls += [("throws", b""), ("input_size", b"x" * 5000)]
    with WasmEngine() as engine:
        outcomes = []
        for path in (dev_builds / "conformance.wasm", CAPSULES / "conformance" / "conformance.wasm"):
            plugin = engine.load(path, name="conformance", config={"greeting": "hi"})
            seen = []
            for function, data in calls:
                try:
                    seen.append(("ok", plugin.call(function, data)))
                except OrchestratorError as error:
                    seen.append((type(error).__name__, str(error)))
            plugin.close()
            outcomes.append(seen)
    assert outcomes[0] == outcomes[1]
    assert ("ok", b"hello") in outcomes[0]


@pytest.mark.timeout(BUILD_SECONDS + 60)
def test_a_trap_in_a_dev_build_names_its_function(dev_builds: Path) -> None:
    with WasmEngine() as engine:
        messages = []
        for path in (dev_builds / "conformance.wasm", CAPSULES / "conformance" / "conformance.wasm"):
            plugin = engine.load(path, name="conformance")
            with pytest.raises(OrchestratorError) as trapped:
                plugin.call("trap", b"")
            messages.append(str(trapped.value))
            plugin.close()
    dev, release = messages
    assert "unreachable" in dev and dev.endswith("/trap"), dev
    assert "/trap" not in release, release  # the release build has no names section


# -- the build's output ---------------------------------------------------------------------


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """A copy of capsules/ (build script, SDK, the counter's source) with the tools linked."""
    capsules = tmp_path / "capsules"
    capsules.mkdir()
    shutil.copytree(CAPSULES / "counter", capsules / "counter")
    shutil.copytree(CAPSULES / "sdk", capsules / "sdk")
    shutil.copy(CAPSULES / "build.mjs", capsules / "build.mjs")
    link_tools(capsules)
    return capsules


@pytest.mark.timeout(BUILD_SECONDS + 60)
def test_a_build_says_what_it_built_and_how_long_it_took(tools: Path) -> None:
    (tools / "counter" / "counter.wasm").unlink()
    built = run(["node", "build.mjs", "--dev", "counter"], tools)
    assert built.returncode == 0, built.stderr
    assert re.fullmatch(r"built .*counter\.wasm \(dev, \d+\.\d\d s\)\n", built.stdout), built.stdout
    assert (tools / "counter" / "counter.wasm").read_bytes()[:4] == b"\0asm"
    assert [p.name for p in (tools / "counter").iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.timeout(BUILD_SECONDS + 60)
@pytest.mark.parametrize("profile", ["--dev", "--release"])
def test_a_compile_error_shows_the_compilers_message_not_a_node_stack_trace(tools: Path, profile: str) -> None:
    source = tools / "counter" / "assembly" / "index.ts"
    source.write_text(source.read_text().replace('const KEY = "count";', 'const KEY: i32 = "count";'))
    before = (tools / "counter" / "counter.wasm").read_bytes()
    built = run(["node", "build.mjs", profile, "counter"], tools)
    assert built.returncode == 1
    assert "ERROR TS2322: Type '~lib/string/String' is not assignable to type 'i32'." in built.stderr
    assert "in counter/assembly/index.ts(" in built.stderr  # where
    assert "const KEY: i32 = " in built.stderr  # the code frame
    assert re.search(rf"^build failed: counter \({profile[2:]}, \d+\.\d\d s\)$", built.stderr, re.MULTILINE)
    assert not NODE_STACK.search(built.stderr), built.stderr
    assert len(built.stderr.splitlines()) < 40
    assert (tools / "counter" / "counter.wasm").read_bytes() == before  # the last good build stays


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--bogus"], 'unexpected argument "--bogus"'),
        (["--jobs", "0"], 'unexpected argument "--jobs"'),
        (["--out"], 'unexpected argument "--out"'),
        (["nope"], "no example capsule named nope (there are: counter)"),
    ],
)
def test_the_examples_build_refuses_bad_arguments_in_one_line(tools: Path, arguments: list[str], message: str) -> None:
    built = run(["node", "build.mjs", *arguments], tools)
    assert built.returncode == 2
    assert built.stderr.splitlines()[0] == message
    assert not NODE_STACK.search(built.stderr)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--fast"], 'unexpected argument "--fast"'),
        (["a.ts", "b.ts"], 'unexpected argument "b.ts"'),
    ],
)
def test_the_sdk_build_refuses_bad_arguments_in_one_line(tools: Path, arguments: list[str], message: str) -> None:
    built = run(["node", "sdk/build.mjs", *arguments], tools)
    assert built.returncode == 2
    assert built.stderr.splitlines() == [message, "usage: node build.mjs [--dev | --release] [--out FILE] [ENTRY]"]


def test_the_sdk_build_needs_to_know_the_output(tools: Path) -> None:
    built = run(["node", "sdk/build.mjs", "--dev", "counter/assembly/index.ts"], tools)  # capsules/ has no Capsule.toml
    assert built.returncode == 2
    assert built.stderr.startswith("no --out FILE, and no [[component]] file in ")


def test_the_sdk_build_reads_the_output_from_the_manifest(tools: Path) -> None:
    folder = tools / "counter"
    (folder / "counter.wasm").unlink()
    built = run(["node", "../sdk/build.mjs", "--dev"], folder)  # entry: assembly/index.ts
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("built counter.wasm (dev, ")
    assert (folder / "counter.wasm").is_file()


def test_without_the_tools_installed_the_build_says_to_install_them(tmp_path: Path) -> None:
    shutil.copytree(CAPSULES / "counter", tmp_path / "counter", ignore=shutil.ignore_patterns("*.wasm"))
    shutil.copytree(CAPSULES / "sdk", tmp_path / "counter" / "sdk")
    built = run(["node", "sdk/build.mjs", "--dev"], tmp_path / "counter")
    assert built.returncode == 1
    assert built.stderr.startswith("the build tools are not installed in ")
    assert "run `npm install` there" in built.stderr
    assert len(built.stderr.splitlines()) == 2 and not NODE_STACK.search(built.stderr)  # + "build failed: ..."
    assert not (tmp_path / "counter" / "counter.wasm").exists()


# -- the loop, end to end -------------------------------------------------------------------


@pytest.mark.timeout(2 * BUILD_SECONDS)
async def test_saving_a_source_puts_the_new_version_in_service_and_a_broken_save_changes_nothing(
    tmp_path: Path,
) -> None:
    config = tools_deployment(tmp_path)
    source = config.parent / "capsules" / "counter" / "assembly" / "index.ts"
    original = source.read_text()
    up = Up(config)
    try:
        await up.wait_watching()
        async with Client(socket_for(config)) as client:
            events = await live_events(client, "orch.capsule.counter.>")
            output, _ = await client.call("counter", "get", b"{}")
            assert json.loads(output) == {"count": 0}

            edited = original.replace('.putInt("count", count)', '.putInt("count", count).putBool("edited", true)')
            assert edited != original
            source.write_text(edited)
            reloaded = await next_event(events, ".reloaded", ".build_failed")
            assert reloaded["topic"] == "orch.capsule.counter.reloaded", reloaded
            output, _ = await client.call("counter", "get", b"{}")
            assert json.loads(output) == {"count": 0, "edited": True}

            source.write_text(edited.replace('const KEY = "count";', 'const KEY: i32 = "count";'))
            failed = await next_event(events, ".build_failed", ".reloaded")
            assert failed["topic"] == "orch.capsule.counter.build_failed", failed
            text = failed["payload"]["output"]
            assert "ERROR TS2322" in text and "in counter/assembly/index.ts(" in text
            assert "build failed: counter (dev, " in text
            assert not NODE_STACK.search(text), text
            output, _ = await client.call("counter", "increment", b"{}")
            assert json.loads(output) == {"count": 1, "edited": True}  # the edited version still serves
    finally:
        up.stop()
