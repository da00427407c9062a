import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { AdamW, type AdamWConfig } from "../core/optim.ts";
import { Ema } from "../core/ema.ts";

await initBackend("cpu");

/** torch.optim.AdamW's single-tensor step, written out in float64 (torch/optim/adamw.py). */
function referenceAdamW(
  param: number[],
  grads: number[][],
  c: AdamWConfig,
): { param: number[]; m: number[]; v: number[] } {
  const p = [...param];
  const m = p.map(() => 0);
  const v = p.map(() => 0);
  grads.forEach((g, i) => {
    const step = i + 1;
    for (let j = 0; j < p.length; j++) {
      p[j] *= 1 - c.lr * c.weightDecay;
      m[j] += (g[j] - m[j]) * (1 - c.beta1);
      v[j] = v[j] * c.beta2 + (1 - c.beta2) * g[j] * g[j];
      const stepSize = c.lr / (1 - c.beta1 ** step);
      const denom = Math.sqrt(v[j]) / Math.sqrt(1 - c.beta2 ** step) + c.eps;
      p[j] -= stepSize * m[j] / denom;
    }
  });
  return { param: p, m, v };
}

function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  tol: number,
  what: string,
): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  for (let i = 0; i < expected.length; i++) {
    const scale = Math.max(1, Math.abs(expected[i]));
    assert.ok(
      Math.abs(actual[i] - expected[i]) <= tol * scale,
      `${what}[${i}]: got ${actual[i]}, expected ${expected[i]}`,
    );
  }
}

const W0 = [0.5, -1.25, 2, 0.001, -0.3, 0.75];
// Gradients of mixed sign and scale, one row per step.
const GRADS = [
  [0.1, -0.2, 3, 1e-4, 0, -5],
  [-0.3, 0.25, 2.5, 2e-4, 0.01, -4],
  [0.05, -0.1, -1, -1e-4, 0.02, 6],
  [0.2, 0.2, 0.5, 3e-4, -0.01, -1],
  [-0.15, 0.3, 1.5, 0, 0.03, 2],
];

function runSteps(
  config: Partial<AdamWConfig>,
  grads: number[][],
): { w: Float32Array; m: Float32Array; v: Float32Array; step: number } {
  const w = tf.variable(tf.tensor2d(W0, [2, 3]));
  const opt = new AdamW(new Map([["w", w]]), config);
  for (const g of grads) {
    const gt = tf.tensor2d(g, [2, 3]);
    opt.step(new Map([["w", gt]]));
    gt.dispose();
  }
  const state = opt.getState();
  const out = {
    w: w.dataSync() as Float32Array,
    m: state.expAvg.get("w")!.dataSync() as Float32Array,
    v: state.expAvgSq.get("w")!.dataSync() as Float32Array,
    step: state.step,
  };
  tf.dispose([...state.expAvg.values(), ...state.expAvgSq.values()]);
  opt.dispose();
  w.dispose();
  return out;
}

Deno.test("AdamW matches torch's formula in float64 over five steps (defaults)", () => {
  const defaults: AdamWConfig = {
    lr: 2e-4,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weightDecay: 0.01,
  };
  const got = runSteps({}, GRADS);
  const ref = referenceAdamW(W0, GRADS, defaults);
  assert.equal(got.step, 5);
  assertClose(got.w, ref.param, 1e-6, "param");
  assertClose(got.m, ref.m, 1e-6, "exp_avg");
  assertClose(got.v, ref.v, 1e-6, "exp_avg_sq");
});

Deno.test("AdamW matches torch's formula with a large lr, weight decay and eps", () => {
  const config: AdamWConfig = {
    lr: 0.05,
    beta1: 0.8,
    beta2: 0.99,
    eps: 1e-3,
    weightDecay: 0.1,
  };
  const got = runSteps(config, GRADS);
  const ref = referenceAdamW(W0, GRADS, config);
  assertClose(got.w, ref.param, 2e-6, "param");
  // The update must be visible: it moved far from the start.
  assert.ok(Math.abs(got.w[2] - W0[2]) > 0.1);
});

Deno.test("AdamW's first step moves each weight by lr against the gradient's sign", () => {
  // With weightDecay 0 and eps tiny, mhat / sqrt(vhat) = sign(g) at step 1.
  const got = runSteps({ lr: 0.01, weightDecay: 0, eps: 1e-12 }, [GRADS[0]]);
  const expected = W0.map((w, i) => w - 0.01 * Math.sign(GRADS[0][i]));
  assertClose(got.w, expected, 1e-6, "param");
});

Deno.test("AdamW state round-trips: resuming equals running straight through", () => {
  const straight = runSteps({ lr: 0.01 }, GRADS);

  const w = tf.variable(tf.tensor2d(W0, [2, 3]));
  const first = new AdamW(new Map([["w", w]]), { lr: 0.01 });
  for (const g of GRADS.slice(0, 2)) {
    const gt = tf.tensor2d(g, [2, 3]);
    first.step(new Map([["w", gt]]));
    gt.dispose();
  }
  const state = first.getState();
  first.dispose();
  // Save through plain arrays as a checkpoint would.
  const saved = {
    config: state.config,
    step: state.step,
    expAvg: new Map([[
      "w",
      tf.tensor(state.expAvg.get("w")!.dataSync(), [2, 3]),
    ]]),
    expAvgSq: new Map([[
      "w",
      tf.tensor(state.expAvgSq.get("w")!.dataSync(), [2, 3]),
    ]]),
  };
  tf.dispose([...state.expAvg.values(), ...state.expAvgSq.values()]);
  const second = new AdamW(new Map([["w", w]]), { lr: 0.01 });
  second.setState(saved);
  tf.dispose([...saved.expAvg.values(), ...saved.expAvgSq.values()]);
  assert.equal(second.stepCount, 2);
  for (const g of GRADS.slice(2)) {
    const gt = tf.tensor2d(g, [2, 3]);
    second.step(new Map([["w", gt]]));
    gt.dispose();
  }
  assert.deepEqual(w.dataSync(), straight.w);
  second.dispose();
  w.dispose();
});

