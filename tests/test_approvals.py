"""The capability escalation gate through the real runtime: real wasm, files, watcher, state dir.

- A manifest edit that adds `fs_write` (seen by the file watcher) is held: the old version
  keeps serving and answering calls, the phase is AwaitingApproval with the escalations,
  an `orch.audit.escalation` event says it waits; `approve` reloads it and the new grant
  works; `reject` keeps the old one, and the change stays rejected through reconciles and
  restarts until the capsule's files change again.
- The policy cases: allow (audited), allow per capability, ask; a capsule with no
  capabilities never waits; the first config applied in a state dir is judged by its own
  policy; a change that relaxes the policy and escalates in the same config waits.
- Nothing is left behind when a capsule is removed or disabled while it waits; restarting
  the orchestrator keeps the policy in force and the rejections (approvals.json) and does
  not ask again for what ran before; an unreadable approvals.json asks for everything.
- The `approvals:` section of config.yaml: every malformed value is a problem naming the line.

Waits are on bus events with generous deadlines, never fixed sleeps.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.control.approvals import APPROVALS, ApprovalGate, NotAwaitingApproval, Rejection, allowed
from orchestrator.control.runtime import Orchestrator
from orchestrator.desired.config import ApprovalPolicy, parse_config
from orchestrator.errors import CapabilityDenied, CapsuleNotRunning, ConfigError, UnknownCapsule
from tests.conftest import CAPSULES
from tests.test_orchestrate import MANIFEST, Running, module, replace_atomically

READ_ONLY = 'fs_read = ["cwd://notes"]'
READ_WRITE = 'fs_read = ["cwd://notes"]\nfs_write = ["cwd://notes"]'
ASK_BUT_READ = "{escalations: ask, allow: [fs_read]}"


# -- deployments ----------------------------------------------------------------------------


def set_capabilities(manifest: Path, capabilities: str) -> None:
    """Replace the [capabilities] table of `manifest` (atomically, as editors save)."""
    text = manifest.read_text()
    start = text.index("[capabilities]\n") + len("[capabilities]\n")
    end = text.index("[[tool]]", start)
    replace_atomically(manifest, text[:start] + capabilities + "\n\n" + text[end:])


def notes_deployment(root: Path, *, policy: str | None = ASK_BUT_READ, capabilities: str = READ_ONLY) -> Path:
    """The example `notes` capsule (tools write/read/list under cwd://notes), granted only
    `capabilities`, under a config.yaml with approval `policy`; returns the config."""
    folder = root / "capsules" / "notes"
    shutil.copytree(CAPSULES / "notes", folder, ignore=shutil.ignore_patterns("assembly"))
    manifest = folder / "Capsule.toml"
    text = manifest.read_text()
    build = text.index("[build]")
    manifest.write_text(text[:build] + text[text.index("[capabilities]") :])  # no sources here: no build
    set_capabilities(manifest, capabilities)
    (root / "notes").mkdir()
    approvals = f"approvals: {policy}\n" if policy is not None else ""
    config = root / "config.yaml"
    config.write_text(f"version: 1\n{approvals}capsules:\n  notes:\n    path: capsules/notes\n")
    return config


def wat_capsule(root: Path, name: str, capabilities: str = "") -> None:
    """A small WAT capsule `name` (tool `version`) under root/caps/NAME, granted `capabilities`."""
    folder = root / "caps" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "v.wat").write_text(module(1))
    extra = f"\n[capabilities]\n{capabilities}\n" if capabilities else ""
    (folder / "Capsule.toml").write_text(MANIFEST.format(name=name, description="v", extra=extra))


def wat_config(root: Path, policy: str | None, *names: str) -> Path:
    approvals = f"approvals: {policy}\n" if policy is not None else ""
    deployments = "".join(f"  {n}:\n    path: caps/{n}\n" for n in names)
    config = root / "config.yaml"
    replace_atomically(config, f"version: 1\n{approvals}capsules:\n{deployments or '  {}'}")
    return config


class Gate(Running):
    """A running orchestrator, its events, and the gate's view of one capsule."""

    def status(self, name: str = "notes") -> dict[str, Any]:
        assert self.orchestrator.reconciler is not None
        return next(s for s in self.orchestrator.reconciler.status() if s["name"] == name)

    def audits(self, name: str = "notes") -> list[dict[str, Any]]:
        """The payloads of `orch.audit.escalation` for `name`, oldest first."""
        return [
            e.payload for e in self.orchestrator.bus.history("orch.audit.escalation") if e.payload["capsule"] == name
        ]

    async def call(self, tool: str, arguments: Any, name: str = "notes") -> Any:
        assert self.orchestrator.reconciler is not None
        result = await self.orchestrator.reconciler.call_tool(name, tool, arguments)
        return json.loads(result.output)

    def spec_hash(self, name: str = "notes") -> str:
        assert self.orchestrator.desired is not None
        return self.orchestrator.desired.specs[name].spec_hash


async def started(config: Path, *, watch: bool = False) -> Gate:
    orchestrator = Orchestrator(config, watch=watch)
    events = orchestrator.bus.subscribe(">", queue_size=100_000)
    await orchestrator.start()
    return Gate(orchestrator, events, config.parent)


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[Gate]:
    """notes (read only) running and watched, under `ask` with fs_read allowed."""
    gate = await started(notes_deployment(tmp_path), watch=True)
    try:
        yield gate
    finally:
        await gate.orchestrator.stop(2)


async def escalate(gate: Gate) -> dict[str, Any]:
    """Add fs_write to notes' manifest on disk; returns its status once it awaits approval."""
    set_capabilities(gate.root / "capsules" / "notes" / "Capsule.toml", READ_WRITE)
    event = await gate.wait_topic("orch.capsule.notes.awaitingapproval")
    return dict(event.payload)


# -- through the file watcher ----------------------------------------------------------------


async def test_a_manifest_edit_adding_fs_write_waits_while_the_old_version_serves_then_approve(watched: Gate) -> None:
    gate = watched
    assert gate.status()["phase"] == "Running"
    old = gate.status()
    assert gate.audits() == [
        {
            "capsule": "notes",
            "escalations": ["fs_read cwd://notes"],
            "granted_by": "policy",
            "spec_hash": old["spec_hash"],
        }
    ]
    with pytest.raises(CapabilityDenied):
        await gate.call("write", {"name": "a.txt", "text": "A"})

    waiting = await escalate(gate)
    new_hash = gate.spec_hash()
    assert new_hash != old["spec_hash"]
    assert waiting["phase"] == "AwaitingApproval"
    assert waiting["awaiting"]["escalations"] == ["fs_write cwd://notes"]
    assert waiting["awaiting"]["spec_hash"] == new_hash
    assert waiting["spec_hash"] == old["spec_hash"] and waiting["version"] == old["version"]  # the old one serves
    assert gate.audits()[-1] == {
        "capsule": "notes",
        "escalations": ["fs_write cwd://notes"],
        "granted_by": None,
        "spec_hash": new_hash,
    }
    (gate.root / "notes" / "kept.txt").write_text("still here")
    assert await gate.call("read", {"name": "kept.txt"}) == {"name": "kept.txt", "text": "still here"}
    with pytest.raises(CapabilityDenied):  # the new grant is not in force
        await gate.call("write", {"name": "a.txt", "text": "A"})
    assert gate.orchestrator.info()["approvals"]["awaiting"] == ["notes"]

    status = await gate.orchestrator.approve("notes")
    assert status["phase"] == "Running" and status["spec_hash"] == new_hash and status["reload_count"] == 1
    assert status["awaiting"] is None and status["approved"]["escalations"] == ["fs_write cwd://notes"]
    assert gate.audits()[-1]["granted_by"] == "operator" and gate.audits()[-1]["spec_hash"] == new_hash
    assert await gate.call("write", {"name": "a.txt", "text": "A"}) == {"written": "a.txt", "bytes": 1}
    assert (gate.root / "notes" / "a.txt").read_text() == "A"
    history = await gate.orchestrator.version_history("notes")
    assert history["entries"][0]["reasons"] == ["approved by the operator: fs_write cwd://notes"]  # newest first
    with pytest.raises(NotAwaitingApproval):  # answered once
        await gate.orchestrator.approve("notes")
    assert gate.orchestrator.info()["approvals"]["awaiting"] == []


async def test_reject_keeps_the_old_version_until_the_files_change_again(watched: Gate) -> None:
    gate = watched
    old = gate.status()
    waiting = await escalate(gate)
    status = await gate.orchestrator.reject("notes")
    assert status["phase"] == "Degraded" and status["spec_hash"] == old["spec_hash"]
    assert status["awaiting"] is None
    assert status["rejected"]["spec_hash"] == waiting["awaiting"]["spec_hash"]
    assert "operator rejected" in status["last_error"] and "fs_write cwd://notes" in status["last_error"]
    rejected = gate.orchestrator.bus.history("orch.audit.rejected")
    assert [e.payload for e in rejected] == [
        {"capsule": "notes", "escalations": ["fs_write cwd://notes"], "spec_hash": waiting["awaiting"]["spec_hash"]}
    ]
    assert await gate.call("list", {}) == {"notes": []}
    with pytest.raises(CapabilityDenied):
        await gate.call("write", {"name": "a.txt", "text": "A"})

    # neither a reconcile nor a restart lets it through
    await gate.orchestrator.reconcile()
    assert assert_still_rejected(gate, old)
    assert gate.orchestrator.reconciler is not None
    restarted = await gate.orchestrator.reconciler.restart("notes")  # a fresh copy of what runs: the old version
    assert restarted["spec_hash"] == old["spec_hash"] and restarted["reload_count"] == 1
    assert restarted["phase"] == "Degraded" and "operator rejected" in restarted["last_error"]
    with pytest.raises(CapabilityDenied):
        await gate.call("write", {"name": "a.txt", "text": "A"})
    with pytest.raises(NotAwaitingApproval):  # a rejected change cannot be approved after all
        await gate.orchestrator.approve("notes")

    # the files change again: a new change, asked about anew
    manifest = gate.root / "capsules" / "notes" / "Capsule.toml"
    set_capabilities(manifest, READ_WRITE + '\nipc_publish = ["notes.*"]')
    event = await gate.wait_for(
        lambda e: e.topic == "orch.audit.escalation" and e.payload["granted_by"] is None, "a new question"
    )
    assert event.payload["escalations"] == ["fs_write cwd://notes", "ipc_publish notes.*"]
    assert gate.status()["rejected"] is None and gate.status()["phase"] == "AwaitingApproval"

    # back to what runs: nothing waits, nothing is rejected, Running again
    set_capabilities(manifest, READ_ONLY)
    await gate.wait_topic("orch.capsule.notes.running")
    assert gate.status()["awaiting"] is None and gate.status()["rejected"] is None
    assert "rejected" not in gate.status()["last_error"]  # the failed `write` call above is what shows


def assert_still_rejected(gate: Gate, old: dict[str, Any]) -> bool:
    status = gate.status()
    assert status["phase"] == "Degraded" and status["rejected"] is not None
    assert status["spec_hash"] == old["spec_hash"] and status["reload_count"] == 0
    return True


# -- the policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "phases", "granted"),
    [
        (
            None,
            {"plain": "Running", "keeper": "Running", "writer": "Running"},
            {"keeper": "policy", "writer": "policy"},
        ),
        ("{escalations: allow}", {"keeper": "Running", "writer": "Running"}, {"keeper": "policy", "writer": "policy"}),
        (
            "{escalations: ask, allow: [kv]}",
            {"plain": "Running", "keeper": "Running", "writer": "AwaitingApproval"},
            {"keeper": "policy", "writer": None},
        ),
        (
            "{escalations: ask, allow: [kv, fs_write]}",
            {"keeper": "Running", "writer": "Running"},
            {"keeper": "policy", "writer": "policy"},
        ),
        (
            "{escalations: ask}",
            {"plain": "Running", "keeper": "AwaitingApproval", "writer": "AwaitingApproval"},
            {"keeper": None, "writer": None},
        ),
    ],
)
async def test_policy_cases(
    tmp_path: Path, policy: str | None, phases: dict[str, str], granted: dict[str, str | None]
) -> None:
    """The first config in a fresh state dir is judged by its own policy; every grant of a
    start counts; a capsule without capabilities never waits and is never audited."""
    wat_capsule(tmp_path, "plain")
    wat_capsule(tmp_path, "keeper", "kv = true")
    wat_capsule(tmp_path, "writer", 'kv = true\nfs_write = ["cwd://out"]')
    gate = await started(wat_config(tmp_path, policy, "plain", "keeper", "writer"))
    try:
        for name, phase in phases.items():
            assert gate.status(name)["phase"] == phase, name
        assert gate.audits("plain") == []
        for name, by in granted.items():
            [audit] = gate.audits(name)
            assert audit["granted_by"] == by
            assert audit["spec_hash"] == gate.spec_hash(name)
        assert gate.audits("writer")[0]["escalations"] == ["fs_write cwd://out", "kv"]
        for name, phase in phases.items():
            if phase == "AwaitingApproval":  # nothing runs: calls are refused, saying why
                with pytest.raises(CapsuleNotRunning, match=f"waits for approval of .*orch approve {name}"):
                    await gate.call("version", {}, name)
                assert gate.status(name)["version"] is None
            else:
                assert await gate.call("version", {}, name) == 1
    finally:
        await gate.orchestrator.stop(2)


