import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { setWasmThreads } from "../core/wasm_threads.ts";
import { naiveConv, naiveConvT, type Shape4, size } from "./_conv_ref.ts";
import {
  type ChildRun,
  evalInChild,
  lastJson,
  randoms,
  relErr,
} from "./_util.ts";

/** What the child prints. */
interface ChildOut {
  backend: string;
  threads: number;
  conv: number[];
  mm: number[];
  dw: number[];
  ours: boolean;
}

/**
 * In a fresh process (tfjs picks its wasm build once per process): start
 * wasm with DDPM_WASM_THREADS threads, and print the thread count and a
 * convolution's and a matrix product's values as JSON.
 */
function child(threads: string): Promise<ChildRun> {
  const backend = new URL("../core/backend.ts", import.meta.url).href;
  const wt = new URL("../core/wasm_threads.ts", import.meta.url).href;
  const conv2d = new URL("../core/_conv.ts", import.meta.url).href;
  const code = `
    import { initBackend, tf } from "${backend}";
    import { wasmThreads } from "${wt}";
    import { conv2d } from "${conv2d}";
    await initBackend("wasm");
    const x = tf.tensor4d(Array.from({ length: 2 * 9 * 9 * 16 }, (_, i) => Math.sin(i)), [2, 9, 9, 16]);
    const w = tf.tensor4d(Array.from({ length: 3 * 3 * 16 * 24 }, (_, i) => Math.cos(i)), [3, 3, 16, 24]);
    const a = tf.tensor2d(Array.from({ length: 96 * 80 }, (_, i) => Math.sin(3 * i)), [96, 80]);
    const conv = Array.from(await tf.conv2d(x, w, 1, "same").data());
    const mm = Array.from(await tf.matMul(a, a, false, true).data());
    // The weight gradient of sum(conv(x, w) * r): ddpm's wasm kernel, on
    // the threaded build's shared memory when threaded.
    const r = tf.tensor4d(Array.from({ length: 2 * 9 * 9 * 24 }, (_, i) => Math.sin(7 * i)), [2, 9, 9, 24]);
    const prof = await tf.profile(() => tf.grad((v) => tf.sum(tf.mul(conv2d(x, v, 1, 1), r)))(w));
    const dw = Array.from(await prof.result.data());
    const ours = prof.kernelNames.includes("DdpmWinogradGrad");
    console.log(JSON.stringify({ backend: tf.getBackend(), threads: wasmThreads(), conv, mm, dw, ours }));
  `;
  return evalInChild(code, { DDPM_WASM_THREADS: threads });
}

Deno.test("wasm with DDPM_WASM_THREADS=2 runs tfjs's threaded build and ddpm's weight-gradient kernel on its shared memory: same values as one thread, and the process exits by itself", async () => {
  const [one, two] = [await child("1"), await child("2")];
  assert.equal(one.code, 0, one.stderr);
  assert.equal(two.code, 0, two.stderr);
  const a = lastJson<ChildOut>(one.stdout);
  const b = lastJson<ChildOut>(two.stdout);
  assert.equal(a.backend, "wasm");
  assert.equal(b.backend, "wasm");
  assert.equal(a.threads, 1);
  assert.equal(b.threads, 2);
  assert.ok(
    a.ours && b.ours,
    "the weight gradient is ddpm's Winograd kernel's",
  );
  // XNNPACK splits the work across threads, not the sums: equal up to rounding.
  for (const key of ["conv", "mm", "dw"] as const) {
    const x = a[key];
    const y = b[key];
    assert.equal(x.length, y.length);
    let err = 0;
    for (let i = 0; i < x.length; i++) {
      err = Math.max(err, Math.abs(x[i] - y[i]) / (1 + Math.abs(x[i])));
    }
    assert.ok(err < 1e-5, `${key}: ${err}`);
  }
  // An independent check of the product: a[0] . a[1] by hand.
  const rows = Array.from(
    { length: 2 },
    (_, r) => Array.from({ length: 80 }, (_, j) => Math.sin(3 * (r * 80 + j))),
  );
  const dot = rows[0].reduce((s, v, j) => s + v * rows[1][j], 0);
  assert.ok(Math.abs(b.mm[1] - dot) < 1e-4, `${b.mm[1]} vs ${dot}`);
  // And of the weight gradient's centre tap: dW[1, 1, c, o] = sum over
  // pixels of x[p, c] r[p, o] (no shift, no border).
  const [c, o] = [5, 17];
  let want = 0;
  for (let p = 0; p < 2 * 9 * 9; p++) {
    want += Math.sin(p * 16 + c) * Math.sin(7 * (p * 24 + o));
  }
  const got = b.dw[(4 * 16 + c) * 24 + o];
  assert.ok(Math.abs(got - want) < 1e-4, `dW centre tap: ${got} vs ${want}`);
});

