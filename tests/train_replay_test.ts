/**
 * Replayed WebGPU training steps (`TrainerOptions.replay`, core/train.ts
 * with core/_webgpu_replay.ts's `recordStep`) against the same trainer with
 * replays off: losses, norms, weights, AdamW moments and the EMA (with a
 * warm-up decay, so that every step's scalars differ) equal bit for bit,
 * through a restored state, a failed step queued ahead of another, and
 * steps started before the previous one is read. Small models (UNet base 8,
 * 8x8 images) so that llvmpipe runs the file in seconds; skipped where no
 * WebGPU adapter exists.
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { TrainingRun } from "../core/run.ts";
import { makeSchedule, type Schedule } from "../core/schedule.ts";
import { Trainer, type TrainerState } from "../core/train.ts";
import { UNet } from "../core/unet.ts";
import { randoms, readAll, safetensorsData } from "./_util.ts";
import { noiseBatch } from "./_runs.ts";

const hasWebGpu = (globalThis.navigator as Navigator | undefined)?.gpu !==
  undefined;

/** The parts of tfjs's WebGPU buffer pool the resource test reads. */
interface Pool {
  numUsedBuffers: number;
  numBytesUsed: number;
}

function pool(): Pool {
  return (tf.backend() as unknown as { bufferManager: Pool }).bufferManager;
}

async function onWebGpu(fn: () => Promise<void>): Promise<void> {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  tf.engine().startScope();
  try {
    await fn();
  } finally {
    tf.engine().endScope();
    await initBackend("cpu");
  }
}

/** Batch number `i`: 2 images of 8 x 8 in [-1, 1]. */
function batch(i: number): tf.Tensor4D {
  return tf.tensor4d(
    Array.from(
      randoms(2 * 8 * 8, 100 + i),
      (v) => Math.max(-1, Math.min(1, v)),
    ),
    [2, 8, 8, 1],
  );
}

/** A base-8 UNet and its trainer, with an EMA whose decay changes every step. */
function make(schedule: Schedule, replay: boolean) {
  const unet = new UNet({ base: 8, seed: 4 });
  const trainer = new Trainer(unet, schedule, {
    seed: 6,
    replay,
    ema: { mode: "warmup", power: 3 / 4 },
  });
  return { unet, trainer };
}

/** Weights, EMA and AdamW moments, read back, by key. */
async function snapshot(
  m: ReturnType<typeof make>,
): Promise<Map<string, Float32Array>> {
  const state = m.trainer.optimizer.getState();
  try {
    const tag = (what: string, map: Map<string, Float32Array>) =>
      [...map].map(([k, v]) => [`${what} ${k}`, v] as const);
    return new Map([
      ...tag("weight", await readAll(m.unet.params)),
      ...tag("ema", await readAll(m.trainer.ema!.params)),
      ...tag("m", await readAll(state.expAvg)),
      ...tag("v", await readAll(state.expAvgSq)),
    ]);
  } finally {
    tf.dispose([...state.expAvg.values(), ...state.expAvgSq.values()]);
  }
}

/** Bit for bit, with a short message (assert's diff of these maps is huge). */
function assertSame(
  got: Map<string, Float32Array>,
  want: Map<string, Float32Array>,
  what: string,
): void {
  assert.deepEqual([...got.keys()], [...want.keys()]);
  for (const [k, v] of got) {
    const w = want.get(k)!;
    const i = v.findIndex((x, j) => !Object.is(x, w[j]));
    assert.ok(i < 0, `${what}: ${k}[${i}] is ${v[i]}, expected ${w[i]}`);
  }
}

/** Steps on batches `from` to `to - 1`, one by one: [step, loss, gradNorm] each. */
async function steps(
  t: Trainer,
  from: number,
  to: number,
): Promise<number[][]> {
  const out: number[][] = [];
  for (let i = from; i < to; i++) {
    const x = batch(i);
    const r = await t.trainStep(x);
    x.dispose();
    out.push([r.step, r.loss, r.gradNorm]);
  }
  return out;
}

