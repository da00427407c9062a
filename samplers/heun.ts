/**
 * Heun's method on the probability-flow ODE in Karras et al.'s form
 * (Karras, Aittala, Aila and Laine 2022, Algorithm 1 without churn), as
 * k-diffusion's `sample_heun` runs it: an Euler predictor, then the trapezoid
 * of the slopes at both ends, except into sigma = 0, where it is one Euler
 * step. 2 numSteps - 1 model calls for numSteps grid points.
 *
 * Notation as in `euler.ts`:
 *
 * | code     | paper / k-diffusion                                        |
 * |----------|------------------------------------------------------------|
 * | `sigma`  | sigma_i = sqrt((1 - abar_t) / abar_t)                       |
 * | `d`      | d_i = (xHat - D(xHat; sigma_i)) / sigma_i = eps_theta(x_t, t) |
 * | `dNext`  | d'_i, the slope at the Euler predictor's point              |
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
import type { ModelLike, SamplerPlugin } from "./registry.ts";
import { predictX0, sigmaStep } from "./math.ts";
import { drive, evalEps, gridSteps, startRun } from "./_run.ts";
import type { EulerOptions } from "./euler.ts";

const HEUN_OPTIONS: OptionsSchema = {
  numSteps: { ...NUM_STEPS_OPTION, default: 25 },
  spacing: { ...SPACING_OPTION, default: "linspace" },
};

/**
 * Sample with Heun's second-order method in sigma (k-diffusion's `sample_heun`): deterministic.
 *
 * @param model The noise predictor (a function or a `UNet`).
 * @param schedule The schedule the model was trained with.
 * @param options Common options plus `numSteps` (25 by default) and `spacing`.
 * @returns Images, NHWC in [-1, 1]; the caller owns the tensor.
 * @throws {RangeError} numSteps outside [1, T] or another option out of range.
 * @throws {TypeError} An option of the wrong type, a bad xT, or a model output of the wrong shape.
 * @example
 * ```ts
 * import { sampleHeun } from "./heun.ts";
 * import { initBackend, tf } from "../core/backend.ts";
 * import { makeSchedule } from "../core/schedule.ts";
 * await initBackend("cpu");
 * const schedule = makeSchedule({ T: 1000 });
 * const model = (x: tf.Tensor4D) => tf.mul(x, 0.5) as tf.Tensor4D; // stand-in eps model
 * const images = await sampleHeun(model, schedule, { n: 2, imgSize: 4, numSteps: 10, spacing: "karras" });
 * console.log(images.shape); // [2, 4, 4, 1]
 * images.dispose();
 * schedule.dispose();
 * ```
 */
export async function sampleHeun(
  model: ModelLike,
  schedule: Schedule,
  options: EulerOptions = {},
): Promise<tf.Tensor4D> {
  const run = startRun("heun", HEUN_OPTIONS, model, schedule, options);
  return await drive(run, gridSteps(run, schedule), (step, x) => {
    const { t, tNext, abar, abarNext } = step;
    return tf.tidy(() => {
      // 1. slope at sigma_i, and the Euler predictor
      const d = evalEps(run, x, t);
      const x0 = predictX0(x, d, abar);
      const euler = sigmaStep(x, d, abar, abarNext);
      if (tNext === -1) return { x: euler, x0, t };
      // 2. slope at the predictor, and the trapezoid of the two
      const dNext = evalEps(run, euler, tNext);
      const next = sigmaStep(x, tf.div(tf.add(d, dNext), 2), abar, abarNext);
      return { x: next, x0, t };
    });
  });
}

/** Heun's method as a plugin ("heun"). */
export const heunSampler: SamplerPlugin<EulerOptions> = {
  name: "heun",
  description:
    "Heun's second-order steps on the probability-flow ODE in sigma (Karras et al. 2022, k-diffusion)",
  options: HEUN_OPTIONS,
  sample: sampleHeun,
};
