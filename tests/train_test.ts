import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { makeSchedule, qSample } from "../core/schedule.ts";
import {
  clipGradNorm,
  disposeTrainerState,
  type TrainableModel,
  Trainer,
  type TrainerState,
} from "../core/train.ts";
import { UNet } from "../core/unet.ts";

await initBackend("cpu");

// ---------------------------------------------------------------- clipping

Deno.test("clipGradNorm scales by maxNorm / (norm + 1e-6) as torch, computed by hand", () => {
  // Global norm of [3, 4] and [[12]]: sqrt(9 + 16 + 144) = 13.
  const g = new Map<string, tf.Tensor>([
    ["a", tf.tensor1d([3, 4])],
    ["b", tf.tensor2d([[12]])],
  ]);
  const { grads, norm } = clipGradNorm(g, 1);
  assert.ok(Math.abs(norm.dataSync()[0] - 13) < 1e-5);
  const coef = 1 / (13 + 1e-6);
  const a = grads.get("a")!.dataSync();
  const b = grads.get("b")!.dataSync();
  assert.ok(
    Math.abs(a[0] - 3 * coef) < 1e-7 && Math.abs(a[1] - 4 * coef) < 1e-7,
  );
  assert.ok(Math.abs(b[0] - 12 * coef) < 1e-7);
  assert.deepEqual(grads.get("b")!.shape, [1, 1]);
  // The clipped norm is maxNorm (up to the 1e-6).
  assert.ok(Math.abs(Math.hypot(a[0], a[1], b[0]) - 1) < 1e-6);
  tf.dispose([norm, ...grads.values()]);

  // Within bounds: unchanged, bit for bit, and the norm still reported.
  const loose = clipGradNorm(g, 26);
  assert.deepEqual([...loose.grads.get("a")!.dataSync()], [3, 4]);
  assert.deepEqual([...loose.grads.get("b")!.dataSync()], [12]);
  assert.ok(Math.abs(loose.norm.dataSync()[0] - 13) < 1e-5);
  tf.dispose([loose.norm, ...loose.grads.values(), ...g.values()]);
});

Deno.test("clipGradNorm leaks nothing and rejects maxNorm <= 0", () => {
  const g = new Map([["a", tf.tensor1d([1, 2, 2])]]);
  const before = tf.memory().numTensors;
  const { grads, norm } = clipGradNorm(g, 0.5);
  assert.equal(tf.memory().numTensors, before + 2);
  tf.dispose([norm, ...grads.values()]);
  assert.equal(tf.memory().numTensors, before);
  assert.throws(() => clipGradNorm(g, 0), RangeError);
  g.get("a")!.dispose();
});

// ------------------------------------------------------- a model by hand

/**
 * eps_theta(x, t) = w x: a one-parameter model whose gradient is known in
 * closed form, dL/dw = 2 mean((w x_t - eps) x_t). It records its inputs.
 */
function scalarModel(w0: number): TrainableModel & {
  w: tf.Variable;
  seen: { x: Float32Array; t: Int32Array }[];
  dispose(): void;
} {
  const w = tf.variable(tf.scalar(w0));
  const seen: { x: Float32Array; t: Int32Array }[] = [];
  return {
    w,
    seen,
    params: new Map([["w", w]]),
    predict(x: tf.Tensor4D, t: tf.Tensor1D): tf.Tensor4D {
      seen.push({
        x: x.dataSync() as Float32Array,
        t: t.dataSync() as Int32Array,
      });
      return tf.mul(w, x) as tf.Tensor4D;
    },
    dispose() {
      w.dispose();
    },
  };
}

/** A small conv net, NHWC, with a timestep bias: enough weights for clipping and AdamW to matter. */
function convModel(seed: number): TrainableModel & { dispose(): void } {
  const p = new Map<string, tf.Variable>([
    [
      "conv1.weight",
      tf.variable(tf.randomNormal([3, 3, 1, 4], 0, 0.3, "float32", seed)),
    ],
    ["conv1.bias", tf.variable(tf.zeros([4]))],
    [
      "temb.weight",
      tf.variable(tf.randomNormal([1, 4], 0, 0.3, "float32", seed + 1)),
    ],
    [
      "conv2.weight",
      tf.variable(tf.randomNormal([3, 3, 4, 1], 0, 0.3, "float32", seed + 2)),
    ],
    ["conv2.bias", tf.variable(tf.zeros([1]))],
  ]);
  return {
    params: p,
    predict(x: tf.Tensor4D, t: tf.Tensor1D): tf.Tensor4D {
      return tf.tidy(() => {
        const tt = tf.reshape(tf.div(tf.cast(t, "float32"), 100), [-1, 1]);
        const temb = tf.reshape(tf.matMul(tt, p.get("temb.weight")!), [
          -1,
          1,
          1,
          4,
        ]);
        let h = tf.conv2d(x, p.get("conv1.weight")! as tf.Tensor4D, 1, "same");
        h = tf.relu(tf.add(tf.add(h, p.get("conv1.bias")!), temb));
        const out = tf.conv2d(
          h as tf.Tensor4D,
          p.get("conv2.weight")! as tf.Tensor4D,
          1,
          "same",
        );
        return tf.add(out, p.get("conv2.bias")!) as tf.Tensor4D;
      });
    },
    dispose() {
      for (const v of p.values()) v.dispose();
    },
  };
}

