"""The capability gate: key and size limits, NATS topic syntax and matching, path resolution
and fs grants against real folders and symlinks (hostile inputs included), and the publish
rate limiter on a fake clock. Property tests (hypothesis) cover matching and path safety."""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.capsule.gate import (
    MAX_FILE_BYTES,
    MAX_KEY_BYTES,
    MAX_PATH_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_VALUE_BYTES,
    GateError,
    PathGate,
    RateLimiter,
    TopicGate,
    check_key,
    check_pattern,
    check_size,
    check_topic,
    topic_matches,
)
from orchestrator.errors import CapabilityDenied, OrchestratorError
from orchestrator.topics import MAX_TOPIC_BYTES, MAX_TOPIC_TOKENS

FAST = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- limits and keys ------------------------------------------------------------------------


def test_limits_are_the_documented_ones() -> None:
    assert (MAX_KEY_BYTES, MAX_VALUE_BYTES, MAX_PAYLOAD_BYTES) == (4096, 1048576, 1048576)
    assert (MAX_FILE_BYTES, MAX_TOPIC_BYTES, MAX_TOPIC_TOKENS, MAX_PATH_BYTES) == (16 << 20, 256, 16, 4096)
    assert issubclass(GateError, OrchestratorError)
    assert not issubclass(GateError, CapabilityDenied)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"a", "a"),
        (b"counter/total", "counter/total"),
        ("clé ✓ 🔑".encode(), "clé ✓ 🔑"),
        (b" ", " "),
        (b"x" * MAX_KEY_BYTES, "x" * MAX_KEY_BYTES),
        (b"../../etc", "../../etc"),  # keys are names, not paths
    ],
)
def test_check_key_accepts(key: bytes, expected: str) -> None:
    assert check_key(key) == expected


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        (b"", "key is empty"),
        (b"x" * (MAX_KEY_BYTES + 1), "key of 4097 bytes exceeds the limit of 4096 bytes"),
        (b"a\x00b", "NUL byte (at byte 1)"),
        (b"\x00", "NUL byte"),
        (b"ab\xff", "not valid UTF-8 (at byte 2)"),
        (b"\xc3", "not valid UTF-8"),  # truncated sequence
        (b"\xed\xa0\x80", "not valid UTF-8"),  # encoded surrogate
        (b"\xc0\xaf", "not valid UTF-8"),  # overlong '/'
    ],
)
def test_check_key_rejects(key: bytes, rule: str) -> None:
    with pytest.raises(GateError, match=re.escape(rule)):
        check_key(key)


def test_check_key_counts_bytes_not_characters() -> None:
    assert check_key("é".encode() * 2048) == "é" * 2048
    with pytest.raises(GateError, match="4098 bytes"):
        check_key("é".encode() * 2049)


def test_check_size() -> None:
    check_size("value", 0, MAX_VALUE_BYTES)
    check_size("value", MAX_VALUE_BYTES, MAX_VALUE_BYTES)
    with pytest.raises(GateError) as raised:
        check_size("value", 2_000_000, MAX_VALUE_BYTES)
    assert str(raised.value) == "value of 2000000 bytes exceeds the limit of 1048576 bytes"
    with pytest.raises(GateError, match=r"^payload of 1048577 bytes exceeds the limit of 1048576 bytes$"):
        check_size("payload", MAX_PAYLOAD_BYTES + 1, MAX_PAYLOAD_BYTES)
    with pytest.raises(GateError, match=r"^file of 16777217 bytes"):
        check_size("file", MAX_FILE_BYTES + 1, MAX_FILE_BYTES)
    with pytest.raises(ValueError):
        check_size("value", -1, MAX_VALUE_BYTES)


# --- topic syntax ---------------------------------------------------------------------------

LONG_OK = ".".join(["a" * 15] * 16)  # 16 tokens, 255 bytes


@pytest.mark.parametrize(
    "topic",
    ["a", "orders.created", "orch.capsule.hello.running", "a-b_c.d:e", "ü.日本.🚀", "x" * 256, LONG_OK],
)
def test_check_topic_accepts(topic: str) -> None:
    check_topic(topic)
    check_pattern(topic)  # every concrete subject is also a valid pattern


