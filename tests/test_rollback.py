"""Version history and rollback through the real runtime and the control API (a real aiohttp
server on a real unix socket, in this process), on a copy of the example deployment plus
`oddball` (a WAT capsule with a secret).

Covered: entries on start, reload and rollback (time, spec hash, version, git revision, the
plan's reasons, snapshot), none for a restart; modules kept by sha256, private; a rollback
with data (count back to what v1 left, v1 serving, pinned, the plan showing the override);
secrets taken from today's config when their digest matches; every refusal (unknown or
hostile version, no snapshot kept, a module no longer kept or altered, changed secrets, a
restore that fails) leaving version, data, pin and history as they were; malformed bodies;
the bounds (entries, snapshot count and size, modules); a pin kept across a restart and
ended by a desired change made while stopped; damaged history files moved aside; orphan
snapshots dropped. The CLI and `orch up` in subprocesses: tests/test_rollback_cli.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api.client import RemoteError
from orchestrator.capsule.store import StoreError
from orchestrator.control.history import MAX_FILE_BYTES, saved_pins
from orchestrator.control.rollback import runnable
from orchestrator.control.runtime import Orchestrator
from orchestrator.control.statedir import read_applied
from orchestrator.desired.load import load_desired
from orchestrator.desired.pins import Pin, in_force
from orchestrator.desired.plan import plan
from tests.test_api import SECRET, Served, add_oddball, raw, serve


def tagged(wasm: bytes, tag: str) -> bytes:
    """`wasm` with a custom section added: the same behaviour, another sha256 (a new version)."""
    name = b"orch-test"
    payload = bytes([len(name)]) + name + tag.encode()
    assert len(payload) < 128
    return wasm + b"\x00" + bytes([len(payload)]) + payload


def new_version(root: Path, tag: str, capsule: str = "counter") -> None:
    """Replace a capsule's module with a tagged copy of the original, atomically."""
    path = root / "capsules" / capsule / f"{capsule}.wasm"
    original = path.with_name(f".{capsule}.original")
    if not original.exists():
        original.write_bytes(path.read_bytes())
    tmp = path.with_name(f".{capsule}.tmp")
    tmp.write_bytes(tagged(original.read_bytes(), tag))
    os.replace(tmp, path)


def edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text, old
    config.write_text(text.replace(old, new, 1))


def with_history(config: Path, settings: str) -> None:
    edit(config, "capsules:\n", f"history: {settings}\ncapsules:\n")


async def call(served: Served, capsule: str, tool: str, arguments: dict[str, Any] | None = None) -> Any:
    async with served.client() as api:
        output, _ = await api.call(capsule, tool, json.dumps(arguments or {}).encode())
    return json.loads(output)


async def count_to(served: Served, target: int) -> None:
    while (await call(served, "counter", "get"))["count"] < target:
        await call(served, "counter", "increment")
    assert (await call(served, "counter", "get"))["count"] == target


async def capsule_status(served: Served, name: str) -> dict[str, Any]:
    status = await served.json("GET", "/v1/status")
    return next(c for c in status["capsules"] if c["name"] == name)  # type: ignore[no-any-return]


async def history(served: Served, name: str = "counter") -> dict[str, Any]:
    return await served.json("GET", f"/v1/capsules/{name}/history")  # type: ignore[no-any-return]


async def rollback(served: Served, name: str, **body: Any) -> Any:
    return await served.json("POST", f"/v1/capsules/{name}/rollback", json.dumps(body).encode())


async def refused(served: Served, name: str, **body: Any) -> RemoteError:
    return await served.error("POST", f"/v1/capsules/{name}/rollback", json.dumps(body).encode())


async def everything(served: Served) -> tuple[Any, ...]:
    """What a refused rollback must leave as it was: counter's version, pin and count, the
    history, every capsule's KV keys."""
    status = await capsule_status(served, "counter")
    async with served.client() as api:
        keys = {name: (await api.kv_list(name))["keys"] for name in ("counter", "milestones")}
        count = json.loads((await api.call("counter", "get", b""))[0])["count"]
    entries = [{k: v for k, v in e.items() if k != "module_kept"} for e in (await history(served))["entries"]]
    return status["version"], status["spec_hash"], status["pinned"], entries, keys, count


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    add_oddball(tmp_path)
    async with serve(tmp_path) as running:
        yield running


