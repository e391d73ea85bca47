"""Lattice rollback and approval benchmark: prints one JSON object.

    .venv/bin/python bench/lattice_rollback.py [--keys N] [--rounds N] [--quick]

A nats-server and two `orch host` processes (the test helpers of tests/latticehosts.py).

- `rollback`: the `counter` capsule on both hosts (`hosts: 2`), its KV filled with N keys
  (default 100,000; `fill_ms`, written with the restore's own atomic batches). A new
  version is applied (`apply_with_snapshot_ms`: the `orch apply --lattice` process, which
  snapshots the N keys into the object store before it publishes; `snapshot_keys` says
  how many went in), every key is rewritten, then `orch rollback counter --with-data
  --lattice URL` runs as a subprocess: `rollback_with_data_ms` is that process, from start
  to exit (pin and pause, wait until neither host serves it, restore N keys, resume), and
  `resumed_ms` adds the wait until both hosts report the pinned version Running again.
  `restored_keys` is what the rollback reports; `count_after` the counter's value (the
  snapshot's).
- `approve`: the `ver` capsule on both hosts under `approvals: {escalations: ask}`; each
  round applies a version that asks for `kv` (held: the old version keeps serving), then
  times `orch approve ver --lattice URL` (the process: publish, then wait until every
  host serves the approved version): `approve_to_serving_ms`, median and max over the
  rounds, with `rounds_ms`.

The machine is shared (2 cores): compare ratios, not absolute numbers. `--quick`: 10,000
keys, 2 rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.lattice.calls import call_tool  # noqa: E402
from orchestrator.lattice.connection import Lattice, LatticeAddress  # noqa: E402
from orchestrator.lattice.desiredstate import current  # noqa: E402
from orchestrator.lattice.snapshots import read_values, restore  # noqa: E402
from tests.latticehosts import Hosts, capsule, orch, wait_status, write_capsule, write_config  # noqa: E402
from tests.natsserver import nats_servers  # noqa: E402

COUNTER = "version: 1\ncapsules:\n  counter:\n    path: capsules/counter\n    hosts: 2\n    config: {{step: {step}}}\n"


def ok(done: Any) -> str:
    if done.returncode != 0:
        raise SystemExit(f"bench: {done.args[1:3]} failed: {done.stderr.strip()[:500]}")
    return str(done.stdout)


def timed_orch(*args: str) -> tuple[str, float]:
    started = time.perf_counter()
    out = ok(orch(*args, timeout=600))
    return out, (time.perf_counter() - started) * 1000


async def rollback_figures(root: Path, urls: str, hosts: Hosts, keys: int) -> dict[str, Any]:
    folder = root / "deploy"
    shutil.copytree(
        ROOT / "capsules" / "counter", folder / "capsules" / "counter", ignore=shutil.ignore_patterns("assembly")
    )
    config = folder / "config.yaml"
    config.write_text(COUNTER.format(step=1))
    ok(orch("apply", str(config), "--lattice", urls))
    await wait_status(urls, lambda s: len(capsule(s, "counter")["hosts"]) == 2, "counter on both", hosts=hosts)
    lattice = await Lattice.connect(LatticeAddress.parse(urls))
    try:
        started = time.perf_counter()
        await restore(lattice, "counter", {"count": b"5"} | {f"k{i:06}": b"a" * 16 for i in range(keys)})
        fill_ms = (time.perf_counter() - started) * 1000
        config.write_text(COUNTER.format(step=2))
        _, apply_ms = timed_orch("apply", str(config), "--lattice", urls)
        doc = await current(lattice)
        note = doc.deployments["counter"].snapshot if doc is not None else None
        await wait_status(urls, lambda s: capsule(s, "counter")["phase"] == "Running", "step 2", hosts=hosts)
        await restore(lattice, "counter", {"count": b"9"} | {f"k{i:06}": b"b" * 16 for i in range(keys)})
        started = time.perf_counter()
        out, rollback_ms = timed_orch("rollback", "counter", "--with-data", "--lattice", urls)
        await wait_status(urls, lambda s: capsule(s, "counter")["phase"] == "Running", "resumed", hosts=hosts)
        resumed_ms = (time.perf_counter() - started) * 1000
        output, _ = await call_tool(lattice, "counter", "get", b"{}")
        values = await read_values(lattice, "counter")
    finally:
        await lattice.close()
    restored = out.split("keys restored")[0].rsplit("(", 1)[-1].strip() if "keys restored" in out else None
    return {
        "keys": keys,
        "fill_ms": round(fill_ms, 1),
        "apply_with_snapshot_ms": round(apply_ms, 1),
        "snapshot_keys": note.keys if note is not None else None,
        "snapshot_bytes": note.bytes if note is not None else None,
        "rollback_with_data_ms": round(rollback_ms, 1),
        "resumed_ms": round(resumed_ms, 1),
        "restored_keys": restored,
        "count_after": json.loads(output)["count"],
        "data_is_the_snapshot": values == {"count": b"5"} | {f"k{i:06}": b"a" * 16 for i in range(keys)},
    }


async def approve_figures(root: Path, urls: str, hosts: Hosts, rounds: int) -> dict[str, Any]:
    write_capsule(root / "ver", 0)
    config = write_config(root, {"ver": {"path": "ver", "hosts": 2}}, extra="approvals: {escalations: ask}")
    ok(orch("apply", str(config), "--lattice", urls))
    await wait_status(urls, lambda s: capsule(s, "ver")["phase"] == "Running", "ver running", hosts=hosts)
    times = []
    for round_ in range(1, rounds + 1):
        # odd rounds ask for kv (an escalation); even ones drop it again (no approval needed)
        write_capsule(root / "ver", round_ * 2 - 1, "kv = true")
        ok(orch("apply", str(config), "--lattice", urls))
        await wait_status(urls, lambda s: capsule(s, "ver")["phase"] == "AwaitingApproval", "awaiting", hosts=hosts)
        out, approve_ms = timed_orch("approve", "ver", "--lattice", urls)
        if "running version" not in out:
            raise SystemExit(f"bench: approve did not end serving: {out.strip()[:300]}")
        times.append(approve_ms)
        write_capsule(root / "ver", round_ * 2)
        ok(orch("apply", str(config), "--lattice", urls))
        await wait_status(urls, lambda s: capsule(s, "ver")["phase"] == "Running", "ver without kv", hosts=hosts)
    return {
        "rounds": rounds,
        "approve_to_serving_ms": {"median": round(statistics.median(times), 1), "max": round(max(times), 1)},
        "rounds_ms": [round(t, 1) for t in times],
    }


async def run(root: Path, urls: str, keys: int, rounds: int) -> dict[str, Any]:
    report: dict[str, Any] = {"hosts": 2}
    hosts = Hosts(root / "hosts", urls)
    try:
        hosts.start("a")
        hosts.start("b")
        await wait_status(urls, lambda s: len(s["hosts"]) == 2, "two hosts", hosts=hosts)
        report["rollback"] = await rollback_figures(root / "rollback", urls, hosts, keys)
        report["approve"] = await approve_figures(root / "approve", urls, hosts, rounds)
    finally:
        hosts.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="10,000 keys, 2 rounds")
    args = parser.parse_args()
    keys, rounds = (10_000, 2) if args.quick else (args.keys, args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench-lattice-rollback-") as tmp:
        root = Path(tmp)
        with nats_servers(root / "nats") as servers:
            report = asyncio.run(run(root, servers.urls, keys, rounds))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