@pytest.mark.parametrize(
    ("topic", "rule"),
    [
        ("", "topic is empty"),
        ("x" * 257, "of 257 bytes exceeds the limit of 256 bytes"),
        ("é" * 129, "of 258 bytes exceeds the limit of 256 bytes"),
        (".".join(["a"] * 17), "has 17 tokens, over the limit of 16"),
        (".a", "empty token at position 0"),
        ("a.", "empty token at position 1"),
        ("a..b", "empty token at position 1"),
        (".", "empty token"),
        ("a b", "whitespace or a control character at index 1"),
        ("a\tb", "whitespace"),
        ("a\nb", "whitespace"),
        ("a\u00a0b", "whitespace"),  # no-break space
        ("a\u3000b", "whitespace"),  # ideographic space
        ("a\x00b", "control character"),
        ("a\x7fb", "control character"),
        ("a\x85b", "control character"),
        ("a.*", "wildcard"),
        ("a.>", "wildcard"),
        ("*", "wildcard"),
        ("a.b*", "wildcard"),
        ("a>b", "wildcard"),
        ("a\udcffb", "not valid UTF-8"),
    ],
)
def test_check_topic_rejects(topic: str, rule: str) -> None:
    with pytest.raises(GateError, match=re.escape(rule)):
        check_topic(topic)


@pytest.mark.parametrize("pattern", ["*", ">", "a.*", "a.>", "*.b", "*.*.>", "a.*.c.>", "orders.*"])
def test_check_pattern_accepts(pattern: str) -> None:
    check_pattern(pattern)
    with pytest.raises(GateError, match="wildcard"):
        check_topic(pattern)


@pytest.mark.parametrize(
    ("pattern", "rule"),
    [
        ("", "pattern is empty"),
        ("a.b*", "'*' must be a whole token"),
        ("*a", "'*' must be a whole token"),
        ("a.**", "'*' must be a whole token"),
        (">.a", "'>' may only be the whole last token"),
        ("a.>.b", "'>' may only be the whole last token"),
        ("a.>>", "'>' may only be the whole last token"),
        ("a.b>", "'>' may only be the whole last token"),
        ("a..*", "empty token"),
        ("a.>.", "'>' may only be the whole last token"),  # the first broken rule is named
        ("a. *", "whitespace"),
        (".".join(["*"] * 17), "17 tokens"),
        ("*" + "." * 256, "exceeds the limit of 256 bytes"),
    ],
)
def test_check_pattern_rejects(pattern: str, rule: str) -> None:
    with pytest.raises(GateError, match=re.escape(rule)):
        check_pattern(pattern)


def test_long_invalid_topics_are_truncated_in_messages() -> None:
    with pytest.raises(GateError) as raised:
        check_topic("x" * 5000)
    assert len(str(raised.value)) < 300
    assert "5000 characters" in str(raised.value)


