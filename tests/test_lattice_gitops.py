"""A lattice follows a git branch: `orch apply git+URL#BRANCH:PATH --lattice URL --follow`.

Real everything: a bare repository on disk (a `file://` URL) with WAT capsules whose
`version` tool answers a digit (so a call says which revision serves), a real nats-server,
real `orch host` processes and `orch` commands. Covered: the first revision published by
the apply and each new commit served without another apply (the lease holder fetches every
`--interval`); a broken commit rejected whole (status shows its revision and problems; the
last good revision keeps serving) and the fix applied; `orch reconcile --lattice` fetching
at once, its exit codes and answers; an apply without --follow ending following; the lease
holder SIGKILLed and the next one carrying on from the recorded state without publishing
again; hostile follow records and statuses in the bucket (refused with one line, hosts keep
running); fencing and recovery of the follower in process; usage errors. Waits poll the
lattice's status or calls with a deadline as a backstop, never a fixed sleep.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.lattice.connection import Lattice, LatticeAddress, LatticeError
from orchestrator.lattice.desiredstate import current, desired_bucket
from orchestrator.lattice.follow import LatticeFollower, request_reconcile
from orchestrator.lattice.followrecord import (
    MAX_RECORD_BYTES,
    RECORD_KEY,
    STATUS_KEY,
    FollowRecord,
    LatticeDataError,
    parse_status,
    read_status,
    status_bucket,
    write_record,
)
from orchestrator.lattice.status import lattice_status
from tests.latticehosts import Hosts, apply, call, orch, wait_status, write_capsule, write_config
from tests.natsserver import NatsServers, wait_for
from tests.test_gitops_follow import CONFIG, capsule
from tests.test_gitsource import Repo

BROKEN = CONFIG + "  gone:\n    path: caps/gone\n"  # a capsule folder the revision lacks


def source_of(repo: Repo) -> str:
    return f"git+{repo.url}#main:config.yaml"


def new_repo(root: Path, value: int = 1) -> tuple[Repo, str]:
    repo = Repo(root)
    return repo, repo.commit({"config.yaml": CONFIG, **capsule("caps/ver", value)})


async def serving(urls: str, value: int, hosts: Hosts | None = None) -> None:
    """Until a call of `ver` answers `value` (a host may not serve it yet: retried)."""

    async def answers() -> bool:
        try:
            output, _ = await call(urls, "ver", timeout=2.0)
        except Exception:
            return False
        return output == str(value).encode()

    try:
        await wait_for(answers, f"ver answering {value}", deadline=40.0)
    except AssertionError:
        raise AssertionError(f"ver never answered {value}\n{hosts.logs() if hosts else ''}") from None


def git_of(status: dict[str, Any]) -> dict[str, Any]:
    return status.get("git") or {}


def follow(urls: str, repo: Repo, *extra: str) -> Any:
    done = orch("apply", source_of(repo), "--lattice", urls, "--follow", *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# -- end to end, with real hosts ----------------------------------------------------------
async def test_new_commits_serve_without_another_apply_and_a_broken_one_is_rejected(
    tmp_path: Path, nats_server: NatsServers, hosts: Hosts
) -> None:
    urls = nats_server.urls
    repo, first = new_repo(tmp_path / "repo")
    hosts.start("h1")
    hosts.start("h2")
    applied = follow(urls, repo, "--interval", "1")
    assert f"{source_of(repo)}: revision {first[:12]}: valid" in applied.stdout
    assert f"following {source_of(repo)} every 1 s" in applied.stdout
    await serving(urls, 1, hosts)

    second = repo.commit(capsule("caps/ver", 2))  # no apply: the lease holder fetches it
    await serving(urls, 2, hosts)
    status = await wait_status(urls, lambda s: git_of(s).get("applied_revision") == second, "second applied")
    assert status["desired"]["source"] == f"{source_of(repo)} @ {second[:12]}"
    assert git_of(status)["host"] in ("h1", "h2") and git_of(status)["rejected"] is None

    third = repo.commit({"config.yaml": BROKEN})
    status = await wait_status(
        urls, lambda s: (git_of(s).get("rejected") or {}).get("revision") == third, "third rejected", hosts=hosts
    )
    rejected = git_of(status)["rejected"]
    assert rejected["count"] >= 1 and any("caps/gone" in p for p in rejected["problems"])
    assert git_of(status)["applied_revision"] == second
    assert status["desired"]["source"].endswith(second[:12])  # nothing published
    assert (await call(urls, "ver"))[0] == b"2"  # the last good revision keeps serving
    text = orch("status", "--lattice", urls)
    assert text.returncode == 0, text.stderr
    head = text.stdout.splitlines()[0]
    assert f"following {source_of(repo)} @ {second[:12]} (every 1 s)" in head
    assert f"rejected {third[:12]}: {rejected['count']} problem(s)" in text.stdout
    assert "caps/gone" in text.stdout

    fourth = repo.commit({"config.yaml": CONFIG, **capsule("caps/ver", 4)})
    await serving(urls, 4, hosts)
    status = await wait_status(urls, lambda s: git_of(s).get("applied_revision") == fourth, "the fix applied")
    assert git_of(status)["rejected"] is None
    shown = json.loads(orch("status", "--lattice", urls, "--json").stdout)
    assert shown["git"]["applied_revision"] == fourth and shown["git"]["source"] == source_of(repo)
    assert {"hosts", "capsules", "desired", "scheduler", "assignments_revision", "problems"} <= set(shown)


async def test_reconcile_fetches_at_once_and_an_apply_without_follow_ends_following(
    tmp_path: Path, nats_server: NatsServers, hosts: Hosts
) -> None:
    urls = nats_server.urls
    repo, _ = new_repo(tmp_path / "repo")
    hosts.start("h1")
    nothing = orch("reconcile", "--lattice", urls)
    assert nothing.returncode == 1 and "not following a branch" in nothing.stderr
    follow(urls, repo, "--interval", "3600")  # only reconcile fetches in this test
    await serving(urls, 1, hosts)

    second = repo.commit(capsule("caps/ver", 2))
    done = orch("reconcile", "--lattice", urls)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{source_of(repo)}: revision {second[:12]} published as desired revision" in done.stdout
    await serving(urls, 2, hosts)
    again = orch("reconcile", "--lattice", urls)
    assert again.returncode == 0 and f"revision {second[:12]} is applied" in again.stdout
    readme = repo.commit({"README.md": "nothing that runs"})
    same = orch("reconcile", "--lattice", urls)
    assert same.returncode == 0 and f"revision {readme[:12]} is applied (it changes nothing" in same.stdout

    moved = repo.bare.with_name("moved.git")
    repo.bare.rename(moved)  # the repository is away: a fetch fails, nothing changes
    failed = orch("reconcile", "--lattice", urls)
    assert failed.returncode == 1 and "fetch failed: cannot fetch" in failed.stderr, failed.stderr
    shown = orch("status", "--lattice", urls)
    assert "fetch failed: cannot fetch" in shown.stdout and (await call(urls, "ver"))[0] == b"2"
    moved.rename(repo.bare)

    broken = repo.commit({"config.yaml": BROKEN})
    refused = orch("reconcile", "--lattice", urls)
    assert refused.returncode == 1
    assert f"revision {broken[:12]} is rejected" in refused.stderr and "caps/gone" in refused.stderr
    assert f"the applied revision ({readme[:12]}) keeps running" in refused.stderr
    assert "fetch failed" not in orch("status", "--lattice", urls).stdout  # the fetch works again
    assert (await call(urls, "ver"))[0] == b"2"

    local = tmp_path / "local"
    write_capsule(local / "caps" / "ver", 7)
    ended = apply(write_config(local, {"ver": {"path": "caps/ver"}}), urls)
    assert ended.returncode == 0, ended.stderr
    assert f"no longer following {source_of(repo)}" in ended.stdout
    await serving(urls, 7, hosts)
    status = await lattice_status(LatticeAddress.parse(urls))
    assert status["git"] is None and not any("follow" in p for p in status["problems"])

    repo.commit(capsule("caps/ver", 8))
    after = orch("reconcile", "--lattice", urls)
    assert after.returncode == 1 and "not following a branch" in after.stderr
    assert (await call(urls, "ver"))[0] == b"7"
    again_ended = apply(local / "config.yaml", urls)
    assert "no longer following" not in again_ended.stdout


async def test_the_next_lease_holder_carries_on_without_publishing_again(
    tmp_path: Path, nats_server: NatsServers, hosts: Hosts
) -> None:
    urls = nats_server.urls
    repo, _ = new_repo(tmp_path / "repo")
    hosts.start("h1")
    hosts.start("h2")
    follow(urls, repo, "--interval", "1")
    second = repo.commit(capsule("caps/ver", 2))
    await serving(urls, 2, hosts)
    status = await wait_status(
        urls,
        lambda s: git_of(s).get("applied_revision") == second and git_of(s).get("host") == s["scheduler"],
        "the holder recorded the second revision",
        hosts=hosts,
    )
    holder, revision, applied_at = (
        status["scheduler"],
        status["desired"]["revision"],
        git_of(status)["applied_at_ms"],
    )
    hosts.all[holder].kill()
    killed_ms = int(time.time() * 1000)
    other = next(h for h in hosts.all if h != holder)
    status = await wait_status(
        urls,
        lambda s: (
            s["scheduler"] == other
            and git_of(s).get("host") == other
            and (git_of(s).get("fetched_at_ms") or 0) > killed_ms
        ),
        "the next holder fetched",
        hosts=hosts,
    )
    assert status["desired"]["revision"] == revision  # the applied revision was not published again,
    assert git_of(status)["applied_revision"] == second and git_of(status)["applied_at_ms"] == applied_at  # nor read

    third = repo.commit(capsule("caps/ver", 3))
    await serving(urls, 3, hosts)
    status = await wait_status(urls, lambda s: git_of(s).get("applied_revision") == third, "third applied")
    assert git_of(status)["host"] == other and status["desired"]["revision"] > revision


HOSTILE_RECORDS: list[bytes] = [
    b"not json",
    b"[]",
    b"[" * 5000 + b"]" * 5000,
    b"x" * (MAX_RECORD_BYTES + 1),
    json.dumps({"format": 1, "source": "git+file:///r.git#main", "interval_s": 5, "by": "x"}).encode(),
    json.dumps({"format": 2, "source": "git+file:///r.git#main", "interval_s": 5, "by": "x", "at_ms": 1}).encode(),
    json.dumps({"format": 1, "source": 7, "interval_s": 5, "by": "x", "at_ms": 1}).encode(),
    json.dumps({"format": 1, "source": "git+--upload-pack=evil#main", "interval_s": 5, "by": "x", "at_ms": 1}).encode(),
    json.dumps({"format": 1, "source": "git+file:///r.git#main", "interval_s": 0, "by": "x", "at_ms": 1}).encode(),
    json.dumps({"format": 1, "source": "git+file:///r.git#main", "interval_s": True, "by": "x", "at_ms": 1}).encode(),
    json.dumps(
        {"format": 1, "source": "git+file:///r.git#main", "interval_s": math.nan, "by": "x", "at_ms": 1}
    ).encode(),
    json.dumps(
        {"format": 1, "source": "git+file:///r.git#main", "interval_s": 5, "by": "x" * 300, "at_ms": 1}
    ).encode(),
    json.dumps({"format": 1, "source": "git+file:///r.git#main", "interval_s": 5, "by": "x", "at_ms": -1}).encode(),
    json.dumps(
        {"format": 1, "source": "git+file:///" + "a" * 5000 + "#main", "interval_s": 5, "by": "", "at_ms": 1}
    ).encode(),
]


async def test_hostile_follow_records_are_refused_in_one_line_and_hosts_keep_serving(
    tmp_path: Path, nats_server: NatsServers, hosts: Hosts
) -> None:
    urls = nats_server.urls
    repo, _ = new_repo(tmp_path / "repo")
    marker = tmp_path / "pwned"
    transport = f"git+ext::sh -c touch% {marker}#main"
    hostile = [
        *HOSTILE_RECORDS,
        json.dumps({"format": 1, "source": transport, "interval_s": 1, "by": "x", "at_ms": 1}).encode(),
    ]
    lattice = await Lattice.connect(LatticeAddress.parse(urls))
    try:
        host = hosts.start("h1")
        local = tmp_path / "local"
        write_capsule(local / "caps" / "ver", 5)
        assert apply(write_config(local, {"ver": {"path": "caps/ver"}}), urls).returncode == 0
        await serving(urls, 5, hosts)
        bucket = await desired_bucket(lattice)
        for data in hostile:
            await bucket.put(RECORD_KEY, data)
            status = await lattice_status(LatticeAddress.parse(urls))
            lines = [p for p in status["problems"] if "is not a follow record" in p]
            assert len(lines) == 1 and "\n" not in lines[0] and status["git"] is None, (data[:80], status["problems"])
            assert "evil" not in lines[0] and "touch" not in lines[0]  # the value is not echoed
            answer = orch("reconcile", "--lattice", urls)
            assert answer.returncode == 1 and "is not a follow record" in answer.stderr
            assert len(answer.stderr.strip().splitlines()) == 1
        await wait_for(lambda: "is not a follow record" in host.log(), "the holder refusing the record")
        assert host.alive and (await call(urls, "ver"))[0] == b"5"
        assert not marker.exists()

        follow(urls, repo, "--interval", "3600")  # a good record again: followed
        await serving(urls, 1, hosts)
        await wait_status(urls, lambda s: git_of(s).get("host") == "h1", "the holder's first status", hosts=hosts)
        await (await status_bucket(lattice)).put(STATUS_KEY, b'{"source": 1}')  # (no fetch is due for an hour)
        status = await lattice_status(LatticeAddress.parse(urls))
        assert any("is not a follow status" in p for p in status["problems"])
        assert status["git"]["source"] == source_of(repo) and status["git"]["applied_revision"] is None
        fixed = orch("reconcile", "--lattice", urls)  # the holder writes a good status over it
        assert fixed.returncode == 0, fixed.stderr
        _, written, problem = await read_status(lattice)
        assert problem is None and written is not None and written["host"] == "h1"
        assert host.alive and not marker.exists()
    finally:
        await lattice.close()


# -- the follower in process ----------------------------------------------------------------
async def test_a_follower_that_lost_the_lease_publishes_nothing_and_a_recorded_publish_is_not_redone(
    tmp_path: Path, nats_server: NatsServers
) -> None:
    urls = nats_server.urls
    repo, first = new_repo(tmp_path / "repo")
    plain = orch("apply", source_of(repo), "--lattice", urls)  # published, never recorded as followed
    assert plain.returncode == 0, plain.stderr
    lattice = await Lattice.connect(LatticeAddress.parse(urls))
    fenced: list[bool] = []

    async def fence() -> bool:
        fenced.append(True)
        return len(fenced) > 1  # the first publish finds the lease lost

    try:
        record = FollowRecord(source_of(repo), 3600.0, "test", 1)
        await write_record(lattice, record)  # as if a holder died before recording what it published
        before = await current(lattice)
        assert before is not None
        follower = LatticeFollower(
            lattice=lattice, host_id="p1", state_dir=tmp_path / "state", workspace=tmp_path / "ws", fence=fence
        )
        assert (await follower.tick()).outcome == "not-holder"
        follower.lease_changed(True)
        outcome = await follower.tick()
        assert outcome.outcome == "applied" and outcome.revision == before.revision, outcome
        assert outcome.git is not None and outcome.git["applied_revision"] == first and not fenced

        second = repo.commit(capsule("caps/ver", 2))
        lost = await follower.tick()
        assert lost.outcome == "not-holder" and fenced == [True]
        assert (await current(lattice)).revision == before.revision  # type: ignore[union-attr]
        follower.lease_changed(True)
        published = await follower.tick()
        now = await current(lattice)
        assert now is not None and now.source == f"{source_of(repo)} @ {second[:12]}"
        assert published.outcome == "published" and published.revision == now.revision > before.revision
        _, status, _ = await read_status(lattice)
        assert status is not None and status["applied_revision"] == second and status["host"] == "p1"
        with pytest.raises(LatticeError, match="no host holds the scheduler lease"):
            await request_reconcile(lattice)  # nobody serves the subject: a clear error, not a hang
    finally:
        await lattice.close()


# -- records, parsed (no server) ------------------------------------------------------------
GOOD = {"format": 1, "source": "git+file:///srv/r.git#main:config.yaml", "interval_s": 30.0, "by": "a@b", "at_ms": 5}


def test_a_record_round_trips() -> None:
    record = FollowRecord.parse(json.dumps(GOOD).encode(), revision=3, where="b.follow")
    assert (record.source, record.interval_s, record.by, record.at_ms, record.revision) == (
        GOOD["source"],
        30.0,
        "a@b",
        5,
        3,
    )
    assert FollowRecord.parse(record.to_bytes(), revision=3, where="b.follow") == record


@pytest.mark.parametrize("data", HOSTILE_RECORDS, ids=range(len(HOSTILE_RECORDS)))
def test_hostile_records_are_refused_in_one_line_naming_the_key(data: bytes) -> None:
    with pytest.raises(LatticeDataError) as refused:
        FollowRecord.parse(data, revision=9, where="orch_x_desired.follow")
    message = str(refused.value)
    assert message.startswith("orch_x_desired.follow (revision 9) is not a follow record: ")
    assert "\n" not in message and "evil" not in message and len(message) < 600


@pytest.mark.parametrize(
    "source",
    [
        "git+ext::sh -c id#main",
        "git+fd::17#main",
        "git+file:///r.git#main:\x1b[2Jconfig.yaml",
        "git+file:///r.git#main:../up.yaml",
        "file:///r.git#main",
    ],
)
def test_sources_a_host_will_not_fetch(source: str) -> None:
    with pytest.raises(LatticeDataError, match="source is not a git source to follow"):
        FollowRecord.parse(json.dumps({**GOOD, "source": source}).encode(), revision=1, where="k")


STATUS = {
    "source": GOOD["source"],
    "applied_revision": "a" * 40,
    "applied_at_ms": 1,
    "fetched_revision": "b" * 40,
    "fetched_at_ms": 2,
    "rejected": {"revision": "b" * 40, "problems": ["caps/x: missing"], "count": 1, "at_ms": 2},
    "error": None,
    "error_at_ms": None,
    "interval_s": 30.0,
    "host": "h1",
}


@pytest.mark.parametrize(
    "change",
    [
        {"applied_revision": "HEAD"},
        {"applied_revision": 5},
        {"fetched_at_ms": -1},
        {"error": ["x"]},
        {"error": "e" * 10_000},
        {"interval_s": "30"},
        {"rejected": {"revision": "b" * 40}},
        {"rejected": {"revision": "b" * 40, "problems": "x", "count": 1, "at_ms": 2}},
        {"rejected": {"revision": "b" * 40, "problems": ["x"] * 21, "count": 21, "at_ms": 2}},
        {"rejected": {"revision": "nope", "problems": [], "count": 0, "at_ms": 2}},
        {"host": 3},
        {"extra": 1},
    ],
)
def test_hostile_statuses_are_refused(change: dict[str, Any]) -> None:
    assert parse_status(json.dumps(STATUS).encode(), revision=1, where="k") == STATUS
    with pytest.raises(LatticeDataError, match=r"^k \(revision 1\) is not a follow status: "):
        parse_status(json.dumps({**STATUS, **change}).encode(), revision=1, where="k")
    for data in (b"nope", b"[" * 3000 + b"]" * 3000, b"{}", b" " * (600 << 10)):
        with pytest.raises(LatticeDataError):
            parse_status(data, revision=1, where="k")


# -- usage ----------------------------------------------------------------------------------
def test_usage_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, {})
    urls = "nats://127.0.0.1:9"  # never reached: each is refused before connecting
    cases = [
        (("apply", str(config), "--lattice", urls, "--follow"), "--follow: for a git source"),
        (("apply", "git+file:///r.git#main", "--lattice", urls, "--interval", "5"), "--interval: with --follow only"),
        (("apply", "git+file:///r.git#main", "--lattice", urls, "--follow", "--interval", "0"), "between 1 and 86400"),
        (("apply", "git+file:///r.git#main", "--lattice", urls, "--follow", "--interval", "x"), "--interval"),
        (("apply", "git+ext::sh -c id#main", "--lattice", urls, "--follow"), "transport helper"),
        (("reconcile", "--lattice", urls, "--lattice-tls-ca", str(tmp_path / "none.pem")), "no such file"),
    ]
    for argv, complaint in cases:
        done = orch(*argv)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert complaint in done.stderr, (argv, done.stderr)


async def test_an_escalating_commit_on_a_followed_branch_waits_for_an_operator(
    tmp_path: Path, nats_server: NatsServers, hosts: Hosts
) -> None:
    urls = nats_server.urls
    repo = Repo(tmp_path / "repo")
    ask = "version: 1\napprovals: {escalations: ask}\ncapsules:\n  ver:\n    path: caps/ver\n"
    repo.commit({"config.yaml": ask, **capsule("caps/ver", 1)})
    hosts.start("h1")
    follow(urls, repo, "--interval", "3600")  # only reconcile fetches in this test
    await serving(urls, 1, hosts)

    escalating = repo.commit(capsule("caps/ver", 2, extra="\n[capabilities]\nkv = true\n"))
    done = orch("reconcile", "--lattice", urls)
    assert done.returncode == 0, done.stdout + done.stderr
    said = done.stdout
    assert f"revision {escalating[:12]} published as desired revision" in said
    assert "awaiting approval (ver would grant kv)" in said and "orch approve NAME --lattice URL" in said
    assert (await call(urls, "ver"))[0] == b"1"  # the running version keeps serving
    shown = await wait_status(urls, lambda s: s["capsules"][0]["phase"] == "AwaitingApproval", "ver waits")
    assert shown["capsules"][0]["awaiting"]["escalations"] == ["kv"]

    approved = orch("approve", "ver", "--lattice", urls)
    assert approved.returncode == 0, approved.stdout + approved.stderr
    await serving(urls, 2, hosts)
