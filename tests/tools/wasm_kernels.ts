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
 * The kernels (registered and called by core/_wasm_kernels.ts):
 *
 * - `filter_grad`: the weight gradient of a stride-1 convolution,
 *   `dW[i, j, c, o] = sum over pixels p of x[p + (i, j)][c] dy[p][o]`,
 *   computed from a zero-padded input and a gradient laid on the same
 *   padded grid. On that grid the tap (i, j) is a constant shift `i Wp + j`
 *   of the flattened pixel index, so each tap is a plain GEMM over pixels,
 *   `dW[tap] = X[shift..]^T DY`, rows of X and DY contiguous. The
 *   micro-kernel holds a 6 x 8 block of dW (6 input channels by 8 output
 *   channels, 12 f32x4 accumulators) and streams pixels through it with
 *   `f32x4.relaxed_madd` (a fused multiply-add where the CPU has one;
 *   plain SIMD multiply and add reach about 60% of its speed). Pixels go in
 *   chunks of `pc` so that a chunk of X and DY stays in cache while every
 *   tap and channel block passes over it. (Strided convolutions are cut
 *   into stride-1 phases by the caller.)
 * - `wino_u`, `wino_in`, `wino_gemm`, `wino_out`: 3 x 3, stride-1,
 *   padding-1 convolutions by Winograd's F(2x2, 3x3), and `wgrad_in`,
 *   `wgrad_dy`, `wgrad_gemm`, `wgrad_out` their weight gradient by
 *   F(3x3, 2x2) (see {@linkcode winograd} and {@linkcode weightGradient});
 * - `norm_stats`, `norm_act`: GroupNorm's statistics, and its application
 *   with SiLU, one pass each over NHWC activations;
 * - `norm_grad_sums`, `norm_grad_dx`: GroupNorm(+ SiLU)'s gradient in two
 *   passes, recomputing the normalised input and SiLU's factor;
 * - `adamw`, `ema`: the optimizer's elementwise updates (see
 *   {@linkcode updateKernels}).
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

/**
 * Instructions that call `call(mr)` for the row count in the local `$mr`
 * (1 to 6): the micro-kernels are made for each count, so that their loops
 * hold their accumulators in registers.
 */