# == history ===================================================================================
async def test_history_records_starts_reloads_and_their_snapshots(served: Served) -> None:
    git = ["git", "-C", str(served.root), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "config.yaml", "capsules"], ["commit", "-q", "-m", "v1"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    first = (await history(served))["entries"]
    assert [(e["event"], e["reasons"], e["snapshot"], e["current"]) for e in first] == [("start", ["new"], None, True)]
    v1 = first[0]["version"]
    await count_to(served, 5)
    await served.json("POST", "/v1/capsules/counter/restart")  # the same spec: no entry, no snapshot
    assert (await history(served))["entries"] == first
    new_version(served.root, "v2")
    subprocess.run([*git, "commit", "-q", "-am", "v2"], check=True, capture_output=True)
    head2 = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], check=True, capture_output=True, text=True)
    await served.json("POST", "/v1/reconcile")
    entries = (await history(served))["entries"]
    assert [e["event"] for e in entries] == ["reload", "start"]
    reload, start = entries
    v2 = (await capsule_status(served, "counter"))["version"]
    assert (reload["version"], reload["current"], start["current"]) == (v2, True, False)
    assert reload["reasons"] == [f"wasm {v1[:6]}→{v2[:6]}"] and reload["id"] == start["id"] + 1
    assert start["snapshot"]["keys"] == 1 and start["snapshot"]["bytes"] == len(b"count") + len(b"5")
    assert reload["snapshot"] is None and reload["module_kept"] and start["module_kept"]
    assert (start["revision"], reload["revision"]) == (None, head2.stdout.strip())  # started before `git init`
    assert reload["spec_hash"] == (await capsule_status(served, "counter"))["spec_hash"]
    assert all(e["at_ms"] > 0 for e in entries) and reload["at_ms"] >= start["at_ms"]
    # modules by sha256, private; the history file private too
    state = served.root / ".orch"
    for entry in entries:
        artifact = state / "artifacts" / f"{entry['wasm_sha256']}.wasm"
        assert stat.S_IMODE(artifact.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "artifacts").stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "history" / "counter.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "history").stat().st_mode) == 0o700
    assert SECRET not in (state / "history" / "oddball.json").read_text()


# == rollback ==================================================================================
async def test_rollback_with_data_restores_pins_and_shows_the_override(served: Served) -> None:
    await count_to(served, 5)
    v1 = (await capsule_status(served, "counter"))["version"]
    new_version(served.root, "v2")
    await served.json("POST", "/v1/reconcile")
    await count_to(served, 9)
    v2 = (await capsule_status(served, "counter"))["version"]
    answer = await rollback(served, "counter", to=v1, with_data=True)
    assert (answer["entry"]["version"], answer["with_data"], answer["restored_keys"]) == (v1, True, 1)
    assert (await call(served, "counter", "get"))["count"] == 5
    status = await capsule_status(served, "counter")
    assert (status["version"], status["phase"], status["pinned"]["version"]) == (v1, "Running", v1)
    assert (await call(served, "counter", "increment"))["count"] == 6  # v1 serves, on its data
    plan = await served.json("GET", "/v1/plan")
    counter = next(a for a in plan["actions"] if a["capsule"] == "counter")
    assert counter["action"] == "keep" and counter["overridden"] == {"version": v1}
    assert f"pinned to version {v1}" in counter["reasons"][0] and v2 in counter["reasons"][0]
    entries = (await history(served))["entries"]
    assert entries[0]["event"] == "rollback" and entries[0]["version"] == v1 and entries[0]["current"]
    assert entries[1]["snapshot"]["keys"] == 1  # what v2 left (9) was kept before the restore
    # a change to another capsule keeps the pin; a change to this one's desired spec ends it
    edit(served.config, 'greeting: "hi"', 'greeting: "hello"')
    applied = await served.json("POST", "/v1/reconcile")
    assert next(a for a in applied["actions"] if a["capsule"] == "oddball")["action"] == "reload"
    assert (await capsule_status(served, "counter"))["pinned"]["version"] == v1
    edit(served.config, "config: {step: 1}", "config: {step: 2}")
    await served.json("POST", "/v1/reconcile")
    status = await capsule_status(served, "counter")
    assert (status["version"], status["pinned"]) == (v2, None)
    assert (await call(served, "counter", "increment"))["count"] == 8  # v2 with step 2, on the data as it was


