/**
 * One DDPM training step, as the reference's `train_step`, and the state to resume it.
 *
 * Notation (Ho et al. 2020, Algorithm 1):
 *
 * | code        | paper                                    |
 * |-------------|------------------------------------------|
 * | `x0`        | x_0, a batch of images in [-1, 1], NHWC  |
 * | `t`         | t ~ U{0, ..., T-1} (0-based)             |
 * | `eps`       | epsilon ~ N(0, I)                        |
 * | `xt`        | x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps |
 * | `predict`   | epsilon_theta(x_t, t)                    |
 *
 * One step:
 *
 * 1. draw t and eps from (seed, step): a resumed run draws the same numbers
 * 2. x_t = qSample(x0, t, eps); loss = mean((epsilon_theta(x_t, t) - eps)^2)
 * 3. gradients of the loss; clip their global norm at `maxGradNorm`
 * 4. read loss and norm (the one device read); a non-finite one stops here
 * 5. AdamW step, then EMA update
 *
 * On WebGPU, step 3 only computes the norm (over the gradients concatenated
 * into one vector) and the clipping is folded into step 5's fused AdamW
 * programs (core/_webgpu_optim.ts); the numbers are the same up to float32
 * rounding. From the second step on, the trainer records one whole step's
 * WebGPU work and replays it for the steps after (`TrainerOptions.replay`,
 * core/_webgpu_replay.ts): the same numbers, bit for bit, without tfjs's
 * per-op JavaScript.
 *
 * @module
 */
import "./_gradients.ts";
import { tf } from "./backend.ts";
import { AdamW, type AdamWConfig, type AdamWState } from "./optim.ts";
import { Ema, type EmaConfig, type EmaState, UPDATE_GATED } from "./ema.ts";
import {
  clipScale,
  finiteGate,
  flatNorm,
  flattenInOrder,
  PACKED,
  REPLAYED,
  REWIND,
  STEP_FLAT,
  STEP_SCALARS,
} from "./_webgpu_optim.ts";
import {
  type RecordedStep,
  recordStep,
  replayUnavailable,
  sharesData,
} from "./_webgpu_replay.ts";
import { qSample, type Schedule } from "./schedule.ts";
import { UNet } from "./unet.ts";
import { mulberry32 } from "./_random.ts";
import {
  GradientPool,
  shardLoss,
  type ShardResult,
  shardRows,
} from "./_parallel.ts";

/**
 * What {@linkcode Trainer} needs of a model: its trainable variables and its
 * forward pass. `UNet` (core/unet.ts) is one.
 */
export interface TrainableModel {
  /** The trainable parameters by key. */
  readonly params: ReadonlyMap<string, tf.Variable>;
  /** Predict the noise in x_t (NHWC float32) at int32 timesteps t. */
  predict(x: tf.Tensor4D, t: tf.Tensor1D): tf.Tensor4D;
}

/** Options of {@linkcode Trainer}. */
export interface TrainerOptions {
  /** Base seed of the timestep and noise draws; 0 by default. An integer in [0, 2^32). */
  seed?: number;
  /** Clip the gradients' global norm at this; 1.0 by default, as the reference. Infinity disables. */
  maxGradNorm?: number;
  /** AdamW hyper-parameters; see {@linkcode AdamWConfig}. */
  optimizer?: Partial<AdamWConfig>;
  /** EMA settings (see {@linkcode EmaConfig}), or false for no EMA; the reference's constant 0.9999 by default. */
  ema?: Partial<EmaConfig> | false;
  /**
   * Threads computing each step's gradients: 1 (the default) computes on
   * the calling thread; k > 1 splits the batch into k shards, one here and
   * the others on Deno workers holding replicas of the model (a `UNet`, on
   * the wasm or cpu backend), and sums their gradients before clipping and
   * the one AdamW update: the same step up to float summation order.
   * "auto" takes `navigator.hardwareConcurrency` (at most 8) on wasm or
   * cpu and 1 on WebGPU. Free the workers with {@linkcode Trainer.dispose};
   * an idle worker does not keep the process alive.
   */
  workers?: number | "auto";
  /**
   * On ddpm's WebGPU backend, record the WebGPU work of one fused step and
   * replay it for the steps after (the same dispatches, without running
   * tfjs's per-op JavaScript again): the same numbers, bit for bit, at a
   * fraction of the host's time per step. True by default;
   * `DDPM_WEBGPU_REPLAY=0` also turns it off. See {@linkcode Trainer.replayStats}.
   */
  replay?: boolean;
}

/** How many steps a {@linkcode Trainer} recorded and replayed, and why it does not, if it does not. */
export interface ReplayStats {
  /** Steps whose work was recorded (each also ran through tfjs). */
  recorded: number;
  /** Steps replayed from a recording. */
  replayed: number;
  /** Why steps are no longer recorded ("" while they are or may be). */
  fallback: string;
}

/** What one {@linkcode Trainer.trainStep} did. */
export interface TrainStepResult {
  /** Number of steps taken, this one included. */
  step: number;
  /** The batch's mean squared error of the noise prediction, before the update. */
  loss: number;
  /** The gradients' global L2 norm before clipping. */
  gradNorm: number;
}

/**
 * Everything needed to resume a {@linkcode Trainer} exactly (tensors in TF layouts).
 *
 * A checkpoint stores `params`, `ema.params` and the optimizer moments as
 * tensors, and the rest as JSON.
 */
