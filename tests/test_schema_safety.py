"""Tool input schemas (orchestrator.desired.schema): checked when the manifest loads, and a
validator that cannot run away.

Covers the security review's finding 12: catastrophic-backtracking patterns and quadratic
uniqueItems now finish (the pytest timeout is the only clock: each case asserts its result),
remote/file/unresolvable/cyclic `$ref`s are refused at load naming the tool and the JSON path,
patterns RE2 cannot run are refused at load, the input's size and depth are capped, and a
schema that multiplies work per level runs out of steps instead of stalling. On ordinary
schemas and inputs the validator agrees with jsonschema's own Draft 2020-12 validator.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema._utils import equal

from orchestrator.desired.ecmaregex import PatternError, compile_pattern, translate
from orchestrator.desired.manifest import parse_manifest
from orchestrator.desired.schema import (
    MAX_IN_PLACE,
    MAX_INPUT_CHARS,
    MAX_INPUT_DEPTH,
    MAX_INPUT_VALUES,
    MAX_SCHEMA_DEPTH,
    MAX_STEPS,
    InputSchema,
    SchemaProblem,
    compile_schema,
)
from orchestrator.desired.schemakeywords import first_duplicate, show
from orchestrator.errors import ManifestError, ToolInputError

EVIL = "^(a+)+$"  # exponential on a backtracking engine: 27 a's and a b took 9 s with Python's re


def check(schema: dict[str, Any], arguments: Any) -> ToolInputError | None:
    """The ToolInputError validating `arguments` raises, or None when they are valid."""
    try:
        compile_schema(schema).validate(arguments, capsule="cap", tool="run")
    except ToolInputError as error:
        return error
    return None


def refused(schema: dict[str, Any]) -> SchemaProblem:
    with pytest.raises(SchemaProblem) as caught:
        compile_schema(schema)
    return caught.value


# -- the review's runaway cases now finish --------------------------------------------------


@pytest.mark.parametrize("length", [27, 30, 5000, 200_000])
def test_an_exponential_pattern_is_linear(length: int) -> None:
    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": EVIL}}}
    error = check(schema, {"s": "a" * length + "b"})
    assert error is not None and error.field == "/s" and "does not match '^(a+)+$'" in str(error)
    assert check(schema, {"s": "a" * length}) is None


@pytest.mark.parametrize(
    ("schema", "arguments"),
    [
        ({"patternProperties": {EVIL: {"type": "integer"}}}, {"a" * 40 + "b": "x", "a" * 40: "y"}),
        ({"properties": {}, "patternProperties": {EVIL: True}, "additionalProperties": False}, {"a" * 40 + "b": 1}),
        ({"patternProperties": {EVIL: True}, "unevaluatedProperties": False}, {"a" * 40 + "b": 1}),
        ({"propertyNames": {"pattern": EVIL}}, {"a" * 40 + "b": 1}),
    ],
    ids=["patternProperties", "additionalProperties", "unevaluatedProperties", "propertyNames"],
)
def test_every_keyword_that_reads_a_pattern_is_linear(schema: dict[str, Any], arguments: dict[str, Any]) -> None:
    error = check(schema, arguments)
    assert error is not None  # each of these inputs is invalid; on Python's re, each took minutes


@pytest.mark.parametrize("count", [3_000, 8_000, 30_000])
def test_unique_items_over_many_objects_is_fast(count: int) -> None:
    items = [{"id": i, "name": f"n{i}"} for i in range(count)]
    schema = {"type": "array", "uniqueItems": True}
    assert check(schema, items) is None
    error = check(schema, [*items, {"name": f"n{count // 2}", "id": float(count // 2)}])
    assert error is not None and error.field == "/"
    assert f"items {count // 2} and {count} are equal" in str(error)


@pytest.mark.parametrize(
    ("items", "duplicate"),
    [
        ([1, 1.0], (0, 1)),
        ([1, True], None),
        ([0, False], None),
        ([None, False, 0, "", [], {}], None),
        ([{"a": 1, "b": [1, 2]}, {"b": [1.0, 2], "a": 1.0}], (0, 1)),
        ([[1, 2], [2, 1]], None),
        ([{"a": 1}, {"a": 1, "b": 2}], None),
        (["x", "y", "x"], (0, 2)),
        ([{"a": True}, {"a": 1}], None),
        ([2**53 + 1, float(2**53)], None),  # exact: JSON numbers are equal when mathematically equal
    ],
)
def test_unique_items_uses_json_equality(items: list[Any], duplicate: tuple[int, int] | None) -> None:
    assert first_duplicate(items) == duplicate
    assert (check({"uniqueItems": True}, items) is None) == (duplicate is None)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2) | st.sampled_from([0.0, 1.0, 1.5]) | st.text("ab", max_size=2),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("ab", max_size=2), inner, max_size=3),
    max_leaves=8,
)


@given(st.lists(JSON_VALUES, max_size=8))
@settings(max_examples=400, deadline=None)
def test_unique_items_agrees_with_pairwise_json_equality(items: list[Any]) -> None:
    """The sorted canonical keys find a duplicate exactly when some pair is JSON-equal
    (jsonschema's `equal`, compared pairwise: the slow, obviously right way)."""
    pairs = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items)) if equal(items[i], items[j])]
    found = first_duplicate(items)
    assert (found is None) == (not pairs)
    assert found is None or equal(items[found[0]], items[found[1]])


