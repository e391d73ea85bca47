"""Tool calls across the lattice: a host serves its deployments, any client calls them.

Serving (`CallServer`, one per host): for each deployment the host runs, a subscription to
`names.call(deployment)` in the queue group of the deployment (`encode_token(deployment)`),
so NATS hands each call to exactly one of the hosts that run it. Each request becomes a
task (nats-py runs one subscription's callbacks one at a time), at most `max_concurrent`
running at once and `max_waiting` waiting beyond that (a call past both is answered
`HostBusy`, 503, and not run). A task decodes the request (orchestrator.lattice.callwire:
malformed, non-JSON or oversized requests are answered 400/413, and the host goes on),
calls the host's `call(deployment, tool, arguments)` (its `reconciler.call_tool`), and
answers with the output or with the error's kind, message and status exactly as the
control API would. A call still waiting for a slot when its caller is about to stop waiting
(`start_grace_ms` before the caller's timeout, counted from its arrival) is not started: its
answer would reach nobody. `unserve` and `close` leave the queue group
(`connection.leave_queue_group`: UNSUB, then calls still arriving are taken for half a
second, then a NATS drain): calls NATS already routed here are still taken, new ones go to
the other hosts, and both return once this host's calls in flight have answered (`orch host`'s
drain on SIGTERM).

Calling (`call_tool`): one request, no retry. What the caller sees:
- the output and the headers `X-Fuel-Used`, `X-Seconds`, `X-Attempts`, `X-Host`;
- an error of the host: `LatticeCallError` with the kind, message and status the local
  API gives (404 UnknownTool, 400 ToolInputError, 422 GuestError, ...);
- no host runs the deployment (NATS has no subscriber): 409 `CapsuleNotRunning`, "no host
  runs capsule X". A host only knows what it runs, so "unknown" versus "not running" is
  the client's call: given `deployed` (the deployments of the desired state), a name not
  in it is 404 `UnknownCapsule` with the local API's message;
- no answer within `timeout` seconds: 504 `CallTimeout`. This is also what a host that
  dies (or is cut off) in the middle of a call looks like: the call may have run, or run
  partly up to its last commit; it is never run again by this layer, on this host or
  another, and the message says to check its effects before calling again;
- arguments that cannot travel: 413 `TooLarge` (over 1 MiB, or over the server's
  `max_payload`: a lattice needs `max_payload` of 2 MB or more for 1 MiB arguments and
  outputs), 400 `BadJson` for arguments that are not UTF-8;
- the lattice unreachable: 503 `LatticeUnavailable`.

Used by the host runtime (`orch host`) and the CLI (`orch call --lattice`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..errors import GateError, OrchestratorError
from .callwire import (
    MAX_ARGUMENT_BYTES,
    CallResult,
    HostBusy,
    OutputTooLarge,
    decode_reply,
    decode_request,
    encode_request,
    error_reply,
    result_reply,
    status_of,
)
from .connection import Lattice, barrier, leave_queue_group
from .naming import encode_token

logger = logging.getLogger(__name__)

CALL_MARGIN_S = 5.0
"""What a caller waits beyond the call's own `timeout_ms` (queueing, validation, commit)."""

DEFAULT_TIMEOUT_MS = 5000  # the built-in limits.timeout_ms
DEFAULT_TIMEOUT_S = DEFAULT_TIMEOUT_MS / 1000 + CALL_MARGIN_S
MAX_CONCURRENT = 256
MAX_WAITING = 4096
HEADROOM = 64 << 10  # envelope and headers beside 1 MiB of arguments or output

HostCall = Callable[[str, str, Any], Awaitable[CallResult]]
Deployed = Callable[[], Awaitable[Collection[str] | None]]


