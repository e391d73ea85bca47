"""Lattice status (orchestrator.lattice.status): the pure summary, and one host run
in-process on a real nats-server that meets hostile entries in its buckets and keeps
running what it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.desired.load import load_desired
from orchestrator.lattice.connection import Lattice, LatticeAddress
from orchestrator.lattice.desiredstate import current, desired_bucket, manifest_texts, publish
from orchestrator.lattice.host import LatticeHost
from orchestrator.lattice.membership import HostInfo
from orchestrator.lattice.scheduler import Assignments, assignments_bucket
from orchestrator.lattice.status import lattice_status, parse_report, summarize
from tests.latticehosts import call, capsule, write_capsule, write_config
from tests.natsserver import NatsServers, wait_for


def row(name: str, phase: str, spec_hash: str, version: str = "v1") -> dict[str, Any]:
    return {"name": name, "phase": phase, "spec_hash": spec_hash, "version": version, "last_error": None}


async def doc_for(tmp_path: Path, nats_server: NatsServers, deployments: dict[str, dict[str, Any]]) -> Any:
    write_capsule(tmp_path / "ver", 1)
    desired = load_desired(write_config(tmp_path, deployments))
    lattice = await Lattice.connect(LatticeAddress.parse(nats_server.urls))
    try:
        await publish(lattice, desired, manifest_texts(desired))
        return await current(lattice)
    finally:
        await lattice.close()


async def test_the_summary_says_where_each_capsule_serves(tmp_path: Path, nats_server: NatsServers) -> None:
    doc = await doc_for(
        tmp_path,
        nats_server,
        {
            "two": {"path": "ver", "hosts": 2},
            "old": {"path": "ver"},
            "bad": {"path": "ver"},
            "idle": {"path": "ver", "enabled": "false"},
            "new": {"path": "ver"},
        },
    )
    h = {n: d.spec.spec_hash for n, d in doc.deployments.items()}
    live = {"a": HostInfo("a", {"zone": "eu"}), "b": HostInfo("b", draining=True)}
    reports = {
        "a": {"host": "a", "capsules": [row("two", "Running", h["two"]), row("old", "Degraded", "older")]},
        "b": {"host": "b", "capsules": [row("two", "Running", h["two"]), row("bad", "Failed", h["bad"])]},
        "dead": {"host": "dead", "labels": {"zone": "us"}, "capsules": [row("new", "Running", h["new"])]},
    }
    placed = Assignments(4, {"two": ("a", "b"), "old": ("a",), "bad": ("b",), "new": ("dead",)}, {"x": "why"})
    status = summarize(live=live, reports=reports, desired=doc, assignments=placed, scheduler="a")
    phases = {c["name"]: (c["phase"], c["hosts"]) for c in status["capsules"]}
    assert phases == {
        "two": ("Running", ["a", "b"]),
        "old": ("Degraded", ["a"]),  # serving, but not the applied version
        "bad": ("Failed", []),
        "idle": ("Stopped", []),
        "new": ("Pending", []),  # its host is gone: its report does not count
    }
    assert {h["id"]: (h["alive"], h["draining"], h["capsules"]) for h in status["hosts"]} == {
        "a": (True, False, 2),
        "b": (True, True, 1),
        "dead": (False, False, 0),
    }
    assert next(h for h in status["hosts"] if h["id"] == "dead")["labels"] == {"zone": "us"}
    assert status["scheduler"] == "a" and status["assignments_revision"] == 4
    assert status["desired"]["revision"] == doc.revision and status["desired"]["deployments"] == 5
    assert capsule(status, "two")["placed_on"] == ["a", "b"] and capsule(status, "two")["wanted"] == 2
    one_host = summarize(live={"a": live["a"]}, reports=reports, desired=doc, assignments=placed)
    assert capsule(one_host, "two")["phase"] == "Degraded"  # 1 of the 2 hosts it wants


def test_reports_that_are_not_reports_are_ignored() -> None:
    assert parse_report(b"nope", key="a") is None
    assert parse_report(json.dumps({"host": "b", "capsules": []}).encode(), key="a") is None
    assert parse_report(json.dumps({"host": "a", "capsules": "x"}).encode(), key="a") is None
    kept = parse_report(json.dumps({"host": "a", "capsules": [5, {"name": "x"}, {"no": 1}]}).encode(), key="a")
    assert kept is not None and kept["capsules"] == [{"name": "x"}]


async def test_a_host_keeps_what_it_runs_when_its_buckets_hold_garbage(
    tmp_path: Path, nats_server: NatsServers
) -> None:
    urls = nats_server.urls
    address = LatticeAddress.parse(urls)
    host = LatticeHost(address=address, state_dir=tmp_path / "state", host_id="solo", labels={"zone": "eu"})
    await host.start()
    lattice = await Lattice.connect(address)
    try:
        await doc_for(tmp_path, nats_server, {"ver": {"path": "ver"}})

        async def serving() -> bool:
            return capsule(await lattice_status(address), "ver")["hosts"] == ["solo"]

        await wait_for(serving, "ver serving on solo")
        revision = host.report()["desired_revision"]
        await (await desired_bucket(lattice)).put("config", b'{"format": 1}')
        await (await assignments_bucket(lattice)).put("placement", b"[not assignments]")

        async def complained() -> bool:
            status = await lattice_status(address)
            return any("is not a desired state" in p for p in status["problems"])

        await wait_for(complained, "the host reporting the bad desired revision")
        assert (await call(urls, "ver")) == (b"1", "solo")
        assert host.report()["desired_revision"] == revision  # the last good one

        async def rewritten() -> bool:
            status = await lattice_status(address)
            return status["assignments_revision"] > 0 and capsule(status, "ver")["placed_on"] == ["solo"]

        await wait_for(rewritten, "the scheduler rewriting the assignments")
        status = await lattice_status(address)
        assert status["hosts"] == [
            {"id": "solo", "labels": {"zone": "eu"}, "alive": True, "draining": False, "capsules": 1}
        ]
        await host.drain()
        status = await lattice_status(address)
        assert status["hosts"] == [] and status["scheduler"] is None
    finally:
        await host.close()
        await lattice.close()
