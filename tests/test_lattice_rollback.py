"""History and rollback on a lattice (orchestrator.lattice.versions, .rollback, .snapshots):
real nats-server, real `orch host` processes, real `orch apply|history|rollback|unpin`.

`orch history --lattice` lists the versions from the desired bucket's history; a rollback
pins an earlier version, which survives an unrelated apply and ends on a change of the
deployment or `orch unpin`; `--with-data` puts back the KV data the version left (the
counter's value), while no call of the deployment is answered from a half-restored store;
a rollback interrupted mid-restore leaves the deployment paused, and running it again
completes it; everything is checked before anything changes.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

from orchestrator.lattice.calls import LatticeCallError, call_tool
from orchestrator.lattice.connection import Lattice, LatticeAddress
from orchestrator.lattice.desiredstate import current
from orchestrator.lattice.kvstore import JetStreamKV
from orchestrator.lattice.rollback import rollback
from orchestrator.lattice.snapshots import read_values, restore
from tests.conftest import CAPSULES
from tests.latticehosts import Hosts, call, capsule, live, module, ok, orch, wait_status, write_capsule, write_config

SECRET = '\n[env.token]\ntype = "secret"\n'


async def serving(urls: str, name: str, output: bytes, hosts: Hosts) -> None:
    """Until the lattice runs one version of `name` everywhere and it answers `output`."""
    await wait_status(urls, lambda s: capsule(s, name)["phase"] == "Running", f"{name} running", hosts=hosts)
    end = time.monotonic() + 30
    while (answer := (await call(urls, name))[0]) != output:
        assert time.monotonic() < end, f"{name} answers {answer!r}, not {output!r}"
        await asyncio.sleep(0.1)


async def desired_revision(urls: str) -> int:
    lattice = await Lattice.connect(LatticeAddress.parse(urls))
    try:
        doc = await current(lattice)
        assert doc is not None
        return doc.revision
    finally:
        await lattice.close()


async def test_history_and_a_pin_that_survives_an_unrelated_apply_and_ends_on_a_change_or_unpin(
    tmp_path: Path, hosts: Hosts
) -> None:
    write_capsule(tmp_path / "ver", 1, extra=SECRET)
    write_capsule(tmp_path / "other", 7, extra=SECRET)
    deployments = {
        "ver": {"path": "ver", "config": {"token": "t1"}},
        "other": {"path": "other", "config": {"token": "o"}},
    }
    config = write_config(tmp_path, deployments, extra="history: {snapshots: 0}")
    urls = hosts.urls
    hosts.start("a")
    await wait_status(urls, lambda s: live(s) == {"a"}, "a host", hosts=hosts)
    revisions = {}
    for value in (1, 2, 3):
        (tmp_path / "ver" / "v.wat").write_text(module(value))
        ok(orch("apply", str(config), "--lattice", urls))
        await serving(urls, "ver", str(value).encode(), hosts)
        revisions[value] = await desired_revision(urls)

    history = json.loads(ok(orch("history", "ver", "--lattice", urls, "--json")))
    entries = history["entries"]
    assert [e["id"] for e in entries] == [revisions[3], revisions[2], revisions[1]]
    assert [e["event"] for e in entries] == ["apply"] * 3 and [e["current"] for e in entries] == [True, False, False]
    assert entries[1]["reasons"] == [f"wasm {entries[2]['version'][:6]}→{entries[1]['version'][:6]}"]
    assert all(e["by"] and e["module_kept"] and e["snapshot"] is None for e in entries)
    assert "history.snapshots is 0" in entries[1]["note"] and history["pinned"] is None
    table = ok(orch("history", "ver", "--lattice", urls))
    assert f"@{revisions[3]}*" in table and entries[2]["version"] in table

    refused = orch("rollback", "ver", "--lattice", urls, "--with-data")
    assert refused.returncode == 1 and "no snapshot of the data of version" in refused.stderr
    assert "history.snapshots is 0" in refused.stderr
    unknown = orch("rollback", "ver", "--lattice", urls, "--to", "ffff")
    assert unknown.returncode == 1 and "no earlier version ffff" in unknown.stderr
    assert await desired_revision(urls) == revisions[3]  # nothing changed

    rolled = ok(orch("rollback", "ver", "--lattice", urls))
    assert f"rolled back to version {entries[1]['version']} (entry @{revisions[2]})" in rolled
    assert f"pinned to version {entries[1]['version']}" in rolled
    await serving(urls, "ver", b"2", hosts)
    status = json.loads(ok(orch("status", "--lattice", urls, "--json")))
    assert capsule(status, "ver")["pinned"]["revision"] == revisions[2]
    assert "(pinned)" in ok(orch("status", "--lattice", urls))

    (tmp_path / "other" / "v.wat").write_text(module(8))  # an unrelated change keeps the pin
    ok(orch("apply", str(config), "--lattice", urls))
    await serving(urls, "other", b"8", hosts)
    assert (await call(urls, "ver"))[0] == b"2"
    history = json.loads(ok(orch("history", "ver", "--lattice", urls, "--json")))
    assert history["entries"][0]["event"] == "rollback" and history["pinned"]["version"] == entries[1]["version"]

    (tmp_path / "ver" / "v.wat").write_text(module(4))  # a change of the deployment ends it
    ok(orch("apply", str(config), "--lattice", urls))
    await serving(urls, "ver", b"4", hosts)
    assert capsule(json.loads(ok(orch("status", "--lattice", urls, "--json"))), "ver")["pinned"] is None

    ok(orch("rollback", "ver", "--lattice", urls, "--to", f"@{revisions[1]}"))
    await serving(urls, "ver", b"1", hosts)
    unpinned = ok(orch("unpin", "ver", "--lattice", urls))
    assert "ver: unpinned" in unpinned
    await serving(urls, "ver", b"4", hosts)
    again = orch("unpin", "ver", "--lattice", urls)
    assert again.returncode == 1 and "is not pinned" in again.stderr

    deployments["ver"]["config"] = {"token": "t2"}  # a rotated secret never comes back with a rollback
    (tmp_path / "ver" / "v.wat").write_text(module(5))
    ok(orch("apply", str(write_config(tmp_path, deployments, extra="history: {snapshots: 0}")), "--lattice", urls))
    await serving(urls, "ver", b"5", hosts)
    before = await desired_revision(urls)
    secret = orch("rollback", "ver", "--lattice", urls)
    assert secret.returncode == 1 and "its secret 'token' differs from today's config" in secret.stderr
    assert "t1" not in secret.stderr and "t2" not in secret.stderr
    assert await desired_revision(urls) == before


# -- with data: the counter ----------------------------------------------------------------------
COUNTER = """version: 1
capsules:
  counter:
    path: capsules/counter
    hosts: 2
    config: {{step: {step}}}
