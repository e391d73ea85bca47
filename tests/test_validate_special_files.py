"""`orch validate` (a real process) on files that are not what they claim to be (issue 9,
finding 11): a FIFO as config.yaml or as a capsule's module must not hang it, a module
linked to /dev/zero must not be read without end, and a module linked to a text file is
refused without echoing that file's contents. Each is one clear line naming the path;
the process's timeout is only a backstop (a hang fails the test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.latticehosts import write_capsule, write_config
from tests.processes import orch

BACKSTOP = 60.0


def deployment(root: Path) -> Path:
    write_capsule(root / "caps" / "ver", 1)
    return write_config(root, {"ver": {"path": "caps/ver"}})


def validate(config: Path) -> tuple[int, str]:
    done = orch("validate", str(config), cwd=config.parent, timeout=BACKSTOP)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


def test_a_fifo_as_config_yaml_is_refused_at_once(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    os.mkfifo(config)  # no writer ever comes: reading it would block forever
    code, said = validate(config)
    assert code == 1, said
    assert "FIFO" in said and str(config) in said


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (os.mkfifo, "FIFO"),
        (lambda path: path.symlink_to("/dev/zero"), "device"),
    ],
    ids=["fifo", "dev-zero"],
)
def test_a_module_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, make, says: str) -> None:  # type: ignore[no-untyped-def]
    config = deployment(tmp_path)
    module = tmp_path / "caps" / "ver" / "v.wat"
    module.unlink()
    make(module)
    code, said = validate(config)
    assert code == 1, said
    assert says in said and "v.wat" in said


def test_a_module_linked_to_a_text_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:root:/root:/bin/sh\nSECRET-LINE\n")
    config = deployment(tmp_path)
    folder = tmp_path / "caps" / "ver"
    (folder / "v.wat").unlink()
    manifest = folder / "Capsule.toml"
    manifest.write_text(manifest.read_text().replace('file = "v.wat"', 'file = "v.wasm"'))
    (folder / "v.wasm").symlink_to(secret)
    code, said = validate(config)
    assert code == 1, said
    assert "v.wasm" in said
    assert "root:x" not in said and "SECRET-LINE" not in said
