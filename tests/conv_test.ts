import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { conv2d, conv2dTranspose } from "../core/_conv.ts";
import { randoms, relErr } from "./_util.ts";
import { naiveConv, naiveConvT, type Shape4, size } from "./_conv_ref.ts";

/** The op's output and its gradients of sum(y * r), read back. */
async function withGrads(
  f: (x: tf.Tensor4D, w: tf.Tensor4D) => tf.Tensor4D,
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  r: tf.Tensor4D,
): Promise<{ y: Float32Array; dx: Float32Array; dw: Float32Array }> {
  const y = f(x, w);
  const g = tf.grads((a: tf.Tensor, b: tf.Tensor) =>
    tf.sum(tf.mul(f(a as tf.Tensor4D, b as tf.Tensor4D), r))
  );
  const [dx, dw] = g([x, w]);
  // Read asynchronously: WebGPU has no synchronous read under Deno.
  const out = {
    y: await y.data() as Float32Array,
    dx: await dx.data() as Float32Array,
    dw: await dw.data() as Float32Array,
  };
  tf.dispose([y, dx, dw]);
  return out;
}

interface ConvCase {
  x: Shape4;
  k: number;
  cout: number;
  stride: number;
  pad: number;
}

const CONV_CASES: ConvCase[] = [
  { x: [2, 8, 8, 3], k: 3, cout: 5, stride: 1, pad: 1 },
  { x: [2, 8, 8, 4], k: 3, cout: 6, stride: 2, pad: 1 },
  { x: [3, 7, 7, 2], k: 3, cout: 3, stride: 2, pad: 1 },
  { x: [2, 6, 6, 5], k: 1, cout: 4, stride: 1, pad: 0 },
  { x: [1, 5, 9, 3], k: 3, cout: 2, stride: 1, pad: 1 },
  { x: [2, 9, 6, 2], k: 4, cout: 3, stride: 2, pad: 1 },
  { x: [1, 6, 6, 2], k: 3, cout: 2, stride: 2, pad: 2 },
  { x: [2, 8, 7, 3], k: 3, cout: 2, stride: 3, pad: 1 },
  // Output channels a multiple of 8 at stride 1: the weight gradient is our
  // wasm kernel's there (input channels in blocks of 6 and a remainder;
  // more pixels than one chunk).
  { x: [2, 8, 8, 7], k: 3, cout: 8, stride: 1, pad: 1 },
  { x: [3, 5, 9, 13], k: 3, cout: 16, stride: 1, pad: 1 },
  { x: [2, 6, 6, 5], k: 1, cout: 8, stride: 1, pad: 0 },
  { x: [2, 7, 6, 4], k: 3, cout: 8, stride: 1, pad: 0 },
  { x: [1, 6, 5, 3], k: 4, cout: 8, stride: 1, pad: 2 },
  { x: [3, 20, 20, 6], k: 3, cout: 8, stride: 1, pad: 1 },
  // 3x3, stride 1, padding 1, Cin a multiple of 4 and Cout of 8: on wasm
  // the value by Winograd's F(2x2, 3x3), and the input gradient too where
  // Cin is a multiple of 8 (odd sizes cut the last tiles; 72 channels make
  // two blocks of the transformed input, the second partial).
  { x: [2, 8, 8, 8], k: 3, cout: 16, stride: 1, pad: 1 },
  { x: [1, 7, 5, 16], k: 3, cout: 8, stride: 1, pad: 1 },
  { x: [2, 6, 6, 72], k: 3, cout: 8, stride: 1, pad: 1 },
  { x: [1, 5, 6, 8], k: 3, cout: 72, stride: 1, pad: 1 },
  // Strided, Cout a multiple of 8: the same kernel phase by phase (a
  // column of pixels left over, a padding wider than the phase, a crop).
  { x: [2, 9, 9, 5], k: 3, cout: 8, stride: 2, pad: 1 },
  { x: [2, 9, 6, 3], k: 4, cout: 8, stride: 2, pad: 1 },
  { x: [1, 6, 6, 2], k: 3, cout: 16, stride: 2, pad: 2 },
  { x: [2, 8, 7, 3], k: 3, cout: 8, stride: 3, pad: 1 },
  { x: [1, 10, 10, 3], k: 3, cout: 8, stride: 3, pad: 0 },
];

