/**
 * The plumbing every solver's loop shares: options, the model adapter,
 * seeded noise, the step callback, abort, and the final clamp.
 *
 * @module
 */
import { tf } from "../core/backend.ts";
import type { Schedule } from "../core/schedule.ts";
import {
  type OptionsSchema,
  type OptionValues,
  validateSamplerOptions,
} from "./options.ts";
import { makeSolverSteps, type SolverStep, type Spacing } from "./math.ts";
import type {
  EpsModel,
  ModelLike,
  SampleOptions,
  StepInfo,
} from "./registry.ts";

/** One sampler run: checked options, the adapted model and the noise source. */
export interface Run {
  /** The sampler's name, for error messages. */
  readonly name: string;
  /** Options after defaults and checks. */
  readonly opts: OptionValues;
  /** The images' shape, NHWC. */
  readonly shape: [number, number, number, number];
  /** The seed every random draw derives from. */
  readonly seed: number;
  /** The model as a function. */
  readonly eps: EpsModel;
  /** The caller's initial noise, if any. */
  readonly xT?: tf.Tensor4D;
  /** The caller's abort signal, if any. */
  readonly signal?: AbortSignal;
  /** The caller's step callback, if any. */
  readonly onStep?: (step: StepInfo) => void | Promise<void>;
}

/**
 * Adapt a model (function or object with `predict`) into an {@linkcode EpsModel}.
 */
export function asEpsModel(name: string, model: ModelLike): EpsModel {
  if (typeof model === "function") return model;
  if (
    model !== null && typeof model === "object" &&
    typeof (model as { predict?: unknown }).predict === "function"
  ) {
    return (x, t) => model.predict(x, t);
  }
  throw new TypeError(
    `Cannot sample with ${name}: the model is not usable (got ${
      model === null ? "null" : typeof model
    }, expected a function (x, t) => eps or an object with predict(x, t))`,
  );
}

function shapeOf(
  name: string,
  options: SampleOptions,
  opts: OptionValues,
): [number, number, number, number] {
  const { xT } = options;
  if (xT === undefined) {
    const size = opts.imgSize as number;
    return [opts.n as number, size, size, opts.channels as number];
  }
  if (!(xT instanceof tf.Tensor) || xT.rank !== 4 || xT.dtype !== "float32") {
    throw new TypeError(
      `Cannot sample with ${name}: xT must be a float32 NHWC tensor (got ${
        xT instanceof tf.Tensor ? `${xT.dtype} [${xT.shape}]` : typeof xT
      }, expected float32 [n, size, size, channels])`,
    );
  }
  const [n, h, w, c] = xT.shape;
  const asked: [string, number | undefined, number, boolean][] = [
    ["n", options.n, n, true],
    ["imgSize", options.imgSize, h, h === w],
    ["channels", options.channels, c, true],
  ];
  for (const [key, given, found, ok] of asked) {
    if (given !== undefined && (given !== found || !ok)) {
      throw new TypeError(
        `Cannot sample with ${name}: xT does not match ${key} (got xT [${xT.shape}], expected ${key} ${given})`,
      );
    }
  }
  return [n, h, w, c];
}

/**
 * Check options, adapt the model and fix the seed: the start of every sampler.
 */
export function startRun(
  name: string,
  schema: OptionsSchema,
  model: ModelLike,
  schedule: Schedule,
  options: SampleOptions,
): Run {
  const eps = asEpsModel(name, model);
  const opts = validateSamplerOptions(
    name,
    schema,
    options as Readonly<Record<string, unknown>>,
    schedule.T,
  );
  const shape = shapeOf(name, options, opts);
  const seed = (opts.seed as number | undefined) ??
    crypto.getRandomValues(new Uint32Array(1))[0];
  if (
    options.signal !== undefined && !(options.signal instanceof AbortSignal)
  ) {
    throw new TypeError(
      `Cannot sample with ${name}: signal is not an AbortSignal (got ${typeof options
        .signal}, expected an AbortSignal)`,
    );
  }
  if (options.onStep !== undefined && typeof options.onStep !== "function") {
    throw new TypeError(
      `Cannot sample with ${name}: onStep is not a function (got ${typeof options
        .onStep}, expected a function)`,
    );
  }
  options.signal?.throwIfAborted();
  return {
    name,
    opts,
    shape,
    seed,
    eps,
    xT: options.xT,
    signal: options.signal,
    onStep: options.onStep,
  };
}