# --- topic matching -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a", "a", True),
        ("a", "b", False),
        ("a.b", "a.b", True),
        ("a.b", "a", False),
        ("a", "a.b", False),
        ("a.b", "a.bc", False),
        ("a.b", "ab", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*.b", "a.b", True),
        ("*.b", "a.c", False),
        ("*.*", "a.b", True),
        ("*.*", "a.b.c", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("a.>", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "b.c", False),
        ("a.>", "ab.c", False),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("a.*.>", "a.b.c", True),
        ("a.*.>", "a.b", False),
        ("orders.*", "orders.created", True),
        ("orch.capsule.*.running", "orch.capsule.hello.running", True),
        ("orch.capsule.*.running", "orch.capsule.hello.stopped", False),
    ],
)
def test_topic_matches_table(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def test_topic_gate_allows_and_denies() -> None:
    gate = TopicGate(["orders.*", "audit.>"])
    assert gate.patterns == ("orders.*", "audit.>")
    for topic in ["orders.created", "audit.x", "audit.x.y.z"]:
        assert gate.allows(topic)
        gate.check(topic)
    for topic in ["orders", "orders.a.b", "audit", "other.x", "ORDERS.created"]:
        assert not gate.allows(topic)
        with pytest.raises(CapabilityDenied) as raised:
            gate.check(topic)
        assert str(raised.value) == f"capability denied: ipc_publish {topic}"
        assert (raised.value.capability, raised.value.target) == ("ipc_publish", topic)
    for bad in ["orders.*", "", "orders..x", "orders. x"]:
        assert not gate.allows(bad)
        with pytest.raises(GateError):
            gate.check(bad)


def test_topic_gate_denies_by_default_and_names_its_capability() -> None:
    gate = TopicGate([], capability="ipc_subscribe")
    assert not gate.allows("a")
    with pytest.raises(CapabilityDenied, match=r"^capability denied: ipc_subscribe a$") as raised:
        gate.check("a")
    assert raised.value.capability == "ipc_subscribe"


@pytest.mark.parametrize("bad", ["a.b*", "", "a..b", ">.a"])
def test_topic_gate_validates_patterns(bad: str) -> None:
    with pytest.raises(GateError):
        TopicGate(["ok", bad])


# --- topic properties -----------------------------------------------------------------------

token_chars = st.characters(exclude_categories=("Cs", "Cc", "Z"), exclude_characters=".*>")
tokens = st.text(token_chars, min_size=1, max_size=5).filter(lambda t: not any(c.isspace() for c in t))
token_lists = st.lists(tokens, min_size=1, max_size=8)
small_tokens = st.sampled_from(["a", "b", "c"])


def reference_match(pattern: str, topic: str) -> bool:
    """An independent oracle: the pattern as a regular expression over the topic."""
    pieces = pattern.split(".")
    regex = r"\.".join(
        "[^.]+" if p == "*" else ".+" if p == ">" and i == len(pieces) - 1 else re.escape(p)
        for i, p in enumerate(pieces)
    )
    return re.fullmatch(regex, topic) is not None


@FAST
@given(token_lists)
def test_concrete_topics_are_valid_and_match_themselves(parts: list[str]) -> None:
    topic = ".".join(parts)
    check_topic(topic)
    check_pattern(topic)
    assert topic_matches(topic, topic)
    assert TopicGate([topic]).allows(topic)


@FAST
@given(token_lists, token_lists)
def test_gt_matches_exactly_the_longer_topics_with_that_prefix(prefix: list[str], rest: list[str]) -> None:
    pattern = ".".join([*prefix, ">"])
    check_pattern(pattern)
    assert topic_matches(pattern, ".".join(prefix + rest))
    assert not topic_matches(pattern, ".".join(prefix))
    assert topic_matches(">", ".".join(rest))
    changed = [*prefix[:-1], prefix[-1] + "x", *rest]
    assert not topic_matches(pattern, ".".join(changed))


@FAST
@given(token_lists, st.data())
def test_star_replaces_exactly_one_token(parts: list[str], data: st.DataObject) -> None:
    stars = data.draw(st.lists(st.booleans(), min_size=len(parts), max_size=len(parts)))
    pattern = ".".join("*" if star else part for part, star in zip(parts, stars, strict=True))
    check_pattern(pattern)
    assert topic_matches(pattern, ".".join(parts))
    assert topic_matches(".".join(["*"] * len(parts)), ".".join(parts))
    assert not topic_matches(".".join(["*"] * (len(parts) + 1)), ".".join(parts))
    if len(parts) > 1:
        assert not topic_matches(".".join(["*"] * (len(parts) - 1)), ".".join(parts))


@FAST
@given(
    st.lists(st.one_of(small_tokens, st.just("*")), min_size=1, max_size=5),
    st.booleans(),
    st.lists(small_tokens, min_size=1, max_size=6),
)
def test_matching_agrees_with_a_regex_oracle(pattern_parts: list[str], gt: bool, topic_parts: list[str]) -> None:
    pattern = ".".join([*pattern_parts, ">"] if gt else pattern_parts)
    topic = ".".join(topic_parts)
    check_pattern(pattern)
    expected = reference_match(pattern, topic)
    assert topic_matches(pattern, topic) is expected
    # token-count rules: no '>' means equal counts; '>' needs more tokens than the prefix
    if not gt and len(topic_parts) != len(pattern_parts):
        assert not expected
    if gt and len(topic_parts) <= len(pattern_parts):
        assert not expected


@FAST
@given(st.text(max_size=20))
def test_any_text_is_either_a_valid_topic_or_a_gate_error(text: str) -> None:
    try:
        check_topic(text)
    except GateError:
        return
    parts = text.split(".")
    assert all(parts) and "*" not in text and ">" not in text
    assert not any(c.isspace() for c in text)


# --- paths: fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real workspace with grants, prefix siblings, and symlinks in and out, shared by the
    module's tests (which never change it; the few that add links do so beside it).

    ws/notes/a.txt, ws/notes/sub/, ws/notes-evil/x, ws/secret/s.txt, ws/public/, ws/out.txt
    ws/notes/to_outside -> ../../outside     (out of the workspace)
    ws/notes/to_etc -> /etc
    ws/notes/to_secret -> ../secret          (a sibling, inside the workspace)
    ws/notes/chain1 -> chain2 -> chain3 -> ../../outside (a chain out)
    ws/notes/in1 -> in2 -> sub                (a chain that stays in the grant)
    ws/notes/dangling_out -> ../../outside/new.txt
    ws/notes/dangling_in -> sub/new.txt
    ws/notes/loop1 <-> ws/notes/loop2
    ws/public/to_notes -> ../notes            (from outside the grant into it)
    """
    root = Path(os.path.realpath(tmp_path_factory.mktemp("tree")))
    ws = root / "ws"
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text("outside")
    for folder in ["notes/sub", "notes-evil", "secret", "public"]:
        (ws / folder).mkdir(parents=True)
    (ws / "notes" / "a.txt").write_text("a")
    (ws / "notes-evil" / "x").write_text("x")
    (ws / "secret" / "s.txt").write_text("s")
    (ws / "out.txt").write_text("o")
    links = {
        "notes/to_outside": "../../outside",
        "notes/to_etc": "/etc",
        "notes/to_secret": "../secret",
        "notes/chain1": "chain2",
        "notes/chain2": "chain3",
        "notes/chain3": "../../outside",
        "notes/in1": "in2",
        "notes/in2": "sub",
        "notes/dangling_out": "../../outside/new.txt",
        "notes/dangling_in": "sub/new.txt",
        "notes/loop1": "loop2",
        "notes/loop2": "loop1",
        "public/to_notes": "../notes",
    }
    for name, target in links.items():
        (ws / name).symlink_to(target)
    return ws


@pytest.fixture(scope="module")
def gate(tree: Path) -> PathGate:
    return PathGate(workspace=tree, read=["cwd://notes", "public/readme.md"], write=["./notes/sub"])


# --- paths: resolution ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "relative"),
    [
        ("cwd://notes/a.txt", "notes/a.txt"),
        ("notes/a.txt", "notes/a.txt"),
        ("./notes/a.txt", "notes/a.txt"),
        ("cwd://./notes/./a.txt", "notes/a.txt"),
        ("notes//a.txt", "notes/a.txt"),
        ("cwd://notes///sub//", "notes/sub"),
        ("notes/sub/", "notes/sub"),
        ("notes/new/deeper/file.txt", "notes/new/deeper/file.txt"),  # not existing yet
        ("cwd://", "."),
        ("cwd://.", "."),
        (".", "."),
        ("./", "."),
        ("~", "~"),  # no home expansion
        ("~/x", "~/x"),
        ("%2e%2e/etc/passwd", "%2e%2e/etc/passwd"),  # no percent-decoding
        ("..\\etc\\passwd", "..\\etc\\passwd"),  # a backslash is an ordinary character
        ("notes\\..\\..", "notes\\..\\.."),
        ("...", "..."),
        ("..a/b..", "..a/b.."),
        (" ../x", " ../x"),
        ("cwd:/notes", "cwd:/notes"),  # no '//': not a scheme, a folder named 'cwd:'
        ("C:/x", "C:/x"),
        ("notes/in1/f", "notes/sub/f"),  # a symlink chain that stays inside
        ("notes/to_secret/s.txt", "secret/s.txt"),  # inside the workspace: resolve allows it
        ("public/to_notes/a.txt", "notes/a.txt"),
        ("notes/dangling_in", "notes/sub/new.txt"),
        ("ünï/cødé/日本/🚀.txt", "ünï/cødé/日本/🚀.txt"),
    ],
)
def test_resolve_returns_the_real_path(gate: PathGate, tree: Path, path: str, relative: str) -> None:
    assert gate.resolve(path) == tree / relative
    assert gate.resolve(path).is_absolute()


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("..", "'..'"),
        ("../x", "'..'"),
        ("notes/..", "'..'"),
        ("notes/../notes/a.txt", "'..'"),  # even when it would stay inside
        ("notes/sub/../..", "'..'"),
        ("./..", "'..'"),
        ("cwd://..", "'..'"),
        ("cwd://../ws/notes", "'..'"),
        ("cwd://notes/../../etc", "'..'"),
        ("notes//..//..", "'..'"),
        ("/etc/passwd", "outside the workspace"),
        ("cwd:///etc/passwd", "outside the workspace"),
        ("//etc/passwd", "outside the workspace"),
        ("/", "outside the workspace"),
        ("notes/to_etc/passwd", "leaves the workspace"),
        ("notes/to_etc", "leaves the workspace"),
        ("notes/to_outside/secret.txt", "leaves the workspace"),
        ("notes/to_outside/new.txt", "leaves the workspace"),
        ("notes/chain1/secret.txt", "leaves the workspace"),
        ("notes/dangling_out", "leaves the workspace"),
        ("cwd://notes/dangling_out", "leaves the workspace"),
        ("notes/loop1", "symlink loop"),
        ("notes/loop1/x", "symlink loop"),
    ],
)
def test_resolve_denies_escapes(gate: PathGate, path: str, reason: str) -> None:
    for capability in ["fs_read", "fs_write"]:
        with pytest.raises(CapabilityDenied) as raised:
            gate.resolve(path, capability=capability)
        message = str(raised.value)
        assert message.startswith(f"capability denied: {capability} {path} (")
        assert reason in message
        assert (raised.value.capability, raised.value.target) == (capability, path)
    assert not gate.readable(path)
    assert not gate.writable(path)


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("", "path is empty"),
        ("notes/\x00a", "NUL byte"),
        ("\x00", "NUL byte"),
        ("a" * (MAX_PATH_BYTES + 1), "of 4097 bytes exceeds the limit of 4096 bytes"),
        ("notes/" + "é" * 2046, "of 4098 bytes"),
        ("file:///etc/passwd", "scheme 'file://'"),
        ("http://example.com/x", "scheme 'http://'"),
        ("s3://bucket/key", "scheme 's3://'"),
        ("CWD://notes", "scheme 'CWD://'"),
        ("a+b.c-d://x", "scheme"),
        ("notes/\udcff", "not valid UTF-8"),
    ],
)
def test_resolve_rejects_malformed_paths(gate: PathGate, path: str, rule: str) -> None:
    with pytest.raises(GateError, match=re.escape(rule)) as raised:
        gate.resolve(path)
    assert not isinstance(raised.value, CapabilityDenied)
    assert len(str(raised.value)) < 400  # huge inputs are truncated in the message
    assert not gate.readable(path)
    assert not gate.writable(path)


def test_path_of_exactly_the_limit_is_accepted(gate: PathGate, tree: Path) -> None:
    path = "notes/" + "a" * (MAX_PATH_BYTES - 6)
    assert gate.resolve(path) == tree / path


def test_absolute_paths_inside_the_workspace(gate: PathGate, tree: Path) -> None:
    assert gate.check_read(str(tree / "notes" / "a.txt")) == tree / "notes" / "a.txt"
    assert gate.resolve(str(tree)) == tree
    assert gate.resolve(f"cwd://{tree}/notes") == tree / "notes"
    with pytest.raises(CapabilityDenied, match="outside the workspace"):
        gate.resolve(str(tree.parent / "ws-evil" / "x"))  # a prefix sibling of the workspace
    with pytest.raises(CapabilityDenied, match="outside the workspace"):
        gate.resolve(str(tree.parent / "outside" / "secret.txt"))


def test_absolute_symlink_outside_pointing_in_is_denied(gate: PathGate, tree: Path) -> None:
    (tree.parent / "into_ws").symlink_to(tree)
    with pytest.raises(CapabilityDenied, match="outside the workspace"):
        gate.resolve(str(tree.parent / "into_ws" / "notes" / "a.txt"))


def test_symlinked_workspace_is_resolved_once(tree: Path) -> None:
    alias = tree.parent / "alias"
    alias.symlink_to(tree)
    gate = PathGate(workspace=alias, read=["notes"])
    assert gate.workspace == tree
    assert gate.read_grants == (tree / "notes",)
    assert gate.check_read("notes/a.txt") == tree / "notes" / "a.txt"
    assert gate.check_read(str(alias / "notes" / "a.txt")) == tree / "notes" / "a.txt"
    assert gate.check_read(str(tree / "notes" / "a.txt")) == tree / "notes" / "a.txt"
    assert not gate.readable(str(alias / "secret" / "s.txt"))
    alias.unlink()  # retargeting the alias later changes nothing
    alias.symlink_to(tree.parent / "outside")
    assert gate.check_read("notes/a.txt") == tree / "notes" / "a.txt"
    assert not gate.readable(str(alias / "secret.txt"))


def test_relative_workspace_is_made_absolute(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree.parent)
    gate = PathGate(workspace=Path("ws"), read=["notes"])
    assert gate.workspace == tree
    assert gate.check_read("notes/a.txt") == tree / "notes" / "a.txt"


# --- paths: grants --------------------------------------------------------------------------


# Denials found while walking below the grant say why (a path under no grant does not).
READ_DENIAL_REASONS = {"notes/to_secret/s.txt": " (a symlink leads out of the granted folder cwd://notes)"}


@pytest.mark.parametrize(
    ("path", "readable", "writable"),
    [
        ("cwd://notes", True, False),
        ("notes/a.txt", True, False),
        ("notes/sub", True, True),
        ("notes/sub/new.txt", True, True),
        ("cwd://notes/sub/deep/er.txt", True, True),
        # A chain inside the read grant, real location notes/sub/f. Not writable: the grant
        # is decided from the guest path, and notes/in1 is not under the write grant
        # notes/sub (tightened with the race-free sandbox; it was writable).
        ("notes/in1/f", True, False),
        ("notes/dangling_in", True, False),  # would create notes/sub/new.txt: same (was writable)
        ("public/to_notes/a.txt", False, False),  # outside the grant, really inside: denied (was readable)
        ("public/to_notes/sub/x", False, False),  # (was readable and writable)
        ("public/readme.md", True, False),  # a file grant covers that file
        ("public/readme.md/x", True, False),  # ...and (harmlessly) anything "below" it
        ("public/readme.mdx", False, False),
        ("public", False, False),
        ("notes/to_secret/s.txt", False, False),  # inside the grant, really a sibling: denied
        ("secret/s.txt", False, False),
        ("notes-evil/x", False, False),  # prefix sibling
        ("notes-evil", False, False),
        ("notesx", False, False),
        ("notes/subway", True, False),  # prefix sibling of the write grant
        ("out.txt", False, False),
        ("cwd://", False, False),
        (".", False, False),
    ],
)
def test_grants(gate: PathGate, tree: Path, path: str, readable: bool, writable: bool) -> None:
    assert gate.readable(path) is readable
    assert gate.writable(path) is writable
    if readable:
        assert gate.check_read(path) == gate.resolve(path)
    else:
        with pytest.raises(CapabilityDenied) as raised:
            gate.check_read(path)
        assert str(raised.value) == f"capability denied: fs_read {path}" + READ_DENIAL_REASONS.get(path, "")
        assert (raised.value.capability, raised.value.target) == ("fs_read", path)
    if writable:
        assert tree in gate.check_write(path).parents
    else:
        with pytest.raises(CapabilityDenied) as raised:
            gate.check_write(path)
        assert str(raised.value) == f"capability denied: fs_write {path}"
        assert (raised.value.capability, raised.value.target) == ("fs_write", path)


def test_write_grant_does_not_imply_read(tree: Path) -> None:
    gate = PathGate(workspace=tree, write=["notes"])
    assert gate.writable("notes/a.txt")
    assert not gate.readable("notes/a.txt")
    with pytest.raises(CapabilityDenied, match=r"^capability denied: fs_read notes/a.txt$"):
        gate.check_read("notes/a.txt")


def test_no_grants_deny_everything(tree: Path) -> None:
    gate = PathGate(workspace=tree)
    assert gate.resolve("notes/a.txt") == tree / "notes" / "a.txt"
    for path in ["notes/a.txt", "cwd://", "."]:
        assert not gate.readable(path)
        assert not gate.writable(path)


def test_workspace_grant_covers_everything_inside_but_no_escape(tree: Path) -> None:
    gate = PathGate(workspace=tree, read=["cwd://"], write=["."])
    assert gate.read_grants == gate.write_grants == (tree,)
    for path in ["cwd://", "secret/s.txt", "notes-evil/x", "notes/to_secret/s.txt", "new/file"]:
        assert gate.readable(path)
        assert gate.writable(path)
    for path in ["notes/to_etc/passwd", "notes/dangling_out", "/etc/passwd", "..", "notes/loop1"]:
        assert not gate.readable(path)
        assert not gate.writable(path)


def test_denied_path_with_control_characters_is_shown_escaped(gate: PathGate) -> None:
    with pytest.raises(CapabilityDenied) as raised:
        gate.check_read("secret/\nforged log line")
    assert str(raised.value) == "capability denied: fs_read 'secret/\\nforged log line'"
    assert raised.value.target == "secret/\nforged log line"


@pytest.mark.parametrize(
    ("grant", "expected"),
    [
        ("cwd://notes", "notes"),
        ("cwd://", "."),
        ("notes", "notes"),
        ("./notes/sub", "notes/sub"),
        ("notes/", "notes"),
        (".", "."),
        ("not/yet/there", "not/yet/there"),
        ("public/to_notes", "notes"),  # grants are real paths too
        ("notes/in1", "notes/sub"),
    ],
)
def test_grant_resolution(tree: Path, grant: str, expected: str) -> None:
    gate = PathGate(workspace=tree, read=[grant], write=[grant])
    assert gate.read_grants == gate.write_grants == (tree / expected,)


@pytest.mark.parametrize(
    ("grant", "rule"),
    [
        ("/etc", "is absolute"),
        ("cwd:///etc", "is absolute"),
        ("..", "contains '..'"),
        ("cwd://..", "contains '..'"),
        ("notes/../..", "contains '..'"),
        ("notes/../secret", "contains '..'"),
        ("", "is empty"),
        ("file://notes", "scheme"),
        ("notes\x00", "NUL byte"),
        ("notes/to_etc", "leaves the workspace"),
        ("notes/to_outside", "leaves the workspace"),
        ("notes/chain1/x", "leaves the workspace"),
        ("notes/dangling_out", "leaves the workspace"),
        ("notes/loop1", "leaves the workspace"),
    ],
)
def test_bad_grants_fail_at_construction(tree: Path, grant: str, rule: str) -> None:
    for kind in ["read", "write"]:
        with pytest.raises(GateError, match=re.escape(rule)) as raised:
            PathGate(workspace=tree, **{kind: ["notes", grant]})
        assert not isinstance(raised.value, CapabilityDenied)
        assert f"fs_{kind} grant" in str(raised.value)


# --- path properties ------------------------------------------------------------------------

name_chars = st.characters(exclude_categories=["Cs"], exclude_characters="/\x00")
names = st.text(name_chars, min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))
relative_parts = st.lists(names, min_size=1, max_size=6)
prefixes = st.sampled_from(["", "./", "cwd://", "cwd://./"])


@pytest.fixture(scope="module")
def prop_gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PathGate]:
    root = Path(os.path.realpath(tmp_path_factory.mktemp("props")))
    ws = root / "ws"
    for folder in ["notes/sub", "notes-evil", "other"]:
        (ws / folder).mkdir(parents=True)
    (ws / "other" / "to_notes").symlink_to("../notes")
    (ws / "notes" / "to_other").symlink_to("../other")
    yield PathGate(workspace=ws, read=["notes"], write=["cwd://notes/sub"])


@FAST
@given(relative_parts, prefixes)
def test_any_relative_path_under_a_grant_resolves_under_it(prop_gate: PathGate, parts: list[str], prefix: str) -> None:
    parts = [p for p in parts if p not in ("to_other",)]  # the only symlink leaving the grant
    path = prefix + "notes/" + "/".join(parts)
    if len(path.encode()) > MAX_PATH_BYTES:
        return
    expected = prop_gate.workspace.joinpath("notes", *parts)
    assert prop_gate.check_read(path) == expected
    in_sub = prop_gate.workspace.joinpath("notes", "sub", *parts)
    assert prop_gate.check_write(prefix + "notes/sub/" + "/".join(parts)) == in_sub


@FAST
@given(
    st.lists(st.one_of(names, st.just("..")), min_size=0, max_size=5),
    st.lists(st.one_of(names, st.just("..")), min_size=0, max_size=5),
    prefixes,
    st.sampled_from(["/", "//", "/./"]),
)
def test_any_path_with_a_dotdot_component_is_denied(
    prop_gate: PathGate, before: list[str], after: list[str], prefix: str, sep: str
) -> None:
    path = prefix + sep.join([*before, "..", *after])
    with pytest.raises(CapabilityDenied, match=r"^capability denied: fs_read .*'\.\.'"):
        prop_gate.check_read(path)
    with pytest.raises(CapabilityDenied, match=r"^capability denied: fs_write "):
        prop_gate.check_write(path)


@FAST
@given(st.text(name_chars, min_size=1, max_size=12), st.lists(names, max_size=3), prefixes)
def test_prefix_siblings_never_match(prop_gate: PathGate, suffix: str, rest: list[str], prefix: str) -> None:
    sibling = "notes" + suffix  # notes-evil, notesx, notes.bak, notes\..., ...
    path = prefix + "/".join([sibling, *rest])
    assert not prop_gate.readable(path)
    assert not prop_gate.writable(prefix + "/".join(["notes", "sub" + suffix, *rest]))


@FAST
@given(relative_parts)
def test_symlink_from_outside_into_a_grant_is_denied(prop_gate: PathGate, parts: list[str]) -> None:
    # The grant is decided from the guest path: other/to_notes is under no grant, although
    # its real location is (it was allowed before the race-free sandbox).
    assert not prop_gate.readable("other/to_notes/" + "/".join(parts))
    assert not prop_gate.readable("notes/to_other/" + "/".join(parts))


@FAST
@given(st.text(max_size=40))
def test_any_text_is_resolved_inside_the_workspace_or_refused(prop_gate: PathGate, text: str) -> None:
    try:
        real = prop_gate.resolve(text)
    except (GateError, CapabilityDenied):
        return
    assert real == prop_gate.workspace or prop_gate.workspace in real.parents
    assert ".." not in real.parts


# --- rate limiter ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_burst_then_refill() -> None:
    clock = FakeClock()
    limiter = RateLimiter(messages_per_second=4, bytes_per_second=1 << 20, clock=clock)
    assert [limiter.try_acquire(10) for _ in range(5)] == [True, True, True, True, False]
    clock.now += 0.25  # one message's worth
    assert limiter.try_acquire(10)
    assert not limiter.try_acquire(10)
    clock.now += 10  # refill caps at the burst
    assert [limiter.try_acquire(0) for _ in range(5)] == [True, True, True, True, False]


def test_rate_limiter_burst_seconds_scales_the_buckets() -> None:
    clock = FakeClock()
    limiter = RateLimiter(messages_per_second=2, bytes_per_second=1000, burst_seconds=2.5, clock=clock)
    assert (limiter.message_capacity, limiter.byte_capacity) == (5, 2500)
    assert sum(limiter.try_acquire(1) for _ in range(10)) == 5


def test_rate_limiter_bytes_limit_and_no_partial_consumption() -> None:
    clock = FakeClock()
    limiter = RateLimiter(messages_per_second=100, bytes_per_second=1000, clock=clock)
    assert limiter.try_acquire(600)
    assert not limiter.try_acquire(500)  # 400 bytes left: refused, nothing taken
    assert limiter.try_acquire(400)
    assert not limiter.try_acquire(1)
    clock.now += 0.5  # 500 bytes back
    assert not limiter.try_acquire(501)
    assert limiter.try_acquire(500)


def test_rate_limiter_bytes_refusal_takes_no_message() -> None:
    limiter = RateLimiter(messages_per_second=3, bytes_per_second=1000, clock=FakeClock())
    assert limiter.try_acquire(900)
    assert not any(limiter.try_acquire(500) for _ in range(5))
    assert limiter.try_acquire(50)
    assert limiter.try_acquire(50)  # the third message: the five refusals took none
    assert not limiter.try_acquire(0)


def test_rate_limiter_message_bucket_refusal_takes_no_bytes() -> None:
    clock = FakeClock()
    limiter = RateLimiter(messages_per_second=1, bytes_per_second=1000, clock=clock)
    assert limiter.try_acquire(100)
    assert not limiter.try_acquire(100)
    assert not limiter.try_acquire(100)
    clock.now += 1
    assert limiter.try_acquire(1000)  # bytes full again and none were taken by the refusals


def test_rate_limiter_check_messages() -> None:
    clock = FakeClock()
    limiter = RateLimiter(messages_per_second=1, bytes_per_second=1000, clock=clock)
    limiter.check(10)
    with pytest.raises(GateError) as raised:
        limiter.check(10)
    assert str(raised.value).startswith("publish rate limit exceeded: ")
    assert str(raised.value).endswith("(limit 1 messages/s, 1000 bytes/s)")
    clock.now += 5
    with pytest.raises(GateError, match=r"larger than the burst of 1000 bytes \(limit 1 messages/s"):
        limiter.check(1001)
    limiter.check(1000)


def test_rate_limiter_fractional_rates_and_a_clock_going_back() -> None:
    clock = FakeClock()
    limiter = RateLimiter(messages_per_second=0.5, bytes_per_second=1.5, clock=clock)
    assert limiter.message_capacity == 1  # always room for one message
    assert limiter.try_acquire(1)
    with pytest.raises(GateError, match=r"\(limit 0\.5 messages/s, 1\.5 bytes/s\)"):
        limiter.check(0)
    clock.now -= 50  # ignored, not a refill and not a debt
    assert not limiter.try_acquire(0)
    clock.now += 50 + 2
    assert limiter.try_acquire(1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"messages_per_second": 0},
        {"bytes_per_second": -1},
        {"burst_seconds": 0},
        {"messages_per_second": float("inf")},
        {"bytes_per_second": float("nan")},
    ],
)
def test_rate_limiter_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


def test_rate_limiter_rejects_negative_sizes() -> None:
    with pytest.raises(ValueError):
        RateLimiter(clock=FakeClock()).try_acquire(-1)


def test_rate_limiter_is_thread_safe() -> None:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to expose races
    try:
        for _ in range(5):
            limiter = RateLimiter(messages_per_second=1000, bytes_per_second=1 << 30, clock=FakeClock())
            granted: list[int] = []
            barrier = threading.Barrier(8)

            def worker(limiter: RateLimiter = limiter, granted: list[int] = granted) -> None:
                barrier.wait()
                granted.append(sum(limiter.try_acquire(1) for _ in range(300)))

            threads = [threading.Thread(target=worker) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert sum(granted) == 1000
    finally:
        sys.setswitchinterval(previous)


def test_rate_limiter_default_clock_is_monotonic() -> None:
    limiter = RateLimiter()
    assert (limiter.messages_per_second, limiter.bytes_per_second) == (1000, 8 << 20)
    assert limiter.try_acquire(MAX_PAYLOAD_BYTES)
