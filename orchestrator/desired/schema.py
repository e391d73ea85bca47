"""Tool input schemas: checked once when the manifest loads, then a validator that cannot run away.

A `[[tool]] input_schema` is a JSON Schema (Draft 2020-12). `compile_schema` checks it and
builds an `InputSchema` (cached by the schema's JSON, keys in the author's order since that
order decides which of two equally relevant errors is reported; a schema shared by many tools
or reloads is checked once), raising SchemaProblem (the JSON pointer inside the
schema, and what to change) for:

- anything the 2020-12 metaschema refuses (formats are not asserted), or nesting deeper than
  MAX_SCHEMA_DEPTH, or a number that is not finite;
- a `$ref` that is not a reference within the schema itself: remote (`https://...`), file and
  relative references are refused, as are ones that resolve to nothing or to a non-schema,
  and an `$id` below the root (it would change what `#` means). `$dynamicRef` and
  `$recursiveRef` are refused (write `$ref`), and so is a `$schema` below the root (the
  schema is validated as 2020-12 whatever the root's `$schema` says);
- a cycle that consumes no input: `{"$ref": "#"}` at the root, or A -> B -> A through `$ref`,
  `allOf`, `anyOf`, `oneOf`, `not`, `if`/`then`/`else` or `dependentSchemas`. Recursion
  through `properties`, `items`, `prefixItems`, `additionalProperties`, `contains`, ...
  descends into the input, so it ends, and is allowed;
- more than MAX_IN_PLACE subschemas applied to one value in place (a `$ref`/`allOf` DAG that
  doubles at each level), or chains of in-place references longer than MAX_IN_PLACE_CHAIN;
- a `pattern` or `patternProperties` key RE2 cannot run (lookaround, backreferences).

`InputSchema.validate(arguments, capsule=, tool=)` first checks the input itself (JSON values
only, at most MAX_INPUT_DEPTH levels, MAX_INPUT_VALUES values, MAX_INPUT_CHARS characters of
text, no lone surrogates, finite numbers), then runs jsonschema's Draft 2020-12 validator with
the keywords of orchestrator.desired.schemakeywords (RE2 patterns, O(n log n) uniqueItems,
abbreviated values in messages) under a budget of MAX_STEPS steps. Whatever the schema and
input, it ends with None or a ToolInputError. Synchronous and CPU-bound: async callers run it
on a worker thread.

Used by the manifest models (orchestrator.desired.manifest) and the capsule layer.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
from jsonschema.exceptions import best_match

from ..errors import ToolInputError
from .ecmaregex import PatternError, compile_pattern
from .schemakeywords import REPLACED, BudgetExceeded, budget, counted

MAX_SCHEMA_DEPTH = 48
"""Nesting of an input_schema (objects and arrays, the schema itself counting 1)."""
MAX_IN_PLACE = 1000
"""Subschemas that may apply to one value without descending into it."""
MAX_IN_PLACE_CHAIN = 32
"""The longest chain of in-place applicators ($ref, allOf, not, ...) one value goes through."""
MAX_INPUT_DEPTH = 64
MAX_INPUT_VALUES = 100_000
MAX_INPUT_CHARS = 1 << 20
MAX_INT_BITS = 1023  # beyond this an integer no longer fits a float: arithmetic on it can fail
MAX_STEPS = 1_000_000

_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_LIST = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAP = ("dependentSchemas",)
_BELOW_ONE = ("items", "additionalProperties", "unevaluatedItems", "unevaluatedProperties", "contains", "propertyNames")
_BELOW_LIST = ("prefixItems",)
_BELOW_MAP = ("properties", "patternProperties")
_HOLDERS = ("$defs", "definitions")  # subschemas used only through $ref
_SURROGATE = re.compile("[\ud800-\udfff]")
_BASE = jsonschema.Draft202012Validator

_KEYWORDS = {name: counted(REPLACED.get(name) or keyword) for name, keyword in _BASE.VALIDATORS.items()}
_Validator: Any = jsonschema.validators.extend(_BASE, validators=_KEYWORDS)  # type: ignore[no-untyped-call]


class SchemaProblem(ValueError):
    """Why an input_schema cannot be used: `pointer` (a JSON pointer into the schema, "" for
    the root) and `reason`. str() reads "at #/properties/name/pattern: <reason>"."""

    def __init__(self, pointer: str, reason: str) -> None:
        super().__init__(f"at #{pointer}: {reason}")
        self.pointer = pointer
        self.reason = reason


class InputSchema:
    """One tool's input schema, checked and compiled (build it with `compile_schema`)."""

    __slots__ = ("_validator", "schema")

    def __init__(self, schema: Any) -> None:
        self.schema = schema
        self._validator = _Validator(schema, registry=referencing.Registry())

    def validate(self, arguments: Any, *, capsule: str, tool: str) -> None:
        """None when `arguments` fit the schema; otherwise ToolInputError naming the field
        (a JSON path such as /items/3/name) and what is wrong, for `capsule`.`tool`."""

        def refuse(field: str, message: str) -> ToolInputError:
            return ToolInputError(f"invalid input for {capsule}.{tool}: at {field}: {message}", tool=tool, field=field)

        problem = input_problem(arguments)
        if problem is not None:
            raise refuse(*problem)
        try:
            with budget(MAX_STEPS):
                error = best_match(self._validator.iter_errors(arguments))
        except BudgetExceeded:
            message = f"checking this input against the tool's schema takes over {MAX_STEPS:,} steps: send less"
            raise refuse("/", message) from None
        except RecursionError:
            raise refuse("/", "nested too deeply to check against the tool's schema: send a flatter input") from None
        if error is not None:
            raise refuse("/" + "/".join(str(p) for p in error.absolute_path), error.message)


