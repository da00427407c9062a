import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { Ema, type EmaConfig, emaDecay } from "../core/ema.ts";

await initBackend("cpu");

function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  tol: number,
): void {
  assert.equal(actual.length, expected.length);
  for (let i = 0; i < expected.length; i++) {
    assert.ok(
      Math.abs(actual[i] - expected[i]) <= tol,
      `[${i}]: got ${actual[i]}, expected ${expected[i]}`,
    );
  }
}

Deno.test("emaDecay is the reference's constant 0.9999 by default, from the first update", () => {
  assert.equal(emaDecay(1), 0.9999);
  assert.equal(emaDecay(12345), 0.9999);
  // updateAfterStep copies for that many updates, then averages.
  assert.equal(emaDecay(2, { updateAfterStep: 2 }), 0);
  assert.equal(emaDecay(3, { updateAfterStep: 2 }), 0.9999);
});

Deno.test("emaDecay follows diffusers' warm-up 1 - (1 + k/invGamma)^-power", () => {
  const warm: Partial<EmaConfig> = { mode: "warmup" };
  // k = n - 1; the first update (k = 0) copies.
  assert.equal(emaDecay(1, warm), 0);
  // k = 1: 1 - 2^(-2/3) = 1 - 0.629960525 = 0.370039475
  assert.ok(Math.abs(emaDecay(2, warm) - 0.3700394750525634) < 1e-15);
  // k = 10: 1 - 11^(-2/3) = 0.797819992
  assert.ok(Math.abs(emaDecay(11, warm) - 0.7978199917664258) < 1e-15);
  // invGamma 2, power 3/4, k = 3: 1 - 2.5^(-0.75) = 0.497026628
  assert.ok(
    Math.abs(
      emaDecay(4, { mode: "warmup", invGamma: 2, power: 0.75 }) -
        0.49702662812682585,
    ) < 1e-15,
  );
  // power 3/4, k = 9999: 1 - 10000^(-3/4) = 1 - 1e-3 = 0.999; capped by decay 0.99.
  assert.ok(
    Math.abs(emaDecay(10000, { mode: "warmup", power: 0.75 }) - 0.999) < 1e-12,
  );
  assert.equal(
    emaDecay(10000, { mode: "warmup", power: 0.75, decay: 0.99 }),
    0.99,
  );
  // updateAfterStep shifts k: with 5, update 7 has k = 1.
  assert.ok(
    Math.abs(
      emaDecay(7, { mode: "warmup", updateAfterStep: 5 }) - 0.3700394750525634,
    ) < 1e-15,
  );
  assert.equal(emaDecay(6, { mode: "warmup", updateAfterStep: 5 }), 0);
});

Deno.test("emaDecay 'ramp' is diffusers' (1 + k)/(10 + k), capped and floored", () => {
  const ramp: Partial<EmaConfig> = { mode: "ramp" };
  assert.equal(emaDecay(1, ramp), 0);
  assert.equal(emaDecay(2, ramp), 2 / 11);
  assert.equal(emaDecay(91, ramp), 91 / 100);
  assert.equal(emaDecay(10 ** 6, { mode: "ramp", decay: 0.999 }), 0.999);
  assert.equal(emaDecay(2, { mode: "ramp", minDecay: 0.5 }), 0.5);
  // min_decay does not apply to the copying updates, as in diffusers.
  assert.equal(emaDecay(1, { mode: "ramp", minDecay: 0.5 }), 0);
});

const START = [1, 2, -4];
const STEPS = [[3, -2, 0], [0, 0, 8], [1, 1, 1]];

function runEma(config: Partial<EmaConfig>): {
  values: Float32Array;
  decays: number[];
} {
  const w = tf.variable(tf.tensor1d(START));
  const params = new Map([["w", w]]);
  const ema = new Ema(params, config);
  const decays: number[] = [];
  for (const p of STEPS) {
    w.assign(tf.tidy(() => tf.tensor1d(p)));
    decays.push(ema.update(params));
  }
  const values = ema.params.get("w")!.dataSync() as Float32Array;
  ema.dispose();
  w.dispose();
  return { values, decays };
}

