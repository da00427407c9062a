/**
 * DDIM sampling (Song, Meng and Ermon 2021, "Denoising Diffusion Implicit
 * Models", eq. 12) on a sub-sequence of the training timesteps; eta = 0 is
 * deterministic, eta = 1 on the full grid is DDPM.
 *
 * Notation:
 *
 * | code        | paper                                                      |
 * |-------------|------------------------------------------------------------|
 * | `t`         | tau_i, walked down the grid (`makeSolverSteps`)            |
 * | `abar`      | alpha_{tau_i} (the paper's alpha is alpha-bar here)         |
 * | `abarPrev`  | alpha_{tau_{i-1}}; 1 after the grid's lowest timestep       |
 * | `x0`        | "predicted x0", optionally clipped to [-1, 1]              |
 * | `sigma`     | sigma_{tau_i}(eta), eq. 16 (`ddimSigma`)                    |
 * | `dir`       | "direction pointing to x_t": sqrt(1 - abarPrev - sigma^2) eps |
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
import { ddimSigma, predictX0, type Spacing } from "./math.ts";
import {
  drive,
  evalEps,
  gridSteps,
  maybeClip,
  standardNormal,
  startRun,
} from "./_run.ts";

/** Options of {@linkcode sampleDdim}. */
export interface DdimOptions extends SampleOptions {
  /** Steps asked for, in [1, T]; 50 by default (the grid may hold one more, see makeDdimTimesteps). */
  numSteps?: number;
  /** Noise scale in [0, 1]: 0 deterministic (default), 1 DDPM-like. */
  eta?: number;
  /** Timestep spacing: "leading" (the reference, default), "trailing", "linspace" or "karras". */
  spacing?: Spacing;
  /** Clip the predicted x0 to [-1, 1] at each step, as the reference does; on by default. */
  clipX0?: boolean;
}

const DDIM_OPTIONS: OptionsSchema = {
  numSteps: NUM_STEPS_OPTION,
  eta: {
    type: "number",
    description: "noise scale: 0 deterministic, 1 as DDPM",
    default: 0,
    min: 0,
    max: 1,
  },
  spacing: SPACING_OPTION,
  clipX0: {
    type: "boolean",
    description: "clip the predicted x0 to [-1, 1] at each step",
    default: true,
  },
};

/**
 * Sample with DDIM on a timestep sub-sequence.
 *
 * Noise for the step leaving timestep t is drawn from (seed, t), as in
 * {@linkcode sampleDdpm}: with eta = 1, `clipX0: false` and numSteps = T the
 * two samplers give the same images from the same seed.
 *
 * @param model The noise predictor (a function or a `UNet`).
 * @param schedule The schedule the model was trained with.
 * @param options Common options plus `numSteps`, `eta`, `spacing`, `clipX0`.
 * @returns Images, NHWC in [-1, 1]; the caller owns the tensor.
 * @throws {RangeError} numSteps outside [1, T], eta outside [0, 1], or another option out of range.
 * @throws {TypeError} An option of the wrong type, a bad xT, or a model output of the wrong shape.
 * @example
 * ```ts
 * import { sampleDdim } from "./ddim.ts";
 * import { initBackend, tf } from "../core/backend.ts";
 * import { makeSchedule } from "../core/schedule.ts";
 * await initBackend("cpu");
 * const schedule = makeSchedule({ T: 1000 });
 * const model = (x: tf.Tensor4D) => tf.mul(x, 0.5) as tf.Tensor4D; // stand-in eps model
 * const images = await sampleDdim(model, schedule, { n: 2, imgSize: 4, numSteps: 10, seed: 1 });
 * console.log(images.shape); // [2, 4, 4, 1]
 * images.dispose();
 * schedule.dispose();
 * ```
 */
export async function sampleDdim(
  model: ModelLike,
  schedule: Schedule,
  options: DdimOptions = {},
): Promise<tf.Tensor4D> {
  const run = startRun("ddim", DDIM_OPTIONS, model, schedule, options);
  const eta = run.opts.eta as number;
  const clip = run.opts.clipX0 as boolean;
  return await drive(run, gridSteps(run, schedule), (step, x) => {
    const { t, abar, abarNext: abarPrev } = step;
    const sigma = ddimSigma(abar, abarPrev, eta);
    return tf.tidy(() => {
      // 1. predict noise and x0
      const eps = evalEps(run, x, t);
      const x0 = maybeClip(predictX0(x, eps, abar), clip);
      // 2. direction pointing to x_t
      const dir = tf.mul(
        eps,
        Math.sqrt(Math.max(0, 1 - abarPrev - sigma * sigma)),
      );
      // 3. x_prev = sqrt(abarPrev) x0 + dir + sigma z
      let next = tf.add(tf.mul(x0, Math.sqrt(abarPrev)), dir);
      if (sigma > 0) next = tf.add(next, tf.mul(standardNormal(run, t), sigma));
      return { x: next as tf.Tensor4D, x0, t };
    });
  });
}

/** The DDIM sampler as a plugin ("ddim"). */
export const ddimSampler: SamplerPlugin<DdimOptions> = {
  name: "ddim",
  description:
    "DDIM on a timestep sub-sequence, eta from deterministic to DDPM (Song et al. 2021)",
  options: DDIM_OPTIONS,
  sample: sampleDdim,
};
