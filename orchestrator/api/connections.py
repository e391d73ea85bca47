"""Connections to the control API: a cap, deadlines, and JSON for what aiohttp's parser refuses.

aiohttp's server has a keep-alive timeout but no cap on connections and, before 3.14, no
deadline for a request head that trickles in (slowloris); and it answers the requests its
own parser refuses with plain text, logged at ERROR. So the listening socket's protocol
factory is a ConnectionGuard (ControlServer passes it to `loop.create_unix_server`), and
each connection is a GuardedHandler: aiohttp's RequestHandler (through its public
constructor and the asyncio protocol methods) plus

- deadlines: a connection with no request in progress is closed after `idle_timeout`;
  once the first byte of a request head arrives, the whole head must arrive within
  `head_timeout`. The middleware `track_requests` marks a request in progress from the
  moment aiohttp hands it to the application until the handler returns (an event stream
  stays in progress; a handler reads its body within `body_timeout`, see .inputs).
- a cap: at `cap` open connections the guard closes the one that has waited longest for a
  request (idle, or trickling a head) to admit the new one, those that never had a
  request first (so a client's keep-alive connection outlives a flood), so a flood of idle
  or trickling connections cannot lock out a real client; when every connection has a
  request in progress the new one gets a 503 JSON error and is closed. The cap stays
  `fd_reserve` descriptors below the RLIMIT_NOFILE soft limit, which `raise_fd_limit`
  first raises towards the hard limit.
- JSON errors: a request the HTTP parser refuses (a bad method token, TLS bytes, an
  over-long line, too many headers) gets `{"error": {"kind": "BadHttp", "message"}}` with
  a message of our own (never the client's bytes) and a rate-limited warning; an unhandled
  exception gets a JSON 500, logged at ERROR with its traceback.

Refusals, evictions and timeouts are counted (`stats()`, shown in GET /v1/status) and
logged as rate-limited warnings. Used by orchestrator.api.server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from typing import Any

from aiohttp import http_exceptions, web, web_protocol, web_request

from ..throttle import Throttle
from .responses import error_body
from .settings import ServerLimits

logger = logging.getLogger(__name__)

MIN_CONNECTIONS = 8
REFUSAL_LINGER = 0.5  # seconds a refused connection may take to send its request and close
MAX_LINGERING = 32


def raise_fd_limit(target: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (at most `target`); returns the
    soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as error:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, want, error)
    return target if soft == resource.RLIM_INFINITY else soft


def open_fds() -> int:
    """File descriptors this process has open now (0 if the platform does not say)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


def connection_cap(limits: ServerLimits, soft_limit: int, open_now: int) -> int:
    """How many connections to allow: `max_connections`, but `fd_reserve` descriptors below
    the limit (and never fewer than MIN_CONNECTIONS)."""
    room = soft_limit - open_now - limits.fd_reserve
    if room < MIN_CONNECTIONS:
        logger.warning(
            "the open-file limit (%d, %d open) leaves room for only %d API connections besides a reserve of %d; "
            "allowing %d: raise it with `ulimit -n`",
            soft_limit,
            open_now,
            max(room, 0),
            limits.fd_reserve,
            MIN_CONNECTIONS,
        )
    return max(MIN_CONNECTIONS, min(limits.max_connections, room))


_PARSER_ERRORS: list[tuple[type[BaseException], str]] = [
    (http_exceptions.LineTooLong, "a request line or header is longer than this server accepts"),
    (http_exceptions.BadHttpMethod, "the method is not an HTTP method token (TLS is not spoken on this socket)"),
    (http_exceptions.BadStatusLine, "the request line is not `METHOD TARGET HTTP/1.1`"),
    (http_exceptions.InvalidURLError, "the request target is malformed"),
    (http_exceptions.InvalidHeader, "a header is malformed"),
    (http_exceptions.PayloadEncodingError, "the body's framing (Content-Length or chunked encoding) is malformed"),
]