def test_allowed_reads_the_capability_of_each_escalation() -> None:
    ask_kv = ApprovalPolicy(escalations="ask", allow=["kv", "fs_read"])
    assert allowed(ask_kv, ("kv", "fs_read cwd://data"))
    assert allowed(ask_kv, ())
    assert not allowed(ask_kv, ("kv", "fs_write cwd://kv"))
    assert not allowed(ask_kv, ("fs_readx cwd://a",))  # a longer name is not the one allowed
    assert allowed(ApprovalPolicy(), ("net example.com", "fs_write cwd://x"))
    assert not allowed(ApprovalPolicy(escalations="ask"), ("kv",))


async def test_a_change_cannot_approve_its_own_escalations(tmp_path: Path) -> None:
    wat_capsule(tmp_path, "plain")
    wat_capsule(tmp_path, "keeper", "kv = true")
    wat_capsule(tmp_path, "later", "kv = true")
    gate = await started(wat_config(tmp_path, "{escalations: ask}", "plain"))
    try:
        assert gate.orchestrator.info()["approvals"]["policy"] == {"escalations": "ask", "allow": []}
        # one change: relax the policy, and start a capsule with kv
        wat_config(tmp_path, "{escalations: allow}", "plain", "keeper")
        await gate.orchestrator.reconcile()
        assert gate.status("keeper")["phase"] == "AwaitingApproval"
        assert [a["granted_by"] for a in gate.audits("keeper")] == [None]
        assert gate.orchestrator.info()["approvals"]["policy"]["escalations"] == "allow"  # in force from now on
        await gate.orchestrator.reconcile()  # the relaxed policy does not release what waits
        assert gate.status("keeper")["phase"] == "AwaitingApproval"
        assert [a["granted_by"] for a in gate.audits("keeper")] == [None]
        # the next change is judged by the policy now in force
        wat_config(tmp_path, "{escalations: allow}", "plain", "keeper", "later")
        await gate.orchestrator.reconcile()
        assert gate.status("later")["phase"] == "Running"
        assert [a["granted_by"] for a in gate.audits("later")] == ["policy"]
        assert gate.status("keeper")["phase"] == "AwaitingApproval"
        await gate.orchestrator.approve("keeper")
        assert gate.status("keeper")["phase"] == "Running"
    finally:
        await gate.orchestrator.stop(2)


