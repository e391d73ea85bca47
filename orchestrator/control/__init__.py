"""Control: the reconciler, the file watcher, builds and the running orchestrator.

    reconciler.py   applies plans: ordering, last-good reloads, backoff, status, events
    watcher.py      file watching (the only watchfiles user)
    builds.py       the [build] step of the dev loop
    runtime.py      Orchestrator: wires it all together; startup and phased shutdown
    statedir.py     the state dir: its files, applied.json
    gitrev.py       the git revision of the config's repository, read from its files
    history.py      the versions each deployment ran, their KV snapshots (`orch history`)
    artifacts.py    every version's module bytes, by sha256, in the state dir
    rollback.py     running an earlier version, pinned, optionally with its data

Names are imported lazily (orchestrator.lazy): importing the package costs nothing.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .reconciler import PHASES, Reconciler
    from .runtime import Orchestrator
    from .statedir import read_applied

__all__ = ["PHASES", "Orchestrator", "Reconciler", "read_applied"]
__getattr__ = lazy_exports(
    __name__,
    {"PHASES": "reconciler", "Reconciler": "reconciler", "Orchestrator": "runtime", "read_applied": "statedir"},
)