def describe_parser_error(error: BaseException | None, *, max_line: int = 0, max_field: int = 0) -> str:
    """What is wrong with a request aiohttp's parser refused, in our words (aiohttp's own
    messages quote the client's bytes)."""
    if isinstance(error, http_exceptions.LineTooLong) and max_line and max_field:
        return (
            f"a request line or header is longer than this server accepts "
            f"(request line: {max_line} bytes, header: {max_field} bytes)"
        )
    for kind, message in _PARSER_ERRORS:
        if isinstance(error, kind):
            return message
    if isinstance(error, http_exceptions.BadHttpMessage) and "headers" in str(error).lower():
        return "the request has too many headers"
    return "the request is not valid HTTP/1.1"


def _raw_response(status: str, kind: str, message: str) -> bytes:
    body = error_body(kind, message)
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\nRetry-After: 1\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Refusal(asyncio.Protocol):
    """Answers 503 and closes: the cap is reached and every connection is busy.

    It reads (and discards) the request for up to REFUSAL_LINGER seconds before closing, as
    closing a unix socket with unread data makes the client's read fail with ECONNRESET
    before it sees the answer; at most MAX_LINGERING refusals linger at once (past that
    they close at once), so a flood of refused connections holds few descriptors.
    """

    def __init__(self, guard: ConnectionGuard, answer: bytes) -> None:
        self._guard, self._answer = guard, answer
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._answer)
        if len(self._guard.lingering) >= MAX_LINGERING:
            transport.close()
            return
        self._guard.lingering.add(transport)
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and self._transport is not None:  # the request head is in: done
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._transport is not None:
            self._guard.lingering.discard(self._transport)
            self._transport = None
        if self._timer is not None:
            self._timer.cancel()


