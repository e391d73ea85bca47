// conformance: one export per behaviour the engine must share with the official Extism SDK.
// Used by tests/test_conformance.py; each export is small and does exactly one thing.
import "orch-capsule-sdk/abort"; // routes `abort` (a throw, a failed assertion) to the SDK's handler
import { Config, Host, Var, LogLevel } from "@extism/as-pdk";
import { alloc, error_set, store_u8 } from "@extism/as-pdk/lib/env";

function bytesOf(text: string): Uint8Array {
  return Uint8Array.wrap(String.UTF8.encode(text));
}

function setError(text: string): void {
  const bytes = bytesOf(text);
  const offset = alloc(bytes.length);
  for (let i = 0; i < bytes.length; i++) store_u8(offset + i, bytes[i]);
  error_set(offset);
}

/** Output = input, byte for byte. */
export function echo(): i32 {
  Host.output(Host.input());
  return 0;
}

/** Output = input as text, reversed by code point (exercises UTF-8 decode and encode). */
export function reverse(): i32 {
  const text = Host.inputString();
  let out = "";
  for (let i = text.length - 1; i >= 0; i--) {
    const c = text.charCodeAt(i);
    if (i > 0 && c >= 0xdc00 && c <= 0xdfff) {
      out += text.substring(i - 1, i + 1);
      i--;
    } else {
      out += text.charAt(i);
    }
  }
  Host.output(bytesOf(out));
  return 0;
}

/** Output = the config value named by the input, or "<unset>" when the PDK finds none. */
export function config(): i32 {
  const value = Config.get(Host.inputString());
  Host.output(bytesOf(value === null ? "<unset>" : value as string));
  return 0;
}

/** Increments the var "n" and outputs the new value. */
export function bump(): i32 {
  const stored = Var.getString("n");
  const n: i64 = (stored === null ? 0 : I64.parseInt(stored as string)) + 1;
  Var.set("n", bytesOf(n.toString()));
  Host.output(bytesOf(n.toString()));
  return 0;
}

/** Increments the var "n", then traps: the var must survive the trap. */
export function bump_then_trap(): i32 {
  bump();
  unreachable();
  return 0;
}

/** Outputs the var named by the input, or "<unset>". */
export function get_var(): i32 {
  const value = Var.getString(Host.inputString());
  Host.output(bytesOf(value === null ? "<unset>" : value as string));
  return 0;
}

/** Sets an error message (the input) and returns 1. */
export function fail(): i32 {
  setError("failed: " + Host.inputString());
  return 1;
}

/** Returns the input as an exit code, without setting an error. */
export function exit_code(): i32 {
  return I32.parseInt(Host.inputString());
}

/** Traps with `unreachable`. */
export function trap(): i32 {
  unreachable();
  return 0;
}

/** Throws: AssemblyScript calls the SDK's abort handler, which sets the error and traps. */
export function throws(): i32 {
  throw new Error("thrown on purpose");
}

/** Logs the input at every level, then outputs "logged". */
export function log(): i32 {
  const text = Host.inputString();
  Host.log(LogLevel.Debug, text);
  Host.log(LogLevel.Info, text);
  Host.log(LogLevel.Warn, text);
  Host.log(LogLevel.Error, text);
  Host.output(bytesOf("logged"));
  return 0;
}

/** Outputs as many bytes ('x') as the decimal input says. */
export function big_output(): i32 {
  const n = I64.parseInt(Host.inputString());
  const out = new Uint8Array(i32(n));
  out.fill(0x78);
  Host.output(out);
  return 0;
}

/** Outputs the length of its input in bytes. */
export function input_size(): i32 {
  Host.output(bytesOf(Host.input().length.toString()));
  return 0;
}
