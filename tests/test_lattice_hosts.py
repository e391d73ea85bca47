"""Several real `orch host` processes on a real nats-server: placement, spread, labels,
re-placement after SIGKILL, lease hand-over, a bad wasm revision, drain on SIGTERM.

Hosts run as separate OS processes (tests/latticehosts.py: `python -m
orchestrator host ...`); `orch apply` runs as a process too. Every wait polls
the lattice's own status; calls go over NATS to whichever host serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from orchestrator.lattice.connection import Lattice, LatticeAddress
from orchestrator.lattice.desiredstate import current
from tests.latticehosts import Hosts, apply, call, capsule, live, wait_status, write_capsule, write_config
from tests.natsserver import NatsServers


def running_on(name: str, count: int) -> object:
    return lambda s: capsule(s, name)["phase"] == "Running" and len(capsule(s, name)["hosts"]) == count


async def test_placement_spreads_respects_labels_and_reports_shortfalls(tmp_path: Path, hosts: Hosts) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(
        tmp_path,
        {
            "one": {"path": "ver"},
            "two": {"path": "ver", "hosts": 2},
            "eu": {"path": "ver", "hosts": 2, "labels": {"zone": "eu"}},
            "many": {"path": "ver", "hosts": 5},
            "gpu": {"path": "ver", "labels": {"gpu": "big"}},
        },
    )
    hosts.start("a", zone="eu")
    hosts.start("b", zone="us")
    hosts.start("c", zone="eu")
    await wait_status(hosts.urls, lambda s: live(s) == {"a", "b", "c"}, "three hosts", hosts=hosts)
    done = apply(config, hosts.urls)
    assert done.returncode == 0, done.stderr
    status = await wait_status(
        hosts.urls,
        lambda s: (
            all(capsule(s, n)["hosts"] for n in ("one", "two", "eu", "many"))
            and len(capsule(s, "many")["hosts"]) == 3
            and len(capsule(s, "two")["hosts"]) == 2
            and len(capsule(s, "eu")["hosts"]) == 2
        ),
        "everything placed and serving",
        hosts=hosts,
    )
    assert sorted(capsule(status, "eu")["hosts"]) == ["a", "c"]  # labels constrain
    assert capsule(status, "one")["phase"] == "Running" and len(capsule(status, "one")["hosts"]) == 1
    assert capsule(status, "many")["phase"] == "Degraded"  # 3 of the 5 hosts it wants
    assert "wants 5 hosts" in capsule(status, "many")["problem"]
    assert capsule(status, "gpu")["hosts"] == [] and "labels gpu=big" in capsule(status, "gpu")["problem"]
    load = {h["id"]: h["capsules"] for h in status["hosts"]}
    assert sum(load.values()) == 1 + 2 + 2 + 3
    assert max(load.values()) - min(load.values()) <= 1, load  # spread: fewest deployments first
    output, _ = await call(hosts.urls, "eu")
    assert output == b"1"


async def test_sigkill_of_a_host_moves_its_capsule_to_another(tmp_path: Path, hosts: Hosts) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver"}})
    for host_id in ("a", "b", "c"):
        hosts.start(host_id)
    await wait_status(hosts.urls, lambda s: live(s) == {"a", "b", "c"}, "three hosts", hosts=hosts)
    assert apply(config, hosts.urls).returncode == 0
    status = await wait_status(hosts.urls, running_on("ver", 1), "ver serving", hosts=hosts)
    first = capsule(status, "ver")["hosts"][0]
    assert (await call(hosts.urls, "ver"))[1] == first
    hosts.all[first].kill()
    status = await wait_status(
        hosts.urls,
        lambda s: capsule(s, "ver")["hosts"] not in ([], [first]) and first not in live(s),
        "ver serving on another host",
        hosts=hosts,
    )
    second = capsule(status, "ver")["hosts"][0]
    assert second != first and second in {"a", "b", "c"}
    output, answered = await call(hosts.urls, "ver")
    assert (output, answered) == (b"1", second)


async def test_sigkill_of_the_lease_holder_hands_the_lease_over(tmp_path: Path, hosts: Hosts) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver", "hosts": 3}})
    for host_id in ("a", "b", "c"):
        hosts.start(host_id)
    status = await wait_status(
        hosts.urls, lambda s: live(s) == {"a", "b", "c"} and s["scheduler"], "three hosts, one scheduler", hosts=hosts
    )
    holder = status["scheduler"]
    hosts.all[holder].kill()
    status = await wait_status(
        hosts.urls,
        lambda s: s["scheduler"] not in (None, holder) and holder not in live(s),
        "another host holding the lease",
        hosts=hosts,
    )
    survivors = {"a", "b", "c"} - {holder}
    assert status["scheduler"] in survivors
    assert apply(config, hosts.urls).returncode == 0  # the new holder places what is applied now
    status = await wait_status(hosts.urls, lambda s: len(capsule(s, "ver")["hosts"]) == 2, "ver on both", hosts=hosts)
    assert set(capsule(status, "ver")["hosts"]) == survivors
    assert "wants 3 hosts" in capsule(status, "ver")["problem"]


async def test_a_bad_wasm_revision_keeps_the_last_good_version_serving_on_every_host(
    tmp_path: Path, hosts: Hosts
) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver", "hosts": 3}})
    for host_id in ("a", "b", "c"):
        hosts.start(host_id)
    assert apply(config, hosts.urls).returncode == 0
    status = await wait_status(hosts.urls, running_on("ver", 3), "ver on three hosts", hosts=hosts)
    good = capsule(status, "ver")["version"]
    write_capsule(tmp_path / "ver", None, wat='(module (func (export "version") this is not wat')
    broken = apply(config, hosts.urls)  # `orch apply` checks files as `orch validate` does: modules load on hosts
    assert broken.returncode == 0, broken.stderr

    def degraded_everywhere(s: dict[str, object]) -> bool:
        on = capsule(s, "ver")["on"]  # type: ignore[arg-type]
        return len(on) == 3 and all(o["phase"] == "Degraded" and o["version"] == good for o in on)

    status = await wait_status(hosts.urls, degraded_everywhere, "every host degraded on the good version", hosts=hosts)
    assert all(o["last_error"] for o in capsule(status, "ver")["on"])
    assert sorted(capsule(status, "ver")["hosts"]) == ["a", "b", "c"]  # still serving, everywhere
    answers = {await call(hosts.urls, "ver") for _ in range(12)}
    assert {output for output, _ in answers} == {b"1"}
    write_capsule(tmp_path / "ver", 2)
    assert apply(config, hosts.urls).returncode == 0
    status = await wait_status(
        hosts.urls,
        lambda s: running_on("ver", 3)(s) and capsule(s, "ver")["version"] != good,  # type: ignore[operator]
        "the fixed version on every host",
        hosts=hosts,
    )
    assert (await call(hosts.urls, "ver"))[0] == b"2"


async def test_sigterm_drains_a_host_moves_its_capsules_and_drops_no_call(tmp_path: Path, hosts: Hosts) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver"}})
    hosts.start("a")
    hosts.start("b")
    await wait_status(hosts.urls, lambda s: live(s) == {"a", "b"}, "two hosts", hosts=hosts)
    assert apply(config, hosts.urls).returncode == 0
    status = await wait_status(hosts.urls, running_on("ver", 1), "ver serving", hosts=hosts)
    leaving = capsule(status, "ver")["hosts"][0]
    staying = ({"a", "b"} - {leaving}).pop()
    answers: list[tuple[bytes, str]] = []
    stop = asyncio.Event()

    async def keep_calling() -> None:
        lattice = await Lattice.connect(LatticeAddress.parse(hosts.urls))
        try:
            from orchestrator.lattice.wiring import call_tool

            while not stop.is_set():
                output, details = await call_tool(lattice, "ver", "version", b"{}", timeout=10)
                answers.append((output, details["X-Host"]))
        finally:
            await lattice.close()

    caller = asyncio.get_running_loop().create_task(keep_calling())
    await asyncio.sleep(0)
    code = await asyncio.to_thread(hosts.all[leaving].terminate)
    assert code == 0, hosts.all[leaving].log()
    status = await wait_status(hosts.urls, lambda s: capsule(s, "ver")["hosts"] == [staying], "moved", hosts=hosts)
    while not any(host == staying for _, host in answers):
        await asyncio.sleep(0.05)
    stop.set()
    await caller  # raises if any call failed: none may be dropped
    assert {output for output, _ in answers} == {b"1"}
    assert leaving not in live(status)
    assert "left the lattice" in hosts.all[leaving].log()


async def test_an_invalid_apply_changes_nothing(tmp_path: Path, nats_server: NatsServers) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver"}})
    assert apply(config, nats_server.urls).returncode == 0
    address = LatticeAddress.parse(nats_server.urls)
    lattice = await Lattice.connect(address)
    try:
        before = await current(lattice)
        assert before is not None
        (config.parent / "config.yaml").write_text(config.read_text() + "    hostz: 2\n")
        typo = apply(config, nats_server.urls)
        assert typo.returncode == 1 and "hostz" in typo.stderr and "nothing was published" in typo.stderr
        write_config(tmp_path, {"ver": {"path": "ver"}, "gone": {"path": "missing"}})
        missing = apply(config, nats_server.urls)
        assert missing.returncode == 1 and "missing" in missing.stderr
        write_config(tmp_path, {"ver": {"path": "ver"}})
        (tmp_path / "ver" / "Capsule.toml").write_text("[package]\nname = 'ver'\n")
        manifest = apply(config, nats_server.urls)
        assert manifest.returncode == 1 and "Capsule.toml" in manifest.stderr
        after = await current(lattice)
        assert after is not None and after.revision == before.revision
    finally:
        await lattice.close()


BUSY = """(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store (param i64 i32)))
  (import "extism:host/user" "astrid_log" (func $log (param i64 i64)))
  (func $text (param $a i32) (param $b i32) (param $c i32) (param $d i32) (result i64) (local $p i64)
    (local.set $p (call $alloc (i64.const 4)))
    (call $store (local.get $p) (local.get $a))
    (call $store (i64.add (local.get $p) (i64.const 1)) (local.get $b))
    (call $store (i64.add (local.get $p) (i64.const 2)) (local.get $c))
    (call $store (i64.add (local.get $p) (i64.const 3)) (local.get $d))
    (local.get $p))
  (func (export "version") (result i32)
    (call $log (call $text (i32.const 105) (i32.const 110) (i32.const 102) (i32.const 111))
               (call $text (i32.const 98) (i32.const 117) (i32.const 115) (i32.const 121)))
    (loop $forever (br $forever))
    (i32.const 0)))
"""


async def test_a_second_signal_exits_at_once(tmp_path: Path, hosts: Hosts) -> None:
    write_capsule(tmp_path / "busy", None, wat=BUSY)  # its one tool logs "busy", then spins for a minute
    limits = {"fuel": 9_000_000_000_000_000_000, "timeout_ms": 60_000}
    config = write_config(tmp_path, {"busy": {"path": "busy", "limits": limits}})
    host = hosts.start("a")
    assert apply(config, hosts.urls).returncode == 0
    await wait_status(hosts.urls, running_on("busy", 1), "busy serving", hosts=hosts)
    stuck = asyncio.get_running_loop().create_task(call(hosts.urls, "busy", timeout=90))

    async def logged(text: str) -> None:
        while text not in host.log():
            assert not stuck.done() or stuck.cancelled(), stuck
            await asyncio.sleep(0.05)

    await asyncio.wait_for(logged("busy"), 30)  # the call is running: a drain waits for it
    assert host.process is not None
    host.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(logged("draining"), 30)
    host.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(host.process.wait, 15)  # long before the call could end
    assert code == 130 and "second signal: exiting now" in host.log()
    stuck.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await stuck
