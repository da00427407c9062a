/**
 * DDIM inversion (Song et al. 2021, section 4.3; Dhariwal and Nichol 2021,
 * appendix F): run the eta = 0 DDIM update backwards, image -> latent x_T,
 * and spherical interpolation between latents. Sampling a latent with
 * `sampleDdim` (eta = 0, clipX0 off, same grid) gives the image back, up to
 * the discretisation error, which shrinks as steps grow.
 *
 * Notation:
 *
 * | code        | paper                                                      |
 * |-------------|------------------------------------------------------------|
 * | `t`         | tau_i, walked up the grid (`makeSolverSteps`, reversed)    |
 * | `abarPrev`  | alpha-bar of the level the step leaves (1 for the image)   |
 * | `abar`      | alpha-bar of the grid timestep the step enters             |
 * | `eps`       | eps_theta(x, tau_i): the model at the level entered, with the x it has (the usual first-order approximation) |
 *
 * One step: x0 = (x - sqrt(1 - abarPrev) eps) / sqrt(abarPrev); x' = sqrt(abar) x0 + sqrt(1 - abar) eps.
 *
 * @module
 */
import { tf } from "../core/backend.ts";
import type { Schedule } from "../core/schedule.ts";
import {
  NUM_STEPS_OPTION,
  type OptionsSchema,
  SPACING_OPTION,
  validateOptions,
} from "./options.ts";
import type { ModelLike, StepInfo } from "./registry.ts";
import { predictX0, type Spacing } from "./math.ts";
import { asEpsModel, drive, evalEps, gridSteps, type Run } from "./_run.ts";

/** Options of {@linkcode invertDdim}. */
export interface InvertOptions {
  /** Steps asked for, in [1, T]; 50 by default. Use the same grid to sample back. */
  numSteps?: number;
  /** Timestep spacing, as in `sampleDdim`; "leading" by default. */
  spacing?: Spacing;
  /** Aborts the run between steps. */
  signal?: AbortSignal;
  /** Called after each step; `t` is the timestep entered, `x0` the image estimate used. */
  onStep?: (step: StepInfo) => void | Promise<void>;
}

const INVERT_OPTIONS: OptionsSchema = {
  numSteps: NUM_STEPS_OPTION,
  spacing: SPACING_OPTION,
};

/**
 * Map images to DDIM latents x_T by running deterministic DDIM backwards.
 *
 * @param model The noise predictor (a function or a `UNet`).
 * @param schedule The schedule the model was trained with.
 * @param images Images x_0, NHWC float32 (not consumed).
 * @param options `numSteps`, `spacing`, `signal`, `onStep`.
 * @returns Latents x_T of the same shape (not clamped); the caller owns the tensor.
 * @throws {RangeError} numSteps outside [1, T] or an unknown spacing.
 * @throws {TypeError} images not a float32 rank-4 tensor, or a model output of the wrong shape.
 * @example
 * ```ts
 * import { invertDdim } from "./ddim_inversion.ts";
 * import { sampleDdim } from "./ddim.ts";
 * import { initBackend, tf } from "../core/backend.ts";
 * import { makeSchedule } from "../core/schedule.ts";
 * await initBackend("cpu");
 * const schedule = makeSchedule({ T: 1000 });
 * const model = (x: tf.Tensor4D) => tf.mul(x, 0.5) as tf.Tensor4D; // stand-in eps model
 * const image = tf.fill([1, 4, 4, 1], 0.25) as tf.Tensor4D;
 * const latent = await invertDdim(model, schedule, image, { numSteps: 20 });
 * const back = await sampleDdim(model, schedule, { xT: latent, numSteps: 20, clipX0: false });
 * console.log(latent.shape, back.shape); // [1, 4, 4, 1] [1, 4, 4, 1]
 * tf.dispose([image, latent, back]);
 * schedule.dispose();
 * ```
 */
