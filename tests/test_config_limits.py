"""config.yaml and Capsule.toml against hostile input: size, nesting depth, values the parsers
choke on, and inputs that used to cost quadratic or worse time.

Covers the security review's finding 10 (a 50 MB config, flow nesting 800 deep, TOML nested
600-3,000 deep: now each a ConfigError/ManifestError naming the file, the line and the limit,
checked before the recursive parsers run) and its "nothing else in desired/ can be driven into
a traceback" check: a fuzz over mutations of a valid config.yaml and Capsule.toml in which
only ConfigError and ManifestError may come out. No test here measures time: each asserts
its result, and pytest's timeout is the only clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.desired.common import MAX_DEPTH, MAX_PROBLEMS
from orchestrator.desired.config import MAX_CONFIG_BYTES, LoadedConfig, load_config, parse_config
from orchestrator.desired.load import load_desired
from orchestrator.desired.manifest import Manifest, parse_manifest, resolve_config
from orchestrator.desired.yamlsource import MAX_NODES
from orchestrator.errors import ConfigError, ManifestError, Problem

MANIFEST = """\
[package]
name = "hello"
version = "0.1.0"

[[component]]
file = "hello.wasm"

[env.greeting]
type = "string"
default = "Hello"

[env.extra]
type = "json"
default = { a = [1, 2], b = { c = "d" } }

[capabilities]
ipc_subscribe = ["orders.*"]

[[tool]]
name = "greet"
input_schema = { type = "object", properties = { name = { type = "string", pattern = "^[a-z]+$" } } }

[[interceptor]]
event = "orders.*"
action = "on_order"
"""

CONFIG = """\
version: 1
defaults:
  limits: {fuel: 1000000, memory_mib: 64}
