"""The state dir's record of what was applied: `applied.json`.

After every apply the runtime records what runs (specs without secret values, the config's
hash and revision), so `orch plan` can diff against it without a running orchestrator.
Written atomically off the event loop (it can be a megabyte), created private (0600).

Used by the runtime, the CLI (`orch plan`) and the API client (the socket's name); kept
light to import.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import write_atomic

if TYPE_CHECKING:
    from ..desired.spec import CapsuleSpec

logger = logging.getLogger(__name__)

APPLIED = "applied.json"
KV_DATABASE = "kv.sqlite3"
CACHE = "cache"
SOCKET = "orch.sock"
LOG = "orch.log"


def write_applied(state_dir: Path, record: dict[str, Any]) -> None:
    """Write applied.json atomically (blocking: call it on a worker thread)."""
    path = state_dir / APPLIED
    try:
        write_atomic(path, json.dumps(record, separators=(",", ":"), sort_keys=True).encode())
    except OSError as error:
        logger.warning("could not record the applied state in %s: %s", path, error)


def read_applied(state_dir: Path) -> dict[str, CapsuleSpec]:
    """The specs recorded by the last apply (empty when there is none)."""
    from ..desired.spec import CapsuleSpec  # only `orch plan` needs it: keep this module light

    try:
        record = json.loads((state_dir / APPLIED).read_text())
        return {name: CapsuleSpec.from_record(r) for name, r in record.get("capsules", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring unreadable %s: %s", state_dir / APPLIED, error)
        return {}
