"""JSON Schema patterns (ECMA-262 regular expressions) on RE2, which cannot backtrack.

A `pattern` or a `patternProperties` key is an ECMA-262 regex that *searches* (it is not
anchored unless it says `^`/`$`). Python's `re` backtracks: `^(a+)+$` against 30 characters
takes minutes. RE2 runs in time linear in the text, at the price of lookaround and
backreferences, which it refuses; such a pattern is refused when the manifest loads.

`translate` rewrites the places where the two syntaxes read the same text differently:
`.` (ECMA excludes \\r, U+2028 and U+2029 too), `\\s`/`\\S` (ECMA's Unicode white space),
`\\uXXXX`, `\\u{X}` and `\\cX` escapes (RE2 spells them `\\x{X}`), `[]` and `[^]` (empty and
"anything" in ECMA, a literal `]` in RE2), `[\\b]` (backspace) and a `[` inside a class
(ECMA has no POSIX classes). Everything else goes to RE2 as written, which refuses what it
cannot run. Python's `re` is never used on a pattern.

`compile_pattern` translates and compiles (cached), raising PatternError with a reason;
`Regex.search` accepts any str (lone surrogates included) and never raises.

Pure. Used by orchestrator.desired.schema and its keywords.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

MAX_PATTERN_CHARS = 4096

# ECMA-262 WhiteSpace and LineTerminator: what \s matches there (RE2's \s is [\t\n\f\r ]).
_SPACE_BODY = r"\t\n\x{0B}\f\r \x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}\x{FEFF}"
_DOT = r"[^\n\r\x{2028}\x{2029}]"
_EVERYTHING = r"[\x{0}-\x{10FFFF}]"
_NOTHING = r"[^\x{0}-\x{10FFFF}]"
_HEX = frozenset("0123456789abcdefABCDEF")
_UNANCHORED = re2._re2.RE2.Anchor.UNANCHORED


class PatternError(ValueError):
    """A pattern that cannot run here: the message says why and what to write instead."""


class Regex:
    """A compiled pattern with JSON Schema's search semantics."""

    __slots__ = ("_match", "source")

    def __init__(self, source: str, compiled: Any) -> None:
        self.source = source
        # the binding's matcher: ~5x less overhead per call than the re-like wrapper around it
        self._match: Callable[[Any, bytes, int, int], list[tuple[int, int]]] = compiled._regexp.Match

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in `text` (time linear in its length). A lone
        surrogate is passed as the bytes it encodes to, which no pattern character matches."""
        data = text.encode("utf-8", "surrogatepass")
        return self._match(_UNANCHORED, data, 0, len(data))[0][0] != -1


@functools.lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> Regex:
    """`pattern` (ECMA-262) compiled for RE2. Raises PatternError saying why it cannot run."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"the pattern is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS}")
    translated = translate(pattern)
    options = re2.Options()
    options.log_errors = False
    options.never_capture = True
    try:
        compiled = re2.compile(translated, options)
    except re2.error as error:
        raise PatternError(_explain(error)) from None
    return Regex(pattern, compiled)


def _explain(error: Exception) -> str:
    raw = error.args[0] if error.args else ""
    reason = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if "perl operator" in reason and ("(?=" in reason or "(?!" in reason or "(?<" in reason):
        return f"lookahead and lookbehind cannot run on RE2 ({reason}): rewrite the pattern without them"
    if reason.startswith("invalid escape sequence: \\") and (reason[-1:].isdigit() or reason.endswith("\\k")):
        return f"backreferences cannot run on RE2 ({reason}): rewrite the pattern without them"
    if "repetition" in reason:
        return f"{reason}: counted repetition is limited to 1000 in all"
    if "too large" in reason:
        return f"{reason}: the compiled pattern would need too much memory; simplify it"
    return f"not a pattern RE2 can run: {reason}"


def translate(pattern: str) -> str:
    """`pattern` in RE2's syntax with ECMA-262's meaning. Raises PatternError for an escape
    that cannot be expressed (a lone surrogate)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        char = pattern[i]
        if char == "\\":
            if i + 1 >= n:
                raise PatternError("the pattern ends with a lone backslash")
            escape, i = _escape(pattern, i + 1, in_class)
            out.append(escape)
            continue
        if in_class:
            if char == "]":
                in_class = False
            elif char == "[":
                char = r"\["  # ECMA has no nested or POSIX classes: '[' is itself
            out.append(char)
            i += 1
            continue
        if char == "[":
            negated = pattern.startswith("^", i + 1)
            start = i + 2 if negated else i + 1
            if pattern.startswith("]", start):  # [] matches nothing, [^] anything
                out.append(_EVERYTHING if negated else _NOTHING)
                i = start + 1
                continue
            out.append("[^" if negated else "[")
            in_class = True
            i = start
            continue
        if char == ".":
            out.append(_DOT)
        elif char == "(" and pattern.startswith("(?<", i) and not pattern.startswith(("(?<=", "(?<!"), i):
            out.append("(?P<")  # a named group
            i += 3
            continue
        else:
            out.append(char)
        i += 1
    return "".join(out)


def _escape(pattern: str, i: int, in_class: bool) -> tuple[str, int]:
    """The RE2 spelling of the escape whose letter is at `i`, and the index after it."""
    letter = pattern[i]
    if letter == "u":
        code, end = _unicode_escape(pattern, i + 1)
        if code is None:
            return "\\u", i + 1  # RE2 refuses it, naming it
        if 0xD800 <= code <= 0xDBFF and pattern.startswith("\\u", end):
            low, after = _unicode_escape(pattern, end + 2)
            if low is not None and 0xDC00 <= low <= 0xDFFF:  # a surrogate pair: one code point
                return f"\\x{{{0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00):X}}}", after
        if 0xD800 <= code <= 0xDFFF:
            raise PatternError(f"\\u{code:04X} is a lone surrogate, which no UTF-8 text contains")
        return f"\\x{{{code:X}}}", end
    if letter == "c" and i + 1 < len(pattern) and pattern[i + 1].isascii() and pattern[i + 1].isalpha():
        return f"\\x{{{ord(pattern[i + 1]) % 32:X}}}", i + 2
    if letter == "s":
        return (_SPACE_BODY if in_class else f"[{_SPACE_BODY}]"), i + 1
    if letter == "S" and not in_class:
        return f"[^{_SPACE_BODY}]", i + 1
    if letter == "b" and in_class:
        return r"\x{8}", i + 1
    return "\\" + letter, i + 1


def _unicode_escape(pattern: str, i: int) -> tuple[int | None, int]:
    """The code point of `XXXX` or `{X...}` at `i`, and the index after it (None: malformed)."""
    if pattern.startswith("{", i):
        close = pattern.find("}", i + 1)
        digits = pattern[i + 1 : close] if close > i + 1 else ""
        if not digits or len(digits) > 6 or not set(digits) <= _HEX or int(digits, 16) > 0x10FFFF:
            return None, i
        return int(digits, 16), close + 1
    digits = pattern[i : i + 4]
    if len(digits) != 4 or not set(digits) <= _HEX:
        return None, i
    return int(digits, 16), i + 4
