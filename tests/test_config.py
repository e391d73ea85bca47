"""config.yaml: the DESIGN example, defaults and paths, every kind of invalid file (with the
file, line, field and a useful message), ${VAR} expansion, reference checks (depends_on
targets, cycles, capsule folders), the applied-config hash and line_of."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from orchestrator.desired.config import (
    Defaults,
    Deployment,
    LimitsOverride,
    LoadedConfig,
    OrchestratorConfig,
    load_config,
    parse_config,
)
from orchestrator.errors import ConfigError, FileProblems

DESIGN = """\
version: 1
workspace: .
state_dir: .orch
defaults:
  limits: {fuel: 1000000000, memory_mib: 64, timeout_ms: 5000}
capsules:
  hello:
    path: capsules/hello
    config: {greeting: Hi}
    limits: {fuel: 50000000}
    instances: 2
    depends_on: [counter]
    enabled: true
  counter:
    path: capsules/counter
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A folder with two capsule folders (capsules/hello, capsules/counter), each with a Capsule.toml."""
    for name in ("hello", "counter"):
        (tmp_path / "capsules" / name).mkdir(parents=True)
        (tmp_path / "capsules" / name / "Capsule.toml").write_text(f'[package]\nname = "{name}"\n')
    return tmp_path


def parse(root: Path, text: str, environ: dict[str, str] | None = None) -> LoadedConfig:
    return parse_config(text, path=root / "config.yaml", environ={} if environ is None else environ)


def problems(root: Path, text: str, environ: dict[str, str] | None = None) -> list[tuple[int | None, str, str]]:
    """Every problem as (line, field, message); each one must name the file."""
    with pytest.raises(ConfigError) as caught:
        parse(root, text, environ)
    assert isinstance(caught.value, FileProblems)
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    for problem in caught.value.problems:
        assert problem.file == str(root / "config.yaml")
    return [(p.line, p.field, p.message) for p in caught.value.problems]


def one_problem(root: Path, text: str, environ: dict[str, str] | None = None) -> tuple[int | None, str, str]:
    found = problems(root, text, environ)
    assert len(found) == 1, found
    return found[0]


def capsule(body: str, name: str = "hello", path: str = "capsules/hello") -> str:
    """A config with one deployment; `body` is indented under it (lines 3 and on are the body's lines 5+)."""
    lines = "".join(f"    {line}\n" for line in body.splitlines())
    return f"version: 1\ncapsules:\n  {name}:\n    path: {path}\n{lines}"


# --- valid files ---------------------------------------------------------------------------


def test_the_design_example_loads(root: Path) -> None:
    (root / "config.yaml").write_text(DESIGN)
    loaded = load_config(root / "config.yaml")
    assert loaded.path == root / "config.yaml"
    assert loaded.workspace == root
    assert loaded.state_dir == root / ".orch"
    assert loaded.text_sha256 == hashlib.sha256(DESIGN.encode()).hexdigest()
    model = loaded.model
    assert model.version == 1
    assert model.defaults.limits == LimitsOverride(fuel=1_000_000_000, memory_mib=64, timeout_ms=5000)
    hello = model.capsules["hello"]
    assert hello == Deployment(
        path="capsules/hello",
        config={"greeting": "Hi"},
        limits=LimitsOverride(fuel=50_000_000),
        instances=2,
        depends_on=["counter"],
        enabled=True,
    )
    assert list(model.capsules) == ["hello", "counter"]
    assert loaded.folder("hello") == root / "capsules" / "hello"
    assert loaded.folder("counter") == root / "capsules" / "counter"
    assert model.capsules["hello"].depends_on == ["counter"]


def test_defaults(root: Path) -> None:
    loaded = parse(root, "version: 1\ncapsules:\n  hello: {path: capsules/hello}\n")
    assert loaded.workspace == root
    assert loaded.state_dir == root / ".orch"
    assert (loaded.model.workspace, loaded.model.state_dir) == (".", ".orch")
    assert loaded.model.defaults.limits == LimitsOverride(fuel=None, memory_mib=None, timeout_ms=None)
    hello = loaded.model.capsules["hello"]
    assert (hello.config, hello.instances, hello.depends_on, hello.enabled) == ({}, 1, [], True)
    assert hello.limits == LimitsOverride()
    assert parse(root, "version: 1\n").model.capsules == {}


def test_keys_with_nothing_after_them_are_empty(root: Path) -> None:
    loaded = parse(
        root,
        "version: 1\ndefaults:\ncapsules:\n  hello:\n    path: capsules/hello\n"
        "    config:\n    limits:\n    depends_on:\n",
    )
    hello = loaded.model.capsules["hello"]
    assert (hello.config, hello.depends_on, hello.limits) == ({}, [], LimitsOverride())
    assert parse(root, "version: 1\ncapsules:\n").model.capsules == {}


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("workspace", "data", "data"),
        ("workspace", "./a/../b", "b"),
        ("workspace", "..", ".."),
        ("workspace", "/srv/work", "/srv/work"),
        ("state_dir", "state", "state"),
        ("state_dir", "/var/lib/orch", "/var/lib/orch"),
        ("state_dir", "../shared/.orch", "../shared/.orch"),
    ],
)
def test_workspace_and_state_dir_resolve_against_the_files_folder(
    root: Path, key: str, value: str, expected: str
) -> None:
    loaded = parse(root, f"version: 1\n{key}: {value}\n")
    resolved = getattr(loaded, key)
    assert resolved.is_absolute()
    assert resolved == Path(os.path.normpath(root / expected))
    assert getattr(loaded.model, key) == value


