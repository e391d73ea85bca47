"""Capsule.toml: the models, the loader, and configuration resolution against `[env]`.

A manifest says what a capsule is (`[package]`, its `[[component]]` wasm), what it offers
(`[[tool]]`, `[[interceptor]]`), what it reads (`[env.KEY]`), what it may touch
(`[capabilities]`, deny by default) and its default `[limits]`. Every model forbids unknown
keys; every error names the file, the line when the TOML text has one, the field, and what
is allowed (with the nearest valid key for a typo). The loader reads the file and nothing
else: the wasm is the capsule layer's business.

Used by the desired-state loader, the capsule layer and the CLI (`orch capsule check`).
"""

from __future__ import annotations

import errno
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import GateError, ManifestError, Problem
from ..files import FileReadError, FileStamp, read_regular
from ..topics import check_pattern, pattern_covers
from .common import MANIFEST, NAME, LimitsOverride, Loc, capped, dotted, line_at, listed, suggest
from .schema import InputSchema, SchemaProblem, compile_schema
from .tomlsource import key_lines, read_toml

SEMVER = r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
EXPORT = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
SECRET_MASK = "***"
MAX_MANIFEST_BYTES = 1 << 20
MAX_ENTRIES = 256  # tools, interceptors, and entries of each [capabilities] list and of build.watch
MAX_ENV_KEYS = 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Package(_Model):
    """[package]: who the capsule is."""

    name: str = Field(pattern=NAME, description="lowercase letters, digits and '-', at most 64")
    version: str = Field(pattern=SEMVER, description="semantic version, e.g. 0.1.0")
    description: str = Field("", description="one line for people")


class Component(_Model):
    """[[component]]: the WebAssembly module."""

    id: str = Field("main", pattern=EXPORT, description="the component's id")
    file: str = Field(description="the .wasm file, relative to the capsule folder")
    hash: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$", description="optional pin: sha256:<64 hex>")

    @field_validator("file")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError("must be a relative path inside the capsule folder (no '..')")
        return value


class Build(_Model):
    """[build]: how the dev loop rebuilds the capsule when its sources change."""

    command: str = Field(min_length=1, description="shell command run in the capsule folder")
    watch: list[str] = Field(default_factory=list, max_length=MAX_ENTRIES, description="source globs that trigger it")


EnvType = Literal["string", "secret", "number", "bool", "json"]


class EnvVar(_Model):
    """[env.KEY]: a configuration key the capsule reads with astrid_get_config."""

    type: EnvType = Field("string", description="string | secret | number | bool | json")
    default: Any = Field(None, description="used when config.yaml gives no value")
    description: str = Field("", description="what it is for")

    @model_validator(mode="after")
    def _default_matches_type(self) -> EnvVar:
        if self.default is not None:
            render_config_value(self.type, self.default)  # raises ValueError
        return self


class Capabilities(_Model):
    """[capabilities]: deny by default; anything not listed is refused."""

    kv: bool = Field(False, description="a key-value store scoped to the capsule")
    fs_read: list[str] = Field(
        default_factory=list, max_length=MAX_ENTRIES, description="paths it may read (cwd://...)"
    )
    fs_write: list[str] = Field(default_factory=list, max_length=MAX_ENTRIES, description="paths it may write")
    ipc_publish: list[str] = Field(
        default_factory=list, max_length=MAX_ENTRIES, description="topic patterns it may publish"
    )
    ipc_subscribe: list[str] = Field(
        default_factory=list, max_length=MAX_ENTRIES, description="topic patterns it may receive"
    )
    net: list[str] = Field(
        default_factory=list, max_length=MAX_ENTRIES, description="hosts it may reach (not granted yet)"
    )

    @field_validator("fs_read", "fs_write")
    @classmethod
    def _paths(cls, values: list[str]) -> list[str]:
        for value in values:
            rest = value.removeprefix("cwd://")
            if "\0" in value or PurePosixPath(rest).is_absolute() or ".." in PurePosixPath(rest).parts:
                raise ValueError(f"{value!r}: grants are cwd://paths inside the workspace, without '..'")
            if "://" in rest:
                raise ValueError(f"{value!r}: only cwd:// paths can be granted")
        return values

    @field_validator("ipc_publish", "ipc_subscribe")
    @classmethod
    def _patterns(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                check_pattern(value)
            except GateError as error:
                raise ValueError(f"{value!r}: {error}") from None
        return values


class Tool(_Model):
    """[[tool]]: a named function with a JSON-schema input, called through the export of the
    same name (or `astrid_tool_call`)."""

    name: str = Field(pattern=EXPORT, description="letters, digits, '_'; the export's name")
    description: str = Field("", description="what it does, for people and agents")
    input_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"}, description="a JSON Schema for the arguments"
    )

    @field_validator("input_schema")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        try:
            compile_schema(schema)
        except SchemaProblem as problem:
            name = info.data.get("name")
            raise ValueError(f"{f'tool {name!r}: ' if name else ''}input_schema {problem}") from None
        return schema

    @property
    def input(self) -> InputSchema:
        """The compiled input schema (checked when the manifest loaded; cached by its JSON)."""
        return compile_schema(self.input_schema)