interface ConvTCase {
  x: Shape4;
  k: number;
  cout: number;
  out: [number, number];
  stride: number;
  pad: number;
}

const CONVT_CASES: ConvTCase[] = [
  { x: [2, 4, 4, 6], k: 4, cout: 3, out: [8, 8], stride: 2, pad: 1 },
  // 4x4, stride 2, padding 1, input and output channels multiples of 4: on
  // wasm one Winograd convolution with the four phases' sub-kernels side by
  // side, writing each phase's pixels in place.
  { x: [2, 3, 5, 4], k: 4, cout: 4, out: [6, 10], stride: 2, pad: 1 },
  { x: [1, 4, 4, 12], k: 4, cout: 8, out: [8, 8], stride: 2, pad: 1 },
  { x: [2, 3, 5, 4], k: 4, cout: 2, out: [6, 10], stride: 2, pad: 1 },
  // PyTorch's output_padding = 1: (4 - 1) 2 - 2 + 3 = 7, asked for 8.
  { x: [1, 4, 4, 3], k: 3, cout: 2, out: [8, 8], stride: 2, pad: 1 },
  { x: [2, 5, 5, 3], k: 3, cout: 4, out: [5, 5], stride: 1, pad: 1 },
  // Padding beyond the phase offsets (crops), stride 3, kernel smaller than the stride.
  { x: [1, 4, 4, 2], k: 3, cout: 3, out: [6, 5], stride: 2, pad: 2 },
  { x: [2, 3, 3, 2], k: 5, cout: 2, out: [8, 9], stride: 3, pad: 2 },
  { x: [1, 3, 3, 2], k: 2, cout: 2, out: [9, 9], stride: 3, pad: 0 },
  // Input channels a multiple of 8: the weight gradient (the convolution's,
  // roles exchanged) is ddpm's wasm kernel's, phase by phase.
  { x: [2, 4, 4, 8], k: 4, cout: 3, out: [8, 8], stride: 2, pad: 1 },
  { x: [1, 4, 4, 8], k: 3, cout: 2, out: [8, 8], stride: 2, pad: 1 },
  { x: [2, 3, 3, 8], k: 5, cout: 2, out: [8, 9], stride: 3, pad: 2 },
  { x: [1, 3, 3, 16], k: 2, cout: 2, out: [9, 9], stride: 3, pad: 0 },
];

function convData(c: ConvCase, seed: number) {
  const ws: Shape4 = [c.k, c.k, c.x[3], c.cout];
  const oh = Math.floor((c.x[1] + 2 * c.pad - c.k) / c.stride) + 1;
  const ow = Math.floor((c.x[2] + 2 * c.pad - c.k) / c.stride) + 1;
  const rs: Shape4 = [c.x[0], oh, ow, c.cout];
  return {
    ws,
    rs,
    x: randoms(size(c.x), seed),
    w: randoms(size(ws), seed + 1),
    r: randoms(size(rs), seed + 2),
  };
}

function convTData(c: ConvTCase, seed: number) {
  const ws: Shape4 = [c.k, c.k, c.cout, c.x[3]];
  const os: Shape4 = [c.x[0], c.out[0], c.out[1], c.cout];
  return {
    ws,
    os,
    x: randoms(size(c.x), seed),
    w: randoms(size(ws), seed + 1),
    r: randoms(size(os), seed + 2),
  };
}

