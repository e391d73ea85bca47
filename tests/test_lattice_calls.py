"""Tool calls over the lattice, on a real nats-server: several Lattice connections (and one
separate process) stand for hosts.

Covered: calls answered by every host of a deployment (queue group); errors identical in
kind, message and status to the control API's for each kind a call can meet (a real
Orchestrator served both ways); nobody running a deployment (409, or 404 given the
desired state); a host closing in the middle of a stream of calls (the calls it took are
answered, the rest go elsewhere, none fails); a host SIGKILLed in the middle of a call (the
caller times out, no other host runs it); concurrency and its bounds; a caller that gave up
before its call started; outputs and arguments of 1 MiB; hostile requests answered 400/413
while the host keeps serving.

Hosts with a fake `call` are unit tests of this layer (what reaches the host is counted);
the error tests run real capsules. Waits are on answers and events, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from orchestrator.api.client import RemoteError
from orchestrator.errors import GuestError, OrchestratorError
from orchestrator.lattice.calls import CallServer, LatticeCallError, call_tool
from orchestrator.lattice.callwire import MAX_ARGUMENT_BYTES, decode_request, encode_request
from orchestrator.lattice.connection import Lattice, LatticeAddress, barrier
from tests.natsserver import NatsServers, wait_for
from tests.test_api import Served, add_oddball, serve

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Result:
    output: bytes
    fuel_used: int = 7
    seconds: float = 0.001
    attempts: int = 1


class Connections:
    """Lattice connections standing for hosts and clients; all closed at the end."""

    def __init__(self, urls: str) -> None:
        self.urls = urls
        self.opened: list[Lattice] = []
        self.servers: list[CallServer] = []

    async def connect(self) -> Lattice:
        lattice = await Lattice.connect(LatticeAddress.parse(self.urls, name="calls"))
        self.opened.append(lattice)
        return lattice

    async def host(self, host_id: str, call: Callable[[str, str, Any], Awaitable[Any]], **options: Any) -> CallServer:
        server = CallServer(await self.connect(), call, host_id, **options)
        self.servers.append(server)
        return server


@pytest.fixture
async def lattices(nats_server: NatsServers) -> AsyncIterator[Connections]:
    made = Connections(nats_server.urls)
    try:
        yield made
    finally:
        for server in made.servers:
            await server.close()
        for lattice in made.opened:
            await lattice.close()


class Recorder:
    """A fake host call: records what reached it, answers with the host's name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str, Any]] = []

    async def __call__(self, deployment: str, tool: str, arguments: Any) -> Result:
        self.calls.append((deployment, tool, arguments))
        return Result(json.dumps({"host": self.name, "arguments": arguments}).encode())


# == any host answers ==========================================================================
async def test_every_host_of_a_deployment_answers_its_calls(lattices: Connections) -> None:
    a, b, elsewhere = Recorder("a"), Recorder("b"), Recorder("c")
    for name, recorder, deployment in (("a", a, "hello"), ("b", b, "hello"), ("c", elsewhere, "other")):
        await (await lattices.host(name, recorder)).serve(deployment)
    client = await lattices.connect()
    answered_by: dict[str, int] = {}
    for i in range(60):
        output, headers = await call_tool(client, "hello", "greet", json.dumps({"i": i}).encode())
        assert json.loads(output)["arguments"] == {"i": i}
        assert headers["X-Fuel-Used"] == "7" and headers["X-Attempts"] == "1" and headers["X-Seconds"] == "0.001000"
        answered_by[headers["X-Host"]] = answered_by.get(headers["X-Host"], 0) + 1
    assert set(answered_by) == {"a", "b"} and sum(answered_by.values()) == 60
    assert (len(a.calls), len(b.calls), len(elsewhere.calls)) == (answered_by["a"], answered_by["b"], 0)
    assert {call[:2] for call in a.calls + b.calls} == {("hello", "greet")}


