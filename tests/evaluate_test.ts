import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { DigitClassifier } from "../core/classifier.ts";
import { evaluateSamples } from "../core/evaluate.ts";
import { featureMoments, frechetDistance } from "../core/frechet.ts";
import { holdoutSplit, spreadImages } from "../data/holdout.ts";
import { loadMnistLite } from "../data/mnist_lite.ts";

await initBackend("wasm");

const { train, heldOut } = holdoutSplit(await loadMnistLite());
const classifier = await DigitClassifier.load();

const N = 400;

Deno.test("evaluateSamples scores real digits near the floor and noise far above it", async () => {
  const before = tf.memory().numTensors;
  const real = spreadImages(heldOut, 2 * N);
  const digits = spreadImages(train, N);
  const noise = tf.tidy(() =>
    tf.clipByValue(tf.randomNormal([N, 32, 32, 1], 0, 1, "float32", 7), -1, 1)
  ) as tf.Tensor4D;
  const onDigits = await evaluateSamples(digits, real, { classifier });
  const onNoise = await evaluateSamples(noise, real, { classifier });
  tf.dispose([real, digits, noise]);
  assert.equal(tf.memory().numTensors, before);
  // The floor does not depend on the samples.
  assert.equal(onDigits.floor, onNoise.floor);
  assert.ok(onDigits.floor > 0);
  // Training digits against held-out ones: as close as two real sets are
  // (measured 0.7x to 0.9x the floor at N = 1000 and 2000), and clipped
  // noise some 600x the floor at N = 1000.
  assert.ok(
    onDigits.distance < 2 * onDigits.floor,
    `real ${onDigits.distance} vs floor ${onDigits.floor}`,
  );
  assert.ok(
    onNoise.distance > 100 * onNoise.floor,
    `noise ${onNoise.distance} vs floor ${onNoise.floor}`,
  );
  // Confident on digits. (Not a quality measure on its own: this small
  // classifier calls clipped noise an 8 with confidence 1.0.)
  assert.ok(onDigits.meanConfidence > 0.95, `${onDigits.meanConfidence}`);
});

Deno.test("evaluateSamples' class histogram counts the classifier's votes on real digits", async () => {
  // 400 training digits spread evenly: their labels, counted independently.
  const digits = spreadImages(train, N);
  const real = spreadImages(heldOut, 2 * N);
  const r = await evaluateSamples(digits, real, { classifier });
  tf.dispose([digits, real]);
  const labels = new Array(10).fill(0);
  for (let i = 0; i < N; i++) {
    labels[train.labels[Math.floor(i * train.count / N)]]++;
  }
  assert.equal(r.classHistogram.reduce((a, b) => a + b, 0), N);
  // A classifier right 99% of the time moves at most a few votes.
  const moved = r.classHistogram.reduce(
    (s, c, k) => s + Math.abs(c - labels[k]),
    0,
  );
  assert.ok(
    moved <= 2 * 0.02 * N,
    `histogram ${r.classHistogram} vs labels ${labels}`,
  );
});

Deno.test("evaluateSamples gives 0 when the samples are the reference images themselves", async () => {
  // With floorImages, the reference is N images of `real` spread evenly:
  // of a 2N set, images 0, 2, 4, ...
  const real = spreadImages(heldOut, 2 * N);
  const same = tf.gather(real, Int32Array.from({ length: N }, (_, i) => 2 * i));
  const other = spreadImages(train, N);
  const r = await evaluateSamples(same, real, {
    classifier,
    floorImages: other,
  });
  // The floor equals the distance computed by hand from the two embeddings.
  const a = await classifier.embed(other);
  const b = await classifier.embed(same);
  tf.dispose([real, same, other]);
  assert.ok(r.distance < 1e-6, `${r.distance}`);
  const expected = frechetDistance(
    featureMoments(a.features, 64),
    featureMoments(b.features, 64),
  );
  assert.ok(Math.abs(r.floor - expected) <= 1e-9 * expected);
});

Deno.test("evaluateSamples rejects too few real images and wrong shapes", async () => {
  const before = tf.memory().numTensors;
  const samples = tf.zeros([10, 32, 32, 1]) as tf.Tensor4D;
  const real = tf.zeros([15, 32, 32, 1]) as tf.Tensor4D;
  const small = tf.zeros([10, 28, 28, 1]) as tf.Tensor4D;
  const five = tf.zeros([5, 32, 32, 1]) as tf.Tensor4D;
  await assert.rejects(
    () => evaluateSamples(samples, real, { classifier }),
    RangeError,
  );
  await assert.rejects(
    () => evaluateSamples(samples, real, { classifier, floorImages: five }),
    RangeError,
  );
  await assert.rejects(
    () => evaluateSamples(small, real, { classifier }),
    TypeError,
  );
  tf.dispose([samples, real, small, five]);
  assert.equal(tf.memory().numTensors, before);
});
