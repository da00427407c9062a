import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import "../core/_gradients.ts";
import { groupNorm, groupNormSilu, silu } from "../core/_layers.ts";
import { channelSum, spatialSum } from "../core/_reduce.ts";
import { conv2d, conv2dTranspose } from "../core/_conv.ts";
import {
  normActConv,
  resBlock,
  type ResBlockParams,
} from "../core/_resblock.ts";
import { groupNormF64, randoms, spatialSumByHand } from "./_util.ts";

await initBackend("cpu");

function maxRel(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let scale = 0;
  let d = 0;
  for (let i = 0; i < a.length; i++) {
    scale = Math.max(scale, Math.abs(b[i]));
    d = Math.max(d, Math.abs(a[i] - b[i]));
  }
  return d / Math.max(scale, 1e-12);
}

/** GroupNorm as tfjs composes it from means and broadcasts: the second implementation. */
function compositeGroupNorm(
  x: tf.Tensor4D,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  groups: number,
): tf.Tensor4D {
  const [n, h, w, c] = x.shape;
  const g = tf.reshape(x, [n, h, w, groups, c / groups]);
  const mean = tf.mean(g, [1, 2, 4], true);
  const centred = tf.sub(g, mean);
  const variance = tf.mean(tf.square(centred), [1, 2, 4], true);
  const normed = tf.mul(centred, tf.rsqrt(tf.add(variance, 1e-5)));
  return tf.add(tf.mul(tf.reshape(normed, [n, h, w, c]), gamma), beta);
}

interface Case {
  x: tf.Tensor4D;
  gamma: tf.Tensor1D;
  beta: tf.Tensor1D;
  dz: tf.Tensor4D;
}

function normCase(shape: [number, number, number, number]): Case {
  const size = shape.reduce((a, b) => a * b, 1);
  const c = shape[3];
  // Channel offsets and a non-zero mean, so centring matters.
  const xs = randoms(size, 1).map((v, i) => 2 * v + 0.5 + 0.1 * (i % c));
  return {
    x: tf.tensor4d(xs, shape),
    gamma: tf.tensor1d(randoms(c, 2).map((v) => 1 + 0.5 * v)),
    beta: tf.tensor1d(randoms(c, 3).map((v) => 0.3 * v)),
    dz: tf.tensor4d(randoms(size, 4), shape),
  };
}

/** Values and gradients (x, gamma, beta) of f against the upstream gradient dz. */
function valueAndGrads(
  f: (x: tf.Tensor4D, g: tf.Tensor, b: tf.Tensor) => tf.Tensor4D,
  k: Case,
): Float32Array[] {
  return tf.tidy(() => {
    const grads = tf.grads((x: tf.Tensor, g: tf.Tensor, b: tf.Tensor) =>
      f(x as tf.Tensor4D, g, b)
    )([k.x, k.gamma, k.beta], k.dz);
    const y = f(k.x, k.gamma, k.beta);
    return [y, ...grads].map((t) => t.dataSync() as Float32Array);
  });
}

for (const backend of ["cpu", "wasm"] as const) {
  Deno.test(`groupNormSilu and groupNorm: values and gradients equal tfjs's composite (${backend})`, async () => {
    await initBackend(backend);
    for (
      const [shape, groups] of [
        [[2, 4, 4, 16], 8],
        [[3, 2, 6, 8], 2],
        [[1, 5, 5, 4], 1],
      ] as [[number, number, number, number], number][]
    ) {
      const k = normCase(shape);
      const before = tf.memory().numTensors;
      const pairs: [
        (x: tf.Tensor4D, g: tf.Tensor, b: tf.Tensor) => tf.Tensor4D,
        (x: tf.Tensor4D, g: tf.Tensor, b: tf.Tensor) => tf.Tensor4D,
      ][] = [
        [
          (x, g, b) => groupNormSilu(x, g, b, groups),
          (x, g, b) => silu(compositeGroupNorm(x, g, b, groups)),
        ],
        [
          (x, g, b) => groupNorm(x, g, b, groups),
          (x, g, b) => compositeGroupNorm(x, g, b, groups),
        ],
      ];
      for (const [fused, composite] of pairs) {
        const got = valueAndGrads(fused, k);
        const want = valueAndGrads(composite, k);
        ["value", "dx", "dgamma", "dbeta"].forEach((what, i) => {
          const err = maxRel(got[i], want[i]);
          assert.ok(err < 2e-5, `${backend} ${shape} ${what}: ${err}`);
        });
      }
      assert.equal(tf.memory().numTensors, before);
      tf.dispose([k.x, k.gamma, k.beta, k.dz]);
    }
    await initBackend("cpu");
  });
}

