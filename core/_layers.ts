/**
 * The UNet's small layers, as the PyTorch reference defines them (NHWC here).
 *
 * @module
 */
import { tf } from "./backend.ts";
import { spatialSum } from "./_reduce.ts";
import { gpuNormAct, gpuNormGrad, gpuNormStats } from "./_webgpu_norm.ts";
import { useWebGpuConv, webgpuConv2d } from "./_webgpu_conv.ts";
import {
  wasmNormAct,
  wasmNormGradDx,
  wasmNormGradSums,
  wasmNormStats,
} from "./_wasm_kernels.ts";

/**
 * The reference's sinusoidal timestep embedding: with half = dim / 2 and
 * f_k = exp(-k ln(10000) / (half - 1)), row n is
 * [sin(t_n f_0), ..., sin(t_n f_{half-1}), cos(t_n f_0), ..., cos(t_n f_{half-1})],
 * the products taken in float32 as PyTorch does.
 *
 * @param t Timesteps, int32 `[N]`.
 * @param dim Embedding width; even and at least 4.
 * @returns float32 `[N, dim]`.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { sinusoidalEmbedding } from "./_layers.ts";
 * await initBackend("cpu");
 * const t = tf.tensor1d([0], "int32");
 * const e = sinusoidalEmbedding(t, 4);
 * console.log(e.dataSync()); // [0, 0, 1, 1]
 * tf.dispose([t, e]);
 * ```
 */
export function sinusoidalEmbedding(t: tf.Tensor1D, dim: number): tf.Tensor2D {
  const half = dim / 2;
  const scale = Math.log(10000) / (half - 1);
  const freqs = new Float32Array(half);
  for (let k = 0; k < half; k++) freqs[k] = Math.exp(-k * scale);
  return tf.tidy(() => {
    const args = tf.mul(
      tf.reshape(tf.cast(t, "float32"), [-1, 1]),
      tf.tensor2d(freqs, [1, half]),
    );
    return tf.concat([tf.sin(args), tf.cos(args)], 1) as tf.Tensor2D;
  });
}

/**
 * SiLU, x sigmoid(x).
 *
 * @param x Any float tensor.
 * @returns x sigmoid(x), same shape.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { silu } from "./_layers.ts";
 * await initBackend("cpu");
 * const x = tf.tensor1d([0]);
 * const y = silu(x);
 * console.log(y.dataSync()); // [0]
 * tf.dispose([x, y]);
 * ```
 */
export function silu<T extends tf.Tensor>(x: T): T {
  return tf.tidy(() => tf.mul(x, tf.sigmoid(x)) as T);
}

/**
 * A linear layer, x W + b, with W in TF layout `[in, out]`.
 *
 * @param x `[N, in]`.
 * @param w `[in, out]`.
 * @param b `[out]`.
 * @returns `[N, out]`.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { linear } from "./_layers.ts";
 * await initBackend("cpu");
 * const x = tf.tensor2d([[1, 2]]);
 * const w = tf.tensor2d([[1], [1]]);
 * const b = tf.tensor1d([0.5]);
 * const y = linear(x, w, b);
 * console.log(y.dataSync()); // [3.5]
 * tf.dispose([x, w, b, y]);
 * ```
 */