async def test_calls_run_concurrently_on_a_host(lattices: Connections) -> None:
    together = 12
    arrived = 0
    all_in = asyncio.Event()

    async def meet(deployment: str, tool: str, arguments: Any) -> Result:
        nonlocal arrived
        arrived += 1
        if arrived == together:
            all_in.set()
        await all_in.wait()  # only returns if all `together` calls run at once
        return Result(b"met")

    await (await lattices.host("a", meet)).serve("meet")
    client = await lattices.connect()
    answers = await asyncio.gather(*(call_tool(client, "meet", "t", b"{}", timeout=20) for _ in range(together)))
    assert [output for output, _ in answers] == [b"met"] * together


# == the errors of the local API ===============================================================
SLOTH = """  sloth:
    path: capsules/oddball
    limits: {fuel: 100000000000000, timeout_ms: 100}
"""


@pytest.fixture
async def served_on_lattice(tmp_path: Path, nats_server: NatsServers) -> AsyncIterator[tuple[Served, Lattice]]:
    """The control API's test deployment (counter, milestones, notes, oddball, and `sloth`:
    oddball with a 100 ms timeout), served over its socket and on the lattice, where the
    host also claims `ghost`, a deployment its configuration does not have."""
    config = add_oddball(tmp_path)
    config.write_text(config.read_text() + SLOTH)
    async with serve(tmp_path) as served:
        reconciler = served.orchestrator.reconciler
        assert reconciler is not None
        host = await Lattice.connect(LatticeAddress.parse(nats_server.urls, name="calls"))
        client = await Lattice.connect(LatticeAddress.parse(nats_server.urls, name="calls"))
        server = CallServer(host, reconciler.call_tool, "host-1")
        for name in ("counter", "milestones", "notes", "oddball", "sloth", "ghost"):
            await server.serve(name)
        try:
            yield served, client
        finally:
            await server.close()
            await client.close()
            await host.close()


CASES = [
    ("counter", "explode", b"{}", "UnknownTool"),
    ("counter", "increment", b'{"by": "x"}', "ToolInputError"),
    ("counter", "increment", b"[1, 2]", "ToolInputError"),
    ("counter", "increment", b"{nope", "BadJson"),
    ("counter", "increment", b'{"by": 1', "BadJson"),
    ("counter", "increment", b"\xff\xfe", "BadJson"),
    ("counter", "increment", b"\xef\xbb\xbf{}", "BadJson"),
    ("counter", "increment", b'{"by": 99999999999999999999999}', "CapsuleTrap"),
    ("oddball", "fail", b"", "GuestError"),
    ("oddball", "trap", b"", "CapsuleTrap"),
    ("oddball", "spin", b"", "FuelExhausted"),
    ("sloth", "spin", b"", "CallTimeout"),
    ("notes", "peek", b'{"path": "/etc/passwd"}', "CapabilityDenied"),
    ("ghost", "get", b"", "UnknownCapsule"),
]


async def test_errors_are_the_local_apis_kind_message_and_status(
    served_on_lattice: tuple[Served, Lattice],
) -> None:
    served, client = served_on_lattice
    for capsule, tool, body, kind in CASES:
        local = await served.error("POST", f"/v1/capsules/{capsule}/tools/{tool}", body)
        with pytest.raises(LatticeCallError) as remote:
            await call_tool(client, capsule, tool, body)
        assert local.kind == kind, (capsule, tool, str(local))
        assert (remote.value.status, remote.value.kind, str(remote.value)) == (local.status, local.kind, str(local))
    # a capsule the host runs no version of: stopped by a reconcile (enabled: false)
    served.config.write_text(
        served.config.read_text().replace(
            "    path: capsules/notes\n", "    path: capsules/notes\n    enabled: false\n"
        )
    )
    await served.json("POST", "/v1/reconcile")
    local = await served.error("POST", "/v1/capsules/notes/tools/list", b"{}")
    with pytest.raises(LatticeCallError) as remote:
        await call_tool(client, "notes", "list", b"{}")
    assert (local.status, local.kind) == (409, "CapsuleNotRunning")
    assert (remote.value.status, remote.value.kind, str(remote.value)) == (local.status, local.kind, str(local))
    # and a success carries the API's headers and output
    async with served.client() as api:
        local_output, local_headers = await api.call("oddball", "ok", b"")
    output, headers = await call_tool(client, "oddball", "ok", b"")
    assert output == local_output == b"ok"
    assert headers["X-Fuel-Used"] == local_headers["X-Fuel-Used"] and headers["X-Host"] == "host-1"
    assert await served.count() == 0  # no failed call ran the counter


