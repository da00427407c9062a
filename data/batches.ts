/**
 * Shuffled batches of model input: Float32 NHWC images in [-1, 1] at 32x32.
 *
 * Matches the reference's `transforms.Compose([Resize(32), ToTensor(),
 * Normalize((0.5,), (0.5,))])` on PIL images, with a `DataLoader(shuffle=True,
 * drop_last=True)`:
 *
 * 1. Resize, on the host in integers: "bilinear" (default) reproduces
 *    Pillow's `Image.resize(..., BILINEAR)` byte for byte (two passes,
 *    22-bit fixed-point weights, each pass rounded to uint8); when enlarging
 *    28 -> 32 that is bilinear interpolation with half-pixel centres and
 *    clamped edges, i.e. `tf.image.resizeBilinear(x, [32, 32], false, true)`
 *    up to the uint8 rounding. "pad" centres the image on a black canvas
 *    instead (28 -> 32: 2 pixels each side).
 * 2. Scale, through a 256-entry table: `((v / 255) - 0.5) / 0.5` in float32,
 *    as ToTensor then Normalize compute it.
 * 3. Shuffle: epoch `e` visits the images in a permutation drawn from
 *    (seed, e) alone, so batch `i` of epoch `e` can be rebuilt after a
 *    restart. The last partial batch is dropped.
 *
 * Each batch is one upload (`tf.tensor4d`); nothing is kept on the device
 * between batches.
 *
 * @module
 */
import { tf } from "../core/backend.ts";
import type { ImageDataset } from "./dataset.ts";
import { epochPermutation } from "./_random.ts";
import {
  bilinearCoefficients,
  type ResampleCoefficients,
  resizeBilinearU8,
} from "./_resize.ts";

/** How images are brought to the model's size. */
export type ResizeMode = "bilinear" | "pad";

/** Options for {@linkcode ImageBatcher}. */
export interface BatcherOptions {
  /** Images per batch; the last partial batch of an epoch is dropped. */
  batchSize: number;
  /** The shuffling seed; 0 by default. */
  seed?: number;
  /** Output height and width; 32 by default. */
  imageSize?: number;
  /** "bilinear" (default, as the reference) or "pad" (zero-padding, centred). */
  resize?: ResizeMode;
}

/** One batch: the caller owns the tensors and disposes them. */
export interface Batch {
  /** [batchSize, imageSize, imageSize, 1] float32 in [-1, 1]. */
  images: tf.Tensor4D;
  /** [batchSize] int32 class labels. */
  labels: tf.Tensor1D;
  /** The dataset indices of the images, in batch order. */
  indices: Uint32Array;
  /** The epoch this batch belongs to. */
  epoch: number;
  /** The batch's position in its epoch. */
  index: number;
  /** Dispose `images` and `labels`. */
  dispose(): void;
}

/** uint8 level -> float32 `(v / 255 - 0.5) / 0.5`, as ToTensor + Normalize((0.5,), (0.5,)). */
const LEVELS: Float32Array = (() => {
  const table = new Float32Array(256);
  for (let v = 0; v < 256; v++) {
    const unit = Math.fround(v / 255);
    table[v] = Math.fround(Math.fround(unit - 0.5) / 0.5);
  }
  return table;
})();

function checkInteger(
  what: string,
  value: number,
  min: number,
  max: number,
): void {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RangeError(
      `Cannot make batches: ${what} out of range (got ${value}, expected an integer in [${min}, ${max}])`,
    );
  }
}

/**
 * Seeded, resumable batches of a dataset, one tensor pair at a time.
 *
 * @example
 * ```ts
 * import { initBackend, tf } from "../core/backend.ts";
 * import { ImageBatcher } from "./batches.ts";
 * await initBackend("cpu");
 * const dataset = {
 *   name: "toy", source: "memory", count: 10, height: 28, width: 28,
 *   images: new Uint8Array(10 * 28 * 28).fill(255), labels: new Int32Array(10),
 * };
 * const batcher = new ImageBatcher(dataset, { batchSize: 4, seed: 1 });
 * console.log(batcher.batchesPerEpoch); // 2 (the last 2 images are dropped)
 * for (const batch of batcher.epoch(0)) {
 *   console.log(batch.images.shape); // [ 4, 32, 32, 1 ]
 *   batch.dispose();
 * }
 * ```
 */
export class ImageBatcher {
  /** The dataset batched. */
  readonly dataset: ImageDataset;
  /** Images per batch. */
  readonly batchSize: number;
  /** Output height and width. */
  readonly imageSize: number;
  /** How images are brought to `imageSize`. */
  readonly resize: ResizeMode;
  /** The shuffling seed. */
  readonly seed: number;
  /** Full batches per epoch: `floor(count / batchSize)`. */
  readonly batchesPerEpoch: number;