def test_capsule_paths_resolve_against_the_files_folder_not_the_workspace(root: Path) -> None:
    elsewhere = root / "elsewhere"
    (elsewhere / "cap").mkdir(parents=True)
    (elsewhere / "cap" / "Capsule.toml").write_text("")
    text = (
        "version: 1\nworkspace: /somewhere/else\ncapsules:\n"
        f"  a: {{path: {elsewhere / 'cap'}}}\n  b: {{path: ./capsules/x/../hello}}\n"
    )
    loaded = parse(root, text)
    assert loaded.folder("a") == elsewhere / "cap"
    assert loaded.folder("b") == root / "capsules" / "hello"
    with pytest.raises(KeyError):
        loaded.folder("nope")


def test_the_same_folder_may_run_under_two_names(root: Path) -> None:
    loaded = parse(root, "version: 1\ncapsules:\n  a: {path: capsules/hello}\n  b: {path: capsules/hello}\n")
    assert loaded.folder("a") == loaded.folder("b")


def test_yaml_anchors_and_merge_keys_work(root: Path) -> None:
    text = (
        "version: 1\ncapsules:\n"
        "  a: {path: capsules/hello, limits: &small {fuel: 5, timeout_ms: 10}}\n"
        "  b:\n    path: capsules/hello\n    limits:\n      <<: *small\n      timeout_ms: 20\n"
    )
    loaded = parse(root, text)
    assert loaded.model.capsules["b"].limits == LimitsOverride(fuel=5, timeout_ms=20)
    assert loaded.line_of("capsules", "b", "limits", "timeout_ms") == 8


def test_yaml_11_booleans_and_dates(root: Path) -> None:
    loaded = parse(root, capsule("enabled: no\nconfig: {when: 2024-01-02, flag: on}"))
    hello = loaded.model.capsules["hello"]
    assert hello.enabled is False
    assert hello.config == {"when": "2024-01-02", "flag": True}  # dates stay text


def test_models_are_frozen(root: Path) -> None:
    loaded = parse(root, DESIGN)
    with pytest.raises(ValueError):
        loaded.model.version = 1  # type: ignore[misc]
    with pytest.raises(ValueError):
        loaded.model.capsules["hello"].instances = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        loaded.workspace = root  # type: ignore[misc]


def test_every_field_is_described() -> None:
    for model in (OrchestratorConfig, Defaults, Deployment, LimitsOverride):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name}"


# --- load_config: the file itself ----------------------------------------------------------