capsules:
  hello:
    path: capsules/hello
    config: {greeting: "Hi ${USER:-you}", extra: {a: [1, 2]}}
    depends_on: [counter]
  counter:
    path: capsules/counter
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with capsules/hello and capsules/counter, each with the manifest above."""
    base = tmp_path_factory.mktemp("limits")
    for name in ("hello", "counter"):
        (base / "capsules" / name).mkdir(parents=True)
        (base / "capsules" / name / "Capsule.toml").write_text(MANIFEST.replace('"hello"', f'"{name}"', 1))
        (base / "capsules" / name / "hello.wasm").write_bytes(b"\0asm\1\0\0\0")
    return base


def config_problems(root: Path, text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path=root / "config.yaml", environ={})
    assert all(p.file == str(root / "config.yaml") for p in caught.value.problems)
    return caught.value.problems


def manifest_problems(text: str) -> list[Problem]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(text, file="Capsule.toml")
    assert all(p.file == "Capsule.toml" for p in caught.value.problems)
    return caught.value.problems


def deployment_value(value: str) -> str:
    """A config whose capsule config holds `value` at nesting level 5 (document 1, capsules
    2, hello 3, config 4)."""
    return f"version: 1\ncapsules:\n  hello:\n    path: capsules/hello\n    config:\n      deep: {value}\n"


# -- size -------------------------------------------------------------------------------------


def test_an_oversized_config_states_the_limit_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    with path.open("wb") as handle:  # 50 MB, sparse: the size is refused before any read
        handle.truncate(50_000_000)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem.file == str(path)
    assert f"over the limit of {MAX_CONFIG_BYTES >> 20} MiB" in problem.message
    assert "keep it under 4 MiB" in problem.message


def test_too_many_values_are_refused_before_composing(root: Path) -> None:
    text = "version: 1\nx:\n" + "".join(f"  k{i}: [a, b, {{c: d}}]\n" for i in range(MAX_NODES // 4))
    (problem,) = config_problems(root, text)
    assert f"too many values (more than {MAX_NODES})" in problem.message and problem.line is not None


def test_an_alias_bomb_is_still_capped(root: Path) -> None:
    text = "version: 1\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 7):
        text += f"{'b' * i}: &{'b' * i} [{', '.join(['*' + ('b' * (i - 1) if i > 1 else 'a')] * 10)}]\n"
    (problem,) = config_problems(root, text)
    assert f"more than {MAX_NODES} after expanding aliases" in problem.message


# -- nesting depth in config.yaml ---------------------------------------------------------------


@pytest.mark.parametrize("depth", [800, 5_000, 100_000])
def test_deep_flow_nesting_is_a_problem_with_a_line(root: Path, depth: int) -> None:
    (problem,) = config_problems(root, deployment_value("[" * depth + "]" * depth))
    assert f"{MAX_DEPTH} levels" in problem.message and problem.line == 6


def test_deep_block_nesting_is_a_problem_with_a_line(root: Path) -> None:
    text = "version: 1\n" + "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "leaf\n"
    (problem,) = config_problems(root, text)
    assert f"deeper than {MAX_DEPTH} levels" in problem.message and problem.line == MAX_DEPTH + 2  # k{MAX_DEPTH}


def test_nesting_up_to_the_limit_is_fine(root: Path) -> None:
    inner = MAX_DEPTH - 4  # the value's own lists are levels 5..MAX_DEPTH
    loaded = parse_config(deployment_value("[" * inner + "]" * inner), path=root / "config.yaml", environ={})
    value = loaded.model.capsules["hello"].config["deep"]
    for _ in range(inner - 1):
        value = value[0]
    assert value == []
    (problem,) = config_problems(root, deployment_value("[" * (inner + 1) + "]" * (inner + 1)))
    assert f"{MAX_DEPTH} levels" in problem.message


def test_aliases_cannot_stack_past_the_limit(root: Path) -> None:
    text = "version: 1\na0: &a0 [[[[[[[[[[1]]]]]]]]]]\n"
    text += "".join(f"a{i}: &a{i} [[[[[[[[[[*a{i - 1}]]]]]]]]]]\n" for i in range(1, 12))
    (problem,) = config_problems(root, text)
    assert "aliases included" in problem.message and problem.field.startswith("a6.0.0")


def test_a_deeply_nested_config_is_a_config_error_for_the_whole_load(root: Path) -> None:
    """The path behind `orch validate`, GET /v1/plan and POST /v1/reconcile."""
    (root / "config.yaml").write_text(deployment_value("[" * 800 + "]" * 800))
    with pytest.raises(ConfigError) as caught:
        load_desired(root / "config.yaml", environ={})
    assert any(f"{MAX_DEPTH} levels" in p.message for p in caught.value.problems)


def test_a_huge_integer_is_a_problem_not_a_traceback(root: Path) -> None:
    problems = config_problems(root, deployment_value("1" * 5000))
    assert [(p.line, p.field) for p in problems] == [(6, "capsules.hello.config.deep")]
    assert "quote it" in problems[0].message


def test_a_lone_surrogate_in_text_is_a_problem(root: Path) -> None:
    (problem,) = config_problems(root, "version: 1\nx: \ud800\n")
    assert problem.line == 2 and "UTF-8" in problem.message
    (problem,) = manifest_problems('a = "\udc00"')
    assert problem.line == 1


# -- inputs that used to cost quadratic time or worse -------------------------------------------


def test_unclosed_references_are_linear_and_reported_capped(root: Path) -> None:
    problems = config_problems(root, deployment_value('"' + "${A:-" * 200_000 + '"'))
    assert len(problems) == MAX_PROBLEMS + 1 and "more problems" in problems[-1].message
    assert "malformed '${'" in problems[0].message


def test_references_still_expand(root: Path) -> None:
    text = deployment_value('"a${A}b${B:-x$y}c$${d}${C:-}"')
    loaded = parse_config(text, path=root / "config.yaml", environ={"A": "1", "C": ""})
    assert loaded.model.capsules["hello"].config["deep"] == "a1bx$yc${d}"


def test_a_long_depends_on_ring_is_found_once_and_abbreviated(root: Path) -> None:
    count = 3000
    text = "version: 1\ncapsules:\n" + "".join(
        f"  n{i:04}: {{path: capsules/hello, depends_on: [n{(i + 1) % count:04}]}}\n" for i in range(count)
    )
    problems = [p for p in config_problems(root, text) if "cycle" in p.message]
    assert len(problems) == 1
    assert problems[0].message.startswith("depends_on cycle: n0000 -> n0001 -> n0002")
    assert f"({count} deployments)" in problems[0].message and len(problems[0].message) < 300


def test_many_unknown_targets_keep_messages_short(root: Path) -> None:
    count = 2000
    text = "version: 1\ncapsules:\n" + "".join(
        f"  n{i:04}: {{path: capsules/hello, depends_on: [zz{i}]}}\n" for i in range(count)
    )
    problems = config_problems(root, text)
    assert len(problems) == MAX_PROBLEMS + 1
    assert all(len(p.message) < 300 for p in problems)


def test_long_keys_are_abbreviated_in_fields_and_messages(root: Path) -> None:
    long = "k" * 100_000
    # explicit keys ("? key"): YAML's implicit keys stop at 1024 characters
    text = f"version: 1\ndefaults:\n  ? {long}\n  : 1\n"
    text += f"capsules:\n  ? {long}\n  : {{path: capsules/hello, ? x{long} : 1}}\n"
    problems = config_problems(root, text)
    assert len(problems) == 3 and all(len(str(p)) < 500 for p in problems)
    assert "unknown key 'kkkk" in problems[0].message and problems[0].field.endswith("...")
    (problem,) = manifest_problems(MANIFEST.replace("[capabilities]", f"[capabilities]\n{long} = 1", 1))
    assert len(str(problem)) < 500 and problem.field.startswith("capabilities.kkk")


def test_a_long_line_in_a_manifest_does_not_stall_line_lookup() -> None:
    text = 'description2 = """\n[' + " " * 200_000 + '\n"""\n' + MANIFEST
    (problem,) = manifest_problems(text)
    assert problem.field == "description2" and problem.line == 1


def test_manifest_problems_are_capped() -> None:
    text = MANIFEST + "".join(f'[env.k{i}]\ntype = "nope"\n' for i in range(1000))
    problems = manifest_problems(text)
    assert len(problems) == MAX_PROBLEMS + 1 and "900 more problems" in problems[-1].message
    assert problems[0].line == MANIFEST.count("\n") + 2


@pytest.mark.parametrize(
    ("section", "count", "field"),
    [('[[tool]]\nname = "t{i}"\n', 257, "tool"), ("[env.k{i}]\n", 1025, "env")],
)
def test_manifest_lists_have_a_cap(section: str, count: int, field: str) -> None:
    problems = manifest_problems(MANIFEST + "".join(section.format(i=i) for i in range(count)))
    assert [p.field for p in problems] == [field] and "at most" in problems[0].message


# -- nesting depth in Capsule.toml --------------------------------------------------------------


@pytest.mark.parametrize("depth", [600, 3000, 200_000])
@pytest.mark.parametrize(("opening", "closing"), [("[", "]"), ("{ a = ", " }")])
def test_deep_toml_is_a_problem_with_a_line(depth: int, opening: str, closing: str) -> None:
    text = MANIFEST + '[env.deep]\ntype = "json"\ndefault = ' + opening * depth + "1" + closing * depth + "\n"
    (problem,) = manifest_problems(text)
    assert f"deeper than {MAX_DEPTH} levels" in problem.message and problem.line == MANIFEST.count("\n") + 3


def test_brackets_in_strings_and_comments_do_not_count() -> None:
    noise = "[{" * 100
    text = MANIFEST + (
        f"[build]  # {noise}\ncommand = \"echo '{noise}'\"  # {noise}\n"
        f'watch = [\'{noise}\', "\\"{noise}", \'\'\'{noise}\n{noise}\'\'\', """{noise}\\"""{noise}"""]\n'
    )
    manifest = parse_manifest(text)
    assert manifest.build is not None and manifest.build.command == f"echo '{noise}'"
    assert len(manifest.build.watch) == 4