export function linear(
  x: tf.Tensor2D,
  w: tf.Tensor,
  b: tf.Tensor,
): tf.Tensor2D {
  const [m, k] = x.shape;
  const n = w.shape[1]!;
  if (!useWebGpuConv(k, n)) {
    return tf.tidy(() => tf.add(tf.matMul(x, w as tf.Tensor2D), b));
  }
  // On WebGPU, x W + b and dx = dy W^T as 1x1 convolutions of ours (a
  // GEMM; tfjs's matMul takes some 0.25 ms for these [64, 256] products
  // on an H200), dW = x^T dy through tfjs.
  const gemm = (a: tf.Tensor, rows: number, cols: number, flip: boolean) =>
    tf.reshape(
      webgpuConv2d(
        tf.reshape(a, [rows, 1, 1, a.shape[1]!]) as tf.Tensor4D,
        tf.reshape(w, [1, 1, k, n]) as tf.Tensor4D,
        { stride: 1, padY: 0, padX: 0, oh: 1, ow: 1, flip },
      ),
      [rows, cols],
    );
  const op = tf.customGrad(
    (...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
      const [xi, wi, bi] = args as tf.Tensor[];
      (args[3] as tf.GradSaveFunc)([xi, wi]);
      return {
        value: tf.add(gemm(xi, m, n, false), bi),
        gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => [
          gemm(dy, m, k, true),
          tf.matMul(saved[0] as tf.Tensor2D, dy as tf.Tensor2D, true, false),
          tf.sum(dy, 0),
        ],
      };
    },
  );
  return op(x, w, b) as tf.Tensor2D;
}

/**
 * Per-(image, group) means of per-channel sums, broadcast back to the
 * channels: `[N, 1, 1, C]` sums over `count / (C / groups)` elements each ->
 * `[N, 1, 1, C]` group means (over `count` elements).
 */
function groupMean(
  sums: tf.Tensor4D,
  groups: number,
  count: number,
): tf.Tensor4D {
  const [n, , , c] = sums.shape;
  const per = c / groups;
  const g = tf.div(tf.sum(tf.reshape(sums, [n, groups, per]), 2, true), count);
  return tf.reshape(tf.tile(g, [1, 1, per]), [n, 1, 1, c]);
}

/**
 * GroupNorm's per-(image, group) statistics, broadcast to the channels; on
 * WebGPU packed instead, both fields holding the same `[N, groups, 2]`
 * tensor of (mean, r) pairs that core/_webgpu_norm.ts's programs read.
 */
export interface NormStats {
  /** Group means, `[N, 1, 1, C]` (WebGPU: the packed statistics). */
  mean: tf.Tensor;
  /** 1 / sqrt(group variance + eps), `[N, 1, 1, C]` (WebGPU: the packed statistics). */
  r: tf.Tensor;
}

/** Whether the norm runs as core/_webgpu_norm.ts's programs. */
function onWebGpu(): boolean {
  return tf.getBackend() === "webgpu";
}

/**
 * GroupNorm's statistics of x: the per-(image, group) mean and
 * r = 1 / sqrt(v + eps) with v the biased variance (two passes).
 *
 * @param x `[N, H, W, C]`, C divisible by `groups`.
 * @param groups Number of groups.
 * @param eps Added to the variance.
 * @returns Mean and r, broadcast to `[N, 1, 1, C]` (packed on WebGPU, see {@linkcode NormStats}).
 */
export function normStats(
  x: tf.Tensor4D,
  groups: number,
  eps: number,
): NormStats {
  if (onWebGpu()) {
    const packed = gpuNormStats(x, groups, eps);
    return { mean: packed, r: packed };
  }
  const ours = wasmNormStats(x, groups, eps);
  if (ours !== null) return { mean: ours[0], r: ours[1] };
  return tf.tidy(() => {
    const [, h, w, c] = x.shape;
    const count = h * w * (c / groups);
    const mean = groupMean(spatialSum(x), groups, count);
    const centred = tf.sub(x, mean) as tf.Tensor4D;
    const variance = groupMean(spatialSum(tf.square(centred)), groups, count);
    return { mean, r: tf.rsqrt(tf.add(variance, eps)) as tf.Tensor4D };
  });
}

/**
 * GroupNorm (and SiLU) of x from its statistics: y = gamma (x - mean) r + beta,
 * and z = y sigmoid(y) when `act`, else y.
 *
 * @param x `[N, H, W, C]`.
 * @param gamma Per-channel scale `[C]`.
 * @param beta Per-channel shift `[C]`.
 * @param stats From {@linkcode normStats}.
 * @param act Whether SiLU follows.
 * @returns z, `[N, H, W, C]`.
 */
