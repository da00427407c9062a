/**
 * The source of ddpm's own WebAssembly kernels and the tool that assembles
 * them into `core/_wasm_kernels_bin.ts` (committed, so that the library
 * needs no assembler).
 *
 * ```sh
 * deno run -A tests/tools/wasm_kernels.ts           # rewrite core/_wasm_kernels_bin.ts
 * deno run -A tests/tools/wasm_kernels.ts --check   # exit 1 if it is stale
 * ```
 *
 * One kernel today: the weight gradient of a stride-1 convolution,
 * `dW[i, j, c, o] = sum over pixels p of x[p + (i, j)][c] dy[p][o]`,
 * computed from a zero-padded input and a gradient laid on the same padded
 * grid (see core/_wasm_filter_grad.ts). On that grid the tap (i, j) is a
 * constant shift `i Wp + j` of the flattened pixel index, so each tap is a
 * plain GEMM over pixels: `dW[tap] = X[shift..]^T DY`, rows of X and DY
 * contiguous. The micro-kernel holds a 6 x 8 block of dW (6 input channels
 * by 8 output channels, 12 f32x4 accumulators) and streams pixels through
 * it with `f32x4.relaxed_madd` (a fused multiply-add where the CPU has one;
 * plain SIMD multiply and add reach about 60% of its speed). Pixels go in
 * chunks of `pc` so that a chunk of X and DY stays in cache while every
 * tap and channel block passes over it.
 *
 * Two builds differ only in how they import tfjs's memory: plain (tfjs's
 * single-threaded wasm) and shared (its threaded build).
 *
 * @module
 */
import { fileURLToPath } from "node:url";
import wabtInit from "wabt";

/** Rows (input channels) of the largest micro-kernel. */
const MR = 6;

/** The micro-kernel for `mr` rows: C[mr x 8] += sum over len pixels of A[p][0..mr) x B[p][0..8). */
function microKernel(mr: number): string {
  const rows = [...Array(mr).keys()];
  const cRow = (r: number) =>
    `(i32.add (local.get $c) (i32.mul (local.get $sb) (i32.const ${r})))`;
  return [
    `(func $k${mr} (param $a i32) (param $b i32) (param $c i32) (param $len i32) (param $sa i32) (param $sb i32)`,
    ...rows.map((r) => `(local $c${r}0 v128) (local $c${r}1 v128)`),
    `(local $b0 v128) (local $b1 v128) (local $s v128)`,
    ...rows.map((r) =>
      `(local.set $c${r}0 (v128.load ${
        cRow(r)
      })) (local.set $c${r}1 (v128.load offset=16 ${cRow(r)}))`
    ),
    `(loop $pixels`,
    `(local.set $b0 (v128.load (local.get $b))) (local.set $b1 (v128.load offset=16 (local.get $b)))`,
    ...rows.flatMap((r) => [
      `(local.set $s (v128.load32_splat offset=${4 * r} (local.get $a)))`,
      `(local.set $c${r}0 (f32x4.relaxed_madd (local.get $s) (local.get $b0) (local.get $c${r}0)))`,
      `(local.set $c${r}1 (f32x4.relaxed_madd (local.get $s) (local.get $b1) (local.get $c${r}1)))`,
    ]),
    `(local.set $a (i32.add (local.get $a) (local.get $sa)))`,
    `(local.set $b (i32.add (local.get $b) (local.get $sb)))`,
    `(br_if $pixels (local.tee $len (i32.sub (local.get $len) (i32.const 1)))))`,
    ...rows.map((r) =>
      `(v128.store ${cRow(r)} (local.get $c${r}0)) (v128.store offset=16 ${
        cRow(r)
      } (local.get $c${r}1))`
    ),
    `)`,
  ].join("\n");
}

