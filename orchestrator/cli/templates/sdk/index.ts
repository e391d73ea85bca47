// The capsule SDK: typed AssemblyScript wrappers over the orchestrator's host functions
// (the "airlocks") and the tool/interceptor calling convention. See README.md.
//
//   import { Tool, KV, Bus, Json } from "orch-capsule-sdk";
//
// Importing this file also brings in the abort handler (abort.ts) that the build routes
// AssemblyScript's `abort` to, so an uncaught throw becomes the call's error message.
//
// Errors. A wrapper that gets a HostResult error (not found, too large, invalid key, I/O
// error, …) throws Error("<Wrapper.method> <argument>: <host message>"). AssemblyScript
// cannot catch: a throw reaches the SDK's abort handler, which records the message as the
// call's error and traps, so the caller sees the tool call fail with that message. (To
// handle a host error yourself, use the raw layer in ./airlock.ts, which returns a HostResult.)
// A capability denial never returns to the guest at all: the host traps the call and audits
// it. A malformed host answer, unparsable JSON and a mistyped argument or config value also
// throw, with a message naming what was wrong.
//
// Log      debug/info/warn/error(msg)         astrid_log; never throws
// Config   get(key): string | null            astrid_get_config; null when unset or empty
//          getI64(key, fallback): i64         fallback when unset; throws when not an integer
//          getNumber(key, fallback): f64      fallback when unset; throws when not a number
//          getBool(key, fallback): bool       true/false/1/0/yes/no (any case); else throws
// Clock    nowMs(): i64                       astrid_clock_ms: wall clock, ms since the epoch
// KV       get(key): Uint8Array | null        null when absent (an empty value reads as absent)
//          getString(key): string | null
//          set(key, value: Uint8Array)  setString(key, value)
//          delete(key)                        deleting an absent key is not an error
//          listKeys(prefix): string[]         the capsule's keys starting with prefix
// Bus      publish(topic, payloadJson)        topic in NATS syntax; the payload must be JSON
// Fs       read(path): Uint8Array  readString(path): string
//          write(path, data: Uint8Array)  writeString(path, text)
//          readdir(path): string[]            entry names
//          stat(path): FileStat               size, isDir, modifiedMs
//          exists(path): bool
//          Paths: "cwd://x" or relative "x", under the workspace, within the manifest's
//          fs_read / fs_write entries (anything else is a denial: the call traps).
// Tool     input(): Uint8Array  inputString(): string
//          args(): JsonValue                  the input as a JSON object ({} when empty);
//                                             throws when it is not a JSON object
//          output(bytes)  outputString(text)  outputJson(jsonText)
// BusEvent fromInput(): BusEvent              the event an interceptor action receives:
//                                             topic, payload (JsonValue), source, seq, timestampMs
// Json, JsonValue, JsonObjectBuilder          see ./json.ts
import { Host } from "@extism/as-pdk";
import { Airlock, fromUtf8, utf8 } from "./airlock";
import { Json, JsonKind, JsonValue } from "./json";

export { Json, JsonKind, JsonValue, JsonObjectBuilder } from "./json";
export { Airlock, HostResult, utf8, fromUtf8 } from "./airlock";
export { capsuleAbort } from "./abort";

function describe(what: string, arg: string): string {
  return what + " " + Json.quote(arg);
}

// ---- log, config, clock ------------------------------------------------------------------

export class Log {
  static debug(msg: string): void { Airlock.log("debug", msg); }
  static info(msg: string): void { Airlock.log("info", msg); }
  static warn(msg: string): void { Airlock.log("warn", msg); }
  static error(msg: string): void { Airlock.log("error", msg); }
}

export class Config {
  /** The raw value of configuration key `key`, or null when it is unset or empty. */
  static get(key: string): string | null {
    return Airlock.getConfig(key);
  }

  /** The value as an integer ("3", also "3.0"), or `fallback` when unset. */
  static getI64(key: string, fallback: i64): i64 {
    const raw = Config.get(key);
    if (raw === null) return fallback;
    const v = Json.tryParse((raw as string).trim());
    if (v === null || !v.isInteger()) {
      throw new Error("config " + Json.quote(key) + " must be an integer, got " + Json.quote(raw as string));
    }
    return v.asI64();
  }

  /** The value as a number, or `fallback` when unset. */
  static getNumber(key: string, fallback: f64): f64 {
    const raw = Config.get(key);
    if (raw === null) return fallback;
    const v = Json.tryParse((raw as string).trim());
    if (v === null || !v.isNumber()) {
      throw new Error("config " + Json.quote(key) + " must be a number, got " + Json.quote(raw as string));
    }
    return v.asNumber();
  }

  /** The value as a boolean (true/false, 1/0, yes/no, on/off; any case), or `fallback`. */
  static getBool(key: string, fallback: bool): bool {
    const raw = Config.get(key);
    if (raw === null) return fallback;
    const t = (raw as string).trim().toLowerCase();
    if (t == "true" || t == "1" || t == "yes" || t == "on") return true;
    if (t == "false" || t == "0" || t == "no" || t == "off") return false;
    throw new Error("config " + Json.quote(key) + " must be a boolean, got " + Json.quote(raw as string));
  }
}

export class Clock {
  /** Wall-clock time in milliseconds since the Unix epoch. */
  static nowMs(): i64 {
    return Airlock.clockMs();
  }
}

// ---- KV ------------------------------------------------------------------------------------

export class KV {
  /** The value stored under `key`, or null when the key is absent. */
  static get(key: string): Uint8Array | null {
    const value = Airlock.kvGet(key).unwrap(describe("KV.get", key));
    return value.length == 0 ? null : value;
  }

