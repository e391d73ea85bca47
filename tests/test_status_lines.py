"""`orch status` text: the lines that say what is wrong with the files (a rejected config, a
capsule whose own files are broken, a failed build), from the status JSON's `desired`
(orchestrator.control.health). Pure: the JSON is what `GET /v1/status` answers; a real
orchestrator is exercised by tests/test_cli_reachable.py."""

from __future__ import annotations

from orchestrator.cli.remote import BUILD_LINES, desired_lines
from orchestrator.control.health import DesiredHealth


def health() -> DesiredHealth:
    return DesiredHealth(wall_ms=lambda: 1_000)


def test_a_healthy_desired_state_says_nothing() -> None:
    state = health()
    state.accepted({})
    assert desired_lines(state.to_dict(), config="config.yaml") == []


def test_a_rejected_config_names_the_file_and_lists_its_problems() -> None:
    state = health()
    state.rejected_config(["config.yaml:3: capsules.a.pth: unknown key", "config.yaml:9: version: must be 1"])
    assert desired_lines(state.to_dict(), config="config.yaml") == [
        "rejected config.yaml: 2 problem(s); what runs keeps running",
        "  config.yaml:3: capsules.a.pth: unknown key",
        "  config.yaml:9: version: must be 1",
    ]
    # following git, the git lines say it (with the revision): not twice
    assert desired_lines(state.to_dict(), config=None) == []


def test_broken_capsules_and_failed_builds_are_listed_with_their_problems() -> None:
    state = health()
    state.accepted({"notes": ["Capsule.toml:4: package.descripton: unknown key"]})
    output = "\n".join(f"line {n}" for n in range(BUILD_LINES + 5)) + "\n"
    state.build_finished("counter", exit_code=2, output=output)
    lines = desired_lines(state.to_dict(), config="config.yaml")
    assert lines[:2] == [
        "broken notes: its files cannot be used; the last good version keeps serving",
        "  Capsule.toml:4: package.descripton: unknown key",
    ]
    assert lines[2] == "build failed counter: exit status 2"
    assert lines[3:] == [f"  line {n}" for n in range(5, BUILD_LINES + 5)]  # the end of its output


def test_a_malformed_answer_does_not_break_the_printer() -> None:
    assert desired_lines({"broken": {"x": "not a dict"}, "builds_failed": {"y": None}}, config="c.yaml") == [
        "broken x: its files cannot be used; the last good version keeps serving"
    ]
