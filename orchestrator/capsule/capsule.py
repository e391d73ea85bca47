"""Capsule: one running version of a capsule, built from a spec and wired to the host.

`Capsule.launch(spec, ...)` builds the running version from what the desired-state loader
read (`spec.source`: the manifest and the wasm bytes, hashed once): it builds the capability
gates, binds the airlocks (orchestrator.capsule.airlocks) to the engine as
`extism:host/user` functions, and loads the plugin through the engine's module cache
(compiling off the event loop, never hashing again). A declared tool without an export (and
no `astrid_tool_call` fallback) or an interceptor without its action export fails the load,
naming it. A module that fails to load while its file has changed since it was read was
caught mid-write: that is `StaleSpec`, and the next change event retries.

Calling a tool validates the arguments against the tool's `input_schema` first (a bad input
is a `ToolInputError` naming the field; the guest never runs), runs the export on one of
the capsule's worker threads (`instances` of them, so N calls use N cores), then commits
the call's KV writes before returning: an acknowledged result means durable writes. KV
isolation is serializable and optimistic (see orchestrator.capsule.store): when a key an
attempt read changed before its writes were staged, the attempt is dropped and the call
runs again, up to OPTIMISTIC_ATTEMPTS beside the capsule's other calls, then alone (no other
attempt of this capsule beside it), MAX_ATTEMPTS in all. A call's bus events wait in its
outbox and are published, in order, only once its writes are committed: a failed or
conflicted attempt publishes nothing. `fuel_used` is the sum over the call's attempts.

Used by the launcher (the reconciler's) and the CLI (`orch capsule call`, through `load`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..desired.load import load_folder
from ..desired.manifest import Manifest, Tool, mask_config
from ..desired.spec import CapsuleSpec
from ..engine import Plugin, WasmEngine
from ..errors import (
    CapsuleError,
    InvalidModule,
    ManifestError,
    OrchestratorError,
    Problem,
    StaleSpec,
    ToolInputError,
    UnknownTool,
)
from ..limits import Limits
from .airlocks import CallState, HostContext
from .binding import bind_airlocks
from .bus import EventBus
from .gate import PathGate, RateLimiter, TopicGate
from .interceptors import InterceptorRunner
from .kv import CallGate, CallKV, CapsuleKV
from .kvbackend import CommitConflict, KVBackend
from .protected import ProtectedSource
from .store import CONFLICT, KVConflict

logger = logging.getLogger(__name__)

TOOL_FALLBACK = "astrid_tool_call"


VALIDATION_SECONDS = 5.0  # a backstop: the validator's step budget ends any validation sooner
OPTIMISTIC_ATTEMPTS = 3  # attempts side by side with the capsule's other calls; then solo
MAX_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What one call of a capsule came to, for whoever keeps its status (the reconciler)."""

    label: str  # the tool, or "interceptor ACTION"
    fuel: int
    error: str | None  # one line; None when the call succeeded
    attempts: int


Observer = Callable[[CallOutcome], None]


@dataclass(frozen=True)
class ToolResult:
    output: bytes
    fuel_used: int  # summed over the call's attempts
    seconds: float
    attempts: int = 1  # more than 1 when a KV conflict made the call run again


