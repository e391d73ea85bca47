// counter: a count kept in KV, announced on the bus. `increment` adds `by` (default: the
// `step` config, itself default 1) and publishes counter.changed {"count": n}; `get` reads it;
// `reset` sets it back to 0 (and publishes that too). Every tool answers {"count": n}.
import { Bus, Config, Json, KV, Tool } from "orch-capsule-sdk"; // also routes `abort` to the SDK's handler

const KEY = "count";
const TOPIC = "counter.changed";

function current(): i64 {
  const stored = KV.getString(KEY);
  if (stored === null) return 0;
  const v = Json.tryParse(stored as string);
  if (v === null || !v.isInteger()) throw new Error("KV " + Json.quote(KEY) + " holds " + Json.quote(stored as string) + ", not an integer");
  return v.asI64();
}

function answer(count: i64): string {
  return Json.object().putInt("count", count).toString();
}

export function increment(): i32 {
  const args = Tool.args();
  const by = args.hasValue("by") ? args.getI64("by") : Config.getI64("step", 1);
  const before = current();
  const count = before + by;
  if ((by > 0 && count < before) || (by < 0 && count > before)) throw new Error("the count would overflow");
  KV.setString(KEY, count.toString());
  Bus.publish(TOPIC, answer(count));
  Tool.outputJson(answer(count));
  return 0;
}

export function get(): i32 {
  Tool.outputJson(answer(current()));
  return 0;
}

export function reset(): i32 {
  KV.delete(KEY);
  Bus.publish(TOPIC, answer(0));
  Tool.outputJson(answer(0));
  return 0;
}
