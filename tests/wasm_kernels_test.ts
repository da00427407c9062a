import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { conv2d, conv2dTranspose } from "../core/_conv.ts";
import { groupNorm, groupNormSilu } from "../core/_layers.ts";
import {
  wasmConv3x3,
  wasmConv3x3FilterGrad,
  WINO_KC,
} from "../core/_wasm_kernels.ts";
import { naiveConv, type Shape4, size } from "./_conv_ref.ts";
import {
  evalInChild,
  groupNormF64,
  lastJson,
  randoms,
  relErr,
} from "./_util.ts";
import {
  assembleKernels,
  BIN_PATH,
  binSource,
  WINO_KC as ASSEMBLED_KC,
} from "./tools/wasm_kernels.ts";

Deno.test("the committed wasm kernels are the ones tests/tools/wasm_kernels.ts assembles from its text", async () => {
  const { plain, shared } = await assembleKernels();
  const committed = await Deno.readTextFile(BIN_PATH);
  assert.equal(
    committed,
    binSource(plain, shared),
    "stale: run deno run -A tests/tools/wasm_kernels.ts",
  );
  // The caller sizes the transformed input's blocks as the text lays them.
  assert.equal(WINO_KC, ASSEMBLED_KC);
});

/** Which kernels a conv's weight gradient ran, and the gradient. */
async function weightGrad(
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  stride: number,
  pad = 1,
): Promise<{ names: string[]; dw: Float32Array }> {
  const info = await tf.profile(() =>
    tf.grad((v) => tf.sum(conv2d(x, v as tf.Tensor4D, stride, pad)))(w)
  );
  const result = info.result as tf.Tensor;
  const dw = await result.data() as Float32Array;
  result.dispose();
  return { names: info.kernelNames, dw };
}

Deno.test("on wasm, conv weight gradients with Cout a multiple of 8 run ddpm's kernel (strided ones phase by phase), others tfjs's way", async () => {
  await initBackend("wasm");
  const x = tf.randomNormal([2, 6, 6, 5], 0, 1, "float32", 1) as tf.Tensor4D;
  const before = tf.memory().numTensors;
  for (
    const [cout, stride, ours] of [
      [8, 1, true],
      [24, 1, true],
      [12, 1, false],
      [8, 2, true],
      [12, 2, false],
    ] as const
  ) {
    const w = tf.randomNormal(
      [3, 3, 5, cout],
      0,
      1,
      "float32",
      2,
    ) as tf.Tensor4D;
    const { names, dw } = await weightGrad(x, w, stride);
    assert.equal(
      names.includes("DdpmFilterGrad"),
      ours,
      `Cout ${cout}, stride ${stride}: ${names.join(" ")}`,
    );
    // d sum(y) / dW[i, j, c, o] is the sum of x[c] over the pixels tap
    // (i, j) reaches, the same for every o: the centre tap at stride 1
    // reaches every pixel.
    if (stride === 1) {
      const xs = await x.data();
      let want = 0;
      for (let p = 0; p < 2 * 36; p++) want += xs[p * 5 + 3];
      const got = dw[(4 * 5 + 3) * cout + cout - 1];
      assert.ok(Math.abs(got - want) < 1e-4, `${got} vs ${want}`);
    }
    w.dispose();
  }
  assert.equal(tf.memory().numTensors, before);
  x.dispose();
  await initBackend("cpu");
});

Deno.test("on wasm, GroupNorm (+ SiLU) with C a multiple of 4 runs ddpm's kernels and matches a float64 GroupNorm by hand", async () => {
  await initBackend("wasm");
  const cases: [number[], number, number][] = [
    // shape, groups, offset of the values (a large one tests the two passes)
    [[2, 5, 5, 16], 4, 0],
    [[3, 4, 6, 32], 2, 1000],
    [[1, 3, 3, 8], 8, -3],
  ];
  for (const [shape, groups, offset] of cases) {
    const c = shape[3];
    const xs = randoms(shape.reduce((a, b) => a * b), 40).map((v, i) =>
      offset + 3 * v + (i % c) / c
    );
    const gs = randoms(c, 41).map((v) => 1 + v);
    const bs = randoms(c, 42);
    const x = tf.tensor4d(xs, shape as [number, number, number, number]);
    const gamma = tf.tensor1d(gs);
    const beta = tf.tensor1d(bs);
    const y = groupNormF64(xs, shape, gs, bs, groups);
    for (const act of [false, true]) {
      const info = await tf.profile(() =>
        (act ? groupNormSilu : groupNorm)(x, gamma, beta, groups)
      );
      assert.ok(info.kernelNames.includes("DdpmNormStats"), `${shape}`);
      assert.ok(info.kernelNames.includes("DdpmNormAct"), `${shape}`);
      const out = info.result as tf.Tensor;
      const got = await out.data();
      out.dispose();
      let err = 0;
      for (const [j, yj] of y.entries()) {
        const want = act ? yj / (1 + Math.exp(-yj)) : yj;
        err = Math.max(err, Math.abs(got[j] - want));
      }
      // A mean of 1000 in float32 leaves about 1e-4 of (x - mean) r.
      const tol = offset === 1000 ? 2e-3 : 2e-5;
      assert.ok(err < tol, `${shape} act ${act}: ${err}`);
    }
    tf.dispose([x, gamma, beta]);
  }
  await initBackend("cpu");
});

