/**
 * Tests of the sampler plugins against references that do not come from this
 * code: hand-derived grids and numpy's, the closed-form optimal denoiser of a
 * Gaussian, the closed-form probability-flow ODE solution, and float64 moment
 * recursions of the stochastic samplers.
 *
 * The data model: x0 ~ N(mu, s^2) per pixel, independent. Then
 * x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar) and the optimal noise prediction
 * is eps*(x_t, t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar).
 * The probability-flow ODE is linear per pixel, so its flow from level a to
 * level b is the increasing affine map between the two Gaussian marginals:
 * x_b = sqrt(b) mu + sqrt(b s^2 + 1 - b) (x_a - sqrt(a) mu) / sqrt(a s^2 + 1 - a)
 * (checked against an RK4 integration of the ODE with 2e5 steps in log-sigma:
 * agreement to 1e-14). mu = 0.1, s = 0.3 keep samples within [-1, 1] but for
 * P(|z| > 3) ~ 0.1 %, whose clamp moves the mean and std by under 1e-4.
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { extract, makeSchedule, type Schedule } from "../core/schedule.ts";
import {
  type EpsModel,
  getSampler,
  listSamplers,
  registerSampler,
  type SamplerPlugin,
  type StepInfo,
} from "../samplers/registry.ts";
import { sampleDdpm } from "../samplers/ddpm.ts";
import { sampleDdim } from "../samplers/ddim.ts";
import { sampleDpmSolver } from "../samplers/dpm_solver.ts";
import { sampleEuler } from "../samplers/euler.ts";
import { sampleHeun } from "../samplers/heun.ts";
import { invertDdim, slerp } from "../samplers/ddim_inversion.ts";
import {
  ddimSigma,
  makeDdimTimesteps,
  makeTimesteps,
  type Spacing,
} from "../samplers/math.ts";
import { validateSamplerOptions } from "../samplers/options.ts";
import { UNet } from "../core/unet.ts";

await initBackend("cpu");

const MU = 0.1;
const S = 0.3;
const schedule = makeSchedule({ T: 1000 });

/** The exact noise predictor for x0 ~ N(mu, s^2) per pixel. */
function gaussianEps(sched: Schedule, mu = MU, s = S): EpsModel {
  return (x, t) =>
    tf.tidy(() => {
      const ab = extract(sched.tensors.alphasBar, t);
      const centred = tf.sub(x, tf.mul(tf.sqrt(ab), mu));
      const denom = tf.add(tf.mul(ab, s * s), tf.sub(1, ab));
      return tf.div(tf.mul(tf.sqrt(tf.sub(1, ab)), centred), denom);
    }) as tf.Tensor4D;
}
const exactEps = gaussianEps(schedule);

/** Sample mean and standard deviation of all values. */
function moments(x: tf.Tensor): { mean: number; std: number; n: number } {
  const d = x.dataSync();
  let m = 0;
  for (const v of d) m += v;
  m /= d.length;
  let ss = 0;
  for (const v of d) ss += (v - m) ** 2;
  return { mean: m, std: Math.sqrt(ss / (d.length - 1)), n: d.length };
}

/** Run fn, dispose what it returns, and check no tensor was left behind. */
async function noLeak<T extends tf.TensorContainer>(
  fn: () => Promise<T>,
): Promise<T extends tf.Tensor ? number[] : void> {
  const before = tf.memory().numTensors;
  const out = await fn();
  const values = out instanceof tf.Tensor ? Array.from(out.dataSync()) : [];
  tf.dispose(out);
  assert.equal(tf.memory().numTensors, before, "tensors left behind");
  return values as T extends tf.Tensor ? number[] : void;
}

// ---------------------------------------------------------------- grids

Deno.test("makeDdimTimesteps builds range(0, T, T // numSteps) and appends T-1", () => {
  const by20 = Array.from({ length: 50 }, (_, i) => 20 * i);
  assert.deepEqual(makeDdimTimesteps(1000, 50), [...by20, 999]);
  assert.deepEqual(makeDdimTimesteps(1000, 4), [0, 250, 500, 750, 999]);
  // 333 * 3 = 999 is already T-1: nothing appended
  assert.deepEqual(makeDdimTimesteps(1000, 3), [0, 333, 666, 999]);
  // stride 142: 0 .. 994, then 999
  const seven = makeDdimTimesteps(1000, 7);
  assert.equal(seven.length, 9);
  assert.deepEqual(seven.slice(-3), [852, 994, 999]);
  assert.deepEqual(
    makeDdimTimesteps(1000, 1000),
    Array.from({ length: 1000 }, (_, i) => i),
  );
  // stride 1 from numSteps > T / 2: the full grid
  assert.equal(makeDdimTimesteps(1000, 600).length, 1000);
  assert.deepEqual(makeDdimTimesteps(1000, 1), [0, 999]);
});

