/**
 * DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic
 * Models", Algorithm 2): T steps, each a draw from the Gaussian posterior
 * q(x_{t-1} | x_t, x0_hat).
 *
 * Notation:
 *
 * | code        | paper                                                       |
 * |-------------|-------------------------------------------------------------|
 * | `abar`      | alpha-bar_t                                                 |
 * | `abarPrev`  | alpha-bar_{t-1} (1 at t = 0)                                |
 * | `x0`        | x0_hat = (x_t - sqrt(1 - abar) eps_theta) / sqrt(abar)      |
 * | `coefX0`    | sqrt(abar_{t-1}) beta_t / (1 - abar_t)          (eq. 7)      |
 * | `coefXt`    | sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)   (eq. 7)      |
 * | `variance`  | sigma_t^2: beta-tilde_t ("posterior") or beta_t ("betas")   |
 *
 * With x0_hat unclipped, coefX0 x0_hat + coefXt x_t equals Algorithm 2's
 * (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t).
 *
 * @module
 */
import { tf } from "../core/backend.ts";
import type { Schedule } from "../core/schedule.ts";
import type { OptionsSchema } from "./options.ts";
import type { ModelLike, SampleOptions, SamplerPlugin } from "./registry.ts";
import { makeSolverSteps, predictX0 } from "./math.ts";
import { drive, evalEps, maybeClip, standardNormal, startRun } from "./_run.ts";

/** Options of {@linkcode sampleDdpm}. */
export interface DdpmOptions extends SampleOptions {
  /** "posterior" (beta-tilde_t, the reference's, "fixed small") or "betas" (beta_t, "fixed large"). */
  variance?: "posterior" | "betas";
  /** Clip x0_hat to [-1, 1] before taking the posterior mean; off by default (Algorithm 2 has no clip). */
  clipX0?: boolean;
}

const DDPM_OPTIONS: OptionsSchema = {
  variance: {
    type: "choice",
    description:
      "reverse variance: posterior = beta-tilde_t (fixed small), betas = beta_t (fixed large)",
    choices: ["posterior", "betas"],
    default: "posterior",
  },
  clipX0: {
    type: "boolean",
    description: "clip the predicted x0 to [-1, 1] at each step",
    default: false,
  },
};

/**
 * Sample with DDPM's ancestral sampler: all T steps, noise at every step but the last.
 *
 * @param model The noise predictor (a function or a `UNet`).
 * @param schedule The schedule the model was trained with.
 * @param options Common options plus `variance` and `clipX0`.
 * @returns Images, NHWC in [-1, 1]; the caller owns the tensor.
 * @throws {RangeError} An option out of range (see the message).
 * @throws {TypeError} An option of the wrong type, a bad xT, or a model output of the wrong shape.
 * @example
 * ```ts
 * import { sampleDdpm } from "./ddpm.ts";
 * import { initBackend, tf } from "../core/backend.ts";
 * import { makeSchedule } from "../core/schedule.ts";
 * await initBackend("cpu");
 * const schedule = makeSchedule({ T: 50 });
 * const model = (x: tf.Tensor4D) => tf.mul(x, 0.5) as tf.Tensor4D; // stand-in eps model
 * const images = await sampleDdpm(model, schedule, { n: 2, imgSize: 4, seed: 1 });
 * console.log(images.shape); // [2, 4, 4, 1]
 * images.dispose();
 * schedule.dispose();
 * ```
 */
export async function sampleDdpm(
  model: ModelLike,
  schedule: Schedule,
  options: DdpmOptions = {},
): Promise<tf.Tensor4D> {
  const run = startRun("ddpm", DDPM_OPTIONS, model, schedule, options);
  const clip = run.opts.clipX0 as boolean;
  const variances = run.opts.variance === "betas"
    ? schedule.betas
    : schedule.posteriorVariance;
  // all T timesteps, T-1 down to 0, then the clean image
  const steps = makeSolverSteps(schedule, schedule.T);
  return await drive(run, steps, ({ t, abar, abarNext: abarPrev }, x) => {
    const coefX0 = Math.sqrt(abarPrev) * schedule.betas[t] / (1 - abar);
    const coefXt = Math.sqrt(schedule.alphas[t]) * (1 - abarPrev) / (1 - abar);
    return tf.tidy(() => {
      // 1. predict x0 from the model's noise
      const x0 = maybeClip(predictX0(x, evalEps(run, x, t), abar), clip);
      // 2. posterior mean of q(x_{t-1} | x_t, x0)
      const mean = tf.add(tf.mul(x0, coefX0), tf.mul(x, coefXt));
      // 3. add noise, except at the last step
      const next = t > 0
        ? tf.add(mean, tf.mul(standardNormal(run, t), Math.sqrt(variances[t])))
        : mean;
      return { x: next as tf.Tensor4D, x0, t };
    });
  });
}

/** The DDPM sampler as a plugin ("ddpm"). */
export const ddpmSampler: SamplerPlugin<DdpmOptions> = {
  name: "ddpm",
  description:
    "DDPM ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2)",
  options: DDPM_OPTIONS,
  sample: sampleDdpm,
};