# == nobody runs it ===========================================================================
async def test_a_deployment_no_host_runs_is_409_or_404_from_the_desired_state(lattices: Connections) -> None:
    client = await lattices.connect()
    with pytest.raises(LatticeCallError) as nobody:
        await call_tool(client, "counter", "get", b"")
    assert (nobody.value.status, nobody.value.kind) == (409, "CapsuleNotRunning")
    assert "no host runs capsule 'counter' in lattice 'calls'" in str(nobody.value)

    async def deployed() -> list[str]:
        return ["counter", "notes"]

    with pytest.raises(LatticeCallError) as unknown:
        await call_tool(client, "nope", "get", b"", deployed=deployed)
    # the very message the local reconciler gives (orchestrator.control.reconciler)
    assert (unknown.value.status, unknown.value.kind, str(unknown.value)) == (
        404,
        "UnknownCapsule",
        "no capsule 'nope' (deployed: counter, notes)",
    )
    with pytest.raises(LatticeCallError) as stopped:
        await call_tool(client, "counter", "get", b"", deployed=deployed)
    assert stopped.value.status == 409
    with pytest.raises(LatticeCallError) as too_long:
        await call_tool(client, "é" * 600, "get", b"")
    assert too_long.value.status == 404 and "over the lattice's limit" in str(too_long.value)


async def test_unserve_leaves_one_deployment_and_serve_rejoins(lattices: Connections) -> None:
    recorder = Recorder("a")
    host = await lattices.host("a", recorder)
    await host.serve("one")
    await host.serve("two")
    await host.serve("two")  # idempotent
    assert host.serving == ["one", "two"]
    await host.unserve("one")
    client = await lattices.connect()
    with pytest.raises(LatticeCallError) as gone:
        await call_tool(client, "one", "t", b"")
    assert gone.value.status == 409
    assert (await call_tool(client, "two", "t", b""))[1]["X-Host"] == "a"
    await host.serve("one")
    hosts: list[str] = []

    async def answered() -> bool:  # the server may route to a new subscription a moment after it is made
        try:
            hosts.append((await call_tool(client, "one", "t", b""))[1]["X-Host"])
        except LatticeCallError as error:
            assert error.status == 409  # no responder yet: nothing ran
        return bool(hosts)

    await wait_for(answered, "the rejoined deployment answering")
    assert hosts == ["a"]
    assert [c[0] for c in recorder.calls] == ["two", "one"]


async def test_hosts_on_different_nodes_of_a_cluster_share_the_calls(nats_cluster: NatsServers) -> None:
    urls = nats_cluster.urls.split(",")
    made = [Connections(url) for url in urls]  # each host and the client on its own node
    try:
        recorders = [Recorder("a"), Recorder("b")]
        for connections, recorder in zip(made, recorders, strict=False):
            await (await connections.host(recorder.name, recorder)).serve("hello")
        client = await made[2].connect()
        answered: list[str] = []

        async def both_answered() -> bool:  # interest crosses the routes asynchronously
            try:
                answered.append((await call_tool(client, "hello", "t", b"{}"))[1]["X-Host"])
            except LatticeCallError as error:
                assert error.kind == "CapsuleNotRunning"  # no interest on this node yet
            return set(answered) == {"a", "b"}

        await wait_for(both_answered, "both hosts answering calls from a third node")
        answered += [(await call_tool(client, "hello", "t", b"{}"))[1]["X-Host"] for _ in range(20)]
        assert len(recorders[0].calls) == answered.count("a") and len(recorders[1].calls) == answered.count("b")
    finally:
        for connections in made:
            for server in connections.servers:
                await server.close()
            for lattice in connections.opened:
                await lattice.close()