def test_load_config_reads_the_file_and_hashes_its_bytes(root: Path) -> None:
    (root / "config.yaml").write_bytes(b"version: 1  # caf\xc3\xa9\n")
    loaded = load_config(str(root / "config.yaml"))
    assert loaded.text_sha256 == hashlib.sha256(b"version: 1  # caf\xc3\xa9\n").hexdigest()
    assert load_config(root).path == root / "config.yaml"  # a folder means its config.yaml


def test_load_config_resolves_a_relative_path(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (root / "config.yaml").write_text("version: 1\nstate_dir: s\n")
    monkeypatch.chdir(root / "capsules")
    loaded = load_config("../config.yaml")
    assert (loaded.path, loaded.state_dir) == (root / "config.yaml", root / "s")


def test_a_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "config.yaml")
    [problem] = caught.value.problems
    assert problem.file == str(tmp_path / "config.yaml")
    assert "no config.yaml here: create one or pass the path" in problem.message
    with pytest.raises(ConfigError, match=r"no config\.yaml here"):
        load_config(tmp_path)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "file" / "config.yaml")
    [problem] = caught.value.problems
    assert problem.file == str(tmp_path / "file" / "config.yaml")
    assert problem.message.startswith("cannot read: ")


def test_a_file_that_is_not_utf8_points_at_the_line(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_bytes(b"version: 1\n# ok\nworkspace: caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "config.yaml")
    [problem] = caught.value.problems
    assert (problem.line, problem.message) == (3, "not UTF-8 text: save the file as UTF-8")


def test_text_sha256_changes_with_the_bytes(root: Path) -> None:
    first = parse(root, DESIGN).text_sha256
    assert first == parse(root, DESIGN).text_sha256
    assert first == hashlib.sha256(DESIGN.encode()).hexdigest()
    assert parse(root, DESIGN + "# a comment\n").text_sha256 != first
    assert parse(root, DESIGN.replace("hello:", "hello:  ")).text_sha256 != first
    assert parse(root, DESIGN.replace("\n", "\r\n")).text_sha256 != first


# --- invalid files: one problem each ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [
        # syntax and shape
        ("version: 1\ncapsules: [a,\n", 3, "", "not valid YAML: expected the node content, but found '<stream end>'"),
        ("version: 1\ncapsules: {a: 1\nworkspace: .\n", 3, "", "not valid YAML: expected ',' or '}', but got"),
        ("version: 1\ncapsules:\n  a: b: c\n", 3, "", "not valid YAML: mapping values are not allowed here"),
        ("version: 1\n\tcapsules: {}\n", 2, "", "indent with spaces, not tabs"),
        ('version: 1\nworkspace: "abc\n', 3, "", "not valid YAML"),
        ("version: 1\n---\nversion: 1\n", 2, "", "expected a single document"),
        ("", None, "", "the file is empty: a config needs at least 'version: 1'"),
        ("# only a comment\n\n", None, "", "the file is empty"),
        ("- version: 1\n", 1, "", "must be a mapping of keys (version, capsules, ...), not a list"),
        ("version 1\n", 1, "", "must be a mapping of keys (version, capsules, ...), not the value 'version 1'"),
        ("version: 1\nworkspace: \x07\n", 2, "", "not valid YAML: special characters are not allowed"),
        # duplicate and non-text keys
        ("version: 1\nstate_dir: a\nstate_dir: b\n", 3, "state_dir", "duplicate key 'state_dir' (first at line 2)"),
        (capsule("path: capsules/counter"), 5, "capsules.hello.path", "duplicate key 'path' (first at line 4)"),
        (
            capsule("limits:\n  fuel: 1\n  fuel: 2"),
            7,
            "capsules.hello.limits.fuel",
            "duplicate key 'fuel' (first at line 6)",
        ),
        (capsule("config: {a: 1, a: 2}"), 5, "capsules.hello.config.a", "duplicate key 'a' (first at line 5)"),
        (
            capsule("", name="a") + "  a: {path: capsules/hello}\n",
            5,
            "capsules.a",
            "duplicate key 'a' (first at line 3)",
        ),
        ("version: 1\n1: x\n", 2, "1", "keys must be text, not '1': quote it"),
        ("version: 1\ncapsules:\n  yes: {path: capsules/hello}\n", 3, "capsules.yes", "keys must be text, not 'yes'"),
        ("version: 1\n~: x\n", 2, "~", "keys must be text, not '~'"),
        (capsule("config:\n  [a, b]: 1"), 6, "capsules.hello.config", "keys must be text, not a list"),
        (capsule("config: {? {a: 1} : 2}"), 5, "capsules.hello.config", "keys must be text, not a mapping"),
        # tags, aliases and merge keys
        (capsule("limits: {<<: 5}"), 5, "capsules.hello.limits", "'<<' merges a mapping or a list of mappings"),
        (capsule("config: {x: !!binary aGk=}"), 5, "capsules.hello.config.x", "unsupported YAML tag"),
        (capsule("config: {x: !env HOME}"), 5, "capsules.hello.config.x", "unsupported YAML tag '!env'"),
        (capsule("config: !!set {a, b}"), 5, "capsules.hello.config", "unsupported YAML tag"),
        (capsule("config: &c {x: *c}"), 5, "capsules.hello.config.x", "an alias refers to a value that contains it"),
        # unknown keys, with the nearest valid one
        ("version: 1\nworkspce: .\n", 2, "workspce", "unknown key 'workspce' (did you mean 'workspace'?)"),
        (
            "version: 1\ncapsule: {}\n",
            2,
            "capsule",
            "(did you mean 'capsules'?); allowed here: approvals, builds, capsules, defaults, engine, history, "
            "lattice, state_dir, version, workspace",
        ),
        (
            "version: 1\nfrobnicate: 3\n",
            2,
            "frobnicate",
            "unknown key 'frobnicate'; allowed here: approvals, builds, capsules,",
        ),
        (
            capsule("dependson: [counter]"),
            5,
            "capsules.hello.dependson",
            "unknown key 'dependson' (did you mean 'depends_on'?); "
            "allowed here: config, depends_on, enabled, hosts, instances, labels, limits, path",
        ),
        (capsule("instance: 2"), 5, "capsules.hello.instance", "(did you mean 'instances'?)"),
        (
            capsule("limits: {memory: 5}"),
            5,
            "capsules.hello.limits.memory",
            "(did you mean 'memory_mib'?); allowed here: fuel, memory_mib, timeout_ms",
        ),
        (
            "version: 1\ndefaults:\n  limits:\n    timeout: 5\n",
            4,
            "defaults.limits.timeout",
            "(did you mean 'timeout_ms'?)",
        ),
        (
            "version: 1\ndefaults:\n  limit: {}\n",
            3,
            "defaults.limit",
            "unknown key 'limit' (did you mean 'limits'?); allowed here: limits",
        ),
        # version
        ("workspace: .\n", None, "version", "required: the config format version: 1"),
        ("version: 2\n", 1, "version", "unsupported version 2: this orchestrator reads version 1"),
        ("version: '1'\n", 1, "version", "unsupported version '1'"),
        ("version: 1.0\n", 1, "version", "unsupported version 1.0"),
        ("version: true\n", 1, "version", "unsupported version True"),
        # values
        ("version: 1\nworkspace: ''\n", 2, "workspace", "must be a non-empty path"),
        ("version: 1\nstate_dir: 5\n", 2, "state_dir", "Input should be a valid string, got 5; expected a path"),
        ("version: 1\ndefaults: [1]\n", 2, "defaults", "expected a mapping with keys limits, publish_rate, got a list"),
        ("version: 1\ncapsules: [hello]\n", 2, "capsules", "Input should be a valid dictionary, got a list"),
        (
            "version: 1\ncapsules:\n  hello: capsules/hello\n",
            3,
            "capsules.hello",
            "expected a mapping with keys path, config, limits, publish_rate, instances, depends_on, enabled, hosts, "
            "labels, got 'capsules/hello'",
        ),
        ("version: 1\ncapsules:\n  hello: {}\n", 3, "capsules.hello.path", "required: the capsule folder, relative to"),
        (capsule("", path="''"), 4, "capsules.hello.path", "must be a non-empty path"),
        (capsule("", path="~"), 4, "capsules.hello.path", "Input should be a valid string, got None"),
        (
            capsule("config: greeting=Hi"),
            5,
            "capsules.hello.config",
            "got 'greeting=Hi'; expected a mapping of [env] keys",
        ),
        (capsule("depends_on: counter"), 5, "capsules.hello.depends_on", "Input should be a valid list, got 'counter'"),
        (capsule("depends_on: [1]"), 5, "capsules.hello.depends_on.0", "Input should be a valid string, got 1"),
        (
            capsule("instances: 0"),
            5,
            "capsules.hello.instances",
            "greater than or equal to 1, got 0; expected a whole number 1..64",
        ),
        (capsule("instances: 65"), 5, "capsules.hello.instances", "less than or equal to 64, got 65"),
        (capsule("instances: '2'"), 5, "capsules.hello.instances", "valid integer, got '2'"),
        (capsule("instances: true"), 5, "capsules.hello.instances", "valid integer, got True"),
        (capsule("instances: 2.0"), 5, "capsules.hello.instances", "valid integer, got 2.0"),
        (capsule("enabled: 'true'"), 5, "capsules.hello.enabled", "valid boolean, got 'true'; expected true or false"),
        (capsule("enabled: 1"), 5, "capsules.hello.enabled", "valid boolean"),
        (
            capsule("limits: {fuel: 0}"),
            5,
            "capsules.hello.limits.fuel",
            "greater than 0, got 0; expected a whole number > 0",
        ),
        (capsule("limits: {fuel: -5}"), 5, "capsules.hello.limits.fuel", "greater than 0, got -5"),
        (
            capsule("limits:\n  memory_mib: 4097"),
            6,
            "capsules.hello.limits.memory_mib",
            "less than or equal to 4096, got 4097; expected a whole number 1..4096",
        ),
        (capsule("limits: {timeout_ms: 1.5}"), 5, "capsules.hello.limits.timeout_ms", "valid integer, got 1.5"),
        (
            capsule("limits: 5"),
            5,
            "capsules.hello.limits",
            "expected a mapping with keys fuel, memory_mib, timeout_ms, got 5",
        ),
        ("version: 1\ndefaults: {limits: {memory_mib: 0}}\n", 2, "defaults.limits.memory_mib", "greater than 0"),
    ],
)
def test_invalid_files(root: Path, text: str, line: int | None, field: str, fragment: str) -> None:
    found_line, found_field, message = one_problem(root, text)
    assert (found_line, found_field) == (line, field), message
    assert fragment in message


