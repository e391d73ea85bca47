"""The `orch` command: the only code that prints and configures logging.

main.py        the parser and dispatch (imports nothing heavy: verbs load when they run); up, dash
helptext.py    each verb's examples and exit codes (argparse epilogs)
author.py      the capsule author's verbs: wasm call, capsule check|call
scaffold.py    `orch new capsule`: a capsule folder from templates/ (with the SDK)
remote.py      the operator's verbs: clients of a running orchestrator's control API
describe.py    `orch describe`: one capsule's summary as readable text
plan.py        `orch validate` and `orch plan` (a config diffed against what runs)
completion.py  `orch completion bash|zsh|fish`, generated from the parser
up.py          `orch up` in a terminal: run in the foreground, print events, signals
printer.py     non-blocking lines to stdout for `orch up`
output.py      one-line failures, problem lists, exit codes, colour, truncation, final newlines
"""