Deno.test("on wasm, ddpm's GroupNorm + SiLU kernel keeps NaN, saturates SiLU at +-100, and leaves C = 6 to tfjs", async () => {
  await initBackend("wasm");
  // Image 0: a NaN in group 0 (channels 0, 1) turns that group NaN; group 1
  // gets gamma 0 and beta 7 and -90, so that its SiLU sees those. Image 1:
  // values up to +-100 in group 0.
  const c = 4;
  const xs = new Float32Array(2 * 2 * 2 * c).fill(1);
  xs[4] = NaN;
  const tails = [100, -100, 3, -50];
  for (let p = 0; p < 4; p++) {
    xs[16 + p * c] = tails[p];
    xs[16 + p * c + 1] = tails[3 - p] / 2;
  }
  const x = tf.tensor4d(xs, [2, 2, 2, c]);
  const gamma = tf.tensor1d([1, 1, 0, 0]);
  const beta = tf.tensor1d([0, 0, 7, -90]);
  const y = groupNormSilu(x, gamma, beta, 2);
  const got = await y.data();
  const silu = (v: number) => v / (1 + Math.exp(-v));
  for (let p = 0; p < 4; p++) {
    assert.ok(Number.isNaN(got[p * c]) && Number.isNaN(got[p * c + 1]));
    assert.ok(Math.abs(got[p * c + 2] - silu(7)) < 1e-5, `${got[p * c + 2]}`);
    assert.ok(Math.abs(got[p * c + 3]) < 1e-30, `silu(-90): ${got[p * c + 3]}`);
  }
  const g0 = xs.slice(16).filter((_, j) => j % c < 2);
  const mean = g0.reduce((a, b) => a + b, 0) / g0.length;
  const r = 1 /
    Math.sqrt(g0.reduce((a, b) => a + (b - mean) ** 2, 0) / g0.length + 1e-5);
  for (let j = 16; j < 32; j++) {
    if (j % c >= 2) continue;
    const want = silu((xs[j] - mean) * r);
    assert.ok(Math.abs(got[j] - want) < 1e-5, `${j}: ${got[j]} vs ${want}`);
  }
  y.dispose();
  // SiLU's own tails: 100 stays 100, -100 goes to -0.
  const big = tf.tensor4d([100, -100, 100, -100], [1, 1, 1, 4]);
  const t = groupNormSilu(
    big,
    tf.zeros([4]),
    tf.tensor1d([100, -100, 88.5, -88.5]),
    1,
  );
  const tv = await t.data();
  assert.ok(Math.abs(tv[0] - 100) < 1e-4 && Math.abs(tv[1]) < 1e-30, `${tv}`);
  assert.ok(Math.abs(tv[2] - 88.5) < 1e-4 && Math.abs(tv[3]) < 1e-30, `${tv}`);
  // C = 6 is left to tfjs's composite.
  const x6 = tf.ones([1, 2, 2, 6]) as tf.Tensor4D;
  const info = await tf.profile(() =>
    groupNormSilu(x6, tf.ones([6]), tf.zeros([6]), 2)
  );
  assert.ok(!info.kernelNames.includes("DdpmNormAct"));
  tf.dispose([x, gamma, beta, big, t, x6, info.result as tf.Tensor]);
  await initBackend("cpu");
});

