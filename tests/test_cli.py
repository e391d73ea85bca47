"""`orch wasm call` and `orch demo` as a user runs them: real subprocesses, real files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, capsule_wasm

GREET = str(capsule_wasm("greet"))
CONFORMANCE = str(capsule_wasm("conformance"))


def orch(*args: str, stdin: bytes | None = None, timeout_stop: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run `orch`. With `timeout_stop`, send SIGINT once the orchestrator reports it is up."""
    if not timeout_stop:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            input=stdin,
            capture_output=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if b"orch.reconcile.finished" in line:
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, b"".join(lines) + out, err)


def test_call_prints_output_bytes() -> None:
    result = orch("wasm", "call", GREET, "greet", "--input", "Ada")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Hello, Ada!"


def test_call_reads_stdin_and_config() -> None:
    result = orch("wasm", "call", GREET, "greet", "--input", "-", "--config", "greeting=Hej", stdin=b"Bo")
    assert (result.returncode, result.stdout) == (0, b"Hej, Bo!")


def test_binary_output_is_exact() -> None:
    payload = bytes(range(256)) * 4
    result = orch("wasm", "call", CONFORMANCE, "echo", "--input", "-", stdin=payload)
    assert result.returncode == 0 and result.stdout == payload


def test_stats_go_to_stderr_as_json() -> None:
    result = orch("wasm", "call", GREET, "greet", "--input", "Ada", "--stats")
    assert result.stdout == b"Hello, Ada!"
    stats = json.loads(result.stderr.decode().strip().splitlines()[-1])
    assert set(stats) == {"fuel_used", "seconds"}
    assert stats["fuel_used"] > 0 and stats["seconds"] >= 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((CONFORMANCE, "fail", "--input", "boom"), "failed: boom"),
        ((CONFORMANCE, "exit_code", "--input", "3"), "exit code 3"),
        ((CONFORMANCE, "trap"), "unreachable"),
        ((CONFORMANCE, "nope"), "has no function 'nope'"),
        ((CONFORMANCE, "big_output", "--input", "100000", "--fuel", "1000"), "ran out of fuel"),
    ],
)
def test_failed_call_is_one_line_on_stderr_and_exit_1(args: tuple[str, ...], needle: str) -> None:
    result = orch("wasm", "call", *args)
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert needle in lines[0]


def test_input_over_the_memory_cap_is_named() -> None:
    result = orch("wasm", "call", CONFORMANCE, "echo", "--input", "-", "--memory-mib", "2", stdin=b"x" * (3 << 20))
    assert result.returncode == 1
    assert b"memory limit of 2 MiB" in result.stderr


def test_stats_are_printed_for_failed_calls_too() -> None:
    result = orch("wasm", "call", CONFORMANCE, "trap", "--stats")
    assert result.returncode == 1
    assert '"fuel_used"' in result.stderr.decode()


@pytest.mark.parametrize(
    "args",
    [
        ("wasm", "call"),
        ("wasm", "call", GREET),
        ("wasm", "call", GREET, "greet", "--fuel", "0"),
        ("wasm", "call", GREET, "greet", "--fuel", "lots"),
        ("wasm", "call", GREET, "greet", "--config", "no-equals-sign"),
        ("wasm", "call", GREET, "greet", "--memory-mib", "99999"),
        ("wasm", "call", GREET, "greet", "--bogus"),
        (),
    ],
)
def test_bad_usage_exits_2(args: tuple[str, ...]) -> None:
    assert orch(*args).returncode == 2


def test_unreadable_or_invalid_module_exits_2(tmp_path: Path) -> None:
    missing = orch("wasm", "call", str(tmp_path / "missing.wasm"), "f")
    assert missing.returncode == 2 and b"cannot read" in missing.stderr
    garbage = tmp_path / "garbage.wasm"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n not wasm")
    invalid = orch("wasm", "call", str(garbage), "f")
    assert invalid.returncode == 2 and b"not a WebAssembly module" in invalid.stderr
    lacking = tmp_path / "lacking.wat"
    lacking.write_text('(module (import "env" "abort" (func)) (func (export "f") (result i32) (i32.const 0)))')
    unknown = orch("wasm", "call", str(lacking), "f")
    assert unknown.returncode == 2 and b"env::abort" in unknown.stderr


def test_wasi_flag_provides_wasi(tmp_path: Path) -> None:
    module = tmp_path / "wasi.wat"
    module.write_text(
        """(module
          (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "f") (result i32) (i32.const 0)))"""
    )
    assert orch("wasm", "call", str(module), "f").returncode == 2
    assert orch("wasm", "call", str(module), "f", "--wasi").returncode == 0


def test_cache_dir_is_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert orch("wasm", "call", GREET, "greet", "--cache-dir", str(cache)).returncode == 0
    assert len(list(cache.glob("*.cwasm"))) == 2


# -- orch capsule check / call ---------------------------------------------------------------
COUNTER = str(REPO / "capsules" / "counter")
NOTES = str(REPO / "capsules" / "notes")


def test_capsule_check_shows_what_it_may_touch() -> None:
    result = orch("capsule", "check", COUNTER)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.startswith("counter 0.1.0")
    assert "kv            yes" in text and "publish       counter.*" in text
    assert "read files    nothing" in text and "tool          increment" in text


def test_capsule_check_lists_every_problem(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "Capsule.toml").write_text(
        '[package]\nname = "Broken"\nversion = "1"\n[[component]]\nfile = "missing.wasm"\n'
        '[capabilities]\nfs_wirte = ["cwd://x"]\n'
    )
    result = orch("capsule", "check", str(folder))
    assert result.returncode == 1
    text = result.stderr.decode()
    assert "3 problems" in text
    assert "Capsule.toml:2: package.name" in text and "Capsule.toml:3: package.version" in text
    assert "did you mean 'fs_write'?" in text