function byRows(call: (mr: number) => string): string {
  return `(block $d (block $c1 (block $c2 (block $c3 (block $c4 (block $c5 (block $c6
  (br_table $c1 $c1 $c2 $c3 $c4 $c5 $c6 (local.get $mr)))
  ${call(6)} (br $d))
  ${call(5)} (br $d))
  ${call(4)} (br $d))
  ${call(3)} (br $d))
  ${call(2)} (br $d))
  ${call(1)})`;
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
              ${byRows(callKernel)}
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
 * Input channels per block of Winograd's transformed input: a block's rows
 * are `WINO_KC` floats apart, a constant offset in the micro-kernel.
 */
export const WINO_KC = 64;

/**
 * The micro-kernel of Winograd's products for `mr` rows (tiles):
 * `C[mr x 8] += sum over len of A[r][k] B[k][0..8)`, A's rows `WINO_KC`
 * floats apart and its columns contiguous, B's rows and C's rows `sb`
 * bytes apart.
 */
function winoKernel(mr: number): string {
  const rows = [...Array(mr).keys()];
  const cRow = (r: number) =>
    `(i32.add (local.get $c) (i32.mul (local.get $sb) (i32.const ${r})))`;
  return [
    `(func $g${mr} (param $a i32) (param $b i32) (param $c i32) (param $len i32) (param $sb i32)`,
    ...rows.map((r) => `(local $c${r}0 v128) (local $c${r}1 v128)`),
    `(local $b0 v128) (local $b1 v128) (local $s v128)`,
    ...rows.map((r) =>
      `(local.set $c${r}0 (v128.load ${
        cRow(r)
      })) (local.set $c${r}1 (v128.load offset=16 ${cRow(r)}))`
    ),
    `(loop $k`,
    `(local.set $b0 (v128.load (local.get $b))) (local.set $b1 (v128.load offset=16 (local.get $b)))`,
    ...rows.flatMap((r) => [
      `(local.set $s (v128.load32_splat offset=${
        4 * WINO_KC * r
      } (local.get $a)))`,
      `(local.set $c${r}0 (f32x4.relaxed_madd (local.get $s) (local.get $b0) (local.get $c${r}0)))`,
      `(local.set $c${r}1 (f32x4.relaxed_madd (local.get $s) (local.get $b1) (local.get $c${r}1)))`,
    ]),
    `(local.set $a (i32.add (local.get $a) (i32.const 4)))`,
    `(local.set $b (i32.add (local.get $b) (local.get $sb)))`,
    `(br_if $k (local.tee $len (i32.sub (local.get $len) (i32.const 1)))))`,
    ...rows.map((r) =>
      `(v128.store ${cRow(r)} (local.get $c${r}0)) (v128.store offset=16 ${
        cRow(r)
      } (local.get $c${r}1))`
    ),
    `)`,
  ].join("\n");
}

/** `f32x4` sum or difference of two locals. */
const f4 = (op: "add" | "sub", a: string, b: string) =>
  `(f32x4.${op} (local.get $${a}) (local.get $${b}))`;

/**
 * Winograd's F(2x2, 3x3) convolution (stride 1, a 3 x 3 kernel), in three
 * kernels over a chunk of `nt` 2 x 2 output tiles, four channels per
 * vector; the caller transforms the kernel (`U = G g G^T`, a product) and
 * loops over the chunks:
 *
 * - `wino_in(x, v, h, w, c, th, tw, t0, nt)`: `V = B^T d B` for the 4 x 4
 *   input patch d of each tile t0 .. t0 + nt of the input x `[N, h, w, c]`
 *   (th x tw tiles an image; the patch of tile (i, j) starts at pixel (2 i
 *   - 1, 2 j - 1), and pixels outside the image read as zero: padding 1),
 *   laid `[16][c / KC][nt][KC]`;
 * - `wino_gemm(v, u, m, nt, c, co)`: `M[xi] = V[xi] U[xi]` for the 16
 *   points xi, U `[16][c][co]`, M `[16][nt][co]` (overwritten);
 * - `wino_out(m, y, bias, nt, co, h, w, th, tw, t0, hasBias, ph, cop)`:
 *   `Y = A^T M A` (+ bias) into the output `[N, h, w, co]`, cutting tiles
 *   that cross its bottom or right edge; with `ph` = 2, depth to space on
 *   the way: the output is `[N, 2 h, 2 w, cop]`, channel c of Y going to
 *   channel c % cop of the pixel offset by (p / 2, p % 2), p = c / cop
 *   (`ph` = 1 and `cop` = co for a plain convolution).
 *
 * With `B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, `G = [1 0 0; .5 .5
 * .5; .5 -.5 .5; 0 0 1]` and `A^T = [1 1 1 0; 0 1 -1 -1]` (Lavin and Gray
 * 2016), a tile's products take 16 multiplies per channel pair where the
 * direct convolution takes 36.
 */
function winograd(): string {
  const idx = [0, 1, 2, 3];
  const d = (i: number, j: number) => `d${i}${j}`;
  const e = (i: number, j: number) => `e${i}${j}`;
  // b(x) = (x0 - x2, x1 + x2, x2 - x1, x1 - x3), along j then along i.
  const bt = (x: (k: number) => string) => [
    f4("sub", x(0), x(2)),
    f4("add", x(1), x(2)),
    f4("sub", x(2), x(1)),
    f4("sub", x(1), x(3)),
  ];
  const inLocals = idx.flatMap((i) =>
    idx.map((j) => `(local $${d(i, j)} v128) (local $${e(i, j)} v128)`)
  ).join(" ");
  const at = (i: number, j: number) =>
    `(i32.add (local.get $src) (i32.add (i32.mul (local.get $rowb) (i32.const ${i})) (i32.mul (local.get $pixb) (i32.const ${j}))))`;
  const loads = idx.flatMap((i) =>
    idx.map((j) => `(local.set $${d(i, j)} (v128.load ${at(i, j)}))`)
  );
  // Border tiles: a patch pixel outside the image reads as zero.
  const guardedLoads = idx.flatMap((i) =>
    idx.map((j) =>
      `(local.set $${
        d(i, j)
      } (if (result v128) (i32.and (local.get $ry${i}) (local.get $rx${j})) (then (v128.load ${
        at(i, j)
      })) (else (v128.const i32x4 0 0 0 0))))`
    )
  );
  const rowsT = idx.flatMap((i) =>
    bt((j) => d(i, j)).map((v, j) => `(local.set $${e(i, j)} ${v})`)
  );
  const stores = idx.flatMap((j) =>
    bt((i) => e(i, j)).map((v, p) =>
      `(v128.store (i32.add (local.get $dst) (i32.mul (local.get $xs) (i32.const ${
        p * 4 + j
      }))) ${v})`
    )
  );
  // a(x) = (x0 + x1 + x2, x1 - x2 - x3), along q then along p.
  const mLocals = idx.flatMap((p) => idx.map((q) => `(local $m${p}${q} v128)`))
    .join(" ");
  const mLoads = idx.flatMap((p) =>
    idx.map((q) =>
      `(local.set $m${p}${q} (v128.load (i32.add (local.get $src) (i32.mul (local.get $xs) (i32.const ${
        p * 4 + q
      })))))`
    )
  );
  const rLocals = idx.flatMap((p) =>
    [0, 1].map((b) => `(local $r${p}${b} v128)`)
  ).join(" ");
  const rSet = idx.flatMap((p) => [
    `(local.set $r${p}0 (f32x4.add ${
      f4("add", `m${p}0`, `m${p}1`)
    } (local.get $m${p}2)))`,
    `(local.set $r${p}1 (f32x4.sub ${
      f4("sub", `m${p}1`, `m${p}2`)
    } (local.get $m${p}3)))`,
  ]);
  const yOut = (a: number, b: number) => {
    const v = a === 0
      ? `(f32x4.add (f32x4.add ${
        f4("add", `r0${b}`, `r1${b}`)
      } (local.get $r2${b})) (local.get $bv))`
      : `(f32x4.add (f32x4.sub ${
        f4("sub", `r1${b}`, `r2${b}`)
      } (local.get $r3${b})) (local.get $bv))`;
    const inside = [
      a === 1 ? "(local.get $iny)" : "",
      b === 1 ? "(local.get $inx)" : "",
    ].filter(Boolean);
    const store =
      `(v128.store (i32.add (local.get $dst) (i32.add (i32.mul (local.get $ib) (i32.const ${a})) (i32.mul (local.get $jb) (i32.const ${b})))) ${v})`;
    if (inside.length === 0) return store;
    const cond = inside.length === 2
      ? `(i32.and ${inside[0]} ${inside[1]})`
      : inside[0];
    return `(if ${cond} (then ${store}))`;
  };
  // t -> (image n, tile row ty, tile column tx).
  const tileCoords = `
      (local.set $t (i32.add (local.get $t0) (local.get $l)))
      (local.set $img (i32.div_u (local.get $t) (i32.mul (local.get $th) (local.get $tw))))
      (local.set $rem (i32.rem_u (local.get $t) (i32.mul (local.get $th) (local.get $tw))))
      (local.set $ty (i32.div_u (local.get $rem) (local.get $tw)))
      (local.set $tx (i32.rem_u (local.get $rem) (local.get $tw)))`;
  /**
   * The input transform, its output V laid `[16][c / KC][nt][KC]` when
   * `packed` (rows of a block a constant KC floats apart, for the forward
   * product), else `[16][nt][c]` (for the weight gradient's).
   */
  const inputTransform = (name: string, packed: boolean) => {
    const xsSet = packed
      ? `;; bytes between two points xi of V: (c / KC rounded up) nt KC floats
  (local.set $xs (i32.mul (i32.mul (i32.div_u (i32.add (local.get $c) (i32.const ${
        WINO_KC - 1
      })) (i32.const ${WINO_KC})) (local.get $nt)) (i32.const ${4 * WINO_KC})))`
      : `(local.set $xs (i32.mul (local.get $nt) (local.get $pixb)))`;
    const dstSet = packed
      ? `;; V[xi][cc / KC][l][cc % KC]
      (local.set $dst (i32.add (local.get $v) (i32.shl (i32.add
        (i32.mul (i32.add (i32.mul (i32.shr_u (local.get $cc) (i32.const ${
        Math.log2(WINO_KC)
      })) (local.get $nt)) (local.get $l)) (i32.const ${WINO_KC}))
        (i32.and (local.get $cc) (i32.const ${WINO_KC - 1}))) (i32.const 2))))`
      : `;; V[xi][l][cc]
      (local.set $dst (i32.add (local.get $v) (i32.shl (i32.add (i32.mul (local.get $l) (local.get $c)) (local.get $cc)) (i32.const 2))))`;
    const channels = (load: string[]) =>
      `(local.set $cc (i32.const 0))
      (block $cdone (loop $chans
        (br_if $cdone (i32.ge_u (local.get $cc) (local.get $c)))
        (local.set $src (i32.add (local.get $base) (i32.shl (local.get $cc) (i32.const 2))))
        ${dstSet}
        ${load.join("\n        ")}
        ${rowsT.join("\n        ")}
        ${stores.join("\n        ")}
        (local.set $cc (i32.add (local.get $cc) (i32.const 4)))
        (br $chans)))`;
    const inRange = (v: string, k: number, n: string) =>
      `(i32.lt_u (i32.add (local.get $${v}) (i32.const ${k})) (local.get $${n}))`;
    return `(func (export "${name}") (param $x i32) (param $v i32) (param $h i32) (param $w i32) (param $c i32) (param $th i32) (param $tw i32) (param $t0 i32) (param $nt i32)
  (local $l i32) (local $t i32) (local $img i32) (local $rem i32) (local $ty i32) (local $tx i32)
  (local $pixb i32) (local $rowb i32) (local $xs i32) (local $base i32) (local $cc i32) (local $src i32) (local $dst i32)
  (local $y0 i32) (local $x0 i32)
  ${idx.map((i) => `(local $ry${i} i32) (local $rx${i} i32)`).join(" ")}
  ${inLocals}
  (local.set $pixb (i32.shl (local.get $c) (i32.const 2)))
  (local.set $rowb (i32.mul (local.get $w) (local.get $pixb)))
  ${xsSet}
  (block $ldone (loop $tiles
    (br_if $ldone (i32.ge_u (local.get $l) (local.get $nt)))
    ${tileCoords}
    ;; the patch's top left pixel (-1 on the image's top or left edge)
    (local.set $y0 (i32.sub (i32.shl (local.get $ty) (i32.const 1)) (i32.const 1)))
    (local.set $x0 (i32.sub (i32.shl (local.get $tx) (i32.const 1)) (i32.const 1)))
    ;; (wrapping arithmetic: only the addresses of pixels inside are loaded)
    (local.set $base (i32.add (local.get $x) (i32.add
      (i32.mul (i32.add (i32.mul (local.get $img) (local.get $h)) (local.get $y0)) (local.get $rowb))
      (i32.mul (local.get $x0) (local.get $pixb)))))
    ;; rows and columns of the patch inside the image (unsigned: -1 is out)
    ${
      idx.map((i) =>
        `(local.set $ry${i} ${inRange("y0", i, "h")}) (local.set $rx${i} ${
          inRange("x0", i, "w")
        })`
      ).join("\n    ")
    }
    (if (i32.and (i32.and (local.get $ry0) (local.get $ry3)) (i32.and (local.get $rx0) (local.get $rx3)))
      (then ${channels(loads)})
      (else ${channels(guardedLoads)}))
    (local.set $l (i32.add (local.get $l) (i32.const 1)))
    (br $tiles))))

`;
  };
  const gemmCall = (mr: number) =>
    `(call $g${mr} (i32.add (local.get $ap) (i32.mul (local.get $r0) (i32.const ${
      4 * WINO_KC
    }))) (i32.add (local.get $bp) (i32.shl (local.get $ob) (i32.const 2))) (i32.add (local.get $cp) (i32.shl (local.get $ob) (i32.const 2))) (local.get $klen) (local.get $sb))`;
  return `
${inputTransform("wino_in", true)}
(func (export "wino_gemm") (param $v i32) (param $u i32) (param $m i32) (param $nt i32) (param $c i32) (param $co i32)
  (local $xi i32) (local $kb i32) (local $klen i32) (local $ap i32) (local $bp i32) (local $cp i32)
  (local $ob i32) (local $r0 i32) (local $mr i32) (local $sb i32)
  (local.set $sb (i32.shl (local.get $co) (i32.const 2)))
  (memory.fill (local.get $m) (i32.const 0) (i32.mul (i32.mul (local.get $nt) (local.get $sb)) (i32.const 16)))
  (block $xdone (loop $points
    (br_if $xdone (i32.ge_u (local.get $xi) (i32.const 16)))
    (local.set $cp (i32.add (local.get $m) (i32.mul (i32.mul (local.get $xi) (local.get $nt)) (local.get $sb))))
    (local.set $kb (i32.const 0))
    (block $kdone (loop $kblocks
      (br_if $kdone (i32.ge_u (local.get $kb) (local.get $c)))
      (local.set $klen (i32.sub (local.get $c) (local.get $kb)))
      (if (i32.gt_u (local.get $klen) (i32.const ${WINO_KC})) (then (local.set $klen (i32.const ${WINO_KC}))))
      ;; V[xi][kb / KC]: rows of KC floats
      (local.set $ap (i32.add (local.get $v) (i32.shl (i32.mul (i32.add
        (i32.mul (local.get $xi) (i32.div_u (i32.add (local.get $c) (i32.const ${
    WINO_KC - 1
  })) (i32.const ${WINO_KC})))
        (i32.div_u (local.get $kb) (i32.const ${WINO_KC}))) (i32.mul (local.get $nt) (i32.const ${WINO_KC}))) (i32.const 2))))
      ;; U[xi][kb]
      (local.set $bp (i32.add (local.get $u) (i32.mul (i32.add (i32.mul (local.get $xi) (local.get $c)) (local.get $kb)) (local.get $sb))))
      (local.set $ob (i32.const 0))
      (block $odone (loop $oblocks
        (br_if $odone (i32.ge_u (local.get $ob) (local.get $co)))
        (local.set $r0 (i32.const 0))
        (block $rdone (loop $rblocks
          (br_if $rdone (i32.ge_u (local.get $r0) (local.get $nt)))
          (local.set $mr (i32.sub (local.get $nt) (local.get $r0)))
          (if (i32.gt_u (local.get $mr) (i32.const 6)) (then (local.set $mr (i32.const 6))))
          ${byRows(gemmCall)}
          (local.set $cp (i32.add (local.get $cp) (i32.mul (local.get $mr) (local.get $sb))))
          (local.set $r0 (i32.add (local.get $r0) (local.get $mr)))
          (br $rblocks)))
        (local.set $cp (i32.sub (local.get $cp) (i32.mul (local.get $nt) (local.get $sb))))
        (local.set $ob (i32.add (local.get $ob) (i32.const 8)))
        (br $oblocks)))
      (local.set $kb (i32.add (local.get $kb) (i32.const ${WINO_KC})))
      (br $kblocks)))
    (local.set $xi (i32.add (local.get $xi) (i32.const 1)))
    (br $points))))

(func (export "wino_out") (param $m i32) (param $y i32) (param $bias i32) (param $nt i32) (param $co i32) (param $h i32) (param $w i32) (param $th i32) (param $tw i32) (param $t0 i32) (param $hasBias i32) (param $ph i32) (param $cop i32)
  (local $l i32) (local $t i32) (local $img i32) (local $rem i32) (local $ty i32) (local $tx i32)
  (local $pixb i32) (local $rowb i32) (local $ib i32) (local $jb i32) (local $xs i32) (local $base i32) (local $cc i32) (local $src i32) (local $dst i32)
  (local $iny i32) (local $inx i32) (local $bv v128) (local $p i32) (local $a i32)
  ${mLocals} ${rLocals}
  ;; the output [N, ph h, ph w, cop]: channel cc of M is channel cc % cop of
  ;; phase p = cc / cop, at row offset p / ph and column offset p % ph
  (local.set $pixb (i32.shl (local.get $cop) (i32.const 2)))
  (local.set $rowb (i32.mul (i32.mul (local.get $w) (local.get $ph)) (local.get $pixb)))
  (local.set $ib (i32.mul (local.get $rowb) (local.get $ph)))
  (local.set $jb (i32.mul (local.get $pixb) (local.get $ph)))
  (local.set $xs (i32.mul (local.get $nt) (i32.shl (local.get $co) (i32.const 2))))
  (block $ldone (loop $tiles
    (br_if $ldone (i32.ge_u (local.get $l) (local.get $nt)))
    ${tileCoords}
    (local.set $iny (i32.lt_u (i32.add (i32.shl (local.get $ty) (i32.const 1)) (i32.const 1)) (local.get $h)))
    (local.set $inx (i32.lt_u (i32.add (i32.shl (local.get $tx) (i32.const 1)) (i32.const 1)) (local.get $w)))
    (local.set $base (i32.add (local.get $y) (i32.add
      (i32.mul (i32.mul (i32.add (i32.mul (local.get $img) (local.get $h)) (i32.shl (local.get $ty) (i32.const 1))) (local.get $ph)) (local.get $rowb))
      (i32.mul (i32.shl (local.get $tx) (i32.const 1)) (local.get $jb)))))
    (local.set $cc (i32.const 0))
    (block $cdone (loop $chans
      (br_if $cdone (i32.ge_u (local.get $cc) (local.get $co)))
      (local.set $src (i32.add (local.get $m) (i32.shl (i32.add (i32.mul (local.get $l) (local.get $co)) (local.get $cc)) (i32.const 2))))
      (local.set $p (i32.div_u (local.get $cc) (local.get $cop)))
      (local.set $a (i32.div_u (local.get $p) (local.get $ph)))
      (local.set $dst (i32.add (i32.add (local.get $base)
          (i32.shl (i32.sub (local.get $cc) (i32.mul (local.get $p) (local.get $cop))) (i32.const 2)))
        (i32.add (i32.mul (local.get $a) (local.get $rowb))
          (i32.mul (i32.sub (local.get $p) (i32.mul (local.get $a) (local.get $ph))) (local.get $pixb)))))
      (local.set $bv (if (result v128) (local.get $hasBias)
        (then (v128.load (i32.add (local.get $bias) (i32.shl (local.get $cc) (i32.const 2)))))
        (else (v128.const i32x4 0 0 0 0))))
      ${mLoads.join("\n      ")}
      ${rSet.join("\n      ")}
      ${yOut(0, 0)}
      ${yOut(0, 1)}
      ${yOut(1, 0)}
      ${yOut(1, 1)}
      (local.set $cc (i32.add (local.get $cc) (i32.const 4)))
      (br $chans)))
    (local.set $l (i32.add (local.get $l) (i32.const 1)))
    (br $tiles))))

${inputTransform("wgrad_in", false)}
${weightGradient()}
${kernelTransform()}
`;
}

/**
 * The optimizer's elementwise updates, in float32 with each operation
 * rounded in turn in the order of core/optim.ts's and core/ema.ts's tfjs
 * ops (no fused multiply-add), four lanes at a time and a scalar tail:
 *
 * - `adamw(p, m, v, g, p2, m2, v2, n, decay, om1, b2, om2, bc2, eps, ss,
 *   decays)`: `pd = decays ? p decay : p`, `m2 = m + (g - m) om1`, `v2 = v
 *   b2 + (g g) om2`, `p2 = pd - (m2 / (sqrt(v2) / bc2 + eps)) ss`;
 * - `ema(e, p, out, n, c)`: `out = e - (e - p) c`.
 */
function updateKernels(): string {
  /**
   * A loop over `$off` of an elementwise update, written once for both
   * widths: four lanes (`v128` values, `f32x4` ops, coefficients splatted
   * into `$<name>4`) up to the last whole vector, then one lane (`f32`) to
   * `$n`. `body` gets the width's ops: `op(name, ...args)`, `load(base)`,
   * `store(base, value)`, `x(name)` (a value local: `$<name>v` or
   * `$<name>s`) and `k(name)` (a coefficient).
   */
  const loops = (
    body: (w: {
      op: (name: string, ...args: string[]) => string;
      load: (base: string) => string;
      store: (base: string, value: string) => string;
      x: (name: string) => string;
      k: (name: string) => string;
    }) => string,
  ) =>
    [true, false].map((simd) => {
      const at = (base: string) =>
        `(i32.add (local.get $${base}) (local.get $off))`;
      const label = simd ? "vec" : "one";
      const end = simd
        ? `(i32.shl (i32.and (local.get $n) (i32.const -4)) (i32.const 2))`
        : `(i32.shl (local.get $n) (i32.const 2))`;
      return `(local.set $end ${end})
  (block $${label}done (loop $${label}
    (br_if $${label}done (i32.ge_u (local.get $off) (local.get $end)))
    ${
        body({
          op: (name, ...args) =>
            `(${simd ? "f32x4" : "f32"}.${name} ${args.join(" ")})`,
          load: (base) => `(${simd ? "v128" : "f32"}.load ${at(base)})`,
          store: (base, value) =>
            `(${simd ? "v128" : "f32"}.store ${at(base)} ${value})`,
          x: (name) => `$${name}${simd ? "v" : "s"}`,
          k: (name) => `(local.get $${name}${simd ? "4" : ""})`,
        })
      }
    (local.set $off (i32.add (local.get $off) (i32.const ${simd ? 16 : 4})))
    (br $${label})))`;
    }).join("\n  ");
  const get = (local: string) => `(local.get ${local})`;
  const splats = (names: string[]) =>
    names.map((c) => `(local.set $${c}4 (f32x4.splat (local.get $${c})))`)
      .join("\n  ");
  const adamw = loops(({ op, load, store, x, k }) => {
    const [g, p, m, v] = ["g", "p", "m", "v"].map(x);
    return [
      `(local.set ${g} ${load("g")})`,
      `(local.set ${p} ${load("p")})`,
      `(if (local.get $decays) (then (local.set ${p} ${
        op("mul", get(p), k("decay"))
      })))`,
      `(local.set ${m} ${load("m")})`,
      `(local.set ${m} ${
        op("add", get(m), op("mul", op("sub", get(g), get(m)), k("om1")))
      })`,
      `(local.set ${v} ${
        op(
          "add",
          op("mul", load("v"), k("b2")),
          op("mul", op("mul", get(g), get(g)), k("om2")),
        )
      })`,
      store("m2", get(m)),
      store("v2", get(v)),
      store(
        "p2",
        op(
          "sub",
          get(p),
          op(
            "mul",
            op(
              "div",
              get(m),
              op("add", op("div", op("sqrt", get(v)), k("bc2")), k("eps")),
            ),
            k("ss"),
          ),
        ),
      ),
    ].join("\n    ");
  });
  const ema = loops(({ op, load, store, x, k }) => {
    const e = x("e");
    return [
      `(local.set ${e} ${load("e")})`,
      store(
        "out",
        op("sub", get(e), op("mul", op("sub", get(e), load("p")), k("c"))),
      ),
    ].join("\n    ");
  });
  return `
(func (export "adamw") (param $p i32) (param $m i32) (param $v i32) (param $g i32) (param $p2 i32) (param $m2 i32) (param $v2 i32) (param $n i32)
  (param $decay f32) (param $om1 f32) (param $b2 f32) (param $om2 f32) (param $bc2 f32) (param $eps f32) (param $ss f32) (param $decays i32)
  (local $off i32) (local $end i32) (local $gv v128) (local $mv v128) (local $pv v128) (local $vv v128)
  (local $decay4 v128) (local $om14 v128) (local $b24 v128) (local $om24 v128) (local $bc24 v128) (local $eps4 v128) (local $ss4 v128)
  (local $gs f32) (local $ms f32) (local $ps f32) (local $vs f32)
  ${splats(["decay", "om1", "b2", "om2", "bc2", "eps", "ss"])}
  ${adamw})

(func (export "ema") (param $e i32) (param $p i32) (param $out i32) (param $n i32) (param $c f32)
  (local $off i32) (local $end i32) (local $ev v128) (local $c4 v128) (local $es f32)
  ${splats(["c"])}
  ${ema})
`;
}

/**
 * `wino_u(w, u, ci, co, flip)`: Winograd's kernel transform `U = G g G^T`
 * into U `[16][ci][co]`, four output channels a vector, g the 3 x 3 kernel
 * of each channel pair of w `[3, 3, ci, co]`; or, with `flip`, of w `[3, 3,
 * co, ci]` turned by 180 degrees with its channel axes swapped (the input
 * gradient's kernel), read four scalars a vector.
 */
function kernelTransform(): string {
  const taps = [...Array(9).keys()];
  const g = (i: number, j: number) => `g${i * 3 + j}`;
  // G x = (x0, (x0 + x1 + x2) / 2, (x0 - x1 + x2) / 2, x2).
  const gx = (x: (k: number) => string) => [
    `(local.get $${x(0)})`,
    `(f32x4.mul (local.get $half) (f32x4.add ${
      f4("add", x(0), x(1))
    } (local.get $${x(2)})))`,
    `(f32x4.mul (local.get $half) (f32x4.add ${
      f4("sub", x(0), x(1))
    } (local.get $${x(2)})))`,
    `(local.get $${x(2)})`,
  ];
  const plainLoads = taps.map((t) =>
    `(local.set $g${t} (v128.load (i32.add (local.get $src) (i32.mul (local.get $ts) (i32.const ${t})))))`
  );
  // Flipped: tap t of the turned kernel is tap 8 - t of w, whose four
  // output channels (w's input channels) lie ci apart.
  const lane = (t: number, k: number) =>
    `(f32.load (i32.add (local.get $src) (i32.add (i32.mul (local.get $ts) (i32.const ${
      8 - t
    })) (i32.mul (local.get $cb) (i32.const ${k})))))`;
  const flipLoads = taps.map((t) =>
    `(local.set $g${t} (f32x4.replace_lane 3 (f32x4.replace_lane 2 (f32x4.replace_lane 1 (f32x4.splat ${
      lane(t, 0)
    }) ${lane(t, 1)}) ${lane(t, 2)}) ${lane(t, 3)}))`
  );
  const tSet = [0, 1, 2].flatMap((j) =>
    gx((i) => g(i, j)).map((v, p) => `(local.set $t${p}${j} ${v})`)
  );
  const uStores = [0, 1, 2, 3].flatMap((p) =>
    gx((j) => `t${p}${j}`).map((v, q) =>
      `(v128.store (i32.add (local.get $dst) (i32.mul (local.get $xs) (i32.const ${
        p * 4 + q
      }))) ${v})`
    )
  );
  return `
(func (export "wino_u") (param $w i32) (param $u i32) (param $ci i32) (param $co i32) (param $flip i32)
  (local $c i32) (local $o i32) (local $src i32) (local $dst i32) (local $xs i32) (local $ts i32) (local $cb i32) (local $half v128)
  ${taps.map((t) => `(local $g${t} v128)`).join(" ")}
  ${
    [0, 1, 2, 3].flatMap((p) => [0, 1, 2].map((j) => `(local $t${p}${j} v128)`))
      .join(" ")
  }
  (local.set $half ${splat(0.5)})
  ;; bytes between two points xi of U, and between two taps of w
  (local.set $xs (i32.shl (i32.mul (local.get $ci) (local.get $co)) (i32.const 2)))
  (local.set $ts (local.get $xs))
  ;; flipped: bytes between two of w's output channels (U's input channels)
  (local.set $cb (i32.shl (local.get $ci) (i32.const 2)))
  (block $cdone (loop $ins
    (br_if $cdone (i32.ge_u (local.get $c) (local.get $ci)))
    (local.set $o (i32.const 0))
    (block $odone (loop $outs
      (br_if $odone (i32.ge_u (local.get $o) (local.get $co)))
      (local.set $dst (i32.add (local.get $u) (i32.shl (i32.add (i32.mul (local.get $c) (local.get $co)) (local.get $o)) (i32.const 2))))
      (if (local.get $flip)
        (then
          ;; w [3, 3, co, ci]: element (tap, o, c)
          (local.set $src (i32.add (local.get $w) (i32.shl (i32.add (i32.mul (local.get $o) (local.get $ci)) (local.get $c)) (i32.const 2))))
          ${flipLoads.join("\n          ")})
        (else
          (local.set $src (i32.add (local.get $w) (i32.sub (local.get $dst) (local.get $u))))
          ${plainLoads.join("\n          ")}))
      ${tSet.join("\n      ")}
      ${uStores.join("\n      ")}
      (local.set $o (i32.add (local.get $o) (i32.const 4)))
      (br $outs)))
    (local.set $c (i32.add (local.get $c) (i32.const 1)))
    (br $ins))))
`;
}

/**
 * Winograd's F(3x3, 2x2) for the weight gradient of a 3 x 3, stride-1,
 * padding-1 convolution: per 2 x 2 tile of the output gradient g and the
 * 4 x 4 patch d of the padded input under it, `dW += G^T [(A g A^T) (.)
 * (B^T d B)] G` with F(2x2, 3x3)'s matrices (the transposition principle:
 * `sum_a y_a g_a` of F(2, 3) is linear in its kernel, whose gradient is
 * F(3, 2)). The products, 16 per tile and channel pair where the direct
 * sum takes 36, are GEMMs over the tiles through the weight gradient's
 * micro-kernel:
 *
 * - `wgrad_in`: the input transform, V laid `[16][nt][c]`;
 * - `wgrad_dy(dy, d, h, w, co, th, tw, t0, nt)`: `A g A^T` for the tiles
 *   t0 .. t0 + nt of dy `[N, h, w, co]` (h = 2 th, w = 2 tw), D laid
 *   `[16][nt][co]`;
 * - `wgrad_gemm(v, d, m, nt, c, co)`: `M[xi] += V[xi]^T D[xi]`, M
 *   `[16][c][co]`, summed over chunks (zero it first);
 * - `wgrad_out(m, dw, c, co)`: `dW = G^T M G` into dW `[3, 3, c, co]`.
 */
function weightGradient(): string {
  const idx = [0, 1, 2, 3];
  // A g (A = [1 0; 1 1; 1 -1; 0 -1]) along b, then along a.
  const ag = (x: (k: number) => string) => [
    `(local.get $${x(0)})`,
    f4("add", x(0), x(1)),
    f4("sub", x(0), x(1)),
    `(f32x4.neg (local.get $${x(1)}))`,
  ];
  const gLoads = [0, 1].flatMap((a) =>
    [0, 1].map((b) =>
      `(local.set $g${a}${b} (v128.load (i32.add (local.get $src) (i32.add (i32.mul (local.get $rowb) (i32.const ${a})) (i32.mul (local.get $pixb) (i32.const ${b}))))))`
    )
  );
  const hSet = [0, 1].flatMap((a) =>
    ag((b) => `g${a}${b}`).map((v, q) => `(local.set $h${a}${q} ${v})`)
  );
  const dStores = idx.flatMap((q) =>
    ag((a) => `h${a}${q}`).map((v, p) =>
      `(v128.store (i32.add (local.get $dst) (i32.mul (local.get $xs) (i32.const ${
        p * 4 + q
      }))) ${v})`
    )
  );
  // z(m) = (m0 + (m1 + m2) / 2, (m1 - m2) / 2, (m1 + m2) / 2 + m3): G^T m.
  const gt = (x: (k: number) => string) => {
    const half = (e: string) => `(f32x4.mul (local.get $half) ${e})`;
    return [
      `(f32x4.add (local.get $${x(0)}) ${half(f4("add", x(1), x(2)))})`,
      half(f4("sub", x(1), x(2))),
      `(f32x4.add ${half(f4("add", x(1), x(2)))} (local.get $${x(3)}))`,
    ];
  };
  const mLoads = idx.flatMap((p) =>
    idx.map((q) =>
      `(local.set $m${p}${q} (v128.load (i32.add (local.get $src) (i32.mul (local.get $xs) (i32.const ${
        p * 4 + q
      })))))`
    )
  );
  const rSet = idx.flatMap((p) =>
    gt((q) => `m${p}${q}`).map((v, j) => `(local.set $r${p}${j} ${v})`)
  );
  const wStores = [0, 1, 2].flatMap((j) =>
    gt((p) => `r${p}${j}`).map((v, i) =>
      `(v128.store (i32.add (local.get $dst) (i32.mul (local.get $ts) (i32.const ${
        i * 3 + j
      }))) ${v})`
    )
  );
  const kCall = (mr: number) =>
    `(call $k${mr} (i32.add (local.get $ap) (i32.shl (local.get $cb) (i32.const 2))) (i32.add (local.get $bp) (i32.shl (local.get $ob) (i32.const 2))) (i32.add (local.get $cp) (i32.shl (i32.add (i32.mul (local.get $cb) (local.get $co)) (local.get $ob)) (i32.const 2))) (local.get $nt) (local.get $sa) (local.get $sb))`;
  return `
(func (export "wgrad_dy") (param $dy i32) (param $d i32) (param $h i32) (param $w i32) (param $co i32) (param $th i32) (param $tw i32) (param $t0 i32) (param $nt i32)
  (local $l i32) (local $t i32) (local $img i32) (local $rem i32) (local $ty i32) (local $tx i32)
  (local $pixb i32) (local $rowb i32) (local $xs i32) (local $base i32) (local $cc i32) (local $src i32) (local $dst i32)
  (local $g00 v128) (local $g01 v128) (local $g10 v128) (local $g11 v128)
  ${[0, 1].flatMap((a) => idx.map((q) => `(local $h${a}${q} v128)`)).join(" ")}
  (local.set $pixb (i32.shl (local.get $co) (i32.const 2)))
  (local.set $rowb (i32.mul (local.get $w) (local.get $pixb)))
  (local.set $xs (i32.mul (local.get $nt) (local.get $pixb)))
  (block $ldone (loop $tiles
    (br_if $ldone (i32.ge_u (local.get $l) (local.get $nt)))
    (local.set $t (i32.add (local.get $t0) (local.get $l)))
    (local.set $img (i32.div_u (local.get $t) (i32.mul (local.get $th) (local.get $tw))))
    (local.set $rem (i32.rem_u (local.get $t) (i32.mul (local.get $th) (local.get $tw))))
    (local.set $ty (i32.div_u (local.get $rem) (local.get $tw)))
    (local.set $tx (i32.rem_u (local.get $rem) (local.get $tw)))
    (local.set $base (i32.add (local.get $dy) (i32.add
      (i32.mul (i32.add (i32.mul (local.get $img) (local.get $h)) (i32.shl (local.get $ty) (i32.const 1))) (local.get $rowb))
      (i32.mul (i32.shl (local.get $tx) (i32.const 1)) (local.get $pixb)))))
    (local.set $cc (i32.const 0))
    (block $cdone (loop $chans
      (br_if $cdone (i32.ge_u (local.get $cc) (local.get $co)))
      (local.set $src (i32.add (local.get $base) (i32.shl (local.get $cc) (i32.const 2))))
      (local.set $dst (i32.add (local.get $d) (i32.shl (i32.add (i32.mul (local.get $l) (local.get $co)) (local.get $cc)) (i32.const 2))))
      ${gLoads.join("\n      ")}
      ${hSet.join("\n      ")}
      ${dStores.join("\n      ")}
      (local.set $cc (i32.add (local.get $cc) (i32.const 4)))
      (br $chans)))
    (local.set $l (i32.add (local.get $l) (i32.const 1)))
    (br $tiles))))

(func (export "wgrad_gemm") (param $v i32) (param $d i32) (param $m i32) (param $nt i32) (param $c i32) (param $co i32)
  (local $xi i32) (local $ap i32) (local $bp i32) (local $cp i32) (local $cb i32) (local $ob i32) (local $mr i32)
  (local $sa i32) (local $sb i32)
  (local.set $sa (i32.shl (local.get $c) (i32.const 2)))
  (local.set $sb (i32.shl (local.get $co) (i32.const 2)))
  (block $xdone (loop $points
    (br_if $xdone (i32.ge_u (local.get $xi) (i32.const 16)))
    (local.set $ap (i32.add (local.get $v) (i32.mul (i32.mul (local.get $xi) (local.get $nt)) (local.get $sa))))
    (local.set $bp (i32.add (local.get $d) (i32.mul (i32.mul (local.get $xi) (local.get $nt)) (local.get $sb))))
    (local.set $cp (i32.add (local.get $m) (i32.mul (i32.mul (local.get $xi) (local.get $c)) (local.get $sb))))
    (local.set $cb (i32.const 0))
    (block $cbdone (loop $cblocks
      (br_if $cbdone (i32.ge_u (local.get $cb) (local.get $c)))
      (local.set $mr (i32.sub (local.get $c) (local.get $cb)))
      (if (i32.gt_u (local.get $mr) (i32.const 6)) (then (local.set $mr (i32.const 6))))
      (local.set $ob (i32.const 0))
      (block $odone (loop $oblocks
        (br_if $odone (i32.ge_u (local.get $ob) (local.get $co)))
        ${byRows(kCall)}
        (local.set $ob (i32.add (local.get $ob) (i32.const 8)))
        (br $oblocks)))
      (local.set $cb (i32.add (local.get $cb) (local.get $mr)))
      (br $cblocks)))
    (local.set $xi (i32.add (local.get $xi) (i32.const 1)))
    (br $points))))

(func (export "wgrad_out") (param $m i32) (param $dw i32) (param $c i32) (param $co i32)
  (local $ci i32) (local $cc i32) (local $src i32) (local $dst i32) (local $xs i32) (local $ts i32) (local $half v128)
  ${idx.flatMap((p) => idx.map((q) => `(local $m${p}${q} v128)`)).join(" ")}
  ${
    idx.flatMap((p) => [0, 1, 2].map((j) => `(local $r${p}${j} v128)`)).join(
      " ",
    )
  }
  (local.set $half ${splat(0.5)})
  ;; bytes between two points xi of M, and between two taps of dW
  (local.set $xs (i32.shl (i32.mul (local.get $c) (local.get $co)) (i32.const 2)))
  (local.set $ts (local.get $xs))
  (block $idone (loop $ins
    (br_if $idone (i32.ge_u (local.get $ci) (local.get $c)))
    (local.set $cc (i32.const 0))
    (block $cdone (loop $chans
      (br_if $cdone (i32.ge_u (local.get $cc) (local.get $co)))
      (local.set $src (i32.add (local.get $m) (i32.shl (i32.add (i32.mul (local.get $ci) (local.get $co)) (local.get $cc)) (i32.const 2))))
      (local.set $dst (i32.add (local.get $dw) (i32.shl (i32.add (i32.mul (local.get $ci) (local.get $co)) (local.get $cc)) (i32.const 2))))
      ${mLoads.join("\n      ")}
      ${rSet.join("\n      ")}
      ${wStores.join("\n      ")}
      (local.set $cc (i32.add (local.get $cc) (i32.const 4)))
      (br $chans)))
    (local.set $ci (i32.add (local.get $ci) (i32.const 1)))
    (br $ins))))
`;
}

/** Cephes's expf polynomial on [-ln2/2, ln2/2], highest degree first. */
const EXP_POLY = [
  1.9875691500e-4,
  1.3981999507e-3,
  8.3334519073e-3,
  4.1665795894e-2,
  1.6666665459e-1,
  5.0000001201e-1,
];

/** 1.5 2^23: adding it rounds a float of magnitude below 2^22 to an integer. */
const MAGIC = 12582912;
/** Its bits. */
const MAGIC_BITS = 0x4b400000;

/** A four-lane f32 constant. */
const splat = (v: number) => `(v128.const f32x4 ${v} ${v} ${v} ${v})`;

/**
 * Instructions that set `$s` to 1 / (1 + exp(-y)) on four lanes of the
 * local `$y` (inline: a call per vector costs more than the math), exp as
 * Cephes's expf (range reduction by ln 2 in two parts, a degree-7
 * polynomial, the exponent built in the float's bits), its argument
 * clamped to where it is finite; NaN stays NaN. Uses locals $e, $t, $k,
 * $q, and its constants are locals set once before the loop (`init`):
 * V8 rebuilds a SIMD constant each time it meets one, and they cost as
 * much as the math.
 */
function sigmoidInline(): { locals: string; init: string; body: string } {
  const consts: string[] = [];
  const body = sigmoidText().replace(/\(v128\.const f32x4 [^)]*\)/g, (c) => {
    if (!consts.includes(c)) consts.push(c);
    return `(local.get $sc${consts.indexOf(c)})`;
  });
  return {
    locals: consts.map((_, i) => `(local $sc${i} v128)`).join(" "),
    init: consts.map((c, i) => `(local.set $sc${i} ${c})`).join("\n"),
    body,
  };
}

