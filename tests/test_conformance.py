"""Conformance: our engine must run an Extism plugin exactly as the official Extism SDK does.

The Extism Python SDK (`extism`, the reference runtime) is the oracle. Every case runs the
same plugin bytes, with the same config, on both engines, call after call on one plugin per
side (so vars carry over as they would for a user), and checks:

* the same calls succeed and the same calls fail;
* a successful call outputs the same bytes on both;
* a failing call raises the expected kind of error on our side (`GuestError` for a guest
  failure, `CapsuleTrap` for a trap, `UnknownFunction` for a missing export), keeps the
  guest's own words in the message, and carries the right exit or trap code;
* where the result is known independently (an echo, a count, a reversal), both match it,
  so two engines failing the same way cannot pass as "conformant".

The plugins are the AssemblyScript example capsules (capsules/<name>/assembly/index.ts, the
`conformance` one written for this file) and tiny hand-written WAT modules that drive the
`extism:host/env` kernel functions directly, without a PDK in between. A last group checks
that a plugin keeps working on our engine after each kind of failed call.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import extism
import pytest
import wasmtime

from orchestrator.engine import WasmEngine
from orchestrator.errors import CapsuleError, CapsuleTrap, GuestError, UnknownFunction
from tests.conftest import capsule_wasm

MIB = 1024 * 1024

# -- what a call must do ------------------------------------------------------------------


@dataclass(frozen=True)
class Fails:
    """The call must fail on both engines; on ours with exactly `kind`.

    `text`: words that must appear in both engines' messages (the guest's own message, or
    the missing function's name). `exit_code` / `trap_code`: checked on our error when set.
    """

    kind: type[CapsuleError]
    text: str = ""
    exit_code: int | None = None
    trap_code: str | None = None


SAME = None  # a call whose output is only required to match the oracle's


@dataclass(frozen=True)
class Call:
    """One call of a sequence. `want`: the exact output (bytes), a `Fails`, or SAME."""

    function: str
    data: bytes = b""
    want: bytes | Fails | None = SAME


@dataclass(frozen=True)
class Outcome:
    """What one engine did with one call: `output` on success, `error` on failure."""

    output: bytes | None = None
    error: Exception | None = None

    def describe(self) -> str:
        if self.error is not None:
            return f"failed with {type(self.error).__name__}: {str(self.error)[:300]!r}"
        return f"returned {_short(self.output or b'')}"


def _short(data: bytes) -> str:
    return repr(data) if len(data) <= 80 else f"{data[:60]!r}... ({len(data)} bytes)"


# -- running a sequence on both engines -----------------------------------------------------


def run_ours(engine: WasmEngine, wasm: bytes, config: Mapping[str, str], calls: Sequence[Call]) -> list[Outcome]:
    outcomes = []
    with engine.load(wasm, name="subject", config=config) as plugin:
        for call in calls:
            try:
                outcomes.append(Outcome(output=plugin.call(call.function, call.data)))
            except CapsuleError as error:
                outcomes.append(Outcome(error=error))
    return outcomes


def run_extism(wasm: bytes, config: Mapping[str, str], calls: Sequence[Call]) -> list[Outcome]:
    outcomes = []
    with extism.Plugin(wasm, wasi=False, config=dict(config)) as plugin:
        for call in calls:
            try:
                outcomes.append(Outcome(output=bytes(plugin.call(call.function, call.data))))
            except extism.Error as error:
                outcomes.append(Outcome(error=error))
    return outcomes


def assert_conforms(
    engine: WasmEngine, wasm: bytes, calls: Sequence[Call], config: Mapping[str, str] | None = None
) -> None:
    """Run `calls` in order on one plugin per engine; compare call by call."""
    config = config or {}
    ours = run_ours(engine, wasm, config, calls)
    theirs = run_extism(wasm, config, calls)
    for index, (call, mine, oracle) in enumerate(zip(calls, ours, theirs, strict=True)):
        where = f"call #{index} {call.function}({_short(call.data)})"
        if (mine.error is None) != (oracle.error is None):
            pytest.fail(f"{where}: ours {mine.describe()}, but Extism {oracle.describe()}")
        if mine.error is None and mine.output != oracle.output:
            pytest.fail(f"{where}: outputs differ: ours {mine.describe()}, Extism {oracle.describe()}")
        check_expectation(where, call.want, mine, oracle)


def check_expectation(where: str, want: bytes | Fails | None, mine: Outcome, oracle: Outcome) -> None:
    if isinstance(want, Fails):
        assert mine.error is not None, f"{where}: expected {want.kind.__name__}, both {mine.describe()}"
        assert type(mine.error) is want.kind, f"{where}: expected {want.kind.__name__}, ours {mine.describe()}"
        assert want.text in str(mine.error), f"{where}: {want.text!r} missing from ours: {mine.error}"
        assert want.text in str(oracle.error), f"{where}: {want.text!r} missing from Extism's: {oracle.error}"
        if want.exit_code is not None:
            assert isinstance(mine.error, GuestError)
            assert mine.error.exit_code == want.exit_code, f"{where}: exit code {mine.error.exit_code}"
        if want.trap_code is not None:
            assert isinstance(mine.error, CapsuleTrap)
            assert mine.error.trap_code == want.trap_code, f"{where}: trap code {mine.error.trap_code!r}"
    else:
        assert mine.error is None, f"{where}: expected success, both {mine.describe()}"
        if want is not None and mine.output != want:
            pytest.fail(f"{where}: both returned {_short(mine.output or b'')}, expected {_short(want)}")


@functools.cache
def capsule_bytes(name: str) -> bytes:
    return capsule_wasm(name).read_bytes()


# -- inputs ---------------------------------------------------------------------------------

MIB_TEXT = (b"The quick brown fox jumps over the lazy dog. " * (MIB // 45 + 1))[:MIB]
MIB_BINARY = bytes(range(256)) * (MIB // 256)

TEXTS = {
    "accents": "héllo wörld, ça va? Ñandú",
    "cjk": "日本語のテキスト、中文",
    "emoji": "👋🌍🎉 and a family 👨‍👩‍👧",
    "lone-combining-mark": "\u0301",
    "combining-sequence": "e\u0301a\u0308",
    "mixed": "aé日👋z",
}


def vowel_count(data: bytes) -> bytes:
    """What the vowels capsule answers: ASCII vowels, either case, byte by byte."""
    return b'{"count":%d}' % sum((b | 0x20) in b"aeiou" for b in data)


def one(function: str, data: bytes | str = b"", want: bytes | Fails | None = SAME) -> list[Call]:
    return [Call(function, data.encode() if isinstance(data, str) else data, want)]


UNREACHABLE = "UNREACHABLE"

# -- the conformance capsule ------------------------------------------------------------------

CONFORMANCE_CASES = [
    # echo and input_size: bytes in, bytes out, at every size
    pytest.param(one("echo", b"", b""), id="echo-empty"),
    pytest.param(one("echo", "hello", b"hello"), id="echo-ascii"),
    pytest.param(one("echo", bytes(range(256)), bytes(range(256))), id="echo-all-byte-values"),
    pytest.param(one("echo", MIB_TEXT, MIB_TEXT), id="echo-1mib-text"),
    pytest.param(one("echo", MIB_BINARY, MIB_BINARY), id="echo-1mib-binary"),
    pytest.param(one("input_size", b"", b"0"), id="input_size-empty"),
    pytest.param(one("input_size", "héllo", b"6"), id="input_size-utf8"),
    pytest.param(one("input_size", MIB_BINARY, str(MIB).encode()), id="input_size-1mib"),
    # non-ASCII text, byte for byte and reversed by code point (as Python's [::-1] does)
    *[pytest.param(one("echo", text, text.encode()), id=f"echo-{name}") for name, text in TEXTS.items()],
    *[pytest.param(one("reverse", text, text[::-1].encode()), id=f"reverse-{name}") for name, text in TEXTS.items()],
    pytest.param(one("reverse", b"", b""), id="reverse-empty"),
    pytest.param(one("reverse", "stressed", b"desserts"), id="reverse-ascii"),
    pytest.param(one("reverse", b"ab\xffcd\xc3"), id="reverse-invalid-utf8"),
    # fail: an error message and exit code 1
    pytest.param(one("fail", "x", Fails(GuestError, "failed: x", exit_code=1)), id="fail-ascii"),
    pytest.param(one("fail", b"", Fails(GuestError, "failed: ", exit_code=1)), id="fail-empty"),
    pytest.param(
        one("fail", "ünïcödé ✓ 日本 👋", Fails(GuestError, "failed: ünïcödé ✓ 日本 👋", exit_code=1)),
        id="fail-non-ascii",
    ),
    # exit_code: a bare return value, no message
    pytest.param(one("exit_code", "0", b""), id="exit_code-0"),
    pytest.param(one("exit_code", "1", Fails(GuestError, exit_code=1)), id="exit_code-1"),
    pytest.param(one("exit_code", "7", Fails(GuestError, "7", exit_code=7)), id="exit_code-7"),
    pytest.param(one("exit_code", "-1", Fails(GuestError, "-1", exit_code=-1)), id="exit_code-minus-1"),
    pytest.param(one("exit_code", b""), id="exit_code-empty"),
    # traps
    pytest.param(one("trap", b"", Fails(CapsuleTrap, trap_code=UNREACHABLE)), id="trap"),
    pytest.param(one("throws", b"", Fails(CapsuleTrap, "thrown on purpose", trap_code=UNREACHABLE)), id="throws"),
    # unknown functions
    pytest.param(one("nope", b"", Fails(UnknownFunction, "nope")), id="unknown-function"),
    pytest.param(one("ECHO", b"x", Fails(UnknownFunction, "ECHO")), id="unknown-function-case-sensitive"),
    pytest.param(one("memory", b"", Fails(UnknownFunction, "memory")), id="unknown-function-memory-export"),
    # log, big_output, get_var
    pytest.param(one("log", "a line to log", b"logged"), id="log"),
    pytest.param(one("log", b"", b"logged"), id="log-empty"),
    pytest.param(one("big_output", "0", b""), id="big_output-0"),
    pytest.param(one("big_output", "10", b"x" * 10), id="big_output-10"),
    pytest.param(one("big_output", "1000000", b"x" * 1_000_000), id="big_output-1000000"),
    pytest.param(one("get_var", "n", b"<unset>"), id="get_var-unset"),
    # empty input to the functions not covered above: an empty config key or var name
    pytest.param(one("config", b"", b"<unset>"), id="config-empty-key"),
    pytest.param(one("get_var", b"", b"<unset>"), id="get_var-empty-name"),
    pytest.param(one("bump", b"", b"1"), id="bump-empty"),
    pytest.param(one("bump_then_trap", b"", Fails(CapsuleTrap, trap_code=UNREACHABLE)), id="bump_then_trap-empty"),
    # vars persist across the calls of one plugin ...
    pytest.param(
        [
            Call("bump", want=b"1"),
            Call("bump", want=b"2"),
            Call("bump", want=b"3"),
            Call("get_var", b"n", b"3"),
            Call("get_var", b"m", b"<unset>"),
        ],
        id="vars-bump-x3",
    ),
    # ... and across a trap, including a var set by the call that trapped
    pytest.param(
        [
            Call("bump", want=b"1"),
            Call("bump_then_trap", want=Fails(CapsuleTrap, trap_code=UNREACHABLE)),
            Call("get_var", b"n", b"2"),
            Call("bump", want=b"3"),
            Call("echo", b"after", b"after"),
        ],
        id="vars-across-trap",
    ),
    pytest.param(
        [
            Call("bump", want=b"1"),
            Call("fail", b"x", Fails(GuestError, "failed: x", exit_code=1)),
            Call("throws", want=Fails(CapsuleTrap, "thrown on purpose", trap_code=UNREACHABLE)),
            Call("bump", want=b"2"),
        ],
        id="vars-across-errors",
    ),
]


@pytest.mark.parametrize("calls", CONFORMANCE_CASES)
def test_conformance_capsule(engine: WasmEngine, calls: list[Call]) -> None:
    assert_conforms(engine, capsule_bytes("conformance"), calls)


CONFIG = {"present": "yes", "empty": "", "ünï": "välue ✓ 日本", "plain": "naïve 👋"}

CONFIG_CASES = [
    pytest.param(one("config", "present", b"yes"), id="present"),
    pytest.param(one("config", "empty"), id="empty-value"),
    pytest.param(one("config", "missing", b"<unset>"), id="missing"),
    pytest.param(one("config", "PRESENT", b"<unset>"), id="case-sensitive-key"),
    pytest.param(one("config", "ünï", "välue ✓ 日本".encode()), id="non-ascii-key-and-value"),
    pytest.param(one("config", "plain", "naïve 👋".encode()), id="non-ascii-value"),
]


@pytest.mark.parametrize("calls", CONFIG_CASES)
def test_conformance_config(engine: WasmEngine, calls: list[Call]) -> None:
    assert_conforms(engine, capsule_bytes("conformance"), calls, config=CONFIG)


# -- the example capsules ---------------------------------------------------------------------

EXAMPLE_CASES = [
    pytest.param("greet", {}, one("greet", "Ada", b"Hello, Ada!"), id="greet-default"),
    pytest.param("greet", {}, one("greet", b"", b"Hello, world!"), id="greet-empty"),
    pytest.param("greet", {}, one("greet", "Zoë 李 👋", "Hello, Zoë 李 👋!".encode()), id="greet-non-ascii"),
    pytest.param("greet", {"greeting": "Hi"}, one("greet", "Ada", b"Hi, Ada!"), id="greet-configured"),
    pytest.param(
        "greet",
        {"greeting": "Grüß dich"},
        one("greet", "Ada", "Grüß dich, Ada!".encode()),
        id="greet-config-utf8",
    ),
    pytest.param("greet", {"greeting": ""}, one("greet", "Ada"), id="greet-config-empty"),
    pytest.param("greet", {}, one("Greet", b"Ada", Fails(UnknownFunction, "Greet")), id="greet-unknown"),
    pytest.param(
        "tally",
        {},
        [
            Call("total", want=b"0"),
            Call("add", want=b"1"),
            Call("add", b"5", b"6"),
            Call("add", b"-10", b"-4"),
            Call("total", want=b"-4"),
            Call("clear", want=b"0"),
            Call("total", want=b"0"),
            Call("add", b"41", b"41"),
            Call("add", want=b"42"),
        ],
        id="tally-sequence",
    ),
    pytest.param("tally", {}, one("add", "abc"), id="tally-add-not-a-number"),
    pytest.param("tally", {}, one("clear", b"", b"0"), id="tally-clear-fresh"),
    *[
        pytest.param("vowels", {}, one(function, data, vowel_count(data)), id=f"{function}-{label}")
        for function in ("count_vowels", "count_vowels_naive")
        for label, data in [
            ("empty", b""),
            ("hello", b"hello world"),
            ("both-cases", b"AEIOU aeiou xyz"),
            ("alphabet", b"abcdefghijklmnopqrstuvwxyz"),  # 8-byte words plus a tail
            ("non-ascii", "héllo wörld ÄÖÜ".encode()),
            ("1mib", MIB_TEXT),
        ]
    ],
]


@pytest.mark.parametrize(("capsule", "config", "calls"), EXAMPLE_CASES)
def test_conformance_examples(engine: WasmEngine, capsule: str, config: dict[str, str], calls: list[Call]) -> None:
    assert_conforms(engine, capsule_bytes(capsule), calls, config=config)


# -- hand-written WAT modules on the raw kernel ABI ---------------------------------------------

KERNEL_IMPORTS = """
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "free" (func $free (param i64)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (import "extism:host/env" "load_u8" (func $load_u8 (param i64) (result i32)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "load_u64" (func $load_u64 (param i64) (result i64)))
  (import "extism:host/env" "store_u64" (func $store_u64 (param i64 i64)))
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "input_load_u64" (func $input_load_u64 (param i64) (result i64)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "error_set" (func $error_set (param i64)))
  (import "extism:host/env" "var_get" (func $var_get (param i64) (result i64)))
  (import "extism:host/env" "var_set" (func $var_set (param i64 i64)))
  (import "extism:host/env" "config_get" (func $config_get (param i64) (result i64)))
"""


def wat(body: str) -> bytes:
    """A module importing the kernel functions above, with `body` as its functions."""
    return bytes(wasmtime.wat2wasm(f"(module {KERNEL_IMPORTS} {body})"))


# alloc a block, write "hi" into it, make it the output
WAT_OUTPUT_BLOCK = """
  (func (export "run") (result i32) (local $p i64)
    (local.set $p (call $alloc (i64.const 2)))
    (call $store_u8 (local.get $p) (i32.const 0x68))                        ;; 'h'
    (call $store_u8 (i64.add (local.get $p) (i64.const 1)) (i32.const 0x69)) ;; 'i'
    (call $output_set (local.get $p) (i64.const 2))
    (i32.const 0))
"""

# output the first 8 input bytes, read as one u64 (zero when the input is shorter)
WAT_INPUT_U64 = """
  (func (export "run") (result i32) (local $p i64)
    (local.set $p (call $alloc (i64.const 8)))
    (call $store_u64 (local.get $p) (call $input_load_u64 (i64.const 0)))
    (call $output_set (local.get $p) (i64.const 8))
    (i32.const 0))
"""

# echo, one byte at a time: input_length, input_load_u8, store_u8, and load_u8 to check
WAT_ECHO_BYTES = """
  (func (export "run") (result i32) (local $n i64) (local $p i64) (local $i i64)
    (local.set $n (call $input_length))
    (local.set $p (call $alloc (local.get $n)))
    (block $done
      (loop $next
        (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
        (call $store_u8 (i64.add (local.get $p) (local.get $i)) (call $input_load_u8 (local.get $i)))
        (if (i32.ne (call $load_u8 (i64.add (local.get $p) (local.get $i)))
                    (call $input_load_u8 (local.get $i)))
          (then (return (i32.const 2))))
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br $next)))
    (call $output_set (local.get $p) (local.get $n))
    (i32.const 0))
"""

# alloc 16 bytes and fill them, keep a second block after it, free the first, alloc 3 bytes
# (which may reuse the freed block), write "new" and output exactly `length` bytes of it
WAT_ALLOC_FREE_ALLOC = """
  (func (export "run") (result i32) (local $old i64) (local $new i64)
    (local.set $old (call $alloc (i64.const 16)))
    (call $store_u64 (local.get $old) (i64.const 0x4141414141414141))  ;; "AAAAAAAA"
    (call $store_u64 (i64.add (local.get $old) (i64.const 8)) (i64.const 0x4242424242424242))
    (drop (call $alloc (i64.const 8)))
    (call $free (local.get $old))
    (local.set $new (call $alloc (i64.const 3)))
    (call $store_u8 (local.get $new) (i32.const 0x6e))                        ;; 'n'
    (call $store_u8 (i64.add (local.get $new) (i64.const 1)) (i32.const 0x65)) ;; 'e'
    (call $store_u8 (i64.add (local.get $new) (i64.const 2)) (i32.const 0x77)) ;; 'w'
    (call $output_set (local.get $new) (call $length (local.get $new)))
    (i32.const 0))
"""

# output, as a little-endian u64, the length of a 13-byte block (load_u64 reads it back)
WAT_LENGTH = """
  (func (export "run") (result i32) (local $p i64) (local $q i64)
    (local.set $p (call $alloc (i64.const 13)))
    (local.set $q (call $alloc (i64.const 8)))
    (call $store_u64 (local.get $q) (call $length (local.get $p)))
    (if (i64.ne (call $load_u64 (local.get $q)) (i64.const 13)) (then (return (i32.const 2))))
    (call $output_set (local.get $q) (i64.const 8))
    (i32.const 0))
"""

# set the error "oops", then return 1 (a failure) or 0 (an error message still fails it)
WAT_ERROR = """
  (func $oops (local $p i64)
    (local.set $p (call $alloc (i64.const 4)))
    (call $store_u8 (local.get $p) (i32.const 0x6f))                        ;; 'o'
    (call $store_u8 (i64.add (local.get $p) (i64.const 1)) (i32.const 0x6f)) ;; 'o'
    (call $store_u8 (i64.add (local.get $p) (i64.const 2)) (i32.const 0x70)) ;; 'p'
    (call $store_u8 (i64.add (local.get $p) (i64.const 3)) (i32.const 0x73)) ;; 's'
    (call $error_set (local.get $p)))
  (func (export "fail_1") (result i32) (call $oops) (i32.const 1))
  (func (export "fail_0") (result i32) (call $oops) (i32.const 0))
"""

# return 0 without output_set: the output is empty, whatever the input
WAT_NO_OUTPUT = """
  (func (export "run") (result i32) (i32.const 0))
"""

# output the config value of key "k" (config_get, then length; a missing key gives 0)
WAT_CONFIG = """
  (func (export "run") (result i32) (local $key i64) (local $value i64)
    (local.set $key (call $alloc (i64.const 1)))
    (call $store_u8 (local.get $key) (i32.const 0x6b))  ;; 'k'
    (local.set $value (call $config_get (local.get $key)))
    (call $output_set (local.get $value) (call $length (local.get $value)))
    (i32.const 0))
"""

# var "v": `put` sets it to "42", `get` outputs it, `del` removes it (var_set with offset 0)
WAT_VARS = """
  (func $key (result i64) (local $k i64)
    (local.set $k (call $alloc (i64.const 1)))
    (call $store_u8 (local.get $k) (i32.const 0x76))  ;; 'v'
    (local.get $k))
  (func (export "put") (result i32) (local $v i64)
    (local.set $v (call $alloc (i64.const 2)))
    (call $store_u8 (local.get $v) (i32.const 0x34))                        ;; '4'
    (call $store_u8 (i64.add (local.get $v) (i64.const 1)) (i32.const 0x32)) ;; '2'
    (call $var_set (call $key) (local.get $v))
    (i32.const 0))
  (func (export "get") (result i32) (local $v i64)
    (local.set $v (call $var_get (call $key)))
    (call $output_set (local.get $v) (call $length (local.get $v)))
    (i32.const 0))
  (func (export "del") (result i32)
    (call $var_set (call $key) (i64.const 0))
    (i32.const 0))
"""

# exports that are not `() -> i32`
WAT_SIGNATURES = """
  (func (export "takes_arg") (param i32) (result i32) (i32.const 0))
  (func (export "returns_i64") (result i64) (i64.const 0))
  (func (export "returns_nothing"))
"""

WAT_CASES = [
    pytest.param(WAT_OUTPUT_BLOCK, {}, one("run", b"", b"hi"), id="output-block"),
    pytest.param(WAT_INPUT_U64, {}, one("run", b"abcdefghij", b"abcdefgh"), id="input_load_u64"),
    pytest.param(WAT_INPUT_U64, {}, one("run", b"abc"), id="input_load_u64-short-input"),
    pytest.param(WAT_ECHO_BYTES, {}, one("run", b"", b""), id="echo-bytes-empty"),
    pytest.param(WAT_ECHO_BYTES, {}, one("run", bytes(range(256)), bytes(range(256))), id="echo-bytes"),
    pytest.param(WAT_ALLOC_FREE_ALLOC, {}, one("run", b"", b"new"), id="alloc-free-alloc"),
    pytest.param(WAT_LENGTH, {}, one("run", b"", (13).to_bytes(8, "little")), id="length"),
    pytest.param(WAT_ERROR, {}, one("fail_1", b"", Fails(GuestError, "oops", exit_code=1)), id="error_set-return-1"),
    pytest.param(WAT_ERROR, {}, one("fail_0", b"", Fails(GuestError, "oops")), id="error_set-return-0"),
    pytest.param(WAT_NO_OUTPUT, {}, one("run", b"", b""), id="no-output"),
    pytest.param(WAT_NO_OUTPUT, {}, one("run", b"ignored input", b""), id="no-output-with-input"),
    pytest.param(WAT_CONFIG, {"k": "välue"}, one("run", b"", "välue".encode()), id="config_get"),
    pytest.param(WAT_CONFIG, {}, one("run", b"", b""), id="config_get-missing"),
    pytest.param(WAT_CONFIG, {"k": ""}, one("run", b"", b""), id="config_get-empty-value"),
    pytest.param(
        WAT_VARS,
        {},
        [
            Call("get", want=b""),
            Call("put", want=b""),
            Call("get", want=b"42"),
            Call("del", want=b""),
            Call("get", want=b""),
        ],
        id="var_set-var_get",
    ),
    pytest.param(WAT_SIGNATURES, {}, one("takes_arg", b"", Fails(UnknownFunction)), id="export-takes-arg"),
    pytest.param(WAT_SIGNATURES, {}, one("returns_i64", b"", Fails(UnknownFunction)), id="export-returns-i64"),
    pytest.param(WAT_SIGNATURES, {}, one("returns_nothing", b"", b""), id="export-returns-nothing"),
]


@pytest.mark.parametrize(("body", "config", "calls"), WAT_CASES)
def test_conformance_wat(engine: WasmEngine, body: str, config: dict[str, str], calls: list[Call]) -> None:
    assert_conforms(engine, wat(body), calls, config=config)


# -- a failed call leaves the plugin usable (our engine) ---------------------------------------

FAILING_CALLS = [
    pytest.param("fail", b"x", GuestError, id="fail"),
    pytest.param("exit_code", b"7", GuestError, id="exit_code"),
    pytest.param("trap", b"", CapsuleTrap, id="trap"),
    pytest.param("throws", b"", CapsuleTrap, id="throws"),
    pytest.param("bump_then_trap", b"", CapsuleTrap, id="bump_then_trap"),
    pytest.param("nope", b"", UnknownFunction, id="unknown-function"),
]


@pytest.mark.parametrize(("function", "data", "kind"), FAILING_CALLS)
def test_plugin_works_after_failed_call(
    engine: WasmEngine, function: str, data: bytes, kind: type[CapsuleError]
) -> None:
    with engine.load(capsule_bytes("conformance"), name="survivor") as plugin:
        for attempt in range(2):  # twice: the instance rebuilt after a trap must recover too
            with pytest.raises(kind):
                plugin.call(function, data)
            assert plugin.call("echo", f"still alive {attempt}") == f"still alive {attempt}".encode()
            assert plugin.call("reverse", "héllo") == "olléh".encode()