def test_a_schema_that_multiplies_work_per_level_runs_out_of_steps() -> None:
    doubling = {"allOf": [{"properties": {"a": {"$ref": "#"}}}, {"properties": {"a": {"$ref": "#"}}}]}
    nested: Any = 1
    for _ in range(60):  # 2**60 evaluations on jsonschema's own validator
        nested = {"a": nested}
    error = check(doubling, nested)
    assert error is not None and error.field == "/" and f"{MAX_STEPS:,} steps" in str(error)
    assert check(doubling, {"a": {"a": 1}}) is None  # shallow input: fine


def test_many_branches_over_a_large_input_run_out_of_steps() -> None:
    schema = {"anyOf": [{"type": "string"}] * (MAX_IN_PLACE - 1)}
    error = check(schema, {f"k{i}": i for i in range(50_000)})
    assert error is not None and "steps" in str(error)


# -- the input itself -----------------------------------------------------------------------


def nest(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("arguments", "field", "fragment"),
    [
        (nest(MAX_INPUT_DEPTH + 1), "/" + "/".join(["0"] * MAX_INPUT_DEPTH), f"deeper than {MAX_INPUT_DEPTH} levels"),
        (nest(5000), "/" + "/".join(["0"] * MAX_INPUT_DEPTH), f"deeper than {MAX_INPUT_DEPTH} levels"),
        (list(range(MAX_INPUT_VALUES)), "/", f"more than {MAX_INPUT_VALUES:,} values"),
        (["x" * (MAX_INPUT_CHARS // 2)] * 3, "/", f"more than {MAX_INPUT_CHARS:,} characters"),
        ({"a": ["ok", "bad \ud800"]}, "/a/1", "lone surrogate"),
        ({"\udfff": 1}, "/", "lone surrogate"),
        ({"n": float("nan")}, "/n", "not a JSON number"),
        ({"n": [float("-inf")]}, "/n/0", "not a JSON number"),
        ({"n": 10**400}, "/n", "over 1023 bits"),
        ({"t": (1, 2)}, "/t", "tuple is not a JSON value"),
        ({1: "x"}, "/", "keys must be text"),
    ],
    ids=[
        "depth+1",
        "depth 5000",
        "values",
        "text",
        "surrogate",
        "surrogate key",
        "nan",
        "inf",
        "bigint",
        "tuple",
        "key",
    ],
)
def test_hostile_input_is_refused_before_validation(arguments: Any, field: str, fragment: str) -> None:
    error = check({}, arguments)  # the empty schema accepts every JSON value
    assert error is not None and error.field == field and fragment in str(error), str(error)[:300]
    assert str(error).startswith(f"invalid input for cap.run: at {field}: ")


def test_input_at_the_limits_is_accepted() -> None:
    assert check({}, nest(MAX_INPUT_DEPTH)) is None  # the innermost list is level MAX_INPUT_DEPTH
    assert check({"type": "array", "items": {"type": "integer"}}, list(range(MAX_INPUT_VALUES - 1))) is None
    recursive = {"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}
    error = check(recursive, nest(MAX_INPUT_DEPTH))
    assert error is not None and "'leaf' is not of type 'array'" in str(error)  # validated all the way down
    assert check(recursive, [[], [[]]]) is None
    big = check({"properties": {"a": {"type": "number", "multipleOf": 0.1}}}, {"a": 2**1000})
    assert big is None or "multiple" in str(big)  # arithmetic on a large integer never raises


def test_messages_abbreviate_large_values() -> None:
    error = check({"type": "string"}, {f"key{i}": "v" * 10_000 for i in range(100)})
    assert error is not None and len(str(error)) < 600 and "is not of type 'string'" in str(error)
    assert show("x" * 1000).endswith("...'") and len(show("x" * 1000)) <= 62
    assert show([list(range(100))] * 100).count("...") >= 2


# -- agreement with jsonschema on ordinary schemas --------------------------------------------

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "minLength": 2}}, "required": ["name"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 3},
    {"type": "array", "prefixItems": [{"type": "string"}], "items": False},
    {"type": "array", "contains": {"const": 3}, "minContains": 2},
    {"type": "object", "additionalProperties": {"type": "boolean"}, "properties": {"id": {"type": "integer"}}},
    {"type": "object", "patternProperties": {"^x-": {"type": "string"}}, "additionalProperties": False},
    {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer", "exclusiveMaximum": 10}]},
    {"oneOf": [{"type": "integer"}, {"type": "number", "multipleOf": 0.5}]},
    {"not": {"enum": [1, "a", None]}},
    {"if": {"properties": {"kind": {"const": "a"}}}, "then": {"required": ["a"]}, "else": {"required": ["b"]}},
    {"type": "object", "dependentRequired": {"a": ["b"]}, "dependentSchemas": {"c": {"required": ["d"]}}},
    {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}, "minProperties": 1, "maxProperties": 2},
    {"type": "string", "pattern": "^\\d{3}-[a-z]+$"},
    {"properties": {"a": {"type": "integer"}}, "unevaluatedProperties": False},
    {"prefixItems": [{"type": "integer"}], "unevaluatedItems": {"type": "string"}},
    {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["kids"],
            }
        },
        "$ref": "#/$defs/node",
    },
    {"type": "array", "uniqueItems": True, "items": {"enum": [1, 2, 3, [1], {"a": 1}]}},
    {"type": ["string", "null"], "format": "email"},
]
INSTANCES: list[Any] = [
    None,
    True,
    0,
    1,
    2.5,
    3,
    11,
    -1,
    "",
    "a",
    "ab",
    "abc",
    "abcd",
    "123-abc",
    "12-ab",
    [],
    [1],
    [1, 2, 3, 4],
    [3, 3],
    [3, 1],
    ["s", 1],
    ["s", "t"],
    [1, "x", "y"],
    [1, 1],
    [[1], [1.0]],
    {},
    {"name": "x"},
    {"name": "xy"},
    {"name": 5},
    {"id": 1, "ok": True},
    {"id": "1"},
    {"x-a": "s"},
    {"x-a": 1, "y": 2},
    {"kind": "a"},
    {"kind": "a", "a": 1},
    {"kind": "b"},
    {"b": 1},
    {"a": 1},
    {"a": 1, "b": 2},
    {"c": 1},
    {"c": 1, "d": 2},
    {"abc": 1},
    {"Abc": 1},
    {"a": 1, "b": 2, "c": 3},
    {"kids": []},
    {"kids": [{"kids": [{}]}]},
    {"a": "x"},
]