async def test_unpin_ends_the_pin_and_the_desired_spec_runs(served: Served) -> None:
    v1 = (await capsule_status(served, "counter"))["version"]
    new_version(served.root, "v2")
    await served.json("POST", "/v1/reconcile")
    v2 = (await capsule_status(served, "counter"))["version"]
    answer = await rollback(served, "counter")  # default: the version before the one running
    assert answer["entry"]["version"] == v1 and answer["restored_keys"] is None
    actions = (await served.json("POST", "/v1/reconcile"))["actions"]
    assert next(a for a in actions if a["capsule"] == "counter")["overridden"] == {"version": v1}
    assert (await capsule_status(served, "counter"))["version"] == v1
    unpinned = await served.json("POST", "/v1/capsules/counter/unpin")
    assert (unpinned["status"]["version"], unpinned["status"]["pinned"]) == (v2, None)
    assert (await capsule_status(served, "counter"))["version"] == v2
    error = await served.error("POST", "/v1/capsules/counter/unpin")
    assert (error.status, error.kind) == (409, "NotPinned")
    plan = await served.json("GET", "/v1/plan")
    assert all("overridden" not in a for a in plan["actions"])


async def test_secrets_come_from_todays_config_and_a_changed_one_refuses(served: Served) -> None:
    before = (await capsule_status(served, "oddball"))["spec_hash"]
    edit(served.config, 'greeting: "hi"', 'greeting: "hey"')
    await served.json("POST", "/v1/reconcile")
    answer = await rollback(served, "oddball")
    assert answer["status"]["spec_hash"] == before
    running = served.orchestrator.reconciler.slot("oddball")  # type: ignore[union-attr]
    assert running is not None and running.spec is not None
    assert (running.spec.config["token"], running.spec.config["greeting"]) == (SECRET, "hi")
    async with served.client() as api:
        assert (await api.call("oddball", "ok", b""))[0] == b"ok"
    await served.json("POST", "/v1/capsules/oddball/unpin")
    hey = (await capsule_status(served, "oddball"))["spec_hash"]
    edit(served.config, SECRET, "a-new-secret")
    await served.json("POST", "/v1/reconcile")
    now = await capsule_status(served, "oddball")
    entries = (await history(served, "oddball"))["entries"]
    error = await refused(served, "oddball", to=hey[:16])
    assert (error.status, error.kind) == (409, "SecretsChanged")
    assert "'token'" in str(error) and "a-new-secret" not in str(error) and SECRET not in str(error)
    assert await capsule_status(served, "oddball") == now and (await history(served, "oddball"))["entries"] == entries


async def test_refusals_leave_everything_as_it_was(served: Served) -> None:
    with_history(served.config, "{snapshots: 1}")
    await served.json("POST", "/v1/reconcile")
    await count_to(served, 3)
    v1 = (await capsule_status(served, "counter"))["version"]
    new_version(served.root, "v2")
    await served.json("POST", "/v1/reconcile")
    await count_to(served, 4)
    new_version(served.root, "v3")
    await served.json("POST", "/v1/reconcile")
    await count_to(served, 7)
    entries = (await history(served))["entries"]
    assert [e["snapshot"] is not None for e in entries] == [False, True, False]  # v1's was evicted
    assert "evicted" in entries[2]["note"]
    before = await everything(served)

    error = await refused(served, "counter", to=v1, with_data=True)
    assert (error.status, error.kind) == (409, "NoSnapshot") and "evicted" in str(error)
    assert await everything(served) == before
    for hostile in ("../../etc/passwd", "beef" * 20, "@99999999999999999999999", "zz", " ", "@"):
        error = await refused(served, "counter", to=hostile)
        assert error.status == 404 and error.kind == "UnknownVersion", (hostile, error)
    assert await everything(served) == before

    artifact = served.root / ".orch" / "artifacts" / f"{entries[2]['wasm_sha256']}.wasm"
    original = artifact.read_bytes()
    artifact.write_bytes(original[:-1] + b"\x01")  # altered: never trusted
    error = await refused(served, "counter", to=v1)
    assert (error.status, error.kind) == (409, "ArtifactMissing") and "no longer kept" in str(error)
    artifact.unlink()  # evicted
    error = await refused(served, "counter", to=v1)
    assert (error.status, error.kind) == (409, "ArtifactMissing")
    assert await everything(served) == before
    answer = await rollback(served, "counter", to=entries[1]["version"], with_data=True)  # the one kept works
    assert answer["restored_keys"] == 1 and (await call(served, "counter", "get"))["count"] == 4