Deno.test("makeTimesteps matches numpy / diffusers for trailing and linspace (half-to-even rounding)", () => {
  // values printed by numpy 2.4: np.round(np.arange(T, 0, -T / n)) - 1 and
  // np.linspace(0, T - 1, n).round()
  const trailing: Record<number, number[]> = {
    10: [99, 199, 299, 399, 499, 599, 699, 799, 899, 999],
    16: [
      61,
      124,
      187,
      249,
      311,
      374,
      437,
      499,
      561,
      624,
      687,
      749,
      811,
      874,
      937,
      999,
    ],
    7: [142, 285, 428, 570, 713, 856, 999],
    3: [332, 666, 999],
  };
  const linspace: Record<number, number[]> = {
    10: [0, 111, 222, 333, 444, 555, 666, 777, 888, 999],
    16: [
      0,
      67,
      133,
      200,
      266,
      333,
      400,
      466,
      533,
      599,
      666,
      733,
      799,
      866,
      932,
      999,
    ],
    7: [0, 166, 333, 500, 666, 832, 999],
    3: [0, 500, 999],
  };
  for (const n of [10, 16, 7, 3]) {
    assert.deepEqual(
      makeTimesteps(schedule, n, { spacing: "trailing" }),
      trailing[n],
    );
    assert.deepEqual(
      makeTimesteps(schedule, n, { spacing: "linspace" }),
      linspace[n],
    );
  }
  assert.deepEqual(makeTimesteps(schedule, 1, { spacing: "linspace" }), [999]);
  assert.deepEqual(makeTimesteps(schedule, 20), makeDdimTimesteps(1000, 20));
});

Deno.test("makeTimesteps karras rounds Karras sigmas to the nearest timestep in log-sigma", () => {
  // numpy: argmin |log sigma_t - log sigma_karras| with rho = 7
  assert.deepEqual(makeTimesteps(schedule, 10, { spacing: "karras" }), [
    0,
    18,
    102,
    301,
    511,
    663,
    775,
    864,
    937,
    999,
  ]);
  const hundred = makeTimesteps(schedule, 100, { spacing: "karras" });
  assert.equal(hundred.length, 99); // two levels round to the same timestep
  assert.deepEqual(hundred.slice(0, 12), [
    0,
    1,
    2,
    3,
    4,
    6,
    7,
    10,
    12,
    15,
    18,
    22,
  ]);
  assert.deepEqual(hundred.slice(-3), [988, 994, 999]);
});

Deno.test("ddimSigma with eta = 1 on the full grid squares to DDPM's posterior variance", () => {
  const ts = makeDdimTimesteps(1000, 1000);
  for (let i = 0; i < ts.length; i++) {
    const t = ts[i];
    const abarPrev = i === 0 ? 1 : schedule.alphasBar[ts[i - 1]];
    const sigma = ddimSigma(schedule.alphasBar[t], abarPrev, 1);
    const want = schedule.posteriorVariance[t];
    assert.ok(
      Math.abs(sigma * sigma - want) <= 1e-12 * Math.max(want, 1e-12),
      `t = ${t}: ${sigma * sigma} vs ${want}`,
    );
  }
  assert.equal(ddimSigma(0.3, 0.5, 0), 0);
  // by hand: 0.5 sqrt((0.2 / 0.5) (1 - 0.5 / 0.8)) = 0.5 sqrt(0.15)
  assert.ok(Math.abs(ddimSigma(0.5, 0.8, 0.5) - 0.5 * Math.sqrt(0.15)) < 1e-15);
});

Deno.test("sampleDdpm's last step is Algorithm 2's mean, without noise", async () => {
  for (const variance of ["posterior", "betas"] as const) {
    let before: Float32Array | null = null;
    const got = await noLeak(() =>
      sampleDdpm(exactEps, schedule, {
        n: 4,
        imgSize: 2,
        seed: 5,
        variance,
        onStep: ({ i, x }) => {
          if (i === 998) before = x.dataSync() as Float32Array;
        },
      })
    );
    // x_{-1} = (x_0 - beta_0 / sqrt(1 - abar_0) eps*(x_0, 0)) / sqrt(alpha_0)
    const b0 = schedule.betas[0];
    const a0 = schedule.alphasBar[0];
    const want = Array.from(before!, (x) => {
      const eps = Math.sqrt(1 - a0) * (x - Math.sqrt(a0) * MU) /
        (a0 * S * S + 1 - a0);
      const mean = (x - b0 / Math.sqrt(1 - a0) * eps) / Math.sqrt(1 - b0);
      return Math.min(1, Math.max(-1, mean));
    });
    got.forEach((v, i) =>
      assert.ok(
        Math.abs(v - want[i]) < 1e-5,
        `${variance} ${i}: ${v} vs ${want[i]}`,
      )
    );
  }
});

// ------------------------------------------------- DDPM and DDIM agree

