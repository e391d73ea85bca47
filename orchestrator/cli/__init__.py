"""The `orch` command: the only code that prints and configures logging.

main.py     the parser and dispatch; validate, plan, up, dash
author.py   the capsule author's verbs: wasm call, capsule check|call
scaffold.py `orch new capsule`: a capsule folder from templates/ (with the SDK)
remote.py   the operator's verbs: clients of a running orchestrator's control API
up.py       `orch up` in a terminal: run in the foreground, print events, signals
output.py   one-line failures, problem lists, exit codes
"""
