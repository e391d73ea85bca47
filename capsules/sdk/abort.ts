// The abort handler for capsules built with AssemblyScript. AssemblyScript calls `abort` on a
// failed assertion or an uncaught throw. Instead of the `env.abort` import (which no Extism
// host provides) this records the message as the call's error through the Extism kernel, then
// traps, so the caller sees what went wrong. The build (build.mjs) routes `abort` here with
// `--use abort=~lib/orch-capsule-sdk/abort/capsuleAbort`; that needs this file in the program:
// importing anything from "orch-capsule-sdk" brings it in (index.ts re-exports it), and a
// capsule that uses only the Extism PDK writes `import "orch-capsule-sdk/abort";`.
import { alloc, error_set, store_u8 } from "@extism/as-pdk/lib/env";

export function capsuleAbort(
  message: string | null,
  fileName: string | null,
  lineNumber: u32,
  columnNumber: u32,
): void {
  let text = "abort: " + (message === null ? "(no message)" : message as string);
  if (fileName !== null) {
    text += " at " + (fileName as string) + ":" + lineNumber.toString() + ":" + columnNumber.toString();
  }
  const bytes = Uint8Array.wrap(String.UTF8.encode(text));
  const offset = alloc(bytes.length);
  for (let i = 0; i < bytes.length; i++) store_u8(offset + i, bytes[i]);
  error_set(offset);
  unreachable();
}
