/**
 * Convolutions by their definitions in float64, the references the
 * convolution tests (tests/conv_test.ts, tests/conv_webgpu_test.ts) check
 * every backend's kernels against.
 */

/** An NHWC shape, or a kernel's four axes. */
export type Shape4 = [number, number, number, number];

/** Elements of a shape. */
export const size = (s: number[]): number => s.reduce((a, b) => a * b, 1);

/** The flat index of (a, b, c, d) in a row-major rank-4 shape. */
export const at4 = (
  s: number[],
  a: number,
  b: number,
  c: number,
  d: number,
): number => ((a * s[1] + b) * s[2] + c) * s[3] + d;

/** An op's output and the gradients of sum(y * r) with respect to x and w. */
export interface ConvRef {
  y: Float64Array;
  dx: Float64Array;
  dw: Float64Array;
}

/**
 * Padding of {@linkcode naiveConv}: `pad` zero pixels on every side
 * (PyTorch's `padding`), or `top` rows above and `left` columns left of
 * the input with the output's size given.
 */
export type RefPadding = number | {
  top: number;
  left: number;
  out: [number, number];
};

/**
 * A direct convolution (PyTorch semantics), its optional bias, and the
 * gradients of sum(y * r) (zero without `r`). w is [kh, kw, Cin, Cout].
 */
export function naiveConv(
  x: Float32Array,
  xs: Shape4,
  w: Float32Array,
  ws: Shape4,
  r: Float32Array | null,
  stride: number,
  pad: RefPadding,
  bias?: Float32Array,
): ConvRef {
  const [n, h, wd, cin] = xs;
  const [kh, kw, , cout] = ws;
  const [top, left] = typeof pad === "number"
    ? [pad, pad]
    : [pad.top, pad.left];
  const [oh, ow] = typeof pad === "number"
    ? [
      Math.floor((h + 2 * pad - kh) / stride) + 1,
      Math.floor((wd + 2 * pad - kw) / stride) + 1,
    ]
    : pad.out;
  const ys = [n, oh, ow, cout];
  const y = new Float64Array(size(ys));
  const dx = new Float64Array(x.length);
  const dw = new Float64Array(w.length);
  for (let b = 0; b < n; b++) {
    for (let oy = 0; oy < oh; oy++) {
      for (let ox = 0; ox < ow; ox++) {
        if (bias !== undefined) {
          for (let o = 0; o < cout; o++) y[at4(ys, b, oy, ox, o)] += bias[o];
        }
        for (let i = 0; i < kh; i++) {
          const iy = oy * stride + i - top;
          if (iy < 0 || iy >= h) continue;
          for (let j = 0; j < kw; j++) {
            const ix = ox * stride + j - left;
            if (ix < 0 || ix >= wd) continue;
            for (let c = 0; c < cin; c++) {
              const xi = at4(xs, b, iy, ix, c);
              for (let o = 0; o < cout; o++) {
                const wi = at4(ws, i, j, c, o);
                const yi = at4(ys, b, oy, ox, o);
                y[yi] += x[xi] * w[wi];
                if (r !== null) {
                  dx[xi] += r[yi] * w[wi];
                  dw[wi] += r[yi] * x[xi];
                }
              }
            }
          }
        }
      }
    }
  }
  return { y, dx, dw };
}

/**
 * A transposed convolution by its definition (PyTorch's ConvTranspose2d:
 * input pixel (iy, ix) scatters w into output (iy s + i - pad, ix s + j - pad)),
 * and the gradients of sum(y * r) (zero without `r`). w is [kh, kw, Cout, Cin].
 */
export function naiveConvT(
  x: Float32Array,
  xs: Shape4,
  w: Float32Array,
  ws: Shape4,
  r: Float32Array | null,
  outShape: Shape4,
  stride: number,
  pad: number,
): ConvRef {
  const [n, h, wd, cin] = xs;
  const [kh, kw, cout] = ws;
  const [, oh, ow] = outShape;
  const y = new Float64Array(size(outShape));
  const dx = new Float64Array(x.length);
  const dw = new Float64Array(w.length);
  for (let b = 0; b < n; b++) {
    for (let iy = 0; iy < h; iy++) {
      for (let ix = 0; ix < wd; ix++) {
        for (let i = 0; i < kh; i++) {
          const oy = iy * stride + i - pad;
          if (oy < 0 || oy >= oh) continue;
          for (let j = 0; j < kw; j++) {
            const ox = ix * stride + j - pad;
            if (ox < 0 || ox >= ow) continue;
            for (let c = 0; c < cin; c++) {
              const xi = at4(xs, b, iy, ix, c);
              for (let o = 0; o < cout; o++) {
                const wi = at4(ws, i, j, o, c);
                const yi = at4(outShape, b, oy, ox, o);
                y[yi] += x[xi] * w[wi];
                if (r !== null) {
                  dx[xi] += r[yi] * w[wi];
                  dw[wi] += r[yi] * x[xi];
                }
              }
            }
          }
        }
      }
    }
  }
  return { y, dx, dw };
}
