"""Lattice status: each host's report of its capsules, and the lattice seen as a whole.

A host puts its report under its id in the status bucket whenever a capsule changes phase,
and every STATUS_REFRESH_SECONDS, with a TTL of STATUS_TTL_SECONDS (a host that vanishes
leaves no report behind for long):

    {"host": ID, "labels": {...}, "draining": bool, "at_ms": ..., "desired_revision": N,
     "assignments_revision": N, "capsules": [reconciler.status() rows], "problems": {NAME: WHY}}

`summarize` (pure) joins the heartbeats, reports, desired revision and assignments into
what `orch status --lattice URL --json` prints (contract):

    {"hosts": [{"id", "labels", "alive", "draining", "capsules"}],
     "capsules": [{"name", "phase", "hosts", "version", "wanted", "placed_on", "enabled",
                   "on": [{"host", "phase", "version", "last_error"}], "problem",
                   "spec_hash", "desired_version", "awaiting", "rejected", "pinned",
                   "paused", "restoring", "message"}],
     "desired": {"revision", "config_sha256", "source", "applied_at_ms", "applied_by",
                 "deployments"} | null,
     "scheduler": HOST | null, "assignments_revision": N, "problems": [...],
     "git": null | {"source", "applied_revision", "applied_at_ms", "fetched_revision",
                    "fetched_at_ms", "rejected", "error", "error_at_ms", "interval_s", "host"}}

`git` is the followed branch (`orch apply git+... --follow`), as the lease holder last
recorded it (orchestrator.lattice.followrecord): null when no branch is followed.

A capsule's `hosts` are the live hosts where a version of it serves (phase Running, or
Degraded: the last good version serving while a newer one failed). Its `version` and
`spec_hash` are those of the version the lattice runs for it (`Deployment.runs()`: the
applied one, or the one held while a change awaits approval or was rejected, or a
rollback's pin; `desired_version` is the applied one). Its `phase` over the lattice:
Running when it serves that version on as many hosts as it wants; Degraded when it serves,
but on fewer hosts, or not that version everywhere; otherwise Failed, Starting or Pending
as its hosts report; Stopped when disabled. A change that waits makes it AwaitingApproval
(`awaiting`: `{spec_hash, escalations, since_ms}`), a rejected one Degraded (Failed when
nothing runs; `rejected`), and a rollback restoring its data Paused (`paused`,
`restoring`); `pinned` is a rollback's pin (`{version, spec_hash, since_ms, revision}`),
and `message` says in one sentence what the operator can do about any of these.

`lattice_status(address)` connects, reads and summarizes. Used by the host runtime
(publishing) and the CLI (`orch status --lattice`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from .connection import Lattice, LatticeAddress
from .desiredstate import Deployment, DesiredDoc, latest_good
from .followrecord import read_record, read_status, view
from .lease import holder
from .membership import HostInfo, latest_values, live_hosts
from .scheduler import Assignments, read_assignments

logger = logging.getLogger(__name__)

STATUS_TTL_SECONDS = 30
STATUS_REFRESH_SECONDS = 10.0
MAX_REPORT_BYTES = 8 << 20
SERVING = ("Running", "Degraded")


async def publish_status(lattice: Lattice, host_id: str, report: Mapping[str, Any]) -> None:
    bucket = lattice.names.status
    await lattice.bucket(bucket, history=1)
    data = json.dumps(report, separators=(",", ":"), default=str).encode()
    await lattice.js.publish(f"$KV.{bucket}.{host_id}", data, msg_ttl=STATUS_TTL_SECONDS)


async def withdraw_status(lattice: Lattice, host_id: str) -> None:
    bucket = await lattice.bucket(lattice.names.status, history=1)
    await bucket.purge(host_id)


def parse_report(data: bytes, *, key: str) -> dict[str, Any] | None:
    """A host's report, or None when it is not one (logged, never trusted)."""
    try:
        if len(data) > MAX_REPORT_BYTES:
            raise ValueError("too large")
        value = json.loads(data)
        if not isinstance(value, dict) or value.get("host") != key or not isinstance(value.get("capsules"), list):
            raise ValueError("not a status report of this host")
        rows = [
            {**row, "phase": None} if not isinstance(row.get("phase", ""), str) else row  # hashable, comparable
            for row in value["capsules"]
            if isinstance(row, dict) and isinstance(row.get("name"), str)
        ]
        report = {**value, "capsules": rows}
        if not isinstance(report.get("labels", {}), dict) or not all(
            isinstance(v, str) for v in report.get("labels", {}).values()
        ):
            report["labels"] = {}
        if not isinstance(report.get("problems", {}), dict):
            report["problems"] = {}
        return report
    except (ValueError, RecursionError) as error:
        logger.warning("status bucket key %s: %s; ignored", key, error)
        return None


