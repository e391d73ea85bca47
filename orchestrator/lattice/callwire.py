"""The wire format of a lattice tool call, read strictly: request and reply envelopes.

A call is one NATS request on `names.call(deployment)`; the hosts running the deployment
answer in a queue group (orchestrator.lattice.calls).

Request body, a JSON object (other members are ignored, for later versions):
    {"tool": "<name>", "arguments": "<the raw JSON text of the arguments>", "timeout_ms": N}
`arguments` is text, exactly what `orch call` or the control API would take as the body
("" or blanks: no arguments); `timeout_ms` is how long the caller waits for the answer.

Reply: the status in the header `Orch-Status` and the answering host (its id, encoded as
one NATS token) in `X-Host`. 200: the body is the tool's output as is (any bytes), with
the headers `X-Fuel-Used`, `X-Seconds` and `X-Attempts` of the control API. Otherwise the
body is `{"error": {"kind", "message", "status"}}`: the kind is the error's class name, the
message `str(error)` folded onto one line, the status `http_status(error)`, all as the
control API answers them (orchestrator.api.responses).

Arguments are parsed here, by the host, as strictly as the control API does (UTF-8 without
a byte-order mark, no NaN or Infinity, no number beyond a double, no lone surrogate, at most
MAX_JSON_DEPTH levels): a refusal is a `BadJson` (400) naming the problem. Anything else that
is not a well-formed request is a `MalformedCall` (400), arguments over MAX_ARGUMENT_BYTES are
`TooLarge` (413), as over the API. None of these ever reaches the capsule.

Pure. Used by orchestrator.lattice.calls.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import GateError, OrchestratorError, http_status
from .naming import decode_token, encode_token

MAX_ARGUMENT_BYTES = 1 << 20
"""The arguments' UTF-8 size at most: the control API's body cap."""

MAX_TOOL_CHARS = 1024
MAX_JSON_DEPTH = 64
STATUS = "Orch-Status"
HOST = "X-Host"
FUEL, SECONDS, ATTEMPTS = "X-Fuel-Used", "X-Seconds", "X-Attempts"

_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class MalformedCall(GateError):
    """A request that is not a lattice call envelope (400)."""


class BadJson(GateError):
    """The arguments are not strict JSON (400); the kind the control API gives a bad body."""


class TooLarge(GateError):
    """Arguments past MAX_ARGUMENT_BYTES (413, as the control API's body cap)."""


class HostBusy(OrchestratorError):
    """The host has as many calls waiting as it takes; this one was not run (503)."""


class OutputTooLarge(OrchestratorError):
    """The call ran, but its output does not fit in one message of the lattice's server."""


EXTRA_STATUS: tuple[tuple[type[BaseException], int], ...] = ((TooLarge, 413), (HostBusy, 503))


def status_of(error: BaseException) -> int:
    """`http_status(error)`, plus the statuses of this module's own kinds."""
    return next((code for kind, code in EXTRA_STATUS if isinstance(error, kind)), None) or http_status(error)


class CallResult(Protocol):
    """What a host's call returns (orchestrator.capsule.ToolResult)."""

    @property
    def output(self) -> bytes: ...
    @property
    def fuel_used(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def attempts(self) -> int: ...


@dataclass(frozen=True)
class CallRequest:
    tool: str
    arguments: Any  # parsed; None when there were none
    timeout_ms: int


# -- requests ----------------------------------------------------------------------------------
def encode_request(tool: str, arguments: bytes, timeout_ms: int) -> bytes:
    """The request body. BadJson when `arguments` is not UTF-8, TooLarge past the cap."""
    if len(arguments) > MAX_ARGUMENT_BYTES:
        raise TooLarge(f"the arguments are {len(arguments)} bytes, over the limit of {MAX_ARGUMENT_BYTES} (1 MiB)")
    try:
        text = arguments.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _bad_json(f"it is not UTF-8 (byte {error.start} cannot start or continue a character)") from None
    envelope = {"tool": tool, "arguments": text, "timeout_ms": timeout_ms}
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def decode_request(data: bytes) -> CallRequest:
    """The request in `data`; MalformedCall, BadJson or TooLarge when it is not one."""
    try:
        envelope = json.loads(data)
    except RecursionError:
        raise MalformedCall("the call request is not a JSON object (nested too deeply)") from None
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        raise MalformedCall(
            'the call request is not JSON: send {"tool": NAME, "arguments": JSON_TEXT, "timeout_ms": N}'
        ) from None
    if not isinstance(envelope, dict):
        raise MalformedCall(f"the call request is a JSON {type(envelope).__name__}, not an object")
    tool = envelope.get("tool")
    if not isinstance(tool, str) or not tool or len(tool) > MAX_TOOL_CHARS:
        raise MalformedCall(f"the call request's 'tool' must be a tool name (1-{MAX_TOOL_CHARS} characters)")
    text = envelope.get("arguments", "")
    if not isinstance(text, str):
        raise MalformedCall("the call request's 'arguments' must be the arguments' JSON text, as a string")
    timeout_ms = envelope.get("timeout_ms", 0)
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms < 0:
        raise MalformedCall("the call request's 'timeout_ms' must be an integer >= 0")
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_ARGUMENT_BYTES:
        raise TooLarge(f"the arguments are {size} bytes, over the limit of {MAX_ARGUMENT_BYTES} (1 MiB)")
    return CallRequest(tool, parse_arguments(text), timeout_ms)


def _bad_json(message: str) -> BadJson:
    return BadJson(f"the body is not valid JSON: {message}")


def parse_arguments(text: str) -> Any:
    """The arguments' JSON value (None for blank text), or BadJson naming the problem."""
    if not text.strip(" \t\n\r\x0b\x0c"):  # as the control API: ASCII blanks are no arguments
        return None
    if text.startswith("\ufeff"):
        raise _bad_json("it starts with a byte-order mark; send plain UTF-8")

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    def number(digits: str) -> float:
        value = float(digits)
        if not math.isfinite(value):
            shown = digits if len(digits) <= 24 else digits[:21] + "..."
            raise ValueError(f"the number {shown} is beyond the range of a double (about 1.8e308)")
        return value

    try:
        value = json.loads(text, parse_constant=constant, parse_float=number)
    except RecursionError:
        raise _bad_json(f"it is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as error:
        raise _bad_json(f"{error.msg} at line {error.lineno} column {error.colno}") from None
    except ValueError as error:  # a constant, a huge float, an integer of too many digits
        raise _bad_json(str(error)) from None
    suspicious = text.count("[") + text.count("{") > MAX_JSON_DEPTH or _LONE_SURROGATE_ESCAPE.search(text)
    if suspicious or not _encodable(text):
        problem = _problem(value)
        if problem:
            raise _bad_json(problem)
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _problem(value: Any) -> str | None:
    """Too deep, or a string holding a lone surrogate: what is wrong, else None."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return "a string contains a lone UTF-16 surrogate escape (\\ud800-\\udfff)"
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return f"it is nested deeper than {MAX_JSON_DEPTH} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


# -- replies -------------------------------------------------------------------------------------
def result_reply(result: CallResult, host: str) -> tuple[bytes, dict[str, str]]:
    headers = {
        STATUS: "200",
        HOST: encode_token(host),
        FUEL: str(result.fuel_used),
        SECONDS: f"{result.seconds:.6f}",
        ATTEMPTS: str(result.attempts),
    }
    return bytes(result.output), headers


def error_reply(error: BaseException, host: str) -> tuple[bytes, dict[str, str]]:
    status = status_of(error)
    detail = {"kind": type(error).__name__, "message": " ".join(str(error).split()), "status": status}
    return json.dumps({"error": detail}).encode(), {STATUS: str(status), HOST: encode_token(host)}


@dataclass(frozen=True)
class Reply:
    """A decoded reply: the output and its headers, or an error."""

    status: int
    output: bytes = b""
    headers: dict[str, str] | None = None
    kind: str = ""
    message: str = ""


def decode_reply(data: bytes, headers: dict[str, str] | None) -> Reply:
    """What a host answered. ValueError when it is not a reply this module made."""
    headers = headers or {}
    status = int(headers[STATUS]) if headers.get(STATUS, "").isdigit() else 0
    if not 200 <= status <= 599:
        raise ValueError("no Orch-Status header")
    host = decode_token(headers.get(HOST, "="))
    if status == 200:
        shown = {name: headers.get(name, "") for name in (FUEL, SECONDS, ATTEMPTS)}
        return Reply(200, data, {**shown, HOST: host})
    detail = json.loads(data)["error"]
    kind, message = detail["kind"], detail["message"]
    if not isinstance(kind, str) or not isinstance(message, str):
        raise ValueError("the error has no kind or message")
    return Reply(status, kind=kind, message=message, headers={HOST: host})