class Interceptor(_Model):
    """[[interceptor]]: call `action` for every bus event matching `event`."""

    event: str = Field(description="topic pattern (NATS syntax: '*' one token, '>' the rest)")
    action: str = Field(pattern=EXPORT, description="the export to call with the event as JSON")
    priority: int = Field(100, description="lower runs first when several match one event")

    @field_validator("event")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            check_pattern(value)
        except GateError as error:
            raise ValueError(str(error)) from None
        return value


class Manifest(_Model):
    """A whole Capsule.toml."""

    package: Package
    components: list[Component] = Field(alias="component", min_length=1, max_length=1)
    build: Build | None = None
    env: dict[str, EnvVar] = Field(default_factory=dict, max_length=MAX_ENV_KEYS)
    capabilities: Capabilities = Field(default_factory=Capabilities)
    tools: list[Tool] = Field(default_factory=list, alias="tool", max_length=MAX_ENTRIES)
    interceptors: list[Interceptor] = Field(default_factory=list, alias="interceptor", max_length=MAX_ENTRIES)
    limits: LimitsOverride = Field(default_factory=LimitsOverride)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        counts = Counter(t.name for t in self.tools)
        duplicates = sorted(n for n, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"tool names must be unique: {listed(duplicates)} repeated")
        for interceptor in self.interceptors:
            if not any(pattern_covers(g, interceptor.event) for g in self.capabilities.ipc_subscribe):
                raise ValueError(
                    f"interceptor on {interceptor.event!r} needs a matching [capabilities] "
                    f'ipc_subscribe grant, e.g. ipc_subscribe = ["{interceptor.event}"]'
                )
        return self

    @property
    def component(self) -> Component:
        return self.components[0]

    @property
    def secret_keys(self) -> frozenset[str]:
        return frozenset(k for k, v in self.env.items() if v.type == "secret")

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def render_config_value(kind: str, value: Any) -> str:
    """The raw string a guest receives for `value` of type `kind`; ValueError if it does not fit."""
    if kind in ("string", "secret"):
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a {kind} (text), got {type(value).__name__}")
        return "true" if value is True else "false" if value is False else str(value)
    if kind == "number":
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise ValueError(f"expected a number, got {_show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
            raise ValueError(f"expected a number, got {_show(value)}")
        return str(value)
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower()
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {_show(value)}")
        return "true" if value else "false"
    if isinstance(value, str):  # json given as text (e.g. from the command line)
        try:
            json.loads(value)
        except ValueError:
            raise ValueError(f"expected JSON, got {_show(value)}") from None
        except RecursionError:
            raise ValueError("expected JSON, got text nested too deeply to read") from None
        return value
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except ValueError:
        raise ValueError("expected JSON, got a value holding nan or inf (JSON has no such numbers)") from None
    except TypeError:  # a TOML date or time
        raise ValueError("expected JSON, got a value holding a date or time: quote it as text") from None


def _finite(value: float) -> bool:
    """Whether a number fits a double (a 400-digit integer does not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) or len(value) <= 60 else repr(value[:57])[:-1] + "...'"
    return text if len(text) <= 80 else text[:77] + "..."


Where = Callable[[str], dict[str, Any]]  # a config key -> Problem keyword arguments (file, line, field)


def resolve_config(
    manifest: Manifest, overrides: Mapping[str, Any], *, source: str = "config", where: Where | None = None
) -> dict[str, str]:
    """The config map a capsule receives: its `[env]` defaults overlaid with `overrides`.

    Raises ManifestError listing every key the manifest does not declare (with the nearest
    declared key) and every value of the wrong type. `where(key)` says where a key was
    written (file, line, field) when the overrides come from a file such as config.yaml.
    """
    locate = where or (lambda key: {"file": source, "field": key})
    problems: list[Problem] = []
    declared_keys = listed(sorted(manifest.env)) or "none"
    for key in overrides:
        if key not in manifest.env:
            problems.append(
                Problem(
                    f"{manifest.package.name} does not declare {key!r} in its [env]"
                    f"{suggest(key, manifest.env)} (declared: {declared_keys})",
                    **locate(key),
                )
            )
    resolved: dict[str, str] = {}
    for key, declared in manifest.env.items():
        value = overrides.get(key, declared.default)
        if value is None:
            continue
        try:
            resolved[key] = render_config_value(declared.type, value)
        except ValueError as error:
            problems.append(Problem(str(error), **locate(key)))
    if problems:
        raise ManifestError(problems)
    return resolved


def mask_config(manifest: Manifest, config: Mapping[str, str]) -> dict[str, str]:
    """`config` with every secret value replaced by ***."""
    secrets = manifest.secret_keys
    return {k: (SECRET_MASK if k in secrets else v) for k, v in config.items()}


def load_manifest(folder: Path) -> Manifest:
    """Read and validate `folder/Capsule.toml`. Raises ManifestError listing every problem."""
    return read_manifest(folder)[0]


def read_manifest(folder: Path) -> tuple[Manifest, FileStamp]:
    """The manifest of `folder` and the file's stamp when read. Raises ManifestError."""
    path = folder / MANIFEST
    try:
        data, stamp = read_regular(path, limit=MAX_MANIFEST_BYTES, what="manifest")
    except FileReadError as error:
        if error.errno == errno.ENOENT:
            reason = f"no {MANIFEST} in {folder}: every capsule folder needs one"
            if not folder.is_dir():
                reason = f"no {MANIFEST} in {folder}: the folder does not exist; create it or fix the path"
        else:
            reason = error.reason
        raise ManifestError([Problem(reason, file=str(path))]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        problem = Problem("cannot read: not UTF-8 text; save it as UTF-8", file=str(path), line=line)
        raise ManifestError([problem]) from None
    return parse_manifest(text, file=str(path)), stamp


def parse_manifest(text: str, *, file: str = MANIFEST) -> Manifest:
    """Validate Capsule.toml `text` read from `file`. Raises ManifestError listing every problem."""
    data = read_toml(text, file=file)
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        lines = key_lines(text)
        raise ManifestError(capped([_problem(e, lines, file) for e in error.errors()], file=file)) from None


def _problem(error: Any, lines: Mapping[Loc, int], file: str) -> Problem:
    loc = tuple(error["loc"])
    field = dotted(loc)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        message = f"unknown key{suggest(str(loc[-1]), allowed)}; allowed here: {listed(sorted(allowed), 20)}"
    elif error["type"] == "missing":
        message = "required"
    return Problem(message, file=file, line=line_at(lines, loc), field=field)


def _allowed_keys(parent: tuple[Any, ...]) -> list[str]:
    """The keys valid in the table at `parent` (for "unknown key" messages)."""
    sections: dict[str, type[BaseModel]] = {
        "package": Package,
        "component": Component,
        "build": Build,
        "env": EnvVar,
        "capabilities": Capabilities,
        "tool": Tool,
        "interceptor": Interceptor,
        "limits": LimitsOverride,
    }
    model = sections.get(str(parent[0])) if parent else Manifest
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]