def compile_schema(schema: Any) -> InputSchema:
    """`schema` checked and compiled (cached by its JSON). Raises SchemaProblem."""
    deep = _json_problem(schema)
    if deep is not None:
        raise SchemaProblem(*deep)
    result = _compiled(json.dumps(schema, separators=(",", ":"), default=str))  # key order kept: it orders errors
    if isinstance(result, tuple):
        raise SchemaProblem(*result)
    return result


@functools.lru_cache(maxsize=1024)
def _compiled(canonical: str) -> InputSchema | tuple[str, str]:
    schema = json.loads(canonical)
    error = best_match(_meta_validator().iter_errors(schema))
    if error is not None:
        message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
        return _pointer(error.absolute_path), f"not a valid JSON Schema: {message}"
    if isinstance(schema, dict):
        # jsonschema switches a subschema that names its `$schema` to that dialect's stock
        # validator (Python's re, quadratic uniqueItems), also when `$ref: "#"` re-enters the
        # root: the root's is dropped (we validate as 2020-12 regardless), others are refused
        schema.pop("$schema", None)
    try:
        compiled = InputSchema(schema)
        _SchemaGraph(schema, compiled._validator._resolver).check()
    except SchemaProblem as problem:
        return problem.pointer, problem.reason
    return compiled


@functools.cache
def _meta_validator() -> Any:
    """The 2020-12 metaschema on our keywords (abbreviated messages, RE2), formats not
    asserted, references resolved from the bundled metaschemas only (nothing is fetched)."""
    return _Validator(_BASE.META_SCHEMA, registry=referencing.Registry(), format_checker=None)