Deno.test("Ema.update with a constant decay matches hand-computed averages", () => {
  // e1 = 0.9 [1, 2, -4] + 0.1 [3, -2, 0] = [1.2, 1.6, -3.6]
  // e2 = 0.9 e1 + 0.1 [0, 0, 8] = [1.08, 1.44, -2.44]
  // e3 = 0.9 e2 + 0.1 [1, 1, 1] = [1.072, 1.396, -2.096]
  const { values, decays } = runEma({ decay: 0.9 });
  assert.deepEqual(decays, [0.9, 0.9, 0.9]);
  assertClose(values, [1.072, 1.396, -2.096], 1e-6);
});

Deno.test("Ema.update with diffusers' ramp matches hand-computed averages", () => {
  // d = 0, 2/11, 3/12: e1 = [3, -2, 0]; e2 = (2/11) e1 + (9/11) [0, 0, 8] = [6, -4, 72] / 11
  // e3 = (1/4) e2 + (3/4) [1, 1, 1] = [0.886364, 0.659091, 2.386364]
  const { values, decays } = runEma({ mode: "ramp" });
  assert.deepEqual(decays, [0, 2 / 11, 3 / 12]);
  assertClose(values, [39 / 44, 29 / 44, 105 / 44], 1e-6);
});

Deno.test("Ema.update with warm-up after one copying step matches hand-computed averages", () => {
  // updateAfterStep 1: updates 1 and 2 copy (k = 0), update 3 has k = 1, d = 1 - 2^(-2/3).
  const d = 1 - 2 ** (-2 / 3);
  const { values, decays } = runEma({ mode: "warmup", updateAfterStep: 1 });
  assert.deepEqual(decays, [0, 0, d]);
  // e2 = [0, 0, 8]; e3 = d e2 + (1 - d) [1, 1, 1]
  assertClose(values, [1 - d, 1 - d, 8 * d + 1 - d], 1e-6);
  assertClose(values, [0.62996052, 0.62996052, 3.59027633], 1e-6);
});

Deno.test("Ema starts as a copy that later parameter changes do not touch", () => {
  const w = tf.variable(tf.tensor1d([5, 6]));
  const ema = new Ema(new Map([["w", w]]));
  w.assign(tf.tidy(() => tf.tensor1d([0, 0])));
  assert.deepEqual([...ema.params.get("w")!.dataSync()], [5, 6]);
  ema.dispose();
  w.dispose();
});

Deno.test("Ema state round-trips and resumes the update count", () => {
  const w = tf.variable(tf.tensor1d(START));
  const params = new Map([["w", w]]);
  const a = new Ema(params, { mode: "ramp" });
  a.update(params);
  a.update(params);
  const state = a.getState();
  a.dispose();
  const b = new Ema(params, { mode: "ramp" });
  b.setState(state);
  tf.dispose([...state.params.values()]);
  assert.equal(b.optimizationStep, 2);
  // The next update is the third: d = 3/12.
  assert.equal(b.update(params), 3 / 12);
  assert.throws(() => new Ema(params).setState(b.getState()), RangeError);
  b.dispose();
  w.dispose();
});

Deno.test("Ema rejects bad settings and mismatched parameters", () => {
  const w = tf.variable(tf.zeros([2]));
  const params = new Map([["w", w]]);
  assert.throws(() => new Ema(params, { decay: 1.5 }), RangeError);
  assert.throws(
    () => new Ema(params, { mode: "cosine" as EmaConfig["mode"] }),
    RangeError,
  );
  assert.throws(() => new Ema(params, { updateAfterStep: -1 }), RangeError);
  const ema = new Ema(params);
  const wrong = tf.zeros([3]);
  assert.throws(() => ema.update(new Map([["w", wrong]])), TypeError);
  assert.throws(() => ema.update(new Map()), TypeError);
  assert.equal(ema.optimizationStep, 0);
  wrong.dispose();
  ema.dispose();
  w.dispose();
});

Deno.test("Ema leaks no tensors across updates, state and dispose", () => {
  const w = tf.variable(tf.ones([4, 4]));
  const params = new Map([["w", w]]);
  const before = tf.memory().numTensors;
  const ema = new Ema(params, { mode: "warmup" });
  const afterSetup = tf.memory().numTensors;
  for (let i = 0; i < 10; i++) ema.update(params);
  const state = ema.getState();
  ema.setState(state);
  tf.dispose([...state.params.values()]);
  assert.equal(tf.memory().numTensors, afterSetup);
  ema.dispose();
  assert.equal(tf.memory().numTensors, before);
  w.dispose();
});