Deno.test("AdamW.setState rejects other hyper-parameters and misshapen moments", () => {
  const w = tf.variable(tf.zeros([3]));
  const opt = new AdamW(new Map([["w", w]]));
  const ok = tf.zeros([3]);
  const bad = tf.zeros([4]);
  assert.throws(
    () =>
      opt.setState({
        config: { ...opt.config, lr: 1 },
        step: 1,
        expAvg: new Map([["w", ok]]),
        expAvgSq: new Map([["w", ok]]),
      }),
    RangeError,
  );
  assert.throws(
    () =>
      opt.setState({
        config: { ...opt.config },
        step: 1,
        expAvg: new Map([["w", bad]]),
        expAvgSq: new Map([["w", ok]]),
      }),
    TypeError,
  );
  assert.throws(
    () =>
      opt.setState({
        config: { ...opt.config },
        step: 1,
        expAvg: new Map([["w", ok], ["extra", ok]]),
        expAvgSq: new Map([["w", ok]]),
      }),
    TypeError,
  );
  assert.equal(opt.stepCount, 0);
  tf.dispose([ok, bad]);
  opt.dispose();
  w.dispose();
});

Deno.test("AdamW rejects bad hyper-parameters and gradients", () => {
  const w = tf.variable(tf.zeros([3]));
  const params = new Map([["w", w]]);
  assert.throws(() => new AdamW(params, { lr: -1 }), RangeError);
  assert.throws(() => new AdamW(params, { beta2: 1 }), RangeError);
  const opt = new AdamW(params);
  const g = tf.zeros([2]);
  assert.throws(() => opt.step(new Map([["w", g]])), TypeError);
  assert.throws(() => opt.step(new Map([["v", g]])), TypeError);
  assert.equal(opt.stepCount, 0);
  g.dispose();
  opt.dispose();
  w.dispose();
});

Deno.test("AdamW leaks no tensors across construction, steps, state and dispose", () => {
  const w = tf.variable(tf.randomNormal([4, 5], 0, 1, "float32", 1));
  const before = tf.memory().numTensors;
  const opt = new AdamW(new Map([["w", w]]));
  const g = tf.randomNormal([4, 5], 0, 1, "float32", 2);
  const afterSetup = tf.memory().numTensors;
  for (let i = 0; i < 10; i++) opt.step(new Map([["w", g]]));
  assert.equal(tf.memory().numTensors, afterSetup);
  const state = opt.getState();
  opt.setState(state);
  tf.dispose([...state.expAvg.values(), ...state.expAvgSq.values()]);
  assert.equal(tf.memory().numTensors, afterSetup);
  g.dispose();
  opt.dispose();
  assert.equal(tf.memory().numTensors, before);
  w.dispose();
});

Deno.test("on wasm, AdamW and the EMA run ddpm's update kernels and equal the cpu backend's tfjs ops bit for bit", async () => {
  const sizes = [7, 64, 1, 33]; // lengths not a multiple of 4: the scalar tail
  const run = (config: Partial<AdamWConfig>) => {
    const params = new Map(
      sizes.map((n, i) => [
        `p${i}`,
        tf.variable(tf.randomNormal([n], 0, 1, "float32", 10 + i)),
      ]),
    );
    const opt = new AdamW(params, config);
    const ema = new Ema(params, { decay: 0.9, mode: "constant" });
    for (let step = 0; step < 4; step++) {
      const grads = new Map(
        sizes.map((n, i) => [
          `p${i}`,
          tf.randomNormal([n], 0, 10 ** (i - 2), "float32", 1 + 100 * step + i),
        ]),
      );
      opt.step(grads);
      ema.update(params);
      tf.dispose([...grads.values()]);
    }
    const state = opt.getState();
    const out = [
      ...params.values(),
      ...state.expAvg.values(),
      ...state.expAvgSq.values(),
      ...ema.params.values(),
    ].map((t) => t.dataSync().slice() as Float32Array);
    tf.dispose([...state.expAvg.values(), ...state.expAvgSq.values()]);
    opt.dispose();
    ema.dispose();
    tf.dispose([...params.values()]);
    return out;
  };
  for (
    const config of [
      { lr: 1e-2, weightDecay: 0.01, eps: 1e-8 },
      { lr: 3e-3, weightDecay: 0, beta1: 0.8, beta2: 0.99 },
    ]
  ) {
    await initBackend("wasm");
    const info = await tf.profile(() => {
      run(config);
    });
    const wasm = run(config);
    await initBackend("cpu");
    const cpu = run(config);
    assert.ok(info.kernelNames.includes("DdpmAdamW"), info.kernelNames.join());
    assert.ok(info.kernelNames.includes("DdpmEmaStep"));
    wasm.forEach((a, i) => {
      const b = cpu[i];
      const same = a.length === b.length &&
        a.every((x, j) => Object.is(x, b[j]));
      assert.ok(same, `tensor ${i} with ${JSON.stringify(config)}`);
    });
  }
});
