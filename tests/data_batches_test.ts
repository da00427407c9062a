import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { ImageBatcher } from "../data/batches.ts";
import type { ImageDataset } from "../data/dataset.ts";
import { resizeBilinearU8 } from "../data/_resize.ts";

await initBackend("cpu");

/** The reference's scaling of a uint8 level: ToTensor (v / 255) then Normalize(0.5, 0.5), in float32. */
const level = (v: number): number =>
  Math.fround(Math.fround(Math.fround(v / 255) - 0.5) / 0.5);

function dataset(
  count: number,
  pixel: (i: number, y: number, x: number) => number,
  size = 28,
): ImageDataset {
  const images = new Uint8Array(count * size * size);
  for (let i = 0; i < count; i++) {
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        images[(i * size + y) * size + x] = pixel(i, y, x);
      }
    }
  }
  return {
    name: "test",
    source: "memory",
    count,
    height: size,
    width: size,
    images,
    labels: Int32Array.from({ length: count }, (_, i) => (i * 3) % 10),
  };
}

/** Image i is constant at level i, so every output pixel names its image. */
const constant = dataset(23, (i) => i * 10);

Deno.test("batches are [B, 32, 32, 1] float32 in [-1, 1], 0 -> -1 and 255 -> 1", async () => {
  const ds = dataset(
    4,
    (i, y, x) => (i === 0 ? 0 : i === 1 ? 255 : (x * 9 + y) % 256),
  );
  const batcher = new ImageBatcher(ds, { batchSize: 4, seed: 3 });
  const batch = batcher.batch(0, 0);
  try {
    assert.deepEqual(batch.images.shape, [4, 32, 32, 1]);
    assert.equal(batch.images.dtype, "float32");
    assert.deepEqual(batch.labels.shape, [4]);
    assert.equal(batch.labels.dtype, "int32");
    const values = await batch.images.data();
    assert.ok(values.every((v) => v >= -1 && v <= 1));
    const per = 32 * 32;
    const order = Array.from(batch.indices);
    const black = order.indexOf(0);
    const white = order.indexOf(1);
    assert.ok(
      values.subarray(black * per, (black + 1) * per).every((v) => v === -1),
    );
    assert.ok(
      values.subarray(white * per, (white + 1) * per).every((v) => v === 1),
    );
    assert.deepEqual(
      Array.from(await batch.labels.data()),
      order.map((i) => ds.labels[i]),
    );
  } finally {
    batch.dispose();
  }
});

Deno.test("bilinear 28 -> 32 matches hand-computed Pillow pixels", () => {
  // Horizontal ramp: pixel (y, x) = 9x. Output column xx centres on
  // (xx + 0.5) * 28/32 - 0.5 in the input:
  //   xx = 0: -0.0625, clamped to 0 (Pillow drops the tap outside) -> 0
  //   xx = 1:  0.8125 -> 9 * 0.8125 = 7.3125 -> 7
  //   xx = 2:  1.6875 -> 9 * 0.3125 + 18 * 0.6875 = 15.1875 -> 15
  //   xx = 16: 13.9375 -> 9 * 13.9375 = 125.4375 -> 125
  //   xx = 31: 27.0625, past the last centre -> 9 * 27 = 243
  // In 22-bit fixed point: 0.1875 -> 786432, 0.8125 -> 3407872 (exact), so
  // xx = 1 is (2^21 + 9 * 3407872) >> 22 = 32768000 >> 22 = 7.
  const ramp = new Uint8Array(28 * 28);
  for (let y = 0; y < 28; y++) {
    for (let x = 0; x < 28; x++) ramp[y * 28 + x] = 9 * x;
  }
  const out = new Uint8Array(32 * 32);
  resizeBilinearU8(ramp, 28, 28, 32, 32, out);
  for (const y of [0, 5, 31]) {
    assert.equal(out[y * 32 + 0], 0);
    assert.equal(out[y * 32 + 1], 7);
    assert.equal(out[y * 32 + 2], 15);
    assert.equal(out[y * 32 + 16], 125);
    assert.equal(out[y * 32 + 31], 243);
  }

  // One pixel of 34 at (1, 1), zeros elsewhere. Output (1, 1) takes rows and
  // columns 0 and 1 with weights 0.1875 and 0.8125. Pillow rounds after each
  // pass: horizontal 34 * 0.8125 = 27.625 -> 28; vertical 28 * 0.8125 =
  // 22.75 -> 23. A single float pass would give 34 * 0.8125^2 = 22.45 -> 22.
  const dot = new Uint8Array(28 * 28);
  dot[1 * 28 + 1] = 34;
  resizeBilinearU8(dot, 28, 28, 32, 32, out);
  assert.equal(out[1 * 32 + 1], 23);
  // Output (0, 0) sees only input (0, 0): 0. Output (1, 2): column 2 centres
  // on 1.6875 -> 34 * 0.3125 = 10.625 -> 11; row 1 -> 11 * 0.8125 = 8.94 -> 9.
  assert.equal(out[0], 0);
  assert.equal(out[1 * 32 + 2], 9);
});

