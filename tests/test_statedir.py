"""The state dir: locked before anything starts, private, and refused up front when unusable.

Each finding of the security review is reproduced with real `orch` processes: a second
`orch up` on a busy state dir (with and without its socket), state dirs that are a file,
read-only, under /proc, or hold a folder where the database belongs; and the permissions of
what the orchestrator creates.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.control.statedir import LOCK, StateDir, StateDirBusy, StateDirError, check_state_dir
from tests.processes import example_deployment, orch, spawn_up, status_over, stop_up, wait_serving


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    return example_deployment(tmp_path)


@pytest.fixture
def running(deployment: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = deployment.parent / "first.log"
    process = spawn_up(deployment, log)
    try:
        wait_serving(process, deployment.parent / ".orch" / "orch.sock", log)
        yield process
    finally:
        if process.poll() is None:
            stop_up(process)


def one_line_refusal(result: subprocess.CompletedProcess[bytes]) -> str:
    """The refusal `orch` printed: exit 1, no traceback, no capsule started."""
    err = result.stderr.decode()
    out = result.stdout.decode()
    assert result.returncode == 1, (result.returncode, out, err)
    assert "Traceback" not in err + out, err
    assert '"topic": "orch.capsule.' not in out and "running version" not in out, out  # nothing started
    return err


def test_a_second_orch_up_exits_before_starting_anything_naming_the_first(
    deployment: Path, running: subprocess.Popen[bytes]
) -> None:
    applied = deployment.parent / ".orch" / "applied.json"
    before = applied.read_bytes(), applied.stat().st_mtime_ns
    second = orch("up", str(deployment), "--log-format", "json", "--no-watch", cwd=deployment.parent)
    err = one_line_refusal(second)
    assert f"in use by another orchestrator (pid {running.pid})" in err, err
    assert (applied.read_bytes(), applied.stat().st_mtime_ns) == before  # nothing rewritten
    assert running.poll() is None  # the first one keeps serving
    assert status_over(deployment.parent / ".orch" / "orch.sock")["orchestrator"]["ready"]


def test_the_lock_holds_even_without_the_socket(deployment: Path, running: subprocess.Popen[bytes]) -> None:
    (deployment.parent / ".orch" / "orch.sock").unlink()
    second = orch("up", str(deployment), "--log-format", "json", "--no-watch", cwd=deployment.parent)
    assert f"pid {running.pid}" in one_line_refusal(second)
    call = orch("capsule", "call", "capsules/counter", "get", "--state-dir", ".orch", cwd=deployment.parent)
    assert call.returncode == 1 and f"pid {running.pid}" in call.stderr.decode()  # nor beside it, by hand


def test_the_lock_is_released_when_the_holder_dies(deployment: Path) -> None:
    log = deployment.parent / "killed.log"
    process = spawn_up(deployment, log)
    wait_serving(process, deployment.parent / ".orch" / "orch.sock", log)
    process.kill()
    process.wait(30)
    with StateDir.open(deployment.parent / ".orch") as state:  # a SIGKILLed holder leaves no lock
        assert state.locked
        assert (deployment.parent / ".orch" / LOCK).read_text().strip() == str(os.getpid())


def test_the_lock_in_process(tmp_path: Path) -> None:
    with StateDir.open(tmp_path / "state") as first:
        with pytest.raises(StateDirBusy) as busy:
            StateDir.open(tmp_path / "state")
        assert busy.value.pid == os.getpid()
        assert first.locked
    with StateDir.open(tmp_path / "state") as again:
        assert again.locked


def test_an_open_state_dir_is_made_private_and_its_files_are_private(deployment: Path) -> None:
    state = deployment.parent / ".orch"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    log = deployment.parent / "private.log"
    process = spawn_up(deployment, log)
    try:
        wait_serving(process, state / "orch.sock", log)
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in ("applied.json", "lock", "orch.sock"):
            mode = stat.S_IMODE((state / name).lstat().st_mode)
            assert mode & 0o077 == 0, (name, oct(mode))
    finally:
        stop_up(process)


@pytest.mark.parametrize("how", ["file", "proc", "database-folder"])
def test_unusable_state_dirs_are_refused_up_front_by_up_and_validate(deployment: Path, how: str) -> None:
    root = deployment.parent
    if how == "file":
        (root / "state").write_text("not a folder")
        setting, expected = "state", "is a file, not a folder"
    elif how == "proc":
        setting, expected = "/proc/self", "virtual file system"
    else:
        (root / "state" / "kv.sqlite3").mkdir(parents=True)
        setting, expected = "state", "kv.sqlite3 is not a regular file"
    deployment.write_text(deployment.read_text().replace("state_dir: .orch", f"state_dir: {setting}"))
    up = orch("up", str(deployment), "--log-format", "json", "--no-watch", cwd=root)
    err = one_line_refusal(up)
    assert expected in err and "state_dir" in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    validate = orch("validate", str(deployment), cwd=root)
    assert validate.returncode == 1 and expected in validate.stderr.decode(), validate.stderr
    assert "field state_dir" in validate.stderr.decode() or "state_dir:" in validate.stderr.decode()


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted read-only (the tests run as root, as CI does)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    assert done.returncode == 0, f"these tests mount a tmpfs and need root: {done.stderr.decode()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_read_only_state_dir_is_named_as_read_only(deployment: Path, read_only_mount: Path) -> None:
    deployment.write_text(deployment.read_text().replace("state_dir: .orch", f"state_dir: {read_only_mount}"))
    err = one_line_refusal(orch("up", str(deployment), "--log-format", "json", "--no-watch", cwd=deployment.parent))
    assert f"the state dir {read_only_mount} is read-only" in err, err
    assert check_state_dir(read_only_mount) is not None
    with pytest.raises(StateDirError, match="read-only"):
        StateDir.open(read_only_mount)


def test_a_usable_state_dir_passes_the_check_without_being_created(tmp_path: Path) -> None:
    assert check_state_dir(tmp_path / "not" / "yet") is None
    assert not (tmp_path / "not").exists()
    (tmp_path / "file").write_text("x")
    assert "is a file" in str(check_state_dir(tmp_path / "file"))
    assert check_state_dir(tmp_path) is None  # an existing empty folder


def test_a_corrupt_database_is_refused_by_up_and_validate(deployment: Path) -> None:
    import sqlite3

    state = deployment.parent / ".orch"
    state.mkdir(mode=0o700)
    database = state / "kv.sqlite3"
    with sqlite3.connect(database) as db:  # a database of many pages, then a few of them flipped
        db.execute("CREATE TABLE filler (x BLOB)")
        db.executemany("INSERT INTO filler VALUES (?)", [(os.urandom(3000),) for _ in range(40)])
    data = bytearray(database.read_bytes())
    for page in (3, 5, 6):  # the header page stays intact
        data[(page - 1) * 4096 : (page - 1) * 4096 + 64] = b"\xff" * 64
    database.write_bytes(bytes(data))
    err = one_line_refusal(orch("up", str(deployment), "--log-format", "json", "--no-watch", cwd=deployment.parent))
    assert f"the KV database {database} is corrupt" in err and "move it aside" in err, err
    validate = orch("validate", str(deployment), cwd=deployment.parent)
    assert validate.returncode == 1 and "is corrupt" in validate.stderr.decode(), validate.stderr
    assert database.read_bytes() == bytes(data)  # neither touched it
