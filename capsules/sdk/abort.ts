// Abort handler for capsules built with AssemblyScript: `--use abort=sdk/abort/capsuleAbort`.
// AssemblyScript calls `abort` on a failed assertion or an uncaught throw. Instead of the
// `env.abort` import (which no Extism host provides) we record the message as the plugin's
// error through the Extism kernel, then trap, so the host reports what went wrong.
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
