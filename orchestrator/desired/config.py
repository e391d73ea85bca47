"""config.yaml: the operator's desired state, as one validated, frozen tree.

Owns the models (`OrchestratorConfig` and its parts) and the loader (`load_config` reads the
file; `parse_config` does the rest). The YAML (orchestrator.desired.yamlsource) is composed into nodes
first, so every problem names the file, the line of the offending key or value, the dotted
field, and what is allowed (with the nearest valid key for a typo); duplicate keys,
non-text keys and unknown keys are errors, never silently dropped. `${VAR}` and
`${VAR:-default}` are expanded in capsule config values only. References are checked once
the structure is valid: `depends_on` targets, cycles, and that each capsule folder has a
Capsule.toml. Checking config keys against a capsule's `[env]` is the manifest layer's job,
with `LoadedConfig.line_of` for the line.

No I/O beyond reading the file and looking at the capsule folders it names. Used by the
desired-state loader and the CLI (`validate`, `plan`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import os
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigError, Problem
from ..files import FileReadError, FileStamp, read_regular
from .common import MANIFEST, NAME, LimitsOverride, Loc, capped, dotted, line_at, listed, suggest, surrogate_line
from .yamlsource import YamlReader

CONFIG_FILE = "config.yaml"
MAX_CONFIG_BYTES = 4 << 20
NAME_RE = re.compile(NAME)


def _none_is_empty(value: Any, empty: Callable[[], Any]) -> Any:
    """A key written with nothing after it (`config:`) means an empty mapping or list."""
    return empty() if value is None else value


def _check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid deployment name {_show(name)}: use lowercase letters, digits and '-' "
            "(not first or last), at most 64 characters"
        )
    return name


def _check_path(value: str) -> str:
    if not value or "\0" in value:
        raise ValueError("must be a non-empty path without NUL characters")
    return value


DeploymentName = Annotated[str, AfterValidator(_check_name)]
PathText = Annotated[str, AfterValidator(_check_path)]
EmptyDict = BeforeValidator(lambda v: _none_is_empty(v, dict))
EmptyList = BeforeValidator(lambda v: _none_is_empty(v, list))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PublishRate(_Model):
    """How fast a capsule may publish on the bus (a token bucket with one second of burst)."""

    messages_per_second: float | None = Field(None, gt=0, description="a number > 0 (built-in: 1000)")
    bytes_per_second: float | None = Field(None, gt=0, description="a number > 0 (built-in: 8388608)")


class Defaults(_Model):
    """defaults: what applies to every deployment that does not say otherwise."""

    limits: Annotated[LimitsOverride, EmptyDict] = Field(
        default_factory=LimitsOverride, description="a mapping of fuel, memory_mib, timeout_ms"
    )
    publish_rate: Annotated[PublishRate, EmptyDict] = Field(
        default_factory=PublishRate, description="a mapping of messages_per_second, bytes_per_second"
    )


class Deployment(_Model):
    """capsules.<name>: one capsule folder running under one name."""

    path: PathText = Field(description="the capsule folder, relative to config.yaml's folder (or absolute)")
    config: Annotated[dict[str, Any], EmptyDict] = Field(
        default_factory=dict, description="a mapping of [env] keys to values (overrides the manifest's defaults)"
    )
    limits: Annotated[LimitsOverride, EmptyDict] = Field(
        default_factory=LimitsOverride, description="a mapping of fuel, memory_mib, timeout_ms"
    )
    publish_rate: Annotated[PublishRate, EmptyDict] = Field(
        default_factory=PublishRate, description="a mapping of messages_per_second, bytes_per_second"
    )
    instances: int = Field(1, ge=1, le=64, description="a whole number 1..64: parallel instances")
    depends_on: Annotated[list[str], EmptyList] = Field(
        default_factory=list, description="a list of deployment names started before this one"
    )
    enabled: bool = Field(True, description="true or false (false: stopped, state kept)")
    hosts: int = Field(1, ge=1, le=1000, description="a whole number 1..1000: in a lattice, how many hosts run it")
    labels: Annotated[dict[str, str], EmptyDict] = Field(
        default_factory=dict, description="a mapping of label to value: in a lattice, only hosts with all of these"
    )


class LatticeSettings(_Model):
    """lattice: how the deployment behaves when applied to a lattice (`orch apply --lattice`)."""

    replicas: int = Field(1, ge=1, le=5, description="a whole number 1..5: copies of the KV data in the NATS cluster")


class EngineSettings(_Model):
    """engine: how modules are compiled and cached on this host."""

    cache_max_mib: int = Field(1024, ge=1, description="a whole number >= 1: MiB of compiled modules kept on disk")
    max_module_mib: int = Field(
        32, ge=1, le=1024, description="a whole number 1..1024: the largest .wasm accepted, in MiB"
    )


class HistorySettings(_Model):
    """history: the versions each deployment ran, their modules and KV snapshots (`orch
    history`, `orch rollback`), kept in the state dir."""

    versions: int = Field(
        20, ge=1, le=1000, description="a whole number 1..1000: history entries kept per deployment (with their .wasm)"
    )
    snapshots: int = Field(
        5, ge=0, le=100, description="a whole number 0..100: KV snapshots kept per deployment (0: none are taken)"
    )
    snapshot_max_mib: int = Field(
        256, ge=1, le=1 << 20, description="a whole number >= 1: MiB of KV snapshots kept per deployment, at most"
    )


CapabilityName = Literal["kv", "fs_read", "fs_write", "ipc_publish", "ipc_subscribe", "net"]


class ApprovalPolicy(_Model):
    """approvals: whether a start or reload that grants a capsule more than it runs with goes
    ahead by itself (every grant is still audited) or waits for `orch approve`. The policy in
    force is the one of the config that runs, never the one of the change that asks."""

    escalations: Literal["allow", "ask"] = Field(
        "allow", description="allow (the local dev loop) or ask (wait for `orch approve`, unless listed in allow)"
    )
    allow: Annotated[list[CapabilityName], EmptyList] = Field(
        default_factory=list,
        max_length=6,
        description="a list of capabilities granted without asking under `escalations: ask` "
        "(kv, fs_read, fs_write, ipc_publish, ipc_subscribe, net)",
    )

    @model_validator(mode="after")
    def _allow_needs_ask(self) -> ApprovalPolicy:
        if self.allow and self.escalations != "ask":
            raise ValueError(
                "allow lists the capabilities granted without asking, which only means something with "
                "`escalations: ask` (`allow`, the default, grants every capability): add `escalations: ask`"
            )
        if len(set(self.allow)) != len(self.allow):
            twice = sorted({c for c in self.allow if self.allow.count(c) > 1})
            raise ValueError(f"allow lists {', '.join(twice)} more than once: list each capability once")
        return self


class OrchestratorConfig(_Model):
    """A whole config.yaml."""

    version: Literal[1] = Field(description="the config format version: 1")
    workspace: PathText = Field(".", description="a path: the root of cwd:// paths, relative to config.yaml's folder")
    state_dir: PathText = Field(".orch", description="a path: KV database, module cache, socket, applied state")
    defaults: Annotated[Defaults, EmptyDict] = Field(default_factory=Defaults, description="a mapping with limits")
    builds: bool = Field(
        True, description="true or false: run capsules' [build] commands when their sources change (the dev loop)"
    )
    engine: Annotated[EngineSettings, EmptyDict] = Field(
        default_factory=EngineSettings, description="a mapping of cache_max_mib, max_module_mib"
    )
    lattice: Annotated[LatticeSettings, EmptyDict] = Field(
        default_factory=LatticeSettings, description="a mapping with replicas"
    )
    history: Annotated[HistorySettings, EmptyDict] = Field(
        default_factory=HistorySettings, description="a mapping of versions, snapshots, snapshot_max_mib"
    )
    approvals: Annotated[ApprovalPolicy, EmptyDict] = Field(
        default_factory=ApprovalPolicy, description="a mapping of escalations (allow or ask) and allow (capabilities)"
    )
    capsules: Annotated[dict[DeploymentName, Deployment], EmptyDict] = Field(
        default_factory=dict, description="a mapping of deployment names to deployments"
    )

    @field_validator("version", mode="before")
    @classmethod
    def _exactly_one(cls, value: Any) -> Any:
        if type(value) is not int or value != 1:
            raise ValueError(f"unsupported version {value!r}: this orchestrator reads version 1")
        return value


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config.yaml with its paths resolved and the line of every key."""

    path: Path
    model: OrchestratorConfig
    workspace: Path
    state_dir: Path
    text_sha256: str
    lines: Mapping[Loc, int] = field(default_factory=dict, repr=False, compare=False)
    stamp: FileStamp | None = field(default=None, repr=False, compare=False)  # of the file read (load_config)

    def folder(self, name: str) -> Path:
        """The absolute capsule folder of deployment `name` (KeyError if there is none)."""
        return self.folders[name]

    @functools.cached_property
    def folders(self) -> Mapping[str, Path]:
        """Every deployment's absolute capsule folder (resolved once per config read)."""
        base = self.path.parent
        return MappingProxyType({name: _resolve(base, d.path) for name, d in self.model.capsules.items()})

    def line_of(self, *loc: str | int) -> int | None:
        """The line of key path `loc` (e.g. "capsules", "hello", "config", "greeting"); for a
        path the file does not spell out, the line of its deepest ancestor that it does."""
        return line_at(self.lines, loc)


