/**
 * Convolutions with gradients that work on every backend.
 *
 * The wasm backend has no `Conv2DBackpropFilter` kernel, so `tf.grad`
 * through `tf.conv2d` fails there, and its `Conv2DBackpropInput` (the kernel
 * behind `tf.conv2dTranspose`) is a plain loop some 10x slower than its
 * XNNPACK `Conv2D`. The ops here take the gradients into their own hands
 * with `tf.customGrad`:
 *
 * | quantity              | computed as                                                   |
 * |-----------------------|---------------------------------------------------------------|
 * | conv forward          | `tf.conv2d` with explicit symmetric padding; on wasm, 3x3 stride-1 padding-1, ddpm's Winograd F(2x2, 3x3) (core/_wasm_kernels.ts); on webgpu an implicit-GEMM program (core/_webgpu_conv.ts), channels padded with zeros to multiples of 4 |
 * | adjoint (conv's dx, transposed conv's forward) | `tf.conv2dTranspose`; on wasm one stride-1 `tf.conv2d` per output phase (s^2 of them) with a sub-kernel, interleaved, or Winograd with the kernel turned (3x3, stride 1) or with the four phases side by side (4x4, stride 2); on webgpu the implicit-GEMM program reading the kernel flipped (at stride s, per output phase) |
 * | transposed conv's dx  | `tf.conv2d`                                                   |
 * | dW                    | one `tf.conv2d` over the batch axis: input `[Cin, H, W, N]`, the output gradient as a `[OH, OW, N, Cout]` filter dilated by the stride; on wasm ddpm's kernels (Winograd F(3x3, 2x2) for 3x3 stride 1, else a GEMM per tap, phase by phase when strided); on webgpu a split-K GEMM program (core/_webgpu_conv.ts), channels padded to multiples of 4 |
 *
 * Padding is PyTorch's: `pad` zero pixels on each side of both spatial axes.
 *
 * @module
 */
import "./_gradients.ts";
import { tf } from "./backend.ts";
import { channelSum } from "./_reduce.ts";
import {
  useWebGpuConvPadded,
  webgpuConv2d,
  type WebGpuConvOptions,
  webgpuFilterGrad,
} from "./_webgpu_conv.ts";
import {
  wasmConv3x3,
  wasmFilterGrad,
  wasmKernelsReady,
} from "./_wasm_kernels.ts";

type Shape4 = [number, number, number, number];
type ExplicitPadding = [
  [number, number],
  [number, number],
  [number, number],
  [number, number],
];

function spatialPadding(
  top: number,
  bottom: number,
  left: number,
  right: number,
): ExplicitPadding {
  return [[0, 0], [top, bottom], [left, right], [0, 0]];
}

function checkGeometry(
  what: string,
  stride: number,
  pad: number,
  kh: number,
  kw: number,
): void {
  if (!Number.isInteger(stride) || stride < 1) {
    throw new RangeError(
      `Cannot ${what}: stride must be a positive integer (got ${stride}, expected >= 1)`,
    );
  }
  if (!Number.isInteger(pad) || pad < 0 || pad > Math.min(kh, kw) - 1) {
    throw new RangeError(
      `Cannot ${what}: padding must be an integer in [0, kernel size - 1] (got ${pad}, expected 0..${
        Math.min(kh, kw) - 1
      })`,
    );
  }
}

/** The forward value and gradient of an op, as `tf.customGrad` wants them. */
interface Custom {
  value: tf.Tensor4D;
  gradFunc: (dy: tf.Tensor4D, saved: tf.Tensor[]) => tf.Tensor[];
}

/** `tf.customGrad` for an op of tensors (a 4-D input and its weights), typed. */
function customOp(
  f: (inputs: tf.Tensor[], save: tf.GradSaveFunc) => Custom,
): (...inputs: tf.Tensor[]) => tf.Tensor4D {
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) =>
    f(
      args.slice(0, -1) as tf.Tensor[],
      args[args.length - 1] as tf.GradSaveFunc,
    )
  );
  return (...inputs) => op(...inputs) as tf.Tensor4D;
}

