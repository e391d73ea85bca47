"""`orch completion bash|zsh|fish`: shell completion scripts generated from the parser.

The parser is walked once (`command_tree`) into one node per command path (`orch`, `orch
wasm`, `orch wasm call`, ...): its sub-verbs, its options (with what their value is:
choices, a file, or free text) and its positionals. Each script holds that table as shell
functions (`case` over "path|word", so bash and zsh share them; fish gets its own `switch`)
and a small driver that walks the words typed so far: sub-verbs extend the path, an
option that takes a value skips the next word, anything else counts as a positional.

Capsule names (positionals marked `complete = "capsule"`) are asked lazily, when that
position is completed, from the hidden `orch __complete capsules` (with the `--config` or
`--socket` already typed): it prints the running capsules' names, and nothing (status 0)
when no orchestrator answers within a second, so a TAB never hangs or prints an error.

Registered by orchestrator.cli.main (VERB_MODULES); imports nothing heavy.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .helptext import verb_help

SHELLS = ("bash", "zsh", "fish")
NAMES_TIMEOUT_S = 1.0
FILE_METAVARS = {"FILE", "DIR", "PATH", "CONFIG"}


def add_commands(verbs: Any) -> None:
    completion = verbs.add_parser(
        "completion", help="print a shell completion script (bash, zsh, fish)", **verb_help("completion")
    )
    completion.add_argument("shell", choices=SHELLS)
    completion.set_defaults(run=print_script)
    # Hidden (no help, so not listed): what the scripts call for capsule names.
    names = verbs.add_parser("__complete")
    names.add_argument("what", choices=("capsules",))
    names.add_argument("--config", type=Path)
    names.add_argument("--socket", type=Path)
    names.set_defaults(run=print_capsule_names)


class Node:
    """One command path: what may follow it. (A plain class: this module is imported for
    every command, and `dataclasses` costs start-up.)"""

    def __init__(self, path: str) -> None:
        self.path = path
        self.commands: list[tuple[str, str]] = []  # (name, help)
        self.options: list[tuple[str, str]] = []  # (option string, help)
        self.values: dict[str, str] = {}  # option taking a value -> kind
        self.positionals: list[str] = []  # kinds, in order
        self.repeat_last = False  # the last positional takes any number of words


def command_tree(parser: argparse.ArgumentParser, path: str = "orch") -> list[Node]:
    """Every command path of `parser`, depth first (hidden verbs, named `_...`, left out)."""
    node = Node(path)
    nodes = [node]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if name.startswith("_"):
                    continue
                node.commands.append((name, helps.get(name, "")))
                nodes += command_tree(sub, f"{path} {name}")
        elif action.option_strings:
            text = "" if action.help in (None, argparse.SUPPRESS) else str(action.help)
            for option in action.option_strings:
                node.options.append((option, text))
                if action.nargs != 0:
                    node.values[option] = _kind(action)
        else:
            node.positionals.append(_kind(action))
            node.repeat_last = action.nargs in ("*", "+", argparse.REMAINDER)
    return nodes


def _kind(action: argparse.Action) -> str:
    if action.choices is not None:
        return "choices " + " ".join(str(c) for c in action.choices)
    if getattr(action, "complete", None) == "capsule":
        return "capsule"
    if action.type is Path or (isinstance(action.metavar, str) and action.metavar in FILE_METAVARS):
        return "file"
    return "any"


# -- the table, as shell functions -----------------------------------------------------------
def _q(text: str) -> str:
    return shlex.quote(text)


def _pattern(key: str) -> str:
    """A `case` pattern matching `key` literally, but for a final `*` (any word)."""
    return _q(key[:-1]) + "*" if key.endswith("|*") else _q(key)


def _sh_case(function: str, comment: str, arms: list[tuple[list[str], str]], default: str) -> str:
    lines = [f"{function}() {{  # {comment}", '    case "$1|$2" in']
    for keys, body in arms:
        lines.append(f"        {'|'.join(_pattern(k) for k in keys)}) {body} ;;")
    lines += [f"        *) {default} ;;", "    esac", "}"]
    return "\n".join(lines)


def _sh_table(nodes: list[Node], *, described: bool) -> str:
    """The table as POSIX-shell functions (valid bash and zsh)."""
    is_command = [([f"{n.path}|{name}" for n in nodes for name, _ in n.commands] or ["-"], "return 0")]
    commands, options, values, positionals = [], [], [], []
    for n in nodes:
        if n.commands:
            words = [f"{name}:{text.replace(':', ' ')}" if described else name for name, text in n.commands]
            commands.append(([f"{n.path}|"], "printf '%s\\n' " + " ".join(_q(w) for w in words)))
        if n.options:
            options.append(([f"{n.path}|"], "printf '%s\\n' " + " ".join(_q(o) for o, _ in n.options)))
        for option, kind in n.values.items():
            values.append(([f"{n.path}|{option}"], f"echo {_q(kind)}"))
        for index, kind in enumerate(n.positionals):
            values_key = f"{n.path}|{index}"
            positionals.append(([values_key], f"echo {_q(kind)}"))
        if n.repeat_last and n.positionals:
            positionals.append(([f"{n.path}|*"], f"echo {_q(n.positionals[-1])}"))
    return "\n\n".join(
        [
            _sh_case("_orch_is_command", "PATH WORD: is WORD a sub-verb of PATH?", is_command, "return 1"),
            _sh_case("_orch_commands", "PATH '': its sub-verbs", commands, ":"),
            _sh_case("_orch_options", "PATH '': its options", options, ":"),
            _sh_case("_orch_value", "PATH OPTION: the kind of value OPTION takes", values, "return 1"),
            _sh_case("_orch_positional", "PATH N: the kind of the Nth positional", positionals, "echo any"),
            _SH_CAPSULES,
        ]
    )


_SH_CAPSULES = """\
_orch_capsules() {  # PROGRAM CONFIG SOCKET: the running capsules' names, or nothing
    local -a orch_args
    orch_args=(__complete capsules)
    [ -n "$2" ] && orch_args+=(--config "$2")
    [ -n "$3" ] && orch_args+=(--socket "$3")
    "$1" "${orch_args[@]}" 2>/dev/null
}"""

# The word walk shared by the bash and zsh drivers: WORDS / FIRST / CURRENT differ.
_SH_WALK = """\
    local cmdpath="orch" option="" config="" socket="" kind="" word
    local -i index npos=0
    for ((index = FIRST; index < CURRENT; index++)); do
        word="${WORDS[index]}"
        if [ -n "$option" ]; then
            case "$option" in --config) config="$word" ;; --socket) socket="$word" ;; esac
            option=""
            continue
        fi
        case "$word" in
            --*=*) continue ;;
            -*) _orch_value "$cmdpath" "$word" >/dev/null && option="$word"; continue ;;
        esac
        if _orch_is_command "$cmdpath" "$word"; then
            cmdpath="$cmdpath $word"
            npos=0
        else
            npos=$((npos + 1))
        fi
    done"""


def bash_script(nodes: list[Node]) -> str:
    walk = (
        _SH_WALK.replace("FIRST", "1")
        .replace("CURRENT", "COMP_CWORD")
        .replace("${WORDS[index]}", "${COMP_WORDS[index]}")
    )
    return f"""\
