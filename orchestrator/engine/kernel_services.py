"""The kernel's host-backed functions: config, vars, logging and (denied) HTTP.

kernel.wat imports these from `orch:kernel` and re-exports them under their Extism names.
They are defined once per engine on a shared Linker, so they cannot close over a plugin:
each finds the instance it serves through `instance.current_instance()` (the thread-local
set around every guest call). Errors are recorded on the instance before trapping, so the
caller receives the real error, not wasmtime's generic "python exception".

Used by orchestrator.engine.engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import wasmtime

from ..errors import CapabilityDenied, CapsuleTrap
from .instance import Instance, current_instance

LOG_LEVELS = {0: 5, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
EXTISM_LOG_OFF = 2**31 - 1
MAX_LOG_MESSAGE = 64 * 1024


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(caller: wasmtime.Caller, *args: Any) -> Any:
        instance = current_instance()
        try:
            return fn(instance, caller, *args)
        except BaseException as error:
            instance.host_error, instance.host_source = error, f"extism:host/env::{fn.__name__}"
            raise

    call.__name__ = fn.__name__
    return call


def _key(instance: Instance, offset: int, what: str) -> bytes:
    if offset == 0:  # alloc(0) returns 0: an empty key, as in Extism
        return b""
    data = instance.memory.read_block(offset)
    if data is None:
        raise CapsuleTrap(
            f"{what}: offset {offset} is not an allocated kernel block (pass the offset returned by alloc)"
        )
    return data


def _give(instance: Instance, caller: wasmtime.Caller, value: bytes | None) -> int:
    """Copy `value` into a new kernel block; 0 for None or empty (as Extism does)."""
    if not value:
        return 0
    offset = instance.alloc(caller, len(value))
    if offset == 0:
        raise CapsuleTrap(
            f"the kernel could not allocate {len(value)} bytes (memory limit {instance.plugin.limits.memory_mib} MiB)"
        )
    instance.memory.write(offset, value)
    return offset


def config_get(instance: Instance, caller: wasmtime.Caller, offset: int) -> int:
    return _give(instance, caller, instance.plugin.config_value(_key(instance, offset, "config_get")))


def var_get(instance: Instance, caller: wasmtime.Caller, offset: int) -> int:
    return _give(instance, caller, instance.plugin.var_get(_key(instance, offset, "var_get")))


def var_set(instance: Instance, caller: wasmtime.Caller, key_offset: int, value_offset: int) -> None:
    key = _key(instance, key_offset, "var_set")
    value = _key(instance, value_offset, "var_set value") if value_offset else None
    instance.plugin.var_set(key, value)


def log(instance: Instance, caller: wasmtime.Caller, level: int, offset: int) -> None:
    python_level = LOG_LEVELS.get(level, logging.INFO)
    plugin_log = instance.plugin.log
    if not plugin_log.isEnabledFor(python_level):
        return
    data = _key(instance, offset, "log")
    text = data[:MAX_LOG_MESSAGE].decode("utf-8", "replace")
    plugin_log.log(python_level, "%s", text)


def get_log_level(instance: Instance, caller: wasmtime.Caller) -> int:
    effective = instance.plugin.log.getEffectiveLevel()
    if effective > logging.ERROR:
        return EXTISM_LOG_OFF
    for extism, python_level in sorted(LOG_LEVELS.items()):
        if effective <= python_level:
            return extism
    return 4


def http_request(instance: Instance, caller: wasmtime.Caller, request: int, body: int) -> int:
    target = ""
    data = instance.memory.read_block(request)
    if data is not None:
        try:
            parsed = json.loads(data)
            target = str(parsed.get("url", "")) if isinstance(parsed, dict) else ""
        except ValueError:
            target = ""
    raise CapabilityDenied(
        f"network access not granted: plugin {instance.plugin.name!r} called http_request"
        + (f" for {target}" if target else "")
        + "; this host grants no network access to plugins yet",
        capability="net",
        target=target,
    )


def http_status_code(instance: Instance, caller: wasmtime.Caller) -> int:
    return 0


def http_headers(instance: Instance, caller: wasmtime.Caller) -> int:
    return 0


KERNEL_HOST_FUNCTIONS: list[tuple[str, list[str], list[str], Callable[..., Any]]] = [
    ("config_get", ["i64"], ["i64"], _guarded(config_get)),
    ("var_get", ["i64"], ["i64"], _guarded(var_get)),
    ("var_set", ["i64", "i64"], [], _guarded(var_set)),
    ("log", ["i32", "i64"], [], _guarded(log)),
    ("get_log_level", [], ["i32"], _guarded(get_log_level)),
    ("http_request", ["i64", "i64"], ["i64"], _guarded(http_request)),
    ("http_status_code", [], ["i32"], _guarded(http_status_code)),
    ("http_headers", [], ["i64"], _guarded(http_headers)),
]