/** A channel count rounded up to a multiple of 4 (the WebGPU programs' vec4s). */
function up4(c: number): number {
  return Math.ceil(c / 4) * 4;
}

/** `t` with zeros appended along `axis` up to `size` entries (itself when it has them). */
function padAxis<T extends tf.Tensor>(t: T, axis: number, size: number): T {
  const have = t.shape[axis];
  if (have === size) return t;
  const pads = t.shape.map((_, i): [number, number] => [
    0,
    i === axis ? size - have : 0,
  ]);
  return tf.pad(t, pads);
}

/** The first `c` channels of `t` (itself when it has no more). */
function firstChannels(t: tf.Tensor4D, c: number): tf.Tensor4D {
  return t.shape[3] === c ? t : tf.slice(t, [0, 0, 0, 0], [-1, -1, -1, c]);
}

/**
 * {@linkcode webgpuConv2d} with every channel count padded with zeros to a
 * multiple of 4 (the input's, both of the kernel's channel axes, the
 * bias's), and its output cut back to the `cout` channels asked for.
 */
function paddedWebGpuConv(
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  cout: number,
  options: WebGpuConvOptions,
): tf.Tensor4D {
  return tf.tidy(() => {
    const { bias } = options;
    const y = webgpuConv2d(
      padAxis(x, 3, up4(x.shape[3])),
      padAxis(padAxis(w, 2, up4(w.shape[2])), 3, up4(w.shape[3])),
      {
        ...options,
        bias: bias === undefined ? undefined : padAxis(bias, 0, up4(cout)),
      },
    );
    return firstChannels(y, cout);
  });
}

/** Output size of a convolution along one axis, as PyTorch computes it. */
function convOutSize(n: number, k: number, stride: number, pad: number) {
  return Math.floor((n + 2 * pad - k) / stride) + 1;
}

/**
 * The taps of output phase `a` (outputs o = s q + a) along one axis of a
 * transposed convolution with kernel size k: kernel indices r, r + s, ...
 * (`count` of them), input index q + m - j for tap r + s j. With the
 * taps read flipped, the phase is a stride-1 convolution of the input
 * padded by `before = count - 1 - m` in front.
 */
function phaseTaps(k: number, a: number, stride: number, pad: number) {
  const r = (a + pad) % stride;
  const m = Math.floor((a + pad) / stride);
  const count = r < k ? Math.ceil((k - r) / stride) : 0;
  return { r, m, count, before: count - 1 - m };
}

/** Pad (positive amounts) or crop (negative amounts) the spatial borders. */
function padOrCrop(
  x: tf.Tensor4D,
  top: number,
  bottom: number,
  left: number,
  right: number,
): tf.Tensor4D {
  const [n, h, w, c] = x.shape;
  let y = x;
  const t0 = Math.max(0, -top);
  const b0 = Math.max(0, -bottom);
  const l0 = Math.max(0, -left);
  const r0 = Math.max(0, -right);
  if (t0 + b0 + l0 + r0 > 0) {
    y = tf.slice(y, [0, t0, l0, 0], [n, h - t0 - b0, w - l0 - r0, c]);
  }
  const [t1, b1, l1, r1] = [top, bottom, left, right].map((p) =>
    Math.max(0, p)
  );
  if (t1 + b1 + l1 + r1 > 0) y = tf.pad(y, spatialPadding(t1, b1, l1, r1));
  return y;
}

/**
 * On wasm, the stride-2 adjoint of a 4 x 4 kernel (the UNet's upsampling)
 * as one 3 x 3 convolution with depth to space: each of the four output
 * phases is a 2 x 2 convolution of `dy` (see {@linkcode adjoint}), which sits
 * inside a 3 x 3 window with padding 1, so the four sub-kernels, zero
 * elsewhere, make one kernel of 4 Cout output channels for ddpm's Winograd
 * convolution, which writes each phase's pixels where they belong. It takes
 * as many multiplies as the four direct convolutions (16 of Winograd's 36
 * taps), in one call of a faster kernel. Null where that does not apply
 * (another padding or size, channels Winograd does not take).
 */
