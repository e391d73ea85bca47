"""Tool inputs are validated off the event loop, in bounded time, before the guest runs.

The review found a `pattern` of `^(a+)+$` taking 9 s on 27 characters and `uniqueItems`
over 30,000 objects that even SIGTERM could not interrupt, both on the event loop. Through
a real capsule: hostile inputs get a ToolInputError (or pass) and the validation runs on a
worker thread, never the loop's.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.capsule import Capsule, EventBus, KVStore
from orchestrator.desired.schema import InputSchema
from orchestrator.engine import WasmEngine
from orchestrator.errors import ToolInputError
from tests.conftest import CAPSULES

HOSTILE_TOOL = """
[[tool]]
name = "get"
description = "the counter's get, with a hostile input schema"
input_schema.type = "object"
input_schema.properties.name = { type = "string", pattern = "^(a+)+$" }
input_schema.properties.items = { type = "array", uniqueItems = true }
"""


@pytest.fixture
async def capsule(tmp_path: Path) -> AsyncIterator[Capsule]:
    folder = tmp_path / "counter"
    shutil.copytree(CAPSULES / "counter", folder, ignore=shutil.ignore_patterns("assembly"))
    manifest = folder / "Capsule.toml"
    text = manifest.read_text()
    start = text.index('[[tool]]\nname = "get"')
    end = text.find("[[tool]]", start + 1)
    manifest.write_text(text[:start] + HOSTILE_TOOL.strip() + "\n\n" + (text[end:] if end != -1 else ""))
    store = await KVStore.open(tmp_path / "kv.sqlite3")
    with WasmEngine() as engine:
        loaded = await Capsule.load(folder, engine=engine, bus=EventBus(), store=store, workspace=tmp_path)
        yield loaded
        await loaded.close()
    await store.close()


async def test_an_exponential_pattern_is_refused_quickly(capsule: Capsule) -> None:
    with pytest.raises(ToolInputError, match=r"at /name") as refused:
        await capsule.call_tool("get", {"name": "a" * 27 + "!"})
    assert refused.value.field == "/name"
    result = await capsule.call_tool("get", {"name": "a" * 100_000})
    assert result.output  # matched: the guest ran


async def test_unique_items_over_thousands_of_objects(capsule: Capsule) -> None:
    distinct = [{"id": i, "tags": ["x", i]} for i in range(15_000)]  # old: 8,000 took 139 s
    assert (await capsule.call_tool("get", {"items": distinct})).output
    with pytest.raises(ToolInputError, match="/items"):
        await capsule.call_tool("get", {"items": [*distinct, {"tags": ["x", 7], "id": 7.0}]})  # 7 == 7.0


async def test_validation_never_runs_on_the_event_loop(capsule: Capsule, monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = InputSchema.validate

    def recording(self: InputSchema, arguments: object, **where: str) -> None:
        seen.append(threading.get_ident())
        original(self, arguments, **where)

    monkeypatch.setattr(InputSchema, "validate", recording)
    await asyncio.gather(*(capsule.call_tool("get", {"name": "aaa"}) for _ in range(4)))
    assert len(seen) == 4 and loop_thread not in seen
