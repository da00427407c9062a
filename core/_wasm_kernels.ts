/**
 * ddpm's own kernels on the wasm backend (assembled by
 * tests/tools/wasm_kernels.ts), working in tfjs's own wasm memory and
 * registered as tfjs kernels:
 *
 * - 3 x 3, stride-1 convolutions, forward and for the input gradient, by
 *   Winograd's F(2x2, 3x3), and their weight gradient by F(3x3, 2x2):
 *   2.2-2.9x XNNPACK's direct convolution and ddpm's direct weight
 *   gradient on one core; with tfjs's threaded build, the forward one on
 *   helper threads too (core/_wasm_winograd.ts). The UNet's upsampling
 *   (4 x 4, stride 2, transposed) is one such convolution with its four
 *   phases side by side (core/_conv.ts);
 * - the weight gradient of other convolutions, 2-3x faster than tfjs's way of
 *   computing it, a convolution over the batch axis (XNNPACK, 11-23 GFLOP/s
 *   against 28-39 on the 2-core development machine); strided ones are cut
 *   into stride-1 phases by core/_conv.ts;
 * - GroupNorm's statistics, and its application with SiLU, one pass each
 *   where tfjs's composite makes about a dozen ops;
 * - GroupNorm(+ SiLU)'s gradient, two passes that recompute the normalised
 *   input and SiLU's factor instead of keeping a dozen full-size tensors;
 * - AdamW's and the EMA's update of a parameter, one SIMD pass each, the
 *   same float32 operations in the same order as core/optim.ts's and
 *   core/ema.ts's tfjs ops.
 *
 * For the weight gradient, the input and the output gradient are laid on
 * the input's padded grid `[N, H + 2 pad, W + 2 pad, C]` (the gradient at
 * the top left of each image, zeros below and to the right), where the
 * kernel tap (i, j) is the constant shift `i (W + 2 pad) + j` of the
 * flattened pixel index: pixels a tap would take from outside the image
 * meet zeros, and the zeros of the gradient cancel what a shift carries
 * over from the next row or image.
 *
 * The kernels need WebAssembly's relaxed SIMD (Chrome 114, Firefox 120,
 * Deno 1.35 and later) and tfjs's memory object; without either, or with
 * DDPM_WASM_KERNELS=0, the caller is told to use tfjs's way.
 *
 * @module
 */
import { tf } from "./backend.ts";
import { kernelBytes } from "./_wasm_kernels_bin.ts";
import {
  CHUNKS,
  CONTROL_SLOTS,
  DONE,
  FAILED,
  type InputTransform,
  JOB,
  MAX_HELPERS,
  NEXT,
  READY,
  runChunks,
  SCRATCH,
  TAKEN,
  type WinogradJob,
  type WinogradKernels,
  writeJob,
} from "./_wasm_winograd.ts";
import { wasmThreads } from "./wasm_threads.ts";
import workerThreads from "node:worker_threads";
// Also replaces tfjs's wasm Slice, SplitV and Unpack (see that module).
import {
  heapOffset,
  type WasmBackendLike,
  wasmKernelsSwitchedOff,
} from "./_wasm_slice.ts";

