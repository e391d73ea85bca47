"""A host's share of the lattice: what it runs now, as runnable specs; and its launcher.

`Share.step(desired, assignments, running, draining=)` says what the reconciler applies
next on this host (`Step`):

- `specs`: the deployments assigned to this host and enabled in the desired revision,
  each as the version the lattice runs for it (`Deployment.runs()`: its desired version;
  or the version held while a change awaits approval or was rejected; or a rollback's
  pin), rebuilt from its artifacts (fetched once per sha256, checked against its spec
  hash: orchestrator.lattice.desiredstate.rebuild_spec) and wired (enabled, hosts, labels,
  depends_on) as the desired version says; plus the deployments moved away that still
  serve here, with the spec they run (no reload on the way out). A deployment that is
  paused (a rollback restoring its data) or has no version to run (a start that waits
  for approval) is not wanted anywhere: it stops at once, its calls in flight finishing
  first, so no call of it runs while it is paused;
- `broken`: wanted deployments whose artifacts cannot be used (name -> why): the
  reconciler keeps their last good version serving, or shows them Failed;
- `stop`: what runs here and is in neither, which stops taking calls before it stops.

A deployment moved away (assignments changed, or this host drains) keeps serving here
until one of its new hosts reports it serving (the status bucket), or until
`handover_seconds` (`drain_seconds` while draining) have passed; one removed from the
desired state or disabled, or that the scheduler could place on no host at all, stops at
once. So a move or a drain drops no call while another host can take it.

`HostLauncher` is the reconciler's launcher on a host: each capsule is given its
deployment's bus (orchestrator.lattice.wiring). Used by the host runtime.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..capsule.capsule import Capsule
from ..capsule.kvbackend import KVBackend
from ..capsule.launcher import publish_limiter
from ..capsule.protected import ProtectedPaths
from ..desired.load import MAX_WASM_BYTES
from ..desired.manifest import MAX_MANIFEST_BYTES
from ..desired.spec import CapsuleSpec
from ..engine import WasmEngine
from ..errors import ManifestError
from .artifacts import LatticeDataError, fetch
from .connection import Lattice
from .desiredstate import Deployment, DesiredDoc, Version, rebuild_spec
from .scheduler import Assignments
from .status import SERVING, read_reports
from .wiring import Buses

logger = logging.getLogger(__name__)


class HostLauncher:
    """Launches a spec as a running Capsule on this host, on its deployment's bus."""

    def __init__(
        self, *, engine: WasmEngine, store: KVBackend, buses: Buses, workspace: Path, protected: ProtectedPaths
    ) -> None:
        self._engine, self._store, self._buses = engine, store, buses
        self._workspace, self._protected = workspace, protected

    async def launch(self, spec: CapsuleSpec) -> Capsule:
        return await Capsule.launch(
            spec,
            engine=self._engine,
            bus=self._buses.for_deployment(spec.name),
            store=self._store,
            workspace=self._workspace,
            rate=publish_limiter(spec),
            interceptors=False,
            protected=self._protected,
        )


@dataclass(frozen=True)
class Step:
    """What the reconciler applies next on this host."""

    specs: dict[str, CapsuleSpec]
    broken: dict[str, str]
    stop: set[str]


