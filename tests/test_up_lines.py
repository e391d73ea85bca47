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