  static getString(key: string): string | null {
    const value = KV.get(key);
    return value === null ? null : fromUtf8(value);
  }

  static set(key: string, value: Uint8Array): void {
    Airlock.kvSet(key, value).unwrap(describe("KV.set", key));
  }

  static setString(key: string, value: string): void {
    KV.set(key, utf8(value));
  }

  static delete(key: string): void {
    Airlock.kvDelete(key).unwrap(describe("KV.delete", key));
  }

  /** The keys (of this capsule) that start with `prefix` ("" for all). */
  static listKeys(prefix: string): string[] {
    const r = Airlock.kvListKeys(prefix);
    const what = describe("KV.listKeys", prefix);
    return parseStringArray(what, r.unwrap(what));
  }
}

// ---- bus -----------------------------------------------------------------------------------

export class Bus {
  /** Publishes `payloadJson` (JSON text, e.g. from Json.object()) on `topic`. */
  static publish(topic: string, payloadJson: string): void {
    Airlock.ipcPublish(topic, payloadJson).unwrap(describe("Bus.publish", topic));
  }
}

/** An event as an interceptor action receives it. */
export class BusEvent {
  constructor(
    public topic: string,
    /** The published JSON payload. */
    public payload: JsonValue,
    /** Who published it (a capsule name, or the orchestrator). */
    public source: string,
    public seq: i64,
    public timestampMs: i64,
  ) {}

  /** Parses the call's input: {"topic","payload","source","seq","timestamp_ms"}. A payload
   *  that arrives as a string holding JSON text is parsed too, so either encoding works. */
  static fromInput(): BusEvent {
    return BusEvent.parse(Tool.inputString());
  }

  static parse(text: string): BusEvent {
    const e = Json.parse(text);
    if (!e.isObject()) throw new Error("an event must be a JSON object, got " + e.kindName());
    let payload = e.get("payload");
    if (payload === null) {
      payload = JsonValue.ofNull();
    } else if (payload.isString()) {
      const inner = Json.tryParse(payload.asString());
      if (inner !== null) payload = inner;
    }
    return new BusEvent(
      e.getString("topic"),
      payload,
      e.getStringOr("source", ""),
      e.getI64Or("seq", 0),
      e.getI64Or("timestamp_ms", 0),
    );
  }
}

// ---- files ---------------------------------------------------------------------------------

export class FileStat {
  constructor(
    public size: i64,
    public isDir: bool,
    public modifiedMs: i64,
  ) {}
}

export class Fs {
  static read(path: string): Uint8Array {
    return Airlock.readFile(path).unwrap(describe("Fs.read", path));
  }

  static readString(path: string): string {
    return fromUtf8(Fs.read(path));
  }

  /** Creates or replaces the file at `path`. */
  static write(path: string, data: Uint8Array): void {
    Airlock.writeFile(path, data).unwrap(describe("Fs.write", path));
  }

  static writeString(path: string, text: string): void {
    Fs.write(path, utf8(text));
  }

  /** The names of the entries of directory `path`. */
  static readdir(path: string): string[] {
    const what = describe("Fs.readdir", path);
    return parseStringArray(what, Airlock.readdir(path).unwrap(what));
  }

  static stat(path: string): FileStat {
    const what = describe("Fs.stat", path);
    const v = parseJson(what, Airlock.stat(path).unwrap(what));
    if (!v.isObject()) throw new Error(what + ": expected a JSON object from the host, got " + v.kindName());
    return new FileStat(v.getI64Or("size", 0), v.getBoolOr("is_dir", false), v.getI64Or("modified_ms", 0));
  }

  static exists(path: string): bool {
    const what = describe("Fs.exists", path);
    const text = fromUtf8(Airlock.exists(path).unwrap(what)).trim();
    if (text == "true") return true;
    if (text == "false") return false;
    throw new Error(what + ": expected true or false from the host, got " + Json.quote(text));
  }
}

// ---- tool calls ----------------------------------------------------------------------------

export class Tool {
  /** The call's input bytes (a tool's JSON arguments, an interceptor's event). */
  static input(): Uint8Array {
    return Host.input();
  }

  static inputString(): string {
    return fromUtf8(Host.input());
  }

  /** The input as a JSON object; empty input counts as {}. */
  static args(): JsonValue {
    const text = Tool.inputString();
    if (text.trim().length == 0) return JsonValue.ofObject([], []);
    const v = Json.parse(text);
    if (!v.isObject()) throw new Error("the tool arguments must be a JSON object, got " + v.kindName());
    return v;
  }

  static output(bytes: Uint8Array): void {
    Host.output(bytes);
  }

  /** Sets the output to the UTF-8 bytes of `text`. */
  static outputString(text: string): void {
    Host.output(utf8(text));
  }

  /** Sets the output to JSON text (e.g. Json.object()….toString()). */
  static outputJson(json: string): void {
    Host.output(utf8(json));
  }
}

// ---- helpers -------------------------------------------------------------------------------

function parseJson(what: string, payload: Uint8Array): JsonValue {
  const text = fromUtf8(payload);
  const v = Json.tryParse(text);
  if (v === null) throw new Error(what + ": the host answered invalid JSON: " + (Json.check(text) as string));
  return v;
}

function parseStringArray(what: string, payload: Uint8Array): string[] {
  const v = parseJson(what, payload);
  if (v.kind != JsonKind.Array) throw new Error(what + ": expected a JSON array from the host, got " + v.kindName());
  return v.asStringArray();
}