def load_config(path: Path | str, *, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate a config.yaml (a folder means its config.yaml). Raises ConfigError."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        path = path / CONFIG_FILE
    try:
        data, stamp = read_regular(path, limit=MAX_CONFIG_BYTES, what="config file")
    except FileReadError as error:
        if error.errno == errno.ENOENT:
            reason = f"no {path.name} here: create one or pass the path of an existing one"
        elif _over_limit(path):
            reason = (
                f"{error.reason}: a config holds the desired state only; keep it under "
                f"{MAX_CONFIG_BYTES >> 20} MiB (bulky capsule settings belong in files the capsule reads)"
            )
        else:
            reason = f"{error.reason}; check the path and permissions"
        raise ConfigError([Problem(reason, file=str(path))]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError([Problem("not UTF-8 text: save the file as UTF-8", file=str(path), line=line)]) from None
    return dataclasses.replace(parse_config(text, path=path, environ=environ), stamp=stamp)


def _over_limit(path: Path) -> bool:
    try:
        return os.stat(path).st_size > MAX_CONFIG_BYTES
    except OSError:
        return False


def parse_config(text: str, *, path: Path, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Validate config.yaml text read from `path`. Raises ConfigError listing every problem."""
    path = Path(os.path.abspath(path))
    file = str(path)
    if (bad := surrogate_line(text)) is not None:
        raise ConfigError([Problem("not UTF-8 text (a lone surrogate): save the file as UTF-8", file=file, line=bad)])
    reader = YamlReader(file)
    data = reader.read(text)
    if data is None:
        raise ConfigError(capped(reader.problems, file=file))
    problems = reader.problems
    lines = reader.lines
    data = _expand_capsule_config(data, os.environ if environ is None else environ, problems, lines, file)
    model: OrchestratorConfig | None = None
    try:
        model = OrchestratorConfig.model_validate(data)
    except ValidationError as error:
        problems.extend(_validation_problem(e, lines, file) for e in error.errors(include_url=False))
    if model is not None:
        problems.extend(_reference_problems(model, path.parent, lines, file))
    if model is None:
        problems.sort(key=lambda p: p.line or 0)
        raise ConfigError(capped(problems, file=file))
    loaded = LoadedConfig(
        path=path,
        model=model,
        workspace=_resolve(path.parent, model.workspace),
        state_dir=_resolve(path.parent, model.state_dir),
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        lines=MappingProxyType(lines),
    )
    if problems:
        problems.sort(key=lambda p: p.line or 0)
        references = ConfigError(capped(problems, file=file))
        references.partial = loaded  # well-formed, but with reference problems: callers may check further
        raise references
    return loaded


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand_capsule_config(
    data: dict[str, Any], environ: Mapping[str, str], problems: list[Problem], lines: Mapping[Loc, int], file: str
) -> dict[str, Any]:
    """`data` with ${VAR} expanded in every string inside capsules.*.config."""
    capsules = data.get("capsules")
    if not isinstance(capsules, dict):
        return data

    def expand(value: Any, loc: Loc) -> Any:
        if isinstance(value, dict):
            return {k: expand(v, (*loc, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [expand(v, (*loc, i)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "$" not in value:
            return value

        def problem(message: str) -> None:
            problems.append(Problem(message, file=file, line=line_at(lines, loc), field=dotted(loc)))

        return _substitute(value, environ, problem)

    expanded = dict(capsules)
    for name, deployment in capsules.items():
        if isinstance(deployment, dict) and isinstance(deployment.get("config"), dict):
            expanded[name] = {**deployment, "config": expand(deployment["config"], ("capsules", name, "config"))}
    return {**data, "capsules": expanded}


def _substitute(text: str, environ: Mapping[str, str], problem: Callable[[str], None]) -> str:
    """`text` with `${NAME}` and `${NAME:-default}` replaced and `$${` made `${`; each reference
    that cannot be expanded is reported and left as written. Linear in the length of `text`
    (a regex with a `[^}]*` default rescans the rest of the text at every unclosed `${`)."""
    out: list[str] = []
    position = 0
    close = -1  # the next '}' at or after the current reference (found once, reused)
    while (start := text.find("$", position)) >= 0:
        out.append(text[position:start])
        if text.startswith("$${", start):
            out.append("${")
            position = start + 3
            continue
        if not text.startswith("${", start):
            out.append("$")
            position = start + 1
            continue
        name = _NAME.match(text, start + 2)
        end = name.end() if name else start + 2
        default: str | None = None
        if name and text.startswith(":-", end):
            if close < end + 2:
                close = text.find("}", end + 2)
                if close < 0:
                    close = len(text)
            if close < len(text):
                default, end = text[end + 2 : close], close
        if not name or not text.startswith("}", end):
            problem("malformed '${': write ${NAME} or ${NAME:-default}, and $${ for a literal '${'")
            out.append("${")
            position = start + 2
            continue
        reference, variable = text[start : end + 1], name.group()
        position = end + 1
        found = environ.get(variable)
        if found is None or (found == "" and default is not None):
            if default is not None:
                out.append(default)
                continue
            problem(
                f"environment variable {variable!r} is not set: set it, or give a default: ${{{variable}:-default}}"
            )
            out.append(reference)
            continue
        out.append(found)
    out.append(text[position:])
    return "".join(out)


def _validation_problem(error: Any, lines: Mapping[Loc, int], file: str) -> Problem:
    loc: Loc = tuple(p for p in error["loc"] if p != "[key]")
    message = str(error["msg"]).removeprefix("Value error, ")
    model = _model_at(loc[:-1])
    info = model.model_fields.get(str(loc[-1])) if model is not None and loc else None
    if error["type"] == "extra_forbidden":
        allowed = sorted(model.model_fields) if model is not None else []
        message = f"unknown key {_show(loc[-1])}{suggest(str(loc[-1]), allowed)}; allowed here: {', '.join(allowed)}"
    elif error["type"] == "missing":
        message = f"required: {info.description}" if info is not None else "required"
    elif error["type"] == "model_type" and (target := _model_at(loc)) is not None:
        message = f"expected a mapping with keys {', '.join(target.model_fields)}, got {_show(error['input'])}"
    elif error["type"] != "value_error":
        message += f", got {_show(error['input'])}" + (f"; expected {info.description}" if info is not None else "")
    return Problem(message, file=file, line=line_at(lines, loc), field=dotted(loc))


def _model_at(loc: Loc) -> type[BaseModel] | None:
    match loc:
        case ():
            return OrchestratorConfig
        case ("defaults",):
            return Defaults
        case ("engine",):
            return EngineSettings
        case ("lattice",):
            return LatticeSettings
        case ("approvals",):
            return ApprovalPolicy
        case ("defaults", "limits") | ("capsules", _, "limits"):
            return LimitsOverride
        case ("capsules", _):
            return Deployment
    return None


def _reference_problems(model: OrchestratorConfig, base: Path, lines: Mapping[Loc, int], file: str) -> list[Problem]:
    problems: list[Problem] = []

    def add(message: str, *loc: str | int) -> None:
        problems.append(Problem(message, file=file, line=line_at(lines, loc), field=dotted(loc)))

    names = list(model.capsules)
    graph: dict[str, list[tuple[str, int]]] = {}
    for name, deployment in model.capsules.items():
        graph[name] = []
        seen: dict[str, int] = {}
        for i, target in enumerate(deployment.depends_on):
            loc = ("capsules", name, "depends_on", i)
            if target in seen:
                earlier = line_at(lines, (*loc[:3], seen[target]))
                add(f"{target!r} is listed twice (first at line {earlier}): remove one", *loc)
                continue
            seen[target] = i
            if target == name:
                add(f"{name!r} depends on itself (depends_on cycle: {name} -> {name}); remove it", *loc)
            elif target not in model.capsules:
                others = listed(n for n in names if n != name) or "none"
                add(f"unknown deployment {target!r}{suggest(target, names)}; deployments: {others}", *loc)
            else:
                graph[name].append((target, i))
        add_folder_problem = _folder_problem(base, deployment.path)
        if add_folder_problem:
            add(add_folder_problem, "capsules", name, "path")
    for cycle in _cycles(graph):
        first, second = cycle[0], cycle[1]
        index = next(i for t, i in graph[first] if t == second)
        add(
            f"depends_on cycle: {_ring(cycle)}; remove one of these dependencies",
            "capsules",
            first,
            "depends_on",
            index,
        )
    return problems


def _folder_problem(base: Path, value: str) -> str | None:
    folder = _resolve(base, value)
    where = "" if Path(value).is_absolute() else f" ({value!r} relative to {base})"
    try:
        if not folder.exists():
            return f"capsule folder {folder} does not exist{where}: create it or fix the path"
        if not folder.is_dir():
            return f"{folder} is not a folder{where}: path names a capsule folder containing {MANIFEST}"
        if not (folder / MANIFEST).is_file():
            return f"no {MANIFEST} in {folder}: every capsule folder needs one"
    except OSError as error:
        return f"cannot look at {folder}: {error.strerror or error}"
    return None


MAX_CYCLES = 10


def _cycles(graph: Mapping[str, list[tuple[str, int]]]) -> list[list[str]]:
    """A shortest cycle through each deployment on one that no earlier cycle passes through
    (in name order, each rotated to start at its least name), at most MAX_CYCLES of them.
    Searches only inside strongly connected components: linear for a long chain or ring."""
    component = _components(graph)
    found: list[list[str]] = []
    covered: set[str] = set()
    for start in sorted(graph):
        if start in covered or len(found) >= MAX_CYCLES:
            continue
        parent: dict[str, str] = {}
        queue = deque([start])
        while queue and start not in parent:
            node = queue.popleft()
            for target, _ in graph[node]:
                if target not in parent and component[target] == component[start]:
                    parent[target] = node
                    queue.append(target)
        if start not in parent:
            continue
        chain: list[str] = []
        node = parent[start]
        while node != start:  # walk back from the last hop to the first
            chain.append(node)
            node = parent[node]
        ring = [start, *reversed(chain)]
        covered.update(ring)
        least = ring.index(min(ring))
        cycle = [*ring[least:], *ring[:least], ring[least]]
        if cycle not in found:
            found.append(cycle)
    return found


def _components(graph: Mapping[str, list[tuple[str, int]]]) -> dict[str, int]:
    """The strongly connected component of each node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    component: dict[str, int] = {}
    stack: list[str] = []
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, edge = work.pop()
            if edge == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
            targets = graph[node]
            while edge < len(targets) and targets[edge][0] in index:
                target = targets[edge][0]
                if target not in component:
                    low[node] = min(low[node], index[target])
                edge += 1
            if edge < len(targets):
                work.append((node, edge + 1))
                work.append((targets[edge][0], 0))
                continue
            if low[node] == index[node]:
                while True:
                    member = stack.pop()
                    component[member] = index[node]
                    if member == node:
                        break
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return component


def _ring(cycle: list[str]) -> str:
    if len(cycle) <= 12:
        return " -> ".join(cycle)
    return f"{' -> '.join(cycle[:5])} -> ... -> {' -> '.join(cycle[-5:])} ({len(cycle) - 1} deployments)"


def _resolve(base: Path, value: str) -> Path:
    return Path(os.path.normpath(base / value))


def _show(value: Any) -> str:
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