/** Call the micro-kernel of `mr` rows on the current block. */
function callKernel(mr: number): string {
  return `(call $k${mr} (local.get $a) (i32.add (local.get $db) (i32.shl (local.get $ob) (i32.const 2))) (i32.add (local.get $cbase) (i32.shl (local.get $ob) (i32.const 2))) (local.get $len) (local.get $sa) (local.get $sb))`;
}

/**
 * `filter_grad(x, dy, out, q, ci, co, kh, kw, wp, pc)`: byte offsets of X
 * `[q, ci]`, DY `[q, co]` and dW `[kh kw, ci, co]` (overwritten); q pixels
 * on a grid `wp` wide; co a multiple of 8; pc pixels per chunk.
 */
const DRIVER = `
(func (export "filter_grad") (param $x i32) (param $dy i32) (param $out i32) (param $q i32) (param $ci i32) (param $co i32) (param $kh i32) (param $kw i32) (param $wp i32) (param $pc i32)
  (local $q0 i32) (local $i i32) (local $j i32) (local $t i32) (local $off i32) (local $end i32) (local $len i32)
  (local $xb i32) (local $db i32) (local $cb i32) (local $ob i32) (local $mr i32) (local $sa i32) (local $sb i32) (local $a i32) (local $cbase i32)
  (local.set $sa (i32.shl (local.get $ci) (i32.const 2)))
  (local.set $sb (i32.shl (local.get $co) (i32.const 2)))
  (memory.fill (local.get $out) (i32.const 0)
    (i32.mul (i32.mul (i32.mul (local.get $kh) (local.get $kw)) (local.get $ci)) (local.get $sb)))
  (block $done (loop $chunks
    (br_if $done (i32.ge_s (local.get $q0) (local.get $q)))
    (local.set $t (i32.const 0))
    (local.set $i (i32.const 0))
    (block $idone (loop $rows
      (br_if $idone (i32.ge_s (local.get $i) (local.get $kh)))
      (local.set $j (i32.const 0))
      (block $jdone (loop $cols
        (br_if $jdone (i32.ge_s (local.get $j) (local.get $kw)))
        (local.set $off (i32.add (i32.mul (local.get $i) (local.get $wp)) (local.get $j)))
        ;; the chunk's pixels p with p + off < q
        (local.set $end (i32.add (local.get $q0) (local.get $pc)))
        (if (i32.gt_s (local.get $end) (i32.sub (local.get $q) (local.get $off)))
          (then (local.set $end (i32.sub (local.get $q) (local.get $off)))))
        (local.set $len (i32.sub (local.get $end) (local.get $q0)))
        (if (i32.gt_s (local.get $len) (i32.const 0)) (then
          (local.set $xb (i32.add (local.get $x) (i32.mul (i32.add (local.get $q0) (local.get $off)) (local.get $sa))))
          (local.set $db (i32.add (local.get $dy) (i32.mul (local.get $q0) (local.get $sb))))
          (local.set $cb (i32.const 0))
          (block $cbdone (loop $cblocks
            (br_if $cbdone (i32.ge_s (local.get $cb) (local.get $ci)))
            (local.set $mr (i32.sub (local.get $ci) (local.get $cb)))
            (if (i32.gt_s (local.get $mr) (i32.const ${MR})) (then (local.set $mr (i32.const ${MR}))))
            (local.set $a (i32.add (local.get $xb) (i32.shl (local.get $cb) (i32.const 2))))
            (local.set $cbase (i32.add (local.get $out)
              (i32.mul (i32.add (i32.mul (local.get $t) (local.get $ci)) (local.get $cb)) (local.get $sb))))
            (local.set $ob (i32.const 0))
            (block $obdone (loop $oblocks
              (br_if $obdone (i32.ge_s (local.get $ob) (local.get $co)))
              (block $d (block $c1 (block $c2 (block $c3 (block $c4 (block $c5 (block $c6
                (br_table $c1 $c1 $c2 $c3 $c4 $c5 $c6 (local.get $mr)))
                ${callKernel(6)} (br $d))
                ${callKernel(5)} (br $d))
                ${callKernel(4)} (br $d))
                ${callKernel(3)} (br $d))
                ${callKernel(2)} (br $d))
                ${callKernel(1)})
              (local.set $ob (i32.add (local.get $ob) (i32.const 8)))
              (br $oblocks)))
            (local.set $cb (i32.add (local.get $cb) (local.get $mr)))
            (br $cblocks)))))
        (local.set $t (i32.add (local.get $t) (i32.const 1)))
        (local.set $j (i32.add (local.get $j) (i32.const 1)))
        (br $cols)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $rows)))
    (local.set $q0 (i32.add (local.get $q0) (local.get $pc)))
    (br $chunks))))
`;

