"""What a request carries, read strictly: JSON bodies, query parameters, bodies in time.

A body is accepted as JSON only if it is exactly JSON (RFC 8259) that every reader can read
back: UTF-8 without a byte-order mark; no NaN, Infinity or numbers beyond a double's range
(Python's json accepts them, and the guest would be handed values that are not JSON); no
lone UTF-16 surrogate (`"\\ud800"`, which cannot be encoded to UTF-8); at most
MAX_JSON_DEPTH levels of nesting. Query parameters are percent-decoded from the raw query
string and must be UTF-8 (aiohttp's own decoding replaces bad bytes with U+FFFD); an
endpoint names the parameters it takes, and an unknown or repeated one is refused. Each
refusal is an ApiError 400 naming the field (as a JSON pointer) or the parameter and what is
wrong; it never echoes more than a short excerpt of the input.

Used by orchestrator.api.server. The idea follows orchestrator.capsule.airlocks.parse_json
(a capsule's publishes); the API owns its own parsing so that errors name fields.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Collection
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from .responses import ApiError

MAX_JSON_DEPTH = 64
"""Nesting levels a JSON body may have (arrays and objects)."""

MAX_INT_DIGITS = 4300  # Python's own limit for int("..."): sys.int_info.default_max_str_digits

_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_DIGITS = re.compile(r"[0-9]{1,9}")


class _Invalid:
    """Stands in, during parsing, for a value that is not JSON; found afterwards by path."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _bad_json(message: str) -> ApiError:
    return ApiError(400, "BadJson", f"the body is not valid JSON: {message}")


def _pointer(path: list[str | int]) -> str:
    """A JSON pointer for `path`, each step escaped and shortened (it is quoted back)."""
    steps = []
    for step in path[:12]:
        text = json.dumps(step)[1:-1] if isinstance(step, str) else str(step)
        text = text.replace("~", "~0").replace("/", "~1")
        steps.append(text if len(text) <= 40 else text[:37] + "...")
    return ("/" + "/".join(steps) + ("/..." if len(path) > 12 else "")) if steps else "the top level"


def _find_problem(value: Any, max_depth: int) -> str | None:
    """The first value that is not JSON, or the first place nested too deeply, as a message."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict | list) and len(path) >= max_depth:
            return f"it is nested deeper than {max_depth} levels (at {_pointer(path)})"
        if isinstance(item, _Invalid):
            return f"{item.reason} (at {_pointer(path)})"
        if isinstance(item, str):
            if not item.isascii() and _has_lone_surrogate(item):
                return f"the string at {_pointer(path)} contains a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if not key.isascii() and _has_lone_surrogate(key):
                    return f"a name in the object at {_pointer(path)} contains a lone UTF-16 surrogate escape"
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, index]) for index, child in reversed(list(enumerate(item))))
    return None


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_json(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value in `data`, or ApiError 400 (kind BadJson) naming what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _bad_json(f"it is not UTF-8 (byte {error.start} cannot start or continue a character)") from None
    if text.startswith("\ufeff"):
        raise _bad_json("it starts with a byte-order mark; send plain UTF-8")
    flagged = False

    def constant(name: str) -> _Invalid:
        nonlocal flagged
        flagged = True
        return _Invalid(f"{name} is not a JSON number")

    def number(digits: str) -> float | _Invalid:
        nonlocal flagged
        value = float(digits)
        if math.isfinite(value):
            return value
        flagged = True
        shown = digits if len(digits) <= 24 else digits[:21] + "..."
        return _Invalid(f"the number {shown} is beyond the range of a double (about 1.8e308)")

    try:
        value = json.loads(text, parse_constant=constant, parse_float=number)
    except RecursionError:
        raise _bad_json(f"it is nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as error:
        raise _bad_json(f"{error.msg} at line {error.lineno} column {error.colno}") from None
    except ValueError as error:  # an integer literal longer than Python converts
        if "digits" in str(error):
            raise _bad_json(f"an integer has more than {MAX_INT_DIGITS} digits") from None
        raise _bad_json(str(error)) from None
    nested = text.count("[") + text.count("{") > max_depth
    if flagged or nested or _LONE_SURROGATE_ESCAPE.search(text):
        problem = _find_problem(value, max_depth)
        if problem is not None:
            raise _bad_json(problem)
    return value


def _decode_component(raw: str, what: str) -> str:
    """A percent-encoded query component (`+` is a space) decoded as strict UTF-8."""
    try:
        data = unquote_to_bytes(raw.replace("+", " ").encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # pragma: no cover - surrogateescape encodes any str
        raise ApiError(400, "BadQuery", f"{what} is malformed") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(
            400,
            "BadQuery",
            f"{what} is not UTF-8 once percent-decoded (byte {error.start}); percent-encode UTF-8 text",
        ) from None


def parse_query(raw: str, allowed: Collection[str]) -> dict[str, str]:
    """The parameters of the raw (still percent-encoded) query string `raw`; each must be
    one of `allowed`, given once, and UTF-8."""
    params: dict[str, str] = {}
    for part in raw.split("&") if raw else ():
        if not part:
            continue
        raw_name, _, raw_value = part.partition("=")
        name = _decode_component(raw_name, "a query parameter's name")
        if name not in allowed:
            shown = json.dumps(name[:40])
            takes = ", ".join(sorted(allowed)) or "none"
            raise ApiError(400, "BadQuery", f"unknown query parameter {shown}: this endpoint takes {takes}")
        if name in params:
            raise ApiError(400, "BadQuery", f"query parameter {name!r} is given more than once")
        params[name] = _decode_component(raw_value, f"query parameter {name!r}")
    return params


def parse_count(text: str, name: str, maximum: int) -> int:
    """A query parameter that is a plain decimal count between 0 and `maximum` (no sign, no
    spaces, no underscores, no non-ASCII digits: what `int()` would let through)."""
    if not _DIGITS.fullmatch(text) or int(text) > maximum:
        raise ApiError(400, "BadRequest", f"{name} must be an integer between 0 and {maximum}")
    return int(text)


class _Readable(Protocol):
    async def read(self) -> bytes: ...

    @property
    def content_length(self) -> int | None: ...


async def read_body(request: _Readable, *, timeout: float) -> bytes:
    """The whole request body, which must arrive within `timeout` seconds (else 408)."""
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        expected = request.content_length
        promised = f" of the {expected} bytes its Content-Length promised" if expected is not None else ""
        raise ApiError(
            408, "Timeout", f"the request body{promised} did not arrive within {timeout:g} s; send it at once"
        ) from None
