/**
 * Noise schedules and the closed-form forward process q(x_t | x_0).
 *
 * Notation (Ho et al. 2020):
 *
 * | code                  | paper                               |
 * |-----------------------|-------------------------------------|
 * | `betas[t]`            | beta_t                              |
 * | `alphas[t]`           | alpha_t = 1 - beta_t                |
 * | `alphasBar[t]`        | alpha-bar_t = prod_{s<=t} alpha_s   |
 * | `posteriorVariance[t]`| beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) |
 *
 * Timesteps are 0-based: t = 0 is the first noising step, t = T - 1 the last.
 *
 * @module
 */
import { tf } from "./backend.ts";

/** The noise schedules {@linkcode makeSchedule} builds. */
export type ScheduleKind = "linear" | "cosine";

/** Options of {@linkcode makeSchedule}. */
export interface ScheduleOptions {
  /** Number of diffusion steps T; 1000 by default. */
  T?: number;
  /** beta_0 of the linear schedule; 1e-4 by default. */
  betaStart?: number;
  /** beta_{T-1} of the linear schedule; 0.02 by default. */
  betaEnd?: number;
  /** "linear" (Ho et al. 2020, the default) or "cosine" (Nichol and Dhariwal 2021, s = 0.008). */
  kind?: ScheduleKind;
}

/** A discrete noise schedule: host buffers plus the device tensors steps gather from. */
export interface Schedule {
  /** Number of diffusion steps. */
  readonly T: number;
  /** The kind it was built with. */
  readonly kind: ScheduleKind;
  /** beta_t. */
  readonly betas: Float64Array;
  /** alpha_t = 1 - beta_t. */
  readonly alphas: Float64Array;
  /** alpha-bar_t, the cumulative product of alphas. */
  readonly alphasBar: Float64Array;
  /** alpha-bar_{t-1}, with alpha-bar_{-1} = 1. */
  readonly alphasBarPrev: Float64Array;
  /** sqrt(alpha-bar_t). */
  readonly sqrtAlphasBar: Float64Array;
  /** sqrt(1 - alpha-bar_t). */
  readonly sqrtOneMinusAlphasBar: Float64Array;
  /** beta-tilde_t = beta_t (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t). */
  readonly posteriorVariance: Float64Array;
  /** Device copies (float32, shape [T]) for gathering by timestep. */
  readonly tensors: {
    readonly betas: tf.Tensor1D;
    readonly alphas: tf.Tensor1D;
    readonly alphasBar: tf.Tensor1D;
    readonly sqrtAlphasBar: tf.Tensor1D;
    readonly sqrtOneMinusAlphasBar: tf.Tensor1D;
    readonly posteriorVariance: tf.Tensor1D;
  };
  /** Free the device tensors. */
  dispose(): void;
}

function checkPositiveInt(name: string, value: number): void {
  if (!Number.isInteger(value) || value < 1) {
    throw new RangeError(
      `Cannot make schedule: ${name} must be a positive integer (got ${value})`,
    );
  }
}

/** Linear betas from betaStart to betaEnd inclusive, as torch.linspace gives them. */
function linearBetas(
  T: number,
  betaStart: number,
  betaEnd: number,
): Float64Array {
  const betas = new Float64Array(T);
  for (let i = 0; i < T; i++) {
    betas[i] = T === 1
      ? betaStart
      : betaStart + (betaEnd - betaStart) * i / (T - 1);
  }
  return betas;
}

/** Cosine betas (Nichol and Dhariwal 2021): abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at 0.999. */
function cosineBetas(T: number, s = 0.008): Float64Array {
  const f = (t: number) => Math.cos(((t / T + s) / (1 + s)) * Math.PI / 2) ** 2;
  const betas = new Float64Array(T);
  for (let i = 0; i < T; i++) {
    betas[i] = Math.min(1 - f(i + 1) / f(i), 0.999);
  }
  return betas;
}

/**
 * Build a noise schedule.
 *
 * @param options T, betaStart, betaEnd and kind; the reference's linear
 *   schedule (T = 1000, 1e-4 .. 0.02) by default.
 * @returns The schedule; call `dispose()` to free its tensors.
 * @example
 * ```ts
 * import { makeSchedule } from "./schedule.ts";
 * import { initBackend } from "./backend.ts";
 * await initBackend("cpu");
 * const s = makeSchedule({ T: 1000 });
 * console.log(s.betas[0], s.betas[999]); // 0.0001 0.02
 * s.dispose();
 * ```
 */