/** The exports of ddpm's wasm kernels. */
interface Kernels extends WinogradKernels {
  wgrad_in: InputTransform;
  wgrad_dy(
    dy: number,
    d: number,
    h: number,
    w: number,
    co: number,
    th: number,
    tw: number,
    t0: number,
    nt: number,
  ): void;
  wgrad_gemm(
    v: number,
    d: number,
    m: number,
    nt: number,
    c: number,
    co: number,
  ): void;
  wgrad_out(m: number, dw: number, c: number, co: number): void;
  wino_u(w: number, u: number, ci: number, co: number, flip: number): void;
  adamw(
    p: number,
    m: number,
    v: number,
    g: number,
    p2: number,
    m2: number,
    v2: number,
    n: number,
    decay: number,
    om1: number,
    b2: number,
    om2: number,
    bc2: number,
    eps: number,
    ss: number,
    decays: number,
  ): void;
  ema(e: number, p: number, out: number, n: number, c: number): void;
  filter_grad(
    x: number,
    dy: number,
    out: number,
    q: number,
    ci: number,
    co: number,
    kh: number,
    kw: number,
    wp: number,
    pc: number,
  ): void;
  norm_stats(
    x: number,
    mean: number,
    r: number,
    n: number,
    hw: number,
    c: number,
    groups: number,
    eps: number,
  ): void;
  norm_act(
    x: number,
    mean: number,
    r: number,
    gamma: number,
    beta: number,
    out: number,
    n: number,
    hw: number,
    c: number,
    act: number,
  ): void;
  norm_grad_sums(
    x: number,
    mean: number,
    r: number,
    gamma: number,
    beta: number,
    dz: number,
    sdy: number,
    sdyx: number,
    n: number,
    hw: number,
    c: number,
    act: number,
  ): void;
  norm_grad_dx(
    x: number,
    mean: number,
    r: number,
    gamma: number,
    beta: number,
    dz: number,
    ra: number,
    rb: number,
    out: number,
    n: number,
    hw: number,
    c: number,
    act: number,
  ): void;
}

/** Our kernels per tfjs wasm module (null: they cannot run there). */
const instances = new WeakMap<object, Kernels | null>();

/** Our kernels, instantiated on the memory of the backend's wasm module. */
function kernelsOf(backend: WasmBackendLike): Kernels | null {
  const mod = backend.wasm;
  if (instances.has(mod)) return instances.get(mod)!;
  let kernels: Kernels | null = null;
  const memory = mod.wasmMemory ?? mod.asm?.memory;
  if (memory instanceof WebAssembly.Memory && !wasmKernelsSwitchedOff()) {
    const shared = typeof SharedArrayBuffer !== "undefined" &&
      memory.buffer instanceof SharedArrayBuffer;
    const bytes = kernelBytes(shared);
    // Invalid where relaxed SIMD is not supported.
    if (WebAssembly.validate(bytes)) {
      try {
        const instance = new WebAssembly.Instance(
          new WebAssembly.Module(bytes),
          { env: { memory } },
        );
        kernels = instance.exports as unknown as Kernels;
      } catch {
        kernels = null;
      }
    }
  }
  instances.set(mod, kernels);
  return kernels;
}

/** Pixels per chunk: a chunk of both operands, about 256 KB, stays in L2. */
function chunkPixels(ci: number, co: number): number {
  return Math.max(64, Math.min(1024, Math.floor(65536 / (ci + co))));
}

/** Register a wasm kernel of ours that calls `run` with the backend, our exports and a byte-offset lookup. */
function register(
  kernelName: string,
  run: (
    b: WasmBackendLike,
    k: Kernels,
    inputs: Record<string, tf.TensorInfo>,
    attrs: Record<string, number>,
    at: (t: tf.TensorInfo) => number,
  ) => tf.TensorInfo | tf.TensorInfo[],
): void {
  tf.registerKernel({
    kernelName,
    backendName: "wasm",
    kernelFunc: ({ inputs, backend, attrs }) => {
      const b = backend as unknown as WasmBackendLike;
      const at = (t: tf.TensorInfo) => heapOffset(b, t);
      return run(
        b,
        kernelsOf(b)!,
        inputs as Record<string, tf.TensorInfo>,
        (attrs ?? {}) as Record<string, number>,
        at,
      );
    },
  });
}

register("DdpmFilterGrad", (b, k, { x, dy }, { kh, kw }, at) => {
  const [n, hp, wp, ci] = x.shape;
  const co = dy.shape[3];
  const out = b.makeOutput([kh, kw, ci, co], "float32");
  k.filter_grad(
    at(x),
    at(dy),
    at(out),
    n * hp * wp,
    ci,
    co,
    kh,
    kw,
    wp,
    chunkPixels(ci, co),
  );
  return out;
});

/** Input channels per block of Winograd's transformed input (tests/tools/wasm_kernels.ts). */
export const WINO_KC = 64;

