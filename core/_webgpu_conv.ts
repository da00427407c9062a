/**
 * Convolutions on WebGPU as implicit GEMMs of ours: the convolution itself
 * ({@linkcode webgpuConv2d}, also the input gradient of a stride-1
 * convolution and, as a 1x1 convolution, a plain matrix product) and the
 * weight gradient ({@linkcode webgpuFilterGrad}, split over K).
 *
 * The weight gradient:
 *
 * dW[i, j, c, o] = sum over k = (n, y, x) of
 * input_pad[n, y s + i, x s + j, c] dy[n, y, x, o]: a GEMM with a small
 * output (M = kh kw Cin rows, Cout columns) and a huge reduction axis
 * (K = N OH OW, 65,536 for a batch of 64 32x32 images). tfjs runs it as a
 * conv2d over the batch axis with few workgroups, each looping over all of
 * K. Here:
 *
 * 1. `DdpmConvFilterGradPartial`: workgroup (tile of output columns, tile of
 *    output rows, chunk s of K) stages TK x TM patches of the (implicitly
 *    padded, never materialised) input and TK x TN rows of dy in workgroup
 *    memory and accumulates a 4x4 block per invocation in registers; it
 *    writes partial sums `[S, M, Cout]`. Zero padding and the ragged ends
 *    (M, Cout, K not multiples of the tiles) are bounds checks that read 0.
 *    Where Cin and Cout are multiples of 4, `DdpmConvFilterGradVec4` does the
 *    same with vec4 loads: both tiles staged as they lie in memory, and one
 *    vec4 of each read per 16 FMAs in the inner loop instead of 8 floats.
 * 2. `DdpmSplitKSum` (core/_webgpu_reduce.ts): one invocation per output
 *    element sums the S partial sums in a fixed order (skipped when S = 1).
 *
 * @module
 */
import { tf } from "./backend.ts";
import {
  type ProgramUniform,
  registerProgramKernel,
  type WebGpuProgram,
} from "./_webgpu.ts";
import { sumPartials } from "./_webgpu_reduce.ts";

/** The geometry of a weight gradient: kernel size, stride, PyTorch padding. */
export interface FilterGradGeometry {
  /** Kernel rows. */
  kh: number;
  /** Kernel columns. */
  kw: number;
  /** Stride along both spatial axes. */
  stride: number;
  /** Zero pixels on each side of both spatial axes. */
  pad: number;
  /**
   * Length of each chunk of the reduction axis K = N OH OW (rounded up to a
   * multiple of the K step, 16); default: chosen for a few hundred to a
   * couple of thousand workgroups.
   */
  chunk?: number;
  /**
   * Stage both operands with vec4 loads (`DdpmConvFilterGradVec4`); default:
   * whenever Cin and Cout are multiples of 4, which it requires. False runs
   * the scalar program, which takes any channel counts.
   */
  vec4?: boolean;
}

/** Rows of K staged per step. */
const TK = 16;
/** Workgroups to aim for (several per SM on a large GPU). */
const TARGET_WORKGROUPS = 2048;
/** The shortest chunk of K chosen by default (bounds the partial sums' size). */
const MIN_CHUNK = 256;

/** A tile side for an output axis of length n: 64, 32 or 16. */
function tileFor(n: number): number {
  return n >= 48 ? 64 : n >= 24 ? 32 : 16;
}

/** Tiles, chunking and workgroup count of one weight gradient. */
function plan(m: number, cout: number, k: number, chunk?: number) {
  const tm = tileFor(m);
  const tn = tileFor(cout);
  const tiles = Math.ceil(m / tm) * Math.ceil(cout / tn);
  let len = chunk;
  if (len === undefined) {
    const parts = Math.max(
      1,
      Math.min(
        Math.ceil(TARGET_WORKGROUPS / tiles),
        Math.floor(k / MIN_CHUNK),
      ),
    );
    len = Math.ceil(k / parts);
  }
  len = Math.max(TK, Math.ceil(len / TK) * TK);
  return { tm, tn, chunk: len, parts: Math.ceil(k / len) };
}

/**
 * WGSL staging one row of the weight gradient's input tile: into `v`, the
 * value `load` (an expression of nq, iy, ix) at the output pixel (rowN,
 * rowY, rowX)[i] moved by the invocation's tap (di, dj) through the stride,
 * `zero` outside the image or where `ok` fails; then that row advanced TK
 * rows further along K = (n, y, x), without division.
 */
function stageRow(i: string, zero: string, ok: string, load: string): string {
  return `var v = ${zero};
        var xq = rowX[${i}];
        var yq = rowY[${i}];
        let nq = rowN[${i}];
        if (${ok}) {
          let iy = yq * uniforms.stride + di;
          let ix = xq * uniforms.stride + dj;
          if (iy >= 0 && iy < uniforms.h && ix >= 0 && ix < uniforms.w) {
            v = ${load};
          }
        }
        xq += ${TK};
        loop {
          if (xq < uniforms.ow) { break; }
          xq -= uniforms.ow;
          yq += 1;
        }
        var nNext = nq;
        loop {
          if (yq < uniforms.oh) { break; }
          yq -= uniforms.oh;
          nNext += 1;
        }
        rowX[${i}] = xq;
        rowY[${i}] = yq;
        rowN[${i}] = nNext;`;
}

