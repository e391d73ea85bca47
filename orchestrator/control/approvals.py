"""The capability escalation gate: which starts and reloads may widen what a capsule can touch
by themselves, which wait for an operator, and the audit trail of every grant.

A start or reload *escalates* when it grants a capsule something its running version does
not have: the plan's escalations (orchestrator.desired.reasons), e.g. `kv`, `fs_read
cwd://data`, `fs_write cwd://out`, `ipc_publish orders.>`, `ipc_subscribe orders.*`, `net
example.com`. For a start (nothing runs) every grant counts. A change that grants nothing new
never waits and makes no audit event, so a capsule without [capabilities] never needs
approval.

The policy in force (config.yaml `approvals:`) is the one of the config applied last, never
the one of the change being judged: a change cannot approve its own escalations. The change's
own policy (`propose`) can only make the judgement stricter: a relaxed policy takes effect
for the changes after it, a tightened one at once. Only the very first config applied in a
state dir (nothing has run there) is judged by its own policy alone. The policy in force
and the operator's rejections are kept in the state dir (`approvals.json`), so restarting
the orchestrator neither relaxes the policy nor forgets a rejection; and what ran before a
restart (`applied.json`) is the baseline of each capsule's first start after it, so a
restart does not ask again for grants that were already running.

Verdicts, per capsule and spec hash (`judge`):
- go: nothing new; or the policy allows every escalation (audited, `granted_by: "policy"`);
  or the operator approved this very spec (audited when approved, `granted_by: "operator"`);
- wait: pending until `approve` or `reject`, announced once (`granted_by: null`). A pending
  change keeps waiting for its spec hash even if the policy is relaxed afterwards;
- rejected: this very spec was rejected (`orch.audit.rejected`); it stays rejected until the
  capsule's desired spec changes again.
`settle` forgets what waits or was rejected for a capsule that is removed, disabled, or whose
desired spec changed, so nothing is left behind.

Bookkeeping over values: the clock and the bus are passed in; `open` and `write` read and
write the state dir (blocking: call them on a worker thread). Used by the reconciler
(verdicts, approve, reject) and the runtime (the policy in force, persistence).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from ..desired.config import ApprovalPolicy
from ..desired.reasons import capability_grants, reload_reasons
from ..desired.spec import CapsuleSpec
from ..errors import OrchestratorError
from ..files import FileReadError, read_regular, write_atomic

logger = logging.getLogger(__name__)

APPROVALS = "approvals.json"
MAX_FILE_BYTES = 4 << 20
ESCALATION_TOPIC = "orch.audit.escalation"
REJECTED_TOPIC = "orch.audit.rejected"
SPEC_HASH = re.compile(r"[0-9a-f]{64}")
STRICTEST = ApprovalPolicy(escalations="ask")  # when approvals.json cannot be read: ask for everything


class Publisher(Protocol):
    def publish(self, topic: str, payload: Any = None) -> Any: ...


class NotAwaitingApproval(OrchestratorError):
    """`approve` or `reject` of a capsule that waits for no approval, or for another change
    than the one named (the control API answers 409)."""


@dataclass(frozen=True)
class Pending:
    """A change waiting for the operator: its spec, what it would grant, since when."""

    spec_hash: str
    escalations: tuple[str, ...]
    since_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {"spec_hash": self.spec_hash, "escalations": list(self.escalations), "since_ms": self.since_ms}


@dataclass(frozen=True)
class Rejection:
    """A change the operator rejected: it does not run until the desired spec changes."""

    spec_hash: str
    escalations: tuple[str, ...]
    at_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {"spec_hash": self.spec_hash, "escalations": list(self.escalations), "at_ms": self.at_ms}

    @classmethod
    def from_dict(cls, data: Any) -> Rejection:
        """Raises ValueError for anything but what `to_dict` writes."""
        if not isinstance(data, dict) or set(data) != {"spec_hash", "escalations", "at_ms"}:
            raise ValueError("a rejection is {spec_hash, escalations, at_ms}")
        spec_hash, escalations, at_ms = data["spec_hash"], data["escalations"], data["at_ms"]
        if not isinstance(spec_hash, str) or not SPEC_HASH.fullmatch(spec_hash):
            raise ValueError("spec_hash must be 64 hex digits")
        if not isinstance(escalations, list) or not all(isinstance(e, str) for e in escalations):
            raise ValueError("escalations must be a list of strings")
        if type(at_ms) is not int:
            raise ValueError("at_ms must be an integer")
        return cls(spec_hash, tuple(escalations), at_ms)


@dataclass(frozen=True)
class Verdict:
    """What the gate says of one start or reload: go, or why not (`pending` / `rejection`)."""

    go: bool
    pending: Pending | None = None
    rejection: Rejection | None = None


GO = Verdict(go=True)


def escalations_of(spec: CapsuleSpec, baseline: CapsuleSpec | None) -> tuple[str, ...]:
    """What running `spec` grants beyond `baseline` (everything, when there is none)."""
    return reload_reasons(baseline, spec)[1] if baseline is not None else capability_grants(spec)


def allowed(policy: ApprovalPolicy, escalations: tuple[str, ...]) -> bool:
    """Whether `policy` grants every one of `escalations` without asking."""
    return policy.escalations == "allow" or all(e.split(" ", 1)[0] in policy.allow for e in escalations)


def describe(policy: ApprovalPolicy) -> str:
    """`ask (allow kv, fs_read)`, `allow`: the policy in one phrase."""
    return f"ask (allow {', '.join(policy.allow)})" if policy.allow else policy.escalations


class ApprovalGate:
    """The escalation gate of one orchestrator (see the module docstring)."""

    def __init__(
        self,
        *,
        bus: Publisher,
        policy: ApprovalPolicy,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        recorded: Mapping[str, CapsuleSpec] | None = None,
        rejected: Mapping[str, Rejection] | None = None,
    ) -> None:
        self._bus = bus
        self.policy = policy  # in force: the running config's
        self.proposed: ApprovalPolicy | None = None  # the policy of the config being applied
        self._wall_ms = wall_ms
        self._recorded = dict(recorded or {})  # what ran before this process: the first start's baseline
        self._pending: dict[str, Pending] = {}
        self._rejected: dict[str, Rejection] = dict(rejected or {})
        self._granted: dict[str, str] = {}  # name -> the spec hash let through last
        self._dirty = True  # the policy or the rejections changed since last written (written once at least)

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        bus: Publisher,
        policy: ApprovalPolicy,
        recorded: Mapping[str, CapsuleSpec],
        wall_ms: Callable[[], int] | None = None,
    ) -> ApprovalGate:
        """The gate of `state_dir`: the policy in force and the rejections it kept (else
        `policy`, the first config's own); `recorded`: what ran there last (applied.json).
        Blocking."""
        path = state_dir / APPROVALS
        rejected: dict[str, Rejection] = {}
        try:
            data, _ = read_regular(path, limit=MAX_FILE_BYTES, what="approvals record")
            record = json.loads(data)
            if not isinstance(record, dict) or record.get("version") != 1:
                raise ValueError("not a version 1 approvals record")
            policy = ApprovalPolicy.model_validate(record["policy"])
            for name, entry in dict(record.get("rejected") or {}).items():
                rejected[str(name)] = Rejection.from_dict(entry)
        except FileReadError as error:
            if error.errno != errno.ENOENT:  # missing: nothing was applied here yet; the first config's own policy
                logger.warning("%s; asking for every escalation until a config is applied", error)
                policy = STRICTEST
        except (ValueError, KeyError, TypeError, RecursionError, ValidationError) as error:
            logger.warning(
                "ignoring %s (%s): asking for every escalation until a config is applied; "
                "rejections it held are forgotten",
                path,
                " ".join(str(error).split())[:200],
            )
            policy, rejected = STRICTEST, {}
        gate = cls(bus=bus, policy=policy, recorded=recorded, rejected=rejected)
        if wall_ms is not None:
            gate._wall_ms = wall_ms
        return gate

    # -- what people see ---------------------------------------------------------------------
    def pending(self, name: str) -> Pending | None:
        return self._pending.get(name)

    def rejection(self, name: str) -> Rejection | None:
        return self._rejected.get(name)

    def info(self) -> dict[str, Any]:
        """`GET /v1/status` `orchestrator.approvals`: the policy in force, who waits, who was rejected."""
        return {
            "policy": self.policy.model_dump(),
            "awaiting": sorted(self._pending),
            "rejected": sorted(self._rejected),
        }

    # -- the policy in force -----------------------------------------------------------------
    def propose(self, policy: ApprovalPolicy) -> None:
        """A config carrying `policy` is being applied: until `adopt`, a change must satisfy it
        as well as the policy in force (it can tighten the judgement, never relax it)."""
        self.proposed = policy

    def adopt(self, policy: ApprovalPolicy) -> None:
        """The config that carries `policy` has been applied: its policy is in force from now on."""
        self.proposed = None
        if policy != self.policy:
            logger.info("approval policy in force from now on: %s (was %s)", describe(policy), describe(self.policy))
            self.policy, self._dirty = policy, True

    # -- verdicts ------------------------------------------------------------------------------
    def judge(self, name: str, spec: CapsuleSpec, running: CapsuleSpec | None) -> Verdict:
        """May `spec` start (`running` None) or replace `running`?"""
        digest = spec.spec_hash
        self._forget(name, keep=digest)
        recorded = self._recorded.pop(name, None)
        if self._granted.get(name) == digest:
            return GO
        if (rejection := self._rejected.get(name)) is not None:
            return Verdict(go=False, rejection=rejection)
        if (pending := self._pending.get(name)) is not None:
            return Verdict(go=False, pending=pending)
        escalations = escalations_of(spec, running if running is not None else recorded)
        if escalations and not self._allows(escalations):
            pending = self._pending[name] = Pending(digest, escalations, self._wall_ms())
            logger.info(
                "capsule %s: the change to %s waits for approval: it would grant %s (policy in force: %s); "
                "`orch approve %s` or `orch reject %s`",
                name,
                digest[:12],
                ", ".join(escalations),
                self._describe(),
                name,
                name,
            )
            self._audit(name, digest, escalations, None)
            return Verdict(go=False, pending=pending)
        if escalations:
            logger.info("capsule %s: granted %s by the approval policy", name, ", ".join(escalations))
            self._audit(name, digest, escalations, "policy")
        self._granted[name] = digest
        return GO

    def _allows(self, escalations: tuple[str, ...]) -> bool:
        proposed = self.proposed
        return allowed(self.policy, escalations) and (proposed is None or allowed(proposed, escalations))

    def _describe(self) -> str:
        if self.proposed is None or self.proposed == self.policy:
            return describe(self.policy)
        return f"{describe(self.policy)}, and the new config's {describe(self.proposed)}"

    def approve(self, name: str, spec: CapsuleSpec, expected: str | None = None) -> Pending:
        """The operator grants what `name` waits for (`expected`: the spec hash, or a prefix
        of it, the operator looked at). Raises NotAwaitingApproval."""
        pending = self._awaiting(name, spec, expected)
        del self._pending[name]
        self._granted[name] = pending.spec_hash
        logger.info("capsule %s: the operator granted %s", name, ", ".join(pending.escalations))
        self._audit(name, pending.spec_hash, pending.escalations, "operator")
        return pending

    def reject(self, name: str, spec: CapsuleSpec, expected: str | None = None) -> Rejection:
        """The operator refuses what `name` waits for. Raises NotAwaitingApproval."""
        pending = self._awaiting(name, spec, expected)
        del self._pending[name]
        rejection = self._rejected[name] = Rejection(pending.spec_hash, pending.escalations, self._wall_ms())
        self._dirty = True
        logger.info("capsule %s: the operator rejected the change to %s", name, pending.spec_hash[:12])
        self._bus.publish(
            REJECTED_TOPIC,
            {"capsule": name, "escalations": list(pending.escalations), "spec_hash": pending.spec_hash},
        )
        return rejection

    def settle(self, desired: Mapping[str, CapsuleSpec], *, keep: set[str]) -> set[str]:
        """After an apply: forget what waits or was rejected for capsules removed, disabled or
        changed (`keep`: capsules whose files are broken now, which changes nothing). Returns
        the capsules whose approval state changed."""
        changed: set[str] = set()
        for name in set(self._pending) | set(self._rejected) | set(self._granted):
            if name in keep:
                continue
            spec = desired.get(name)
            wanted = spec.spec_hash if spec is not None and spec.enabled else None
            if self._forget(name, keep=wanted):
                changed.add(name)
            if wanted is None:
                self._granted.pop(name, None)
        return changed

    def _forget(self, name: str, *, keep: str | None) -> bool:
        """Drop what waits or was rejected for `name` unless it is for spec `keep`."""
        forgot = False
        if (pending := self._pending.get(name)) is not None and pending.spec_hash != keep:
            del self._pending[name]
            forgot = True
        if (rejection := self._rejected.get(name)) is not None and rejection.spec_hash != keep:
            del self._rejected[name]
            forgot = self._dirty = True
        return forgot

    def _awaiting(self, name: str, spec: CapsuleSpec, expected: str | None) -> Pending:
        pending = self._pending.get(name)
        if pending is None or pending.spec_hash != spec.spec_hash:
            rejection = self._rejected.get(name)
            why = (
                f"its change to {rejection.spec_hash[:12]} was rejected; change its files to propose another"
                if rejection is not None and rejection.spec_hash == spec.spec_hash
                else "nothing it would run grants more than the policy in force allows"
            )
            raise NotAwaitingApproval(f"capsule {name!r} is not awaiting approval: {why}")
        if expected is not None and not pending.spec_hash.startswith(expected):
            raise NotAwaitingApproval(
                f"capsule {name!r} awaits approval of change {pending.spec_hash[:12]} "
                f"(granting {', '.join(pending.escalations)}), not of {expected[:64]!r}: "
                "its files changed since you looked; look again and approve or reject that one"
            )
        return pending

    def _audit(self, name: str, spec_hash: str, escalations: tuple[str, ...], granted_by: str | None) -> None:
        self._bus.publish(
            ESCALATION_TOPIC,
            {"capsule": name, "escalations": list(escalations), "granted_by": granted_by, "spec_hash": spec_hash},
        )

    # -- persistence ---------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """What `approvals.json` keeps: the policy in force and the rejections."""
        return {
            "version": 1,
            "policy": self.policy.model_dump(),
            "rejected": {name: r.to_dict() for name, r in sorted(self._rejected.items())},
        }

    def changes(self) -> bytes | None:
        """The new `approvals.json`, if the policy or the rejections changed since the last
        call (then `write` it on a worker thread); None otherwise."""
        if not self._dirty:
            return None
        self._dirty = False
        return json.dumps(self.record(), separators=(",", ":"), sort_keys=True).encode()


def write(state_dir: Path, data: bytes) -> None:
    """Write `approvals.json` atomically (blocking)."""
    path = state_dir / APPROVALS
    try:
        write_atomic(path, data)
    except OSError as error:
        logger.warning("could not record the approval policy and rejections in %s: %s", path, error)
