// A small, strict JSON toolkit for capsules (RFC 8259).
//
// Reading:
//   Json.parse(text): JsonValue        throws Error("invalid JSON: <what> at offset <n>")
//   Json.tryParse(text): JsonValue|null the same without throwing (AssemblyScript cannot
//                                       catch, so this is how to test text that may not be JSON)
// Accepts exactly one value (objects, arrays, strings with every escape incl. \uXXXX and
// surrogate pairs, numbers, true/false/null) surrounded by optional whitespace; rejects
// trailing commas, leading zeros, raw control characters in strings, bad escapes, trailing
// garbage, and nesting deeper than Json.MAX_DEPTH. Duplicate object keys: the last one wins
// on lookup (as in JavaScript), all are kept for serialisation.
//
// JsonValue: `kind` (JsonKind), is*() tests, as*() accessors that throw when the kind is wrong
// (asI64 also when the number is not an integer in i64 range), get(key) for object members,
// and typed member getters for tool arguments: getString / getI64 / getBool (throw a clear
// error when the member is missing or mistyped) and getStringOr / getI64Or / getBoolOr
// (a default when the member is missing or null). toString() serialises back to JSON.
//
// Writing:
//   Json.quote(s)            a JSON string literal (escapes ", \, control characters and lone
//                            surrogates, so the result is always valid and ASCII-safe there)
//   Json.stringArray(items)  ["a","b"]
//   Json.object().putString("name", n).putInt("count", c).toString()   {"name":…,"count":…}

export enum JsonKind {
  Null,
  Bool,
  Number,
  String,
  Array,
  Object,
}

const KIND_NAMES: string[] = ["null", "boolean", "number", "string", "array", "object"];

export class JsonValue {
  kind: JsonKind = JsonKind.Null;
  private boolValue: bool = false;
  private numberValue: f64 = 0;
  /** The number's literal as written (exact integers beyond 2^53), or the string's value. */
  private text: string = "";
  private items: JsonValue[] | null = null;
  private memberKeys: string[] | null = null;

  static ofNull(): JsonValue {
    return new JsonValue();
  }

  static ofBool(value: bool): JsonValue {
    const v = new JsonValue();
    v.kind = JsonKind.Bool;
    v.boolValue = value;
    return v;
  }

  /** A number; `literal` is its JSON text (default: the shortest form of `value`). */
  static ofNumber(value: f64, literal: string = ""): JsonValue {
    const v = new JsonValue();
    v.kind = JsonKind.Number;
    v.numberValue = value;
    v.text = literal.length > 0 ? literal : formatNumber(value);
    return v;
  }

  static ofInteger(value: i64): JsonValue {
    return JsonValue.ofNumber(<f64>value, value.toString());
  }

  static ofString(value: string): JsonValue {
    const v = new JsonValue();
    v.kind = JsonKind.String;
    v.text = value;
    return v;
  }

  static ofArray(items: JsonValue[]): JsonValue {
    const v = new JsonValue();
    v.kind = JsonKind.Array;
    v.items = items;
    return v;
  }

  /** An object from parallel lists of keys and values. */
  static ofObject(keys: string[], values: JsonValue[]): JsonValue {
    const v = new JsonValue();
    v.kind = JsonKind.Object;
    v.memberKeys = keys;
    v.items = values;
    return v;
  }

  kindName(): string {
    return KIND_NAMES[<i32>this.kind];
  }

  isNull(): bool { return this.kind == JsonKind.Null; }
  isBool(): bool { return this.kind == JsonKind.Bool; }
  isNumber(): bool { return this.kind == JsonKind.Number; }
  isString(): bool { return this.kind == JsonKind.String; }
  isArray(): bool { return this.kind == JsonKind.Array; }
  isObject(): bool { return this.kind == JsonKind.Object; }

  /** True for a number with an integral value that fits in an i64. */
  isInteger(): bool {
    if (this.kind != JsonKind.Number) return false;
    if (isPlainInteger(this.text)) return parseI64(this.text).ok;
    const n = this.numberValue;
    return n == Math.floor(n) && n >= -9223372036854775808.0 && n < 9223372036854775808.0;
  }

  asBool(): bool {
    this.expect(JsonKind.Bool, "a boolean");
    return this.boolValue;
  }

  asNumber(): f64 {
    this.expect(JsonKind.Number, "a number");
    return this.numberValue;
  }

