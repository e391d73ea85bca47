"""The CLI basics an operator expects, checked on real `orch` processes.

`--version`; a parser that imports nothing heavy (start-up); examples and exit codes in
every verb's `--help`; completion scripts for bash, zsh and fish (valid syntax, and what
they complete, in each shell this machine has); colour on a terminal only (pseudo-
terminals from `pty`), NO_COLOR and `--color`; `orch describe`; a final newline on a
terminal but exact bytes in a pipe; quiet exits under SIGPIPE; truncation markers and
`--full`; third-party log chatter hidden unless `-v`.

One watching `orch up` serves the module's tests (a copy of the example deployment, with a
secret config key on counter); tests that change its config put it back.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import orchestrator
from orchestrator.cli.completion import command_tree
from orchestrator.cli.describe import describe, summarize_schema
from orchestrator.cli.main import _parser
from orchestrator.cli.output import Style
from tests.processes import REPO, example_deployment, stop_up, wait_serving
from tests.test_cli_reachable import SECRET, secret_deployment

ORCH = [sys.executable, "-m", "orchestrator"]
ESC = b"\x1b["
SHELLS = [shell for shell in ("bash", "zsh", "fish") if shutil.which(shell)]


@dataclass
class Deployment:
    root: Path
    config: Path
    sock: Path
    stderr: Path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("polish")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCH_TEST_TOKEN", SECRET)
        config = secret_deployment(root)
        with open(root / "up.out", "wb") as out, open(root / "up.err", "wb") as err:
            process = subprocess.Popen(
                [*ORCH, "up", str(config), "--log-format", "json"], cwd=root, stdout=out, stderr=err
            )
    sock = root / "var" / "orch" / "orch.sock"
    try:
        wait_serving(process, sock, root / "up.err")
        yield Deployment(root, config, sock, root / "up.err")
    finally:
        stop_up(process)


def run(
    *args: str, cwd: Path, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    return subprocess.run(
        [*ORCH, *args],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env={**environment, **(env or {})},
        timeout=60,
        check=False,
    )


def run_tty(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """`orch ARGS` with stdout on a pseudo-terminal and stderr piped: (exit status, what the
    terminal showed, stderr)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    environment.update({"TERM": "xterm", **(env or {})})
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [*ORCH, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, cwd=cwd, env=environment
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert process.stderr is not None
    errors = process.stderr.read()
    process.stderr.close()
    return process.wait(30), shown, errors


def run_tty_stderr(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, bytes]:
    """`orch ARGS` with stderr on a pseudo-terminal (stdout discarded)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    environment.update({"TERM": "xterm", **(env or {})})
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [*ORCH, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=cwd, env=environment
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return process.wait(30), shown


# -- --version, start-up, help --------------------------------------------------------------------
def test_version_is_the_package_version(tmp_path: Path) -> None:
    result = run("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout.decode()) == (0, f"orch {orchestrator.__version__}\n")


HEAVY = ("aiohttp", "pydantic", "wasmtime", "jsonschema", "textual", "asyncio", "aiosqlite", "watchfiles")


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        (["--help"], ()),
        (["status", "--help"], ()),
        (["status", "--socket", "nowhere.sock"], ()),
        (["status"], ("yaml",)),  # reads config.yaml's state_dir, leniently
        (["describe", "counter"], ("yaml",)),
        (["completion", "bash"], ()),
    ],
)
def test_short_commands_import_nothing_heavy(tmp_path: Path, argv: list[str], allowed: tuple[str, ...]) -> None:
    (tmp_path / "config.yaml").write_text("version: 1\nstate_dir: st\n")
    code = (
        "import json, sys\n"
        "from orchestrator.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY) | {'yaml'}!r})\n"
        "sys.stderr.write('HEAVY=' + json.dumps(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=tmp_path, timeout=60, check=False)
    heavy = json.loads(result.stderr.decode().rsplit("HEAVY=", 1)[1])
    assert heavy == sorted(allowed), (argv, heavy)


def verb_paths() -> list[str]:
    return [node.path.removeprefix("orch").strip() for node in command_tree(_parser())]


def test_every_verb_has_examples_and_exit_codes_in_its_help(tmp_path: Path) -> None:
    paths = verb_paths()
    assert {"", "status", "describe", "plan", "kv", "wasm call", "completion"} <= set(paths)
    for path in paths:
        node = next(n for n in command_tree(_parser()) if n.path == f"orch {path}".strip())
        result = run(*path.split(), "--help", cwd=tmp_path)
        text = result.stdout.decode()
        assert result.returncode == 0, path
        assert "examples:" in text, path
        if not node.commands or path == "":  # a group lists its verbs' own help
            assert "exit status" in text, path
        assert "==SUPPRESS==" not in text and "__complete" not in text, path


# -- completion ---------------------------------------------------------------------------------
def completion_script(shell: str, root: Path) -> Path:
    result = run("completion", shell, cwd=root)
    assert result.returncode == 0, result.stderr
    script = root / f"orch.{shell}"
    script.write_bytes(result.stdout)
    return script


def test_this_machine_checks_at_least_bash() -> None:
    assert "bash" in SHELLS  # the completion tests below run for every shell found here


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_scripts_are_valid_shell(tmp_path: Path, shell: str) -> None:
    script = completion_script(shell, tmp_path)
    check = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}[shell]
    result = subprocess.run([*check, str(script)], capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr.decode()


def bin_dir(root: Path) -> Path:
    """A folder with an `orch` that runs this checkout, for the shells to call."""
    folder = root / "bin"
    folder.mkdir(exist_ok=True)
    wrapper = folder / "orch"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m orchestrator "$@"\n')
    wrapper.chmod(0o755)
    return folder


def complete_bash(script: Path, words: list[str], cwd: Path) -> list[str]:
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
        "_orch\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{bin_dir(cwd)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    result = subprocess.run(["bash", "-c", program], capture_output=True, cwd=cwd, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return [line for line in result.stdout.decode().splitlines() if line]


def complete_fish(script: Path, line: str, cwd: Path) -> list[str]:
    env = {**os.environ, "PATH": f"{bin_dir(cwd)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    program = f"source {script}; complete -C {json.dumps(line)}"
    result = subprocess.run(["fish", "-c", program], capture_output=True, cwd=cwd, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return [entry.split("\t")[0] for entry in result.stdout.decode().splitlines()]


def complete_zsh(script: Path, words: list[str], cwd: Path) -> list[str]:
    """The zsh driver, with the completion system's builtins replaced by printers."""
    program = (
        'compadd() { [[ "$1" == "--" ]] && shift; print -l -- "$@" }\n'
        '_describe() { local -a items; items=("${(@P)4}"); print -l -- "${items[@]%%:*}" }\n'
        "_files() { print FILES }\n"
        "compdef() { : }\n"
        f"source {script}\n"
        f"words=({' '.join(shlex.quote(w) for w in words)}); CURRENT=$#words\n"
        "_orch\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir(cwd)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        ["zsh", "-f", "-c", program], capture_output=True, cwd=cwd, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    offered = [line for line in result.stdout.decode().splitlines() if line]
    return [o for o in offered if o.startswith(words[-1]) or o == "FILES"]  # compadd's own matching


CASES: list[tuple[list[str], set[str], set[str]]] = [
    # words typed (the last one is being completed), must be offered, must not be
    (["orch", ""], {"status", "describe", "completion", "wasm", "kv", "plan"}, {"__complete"}),
    (["orch", "wasm", ""], {"call"}, {"status"}),
    (["orch", "up", "--log-format", ""], {"text", "json"}, set()),
    (["orch", "--color", ""], {"auto", "always", "never"}, set()),
    (["orch", "kv", ""], {"ls", "get", "set", "del"}, set()),
    (["orch", "status", "--"], {"--json", "--config", "--socket"}, {"--follow"}),
    (["orch", "events", "--topic", "x", "--fu"], {"--full"}, {"--follow"}),
    (["orch", "completion", ""], {"bash", "zsh", "fish"}, set()),
]


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_offers_verbs_options_and_choices(tmp_path: Path, shell: str) -> None:
    script = completion_script(shell, tmp_path)
    for words, wanted, unwanted in CASES:
        if shell == "bash":
            offered = set(complete_bash(script, words, tmp_path))
        elif shell == "zsh":
            offered = set(complete_zsh(script, words, tmp_path))
        else:
            offered = set(complete_fish(script, " ".join(words), tmp_path))
        prefix = words[-1]
        assert wanted <= offered, (shell, words, offered)
        assert not (unwanted & offered), (shell, words, offered)
        assert all(o.startswith(prefix) for o in offered), (shell, words, offered)


@pytest.mark.parametrize("shell", SHELLS)
def test_completion_offers_the_running_capsules(deployment: Deployment, tmp_path: Path, shell: str) -> None:
    script = completion_script(shell, tmp_path)
    names = {"counter", "milestones", "notes"}
    sock = str(deployment.sock)
    for words in (["orch", "describe", ""], ["orch", "kv", "get", ""], ["orch", "call", ""]):
        in_deployment = [*words[:-1], "--config", str(deployment.config), ""]
        elsewhere = [*words[:-1], "--socket", sock, ""]
        for typed in (words, in_deployment, elsewhere):
            cwd = deployment.root if typed is words else tmp_path  # tmp_path has no config.yaml
            if shell == "bash":
                offered = set(complete_bash(script, typed, cwd))
            elif shell == "zsh":
                offered = set(complete_zsh(script, typed, cwd))
            else:
                offered = set(complete_fish(script, " ".join(typed), cwd))
            assert offered == names, (shell, typed, offered)
    if shell == "bash":  # nothing runs there: nothing offered, no error, no wait
        assert complete_bash(script, ["orch", "describe", ""], tmp_path) == []


def test_capsule_names_helper_is_silent_without_an_orchestrator(tmp_path: Path) -> None:
    for args in ((), ("--socket", str(tmp_path / "nowhere.sock")), ("--config", str(tmp_path / "missing.yaml"))):
        result = run("__complete", "capsules", *args, cwd=tmp_path)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), args


# -- colour ---------------------------------------------------------------------------------------
def test_status_is_coloured_on_a_terminal_only(deployment: Deployment) -> None:
    root = deployment.root
    code, shown, _ = run_tty("status", cwd=root)
    assert code == 0 and b"\x1b[32mRunning" in shown  # the phase in green
    assert ESC not in run("status", cwd=root).stdout  # piped: plain
    for env, args in (({"NO_COLOR": "1"}, ()), ({"TERM": "dumb"}, ()), ({}, ("--color", "never"))):
        code, shown, _ = run_tty("status", *args, cwd=root, env=env)
        assert code == 0 and b"Running" in shown and ESC not in shown, (env, args)
    forced = run("--color", "always", "status", cwd=root, env={"NO_COLOR": "1"})
    assert b"\x1b[32mRunning" in forced.stdout  # --color always wins, even piped, even over NO_COLOR
    after_the_verb = run("status", "--color", "always", cwd=root)
    assert b"\x1b[32mRunning" in after_the_verb.stdout


def test_errors_are_red_on_a_terminal(tmp_path: Path) -> None:
    code, shown = run_tty_stderr("status", "--socket", str(tmp_path / "nowhere.sock"), cwd=tmp_path)
    assert code == 3 and shown.startswith(b"\x1b[31morch: no orchestrator is running")
    plain = run("status", "--socket", str(tmp_path / "nowhere.sock"), cwd=tmp_path)
    assert plain.returncode == 3 and plain.stderr.startswith(b"orch: no orchestrator") and ESC not in plain.stderr
    code, shown = run_tty_stderr(
        "status", "--socket", str(tmp_path / "nowhere.sock"), cwd=tmp_path, env={"NO_COLOR": "x"}
    )
    assert code == 3 and ESC not in shown


# -- describe -------------------------------------------------------------------------------------
def test_describe_shows_everything_about_a_capsule(deployment: Deployment) -> None:
    root = deployment.root
    assert run("call", "counter", "increment", '{"by": 3}', cwd=root).returncode == 0
    result = run("describe", "counter", cwd=root)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    labels = [line.split(":", 1)[0] for line in text.splitlines() if line and not line.startswith(" ")]
    for label in (
        "Name",
        "Package",
        "Phase",
        "Version",
        "Instances",
        "Calls",
        "Last error",
        "Tools",
        "Capabilities",
        "Limits",
        "Config",
        "History",
    ):
        assert label in labels, (label, text)
    assert re.search(r"^Phase:\s+Running since ", text, re.M)
    assert re.search(r"^Calls:\s+\d+\s+errors 0\s+fuel/call [\d,]+$", text, re.M)
    assert re.search(r"^  increment\s+Adds `by`", text, re.M)
    assert "input: {by?: integer}" in text and "by: How much to add" in text
    assert re.search(r"^  ipc_publish:\s+counter\.\*$", text, re.M) and re.search(r"^  kv:\s+yes$", text, re.M)
    assert re.search(r"^Limits:\s+fuel 100,000,000 · memory 64 MiB · timeout 2000 ms$", text, re.M)
    assert "  token = ***  (secret)" in text and "  step = 1  (number)" in text
    assert SECRET not in text
    assert re.search(r"^  \S+ \S+  running\s+[0-9a-f]{12}$", text, re.M)  # the history
    as_json = json.loads(run("describe", "counter", "--json", cwd=root).stdout)
    assert {t["name"] for t in as_json["tools"]} == {"increment", "get", "reset"}
    unknown = run("describe", "nope", cwd=root)
    assert (
        unknown.returncode == 1 and unknown.stderr.decode().count("\n") == 1 and b"no capsule 'nope'" in unknown.stderr
    )


def test_describe_survives_whatever_the_server_sends() -> None:
    hostile: list[object] = [
        {},
        {"status": 5, "tools": "x", "capabilities": [1], "history": [1, None], "limits": "big", "config": None},
        {"tools": [{"name": "t", "input_schema": {"type": ["string", "null"]}}, 7], "env": {"k": 3}},
        {"status": {"phase": "Failed", "last_error": "x" * 10_000, "next_retry_ms": 0, "since_ms": "soon"}},
    ]
    for summary in hostile:
        text = describe("x", summary, style=Style(True), now_ms=1_000)  # type: ignore[arg-type]
        assert text.startswith("\x1b[1mName:")


@pytest.mark.parametrize(
    ("schema", "summary"),
    [
        (
            {
                "type": "object",
                "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["name"],
            },
            "{name: string, n?: integer}",
        ),
        ({"type": "object", "properties": {}}, "{}"),
        ({"type": "array", "items": {"type": "number"}}, "[number]"),
        ({"enum": ["a", "b"]}, '"a" | "b"'),
        ({"type": ["string", "null"]}, "string | null"),
        ({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}, "string | [string]"),
        (
            {
                "type": "object",
                "properties": {
                    "a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {}}}}}
                },
            },
            "{a?: {b?: {c?: …}}}",
        ),
        (None, "any"),
        ("nonsense", "?"),
        ({"enum": list(range(100))}, "0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 | …"),
    ],
)
def test_input_schemas_are_summarised_in_one_line(schema: object, summary: str) -> None:
    assert summarize_schema(schema) == summary


# -- output: final newline, SIGPIPE, truncation ---------------------------------------------------------
def test_output_ends_with_a_newline_on_a_terminal_but_is_exact_in_a_pipe(deployment: Deployment) -> None:
    root = deployment.root
    piped = run("call", "counter", "get", cwd=root)
    assert piped.returncode == 0 and piped.stdout.startswith(b'{"count":') and not piped.stdout.endswith(b"\n")
    assert run("call", "counter", "get", "--newline", cwd=root).stdout == piped.stdout + b"\n"
    code, shown, _ = run_tty("call", "counter", "get", cwd=root)
    assert code == 0 and shown == piped.stdout + b"\r\n"  # the terminal turns \n into \r\n
    binary = bytes(range(256))
    assert run("kv", "set", "counter", "blob", "-", stdin=binary, cwd=root).returncode == 0
    assert run("kv", "get", "counter", "blob", cwd=root).stdout == binary  # exact, in a pipe
    assert run("kv", "set", "counter", "line", "text\n", cwd=root).returncode == 0
    code, shown, _ = run_tty("kv", "get", "counter", "line", cwd=root)
    assert shown == b"text\r\n"  # already ends in a newline: none added
    assert run("kv", "get", "counter", "line", "--newline", cwd=root).stdout == b"text\n"
    code, shown, _ = run_tty("kv", "get", "counter", "count", cwd=root)
    assert code == 0 and shown.endswith(b"\r\n") and shown.strip().isdigit()


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "--json"),
        ("events", "--history", "5"),
        ("describe", "counter"),
        ("kv", "ls", "counter"),
        ("--help",),
        ("completion", "bash"),
    ],
)
def test_a_closed_pipe_ends_a_verb_quietly(deployment: Deployment, args: tuple[str, ...]) -> None:
    read, write = os.pipe()
    os.close(read)  # nobody will ever read: the first write fails
    try:
        process = subprocess.run(
            [*ORCH, *args], stdout=write, stderr=subprocess.PIPE, cwd=deployment.root, timeout=60, check=False
        )
    finally:
        os.close(write)
    # argparse itself ignores a failed write of --help (and exits 0); the verbs exit 141
    assert (process.returncode, process.stderr) == (0 if args == ("--help",) else 141, b""), args