async def read_reports(lattice: Lattice) -> dict[str, dict[str, Any]]:
    """Every host's latest report, by host id."""
    reports = {}
    for key, data in (await latest_values(lattice, lattice.names.status)).items():
        report = parse_report(data, key=key)
        if report is not None:
            reports[key] = report
    return reports


def summarize(
    *,
    live: Mapping[str, HostInfo],
    reports: Mapping[str, Mapping[str, Any]],
    desired: DesiredDoc | None,
    assignments: Assignments | None,
    scheduler: str | None = None,
    problems: list[str] | None = None,
    git: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The lattice's status (see the module docstring). Pure."""
    placed = assignments.deployments if assignments else {}
    rows_by_host = {h: {row["name"]: row for row in r.get("capsules", [])} for h, r in reports.items() if h in live}
    host_ids = sorted(set(live) | set(reports) | {h for hs in placed.values() for h in hs})
    hosts = []
    for host in host_ids:
        info = live.get(host)
        labels = dict(info.labels) if info else dict(reports.get(host, {}).get("labels") or {})
        serving = sum(1 for row in rows_by_host.get(host, {}).values() if row.get("phase") in SERVING)
        hosts.append(
            {
                "id": host,
                "labels": labels,
                "alive": info is not None,
                "draining": bool(info.draining) if info else False,
                "capsules": serving,
            }
        )
    deployments = desired.deployments if desired else {}
    names = sorted(set(deployments) | {n for rows in rows_by_host.values() for n in rows})
    capsules = [_capsule(name, deployments.get(name), rows_by_host, placed, assignments) for name in names]
    return {
        "hosts": hosts,
        "capsules": capsules,
        "desired": desired.summary() if desired else None,
        "scheduler": scheduler,
        "assignments_revision": assignments.revision if assignments else 0,
        "problems": list(problems or []),
        "git": dict(git) if git is not None else None,
    }


def _capsule(
    name: str,
    deployment: Deployment | None,
    rows_by_host: Mapping[str, Mapping[str, Mapping[str, Any]]],
    placed: Mapping[str, tuple[str, ...]],
    assignments: Assignments | None,
) -> dict[str, Any]:
    spec = deployment.spec if deployment is not None else None
    version = deployment.runs() if deployment is not None else None
    running = version.spec if version is not None else None
    on = [
        {
            "host": host,
            "phase": rows[name].get("phase"),
            "version": rows[name].get("version"),
            "last_error": rows[name].get("last_error"),
        }
        for host, rows in sorted(rows_by_host.items())
        if name in rows
    ]
    serving: list[str] = [str(o["host"]) for o in on if o["phase"] in SERVING]
    wanted = spec.hosts if spec is not None else 0
    current_everywhere = running is not None and all(
        rows_by_host[h][name].get("spec_hash") == running.spec_hash and rows_by_host[h][name].get("phase") == "Running"
        for h in serving
    )
    phases = {o["phase"] for o in on}
    if spec is not None and not spec.enabled and not serving:
        phase = "Stopped"
    elif deployment is not None and deployment.paused:
        phase = "Paused"
    elif deployment is not None and deployment.awaiting is not None:
        phase = "AwaitingApproval"
    elif deployment is not None and deployment.rejected is not None:
        phase = "Degraded" if serving else "Failed"
    elif serving and current_everywhere and len(serving) >= wanted:
        phase = "Running"
    elif serving:
        phase = "Degraded"
    elif "Failed" in phases:
        phase = "Failed"
    elif phases & {"Starting", "Stopping"}:
        phase = "Starting" if "Starting" in phases else "Stopping"
    else:
        phase = "Pending"
    return {
        "name": name,
        "phase": phase,
        "hosts": serving,
        "version": running.version if running is not None else None,
        "wanted": wanted,
        "placed_on": list(placed.get(name, ())),
        "enabled": spec.enabled if spec is not None else False,
        "on": on,
        "problem": assignments.problems.get(name) if assignments else None,
        **gitops(name, deployment),
    }


def gitops(name: str, deployment: Deployment | None) -> dict[str, Any]:
    """A capsule's GitOps keys in status (see the module docstring)."""
    if deployment is None:
        return {
            "spec_hash": None,
            "desired_version": None,
            "awaiting": None,
            "rejected": None,
            "pinned": None,
            "paused": False,
            "restoring": None,
            "message": None,
        }
    version = deployment.runs()
    return {
        "spec_hash": version.spec.spec_hash if version is not None else None,
        "desired_version": deployment.spec.version,
        "awaiting": deployment.awaiting.to_dict() if deployment.awaiting else None,
        "rejected": deployment.rejected.to_dict() if deployment.rejected else None,
        "pinned": deployment.pinned.to_status() if deployment.pinned else None,
        "paused": deployment.paused,
        "restoring": deployment.restoring.to_dict() if deployment.restoring else None,
        "message": message(name, deployment),
    }


def message(name: str, deployment: Deployment) -> str | None:
    """What the operator can do about a held, rejected, pinned or paused deployment."""
    held = deployment.runs()
    serving = f"version {held.spec.version} keeps serving" if held is not None else "nothing runs"
    if deployment.restoring is not None:
        return (
            f"paused by `orch rollback {name} --with-data`: restoring the data of revision "
            f"{deployment.restoring.revision}; if that rollback is not running any more, run it again to finish"
        )
    if deployment.awaiting is not None:
        grants = ", ".join(deployment.awaiting.escalations)
        return (
            f"awaits `orch approve {name}` (or `orch reject {name}`): change "
            f"{deployment.awaiting.spec_hash[:12]} would grant {grants}; {serving}"
        )
    if deployment.rejected is not None:
        return (
            f"its change {deployment.rejected.spec_hash[:12]} was rejected; {serving}; apply a change to its "
            "files or config to propose another"
        )
    if deployment.pinned is not None:
        return (
            f"pinned to version {deployment.pinned.version.spec.version} by a rollback; a change to its desired "
            f"spec or `orch unpin {name}` ends it"
        )
    return None


async def lattice_status(address: LatticeAddress) -> dict[str, Any]:
    """Connect to the lattice at `address` and return its status (see the module
    docstring). Raises LatticeError when it cannot be reached."""
    lattice = await Lattice.connect(address)
    try:
        return await status_of(lattice)
    finally:
        await lattice.close()


async def status_of(lattice: Lattice) -> dict[str, Any]:
    problems: list[str] = []
    live, bad = await live_hosts(lattice)
    problems += [f"hosts bucket key {key}: {why}" for key, why in sorted(bad.items())]
    desired, problem = await latest_good(lattice)
    if problem is not None:
        problems.append(f"{problem} (revision {desired.revision if desired else '(none)'} is the last good one)")
    _, assignments = await read_assignments(lattice)
    reports = await read_reports(lattice)
    for host, report in sorted(reports.items()):
        if host in live:
            problems += [f"{host}: {name}: {why}" for name, why in sorted((report.get("problems") or {}).items())]
    if assignments is not None:
        problems += [f"{name}: {why}" for name, why in sorted(assignments.problems.items())]
    _, record, record_problem = await read_record(lattice)
    _, followed, status_problem = await read_status(lattice)
    problems += [p for p in (record_problem, status_problem if record is not None else None) if p]
    return summarize(
        live=live,
        reports=reports,
        desired=desired,
        assignments=assignments,
        scheduler=await holder(lattice),
        problems=problems,
        git=view(record, followed),
    )
