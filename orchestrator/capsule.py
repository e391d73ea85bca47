"""Capsule: one running capsule, a loaded folder (manifest + wasm) wired to the host.

Loading reads `Capsule.toml`, checks the wasm's hash pin, resolves the configuration against
`[env]`, builds the capability gates and binds the airlocks (orchestrator.host) to the
engine as `extism:host/user` functions, then loads the plugin through the engine and its
module cache (compiling off the event loop). A declared tool without an export (and no
`astrid_tool_call` fallback) or an interceptor without its action export fails the load,
naming it.

Calling a tool validates the arguments against the tool's `input_schema` first (a bad input
is a `ToolInputError` naming the field; the guest never runs), runs the export on one of
the capsule's worker threads (`instances` of them, so N calls use N cores), then commits
the call's KV writes before returning: an acknowledged result means durable writes.

Interceptors: a task takes the capsule's bus subscription and, for each event, calls every
matching interceptor's action in priority order (lower first) with the event as JSON.

Used by the CLI (`orch capsule ...`) and, later, the reconciler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from .bus import Event, EventBus, Subscription
from .engine import HostCall, HostFunction, Limits, Plugin, WasmEngine
from .errors import (
    CapsuleError,
    CapsuleTrap,
    ManifestError,
    OrchestratorError,
    Problem,
    StaleSpec,
    ToolInputError,
    UnknownTool,
)
from .gate import PathGate, RateLimiter, TopicGate, topic_matches
from .host import HOST_FUNCTIONS, Airlock, CallState, HostContext, err
from .manifest import Interceptor, Manifest, Tool, load_manifest, mask_config, resolve_config
from .store import KVStore

logger = logging.getLogger(__name__)

TOOL_FALLBACK = "astrid_tool_call"
NAMESPACE = "extism:host/user"


@dataclass(frozen=True)
class ToolResult:
    output: bytes
    fuel_used: int
    seconds: float


class CallKV:
    """One call's view of its capsule's KV: its writes wait in a buffer, readable by the
    call itself, and reach the store only if the call succeeds (`stage`, then a commit); a
    failed call's writes are dropped, so a client may retry a failed call without doubling
    its effect."""

    def __init__(self, store: KVStore, capsule: str) -> None:
        self._store = store
        self._capsule = capsule
        self.writes: dict[str, bytes | None] = {}

    def get(self, key: str) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        return self._store.get_from_thread(self._capsule, key)

    def set(self, key: str, value: bytes) -> int:
        self.writes[key] = value
        return 0

    def delete(self, key: str) -> int:
        self.writes[key] = None
        return 0

    def keys(self, prefix: str) -> list[str]:
        keys = set(self._store.list_keys_from_thread(self._capsule, prefix))
        for key, value in self.writes.items():
            if key.startswith(prefix):
                if value is None:
                    keys.discard(key)
                else:
                    keys.add(key)
        return sorted(keys)

    def stage(self) -> int:
        """Hand the buffered writes to the store (visible to every reader from now on);
        returns the sequence number to commit, 0 when there were none."""
        seq = 0
        for key, value in self.writes.items():
            if value is None:
                seq = self._store.stage_delete(self._capsule, key)
            else:
                seq = self._store.stage_set(self._capsule, key, value)
        self.writes = {}
        return seq


class CapsuleKV:
    """One capsule's slice of the KVStore, for host functions on worker threads."""

    def __init__(self, store: KVStore, capsule: str) -> None:
        self._store = store
        self._capsule = capsule

    def get(self, key: str) -> bytes | None:
        return self._store.get_from_thread(self._capsule, key)

    def set(self, key: str, value: bytes) -> int:
        return self._store.stage_set(self._capsule, key, value)

    def delete(self, key: str) -> int:
        return self._store.stage_delete(self._capsule, key)

    def keys(self, prefix: str) -> list[str]:
        return self._store.list_keys_from_thread(self._capsule, prefix)