def reference_answers(schema: dict[str, Any], instance: Any) -> set[tuple[str, str]]:
    """(field, message) pairs jsonschema's best_match may give: one, or several when the most
    relevant errors tie (it then picks by the order of a set of keys)."""
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(instance))
    if not errors:
        return set()
    key = jsonschema.exceptions.relevance
    top = max(key(e) for e in errors)
    answers = set()
    for tie in (e for e in errors if key(e) == top):
        best = jsonschema.exceptions.best_match([tie])
        assert best is not None
        answers.add(("/" + "/".join(str(p) for p in best.absolute_path), best.message))
    return answers


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:50])
def test_agrees_with_jsonschema_on_validity_field_and_message(schema: dict[str, Any]) -> None:
    for instance in INSTANCES:
        expected = reference_answers(schema, instance)
        error = check(schema, instance)
        assert (error is None) == (not expected), (instance, expected)
        if error is not None:
            message = str(error).split(": ", 2)[2]
            if "has non-unique elements" in message:  # ours also names the two equal items
                message = message[: message.index(" (items ")]
            assert (error.field, message) in expected, (instance, error.field, message, expected)


def test_tool_input_error_matches_the_capsule_contract() -> None:
    error = check(SCHEMAS[0], {"name": 5})
    assert error is not None
    assert str(error) == "invalid input for cap.run: at /name: 5 is not of type 'string'"
    assert (error.tool, error.field) == ("run", "/name")