export interface TrainerState {
  /** Number of steps taken. */
  step: number;
  /** Base seed of the draws. */
  seed: number;
  /** The clipping threshold. */
  maxGradNorm: number;
  /** The model's weights, by key. */
  params: Map<string, tf.Tensor>;
  /** The optimizer's hyper-parameters, step and moments. */
  optimizer: AdamWState;
  /** The EMA's settings, update count and weights, or null without EMA. */
  ema: EmaState | null;
}

/**
 * Clip gradients to a global L2 norm, as `torch.nn.utils.clip_grad_norm_`.
 *
 * total = sqrt(sum of every squared entry); each gradient is multiplied by
 * min(1, maxNorm / (total + 1e-6)), which leaves it unchanged when the
 * norm is within bounds. Nothing is read from the device.
 *
 * @param grads Gradients by key; not disposed.
 * @param maxNorm The largest norm allowed, > 0 (Infinity to only measure).
 * @returns The clipped gradients (new tensors) and the norm before clipping, a scalar; the caller owns both.
 * @example
 * ```ts
 * import { clipGradNorm } from "./train.ts";
 * import { initBackend, tf } from "./backend.ts";
 * await initBackend("cpu");
 * const g = new Map([["a", tf.tensor1d([3, 4])]]);
 * const { grads, norm } = clipGradNorm(g, 1);
 * console.log(await norm.data(), await grads.get("a")!.data()); // [5] ~[0.6, 0.8]
 * tf.dispose([norm, ...grads.values(), ...g.values()]);
 * ```
 */
export function clipGradNorm(
  grads: ReadonlyMap<string, tf.Tensor>,
  maxNorm: number,
): { grads: Map<string, tf.Tensor>; norm: tf.Scalar } {
  if (!(maxNorm > 0)) {
    throw new RangeError(
      `Cannot clip gradients: maxNorm must be positive (got ${maxNorm}, expected > 0)`,
    );
  }
  const keys = [...grads.keys()];
  if (
    tf.getBackend() === "webgpu" && keys.length > 0 &&
    allFloat32(grads.values())
  ) {
    // Two programs for the norm, one per gradient for the scaling.
    const [norm, ...clipped] = tf.tidy(() => {
      const total = flatNorm(flattenInOrder(grads, keys));
      return [
        total,
        ...keys.map((k) =>
          Number.isFinite(maxNorm)
            ? clipScale(grads.get(k)!, total, maxNorm)
            : tf.clone(grads.get(k)!)
        ),
      ];
    });
    return {
      grads: new Map(keys.map((k, i) => [k, clipped[i]])),
      norm: norm as tf.Scalar,
    };
  }
  const [norm, ...clipped] = tf.tidy(() => {
    const sumSq = keys.length === 0
      ? tf.scalar(0)
      // The per-tensor sums stacked and summed (this path runs on cpu and
      // wasm; WebGPU takes the flat norm above).
      : tf.sum(tf.stack(keys.map((k) => tf.sum(tf.square(grads.get(k)!)))));
    const total = tf.sqrt(sumSq);
    const coef = tf.minimum(tf.div(maxNorm, tf.add(total, 1e-6)), 1);
    return [total, ...keys.map((k) => tf.mul(grads.get(k)!, coef))];
  });
  return {
    grads: new Map(keys.map((k, i) => [k, clipped[i]])),
    norm: norm as tf.Scalar,
  };
}

/** A 32-bit integer hash of a few integers (murmur3's finaliser over a running mix). */
function hash32(...xs: number[]): number {
  let h = 0x9e3779b9;
  for (const x of xs) {
    h = Math.imul(h ^ (x >>> 0), 0x85ebca6b);
    h ^= h >>> 13;
    h = Math.imul(h, 0xc2b2ae35);
    h ^= h >>> 16;
  }
  return h >>> 0;
}

/** Uniform integers in [0, T) from mulberry32 seeded with `seed`. */
function drawTimesteps(seed: number, n: number, T: number): Int32Array {
  const u = mulberry32(seed);
  return Int32Array.from({ length: n }, () => Math.floor(u() * T));
}

/** A step's timesteps and noise as tensors (inside the caller's tidy). */
function draws(
  x0: tf.Tensor4D,
  timesteps: Int32Array,
  noiseSeed: number,
): { t: tf.Tensor1D; eps: tf.Tensor4D } {
  return {
    t: tf.tensor1d(timesteps, "int32"),
    eps: tf.randomNormal(x0.shape, 0, 1, "float32", noiseSeed) as tf.Tensor4D,
  };
}

const TIMESTEP_STREAM = 1;
const NOISE_STREAM = 2;

function checkSeed(seed: number): void {
  if (!(Number.isInteger(seed) && seed >= 0 && seed < 2 ** 32)) {
    throw new RangeError(
      `Cannot make trainer: seed must be an integer in [0, 2^32) (got ${seed})`,
    );
  }
}

function disposeMap(m: ReadonlyMap<string, tf.Tensor>): void {
  for (const t of m.values()) t.dispose();
}

const MAX_WORKERS = 8;