function disposeState(s: TrainerState): void {
  tf.dispose([
    ...s.params.values(),
    ...s.optimizer.expAvg.values(),
    ...s.optimizer.expAvgSq.values(),
    ...(s.ema === null ? [] : s.ema.params.values()),
  ]);
}

/** What a plain trainer (replays off) does on batches 0-5: the reference of three tests. */
interface Reference {
  /** [step, loss, gradNorm] of each step. */
  steps: number[][];
  /** The state after 3, 5 and 6 steps. */
  after3: Map<string, Float32Array>;
  after5: Map<string, Float32Array>;
  after6: Map<string, Float32Array>;
}

let reference: Promise<Reference> | null = null;

/** The plain run, made once (on the WebGPU backend) and shared. */
function plainReference(schedule: Schedule): Promise<Reference> {
  reference ??= (async () => {
    const plain = make(schedule, false);
    try {
      const first = await steps(plain.trainer, 0, 3);
      const after3 = await snapshot(plain);
      const rest = await steps(plain.trainer, 3, 5);
      const after5 = await snapshot(plain);
      rest.push(...await steps(plain.trainer, 5, 6));
      assert.deepEqual(plain.trainer.replayStats, {
        recorded: 0,
        replayed: 0,
        fallback: "",
      });
      return {
        steps: [...first, ...rest],
        after3,
        after5,
        after6: await snapshot(plain),
      };
    } finally {
      plain.trainer.dispose();
      plain.unet.dispose();
    }
  })();
  return reference;
}

Deno.test({
  name:
    "replayed webgpu training steps equal plain ones bit for bit (losses, weights, moments, a warming-up EMA); one step is recorded",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const schedule = makeSchedule({ T: 100 });
      const want = await plainReference(schedule);
      const replayed = make(schedule, true);
      const got = await steps(replayed.trainer, 0, 4);
      // tfjs keeps on the host what it read of a tensor and answers the
      // next read from there, but replays change the state in place: a
      // read under way while a step is replayed, and a read between
      // replayed steps, must both leave the next read the new values.
      const reading = readAll(replayed.unet.params);
      got.push(...await steps(replayed.trainer, 4, 5));
      await reading;
      assertSame(await snapshot(replayed), want.after5, "after 5 steps");
      got.push(...await steps(replayed.trainer, 5, 6));
      assert.deepEqual(got, want.steps);
      // Step 1 packs the state through tfjs, step 2 is recorded, 3-6 replay.
      assert.deepEqual(replayed.trainer.replayStats, {
        recorded: 1,
        replayed: 4,
        fallback: "",
      });
      assert.equal(replayed.trainer.optimizer.stepCount, 6);
      assert.equal(replayed.trainer.ema!.optimizationStep, 6);
      assertSame(await snapshot(replayed), want.after6, "after 6 steps");
      replayed.trainer.dispose();
      replayed.unet.dispose();
      schedule.dispose();
    });
  },
});

Deno.test({
  name:
    "a restored state makes the recording stale: the trainer records again and still equals a plain one",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const schedule = makeSchedule({ T: 100 });
      const run = async (replay: boolean) => {
        const m = make(schedule, replay);
        const losses = await steps(m.trainer, 0, 4);
        const saved = m.trainer.getState();
        losses.push(...await steps(m.trainer, 4, 6));
        m.trainer.setState(saved);
        disposeState(saved);
        losses.push(...await steps(m.trainer, 6, 10));
        return { m, losses, state: await snapshot(m) };
      };
      const plain = await run(false);
      const replayed = await run(true);
      assert.deepEqual(replayed.losses, plain.losses);
      assert.deepEqual(replayed.losses.map((l) => l[0]), [
        1,
        2,
        3,
        4,
        5,
        6,
        5,
        6,
        7,
        8,
      ]);
      assertSame(replayed.state, plain.state, "after the restore");
      // Steps 1 and 5 (the saved state shares the weights' data) run
      // through tfjs, as does the first after the restore (it unpacked the
      // moments); each is followed by a recorded one.
      assert.deepEqual(replayed.m.trainer.replayStats, {
        recorded: 3,
        replayed: 4,
        fallback: "",
      });
      for (const { m } of [plain, replayed]) {
        m.trainer.dispose();
        m.unet.dispose();
      }
      schedule.dispose();
    });
  },
});

