"""The operator's answers to the lattice's escalation gate: `orch approve|reject NAME --lattice`.

A change that waits for approval is recorded in the desired revision (the deployment's
`awaiting`, with the version that keeps running `held`: orchestrator.lattice.judge).
`approve` publishes a new revision without the hold, granting that very spec hash
(compare-and-set on the revision read: a change that moved meanwhile is not approved in
its place), announces `orch.audit.escalation` `granted_by: "operator"`, then waits until
the lattice serves it (or a host reports that it failed to load, or APPROVE_SECONDS pass).
`reject` publishes a revision marking it `rejected` (the held version keeps running; the
change stays rejected through later applies of the same spec, until the deployment's
desired spec changes) and announces `orch.audit.rejected`. `spec_hash` (a prefix of at
least 6 hex digits) answers only if that is still the change waiting.

Each returns the capsule's lattice status row (orchestrator.lattice.status) with
`last_error` and what was `approved` or `rejected`: the shapes of the control API's
answers, so the CLI prints both the same way. Errors: UnknownCapsule, NotAwaitingApproval.

`capsule_row` and `wait_until` (status, polled) are shared with orchestrator.lattice.rollback.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

from ..control.approvals import REJECTED_TOPIC, NotAwaitingApproval
from ..errors import GateError, UnknownCapsule
from .connection import Lattice
from .desiredstate import Deployment, DesiredDoc, Draft, commit_revision
from .judge import Audit
from .overrides import Awaiting, Rejected
from .status import read_reports, status_of

APPROVE_SECONDS = 60.0
POLL_SECONDS = 0.1
CHANGE = re.compile(r"[0-9a-f]{6,64}")  # the change an answer is about: its spec hash, or a prefix


def deployment_of(doc: DesiredDoc | None, name: str) -> Deployment:
    """`name`'s deployment in `doc`. UnknownCapsule when there is none."""
    deployment = doc.deployments.get(name) if doc is not None else None
    if deployment is None or doc is None:
        known = ", ".join(sorted(doc.deployments)) if doc is not None else "none"
        raise UnknownCapsule(f"no capsule {name!r} in the lattice's desired state (deployed: {known or 'none'})")
    return deployment


def _check_prefix(spec_hash: str | None) -> None:
    if spec_hash is not None and not CHANGE.fullmatch(spec_hash):
        raise GateError(
            f"--spec-hash {spec_hash[:80]!r}: give the spec hash `orch status --json` shows (6+ hex digits)"
        )


def _awaiting(deployment: Deployment, name: str, spec_hash: str | None) -> Awaiting:
    awaiting = deployment.awaiting
    if awaiting is None:
        why = "nothing it would run grants more than the policy in force allows"
        if deployment.rejected is not None:
            why = (
                f"its change to {deployment.rejected.spec_hash[:12]} was rejected; change its files or config to "
                "propose another"
            )
        raise NotAwaitingApproval(f"capsule {name!r} is not awaiting approval: {why}")
    if spec_hash is not None and not awaiting.spec_hash.startswith(spec_hash):
        raise NotAwaitingApproval(
            f"capsule {name!r} awaits approval of change {awaiting.spec_hash[:12]} (granting "
            f"{', '.join(awaiting.escalations)}), not of {spec_hash[:64]!r}: its files changed since you looked; "
            "look again and approve or reject that one"
        )
    return awaiting


async def approve(
    lattice: Lattice, name: str, spec_hash: str | None = None, *, wait: float = APPROVE_SECONDS
) -> dict[str, Any]:
    """Grant what `name` waits for and wait until it serves (see the module docstring)."""
    _check_prefix(spec_hash)
    answered: list[Awaiting] = []

    def make(before: DesiredDoc | None) -> Draft:
        deployment = deployment_of(before, name)
        awaiting = _awaiting(deployment, name, spec_hash)
        if answered and answered[0].spec_hash != awaiting.spec_hash:
            raise NotAwaitingApproval(
                f"capsule {name!r}: the change waiting became {awaiting.spec_hash[:12]} while you approved "
                f"{answered[0].spec_hash[:12]}; look again and approve or reject that one"
            )
        answered[:] = [awaiting]
        assert before is not None
        deployments = {**before.deployments, name: deployment.replace(awaiting=None, held=None)}
        fields = before.fields(event="approve", now_ms=int(time.time() * 1000))
        return Draft(fields, deployments, granted={name: awaiting.spec_hash})

    committed = await commit_revision(lattice, make)

    def settled(row: dict[str, Any], reports: dict[str, Any]) -> bool:
        if row.get("phase") == "Running":
            return True
        return any(
            o.get("phase") in ("Failed", "Degraded")
            and o.get("last_error")
            and reports.get(o["host"], 0) >= committed.revision
            for o in row.get("on", [])
        )

    row = await wait_until(lattice, name, settled, wait)
    return {**row, "approved": answered[0].to_dict()}


async def reject(lattice: Lattice, name: str, spec_hash: str | None = None) -> dict[str, Any]:
    """Refuse what `name` waits for (see the module docstring)."""
    _check_prefix(spec_hash)
    answered: list[Rejected] = []

    def make(before: DesiredDoc | None) -> Draft:
        deployment = deployment_of(before, name)
        awaiting = _awaiting(deployment, name, spec_hash)
        assert before is not None
        now_ms = int(time.time() * 1000)
        rejection = Rejected(awaiting.spec_hash, awaiting.escalations, now_ms)
        answered[:] = [rejection]
        deployments = {**before.deployments, name: deployment.replace(awaiting=None, rejected=rejection)}
        payload = {"capsule": name, "escalations": list(awaiting.escalations), "spec_hash": awaiting.spec_hash}
        return Draft(before.fields(event="reject", now_ms=now_ms), deployments, audits=[Audit(REJECTED_TOPIC, payload)])

    await commit_revision(lattice, make)
    return {**await capsule_row(lattice, name), "rejected": answered[0].to_dict()}


async def capsule_row(lattice: Lattice, name: str) -> dict[str, Any]:
    """`name`'s row of the lattice status, with `last_error` (the first a host reports)."""
    return _row(await status_of(lattice), name)


def _row(status: dict[str, Any], name: str) -> dict[str, Any]:
    row = next((c for c in status["capsules"] if c["name"] == name), None)
    if row is None:
        row = {"name": name, "phase": "Pending", "hosts": [], "version": None, "on": []}
    errors = [o["last_error"] for o in row.get("on", []) if o.get("last_error")]
    return {**row, "last_error": errors[0] if errors else None}


async def wait_until(
    lattice: Lattice,
    name: str,
    done: Callable[[dict[str, Any], dict[str, int]], bool],
    seconds: float,
) -> dict[str, Any]:
    """Poll the lattice status until `done(row, {host: desired revision it runs})`, or
    `seconds` pass; the row last seen."""
    end = time.monotonic() + seconds
    while True:
        row = await capsule_row(lattice, name)
        reports = {h: int(r.get("desired_revision") or 0) for h, r in (await read_reports(lattice)).items()}
        if done(row, reports) or time.monotonic() > end:
            return row
        await asyncio.sleep(POLL_SECONDS)