"""


async def counter_lattice(tmp_path: Path, hosts: Hosts, keys: int) -> Lattice:
    """Two hosts run the counter; count 5 and `keys` other keys are stored by version 1
    (step 1); version 2 (step 2) replaces it, which snapshots that data; then the data
    changes: count 7, every other key rewritten, some deleted, one added."""
    root = tmp_path / "deploy"
    shutil.copytree(CAPSULES / "counter", root / "capsules" / "counter", ignore=shutil.ignore_patterns("assembly"))
    config = root / "config.yaml"
    config.write_text(COUNTER.format(step=1))
    hosts.start("a")
    hosts.start("b")
    urls = hosts.urls
    await wait_status(urls, lambda s: live(s) == {"a", "b"}, "two hosts", hosts=hosts)
    ok(orch("apply", str(config), "--lattice", urls))
    await wait_status(urls, lambda s: len(capsule(s, "counter")["hosts"]) == 2, "counter on both", hosts=hosts)
    lattice = await Lattice.connect(LatticeAddress.parse(urls))
    for expected in range(1, 6):
        output, _ = await call_tool(lattice, "counter", "increment", b"{}")
        assert json.loads(output) == {"count": expected}
    await restore(lattice, "counter", {"count": b"5"} | {f"k{i:05}": b"a" for i in range(keys)})
    config.write_text(COUNTER.format(step=2))
    ok(orch("apply", str(config), "--lattice", urls))
    await wait_status(urls, lambda s: capsule(s, "counter")["phase"] == "Running", "step 2 running", hosts=hosts)
    output, _ = await call_tool(lattice, "counter", "increment", b"{}")
    assert json.loads(output) == {"count": 7}
    changed = {f"k{i:05}": b"b" for i in range(100, keys)} | {"count": b"7", "extra": b"x"}
    await restore(lattice, "counter", changed)
    return lattice


async def test_rollback_with_data_restores_the_kv_and_no_call_sees_a_half_restored_store(
    tmp_path: Path, hosts: Hosts
) -> None:
    lattice = await counter_lattice(tmp_path, hosts, keys=2500)
    store = await JetStreamKV.open(lattice)
    answers: list[tuple[float, int | str]] = []
    batches: list[tuple[int, int]] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                output, _ = await call_tool(lattice, "counter", "get", b"{}")
                answers.append((sent, json.loads(output)["count"]))
            except LatticeCallError as error:
                assert error.status == 409 and error.kind == "CapsuleNotRunning", error
                answers.append((sent, "not running"))
                await asyncio.sleep(0.01)

    async def between_batches(done: int, total: int) -> None:
        batches.append((done, total))
        with pytest.raises(LatticeCallError) as refused:  # the store is half-restored: no call runs
            await call_tool(lattice, "counter", "get", b"{}")
        assert refused.value.status == 409
        assert await store.get("counter", "count") == b"5"  # the restore itself went ahead

    try:
        calling = asyncio.get_running_loop().create_task(caller())
        while len(answers) < 3:
            await asyncio.sleep(0.01)
        answer = await rollback(lattice, "counter", with_data=True, progress=between_batches)
        await wait_status(hosts.urls, lambda s: capsule(s, "counter")["phase"] == "Running", "resumed", hosts=hosts)
        while not any(a == 5 for _, a in answers[-1:]):
            await asyncio.sleep(0.01)
        stop.set()
        await calling
    finally:
        stop.set()
        await store.close()
        await lattice.close()
    assert answer["restored_keys"] == 2 + 2400 + 100  # count, the rewritten keys, the deleted ones; extra removed
    assert answer["status"]["pinned"] is not None and answer["with_data"] is True
    assert [t for _, t in batches] == [3, 3, 3]
    counts = [a for _, a in answers]
    first_five = counts.index(5)
    assert set(counts[:first_five]) <= {7, "not running"} and 7 in counts[:first_five]
    assert set(counts[first_five:]) == {5}, "a call answered from the old data after the restore"
    assert "not running" in counts[:first_five]
    lattice = await Lattice.connect(LatticeAddress.parse(hosts.urls))
    try:
        values = await read_values(lattice, "counter")
    finally:
        await lattice.close()
    assert values == {"count": b"5"} | {f"k{i:05}": b"a" for i in range(2500)}
    assert ok(orch("kv", "get", "counter", "count", "--lattice", hosts.urls)).strip() == "5"
    status = capsule(json.loads(ok(orch("status", "--lattice", hosts.urls, "--json"))), "counter")
    assert status["paused"] is False and status["restoring"] is None and status["pinned"] is not None


async def test_a_rollback_interrupted_mid_restore_stays_paused_and_running_it_again_completes(
    tmp_path: Path, hosts: Hosts
) -> None:
    lattice = await counter_lattice(tmp_path, hosts, keys=1500)

    async def crash(done: int, total: int) -> None:
        raise RuntimeError(f"simulated crash after batch {done} of {total}")

    try:
        with pytest.raises(RuntimeError, match="simulated crash after batch 1 of 2"):
            await rollback(lattice, "counter", with_data=True, progress=crash)
    finally:
        await lattice.close()
    urls = hosts.urls
    status = await wait_status(urls, lambda s: capsule(s, "counter")["hosts"] == [], "nobody serves", hosts=hosts)
    row = capsule(status, "counter")
    assert row["phase"] == "Paused" and row["paused"] is True and row["restoring"] is not None
    assert "paused by `orch rollback counter --with-data`" in row["message"]
    refused = orch("call", "counter", "get", "--lattice", urls)
    assert refused.returncode == 1 and "paused by `orch rollback counter --with-data`" in refused.stderr
    assert "Paused" in ok(orch("status", "--lattice", urls))

    finished = ok(orch("rollback", "counter", "--with-data", "--lattice", urls))
    assert "with its data (" in finished and "keys restored)" in finished
    await wait_status(urls, lambda s: capsule(s, "counter")["phase"] == "Running", "resumed", hosts=hosts)
    assert json.loads(ok(orch("call", "counter", "get", "--lattice", urls))) == {"count": 5}
    assert ok(orch("kv", "get", "counter", "k01499", "--lattice", urls)) == "a"
    missing = orch("kv", "get", "counter", "extra", "--lattice", urls)
    assert missing.returncode == 1
