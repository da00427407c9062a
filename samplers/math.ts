/**
 * The math every solver shares: timestep sub-sequences and one-line formulas.
 *
 * Notation (Ho et al. 2020; Song et al. 2021; Lu et al. 2022; Karras et al. 2022):
 *
 * | code              | paper                                              |
 * |-------------------|----------------------------------------------------|
 * | `abar`            | alpha-bar_t (the schedule's `alphasBar[t]`)         |
 * | `abarPrev`        | alpha-bar of the next timestep the solver goes to; 1 past the end |
 * | `ddimSigma`       | sigma_t(eta) of DDIM, eq. 16                        |
 * | `vpSigma`         | sigma = sqrt((1 - abar) / abar), k-diffusion's noise level |
 * | `logSnr`          | lambda_t = log(alpha_t / sigma_t) of DPM-Solver     |
 *
 * Timesteps are 0-based (0 .. T-1) and solver grids are returned ascending;
 * solvers walk them from the top and finish with one step to the clean image
 * (alpha-bar = 1, written as timestep -1).
 *
 * @module
 */
import { tf } from "../core/backend.ts";
import type { Schedule } from "../core/schedule.ts";

/** How a solver's timesteps are spread over 0 .. T-1. */
export type Spacing = "leading" | "trailing" | "linspace" | "karras";

/** The spacings {@linkcode makeTimesteps} knows. */
export const SPACINGS: readonly Spacing[] = [
  "leading",
  "trailing",
  "linspace",
  "karras",
];

function checkSteps(what: string, T: number, numSteps: number): void {
  if (!Number.isInteger(T) || T < 1) {
    throw new RangeError(
      `Cannot ${what}: T must be a positive integer (got ${T}, expected an integer >= 1)`,
    );
  }
  if (!Number.isInteger(numSteps) || numSteps < 1 || numSteps > T) {
    throw new RangeError(
      `Cannot ${what}: numSteps out of range (got ${numSteps}, expected an integer in [1, ${T}])`,
    );
  }
}

