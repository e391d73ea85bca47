"""The race-free file airlocks (orchestrator/capsule/sandbox.py) and the paths no capsule
ever reaches (orchestrator/capsule/protected.py), through the airlocks and through wasm.

Races, with a real racing process: a subprocess swaps an entry between a real folder and a
symlink to a folder outside the workspace with `renameat2(RENAME_EXCHANGE)` in a tight
loop (so the entry always exists, alternately as one and the other), while this process
drives every file airlock (read, write, readdir, stat, exists) thousands of times. Counted:
reads that returned the outside file's content, writes that landed outside, listings that
showed an outside name, stats of the outside file, `exists` true for an outside-only file:
all must be zero. Each run goes on until the race has been seen from both sides (at least
one denial and one success), so a run that never raced cannot pass. Swapped: an entry
below the grant (symlink target absolute, then relative) and the granted folder itself,
the latter also under the example capsule `notes` running in wasm.

Protected paths, in the default layout (state dir `.orch` with the KV database, its WAL, the
module cache and the control socket inside the workspace; capsule folders and config.yaml
in it; `.git` folders): a capsule granted `fs_read`/`fs_write` on `cwd://` is denied by
every airlock, directly, in every spelling (`cwd://`, `./`, absolute, trailing slash,
other case), through relative symlinks and chains, and a listing never shows them. A grant
inside a protected path is refused when the gate is built; a protected path added later
(the runtime swaps a new value into its holder) denies every access from then on.

Walk rules (sandbox unit tests): `..` in a symlink target stays beneath the grant, absolute
targets are denied, loops end, long and non-UTF-8 names, a write through a symlink keeps
the link, a file grant, a grant folder replaced by a symlink.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.capsule import Capsule
from orchestrator.capsule.airlocks import (
    AUDIT_TOPIC,
    CallState,
    HostContext,
    astrid_fs_exists,
    astrid_fs_readdir,
    astrid_fs_stat,
    astrid_read_file,
    astrid_write_file,
)
from orchestrator.capsule.bus import EventBus
from orchestrator.capsule.gate import PathGate, RateLimiter, TopicGate
from orchestrator.capsule.protected import (
    BUILD_INPUT,
    CAPSULE_FOLDER,
    CONFIG_FILE,
    GIT,
    MODULE_CACHE,
    STATE_DIR,
    ProtectedArea,
    ProtectedHolder,
    ProtectedPaths,
)
from orchestrator.capsule.sandbox import MAX_SYMLINKS
from orchestrator.capsule.store import KVStore
from orchestrator.engine import WasmEngine
from orchestrator.errors import CapabilityDenied, CapsuleError, GateError
from tests.conftest import CAPSULES

INSIDE = b"inside"
OUTSIDE = b"OUTSIDE SECRET"  # a different size from INSIDE: a stat tells them apart


def call_state(gate: PathGate, bus: EventBus, capsule: str = "racer") -> CallState:
    context = HostContext(
        capsule=capsule,
        config={},
        paths=gate,
        publish=TopicGate([]),
        rate=RateLimiter(),
        bus=bus,
    )
    return CallState(host=context, function="tool")


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: file contents, link targets, folders, other kinds."""
    result: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                result[key] = "-> " + os.readlink(path)
            elif path.is_dir():
                result[key] = "dir"
            elif path.is_file():
                result[key] = path.read_bytes()
            else:
                result[key] = "special"
    return result


# ---- races ----------------------------------------------------------------------------------

RACER = textwrap.dedent(
    """
    import ctypes, os, signal, sys
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    folder, name, target = sys.argv[1:4]
    os.chdir(folder)
    os.symlink(target, name + ".swap")
    a, b = name.encode(), (name + ".swap").encode()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    swaps = 0
    while not stop:
        if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
            print("error", ctypes.get_errno(), flush=True)
            sys.exit(1)
        swaps += 1
    print(swaps, flush=True)
    """
)


def renameat2_available() -> bool:
    return hasattr(ctypes.CDLL(None), "renameat2")


