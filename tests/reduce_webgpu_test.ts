/**
 * Column sums on WebGPU (core/_webgpu_reduce.ts) and the reductions built on
 * them (`spatialSum`, `channelSum` of core/_reduce.ts) against sums in
 * float64 and by hand: one run and one run per image, column counts that
 * leave a tile ragged, and runs long enough to be split into parts. Skipped
 * where no WebGPU adapter exists.
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { channelSum, spatialSum } from "../core/_reduce.ts";
import { columnPlan, webgpuColumnSums } from "../core/_webgpu_reduce.ts";
import { randoms, relErr, spatialSumByHand } from "./_util.ts";

/** Column sums of each run in float64. */
function sumsF64(
  x: Float32Array,
  rows: number,
  c: number,
  segments: number,
): Float64Array {
  const out = new Float64Array(segments * c);
  const seg = rows / segments;
  for (let r = 0; r < rows; r++) {
    const s = Math.floor(r / seg);
    for (let k = 0; k < c; k++) out[s * c + k] += x[r * c + k];
  }
  return out;
}

/** [rows, columns, runs]. */
const CASES: [number, number, number][] = [
  [6, 3, 1], // 4 columns per workgroup, one of them idle
  [6, 3, 2],
  [4096, 16, 1], // split into parts
  [4096, 16, 4],
  [1728, 12, 1], // 16 columns per workgroup, ragged; 6 parts
  [512, 96, 1], // two 64-column tiles, the second ragged
  [2048, 200, 8], // four tiles, one run per image
  [33, 5, 3], // runs shorter than a workgroup's lanes
  [2000, 16, 2], // 3 parts of 334, 334 and 332 rows per run
  // Lanes with 3 rows past a multiple of 4 (the four-row loop's remainder):
  // 5 parts of 300 rows, 19 for most lanes; and 64 lanes over runs of 200.
  [1500, 16, 1],
  [400, 3, 2],
];

Deno.test("webgpuColumnSums matches float64 column sums: ragged column tiles, runs, parts", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  try {
    const before = tf.memory().numTensors;
    let split = 0;
    for (const [i, [rows, c, segments]] of CASES.entries()) {
      if (columnPlan(rows, c, segments).parts > 1) split++;
      const data = randoms(rows * c, 40 + i).map((v, j) => v + (j % 7) - 3);
      const x = tf.tensor2d(data, [rows, c]);
      const s = webgpuColumnSums(x, segments);
      assert.deepEqual(s.shape, [segments, c]);
      const err = relErr(
        await s.data() as Float32Array,
        sumsF64(data, rows, c, segments),
      );
      assert.ok(err < 1e-5, `${rows}x${c} in ${segments} runs: ${err}`);
      tf.dispose([x, s]);
    }
    assert.ok(split >= 3, `only ${split} cases were split into parts`);
    // No rows: zero sums.
    const none = tf.zeros([0, 3]) as tf.Tensor2D;
    const zero = webgpuColumnSums(none, 2);
    assert.deepEqual(zero.shape, [2, 3]);
    assert.deepEqual([...await zero.data()], [0, 0, 0, 0, 0, 0]);
    tf.dispose([none, zero]);
    const odd = tf.zeros([5, 2]) as tf.Tensor2D;
    assert.throws(
      () => webgpuColumnSums(odd, 2),
      /got 5 rows, 2 runs, expected a positive divisor of the rows/,
    );
    odd.dispose();
    assert.equal(tf.memory().numTensors, before);
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("spatialSum and channelSum on webgpu: by hand, and a batch of 64 x 32 x 32 x 64 in three dispatches", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  try {
    // The hand-checked case of fused_ops_test.ts, here exact.
    const { x: xs, shape: hand, want } = spatialSumByHand();
    const [n, , , c] = hand;
    const x = tf.tensor4d(xs, hand);
    const s = spatialSum(x);
    assert.deepEqual(s.shape, [n, 1, 1, c]);
    assert.deepEqual([...await s.data()], want);
    const t = channelSum(x);
    assert.deepEqual(t.shape, [c]);
    assert.deepEqual(
      [...await t.data()],
      [0, 1, 2].map((e) => want[e] + want[c + e]),
    );
    tf.dispose([x, s, t]);
    // The base-64 UNet's first level at a training batch. Its channel sums
    // take three dispatches: 1,024 parts of 64 rows, then 16 parts of the
    // partial sums, then the last one.
    const shape: [number, number, number, number] = [64, 32, 32, 64];
    const data = randoms(64 * 32 * 32 * 64, 7);
    const big = tf.tensor4d(data, shape);
    const per = spatialSum(big);
    const profile = await tf.profile(() => channelSum(big));
    const all = profile.result as tf.Tensor;
    const dispatches = profile.kernels.filter((k) =>
      k.name === "DdpmColumnSums"
    );
    assert.equal(dispatches.length, 3);
    const perWant = sumsF64(data, 64 * 1024, 64, 64);
    assert.ok(relErr(await per.data() as Float32Array, perWant) < 1e-5);
    const allWant = sumsF64(data, 64 * 1024, 64, 1);
    assert.ok(relErr(await all.data() as Float32Array, allWant) < 1e-5);
    tf.dispose([big, per, all]);
  } finally {
    await initBackend("cpu");
  }
});
