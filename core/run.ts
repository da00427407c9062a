/**
 * A training session: build a run or resume one from its checkpoint, then
 * loop over steps, writing metrics, checkpoints, a loss curve and sample
 * grids into one folder.
 *
 * The data and the sampler are the caller's: batches come from a
 * `batch(epoch, index)` function and sample grids from a `sample` callback,
 * so this module imports neither `data/` nor `samplers/`.
 *
 * | file                       | written                                          |
 * |----------------------------|--------------------------------------------------|
 * | `checkpoint.safetensors`   | every `checkpointEvery` steps and at the end     |
 * | `metrics.jsonl`            | one line per step: `{step, loss, gradNorm, imagesPerSec, lr, elapsedSec}` |
 * | `loss.png`                 | with each checkpoint                             |
 * | `samples/step_<N>.png`     | every `sampleEvery` steps (with `sample`)        |
 * | `samples.png`              | at the end (with `sample`)                       |
 *
 * Step s (0-based) trains on batch `s % batchesPerEpoch` of epoch
 * `floor(s / batchesPerEpoch)`, and the trainer draws t and eps from
 * (seed, s): a run stopped at a checkpoint and resumed takes exactly the
 * steps it would have taken straight through.
 *
 * The checkpoint's `training` metadata holds the {@linkcode RunSetup} next
 * to the trainer's state, so a resume needs nothing but the folder:
 *
 * ```
 * { seed, maxGradNorm, optimizer: { config, step }, ema: { config, optimizationStep } | null,
 *   schedule: { kind, T }, data: {...}, run: { steps, checkpointEvery, sampleEvery,
 *   timeLimitSec, elapsedSec } }
 * ```
 *
 * @module
 */
import { join } from "node:path";
import { tf } from "./backend.ts";
import { makeSchedule, type Schedule, type ScheduleKind } from "./schedule.ts";
import { UNet, type UNetConfig } from "./unet.ts";
import { Trainer, type TrainerState, type TrainStepResult } from "./train.ts";
import { ADAMW_DEFAULTS, type AdamWConfig } from "./optim.ts";
import { EMA_DEFAULTS, type EmaConfig } from "./ema.ts";
import {
  type Checkpoint,
  loadCheckpoint,
  saveCheckpoint,
} from "./checkpoint.ts";
import { imagesToGrid, plotCurve, writePng } from "./image.ts";
import { writeFileAtomic } from "./atomic.ts";

/** The file names a run writes in its folder. */
export const RUN_FILES: Readonly<{
  checkpoint: string;
  metrics: string;
  lossCurve: string;
  samples: string;
  samplesDir: string;
}> = Object.freeze({
  checkpoint: "checkpoint.safetensors",
  metrics: "metrics.jsonl",
  lossCurve: "loss.png",
  samples: "samples.png",
  samplesDir: "samples",
});

/** Everything that defines a training run; recorded in its checkpoint. */
export interface RunSetup {
  /** The UNet's configuration. */
  model: UNetConfig;
  /** The noise schedule. */
  schedule: { kind: ScheduleKind; T: number };
  /** Seed of the weights' initialisation and of the trainer's draws. */
  seed: number;
  /** Clip the gradients' global norm at this. */
  maxGradNorm: number;
  /** AdamW hyper-parameters. */
  optimizer: AdamWConfig;
  /** EMA settings, or null for no EMA. */
  ema: EmaConfig | null;
  /** The caller's description of its batches (dataset, batch size, order seed): recorded, never read here. */
  data: Record<string, unknown>;
  /** The total number of steps the run aims for. */
  steps: number;
  /** Write a checkpoint every this many steps; 0 for only at the end. */
  checkpointEvery: number;
  /** Write a sample grid every this many steps (with a `sample` callback); 0 for only at the end. */
  sampleEvery: number;
  /** Stop each session after this many seconds of training; 0 for no limit. */
  timeLimitSec: number;
}

/** What {@linkcode TrainingRun.create} takes: a {@linkcode RunSetup} whose settings have defaults. */
export type RunSetupInput =
  & Pick<RunSetup, "steps">
  & Partial<Omit<RunSetup, "model" | "optimizer" | "ema" | "steps">>
  & {
    /** UNet settings; `inChannels` 1, `base` 64, `timeDim` 4 base by default. */
    model?: Partial<UNetConfig>;
    /** AdamW settings; {@linkcode ADAMW_DEFAULTS} fill the rest. */
    optimizer?: Partial<AdamWConfig>;
    /** EMA settings ({@linkcode EMA_DEFAULTS} fill the rest), or null for none. */
    ema?: Partial<EmaConfig> | null;
  };

