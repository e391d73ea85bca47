"""Capsule.toml: valid manifests, every kind of invalid one (with file, line, field and a
useful message), config resolution against [env], and secret masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.desired.manifest import (
    Manifest,
    load_manifest,
    mask_config,
    parse_manifest,
    pattern_covers,
    render_config_value,
    resolve_config,
)
from orchestrator.errors import ManifestError
from tests.conftest import CAPSULES

GOOD = """\
[package]
name = "hello"
version = "0.1.0"
description = "Greets people"

[[component]]
id = "main"
file = "hello.wasm"

[build]
command = "npm run build"
watch = ["assembly/**/*.ts"]

[env.greeting]
type = "string"
default = "Hello"
description = "How to greet"

[env.token]
type = "secret"

[env.retries]
type = "number"
default = 3

[env.verbose]
type = "bool"
default = false

[env.extra]
type = "json"
default = { a = 1 }

[capabilities]
kv = true
fs_read = ["cwd://data"]
fs_write = ["cwd://out"]
ipc_publish = ["greetings.>"]
ipc_subscribe = ["orders.*"]

[[tool]]
name = "greet"
description = "Greets a person"
input_schema = { type = "object", properties = { name = { type = "string" } }, required = ["name"] }

[[interceptor]]
event = "orders.*"
action = "on_order"
priority = 100

[limits]
fuel = 1_000_000_000
memory_mib = 64
timeout_ms = 5000
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, file="caps/hello/Capsule.toml")
    return [str(p) for p in caught.value.problems]


def replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


def test_the_design_example_parses() -> None:
    manifest = parse_manifest(GOOD)
    assert manifest.package.name == "hello"
    assert manifest.component.file == "hello.wasm"
    assert manifest.tool("greet") is not None and manifest.tool("nope") is None
    assert manifest.interceptors[0].priority == 100
    assert manifest.capabilities.fs_write == ["cwd://out"]
    assert manifest.secret_keys == {"token"}
    assert manifest.limits.fuel == 1_000_000_000
    assert manifest.build is not None and manifest.build.watch == ["assembly/**/*.ts"]


def test_minimal_manifest_denies_everything() -> None:
    manifest = parse_manifest('[package]\nname = "x"\nversion = "1.0.0"\n[[component]]\nfile = "x.wasm"\n')
    caps = manifest.capabilities
    assert (caps.kv, caps.fs_read, caps.fs_write, caps.ipc_publish, caps.net) == (False, [], [], [], [])
    assert manifest.tools == [] and manifest.env == {}


def test_models_are_frozen() -> None:
    manifest = parse_manifest(GOOD)
    with pytest.raises(ValueError):
        manifest.package.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("kv = true", 'kv = true\nfs_wirte = ["x"]', ["capabilities.fs_wirte", "did you mean 'fs_write'?", ":36:"]),
        ('name = "hello"', 'name = "Hello World"', ["package.name", ":2:", "should match"]),
        ('version = "0.1.0"', 'version = "one"', ["package.version", ":3:"]),
        ('file = "hello.wasm"', 'file = "../evil.wasm"', ["component.0.file", "relative path"]),
        ('file = "hello.wasm"', 'file = "/abs.wasm"', ["component.0.file"]),
        ('id = "main"', 'id = "main"\nhash = "md5:abc"', ["component.0.hash", "sha256"]),
        ('type = "string"', 'type = "text"', ["env.greeting.type", "'string'"]),
        ("default = 3", 'default = "three"', ["env.retries", "expected a number"]),
        ("default = false", 'default = "maybe"', ["env.verbose", "true or false"]),
        ('fs_read = ["cwd://data"]', 'fs_read = ["cwd://../etc"]', ["capabilities.fs_read", "without '..'"]),
        ('fs_read = ["cwd://data"]', 'fs_read = ["/etc"]', ["capabilities.fs_read"]),
        ('fs_read = ["cwd://data"]', 'fs_read = ["http://x/y"]', ["capabilities.fs_read"]),
        ('ipc_publish = ["greetings.>"]', 'ipc_publish = ["greetings.>.x"]', ["capabilities.ipc_publish"]),
        ('ipc_publish = ["greetings.>"]', 'ipc_publish = ["a..b"]', ["capabilities.ipc_publish"]),
        ('name = "greet"', 'name = "greet me"', ["tool.0.name"]),
        (
            'required = ["name"] }',
            'required = "name" }',
            ["tool.0.input_schema", "not a valid JSON Schema"],
        ),
        ('event = "orders.*"', 'event = "orders.>.x"', ["interceptor.0.event"]),
        (
            'ipc_subscribe = ["orders.*"]',
            'ipc_subscribe = ["billing.*"]',
            ["interceptor on 'orders.*'", "ipc_subscribe"],
        ),
        ("memory_mib = 64", "memory_mib = 0", ["limits.memory_mib", "greater than 0"]),
        ("fuel = 1_000_000_000", "fuel = -5", ["limits.fuel"]),
        ("[limits]", "[limit]", ["limit", "unknown key", "did you mean 'limits'?"]),
    ],
)
def test_invalid_manifests_name_file_line_and_field(old: str, new: str, expected: list[str]) -> None:
    text = "\n".join(problems(replace(old, new)))
    assert "caps/hello/Capsule.toml" in text
    for needle in expected:
        assert needle in text, (needle, text)


