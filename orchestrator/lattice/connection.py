"""Connecting to a lattice: one NATS connection with JetStream, and its buckets.

`LatticeAddress` is what the operator gives: the server URL(s) (several, comma-separated,
for a cluster; user and password or a token may be in the URL's user info), a creds file
(`--lattice-creds`), TLS files, and the lattice's name. `connect()` fails within a bounded
time with one clear line when no server answers (nats-py alone would retry for minutes),
and once connected reconnects forever, to any server of the cluster.

`Lattice` holds the connection, the JetStream context and the names (naming.py), and finds
or creates buckets and the object store: the first host or `orch apply` creates them, the
others bind. Used by every part of orchestrator.lattice.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from ..errors import OrchestratorError
from .naming import LatticeNames

logger = logging.getLogger(__name__)

CONNECT_SECONDS = 5.0
REQUEST_SECONDS = 5.0
LEAVE_LINGER_S = 0.5
"""How long a queue-group subscription keeps taking messages after its UNSUB round trip."""


async def barrier(nc: Client) -> None:
    """Return once the server has processed everything sent on `nc` so far (SUB, UNSUB, PUB).

    `nc.flush()` alone does not promise that with nats-py 2.16: it writes its PING straight
    to the socket, ahead of the commands still waiting in the client's pending buffer for its
    flusher task, so the PONG can come back before the server has seen an earlier SUB or PUB
    (seen under load: a subscription that missed every message published after its flush).
    So the pending buffer is written first, then the PING/PONG round trip."""
    await nc._flush_pending(force_flush=True)  # no public call writes the pending buffer and waits
    await nc.flush()


async def leave_queue_group(subscription: Subscription, linger: float = LEAVE_LINGER_S) -> None:
    """Stop a queue-group subscription and lose nothing NATS routed to it.

    nats-py's `drain()` (UNSUB, a flush, the pending messages handled, the subscription
    removed) lost calls under load: its flush can return before the server has the UNSUB
    (see `barrier`), and a message that arrives for a subscription nats-py has removed is
    dropped without a word. So: UNSUB, a barrier, `linger` seconds more of handling what
    still arrives, and only then the drain. Raises nats.errors.Error as drain() does."""
    connection = subscription._conn
    if not connection.is_closed and not connection.is_reconnecting:
        await connection._send_unsubscribe(subscription._id)  # nats-py has no public UNSUB that keeps the sid
        await barrier(connection)
        await asyncio.sleep(linger)
    await subscription.drain()  # type: ignore[no-untyped-call]  # what arrived meanwhile is handled


class LatticeError(OrchestratorError):
    """The lattice cannot be reached or used; the message names the server and what to do."""


@dataclass(frozen=True)
class LatticeAddress:
    """Where a lattice is and how to get in."""

    urls: tuple[str, ...]
    name: str = "default"
    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    names: LatticeNames = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", LatticeNames(self.name))
        if not self.urls:
            raise LatticeError("no lattice URL: give --lattice nats://HOST:PORT")

    @classmethod
    def parse(cls, urls: str, *, name: str = "default", **files: Path | None) -> LatticeAddress:
        """`urls`: one or more NATS URLs, comma-separated."""
        return cls(tuple(u.strip() for u in urls.split(",") if u.strip()), name=name, **files)

    @property
    def shown(self) -> str:
        """The URLs without any password or token, for messages."""
        return ", ".join(_hide_secret(url) for url in self.urls)

    def tls(self) -> ssl.SSLContext | None:
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return context


def _hide_secret(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


class Lattice:
    """A connection to one lattice. `await Lattice.connect(address)`; `await close()`."""

    def __init__(self, address: LatticeAddress, nc: Client) -> None:
        self.address = address
        self.names = address.names
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=REQUEST_SECONDS)
        self._buckets: dict[str, KeyValue] = {}
        self._objects: ObjectStore | None = None

    @classmethod
    async def connect(cls, address: LatticeAddress, *, timeout: float = CONNECT_SECONDS) -> Lattice:
        """Connect, or raise LatticeError within `timeout` seconds."""

        async def quiet(error: Exception) -> None:  # nats-py logs whole tracebacks otherwise
            logger.debug("lattice %s: %s", address.shown, error)

        options: dict[str, Any] = {
            "servers": list(address.urls),
            "error_cb": quiet,
            "reconnect_time_wait": 0.2,
            "max_reconnect_attempts": -1,
            "connect_timeout": min(2.0, timeout),
        }
        if address.creds is not None:
            options["user_credentials"] = str(address.creds)
        try:
            context = address.tls()
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise LatticeError(
                f"cannot use the TLS files for the lattice ({type(error).__name__}: {error}): "
                "give PEM files (--lattice-tls-ca, --lattice-tls-cert with its --lattice-tls-key)"
            ) from None
        if context is not None:
            options["tls"] = context
        try:
            nc = await asyncio.wait_for(nats.connect(**options), timeout)
        except (TimeoutError, OSError, nats.errors.Error) as error:
            raise LatticeError(
                f"cannot reach the lattice at {address.shown} within {timeout:g} s ({type(error).__name__}: "
                f"{error or 'no answer'}): start a NATS server with JetStream (`nats-server -js`), or fix --lattice"
            ) from None
        return cls(address, nc)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    async def bucket(self, name: str, **config: Any) -> KeyValue:
        """The KV bucket `name`, created with `config` (KeyValueConfig fields) if absent."""
        found = self._buckets.get(name)
        if found is not None:
            return found
        try:
            found = await self.js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            try:
                found = await self.js.create_key_value(KeyValueConfig(bucket=name, storage=StorageType.FILE, **config))
            except nats.js.errors.BadRequestError:  # another host created it meanwhile
                found = await self.js.key_value(name)
        await self._until_routable(f"$KV.{name}.orch-probe")
        self._buckets[name] = found
        return found

    async def _until_routable(self, subject: str) -> None:
        """Return once a publish on `subject` reaches its stream (for at most REQUEST_SECONDS).

        In a cluster, a stream just created on another server is not yet known to this one:
        a write there gets "no responders" until the interest has travelled the routes (seen
        under load right after a bucket was made). The probe is a publish the stream refuses
        without storing it (it expects a last sequence the subject cannot have), so its
        answer proves the route and writes nothing."""
        deadline = time.monotonic() + REQUEST_SECONDS
        while True:
            try:
                await self.js.publish(subject, b"", headers={"Nats-Expected-Last-Subject-Sequence": str(1 << 62)})
            except nats.js.errors.NoStreamResponseError:
                if time.monotonic() >= deadline:
                    return  # the writes themselves will say what is wrong
                await asyncio.sleep(0.02)
                continue
            except nats.js.errors.APIError:
                return  # refused by the stream, as meant: it is reachable
            except (TimeoutError, nats.errors.Error) as error:
                logger.debug("lattice %s: probing %s: %r", self.names.name, subject, error)
                return
            logger.warning("lattice %s: the probe on %s was stored", self.names.name, subject)
            return

    async def objects(self) -> ObjectStore:
        """The artifacts' object store (wasm modules and manifests by sha256)."""
        if self._objects is not None:
            return self._objects
        name = self.names.artifacts
        try:
            found = await self.js.object_store(name)
        except nats.js.errors.BucketNotFoundError:
            try:
                found = await self.js.create_object_store(name, config=ObjectStoreConfig(storage=StorageType.FILE))
            except nats.js.errors.BadRequestError:
                found = await self.js.object_store(name)
        await self._until_routable(f"$O.{name}.M.orch-probe")
        self._objects = found
        return found
