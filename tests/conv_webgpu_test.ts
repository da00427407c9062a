/**
 * The WebGPU convolution programs of core/_webgpu_conv.ts against the
 * float64 definitions of tests/_conv_ref.ts: the implicit-GEMM convolution
 * (forward, the input gradients, transposed convolutions, linear layers),
 * and the weight gradient (a split-K GEMM), the latter also against the existing path on the cpu
 * backend (tfjs's conv2d over the batch axis). Skipped where no WebGPU
 * adapter exists; runs on Mesa's llvmpipe here.
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { conv2d, conv2dTranspose } from "../core/_conv.ts";
import { linear } from "../core/_layers.ts";
import {
  type ConvTiles,
  NARROW_CONV_TILES,
  webgpuConv2d,
  webgpuFilterGrad,
} from "../core/_webgpu_conv.ts";
import { randoms, relErr } from "./_util.ts";
import { at4, naiveConv, naiveConvT, type Shape4, size } from "./_conv_ref.ts";

const outSize = (n: number, k: number, s: number, p: number) =>
  Math.floor((n + 2 * p - k) / s) + 1;

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
  // Channels in multiples of 4 (also run through the vec4 program): the
  // cases above again, and 32-wide tiles.
  {
    name: "vec4: 3x3 s2 p1",
    x: [3, 7, 9, 8],
    k: 3,
    cout: 12,
    stride: 2,
    pad: 1,
    chunks: [undefined, 16, 32],
  },
  {
    name: "vec4: 1x1 s1 p0",
    x: [3, 5, 6, 12],
    k: 1,
    cout: 8,
    stride: 1,
    pad: 0,
    chunks: [undefined, 16],
  },
  // M = 180 and Cout = 72: 64-wide tiles, both ragged.
  {
    name: "vec4: 64-wide tiles, ragged",
    x: [2, 6, 6, 20],
    k: 3,
    cout: 72,
    stride: 1,
    pad: 1,
    chunks: [undefined, 16, 64],
  },
  // M = 36 and Cout = 28: 32-wide tiles, ragged.
  {
    name: "vec4: 32-wide tiles",
    x: [2, 5, 5, 4],
    k: 3,
    cout: 28,
    stride: 1,
    pad: 1,
    chunks: [undefined, 32],
  },
  {
    name: "vec4: 3x3 s2 p2",
    x: [1, 6, 7, 4],
    k: 3,
    cout: 4,
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

Deno.test("webgpuFilterGrad (scalar and vec4 programs) matches the definition and the cpu backend's weight gradient", async () => {
  const cpu = await initBackend("cpu");
  assert.equal(cpu.backend, "cpu");
  const onCpu = await gradsOnActive();
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return; // no adapter on this machine
  try {
    const before = tf.memory().numTensors;
    for (const [i, c] of CASES.entries()) {
      const d = caseData(c, 10 * i);
      const want = naiveConv(d.x, c.x, d.w, d.ws, d.r, c.stride, c.pad).dw;
      const xt = tf.tensor4d(d.x, c.x);
      const rt = tf.tensor4d(d.r, d.rs);
      const programs = c.x[3] % 4 === 0 && c.cout % 4 === 0
        ? [false, true]
        : [false];
      for (const chunk of c.chunks) {
        for (const vec4 of programs) {
          const dw = webgpuFilterGrad(xt, rt, {
            kh: c.k,
            kw: c.k,
            stride: c.stride,
            pad: c.pad,
            chunk,
            vec4,
          });
          assert.deepEqual(dw.shape, d.ws);
          const v = await dw.data() as Float32Array;
          dw.dispose();
          const what = `${c.name} ${
            JSON.stringify(c.x)
          }, chunk ${chunk}, vec4 ${vec4}`;
          assert.ok(relErr(v, want) < 1e-5, `dW vs definition: ${what}`);
          assert.ok(relErr(v, onCpu[i]) < 1e-5, `dW vs cpu: ${what}`);
        }
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
      const want = naiveConv(d.x, c.x, d.w, d.ws, d.r, c.stride, c.pad).dw;
      assert.ok(relErr(onGpu[i], want) < 1e-5, `conv ${c.name} vs definition`);
      assert.ok(relErr(onGpu[i], onCpu[i]) < 1e-5, `conv ${c.name} vs cpu`);
    }
    for (const [i, c] of T_CASES.entries()) {
      const d = tCaseData(c, 500 + 10 * i);
      const want = naiveConvT(d.x, c.x, d.w, d.ws, d.r, d.rs, c.stride, c.pad)
        .dw;
      const j = CASES.length + i;
      const what = `transposed conv ${JSON.stringify(c)}`;
      assert.ok(relErr(onGpu[j], want) < 1e-5, `${what} vs definition`);
      assert.ok(relErr(onGpu[j], onCpu[j]) < 1e-5, `${what} vs cpu`);
    }
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("webgpuFilterGrad takes one dispatch when K fits one chunk, two when split; vec4 where the channels allow", async () => {
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
    // Channels in multiples of 4 take the vec4 program by default.
    const x4 = tf.tensor4d(randoms(2 * 8 * 8 * 4, 3), [2, 8, 8, 4]);
    const dy4 = tf.tensor4d(randoms(2 * 8 * 8 * 8, 4), [2, 8, 8, 8]);
    const names = async (vec4?: boolean) =>
      (await tf.profile(() =>
        webgpuFilterGrad(x4, dy4, { ...geometry, chunk: 32, vec4 })
      )).kernels.map((k) => k.name);
    assert.deepEqual(await names(), [
      "DdpmConvFilterGradVec4",
      "DdpmSplitKSum",
    ]);
    assert.deepEqual(await names(false), [
      "DdpmConvFilterGradPartial",
      "DdpmSplitKSum",
    ]);
    assert.throws(
      () => webgpuFilterGrad(x, dy, { ...geometry, vec4: true }),
      /vec4 loads: channels are not multiples of 4 \(got input 3, output 5/,
    );
    tf.dispose([x, dy, x4, dy4]);
  } finally {
    await initBackend("cpu");
  }
});

interface ConvCase {
  name: string;
  x: Shape4;
  w: Shape4;
  stride: number;
  padY: number;
  padX: number;
  out: [number, number];
  bias: boolean;
}

const CONV_CASES: ConvCase[] = [
  // M = 2 * 8 * 8 = 128 rows, Cout = 12: one ragged column tile.
  {
    name: "3x3 s1, bias",
    x: [2, 8, 8, 8],
    w: [3, 3, 8, 12],
    stride: 1,
    padY: 1,
    padX: 1,
    out: [8, 8],
    bias: true,
  },
  // M = 3 * 4 * 3 = 36 (ragged rows); Cout = 68 spans two 64-wide tiles.
  {
    name: "3x3 s2",
    x: [3, 7, 5, 4],
    w: [3, 3, 4, 68],
    stride: 2,
    padY: 1,
    padX: 1,
    out: [4, 3],
    bias: false,
  },
  // K = 20: the last K tile is partly past the end.
  {
    name: "1x1",
    x: [2, 5, 6, 20],
    w: [1, 1, 20, 8],
    stride: 1,
    padY: 0,
    padX: 0,
    out: [5, 6],
    bias: true,
  },
  // 4 output channels: narrow tiles by default; M = 126 rows, ragged.
  {
    name: "3x3 s1, 4 channels out",
    x: [2, 9, 7, 8],
    w: [3, 3, 8, 4],
    stride: 1,
    padY: 1,
    padX: 1,
    out: [9, 7],
    bias: true,
  },
  // Padding of 2 above and 0 left, the output cut short of the full size.
  {
    name: "4x4 asymmetric padding",
    x: [1, 9, 9, 16],
    w: [4, 4, 16, 16],
    stride: 1,
    padY: 2,
    padX: 0,
    out: [7, 5],
    bias: false,
  },
];

const CONV_TILES: (ConvTiles | undefined)[] = [
  undefined,
  { tm: 32, tn: 32, tk: 8, rm: 4, rn: 4 },
  { tm: 128, tn: 64, tk: 16, rm: 8, rn: 4 },
  // Narrow: 8 vec4s of the kernel per K step for 64 invocations.
  NARROW_CONV_TILES,
  // The next K tile loaded while this one is computed.
  { tm: 64, tn: 64, tk: 16, rm: 4, rn: 4, prefetch: true },
  { ...NARROW_CONV_TILES, prefetch: true },
];
/** Two vec4s of output channels per invocation (slow to compile on llvmpipe: one case). */
const WIDE_TILES: ConvTiles = { tm: 64, tn: 128, tk: 16, rm: 4, rn: 8 };

