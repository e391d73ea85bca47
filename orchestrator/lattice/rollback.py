"""Rollback on a lattice: `orch rollback NAME --lattice URL [--to REVISION|VERSION|SPEC]
[--with-data]` and `orch unpin NAME --lattice URL`.

`rollback` finds the version (orchestrator.lattice.versions: by default the one before the
version running) and publishes a revision with the deployment *pinned* to it: its record,
secrets, module and manifest as that revision had them (artifacts stay in the object
store). The pin is carried by later revisions while the deployment's desired spec hash is
unchanged; a change of it, or `unpin`, ends it (orchestrator.lattice.judge). The revision
that replaces the running version first snapshots the data it leaves, as any does.

With `with_data`, the data that version left (its snapshot, orchestrator.lattice.snapshots)
goes back too, while no call of the deployment runs:
(a) the pinned revision also marks the deployment `paused` with a `restoring` marker:
    hosts stop taking its calls and finish those in flight (a call then gets the 409 "not
    running" answer, naming the rollback); the rollback waits until every live host
    reports, for that revision or a later one, that it does not serve it;
(b) the snapshot is restored into the lattice KV (atomic batches of at most 1,000 messages);
(c) a revision without the pause lets the hosts start the pinned version on that data.
A crash in between leaves the deployment paused with its `restoring` marker (status shows
it); running `orch rollback NAME --with-data` again completes that restore, whatever `--to`.

Everything is checked before anything changes: an unknown or ambiguous version, a module
or manifest missing from the object store, a missing snapshot, a secret whose value
changed since that version (the error names the key: rolling back never brings back a
rotated secret). Each answer has the control API's shape (the CLI prints both the same way).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import nats.errors
import nats.js.errors

from ..control.history import ArtifactMissing, NotPinned, RollbackRefused, SecretsChanged
from ..errors import StoreError
from .answers import capsule_row, deployment_of
from .connection import Lattice
from .desiredstate import DesiredDoc, Draft, Version, commit_revision, current
from .membership import live_hosts
from .overrides import Pinned, Restoring
from .snapshots import Progress, load, restore
from .status import SERVING, read_reports
from .versions import Entry, versions_of

logger = logging.getLogger(__name__)

UNSERVED_SECONDS = 60.0
POLL_SECONDS = 0.05
BUSY = (*SERVING, "Starting", "Stopping", "AwaitingApproval")


async def rollback(
    lattice: Lattice, name: str, *, to: str | None = None, with_data: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    """Run an earlier version of `name`, pinned, with its data when `with_data` (see the
    module docstring). Returns {capsule, entry, with_data, restored_keys, status}."""
    doc = await current(lattice)
    deployment = deployment_of(doc, name)
    assert doc is not None
    if deployment.restoring is not None:
        logger.info("capsule %s: a restore was left unfinished; finishing it", name)
        history = await versions_of(lattice, name)
        finished = await _finish(lattice, name, deployment.restoring, doc.revision, progress)
        entry = next((e for e in reversed(history.entries) if e.spec_hash == deployment.restoring.spec_hash), None)
        return await _answer(lattice, name, entry, with_data=True, restored=finished)
    if not deployment.spec.enabled:
        raise RollbackRefused(f"capsule {name!r} is disabled in the config (enabled: false): enable it to roll back")
    history = await versions_of(lattice, name)
    entry = history.find(to, with_data=with_data)
    version = entry.version
    _same_secrets(name, version, deployment.secrets, entry)
    await _artifacts_kept(lattice, name, version, entry)
    restoring = None
    if with_data:
        assert entry.snapshot is not None and entry.snapshot.object is not None
        await load(lattice, entry.snapshot.object, limit=1 << 40)  # readable and whole, before anything changes
        restoring = Restoring(entry.snapshot.object, entry.spec_hash, entry.last, int(time.time() * 1000))

    def make(before: DesiredDoc | None) -> Draft:
        now = deployment_of(before, name)
        assert before is not None
        if now.spec.spec_hash != deployment.spec.spec_hash or now.restoring is not None:
            raise RollbackRefused(f"capsule {name!r} changed while the rollback was prepared: look again, and retry")
        since = int(time.time() * 1000)
        pin = Pinned(version.as_version(), now.spec.spec_hash, since, entry.revision)
        rolled = now.replace(pinned=pin, awaiting=None, rejected=None, held=None, paused=with_data, restoring=restoring)
        fields = before.fields(event="rollback", now_ms=since)
        return Draft(fields, {**before.deployments, name: rolled}, granted={name: version.spec.spec_hash})

    committed = await commit_revision(lattice, make)
    restored: int | None = None
    if restoring is not None:
        restored = await _finish(lattice, name, restoring, committed.revision, progress)
    logger.info("capsule %s: rolled back to version %s (revision %d)", name, version.spec.version, entry.revision)
    return await _answer(lattice, name, entry, with_data=with_data, restored=restored)


async def unpin(lattice: Lattice, name: str) -> dict[str, Any]:
    """End `name`'s pin: its desired version runs again (judged as any change)."""

    def make(before: DesiredDoc | None) -> Draft:
        deployment = deployment_of(before, name)
        assert before is not None
        if deployment.pinned is None:
            raise NotPinned(f"capsule {name!r} is not pinned: its desired spec runs")
        if deployment.restoring is not None:
            raise RollbackRefused(
                f"capsule {name!r}: a rollback is restoring its data; finish it first "
                f"(`orch rollback {name} --with-data`)"
            )
        fields = before.fields(event="unpin", now_ms=int(time.time() * 1000))
        return Draft(fields, {**before.deployments, name: deployment.replace(pinned=None)})

    await commit_revision(lattice, make)
    return {"capsule": name, "status": await capsule_row(lattice, name)}