Deno.test("sampleDdim with eta = 1 on the full grid gives DDPM's samples from the same seed", async () => {
  const common = { n: 16, imgSize: 4, seed: 7 };
  const ddpm = await noLeak(() => sampleDdpm(exactEps, schedule, common));
  const ddim = await noLeak(() =>
    sampleDdim(exactEps, schedule, {
      ...common,
      numSteps: 1000,
      eta: 1,
      clipX0: false,
    })
  );
  const diff = Math.max(...ddpm.map((v, i) => Math.abs(v - ddim[i])));
  assert.ok(diff < 1e-4, `max |ddpm - ddim| = ${diff}`);
  // and the agreement is not trivial: another seed moves every sample
  const other = await noLeak(() =>
    sampleDdpm(exactEps, schedule, { ...common, seed: 8 })
  );
  const moved = Math.min(...ddpm.map((v, i) => Math.abs(v - other[i])));
  assert.ok(
    ddpm.filter((v, i) => Math.abs(v - other[i]) < 1e-3).length < 4,
    `seed changes too little (${moved})`,
  );
});

// ------------------------------------------------ statistics, exact denoiser

/**
 * Float64 moment recursion of an ancestral (affine + Gaussian) sampler under
 * the exact denoiser: each step is x' = A x + B + c z, so the mean and
 * variance of x follow m' = A m + B, v' = A^2 v + c^2 exactly. This is a
 * second implementation of the DDIM update (x0 and eps from eps*, then
 * eq. 12) written on numbers, not tensors.
 */
function ddimMoments(ts: number[], eta: number): { mean: number; std: number } {
  const ab = schedule.alphasBar;
  let m = 0;
  let v = 1;
  for (let i = ts.length - 1; i >= 0; i--) {
    const a = ab[ts[i]];
    const ap = i > 0 ? ab[ts[i - 1]] : 1;
    const sig2 = eta * eta * (1 - ap) / (1 - a) * (1 - a / ap);
    const d = a * S * S + 1 - a;
    const c1 = Math.sqrt(1 - a) / d; // eps* = c1 x + c0
    const c0 = -Math.sqrt(1 - a) * Math.sqrt(a) * MU / d;
    // x_prev = sqrt(ap) (x - sqrt(1-a) eps) / sqrt(a) + sqrt(1 - ap - sig2) eps + sig z
    const ce = Math.sqrt(1 - ap - sig2) - Math.sqrt(ap * (1 - a) / a);
    const A = Math.sqrt(ap / a) + ce * c1;
    m = A * m + ce * c0;
    v = A * A * v + sig2;
  }
  return { mean: m, std: Math.sqrt(v) };
}

/** The same recursion for DDPM with variance beta_t ("betas") instead of beta-tilde_t. */
function ddpmBetasMoments(): { mean: number; std: number } {
  const { alphasBar: ab, betas } = schedule;
  let m = 0;
  let v = 1;
  for (let t = 999; t >= 0; t--) {
    const a = ab[t];
    const d = a * S * S + 1 - a;
    const c1 = Math.sqrt(1 - a) / d;
    const c0 = -Math.sqrt(1 - a) * Math.sqrt(a) * MU / d;
    // Algorithm 2: x' = (x - beta / sqrt(1 - abar) eps) / sqrt(alpha) + sigma z
    const k = betas[t] / Math.sqrt(1 - a);
    const A = (1 - k * c1) / Math.sqrt(1 - betas[t]);
    m = A * m - k * c0 / Math.sqrt(1 - betas[t]);
    v = A * A * v + (t > 0 ? betas[t] : 0);
  }
  return { mean: m, std: Math.sqrt(v) };
}

// Samples: n = 256 images of 4x4x1 = 4096 independent values. Standard errors:
// mean s / sqrt(N) = 0.0047, std s / sqrt(2N) = 0.0033; we allow 5 of each.
// Discretisation: the samplers do not reproduce N(mu, s^2) exactly. Float64
// moment recursions above give, at the step counts used, std 0.2963 (DDPM
// posterior), 0.3009 (DDPM betas), 0.2985 (DDIM eta 0, 1000 steps), and the
// deterministic solvers' affine maps (computed in numpy) std 0.2972 (Euler,
// 500 linspace), 0.3002 (DPM-Solver++ 100 leading), 0.3003 (Heun 100):
// all within 0.004 of s, so we allow 0.005 on top of the 5 standard errors.
const N_STAT = 256 * 16;
const TOL_MEAN = 5 * S / Math.sqrt(N_STAT) + 0.002;
const TOL_STD = 5 * S / Math.sqrt(2 * N_STAT) + 0.005;

