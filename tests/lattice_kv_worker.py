"""A "host" for the lattice KV tests, in its own OS process: the example counter capsule on
a JetStreamKV, incremented by concurrent callers.

    python -m tests.lattice_kv_worker URLS --calls N --callers C [--instances I] [--replicas R]

Prints `ready` once the capsule runs, then one line per acknowledged increment, `ok
<count>` (flushed at once: a SIGKILL loses no line of a reply already returned), or `error
<kind> <message>` for a call that failed, and `done` at the end. `--calls 0` increments
until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from orchestrator.capsule import Capsule
from orchestrator.capsule.bus import EventBus
from orchestrator.engine import WasmEngine
from orchestrator.errors import OrchestratorError
from orchestrator.lattice.connection import Lattice, LatticeAddress
from orchestrator.lattice.kvstore import JetStreamKV

COUNTER = Path(__file__).resolve().parent.parent / "capsules" / "counter"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def run(urls: str, *, calls: int, callers: int, instances: int, replicas: int, lattice: str) -> None:
    connected = await Lattice.connect(LatticeAddress.parse(urls, name=lattice))
    store = await JetStreamKV.open(connected, replicas=replicas)
    bus = EventBus()
    with WasmEngine() as engine, tempfile.TemporaryDirectory() as workspace:
        counter = await Capsule.load(
            COUNTER, engine=engine, bus=bus, store=store, workspace=Path(workspace), instances=instances
        )
        say("ready")
        left = calls if calls > 0 else -1

        async def caller() -> None:
            nonlocal left
            while left != 0:
                left -= 1
                try:
                    result = await counter.call_tool("increment", {})
                except OrchestratorError as error:
                    say(f"error {type(error).__name__} {' '.join(str(error).split())}")
                    continue
                say(f"ok {json.loads(result.output)['count']}")

        await asyncio.gather(*(caller() for _ in range(callers)))
        await counter.close()
    say("done " + json.dumps(store.stats))
    await store.close()
    bus.close()
    await connected.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--lattice", default="default")
    options = parser.parse_args()
    asyncio.run(
        run(
            options.urls,
            calls=options.calls,
            callers=options.callers,
            instances=options.instances,
            replicas=options.replicas,
            lattice=options.lattice,
        )
    )


if __name__ == "__main__":
    main()
