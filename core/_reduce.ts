/**
 * Reductions over the outer axes of NHWC tensors. tfjs's wasm `Sum` over
 * non-innermost axes transposes first and costs several times more; a
 * global average pool (XNNPACK's, one SIMD pass over the channels) is 4-5x
 * cheaper on wasm. On WebGPU both are column sums of ours over the pixels
 * (core/_webgpu_reduce.ts); the product with a row of ones they replace
 * read about 175 GB/s on an H100.
 *
 * @module
 */
import { tf } from "./backend.ts";
import { webgpuColumnSums } from "./_webgpu_reduce.ts";

/** On WebGPU: the column sums of x's pixels `[N H W, C]`, in `runs` equal runs. */
function gpuPixelSums(x: tf.Tensor4D, runs: number): tf.Tensor2D {
  const [n, h, w, c] = x.shape;
  return webgpuColumnSums(tf.reshape(x, [n * h * w, c]), runs);
}

/**
 * Per-(image, channel) sums over the spatial axes.
 *
 * @param x `[N, H, W, C]`.
 * @returns `[N, 1, 1, C]`.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { spatialSum } from "./_reduce.ts";
 * await initBackend("cpu");
 * const x = tf.tensor4d([1, 2, 3, 4], [1, 2, 1, 2]);
 * console.log(spatialSum(x).dataSync()); // [4, 6]
 * x.dispose();
 * ```
 */
export function spatialSum(x: tf.Tensor4D): tf.Tensor4D {
  return tf.tidy(() => {
    const [n, h, w, c] = x.shape;
    if (tf.getBackend() !== "webgpu") {
      return tf.mul(tf.avgPool(x, [h, w], 1, "valid"), h * w);
    }
    return tf.reshape(gpuPixelSums(x, n), [n, 1, 1, c]);
  });
}

/**
 * Per-channel sums over the batch and spatial axes (a bias's gradient).
 *
 * @param x `[N, H, W, C]`.
 * @returns `[C]`.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { channelSum } from "./_reduce.ts";
 * await initBackend("cpu");
 * const x = tf.tensor4d([1, 2, 3, 4], [2, 1, 1, 2]);
 * console.log(channelSum(x).dataSync()); // [4, 6]
 * x.dispose();
 * ```
 */
export function channelSum(x: tf.Tensor4D): tf.Tensor1D {
  return tf.tidy(() => {
    if (tf.getBackend() === "webgpu") {
      return tf.reshape(gpuPixelSums(x, 1), [-1]);
    }
    return tf.reshape(tf.sum(spatialSum(x), [0, 1, 2]), [-1]);
  });
}
