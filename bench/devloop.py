"""Dev-loop benchmark: a capsule's source saved -> its new version serving; prints one JSON object.

    .venv/bin/python bench/devloop.py [--rounds N] [--capsule NAME] [--profiles dev,release]
                                      [--source DIR]

For each profile, a copy of the example deployment (`config.yaml` and the capsules it names,
with their sources, `capsules/build.mjs`, the SDK, and `node_modules` linked package by
package to the repository's installed tools) runs under a real `orch up` (watching,
builds on); the bench follows its events over the control API, as `orch events --follow`
does. The capsule's `[build] command` is set to the profile (`--dev` or
`--release`; `as-is` keeps the manifest's command). Each round appends a new exported
function to the capsule's `assembly/index.ts` (so the module really changes), and times:

- save_to_serving: from just before the write to the arrival of the
  `orch.capsule.<name>.reloaded` event (the new version is serving);
- save_noticed: from the write to `build_started` (the watcher noticing the save);
- build: the build command's own duration (the `seconds` of `build_succeeded`, until the
  build process exits; the watcher may already be loading the new .wasm by then).

Reported per profile: median, p95, min and max over the rounds (after one warm-up round), the
build's share of the median, and `error_feedback`: one save with a type error, timed to
`build_failed`, with the number of lines of output the event carries and whether they hold a
Node stack trace. Target: save_to_serving median <= 3 s with the dev profile.

`--source DIR` copies from another checkout of the repository (e.g. an older revision, with
`--profiles as-is`, to measure the loop before a change). Needs `npm ci` in capsules/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.api.client import Client, socket_for  # noqa: E402
from tests.test_devloop import Up  # noqa: E402  (orch up in its own process, its lines read)

ROUND_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 60.0
SDK_PACKAGE = "orch-capsule-sdk"
BROKEN = '\nexport function devloop_broken(): i32 { const x: i32 = "not a number"; return x; }\n'


def deployment(source: Path, root: Path) -> Path:
    """Copies the example config and its capsules (with sources) under `root`; links the tools."""
    capsules = root / "capsules"
    capsules.mkdir(parents=True)
    text = (source / "config.yaml").read_text()
    for name in re.findall(r"^\s+path:\s*capsules/([a-z0-9-]+)\s*$", text, flags=re.MULTILINE):
        shutil.copytree(source / "capsules" / name, capsules / name)
    for name in ("build.mjs", "package.json"):
        shutil.copy(source / "capsules" / name, capsules / name)
    if (source / "capsules" / "sdk").is_dir():
        shutil.copytree(source / "capsules" / "sdk", capsules / "sdk")
    modules = capsules / "node_modules"
    modules.mkdir()
    installed = ROOT / "capsules" / "node_modules"
    for entry in installed.iterdir():
        if entry.name not in {SDK_PACKAGE, ".bin", ".package-lock.json"}:
            (modules / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    if (capsules / "sdk" / "package.json").is_file():
        (modules / SDK_PACKAGE).symlink_to(Path("..") / "sdk", target_is_directory=True)
    shutil.copy(source / "config.yaml", root / "config.yaml")
    return root / "config.yaml"


def set_profile(manifest: Path, profile: str) -> str:
    """Points the manifest's [build] command at `profile`; returns the command."""
    text = manifest.read_text()
    match = re.search(r'^command\s*=\s*"([^"]*)"', text, flags=re.MULTILINE)
    if match is None:
        raise SystemExit(f"{manifest} has no [build] command")
    command = match.group(1)
    if profile != "as-is":
        words = [w for w in command.split() if w not in {"--dev", "--release"}]
        command = " ".join([*words[:2], f"--{profile}", *words[2:]])
        manifest.write_text(text[: match.start(1)] + command + text[match.end(1) :])
    return command