def start_grace_ms(timeout_ms: int) -> int:
    """A call that has waited for a slot until this close to its caller's deadline is not
    started: its answer would most likely come too late (a tenth, at most a second)."""
    return min(timeout_ms // 10, 1000)


def call_timeout(timeout_ms: int) -> float:
    """How long a caller waits for a call whose capsule has `limits.timeout_ms`."""
    return timeout_ms / 1000 + CALL_MARGIN_S


class LatticeCallError(OrchestratorError):
    """A lattice call failed: `status` and `kind` as the control API would answer them."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class CallServer:
    """Serves this host's deployments' tool calls. `await close()` drains them."""

    def __init__(
        self,
        lattice: Lattice,
        call: HostCall,
        host_id: str,
        *,
        max_concurrent: int = MAX_CONCURRENT,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self._lattice = lattice
        self._call = call
        self.host_id = host_id
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_open = max_concurrent + max_waiting
        self._open = 0  # calls taken and not yet answered, running or waiting for a slot
        self._subscriptions: dict[str, Subscription] = {}
        self._tasks: dict[str, set[asyncio.Task[None]]] = {}
        self._closed = False
        self.answered = 0  # calls answered (output or error)
        self.refused = 0  # requests answered without running (malformed, busy)
        if lattice.nc.max_payload < MAX_ARGUMENT_BYTES + HEADROOM:
            logger.warning(
                "the lattice's NATS server takes messages of at most %d bytes: 1 MiB arguments and outputs will "
                "not fit (set `max_payload: 8MB` in the server's configuration)",
                lattice.nc.max_payload,
            )

    @property
    def serving(self) -> list[str]:
        return sorted(self._subscriptions)

    @property
    def in_flight(self) -> int:
        """Calls taken and not yet answered (running, or waiting for a slot)."""
        return self._open

    async def serve(self, deployment: str) -> None:
        """Take calls of `deployment` (idempotent). GateError for a name too long for NATS."""
        if self._closed:
            raise OrchestratorError(f"host {self.host_id}: the call server is closed")
        if deployment in self._subscriptions:
            return
        subject = self._lattice.names.call(deployment)

        async def on_request(msg: Msg) -> None:
            self._take(deployment, msg)

        self._tasks.setdefault(deployment, set())
        self._subscriptions[deployment] = await self._lattice.nc.subscribe(
            subject, queue=encode_token(deployment), cb=on_request
        )
        await barrier(self._lattice.nc)  # the server knows: calls come here from now on

    async def unserve(self, deployment: str) -> None:
        """Leave the deployment's queue group; return once its calls here have answered."""
        subscription = self._subscriptions.get(deployment)
        if subscription is None:
            return
        with contextlib.suppress(nats.errors.Error):
            await leave_queue_group(subscription)  # calls already routed here are taken
        self._subscriptions.pop(deployment, None)
        tasks = self._tasks.pop(deployment, set())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Take no new calls; return once every call in flight has answered."""
        self._closed = True
        await asyncio.gather(*(self.unserve(name) for name in list(self._subscriptions)))

    # -- one call ----------------------------------------------------------------------------
    def _take(self, deployment: str, msg: Msg) -> None:
        if not msg.reply:  # a publish, not a request: nobody to answer
            logger.debug("host %s: a message without a reply subject on %s, ignored", self.host_id, msg.subject)
            return
        loop = asyncio.get_running_loop()
        if self._open >= self._max_open:
            self.refused += 1
            busy = HostBusy(
                f"host {self.host_id} has {self._open} calls running or waiting; capsule {deployment!r} was not "
                "called: try again"
            )
            task = loop.create_task(self._answer(msg, *error_reply(busy, self.host_id)))
        else:
            task = loop.create_task(self._handle(deployment, msg, time.monotonic()))
        self._open += 1
        tasks = self._tasks.setdefault(deployment, set())
        tasks.add(task)
        task.add_done_callback(lambda done: self._done(tasks, done))

    def _done(self, tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        self._open -= 1
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("host %s: a call task failed", self.host_id, exc_info=task.exception())

    async def _handle(self, deployment: str, msg: Msg, received: float) -> None:
        try:
            request = decode_request(msg.data)
        except OrchestratorError as error:
            self.refused += 1
            logger.debug("host %s: refused a call of %s: %s", self.host_id, deployment, error)
            await self._answer(msg, *error_reply(error, self.host_id))
            return
        await self._slots.acquire()
        try:
            waited = time.monotonic() - received
            if request.timeout_ms and waited * 1000 >= request.timeout_ms - start_grace_ms(request.timeout_ms):
                logger.warning(
                    "host %s: a call of %s.%s waited %.1f s for a slot, past its caller's %d ms: not started",
                    self.host_id,
                    deployment,
                    request.tool,
                    waited,
                    request.timeout_ms,
                )
                return
            body, headers = await self._run(deployment, request.tool, request.arguments)
        finally:
            self._slots.release()
        await self._answer(msg, body, headers, deployment=deployment, tool=request.tool)

    async def _run(self, deployment: str, tool: str, arguments: Any) -> tuple[bytes, dict[str, str]]:
        try:
            result = await self._call(deployment, tool, arguments)
        except OrchestratorError as error:
            return error_reply(error, self.host_id)
        except Exception as error:  # a bug below: answered and logged, never a dead host
            logger.error("host %s: calling %s.%s failed", self.host_id, deployment, tool, exc_info=error)
            failure = OrchestratorError(
                f"host {self.host_id} failed the call of {deployment}.{tool} "
                f"({type(error).__name__}: {error}); see that host's log"
            )
            return error_reply(failure, self.host_id)
        return result_reply(result, self.host_id)

    async def _answer(
        self, msg: Msg, body: bytes, headers: dict[str, str], *, deployment: str = "", tool: str = ""
    ) -> None:
        nc = self._lattice.nc
        if len(body) + HEADROOM > nc.max_payload and headers.get("Orch-Status") == "200":
            error = OutputTooLarge(
                f"capsule {deployment!r}: {tool} ran on host {self.host_id} (its KV writes are committed) but its "
                f"output of {len(body)} bytes does not fit in one message of the lattice's NATS server (max_payload "
                f"{nc.max_payload} bytes): return less, or raise the server's max_payload"
            )
            body, headers = error_reply(error, self.host_id)
        try:
            await nc.publish(msg.reply, body, headers=headers)
            self.answered += 1
        except nats.errors.Error as error:  # the connection is gone: the caller times out
            logger.warning("host %s: could not answer a call on %s: %s", self.host_id, msg.subject, error)


# -- the client side -----------------------------------------------------------------------------
async def call_tool(
    lattice: Lattice,
    deployment: str,
    tool: str,
    arguments: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    deployed: Deployed | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Call `tool` of `deployment` on whichever host answers: (output, headers).

    Raises LatticeCallError (see the module docstring). `deployed`, when given, names the
    deployments of the desired state (None: unknown), to tell an unknown capsule (404) from
    one that no host runs (409)."""
    names = lattice.names
    try:
        subject = names.call(deployment)
    except GateError as error:
        raise LatticeCallError(404, "UnknownCapsule", f"no capsule can have that name: {error}") from None
    try:
        data = encode_request(tool, arguments, max(1, int(timeout * 1000)))
    except OrchestratorError as error:
        raise LatticeCallError(status_of(error), type(error).__name__, str(error)) from None
    nc = lattice.nc
    if len(data) + 1024 > nc.max_payload:
        raise LatticeCallError(
            413,
            "TooLarge",
            f"the call of {deployment}.{tool} is {len(data)} bytes, more than one message of the lattice's NATS "
            f"server carries (max_payload {nc.max_payload} bytes): send less, or raise the server's max_payload "
            "(1 MiB arguments need 2 MB)",
        )
    try:
        msg = await nc.request(subject, data, timeout=timeout)
    except nats.errors.NoRespondersError:
        raise await _nobody(lattice, deployment, deployed) from None
    except nats.errors.TimeoutError:
        raise LatticeCallError(
            504,
            "CallTimeout",
            f"capsule {deployment!r}: no answer to {tool} from lattice {names.name!r} within {timeout:g} s; the "
            "call may have run (a host that takes a call and dies or is cut off never answers) and was not "
            "retried: check its effects before calling again",
        ) from None
    except nats.errors.MaxPayloadError:
        raise LatticeCallError(
            413, "TooLarge", f"the call of {deployment}.{tool} is larger than the lattice's NATS server accepts"
        ) from None
    except nats.errors.Error as error:
        raise LatticeCallError(
            503,
            "LatticeUnavailable",
            f"cannot call {deployment}.{tool}: the lattice at {lattice.address.shown} is unavailable "
            f"({type(error).__name__}: {error})",
        ) from None
    try:
        reply = decode_reply(msg.data, msg.headers)
    except (ValueError, KeyError, TypeError):
        raise LatticeCallError(
            502, "BadReply", f"the answer to {deployment}.{tool} on {msg.subject} is not a lattice host's reply"
        ) from None
    if reply.status != 200:
        raise LatticeCallError(reply.status, reply.kind, reply.message)
    return reply.output, dict(reply.headers or {})


async def _nobody(lattice: Lattice, deployment: str, deployed: Deployed | None) -> LatticeCallError:
    """The error for a call nobody takes: unknown (given `deployed`) or not running."""
    known = None
    if deployed is not None:
        try:
            known = await deployed()
        except OrchestratorError as error:  # the desired state cannot be read: say "not running"
            logger.debug("lattice %s: the deployments could not be read: %s", lattice.names.name, error)
    if known is not None and deployment not in known:
        return LatticeCallError(
            404, "UnknownCapsule", f"no capsule {deployment!r} (deployed: {', '.join(sorted(known)) or 'none'})"
        )
    return LatticeCallError(
        409,
        "CapsuleNotRunning",
        f"no host runs capsule {deployment!r} in lattice {lattice.names.name!r} (not deployed, or still "
        f"starting, failed, or its hosts are gone): see `orch status --lattice {lattice.address.shown}`",
    )