Deno.test("groupNormSilu is silu of a float64 GroupNorm by hand", () => {
  const [n, h, w, c, groups] = [2, 3, 3, 4, 2];
  const xs = randoms(n * h * w * c, 9).map((v, i) => 3 * v + (i % c));
  const x = tf.tensor4d(xs, [n, h, w, c]);
  const gamma = tf.tensor1d([1, -0.5, 2, 0.25]);
  const beta = tf.tensor1d([0, 0.1, -0.2, 0.3]);
  const got = groupNormSilu(x, gamma, beta, groups).dataSync();
  const y = groupNormF64(
    xs,
    [n, h, w, c],
    gamma.dataSync(),
    beta.dataSync(),
    groups,
  );
  for (const [j, yj] of y.entries()) {
    const want = yj / (1 + Math.exp(-yj));
    assert.ok(Math.abs(got[j] - want) < 1e-5, `${j}: ${got[j]} vs ${want}`);
  }
  tf.dispose([x, gamma, beta]);
});

Deno.test("spatialSum and channelSum add over the outer axes, by hand", () => {
  const { x: xs, shape, want } = spatialSumByHand();
  const [n, , , c] = shape;
  const x = tf.tensor4d(xs, shape);
  const s = spatialSum(x);
  assert.deepEqual(s.shape, [n, 1, 1, c]);
  // (An average pool times the window on wasm and cpu: exact up to rounding.)
  assert.ok(maxRel(s.dataSync(), want) < 1e-6);
  const t = channelSum(x);
  assert.ok(
    maxRel(t.dataSync(), [0, 1, 2].map((e) => want[e] + want[c + e])) < 1e-6,
  );
  tf.dispose([x, s, t]);
});

for (const backend of ["cpu", "wasm"] as const) {
  Deno.test(`conv2d and conv2dTranspose with a bias: value and gradients are the unbiased op's plus the bias's (${backend})`, async () => {
    await initBackend(backend);
    const x = tf.tensor4d(randoms(2 * 6 * 6 * 3, 11), [2, 6, 6, 3]);
    const w = tf.tensor4d(randoms(3 * 3 * 3 * 4, 12), [3, 3, 3, 4]);
    const b = tf.tensor1d([0.5, -1, 2, 0.25]);
    const wt = tf.tensor4d(randoms(4 * 4 * 4 * 3, 13), [4, 4, 4, 3]);
    const before = tf.memory().numTensors;
    const cases: [
      string,
      (x: tf.Tensor, w: tf.Tensor, b?: tf.Tensor) => tf.Tensor4D,
      tf.Tensor,
      number[],
    ][] = [
      [
        "conv2d s2",
        (a, k, c) => conv2d(a as tf.Tensor4D, k as tf.Tensor4D, 2, 1, c),
        w,
        [2, 3, 3, 4],
      ],
      [
        "conv2dTranspose",
        (a, k, c) =>
          conv2dTranspose(
            a as tf.Tensor4D,
            k as tf.Tensor4D,
            [2, 12, 12, 4],
            2,
            1,
            c,
          ),
        wt,
        [2, 12, 12, 4],
      ],
    ];
    for (const [what, f, kernel, outShape] of cases) {
      const dy = tf.tensor4d(
        randoms(outShape.reduce((p, q) => p * q, 1), 14),
        outShape as [number, number, number, number],
      );
      const [withBias, plain] = tf.tidy(() => {
        const gb = tf.grads((a: tf.Tensor, k: tf.Tensor, c: tf.Tensor) =>
          f(a, k, c)
        )(
          [x, kernel, b],
          dy,
        );
        const gp = tf.grads((a: tf.Tensor, k: tf.Tensor) => f(a, k))([
          x,
          kernel,
        ], dy);
        return [
          [f(x, kernel, b), ...gb].map((t) => t.dataSync()),
          [f(x, kernel), ...gp].map((t) => t.dataSync()),
        ];
      });
      // value = plain + b per channel
      for (let i = 0; i < plain[0].length; i++) {
        const want = plain[0][i] + [0.5, -1, 2, 0.25][i % 4];
        assert.ok(Math.abs(withBias[0][i] - want) < 1e-4, `${what} value ${i}`);
      }
      assert.ok(maxRel(withBias[1], plain[1]) < 1e-6, `${what} dx`);
      assert.ok(maxRel(withBias[2], plain[2]) < 1e-6, `${what} dw`);
      const d = dy.dataSync();
      const want = [0, 0, 0, 0];
      for (let i = 0; i < d.length; i++) want[i % 4] += d[i];
      assert.ok(maxRel(withBias[3], want) < 1e-5, `${what} dbias`);
      dy.dispose();
    }
    assert.equal(tf.memory().numTensors, before);
    tf.dispose([x, w, b, wt]);
    await initBackend("cpu");
  });
}

