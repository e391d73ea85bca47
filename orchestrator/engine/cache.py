"""Compiled-module cache: in memory and, given a folder, on disk.

Compiling a large module takes seconds; deserializing our own artifact takes microseconds
to milliseconds. Artifacts are keyed by (wasmtime version, engine configuration, sha256 of
the wasm) and stored as `<key>.cwasm` with a `<key>.json` record beside it: the key's
parts, the artifact's size and sha256, and the file's stamp (inode, size, mtime, ctime)
taken right after we wrote it. An artifact whose stamp still matches is one nobody has touched since, and
is loaded at once; any other is checked byte for byte against the sha256 first (and
re-stamped when it passes). A corrupt, truncated or foreign file is logged, recompiled and
replaced, never loaded: a damaged artifact would crash the process, not raise. Files are
written to a temporary name and renamed into place, never rewritten: `Module.deserialize_file`
memory-maps them, and rewriting a mapped file in place kills the process with SIGBUS. The folder is created
private (0700); one owned by someone else, or writable by others, is not used at all.

Used by orchestrator.engine.engine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import wasmtime

from ..errors import InvalidModule

logger = logging.getLogger(__name__)

FORMAT = 1
MEMORY_ENTRIES = 256


class CompiledModuleCache:
    """Modules by wasm content, compiled once per (wasmtime version, engine configuration)."""

    def __init__(self, engine: wasmtime.Engine, *, fingerprint: str, directory: Path | None) -> None:
        self._engine = engine
        self._fingerprint = fingerprint
        self._memory: OrderedDict[str, wasmtime.Module] = OrderedDict()
        self._lock = threading.Lock()
        self.directory = _private_dir(directory) if directory is not None else None
        self.stats = {"memory_hits": 0, "disk_hits": 0, "compiled": 0, "rejected": 0}

    def key(self, wasm_sha256: str) -> str:
        material = f"{FORMAT}|{wasmtime_version()}|{self._fingerprint}|{wasm_sha256}"
        return hashlib.sha256(material.encode()).hexdigest()[:40]

    def get(self, wasm: bytes, *, name: str = "module", digest: str | None = None) -> wasmtime.Module:
        """The compiled module for `wasm` (binary, or WAT text). `digest` is the wasm's sha256
        when the caller already has it (it is trusted, not checked). Raises InvalidModule."""
        digest = digest or hashlib.sha256(wasm).hexdigest()
        key = self.key(digest)
        with self._lock:
            module = self._memory.get(key)
            if module is not None:
                self._memory.move_to_end(key)
                self.stats["memory_hits"] += 1
                return module
        module = self._load(key, digest) if self.directory is not None else None
        if module is None:
            module = compile_module(self._engine, wasm, name=name)
            self.stats["compiled"] += 1
            if self.directory is not None:
                self._store(key, digest, module)
        with self._lock:
            self._memory[key] = module
            while len(self._memory) > MEMORY_ENTRIES:
                self._memory.popitem(last=False)
        return module

    def forget_memory(self) -> None:
        """Drop the in-memory layer (the next get reads the disk). For benchmarks and tests."""
        with self._lock:
            self._memory.clear()

    # -- disk ----------------------------------------------------------------------------
    def paths(self, key: str) -> tuple[Path, Path]:
        assert self.directory is not None
        return self.directory / f"{key}.cwasm", self.directory / f"{key}.json"

    def _load(self, key: str, wasm_sha256: str) -> wasmtime.Module | None:
        artifact, record_path = self.paths(key)
        try:
            record = json.loads(record_path.read_text())
            info = artifact.stat()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            self._reject(artifact, f"unreadable record: {error}")
            return None
        expected = self._record(wasm_sha256)
        if not isinstance(record, dict) or {k: record.get(k) for k in expected} != expected:
            self._reject(artifact, "record is for another wasmtime, engine or module")
            return None
        if not isinstance(record.get("artifact_sha256"), str) or not isinstance(record.get("size"), int):
            self._reject(artifact, "record lacks the artifact's size or sha256")
            return None
        if record.get("stamp") != _stamp(info):
            # Changed, copied or restored since we wrote it: check every byte, then re-stamp.
            try:
                data = artifact.read_bytes()
            except OSError as error:
                self._reject(artifact, f"unreadable: {error}")
                return None
            if [len(data), hashlib.sha256(data).hexdigest()] != [
                record.get("size"),
                record.get("artifact_sha256"),
            ]:
                self._reject(artifact, "artifact does not match its record")
                return None
            self._write_record(record_path, {**record, "stamp": _stamp(artifact.stat())})
        try:
            module = wasmtime.Module.deserialize_file(self._engine, str(artifact))
        except wasmtime.WasmtimeError as error:
            self._reject(artifact, f"wasmtime refused it: {error}")
            return None
        self.stats["disk_hits"] += 1
        return module

    def _record(self, wasm_sha256: str) -> dict[str, object]:
        return {
            "format": FORMAT,
            "wasmtime": wasmtime_version(),
            "engine": self._fingerprint,
            "wasm_sha256": wasm_sha256,
        }

    def _write_record(self, path: Path, record: dict[str, object]) -> None:
        try:
            _write_new(path, json.dumps(record, sort_keys=True).encode())
        except OSError as error:
            logger.warning("module cache: could not write %s: %s", path, error)

    def _reject(self, artifact: Path, why: str) -> None:
        self.stats["rejected"] += 1
        logger.warning("module cache: ignoring %s (%s); recompiling", artifact.name, why)

    def _store(self, key: str, wasm_sha256: str, module: wasmtime.Module) -> None:
        artifact, record_path = self.paths(key)
        try:
            data = bytes(module.serialize())
            _write_new(artifact, data)
            stamp = _stamp(artifact.stat())
        except OSError as error:
            logger.warning("module cache: could not write %s: %s", artifact, error)
            return
        record = {
            **self._record(wasm_sha256),
            "artifact_sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "stamp": stamp,
        }
        self._write_record(record_path, record)


def compile_module(engine: wasmtime.Engine, wasm: bytes, *, name: str) -> wasmtime.Module:
    """Compile `wasm` (binary or WAT text) or raise InvalidModule saying why."""
    if not wasm:
        raise InvalidModule(f"{name}: empty file, not a WebAssembly module")
    if not wasm.startswith(b"\0asm") and not wasm.lstrip().startswith(b"("):
        raise InvalidModule(f"{name}: not a WebAssembly module (no \\0asm header; starts with {wasm[:8]!r})")
    try:
        text: str | bytes = wasm if wasm.startswith(b"\0asm") else wasm.decode("utf-8")
        return wasmtime.Module(engine, text)
    except (wasmtime.WasmtimeError, UnicodeDecodeError) as error:
        raise InvalidModule(f"{name}: invalid WebAssembly module: {_cause(str(error))}") from None


def _cause(message: str) -> str:
    """wasmtime's error chain on one line: "failed to parse ...: unexpected end-of-file ..."."""
    parts = []
    for line in message.splitlines():
        text = line.strip()
        if not text or text == "Caused by:":
            continue
        text = text.split(":", 1)[1].strip() if text.split(":", 1)[0].isdigit() else text
        if text not in parts:
            parts.append(text)
    return ": ".join(parts) or "unknown error"


@functools.cache
def wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


def _private_dir(directory: Path) -> Path | None:
    """Create `directory` 0700, or refuse (None) when it is not safely ours."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as error:
        logger.warning("module cache: cannot use %s (%s); caching in memory only", directory, error)
        return None
    if info.st_uid != os.getuid():
        logger.warning(
            "module cache: %s belongs to uid %d, not us; caching in memory only",
            directory,
            info.st_uid,
        )
        return None
    if stat.S_IMODE(info.st_mode) & 0o077:
        try:
            directory.chmod(0o700)
        except OSError as error:
            logger.warning("module cache: cannot make %s private (%s); not using it", directory, error)
            return None
        logger.info("module cache: made %s private (0700)", directory)
    return directory


def _stamp(info: os.stat_result) -> list[int]:
    """What changes whenever a file is written, replaced, copied or restored: its inode,
    size and modification and status-change times (ctime cannot be set by user code)."""
    return [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _write_new(path: Path, data: bytes) -> None:
    """Write `data` to a new file and rename it onto `path` (never rewrite in place)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
