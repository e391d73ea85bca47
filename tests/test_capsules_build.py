"""The committed example .wasm files are current: rebuilding them from source gives the same
bytes. (Node and npm are needed here only; running the capsules needs neither.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CAPSULES

EXAMPLES = sorted(p.parent.parent.name for p in CAPSULES.glob("*/assembly/index.ts"))


def npm_ready() -> None:
    if not (CAPSULES / "node_modules" / ".package-lock.json").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=CAPSULES,
            check=True,
            timeout=300,
        )


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("node"), "node is needed to rebuild the example capsules"
    npm_ready()
    out = tmp_path_factory.mktemp("rebuilt")
    subprocess.run(["node", "build.mjs", "--out", str(out)], cwd=CAPSULES, check=True, timeout=300, capture_output=True)
    return out


def test_there_are_examples() -> None:
    assert {"greet", "tally", "vowels", "conformance"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_committed_wasm_matches_source(rebuilt: Path, name: str) -> None:
    committed = (CAPSULES / name / f"{name}.wasm").read_bytes()
    fresh = (rebuilt / f"{name}.wasm").read_bytes()
    assert fresh == committed, f"capsules/{name}/{name}.wasm is stale: run `make capsules` and commit it"
