// tally: keeps state in Extism vars, which persist across calls of one plugin.
// `add` adds its input (a decimal integer, default 1) to the running total and returns it;
// `total` returns it; `clear` forgets it.
import "orch-capsule-sdk/abort"; // routes `abort` (a throw, a failed assertion) to the SDK's handler
import { Host, Var } from "@extism/as-pdk";

function output(text: string): void {
  Host.output(Uint8Array.wrap(String.UTF8.encode(text)));
}

function current(): i64 {
  const stored = Var.getString("total");
  return stored === null ? 0 : I64.parseInt(stored as string);
}

export function add(): i32 {
  const text = Host.inputString();
  const step: i64 = text.length > 0 ? I64.parseInt(text) : 1;
  const total = current() + step;
  Var.set("total", Uint8Array.wrap(String.UTF8.encode(total.toString())));
  output(total.toString());
  return 0;
}

export function total(): i32 {
  output(current().toString());
  return 0;
}

export function clear(): i32 {
  Var.remove("total");
  output("0");
  return 0;
}
