/**
 * A regression test of learning itself: a tiny UNet trained for 1,000 steps
 * on mnist-lite must produce samples whose Fréchet distance to held-out
 * digits is well below that of two trivial generators, pure noise and the
 * blurred mean image, at the same N.
 *
 * The slowest test of the suite (a few minutes on two cores with wasm); CI
 * runs it, since a change that breaks learning must fail CI. Skip it while
 * iterating with DDPM_FAST_TESTS=1:
 *
 *     DDPM_FAST_TESTS=1 deno task test
 *
 * Measured (wasm, this exact configuration): the model 610, the blurred
 * mean image 943, clipped noise 1413, real digits 12 (floor 9) at N = 250;
 * after only 300 steps the model scored 820 (0.87 of the mean image's).
 * The thresholds, 0.8 of the mean image's and 0.6 of noise's, pass the
 * 1,000-step model with a margin and fail a model that has not learned
 * (after one step: 1095, every sample classed as an 8, as noise is).
 *
 * @module
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { DigitClassifier } from "../core/classifier.ts";
import { evaluateSamples } from "../core/evaluate.ts";
import { makeSchedule } from "../core/schedule.ts";
import { Trainer } from "../core/train.ts";
import { UNet } from "../core/unet.ts";
import { ImageBatcher } from "../data/batches.ts";
import { holdoutSplit, spreadImages } from "../data/holdout.ts";
import { loadMnistLite } from "../data/mnist_lite.ts";
import { sampleDdim } from "../samplers/ddim.ts";
import { gaussianBlur } from "./tools/fid_baselines.ts";

const STEPS = 1000;
const N = 250;

Deno.test({
  name:
    "a tiny UNet trained 1,000 steps beats noise and the blurred mean image",
  ignore: Deno.env.get("DDPM_FAST_TESTS") === "1",
  fn: async () => {
    await initBackend("wasm");
    const { train, heldOut } = holdoutSplit(await loadMnistLite());
    const schedule = makeSchedule();
    const unet = new UNet({ base: 8, seed: 0 });
    const trainer = new Trainer(unet, schedule, {
      seed: 0,
      optimizer: { lr: 1e-3 },
      ema: { decay: 0.999, mode: "warmup", power: 3 / 4 },
      workers: "auto",
    });
    const batcher = new ImageBatcher(train, { batchSize: 32, seed: 0 });
    for (let epoch = 0; trainer.step < STEPS; epoch++) {
      for (const batch of batcher.epoch(epoch)) {
        await trainer.trainStep(batch.images);
        batch.dispose();
        if (trainer.step >= STEPS) break;
      }
    }
    const ema = trainer.ema!.params;
    const samples = await sampleDdim(
      (x, t) => unet.apply(ema, x, t),
      schedule,
      { n: N, imgSize: 32, numSteps: 20, seed: 1 },
    );
    trainer.dispose();
    unet.dispose();
    schedule.dispose();

    const real = spreadImages(heldOut);
    const trainImages = spreadImages(train);
    const noise = tf.tidy(() =>
      tf.clipByValue(tf.randomNormal([N, 32, 32, 1], 0, 1, "float32", 1), -1, 1)
    ) as tf.Tensor4D;
    const mean = tf.tidy(() =>
      tf.tile(
        gaussianBlur(tf.mean(trainImages, 0, true) as tf.Tensor4D, 1),
        [N, 1, 1, 1],
      )
    ) as tf.Tensor4D;
    const classifier = await DigitClassifier.load();
    const options = { classifier, floorImages: trainImages };
    const model = await evaluateSamples(samples, real, options);
    const onNoise = await evaluateSamples(noise, real, options);
    const onMean = await evaluateSamples(mean, real, options);
    tf.dispose([samples, real, trainImages, noise, mean]);
    classifier.dispose();

    const report = `model ${model.distance.toFixed(1)}, mean image ${
      onMean.distance.toFixed(1)
    }, noise ${onNoise.distance.toFixed(1)}, floor ${model.floor.toFixed(1)}`;
    assert.ok(model.distance < 0.8 * onMean.distance, report);
    assert.ok(model.distance < 0.6 * onNoise.distance, report);
  },
});