function partialSource(tm: number, tn: number): string {
  const rm = tm / 4;
  const rn = tn / 4;
  const threads = rm * rn;
  // Each invocation stages TK * TM / threads input values and
  // TK * TN / threads dy values per step, one column each.
  const aRows = threads / tm;
  const bRows = threads / tn;
  const aPer = TK / aRows;
  return `
  const TM = ${tm};
  const TN = ${tn};
  const TK = ${TK};
  var<workgroup> tileA : array<f32, ${TK * tm}>;
  var<workgroup> tileB : array<f32, ${TK * tn}>;

  fn store(part : i32, m : i32, o : i32, v : vec4<f32>) {
    if (m < uniforms.mTotal) {
      let row = (part * uniforms.mTotal + m) * uniforms.cout;
      if (o < uniforms.cout) { setOutputAtIndex(row + o, v.x); }
      if (o + ${rn} < uniforms.cout) { setOutputAtIndex(row + o + ${rn}, v.y); }
      if (o + ${2 * rn} < uniforms.cout) { setOutputAtIndex(row + o + ${
    2 * rn
  }, v.z); }
      if (o + ${3 * rn} < uniforms.cout) { setOutputAtIndex(row + o + ${
    3 * rn
  }, v.w); }
    }
  }

  fn main(index : i32) {
    let t = i32(localIndex);
    let tx = t % ${rn};
    let ty = t / ${rn};
    let o0 = i32(workgroupId.x) * TN;
    let m0 = i32(workgroupId.y) * TM;
    let part = i32(workgroupId.z);
    let kStart = part * uniforms.chunk;
    let kEnd = min(kStart + uniforms.chunk, uniforms.kTotal);

    // This invocation's column of the input patch: (i, j, c) of row m.
    let am = t % TM;
    let ak = t / TM;
    let mA = m0 + am;
    let mOk = mA < uniforms.mTotal;
    let c = mA % uniforms.cin;
    let ij = mA / uniforms.cin;
    let dj = ij % uniforms.kw - uniforms.pad;
    let di = ij / uniforms.kw - uniforms.pad;
    // Its column of dy.
    let bo = t % TN;
    let bk = t / TN;
    let oB = o0 + bo;
    let oOk = oB < uniforms.cout;
    // The (n, y, x) of each of its rows of the K tile, advanced by TK per
    // step without division.
    var rowN : array<i32, ${aPer}>;
    var rowY : array<i32, ${aPer}>;
    var rowX : array<i32, ${aPer}>;
    let ohw = uniforms.oh * uniforms.ow;
    for (var r = 0; r < ${aPer}; r++) {
      let k = kStart + ak + r * ${aRows};
      let nq = k / ohw;
      let rest = k - nq * ohw;
      rowN[r] = nq;
      rowY[r] = rest / uniforms.ow;
      rowX[r] = rest - rowY[r] * uniforms.ow;
    }

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // A uniform trip count (barriers inside); the last chunk reads zeros past kEnd.
    for (var it = 0; it < uniforms.steps; it++) {
      let k0 = kStart + it * TK;
      for (var r = 0; r < ${aPer}; r++) {
        let kr = ak + r * ${aRows};
        let k = k0 + kr;
        ${
    stageRow(
      "r",
      "0.0",
      "mOk && k < kEnd",
      "xin[((nq * uniforms.h + iy) * uniforms.w + ix) * uniforms.cin + c]",
    )
  }
        tileA[kr * TM + am] = v;
      }
      for (var r = 0; r < ${TK / bRows}; r++) {
        let kr = bk + r * ${bRows};
        let k = k0 + kr;
        var v = 0.0;
        if (oOk && k < kEnd) {
          v = dy[k * uniforms.cout + oB];
        }
        tileB[kr * TN + bo] = v;
      }
      workgroupBarrier();
      for (var kk = 0; kk < TK; kk++) {
        let a = vec4<f32>(
          tileA[kk * TM + ty],
          tileA[kk * TM + ty + ${rm}],
          tileA[kk * TM + ty + ${2 * rm}],
          tileA[kk * TM + ty + ${3 * rm}]);
        let b = vec4<f32>(
          tileB[kk * TN + tx],
          tileB[kk * TN + tx + ${rn}],
          tileB[kk * TN + tx + ${2 * rn}],
          tileB[kk * TN + tx + ${3 * rn}]);
        acc0 = fma(vec4<f32>(a.x), b, acc0);
        acc1 = fma(vec4<f32>(a.y), b, acc1);
        acc2 = fma(vec4<f32>(a.z), b, acc2);
        acc3 = fma(vec4<f32>(a.w), b, acc3);
      }
      workgroupBarrier();
    }

    let mRow = m0 + ty;
    let oCol = o0 + tx;
    store(part, mRow, oCol, acc0);
    store(part, mRow + ${rm}, oCol, acc1);
    store(part, mRow + ${2 * rm}, oCol, acc2);
    store(part, mRow + ${3 * rm}, oCol, acc3);
  }`;
}

/**
 * WGSL of the weight gradient's partial sums with vec4 loads (Cin and Cout
 * multiples of 4): a vec4 of the GEMM's rows m = (i, j, c..c+3) is 4
 * consecutive input channels of one pixel, so both tiles are staged as
 * they lie in memory, a vec4 per load, and the inner loop reads one vec4
 * of each tile per 16 FMAs (the scalar program reads 8 floats).
 */