/** Options of {@linkcode TrainingRun.create}. */
export interface CreateRunOptions {
  /** Replace a checkpoint already in the folder; false by default (refused). */
  overwrite?: boolean;
  /** Gradient threads per step (see `TrainerOptions.workers`); 1 by default. Not recorded: results agree to float rounding whatever the count. */
  workers?: number | "auto";
}

/** Settings a resumed session may change; the rest come from the checkpoint. */
export type RunOverrides =
  & Partial<
    Pick<RunSetup, "steps" | "checkpointEvery" | "sampleEvery" | "timeLimitSec">
  >
  & {
    /** Gradient threads per step (see `TrainerOptions.workers`); 1 by default. */
    workers?: number | "auto";
  };

/** One step's numbers, as written to `metrics.jsonl`. */
export interface StepMetrics {
  /** Steps taken, this one included. */
  step: number;
  /** The batch's noise-prediction MSE. */
  loss: number;
  /** The gradients' global norm before clipping. */
  gradNorm: number;
  /** Images of this step per second of its wall-clock time (batch making included). */
  imagesPerSec: number;
  /** The learning rate of this step. */
  lr: number;
  /** Seconds of training so far, over every session of the run. */
  elapsedSec: number;
}

/** What a `sample` callback is given. */
export interface SampleRequest {
  /** The model to sample: the EMA weights when the run has them, else the live ones. */
  model: { predict(x: tf.Tensor4D, t: tf.Tensor1D): tf.Tensor4D };
  /** The run's noise schedule. */
  schedule: Schedule;
  /** Steps taken. */
  step: number;
  /** Whether this is the end-of-run grid. */
  final: boolean;
  /** The run's abort signal, to stop sampling early. */
  signal?: AbortSignal;
}

/** A file the run wrote, reported through `onFile`. */
export interface RunFile {
  /** What it is. */
  kind: "checkpoint" | "lossCurve" | "samples";
  /** Its path. */
  path: string;
  /** Steps taken when it was written. */
  step: number;
}

/** Options of {@linkcode TrainingRun.train}. */
export interface TrainOptions {
  /** Batches in one epoch. */
  batchesPerEpoch: number;
  /** Batch `index` of epoch `epoch`: NHWC float32 in [-1, 1]; the run disposes it. */
  batch(epoch: number, index: number): tf.Tensor4D | Promise<tf.Tensor4D>;
  /** Make images from the model (NHWC in [-1, 1]; the run disposes them) for the sample grids; none without it. */
  sample?: (request: SampleRequest) => Promise<tf.Tensor4D>;
  /** Stops the run after the current step; the checkpoint is then written. */
  signal?: AbortSignal;
  /** Called after each step. */
  onStep?: (metrics: StepMetrics) => void;
  /** Called after each file written. */
  onFile?: (file: RunFile) => void;
  /**
   * Start each step before the previous one's loss is read back, where the
   * trainer queues its work ahead (WebGPU; see `Trainer.trainStep`): the
   * same results, less waiting. Default true; steps before a checkpoint, a
   * grid or the end are awaited in any case.
   */
  pipeline?: boolean;
}

/** How a session of {@linkcode TrainingRun.train} ended. */
export interface TrainResult {
  /** Steps taken, over every session. */
  step: number;
  /** "steps": the target was reached; "time": the time limit; "signal": the abort signal. */
  stopped: "steps" | "time" | "signal";
  /** Seconds this session trained. */
  sessionSec: number;
  /** The checkpoint's path. */
  checkpoint: string;
  /** The metrics file's path. */
  metrics: string;
  /** The loss curve's path. */
  lossCurve: string;
  /** The final sample grid's path, or null when none was made. */
  samples: string | null;
}

interface RunRecord {
  steps: number;
  checkpointEvery: number;
  sampleEvery: number;
  timeLimitSec: number;
  elapsedSec: number;
}

function bad(what: string, name: string, got: unknown, expected: string) {
  return new RangeError(
    `Cannot ${what}: ${name} out of range (got ${got}, expected ${expected})`,
  );
}

