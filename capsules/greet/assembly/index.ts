// greet: reads its configuration. `greet` takes a name and answers "<greeting>, <name>!",
// where the greeting comes from the `greeting` config key (default "Hello").
import "orch-capsule-sdk/abort"; // routes `abort` (a throw, a failed assertion) to the SDK's handler
import { Config, Host } from "@extism/as-pdk";

function output(text: string): void {
  Host.output(Uint8Array.wrap(String.UTF8.encode(text)));
}

export function greet(): i32 {
  const name = Host.inputString();
  const configured = Config.get("greeting");
  const greeting = configured === null ? "Hello" : configured as string;
  output(greeting + ", " + (name.length > 0 ? name : "world") + "!");
  return 0;
}
