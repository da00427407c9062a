/**
 * Euler's method on the probability-flow ODE in Karras et al.'s form
 * (Karras, Aittala, Aila and Laine 2022, "Elucidating the Design Space of
 * Diffusion-Based Generative Models", Algorithm 1 without churn), as
 * k-diffusion's `sample_euler` runs it on a discrete variance-preserving
 * model.
 *
 * Notation:
 *
 * | code     | paper / k-diffusion                                         |
 * |----------|-------------------------------------------------------------|
 * | `sigma`  | sigma_i = sqrt((1 - abar_t) / abar_t) (`vpSigma`)            |
 * | `xHat`   | x / sqrt(abar_t): the state in the sigma scale, x0 + sigma eps |
 * | `d`      | dx/dsigma = (xHat - D(xHat; sigma)) / sigma, which is eps_theta |
 *
 * The solver walks the grid's timesteps, so each sigma is exactly one of the
 * model's timesteps (the "karras" spacing rounds its levels to timesteps,
 * see `makeTimesteps`) and the model is called with that integer timestep
 * and input xHat sqrt(abar_t) = x_t. The state between steps is kept in the
 * x_t scale, so xT is used as given (k-diffusion draws sigma_max * N(0, I),
 * which differs from x_T / sqrt(abar_{T-1}) by under 0.01 % at T = 1000).
 *
 * On the same grid this is DDIM with eta = 0 and no clipping, step for step.
 *
 * @module
 */
import { tf } from "../core/backend.ts";
import type { Schedule } from "../core/schedule.ts";
import {
  NUM_STEPS_OPTION,
  type OptionsSchema,
  SPACING_OPTION,
} from "./options.ts";
import type { ModelLike, SampleOptions, SamplerPlugin } from "./registry.ts";
import { predictX0, sigmaStep, type Spacing } from "./math.ts";
import { drive, evalEps, gridSteps, startRun } from "./_run.ts";

/** Options of {@linkcode sampleEuler} and `sampleHeun`. */
export interface EulerOptions extends SampleOptions {
  /** Steps (noise levels) asked for, in [1, T]; 50 for Euler, 25 for Heun by default. */
  numSteps?: number;
  /** Timestep spacing: "linspace" (default, k-diffusion's), "leading", "trailing" or "karras". */
  spacing?: Spacing;
}

const EULER_OPTIONS: OptionsSchema = {
  numSteps: NUM_STEPS_OPTION,
  spacing: { ...SPACING_OPTION, default: "linspace" },
};

/**
 * Sample with Euler's method in sigma (k-diffusion's `sample_euler`): deterministic, one model call per step.
 *
 * @param model The noise predictor (a function or a `UNet`).
 * @param schedule The schedule the model was trained with.
 * @param options Common options plus `numSteps` and `spacing`.
 * @returns Images, NHWC in [-1, 1]; the caller owns the tensor.
 * @throws {RangeError} numSteps outside [1, T] or another option out of range.
 * @throws {TypeError} An option of the wrong type, a bad xT, or a model output of the wrong shape.
 * @example
 * ```ts
 * import { sampleEuler } from "./euler.ts";
 * import { initBackend, tf } from "../core/backend.ts";
 * import { makeSchedule } from "../core/schedule.ts";
 * await initBackend("cpu");
 * const schedule = makeSchedule({ T: 1000 });
 * const model = (x: tf.Tensor4D) => tf.mul(x, 0.5) as tf.Tensor4D; // stand-in eps model
 * const images = await sampleEuler(model, schedule, { n: 2, imgSize: 4, numSteps: 10, spacing: "karras" });
 * console.log(images.shape); // [2, 4, 4, 1]
 * images.dispose();
 * schedule.dispose();
 * ```
 */
export async function sampleEuler(
  model: ModelLike,
  schedule: Schedule,
  options: EulerOptions = {},
): Promise<tf.Tensor4D> {
  const run = startRun("euler", EULER_OPTIONS, model, schedule, options);
  return await drive(run, gridSteps(run, schedule), (step, x) => {
    const { t, abar, abarNext } = step;
    return tf.tidy(() => {
      // 1. d = (xHat - D) / sigma, which is the model's eps
      const d = evalEps(run, x, t);
      // 2. xHat' = xHat + (sigma' - sigma) d
      const next = sigmaStep(x, d, abar, abarNext);
      return { x: next, x0: predictX0(x, d, abar), t };
    });
  });
}

/** Euler's method as a plugin ("euler"). */
export const eulerSampler: SamplerPlugin<EulerOptions> = {
  name: "euler",
  description:
    "Euler steps on the probability-flow ODE in sigma (Karras et al. 2022, k-diffusion)",
  options: EULER_OPTIONS,
  sample: sampleEuler,
};
