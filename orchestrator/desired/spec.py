"""CapsuleSpec: one capsule's desired state as an immutable value, and its spec hash.

A spec is everything that decides how a capsule runs: the wasm's sha256, the manifest, the
resolved configuration, the limits, the number of instances and the capabilities (part of
the manifest, kept apart for diffs). `spec_hash` covers all of it, so "did anything change"
is one comparison. Specs also say how the deployment is wired (`depends_on`, `enabled`),
which affects ordering but never requires a reload.

A spec read from files carries its `source`: the parsed manifest and the wasm bytes as the
loader read them (with the file's stamp), so the capsule layer builds the running version
from the very bytes that were hashed, without going back to the folder. The source is not
part of the value: it is not compared, hashed or recorded.

A spec can be turned into a JSON record and back (`record`, `from_record`): the record is
what the state dir keeps as the last applied state, so `orch plan` can diff without a
running orchestrator. Secret values never enter a record: they are replaced by a keyed
digest, which is enough to tell that a secret changed without being able to recover it.

Pure values; used by the plan (pure), the loader, the reconciler and the capsule layer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..files import FileStamp
from .manifest import Manifest

SECRET_PREFIX = "secret-sha256:"


def secret_digest(name: str, key: str, value: str) -> str:
    """A digest of a secret value that cannot be compared across capsules or keys."""
    return SECRET_PREFIX + hashlib.sha256(f"{name}\0{key}\0{value}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CapsuleSource:
    """What the loader read for a spec: the manifest as a model, the wasm's bytes, and the
    stamps of both files when read (to tell a file caught mid-write without re-reading)."""

    manifest: Manifest
    wasm: bytes
    wasm_sha256: str
    wasm_path: str
    wasm_stamp: FileStamp
    manifest_stamp: FileStamp

    def wasm_changed(self) -> bool:
        """Whether the wasm file on disk is no longer the one that was read."""
        return FileStamp.at(self.wasm_path) != self.wasm_stamp


@dataclass(frozen=True)
class CapsuleSpec:
    """One deployment's desired state."""

    name: str  # the deployment's name (a capsule may run under two names)
    folder: str  # absolute path of the capsule folder
    wasm_sha256: str
    manifest: Mapping[str, Any]  # the manifest as plain data (Manifest.model_dump(by_alias=True))
    config: Mapping[str, str]  # resolved; secret values in plain text (never recorded)
    secret_keys: frozenset[str]
    limits: Mapping[str, int]  # fuel, memory_mib, timeout_ms
    instances: int = 1
    publish_rate: Mapping[str, float] = field(default_factory=dict)  # messages_per_second, bytes_per_second
    depends_on: tuple[str, ...] = ()
    enabled: bool = True
    hosts: int = 1  # in a lattice: how many hosts run it (placement only: not in the spec hash)
    labels: Mapping[str, str] = field(default_factory=dict)  # in a lattice: hosts must have all of these
    source: CapsuleSource | None = field(default=None, compare=False, repr=False)  # None when rebuilt from a record
    spec_hash: str = field(default="", compare=False, init=False)  # always computed (also by `replace`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec_hash", self.compute_hash())

    @property
    def capabilities(self) -> Mapping[str, Any]:
        caps = self.manifest.get("capabilities", {})
        return caps if isinstance(caps, Mapping) else {}

    @property
    def version(self) -> str:
        """The short wasm hash people see."""
        return self.wasm_sha256[:12]

    def config_view(self) -> dict[str, str]:
        """The config with secret values replaced by their digests (safe to store and diff)."""
        return {
            key: secret_digest(self.name, key, value)
            if key in self.secret_keys and not value.startswith(SECRET_PREFIX)
            else value
            for key, value in self.config.items()
        }

    def compute_hash(self) -> str:
        material = {
            "wasm": self.wasm_sha256,
            "manifest": self.manifest,
            "config": self.config_view(),
            "limits": dict(self.limits),
            "instances": self.instances,
        }
        if self.publish_rate:  # only when set, so specs without one keep their hash
            material["publish_rate"] = dict(self.publish_rate)
        return hashlib.sha256(_canonical(material)).hexdigest()

    def record(self) -> dict[str, Any]:
        """A JSON-able record without secret values."""
        return {
            "name": self.name,
            "folder": self.folder,
            "wasm_sha256": self.wasm_sha256,
            "manifest": self.manifest,
            "config": self.config_view(),
            "secret_keys": sorted(self.secret_keys),
            "limits": dict(self.limits),
            "instances": self.instances,
            "publish_rate": dict(self.publish_rate),
            "depends_on": list(self.depends_on),
            "enabled": self.enabled,
            "hosts": self.hosts,
            "labels": dict(self.labels),
            "spec_hash": self.spec_hash,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CapsuleSpec:
        """A spec rebuilt from `record` (its secrets are digests; the hash is the same)."""
        spec = cls(
            name=str(record["name"]),
            folder=str(record["folder"]),
            wasm_sha256=str(record["wasm_sha256"]),
            manifest=record["manifest"],
            config={str(k): str(v) for k, v in record["config"].items()},
            secret_keys=frozenset(record.get("secret_keys", ())),
            limits={str(k): int(v) for k, v in record["limits"].items()},
            instances=int(record.get("instances", 1)),
            publish_rate={str(k): float(v) for k, v in record.get("publish_rate", {}).items()},
            depends_on=tuple(record.get("depends_on", ())),
            hosts=int(record.get("hosts", 1)),
            labels={str(k): str(v) for k, v in record.get("labels", {}).items()},
            enabled=bool(record.get("enabled", True)),
        )
        return spec


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
