"""The running orchestrator: wires config, store, bus, engine, reconciler, watcher and builds.

`Orchestrator.start()` loads the desired state, opens the KV store and the engine (its module
cache in the state dir), applies the first plan and starts watching. A change to the config
file re-reads everything; a change in a capsule folder re-reads that capsule alone (and runs
its `[build]` when a source changed). An invalid config or manifest changes nothing that
runs: the last good desired state stays and the problems are published as
`orch.reconcile.rejected`. After every apply the state dir's `applied.json` records what
runs (without secret values), for `orch plan`.

`stop()` shuts down in phases with a deadline: stop watching and building, stop capsules
(dependents first; calls in flight get a bounded wait), close the store, the engine and
the bus.

Used by the CLI (`orch up`) and, later, the control API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .builds import Builder
from .bus import EventBus
from .capsule import Capsule
from .desired import DesiredState, load_desired
from .engine import WasmEngine
from .errors import ConfigError, InvalidModule, ManifestError, StaleSpec
from .gate import RateLimiter
from .plan import Plan
from .reconciler import Reconciler
from .spec import CapsuleSpec
from .store import KVStore
from .watcher import Watcher

logger = logging.getLogger(__name__)

APPLIED = "applied.json"


class CapsuleLauncher:
    """Loads a spec as a running Capsule (the reconciler's Launcher)."""

    def __init__(self, *, engine: WasmEngine, bus: EventBus, store: KVStore, workspace: Path) -> None:
        self._engine = engine
        self._bus = bus
        self._store = store
        self._workspace = workspace

    async def launch(self, spec: CapsuleSpec) -> Capsule:
        folder = Path(spec.folder)
        try:
            return await Capsule.load(
                folder,
                engine=self._engine,
                bus=self._bus,
                store=self._store,
                workspace=self._workspace,
                name=spec.name,
                config=spec.config,
                limits=spec.limits,
                instances=spec.instances,
                rate=publish_limiter(spec),
                expect_sha256=spec.wasm_sha256,
                interceptors=False,
            )
        except (InvalidModule, ManifestError) as error:
            if _changed_since(spec):  # caught mid-write: the next change event retries
                raise StaleSpec(f"{folder} changed while loading") from error
            raise


def publish_limiter(spec: CapsuleSpec) -> RateLimiter:
    """The capsule's publish rate limiter: the spec's rates over the built-in ones."""
    rates = spec.publish_rate
    defaults = RateLimiter()
    return RateLimiter(
        messages_per_second=rates.get("messages_per_second", defaults.messages_per_second),
        bytes_per_second=rates.get("bytes_per_second", defaults.bytes_per_second),
    )


def _changed_since(spec: CapsuleSpec) -> bool:
    import hashlib

    component = spec.manifest.get("component", [{}])[0].get("file", "")
    try:
        digest = hashlib.sha256((Path(spec.folder) / component).read_bytes()).hexdigest()
    except OSError:
        return True
    return digest != spec.wasm_sha256


class Orchestrator:
    """One orchestrator process's state. `await start()`, then `await stop()`."""

    def __init__(
        self, config_path: Path | str, *, watch: bool = True, environ: Mapping[str, str] | None = None
    ) -> None:
        self.config_path = Path(config_path).absolute()
        self.watch = watch
        self.environ = environ
        self.bus = EventBus(history=10_000)
        self.desired: DesiredState | None = None
        self.store: KVStore | None = None
        self.engine: WasmEngine | None = None
        self.reconciler: Reconciler | None = None
        self.builder = Builder(bus=self.bus)
        self.started_at = time.time()
        self.last_plan: Plan | None = None
        self._watcher: Watcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._changes = asyncio.Lock()
        self._git: str | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> Plan:
        """Load, apply, watch. Raises ConfigError (nothing started) when the config is bad."""
        desired = load_desired(self.config_path, environ=self.environ)
        state_dir = desired.config.state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = await KVStore.open(state_dir / "kv.sqlite3")
        self.engine = WasmEngine(cache_dir=state_dir / "cache")
        launcher = CapsuleLauncher(
            engine=self.engine, bus=self.bus, store=self.store, workspace=desired.config.workspace
        )
        self.reconciler = Reconciler(launcher=launcher, bus=self.bus)
        plan = await self._apply(desired)
        if self.watch:
            self._watcher = Watcher(config_path=self.config_path)
            await self._watcher.start(self._folders(desired))
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_loop(), name="watch")
            plan = await self._catch_up(plan)
        return plan

    async def _catch_up(self, plan: Plan) -> Plan:
        """Apply what changed between the first read and the watches being in place."""
        try:
            desired = load_desired(self.config_path, environ=self.environ)
        except ConfigError:
            return plan  # the watcher reports it when it is saved again
        assert self.desired is not None and self.reconciler is not None
        if {n: s.spec_hash for n, s in desired.specs.items()} == {
            n: s.spec_hash for n, s in self.desired.specs.items()
        }:
            return plan
        async with self._changes:
            return await self._apply(desired)

    async def stop(self, timeout: float = 10.0) -> None:
        """Phased shutdown: watching and builds, capsules (bounded), store, engine, bus."""
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
        self.bus.close()

    # -- applying ------------------------------------------------------------------------
    async def _apply(self, desired: DesiredState) -> Plan:
        assert self.reconciler is not None
        plan = await self.reconciler.apply(desired.specs)
        self.desired = desired
        self.last_plan = plan
        record = self._applied_record(desired)
        await asyncio.get_running_loop().run_in_executor(None, _write_applied, desired.config.state_dir, record)
        return plan

    async def reconcile(self) -> Plan:
        """Re-read every file now and apply (the control API's `POST /v1/reconcile`)."""
        async with self._changes:
            desired = load_desired(self.config_path, environ=self.environ)
            return await self._apply(desired)

    def _applied_record(self, desired: DesiredState) -> dict[str, Any]:
        assert self.reconciler is not None
        self._git = git_revision(self.config_path.parent)
        return {
            "config_path": str(self.config_path),
            "config_sha256": desired.config.text_sha256,
            "git_revision": self._git,
            "applied_at_ms": int(time.time() * 1000),
            "capsules": {name: spec.record() for name, spec in self.reconciler.actual().items()},
        }

    # -- watching ------------------------------------------------------------------------
    def _folders(self, desired: DesiredState) -> list[Path]:
        return [desired.config.folder(name) for name in desired.config.model.capsules]

    async def _watch_loop(self) -> None:
        assert self._watcher is not None
        async for changes in self._watcher.changes():
            try:
                async with self._changes:
                    await self._on_changes(changes.config, changes.folders)
            except Exception:  # never let one bad change end the watching
                logger.exception("handling file changes failed")

    async def _on_changes(self, config_changed: bool, folders: Mapping[Path, set[Path]]) -> None:
        assert self.desired is not None
        previous = self.desired
        names = self._deployments_in(previous, folders)
        self._run_builds(previous, folders)
        try:
            if config_changed:
                desired = load_desired(self.config_path, environ=self.environ)
            elif names:
                desired = load_desired(self.config_path, environ=self.environ, previous=previous, only=names)
            else:
                return
        except ConfigError as error:
            problems = [str(p) for p in error.problems]
            logger.warning("not applied; the last good state keeps running:\n  %s", "\n  ".join(problems))
            self.bus.publish("orch.reconcile.rejected", {"problems": problems, "config": str(self.config_path)})
            return
        await self._apply(desired)
        if self._watcher is not None:
            self._watcher.set_folders(self._folders(desired))

    def _deployments_in(self, desired: DesiredState, folders: Mapping[Path, set[Path]]) -> list[str]:
        by_folder = _by_folder(desired)
        return [name for folder in folders for name in by_folder.get(folder.absolute(), ())]

    def _run_builds(self, desired: DesiredState, folders: Mapping[Path, set[Path]]) -> None:
        by_folder = _by_folder(desired)
        for folder, paths in folders.items():
            names = [n for n in by_folder.get(folder.absolute(), ()) if n in desired.manifests]
            build = desired.manifests[names[0]].build if names else None
            if build is not None and build.watch:
                self.builder.changed(folder, build, paths, names)

    # -- what the CLI and API show ---------------------------------------------------------
    def info(self) -> dict[str, Any]:
        desired = self.desired
        return {
            "config_path": str(self.config_path),
            "config_sha256": desired.config.text_sha256 if desired else None,
            "git_revision": self._git,
            "uptime_s": round(time.time() - self.started_at, 3),
            "state_dir": str(desired.config.state_dir) if desired else None,
        }


