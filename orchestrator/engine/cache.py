"""Compiled-module cache: in memory and, given a folder, on disk.

Compiling a large module takes seconds; loading our own artifact takes a millisecond. An
artifact is keyed by (wasmtime version, engine configuration, sha256 of the wasm) and
stored as `<key>.cwasm` with a `<key>.json` record beside it: the key's parts, the
artifact's size and sha256, its stamp (inode, size, mtime, ctime, taken from our own
descriptor right after we wrote it), the module's declared counts (for the module limits)
and its imports (so a load from disk never asks wasmtime for them again).

Trust. Deserializing an artifact runs its machine code, so the cache must never load one
it did not write. The folder is private (0700, ours; one owned by someone else is not used),
and, in depth, each record is authenticated with an HMAC-SHA256 keyed by a secret kept in
the state dir, outside the folder (`load_or_create_key`, `WasmEngine(cache_key=...)`). A
record whose MAC is missing or wrong is logged, the module recompiled and both files
replaced. Why a writer of the cache folder cannot make a forged artifact load:
- it cannot write a record that verifies without the key; copying another genuine record
  fails too, since the record names the wasm's sha256 and the key's other parts;
- so it can only replace or alter the artifact beside a genuine record. An artifact whose
  stamp matches the record's loads without being hashed; but any replacement is a new
  inode or, at least, a new ctime (every write, rename or chmod sets the ctime to the
  current time, and user code cannot set it back), so the stamp no longer matches;
- an artifact whose stamp does not match is read once through one descriptor, checked byte
  for byte against the record's (MAC'ed) sha256, and the module is built from those very
  bytes (never re-read by name), then the record is re-stamped. A passing forgery would
  need a sha256 second preimage;
- the fast path maps the very inode whose stamp it checked (through /proc/self/fd on
  Linux), and refuses symlinks and files that are not regular files of ours.
Without a key (`cache_key=None`), records are not authenticated and the cache trusts its
private folder alone, as before keys existed; such records are rejected by an engine that
has a key. Corrupt, truncated or foreign files are likewise rejected and replaced, never
loaded: a damaged artifact would crash the process, not raise. Files are written under a
temporary name and renamed into place, never rewritten: `Module.deserialize_file`
memory-maps them, and rewriting a mapped file in place kills the process with SIGBUS.

Size. The folder is bounded (`max_bytes`, 1 GiB by default): least recently used artifacts
are evicted after each store, never one a live plugin uses (orchestrator.engine.cache_index).

Used by orchestrator.engine.engine.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from ..errors import InvalidModule
from .cache_files import (
    encode_record,
    fd_path,
    load_or_create_key,
    open_artifact,
    private_dir,
    read_fd,
    read_small,
    sign,
    stamp,
    touch,
    write_new,
)
from .cache_index import DiskIndex
from .modulelimits import WASM_MAGIC, ModuleCounts, ModuleLimits, module_counts
from .shape import CompiledModule, Import, read_imports

logger = logging.getLogger(__name__)

FORMAT = 2
MEMORY_ENTRIES = 256
DEFAULT_MAX_BYTES = 1 << 30
RECORD_LIMIT = 4 << 20  # a record holds the imports: a few KiB in practice
UNLIMITED = ModuleLimits(max_module_bytes=2**62, max_functions=2**62, max_exports=2**62)

WasmBytes = bytes | Callable[[], bytes]  # the wasm, or how to read it when it is needed


class CompiledModuleCache:
    """Modules by wasm content, compiled once per (wasmtime version, engine configuration).

    `directory`: the disk layer's folder (None: memory only). `secret`: the key that
    authenticates records (None: unauthenticated, see the module docstring). `max_bytes`:
    the disk layer's bound. `limits`: what a module may declare before it is compiled.
    """

    def __init__(
        self,
        engine: wasmtime.Engine,
        *,
        fingerprint: str,
        directory: Path | None,
        secret: bytes | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        limits: ModuleLimits | None = None,
    ) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("cache_key must be at least 16 bytes (load_or_create_key makes 32)")
        self._engine = engine
        self._fingerprint = fingerprint
        self._secret = secret
        self.limits = limits or ModuleLimits()
        self._memory: OrderedDict[str, CompiledModule] = OrderedDict()
        self._lock = threading.Lock()
        self.directory = private_dir(directory) if directory is not None else None
        self.index = DiskIndex(self.directory, max_bytes=max_bytes) if self.directory is not None else None
        self.stats = {"memory_hits": 0, "disk_hits": 0, "compiled": 0, "rejected": 0}

    def key(self, wasm_sha256: str) -> str:
        material = f"{FORMAT}|{wasmtime_version()}|{self._fingerprint}|{wasm_sha256}"
        return hashlib.sha256(material.encode()).hexdigest()[:40]

    def get(
        self,
        wasm: WasmBytes,
        *,
        name: str = "module",
        digest: str | None = None,
        pin: bool = False,
        limited: bool = True,
    ) -> CompiledModule:
        """The compiled module for `wasm` (binary or WAT text, or a function that reads it:
        called only when the module must be compiled). `digest` is the wasm's sha256 when
        the caller already has it (it is trusted, never recomputed). `pin`: keep its disk
        artifact from eviction until `release(key)`. `limited=False` skips the module
        limits (for the engine's own kernel). Raises InvalidModule."""
        limits = self.limits if limited else UNLIMITED
        data = None
        if digest is None:
            data = wasm() if callable(wasm) else wasm
            digest = hashlib.sha256(data).hexdigest()
        key = self.key(digest)
        with self._lock:
            compiled = self._memory.get(key)
            if compiled is not None:
                self._memory.move_to_end(key)
                self.stats["memory_hits"] += 1
        if compiled is not None:
            if pin:
                self.pin(key)
            return compiled
        compiled = self._load(key, digest, name, limits) if self.directory is not None else None
        if compiled is None:
            if data is None:
                data = wasm() if callable(wasm) else wasm
            module, counts = compile_module(self._engine, data, name=name, limits=limits)
            compiled = CompiledModule(key=key, module=module, imports=read_imports(module))
            self.stats["compiled"] += 1
            if pin:
                self.pin(key)
            if self.directory is not None:
                self._store(compiled, digest, counts)
        elif pin:
            self.pin(key)
        with self._lock:
            self._memory[key] = compiled
            while len(self._memory) > MEMORY_ENTRIES:
                self._memory.popitem(last=False)
        return compiled

    def pin(self, key: str) -> None:
        """Keep `key`'s disk artifact from eviction (counted: one `release` per `pin`)."""
        if self.index is not None:
            self.index.pin(key)

    def release(self, key: str) -> None:
        if self.index is not None:
            self.index.release(key)

    def forget_memory(self) -> None:
        """Drop the in-memory layer (the next get reads the disk). For benchmarks and tests."""
        with self._lock:
            self._memory.clear()

    # -- disk ----------------------------------------------------------------------------
    def paths(self, key: str) -> tuple[Path, Path]:
        assert self.directory is not None
        return self.directory / f"{key}.cwasm", self.directory / f"{key}.json"

    def _load(self, key: str, wasm_sha256: str, name: str, limits: ModuleLimits) -> CompiledModule | None:
        artifact, record_path = self.paths(key)
        try:
            raw = read_small(record_path, RECORD_LIMIT)
        except FileNotFoundError:
            return None
        except OSError as error:
            return self._reject(key, f"unreadable record: {error.strerror or error}")
        record = self._check_record(raw, wasm_sha256)
        if isinstance(record, str):
            return self._reject(key, record)
        limits.check(name, record.counts)  # the limits in force now, whoever compiled it
        try:
            fd = open_artifact(artifact)
        except FileNotFoundError:
            return None
        except OSError as error:
            return self._reject(key, f"cannot open the artifact: {error.strerror or error}")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                return self._reject(key, "the artifact is not a regular file of ours")
            if stamp(info) == record.stamp:
                module = wasmtime.Module.deserialize_file(self._engine, fd_path(fd, artifact))
            else:
                # Changed, copied or restored since we wrote it: check every byte, build the
                # module from the bytes checked, then re-stamp.
                data = read_fd(fd, record.size + 1)
                if len(data) != record.size or hashlib.sha256(data).hexdigest() != record.artifact_sha256:
                    return self._reject(key, "the artifact does not match its record")
                module = wasmtime.Module.deserialize(self._engine, data)
                now = stamp(os.fstat(fd))
                if now == stamp(info):  # unchanged while we read it
                    self._write_record(record_path, {**record.fields, "stamp": now})
        except OSError as error:
            return self._reject(key, f"unreadable artifact: {error.strerror or error}")
        except wasmtime.WasmtimeError as error:
            return self._reject(key, f"wasmtime refused it: {_cause(str(error))}")
        finally:
            os.close(fd)
        touch(record_path)
        assert self.index is not None
        self.index.used(key)
        self.stats["disk_hits"] += 1
        return CompiledModule(key=key, module=module, imports=record.imports)

    def _check_record(self, raw: bytes, wasm_sha256: str) -> _Record | str:
        """The record if it is authentic, for this key and well-formed; else why not."""
        try:
            fields = json.loads(raw)
        except ValueError as error:
            return f"unreadable record: {error}"
        if not isinstance(fields, dict):
            return "unreadable record: not a JSON object"
        mac = fields.pop("mac", None)
        if self._secret is not None:
            if not isinstance(mac, str):
                return "the record is not authenticated (no MAC): written without this engine's cache key"
            if not hmac.compare_digest(mac, sign(self._secret, fields)):
                return "the record's MAC does not verify: written with another key, or altered"
        expected = self._identity(wasm_sha256)
        if {k: fields.get(k) for k in expected} != expected:
            return "the record is for another wasmtime, engine or module"
        artifact_sha256, size, stamp_, counts, imports = (
            fields.get(k) for k in ("artifact_sha256", "size", "stamp", "counts", "imports")
        )
        if not (
            isinstance(artifact_sha256, str)
            and _is_count(size)
            and isinstance(stamp_, list)
            and isinstance(imports, list)
            and isinstance(counts, dict)
            and set(counts) == {"size", "functions", "exports"}
            and all(_is_count(v) for v in counts.values())
        ):
            return "the record lacks the artifact's size, sha256, stamp, counts or imports"
        try:
            parsed = tuple(Import.from_json(item) for item in imports)
        except ValueError as error:
            return f"the record's imports are malformed: {error}"
        assert isinstance(size, int)
        return _Record(fields, artifact_sha256, size, stamp_, ModuleCounts(**counts), parsed)

    def _identity(self, wasm_sha256: str) -> dict[str, object]:
        return {
            "format": FORMAT,
            "wasmtime": wasmtime_version(),
            "engine": self._fingerprint,
            "wasm_sha256": wasm_sha256,
        }

    def _write_record(self, path: Path, record: dict[str, object]) -> int:
        """Write `record` (with its MAC when keyed); returns its size (0 on failure)."""
        if self._secret is not None:
            record = {**record, "mac": sign(self._secret, record)}
        data = encode_record(record)
        try:
            write_new(path, data)
        except OSError as error:
            logger.warning("module cache: could not write %s: %s", path, error)
            return 0
        return len(data)

    def _reject(self, key: str, why: str) -> CompiledModule | None:
        """Log why `key`'s artifact is not used; None (a miss: the module is recompiled and
        both files replaced)."""
        self.stats["rejected"] += 1
        logger.warning("module cache: ignoring %s.cwasm (%s); recompiling", key, why)
        return None

    def _store(self, compiled: CompiledModule, wasm_sha256: str, counts: ModuleCounts) -> None:
        artifact, record_path = self.paths(compiled.key)
        try:
            data = bytes(compiled.module.serialize())
            written = write_new(artifact, data)
        except OSError as error:
            logger.warning("module cache: could not write %s: %s", artifact, error)
            return
        record = {
            **self._identity(wasm_sha256),
            "artifact_sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "stamp": written,
            "counts": {"size": counts.size, "functions": counts.functions, "exports": counts.exports},
            "imports": [item.as_json() for item in compiled.imports],
        }
        record_size = self._write_record(record_path, record)
        assert self.index is not None
        self.index.used(compiled.key, len(data) + record_size)
        self.index.evict()


@dataclass(frozen=True)
class _Record:
    """A record read back, checked: its raw fields (to re-stamp) and their values."""

    fields: dict[str, object]
    artifact_sha256: str
    size: int
    stamp: list[object]
    counts: ModuleCounts
    imports: tuple[Import, ...]


def compile_module(
    engine: wasmtime.Engine, wasm: bytes, *, name: str, limits: ModuleLimits | None = None
) -> tuple[wasmtime.Module, ModuleCounts]:
    """Compile `wasm` (binary or WAT text) within `limits`, or raise InvalidModule saying why.

    A message never quotes the file: a "module" may be any file (a symlink to /etc/passwd).
    """
    limits = limits or ModuleLimits()
    limits.check_size(name, len(wasm))
    if not wasm:
        raise InvalidModule(f"{name}: empty file, not a WebAssembly module")
    if not wasm.startswith(WASM_MAGIC):
        if wasm.lstrip()[:1] not in (b"(", b";"):  # text starts with a form or a comment
            raise InvalidModule(
                f"{name}: not a WebAssembly module: neither binary WebAssembly (no \\0asm header) nor WebAssembly text"
            )
        try:
            wasm = bytes(wasmtime.wat2wasm(wasm.decode("utf-8")))
        except UnicodeDecodeError:
            raise InvalidModule(f"{name}: not a WebAssembly module: not binary, and not UTF-8 text") from None
        except wasmtime.WasmtimeError as error:
            raise InvalidModule(f"{name}: invalid WebAssembly module (text): {_text_cause(str(error))}") from None
    counts = module_counts(wasm, name=name)
    limits.check(name, counts)
    try:
        return wasmtime.Module(engine, wasm), counts
    except wasmtime.WasmtimeError as error:
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


def _text_cause(message: str) -> str:
    """A WAT error without the source excerpt wasmtime appends (it would quote the file):
    "expected `(` (line 1, column 2)"."""
    lines = message.strip().splitlines()
    first = lines[0].strip() if lines else "unknown error"
    first = re.sub(r"`[^`]*\w[^`]*`", "`…`", first)  # a name quoted from the file
    where = re.search(r"-->\s*\S*?:(\d+):(\d+)", message)
    return f"{first} (line {where.group(1)}, column {where.group(2)})" if where else first


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@functools.cache
def wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


__all__ = ["DEFAULT_MAX_BYTES", "CompiledModule", "CompiledModuleCache", "compile_module", "load_or_create_key"]