def test_every_problem_is_listed() -> None:
    text = replace('name = "hello"', 'name = "BAD"').replace('version = "0.1.0"', 'version = "x"')
    found = problems(text.replace("memory_mib = 64", "memory_mib = 99999"))
    assert len(found) == 3


def test_toml_syntax_error_has_a_line() -> None:
    found = problems(GOOD.replace("[capabilities]", "[capabilities\n"))
    assert len(found) == 1 and "not valid TOML" in found[0] and ":34:" in found[0]


def test_missing_sections_are_required() -> None:
    found = "\n".join(problems('[package]\nname = "x"\n'))
    assert "package.version: required" in found
    assert "component: required" in found


def test_two_components_are_refused() -> None:
    found = "\n".join(problems(GOOD.replace("[build]", '[[component]]\nfile = "b.wasm"\n\n[build]')))
    assert "component" in found and "at most 1" in found


def test_duplicate_tools_are_refused() -> None:
    extra = '\n[[tool]]\nname = "greet"\n'
    assert "greet repeated" in "\n".join(problems(GOOD + extra))


def test_unknown_key_inside_array_table_points_at_its_line() -> None:
    text = GOOD.replace('description = "Greets a person"', 'description = "Greets a person"\nsummary = "x"')
    found = "\n".join(problems(text))
    assert "tool.0.summary" in found and ":44:" in found


def test_load_from_folder(tmp_path: Path) -> None:
    (tmp_path / "Capsule.toml").write_text(GOOD)
    assert load_manifest(tmp_path).package.name == "hello"
    with pytest.raises(ManifestError, match=r"no Capsule\.toml"):
        load_manifest(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "Capsule.toml").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "bad")


def test_example_capsules_have_valid_manifests() -> None:
    folders = [p.parent for p in CAPSULES.glob("*/Capsule.toml")]
    for folder in folders:
        assert isinstance(load_manifest(folder), Manifest)


# -- config ---------------------------------------------------------------------------------
def test_resolve_config_overlays_defaults_and_renders_types() -> None:
    manifest = parse_manifest(GOOD)
    assert resolve_config(manifest, {}) == {
        "greeting": "Hello",
        "retries": "3",
        "verbose": "false",
        "extra": '{"a":1}',
    }
    resolved = resolve_config(manifest, {"greeting": "Hi", "token": "s3cret", "retries": "7", "verbose": True})
    assert resolved["greeting"] == "Hi" and resolved["token"] == "s3cret"
    assert resolved["retries"] == "7" and resolved["verbose"] == "true"


def test_resolve_config_lists_every_problem() -> None:
    manifest = parse_manifest(GOOD)
    with pytest.raises(ManifestError) as caught:
        resolve_config(manifest, {"greting": "Hi", "retries": "lots", "verbose": "yes"}, source="config.yaml")
    text = str(caught.value)
    assert "hello does not declare 'greting' in its [env] (did you mean 'greeting'?)" in text
    assert "retries: expected a number" in text and "verbose: expected true or false" in text
    assert text.count("config.yaml") == 3


@pytest.mark.parametrize(
    ("kind", "value", "rendered"),
    [
        ("string", "a", "a"),
        ("string", 5, "5"),
        ("string", True, "true"),
        ("number", 1.5, "1.5"),
        ("number", "10", "10"),
        ("bool", "TRUE", "true"),
        ("json", [1, "x"], '[1,"x"]'),
        ("json", '{"k": 1}', '{"k": 1}'),
    ],
)
def test_render_config_value(kind: str, value: object, rendered: str) -> None:
    assert render_config_value(kind, value) == rendered


@pytest.mark.parametrize(
    ("kind", "value"),
    [("number", float("nan")), ("number", True), ("bool", 1), ("json", "{nope"), ("string", {"a": 1})],
)
def test_render_config_value_rejects(kind: str, value: object) -> None:
    with pytest.raises(ValueError):
        render_config_value(kind, value)


def test_secrets_are_masked() -> None:
    manifest = parse_manifest(GOOD)
    config = resolve_config(manifest, {"token": "s3cret"})
    masked = mask_config(manifest, config)
    assert masked["token"] == "***" and masked["greeting"] == "Hello"
    assert "s3cret" not in repr(masked)


@pytest.mark.parametrize(
    ("grant", "pattern", "covers"),
    [
        ("orders.*", "orders.new", True),
        ("orders.*", "orders.*", True),
        ("orders.*", "orders.>", False),
        ("orders.>", "orders.a.b", True),
        ("orders.>", "orders.*", True),
        ("orders.>", "orders", False),
        (">", "anything.at.all", True),
        ("orders.new", "orders.*", False),
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_pattern_covers(grant: str, pattern: str, covers: bool) -> None:
    assert pattern_covers(grant, pattern) is covers