  #coefficients?: {
    horizontal: ResampleCoefficients;
    vertical: ResampleCoefficients;
  };
  #order: { epoch: number; permutation: Uint32Array } | null = null;

  /**
   * Prepare batching; computes nothing on the device.
   *
   * @param dataset The images and labels.
   * @param options Batch size, seed, output size and resize mode.
   * @throws {RangeError} On a batch size outside [1, count], an unknown
   * resize mode, or "pad" to a size smaller than the images.
   */
  constructor(dataset: ImageDataset, options: BatcherOptions) {
    this.dataset = dataset;
    this.batchSize = options.batchSize;
    this.imageSize = options.imageSize ?? 32;
    this.resize = options.resize ?? "bilinear";
    this.seed = options.seed ?? 0;
    checkInteger("batchSize", this.batchSize, 1, dataset.count);
    checkInteger("imageSize", this.imageSize, 1, 4096);
    checkInteger("seed", this.seed, 0, 2 ** 32 - 1);
    if (this.resize !== "bilinear" && this.resize !== "pad") {
      throw new RangeError(
        `Cannot make batches: unknown resize mode (got "${this.resize}", expected bilinear or pad)`,
      );
    }
    if (
      this.resize === "pad" &&
      (dataset.height > this.imageSize || dataset.width > this.imageSize)
    ) {
      throw new RangeError(
        `Cannot make batches: padding cannot shrink images (got ${dataset.height}x${dataset.width}, expected at most ${this.imageSize}x${this.imageSize})`,
      );
    }
    if (this.resize === "bilinear") {
      this.#coefficients = {
        horizontal: bilinearCoefficients(dataset.width, this.imageSize),
        vertical: bilinearCoefficients(dataset.height, this.imageSize),
      };
    }
    this.batchesPerEpoch = Math.floor(dataset.count / this.batchSize);
  }

  /**
   * The order epoch `epoch` visits the dataset in: a permutation of
   * 0..count-1 that depends only on (seed, epoch).
   *
   * @param epoch The epoch, from 0.
   * @returns The dataset indices in visiting order (a fresh copy).
   */
  permutation(epoch: number): Uint32Array {
    return this.#permutation(epoch).slice();
  }

  #permutation(epoch: number): Uint32Array {
    checkInteger("epoch", epoch, 0, 2 ** 32 - 1);
    if (this.#order === null || this.#order.epoch !== epoch) {
      this.#order = {
        epoch,
        permutation: epochPermutation(this.dataset.count, this.seed, epoch),
      };
    }
    return this.#order.permutation;
  }

  /**
   * Model input for the given dataset indices, on the host.
   *
   * @param indices Dataset indices.
   * @returns `indices.length * imageSize * imageSize` float32 values in
   * [-1, 1], NHWC with one channel.
   */
  pixels(indices: ArrayLike<number>): Float32Array {
    const { height, width, images, count } = this.dataset;
    const size = this.imageSize;
    const inPixels = height * width;
    const outPixels = size * size;
    const out = new Float32Array(indices.length * outPixels);
    const level = new Uint8Array(outPixels);
    const top = (size - height) >> 1;
    const left = (size - width) >> 1;
    for (let n = 0; n < indices.length; n++) {
      const i = indices[n];
      checkInteger("dataset index", i, 0, count - 1);
      const src = images.subarray(i * inPixels, (i + 1) * inPixels);
      if (this.resize === "bilinear") {
        resizeBilinearU8(
          src,
          height,
          width,
          size,
          size,
          level,
          0,
          this.#coefficients,
        );
      } else {
        level.fill(0);
        for (let y = 0; y < height; y++) {
          level.set(
            src.subarray(y * width, (y + 1) * width),
            (y + top) * size + left,
          );
        }
      }
      const base = n * outPixels;
      for (let p = 0; p < outPixels; p++) out[base + p] = LEVELS[level[p]];
    }
    return out;
  }

  /**
   * Batch `index` of epoch `epoch`, rebuilt from (seed, epoch, index) alone.
   *
   * @param epoch The epoch, from 0.
   * @param index The batch in the epoch, in [0, batchesPerEpoch).
   * @returns Images [batchSize, imageSize, imageSize, 1] in [-1, 1] and
   * labels; the caller disposes them (`batch.dispose()`).
   * @throws {RangeError} On an index outside the epoch.
   */
  batch(epoch: number, index: number): Batch {
    checkInteger("batch index", index, 0, this.batchesPerEpoch - 1);
    const order = this.#permutation(epoch);
    const indices = order.slice(
      index * this.batchSize,
      (index + 1) * this.batchSize,
    );
    const pixels = this.pixels(indices);
    const labels = Int32Array.from(indices, (i) => this.dataset.labels[i]);
    const size = this.imageSize;
    const imagesTensor = tf.tensor4d(pixels, [indices.length, size, size, 1]);
    const labelsTensor = tf.tensor1d(labels, "int32");
    return {
      images: imagesTensor,
      labels: labelsTensor,
      indices,
      epoch,
      index,
      dispose() {
        imagesTensor.dispose();
        labelsTensor.dispose();
      },
    };
  }

  /**
   * The batches of one epoch in order, made one at a time as the loop asks
   * for them; dispose each before asking for the next.
   *
   * @param epoch The epoch, from 0.
   * @param start The first batch (to resume mid-epoch); 0 by default.
   * @returns A generator of batches.
   */
  *epoch(epoch: number, start = 0): Generator<Batch, void, undefined> {
    for (let i = start; i < this.batchesPerEpoch; i++) {
      yield this.batch(epoch, i);
    }
  }
}