@pytest.mark.parametrize("name", ["a", "'0'", "a-b", "web-2", "a" * 64, "1-2-3", "2fa"])
def test_valid_deployment_names(root: Path, name: str) -> None:
    assert list(parse(root, capsule("", name=name)).model.capsules) == [name.strip("'")]


@pytest.mark.parametrize("name", ["Hello", "-a", "a-", "a_b", "a.b", "a" * 65, "'a b'", "''", "é"])
def test_invalid_deployment_names(root: Path, name: str) -> None:
    line, field, message = one_problem(root, capsule("", name=name))
    assert line == 3
    assert field == "capsules." + name.strip("'")
    assert "invalid deployment name" in message
    assert "lowercase letters, digits and '-' (not first or last), at most 64 characters" in message


def test_invalid_names_in_a_model_built_in_python() -> None:
    with pytest.raises(ValueError, match="invalid deployment name 'A'"):
        OrchestratorConfig.model_validate({"version": 1, "capsules": {"A": {"path": "x"}}})


def test_too_many_aliases_are_refused(root: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 8):
        previous = chr(ord("a") + i - 1)
        bomb += f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{', '.join(['*' + previous] * 10)}]\n"
    assert "too many values (more than 100000 after expanding aliases)" in one_problem(root, bomb)[2]