function assertGaussian(
  name: string,
  got: number[],
  predicted?: { mean: number; std: number },
): void {
  const x = tf.tensor(got);
  const { mean, std } = moments(x);
  x.dispose();
  assert.ok(
    Math.abs(mean - MU) < TOL_MEAN,
    `${name}: mean ${mean}, expected ${MU} +- ${TOL_MEAN}`,
  );
  assert.ok(
    Math.abs(std - S) < TOL_STD,
    `${name}: std ${std}, expected ${S} +- ${TOL_STD}`,
  );
  if (predicted) {
    // the recursion's own claim, and the samples against it within 5 standard errors
    assert.ok(
      Math.abs(predicted.std - S) < 0.005,
      `${name}: predicted std ${predicted.std}`,
    );
    const se = 5 * predicted.std / Math.sqrt(2 * N_STAT);
    assert.ok(
      Math.abs(std - predicted.std) < se,
      `${name}: std ${std} vs predicted ${predicted.std} +- ${se}`,
    );
  }
}

const STAT = { n: 256, imgSize: 4, seed: 11 };

Deno.test("sampleDdpm (posterior variance) samples have the data's mean and std", async () => {
  const got = await noLeak(() => sampleDdpm(exactEps, schedule, STAT));
  assertGaussian(
    "ddpm posterior",
    got,
    ddimMoments(makeDdimTimesteps(1000, 1000), 1),
  );
});

Deno.test("sampleDdpm (betas variance) samples have the data's mean and std", async () => {
  const got = await noLeak(() =>
    sampleDdpm(exactEps, schedule, { ...STAT, variance: "betas" })
  );
  assertGaussian("ddpm betas", got, ddpmBetasMoments());
});

Deno.test("sampleDdim eta = 0 and eta = 0.5 samples have the data's mean and std", async () => {
  const full = makeDdimTimesteps(1000, 1000);
  const det = await noLeak(() =>
    sampleDdim(exactEps, schedule, { ...STAT, numSteps: 1000 })
  );
  assertGaussian("ddim eta 0", det, ddimMoments(full, 0));
  const half = await noLeak(() =>
    sampleDdim(exactEps, schedule, { ...STAT, numSteps: 1000, eta: 0.5 })
  );
  assertGaussian("ddim eta 0.5", half, ddimMoments(full, 0.5));
});

Deno.test("sampleDpmSolver, sampleEuler and sampleHeun samples have the data's mean and std", async () => {
  const runs: [string, () => Promise<tf.Tensor4D>][] = [
    [
      "dpm_solver",
      () => sampleDpmSolver(exactEps, schedule, { ...STAT, numSteps: 100 }),
    ],
    [
      "euler",
      () => sampleEuler(exactEps, schedule, { ...STAT, numSteps: 500 }),
    ],
    ["heun", () => sampleHeun(exactEps, schedule, { ...STAT, numSteps: 100 })],
  ];
  for (const [name, run] of runs) assertGaussian(name, await noLeak(run));
});

// ------------------------------------------- probability-flow ODE accuracy

/** x_T values spread over [-2.5, 2.5], one per image of 1x1x1. */
const XT_VALUES = Array.from({ length: 51 }, (_, i) => -2.5 + 0.1 * i);

/** Exact PF-ODE flow of the Gaussian from level a to level b. */
function flow(x: number, a: number, b: number): number {
  return Math.sqrt(b) * MU +
    Math.sqrt(b * S * S + 1 - b) * (x - Math.sqrt(a) * MU) /
      Math.sqrt(a * S * S + 1 - a);
}

/**
 * The reference for a deterministic solver on a grid: the exact ODE from
 * T-1 down to the grid's lowest timestep t0, then the step into the clean
 * image that every solver here takes the same way (x0 = E[x0 | x_t0], the
 * exact denoiser's). That last step is fixed by the grid, not by the solver,
 * and its own error (about 5e-4 for t0 = 0) does not shrink with steps; the
 * reference removes it so the solvers' convergence shows.
 */
function reference(t0: number): number[] {
  const ab = schedule.alphasBar;
  const a0 = ab[t0];
  return XT_VALUES.map((x) => {
    const xt0 = flow(x, ab[999], a0);
    return MU + S * S * Math.sqrt(a0) * (xt0 - Math.sqrt(a0) * MU) /
        (a0 * S * S + 1 - a0);
  });
}

type Solver = (
  spacing: Spacing,
  numSteps: number,
  xT: tf.Tensor4D,
) => Promise<tf.Tensor4D>;
const SOLVERS: Record<string, Solver> = {
  ddim: (spacing, numSteps, xT) =>
    sampleDdim(exactEps, schedule, { xT, numSteps, spacing, clipX0: false }),
  dpm_solver: (spacing, numSteps, xT) =>
    sampleDpmSolver(exactEps, schedule, { xT, numSteps, spacing }),
  euler: (spacing, numSteps, xT) =>
    sampleEuler(exactEps, schedule, { xT, numSteps, spacing }),
  heun: (spacing, numSteps, xT) =>
    sampleHeun(exactEps, schedule, { xT, numSteps, spacing }),
};

