import assert from "node:assert/strict";
import { initBackend, makeSchedule, qSample, tf } from "../mod.ts";

await initBackend("cpu");

function close(
  actual: number,
  expected: number,
  rel: number,
  what: string,
): void {
  const err = Math.abs(actual - expected) /
    Math.max(Math.abs(expected), 1e-300);
  assert.ok(
    err <= rel,
    `${what}: got ${actual}, expected ${expected} (rel err ${err})`,
  );
}

Deno.test("linear schedule has the reference endpoints and spacing", () => {
  const s = makeSchedule();
  assert.equal(s.T, 1000);
  assert.equal(s.betas[0], 1e-4);
  close(s.betas[999], 0.02, 1e-15, "beta_999");
  // torch.linspace(1e-4, 0.02, 1000): step (0.02 - 1e-4) / 999
  close(s.betas[500], 1e-4 + 500 * (0.0199 / 999), 1e-13, "beta_500");
  // alpha-bar via a sum of logs, an independent route to the cumulative product
  let logSum = 0;
  for (let i = 0; i < 1000; i++) logSum += Math.log1p(-s.betas[i]);
  close(s.alphasBar[999], Math.exp(logSum), 1e-10, "alphaBar_999");
  // known value of the reference schedule: abar_999 ~ 4.04e-5
  assert.ok(
    s.alphasBar[999] > 4.0e-5 && s.alphasBar[999] < 4.1e-5,
    `abar_999 = ${s.alphasBar[999]}`,
  );
  s.dispose();
});

Deno.test("cosine schedule follows Nichol and Dhariwal's alpha-bar and clips betas at 0.999", () => {
  const T = 1000, sOff = 0.008;
  const s = makeSchedule({ T, kind: "cosine" });
  const f = (t: number) =>
    Math.cos(((t / T + sOff) / (1 + sOff)) * Math.PI / 2) ** 2;
  // Where no beta is clipped, alpha-bar_t = f(t + 1) / f(0).
  for (const t of [0, 10, 500, 900]) {
    close(s.alphasBar[t], f(t + 1) / f(0), 1e-9, `abar_${t}`);
  }
  assert.equal(s.betas[T - 1], 0.999);
  assert.ok(s.betas.every((b) => b > 0 && b <= 0.999));
  s.dispose();
});

Deno.test("posteriorVariance equals the DDIM variance with eta = 1 on the full grid", () => {
  // Song et al. 2021, eq. 16: sigma_t^2 = eta^2 (1 - abar_{t-1}) / (1 - abar_t) (1 - abar_t / abar_{t-1})
  for (const kind of ["linear", "cosine"] as const) {
    const s = makeSchedule({ kind });
    for (let t = 0; t < s.T; t++) {
      const prev = t === 0 ? 1 : s.alphasBar[t - 1];
      const ddim = (1 - prev) / (1 - s.alphasBar[t]) *
        (1 - s.alphasBar[t] / prev);
      const tol = 1e-12 * Math.max(1, s.posteriorVariance[t]);
      assert.ok(
        Math.abs(ddim - s.posteriorVariance[t]) <= tol,
        `${kind} t=${t}: ${ddim} vs ${s.posteriorVariance[t]}`,
      );
    }
    assert.equal(s.posteriorVariance[0], 0);
    s.dispose();
  }
});

Deno.test("qSample is sqrt(abar) x0 + sqrt(1 - abar) eps per image", async () => {
  const s = makeSchedule();
  const before = tf.memory().numTensors;
  const x0 = tf.tensor4d([0.5, -0.25, 1, 0], [2, 1, 2, 1]);
  const eps = tf.tensor4d([1, 2, -1, 0.5], [2, 1, 2, 1]);
  const t = tf.tensor1d([0, 999], "int32");
  const xt = qSample(x0, t, eps, s);
  const got = await xt.data();
  const a0 = 1 - 1e-4, a999 = s.alphasBar[999];
  const expected = [
    Math.sqrt(a0) * 0.5 + Math.sqrt(1 - a0) * 1,
    Math.sqrt(a0) * -0.25 + Math.sqrt(1 - a0) * 2,
    Math.sqrt(a999) * 1 + Math.sqrt(1 - a999) * -1,
    Math.sqrt(a999) * 0 + Math.sqrt(1 - a999) * 0.5,
  ];
  expected.forEach((e, i) => close(got[i], e, 1e-6, `x_t[${i}]`));
  tf.dispose([x0, eps, t, xt]);
  assert.equal(tf.memory().numTensors, before);
  s.dispose();
});

Deno.test("bad schedule options fail with one line naming the input", () => {
  assert.throws(
    () => makeSchedule({ T: 0 }),
    /T must be a positive integer \(got 0\)/,
  );
  assert.throws(() => makeSchedule({ T: 10.5 }), RangeError);
  assert.throws(
    () => makeSchedule({ kind: "quadratic" as never }),
    /unknown kind \(got "quadratic"/,
  );
  assert.throws(
    () => makeSchedule({ betaStart: 0.1, betaEnd: 0.01 }),
    /betaStart <= betaEnd/,
  );
});

Deno.test("qSample rejects mismatched shapes", () => {
  const s = makeSchedule({ T: 10 });
  const x0 = tf.zeros([2, 2, 2, 1]) as tf.Tensor4D;
  const eps = tf.zeros([2, 2, 2, 3]) as tf.Tensor4D;
  const t = tf.tensor1d([0, 1], "int32");
  assert.throws(() => qSample(x0, t, eps, s), /noise shape differs from x0/);
  tf.dispose([x0, eps, t]);
  s.dispose();
});

Deno.test("makeSchedule dispose frees every tensor it made", () => {
  const before = tf.memory().numTensors;
  makeSchedule({ T: 50 }).dispose();
  assert.equal(tf.memory().numTensors, before);
});