/** The custom ops and their gradients against the direct definitions. */
async function checkAgainstNaive(): Promise<void> {
  for (const [i, c] of CONV_CASES.entries()) {
    const d = convData(c, 10 * i);
    const want = naiveConv(d.x, c.x, d.w, d.ws, d.r, c.stride, c.pad);
    const got = await withGrads(
      (a, b) => conv2d(a, b, c.stride, c.pad),
      tf.tensor4d(d.x, c.x),
      tf.tensor4d(d.w, d.ws),
      tf.tensor4d(d.r, d.rs),
    );
    const what = `conv ${JSON.stringify(c)} on ${tf.getBackend()}`;
    assert.ok(relErr(got.y, want.y) < 1e-5, `y of ${what}`);
    assert.ok(relErr(got.dx, want.dx) < 1e-5, `dx of ${what}`);
    assert.ok(relErr(got.dw, want.dw) < 1e-5, `dw of ${what}`);
  }
  for (const [i, c] of CONVT_CASES.entries()) {
    const d = convTData(c, 100 + 10 * i);
    const want = naiveConvT(d.x, c.x, d.w, d.ws, d.r, d.os, c.stride, c.pad);
    const got = await withGrads(
      (a, b) => conv2dTranspose(a, b, d.os, c.stride, c.pad),
      tf.tensor4d(d.x, c.x),
      tf.tensor4d(d.w, d.ws),
      tf.tensor4d(d.r, d.os),
    );
    const what = `transposed conv ${JSON.stringify(c)} on ${tf.getBackend()}`;
    assert.ok(relErr(got.y, want.y) < 1e-5, `y of ${what}`);
    assert.ok(relErr(got.dx, want.dx) < 1e-5, `dx of ${what}`);
    assert.ok(relErr(got.dw, want.dw) < 1e-5, `dw of ${what}`);
  }
}

Deno.test("conv2d and conv2dTranspose match a direct convolution and its gradients on cpu", async () => {
  await initBackend("cpu");
  tf.engine().startScope();
  await checkAgainstNaive();
  tf.engine().endScope();
});

Deno.test("conv2d and conv2dTranspose match a direct convolution and its gradients on wasm", async () => {
  const got = await initBackend("wasm");
  assert.equal(got.backend, "wasm");
  tf.engine().startScope();
  await checkAgainstNaive();
  tf.engine().endScope();
  await initBackend("cpu");
});

Deno.test("conv2d and conv2dTranspose match a direct convolution and its gradients on webgpu", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return; // no adapter on this machine
  tf.engine().startScope();
  await checkAgainstNaive();
  tf.engine().endScope();
  await initBackend("cpu");
});

Deno.test("custom gradients equal tfjs's built-in conv gradients on cpu", async () => {
  await initBackend("cpu");
  tf.engine().startScope();
  for (const [i, c] of CONV_CASES.entries()) {
    const d = convData(c, 1000 + 10 * i);
    const x = tf.tensor4d(d.x, c.x);
    const w = tf.tensor4d(d.w, d.ws);
    const r = tf.tensor4d(d.r, d.rs);
    const ours = await withGrads(
      (a, b) => conv2d(a, b, c.stride, c.pad),
      x,
      w,
      r,
    );
    const theirs = await withGrads(
      (a, b) =>
        tf.conv2d(a, b, c.stride, [[0, 0], [c.pad, c.pad], [
          c.pad,
          c.pad,
        ], [0, 0]]),
      x,
      w,
      r,
    );
    const what = `conv ${JSON.stringify(c)}`;
    assert.ok(relErr(ours.y, theirs.y) < 1e-4, `y of ${what}`);
    assert.ok(relErr(ours.dx, theirs.dx) < 1e-4, `dx of ${what}`);
    assert.ok(relErr(ours.dw, theirs.dw) < 1e-4, `dw of ${what}`);
  }
  for (const [i, c] of CONVT_CASES.entries()) {
    const d = convTData(c, 2000 + 10 * i);
    const x = tf.tensor4d(d.x, c.x);
    const w = tf.tensor4d(d.w, d.ws);
    const r = tf.tensor4d(d.r, d.os);
    const ours = await withGrads(
      (a, b) => conv2dTranspose(a, b, d.os, c.stride, c.pad),
      x,
      w,
      r,
    );
    const theirs = await withGrads(
      (a, b) => tf.conv2dTranspose(a, b, d.os, c.stride, c.pad),
      x,
      w,
      r,
    );
    const what = `transposed conv ${JSON.stringify(c)}`;
    assert.ok(relErr(ours.y, theirs.y) < 1e-4, `y of ${what}`);
    assert.ok(relErr(ours.dx, theirs.dx) < 1e-4, `dx of ${what}`);
    assert.ok(relErr(ours.dw, theirs.dw) < 1e-4, `dw of ${what}`);
  }
  tf.engine().endScope();
});