class GuardedHandler(web_protocol.RequestHandler):
    """aiohttp's per-connection protocol, with the guard's deadlines and JSON errors."""

    def __init__(
        self, manager: web.Server, *, guard: ConnectionGuard, loop: asyncio.AbstractEventLoop, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._guard = guard
        self._scheduler = loop
        self._busy = 0
        self._in_head = False
        self._evicted = False
        self._deadline: asyncio.TimerHandle | None = None
        self.idle_since = loop.time()

    # -- asyncio protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._evicted:  # made room for others before it was even connected
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            return
        self._arm(self.idle_since + self._guard.limits.idle_timeout, "idle")

    def data_received(self, data: bytes) -> None:
        if data and not self._busy and not self._in_head:
            self._in_head = True
            self._arm(self._scheduler.time() + self._guard.limits.head_timeout, "head")
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._guard.forget(self)
        super().connection_lost(exc)

    # -- requests (from the track_requests middleware) -------------------------------------
    def request_started(self) -> None:
        self._busy += 1
        self._in_head = False
        self._disarm()
        self._guard.busy(self)

    def request_finished(self) -> None:
        self._busy -= 1
        if self._busy == 0 and self.transport is not None:
            self.idle_since = self._scheduler.time()
            self._arm(self.idle_since + self._guard.limits.idle_timeout, "idle")
            self._guard.idle(self)

    @property
    def waiting_for_request(self) -> bool:
        return self._busy == 0

    # -- deadlines and eviction ------------------------------------------------------------
    def _arm(self, when: float, reason: str) -> None:
        self._disarm()
        self._deadline = self._scheduler.call_at(when, self._expire, reason)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, reason: str) -> None:
        self._deadline = None
        if self._busy or self.transport is None:
            return
        self._guard.expired(reason)
        self.evict()

    def evict(self) -> None:
        """Close at once (not waiting to flush what a non-reading client left unread)."""
        self._evicted = True
        self._disarm()
        transport = self.transport
        if transport is not None:
            assert isinstance(transport, asyncio.Transport)
            transport.abort()

    # -- errors aiohttp handles itself -----------------------------------------------------
    def handle_error(
        self,
        request: web_request.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            logger.error("the control API failed on %s %s", request.method, request.path, exc_info=exc)
            kind = "Timeout" if status == 504 else "InternalError"
            text = "the orchestrator failed to handle this request; its log says why"
        else:
            kind, text = (
                "BadHttp",
                describe_parser_error(exc, max_line=self.max_line_size, max_field=self.max_field_size),
            )
            self._guard.bad_request(text)
        if request.writer.output_size > 0:  # as aiohttp does: too late for another response
            raise ConnectionError("the response was already being sent when the request failed")
        response = web.Response(status=status, body=error_body(kind, text), content_type="application/json")
        response.force_close()
        return response


class ConnectionGuard:
    """The protocol factory of the API's listening socket: caps and tracks connections."""

    def __init__(
        self,
        server: web.Server,
        *,
        limits: ServerLimits,
        cap: int,
        handler_args: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.limits, self.cap = limits, cap
        self._server, self._handler_args, self._loop = server, handler_args, loop
        self._open: set[GuardedHandler] = set()
        # Waiting for a request, longest-waiting first: connections that have not yet had one
        # (a flood, a slowloris) apart from those that have (a client's keep-alive connection).
        self._fresh: dict[GuardedHandler, None] = {}
        self._idle: dict[GuardedHandler, None] = {}
        self._throttle = Throttle(logger, interval=limits.log_interval)
        self._answer = _raw_response(
            "503 Service Unavailable",
            "Busy",
            f"the orchestrator already serves {cap} connections, each with a request in progress; retry shortly",
        )
        self.lingering: set[asyncio.Transport] = set()  # refusals waiting for their client to finish sending
        self.counts = {"refused": 0, "evicted": 0, "head_timeouts": 0, "idle_timeouts": 0, "bad_requests": 0}

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._open) >= self.cap:
            victim = next(iter(self._fresh), None) or next(iter(self._idle), None)
            if victim is None:
                self.counts["refused"] += 1
                self._throttle.warning(
                    "refused",
                    "control API: refused a connection: all %d connections have a request in progress",
                    self.cap,
                )
                return _Refusal(self, self._answer)
            self.counts["evicted"] += 1
            self._throttle.warning(
                "evicted",
                "control API: %d connections open (the cap): closed the one waiting longest for a request",
                self.cap,
            )
            self.forget(victim)
            victim.evict()
        handler = GuardedHandler(self._server, guard=self, loop=self._loop, **self._handler_args)
        self._open.add(handler)
        self._fresh[handler] = None
        return handler

    # -- called by the handlers ------------------------------------------------------------
    def forget(self, handler: GuardedHandler) -> None:
        self._open.discard(handler)
        self._fresh.pop(handler, None)
        self._idle.pop(handler, None)

    def busy(self, handler: GuardedHandler) -> None:
        self._fresh.pop(handler, None)
        self._idle.pop(handler, None)

    def idle(self, handler: GuardedHandler) -> None:
        if handler in self._open:
            self._idle.pop(handler, None)
            self._idle[handler] = None  # to the back: it waits least

    def expired(self, reason: str) -> None:
        if reason == "head":
            self.counts["head_timeouts"] += 1
            self._throttle.warning(
                "head",
                "control API: closed a connection whose request head did not arrive within %g s",
                self.limits.head_timeout,
            )
        else:
            self.counts["idle_timeouts"] += 1
            logger.debug("control API: closed a connection idle for %g s", self.limits.idle_timeout)

    def bad_request(self, problem: str) -> None:
        self.counts["bad_requests"] += 1
        self._throttle.warning("bad", "control API: refused a malformed request: %s", problem)

    def connections(self) -> list[GuardedHandler]:
        """The open connections, longest-waiting idle ones first."""
        waiting = [*self._fresh, *self._idle]
        return [
            *waiting,
            *(handler for handler in self._open if handler not in self._fresh and handler not in self._idle),
        ]

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self._open),
            "idle": len(self._fresh) + len(self._idle),
            "max_connections": self.cap,
            **self.counts,
        }

    def close_all(self) -> None:
        """Abort every connection still open (after a graceful shutdown had its chance)."""
        for handler in list(self._open):
            self.forget(handler)
            handler.evict()
        for transport in list(self.lingering):
            transport.abort()


@web.middleware
async def track_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """Marks the connection busy while a handler runs (so it is not evicted or timed out)."""
    protocol = request.protocol
    if not isinstance(protocol, GuardedHandler):
        response: web.StreamResponse = await handler(request)
        return response
    protocol.request_started()
    try:
        response = await handler(request)
        return response
    finally:
        protocol.request_finished()