export function makeSchedule(options: ScheduleOptions = {}): Schedule {
  const { T = 1000, betaStart = 1e-4, betaEnd = 0.02, kind = "linear" } =
    options;
  checkPositiveInt("T", T);
  if (kind !== "linear" && kind !== "cosine") {
    throw new RangeError(
      `Cannot make schedule: unknown kind (got "${kind}", expected "linear" or "cosine")`,
    );
  }
  if (kind === "linear") {
    if (!(betaStart > 0 && betaEnd < 1 && betaStart <= betaEnd)) {
      throw new RangeError(
        `Cannot make schedule: betas must satisfy 0 < betaStart <= betaEnd < 1 (got ${betaStart}, ${betaEnd})`,
      );
    }
  }
  const betas = kind === "linear"
    ? linearBetas(T, betaStart, betaEnd)
    : cosineBetas(T);
  const alphas = betas.map((b) => 1 - b);
  const alphasBar = new Float64Array(T);
  let prod = 1;
  for (let i = 0; i < T; i++) alphasBar[i] = prod *= alphas[i];
  const alphasBarPrev = new Float64Array(T);
  for (let i = 0; i < T; i++) alphasBarPrev[i] = i === 0 ? 1 : alphasBar[i - 1];
  const sqrtAlphasBar = alphasBar.map(Math.sqrt);
  const sqrtOneMinusAlphasBar = alphasBar.map((a) => Math.sqrt(1 - a));
  const posteriorVariance = betas.map((b, i) =>
    b * (1 - alphasBarPrev[i]) / (1 - alphasBar[i])
  );

  const toTensor = (a: Float64Array) =>
    tf.keep(tf.tensor1d(Float32Array.from(a), "float32"));
  const tensors = {
    betas: toTensor(betas),
    alphas: toTensor(alphas),
    alphasBar: toTensor(alphasBar),
    sqrtAlphasBar: toTensor(sqrtAlphasBar),
    sqrtOneMinusAlphasBar: toTensor(sqrtOneMinusAlphasBar),
    posteriorVariance: toTensor(posteriorVariance),
  };
  return {
    T,
    kind,
    betas,
    alphas,
    alphasBar,
    alphasBarPrev,
    sqrtAlphasBar,
    sqrtOneMinusAlphasBar,
    posteriorVariance,
    tensors,
    dispose() {
      for (const t of Object.values(tensors)) t.dispose();
    },
  };
}

/**
 * Gather per-sample coefficients `a[t]` as a [N, 1, 1, 1] tensor to broadcast over NHWC.
 *
 * @param a A [T] device buffer of the schedule.
 * @param t int32 timesteps, shape [N].
 * @returns The gathered values, shape [N, 1, 1, 1].
 * @example
 * ```ts
 * import { extract, makeSchedule } from "./schedule.ts";
 * import { initBackend, tf } from "./backend.ts";
 * await initBackend("cpu");
 * const s = makeSchedule();
 * const c = extract(s.tensors.betas, tf.tensor1d([0, 999], "int32"));
 * console.log(c.shape); // [2, 1, 1, 1]
 * s.dispose();
 * ```
 */
export function extract(a: tf.Tensor1D, t: tf.Tensor1D): tf.Tensor4D {
  return tf.tidy(() =>
    tf.reshape(tf.gather(a, t), [-1, 1, 1, 1]) as tf.Tensor4D
  );
}

/**
 * Sample x_t ~ q(x_t | x_0) in closed form: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
 *
 * @param x0 Clean images, NHWC.
 * @param t int32 timesteps, shape [N], each in [0, T).
 * @param noise eps ~ N(0, I), same shape as x0.
 * @param schedule The schedule to take alpha-bar from.
 * @returns x_t, NHWC; the caller owns it.
 * @example
 * ```ts
 * import { makeSchedule, qSample } from "./schedule.ts";
 * import { initBackend, tf } from "./backend.ts";
 * await initBackend("cpu");
 * const s = makeSchedule();
 * const x0 = tf.zeros([1, 4, 4, 1]) as tf.Tensor4D;
 * const eps = tf.ones([1, 4, 4, 1]) as tf.Tensor4D;
 * const xt = qSample(x0, tf.tensor1d([999], "int32"), eps, s);
 * console.log((await xt.data())[0] < 1); // sqrt(1 - abar_999) is just below 1
 * s.dispose();
 * ```
 */
export function qSample(
  x0: tf.Tensor4D,
  t: tf.Tensor1D,
  noise: tf.Tensor4D,
  schedule: Schedule,
): tf.Tensor4D {
  if (x0.shape.join() !== noise.shape.join()) {
    throw new TypeError(
      `Cannot sample q(x_t | x_0): noise shape differs from x0 (got [${noise.shape}], expected [${x0.shape}])`,
    );
  }
  if (t.shape[0] !== x0.shape[0]) {
    throw new TypeError(
      `Cannot sample q(x_t | x_0): one timestep per image needed (got ${
        t.shape[0]
      }, expected ${x0.shape[0]})`,
    );
  }
  return tf.tidy(() =>
    tf.add(
      tf.mul(extract(schedule.tensors.sqrtAlphasBar, t), x0),
      tf.mul(extract(schedule.tensors.sqrtOneMinusAlphasBar, t), noise),
    ) as tf.Tensor4D
  );
}