// ------------------------------------------------ the ResBlock as one op

/** Test weights for a block Cin -> Cout, in TF layouts. */
function blockParams(cin: number, cout: number, seed: number): ResBlockParams {
  const t = (shape: number[], k: number, scale: number, offset = 0) =>
    tf.tensor(
      randoms(shape.reduce((a, b) => a * b, 1), seed + k).map((v) =>
        offset + scale * v
      ),
      shape,
    );
  return {
    norm1: [t([cin], 1, 0.3, 1), t([cin], 2, 0.2)],
    conv1: [t([3, 3, cin, cout], 3, 0.3) as tf.Tensor4D, t([cout], 4, 0.1)],
    norm2: [t([cout], 5, 0.3, 1), t([cout], 6, 0.2)],
    conv2: [t([3, 3, cout, cout], 7, 0.3) as tf.Tensor4D, t([cout], 8, 0.1)],
    skip: cin === cout
      ? undefined
      : [t([1, 1, cin, cout], 9, 0.3) as tf.Tensor4D, t([cout], 10, 0.1)],
  };
}

/** The ResBlock composed from tfjs's own ops (autodiff gradients): the second implementation. */
function compositeBlock(
  x: tf.Tensor4D,
  proj: tf.Tensor2D,
  p: ResBlockParams,
  groups: number,
): tf.Tensor4D {
  const conv = (h: tf.Tensor4D, [w, b]: [tf.Tensor4D, tf.Tensor]) =>
    tf.add(tf.conv2d(h, w, 1, "same"), b) as tf.Tensor4D;
  const norm = (h: tf.Tensor4D, [g, b]: [tf.Tensor, tf.Tensor]) =>
    silu(compositeGroupNorm(h, g, b, groups));
  const [n, , , c] = [...x.shape.slice(0, 3), proj.shape[1]];
  let y = conv(norm(x, p.norm1), p.conv1);
  y = tf.add(y, tf.reshape(proj, [n, 1, 1, c]));
  y = conv(norm(y, p.norm2), p.conv2);
  return tf.add(y, p.skip ? conv(x, p.skip) : x) as tf.Tensor4D;
}

function flatParams(p: ResBlockParams): tf.Tensor[] {
  return [
    ...p.norm1,
    ...p.conv1,
    ...p.norm2,
    ...p.conv2,
    ...(p.skip ?? []),
  ];
}