  /** The number as an i64: exact for integer literals; 2.0 and 1e3 are accepted too. */
  asI64(): i64 {
    this.expect(JsonKind.Number, "an integer");
    if (isPlainInteger(this.text)) {
      const parsed = parseI64(this.text);
      if (parsed.ok) return parsed.value;
    } else if (this.isInteger()) {
      return <i64>this.numberValue;
    }
    throw new Error("expected an integer (in i64 range), got " + this.text);
  }

  asString(): string {
    this.expect(JsonKind.String, "a string");
    return this.text;
  }

  asArray(): JsonValue[] {
    this.expect(JsonKind.Array, "an array");
    return this.items as JsonValue[];
  }

  /** The elements of an array of strings. */
  asStringArray(): string[] {
    const items = this.asArray();
    const out = new Array<string>(items.length);
    for (let i = 0; i < items.length; i++) {
      if (!items[i].isString()) {
        throw new Error("expected an array of strings, element " + i.toString() + " is " + items[i].kindName());
      }
      out[i] = items[i].text;
    }
    return out;
  }

  /** An array's length or an object's member count (0 for anything else). */
  get length(): i32 {
    const items = this.items;
    return items === null ? 0 : items.length;
  }

  /** The object's keys, in document order (duplicates included). */
  keys(): string[] {
    this.expect(JsonKind.Object, "an object");
    return (this.memberKeys as string[]).slice(0);
  }

  /** The value of object member `key` (the last one if repeated), or null when absent or
   *  when this is not an object. */
  get(key: string): JsonValue | null {
    if (this.kind != JsonKind.Object) return null;
    const keys = this.memberKeys as string[];
    const values = this.items as JsonValue[];
    for (let i = keys.length - 1; i >= 0; i--) {
      if (keys[i] == key) return values[i];
    }
    return null;
  }

  /** True when this object has member `key` (even if its value is null). */
  has(key: string): bool {
    return this.get(key) !== null;
  }

  /** True when this object has member `key` with a value other than null. */
  hasValue(key: string): bool {
    const v = this.get(key);
    return v !== null && !v.isNull();
  }

  // ---- typed member access (for tool arguments and event payloads) ----------------------

  getString(key: string): string {
    return this.member(key, JsonKind.String, "a string").text;
  }

  getI64(key: string): i64 {
    const v = this.member(key, JsonKind.Number, "an integer");
    if (!v.isInteger()) throw new Error(quoteKey(key) + " must be an integer, got " + v.text);
    return v.asI64();
  }

  getBool(key: string): bool {
    return this.member(key, JsonKind.Bool, "a boolean").boolValue;
  }

  getStringOr(key: string, fallback: string): string {
    return this.present(key) ? this.getString(key) : fallback;
  }

  getI64Or(key: string, fallback: i64): i64 {
    return this.present(key) ? this.getI64(key) : fallback;
  }

  getBoolOr(key: string, fallback: bool): bool {
    return this.present(key) ? this.getBool(key) : fallback;
  }

  /** Serialises the value as compact JSON. */
  toString(): string {
    switch (this.kind) {
      case JsonKind.Null: return "null";
      case JsonKind.Bool: return this.boolValue ? "true" : "false";
      case JsonKind.Number: return this.text;
      case JsonKind.String: return Json.quote(this.text);
      case JsonKind.Array: {
        const items = this.items as JsonValue[];
        const parts = new Array<string>(items.length);
        for (let i = 0; i < items.length; i++) parts[i] = items[i].toString();
        return "[" + parts.join(",") + "]";
      }
      default: {
        const keys = this.memberKeys as string[];
        const values = this.items as JsonValue[];
        const parts = new Array<string>(keys.length);
        for (let i = 0; i < keys.length; i++) parts[i] = Json.quote(keys[i]) + ":" + values[i].toString();
        return "{" + parts.join(",") + "}";
      }
    }
  }

  private expect(kind: JsonKind, what: string): void {
    if (this.kind != kind) throw new Error("expected " + what + ", got " + this.kindName());
  }

  private present(key: string): bool {
    if (this.kind != JsonKind.Object) throw new Error("expected an object, got " + this.kindName());
    const v = this.get(key);
    return v !== null && !v.isNull();
  }

  private member(key: string, kind: JsonKind, what: string): JsonValue {
    if (this.kind != JsonKind.Object) throw new Error("expected an object, got " + this.kindName());
    const v = this.get(key);
    if (v === null) throw new Error("missing " + quoteKey(key));
    if (v.kind != kind) throw new Error(quoteKey(key) + " must be " + what + ", got " + v.kindName());
    return v;
  }
}

function quoteKey(key: string): string {
  return Json.quote(key);
}

// ---- numbers ---------------------------------------------------------------------------

