"""What a lattice records about a followed git branch: a record of what is followed, and
the status of following it.

The record, key `follow` of the desired bucket (beside `config`; each key keeps its own
history there), is written by `orch apply git+URL#BRANCH:PATH --lattice URL --follow` and
deleted by an `orch apply` without `--follow`:

    {"format": 1, "source": "git+URL#BRANCH:PATH", "interval_s": 30.0,
     "by": "<user>@<machine>", "at_ms": ...}

The status, key `status` of the bucket `orch_<lattice>_follow` (apart: it is written on
every fetch, and the desired bucket's revisions are the deployment history), is written by
the host holding the scheduler lease after each fetch (and by `orch apply --follow`): what
was fetched, applied and rejected, in the shape of `GitFollower.to_dict()`
(orchestrator.control.follow) plus `host`, the host that wrote it (None when `orch apply`
did):

    {"source", "applied_revision", "applied_at_ms", "fetched_revision", "fetched_at_ms",
     "rejected": null | {"revision", "problems", "count", "at_ms"},
     "error", "error_at_ms", "interval_s", "host"}

Both are checked strictly when read (`FollowRecord.parse`, `parse_status`): anyone who can
write the buckets can put anything there, and a host must neither crash on it nor fetch
something no `orch apply` asked for (a URL with a git transport helper, `ext::...`, is
refused; so is an interval under MIN_INTERVAL_S). A value that is not one is refused
with one line naming the key and the field, never echoing the value. The status is
written with compare-and-set on the revision read (`write_status`), so a holder that lost
the lease, or one racing an `orch apply`, does not overwrite what came after it.

Used by orchestrator.lattice.follow (the holder), lattice status and the CLI.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from ..control.gitsource import GitRef, GitSourceError
from ..control.health import MAX_PROBLEMS
from .artifacts import LatticeDataError
from .connection import Lattice, LatticeError
from .desiredstate import desired_bucket

FORMAT = 1
RECORD_KEY = "follow"
STATUS_PURPOSE = "follow"  # the status's bucket: orch_<lattice>_follow
STATUS_KEY = "status"
STATUS_HISTORY = 8
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 86_400.0
MAX_RECORD_BYTES = 16 << 10
MAX_STATUS_BYTES = 512 << 10
MAX_SOURCE = 4096
MAX_TEXT = 8192  # one problem, an error, `by`, `host`
RECORD_KEYS = {"format", "source", "interval_s", "by", "at_ms"}
STATUS_KEYS = {
    "source",
    "applied_revision",
    "applied_at_ms",
    "fetched_revision",
    "fetched_at_ms",
    "rejected",
    "error",
    "error_at_ms",
    "interval_s",
    "host",
}
REJECTED_KEYS = {"revision", "problems", "count", "at_ms"}
_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_source(text: str) -> GitRef:
    """The GitRef of a source a lattice may follow. GitSourceError (naming the rule, not
    echoing `text` beyond its start) when it is not one: the git+URL#REF:PATH form, at most
    MAX_SOURCE characters, no control characters, and no transport helper (`ext::`, `fd::`:
    git would run a command)."""
    if len(text) > MAX_SOURCE or _CONTROL.search(text):
        raise GitSourceError(f"a followed source is at most {MAX_SOURCE} characters, without control characters")
    ref = GitRef.parse(text)
    if "::" in ref.url:
        raise GitSourceError(
            "a followed source may not use a git transport helper (URL::ADDRESS, e.g. ext::): "
            "give a file://, https:// or ssh:// URL"
        )
    return ref


def check_interval(value: Any) -> float:
    """`value` as the seconds between fetches; ValueError unless a number in
    [MIN_INTERVAL_S, MAX_INTERVAL_S]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("interval_s must be a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
        raise ValueError(f"interval_s must be between {MIN_INTERVAL_S:g} and {MAX_INTERVAL_S:g} seconds")
    return seconds


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value: Any, limit: int = MAX_TEXT) -> bool:
    return isinstance(value, str) and len(value) <= limit