Deno.test("on wasm, GroupNorm (+ SiLU)'s gradient runs ddpm's two kernels and matches float64 central differences", async () => {
  await initBackend("wasm");
  const shape = [2, 3, 4, 8];
  const groups = 2;
  const size = shape.reduce((a, b) => a * b);
  const xs = randoms(size, 50).map((v, i) => 2 * v + (i % 8) / 4);
  const gs = randoms(8, 51).map((v) => 1 + v);
  const bs = randoms(8, 52);
  const ws = randoms(size, 53);
  for (const act of [true, false]) {
    // L = sum(out * w), in float64 by the definition.
    const loss = (
      x: ArrayLike<number>,
      g: ArrayLike<number>,
      b: ArrayLike<number>,
    ) =>
      groupNormF64(x, shape, g, b, groups).reduce((s, y, j) => {
        const out = act ? y / (1 + Math.exp(-y)) : y;
        return s + out * ws[j];
      }, 0);
    const info = await tf.profile(() => {
      const f = (x: tf.Tensor, g: tf.Tensor, b: tf.Tensor) =>
        tf.sum(tf.mul(
          (act ? groupNormSilu : groupNorm)(x as tf.Tensor4D, g, b, groups),
          tf.tensor4d(ws, shape as [number, number, number, number]),
        ));
      return tf.grads(f)([
        tf.tensor4d(xs, shape as [number, number, number, number]),
        tf.tensor1d(gs),
        tf.tensor1d(bs),
      ]);
    });
    assert.ok(info.kernelNames.includes("DdpmNormGradSums"), `act ${act}`);
    assert.ok(info.kernelNames.includes("DdpmNormGradDx"), `act ${act}`);
    const [dx, dg, db] = await Promise.all(
      (info.result as tf.Tensor[]).map((t) => t.data()),
    );
    tf.dispose(info.result as tf.Tensor[]);
    const h = 1e-4;
    const central = (
      which: 0 | 1 | 2,
      j: number,
    ) => {
      const args = [
        Float64Array.from(xs),
        Float64Array.from(gs),
        Float64Array.from(bs),
      ];
      args[which][j] += h;
      const up = loss(args[0], args[1], args[2]);
      args[which][j] -= 2 * h;
      const down = loss(args[0], args[1], args[2]);
      return (up - down) / (2 * h);
    };
    for (const j of [0, 5, 37, 101, size - 1]) {
      const want = central(0, j);
      assert.ok(
        Math.abs(dx[j] - want) < 1e-4 * (1 + Math.abs(want)),
        `act ${act} dx[${j}]: ${dx[j]} vs ${want}`,
      );
    }
    for (const j of [0, 3, 7]) {
      const wg = central(1, j);
      const wb = central(2, j);
      assert.ok(
        Math.abs(dg[j] - wg) < 1e-3 * (1 + Math.abs(wg)),
        `act ${act} dgamma[${j}]: ${dg[j]} vs ${wg}`,
      );
      assert.ok(
        Math.abs(db[j] - wb) < 1e-3 * (1 + Math.abs(wb)),
        `act ${act} dbeta[${j}]: ${db[j]} vs ${wb}`,
      );
    }
  }
  await initBackend("cpu");
});

/**
 * Shapes for the Winograd kernels, forward and weight gradient: input, output
 * channels, tiles per chunk (0: the default).
 */
const WINOGRAD_CASES: { xs: Shape4; co: number; nt: number }[] = [
  // Odd sizes: output tiles cut at both edges, dy padded to whole tiles.
  { xs: [2, 5, 7, 4], co: 8, nt: 0 },
  // Chunks of 5 tiles: 1-5 rows per micro-kernel block.
  { xs: [3, 8, 8, 64], co: 24, nt: 5 },
  // 3 blocks of the transformed input, the last of 4 channels; for the
  // weight gradient, channel blocks of 6 and no rest.
  { xs: [2, 6, 9, 132], co: 16, nt: 7 },
  // One pixel: one tile, three quarters cut.
  { xs: [1, 1, 1, 8], co: 8, nt: 0 },
  { xs: [2, 4, 4, 12], co: 8, nt: 1 },
];

