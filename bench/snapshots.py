"""KV snapshot benchmark: prints one JSON object.

    .venv/bin/python bench/snapshots.py [--keys N] [--value-bytes B] [--rounds R]

A capsule's KV holds N keys (default 100,000) of B bytes each (default 100) in a real
SQLite store (WAL, synchronous=NORMAL) on a temporary folder. Each round:

- take: `KVStore.take_snapshot` (commit what is staged, then one INSERT ... SELECT of the
  capsule's rows into the snapshot tables, in one transaction), what a reload pays before
  it swaps versions;
- restore: after every value was changed and 10 % of the keys deleted and as many new
  ones added, `KVStore.restore_snapshot` (read the snapshot with its checksums, stage a
  value for each of its keys and a delete for each other key, commit in one transaction),
  what `orch rollback --with-data` pays while the capsule's calls wait;
- size: the snapshot's own figure (keys plus values) and the database pages it takes.

Another capsule's 10,000 keys sit beside it and must be untouched (`others_intact`).
Figures are medians over rounds; the machine is shared, so compare orders of magnitude.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.capsule.store import KVStore  # noqa: E402

CAPSULE, OTHER = "bench", "neighbour"


def snapshot_pages(path: Path) -> int:
    """Bytes of database pages the snapshot tables hold, read by a separate connection."""
    db = sqlite3.connect(path)
    try:
        query = "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name LIKE '%kv_snapshot%'"
        return int(db.execute(query).fetchone()[0])
    finally:
        db.close()


async def fill(store: KVStore, capsule: str, keys: int, value: bytes, *, chunk: int = 10_000) -> None:
    for start in range(0, keys, chunk):
        for i in range(start, min(keys, start + chunk)):
            store.stage_set(capsule, f"key/{i:08d}", value)
        await store.commit()


async def run(keys: int, value_bytes: int, rounds: int) -> dict[str, object]:
    takes, restores, sizes, on_disk = [], [], [], []
    intact = True
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kv.sqlite3"
        store = await KVStore.open(path)
        try:
            await fill(store, OTHER, 10_000, b"n" * value_bytes)
            for round_ in range(rounds):
                await fill(store, CAPSULE, keys, bytes([65 + round_ % 26]) * value_bytes)
                started = time.perf_counter()
                info = await store.take_snapshot(CAPSULE, created_ms=int(time.time() * 1000))
                takes.append(time.perf_counter() - started)
                sizes.append(info.bytes)
                on_disk.append(snapshot_pages(path))
                # change everything: new values, 10 % of the keys gone, as many new ones
                await fill(store, CAPSULE, keys, b"z" * value_bytes)
                for i in range(0, keys, 10):
                    store.stage_delete(CAPSULE, f"key/{i:08d}")
                    store.stage_set(CAPSULE, f"new/{i:08d}", b"n")
                await store.commit()
                started = time.perf_counter()
                restored = await store.restore_snapshot(CAPSULE, info.id)
                restores.append(time.perf_counter() - started)
                assert restored == keys, (restored, keys)
                listed = await store.list_keys(CAPSULE)
                assert len(listed) == keys and listed[0] == "key/00000000", "the restore is not exact"
                assert await store.get(CAPSULE, "key/00000000") == bytes([65 + round_ % 26]) * value_bytes
                intact = intact and len(await store.list_keys(OTHER)) == 10_000
                await store.drop_snapshots([info.id])
        finally:
            await store.close()
    return {
        "keys": keys,
        "value_bytes": value_bytes,
        "rounds": rounds,
        "take_seconds": round(statistics.median(takes), 4),
        "restore_seconds": round(statistics.median(restores), 4),
        "snapshot_bytes": sizes[0],
        "snapshot_bytes_on_disk": int(statistics.median(on_disk)),
        "take_keys_per_second": round(keys / statistics.median(takes)),
        "restore_keys_per_second": round(keys / statistics.median(restores)),
        "others_intact": intact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.keys, args.value_bytes, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