def test_following_events_ends_when_the_reader_goes_even_on_a_quiet_bus(deployment: Deployment) -> None:
    assert run("call", "counter", "increment", cwd=deployment.root).returncode == 0  # one event in history
    process = subprocess.Popen(
        [*ORCH, "events", "--follow", "--history", "1", "--topic", "counter.changed"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=deployment.root,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline()
    process.stdout.close()  # like `| head -1` exiting; nothing more is published
    assert process.wait(30) == 141
    assert process.stderr.read() == b""
    process.stderr.close()


def test_long_payloads_are_cut_with_a_marker_unless_full(deployment: Deployment) -> None:
    root = deployment.root
    good = deployment.config.read_text()
    broken = good.replace("    path: capsules/notes", "    pth: capsules/notes").replace(
        "    path: capsules/milestones", "    pht: capsules/milestones"
    )
    deployment.config.write_text(broken)  # the watcher publishes orch.reconcile.rejected: a long payload
    try:
        deadline = time.monotonic() + 30
        while not (raw := run("events", "--topic", "orch.reconcile.rejected", "--json", cwd=root).stdout):
            assert time.monotonic() < deadline, "no orch.reconcile.rejected event"
            time.sleep(0.1)
    finally:
        deployment.config.write_text(good)
    event = json.loads(raw.splitlines()[-1])
    whole = json.dumps(event["payload"], ensure_ascii=False)
    assert len(whole) > 300
    cut = run("events", "--topic", "orch.reconcile.rejected", cwd=root).stdout.decode().splitlines()[-1]
    assert f"{whole[:300]}… ({len(whole) - 300:,} more characters) (from orch)" in cut
    full = run("events", "--topic", "orch.reconcile.rejected", "--full", cwd=root).stdout.decode().splitlines()[-1]
    assert f"{whole} (from orch)" in full and "more characters" not in full


# -- logging ------------------------------------------------------------------------------------------
def test_third_party_chatter_is_hidden_unless_verbose(tmp_path: Path) -> None:
    seen = {}
    for flags in ((), ("-v",)):
        root = tmp_path / ("verbose" if flags else "quiet")
        root.mkdir()
        config = example_deployment(root)
        with open(root / "up.out", "wb") as out, open(root / "up.err", "wb") as err:
            process = subprocess.Popen(
                [*ORCH, *flags, "up", str(config), "--log-format", "json"], cwd=root, stdout=out, stderr=err
            )
        try:
            wait_serving(process, root / ".orch" / "orch.sock", root / "up.err")
            config.write_text(config.read_text().replace("step: 1", "step: 2"))
            deadline = time.monotonic() + 30
            while '"orch.capsule.counter.reloaded"' not in (root / "up.out").read_text():
                assert time.monotonic() < deadline, (root / "up.err").read_text()
                time.sleep(0.05)
        finally:
            stop_up(process)
        seen[flags] = (root / "up.err").read_text()
    assert "watchfiles" not in seen[()], seen[()]
    # -v turns the logs up (the watcher no longer goes through watchfiles' chatty awatch loop)
    assert "DEBUG orchestrator." in seen[("-v",)] and "DEBUG orchestrator." not in seen[()], seen[("-v",)]