function partialSourceVec4(tm: number, tn: number): string {
  const gx = tn / 4; // invocations along the output channels
  const gy = tm / 4; // invocations along the rows m
  const threads = gx * gy;
  const aLoads = (TK * tm / 4) / threads; // = 64 / tn
  const bLoads = (TK * tn / 4) / threads; // = 64 / tm
  const rows = Array.from({ length: 4 }, (_, r) => r);
  return `
  var<workgroup> tileA : array<vec4<f32>, ${TK * tm / 4}>;
  var<workgroup> tileB : array<vec4<f32>, ${TK * tn / 4}>;

  fn main(index : i32) {
    let t = i32(localIndex);
    let tx = t % ${gx};
    let ty = t / ${gx};
    let o0v = i32(workgroupId.x) * ${gx};
    let m0v = i32(workgroupId.y) * ${gy};
    let part = i32(workgroupId.z);
    let kStart = part * uniforms.chunk;
    let kEnd = min(kStart + uniforms.chunk, uniforms.kTotal);
    let cinV = uniforms.cin / 4;
    let coutV = uniforms.cout / 4;
    let mTotalV = uniforms.mTotal / 4;

    // This invocation's vec4 of rows m (the same in every load): tap
    // (di, dj) relative to the output pixel, channel vec4 cv.
    let av = t % ${gy};
    let mV = m0v + av;
    let mOk = mV < mTotalV;
    let cv = mV % cinV;
    let ij = mV / cinV;
    let dj = ij % uniforms.kw - uniforms.pad;
    let di = ij / uniforms.kw - uniforms.pad;
    // Its rows of the K tile, as (n, y, x), advanced by TK per step
    // without division.
    var rowN : array<i32, ${aLoads}>;
    var rowY : array<i32, ${aLoads}>;
    var rowX : array<i32, ${aLoads}>;
    let ohw = uniforms.oh * uniforms.ow;
    for (var l = 0; l < ${aLoads}; l++) {
      let k = kStart + t / ${gy} + l * ${threads / gy};
      let nq = k / ohw;
      let rest = k - nq * ohw;
      rowN[l] = nq;
      rowY[l] = rest / uniforms.ow;
      rowX[l] = rest - rowY[l] * uniforms.ow;
    }

    ${rows.map((r) => `var acc${r} = vec4<f32>(0.0);`).join("\n    ")}
    // A uniform trip count (barriers inside); the last chunk reads zeros past kEnd.
    for (var it = 0; it < uniforms.steps; it++) {
      let k0 = kStart + it * ${TK};
      for (var l = 0; l < ${aLoads}; l++) {
        let kr = t / ${gy} + l * ${threads / gy};
        ${
    stageRow(
      "l",
      "vec4<f32>(0.0)",
      "mOk && k0 + kr < kEnd",
      "xin[((nq * uniforms.h + iy) * uniforms.w + ix) * cinV + cv]",
    )
  }
        tileA[kr * ${gy} + av] = v;
      }
      for (var l = 0; l < ${bLoads}; l++) {
        let e = t + l * ${threads};
        let kr = e / ${gx};
        let ov = e % ${gx};
        var v = vec4<f32>(0.0);
        if (k0 + kr < kEnd && o0v + ov < coutV) {
          v = dy[(k0 + kr) * coutV + o0v + ov];
        }
        tileB[kr * ${gx} + ov] = v;
      }
      workgroupBarrier();
      for (var kk = 0; kk < ${TK}; kk++) {
        let a = tileA[kk * ${gy} + ty];
        let b = tileB[kk * ${gx} + tx];
        ${
    rows.map((r) => `acc${r} = fma(vec4<f32>(a[${r}]), b, acc${r});`)
      .join("\n        ")
  }
      }
      workgroupBarrier();
    }

    let ov = o0v + tx;
    if (ov < coutV) {
      ${
    rows.map((r) =>
      `{ let m = (m0v + ty) * 4 + ${r};
        if (m < uniforms.mTotal) {
          setOutputAtIndex((part * uniforms.mTotal + m) * coutV + ov, acc${r});
        } }`
    ).join("\n      ")
  }
    }
  }`;
}

/** The program of a weight gradient's partial sums, scalar or vec4. */
function filterGradProgram(
  inputs: tf.TensorInfo[],
  attrs: Record<string, unknown>,
  vec4: boolean,
): { program: WebGpuProgram; uniforms: ProgramUniform[] } {
  const [n, h, w, cin] = inputs[0].shape;
  const [, oh, ow, cout] = inputs[1].shape;
  const kh = attrs.kh as number;
  const kw = attrs.kw as number;
  const m = kh * kw * cin;
  const k = n * oh * ow;
  const chunk = attrs.chunk as number;
  const p = plan(m, cout, k, chunk > 0 ? chunk : undefined);
  const threads = (p.tm / 4) * (p.tn / 4);
  const name = vec4 ? "ddpmConvFilterGradVec4" : "ddpmConvFilterGradPartial";
  return {
    program: {
      variableNames: ["xin", "dy"],
      ...(vec4 ? { variableComponents: [4, 4], outputComponent: 4 } : {}),
      shaderKey: `${name}_${p.tm}_${p.tn}`,
      uniforms:
        "h : i32, w : i32, cin : i32, oh : i32, ow : i32, cout : i32, kw : i32, stride : i32, pad : i32, mTotal : i32, kTotal : i32, chunk : i32, steps : i32,",
      // One chunk: the program writes dW in its final shape.
      outputShape: p.parts === 1 ? [kh, kw, cin, cout] : [p.parts, m, cout],
      dispatchLayout: { x: [0] },
      dispatch: [
        Math.ceil(cout / p.tn),
        Math.ceil(m / p.tm),
        p.parts,
      ],
      workgroupSize: [threads, 1, 1],
      getUserCode: () =>
        vec4 ? partialSourceVec4(p.tm, p.tn) : partialSource(p.tm, p.tn),
    },
    uniforms: [
      h,
      w,
      cin,
      oh,
      ow,
      cout,
      kw,
      attrs.stride as number,
      attrs.pad as number,
      m,
      k,
      p.chunk,
      p.chunk / TK,
    ].map((v) => ({ type: "int32" as const, data: [v] })),
  };
}

