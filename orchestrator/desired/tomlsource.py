"""TOML text to plain data for Capsule.toml, refusing what would break the parser, and lines.

tomllib parses arrays and inline tables recursively: `a = [[[[...` 3,000 deep ends in a
RecursionError traceback. `read_toml` first scans the text (iteratively, aware of the four
kinds of strings and of comments) for arrays and inline tables nested deeper than
MAX_DEPTH, then parses, then checks the depth of the data itself (dotted keys and table
headers such as `[a.b.c....]` nest without brackets). It also turns what tomllib raises
besides TOMLDecodeError (an integer of more than 4300 digits) into a Problem.

`key_lines` maps key paths to their lines, in time linear in the text (once per file, not
once per problem: a regex per line was cubic in a long line).

Pure: text in, data or ManifestError out. Used by orchestrator.desired.manifest.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from ..errors import ManifestError, Problem
from .common import MAX_DEPTH, Loc, deepest, dotted, line_at, surrogate_line

_INTERESTING = re.compile(r"[\[\]{}\"'#]")
_KEY = re.compile(r'("[^"\n]*"|[A-Za-z0-9_-]+)[ \t]*=')


def read_toml(text: str, *, file: str) -> dict[str, Any]:
    """The data of TOML `text` read from `file`. Raises ManifestError (with the line)."""
    if (bad := surrogate_line(text)) is not None:
        raise ManifestError([Problem("not UTF-8 text (a lone surrogate): save it as UTF-8", file=file, line=bad)])
    line = nesting_line(text, MAX_DEPTH)
    if line is not None:
        message = f"arrays and inline tables nested deeper than {MAX_DEPTH} levels: flatten them"
        raise ManifestError([Problem(message, file=file, line=line)])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        match = re.search(r"at line (\d+)", str(error))
        raise ManifestError(
            [Problem(f"not valid TOML: {error}", file=file, line=int(match.group(1)) if match else None)]
        ) from None
    except ValueError as error:  # int() past sys.get_int_max_str_digits()
        raise ManifestError([Problem(f"not valid TOML: {error}", file=file, line=_long_number_line(text))]) from None
    except RecursionError:  # the scan above should make this unreachable
        message = f"nested too deeply to read (at most {MAX_DEPTH} levels)"
        raise ManifestError([Problem(message, file=file)]) from None
    loc = deepest(data, MAX_DEPTH)
    if loc is not None:
        message = f"tables and arrays nested deeper than {MAX_DEPTH} levels (dotted keys count): flatten them"
        raise ManifestError(
            [
                Problem(
                    message,
                    file=file,
                    line=line_of(text, tuple(loc)),
                    field=dotted(loc[:8]) + ("..." if len(loc) > 8 else ""),
                )
            ]
        )
    return data


def nesting_line(text: str, limit: int) -> int | None:
    """The line where arrays and inline tables first nest deeper than `limit`, or None.
    Brackets inside strings and comments do not count; a table header counts while open."""
    depth = 0
    position = 0
    while (found := _INTERESTING.search(text, position)) is not None:
        char = found.group()
        start = found.start()
        if char == "#":
            end = text.find("\n", start)
            position = len(text) if end < 0 else end
        elif char in "\"'":
            position = _string_end(text, start)
        elif char in "[{":
            depth += 1
            if depth > limit:
                return text.count("\n", 0, start) + 1
            position = start + 1
        else:
            depth = max(depth - 1, 0)
            position = start + 1
    return None


def _string_end(text: str, start: int) -> int:
    """The index after the string starting at `start` (the end of the text if unterminated)."""
    quote = text[start]
    if text.startswith(quote * 3, start):
        position = start + 3
        while True:
            close = text.find(quote * 3, position)
            if close < 0:
                return len(text)
            if quote == '"' and _escaped(text, close):
                position = close + 1
                continue
            end = close + 3
            while end < len(text) and text[end] == quote and end - close < 5:  # up to two quotes of content
                end += 1
            return end
    position = start + 1
    while True:
        close = text.find(quote, position)
        newline = text.find("\n", position, len(text) if close < 0 else close)
        if newline >= 0:
            return newline  # unterminated: tomllib reports it
        if close < 0:
            return len(text)
        if quote == '"' and _escaped(text, close):
            position = close + 1
            continue
        return close + 1


def _escaped(text: str, index: int) -> bool:
    """Whether the character at `index` follows an odd number of backslashes."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def _long_number_line(text: str) -> int | None:
    match = re.search(r"\d{4000}", text)
    return text.count("\n", 0, match.start()) + 1 if match else None


def line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line of key path `loc` in TOML `text` (see `key_lines`)."""
    return line_at(key_lines(text), loc)


def key_lines(text: str) -> dict[Loc, int]:
    """The line of each key and table header in TOML `text`, by key path, for `line_at`: the
    deepest key or header on a path is its best line (an error inside an inline table
    points at the key that holds it). Linear in the length of the text."""
    lines: dict[Loc, int] = {}
    table: Loc = ()
    counts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("["):
            array = line.startswith("[[")
            close = line.find("]")
            if close < 0:
                continue
            parts: Loc = tuple(p.strip().strip('"') for p in line[2 if array else 1 : close].split("."))
            if array:
                lines.setdefault(parts, number)
                name = ".".join(str(p) for p in parts)
                counts[name] = counts.get(name, -1) + 1
                parts = (*parts, counts[name])
            table = parts
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            lines.setdefault((*table, key.group(1).strip('"')), number)
    return lines
