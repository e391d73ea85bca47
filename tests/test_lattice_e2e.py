"""The README's lattice walk-through, through the `orch` command only.

A NATS server and three `orch host` processes; `orch apply` of the example counter; calls,
KV and events with `--lattice`; SIGKILL of the host that runs the counter; the counter
moves to another host with every acknowledged increment intact (the KV lives in the
lattice, not on the host). Also the same on a 3-node NATS cluster with one node killed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import CAPSULES
from tests.latticehosts import Hosts, capsule, live, orch, wait_status

CONFIG = """version: 1
capsules:
  counter:
    path: capsules/counter
    publish_rate: {messages_per_second: 100000}
"""


def deployment(root: Path) -> Path:
    shutil.copytree(CAPSULES / "counter", root / "capsules" / "counter", ignore=shutil.ignore_patterns("assembly"))
    (root / "config.yaml").write_text(CONFIG)
    return root / "config.yaml"


def lattice_call(urls: str, *args: str) -> str:
    done = orch("call", *args, "--lattice", urls)
    assert done.returncode == 0, (args, done.stderr)
    return done.stdout


async def test_a_killed_host_loses_no_acknowledged_write(tmp_path: Path, hosts: Hosts) -> None:
    config = deployment(tmp_path / "deploy")
    for host_id in ("a", "b", "c"):
        hosts.start(host_id)
    await wait_status(hosts.urls, lambda s: live(s) == {"a", "b", "c"}, "three hosts", hosts=hosts)
    done = orch("apply", str(config), "--lattice", hosts.urls)
    assert done.returncode == 0, done.stderr
    status = await wait_status(
        hosts.urls, lambda s: capsule(s, "counter")["phase"] == "Running", "counter running", hosts=hosts
    )
    first = capsule(status, "counter")["hosts"][0]
    acknowledged = 0
    for _ in range(12):
        answer = json.loads(lattice_call(hosts.urls, "counter", "increment", '{"by": 1}'))
        acknowledged += 1
        assert answer == {"count": acknowledged}

    as_json = json.loads(orch("status", "--lattice", hosts.urls, "--json").stdout)
    assert {h["id"] for h in as_json["hosts"] if h["alive"]} == {"a", "b", "c"}
    assert next(c for c in as_json["capsules"] if c["name"] == "counter")["hosts"] == [first]
    stored = orch("kv", "get", "counter", "count", "--lattice", hosts.urls)
    assert stored.returncode == 0 and stored.stdout.strip() == str(acknowledged), stored.stderr
    events = orch("events", "--lattice", hosts.urls, "--topic", "counter.changed", "--history", "100", "--json")
    assert events.returncode == 0, events.stderr
    counts = [json.loads(line)["payload"]["count"] for line in events.stdout.splitlines() if line.strip()]
    assert counts == list(range(1, acknowledged + 1))  # each event once, in order

    hosts.all[first].kill()  # SIGKILL: no drain
    await wait_status(
        hosts.urls,
        lambda s: capsule(s, "counter")["hosts"] not in ([], [first]) and first not in live(s),
        "counter serving on another host",
        hosts=hosts,
    )
    assert json.loads(lattice_call(hosts.urls, "counter", "get")) == {"count": acknowledged}
    assert json.loads(lattice_call(hosts.urls, "counter", "increment", '{"by": 1}')) == {"count": acknowledged + 1}


async def test_unknown_and_bad_input_are_the_local_apis_errors(tmp_path: Path, hosts: Hosts) -> None:
    config = deployment(tmp_path / "deploy")
    hosts.start("a")
    await wait_status(hosts.urls, lambda s: live(s) == {"a"}, "one host", hosts=hosts)
    assert orch("apply", str(config), "--lattice", hosts.urls).returncode == 0
    await wait_status(hosts.urls, lambda s: capsule(s, "counter")["phase"] == "Running", "counter", hosts=hosts)
    unknown = orch("call", "nope", "get", "--lattice", hosts.urls)
    assert unknown.returncode == 1 and "no capsule 'nope'" in unknown.stderr, unknown.stderr
    bad = orch("call", "counter", "increment", '{"by": "x"}', "--lattice", hosts.urls)
    assert bad.returncode == 1 and "/by" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = orch("kv", "get", "counter", "never-set", "--lattice", hosts.urls)
    assert missing.returncode == 1 and "no key 'never-set'" in missing.stderr


async def test_no_server_is_one_line(tmp_path: Path) -> None:
    from tests.natsserver import free_port

    done = orch("call", "counter", "get", "--lattice", f"nats://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "cannot reach the lattice" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