registerProgramKernel(
  "DdpmConvFilterGradPartial",
  (inputs, attrs) => filterGradProgram(inputs, attrs, false),
);

registerProgramKernel(
  "DdpmConvFilterGradVec4",
  (inputs, attrs) => filterGradProgram(inputs, attrs, true),
);

/**
 * The weight gradient of `conv2d(input, w, stride, pad)` on the WebGPU
 * backend: dW[i, j, c, o] = sum over n, y, x of
 * input_pad[n, y stride + i, x stride + j, c] dy[n, y, x, o], by a split-K
 * GEMM program and a sum of its partial results (two dispatches; one when
 * K fits one chunk).
 *
 * @param input The convolution's input `[N, H, W, Cin]`.
 * @param dy The gradient of its output `[N, OH, OW, Cout]`.
 * @param geometry Kernel size, stride, padding and optionally the K chunk length.
 * @returns dW `[kh, kw, Cin, Cout]`.
 * @example
 * ```ts ignore
 * import { initBackend, tf } from "./backend.ts";
 * import { webgpuFilterGrad } from "./_webgpu_conv.ts";
 * await initBackend("webgpu");
 * const x = tf.ones([2, 4, 4, 3]) as tf.Tensor4D;
 * const dy = tf.ones([2, 4, 4, 5]) as tf.Tensor4D;
 * const dw = webgpuFilterGrad(x, dy, { kh: 3, kw: 3, stride: 1, pad: 1 });
 * console.log(dw.shape); // [3, 3, 3, 5]
 * ```
 */
export function webgpuFilterGrad(
  input: tf.Tensor4D,
  dy: tf.Tensor4D,
  geometry: FilterGradGeometry,
): tf.Tensor4D {
  const { kh, kw, stride, pad, chunk } = geometry;
  if (tf.getBackend() !== "webgpu") {
    throw new Error(
      `Cannot compute a weight gradient with WebGPU programs: the active backend is not webgpu (got ${tf.getBackend()}, expected webgpu)`,
    );
  }
  const [n, , , cin] = input.shape;
  const [dn, , , cout] = dy.shape;
  if (dn !== n) {
    throw new TypeError(
      `Cannot compute a weight gradient: input and output gradient differ in batch size (got ${dn}, expected ${n})`,
    );
  }
  const vec4Fits = cin % 4 === 0 && cout % 4 === 0;
  const vec4 = geometry.vec4 ?? vec4Fits;
  if (vec4 && !vec4Fits) {
    throw new RangeError(
      `Cannot compute a weight gradient with vec4 loads: channels are not multiples of 4 (got input ${cin}, output ${cout}, expected multiples of 4)`,
    );
  }
  const shape: [number, number, number, number] = [kh, kw, cin, cout];
  return tf.tidy(() => {
    const partial = tf.engine().runKernel(
      vec4 ? "DdpmConvFilterGradVec4" : "DdpmConvFilterGradPartial",
      { input, dy },
      { kh, kw, stride, pad, chunk: chunk ?? 0 },
    ) as tf.Tensor;
    return sumPartials(partial, shape) as tf.Tensor4D;
  });
}

/**
 * The tiles of {@linkcode webgpuConv2d}: a workgroup computes `tm` output
 * pixels x `tn` output channels, staging `tk` of the reduction axis per
 * step; each invocation accumulates `rm` x `rn` outputs in registers. All
 * multiples of 4; (tm / rm) (tn / rn) invocations per workgroup.
 */
export interface ConvTiles {
  tm: number;
  tn: number;
  tk: number;
  rm: number;
  rn: number;
  /**
   * Load the next K tile from memory into registers while the current one
   * is computed (software pipelining; default false: load, then compute).
   */
  prefetch?: boolean;
}

/**
 * The tiles chosen when none are given: of 12 tilings swept on an H200
 * (tests/tools/conv_sweep.ts), the best geometric-mean speed-up over tfjs's
 * Conv2D at the UNet's base-64 shapes and batch 64 (3.96x; 1.97x at batch 8,
 * where tk = 32 gave 2.05x).
 */
export const DEFAULT_CONV_TILES: ConvTiles = {
  tm: 64,
  tn: 64,
  tk: 16,
  rm: 4,
  rn: 4,
};

/**
 * The tiles chosen when none are given and there are at most 4 output
 * channels (the UNet's output convolution and its input convolution's
 * gradient, padded to 4): 256 output pixels by 4 channels per workgroup,
 * where a 64-wide tile would compute 16 times the outputs wanted (tk = 8:
 * llvmpipe compiles it in 2 s, against 9 s with tk = 16).
 */
