"""CLI start-up benchmark: prints one JSON object with each command's wall time.

    .venv/bin/python bench/cli.py [--runs N] [--source DIR]

Each command runs as a user runs it: the `orch` script of this virtualenv (or
`python -m orchestrator` when there is none), a new process every time, output to a pipe.
`--source DIR` measures another checkout instead (`python -m orchestrator` with DIR first on
PYTHONPATH, e.g. a `git worktree` of an older revision, for before/after figures); a verb
that revision lacks (or that fails there) is left out.
`python -c pass` is measured in the same rounds as the floor every Python command pays; each
command's `ratio` is its median over that floor's median. The rounds are interleaved (one
run of each command per round), so a busy moment of the shared machine costs every command
alike.

`status`, `status --json`, `describe` and `call` talk to a real orchestrator: `orch up
--no-watch` on a copy of the example deployment (capsules counter, milestones and notes) in
a temporary folder, started before the rounds and stopped after them. `plan` and `validate`
read that copy's config.yaml and its capsules (they load pydantic and hash the wasm).

Targets (from the CLI findings): `orch --help` and `orch status` in <= 0.3 s. The machine is
shared: compare the ratios rather than the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
TARGET_S = 0.3


def orch_command() -> list[str]:
    script = Path(sys.executable).parent / "orch"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "orchestrator"]


def deployment(root: Path) -> Path:
    for name in ("counter", "milestones", "notes"):
        shutil.copytree(ROOT / "capsules" / name, root / "capsules" / name, ignore=shutil.ignore_patterns("assembly"))
    shutil.copy(ROOT / "config.yaml", root / "config.yaml")
    return root / "config.yaml"


def status_ready(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(str(sock))
            conn.sendall(b"GET /v1/status HTTP/1.1\r\nHost: orch\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        return bool(json.loads(data.split(b"\r\n\r\n", 1)[1])["orchestrator"]["ready"])
    except (OSError, ValueError, KeyError, IndexError):
        return False


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command} exited {result.returncode}: {result.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    parser.add_argument("--source", type=Path, help="measure the checkout in DIR (python -m orchestrator)")
    options = parser.parse_args()
    env = dict(os.environ)
    if options.source is not None:
        orch = [sys.executable, "-m", "orchestrator"]
        env["PYTHONPATH"] = os.pathsep.join([str(options.source.resolve()), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    else:
        orch = orch_command()
    commands: dict[str, list[str]] = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "orch --help": [*orch, "--help"],
        "orch --version": [*orch, "--version"],
        "orch status": [*orch, "status"],
        "orch status --json": [*orch, "status", "--json"],
        "orch describe counter": [*orch, "describe", "counter"],
        "orch call counter get": [*orch, "call", "counter", "get"],
        "orch events --history 10": [*orch, "events", "--history", "10"],
        "orch plan": [*orch, "plan"],
        "orch validate": [*orch, "validate"],
    }
    with tempfile.TemporaryDirectory(prefix="orch-bench-cli-") as temp:
        root = Path(temp)
        config = deployment(root)
        log = open(root / "up.log", "wb")  # noqa: SIM115  (closed in the finally below)
        up = subprocess.Popen(
            [*orch, "up", str(config), "--no-watch", "--log-format", "json"], cwd=root, stdout=log, stderr=log, env=env
        )
        try:
            end = time.monotonic() + READY_TIMEOUT_S
            while not status_ready(root / ".orch" / "orch.sock"):
                if up.poll() is not None or time.monotonic() > end:
                    raise SystemExit(f"orch up did not start: {(root / 'up.log').read_text()[-2000:]}")
                time.sleep(0.05)
            available = {}
            for name, command in commands.items():  # a verb this version lacks is left out
                probe = subprocess.run(command, cwd=root, capture_output=True, env=env, check=False)
                if probe.returncode == 0:
                    available[name] = command
            times: dict[str, list[float]] = {name: [] for name in available}
            for _ in range(options.runs):
                for name, command in available.items():
                    times[name].append(timed(command, root, env))
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
            log.close()
    floor = statistics.median(times["python -c pass"])
    results: dict[str, Any] = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        results[name] = {
            "median_s": round(median, 4),
            "min_s": round(min(samples), 4),
            "ratio": round(median / floor, 2),
        }
    report = {
        "runs": options.runs,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(orch),
        "source": str(options.source) if options.source is not None else str(ROOT),
        "commands": results,
        "target_s": TARGET_S,
        "meets_target": {
            name: results[name]["median_s"] <= TARGET_S for name in ("orch --help", "orch status") if name in results
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