async def test_a_tightened_policy_judges_its_own_change(tmp_path: Path) -> None:
    """The change's own policy can only make the judgement stricter: tightening takes effect
    at once, also across a restart (while the persisted policy in force is looser)."""
    wat_capsule(tmp_path, "keeper", "kv = true")
    wat_capsule(tmp_path, "later", "kv = true")
    gate = await started(wat_config(tmp_path, None, "keeper"))
    try:
        assert gate.status("keeper")["phase"] == "Running"
        wat_config(tmp_path, "{escalations: ask, allow: [fs_read]}", "keeper", "later")
        await gate.orchestrator.reconcile()
        assert gate.status("later")["phase"] == "AwaitingApproval"
        assert gate.status("keeper")["phase"] == "Running"  # what runs is not judged again
    finally:
        await gate.orchestrator.stop(2)
    wat_config(tmp_path, None, "keeper")  # back to allow, applied: allow is in force
    gate = await started(tmp_path / "config.yaml")
    await gate.orchestrator.stop(2)
    assert json.loads((tmp_path / ".orch" / APPROVALS).read_text())["policy"]["escalations"] == "allow"
    wat_config(tmp_path, "{escalations: ask}", "keeper", "later")  # tightened while it was down
    gate = await started(tmp_path / "config.yaml")
    try:
        assert gate.status("later")["phase"] == "AwaitingApproval"
        assert gate.status("keeper")["phase"] == "Running"  # what ran before the restart runs again
    finally:
        await gate.orchestrator.stop(2)


