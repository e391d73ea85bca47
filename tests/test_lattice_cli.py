"""The lattice verbs as processes (orchestrator.cli.lattice): exit codes, what they print,
and what they refuse, against a real nats-server (or none at all)."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.control.statedir import StateDir
from tests.latticehosts import apply, orch, write_capsule, write_config
from tests.natsserver import NatsServers, free_port


def test_apply_publishes_once_and_says_so(tmp_path: Path, nats_server: NatsServers) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver"}})
    first = apply(config, nats_server.urls)
    assert first.returncode == 0, first.stderr
    assert "valid (1 capsules, 1 enabled)" in first.stdout
    assert "applied to lattice default at nats://127.0.0.1:" in first.stdout and "revision" in first.stdout
    again = apply(config, nats_server.urls)
    assert again.returncode == 0 and "unchanged" in again.stdout
    other = apply(config, nats_server.urls, "--lattice-name", "blue")
    assert other.returncode == 0 and "lattice blue" in other.stdout and "2 artifact(s) uploaded" in other.stdout


def test_apply_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver"}})
    nowhere = f"nats://127.0.0.1:{free_port()}"
    unreachable = apply(config, nowhere)
    assert unreachable.returncode == 1
    assert "cannot reach the lattice" in unreachable.stderr and len(unreachable.stderr.strip().splitlines()) == 1
    bad_name = apply(config, nowhere, "--lattice-name", "Not.Valid")
    assert bad_name.returncode == 2 and "lattice name" in bad_name.stderr
    no_url = orch("apply", str(config))
    assert no_url.returncode == 2 and "--lattice" in no_url.stderr
    invalid = write_config(tmp_path, {"ver": {"path": "ver", "instances": 0}})
    refused = apply(invalid, nowhere)  # validation first: the lattice is not even asked
    assert refused.returncode == 1 and "instances" in refused.stderr and "nothing was published" in refused.stderr


def test_plan_against_the_lattice(tmp_path: Path, nats_server: NatsServers) -> None:
    write_capsule(tmp_path / "ver", 1)
    config = write_config(tmp_path, {"ver": {"path": "ver"}})
    empty = orch("plan", str(config), "--lattice", nats_server.urls, "--json", "--exit-code")
    assert empty.returncode == 2, empty.stderr
    assert json.loads(empty.stdout) == {
        "actions": [{"capsule": "ver", "action": "start", "reasons": ["new"], "escalations": []}],
        "revision": 0,
    }
    assert apply(config, nats_server.urls).returncode == 0
    same = orch("plan", str(config), "--lattice", nats_server.urls, "--exit-code")
    assert same.returncode == 0 and "no changes" in same.stdout
    write_config(tmp_path, {"ver": {"path": "ver", "limits": {"fuel": 5000}}})
    changed = orch("plan", str(config), "--lattice", nats_server.urls, "--json", "--exit-code")
    assert changed.returncode == 2
    (action,) = json.loads(changed.stdout)["actions"]
    assert action["action"] == "reload" and any("limits.fuel" in r for r in action["reasons"])


def test_status_of_a_lattice(tmp_path: Path, nats_server: NatsServers) -> None:
    nothing = orch("status", "--lattice", nats_server.urls)
    assert nothing.returncode == 0 and "nothing applied yet" in nothing.stdout
    write_capsule(tmp_path / "ver", 1)
    assert apply(write_config(tmp_path, {"ver": {"path": "ver"}}), nats_server.urls).returncode == 0
    shown = orch("status", "--lattice", nats_server.urls, "--json")
    assert shown.returncode == 0
    status = json.loads(shown.stdout)
    assert {"hosts", "capsules", "desired", "scheduler", "problems"} <= set(status)
    (ver,) = status["capsules"]
    assert ver["name"] == "ver" and ver["phase"] == "Pending" and ver["hosts"] == []
    table = orch("status", "--lattice", nats_server.urls)
    assert "CAPSULE" in table.stdout and "ver" in table.stdout and "Pending" in table.stdout
    down = orch("status", "--lattice", f"nats://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "cannot reach the lattice" in down.stderr


def test_host_refuses_bad_options_a_busy_state_dir_and_an_absent_lattice(
    tmp_path: Path, nats_server: NatsServers
) -> None:
    url = nats_server.urls
    label = orch("host", "--lattice", url, "--label", "no-equals", "--state-dir", str(tmp_path / "s"))
    assert label.returncode == 2 and "KEY=VALUE" in label.stderr
    host_id = orch("host", "--lattice", url, "--host-id", "a.b", "--state-dir", str(tmp_path / "s"))
    assert host_id.returncode == 2 and "host id" in host_id.stderr
    with StateDir.open(tmp_path / "busy"):
        busy = orch("host", "--lattice", url, "--state-dir", str(tmp_path / "busy"))
    assert busy.returncode == 1 and "in use by another orchestrator" in busy.stderr
    away = orch("host", "--lattice", f"nats://127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "s"))
    assert away.returncode == 1 and "cannot reach the lattice" in away.stderr


def test_apply_a_git_revision(tmp_path: Path, nats_server: NatsServers) -> None:
    from tests.test_gitops_follow import CONFIG, capsule
    from tests.test_gitsource import Repo

    repo = Repo(tmp_path / "origin")
    first = repo.commit({"config.yaml": CONFIG, **capsule("caps/ver", 1)})
    applied = orch("apply", f"git+{repo.url}#main:config.yaml", "--lattice", nats_server.urls)
    assert applied.returncode == 0, applied.stderr
    assert f"revision {first[:12]}: valid (1 capsules" in applied.stdout and "applied to lattice" in applied.stdout
    desired = json.loads(orch("status", "--lattice", nats_server.urls, "--json").stdout)["desired"]
    assert desired["source"] == f"git+{repo.url}#main:config.yaml @ {first[:12]}"

    bad = repo.commit({"config.yaml": "version: 1\ncapsules:\n  ver:\n    path: caps/nowhere\n"})
    refused = orch("apply", f"git+{repo.url}#main", "--lattice", nats_server.urls)
    assert refused.returncode == 1 and f"{bad[:12]}:config.yaml" in refused.stderr, refused.stderr
    assert "caps/nowhere" in refused.stderr and "nothing was published" in refused.stderr
    after = json.loads(orch("status", "--lattice", nats_server.urls, "--json").stdout)["desired"]
    assert after["revision"] == desired["revision"] and after["source"] == desired["source"]

    planned = orch("plan", f"git+{repo.url}#{first}", "--lattice", nats_server.urls, "--exit-code")
    assert planned.returncode == 0 and "no changes" in planned.stdout, planned.stderr
    pinned = orch("apply", f"git+{repo.url}#{first}", "--lattice", nats_server.urls)
    assert pinned.returncode == 0 and "unchanged" in pinned.stdout, pinned.stderr
    missing = orch("apply", f"git+file://{tmp_path}/missing.git#main", "--lattice", nats_server.urls)
    assert missing.returncode == 1 and "cannot fetch" in missing.stderr
    usage = orch("apply", "git+file:///r.git#main:../up.yaml", "--lattice", nats_server.urls)
    assert usage.returncode == 2 and "without '..'" in usage.stderr