/** Round half to even, as numpy's `round` does. */
function roundHalfEven(v: number): number {
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * The reference's DDIM grid: `range(0, T, T // numSteps)`, then T-1 appended
 * when it is not already the last entry.
 *
 * So the grid always starts the reverse process at T-1, and it can hold one
 * step more than asked (T = 1000, numSteps = 50: 0, 20, ..., 980, 999 is 51
 * steps); for numSteps > T / 2 the stride is 1 and the grid is all T steps.
 *
 * @param T The schedule's step count.
 * @param numSteps Steps asked for, an integer in [1, T].
 * @returns The timesteps, ascending, T-1 last.
 * @throws {RangeError} numSteps not an integer in [1, T].
 * @example
 * ```ts
 * import { makeDdimTimesteps } from "./math.ts";
 * console.log(makeDdimTimesteps(1000, 4)); // [0, 250, 500, 750, 999]
 * console.log(makeDdimTimesteps(10, 10)); // [0, 1, ..., 9]
 * ```
 */
export function makeDdimTimesteps(T: number, numSteps: number): number[] {
  checkSteps("make DDIM timesteps", T, numSteps);
  const stride = Math.floor(T / numSteps);
  const ts: number[] = [];
  for (let t = 0; t < T; t += stride) ts.push(t);
  if (ts[ts.length - 1] !== T - 1) ts.push(T - 1);
  return ts;
}

/** Options of {@linkcode makeTimesteps}. */
export interface TimestepOptions {
  /** "leading" (the reference, default), "trailing", "linspace" or "karras". */
  spacing?: Spacing;
  /** Karras et al.'s rho for the "karras" spacing; 7 by default. */
  rho?: number;
}

/**
 * A solver's timestep grid over a schedule, in one of four spacings.
 *
 * - "leading": {@linkcode makeDdimTimesteps}, the reference's grid.
 * - "trailing" (diffusers): `round(T - i T / numSteps) - 1` for i = 0 ..
 *   numSteps-1, e.g. 99, 199, ..., 999 for T = 1000 and 10 steps.
 * - "linspace" (diffusers): `round(linspace(0, T - 1, numSteps))`, e.g. 0,
 *   111, ..., 999 (a single step is [T-1], not diffusers' [0]).
 * - "karras" (Karras et al. 2022, eq. 5): numSteps noise levels
 *   sigma_i = (smax^(1/rho) + i/(numSteps-1) (smin^(1/rho) - smax^(1/rho)))^rho
 *   between the schedule's sigma at 0 and at T-1, each **rounded** to the
 *   timestep whose sigma is nearest in log-sigma (the model takes integer
 *   timesteps; solvers then use that timestep's own sigma, so model input and
 *   solver stay consistent). Levels that round to the same timestep are kept
 *   once, so the grid can be shorter than numSteps at many steps.
 *
 * Rounding is half-to-even, as numpy's.
 *
 * @param schedule The schedule (its T and, for "karras", its alphasBar).
 * @param numSteps Steps asked for, an integer in [1, T].
 * @param options The spacing and Karras's rho.
 * @returns The timesteps, ascending and distinct.
 * @throws {RangeError} numSteps out of range, an unknown spacing or rho <= 0.
 * @example
 * ```ts
 * import { makeTimesteps } from "./math.ts";
 * import { initBackend } from "../core/backend.ts";
 * import { makeSchedule } from "../core/schedule.ts";
 * await initBackend("cpu");
 * const s = makeSchedule({ T: 1000 });
 * console.log(makeTimesteps(s, 10, { spacing: "trailing" })); // [99, 199, ..., 999]
 * console.log(makeTimesteps(s, 10, { spacing: "linspace" })); // [0, 111, ..., 999]
 * s.dispose();
 * ```
 */
export function makeTimesteps(
  schedule: Pick<Schedule, "T" | "alphasBar">,
  numSteps: number,
  options: TimestepOptions = {},
): number[] {
  const { spacing = "leading", rho = 7 } = options;
  const T = schedule.T;
  checkSteps("make timesteps", T, numSteps);
  switch (spacing) {
    case "leading":
      return makeDdimTimesteps(T, numSteps);
    case "trailing": {
      const ts: number[] = [];
      for (let i = numSteps - 1; i >= 0; i--) {
        ts.push(roundHalfEven(T - i * T / numSteps) - 1);
      }
      return ts;
    }
    case "linspace": {
      if (numSteps === 1) return [T - 1];
      const step = (T - 1) / (numSteps - 1);
      const ts: number[] = [];
      for (let i = 0; i < numSteps - 1; i++) ts.push(roundHalfEven(i * step));
      ts.push(T - 1);
      return ts;
    }
    case "karras": {
      if (!(rho > 0)) {
        throw new RangeError(
          `Cannot make timesteps: rho must be positive (got ${rho}, expected > 0)`,
        );
      }
      const logSigmas = Array.from(
        schedule.alphasBar,
        (a) => Math.log(vpSigma(a)),
      );
      const lo = Math.exp(logSigmas[0]) ** (1 / rho);
      const hi = Math.exp(logSigmas[T - 1]) ** (1 / rho);
      const picked = new Set<number>();
      for (let i = 0; i < numSteps; i++) {
        const ramp = numSteps === 1 ? 0 : i / (numSteps - 1);
        const logSigma = rho * Math.log(hi + ramp * (lo - hi));
        picked.add(nearestTimestep(logSigmas, logSigma));
      }
      return [...picked].sort((a, b) => a - b);
    }
    default:
      throw new RangeError(
        `Cannot make timesteps: unknown spacing (got "${spacing}", expected one of ${
          SPACINGS.join(", ")
        })`,
      );
  }
}

/** One step of a solver's walk down a grid: from timestep t to tNext (-1: the clean image). */
export interface SolverStep {
  /** The timestep the step leaves. */
  readonly t: number;
  /** The timestep the step enters; -1 for the clean image. */
  readonly tNext: number;
  /** alpha-bar_t. */
  readonly abar: number;
  /** alpha-bar of tNext; 1 for the clean image. */
  readonly abarNext: number;
}

/**
 * The steps a solver takes on a grid: from T-1 down through
 * {@linkcode makeTimesteps}'s timesteps, then into the clean image.
 *
 * @param schedule The schedule.
 * @param numSteps Steps asked for, an integer in [1, T].
 * @param options The spacing and Karras's rho.
 * @returns One entry per step, in the order taken.
 * @throws {RangeError} As {@linkcode makeTimesteps}.
 * @example
 * ```ts
 * import { makeSolverSteps } from "./math.ts";
 * import { initBackend } from "../core/backend.ts";
 * import { makeSchedule } from "../core/schedule.ts";
 * await initBackend("cpu");
 * const s = makeSchedule({ T: 1000 });
 * const steps = makeSolverSteps(s, 2);
 * console.log(steps.map((x) => [x.t, x.tNext])); // [[999, 500], [500, 0], [0, -1]]
 * s.dispose();
 * ```
 */
export function makeSolverSteps(
  schedule: Pick<Schedule, "T" | "alphasBar">,
  numSteps: number,
  options: TimestepOptions = {},
): SolverStep[] {
  const ts = makeTimesteps(schedule, numSteps, options).reverse();
  return ts.map((t, i) => {
    const tNext = i + 1 < ts.length ? ts[i + 1] : -1;
    return {
      t,
      tNext,
      abar: alphaBarAt(schedule, t),
      abarNext: alphaBarAt(schedule, tNext),
    };
  });
}

/** The index of the ascending `logSigmas` entry nearest to `logSigma`. */
function nearestTimestep(logSigmas: number[], logSigma: number): number {
  let lo = 0;
  let hi = logSigmas.length - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (logSigmas[mid] <= logSigma) lo = mid;
    else hi = mid;
  }
  return Math.abs(logSigmas[lo] - logSigma) <=
      Math.abs(logSigmas[hi] - logSigma)
    ? lo
    : hi;
}