/** The sigmoid's instructions with its constants inline. */
function sigmoidText(): string {
  const horner = EXP_POLY.slice(1).map((c) =>
    `(local.set $q (f32x4.add (f32x4.mul (local.get $q) (local.get $e)) ${
      splat(c)
    }))`
  );
  return [
    // pmin/pmax are single instructions (min/max are not) and keep a NaN
    // in their first operand.
    `(local.set $e (f32x4.pmin (f32x4.pmax (f32x4.neg (local.get $y)) ${
      splat(-87.3)
    }) ${splat(88.3)}))`,
    // t = e log2(e) + 1.5 2^23 rounds to an integer k held in t's low
    // mantissa bits: k = t - 1.5 2^23 as a float, bits(t) - bits(1.5 2^23)
    // as an integer.
    `(local.set $t (f32x4.add (f32x4.mul (local.get $e) ${
      splat(1.4426950408889634)
    }) ${splat(MAGIC)}))`,
    `(local.set $k (f32x4.sub (local.get $t) ${splat(MAGIC)}))`,
    // e is now r = x - k ln 2, in two parts.
    `(local.set $e (f32x4.sub (local.get $e) (f32x4.mul (local.get $k) ${
      splat(0.693359375)
    })))`,
    `(local.set $e (f32x4.sub (local.get $e) (f32x4.mul (local.get $k) ${
      splat(-2.12194440e-4)
    })))`,
    `(local.set $q ${splat(EXP_POLY[0])})`,
    ...horner,
    // exp(r) = q r^2 + r + 1, times 2^k.
    `(local.set $q (f32x4.add (f32x4.add (f32x4.mul (local.get $q) (f32x4.mul (local.get $e) (local.get $e))) (local.get $e)) ${
      splat(1)
    }))`,
    `(local.set $q (f32x4.mul (local.get $q) (i32x4.shl (i32x4.add (i32x4.sub (local.get $t) (i32x4.splat (i32.const ${MAGIC_BITS}))) (i32x4.splat (i32.const 127))) (i32.const 23))))`,
    `(local.set $s (f32x4.div ${splat(1)} (f32x4.add ${
      splat(1)
    } (local.get $q))))`,
  ].join("\n");
}