/**
 * The kernels' WebAssembly text.
 *
 * @param shared Import a shared memory (tfjs's threaded build) instead of a plain one.
 * @returns The module's text.
 */
export function kernelsWat(shared: boolean): string {
  const memory = shared ? "(memory 1 65536 shared)" : "(memory 1)";
  const kernels = [1, 2, 3, 4, 5, 6].map(microKernel).join("\n");
  return `(module (import "env" "memory" ${memory})\n${kernels}\n${DRIVER})`;
}

/**
 * Assemble both builds.
 *
 * @returns The plain and shared-memory modules.
 */
export async function assembleKernels(): Promise<
  { plain: Uint8Array; shared: Uint8Array }
> {
  const wabt = await wabtInit();
  const build = (shared: boolean) => {
    const mod = wabt.parseWat("ddpm_kernels.wat", kernelsWat(shared), {
      simd: true,
      relaxed_simd: true,
      threads: true,
      bulk_memory: true,
    });
    try {
      // wabt.js's own validate ignores the threads feature (shared
      // memories); V8 validates instead.
      const bytes = new Uint8Array(mod.toBinary({}).buffer);
      if (!WebAssembly.validate(bytes)) {
        throw new Error(`the ${shared ? "shared" : "plain"} build is invalid`);
      }
      return bytes;
    } finally {
      mod.destroy();
    }
  };
  return { plain: build(false), shared: build(true) };
}

/** `core/_wasm_kernels_bin.ts` for the given modules. */
export function binSource(plain: Uint8Array, shared: Uint8Array): string {
  const b64 = (u: Uint8Array) => btoa(String.fromCharCode(...u));
  const wrap = (s: string) => s.match(/.{1,76}/g)!.map((l) => `  "${l}",`);
  return [
    "// Generated by tests/tools/wasm_kernels.ts from its WebAssembly text; do not edit.",
    "// deno-fmt-ignore-file",
    "",
    "/** ddpm's wasm kernels, importing a plain memory (base64). */",
    "export const KERNELS_PLAIN = [",
    ...wrap(b64(plain)),
    '].join("");',
    "",
    "/** ddpm's wasm kernels, importing a shared memory (base64). */",
    "export const KERNELS_SHARED = [",
    ...wrap(b64(shared)),
    '].join("");',
    "",
  ].join("\n");
}

/** Where the assembled kernels are committed. */
export const BIN_PATH = fileURLToPath(
  new URL("../../core/_wasm_kernels_bin.ts", import.meta.url),
);

if (import.meta.main) {
  const { plain, shared } = await assembleKernels();
  const source = binSource(plain, shared);
  if (Deno.args.includes("--check")) {
    const current = await Deno.readTextFile(BIN_PATH).catch(() => "");
    if (current !== source) {
      console.error(
        `${BIN_PATH} is stale: run deno run -A tests/tools/wasm_kernels.ts`,
      );
      Deno.exit(1);
    }
    console.log(`${BIN_PATH} is up to date`);
  } else {
    await Deno.writeTextFile(BIN_PATH, source);
    console.log(
      `wrote ${BIN_PATH} (${plain.length} and ${shared.length} bytes)`,
    );
  }
}
