"""`orch new capsule NAME [--dir DIR]`: a capsule folder that works anywhere, with no edits.

- Refusals: an invalid name, a target that exists and is not an empty folder; one line,
  nothing written, no staging folder left behind.
- The folder: the files it promises, a valid manifest with a dev `[build]`, the exact tool
  versions (and lock) of the repository's examples, the SDK identical to capsules/sdk, and
  nothing that points into the repository.
- End to end: `npm install` from the registry (or npm's cache) and `npm run build` in a
  scaffolded folder, then `orch capsule check` and `orch capsule call`; and the manifest's
  own dev build command, then `orch up` in the folder with a save that is rebuilt and served.

The verb is registered through `scaffold.add_commands`, as the `orch` parser does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from orchestrator.api.client import Client, socket_for
from orchestrator.cli import scaffold
from orchestrator.desired.manifest import load_manifest
from tests.conftest import CAPSULES
from tests.processes import orch
from tests.test_devloop import BUILD_SECONDS, Up, link_tools, live_events, next_event, run

FILES = {
    ".gitignore",
    "Capsule.toml",
    "README.md",
    "config.yaml",
    "package.json",
    "package-lock.json",
    "assembly/index.ts",
    "assembly/tsconfig.json",
    *(f"sdk/{p.name}" for p in (CAPSULES / "sdk").iterdir()),
}


def new(*arguments: str) -> int:
    """`orch new ...` through the parser the verb registers."""
    parser = argparse.ArgumentParser(prog="orch")
    scaffold.add_commands(parser.add_subparsers())
    args = parser.parse_args(["new", *arguments])
    return int(args.run(args))


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "Hello", "hello_world", "-hello", "hello-", "a" * 65, "../x", "x/y", "hé", "a b", "x\n", ".", "a.b"],
)
def test_an_invalid_name_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert new("capsule", "--", name) == 2  # "--": so that "-hello" reaches the check
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("orch: invalid capsule name ")
    assert "lowercase letters, digits and '-'" in err and "at most 64" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "0", "a" * 64, "order-tracker", "x-1-y"])
def test_valid_names_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert new("capsule", name) == 0
    assert load_manifest(tmp_path / name).package.name == name
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no staging folder left


def test_a_folder_that_is_not_empty_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert new("capsule", "hello", "--dir", str(target)) == 1
    err = capsys.readouterr().err
    assert err == f"orch: {target} exists and is not empty: choose another --dir (nothing was written)\n"
    assert files(target) == {"notes.txt"} and (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_target_that_is_not_a_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("a file")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    assert new("capsule", "hello", "--dir", str(target)) == 1
    assert capsys.readouterr().err == f"orch: {target} exists and is not a folder: choose another --dir\n"
    assert not (tmp_path / "elsewhere" / "Capsule.toml").exists()


def test_an_empty_folder_is_filled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    assert new("capsule", "hello", "--dir", str(target)) == 0
    assert files(target) == FILES
    out = capsys.readouterr().out
    assert out.startswith(f"created capsule hello in {target} ({len(FILES)} files). Next:\n")
    assert "npm install && npm run build" in out and "orch capsule check ." in out
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_missing_parent_folders_are_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "hello"
    assert new("capsule", "hello", "--dir", str(target)) == 0
    assert files(target) == FILES


def test_a_parent_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "sub" / "hello"
    assert new("capsule", "hello", "--dir", str(target)) == 1
    assert capsys.readouterr().err == f"orch: cannot create {target}: Not a directory\n"
    assert (tmp_path / "a-file").read_text() == "not a folder"


# -- what it writes ---------------------------------------------------------------------------


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    target = tmp_path / "hello"
    assert new("capsule", "hello", "--dir", str(target)) == 0
    return target


def test_the_folder_holds_a_valid_capsule_with_a_dev_build(hello: Path) -> None:
    assert files(hello) == FILES
    manifest = load_manifest(hello)
    assert manifest.package.name == "hello"
    assert manifest.component.file == "hello.wasm"
    assert [t.name for t in manifest.tools] == ["greet"]
    assert manifest.build is not None
    assert manifest.build.command == "node sdk/build.mjs --dev"
    assert "assembly/**/*.ts" in manifest.build.watch
    assert manifest.capabilities.kv and manifest.capabilities.ipc_publish == ["hello.greeted"]
    package = json.loads((hello / "package.json").read_text())
    assert package["scripts"] == {"build": "node sdk/build.mjs --release", "dev": "node sdk/build.mjs --dev"}
    for path in hello.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), path


def test_the_tools_are_the_exact_versions_the_examples_use(hello: Path) -> None:
    repo = json.loads((CAPSULES / "package.json").read_text())["devDependencies"]
    mine = json.loads((hello / "package.json").read_text())["devDependencies"]
    assert mine == repo
    assert all(v[0].isdigit() for k, v in mine.items() if k != "orch-capsule-sdk")  # exact, not ranges
    repo_lock = json.loads((CAPSULES / "package-lock.json").read_text())["packages"]
    lock = json.loads((hello / "package-lock.json").read_text())["packages"]
    assert {k: v for k, v in lock.items() if k} == {k: v for k, v in repo_lock.items() if k}


def test_the_packaged_sdk_is_the_repositorys_sdk() -> None:
    """One SDK: capsules/sdk is a link to the package's copy (what `orch new` vendors)."""
    packaged = Path(str(scaffold.templates())) / "sdk"
    assert (CAPSULES / "sdk").resolve() == packaged.resolve()
    assert {"index.ts", "airlock.ts", "json.ts", "abort.ts", "build.mjs", "package.json"} <= {
        p.name for p in packaged.iterdir()
    }