/**
 * Tiles per chunk: its transformed input and products, at most about 384
 * KB, stay in L2. The count is 6 more than a multiple of 12 (whole blocks
 * of the 6-row micro-kernel, and never a multiple of 4): the 16 points'
 * panels of the transformed input lie `nt` 256-byte rows apart, and at a
 * multiple of 16 rows they fall 4 KB apart, where the CPU's caches alias
 * them (48 tiles ran at 72 GFLOP/s where 42 and 54 ran at 84, base 64).
 */
export function winogradChunk(c: number, co: number): number {
  const kc = Math.ceil(c / WINO_KC) * WINO_KC;
  return Math.max(6, 12 * Math.floor((6144 / (kc + co) - 6) / 12) + 6);
}

/** Helper threads of the Winograd convolution, and their control block. */
interface Helpers {
  ctrl: Int32Array;
  count: number;
}

/** Helpers per tfjs wasm module (null: none, the build is single-threaded). */
const helperPools = new WeakMap<object, Helpers | null>();

/**
 * The helper threads for the backend's module: in tfjs's threaded build,
 * one fewer than its threads, started on first use (they take chunks once
 * they have started; until then the caller computes alone).
 */
function helpersOf(b: WasmBackendLike): Helpers | null {
  const mod = b.wasm;
  if (helperPools.has(mod)) return helperPools.get(mod)!;
  let pool: Helpers | null = null;
  const memory = mod.wasmMemory;
  const count = Math.min(wasmThreads(), MAX_HELPERS + 1) - 1;
  if (
    count > 0 && memory instanceof WebAssembly.Memory &&
    memory.buffer instanceof SharedArrayBuffer
  ) {
    try {
      const ctrl = new Int32Array(
        new SharedArrayBuffer(4 * CONTROL_SLOTS),
      );
      for (let i = 0; i < count; i++) {
        const worker = new workerThreads.Worker(
          new URL("./_wasm_helper_worker.ts", import.meta.url),
        );
        worker.postMessage({ memory, ctrl: ctrl.buffer, index: i });
        // A helper that fails to start (its file missing from a bundle, say)
        // never becomes ready, and the caller computes without it.
        worker.on("error", () => {});
        worker.unref();
      }
      pool = { ctrl, count };
    } catch {
      pool = null;
    }
  }
  helperPools.set(mod, pool);
  return pool;
}

/**
 * Chunks of Winograd convolutions that helper threads have computed on the
 * active wasm backend so far (0 without helpers): for tests.
 *
 * @returns The count.
 */
export function winogradHelperChunks(): number {
  const pool = helperPools.get(
    (tf.backend() as unknown as WasmBackendLike).wasm,
  );
  let sum = 0;
  for (let i = 0; i < (pool?.count ?? 0); i++) {
    sum += Atomics.load(pool!.ctrl, CHUNKS + i);
  }
  return sum;
}

/** Block until `ctrl[slot]` is `value` (spinning where this thread may not wait). */
function waitFor(ctrl: Int32Array, slot: number, value: number): void {
  for (;;) {
    const now = Atomics.load(ctrl, slot);
    if (now === value) return;
    try {
      Atomics.wait(ctrl, slot, now, 100);
    } catch {
      // A browser's main thread: spin.
    }
  }
}

/**
 * Run a job with the helpers: post it with each helper's scratch (V, M
 * offsets in turn), compute chunks here with `own`, then cancel the job for
 * the helpers that have not claimed it and wait for those that have.
 */
function runWithHelpers(
  helpers: Helpers,
  job: WinogradJob,
  scratch: number[],
  own: () => void,
): void {
  const ctrl = helpers.ctrl;
  writeJob(ctrl, job);
  for (let i = 0; i < 2 * helpers.count; i++) ctrl[SCRATCH + i] = scratch[i];
  Atomics.store(ctrl, NEXT, 0);
  const id = Atomics.load(ctrl, JOB) + 1;
  // Helpers not started yet sit this job out.
  const started: number[] = [];
  for (let i = 0; i < helpers.count; i++) {
    if (Atomics.load(ctrl, READY + i) === 1) started.push(i);
    else Atomics.store(ctrl, TAKEN + i, id);
  }
  Atomics.store(ctrl, JOB, id);
  Atomics.notify(ctrl, JOB);
  own();
  for (const i of started) {
    if (Atomics.compareExchange(ctrl, TAKEN + i, id - 1, id) !== id - 1) {
      waitFor(ctrl, DONE + i, id);
    }
  }
  if (Atomics.exchange(ctrl, FAILED, 0) !== 0) {
    throw new Error("a Winograd helper thread failed");
  }
}