async function odeError(
  solver: string,
  spacing: Spacing,
  numSteps: number,
): Promise<number> {
  const xT = tf.tensor4d(XT_VALUES, [XT_VALUES.length, 1, 1, 1]);
  const got = await noLeak(() => SOLVERS[solver](spacing, numSteps, xT));
  xT.dispose();
  const want = reference(makeTimesteps(schedule, numSteps, { spacing })[0]);
  return Math.max(...got.map((v, i) => Math.abs(v - want[i])));
}

const STEPS = [10, 20, 50, 100, 200];

async function errorTable(spacing: Spacing): Promise<Record<string, number[]>> {
  const table: Record<string, number[]> = {};
  for (const name of Object.keys(SOLVERS)) {
    table[name] = [];
    for (const k of STEPS) table[name].push(await odeError(name, spacing, k));
  }
  return table;
}

Deno.test("on the Karras grid DDIM converges at first order, DPM-Solver++ and Heun at second", async () => {
  const e = await errorTable("karras");
  const rate = (xs: number[], i: number) => xs[i] / xs[i + 1];
  // 50 -> 100 -> 200 steps: first order halves the error, second order quarters it
  for (const i of [2, 3]) {
    assert.ok(
      rate(e.ddim, i) > 1.7 && rate(e.ddim, i) < 2.4,
      `ddim rate ${rate(e.ddim, i)}`,
    );
    assert.ok(
      rate(e.dpm_solver, i) > 3.2,
      `dpm_solver rate ${rate(e.dpm_solver, i)}`,
    );
    assert.ok(rate(e.heun, i) > 3.2, `heun rate ${rate(e.heun, i)}`);
  }
  for (let i = 0; i < STEPS.length; i++) {
    assert.ok(
      e.dpm_solver[i] < e.ddim[i] / 3,
      `${STEPS[i]} steps: dpm ${e.dpm_solver[i]} vs ddim ${e.ddim[i]}`,
    );
  }
  // DESIGN's measurement for a mixture: 0.037 at 20 Karras steps; 0.03 here
  assert.ok(
    e.dpm_solver[1] < 0.04,
    `dpm_solver at 20 Karras steps: ${e.dpm_solver[1]}`,
  );
  assert.ok(
    e.dpm_solver[4] < 5e-4,
    `dpm_solver at 200 Karras steps: ${e.dpm_solver[4]}`,
  );
});

Deno.test("on the reference's leading grid DPM-Solver++ beats DDIM from 20 steps and Euler is DDIM", async () => {
  const e = await errorTable("leading");
  for (let i = 1; i < STEPS.length; i++) {
    assert.ok(
      e.dpm_solver[i] < e.ddim[i] * 0.7,
      `${STEPS[i]} steps: dpm ${e.dpm_solver[i]} vs ddim ${e.ddim[i]}`,
    );
    assert.ok(e.ddim[i] < e.ddim[i - 1], "ddim error grows with steps");
    assert.ok(e.heun[i] < e.heun[i - 1], "heun error grows with steps");
    // Euler in sigma and DDIM with eta = 0 are the same update (Karras et al. 2022)
    assert.ok(
      Math.abs(e.euler[i] - e.ddim[i]) < 1e-4,
      `euler ${e.euler[i]} vs ddim ${e.ddim[i]}`,
    );
  }
  assert.ok(e.dpm_solver[3] < 0.002 && e.dpm_solver[2] < 0.02);
  // the first-order step into t = 0 (lowerOrderFinal) matters: without it, 50 steps are worse than DDIM's
  const xT = tf.tensor4d(XT_VALUES, [XT_VALUES.length, 1, 1, 1]);
  const textbook = await noLeak(() =>
    sampleDpmSolver(exactEps, schedule, {
      xT,
      numSteps: 50,
      lowerOrderFinal: false,
    })
  );
  xT.dispose();
  const want = reference(0);
  const err = Math.max(...textbook.map((v, i) => Math.abs(v - want[i])));
  assert.ok(
    err > 5 * e.dpm_solver[2],
    `textbook 2M ${err} vs lower-order final ${e.dpm_solver[2]}`,
  );
});

Deno.test("sampleDdim with eta = 0 is deterministic given xT, whatever the seed", async () => {
  const xT = tf.randomNormal([4, 4, 4, 1], 0, 1, "float32", 3) as tf.Tensor4D;
  const a = await noLeak(() =>
    sampleDdim(exactEps, schedule, { xT, numSteps: 20, seed: 1 })
  );
  const b = await noLeak(() =>
    sampleDdim(exactEps, schedule, { xT, numSteps: 20, seed: 2 })
  );
  assert.deepEqual(a, b);
  const c = await noLeak(() =>
    sampleDdim(exactEps, schedule, { xT, numSteps: 20, seed: 1, eta: 0.5 })
  );
  const d = await noLeak(() =>
    sampleDdim(exactEps, schedule, { xT, numSteps: 20, seed: 2, eta: 0.5 })
  );
  assert.notDeepEqual(c, d);
  // the same seed without xT draws the same xT
  const e = await noLeak(() =>
    sampleDdim(exactEps, schedule, { n: 4, imgSize: 4, numSteps: 20, seed: 5 })
  );
  const f = await noLeak(() =>
    sampleDdim(exactEps, schedule, { n: 4, imgSize: 4, numSteps: 20, seed: 5 })
  );
  assert.deepEqual(e, f);
  xT.dispose();
});

