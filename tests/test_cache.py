"""The compiled-module cache: keys, the private folder, atomic writes, and artifacts that must
never be deserialized (corrupt, truncated, foreign, tampered records)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from orchestrator.engine import WasmEngine
from orchestrator.engine.cache import wasmtime_version
from orchestrator.errors import InvalidModule
from tests.conftest import capsule_wasm

GREET = capsule_wasm("greet").read_bytes()


def artifacts(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.cwasm"))


def call_greet(engine: WasmEngine) -> bytes:
    with engine.load(GREET, name="greet") as plugin:
        return plugin.call("greet", "Ada")


def test_disk_cache_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    with WasmEngine(cache_dir=folder) as first:
        assert call_greet(first) == b"Hello, Ada!"
        assert first.cache.stats["compiled"] == 2  # the kernel and greet
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert len(artifacts(folder)) == 2
    with WasmEngine(cache_dir=folder) as second:
        assert call_greet(second) == b"Hello, Ada!"
        assert second.cache.stats["compiled"] == 0
        assert second.cache.stats["disk_hits"] == 2


def test_memory_layer_serves_repeat_loads(tmp_path: Path) -> None:
    with WasmEngine(cache_dir=tmp_path / "c") as engine:
        call_greet(engine)
        hits = engine.cache.stats["memory_hits"]
        call_greet(engine)
        assert engine.cache.stats["memory_hits"] == hits + 1


def test_record_names_version_engine_and_hashes(tmp_path: Path) -> None:
    with WasmEngine(cache_dir=tmp_path) as engine:
        call_greet(engine)
        records = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert {r["wasmtime"] for r in records} == {wasmtime_version()}
    assert all(r["engine"] == engine.fingerprint for r in records)
    assert all(len(r["artifact_sha256"]) == 64 for r in records)


def test_key_depends_on_engine_configuration(tmp_path: Path) -> None:
    with WasmEngine(cache_dir=tmp_path) as metered, WasmEngine(cache_dir=tmp_path, fuel=False) as free:
        assert metered.cache.key("ab" * 32) != free.cache.key("ab" * 32)
        call_greet(metered)
        call_greet(free)
        assert free.cache.stats["disk_hits"] == 0  # fuel-off code is different machine code
    assert len(artifacts(tmp_path)) == 4


@pytest.mark.parametrize(
    "damage",
    ["flip-byte", "truncate", "empty", "foreign", "record-garbage", "record-missing-field"],
)
def test_damaged_artifact_is_recompiled_not_loaded(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    with WasmEngine(cache_dir=tmp_path) as engine:
        call_greet(engine)
        key = engine.cache.key(__import__("hashlib").sha256(GREET).hexdigest())
    artifact, record = tmp_path / f"{key}.cwasm", tmp_path / f"{key}.json"
    data = artifact.read_bytes()
    if damage == "flip-byte":
        middle = len(data) // 2
        artifact.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif damage == "truncate":
        artifact.write_bytes(data[: len(data) // 3])
    elif damage == "empty":
        artifact.write_bytes(b"")
    elif damage == "foreign":
        artifact.write_bytes(b"\x7fELF" + os.urandom(4096))
    elif damage == "record-garbage":
        record.write_text("{not json")
    else:
        content = json.loads(record.read_text())
        del content["artifact_sha256"]
        record.write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING), WasmEngine(cache_dir=tmp_path) as engine:
        assert call_greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats["rejected"] == 1
        assert engine.cache.stats["compiled"] == 1
    assert "module cache: ignoring" in caplog.text
    # the damaged artifact was replaced by a good one
    with WasmEngine(cache_dir=tmp_path) as engine:
        call_greet(engine)
        assert engine.cache.stats["compiled"] == 0


def test_forged_artifact_with_matching_record_from_other_wasm_is_rejected(tmp_path: Path) -> None:
    """A record copied from another module does not vouch for this key's artifact."""
    vowels = capsule_wasm("vowels").read_bytes()
    with WasmEngine(cache_dir=tmp_path) as engine:
        engine.load(vowels).close()
        call_greet(engine)
        greet_key = engine.cache.key(__import__("hashlib").sha256(GREET).hexdigest())
        vowels_key = engine.cache.key(__import__("hashlib").sha256(vowels).hexdigest())
    for suffix in (".cwasm", ".json"):
        (tmp_path / f"{vowels_key}{suffix}").replace(tmp_path / f"{greet_key}{suffix}")
    with WasmEngine(cache_dir=tmp_path) as engine:
        assert call_greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats["rejected"] == 1