def test_nothing_in_the_folder_points_into_the_repository(hello: Path) -> None:
    for path in hello.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for outside in ("../../", "capsules/", "orchestrator/", str(CAPSULES.parent)):
                assert outside not in text, f"{path.relative_to(hello)} mentions {outside!r}"


# -- end to end -------------------------------------------------------------------------------


def assert_self_contained(folder: Path) -> None:
    """Every symlink in `folder` (npm links the SDK package) resolves inside it."""
    root = folder.resolve()
    for path in folder.rglob("*"):
        if path.is_symlink():
            assert path.resolve().is_relative_to(root), f"{path} -> {path.resolve()}"


@pytest.mark.timeout(2 * BUILD_SECONDS)
def test_npm_install_and_build_then_check_and_call_with_no_edits(hello: Path, tmp_path: Path) -> None:
    installed = run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], hello)
    assert installed.returncode == 0, installed.stderr
    assert_self_contained(hello)
    built = run(["npm", "run", "--silent", "build"], hello)
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("built hello.wasm (release, ")

    checked = orch("capsule", "check", str(hello), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert b"tool          greet" in checked.stdout and b"publish       hello.greeted" in checked.stdout

    state = str(tmp_path / "state")
    called = orch("capsule", "call", str(hello), "greet", '{"name": "Ada"}', "--state-dir", state, cwd=tmp_path)
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"text": "Hello, Ada!", "count": 1}
    called = orch(
        "capsule",
        "call",
        str(hello),
        "greet",
        '{"name": "Bo"}',
        "--state-dir",
        state,
        "--config",
        "greeting=Hi",
        cwd=tmp_path,
    )
    assert json.loads(called.stdout) == {"text": "Hi, Bo!", "count": 2}
    refused = orch("capsule", "call", str(hello), "greet", '{"name": 7}', "--state-dir", state, cwd=tmp_path)
    assert refused.returncode == 1 and b"name" in refused.stderr  # the input schema, before the guest


@pytest.mark.timeout(2 * BUILD_SECONDS)
async def test_the_manifests_dev_build_and_orch_up_in_the_folder(hello: Path) -> None:
    link_tools(hello)  # the repository's installed tools, linked, to save an install
    command = load_manifest(hello).build.command  # type: ignore[union-attr]
    built = run(command, hello)
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("built hello.wasm (dev, ")
    checked = orch("capsule", "check", str(hello))
    assert checked.returncode == 0, checked.stderr

    config = hello / "config.yaml"
    source = hello / "assembly" / "index.ts"
    up = Up(config)
    try:
        await up.wait_watching()
        async with Client(socket_for(config)) as client:
            events = await live_events(client, "orch.capsule.hello.>")
            output, _ = await client.call("hello", "greet", b'{"name": "Ada"}')
            assert json.loads(output) == {"text": "Hello, Ada!", "count": 1}
            source.write_text(source.read_text().replace('", " + name + "!"', '", dear " + name + "!"'))
            event = await next_event(events, ".reloaded", ".build_failed")
            assert event["topic"] == "orch.capsule.hello.reloaded", event
            output, _ = await client.call("hello", "greet", b'{"name": "Ada"}')
            assert json.loads(output) == {"text": "Hello, dear Ada!", "count": 2}
    finally:
        up.stop()
