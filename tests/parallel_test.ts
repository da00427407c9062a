import assert from "node:assert/strict";
import { evalInChild, lastJson } from "./_util.ts";
import { initBackend, tf } from "../core/backend.ts";
import { makeSchedule } from "../core/schedule.ts";
import { disposeTrainerState, Trainer } from "../core/train.ts";
import { UNet } from "../core/unet.ts";
import {
  pack,
  packedBytes,
  type ShardInput,
  shardLoss,
  shardRows,
  unpack,
} from "../core/_parallel.ts";

await initBackend("cpu");

Deno.test("shardRows cuts a batch into contiguous shards, larger first, as by hand", () => {
  assert.deepEqual(shardRows(5, 2), [[0, 3], [3, 2]]);
  assert.deepEqual(shardRows(7, 3), [[0, 3], [3, 2], [5, 2]]);
  assert.deepEqual(shardRows(6, 3), [[0, 2], [2, 2], [4, 2]]);
  // Fewer rows than shards: the empty ones are left out.
  assert.deepEqual(shardRows(2, 4), [[0, 1], [1, 1]]);
  assert.deepEqual(shardRows(1, 1), [[0, 1]]);
});

Deno.test("a shard's arrays travel in a shared buffer: unpacked equal to what was packed, as copies, with or without weights", () => {
  const shape: [number, number, number, number] = [2, 1, 3, 1];
  const input = (weights: Float32Array[] | null): ShardInput => ({
    weights,
    xt: Float32Array.from([1, 2, 3, 4, 5, 6]),
    eps: Float32Array.from([-1, -2, -3, -4, -5, -6]),
    t: Int32Array.from([7, 999]),
    shape,
    total: 12,
  });
  for (
    const weights of [
      [Float32Array.from([0.5]), Float32Array.from([1, 2])],
      null,
    ]
  ) {
    const sent = input(weights);
    const buffer = new SharedArrayBuffer(packedBytes(sent));
    assert.equal(packedBytes(sent), 4 * ((weights === null ? 0 : 3) + 14));
    pack(buffer, sent);
    const got = unpack({
      kind: "step",
      id: 1,
      buffer,
      weights: weights?.map((w) => w.length) ?? null,
      shape,
      total: 12,
    });
    // Copies: the pool rewrites the buffer for the next step.
    new Uint8Array(buffer).fill(0);
    const plain = (x: ShardInput) =>
      JSON.stringify([
        x.weights?.map((w) => Array.from(w)) ?? null,
        Array.from(x.xt),
        Array.from(x.eps),
        Array.from(x.t),
        x.shape,
        x.total,
      ]);
    assert.equal(plain(got), plain(sent));
    assert.ok(!(got.xt.buffer instanceof SharedArrayBuffer));
  }
});

Deno.test("shardLoss of the shards adds up to the batch's mean squared error", () => {
  const pred = tf.tensor2d([[1, 2], [3, 4], [5, 6]]);
  const eps = tf.tensor2d([[0, 0], [1, 1], [2, 2]]);
  // Squared errors 1 4 | 4 9 | 9 16: mean 43 / 6.
  const a = shardLoss(
    tf.slice(pred, [0, 0], [2, 2]),
    tf.slice(eps, [0, 0], [2, 2]),
    6,
  );
  const b = shardLoss(
    tf.slice(pred, [2, 0], [1, 2]),
    tf.slice(eps, [2, 0], [1, 2]),
    6,
  );
  assert.ok(Math.abs(a.dataSync()[0] - 18 / 6) < 1e-6);
  assert.ok(Math.abs(b.dataSync()[0] - 25 / 6) < 1e-6);
  tf.dispose([pred, eps, a, b]);
});

function batch(n: number, seed: number): tf.Tensor4D {
  return tf.tidy(() =>
    tf.clipByValue(
      tf.randomNormal([n, 8, 8, 1], 0, 0.5, "float32", seed),
      -1,
      1,
    )
  ) as tf.Tensor4D;
}

function maxRelDiff(a: Float32Array, b: Float32Array): number {
  let scale = 0;
  for (const v of b) scale = Math.max(scale, Math.abs(v));
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d / Math.max(scale, 1e-12);
}

interface Run {
  losses: number[];
  norms: number[];
  params: Map<string, Float32Array>;
  ema: Map<string, Float32Array>;
  expAvgSq: Map<string, Float32Array>;
}

async function train(workers: number, n: number, steps: number): Promise<Run> {
  const schedule = makeSchedule({ T: 1000 });
  const unet = new UNet({ base: 8, seed: 11 });
  const trainer = new Trainer(unet, schedule, {
    seed: 5,
    workers,
    // A large rate and a small clip so the updates and clipping matter;
    // Adam's eps well above float noise, so that a gradient entry that is
    // zero up to rounding cannot flip the sign of an lr-sized update.
    optimizer: { lr: 1e-2, eps: 1e-3 },
    maxGradNorm: 0.5,
    ema: { decay: 0.9 },
  });
  const x0 = batch(n, 3);
  const losses: number[] = [];
  const norms: number[] = [];
  try {
    for (let i = 0; i < steps; i++) {
      const r = await trainer.trainStep(x0);
      losses.push(r.loss);
      norms.push(r.gradNorm);
    }
    const state = trainer.getState();
    const read = (m: Map<string, tf.Tensor>) =>
      new Map([...m].map(([k, v]) => [k, v.dataSync() as Float32Array]));
    const run = {
      losses,
      norms,
      params: read(state.params),
      ema: read(state.ema!.params),
      expAvgSq: read(state.optimizer.expAvgSq),
    };
    disposeTrainerState(state);
    return run;
  } finally {
    trainer.dispose();
    unet.dispose();
    x0.dispose();
    schedule.dispose();
  }
}

