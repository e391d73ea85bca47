"""The JSON Schema keywords that tool input validation replaces, and its step budget.

jsonschema's Draft 2020-12 keywords are right but not safe against hostile input: `pattern`,
`patternProperties`, `additionalProperties` and `unevaluatedProperties` run Python's
backtracking `re` (`^(a+)+$` against 30 characters takes minutes); `uniqueItems` compares
every pair of objects (8,000 objects: over two minutes); `unevaluatedItems` and
`unevaluatedProperties` look indexes and keys up in lists (quadratic); and most messages
quote the whole offending value (a 1 MiB input echoed into an error, once per failing
branch). The replacements here keep jsonschema's behaviour and wording for small values:

- patterns run on RE2 (orchestrator.desired.ecmaregex), in time linear in the text;
- `uniqueItems` sorts canonical keys (O(n log n)) with JSON equality: 1 == 1.0, true != 1,
  object key order is irrelevant;
- evaluated indexes and keys are sets;
- a value in a message is shown abbreviated (`show`).

Every keyword call spends steps from the budget of the current validation (`budget`): one,
plus the length of the container it walks, plus the length of the text a pattern reads. An
input and schema that would need more raise BudgetExceeded instead of running on.

Used by orchestrator.desired.schema, which builds the validator class from these.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from jsonschema._utils import equal
from jsonschema.exceptions import ValidationError

from .ecmaregex import compile_pattern

Keyword = Callable[[Any, Any, Any, Any], Any]
Errors = Iterator[ValidationError]

TEXT_STEP = 256  # characters a pattern reads per step


class BudgetExceeded(Exception):
    """The validation needed more steps than its budget."""


class _Budget:
    __slots__ = ("left",)

    def __init__(self, steps: int) -> None:
        self.left = steps


_BUDGET: ContextVar[_Budget | None] = ContextVar("schema_steps", default=None)


@contextlib.contextmanager
def budget(steps: int) -> Iterator[None]:
    """Validation inside this block may spend at most `steps` (BudgetExceeded past that)."""
    token = _BUDGET.set(_Budget(steps))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def spend(steps: int) -> None:
    current = _BUDGET.get()
    if current is not None:
        current.left -= steps
        if current.left < 0:
            raise BudgetExceeded


_CONTAINERS = (list, dict)


def counted(keyword: Keyword) -> Keyword:
    """`keyword`, spending 1 + the sizes of its schema value and its instance per call."""

    def spending(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        current = _BUDGET.get()
        if current is not None:  # spend(), inlined: this runs for every keyword of every value
            current.left -= 1
            if type(value) in _CONTAINERS:
                current.left -= len(value)
            if type(instance) in _CONTAINERS:
                current.left -= len(instance)
            if current.left < 0:
                raise BudgetExceeded
        return keyword(validator, value, instance, schema)

    spending.__name__ = getattr(keyword, "__name__", "keyword")
    return spending


def search(pattern: str, text: str) -> bool:
    spend(1 + len(text) // TEXT_STEP)
    return compile_pattern(pattern).search(text)


# -- showing values ---------------------------------------------------------------------

SHOW_ITEMS = 6
SHOW_TEXT = 60


def show(value: Any, level: int = 0) -> str:
    """repr(value) for small values; an abbreviation (at most a few hundred characters,
    whatever the size of `value`) for large ones."""
    if level == 0 and _small(value):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= SHOW_TEXT else repr(value[: SHOW_TEXT - 3])[:-1] + "...'"
    if isinstance(value, dict):
        if level >= 2 and value:
            return "{...}"
        shown = [f"{show(k, 2)}: {show(v, level + 1)}" for k, v in itertools.islice(value.items(), SHOW_ITEMS)]
        return "{" + ", ".join(shown) + (", ..." if len(value) > SHOW_ITEMS else "") + "}"
    if isinstance(value, list):
        if level >= 2 and value:
            return "[...]"
        shown = [show(v, level + 1) for v in value[:SHOW_ITEMS]]
        return "[" + ", ".join(shown) + (", ..." if len(value) > SHOW_ITEMS else "") + "]"
    text = repr(value)
    return text if len(text) <= SHOW_TEXT else text[: SHOW_TEXT - 3] + "..."


def _small(value: Any) -> bool:
    """Whether repr(value) is short: few values, little text (stops looking early)."""
    budget = SHOW_TEXT * 3
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict | list):
            if len(item) > SHOW_ITEMS:
                return False
            stack.extend(item.items() if isinstance(item, dict) else item)
            budget -= 2
        elif isinstance(item, tuple):  # a dict's (key, value)
            stack.extend(item)
        else:
            budget -= len(item) if isinstance(item, str) else 8
        if budget < 0:
            return False
    return True


def _listed(values: list[Any]) -> str:
    shown = ", ".join(show(v, 1) for v in values[:SHOW_ITEMS])
    return shown + (f", ... ({len(values)} in all)" if len(values) > SHOW_ITEMS else "")


def _extras(extras: list[Any]) -> tuple[str, str]:
    return _listed(extras), "was" if len(extras) == 1 else "were"


# -- JSON equality for uniqueItems ------------------------------------------------------


def json_key(value: Any) -> tuple[Any, ...]:
    """A sortable key equal for JSON-equal values (1 == 1.0, true != 1, key order ignored)."""
    if value is None:
        return (0,)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, int | float):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    if isinstance(value, list):
        return (4, tuple(json_key(v) for v in value))
    if isinstance(value, dict):
        return (5, tuple(sorted((str(k), json_key(v)) for k, v in value.items())))
    return (6, repr(value))


def first_duplicate(items: list[Any]) -> tuple[int, int] | None:
    """The indexes of two JSON-equal items (the earliest pair by sort order), or None."""
    keys = [json_key(item) for item in items]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    for a, b in itertools.pairwise(order):
        if keys[a] == keys[b]:
            return min(a, b), max(a, b)
    return None


# -- the keywords -----------------------------------------------------------------------


def unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Errors:
    if unique and validator.is_type(instance, "array"):
        pair = first_duplicate(instance)
        if pair is not None:
            yield ValidationError(f"{show(instance)} has non-unique elements (items {pair[0]} and {pair[1]} are equal)")


def pattern(validator: Any, regex: Any, instance: Any, schema: Any) -> Errors:
    if validator.is_type(instance, "string") and not search(regex, instance):
        yield ValidationError(f"{show(instance)} does not match {regex!r}")


def pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any) -> Errors:
    if not validator.is_type(instance, "object"):
        return
    for regex, subschema in patterns.items():
        for key, value in instance.items():
            if search(regex, key):
                yield from validator.descend(value, subschema, path=key, schema_path=regex)


def _additional(instance: dict[str, Any], schema: Any) -> list[str]:
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return [k for k in instance if k not in properties and not any(search(p, k) for p in patterns)]


def additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Errors:
    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            patterns = _listed(sorted(schema["patternProperties"]))
            yield ValidationError(f"{_listed(sorted(extras))} {verb} not match any of the regexes: {patterns}")
        else:
            shown, verb = _extras(sorted(extras))
            yield ValidationError(f"Additional properties are not allowed ({shown} {verb} unexpected)")


def items(validator: Any, each: Any, instance: Any, schema: Any) -> Errors:
    if not validator.is_type(instance, "array"):
        return
    prefix = len(schema.get("prefixItems", []))
    extra = len(instance) - prefix
    if extra <= 0:
        return
    if each is False:
        rest = instance[prefix:] if extra != 1 else instance[prefix]
        noun = "items" if prefix != 1 else "item"
        yield ValidationError(f"Expected at most {prefix} {noun} but found {extra} extra: {show(rest)}")
        return
    for index in range(prefix, len(instance)):
        yield from validator.descend(instance=instance[index], schema=each, path=index)


def contains(validator: Any, subschema: Any, instance: Any, schema: Any) -> Errors:
    if not validator.is_type(instance, "array"):
        return
    matches = 0
    min_contains = schema.get("minContains", 1)
    max_contains = schema.get("maxContains", len(instance))
    matcher = validator.evolve(schema=subschema)
    for item in instance:
        if matcher.is_valid(item):
            matches += 1
            if matches > max_contains:
                yield ValidationError(
                    f"Too many items match the given schema (expected at most {max_contains})",
                    validator="maxContains",
                    validator_value=max_contains,
                )
                return
    if matches < min_contains:
        if not matches:
            yield ValidationError(f"{show(instance)} does not contain items matching the given schema")
        else:
            yield ValidationError(
                f"Too few items match the given schema (expected at least {min_contains} but only {matches} matched)",
                validator="minContains",
                validator_value=min_contains,
            )


def _bound(kind: str, small: str, large: str) -> Keyword:
    """minLength/maxLength/minItems/maxItems/minProperties/maxProperties: `small` when the
    bound is 1 (min) or 0 (max), `large` otherwise."""
    minimum = kind.startswith("min")
    json_type = {"Length": "string", "Items": "array", "Properties": "object"}[kind[3:]]

    def keyword(validator: Any, bound: Any, instance: Any, schema: Any) -> Errors:
        if not validator.is_type(instance, json_type):
            return
        if (len(instance) < bound) if minimum else (len(instance) > bound):
            message = small if bound == (1 if minimum else 0) else large
            yield ValidationError(f"{show(instance)} {message}")

    keyword.__name__ = kind
    return keyword


min_length = _bound("minLength", "should be non-empty", "is too short")
max_length = _bound("maxLength", "is expected to be empty", "is too long")
min_items = _bound("minItems", "should be non-empty", "is too short")
max_items = _bound("maxItems", "is expected to be empty", "is too long")
min_properties = _bound("minProperties", "should be non-empty", "does not have enough properties")
max_properties = _bound("maxProperties", "is expected to be empty", "has too many properties")


def enum(validator: Any, enums: Any, instance: Any, schema: Any) -> Errors:
    if all(not equal(each, instance) for each in enums):
        yield ValidationError(f"{show(instance)} is not one of {show(enums)}")


def type_(validator: Any, types: Any, instance: Any, schema: Any) -> Errors:
    names = [types] if isinstance(types, str) else types
    if not any(validator.is_type(instance, name) for name in names):
        yield ValidationError(f"{show(instance)} is not of type {', '.join(repr(n) for n in names)}")


def any_of(validator: Any, subschemas: Any, instance: Any, schema: Any) -> Errors:
    all_errors: list[ValidationError] = []
    for index, subschema in enumerate(subschemas):
        errors = list(validator.descend(instance, subschema, schema_path=index))
        if not errors:
            return
        all_errors.extend(errors)
    yield ValidationError(f"{show(instance)} is not valid under any of the given schemas", context=all_errors)


def one_of(validator: Any, subschemas: Any, instance: Any, schema: Any) -> Errors:
    candidates = enumerate(subschemas)
    all_errors: list[ValidationError] = []
    first_valid: Any = None
    for index, subschema in candidates:
        errors = list(validator.descend(instance, subschema, schema_path=index))
        if not errors:
            first_valid = subschema
            break
        all_errors.extend(errors)
    else:
        yield ValidationError(f"{show(instance)} is not valid under any of the given schemas", context=all_errors)
    more_valid = [each for _, each in candidates if validator.evolve(schema=each).is_valid(instance)]
    if more_valid:
        more_valid.append(first_valid)
        yield ValidationError(f"{show(instance)} is valid under each of {', '.join(show(s) for s in more_valid)}")


def not_(validator: Any, not_schema: Any, instance: Any, schema: Any) -> Errors:
    if validator.evolve(schema=not_schema).is_valid(instance):
        yield ValidationError(f"{show(instance)} should not be valid under {show(not_schema)}")


def unevaluated_items(validator: Any, unevaluated: Any, instance: Any, schema: Any) -> Errors:
    if not validator.is_type(instance, "array"):
        return
    evaluated = evaluated_indexes(validator, instance, schema)
    rest = [item for index, item in enumerate(instance) if index not in evaluated]
    if rest:
        shown, verb = _extras(rest)
        yield ValidationError(f"Unevaluated items are not allowed ({shown} {verb} unexpected)")


def unevaluated_properties(validator: Any, unevaluated: Any, instance: Any, schema: Any) -> Errors:
    if not validator.is_type(instance, "object"):
        return
    evaluated = evaluated_keys(validator, instance, schema)
    rest: list[str] = []
    for key in instance:
        if key not in evaluated:
            for _ in validator.descend(instance[key], unevaluated, path=key, schema_path=key):
                rest.append(key)
    if rest:
        if unevaluated is False:
            shown, verb = _extras(sorted(rest))
            yield ValidationError(f"Unevaluated properties are not allowed ({shown} {verb} unexpected)")
        else:
            shown, verb = _extras(rest)
            yield ValidationError(
                f"Unevaluated properties are not valid under the given schema ({shown} {verb} unevaluated and invalid)"
            )


def _resolved(validator: Any, schema: Any) -> tuple[Any, Any] | None:
    ref = schema.get("$ref")
    if ref is None:
        return None
    target = validator._resolver.lookup(ref)
    return validator.evolve(schema=target.contents, _resolver=target.resolver), target.contents


def evaluated_indexes(validator: Any, instance: list[Any], schema: Any) -> set[int]:
    """The indexes of `instance` that `schema` evaluates (for unevaluatedItems)."""
    spend(1 + len(instance))
    if validator.is_type(schema, "boolean"):
        return set()
    if "items" in schema:
        return set(range(len(instance)))
    found: set[int] = set()
    if (resolved := _resolved(validator, schema)) is not None:
        found |= evaluated_indexes(resolved[0], instance, resolved[1])
    if "prefixItems" in schema:
        found |= set(range(min(len(schema["prefixItems"]), len(instance))))
    if "if" in schema:
        if validator.evolve(schema=schema["if"]).is_valid(instance):
            found |= evaluated_indexes(validator, instance, schema["if"])
            if "then" in schema:
                found |= evaluated_indexes(validator, instance, schema["then"])
        elif "else" in schema:
            found |= evaluated_indexes(validator, instance, schema["else"])
    for keyword in ("contains", "unevaluatedItems"):
        if keyword in schema:
            matcher = validator.evolve(schema=schema[keyword])
            found |= {index for index, item in enumerate(instance) if matcher.is_valid(item)}
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if next(validator.descend(instance, subschema), None) is None:
                found |= evaluated_indexes(validator, instance, subschema)
    return found


def evaluated_keys(validator: Any, instance: dict[str, Any], schema: Any) -> set[str]:
    """The keys of `instance` that `schema` evaluates (for unevaluatedProperties)."""
    spend(1 + len(instance))
    if validator.is_type(schema, "boolean"):
        return set()
    found: set[str] = set()
    if (resolved := _resolved(validator, schema)) is not None:
        found |= evaluated_keys(resolved[0], instance, resolved[1])
    properties = schema.get("properties")
    if validator.is_type(properties, "object"):
        found |= properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if (subschema := schema.get(keyword)) is not None:
            found |= {k for k, v in instance.items() if next(validator.descend(v, subschema), None) is None}
    for regex in schema.get("patternProperties", {}):
        found |= {k for k in instance if search(regex, k)}
    for key, subschema in schema.get("dependentSchemas", {}).items():
        if key in instance:
            found |= evaluated_keys(validator, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if next(validator.descend(instance, subschema), None) is None:
                found |= evaluated_keys(validator, instance, subschema)
    if "if" in schema:
        if validator.evolve(schema=schema["if"]).is_valid(instance):
            found |= evaluated_keys(validator, instance, schema["if"])
            if "then" in schema:
                found |= evaluated_keys(validator, instance, schema["then"])
        elif "else" in schema:
            found |= evaluated_keys(validator, instance, schema["else"])
    return found


REPLACED: dict[str, Keyword] = {
    "additionalProperties": additional_properties,
    "anyOf": any_of,
    "contains": contains,
    "enum": enum,
    "items": items,
    "maxItems": max_items,
    "maxLength": max_length,
    "maxProperties": max_properties,
    "minItems": min_items,
    "minLength": min_length,
    "minProperties": min_properties,
    "not": not_,
    "oneOf": one_of,
    "pattern": pattern,
    "patternProperties": pattern_properties,
    "type": type_,
    "unevaluatedItems": unevaluated_items,
    "unevaluatedProperties": unevaluated_properties,
    "uniqueItems": unique_items,
}
"""Keyword name -> the replacement of jsonschema's Draft 2020-12 implementation."""