class I64Parse {
  constructor(public ok: bool, public value: i64) {}
}

/** True when `s` is an optional '-' then digits only (no fraction, no exponent). */
function isPlainInteger(s: string): bool {
  const n = s.length;
  let i = 0;
  if (i < n && s.charCodeAt(i) == 0x2d) i++;
  if (i == n) return false;
  for (; i < n; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x30 || c > 0x39) return false;
  }
  return true;
}

/** Parses a plain integer literal exactly; ok=false on overflow. */
function parseI64(s: string): I64Parse {
  const negative = s.charCodeAt(0) == 0x2d;
  // Accumulate negatively: the range of negative i64 is one larger.
  let acc: i64 = 0;
  for (let i = negative ? 1 : 0; i < s.length; i++) {
    const d = <i64>(s.charCodeAt(i) - 0x30);
    if (acc < (i64.MIN_VALUE + d) / 10) return new I64Parse(false, 0);
    acc = acc * 10 - d;
  }
  if (!negative) {
    if (acc == i64.MIN_VALUE) return new I64Parse(false, 0);
    acc = -acc;
  }
  return new I64Parse(true, acc);
}

function formatNumber(value: f64): string {
  if (!isFinite(value)) return "null"; // JSON has no NaN or Infinity
  if (value == Math.floor(value) && Math.abs(value) < 9007199254740992.0) {
    return (<i64>value).toString();
  }
  return value.toString();
}

// ---- the parser ------------------------------------------------------------------------

class Parser {
  pos: i32 = 0;
  error: string | null = null;

  constructor(private s: string) {}

  fail(what: string): JsonValue | null {
    if (this.error === null) this.error = what + " at offset " + this.pos.toString();
    return null;
  }

  skipWhitespace(): void {
    const s = this.s;
    while (this.pos < s.length) {
      const c = s.charCodeAt(this.pos);
      if (c != 0x20 && c != 0x09 && c != 0x0a && c != 0x0d) break;
      this.pos++;
    }
  }

  parseDocument(): JsonValue | null {
    this.skipWhitespace();
    const v = this.parseValue(0);
    if (v === null) return null;
    this.skipWhitespace();
    if (this.pos != this.s.length) return this.fail("unexpected text after the value");
    return v;
  }

  parseValue(depth: i32): JsonValue | null {
    if (this.pos >= this.s.length) return this.fail("unexpected end of input");
    const c = this.s.charCodeAt(this.pos);
    if (c == 0x7b) return this.parseObject(depth + 1); // {
    if (c == 0x5b) return this.parseArray(depth + 1); // [
    if (c == 0x22) { // "
      const text = this.parseString();
      return text === null ? null : JsonValue.ofString(text);
    }
    if (c == 0x2d || (c >= 0x30 && c <= 0x39)) return this.parseNumber();
    if (this.literal("true")) return JsonValue.ofBool(true);
    if (this.literal("false")) return JsonValue.ofBool(false);
    if (this.literal("null")) return JsonValue.ofNull();
    return this.fail("unexpected character " + Json.quote(this.s.charAt(this.pos)));
  }

  literal(word: string): bool {
    const end = this.pos + word.length;
    if (end > this.s.length || this.s.substring(this.pos, end) != word) return false;
    this.pos = end;
    return true;
  }

  parseObject(depth: i32): JsonValue | null {
    if (depth > Json.MAX_DEPTH) return this.fail("nesting deeper than " + Json.MAX_DEPTH.toString());
    this.pos++; // {
    const keys = new Array<string>();
    const values = new Array<JsonValue>();
    this.skipWhitespace();
    if (this.peek() == 0x7d) {
      this.pos++;
      return JsonValue.ofObject(keys, values);
    }
    while (true) {
      this.skipWhitespace();
      if (this.peek() != 0x22) return this.fail("expected a string key");
      const key = this.parseString();
      if (key === null) return null;
      this.skipWhitespace();
      if (this.peek() != 0x3a) return this.fail("expected ':'");
      this.pos++;
      this.skipWhitespace();
      const value = this.parseValue(depth);
      if (value === null) return null;
      keys.push(key);
      values.push(value);
      this.skipWhitespace();
      const c = this.peek();
      this.pos++;
      if (c == 0x7d) return JsonValue.ofObject(keys, values);
      if (c != 0x2c) {
        this.pos--;
        return this.fail("expected ',' or '}'");
      }
    }
  }