Deno.test("on wasm, Winograd's F(2x2, 3x3) matches a float64 convolution, with a bias, flipped, in chunks of any size, and leaves other shapes to tfjs", async () => {
  await initBackend("wasm");
  const before = tf.memory().numTensors;
  for (const [i, { xs, co, nt }] of WINOGRAD_CASES.entries()) {
    const ci = xs[3];
    const x = randoms(size(xs), 10 * i);
    const w = randoms(9 * ci * co, 10 * i + 1);
    const bias = randoms(co, 10 * i + 2);
    const ws: Shape4 = [3, 3, ci, co];
    const want = naiveConv(x, xs, w, ws, null, 1, 1, bias).y;
    const [xt, wt, bt] = [
      tf.tensor4d(x, xs),
      tf.tensor4d(w, ws),
      tf.tensor1d(bias),
    ];
    const y = wasmConv3x3(xt, wt, { bias: bt, nt })!;
    assert.ok(
      relErr(await y.data(), want) < 3e-6,
      `${xs} -> ${co}, nt ${nt}`,
    );
    // Flipped: w read as [3, 3, Cout, Cin] turned by 180 degrees, i.e. the
    // convolution whose kernel is wf[i, j, o, c] = w[2 - i, 2 - j, c, o].
    if (co % 4 === 0 && ci % 8 === 0) {
      const wf = new Float32Array(w.length);
      for (let a = 0; a < 9; a++) {
        for (let c = 0; c < ci; c++) {
          for (let o = 0; o < co; o++) {
            wf[(a * ci + c) * co + o] = w[((8 - a) * ci + c) * co + o];
          }
        }
      }
      // The flipped kernel convolves a Cout-channel input into Cin channels.
      const ys: Shape4 = [xs[0], xs[1], xs[2], co];
      const yIn = randoms(size(ys), 10 * i + 3);
      const wantF =
        naiveConv(yIn, ys, swapIo(wf, ci, co), [3, 3, co, ci], null, 1, 1).y;
      const yt = tf.tensor4d(yIn, ys);
      const f = wasmConv3x3(yt, wt, { flip: true, nt })!;
      assert.ok(relErr(await f.data(), wantF) < 3e-6, `flipped ${xs} -> ${co}`);
      tf.dispose([yt, f]);
    }
    tf.dispose([xt, wt, bt, y]);
  }
  // A 4x4, stride-2, padding-1 transposed convolution (the UNet's
  // upsampling) is one Winograd convolution; with Cin 6 it is not.
  for (const [cin, ours] of [[8, true], [6, false]] as const) {
    const [x, w] = [
      tf.randomNormal([2, 4, 4, cin], 0, 1, "float32", 3),
      tf.randomNormal([4, 4, 4, cin], 0, 1, "float32", 4),
    ] as tf.Tensor4D[];
    const info = await tf.profile(() =>
      conv2dTranspose(x, w, [2, 8, 8, 4], 2, 1)
    );
    assert.equal(
      info.kernelNames.includes("DdpmWinograd"),
      ours,
      `Cin ${cin}: ${info.kernelNames.join(" ")}`,
    );
    tf.dispose([x, w, info.result as tf.Tensor]);
  }
  // Not for Winograd: Cin not a multiple of 4, Cout not of 8, a 1x1 kernel.
  const notOurs: [Shape4, Shape4][] = [
    [[1, 4, 4, 6], [3, 3, 6, 8]],
    [[1, 4, 4, 8], [3, 3, 8, 12]],
    [[1, 4, 4, 8], [1, 1, 8, 8]],
  ];
  for (const [xs, ws] of notOurs) {
    const [x, w] = [tf.zeros(xs), tf.zeros(ws)] as tf.Tensor4D[];
    assert.equal(wasmConv3x3(x, w), null, `${xs} * ${ws}`);
    tf.dispose([x, w]);
  }
  assert.equal(tf.memory().numTensors, before);
  await initBackend("cpu");
});

