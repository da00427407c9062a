import assert from "node:assert/strict";
import { decode } from "fast-png";
import { initBackend, tf } from "../core/backend.ts";
import { loadCheckpoint, saveCheckpoint } from "../core/checkpoint.ts";
import { UNet } from "../core/unet.ts";
import {
  loadTrainedModel,
  RUN_FILES,
  TrainingRun,
  type TrainOptions,
} from "../core/run.ts";

await initBackend("cpu");

const SIZE = 8;
const BATCH = 2;

/** A deterministic batch per (epoch, index): the data a real batcher would give. */
function batch(epoch: number, index: number): tf.Tensor4D {
  return tf.randomUniform(
    [BATCH, SIZE, SIZE, 1],
    -1,
    1,
    "float32",
    1000 * epoch + index,
  ) as tf.Tensor4D;
}

async function tmp(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "ddpm_run_test_" });
}

async function metricsLines(dir: string): Promise<Record<string, number>[]> {
  const text = await Deno.readTextFile(`${dir}/${RUN_FILES.metrics}`);
  return text.split("\n").filter((l) => l !== "").map((l) => JSON.parse(l));
}

Deno.test("a run trains to its step target, writing one metrics line per step, a checkpoint, a loss curve and a grid", async () => {
  const dir = await tmp();
  const before = tf.memory().numTensors;
  const run = await TrainingRun.create(dir, {
    model: { base: 8 },
    steps: 3,
    seed: 5,
    optimizer: { lr: 1e-3 },
    data: { name: "noise", batchSize: BATCH },
  });
  const seen: [number, number][] = [];
  const requests: number[] = [];
  const result = await run.train({
    batchesPerEpoch: 2,
    batch: (e, i) => {
      seen.push([e, i]);
      return batch(e, i);
    },
    sample: (req) => {
      requests.push(req.step);
      return Promise.resolve(tf.zeros([3, SIZE, SIZE, 1]) as tf.Tensor4D);
    },
  });
  // Step s uses batch s % 2 of epoch floor(s / 2).
  assert.deepEqual(seen, [[0, 0], [0, 1], [1, 0]]);
  assert.deepEqual(requests, [3]);
  assert.equal(result.stopped, "steps");
  assert.equal(result.step, 3);
  const lines = await metricsLines(dir);
  assert.deepEqual(lines.map((l) => l.step), [1, 2, 3]);
  for (const l of lines) {
    assert.deepEqual(Object.keys(l).sort(), [
      "elapsedSec",
      "gradNorm",
      "imagesPerSec",
      "loss",
      "lr",
      "step",
    ]);
    assert.equal(l.lr, 1e-3);
    assert.ok(l.loss > 0 && l.imagesPerSec > 0 && l.gradNorm > 0);
  }
  const ckpt = await loadCheckpoint(result.checkpoint);
  assert.equal(ckpt.step, 3);
  assert.ok(ckpt.ema !== null && ckpt.optimizer !== null);
  const t = ckpt.training as Record<string, Record<string, unknown>>;
  assert.equal(t.seed as unknown, 5);
  assert.deepEqual(t.schedule, { kind: "linear", T: 1000 });
  assert.deepEqual(t.data, { name: "noise", batchSize: BATCH });
  assert.equal(t.run.steps, 3);
  assert.equal((t.optimizer.config as Record<string, number>).lr, 1e-3);
  assert.equal(t.optimizer.step, 3);
  ckpt.dispose();
  // The grid: 3 images of 8x8 in one row, padding 2 (torchvision's make_grid).
  const grid = decode(await Deno.readFile(result.samples!));
  assert.equal(grid.width, 3 * (SIZE + 2) + 2);
  assert.equal(grid.height, SIZE + 4);
  const curve = decode(await Deno.readFile(result.lossCurve));
  assert.equal(curve.width, 480);
  run.dispose();
  assert.equal(tf.memory().numTensors, before);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("a run refuses to start over an existing checkpoint unless told to overwrite", async () => {
  const dir = await tmp();
  const run = await TrainingRun.create(dir, { model: { base: 8 }, steps: 1 });
  await run.saveCheckpoint();
  run.dispose();
  await assert.rejects(
    TrainingRun.create(dir, { model: { base: 8 }, steps: 1 }),
    /already exists/,
  );
  (await TrainingRun.create(dir, { model: { base: 8 }, steps: 1 }, {
    overwrite: true,
  })).dispose();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("2N steps straight equal N steps, resume from the checkpoint, N steps (bitwise on cpu)", async () => {
  const setup = {
    model: { base: 8 },
    steps: 4,
    seed: 3,
    optimizer: { lr: 1e-3 },
    ema: { mode: "warmup" as const, power: 0.75 },
    checkpointEvery: 0,
  };
  const options: TrainOptions = { batchesPerEpoch: 3, batch };
  const a = await tmp();
  const straight = await TrainingRun.create(a, setup);
  await straight.train(options);
  straight.dispose();
  const b = await tmp();
  const half = await TrainingRun.create(b, { ...setup, steps: 2 });
  await half.train(options);
  half.dispose();
  const resumed = await TrainingRun.resume(b, { steps: 4 });
  assert.equal(resumed.step, 2);
  await resumed.train(options);
  resumed.dispose();
  const ca = await loadCheckpoint(`${a}/${RUN_FILES.checkpoint}`);
  const cb = await loadCheckpoint(`${b}/${RUN_FILES.checkpoint}`);
  assert.equal(cb.step, 4);
  for (
    const [what, ma, mb] of [
      ["live", ca.params, cb.params],
      ["ema", ca.ema!, cb.ema!],
      ["exp_avg", ca.optimizer!.expAvg, cb.optimizer!.expAvg],
      ["exp_avg_sq", ca.optimizer!.expAvgSq, cb.optimizer!.expAvgSq],
    ] as const
  ) {
    for (const [k, v] of ma) {
      assert.deepEqual(
        mb.get(k)!.dataSync(),
        v.dataSync(),
        `${what} ${k} differs`,
      );
    }
  }
  assert.deepEqual(
    (await metricsLines(b)).map((l) => l.loss),
    (await metricsLines(a)).map((l) => l.loss),
  );
  ca.dispose();
  cb.dispose();
  await Deno.remove(a, { recursive: true });
  await Deno.remove(b, { recursive: true });
});

Deno.test("resume drops metrics lines written after the checkpoint", async () => {
  const dir = await tmp();
  const run = await TrainingRun.create(dir, { model: { base: 8 }, steps: 2 });
  await run.train({ batchesPerEpoch: 5, batch });
  run.dispose();
  const path = `${dir}/${RUN_FILES.metrics}`;
  await Deno.writeTextFile(
    path,
    '{"step":3,"loss":1}\n{"step":4,"loss":1}\n',
    { append: true },
  );
  const resumed = await TrainingRun.resume(dir);
  assert.deepEqual((await metricsLines(dir)).map((l) => l.step), [1, 2]);
  resumed.dispose();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("an aborted run finishes its step, writes the checkpoint and makes no grid", async () => {
  const dir = await tmp();
  const run = await TrainingRun.create(dir, { model: { base: 8 }, steps: 50 });
  const controller = new AbortController();
  let sampled = false;
  const result = await run.train({
    batchesPerEpoch: 5,
    batch,
    signal: controller.signal,
    onStep: (m) => {
      if (m.step === 2) controller.abort();
    },
    sample: () => {
      sampled = true;
      return Promise.resolve(tf.zeros([1, SIZE, SIZE, 1]) as tf.Tensor4D);
    },
  });
  assert.equal(result.stopped, "signal");
  assert.equal(result.step, 2);
  assert.equal(result.samples, null);
  assert.equal(sampled, false);
  const ckpt = await loadCheckpoint(result.checkpoint);
  assert.equal(ckpt.step, 2);
  ckpt.dispose();
  run.dispose();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("a run stops at its time limit and says so", async () => {
  const dir = await tmp();
  const run = await TrainingRun.create(dir, {
    model: { base: 8 },
    steps: 1000,
    timeLimitSec: 1e-6,
  });
  const result = await run.train({ batchesPerEpoch: 5, batch });
  assert.equal(result.stopped, "time");
  assert.ok(result.step < 1000);
  run.dispose();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("a non-finite loss stops the run naming the step and the last checkpoint, which stays as it was", async () => {
  const dir = await tmp();
  const run = await TrainingRun.create(dir, {
    model: { base: 8 },
    steps: 10,
    checkpointEvery: 2,
  });
  const before = tf.memory().numTensors;
  // Step 3 gets images of 3e38: x_t overflows float32, so the loss is infinite.
  await assert.rejects(
    run.train({
      batchesPerEpoch: 10,
      batch: (e, i) =>
        i === 2
          ? tf.fill([BATCH, SIZE, SIZE, 1], 3e38) as tf.Tensor4D
          : batch(e, i),
    }),
    (e: Error) => {
      assert.ok(e instanceof RangeError);
      assert.match(e.message, /^Cannot continue training at step 3: /);
      assert.match(e.message, /not finite/);
      assert.ok(
        e.message.includes(`"${run.checkpointPath}" (step 2)`),
        e.message,
      );
      return true;
    },
  );
  assert.equal(tf.memory().numTensors, before);
  assert.equal(run.step, 2);
  const ckpt = await loadCheckpoint(run.checkpointPath);
  assert.equal(ckpt.step, 2);
  ckpt.dispose();
  assert.equal((await metricsLines(dir)).length, 2);
  run.dispose();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("resume refuses a checkpoint without training state in one line", async () => {
  const dir = await tmp();
  const unet = new UNet({ base: 8 });
  await saveCheckpoint(`${dir}/${RUN_FILES.checkpoint}`, {
    config: unet.config,
    params: unet.params,
  });
  unet.dispose();
  await assert.rejects(
    TrainingRun.resume(dir),
    (e: Error) =>
      e instanceof TypeError &&
      /^Cannot resume training from/.test(e.message) &&
      !e.message.includes("\n"),
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("loadTrainedModel takes EMA weights by default, live ones on request, and the recorded schedule", async () => {
  const dir = await tmp();
  const path = `${dir}/c.safetensors`;
  const live = new UNet({ base: 8, seed: 1 });
  const ema = new UNet({ base: 8, seed: 2 });
  await saveCheckpoint(path, {
    config: live.config,
    params: live.params,
    ema: ema.params,
    step: 7,
    training: {
      schedule: { kind: "cosine", T: 50 },
      data: { imageSize: 16 },
    },
  });
  const key = "in_conv.weight";
  for (
    const [weights, want] of [
      [undefined, ema],
      ["ema", ema],
      ["live", live],
    ] as const
  ) {
    const got = await loadTrainedModel(path, { weights });
    assert.equal(got.weights, want === ema ? "ema" : "live");
    assert.deepEqual(
      got.unet.params.get(key)!.dataSync(),
      want.params.get(key)!.dataSync(),
    );
    assert.equal(got.schedule.T, 50);
    assert.equal(got.schedule.kind, "cosine");
    assert.equal(got.imageSize, 16);
    assert.equal(got.step, 7);
    got.unet.dispose();
    got.schedule.dispose();
  }
  await saveCheckpoint(path, { config: live.config, params: live.params });
  await assert.rejects(
    loadTrainedModel(path, { weights: "ema" }),
    /no EMA weights/,
  );
  live.dispose();
  ema.dispose();
  await Deno.remove(dir, { recursive: true });
});
