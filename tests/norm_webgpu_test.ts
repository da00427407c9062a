/**
 * GroupNorm (+SiLU) as core/_webgpu_norm.ts's WebGPU programs against the
 * tf-op path of core/_layers.ts on the cpu backend: statistics, values and
 * gradients (dx, dgamma, dbeta) at awkward shapes, on inputs with a large
 * non-zero mean and scale; and the forward's dispatch count. Runs on Mesa's
 * llvmpipe here; skipped where no WebGPU adapter exists.
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { groupNorm, groupNormSilu, normStats } from "../core/_layers.ts";
import { groupStatsF64, randoms, relErr } from "./_util.ts";

type Shape = [number, number, number, number];

const CASES: [Shape, number][] = [
  [[1, 8, 8, 16], 8],
  [[3, 5, 7, 16], 4],
  [[2, 4, 4, 64], 8],
  [[2, 3, 3, 6], 3],
  [[1, 1, 1, 4], 1],
  // More elements per group and per channel than a workgroup's 256 invocations.
  [[1, 17, 19, 8], 2],
  [[2, 9, 11, 32], 4],
  // Enough pixels for the parameter gradients' column sums to be split into
  // parts (core/_webgpu_reduce.ts): 16 of 256 rows, 6 of 288 with a ragged
  // column tile, 8 of 64 over two column tiles.
  [[4, 32, 32, 16], 8],
  [[3, 24, 24, 12], 3],
  [[2, 16, 16, 96], 8],
];

/** A case's inputs: x with a mean near 1000 and a spread of hundreds. */
function inputs(shape: Shape, seed: number) {
  const size = shape.reduce((a, b) => a * b, 1);
  const c = shape[3];
  return {
    x: randoms(size, seed).map((v, i) => 1000 + 300 * v + 40 * (i % c)),
    gamma: randoms(c, seed + 1).map((v) => 1 + 0.5 * v),
    beta: randoms(c, seed + 2).map((v) => 0.3 * v),
    dz: randoms(size, seed + 3),
  };
}

interface Result {
  /** (mean, r) per (image, group), read from either layout. */
  stats: number[];
  /** Per act (true, false): value, dx, dgamma, dbeta. */
  outs: Float32Array[][];
}

/** Statistics, values and gradients of every case on `backend`; null where it is not available. */
async function compute(backend: "cpu" | "webgpu"): Promise<Result[] | null> {
  const got = await initBackend(backend);
  if (got.backend !== backend) return null;
  const results: Result[] = [];
  const before = tf.memory().numTensors;
  for (const [i, [shape, groups]] of CASES.entries()) {
    const k = inputs(shape, 10 * i + 1);
    const c = shape[3];
    const x = tf.tensor4d(k.x, shape);
    const gamma = tf.tensor1d(k.gamma);
    const beta = tf.tensor1d(k.beta);
    const dz = tf.tensor4d(k.dz, shape);
    const s = normStats(x, groups, 1e-5);
    const mean = await s.mean.data();
    const r = await s.r.data();
    const stats: number[] = [];
    for (let n = 0; n < shape[0]; n++) {
      for (let g = 0; g < groups; g++) {
        if (backend === "webgpu") {
          const at = (n * groups + g) * 2;
          stats.push(mean[at], r[at + 1]);
        } else {
          const at = n * c + g * (c / groups);
          stats.push(mean[at], r[at]);
        }
      }
    }
    tf.dispose([s.mean, s.r]);
    const outs: Float32Array[][] = [];
    for (const f of [groupNormSilu, groupNorm]) {
      const op = (a: tf.Tensor, g: tf.Tensor, b: tf.Tensor) =>
        f(a as tf.Tensor4D, g, b, groups);
      const ts = tf.tidy(() => [
        op(x, gamma, beta),
        ...tf.grads(op)([x, gamma, beta], dz),
      ]);
      outs.push(
        await Promise.all(ts.map(async (t) => await t.data() as Float32Array)),
      );
      tf.dispose(ts);
    }
    tf.dispose([x, gamma, beta, dz]);
    results.push({ stats, outs });
  }
  assert.equal(tf.memory().numTensors, before, `${backend}: tensors leaked`);
  return results;
}

/** (mean, r) per (image, group) in float64, flat. */
function statsF64(shape: Shape, groups: number, x: Float32Array): number[] {
  return groupStatsF64(x, shape, groups).flatMap(({ mean, r }) => [mean, r]);
}

Deno.test("GroupNorm(+SiLU) on WebGPU: statistics, values and gradients equal the cpu tf-op path", async () => {
  const gpu = await compute("webgpu");
  if (gpu === null) {
    await initBackend("cpu");
    return;
  }
  const cpu = (await compute("cpu"))!;
  for (const [i, [shape, groups]] of CASES.entries()) {
    const f64 = statsF64(shape, groups, inputs(shape, 10 * i + 1).x);
    const both = [["webgpu", gpu[i].stats], ["cpu", cpu[i].stats]] as const;
    for (let j = 0; j < f64.length; j++) {
      for (const [name, got] of both) {
        const err = Math.abs(got[j] - f64[j]) / Math.abs(f64[j]);
        assert.ok(
          err < 1e-5,
          `${shape} ${name} stats[${j}]: ${got[j]} vs ${f64[j]}`,
        );
      }
    }
    for (const [a, act] of ["silu", "none"].entries()) {
      ["value", "dx", "dgamma", "dbeta"].forEach((what, m) => {
        const err = relErr(gpu[i].outs[a][m], cpu[i].outs[a][m]);
        assert.ok(
          err < 2e-5,
          `${shape} groups ${groups} act ${act} ${what}: ${err}`,
        );
      });
    }
  }
});

Deno.test("GroupNorm+SiLU forward on WebGPU is two dispatches", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") {
    await initBackend("cpu");
    return;
  }
  const [shape, groups] = CASES[2];
  const k = inputs(shape, 5);
  const x = tf.tensor4d(k.x, shape);
  const gamma = tf.tensor1d(k.gamma);
  const beta = tf.tensor1d(k.beta);
  const profile = await tf.profile(() => groupNormSilu(x, gamma, beta, groups));
  // The statistics and the apply, and the customGrad op's own (unnamed,
  // dispatch-free) entry; tfjs's composite took ~14.
  const names = profile.kernels.map((kk) => kk.name);
  assert.ok(names.length <= 3, `kernels: ${names.join(", ")}`);
  assert.deepEqual(names.filter((n) => n !== ""), [
    "DdpmNormStats",
    "DdpmNormAct",
  ]);
  tf.dispose([x, gamma, beta]);
  await initBackend("cpu");
});