/**
 * alpha-bar at a timestep, with alpha-bar = 1 (the clean image) for t < 0.
 *
 * @param schedule The schedule.
 * @param t A timestep in [0, T), or -1 for the clean image.
 * @returns alpha-bar_t.
 * @example
 * ```ts
 * import { alphaBarAt } from "./math.ts";
 * import { initBackend } from "../core/backend.ts";
 * import { makeSchedule } from "../core/schedule.ts";
 * await initBackend("cpu");
 * const s = makeSchedule();
 * console.log(alphaBarAt(s, -1), alphaBarAt(s, 0)); // 1 0.9999
 * s.dispose();
 * ```
 */
export function alphaBarAt(
  schedule: Pick<Schedule, "alphasBar">,
  t: number,
): number {
  return t < 0 ? 1 : schedule.alphasBar[t];
}

/**
 * DDIM's noise scale (Song et al. 2021, eq. 16):
 * sigma = eta sqrt((1 - abarPrev) / (1 - abar)) sqrt(1 - abar / abarPrev).
 *
 * With eta = 1 on the full grid its square is DDPM's posterior variance
 * beta-tilde_t; with eta = 0 the step is deterministic.
 *
 * @param abar alpha-bar of the timestep being left.
 * @param abarPrev alpha-bar of the timestep being entered (1 for the clean image).
 * @param eta The stochasticity, in [0, 1].
 * @returns sigma (not squared).
 * @example
 * ```ts
 * import { ddimSigma } from "./math.ts";
 * console.log(ddimSigma(0.5, 0.8, 0)); // 0
 * console.log(ddimSigma(0.5, 1, 1)); // 0: no noise into the clean image
 * ```
 */
