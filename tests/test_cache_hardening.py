"""Cache hardening: the key file, records authenticated by HMAC (a writer of the cache
folder cannot make a forged artifact load), the size bound with LRU eviction and pins."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from orchestrator.engine import WasmEngine
from orchestrator.engine import cache as cache_module
from orchestrator.engine.cache import load_or_create_key
from orchestrator.errors import OrchestratorError
from tests.conftest import capsule_wasm

GREET = capsule_wasm("greet").read_bytes()
VOWELS = capsule_wasm("vowels").read_bytes()


def key_of(engine: WasmEngine, wasm: bytes) -> str:
    return engine.cache.key(hashlib.sha256(wasm).hexdigest())


def greet(engine: WasmEngine) -> bytes:
    with engine.load(GREET, name="greet") as plugin:
        return plugin.call("greet", "Ada")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


# ---- the key file -----------------------------------------------------------------------------


def test_key_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cache.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    info = path.stat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert load_or_create_key(tmp_path / "other.key") != key
    assert [p.name for p in path.parent.iterdir()] == ["cache.key"]  # no temporary left


def refused(path: Path, *words: str) -> None:
    with pytest.raises(OrchestratorError) as caught:
        load_or_create_key(path)
    message = str(caught.value)
    assert str(path) in message and "remove" in message
    for word in words:
        assert word in message


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cache.key"
    load_or_create_key(path)
    path.chmod(0o644)
    refused(path, "0644", "chmod 600")


def test_key_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    load_or_create_key(real)
    link = tmp_path / "cache.key"
    link.symlink_to(real)
    refused(link, "symbolic link")


def test_key_of_wrong_size_or_kind_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    refused(short, "32 bytes")
    folder = tmp_path / "folder.key"
    folder.mkdir()
    refused(folder)


def test_key_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cache.key"
    load_or_create_key(path)
    if os.getuid() == 0:
        os.chown(path, 4242, -1)
        refused(path, "uid 4242")
    else:  # an unprivileged user cannot give a file away: use one that root owns
        refused(Path("/etc/passwd"), "uid 0")


# ---- authenticated records ------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path: Path) -> bytes:
    return load_or_create_key(tmp_path / "cache.key")


def test_records_carry_a_mac_and_load_fast(tmp_path: Path, secret: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cache"
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        assert greet(engine) == b"Hello, Ada!"
        key = key_of(engine, GREET)
    record = json.loads((folder / f"{key}.json").read_text())
    assert len(record["mac"]) == 64

    def no_rehash(fd: int, limit: int) -> bytes:
        raise AssertionError("an untouched artifact was read and hashed")

    monkeypatch.setattr(cache_module, "read_fd", no_rehash)
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        assert greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats == {"memory_hits": 0, "disk_hits": 2, "compiled": 0, "rejected": 0}


@pytest.mark.parametrize(
    "change",
    [
        ("stamp", lambda r: {**r, "stamp": [0, 0, 0, 0]}),
        ("size", lambda r: {**r, "size": r["size"] + 1}),
        ("imports", lambda r: {**r, "imports": []}),
        ("counts", lambda r: {**r, "counts": {**r["counts"], "exports": 0}}),
        ("artifact_sha256", lambda r: {**r, "artifact_sha256": "0" * 64}),
        ("no mac", lambda r: {k: v for k, v in r.items() if k != "mac"}),
        (
            "another key's mac",
            lambda r: {**r, "mac": cache_module.sign(b"k" * 32, {k: v for k, v in r.items() if k != "mac"})},
        ),
    ],
    ids=lambda c: c[0] if isinstance(c, tuple) else "",
)
def test_an_altered_record_is_rejected_and_replaced(
    tmp_path: Path, secret: bytes, change: tuple[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        greet(engine)
        key = key_of(engine, GREET)
    record_path = folder / f"{key}.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(change[1](record)))  # type: ignore[operator]
    with caplog.at_level(logging.WARNING), WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        assert greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats["rejected"] == 1 and engine.cache.stats["compiled"] == 1
    assert "MAC" in caplog.text
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        greet(engine)
        assert engine.cache.stats["compiled"] == 0  # replaced by a good one


def test_unauthenticated_records_are_rejected_by_a_keyed_engine(tmp_path: Path, secret: bytes) -> None:
    folder = tmp_path / "cache"
    with WasmEngine(cache_dir=folder) as unkeyed:
        greet(unkeyed)
    with WasmEngine(cache_dir=folder, cache_key=secret) as keyed:
        assert greet(keyed) == b"Hello, Ada!"
        assert keyed.cache.stats["rejected"] == 2  # the kernel's record and greet's
    with WasmEngine(cache_dir=folder, cache_key=load_or_create_key(tmp_path / "other.key")) as other:
        greet(other)
        assert other.cache.stats["rejected"] == 2 and other.cache.stats["disk_hits"] == 0


def test_a_swapped_artifact_beside_a_genuine_record_is_rejected(tmp_path: Path, secret: bytes) -> None:
    """What a writer of the folder can do without the key: put another artifact (here, a
    genuine one of another module) beside greet's genuine record. Its stamp differs, so
    every byte is checked against the MAC'ed sha256, and it is refused."""
    folder = tmp_path / "cache"
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        greet(engine)
        engine.load(VOWELS, name="vowels").close()
        greet_key, vowels_key = key_of(engine, GREET), key_of(engine, VOWELS)
    shutil.copyfile(folder / f"{vowels_key}.cwasm", folder / ".swap")
    os.replace(folder / ".swap", folder / f"{greet_key}.cwasm")
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        assert greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats["rejected"] == 1


