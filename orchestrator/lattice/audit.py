"""Audit events of the lattice's GitOps: published on the lattice bus by whoever publishes a
revision.

A revision that grants a capsule more than it ran with (orchestrator.lattice.judge) is
announced as `orch.audit.escalation` `{capsule, escalations, granted_by, spec_hash}`
(`granted_by`: "policy", "operator", or null while it waits), and an `orch reject` as
`orch.audit.rejected` `{capsule, escalations, spec_hash}`: the same events, with the same
payloads, as on one host (orchestrator.control.approvals). They go on the lattice's bus
subjects (`names.bus(topic)`) in the bus envelope (orchestrator.lattice.history), `host`
being who published the revision (`user@machine`), so `orch events --lattice` and every
subscriber see them. When the lattice keeps event history, the publish waits for the
stream's acknowledgement, so the event is stored before the command returns.

Used by orchestrator.lattice.desiredstate (after a revision is put) and the operator's verbs.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence

import nats.errors
import nats.js.errors

from .connection import Lattice, barrier
from .history import stream_name
from .judge import Audit

logger = logging.getLogger(__name__)


async def announce(lattice: Lattice, audits: Sequence[Audit], *, by: str) -> None:
    """Publish `audits` in order. Failures are logged (the revision, which records the same
    facts, is in already)."""
    if not audits:
        return
    run = secrets.token_hex(8)
    try:
        stored = True
        try:
            await lattice.js.stream_info(stream_name(lattice))
        except nats.js.errors.NotFoundError:
            stored = False  # no host has created the history yet: live subscribers only
        for seq, audit in enumerate(audits, 1):
            envelope = {
                "source": "orch",
                "host": by,
                "run": run,
                "seq": seq,
                "timestamp_ms": int(time.time() * 1000),
                "payload": audit.payload,
            }
            data = json.dumps(envelope, separators=(",", ":")).encode()
            subject = lattice.names.bus(audit.topic)
            if stored:
                await lattice.js.publish(subject, data)
            else:
                await lattice.nc.publish(subject, data)
        await barrier(lattice.nc)
    except (nats.errors.Error, TimeoutError) as error:
        logger.warning(
            "lattice %s: audit events not published (%s: %s); the desired revision records the same",
            lattice.names.name,
            type(error).__name__,
            error,
        )
