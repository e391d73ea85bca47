// The raw layer of the SDK: the host functions ("airlocks") of `extism:host/user`, kernel
// memory helpers, and HostResult decoding. Capsules normally use the typed wrappers in
// ./index.ts; use this layer to handle a host error yourself instead of failing the call
// (every Airlock.* function here returns a HostResult and never throws on a host error).
//
// The ABI (README.md, "Host functions"): every argument is the i64 offset of a block in the
// Extism kernel memory (0 for empty text or bytes). Functions that return data return the
// offset of a HostResult block: 0x00 then the payload, or 0x01 then a UTF-8 error message. A
// capability denial does not return at all: the host traps the call.
import { alloc, free, length, load_u64, load_u8, store_u64, store_u8 } from "@extism/as-pdk/lib/env";

// ---- imports -------------------------------------------------------------------------------
// AssemblyScript imports only the functions a capsule actually reaches, so a capsule that
// never touches files does not import the file airlocks.

@external("extism:host/user", "astrid_log")
declare function astrid_log(level: u64, msg: u64): void;
@external("extism:host/user", "astrid_get_config")
declare function astrid_get_config(key: u64): u64;
@external("extism:host/user", "astrid_clock_ms")
declare function astrid_clock_ms(): i64;
@external("extism:host/user", "astrid_kv_get")
declare function astrid_kv_get(key: u64): u64;
@external("extism:host/user", "astrid_kv_set")
declare function astrid_kv_set(key: u64, value: u64): u64;
@external("extism:host/user", "astrid_kv_delete")
declare function astrid_kv_delete(key: u64): u64;
@external("extism:host/user", "astrid_kv_list_keys")
declare function astrid_kv_list_keys(prefix: u64): u64;
@external("extism:host/user", "astrid_ipc_publish")
declare function astrid_ipc_publish(topic: u64, payload: u64): u64;
@external("extism:host/user", "astrid_read_file")
declare function astrid_read_file(path: u64): u64;
@external("extism:host/user", "astrid_write_file")
declare function astrid_write_file(path: u64, data: u64): u64;
@external("extism:host/user", "astrid_fs_readdir")
declare function astrid_fs_readdir(path: u64): u64;
@external("extism:host/user", "astrid_fs_stat")
declare function astrid_fs_stat(path: u64): u64;
@external("extism:host/user", "astrid_fs_exists")
declare function astrid_fs_exists(path: u64): u64;

// ---- kernel memory -------------------------------------------------------------------------

/** The UTF-8 bytes of `s`. */
export function utf8(s: string): Uint8Array {
  return Uint8Array.wrap(String.UTF8.encode(s));
}

/** `bytes` decoded as UTF-8 (invalid sequences become U+FFFD). */
export function fromUtf8(bytes: Uint8Array): string {
  return String.UTF8.decodeUnsafe(bytes.dataStart, <usize>bytes.length);
}

/** Copies `data` into a new kernel block and returns its offset (0 for empty data).
 *  Throws when the kernel cannot allocate (its memory limit is reached). */
export function toKernel(data: Uint8Array): u64 {
  const n = data.length;
  if (n == 0) return 0;
  const offset = alloc(<u64>n);
  if (offset == 0) throw new Error("out of kernel memory (allocating " + n.toString() + " bytes)");
  const src = data.dataStart;
  let i = 0;
  for (; i + 8 <= n; i += 8) store_u64(offset + <u64>i, load<u64>(src + <usize>i));
  for (; i < n; i++) store_u8(offset + <u64>i, load<u8>(src + <usize>i));
  return offset;
}

/** `toKernel` of the UTF-8 bytes of `s`. */
export function stringToKernel(s: string): u64 {
  return s.length == 0 ? 0 : toKernel(utf8(s));
}

/** The bytes of kernel block `offset` from byte `skip` on (empty for offset 0). */
export function fromKernel(offset: u64, skip: u64 = 0): Uint8Array {
  if (offset == 0) return new Uint8Array(0);
  const total = length(offset);
  if (total <= skip) return new Uint8Array(0);
  const n = <i32>(total - skip);
  const out = new Uint8Array(n);
  const dst = out.dataStart;
  const src = offset + skip;
  let i = 0;
  for (; i + 8 <= n; i += 8) store<u64>(dst + <usize>i, load_u64(src + <u64>i));
  for (; i < n; i++) store<u8>(dst + <usize>i, <u8>load_u8(src + <u64>i));
  return out;
}