# == hosts leaving =============================================================================
async def test_a_host_that_closes_mid_stream_answers_what_it_took_and_nothing_fails(lattices: Connections) -> None:
    release = asyncio.Event()
    held = 0
    first_held = asyncio.Event()

    async def slow_a(deployment: str, tool: str, arguments: Any) -> Result:
        nonlocal held
        held += 1
        first_held.set()
        await release.wait()  # calls A took stay in flight until the test lets them go
        return Result(b"a")

    b = Recorder("b")
    host_a = await lattices.host("a", slow_a)
    await host_a.serve("svc")
    await (await lattices.host("b", b)).serve("svc")
    client = await lattices.connect()

    outcomes: list[bytes | BaseException] = []

    async def caller() -> None:
        for _ in range(25):
            try:
                output, _ = await call_tool(client, "svc", "t", b"{}", timeout=30)
                outcomes.append(output)
            except LatticeCallError as error:
                outcomes.append(error)

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    await asyncio.wait_for(first_held.wait(), 20)
    closing = asyncio.create_task(host_a.close())
    await wait_for(lambda: "svc" not in host_a.serving, "host a leaving the queue group")
    assert not closing.done()  # it waits for the calls it took
    taken = held
    release.set()
    await asyncio.wait_for(closing, 20)
    await asyncio.wait_for(asyncio.gather(*callers), 60)
    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    assert outcomes.count(b"a") == taken == host_a.answered and len(outcomes) == 100
    assert len(b.calls) == 100 - taken  # everything after the drain went to b
    with pytest.raises(OrchestratorError, match="closed"):
        await host_a.serve("svc")


