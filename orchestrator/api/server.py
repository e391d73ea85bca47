"""The control API: HTTP/JSON over a unix socket, served by aiohttp (the only aiohttp server).

The socket is `<state_dir>/orch.sock`, created 0600 inside a state dir that others cannot
write (refused otherwise), so only the user who runs the orchestrator gets in. Works with
`curl --unix-socket .orch/orch.sock http://orch/v1/status`. Endpoints (contract):

    GET    /v1/status                         the orchestrator, every capsule, the API (`api`)
    GET    /v1/capsules/{name}                status + manifest summary (secrets masked)
    POST   /v1/capsules/{name}/tools/{tool}   body: JSON arguments -> the tool's output
    POST   /v1/capsules/{name}/restart
    GET    /v1/capsules/{name}/history        the versions it ran, newest first, and its pin
    POST   /v1/capsules/{name}/rollback       body: {"to": VERSION|null, "with_data": bool}
    POST   /v1/capsules/{name}/unpin          end a rollback's pin: the desired spec runs
    POST   /v1/capsules/{name}/approve        body (optional): {"spec_hash": H} -> status
    POST   /v1/capsules/{name}/reject         the same; 409 when it awaits no approval
    GET    /v1/events?topic=P&history=N       server-sent events: history, then live
    GET    /v1/kv/{name}?prefix=P             {"keys": [...]}
    GET|PUT|DELETE /v1/kv/{name}/{key}        the raw value
    POST   /v1/reconcile                      re-read files and apply; returns the plan
    GET    /v1/plan                           what a reconcile would do now
    GET    /v1/specs                          the specs of the versions serving now (records:
                                              secret values never, only their digests)

Errors are JSON `{"error": {"kind", "message"}}` with 400 (bad input: malformed HTTP,
JSON or query; see .inputs), 403 (denied), 404 (no such capsule, tool, key or route), 408
(a body that did not arrive in time), 409 (capsule not running), 413 (body too large), 422
(the guest failed: an error, a trap, its memory limit; or an invalid config), 503 (too
many connections busy, or event streams open), 504 (timeout or fuel), 500 otherwise. A
slow event client loses events (counted, and announced with an `event: lost` message); it
never slows the orchestrator. Connections are capped and timed out (.connections, with
the bounds and their reasons in .settings.ServerLimits).

Used by `orch up` (orchestrator.cli.up); the CLI and the dashboard are its clients
(orchestrator.api.client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import web

from ..capsule.gate import check_key
from ..control import Orchestrator
from ..control.approvals import NotAwaitingApproval
from ..control.history import RollbackRefused
from ..control.statedir import SOCKET
from ..desired.manifest import SECRET_MASK
from ..errors import GateError, OrchestratorError
from ..topics import check_pattern
from .connections import ConnectionGuard, connection_cap, open_fds, raise_fd_limit, track_requests
from .events import EventStreams
from .inputs import parse_count, parse_json, parse_query, read_body
from .responses import ApiError, errors_as_json
from .settings import MAX_BODY, ServerLimits

logger = logging.getLogger(__name__)

MAX_HISTORY = 10_000
MAX_REQUEST_LINE = 16384  # a 4096-byte key, percent-encoded, fits
MAX_PREFIX_BYTES = 4096  # a key's length
APPROVED_HASH = re.compile(r"[0-9a-f]{6,64}")  # the change an approve or reject is about: its spec hash, or a prefix
LINGERING_SECONDS = 2.0  # after answering a request whose body was not read (404, 408, 413), read the rest this long

__all__ = ["MAX_BODY", "MAX_HISTORY", "ApiError", "ControlApi", "ControlServer", "ServerLimits"]


class ControlApi:
    """The HTTP application over one Orchestrator."""

    def __init__(
        self, orchestrator: Orchestrator, *, max_body: int = MAX_BODY, limits: ServerLimits | None = None
    ) -> None:
        self.orchestrator = orchestrator
        self.limits = limits or ServerLimits()
        self.app = web.Application(middlewares=[track_requests, errors_as_json], client_max_size=max_body)
        self.event_streams = EventStreams(bus=orchestrator.bus, limits=self.limits)
        self.guard: ConnectionGuard | None = None  # set by ControlServer.start
        routes = [
            web.get("/v1/status", self.status),
            web.get("/v1/capsules/{name}", self.capsule),
            web.post("/v1/capsules/{name}/tools/{tool}", self.call),
            web.post("/v1/capsules/{name}/restart", self.restart),
            web.get("/v1/capsules/{name}/history", self.history),
            web.post("/v1/capsules/{name}/rollback", self.rollback),
            web.post("/v1/capsules/{name}/unpin", self.unpin),
            web.post("/v1/capsules/{name}/approve", self.approve),
            web.post("/v1/capsules/{name}/reject", self.reject),
            web.get("/v1/events", self.events),
            web.get("/v1/kv/{name}", self.kv_list),
            web.get("/v1/kv/{name}/{key:.+}", self.kv_get),
            web.put("/v1/kv/{name}/{key:.+}", self.kv_put),
            web.delete("/v1/kv/{name}/{key:.+}", self.kv_delete),
            web.post("/v1/reconcile", self.reconcile),
            web.get("/v1/plan", self.plan),
            web.get("/v1/specs", self.specs),
        ]
        self.app.add_routes(routes)

    # -- helpers ---------------------------------------------------------------------------
    @property
    def streams(self) -> int:
        """Event streams open now."""
        return len(self.event_streams.active)

    def connections(self) -> dict[str, int]:
        """What the API serves now and has refused (GET /v1/status shows it as `api`)."""
        stats = self.guard.stats() if self.guard is not None else {}
        return {**stats, "event_streams": self.streams, "max_event_streams": self.limits.max_event_streams}

    @property
    def reconciler(self) -> Any:
        assert self.orchestrator.reconciler is not None
        return self.orchestrator.reconciler

    def deployment(self, name: str) -> Any:
        desired = self.orchestrator.desired
        if desired is None or name not in desired.specs:
            known = ", ".join(sorted(desired.specs)) if desired else ""
            raise ApiError(404, "UnknownCapsule", f"no capsule {name!r} (deployed: {known or 'none'})")
        return desired.specs[name]

    # -- status ----------------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"orchestrator": self.orchestrator.info(), "capsules": self.reconciler.status(), "api": self.connections()}
        )

    async def capsule(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        spec = self.deployment(name)
        slot = self.reconciler.slot(name)
        manifest = spec.manifest
        summary = {
            "status": slot.status() if slot else None,
            "history": list(slot.history) if slot else [],
            "package": manifest.get("package", {}),
            "tools": manifest.get("tool", []),
            "interceptors": manifest.get("interceptor", []),
            "capabilities": manifest.get("capabilities", {}),
            "env": {k: {kk: vv for kk, vv in v.items() if kk != "default"} for k, v in manifest.get("env", {}).items()},
            "limits": dict(spec.limits),
            "instances": spec.instances,
            "depends_on": list(spec.depends_on),
            "enabled": spec.enabled,
            "config": {k: SECRET_MASK if k in spec.secret_keys else v for k, v in spec.config.items()},
            "wasm_sha256": spec.wasm_sha256,
            "folder": spec.folder,
        }
        return web.json_response(summary)

    # -- calls -----------------------------------------------------------------------------
    async def call(self, request: web.Request) -> web.Response:
        name, tool = request.match_info["name"], request.match_info["tool"]
        body = await read_body(request, timeout=self.limits.body_timeout)
        arguments = parse_json(body) if body.strip() else None
        result = await self.reconciler.call_tool(name, tool, arguments)
        output: bytes = result.output
        try:
            json.loads(output)
            content_type = "application/json"
        except ValueError:
            content_type = "application/octet-stream"
        return web.Response(
            body=output,
            content_type=content_type,
            headers={
                "X-Fuel-Used": str(result.fuel_used),
                "X-Seconds": f"{result.seconds:.6f}",
                "X-Attempts": str(result.attempts),
            },
        )

    async def restart(self, request: web.Request) -> web.Response:
        return web.json_response(await self.reconciler.restart(request.match_info["name"]))

    # -- history and rollback ----------------------------------------------------------------
    async def history(self, request: web.Request) -> web.Response:
        return web.json_response(await _refusal(self.orchestrator.version_history(request.match_info["name"])))

    async def rollback(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.deployment(name)
        body = await read_body(request, timeout=self.limits.body_timeout)
        to, with_data = rollback_arguments(parse_json(body) if body.strip() else {})
        return web.json_response(await _refusal(self.orchestrator.rollback(name, to=to, with_data=with_data)))

    async def unpin(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.deployment(name)
        return web.json_response(await _refusal(self.orchestrator.unpin(name)))

    # -- the escalation gate ---------------------------------------------------------------
    async def approve(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.deployment(name)
        expected = await self._change_named(request)
        try:
            return web.json_response(await self.orchestrator.approve(name, expected))
        except NotAwaitingApproval as error:
            raise ApiError(409, "NotAwaitingApproval", str(error)) from None

    async def reject(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.deployment(name)
        expected = await self._change_named(request)
        try:
            return web.json_response(await self.orchestrator.reject(name, expected))
        except NotAwaitingApproval as error:
            raise ApiError(409, "NotAwaitingApproval", str(error)) from None

    async def _change_named(self, request: web.Request) -> str | None:
        """The spec hash (or a prefix of it) the body names, if any: `{"spec_hash": "3fa1c2..."}`."""
        body = await read_body(request, timeout=self.limits.body_timeout)
        if not body.strip():
            return None
        value = parse_json(body)
        if not isinstance(value, dict) or not set(value) <= {"spec_hash"}:
            raise ApiError(400, "BadRequest", 'the body is {"spec_hash": HASH} (or empty): nothing else')
        spec_hash = value.get("spec_hash")
        if spec_hash is None:
            return None
        if not isinstance(spec_hash, str) or not APPROVED_HASH.fullmatch(spec_hash):
            raise ApiError(400, "BadRequest", "spec_hash must be 6 to 64 lowercase hex digits (the change's spec hash)")
        return spec_hash

    # -- events ----------------------------------------------------------------------------
    async def events(self, request: web.Request) -> web.StreamResponse:
        query = parse_query(request.rel_url.raw_query_string, ("topic", "history"))
        pattern = query.get("topic", ">")
        try:
            check_pattern(pattern)
        except GateError as error:
            raise ApiError(400, "BadPattern", f"topic: {error}") from None
        history = parse_count(query.get("history", "0"), "history", MAX_HISTORY)
        return await self.event_streams.serve(request, pattern, history)

    # -- kv --------------------------------------------------------------------------------
    def _store(self) -> Any:
        store = self.orchestrator.store
        assert store is not None
        return store

    def _key(self, request: web.Request) -> tuple[str, str]:
        """The capsule and the key, decoded from the raw path so that percent-encoded bytes
        that are not UTF-8 are refused rather than kept as literal text."""
        name = request.match_info["name"]
        self.deployment(name)
        raw = request.rel_url.raw_path.split("/", 4)[4]  # "", "v1", "kv", name, key
        return name, check_key(unquote_to_bytes(raw))

    async def kv_list(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.deployment(name)
        prefix = parse_query(request.rel_url.raw_query_string, ("prefix",)).get("prefix", "")
        if "\0" in prefix or len(prefix.encode()) > MAX_PREFIX_BYTES:
            raise ApiError(400, "BadQuery", f"prefix must be at most {MAX_PREFIX_BYTES} bytes, without NUL")
        return web.json_response(
            {"capsule": name, "prefix": prefix, "keys": await self._store().list_keys(name, prefix)}
        )

    async def kv_get(self, request: web.Request) -> web.Response:
        name, key = self._key(request)
        value = await self._store().get(name, key)
        if value is None:
            raise ApiError(404, "NoSuchKey", f"capsule {name!r} has no key {key!r}")
        return web.Response(body=value, content_type="application/octet-stream")

    async def kv_put(self, request: web.Request) -> web.Response:
        name, key = self._key(request)
        value = await read_body(request, timeout=self.limits.body_timeout)
        await self._store().set(name, key, value)
        return web.json_response({"capsule": name, "key": key, "bytes": len(value)})

    async def kv_delete(self, request: web.Request) -> web.Response:
        name, key = self._key(request)
        if not await self._store().delete(name, key):
            raise ApiError(404, "NoSuchKey", f"capsule {name!r} has no key {key!r}")
        return web.json_response({"capsule": name, "key": key, "deleted": True})

    # -- plans -----------------------------------------------------------------------------
    async def reconcile(self, request: web.Request) -> web.Response:
        applied = await self.orchestrator.reconcile()
        return web.json_response(applied.to_dict())

    async def plan(self, request: web.Request) -> web.Response:
        desired = await self.orchestrator.load(previous=self.orchestrator.desired)
        return web.json_response(self.reconciler.plan(desired.specs, broken=set(desired.broken)).to_dict())

    async def specs(self, request: web.Request) -> web.Response:
        """What runs, as records (`orch plan FILE` diffs a candidate config against them)."""
        parse_query(request.rel_url.raw_query_string, ())
        actual = self.reconciler.actual()
        return web.json_response({"capsules": {name: actual[name].record() for name in sorted(actual)}})


async def _refusal(work: Awaitable[Any]) -> Any:
    """`work`'s result; a refused rollback or unpin becomes its API error (404 or 409)."""
    try:
        return await work
    except RollbackRefused as error:
        raise ApiError(error.status, type(error).__name__, " ".join(str(error).split())) from None