# bash completion for orch (generated by `orch completion bash`)
# Install: orch completion bash > ~/.local/share/bash-completion/completions/orch
#      or: source <(orch completion bash)

{_sh_table(nodes, described=False)}

_orch() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}"
{walk}
    COMPREPLY=()
    if [ -n "$option" ]; then
        kind=$(_orch_value "$cmdpath" "$option")
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$(_orch_options "$cmdpath" "")" -- "$cur"))
        return 0
    else
        local commands
        commands=$(_orch_commands "$cmdpath" "")
        if [ -n "$commands" ]; then
            COMPREPLY=($(compgen -W "$commands" -- "$cur"))
            return 0
        fi
        kind=$(_orch_positional "$cmdpath" "$npos")
    fi
    case "$kind" in
        "choices "*) COMPREPLY=($(compgen -W "${{kind#choices }}" -- "$cur")) ;;
        capsule) COMPREPLY=($(compgen -W "$(_orch_capsules "${{COMP_WORDS[0]}}" "$config" "$socket")" -- "$cur")) ;;
        file)
            COMPREPLY=($(compgen -f -- "$cur"))
            compopt -o filenames 2>/dev/null
            ;;
    esac
    return 0
}}

complete -F _orch orch
"""


def zsh_script(nodes: list[Node]) -> str:
    walk = _SH_WALK.replace("FIRST", "2").replace("${WORDS[index]}", "${words[index]}")
    return f"""\
#compdef orch
# zsh completion for orch (generated by `orch completion zsh`)
# Install: orch completion zsh > "${{fpath[1]}}/_orch"   (then restart zsh, or run compinit)
#      or: source <(orch completion zsh)                (after compinit)

{_sh_table(nodes, described=True)}