async def test_a_failed_restore_keeps_the_old_version_serving_with_its_interceptors(served: Served) -> None:
    orchestrator = served.orchestrator
    assert orchestrator.history is not None and orchestrator.reconciler is not None and orchestrator.desired
    new_version(served.root, "v2", capsule="milestones")
    await served.json("POST", "/v1/reconcile")
    before = await capsule_status(served, "milestones")
    entry = orchestrator.history.find("milestones", None, with_data=False, running=before["spec_hash"])
    spec = await runnable(orchestrator.history, "milestones", entry, orchestrator.desired.specs["milestones"])

    async def failing_restore() -> None:
        raise StoreError("the disk is full")

    with pytest.raises(StoreError, match="the disk is full"):
        pin = Pin(spec=spec, desired_hash=before["spec_hash"], since_ms=0)
        await orchestrator.reconciler.override("milestones", spec, pin=pin, prepare=failing_restore)
    after = await capsule_status(served, "milestones")
    assert (after["version"], after["pinned"], after["phase"]) == (before["version"], None, "Running")
    seen = (await call(served, "milestones", "status"))["seen"]
    await call(served, "counter", "increment")  # the old version's interceptors run again
    for _ in range(500):
        if (await call(served, "milestones", "status"))["seen"] > seen:
            break
    else:
        raise AssertionError("milestones' interceptors did not resume after the failed rollback")


async def test_malformed_requests_are_refused_and_change_nothing(served: Served) -> None:
    before = await everything(served)
    path = "/v1/capsules/counter/rollback"
    for body, fragment in [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"to": 12}', "/to"),
        (b'{"to": ""}', "/to"),
        (json.dumps({"to": "a" * 81}).encode(), "/to"),
        (b'{"with_data": "yes"}', "/with_data"),
        (b'{"with_data": true, "force": 1}', "/force: unknown field"),
        (b'{"to": "\\u0000beef"}', "/to"),
        (b'{"to": "\\ud800"}', "surrogate"),
        (b"[" * 100 + b"]" * 100, "nested deeper"),
    ]:
        response = await raw(served.sock, "POST", path, body)
        assert response.status == 400, (body[:40], response.body)
        assert fragment in response.error()["message"], (body[:40], response.body)
    response = await raw(served.sock, "POST", path, b"{" + b" " * (2 << 20) + b"}")
    assert response.status == 413
    for method, target, status in [
        ("POST", "/v1/capsules/nope/rollback", 404),
        ("POST", "/v1/capsules/nope/unpin", 404),
        ("GET", "/v1/capsules/nope/history", 404),
        ("GET", "/v1/capsules/..%2F..%2Fetc/history", 404),
        ("POST", "/v1/capsules/counter/unpin", 409),
        ("POST", path, 404),  # no body: the previous version, and there is none
    ]:
        assert (await raw(served.sock, method, target)).status == status, (method, target)
    assert await everything(served) == before


# == bounds, restarts, damaged files ===========================================================
async def test_bounds_on_entries_snapshots_and_modules(served: Served) -> None:
    with_history(served.config, "{versions: 3, snapshots: 2, snapshot_max_mib: 1}")
    await served.json("POST", "/v1/reconcile")
    async with served.client() as api:
        await api.kv_set("counter", "big", b"x" * (600 << 10))  # each snapshot: 600 KiB and a bit
    for n in range(2, 6):
        new_version(served.root, f"v{n}")
        await served.json("POST", "/v1/reconcile")
    entries = (await history(served))["entries"]
    assert len(entries) == 3  # the oldest went
    kept = [e for e in entries if e["snapshot"] is not None]
    assert len(kept) == 1 and kept[0] is entries[1]  # two would be over 1 MiB
    assert "evicted" in entries[2]["note"]
    infos = await served.orchestrator.store.snapshot_infos("counter")  # type: ignore[union-attr]
    assert [i.id for i in infos] == [kept[0]["snapshot"]["id"]]
    artifacts = {p.name[:-5] for p in (served.root / ".orch" / "artifacts").iterdir()}
    counter_modules = {e["wasm_sha256"] for e in entries}
    assert counter_modules <= artifacts
    desired = served.orchestrator.desired
    assert desired is not None
    others = {s.wasm_sha256 for name, s in desired.specs.items() if name != "counter"}
    assert artifacts == counter_modules | others  # the modules of the entries that went are gone
    async with served.client() as api:
        await api.kv_set("counter", "big2", b"y" * (600 << 10))  # now the data alone is over the bound
    new_version(served.root, "v6")
    await served.json("POST", "/v1/reconcile")
    entries = (await history(served))["entries"]
    assert entries[1]["snapshot"] is None and "over history.snapshot_max_mib" in entries[1]["note"]