Deno.test("with DDPM_WASM_THREADS=2 a helper thread takes chunks of ddpm's Winograd convolutions: values, input gradients and the upsampling match float64, and the process exits by itself", async () => {
  const url = (p: string) => new URL(p, import.meta.url).href;
  const xs: Shape4 = [3, 30, 32, 16];
  const ws: Shape4 = [3, 3, 16, 24];
  const ys: Shape4 = [3, 30, 32, 24];
  const [x, w, r] = [
    randoms(size(xs), 1),
    randoms(size(ws), 2),
    randoms(size(ys), 3),
  ];
  // The upsampling: a 4x4, stride-2 transposed convolution, 16 -> 8 channels.
  const us: Shape4 = [4, 4, 8, 16];
  const os: Shape4 = [3, 60, 64, 8];
  const u = randoms(size(us), 4);
  const code = `
    import { initBackend, tf } from "${url("../core/backend.ts")}";
    import { conv2d, conv2dTranspose } from "${url("../core/_conv.ts")}";
    import { winogradHelperChunks } from "${url("../core/_wasm_kernels.ts")}";
    await initBackend("wasm");
    import { randoms } from "${url("./_util.ts")}";
    const [x, w, r] = [randoms(${size(xs)}, 1), randoms(${
    size(ws)
  }, 2), randoms(${size(ys)}, 3)];
    const xt = tf.tensor4d(x, ${JSON.stringify(xs)});
    const wt = tf.tensor4d(w, ${JSON.stringify(ws)});
    const rt = tf.tensor4d(r, ${JSON.stringify(ys)});
    const f = tf.valueAndGrad((xi) => tf.sum(tf.mul(conv2d(xi, wt, 1, 1), rt)));
    // The helper takes chunks once it has started.
    let y, dx, calls = 0;
    do {
      tf.dispose([y, dx]);
      y = conv2d(xt, wt, 1, 1);
      dx = f(xt).grad;
      calls++;
    } while (winogradHelperChunks() === 0 && calls < 500);
    const ut = tf.tensor4d(randoms(${size(us)}, 4), ${JSON.stringify(us)});
    const up = conv2dTranspose(xt, ut, ${JSON.stringify(os)}, 2, 1);
    console.log(JSON.stringify({
      chunks: winogradHelperChunks(),
      y: Array.from(await y.data()),
      dx: Array.from(await dx.data()),
      up: Array.from(await up.data()),
    }));
  `;
  const out = await evalInChild(code, { DDPM_WASM_THREADS: "2" });
  assert.equal(out.code, 0, out.stderr);
  const got = lastJson<
    { chunks: number; y: number[]; dx: number[]; up: number[] }
  >(out.stdout);
  assert.ok(got.chunks > 0, "the helper computed no chunk");
  const want = naiveConv(x, xs, w, ws, r, 1, 1);
  assert.ok(relErr(got.y, want.y) < 3e-6, `y: ${relErr(got.y, want.y)}`);
  assert.ok(relErr(got.dx, want.dx) < 3e-6, `dx: ${relErr(got.dx, want.dx)}`);
  const up = naiveConvT(x, xs, u, us, null, os, 2, 1).y;
  assert.ok(relErr(got.up, up) < 3e-6, `upsampling: ${relErr(got.up, up)}`);
});

Deno.test("setWasmThreads rejects counts outside 1..8", () => {
  for (const bad of [0, 9, 1.5, -2, NaN]) {
    assert.throws(() => setWasmThreads(bad), RangeError);
  }
  setWasmThreads(null);
});

Deno.test("the default wasm backend of this process is single-threaded and computes", async () => {
  await initBackend("wasm");
  const y = tf.matMul(tf.tensor2d([[1, 2]]), tf.tensor2d([[3], [4]]));
  assert.deepEqual([...(await y.data())], [11]);
  y.dispose();
  await initBackend("cpu");
});