Deno.test("webgpuConv2d matches the definition for every tiling: stride, padding, ragged tiles, bias, the kernel read flipped", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  try {
    const before = tf.memory().numTensors;
    for (const [ci, c] of CONV_CASES.entries()) {
      const x = randoms(size(c.x), 900 + ci);
      const w = randoms(size(c.w), 950 + ci);
      const b = randoms(c.w[3], 990 + ci);
      const want = naiveConv(x, c.x, w, c.w, null, c.stride, {
        top: c.padY,
        left: c.padX,
        out: c.out,
      }, c.bias ? b : undefined).y;
      // The same kernel stored [kh, kw, Cout, Cin], flipped: what `flip` reads.
      const [kh, kw, cin, cout] = c.w;
      const flipped = new Float32Array(w.length);
      const fs: Shape4 = [kh, kw, cout, cin];
      for (let i = 0; i < kh; i++) {
        for (let j = 0; j < kw; j++) {
          for (let ci = 0; ci < cin; ci++) {
            for (let o = 0; o < cout; o++) {
              flipped[at4(fs, kh - 1 - i, kw - 1 - j, o, ci)] =
                w[at4(c.w, i, j, ci, o)];
            }
          }
        }
      }
      const xt = tf.tensor4d(x, c.x);
      const wt = tf.tensor4d(w, c.w);
      const ft = tf.tensor4d(flipped, fs);
      const bt = tf.tensor1d(b);
      const tilings = ci === 0 ? [...CONV_TILES, WIDE_TILES] : CONV_TILES;
      for (const tiles of tilings) {
        for (const flip of tiles === WIDE_TILES ? [false] : [false, true]) {
          const y = webgpuConv2d(xt, flip ? ft : wt, {
            stride: c.stride,
            padY: c.padY,
            padX: c.padX,
            oh: c.out[0],
            ow: c.out[1],
            bias: c.bias ? bt : undefined,
            flip,
            tiles,
          });
          assert.deepEqual(y.shape, [c.x[0], ...c.out, c.w[3]]);
          const err = relErr(await y.data() as Float32Array, want);
          assert.ok(
            err < 1e-5,
            `${c.name}, flip ${flip}, tiles ${JSON.stringify(tiles)}: ${err}`,
          );
          y.dispose();
        }
      }
      tf.dispose([xt, wt, ft, bt]);
    }
    assert.equal(tf.memory().numTensors, before);
    const x = tf.zeros([1, 4, 4, 3]) as tf.Tensor4D;
    const w = tf.zeros([3, 3, 3, 4]) as tf.Tensor4D;
    assert.throws(
      () => webgpuConv2d(x, w, { stride: 1, padY: 1, padX: 1, oh: 4, ow: 4 }),
      /input channels 3/,
    );
    tf.dispose([x, w]);
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("conv2d on webgpu runs the implicit-GEMM program forward and for the input gradient, which match the definition at strides 1 and 2", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  try {
    for (const [i, stride] of [1, 2].entries()) {
      const xs: Shape4 = [2, 6, 6, 8];
      const ws: Shape4 = [3, 3, 8, 12];
      const oh = outSize(6, 3, stride, 1);
      const rs: Shape4 = [2, oh, oh, 12];
      const x = randoms(size(xs), 300 + i);
      const w = randoms(size(ws), 310 + i);
      const r = randoms(size(rs), 320 + i);
      const xt = tf.tensor4d(x, xs);
      const wt = tf.tensor4d(w, ws);
      const rt = tf.tensor4d(r, rs);
      const f = (a: tf.Tensor) =>
        tf.sum(tf.mul(conv2d(a as tf.Tensor4D, wt, stride, 1), rt));
      const profile = await tf.profile(() => tf.grad(f)(xt));
      const names = profile.kernels.map((k) => k.name);
      // Forward, and the input gradient (per output phase at stride 2).
      assert.equal(
        names.filter((n) => n === "DdpmConv2D").length,
        2,
        names.join(", "),
      );
      const dx = await (profile.result as tf.Tensor).data() as Float32Array;
      const want = naiveConv(x, xs, w, ws, r, stride, 1).dx;
      assert.ok(relErr(dx, want) < 1e-5, `dx at stride ${stride}`);
      tf.dispose([xt, wt, rt, profile.result as tf.Tensor]);
    }
  } finally {
    await initBackend("cpu");
  }
});

/** tfjs's convolution kernels, which no conv2d of ddpm's may reach on webgpu. */
const TFJS_CONVS = new Set([
  "Conv2D",
  "FusedConv2D",
  "Conv2DBackpropInput",
  "Conv2DBackpropFilter",
]);

/** Channel sums of r (a bias's gradient) in float64. */
function channelSums(r: Float32Array, c: number): Float64Array {
  const out = new Float64Array(c);
  r.forEach((v, i) => out[i % c] += v);
  return out;
}

Deno.test("conv2d and conv2dTranspose with channel counts that are not multiples of 4 run on the GEMM programs on webgpu (zero channels added), value and every gradient by the definition", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  try {
    const before = tf.memory().numTensors;
    // The UNet's input and output convolutions, and odd counts both sides.
    const convs: [Shape4, number, number][] = [
      [[2, 6, 6, 1], 8, 1],
      [[2, 6, 6, 8], 1, 1],
      [[2, 7, 5, 3], 5, 2],
      [[1, 5, 6, 6], 10, 1],
    ];
    for (const [i, [xs, cout, stride]] of convs.entries()) {
      const ws: Shape4 = [3, 3, xs[3], cout];
      const oh = outSize(xs[1], 3, stride, 1);
      const ow = outSize(xs[2], 3, stride, 1);
      const rs: Shape4 = [xs[0], oh, ow, cout];
      const [x, w, b, r] = [size(xs), size(ws), cout, size(rs)].map((n, k) =>
        randoms(n, 600 + 10 * i + k)
      );
      const want = naiveConv(x, xs, w, ws, r, stride, 1, b);
      const [xt, wt, bt, rt] = [
        tf.tensor4d(x, xs),
        tf.tensor4d(w, ws),
        tf.tensor1d(b),
        tf.tensor4d(r, rs),
      ];
      const profile = await tf.profile(() => {
        const y = conv2d(xt, wt, stride, 1, bt);
        const grads = tf.grads((a: tf.Tensor, v: tf.Tensor, c: tf.Tensor) =>
          tf.sum(
            tf.mul(
              conv2d(a as tf.Tensor4D, v as tf.Tensor4D, stride, 1, c),
              rt,
            ),
          )
        )([xt, wt, bt]);
        return [y, ...grads];
      });
      const names = profile.kernels.map((k) => k.name);
      const what = `conv ${JSON.stringify(xs)} -> ${cout}, stride ${stride}`;
      assert.ok(
        !names.some((n) => TFJS_CONVS.has(n)),
        `${what}: ${names.join(", ")}`,
      );
      const outs = profile.result as tf.Tensor[];
      const refs = [want.y, want.dx, want.dw, channelSums(r, cout)];
      for (const [k, name] of ["y", "dx", "dw", "db"].entries()) {
        assert.deepEqual(
          outs[k].shape,
          [rs, xs, ws, [cout]][k],
          `${what} ${name} shape`,
        );
        const err = relErr(await outs[k].data() as Float32Array, refs[k]);
        assert.ok(err < 1e-5, `${what} ${name}: ${err}`);
      }
      tf.dispose([xt, wt, bt, rt, ...outs]);
    }
    // The transposed convolution with three input and one output channel.
    const xs: Shape4 = [2, 3, 4, 3];
    const ws: Shape4 = [4, 4, 1, 3];
    const out: Shape4 = [2, 6, 8, 1];
    const [x, w, r] = [size(xs), size(ws), size(out)].map((n, k) =>
      randoms(n, 700 + k)
    );
    const want = naiveConvT(x, xs, w, ws, r, out, 2, 1);
    const [xt, wt, rt] = [
      tf.tensor4d(x, xs),
      tf.tensor4d(w, ws),
      tf.tensor4d(r, out),
    ];
    const profile = await tf.profile(() => {
      const f = (a: tf.Tensor, v: tf.Tensor) =>
        conv2dTranspose(a as tf.Tensor4D, v as tf.Tensor4D, out, 2, 1);
      return [
        f(xt, wt),
        ...tf.grads((a: tf.Tensor, v: tf.Tensor) =>
          tf.sum(tf.mul(f(a, v), rt))
        )(
          [xt, wt],
        ),
      ];
    });
    const names = profile.kernels.map((k) => k.name);
    assert.ok(!names.some((n) => TFJS_CONVS.has(n)), names.join(", "));
    const outs = profile.result as tf.Tensor[];
    for (const [k, ref] of [want.y, want.dx, want.dw].entries()) {
      const err = relErr(await outs[k].data() as Float32Array, ref);
      assert.ok(err < 1e-5, `transposed conv, output ${k}: ${err}`);
    }
    tf.dispose([xt, wt, rt, ...outs]);
    assert.equal(tf.memory().numTensors, before);
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("linear on webgpu (the GEMM program forward and for dx) matches the definition, gradients included", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  try {
    const [m, k, n] = [6, 12, 8];
    const x = randoms(m * k, 41);
    const w = randoms(k * n, 42);
    const b = randoms(n, 43);
    const r = randoms(m * n, 44);
    const xt = tf.tensor2d(x, [m, k]);
    const wt = tf.tensor2d(w, [k, n]);
    const bt = tf.tensor1d(b);
    const rt = tf.tensor2d(r, [m, n]);
    const profile = await tf.profile(() =>
      tf.grads((a: tf.Tensor, v: tf.Tensor, c: tf.Tensor) =>
        tf.sum(tf.mul(linear(a as tf.Tensor2D, v, c), rt))
      )([xt, wt, bt])
    );
    const names = profile.kernels.map((p) => p.name);
    assert.equal(names.filter((s) => s === "DdpmConv2D").length, 2);
    const [dx, dw, db] = await Promise.all(
      (profile.result as tf.Tensor[]).map(async (t) =>
        await t.data() as Float32Array
      ),
    );
    const y = await linear(xt, wt, bt).data() as Float32Array;
    const wantY = new Float64Array(m * n);
    const wantDx = new Float64Array(m * k);
    const wantDw = new Float64Array(k * n);
    const wantDb = new Float64Array(n);
    for (let i = 0; i < m; i++) {
      for (let o = 0; o < n; o++) {
        let acc = b[o];
        for (let c = 0; c < k; c++) {
          acc += x[i * k + c] * w[c * n + o];
          wantDx[i * k + c] += r[i * n + o] * w[c * n + o];
          wantDw[c * n + o] += x[i * k + c] * r[i * n + o];
        }
        wantY[i * n + o] = acc;
        wantDb[o] += r[i * n + o];
      }
    }
    assert.ok(relErr(y, wantY) < 1e-5, "value");
    assert.ok(relErr(dx, wantDx) < 1e-5, "dx");
    assert.ok(relErr(dw, wantDw) < 1e-5, "dW");
    assert.ok(relErr(db, wantDb) < 1e-5, "db");
    tf.dispose([xt, wt, bt, rt, ...(profile.result as tf.Tensor[])]);
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("webgpuConv2d's transposed mode matches PyTorch's ConvTranspose2d by the definition: strides 2 and 3, output padding, a kernel smaller than the stride, three tilings (one prefetching)", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  try {
    // [x shape, kernel side, Cout, stride, pad, output side].
    const cases: [Shape4, number, number, number, number, [number, number]][] =
      [
        // The UNet's upsampling.
        [[2, 4, 4, 8], 4, 12, 2, 1, [8, 8]],
        // A strided 3x3 convolution's input gradient, output padding 1 in x.
        [[3, 3, 5, 4], 3, 8, 2, 1, [5, 10]],
        // Stride 3 with a 2x2 kernel: some phases have no taps at all.
        [[1, 3, 3, 4], 2, 4, 3, 0, [8, 8]],
      ];
    for (const [ci, [xs, k, cout, stride, pad, out]] of cases.entries()) {
      const cin = xs[3];
      const ws: Shape4 = [k, k, cout, cin];
      const x = randoms(size(xs), 700 + ci);
      const w = randoms(size(ws), 710 + ci);
      const ys: Shape4 = [xs[0], out[0], out[1], cout];
      const want = naiveConvT(x, xs, w, ws, null, ys, stride, pad).y;
      const xt = tf.tensor4d(x, xs);
      const wt = tf.tensor4d(w, ws);
      for (const tiles of [...CONV_TILES.slice(0, 2), CONV_TILES[4]]) {
        const y = webgpuConv2d(xt, wt, {
          stride,
          padY: pad,
          padX: pad,
          oh: out[0],
          ow: out[1],
          transposed: true,
          tiles,
        });
        assert.deepEqual(y.shape, ys);
        const err = relErr(await y.data() as Float32Array, want);
        assert.ok(
          err < 1e-5,
          `case ${ci}, tiles ${JSON.stringify(tiles)}: ${err}`,
        );
        y.dispose();
      }
      // conv2dTranspose itself runs the program, and agrees.
      const viaOp = conv2dTranspose(xt, wt, ys, stride, pad);
      assert.ok(relErr(await viaOp.data() as Float32Array, want) < 1e-5);
      tf.dispose([xt, wt, viaOp]);
    }
  } finally {
    await initBackend("cpu");
  }
});
