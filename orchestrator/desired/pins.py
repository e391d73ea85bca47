"""Pins: a deployment held at an earlier version by the operator (`orch rollback`), as values.

A rollback is an explicit override of the desired state: the deployment runs the pinned
spec whatever its desired spec says, until that desired spec *changes* (its spec hash is no
longer the one it had when the pin was made: an edit of its config, manifest or module, a
new git revision that touches it, disabling or removing it) or the operator unpins it. A
sync that leaves the deployment's desired spec as it was (a change to another capsule, a
fetch, a reconcile) keeps the pin.

`in_force` says which pins still hold for a desired state; `overlay` puts the pinned specs
in place of the desired ones (the wiring, `depends_on` and `enabled`, still follows the
config: it never needs a reload). The plan (orchestrator.desired.plan) shows a pinned
deployment as overridden, naming the pinned version.

No I/O, no clock: values only. Used by the plan, the reconciler and the version history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .spec import CapsuleSpec


@dataclass(frozen=True)
class Pin:
    """Deployment `spec.name` runs `spec` while its desired spec hash is `desired_hash`."""

    spec: CapsuleSpec
    desired_hash: str  # the desired spec's hash when the pin was made ("" if it had none)
    since_ms: int
    entry: int = 0  # the history entry it came from (orchestrator.control.history)

    @property
    def version(self) -> str:
        return self.spec.version

    def to_status(self) -> dict[str, Any]:
        """What status shows: `pinned: {version, spec_hash, since_ms}`."""
        return {"version": self.version, "spec_hash": self.spec.spec_hash, "since_ms": self.since_ms}


def holds(pin: Pin, desired: CapsuleSpec | None) -> bool:
    """Whether `pin` still holds against the deployment's desired spec (None: removed)."""
    return desired is not None and desired.enabled and desired.spec_hash == pin.desired_hash


def in_force(
    desired: Mapping[str, CapsuleSpec], pins: Mapping[str, Pin], *, keep: Collection[str] = ()
) -> dict[str, Pin]:
    """The pins that still hold. `keep`: deployments whose files cannot be used now; they
    keep their pins (a broken save is not a new desired state)."""
    return {name: pin for name, pin in pins.items() if name in keep or holds(pin, desired.get(name))}


def pinned_spec(pin: Pin, desired: CapsuleSpec | None) -> CapsuleSpec:
    """The spec to run: the pinned one, wired (`depends_on`, `enabled`) as `desired` says."""
    if desired is None or (desired.depends_on == pin.spec.depends_on and desired.enabled == pin.spec.enabled):
        return pin.spec
    return dataclasses.replace(pin.spec, depends_on=desired.depends_on, enabled=desired.enabled)


def overlay(desired: Mapping[str, CapsuleSpec], pins: Mapping[str, Pin]) -> dict[str, CapsuleSpec]:
    """`desired` with each pinned deployment's spec replaced by its pin's (pins for
    deployments not in `desired` are ignored). Applying it twice changes nothing."""
    result = dict(desired)
    for name, pin in pins.items():
        if name in result:
            result[name] = pinned_spec(pin, result[name])
    return result


def override_reason(name: str, pin: Pin, desired: CapsuleSpec | None) -> str:
    """The plan's reason for a pinned deployment: which version, and what ends it."""
    wanted = f" instead of the desired {desired.version}" if desired is not None else ""
    return (
        f"overridden: pinned to version {pin.version} by a rollback{wanted}; "
        f"a change to its desired spec or `orch unpin {name}` ends it"
    )
