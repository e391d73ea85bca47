"""Waiting for something to arrive on a stream in tests: the first item that matches, with a
backstop deadline (an event awaited, never a count of event-loop turns)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def first_match(stream: AsyncIterator[T], predicate: Callable[[T], bool], what: str, *, deadline: float) -> T:
    """The first item of `stream` that `predicate` accepts; AssertionError naming `what` when
    none comes within `deadline` seconds or the stream ends."""

    async def scan() -> T:
        async for item in stream:
            if predicate(item):
                return item
        raise AssertionError(f"the stream ended before: {what}")

    try:
        return await asyncio.wait_for(scan(), deadline)
    except TimeoutError:
        raise AssertionError(f"nothing came within {deadline:g} s: {what}") from None