/**
 * GroupNorm's statistics and its application (with SiLU), NHWC with C a
 * multiple of 4, images one after another:
 *
 * - `norm_stats(x, mean, r, n, hw, c, groups, eps)`: per image, sums per
 *   channel over the hw pixels, then per group the mean; again for the
 *   squared deviations from it, then r = 1 / sqrt(variance + eps) (two
 *   passes, as tfjs's composite); mean and r broadcast to the channels,
 *   `[n, c]` each.
 * - `norm_act(x, mean, r, gamma, beta, out, n, hw, c, act)`:
 *   y = (x - mean) (r gamma) + beta, and y sigmoid(y) when act.
 */
const SIG = sigmoidInline();

/** Load the four-lane vector of `ptr` at the channel offset `$o`. */
const at = (ptr: string) =>
  `(v128.load (i32.add (local.get $${ptr}) (local.get $o)))`;

/** What {@linkcode channelLoop} builds a kernel from. */
interface ChannelLoop {
  /** Export name. */
  name: string;
  /** Its i32 parameters, in order; n, hw, c and act among them. */
  params: string[];
  /** Instructions run for each image before its pixels. */
  before?: string;
  /** Instructions run on each four-channel vector at byte offset `$o`. */
  body: string;
  /** Pointers that advance by a pixel (C floats) after each pixel. */
  perPixel: string[];
  /** Pointers that advance by C floats after each image. */
  perImage: string[];
}