class Capsule:
    """A running capsule version. Create with `await Capsule.launch(...)`; `await close()`."""

    def __init__(
        self,
        *,
        spec: CapsuleSpec,
        manifest: Manifest,
        plugin: Plugin,
        host: HostContext,
        bus: EventBus,
        store: KVBackend | None,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.folder = Path(spec.folder)
        self.manifest = manifest
        self.config = dict(spec.config)
        self.plugin = plugin
        self.host = host
        self.wasm_sha256 = spec.wasm_sha256
        self._bus = bus
        self._store = store
        self._executor = executor
        self._schemas = {tool.name: tool.input for tool in manifest.tools}  # compiled once per schema
        self._interceptors = InterceptorRunner(
            name=self.name, interceptors=manifest.interceptors, bus=bus, run=self._run_interceptor
        )
        self.calls = 0
        self.errors = 0
        self.fuel_total = 0
        self.fuel_last = 0
        self.conflicts = 0  # attempts run again because their KV reads changed
        self._observer: Observer | None = None
        self._gate = CallGate()

    # -- launching -----------------------------------------------------------------------
    @classmethod
    async def launch(
        cls,
        spec: CapsuleSpec,
        *,
        engine: WasmEngine,
        bus: EventBus,
        store: KVBackend | None,
        workspace: Path,
        rate: RateLimiter | None = None,
        interceptors: bool = True,
        protected: ProtectedSource | None = None,
    ) -> Capsule:
        """The running version of `spec`. Raises ManifestError or InvalidModule, or StaleSpec
        when the module failed to load and its file changed since the loader read it.

        `interceptors=False` leaves interceptors off until `start_interceptors()` (the
        reconciler starts them when it swaps versions, so no event is handled twice).
        `protected`: what the file airlocks never reach (the orchestrator's own files).
        """
        source = spec.source
        if source is None:
            raise OrchestratorError(f"capsule {spec.name!r}: the spec carries no module to run (read from a record)")
        manifest = source.manifest
        caps = manifest.capabilities
        host = HostContext(
            capsule=spec.name,
            config=spec.config,
            paths=PathGate(workspace=Path(workspace), read=caps.fs_read, write=caps.fs_write, protected=protected),
            publish=TopicGate(caps.ipc_publish),
            rate=rate or RateLimiter(),
            bus=bus,
            kv=CapsuleKV(store, spec.name) if caps.kv and store is not None else None,
            log=logging.getLogger(f"orchestrator.capsule.{spec.name}"),
        )
        try:
            plugin = await engine.load_async(
                source.wasm,
                digest=spec.wasm_sha256,
                name=spec.name,
                config=spec.config,
                limits=Limits(**spec.limits),
                wasi=True,
                host_functions=bind_airlocks(),
                instances=spec.instances,
            )
        except InvalidModule as error:
            if source.wasm_changed():  # caught mid-write: the next change event retries
                raise StaleSpec(f"{source.wasm_path} changed while loading") from error
            raise
        try:
            check_exports(manifest, plugin, str(Path(spec.folder) / "Capsule.toml"))
        except ManifestError:
            plugin.close()
            raise
        executor = ThreadPoolExecutor(max_workers=spec.instances, thread_name_prefix=f"capsule-{spec.name}")
        capsule = cls(
            spec=spec,
            manifest=manifest,
            plugin=plugin,
            host=host,
            bus=bus,
            store=store if caps.kv else None,
            executor=executor,
        )
        if interceptors:
            capsule.start_interceptors()
        return capsule

    @classmethod
    async def load(
        cls,
        folder: Path,
        *,
        engine: WasmEngine,
        bus: EventBus,
        store: KVBackend | None,
        workspace: Path,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        limits: Mapping[str, Any] | None = None,
        instances: int = 1,
        rate: RateLimiter | None = None,
        interceptors: bool = True,
        protected: ProtectedSource | None = None,
    ) -> Capsule:
        """Read one capsule folder outside any config.yaml and launch it (`orch capsule
        call`): the manifest's defaults overlaid with `config` and `limits`."""
        spec = await asyncio.to_thread(
            load_folder, Path(folder), name=name, config=config, limits=limits, instances=instances
        )
        return await cls.launch(
            spec,
            engine=engine,
            bus=bus,
            store=store,
            workspace=workspace,
            rate=rate,
            interceptors=interceptors,
            protected=protected,
        )

    # -- tools ---------------------------------------------------------------------------
    @property
    def tools(self) -> list[Tool]:
        return list(self.manifest.tools)

    def validate(self, tool: str, arguments: Any) -> Tool:
        """The tool, once `arguments` fit its schema. Raises UnknownTool or ToolInputError.

        Blocking but bounded: the validator runs in time linear in the input (RE2 patterns,
        O(n log n) uniqueItems) and under a step budget (orchestrator.desired.schema)."""
        declared = self.manifest.tool(tool)
        if declared is None:
            names = ", ".join(t.name for t in self.manifest.tools) or "none"
            raise UnknownTool(f"capsule {self.name!r} has no tool {tool!r} (tools: {names})")
        self._schemas[tool].validate(arguments, capsule=self.name, tool=tool)
        return declared

    async def call_tool(self, tool: str, arguments: Any = None) -> ToolResult:
        """Validate (off the event loop, within VALIDATION_SECONDS), run, commit, return.
        `arguments` is the parsed JSON (None means {})."""
        arguments = {} if arguments is None else arguments
        try:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.validate, tool, arguments), VALIDATION_SECONDS)
            except TimeoutError:
                raise ToolInputError(
                    f"invalid input for {self.name}.{tool}: checking it against the tool's input schema took "
                    f"over {VALIDATION_SECONDS:g} s; send a smaller input",
                    tool=tool,
                ) from None
        except OrchestratorError as error:  # refused before the guest ran: a failed call for the status
            self._report(tool, 0, error, 0)
            raise
        data = json.dumps(arguments, ensure_ascii=False, separators=(",", ":")).encode()
        if self.plugin.has_function(tool):  # a dict lookup: launch asked about every tool
            export = tool
        else:
            export = TOOL_FALLBACK
            data = json.dumps({"name": tool, "arguments": arguments}, ensure_ascii=False).encode()
        return await self._run(export, data, label=tool)

    def observe(self, observer: Observer | None) -> None:
        """Tell `observer` the outcome of every call from now on: tools and interceptors."""
        self._observer = observer

    def counters(self) -> dict[str, int]:
        """What this version counted that its status shows: KV conflicts (attempts run
        again) and events its interceptors lost."""
        return {"conflicts": self.conflicts, "events_lost": self._interceptors.lost}

    async def _run(self, export: str, data: bytes, *, label: str) -> ToolResult:
        """Run `export` until an attempt's KV reads validate, commit its writes, then publish
        its events. Fuel: the sum over the call's attempts (each attempt has the full budget)."""
        started = time.perf_counter()
        self.calls += 1
        fuel = 0
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                output, used, staged, outbox = await self._attempt(export, data, solo=attempt > OPTIMISTIC_ATTEMPTS)
                fuel += used
                if staged is CONFLICT:
                    self.conflicts += 1
                    continue
                if staged is not None:
                    try:
                        await self._commit(staged)  # its events are published by the commit
                    except CommitConflict:  # the store checked the reads at commit: nothing written
                        self.conflicts += 1
                        continue
                elif outbox:
                    self._publish(outbox)
                break
            else:
                raise KVConflict(
                    f"capsule {self.name!r}: {export} was not applied: the KV keys it read changed under it "
                    f"{MAX_ATTEMPTS} times, {MAX_ATTEMPTS - OPTIMISTIC_ATTEMPTS} of them while it ran alone "
                    "(something outside the capsule writes them constantly); try again"
                )
        except CapsuleError as error:
            self.errors += 1
            error.fuel_used += fuel  # the attempts before the one that failed
            self._report(label, error.fuel_used, error, attempt)
            raise
        except OrchestratorError as error:
            self.errors += 1
            self._report(label, fuel, error, attempt)
            raise
        self.fuel_total += fuel
        self.fuel_last = fuel
        self._report(label, fuel, None, attempt)
        return ToolResult(output, fuel, time.perf_counter() - started, attempt)

    def _report(self, label: str, fuel: int, error: BaseException | None, attempts: int) -> None:
        if self._observer is not None:
            self._observer(CallOutcome(label, fuel, None if error is None else _one_line(error), attempts))

    async def _attempt(
        self, export: str, data: bytes, *, solo: bool
    ) -> tuple[bytes, int, Any, list[tuple[str, Any, int]]]:
        """One run on a worker thread, its KV validated and staged there: (output, fuel,
        staged: CONFLICT, a ticket or None, outbox)."""
        gate = self._gate
        if solo:
            await gate.enter_solo()
        else:
            await gate.enter_shared()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._attempt_here, export, data)
        finally:
            if solo:
                gate.leave_solo()
            else:
                gate.leave_shared()

    def _attempt_here(self, export: str, data: bytes) -> tuple[bytes, int, Any, list[tuple[str, Any, int]]]:
        kv = CallKV(self._store, self.name) if self._store is not None else None
        outbox: list[tuple[str, Any, int]] = []
        state = CallState(self.host, function=export, kv=kv, outbox=outbox)
        output, fuel = self.plugin.call_metered(export, data, context=state)
        # Validate and stage on the worker thread, before it takes the next call: a call
        # queued on this instance then reads these writes instead of conflicting with them.
        staged = kv.finish(partial(self._publish, outbox) if outbox else None) if kv is not None else None
        return output, fuel, staged, outbox

    async def _commit(self, ticket: Any) -> None:
        assert self._store is not None
        await self._store.commit(ticket)

    def _publish(self, outbox: list[tuple[str, Any, int]]) -> None:
        for topic, payload, size in outbox:
            self.host.bus.publish(topic, payload, source=self.name, size=size)

    async def _run_interceptor(self, action: str, event: bytes) -> ToolResult:
        return await self._run(action, event, label=f"interceptor {action}")

    # -- interceptors --------------------------------------------------------------------
    def start_interceptors(self, after_seq: int | None = None) -> None:
        """Start delivering bus events to the interceptors (see InterceptorRunner.start)."""
        self._interceptors.start(after_seq)

    async def stop_interceptors(self) -> int:
        """Stop delivering (after the event being handled); return the last event handled."""
        return await self._interceptors.stop()

    async def caught_up(self, seq: int) -> None:
        """Return once the interceptors have handled every event up to bus sequence `seq`."""
        await self._interceptors.caught_up(seq)

    # -- lifecycle -----------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What the capsule is and may touch (secrets masked)."""
        m = self.manifest
        return {
            "name": self.name,
            "package": m.package.model_dump(),
            "wasm_sha256": self.wasm_sha256,
            "tools": [t.model_dump() for t in m.tools],
            "interceptors": [i.model_dump() for i in m.interceptors],
            "capabilities": m.capabilities.model_dump(),
            "config": mask_config(m, self.config),
            "limits": self.plugin.limits.as_dict(),
        }

    async def close(self) -> None:
        """Stop interceptors, let calls in flight finish, release the instances."""
        await self.stop_interceptors()
        self.plugin.close()
        self._executor.shutdown(wait=False)


def check_exports(manifest: Manifest, plugin: Plugin, manifest_file: str) -> None:
    """Every tool has an export (or the astrid_tool_call fallback); every action has one.
    Answered by name (`Plugin.has_function`): no walk of the module's exports unless a
    problem must list them."""
    problems = []
    fallback = plugin.has_function(TOOL_FALLBACK)
    for tool in manifest.tools:
        if not plugin.has_function(tool.name) and not fallback:
            exports = plugin.exports
            problems.append(
                Problem(
                    f"tool {tool.name!r} has no export of that name and the module has no "
                    f"{TOOL_FALLBACK} export (exports: {', '.join(exports) or 'none'})",
                    file=manifest_file,
                    field="tool",
                )
            )
    for interceptor in manifest.interceptors:
        if not plugin.has_function(interceptor.action):
            problems.append(
                Problem(
                    f"interceptor action {interceptor.action!r} is not an export of the module",
                    file=manifest_file,
                    field="interceptor",
                )
            )
    if problems:
        raise ManifestError(problems)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