function checkCount(what: string, name: string, v: number): void {
  if (!(Number.isSafeInteger(v) && v >= 0)) {
    throw bad(what, name, v, "an integer >= 0");
  }
}

function checkPlan(what: string, p: RunOverrides): void {
  if (p.steps !== undefined) checkCount(what, "steps", p.steps);
  if (p.checkpointEvery !== undefined) {
    checkCount(what, "checkpointEvery", p.checkpointEvery);
  }
  if (p.sampleEvery !== undefined) {
    checkCount(what, "sampleEvery", p.sampleEvery);
  }
  if (
    p.timeLimitSec !== undefined &&
    !(p.timeLimitSec >= 0 && Number.isFinite(p.timeLimitSec))
  ) {
    throw bad(what, "timeLimitSec", p.timeLimitSec, "a number >= 0");
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** Bin a long series into at most `bins` means, so the curve shows the trend, not the noise. */
function binMeans(values: readonly number[], bins: number): number[] {
  if (values.length <= bins) return [...values];
  const out: number[] = [];
  for (let b = 0; b < bins; b++) {
    const lo = Math.floor(b * values.length / bins);
    const hi = Math.floor((b + 1) * values.length / bins);
    let sum = 0;
    for (let i = lo; i < hi; i++) sum += values[i];
    out.push(sum / (hi - lo));
  }
  return out;
}

function stepName(step: number): string {
  return `step_${String(step).padStart(6, "0")}.png`;
}

/** The trainer state a checkpoint holds, or a one-line TypeError saying what is missing. */
function stateFromCheckpoint(
  ckpt: Checkpoint,
  file: string,
): { state: TrainerState; setup: RunSetup; elapsedSec: number } {
  const fail = (why: string) =>
    new TypeError(`Cannot resume training from "${file}": ${why}`);
  const t = ckpt.training as Record<string, unknown> | null;
  if (t === null) {
    throw fail(
      "the checkpoint has no training state (got weights only, expected a checkpoint written by a training run)",
    );
  }
  const obj = (v: unknown): v is Record<string, unknown> =>
    v !== null && typeof v === "object" && !Array.isArray(v);
  const optimizer = t.optimizer;
  const schedule = t.schedule;
  const run = t.run;
  const missing = [
    typeof t.seed !== "number" && "seed",
    !obj(optimizer) && "optimizer",
    !(t.ema === null || obj(t.ema)) && "ema",
    !obj(schedule) && "schedule",
    !obj(t.data) && "data",
    !obj(run) && "run",
  ].filter((x): x is string => x !== false);
  if (missing.length > 0) {
    throw fail(
      `the training state lacks ${missing.join(", ")} (got keys ${
        Object.keys(t).join(", ") || "none"
      }, expected a checkpoint written by a training run)`,
    );
  }
  if (ckpt.optimizer === null) {
    throw fail(
      `the checkpoint has no optimizer moments (got none, expected keys "optim.exp_avg.*")`,
    );
  }
  const ema = t.ema as Record<string, unknown> | null;
  if (ema !== null && ckpt.ema === null) {
    throw fail(
      `the training state has an EMA but the file has no EMA weights (got none, expected keys "ema.*")`,
    );
  }
  const opt = optimizer as { config: AdamWConfig; step: number };
  const r = run as unknown as RunRecord;
  const sched = schedule as { kind: ScheduleKind; T: number };
  const maxGradNorm = t.maxGradNorm === null || t.maxGradNorm === undefined
    ? Infinity
    : t.maxGradNorm as number;
  const setup: RunSetup = {
    model: ckpt.config,
    schedule: { kind: sched.kind, T: sched.T },
    seed: t.seed as number,
    maxGradNorm,
    optimizer: { ...ADAMW_DEFAULTS, ...opt.config },
    ema: ema === null ? null : { ...EMA_DEFAULTS, ...ema.config as EmaConfig },
    data: t.data as Record<string, unknown>,
    steps: r.steps,
    checkpointEvery: r.checkpointEvery ?? 0,
    sampleEvery: r.sampleEvery ?? 0,
    timeLimitSec: r.timeLimitSec ?? 0,
  };
  const state: TrainerState = {
    step: ckpt.step,
    seed: setup.seed,
    maxGradNorm,
    params: ckpt.params,
    optimizer: {
      config: setup.optimizer,
      step: opt.step,
      expAvg: ckpt.optimizer.expAvg,
      expAvgSq: ckpt.optimizer.expAvgSq,
    },
    ema: ema === null ? null : {
      config: setup.ema!,
      optimizationStep: ema.optimizationStep as number,
      params: ckpt.ema!,
    },
  };
  return { state, setup, elapsedSec: r.elapsedSec ?? 0 };
}

/**
 * One training run in one folder: the UNet, its trainer and the files they write.
 *
 * Build with {@linkcode TrainingRun.create} or {@linkcode TrainingRun.resume},
 * call {@linkcode TrainingRun.train} with a batch function, then
 * {@linkcode TrainingRun.dispose}.
 *
 * @example
 * ```ts
 * import { initBackend, tf, TrainingRun } from "../mod.ts";
 * await initBackend("cpu");
 * const dir = await Deno.makeTempDir();
 * const run = await TrainingRun.create(dir, {
 *   model: { base: 8 }, steps: 2, data: { name: "noise" },
 * });
 * const result = await run.train({
 *   batchesPerEpoch: 10,
 *   batch: (epoch, index) =>
 *     tf.randomUniform([2, 16, 16, 1], -1, 1, "float32", epoch * 10 + index) as tf.Tensor4D,
 * });
 * console.log(result.step, result.stopped); // 2 steps
 * run.dispose();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export class TrainingRun {
  /** The folder the run writes into. */
  readonly outDir: string;
  /** The run's settings, as recorded in its checkpoint. */
  readonly setup: RunSetup;
  /** The model being trained. */
  readonly unet: UNet;
  /** The noise schedule. */
  readonly schedule: Schedule;
  /** The trainer (optimizer, EMA, step). */
  readonly trainer: Trainer;
  #elapsedSec: number;
  #savedStep: number | null;
  #losses: number[];

  private constructor(
    outDir: string,
    setup: RunSetup,
    unet: UNet,
    schedule: Schedule,
    trainer: Trainer,
    elapsedSec: number,
    losses: number[],
    resumed: boolean,
  ) {
    this.outDir = outDir;
    this.setup = setup;
    this.unet = unet;
    this.schedule = schedule;
    this.trainer = trainer;
    this.#elapsedSec = elapsedSec;
    this.#savedStep = resumed ? trainer.step : null;
    this.#losses = losses;
  }

  /**
   * Start a new run in `outDir` (created when missing): a freshly initialised UNet at step 0.
   *
   * @param outDir The folder for the checkpoint, metrics, loss curve and samples.
   * @param setup The run's settings; `steps` is required, the rest have defaults.
   * @param options `overwrite` to replace a checkpoint already there.
   * @returns The run; `dispose()` it when done.
   * @throws {Error} When the folder already holds a checkpoint and `overwrite` is not set.
   * @throws {RangeError} On a setting out of range.
   * @example
   * ```ts
   * import { initBackend, TrainingRun } from "../mod.ts";
   * await initBackend("cpu");
   * const dir = await Deno.makeTempDir();
   * const run = await TrainingRun.create(dir, { model: { base: 8 }, steps: 100 });
   * console.log(run.step, run.setup.optimizer.lr); // 0 0.0002
   * run.dispose();
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  static async create(
    outDir: string,
    setup: RunSetupInput,
    options: CreateRunOptions = {},
  ): Promise<TrainingRun> {
    const what = "start training run";
    checkPlan(what, setup);
    const full: RunSetup = {
      model: { inChannels: 1, base: 64, timeDim: 0, ...setup.model },
      schedule: { kind: "linear", T: 1000, ...setup.schedule },
      seed: setup.seed ?? 0,
      maxGradNorm: setup.maxGradNorm ?? 1.0,
      optimizer: { ...ADAMW_DEFAULTS, ...setup.optimizer },
      ema: setup.ema === null ? null : { ...EMA_DEFAULTS, ...setup.ema },
      data: { ...setup.data },
      steps: setup.steps,
      checkpointEvery: setup.checkpointEvery ?? 0,
      sampleEvery: setup.sampleEvery ?? 0,
      timeLimitSec: setup.timeLimitSec ?? 0,
    };
    if (full.model.timeDim === 0) full.model.timeDim = 4 * full.model.base;
    await Deno.mkdir(outDir, { recursive: true });
    const ckptPath = join(outDir, RUN_FILES.checkpoint);
    if (!options.overwrite && await exists(ckptPath)) {
      throw new Error(
        `Cannot ${what}: "${ckptPath}" already exists (got an existing checkpoint, expected an empty folder, a resume, or overwrite)`,
      );
    }
    const schedule = makeSchedule(full.schedule);
    let unet: UNet | null = null;
    try {
      unet = new UNet({ ...full.model, seed: full.seed });
      full.model = { ...unet.config };
      const trainer = new Trainer(unet, schedule, {
        seed: full.seed,
        maxGradNorm: full.maxGradNorm,
        optimizer: full.optimizer,
        ema: full.ema === null ? false : full.ema,
        workers: options.workers,
      });
      await writeFileAtomic(
        join(outDir, RUN_FILES.metrics),
        new Uint8Array(),
      );
      return new TrainingRun(
        outDir,
        full,
        unet,
        schedule,
        trainer,
        0,
        [],
        false,
      );
    } catch (e) {
      unet?.dispose();
      schedule.dispose();
      throw e;
    }
  }

  /**
   * Resume the run whose checkpoint is in `outDir`: weights, optimizer, EMA, step and settings.
   *
   * Lines of `metrics.jsonl` past the checkpoint's step (written after it,
   * before a crash) are dropped, so the file again matches the weights.
   *
   * @param outDir The run's folder.
   * @param overrides New `steps` (a total), `checkpointEvery`, `sampleEvery` or `timeLimitSec`.
   * @returns The run at the checkpoint's step; `dispose()` it when done.
   * @throws {Deno.errors.NotFound} When the folder has no checkpoint.
   * @throws {TypeError} When the checkpoint is malformed or has no training state.
   * @example
   * ```ts
   * import { initBackend, tf, TrainingRun } from "../mod.ts";
   * await initBackend("cpu");
   * const dir = await Deno.makeTempDir();
   * const first = await TrainingRun.create(dir, { model: { base: 8 }, steps: 1 });
   * await first.train({
   *   batchesPerEpoch: 1,
   *   batch: () => tf.zeros([2, 8, 8, 1]) as tf.Tensor4D,
   * });
   * first.dispose();
   * const run = await TrainingRun.resume(dir, { steps: 5 });
   * console.log(run.step, run.setup.steps); // 1 5
   * run.dispose();
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  static async resume(
    outDir: string,
    overrides: RunOverrides = {},
  ): Promise<TrainingRun> {
    const { workers, ...plan } = overrides;
    checkPlan("resume training run", plan);
    const file = join(outDir, RUN_FILES.checkpoint);
    const ckpt = await loadCheckpoint(file);
    let schedule: Schedule | null = null;
    let unet: UNet | null = null;
    try {
      const { state, setup, elapsedSec } = stateFromCheckpoint(ckpt, file);
      for (const [k, v] of Object.entries(plan)) {
        if (v !== undefined) {
          (setup as unknown as Record<string, unknown>)[k] = v;
        }
      }
      checkPlan(`resume training from "${file}"`, setup);
      schedule = makeSchedule(setup.schedule);
      unet = new UNet(setup.model);
      const trainer = Trainer.fromState(unet, schedule, state, { workers });
      const losses = await trimMetrics(
        join(outDir, RUN_FILES.metrics),
        state.step,
      );
      return new TrainingRun(
        outDir,
        setup,
        unet,
        schedule,
        trainer,
        elapsedSec,
        losses,
        true,
      );
    } catch (e) {
      unet?.dispose();
      schedule?.dispose();
      throw e;
    } finally {
      ckpt.dispose();
    }
  }

  /** Steps taken. */
  get step(): number {
    return this.trainer.step;
  }

  /** The checkpoint's path in the run's folder. */
  get checkpointPath(): string {
    return join(this.outDir, RUN_FILES.checkpoint);
  }

  /** The model the sample grids use: EMA weights when there are, else live ones. */
  get sampleModel(): SampleRequest["model"] {
    const ema = this.trainer.ema;
    if (ema === null) return this.unet;
    return { predict: (x, t) => this.unet.apply(ema.params, x, t) };
  }

  /**
   * Write the checkpoint now: weights, EMA, optimizer moments, step and the run's settings.
   *
   * @returns The checkpoint's path.
   * @example
   * ```ts
   * import { initBackend, loadCheckpoint, TrainingRun } from "../mod.ts";
   * await initBackend("cpu");
   * const dir = await Deno.makeTempDir();
   * const run = await TrainingRun.create(dir, { model: { base: 8 }, steps: 10 });
   * const ckpt = await loadCheckpoint(await run.saveCheckpoint());
   * console.log(ckpt.step, ckpt.ema !== null); // 0 true
   * ckpt.dispose();
   * run.dispose();
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  async saveCheckpoint(): Promise<string> {
    const s = this.trainer.getState();
    try {
      const r: RunRecord = {
        steps: this.setup.steps,
        checkpointEvery: this.setup.checkpointEvery,
        sampleEvery: this.setup.sampleEvery,
        timeLimitSec: this.setup.timeLimitSec,
        elapsedSec: this.#elapsedSec,
      };
      await saveCheckpoint(this.checkpointPath, {
        config: this.unet.config,
        params: s.params,
        ema: s.ema?.params,
        optimizer: s.optimizer,
        step: s.step,
        training: {
          seed: s.seed,
          maxGradNorm: Number.isFinite(s.maxGradNorm) ? s.maxGradNorm : null,
          optimizer: { config: s.optimizer.config, step: s.optimizer.step },
          ema: s.ema &&
            { config: s.ema.config, optimizationStep: s.ema.optimizationStep },
          schedule: this.setup.schedule,
          data: this.setup.data,
          run: r,
        },
      });
    } finally {
      tf.dispose([
        ...s.params.values(),
        ...s.optimizer.expAvg.values(),
        ...s.optimizer.expAvgSq.values(),
        ...(s.ema?.params.values() ?? []),
      ]);
    }
    this.#savedStep = s.step;
    return this.checkpointPath;
  }

  /**
   * Train until `setup.steps`, the time limit or the signal; checkpoint, loss curve and grids along the way.
   *
   * After the loop the checkpoint and loss curve are written, then (with
   * `sample`, unless the signal stopped the run) the final grid
   * `samples.png`. A non-finite loss stops the run without writing: the
   * RangeError names the step and the last checkpoint.
   *
   * @param options The batch function, sampling callback, abort signal and listeners.
   * @returns How the session ended and the files' paths.
   * @throws {RangeError} On a non-finite loss, naming the step and the last checkpoint.
   * @example
   * ```ts
   * import { initBackend, tf, TrainingRun } from "../mod.ts";
   * await initBackend("cpu");
   * const dir = await Deno.makeTempDir();
   * const run = await TrainingRun.create(dir, { model: { base: 8 }, steps: 3 });
   * const losses: number[] = [];
   * await run.train({
   *   batchesPerEpoch: 2,
   *   batch: (epoch, index) => tf.fill([2, 8, 8, 1], index - 0.5) as tf.Tensor4D,
   *   onStep: (m) => losses.push(m.loss),
   * });
   * console.log(losses.length); // 3
   * run.dispose();
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  async train(options: TrainOptions): Promise<TrainResult> {
    const { batchesPerEpoch, batch, sample, signal, onStep, onFile } = options;
    const pipelined = (options.pipeline ?? true) &&
      tf.getBackend() === "webgpu";
    if (!(Number.isSafeInteger(batchesPerEpoch) && batchesPerEpoch >= 1)) {
      throw bad("train", "batchesPerEpoch", batchesPerEpoch, "an integer >= 1");
    }
    const { steps, checkpointEvery, sampleEvery, timeLimitSec } = this.setup;
    const metricsPath = join(this.outDir, RUN_FILES.metrics);
    const lossPath = join(this.outDir, RUN_FILES.lossCurve);
    const start = performance.now();
    const sessionSec = () => (performance.now() - start) / 1000;
    const elapsedAtStart = this.#elapsedSec;
    const metricsFile = await Deno.open(metricsPath, {
      append: true,
      create: true,
    });
    const encoder = new TextEncoder();
    let stopped: TrainResult["stopped"] = "steps";
    const writeGrid = async (final: boolean): Promise<string | null> => {
      if (sample === undefined) return null;
      const images = await sample({
        model: this.sampleModel,
        schedule: this.schedule,
        step: this.step,
        final,
        signal,
      });
      try {
        let path = join(this.outDir, RUN_FILES.samples);
        if (!final) {
          const dir = join(this.outDir, RUN_FILES.samplesDir);
          await Deno.mkdir(dir, { recursive: true });
          path = join(dir, stepName(this.step));
        }
        await writePng(path, await imagesToGrid(images, { nrow: 8 }));
        onFile?.({ kind: "samples", path, step: this.step });
        return path;
      } finally {
        images.dispose();
      }
    };
    const checkpoint = async (): Promise<void> => {
      this.#elapsedSec = elapsedAtStart + sessionSec();
      await this.saveCheckpoint();
      onFile?.({
        kind: "checkpoint",
        path: this.checkpointPath,
        step: this.step,
      });
      const curve = plotCurve(binMeans(this.#losses, 480));
      await writePng(lossPath, curve);
      onFile?.({ kind: "lossCurve", path: lossPath, step: this.step });
    };
    // On WebGPU the next step is started before this one's loss is read
    // back (see Trainer.trainStep), except where a checkpoint, a grid or
    // the end must see this step's weights.
    interface Started {
      s: number;
      x0: tf.Tensor4D;
      result: Promise<TrainStepResult>;
    }
    const begin = async (s: number): Promise<Started> => {
      const x0 = await batch(
        Math.floor(s / batchesPerEpoch),
        s % batchesPerEpoch,
      );
      const result = this.trainer.trainStep(x0);
      result.catch(() => {});
      return { s, x0, result };
    };
    let ahead: Started | null = null;
    let last = performance.now();
    try {
      while (ahead !== null || this.step < steps) {
        let current: Started;
        if (ahead !== null) {
          current = ahead;
          ahead = null;
        } else {
          if (signal?.aborted) {
            stopped = "signal";
            break;
          }
          if (timeLimitSec > 0 && sessionSec() >= timeLimitSec) {
            stopped = "time";
            break;
          }
          last = performance.now();
          current = await begin(this.step);
        }
        const done = current.s + 1;
        if (
          pipelined && done < steps &&
          !(checkpointEvery > 0 && done % checkpointEvery === 0) &&
          !(sampleEvery > 0 && done % sampleEvery === 0) &&
          !signal?.aborted &&
          !(timeLimitSec > 0 && sessionSec() >= timeLimitSec)
        ) {
          ahead = await begin(done);
        }
        const n = current.x0.shape[0];
        let result;
        try {
          result = await current.result;
        } catch (e) {
          if (e instanceof RangeError) {
            const why = e.message.replace(
              /^Cannot take training step \d+: /,
              "",
            );
            const saved = this.#savedStep === null
              ? "no checkpoint was written"
              : `the last checkpoint is "${this.checkpointPath}" (step ${this.#savedStep})`;
            throw new RangeError(
              `Cannot continue training at step ${done}: ${why}; ${saved}`,
            );
          }
          throw e;
        } finally {
          current.x0.dispose();
        }
        const now = performance.now();
        const dt = (now - last) / 1000;
        last = now;
        const metrics: StepMetrics = {
          step: result.step,
          loss: result.loss,
          gradNorm: result.gradNorm,
          imagesPerSec: n / dt,
          lr: this.trainer.optimizer.config.lr,
          elapsedSec: elapsedAtStart + sessionSec(),
        };
        this.#losses.push(result.loss);
        await metricsFile.write(encoder.encode(JSON.stringify(metrics) + "\n"));
        onStep?.(metrics);
        if (checkpointEvery > 0 && result.step % checkpointEvery === 0) {
          await checkpoint();
        }
        if (
          sampleEvery > 0 && result.step % sampleEvery === 0 &&
          result.step < steps && !signal?.aborted
        ) {
          await writeGrid(false);
        }
      }
    } finally {
      metricsFile.close();
      if (ahead !== null) {
        // A step started behind a failed one: it rejects too.
        await ahead.result.catch(() => {});
        ahead.x0.dispose();
      }
    }
    if (this.#savedStep !== this.step) {
      await checkpoint();
    } else {
      this.#elapsedSec = elapsedAtStart + sessionSec();
    }
    let samples: string | null = null;
    if (stopped !== "signal") {
      try {
        samples = await writeGrid(true);
      } catch (e) {
        if (!signal?.aborted) throw e;
        stopped = "signal";
      }
    }
    return {
      step: this.step,
      stopped,
      sessionSec: sessionSec(),
      checkpoint: this.checkpointPath,
      metrics: metricsPath,
      lossCurve: lossPath,
      samples,
    };
  }

  /**
   * Free the UNet, the trainer's state and the schedule.
   *
   * @returns Nothing.
   * @example
   * ```ts
   * import { initBackend, tf, TrainingRun } from "../mod.ts";
   * await initBackend("cpu");
   * const dir = await Deno.makeTempDir();
   * const before = tf.memory().numTensors;
   * (await TrainingRun.create(dir, { model: { base: 8 }, steps: 1 })).dispose();
   * console.log(tf.memory().numTensors === before); // true
   * await Deno.remove(dir, { recursive: true });
   * ```
   */
  dispose(): void {
    this.trainer.dispose();
    this.unet.dispose();
    this.schedule.dispose();
  }
}

/** Keep the metrics lines up to `step` (rewriting the file when some go); return their losses. */
async function trimMetrics(path: string, step: number): Promise<number[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      await writeFileAtomic(path, new Uint8Array());
      return [];
    }
    throw e;
  }
  const kept: string[] = [];
  const losses: number[] = [];
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    let m: Partial<StepMetrics>;
    try {
      m = JSON.parse(line);
    } catch {
      continue;
    }
    if (typeof m.step !== "number" || m.step > step) continue;
    kept.push(line);
    losses.push(typeof m.loss === "number" ? m.loss : NaN);
  }
  const body = kept.map((l) => l + "\n").join("");
  if (body !== text) {
    await writeFileAtomic(path, new TextEncoder().encode(body));
  }
  return losses;
}