/** The number of gradient threads for the `workers` option (1: no workers). */
function resolveWorkers(
  workers: number | "auto",
  model: TrainableModel,
): number {
  const backend = tf.getBackend();
  const hostBackend = backend === "wasm" || backend === "cpu";
  if (workers === "auto") {
    if (!hostBackend || !(model instanceof UNet)) return 1;
    return Math.max(
      1,
      Math.min(MAX_WORKERS, navigator.hardwareConcurrency ?? 1),
    );
  }
  if (!(Number.isInteger(workers) && workers >= 1 && workers <= MAX_WORKERS)) {
    throw new RangeError(
      `Cannot make trainer: workers must be an integer in [1, ${MAX_WORKERS}] or "auto" (got ${workers}, expected e.g. 2)`,
    );
  }
  if (workers === 1) return 1;
  if (!(model instanceof UNet)) {
    throw new TypeError(
      `Cannot make trainer: workers > 1 need a UNet, which workers can rebuild (got ${
        model?.constructor?.name ?? typeof model
      }, expected a UNet)`,
    );
  }
  if (!hostBackend) {
    throw new RangeError(
      `Cannot make trainer: workers > 1 need the wasm or cpu backend (got ${backend}, expected wasm or cpu)`,
    );
  }
  return workers;
}

/** A batch's loss (a scalar) and gradients by key, before clipping. */
interface LossAndGrads {
  loss: tf.Scalar;
  grads: Map<string, tf.Tensor>;
}

/** Step 3's result: what to read, and the optimizer step that uses the clipped gradients. */
interface Clipped {
  /** [loss, pre-clip gradient norm]. */
  stats: tf.Tensor1D;
  /** Whether `step` runs the fused WebGPU programs, which take a gate. */
  fused: boolean;
  /** Whether the updates are queued already (a replayed step). */
  queued?: boolean;
  /**
   * The AdamW step with the clipped gradients (gated where fused, with the
   * step's scalars from `stepScalars` where given).
   */
  step(gate?: tf.Tensor, stepScalars?: tf.Tensor): void;
  /** Free the stats and the gradients. */
  dispose(): void;
}

/** A recorded step's body did not take the fused WebGPU path (the trainer then runs it plainly). */
class LeftFusedPath extends Error {}

/** Whether every tensor is float32 (the fused WebGPU programs' one type). */
function allFloat32(ts: Iterable<tf.Tensor>): boolean {
  for (const t of ts) if (t.dtype !== "float32") return false;
  return true;
}

/**
 * Trains a noise-prediction model with the reference's step: MSE on eps, clip 1.0, AdamW, EMA.
 *
 * The trainer owns its optimizer and EMA (free them with
 * {@linkcode Trainer.dispose}); the model and the schedule stay the caller's.
 *
 * @example
 * ```ts
 * import { Trainer } from "./train.ts";
 * import { makeSchedule } from "./schedule.ts";
 * import { initBackend, tf } from "./backend.ts";
 * await initBackend("cpu");
 * // A stand-in model: eps_theta(x, t) = w x (any TrainableModel works, UNet included).
 * const w = tf.variable(tf.scalar(0));
 * const model = {
 *   params: new Map([["w", w]]),
 *   predict: (x: tf.Tensor4D) => tf.mul(w, x) as tf.Tensor4D,
 * };
 * const schedule = makeSchedule({ T: 100 });
 * const trainer = new Trainer(model, schedule, { seed: 1, optimizer: { lr: 1e-2 } });
 * const x0 = tf.zeros([4, 8, 8, 1]) as tf.Tensor4D;
 * const { step, loss } = await trainer.trainStep(x0);
 * console.log(step, loss > 0); // 1 true
 * trainer.dispose();
 * tf.dispose([x0, w]);
 * schedule.dispose();
 * ```
 */
