/**
 * Tile sweep of the implicit-GEMM WebGPU convolution (core/_webgpu_conv.ts)
 * against tfjs's own, at the convolutions of the UNet's training step
 * (base 64, batch 64 by default: the forward convolutions and the stride-1
 * input gradients). For each shape it prints tfjs's TFLOP/s and ours per
 * tiling, checks ours against tfjs's output, and ends with the geometric
 * mean of each tiling over the shapes. Then, at the same shapes, the
 * weight gradient (`webgpuFilterGrad`): the scalar program against the
 * vec4 one, each checked against the other.
 *
 * ```sh
 * deno run -A tests/tools/conv_sweep.ts [--batch 64] [--base 64] [--reps 9] [--tilings N] [--only conv|wgrad] [--json out.json]
 * ```
 *
 * Timing: after a warm-up call (which compiles the shader), the GPU time of
 * a call as `tf.profile` reads it from timestamp queries, each of its
 * kernels' median over `--reps` calls, summed (the adapter must offer
 * `timestamp-query`). Needs a WebGPU adapter; on
 * llvmpipe use a small batch.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { initBackend, tf } from "../../core/backend.ts";
import {
  type ConvTiles,
  NARROW_CONV_TILES,
  webgpuConv2d,
  webgpuFilterGrad,
} from "../../core/_webgpu_conv.ts";

const TILINGS: ConvTiles[] = [
  { tm: 64, tn: 64, tk: 16, rm: 4, rn: 4 },
  { tm: 64, tn: 64, tk: 32, rm: 4, rn: 4 },
  { tm: 128, tn: 64, tk: 16, rm: 8, rn: 4 },
  { tm: 128, tn: 64, tk: 32, rm: 8, rn: 4 },
  { tm: 64, tn: 128, tk: 16, rm: 4, rn: 8 },
  { tm: 128, tn: 128, tk: 8, rm: 8, rn: 8 },
  { tm: 128, tn: 128, tk: 16, rm: 8, rn: 8 },
  { tm: 32, tn: 64, tk: 16, rm: 4, rn: 4 },
  { tm: 64, tn: 32, tk: 16, rm: 4, rn: 4 },
  { tm: 128, tn: 32, tk: 16, rm: 8, rn: 4 },
  { tm: 256, tn: 64, tk: 16, rm: 16, rn: 4 },
  { tm: 64, tn: 64, tk: 16, rm: 8, rn: 8 },
  // Four times the workgroups of the default, for small batches at 8 x 8.
  { tm: 32, tn: 32, tk: 16, rm: 4, rn: 4 },
  NARROW_CONV_TILES,
  // The next K tile's loads in flight while the current one is computed.
  { tm: 64, tn: 64, tk: 16, rm: 4, rn: 4, prefetch: true },
  { tm: 128, tn: 64, tk: 16, rm: 8, rn: 4, prefetch: true },
  { tm: 128, tn: 128, tk: 16, rm: 8, rn: 8, prefetch: true },
];

interface Shape {
  what: string;
  hw: number;
  cin: number;
  cout: number;
  k: number;
  stride: number;
}

function shapes(base: number): Shape[] {
  const b = base;
  return [
    // The one-channel input and output convolutions, padded to 4 channels.
    { what: "in conv", hw: 32, cin: 4, cout: b, k: 3, stride: 1 },
    { what: "out conv", hw: 32, cin: b, cout: 4, k: 3, stride: 1 },
    { what: "down1 conv", hw: 32, cin: b, cout: b, k: 3, stride: 1 },
    { what: "up1 conv1", hw: 32, cin: 3 * b, cout: b, k: 3, stride: 1 },
    { what: "up1 conv1 dx", hw: 32, cin: b, cout: 3 * b, k: 3, stride: 1 },
    { what: "up1 skip", hw: 32, cin: 3 * b, cout: b, k: 1, stride: 1 },
    { what: "ds1", hw: 32, cin: b, cout: b, k: 3, stride: 2 },
    { what: "down2 conv1", hw: 16, cin: b, cout: 2 * b, k: 3, stride: 1 },
    { what: "down2 conv2", hw: 16, cin: 2 * b, cout: 2 * b, k: 3, stride: 1 },
    { what: "up2 conv1", hw: 16, cin: 6 * b, cout: 2 * b, k: 3, stride: 1 },
    { what: "up2 conv1 dx", hw: 16, cin: 2 * b, cout: 6 * b, k: 3, stride: 1 },
    { what: "mid1 conv1", hw: 8, cin: 2 * b, cout: 4 * b, k: 3, stride: 1 },
    { what: "mid conv2", hw: 8, cin: 4 * b, cout: 4 * b, k: 3, stride: 1 },
  ];
}

/**
 * The weight gradient at each shape: GPU seconds of the scalar and the vec4
 * program (partial sums and their sum), and their largest difference
 * relative to the largest value.
 */