# --- several problems at once ----------------------------------------------------------------


def test_every_problem_is_listed_in_line_order(root: Path) -> None:
    text = (
        "version: 1\n"  # 1
        "workspce: .\n"  # 2
        "capsules:\n"  # 3
        "  hello:\n"  # 4
        "    path: capsules/hello\n"  # 5
        "    instances: 99\n"  # 6
        "    limits: {fule: 1, memory_mib: 0}\n"  # 7
        "    config: {token: '${TOKEN}'}\n"  # 8
        "  Bad:\n"  # 9
        "    pth: x\n"  # 10
        "    path: capsules/counter\n"  # 11
        "    path: capsules/counter\n"  # 12
    )
    found = problems(root, text)
    assert [(line, field) for line, field, _ in found] == [
        (2, "workspce"),
        (6, "capsules.hello.instances"),
        (7, "capsules.hello.limits.memory_mib"),
        (7, "capsules.hello.limits.fule"),
        (8, "capsules.hello.config.token"),
        (9, "capsules.Bad"),
        (10, "capsules.Bad.pth"),
        (12, "capsules.Bad.path"),
    ]


def test_duplicates_and_reference_problems_are_listed_together(root: Path) -> None:
    text = capsule("depends_on: [countr]\ninstances: 1\ninstances: 2")
    assert [(line, field) for line, field, _ in problems(root, text)] == [
        (5, "capsules.hello.depends_on.0"),
        (7, "capsules.hello.instances"),
    ]


