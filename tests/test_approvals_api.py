"""Approving and rejecting escalations through the control API and the CLI.

The API (`POST /v1/capsules/{name}/approve|reject`) runs on a real socket over a real
orchestrator: 200 with the capsule's status when it awaited approval, 409 when it did not
(or when the change named by `spec_hash` is no longer the one waiting), 404 for an unknown
capsule, 400 for a malformed body (nothing is granted), 413 for a huge one. The CLI verbs
run as subprocesses against a separate `orch up`.

The verbs are registered in `orch` by orchestrator.cli.main (`add_commands`); these tests
run them through the same `add_commands` on a bare parser, so they test the module itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.api.client import RemoteError
from orchestrator.api.settings import MAX_BODY
from tests.processes import orch, spawn_up, status_over, stop_up, wait_serving
from tests.test_api import Served, raw, serve
from tests.test_approvals import READ_ONLY, READ_WRITE, notes_deployment, set_capabilities


def verb(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`orch approve|reject ARGS...` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    notes_deployment(tmp_path)
    async with serve(tmp_path) as running:
        yield running


async def escalated(served: Served, capabilities: str = READ_WRITE) -> dict[str, object]:
    """Grant notes more on disk and reconcile; returns its status (awaiting approval)."""
    set_capabilities(served.root / "capsules" / "notes" / "Capsule.toml", capabilities)
    await served.json("POST", "/v1/reconcile")
    status = await served.json("GET", "/v1/capsules/notes")
    assert status["status"]["phase"] == "AwaitingApproval"
    return dict(status["status"])


async def test_approve_and_reject_through_the_api(served: Served) -> None:
    info = (await served.json("GET", "/v1/status"))["orchestrator"]["approvals"]
    assert info == {"policy": {"escalations": "ask", "allow": ["fs_read"]}, "awaiting": [], "rejected": []}
    for answer in ("approve", "reject"):
        error = await served.error("POST", f"/v1/capsules/notes/{answer}")
        assert (error.status, error.kind) == (409, "NotAwaitingApproval")
        assert "'notes' is not awaiting approval" in str(error)
        error = await served.error("POST", f"/v1/capsules/nobody/{answer}")
        assert (error.status, error.kind) == (404, "UnknownCapsule")

    waiting = await escalated(served)
    awaiting = waiting["awaiting"]
    assert isinstance(awaiting, dict) and awaiting["escalations"] == ["fs_write cwd://notes"]
    listed = await served.json("GET", "/v1/status")
    assert [c["awaiting"] for c in listed["capsules"]] == [awaiting]
    assert listed["orchestrator"]["approvals"]["awaiting"] == ["notes"]

    async with served.client() as api:
        with pytest.raises(RemoteError) as caught:  # not the change waiting: nothing granted
            await api.approve("notes", "0123456789ab")
        assert (caught.value.status, caught.value.kind) == (409, "NotAwaitingApproval")
        assert "its files changed since you looked" in str(caught.value)
        assert (await api.capsule("notes"))["status"]["phase"] == "AwaitingApproval"

        status = await api.approve("notes", str(awaiting["spec_hash"]))
        assert status["phase"] == "Running" and status["spec_hash"] == awaiting["spec_hash"]
        assert status["approved"]["escalations"] == ["fs_write cwd://notes"]
        output, _ = await api.call("notes", "write", b'{"name": "n.txt", "text": "approved"}')
        assert json.loads(output) == {"written": "n.txt", "bytes": 8}

    waiting = await escalated(served, READ_WRITE + '\nipc_publish = ["notes.*"]')
    async with served.client() as api:
        status = await api.reject("notes")
        assert status["phase"] == "Degraded" and status["rejected"]["escalations"] == ["ipc_publish notes.*"]
        assert status["spec_hash"] != status["rejected"]["spec_hash"]
        with pytest.raises(RemoteError) as caught:
            await api.approve("notes")
        assert caught.value.status == 409 and "was rejected" in str(caught.value)
        output, _ = await api.call("notes", "read", b'{"name": "n.txt"}')  # the approved version serves
        assert json.loads(output)["text"] == "approved"
    assert (await served.json("GET", "/v1/status"))["orchestrator"]["approvals"]["rejected"] == ["notes"]


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"nope", "BadJson"),
        (b"\xff\xfe", "BadJson"),
        (b"[]", "BadRequest"),
        (b'"0123456789ab"', "BadRequest"),
        (b'{"spec_hash": 5}', "BadRequest"),
        (b'{"spec_hash": "ZZZZZZ"}', "BadRequest"),
        (b'{"spec_hash": "ABCDEF"}', "BadRequest"),
        (b'{"spec_hash": "abc"}', "BadRequest"),
        (b'{"spec_hash": "' + b"a" * 65 + b'"}', "BadRequest"),
        (b'{"spec_hash": "abcdef\\n"}', "BadRequest"),
        (b'{"spec_hash": "\\ud800"}', "BadJson"),
        (b'{"spec_hash": "abcdef", "by": "me"}', "BadRequest"),
        (b'{"other": 1}', "BadRequest"),
        (b"[" * 100 + b"]" * 100, "BadJson"),
        (b'{"spec_hash": NaN}', "BadJson"),
    ],
)
async def test_malformed_answers_are_refused_and_grant_nothing(served: Served, body: bytes, kind: str) -> None:
    await escalated(served)
    for answer in ("approve", "reject"):
        response = await raw(served.sock, "POST", f"/v1/capsules/notes/{answer}", body)
        assert response.status == 400, response.body
        assert response.error()["kind"] == kind
        assert len(response.error()["message"]) < 300
    status = (await served.json("GET", "/v1/capsules/notes"))["status"]
    assert status["phase"] == "AwaitingApproval" and status["rejected"] is None


async def test_huge_bodies_odd_methods_and_paths(served: Served) -> None:
    await escalated(served)
    response = await raw(served.sock, "POST", "/v1/capsules/notes/approve", b"{" + b" " * (MAX_BODY + 10) + b"}")
    assert response.status == 413
    assert (await raw(served.sock, "GET", "/v1/capsules/notes/approve")).status == 405
    assert (await raw(served.sock, "POST", "/v1/capsules/notes/approve/x")).status == 404
    assert (await raw(served.sock, "POST", "/v1/capsules/%2e%2e/approve")).status == 404
    assert (await raw(served.sock, "POST", "/v1/capsules/no%00tes/approve")).status == 404
    status = (await served.json("GET", "/v1/capsules/notes"))["status"]
    assert status["phase"] == "AwaitingApproval"
    response = await raw(served.sock, "POST", "/v1/capsules/notes/approve", b'{"spec_hash": null}')
    assert response.status == 200 and json.loads(response.body)["phase"] == "Running"


# -- the CLI, against `orch up` ----------------------------------------------------------------


def test_approve_and_reject_with_the_cli(tmp_path: Path) -> None:
    config = notes_deployment(tmp_path)
    manifest = tmp_path / "capsules" / "notes" / "Capsule.toml"
    log = tmp_path / "up.log"
    sock = tmp_path / ".orch" / "orch.sock"
    process = spawn_up(config, log)
    try:
        wait_serving(process, sock, log)
        where = ("--config", str(config))
        nothing = verb("approve", "notes", *where, cwd=tmp_path)
        assert nothing.returncode == 1 and "'notes' is not awaiting approval" in nothing.stderr, nothing.stderr

        set_capabilities(manifest, READ_WRITE)
        planned = orch("reconcile", *where, cwd=tmp_path)
        assert planned.returncode == 0 and b"! escalation: fs_write cwd://notes" in planned.stdout
        status = json.loads(orch("status", "--json", *where, cwd=tmp_path).stdout)
        [notes] = status["capsules"]
        assert notes["phase"] == "AwaitingApproval" and notes["awaiting"]["escalations"] == ["fs_write cwd://notes"]
        spec_hash = notes["awaiting"]["spec_hash"]

        stale = verb("approve", "notes", "--spec-hash", "0" * 12, *where, cwd=tmp_path)
        assert stale.returncode == 1 and "its files changed since you looked" in stale.stderr
        assert status_over(sock)["capsules"][0]["phase"] == "AwaitingApproval"

        approved = verb("approve", "notes", "--spec-hash", spec_hash[:12], "--socket", str(sock), cwd=tmp_path)
        assert approved.returncode == 0, approved.stderr
        assert f"notes: approved change {spec_hash[:12]}, granting fs_write cwd://notes" in approved.stdout
        assert "notes: running version" in approved.stdout
        wrote = orch("call", "notes", "write", '{"name": "cli.txt", "text": "ok"}', *where, cwd=tmp_path)
        assert wrote.returncode == 0, wrote.stderr
        assert (tmp_path / "notes" / "cli.txt").read_text() == "ok"

        set_capabilities(manifest, READ_ONLY)  # back to fewer grants: a reload nobody is asked about
        assert orch("reconcile", *where, cwd=tmp_path).returncode == 0
        set_capabilities(manifest, READ_WRITE)
        assert orch("reconcile", *where, cwd=tmp_path).returncode == 0
        rejected = verb("reject", "notes", *where, cwd=tmp_path)
        assert rejected.returncode == 0, rejected.stderr
        assert (
            "notes: rejected change" in rejected.stdout and "which would grant fs_write cwd://notes" in rejected.stdout
        )
        assert "keeps serving" in rejected.stdout
        [notes] = status_over(sock)["capsules"]
        assert notes["phase"] == "Degraded" and notes["rejected"]["escalations"] == ["fs_write cwd://notes"]
        again = verb("reject", "notes", *where, cwd=tmp_path)
        assert again.returncode == 1 and "was rejected" in again.stderr

        usage = verb("approve", *where, cwd=tmp_path)
        assert usage.returncode == 2 and "name" in usage.stderr
        hostile = verb("approve", "notes\n\x1b[31m", *where, cwd=tmp_path)
        assert hostile.returncode == 1 and "no capsule" in hostile.stderr and "\x1b" not in hostile.stderr
    finally:
        stop_up(process)
    gone = verb("approve", "notes", "--config", str(config), cwd=tmp_path)
    assert gone.returncode == 3 and "no orchestrator is running" in gone.stderr
