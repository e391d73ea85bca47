"""The operator keeps reaching the orchestrator that runs, and `orch plan FILE` answers for FILE.

Findings covered: a `config.yaml` with a typo saved no longer locks the operator out (the
socket is found with a lenient read of `state_dir`, control.statedir.state_dir_of); `orch
plan candidate.yaml` diffs the candidate against what runs (`GET /v1/specs`), or against
applied.json when nothing runs, and says which. Real `orch` processes, real sockets, real
files; the hostile-answer tests put a small fake orchestrator (a real unix socket serving
canned bytes) behind `--socket`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.control.statedir import state_dir_of
from orchestrator.errors import ConfigError
from tests.processes import example_deployment, orch, spawn_up, stop_up, wait_serving

SECRET = "hunter2-do-not-print"


def secret_deployment(root: Path) -> Path:
    """The example deployment with `state_dir: var/orch` (not the default, so a lookup that
    fell back to `.orch` would miss it) and a secret config key on counter."""
    config = example_deployment(root)
    manifest = root / "capsules" / "counter" / "Capsule.toml"
    manifest.write_text(manifest.read_text() + '\n[env.token]\ntype = "secret"\ndescription = "for the tests"\n')
    text = config.read_text().replace("state_dir: .orch", "state_dir: var/orch")
    text = text.replace("config: {step: 1}", 'config: {step: 1, token: "${ORCH_TEST_TOKEN}"}')
    assert "var/orch" in text and "ORCH_TEST_TOKEN" in text
    config.write_text(text)
    return config


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """`orch up` on a secret_deployment: (config, socket)."""
    monkeypatch.setenv("ORCH_TEST_TOKEN", SECRET)
    config = secret_deployment(tmp_path)
    sock = tmp_path / "var" / "orch" / "orch.sock"
    process = spawn_up(config, tmp_path / "up.log")
    try:
        wait_serving(process, sock, tmp_path / "up.log")
        yield config, sock
    finally:
        stop_up(process)


def text(result: object) -> str:
    return result.stdout.decode()  # type: ignore[attr-defined, no-any-return]


# -- 1. a broken config.yaml does not lock the operator out --------------------------------------
BREAKAGES = {
    "an unknown key": lambda t: t.replace("    path: capsules/notes", "    pth: capsules/notes"),
    "a YAML error after state_dir": lambda t: t + "  broken: [unclosed\n",
    "a YAML error before state_dir": lambda t: t.replace("version: 1", "version: 1\nworkspace: [unclosed", 1),
    "a value of the wrong type": lambda t: t.replace("config: {step: 1,", "config: [step, 1,"),
}


def test_verbs_reach_the_running_orchestrator_whatever_the_config_holds(running: tuple[Path, Path]) -> None:
    config, sock = running
    good = config.read_text()
    root = config.parent
    for breakage, edit in BREAKAGES.items():
        config.write_text(edit(good))
        assert orch("validate", cwd=root).returncode == 1, breakage  # it really is broken
        refused = orch("reconcile", cwd=root)  # the orchestrator reads it (it does not watch files here)
        assert refused.returncode == 1, (breakage, refused.stdout, refused.stderr)
        table = orch("status", cwd=root)
        assert table.returncode == 0, (breakage, table.stderr)
        lines = text(table).splitlines()
        assert lines[1].startswith("rejected config.yaml: ") and lines[1].endswith("what runs keeps running"), lines
        assert lines[2].startswith(f"  {config}:"), lines  # the problem itself, under it
        assert [
            line.split()[:2] for line in lines[lines.index(next(x for x in lines if x.startswith("NAME"))) + 1 :]
        ] == [
            ["counter", "Running"],
            ["milestones", "Running"],
            ["notes", "Running"],
        ], breakage
        as_json = orch("status", "--json", "--config", str(config), cwd=root)
        assert json.loads(as_json.stdout)["orchestrator"]["config_path"] == str(config), breakage
        call = orch("call", "counter", "get", cwd=root)
        assert (call.returncode, json.loads(call.stdout)) == (0, {"count": 0}), (breakage, call.stderr)
        events = orch("events", "--history", "3", "--json", cwd=root)
        assert events.returncode == 0 and len(text(events).splitlines()) == 3, (breakage, events.stderr)
        described = orch("describe", "counter", cwd=root)
        assert described.returncode == 0 and "Running" in text(described), (breakage, described.stderr)
        assert orch("kv", "ls", "counter", cwd=root).returncode == 0, breakage
    assert orch("status", "--socket", str(sock), cwd=root).returncode == 0  # the same socket, named
    config.write_text(good)
    assert orch("reconcile", cwd=root).returncode == 0
    assert "rejected" not in text(orch("status", cwd=root))  # fixed: the lines go


def test_a_missing_config_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    for verb in (("status",), ("call", "counter", "get"), ("events",), ("describe", "counter")):
        result = orch(*verb, "--config", str(tmp_path / "nowhere.yaml"), cwd=tmp_path)
        assert result.returncode == 2, verb
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "nowhere.yaml" in lines[0] and "--socket" in lines[0], lines


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("version: 1\nstate_dir: st\n", "st"),
        ("version: 1\nstate_dir: st\ncapsules:\n  a: {pth: x}\n  : : [\n", "st"),  # broken after it
        ("version: 1\n  bad: [\nstate_dir: 'my st' # comment\n", "my st"),  # broken before: the line scan
        ("version: 1\n  bad: [\nstate_dir: my st   # comment\n", "my st"),
        ('{version: 1, state_dir: "flow style"}', "flow style"),
        ("version: 1\ncapsules: {a: {state_dir: nested}}\n", ".orch"),  # not top-level
        ("? [a, b]\n: c\nstate_dir: after-a-complex-key\n", "after-a-complex-key"),
        ("state_dir: ../up\n", "../up"),
        ("- a list\n- not a mapping\n", ".orch"),
        ("state_dir:\n", ".orch"),
        ("state_dir: null\n", ".orch"),
        ("state_dir: [a, b]\n", ".orch"),
        ("a: &x [1]\nstate_dir: *x\n", ".orch"),
        ("state_dir: !!python/object:os.system x\n", "x"),  # a tag constructs nothing: only the text counts
        ("", ".orch"),
        ("\ufeffstate_dir: bom\n", "bom"),
        ("[" * 200_000, ".orch"),  # nesting far past any recursion limit
        (
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" * 3
            + "state_dir: laughs\n",
            "laughs",
        ),
    ],
)
def test_state_dir_is_read_leniently(tmp_path: Path, content: str, expected: str) -> None:
    config = tmp_path / "deploy" / "config.yaml"
    config.parent.mkdir()
    config.write_text(content)
    assert state_dir_of(config) == Path(os.path.normpath(config.parent / expected))
    assert state_dir_of(config.parent) == state_dir_of(config)  # a folder means its config.yaml


def test_state_dir_is_relative_to_the_config_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "config.yaml").write_text("state_dir: st\n")
    monkeypatch.chdir(tmp_path)
    assert state_dir_of(Path("deploy/config.yaml")) == tmp_path / "deploy" / "st"


def test_state_dir_lookup_refuses_what_is_not_a_readable_config(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opened without blocking: never waits for a writer
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"state_dir: x\n" + b"#" * (5 << 20))
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 10)
    for path, needle in (
        (tmp_path / "missing.yaml", "no such config file"),
        (fifo, "FIFO"),
        (huge, "limit"),
        (zero, "device"),
    ):
        with pytest.raises(ConfigError) as caught:
            state_dir_of(path)
        assert needle in str(caught.value) and str(path) in str(caught.value)
    assert state_dir_of(binary) == tmp_path / ".orch"  # not YAML, no state_dir line: the default


# -- 2. `orch plan FILE` answers for FILE ------------------------------------------------------------
def candidate_of(config: Path) -> Path:
    """Adds capsule counter2, changes counter's step, disables notes."""
    text = config.read_text().replace("{step: 1,", "{step: 5,")
    text = text.replace("    path: capsules/notes", "    path: capsules/notes\n    enabled: false")
    candidate = config.with_name("candidate.yaml")
    candidate.write_text(text + "  counter2:\n    path: capsules/counter\n    config: {token: x}\n")
    return candidate