MAX_VERSION_TEXT = 80


def rollback_arguments(body: Any) -> tuple[str | None, bool]:
    """`{"to": VERSION | null, "with_data": bool}`, both optional; ApiError 400 otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "BadInput", 'the body must be a JSON object: {"to": VERSION | null, "with_data": bool}')
    unknown = sorted(set(body) - {"to", "with_data"})
    if unknown:
        raise ApiError(400, "BadInput", f"/{unknown[0][:40]}: unknown field (allowed: to, with_data)")
    to, with_data = body.get("to"), body.get("with_data", False)
    if to is not None and (not isinstance(to, str) or not 0 < len(to) <= MAX_VERSION_TEXT or "\0" in to):
        raise ApiError(400, "BadInput", f"/to: a version (text of 1 to {MAX_VERSION_TEXT} characters) or null")
    if not isinstance(with_data, bool):
        raise ApiError(400, "BadInput", "/with_data: true or false")
    return to, with_data


class ControlServer:
    """Serves a ControlApi on `<state_dir>/orch.sock`, with the connection bounds of `limits`."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        *,
        state_dir: Path,
        max_body: int = MAX_BODY,
        limits: ServerLimits | None = None,
    ) -> None:
        self.limits = limits or ServerLimits()
        self.api = ControlApi(orchestrator, max_body=max_body, limits=self.limits)
        self.path = Path(state_dir) / SOCKET
        self._runner: web.AppRunner | None = None
        self._listening: asyncio.AbstractServer | None = None

    @property
    def guard(self) -> ConnectionGuard | None:
        return self.api.guard

    async def start(self) -> None:
        check_private(self.path.parent)
        if self.path.is_dir() and not self.path.is_symlink():
            raise OrchestratorError(f"{self.path} is a directory, not a socket: remove it and start again")
        if self.path.exists() or self.path.is_symlink():
            if socket_alive(self.path):
                raise OrchestratorError(f"another orchestrator is already serving {self.path}")
            self.path.unlink()
        soft_limit = raise_fd_limit(self.limits.fd_target)
        cap = connection_cap(self.limits, soft_limit, open_fds())
        # Bind under a temporary name, make it 0600, then rename it into place: nobody can
        # connect before it is private (and no process-wide umask change is needed).
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        listener.bind(str(temporary))
        os.chmod(temporary, 0o600)
        os.rename(temporary, self.path)
        self._runner = web.AppRunner(self.api.app, access_log=None, shutdown_timeout=1.0, handle_signals=False)
        await self._runner.setup()
        assert self._runner.server is not None
        loop = asyncio.get_running_loop()
        guard = ConnectionGuard(
            self._runner.server,
            limits=self.limits,
            cap=cap,
            loop=loop,
            handler_args={
                "keepalive_timeout": 2 * self.limits.idle_timeout,  # a backstop: the guard closes first
                "max_line_size": MAX_REQUEST_LINE,
                "max_headers": self.limits.max_headers,
                "lingering_time": LINGERING_SECONDS,
                "access_log": None,
            },
        )
        self.api.guard = guard
        self._listening = await loop.create_unix_server(guard, sock=listener, backlog=128)
        logger.debug("control API on %s: at most %d connections (open-file limit %d)", self.path, cap, soft_limit)

    async def stop(self) -> None:
        if self._runner is None:
            return  # never started: the path (if any) is not ours to remove
        if self._listening is not None:
            self._listening.close()  # no new connections
            self._listening = None
        await self._runner.cleanup()
        self._runner = None
        if self.api.guard is not None:
            self.api.guard.close_all()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def check_private(folder: Path) -> None:
    """Refuse a state dir that other users could write (they could replace the socket)."""
    info = folder.stat()
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise OrchestratorError(
            f"the state dir {folder} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}); "
            f"run `chmod go-w {folder}` and start again"
        )
    if info.st_uid != os.getuid():
        raise OrchestratorError(f"the state dir {folder} belongs to another user (uid {info.st_uid})")


def socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()
