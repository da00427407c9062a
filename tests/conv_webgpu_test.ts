/**
 * The WebGPU weight gradient (core/_webgpu_conv.ts, a split-K GEMM) against
 * a float64 loop of the definition and against the existing path on the cpu
 * backend (tfjs's conv2d over the batch axis). Skipped where no WebGPU
 * adapter exists; runs on Mesa's llvmpipe here.
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { conv2d, conv2dTranspose } from "../core/_conv.ts";
import { webgpuFilterGrad } from "../core/_webgpu_conv.ts";
import { randoms, relErr } from "./_util.ts";

type Shape4 = [number, number, number, number];

const size = (s: number[]) => s.reduce((a, b) => a * b, 1);
const at4 = (s: number[], a: number, b: number, c: number, d: number) =>
  ((a * s[1] + b) * s[2] + c) * s[3] + d;
const outSize = (n: number, k: number, s: number, p: number) =>
  Math.floor((n + 2 * p - k) / s) + 1;

/**
 * dW of conv2d(x, w, stride, pad) given the output gradient r, by the
 * definition in float64: dW[i, j, c, o] = sum x[n, y s + i - p, x s + j - p, c] r[n, y, x, o].
 */
function naiveDw(
  x: Float32Array,
  xs: Shape4,
  r: Float32Array,
  rs: Shape4,
  k: number,
  stride: number,
  pad: number,
): Float64Array {
  const [n, h, w, cin] = xs;
  const [, oh, ow, cout] = rs;
  const ws = [k, k, cin, cout];
  const dw = new Float64Array(size(ws));
  for (let b = 0; b < n; b++) {
    for (let y = 0; y < oh; y++) {
      for (let xo = 0; xo < ow; xo++) {
        for (let i = 0; i < k; i++) {
          const iy = y * stride + i - pad;
          if (iy < 0 || iy >= h) continue;
          for (let j = 0; j < k; j++) {
            const ix = xo * stride + j - pad;
            if (ix < 0 || ix >= w) continue;
            for (let c = 0; c < cin; c++) {
              const xv = x[at4(xs, b, iy, ix, c)];
              for (let o = 0; o < cout; o++) {
                dw[at4(ws, i, j, c, o)] += xv * r[at4(rs, b, y, xo, o)];
              }
            }
          }
        }
      }
    }
  }
  return dw;
}

/**
 * dW of PyTorch's ConvTranspose2d (input pixel (iy, ix) scatters w[i, j, o, c]
 * into output (iy s + i - p, ix s + j - p)) given the output gradient r, in
 * float64. w is [k, k, Cout, Cin]. dW[i, j, o, c] = sum x[n, iy, ix, c]
 * r[n, iy s + i - p, ix s + j - p, o]: the convolution's definition with
 * the roles of input and output gradient swapped.
 */
function naiveDwT(
  x: Float32Array,
  xs: Shape4,
  r: Float32Array,
  rs: Shape4,
  k: number,
  stride: number,
  pad: number,
): Float64Array {
  return naiveDw(r, rs, x, xs, k, stride, pad);
}

interface Case {
  name: string;
  x: Shape4;
  k: number;
  cout: number;
  stride: number;
  pad: number;
  /** K chunk lengths to force on the WebGPU program (undefined: its own plan). */
  chunks: (number | undefined)[];
}