_folders_cache: dict[int, tuple[DesiredState, dict[Path, list[str]]]] = {}


def _by_folder(desired: DesiredState) -> dict[Path, list[str]]:
    """Deployment names by capsule folder (absolute), computed once per desired state."""
    cached = _folders_cache.get(id(desired))
    if cached is not None and cached[0] is desired:
        return cached[1]
    mapping: dict[Path, list[str]] = {}
    for name in desired.config.model.capsules:
        mapping.setdefault(desired.config.folder(name).absolute(), []).append(name)
    _folders_cache.clear()
    _folders_cache[id(desired)] = (desired, mapping)
    return mapping


def _hashes(desired: DesiredState) -> dict[str, str]:
    return {name: spec.spec_hash for name, spec in desired.specs.items()}


def _write_applied(state_dir: Path, record: dict[str, Any]) -> None:
    """Write applied.json atomically (on a worker thread: it can be a megabyte)."""
    path = state_dir / APPLIED
    try:
        tmp = path.with_name(f".{APPLIED}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, separators=(",", ":"), sort_keys=True))
        os.replace(tmp, path)
    except OSError as error:
        logger.warning("could not record the applied state in %s: %s", path, error)


def read_applied(state_dir: Path) -> dict[str, CapsuleSpec]:
    """The specs recorded by the last apply (empty when there is none)."""
    try:
        record = json.loads((state_dir / APPLIED).read_text())
        return {name: CapsuleSpec.from_record(r) for name, r in record.get("capsules", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring unreadable %s: %s", state_dir / APPLIED, error)
        return {}


def git_revision(folder: Path) -> str | None:
    """The commit the config's repository is at (with "-dirty" if it has changes), if any."""
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