def test_a_key_given_three_times_points_back_at_the_first(root: Path) -> None:
    found = problems(root, "version: 1\nworkspace: a\nworkspace: b\nworkspace: c\n")
    assert [(line, field) for line, field, _ in found] == [(3, "workspace"), (4, "workspace")]
    assert all("(first at line 2)" in message for _, _, message in found)


def test_references_are_checked_only_when_the_structure_is_valid(root: Path) -> None:
    text = capsule("depends_on: [nope]\ninstances: 0", path="capsules/missing")
    assert [field for _, field, _ in problems(root, text)] == ["capsules.hello.instances"]


# --- references ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            capsule("depends_on: [countr]") + "  counter: {path: capsules/counter}\n",
            [
                (
                    5,
                    "capsules.hello.depends_on.0",
                    "unknown deployment 'countr' (did you mean 'counter'?); deployments: counter",
                )
            ],
        ),
        (
            capsule("depends_on: [zzz]"),
            [(5, "capsules.hello.depends_on.0", "unknown deployment 'zzz'; deployments: none")],
        ),
        (
            capsule("depends_on:\n  - counter\n  - counter") + "  counter: {path: capsules/counter}\n",
            [(7, "capsules.hello.depends_on.1", "'counter' is listed twice (first at line 6): remove one")],
        ),
        (
            capsule("", path="capsules/nope"),
            [
                (
                    4,
                    "capsules.hello.path",
                    "capsule folder {root}/capsules/nope does not exist ('capsules/nope' relative to {root}): "
                    "create it or fix the path",
                )
            ],
        ),
        (
            capsule("", path="{root}/absent"),
            [(4, "capsules.hello.path", "capsule folder {root}/absent does not exist: create it or fix the path")],
        ),
        (
            capsule("", path="capsules/hello/Capsule.toml"),
            [
                (
                    4,
                    "capsules.hello.path",
                    "{root}/capsules/hello/Capsule.toml is not a folder ('capsules/hello/Capsule.toml' relative to "
                    "{root}): path names a capsule folder containing Capsule.toml",
                )
            ],
        ),
        (
            capsule("", path="capsules"),
            [(4, "capsules.hello.path", "no Capsule.toml in {root}/capsules: every capsule folder needs one")],
        ),
    ],
)
def test_reference_problems(root: Path, text: str, expected: list[tuple[int, str, str]]) -> None:
    text = text.replace("{root}", str(root))
    assert problems(root, text) == [(line, field, m.replace("{root}", str(root))) for line, field, m in expected]


def test_disabled_deployments_are_checked_too(root: Path) -> None:
    assert one_problem(root, capsule("enabled: false", path="gone"))[1] == "capsules.hello.path"


