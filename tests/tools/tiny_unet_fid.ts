/**
 * Train a tiny UNet on mnist-lite's training split for a fixed wall time,
 * then score DDIM samples of its EMA weights with the Fréchet distance
 * against the 2,000 held-out digits (the floor beside it: N training digits).
 *
 *     deno run -A tests/tools/tiny_unet_fid.ts [--seconds 300 | --train-steps K]
 *         [--base 16] [--batch 32] [--lr 1e-3] [--n 1000] [--steps 20,50]
 *         [--save ckpt.safetensors | --load ckpt.safetensors] [--grid prefix]
 *
 * Training stops after --seconds of wall time, or after exactly
 * --train-steps steps when given (reproducible). Prints the loss as it
 * goes, then one line per DDIM step count. `--save` writes the trained
 * model (live and EMA weights) as a checkpoint;
 * `--load` skips training and scores a checkpoint's EMA weights; `--grid`
 * writes the first 64 samples of each run to `<prefix>_ddim<steps>.png`.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { initBackend, tf } from "../../core/backend.ts";
import { loadUNet, saveCheckpoint } from "../../core/checkpoint.ts";
import { DigitClassifier } from "../../core/classifier.ts";
import { imagesToGrid, writePng } from "../../core/image.ts";
import { evaluateSamples } from "../../core/evaluate.ts";
import { makeSchedule } from "../../core/schedule.ts";
import { Trainer } from "../../core/train.ts";
import { UNet } from "../../core/unet.ts";
import { ImageBatcher } from "../../data/batches.ts";
import { holdoutSplit, spreadImages } from "../../data/holdout.ts";
import { loadMnistLite } from "../../data/mnist_lite.ts";
import { sampleDdim } from "../../samplers/ddim.ts";

async function main(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      seconds: { type: "string", default: "300" },
      "train-steps": { type: "string" },
      base: { type: "string", default: "16" },
      batch: { type: "string", default: "32" },
      lr: { type: "string", default: "1e-3" },
      n: { type: "string", default: "1000" },
      steps: { type: "string", default: "20,50" },
      seed: { type: "string", default: "0" },
      backend: { type: "string", default: "wasm" },
      save: { type: "string" },
      load: { type: "string" },
      grid: { type: "string" },
    },
  });
  const info = await initBackend(values.backend as "wasm" | "cpu" | "webgpu");
  const seed = Number(values.seed);
  console.log(
    `backend ${info.backend}, base ${values.base}, batch ${values.batch}, lr ${values.lr}, ${values.seconds} s`,
  );
  const { train, heldOut } = holdoutSplit(await loadMnistLite());
  const schedule = makeSchedule();
  let model: (x: tf.Tensor4D, t: tf.Tensor1D) => tf.Tensor4D;
  let release: () => void;
  if (values.load !== undefined) {
    const unet = await loadUNet(values.load);
    console.log(`loaded ${values.load}: base ${unet.config.base}`);
    model = (x, t) => unet.predict(x, t);
    release = () => unet.dispose();
  } else {
    const unet = new UNet({ base: Number(values.base), seed });
    const trainer = new Trainer(unet, schedule, {
      seed,
      optimizer: { lr: Number(values.lr) },
      ema: { decay: 0.999, mode: "warmup", power: 3 / 4 },
    });
    const batcher = new ImageBatcher(train, {
      batchSize: Number(values.batch),
      seed,
    });
    const started = performance.now();
    const budget = Number(values.seconds) * 1000;
    const maxSteps = values["train-steps"] === undefined
      ? undefined
      : Number(values["train-steps"]);
    let recent = 0;
    let count = 0;
    outer: for (let epoch = 0;; epoch++) {
      for (const batch of batcher.epoch(epoch)) {
        const r = await trainer.trainStep(batch.images);
        batch.dispose();
        recent += r.loss;
        count++;
        if (r.step % 25 === 0) {
          console.log(
            `step ${r.step} epoch ${epoch} loss ${
              (recent / count).toFixed(4)
            } (${((performance.now() - started) / 1000).toFixed(0)} s)`,
          );
          recent = 0;
          count = 0;
        }
        if (
          maxSteps !== undefined
            ? r.step >= maxSteps
            : performance.now() - started > budget
        ) {
          break outer;
        }
      }
    }
    console.log(
      `trained ${trainer.step} steps in ${
        ((performance.now() - started) / 1000).toFixed(0)
      } s`,
    );
    const ema = trainer.ema!.params;
    if (values.save !== undefined) {
      await saveCheckpoint(values.save, {
        config: unet.config,
        params: unet.params,
        ema,
        step: trainer.step,
      });
      console.log(`saved ${values.save}`);
    }
    model = (x, t) => unet.apply(ema, x, t);
    release = () => {
      trainer.dispose();
      unet.dispose();
    };
  }
  const classifier = await DigitClassifier.load();
  const real = spreadImages(heldOut);
  const trainImages = spreadImages(train);
  const n = Number(values.n);
  for (const numSteps of values.steps.split(",").map(Number)) {
    const t0 = performance.now();
    // Sample in chunks of 250 to bound memory.
    const parts: tf.Tensor4D[] = [];
    for (let done = 0; done < n; done += 250) {
      parts.push(
        await sampleDdim(model, schedule, {
          n: Math.min(250, n - done),
          imgSize: 32,
          numSteps,
          seed: seed + 1 + done,
        }),
      );
    }
    const samples = tf.concat(parts) as tf.Tensor4D;
    tf.dispose(parts);
    const seconds = (performance.now() - t0) / 1000;
    if (values.grid !== undefined) {
      const first = tf.slice(samples, 0, Math.min(64, n));
      const path = `${values.grid}_ddim${numSteps}.png`;
      await writePng(path, await imagesToGrid(first));
      first.dispose();
      console.log(`wrote ${path}`);
    }
    const r = await evaluateSamples(samples, real, {
      classifier,
      floorImages: trainImages,
    });
    samples.dispose();
    console.log(
      `ddim ${numSteps} steps N=${r.count}: distance ${
        r.distance.toFixed(3)
      } floor ${r.floor.toFixed(3)} confidence ${
        r.meanConfidence.toFixed(3)
      } histogram ${r.classHistogram.join(",")} (sampling ${
        seconds.toFixed(0)
      } s, ${(n / seconds).toFixed(2)} img/s)`,
    );
  }
  tf.dispose([real, trainImages]);
  classifier.dispose();
  release();
  schedule.dispose();
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