Deno.test("sampleDpmSolver clipX0 keeps every predicted x0 in [-1, 1]; off, x0 = x_t / sqrt(abar) leaves it", async () => {
  // eps = 0 makes the predicted x0 x_t / sqrt(abar_t), about 150 x_t at t = T-1
  const zeroEps = (x: tf.Tensor4D) => tf.zerosLike(x) as tf.Tensor4D;
  const ranges: Record<string, number> = {};
  for (const clipX0 of [true, false]) {
    let worst = 0;
    const out = await sampleDpmSolver(zeroEps, schedule, {
      n: 2,
      imgSize: 4,
      numSteps: 5,
      seed: 1,
      clipX0,
      onStep: async ({ x0 }) => {
        const v = await x0.data();
        for (const e of v) worst = Math.max(worst, Math.abs(e));
      },
    });
    out.dispose();
    ranges[String(clipX0)] = worst;
  }
  assert.ok(ranges.true <= 1, `clipped x0 reached ${ranges.true}`);
  assert.ok(ranges.false > 10, `unclipped x0 only reached ${ranges.false}`);
});

// ------------------------------------------------------------- inversion

Deno.test("invertDdim then sampleDdim returns the image, more closely as steps grow", async () => {
  // images drawn from the data distribution itself, values in [-0.8, 1]
  const z = Array.from({ length: 32 }, (_, i) => -3 + 6 * (i + 0.5) / 32);
  const x0 = tf.tensor4d(z.map((v) => MU + S * v * 0.95), [2, 4, 4, 1]);
  const want = Array.from(x0.dataSync());
  const errors: number[] = [];
  const latentErrors: number[] = [];
  for (const numSteps of [10, 50, 200]) {
    const latent = await invertDdim(exactEps, schedule, x0, { numSteps });
    const back = await noLeak(() =>
      sampleDdim(exactEps, schedule, { xT: latent, numSteps, clipX0: false })
    );
    // the exact inverse: PF-ODE from the clean level to T-1
    const lat = latent.dataSync();
    const ab = schedule.alphasBar[999];
    latentErrors.push(
      Math.max(...want.map((v, i) => Math.abs(lat[i] - flow(v, 1, ab)))),
    );
    latent.dispose();
    errors.push(Math.max(...back.map((v, i) => Math.abs(v - want[i]))));
  }
  // DDIM inversion is first order: the error falls about as 1 / steps
  // (numpy, same setting: 0.43, 0.10, 0.026 at 10, 50, 200 steps)
  assert.ok(
    errors[0] / errors[1] > 3 && errors[1] / errors[2] > 3,
    `errors ${errors}`,
  );
  assert.ok(errors[2] < 0.04, `error at 200 steps: ${errors[2]}`);
  assert.ok(latentErrors[2] < latentErrors[0], `latent errors ${latentErrors}`);
  await noLeak(() => invertDdim(exactEps, schedule, x0, { numSteps: 5 }));
  x0.dispose();
});

Deno.test("slerp follows the great circle and falls back to lerp for parallel latents", () => {
  const a = tf.tensor4d([1, 0], [1, 1, 1, 2]);
  const b = tf.tensor4d([0, 1], [1, 1, 1, 2]);
  const p = tf.tensor4d([3, 0], [1, 1, 1, 2]);
  const before = tf.memory().numTensors;
  const out = slerp(a, b, [0, 0.5, 1, 1 / 3]);
  assert.deepEqual(out.shape, [4, 1, 1, 2]);
  const v = out.dataSync();
  // 90 degrees apart: weight w lands at angle w * 90 degrees
  const want = [
    1,
    0,
    Math.SQRT1_2,
    Math.SQRT1_2,
    0,
    1,
    Math.cos(Math.PI / 6),
    Math.sin(Math.PI / 6),
  ];
  want.forEach((w, i) =>
    assert.ok(Math.abs(v[i] - w) < 1e-5, `${i}: ${v[i]} vs ${w}`)
  );
  const lerp = slerp(a, p, 0.5); // theta = 0: (1 + 3) / 2
  assert.deepEqual(Array.from(lerp.dataSync()), [2, 0]);
  tf.dispose([out, lerp]);
  assert.equal(tf.memory().numTensors, before);
  assert.throws(
    () => slerp(a, tf.zeros([1, 1, 1, 3]) as tf.Tensor4D, 0.5),
    TypeError,
  );
  tf.dispose([a, b, p]);
});

// ------------------------------------------------------------- registry

