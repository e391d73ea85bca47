"""The control API: HTTP/JSON over the state dir's unix socket (server) and its client.

server.py       ControlApi / ControlServer (aiohttp server): the endpoints (contract)
connections.py  the listening socket's protocol factory: connection cap, deadlines, JSON
                errors for requests aiohttp's parser refuses, file-descriptor headroom
events.py       GET /v1/events: SSE history then live, in chunks with backpressure
inputs.py       strict JSON bodies and query parameters, bodies read within a deadline
responses.py    the JSON error shape and the status code of each error kind
settings.py     ServerLimits: every bound the API enforces, with the reasons
client.py       Client (aiohttp client, for the dashboard), the errors, socket_for
blocking.py     SyncClient (the standard library): the CLI's one-shot verbs
"""
