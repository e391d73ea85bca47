"""Placement: which live hosts run each deployment. PURE: values in, values out.

`place(wants, hosts, previous)` decides, for every enabled deployment (`Want`: how many
hosts, which labels they must all have), the hosts that run it:

- a host can run a deployment when it is live, not draining, and has every label the
  deployment asks for (same value);
- what runs where already stays there (`previous`) as long as its host can still run it:
  a placement moves as little as possible when hosts come and go, and a new host takes
  only what is new or short of hosts (no rebalancing of what runs fine);
- the rest goes to the hosts with the fewest deployments (ties by host id), the most
  constrained deployments first (fewest eligible hosts, then by name);
- a deployment with fewer eligible hosts than it wants runs on all of them, and the
  shortfall is reported in `Placement.problems` (with why: no live hosts, labels).

Deterministic (the order of the mappings does not matter) and idempotent (placing again
over its own result changes nothing). No I/O, no clock, no asyncio. Used by the scheduler
(orchestrator.lattice.scheduler); its tests are table-driven and property-based.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Want:
    """What one deployment asks of placement."""

    count: int = 1  # `hosts: N`
    labels: Mapping[str, str] = field(default_factory=dict)  # `labels:`: every one must match


@dataclass(frozen=True)
class HostView:
    """A live host, as placement sees it."""

    labels: Mapping[str, str] = field(default_factory=dict)
    draining: bool = False  # leaving: keeps nothing, takes nothing


@dataclass(frozen=True)
class Placement:
    """Each deployment's hosts (sorted ids), and the deployments short of hosts (why)."""

    assignments: dict[str, tuple[str, ...]]
    problems: dict[str, str]

    def load(self) -> dict[str, int]:
        """Deployments per host (hosts with none are absent)."""
        counts: dict[str, int] = {}
        for hosts in self.assignments.values():
            for host in hosts:
                counts[host] = counts.get(host, 0) + 1
        return counts


def can_run(want: Want, host: HostView) -> bool:
    return not host.draining and all(host.labels.get(k) == v for k, v in want.labels.items())


def eligible(want: Want, hosts: Mapping[str, HostView]) -> list[str]:
    """The ids of the hosts that can run `want`, sorted."""
    return sorted(h for h, view in hosts.items() if can_run(want, view))


def place(
    wants: Mapping[str, Want],
    hosts: Mapping[str, HostView],
    previous: Mapping[str, Sequence[str]] | None = None,
) -> Placement:
    """Where each deployment of `wants` runs; see the module docstring."""
    previous = previous or {}
    able = {name: eligible(want, hosts) for name, want in wants.items()}
    load = dict.fromkeys(hosts, 0)
    chosen: dict[str, list[str]] = {}
    for name in sorted(wants):  # 1. what runs on a host that can still run it stays
        ok = set(able[name])
        kept = sorted({h for h in previous.get(name, ()) if h in ok})
        chosen[name] = kept
        for host in kept:
            load[host] += 1
    for name in sorted(wants):  # 2. too many (the count went down): leave the busiest hosts
        extra = len(chosen[name]) - wants[name].count
        for _ in range(max(0, extra)):
            busiest = max(chosen[name], key=lambda h: (load[h], h))
            chosen[name].remove(busiest)
            load[busiest] -= 1
    for name in sorted(wants, key=lambda n: (len(able[n]), n)):  # 3. fill, most constrained first
        need = wants[name].count - len(chosen[name])
        if need <= 0:
            continue
        taken = set(chosen[name])
        candidates = sorted((h for h in able[name] if h not in taken), key=lambda h: (load[h], h))
        for host in candidates[:need]:
            chosen[name].append(host)
            load[host] += 1
    problems = {
        name: _shortfall(want, len(able[name]), hosts) for name, want in wants.items() if len(able[name]) < want.count
    }
    return Placement({name: tuple(sorted(hosts_)) for name, hosts_ in sorted(chosen.items())}, problems)


def _shortfall(want: Want, found: int, hosts: Mapping[str, HostView]) -> str:
    """Why a deployment runs on fewer hosts than it wants, in one line."""
    active = sum(1 for view in hosts.values() if not view.draining)
    wanted = f"wants {want.count} host{'s' if want.count != 1 else ''}"
    if active == 0:
        return f"{wanted}, but no live host takes work" + (" (all are draining)" if hosts else "")
    if want.labels:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(want.labels.items()))
        return (
            f"{wanted} with labels {shown}; {found} of {active} live host{'s' if active != 1 else ''} "
            "match: start hosts with these labels (orch host --label KEY=VALUE) or lower hosts:"
        )
    return f"{wanted}; only {active} live host{'s' if active != 1 else ''} take work: start more hosts or lower hosts:"