export function normActApply(
  x: tf.Tensor4D,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  stats: NormStats,
  act: boolean,
): tf.Tensor4D {
  if (onWebGpu()) {
    return gpuNormAct(x, stats.mean, gamma, beta, act);
  }
  const ours = wasmNormAct(x, stats.mean, stats.r, gamma, beta, act);
  if (ours !== null) return ours;
  return tf.tidy(() => {
    // (x - mean) (r gamma) + beta, with the per-channel factors folded first.
    const y = tf.add(
      tf.mul(tf.sub(x, stats.mean), tf.mul(stats.r, gamma)),
      beta,
    ) as tf.Tensor4D;
    return act ? tf.mul(y, tf.sigmoid(y)) as tf.Tensor4D : y;
  });
}

/**
 * The gradients of {@linkcode normActApply} (with the statistics' own
 * dependence on x) in closed form, means over each group:
 * with xhat = (x - mean) r, y = gamma xhat + beta, s = sigmoid(y) and
 * dy = dz s (1 + y (1 - s)) (or dz without SiLU):
 * dbeta = sum dy, dgamma = sum dy xhat (over N, H, W),
 * dx = r (gamma dy - mean(gamma dy) - xhat mean(gamma dy xhat)).
 *
 * @param x The input `[N, H, W, C]`.
 * @param gamma Per-channel scale `[C]`.
 * @param beta Per-channel shift `[C]`.
 * @param stats From {@linkcode normStats}.
 * @param dz The gradient of the output.
 * @param groups Number of groups.
 * @param act Whether SiLU follows.
 * @returns `[dx, dgamma, dbeta]`.
 */
export function normActGrad(
  x: tf.Tensor4D,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  stats: NormStats,
  dz: tf.Tensor4D,
  groups: number,
  act: boolean,
): [tf.Tensor4D, tf.Tensor1D, tf.Tensor1D] {
  if (onWebGpu()) {
    return gpuNormGrad(x, stats.mean, gamma, beta, dz, groups, act);
  }
  return tf.tidy(() => {
    const [, h, w, c] = x.shape;
    const count = h * w * (c / groups);
    const { mean, r } = stats;
    const inputs = { x, mean, r, gamma, beta, dz };
    // On wasm, two passes of ours (the sums, then dx) recompute xhat and dy
    // instead of keeping the dozen full-size tensors the ops below make.
    const ours = wasmNormGradSums(inputs, act);
    let composite: { xhat: tf.Tensor; dy: tf.Tensor } | null = null;
    let sums: [tf.Tensor4D, tf.Tensor4D];
    if (ours !== null) {
      sums = ours;
    } else {
      const xhat = tf.mul(tf.sub(x, mean), r);
      let dy: tf.Tensor = dz;
      if (act) {
        const y = tf.add(tf.mul(xhat, gamma), beta);
        const s = tf.sigmoid(y);
        dy = tf.mul(dz, tf.mul(s, tf.add(1, tf.mul(y, tf.sub(1, s)))));
      }
      composite = { xhat, dy };
      sums = [
        spatialSum(dy as tf.Tensor4D),
        spatialSum(tf.mul(dy, xhat) as tf.Tensor4D),
      ];
    }
    // Per (image, channel) sums; gamma is constant over the image, so the
    // sums of gamma dy and gamma dy xhat are gamma times these.
    const [sumDy, sumDyx] = sums;
    const dbeta = tf.reshape(tf.sum(sumDy, [0, 1, 2]), [c]) as tf.Tensor1D;
    const dgamma = tf.reshape(tf.sum(sumDyx, [0, 1, 2]), [c]) as tf.Tensor1D;
    const a = groupMean(tf.mul(sumDy, gamma), groups, count);
    const b = groupMean(tf.mul(sumDyx, gamma), groups, count);
    // dx = dy (r gamma) - xhat (r b) - r a
    const ra = tf.mul(r, a);
    const rb = tf.mul(r, b);
    const dx = composite === null
      ? wasmNormGradDx(inputs, ra, rb, act)
      : tf.sub(
        tf.sub(
          tf.mul(composite.dy, tf.mul(r, gamma)),
          tf.mul(composite.xhat, rb),
        ),
        ra,
      ) as tf.Tensor4D;
    return [dx, dgamma, dbeta];
  });
}

