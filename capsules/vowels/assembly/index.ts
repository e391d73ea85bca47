// vowels: counts the ASCII vowels in its input; the benchmark plugin.
// `count_vowels` streams the input eight bytes at a time through the kernel (no copy);
// `count_vowels_naive` copies it with the PDK's Host.input() and walks the array, as the
// Extism PDK example does. Both answer {"count": N}.
import "orch-capsule-sdk/abort"; // routes `abort` (a throw, a failed assertion) to the SDK's handler
import { Host } from "@extism/as-pdk";
import { input_length, input_load_u64, input_load_u8 } from "@extism/as-pdk/lib/env";

@inline function vowel(b: u64): i32 {
  const c = (b | 0x20) & 0xff; // ASCII lowercase
  return i32(c == 0x61) | i32(c == 0x65) | i32(c == 0x69) | i32(c == 0x6f) | i32(c == 0x75);
}

function answer(count: i32): void {
  Host.outputString('{"count":' + count.toString() + "}");
}

export function count_vowels(): i32 {
  const n = input_length();
  let count = 0;
  let i: u64 = 0;
  for (; i + 8 <= n; i += 8) {
    const w = input_load_u64(i);
    count += vowel(w) + vowel(w >> 8) + vowel(w >> 16) + vowel(w >> 24)
      + vowel(w >> 32) + vowel(w >> 40) + vowel(w >> 48) + vowel(w >> 56);
  }
  for (; i < n; i++) count += vowel(input_load_u8(i));
  answer(count);
  return 0;
}

export function count_vowels_naive(): i32 {
  const input = Host.input();
  let count = 0;
  for (let i = 0; i < input.length; i++) count += vowel(input[i]);
  answer(count);
  return 0;
}