/** `(local.set $p (i32.add (local.get $p) (local.get $c4)))`: a pointer on by C floats. */
const advance = (ptrs: string[]) =>
  ptrs.map((p) =>
    `(local.set $${p} (i32.add (local.get $${p}) (local.get $c4)))`
  ).join(" ");

/**
 * An elementwise kernel over NHWC activations with C a multiple of 4,
 * images one after another: for each image, `before`, then `body` on every
 * four-channel vector of every pixel, with the SiLU locals and constants of
 * {@linkcode sigmoidInline} and the vector locals $y $xh $dy at hand.
 */
function channelLoop(k: ChannelLoop): string {
  return `
(func (export "${k.name}") ${k.params.map((p) => `(param $${p} i32)`).join(" ")}
  (local $c4 i32) (local $p i32) (local $o i32) (local $y v128) (local $xh v128) (local $dy v128)
  (local $s v128) (local $e v128) (local $t v128) (local $k v128) (local $q v128) ${SIG.locals}
  ${SIG.init}
  (local.set $c4 (i32.shl (local.get $c) (i32.const 2)))
  (loop $images
    ${k.before ?? ""}
    (local.set $p (local.get $hw))
    (loop $pixels
      (local.set $o (i32.const 0))
      (loop $chans
${k.body}
        (br_if $chans (i32.lt_u (local.tee $o (i32.add (local.get $o) (i32.const 16))) (local.get $c4))))
      ${advance(k.perPixel)}
      (br_if $pixels (local.tee $p (i32.sub (local.get $p) (i32.const 1)))))
    ${advance(k.perImage)}
    (br_if $images (local.tee $n (i32.sub (local.get $n) (i32.const 1))))))
`;
}