async def test_a_reload_that_grants_nothing_new_never_waits(watched: Gate) -> None:
    gate = watched
    manifest = gate.root / "capsules" / "notes" / "Capsule.toml"
    replace_atomically(manifest, manifest.read_text().replace('description = "Text notes', 'description = "Notes'))
    await gate.wait_topic("orch.capsule.notes.reloaded")
    assert gate.status()["phase"] == "Running"
    assert [a["granted_by"] for a in gate.audits()] == ["policy"]  # only the start's fs_read
    set_capabilities(manifest, "")  # dropping grants is not an escalation either
    await gate.wait_topic("orch.capsule.notes.reloaded")
    assert [a["granted_by"] for a in gate.audits()] == ["policy"]
    with pytest.raises(CapabilityDenied):
        await gate.call("list", {})


# -- restarts, removals ----------------------------------------------------------------------


async def test_restart_and_reconcile_do_not_bypass_the_gate(tmp_path: Path) -> None:
    wat_capsule(tmp_path, "keeper", "kv = true")
    gate = await started(wat_config(tmp_path, "{escalations: ask}", "keeper"))
    try:
        assert gate.status("keeper")["phase"] == "AwaitingApproval"
        finished = gate.orchestrator.bus.history("orch.reconcile.finished")[-1].payload
        assert finished["awaiting"] == ["keeper"] and finished["failing"] == []
        assert gate.orchestrator.reconciler is not None
        with pytest.raises(CapsuleNotRunning, match="waits for approval of kv"):
            await gate.orchestrator.reconciler.restart("keeper")
        await gate.orchestrator.reconcile()
        assert gate.status("keeper")["phase"] == "AwaitingApproval" and gate.status("keeper")["version"] is None
        assert len(gate.audits("keeper")) == 1  # asked once, not at every reconcile
        await gate.orchestrator.approve("keeper")
        assert await gate.call("version", {}, "keeper") == 1
    finally:
        await gate.orchestrator.stop(2)


