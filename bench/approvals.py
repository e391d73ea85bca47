"""Escalation gate benchmark: what the gate costs, and how fast an approval serves; prints JSON.

    .venv/bin/python bench/approvals.py [--rounds N]

- judge_us: one verdict of the gate (orchestrator.control.approvals.ApprovalGate.judge) for
  a reload that adds a grant, the policy allowing it (diff, audit event): microseconds,
  median of rounds of 2,000 verdicts. This is all the gate adds to a reload.
- approve_ms: an orchestrator (no file watching) runs a WAT capsule under `escalations:
  ask`; each round rewrites its manifest to grant one more `fs_read` path, reconciles (the
  change waits), then times `approve` until the new version serves (approve returns after
  the swap). Median and p95 over the rounds.
- reconcile_waiting_ms: a reconcile while the change waits (the gate says "wait" again,
  nothing is built): median.

Figures are medians; the machine is shared, so treat single figures with care.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.capsule.bus import EventBus
from orchestrator.control.approvals import ApprovalGate
from orchestrator.control.runtime import Orchestrator
from orchestrator.desired.config import ApprovalPolicy
from orchestrator.desired.load import load_desired

WAT = """(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output (param i64 i64)))
  (func (export "version") (result i32) (local $p i64)
    (local.set $p (call $alloc (i64.const 1)))
    (call $store (local.get $p) (i32.const 49))
    (call $output (local.get $p) (i64.const 1))
    (i32.const 0)))
"""
MANIFEST = """[package]
name = "gated"
version = "1.0.0"

[[component]]
file = "v.wat"

[capabilities]
kv = true
fs_read = [{paths}]

[[tool]]
name = "version"
"""


def write_manifest(folder: Path, paths: int) -> None:
    text = MANIFEST.format(paths=", ".join(f'"cwd://data/{i}"' for i in range(paths)))
    tmp = folder / ".Capsule.toml.tmp"
    tmp.write_text(text)
    tmp.replace(folder / "Capsule.toml")


def deployment(root: Path) -> Path:
    folder = root / "caps" / "gated"
    folder.mkdir(parents=True)
    (folder / "v.wat").write_text(WAT)
    write_manifest(folder, 1)
    config = root / "config.yaml"
    config.write_text("version: 1\napprovals: {escalations: ask}\ncapsules:\n  gated:\n    path: caps/gated\n")
    return config


def judge_us(root: Path, rounds: int) -> float:
    config = deployment(root / "judge")
    before = load_desired(config).specs["gated"]
    write_manifest(root / "judge" / "caps" / "gated", 2)
    after = load_desired(config).specs["gated"]
    bus = EventBus(history=100)
    medians = []
    for _ in range(rounds):
        gate = ApprovalGate(bus=bus, policy=ApprovalPolicy())
        start = time.perf_counter()
        for i in range(2000):
            gate.judge(f"c{i}", after, before)
        medians.append((time.perf_counter() - start) / 2000 * 1e6)
    bus.close()
    return round(statistics.median(medians), 2)


async def approvals(root: Path, rounds: int) -> dict[str, Any]:
    config = deployment(root / "approve")
    folder = root / "approve" / "caps" / "gated"
    orchestrator = Orchestrator(config, watch=False)
    await orchestrator.start()
    await orchestrator.approve("gated")  # the first start waits too
    approve_ms, waiting_ms = [], []
    try:
        for paths in range(2, rounds + 2):
            write_manifest(folder, paths)
            await orchestrator.reconcile()
            start = time.perf_counter()
            await orchestrator.reconcile()  # still waiting: judged again, nothing built
            waiting_ms.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            status = await orchestrator.approve("gated")
            approve_ms.append((time.perf_counter() - start) * 1000)
            assert status["phase"] == "Running" and status["reload_count"] == paths - 1, status
    finally:
        await orchestrator.stop(2)
    approve_ms.sort()
    return {
        "approve_ms": {
            "median": round(statistics.median(approve_ms), 2),
            "p95": round(approve_ms[int(0.95 * (len(approve_ms) - 1))], 2),
            "n": len(approve_ms),
        },
        "reconcile_waiting_ms": round(statistics.median(waiting_ms), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
        root = Path(folder)
        report: dict[str, Any] = {"judge_us": judge_us(root, 5)}
        report.update(asyncio.run(approvals(root, args.rounds)))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
