"""The pure side of rollbacks and the history's own rules, without a runtime.

- Pins (orchestrator.desired.pins) and the plan: a pinned deployment is planned towards its
  pinned spec and marked overridden (naming the pinned version and the desired one); a pin
  holds while the desired spec hash is the one it was made against, and ends when it
  changes, when the deployment is disabled or removed; a deployment whose files are broken
  keeps its pin; the wiring (depends_on, enabled) follows the config; overlaying is
  idempotent; plans without pins keep their JSON shape.
- Rebuilding a spec from a record (orchestrator.control.rollback.spec_from_record): secrets
  from today's config only when their digest matches; a record that does not reproduce its
  spec hash is refused.
- The history file (orchestrator.control.history): strict parsing (hostile names, digests
  and types refused), `find`'s rules for VERSION, @ID, ambiguity and --with-data.
- The artifact store: private files, every read checked against the name, hostile names
  never made into paths, FIFOs and altered files refused, unreferenced files removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.control.artifacts import ArtifactStore
from orchestrator.control.history import (
    DeploymentHistory,
    Entry,
    NoSnapshot,
    RollbackRefused,
    SecretsChanged,
    UnknownVersion,
    VersionHistory,
)
from orchestrator.control.rollback import spec_from_record
from orchestrator.desired.config import HistorySettings
from orchestrator.desired.load import load_folder
from orchestrator.desired.pins import Pin, in_force, overlay
from orchestrator.desired.plan import plan
from orchestrator.desired.spec import CapsuleSpec
from tests.conftest import CAPSULES

LIMITS = {"fuel": 1000, "memory_mib": 64, "timeout_ms": 5000}


def spec(wasm: str, *, name: str = "counter", config: dict[str, str] | None = None, **extra: Any) -> CapsuleSpec:
    return CapsuleSpec(
        name=name,
        folder=f"/srv/{name}",
        wasm_sha256=wasm * 64,
        manifest={"package": {"name": name}},
        config=config or {},
        secret_keys=frozenset(),
        limits=LIMITS,
        **extra,
    )


V1, V2, V3 = spec("a"), spec("b"), spec("c")


def pin_to(pinned: CapsuleSpec, desired: CapsuleSpec) -> Pin:
    return Pin(spec=pinned, desired_hash=desired.spec_hash, since_ms=1000, entry=1)


# == pins and the plan =========================================================================
def test_a_pinned_deployment_is_planned_towards_its_pin_and_marked_overridden() -> None:
    pins = {"counter": pin_to(V1, V2)}
    result = plan({"counter": V2}, {"counter": V1}, pins=pins).to_dict()["actions"]
    assert result[0]["action"] == "keep" and result[0]["overridden"] == {"version": V1.version}
    reason = result[0]["reasons"][0]
    assert f"pinned to version {V1.version} by a rollback instead of the desired {V2.version}" in reason
    assert "orch unpin counter" in reason
    started = plan({"counter": V2}, {}, pins=pins).actions[0]  # nothing runs: start the pinned spec
    assert (started.action, started.overridden) == ("start", V1.version)
    reload = plan({"counter": V2}, {"counter": V3}, pins=pins).actions[0]
    assert reload.action == "reload" and reload.reasons[1].startswith("wasm cccccc→aaaaaa")


def test_a_pin_ends_when_the_desired_spec_changes_is_disabled_or_removed() -> None:
    pins = {"counter": pin_to(V1, V2)}
    assert in_force({"counter": V2}, pins) == pins
    assert in_force({"counter": V3}, pins) == {}  # a new desired spec
    assert in_force({"counter": replace(V2, enabled=False)}, pins) == {}
    assert in_force({}, pins) == {}
    assert in_force({"counter": V3}, pins, keep={"counter"}) == pins  # its files are broken now
    assert in_force({"counter": replace(V2, depends_on=("other",))}, pins) == pins  # wiring is no change
    ended = plan({"counter": V3}, {"counter": V1}, pins=in_force({"counter": V3}, pins)).actions[0]
    assert (ended.action, ended.overridden) == ("reload", "")


def test_overlay_keeps_the_configs_wiring_and_is_idempotent() -> None:
    desired = {"counter": replace(V2, depends_on=("db",)), "other": spec("d", name="other")}
    pins = {"counter": pin_to(V1, V2), "gone": pin_to(spec("e", name="gone"), V2)}
    once = overlay(desired, pins)
    assert once["counter"].spec_hash == V1.spec_hash and once["counter"].depends_on == ("db",)
    assert once["other"] is desired["other"] and "gone" not in once
    assert overlay(once, pins) == once


def test_plans_without_pins_keep_their_shape() -> None:
    actions = plan({"counter": V2}, {"counter": V1}).to_dict()["actions"]
    assert set(actions[0]) == {"capsule", "action", "reasons", "escalations"}


# == specs from records ========================================================================
def secret_spec(folder: Path, token: str) -> CapsuleSpec:
    (folder / "Capsule.toml").write_text(
        (CAPSULES / "counter" / "Capsule.toml").read_text()
        + '\n[env.token]\ntype = "secret"\ndescription = "a token"\n'
    )
    (folder / "counter.wasm").write_bytes((CAPSULES / "counter" / "counter.wasm").read_bytes())
    return load_folder(folder, config={"token": token})


def test_secrets_come_from_today_only_when_their_digest_matches(tmp_path: Path) -> None:
    then = secret_spec(tmp_path, "s3cret")
    assert then.source is not None
    record = json.loads(json.dumps(then.record()))
    assert "s3cret" not in json.dumps(record)
    entry = Entry(id=1, at_ms=0, event="start", spec_hash=then.spec_hash, wasm_sha256=then.wasm_sha256)
    today = replace(then, config={**then.config, "step": "5"}, depends_on=("db",))
    rebuilt = spec_from_record(record, wasm=then.source.wasm, wasm_path="x.wasm", current=today, entry=entry)
    assert rebuilt.spec_hash == then.spec_hash and rebuilt.config["token"] == "s3cret"
    assert rebuilt.config["step"] == then.config["step"] and rebuilt.depends_on == ("db",)
    changed = replace(then, config={**then.config, "token": "n3w-t0ken"})
    with pytest.raises(SecretsChanged, match="its secret 'token' differs from today's config") as caught:
        spec_from_record(record, wasm=then.source.wasm, wasm_path="x.wasm", current=changed, entry=entry)
    assert "n3w-t0ken" not in str(caught.value) and "s3cret" not in str(caught.value)
    dropped = replace(then, config={k: v for k, v in then.config.items() if k != "token"}, secret_keys=frozenset())
    with pytest.raises(SecretsChanged):
        spec_from_record(record, wasm=then.source.wasm, wasm_path="x.wasm", current=dropped, entry=entry)
    edited = dict(record, limits={**record["limits"], "fuel": 1})  # the record was tampered with
    with pytest.raises(RollbackRefused, match="does not reproduce its spec hash"):
        spec_from_record(edited, wasm=then.source.wasm, wasm_path="x.wasm", current=today, entry=entry)
    with pytest.raises(RollbackRefused, match="is damaged"):
        spec_from_record({"name": "counter"}, wasm=b"", wasm_path="x.wasm", current=today, entry=entry)


# == the history file and find ================================================================
def entry(id_: int, wasm: str, spec_hash: str, *, snapshot: bool = False, event: str = "reload") -> Entry:
    snap = {"id": id_, "created_ms": 0, "keys": 1, "bytes": 1} if snapshot else None
    return Entry(id=id_, at_ms=id_, event=event, spec_hash=spec_hash * 64, wasm_sha256=wasm * 64, snapshot=snap)


def test_history_files_are_parsed_strictly() -> None:
    good = DeploymentHistory("counter", [entry(1, "a", "1")], {"1" * 64: {}}, 2)
    assert DeploymentHistory.from_json("counter", good.to_json()).entries == good.entries
    data = json.loads(good.to_json())
    for hostile, fragment in [
        ({**data, "name": "other"}, "names another deployment"),
        ({**data, "format": 2}, "format"),
        ({**data, "next_id": -1}, "whole number"),
        ({**data, "next_id": True}, "whole number"),
        ({**data, "entries": [{**data["entries"][0], "wasm_sha256": "../../etc/passwd"}]}, "sha256"),
        ({**data, "entries": [{**data["entries"][0], "event": "explode"}]}, "event"),
        ({**data, "entries": [{**data["entries"][0], "reasons": [1]}]}, "reasons"),
        ({**data, "entries": [{**data["entries"][0], "snapshot": {"id": "1"}}]}, "snapshot"),
        ({**data, "records": {}}, "record is missing"),
        ({**data, "pin": {"spec_hash": "f" * 64, "desired_hash": "x"}}, "names no record"),
        ({**data, "entries": "nope"}, "not a list"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            DeploymentHistory.from_json("counter", json.dumps(hostile).encode())


class NoStore:
    async def take_snapshot(self, capsule: str, *, created_ms: int, max_bytes: int | None = None) -> Any:
        raise AssertionError("not used")

    async def restore_snapshot(self, capsule: str, snapshot: int) -> int:
        raise AssertionError("not used")

    async def snapshot_infos(self, capsule: str | None = None) -> list[Any]:
        return []

    async def drop_snapshots(self, ids: Any) -> None:
        return None


def history_of(tmp_path: Path, entries: list[Entry]) -> VersionHistory:
    history = VersionHistory(state_dir=tmp_path, store=NoStore(), settings=HistorySettings)
    records: dict[str, dict[str, Any]] = {e.spec_hash: {} for e in entries}
    history._histories["counter"] = DeploymentHistory("counter", entries, records, len(entries) + 1)
    return history


def test_find_resolves_versions_ids_and_snapshots(tmp_path: Path) -> None:
    # @1 v=aaa spec 1 (snapshot) ; @2 v=bbb spec 2 ; @3 v=aaa spec 3 (same module, other config) ; @4 running
    entries = [entry(1, "a", "1", snapshot=True), entry(2, "b", "2"), entry(3, "a", "3"), entry(4, "c", "4")]
    history = history_of(tmp_path, entries)
    running = "4" * 64
    assert history.find("counter", None, with_data=False, running=running).id == 3  # the one before
    assert history.find("counter", "bbbb", with_data=False, running=running).id == 2
    assert history.find("counter", "@1", with_data=False, running=running).id == 1
    assert history.find("counter", " 1111 ", with_data=True, running=running).id == 1
    with pytest.raises(RollbackRefused, match="matches 2 different specs"):
        history.find("counter", "aaaa", with_data=False, running=running)
    assert history.find("counter", "3333", with_data=False, running=running).id == 3
    with pytest.raises(NoSnapshot, match="no snapshot of the data of version bbbbbbbbbbbb"):
        history.find("counter", "bbbb", with_data=True, running=running)
    for missing in ("@4", "@99", "cccc", "dead", "../x", "aaa", "@-1"):  # @4 is the one running
        with pytest.raises(UnknownVersion):
            history.find("counter", missing, with_data=False, running=running)
    with pytest.raises(UnknownVersion, match="no earlier version"):
        history_of(tmp_path, [entry(1, "a", "1")]).find("counter", None, with_data=False, running="1" * 64)


# == the artifact store ========================================================================
def test_artifacts_are_private_checked_on_every_read_and_never_a_path_outside(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = (CAPSULES / "counter" / "counter.wasm").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert store.get(digest) is None and not store.has(digest)
    assert store.put(digest, data) and not store.put(digest, data)  # written once
    assert store.get(digest) == data
    assert stat.S_IMODE(store.path(digest).stat().st_mode) == 0o600
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700
    with pytest.raises(ValueError, match="do not hash to it"):
        store.put("0" * 64, data)
    for hostile in ("../../etc/passwd", "A" * 64, digest[:63], digest + "/", "", digest.upper()):
        assert store.get(hostile) is None and not store.has(hostile)
        with pytest.raises(ValueError, match="not a sha256 digest"):
            store.path(hostile)
    store.path(digest).write_bytes(data[:-1] + b"\x00")  # altered in place: refused
    assert store.get(digest) is None
    assert ArtifactStore(store.folder).put(digest, data) and store.get(digest) == data  # repaired by a new process
    store.path(digest).write_bytes(data[:-1] + b"\x00")
    store.path(digest).unlink()
    os.mkfifo(store.path(digest))  # not a regular file: refused without blocking, replaced on put
    assert store.get(digest) is None
    assert store.put(digest, data) and store.get(digest) == data
    other = hashlib.sha256(b"other").hexdigest()
    store.put(other, b"other")
    (store.folder / ".leftover.tmp").write_bytes(b"an interrupted write")
    (store.folder / "subfolder").mkdir()
    assert store.keep_only({digest}) == [other]
    assert sorted(p.name for p in store.folder.iterdir()) == sorted(["subfolder", f"{digest}.wasm"])
