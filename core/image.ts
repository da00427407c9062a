/**
 * Images out: sample grids and loss curves as PNG.
 *
 * @module
 */
import { encode } from "fast-png";
import type { tf } from "./backend.ts";
import { writeFileAtomic } from "./atomic.ts";

/** An 8-bit raster: `channels` interleaved values per pixel, rows top to bottom. */
export interface Raster {
  /** Width in pixels. */
  width: number;
  /** Height in pixels. */
  height: number;
  /** 1 (gray) or 3 (RGB). */
  channels: 1 | 3;
  /** width * height * channels bytes. */
  data: Uint8Array;
}

/** Options of {@linkcode imagesToGrid}. */
export interface GridOptions {
  /** Images per row; 8 by default, as torchvision's make_grid. */
  nrow?: number;
  /** Pixels between and around images; 2 by default. */
  padding?: number;
  /** Value of the padding, in [0, 255]; 0 by default. */
  padValue?: number;
}

/**
 * Tile NHWC images in [-1, 1] into one grid raster, as torchvision's `make_grid`.
 *
 * Values are mapped by round((x + 1) / 2 * 255) and clamped to [0, 255].
 *
 * @param images NHWC, 1 or 3 channels, values in [-1, 1].
 * @param options Grid layout.
 * @returns The grid raster.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { imagesToGrid } from "./image.ts";
 * await initBackend("cpu");
 * const x = tf.zeros([3, 4, 4, 1]) as tf.Tensor4D;
 * const grid = await imagesToGrid(x, { nrow: 2, padding: 1 });
 * console.log(grid.width, grid.height); // 11 11
 * x.dispose();
 * ```
 */
export async function imagesToGrid(
  images: tf.Tensor4D,
  options: GridOptions = {},
): Promise<Raster> {
  const { nrow = 8, padding = 2, padValue = 0 } = options;
  const [n, h, w, c] = images.shape;
  if (images.rank !== 4 || (c !== 1 && c !== 3)) {
    throw new TypeError(
      `Cannot tile images: expected NHWC with 1 or 3 channels (got shape [${images.shape}])`,
    );
  }
  if (!Number.isInteger(nrow) || nrow < 1) {
    throw new RangeError(
      `Cannot tile images: nrow must be a positive integer (got ${nrow})`,
    );
  }
  const values = await images.data();
  const cols = Math.min(nrow, n);
  const rows = Math.ceil(n / cols);
  const width = cols * (w + padding) + padding;
  const height = rows * (h + padding) + padding;
  const data = new Uint8Array(width * height * c).fill(padValue);
  for (let k = 0; k < n; k++) {
    const x0 = padding + (k % cols) * (w + padding);
    const y0 = padding + Math.floor(k / cols) * (h + padding);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        for (let ch = 0; ch < c; ch++) {
          const v = Math.round(
            (values[((k * h + y) * w + x) * c + ch] + 1) * 127.5,
          );
          data[((y0 + y) * width + x0 + x) * c + ch] = Math.min(
            255,
            Math.max(0, v),
          );
        }
      }
    }
  }
  return { width, height, channels: c as 1 | 3, data };
}

/**
 * Encode a raster as PNG bytes.
 *
 * @param raster The image.
 * @returns The PNG file's bytes.
 * @example
 * ```ts
 * import { encodePng } from "./image.ts";
 * const png = encodePng({ width: 2, height: 1, channels: 1, data: new Uint8Array([0, 255]) });
 * console.log(png[1] === 0x50); // "P" of the PNG signature
 * ```
 */
export function encodePng(raster: Raster): Uint8Array {
  return encode({
    width: raster.width,
    height: raster.height,
    data: raster.data,
    channels: raster.channels,
    depth: 8,
  });
}

/**
 * Write a raster to a PNG file, atomically (temporary name, then rename).
 *
 * @param path Where to write.
 * @param raster The image.
 * @returns Nothing; resolves once the file is in place.
 * @example
 * ```ts ignore
 * import { imagesToGrid, writePng } from "./image.ts";
 * await writePng("samples.png", await imagesToGrid(samples));
 * ```
 */
export async function writePng(path: string, raster: Raster): Promise<void> {
  await writeFileAtomic(path, encodePng(raster));
}

/** Options of {@linkcode plotCurve}. */
export interface PlotOptions {
  /** Width in pixels; 480 by default. */
  width?: number;
  /** Height in pixels; 240 by default. */
  height?: number;
  /** Plot log10 of the values (losses span decades); true by default. */
  logY?: boolean;
}

