/**
 * Pillow's bilinear resize of 8-bit grey images, reproduced exactly (private).
 *
 * The reference feeds MNIST through torchvision `transforms.Resize(32)` on PIL
 * images, i.e. `Image.resize((32, 32), Image.BILINEAR)`. Pillow
 * (`libImaging/Resample.c`) resamples in two passes, horizontal then
 * vertical, each one a convolution with the triangle filter on half-pixel
 * centres: output pixel `x` centres on `(x + 0.5) * in / out` in the input,
 * the filter's support grows with the scale when shrinking (antialiasing)
 * and stays 1 when enlarging, and the taps that fall outside the image are
 * dropped and the rest renormalised. When enlarging this is exactly
 * bilinear interpolation with half-pixel centres and clamped edges (what
 * `tf.image.resizeBilinear(x, size, false, true)` computes). The weights
 * are rounded to 22-bit fixed point and each pass rounds its result to
 * uint8, which is why this is done here on the host in integers rather than
 * by tfjs in float32: the result matches Pillow's bytes.
 *
 * @module
 */

const PRECISION_BITS = 32 - 8 - 2;
const ONE = 1 << PRECISION_BITS;
const HALF = 1 << (PRECISION_BITS - 1);

/** Per output pixel: the first input tap, the tap count, and fixed-point weights. */
export interface ResampleCoefficients {
  /** Taps per output pixel (the row stride of `weights`). */
  ksize: number;
  /** First input index of each output pixel. */
  first: Int32Array;
  /** Number of taps of each output pixel. */
  count: Int32Array;
  /** `out * ksize` weights scaled by 2^22, rounded half away from zero. */
  weights: Int32Array;
}

/** Pillow's `precompute_coeffs` with the bilinear filter and `normalize_coeffs_8bpc`. */
export function bilinearCoefficients(
  inSize: number,
  outSize: number,
): ResampleCoefficients {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filterScale; // bilinear support 1.0, widened when shrinking
  const ksize = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0;
    k.fill(0);
    for (let x = 0; x < xmax; x++) {
      const w = Math.max(
        0,
        1 - Math.abs((x + xmin - center + 0.5) / filterScale),
      );
      k[x] = w;
      ww += w;
    }
    for (let x = 0; x < ksize; x++) {
      const v = ww !== 0 ? k[x] / ww : k[x];
      weights[xx * ksize + x] = v < 0
        ? Math.trunc(-0.5 + v * ONE)
        : Math.trunc(0.5 + v * ONE);
    }
    first[xx] = xmin;
    count[xx] = xmax;
  }
  return { ksize, first, count, weights };
}

function clip8(ss: number): number {
  if (ss <= 0) return 0;
  const v = Math.floor(ss / ONE);
  return v > 255 ? 255 : v;
}

/**
 * Resize one uint8 grey image `[h, w]` to `[outH, outW]` as Pillow's
 * BILINEAR does, writing into `out` at `outOffset`.
 */
export function resizeBilinearU8(
  src: Uint8Array,
  h: number,
  w: number,
  outH: number,
  outW: number,
  out: Uint8Array,
  outOffset = 0,
  coefficients?: {
    horizontal: ResampleCoefficients;
    vertical: ResampleCoefficients;
  },
): void {
  const horizontal = coefficients?.horizontal ?? bilinearCoefficients(w, outW);
  const vertical = coefficients?.vertical ?? bilinearCoefficients(h, outH);
  // Horizontal pass: [h, w] -> [h, outW], rounded to uint8.
  const temp = new Uint8Array(h * outW);
  for (let y = 0; y < h; y++) {
    for (let xx = 0; xx < outW; xx++) {
      let ss = HALF;
      const x0 = horizontal.first[xx];
      const base = xx * horizontal.ksize;
      for (let x = 0; x < horizontal.count[xx]; x++) {
        ss += src[y * w + x0 + x] * horizontal.weights[base + x];
      }
      temp[y * outW + xx] = clip8(ss);
    }
  }
  // Vertical pass: [h, outW] -> [outH, outW], rounded to uint8.
  for (let yy = 0; yy < outH; yy++) {
    const y0 = vertical.first[yy];
    const base = yy * vertical.ksize;
    for (let xx = 0; xx < outW; xx++) {
      let ss = HALF;
      for (let y = 0; y < vertical.count[yy]; y++) {
        ss += temp[(y0 + y) * outW + xx] * vertical.weights[base + y];
      }
      out[outOffset + yy * outW + xx] = clip8(ss);
    }
  }
}