HOST_SCRIPT = """
import asyncio, sys
from orchestrator.lattice.calls import CallServer
from orchestrator.lattice.connection import Lattice, LatticeAddress, barrier

async def main():
    lattice = await Lattice.connect(LatticeAddress.parse(sys.argv[1], name="calls"))
    async def call(deployment, tool, arguments):
        await lattice.nc.publish("test.started", b"")
        await barrier(lattice.nc)
        await asyncio.sleep(3600)
    server = CallServer(lattice, call, "doomed")
    await server.serve("slow")
    print("serving", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_host_killed_mid_call_is_a_timeout_and_the_call_is_not_run_again(
    lattices: Connections, nats_server: NatsServers
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOST_SCRIPT, nats_server.urls, cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 30) == b"serving\n"
        watcher = await lattices.connect()
        started = await watcher.nc.subscribe("test.started")
        await barrier(watcher.nc)
        client = await lattices.connect()
        call = asyncio.create_task(call_tool(client, "slow", "work", b'{"n": 1}', timeout=3))
        await started.next_msg(timeout=20)  # the doomed host is running it
        survivor = Recorder("survivor")
        await (await lattices.host("survivor", survivor)).serve("slow")
        process.send_signal(signal.SIGKILL)
        await process.wait()
        with pytest.raises(LatticeCallError) as timed_out:
            await call
        assert (timed_out.value.status, timed_out.value.kind) == (504, "CallTimeout")
        assert "may have run" in str(timed_out.value) and "not retried" in str(timed_out.value)
        assert survivor.calls == []  # never run a second time
        output, headers = await call_tool(client, "slow", "work", b"{}")  # the next call goes to the survivor
        assert headers["X-Host"] == "survivor" and json.loads(output)["host"] == "survivor"
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# == bounds and deadlines =======================================================================
async def test_a_host_past_its_bound_refuses_with_503_and_runs_nothing_more(lattices: Connections) -> None:
    release = asyncio.Event()
    ran = 0

    async def blocked(deployment: str, tool: str, arguments: Any) -> Result:
        nonlocal ran
        ran += 1
        await release.wait()
        return Result(b"done")

    host = await lattices.host("a", blocked, max_concurrent=1, max_waiting=1)
    await host.serve("svc")
    client = await lattices.connect()
    first = asyncio.create_task(call_tool(client, "svc", "t", b"", timeout=30))
    await wait_for(lambda: ran == 1, "the first call running")
    second = asyncio.create_task(call_tool(client, "svc", "t", b"", timeout=30))
    await wait_for(lambda: host.in_flight == 2, "the second call waiting")
    with pytest.raises(LatticeCallError) as busy:
        await call_tool(client, "svc", "t", b"", timeout=30)
    assert (busy.value.status, busy.value.kind) == (503, "HostBusy") and "was not called" in str(busy.value)
    release.set()
    assert [(await first)[0], (await second)[0]] == [b"done", b"done"]
    assert ran == 2 and host.refused == 1


async def test_a_call_whose_caller_gave_up_before_a_slot_freed_is_not_started(lattices: Connections) -> None:
    release = asyncio.Event()
    runs: list[Any] = []

    async def one_at_a_time(deployment: str, tool: str, arguments: Any) -> Result:
        runs.append(arguments)
        await release.wait()
        return Result(b"ok")

    host = await lattices.host("a", one_at_a_time, max_concurrent=1)
    await host.serve("svc")
    client = await lattices.connect()
    holder = asyncio.create_task(call_tool(client, "svc", "t", b'"holder"', timeout=30))
    await wait_for(lambda: runs == ["holder"], "the first call holding the only slot")
    # what call_tool(timeout=0.3) sends; here with 1 ms, so that however late the host got it,
    # the caller's wait is over when the slot frees
    assert decode_request(encode_request("t", b"{}", 300)).timeout_ms == 300
    impatient = b'{"tool": "t", "arguments": "\\"impatient\\"", "timeout_ms": 1}'
    with pytest.raises(nats.errors.TimeoutError):
        await client.nc.request(client.names.call("svc"), impatient, timeout=0.3)
    await wait_for(lambda: host.in_flight == 2, "the impatient call waiting for the slot")
    release.set()
    assert (await holder)[0] == b"ok"
    await wait_for(lambda: host.in_flight == 0, "the impatient call leaving")
    assert runs == ["holder"]  # the impatient call never ran


# == sizes ========================================================================================
async def test_a_mebibyte_of_arguments_and_of_output_travels_whole(lattices: Connections) -> None:
    async def echo(deployment: str, tool: str, arguments: Any) -> Result:
        return Result(arguments["blob"].encode() + bytes(range(256)) * 4)

    await (await lattices.host("a", echo)).serve("echo")
    client = await lattices.connect()
    blob = "x" * (MAX_ARGUMENT_BYTES - 20)
    arguments = json.dumps({"blob": blob}).encode()
    assert len(arguments) <= MAX_ARGUMENT_BYTES
    output, _ = await call_tool(client, "echo", "t", arguments)
    assert output == blob.encode() + bytes(range(256)) * 4
    with pytest.raises(LatticeCallError) as too_large:
        await call_tool(client, "echo", "t", json.dumps({"blob": "x" * MAX_ARGUMENT_BYTES}).encode())
    assert (too_large.value.status, too_large.value.kind) == (413, "TooLarge")


async def test_an_output_beyond_the_servers_max_payload_is_a_clear_error(lattices: Connections) -> None:
    async def huge(deployment: str, tool: str, arguments: Any) -> Result:
        return Result(b"y" * (9 << 20))  # the test server carries 8 MB

    await (await lattices.host("a", huge)).serve("huge")
    client = await lattices.connect()
    with pytest.raises(LatticeCallError) as refused:
        await call_tool(client, "huge", "t", b"")
    assert refused.value.kind == "OutputTooLarge" and "its KV writes are committed" in str(refused.value)
    assert "max_payload" in str(refused.value)


# == hostile requests ===========================================================================
HOSTILE: list[tuple[bytes, int, str]] = [
    (b"", 400, "MalformedCall"),
    (b"\x00\xff garbage", 400, "MalformedCall"),
    (b"[1, 2]", 400, "MalformedCall"),
    (b'"tool"', 400, "MalformedCall"),
    (b"{}", 400, "MalformedCall"),
    (b'{"tool": ""}', 400, "MalformedCall"),
    (b'{"tool": 5}', 400, "MalformedCall"),
    (json.dumps({"tool": "t" * 2000}).encode(), 400, "MalformedCall"),
    (b'{"tool": "t", "arguments": {"by": 1}}', 400, "MalformedCall"),
    (b'{"tool": "t", "arguments": "", "timeout_ms": -1}', 400, "MalformedCall"),
    (b'{"tool": "t", "arguments": "", "timeout_ms": true}', 400, "MalformedCall"),
    (b"[" * 200_000 + b"]" * 200_000, 400, "MalformedCall"),
    (b'{"tool": "t", "arguments": "{nope"}', 400, "BadJson"),
    (b'{"tool": "t", "arguments": "NaN"}', 400, "BadJson"),
    (b'{"tool": "t", "arguments": "[1e999]"}', 400, "BadJson"),
    (b'{"tool": "t", "arguments": "\\"\\\\ud800\\""}', 400, "BadJson"),
    (b'{"tool": "t", "arguments": "\\"\\ud800\\""}', 400, "BadJson"),
    (b'{"tool": "t", "arguments": "\\ufeff{}"}', 400, "BadJson"),
    (json.dumps({"tool": "t", "arguments": "[" * 65 + "]" * 65}).encode(), 400, "BadJson"),
    (json.dumps({"tool": "t", "arguments": "[" * 100_000 + "]" * 100_000}).encode(), 400, "BadJson"),
    (json.dumps({"tool": "t", "arguments": "1" * 5000}).encode(), 400, "BadJson"),
    (json.dumps({"tool": "t", "arguments": json.dumps("x" * (MAX_ARGUMENT_BYTES + 1))}).encode(), 413, "TooLarge"),
]


async def test_hostile_requests_are_refused_and_the_host_keeps_serving(lattices: Connections) -> None:
    recorder = Recorder("a")
    host = await lattices.host("a", recorder)
    await host.serve("svc")
    client = await lattices.connect()
    subject = client.names.call("svc")
    for data, status, kind in HOSTILE:
        answer = await client.nc.request(subject, data, timeout=10)
        assert answer.headers is not None and answer.headers["Orch-Status"] == str(status), data[:80]
        error = json.loads(answer.data)["error"]
        assert (error["status"], error["kind"]) == (status, kind), (data[:80], error)
        assert len(error["message"]) < 400 and "\n" not in error["message"]
    await client.nc.publish(subject, b'{"tool": "t", "arguments": "{}"}')  # no reply subject: nobody to answer
    deep = json.dumps({"tool": "t", "arguments": "[" * 64 + "]" * 64}).encode()
    assert (await client.nc.request(subject, deep, timeout=10)).headers["Orch-Status"] == "200"  # type: ignore[index]
    output, _ = await call_tool(client, "svc", "t", b'{"fine": true}')
    assert json.loads(output)["arguments"] == {"fine": True}
    await wait_for(lambda: host.in_flight == 0, "the host settling")
    assert len(recorder.calls) == 2 and recorder.calls[-1][2] == {"fine": True}  # only the two good calls ran
    assert host.refused == len(HOSTILE)


async def test_a_host_failing_unexpectedly_answers_500_and_goes_on(lattices: Connections) -> None:
    async def buggy(deployment: str, tool: str, arguments: Any) -> Result:
        if tool == "bug":
            raise KeyError("oops")
        if tool == "guest":
            raise GuestError("the guest says no", plugin=deployment, function=tool)
        return Result(b"fine")

    await (await lattices.host("a", buggy)).serve("svc")
    client = await lattices.connect()
    with pytest.raises(LatticeCallError) as bug:
        await call_tool(client, "svc", "bug", b"")
    assert bug.value.status == 500 and "KeyError" in str(bug.value) and "host a" in str(bug.value)
    with pytest.raises(LatticeCallError) as guest:
        await call_tool(client, "svc", "guest", b"")
    assert (guest.value.status, guest.value.kind, str(guest.value)) == (422, "GuestError", "the guest says no")
    assert (await call_tool(client, "svc", "ok", b""))[0] == b"fine"


async def test_a_reply_that_is_not_a_hosts_is_502(lattices: Connections) -> None:
    impostor = await lattices.connect()

    async def answer(msg: Any) -> None:
        await impostor.nc.publish(msg.reply, b"whatever")

    await impostor.nc.subscribe(impostor.names.call("svc"), cb=answer)
    client = await lattices.connect()
    with pytest.raises(LatticeCallError) as bad:
        await call_tool(client, "svc", "t", b"")
    assert (bad.value.status, bad.value.kind) == (502, "BadReply")


def test_remote_error_and_lattice_error_carry_the_same_fields() -> None:
    remote, lattice = RemoteError(409, "CapsuleNotRunning", "m"), LatticeCallError(409, "CapsuleNotRunning", "m")
    assert (remote.status, remote.kind, str(remote)) == (lattice.status, lattice.kind, str(lattice))
