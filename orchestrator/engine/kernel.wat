;; The Extism-compatible kernel: the `extism:host/env` functions every Extism PDK imports.
;;
;; It is linked into each plugin instance (one kernel instance per wasmtime Store) and owns
;; its own linear memory, so the per-byte `load_*` / `store_*` / `input_load_*` calls the PDKs
;; make are wasm-to-wasm calls. Python touches this memory only in bulk, once per call
;; (orchestrator/engine/kernel.py mirrors the layout below): it writes the input block and
;; the header before the call and reads the header, the output and the error after it.
;;
;; Memory layout (all integers little-endian):
;;   0    reserved: offset 0 means "no block" (a failed alloc, an unset config key)
;;   8    i64 heap top: end of the last block
;;   16   i64 input offset        24  i64 input length
;;   32   i64 output offset       40  i64 output length
;;   48   i64 error offset (a block, or 0)
;;   56   i64 fault code          64  i64 fault argument a     72  i64 fault argument b
;;   80   i64 number of freed blocks (reuse is searched only when non-zero)
;;   88   i32 generation (bumped by every reset, so stale block headers never look live)
;;   96   i64 size of the last alloc that failed (for error messages)
;;   128  heap: blocks of [i32 tag][u32 capacity][i64 used] followed by `capacity` bytes
;;
;; A block's tag is (generation << 1) | 1 while in use and (generation << 1) when freed.
;; Capacities are multiples of 8, so every data offset is 8-aligned.
;;
;; Guests may read any byte of this memory but write only into the heap: the header stays
;; the kernel's, so offsets Python reads back are always inside memory. Misuse (a store
;; outside memory, `output_set` past the heap, `error_set` on a non-block) records a fault
;; code and traps; the engine turns the code into a named error.
(module
  (import "orch:kernel" "config_get" (func $config_get (param i64) (result i64)))
  (import "orch:kernel" "var_get" (func $var_get (param i64) (result i64)))
  (import "orch:kernel" "var_set" (func $var_set (param i64 i64)))
  (import "orch:kernel" "log" (func $log (param i32 i64)))
  (import "orch:kernel" "get_log_level" (func $get_log_level (result i32)))
  (import "orch:kernel" "http_request" (func $http_request (param i64 i64) (result i64)))
  (import "orch:kernel" "http_status_code" (func $http_status_code (result i32)))
  (import "orch:kernel" "http_headers" (func $http_headers (result i64)))

  (memory (export "memory") 1)

  (global $HEAP i64 (i64.const 128))
  (global $FIRST_DATA i64 (i64.const 144))
  ;; Largest single allocation: memory is 32-bit and capped far below this anyway.
  (global $MAX_ALLOC i64 (i64.const 0xFFFF0000))

  ;; ---- header access -------------------------------------------------------------------
  (func $top (result i64) (i64.load (i32.const 8)))
  (func $memsize (result i64) (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))
  (func $active_tag (result i32) (i32.or (i32.shl (i32.load (i32.const 88)) (i32.const 1)) (i32.const 1)))
  (func $free_tag (result i32) (i32.shl (i32.load (i32.const 88)) (i32.const 1)))

  (func $fault (param $code i64) (param $a i64) (param $b i64)
    (i64.store (i32.const 56) (local.get $code))
    (i64.store (i32.const 64) (local.get $a))
    (i64.store (i32.const 72) (local.get $b))
    unreachable)

  ;; The block header offset for data offset $p, or 0 when $p is not a live block.
  (func $block_of (param $p i64) (result i64)
    (local $blk i32) (local $cap i64)
    (if (i64.lt_u (local.get $p) (global.get $FIRST_DATA)) (then (return (i64.const 0))))
    (if (i64.gt_u (local.get $p) (call $top)) (then (return (i64.const 0))))
    (if (i64.ne (i64.and (local.get $p) (i64.const 7)) (i64.const 0)) (then (return (i64.const 0))))
    (local.set $blk (i32.wrap_i64 (i64.sub (local.get $p) (i64.const 16))))
    (if (i32.ne (i32.load (local.get $blk)) (call $active_tag)) (then (return (i64.const 0))))
    (local.set $cap (i64.extend_i32_u (i32.load offset=4 (local.get $blk))))
    (if (i64.gt_u (i64.add (local.get $p) (local.get $cap)) (call $top)) (then (return (i64.const 0))))
    (if (i64.gt_u (i64.load offset=8 (local.get $blk)) (local.get $cap)) (then (return (i64.const 0))))
    (i64.extend_i32_u (local.get $blk)))

  ;; First freed block with room for $cap bytes (data offset), or 0.
  (func $find_free (param $cap i64) (result i64)
    (local $blk i64) (local $bcap i64) (local $tag i32)
    (local.set $tag (call $free_tag))
    (local.set $blk (global.get $HEAP))
    (block $done
      (loop $next
        (br_if $done (i64.ge_u (local.get $blk) (call $top)))
        (local.set $bcap (i64.extend_i32_u (i32.load offset=4 (i32.wrap_i64 (local.get $blk)))))
        (if (i32.and
              (i32.eq (i32.load (i32.wrap_i64 (local.get $blk))) (local.get $tag))
              (i64.ge_u (local.get $bcap) (local.get $cap)))
          (then (return (i64.add (local.get $blk) (i64.const 16)))))
        (local.set $blk (i64.add (local.get $blk) (i64.add (local.get $bcap) (i64.const 16))))
        (br $next)))
    (i64.const 0))

  ;; ---- allocation ----------------------------------------------------------------------
  (func (export "alloc") (param $n i64) (result i64)
    (local $cap i64) (local $p i64) (local $blk i64) (local $end i64) (local $size i64)
    (if (i64.eqz (local.get $n)) (then (return (i64.const 0))))
    (if (i64.gt_u (local.get $n) (global.get $MAX_ALLOC))
      (then (i64.store (i32.const 96) (local.get $n)) (return (i64.const 0))))
    (local.set $cap (i64.and (i64.add (local.get $n) (i64.const 7)) (i64.const -8)))
    (if (i64.ne (i64.load (i32.const 80)) (i64.const 0))
      (then
        (local.set $p (call $find_free (local.get $cap)))
        (if (i64.ne (local.get $p) (i64.const 0))
          (then
            (i32.store (i32.wrap_i64 (i64.sub (local.get $p) (i64.const 16))) (call $active_tag))
            (i64.store (i32.wrap_i64 (i64.sub (local.get $p) (i64.const 8))) (local.get $n))
            (i64.store (i32.const 80) (i64.sub (i64.load (i32.const 80)) (i64.const 1)))
            (return (local.get $p))))))
    (local.set $blk (call $top))
    (local.set $p (i64.add (local.get $blk) (i64.const 16)))
    (local.set $end (i64.add (local.get $p) (local.get $cap)))
    (local.set $size (call $memsize))
    (if (i64.gt_u (local.get $end) (local.get $size))
      (then
        (if (i32.eq
              (memory.grow (i32.wrap_i64 (i64.shr_u
                (i64.add (i64.sub (local.get $end) (local.get $size)) (i64.const 65535))
                (i64.const 16))))
              (i32.const -1))
          (then (i64.store (i32.const 96) (local.get $n)) (return (i64.const 0))))))
    (i32.store (i32.wrap_i64 (local.get $blk)) (call $active_tag))
    (i32.store offset=4 (i32.wrap_i64 (local.get $blk)) (i32.wrap_i64 (local.get $cap)))
    (i64.store offset=8 (i32.wrap_i64 (local.get $blk)) (local.get $n))
    (i64.store (i32.const 8) (local.get $end))
    (local.get $p))

  (func (export "free") (param $p i64)
    (local $blk i64)
    (local.set $blk (call $block_of (local.get $p)))
    (if (i64.eqz (local.get $blk)) (then (return)))
    (if (i64.eq (local.get $p) (i64.load (i32.const 16)))
      (then (i64.store (i32.const 24) (i64.const 0))))
    (if (i64.eq
          (i64.add (local.get $p) (i64.extend_i32_u (i32.load offset=4 (i32.wrap_i64 (local.get $blk)))))
          (call $top))
      (then
        ;; the last block: give its space back to the bump pointer
        (i32.store (i32.wrap_i64 (local.get $blk)) (i32.const 0))
        (i64.store (i32.const 8) (local.get $blk)))
      (else
        (i32.store (i32.wrap_i64 (local.get $blk)) (call $free_tag))
        (i64.store (i32.const 80) (i64.add (i64.load (i32.const 80)) (i64.const 1))))))

  (func $length (export "length") (param $p i64) (result i64)
    (local $blk i64)
    (local.set $blk (call $block_of (local.get $p)))
    (if (result i64) (i64.eqz (local.get $blk))
      (then (i64.const 0))
      (else (i64.load offset=8 (i32.wrap_i64 (local.get $blk))))))

  (func (export "length_unsafe") (param $p i64) (result i64)
    (call $length (local.get $p)))

  (func (export "memory_bytes") (result i64) (call $memsize))

  (func (export "reset")
    (i64.store (i32.const 8) (global.get $HEAP))
    (i64.store (i32.const 16) (i64.const 0))
    (i64.store (i32.const 24) (i64.const 0))
    (i64.store (i32.const 32) (i64.const 0))
    (i64.store (i32.const 40) (i64.const 0))
    (i64.store (i32.const 48) (i64.const 0))
    (i64.store (i32.const 80) (i64.const 0))
    (i32.store (i32.const 88) (i32.add (i32.load (i32.const 88)) (i32.const 1))))

  ;; ---- loads and stores ----------------------------------------------------------------
  (func (export "load_u8") (param $p i64) (result i32)
    (if (i64.ge_u (local.get $p) (call $memsize))
      (then (call $fault (i64.const 1) (local.get $p) (i64.const 1))))
    (i32.load8_u (i32.wrap_i64 (local.get $p))))

  (func (export "load_u64") (param $p i64) (result i64)
    (if (i64.gt_u (local.get $p) (i64.sub (call $memsize) (i64.const 8)))
      (then (call $fault (i64.const 1) (local.get $p) (i64.const 8))))
    (i64.load (i32.wrap_i64 (local.get $p))))

  (func (export "store_u8") (param $p i64) (param $v i32)
    (if (i32.or (i64.lt_u (local.get $p) (global.get $HEAP))
                (i64.ge_u (local.get $p) (call $memsize)))
      (then (call $fault (i64.const 2) (local.get $p) (i64.const 1))))
    (i32.store8 (i32.wrap_i64 (local.get $p)) (local.get $v)))

  (func (export "store_u64") (param $p i64) (param $v i64)
    (if (i32.or (i64.lt_u (local.get $p) (global.get $HEAP))
                (i64.gt_u (local.get $p) (i64.sub (call $memsize) (i64.const 8))))
      (then (call $fault (i64.const 2) (local.get $p) (i64.const 8))))
    (i64.store (i32.wrap_i64 (local.get $p)) (local.get $v)))

  ;; ---- input ---------------------------------------------------------------------------
  (func (export "input_length") (result i64) (i64.load (i32.const 24)))
  (func (export "input_offset") (result i64) (i64.load (i32.const 16)))

  ;; Reads past the input's end return 0, as in the Extism runtime.
  (func (export "input_load_u8") (param $o i64) (result i32)
    (if (i64.ge_u (local.get $o) (i64.load (i32.const 24))) (then (return (i32.const 0))))
    (i32.load8_u (i32.wrap_i64 (i64.add (i64.load (i32.const 16)) (local.get $o)))))

  (func (export "input_load_u64") (param $o i64) (result i64)
    (local $len i64)
    (local.set $len (i64.load (i32.const 24)))
    (if (i32.or (i64.lt_u (local.get $len) (i64.const 8))
                (i64.gt_u (local.get $o) (i64.sub (local.get $len) (i64.const 8))))
      (then (return (i64.const 0))))
    (i64.load (i32.wrap_i64 (i64.add (i64.load (i32.const 16)) (local.get $o)))))

  ;; ---- output and errors ---------------------------------------------------------------
  (func (export "output_set") (param $p i64) (param $n i64)
    (if (i64.ne (local.get $n) (i64.const 0))
      (then
        (if (i32.or
              (i32.or (i64.lt_u (local.get $p) (global.get $FIRST_DATA))
                      (i64.gt_u (local.get $p) (call $top)))
              (i64.gt_u (local.get $n) (i64.sub (call $top) (local.get $p))))
          (then (call $fault (i64.const 3) (local.get $p) (local.get $n))))))
    (i64.store (i32.const 32) (local.get $p))
    (i64.store (i32.const 40) (local.get $n)))

  (func (export "output_length") (result i64) (i64.load (i32.const 40)))
  (func (export "output_offset") (result i64) (i64.load (i32.const 32)))

  (func (export "error_set") (param $p i64)
    (if (i32.and (i64.ne (local.get $p) (i64.const 0))
                 (i64.eqz (call $block_of (local.get $p))))
      (then (call $fault (i64.const 4) (local.get $p) (i64.const 0))))
    (i64.store (i32.const 48) (local.get $p)))

  (func (export "error_get") (result i64) (i64.load (i32.const 48)))

  ;; ---- host-backed functions (Python) ----------------------------------------------------
  (export "config_get" (func $config_get))
  (export "var_get" (func $var_get))
  (export "var_set" (func $var_set))
  (export "get_log_level" (func $get_log_level))
  (export "http_request" (func $http_request))
  (export "http_status_code" (func $http_status_code))
  (export "http_headers" (func $http_headers))
  (func (export "log_trace") (param $p i64) (call $log (i32.const 0) (local.get $p)))
  (func (export "log_debug") (param $p i64) (call $log (i32.const 1) (local.get $p)))
  (func (export "log_info") (param $p i64) (call $log (i32.const 2) (local.get $p)))
  (func (export "log_warn") (param $p i64) (call $log (i32.const 3) (local.get $p)))
  (func (export "log_error") (param $p i64) (call $log (i32.const 4) (local.get $p)))

  (func $init
    (i64.store (i32.const 8) (global.get $HEAP))
    (i32.store (i32.const 88) (i32.const 1)))
  (start $init))