async function sweepWeightGradients(
  base: number,
  n: number,
  reps: number,
): Promise<Record<string, unknown>[]> {
  console.log("weight gradients (webgpuFilterGrad), TFLOP/s: scalar, vec4");
  const rows: Record<string, unknown>[] = [];
  let logSum = 0;
  for (const s of shapes(base)) {
    const pad = s.k === 1 ? 0 : 1;
    const oh = Math.floor((s.hw + 2 * pad - s.k) / s.stride) + 1;
    const flops = 2 * n * oh * oh * s.cout * s.k * s.k * s.cin;
    const x = tf.randomNormal([n, s.hw, s.hw, s.cin], 0, 1, "float32", 3);
    const dy = tf.randomNormal([n, oh, oh, s.cout], 0, 1, "float32", 4);
    const run = (vec4: boolean) => () =>
      webgpuFilterGrad(x as tf.Tensor4D, dy as tf.Tensor4D, {
        kh: s.k,
        kw: s.k,
        stride: s.stride,
        pad,
        vec4,
      });
    const a = run(false)();
    const b = run(true)();
    const err = (await tf.max(tf.abs(tf.sub(a, b))).data())[0] /
      (await tf.max(tf.abs(a)).data())[0];
    tf.dispose([a, b]);
    const scalar = await timeSum(run(false), reps);
    const vec4 = await timeSum(run(true), reps);
    tf.dispose([x, dy]);
    logSum += Math.log(scalar / vec4);
    const tf_ = (t: number) => (flops / t / 1e12).toFixed(2);
    console.log(
      `${
        s.what.padEnd(14)
      } ${s.hw}x${s.hw} ${s.cin}->${s.cout} k${s.k} s${s.stride}: ${
        tf_(scalar)
      } ${tf_(vec4)} (${(scalar / vec4).toFixed(2)}x); max rel diff ${
        err.toExponential(1)
      }`,
    );
    rows.push({ ...s, n, flops, scalar, vec4, err });
  }
  console.log(
    `geometric-mean speed-up of vec4 over scalar: ${
      Math.exp(logSum / rows.length).toFixed(2)
    }x`,
  );
  return rows;
}

/**
 * Seconds per call on the GPU of a call of several kernels: the sum of its
 * kernels' median times over `reps` calls, after a warm-up call.
 */