Deno.test("the batcher's bilinear images carry the hand-computed levels into [-1, 1]", async () => {
  const ramp = dataset(1, (_, _y, x) => 9 * x);
  const batch = new ImageBatcher(ramp, { batchSize: 1 }).batch(0, 0);
  try {
    const values = await batch.images.data();
    assert.equal(values[7 * 32 + 1], level(7));
    assert.equal(values[7 * 32 + 2], level(15));
    assert.equal(values[7 * 32 + 31], level(243));
    assert.ok(Math.abs(level(7) - (7 / 127.5 - 1)) < 1e-6);
  } finally {
    batch.dispose();
  }
});

Deno.test("bilinear agrees with tf.image.resizeBilinear(halfPixelCenters) to within Pillow's rounding", async () => {
  // A second implementation: tfjs's float bilinear with half-pixel centres.
  // Pillow rounds to uint8 after each of its two passes, so they may differ
  // by up to 0.5 + 0.5 levels, never more.
  let seed = 12345;
  const random = (): number => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return seed >>> 24;
  };
  const src = Uint8Array.from({ length: 28 * 28 }, random);
  const ours = new Uint8Array(32 * 32);
  resizeBilinearU8(src, 28, 28, 32, 32, ours);
  const theirs = tf.tidy(() =>
    tf.image.resizeBilinear(
      tf.tensor4d(Float32Array.from(src), [1, 28, 28, 1]),
      [32, 32],
      false,
      true,
    )
  );
  const reference = await theirs.data();
  theirs.dispose();
  let worst = 0;
  let total = 0;
  for (let i = 0; i < ours.length; i++) {
    const d = Math.abs(ours[i] - reference[i]);
    worst = Math.max(worst, d);
    total += d;
  }
  assert.ok(worst <= 1 + 1e-4, `worst difference ${worst}`);
  assert.ok(
    total / ours.length < 0.5,
    `mean difference ${total / ours.length}`,
  );
  // Corners copy the corner pixels (edges clamp).
  assert.equal(ours[0], src[0]);
  assert.equal(ours[32 * 32 - 1], src[28 * 28 - 1]);
});

Deno.test("pad centres the 28x28 image on a black 32x32 canvas", async () => {
  const ds = dataset(1, (_, y, x) => (y * 28 + x) % 251 + 1);
  const batch = new ImageBatcher(ds, { batchSize: 1, resize: "pad" }).batch(
    0,
    0,
  );
  try {
    const v = await batch.images.data();
    for (let y = 0; y < 32; y++) {
      for (let x = 0; x < 32; x++) {
        const inside = y >= 2 && y < 30 && x >= 2 && x < 30;
        const expected = inside
          ? level(((y - 2) * 28 + (x - 2)) % 251 + 1)
          : -1;
        assert.equal(v[y * 32 + x], expected, `pixel (${y}, ${x})`);
      }
    }
  } finally {
    batch.dispose();
  }
});

