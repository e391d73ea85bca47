"""The committed example .wasm files are current: rebuilding them from source (the release
profile, built in parallel) gives the same bytes. (Node and npm are needed here only; running
the capsules needs neither.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CAPSULES

EXAMPLES = sorted(p.parent.parent.name for p in CAPSULES.glob("*/assembly/index.ts"))


BUILD_SECONDS = 360  # seven -O3 builds on a busy 2-core machine; an idle one takes ~15 s


def npm_ready() -> None:
    installed = CAPSULES / "node_modules"
    linked = installed / "orch-capsule-sdk" / "package.json"  # the SDK, a local package (file:sdk)
    if not (installed / ".package-lock.json").exists() or not linked.exists():
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
    command = ["node", "build.mjs", "--release", "--out", str(out)]
    built = subprocess.run(command, cwd=CAPSULES, timeout=BUILD_SECONDS, capture_output=True, check=False)
    assert built.returncode == 0, built.stderr.decode(errors="replace")[-4000:]
    return out


def test_there_are_examples() -> None:
    assert {"greet", "tally", "vowels", "conformance"} <= set(EXAMPLES)


@pytest.mark.timeout(BUILD_SECONDS + 60)  # the first test builds them all (the fixture)
@pytest.mark.parametrize("name", EXAMPLES)
def test_committed_wasm_matches_source(rebuilt: Path, name: str) -> None:
    committed = (CAPSULES / name / f"{name}.wasm").read_bytes()
    fresh = (rebuilt / f"{name}.wasm").read_bytes()
    assert fresh == committed, f"capsules/{name}/{name}.wasm is stale: run `make capsules` and commit it"
