"""ServerLimits: every bound the control API enforces on its clients, with the reasons.

The socket is private (0600), so these bounds are not about strangers: they keep a runaway
script, a stuck dashboard or a flood of half-open connections from exhausting the
orchestrator's file descriptors and memory, which the watcher, the KV store and the module
cache need too. Used by orchestrator.api.server (and its helpers connections, events,
inputs); tests pass small values.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BODY = 1 << 20  # request bodies (tool arguments, KV values)


@dataclass(frozen=True, kw_only=True)
class ServerLimits:
    """The control API's bounds. All times in seconds.

    max_connections: open connections at most. At the cap, the connection that has waited
        longest for a request (idle, or still sending its request head) is closed to make
        room; only when every connection is busy (a call in progress, an event stream) is a
        new one refused with a 503. Also capped below the file-descriptor limit (see
        fd_reserve). 512: far beyond what a CLI, a dashboard and scripts use.
    fd_reserve: file descriptors kept free for everything else (the watcher, the KV store,
        the module cache, build processes). At start the soft RLIMIT_NOFILE is raised
        towards the hard limit (at most fd_target); the cap is at most
        `soft limit - descriptors open at start - fd_reserve`.
    fd_target: how far the soft RLIMIT_NOFILE is raised.
    idle_timeout: a connection with no request in progress for this long is closed. 30 s is
        longer than the keep-alive of the API's own client (aiohttp: 15 s), so the server
        never closes a connection the client is about to reuse.
    head_timeout: once a request head has begun, all of it (request line and headers) must
        arrive within this time; a client that trickles it (slowloris) is cut off. 10 s is
        ages on a local socket.
    body_timeout: a request body must arrive within this time once its head has (answered
        with a 408). 30 s: 1 MiB over a local socket takes milliseconds, even on a busy
        machine.
    max_headers: request headers at most (curl sends 3, the aiohttp client about 6); with
        aiohttp's 8190-byte field limit it bounds the memory a half-sent head can hold.
    max_event_streams: concurrent GET /v1/events streams (each holds a subscription); more
        are refused with a 503.
    stream_queue_events, stream_queue_bytes: the live queue of one event stream; beyond
        either the oldest events are dropped and announced with `event: lost`. 8 MiB: a
        stream pins at most that much besides the bus's history ring, so
        max_event_streams streams pin at most 512 MiB even with 1 MiB payloads.
    stream_chunk_bytes: an event stream writes at most about this much (or one event) at a
        time and waits for the socket to drain before the next, so a slow reader never
        makes the server serialise its backlog at once.
    stream_stall_timeout: an event stream whose client has read nothing for this long
        while the socket buffers are full is ended (it frees its slot; a live client
        reconnects). Only a client that stopped reading with megabytes pending reaches it.
    log_interval: warnings about refused, evicted, timed-out or malformed connections are
        logged at most once per this interval per kind, with a count of the others.
    """

    max_connections: int = 512
    fd_reserve: int = 256
    fd_target: int = 8192
    idle_timeout: float = 30.0
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    max_headers: int = 32
    max_event_streams: int = 64
    stream_queue_events: int = 4096
    stream_queue_bytes: int = 8 << 20
    stream_chunk_bytes: int = 64 << 10
    stream_stall_timeout: float = 60.0
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_event_streams", "stream_queue_events", "stream_queue_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be >= 1, not {getattr(self, name)}")
        for name in ("idle_timeout", "head_timeout", "body_timeout", "stream_stall_timeout", "log_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerLimits.{name} must be > 0, not {getattr(self, name)}")
        if self.fd_reserve < 0 or self.stream_chunk_bytes < 1 or self.max_headers < 1:
            raise ValueError("ServerLimits: fd_reserve must be >= 0, stream_chunk_bytes and max_headers >= 1")