const NORM_ACT = channelLoop({
  name: "norm_act",
  params: ["x", "mean", "r", "gamma", "beta", "out", "n", "hw", "c", "act"],
  body: `
        (local.set $y (f32x4.add
          (f32x4.mul (f32x4.sub ${at("x")} ${at("mean")}) (f32x4.mul ${
    at("r")
  } ${at("gamma")}))
          ${at("beta")}))
        (if (local.get $act) (then
${SIG.body}
          (local.set $y (f32x4.mul (local.get $y) (local.get $s)))))
        (v128.store (i32.add (local.get $out) (local.get $o)) (local.get $y))`,
  perPixel: ["x", "out"],
  perImage: ["mean", "r"],
});

const NORM = `
(func $channel_sums (param $x i32) (param $acc i32) (param $hw i32) (param $c4 i32) (param $mean i32) (param $square i32)
  (local $p i32) (local $o i32) (local $v v128)
  (memory.fill (local.get $acc) (i32.const 0) (local.get $c4))
  (local.set $p (local.get $hw))
  (loop $pixels
    (local.set $o (i32.const 0))
    (loop $chans
      (local.set $v (v128.load (i32.add (local.get $x) (local.get $o))))
      (if (local.get $square) (then
        (local.set $v (f32x4.sub (local.get $v) (v128.load (i32.add (local.get $mean) (local.get $o)))))
        (local.set $v (f32x4.mul (local.get $v) (local.get $v)))))
      (v128.store (i32.add (local.get $acc) (local.get $o))
        (f32x4.add (v128.load (i32.add (local.get $acc) (local.get $o))) (local.get $v)))
      (br_if $chans (i32.lt_u (local.tee $o (i32.add (local.get $o) (i32.const 16))) (local.get $c4))))
    (local.set $x (i32.add (local.get $x) (local.get $c4)))
    (br_if $pixels (local.tee $p (i32.sub (local.get $p) (i32.const 1))))))

;; Replace each channel's sum in acc by its group's sum / count, or by
;; 1 / sqrt(that + eps) when rsqrt.
(func $group_reduce (param $acc i32) (param $c i32) (param $groups i32) (param $count f64) (param $eps f64) (param $rsqrt i32)
  (local $per i32) (local $g i32) (local $k i32) (local $s f64) (local $at i32)
  (local.set $per (i32.div_u (local.get $c) (local.get $groups)))
  (loop $group
    (local.set $at (i32.add (local.get $acc) (i32.shl (i32.mul (local.get $g) (local.get $per)) (i32.const 2))))
    (local.set $s (f64.const 0))
    (local.set $k (i32.const 0))
    (loop $sum
      (local.set $s (f64.add (local.get $s) (f64.promote_f32 (f32.load (i32.add (local.get $at) (i32.shl (local.get $k) (i32.const 2)))))))
      (br_if $sum (i32.lt_u (local.tee $k (i32.add (local.get $k) (i32.const 1))) (local.get $per))))
    (local.set $s (f64.div (local.get $s) (local.get $count)))
    (if (local.get $rsqrt) (then
      (local.set $s (f64.div (f64.const 1) (f64.sqrt (f64.promote_f32 (f32.add (f32.demote_f64 (local.get $s)) (f32.demote_f64 (local.get $eps)))))))))
    (local.set $k (i32.const 0))
    (loop $put
      (f32.store (i32.add (local.get $at) (i32.shl (local.get $k) (i32.const 2))) (f32.demote_f64 (local.get $s)))
      (br_if $put (i32.lt_u (local.tee $k (i32.add (local.get $k) (i32.const 1))) (local.get $per))))
    (br_if $group (i32.lt_u (local.tee $g (i32.add (local.get $g) (i32.const 1))) (local.get $groups)))))

(func (export "norm_stats") (param $x i32) (param $mean i32) (param $r i32) (param $n i32) (param $hw i32) (param $c i32) (param $groups i32) (param $eps f32)
  (local $c4 i32) (local $count f64)
  (local.set $c4 (i32.shl (local.get $c) (i32.const 2)))
  (local.set $count (f64.convert_i32_u (i32.mul (local.get $hw) (i32.div_u (local.get $c) (local.get $groups)))))
  (loop $images
    (call $channel_sums (local.get $x) (local.get $mean) (local.get $hw) (local.get $c4) (local.get $mean) (i32.const 0))
    (call $group_reduce (local.get $mean) (local.get $c) (local.get $groups) (local.get $count) (f64.const 0) (i32.const 0))
    (call $channel_sums (local.get $x) (local.get $r) (local.get $hw) (local.get $c4) (local.get $mean) (i32.const 1))
    (call $group_reduce (local.get $r) (local.get $c) (local.get $groups) (local.get $count) (f64.promote_f32 (local.get $eps)) (i32.const 1))
    (local.set $x (i32.add (local.get $x) (i32.mul (local.get $hw) (local.get $c4))))
    (local.set $mean (i32.add (local.get $mean) (local.get $c4)))
    (local.set $r (i32.add (local.get $r) (local.get $c4)))
    (br_if $images (local.tee $n (i32.sub (local.get $n) (i32.const 1))))))

`;