def wasm_limits(defaults: Limits, *overrides: Mapping[str, Any] | None) -> Limits:
    """`defaults` with each non-None value of each override applied in order."""
    values = {"fuel": defaults.fuel, "memory_mib": defaults.memory_mib, "timeout_ms": defaults.timeout_ms}
    for override in overrides:
        for key, value in (override or {}).items():
            if value is not None:
                values[key] = value
    return Limits(**values)


class Capsule:
    """A loaded capsule. Create with `await Capsule.load(...)`; `await close()` when done."""

    def __init__(
        self,
        *,
        name: str,
        folder: Path,
        manifest: Manifest,
        config: dict[str, str],
        plugin: Plugin,
        host: HostContext,
        bus: EventBus,
        store: KVStore | None,
        wasm_sha256: str,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.name = name
        self.folder = folder
        self.manifest = manifest
        self.config = config
        self.plugin = plugin
        self.host = host
        self.wasm_sha256 = wasm_sha256
        self._bus = bus
        self._store = store
        self._executor = executor
        self._validators = {tool.name: jsonschema.Draft202012Validator(tool.input_schema) for tool in manifest.tools}
        self._interceptors = sorted(manifest.interceptors, key=lambda i: i.priority)
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._handled_seq = 0  # the last bus event the interceptors finished with
        self._handled = asyncio.Condition()
        self.calls = 0
        self.errors = 0
        self.fuel_total = 0
        self.fuel_last = 0

    # -- loading -------------------------------------------------------------------------
    @classmethod
    async def load(
        cls,
        folder: Path,
        *,
        engine: WasmEngine,
        bus: EventBus,
        store: KVStore | None,
        workspace: Path,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        limits: Mapping[str, Any] | None = None,
        instances: int = 1,
        rate: RateLimiter | None = None,
        expect_sha256: str | None = None,
        interceptors: bool = True,
    ) -> Capsule:
        """Load the capsule in `folder`. Raises ManifestError or InvalidModule, or
        `StaleSpec` when `expect_sha256` is given and the wasm on disk is another one (it
        changed since it was planned: a newer change event follows).

        `interceptors=False` leaves interceptors off until `start_interceptors()` (the
        reconciler starts them when it swaps versions, so no event is handled twice).
        """
        folder = Path(folder)
        manifest = load_manifest(folder)
        name = name or manifest.package.name
        manifest_file = str(folder / "Capsule.toml")
        wasm, digest = read_component(folder, manifest)
        if expect_sha256 is not None and digest != expect_sha256:
            raise StaleSpec(f"{folder / manifest.component.file} changed while loading (sha256 {digest[:12]})")
        resolved = resolve_config(manifest, config or {}, source=manifest_file)
        wasm_limit = wasm_limits(Limits(), manifest.limits.model_dump(), limits)
        caps = manifest.capabilities
        host = HostContext(
            capsule=name,
            config=resolved,
            paths=PathGate(workspace=Path(workspace), read=caps.fs_read, write=caps.fs_write),
            publish=TopicGate(caps.ipc_publish),
            rate=rate or RateLimiter(),
            bus=bus,
            kv=CapsuleKV(store, name) if caps.kv and store is not None else None,
            log=logging.getLogger(f"orchestrator.capsule.{name}"),
        )
        plugin = await engine.load_async(
            wasm,
            name=name,
            config=resolved,
            limits=wasm_limit,
            wasi=True,
            host_functions=bind_airlocks(),
            instances=instances,
        )
        try:
            check_exports(manifest, plugin.exports, manifest_file)
        except ManifestError:
            plugin.close()
            raise
        executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"capsule-{name}")
        capsule = cls(
            name=name,
            folder=folder,
            manifest=manifest,
            config=resolved,
            plugin=plugin,
            host=host,
            bus=bus,
            store=store if caps.kv else None,
            wasm_sha256=digest,
            executor=executor,
        )
        if interceptors:
            capsule.start_interceptors()
        return capsule

    # -- tools ---------------------------------------------------------------------------
    @property
    def tools(self) -> list[Tool]:
        return list(self.manifest.tools)

    def validate(self, tool: str, arguments: Any) -> Tool:
        """The tool, once `arguments` fit its schema. Raises UnknownTool or ToolInputError."""
        declared = self.manifest.tool(tool)
        if declared is None:
            names = ", ".join(t.name for t in self.manifest.tools) or "none"
            raise UnknownTool(f"capsule {self.name!r} has no tool {tool!r} (tools: {names})")
        error = jsonschema.exceptions.best_match(self._validators[tool].iter_errors(arguments))
        if error is not None:
            field = "/" + "/".join(str(p) for p in error.absolute_path)
            raise ToolInputError(
                f"invalid input for {self.name}.{tool}: at {field}: {error.message}", tool=tool, field=field
            )
        return declared

    async def call_tool(self, tool: str, arguments: Any = None) -> ToolResult:
        """Validate, run, commit, return. `arguments` is the parsed JSON (None means {})."""
        arguments = {} if arguments is None else arguments
        self.validate(tool, arguments)
        data = json.dumps(arguments, ensure_ascii=False, separators=(",", ":")).encode()
        if tool in self.plugin.exports:
            export = tool
        else:
            export = TOOL_FALLBACK
            data = json.dumps({"name": tool, "arguments": arguments}, ensure_ascii=False).encode()
        return await self._run(export, data, label=tool)

    async def _run(self, export: str, data: bytes, *, label: str) -> ToolResult:
        kv = CallKV(self._store, self.name) if self._store is not None else None
        state = CallState(self.host, function=export, kv=kv)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self.calls += 1

        def run() -> tuple[bytes, int, int]:
            output, fuel = self.plugin.call_metered(export, data, context=state)
            # Stage the call's writes on its worker thread, before that thread takes the next
            # call: the next call then reads them (staged writes are visible), so calls queued
            # on one instance never lose each other's updates.
            return output, fuel, kv.stage() if kv is not None else 0

        try:
            output, fuel, seq = await loop.run_in_executor(self._executor, run)
        except CapsuleError:
            self.errors += 1  # its KV writes were never staged: dropped with `kv`
            raise
        if seq and self._store is not None:
            await self._store.commit(seq)
        self.fuel_total += fuel
        self.fuel_last = fuel
        return ToolResult(output, fuel, time.perf_counter() - started)

    # -- interceptors --------------------------------------------------------------------
    def start_interceptors(self, after_seq: int | None = None) -> None:
        """Start delivering bus events to the interceptors. With `after_seq`, begin with the
        events after that sequence number still in the bus history (a newer version picks up
        exactly where the old one stopped)."""
        if not self._interceptors or self._task is not None:
            return
        if after_seq is None:
            self._subscription = self._bus.subscribe(">")
        else:
            self._subscription = self._bus.subscribe(">", history=self._bus.last_seq - after_seq)
            self._handled_seq = after_seq
        self._task = asyncio.get_running_loop().create_task(self._deliver(), name=f"interceptors-{self.name}")

    async def stop_interceptors(self) -> int:
        """Stop delivering (after the event being handled); return the last event handled."""
        if self._subscription is not None:
            self._subscription.close()
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with self._handled:
                self._handled.notify_all()
        return self._handled_seq

    def interceptors_for(self, topic: str) -> list[Interceptor]:
        return [i for i in self._interceptors if topic_matches(i.event, topic)]

    async def caught_up(self, seq: int) -> None:
        """Return once the interceptors have handled every event up to bus sequence `seq`
        (at once when the capsule has no interceptors)."""
        if self._task is None:
            return
        async with self._handled:
            await self._handled.wait_for(lambda: self._handled_seq >= seq or self._task is None)

    async def _deliver(self) -> None:
        assert self._subscription is not None
        async for event in self._subscription:
            if event.seq <= self._handled_seq:
                continue  # handled by the previous version
            await self._intercept(event)
            async with self._handled:
                self._handled_seq = event.seq
                self._handled.notify_all()

    async def _intercept(self, event: Event) -> None:
        matching = self.interceptors_for(event.topic)
        if not matching:
            return
        try:
            data = json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as error:  # a payload no guest could read
            logger.warning("capsule %s: event %d is not JSON-encodable: %s", self.name, event.seq, error)
            return
        for interceptor in matching:
            try:
                await self._run(interceptor.action, data, label=interceptor.action)
            except OrchestratorError as error:
                logger.warning("capsule %s: interceptor %s failed: %s", self.name, interceptor.action, error)
                failure = {"capsule": self.name, "action": interceptor.action, "event": event.seq, "error": str(error)}
                self._bus.publish(f"orch.capsule.{self.name}.interceptor_failed", failure)

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
            "limits": {
                "fuel": self.plugin.limits.fuel,
                "memory_mib": self.plugin.limits.memory_mib,
                "timeout_ms": self.plugin.limits.timeout_ms,
            },
        }

    async def close(self) -> None:
        """Stop interceptors, let calls in flight finish, release the instances."""
        await self.stop_interceptors()
        self.plugin.close()
        self._executor.shutdown(wait=False)


