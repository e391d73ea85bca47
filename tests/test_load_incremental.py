"""`load_desired(previous=, only=)`: when config.yaml is the file already read, only the
named deployments are read again (the parsed config and every other spec are kept as they
are); when config.yaml changed, or the previous state had problems, everything is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.desired import load_desired
from orchestrator.errors import ConfigError

MODULE = '(module (func (export "v") (result i32) i32.const {value}))'


def capsule(folder: Path, value: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Capsule.toml").write_text('[package]\nname = "p"\nversion = "1.0.0"\n[[component]]\nfile = "m.wat"\n')
    (folder / "m.wat").write_text(MODULE.format(value=value))


def config(root: Path, names: list[str], *, extra: str = "") -> Path:
    path = root / "config.yaml"
    body = "".join(f"  {n}:\n    path: caps/{n}\n{extra}" for n in names)
    path.write_text(f"version: 1\ncapsules:\n{body}")
    return path


def test_only_the_named_deployments_are_read_again(tmp_path: Path) -> None:
    for name in ("a", "b"):
        capsule(tmp_path / "caps" / name, 1)
    path = config(tmp_path, ["a", "b"])
    first = load_desired(path, strict=False)
    capsule(tmp_path / "caps" / "a", 2)
    capsule(tmp_path / "caps" / "b", 2)  # changed too, but not named: not read
    second = load_desired(path, strict=False, previous=first, only=["a"])
    assert second.config is first.config
    assert second.specs["a"].wasm_sha256 != first.specs["a"].wasm_sha256
    assert second.specs["b"] is first.specs["b"]


def test_a_changed_config_is_read_whole(tmp_path: Path) -> None:
    for name in ("a", "b"):
        capsule(tmp_path / "caps" / name, 1)
    path = config(tmp_path, ["a", "b"])
    first = load_desired(path, strict=False)
    config(tmp_path, ["a", "b"], extra="    instances: 2\n")
    stamp = os.stat(path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))  # a coarse clock cannot hide it
    second = load_desired(path, strict=False, previous=first, only=["a"])
    assert second.config is not first.config
    assert {s.instances for s in second.specs.values()} == {2}


def test_a_broken_deployment_named_again_is_broken_and_strict_raises(tmp_path: Path) -> None:
    for name in ("a", "b"):
        capsule(tmp_path / "caps" / name, 1)
    path = config(tmp_path, ["a", "b"])
    first = load_desired(path, strict=False)
    (tmp_path / "caps" / "a" / "m.wat").unlink()
    second = load_desired(path, strict=False, previous=first, only=["a"])
    assert set(second.broken) == {"a"} and "a" not in second.specs and second.specs["b"] is first.specs["b"]
    with pytest.raises(ConfigError) as caught:
        load_desired(path, strict=True, previous=first, only=["a"])
    assert "m.wat" in str(caught.value)
    capsule(tmp_path / "caps" / "a", 3)  # fixed: the previous state had a problem, so all is read
    third = load_desired(path, strict=False, previous=second, only=["a"])
    assert not third.broken and third.config is not first.config