def deps(*edges: str) -> str:
    """A config where each 'a>b,c' makes deployment a depend on b and c."""
    text = "version: 1\ncapsules:\n"
    for edge in edges:
        name, _, targets = edge.partition(">")
        text += f"  {name}: {{path: capsules/hello, depends_on: [{targets}]}}\n"
    return text


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        (["a>a"], [(3, "capsules.a.depends_on.0", "'a' depends on itself (depends_on cycle: a -> a); remove it")]),
        (
            ["b>a", "a>b"],
            [(4, "capsules.a.depends_on.0", "depends_on cycle: a -> b -> a; remove one of these dependencies")],
        ),
        (
            ["a>b", "b>c", "c>a"],
            [(3, "capsules.a.depends_on.0", "depends_on cycle: a -> b -> c -> a; remove one of these dependencies")],
        ),
        (
            ["c>b", "b>a", "a>c"],
            [(5, "capsules.a.depends_on.0", "depends_on cycle: a -> c -> b -> a; remove one of these dependencies")],
        ),
        (
            ["a>x,b", "b>c", "c>a", "x>"],
            [(3, "capsules.a.depends_on.1", "depends_on cycle: a -> b -> c -> a; remove one of these dependencies")],
        ),
        (
            ["a>b", "b>a", "c>d", "d>c"],
            [
                (3, "capsules.a.depends_on.0", "depends_on cycle: a -> b -> a; remove one of these dependencies"),
                (5, "capsules.c.depends_on.0", "depends_on cycle: c -> d -> c; remove one of these dependencies"),
            ],
        ),
    ],
)
def test_cycles_are_named_in_order(root: Path, edges: list[str], expected: list[tuple[int, str, str]]) -> None:
    assert problems(root, deps(*edges)) == expected


def test_a_dag_is_not_a_cycle(root: Path) -> None:
    loaded = parse(root, deps("top>left,right", "left>base", "right>base", "base>"))
    assert sorted(loaded.model.capsules) == ["base", "left", "right", "top"]  # parsed: no cycle reported


# --- ${VAR} expansion ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        ("'${NAME}'", {"NAME": "Ada"}, "Ada"),
        ("'Hi ${NAME}, ${NAME}!'", {"NAME": "Ada"}, "Hi Ada, Ada!"),
        ("'${A}${B}'", {"A": "1", "B": "2"}, "12"),
        ("'${NAME:-World}'", {}, "World"),
        ("'${NAME:-World}'", {"NAME": "Ada"}, "Ada"),
        ("'${NAME:-World}'", {"NAME": ""}, "World"),
        ("'${NAME}'", {"NAME": ""}, ""),
        ("'${NAME:-}'", {}, ""),
        ("'${NAME:-a b:c}'", {}, "a b:c"),
        ("'$${NAME}'", {"NAME": "Ada"}, "${NAME}"),
        ("'$${NAME} and ${NAME}'", {"NAME": "Ada"}, "${NAME} and Ada"),
        ("'$NAME $ $$ {NAME} costs $5'", {"NAME": "Ada"}, "$NAME $ $$ {NAME} costs $5"),
        ("'${NAME}'", {"NAME": "${OTHER}"}, "${OTHER}"),  # values are not expanded again
        ("'${_x1}'", {"_x1": "ok"}, "ok"),
        ("[a, '${NAME}', [b, '${NAME}']]", {"NAME": "Ada"}, ["a", "Ada", ["b", "Ada"]]),
        ("{k: '${NAME}', deep: {list: ['${NAME:-z}']}}", {"NAME": "Ada"}, {"k": "Ada", "deep": {"list": ["Ada"]}}),
        ("{'${NAME}': 1}", {"NAME": "Ada"}, {"${NAME}": 1}),  # keys are not expanded
        ("5", {}, 5),
        ("1.5", {}, 1.5),
        ("true", {}, True),
        ("null", {}, None),
        ("[1, false, null]", {}, [1, False, None]),
    ],
)
def test_env_expansion(root: Path, value: str, environ: dict[str, str], expected: object) -> None:
    loaded = parse(root, capsule(f"config: {{x: {value}}}"), environ)
    assert loaded.model.capsules["hello"].config["x"] == expected