  parseArray(depth: i32): JsonValue | null {
    if (depth > Json.MAX_DEPTH) return this.fail("nesting deeper than " + Json.MAX_DEPTH.toString());
    this.pos++; // [
    const items = new Array<JsonValue>();
    this.skipWhitespace();
    if (this.peek() == 0x5d) {
      this.pos++;
      return JsonValue.ofArray(items);
    }
    while (true) {
      this.skipWhitespace();
      const value = this.parseValue(depth);
      if (value === null) return null;
      items.push(value);
      this.skipWhitespace();
      const c = this.peek();
      this.pos++;
      if (c == 0x5d) return JsonValue.ofArray(items);
      if (c != 0x2c) {
        this.pos--;
        return this.fail("expected ',' or ']'");
      }
    }
  }

  /** The code unit at pos, or -1 at the end. */
  peek(): i32 {
    return this.pos < this.s.length ? <i32>this.s.charCodeAt(this.pos) : -1;
  }

  /** Parses a string literal starting at the opening quote; null on error. */
  parseString(): string | null {
    const s = this.s;
    this.pos++; // opening quote
    let runStart = this.pos;
    let parts: string[] | null = null;
    while (true) {
      if (this.pos >= s.length) {
        this.fail("unterminated string");
        return null;
      }
      const c = s.charCodeAt(this.pos);
      if (c == 0x22) {
        const run = s.substring(runStart, this.pos);
        this.pos++;
        if (parts === null) return run;
        parts.push(run);
        return parts.join("");
      }
      if (c < 0x20) {
        this.fail("control character in string");
        return null;
      }
      if (c != 0x5c) {
        this.pos++;
        continue;
      }
      // an escape
      if (parts === null) parts = new Array<string>();
      parts.push(s.substring(runStart, this.pos));
      this.pos++;
      if (this.pos >= s.length) {
        this.fail("unterminated string");
        return null;
      }
      const e = s.charCodeAt(this.pos);
      this.pos++;
      if (e == 0x22) parts.push("\"");
      else if (e == 0x5c) parts.push("\\");
      else if (e == 0x2f) parts.push("/");
      else if (e == 0x62) parts.push("\b");
      else if (e == 0x66) parts.push("\f");
      else if (e == 0x6e) parts.push("\n");
      else if (e == 0x72) parts.push("\r");
      else if (e == 0x74) parts.push("\t");
      else if (e == 0x75) {
        const unit = this.hex4();
        if (unit < 0) return null;
        // A high surrogate escape followed by a low surrogate escape makes one code point;
        // AssemblyScript strings are UTF-16, so the two code units are simply kept in order.
        // A lone surrogate is kept as it is, as JavaScript's JSON.parse does.
        parts.push(String.fromCharCode(unit));
      } else {
        this.pos--;
        this.fail("invalid escape \\" + s.charAt(this.pos));
        return null;
      }
      runStart = this.pos;
    }
  }

  /** Four hex digits after "\u"; -1 (with the error set) when malformed. */
  hex4(): i32 {
    if (this.pos + 4 > this.s.length) {
      this.fail("truncated \\u escape");
      return -1;
    }
    let value = 0;
    for (let i = 0; i < 4; i++) {
      const c = <i32>this.s.charCodeAt(this.pos);
      let d: i32;
      if (c >= 0x30 && c <= 0x39) d = c - 0x30;
      else if (c >= 0x61 && c <= 0x66) d = c - 0x61 + 10;
      else if (c >= 0x41 && c <= 0x46) d = c - 0x41 + 10;
      else {
        this.fail("invalid \\u escape");
        return -1;
      }
      value = (value << 4) | d;
      this.pos++;
    }
    return value;
  }

  parseNumber(): JsonValue | null {
    const s = this.s;
    const start = this.pos;
    if (this.peek() == 0x2d) this.pos++;
    const first = this.peek();
    if (first == 0x30) {
      this.pos++;
    } else if (first >= 0x31 && first <= 0x39) {
      this.digits();
    } else {
      return this.fail("expected a digit");
    }
    if (this.peek() == 0x2e) { // .
      this.pos++;
      if (this.digits() == 0) return this.fail("expected a digit after '.'");
    }
    const e = this.peek();
    if (e == 0x65 || e == 0x45) { // e E
      this.pos++;
      const sign = this.peek();
      if (sign == 0x2b || sign == 0x2d) this.pos++;
      if (this.digits() == 0) return this.fail("expected a digit in the exponent");
    }
    const literal = s.substring(start, this.pos);
    return JsonValue.ofNumber(F64.parseFloat(literal), literal);
  }