# -- schemas refused when the manifest loads ---------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "pointer", "fragment"),
    [
        ({"$ref": "https://example.com/schema.json"}, "/$ref", "points outside this schema"),
        ({"properties": {"a": {"$ref": "file:///etc/passwd"}}}, "/properties/a/$ref", "points outside"),
        ({"$ref": "other.json#/defs/a"}, "/$ref", "points outside"),
        ({"$ref": "https://json-schema.org/draft/2020-12/schema"}, "/$ref", "points outside"),
        ({"$ref": "#/$defs/missing"}, "/$ref", "refers to nothing"),
        ({"$ref": "#nowhere"}, "/$ref", "refers to nothing"),
        ({"required": ["a"], "items": {"$ref": "#/required"}}, "/items/$ref", "refers to a list, not a schema"),
        (
            {"properties": {"a": {"$ref": "#/properties/a/type"}, "b": {"type": "string"}}, "$comment": "x"},
            "/properties/a/$ref",
            "refers to nothing",
        ),
        ({"$ref": "#"}, "", "a cycle that consumes no input (# -> #)"),
        ({"allOf": [{"$ref": "#"}]}, "", "a cycle that consumes no input"),
        (
            {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
            "/$defs/a",
            "#/$defs/a -> #/$defs/b -> #/$defs/a",
        ),
        (
            {
                "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/b"}]}, "b": {"oneOf": [{"$ref": "#/$defs/a"}]}},
                "$ref": "#/$defs/a",
            },
            "/$defs/a",
            "a cycle",
        ),
        ({"$defs": {"a": {"not": {"$ref": "#/$defs/a"}}}}, "/$defs/a", "a cycle"),
        ({"$defs": {"a": {"if": {"$ref": "#/$defs/a"}}}}, "/$defs/a", "a cycle"),
        ({"$defs": {"a": {"then": {"$ref": "#/$defs/a"}}}}, "/$defs/a", "a cycle"),
        ({"$defs": {"a": {"else": {"allOf": [{"$ref": "#/$defs/a"}]}}}}, "/$defs/a", "a cycle"),
        ({"$defs": {"a": {"dependentSchemas": {"x": {"$ref": "#/$defs/a"}}}}}, "/$defs/a", "a cycle"),
        ({"$defs": {"a": {"$anchor": "top", "allOf": [{"$ref": "#top"}]}}}, "/$defs/a", "a cycle"),
        ({"$dynamicRef": "#meta"}, "/$dynamicRef", "$dynamicRef is not supported: use $ref"),
        ({"properties": {"a": {"$recursiveRef": "#"}}}, "/properties/a/$recursiveRef", "not supported"),
        ({"properties": {"a": {"$id": "https://example.com/a", "type": "string"}}}, "/properties/a/$id", "root"),
        ({"properties": {"a": {"pattern": "(a)\\1"}}}, "/properties/a/pattern", "backreferences cannot run"),
        ({"pattern": "(?=a)b"}, "/pattern", "lookahead and lookbehind cannot run on RE2"),
        ({"patternProperties": {"(?<!x)y": {}}}, "/patternProperties/(?<!x)y", "lookahead and lookbehind"),
        ({"patternProperties": {"a/b(": {}}}, "/patternProperties/a~1b(", "not a pattern RE2 can run"),
        ({"pattern": "a{1001}"}, "/pattern", "repetition"),
        ({"pattern": "\\uD800"}, "/pattern", "lone surrogate"),
        ({"minimum": float("nan")}, "/minimum", "not a JSON number"),
        ({"type": "strnig"}, "/type", "not a valid JSON Schema"),
    ],
)
def test_schemas_that_cannot_run_are_refused(schema: dict[str, Any], pointer: str, fragment: str) -> None:
    problem = refused(schema)
    assert problem.pointer == pointer and fragment in problem.reason, str(problem)
    assert str(problem).startswith(f"at #{pointer}: ")


