"""The examples and exit codes at the end of each verb's `--help` (argparse epilogs).

`epilog(path)` is the text for a verb (`"kv"`, `"wasm call"`, ...); `HELP` holds the keyword
arguments every verb's parser takes (the raw formatter keeps the examples' layout). Used by
orchestrator.cli.main and .remote when they build the parser; plain strings, no imports.
"""

from __future__ import annotations

import argparse
from typing import Any

REMOTE_EXITS = """\
  0  done
  1  the orchestrator refused or the request failed (its message is printed)
  2  bad usage, or the config file cannot be read
  3  no orchestrator is running for that state dir"""

EPILOGS: dict[str, str] = {
    "": """\
examples:
  orch up                          run ./config.yaml in the foreground
  orch status                      from a second terminal: what runs
  orch call counter increment '{"by": 2}'
  orch completion bash > ~/.local/share/bash-completion/completions/orch

exit status: 0 success, 1 failure, 2 bad usage, 3 no orchestrator running
(each command's --help says more). Set NO_COLOR or pass --color never for plain output.""",
    "wasm": """\
examples:
  orch wasm call capsules/greet/greet.wasm greet --input Ada""",
    "wasm call": """\
examples:
  orch wasm call capsules/greet/greet.wasm greet --input Ada --config greeting=Hi
  echo -n "some text" | orch wasm call capsules/vowels/vowels.wasm count_vowels --input - --stats

exit status:
  0  the call succeeded; its output bytes are on stdout, unchanged
  1  the call failed (guest error, trap, fuel, timeout): one line on stderr
  2  bad usage, or a module that cannot be read, parsed or linked""",
    "capsule": """\
examples:
  orch capsule check capsules/counter
  orch capsule call capsules/counter increment '{"by": 2}'""",
    "capsule check": """\
examples:
  orch capsule check capsules/counter

exit status:
  0  valid: what the capsule may touch is printed
  1  invalid: every problem is listed with its file, line and field""",
    "capsule call": """\
examples:
  orch capsule call capsules/counter increment '{"by": 2}'
  echo '{"by": 3}' | orch capsule call capsules/counter increment - --state-dir /tmp/state

exit status:
  0  the tool's output is on stdout
  1  the call failed (bad input, denial, guest error): one line on stderr
  2  bad usage""",
    "up": """\
A git source follows a branch: each new revision is fetched (every --interval seconds, on
`orch reconcile`), checked out into a folder of its own, validated strictly (a revision
with any problem is not applied at all) and applied. The state dir is --state-dir, the
root of cwd:// paths --workspace; builds run only with --allow-builds.

examples:
  orch up                              ./config.yaml, events as readable lines
  orch up deploy/config.yaml --dash    with the dashboard in this terminal
  orch up --log-format json | jq .topic
  orch up git+https://git.example.com/ops/deploy.git#main:prod/config.yaml --state-dir /srv/orch
  orch up git+file:///srv/deploy.git#main --interval 10

exit status:
  0  stopped cleanly (SIGINT or SIGTERM)
  1  the config (or the branch's revision) is invalid, the branch cannot be fetched, or
     the state dir cannot be used: nothing started
  2  bad usage (a malformed git+ source, git options with a config file)
  130  a second signal: exited at once""",
    "dash": """\
With --lattice, the dashboard shows a whole lattice: every capsule with the hosts it serves
on (a host column), calls, KV and events over NATS. Restart, reconcile and plan are not
available there: hosts converge on the applied revision, `orch apply` changes it. Calls,
errors and fuel add up the hosts' reports, which may be a few seconds old.

examples:
  orch dash                     attach to the orchestrator of ./config.yaml (else of ./.orch)
  orch dash --state-dir /srv/orch
  orch dash --socket .orch/orch.sock
  orch dash --lattice nats://127.0.0.1:4222
  orch dash --lattice nats://a:4222,nats://b:4222 --lattice-name prod --lattice-creds ops.creds

exit status:
  0  the dashboard was closed
  2  the config file cannot be read, or bad usage (a malformed --lattice, or --lattice
     with CONFIG, --state-dir or --socket)""",
    "validate": """\
examples:
  orch validate
  orch validate deploy/config.yaml && orch plan deploy/config.yaml --exit-code
  orch validate git+file:///srv/deploy.git#main:config.yaml

exit status:
  0  the config and every capsule it names are valid
  1  invalid: every problem is listed with its file, line and field""",
    "plan": """\
CONFIG is compared with what runs: the running orchestrator's specs when one serves the
state dir CONFIG names (or --socket), else the last applied state (applied.json). The
first line says which. CONFIG may be a git revision, git+URL#REV:PATH (a branch, tag or
commit): cloned into a temporary folder and validated as `orch up git+...` would, then
compared with the orchestrator of --state-dir (default ./.orch).

examples:
  orch plan                                  ./config.yaml
  orch plan candidate.yaml --exit-code       would this change anything?
  orch plan --json | jq '.actions[] | select(.action != "keep")'
  orch plan git+file:///srv/deploy.git#3f2a9c1:config.yaml --exit-code --state-dir /srv/orch

exit status (with --exit-code; without it, 0 or 1):
  0  no changes
  1  errors: the config is invalid, the revision cannot be fetched, or the running
     orchestrator could not be asked
  2  changes
  3  --socket names no running orchestrator""",
    "status": f"""\
examples:
  orch status
  orch status --json | jq '.capsules[] | select(.phase != "Running") | .name'
  orch status --config deploy/config.yaml
  orch status --state-dir /srv/orch          an orchestrator following git (default ./.orch)
  orch status --json | jq .orchestrator.git   applied, fetched and rejected revisions

exit status:
{REMOTE_EXITS}""",
    "describe": f"""\
examples:
  orch describe counter
  orch describe counter --json | jq .tools

exit status:
{REMOTE_EXITS}""",
    "call": f"""\
The output is written as it is; on a terminal a final newline is added when it lacks
one (--newline adds it for a pipe too).

examples:
  orch call counter increment '{{"by": 2}}'
  echo '{{"by": 2}}' | orch call counter increment -
  orch call counter get | jq .count

exit status:
{REMOTE_EXITS}""",
    "events": f"""\
Payloads longer than 300 characters are cut, with a marker saying how much was left out;
--full shows them whole (--json always does).

examples:
  orch events                              the last 100 events
  orch events -f --topic 'orch.capsule.>'  then follow live ones
  orch events --json --history 0 -f | jq .payload

exit status:
{REMOTE_EXITS}
  141  the reader of the output went away (e.g. `| head -1`)""",
    "kv": f"""\
examples:
  orch kv ls counter
  orch kv get counter count
  orch kv set counter count 41
  orch kv set counter blob - < file.bin
  orch kv del counter count

`get` writes the value as it is (a final newline is added on a terminal, or with --newline).

exit status:
{REMOTE_EXITS}""",
    "reconcile": f"""\
examples:
  orch reconcile           re-read the files now (following git: fetch now); prints the plan applied
  orch reconcile --lattice nats://127.0.0.1:4222
                           the lattice's followed branch (orch apply ... --follow): the host
                           holding the scheduler lease fetches it now and publishes a new
                           valid revision

exit status:
{REMOTE_EXITS}
  with --lattice: 0 the branch's revision is the lattice's desired state (published now, or
  already); 1 it is rejected (its problems are printed), the fetch failed, no host holds
  the lease, or no branch is followed""",
    "restart": f"""\
examples:
  orch restart notes

exit status:
{REMOTE_EXITS}""",
    "approve": """\
examples:
  orch status                               # AWAITING: which capsules wait, and for what
  orch approve notes                        # grant it and run the change now
  orch approve notes --spec-hash 3fa1c2d4   # only if that is still the change waiting
  orch approve notes --lattice nats://127.0.0.1:4222   # waits until the lattice serves it

exit status:
  0  approved, and the change runs
  1  refused (it awaits nothing, or another change), or the approved version failed to load
  2  bad usage, or the config file cannot be read
  3  no orchestrator is running for that state dir""",
    "reject": """\
examples:
  orch reject notes                         # what runs keeps running; the change stays refused
  orch reject notes --spec-hash 3fa1c2d4
  orch reject notes --lattice nats://127.0.0.1:4222

exit status:
  0  rejected (until the capsule's files or config change again)
  1  refused (it awaits nothing, or another change)
  2  bad usage, or the config file cannot be read
  3  no orchestrator is running for that state dir""",
    "apply": """\
examples:
  orch apply config.yaml --lattice nats://127.0.0.1:4222
  orch apply config.yaml --lattice nats://a:4222,nats://b:4222 --lattice-creds host.creds
  orch apply 'git+https://git.example/ops.git#main:prod/config.yaml' --lattice nats://a:4222
      a git revision (a branch, tag or commit): fetched into a temporary clone, validated
      strictly, its modules uploaded; `orch status --lattice` shows its commit as the source
  orch apply 'git+https://git.example/ops.git#main:prod/config.yaml' --lattice nats://a:4222 --follow --interval 10
      and keep following the branch: the host holding the scheduler lease fetches it every
      10 s (and on `orch reconcile --lattice URL`), validates each new revision strictly and
      publishes it; a rejected one is shown by `orch status --lattice`, and the last good
      revision keeps running. Revisions must carry their modules (no builds on hosts), and
      ${VAR} in their config.yaml is not read from any environment (its default applies).
      An `orch apply` without --follow ends following.

exit status:
  0  the lattice accepted the new revision (or it was already the current one)
  1  a problem in the config, its capsules, the repository or the lattice: nothing was published
  2  bad usage (--follow with a config.yaml, --interval without --follow)""",
    "host": """\
examples:
  orch host --lattice nats://127.0.0.1:4222 --state-dir .host-a --label zone=eu

exit status:
  0  stopped by SIGINT or SIGTERM after draining (its capsules run elsewhere)
  1  the lattice cannot be reached, or the state dir is busy or unusable
  2  bad usage (a bad label or host id)
  130  a second signal: stopped at once""",
    "history": f"""\
examples:
  orch history counter
  orch history counter --json
  orch history counter --lattice nats://127.0.0.1:4222   # @ID: desired revisions

exit status:
{REMOTE_EXITS}""",
    "rollback": f"""\
examples:
  orch rollback counter                     # the version before the one running
  orch rollback counter --to 3fa1c2 --with-data
  orch rollback counter --to @12 --with-data --lattice nats://127.0.0.1:4222

exit status:
{REMOTE_EXITS}""",
    "unpin": f"""\
examples:
  orch unpin counter
  orch unpin counter --lattice nats://127.0.0.1:4222

exit status:
{REMOTE_EXITS}""",
    "new": """\
examples:
  orch new capsule hello
  orch new capsule hello --dir ~/src/hello""",
    "new capsule": """\
examples:
  orch new capsule hello                 # ./hello: Capsule.toml, assembly/index.ts, sdk/, package.json
  cd hello && npm install && npm run build && orch capsule check .

exit status:
  0  the folder was created (what to run next is printed)
  1  the folder exists and is not empty, or cannot be written
  2  bad usage, or an invalid capsule name""",
    "schema": """\
examples:
  orch schema --config > config.schema.json      then, atop config.yaml:
      # yaml-language-server: $schema=./config.schema.json
  orch schema --manifest > capsule.schema.json   then, atop Capsule.toml (taplo):
      #:schema ./capsule.schema.json
  orch schema | jq '.config.properties | keys'

exit status:
  0  the schema is on stdout
  2  bad usage""",
    "completion": """\
examples:
  orch completion bash > ~/.local/share/bash-completion/completions/orch
  orch completion zsh > "${fpath[1]}/_orch"        (then: compinit)
  orch completion fish > ~/.config/fish/completions/orch.fish
  source <(orch completion bash)                   for this shell only

Verbs, sub-verbs, options and their choices complete; capsule names too, from the
orchestrator of the config (or --socket) on the command line, when one runs.

exit status:
  0  the script is on stdout
  2  bad usage""",
}


def epilog(path: str) -> str | None:
    return EPILOGS.get(path)


def verb_help(path: str) -> dict[str, Any]:
    """The keyword arguments of `add_parser` for verb `path`: its epilog and the formatter."""
    return {"epilog": epilog(path), "formatter_class": argparse.RawDescriptionHelpFormatter}