  digits(): i32 {
    const start = this.pos;
    while (true) {
      const c = this.peek();
      if (c < 0x30 || c > 0x39) break;
      this.pos++;
    }
    return this.pos - start;
  }
}

// ---- the public entry points ------------------------------------------------------------

export class Json {
  /** Deepest nesting of arrays and objects accepted (guards the guest's stack). */
  static readonly MAX_DEPTH: i32 = 256;

  /** Parses `text` as one JSON value; throws Error("invalid JSON: …") when it is not. */
  static parse(text: string): JsonValue {
    const parser = new Parser(text);
    const v = parser.parseDocument();
    if (v === null) throw new Error("invalid JSON: " + (parser.error as string));
    return v;
  }

  /** Parses `text`, or returns null when it is not valid JSON. */
  static tryParse(text: string): JsonValue | null {
    return new Parser(text).parseDocument();
  }

  /** The error Json.parse would report for `text`, or null when it is valid JSON. */
  static check(text: string): string | null {
    const parser = new Parser(text);
    return parser.parseDocument() === null ? parser.error : null;
  }

  /** `s` as a JSON string literal, quotes included. */
  static quote(s: string): string {
    const n = s.length;
    let i = 0;
    for (; i < n; i++) {
      if (needsEscape(s, i)) break;
    }
    if (i == n) return "\"" + s + "\"";
    const parts = new Array<string>();
    parts.push("\"");
    let runStart = 0;
    for (i = 0; i < n; i++) {
      if (!needsEscape(s, i)) continue;
      const c = s.charCodeAt(i);
      if (c >= 0xd800 && c <= 0xdbff && i + 1 < n) {
        const d = s.charCodeAt(i + 1);
        if (d >= 0xdc00 && d <= 0xdfff) { i++; continue; } // a valid pair: copied as is
      }
      parts.push(s.substring(runStart, i));
      parts.push(escapeUnit(c));
      runStart = i + 1;
    }
    parts.push(s.substring(runStart, n));
    parts.push("\"");
    return parts.join("");
  }

  /** A JSON array of strings. */
  static stringArray(items: string[]): string {
    const parts = new Array<string>(items.length);
    for (let i = 0; i < items.length; i++) parts[i] = Json.quote(items[i]);
    return "[" + parts.join(",") + "]";
  }

  /** A builder for a JSON object: Json.object().putInt("count", 3).toString(). */
  static object(): JsonObjectBuilder {
    return new JsonObjectBuilder();
  }
}

/** True when code unit i of s must be escaped (quote, backslash, control, surrogate). */
@inline function needsEscape(s: string, i: i32): bool {
  const c = s.charCodeAt(i);
  return c == 0x22 || c == 0x5c || c < 0x20 || (c >= 0xd800 && c <= 0xdfff);
}

function escapeUnit(c: i32): string {
  if (c == 0x22) return "\\\"";
  if (c == 0x5c) return "\\\\";
  if (c == 0x0a) return "\\n";
  if (c == 0x0d) return "\\r";
  if (c == 0x09) return "\\t";
  if (c == 0x08) return "\\b";
  if (c == 0x0c) return "\\f";
  const hex = "0123456789abcdef";
  return "\\u" + hex.charAt((c >> 12) & 15) + hex.charAt((c >> 8) & 15)
    + hex.charAt((c >> 4) & 15) + hex.charAt(c & 15);
}

/** Builds a JSON object member by member, in order. Keys are quoted for you. */
export class JsonObjectBuilder {
  private parts: string[] = new Array<string>();

  putString(key: string, value: string): JsonObjectBuilder {
    return this.putRaw(key, Json.quote(value));
  }

  putInt(key: string, value: i64): JsonObjectBuilder {
    return this.putRaw(key, value.toString());
  }

  putNumber(key: string, value: f64): JsonObjectBuilder {
    return this.putRaw(key, formatNumber(value));
  }

  putBool(key: string, value: bool): JsonObjectBuilder {
    return this.putRaw(key, value ? "true" : "false");
  }

  putNull(key: string): JsonObjectBuilder {
    return this.putRaw(key, "null");
  }

  putStrings(key: string, values: string[]): JsonObjectBuilder {
    return this.putRaw(key, Json.stringArray(values));
  }

  putValue(key: string, value: JsonValue): JsonObjectBuilder {
    return this.putRaw(key, value.toString());
  }

  /** Adds a member whose value is already JSON text (not checked). */
  putRaw(key: string, json: string): JsonObjectBuilder {
    this.parts.push(Json.quote(key) + ":" + json);
    return this;
  }

  toString(): string {
    return "{" + this.parts.join(",") + "}";
  }
}