def _pointer(parts: Any) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _json_problem(value: Any) -> tuple[str, str] | None:
    """The first place where `value` is nested too deeply or holds a non-finite number."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 1, ())]
    while stack:
        item, depth, loc = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return _pointer(loc), f"{item} is not a JSON number"
        if isinstance(item, dict | list):
            if depth > MAX_SCHEMA_DEPTH:
                return _pointer(loc), f"nested deeper than {MAX_SCHEMA_DEPTH} levels: use $defs and $ref"
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((v, depth + 1, (*loc, k)) for k, v in pairs)
    return None


class _SchemaGraph:
    """The subschemas of one schema and the in-place edges between them (see the module
    docstring); `check` raises SchemaProblem for the first thing that cannot run."""

    def __init__(self, root: Any, resolver: Any) -> None:
        self.root = root
        self.resolver = resolver
        self.pointers: dict[int, str] = {}  # id(subschema) -> where it was first seen
        self.in_place: dict[int, list[int]] = {}
        self.pending: list[tuple[Any, str]] = []

    def check(self) -> None:
        self._visit(self.root, "")
        while self.pending:
            schema, pointer = self.pending.pop()
            self._walk(schema, pointer)
        self._check_cycles()
        self._check_fan_out()

    def _visit(self, schema: Any, pointer: str) -> None:
        if isinstance(schema, dict) and id(schema) not in self.pointers:
            self.pointers[id(schema)] = pointer
            self.in_place[id(schema)] = []
            self.pending.append((schema, pointer))

    def _walk(self, schema: dict[str, Any], at: str) -> None:
        edges = self.in_place[id(schema)]

        def child(sub: Any, pointer: str, *, in_place: bool) -> None:
            self._visit(sub, pointer)
            if in_place and isinstance(sub, dict):
                edges.append(id(sub))

        if "$id" in schema and schema is not self.root:
            raise SchemaProblem(f"{at}/$id", "$id is allowed only at the root (it would change what '#' refers to)")
        if "$schema" in schema and schema is not self.root:
            raise SchemaProblem(f"{at}/$schema", "$schema is allowed only at the root")
        for keyword in ("$dynamicRef", "$recursiveRef"):
            if keyword in schema:
                raise SchemaProblem(f"{at}/{keyword}", f"{keyword} is not supported: use $ref")
        if "$ref" in schema and isinstance(target := self._resolve(schema["$ref"], f"{at}/$ref"), dict):
            edges.append(id(target))
        if isinstance(schema.get("pattern"), str):
            self._pattern(schema["pattern"], f"{at}/pattern")
        for key in schema.get("patternProperties", {}):
            self._pattern(key, f"{at}/patternProperties{_pointer([key])}")
        for keyword in _IN_PLACE_ONE + _BELOW_ONE:
            if keyword in schema:
                child(schema[keyword], f"{at}/{keyword}", in_place=keyword in _IN_PLACE_ONE)
        for keyword in _IN_PLACE_LIST + _BELOW_LIST:
            for i, sub in enumerate(schema.get(keyword, [])):
                child(sub, f"{at}/{keyword}/{i}", in_place=keyword in _IN_PLACE_LIST)
        for keyword in _IN_PLACE_MAP + _BELOW_MAP + _HOLDERS:
            holder = schema.get(keyword)
            for key, sub in holder.items() if isinstance(holder, dict) else ():
                child(sub, f"{at}/{keyword}{_pointer([key])}", in_place=keyword in _IN_PLACE_MAP)

    def _resolve(self, ref: str, at: str) -> Any:
        if not ref.startswith("#"):
            raise SchemaProblem(
                at,
                f"$ref {ref[:80]!r} points outside this schema; only references within it are allowed "
                "(#/$defs/name, #anchor): copy what it refers to into $defs",
            )
        try:
            target = self.resolver.lookup(ref).contents
        except referencing.exceptions.Unresolvable:
            raise SchemaProblem(at, f"$ref {ref[:80]!r} refers to nothing in this schema") from None
        if not isinstance(target, dict | bool):
            raise SchemaProblem(at, f"$ref {ref[:80]!r} refers to a {type(target).__name__}, not a schema")
        if isinstance(target, dict) and id(target) not in self.pointers:
            self._visit(target, ref[1:] if ref.startswith("#/") else at)
        return target

    def _pattern(self, pattern: str, at: str) -> None:
        try:
            compile_pattern(pattern)
        except PatternError as error:
            raise SchemaProblem(at, f"pattern {pattern[:80]!r}: {error}") from None

    def _check_cycles(self) -> None:
        """Refuse a cycle of in-place edges (iterative DFS; reports the cycle's pointers)."""
        state: dict[int, int] = {}  # 1 on the current path, 2 done
        for start in self.in_place:
            if start in state:
                continue
            path = [start]
            iterators: list[Iterator[int]] = [iter(self.in_place[start])]
            state[start] = 1
            while iterators:
                node = next(iterators[-1], None)
                if node is None:
                    state[path.pop()] = 2
                    iterators.pop()
                elif state.get(node) == 1:
                    ring = [*path[path.index(node) :], node]
                    shown = " -> ".join("#" + self.pointers[n] for n in ring)
                    raise SchemaProblem(
                        self.pointers[node],
                        f"a cycle that consumes no input ({shown}): validating would never end; "
                        "recurse through properties or items instead",
                    )
                elif node not in state:
                    state[node] = 1
                    path.append(node)
                    iterators.append(iter(self.in_place[node]))

    def _check_fan_out(self) -> None:
        """Refuse a schema applying too many subschemas, or too long a chain, to one value."""
        total: dict[int, int] = {}
        chain: dict[int, int] = {}
        for start in self.in_place:
            stack = [(start, False)]
            while stack:
                node, expanded = stack.pop()
                if node in total:
                    continue
                if not expanded:
                    stack.append((node, True))
                    stack.extend((n, False) for n in self.in_place[node] if n not in total)
                    continue
                below = self.in_place[node]
                total[node] = min(1 + sum(total[n] for n in below), MAX_IN_PLACE + 1)
                chain[node] = 1 + max((chain[n] for n in below), default=0)
                if total[node] > MAX_IN_PLACE:
                    raise SchemaProblem(
                        self.pointers[node],
                        f"applies over {MAX_IN_PLACE} subschemas to one value (through $ref, allOf, anyOf, ...): "
                        "share fewer references",
                    )
                if chain[node] > MAX_IN_PLACE_CHAIN:
                    raise SchemaProblem(
                        self.pointers[node],
                        f"a chain of over {MAX_IN_PLACE_CHAIN} $ref/allOf/anyOf/... steps on one value: shorten it",
                    )


def input_problem(value: Any) -> tuple[str, str] | None:
    """(field, message) for the first thing in tool input `value` that no schema should see:
    a non-JSON value, too deep, too many values or too much text, a lone surrogate, a
    non-finite number or an integer too large for arithmetic. None when it is fine."""
    values = chars = 0
    stack: list[tuple[Any, int, Any]] = [(value, 1, None)]  # (value, depth, (key, parent's loc))
    while stack:
        item, depth, loc = stack.pop()
        values += 1
        if values > MAX_INPUT_VALUES:
            return "/", f"more than {MAX_INPUT_VALUES:,} values in all: send less"
        message = None
        if isinstance(item, str):
            chars += len(item)
            if _SURROGATE.search(item):
                message = "the text holds a lone surrogate (not Unicode): send valid UTF-8"
        elif item is None or isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if item.bit_length() > MAX_INT_BITS:
                message = f"an integer over {MAX_INT_BITS} bits is not supported"
        elif isinstance(item, float):
            if not math.isfinite(item):
                message = f"{item} is not a JSON number"
        elif isinstance(item, dict | list):
            if depth > MAX_INPUT_DEPTH:
                message = f"nested deeper than {MAX_INPUT_DEPTH} levels: send a flatter input"
            elif isinstance(item, list):
                stack.extend((v, depth + 1, (i, loc)) for i, v in enumerate(item))
            else:
                for key, v in item.items():
                    if not isinstance(key, str):
                        return _field(loc), f"object keys must be text, not {type(key).__name__}"
                    chars += len(key)
                    if _SURROGATE.search(key):
                        return _field(loc), "a key holds a lone surrogate (not Unicode): send valid UTF-8"
                    stack.append((v, depth + 1, (key, loc)))
        else:
            message = f"a {type(item).__name__} is not a JSON value"
        if chars > MAX_INPUT_CHARS:
            return "/", f"more than {MAX_INPUT_CHARS:,} characters of text in all: send less"
        if message is not None:
            return _field(loc), message
    return None


def _field(loc: Any) -> str:
    parts: list[str] = []
    while loc is not None:
        key, loc = loc
        parts.append(str(key))
    return "/" + "/".join(reversed(parts))