class Stream:
    """The control API's live event stream for one capsule's topics, each event with the
    time it arrived here."""

    def __init__(self, events: AsyncIterator[dict[str, Any]]) -> None:
        self._events = events

    async def live(self) -> None:
        """Until the stream is live (subscribed: every later event arrives)."""
        async for item in self._events:
            if "live" in item:
                return

    async def next(self, topics: set[str], timeout: float) -> tuple[float, dict[str, Any]]:
        """The next event on one of `topics` (others are skipped)."""
        async with asyncio.timeout(timeout):
            async for item in self._events:
                if item.get("topic") in topics:
                    return time.perf_counter(), item
        raise ConnectionError("the event stream ended")


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "median": round(statistics.median(ordered), 3),
        "p95": round(p95, 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
    }


def run_profile(source: Path, capsule: str, profile: str, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="devloop-") as temporary:
        config = deployment(source, Path(temporary))
        folder = config.parent / "capsules" / capsule
        command = set_profile(folder / "Capsule.toml", profile)
        up = Up(config)
        try:
            if not up.watching.wait(READY_TIMEOUT_S):
                raise SystemExit("orch up is not watching:\n" + "\n".join(up.lines[-20:]))
            result = asyncio.run(measure(socket_for(config), folder / "assembly" / "index.ts", capsule, rounds))
            return result | {"command": command}
        finally:
            up.stop()


async def measure(sock: Path, source: Path, capsule: str, rounds: int) -> dict[str, Any]:
    original = source.read_text()
    prefix = f"orch.capsule.{capsule}."
    totals: list[float] = []
    notices: list[float] = []
    builds: list[float] = []
    async with Client(sock) as client:
        stream = Stream(client.events(prefix + ">"))
        await stream.live()
        for i in range(rounds + 1):  # round 0 warms the disk cache and the module cache up
            started = time.perf_counter()
            source.write_text(f"{original}\nexport function devloop_mark(): i32 {{ return {i + 1}; }}\n")
            seen: dict[str, float] = {}
            build_seconds = 0.0
            while len(seen) < 3:  # the reload may come before the build process has exited
                topics = {prefix + t for t in ("build_started", "build_succeeded", "build_failed", "reloaded")} - {
                    prefix + t for t in seen
                }
                at, event = await stream.next(topics, ROUND_TIMEOUT_S)
                what = event["topic"].removeprefix(prefix)
                if what == "build_failed":
                    raise SystemExit(f"the build failed:\n{event['payload'].get('output', '')}")
                if what == "build_succeeded":
                    build_seconds = float(event["payload"]["seconds"])
                seen[what] = at
            if i > 0:
                totals.append(seen["reloaded"] - started)
                notices.append(seen["build_started"] - started)
                builds.append(build_seconds)
        started = time.perf_counter()
        source.write_text(original + BROKEN)
        failed_at, event = await stream.next({prefix + "build_failed"}, ROUND_TIMEOUT_S)
        source.write_text(original)
    output = str(event["payload"].get("output", ""))
    error_feedback = {
        "seconds": round(failed_at - started, 3),
        "output_lines": len(output.strip().splitlines()),
        "node_stack_trace": bool(re.search(r"^\s+at .*(node:|\.m?js:\d+)", output, flags=re.MULTILINE)),
    }
    median_total = statistics.median(totals)
    return {
        "save_to_serving_s": summary(totals),
        "build_s": summary(builds),
        "save_noticed_s": summary(notices),
        "build_share_of_median": round(statistics.median(builds) / median_total, 3) if median_total else None,
        "error_feedback": error_feedback,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed saves per profile (default 10)")
    parser.add_argument("--capsule", default="counter", help="the example capsule to edit (default counter)")
    parser.add_argument("--profiles", default="dev,release", help="dev, release and/or as-is (comma-separated)")
    parser.add_argument("--source", type=Path, default=ROOT, help="the checkout to copy the deployment from")
    args = parser.parse_args()
    if not (ROOT / "capsules" / "node_modules" / "assemblyscript").is_dir():
        raise SystemExit("run `npm ci` in capsules/ first")
    results: dict[str, Any] = {
        "capsule": args.capsule,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_1m_before": round(os.getloadavg()[0], 2),
        "target": {"dev_save_to_serving_median_s": 3.0},
        "profiles": {},
    }
    for profile in args.profiles.split(","):
        results["profiles"][profile] = run_profile(args.source.resolve(), args.capsule, profile, args.rounds)
    results["load_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