async def test_a_pin_survives_a_restart_unless_the_desired_spec_changed(tmp_path: Path) -> None:
    add_oddball(tmp_path)
    async with serve(tmp_path) as served:
        await count_to(served, 2)
        v1 = (await capsule_status(served, "counter"))["version"]
        new_version(tmp_path, "v2")
        await served.json("POST", "/v1/reconcile")
        await count_to(served, 4)
        await rollback(served, "counter", with_data=True)
    # without an orchestrator, `orch plan` can read the pins the state dir records
    pins = saved_pins(tmp_path / ".orch")
    assert list(pins) == ["counter"] and pins["counter"].version == v1
    desired = load_desired(tmp_path / "config.yaml").specs
    offline = plan(desired, read_applied(tmp_path / ".orch"), pins=in_force(desired, pins))
    assert next(a for a in offline.actions if a.capsule == "counter").overridden == v1
    async with serve(tmp_path) as served:
        status = await capsule_status(served, "counter")
        assert (status["version"], status["pinned"]["version"]) == (v1, v1)
        assert (await call(served, "counter", "get"))["count"] == 2
        assert (await history(served))["entries"][0]["event"] == "rollback"  # a restart adds nothing
    edit(tmp_path / "config.yaml", "config: {step: 1}", "config: {step: 3}")  # changed while stopped
    async with serve(tmp_path) as served:
        status = await capsule_status(served, "counter")
        assert status["pinned"] is None and status["version"] != v1


async def test_damaged_history_files_are_moved_aside_and_orphan_snapshots_dropped(tmp_path: Path) -> None:
    add_oddball(tmp_path)
    async with serve(tmp_path) as served:
        store = served.orchestrator.store
        assert store is not None
        orphan = await store.take_snapshot("counter", created_ms=0)  # no entry refers to it
    folder = tmp_path / ".orch" / "history"
    good = json.loads((folder / "notes.json").read_text())
    good["entries"][0]["wasm_sha256"] = "../../../etc/passwd"
    (folder / "notes.json").write_text(json.dumps(good))
    (folder / "counter.json").write_bytes(b"\xff\xfe not json")
    os.mkfifo(folder / "milestones.json.tmp")  # not a history file name: ignored
    with open(folder / "milestones.json", "r+b") as huge:  # over the size limit (sparse: costs no disk)
        huge.truncate(MAX_FILE_BYTES + 1)
    (folder / "oddball.json").unlink()
    os.mkfifo(folder / "oddball.json")  # a FIFO cannot hang the start
    orchestrator = Orchestrator(tmp_path / "config.yaml", watch=False)
    await orchestrator.start()
    try:
        assert orchestrator.history is not None and orchestrator.store is not None
        assert {p.name for p in folder.iterdir()} >= {"notes.json.unreadable", "counter.json.unreadable"}
        assert (folder / "oddball.json.unreadable").exists() and (folder / "milestones.json.unreadable").exists()
        for name in ("counter", "notes", "oddball", "milestones"):
            assert [e.event for e in orchestrator.history.entries(name)] == ["start"]  # started again
        assert orphan.id not in {i.id for i in await orchestrator.store.snapshot_infos()}
    finally:
        await orchestrator.stop(2)


async def test_a_history_folder_that_is_a_file_costs_the_history_not_the_start(tmp_path: Path) -> None:
    add_oddball(tmp_path)
    (tmp_path / ".orch").mkdir(mode=0o700)
    (tmp_path / ".orch" / "history").write_text("not a folder")
    async with serve(tmp_path) as served:
        assert (await capsule_status(served, "counter"))["phase"] == "Running"
        new_version(tmp_path, "v2")
        await served.json("POST", "/v1/reconcile")  # entries stay in memory; saving them only warns
        entries = (await history(served))["entries"]
        assert [e["event"] for e in entries] == ["reload", "start"] and entries[1]["snapshot"] is not None
    assert (tmp_path / ".orch" / "history").read_text() == "not a folder"