def test_expansion_reads_os_environ_by_default(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_TEST_GREETING", "Howdy")
    loaded = parse_config(capsule("config: {g: '${ORCH_TEST_GREETING}'}"), path=root / "config.yaml")
    assert loaded.model.capsules["hello"].config["g"] == "Howdy"
    (root / "config.yaml").write_text(capsule("config: {g: '${ORCH_TEST_GREETING}'}"))
    assert load_config(root / "config.yaml", environ={"ORCH_TEST_GREETING": "Yo"}).model.capsules["hello"].config == {
        "g": "Yo"
    }


def test_nothing_outside_capsule_config_is_expanded(root: Path) -> None:
    environ = {"W": "work", "P": "capsules/hello", "N": "1"}
    text = "version: 1\nworkspace: '${W}'\ncapsules:\n  hello:\n    path: '${P}'\n"
    line, field, message = one_problem(root, text, environ)
    assert (line, field) == (5, "capsules.hello.path")
    assert "${P}" in message
    loaded = parse(root, "version: 1\nworkspace: '${W}'\n", environ)
    assert loaded.workspace == root / "${W}"


@pytest.mark.parametrize(
    ("body", "line", "field", "fragment"),
    [
        (
            "config: {token: '${TOKEN}'}",
            5,
            "capsules.hello.config.token",
            "environment variable 'TOKEN' is not set: set it, or give a default: ${TOKEN:-default}",
        ),
        (
            "config:\n  a: 1\n  b: 'x ${MISSING} y'",
            7,
            "capsules.hello.config.b",
            "environment variable 'MISSING' is not set",
        ),
        ("config:\n  list:\n    - ok\n    - '${MISSING}'", 8, "capsules.hello.config.list.1", "'MISSING' is not set"),
        (
            "config:\n  deep:\n    inner: {x: '${MISSING}'}",
            7,
            "capsules.hello.config.deep.inner.x",
            "'MISSING' is not set",
        ),
        (
            "config: {x: '${1BAD}'}",
            5,
            "capsules.hello.config.x",
            "malformed '${': write ${NAME} or ${NAME:-default}, and $${ for a literal '${'",
        ),
        ("config: {x: '${NAME'}", 5, "capsules.hello.config.x", "malformed '${'"),
        ("config: {x: '${NAME-default}'}", 5, "capsules.hello.config.x", "malformed '${'"),
        ("config: {x: '${}'}", 5, "capsules.hello.config.x", "malformed '${'"),
    ],
)
def test_expansion_problems(root: Path, body: str, line: int, field: str, fragment: str) -> None:
    found = one_problem(root, capsule(body), {"NAME": "set"})
    assert found[:2] == (line, field)
    assert fragment in found[2]


def test_every_unset_variable_is_listed(root: Path) -> None:
    text = capsule("config:\n  a: '${A} ${B}'\n  b: '${C:-ok}'\n  c: '${D}'")
    found = problems(root, text)
    assert [(line, field) for line, field, _ in found] == [
        (6, "capsules.hello.config.a"),
        (6, "capsules.hello.config.a"),
        (8, "capsules.hello.config.c"),
    ]
    assert ["'A'" in found[0][2], "'B'" in found[1][2], "'D'" in found[2][2]] == [True, True, True]


# --- line_of ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loc", "line"),
    [
        (("version",), 1),
        (("state_dir",), 3),
        (("defaults", "limits", "timeout_ms"), 5),
        (("capsules",), 6),
        (("capsules", "hello"), 7),
        (("capsules", "hello", "config"), 9),
        (("capsules", "hello", "config", "greeting"), 9),
        (("capsules", "hello", "depends_on", 0), 12),
        (("capsules", "hello", "enabled"), 13),
        (("capsules", "counter", "path"), 15),
        # not in the file: the deepest ancestor that is
        (("capsules", "counter", "config", "greeting"), 14),
        (("capsules", "hello", "config", "undeclared"), 9),
        (("nowhere",), None),
        ((), None),
    ],
)
def test_line_of(root: Path, loc: tuple[str | int, ...], line: int | None) -> None:
    assert parse(root, DESIGN).line_of(*loc) == line


def test_line_of_block_style_config(root: Path) -> None:
    loaded = parse(root, capsule("config:\n  greeting: Hi\n  list:\n    - a\n    - {k: v}"))
    assert loaded.line_of("capsules", "hello", "config", "greeting") == 6
    assert loaded.line_of("capsules", "hello", "config", "list", 1, "k") == 9