def test_recursion_that_consumes_input_is_allowed() -> None:
    for schema in [
        {"type": "object", "properties": {"a": {"$ref": "#"}}},
        {"items": {"$ref": "#"}},
        {"prefixItems": [{"$ref": "#"}]},
        {"additionalProperties": {"$ref": "#"}},
        {"patternProperties": {"^x": {"$ref": "#"}}},
        {"contains": {"$ref": "#"}},
        {"propertyNames": {"$ref": "#"}},
        {"unevaluatedProperties": {"$ref": "#"}},
        {
            "$defs": {"a": {"allOf": [{"$ref": "#/$defs/b"}]}, "b": {"items": {"$ref": "#/$defs/a"}}},
            "$ref": "#/$defs/a",
        },
    ]:
        assert isinstance(compile_schema(schema), InputSchema)
        check(schema, nest(40))  # ends (with a verdict either way)
        check(schema, {"x1": {"x2": {"x3": [{"a": {"a": 1}}]}}})
    anchor = {"$defs": {"n": {"$anchor": "node", "items": {"$ref": "#node"}}}, "$ref": "#node"}
    assert check(anchor, [[[]]]) is None and check(anchor, [[[1]]]) is None


def test_a_reference_bomb_is_refused() -> None:
    defs: dict[str, Any] = {f"d{i}": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(20)}
    defs["d20"] = {"type": "string"}
    problem = refused({"$defs": defs, "$ref": "#/$defs/d0"})
    assert f"over {MAX_IN_PLACE} subschemas" in problem.reason


def test_recursion_too_deep_for_the_interpreter_is_a_tool_input_error() -> None:
    """The last resort: 22 allOf steps per level of input, 63 levels deep, overflows Python's
    recursion limit inside jsonschema; that is a refused input, not a traceback."""
    inner: dict[str, Any] = {"items": {"$ref": "#/$defs/n"}}
    for _ in range(22):
        inner = {"allOf": [inner]}
    error = check({"$defs": {"n": inner}, "$ref": "#/$defs/n"}, nest(63))
    assert error is not None and error.field == "/" and "nested too deeply" in str(error)


def test_a_long_chain_of_references_is_refused() -> None:
    defs: dict[str, Any] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(100)}
    defs["d100"] = {"type": "string"}
    assert "a chain of over" in refused({"$defs": defs, "$ref": "#/$defs/d0"}).reason


def test_a_deep_schema_is_refused_before_the_metaschema_recurses() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(2000):
        deep = {"not": deep}
    problem = refused(deep)
    assert f"deeper than {MAX_SCHEMA_DEPTH} levels" in problem.reason


def test_a_named_dialect_cannot_switch_to_the_stock_validator() -> None:
    """jsonschema validates a subschema that names its `$schema` with that dialect's stock
    validator (Python's re): also the root, when `$ref: "#"` re-enters it."""
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "properties": {"a": {"$ref": "#"}}}
    error = check({**root, "pattern": EVIL}, {"a": "a" * 5000 + "b"})
    assert error is not None and error.field == "/a" and "does not match" in str(error)
    nested = {"properties": {"a": {"$schema": "http://json-schema.org/draft-07/schema#", "pattern": EVIL}}}
    assert refused(nested).pointer == "/properties/a/$schema"
    target = {"$defs": {"a": {"$schema": "https://json-schema.org/draft/2020-12/schema"}}, "$ref": "#/$defs/a"}
    assert "only at the root" in refused(target).reason


def test_metaschema_messages_stay_short() -> None:
    problem = refused({"properties": [1] * 50_000})
    assert problem.pointer == "/properties" and len(problem.reason) < 260


def test_the_root_id_and_formats_are_fine() -> None:
    schema = {"$id": "https://example.com/tool.json", "$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s"}
    assert check(schema, "x") is None and check(schema, 1) is not None
    assert check({"format": "email"}, "not an email") is None  # formats annotate, as before


