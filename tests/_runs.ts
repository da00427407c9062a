/**
 * Data of the tests' small training runs (kept apart from tests/_util.ts,
 * which does not load tfjs).
 *
 * @module
 */
import { tf } from "../core/backend.ts";

/**
 * Batch `index` of epoch `epoch` of the tests' small training runs: 2
 * images of 8 x 8, uniform in [-1, 1), seeded by 10 epoch + index.
 */
export function noiseBatch(epoch: number, index: number): tf.Tensor4D {
  return tf.randomUniform(
    [2, 8, 8, 1],
    -1,
    1,
    "float32",
    10 * epoch + index,
  ) as tf.Tensor4D;
}