/**
 * GroupNorm, optionally followed by SiLU, as one op with its gradient in
 * closed form (tfjs's composite of means and broadcasts costs 2-3x more on
 * wasm, forward and backward). Only x and the statistics are kept for the
 * backward.
 */
function normAct(
  x: tf.Tensor4D,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  groups: number,
  eps: number,
  act: boolean,
): tf.Tensor4D {
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const [xi, g, b] = args as tf.Tensor[];
    const save = args[3] as tf.GradSaveFunc;
    const x4 = xi as tf.Tensor4D;
    const stats = normStats(x4, groups, eps);
    save([x4, g, b, stats.mean, stats.r]);
    return {
      value: normActApply(x4, g, b, stats, act),
      gradFunc: (dz: tf.Tensor, saved: tf.Tensor[]) => {
        const [xs, gs, bs, mean, r] = saved;
        return normActGrad(
          xs as tf.Tensor4D,
          gs,
          bs,
          { mean: mean as tf.Tensor4D, r: r as tf.Tensor4D },
          dz as tf.Tensor4D,
          groups,
          act,
        );
      },
    };
  });
  return op(x, gamma, beta) as tf.Tensor4D;
}

/**
 * GroupNorm over NHWC, as PyTorch's: channels split into `groups`
 * consecutive groups, each normalised over (H, W, its channels) with the
 * biased variance, then scaled and shifted per channel.
 *
 * @param x `[N, H, W, C]`, C divisible by `groups`.
 * @param gamma Per-channel scale `[C]`.
 * @param beta Per-channel shift `[C]`.
 * @param groups Number of groups.
 * @param eps Added to the variance; PyTorch's 1e-5 by default.
 * @returns `[N, H, W, C]`.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { groupNorm } from "./_layers.ts";
 * await initBackend("cpu");
 * const x = tf.tensor4d([1, 3], [1, 1, 2, 1]);
 * const g = tf.ones([1]);
 * const b = tf.zeros([1]);
 * const y = groupNorm(x, g, b, 1);
 * console.log(y.dataSync()); // about [-1, 1]
 * tf.dispose([x, g, b, y]);
 * ```
 */
export function groupNorm(
  x: tf.Tensor4D,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  groups: number,
  eps = 1e-5,
): tf.Tensor4D {
  return normAct(x, gamma, beta, groups, eps, false);
}

/**
 * SiLU of GroupNorm, `silu(groupNorm(x, gamma, beta, groups, eps))`, as one
 * op with a closed-form gradient (what every norm in the UNet is followed by).
 *
 * @param x `[N, H, W, C]`, C divisible by `groups`.
 * @param gamma Per-channel scale `[C]`.
 * @param beta Per-channel shift `[C]`.
 * @param groups Number of groups.
 * @param eps Added to the variance; PyTorch's 1e-5 by default.
 * @returns `[N, H, W, C]`.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { groupNormSilu } from "./_layers.ts";
 * await initBackend("cpu");
 * const x = tf.tensor4d([1, 3], [1, 1, 2, 1]);
 * const g = tf.ones([1]);
 * const b = tf.zeros([1]);
 * const y = groupNormSilu(x, g, b, 1);
 * console.log(y.dataSync()); // about [-0.269, 0.731]: silu(-1), silu(1)
 * tf.dispose([x, g, b, y]);
 * ```
 */
export function groupNormSilu(
  x: tf.Tensor4D,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  groups: number,
  eps = 1e-5,
): tf.Tensor4D {
  return normAct(x, gamma, beta, groups, eps, true);
}