export class Trainer {
  /** The model being trained (the caller's). */
  readonly model: TrainableModel;
  /** The noise schedule (the caller's). */
  readonly schedule: Schedule;
  /** The optimizer over `model.params`. */
  readonly optimizer: AdamW;
  /** The moving average of `model.params`, or null without EMA. */
  readonly ema: Ema | null;
  /** Base seed of the timestep and noise draws. */
  readonly seed: number;
  /** The clipping threshold of the gradients' global norm. */
  readonly maxGradNorm: number;
  /** Threads computing each step's gradients (see {@linkcode TrainerOptions.workers}). */
  readonly workers: number;
  #step = 0;
  #pool: GradientPool | null = null;
  /** The last queued step's gate on the fused WebGPU path (null: open). */
  #gate: tf.Scalar | null = null;
  /** Bumped when a queued step is found to have failed. */
  #generation = 0;
  /** Resolves when the last called step has queued its work. */
  #queued: Promise<void> = Promise.resolve();
  /** Resolves when the last called step has been read back and judged. */
  #settled: Promise<void> = Promise.resolve();
  /** Whether fused WebGPU steps are recorded and replayed (`replay` option). */
  readonly #replay: boolean;
  /** The recorded step, for batches of shape `key`. */
  #recorded: { key: string; step: RecordedStep } | null = null;
  readonly #replayStats: ReplayStats = {
    recorded: 0,
    replayed: 0,
    fallback: "",
  };

  /**
   * Make a trainer for `model` on `schedule`.
   *
   * @param model The model to train (a `UNet` or any {@linkcode TrainableModel}).
   * @param schedule The noise schedule x_t is drawn with.
   * @param options Seed, clipping, optimizer and EMA settings.
   */
  constructor(
    model: TrainableModel,
    schedule: Schedule,
    options: TrainerOptions = {},
  ) {
    const {
      seed = 0,
      maxGradNorm = 1.0,
      optimizer = {},
      ema = {},
      workers = 1,
      replay = true,
    } = options;
    checkSeed(seed);
    if (!(maxGradNorm > 0)) {
      throw new RangeError(
        `Cannot make trainer: maxGradNorm must be positive (got ${maxGradNorm}, expected > 0)`,
      );
    }
    this.workers = resolveWorkers(workers, model);
    this.model = model;
    this.schedule = schedule;
    this.seed = seed;
    this.maxGradNorm = maxGradNorm;
    this.#replay = replay;
    this.optimizer = new AdamW(model.params, optimizer);
    this.ema = ema === false ? null : new Ema(model.params, ema);
    if (this.workers > 1) {
      this.#pool = new GradientPool(
        (model as UNet).config,
        [...model.params.keys()],
        this.workers - 1,
        tf.getBackend() as "wasm" | "cpu",
      );
    }
  }

  /**
   * Build a trainer that resumes `state` exactly: its settings, then its tensors.
   *
   * @param model The model; its weights are overwritten with `state.params`.
   * @param schedule The noise schedule (not part of the state).
   * @param state What {@linkcode Trainer.getState} returned, or a checkpoint's equivalent.
   * @param options `workers`, as for the constructor (not part of the state).
   * @returns The trainer, at `state.step`.
   * @example
   * ```ts
   * import { Trainer } from "./train.ts";
   * import { makeSchedule } from "./schedule.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.scalar(0));
   * const model = { params: new Map([["w", w]]), predict: (x: tf.Tensor4D) => tf.mul(w, x) as tf.Tensor4D };
   * const schedule = makeSchedule({ T: 10 });
   * const a = new Trainer(model, schedule, { seed: 3 });
   * const state = a.getState();
   * const b = Trainer.fromState(model, schedule, state);
   * console.log(b.seed, b.step); // 3 0
   * tf.dispose([...state.params.values(), ...state.optimizer.expAvg.values(),
   *   ...state.optimizer.expAvgSq.values(), ...state.ema!.params.values()]);
   * a.dispose(); b.dispose(); w.dispose(); schedule.dispose();
   * ```
   */
  static fromState(
    model: TrainableModel,
    schedule: Schedule,
    state: TrainerState,
    options: Pick<TrainerOptions, "workers"> = {},
  ): Trainer {
    const trainer = new Trainer(model, schedule, {
      seed: state.seed,
      maxGradNorm: state.maxGradNorm,
      optimizer: state.optimizer.config,
      ema: state.ema === null ? false : state.ema.config,
      workers: options.workers,
    });
    try {
      trainer.setState(state);
    } catch (e) {
      trainer.dispose();
      throw e;
    }
    return trainer;
  }

  /** Number of steps taken. */
  get step(): number {
    return this.#step;
  }

  /**
   * Take one training step on a batch: draw t and eps, MSE loss, clip, AdamW, EMA.
   *
   * Reads the device once (loss and norm together). A non-finite loss or
   * gradient norm throws a RangeError naming the step, and no weight
   * changes.
   *
   * Steps run in call order. On WebGPU (float32 weights) a step queues all
   * of its GPU work, updates included, before it reads its loss back, the
   * updates gated on the GPU by the numbers being finite: a caller may
   * start the next step before awaiting this one, so that the GPU and the
   * host need not wait for each read back (Deno's takes about 10 ms). If a
   * step then fails, it and the steps started after it reject and change
   * nothing, and {@linkcode Trainer.step} goes back to the failed one.
   * Elsewhere each step waits for the one before.
   *
   * @param x0 Clean images, NHWC float32 in [-1, 1]; not disposed.
   * @returns The step count, the loss and the pre-clip gradient norm.
   * @example
   * ```ts
   * import { Trainer } from "./train.ts";
   * import { makeSchedule } from "./schedule.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.scalar(0));
   * const model = { params: new Map([["w", w]]), predict: (x: tf.Tensor4D) => tf.mul(w, x) as tf.Tensor4D };
   * const schedule = makeSchedule({ T: 50 });
   * const trainer = new Trainer(model, schedule, { ema: false });
   * const x0 = tf.fill([2, 4, 4, 1], 0.5) as tf.Tensor4D;
   * const r = await trainer.trainStep(x0);
   * console.log(r.step, Number.isFinite(r.gradNorm)); // 1 true
   * trainer.dispose(); tf.dispose([x0, w]); schedule.dispose();
   * ```
   */
  async trainStep(x0: tf.Tensor4D): Promise<TrainStepResult> {
    if (x0.rank !== 4 || x0.dtype !== "float32") {
      throw new TypeError(
        `Cannot take training step: x0 must be a float32 NHWC batch (got ${x0.dtype} rank ${x0.rank}, expected float32 rank 4)`,
      );
    }
    // Steps queue their work in call order, and are judged in that order.
    const before = { queued: this.#queued, settled: this.#settled };
    let queued!: () => void;
    let settled!: () => void;
    this.#queued = new Promise((r) => queued = r);
    this.#settled = new Promise((r) => settled = r);
    try {
      await before.queued;
      return await this.#takeStep(x0, queued, before.settled);
    } finally {
      queued();
      settled();
    }
  }

  /**
   * One step, after the previous one has queued its work. On the fused
   * WebGPU path the weight, moment and EMA updates are queued gated (see
   * `finiteGate`) before the loss and norm are read, and `queued` is
   * called then: the next step may be queued while this one is read.
   * Elsewhere the numbers are read first and the updates follow.
   */
  async #takeStep(
    x0: tf.Tensor4D,
    queued: () => void,
    previous: Promise<void>,
  ): Promise<TrainStepResult> {
    const index = this.#step;
    const generation = this.#generation;
    const n = x0.shape[0];
    const timesteps = drawTimesteps(
      hash32(this.seed, index, TIMESTEP_STREAM),
      n,
      this.schedule.T,
    );
    const noiseSeed = hash32(this.seed, index, NOISE_STREAM) || 1;
    const counts = {
      optimizer: this.optimizer.stepCount,
      ema: this.ema?.optimizationStep ?? 0,
    };
    // 1-5 replayed, or recorded, on WebGPU where they can be; or
    let clipped = this.#replayedStep(x0, timesteps, noiseSeed);
    if (clipped === null) {
      // 1-2: draws, loss and gradients, here or split over the workers.
      const raw = this.#pool === null || n < 2
        ? this.#lossAndGrads(x0, timesteps, noiseSeed)
        : await this.#parallelLossAndGrads(x0, timesteps, noiseSeed);
      // 3: clipping.
      clipped = this.#clip(raw);
    }
    if (clipped.fused) {
      // 5 (queued now, gated on the GPU): the weights, then their average.
      try {
        if (!clipped.queued) this.#queueUpdates(clipped);
        this.#step = index + 1;
      } catch (e) {
        clipped.dispose();
        throw e;
      }
      queued();
    }
    // 4: the one read.
    let values: Float32Array;
    try {
      values = await clipped.stats.data() as Float32Array;
    } catch (e) {
      clipped.dispose();
      throw e;
    }
    await previous;
    const [loss, gradNorm] = values;
    const finite = Number.isFinite(loss) && Number.isFinite(gradNorm);
    if (clipped.fused) {
      clipped.dispose();
      if (generation !== this.#generation) {
        throw new RangeError(
          `Cannot take training step ${
            index + 1
          }: an earlier step queued before it failed (got a cancelled step, expected the earlier one to succeed); no weight was changed`,
        );
      }
      if (finite) return { step: index + 1, loss, gradNorm };
      // The gate skipped this step and every one queued after it.
      this.#generation++;
      this.#step = index;
      this.optimizer[REWIND](counts.optimizer);
      this.ema?.[REWIND](counts.ema);
      this.#gate?.dispose();
      this.#gate = null;
    } else if (finite) {
      // 5: update the weights, then their average.
      try {
        clipped.step();
      } finally {
        clipped.dispose();
      }
      this.ema?.update(this.model.params);
      this.#step = index + 1;
      return { step: this.#step, loss, gradNorm };
    } else {
      clipped.dispose();
    }
    const what = Number.isFinite(loss) ? "gradient norm" : "loss";
    throw new RangeError(
      `Cannot take training step ${index + 1}: the ${what} is not finite (got ${
        Number.isFinite(loss) ? gradNorm : loss
      }, expected a finite number); no weight was changed`,
    );
  }

  /**
   * Step 5 on the fused WebGPU path, queued: the step's gate (open while
   * every step so far had finite numbers), then the gated weight, moment
   * and EMA updates, with the step's scalars from tensors where given.
   */
  #queueUpdates(
    clipped: Clipped,
    scalars?: { adamw: tf.Tensor; ema?: tf.Tensor },
  ): void {
    const gate = tf.tidy(() =>
      finiteGate(clipped.stats, this.#gate ?? tf.scalar(1))
    );
    this.#gate?.dispose();
    this.#gate = gate;
    clipped.step(gate, scalars?.adamw);
    this.ema?.[UPDATE_GATED](this.model.params, gate, scalars?.ema);
  }

  /** How many steps were recorded and replayed on WebGPU, and why not, if not. */
  get replayStats(): ReplayStats {
    return { ...this.#replayStats };
  }

  /**
   * Steps 1-5 on WebGPU from a recording (see `TrainerOptions.replay`):
   * replayed when the recording fits, else run through tfjs and recorded.
   * Null, with nothing done, where steps are not replayed, and until a
   * plain fused step has packed the optimizer and the average and opened
   * the gate (the recording carries them from step to step).
   */
  #replayedStep(
    x0: tf.Tensor4D,
    timesteps: Int32Array,
    noiseSeed: number,
  ): Clipped | null {
    const stats = this.#replayStats;
    if (!this.#replay || stats.fallback || this.#pool !== null) return null;
    const unavailable = replayUnavailable();
    if (unavailable !== "") {
      // The switch stays off; the rest (a tape, a profile) may pass.
      if (unavailable.startsWith("DDPM_WEBGPU_REPLAY")) {
        stats.fallback = unavailable;
      }
      return null;
    }
    if (
      this.optimizer[PACKED] === null || this.#gate === null ||
      (this.ema !== null && this.ema[PACKED] === null)
    ) return null;
    // A state tensor shared with another (a saved state's copy): only a
    // plain step leaves the other one as it is.
    const state = this.#replayState();
    if (sharesData(state)) return null;
    const key = `${x0.shape}`;
    if (this.#recorded !== null && this.#recorded.key !== key) {
      this.#recorded.step.dispose();
      this.#recorded = null;
    }
    const { t, eps } = draws(x0, timesteps, noiseSeed);
    const adamw = tf.tensor1d(this.optimizer[STEP_SCALARS]());
    const ema = this.ema === null
      ? []
      : [tf.tensor1d(this.ema[STEP_SCALARS]())];
    const inputs = [x0, t, eps, adamw, ...ema];
    try {
      let out = this.#recorded?.step.run(inputs, state) ?? null;
      if (out !== null) {
        this.optimizer[REWIND](this.optimizer.stepCount + 1);
        this.ema?.[REPLAYED]();
        stats.replayed++;
      } else {
        this.#recorded?.step.dispose();
        this.#recorded = null;
        let made;
        try {
          made = recordStep(
            (ins) => this.#fusedStep(ins),
            inputs,
            () => this.#replayState(),
          );
        } catch (e) {
          if (!(e instanceof LeftFusedPath)) throw e;
          stats.fallback = `cannot replay: ${e.message}`;
          return null;
        }
        out = made.outputs;
        stats.recorded++;
        if (made.step !== null) this.#recorded = { key, step: made.step };
        else stats.fallback = `cannot replay: ${made.why}`;
      }
      const stepStats = out[0] as tf.Tensor1D;
      return {
        stats: stepStats,
        fused: true,
        queued: true,
        step: () => {},
        dispose: () => stepStats.dispose(),
      };
    } finally {
      tf.dispose([t, eps, adamw, ...ema]);
    }
  }

  /**
   * Steps 1-5 on the fused WebGPU path from given draws and step scalars,
   * as `recordStep` records them: `[x0, t, eps, adamw, ema?]` to `[stats]`.
   */
  #fusedStep([x0, t, eps, adamw, ema]: tf.Tensor[]): tf.Tensor[] {
    const clipped = this.#clip(
      this.#lossAndGradsOf(
        x0 as tf.Tensor4D,
        t as tf.Tensor1D,
        eps as tf.Tensor4D,
      ),
    );
    try {
      if (!clipped.fused) {
        throw new LeftFusedPath(
          "the step left the fused WebGPU path (its gradients are not float32 or do not cover the parameters)",
        );
      }
      this.#queueUpdates(clipped, { adamw, ema });
      return [clipped.stats.clone()];
    } finally {
      clipped.dispose();
    }
  }

  /** The tensors a recorded step replaces: weights, packed moments and average, gate. */
  #replayState(): tf.Tensor[] {
    return [
      ...new Set<tf.Tensor>([
        ...this.model.params.values(),
        ...this.optimizer.params.values(),
      ]),
      this.optimizer[PACKED]!,
      ...(this.ema === null ? [] : [this.ema[PACKED]!]),
      this.#gate!,
    ];
  }

  /**
   * Step 3: the gradients' global norm and their clipping; frees `raw`.
   *
   * On WebGPU, when every optimizer parameter has a float32 gradient, only
   * the norm is computed here (3 programs), over the gradients concatenated
   * in the optimizer's order, and the clipping is folded into the fused
   * AdamW step; elsewhere {@linkcode clipGradNorm} and `AdamW.step`.
   */
  #clip(raw: LossAndGrads): Clipped {
    const keys = [...this.optimizer.params.keys()];
    const fused = tf.getBackend() === "webgpu" && keys.length > 0 &&
      raw.grads.size === keys.length &&
      keys.every((k) =>
        raw.grads.get(k)?.size === this.optimizer.params.get(k)?.size
      ) &&
      allFloat32(raw.grads.values()) &&
      allFloat32(this.optimizer.params.values());
    if (fused) {
      const { stats, flat, norm } = tf.tidy(() => {
        const flat = flattenInOrder(raw.grads, keys);
        const norm = flatNorm(flat);
        return { stats: tf.stack([raw.loss, norm]) as tf.Tensor1D, flat, norm };
      });
      raw.loss.dispose();
      disposeMap(raw.grads);
      return {
        stats,
        fused: true,
        step: (gate?: tf.Tensor, stepScalars?: tf.Tensor) =>
          this.optimizer[STEP_FLAT](
            flat,
            { norm, maxNorm: this.maxGradNorm },
            gate,
            stepScalars,
          ),
        dispose: () => tf.dispose([stats, flat, norm]),
      };
    }
    const { stats, grads } = tf.tidy(() => {
      const { grads, norm } = clipGradNorm(raw.grads, this.maxGradNorm);
      return {
        stats: tf.stack([raw.loss, norm]) as tf.Tensor1D,
        grads: Object.fromEntries(grads),
      };
    });
    raw.loss.dispose();
    disposeMap(raw.grads);
    const gradMap = new Map(Object.entries(grads));
    return {
      stats,
      fused: false,
      step: () => this.optimizer.step(gradMap),
      dispose: () => {
        stats.dispose();
        disposeMap(gradMap);
      },
    };
  }

  /** The trainable variables and the key of each, by variable name. */
  #trainable(): { vars: tf.Variable[]; keyOf: Map<string, string> } {
    return {
      vars: [...this.model.params.values()].filter((v) => v.trainable),
      keyOf: new Map(
        [...this.model.params].map(([k, v]) => [v.name, k] as [string, string]),
      ),
    };
  }

  /** The draws, x_t, the loss and its gradients on this thread (one tidy). */
  #lossAndGrads(
    x0: tf.Tensor4D,
    timesteps: Int32Array,
    noiseSeed: number,
  ): LossAndGrads {
    const { t, eps } = draws(x0, timesteps, noiseSeed);
    try {
      return this.#lossAndGradsOf(x0, t, eps);
    } finally {
      tf.dispose([t, eps]);
    }
  }

  /** The loss and its gradients for given draws. */
  #lossAndGradsOf(
    x0: tf.Tensor4D,
    t: tf.Tensor1D,
    eps: tf.Tensor4D,
  ): LossAndGrads {
    const { vars, keyOf } = this.#trainable();
    const { loss, grads } = tf.tidy(() => {
      const { value, grads: named } = tf.variableGrads(() => {
        const xt = qSample(x0, t, eps, this.schedule);
        const pred = this.model.predict(xt, t);
        return tf.mean(tf.squaredDifference(pred, eps)) as tf.Scalar;
      }, vars);
      const raw: Record<string, tf.Tensor> = {};
      for (const [name, g] of Object.entries(named)) {
        if (g !== null) raw[keyOf.get(name)!] = g;
      }
      return { loss: value, grads: raw };
    });
    return { loss, grads: new Map(Object.entries(grads)) };
  }

  /**
   * The same draws, loss and gradients with the batch split into shards:
   * the first here, the others on the pool's workers (sent the current
   * weights); the shards' losses and gradients are summed.
   */
  async #parallelLossAndGrads(
    x0: tf.Tensor4D,
    timesteps: Int32Array,
    noiseSeed: number,
  ): Promise<LossAndGrads> {
    const pool = this.#pool!;
    const [n, h, w, c] = x0.shape;
    const per = h * w * c;
    const total = n * per;
    const shards = shardRows(n, pool.size + 1);
    const { t, eps, xt } = tf.tidy(() => {
      const { t, eps } = draws(x0, timesteps, noiseSeed);
      return { t, eps, xt: qSample(x0, t, eps, this.schedule) };
    });
    const params = pool.keys.map((k) => this.model.params.get(k)!);
    let remote: Promise<ShardResult>[];
    try {
      await pool.ready();
      const [xtHost, epsHost, ...weights] = await Promise.all([
        xt.data() as Promise<Float32Array>,
        eps.data() as Promise<Float32Array>,
        ...params.map((p) => p.data() as Promise<Float32Array>),
      ]);
      remote = shards.slice(1).map(([start, count], i) =>
        pool.run(i, {
          weights,
          xt: xtHost.slice(start * per, (start + count) * per),
          t: timesteps.slice(start, start + count),
          eps: epsHost.slice(start * per, (start + count) * per),
          shape: [count, h, w, c],
          total,
        })
      );
    } catch (e) {
      tf.dispose([t, eps, xt]);
      throw e;
    }
    // Never leave a rejection unobserved while the local shard computes.
    for (const r of remote) r.catch(() => {});
    const { vars, keyOf } = this.#trainable();
    const local = tf.tidy(() => {
      const [, count] = shards[0];
      const xs = tf.slice(xt, [0, 0, 0, 0], [count, h, w, c]);
      const es = tf.slice(eps, [0, 0, 0, 0], [count, h, w, c]);
      const ts = tf.slice(t, [0], [count]);
      const { value, grads } = tf.variableGrads(
        () => shardLoss(this.model.predict(xs, ts), es, total),
        vars,
      );
      return { value, grads };
    });
    tf.dispose([t, eps, xt]);
    let results: ShardResult[];
    try {
      results = await Promise.all(remote);
    } catch (e) {
      tf.dispose([local.value, ...Object.values(local.grads)]);
      throw e;
    }
    const slot = new Map(pool.keys.map((k, i) => [k, i]));
    const { loss, grads } = tf.tidy(() => {
      const loss = tf.addN([
        local.value,
        ...results.map((r) => tf.scalar(r.loss)),
      ]) as tf.Scalar;
      const grads: Record<string, tf.Tensor> = {};
      for (const [name, g] of Object.entries(local.grads)) {
        if (g === null) continue;
        const key = keyOf.get(name)!;
        const i = slot.get(key)!;
        grads[key] = tf.addN([
          g,
          ...results.map((r) => tf.tensor(r.grads[i], g.shape, "float32")),
        ]);
      }
      return { loss, grads };
    });
    tf.dispose([local.value, ...Object.values(local.grads)]);
    return { loss, grads: new Map(Object.entries(grads)) };
  }

  /**
   * Copy out everything needed to resume: step, seed, weights, optimizer and EMA state.
   *
   * @returns The state; its tensors are copies the caller owns (free them with {@linkcode disposeTrainerState}).
   * @example
   * ```ts
   * import { disposeTrainerState, Trainer } from "./train.ts";
   * import { makeSchedule } from "./schedule.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.scalar(0));
   * const model = { params: new Map([["w", w]]), predict: (x: tf.Tensor4D) => tf.mul(w, x) as tf.Tensor4D };
   * const schedule = makeSchedule({ T: 10 });
   * const trainer = new Trainer(model, schedule, { seed: 7 });
   * const state = trainer.getState();
   * console.log(state.seed, state.optimizer.config.lr, state.ema?.config.decay); // 7 0.0002 0.9999
   * disposeTrainerState(state);
   * trainer.dispose(); w.dispose(); schedule.dispose();
   * ```
   */
  getState(): TrainerState {
    return {
      step: this.#step,
      seed: this.seed,
      maxGradNorm: this.maxGradNorm,
      params: new Map(
        [...this.model.params].map((
          [k, v],
        ) => [k, tf.clone(v)] as [string, tf.Tensor]),
      ),
      optimizer: this.optimizer.getState(),
      ema: this.ema === null ? null : this.ema.getState(),
    };
  }

  /**
   * Restore a state into this trainer: model weights, optimizer, EMA and step are copied in.
   *
   * Seed, clipping, optimizer and EMA settings must equal this trainer's;
   * {@linkcode Trainer.fromState} builds a trainer with them.
   *
   * @param state The state to restore; its tensors stay the caller's.
   * @returns Nothing.
   * @example
   * ```ts
   * import { disposeTrainerState, Trainer } from "./train.ts";
   * import { makeSchedule } from "./schedule.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.scalar(0));
   * const model = { params: new Map([["w", w]]), predict: (x: tf.Tensor4D) => tf.mul(w, x) as tf.Tensor4D };
   * const schedule = makeSchedule({ T: 10 });
   * const trainer = new Trainer(model, schedule);
   * const state = trainer.getState();
   * state.step = 42;
   * trainer.setState(state);
   * console.log(trainer.step); // 42
   * disposeTrainerState(state);
   * trainer.dispose(); w.dispose(); schedule.dispose();
   * ```
   */
  setState(state: TrainerState): void {
    const mismatch = (name: string, got: unknown, expected: unknown) =>
      new RangeError(
        `Cannot restore trainer state: ${name} differs (got ${got}, expected ${expected})`,
      );
    if (state.seed !== this.seed) {
      throw mismatch("seed", state.seed, this.seed);
    }
    if (state.maxGradNorm !== this.maxGradNorm) {
      throw mismatch("maxGradNorm", state.maxGradNorm, this.maxGradNorm);
    }
    if ((state.ema === null) !== (this.ema === null)) {
      throw mismatch(
        "EMA presence",
        state.ema === null ? "none" : "an EMA",
        this.ema === null ? "none" : "an EMA",
      );
    }
    if (!(Number.isInteger(state.step) && state.step >= 0)) {
      throw new RangeError(
        `Cannot restore trainer state: step must be a non-negative integer (got ${state.step})`,
      );
    }
    for (const [key, p] of this.model.params) {
      const s = state.params.get(key);
      if (
        s === undefined || s.shape.length !== p.shape.length ||
        s.shape.some((d, i) => d !== p.shape[i])
      ) {
        throw new TypeError(
          `Cannot restore trainer state: weight "${key}" is missing or misshapen (got ${
            s === undefined ? "none" : `[${s.shape}]`
          }, expected [${p.shape}])`,
        );
      }
    }
    // Settings first, so that a mismatch leaves everything untouched; the
    // parts then check their tensors before they write.
    const configs: [string, object, object][] = [
      ["optimizer", state.optimizer.config, this.optimizer.config],
    ];
    if (this.ema !== null) {
      configs.push(["EMA", state.ema!.config, this.ema.config]);
    }
    for (const [what, got, expected] of configs) {
      const bad = Object.entries(expected).find(([k, v]) =>
        (got as Record<string, unknown>)[k] !== v
      );
      if (bad !== undefined) {
        throw mismatch(
          `${what} ${bad[0]}`,
          (got as Record<string, unknown>)[bad[0]],
          bad[1],
        );
      }
    }
    this.optimizer.setState(state.optimizer);
    if (this.ema !== null) this.ema.setState(state.ema!);
    tf.tidy(() => {
      for (const [key, p] of this.model.params) {
        p.assign(tf.cast(state.params.get(key)!, "float32"));
      }
    });
    this.#step = state.step;
    this.#gate?.dispose();
    this.#gate = null;
  }

  /**
   * Free the optimizer's moments and the EMA weights, and stop the workers (the model and schedule stay the caller's).
   *
   * @returns Nothing.
   * @example
   * ```ts
   * import { Trainer } from "./train.ts";
   * import { makeSchedule } from "./schedule.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.scalar(0));
   * const model = { params: new Map([["w", w]]), predict: (x: tf.Tensor4D) => tf.mul(w, x) as tf.Tensor4D };
   * const schedule = makeSchedule({ T: 10 });
   * new Trainer(model, schedule).dispose();
   * w.dispose(); schedule.dispose();
   * ```
   */
  dispose(): void {
    this.#recorded?.step.dispose();
    this.#recorded = null;
    this.#gate?.dispose();
    this.#gate = null;
    this.#pool?.dispose();
    this.#pool = null;
    this.optimizer.dispose();
    this.ema?.dispose();
  }
}

/**
 * Free the tensors of a {@linkcode TrainerState}: weights, moments and EMA weights.
 *
 * @param state A state from {@linkcode Trainer.getState}.
 * @returns Nothing.
 * @example
 * ```ts
 * import { disposeTrainerState, Trainer } from "./train.ts";
 * import { makeSchedule } from "./schedule.ts";
 * import { initBackend, tf } from "./backend.ts";
 * await initBackend("cpu");
 * const w = tf.variable(tf.scalar(0));
 * const model = { params: new Map([["w", w]]), predict: (x: tf.Tensor4D) => tf.mul(w, x) as tf.Tensor4D };
 * const schedule = makeSchedule({ T: 10 });
 * const trainer = new Trainer(model, schedule);
 * const before = tf.memory().numTensors;
 * disposeTrainerState(trainer.getState());
 * console.log(tf.memory().numTensors === before); // true
 * trainer.dispose(); w.dispose(); schedule.dispose();
 * ```
 */
export function disposeTrainerState(state: TrainerState): void {
  disposeMap(state.params);
  disposeMap(state.optimizer.expAvg);
  disposeMap(state.optimizer.expAvgSq);
  if (state.ema !== null) disposeMap(state.ema.params);
}