/**
 * Draw a line plot of a series (a loss curve) as a gray raster: white ground, black line, gray frame.
 *
 * @param values The series, in order; non-finite values are skipped.
 * @param options Size and scale.
 * @returns The plot raster.
 * @example
 * ```ts
 * import { plotCurve } from "./image.ts";
 * const r = plotCurve([1, 0.5, 0.25, 0.2], { width: 64, height: 32 });
 * console.log(r.data.length); // 2048
 * ```
 */
export function plotCurve(
  values: readonly number[],
  options: PlotOptions = {},
): Raster {
  const { width = 480, height = 240, logY = true } = options;
  const data = new Uint8Array(width * height).fill(255);
  const margin = 4;
  for (let x = 0; x < width; x++) {
    data[x] = data[(height - 1) * width + x] = 160;
  }
  for (let y = 0; y < height; y++) {
    data[y * width] = data[y * width + width - 1] = 160;
  }
  const points = values
    .map((v, i) => [i, logY ? Math.log10(v) : v] as const)
    .filter(([, v]) => Number.isFinite(v));
  if (points.length === 0) return { width, height, channels: 1, data };
  const lo = Math.min(...points.map(([, v]) => v));
  const hi = Math.max(...points.map(([, v]) => v));
  const last = Math.max(1, values.length - 1);
  const px = (i: number) => margin + (i / last) * (width - 1 - 2 * margin);
  const py = (v: number) =>
    height - 1 - margin -
    (hi === lo ? 0.5 : (v - lo) / (hi - lo)) * (height - 1 - 2 * margin);
  let prev: [number, number] | null = null;
  for (const [i, v] of points) {
    const cur: [number, number] = [px(i), py(v)];
    const [ax, ay] = prev ?? cur;
    const steps = Math.max(
      1,
      Math.ceil(Math.max(Math.abs(cur[0] - ax), Math.abs(cur[1] - ay))),
    );
    for (let s = 0; s <= steps; s++) {
      const x = Math.round(ax + (cur[0] - ax) * s / steps);
      const y = Math.round(ay + (cur[1] - ay) * s / steps);
      data[y * width + x] = 0;
    }
    prev = cur;
  }
  return { width, height, channels: 1, data };
}

/**
 * Encode float32 values as a NumPy `.npy` file (format 1.0, little-endian `<f4`, C order).
 *
 * `numpy.load` reads it back as an array of the given shape; for sample
 * images that is NHWC in [-1, 1].
 *
 * @param data The values, row-major.
 * @param shape The array's shape; its product must equal `data.length`.
 * @returns The file's bytes: the 10-byte preamble, the header dict padded to
 *   a multiple of 64 bytes, then the raw values.
 * @example
 * ```ts
 * import { encodeNpy } from "./image.ts";
 * const npy = encodeNpy(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3]);
 * console.log(npy.length); // 128 + 24: header block, then 6 float32 values
 * ```
 */
export function encodeNpy(
  data: Float32Array,
  shape: readonly number[],
): Uint8Array<ArrayBuffer> {
  const count = shape.reduce((a, b) => a * b, 1);
  if (
    !shape.every((d) => Number.isSafeInteger(d) && d >= 0) ||
    count !== data.length
  ) {
    throw new TypeError(
      `Cannot encode npy: shape does not match data (got [${shape}] for ${data.length} values, expected a shape of non-negative integers whose product is ${data.length})`,
    );
  }
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(", ");
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${dims}), }`;
  // Pad with spaces and end with "\n" so data starts at a multiple of 64.
  const unpadded = 10 + header.length + 1;
  header += " ".repeat((64 - unpadded % 64) % 64) + "\n";
  const out = new Uint8Array(10 + header.length + data.length * 4);
  out.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]); // \x93NUMPY, v1.0
  new DataView(out.buffer).setUint16(8, header.length, true);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  const view = new DataView(out.buffer, 10 + header.length);
  for (let i = 0; i < data.length; i++) view.setFloat32(i * 4, data[i], true);
  return out;
}

/**
 * Write a tensor to a `.npy` file (float32, C order) that `numpy.load` reads, atomically.
 *
 * @param path Where to write.
 * @param tensor The values; read from the device once.
 * @returns Nothing; resolves once the file is in place.
 * @example
 * ```ts ignore
 * import { writeNpy } from "./image.ts";
 * await writeNpy("samples.npy", samples); // numpy.load("samples.npy").shape == (n, 32, 32, 1)
 * ```
 */
export async function writeNpy(path: string, tensor: tf.Tensor): Promise<void> {
  const data = await tensor.data() as Float32Array;
  await writeFileAtomic(path, encodeNpy(Float32Array.from(data), tensor.shape));
}
