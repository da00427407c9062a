/**
 * Seeded permutations for epoch shuffling (private).
 *
 * mulberry32 (Tommy Ettinger's 32-bit generator) drives a Fisher-Yates
 * shuffle; each epoch's generator is seeded from (seed, epoch) through the
 * splitmix32 finaliser, so any epoch's order can be rebuilt on its own.
 *
 * @module
 */
import { mulberry32 } from "../core/_random.ts";

/** splitmix32's finaliser: a 32-bit integer hash. */
export function mix32(x: number): number {
  x = (x + 0x9e3779b9) | 0;
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

/** The permutation of 0..n-1 for one epoch: Fisher-Yates under mulberry32(mix(seed, epoch)). */
export function epochPermutation(
  n: number,
  seed: number,
  epoch: number,
): Uint32Array {
  const random = mulberry32(mix32(mix32(seed >>> 0) ^ (epoch >>> 0)));
  const order = new Uint32Array(n);
  for (let i = 0; i < n; i++) order[i] = i;
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    const tmp = order[i];
    order[i] = order[j];
    order[j] = tmp;
  }
  return order;
}