EXPECTED = {
    ("counter", "reload"),
    ("counter2", "start"),
    ("notes", "stop"),
    ("milestones", "keep"),
}


def test_plan_diffs_a_candidate_against_the_running_orchestrator(running: tuple[Path, Path]) -> None:
    config, sock = running
    root = config.parent
    candidate = candidate_of(config)
    assert orch("plan", "--exit-code", cwd=root).returncode == 0  # config.yaml is what runs
    result = orch("plan", str(candidate), "--json", "--exit-code", cwd=root)
    assert result.returncode == 2, result.stderr
    answer = json.loads(result.stdout)
    assert answer["config"] == str(candidate)
    assert answer["against"] == {"source": "orchestrator", "path": str(sock)}
    assert {(a["capsule"], a["action"]) for a in answer["actions"]} == EXPECTED
    counter = next(a for a in answer["actions"] if a["capsule"] == "counter")
    assert counter["reasons"] == ['config.step "1"→"5"']
    shown = orch("plan", str(candidate), cwd=root)
    lines = text(shown).splitlines()
    assert shown.returncode == 0
    assert lines[0] == f"plan for {candidate}, against the orchestrator running on {sock}:"
    assert any(line.startswith("+ counter2") for line in lines) and any(line.startswith("- notes") for line in lines)
    # the orchestrator itself is untouched: it still plans no change for its own config
    assert orch("plan", "--exit-code", "--socket", str(sock), cwd=root).returncode == 0


