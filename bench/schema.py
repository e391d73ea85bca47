"""Tool input validation benchmark: prints one JSON object.

    .venv/bin/python bench/schema.py [--rounds N]

- ordinary: microseconds per validation of a small object against a typical tool schema,
  with orchestrator.desired.schema (`ours`) and with jsonschema's stock Draft 2020-12
  validator (`stock`, what the capsule used before): the price of the safety checks.
- large: milliseconds to validate 100,000 integers (the input cap) against an `items` schema.
- hostile: milliseconds for the security review's cases, ours: `^(a+)+$` against 27 and
  200,000 characters, uniqueItems over 3,000 / 8,000 / 30,000 objects; and stock for the
  sizes that still finish quickly (the pattern at 18-22 characters doubles per character).
- budget: milliseconds until a schema that doubles its work per level of input runs out of
  its MAX_STEPS steps (the slowest a validation can take before being refused).
- config: milliseconds to refuse a config.yaml nested 800 deep and a 4 MiB one holding
  more than MAX_NODES values.

Figures are medians over rounds; the machine is shared, so compare ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.desired.config import parse_config  # noqa: E402
from orchestrator.desired.schema import compile_schema  # noqa: E402
from orchestrator.errors import ConfigError, ToolInputError  # noqa: E402

TYPICAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "pattern": "^[a-z][a-z0-9_-]*$"},
        "count": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    },
    "required": ["name"],
    "additionalProperties": False,
}
ARGUMENTS = {"name": "widget_7", "count": 3, "tags": ["a", "b", "c"]}


def ours(schema: dict[str, Any], arguments: Any) -> Callable[[], object]:
    compiled = compile_schema(schema)

    def run() -> object:
        try:
            compiled.validate(arguments, capsule="bench", tool="t")
        except ToolInputError as error:
            return error
        return None

    return run


def stock(schema: dict[str, Any], arguments: Any) -> Callable[[], object]:
    validator = jsonschema.Draft202012Validator(schema)
    return lambda: jsonschema.exceptions.best_match(validator.iter_errors(arguments))


def median_ms(run: Callable[[], object], rounds: int, repeat: int = 1) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            run()
        samples.append((time.perf_counter() - start) * 1000 / repeat)
    return round(statistics.median(samples), 4)


def refuse_config(text: str) -> Callable[[], object]:
    def run() -> object:
        try:
            parse_config(text, path=ROOT / "bench-config.yaml", environ={})
        except ConfigError as error:
            return error
        raise AssertionError("expected a ConfigError")

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    evil = {"type": "string", "pattern": "^(a+)+$"}
    unique = {"type": "array", "uniqueItems": True}
    objects = [{"id": i, "name": f"n{i}"} for i in range(30_000)]
    doubling = {"allOf": [{"properties": {"a": {"$ref": "#"}}}, {"properties": {"a": {"$ref": "#"}}}]}
    nested: Any = 1
    for _ in range(60):
        nested = {"a": nested}
    report = {
        "ordinary_us": {
            "ours": round(median_ms(ours(TYPICAL, ARGUMENTS), rounds, 2000) * 1000, 2),
            "stock": round(median_ms(stock(TYPICAL, ARGUMENTS), rounds, 2000) * 1000, 2),
        },
        "large_ms": {
            "ours_100k_integers": median_ms(ours({"items": {"type": "integer"}}, list(range(99_999))), rounds)
        },
        "hostile_ms": {
            "ours_pattern_27": median_ms(ours(evil, "a" * 27 + "b"), rounds),
            "ours_pattern_200000": median_ms(ours(evil, "a" * 200_000 + "b"), rounds),
            **{f"ours_unique_{n}": median_ms(ours(unique, objects[:n]), rounds) for n in (3_000, 8_000, 30_000)},
            **{f"stock_pattern_{n}": median_ms(stock(evil, "a" * n + "b"), 1) for n in (18, 20, 22)},
            "stock_unique_1000": median_ms(stock(unique, objects[:1000]), 1),
        },
        "budget_ms": {"doubling_60_levels": median_ms(ours(doubling, nested), rounds)},
        "config_ms": {
            "nested_800": median_ms(refuse_config("version: 1\nx: " + "[" * 800 + "]" * 800 + "\n"), rounds),
            "values_4mib": median_ms(
                refuse_config("version: 1\nx:\n" + "".join(f"  k{i}: [a, b, {{c: d}}]\n" for i in range(150_000))),
                rounds,
            ),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