def test_an_artifact_rewritten_in_place_fails_its_stamp(tmp_path: Path, secret: bytes) -> None:
    folder = tmp_path / "cache"
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        greet(engine)
        key = key_of(engine, GREET)
    artifact = folder / f"{key}.cwasm"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    info = artifact.stat()
    with artifact.open("r+b") as handle:  # same inode, same size, mtime put back
        handle.write(bytes(data))
    os.utime(artifact, ns=(info.st_atime_ns, info.st_mtime_ns))
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        assert greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats["rejected"] == 1  # ctime moved: checked byte for byte


def test_a_symlinked_artifact_is_not_followed(tmp_path: Path, secret: bytes) -> None:
    folder = tmp_path / "cache"
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        greet(engine)
        key = key_of(engine, GREET)
    artifact = folder / f"{key}.cwasm"
    elsewhere = tmp_path / "elsewhere.cwasm"
    artifact.replace(elsewhere)
    artifact.symlink_to(elsewhere)
    with WasmEngine(cache_dir=folder, cache_key=secret) as engine:
        assert greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats["rejected"] == 1
    assert not artifact.is_symlink()  # replaced by a file of ours


def test_a_copied_cache_is_verified_once_then_fast(
    tmp_path: Path, secret: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, copy = tmp_path / "a", tmp_path / "b"
    with WasmEngine(cache_dir=original, cache_key=secret) as engine:
        greet(engine)
    shutil.copytree(original, copy)
    with WasmEngine(cache_dir=copy, cache_key=secret) as engine:
        assert greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats == {"memory_hits": 0, "disk_hits": 2, "compiled": 0, "rejected": 0}
    monkeypatch.setattr(cache_module, "read_fd", lambda fd, limit: pytest.fail("re-stamped artifact was rehashed"))
    with WasmEngine(cache_dir=copy, cache_key=secret) as engine:
        assert greet(engine) == b"Hello, Ada!"
        assert engine.cache.stats["disk_hits"] == 2


def test_a_short_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache_key"):
        WasmEngine(cache_dir=tmp_path, cache_key=b"short")


# ---- size bound and eviction ----------------------------------------------------------------


def tiny(i: int, functions: int = 1) -> bytes:
    """A distinct small module (`i` is baked in) with an export `v` that returns nothing."""
    body = " ".join(f"(func (result i32) (i32.const {j}))" for j in range(functions - 1))
    return f'(module {body} (global i32 (i32.const {i})) (func (export "v")))'.encode()


def test_many_reloads_never_grow_the_folder_past_the_bound(tmp_path: Path) -> None:
    bound = 300_000
    with WasmEngine(cache_dir=tmp_path, cache_max_bytes=bound) as engine:
        keeper = engine.load(tiny(-1), name="keeper")  # pinned while it lives
        keeper_key = keeper.compiled.key
        for i in range(2000):
            with engine.load(tiny(i), name=f"m{i}") as plugin:
                assert plugin.call("v") == b""
            assert folder_bytes(tmp_path) <= bound, i
        assert engine.cache.index is not None and engine.cache.index.evicted > 1900
        assert (tmp_path / f"{keeper_key}.cwasm").exists()
        assert engine.cache.index.total_bytes == folder_bytes(tmp_path)
        keeper.close()
        for i in range(2000, 2040):
            engine.load(tiny(i), name=f"m{i}").close()
        assert not (tmp_path / f"{keeper_key}.cwasm").exists()  # released: evicted in turn


def test_a_plugin_dropped_without_close_releases_its_pin(tmp_path: Path) -> None:
    with WasmEngine(cache_dir=tmp_path) as engine:
        plugin = engine.load(tiny(1), name="dropped")
        key = plugin.compiled.key
        assert engine.cache.index is not None and engine.cache.index.pinned(key)
        del plugin
        gc.collect()
        assert not engine.cache.index.pinned(key)


def test_lru_order_survives_a_restart(tmp_path: Path) -> None:
    modules = {name: tiny(n, functions=40) for n, name in enumerate("abc")}
    with WasmEngine(cache_dir=tmp_path) as engine:
        keys = {}
        for name, wasm in modules.items():
            with engine.load(wasm, name=name) as plugin:
                keys[name] = plugin.compiled.key
    for age, name in enumerate("abc"):  # a is the least recently used, then b, then c
        os.utime(tmp_path / f"{keys[name]}.json", (1000 + age, 1000 + age))
    total = folder_bytes(tmp_path)
    small = tiny(99)
    with WasmEngine(cache_dir=tmp_path, cache_max_bytes=total + 100) as engine:
        assert engine.cache.index is not None and engine.cache.index.total_bytes == total
        engine.load(modules["a"], name="a").close()  # a disk load: a becomes the most recent
        assert os.stat(tmp_path / f"{keys['a']}.json").st_mtime > 2000
        engine.load(small, name="small").close()  # over the bound: the oldest (b) goes
    present = {name for name, key in keys.items() if (tmp_path / f"{key}.cwasm").exists()}
    assert present == {"a", "c"}


def test_stale_temporary_files_are_cleared_at_start(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".x.cwasm.abc.tmp", tmp_path / ".y.cwasm.def.tmp"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"being written by another process")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    with WasmEngine(cache_dir=tmp_path):
        pass
    assert not stale.exists() and fresh.exists()


def test_cache_bound_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache_max_bytes"):
        WasmEngine(cache_dir=tmp_path, cache_max_bytes=0)