@dataclass(frozen=True)
class FollowRecord:
    """The source a lattice follows, checked."""

    source: str
    interval_s: float
    by: str
    at_ms: int
    revision: int = 0  # of the `follow` key

    @property
    def ref(self) -> GitRef:
        return GitRef.parse(self.source)

    def to_bytes(self) -> bytes:
        value = {"format": FORMAT, "source": self.source, "interval_s": self.interval_s, "by": self.by}
        return json.dumps({**value, "at_ms": self.at_ms}, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, *, revision: int, where: str) -> FollowRecord:
        """LatticeDataError (one line naming `where` and the field) unless `data` is a
        follow record this code would write."""

        def bad(why: str) -> LatticeDataError:
            return LatticeDataError(
                f"{where} (revision {revision}) is not a follow record: {why}; nothing is followed until "
                "`orch apply git+URL#BRANCH:PATH --lattice URL --follow` writes a new one "
                "(or `orch apply` without --follow ends following)"
            )

        if len(data) > MAX_RECORD_BYTES:
            raise bad(f"{len(data):,} bytes, over {MAX_RECORD_BYTES:,}")
        try:
            value: Any = json.loads(data)
        except (ValueError, RecursionError):
            raise bad("not JSON") from None
        if not isinstance(value, dict) or set(value) != RECORD_KEYS:
            raise bad(f"expected exactly the fields {', '.join(sorted(RECORD_KEYS))}")
        if value["format"] != FORMAT or isinstance(value["format"], bool):
            raise bad(f"format is not {FORMAT} (written by another version of the orchestrator?)")
        if not isinstance(value["source"], str):
            raise bad("source must be text")
        try:
            check_source(value["source"])
        except GitSourceError:  # (its message quotes the text: not repeated here)
            raise bad(
                f"source is not a git source to follow (git+URL#BRANCH:PATH, at most {MAX_SOURCE} characters, "
                "no transport helper such as ext::)"
            ) from None
        try:
            interval = check_interval(value["interval_s"])
        except ValueError as error:
            raise bad(str(error)) from None
        if not _text(value["by"], 256) or not _whole(value["at_ms"]):
            raise bad("by must be text (at most 256 characters), at_ms a whole number")
        return cls(value["source"], interval, value["by"], value["at_ms"], revision)


def parse_status(data: bytes, *, revision: int, where: str) -> dict[str, Any]:
    """A follow status (see the module docstring), checked. LatticeDataError (one line)
    when it is not one; the holder writes a new one on its next fetch."""

    def bad(why: str) -> LatticeDataError:
        return LatticeDataError(
            f"{where} (revision {revision}) is not a follow status: {why}; the host following the branch "
            "writes a new one on its next fetch (`orch reconcile --lattice URL` fetches now)"
        )

    if len(data) > MAX_STATUS_BYTES:
        raise bad(f"{len(data):,} bytes, over {MAX_STATUS_BYTES:,}")
    try:
        value: Any = json.loads(data)
    except (ValueError, RecursionError):
        raise bad("not JSON") from None
    if not isinstance(value, dict) or set(value) != STATUS_KEYS:
        raise bad(f"expected exactly the fields {', '.join(sorted(STATUS_KEYS))}")
    if not _text(value["source"], MAX_SOURCE):
        raise bad("source must be text")
    for key in ("applied_revision", "fetched_revision"):
        if value[key] is not None and not (isinstance(value[key], str) and _SHA.match(value[key])):
            raise bad(f"{key} must be a commit id or null")
    for key in ("applied_at_ms", "fetched_at_ms", "error_at_ms"):
        if value[key] is not None and not _whole(value[key]):
            raise bad(f"{key} must be a whole number or null")
    for key in ("error", "host"):
        if value[key] is not None and not _text(value[key]):
            raise bad(f"{key} must be text (at most {MAX_TEXT} characters) or null")
    try:
        check_interval(value["interval_s"])
    except ValueError as error:
        raise bad(str(error)) from None
    rejected = value["rejected"]
    if rejected is not None:
        if not isinstance(rejected, dict) or set(rejected) != REJECTED_KEYS:
            raise bad(f"rejected must be null or exactly the fields {', '.join(sorted(REJECTED_KEYS))}")
        problems = rejected["problems"]
        if not isinstance(rejected["revision"], str) or not _SHA.match(rejected["revision"]):
            raise bad("rejected.revision must be a commit id")
        if not isinstance(problems, list) or len(problems) > MAX_PROBLEMS or not all(_text(p) for p in problems):
            raise bad(f"rejected.problems must be a list of at most {MAX_PROBLEMS} texts")
        if not _whole(rejected["count"]) or not _whole(rejected["at_ms"]):
            raise bad("rejected.count and rejected.at_ms must be whole numbers")
    return dict(value)


def clipped(status: Mapping[str, Any]) -> dict[str, Any]:
    """`status` cut to what `parse_status` takes (long problems and errors are shortened)."""

    def cut(text: Any) -> Any:
        return text if not isinstance(text, str) or len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"

    out = {key: status.get(key) for key in STATUS_KEYS}
    out["error"], out["host"] = cut(out["error"]), cut(out["host"])
    rejected = out["rejected"]
    if isinstance(rejected, Mapping):
        out["rejected"] = {**rejected, "problems": [cut(p) for p in list(rejected["problems"])[:MAX_PROBLEMS]]}
    return out


# -- reading and writing -----------------------------------------------------------------
async def status_bucket(lattice: Lattice) -> KeyValue:
    """The follow status's bucket, `orch_<lattice>_follow` (apart from the desired bucket,
    whose revisions are the deployment history: a status written on every fetch would make
    them jump). Created with as many replicas as the desired bucket has."""
    name = lattice.names.bucket(STATUS_PURPOSE)
    try:
        replicas = (await lattice.js.stream_info(f"KV_{lattice.names.desired}")).config.num_replicas or 1
    except nats.js.errors.NotFoundError:
        replicas = 1
    return await lattice.bucket(name, history=STATUS_HISTORY, replicas=replicas)