_orch() {{
    local cur="${{words[CURRENT]}}"
{walk}
    if [ -n "$option" ]; then
        kind=$(_orch_value "$cmdpath" "$option")
    elif [[ "$cur" == -* ]]; then
        local -a orch_opts
        orch_opts=(${{(f)"$(_orch_options "$cmdpath" "")"}})
        compadd -- $orch_opts
        return 0
    else
        local -a orch_cmds
        orch_cmds=(${{(f)"$(_orch_commands "$cmdpath" "")"}})
        if (( ${{#orch_cmds}} )); then
            _describe -t commands 'orch command' orch_cmds
            return 0
        fi
        kind=$(_orch_positional "$cmdpath" "$npos")
    fi
    case "$kind" in
        "choices "*) compadd -- ${{=kind#choices }} ;;
        capsule) compadd -- ${{(f)"$(_orch_capsules "${{words[1]}}" "$config" "$socket")"}} ;;
        file) _files ;;
    esac
    return 0
}}

if [ "${{funcstack[1]:-}}" = "_orch" ]; then
    _orch "$@"
else
    compdef _orch orch
fi
"""


def fish_script(nodes: list[Node]) -> str:
    def switch(function: str, comment: str, arms: list[tuple[list[str], str]], default: str) -> str:
        lines = [f"function {function}  # {comment}", '    switch "$argv[1]|$argv[2]"']
        for keys, body in arms:
            lines += [f"        case {' '.join(_q(k) for k in keys)}", f"            {body}"]
        lines += ["        case '*'", f"            {default}", "    end", "end"]
        return "\n".join(lines)

    is_command = [([f"{n.path}|{name}" for n in nodes for name, _ in n.commands] or ["-"], "return 0")]
    commands, options, values, positionals = [], [], [], []
    for n in nodes:
        if n.commands:
            words = " ".join(_q(f"{name}\t{text}") for name, text in n.commands)
            commands.append(([f"{n.path}|"], f"printf '%s\\n' {words}"))
        if n.options:
            words = " ".join(_q(f"{option}\t{text}" if text else option) for option, text in n.options)
            options.append(([f"{n.path}|"], f"printf '%s\\n' {words}"))
        for option, kind in n.values.items():
            values.append(([f"{n.path}|{option}"], f"echo {_q(kind)}"))
        for index, kind in enumerate(n.positionals):
            positionals.append(([f"{n.path}|{index}"], f"echo {_q(kind)}"))
        if n.repeat_last and n.positionals:
            positionals.append(([f"{n.path}|*"], f"echo {_q(n.positionals[-1])}"))
    table = "\n\n".join(
        [
            switch("__orch_is_command", "PATH WORD: is WORD a sub-verb of PATH?", is_command, "return 1"),
            switch("__orch_commands", "PATH '': its sub-verbs", commands, "true"),
            switch("__orch_options", "PATH '': its options", options, "true"),
            switch("__orch_value", "PATH OPTION: the kind of value OPTION takes", values, "return 1"),
            switch("__orch_positional", "PATH N: the kind of the Nth positional", positionals, "echo any"),
        ]
    )
    return f"""\
# fish completion for orch (generated by `orch completion fish`)
# Install: orch completion fish > ~/.config/fish/completions/orch.fish

{table}

function __orch_complete
    set -l tokens (commandline -opc)
    set -l cur (commandline -ct)
    set -l program $tokens[1]
    set -e tokens[1]
    set -l cmdpath orch
    set -l npos 0
    set -l option ''
    set -l config ''
    set -l socket ''
    for word in $tokens
        if test -n "$option"
            switch $option
                case --config
                    set config $word
                case --socket
                    set socket $word
            end
            set option ''
            continue
        end
        switch $word
            case '--*=*'
                continue
            case '-*'
                if __orch_value "$cmdpath" $word >/dev/null
                    set option $word
                end
                continue
        end
        if __orch_is_command "$cmdpath" $word
            set cmdpath "$cmdpath $word"
            set npos 0
        else
            set npos (math $npos + 1)
        end
    end
    set -l kind
    if test -n "$option"
        set kind (__orch_value "$cmdpath" $option)
    else if string match -q -- '-*' "$cur"
        __orch_options "$cmdpath" ''
        return 0
    else
        set -l commands (__orch_commands "$cmdpath" '')
        if test (count $commands) -gt 0
            printf '%s\\n' $commands
            return 0
        end
        set kind (__orch_positional "$cmdpath" $npos)
    end
    switch "$kind"
        case 'choices *'
            string split ' ' -- (string replace 'choices ' '' -- "$kind")
        case capsule
            set -l orch_args __complete capsules
            test -n "$config"; and set -a orch_args --config $config
            test -n "$socket"; and set -a orch_args --socket $socket
            $program $orch_args 2>/dev/null
        case file
            __fish_complete_path "$cur"
    end
end

complete -c orch -f -a '(__orch_complete)'
"""


SCRIPTS = {"bash": bash_script, "zsh": zsh_script, "fish": fish_script}


def print_script(args: argparse.Namespace) -> int:
    nodes = command_tree(args.parser)
    sys.stdout.write(SCRIPTS[args.shell](nodes))
    return 0


def print_capsule_names(args: argparse.Namespace) -> int:
    """The running capsules' names, one a line; nothing when none can be had (status 0)."""
    from ..api.blocking import SyncClient
    from ..errors import OrchestratorError
    from .remote import socket_of  # ./config.yaml's state dir, else ./.orch (an orchestrator following git)

    try:
        with SyncClient(socket_of(args), timeout=NAMES_TIMEOUT_S) as api:
            capsules = api.status()["capsules"]
        names = [str(c["name"]) for c in capsules]
    except (OrchestratorError, OSError, ValueError, KeyError, TypeError):
        return 0
    for name in names:
        if name.isprintable() and " " not in name:
            print(name)
    return 0