async def test_a_capsule_removed_or_disabled_while_waiting_leaves_nothing_behind(watched: Gate) -> None:
    gate = watched
    await escalate(gate)
    assert gate.orchestrator.reconciler is not None
    restarted = await gate.orchestrator.reconciler.restart("notes")  # the old version, afresh: still waiting
    assert restarted["phase"] == "AwaitingApproval" and restarted["awaiting"] is not None
    config = gate.root / "config.yaml"
    text = config.read_text()
    replace_atomically(config, text + "    enabled: false\n")
    await gate.wait_topic("orch.capsule.notes.stopped")
    status = gate.status()
    assert status["phase"] == "Stopped" and status["awaiting"] is None
    assert gate.orchestrator.info()["approvals"]["awaiting"] == []
    with pytest.raises(NotAwaitingApproval):
        await gate.orchestrator.approve("notes")

    # enabled again: a start, where every grant counts (fs_read is allowed, fs_write is not)
    replace_atomically(config, text)
    event = await gate.wait_topic("orch.capsule.notes.awaitingapproval")
    assert event.payload["awaiting"]["escalations"] == ["fs_read cwd://notes", "fs_write cwd://notes"]
    with pytest.raises(CapsuleNotRunning, match="waits for approval"):  # nothing runs meanwhile
        await gate.call("list", {})

    # removed while waiting (nothing runs, so no event): its slot and its question go
    replace_atomically(config, "version: 1\napprovals: {escalations: ask}\ncapsules: {}\n")
    await gate.orchestrator.reconcile()
    assert gate.orchestrator.reconciler is not None and gate.orchestrator.reconciler.status() == []
    assert gate.orchestrator.info()["approvals"]["awaiting"] == []
    with pytest.raises(UnknownCapsule):
        await gate.orchestrator.approve("notes")