export const NARROW_CONV_TILES: ConvTiles = {
  tm: 256,
  tn: 4,
  tk: 8,
  rm: 4,
  rn: 4,
};

function checkTiles(t: ConvTiles): void {
  const threads = (t.tm / t.rm) * (t.tn / t.rn);
  const ok =
    [t.tm, t.tn, t.tk, t.rm, t.rn].every((v) =>
      Number.isInteger(v) && v >= 4 && v % 4 === 0
    ) && t.tm % t.rm === 0 && t.tn % t.rn === 0 && threads <= 256 &&
    (t.tm * t.tk / 4) % threads === 0 &&
    ((t.tn * t.tk / 4) % threads === 0 || threads % (t.tn * t.tk / 4) === 0);
  if (!ok) {
    throw new RangeError(
      `Cannot convolve on WebGPU: unusable tiles (got ${
        JSON.stringify(t)
      }, expected multiples of 4 with at most 256 invocations, each loading whole vec4s of the input, and the kernel's vec4s a multiple or a divisor of the invocations)`,
    );
  }
}

/**
 * WGSL: the GEMM's geometry for a plain convolution: all from uniforms
 * (output rows, taps, stride, padding), output row m written at row m.
 */
const PLAIN_GEOMETRY = `
    let ohP = uniforms.oh;
    let owP = uniforms.ow;
    let khP = uniforms.kh;
    let kwP = uniforms.kw;
    let strideP = uniforms.stride;
    let padYP = uniforms.padY;
    let padXP = uniforms.padX;
    let mTotalP = uniforms.mTotal;
    let kTotalP = uniforms.kTotal;
    let rY = 0;
    let rX = 0;
    let tapStride = 1;`;

/**
 * WGSL: the geometry of output phase (a, b) = (z / s, z % s) of a transposed
 * convolution with stride s (`uniforms.stride`) and padding p
 * (`uniforms.padY`): its outputs (s qy + a, s qx + b) see only the kernel
 * rows rY + s t (t < khP, rY = (a + p) mod s) and columns rX + s u, at input
 * rows qy + (a + p) / s - t: a stride-1 convolution over (qy, qx) with a
 * khP x kwP kernel read in reverse, padded by khP - 1 - (a + p) / s.
 */
const TRANSPOSED_GEOMETRY = `
    let s = uniforms.stride;
    let pa = i32(workgroupId.z) / s + uniforms.padY;
    let pb = i32(workgroupId.z) % s + uniforms.padY;
    let rY = pa % s;
    let rX = pb % s;
    let khP = select(0, (uniforms.kh - rY + s - 1) / s, rY < uniforms.kh);
    let kwP = select(0, (uniforms.kw - rX + s - 1) / s, rX < uniforms.kw);
    let phaseY = i32(workgroupId.z) / s;
    let phaseX = i32(workgroupId.z) % s;
    let ohP = max(uniforms.oh - phaseY + s - 1, 0) / s;
    let owP = max(uniforms.ow - phaseX + s - 1, 0) / s;
    let strideP = 1;
    let padYP = khP - 1 - pa / s;
    let padXP = kwP - 1 - pb / s;
    let mTotalP = uniforms.batch * ohP * owP;
    let kTotalP = khP * kwP * uniforms.cin;
    let tapStride = s;`;

/** WGSL: the output pixel of a transposed convolution's phase row m. */
const TRANSPOSED_ROW = `let nq = m / (ohP * owP);
        let rest = m - nq * ohP * owP;
        let qy = rest / owP;
        let qx = rest - qy * owP;
        let orow = (nq * uniforms.oh + qy * s + phaseY) * uniforms.ow +
          qx * s + phaseX;`;

/**
 * WGSL of the implicit-GEMM convolution: C[m, o] = sum_k A[m, k] B[k, o]
 * with m = (n, y, x) an output pixel, k = (i, j, c) a kernel tap and input
 * channel, A[m, k] = input[n, y s - padY + i, x s - padX + j, c] (zero
 * outside) and B the kernel `[kh kw Cin, Cout]` as it lies in memory.
 * Inputs, kernel, bias and output are bound as vec4 arrays (Cin and Cout
 * are multiples of 4, so a vec4 of A never straddles two taps).
 */