function fixedBatch(n: number, size: number, seed: number): tf.Tensor4D {
  return tf.tidy(() =>
    tf.clipByValue(
      tf.randomNormal([n, size, size, 1], 0, 0.5, "float32", seed),
      -1,
      1,
    )
  ) as tf.Tensor4D;
}

Deno.test("trainStep's loss, gradient norm and update match a float64 computation from its inputs", async () => {
  const schedule = makeSchedule({ T: 1000 });
  const model = scalarModel(0.3);
  const lr = 0.01;
  const trainer = new Trainer(model, schedule, {
    seed: 5,
    optimizer: { lr, weightDecay: 0.01 },
    ema: { decay: 0.5 },
  });
  const x0 = fixedBatch(8, 4, 1);
  const x0v = x0.dataSync();
  const { step, loss, gradNorm } = await trainer.trainStep(x0);
  assert.equal(step, 1);
  // Recover eps from what the model saw: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar).
  const { x: xt, t } = model.seen[0];
  const per = xt.length / 8;
  let sse = 0;
  let dw = 0;
  const eps: number[] = [];
  for (let i = 0; i < xt.length; i++) {
    const ti = t[Math.floor(i / per)];
    assert.ok(ti >= 0 && ti < 1000 && Number.isInteger(ti));
    const e = (xt[i] - schedule.sqrtAlphasBar[ti] * x0v[i]) /
      schedule.sqrtOneMinusAlphasBar[ti];
    eps.push(e);
    sse += (0.3 * xt[i] - e) ** 2;
    dw += 2 * (0.3 * xt[i] - e) * xt[i] / xt.length;
  }
  assert.ok(Math.abs(loss - sse / xt.length) < 1e-4 * loss, `loss ${loss}`);
  assert.ok(Math.abs(gradNorm - Math.abs(dw)) < 1e-4 * Math.abs(dw));
  // eps looks like N(0, 1) draws (128 values).
  const mean = eps.reduce((s, e) => s + e, 0) / eps.length;
  const varE = eps.reduce((s, e) => s + (e - mean) ** 2, 0) / eps.length;
  assert.ok(
    Math.abs(mean) < 0.4 && varE > 0.6 && varE < 1.5,
    `${mean} ${varE}`,
  );
  // The first AdamW step moves w by lr against sign(dL/dw), whatever the clipping.
  const w1 = 0.3 * (1 - lr * 0.01) - lr * Math.sign(dw);
  assert.ok(Math.abs(model.w.dataSync()[0] - w1) < 1e-6);
  // EMA with decay 0.5 from w0: 0.3 - 0.5 (0.3 - w1).
  const e1 = trainer.ema!.params.get("w")!.dataSync()[0];
  assert.ok(Math.abs(e1 - (0.3 - 0.5 * (0.3 - w1))) < 1e-6);
  trainer.dispose();
  model.dispose();
  x0.dispose();
  schedule.dispose();
});

Deno.test("trainStep draws timesteps spread over all of 0..T-1", async () => {
  const schedule = makeSchedule({ T: 10 });
  const model = scalarModel(0);
  const trainer = new Trainer(model, schedule, { ema: false });
  const x0 = fixedBatch(50, 2, 2);
  for (let i = 0; i < 20; i++) await trainer.trainStep(x0);
  const counts = new Array(10).fill(0);
  for (const { t } of model.seen) for (const ti of t) counts[ti]++;
  // 1000 draws, 100 expected per value; a chi-square of 9 dof above 40 has p < 1e-5.
  const chi2 = counts.reduce((s, c) => s + (c - 100) ** 2 / 100, 0);
  assert.ok(chi2 < 40, `counts ${counts}`);
  // Each step draws anew.
  assert.notDeepEqual([...model.seen[0].t], [...model.seen[1].t]);
  trainer.dispose();
  model.dispose();
  x0.dispose();
  schedule.dispose();
});