function subPixelAdjoint(
  dy: tf.Tensor4D,
  w: tf.Tensor4D,
  outShape: Shape4,
  pad: number,
): tf.Tensor4D | null {
  const [kh, kw, cout, cin] = w.shape;
  const [, h, wd] = dy.shape;
  if (
    outShape[1] !== 2 * h || outShape[2] !== 2 * wd || cout % 4 !== 0 ||
    cin % 4 !== 0 || !wasmKernelsReady()
  ) return null;
  // Per axis and phase: the taps r + 2 i, read flipped, sit at rows e ..
  // e + count - 1 of the 3 x 3 window (e = 1 - the phase's padding before).
  const axis = (k: number) =>
    [0, 1].map((a) => {
      const t = phaseTaps(k, a, 2, pad);
      return { ...t, e: 1 - t.before };
    });
  const [ay, ax] = [axis(kh), axis(kw)];
  if (
    ![...ay, ...ax].every((t) => t.count > 0 && t.e >= 0 && t.e + t.count <= 3)
  ) return null;
  return tf.tidy(() => {
    // The kernel in wasmConv3x3's flipped layout, [3, 3, 4 Cout, Cin] read
    // turned by 180 degrees: cell (2 - u, 2 - v) holds, for phase (a, b),
    // w's [Cout, Cin] plane of the tap that window cell (u, v) takes.
    const zero = tf.zeros([1, 1, cout, cin]);
    const rows: tf.Tensor[] = [];
    for (let u = 2; u >= 0; u--) {
      const cells: tf.Tensor[] = [];
      for (let v = 2; v >= 0; v--) {
        const phases: tf.Tensor[] = [];
        for (let a = 0; a < 2; a++) {
          for (let b = 0; b < 2; b++) {
            const [ty, tx] = [ay[a], ax[b]];
            const [i, j] = [u - ty.e, v - tx.e];
            phases.push(
              i >= 0 && i < ty.count && j >= 0 && j < tx.count
                ? tf.slice(w, [
                  ty.r + 2 * (ty.count - 1 - i),
                  tx.r + 2 * (tx.count - 1 - j),
                  0,
                  0,
                ], [1, 1, cout, cin])
                : zero,
            );
          }
        }
        cells.push(tf.concat(phases, 2));
      }
      rows.push(tf.concat(cells, 1));
    }
    const k = tf.concat(rows, 0) as tf.Tensor4D;
    return wasmConv3x3(dy, k, { flip: true, depthToSpace: true })!;
  });
}

/**
 * The adjoint of `conv2d(., w, stride, pad)` applied to `dy`: what
 * `tf.conv2dTranspose(dy, w, outShape, stride, pad)` computes.
 *
 * On wasm, whose own Conv2DBackpropInput is a plain loop (3-12x slower than
 * this), it is split by output phase: the outputs o = s q + a (per axis)
 * see only the kernel taps r_a, r_a + s, ..., so each of the s^2 phases is
 * a stride-1 `tf.conv2d` of `dy` with a sub-kernel (flipped, in and out
 * swapped), and the phases are interleaved into the output.
 */