register(
  "DdpmWinograd",
  (b, k, { x, w: kernel, bias }, { nt: ntAttr, ph, flip }, at) => {
    const [n, h, w, c] = x.shape;
    // Flipped: the kernel is [3, 3, co, c].
    const co = kernel.shape[flip ? 2 : 3];
    const th = Math.ceil(h / 2);
    const tw = Math.ceil(w / 2);
    const tiles = n * th * tw;
    const nt = Math.min(ntAttr || winogradChunk(c, co), tiles);
    const kc = Math.ceil(c / WINO_KC) * WINO_KC;
    const helpers = tiles > nt ? helpersOf(b) : null;
    const threads = 1 + (helpers?.count ?? 0);
    const out = b.makeOutput([n, ph * h, ph * w, co / (ph * ph)], "float32");
    const u = b.makeOutput([16, c, co], "float32");
    const scratch: tf.TensorInfo[] = [u];
    for (let i = 0; i < threads; i++) {
      scratch.push(
        b.makeOutput([16 * kc * nt], "float32"),
        b.makeOutput([16 * nt * co], "float32"),
      );
    }
    // Offsets after every allocation (the heap may have grown).
    const job: WinogradJob = {
      x: at(x),
      u: at(u),
      y: at(out),
      bias: bias === undefined ? 0 : at(bias),
      c,
      co,
      h,
      w,
      th,
      tw,
      tiles,
      nt,
      ph,
    };
    try {
      k.wino_u(at(kernel), job.u, c, co, flip);
      const [v, m] = [at(scratch[1]), at(scratch[2])];
      if (helpers === null) {
        runChunks(k, job, new Int32Array(CONTROL_SLOTS), v, m);
      } else {
        runWithHelpers(
          helpers,
          job,
          scratch.slice(3).map(at),
          () => runChunks(k, job, helpers.ctrl, v, m),
        );
      }
    } finally {
      for (const t of scratch) b.disposeData(t.dataId);
    }
    return out;
  },
);

/**
 * Tiles per chunk of the Winograd weight gradient: both transforms, about
 * 512 KB, 6 more than a multiple of 12 for the reason given at
 * {@linkcode winogradChunk} (48 tiles ran 10-20% slower than 42 or 54).
 */
export function winogradGradChunk(c: number, co: number): number {
  const fit = 12 * Math.floor((8192 / (c + co) - 6) / 12) + 6;
  return Math.max(30, Math.min(234, fit));
}

register("DdpmWinogradGrad", (b, k, { x, dy }, { nt: ntAttr }, at) => {
  const [n, h, w, c] = x.shape;
  const co = dy.shape[3];
  const th = Math.ceil(h / 2);
  const tw = Math.ceil(w / 2);
  const tiles = n * th * tw;
  const nt = Math.min(ntAttr || winogradGradChunk(c, co), tiles);
  const out = b.makeOutput([3, 3, c, co], "float32");
  const scratch = [
    b.makeOutput([16 * nt * c], "float32"),
    b.makeOutput([16 * nt * co], "float32"),
    b.makeOutput([16 * c * co], "float32"),
  ];
  const [px, pdy, pw] = [x, dy, out].map(at);
  const [pv, pd, pm] = scratch.map(at);
  b.wasm.HEAPU8.fill(0, pm, pm + 64 * c * co);
  for (let t0 = 0; t0 < tiles; t0 += nt) {
    const len = Math.min(nt, tiles - t0);
    k.wgrad_in(px, pv, h, w, c, th, tw, t0, len);
    k.wgrad_dy(pdy, pd, 2 * th, 2 * tw, co, th, tw, t0, len);
    k.wgrad_gemm(pv, pd, pm, len, c, co);
  }
  k.wgrad_out(pm, pw, c, co);
  for (const t of scratch) b.disposeData(t.dataId);
  return out;
});