def test_group_writable_folder_is_made_private(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    with WasmEngine(cache_dir=folder) as engine:
        call_greet(engine)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert artifacts(folder)


def test_unusable_folder_falls_back_to_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING), WasmEngine(cache_dir=blocker / "cache") as engine:
        assert engine.cache.directory is None
        assert call_greet(engine) == b"Hello, Ada!"
    assert "caching in memory only" in caplog.text


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    with WasmEngine(cache_dir=tmp_path) as engine:
        call_greet(engine)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_replacing_an_artifact_never_touches_a_mapped_file(tmp_path: Path) -> None:
    """The loader memory-maps artifacts: a rewrite must create a new inode, not reuse it."""
    with WasmEngine(cache_dir=tmp_path) as engine:
        call_greet(engine)
        key = engine.cache.key(__import__("hashlib").sha256(GREET).hexdigest())
    artifact = tmp_path / f"{key}.cwasm"
    with WasmEngine(cache_dir=tmp_path) as engine:
        plugin = engine.load(GREET, name="greet")  # maps the artifact
        inode = artifact.stat().st_ino
        artifact.unlink()  # (truncating it in place instead would SIGBUS this process)
        artifact.write_bytes(b"junk")
        junk_inode = artifact.stat().st_ino
        with WasmEngine(cache_dir=tmp_path) as other:
            assert call_greet(other) == b"Hello, Ada!"  # recompiled, replaced by rename
        assert artifact.stat().st_ino not in (inode, junk_inode)  # renamed into place
        assert plugin.call("greet", "Bo") == b"Hello, Bo!"  # the mapped code still runs
        plugin.close()


def test_invalid_module_is_not_cached(tmp_path: Path) -> None:
    with WasmEngine(cache_dir=tmp_path) as engine, pytest.raises(InvalidModule):
        engine.load(b"\0asm\x01\0\0\0garbage")
    assert len(artifacts(tmp_path)) == 1  # the kernel only


async def test_load_async_runs_off_the_event_loop(tmp_path: Path) -> None:
    with WasmEngine(cache_dir=tmp_path) as engine:
        plugin = await engine.load_async(GREET, name="greet", config={"greeting": "Hi"})
        assert plugin.call("greet", "Ada") == b"Hi, Ada!"
        plugin.close()


def test_untouched_artifact_loads_without_rehashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with WasmEngine(cache_dir=tmp_path) as engine:
        call_greet(engine)
    reads: list[str] = []
    original = Path.read_bytes

    def spy(self: Path) -> bytes:
        reads.append(self.suffix)
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", spy)
    with WasmEngine(cache_dir=tmp_path) as engine:
        assert call_greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats["disk_hits"] == 2
    assert ".cwasm" not in reads


def test_copied_cache_is_verified_and_restamped(tmp_path: Path) -> None:
    import shutil

    original = tmp_path / "a"
    with WasmEngine(cache_dir=original) as engine:
        call_greet(engine)
    copy = tmp_path / "b"
    shutil.copytree(original, copy)  # new inodes: stamps no longer match
    copy.chmod(0o700)
    with WasmEngine(cache_dir=copy) as engine:
        assert call_greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats == {"memory_hits": 0, "disk_hits": 2, "compiled": 0, "rejected": 0}
    records = [json.loads(p.read_text()) for p in copy.glob("*.json")]
    assert all(r["stamp"][0] == (copy / f"{p.stem}.cwasm").stat().st_ino for r, p in zip(records, copy.glob("*.json")))