/** A 32-bit integer hash (Chris Wellons's lowbias32). */
function hash32(v: number): number {
  let h = v >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b);
  h ^= h >>> 16;
  return h >>> 0;
}

/** The seed of draw `key` of a run: distinct keys give independent streams; never 0 (tfjs reads 0 as unseeded). */
export function drawSeed(seed: number, key: number): number {
  return hash32(hash32(seed) ^ hash32(key + 0x9e3779b9)) || 1;
}

/** Key of the initial-noise draw; step draws are keyed by the timestep they leave. */
const XT_KEY = -1;

/** N(0, I) noise of the run's shape, drawn from (seed, key). */
export function standardNormal(run: Run, key: number): tf.Tensor4D {
  return tf.randomNormal(
    run.shape,
    0,
    1,
    "float32",
    drawSeed(run.seed, key),
  ) as tf.Tensor4D;
}

/** Evaluate the model at integer timestep t for the whole batch, checking its output shape. */
export function evalEps(run: Run, x: tf.Tensor4D, t: number): tf.Tensor4D {
  return tf.tidy(() => {
    const ts = tf.fill([x.shape[0]], t, "int32") as tf.Tensor1D;
    const out = run.eps(x, ts);
    if (!(out instanceof tf.Tensor) || out.shape.join() !== x.shape.join()) {
      throw new TypeError(
        `Cannot sample with ${run.name}: the model returned the wrong shape (got [${
          out instanceof tf.Tensor ? out.shape : typeof out
        }], expected [${x.shape}])`,
      );
    }
    return out;
  });
}

/** What one solver step returns to {@linkcode drive}. */
export interface StepResult {
  /** The new state, in the model's x_t scale; drive takes ownership. */
  x: tf.Tensor4D;
  /** The clean image predicted during the step; drive disposes it after onStep. */
  x0: tf.Tensor4D;
  /** The timestep the step left. */
  t: number;
}

/**
 * How often, at most, a run with a signal yields to the event loop so a
 * timer can abort it: setTimeout(0) costs about 2 ms (timers nested in
 * timers are clamped), so yielding every step would add 2 s to 1000 steps.
 */
const YIELD_MS = 20;

/**
 * Run a solver's loop: start from xT (or seeded noise), call `step` `steps`
 * times, report each step, stop on abort, and return the clamped images.
 * One x is alive between steps; every tensor is freed on success and on error.
 *
 * @param run The run from {@linkcode startRun}.
 * @param steps What each step needs (usually the grid's {@linkcode SolverStep}s), in order.
 * @param step One step, synchronous (wrap its math in tf.tidy); it must not dispose x.
 * @param options `clamp: false` returns the last x as it is (DDIM inversion's latents).
 * @returns Images, NHWC in [-1, 1].
 */
export async function drive<S>(
  run: Run,
  steps: readonly S[],
  step: (s: S, x: tf.Tensor4D, i: number) => StepResult,
  options: { clamp?: boolean } = {},
): Promise<tf.Tensor4D> {
  let x = run.xT !== undefined ? tf.clone(run.xT) : standardNormal(run, XT_KEY);
  let lastYield = performance.now();
  try {
    for (let i = 0; i < steps.length; i++) {
      run.signal?.throwIfAborted();
      const out = step(steps[i], x, i);
      x.dispose();
      x = out.x;
      try {
        if (run.onStep !== undefined) {
          await run.onStep({
            i,
            steps: steps.length,
            t: out.t,
            x,
            x0: out.x0,
          });
        }
      } finally {
        out.x0.dispose();
      }
      if (
        run.signal !== undefined && performance.now() - lastYield > YIELD_MS
      ) {
        // a macrotask, so that timers (AbortSignal.timeout) can fire
        await new Promise<void>((resolve) => setTimeout(resolve, 0));
        lastYield = performance.now();
      }
    }
    run.signal?.throwIfAborted();
    return options.clamp === false ? tf.clone(x) : tf.clipByValue(x, -1, 1);
  } finally {
    x.dispose();
  }
}

/** The run's grid from its `numSteps` and `spacing` options, as the steps to take. */
export function gridSteps(run: Run, schedule: Schedule): SolverStep[] {
  return makeSolverSteps(schedule, run.opts.numSteps as number, {
    spacing: run.opts.spacing as Spacing,
  });
}

/** Clip x0 to [-1, 1] when asked (the reference's DDIM does). */
export function maybeClip(x0: tf.Tensor4D, clip: boolean): tf.Tensor4D {
  return clip ? tf.clipByValue(x0, -1, 1) : x0;
}