/** Options of {@linkcode wasmConv3x3}. */
export interface Conv3x3Options {
  /** `[Cout]`, added to every output pixel. */
  bias?: tf.Tensor;
  /**
   * Convolve with the kernel turned by 180 degrees and its channel axes
   * swapped: the input gradient of `conv2d(., w, 1, 1)`, given w.
   */
  flip?: boolean;
  /** Tiles per chunk (0: sized for L2; for tests and tuning). */
  nt?: number;
  /**
   * Depth to space: the output's channels are four phases of Cout / 4, laid
   * out as `tf.depthToSpace(y, 2)` would, `[N, 2 H, 2 W, Cout / 4]`
   * (Cout a multiple of 16).
   */
  depthToSpace?: boolean;
}

/**
 * `conv2d(x, w, 1, 1) (+ bias)` for a 3 x 3 kernel on the wasm backend, by
 * Winograd's F(2x2, 3x3) (Lavin and Gray 2016): 2.25x fewer multiplies
 * than the direct convolution, at a rounding error of the same order
 * (every transform's coefficients are 0, +-1/2 and +-1). Null where it does
 * not apply (another backend, Cin not a multiple of 4, Cout not a multiple
 * of 8, no relaxed SIMD), for the caller to use tfjs's.
 *
 * @param x Input `[N, H, W, Cin]`.
 * @param w Kernel `[3, 3, Cin, Cout]` (`[3, 3, Cout, Cin]` when flipped).
 * @param options Bias, flip, chunk size.
 * @returns `[N, H, W, Cout]` (`[N, 2 H, 2 W, Cout / 4]` with depth to space), or null.
 */
export function wasmConv3x3(
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  { bias, flip = false, nt = 0, depthToSpace = false }: Conv3x3Options = {},
): tf.Tensor4D | null {
  const [kh, kw] = w.shape;
  // Flipped: w is [3, 3, Cout, Cin].
  const [ci, co] = flip ? [w.shape[3], w.shape[2]] : [w.shape[2], w.shape[3]];
  if (
    kh !== 3 || kw !== 3 || ci % 4 !== 0 ||
    co % (depthToSpace ? 16 : 8) !== 0 ||
    x.size === 0 ||
    !wasmKernelsReady()
  ) return null;
  const inputs: Record<string, tf.Tensor> = { x, w };
  if (bias !== undefined) inputs.bias = bias;
  return tf.engine().runKernel("DdpmWinograd", inputs, {
    nt,
    ph: depthToSpace ? 2 : 1,
    flip: flip ? 1 : 0,
  }) as tf.Tensor4D;
}

register("DdpmNormStats", (b, k, { x }, { groups, eps }, at) => {
  const [n, h, w, c] = x.shape;
  const mean = b.makeOutput([n, 1, 1, c], "float32");
  const r = b.makeOutput([n, 1, 1, c], "float32");
  k.norm_stats(at(x), at(mean), at(r), n, h * w, c, groups, eps);
  return [mean, r];
});

register("DdpmNormAct", (b, k, { x, mean, r, gamma, beta }, { act }, at) => {
  const [n, h, w, c] = x.shape;
  const out = b.makeOutput(x.shape, "float32");
  k.norm_act(
    at(x),
    at(mean),
    at(r),
    at(gamma),
    at(beta),
    at(out),
    n,
    h * w,
    c,
    act,
  );
  return out;
});

register(
  "DdpmNormGradSums",
  (b, k, { x, mean, r, gamma, beta, dz }, { act }, at) => {
    const [n, h, w, c] = x.shape;
    const sdy = b.makeOutput([n, 1, 1, c], "float32");
    const sdyx = b.makeOutput([n, 1, 1, c], "float32");
    k.norm_grad_sums(
      at(x),
      at(mean),
      at(r),
      at(gamma),
      at(beta),
      at(dz),
      at(sdy),
      at(sdyx),
      n,
      h * w,
      c,
      act,
    );
    return [sdy, sdyx];
  },
);