async function timeSum(f: () => tf.Tensor, reps: number): Promise<number> {
  const warm = f();
  await warm.data();
  warm.dispose();
  const info = await tf.profile(() => {
    for (let i = 0; i < reps; i++) f().dispose();
    return tf.scalar(0);
  });
  const per = new Map<string, number[]>();
  for (const k of info.kernels) {
    const t = await k.kernelTimeMs;
    if (typeof t !== "number") continue;
    per.set(k.name, [...per.get(k.name) ?? [], t]);
  }
  if (per.size === 0) {
    throw new Error(
      "conv_sweep: the adapter gave no kernel times (expected timestamp-query)",
    );
  }
  let sum = 0;
  for (const ms of per.values()) {
    ms.sort((a, b) => a - b);
    sum += ms[ms.length >> 1];
  }
  return sum / 1000;
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      batch: { type: "string", default: "64" },
      base: { type: "string", default: "64" },
      reps: { type: "string", default: "9" },
      json: { type: "string" },
      tilings: { type: "string" },
      only: { type: "string" },
    },
  });
  if (values.only !== undefined && !["conv", "wgrad"].includes(values.only)) {
    console.error(
      `conv_sweep: unknown --only (got ${values.only}, expected conv or wgrad)`,
    );
    return 2;
  }
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") {
    console.error(`conv_sweep: no WebGPU backend (${got.reason})`);
    return 1;
  }
  console.log(`adapter: ${got.adapter}`);
  const tilings = TILINGS.slice(0, Number(values.tilings ?? TILINGS.length));
  const n = Number(values.batch);
  const reps = Number(values.reps);
  const rows: Record<string, unknown>[] = [];
  const logSum = new Array(tilings.length).fill(0);
  for (const s of values.only === "wgrad" ? [] : shapes(Number(values.base))) {
    const pad = s.k === 1 ? 0 : 1;
    const oh = Math.floor((s.hw + 2 * pad - s.k) / s.stride) + 1;
    const flops = 2 * n * oh * oh * s.cout * s.k * s.k * s.cin;
    const x = tf.randomNormal([n, s.hw, s.hw, s.cin], 0, 1, "float32", 1);
    const w = tf.randomNormal([s.k, s.k, s.cin, s.cout], 0, 0.1, "float32", 2);
    const padding: [[number, number], [number, number], [number, number], [
      number,
      number,
    ]] = [[0, 0], [pad, pad], [pad, pad], [0, 0]];
    const tfjs = () =>
      tf.conv2d(x as tf.Tensor4D, w as tf.Tensor4D, s.stride, padding);
    const ref = tfjs();
    const tTfjs = await timeSum(tfjs, reps);
    const per: number[] = [];
    let worst = 0;
    for (const tiles of tilings) {
      const ours = () =>
        webgpuConv2d(x as tf.Tensor4D, w as tf.Tensor4D, {
          stride: s.stride,
          padY: pad,
          padX: pad,
          oh,
          ow: oh,
          tiles,
        });
      const y = ours();
      const err = (await tf.max(tf.abs(tf.sub(y, ref))).data())[0] /
        (await tf.max(tf.abs(ref)).data())[0];
      worst = Math.max(worst, err);
      y.dispose();
      per.push(await timeSum(ours, reps));
    }
    tf.dispose([x, w, ref]);
    const tf_ = (t: number) => (flops / t / 1e12).toFixed(2);
    const best = per.indexOf(Math.min(...per));
    per.forEach((t, i) => logSum[i] += Math.log(tTfjs / t));
    console.log(
      `${
        s.what.padEnd(14)
      } ${s.hw}x${s.hw} ${s.cin}->${s.cout} k${s.k} s${s.stride}: tfjs ${
        tf_(tTfjs)
      } TFLOP/s; ours ${per.map(tf_).join(" ")}; best ${
        JSON.stringify(tilings[best])
      } ${(tTfjs / per[best]).toFixed(2)}x; max rel err ${
        worst.toExponential(1)
      }`,
    );
    rows.push({ ...s, n, flops, tfjs: tTfjs, ours: per, worst });
  }
  if (rows.length > 0) {
    console.log("geometric-mean speed-up over tfjs per tiling:");
    tilings.forEach((t, i) =>
      console.log(
        `  ${JSON.stringify(t)}: ${
          Math.exp(logSum[i] / rows.length).toFixed(2)
        }x`,
      )
    );
  }
  const wgrad = values.only === "conv"
    ? []
    : await sweepWeightGradients(Number(values.base), n, reps);
  if (values.json) {
    await Deno.writeTextFile(
      values.json,
      JSON.stringify({ adapter: got.adapter, tilings, rows, wgrad }, null, 1),
    );
  }
  return 0;
}

if (import.meta.main) Deno.exitCode = await main();