function adjoint(
  dy: tf.Tensor4D,
  w: tf.Tensor4D,
  outShape: Shape4,
  stride: number,
  pad: number,
): tf.Tensor4D {
  const [kh, kw, cout, cin] = w.shape;
  if (useWebGpuConvPadded()) {
    // At stride 1 a convolution of dy with the kernel flipped and its
    // channel axes swapped (read so by the program), padded by
    // kh - 1 - pad; at stride s the same per output phase, in one dispatch.
    // Channels padded with zeros to multiples of 4.
    return paddedWebGpuConv(
      dy,
      w,
      cout,
      stride === 1
        ? {
          stride: 1,
          padY: kh - 1 - pad,
          padX: kw - 1 - pad,
          oh: outShape[1],
          ow: outShape[2],
          flip: true,
        }
        : {
          stride,
          padY: pad,
          padX: pad,
          oh: outShape[1],
          ow: outShape[2],
          transposed: true,
        },
    );
  }
  if (tf.getBackend() !== "wasm") {
    return tf.conv2dTranspose(dy, w, outShape, stride, pad);
  }
  if (
    stride === 1 && pad === 1 && outShape[1] === dy.shape[1] &&
    outShape[2] === dy.shape[2]
  ) {
    const dx = wasmConv3x3(dy, w, { flip: true });
    if (dx !== null) return dx;
  }
  if (stride === 2 && kh === 4 && kw === 4) {
    const y = subPixelAdjoint(dy, w, outShape, pad);
    if (y !== null) return y;
  }
  return tf.tidy(() => {
    const [n, h, wd] = dy.shape;
    const [, oh, ow] = outShape;
    const qh = Math.ceil(oh / stride);
    const qw = Math.ceil(ow / stride);
    // [kh, kw, cin, cout]: conv2d's layout for the sub-kernels.
    const swapped = tf.transpose(w, [0, 1, 3, 2]);
    const rows: tf.Tensor4D[] = [];
    for (let a = 0; a < stride; a++) {
      const cols: tf.Tensor4D[] = [];
      for (let b = 0; b < stride; b++) {
        const ty = phaseTaps(kh, a, stride, pad);
        const tx = phaseTaps(kw, b, stride, pad);
        if (ty.count === 0 || tx.count === 0) {
          cols.push(tf.zeros([n, qh, qw, cout]));
          continue;
        }
        // The sub-kernel: taps r + s j for j = count - 1, ..., 0 (flipped),
        // gathered by contiguous one-tap slices (wasm's Reverse and
        // StridedSlice are slow loops).
        const tapRows: tf.Tensor4D[] = [];
        for (let i = ty.count - 1; i >= 0; i--) {
          const tapCols: tf.Tensor4D[] = [];
          for (let j = tx.count - 1; j >= 0; j--) {
            tapCols.push(tf.slice(swapped, [
              ty.r + stride * i,
              tx.r + stride * j,
              0,
              0,
            ], [1, 1, cin, cout]));
          }
          tapRows.push(tf.concat(tapCols, 1));
        }
        const sub = tf.concat(tapRows, 0);
        const [top, left] = [ty.before, tx.before];
        const bottom = qh - h - top + ty.count - 1;
        const right = qw - wd - left + tx.count - 1;
        // Padding inside the convolution kernel where it can be (no copy).
        cols.push(
          Math.min(top, bottom, left, right) >= 0
            ? tf.conv2d(dy, sub, 1, spatialPadding(top, bottom, left, right))
            : tf.conv2d(
              padOrCrop(dy, top, bottom, left, right),
              sub,
              1,
              "valid",
            ),
        );
      }
      rows.push(stride === 1 ? cols[0] : tf.stack(cols, 3) as tf.Tensor4D);
    }
    if (stride === 1) return rows[0];
    // rows[a] is [n, qh, qw, s, cout]; stacked: [n, qh, s, qw, s, cout].
    const full = tf.reshape(tf.stack(rows, 2), [
      n,
      qh * stride,
      qw * stride,
      cout,
    ]) as tf.Tensor4D;
    return qh * stride === oh && qw * stride === ow
      ? full
      : tf.slice(full, [0, 0, 0, 0], [n, oh, ow, cout]) as tf.Tensor4D;
  });
}

/**
 * {@linkcode filterGrad} at stride s > 1 on wasm, by ddpm's stride-1
 * kernel: the kernel rows i = s a + u (and columns j = s b + v) of one
 * phase (u, v) meet only the input pixels s Y + u (s X + v), so each
 * phase's taps are the weight gradient of a valid stride-1 convolution of
 * that subsampled input, and the phases together are the whole kernel.
 * Null where the kernels do not apply.
 */