async def test_the_policy_in_force_and_rejections_survive_a_restart(tmp_path: Path) -> None:
    config = notes_deployment(tmp_path)
    manifest = tmp_path / "capsules" / "notes" / "Capsule.toml"
    gate = await started(config)
    set_capabilities(manifest, READ_WRITE)
    await gate.orchestrator.reconcile()
    rejected = (await gate.orchestrator.reject("notes"))["rejected"]
    await gate.orchestrator.stop(2)
    record = json.loads((tmp_path / ".orch" / APPROVALS).read_text())
    assert record["policy"] == {"escalations": "ask", "allow": ["fs_read"]}
    assert record["rejected"]["notes"]["spec_hash"] == rejected["spec_hash"]

    gate = await started(config)  # the rejected change is still on disk: still rejected
    try:
        status = gate.status()
        assert status["phase"] == "Failed" and status["rejected"]["spec_hash"] == rejected["spec_hash"]
        assert "nothing runs" in status["last_error"]  # its previous version's files are gone
        assert [a["granted_by"] for a in gate.audits()] == []
    finally:
        await gate.orchestrator.stop(2)

    # while it is down, one change relaxes the policy and escalates: judged by the policy in force
    replace_atomically(config, config.read_text().replace(ASK_BUT_READ, "{escalations: allow}"))
    set_capabilities(manifest, READ_WRITE + '\nipc_publish = ["notes.*"]')
    gate = await started(config)
    try:
        assert gate.status()["phase"] == "AwaitingApproval" and gate.status()["rejected"] is None
        assert gate.status()["awaiting"]["escalations"] == [  # nothing ran before: every grant counts
            "fs_read cwd://notes",
            "fs_write cwd://notes",
            "ipc_publish notes.*",
        ]
        assert gate.orchestrator.info()["approvals"]["policy"]["escalations"] == "allow"  # from now on
        assert json.loads((tmp_path / ".orch" / APPROVALS).read_text())["rejected"] == {}
    finally:
        await gate.orchestrator.stop(2)