@pytest.mark.parametrize(
    "snippet",
    ["[env.x]\ndefault." + ".".join(["a"] * 200) + " = 1\n", "[" + ".".join(["t"] * 200) + "]\n"],
    ids=["dotted key", "table header"],
)
def test_deep_dotted_keys_are_refused(snippet: str) -> None:
    (problem,) = manifest_problems(MANIFEST + snippet)
    assert f"deeper than {MAX_DEPTH} levels" in problem.message and problem.field.endswith("...")


def test_toml_numbers_and_dates_that_broke_the_loader() -> None:
    (problem,) = manifest_problems(MANIFEST + "[limits]\nfuel = " + "1" * 5000 + "\n")
    assert problem.message.startswith("not valid TOML") and problem.line == MANIFEST.count("\n") + 2
    for default in ["nan", "[1, inf]", "{ when = 1979-05-27 }"]:
        problems = manifest_problems(MANIFEST + f'[env.j]\ntype = "json"\ndefault = {default}\n')
        assert [p.field for p in problems] == ["env.j"] and "expected JSON" in problems[0].message
    manifest = parse_manifest(MANIFEST + '[env.n]\ntype = "number"\n')
    with pytest.raises(ManifestError, match="expected a number"):
        resolve_config(manifest, {"n": 10**400})
    with pytest.raises(ManifestError, match="nested too deeply"):
        resolve_config(manifest, {"extra": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ManifestError) as caught:
        resolve_config(manifest, {"n": "9" * 100_000})
    assert len(str(caught.value)) < 300


# -- fuzz: only ConfigError and ManifestError come out ------------------------------------------

YAML_SNIPPETS = [
    "[",
    "]",
    "{",
    "}",
    ":",
    ": ",
    "- ",
    "-",
    ",",
    "\n",
    "\n  ",
    "  ",
    "\t",
    "#",
    "'",
    '"',
    "&a ",
    "*a",
    "<<: *a",
    "!!python/object:os.system",
    "!!binary",
    "!x ",
    "? ",
    "|",
    ">",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "${",
    "$${",
    "${X:-",
    "~",
    ".nan",
    ".inf",
    "9" * 4400,
    "0x1F",
    "1e999",
    "2001-12-14",
    "\x00",
    "\x07",
    "\ufeff",
    "é",
    "[" * 100,
    "{a: " * 70,
    "- " * 70,
    "version",
    "capsules",
    "path",
    "config",
    "depends_on",
    "limits",
    "null",
]
TOML_SNIPPETS = [
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    " = ",
    ",",
    ".",
    "\n",
    '"',
    "'",
    '"""',
    "'''",
    "\\",
    "\\u",
    "#",
    "nan",
    "inf",
    "-0",
    "1979-05-27",
    "07:32:00",
    "1979-05-27T07:32:00Z",
    "9" * 4400,
    "0x",
    "1e999",
    "true",
    "é",
    "\x00",
    "[" * 100,
    "{ a = " * 70,
    "a." * 100,
    "[env.x]\n",
    "[[tool]]\n",
    'name = "t"\n',
    "input_schema = ",
    '{ "$ref" = "#" }',
    '{ pattern = "(a+)+$" }',
    '{ pattern = "(?=a)" }',
    "type = ",
    '"json"',
    "default = ",
]


def mutated(base: str, snippets: list[str]) -> st.SearchStrategy[str]:
    """`base` with up to 6 edits: insert a snippet, delete a span, or repeat a span."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        text = base
        for _ in range(draw(st.integers(1, 6))):
            at = draw(st.integers(0, len(text)))
            kind = draw(st.sampled_from(["insert", "delete", "repeat"]))
            if kind == "insert":
                text = text[:at] + draw(st.sampled_from(snippets)) + text[at:]
            else:
                end = min(len(text), at + draw(st.integers(1, 40)))
                times = draw(st.integers(2, 300)) if kind == "repeat" else 0
                text = text[:at] + text[at:end] * times + text[end:]
        return text

    return build()


def resolved(manifest: Manifest) -> Iterator[object]:
    yield resolve_config(manifest, {})
    for tool in manifest.tools:
        yield tool.input


@given(mutated(CONFIG, YAML_SNIPPETS))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_configs_raise_only_config_errors(root: Path, text: str) -> None:
    try:
        loaded = parse_config(text, path=root / "config.yaml", environ={"USER": "u"})
    except ConfigError as error:
        assert error.problems and all(isinstance(p, Problem) and p.file for p in error.problems)
        return
    assert isinstance(loaded, LoadedConfig)


@given(mutated(MANIFEST, TOML_SNIPPETS))
@settings(max_examples=400, deadline=None)
def test_fuzzed_manifests_raise_only_manifest_errors(text: str) -> None:
    try:
        manifest = parse_manifest(text, file="Capsule.toml")
        list(resolved(manifest))
    except ManifestError as error:
        assert error.problems and all(isinstance(p, Problem) for p in error.problems)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=20,
    )
)
@settings(max_examples=300, deadline=None)
def test_any_config_value_renders_or_is_refused(value: object) -> None:
    manifest = parse_manifest(MANIFEST)
    for key in ("greeting", "extra"):
        try:
            rendered = resolve_config(manifest, {key: value}).get(key)
        except ManifestError as error:
            assert error.problems[0].field == key
            continue
        assert isinstance(rendered, str) or value is None  # None: unset
        if key == "extra" and isinstance(value, float):
            assert math.isfinite(value)
