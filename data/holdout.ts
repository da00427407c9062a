/**
 * A fixed, class-balanced train / held-out split of a dataset.
 *
 * Image i goes to the held-out part when `i % every === 0`. mnist-lite is
 * ordered by class, so every 5th image gives 2,000 held-out digits in the
 * classes' proportions (201, 225, 198, 207, 196, 172, 203, 214, 189, 195 of
 * 0..9) and 8,000 training digits. The digit classifier of
 * `core/classifier.ts` was trained on the training part of this split and
 * its accuracy is measured on the held-out part.
 *
 * {@linkcode spreadImages} turns a part into model-format images for
 * `evaluateSamples`, taking images spread evenly over it so that a set
 * sorted by class gives every class its share.
 *
 * @module
 */
import { tf } from "../core/backend.ts";
import { ImageBatcher, type ResizeMode } from "./batches.ts";
import type { ImageDataset } from "./dataset.ts";

/** The two parts of {@linkcode holdoutSplit}. */
export interface HoldoutSplit {
  /** The images with `i % every !== 0`. */
  train: ImageDataset;
  /** The images with `i % every === 0`. */
  heldOut: ImageDataset;
}

/**
 * A new dataset of the given images of `dataset`, in the order given.
 *
 * @param dataset The source.
 * @param indices Image indices in `[0, dataset.count)`.
 * @param name The new dataset's name; the source's by default.
 * @returns The subset (copied pixels and labels).
 * @throws {RangeError} On an index out of range.
 * @example
 * ```ts
 * import { subsetDataset } from "./holdout.ts";
 * const d = { name: "toy", source: "memory", count: 3, height: 1, width: 2,
 *   images: new Uint8Array([1, 2, 3, 4, 5, 6]), labels: new Int32Array([7, 8, 9]) };
 * const s = subsetDataset(d, [2, 0]);
 * console.log(s.images, s.labels); // Uint8Array [5, 6, 1, 2] Int32Array [9, 7]
 * ```
 */
export function subsetDataset(
  dataset: ImageDataset,
  indices: ArrayLike<number>,
  name: string = dataset.name,
): ImageDataset {
  const pixels = dataset.height * dataset.width;
  const images = new Uint8Array(indices.length * pixels);
  const labels = new Int32Array(indices.length);
  for (let n = 0; n < indices.length; n++) {
    const i = indices[n];
    if (!Number.isInteger(i) || i < 0 || i >= dataset.count) {
      throw new RangeError(
        `Cannot take subset of ${dataset.name}: index out of range (got ${i}, expected an integer in [0, ${
          dataset.count - 1
        }])`,
      );
    }
    images.set(
      dataset.images.subarray(i * pixels, (i + 1) * pixels),
      n * pixels,
    );
    labels[n] = dataset.labels[i];
  }
  return { ...dataset, name, count: indices.length, images, labels };
}

/**
 * Split a dataset: every `every`-th image (i % every === 0) is held out.
 *
 * @param dataset The dataset to split.
 * @param every The period of held-out images; 5 by default (20% held out).
 * @returns The training and held-out parts, named `<name>/train` and `<name>/held-out`.
 * @throws {RangeError} When `every` is not an integer >= 2.
 * @example
 * ```ts
 * import { holdoutSplit } from "./holdout.ts";
 * const d = { name: "toy", source: "memory", count: 10, height: 1, width: 1,
 *   images: new Uint8Array(10), labels: Int32Array.from({ length: 10 }, (_, i) => i) };
 * const { train, heldOut } = holdoutSplit(d);
 * console.log(train.count, heldOut.labels); // 8 Int32Array [0, 5]
 * ```
 */
export function holdoutSplit(dataset: ImageDataset, every = 5): HoldoutSplit {
  if (!Number.isInteger(every) || every < 2) {
    throw new RangeError(
      `Cannot split ${dataset.name}: every must be an integer >= 2 (got ${every}, expected e.g. 5)`,
    );
  }
  const train: number[] = [];
  const heldOut: number[] = [];
  for (let i = 0; i < dataset.count; i++) {
    (i % every === 0 ? heldOut : train).push(i);
  }
  return {
    train: subsetDataset(dataset, train, `${dataset.name}/train`),
    heldOut: subsetDataset(dataset, heldOut, `${dataset.name}/held-out`),
  };
}

/** Options of {@linkcode spreadImages}. */
export interface SpreadImagesOptions {
  /** Output height and width; 32 by default. */
  imageSize?: number;
  /** "bilinear" (default, as `ImageBatcher`) or "pad". */
  resize?: ResizeMode;
}

/**
 * `count` images spread evenly over a dataset (indices floor(i size / count)),
 * as model input: NHWC float32 in [-1, 1], made exactly as `ImageBatcher` makes batches.
 *
 * @param dataset The images.
 * @param count How many to take; all of them by default.
 * @param options Output size and resize mode.
 * @returns `[count, imageSize, imageSize, 1]`; the caller disposes it.
 * @throws {RangeError} When `count` is not an integer in [1, dataset.count].
 * @example
 * ```ts
 * import { initBackend, tf } from "../core/backend.ts";
 * import { spreadImages } from "./holdout.ts";
 * await initBackend("cpu");
 * const d = { name: "toy", source: "memory", count: 10, height: 28, width: 28,
 *   images: new Uint8Array(10 * 28 * 28), labels: new Int32Array(10) };
 * const x = spreadImages(d, 4);
 * console.log(x.shape); // [4, 32, 32, 1]
 * x.dispose();
 * ```
 */
export function spreadImages(
  dataset: ImageDataset,
  count: number = dataset.count,
  options: SpreadImagesOptions = {},
): tf.Tensor4D {
  if (!Number.isInteger(count) || count < 1 || count > dataset.count) {
    throw new RangeError(
      `Cannot take images of ${dataset.name}: count out of range (got ${count}, expected an integer in [1, ${dataset.count}])`,
    );
  }
  const size = options.imageSize ?? 32;
  const batcher = new ImageBatcher(dataset, {
    batchSize: 1,
    imageSize: size,
    resize: options.resize,
  });
  const indices = Uint32Array.from(
    { length: count },
    (_, i) => Math.floor(i * dataset.count / count),
  );
  return tf.tensor4d(batcher.pixels(indices), [count, size, size, 1]);
}
