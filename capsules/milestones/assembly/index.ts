// milestones: listens to counter.changed. Keeps the last count and the number of events seen
// in KV, and publishes milestones.reached {"count": n} when the count is a non-zero multiple
// of 10; `status` -> {"last": n, "seen": k}. Two interceptors share the event so that their
// order can be checked: priority 10 (`on_counter_changed_first`) sets KV "order" to "first",
// priority 100 (`on_counter_changed`) appends ",second".
import { Bus, BusEvent, Json, KV, Tool } from "orch-capsule-sdk"; // also routes `abort` to the SDK's handler

function readInt(key: string): i64 {
  const stored = KV.getString(key);
  if (stored === null) return 0;
  const v = Json.tryParse(stored as string);
  if (v === null || !v.isInteger()) throw new Error("KV " + Json.quote(key) + " holds " + Json.quote(stored as string) + ", not an integer");
  return v.asI64();
}

export function on_counter_changed_first(): i32 {
  KV.setString("order", "first");
  return 0;
}

export function on_counter_changed(): i32 {
  const event = BusEvent.fromInput();
  if (!event.payload.isObject()) {
    throw new Error(event.topic + ": expected a payload object with \"count\", got " + event.payload.kindName());
  }
  const count = event.payload.getI64("count");
  KV.setString("last", count.toString());
  KV.setString("seen", (readInt("seen") + 1).toString());
  const order = KV.getString("order");
  KV.setString("order", (order === null ? "" : order as string) + ",second");
  if (count != 0 && count % 10 == 0) {
    Bus.publish("milestones.reached", Json.object().putInt("count", count).toString());
  }
  return 0;
}

export function status(): i32 {
  Tool.outputJson(Json.object().putInt("last", readInt("last")).putInt("seen", readInt("seen")).toString());
  return 0;
}