def read_component(folder: Path, manifest: Manifest) -> tuple[bytes, str]:
    """The component's wasm bytes and sha256, checked against the manifest's hash pin."""
    component = manifest.component
    path = folder / component.file
    manifest_file = str(folder / "Capsule.toml")
    try:
        wasm = path.read_bytes()
    except OSError as error:
        raise ManifestError(
            [
                Problem(
                    f"cannot read {path}: {error.strerror or error}",
                    file=manifest_file,
                    field="component.file",
                )
            ]
        ) from None
    digest = hashlib.sha256(wasm).hexdigest()
    if component.hash is not None and component.hash != f"sha256:{digest}":
        raise ManifestError(
            [
                Problem(
                    f"{component.file} has sha256:{digest}, but the manifest pins {component.hash}; "
                    "update the pin if the new build is intended",
                    file=manifest_file,
                    field="component.hash",
                )
            ]
        )
    return wasm, digest


def check_exports(manifest: Manifest, exports: tuple[str, ...], manifest_file: str) -> None:
    """Every tool has an export (or the astrid_tool_call fallback); every action has one."""
    problems = []
    for tool in manifest.tools:
        if tool.name not in exports and TOOL_FALLBACK not in exports:
            problems.append(
                Problem(
                    f"tool {tool.name!r} has no export of that name and the module has no "
                    f"{TOOL_FALLBACK} export (exports: {', '.join(exports) or 'none'})",
                    file=manifest_file,
                    field="tool",
                )
            )
    for interceptor in manifest.interceptors:
        if interceptor.action not in exports:
            problems.append(
                Problem(
                    f"interceptor action {interceptor.action!r} is not an export of the module",
                    file=manifest_file,
                    field="interceptor",
                )
            )
    if problems:
        raise ManifestError(problems)


def bind_airlocks() -> list[HostFunction]:
    """The airlocks of orchestrator.host as engine host functions."""
    return [
        HostFunction(a.name, ["i64"] * a.arity, [] if a.result == "none" else ["i64"], _bind(a)) for a in HOST_FUNCTIONS
    ]


def _bind(airlock: Airlock) -> Any:
    def call(host: HostCall, *offsets: int) -> int | None:
        state = host.context
        if not isinstance(state, CallState):
            raise CapsuleTrap(f"{airlock.name} was called outside a capsule tool call")
        args = []
        for position, offset in enumerate(offsets, start=1):
            if offset == 0:
                args.append(b"")
                continue
            data = host.length(offset)
            if data is None:
                message = f"{airlock.name}: argument {position} (offset {offset}) is not an allocated kernel block"
                if airlock.result == "result":
                    return host.write(err(message))
                raise CapsuleTrap(message)
            args.append(host.read(offset))
        result = airlock.function(state, *args)
        if airlock.result == "none":
            return None
        if airlock.result == "i64":
            return int(result)
        return host.write(result)

    return call