function convSource(
  t: ConvTiles,
  bias: boolean,
  flip: boolean,
  transposed: boolean,
): string {
  const { tm, tn, tk, rm, rn } = t;
  const gx = tn / rn; // invocations along the output channels
  const gy = tm / rm; // invocations along the output pixels
  const threads = gx * gy;
  const kq = tk / 4; // vec4s of A per row of the tile
  const aLoads = (tm * kq) / threads;
  // vec4s of B per K step; a narrow tile (tn = 4) has fewer than invocations.
  const bTotal = tn * tk / 4;
  const bLoads = Math.ceil(bTotal / threads);
  const bLast = bLoads * threads === bTotal
    ? ""
    : `if (e >= ${bTotal}) { break; }`;
  const lines: string[] = [];
  const acc = (r: number, p: number) => `acc_${r}_${p}`;
  for (let r = 0; r < rm; r++) {
    for (let p = 0; p < rn / 4; p++) {
      lines.push(`var ${acc(r, p)} = vec4<f32>(0.0);`);
    }
  }
  const decls = lines.join("\n    ");
  const fmas: string[] = [];
  for (let q = 0; q < rm / 4; q++) {
    fmas.push(`let a${q} = tileA[kk * ${tm / 4} + ${q * gy} + ty];`);
  }
  for (let p = 0; p < rn / 4; p++) {
    fmas.push(`let b${p} = tileB[kk * ${tn / 4} + ${p * gx} + tx];`);
  }
  for (let r = 0; r < rm; r++) {
    const a = `a${Math.floor(r / 4)}[${r % 4}]`;
    for (let p = 0; p < rn / 4; p++) {
      fmas.push(
        `${acc(r, p)} = fma(vec4<f32>(${a}), b${p}, ${acc(r, p)});`,
      );
    }
  }
  const stores: string[] = [];
  for (let r = 0; r < rm; r++) {
    const q = Math.floor(r / 4);
    stores.push(
      `{ let m = m0 + (${q * gy} + ty) * 4 + ${r % 4};
      if (m < mTotalP) {
        ${transposed ? TRANSPOSED_ROW : "let orow = m;"}`,
    );
    for (let p = 0; p < rn / 4; p++) {
      stores.push(`  { let ov = o0v + ${p * gx} + tx;
        if (ov < uniforms.coutV) {
          setOutputAtIndex(orow * uniforms.coutV + ov, ${acc(r, p)}${
        bias ? " + bias[ov]" : ""
      });
        } }`);
    }
    stores.push(`} }`);
  }
  // B as it lies: rows k of [kh kw Cin, Cout], a vec4 of 4 output channels.
  const fetchB = `for (var l = 0; l < ${bLoads}; l++) {
        let e = t + l * ${threads};
        ${bLast}
        let kr = e / ${tn / 4};
        let ov = e % ${tn / 4};
        var v = vec4<f32>(0.0);
        if (kf + kr < kTotalP && o0v + ov < uniforms.coutV) {
          v = w[(kf + kr) * uniforms.coutV + o0v + ov];
        }
        regB[l] = v;
      }`;
  const stashB = `for (var l = 0; l < ${bLoads}; l++) {
        let e = t + l * ${threads};
        ${bLast}
        tileB[(e / ${tn / 4}) * ${tn / 4} + e % ${tn / 4}] = regB[l];
      }`;
  // B of a kernel [kh, kw, Cout, Cin] read flipped with its channel axes
  // swapped: B[(i, j, c), o] = w[kh - 1 - i, kw - 1 - j, o, c], a vec4 of 4
  // consecutive c (rows of B) for one output channel o.
  const flipFetchB = `for (var l = 0; l < ${bLoads}; l++) {
        let e = t + l * ${threads};
        ${bLast}
        let kq = e % ${tk / 4};
        let oc = e / ${tk / 4};
        let k = kf + kq * 4;
        let o = o0v * 4 + oc;
        var v = vec4<f32>(0.0);
        if (k < kTotalP && o < uniforms.coutV * 4) {
          let c = k % uniforms.cin;
          let ij = k / uniforms.cin;
          let j = ij % kwP;
          let i = ij / kwP;
          let tap = (rY + tapStride * (khP - 1 - i)) * uniforms.kw + rX +
            tapStride * (kwP - 1 - j);
          v = w[((tap * uniforms.coutV * 4 + o) * uniforms.cin + c) / 4];
        }
        regB[l] = v;
      }`;
  const flipStashB = `for (var l = 0; l < ${bLoads}; l++) {
        let e = t + l * ${threads};
        ${bLast}
        let row = (e % ${tk / 4}) * 4;
        let oc = e / ${tk / 4};
        let v = regB[l];
        tileB[row * ${tn / 4} + oc / 4][oc % 4] = v.x;
        tileB[(row + 1) * ${tn / 4} + oc / 4][oc % 4] = v.y;
        tileB[(row + 2) * ${tn / 4} + oc / 4][oc % 4] = v.z;
        tileB[(row + 3) * ${tn / 4} + oc / 4][oc % 4] = v.w;
      }`;
  // A: the gathered vec4s of the K tile at kf, each row's tap and channel
  // then advanced to the next K tile (${kq} vec4s further along: c, then j,
  // then i), so fetches must come in order of kf.
  const fetchA = `for (var l = 0; l < ${aLoads}; l++) {
        let kv = (t + l * ${threads}) % ${kq};
        var v = vec4<f32>(0.0);
        let iy = rowY[l] + kI[l];
        let ix = rowX[l] + kJ[l];
        if (kf / 4 + kv < kTotalV && iy >= 0 && iy < uniforms.h && ix >= 0 && ix < uniforms.w) {
          v = xin[((rowBase[l] + iy) * uniforms.w + ix) * cinV + kC[l]];
        }
        regA[l] = v;
        var c = kC[l] + ${kq};
        var j = kJ[l];
        var i = kI[l];
        loop {
          if (c < cinV) { break; }
          c -= cinV;
          j += 1;
          if (j == kwP) { j = 0; i += 1; }
        }
        kC[l] = c;
        kJ[l] = j;
        kI[l] = i;
      }`;
  const stashA = `for (var l = 0; l < ${aLoads}; l++) {
        let e = t + l * ${threads};
        let mm = e / ${kq};
        let col = (e % ${kq}) * 4;
        let v = regA[l];
        tileA[col * ${tm / 4} + mm / 4][mm % 4] = v.x;
        tileA[(col + 1) * ${tm / 4} + mm / 4][mm % 4] = v.y;
        tileA[(col + 2) * ${tm / 4} + mm / 4][mm % 4] = v.z;
        tileA[(col + 3) * ${tm / 4} + mm / 4][mm % 4] = v.w;
      }`;
  const fetch = (kf: string) =>
    `{
      let kf = ${kf};
      ${fetchA}
      ${flip || transposed ? flipFetchB : fetchB}
    }`;
  const stash = `${stashA}
      ${flip || transposed ? flipStashB : stashB}`;
  return `
  var<workgroup> tileA : array<vec4<f32>, ${tk * tm / 4}>;
  var<workgroup> tileB : array<vec4<f32>, ${tk * tn / 4}>;

  fn main(index : i32) {
    let t = i32(localIndex);
    let tx = t % ${gx};
    let ty = t / ${gx};
    let o0v = i32(workgroupId.x) * ${tn / 4};
    let m0 = i32(workgroupId.y) * ${tm};
    let cinV = uniforms.cin / 4;
    ${transposed ? TRANSPOSED_GEOMETRY : PLAIN_GEOMETRY}

    // The rows of A this invocation loads: output pixel (n, y, x) of each,
    // as the top-left input pixel its kernel window starts at.
    var rowBase : array<i32, ${aLoads}>;
    var rowY : array<i32, ${aLoads}>;
    var rowX : array<i32, ${aLoads}>;
    // The vec4 of the K tile it loads in each row, as tap (i, j) and
    // channel vec4 cv, advanced by one K tile per step.
    var kI : array<i32, ${aLoads}>;
    var kJ : array<i32, ${aLoads}>;
    var kC : array<i32, ${aLoads}>;
    let ohw = ohP * owP;
    for (var l = 0; l < ${aLoads}; l++) {
      let e = t + l * ${threads};
      let m = m0 + e / ${kq};
      let kv = e % ${kq};
      let n = m / ohw;
      let rest = m - n * ohw;
      let y = rest / owP;
      let x = rest - y * owP;
      rowY[l] = select(-1000000, y * strideP - padYP, m < mTotalP);
      rowX[l] = x * strideP - padXP;
      rowBase[l] = n * uniforms.h;
      kC[l] = kv % cinV;
      let ij = kv / cinV;
      kJ[l] = ij % kwP;
      kI[l] = ij / kwP;
    }
    let kTotalV = kTotalP / 4;

    ${decls}
    var regA : array<vec4<f32>, ${aLoads}>;
    var regB : array<vec4<f32>, ${bLoads}>;
    ${t.prefetch ? fetch("0") : ""}
    for (var k0 = 0; k0 < uniforms.kTotal; k0 += ${tk}) {
      ${t.prefetch ? "" : fetch("k0")}
      ${stash}
      workgroupBarrier();
      ${
    t.prefetch
      ? `// The next K tile's loads, in flight while this one is computed.
      if (k0 + ${tk} < uniforms.kTotal) ${fetch(`k0 + ${tk}`)}`
      : ""
  }
      for (var kk = 0; kk < ${tk}; kk++) {
        ${fmas.join("\n        ")}
      }
      workgroupBarrier();
    }
    ${stores.join("\n    ")}
  }`;
}