def test_plan_shows_a_secret_change_without_the_secret(
    running: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, _ = running
    monkeypatch.setenv("ORCH_TEST_TOKEN", "another-secret-value")
    result = orch("plan", str(config), "--exit-code", cwd=config.parent)
    assert result.returncode == 2, result.stderr
    out = text(result)
    assert "config.token" in out and "***" in out
    assert "another-secret-value" not in out and SECRET not in out


def test_plan_without_an_orchestrator_uses_the_applied_state_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_TEST_TOKEN", SECRET)
    config = secret_deployment(tmp_path)
    candidate = candidate_of(config)
    applied = tmp_path / "var" / "orch" / "applied.json"
    fresh = json.loads(orch("plan", str(candidate), "--json", cwd=tmp_path).stdout)
    assert fresh["against"] == {"source": "nothing", "path": str(applied)}
    assert {a["action"] for a in fresh["actions"]} == {"start"}
    assert [a["capsule"] for a in fresh["actions"] if a["capsule"] == "notes"] == []  # disabled: nothing to start
    process = spawn_up(config, tmp_path / "up.log")
    try:
        wait_serving(process, tmp_path / "var" / "orch" / "orch.sock", tmp_path / "up.log")
    finally:
        stop_up(process)
    result = orch("plan", str(candidate), "--json", "--exit-code", cwd=tmp_path)
    assert result.returncode == 2
    answer = json.loads(result.stdout)
    assert answer["against"] == {"source": "applied", "path": str(applied)}
    assert {(a["capsule"], a["action"]) for a in answer["actions"]} == EXPECTED
    assert text(orch("plan", str(candidate), cwd=tmp_path)).startswith(
        f"plan for {candidate}, against the last applied state, {applied}:"
    )
    assert SECRET not in applied.read_text()
    gone = orch("plan", str(candidate), "--socket", str(tmp_path / "var" / "orch" / "orch.sock"), cwd=tmp_path)
    assert gone.returncode == 3 and b"no orchestrator is running" in gone.stderr  # --socket asked for one
    candidate.write_text("version: 2\n")
    assert orch("plan", str(candidate), "--exit-code", cwd=tmp_path).returncode == 1


# -- 3. GET /v1/specs -----------------------------------------------------------------------------
def http(sock: Path, head: str) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(15)
        conn.connect(str(sock))
        conn.sendall(head.encode() + b"\r\nHost: orch\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.split(b"\r\n\r\n", 1)[1]


def test_specs_are_the_running_records_without_secret_values(running: tuple[Path, Path]) -> None:
    config, sock = running
    status, body = http(sock, "GET /v1/specs HTTP/1.1")
    assert status == 200
    records = json.loads(body)["capsules"]
    assert sorted(records) == ["counter", "milestones", "notes"]
    assert SECRET.encode() not in body
    assert records["counter"]["config"]["token"].startswith("secret-sha256:")
    applied = json.loads((config.parent / "var" / "orch" / "applied.json").read_text())["capsules"]
    assert records == applied  # the same records `orch plan` falls back on
    bad_query, body = http(sock, "GET /v1/specs?capsule=counter HTTP/1.1")
    assert bad_query == 400 and json.loads(body)["error"]["kind"] == "BadQuery"
    wrong_method, body = http(sock, "POST /v1/specs HTTP/1.1\r\nContent-Length: 0")
    assert wrong_method == 405 and "error" in json.loads(body)


# -- 4. hostile or broken answers ----------------------------------------------------------------
class FakeOrchestrator:
    """A unix socket answering every connection with the same bytes, then closing it."""

    def __init__(self, path: Path, answer: bytes) -> None:
        self.path, self.answer = path, answer
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self.thread.join(5)


def answer(body: bytes, *, status: str = "200 OK", headers: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    return head.encode() + body


HOSTILE = {
    "not JSON": answer(b"<html>hello</html>"),
    "a JSON list": answer(b"[1, 2, 3]"),
    "records missing fields": answer(b'{"capsules": {"counter": {"name": "counter"}}}'),
    "records of the wrong type": answer(b'{"capsules": ["counter"]}'),
    "no answer at all": b"",
    "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "a half answer": b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"capsules"',
    "endless headers": b"HTTP/1.1 200 OK\r\n" + b"X-Padding: " + b"a" * (200 << 10) + b"\r\n\r\n",
    "an absurd length": b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n{}",
    "a bad chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "a negative chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n{}\r\n0\r\n\r\n",
    "an endless chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 5000,
    "an error without JSON": answer(b"teapot", status="418 I'm a teapot"),
}


# which verbs each answer must fail: `call` prints any 200 body (a tool's output is any
# bytes); `describe` shows any JSON object it is given (every field is optional to it)
VERBS_FAILING = {
    "not JSON": ("plan", "status", "describe"),
    "a JSON list": ("plan", "status", "describe"),
    "records missing fields": ("plan", "status"),
    "records of the wrong type": ("plan", "status"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_broken_answers_are_one_line_errors(tmp_path: Path, case: str) -> None:
    config = example_deployment(tmp_path)
    fake = FakeOrchestrator(tmp_path / "fake.sock", HOSTILE[case])
    verbs = {
        "plan": ("plan", str(config), "--exit-code"),
        "status": ("status",),
        "describe": ("describe", "counter"),
        "call": ("call", "counter", "get"),
    }
    try:
        for args in (verbs[v] for v in VERBS_FAILING.get(case, tuple(verbs))):
            result = orch(*args, "--socket", str(tmp_path / "fake.sock"), cwd=tmp_path)
            lines = result.stderr.decode().strip().splitlines()
            assert result.returncode == 1, (case, args, result.stdout, lines)
            assert len(lines) == 1 and lines[0].startswith("orch: ") and "Traceback" not in lines[0], (case, lines)
    finally:
        fake.close()
