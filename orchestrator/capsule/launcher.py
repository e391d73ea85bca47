"""Specs become running capsules: the reconciler's `Launcher` for this host.

Used by the runtime (orchestrator.control.runtime), which passes it to the reconciler.
"""

from __future__ import annotations

from pathlib import Path

from ..desired.spec import CapsuleSpec
from ..engine import WasmEngine
from .bus import EventBus
from .capsule import Capsule
from .gate import RateLimiter
from .kvbackend import KVBackend
from .protected import ProtectedSource


class CapsuleLauncher:
    """Launches a spec as a running Capsule, interceptors off until the swap."""

    def __init__(
        self, *, engine: WasmEngine, bus: EventBus, store: KVBackend, workspace: Path, protected: ProtectedSource
    ) -> None:
        self._engine = engine
        self._bus = bus
        self._store = store
        self._workspace = workspace
        self._protected = protected

    async def launch(self, spec: CapsuleSpec) -> Capsule:
        return await Capsule.launch(
            spec,
            engine=self._engine,
            bus=self._bus,
            store=self._store,
            workspace=self._workspace,
            rate=publish_limiter(spec),
            interceptors=False,
            protected=self._protected,
        )


def publish_limiter(spec: CapsuleSpec) -> RateLimiter:
    """The capsule's publish rate limiter: the spec's rates over the built-in ones."""
    rates = spec.publish_rate
    defaults = RateLimiter()
    return RateLimiter(
        messages_per_second=rates.get("messages_per_second", defaults.messages_per_second),
        bytes_per_second=rates.get("bytes_per_second", defaults.bytes_per_second),
    )