Deno.test("trainStep throws a RangeError naming the step on a non-finite loss, changing nothing", async () => {
  const schedule = makeSchedule({ T: 100 });
  const model = convModel(3);
  const trainer = new Trainer(model, schedule);
  const good = fixedBatch(2, 4, 3);
  await trainer.trainStep(good);
  const before = new Map(
    [...model.params].map(([k, v]) => [k, v.dataSync().slice()]),
  );
  const emaBefore = trainer.ema!.params.get("conv1.weight")!.dataSync().slice();
  const tensors = tf.memory().numTensors;
  const bad = tf.tidy(() =>
    tf.concat([tf.fill([1, 4, 4, 1], NaN), tf.zeros([1, 4, 4, 1])])
  ) as tf.Tensor4D;
  await assert.rejects(
    () => trainer.trainStep(bad),
    (e: Error) =>
      e instanceof RangeError && /step 2\b/.test(e.message) &&
      /loss/.test(e.message),
  );
  bad.dispose();
  assert.equal(tf.memory().numTensors, tensors);
  assert.equal(trainer.step, 1);
  assert.equal(trainer.optimizer.stepCount, 1);
  for (const [k, v] of model.params) {
    assert.deepEqual(v.dataSync(), before.get(k));
  }
  assert.deepEqual(
    trainer.ema!.params.get("conv1.weight")!.dataSync(),
    emaBefore,
  );
  trainer.dispose();
  model.dispose();
  good.dispose();
  schedule.dispose();
});

Deno.test("trainStep rejects a batch that is not float32 NHWC", async () => {
  const schedule = makeSchedule({ T: 10 });
  const model = scalarModel(0);
  const trainer = new Trainer(model, schedule);
  const x = tf.zeros([2, 4, 4]);
  await assert.rejects(
    () => trainer.trainStep(x as unknown as tf.Tensor4D),
    TypeError,
  );
  x.dispose();
  assert.throws(() => new Trainer(model, schedule, { seed: -1 }), RangeError);
  assert.throws(
    () => new Trainer(model, schedule, { maxGradNorm: 0 }),
    RangeError,
  );
  trainer.dispose();
  model.dispose();
  schedule.dispose();
});

async function losses(
  trainer: Trainer,
  x0: tf.Tensor4D,
  n: number,
): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) out.push((await trainer.trainStep(x0)).loss);
  return out;
}

Deno.test("the same seed gives the same loss sequence; another seed another", async () => {
  const schedule = makeSchedule({ T: 100 });
  const x0 = fixedBatch(4, 6, 4);
  const run = async (seed: number) => {
    const model = convModel(11);
    const trainer = new Trainer(model, schedule, {
      seed,
      optimizer: { lr: 1e-2 },
    });
    const l = await losses(trainer, x0, 6);
    trainer.dispose();
    model.dispose();
    return l;
  };
  const a = await run(1);
  const b = await run(1);
  const c = await run(2);
  assert.deepEqual(a, b);
  assert.notDeepEqual(a, c);
  x0.dispose();
  schedule.dispose();
});

function weights(m: ReadonlyMap<string, tf.Tensor>): Map<string, Float32Array> {
  return new Map([...m].map(([k, v]) => [k, v.dataSync() as Float32Array]));
}

/** Round-trip a state through host arrays, as a checkpoint file would. */
function throughHost(state: TrainerState): TrainerState {
  const copy = (m: Map<string, tf.Tensor>) =>
    new Map(
      [...m].map(([k, v]) =>
        [k, tf.tensor(v.dataSync(), v.shape)] as [string, tf.Tensor]
      ),
    );
  const json = JSON.parse(JSON.stringify({
    step: state.step,
    seed: state.seed,
    maxGradNorm: state.maxGradNorm,
    optimizer: { config: state.optimizer.config, step: state.optimizer.step },
    ema: {
      config: state.ema!.config,
      optimizationStep: state.ema!.optimizationStep,
    },
  }));
  return {
    ...json,
    params: copy(state.params),
    optimizer: {
      ...json.optimizer,
      expAvg: copy(state.optimizer.expAvg),
      expAvgSq: copy(state.optimizer.expAvgSq),
    },
    ema: { ...json.ema, params: copy(state.ema!.params) },
  };
}

