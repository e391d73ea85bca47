"""The control API: HTTP/JSON over the state dir's unix socket (server) and its client.

server.py   ControlApi / ControlServer (aiohttp server): the endpoints (contract)
client.py   Client (aiohttp client): used by the CLI's operator verbs and the dashboard
"""
