/**
 * Measure the Fréchet distance of reference "generators" on mnist-lite, to
 * set the thresholds of the learning regression test and to read model
 * scores against:
 *
 * - noise: N(0, 1) pixels clipped to [-1, 1];
 * - mean: the training split's mean image, Gaussian-blurred (sigma 1 px), repeated N times;
 * - mean+noise: that image plus N(0, 0.2^2) pixel noise, clipped;
 * - blurred real: N training digits, each Gaussian-blurred (sigma 1.5 px);
 * - real: N training digits (the floor: a generator that reproduces the data).
 *
 * Reference: the 2,000 held-out digits (data/holdout.ts), N of them spread
 * evenly; the floor set is N training digits spread evenly.
 *
 *     deno run -A tests/tools/fid_baselines.ts [--n 1000,2000] [--backend wasm]
 *
 * @module
 */
import { parseArgs } from "node:util";
import { initBackend, tf } from "../../core/backend.ts";
import { DigitClassifier } from "../../core/classifier.ts";
import { evaluateSamples, type Evaluation } from "../../core/evaluate.ts";
import { holdoutSplit, spreadImages } from "../../data/holdout.ts";
import { loadMnistLite } from "../../data/mnist_lite.ts";

/** Gaussian blur, NHWC one channel, zero padding outside, kernel 2 ceil(3 sigma) + 1. */
export function gaussianBlur(x: tf.Tensor4D, sigma: number): tf.Tensor4D {
  const r = Math.ceil(3 * sigma);
  const k = 2 * r + 1;
  const w = new Float32Array(k * k);
  let sum = 0;
  for (let i = 0; i < k; i++) {
    for (let j = 0; j < k; j++) {
      const v = Math.exp(-((i - r) ** 2 + (j - r) ** 2) / (2 * sigma * sigma));
      w[i * k + j] = v;
      sum += v;
    }
  }
  for (let i = 0; i < w.length; i++) w[i] /= sum;
  return tf.tidy(() => {
    // Blur in [0, 1] so that the zero padding is black, then back to [-1, 1].
    const unit = tf.div(tf.add(x, 1), 2) as tf.Tensor4D;
    const y = tf.conv2d(unit, tf.tensor4d(w, [k, k, 1, 1]), 1, "same");
    return tf.sub(tf.mul(y, 2), 1) as tf.Tensor4D;
  });
}

function format(name: string, r: Evaluation): string {
  return `${name.padEnd(14)} N=${r.count} distance ${
    r.distance.toFixed(3)
  } floor ${r.floor.toFixed(3)} ratio ${
    (r.distance / r.floor).toFixed(1)
  } confidence ${r.meanConfidence.toFixed(3)} (real ${
    r.realMeanConfidence.toFixed(3)
  }) histogram ${r.classHistogram.join(",")}`;
}

async function main(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      n: { type: "string", default: "1000,2000" },
      backend: { type: "string", default: "wasm" },
    },
  });
  const info = await initBackend(values.backend as "wasm" | "cpu" | "webgpu");
  console.log(`backend: ${info.backend}`);
  const { train, heldOut } = holdoutSplit(await loadMnistLite());
  const real = spreadImages(heldOut);
  const trainImages = spreadImages(train);
  const classifier = await DigitClassifier.load();
  const mean = tf.tidy(() =>
    gaussianBlur(tf.mean(trainImages, 0, true) as tf.Tensor4D, 1)
  );
  for (const n of values.n.split(",").map(Number)) {
    const spread = Int32Array.from(
      { length: n },
      (_, i) => Math.floor(i * train.count / n),
    );
    // A different N training digits from the floor's: offset by half a stride.
    const other = spread.map((i) => i + Math.floor(train.count / n / 2));
    const candidates: [string, () => tf.Tensor4D][] = [
      [
        "noise",
        () =>
          tf.tidy(() =>
            tf.clipByValue(
              tf.randomNormal([n, 32, 32, 1], 0, 1, "float32", 1),
              -1,
              1,
            )
          ),
      ],
      ["mean", () => tf.tile(mean, [n, 1, 1, 1])],
      ["mean+noise", () =>
        tf.tidy(() =>
          tf.clipByValue(
            tf.add(
              tf.tile(mean, [n, 1, 1, 1]),
              tf.randomNormal([n, 32, 32, 1], 0, 0.2, "float32", 2),
            ),
            -1,
            1,
          )
        )],
      [
        "blurred real",
        () => tf.tidy(() => gaussianBlur(tf.gather(trainImages, other), 1.5)),
      ],
      ["real", () => tf.gather(trainImages, other)],
    ];
    for (const [name, make] of candidates) {
      const samples = make();
      const r = await evaluateSamples(samples, real, {
        classifier,
        floorImages: trainImages,
      });
      samples.dispose();
      console.log(format(name, r));
    }
  }
  tf.dispose([real, trainImages, mean]);
  classifier.dispose();
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