const CASES: Case[] = [
  {
    name: "3x3 s1 p1",
    x: [2, 8, 8, 3],
    k: 3,
    cout: 5,
    stride: 1,
    pad: 1,
    chunks: [undefined, 16, 48],
  },
  // K = 3 * 4 * 5 = 60: chunks of 16 (last 12) and 32 (last 28).
  {
    name: "3x3 s2 p1",
    x: [3, 7, 9, 4],
    k: 3,
    cout: 6,
    stride: 2,
    pad: 1,
    chunks: [undefined, 16, 32],
  },
  {
    name: "1x1 s1 p0",
    x: [3, 5, 6, 7],
    k: 1,
    cout: 9,
    stride: 1,
    pad: 0,
    chunks: [undefined, 16],
  },
  {
    name: "channels-in 1",
    x: [4, 8, 8, 1],
    k: 3,
    cout: 64,
    stride: 1,
    pad: 1,
    chunks: [undefined, 80],
  },
  {
    name: "channels-out 1",
    x: [2, 6, 5, 9],
    k: 3,
    cout: 1,
    stride: 1,
    pad: 1,
    chunks: [undefined, 16],
  },
  // M = 3 * 3 * 20 = 180 and Cout = 70: several 64-wide tiles, both ragged.
  {
    name: "64-wide tiles, ragged",
    x: [2, 6, 6, 20],
    k: 3,
    cout: 70,
    stride: 1,
    pad: 1,
    chunks: [undefined, 16, 64],
  },
  // K = 8 * 16 * 16 = 2048: the default plan splits K.
  {
    name: "default split of K",
    x: [8, 16, 16, 8],
    k: 3,
    cout: 16,
    stride: 1,
    pad: 1,
    chunks: [undefined],
  },
  // Stride 2 with a kernel that reaches past the last row (pad 2).
  {
    name: "3x3 s2 p2",
    x: [1, 6, 7, 2],
    k: 3,
    cout: 3,
    stride: 2,
    pad: 2,
    chunks: [undefined, 16],
  },
];

interface TCase {
  x: Shape4;
  k: number;
  cout: number;
  out: [number, number];
  stride: number;
  pad: number;
}

const T_CASES: TCase[] = [
  // The UNet's upsampling: ConvTranspose2d k = 4, s = 2, p = 1.
  { x: [2, 4, 4, 6], k: 4, cout: 3, out: [8, 8], stride: 2, pad: 1 },
  // PyTorch's output_padding = 1.
  { x: [3, 3, 5, 4], k: 3, cout: 5, out: [6, 10], stride: 2, pad: 1 },
];

function caseData(c: Case, seed: number) {
  const rs: Shape4 = [
    c.x[0],
    outSize(c.x[1], c.k, c.stride, c.pad),
    outSize(c.x[2], c.k, c.stride, c.pad),
    c.cout,
  ];
  const x = randoms(size(c.x), seed);
  const r = randoms(size(rs), seed + 1);
  const ws: Shape4 = [c.k, c.k, c.x[3], c.cout];
  const w = randoms(size(ws), seed + 2);
  return { rs, ws, x, r, w };
}

function tCaseData(c: TCase, seed: number) {
  const rs: Shape4 = [c.x[0], c.out[0], c.out[1], c.cout];
  const ws: Shape4 = [c.k, c.k, c.cout, c.x[3]];
  return {
    rs,
    ws,
    x: randoms(size(c.x), seed),
    r: randoms(size(rs), seed + 1),
    w: randoms(size(ws), seed + 2),
  };
}

/** dW of sum(f(x, w) * r) through the op's gradient on the active backend. */
async function dwThroughGrad(
  f: (x: tf.Tensor4D, w: tf.Tensor4D) => tf.Tensor4D,
  x: Float32Array,
  xs: Shape4,
  w: Float32Array,
  ws: Shape4,
  r: Float32Array,
  rs: Shape4,
): Promise<Float32Array> {
  const xt = tf.tensor4d(x, xs);
  const wt = tf.tensor4d(w, ws);
  const rt = tf.tensor4d(r, rs);
  const dw = tf.grad((b: tf.Tensor) =>
    tf.sum(tf.mul(f(xt, b as tf.Tensor4D), rt))
  )(wt);
  const out = await dw.data() as Float32Array;
  tf.dispose([xt, wt, rt, dw]);
  return out;
}