function unflat(ts: tf.Tensor[], withSkip: boolean): ResBlockParams {
  return {
    norm1: [ts[0], ts[1]],
    conv1: [ts[2] as tf.Tensor4D, ts[3]],
    norm2: [ts[4], ts[5]],
    conv2: [ts[6] as tf.Tensor4D, ts[7]],
    skip: withSkip ? [ts[8] as tf.Tensor4D, ts[9]] : undefined,
  };
}

/**
 * Values and gradients of a block-shaped function on the current backend,
 * from host data (tensors built and freed here).
 */
function blockRun(
  f: (x: tf.Tensor4D, proj: tf.Tensor2D, p: ResBlockParams) => tf.Tensor4D,
  [cin, cout]: number[],
  head: boolean,
): Float32Array[] {
  const [n, h] = [2, 6];
  return tf.tidy(() => {
    const x = tf.tensor4d(
      randoms(n * h * h * cin, 20).map((v) => 2 * v + 0.3),
      [n, h, h, cin],
    );
    const proj = tf.tensor2d(randoms(n * cout, 21), [n, cout]);
    const p = blockParams(cin, cout, 30);
    const dz = tf.tensor4d(randoms(n * h * h * cout, 22), [n, h, h, cout]);
    const withSkip = p.skip !== undefined;
    if (head) {
      // conv(silu(norm(x))) with norm1 and conv1's weights.
      const args = [x, p.norm1[0], p.norm1[1], p.conv1[0], p.conv1[1]];
      const g = (a: tf.Tensor[]) =>
        f(a[0] as tf.Tensor4D, proj, {
          ...p,
          norm1: [a[1], a[2]],
          conv1: [a[3] as tf.Tensor4D, a[4]],
        });
      const grads = tf.grads((...a: tf.Tensor[]) => g(a))(args, dz);
      return [g(args), ...grads].map((t) => t.dataSync() as Float32Array);
    }
    const grads = tf.grads((...a: tf.Tensor[]) =>
      f(
        a[0] as tf.Tensor4D,
        a[1] as tf.Tensor2D,
        unflat(a.slice(2), withSkip),
      )
    )([x, proj, ...flatParams(p)], dz);
    return [f(x, proj, p), ...grads].map((t) => t.dataSync() as Float32Array);
  });
}

for (const backend of ["cpu", "wasm"] as const) {
  Deno.test(`resBlock and normActConv: values and every gradient equal tfjs's composite on cpu (${backend})`, async () => {
    const cases: [
      string,
      boolean,
      (x: tf.Tensor4D, proj: tf.Tensor2D, p: ResBlockParams) => tf.Tensor4D,
      (x: tf.Tensor4D, proj: tf.Tensor2D, p: ResBlockParams) => tf.Tensor4D,
    ][] = [
      [
        "resBlock",
        false,
        (x, proj, p) => resBlock(x, proj, p, 4),
        (x, proj, p) => compositeBlock(x, proj, p, 4),
      ],
      [
        "normActConv",
        true,
        (x, _proj, p) => normActConv(x, p.norm1, p.conv1, 4),
        (x, _proj, p) =>
          tf.add(
            tf.conv2d(
              silu(compositeGroupNorm(x, p.norm1[0], p.norm1[1], 4)),
              p.conv1[0],
              1,
              "same",
            ),
            p.conv1[1],
          ) as tf.Tensor4D,
      ],
    ];
    for (const channels of [[8, 16], [16, 16]]) {
      for (const [what, head, fused, composite] of cases) {
        await initBackend("cpu");
        const want = blockRun(composite, channels, head);
        await initBackend(backend);
        const before = tf.memory().numTensors;
        const got = blockRun(fused, channels, head);
        assert.equal(tf.memory().numTensors, before);
        assert.equal(got.length, want.length);
        got.forEach((g, i) => {
          const err = maxRel(g, want[i]);
          assert.ok(
            err < 5e-5,
            `${backend} ${what} ${channels} output ${i}: ${err}`,
          );
        });
      }
    }
    await initBackend("cpu");
  });
}