export function ddimSigma(abar: number, abarPrev: number, eta: number): number {
  return eta * Math.sqrt((1 - abarPrev) / (1 - abar) * (1 - abar / abarPrev));
}

/**
 * k-diffusion's noise level of a variance-preserving timestep: sqrt((1 - abar) / abar).
 *
 * @param abar alpha-bar_t.
 * @returns sigma_t, so that x_t / sqrt(abar) = x_0 + sigma eps.
 * @example
 * ```ts
 * import { vpSigma } from "./math.ts";
 * console.log(vpSigma(0.5)); // 1
 * ```
 */
export function vpSigma(abar: number): number {
  return Math.sqrt((1 - abar) / abar);
}

/**
 * DPM-Solver's half log signal-to-noise ratio lambda = log(sqrt(abar) / sqrt(1 - abar)).
 *
 * @param abar alpha-bar_t.
 * @returns lambda_t (+Infinity for the clean image, abar = 1).
 * @example
 * ```ts
 * import { logSnr } from "./math.ts";
 * console.log(logSnr(0.5)); // 0
 * ```
 */
export function logSnr(abar: number): number {
  return 0.5 * Math.log(abar / (1 - abar));
}

/**
 * Predict the clean image from x_t and the predicted noise:
 * x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar).
 *
 * @param x x_t, NHWC.
 * @param eps The predicted noise, same shape.
 * @param abar alpha-bar_t.
 * @returns The predicted x_0; the caller owns it.
 * @example
 * ```ts
 * import { predictX0 } from "./math.ts";
 * import { initBackend, tf } from "../core/backend.ts";
 * await initBackend("cpu");
 * const x = tf.tensor4d([1], [1, 1, 1, 1]);
 * const x0 = predictX0(x, x, 0.64); // (1 - 0.6 * 1) / 0.8
 * console.log((await x0.data())[0].toFixed(3)); // "0.500"
 * tf.dispose([x, x0]);
 * ```
 */
export function predictX0(
  x: tf.Tensor4D,
  eps: tf.Tensor4D,
  abar: number,
): tf.Tensor4D {
  return tf.tidy(() =>
    tf.div(
      tf.sub(x, tf.mul(eps, Math.sqrt(1 - abar))),
      Math.sqrt(abar),
    ) as tf.Tensor4D
  );
}

/**
 * One Euler step in sigma on x_t-scaled states: with xHat = x / sqrt(abar),
 * returns sqrt(abarNext) (xHat + (sigmaNext - sigma) d), sigma = `vpSigma`.
 *
 * @param x x_t, NHWC.
 * @param d The slope dxHat/dsigma (the model's eps for an eps-model).
 * @param abar alpha-bar of the timestep being left.
 * @param abarNext alpha-bar of the timestep being entered (1 for the clean image).
 * @returns x at the next timestep; the caller owns it.
 * @example
 * ```ts
 * import { sigmaStep } from "./math.ts";
 * import { initBackend, tf } from "../core/backend.ts";
 * await initBackend("cpu");
 * const x = tf.tensor4d([1], [1, 1, 1, 1]);
 * const x0 = sigmaStep(x, x, 0.5, 1); // xHat = sqrt(2), sigma 1 -> 0
 * console.log((await x0.data())[0].toFixed(3)); // "0.414"
 * tf.dispose([x, x0]);
 * ```
 */
export function sigmaStep(
  x: tf.Tensor4D,
  d: tf.Tensor4D,
  abar: number,
  abarNext: number,
): tf.Tensor4D {
  const step = vpSigma(abarNext) - vpSigma(abar);
  return tf.tidy(() =>
    tf.mul(
      tf.add(tf.div(x, Math.sqrt(abar)), tf.mul(d, step)),
      Math.sqrt(abarNext),
    ) as tf.Tensor4D
  );
}
