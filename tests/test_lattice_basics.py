"""The lattice's foundations on real NATS servers: names, key encoding, connecting."""

from __future__ import annotations

import nats.errors
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import GateError
from orchestrator.lattice.connection import Lattice, LatticeAddress, LatticeError, barrier
from orchestrator.lattice.naming import LatticeNames, decode_token, encode_token
from tests.natsserver import NatsServers, free_port


@given(st.text(max_size=200))
def test_any_text_is_one_token_and_comes_back(text: str) -> None:
    try:
        token = encode_token(text)
    except GateError:
        assert len(text.encode("utf-8", "surrogatepass")) * 3 > 1024
        return
    assert "." not in token and " " not in token and token
    assert all(c.isascii() and (c.isalnum() or c in "_-=") for c in token)
    assert decode_token(token) == text


def test_tokens_for_tricky_text() -> None:
    assert encode_token("a.b") == "a=2Eb"
    assert encode_token("") == "="
    assert encode_token("é") == "=C3=A9"
    assert decode_token(encode_token("*>")) == "*>"
    with pytest.raises(GateError, match="over the lattice's limit"):
        encode_token("é" * 400)


def test_names_are_prefixed_and_checked() -> None:
    names = LatticeNames("blue")
    assert names.kv == "orch_blue_kv" and names.bus("orders.new") == "orch.blue.bus.orders.new"
    assert names.topic_of("orch.blue.bus.orders.new") == "orders.new"
    assert names.call("my-app") == "orch.blue.call.my-app"
    for bad in ("", "Blue", "a.b", "x" * 33):
        with pytest.raises(GateError, match="lattice name"):
            LatticeNames(bad)


async def test_connect_to_a_real_server_and_make_buckets(nats_server: NatsServers) -> None:
    lattice = await Lattice.connect(LatticeAddress.parse(nats_server.urls, name="t1"))
    try:
        bucket = await lattice.bucket(lattice.names.desired, history=10)
        stream = await lattice.js.stream_info(f"KV_{lattice.names.desired}")
        assert stream.state.messages == 0  # the probe that the bucket is reachable wrote nothing
        revision = await bucket.put("config", b"{}")
        assert revision == 1
        again = await lattice.bucket(lattice.names.desired, history=10)
        assert (await again.get("config")).revision == revision
    finally:
        await lattice.close()


async def test_after_a_barrier_the_server_has_every_earlier_subscription_and_publish(nats_server: NatsServers) -> None:
    # nats-py's flush() writes its PING ahead of commands still in its buffer: under load a
    # subscription it had "flushed" missed what another connection published next
    subscriber = await Lattice.connect(LatticeAddress.parse(nats_server.urls, name="t1"))
    publisher = await Lattice.connect(LatticeAddress.parse(nats_server.urls, name="t1"))
    missed = []
    try:
        for i in range(300):
            subscription = await subscriber.nc.subscribe(f"barrier.{i}")
            await barrier(subscriber.nc)
            await publisher.nc.publish(f"barrier.{i}", str(i).encode())
            await barrier(publisher.nc)  # the server has routed it: it is ahead of the next PONG
            await barrier(subscriber.nc)
            try:
                assert (await subscription.next_msg(timeout=5)).data == str(i).encode()
            except nats.errors.TimeoutError:
                missed.append(i)
            await subscription.unsubscribe()
    finally:
        await subscriber.close()
        await publisher.close()
    assert missed == []


async def test_no_server_is_one_clear_error_within_the_timeout() -> None:
    with pytest.raises(LatticeError, match=r"cannot reach the lattice at nats://127\.0\.0\.1:") as refused:
        await Lattice.connect(LatticeAddress.parse(f"nats://127.0.0.1:{free_port()}"), timeout=1.0)
    assert "nats-server -js" in str(refused.value)


def test_a_secret_in_the_url_is_never_shown() -> None:
    address = LatticeAddress.parse("nats://alice:s3cret@127.0.0.1:4222,nats://tok@127.0.0.1:4223")
    assert "s3cret" not in address.shown and "tok@" not in address.shown


async def test_a_cluster_forms(nats_cluster: NatsServers) -> None:
    lattice = await Lattice.connect(LatticeAddress.parse(nats_cluster.urls))
    try:
        bucket = await lattice.bucket(lattice.names.kv, replicas=3)
        await bucket.put("k", b"v")
        assert (await bucket.get("k")).value == b"v"
    finally:
        await lattice.close()