/**
 * Instructions that recompute, at the pixel `$x` and channel offset `$o`,
 * xhat = (x - mean) r into `$xh` and the gradient reaching the norm's output
 * into `$dy`: dz, or through SiLU dz s (1 + y (1 - s)) with y = gamma xhat +
 * beta and s = sigmoid(y).
 */
const RECOMPUTE = `
        (local.set $xh (f32x4.mul (f32x4.sub ${at("x")} ${at("mean")}) ${
  at("r")
}))
        (local.set $dy ${at("dz")})
        (if (local.get $act) (then
          (local.set $y (f32x4.add (f32x4.mul (local.get $xh) ${at("gamma")}) ${
  at("beta")
}))
${SIG.body}
          (local.set $dy (f32x4.mul (local.get $dy) (f32x4.mul (local.get $s)
            (f32x4.add ${splat(1)} (f32x4.mul (local.get $y) (f32x4.sub ${
  splat(1)
} (local.get $s)))))))))`;

/**
 * The two passes of GroupNorm(+ SiLU)'s gradient (see core/_layers.ts's
 * normActGrad), recomputing xhat and SiLU's factor in each:
 *
 * - `norm_grad_sums(x, mean, r, gamma, beta, dz, sdy, sdyx, n, hw, c, act)`:
 *   per image and channel, the sums over pixels of dy and dy xhat, `[n, c]`;
 * - `norm_grad_dx(x, mean, r, gamma, beta, dz, ra, rb, out, n, hw, c, act)`:
 *   dx = dy (r gamma) - xhat rb - ra, with ra and rb per image and channel.
 */
