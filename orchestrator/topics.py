"""NATS subject syntax and matching: the one place that knows what a topic and a pattern are.

A *topic* is a concrete subject (`orch.capsule.hello.running`): dot-separated tokens, at
most 256 bytes of UTF-8 and 16 tokens, no empty token, no whitespace or control character,
no wildcard. A *pattern* may also use `*` as a whole token (exactly one token) and `>` as
the whole last token (one or more tokens). The same rules hold on the bus, in manifest
grants and interceptors, in the control API's event filter and in the dashboard, so a
pattern means one thing everywhere and maps 1:1 onto NATS subjects.

Pure functions over strings. Malformed input raises `TopicError` (a `GateError`) whose
message names the rule that was broken. Used by the gate, the bus, the manifest loader,
the control API and the dashboard; imports only orchestrator.errors.
"""

from __future__ import annotations

import re

from .errors import GateError

MAX_TOPIC_BYTES = 256
MAX_TOPIC_TOKENS = 16
_BLANK = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")  # \s is Unicode whitespace (str.isspace)
_SHOWN_CHARS = 120

Tokens = tuple[str, ...]


class TopicError(GateError):
    """A malformed topic or pattern; the message names the rule."""


def shown(text: str) -> str:
    """`text` for a message: as is when short and printable, else a truncated repr."""
    if len(text) <= _SHOWN_CHARS and text.isprintable():
        return text
    if len(text) > _SHOWN_CHARS:
        return repr(text[:_SHOWN_CHARS]) + f"... ({len(text)} characters)"
    return repr(text)


def _split(text: object, what: str, *, wildcards: bool) -> Tokens:
    if not isinstance(text, str):
        raise TopicError(f"a {what} must be a string, not {type(text).__name__}")
    if not text:
        raise TopicError(f"{what} is empty")
    try:
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise TopicError(f"{what} {shown(text)} is not valid UTF-8 (lone surrogate)") from None
    named = f"{what} {shown(text)}"
    if size > MAX_TOPIC_BYTES:
        raise TopicError(f"{named} of {size} bytes exceeds the limit of {MAX_TOPIC_BYTES} bytes")
    if blank := _BLANK.search(text):
        raise TopicError(f"{named} contains whitespace or a control character at index {blank.start()}")
    tokens = tuple(text.split("."))
    if len(tokens) > MAX_TOPIC_TOKENS:
        raise TopicError(f"{named} has {len(tokens)} tokens, over the limit of {MAX_TOPIC_TOKENS}")
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        if not token:
            raise TopicError(f"{named} has an empty token at position {index} (leading, trailing or double dot)")
        if "*" not in token and ">" not in token:
            continue
        if not wildcards:
            raise TopicError(f"{named} contains a wildcard ('*' or '>'): wildcards belong in patterns")
        if "*" in token and token != "*":
            raise TopicError(f"{named} uses '*' inside a token: '*' must be a whole token")
        if token != "*" and (token != ">" or index != last):
            raise TopicError(f"{named}: '>' may only be the whole last token")
    return tokens


def split_topic(topic: object) -> Tokens:
    """The tokens of a concrete subject; TopicError naming the broken rule."""
    return _split(topic, "topic", wildcards=False)


def split_pattern(pattern: object) -> Tokens:
    """The tokens of a pattern (`*` a whole token, `>` the whole last token)."""
    return _split(pattern, "pattern", wildcards=True)


def check_topic(topic: str) -> None:
    """A concrete subject to publish on (no wildcards); TopicError naming the rule."""
    split_topic(topic)


def check_pattern(pattern: str) -> None:
    """A subscription or grant pattern; TopicError naming the rule."""
    split_pattern(pattern)


def tokens_match(pattern: Tokens, topic: Tokens | list[str]) -> bool:
    """NATS matching of checked pattern tokens against checked topic tokens."""
    if pattern[-1] == ">":
        fixed = len(pattern) - 1
        if len(topic) <= fixed:
            return False
    else:
        fixed = len(pattern)
        if len(topic) != fixed:
            return False
    for index in range(fixed):
        token = pattern[index]
        if token != "*" and token != topic[index]:
            return False
    return True


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether `topic` matches `pattern` (both assumed valid; otherwise compared token by token)."""
    return tokens_match(tuple(pattern.split(".")), topic.split("."))


def pattern_covers(grant: str, pattern: str) -> bool:
    """Whether every topic matching `pattern` also matches `grant`."""
    granted, wanted = grant.split("."), pattern.split(".")
    for index, token in enumerate(granted):
        if token == ">":
            return len(wanted) > index
        if index >= len(wanted) or wanted[index] == ">":
            return False
        if token != "*" and token != wanted[index]:
            return False
    return len(wanted) == len(granted)


class Pattern:
    """A checked pattern, split once, for matching many topics."""

    __slots__ = ("text", "tokens")

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = split_pattern(text)

    def matches(self, topic: str) -> bool:
        return self.tokens == (">",) or tokens_match(self.tokens, topic.split("."))

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"
