import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import {
  classifierForward,
  classifierParamShapes,
  ClassifierTrainer,
  DigitClassifier,
  encodeClassifier,
  initClassifierParams,
} from "../core/classifier.ts";
import { encodeSafetensors } from "../core/safetensors.ts";
import { ImageBatcher } from "../data/batches.ts";
import { holdoutSplit } from "../data/holdout.ts";
import { loadMnistLite } from "../data/mnist_lite.ts";

await initBackend("wasm");

/**
 * The held-out accuracy tests/tools/train_classifier.ts measured for the
 * shipped weights (also in the file's metadata), less a margin for
 * backend round-off.
 */
const MEASURED_ACCURACY = 0.987;
const MARGIN = 0.003;

const lite = await loadMnistLite();
const { train, heldOut } = holdoutSplit(lite);

function images(dataset: typeof heldOut, indices?: number[]): tf.Tensor4D {
  const idx = indices ?? Array.from({ length: dataset.count }, (_, i) => i);
  const pixels = new ImageBatcher(dataset, { batchSize: 1 }).pixels(idx);
  return tf.tensor4d(pixels, [idx.length, 32, 32, 1]);
}

Deno.test("holdoutSplit holds out every 5th mnist-lite digit, in class proportions", () => {
  assert.equal(train.count, 8000);
  assert.equal(heldOut.count, 2000);
  // Class sizes 1001, 1127, 991, ... (data/mnist_lite.ts): multiples of 5 in each class's range.
  const counts = new Array(10).fill(0);
  for (const label of heldOut.labels) counts[label]++;
  assert.deepEqual(counts, [201, 225, 198, 207, 196, 172, 203, 214, 189, 195]);
  // Held-out image k is dataset image 5k.
  const px = 28 * 28;
  assert.deepEqual(
    heldOut.images.subarray(7 * px, 8 * px),
    lite.images.subarray(35 * px, 36 * px),
  );
});

Deno.test("the shipped classifier classifies the 2,000 held-out mnist-lite digits", async () => {
  const classifier = await DigitClassifier.load();
  const x = images(heldOut);
  const { probs } = await classifier.embed(x);
  x.dispose();
  classifier.dispose();
  let right = 0;
  for (let i = 0; i < heldOut.count; i++) {
    const row = probs.subarray(i * 10, i * 10 + 10);
    if (row.indexOf(Math.max(...row)) === heldOut.labels[i]) right++;
  }
  const accuracy = right / heldOut.count;
  assert.ok(
    accuracy >= MEASURED_ACCURACY - MARGIN,
    `held-out accuracy ${accuracy}, expected >= ${MEASURED_ACCURACY - MARGIN}`,
  );
  assert.ok(Number(classifier.metadata.heldOutAccuracy) >= MEASURED_ACCURACY);
});

Deno.test("classifier forward, embed, load and a training step leak no tensor", async () => {
  const before = tf.memory().numTensors;
  const classifier = await DigitClassifier.load();
  const x = images(heldOut, [0, 1, 2]);
  const out = classifier.forward(x);
  assert.deepEqual(out.logits.shape, [3, 10]);
  assert.deepEqual(out.features.shape, [3, 64]);
  tf.dispose([out.logits, out.features]);
  const e = await classifier.embed(x, { batchSize: 2 });
  assert.equal(e.features.length, 3 * 64);
  classifier.dispose();
  const params = initClassifierParams(1);
  const trainer = new ClassifierTrainer(params);
  const y = tf.tensor1d([0, 0, 0], "int32");
  await trainer.trainStep(x, y);
  trainer.dispose();
  tf.dispose([x, y, ...params.values()]);
  assert.equal(tf.memory().numTensors, before);
});

Deno.test("embed's features are the ReLU'd first linear layer and its probabilities sum to 1", async () => {
  const classifier = await DigitClassifier.load();
  const x = images(heldOut, [3, 500, 1999]);
  const e = await classifier.embed(x);
  // Features are post-ReLU; probabilities are a softmax.
  assert.ok(e.features.every((v) => v >= 0));
  for (let i = 0; i < 3; i++) {
    const s = e.probs.subarray(i * 10, i * 10 + 10).reduce((a, b) => a + b, 0);
    assert.ok(Math.abs(s - 1) < 1e-5);
  }
  // The logits are the features through fc2, computed here on the host.
  const { logits } = classifier.forward(x);
  const l = await logits.data();
  const w = await classifier.params.get("fc2.weight")!.data();
  const b = await classifier.params.get("fc2.bias")!.data();
  for (let i = 0; i < 3; i++) {
    for (let c = 0; c < 10; c++) {
      let sum = b[c];
      for (let k = 0; k < 64; k++) {
        sum += e.features[i * 64 + k] * w[k * 10 + c];
      }
      assert.ok(Math.abs(sum - l[i * 10 + c]) < 1e-3, `logit ${i},${c}`);
    }
  }
  tf.dispose([x, logits]);
  classifier.dispose();
});

Deno.test("ClassifierTrainer fits a small batch of digits", async () => {
  const params = initClassifierParams(3);
  const trainer = new ClassifierTrainer(params, { lr: 2e-3, dropout: 0 });
  const idx = Array.from({ length: 20 }, (_, i) => i * 100);
  const x = images(train, idx);
  const y = tf.tensor1d(idx.map((i) => train.labels[i]), "int32");
  const first = await trainer.trainStep(x, y);
  let last = first;
  for (let i = 0; i < 30; i++) last = await trainer.trainStep(x, y);
  // Chance is ln(10) = 2.30 nats; 31 steps on 20 images memorise them.
  assert.ok(first.loss > 1.5, `first loss ${first.loss}`);
  assert.ok(last.loss < 0.2 * first.loss, `loss ${first.loss} -> ${last.loss}`);
  assert.equal(last.accuracy, 1);
  trainer.dispose();
  tf.dispose([x, y, ...params.values()]);
});

Deno.test("weights survive encodeClassifier and DigitClassifier.load unchanged", async () => {
  const params = initClassifierParams(5);
  const bytes = await encodeClassifier(params, { note: "test" });
  const back = await DigitClassifier.load(bytes);
  assert.equal(back.metadata.note, "test");
  assert.equal(back.metadata.format, "ddpm-classifier");
  for (const [name, p] of params) {
    assert.deepEqual(await back.params.get(name)!.data(), await p.data(), name);
  }
  back.dispose();
  tf.dispose([...params.values()]);
});

Deno.test("DigitClassifier.load rejects a file with a misshapen weight and leaks nothing", async () => {
  const before = tf.memory().numTensors;
  const tensors = new Map(
    [...classifierParamShapes()].map(([name, shape]) => {
      const s = name === "fc1.weight" ? [64, 1024] : shape;
      return [name, {
        shape: s,
        data: new Float32Array(s.reduce((a, b) => a * b, 1)),
      }];
    }),
  );
  await assert.rejects(
    () => DigitClassifier.load(encodeSafetensors(tensors)),
    (e: Error) => e instanceof TypeError && /fc1\.weight/.test(e.message),
  );
  assert.equal(tf.memory().numTensors, before);
});

Deno.test("classifierForward rejects images of the wrong size", () => {
  const params = initClassifierParams(0);
  const x = tf.zeros([1, 28, 28, 1]) as tf.Tensor4D;
  assert.throws(() => classifierForward(params, x), TypeError);
  tf.dispose([x, ...params.values()]);
});
