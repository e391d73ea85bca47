"""Following a git branch with the `orch` command, as separate processes: `orch up
git+URL#BRANCH:PATH` on a real bare repository, the operator verbs finding its state dir
(`--state-dir`, or ./.orch), `orch reconcile` fetching at once, `orch plan git+...
--exit-code` (0 / 2 / 1), `orch validate git+...`, usage errors, and `orch schema`."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from orchestrator.desired.config import parse_config
from orchestrator.desired.manifest import parse_manifest
from orchestrator.errors import ConfigError, ManifestError
from tests.processes import REPO, orch, status_over, stop_up, wait_serving
from tests.test_gitops_follow import CONFIG, capsule
from tests.test_gitsource import Repo


def spawn(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "up", *args, "--log-format", "json"],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def text(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode()


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    repo = Repo(tmp_path)
    repo.commit({"config.yaml": CONFIG, **capsule("caps/ver", 1)})
    return repo


def test_orch_up_follows_a_branch_and_the_operator_verbs_find_it(tmp_path: Path, repo: Repo) -> None:
    run = tmp_path / "run"
    (run / "ws").mkdir(parents=True)
    source = f"git+{repo.url}#main:config.yaml"
    log = tmp_path / "up.log"
    process = spawn([source, "--state-dir", "st", "--workspace", "ws", "--interval", "3600"], run, log)
    try:
        wait_serving(process, run / "st" / "orch.sock", log)
        first = repo.git("rev-parse", "HEAD")
        status = orch("status", "--state-dir", "st", cwd=run)
        assert status.returncode == 0, text(status)
        assert status.stdout.decode().splitlines()[0].startswith(f"{source} @ {first[:12]}")
        assert orch("call", "ver", "version", "--state-dir", "st", cwd=run).stdout == b"1"

        second = repo.commit(capsule("caps/ver", 2))  # fetched at once by `orch reconcile`
        reconciled = orch("reconcile", "--state-dir", "st", cwd=run)
        assert reconciled.returncode == 0 and "ver" in reconciled.stdout.decode() and "reload" in text(reconciled)
        assert orch("call", "ver", "version", "--state-dir", "st", cwd=run).stdout == b"2"
        git = status_over(run / "st" / "orch.sock")["orchestrator"]["git"]
        assert git["applied_revision"] == git["fetched_revision"] == second

        bad = repo.commit({"config.yaml": CONFIG + "    bogus: 1\n"})
        refused = orch("reconcile", "--state-dir", "st", cwd=run)
        assert refused.returncode == 1 and "bogus" in text(refused)
        status = orch("status", "--state-dir", "st", cwd=run)
        out = status.stdout.decode()
        assert f"rejected {bad[:12]}: 1 problem(s)" in out and f"{bad[:12]}:config.yaml:" in out
        assert f"fetched {bad[:12]} (applied: {second[:12]})" in out
        info = json.loads(orch("status", "--json", "--state-dir", "st", cwd=run).stdout)["orchestrator"]
        assert info["git"]["rejected"]["revision"] == bad and info["desired"]["rejected"]["revision"] == bad
        assert orch("call", "ver", "version", "--state-dir", "st", cwd=run).stdout == b"2"  # the last good serves

        assert info["state_dir"] == str(run / "st") and (run / "st" / "git" / "checkouts" / second).is_dir()

        # The history names the commit each version came from; the state-dir verbs find it too.
        history = orch("history", "ver", "--json", "--state-dir", "st", cwd=run)
        assert history.returncode == 0, text(history)
        entries = json.loads(history.stdout)["entries"]
        newest_first = [("reload", second[:12]), ("start", first[:12])]
        assert [(e["event"], e["revision"]) for e in entries] == newest_first
        rolled = orch("rollback", "ver", "--state-dir", "st", cwd=run)
        assert rolled.returncode == 0, text(rolled)
        assert orch("call", "ver", "version", "--state-dir", "st", cwd=run).stdout == b"1"
        assert orch("unpin", "ver", "--state-dir", "st", cwd=run).returncode == 0
        assert orch("call", "ver", "version", "--state-dir", "st", cwd=run).stdout == b"2"
    finally:
        stop_up(process)
    assert process.returncode == 0, log.read_text()[-2000:]
    assert json.loads((run / "st" / "applied.json").read_text())["git"]["applied_revision"] == second


def test_the_default_state_dir_is_dot_orch_and_the_verbs_find_it(tmp_path: Path, repo: Repo) -> None:
    run = tmp_path / "run"
    run.mkdir()
    log = tmp_path / "up.log"
    process = spawn([f"git+{repo.url}#main"], run, log)
    try:
        wait_serving(process, run / ".orch" / "orch.sock", log)
        assert orch("call", "ver", "version", cwd=run).stdout == b"1"  # no config.yaml here: ./.orch
        assert json.loads(orch("status", "--json", cwd=run).stdout)["orchestrator"]["git"]["interval_s"] == 30
        subprocess.run(["git", "-C", str(repo.bare), "branch", "-q", "-m", "main", "gone"], check=True)
        failed = orch("reconcile", cwd=run)  # the API answers 502: the repository, not the orchestrator
        assert failed.returncode == 1 and "cannot fetch" in text(failed) and "(main)" in text(failed)
        git = json.loads(orch("status", "--json", cwd=run).stdout)["orchestrator"]["git"]
        assert "cannot fetch" in git["error"] and orch("call", "ver", "version", cwd=run).stdout == b"1"
    finally:
        stop_up(process)
    assert process.returncode == 0


def test_orch_plan_against_a_git_revision(tmp_path: Path, repo: Repo) -> None:
    run = tmp_path / "run"
    run.mkdir()
    first = repo.git("rev-parse", "HEAD")
    log = tmp_path / "up.log"
    process = spawn([f"git+{repo.url}#main", "--interval", "3600"], run, log)
    try:
        wait_serving(process, run / ".orch" / "orch.sock", log)
    finally:
        stop_up(process)  # then against applied.json
    second = repo.commit(capsule("caps/ver", 2))
    bad = repo.commit({"config.yaml": "version: 1\ncapsules:\n  ver:\n    path: caps/nowhere\n"})

    same = orch("plan", f"git+{repo.url}#{first}:config.yaml", "--exit-code", cwd=run)
    assert same.returncode == 0 and "no changes" in same.stdout.decode(), text(same)
    assert f"(revision {first[:12]})" in same.stdout.decode() and "applied.json" in same.stdout.decode()
    changed = orch("plan", f"git+{repo.url}#{second}", "--exit-code", "--json", cwd=run)
    assert changed.returncode == 2, text(changed)
    answer = json.loads(changed.stdout)
    assert answer["revision"] == second and answer["against"]["source"] == "applied"
    assert [(a["capsule"], a["action"]) for a in answer["actions"]] == [("ver", "reload")]
    broken = orch("plan", f"git+{repo.url}#main", "--exit-code", cwd=run)
    assert broken.returncode == 1 and f"{bad[:12]}:config.yaml" in text(broken) and "caps/nowhere" in text(broken)
    unreachable = orch("plan", f"git+file://{tmp_path}/missing.git#main", "--exit-code", cwd=run)
    assert unreachable.returncode == 1 and "cannot fetch" in text(unreachable)
    elsewhere = orch("plan", f"git+{repo.url}#{first}", "--exit-code", "--state-dir", str(tmp_path / "new"), cwd=run)
    assert elsewhere.returncode == 2 and "nothing applied yet" in text(elsewhere)  # every capsule a start

    valid = orch("validate", f"git+{repo.url}#{second}", cwd=run)
    assert valid.returncode == 0 and f"revision {second[:12]} valid" in valid.stdout.decode()
    invalid = orch("validate", f"git+{repo.url}#main", cwd=run)
    assert invalid.returncode == 1 and "caps/nowhere" in text(invalid)


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["config.yaml", "--state-dir", "st"], 2, "--state-dir: for a git source"),
        (["config.yaml", "--interval", "5", "--allow-builds"], 2, "--interval, --allow-builds"),
        (["git+file:///srv/deploy.git"], 2, "names no branch"),
        (["git+file:///r.git#--upload-pack=x"], 2, "not a branch"),
        (["git+file:///r.git#main:../up.yaml"], 2, "without '..'"),
        (["git+file:///r.git#main", "--interval", "0"], 2, "between 0.05 and 86400"),
        (["git+file:///r.git#main", "--interval", "nan"], 2, "between 0.05 and 86400"),
        (["git+file:///r.git#main", "--workspace", "nowhere"], 2, "--workspace nowhere: no such folder"),
    ],
)
def test_orch_up_usage_errors(tmp_path: Path, args: list[str], code: int, says: str) -> None:
    result = orch("up", *args, cwd=tmp_path, timeout=30)
    assert result.returncode == code and says in text(result), text(result)


def test_orch_up_on_an_unusable_branch_starts_nothing(tmp_path: Path, repo: Repo) -> None:
    missing = orch("up", f"git+file://{tmp_path}/missing.git#main", cwd=tmp_path, timeout=60)
    assert missing.returncode == 1 and "cannot fetch" in text(missing)
    bad = repo.commit({"config.yaml": CONFIG + "    bogus: 1\n"})
    rejected = orch("up", f"git+{repo.url}#main", "--state-dir", "other", cwd=tmp_path, timeout=60)
    assert rejected.returncode == 1, text(rejected)
    assert f"revision {bad[:12]} is rejected, 1 problem(s); nothing started" in text(rejected)
    assert f"{bad[:12]}:config.yaml:5: capsules.ver.bogus" in text(rejected)


# -- orch schema --------------------------------------------------------------------------------------
def schemas() -> dict[str, Any]:
    result = orch("schema")
    assert result.returncode == 0, text(result)
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def test_orch_schema_validates_the_files_the_orchestrator_accepts() -> None:
    both = schemas()
    assert set(both) == {"config", "manifest"}
    assert json.loads(orch("schema", "--config").stdout) == both["config"]
    assert json.loads(orch("schema", "--manifest").stdout) == both["manifest"]
    for schema in both.values():
        Draft7Validator.check_schema(schema)
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
        assert "$defs" not in json.dumps(schema)  # draft 7: `definitions`, for editors' validators
    config, manifest = Draft7Validator(both["config"]), Draft7Validator(both["manifest"])
    templates = REPO / "orchestrator" / "cli" / "templates" / "capsule"
    for path in (REPO / "config.yaml", templates / "config.yaml"):
        assert not list(config.iter_errors(yaml.safe_load(path.read_text().replace("{{name}}", "hello")))), path
    for name in [*glob.glob(str(REPO / "capsules" / "*" / "Capsule.toml")), str(templates / "Capsule.toml")]:
        data = tomllib.loads(Path(name).read_text().replace("{{name}}", "hello"))
        assert not list(manifest.iter_errors(data)), name
    # what the loader accepts written empty is accepted by the schema too
    assert not list(
        config.iter_errors({"version": 1, "defaults": None, "capsules": {"a": {"path": "x", "config": None}}})
    )


@pytest.mark.parametrize(
    ("which", "document"),
    [
        ("config", {"version": 2}),
        ("config", {"version": 1, "capsules": {"a": {"path": "x", "pth": "y"}}}),
        ("config", {"version": 1, "capsules": {"Bad_Name": {"path": "x"}}}),
        ("config", {"version": 1, "capsules": {"a": {"path": "x", "instances": 0}}}),
        ("config", {"version": 1, "defaults": {"limits": {"fuel": 0}}}),
        ("config", {"version": 1, "capsules": {"a": {"path": "x", "enabled": "yes"}}}),
        ("manifest", {"package": {"name": "x", "version": "1.0.0"}}),  # no [[component]]
        ("manifest", {"package": {"name": "x", "version": "1"}, "component": [{"file": "x.wasm"}]}),
        (
            "manifest",
            {"package": {"name": "x", "version": "1.0.0"}, "component": [{"file": "x.wasm"}], "tools": {"name": "t"}},
        ),
        ("manifest", {"package": {"name": "x", "version": "1.0.0"}, "component": [{"file": "x.wasm"}], "tool": [{}]}),
    ],
)
def test_orch_schema_refuses_what_the_loader_refuses(
    tmp_path: Path, schemas_once: dict[str, Any], which: str, document: dict[str, Any]
) -> None:
    validator = Draft7Validator(schemas_once[which])
    assert list(validator.iter_errors(document)), document
    with pytest.raises((ConfigError, ManifestError)):  # and the loader agrees
        if which == "config":
            parse_config(json.dumps(document), path=tmp_path / "config.yaml")
        else:
            parse_manifest(tomli_w(document))


def tomli_w(document: dict[str, Any]) -> str:
    """Just enough TOML for these documents: tables and arrays of tables of scalars."""
    lines: list[str] = []
    for key, value in document.items():
        for entry in value if isinstance(value, list) else [value]:
            lines.append(f"[[{key}]]" if isinstance(value, list) else f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def schemas_once() -> dict[str, Any]:
    return schemas()


def test_orch_schema_takes_one_of_its_options(tmp_path: Path) -> None:
    result = orch("schema", "--config", "--manifest", cwd=tmp_path)
    assert result.returncode == 2 and "not allowed with" in text(result)
