"""The running orchestrator: wires desired state, store, bus, engine, reconciler, watcher, builds.

`Orchestrator.start()` loads the desired state, opens the KV store and the engine (its module
cache in the state dir), applies the first plan and starts watching. A change to the config
file re-reads everything (files whose stamp did not change are not read again); a change in
a capsule folder re-reads that capsule alone (and runs its `[build]` when a source changed).
An invalid config or manifest changes nothing that runs: the last good desired state stays
and the problems are published as `orch.reconcile.rejected`. After every apply the state
dir's `applied.json` records what runs (without secret values), for `orch plan`. Reading
files and writing the record happen on worker threads: the event loop never waits on disk.

Every start, reload and rollback is recorded in the version history (orchestrator.control
.history: entries, modules, KV snapshots); `rollback` runs an earlier version, pinned, and
`unpin` ends a pin (orchestrator.control.rollback).

The escalation gate (control.approvals) judges each start and reload by the approval
policy in force, the one of the config applied before (the first config applied in a state
dir: its own), made no more permissive by the new config's. Once a config is applied, its
policy is in force; `approve` and `reject` are the operator's answers (`orch approve|reject
NAME`).

`stop()` shuts down in phases with a deadline: stop watching and building, stop capsules
(dependents first; calls in flight get a bounded wait), close the store, the engine and
the bus.

Used by the CLI (`orch up`) and the control API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..capsule import CapsuleLauncher, EventBus, KVStore
from ..capsule.protected import ProtectedArea, ProtectedHolder, ProtectedPaths
from ..desired import DesiredState, Plan, load_desired
from ..desired.config import HistorySettings, LoadedConfig
from ..desired.manifest import Manifest, load_manifest
from ..engine import WasmEngine, load_or_create_key
from ..errors import ConfigError, ManifestError, Problem, UnknownCapsule
from . import approvals
from .approvals import ApprovalGate
from .builds import Builder
from .builds import sources as build_sources
from .follow import GitFollower, RevisionRejected
from .gitrev import GitRevision
from .health import DesiredHealth
from .history import NotPinned, VersionHistory
from .reconciler import Reconciler
from .rollback import restored_pins, roll_back
from .statedir import CACHE, CACHE_KEY, KV_DATABASE, StateDir, read_applied, write_applied
from .watcher import Watcher

logger = logging.getLogger(__name__)
GIT_CLONE = "the orchestrator's git clone and checkouts are never reachable by capsules"


class Orchestrator:
    """One orchestrator process's state. `await start()`, then `await stop()`."""

    def __init__(
        self,
        config_path: Path | str | None = None,
        *,
        watch: bool = True,
        builds: bool = True,
        environ: Mapping[str, str] | None = None,
        follow: GitFollower | None = None,
    ) -> None:
        # Following git (`follow`): each revision's config.yaml is in its checkout (config_path
        # follows it), which never changes: the fetch interval and reconcile drive changes.
        self.follow = follow
        if follow is not None:
            config_path, watch = follow.folder, False
        if config_path is None:
            raise TypeError("Orchestrator needs a config_path, or a GitFollower to follow")
        self.config_path = Path(config_path).absolute()
        self.watch = watch
        self.builds = builds  # the operator's switch (`orch up --no-builds`); config.yaml's `builds` too
        self.environ = environ
        self.bus = EventBus(history=10_000)
        self.desired: DesiredState | None = None
        self.store: KVStore | None = None
        self.engine: WasmEngine | None = None
        self.reconciler: Reconciler | None = None
        self.builder = Builder(bus=self.bus, enabled=builds, on_finished=self._build_finished)
        if follow is not None:
            follow.builder = self.builder if builds else None  # (`--allow-builds`) built before validation
        self.started_at = time.time()
        self.last_plan: Plan | None = None
        self.revision = GitRevision(self.config_path.parent, watched=self.config_path)
        self._watcher: Watcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._changes = asyncio.Lock()
        self.health = DesiredHealth(wall_ms=lambda: int(time.time() * 1000))
        self.protected = ProtectedHolder()  # swapped on every desired state: gates read it per access
        self._first: DesiredState | None = None
        self._recording: asyncio.Future[None] | None = None
        self.ready = False  # the first plan has been applied
        self.state: StateDir | None = None
        self.history: VersionHistory | None = None
        self._describing: asyncio.Future[str | None] | None = None  # the local revision, re-read
        self._rejected_first: RevisionRejected | None = None
        # The protected paths of the last config read, with its folders and build inputs:
        # resolving 1,000 folders takes 20+ ms, and a change to capsule files alone keeps
        # the very same config object (desired.load).
        self._protecting: tuple[LoadedConfig, list[Path], list[Path], ProtectedPaths] | None = None
        self.approvals: ApprovalGate | None = None

    async def load(self, *, previous: DesiredState | None = None, only: list[str] | None = None) -> DesiredState:
        """Read the desired state on a worker thread. Raises ConfigError. Following git: fetch,
        check out and validate the branch's revision strictly (RevisionRejected, SourceError)."""
        if self.follow is not None:
            return await self.follow.latest(environ=self.environ)
        return await asyncio.to_thread(
            load_desired, self.config_path, environ=self.environ, previous=previous, only=only, strict=False
        )

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> Plan:
        """`prepare`, then `run`."""
        await self.prepare()
        return await self.run()

    async def prepare(self) -> DesiredState:
        """Load the desired state; check, lock and open the state dir, the KV store and the
        engine. Nothing runs yet, so the control API can be served from here on. Raises
        ConfigError, StateDirError (another orchestrator holds the state dir, or it is
        unusable) or StoreError, each before anything was started or written."""
        if self.follow is None:
            desired = await self.load()
            self.state = await asyncio.to_thread(StateDir.open, desired.config.state_dir)
        else:  # the clone lives in the state dir: locked first
            self.state = await asyncio.to_thread(StateDir.open, self.follow.state_dir)
            try:
                desired, self._rejected_first = await self.follow.first(environ=self.environ)
            except BaseException:
                self.state.close()
                raise
        state_dir = self.state.path
        try:
            self.store = await KVStore.open(state_dir / KV_DATABASE)
            key = await asyncio.to_thread(load_or_create_key, state_dir / CACHE_KEY)
            self.history = VersionHistory(
                state_dir=state_dir,
                store=self.store,
                settings=self._history_settings,
                revision=self._history_revision,
            )
            await self.history.open()
        except BaseException:
            if self.store is not None:
                await self.store.close()
            self.state.close()
            raise
        settings = desired.config.model.engine  # read at start: a change takes effect on restart
        self.engine = WasmEngine(
            cache_dir=state_dir / CACHE,
            cache_key=key,
            cache_max_bytes=settings.cache_max_mib << 20,
            max_module_bytes=settings.max_module_mib << 20,
        )
        self.protected.current = await asyncio.to_thread(self._protected_paths, desired)
        launcher = CapsuleLauncher(
            engine=self.engine,
            bus=self.bus,
            store=self.store,
            workspace=desired.config.workspace,
            protected=self.protected,
        )
        policy = desired.config.model.approvals  # in force only if nothing was ever applied in this state dir
        ran = await asyncio.to_thread(read_applied, state_dir)
        self.approvals = await asyncio.to_thread(
            ApprovalGate.open, state_dir, bus=self.bus, policy=policy, recorded=ran
        )
        self.reconciler = Reconciler(launcher=launcher, bus=self.bus, versions=self.history, approvals=self.approvals)
        self._first = desired
        return desired

    async def run(self) -> Plan:
        """Apply the first plan (capsules load concurrently, dependencies first) and start
        watching. Call after `prepare`."""
        assert self._first is not None, "call prepare() first"
        desired, self._first = self._first, None
        async with self._changes:
            assert self.history is not None and self.reconciler is not None
            self.reconciler.restore_pins(await restored_pins(self.history, desired.specs))  # a restart keeps them
            plan = await self._apply(desired)
            if self._rejected_first is not None:  # the branch's revision, rejected: the one before runs
                self._rejected(self._rejected_first)
        self.ready = True
        self.builder.enabled = self.builds and desired.config.model.builds
        await self._build_stale(desired)
        if self.watch:
            self._watcher = Watcher(config_path=self.config_path)
            await self._watcher.start(self._folders(desired))
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_loop(), name="watch")
            plan = await self._catch_up(plan)
        elif self.follow is not None:
            self._watch_task = asyncio.get_running_loop().create_task(self.follow.run(self._git_tick), name="follow")
        return plan

    async def _git_tick(self) -> None:
        """The fetch interval: apply the branch's revision when it is one not validated yet
        (a fetch that fails is recorded and logged by the follower)."""
        assert self.follow is not None
        async with self._changes:
            try:
                desired = await self.follow.next_revision(environ=self.environ)
            except ConfigError as error:
                self._rejected(error)
                return
            if desired is not None:
                await self._apply(desired)

    async def _catch_up(self, plan: Plan) -> Plan:
        """Apply what changed between the first read and the watches being in place."""
        assert self.desired is not None
        try:
            desired = await self.load(previous=self.desired)
        except ConfigError:
            return plan  # the watcher reports it when it is saved again
        if {n: s.spec_hash for n, s in desired.specs.items()} == {
            n: s.spec_hash for n, s in self.desired.specs.items()
        }:
            return plan
        async with self._changes:
            return await self._apply(desired)

    async def stop(self, timeout: float = 10.0) -> None:
        """Phased shutdown: watching and builds, capsules (bounded), store, engine, bus."""
        if self._recording is not None:
            await asyncio.wait({self._recording}, timeout=timeout)  # the last applied.json, written whole
        if self._describing is not None:
            await asyncio.wait({self._describing}, timeout=timeout)
        if self._watcher is not None:
            await self._watcher.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self.builder.close()
        if self.reconciler is not None:
            await self.reconciler.shutdown(timeout)
        if self.store is not None:
            await self.store.close()
        if self.engine is not None:
            self.engine.close()
        if self.state is not None:
            self.state.close()
        self.bus.close()

    # -- applying ------------------------------------------------------------------------
    async def _apply(self, desired: DesiredState) -> Plan:
        assert self.reconciler is not None
        self.desired = desired  # what is being applied: the API names its deployments from here on
        if self.follow is not None:
            self.config_path = desired.config.path  # in the revision's checkout
        self.protected.current = await asyncio.to_thread(self._protected_paths, desired)  # resolves paths
        broken = {name: _why_broken(problems) for name, problems in desired.broken.items()}
        await asyncio.to_thread(self.revision.describe)  # the revision the history's entries record
        assert self.approvals is not None
        self.approvals.propose(desired.config.model.approvals)  # may tighten, never relax, the judgement
        plan = await self.reconciler.apply(desired.specs, broken=broken)
        self.last_plan = plan
        if self.history is not None:
            await self.history.save_pins(self.reconciler.pins)
        self._accepted(desired)
        self.approvals.adopt(desired.config.model.approvals)  # applied: its policy judges the next change
        await self._record(desired)
        return plan

    async def _record(self, desired: DesiredState) -> None:
        """applied.json (what runs) and approvals.json (the policy in force, rejections)."""
        assert self.reconciler is not None and self.approvals is not None
        running = {name: spec.record() for name, spec in self.reconciler.actual().items()}
        if self.follow is not None and (commit := self.follow.revision_of(desired)) is not None:
            self.follow.applied(commit)
            await asyncio.to_thread(self.follow.prune, [r["folder"] for r in running.values()])
        # Shielded: a shutdown arriving now must not lose the record of what was applied
        # (`stop` waits for it); `orch plan` reads it once this orchestrator is gone.
        self._recording = asyncio.ensure_future(asyncio.to_thread(self._record_applied, desired, running))
        await asyncio.shield(self._recording)
        if (changes := self.approvals.changes()) is not None:
            await asyncio.to_thread(approvals.write, desired.config.state_dir, changes)

    async def approve(self, name: str, spec_hash: str | None = None) -> dict[str, Any]:
        """The operator grants what `name` waits for; it starts or reloads now (the control
        API's `POST /v1/capsules/{name}/approve`). Returns its status."""
        assert self.reconciler is not None and self.desired is not None
        async with self._changes:
            status = await self.reconciler.approve(name, spec_hash)
            await self._record(self.desired)
        return status

    async def reject(self, name: str, spec_hash: str | None = None) -> dict[str, Any]:
        """The operator refuses what `name` waits for (`POST /v1/capsules/{name}/reject`)."""
        assert self.reconciler is not None and self.desired is not None
        async with self._changes:
            status = await self.reconciler.reject(name, spec_hash)
            await self._record(self.desired)
        return status

    async def reconcile(self) -> Plan:
        """Re-read every file now and apply (the control API's `POST /v1/reconcile`).
        Raises ConfigError (recorded as a rejection) when config.yaml cannot be used."""
        async with self._changes:
            try:
                desired = await self.load(previous=self.desired)
            except ConfigError as error:
                self._rejected(error)
                raise
            return await self._apply(desired)

    # -- history and rollback (orchestrator.control.history, .rollback) -------------------
    def _history_settings(self) -> HistorySettings:
        desired = self.desired or self._first
        return desired.config.model.history if desired is not None else HistorySettings()

    async def rollback(self, name: str, *, to: str | None = None, with_data: bool = False) -> dict[str, Any]:
        """Run an earlier version of `name`, pinned (`POST /v1/capsules/{name}/rollback`).
        Raises RollbackRefused (and kinds), UnknownCapsule, or the launch's error; nothing
        changed then."""
        async with self._changes:
            assert self.desired is not None and self.reconciler is not None
            assert self.history is not None and self.store is not None
            result = await roll_back(
                name=name,
                to=to,
                with_data=with_data,
                desired=self.desired.specs,
                reconciler=self.reconciler,
                history=self.history,
                store=self.store,
                now_ms=int(time.time() * 1000),
            )
            await self.history.save_pins(self.reconciler.pins)
            running = {n: spec.record() for n, spec in self.reconciler.actual().items()}
            await asyncio.to_thread(self._record_applied, self.desired, running)
            return result

    async def unpin(self, name: str) -> dict[str, Any]:
        """End `name`'s pin and converge on its desired spec now. Raises NotPinned."""
        async with self._changes:
            assert self.desired is not None and self.reconciler is not None
            if not self.reconciler.unpin(name):
                raise NotPinned(f"capsule {name!r} is not pinned: its desired spec runs")
            plan = await self._apply(self.desired)
            slot = self.reconciler.slot(name)
            return {"capsule": name, "status": slot.status() if slot else None, "plan": plan.to_dict()}

    async def version_history(self, name: str) -> dict[str, Any]:
        """`name`'s history, newest first (`GET /v1/capsules/{name}/history`)."""
        assert self.history is not None and self.reconciler is not None
        if not self.history.known(name) and (self.desired is None or name not in self.desired.specs):
            raise UnknownCapsule(f"no capsule {name!r} in the config or the version history")
        slot = self.reconciler.slot(name)
        running = slot.spec.spec_hash if slot is not None and slot.handle is not None and slot.spec else None
        return await self.history.describe(name, running=running, pin=self.reconciler.pins.get(name))

    def _accepted(self, desired: DesiredState) -> None:
        self.health.forget(set(desired.config.model.capsules))
        for name, problems in desired.broken.items():
            if name not in self.health.broken or self.health.broken[name]["problems"] != [str(p) for p in problems]:
                logger.warning(
                    "capsule %s: its files have problems; it keeps its last good version:\n  %s",
                    name,
                    "\n  ".join(str(p) for p in problems),
                )
        if self.health.accepted(desired.broken):
            logger.info("desired state accepted again: every file is usable")
            self.bus.publish("orch.reconcile.accepted", {"config": str(self.config_path)})

    def _rejected(self, error: ConfigError) -> None:
        problems = [str(p) for p in error.problems]
        revision = error.revision if isinstance(error, RevisionRejected) else None
        if self.follow is not None and isinstance(error, RevisionRejected):
            self.follow.rejected_now(error)
        self.health.rejected_config(problems, revision=revision)
        what = f"revision {revision} not applied" if revision else "not applied"
        logger.warning("%s; the last good state keeps running:\n  %s", what, "\n  ".join(problems))
        event = {"problems": problems, "config": str(self.config_path)}
        self.bus.publish("orch.reconcile.rejected", event if revision is None else {**event, "revision": revision})

    def _protected_paths(self, desired: DesiredState) -> ProtectedPaths:
        """What no capsule may reach through its file grants: this orchestrator's own files,
        every capsule folder of the config (disabled ones too) and, for capsules with a
        `[build]`, the folder above theirs (shared build scripts and SDKs live there)."""
        config = desired.config
        cached = self._protecting if self._protecting is not None and self._protecting[0] is config else None
        folders = cached[1] if cached is not None else [config.folder(name) for name in config.model.capsules]
        built = [
            folder.parent
            for name, folder in zip(config.model.capsules, folders, strict=True)
            if (manifest := desired.manifest(name)) is not None
            and manifest.build is not None
            and folder.parent != config.workspace
        ]
        if cached is not None and cached[2] == built:
            return cached[3]  # the same config.yaml object (only capsule files changed), the same builds
        paths = ProtectedPaths.build(
            state_dir=config.state_dir,
            cache_dir=config.state_dir / CACHE,
            config_file=self.config_path if self.follow is None else config.path,
            capsule_folders=folders,  # following git: in the revision's checkout
            build_inputs=built,
            extra=[ProtectedArea(self.follow.folder, GIT_CLONE)] if self.follow is not None else [],
        )
        self._protecting = (config, folders, built, paths)
        return paths

    def _record_applied(self, desired: DesiredState, running: dict[str, Any]) -> None:
        """Write applied.json (on a worker thread: it reads the git revision and can be a
        megabyte)."""
        record = {
            "config_path": str(self.config_path),
            "config_sha256": desired.config.text_sha256,
            "git_revision": self.revision.describe() if self.follow is None else self._revision_now(),
            "applied_at_ms": int(time.time() * 1000),
            "capsules": running,
        }
        if self.follow is not None:
            record["git"] = self.follow.to_dict()
        write_applied(desired.config.state_dir, record)

    # -- watching ------------------------------------------------------------------------
    def _folders(self, desired: DesiredState) -> list[Path]:
        return [desired.config.folder(name) for name in desired.config.model.capsules]

    async def _watch_loop(self) -> None:
        assert self._watcher is not None
        async for changes in self._watcher.changes():
            try:
                async with self._changes:
                    await self._on_changes(changes.config, changes.folders, rescan=changes.rescan)
            except Exception:  # never let one bad change end the watching
                logger.exception("handling file changes failed")

    async def _on_changes(
        self, config_changed: bool, folders: Mapping[Path, set[Path]], *, rescan: bool = False
    ) -> None:
        assert self.desired is not None
        previous = self.desired
        names = self._deployments_in(previous, folders)
        self.builder.enabled = self.builds and previous.config.model.builds
        await self._run_builds(previous, folders, rescan=rescan)
        if not config_changed and not names:
            return
        try:
            desired = await self.load(previous=previous, only=None if config_changed else names)
        except ConfigError as error:
            self._rejected(error)
            return
        await self._apply(desired)
        if self._watcher is not None:
            self._watcher.set_folders(self._folders(desired))

    def _deployments_in(self, desired: DesiredState, folders: Mapping[Path, set[Path]]) -> list[str]:
        by_folder = _by_folder(desired)
        return [name for folder in folders for name in by_folder.get(folder.absolute(), ())]

    async def _run_builds(
        self, desired: DesiredState, folders: Mapping[Path, set[Path]], *, rescan: bool = False
    ) -> None:
        """Builds for the changed sources (after a watcher rescan: for every folder whose
        sources differ from what its last build saw). Builds run a shell command from the
        manifest: only when the operator allows it (the builder is off otherwise)."""
        for folder, names, manifest in await asyncio.to_thread(_with_builds, desired):
            assert manifest.build is not None
            if rescan:
                self.builder.rescan(folder, manifest.build, names)
            elif folder in folders:
                self.builder.changed(folder, manifest.build, folders[folder], names)

    async def _build_stale(self, desired: DesiredState) -> None:
        """At start: build each capsule whose module is missing or older than its sources."""
        for folder, names, manifest in await asyncio.to_thread(_with_builds, desired):
            assert manifest.build is not None
            stale = await asyncio.to_thread(_stale_sources, folder, manifest)
            if stale:
                logger.info("capsule folder %s: its module is missing or older than its sources: building", folder)
                self.builder.changed(folder, manifest.build, stale, names)

    def _build_finished(self, names: list[str], exit_code: int, output: str) -> None:
        for name in names:
            if self.health.build_finished(name, exit_code=exit_code, output=output):
                logger.info("desired state accepted again: the build of %s succeeded", name)
                self.bus.publish("orch.reconcile.accepted", {"config": str(self.config_path)})

    # -- what the CLI and API show ---------------------------------------------------------
    def info(self) -> dict[str, Any]:
        desired = self.desired
        return {
            "config_path": str(self.config_path),
            "config_sha256": desired.config.text_sha256 if desired else None,
            "git_revision": self._revision_now(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "ready": self.ready,
            "desired": self.health.to_dict(),
            "state_dir": str(desired.config.state_dir) if desired else None,
            "git": self.follow.to_dict() if self.follow is not None else None,
            "approvals": self.approvals.info() if self.approvals else None,
        }

    def _history_revision(self) -> str | None:
        """The revision a history entry records: following git, the commit of the revision
        being applied (short); else the config's repository as last described."""
        if self.follow is None:
            return self.revision.last
        commit = self.follow.revision_of(self.desired) if self.desired is not None else None
        return commit[:12] if commit else None

    def _revision_now(self) -> str | None:
        """The revision shown: following git, the applied commit (short); else the config's
        repository's HEAD, re-read cheaply (a commit shows without a reconcile) and described
        again (`-dirty`) on a worker thread when it moved."""
        if self.follow is not None:
            applied = self.follow.applied_revision
            return applied[:12] if applied else None
        shown = self.revision.peek()
        if self.revision.stale and (self._describing is None or self._describing.done()):
            with contextlib.suppress(RuntimeError):  # (no running loop: the next call does it)
                self._describing = asyncio.ensure_future(asyncio.to_thread(self.revision.describe))
        return shown


def _by_folder(desired: DesiredState) -> dict[Path, list[str]]:
    """Deployment names by capsule folder (absolute)."""
    mapping: dict[Path, list[str]] = {}
    for name in desired.config.model.capsules:
        mapping.setdefault(desired.config.folder(name).absolute(), []).append(name)
    return mapping


def _why_broken(problems: list[Problem]) -> str:
    """One line for a capsule's status: its files' problems."""
    shown = "; ".join(str(p) for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"its files cannot be used, so the last good version (if any) keeps running: {shown}{more}"


def _with_builds(desired: DesiredState) -> list[tuple[Path, list[str], Manifest]]:
    """Each capsule folder with a `[build]` that watches sources: (folder, its deployments,
    its manifest). A deployment whose files are broken is looked at too (reads files: call
    it on a worker thread)."""
    found = []
    for folder, names in _by_folder(desired).items():
        manifest = next((m for n in names if (m := desired.manifest(n)) is not None), None)
        if manifest is None:  # broken (say, its module does not exist yet): the manifest may be fine
            manifest = _manifest_or_none(folder)
        if manifest is not None and manifest.build is not None and manifest.build.watch:
            found.append((folder, names, manifest))
    return found


def _manifest_or_none(folder: Path) -> Manifest | None:
    try:
        return load_manifest(folder)
    except ManifestError:
        return None


def _stale_sources(folder: Path, manifest: Manifest) -> list[Path]:
    """The build's sources when its module is missing or older than the newest of them."""
    assert manifest.build is not None
    found = build_sources(folder, manifest.build)
    if not found:
        return []
    try:
        built: int | None = (folder / manifest.component.file).stat().st_mtime_ns
    except OSError:
        built = None
    newest = max(p.stat().st_mtime_ns for p in found)
    return found if built is None or newest > built else []