function phasedFilterGrad(
  input: tf.Tensor4D,
  dy: tf.Tensor4D,
  kh: number,
  kw: number,
  s: number,
  pad: number,
): tf.Tensor4D | null {
  const [n, h, w, c] = input.shape;
  const [, oh, ow, co] = dy.shape;
  if (tf.getBackend() !== "wasm" || co % 8 !== 0 || !wasmKernelsReady()) {
    return null;
  }
  return tf.tidy(() => {
    // The rows and columns the kernel reaches, rounded up to whole phases.
    const hq = Math.ceil((kh + (oh - 1) * s) / s);
    const wq = Math.ceil((kw + (ow - 1) * s) / s);
    const xs = padOrCrop(input, pad, hq * s - h - pad, pad, wq * s - w - pad);
    const phases = tf.reshape(xs, [n * hq, s, wq, s * c]);
    const taps: tf.Tensor[] = new Array(kh * kw);
    for (let u = 0; u < s; u++) {
      for (let v = 0; v < s; v++) {
        const ka = Math.ceil((kh - u) / s);
        const kb = Math.ceil((kw - v) / s);
        if (ka <= 0 || kb <= 0) continue;
        const sub = tf.slice(
          tf.reshape(
            tf.slice(phases, [0, u, 0, v * c], [n * hq, 1, wq, c]),
            [n, hq, wq, c],
          ),
          [0, 0, 0, 0],
          [n, oh + ka - 1, ow + kb - 1, c],
        ) as tf.Tensor4D;
        const g = wasmFilterGrad(sub, dy, ka, kb, 0)!;
        const parts = tf.unstack(tf.reshape(g, [ka * kb, c, co]));
        for (let a = 0; a < ka; a++) {
          for (let b = 0; b < kb; b++) {
            taps[(u + s * a) * kw + v + s * b] = parts[a * kb + b];
          }
        }
      }
    }
    return tf.reshape(tf.stack(taps), [kh, kw, c, co]) as tf.Tensor4D;
  });
}

/**
 * The gradient of `conv2d(input, w, stride, pad)` with respect to `w`,
 * given the gradient `dy` of its output: shape `[kh, kw, Cin, Cout]`.
 *
 * dW[i, j, c, o] = sum over n, y, x of input_pad[n, y s + i, x s + j, c] dy[n, y, x, o]:
 * a convolution over the batch axis, with the input as an `[Cin, H, W, N]`
 * image and `dy` as an `[OH, OW, N, Cout]` filter dilated by the stride.
 * On WebGPU, where tfjs runs that convolution with few workgroups each
 * looping over all of N OH OW, a split-K GEMM program of ours instead
 * (core/_webgpu_conv.ts); on wasm, a kernel of ours, 2-3x faster than
 * XNNPACK's convolution (core/_wasm_kernels.ts), strided convolutions
 * phase by phase ({@linkcode phasedFilterGrad}).
 */
function filterGrad(
  input: tf.Tensor4D,
  dy: tf.Tensor4D,
  kh: number,
  kw: number,
  stride: number,
  pad: number,
): tf.Tensor4D {
  if (tf.getBackend() === "webgpu") {
    // Channels padded with zeros to multiples of 4, for the vec4 program.
    const c = input.shape[3];
    const co = dy.shape[3];
    return tf.tidy(() => {
      const dw = webgpuFilterGrad(
        padAxis(input, 3, up4(c)),
        padAxis(dy, 3, up4(co)),
        { kh, kw, stride, pad },
      );
      return c === up4(c) && co === up4(co)
        ? dw
        : tf.slice(dw, [0, 0, 0, 0], [kh, kw, c, co]);
    });
  }
  const ours = stride === 1
    ? wasmFilterGrad(input, dy, kh, kw, pad)
    : phasedFilterGrad(input, dy, kh, kw, stride, pad);
  if (ours !== null) return ours;
  return tf.tidy(() => {
    const [n, h, w, c] = input.shape;
    const [, oh, ow] = dy.shape;
    // The rows and columns the kernel reaches: exactly what a valid,
    // stride-1 convolution with the dilated oh x ow filter needs.
    const needH = kh + (oh - 1) * stride;
    const needW = kw + (ow - 1) * stride;
    const bottom = needH - h - pad;
    const right = needW - w - pad;
    const filter = tf.transpose(dy, [1, 2, 0, 3]) as tf.Tensor4D;
    let out: tf.Tensor4D;
    if (bottom >= 0 && right >= 0) {
      // Zero padding inside the convolution kernel (no padded copy).
      const image = tf.transpose(input, [3, 1, 2, 0]) as tf.Tensor4D;
      const padding = spatialPadding(pad, bottom, pad, right);
      out = tf.conv2d(image, filter, 1, padding, "NHWC", stride);
    } else {
      let x: tf.Tensor4D = input;
      if (pad > 0 || bottom > 0 || right > 0) {
        x = tf.pad(
          x,
          spatialPadding(pad, Math.max(bottom, 0), pad, Math.max(right, 0)),
        );
      }
      x = tf.slice(x, [0, 0, 0, 0], [n, needH, needW, c]);
      const image = tf.transpose(x, [3, 1, 2, 0]) as tf.Tensor4D;
      out = tf.conv2d(image, filter, 1, "valid", "NHWC", stride);
    }
    return tf.transpose(out, [1, 2, 0, 3]) as tf.Tensor4D;
  });
}

