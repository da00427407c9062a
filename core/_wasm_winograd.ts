/**
 * The chunk loop of ddpm's Winograd convolution on the wasm backend, shared
 * by the thread that calls it (core/_wasm_kernels.ts) and the helper
 * threads that take chunks beside it in tfjs's threaded build
 * (core/_wasm_helper_worker.ts). Free of tfjs: a helper imports it alone.
 *
 * The calling thread and its helpers meet in one `Int32Array` over a
 * SharedArrayBuffer (the control block, slots named below): the caller
 * writes a job's arguments, bumps `JOB` and wakes the helpers; each
 * thread takes `nt` tiles at a time from `NEXT` until none are left. A
 * helper first claims the job by moving its `TAKEN` slot from the previous
 * job to this one, and when it ends, stores the job in its `DONE` slot.
 * The caller, done with its chunks, moves `TAKEN` itself for each helper
 * that has not claimed the job (a helper that wakes late then skips it),
 * and waits for `DONE` from the others: a helper that has not started,
 * or has died, can never hold the caller up.
 *
 * @module
 */

/**
 * Winograd's input transform of the tiles t0 .. t0 + nt of x `[N, h, w, c]`
 * into v (`wino_in` for the forward product, `wgrad_in` for the weight
 * gradient's; see tests/tools/wasm_kernels.ts).
 */
export type InputTransform = (
  x: number,
  v: number,
  h: number,
  w: number,
  c: number,
  th: number,
  tw: number,
  t0: number,
  nt: number,
) => void;

/** The exports of ddpm's kernels that the chunk loop calls. */
export interface WinogradKernels {
  wino_in: InputTransform;
  wino_gemm(
    v: number,
    u: number,
    m: number,
    nt: number,
    c: number,
    co: number,
  ): void;
  wino_out(
    m: number,
    y: number,
    bias: number,
    nt: number,
    co: number,
    h: number,
    w: number,
    th: number,
    tw: number,
    t0: number,
    hasBias: number,
    ph: number,
    cop: number,
  ): void;
}

/** Control block slots: the job's number, the next tile to take, a failure flag. */
export const JOB = 0;
export const NEXT = 1;
/** Set to 1 when a helper's chunk threw. */
export const FAILED = 2;
/** Most helper threads. */
export const MAX_HELPERS = 8;
/** Per helper i, slot `READY + i`: 1 once it waits for jobs. */
export const READY = 8;
/** Per helper i: the last job it claimed, or that the caller cancelled for it. */
export const TAKEN = 16;
/** Per helper i: the last job it finished. */
export const DONE = 24;
/** Where the job's arguments start ({@linkcode WinogradJob}, in order). */
export const ARGS = 32;
/** Per helper i: how many chunks it has computed (for tests). */
export const CHUNKS = 48;
/** Per helper i, slots `SCRATCH + 2 i` and `+ 1`: its scratch V and M. */
export const SCRATCH = 56;
/** Int32 slots of a control block. */
export const CONTROL_SLOTS = SCRATCH + 2 * MAX_HELPERS;

/** One convolution: heap byte offsets and sizes. */
export interface WinogradJob {
  /** The input `[N, h, w, c]`. */
  x: number;
  /** The transformed kernel `[16, c, co]`. */
  u: number;
  /** The output `[N, h, w, co]`. */
  y: number;
  /** The bias `[co]`, or 0 for none. */
  bias: number;
  c: number;
  co: number;
  h: number;
  w: number;
  /** Tiles per image, down and across. */
  th: number;
  tw: number;
  /** Tiles in all. */
  tiles: number;
  /** Tiles per chunk. */
  nt: number;
  /** 2: depth to space, the output `[N, 2 h, 2 w, co / 4]`; else 1. */
  ph: number;
}

const FIELDS = [
  "x",
  "u",
  "y",
  "bias",
  "c",
  "co",
  "h",
  "w",
  "th",
  "tw",
  "tiles",
  "nt",
  "ph",
] as const;

/** Write a job's arguments into the control block. */
export function writeJob(ctrl: Int32Array, job: WinogradJob): void {
  FIELDS.forEach((f, i) => ctrl[ARGS + i] = job[f]);
}

/** Read them back. */
export function readJob(ctrl: Int32Array): WinogradJob {
  const job = {} as Record<(typeof FIELDS)[number], number>;
  FIELDS.forEach((f, i) => job[f] = ctrl[ARGS + i]);
  return job;
}

/**
 * Compute chunks of the job, taking `nt` tiles at a time from the control
 * block's `NEXT` until every tile is taken, with this thread's scratch.
 *
 * @param k The kernels, on the job's memory.
 * @param job The convolution.
 * @param ctrl The control block (a plain one when computing alone).
 * @param v Scratch for a chunk's transformed input (16 ceil(c / 64) 64 nt floats).
 * @param m Scratch for a chunk's products (16 nt co floats).
 * @param counter A slot of `ctrl` to count this thread's chunks in, if any.
 */
export function runChunks(
  k: WinogradKernels,
  job: WinogradJob,
  ctrl: Int32Array,
  v: number,
  m: number,
  counter = -1,
): void {
  const { nt, tiles } = job;
  for (;;) {
    const t0 = Atomics.add(ctrl, NEXT, nt);
    if (t0 >= tiles) return;
    const len = Math.min(nt, tiles - t0);
    if (counter >= 0) ctrl[counter]++;
    k.wino_in(job.x, v, job.h, job.w, job.c, job.th, job.tw, t0, len);
    k.wino_gemm(v, job.u, m, len, job.c, job.co);
    k.wino_out(
      m,
      job.y,
      job.bias,
      len,
      job.co,
      job.h,
      job.w,
      job.th,
      job.tw,
      t0,
      job.bias === 0 ? 0 : 1,
      job.ph,
      job.co / (job.ph * job.ph),
    );
  }
}