registerProgramKernel("DdpmConv2D", (inputs, attrs) => {
  const [n, h, w, cin] = inputs[0].shape;
  const transposed = attrs.transposed === true;
  const flip = attrs.flip === true && !transposed;
  const [kh, kw] = inputs[1].shape;
  const cout = inputs[1].shape[flip || transposed ? 2 : 3];
  const oh = attrs.oh as number;
  const ow = attrs.ow as number;
  const stride = attrs.stride as number;
  const tiles = attrs.tiles as ConvTiles;
  const bias = inputs.length === 3;
  const { tm, tn, tk, rm, rn } = tiles;
  // A transposed convolution runs its s^2 output phases as workgroup
  // layers: the largest phase's rows and taps bound the dispatch and the
  // reduction loop (uniform, as barriers need).
  const phases = transposed ? stride * stride : 1;
  const m = transposed
    ? n * Math.ceil(oh / stride) * Math.ceil(ow / stride)
    : n * oh * ow;
  const k = transposed
    ? Math.ceil(kh / stride) * Math.ceil(kw / stride) * cin
    : kh * kw * cin;
  return {
    program: {
      variableNames: bias ? ["xin", "w", "bias"] : ["xin", "w"],
      variableComponents: bias ? [4, 4, 4] : [4, 4],
      outputComponent: 4,
      shaderKey:
        `ddpmConv2D_${tm}_${tn}_${tk}_${rm}_${rn}_${bias}_${flip}_${transposed}_${
          tiles.prefetch === true
        }`,
      uniforms:
        "batch : i32, h : i32, w : i32, cin : i32, oh : i32, ow : i32, coutV : i32, kh : i32, kw : i32, stride : i32, padY : i32, padX : i32, mTotal : i32, kTotal : i32,",
      outputShape: [n, oh, ow, cout],
      dispatchLayout: { x: [0] },
      dispatch: [Math.ceil(cout / tn), Math.ceil(m / tm), phases],
      workgroupSize: [(tm / rm) * (tn / rn), 1, 1],
      getUserCode: () => convSource(tiles, bias, flip, transposed),
    },
    uniforms: [
      n,
      h,
      w,
      cin,
      oh,
      ow,
      cout / 4,
      kh,
      kw,
      stride,
      attrs.padY as number,
      attrs.padX as number,
      m,
      k,
    ].map((v) => ({ type: "int32" as const, data: [v] })),
  };
});