async def test_a_restart_does_not_ask_again_for_what_ran(tmp_path: Path) -> None:
    config = notes_deployment(tmp_path, policy="{escalations: ask}")
    gate = await started(config)
    await gate.orchestrator.approve("notes")
    assert gate.status()["phase"] == "Running"
    await gate.orchestrator.stop(2)
    gate = await started(config)
    try:
        assert gate.status()["phase"] == "Running"
        assert gate.audits() == []  # nothing new was granted: what ran before runs again
        assert await gate.call("list", {}) == {"notes": []}
    finally:
        await gate.orchestrator.stop(2)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[]",
        b'{"version": 2}',
        b'{"version": 1}',
        b'{"version": 1, "policy": {"escalations": "never"}}',
        b'{"version": 1, "policy": {"escalations": "allow"}, "rejected": {"notes": {"spec_hash": "x"}}}',
        b'{"version": 1, "policy": {"escalations": "allow"}, "rejected": 7}',
        b"\xff\xfe" * 40,
        b"[" * 100_000,
        b'{"version": 1, "pad": "' + b"x" * (5 << 20) + b'"}',  # over the 4 MiB a record may take
        None,  # a folder where the record should be
    ],
    ids=lambda content: "folder" if content is None else repr(content[:24]),
)
async def test_an_unreadable_approvals_record_asks_for_everything(tmp_path: Path, content: bytes | None) -> None:
    config = notes_deployment(tmp_path, policy=None)  # the default policy: allow
    state = tmp_path / ".orch"
    state.mkdir(mode=0o700)
    if content is None:
        (state / APPROVALS).mkdir()
    else:
        (state / APPROVALS).write_bytes(content)
    gate = await started(config)
    try:
        assert gate.status()["phase"] == "AwaitingApproval"
        assert gate.orchestrator.info()["approvals"]["policy"] == {"escalations": "allow", "allow": []}  # adopted
        if content is not None:  # rewritten, private
            assert json.loads((state / APPROVALS).read_text())["policy"]["escalations"] == "allow"
            assert (state / APPROVALS).stat().st_mode & 0o777 == 0o600
    finally:
        await gate.orchestrator.stop(2)


def test_a_recorded_rejection_is_read_strictly() -> None:
    good = {"spec_hash": "a" * 64, "escalations": ["kv"], "at_ms": 5}
    assert Rejection.from_dict(good) == Rejection("a" * 64, ("kv",), 5)
    for bad in (
        None,
        [],
        {**good, "extra": 1},
        {**good, "spec_hash": "A" * 64},
        {**good, "spec_hash": "a" * 63},
        {**good, "escalations": "kv"},
        {**good, "escalations": [1]},
        {**good, "at_ms": True},
        {**good, "at_ms": 1.5},
    ):
        with pytest.raises(ValueError):
            Rejection.from_dict(bad)


async def test_approve_names_the_change_it_answers(tmp_path: Path) -> None:
    wat_capsule(tmp_path, "keeper", "kv = true")
    gate = await started(wat_config(tmp_path, "{escalations: ask}", "keeper"))
    try:
        spec_hash = gate.spec_hash("keeper")
        with pytest.raises(NotAwaitingApproval, match="its files changed since you looked"):
            await gate.orchestrator.approve("keeper", "0" * 12)
        assert gate.status("keeper")["phase"] == "AwaitingApproval"
        with pytest.raises(NotAwaitingApproval):
            await gate.orchestrator.reject("keeper", "f" * 64)
        status = await gate.orchestrator.approve("keeper", spec_hash[:8])
        assert status["phase"] == "Running"
    finally:
        await gate.orchestrator.stop(2)


async def test_an_approved_start_that_fails_retries_without_asking_again(tmp_path: Path) -> None:
    wat_capsule(tmp_path, "keeper", "kv = true")
    (tmp_path / "caps" / "keeper" / "v.wat").write_text("(module)")  # no export for its tool: fails to load
    gate = await started(wat_config(tmp_path, "{escalations: ask}", "keeper"))
    try:
        status = await gate.orchestrator.approve("keeper")
        assert status["phase"] == "Failed" and status["next_retry_ms"] is not None
        await gate.orchestrator.reconcile()
        assert [a["granted_by"] for a in gate.audits("keeper")] == [None, "operator"]
        replace_atomically(tmp_path / "caps" / "keeper" / "v.wat", module(1))  # a new spec: judged again
        await gate.orchestrator.reconcile()
        assert gate.status("keeper")["phase"] == "AwaitingApproval"
    finally:
        await gate.orchestrator.stop(2)