class Share:
    """This host's share, with the artifacts and rebuilt specs it keeps between steps."""

    def __init__(
        self,
        *,
        lattice: Lattice,
        host_id: str,
        handover_seconds: float,
        drain_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lattice = lattice
        self.host_id = host_id
        self.handover_seconds = handover_seconds
        self.drain_seconds = drain_seconds
        self.leaving: dict[str, float] = {}  # moved away, still serving here since (clock)
        self._clock = clock
        self._specs: dict[str, tuple[CapsuleSpec, CapsuleSpec, CapsuleSpec]] = {}  # name -> (version, wiring, runnable)
        self._blobs: dict[str, bytes] = {}

    async def step(
        self,
        desired: DesiredDoc,
        assignments: Assignments | None,
        running: Mapping[str, CapsuleSpec],
        *,
        draining: bool,
    ) -> Step:
        enabled = {n for n, d in desired.deployments.items() if runnable(d)}
        assigned = assignments.mine(self.host_id) if assignments else set()
        wanted = set() if draining else assigned & enabled
        now = self._clock()
        for name in set(running) - wanted:
            self.leaving.setdefault(name, now)
        for name in list(self.leaving):
            if name in wanted or name not in running:
                del self.leaving[name]
        handed = await self._handed_over(enabled, assignments, now, draining=draining)
        specs: dict[str, CapsuleSpec] = {}
        broken: dict[str, str] = {}
        for name in wanted:
            deployment = desired.deployments[name]
            version = deployment.runs()
            assert version is not None  # runnable
            try:
                specs[name] = await self._spec(version, deployment.spec)
            except (LatticeDataError, ManifestError) as error:
                broken[name] = str(error)
        for name in set(self.leaving) - handed:
            specs[name] = running[name]  # what serves here keeps serving until it serves elsewhere
        self._prune(desired, specs)
        return Step(specs, broken, set(running) - set(specs) - set(broken))

    async def _handed_over(
        self, enabled: set[str], assignments: Assignments | None, now: float, *, draining: bool
    ) -> set[str]:
        """The leaving deployments that may stop here now: removed or disabled, serving on
        one of their new hosts, or leaving for longer than the handover (drain) allows."""
        if not self.leaving:
            return set()
        limit = self.drain_seconds if draining else self.handover_seconds
        done = {n for n, since in self.leaving.items() if n not in enabled or now - since >= limit}
        waiting = set(self.leaving) - done
        if waiting:
            placed = assignments.deployments if assignments else {}
            reports = await read_reports(self.lattice)
            for name in waiting:
                if name in placed and not placed[name]:  # the scheduler found no host for it: nothing to wait for
                    done.add(name)
                for host in placed.get(name, ()):
                    rows = reports.get(host, {}).get("capsules", []) if host != self.host_id else []
                    if any(r.get("name") == name and r.get("phase") in SERVING for r in rows):
                        done.add(name)
        return done

    async def _spec(self, version: Version, desired: CapsuleSpec) -> CapsuleSpec:
        """`version`, runnable, wired as the `desired` spec says (not part of the hash)."""
        name = desired.name
        cached = self._specs.get(name)
        if (
            cached is not None
            and cached[0] == version.spec
            and cached[0].spec_hash == version.spec.spec_hash
            and _wiring(cached[1]) == _wiring(desired)
        ):
            return cached[2]
        wasm = await self._blob(version.wasm, limit=MAX_WASM_BYTES, what=f"capsule {name}: module")
        manifest = await self._blob(version.manifest, limit=MAX_MANIFEST_BYTES, what=f"capsule {name}: manifest")
        spec = rebuild_spec(version, wasm=wasm, manifest=manifest)
        if _wiring(spec) != _wiring(desired):
            spec = dataclasses.replace(
                spec, enabled=desired.enabled, hosts=desired.hosts, labels=desired.labels, depends_on=desired.depends_on
            )
        self._specs[name] = (version.spec, desired, spec)
        return spec

    async def _blob(self, name: str, *, limit: int, what: str) -> bytes:
        found = self._blobs.get(name)
        if found is None:
            found = self._blobs[name] = await fetch(self.lattice, name, limit=limit, what=what)
        return found

    def _prune(self, desired: DesiredDoc, specs: Mapping[str, CapsuleSpec]) -> None:
        """Forget the artifacts and specs nothing wants any more."""
        versions = [v for d in desired.deployments.values() for v in (d, d.runs()) if v is not None]
        keep = {v.wasm for v in versions} | {v.manifest for v in versions}
        keep |= {s.wasm_sha256 for s in specs.values()}
        for sha in set(self._blobs) - keep:
            del self._blobs[sha]
        for name in set(self._specs) - set(desired.deployments) - set(specs):
            del self._specs[name]


def runnable(deployment: Deployment) -> bool:
    """Whether hosts run the deployment: enabled, not paused, and with a version to run."""
    return deployment.spec.enabled and not deployment.paused and deployment.runs() is not None


def _wiring(spec: CapsuleSpec) -> tuple[object, ...]:
    return (spec.enabled, spec.hosts, dict(spec.labels), tuple(spec.depends_on))
