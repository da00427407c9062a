/**
 * The sampler plugin contract and the registry of samplers by name.
 *
 * A sampler sees the model only as an {@linkcode EpsModel} (or anything with
 * a `predict(x, t)` method, such as a `UNet`). A plugin is a name, one line
 * of description, a typed options schema and a `sample` function; adding a
 * solver is one new file plus one {@linkcode registerSampler} line, or a
 * plugin registered from user code.
 *
 * @module
 */
import type { tf } from "../core/backend.ts";
import type { Schedule } from "../core/schedule.ts";
import type { OptionsSchema } from "./options.ts";
import { ddpmSampler } from "./ddpm.ts";
import { ddimSampler } from "./ddim.ts";
import { dpmSolverSampler } from "./dpm_solver.ts";
import { eulerSampler } from "./euler.ts";
import { heunSampler } from "./heun.ts";

/**
 * What a sampler sees of the model: NHWC x_t and int32 timesteps [N] in,
 * predicted noise (same shape as x) out. It must not keep its inputs.
 */
export type EpsModel = (x: tf.Tensor4D, t: tf.Tensor1D) => tf.Tensor4D;

/** Anything with a noise-predicting `predict(x, t)`, such as a `UNet`. */
export interface EpsPredictor {
  /** Predict the noise in x_t at timesteps t. */
  predict(x: tf.Tensor4D, t: tf.Tensor1D): tf.Tensor4D;
}

/** The model argument every sampler accepts. */
export type ModelLike = EpsModel | EpsPredictor;

/**
 * What `onStep` receives after each step. The tensors are the sampler's and
 * are disposed after the callback returns: read them (`await x.data()`) or
 * `tf.clone` them, never keep them.
 */
export interface StepInfo {
  /** The step's index: 0 for the first, `steps - 1` for the last. */
  i: number;
  /** The number of steps this run takes. */
  steps: number;
  /** The timestep the step left (T-1 first, down to the grid's lowest). */
  t: number;
  /** The state after the step, in the x_t scale of the model (x_0 after the last step). */
  x: tf.Tensor4D;
  /** The clean image predicted during the step. */
  x0: tf.Tensor4D;
}

/** The options every sampler takes. */
export interface SampleOptions {
  /** Number of images; 1 by default, or xT's batch size. */
  n?: number;
  /** Image height and width; 32 by default, or xT's size. */
  imgSize?: number;
  /** Channels per pixel; 1 by default, or xT's channel count. */
  channels?: number;
  /** Seed of every random draw; random when unset. */
  seed?: number;
  /** Initial noise x_T, NHWC [n, imgSize, imgSize, channels]; drawn from `seed` when unset. Not consumed. */
  xT?: tf.Tensor4D;
  /** Aborts the run between steps; the promise then rejects with the signal's reason. */
  signal?: AbortSignal;
  /** Called after each step (awaited if it returns a promise). */
  onStep?: (step: StepInfo) => void | Promise<void>;
}

/** Options of a sampler found by name: the common ones plus its own. */
export type AnySampleOptions = SampleOptions & {
  readonly [option: string]: unknown;
};

/** A sampler plugin: name, description, options schema and the sampling function. */
export interface SamplerPlugin<O extends SampleOptions = AnySampleOptions> {
  /** The registry key, e.g. "ddim". */
  readonly name: string;
  /** One line saying what it is, with its paper. */
  readonly description: string;
  /** The sampler's own options (the common ones are in `COMMON_OPTIONS`). */
  readonly options: OptionsSchema;
  /**
   * Sample images.
   *
   * @param model The noise predictor.
   * @param schedule The schedule the model was trained with.
   * @param options Common and sampler options.
   * @returns Images, NHWC in [-1, 1]; the caller owns the tensor.
   */
  sample(
    model: ModelLike,
    schedule: Schedule,
    options?: O,
  ): Promise<tf.Tensor4D>;
}

const registry = new Map<string, SamplerPlugin>();

/**
 * Register a sampler under its name.
 *
 * @param plugin The plugin; its name must be new.
 * @returns Nothing.
 * @throws {RangeError} A sampler of that name is already registered.
 * @throws {TypeError} The plugin lacks a name, description, options or sample function.
 * @example
 * ```ts
 * import { getSampler, registerSampler } from "./registry.ts";
 * import { initBackend, tf } from "../core/backend.ts";
 * import { makeSchedule } from "../core/schedule.ts";
 * await initBackend("cpu");
 * registerSampler({
 *   name: "blank",
 *   description: "returns blank images (a demo)",
 *   options: {},
 *   sample: (_model, _schedule, options = {}) =>
 *     Promise.resolve(tf.zeros([options.n ?? 1, 8, 8, 1]) as tf.Tensor4D),
 * });
 * const schedule = makeSchedule({ T: 10 });
 * const x = await getSampler("blank").sample((x) => x, schedule, { n: 2 });
 * console.log(x.shape); // [2, 8, 8, 1]
 * x.dispose();
 * schedule.dispose();
 * ```
 */
export function registerSampler<O extends SampleOptions>(
  plugin: SamplerPlugin<O>,
): void {
  if (
    plugin === null || typeof plugin !== "object" ||
    typeof plugin.name !== "string" || plugin.name === "" ||
    typeof plugin.description !== "string" ||
    typeof plugin.options !== "object" || plugin.options === null ||
    typeof plugin.sample !== "function"
  ) {
    throw new TypeError(
      `Cannot register sampler: not a plugin (got ${
        typeof plugin === "object" && plugin !== null
          ? `{ ${Object.keys(plugin).join(", ")} }`
          : String(plugin)
      }, expected { name, description, options, sample })`,
    );
  }
  if (registry.has(plugin.name)) {
    throw new RangeError(
      `Cannot register sampler: the name is taken (got "${plugin.name}", expected a name other than ${
        [...registry.keys()].join(", ")
      })`,
    );
  }
  registry.set(plugin.name, plugin as unknown as SamplerPlugin);
}

/**
 * Find a registered sampler by name.
 *
 * @param name The sampler's name, e.g. "ddim".
 * @returns The plugin.
 * @throws {RangeError} No sampler has that name; the message lists those that exist.
 * @example
 * ```ts
 * import { getSampler } from "./registry.ts";
 * const ddim = getSampler("ddim");
 * console.log(ddim.options.numSteps.default); // 50
 * ```
 */
export function getSampler(name: string): SamplerPlugin {
  const plugin = registry.get(name);
  if (plugin === undefined) {
    throw new RangeError(
      `Cannot get sampler: unknown name (got "${name}", expected one of ${
        [...registry.keys()].join(", ")
      })`,
    );
  }
  return plugin;
}

/**
 * All registered samplers, in registration order.
 *
 * @returns The plugins (built-ins first).
 * @example
 * ```ts
 * import { listSamplers } from "./registry.ts";
 * for (const s of listSamplers()) console.log(`${s.name}: ${s.description}`);
 * ```
 */
export function listSamplers(): SamplerPlugin[] {
  return [...registry.values()];
}

// The built-in solvers: one line each.
registerSampler(ddpmSampler);
registerSampler(ddimSampler);
registerSampler(dpmSolverSampler);
registerSampler(eulerSampler);
registerSampler(heunSampler);
