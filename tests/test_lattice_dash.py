"""`orch dash --lattice URL`: the dashboard of a whole lattice (orchestrator.lattice.dashapi).

Behaviour on a real nats-server with real `orch host` processes: the capsules table with its
host column, a call from a capsule's screen (its output, the host that ran it, a lattice
error where the output goes), the lattice's KV, its events from several hosts, the clear
refusal of restart, a lattice that is unreachable, goes away and comes back, and a
malformed host report in the status bucket. Pure tests of the mapping with hostile status
documents (and the real dashboard drawing what it makes of them), of adding up the hosts'
counters, of the event numbering against the dashboard's own feed, and of the CLI's usage.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, OptionList, Static

from orchestrator.desired.load import load_desired
from orchestrator.lattice.connection import Lattice, LatticeAddress
from orchestrator.lattice.dashapi import EventNumbers, capsule_detail, capsule_row, connect_lattice, dash_status
from orchestrator.lattice.membership import HostInfo, beat
from orchestrator.lattice.status import lattice_status, publish_status
from tests.conftest import CAPSULES, REPO
from tests.latticehosts import Hosts, apply, capsule, live, wait_status, write_capsule, write_config
from tests.natsserver import NatsNode, NatsServers
from tests.test_tui import table_column, text_of, until
from tui import Clock, Dashboard
from tui.capsules import CapsulesScreen
from tui.detail import CapsuleScreen
from tui.feed import RESTART_TOPIC, EventFeed
from tui.kv import KVScreen
from tui.widgets import TopBar

SIZE = (120, 32)


def dashboard(urls: str, **options: Any) -> Dashboard:
    address = LatticeAddress.parse(urls)
    options.setdefault("poll_interval", 0.1)
    options.setdefault("frame_interval", 0.05)
    connect = connect_lattice(address, timeout=options.pop("timeout", 5.0))
    return Dashboard(connect, where=f"lattice {address.name} at {address.shown}", **options)


def notifications(app: Dashboard) -> list[str]:
    """Every notification the app shows from now on (app.notify still shows them)."""
    seen: list[str] = []
    notify = app.notify

    def spy(message: str, **options: Any) -> None:
        seen.append(message)
        notify(message, **options)

    app.notify = spy  # type: ignore[method-assign]
    return seen


def where_text(app: Dashboard) -> str:
    return text_of(app.screen.query_one(TopBar).query_one("#where", Static))


async def healthy(node: NatsNode) -> None:
    """Until the (re)started server answers /healthz (checked on a thread: it blocks)."""
    end = time.monotonic() + 30
    while not await asyncio.to_thread(node.healthy):
        assert time.monotonic() < end, node.log()
        await asyncio.sleep(0.05)


def deployment(root: Path) -> Path:
    """counter on two hosts, ver on one, idle disabled."""
    shutil.copytree(CAPSULES / "counter", root / "counter", ignore=shutil.ignore_patterns("assembly"))
    write_capsule(root / "ver", 1)
    return write_config(
        root,
        {
            "counter": {"path": "counter", "hosts": 2},
            "ver": {"path": "ver"},
            "idle": {"path": "ver", "enabled": "false"},
        },
    )


# -- on a real lattice ------------------------------------------------------------------------------
async def test_the_lattice_in_the_dashboard_calls_kv_events_and_restart(tmp_path: Path, hosts: Hosts) -> None:
    hosts.start("a")
    hosts.start("b")
    await wait_status(hosts.urls, lambda s: live(s) == {"a", "b"}, "two hosts", hosts=hosts)
    done = apply(deployment(tmp_path / "deploy"), hosts.urls)
    assert done.returncode == 0, done.stderr
    status = await wait_status(
        hosts.urls,
        lambda s: capsule(s, "counter")["hosts"] == ["a", "b"] and capsule(s, "ver")["phase"] == "Running",
        "counter on both hosts, ver on one",
        hosts=hosts,
    )
    ver_host = capsule(status, "ver")["hosts"][0]

    app = dashboard(hosts.urls)
    shown = notifications(app)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: app.connected and len(app.screen.query_one(DataTable).rows) == 3, "three rows")
        await until(lambda: table_column(app, "hosts") == {"counter": "a,b", "ver": ver_host, "idle": "-"}, "hosts")
        assert list(table_column(app, "name")) == ["counter", "idle", "ver"]
        assert table_column(app, "phase")["counter"] == "● running"
        assert table_column(app, "phase")["idle"] == "■ stopped"
        bar = where_text(app)
        assert "lattice default r1" in bar and "2/2 hosts" in bar and "config.yaml" in bar, bar

        await pilot.press("enter")  # the cursor starts on counter
        screen = app.screen
        assert isinstance(screen, CapsuleScreen) and screen.capsule == "counter"
        await until(lambda: screen.query_one(OptionList).option_count == 3, "the tools")
        overview = text_of(screen.query_one("#overview-text", Static))
        assert "wants 2 hosts, placed on a, b" in overview and "A count kept in KV" in overview, overview
        await until(lambda: screen.tool is not None and screen.tool["name"] == "increment", "increment chosen")
        output = screen.query_one("#tool-output", Static)
        ran_on = set()
        for count in range(2, 14, 2):
            screen.query_one("#args", Input).value = '{"by": 2}'
            await until(lambda: "valid" in text_of(screen.query_one("#args-problem", Static)), "valid arguments")
            await pilot.press("enter")
            expected = f'"count": {count}'
            await until(lambda: expected in text_of(output), expected)
            text = text_of(output)
            assert "✔ increment" in text and "fuel" in text
            ran_on |= {host for host in ("a", "b") if f"on {host}" in text}
        assert ran_on and ran_on <= {"a", "b"}

        # every counter.changed once, whichever host published it (each numbers its own)
        def changes() -> list[Any]:
            return [r.payload["count"] for r in app.feed.rows if r.topic == "counter.changed"]

        await until(lambda: changes() == list(range(2, 14, 2)), "each change once, in order")
        sources = {r.source for r in app.feed.rows if r.topic == "counter.changed"}
        assert sources and sources <= {"counter@a", "counter@b"}, sources
        assert not any(r.topic == RESTART_TOPIC for r in app.feed.rows)

        await pilot.press("escape", "k")  # leave the field; the KV of counter
        kv = app.screen
        assert isinstance(kv, KVScreen)
        await until(lambda: kv.values == {"count": b"12"}, "the lattice's KV")
        await pilot.press("escape", "escape")
        assert isinstance(app.screen, CapsulesScreen)

        await pilot.press("down", "enter")  # idle: deployed, disabled, run nowhere
        idle = app.screen
        assert isinstance(idle, CapsuleScreen) and idle.capsule == "idle"
        await until(lambda: idle.tool is not None, "its tool")
        await pilot.press("enter")
        failed = idle.query_one("#tool-output", Static)
        await until(lambda: "failed" in text_of(failed), "the lattice's refusal where the output goes")
        assert "409 CapsuleNotRunning" in text_of(failed) and "no host runs capsule 'idle'" in text_of(failed)
        assert "no host runs it" in text_of(idle.query_one("#overview-text", Static))
        await pilot.press("escape", "escape")

        await pilot.press("R")  # restart idle
        await until(lambda: any("NotOnLattice" in m for m in shown), "the refusal of restart")
        refusal = next(m for m in shown if "NotOnLattice" in m)
        assert refusal.startswith("restart idle: NotOnLattice: restart: not available on a lattice") and (
            "orch apply" in refusal
        ), refusal
        assert app.connected  # a refusal is an answer, not a lost connection


async def test_a_malformed_report_a_lost_server_and_its_return(
    tmp_path: Path, hosts: Hosts, nats_server: NatsServers
) -> None:
    hosts.start("a")
    await wait_status(hosts.urls, lambda s: live(s) == {"a"}, "host a", hosts=hosts)
    write_capsule(tmp_path / "deploy" / "ver", 1)
    assert apply(write_config(tmp_path / "deploy", {"ver": {"path": "ver"}}), hosts.urls).returncode == 0
    await wait_status(hosts.urls, lambda s: capsule(s, "ver")["hosts"] == ["a"], "ver on a", hosts=hosts)

    app = dashboard(hosts.urls)
    async with app.run_test(size=SIZE):
        await until(lambda: app.connected and table_column(app, "hosts") == {"ver": "a"}, "ver on a")

        # a live "host" whose report in the status bucket is no report a host writes
        address = LatticeAddress.parse(hosts.urls)
        lattice = await Lattice.connect(address)
        try:
            await beat(lattice, HostInfo("evil"))
            hostile = {
                "host": "evil",
                "labels": "zone=eu",
                "problems": ["not", "a", "mapping"],
                "capsules": [{"name": "ver", "phase": ["Running"], "calls": "many", "last_error": {"x": 1}}, 5],
            }
            await publish_status(lattice, "evil", hostile)
        finally:
            await lattice.close()
        await until(lambda: "2/2 hosts" in where_text(app), "the extra host counted")
        assert app.connected and table_column(app, "hosts") == {"ver": "a"}
        status = await lattice_status(address)  # `orch status --lattice` reads it too
        assert capsule(status, "ver")["hosts"] == ["a"]

        node = nats_server.nodes[0]
        node.kill()
        bar = app.screen.query_one(TopBar)
        await until(lambda: not app.connected and bar.has_class("-down"), "the disconnection")
        assert "disconnected" in text_of(bar.query_one("#link", Static))
        assert node.url in where_text(app) and "retrying every" in where_text(app), where_text(app)

        node.start()
        await healthy(node)
        await until(lambda: app.connected and not bar.has_class("-down"), "connected again")
        await until(lambda: table_column(app, "hosts").get("ver") == "a", "ver on a again")


async def test_an_unreachable_lattice_says_so_until_it_starts(tmp_path: Path) -> None:
    node = NatsNode("n1", tmp_path / "nats")
    app = dashboard(node.url, timeout=1.0)
    try:
        async with app.run_test(size=SIZE):
            bar = app.screen.query_one(TopBar)
            await until(lambda: bar.has_class("-down") and "cannot reach the lattice" in where_text(app), "the header")
            assert node.url in where_text(app) and "retrying every" in where_text(app)
            node.start()
            await healthy(node)
            await until(lambda: app.connected, "connected once it runs")
            await until(lambda: "lattice default (nothing applied)" in where_text(app), "an empty lattice")
            assert "0/0 hosts" in where_text(app) and app.screen.query_one(DataTable).row_count == 0
    finally:
        node.kill()


# -- the mapping, without a lattice ---------------------------------------------------------------
HOSTILE: list[tuple[Any, Any]] = [
    (None, None),
    ([], "reports"),
    ({"capsules": "nope", "hosts": 5, "desired": [], "problems": "x", "scheduler": 3}, {}),
    (
        {
            "capsules": [
                None,
                5,
                {"name": 7},
                {"name": ""},
                {
                    "name": "a",
                    "phase": ["Running"],
                    "hosts": "ab",
                    "on": [{"host": 3}, {"host": "h", "phase": {}, "version": 5, "last_error": ["e"]}, "x"],
                    "wanted": "2",
                    "placed_on": None,
                    "problem": 5,
                    "version": {"v": 1},
                },
                {"name": "a", "phase": "Failed"},
                {"name": "b", "phase": "Running", "hosts": ["h", 4], "on": [{"host": "h", "phase": "Running"}]},
            ],
            "hosts": [{"id": "h", "labels": "x", "alive": "yes", "capsules": -1}, {"id": None}, "h2"],
            "desired": {"revision": "3", "applied_at_ms": True, "source": 9, "config_sha256": []},
            "scheduler": ["x"],
            "problems": [{"deep": {"er": 1}}, "two\nlines"],
        },
        {
            "h": {
                "capsules": [
                    {
                        "name": "b",
                        "calls": "many",
                        "errors": -3,
                        "fuel_mean": 1.5,
                        "instances": None,
                        "since_ms": "x",
                        "next_retry_ms": True,
                        "last_error": 5,
                        "reload_count": [],
                    },
                    "row",
                ]
            },
            5: "x",
            "g": {"capsules": "no"},
            "k": None,
        },
    ),
]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_shape(status: dict[str, Any]) -> None:
    """What the dashboard relies on in a status, whatever came in."""
    json.dumps(status)
    info = status["orchestrator"]
    assert isinstance(info["config_path"], str) and isinstance(info["lattice"]["hosts"], list)
    assert all(isinstance(p, str) and "\n" not in p for p in info["lattice"]["problems"])
    for row in status["capsules"]:
        assert isinstance(row["name"], str) and row["name"] and isinstance(row["phase"], str)
        for key in ("instances", "calls", "errors", "fuel_mean", "fuel_last", "reload_count", "wanted"):
            assert _count(row[key]), (key, row[key])
        assert all(isinstance(h, str) for h in row["hosts"]) and all(isinstance(h, str) for h in row["placed_on"])
        for key in ("since_ms", "next_retry_ms", "last_error_at_ms"):
            assert row[key] is None or _count(row[key])
        assert row["last_error"] is None or isinstance(row["last_error"], str)
        assert row["version"] is None or isinstance(row["version"], str)


class Replay:
    """An Api that answers each status in turn (then the last again), nothing else."""

    def __init__(self, statuses: list[dict[str, Any]]) -> None:
        self.statuses, self.served = statuses, 0

    async def __aenter__(self) -> Replay:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def status(self) -> Any:
        self.served += 1
        return self.statuses[min(self.served, len(self.statuses)) - 1]

    async def capsule(self, name: str) -> Any:
        row = next(c for c in self.statuses[-1]["capsules"] if c["name"] == name)
        return capsule_detail(name, None, row)

    async def events(self, topic: str = ">", history: int = 0) -> AsyncIterator[dict[str, Any]]:
        await asyncio.Event().wait()
        yield {}


async def test_hostile_status_documents_make_rows_the_dashboard_draws() -> None:
    statuses = [dash_status(doc, reports, lattice="default", servers="nats://x:1") for doc, reports in HOSTILE]
    for status in statuses:
        check_shape(status)
    last = statuses[-1]
    assert [c["name"] for c in last["capsules"]] == ["a", "b"]  # the first "a" kept, non-names dropped
    a, b = last["capsules"]
    assert (
        a["phase"] == "Unknown" and a["hosts"] == [] and a["on"][0]["host"] == "h" and a["on"][0]["phase"] == "Unknown"
    )
    assert a["last_error"] is None and a["wanted"] == 0
    assert b["hosts"] == ["h"] and b["calls"] == 0 and b["errors"] == 0 and b["last_error"] is None
    assert [h["id"] for h in last["orchestrator"]["lattice"]["hosts"]] == ["h"]
    assert last["orchestrator"]["lattice"]["hosts"][0] == {
        "id": "h",
        "alive": False,
        "draining": False,
        "labels": {},
        "capsules": 0,
    }
    assert "desired" not in last["orchestrator"]  # no time it was applied: the top bar says nothing

    replay = Replay(statuses)
    app = Dashboard(lambda: replay, poll_interval=0.02)
    async with app.run_test(size=SIZE) as pilot:
        await until(lambda: replay.served > len(statuses) and app.screen.query_one(DataTable).row_count == 2, "all")
        assert table_column(app, "hosts") == {"a": "-", "b": "h"} and app.connected
        assert table_column(app, "phase")["a"] == "? unknown"
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, CapsuleScreen)
        await until(lambda: screen.detail is not None, "the detail of a")
        assert "h  ? unknown" in text_of(screen.query_one("#overview-text", Static))


def test_counters_add_up_over_the_hosts_and_the_newest_error_names_its_host() -> None:
    entry = {
        "name": "n",
        "phase": "Degraded",
        "hosts": ["a", "b"],
        "version": "v2",
        "wanted": 3,
        "placed_on": ["a", "b", "c"],
        "problem": "only 2 of 3 hosts",
        "on": [{"host": h, "phase": "Running", "version": "v2", "last_error": None} for h in ("a", "b", "c")],
    }
    rows = {
        ("a", "n"): {"calls": 3, "errors": 1, "fuel_mean": 100, "fuel_last": 90, "instances": 2, "conflicts": 1,
                     "last_error": "old", "last_error_at_ms": 10, "since_ms": 5, "reload_count": 1},
        ("b", "n"): {"calls": 1, "errors": 1, "fuel_mean": 500, "fuel_last": 500, "instances": 1, "events_lost": 4,
                     "last_error": "new", "last_error_at_ms": 20, "last_error_tool": "t", "since_ms": 7,
                     "next_retry_ms": 99, "reload_count": 2},
        ("c", "n"): {"calls": 2, "fuel_mean": 50, "instances": 8, "next_retry_ms": 50},
        ("a", "other"): {"calls": 1000},
    }  # fmt: skip
    row = capsule_row(entry, rows)
    assert (row["calls"], row["errors"], row["conflicts"], row["events_lost"]) == (6, 2, 1, 4)
    assert row["instances"] == 3  # c reports it but does not serve it
    assert row["fuel_mean"] == round((300 + 500 + 100) / 6) and row["fuel_last"] == 500
    assert (row["last_error"], row["last_error_tool"], row["last_error_at_ms"]) == ("b: new", "t", 20)
    assert (row["since_ms"], row["next_retry_ms"], row["reload_count"]) == (7, 50, 2)
    assert (row["wanted"], row["placed_on"], row["problem"]) == (3, ["a", "b", "c"], "only 2 of 3 hosts")
    unplaced = capsule_row({"name": "m", "phase": "Pending", "problem": "no host has zone=mars"}, {})
    assert unplaced["last_error"] == "no host has zone=mars" and unplaced["hosts"] == []


def test_the_detail_masks_secrets(tmp_path: Path) -> None:
    folder = tmp_path / "sec"
    write_capsule(folder, 1)
    manifest = (folder / "Capsule.toml").read_text()
    (folder / "Capsule.toml").write_text(manifest + '\n[env.token]\ntype = "secret"\n')
    config = write_config(tmp_path, {"sec": {"path": "sec", "config": {"token": "s3cr3t-value"}}})
    spec = load_desired(config).specs["sec"]
    detail = capsule_detail("sec", spec, None)
    assert detail["config"] == {"token": "***"} and detail["env"]["token"]["type"] == "secret"
    assert "s3cr3t-value" not in json.dumps(detail, default=str)
    assert [t["name"] for t in detail["tools"]] == ["version"] and detail["wanted"] == 1 and detail["status"] is None


def test_events_of_several_hosts_are_numbered_for_the_dashboard_feed() -> None:
    numbers = EventNumbers()
    feed = EventFeed()

    def event(host: str, seq: int, ms: int) -> dict[str, Any]:
        return {"topic": "t", "payload": seq, "source": "cap", "seq": seq, "timestamp_ms": ms, "host": host}

    # host b numbers from 1 while a is at 100; a's clock is behind b's
    arrived = [event("a", 100, 1000), event("b", 1, 2000), event("a", 101, 1500), event("b", 2, 2001)]
    for item in [{"live": True}, *arrived]:
        feed.add(numbers.number(item))
    assert [(r.source, r.raw["host_seq"]) for r in feed.rows] == [  # type: ignore[index]
        ("cap@a", 100),
        ("cap@b", 1),
        ("cap@a", 101),
        ("cap@b", 2),
    ]
    # a reopened stream replays the history: nothing twice, no "restarted" marker
    for item in [*arrived, {"live": True}, event("b", 3, 1900)]:
        feed.add(numbers.number(item))
    assert [r.payload for r in feed.rows] == [100, 1, 101, 2, 3]
    assert RESTART_TOPIC not in [r.topic for r in feed.rows]
    # what is forgotten is shown again rather than never
    small = EventNumbers(remember=2)
    first = [small.number(event("a", n, n))["seq"] for n in (1, 2, 3)]
    assert first == [1, 2, 3] and small.number(event("a", 3, 3))["seq"] == 3
    assert small.number(event("a", 1, 1))["seq"] == 4


# -- a screenshot -------------------------------------------------------------------------------------
NOW = 1_800_000_000.0
MS = int(NOW * 1000)


def on(host: str, phase: str, version: str | None, error: str | None = None) -> dict[str, Any]:
    return {"host": host, "phase": phase, "version": version, "last_error": error}


LATTICE_DOC = {
    "hosts": [
        {"id": "host-a", "labels": {"zone": "eu"}, "alive": True, "draining": False, "capsules": 2},
        {"id": "host-b", "labels": {}, "alive": True, "draining": False, "capsules": 1},
        {"id": "host-c", "labels": {}, "alive": False, "draining": False, "capsules": 0},
    ],
    "capsules": [
        {
            "name": "counter",
            "phase": "Running",
            "hosts": ["host-a", "host-b"],
            "version": "443543d3b0fc",
            "wanted": 2,
            "placed_on": ["host-a", "host-b"],
            "enabled": True,
            "on": [on("host-a", "Running", "443543d3b0fc"), on("host-b", "Running", "443543d3b0fc")],
            "problem": None,
        },
        {
            "name": "notes",
            "phase": "Degraded",
            "hosts": ["host-a"],
            "version": "12d59a2f788d",
            "wanted": 2,
            "placed_on": ["host-a"],
            "enabled": True,
            "on": [on("host-a", "Running", "12d59a2f788d")],
            "problem": "wants 2 hosts; 1 has zone=eu",
        },
        {
            "name": "tally",
            "phase": "Failed",
            "hosts": [],
            "version": "9b07de0a1b2c",
            "wanted": 1,
            "placed_on": ["host-b"],
            "enabled": True,
            "on": [on("host-b", "Failed", None, "tool 'count' has no export 'count'")],
            "problem": None,
        },
    ],
    "desired": {
        "revision": 7,
        "config_sha256": "b27c10057088b9695708f8bba26eb2bae7d3cbdd7af37da641fba7a3811bee19",
        "source": "/srv/deploy/config.yaml",
        "applied_at_ms": MS - 3_600_000,
        "applied_by": "ops@ci",
        "deployments": 3,
    },
    "scheduler": "host-a",
    "assignments_revision": 4,
    "problems": ["notes: wants 2 hosts; 1 has zone=eu"],
}
LATTICE_REPORTS = {
    "host-a": {
        "capsules": [
            {"name": "counter", "calls": 40, "fuel_mean": 60_000, "fuel_last": 61_000, "instances": 1},
            {"name": "notes", "calls": 3, "errors": 1, "fuel_mean": 1000, "instances": 1, "since_ms": MS - 30_000},
        ]
    },
    "host-b": {
        "capsules": [
            {"name": "counter", "calls": 2, "errors": 1, "fuel_mean": 60_000, "instances": 1},
            {"name": "tally", "last_error": "tool 'count' has no export 'count'", "next_retry_ms": MS + 4000},
        ]
    },
}


def test_snapshot_lattice_home(snap_compare: Any) -> None:
    status = dash_status(LATTICE_DOC, LATTICE_REPORTS, lattice="prod", servers="nats://a:4222")
    replay = Replay([status])
    app = Dashboard(lambda: replay, where="lattice prod at nats://a:4222", clock=Clock(now=lambda: NOW, utc=True))

    async def select_notes(pilot: Any) -> None:
        await until(lambda: app.connected and [t.row_count for t in app.screen.query(DataTable)] == [3], "the rows")
        await pilot.press("down")

    assert snap_compare(app, run_before=select_notes, terminal_size=(130, 24))


# -- the command --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lattice", "nats://127.0.0.1:1", "--socket", "x.sock"], "drop --socket"),
        (["config.yaml", "--lattice", "nats://127.0.0.1:1"], "drop CONFIG"),
        (["--lattice", "nats://127.0.0.1:1", "--state-dir", "s"], "drop --state-dir"),
        (["--lattice", "nats://127.0.0.1:1", "--lattice-name", "Bad Name"], "lattice name 'Bad Name'"),
        (["--lattice", " , "], "no lattice URL"),
    ],
)
def test_dash_lattice_usage(args: list[str], needle: str) -> None:
    command = [sys.executable, "-m", "orchestrator", "dash", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_dash_help_names_the_lattice() -> None:
    command = [sys.executable, "-m", "orchestrator", "dash", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    assert "--lattice URL" in result.stdout and "orch dash --lattice nats://127.0.0.1:4222" in result.stdout
    assert "--lattice-creds FILE" in result.stdout and "exit status" in result.stdout