Deno.test("conv gradients on wasm equal tfjs's built-in ones computed on cpu", async () => {
  // A training-sized case: batch 4, 16x16, 8 -> 16 channels, stride 1 and 2.
  const shapes: ConvCase[] = [
    { x: [4, 16, 16, 8], k: 3, cout: 16, stride: 1, pad: 1 },
    { x: [4, 16, 16, 8], k: 3, cout: 8, stride: 2, pad: 1 },
  ];
  for (const [i, c] of shapes.entries()) {
    const d = convData(c, 3000 + 10 * i);
    const run = async (
      op: (a: tf.Tensor4D, b: tf.Tensor4D) => tf.Tensor4D,
    ) => {
      const inputs = [
        tf.tensor4d(d.x, c.x),
        tf.tensor4d(d.w, d.ws),
        tf.tensor4d(d.r, d.rs),
      ];
      const out = await withGrads(op, inputs[0], inputs[1], inputs[2]);
      tf.dispose(inputs);
      return out;
    };
    await initBackend("cpu");
    const pad = c.pad;
    const want = await run((a, b) =>
      tf.conv2d(a, b, c.stride, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    );
    await initBackend("wasm");
    const before = tf.memory().numTensors;
    const got = await run((a, b) => conv2d(a, b, c.stride, c.pad));
    assert.equal(tf.memory().numTensors, before);
    assert.ok(relErr(got.dx, want.dx) < 1e-4, `dx, stride ${c.stride}`);
    assert.ok(relErr(got.dw, want.dw) < 1e-4, `dw, stride ${c.stride}`);
  }
  await initBackend("cpu");
});

Deno.test("conv ops leak no tensor through forward and backward", async () => {
  await initBackend("cpu");
  const x = tf.ones([1, 4, 4, 2]) as tf.Tensor4D;
  const w = tf.ones([3, 3, 2, 3]) as tf.Tensor4D;
  const wt = tf.ones([4, 4, 2, 2]) as tf.Tensor4D;
  const before = tf.memory().numTensors;
  const y = conv2d(x, w, 2, 1);
  const z = conv2dTranspose(x, wt, [1, 8, 8, 2], 2, 1);
  const [gx, gw] = tf.grads((a: tf.Tensor, b: tf.Tensor) =>
    tf.sum(conv2d(a as tf.Tensor4D, b as tf.Tensor4D, 1, 1))
  )([x, w]);
  assert.equal(tf.memory().numTensors, before + 4);
  tf.dispose([y, z, gx, gw]);
  assert.equal(tf.memory().numTensors, before);
  tf.dispose([x, w, wt]);
});

Deno.test("conv ops reject bad strides, paddings and output shapes", async () => {
  await initBackend("cpu");
  const x = tf.ones([1, 4, 4, 2]) as tf.Tensor4D;
  const w = tf.ones([3, 3, 2, 3]) as tf.Tensor4D;
  const wt = tf.ones([4, 4, 3, 2]) as tf.Tensor4D;
  assert.throws(() => conv2d(x, w, 0, 1), RangeError);
  assert.throws(() => conv2d(x, w, 1, 3), RangeError);
  assert.throws(() => conv2d(x, w, 1.5, 1), RangeError);
  assert.throws(
    () => conv2dTranspose(x, wt, [1, 10, 10, 3], 2, 1),
    /Cannot transpose-convolve: output shape does not fit/,
  );
  assert.throws(() => conv2dTranspose(x, wt, [1, 8, 8, 2], 2, 1), TypeError);
  tf.dispose([x, w, wt]);
});