export async function invertDdim(
  model: ModelLike,
  schedule: Schedule,
  images: tf.Tensor4D,
  options: InvertOptions = {},
): Promise<tf.Tensor4D> {
  const what = "invert with ddim";
  const opts = validateOptions(
    what,
    INVERT_OPTIONS,
    options as Readonly<Record<string, unknown>>,
    schedule.T,
    ["signal", "onStep"],
  );
  if (
    !(images instanceof tf.Tensor) || images.rank !== 4 ||
    images.dtype !== "float32"
  ) {
    throw new TypeError(
      `Cannot ${what}: images must be a float32 NHWC tensor (got ${
        images instanceof tf.Tensor
          ? `${images.dtype} [${images.shape}]`
          : typeof images
      }, expected float32 [n, h, w, c])`,
    );
  }
  options.signal?.throwIfAborted();
  const run: Run = {
    name: "ddim inversion",
    opts,
    shape: images.shape,
    seed: 1,
    eps: asEpsModel("ddim inversion", model),
    xT: images,
    signal: options.signal,
    onStep: options.onStep,
  };
  // the sampler's steps in reverse: each from level abarNext up to timestep t
  const steps = gridSteps(run, schedule).reverse();
  const latents = await drive(run, steps, (step, x) => {
    const { t, abar, abarNext: abarPrev } = step;
    return tf.tidy(() => {
      // 1. the model at the level entered
      const eps = evalEps(run, x, t);
      // 2. the image estimate from the level left
      const x0 = predictX0(x, eps, abarPrev);
      // 3. forward along the same eps: x' = sqrt(abar) x0 + sqrt(1 - abar) eps
      const next = tf.add(
        tf.mul(x0, Math.sqrt(abar)),
        tf.mul(eps, Math.sqrt(1 - abar)),
      );
      return { x: next as tf.Tensor4D, x0, t };
    });
  }, { clamp: false });
  return latents;
}

/**
 * Spherical linear interpolation between latents, per image:
 * slerp(a, b; alpha) = sin((1 - alpha) theta) / sin(theta) a + sin(alpha theta) / sin(theta) b,
 * theta the angle between a[i] and b[i] (linear interpolation where theta < 1e-4).
 *
 * Keeps latents at the norm Gaussian noise has, where linear interpolation
 * shrinks it toward the middle (Shoemake 1985; White 2016).
 *
 * @param a Latents, NHWC [n, h, w, c].
 * @param b Latents of the same shape.
 * @param alphas One weight, or several: [k] weights give [k n, h, w, c], weight-major.
 * @returns The interpolated latents; the caller owns the tensor.
 * @throws {TypeError} a and b differ in shape.
 * @throws {RangeError} A weight that is not finite.
 * @example
 * ```ts
 * import { slerp } from "./ddim_inversion.ts";
 * import { initBackend, tf } from "../core/backend.ts";
 * await initBackend("cpu");
 * const a = tf.tensor4d([1, 0], [1, 1, 1, 2]);
 * const b = tf.tensor4d([0, 1], [1, 1, 1, 2]);
 * const mid = slerp(a, b, 0.5);
 * console.log(await mid.data()); // [0.7071..., 0.7071...]
 * tf.dispose([a, b, mid]);
 * ```
 */
export function slerp(
  a: tf.Tensor4D,
  b: tf.Tensor4D,
  alphas: number | readonly number[],
): tf.Tensor4D {
  if (a.shape.join() !== b.shape.join()) {
    throw new TypeError(
      `Cannot slerp: latents differ in shape (got [${a.shape}] and [${b.shape}], expected equal shapes)`,
    );
  }
  const ws = typeof alphas === "number" ? [alphas] : [...alphas];
  for (const w of ws) {
    if (!Number.isFinite(w)) {
      throw new RangeError(
        `Cannot slerp: weight is not finite (got ${w}, expected a finite number)`,
      );
    }
  }
  return tf.tidy(() => {
    const dot = tf.sum(tf.mul(a, b), [1, 2, 3], true);
    const norms = tf.sqrt(tf.mul(
      tf.sum(tf.square(a), [1, 2, 3], true),
      tf.sum(tf.square(b), [1, 2, 3], true),
    ));
    const cos = tf.clipByValue(tf.div(dot, tf.maximum(norms, 1e-30)), -1, 1);
    const theta = tf.acos(cos);
    const sinTheta = tf.sin(theta);
    const small = tf.less(theta, 1e-4);
    const safeSin = tf.where(small, tf.onesLike(sinTheta), sinTheta);
    const parts = ws.map((w) => {
      const wa = tf.where(
        small,
        tf.fill(theta.shape, 1 - w),
        tf.div(tf.sin(tf.mul(theta, 1 - w)), safeSin),
      );
      const wb = tf.where(
        small,
        tf.fill(theta.shape, w),
        tf.div(tf.sin(tf.mul(theta, w)), safeSin),
      );
      return tf.add(tf.mul(wa, a), tf.mul(wb, b));
    });
    return (parts.length === 1 ? parts[0] : tf.concat(parts, 0)) as tf.Tensor4D;
  });
}