register(
  "DdpmNormGradDx",
  (b, k, { x, mean, r, gamma, beta, dz, ra, rb }, { act }, at) => {
    const [n, h, w, c] = x.shape;
    const out = b.makeOutput(x.shape, "float32");
    k.norm_grad_dx(
      at(x),
      at(mean),
      at(r),
      at(gamma),
      at(beta),
      at(dz),
      at(ra),
      at(rb),
      at(out),
      n,
      h * w,
      c,
      act,
    );
    return out;
  },
);

/**
 * Whether ddpm's own WebAssembly kernels run on the active backend: it is
 * wasm, the runtime has relaxed SIMD, and DDPM_WASM_KERNELS is not 0.
 * Elsewhere tfjs's ops compute the same values, more slowly.
 *
 * @returns True when they do.
 * @example
 * ```ts
 * import { initBackend } from "../mod.ts";
 * import { wasmKernelsReady } from "./_wasm_kernels.ts";
 * await initBackend("wasm");
 * console.log(wasmKernelsReady()); // true in Deno, Chrome 114+, Firefox 120+
 * ```
 */
export function wasmKernelsReady(): boolean {
  return tf.getBackend() === "wasm" &&
    kernelsOf(tf.backend() as unknown as WasmBackendLike) !== null;
}

/**
 * The gradient of `conv2d(input, w, 1, pad)` with respect to its `[kh, kw,
 * Cin, Cout]` kernel, given the gradient `dy` of its output, on the wasm
 * backend; null where our kernel does not apply (another backend, Cout not
 * a multiple of 8, no relaxed SIMD), for the caller to compute it another way.
 *
 * @param input The convolution's input `[N, H, W, Cin]`.
 * @param dy The gradient of its output `[N, H + 2 pad - kh + 1, W + 2 pad - kw + 1, Cout]`.
 * @param kh Kernel height.
 * @param kw Kernel width.
 * @param pad Zero pixels on each side.
 * @returns dW `[kh, kw, Cin, Cout]`, or null.
 */
