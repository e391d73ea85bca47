"""The escalation gate of a lattice: judging a new desired revision against what runs.

Every revision published to the desired bucket (`orch apply`, a git follower, `orch
approve|reject|rollback|unpin`) is drafted, then settled here against the revision it
replaces, deployment by deployment, before it is put (orchestrator.lattice.desiredstate
`commit_revision`). What a deployment would run next (its pin while the pin holds, else its
desired version) is compared with what the lattice runs for it now (`Deployment.runs()` of
the current revision; nothing for a deployment that is new, disabled or waits to start):

- the same version: it runs; nothing to judge;
- a version the operator grants (`orch approve` of this spec hash, or a rollback's pin): it
  runs; its escalations are audited `granted_by: "operator"`;
- the desired version that was rejected, or that already waits: it keeps being held;
- otherwise its escalations (orchestrator.control.approvals.escalations_of: what it grants
  beyond what runs; every grant for a start): none, it runs; all allowed by the policy in
  force *and* the new config's own (a revision cannot approve its own escalations), it runs,
  audited `granted_by: "policy"`; else it waits: the new revision keeps what runs as `held`
  and marks the desired version `awaiting` (audited `granted_by: null`).

A pin holds while the deployment is enabled and its desired spec hash is the one the pin
was made against (orchestrator.desired.pins: a change ends it). `replaced` lists the
deployments whose running version changes, with the version that stops: the caller
snapshots their KV data first (orchestrator.lattice.snapshots).

Pure: values in, values out (the clock is passed in). Used by .desiredstate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..control.approvals import ESCALATION_TOPIC, allowed, escalations_of
from ..desired.config import ApprovalPolicy
from .overrides import Awaiting, Deployment, Version


@dataclass(frozen=True)
class Audit:
    """An audit event to publish on the lattice bus once the revision is in."""

    topic: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Replaced:
    """Deployment `name` stops running `version` in the new revision."""

    name: str
    version: Version


@dataclass
class Settled:
    deployments: dict[str, Deployment]
    audits: list[Audit] = field(default_factory=list)
    replaced: list[Replaced] = field(default_factory=list)


def settle(
    draft: Mapping[str, Deployment],
    before: Mapping[str, Deployment] | None,
    *,
    policy: ApprovalPolicy,
    proposed: ApprovalPolicy | None = None,
    granted: Mapping[str, str] | None = None,
    now_ms: int,
) -> Settled:
    """The drafted deployments, judged against `before` (the current revision's; None for
    the first revision) under `policy` (in force) and `proposed` (the new config's, which
    may only tighten). `granted`: deployment -> the spec hash the operator grants."""
    settled = Settled({})
    for name, deployment in draft.items():
        old = before.get(name) if before is not None else None
        running = old.runs() if old is not None and old.spec.enabled else None
        result, audit = _one(name, deployment, running, policy, proposed, (granted or {}).get(name), now_ms)
        settled.deployments[name] = result
        if audit is not None:
            settled.audits.append(audit)
        after = result.runs() if result.spec.enabled else None
        if running is not None and after is not None and after.spec.spec_hash != running.spec.spec_hash:
            settled.replaced.append(Replaced(name, running))
    return settled


def holds(deployment: Deployment) -> bool:
    """Whether the deployment's pin still holds against its desired spec."""
    pin = deployment.pinned
    return pin is not None and deployment.spec.enabled and pin.desired_hash == deployment.spec.spec_hash


def _one(  # noqa: PLR0917  (a private helper of settle)
    name: str,
    draft: Deployment,
    running: Version | None,
    policy: ApprovalPolicy,
    proposed: ApprovalPolicy | None,
    granted: str | None,
    now_ms: int,
) -> tuple[Deployment, Audit | None]:
    base = draft.replace(held=None, awaiting=None, rejected=None, pinned=draft.pinned if holds(draft) else None)
    if not draft.spec.enabled:
        return base, None
    candidate: Version = base.pinned.version if base.pinned is not None else base
    digest = candidate.spec.spec_hash
    if running is not None and running.spec.spec_hash == digest:
        return base, None
    escalations = escalations_of(candidate.spec, running.spec if running is not None else None)
    if base.pinned is not None or granted == digest:
        return base, _audit(name, digest, escalations, "operator")
    if draft.rejected is not None and draft.rejected.spec_hash == digest:
        return base.replace(held=running, rejected=draft.rejected), None
    if draft.awaiting is not None and draft.awaiting.spec_hash == digest:
        return base.replace(held=running, awaiting=draft.awaiting), None
    if not escalations:
        return base, None
    if allowed(policy, escalations) and (proposed is None or allowed(proposed, escalations)):
        return base, _audit(name, digest, escalations, "policy")
    waiting = Awaiting(digest, escalations, now_ms)
    return base.replace(held=running, awaiting=waiting), _audit(name, digest, escalations, None)


def _audit(name: str, digest: str, escalations: tuple[str, ...], granted_by: str | None) -> Audit | None:
    if not escalations:
        return None
    payload = {"capsule": name, "escalations": list(escalations), "granted_by": granted_by, "spec_hash": digest}
    return Audit(ESCALATION_TOPIC, payload)