class Racer:
    """A subprocess that swaps `folder/name` (a real folder) with a symlink to `target`."""

    def __init__(self, folder: Path, name: str, target: str) -> None:
        assert renameat2_available(), "the racer needs renameat2 (glibc 2.28+)"
        self.process = subprocess.Popen(
            [sys.executable, "-c", RACER, str(folder), name, target],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def stop(self) -> int:
        """Stop swapping; the number of swaps made."""
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, out
        return int(out.strip())


@dataclass
class Tally:
    """What the airlocks saw during a race, per operation and outcome."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, what: str) -> None:
        self.counts[what] += 1

    def __getitem__(self, what: str) -> int:
        return self.counts[what]


def race_workspace(root: Path) -> tuple[Path, Path]:
    """ws/notes/d/secret.txt (inside) and outside/secret.txt, outside/only-outside.txt."""
    ws, outside = root / "ws", root / "outside"
    (ws / "notes" / "d").mkdir(parents=True)
    (ws / "notes" / "d" / "secret.txt").write_bytes(INSIDE)
    outside.mkdir()
    (outside / "secret.txt").write_bytes(OUTSIDE)
    (outside / "only-outside.txt").write_bytes(OUTSIDE)
    return ws, outside


def hammer(call: CallState, base: str, *, rounds: int, tally: Tally) -> None:
    """Every file airlock on `base/...`, `rounds` times at least, until the race has been
    seen from both sides (a denial and a success) or a backstop of 50 times as many."""
    i = 0
    while i < rounds or not (tally["denied"] and tally["read ok"]):
        if i >= rounds * 50:
            break
        i += 1
        operations: list[tuple[str, Callable[[], bytes]]] = [
            ("read", lambda: astrid_read_file(call, f"{base}/secret.txt".encode())),
            ("write", lambda: astrid_write_file(call, f"{base}/w{i % 40}.txt".encode(), b"w")),
            ("mkdir", lambda: astrid_write_file(call, f"{base}/n{i % 20}/deep/x.txt".encode(), b"x")),
            ("readdir", lambda: astrid_fs_readdir(call, base.encode())),
            ("stat", lambda: astrid_fs_stat(call, f"{base}/secret.txt".encode())),
            ("exists", lambda: astrid_fs_exists(call, f"{base}/only-outside.txt".encode())),
        ]
        for what, operation in operations:
            try:
                result = operation()
            except CapabilityDenied:
                tally.add("denied")
                tally.add(f"{what} denied")
                continue
            if result[:1] != b"\x00":
                tally.add(f"{what} error")
                continue
            tally.add(f"{what} ok")
            payload = result[1:]
            if what == "read" and payload != INSIDE:
                tally.add("read OUTSIDE")
            if what == "readdir" and "only-outside.txt" in json.loads(payload):
                tally.add("readdir OUTSIDE")
            if what == "stat" and json.loads(payload)["size"] == len(OUTSIDE):
                tally.add("stat OUTSIDE")
            if what == "exists" and payload == b"true":
                tally.add("exists OUTSIDE")


def assert_race_lost(tally: Tally, swaps: int, outside: Path, before: dict[str, bytes | str]) -> None:
    landed = {name: value for name, value in snapshot(outside).items() if before.get(name) != value}
    assert tally["read OUTSIDE"] == 0, tally.counts
    assert tally["readdir OUTSIDE"] == 0, tally.counts
    assert tally["stat OUTSIDE"] == 0, tally.counts
    assert tally["exists OUTSIDE"] == 0, tally.counts
    assert landed == {}, f"{len(landed)} writes landed outside: {sorted(landed)[:10]}"
    # the race really happened: both sides were seen, many times over
    assert swaps > 100
    assert tally["denied"] > 0 and tally["read ok"] > 0, tally.counts
    assert tally["write ok"] + tally["mkdir ok"] > 0, tally.counts


@pytest.mark.parametrize("relative", [False, True], ids=["absolute-link", "relative-link"])
def test_racing_swap_below_the_grant_never_reaches_outside(tmp_path: Path, relative: bool) -> None:
    ws, outside = race_workspace(tmp_path)
    gate = PathGate(workspace=ws, read=["cwd://notes"], write=["cwd://notes"])
    bus = EventBus(history=16)
    call = call_state(gate, bus)
    before = snapshot(outside)
    target = "../../outside" if relative else str(outside)  # from ws/notes: both lead out
    racer = Racer(ws / "notes", "d", target)
    tally = Tally()
    try:
        hammer(call, "notes/d", rounds=1000, tally=tally)
    finally:
        swaps = racer.stop()
        bus.close()
    assert_race_lost(tally, swaps, outside, before)
    total = sum(tally[f"{op} {outcome}"] for op in ("read", "write") for outcome in ("ok", "denied", "error"))
    assert total >= 2000


def test_racing_swap_of_the_granted_folder_itself_never_reaches_outside(tmp_path: Path) -> None:
    ws, outside = race_workspace(tmp_path)
    gate = PathGate(workspace=ws, read=["cwd://notes/d"], write=["cwd://notes/d"])
    bus = EventBus(history=16)
    call = call_state(gate, bus)
    before = snapshot(outside)
    racer = Racer(ws / "notes", "d", str(outside))
    tally = Tally()
    try:
        hammer(call, "notes/d", rounds=1000, tally=tally)
    finally:
        swaps = racer.stop()
        bus.close()
    assert_race_lost(tally, swaps, outside, before)


# ---- protected paths: the default layout ----------------------------------------------------


@dataclass
class Layout:
    root: Path
    ws: Path
    protected: ProtectedPaths
    bus: EventBus

    def gate(self, **grants: list[str]) -> PathGate:
        read = grants.get("read", ["cwd://"])
        write = grants.get("write", ["cwd://"])
        return PathGate(workspace=self.ws, read=read, write=write, protected=self.protected)

    def call(self, gate: PathGate | None = None) -> CallState:
        return call_state(gate or self.gate(), self.bus, capsule="spy")


def build_layout(root: Path) -> tuple[Path, ProtectedPaths]:
    """The default layout, everything inside the workspace:

    ws/config.yaml, ws/.orch/{kv.sqlite3, kv.sqlite3-wal, applied.json, orch.sock (a unix
    socket), cache/<artifact>}, ws/.git/{config, hooks/pre-commit}, ws/capsules/{build.mjs,
    spy/{Capsule.toml, spy.wasm, assembly/index.ts}, other/Capsule.toml}, ws/sub/.git (a
    worktree's git file), ws/notes/a.txt, and symlinks in notes leading to each of them.
    The build script capsules/build.mjs (run by the capsules' build commands) is a build input.
    """
    ws = root / "ws"
    files = {
        "config.yaml": "version: 1\n",
        ".orch/kv.sqlite3": "SQLite format 3",
        ".orch/kv.sqlite3-wal": "wal",
        ".orch/applied.json": "{}",
        ".orch/cache/abcd.cwasm": "native code",
        ".git/config": "[core]",
        ".git/hooks/pre-commit": "#!/bin/sh",
        "capsules/build.mjs": "// build",
        "capsules/spy/Capsule.toml": "[package]",
        "capsules/spy/spy.wasm": "\0asm",
        "capsules/spy/assembly/index.ts": "export function f(): i32 { return 0 }",
        "capsules/other/Capsule.toml": "[package]",
        "sub/.git": "gitdir: ../.git",
        "sub/s.txt": "s",
        "notes/a.txt": "a",
    }
    for name, text in files.items():
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(text)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(ws / ".orch" / "orch.sock"))
    links = {
        "to_orch": "../.orch",
        "to_kv": "../.orch/kv.sqlite3",
        "to_cache": "../.orch/cache",
        "to_config": "../config.yaml",
        "to_capsule": "../capsules/spy",
        "to_git": "../.git",
        "to_sub_git": "../sub/.git",
        "chain": "to_orch",
        "up": "..",
    }
    for name, target in links.items():
        (ws / "notes" / name).symlink_to(target)
    protected = ProtectedPaths.build(
        state_dir=ws / ".orch",
        cache_dir=ws / ".orch" / "cache",
        config_file=ws / "config.yaml",
        capsule_folders=[ws / "capsules" / "spy", ws / "capsules" / "other"],
        build_inputs=[ws / "capsules" / "build.mjs"],  # `command = "node ../build.mjs spy"`
    )
    return ws, protected


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    ws, protected = build_layout(tmp_path)
    bus = EventBus()
    try:
        yield Layout(root=tmp_path, ws=ws, protected=protected, bus=bus)
    finally:
        bus.close()


# (guest path, the reason in the denial); ABS is the workspace's absolute path
PROTECTED_PATHS = [
    (".orch", STATE_DIR),
    (".orch/", STATE_DIR),
    ("cwd://.orch/kv.sqlite3", STATE_DIR),
    ("./.orch/kv.sqlite3-wal", STATE_DIR),
    (".//.orch/./orch.sock", STATE_DIR),
    (".orch/applied.json", STATE_DIR),
    (".orch/cache/abcd.cwasm", STATE_DIR),
    (".orch/cache/planted.cwasm", STATE_DIR),
    (".orch/new-folder/x", STATE_DIR),
    ("ABS/.orch/kv.sqlite3", STATE_DIR),
    ("cwd://ABS/.orch/kv.sqlite3", STATE_DIR),
    (".ORCH/kv.sqlite3", STATE_DIR),
    (".Orch", STATE_DIR),
    ("config.yaml", CONFIG_FILE),
    ("CONFIG.yaml", CONFIG_FILE),
    ("ABS/config.yaml", CONFIG_FILE),
    ("capsules/spy", CAPSULE_FOLDER),
    ("capsules/spy/Capsule.toml", CAPSULE_FOLDER),
    ("capsules/spy/spy.wasm", CAPSULE_FOLDER),
    ("capsules/spy/assembly/index.ts", CAPSULE_FOLDER),
    ("capsules/spy/new.ts", CAPSULE_FOLDER),
    ("capsules/other/Capsule.toml", CAPSULE_FOLDER),
    ("capsules/build.mjs", BUILD_INPUT),
    (".git", GIT),
    (".git/hooks/pre-commit", GIT),
    (".git/hooks/post-checkout", GIT),
    (".GIT/config", GIT),
    ("sub/.git", GIT),
    ("notes/.git/hooks/x", GIT),  # a new git folder anywhere
    ("notes/to_orch", STATE_DIR),
    ("notes/to_orch/kv.sqlite3", STATE_DIR),
    ("notes/to_kv", STATE_DIR),
    ("notes/to_cache/abcd.cwasm", STATE_DIR),
    ("notes/chain/kv.sqlite3", STATE_DIR),
    ("notes/to_config", CONFIG_FILE),
    ("notes/to_capsule/Capsule.toml", CAPSULE_FOLDER),
    ("notes/to_git/hooks/pre-commit", GIT),
    ("notes/to_sub_git", GIT),
    ("notes/up/config.yaml", CONFIG_FILE),
    ("notes/up/.orch/kv.sqlite3", STATE_DIR),
]

AIRLOCKS: list[tuple[str, Callable[[CallState, bytes], bytes]]] = [
    ("fs_read", astrid_read_file),
    ("fs_read", astrid_fs_readdir),
    ("fs_read", astrid_fs_stat),
    ("fs_read", astrid_fs_exists),
    ("fs_write", lambda call, path: astrid_write_file(call, path, b"pwned")),
]


@pytest.mark.parametrize(("path", "reason"), PROTECTED_PATHS)
@pytest.mark.parametrize(
    ("capability", "airlock"), AIRLOCKS, ids=["read_file", "readdir", "stat", "exists", "write_file"]
)
def test_protected_paths_are_denied_by_every_airlock_whatever_the_grant(
    layout: Layout,
    path: str,
    reason: str,
    capability: str,
    airlock: Callable[[CallState, bytes], bytes],
) -> None:
    target = path.replace("ABS", str(layout.ws))
    before = snapshot(layout.root)
    call = layout.call()
    with pytest.raises(CapabilityDenied) as raised:
        airlock(call, target.encode())
    assert str(raised.value) == f"capability denied: {capability} {target} ({reason})"
    assert (raised.value.capability, raised.value.target) == (capability, target)
    assert [e.payload["target"] for e in layout.bus.history(AUDIT_TOPIC)] == [target]
    assert snapshot(layout.root) == before


def test_the_denial_message_of_the_brief(layout: Layout) -> None:
    with pytest.raises(CapabilityDenied) as raised:
        astrid_read_file(layout.call(), b"cwd://.orch/kv.sqlite3")
    assert str(raised.value) == (
        "capability denied: fs_read cwd://.orch/kv.sqlite3 "
        "(the orchestrator's state dir is never reachable by capsules)"
    )


def test_readdir_never_lists_protected_entries(layout: Layout) -> None:
    call = layout.call()

    def names(path: str) -> list[str]:
        result = astrid_fs_readdir(call, path.encode())
        assert result[:1] == b"\x00", result
        return list(json.loads(result[1:]))

    visible = ["capsules", "notes", "sub"]
    assert sorted(os.listdir(layout.ws)) == [".git", ".orch", "capsules", "config.yaml", "notes", "sub"]
    for spelling in ["cwd://", ".", "./", str(layout.ws), "notes/up", "notes/up/"]:
        assert names(spelling) == visible, spelling
    (layout.ws / "capsules" / "README.md").write_text("r")
    assert names("capsules") == ["README.md"]  # both capsule folders and the build script hidden
    assert names("sub") == ["s.txt"]  # the worktree's .git file hidden
    (layout.ws / "notes" / ".GIT").mkdir()  # any case
    assert ".GIT" not in names("notes")
    assert {"a.txt", "to_orch", "to_kv"} <= set(names("notes"))  # links are names, not followed
    assert layout.bus.history(AUDIT_TOPIC) == []


def test_unprotected_files_stay_usable_with_a_workspace_grant(layout: Layout) -> None:
    call = layout.call()
    assert astrid_read_file(call, b"notes/a.txt") == b"\x00a"
    assert astrid_write_file(call, b"notes/new/b.txt", b"b") == b"\x00"
    assert (layout.ws / "notes" / "new" / "b.txt").read_bytes() == b"b"
    assert astrid_read_file(call, b"sub/s.txt") == b"\x00s"
    assert astrid_fs_exists(call, b"capsules") == b"\x00true"
    assert astrid_read_file(call, b".orchestra") == b"\x01not found: .orchestra"  # a prefix sibling
    assert astrid_read_file(call, b"capsules/spy-other") == b"\x01not found: capsules/spy-other"
    assert astrid_write_file(call, b"config.yaml.bak", b"c") == b"\x00"
    assert astrid_write_file(call, b"notes/.gitignore", b"*") == b"\x00"  # only `.git` itself
    assert layout.bus.history(AUDIT_TOPIC) == []


@pytest.mark.parametrize(
    ("grant", "reason"),
    [
        ("cwd://.orch", STATE_DIR),
        (".orch/cache", STATE_DIR),
        (".ORCH", STATE_DIR),
        ("config.yaml", CONFIG_FILE),
        ("capsules/spy", CAPSULE_FOLDER),
        ("./capsules/spy/assembly", CAPSULE_FOLDER),
        ("capsules/other/", CAPSULE_FOLDER),
        (".git", GIT),
        (".git/hooks", GIT),
        ("sub/.git", GIT),
        ("notes/.git", GIT),
        ("notes/to_orch", STATE_DIR),  # a symlink whose real path is protected
        ("notes/to_capsule", CAPSULE_FOLDER),
    ],
)
def test_a_grant_inside_a_protected_path_is_refused_when_the_gate_is_built(
    layout: Layout, grant: str, reason: str
) -> None:
    for kind in ("read", "write"):
        with pytest.raises(GateError) as raised:
            PathGate(workspace=layout.ws, protected=layout.protected, **{kind: ["notes", grant]})
        assert not isinstance(raised.value, CapabilityDenied)
        message = str(raised.value)
        assert message.startswith(f"fs_{kind} grant {grant} is refused: {reason}")
        assert message.endswith("remove it from [capabilities] in Capsule.toml")


def test_a_protected_path_added_later_denies_every_access_from_then_on(layout: Layout) -> None:
    """The runtime swaps a new immutable value into its holder; gates see it at once."""
    (layout.ws / "data").mkdir()
    (layout.ws / "data" / "d.txt").write_text("d")
    holder = ProtectedHolder(layout.protected)
    gate = PathGate(workspace=layout.ws, read=["cwd://data"], write=["cwd://data"], protected=holder)
    call = layout.call(gate)
    assert astrid_read_file(call, b"data/d.txt") == b"\x00d"
    holder.current = ProtectedPaths.build(capsule_folders=[layout.ws / "data"])  # a capsule deployed there
    assert gate.protected is holder.current
    for airlock in (astrid_read_file, astrid_fs_readdir, astrid_fs_stat, astrid_fs_exists):
        with pytest.raises(CapabilityDenied, match="capsule's folder"):
            airlock(call, b"data/d.txt")
    with pytest.raises(CapabilityDenied, match="capsule's folder"):
        astrid_write_file(call, b"data/new.txt", b"x")
    assert not (layout.ws / "data" / "new.txt").exists()
    holder.current = layout.protected  # undeployed again
    assert astrid_read_file(call, b"data/d.txt") == b"\x00d"


def test_a_workspace_inside_a_protected_path_denies_everything(layout: Layout) -> None:
    (layout.ws / "notes" / "inner").mkdir()
    holder = ProtectedHolder()
    gate = PathGate(workspace=layout.ws / "notes", read=["cwd://"], protected=holder)
    assert gate.readable("a.txt")
    holder.current = ProtectedPaths.build(capsule_folders=[layout.ws])
    with pytest.raises(CapabilityDenied, match="capsule's folder"):
        astrid_fs_readdir(layout.call(gate), b"cwd://")


def test_a_state_dir_given_through_a_symlink_is_protected_in_both_forms(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "state").mkdir(parents=True)
    (ws / "state" / "kv.sqlite3").write_text("kv")
    (ws / ".orch").symlink_to("state")
    protected = ProtectedPaths.build(state_dir=ws / ".orch")
    assert {area.path for area in protected.areas} == {ws / ".orch", ws / "state"}
    gate = PathGate(workspace=ws, read=["cwd://"], protected=protected)
    for path in ["state/kv.sqlite3", ".orch/kv.sqlite3", "cwd://state"]:
        assert not gate.readable(path)
        with pytest.raises(CapabilityDenied, match="state dir"):
            gate.check_read(path)


def test_a_module_cache_elsewhere_in_the_workspace_is_protected(tmp_path: Path) -> None:
    (tmp_path / "build" / "modules").mkdir(parents=True)
    protected = ProtectedPaths.build(state_dir=tmp_path / ".orch", cache_dir=tmp_path / "build" / "modules")
    gate = PathGate(workspace=tmp_path, write=["cwd://build"], protected=protected)
    assert gate.writable("build/other.o")
    with pytest.raises(CapabilityDenied) as raised:
        gate.check_write("build/modules/planted.cwasm")
    assert str(raised.value).endswith(f"({MODULE_CACHE})")


def test_protected_paths_value() -> None:
    empty = ProtectedPaths()
    assert empty.current is empty  # a fixed value stands where a holder is expected
    assert empty.name(".git") == GIT and empty.name(".Git") == GIT
    assert ProtectedPaths(names=()).name(".git") is None
    assert ProtectedPaths.build(git=False).names == ()
    custom = ProtectedPaths.build(extra=[ProtectedArea(Path("/srv/secrets"), "secrets stay put")])
    assert custom.reason(Path("/srv/secrets/a/b"), workspace=Path("/srv")) == "secrets stay put"
    assert custom.reason(Path("/srv/secrets-evil/a"), workspace=Path("/srv")) is None
    assert custom.reason(Path("/srv/app/.git/x"), workspace=Path("/srv/app")) == GIT
    assert custom.reason(Path("/home/.git/ws/x"), workspace=Path("/home/.git/ws")) is None  # above the workspace
    assert ProtectedPaths.build(state_dir=Path("/a/.orch")) == ProtectedPaths.build(state_dir=Path("/a/.orch"))
    with pytest.raises(ValueError, match="not absolute"):
        ProtectedPaths(areas=(ProtectedArea(Path("relative"), "x"),))
    holder = ProtectedHolder()
    assert holder.current == ProtectedPaths()


def test_default_gate_protects_git_folders(tmp_path: Path) -> None:
    (tmp_path / ".git" / "hooks").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("a")
    gate = PathGate(workspace=tmp_path, read=["cwd://"], write=["cwd://"])
    assert gate.readable("a.txt")
    assert not gate.writable(".git/hooks/pre-commit")
    with pytest.raises(CapabilityDenied, match="hooks run code"):
        gate.check_write("cwd://.git/hooks/pre-commit")


# ---- walk rules -----------------------------------------------------------------------------


@pytest.fixture
def walk_ws(tmp_path: Path) -> Path:
    """ws/g (the grant) with sub/, f.txt, and links; ws/h (a sibling); outside/o.txt.

    g/up_in -> sub/../f.txt    (`..` that stays beneath the grant)
    g/sub/back -> ../f.txt     (climbs to the grant's root, not above)
    g/out -> ../h              (climbs above the grant, into the workspace)
    g/reenter -> ../g/f.txt    (climbs above the grant and comes back)
    g/abs_in -> <ws>/g/f.txt   (absolute, even though inside)
    g/self -> .                g/dot_chain -> self/self/f.txt
    """
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    (ws / "g" / "sub").mkdir(parents=True)
    (ws / "h").mkdir()
    outside.mkdir()
    (ws / "g" / "f.txt").write_bytes(b"f")
    (ws / "h" / "h.txt").write_bytes(b"h")
    (outside / "o.txt").write_bytes(b"o")
    links = {
        "g/up_in": "sub/../f.txt",
        "g/sub/back": "../f.txt",
        "g/out": "../h",
        "g/abs_in": str(ws / "g" / "f.txt"),
        "g/reenter": "../g/f.txt",
        "g/self": ".",
        "g/dot_chain": "self/self/f.txt",
    }
    for name, target in links.items():
        (ws / name).symlink_to(target)
    return ws


def test_dotdot_in_a_link_target_stays_beneath_the_grant(walk_ws: Path) -> None:
    bus = EventBus()
    call = call_state(PathGate(workspace=walk_ws, read=["g"], write=["g"]), bus)
    for path in [b"g/up_in", b"g/sub/back", b"g/dot_chain", b"g/self/self/f.txt"]:
        assert astrid_read_file(call, path) == b"\x00f", path
    assert astrid_write_file(call, b"g/sub/back", b"F") == b"\x00"
    assert (walk_ws / "g" / "f.txt").read_bytes() == b"F"
    assert (walk_ws / "g" / "sub" / "back").is_symlink()  # the link stays
    for path, reason in [
        ("g/out/h.txt", "a symlink leads out of the granted folder g"),
        ("g/reenter", "a symlink leads out of the granted folder g"),
        ("g/abs_in", "symlink cwd://g/abs_in has an absolute target: only relative symlinks are followed"),
    ]:
        with pytest.raises(CapabilityDenied) as raised:
            astrid_read_file(call, path.encode())
        assert str(raised.value) == f"capability denied: fs_read {path} ({reason})"
    bus.close()


def test_a_workspace_grant_follows_links_anywhere_inside_it(walk_ws: Path) -> None:
    gate = PathGate(workspace=walk_ws, read=["cwd://"])
    assert gate.check_read("g/out/h.txt") == walk_ws / "h" / "h.txt"
    with pytest.raises(CapabilityDenied, match="has an absolute target"):
        gate.check_read("g/abs_in")


def test_a_grant_replaced_by_a_symlink_is_denied(walk_ws: Path) -> None:
    gate = PathGate(workspace=walk_ws, read=["g/sub"])
    (walk_ws / "g" / "sub" / "s.txt").write_bytes(b"s")
    assert gate.check_read("g/sub/s.txt") == walk_ws / "g" / "sub" / "s.txt"
    os.rename(walk_ws / "g", walk_ws / "g-moved")
    (walk_ws / "g").symlink_to("g-moved")  # same content, but no longer the folder granted
    with pytest.raises(CapabilityDenied) as raised:
        gate.check_read("g/sub/s.txt")
    assert "cwd://g, part of the granted folder g/sub, has been replaced by a symlink" in str(raised.value)


def test_a_file_grant(walk_ws: Path) -> None:
    bus = EventBus()
    call = call_state(PathGate(workspace=walk_ws, read=["g/f.txt"], write=["g/f.txt"]), bus)
    assert astrid_read_file(call, b"g/f.txt") == b"\x00f"
    assert astrid_write_file(call, b"cwd://g/f.txt", b"new") == b"\x00"
    assert astrid_read_file(call, b"g/f.txt") == b"\x00new"
    assert astrid_read_file(call, b"g/f.txt/x") == b"\x01not a directory: g/f.txt/x"
    with pytest.raises(CapabilityDenied):
        astrid_read_file(call, b"g/up_in")
    bus.close()


def test_a_symlink_loop_ends(walk_ws: Path) -> None:
    (walk_ws / "g" / "loop_a").symlink_to("loop_b")
    (walk_ws / "g" / "loop_b").symlink_to("loop_a")
    (walk_ws / "g" / "deep").symlink_to("self/" * 30 + "self")  # 31 links on one path: fine
    gate = PathGate(workspace=walk_ws, read=["g"])
    with pytest.raises(CapabilityDenied, match=f"symlink loop \\(more than {MAX_SYMLINKS} symlinks\\)"):
        gate.check_read("g/loop_a")
    assert gate.check_read("g/deep/f.txt") == walk_ws / "g" / "f.txt"


def test_long_and_non_utf8_names(walk_ws: Path) -> None:
    bus = EventBus()
    call = call_state(PathGate(workspace=walk_ws, read=["g"], write=["g"]), bus)
    longest = "é" * 127  # 254 bytes: the temp file's name must still fit in 255
    assert astrid_write_file(call, f"g/{longest}".encode(), b"long") == b"\x00"
    assert (walk_ws / "g" / longest).read_bytes() == b"long"
    assert astrid_write_file(call, f"g/{longest}".encode(), b"again") == b"\x00"
    assert [n for n in os.listdir(walk_ws / "g") if n.endswith(".tmp")] == []
    raw = os.fsencode(walk_ws / "g") + b"/caf\xe9"
    with open(raw, "wb") as handle:
        handle.write(b"latin-1")
    listed = json.loads(astrid_fs_readdir(call, b"g")[1:])
    assert "caf\ufffd" in listed
    bus.close()


def test_reading_a_fifo_through_a_link_does_not_hang(walk_ws: Path) -> None:
    os.mkfifo(walk_ws / "g" / "pipe")
    (walk_ws / "g" / "to_pipe").symlink_to("pipe")
    bus = EventBus()
    call = call_state(PathGate(workspace=walk_ws, read=["g"]), bus)
    assert astrid_read_file(call, b"g/to_pipe") == b"\x01not a regular file: g/to_pipe"
    info = json.loads(astrid_fs_stat(call, b"g/to_pipe")[1:])
    assert info["is_dir"] is False and info["size"] == 0
    bus.close()


def test_no_descriptor_is_left_open(layout: Layout) -> None:
    """Successes, errors and denials (found at every depth of the walk) close every
    descriptor they opened."""
    call = layout.call()
    paths = [b"notes/a.txt", b"notes/missing", b"notes/a.txt/x", b"notes/up/notes/a.txt", b"notes/chain/x", b"cwd://"]
    fds = Path("/dev/fd")

    def every_airlock() -> None:
        for path in paths:
            for _, airlock in AIRLOCKS[:4]:
                with contextlib.suppress(CapabilityDenied):
                    airlock(call, path)
        assert astrid_write_file(call, b"notes/deep/er/f.txt", b"f") == b"\x00"

    every_airlock()  # warm up: imports, the bus
    before = len(list(fds.iterdir()))
    for _ in range(20):
        every_airlock()
    assert len(list(fds.iterdir())) == before


# ---- through wasm ---------------------------------------------------------------------------

SPY_WAT = """
(module
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/user" "astrid_read_file" (func $read (param i64) (result i64)))
  (import "extism:host/user" "astrid_write_file" (func $write (param i64 i64) (result i64)))
  (import "extism:host/user" "astrid_fs_readdir" (func $readdir (param i64) (result i64)))
  (import "extism:host/user" "astrid_fs_stat" (func $stat (param i64) (result i64)))
  (import "extism:host/user" "astrid_fs_exists" (func $exists (param i64) (result i64)))
  (memory 1)
  (data (i32.const 0) "pwned")
  ;; the input is a JSON string: copy it without its quotes into a kernel block
  (func $path (result i64) (local $n i64) (local $p i64) (local $i i64)
    (local.set $n (i64.sub (call $input_length) (i64.const 2)))
    (local.set $p (call $alloc (local.get $n)))
    (block $done
      (loop $next
        (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
        (call $store_u8 (i64.add (local.get $p) (local.get $i))
          (call $input_load_u8 (i64.add (local.get $i) (i64.const 1))))
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br $next)))
    (local.get $p))
  (func $pwned (result i64) (local $p i64) (local $i i32)
    (local.set $p (call $alloc (i64.const 5)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (i32.const 5)))
        (call $store_u8 (i64.add (local.get $p) (i64.extend_i32_u (local.get $i)))
          (i32.load8_u (local.get $i)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $p))
  (func $out (param $p i64) (call $output_set (local.get $p) (call $length (local.get $p))))
  (func (export "read") (result i32) (call $out (call $read (call $path))) (i32.const 0))
  (func (export "write") (result i32) (call $out (call $write (call $path) (call $pwned))) (i32.const 0))
  (func (export "readdir") (result i32) (call $out (call $readdir (call $path))) (i32.const 0))
  (func (export "stat") (result i32) (call $out (call $stat (call $path))) (i32.const 0))
  (func (export "exists") (result i32) (call $out (call $exists (call $path))) (i32.const 0))
)
"""

SPY_TOML = """[package]
name = "spy"
version = "0.1.0"
description = "tries to reach the orchestrator's own files"

[[component]]
id = "main"
file = "spy.wat"

[capabilities]
kv = true
fs_read = ["cwd://"]
fs_write = ["cwd://"]
""" + "".join(
    f'\n[[tool]]\nname = "{tool}"\ninput_schema = {{ type = "string" }}\n'
    for tool in ("read", "write", "readdir", "stat", "exists")
)


@dataclass
class WasmLayout:
    ws: Path
    capsule: Capsule
    bus: EventBus
    store: KVStore


@pytest.fixture
async def spy(tmp_path: Path) -> AsyncIterator[WasmLayout]:
    """The spy capsule in its folder in the workspace, with the real KV database and module
    cache in `.orch`, wired to a gate protecting the default layout."""
    ws, protected = build_layout(tmp_path)
    folder = ws / "capsules" / "spy"
    (folder / "spy.wat").write_text(SPY_WAT)
    (folder / "Capsule.toml").write_text(SPY_TOML)
    (ws / ".orch" / "kv.sqlite3").unlink()
    engine = WasmEngine(cache_dir=ws / ".orch" / "cache")
    bus = EventBus()
    store = await KVStore.open(ws / ".orch" / "kv.sqlite3")
    await store.set("other", "secret", b"the other capsule's secret")
    capsule = await Capsule.load(folder, engine=engine, bus=bus, store=store, workspace=ws)
    # What the lead wires through Capsule.launch: the runtime's protected paths.
    caps = capsule.manifest.capabilities
    capsule.host.paths = PathGate(workspace=ws, read=caps.fs_read, write=caps.fs_write, protected=protected)
    try:
        yield WasmLayout(ws=ws, capsule=capsule, bus=bus, store=store)
    finally:
        await capsule.close()
        await store.close()
        bus.close()
        engine.close()


async def test_wasm_capsule_cannot_reach_the_orchestrators_files(spy: WasmLayout) -> None:
    capsule, ws = spy.capsule, spy.ws
    assert any((ws / ".orch" / "cache").iterdir())  # the module cache really is there
    before = {name: value for name, value in snapshot(ws).items() if not name.startswith(".orch/kv.sqlite3")}
    attempts = [
        ("read", ".orch/kv.sqlite3", STATE_DIR),
        ("read", ".orch/kv.sqlite3-wal", STATE_DIR),
        ("write", ".orch/cache/planted.cwasm", STATE_DIR),
        ("write", ".orch/orch.sock", STATE_DIR),
        ("write", "capsules/spy/Capsule.toml", CAPSULE_FOLDER),
        ("write", "capsules/other/Capsule.toml", CAPSULE_FOLDER),
        ("read", "capsules/spy/spy.wat", CAPSULE_FOLDER),
        ("write", "config.yaml", CONFIG_FILE),
        ("write", ".git/hooks/pre-commit", GIT),
        ("stat", "notes/to_kv", STATE_DIR),
        ("exists", "notes/to_cache", STATE_DIR),
        ("readdir", "notes/to_orch", STATE_DIR),
        ("write", "notes/to_config", CONFIG_FILE),
    ]
    for tool, path, reason in attempts:
        with pytest.raises(CapabilityDenied) as raised:
            await capsule.call_tool(tool, path)
        capability = "fs_write" if tool == "write" else "fs_read"
        assert str(raised.value) == f"capability denied: {capability} {path} ({reason})", tool
    audits = [(e.payload["function"], e.payload["target"]) for e in spy.bus.history(AUDIT_TOPIC)]
    assert audits == [(tool, path) for tool, path, _ in attempts]
    listing = (await capsule.call_tool("readdir", "cwd://")).output
    assert json.loads(listing[1:]) == ["capsules", "notes", "sub"]
    assert (await capsule.call_tool("write", "notes/mine.txt")).output == b"\x00"
    assert (await capsule.call_tool("read", "notes/mine.txt")).output == b"\x00pwned"
    after = {name: value for name, value in snapshot(ws).items() if not name.startswith(".orch/kv.sqlite3")}
    assert after.pop("notes/mine.txt") == b"pwned"
    assert after == before
    assert await spy.store.get("other", "secret") == b"the other capsule's secret"


def test_advisory_answers_for_a_missing_workspace(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    gate = PathGate(workspace=ws, read=["cwd://"])
    ws.rmdir()  # gone after the gate was built: answers by path still come, nothing opens
    assert gate.check_read("notes/a.txt") == ws / "notes" / "a.txt"
    with pytest.raises(CapabilityDenied, match="hooks run code"):
        gate.check_read("notes/.git/config")  # the rest, taken literally, is still guarded
    bus = EventBus()
    assert astrid_read_file(call_state(gate, bus), b"notes/a.txt") == b"\x01not found: notes/a.txt"
    bus.close()


async def test_wasm_notes_capsule_racing_a_swapped_grant_never_reaches_outside(tmp_path: Path) -> None:
    """The example capsule `notes` (AssemblyScript, the guest SDK) reads and writes under
    cwd://notes while a subprocess swaps the workspace's `notes` folder with a symlink to a
    folder outside, as fast as it can."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    (ws / "notes").mkdir(parents=True)
    (ws / "notes" / "secret.txt").write_bytes(INSIDE)
    outside.mkdir()
    (outside / "secret.txt").write_bytes(OUTSIDE)
    before = snapshot(outside)
    engine = WasmEngine()
    bus = EventBus(history=16)
    capsule = await Capsule.load(CAPSULES / "notes", engine=engine, bus=bus, store=None, workspace=ws)
    racer = Racer(ws, "notes", str(outside))
    tally = Tally()
    try:
        i = 0
        while i < 400 or not (tally["denied"] and tally["read ok"]):
            assert i < 20_000, tally.counts
            i += 1
            for tool, arguments in [
                ("read", {"name": "secret.txt"}),
                ("write", {"name": f"w{i % 30}.txt", "text": "from wasm"}),
            ]:
                try:
                    result = await capsule.call_tool(tool, arguments)
                except CapabilityDenied:
                    tally.add("denied")
                    continue
                except CapsuleError:
                    tally.add(f"{tool} error")  # e.g. "no note named": the SDK's exists said no
                    continue
                tally.add(f"{tool} ok")
                if tool == "read" and json.loads(result.output)["text"] != INSIDE.decode():
                    tally.add("read OUTSIDE")
    finally:
        swaps = racer.stop()
        await capsule.close()
        bus.close()
        engine.close()
    landed = {name for name, value in snapshot(outside).items() if before.get(name) != value}
    assert tally["read OUTSIDE"] == 0, tally.counts
    assert landed == set(), sorted(landed)[:10]
    assert swaps > 100 and tally["write ok"] > 0, tally.counts
