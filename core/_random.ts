/**
 * mulberry32, the seeded generator behind every host-side draw (private):
 * the trainer's timesteps here, the data pipeline's shuffles in
 * data/_random.ts.
 *
 * @module
 */

/** mulberry32 (Tommy Ettinger's 32-bit generator): uniform floats in [0, 1) from a 32-bit seed. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
