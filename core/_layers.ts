/**
 * The UNet's small layers, as the PyTorch reference defines them (NHWC here).
 *
 * @module
 */
import { tf } from "./backend.ts";

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
  return tf.tidy(() => tf.add(tf.matMul(x, w as tf.Tensor2D), b));
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
  return tf.tidy(() => {
    const [n, h, w, c] = x.shape;
    const g = tf.reshape(x, [n, h, w, groups, c / groups]);
    const mean = tf.mean(g, [1, 2, 4], true);
    const centred = tf.sub(g, mean);
    const variance = tf.mean(tf.square(centred), [1, 2, 4], true);
    const normed = tf.mul(centred, tf.rsqrt(tf.add(variance, eps)));
    return tf.add(tf.mul(tf.reshape(normed, [n, h, w, c]), gamma), beta);
  });
}