/** The weight gradients of every case, through conv2d's and conv2dTranspose's gradients. */
async function gradsOnActive(): Promise<Float32Array[]> {
  const out: Float32Array[] = [];
  for (const [i, c] of CASES.entries()) {
    const d = caseData(c, 10 * i);
    out.push(
      await dwThroughGrad(
        (a, b) => conv2d(a, b, c.stride, c.pad),
        d.x,
        c.x,
        d.w,
        d.ws,
        d.r,
        d.rs,
      ),
    );
  }
  for (const [i, c] of T_CASES.entries()) {
    const d = tCaseData(c, 500 + 10 * i);
    out.push(
      await dwThroughGrad(
        (a, b) => conv2dTranspose(a, b, d.rs, c.stride, c.pad),
        d.x,
        c.x,
        d.w,
        d.ws,
        d.r,
        d.rs,
      ),
    );
  }
  return out;
}

Deno.test("webgpuFilterGrad matches the definition and the cpu backend's weight gradient", async () => {
  const cpu = await initBackend("cpu");
  assert.equal(cpu.backend, "cpu");
  const onCpu = await gradsOnActive();
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return; // no adapter on this machine
  try {
    const before = tf.memory().numTensors;
    for (const [i, c] of CASES.entries()) {
      const d = caseData(c, 10 * i);
      const want = naiveDw(d.x, c.x, d.r, d.rs, c.k, c.stride, c.pad);
      const xt = tf.tensor4d(d.x, c.x);
      const rt = tf.tensor4d(d.r, d.rs);
      for (const chunk of c.chunks) {
        const dw = webgpuFilterGrad(xt, rt, {
          kh: c.k,
          kw: c.k,
          stride: c.stride,
          pad: c.pad,
          chunk,
        });
        assert.deepEqual(dw.shape, d.ws);
        const v = await dw.data() as Float32Array;
        dw.dispose();
        const what = `${c.name} ${JSON.stringify(c.x)}, chunk ${chunk}`;
        assert.ok(relErr(v, want) < 1e-5, `dW vs definition: ${what}`);
        assert.ok(relErr(v, onCpu[i]) < 1e-5, `dW vs cpu: ${what}`);
      }
      tf.dispose([xt, rt]);
    }
    assert.equal(tf.memory().numTensors, before);
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("conv2d and conv2dTranspose weight gradients on webgpu match the definition and the cpu backend", async () => {
  const cpu = await initBackend("cpu");
  assert.equal(cpu.backend, "cpu");
  const onCpu = await gradsOnActive();
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  try {
    const onGpu = await gradsOnActive();
    for (const [i, c] of CASES.entries()) {
      const d = caseData(c, 10 * i);
      const want = naiveDw(d.x, c.x, d.r, d.rs, c.k, c.stride, c.pad);
      assert.ok(relErr(onGpu[i], want) < 1e-5, `conv ${c.name} vs definition`);
      assert.ok(relErr(onGpu[i], onCpu[i]) < 1e-5, `conv ${c.name} vs cpu`);
    }
    for (const [i, c] of T_CASES.entries()) {
      const d = tCaseData(c, 500 + 10 * i);
      const want = naiveDwT(d.x, c.x, d.r, d.rs, c.k, c.stride, c.pad);
      const j = CASES.length + i;
      const what = `transposed conv ${JSON.stringify(c)}`;
      assert.ok(relErr(onGpu[j], want) < 1e-5, `${what} vs definition`);
      assert.ok(relErr(onGpu[j], onCpu[j]) < 1e-5, `${what} vs cpu`);
    }
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("webgpuFilterGrad takes one dispatch when K fits one chunk, two when split", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  try {
    const x = tf.tensor4d(randoms(2 * 8 * 8 * 3, 1), [2, 8, 8, 3]);
    const dy = tf.tensor4d(randoms(2 * 8 * 8 * 5, 2), [2, 8, 8, 5]);
    const geometry = { kh: 3, kw: 3, stride: 1, pad: 1 };
    const count = async (chunk?: number) =>
      (await tf.profile(() => webgpuFilterGrad(x, dy, { ...geometry, chunk })))
        .kernels.map((k) => k.name);
    assert.deepEqual(await count(), ["DdpmConvFilterGradPartial"]);
    assert.deepEqual(await count(32), [
      "DdpmConvFilterGradPartial",
      "DdpmSplitKSum",
    ]);
    tf.dispose([x, dy]);
  } finally {
    await initBackend("cpu");
  }
});
