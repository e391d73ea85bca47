"""Placement (orchestrator.lattice.placement): table-driven cases and properties.

Pure: no servers. The properties are the scheduler's promises: only eligible hosts, as
many as wanted or every eligible one (with the shortfall reported), nothing moves that
can stay, spread evenly, deterministic and idempotent.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.lattice.placement import HostView, Placement, Want, can_run, place

H = HostView


@pytest.mark.parametrize(
    ("wants", "hosts", "previous", "expected", "problems"),
    [
        pytest.param({}, {"a": H()}, {}, {}, set(), id="nothing to place"),
        pytest.param({"x": Want()}, {}, {}, {"x": ()}, {"x"}, id="no hosts: reported"),
        pytest.param(
            {"x": Want(), "y": Want()}, {"a": H(), "b": H()}, {}, {"x": ("a",), "y": ("b",)}, set(), id="spread"
        ),
        pytest.param(
            {"x": Want(2), "y": Want(1)}, {"a": H(), "b": H()}, {}, {"x": ("a", "b"), "y": ("a",)}, set(), id="count 2"
        ),
        pytest.param({"x": Want(3)}, {"a": H(), "b": H()}, {}, {"x": ("a", "b")}, {"x"}, id="fewer hosts than wanted"),
        pytest.param(
            {"x": Want(labels={"zone": "eu"})},
            {"a": H({"zone": "us"}), "b": H({"zone": "eu"})},
            {},
            {"x": ("b",)},
            set(),
            id="labels constrain",
        ),
        pytest.param(
            {"x": Want(labels={"zone": "eu", "gpu": "yes"})},
            {"a": H({"zone": "eu"}), "b": H({"gpu": "yes"})},
            {},
            {"x": ()},
            {"x"},
            id="every label must match",
        ),
        pytest.param({"x": Want()}, {"a": H(), "b": H()}, {"x": ["b"]}, {"x": ("b",)}, set(), id="stays where it runs"),
        pytest.param({"x": Want()}, {"a": H()}, {"x": ["gone"]}, {"x": ("a",)}, set(), id="host gone: moved"),
        pytest.param(
            {"x": Want()}, {"a": H(), "b": H(draining=True)}, {"x": ["b"]}, {"x": ("a",)}, set(), id="draining: moved"
        ),
        pytest.param(
            {"x": Want()},
            {"a": H({"zone": "us"}), "b": H({"zone": "eu"})},
            {"x": ["a"]},
            {"x": ("a",)},
            set(),
            id="no labels wanted: any host",
        ),
        pytest.param(
            {"x": Want(labels={"zone": "eu"})},
            {"a": H({"zone": "us"}), "b": H({"zone": "eu"})},
            {"x": ["a"]},
            {"x": ("b",)},
            set(),
            id="labels changed: moved",
        ),
        pytest.param(
            {"x": Want(1), "y": Want(1), "z": Want(1)},
            {"a": H(), "b": H(), "c": H()},
            {"x": ["a", "b", "c"], "y": ["a"], "z": ["a"]},
            {"x": ("b",), "y": ("a",), "z": ("a",)},
            set(),
            id="count lowered: the busiest hosts let go",
        ),
        pytest.param(
            {"x": Want(), "y": Want(labels={"zone": "eu"})},
            {"a": H({"zone": "eu"}), "b": H()},
            {},
            {"x": ("b",), "y": ("a",)},
            set(),
            id="most constrained placed first",
        ),
        pytest.param(
            {"x": Want(), "y": Want()},
            {"a": H(), "b": H(), "new": H()},
            {"x": ["a"], "y": ["b"]},
            {"x": ("a",), "y": ("b",)},
            set(),
            id="a new host takes nothing that runs",
        ),
    ],
)
def test_placement_table(
    wants: dict[str, Want],
    hosts: dict[str, HostView],
    previous: dict[str, list[str]],
    expected: dict[str, tuple[str, ...]],
    problems: set[str],
) -> None:
    result = place(wants, hosts, previous)
    assert result.assignments == expected
    assert set(result.problems) == problems


def test_problem_messages_say_why_and_what_to_do() -> None:
    result = place(
        {"eu": Want(2, {"zone": "eu"}), "many": Want(5), "none": Want()},
        {"a": H({"zone": "eu"}), "b": H(draining=True)},
    )
    assert "wants 2 hosts with labels zone=eu; 1 of 1 live host match" in result.problems["eu"]
    assert "--label" in result.problems["eu"]
    assert "only 1 live host take work" in result.problems["many"]
    assert "none" not in result.problems
    assert "all are draining" in place({"x": Want()}, {"b": H(draining=True)}).problems["x"]


# -- properties --------------------------------------------------------------------------
HOST_IDS = st.sampled_from([f"h{i}" for i in range(7)])
LABELS = st.dictionaries(st.sampled_from(["zone", "gpu"]), st.sampled_from(["eu", "us"]), max_size=2)
hosts_st = st.dictionaries(HOST_IDS, st.builds(HostView, labels=LABELS, draining=st.booleans()), max_size=7)
wants_st = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.builds(Want, count=st.integers(1, 4), labels=st.one_of(st.just({}), LABELS)),
    max_size=8,
)
previous_st = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), st.lists(HOST_IDS, max_size=5), max_size=8)


@settings(max_examples=300, deadline=None)
@given(wants_st, hosts_st, previous_st)
def test_only_eligible_hosts_and_as_many_as_possible(
    wants: dict[str, Want], hosts: dict[str, HostView], previous: dict[str, list[str]]
) -> None:
    result = place(wants, hosts, previous)
    assert set(result.assignments) == set(wants)
    for name, want in wants.items():
        chosen = result.assignments[name]
        assert len(set(chosen)) == len(chosen)
        assert all(h in hosts and can_run(want, hosts[h]) for h in chosen)
        able = [h for h in hosts if can_run(want, hosts[h])]
        assert len(chosen) == min(want.count, len(able))
        assert (name in result.problems) == (len(able) < want.count)


@settings(max_examples=300, deadline=None)
@given(wants_st, hosts_st, previous_st)
def test_nothing_moves_that_can_stay(
    wants: dict[str, Want], hosts: dict[str, HostView], previous: dict[str, list[str]]
) -> None:
    result = place(wants, hosts, previous)
    for name, want in wants.items():
        staying = {h for h in previous.get(name, ()) if h in hosts and can_run(want, hosts[h])}
        assert len(staying & set(result.assignments[name])) == min(len(staying), want.count)


@settings(max_examples=300, deadline=None)
@given(wants_st, hosts_st, previous_st)
def test_deterministic_and_idempotent(
    wants: dict[str, Want], hosts: dict[str, HostView], previous: dict[str, list[str]]
) -> None:
    result = place(wants, hosts, previous)
    shuffled = place(dict(reversed(wants.items())), dict(reversed(hosts.items())), dict(reversed(previous.items())))
    assert shuffled == result
    assert place(wants, hosts, result.assignments) == result


@settings(max_examples=300, deadline=None)
@given(wants_st, hosts_st, st.data())
def test_losing_a_host_moves_only_what_ran_there(
    wants: dict[str, Want], hosts: dict[str, HostView], data: st.DataObject
) -> None:
    before = place(wants, hosts)
    if not hosts:
        return
    lost = data.draw(st.sampled_from(sorted(hosts)))
    after = place(wants, {h: v for h, v in hosts.items() if h != lost}, before.assignments)
    for name, chosen in before.assignments.items():
        if lost not in chosen:
            assert after.assignments[name] == chosen
        else:
            assert set(chosen) - {lost} <= set(after.assignments[name])


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), st.integers(1, 3).map(Want), max_size=12),
    st.integers(3, 7),
)
def test_fresh_placement_spreads_evenly(wants: dict[str, Want], count: int) -> None:
    hosts = {f"h{i}": HostView() for i in range(count)}
    load = place(wants, hosts).load()
    loads = [load.get(h, 0) for h in hosts]
    assert max(loads) - min(loads) <= 1


def test_load_counts_deployments_per_host() -> None:
    assert Placement({"x": ("a", "b"), "y": ("a",)}, {}).load() == {"a": 2, "b": 1}
