"""A tool's JSON arguments as the dashboard takes them: the field they are typed in, and the
check against the tool's input schema before anything is sent.

The check uses the orchestrator's own validator (orchestrator.desired.schema: ECMA patterns
on RE2 in linear time, a step budget, bounded input), not stock jsonschema, so a capsule
whose schema holds a hostile `pattern` such as `^(a+)+$` cannot freeze the dashboard, and
the dashboard refuses exactly what the orchestrator would. It is still CPU work, so the
detail screen runs it on a worker thread (tui.detail).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import Input

from orchestrator.desired.schema import MAX_INPUT_CHARS, SchemaProblem, compile_schema
from orchestrator.errors import ToolInputError

_TOOL = Binding.Group("Tool")


def check_arguments(text: str, schema: Any, *, capsule: str, tool: str) -> tuple[Any, list[str]]:
    """The parsed arguments and the problems with them (none: ready to send). Empty text
    means `{}`. Synchronous and CPU-bound (bounded by the validator's step budget)."""
    if not text.strip():
        value: Any = {}
    else:
        try:
            value = json.loads(text)
        except RecursionError:
            return None, ["not JSON: nested too deeply"]
        except ValueError as error:
            return None, [f"not JSON: {error}"]
    try:
        compiled = compile_schema({} if schema is None else schema)
    except SchemaProblem as problem:
        return value, [f"the tool's input schema is unusable ({problem}); its capsule must fix it"]
    try:
        compiled.validate(value, capsule=capsule, tool=tool)
    except ToolInputError as error:
        message = str(error)
        return value, [message.removeprefix(f"invalid input for {capsule}.{tool}: ")]
    return value, []


class ArgumentsField(Input):
    """The chosen tool's JSON arguments. Every printable key types (Input consumes them, so
    no screen shortcut fires); `up`/`down` choose another tool; `enter` runs (Submitted);
    escape leaves the field (the screen's binding)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "submit", "Run"),
        Binding("up", "step(-1)", "Tool", group=_TOOL),
        Binding("down", "step(1)", "Tool", group=_TOOL),
    ]

    class Step(Message):
        """Choose the tool `delta` places up or down the list."""

        def __init__(self, delta: int) -> None:
            super().__init__()
            self.delta = delta

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(placeholder="{}   JSON arguments", max_length=MAX_INPUT_CHARS, id=id)
        self.border_title = "arguments"

    def action_step(self, delta: int) -> None:
        self.post_message(self.Step(delta))