async function checkResume(
  makeModel: (seed: number) => TrainableModel & { dispose(): void },
  x0: tf.Tensor4D,
  n: number,
): Promise<void> {
  const schedule = makeSchedule({ T: 1000 });
  const options = {
    seed: 9,
    optimizer: { lr: 1e-2 },
    ema: { mode: "warmup" as const },
  };
  // Straight through: 2n steps.
  const modelA = makeModel(1);
  const a = new Trainer(modelA, schedule, options);
  const lossesA = await losses(a, x0, 2 * n);
  // n steps, save, resume into a fresh model with other weights, n steps.
  const modelB = makeModel(1);
  const b = new Trainer(modelB, schedule, options);
  const lossesB = await losses(b, x0, n);
  const saved = b.getState();
  const state = throughHost(saved);
  disposeTrainerState(saved);
  b.dispose();
  modelB.dispose();
  const modelC = makeModel(2);
  const c = Trainer.fromState(modelC, schedule, state);
  disposeTrainerState(state);
  assert.equal(c.step, n);
  lossesB.push(...await losses(c, x0, n));
  assert.deepEqual(lossesB, lossesA);
  for (
    const [name, pa, pc] of [
      ["weights", modelA.params, modelC.params],
      ["EMA", a.ema!.params, c.ema!.params],
    ] as const
  ) {
    const wa = weights(pa);
    const wc = weights(pc);
    for (const [k, v] of wa) {
      const u = wc.get(k)!;
      for (let i = 0; i < v.length; i++) {
        assert.ok(
          Math.abs(v[i] - u[i]) <= 1e-6,
          `${name} ${k}[${i}]: ${v[i]} vs ${u[i]}`,
        );
      }
    }
  }
  const sa = a.optimizer.getState();
  const sc = c.optimizer.getState();
  assert.equal(sc.step, sa.step);
  assert.deepEqual(weights(sc.expAvgSq), weights(sa.expAvgSq));
  for (const s of [sa, sc]) {
    tf.dispose([...s.expAvg.values(), ...s.expAvgSq.values()]);
  }
  a.dispose();
  c.dispose();
  modelA.dispose();
  modelC.dispose();
  schedule.dispose();
}

Deno.test("2N steps equal N steps, state saved and restored into a fresh trainer, N steps (conv model, cpu)", async () => {
  const x0 = fixedBatch(4, 8, 6);
  await checkResume(convModel, x0, 4);
  x0.dispose();
});

Deno.test("Trainer.setState refuses a state with other settings and changes nothing", () => {
  const schedule = makeSchedule({ T: 10 });
  const model = convModel(1);
  const trainer = new Trainer(model, schedule, { seed: 1 });
  const state = trainer.getState();
  const before = tf.memory().numTensors;
  const w0 = model.params.get("conv1.weight")!.dataSync().slice();
  const zero = tf.zerosLike(state.params.get("conv1.weight")!);
  const other = new Map(state.params);
  other.set("conv1.weight", zero);
  assert.throws(
    () => trainer.setState({ ...state, params: other, seed: 2 }),
    RangeError,
  );
  assert.throws(
    () =>
      trainer.setState({
        ...state,
        params: other,
        ema: { ...state.ema!, config: { ...state.ema!.config, decay: 0.5 } },
      }),
    RangeError,
  );
  assert.throws(
    () =>
      trainer.setState({
        ...state,
        params: other,
        optimizer: {
          ...state.optimizer,
          config: { ...state.optimizer.config, lr: 1 },
        },
      }),
    RangeError,
  );
  other.delete("conv2.bias");
  assert.throws(() => trainer.setState({ ...state, params: other }), TypeError);
  assert.deepEqual(model.params.get("conv1.weight")!.dataSync(), w0);
  zero.dispose();
  assert.equal(tf.memory().numTensors, before);
  disposeTrainerState(state);
  trainer.dispose();
  model.dispose();
  schedule.dispose();
});

// ------------------------------------------------------------ the UNet

function tinyUNet(seed: number): UNet {
  return new UNet({ base: 8, seed });
}

/** Noise-prediction MSE at fixed timesteps and noise: a yardstick independent of the training draws. */
function evalLoss(
  unet: UNet,
  schedule: ReturnType<typeof makeSchedule>,
  x0: tf.Tensor4D,
): number {
  return tf.tidy(() => {
    const n = x0.shape[0];
    let total = 0;
    for (const [k, ts] of [[0, 100], [1, 400], [2, 700], [3, 950]].entries()) {
      const t = tf.tensor1d(new Array(n).fill(ts[1]), "int32");
      const eps = tf.randomNormal(
        x0.shape,
        0,
        1,
        "float32",
        1000 + k,
      ) as tf.Tensor4D;
      const xt = qSample(x0, t, eps, schedule);
      total +=
        tf.mean(tf.squaredDifference(unet.predict(xt, t), eps)).dataSync()[0];
    }
    return total / 4;
  });
}

