"""Where the lattice KV keeps things in its JetStream stream, and the limits NATS imposes.

A capsule's key is the subject `$KV.<bucket>.<encode_token(capsule)>.<encode_token(key)>`
of the bucket's stream `KV_<bucket>` (orchestrator.lattice.naming encodes any UTF-8 text as
one NATS token). The transactions add a side subject to the same stream, `$KVTX.<bucket>.>`,
outside the KV namespace (no KV client ever sees it):

- `$KVTX.<bucket>.m.<i>`: read markers. A marker checks, inside an atomic batch, that a key
  the batch only read still has the revision it was read at (per-message TTL 1 s);
- `$KVTX.<bucket>.g.<capsule>`: the capsule's listing guard, rewritten by every batch that
  adds or removes one of the capsule's keys; a key listing checks it (see kvstore);
- `$KVTX.<bucket>.t.<txid>`: a batch's record, written last, expecting to be the subject's
  first message; it tells whether a batch whose reply was lost committed (see txn).

Limits: an encoded key takes at most MAX_TOKEN (1,024) characters, so a subject stays far
below the ~4 KiB protocol line past which nats-server drops the connection; a message
(headers included) must fit the server's `max_payload`, which nats-server enforces by
closing the connection, so nothing too large is ever sent; an atomic batch holds at most
1,000 messages. Pure. Used by orchestrator.lattice.kvstore and .txn.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GateError, StoreError
from .naming import MAX_TOKEN, encode_token

MAX_BATCH = 1000  # messages in one atomic batch (nats-server's limit)
MAX_CALL_MESSAGES = MAX_BATCH - 3  # a call's keys and listings, leaving room for a guard and the record
EXPECT = "Nats-Expected-Last-Subject-Sequence"
EXPECT_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
OPERATION = "KV-Operation"
MARKER_TTL = "1s"  # read markers only matter inside their batch
RECORD_TTL = "1m"  # must outlive the resolution of a batch whose reply was lost (txn.RESOLVE_SECONDS)

Entry = tuple[str, str]  # (capsule, key)


def headers_size(headers: dict[str, str]) -> int:
    """Bytes the NATS header block of `headers` takes on the wire (as nats-py encodes it)."""
    return len("NATS/1.0\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2


# The largest headers a key's message carries in a batch (see txn.build).
VALUE_HEADERS = headers_size(
    {
        "Nats-Batch-Id": "f" * 32,
        "Nats-Batch-Sequence": "1000",
        EXPECT: "18446744073709551615",
        OPERATION: "PURGE",
    }
)


@dataclass(frozen=True)
class KVSubjects:
    """The subjects of bucket `bucket`'s stream."""

    bucket: str

    @property
    def stream(self) -> str:
        return f"KV_{self.bucket}"

    @property
    def side(self) -> str:
        """The side subjects the transactions add to the stream."""
        return f"$KVTX.{self.bucket}.>"

    def key(self, capsule: str, key: str) -> str:
        return f"$KV.{self.bucket}.{capsule_token(capsule)}.{key_token(capsule, key)}"

    def capsule_keys(self, capsule: str) -> str:
        """The KV key pattern (no `$KV.` prefix) of every key of `capsule`."""
        return f"{capsule_token(capsule)}.>"

    def guard(self, capsule: str) -> str:
        return f"$KVTX.{self.bucket}.g.{capsule_token(capsule)}"

    def marker(self, index: int) -> str:
        return f"$KVTX.{self.bucket}.m.{index}"

    def record(self, txid: str) -> str:
        return f"$KVTX.{self.bucket}.t.{txid}"


def capsule_token(capsule: str) -> str:
    try:
        return encode_token(capsule)
    except GateError:
        raise GateError(
            f"capsule name {capsule[:40]!r}... is too long for the lattice KV (over {MAX_TOKEN} characters once "
            "encoded for NATS)"
        ) from None


def key_token(capsule: str, key: str) -> str:
    """`key` as one subject token. GateError, naming the limit, when it is too long."""
    try:
        return encode_token(key)
    except GateError:
        size = len(key.encode("utf-8", "surrogatepass"))
        encoded = sum(1 if c.isascii() and (c.isalnum() or c in "-_") else 3 * len(c.encode()) for c in key)
        raise GateError(
            f"KV key {key[:40]!r}... of capsule {capsule!r} is too long for the lattice KV: {size} bytes, {encoded} "
            f"characters once encoded for a NATS subject, over the limit of {MAX_TOKEN} (ASCII letters, digits, "
            "'-' and '_' take one character, every other byte three); use a shorter key"
        ) from None


def check_value(capsule: str, key: str, value: bytes | None, max_payload: int) -> None:
    """StoreError when `value` and its headers would not fit the server's max_payload."""
    if value is None:
        return
    size = len(value) + VALUE_HEADERS
    if size > max_payload:
        raise StoreError(
            f"KV key {key[:80]!r} of capsule {capsule!r}: a value of {len(value)} bytes (plus {VALUE_HEADERS} bytes of "
            f"headers) does not fit the NATS server's max_payload of {max_payload} bytes; raise `max_payload` on "
            "every server of the lattice (capsules may store values up to 1 MiB: `max_payload: 2MB`), or store "
            "less; nothing of this call was written"
        )