def test_a_manifest_names_the_tool_and_the_path() -> None:
    head = '[package]\nname = "x"\nversion = "0.1.0"\n[[component]]\nfile = "x.wasm"\n'
    tool = '[[tool]]\nname = "{name}"\ninput_schema = {schema}\n'
    good = tool.format(name="ok", schema='{ type = "object" }')
    bad = tool.format(name="grep", schema="{ properties = { q = { pattern = '(?<=x)y' } } }")
    remote = tool.format(name="fetch", schema='{ "$ref" = "https://example.com/s.json" }')
    with pytest.raises(ManifestError) as caught:
        parse_manifest(head + good + bad + remote, file="Capsule.toml")
    found = [str(p) for p in caught.value.problems]
    assert any("tool.1.input_schema" in p and "tool 'grep'" in p and "#/properties/q/pattern" in p for p in found)
    assert any("tool.2.input_schema" in p and "tool 'fetch'" in p and "points outside" in p for p in found)
    manifest = parse_manifest(head + good)
    assert manifest.tools[0].input is compile_schema({"type": "object"})  # compiled once, cached


# -- ECMA-262 patterns on RE2 -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("b", "abc", True),  # unanchored search
        ("^b", "abc", False),
        ("c$", "abc\n", False),  # ECMA's $ is the end of the text, not before a final newline
        ("a.c", "a\rc", False),
        ("a.c", "a\u2028c", False),
        ("a.c", "a-c", True),
        ("^\\s$", "\u00a0", True),
        ("^\\s$", "\u2003", True),
        ("^\\S$", "\u00a0", False),
        ("^[\\s]$", "\ufeff", True),
        ("^\\u00e9$", "é", True),
        ("^\\u{1F600}$", "😀", True),
        ("^\\uD83D\\uDE00$", "😀", True),
        ("^\\cJ$", "\n", True),
        ("[]", "anything", False),
        ("^[^]$", "\n", True),
        ("^[[:alpha:]]$", "a", False),  # ECMA: the class [[:alph] then a literal ]
        ("^[[:alpha:]]$", "a]", True),
        ("^[\\b]$", "\b", True),
        ("^(?<word>[a-z]+)$", "abc", True),
        ("^\\d+$", "٣", False),  # \d is ASCII in ECMA
        ("^\\p{L}+$", "héllo", True),
        ("é", "caf\u00e9", True),
        ("x", "\ud800x", True),  # a lone surrogate in the text does not break the search
    ],
)
def test_ecma_patterns_keep_their_meaning(pattern: str, text: str, matches: bool) -> None:
    assert compile_pattern(pattern).search(text) is matches, translate(pattern)


@pytest.mark.parametrize("pattern", ["(a)\\1", "\\k<n>", "(?=x)", "(?!x)", "(?<=x)", "(?<!x)", "\\", "(", "\\p{Nope}"])
def test_patterns_re2_cannot_run_are_refused(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_pattern(pattern)


# -- fuzz: compiling and validating raise only SchemaProblem and ToolInputError ------------------

KEYWORDS = st.sampled_from(
    ["type", "properties", "items", "prefixItems", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref",
     "$defs", "$anchor", "$id", "$schema", "pattern", "patternProperties", "additionalProperties", "dependentSchemas",
     "unevaluatedProperties", "unevaluatedItems", "contains", "propertyNames", "enum", "const", "uniqueItems",
     "minItems", "required", "multipleOf", "maximum", "a", "definitions", "$dynamicRef", "$dynamicAnchor", "format"]
)  # fmt: skip
REFS = st.sampled_from(
    ["#", "#/", "#/$defs/a", "#/properties/a", "#a", "#/%ZZ", "#/a~2", "#/items/0", "a.json", "urn:x", "#//",
     "#/definitions/a", "#/allOf/0", "#/$defs/a/properties/a"]
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 1000)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        ["string", "object", "array", "a", EVIL, "(?=x)", "[", "\\p{L}", "https://json-schema.org/draft/2020-12/schema"]
    )
    | REFS
)
SCHEMA_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYWORDS, inner, max_size=4), max_leaves=25
)
INPUTS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "b", "aaaa"]), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(KEYWORDS, SCHEMA_VALUES, max_size=6), INPUTS)
@settings(max_examples=500, deadline=None)
def test_fuzzed_schemas_and_inputs_raise_only_our_errors(schema: dict[str, Any], arguments: Any) -> None:
    try:
        compiled = compile_schema(schema)
    except SchemaProblem as problem:
        assert problem.reason
        return
    try:
        compiled.validate(arguments, capsule="c", tool="t")
    except ToolInputError as error:
        assert str(error).startswith("invalid input for c.t: at /")