Deno.test("a tiny UNet's noise-prediction loss on a fixed batch falls over 30 steps (wasm)", async () => {
  await initBackend("wasm");
  try {
    const schedule = makeSchedule({ T: 1000 });
    const unet = tinyUNet(1);
    const trainer = new Trainer(unet, schedule, {
      seed: 1,
      optimizer: { lr: 1e-3 },
    });
    const x0 = fixedBatch(4, 16, 7);
    const before = evalLoss(unet, schedule, x0);
    const l = await losses(trainer, x0, 30);
    const after = evalLoss(unet, schedule, x0);
    assert.ok(after < 0.6 * before, `eval loss ${before} -> ${after}`);
    const mean = (a: number[]) => a.reduce((s, v) => s + v, 0) / a.length;
    assert.ok(mean(l.slice(-10)) < 0.75 * mean(l.slice(0, 10)), `${l}`);
    trainer.dispose();
    unet.dispose();
    x0.dispose();
    schedule.dispose();
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("training a UNet keeps tf.memory().numTensors flat over 20 steps (wasm)", async () => {
  await initBackend("wasm");
  try {
    const schedule = makeSchedule({ T: 1000 });
    const before = tf.memory().numTensors;
    const unet = tinyUNet(2);
    const trainer = new Trainer(unet, schedule);
    const x0 = fixedBatch(2, 8, 8);
    await trainer.trainStep(x0);
    const afterFirst = tf.memory().numTensors;
    for (let i = 0; i < 19; i++) await trainer.trainStep(x0);
    assert.equal(tf.memory().numTensors, afterFirst);
    disposeTrainerState(trainer.getState());
    assert.equal(tf.memory().numTensors, afterFirst);
    trainer.dispose();
    unet.dispose();
    x0.dispose();
    assert.equal(tf.memory().numTensors, before);
    schedule.dispose();
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("2N UNet steps equal N steps, state saved and restored into a fresh UNet, N steps (cpu)", async () => {
  const x0 = fixedBatch(2, 8, 9);
  await checkResume(tinyUNet, x0, 3);
  x0.dispose();
});

Deno.test("training on wasm follows the cpu backend's losses and gradient norms", async () => {
  const run = async (backend: "cpu" | "wasm") => {
    await initBackend(backend);
    const schedule = makeSchedule({ T: 1000 });
    const unet = tinyUNet(3);
    const trainer = new Trainer(unet, schedule, {
      seed: 4,
      optimizer: { lr: 1e-3 },
    });
    const x0 = fixedBatch(2, 8, 10);
    const out: number[] = [];
    for (let i = 0; i < 5; i++) {
      const r = await trainer.trainStep(x0);
      out.push(r.loss, r.gradNorm);
    }
    trainer.dispose();
    unet.dispose();
    x0.dispose();
    schedule.dispose();
    return out;
  };
  try {
    const wasm = await run("wasm");
    const cpu = await run("cpu");
    for (let i = 0; i < cpu.length; i++) {
      assert.ok(Number.isFinite(wasm[i]));
      assert.ok(
        Math.abs(wasm[i] - cpu[i]) <= 1e-3 * Math.abs(cpu[i]),
        `[${i}] wasm ${wasm[i]} cpu ${cpu[i]}`,
      );
    }
  } finally {
    await initBackend("cpu");
  }
});

Deno.test("trainStep calls made before the previous one settles run one after the other, as if awaited", async () => {
  const schedule = makeSchedule({ T: 100 });
  const x = fixedBatch(2, 4, 5);
  const run = async (together: boolean) => {
    const model = convModel(7);
    const trainer = new Trainer(model, schedule, { seed: 9 });
    const losses = together
      ? (await Promise.all([0, 1, 2].map(() => trainer.trainStep(x)))).map(
        (r) => r.loss,
      )
      : [
        (await trainer.trainStep(x)).loss,
        (await trainer.trainStep(x)).loss,
        (await trainer.trainStep(x)).loss,
      ];
    const w = model.params.get("conv1.weight")!.dataSync().slice();
    const step = trainer.step;
    trainer.dispose();
    model.dispose();
    return { losses, w, step };
  };
  const apart = await run(false);
  const together = await run(true);
  assert.equal(together.step, 3);
  assert.deepEqual(together.losses, apart.losses);
  assert.deepEqual(together.w, apart.w);
  x.dispose();
  schedule.dispose();
});