Deno.test({
  name:
    "a failed replayed step cancels the one queued behind it and changes nothing; training goes on as a plain trainer's",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const schedule = makeSchedule({ T: 100 });
      const { steps: want, after3, after6 } = await plainReference(schedule);

      const replayed = make(schedule, true);
      assert.deepEqual(await steps(replayed.trainer, 0, 3), want.slice(0, 3));
      // Steps 4 (NaN) and 5 queued together, both replayed.
      const bad = tf.fill([2, 8, 8, 1], NaN) as tf.Tensor4D;
      const x = batch(3);
      const queued = [
        replayed.trainer.trainStep(bad),
        replayed.trainer.trainStep(x),
      ];
      queued.forEach((p) => p.catch(() => {}));
      await assert.rejects(
        queued[0],
        (e: Error) =>
          e instanceof RangeError &&
          /step 4: the loss is not finite/.test(e.message),
      );
      await assert.rejects(
        queued[1],
        (e: Error) =>
          e instanceof RangeError && /step 5: an earlier step/.test(e.message),
      );
      tf.dispose([bad, x]);
      assert.equal(replayed.trainer.replayStats.replayed, 3);
      assert.equal(replayed.trainer.step, 3);
      assert.equal(replayed.trainer.optimizer.stepCount, 3);
      assert.equal(replayed.trainer.ema!.optimizationStep, 3);
      assertSame(await snapshot(replayed), after3, "after the failed steps");
      // Then on, from batch 3, as the plain trainer.
      const on = await steps(replayed.trainer, 3, 6);
      assert.deepEqual(on, want.slice(3));
      assertSame(await snapshot(replayed), after6, "after going on");
      assert.equal(replayed.trainer.replayStats.recorded, 2);
      replayed.trainer.dispose();
      replayed.unet.dispose();
      schedule.dispose();
    });
  },
});

Deno.test({
  name:
    "replayed steps started before the previous one is read equal steps awaited one by one",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const schedule = makeSchedule({ T: 100 });
      const want = await plainReference(schedule);
      const replayed = make(schedule, true);
      const xs = Array.from({ length: 6 }, (_, i) => batch(i));
      const got = await Promise.all(
        xs.map((x) => replayed.trainer.trainStep(x)),
      );
      tf.dispose(xs);
      assert.deepEqual(
        got.map((r) => [r.step, r.loss, r.gradNorm]),
        want.steps,
      );
      assert.ok(replayed.trainer.replayStats.replayed >= 3);
      assertSame(await snapshot(replayed), want.after6, "started together");
      replayed.trainer.dispose();
      replayed.unet.dispose();
      schedule.dispose();
    });
  },
});

