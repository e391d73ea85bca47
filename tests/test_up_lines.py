"""`orch up`'s text lines for events (orchestrator.cli.up.describe): the escalation gate's
phase and audit events read as sentences that say what to do, and hostile payloads never
break the printer."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.capsule.bus import Event
from orchestrator.cli.up import describe


def line(topic: str, payload: Any) -> str:
    return describe(Event(topic, payload, "orchestrator", 1, 1_700_000_000_000)).split(" ", 1)[1]


def test_a_change_awaiting_approval_says_what_it_grants_and_what_to_do() -> None:
    said = line(
        "orch.capsule.notes.awaitingapproval",
        {"phase": "AwaitingApproval", "awaiting": {"spec_hash": "ab" * 32, "escalations": ["fs_write cwd://out"]}},
    )
    assert said.startswith("notes ") and "awaiting approval: it would grant fs_write cwd://out" in said
    assert "`orch approve notes` or `orch reject notes`" in said


def test_audit_events_name_the_capsule_the_grant_and_who_granted_it() -> None:
    policy = line("orch.audit.escalation", {"capsule": "notes", "escalations": ["kv"], "granted_by": "policy"})
    assert policy.split() == ["notes", "granted", "kv", "(by", "the", "policy)"]
    operator = line(
        "orch.audit.escalation", {"capsule": "notes", "escalations": ["net a.example"], "granted_by": "operator"}
    )
    assert "granted net a.example (by the operator)" in operator
    waiting = line("orch.audit.escalation", {"capsule": "notes", "escalations": ["kv"], "granted_by": None})
    assert "asks for kv" in waiting
    rejected = line("orch.audit.rejected", {"capsule": "notes", "escalations": ["kv"], "spec_hash": "ab"})
    assert "rejected: kv (by the operator)" in rejected


def test_a_reconcile_lists_what_awaits_approval() -> None:
    said = line("orch.reconcile.finished", {"actions": [], "failing": ["a"], "awaiting": ["notes", "b"]})
    assert "failing: a; awaiting approval: notes, b" in said
    assert "all healthy" in line("orch.reconcile.finished", {"actions": [], "failing": [], "awaiting": []})


@pytest.mark.parametrize(
    "payload",
    [{}, {"awaiting": "x"}, {"awaiting": {"escalations": None}}, {"escalations": 3}, {"capsule": None}, []],
)
@pytest.mark.parametrize(
    "topic", ["orch.capsule.notes.awaitingapproval", "orch.audit.escalation", "orch.audit.rejected"]
)
def test_odd_payloads_still_print_a_line(topic: str, payload: Any) -> None:
    assert "\n" not in line(topic, payload)


# ---- orch status and orch describe: pins and changes awaiting approval ------------------


def test_describe_shows_a_pin_and_a_change_awaiting_approval() -> None:
    from orchestrator.cli.describe import describe
    from orchestrator.cli.output import Style

    status = {
        "phase": "AwaitingApproval",
        "pinned": {"version": "3fa1c2d4e5f6", "spec_hash": "ab" * 32, "since_ms": 1_000},
        "awaiting": {"spec_hash": "cd" * 32, "escalations": ["fs_write cwd://out", "kv"], "since_ms": 2_000},
    }
    text = describe("notes", {"status": status}, style=Style(False), now_ms=5_000)
    pinned = next(line for line in text.splitlines() if line.startswith("Pinned:"))
    assert "version 3fa1c2d4e5f6 by a rollback" in pinned and "`orch unpin notes`" in pinned
    awaiting = next(line for line in text.splitlines() if line.startswith("Awaiting:"))
    assert "approval of cdcdcdcdcdcd, which would grant fs_write cwd://out, kv" in awaiting
    assert "`orch approve notes` or `orch reject notes`" in awaiting
    for odd in ({"pinned": 3, "awaiting": "x"}, {"pinned": {"since_ms": "soon"}, "awaiting": {"escalations": 5}}):
        assert describe("notes", {"status": odd}, style=Style(True), now_ms=5_000)  # type: ignore[arg-type]


def test_status_marks_a_pinned_version_and_what_a_waiting_change_would_grant(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from orchestrator.cli.output import Colors
    from orchestrator.cli.remote import _status

    row = {"instances": 1, "calls": 0, "errors": 0, "fuel_mean": 0, "last_error": None}
    answer = {
        "orchestrator": {"config_path": "config.yaml", "config_sha256": "00", "uptime_s": 1},
        "capsules": [
            {**row, "name": "a", "phase": "Running", "version": "3fa1c2d4e5f6", "pinned": {"version": "3fa1c2d4e5f6"}},
            {**row, "name": "b", "phase": "AwaitingApproval", "version": "9", "awaiting": {"escalations": ["kv"]}},
            {**row, "name": "c", "phase": "Failed", "version": None, "last_error": "boom", "awaiting": "odd"},
        ],
    }

    class Answers:  # the one method `_status` calls, answering as the control API does
        def status(self) -> dict[str, object]:
            return answer

    args = argparse.Namespace(json=False, colors=Colors())
    assert _status(args, Answers()) == 0  # type: ignore[arg-type]
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "3fa1c2d4e5f6 (pinned)" in lines["a"]
    assert "awaits `orch approve b`: would grant kv" in lines["b"]
    assert lines["c"].endswith("boom")