Deno.test("a plugin defined in a test registers and runs through getSampler", async () => {
  // a one-step "sampler": x0 = predicted x0 at T-1
  const oneStep: SamplerPlugin<
    { n?: number; imgSize?: number; scale?: number }
  > = {
    name: "test_one_step",
    description: "predict x0 from x_T in one step (test plugin)",
    options: {
      scale: { type: "number", description: "x0 scale", default: 1, min: 0 },
    },
    sample(model, sched, options = {}) {
      const o = validateSamplerOptions(
        "test_one_step",
        this.options,
        options,
        sched.T,
      );
      return Promise.resolve(tf.tidy(() => {
        const x = tf.zeros([
          o.n as number,
          o.imgSize as number,
          o.imgSize as number,
          1,
        ]) as tf.Tensor4D;
        const t = tf.fill([o.n as number], sched.T - 1, "int32") as tf.Tensor1D;
        const eps = (model as EpsModel)(x, t);
        const ab = sched.alphasBar[sched.T - 1];
        const x0 = tf.div(
          tf.sub(x, tf.mul(eps, Math.sqrt(1 - ab))),
          Math.sqrt(ab),
        );
        return tf.clipByValue(
          tf.mul(x0, o.scale as number),
          -1,
          1,
        ) as tf.Tensor4D;
      }));
    },
  };
  registerSampler(oneStep);
  assert.ok(listSamplers().some((s) => s.name === "test_one_step"));
  const got = await noLeak(() =>
    getSampler("test_one_step").sample(exactEps, schedule, {
      n: 2,
      imgSize: 2,
      scale: 1,
    })
  );
  // x_T = 0: eps* = -sqrt(1-ab) sqrt(ab) mu / d, so x0 = (1 - ab) mu / d
  const ab = schedule.alphasBar[999];
  const want = (1 - ab) * MU / (ab * S * S + 1 - ab);
  got.forEach((v) => assert.ok(Math.abs(v - want) < 1e-6, `${v} vs ${want}`));
  assert.throws(
    () => registerSampler(oneStep),
    (e: Error) => e instanceof RangeError && /name is taken/.test(e.message),
  );
});

Deno.test("the built-in samplers are listed with typed option schemas", () => {
  const names = listSamplers().map((s) => s.name);
  for (const name of ["ddpm", "ddim", "dpm_solver", "euler", "heun"]) {
    assert.ok(names.includes(name), `${name} missing from ${names}`);
  }
  const ddim = getSampler("ddim");
  assert.deepEqual(ddim.options.eta, {
    type: "number",
    description: "noise scale: 0 deterministic, 1 as DDPM",
    default: 0,
    min: 0,
    max: 1,
  });
  assert.equal(ddim.options.numSteps.type, "int");
  for (const s of listSamplers()) {
    assert.ok(s.description.length > 0 && !s.description.includes("\n"));
  }
});

// ------------------------------------------------------ errors and memory

/** Assert fn rejects with one line of the given class matching re, leaving no tensor. */
async function rejectsOneLine(
  fn: () => Promise<unknown>,
  ErrorClass: ErrorConstructor | RangeErrorConstructor | TypeErrorConstructor,
  re: RegExp,
): Promise<void> {
  const before = tf.memory().numTensors;
  await assert.rejects(fn, (e: Error) => {
    assert.ok(e instanceof ErrorClass, `${e.constructor.name}: ${e.message}`);
    assert.match(e.message, re);
    assert.ok(!e.message.includes("\n"), "message spans lines");
    assert.match(e.message, /^Cannot /);
    return true;
  });
  assert.equal(tf.memory().numTensors, before, "tensors left behind");
}

