// {{name}}: greets people and counts the greetings.
//
// The tool `greet` ({"name": "Ada"}) answers {"text": "Hello, Ada!", "count": n}: the greeting
// comes from the `greeting` configuration (default "Hello"), the count from the capsule's KV
// store, and each greeting is announced on the bus as `{{name}}.greeted`. Add a tool: write an
// exported function here and a [[tool]] of the same name in Capsule.toml.
import { Bus, Config, Json, KV, Tool } from "orch-capsule-sdk";

const COUNT = "count";

export function greet(): i32 {
  const name = Tool.args().getString("name"); // already checked against the tool's input_schema
  const greeting = Config.get("greeting"); // null when unset
  const stored = KV.getString(COUNT); // null when absent
  const count: i64 = (stored === null ? 0 : I64.parseInt(stored as string)) + 1;
  KV.setString(COUNT, count.toString()); // committed only if this call succeeds
  const answer = Json.object()
    .putString("text", (greeting === null ? "Hello" : greeting as string) + ", " + name + "!")
    .putInt("count", count)
    .toString();
  Bus.publish("{{name}}.greeted", answer); // delivered only if this call succeeds
  Tool.outputJson(answer);
  return 0; // 0: success. A throw fails the call with its message (and keeps nothing).
}
