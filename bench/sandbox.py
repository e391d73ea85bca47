"""File airlock benchmark: prints one JSON object.

    .venv/bin/python bench/sandbox.py [--rounds N] [--calls N]

- latency: microseconds per call of each file airlock, called directly with a `CallState`
  (no wasm), on a 1 KiB file two folders deep and eight folders deep, with a gate that
  protects the default layout (state dir, config file, ten capsule folders). The reference
  `naive_read` is a plain `open`+`read` of the same file by path, the cost floor of any
  implementation. Each component of the path costs one `openat` in the race-free walk.
- race: a subprocess swaps `notes/d` between a real folder and a symlink to a folder
  outside the workspace (renameat2 RENAME_EXCHANGE, tight loop) while the airlocks read,
  write, list, stat and test `notes/d/...`; it counts how many answers came from outside
  (must be 0) and how many were denied.

Figures are medians over rounds; the machine is shared, so compare ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.capsule.airlocks import (  # noqa: E402
    CallState,
    HostContext,
    astrid_fs_exists,
    astrid_fs_readdir,
    astrid_fs_stat,
    astrid_read_file,
    astrid_write_file,
)
from orchestrator.capsule.bus import EventBus  # noqa: E402
from orchestrator.capsule.gate import PathGate, RateLimiter, TopicGate  # noqa: E402
from orchestrator.capsule.protected import ProtectedPaths  # noqa: E402
from tests.test_sandbox import Racer, Tally, hammer, race_workspace, snapshot  # noqa: E402


def call_state(gate: PathGate, bus: EventBus) -> CallState:
    host = HostContext(capsule="bench", config={}, paths=gate, publish=TopicGate([]), rate=RateLimiter(), bus=bus)
    return CallState(host=host, function="bench")


def per_call_us(function: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


def latency(root: Path, rounds: int, calls: int) -> dict[str, dict[str, float]]:
    ws = root / "ws"
    deep = "notes/" + "/".join(f"d{i}" for i in range(7))
    for folder in ("notes", deep, ".orch", *(f"capsules/c{i}" for i in range(10))):
        (ws / folder).mkdir(parents=True, exist_ok=True)
    (ws / "config.yaml").write_text("version: 1\n")
    protected = ProtectedPaths.build(
        state_dir=ws / ".orch",
        config_file=ws / "config.yaml",
        capsule_folders=[ws / "capsules" / f"c{i}" for i in range(10)],
    )
    bus = EventBus(history=16)
    call = call_state(PathGate(workspace=ws, read=["cwd://notes"], write=["cwd://notes"], protected=protected), bus)
    report: dict[str, dict[str, float]] = {}
    for label, folder in (("depth_2", "notes"), ("depth_8", deep)):
        (ws / folder / "f.txt").write_bytes(b"x" * 1024)
        path = f"{folder}/f.txt".encode()
        real = ws / folder / "f.txt"

        def naive(real: Path = real) -> bytes:
            with open(real, "rb") as handle:
                return handle.read()

        operations: dict[str, Callable[[], object]] = {
            "naive_read": naive,
            "read_file": lambda path=path: astrid_read_file(call, path),
            "write_file": lambda path=path: astrid_write_file(call, path, b"y" * 1024),
            "stat": lambda path=path: astrid_fs_stat(call, path),
            "exists": lambda path=path: astrid_fs_exists(call, path),
            "readdir": lambda folder=folder: astrid_fs_readdir(call, folder.encode()),
        }
        samples: dict[str, list[float]] = {name: [] for name in operations}
        for _ in range(rounds):
            for name, operation in operations.items():
                samples[name].append(per_call_us(operation, calls))
        report[label] = {f"{name}_us": round(statistics.median(values), 1) for name, values in samples.items()}
    bus.close()
    return report


def race(root: Path, rounds: int) -> dict[str, int]:
    ws, outside = race_workspace(root / "race")
    bus = EventBus(history=16)
    call = call_state(PathGate(workspace=ws, read=["cwd://notes"], write=["cwd://notes"]), bus)
    before = snapshot(outside)
    racer = Racer(ws / "notes", "d", str(outside))
    tally = Tally()
    try:
        hammer(call, "notes/d", rounds=rounds, tally=tally)
    finally:
        swaps = racer.stop()
        bus.close()
    landed = sum(1 for name, value in snapshot(outside).items() if before.get(name) != value)
    return {"swaps": swaps, **dict(sorted(tally.counts.items())), "writes_landed_outside": landed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        report = {"latency": latency(root, args.rounds, args.calls), "race": race(root, 1000 * args.rounds)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