Deno.test("on wasm, the Winograd weight gradient F(3x3, 2x2) matches a float64 one, in chunks of any size, and conv2d's gradient runs it for 3x3, stride 1, padding 1, Cin a multiple of 4", async () => {
  await initBackend("wasm");
  const before = tf.memory().numTensors;
  for (const [i, { xs, co, nt }] of WINOGRAD_CASES.entries()) {
    const ws: Shape4 = [3, 3, xs[3], co];
    const ys: Shape4 = [xs[0], xs[1], xs[2], co];
    const [x, w, r] = [
      randoms(size(xs), 20 * i),
      randoms(size(ws), 20 * i + 1),
      randoms(size(ys), 20 * i + 2),
    ];
    const want = naiveConv(x, xs, w, ws, r, 1, 1).dw;
    const [xt, rt] = [tf.tensor4d(x, xs), tf.tensor4d(r, ys)];
    const dw = wasmConv3x3FilterGrad(xt, rt, nt);
    assert.ok(relErr(await dw.data(), want) < 3e-6, `${xs} -> ${co}, nt ${nt}`);
    tf.dispose([xt, rt, dw]);
  }
  // Routing: Cin 8 runs it; Cin 6, stride 2 and padding 0 do not.
  for (
    const [cin, stride, pad, ours] of [
      [8, 1, 1, true],
      [6, 1, 1, false],
      [8, 2, 1, false],
      [8, 1, 0, false],
    ] as const
  ) {
    const x = tf.randomNormal(
      [2, 6, 6, cin],
      0,
      1,
      "float32",
      1,
    ) as tf.Tensor4D;
    const w = tf.randomNormal(
      [3, 3, cin, 8],
      0,
      1,
      "float32",
      2,
    ) as tf.Tensor4D;
    const { names } = await weightGrad(x, w, stride, pad);
    assert.equal(
      names.includes("DdpmWinogradGrad"),
      ours,
      `Cin ${cin}, stride ${stride}, pad ${pad}: ${names.join(" ")}`,
    );
    tf.dispose([x, w]);
  }
  assert.equal(tf.memory().numTensors, before);
  await initBackend("cpu");
});

/** A [9, a, b] kernel with its channel axes swapped: [9, b, a]. */
function swapIo(w: Float32Array, a: number, b: number): Float32Array {
  const out = new Float32Array(w.length);
  for (let t = 0; t < 9; t++) {
    for (let i = 0; i < a; i++) {
      for (let j = 0; j < b; j++) {
        out[(t * b + j) * a + i] = w[(t * a + i) * b + j];
      }
    }
  }
  return out;
}

Deno.test("DDPM_WASM_KERNELS=0 switches ddpm's wasm kernels off: tfjs's ops give the same gradients", async () => {
  const url = (p: string) => new URL(p, import.meta.url).href;
  const code = `
    import { initBackend, tf } from "${url("../core/backend.ts")}";
    import { conv2d } from "${url("../core/_conv.ts")}";
    import { groupNormSilu } from "${url("../core/_layers.ts")}";
    await initBackend("wasm");
    const x = tf.tensor4d(Array.from({ length: 2 * 8 * 8 * 8 }, (_, i) => Math.sin(i)), [2, 8, 8, 8]);
    const w = tf.tensor4d(Array.from({ length: 9 * 8 * 16 }, (_, i) => Math.cos(i)), [3, 3, 8, 16]);
    const g = tf.tensor1d([1, 2, 3, 4, 5, 6, 7, 8]);
    const b = tf.tensor1d([0, 1, 0, 1, 0, 1, 0, 1]);
    const info = await tf.profile(() => [
      ...tf.grads((xi, wi) => tf.sum(tf.sin(conv2d(xi, wi, 1, 1))))([x, w]),
      tf.grad((wi) => tf.sum(tf.sin(conv2d(x, wi, 2, 1))))(w),
      ...tf.grads((xi, gi, bi) => tf.sum(tf.sin(groupNormSilu(xi, gi, bi, 2))))([x, g, b]),
    ]);
    const values = await Promise.all(info.result.map((t) => t.data()));
    console.log(JSON.stringify({
      ours: info.kernelNames.filter((k) => k.startsWith("Ddpm")),
      values: values.map((v) => Array.from(v)),
    }));
  `;
  const run = async (setting: string) => {
    const out = await evalInChild(code, { DDPM_WASM_KERNELS: setting });
    assert.equal(out.code, 0, out.stderr);
    return lastJson<{ ours: string[]; values: number[][] }>(out.stdout);
  };
  const [on, off] = [await run(""), await run("0")];
  assert.deepEqual(
    [...new Set(on.ours)].sort(),
    [
      "DdpmFilterGrad",
      "DdpmNormAct",
      "DdpmNormGradDx",
      "DdpmNormGradSums",
      "DdpmNormStats",
      "DdpmWinograd",
      "DdpmWinogradGrad",
    ],
  );
  assert.deepEqual(off.ours, []);
  assert.equal(on.values.length, off.values.length);
  on.values.forEach((v, i) => {
    let err = 0;
    let scale = 0;
    v.forEach((a, j) => {
      err = Math.max(err, Math.abs(a - off.values[i][j]));
      scale = Math.max(scale, Math.abs(off.values[i][j]));
    });
    assert.ok(err <= 1e-4 * scale, `gradient ${i}: ${err} of ${scale}`);
  });
});
