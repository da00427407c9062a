/**
 * Helpers shared by the tests: seeded numbers independent of the library's
 * and tfjs's generators, error measures, and hand-built IDX bytes.
 *
 * @module
 */
import assert from "node:assert/strict";
import { mulberry32 } from "../data/_random.ts";

/** Seeded uniform floats in [0, 1): the data pipeline's mulberry32. */
export { mulberry32 as uniform } from "../data/_random.ts";

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
