"""GitOps benchmark: from a pushed commit to the new revision serving; prints one JSON object.

    .venv/bin/python bench/gitops.py [--rounds N] [--capsules N] [--quick] [--lattice]

A bare repository on disk (reached as a `file://` URL) holds a config.yaml and N capsules
(WAT modules whose tool `version` outputs a constant). An `Orchestrator` follows its main
branch (a `GitFollower` with an interval of an hour: the fetch interval is excluded) and
serves the control API on its socket. Each round changes ONE capsule's module, commits and
pushes (timed apart: `push_ms`), then asks `POST /v1/reconcile` (an aiohttp client over the
unix socket) and calls the tool until it answers the new constant: that is
`commit_to_serving_ms` (fetch, check out into a fresh folder, validate every capsule of the
revision strictly, apply the plan: one reload), median and p95 over the rounds. The parts
are timed separately on the follower after the runs (`fetch_ms`, `checkout_ms`,
`validate_ms`: medians over the same number of rounds on fresh commits), to show where the
time goes.

- `capsules_1` and `capsules_N`: the same with 1 and with N capsules in the revision (each
  revision re-reads and hashes every capsule: they live in the new checkout).
- `via_cli_ms`: the same trigger through `orch reconcile --state-dir` as a subprocess
  (adds the CLI's start-up), median over a few rounds.

`--lattice` adds `lattice`: the same on a lattice. A nats-server and three `orch host`
processes; `orch apply git+... --lattice URL --follow --interval 3600` (the interval
excluded again) with one capsule on all 3 hosts (`hosts: 3`). Each round commits a new
module, asks the lease holder to fetch (`request_reconcile`, what `orch reconcile
--lattice` sends) and watches the status bucket until every host reports the new version
Running: `commit_to_serving_all_hosts_ms`, from the request; `reconcile_answer_ms` is the
holder's answer alone (fetch, check out, validate, upload, publish); `via_cli_ms` the same
through an `orch reconcile --lattice` process.

No target is set by the brief; one figure per round is shown in `rounds_ms` for the 1-capsule
case. The machine is shared (2 cores): compare ratios, not absolute numbers. `--quick`: 5
rounds, 10 capsules.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reload import TOOL, module_wat  # noqa: E402  (bench/ is on the path: a sibling script)

from orchestrator.api.client import Client  # noqa: E402
from orchestrator.api.server import ControlServer  # noqa: E402
from orchestrator.control.follow import GitFollower, load_revision  # noqa: E402
from orchestrator.control.gitsource import GitRef  # noqa: E402
from orchestrator.control.runtime import Orchestrator  # noqa: E402


def manifest(name: str) -> str:
    return (
        f'[package]\nname = "{name}"\nversion = "1.0.0"\n[[component]]\nfile = "v.wat"\n'
        f'[[tool]]\nname = "{TOOL}"\ninput_schema = {{ type = "object" }}\n'
    )


class Repo:
    """A bare repository and a working clone that commits and pushes to it."""

    def __init__(self, root: Path) -> None:
        self.bare, self.work = root / "origin.git", root / "work"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.bare)], check=True)
        subprocess.run(["git", "init", "-q", "-b", "main", str(self.work)], check=True)

    def git(self, *args: str) -> str:
        command = ["git", "-C", str(self.work), "-c", "user.name=b", "-c", "user.email=b@example.com", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()

    def commit(self, files: dict[str, str]) -> float:
        """Write, commit and push; the seconds the push took."""
        for name, text in files.items():
            (self.work / name).parent.mkdir(parents=True, exist_ok=True)
            (self.work / name).write_text(text)
        self.git("add", ".")
        self.git("commit", "-q", "-m", "bench")
        started = time.perf_counter()
        self.git("push", "-q", str(self.bare), "HEAD:main")
        return time.perf_counter() - started


def ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered) * 1000, 2),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 2),
        "min": round(ordered[0] * 1000, 2),
    }


async def one_size(root: Path, *, capsules: int, rounds: int, cli_rounds: int) -> dict[str, Any]:
    repo = Repo(root)
    names = [f"c{i}" for i in range(capsules)]
    files = {"config.yaml": "version: 1\ncapsules:\n" + "".join(f"  {n}:\n    path: caps/{n}\n" for n in names)}
    for name in names:
        files[f"caps/{name}/Capsule.toml"] = manifest(name)
        files[f"caps/{name}/v.wat"] = module_wat(f"{name}-0")
    repo.commit(files)
    follower = GitFollower(
        GitRef.parse(f"git+file://{repo.bare}#main"), state_dir=root / "state", workspace=root, interval=3600
    )
    orchestrator = Orchestrator(follow=follower, builds=False)
    await orchestrator.prepare()
    assert orchestrator.state is not None
    server = ControlServer(orchestrator, state_dir=orchestrator.state.path)
    await server.start()
    await orchestrator.run()
    serving: list[float] = []
    pushes: list[float] = []
    via_cli: list[float] = []
    try:
        async with Client(server.path) as api:
            for round_ in range(1, rounds + cli_rounds + 1):
                wanted = f"c0-{round_}"
                pushes.append(repo.commit({"caps/c0/v.wat": module_wat(wanted)}))
                started = time.perf_counter()
                if round_ <= rounds:
                    await api.reconcile()
                else:  # `orch reconcile` from a terminal
                    await asyncio.to_thread(
                        subprocess.run,
                        [sys.executable, "-m", "orchestrator", "reconcile", "--state-dir", str(root / "state")],
                        check=True,
                        capture_output=True,
                    )
                while (await api.call("c0", TOOL, b"{}"))[0].decode() != wanted:
                    await asyncio.sleep(0)
                (serving if round_ <= rounds else via_cli).append(time.perf_counter() - started)
        parts = await time_parts(repo, follower, rounds)
    finally:
        await server.stop()
        await orchestrator.stop(10)
    return {
        "capsules": capsules,
        "rounds": rounds,
        "commit_to_serving_ms": ms(serving),
        "push_ms": ms(pushes),
        **parts,
        "via_cli_ms": ms(via_cli) if via_cli else None,
        "rounds_ms": [round(s * 1000, 1) for s in serving],
    }


async def time_parts(repo: Repo, follower: GitFollower, rounds: int) -> dict[str, Any]:
    """The pipeline's steps, each on its own (fresh commits: nothing cached)."""
    fetches, checkouts, validations = [], [], []
    for round_ in range(rounds):
        repo.commit({"caps/c0/v.wat": module_wat(f"parts-{round_}")})
        started = time.perf_counter()
        commit = await asyncio.to_thread(follower.source.fetch)
        fetched = time.perf_counter()
        checkout = await asyncio.to_thread(follower.source.checkout, commit)
        checked_out = time.perf_counter()
        await asyncio.to_thread(load_revision, checkout, state_dir=follower.state_dir, workspace=follower.workspace)
        validated = time.perf_counter()
        fetches.append(fetched - started)
        checkouts.append(checked_out - fetched)
        validations.append(validated - checked_out)
    return {"fetch_ms": ms(fetches), "checkout_ms": ms(checkouts), "validate_ms": ms(validations)}