# -- config.yaml -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("approvals: {escalations: deny}", "approvals.escalations", "'allow' or 'ask'"),
        ("approvals: {escalations: ASK}", "approvals.escalations", "'allow' or 'ask'"),
        ("approvals: {escalations: true}", "approvals.escalations", "'allow' or 'ask'"),
        ("approvals: {escalation: ask}", "approvals.escalation", "did you mean 'escalations'"),
        ("approvals: {allow: [kv]}", "approvals", "add `escalations: ask`"),
        ("approvals: {escalations: ask, allow: [kv, kv]}", "approvals", "kv more than once"),
        ("approvals: {escalations: ask, allow: [disk]}", "approvals.allow.0", "'kv', 'fs_read'"),
        ("approvals: {escalations: ask, allow: ['fs_write cwd://x']}", "approvals.allow.0", "'kv', 'fs_read'"),
        ("approvals: {escalations: ask, allow: kv}", "approvals.allow", "valid list"),
        ("approvals: {escalations: ask, allow: [{kv: 1}]}", "approvals.allow.0", "'kv', 'fs_read'"),
        ("approvals: [ask]", "approvals", "expected a mapping with keys escalations, allow"),
        ("approvals: ask", "approvals", "expected a mapping"),
        ("approvals: {escalations: ask, allow: [" + ", ".join(["kv"] * 7) + "]}", "approvals.allow", "at most 6"),
        ('approvals: {escalations: "ask\\u202e"}', "approvals.escalations", "'allow' or 'ask'"),
    ],
)
def test_malformed_policies_are_problems_naming_the_field_and_line(
    tmp_path: Path, text: str, field: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"version: 1\n{text}\n", path=tmp_path / "config.yaml")
    [problem] = caught.value.problems
    assert (problem.field, problem.line) == (field, 2), str(problem)
    assert fragment in problem.message, problem.message
    assert len(str(problem)) < 400


def test_policies_read_as_written(tmp_path: Path) -> None:
    def policy(text: str) -> ApprovalPolicy:
        return parse_config(f"version: 1\n{text}", path=tmp_path / "config.yaml").model.approvals

    assert policy("") == ApprovalPolicy(escalations="allow", allow=[])
    assert policy("approvals:\n") == ApprovalPolicy()
    assert policy("approvals: {escalations: ask}\n").escalations == "ask"
    assert policy("approvals: {escalations: ask, allow: [net, ipc_subscribe]}\n").allow == ["net", "ipc_subscribe"]
    assert policy("approvals: {escalations: ask, allow: []}\n").allow == []


async def test_gate_verdicts_are_sticky_per_spec_hash(tmp_path: Path) -> None:
    """The gate alone, on real specs: the same change is asked about once, whatever the
    policy later; a different change replaces the question; settle forgets removed ones."""
    from orchestrator.capsule.bus import EventBus
    from orchestrator.desired.load import load_desired

    wat_capsule(tmp_path, "keeper", "kv = true")
    wat_capsule(tmp_path, "other", 'kv = true\nnet = ["example.com"]')
    specs = load_desired(wat_config(tmp_path, None, "keeper", "other")).specs
    bus = EventBus()
    try:
        gate = ApprovalGate(bus=bus, policy=ApprovalPolicy(escalations="ask"), wall_ms=lambda: 7)
        first = gate.judge("keeper", specs["keeper"], None)
        assert not first.go and first.pending is not None and first.pending.since_ms == 7
        gate.adopt(ApprovalPolicy())
        assert gate.judge("keeper", specs["keeper"], None) == first  # still waiting, asked once
        assert len(bus.history("orch.audit.escalation")) == 1
        other = gate.judge("keeper", specs["other"], None)  # the desired spec changed: a new question...
        assert other.go  # ...judged by the policy now in force
        assert bus.history("orch.audit.escalation")[-1].payload["escalations"] == ["kv", "net example.com"]
        assert gate.settle({}, keep=set()) == set()
        assert gate.info()["awaiting"] == []
    finally:
        bus.close()