/** Options of {@linkcode webgpuConv2d}. */
export interface WebGpuConvOptions {
  /** Stride along both spatial axes. */
  stride: number;
  /** Zero rows above and columns left of the input (the rest follows from the output size). */
  padY: number;
  padX: number;
  /** Output rows and columns. */
  oh: number;
  ow: number;
  /** Optional `[Cout]` added to every output pixel. */
  bias?: tf.Tensor;
  /**
   * Read the kernel as `[kh, kw, Cout, Cin]`, flipped in both spatial axes
   * with its channel axes swapped: the input gradient of a stride-1
   * convolution with that kernel, without a copy of it.
   */
  flip?: boolean;
  /**
   * A transposed convolution (PyTorch's `ConvTranspose2d`, the adjoint of
   * a convolution with this kernel, stride and `padY` = `padX` padding):
   * the kernel is read as `[kh, kw, Cout, Cin]`, each of the stride^2
   * output phases a stride-1 convolution with its share of the taps.
   */
  transposed?: boolean;
  /** Tiles; default {@linkcode DEFAULT_CONV_TILES}, {@linkcode NARROW_CONV_TILES} for at most 4 output channels. */
  tiles?: ConvTiles;
}

/**
 * Whether {@linkcode webgpuConv2d} takes a convolution with these channel
 * counts: on the WebGPU backend, with Cin and Cout multiples of 4.
 *
 * @param cin Input channels.
 * @param cout Output channels.
 * @returns True when it applies.
 */
export function webgpuConvApplies(cin: number, cout: number): boolean {
  return tf.getBackend() === "webgpu" && cin % 4 === 0 && cout % 4 === 0;
}

/** Whether the GEMM programs are switched off for tfjs's own kernels (`DDPM_WEBGPU_CONV=tfjs`). */
const switchedToTfjs = (() => {
  try {
    return Deno.env.get("DDPM_WEBGPU_CONV") === "tfjs";
  } catch {
    return false;
  }
})();

/**
 * Whether ddpm's layers run a convolution (or a linear layer's product)
 * with these channel counts on {@linkcode webgpuConv2d}: where it applies,
 * unless `DDPM_WEBGPU_CONV=tfjs` switches every such use back to tfjs's
 * kernels.
 *
 * @param cin Input channels.
 * @param cout Output channels.
 * @returns True to use the program.
 */
export function useWebGpuConv(cin: number, cout: number): boolean {
  return !switchedToTfjs && webgpuConvApplies(cin, cout);
}

/**
 * Whether ddpm's convolutions run on {@linkcode webgpuConv2d} with any
 * channel counts, padded with zero channels up to multiples of 4 where they
 * are not (the UNet's one-channel input and output convolutions): on the
 * WebGPU backend, unless `DDPM_WEBGPU_CONV=tfjs`.
 *
 * @returns True to use the program.
 */
export function useWebGpuConvPadded(): boolean {
  return !switchedToTfjs && tf.getBackend() === "webgpu";
}

/**
 * A 2-D convolution (cross-correlation, NHWC) on WebGPU as an implicit
 * GEMM of ours: the input patches are gathered into workgroup memory tile
 * by tile, never materialised. tfjs's own (`Conv2DMMProgram`) runs small
 * 32 x 32 tiles; this runs larger ones with vec4 loads throughout.
 *
 * @param x Input `[N, H, W, Cin]`, Cin a multiple of 4.
 * @param w Kernel `[kh, kw, Cin, Cout]` (with `flip`, `[kh, kw, Cout, Cin]`), Cout a multiple of 4.
 * @param options Stride, top and left padding, output size, bias, flip, tiles.
 * @returns `[N, oh, ow, Cout]`.
 */
export function webgpuConv2d(
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  options: WebGpuConvOptions,
): tf.Tensor4D {
  const [, , , cin] = x.shape;
  const flip = options.flip === true || options.transposed === true;
  const [wc, cout] = flip ? [w.shape[3], w.shape[2]] : [w.shape[2], w.shape[3]];
  if (!webgpuConvApplies(cin, cout) || wc !== cin) {
    throw new RangeError(
      `Cannot convolve on WebGPU: unsupported backend or channels (got backend ${tf.getBackend()}, input channels ${cin}, kernel [${w.shape}], expected webgpu and matching channel counts that are multiples of 4)`,
    );
  }
  const tiles = options.tiles ??
    (cout <= 4 ? NARROW_CONV_TILES : DEFAULT_CONV_TILES);
  checkTiles(tiles);
  const inputs: tf.NamedTensorMap = { x, w };
  if (options.bias !== undefined) inputs.bias = options.bias;
  return tf.engine().runKernel("DdpmConv2D", inputs, {
    stride: options.stride,
    padY: options.padY,
    padX: options.padX,
    oh: options.oh,
    ow: options.ow,
    flip,
    transposed: options.transposed === true,
    tiles: tiles as unknown as tf.NamedAttrMap[string],
  }) as tf.Tensor4D;
}
