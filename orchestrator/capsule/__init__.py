"""One running capsule and everything it touches: airlocks, gate, KV, bus.

    capsule.py        Capsule: a spec's running version (plugin, tools, calls, commits)
    launcher.py       specs -> running capsules (the reconciler's Launcher)
    airlocks.py       the host functions, as plain Python over bytes
    binding.py        the airlocks bound to the engine
    gate.py           what a capsule may touch: paths, sizes, publish grants and rate
    kv.py, store.py   a call's view of the KV; the KV store (the only aiosqlite user)
    kvfile.py         the KV database file: checks before opening, `orch validate`'s check
    snapshots.py      copies of a capsule's keys in the KV database (taken, read, dropped)
    bus.py            the in-process event bus
    interceptors.py   bus events delivered to a capsule's interceptors

Imports the engine and the desired state; nothing here plans or reconciles.

Names are imported lazily (orchestrator.lazy): importing the package costs nothing.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .bus import Event, EventBus, Subscription
    from .capsule import Capsule, ToolResult
    from .launcher import CapsuleLauncher, publish_limiter
    from .store import KVStore, StoreError

__all__ = [
    "Capsule",
    "CapsuleLauncher",
    "Event",
    "EventBus",
    "KVStore",
    "StoreError",
    "Subscription",
    "ToolResult",
    "publish_limiter",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "Capsule": "capsule",
        "CapsuleLauncher": "launcher",
        "Event": "bus",
        "EventBus": "bus",
        "KVStore": "store",
        "StoreError": "store",
        "Subscription": "bus",
        "ToolResult": "capsule",
        "publish_limiter": "launcher",
    },
)