const NORM_GRAD = [
  channelLoop({
    name: "norm_grad_sums",
    params: [
      ...["x", "mean", "r", "gamma", "beta", "dz", "sdy", "sdyx"],
      ...["n", "hw", "c", "act"],
    ],
    before: `(memory.fill (local.get $sdy) (i32.const 0) (local.get $c4))
    (memory.fill (local.get $sdyx) (i32.const 0) (local.get $c4))`,
    body: `${RECOMPUTE}
        (v128.store (i32.add (local.get $sdy) (local.get $o)) (f32x4.add ${
      at("sdy")
    } (local.get $dy)))
        (v128.store (i32.add (local.get $sdyx) (local.get $o)) (f32x4.add ${
      at("sdyx")
    } (f32x4.mul (local.get $dy) (local.get $xh))))`,
    perPixel: ["x", "dz"],
    perImage: ["mean", "r", "sdy", "sdyx"],
  }),
  channelLoop({
    name: "norm_grad_dx",
    params: [
      ...["x", "mean", "r", "gamma", "beta", "dz", "ra", "rb", "out"],
      ...["n", "hw", "c", "act"],
    ],
    body: `${RECOMPUTE}
        (v128.store (i32.add (local.get $out) (local.get $o))
          (f32x4.sub
            (f32x4.sub (f32x4.mul (local.get $dy) (f32x4.mul ${at("r")} ${
      at("gamma")
    })) (f32x4.mul (local.get $xh) ${at("rb")}))
            ${at("ra")}))`,
    perPixel: ["x", "dz", "out"],
    perImage: ["mean", "r", "ra", "rb"],
  }),
].join("\n");

/**
 * The kernels' WebAssembly text.
 *
 * @param shared Import a shared memory (tfjs's threaded build) instead of a plain one.
 * @returns The module's text.
 */
export function kernelsWat(shared: boolean): string {
  const memory = shared ? "(memory 1 65536 shared)" : "(memory 1)";
  const kernels = [1, 2, 3, 4, 5, 6].flatMap((mr) => [
    microKernel(mr),
    winoKernel(mr),
  ]).join("\n");
  return `(module (import "env" "memory" ${memory})\n${kernels}\n${DRIVER}\n${winograd()}\n${updateKernels()}\n${NORM}\n${NORM_ACT}\n${NORM_GRAD})`;
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
    "/** The module's bytes, importing a shared memory (tfjs's threaded build) or a plain one. */",
    "export function kernelBytes(shared: boolean): Uint8Array<ArrayBuffer> {",
    "  const b64 = shared ? KERNELS_SHARED : KERNELS_PLAIN;",
    "  return Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));",
    "}",
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