/**
 * 2-D convolution, NHWC, with PyTorch-style symmetric zero padding and
 * gradients on every backend (wasm included).
 *
 * @param x Input `[N, H, W, Cin]`.
 * @param w Kernel `[kh, kw, Cin, Cout]` (TF layout).
 * @param stride Stride along both spatial axes.
 * @param pad Zero pixels added on each side of both spatial axes, as
 * PyTorch's `padding`; in `[0, kernel size - 1]`.
 * @param bias Optional `[Cout]`, added to every output pixel.
 * @returns `[N, OH, OW, Cout]` with OH = floor((H + 2 pad - kh) / stride) + 1.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { conv2d } from "./_conv.ts";
 * await initBackend("cpu");
 * const x = tf.ones([1, 4, 4, 1]) as tf.Tensor4D;
 * const w = tf.ones([3, 3, 1, 1]) as tf.Tensor4D;
 * const y = conv2d(x, w, 2, 1); // [1, 2, 2, 1]: 4, 6, 6, 9
 * console.log(y.shape);
 * tf.dispose([x, w, y]);
 * ```
 */
export function conv2d(
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  stride: number,
  pad: number,
  bias?: tf.Tensor,
): tf.Tensor4D {
  const [kh, kw] = w.shape;
  checkGeometry("convolve", stride, pad, kh, kw);
  const op = customOp(([xi, wi, bi], save) => {
    save([xi, wi]);
    return {
      value: convForward(
        xi as tf.Tensor4D,
        wi as tf.Tensor4D,
        stride,
        pad,
        bi,
      ),
      gradFunc: (g, saved) => {
        const [xv, wv] = saved as tf.Tensor4D[];
        return convBackward(xv, wv, g, stride, pad, bi !== undefined);
      },
    };
  });
  return bias === undefined ? op(x, w) : op(x, w, bias);
}

/**
 * The value of {@linkcode conv2d} (unchecked, no gradient of its own): for
 * ops that compute their gradients themselves. The bias is added inside
 * the convolution kernel where the backend fuses it (XNNPACK on wasm).
 *
 * @param x Input `[N, H, W, Cin]`.
 * @param w Kernel `[kh, kw, Cin, Cout]`.
 * @param stride Stride along both spatial axes.
 * @param pad PyTorch's `padding`.
 * @param bias Optional `[Cout]`.
 * @returns `[N, OH, OW, Cout]`.
 */
export function convForward(
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  stride: number,
  pad: number,
  bias?: tf.Tensor,
): tf.Tensor4D {
  const [kh, kw, , cout] = w.shape;
  if (useWebGpuConvPadded()) {
    // Channels padded with zeros to multiples of 4.
    return paddedWebGpuConv(x, w, cout, {
      stride,
      padY: pad,
      padX: pad,
      oh: convOutSize(x.shape[1], kh, stride, pad),
      ow: convOutSize(x.shape[2], kw, stride, pad),
      bias,
    });
  }
  if (stride === 1 && pad === 1) {
    const y = wasmConv3x3(x, w, { bias });
    if (y !== null) return y;
  }
  const padding = pad === 0 ? "valid" : spatialPadding(pad, pad, pad, pad);
  return bias === undefined
    ? tf.conv2d(x, w, stride, padding)
    : tf.fused.conv2d({ x, filter: w, strides: stride, pad: padding, bias });
}

