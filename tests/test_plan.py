"""The plan (pure): every action rule, every reason format, escalations, the order of
actions, waves in both directions, apply_plan, and property tests over random desired and
actual states (convergence, idempotence, determinism, wave order, record round trips)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.desired.plan import Action, Plan, apply_plan, plan
from orchestrator.desired.spec import SECRET_PREFIX, CapsuleSpec

WASM_A = "3fa1c2" + "a" * 58
WASM_B = "9b07de" + "b" * 58
LIMITS = {"fuel": 1_000_000_000, "memory_mib": 64, "timeout_ms": 5000}
GREET = {"name": "greet", "description": "Greets", "input_schema": {"type": "object"}}
ON_ORDER = {"event": "orders.*", "action": "on_order", "priority": 100}

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def manifest(
    *,
    version: str = "0.1.0",
    caps: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] = (GREET,),
    interceptors: Sequence[Mapping[str, Any]] = (),
    env: Mapping[str, Any] | None = None,
    build: Mapping[str, Any] | None = None,
    manifest_limits: Mapping[str, Any] | None = None,
    component_file: str = "hello.wasm",
    **extra: Any,
) -> dict[str, Any]:
    """A manifest as plain data, shaped like Manifest.model_dump(by_alias=True)."""
    capabilities: dict[str, Any] = {
        "kv": False,
        "fs_read": [],
        "fs_write": [],
        "ipc_publish": [],
        "ipc_subscribe": ["orders.*"],
        "net": [],
    }
    return {
        "package": {"name": "hello", "version": version, "description": "Greets people"},
        "component": [{"id": "main", "file": component_file, "hash": None}],
        "build": build,
        "env": env
        if env is not None
        else {
            "greeting": {"type": "string", "default": "Hello", "description": ""},
            "token": {"type": "secret", "default": None, "description": ""},
        },
        "capabilities": capabilities | dict(caps or {}),
        "tool": [dict(t) for t in tools],
        "interceptor": [dict(i) for i in interceptors],
        "limits": manifest_limits or {"fuel": None, "memory_mib": None, "timeout_ms": None},
        **extra,
    }


def spec(
    name: str = "hello",
    *,
    folder: str | None = None,
    wasm: str = WASM_A,
    config: Mapping[str, str] | None = None,
    secrets: Sequence[str] = ("token",),
    limits: Mapping[str, int] = LIMITS,
    instances: int = 1,
    depends_on: Sequence[str] = (),
    enabled: bool = True,
    **manifest_fields: Any,
) -> CapsuleSpec:
    return CapsuleSpec(
        name=name,
        folder=folder or f"/srv/capsules/{name}",
        wasm_sha256=wasm,
        manifest=manifest(**manifest_fields),
        config=dict(config if config is not None else {"greeting": "Hi"}),
        secret_keys=frozenset(secrets),
        limits=dict(limits),
        instances=instances,
        depends_on=tuple(depends_on),
        enabled=enabled,
    )


def only_action(old: CapsuleSpec, new: CapsuleSpec) -> Action:
    [action] = plan({"hello": new}, {"hello": old}).actions
    return action


def order(result: Plan) -> list[tuple[str, str]]:
    return [(a.capsule, a.action) for a in result.actions]


def names(waves: list[list[Action]]) -> list[list[str]]:
    return [[a.capsule for a in wave] for wave in waves]


# -- reasons -----------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}}
ON_ORDER_50 = {**ON_ORDER, "priority": 50}
ON_PAID = {"event": "orders.paid", "action": "on_paid", "priority": 100}
ENV_SECRET_DEFAULT = {
    "greeting": {"type": "string", "default": "Hello", "description": ""},
    "token": {"type": "secret", "default": "old-secret-default", "description": ""},
}
CONFIG_AB = ('config.a "1"→"2"', 'config.b "1"→"2"')
ENV_SECRET_DEFAULT_2 = {**ENV_SECRET_DEFAULT, "token": {**ENV_SECRET_DEFAULT["token"], "default": "new-secret-default"}}


def case(case_id: str, old: dict[str, Any], new: dict[str, Any], *reasons: str, **expect: Any) -> Any:
    """One row: spec keyword arguments before and after, then the expected reasons
    (`action=` when not a reload, `escalations=` when some)."""
    action, escalations = expect.pop("action", "reload"), expect.pop("escalations", ())
    assert not expect
    return pytest.param(old, new, action, reasons, tuple(escalations), id=case_id)


TOOL_COUNT = {**GREET, "name": "count"}
MODE = {"type": "string", "default": None, "description": ""}
REASONS = [
    case("same", {}, {}, action="keep"),
    case("folder only", {}, {"folder": "/elsewhere"}, action="keep"),
    case("wasm", {}, {"wasm": WASM_B}, "wasm 3fa1c2→9b07de"),
    case("wasm common prefix", {"wasm": "abcdef1" + "0" * 57}, {"wasm": "abcdef2" + "0" * 57}, "wasm abcdef1→abcdef2"),
    case("config changed", {}, {"config": {"greeting": "Hello"}}, 'config.greeting "Hi"→"Hello"'),
    case("config set", {"config": {}}, {}, 'config.greeting unset→"Hi"'),
    case("config unset", {}, {"config": {}}, 'config.greeting "Hi"→unset'),
    case("config quoting", {}, {"config": {"greeting": 'say "hi"\n'}}, 'config.greeting "Hi"→"say \\"hi\\"\\n"'),
    case("config unprintable", {}, {"config": {"greeting": "a\u202eb\u2028"}},
         'config.greeting "Hi"→"a\\u202eb\\u2028"'),
    case("config long", {}, {"config": {"greeting": "x" * 99}}, 'config.greeting "Hi"→"' + "x" * 38 + "…"),
    case("config sorted", {"config": {"b": "1", "a": "1"}}, {"config": {"a": "2", "b": "2"}}, *CONFIG_AB),
    case("secret changed", {"config": {"token": "hunter2"}}, {"config": {"token": "swordfish"}},
         "config.token ***→***"),
    case("secret added", {"config": {}}, {"config": {"token": "hunter2"}}, "config.token unset→***"),
    case("secret removed", {"config": {"token": "hunter2"}}, {"config": {}}, "config.token ***→unset"),
    case("secret same", {"config": {"token": "hunter2"}}, {"config": {"token": "hunter2"}}, action="keep"),
    case("key becomes secret", {"secrets": ()}, {"secrets": ("greeting",)}, "config.greeting ***→***"),
    case("grant added", {}, {"caps": {"fs_write": ["cwd://out"]}}, "capabilities +fs_write cwd://out",
         escalations=["fs_write cwd://out"]),
    case("flag removed", {"caps": {"kv": True}}, {}, "capabilities -kv"),
    case("flag added", {}, {"caps": {"kv": True}}, "capabilities +kv", escalations=["kv"]),
    case("topic added", {}, {"caps": {"ipc_publish": ["orders.>"]}}, "capabilities +ipc_publish orders.>",
         escalations=["ipc_publish orders.>"]),
    case("grant swapped", {"caps": {"fs_write": ["cwd://a"]}}, {"caps": {"fs_write": ["cwd://b"]}},
         "capabilities -fs_write cwd://a", "capabilities +fs_write cwd://b", escalations=["fs_write cwd://b"]),
    case("grants sorted", {"caps": {"kv": True}}, {"caps": {"fs_read": ["cwd://z", "cwd://a"]}},
         "capabilities +fs_read cwd://a", "capabilities +fs_read cwd://z", "capabilities -kv",
         escalations=["fs_read cwd://a", "fs_read cwd://z"]),
    case("grants reordered", {"caps": {"fs_read": ["cwd://a", "cwd://b"]}}, {"caps": {"fs_read": ["cwd://b", "cwd://a"]}},
         "capabilities rewritten (same grants)"),
    case("fuel", {}, {"limits": {**LIMITS, "fuel": 50_000_000}}, "limits.fuel 1e9→5e7"),
    case("limits sorted", {}, {"limits": {**LIMITS, "timeout_ms": 15000, "memory_mib": 128}},
         "limits.memory_mib 64→128", "limits.timeout_ms 5000→15000"),
    case("limits 10,000 and up", {}, {"limits": {**LIMITS, "memory_mib": 10000, "timeout_ms": 9000}},
         "limits.memory_mib 64→1e4", "limits.timeout_ms 5000→9000"),
    case("limit added", {"limits": {"fuel": 10**9}}, {"limits": {"fuel": 10**9, "memory_mib": 200000}},
         "limits.memory_mib unset→2e5"),
    case("instances", {}, {"instances": 2}, "instances 1→2"),
    case("package version", {}, {"version": "0.2.0"}, 'manifest.package.version "0.1.0"→"0.2.0"'),
    case("manifest limit", {}, {"manifest_limits": {"fuel": 10**9, "memory_mib": None, "timeout_ms": None}},
         "manifest.limits.fuel null→1e9"),
    case("manifest limits replaced", {}, {"manifest_limits": {"fuel": 10**9}},
         "manifest.limits.fuel null→1e9", "manifest.limits.memory_mib null→unset",
         "manifest.limits.timeout_ms null→unset"),
    case("component file", {}, {"component_file": "other.wasm"},
         'manifest.component[0].file "hello.wasm"→"other.wasm"'),
    case("build added", {}, {"build": {"command": "make", "watch": []}},
         'manifest.build.command unset→"make"', "manifest.build.watch unset→[]"),
    case("build watch grows", {"build": {"command": "make", "watch": ["a"]}},
         {"build": {"command": "make", "watch": ["a", "b"]}}, 'manifest.build.watch ["a"]→["a","b"]'),
    case("unknown manifest key", {}, {"x_extra": 1}, "manifest.x_extra unset→1"),
    case("tool added", {}, {"tools": (GREET, TOOL_COUNT)}, "tools +count"),
    case("tool removed", {}, {"tools": ()}, "tools -greet"),
    case("tool schema", {}, {"tools": ({**GREET, "input_schema": SCHEMA},)}, "tools ~greet"),
    case("tool description", {}, {"tools": ({**GREET, "description": "Says hi"},)}, "tools ~greet"),
    case("tools reordered", {"tools": (GREET, TOOL_COUNT)}, {"tools": (TOOL_COUNT, GREET)}, "tools reordered"),
    case("interceptor added", {}, {"interceptors": (ON_ORDER,)}, "interceptors +orders.* → on_order"),
    case("interceptor removed", {"interceptors": (ON_ORDER,)}, {}, "interceptors -orders.* → on_order"),
    case("interceptor priority", {"interceptors": (ON_ORDER,)}, {"interceptors": (ON_ORDER_50,)},
         "interceptors ~orders.* → on_order priority 100→50"),
    case("interceptors reordered", {"interceptors": (ON_ORDER, ON_PAID)}, {"interceptors": (ON_PAID, ON_ORDER)},
         "interceptors reordered"),
    case("env added", {"env": ENV_SECRET_DEFAULT}, {"env": {**ENV_SECRET_DEFAULT, "mode": MODE}}, "env +mode"),
    case("env removed", {"env": ENV_SECRET_DEFAULT}, {"env": {"token": ENV_SECRET_DEFAULT["token"]}}, "env -greeting"),
    case("secret default changed", {"env": ENV_SECRET_DEFAULT}, {"env": ENV_SECRET_DEFAULT_2}, "env ~token"),
    case("depends_on only", {}, {"depends_on": ("counter",)}, "depends_on []→[counter]", action="keep"),
    case("depends_on reordered", {"depends_on": ("a", "b")}, {"depends_on": ("b", "a")}, action="keep"),
    case("depends_on and a reload", {"depends_on": ("b", "a")}, {"depends_on": ("a",), "instances": 3},
         "instances 1→3", "depends_on [a, b]→[a]"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "action", "reasons", "escalations"), REASONS)
def test_reasons(
    old: dict[str, Any], new: dict[str, Any], action: str, reasons: tuple[str, ...], escalations: tuple[str, ...]
) -> None:
    result = only_action(spec(**old), spec(**new))
    assert (result.action, result.reasons, result.escalations) == (action, reasons, escalations)
    for reason in result.reasons:
        assert reason.isprintable() and len(reason) <= 100
        for secret in ("hunter2", "swordfish", "old-secret-default", "new-secret-default", SECRET_PREFIX):
            assert secret not in reason


def test_reasons_come_in_the_documented_order() -> None:
    old = spec(config={"greeting": "Hi", "token": "hunter2"}, depends_on=("db",))
    new = spec(
        wasm=WASM_B,
        config={"greeting": "Hello", "token": "swordfish"},
        caps={"kv": True},
        limits={**LIMITS, "fuel": 5 * 10**7},
        instances=2,
        version="0.2.0",
        env={"greeting": {"type": "string", "default": "Hey", "description": ""}},
        tools=(),
        interceptors=(ON_ORDER,),
        depends_on=(),
    )
    assert only_action(old, new).reasons == (
        "wasm 3fa1c2→9b07de",
        'config.greeting "Hi"→"Hello"',
        "config.token ***→***",
        "capabilities +kv",
        "limits.fuel 1e9→5e7",
        "instances 1→2",
        'manifest.package.version "0.1.0"→"0.2.0"',
        "env ~greeting",
        "env -token",
        "tools -greet",
        "interceptors +orders.* → on_order",
        "depends_on [db]→[]",
    )


def test_long_names_are_shortened_in_reasons_but_not_in_escalations() -> None:
    path = "cwd://" + "d" * 200
    old = spec(config={"k" * 200: "1"}, depends_on=tuple(f"capsule-{i}" for i in range(30)))
    new = spec(config={"k" * 200: "2"}, caps={"fs_write": [path]}, tools=({**GREET, "name": "t" * 128},))
    action = only_action(old, new)
    assert action.escalations == (f"fs_write {path}",)
    assert [r[:22] for r in action.reasons] == [
        "config." + "k" * 15,
        "capabilities +fs_write",
        "tools -greet",
        "tools +" + "t" * 15,
        "depends_on [capsule-0,",
    ]
    assert all(len(r) <= 200 for r in action.reasons)
    assert action.reasons[0] == "config." + "k" * 79 + '… "1"→"2"'


def test_a_hash_that_differs_for_no_visible_reason_still_says_so() -> None:
    old = spec()
    forged = replace(old)
    object.__setattr__(forged, "spec_hash", "0" * 64)  # a hash that no visible field explains
    assert only_action(old, forged).reasons == ("spec changed",)


def test_tuples_and_lists_are_the_same_json() -> None:
    old = spec(build={"command": "make", "watch": ["a"]})
    new = spec(build={"command": "make", "watch": ("a",)}, instances=2)
    assert only_action(old, new).reasons == ("instances 1→2",)


def test_true_is_not_one() -> None:
    old, new = spec(x_flag=True), spec(x_flag=1)
    assert only_action(old, new).reasons == ("manifest.x_flag true→1",)


# -- actions -----------------------------------------------------------------------------
LIFECYCLE: list[Any] = [
    pytest.param({"a": spec("a")}, {}, [("a", "start", ("new",))], id="new"),
    pytest.param({}, {"a": spec("a")}, [("a", "stop", ("removed from the config",))], id="removed"),
    pytest.param({"a": spec("a", enabled=False)}, {"a": spec("a")}, [("a", "stop", ("disabled",))], id="disabled"),
    pytest.param({"a": spec("a", enabled=False)}, {}, [], id="disabled and not running"),
    pytest.param({"a": spec("a")}, {"a": spec("a")}, [("a", "keep", ())], id="kept"),
    pytest.param({"a": spec("a", instances=2)}, {"a": spec("a")}, [("a", "reload", ("instances 1→2",))], id="reload"),
    pytest.param({}, {}, [], id="nothing"),
]


@pytest.mark.parametrize(("desired", "actual", "expected"), LIFECYCLE)
def test_actions(desired: dict[str, CapsuleSpec], actual: dict[str, CapsuleSpec], expected: list[Any]) -> None:
    assert [(a.capsule, a.action, a.reasons) for a in plan(desired, actual).actions] == expected


def test_escalations_only_on_reload() -> None:
    wide = spec("a", caps={"kv": True, "fs_write": ["cwd://out"]})
    narrow = spec("a")
    assert plan({"a": wide}, {}).actions[0].escalations == ()  # a start: nothing is escalated
    assert plan({}, {"a": wide}).actions[0].escalations == ()
    assert plan({"a": narrow}, {"a": wide}).actions[0].escalations == ()  # capabilities removed
    assert plan({"a": wide}, {"a": narrow}).actions[0].escalations == ("fs_write cwd://out", "kv")


def test_to_dict_shape() -> None:
    result = plan(
        {"a": spec("a", caps={"kv": True}), "b": spec("b"), "c": spec("c", depends_on=("b",))},
        {"a": spec("a"), "c": spec("c"), "z": spec("z")},
    )
    assert result.to_dict() == {
        "actions": [
            {"capsule": "z", "action": "stop", "reasons": ["removed from the config"], "escalations": []},
            {"capsule": "a", "action": "reload", "reasons": ["capabilities +kv"], "escalations": ["kv"]},
            {"capsule": "b", "action": "start", "reasons": ["new"], "escalations": []},
            {"capsule": "c", "action": "keep", "reasons": ["depends_on []→[b]"], "escalations": []},
        ]
    }
    json.dumps(result.to_dict())  # JSON-able
    assert [a.capsule for a in result.changes] == ["z", "a", "b"]
    assert result.has_changes
    kept = plan({"a": spec("a")}, {"a": spec("a")})
    assert kept.changes == () and not kept.has_changes and kept.waves() == []


# -- order -------------------------------------------------------------------------------
def test_starts_dependencies_first_ties_by_name() -> None:
    desired = {
        "web": spec("web", depends_on=("api",)),
        "api": spec("api", depends_on=("db",)),
        "db": spec("db"),
        "cache": spec("cache"),
        "zz": spec("zz"),
    }
    assert [a.capsule for a in plan(desired, {}).actions] == ["cache", "db", "api", "web", "zz"]


def test_stops_first_dependents_first_keeps_in_order() -> None:
    actual = {
        "db": spec("db"),
        "api": spec("api", depends_on=("db",)),
        "web": spec("web", depends_on=("api",)),
        "mid": spec("mid", depends_on=("new",)),
    }
    desired = {"mid": spec("mid", depends_on=("new",)), "new": spec("new"), "tail": spec("tail", depends_on=("mid",))}
    assert order(plan(desired, actual)) == [
        ("web", "stop"),
        ("api", "stop"),
        ("db", "stop"),
        ("new", "start"),
        ("mid", "keep"),
        ("tail", "start"),
    ]


def test_stops_order_by_the_running_specs() -> None:
    actual = {"a": spec("a", depends_on=("b",)), "b": spec("b")}
    desired = {"a": spec("a", enabled=False), "b": spec("b", enabled=False, depends_on=("a",))}
    assert order(plan(desired, actual)) == [("a", "stop"), ("b", "stop")]
    assert names(plan(desired, actual).waves()) == [["a"], ["b"]]


@pytest.mark.parametrize(
    ("depends", "expected"),
    [
        pytest.param({"a": ("b",), "b": ("a",), "c": ()}, ["c", "a", "b"], id="two-cycle"),
        pytest.param({"a": ("b",), "b": ("c",), "c": ("a",)}, ["a", "c", "b"], id="three-cycle"),
        pytest.param({"a": ("z",), "y": ("z",), "z": ("y",)}, ["y", "z", "a"], id="after a cycle"),
        pytest.param({"a": ("a",), "b": ()}, ["a", "b"], id="self"),
        pytest.param({"a": ("ghost",), "b": ("a", "ghost")}, ["a", "b"], id="unknown"),
    ],
)
def test_cycles_and_unknown_dependencies_terminate(depends: dict[str, tuple[str, ...]], expected: list[str]) -> None:
    desired = {n: spec(n, depends_on=d) for n, d in depends.items()}
    assert [a.capsule for a in plan(desired, {}).actions] == expected
    stopping = plan({}, desired)
    assert sorted(a.capsule for a in stopping.actions) == sorted(expected)
    for result in (plan(desired, {}), stopping):
        assert sorted(a.capsule for w in result.waves() for a in w) == sorted(expected)


# -- waves -------------------------------------------------------------------------------
def starts(**depends: tuple[str, ...]) -> Plan:
    return plan({n: spec(n, depends_on=d) for n, d in depends.items()}, {})


def stops(**depends: tuple[str, ...]) -> Plan:
    return plan({}, {n: spec(n, depends_on=d) for n, d in depends.items()})


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        pytest.param(starts(c=("b",), b=("a",), a=()), [["a"], ["b"], ["c"]], id="chain"),
        pytest.param(starts(d=("b", "c"), b=("a",), c=("a",), a=()), [["a"], ["b", "c"], ["d"]], id="diamond"),
        pytest.param(starts(c=(), a=(), b=()), [["a", "b", "c"]], id="independent"),
        pytest.param(starts(a=(), b=("a",), x=(), y=("x",), z=()), [["a", "x", "z"], ["b", "y"]], id="two chains"),
        pytest.param(starts(b=("a",), c=("a", "b"), a=()), [["a"], ["b"], ["c"]], id="shortcut"),
        pytest.param(stops(c=("b",), b=("a",), a=()), [["c"], ["b"], ["a"]], id="stop chain"),
        pytest.param(stops(d=("b", "c"), b=("a",), c=("a",), a=()), [["d"], ["b", "c"], ["a"]], id="stop diamond"),
        pytest.param(stops(a=(), b=()), [["a", "b"]], id="stop independent"),
    ],
)
def test_waves(result: Plan, expected: list[list[str]]) -> None:
    assert names(result.waves()) == expected


def test_waves_stops_before_starts_even_when_independent() -> None:
    result = plan({"b": spec("b")}, {"a": spec("a")})
    assert names(result.waves()) == [["a"], ["b"]]


def test_waves_wait_through_a_kept_capsule() -> None:
    """app → mid (kept) → base: app's reload waits for base's, though it names only mid."""
    actual = {"base": spec("base"), "mid": spec("mid", depends_on=("base",)), "app": spec("app", depends_on=("mid",))}
    desired = {
        "base": spec("base", instances=2),
        "mid": spec("mid", depends_on=("base",)),
        "app": spec("app", instances=2, depends_on=("mid",)),
    }
    result = plan(desired, actual)
    assert order(result) == [("base", "reload"), ("mid", "keep"), ("app", "reload")]
    assert names(result.waves()) == [["base"], ["app"]]


def test_waves_ignore_dependencies_that_are_not_changing() -> None:
    actual = {"db": spec("db")}
    desired = {"db": spec("db"), "api": spec("api", depends_on=("db",)), "web": spec("web", depends_on=("db",))}
    assert names(plan(desired, actual).waves()) == [["api", "web"]]


# -- apply_plan --------------------------------------------------------------------------
def test_apply_plan() -> None:
    actual = {"keep": spec("keep"), "old": spec("old"), "gone": spec("gone"), "off": spec("off")}
    desired = {
        "keep": spec("keep", depends_on=("new",)),
        "old": spec("old", wasm=WASM_B),
        "new": spec("new"),
        "off": spec("off", enabled=False),
    }
    result = apply_plan(actual, plan(desired, actual), desired)
    assert result == {"keep": desired["keep"], "old": desired["old"], "new": desired["new"]}
    assert result["keep"].depends_on == ("new",)  # a keep records the config's wiring
    assert not plan(desired, result).has_changes
    assert all(a.reasons == () for a in plan(desired, result).actions)
    assert actual["keep"].depends_on == ()  # inputs untouched


def test_apply_plan_refuses_a_plan_for_another_desired_state() -> None:
    with pytest.raises(ValueError, match="'a'"):
        apply_plan({}, plan({"a": spec("a")}, {}), {})


def test_apply_plan_keep_with_another_hash_keeps_what_runs() -> None:
    running = spec("a")
    hand_made = Plan((Action("a", "keep"),))
    assert apply_plan({"a": running}, hand_made, {"a": spec("a", wasm=WASM_B)}) == {"a": running}


# -- properties --------------------------------------------------------------------------
NAMES = ("a", "b", "c", "d", "e")
SECRET_VALUES = ("hunter2-secret", "swordfish-secret")


# Few draws per spec (each a pick among whole values) keep 200 examples per property fast.
SPEC_FIELDS: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "wasm": st.sampled_from([c * 64 for c in "012"]),
        "config": st.sampled_from(
            [
                {},
                {"greeting": "Hi"},
                {"greeting": "Hello", "mode": ""},
                {"token": SECRET_VALUES[0]},
                {"greeting": "Hi", "token": SECRET_VALUES[1]},
            ]
        ),
        "limits": st.sampled_from([LIMITS, {**LIMITS, "fuel": 5 * 10**7}, {"fuel": 123456, "memory_mib": 128}]),
        "instances": st.integers(1, 2),
        "enabled": st.booleans(),
        "version": st.sampled_from(["0.1.0", "0.2.0"]),
        "caps": st.sampled_from(
            [
                {},
                {"kv": True},
                {"fs_write": ["cwd://out"]},
                {"fs_write": ["cwd://out", "cwd://tmp"], "kv": True},
                {"ipc_publish": ["orders.>"]},
                {"ipc_publish": ["greetings.*", "orders.>"]},
            ]
        ),
        "tools": st.sampled_from([(), (GREET,), ({**GREET, "name": "count"},), ({**GREET, "input_schema": SCHEMA},)]),
        "interceptors": st.sampled_from([(), (ON_ORDER,), (ON_ORDER_50,), (ON_ORDER, ON_PAID), (ON_PAID, ON_ORDER)]),
        "env": st.sampled_from(
            [{"token": {"type": "secret", "default": d, "description": ""}} for d in (None, *SECRET_VALUES)]
        ),
    }
)
ACYCLIC_DEPS = [st.lists(st.sampled_from(NAMES[:i]), unique=True) if i else st.just([]) for i in range(len(NAMES))]
ANY_DEPS = st.lists(st.sampled_from((*NAMES, "ghost")), unique=True)
ACTUAL_CHOICE = st.sampled_from(["absent", "same", "rewired", "other"])


@st.composite
def states(draw: st.DrawFn, *, acyclic: bool = True) -> tuple[dict[str, CapsuleSpec], dict[str, CapsuleSpec]]:
    """(desired, actual); acyclic: each capsule depends only on names before it."""

    def deps(i: int) -> tuple[str, ...]:
        return tuple(draw(ACYCLIC_DEPS[i] if acyclic else ANY_DEPS))

    def fresh(i: int) -> CapsuleSpec:
        return spec(NAMES[i], secrets=("token",), depends_on=deps(i), **draw(SPEC_FIELDS))

    desired = {n: fresh(i) for i, n in enumerate(NAMES) if draw(st.booleans())}
    actual = {}
    for i, name in enumerate(NAMES):
        choice = draw(ACTUAL_CHOICE)
        if name in desired and choice == "same":
            actual[name] = desired[name]
        elif name in desired and choice == "rewired":
            actual[name] = replace(desired[name], depends_on=deps(i))
        elif choice != "absent":
            actual[name] = fresh(i)
    return desired, actual


def hashes(specs: Mapping[str, CapsuleSpec]) -> dict[str, str]:
    return {n: s.spec_hash for n, s in specs.items()}


@PROPERTY
@given(states())
def test_applying_a_plan_converges(state: tuple[dict[str, CapsuleSpec], dict[str, CapsuleSpec]]) -> None:
    desired, actual = state
    result = apply_plan(actual, plan(desired, actual), desired)
    assert hashes(result) == hashes({n: s for n, s in desired.items() if s.enabled})
    again = plan(desired, result)
    assert not again.has_changes and all(a.reasons == () for a in again.actions)


@PROPERTY
@given(states(acyclic=False))
def test_running_what_is_desired_changes_nothing(state: tuple[dict[str, CapsuleSpec], Any]) -> None:
    desired, _ = state
    running = {n: s for n, s in desired.items() if s.enabled}
    result = plan(desired, running)
    assert not result.has_changes and result.waves() == []
    assert sorted(a.capsule for a in result.actions) == sorted(running)


@PROPERTY
@given(states(acyclic=False))
def test_plan_is_deterministic_and_pure(state: tuple[dict[str, CapsuleSpec], dict[str, CapsuleSpec]]) -> None:
    desired, actual = state
    before = (
        list(desired),
        list(actual),
        [s.record() for s in desired.values()],
        [s.record() for s in actual.values()],
    )
    first = plan(desired, actual)
    assert plan(dict(reversed(desired.items())), dict(reversed(actual.items()))) == first
    assert plan(desired, actual) == first and first.waves() == plan(desired, actual).waves()
    after = (list(desired), list(actual), [s.record() for s in desired.values()], [s.record() for s in actual.values()])
    assert after == before


@PROPERTY
@given(states())
def test_waves_and_actions_respect_dependencies(state: tuple[dict[str, CapsuleSpec], dict[str, CapsuleSpec]]) -> None:
    desired, actual = state
    result = plan(desired, actual)
    waves = result.waves()
    wave_of = {a.capsule: i for i, wave in enumerate(waves) for a in wave}
    assert sorted(wave_of) == sorted(a.capsule for a in result.changes)  # each change exactly once
    assert sum(len(w) for w in waves) == len(result.changes) and all(waves)
    kinds = {a.capsule: a.action for a in result.actions}
    position = {a.capsule: i for i, a in enumerate(result.actions)}
    for name, kind in kinds.items():
        if kind == "stop":
            dependents = [m for m, k in kinds.items() if k == "stop" and name in actual[m].depends_on]
            assert all(wave_of[m] < wave_of[name] and position[m] < position[name] for m in dependents)
            assert all(wave_of[name] < wave_of[m] for m, k in kinds.items() if k in ("start", "reload"))
        else:
            for dep in desired[name].depends_on:
                if kinds.get(dep) in ("start", "reload", "keep"):
                    assert position[dep] < position[name]
                if kinds.get(dep) in ("start", "reload") and kind != "keep":
                    assert wave_of[dep] < wave_of[name]


@PROPERTY
@given(states(acyclic=False))
def test_any_wiring_terminates_and_every_reason_is_safe(state: tuple[dict[str, CapsuleSpec], Any]) -> None:
    """Cycles and unknown names included: every deployment gets one action, every change one
    wave; reloads say why; escalations are the added capabilities; no secret ever shows."""
    desired, actual = state
    result = plan(desired, actual)
    expected = {n for n, s in desired.items() if s.enabled} | set(actual)
    assert sorted(a.capsule for a in result.actions) == sorted(expected)
    assert sorted(a.capsule for w in result.waves() for a in w) == sorted(a.capsule for a in result.changes)
    for action in result.actions:
        assert action.action != "reload" or action.reasons
        assert action.action == "reload" or action.escalations == ()
        for escalation in action.escalations:
            assert f"capabilities +{escalation}" in action.reasons
        for text in (*action.reasons, *action.escalations):
            assert text.isprintable() and len(text) <= 100
            assert SECRET_PREFIX not in text and not any(s in text for s in SECRET_VALUES)


@PROPERTY
@given(st.builds(lambda fields, deps: spec("a", depends_on=deps, **fields), SPEC_FIELDS, ANY_DEPS))
def test_a_spec_rebuilt_from_its_record_is_kept(original: CapsuleSpec) -> None:
    rebuilt = CapsuleSpec.from_record(json.loads(json.dumps(original.record())))
    enabled = replace(original, enabled=True)
    rebuilt = replace(rebuilt, enabled=True)
    for desired, actual in ((enabled, rebuilt), (rebuilt, enabled)):
        [action] = plan({original.name: desired}, {original.name: actual}).actions
        assert (action.action, action.reasons) == ("keep", ())