# -- the checks ----------------------------------------------------------------------------
def _same_secrets(name: str, version: Version, today: Mapping[str, str], entry: Entry) -> None:
    for key in sorted(version.secrets):
        if today.get(key) != version.secrets[key]:
            raise SecretsChanged(
                f"capsule {name!r}: cannot roll back to version {version.spec.version} (revision {entry.revision}): "
                f"its secret {key!r} differs from today's config (a rollback never brings back an old secret); set "
                "it in config.yaml as it was then, or roll back to another version"
            )


async def _artifacts_kept(lattice: Lattice, name: str, version: Version, entry: Entry) -> None:
    store = await lattice.objects()
    for artifact, what in ((version.wasm, "module"), (version.manifest, "manifest")):
        try:
            info = await store.get_info(artifact)
        except nats.js.errors.NotFoundError:
            info = None
        if info is None or info.deleted:
            raise ArtifactMissing(
                f"capsule {name!r}: the {what} of version {version.spec.version} (revision {entry.revision}) is no "
                f"longer in the object store {lattice.names.artifacts}: it cannot be rolled back to"
            )


# -- with data -------------------------------------------------------------------------------
async def _finish(lattice: Lattice, name: str, restoring: Restoring, paused: int, progress: Progress | None) -> int:
    """(a) wait until no host serves `name` (paused in revision `paused`), (b) restore the
    snapshot, (c) publish the revision that resumes it. The keys written or deleted."""
    await _unserved(lattice, name, paused)
    try:
        snapshot = await load(lattice, restoring.snapshot)
        if snapshot.deployment != name or snapshot.spec_hash != restoring.spec_hash:
            raise StoreError(f"the snapshot {restoring.snapshot} is not one of capsule {name!r}'s version")
        started = time.monotonic()
        count = await restore(lattice, name, snapshot.values, progress=progress)
    except (StoreError, nats.errors.Error, TimeoutError) as error:
        raise RollbackRefused(
            f"capsule {name!r}: its data was not restored ({error}); it stays paused: run "
            f"`orch rollback {name} --with-data` again to finish"
        ) from None
    logger.info(
        "capsule %s: restored %d keys of %d in %.2f s", name, count, len(snapshot.values), time.monotonic() - started
    )

    def make(before: DesiredDoc | None) -> Draft | None:
        deployment = deployment_of(before, name)
        assert before is not None
        if deployment.restoring != restoring:
            return None  # finished by another run
        resumed = deployment.replace(paused=False, restoring=None)
        return Draft(
            before.fields(event="restore", now_ms=int(time.time() * 1000)), {**before.deployments, name: resumed}
        )

    await commit_revision(lattice, make)
    return count


async def _unserved(lattice: Lattice, name: str, revision: int, *, seconds: float = UNSERVED_SECONDS) -> None:
    """Until every live host reports, for `revision` or later, that it runs no version of
    `name`. RollbackRefused past `seconds` (the deployment stays paused)."""
    end = time.monotonic() + seconds
    while True:
        live, _ = await live_hosts(lattice)
        reports = await read_reports(lattice)
        busy = []
        for host in sorted(live):
            report = reports.get(host)
            behind = report is None or int(report.get("desired_revision") or 0) < revision
            if behind or any(r.get("name") == name and r.get("phase") in BUSY for r in (report or {})["capsules"]):
                busy.append(host)
        if not busy:
            return
        if time.monotonic() > end:
            raise RollbackRefused(
                f"capsule {name!r} is paused, but host(s) {', '.join(busy)} did not report within {seconds:g} s that "
                f"they stopped serving it; nothing was restored: run `orch rollback {name} --with-data` again"
            )
        await asyncio.sleep(POLL_SECONDS)


async def _answer(
    lattice: Lattice, name: str, entry: Entry | None, *, with_data: bool, restored: int | None
) -> dict[str, Any]:
    shown = entry.to_dict(current=False, module_kept=True) if entry is not None else {"id": 0, "version": "?"}
    status = await capsule_row(lattice, name)
    return {"capsule": name, "entry": shown, "with_data": with_data, "restored_keys": restored, "status": status}