Deno.test({
  name:
    "replay: false and DDPM_WEBGPU_REPLAY=0 run every step through tfjs; a disposed trainer hands back the recording's buffers",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const schedule = makeSchedule({ T: 100 });
      const off = make(schedule, false);
      await steps(off.trainer, 0, 3);
      assert.equal(off.trainer.replayStats.replayed, 0);
      Deno.env.set("DDPM_WEBGPU_REPLAY", "0");
      const env = make(schedule, true);
      try {
        await steps(env.trainer, 0, 3);
      } finally {
        Deno.env.delete("DDPM_WEBGPU_REPLAY");
      }
      assert.deepEqual(env.trainer.replayStats, {
        recorded: 0,
        replayed: 0,
        fallback: "DDPM_WEBGPU_REPLAY=0",
      });
      for (const m of [off, env]) {
        m.trainer.dispose();
        m.unet.dispose();
      }
      // Resources: a whole replayed lifecycle leaves what it found.
      const lifecycle = async () => {
        const m = make(schedule, true);
        await steps(m.trainer, 0, 4);
        assert.equal(m.trainer.replayStats.replayed, 2);
        m.trainer.dispose();
        m.unet.dispose();
        // A read submits tfjs's queue and frees what waited on it.
        const one = tf.tidy(() => tf.add(tf.zeros([1]), 1));
        await one.data();
        one.dispose();
      };
      await lifecycle();
      const tensors = tf.memory().numTensors;
      const used = pool().numUsedBuffers;
      const bytes = pool().numBytesUsed;
      await lifecycle();
      assert.equal(tf.memory().numTensors, tensors, "tensors");
      assert.equal(pool().numUsedBuffers, used, "used buffers");
      assert.equal(pool().numBytesUsed, bytes, "bytes used");
      schedule.dispose();
    });
  },
});

Deno.test({
  name:
    "without an EMA, clipping or weight decay, replayed webgpu steps still equal plain ones",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const schedule = makeSchedule({ T: 100 });
      const run = async (replay: boolean) => {
        const unet = new UNet({ base: 8, seed: 2 });
        const trainer = new Trainer(unet, schedule, {
          seed: 3,
          replay,
          ema: false,
          maxGradNorm: Infinity,
          optimizer: { weightDecay: 0 },
        });
        const losses = await steps(trainer, 0, 4);
        const weights = await readAll(unet.params);
        const stats = trainer.replayStats;
        trainer.dispose();
        unet.dispose();
        return { losses, weights, stats };
      };
      const plain = await run(false);
      const replayed = await run(true);
      assert.deepEqual(replayed.losses, plain.losses);
      assertSame(replayed.weights, plain.weights, "weights");
      assert.deepEqual(replayed.stats, {
        recorded: 1,
        replayed: 2,
        fallback: "",
      });
      schedule.dispose();
    });
  },
});

Deno.test({
  name:
    "a training run's checkpoints between replayed steps hold the replayed values: the same bytes as with replays off",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const dirs: string[] = [];
      try {
        const session = async () => {
          const dir = await Deno.makeTempDir({ prefix: "ddpm_replay_run_" });
          dirs.push(dir);
          const run = await TrainingRun.create(dir, {
            model: { base: 8 },
            steps: 4,
            checkpointEvery: 2,
            seed: 2,
            data: { name: "noise", batchSize: 2 },
          });
          const checkpoints: Uint8Array[] = [];
          await run.train({
            batchesPerEpoch: 4,
            batch: noiseBatch,
            onFile: (f) => {
              if (f.kind === "checkpoint") {
                checkpoints.push(Deno.readFileSync(f.path));
              }
            },
          });
          run.dispose();
          return checkpoints;
        };
        const replayed = await session();
        Deno.env.set("DDPM_WEBGPU_REPLAY", "0");
        let plain: Uint8Array[];
        try {
          plain = await session();
        } finally {
          Deno.env.delete("DDPM_WEBGPU_REPLAY");
        }
        // Byte for byte, apart from the elapsed time in the header.
        // Step 1 packs the state, 2 is recorded, 3 and 4 replay.
        assert.equal(replayed.length, 2);
        assert.equal(plain.length, 2);
        replayed.forEach((b, i) => {
          const want = safetensorsData(plain[i]);
          const got = safetensorsData(b);
          assert.ok(
            got.length === want.length && got.every((v, j) => v === want[j]),
            `checkpoint ${i + 1} of 2`,
          );
        });
      } finally {
        for (const d of dirs) await Deno.remove(d, { recursive: true });
      }
    });
  },
});