Deno.test("an epoch visits a permutation, drops the last partial batch, and labels follow images", async () => {
  const batcher = new ImageBatcher(constant, { batchSize: 5, seed: 7 });
  assert.equal(batcher.batchesPerEpoch, 4); // 23 images: 4 batches of 5, 3 dropped
  const permutation = batcher.permutation(0);
  assert.deepEqual(
    Array.from(permutation).sort((a, b) => a - b),
    Array.from({ length: 23 }, (_, i) => i),
  );
  const seen: number[] = [];
  let batches = 0;
  for (const batch of batcher.epoch(0)) {
    const v = await batch.images.data();
    const labels = await batch.labels.data();
    for (let n = 0; n < 5; n++) {
      const i = batch.indices[n];
      // Image i is constant 10 i; bilinear keeps a constant image constant.
      const plane = v.subarray(n * 1024, (n + 1) * 1024);
      assert.ok(plane.every((p) => p === level(10 * i)), `image ${i}`);
      assert.equal(labels[n], (i * 3) % 10);
      seen.push(i);
    }
    batches++;
    batch.dispose();
  }
  assert.equal(batches, 4);
  assert.deepEqual(seen, Array.from(permutation.subarray(0, 20)));
  assert.throws(() => batcher.batch(0, 4), RangeError);
});

Deno.test("shuffling is reproducible from (seed, epoch, index) and differs across epochs and seeds", () => {
  const a = new ImageBatcher(constant, { batchSize: 5, seed: 7 });
  const b = new ImageBatcher(constant, { batchSize: 5, seed: 7 });
  const other = new ImageBatcher(constant, { batchSize: 5, seed: 8 });
  assert.deepEqual(a.permutation(0), b.permutation(0));
  assert.deepEqual(a.permutation(5), b.permutation(5));
  assert.notDeepEqual(a.permutation(0), a.permutation(1));
  assert.notDeepEqual(a.permutation(0), other.permutation(0));
  const epochs = new Set(
    Array.from({ length: 10 }, (_, e) => a.permutation(e).join(",")),
  );
  assert.equal(epochs.size, 10);
  // Resuming: a fresh batcher asked for (epoch 3, batch 2) directly gives
  // what one that went through epochs 0..3 in order gives.
  for (let e = 0; e < 3; e++) a.permutation(e);
  const resumed = b.batch(3, 2);
  const inOrder = [...a.epoch(3)];
  try {
    assert.deepEqual(resumed.indices, inOrder[2].indices);
    assert.deepEqual(resumed.images.dataSync(), inOrder[2].images.dataSync());
    const fromStart = [...a.epoch(3, 2)];
    assert.deepEqual(fromStart[0].indices, inOrder[2].indices);
    for (const batch of fromStart) batch.dispose();
  } finally {
    resumed.dispose();
    for (const batch of inOrder) batch.dispose();
  }
});

Deno.test("each batch makes exactly two tensors and dispose frees them", () => {
  const batcher = new ImageBatcher(constant, { batchSize: 4, seed: 1 });
  const before = tf.memory().numTensors;
  for (const batch of batcher.epoch(0)) {
    assert.equal(tf.memory().numTensors, before + 2);
    batch.dispose();
    assert.equal(tf.memory().numTensors, before);
  }
  assert.equal(tf.memory().numTensors, before);
});

Deno.test("the batcher rejects bad sizes and modes with RangeError", () => {
  assert.throws(
    () => new ImageBatcher(constant, { batchSize: 24 }),
    /batchSize out of range \(got 24, expected an integer in \[1, 23\]\)/,
  );
  assert.throws(() => new ImageBatcher(constant, { batchSize: 0 }), RangeError);
  assert.throws(
    () =>
      new ImageBatcher(constant, {
        batchSize: 2,
        resize: "nearest" as unknown as "pad",
      }),
    /unknown resize mode/,
  );
  assert.throws(
    () =>
      new ImageBatcher(constant, {
        batchSize: 2,
        resize: "pad",
        imageSize: 16,
      }),
    /padding cannot shrink images \(got 28x28, expected at most 16x16\)/,
  );
  const ok = new ImageBatcher(constant, { batchSize: 2 });
  assert.throws(() => ok.permutation(-1), RangeError);
});