Deno.test("bad options fail with one clear line each", async () => {
  const m = exactEps;
  await rejectsOneLine(
    () => sampleDdim(m, schedule, { numSteps: 0 }),
    RangeError,
    /numSteps out of range \(got 0, expected in \[1, T = 1000\]\)/,
  );
  await rejectsOneLine(
    () => sampleDdim(m, schedule, { numSteps: 1001 }),
    RangeError,
    /numSteps out of range \(got 1001/,
  );
  await rejectsOneLine(
    () => sampleDdim(m, schedule, { eta: -0.1 }),
    RangeError,
    /eta out of range \(got -0.1, expected in \[0, 1\]\)/,
  );
  await rejectsOneLine(
    () => sampleDdim(m, schedule, { eta: 1.5 }),
    RangeError,
    /eta out of range/,
  );
  await rejectsOneLine(
    () => sampleDdpm(m, schedule, { n: 2.5 }),
    RangeError,
    /n must be an integer \(got 2.5/,
  );
  await rejectsOneLine(
    () => sampleDpmSolver(m, schedule, { spacing: "cosine" as Spacing }),
    RangeError,
    /unknown spacing \(got "cosine", expected one of leading, trailing, linspace, karras\)/,
  );
  await rejectsOneLine(
    () => sampleEuler(m, schedule, { numStep: 5 } as never),
    TypeError,
    /unknown option "numStep"/,
  );
  await rejectsOneLine(
    () => sampleHeun(m, schedule, { eta: "1" } as never),
    TypeError,
    /unknown option "eta"/,
  );
  await rejectsOneLine(
    () => sampleDdim(m, schedule, { eta: "1" as unknown as number }),
    TypeError,
    /eta must be a number/,
  );
  const xT = tf.zeros([2, 4, 4, 1]) as tf.Tensor4D;
  await rejectsOneLine(
    () => sampleDdim(m, schedule, { xT, n: 3 }),
    TypeError,
    /xT does not match n/,
  );
  await rejectsOneLine(
    () =>
      sampleDdim((_x) => tf.zeros([1, 2, 2, 1]) as tf.Tensor4D, schedule, {
        xT,
      }),
    TypeError,
    /model returned the wrong shape \(got \[1,2,2,1\], expected \[2,4,4,1\]\)/,
  );
  xT.dispose();
  await rejectsOneLine(
    () => sampleDdim(42 as unknown as EpsModel, schedule),
    TypeError,
    /model is not usable/,
  );
  await rejectsOneLine(
    () => Promise.resolve().then(() => getSampler("plms")),
    RangeError,
    /unknown name \(got "plms", expected one of ddpm, ddim, dpm_solver, euler, heun/,
  );
  const flat = tf.zeros([4]);
  await rejectsOneLine(
    () => invertDdim(m, schedule, flat as never, {}),
    TypeError,
    /images must be a float32 NHWC tensor/,
  );
  flat.dispose();
  await rejectsOneLine(
    () => Promise.resolve().then(() => makeDdimTimesteps(1000, 0)),
    RangeError,
    /numSteps out of range \(got 0/,
  );
});

Deno.test("every sampler leaves no tensor behind, and a UNet-like object is accepted", async () => {
  const unetLike = {
    predict: (x: tf.Tensor4D, t: tf.Tensor1D) => exactEps(x, t),
  };
  const common = { n: 2, imgSize: 4, seed: 3 };
  for (
    const plugin of listSamplers().filter((s) => !s.name.startsWith("test_"))
  ) {
    const options = plugin.name === "ddpm"
      ? common
      : { ...common, numSteps: 10 };
    const got = await noLeak(() => plugin.sample(unetLike, schedule, options));
    assert.equal(got.length, 32, plugin.name);
    assert.ok(
      got.every((v) => v >= -1 && v <= 1),
      `${plugin.name} leaves [-1, 1]`,
    );
  }
});

Deno.test("onStep sees every step, and an abort stops the run without leaking", async () => {
  const seen: StepInfo[] = [];
  const shapes: string[] = [];
  await noLeak(() =>
    sampleDdim(exactEps, schedule, {
      n: 2,
      imgSize: 4,
      numSteps: 4,
      onStep: (s) => {
        seen.push({ ...s });
        shapes.push(`${s.x.shape}|${s.x0.shape}`);
      },
    })
  );
  assert.deepEqual(seen.map((s) => s.t), [999, 750, 500, 250, 0]);
  assert.deepEqual(seen.map((s) => s.i), [0, 1, 2, 3, 4]);
  assert.ok(seen.every((s) => s.steps === 5));
  assert.ok(shapes.every((s) => s === "2,4,4,1|2,4,4,1"));
  assert.ok(
    seen.every((s) => s.x.isDisposed && s.x0.isDisposed),
    "step tensors outlive the callback",
  );

  const controller = new AbortController();
  let calls = 0;
  await rejectsOneLine(
    () =>
      sampleDpmSolver(exactEps, schedule, {
        n: 2,
        imgSize: 4,
        numSteps: 20,
        signal: controller.signal,
        onStep: ({ i }) => {
          calls++;
          if (i === 3) {
            controller.abort(new Error("Cannot continue: stopped by test"));
          }
        },
      }),
    Error,
    /stopped by test/,
  );
  assert.equal(calls, 4);
  // a timer abort lands between steps too
  await rejectsOneLine(
    () =>
      sampleDdpm(exactEps, schedule, {
        n: 1,
        imgSize: 2,
        signal: AbortSignal.timeout(5),
      }).catch((e) => {
        throw new Error(`Cannot finish: ${e.name}`);
      }),
    Error,
    /TimeoutError/,
  );
});

Deno.test("a real UNet samples through every built-in sampler without leaking", async () => {
  const unet = new UNet({ base: 8, seed: 1 });
  for (const name of ["ddim", "dpm_solver", "euler", "heun"]) {
    const got = await noLeak(() =>
      getSampler(name).sample(unet, schedule, {
        n: 2,
        imgSize: 8,
        numSteps: 3,
        seed: 1,
      })
    );
    assert.equal(got.length, 2 * 8 * 8, name);
    assert.ok(got.every((v) => Number.isFinite(v) && Math.abs(v) <= 1), name);
  }
  unet.dispose();
});