async def match_replicas(lattice: Lattice) -> None:
    """Give the status bucket as many replicas as the desired bucket (after `publish`
    scaled the lattice to `lattice.replicas`)."""
    streams = [f"KV_{lattice.names.desired}", f"KV_{lattice.names.bucket(STATUS_PURPOSE)}"]
    desired, status = [(await lattice.js.stream_info(stream)).config for stream in streams]
    if status.num_replicas != desired.num_replicas:
        status.num_replicas = desired.num_replicas
        await lattice.js.update_stream(status)


async def _entry(bucket: KeyValue, key: str) -> tuple[int, bytes | None]:
    """(the key's last revision, delete markers included, or 0; its value or None)."""
    try:
        entry = await bucket.get(key)
    except nats.js.errors.KeyNotFoundError as missing:  # (deleted: the marker's revision)
        return (int(missing.entry.revision or 0) if missing.entry else 0), None
    return int(entry.revision or 0), entry.value or None


async def read_record(lattice: Lattice) -> tuple[int, FollowRecord | None, str | None]:
    """(revision of `follow`, or 0; the record, or None when nothing is followed or it is
    malformed; why it is malformed, or None)."""
    revision, data = await _entry(await desired_bucket(lattice), RECORD_KEY)
    if data is None:
        return revision, None, None
    where = f"{lattice.names.desired}.{RECORD_KEY}"
    try:
        return revision, FollowRecord.parse(data, revision=revision, where=where), None
    except LatticeDataError as error:
        return revision, None, str(error)


async def read_status(lattice: Lattice) -> tuple[int, dict[str, Any] | None, str | None]:
    """(revision of the follow status, or 0; the status, or None; why it is malformed, or None)."""
    try:
        bucket = await lattice.js.key_value(lattice.names.bucket(STATUS_PURPOSE))  # (reading creates nothing)
    except nats.js.errors.BucketNotFoundError:
        return 0, None, None
    revision, data = await _entry(bucket, STATUS_KEY)
    if data is None:
        return revision, None, None
    where = f"{lattice.names.bucket(STATUS_PURPOSE)}.{STATUS_KEY}"
    try:
        return revision, parse_status(data, revision=revision, where=where), None
    except LatticeDataError as error:
        return revision, None, str(error)


async def write_record(lattice: Lattice, record: FollowRecord) -> int:
    bucket = await desired_bucket(lattice)
    return int(await bucket.put(RECORD_KEY, record.to_bytes()))


async def write_status(lattice: Lattice, status: Mapping[str, Any], *, last: int | None) -> int | None:
    """Put the status; with `last`, only if the key's revision is still `last` (0: never
    written). The new revision, or None when someone else wrote it first."""
    data = json.dumps(clipped(status), separators=(",", ":"), sort_keys=True).encode()
    bucket = await status_bucket(lattice)
    if last is None:
        return int(await bucket.put(STATUS_KEY, data))
    try:
        return int(await bucket.update(STATUS_KEY, data, last=last))
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


async def end_following(lattice: Lattice) -> FollowRecord | None:
    """Delete the follow record and status (`orch apply` without --follow); the record that
    was in force (None when nothing was followed, or only a malformed record was there:
    deleted too). Raises LatticeError."""
    try:
        _, record, problem = await read_record(lattice)
        if record is not None or problem is not None:
            await (await desired_bucket(lattice)).delete(RECORD_KEY)
        _, status, status_problem = await read_status(lattice)
        if status is not None or status_problem is not None:
            await (await status_bucket(lattice)).delete(STATUS_KEY)
    except (nats.errors.Error, OSError, TimeoutError) as error:
        raise LatticeError(
            f"the lattice at {lattice.address.shown} did not take the end of following "
            f"({type(error).__name__}: {error or 'no answer'}); apply again"
        ) from None
    return record


async def start_following(lattice: Lattice, record: FollowRecord, commit: str) -> None:
    """Record that the lattice follows `record.source`, whose revision `commit` was just
    published (`orch apply --follow`): the status first, so that the holder the new record
    wakes carries on from it. Raises LatticeError."""
    status: dict[str, Any] = {key: None for key in STATUS_KEYS}
    status.update(source=record.source, interval_s=record.interval_s, applied_revision=commit)
    status.update(applied_at_ms=record.at_ms, fetched_revision=commit, fetched_at_ms=record.at_ms)
    try:
        await write_status(lattice, status, last=None)
        await match_replicas(lattice)
        await write_record(lattice, record)
    except (nats.errors.Error, OSError, TimeoutError) as error:
        raise LatticeError(
            f"the lattice at {lattice.address.shown} did not take the follow record "
            f"({type(error).__name__}: {error or 'no answer'}); apply again"
        ) from None


def view(record: FollowRecord | None, status: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What status shows as `git`: the status of the followed source (the record's source
    and interval, the rest null until the holder's first fetch); None when nothing is
    followed. A status of another source (left from before) is not shown."""
    if record is None:
        return None
    shown: dict[str, Any] = {key: None for key in STATUS_KEYS}
    if status is not None and status.get("source") == record.source:
        shown.update(status)
    shown["source"], shown["interval_s"] = record.source, record.interval_s
    return shown
