/**
 * Helpers shared by the tests: seeded numbers (the library's mulberry32,
 * not tfjs's generators), error measures, float64 references, and
 * hand-built IDX bytes.
 *
 * @module
 */
import assert from "node:assert/strict";
import { mulberry32 } from "../core/_random.ts";

/** Seeded uniform floats in [0, 1): the library's mulberry32 (core/_random.ts). */
export { mulberry32 as uniform } from "../core/_random.ts";

/** n seeded uniform floats in [-1, 1). */
export function randoms(n: number, seed: number): Float32Array {
  const u = mulberry32(seed);
  return Float32Array.from({ length: n }, () => u() * 2 - 1);
}

/** max |got - want| / max |want|. */
export function relErr(
  got: ArrayLike<number>,
  want: ArrayLike<number>,
): number {
  assert.equal(got.length, want.length);
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < want.length; i++) {
    diff = Math.max(diff, Math.abs(got[i] - want[i]));
    scale = Math.max(scale, Math.abs(want[i]));
  }
  return diff / scale;
}

/** The values of every float32 tensor of a map, read back, by key. */
export async function readAll(
  m: ReadonlyMap<string, { data(): Promise<unknown> }>,
): Promise<Map<string, Float32Array>> {
  const out = new Map<string, Float32Array>();
  for (const [k, v] of m) out.set(k, await v.data() as Float32Array);
  return out;
}

/** How a child process ended, and what it printed. */
export interface ChildRun {
  code: number;
  signal: Deno.Signal | null;
  stdout: string;
  stderr: string;
}

/**
 * Run `code` with `deno eval` under the project's deno.json in a fresh
 * process (tfjs picks its wasm build, and reads the DDPM_* settings, once
 * per process); killed, and so failed, after `timeoutMs`.
 *
 * @param code The module source.
 * @param env Variables added to this process's environment.
 * @param timeoutMs How long it may run.
 * @returns Its exit code, signal and output.
 */
export async function evalInChild(
  code: string,
  env: Record<string, string> = {},
  timeoutMs = 120_000,
): Promise<ChildRun> {
  const root = new URL("..", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", "--config", `${root}deno.json`, code],
    cwd: root,
    env,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill(), timeoutMs);
  const out = await child.output();
  clearTimeout(timer);
  const text = new TextDecoder();
  return {
    code: out.code,
    signal: out.signal,
    stdout: text.decode(out.stdout),
    stderr: text.decode(out.stderr),
  };
}

/** The last line a child printed, parsed as JSON. */
export function lastJson<T>(stdout: string): T {
  return JSON.parse(stdout.trim().split("\n").pop()!) as T;
}

/**
 * GroupNorm statistics of NHWC `x` in float64, by the definition: for each
 * image and group (image-major), the mean and r = 1 / sqrt(v + eps) with v
 * the biased variance over H, W and the group's channels.
 */
export function groupStatsF64(
  x: ArrayLike<number>,
  shape: readonly number[],
  groups: number,
  eps = 1e-5,
): { mean: number; r: number }[] {
  const [n, h, w, c] = shape;
  const per = c / groups;
  const out: { mean: number; r: number }[] = [];
  for (let i = 0; i < n; i++) {
    for (let g = 0; g < groups; g++) {
      const vals: number[] = [];
      for (let p = 0; p < h * w; p++) {
        for (let k = 0; k < per; k++) {
          vals.push(x[(i * h * w + p) * c + g * per + k]);
        }
      }
      const mean = vals.reduce((a, b) => a + b, 0) / vals.length;
      const v = vals.reduce((a, b) => a + (b - mean) ** 2, 0) / vals.length;
      out.push({ mean, r: 1 / Math.sqrt(v + eps) });
    }
  }
  return out;
}

/** GroupNorm of NHWC `x` in float64: (x - mean) r gamma + beta per channel. */
export function groupNormF64(
  x: ArrayLike<number>,
  shape: readonly number[],
  gamma: ArrayLike<number>,
  beta: ArrayLike<number>,
  groups: number,
  eps = 1e-5,
): Float64Array {
  const [, h, w, c] = shape;
  const per = c / groups;
  const stats = groupStatsF64(x, shape, groups, eps);
  return Float64Array.from({ length: x.length }, (_, j) => {
    const ch = j % c;
    const { mean, r } =
      stats[Math.floor(j / (h * w * c)) * groups + Math.floor(ch / per)];
    return (x[j] - mean) * r * gamma[ch] + beta[ch];
  });
}

/** Big-endian uint32 bytes. */
export function be32(n: number): number[] {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];
}

/** Hand-built IDX bytes: magic 00 00 <type> <rank>, dims, payload bytes. */
export function idx(
  type: number,
  dims: number[],
  payload: number[],
): Uint8Array {
  return new Uint8Array([
    0,
    0,
    type,
    dims.length,
    ...dims.flatMap(be32),
    ...payload,
  ]);
}

/** gzip through the web-standard CompressionStream. */
export async function gzip(bytes: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([bytes as Uint8Array<ArrayBuffer>]).stream()
    .pipeThrough(new CompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/**
 * A safetensors file's tensor bytes: what follows its 8-byte header length
 * and JSON header (which holds, in a checkpoint, the run's elapsed time).
 */
export function safetensorsData(bytes: Uint8Array): Uint8Array {
  const header = new DataView(bytes.buffer, bytes.byteOffset).getUint32(
    0,
    true,
  );
  return bytes.subarray(8 + header);
}

/**
 * A hand-checked case of sums over an NHWC tensor's spatial axes:
 * x[n, h, w, c] = 1000 n + 100 h + 10 w + c of shape [2, 3, 2, 3], and per
 * (n, c) the sum over h (0..2) and w (0..1), 6 (1000 n + c) + 2 * 300 + 3 * 10.
 */
export function spatialSumByHand(): {
  x: number[];
  shape: [number, number, number, number];
  want: number[];
} {
  const shape: [number, number, number, number] = [2, 3, 2, 3];
  const [n, h, w, c] = shape;
  const x: number[] = [];
  for (let a = 0; a < n; a++) {
    for (let b = 0; b < h; b++) {
      for (let d = 0; d < w; d++) {
        for (let e = 0; e < c; e++) x.push(1000 * a + 100 * b + 10 * d + e);
      }
    }
  }
  const want: number[] = [];
  for (let a = 0; a < n; a++) {
    for (let e = 0; e < c; e++) want.push(6 * (1000 * a + e) + 600 + 30);
  }
  return { x, shape, want };
}
