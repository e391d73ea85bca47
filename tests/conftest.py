"""Shared fixtures: one engine per test module, paths to the example capsules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.engine import WasmEngine
from tests.natsserver import nats_cluster, nats_server  # noqa: F401  (fixtures for every test module)

REPO = Path(__file__).resolve().parent.parent
CAPSULES = REPO / "capsules"


def capsule_wasm(name: str) -> Path:
    """The committed build of example capsule `name` (capsules/<name>/<name>.wasm)."""
    return CAPSULES / name / f"{name}.wasm"


@pytest.fixture(scope="module")
def engine() -> Iterator[WasmEngine]:
    """A memory-cached engine shared by the tests of one module."""
    with WasmEngine() as shared:
        yield shared


# `hosts` (real `orch host` processes) for every test module; read by pytest once this module
# has run, so tests.latticehosts may import the test modules that import this one
pytest_plugins = ["tests.latticehosts"]