export function wasmFilterGrad(
  input: tf.Tensor4D,
  dy: tf.Tensor4D,
  kh: number,
  kw: number,
  pad: number,
): tf.Tensor4D | null {
  if (dy.shape[3] % 8 !== 0 || !wasmKernelsReady()) return null;
  if (kh === 3 && kw === 3 && pad === 1 && input.shape[3] % 4 === 0) {
    return wasmConv3x3FilterGrad(input, dy);
  }
  return tf.tidy(() => {
    const x = pad > 0
      ? tf.pad(input, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
      : input;
    const g = kh > 1 || kw > 1
      ? tf.pad(dy, [[0, 0], [0, kh - 1], [0, kw - 1], [0, 0]])
      : dy;
    return tf.engine().runKernel("DdpmFilterGrad", { x, dy: g }, {
      kh,
      kw,
    }) as tf.Tensor4D;
  });
}

/**
 * The gradient of `conv2d(input, w, 1, 1)` with respect to its `[3, 3,
 * Cin, Cout]` kernel by Winograd's F(3x3, 2x2) (see
 * tests/tools/wasm_kernels.ts), for Cin a multiple of 4 and Cout of 8 on
 * the wasm backend (the caller checks).
 *
 * @param input The convolution's input `[N, H, W, Cin]`.
 * @param dy The gradient of its output `[N, H, W, Cout]`.
 * @param nt Tiles per chunk (0: sized for L2; for tests and tuning).
 * @returns dW `[3, 3, Cin, Cout]`.
 */
export function wasmConv3x3FilterGrad(
  input: tf.Tensor4D,
  dy: tf.Tensor4D,
  nt = 0,
): tf.Tensor4D {
  return tf.tidy(() => {
    const [, h, w] = input.shape;
    const [oddH, oddW] = [h % 2, w % 2];
    // The output gradient in whole tiles (zeros add nothing).
    const g = oddH + oddW > 0
      ? tf.pad(dy, [[0, 0], [0, oddH], [0, oddW], [0, 0]])
      : dy;
    return tf.engine().runKernel("DdpmWinogradGrad", { x: input, dy: g }, {
      nt,
    }) as tf.Tensor4D;
  });
}

/** AdamW's coefficients, JS numbers (each becomes a float32 as a tfjs scalar would). */
export interface AdamWCoefficients {
  /** `1 - lr weightDecay`, or 1 for none (the multiply is then skipped). */
  decay: number;
  beta1: number;
  beta2: number;
  /** `sqrt(1 - beta2^t)`. */
  biasCorrection2Sqrt: number;
  eps: number;
  /** `lr / (1 - beta1^t)`. */
  stepSize: number;
}

register("DdpmAdamW", (b, k, { p, m, v, g }, attrs, at) => {
  const c = attrs as unknown as AdamWCoefficients;
  const outs = [0, 1, 2].map(() => b.makeOutput(p.shape, "float32"));
  const [pp, pm, pv, pg, p2, m2, v2] = [p, m, v, g, ...outs].map(at);
  k.adamw(
    pp,
    pm,
    pv,
    pg,
    p2,
    m2,
    v2,
    tf.util.sizeFromShape(p.shape),
    c.decay,
    1 - c.beta1,
    c.beta2,
    1 - c.beta2,
    c.biasCorrection2Sqrt,
    c.eps,
    c.stepSize,
    c.decay === 1 ? 0 : 1,
  );
  return outs;
});

register("DdpmEmaStep", (b, k, { e, p }, { oneMinusDecay }, at) => {
  const out = b.makeOutput(e.shape, "float32");
  k.ema(at(e), at(p), at(out), tf.util.sizeFromShape(e.shape), oneMinusDecay);
  return out;
});

/** Whether the update kernels below apply: ddpm's wasm kernels run, float32. */
function updateApplies(...ts: tf.Tensor[]): boolean {
  return ts.every((t) => t.dtype === "float32") && wasmKernelsReady();
}

/**
 * One parameter's AdamW update on the wasm backend in one kernel of ddpm's
 * (SIMD, four elements at a time) instead of about 14 tfjs ops and their
 * scalar uploads, with the same float32 results as core/optim.ts's tfjs ops
 * (the same operations in the same order, none fused); null elsewhere
 * (another backend, another dtype, DDPM_WASM_KERNELS=0).
 *
 * @param p The parameter.
 * @param m Its first moment.
 * @param v Its second moment.
 * @param g Its gradient.
 * @param c The step's coefficients.
 * @returns `[p, m, v]` after the step, or null.
 */
export function wasmAdamW(
  p: tf.Tensor,
  m: tf.Tensor,
  v: tf.Tensor,
  g: tf.Tensor,
  c: AdamWCoefficients,
): [tf.Tensor, tf.Tensor, tf.Tensor] | null {
  if (!updateApplies(p, m, v, g)) return null;
  return tf.engine().runKernel(
    "DdpmAdamW",
    { p, m, v, g },
    c as unknown as tf.NamedAttrMap,
  ) as unknown as [tf.Tensor, tf.Tensor, tf.Tensor];
}

/**
 * One average's EMA update `e - (e - p) (1 - d)` on the wasm backend in one
 * kernel instead of three tfjs ops, with their float32 results; null
 * elsewhere.
 *
 * @param e The average.
 * @param p The parameter.
 * @param oneMinusDecay `1 - d`.
 * @returns The new average, or null.
 */
export function wasmEmaStep(
  e: tf.Tensor,
  p: tf.Tensor,
  oneMinusDecay: number,
): tf.Tensor | null {
  if (!updateApplies(e, p)) return null;
  return tf.engine().runKernel("DdpmEmaStep", { e, p }, {
    oneMinusDecay,
  }) as tf.Tensor;
}

/** Whether the GroupNorm kernels take x: non-empty, C a multiple of 4, on wasm. */
function normApplies(x: tf.Tensor4D): boolean {
  return x.shape[3] % 4 === 0 && x.size > 0 && wasmKernelsReady();
}

/**
 * GroupNorm's per-(image, group) mean and r = 1 / sqrt(biased variance +
 * eps), broadcast to `[N, 1, 1, C]`, on the wasm backend; null where our
 * kernel does not apply (another backend, C not a multiple of 4).
 *
 * @param x `[N, H, W, C]`, C divisible by `groups`.
 * @param groups Number of groups.
 * @param eps Added to the variance.
 * @returns `[mean, r]`, or null.
 */
export function wasmNormStats(
  x: tf.Tensor4D,
  groups: number,
  eps: number,
): [tf.Tensor4D, tf.Tensor4D] | null {
  if (!normApplies(x)) return null;
  const [mean, r] = tf.engine().runKernel(
    "DdpmNormStats",
    { x },
    { groups, eps },
  ) as tf.Tensor4D[];
  return [mean, r];
}

/**
 * `(x - mean) (r gamma) + beta`, and its SiLU when `act`, on the wasm
 * backend; null where our kernel does not apply.
 *
 * @param x `[N, H, W, C]`.
 * @param mean Per-(image, channel) means `[N, 1, 1, C]`.
 * @param r Per-(image, channel) 1 / std `[N, 1, 1, C]`.
 * @param gamma Per-channel scale `[C]`.
 * @param beta Per-channel shift `[C]`.
 * @param act Whether SiLU follows.
 * @returns `[N, H, W, C]`, or null.
 */
export function wasmNormAct(
  x: tf.Tensor4D,
  mean: tf.Tensor,
  r: tf.Tensor,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  act: boolean,
): tf.Tensor4D | null {
  if (!normApplies(x)) return null;
  return tf.engine().runKernel(
    "DdpmNormAct",
    { x, mean, r, gamma, beta },
    { act: act ? 1 : 0 },
  ) as tf.Tensor4D;
}

/** The tensors GroupNorm(+ SiLU)'s gradient kernels read. */
export interface NormGradInputs {
  /** The norm's input `[N, H, W, C]`. */
  x: tf.Tensor4D;
  /** Its statistics, `[N, 1, 1, C]` each. */
  mean: tf.Tensor;
  r: tf.Tensor;
  /** Per-channel scale and shift `[C]`. */
  gamma: tf.Tensor;
  beta: tf.Tensor;
  /** The gradient of the norm's output. */
  dz: tf.Tensor4D;
}

/**
 * The first pass of GroupNorm(+ SiLU)'s gradient on the wasm backend: per
 * image and channel, the sums over pixels of dy and dy xhat (dy the
 * gradient reaching the norm's output, through SiLU when `act`; xhat the
 * normalised input); null where our kernels do not apply.
 *
 * @param t The norm's input, statistics, weights and output gradient.
 * @param act Whether SiLU follows the norm.
 * @returns `[sum dy, sum dy xhat]`, `[N, 1, 1, C]` each, or null.
 */
export function wasmNormGradSums(
  t: NormGradInputs,
  act: boolean,
): [tf.Tensor4D, tf.Tensor4D] | null {
  if (!normApplies(t.x)) return null;
  const [sdy, sdyx] = tf.engine().runKernel(
    "DdpmNormGradSums",
    { ...t },
    { act: act ? 1 : 0 },
  ) as tf.Tensor4D[];
  return [sdy, sdyx];
}

/**
 * The second pass: dx = dy (r gamma) - xhat rb - ra, on the wasm backend
 * (call after {@linkcode wasmNormGradSums} said it applies).
 *
 * @param t The norm's input, statistics, weights and output gradient.
 * @param ra Per image and channel `[N, 1, 1, C]`.
 * @param rb Per image and channel `[N, 1, 1, C]`.
 * @param act Whether SiLU follows the norm.
 * @returns dx `[N, H, W, C]`.
 */
export function wasmNormGradDx(
  t: NormGradInputs,
  ra: tf.Tensor,
  rb: tf.Tensor,
  act: boolean,
): tf.Tensor4D {
  return tf.engine().runKernel(
    "DdpmNormGradDx",
    { ...t, ra, rb },
    { act: act ? 1 : 0 },
  ) as tf.Tensor4D;
}