function assertSameRun(got: Run, want: Run, what: string): void {
  for (let i = 0; i < want.losses.length; i++) {
    assert.ok(
      Math.abs(got.losses[i] - want.losses[i]) <= 1e-5 * want.losses[i],
      `${what}: loss ${i} ${got.losses[i]} vs ${want.losses[i]}`,
    );
    assert.ok(
      Math.abs(got.norms[i] - want.norms[i]) <= 1e-5 * want.norms[i],
      `${what}: gradient norm ${i} ${got.norms[i]} vs ${want.norms[i]}`,
    );
  }
  for (const part of ["params", "ema", "expAvgSq"] as const) {
    assert.equal(got[part].size, want[part].size);
    for (const [k, v] of want[part]) {
      const d = maxRelDiff(got[part].get(k)!, v);
      assert.ok(d < 1e-4, `${what}: ${part} ${k} differs by ${d}`);
    }
  }
}

Deno.test("a trainer with workers takes the single-threaded step: same losses, norms, weights, EMA and moments", async () => {
  const before = tf.memory().numTensors;
  // Five images: shards of 3 + 2 and 2 + 2 + 1, so uneven splits are covered.
  const want = await train(1, 5, 3);
  // The reference moved: the updates are not trivially zero.
  assert.ok(want.losses.every((l) => Number.isFinite(l) && l > 0));
  for (const workers of [2, 3]) {
    assertSameRun(await train(workers, 5, 3), want, `${workers} workers`);
  }
  assert.equal(tf.memory().numTensors, before);
});

Deno.test("a trainer with workers and a batch of one computes on its own thread", async () => {
  const want = await train(1, 1, 2);
  assertSameRun(await train(2, 1, 2), want, "batch of one");
});

Deno.test("Trainer.fromState resumes with workers exactly as without", async () => {
  const schedule = makeSchedule({ T: 100 });
  const x0 = batch(4, 8);
  const runFrom = async (workers: number) => {
    const unet = new UNet({ base: 8, seed: 1 });
    const first = new Trainer(unet, schedule, { seed: 2 });
    await first.trainStep(x0);
    const state = first.getState();
    first.dispose();
    const resumed = Trainer.fromState(unet, schedule, state, { workers });
    disposeTrainerState(state);
    const r = await resumed.trainStep(x0);
    const w = unet.params.get("out_conv.weight")!.dataSync() as Float32Array;
    assert.equal(resumed.step, 2);
    assert.equal(resumed.workers, workers);
    resumed.dispose();
    unet.dispose();
    return { loss: r.loss, w };
  };
  const a = await runFrom(1);
  const b = await runFrom(2);
  assert.ok(Math.abs(a.loss - b.loss) <= 1e-5 * a.loss);
  assert.ok(maxRelDiff(b.w, a.w) < 1e-4);
  x0.dispose();
  schedule.dispose();
});

Deno.test("workers must be 1..8 or auto, and more than one needs a UNet", () => {
  const schedule = makeSchedule({ T: 10 });
  const unet = new UNet({ base: 8, seed: 1 });
  for (const bad of [0, 9, 1.5, -1]) {
    assert.throws(
      () => new Trainer(unet, schedule, { workers: bad }),
      RangeError,
    );
  }
  const w = tf.variable(tf.scalar(0));
  const model = {
    params: new Map([["w", w]]),
    predict: (x: tf.Tensor4D) => tf.mul(w, x) as tf.Tensor4D,
  };
  assert.throws(() => new Trainer(model, schedule, { workers: 2 }), TypeError);
  // "auto" on a model workers cannot rebuild: no workers.
  const auto = new Trainer(model, schedule, { workers: "auto" });
  assert.equal(auto.workers, 1);
  auto.dispose();
  const byCores = new Trainer(unet, schedule, { workers: "auto" });
  assert.equal(
    byCores.workers,
    Math.min(8, Math.max(1, navigator.hardwareConcurrency)),
  );
  byCores.dispose();
  w.dispose();
  unet.dispose();
  schedule.dispose();
});

Deno.test("a program that never disposes its trainer with workers still exits when done, cleanly", async () => {
  const url = (p: string) => new URL(p, import.meta.url).href;
  // The 200 ms of idleness at the end made Deno 2.9 crash (SIGSEGV) in
  // about a third of the runs before pools disposed themselves at exit:
  // three runs catch that with probability of about 3 in 4.
  for (let run = 0; run < 3; run++) {
    const code = `
    import { initBackend, tf } from "${url("../core/backend.ts")}";
    import { makeSchedule } from "${url("../core/schedule.ts")}";
    import { Trainer } from "${url("../core/train.ts")}";
    import { UNet } from "${url("../core/unet.ts")}";
    await initBackend("cpu");
    const unet = new UNet({ base: 8, seed: 1 });
    const trainer = new Trainer(unet, makeSchedule({ T: 10 }), { workers: 2 });
    const x0 = tf.zeros([4, 8, 8, 1]);
    const r = await trainer.trainStep(x0);
    console.log(JSON.stringify({ step: r.step, workers: trainer.workers, finite: Number.isFinite(r.loss) }));
    await new Promise((done) => setTimeout(done, 200));
  `;
    // Fails if it hangs.
    const out = await evalInChild(code, {}, 30_000);
    assert.equal(
      out.code,
      0,
      `exit ${out.code} ${out.signal ?? ""}: ${out.stderr}`,
    );
    assert.deepEqual(lastJson(out.stdout), {
      step: 1,
      workers: 2,
      finite: true,
    });
  }
});
