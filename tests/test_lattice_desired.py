"""The desired state in a lattice (orchestrator.lattice.desiredstate, .artifacts) on a real
nats-server: publishing, reading back into runnable specs, and refusing what this code
did not write (malformed, hostile or corrupt entries and artifacts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.desired.load import load_desired
from orchestrator.errors import ConfigError, ManifestError
from orchestrator.lattice.artifacts import LatticeDataError, fetch, sha256_hex, upload
from orchestrator.lattice.connection import Lattice, LatticeAddress, LatticeError
from orchestrator.lattice.desiredstate import (
    DESIRED_HISTORY,
    DesiredDoc,
    current,
    desired_bucket,
    document,
    manifest_texts,
    publish,
    rebuild_spec,
)
from tests.latticehosts import MANIFEST, module, write_capsule, write_config
from tests.natsserver import NatsNode, NatsServers

SECRET_MANIFEST = MANIFEST + '\n[env.token]\ntype = "secret"\n\n[env.greeting]\ndefault = "hi"\n'


@pytest.fixture
async def lattice(nats_server: NatsServers) -> AsyncIterator[Lattice]:
    connected = await Lattice.connect(LatticeAddress.parse(nats_server.urls))
    try:
        yield connected
    finally:
        await connected.close()


def secret_config(root: Path) -> Path:
    write_capsule(root / "ver", 1)
    (root / "ver" / "Capsule.toml").write_text(SECRET_MANIFEST)
    return write_config(
        root,
        {
            "a": {"path": "ver", "config": {"token": "s3cret"}, "hosts": 2, "labels": {"zone": "eu"}},
            "b": {"path": "ver", "enabled": "false", "depends_on": "[a]"},
        },
    )


async def test_publish_then_rebuild_every_spec_with_its_secrets(tmp_path: Path, lattice: Lattice) -> None:
    desired = load_desired(secret_config(tmp_path))
    manifests = manifest_texts(desired)
    first = await publish(lattice, desired, manifests)
    assert not first.unchanged and first.uploaded == 2 and first.present == 0  # one wasm, one manifest: shared
    doc = await current(lattice)
    assert doc is not None and doc.revision == first.revision
    assert set(doc.deployments) == {"a", "b"} and set(doc.wants()) == {"a"}
    assert doc.wants()["a"].count == 2 and dict(doc.wants()["a"].labels) == {"zone": "eu"}
    for name, local in desired.specs.items():
        deployment = doc.deployments[name]
        assert doc.specs()[name].spec_hash == local.spec_hash  # the record alone: for plans and status
        assert "s3cret" not in json.dumps(deployment.record)
        wasm = await fetch(lattice, deployment.wasm, limit=1 << 20, what="test")
        text = await fetch(lattice, deployment.manifest, limit=1 << 20, what="test")
        spec = rebuild_spec(deployment, wasm=wasm, manifest=text)
        assert spec == local and spec.spec_hash == local.spec_hash
        assert spec.source is not None and spec.source.wasm == module(1).encode()
        assert not spec.source.wasm_changed()
    assert doc.deployments["a"].secrets == {"token": "s3cret"}
    again = await publish(lattice, load_desired(tmp_path / "config.yaml"), manifests)
    assert again.unchanged and again.revision == first.revision and again.uploaded == 0 and again.present == 2
    write_capsule(tmp_path / "ver", 2)
    (tmp_path / "ver" / "Capsule.toml").write_text(SECRET_MANIFEST)
    changed = load_desired(tmp_path / "config.yaml")
    third = await publish(lattice, changed, manifest_texts(changed))
    assert third.revision > first.revision and third.uploaded == 1 and third.present == 1
    history = await (await desired_bucket(lattice)).history("config")
    assert [e.revision for e in history] == [first.revision, third.revision]
    assert (await (await desired_bucket(lattice)).status()).history == DESIRED_HISTORY


async def test_a_manifest_changed_after_loading_is_refused(tmp_path: Path) -> None:
    desired = load_desired(secret_config(tmp_path))
    (tmp_path / "ver" / "Capsule.toml").write_text(SECRET_MANIFEST + "\n")
    with pytest.raises(ConfigError, match="changed while `orch apply` read it"):
        manifest_texts(desired)


async def test_replicas_past_the_cluster_size_are_refused_before_publishing(tmp_path: Path, lattice: Lattice) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"v": {"path": "ver"}}, extra="lattice: {replicas: 3}")
    desired = load_desired(config)
    with pytest.raises(LatticeError, match=r"lattice\.replicas: 3 copies") as refused:
        await publish(lattice, desired, manifest_texts(desired))
    assert "add servers" in str(refused.value)
    assert await current(lattice) is None


async def test_artifacts_are_checked_against_their_names(lattice: Lattice) -> None:
    data = b"\0asm" + bytes(300_000)
    name = sha256_hex(data)
    assert await upload(lattice, {name: data}) == (1, 0)
    assert await upload(lattice, {name: data}) == (0, 1)
    assert await fetch(lattice, name, limit=1 << 20, what="m") == data  # several chunks
    with pytest.raises(LatticeDataError, match="over the limit"):
        await fetch(lattice, name, limit=1000, what="m")
    with pytest.raises(LatticeDataError, match="missing from the object store"):
        await fetch(lattice, sha256_hex(b"other"), limit=1 << 20, what="m")
    with pytest.raises(LatticeDataError, match="not a sha256 artifact name"):
        await fetch(lattice, "../../etc/passwd", limit=1 << 20, what="m")
    impostor = sha256_hex(b"what was promised")
    await (await lattice.objects()).put(impostor, b"something else entirely")  # a store that lies
    with pytest.raises(LatticeDataError, match="does not hash to its name"):
        await fetch(lattice, impostor, limit=1 << 20, what="m")
    with pytest.raises(ValueError, match="do not hash to its name"):
        await upload(lattice, {impostor: b"nope"})


# -- hostile entries ------------------------------------------------------------------------
def valid_document(root: Path) -> dict[str, Any]:
    desired = load_desired(secret_config(root))
    return json.loads(json.dumps(document(desired, manifest_texts(desired), now_ms=1)))


def mutations(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    a = doc["deployments"]["a"]
    return [
        ("not JSON", b"{nope"),
        ("a list", []),
        ("format 2", {**doc, "format": 2}),
        ("an extra field", {**doc, "extra": 1}),
        ("a missing field", {k: v for k, v in doc.items() if k != "replicas"}),
        ("replicas text", {**doc, "replicas": "3"}),
        ("deployments a list", {**doc, "deployments": []}),
        ("a deployment not a mapping", {**doc, "deployments": {"a": 5}}),
        ("a renamed deployment", {**doc, "deployments": {"z": a}}),
        ("wasm not a sha", {**doc, "deployments": {"a": {**a, "wasm": "../x"}}}),
        ("wasm not the record's", {**doc, "deployments": {"a": {**a, "wasm": "0" * 64}}}),
        ("a secret missing", {**doc, "deployments": {"a": {**a, "secrets": {}}}}),
        ("a secret too many", {**doc, "deployments": {"a": {**a, "secrets": {"token": "x", "greeting": "y"}}}}),
        ("secrets not text", {**doc, "deployments": {"a": {**a, "secrets": {"token": 5}}}}),
        ("limits tampered", {**doc, "deployments": {"a": {**a, "record": {**a["record"], "limits": {"fuel": 1}}}}}),
        ("limits absurd", {**doc, "deployments": {"a": {**a, "record": {**a["record"], "limits": {"fuel": -1}}}}}),
        ("instances absurd", {**doc, "deployments": {"a": {**a, "record": {**a["record"], "instances": 10**9}}}}),
        ("record a list", {**doc, "deployments": {"a": {**a, "record": []}}}),
        (
            "record without limits",
            {**doc, "deployments": {"a": {**a, "record": {"name": "a", "wasm_sha256": a["wasm"]}}}},
        ),
    ]


def test_malformed_desired_revisions_are_refused_with_one_line(tmp_path: Path) -> None:
    doc = valid_document(tmp_path)
    assert DesiredDoc.parse(json.dumps(doc).encode(), revision=3, where="w").revision == 3
    for what, bad in mutations(doc):
        data = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
        with pytest.raises(LatticeDataError, match=r"w \(revision 7\) is not a desired state") as refused:
            DesiredDoc.parse(data, revision=7, where="w")
        assert "\n" not in str(refused.value), what
        assert "s3cret" not in str(refused.value), what


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON, field=st.sampled_from(["record", "secrets", "wasm", "manifest", "top"]))
def test_any_json_in_any_field_is_refused_or_read_never_a_crash(tmp_path: Path, value: Any, field: str) -> None:
    path = tmp_path / "doc.json"
    if not path.exists():
        path.write_text(json.dumps(valid_document(tmp_path)))
    doc = json.loads(path.read_text())
    if field == "top":
        doc = value
    else:
        doc["deployments"]["a"][field] = value
    with contextlib.suppress(LatticeDataError):  # refused with one line, or read: nothing else
        DesiredDoc.parse(json.dumps(doc).encode(), revision=1, where="w")


def test_a_huge_revision_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.lattice.desiredstate as desiredstate

    monkeypatch.setattr(desiredstate, "MAX_DOCUMENT_BYTES", 100)
    with pytest.raises(LatticeDataError, match="over 100"):
        DesiredDoc.parse(b" " * 101, revision=1, where="w")


async def test_artifacts_that_do_not_rebuild_the_applied_spec_are_refused(tmp_path: Path, lattice: Lattice) -> None:
    desired = load_desired(secret_config(tmp_path))
    manifests = manifest_texts(desired)
    await publish(lattice, desired, manifests)
    doc = await current(lattice)
    assert doc is not None
    deployment = doc.deployments["a"]
    other = module(7).encode()
    with pytest.raises(LatticeDataError, match="do not rebuild the spec that was applied"):
        rebuild_spec(deployment, wasm=other, manifest=manifests["a"])
    with pytest.raises(LatticeDataError, match="do not rebuild"):
        rebuild_spec(deployment, wasm=module(1).encode(), manifest=manifests["a"] + b"\n[limits]\nfuel = 5\n")
    with pytest.raises(LatticeDataError, match="not a UTF-8 manifest"):
        rebuild_spec(deployment, wasm=module(1).encode(), manifest=b"\xff\xfe")
    with pytest.raises(ManifestError):
        rebuild_spec(deployment, wasm=module(1).encode(), manifest=b"[package]\nname = 5\n")


async def test_a_revision_nobody_can_read_is_replaced_by_the_next_apply(tmp_path: Path, lattice: Lattice) -> None:
    bucket = await desired_bucket(lattice)
    await bucket.put("config", b"garbage")
    with pytest.raises(LatticeDataError, match="not JSON"):
        await current(lattice)
    desired = load_desired(secret_config(tmp_path))
    published = await publish(lattice, desired, manifest_texts(desired))
    doc = await current(lattice)
    assert doc is not None and doc.revision == published.revision


def test_a_desired_state_larger_than_a_message_is_refused_with_the_fix(tmp_path: Path) -> None:
    node = NatsNode("small", tmp_path / "small", max_payload="8KB")
    node.start()
    try:
        NatsServers([node]).wait_ready()
        write_capsule(tmp_path / "ver", 1)
        desired = load_desired(write_config(tmp_path, {f"d{i}": {"path": "ver"} for i in range(12)}))

        async def attempt() -> None:
            lattice = await Lattice.connect(LatticeAddress.parse(node.url))
            try:
                with pytest.raises(LatticeError, match=r"more than the lattice's servers take .*max_payload: 8MB"):
                    await publish(lattice, desired, manifest_texts(desired))
                assert await current(lattice) is None
            finally:
                await lattice.close()

        asyncio.run(attempt())
    finally:
        node.kill()


async def test_replicas_scale_every_lattice_stream_on_a_cluster(tmp_path: Path, nats_cluster: NatsServers) -> None:
    write_capsule(tmp_path / "ver", 1)
    lattice = await Lattice.connect(LatticeAddress.parse(nats_cluster.urls))
    try:
        await lattice.bucket(lattice.names.hosts, history=1)  # a host joined before anything was applied
        desired = load_desired(write_config(tmp_path, {"v": {"path": "ver"}}, extra="lattice: {replicas: 3}"))
        published = await publish(lattice, desired, manifest_texts(desired))
        assert not published.unchanged
        names = lattice.names
        for stream in (f"KV_{names.desired}", f"KV_{names.hosts}", f"OBJ_{names.artifacts}"):
            assert (await lattice.js.stream_info(stream)).config.num_replicas == 3, stream
    finally:
        await lattice.close()