/**
 * The gradients of {@linkcode conv2d}: `[dx, dW]`, and the bias's if asked.
 *
 * @param x The convolution's input.
 * @param w Its kernel `[kh, kw, Cin, Cout]`.
 * @param dy The gradient of its output.
 * @param stride Stride along both spatial axes.
 * @param pad PyTorch's `padding`.
 * @param withBias Whether to append the bias's gradient (channel sums of dy).
 * @returns `[dx, dW]` or `[dx, dW, db]`.
 */
export function convBackward(
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  dy: tf.Tensor4D,
  stride: number,
  pad: number,
  withBias: boolean,
): tf.Tensor[] {
  const [kh, kw] = w.shape;
  const grads: tf.Tensor[] = [
    adjoint(dy, w, x.shape, stride, pad),
    filterGrad(x, dy, kh, kw, stride, pad),
  ];
  if (withBias) grads.push(channelSum(dy));
  return grads;
}

/**
 * Transposed 2-D convolution, NHWC, as PyTorch's `ConvTranspose2d` (the
 * adjoint of {@linkcode conv2d} with the same kernel, stride and padding),
 * with gradients on every backend.
 *
 * @param x Input `[N, H, W, Cin]`.
 * @param w Kernel `[kh, kw, Cout, Cin]` (TF's transposed-conv layout).
 * @param outputShape `[N, OH, OW, Cout]`; OH = (H - 1) stride - 2 pad + kh
 * as PyTorch computes it, or up to stride - 1 more (PyTorch's `output_padding`).
 * @param stride Stride along both spatial axes.
 * @param pad PyTorch's `padding`: pixels cropped from each side of the full output.
 * @param bias Optional `[Cout]`, added to every output pixel.
 * @returns `[N, OH, OW, Cout]`.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { conv2dTranspose } from "./_conv.ts";
 * await initBackend("cpu");
 * const x = tf.ones([1, 4, 4, 8]) as tf.Tensor4D;
 * const w = tf.ones([4, 4, 2, 8]) as tf.Tensor4D;
 * const y = conv2dTranspose(x, w, [1, 8, 8, 2], 2, 1); // exactly 2x upsampling
 * console.log(y.shape); // [1, 8, 8, 2]
 * tf.dispose([x, w, y]);
 * ```
 */
export function conv2dTranspose(
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  outputShape: [number, number, number, number],
  stride: number,
  pad: number,
  bias?: tf.Tensor,
): tf.Tensor4D {
  const [kh, kw, cout, cin] = w.shape;
  checkGeometry("transpose-convolve", stride, pad, kh, kw);
  const [n, oh, ow, oc] = outputShape;
  if (
    n !== x.shape[0] || oc !== cout || cin !== x.shape[3] ||
    convOutSize(oh, kh, stride, pad) !== x.shape[1] ||
    convOutSize(ow, kw, stride, pad) !== x.shape[2]
  ) {
    throw new TypeError(
      `Cannot transpose-convolve: output shape does not fit input and kernel (got [${outputShape}] for input [${x.shape}] and kernel [${w.shape}], expected [${
        x.shape[0]
      }, ${(x.shape[1] - 1) * stride - 2 * pad + kh}, ${
        (x.shape[2] - 1) * stride - 2 * pad + kw
      }, ${cout}])`,
    );
  }
  const shape: Shape4 = [n, oh, ow, oc];
  const op = customOp(([xi, wi, bi], save) => {
    save([xi, wi]);
    const y = adjoint(xi as tf.Tensor4D, wi as tf.Tensor4D, shape, stride, pad);
    return {
      value: bi === undefined ? y : tf.add(y, bi),
      gradFunc: (g, saved) => {
        const [xv, wv] = saved as tf.Tensor4D[];
        const grads = [
          convForward(g, wv, stride, pad),
          // The transposed conv is the adjoint of conv2d(., w) mapping the
          // output back to x, so its dW is that conv's dW with the roles of
          // input (here dy) and output gradient (here x) exchanged.
          filterGrad(g, xv, kh, kw, stride, pad),
        ];
        return bi === undefined ? grads : [...grads, channelSum(g)];
      },
    };
  });
  return bias === undefined ? op(x, w) : op(x, w, bias);
}