/** Gives a kernel block back (no-op for 0). */
export function release(offset: u64): void {
  if (offset != 0) free(offset);
}

// ---- HostResult ----------------------------------------------------------------------------

/** A decoded HostResult: `ok` with `payload`, or not ok with `error`. */
export class HostResult {
  constructor(
    public ok: bool,
    public payload: Uint8Array,
    public error: string,
  ) {}

  /** The payload as UTF-8 text. */
  text(): string {
    return fromUtf8(this.payload);
  }

  /** The payload, or throws Error("<context>: <error>") (which fails the call). */
  unwrap(context: string): Uint8Array {
    if (!this.ok) throw new Error(context + ": " + this.error);
    return this.payload;
  }

  /** Decodes (and frees) the HostResult block at `offset` returned by host function `fn`. */
  static decode(fn: string, offset: u64): HostResult {
    const empty = new Uint8Array(0);
    if (offset == 0 || length(offset) == 0) {
      return new HostResult(false, empty, "the host function " + fn + " returned no result");
    }
    const tag = load_u8(offset);
    const body = fromKernel(offset, 1);
    release(offset);
    if (tag == 0) return new HostResult(true, body, "");
    if (tag == 1) return new HostResult(false, empty, fromUtf8(body));
    return new HostResult(false, empty, "the host function " + fn + " returned a malformed result (tag " + tag.toString() + ")");
  }
}

// ---- the raw airlocks ----------------------------------------------------------------------

/** One static method per host function; arguments are AssemblyScript values, copied into the
 *  kernel for the call and freed after it. */
export class Airlock {
  static log(level: string, msg: string): void {
    const l = stringToKernel(level);
    const m = stringToKernel(msg);
    astrid_log(l, m);
    release(m);
    release(l);
  }

  /** The raw configuration value, or null when unset or empty. */
  static getConfig(key: string): string | null {
    const k = stringToKernel(key);
    const offset = astrid_get_config(k);
    release(k);
    if (offset == 0) return null;
    const bytes = fromKernel(offset);
    release(offset);
    return bytes.length == 0 ? null : fromUtf8(bytes);
  }

  static clockMs(): i64 {
    return astrid_clock_ms();
  }

  static kvGet(key: string): HostResult {
    const k = stringToKernel(key);
    const r = astrid_kv_get(k);
    release(k);
    return HostResult.decode("astrid_kv_get", r);
  }

  static kvSet(key: string, value: Uint8Array): HostResult {
    const k = stringToKernel(key);
    const v = toKernel(value);
    const r = astrid_kv_set(k, v);
    release(v);
    release(k);
    return HostResult.decode("astrid_kv_set", r);
  }

  static kvDelete(key: string): HostResult {
    const k = stringToKernel(key);
    const r = astrid_kv_delete(k);
    release(k);
    return HostResult.decode("astrid_kv_delete", r);
  }

  static kvListKeys(prefix: string): HostResult {
    const p = stringToKernel(prefix);
    const r = astrid_kv_list_keys(p);
    release(p);
    return HostResult.decode("astrid_kv_list_keys", r);
  }

  static ipcPublish(topic: string, payloadJson: string): HostResult {
    const t = stringToKernel(topic);
    const p = stringToKernel(payloadJson);
    const r = astrid_ipc_publish(t, p);
    release(p);
    release(t);
    return HostResult.decode("astrid_ipc_publish", r);
  }

  static readFile(path: string): HostResult {
    const p = stringToKernel(path);
    const r = astrid_read_file(p);
    release(p);
    return HostResult.decode("astrid_read_file", r);
  }

  static writeFile(path: string, data: Uint8Array): HostResult {
    const p = stringToKernel(path);
    const d = toKernel(data);
    const r = astrid_write_file(p, d);
    release(d);
    release(p);
    return HostResult.decode("astrid_write_file", r);
  }

  static readdir(path: string): HostResult {
    const p = stringToKernel(path);
    const r = astrid_fs_readdir(p);
    release(p);
    return HostResult.decode("astrid_fs_readdir", r);
  }

  static stat(path: string): HostResult {
    const p = stringToKernel(path);
    const r = astrid_fs_stat(p);
    release(p);
    return HostResult.decode("astrid_fs_stat", r);
  }

  static exists(path: string): HostResult {
    const p = stringToKernel(path);
    const r = astrid_fs_exists(p);
    release(p);
    return HostResult.decode("astrid_fs_exists", r);
  }
}
