"""Names in a lattice: buckets, subjects and keys, all under the lattice's name.

Several lattices may share one NATS server: every bucket is `orch_<lattice>_<purpose>` and
every subject starts with `orch.<lattice>.`, so nothing of one is visible to another
through names (use NATS accounts for real isolation). A lattice name is 1-32 of
`[a-z0-9_-]`.

NATS keys and subject tokens allow only `[-/_=.a-zA-Z0-9]` (`.` separates tokens), while
capsule names, KV keys and topics may be any UTF-8: `encode_token` maps any text to one
token reversibly (`[A-Za-z0-9_-]` as is, every other UTF-8 byte as `=XX`, the empty text as
`=`); `decode_token` maps it back.

Pure. Used by every module of orchestrator.lattice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import GateError

NAME = re.compile(r"^[a-z0-9_-]{1,32}$")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
MAX_TOKEN = 1024  # an encoded token; NATS drops a connection whose subject line passes ~4 KiB


def encode_token(text: str) -> str:
    """`text` as one NATS token (reversible). GateError when it would be too long."""
    if text == "":
        return "="
    data = text.encode("utf-8")
    token = "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in data)
    if len(token) > MAX_TOKEN:
        raise GateError(
            f"{text[:40]!r}... is {len(data)} bytes, {len(token)} once encoded for NATS: over the lattice's limit "
            f"of {MAX_TOKEN} encoded characters (ASCII letters, digits, '-' and '_' take one; other bytes three)"
        )
    return token


def decode_token(token: str) -> str:
    """The text `encode_token` made `token` from. ValueError for a token it did not make."""
    if token == "=":
        return ""
    out = bytearray()
    index = 0
    while index < len(token):
        char = token[index]
        if char == "=":
            out.append(int(token[index + 1 : index + 3], 16))
            index += 3
        else:
            out.append(ord(char))
            index += 1
    return out.decode("utf-8")


@dataclass(frozen=True)
class LatticeNames:
    """Every bucket and subject of lattice `name`."""

    name: str = "default"

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise GateError(f"lattice name {self.name!r}: use 1-32 lowercase letters, digits, '-' or '_'")

    def bucket(self, purpose: str) -> str:
        """A KV bucket or object store: `orch_<lattice>_<purpose>`."""
        return f"orch_{self.name}_{purpose}"

    def subject(self, *tokens: str) -> str:
        """`orch.<lattice>.<tokens...>` (tokens are used as given: encode them first)."""
        return ".".join(("orch", self.name, *tokens))

    # -- the buckets ---------------------------------------------------------------------
    @property
    def desired(self) -> str:
        """One key, `config`: each revision is one `orch apply` (the deployment history)."""
        return self.bucket("desired")

    @property
    def artifacts(self) -> str:
        """Object store: wasm modules and manifests by sha256."""
        return self.bucket("artifacts")

    @property
    def hosts(self) -> str:
        """A key per live host (its heartbeat, with a TTL)."""
        return self.bucket("hosts")

    @property
    def lease(self) -> str:
        """The scheduler's lease (one key, created exclusively, with a TTL)."""
        return self.bucket("lease")

    @property
    def assignments(self) -> str:
        """Where each deployment runs (written by the lease holder)."""
        return self.bucket("assign")

    @property
    def status(self) -> str:
        """A key per host: its capsules' status."""
        return self.bucket("status")

    @property
    def kv(self) -> str:
        """The capsules' key-value data."""
        return self.bucket("kv")

    # -- the subjects --------------------------------------------------------------------
    def call(self, deployment: str) -> str:
        """Tool calls of a deployment (request/reply; hosts answer in a queue group)."""
        return self.subject("call", encode_token(deployment))

    def bus(self, topic: str = ">") -> str:
        """A bus topic (NATS subject syntax already: mapped 1:1 under the prefix)."""
        return self.subject("bus", topic)

    def topic_of(self, subject: str) -> str:
        """The bus topic of a subject made by `bus`."""
        prefix = self.subject("bus") + "."
        if not subject.startswith(prefix):
            raise ValueError(f"{subject!r} is not a bus subject of lattice {self.name!r}")
        return subject[len(prefix) :]