async def on_lattice(root: Path, urls: str, *, rounds: int, cli_rounds: int) -> dict[str, Any]:
    """The lattice variant (see the module docstring)."""
    from lattice import all_hosts_serve  # a sibling script

    from orchestrator.lattice.connection import Lattice, LatticeAddress
    from orchestrator.lattice.follow import request_reconcile
    from orchestrator.lattice.status import lattice_status
    from tests.latticehosts import Hosts, orch, wait_status

    repo = Repo(root / "repo")
    config = "version: 1\ncapsules:\n  ver:\n    path: caps/ver\n    hosts: 3\n"
    repo.commit({"config.yaml": config, "caps/ver/Capsule.toml": manifest("ver"), "caps/ver/v.wat": module_wat("0")})
    hosts = Hosts(root / "hosts", urls)
    lattice = await Lattice.connect(LatticeAddress.parse(urls))
    serving, answers, via_cli = [], [], []
    try:
        for name in ("h1", "h2", "h3"):
            hosts.start(name)
        source = f"git+file://{repo.bare}#main:config.yaml"
        done = orch("apply", source, "--lattice", urls, "--follow", "--interval", "3600")
        assert done.returncode == 0, done.stderr
        await wait_status(urls, lambda s: len(s["capsules"][0]["hosts"]) == 3, "ver on 3 hosts", hosts=hosts)
        for round_ in range(1, rounds + cli_rounds + 1):
            repo.commit({"caps/ver/v.wat": module_wat(str(round_))})
            old = (await lattice_status(LatticeAddress.parse(urls)))["capsules"][0]["version"]
            watching = asyncio.get_running_loop().create_task(
                all_hosts_serve(lattice, 3, lambda v, old=old: v not in (None, old))
            )
            await asyncio.sleep(0.05)  # the watcher is in place (its initial values arrive first)
            started = time.perf_counter()
            if round_ <= rounds:
                outcome = await request_reconcile(lattice)
                assert outcome.outcome == "published", outcome
                answers.append(time.perf_counter() - started)
            else:
                done = await asyncio.to_thread(orch, "reconcile", "--lattice", urls)
                assert done.returncode == 0, done.stderr
            finished = await watching
            (serving if round_ <= rounds else via_cli).append(finished - started)
    finally:
        await lattice.close()
        hosts.stop()
    return {
        "hosts": 3,
        "rounds": rounds,
        "commit_to_serving_all_hosts_ms": ms(serving),
        "reconcile_answer_ms": ms(answers),
        "via_cli_ms": ms(via_cli) if via_cli else None,
    }


async def single_host(rounds: int, capsules: int) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "gitops", "fetch_interval": "excluded (POST /v1/reconcile)"}
    for size, key in ((1, "capsules_1"), (capsules, f"capsules_{capsules}")):
        with tempfile.TemporaryDirectory(prefix="orch-bench-gitops-") as folder:
            result[key] = await one_size(Path(folder), capsules=size, rounds=rounds, cli_rounds=3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--capsules", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--lattice", action="store_true", help="also the lattice variant (nats-server, 3 hosts)")
    args = parser.parse_args()
    rounds, capsules = (5, 10) if args.quick else (args.rounds, args.capsules)
    result = asyncio.run(single_host(rounds, capsules))
    if args.lattice:
        from tests.natsserver import nats_servers

        with (
            tempfile.TemporaryDirectory(prefix="orch-bench-gitops-lattice-") as folder,
            nats_servers(Path(folder) / "nats") as servers,
        ):
            figures = on_lattice(Path(folder), servers.urls, rounds=min(rounds, 10), cli_rounds=3)
            result["lattice"] = asyncio.run(figures)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