/** What {@linkcode loadTrainedModel} found. */
export interface TrainedModel {
  /** The UNet with the chosen weights; the caller disposes it. */
  unet: UNet;
  /** The schedule it was trained with (linear, T = 1000 when the file does not say); the caller disposes it. */
  schedule: Schedule;
  /** Which weights were loaded. */
  weights: "ema" | "live";
  /** Training steps the checkpoint had taken. */
  step: number;
  /** The image size it was trained at (32 when the file does not say). */
  imageSize: number;
}

/**
 * Load a checkpoint for sampling: the UNet with EMA or live weights, and the schedule it was trained with.
 *
 * @param path The checkpoint file (a `.safetensors` from training or a plain PyTorch state_dict).
 * @param options `weights`: "ema" or "live"; by default EMA when the file has them.
 * @returns The model, schedule, weights used, step and image size.
 * @throws {TypeError} When the file is malformed or lacks the weights asked for.
 * @example
 * ```ts
 * import { initBackend, loadTrainedModel, saveCheckpoint, UNet } from "../mod.ts";
 * await initBackend("cpu");
 * const dir = await Deno.makeTempDir();
 * const unet = new UNet({ base: 8 });
 * await saveCheckpoint(`${dir}/c.safetensors`, { config: unet.config, params: unet.params });
 * const got = await loadTrainedModel(`${dir}/c.safetensors`);
 * console.log(got.weights, got.schedule.T, got.imageSize); // live 1000 32
 * got.unet.dispose(); got.schedule.dispose(); unet.dispose();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function loadTrainedModel(
  path: string,
  options: { weights?: "ema" | "live" } = {},
): Promise<TrainedModel> {
  const { weights } = options;
  const ckpt = await loadCheckpoint(path);
  try {
    const chosen = weights ?? (ckpt.ema !== null ? "ema" : "live");
    const params = chosen === "ema" ? ckpt.ema : ckpt.params;
    if (params === null) {
      throw new TypeError(
        `Cannot load "${path}" for sampling: the file has no EMA weights (got only live weights, expected keys "ema.*"; use the live weights)`,
      );
    }
    const t = ckpt.training ?? {};
    const sched = (t.schedule ?? {}) as { kind?: ScheduleKind; T?: number };
    const data = (t.data ?? {}) as { imageSize?: unknown };
    const imageSize = typeof data.imageSize === "number" ? data.imageSize : 32;
    const schedule = makeSchedule({
      kind: sched.kind ?? "linear",
      T: sched.T ?? 1000,
    });
    const copy = new Map([...params].map(([k, v]) => [k, tf.clone(v)]));
    let unet: UNet;
    try {
      unet = UNet.fromParams(ckpt.config, copy);
    } catch (e) {
      tf.dispose([...copy.values()]);
      schedule.dispose();
      throw e;
    }
    return { unet, schedule, weights: chosen, step: ckpt.step, imageSize };
  } finally {
    ckpt.dispose();
  }
}
