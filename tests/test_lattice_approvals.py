"""Escalation approvals on a lattice (orchestrator.lattice.judge, .answers, .overrides): real
nats-server, real `orch host` processes, real `orch apply|approve|reject|status|events`.

A revision that grants a capsule more than it runs with waits while the old version keeps
serving on every host; `orch approve` serves it, `orch reject` keeps it refused through
applies of the same spec until a different one; the policy that judges a revision is the
one in force before it; audit events reach the lattice bus; GitOps fields of a stored
revision that this code did not write are refused with one line, and hosts keep running.
Waits poll the lattice's status or its bus; nothing sleeps and asserts.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.desired.config import ApprovalPolicy
from orchestrator.desired.load import load_desired
from orchestrator.lattice.artifacts import LatticeDataError
from orchestrator.lattice.connection import Lattice, LatticeAddress
from orchestrator.lattice.desiredstate import DesiredDoc, current, desired_bucket, document, manifest_texts
from orchestrator.lattice.judge import settle
from orchestrator.lattice.overrides import Rejected, parse_deployment
from tests.latticehosts import Hosts, call, capsule, live, module, ok, orch, wait_status, write_capsule, write_config

ASK = "approvals: {escalations: ask}"


async def answers_everywhere(urls: str, name: str, hosts: set[str], *, calls: int = 200) -> set[bytes]:
    """Call until every host in `hosts` has answered once: the set of outputs seen."""
    outputs: set[bytes] = set()
    seen: set[str] = set()
    for _ in range(calls):
        output, host = await call(urls, name)
        outputs.add(output)
        seen.add(host)
        if seen == hosts:
            return outputs
    raise AssertionError(f"only {seen} of {hosts} answered {calls} calls")


def audits(urls: str) -> list[dict[str, Any]]:
    done = orch("events", "--lattice", urls, "--topic", "orch.audit.>", "--history", "100", "--json")
    return [json.loads(line)["payload"] | {"topic": json.loads(line)["topic"]} for line in ok(done).splitlines()]


async def test_an_escalating_revision_waits_while_every_host_serves_the_old_one_until_approved(
    tmp_path: Path, hosts: Hosts
) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver", "hosts": 2}}, extra=ASK)
    hosts.start("a")
    hosts.start("b")
    await wait_status(hosts.urls, lambda s: live(s) == {"a", "b"}, "two hosts", hosts=hosts)
    ok(orch("apply", str(config), "--lattice", hosts.urls))
    await wait_status(hosts.urls, lambda s: capsule(s, "ver")["phase"] == "Running", "ver running", hosts=hosts)

    write_capsule(tmp_path / "ver", 2, 'kv = true\nipc_publish = ["ver.*"]')
    applied = ok(orch("apply", str(config), "--lattice", hosts.urls))
    assert "ver: awaits `orch approve ver" in applied and "would grant ipc_publish ver.*, kv" in applied
    status = await wait_status(
        hosts.urls, lambda s: capsule(s, "ver")["phase"] == "AwaitingApproval", "ver awaiting", hosts=hosts
    )
    row = capsule(status, "ver")
    assert row["awaiting"]["escalations"] == ["ipc_publish ver.*", "kv"]
    assert row["hosts"] == ["a", "b"] and row["version"] != row["desired_version"]
    assert await answers_everywhere(hosts.urls, "ver", {"a", "b"}) == {b"1"}
    shown = ok(orch("status", "--lattice", hosts.urls))
    assert "AwaitingApproval" in shown and "awaits `orch approve ver`" in shown

    wrong = orch("approve", "ver", "--lattice", hosts.urls, "--spec-hash", "0" * 12)
    assert wrong.returncode == 1 and "not of '000000000000'" in wrong.stderr
    approved = ok(orch("approve", "ver", "--lattice", hosts.urls, "--spec-hash", row["awaiting"]["spec_hash"][:12]))
    assert "approved change" in approved and "running version" in approved
    assert await answers_everywhere(hosts.urls, "ver", {"a", "b"}) == {b"2"}
    again = orch("approve", "ver", "--lattice", hosts.urls)
    assert again.returncode == 1 and "is not awaiting approval" in again.stderr

    seen = [a for a in audits(hosts.urls) if a["topic"] == "orch.audit.escalation"]
    assert [a["granted_by"] for a in seen] == [None, "operator"]
    assert {a["spec_hash"] for a in seen} == {row["awaiting"]["spec_hash"]}
    history = json.loads(ok(orch("history", "ver", "--lattice", hosts.urls, "--json")))
    assert [e["event"] for e in history["entries"]] == ["approve", "apply"]


async def test_reject_holds_through_an_apply_of_the_same_spec_and_a_different_change_is_judged_again(
    tmp_path: Path, hosts: Hosts
) -> None:
    write_capsule(tmp_path / "ver", 1)
    write_capsule(tmp_path / "other", 5)
    config = write_config(tmp_path, {"ver": {"path": "ver"}, "other": {"path": "other"}}, extra=ASK)
    hosts.start("a")
    await wait_status(hosts.urls, lambda s: live(s) == {"a"}, "a host", hosts=hosts)
    ok(orch("apply", str(config), "--lattice", hosts.urls))
    await wait_status(hosts.urls, lambda s: capsule(s, "ver")["phase"] == "Running", "ver running", hosts=hosts)

    write_capsule(tmp_path / "ver", 2, "kv = true")
    ok(orch("apply", str(config), "--lattice", hosts.urls))
    rejected = ok(orch("reject", "ver", "--lattice", hosts.urls))
    assert "which would grant kv" in rejected and "keeps serving" in rejected
    status = await wait_status(hosts.urls, lambda s: capsule(s, "ver")["rejected"] is not None, "rejected")
    row = capsule(status, "ver")
    assert row["phase"] == "Degraded" and "was rejected" in row["message"] and "propose another" in row["message"]
    assert (await call(hosts.urls, "ver"))[0] == b"1"

    (tmp_path / "other" / "v.wat").write_text(module(6))  # another deployment changes: a new revision
    ok(orch("apply", str(config), "--lattice", hosts.urls))
    await wait_status(
        hosts.urls,
        lambda s: (
            capsule(s, "other")["phase"] == "Running"
            and capsule(s, "other")["version"] == capsule(s, "other")["desired_version"]
        ),
        "other reloaded",
    )
    doc = await _current(hosts.urls)
    assert doc.event == "apply" and doc.deployments["ver"].rejected is not None
    assert (await call(hosts.urls, "ver"))[0] == b"1" and (await call(hosts.urls, "other"))[0] == b"6"
    refused = orch("approve", "ver", "--lattice", hosts.urls)
    assert refused.returncode == 1 and "was rejected; change its files or config" in refused.stderr

    write_capsule(tmp_path / "ver", 3, "kv = true")  # a different change: judged again
    ok(orch("apply", str(config), "--lattice", hosts.urls))
    status = await wait_status(hosts.urls, lambda s: capsule(s, "ver")["phase"] == "AwaitingApproval", "awaiting")
    assert capsule(status, "ver")["rejected"] is None
    ok(orch("approve", "ver", "--lattice", hosts.urls))
    assert (await call(hosts.urls, "ver"))[0] == b"3"
    topics = [(a["topic"], a.get("granted_by")) for a in audits(hosts.urls)]
    assert topics == [
        ("orch.audit.escalation", None),
        ("orch.audit.rejected", None),
        ("orch.audit.escalation", None),
        ("orch.audit.escalation", "operator"),
    ]


async def test_a_revision_cannot_approve_its_own_escalation(tmp_path: Path, hosts: Hosts) -> None:
    write_capsule(tmp_path / "ver", 1, "kv = true")
    write_capsule(tmp_path / "plain", 4)
    deployments = {"ver": {"path": "ver"}, "plain": {"path": "plain"}}
    config = write_config(tmp_path, deployments, extra=ASK)
    hosts.start("a")
    await wait_status(hosts.urls, lambda s: live(s) == {"a"}, "a host", hosts=hosts)
    ok(orch("apply", str(config), "--lattice", hosts.urls))  # the first revision: judged by its own policy
    status = await wait_status(
        hosts.urls, lambda s: capsule(s, "plain")["phase"] == "Running" and capsule(s, "ver")["awaiting"], "first"
    )
    assert capsule(status, "ver")["phase"] == "AwaitingApproval" and capsule(status, "ver")["hosts"] == []
    refused = orch("call", "ver", "version", "--lattice", hosts.urls)
    assert refused.returncode == 1 and "its start awaits `orch approve ver`" in refused.stderr
    ok(orch("approve", "ver", "--lattice", hosts.urls))

    write_capsule(tmp_path / "ver", 2, 'kv = true\nfs_read = ["cwd://data"]')
    config = write_config(tmp_path, deployments, extra="approvals: {escalations: allow}")
    ok(orch("apply", str(config), "--lattice", hosts.urls))  # relaxes the policy and escalates at once: waits
    status = await wait_status(hosts.urls, lambda s: capsule(s, "ver")["awaiting"] is not None, "waits")
    assert capsule(status, "ver")["awaiting"]["escalations"] == ["fs_read cwd://data"]
    assert (await call(hosts.urls, "ver"))[0] == b"1"

    write_capsule(tmp_path / "ver", 3, 'kv = true\nfs_read = ["cwd://data"]\nipc_publish = ["x.*"]')
    ok(orch("apply", str(config), "--lattice", hosts.urls))  # the relaxed policy is in force now
    await wait_status(hosts.urls, lambda s: capsule(s, "ver")["phase"] == "Running", "ver 3 running", hosts=hosts)
    assert (await call(hosts.urls, "ver"))[0] == b"3"
    granted = [a["granted_by"] for a in audits(hosts.urls) if a["topic"] == "orch.audit.escalation"]
    assert granted == [None, "operator", None, "policy"]


async def test_hostile_gitops_fields_in_a_stored_revision_are_refused_and_hosts_keep_running(
    tmp_path: Path, hosts: Hosts
) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver"}}, extra=ASK)
    hosts.start("a")
    await wait_status(hosts.urls, lambda s: live(s) == {"a"}, "a host", hosts=hosts)
    ok(orch("apply", str(config), "--lattice", hosts.urls))
    await wait_status(hosts.urls, lambda s: capsule(s, "ver")["phase"] == "Running", "ver running", hosts=hosts)
    lattice = await Lattice.connect(LatticeAddress.parse(hosts.urls))
    try:
        bucket = await desired_bucket(lattice)
        good = json.loads((await bucket.get("config")).value or b"")
        hostile = json.loads(json.dumps(good))
        hostile["deployments"]["ver"]["held"] = None  # a hold without anything awaiting: would stop it
        await bucket.put("config", json.dumps(hostile).encode())
        status = await wait_status(hosts.urls, lambda s: any("held comes with" in p for p in s["problems"]), "refused")
        problem = next(p for p in status["problems"] if "held comes with" in p)
        assert "\n" not in problem and "is not a desired state: deployment 'ver'" in problem
        assert capsule(status, "ver")["phase"] == "Running" and (await call(hosts.urls, "ver"))[0] == b"1"
        for verb in ("approve", "reject", "unpin", "rollback"):
            done = orch(verb, "ver", "--lattice", hosts.urls)
            assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, (verb, done.stderr)
        assert (await call(hosts.urls, "ver"))[0] == b"1"
    finally:
        await lattice.close()


async def _current(urls: str) -> DesiredDoc:
    lattice = await Lattice.connect(LatticeAddress.parse(urls))
    try:
        doc = await current(lattice)
        assert doc is not None
        return doc
    finally:
        await lattice.close()


# -- the stored fields, and the judgement, without a lattice -------------------------------------
def stored_document(root: Path) -> dict[str, Any]:
    write_capsule(root / "one", 1)
    write_capsule(root / "two", 2, "kv = true")
    desired = load_desired(write_config(root, {"ver": {"path": "one"}, "new": {"path": "two"}}))
    doc = document(desired, manifest_texts(desired), now_ms=1)
    two = load_desired(write_config(root / "b", {"ver": {"path": "../two"}}))
    doc["deployments"]["ver"] = {**document(two, manifest_texts(two), now_ms=1)["deployments"]["ver"]}
    return doc


def hostile_fields(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    ver = doc["deployments"]["ver"]
    old = doc["deployments"]["new"]
    held = {k: old[k] for k in ("record", "secrets", "wasm", "manifest")}
    digest = ver["record"]["spec_hash"]
    waits = {"spec_hash": digest, "escalations": ["kv"], "since_ms": 1}
    pin = {**held, "desired_hash": digest, "since_ms": 1, "revision": 1}
    return [
        ("held alone", {"held": None}),
        ("awaiting alone", {"awaiting": waits}),
        ("another deployment held", {"held": held, "awaiting": waits}),
        ("awaiting another spec", {"held": None, "awaiting": {**waits, "spec_hash": "f" * 64}}),
        ("awaiting and rejected", {"held": None, "awaiting": waits, "rejected": {**waits, "at_ms": 1}}),
        ("escalations not text", {"held": None, "awaiting": {**waits, "escalations": [1]}}),
        ("escalations huge", {"held": None, "awaiting": {**waits, "escalations": ["kv"] * 5000}}),
        ("since negative", {"held": None, "awaiting": {**waits, "since_ms": -1}}),
        ("pin of another deployment", {"pinned": pin}),
        ("paused not a flag", {"paused": "yes"}),
        ("paused without a restore", {"paused": True}),
        ("restoring unpaused", {"restoring": {"snapshot": "s", "spec_hash": digest, "revision": 1, "since_ms": 1}}),
        ("snapshot malformed", {"snapshot": {"spec_hash": digest}}),
        ("an unknown field", {"approved": True}),
    ]


def test_malformed_gitops_fields_are_refused_with_one_line(tmp_path: Path) -> None:
    doc = stored_document(tmp_path)
    DesiredDoc.parse(json.dumps(doc).encode(), revision=2, where="w")
    for what, fields in hostile_fields(doc):
        bad = json.loads(json.dumps(doc))
        bad["deployments"]["ver"].update(fields)
        with pytest.raises(LatticeDataError, match=r"w \(revision 2\) is not a desired state: deployment 'ver'") as no:
            DesiredDoc.parse(json.dumps(bad).encode(), revision=2, where="w")
        assert "\n" not in str(no.value), what
    for top in ({"approvals": {"escalations": "never"}}, {"history": {"snapshots": -1}}, {"event": "delete"}):
        with pytest.raises(LatticeDataError, match="is not a desired state"):
            DesiredDoc.parse(json.dumps(doc | top).encode(), revision=2, where="w")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=JSON,
    field=st.sampled_from(["held", "awaiting", "rejected", "pinned", "paused", "restoring", "snapshot", "approvals"]),
)
def test_any_json_in_a_gitops_field_is_refused_or_read_never_a_crash(tmp_path: Path, value: Any, field: str) -> None:
    path = tmp_path / "doc.json"
    if not path.exists():
        path.write_text(json.dumps(stored_document(tmp_path)))
    doc = json.loads(path.read_text())
    if field == "approvals":
        doc["approvals"] = value
    else:
        doc["deployments"]["ver"][field] = value
    with contextlib.suppress(LatticeDataError):
        DesiredDoc.parse(json.dumps(doc).encode(), revision=1, where="w")


def test_the_judgement_policy_in_force_proposed_rejection_and_grant(tmp_path: Path) -> None:
    doc = stored_document(tmp_path)
    write_capsule(tmp_path / "plain", 1)
    plain_state = load_desired(write_config(tmp_path / "p", {"ver": {"path": "../plain"}}))
    plain = parse_deployment("ver", document(plain_state, manifest_texts(plain_state), now_ms=1)["deployments"]["ver"])
    kv = parse_deployment("ver", doc["deployments"]["ver"])
    ask, allow = ApprovalPolicy(escalations="ask"), ApprovalPolicy()
    waits = settle({"ver": kv}, {"ver": plain}, policy=ask, now_ms=7)
    assert waits.deployments["ver"].awaiting is not None and waits.deployments["ver"].runs() == plain.as_version()
    assert [a.payload["granted_by"] for a in waits.audits] == [None] and waits.replaced == []
    tightened = settle({"ver": kv}, {"ver": plain}, policy=allow, proposed=ask, now_ms=7)
    assert tightened.deployments["ver"].awaiting is not None  # the new config's own policy tightens at once
    passes = settle({"ver": kv}, {"ver": plain}, policy=allow, now_ms=7)
    assert passes.deployments["ver"].runs() == kv.as_version()
    assert [a.payload["granted_by"] for a in passes.audits] == ["policy"]
    assert [r.version.spec.spec_hash for r in passes.replaced] == [plain.spec.spec_hash]
    held = waits.deployments["ver"]
    again = settle({"ver": held}, {"ver": held}, policy=allow, now_ms=9)  # relaxed later: it keeps waiting
    assert again.deployments["ver"].awaiting == held.awaiting and again.audits == []
    refused = held.replace(awaiting=None, rejected=Rejected(kv.spec.spec_hash, ("kv",), 8))
    kept = settle({"ver": refused}, {"ver": held}, policy=allow, now_ms=9)
    assert kept.deployments["ver"].rejected is not None and kept.deployments["ver"].runs() == plain.as_version()
    granted = settle({"ver": kv}, {"ver": held}, policy=ask, granted={"ver": kv.spec.spec_hash}, now_ms=9)
    assert granted.deployments["ver"].awaiting is None
    assert [a.payload["granted_by"] for a in granted.audits] == ["operator"]
    first = settle({"ver": kv}, None, policy=ask, now_ms=1)  # a start: every grant counts
    assert first.deployments["ver"].runs() is None and first.deployments["ver"].awaiting is not None