def test_capsule_check_reports_module_problems(tmp_path: Path) -> None:
    folder = tmp_path / "lacking"
    folder.mkdir()
    (folder / "Capsule.toml").write_text(
        '[package]\nname = "lacking"\nversion = "1.0.0"\n[[component]]\nfile = "m.wat"\n[[tool]]\nname = "go"\n'
    )
    (folder / "m.wat").write_text('(module (import "env" "abort" (func)))')
    result = orch("capsule", "check", str(folder))
    assert result.returncode == 1
    assert b"env::abort" in result.stderr


def test_capsule_call_keeps_kv_across_invocations(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    first = orch("capsule", "call", COUNTER, "increment", '{"by": 2}', "--state-dir", state)
    assert (first.returncode, json.loads(first.stdout)) == (0, {"count": 2}), first.stderr
    second = orch("capsule", "call", COUNTER, "increment", "-", "--state-dir", state, stdin=b'{"by": 3}')
    assert json.loads(second.stdout) == {"count": 5}
    third = orch("capsule", "call", COUNTER, "increment", "--state-dir", state, "--config", "step=10")
    assert json.loads(third.stdout) == {"count": 15}


def test_capsule_call_failures_are_one_line(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    workspace = str(tmp_path)
    denied = orch(
        "capsule", "call", NOTES, "peek", '{"path": "/etc/passwd"}', "--state-dir", state, "--workspace", workspace
    )
    assert denied.returncode == 1 and b"capability denied" in denied.stderr
    assert len(denied.stderr.decode().strip().splitlines()) == 1
    bad = orch("capsule", "call", COUNTER, "increment", '{"by": "x"}', "--state-dir", state)
    assert bad.returncode == 1 and b"/by" in bad.stderr
    garbage = orch("capsule", "call", COUNTER, "increment", "{nope", "--state-dir", state)
    assert garbage.returncode == 1 and b"not valid JSON" in garbage.stderr
    unknown = orch("capsule", "call", COUNTER, "explode", "--state-dir", state)
    assert unknown.returncode == 1 and b"no tool 'explode'" in unknown.stderr


def test_capsule_call_writes_files_in_the_workspace(tmp_path: Path) -> None:
    args = ("--state-dir", str(tmp_path / "state"), "--workspace", str(tmp_path))
    written = orch("capsule", "call", NOTES, "write", '{"name": "a", "text": "hello"}', *args)
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "notes" / "a").read_text() == "hello"


# -- orch validate / plan / up ---------------------------------------------------------------
def example_deployment(root: Path) -> Path:
    """The repository's example config and capsules, copied under `root`."""
    import shutil

    for name in ("counter", "milestones", "notes"):
        shutil.copytree(REPO / "capsules" / name, root / "capsules" / name, ignore=shutil.ignore_patterns("assembly"))
    shutil.copy(REPO / "config.yaml", root / "config.yaml")
    return root / "config.yaml"


def test_validate(tmp_path: Path) -> None:
    config = example_deployment(tmp_path)
    good = orch("validate", str(config))
    assert good.returncode == 0 and b"valid (3 capsules, 3 enabled)" in good.stdout
    config.write_text(
        config.read_text().replace("depends_on: [counter]", "depends_on: [countr]").replace("step: 1", "stp: 1")
    )
    bad = orch("validate", str(config))
    assert bad.returncode == 1
    text = bad.stderr.decode()
    assert "did you mean 'counter'?" in text and "'stp'" in text and "config.yaml:" in text


def test_plan_against_the_applied_state(tmp_path: Path) -> None:
    config = example_deployment(tmp_path)
    before = orch("plan", str(config), "--json", "--exit-code")
    assert before.returncode == 2
    actions = json.loads(before.stdout)["actions"]
    assert {(a["capsule"], a["action"]) for a in actions} == {
        ("counter", "start"),
        ("milestones", "start"),
        ("notes", "start"),
    }
    up = orch("up", str(config), "--no-watch", "--log-format", "json", timeout_stop=True)
    assert up.returncode == 0, up.stderr
    assert orch("plan", str(config), "--exit-code").returncode == 0
    config.write_text(config.read_text().replace("step: 1", "step: 5"))
    changed = orch("plan", str(config), "--exit-code")
    assert changed.returncode == 2
    assert b'config.step "1"\xe2\x86\x92"5"' in changed.stdout or 'config.step "1"→"5"'.encode() in changed.stdout
    config.write_text("version: 2\n")
    assert orch("plan", str(config), "--exit-code").returncode == 1


def test_up_prints_events_as_json_lines_and_stops_cleanly(tmp_path: Path) -> None:
    config = example_deployment(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "up", str(config), "--log-format", "json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    seen = []
    for line in process.stdout:
        event = json.loads(line)
        assert set(event) >= {"topic", "payload", "seq", "timestamp_ms"}
        seen.append(event["topic"])
        if event["topic"] == "orch.reconcile.finished":
            break
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(timeout=30)
    process.stdout.close()
    process.stderr.close()
    assert process.returncode == 0, errors
    assert "orch.capsule.counter.running" in seen
    tail = [json.loads(line)["topic"] for line in rest.decode().splitlines()]
    assert "orch.capsule.counter.stopped" in tail


def test_up_with_an_invalid_config_exits_1(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("version: 1\ncapsules:\n  x:\n    path: nowhere\n    instance: 2\n")
    result = orch("up", str(tmp_path / "config.yaml"))
    assert result.returncode == 1 and b"nothing started" in result.stderr
    assert b"did you mean 'instances'" in result.stderr
