/**
 * The ddpm command line: `train`, `sample`, `download`, `samplers`, `info`.
 *
 * Thin by design: each command parses its options, calls the library
 * (`mod.ts`) and reports. Progress, warnings and errors go to stderr,
 * produced file paths to stdout. `main(args)` returns the exit code (0 ok,
 * 1 failure, 2 usage error, 130 interrupted, 143 stopped by SIGTERM); only
 * the `import.meta.main` block exits.
 *
 * @example
 * ```ts ignore
 * import { main } from "./cli.ts";
 * const code = await main(["sample", "--checkpoint", "out/checkpoint.safetensors", "--steps", "20"]);
 * ```
 *
 * @module
 */
import { parseArgs } from "node:util";
import { dirname, join } from "node:path";
import process from "node:process";
import cliProgress from "cli-progress";
import {
  type BackendInfo,
  type BackendName,
  COMMON_OPTIONS,
  type DatasetName,
  DigitClassifier,
  type DownloadProgress,
  evaluateSamples,
  type Evaluation,
  formatProgress,
  getSampler,
  holdoutSplit,
  ImageBatcher,
  imagesToGrid,
  initBackend,
  listSamplers,
  loadDataset,
  type LoadedDataset,
  loadTrainedModel,
  type OptionSpec,
  type OptionValues,
  parseOptionValue,
  replayOnWebGpu,
  type ResizeMode,
  RUN_FILES,
  type RunSetup,
  type RunSetupInput,
  type SamplerPlugin,
  setWasmThreads,
  spreadImages,
  type StepMetrics,
  tf,
  TrainingRun,
  validateSamplerOptions,
  wasmKernelsReady,
  wasmThreads,
  writeFileAtomic,
  writeNpy,
  writePng,
} from "./mod.ts";

// ------------------------------------------------------------------ help

const USAGE = `ddpm: train denoising diffusion models and sample them

USAGE
  deno run -A cli.ts <command> [options]
  deno task train [options]        deno task sample [options]

COMMANDS
  train      train a UNet on MNIST, Fashion-MNIST or the bundled mnist-lite
  sample     sample a checkpoint with any registered sampler into a PNG grid or .npy
  eval       score a checkpoint's samples: Fréchet distance to real digits, with its floor
  download   download and verify a dataset into the cache
  samplers   list the registered samplers and their options
  info       show Deno, tfjs and backend versions and the adapter

OPTIONS
  -h, --help  show this help; <command> --help shows the command's options

Exit codes: 0 ok, 1 failure, 2 usage error, 130 interrupted (Ctrl-C), 143
stopped by SIGTERM.
Set DDPM_DEBUG=1 to print stack traces of unexpected errors.
`;

const TRAIN_HELP =
  `ddpm train: train a UNet, writing checkpoints, metrics, a loss curve and sample grids

USAGE
  deno run -A cli.ts train [options]

With no options the configuration suits the backend obtained: the reference's
(base 64, batch 128, 30 epochs of MNIST, lr 2e-4, EMA 0.9999) on a hardware
GPU; a small one on a CPU (base 16, batch 32, lr 2e-3, EMA with warm-up,
mnist-lite, 12-minute sessions). Flags override either. It says which on stderr.

Files in --out: checkpoint.safetensors (live and EMA weights, optimizer, step,
settings), metrics.jsonl (one line per step), loss.png, samples.png (at the
end) and samples/step_N.png (every --sample-every steps).

Ctrl-C (or SIGTERM) finishes the current step, writes the checkpoint and exits
130 (143);
--resume continues from it with the recorded settings (no other flags needed).

OPTIONS
  --dataset NAME          mnist, fashion-mnist or mnist-lite (10,000 digits bundled, no network)
  --data-dir DIR          read IDX files (plain or .gz) from DIR instead of downloading
  --cache-dir DIR         download cache (default $XDG_CACHE_HOME/ddpm or ~/.cache/ddpm)
  --mirror URL            download from URL instead of the built-in mirrors (repeatable)
  --no-fallback           fail instead of training on mnist-lite when MNIST cannot be downloaded
  --steps N               train until N steps in total (also on --resume)
  --epochs N              train until N epochs in total (N x batches per epoch steps)
  --time-limit MIN        stop each session after MIN minutes of training (0: none)
  --workers N|auto        gradient threads per step on wasm/cpu (default auto: one per core)
  --batch-size N          images per step
  --lr X                  AdamW learning rate
  --base N                UNet width (channels of the first level)
  --schedule KIND         linear (default) or cosine noise schedule
  --timesteps T           diffusion steps T of the schedule (default 1000)
  --ema-decay D           EMA decay (the cap, with --ema-warmup); 0.9999 by default
  --ema-warmup            grow the EMA decay as 1 - (1 + k)^-3/4 up to the cap (--no-ema-warmup: constant)
  --no-ema                train without an EMA
  --resize MODE           bilinear (as the reference, 28 -> 32) or pad
  --seed N                seed of the weights, the noise draws and the data order (default 0)
  --backend NAME          auto (default), webgpu, wasm or cpu
  --out DIR               output folder (default out)
  --resume                continue the run in --out from its checkpoint
  --force                 start a new run even if --out holds a checkpoint (it is replaced)
  --checkpoint-every N    also write the checkpoint every N steps (0: only at the end)
  --sample-every N        also write a sample grid every N steps (0: only at the end)
  --sampler NAME          sampler of the grids (default ddim)
  --sample-steps N        its number of steps (default: the sampler's, 50 for ddim)
  --sample-n N            images per grid (default 64)
  --no-samples            write no sample grids
  -h, --help              show this help
`;

const SAMPLE_HELP_HEAD =
  `ddpm sample: sample a checkpoint into an 8-wide PNG grid or a .npy array

USAGE
  deno run -A cli.ts sample --checkpoint FILE [--sampler NAME] [options]

The sampler's own options come from its schema (see \`ddpm samplers\`): pass
them as --kebab-case flags, e.g. --num-steps 20 --spacing trailing --no-clip-x0.

OPTIONS
  --checkpoint FILE       a .safetensors checkpoint (required)
  --sampler NAME          a registered sampler (default ddim)
  --steps N               alias of the sampler's --num-steps
  --n N                   number of images (default 64)
  --seed N                seed of the noise (default: random, printed)
  --ema                   use the EMA weights (the default when the file has them)
  --live                  use the live (non-averaged) weights
  --out FILE              output file (default sample_<sampler>.png beside the checkpoint)
  --format png|npy        PNG grid, or float32 NHWC array in [-1, 1] (default from --out)
  --backend NAME          auto (default), webgpu, wasm or cpu
  --threads N|auto        wasm threads (default auto: one per core, up to 8)
  -h, --help              show this help
`;

const DOWNLOAD_HELP =
  `ddpm download: download and verify a dataset into the cache

USAGE
  deno run -A cli.ts download [--dataset NAME] [options]

Prints the paths of the verified files. Files are checked against the
published MD5s and written under a temporary name, then renamed.

OPTIONS
  --dataset NAME          mnist (default), fashion-mnist or mnist-lite (bundled: nothing to download)
  --cache-dir DIR         the cache folder (default $XDG_CACHE_HOME/ddpm or ~/.cache/ddpm)
  --mirror URL            download from URL instead of the built-in mirrors (repeatable)
  -h, --help              show this help
`;

const SAMPLERS_HELP =
  `ddpm samplers: list the registered samplers and their options

USAGE
  deno run -A cli.ts samplers

OPTIONS
  -h, --help              show this help
`;

const INFO_HELP =
  `ddpm info: show Deno, tfjs and backend versions and the adapter

USAGE
  deno run -A cli.ts info [--backend NAME]

OPTIONS
  --backend NAME          the backend to start: auto (default), webgpu, wasm or cpu
  -h, --help              show this help
`;

// ------------------------------------------------------------ reporting

/** A mistake in the command line: one line, exit code 2. */
class UsageError extends Error {}

/** Ctrl-C (SIGINT, exit code 130) or SIGTERM (143) stopped the command. */
class Interrupted extends Error {
  constructor(readonly code = 130) {
    super("interrupted");
  }
}

/**
 * The signals that stop a command cleanly: Ctrl-C, and SIGTERM (what `kill`
 * and job schedulers send) where the platform has it.
 */
const STOP_SIGNALS: Deno.Signal[] = Deno.build.os === "windows"
  ? ["SIGINT"]
  : ["SIGINT", "SIGTERM"];

/** The exit code for a stop by `signal`: 128 + its number. */
const stopCode = (signal: Deno.Signal) => signal === "SIGTERM" ? 143 : 130;

/**
 * Call `f` with the signal when one of {@linkcode STOP_SIGNALS} arrives.
 *
 * @returns A function that removes the listeners.
 */
function onStopSignal(f: (signal: Deno.Signal) => void): () => void {
  const listeners = STOP_SIGNALS.map((sig) => {
    const l = () => f(sig);
    Deno.addSignalListener(sig, l);
    return [sig, l] as const;
  });
  return () => {
    for (const [sig, l] of listeners) Deno.removeSignalListener(sig, l);
  };
}

const useColor = () =>
  Deno.env.get("NO_COLOR") === undefined && Deno.stderr.isTerminal();

function say(line: string): void {
  console.error(line);
}

function warn(line: string): void {
  say(useColor() ? `\x1b[33mddpm: ${line}\x1b[0m` : `ddpm: ${line}`);
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, " ").trim();
}

function fmtDuration(sec: number): string {
  if (!Number.isFinite(sec)) return "?";
  const s = Math.max(0, Math.round(sec));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const r = s % 60;
  return h > 0
    ? `${h}h${String(m).padStart(2, "0")}m`
    : m > 0
    ? `${m}m${String(r).padStart(2, "0")}s`
    : `${r}s`;
}

/**
 * Progress on stderr: a cli-progress bar on a terminal, a plain line every
 * `every` seconds otherwise (CI logs).
 */
class Progress {
  #bar: cliProgress.SingleBar | null = null;
  #last = -Infinity;
  readonly #every: number;

  constructor(
    total: number,
    start: number,
    format: string,
    initial: Record<string, string> = {},
    every = 10,
  ) {
    this.#every = every;
    if (Deno.stderr.isTerminal()) {
      this.#bar = new cliProgress.SingleBar({
        format,
        stream: process.stderr,
        hideCursor: true,
        clearOnComplete: false,
        barsize: 24,
        etaBuffer: 50,
        fps: 5,
      }, cliProgress.Presets.shades_classic);
      this.#bar.start(total, start, initial);
    }
  }

  /** Move to `value`; `line` is what a non-terminal gets, at most every `every` seconds (or when `force`). */
  update(
    value: number,
    payload: Record<string, string>,
    line: () => string,
    force = false,
  ): void {
    if (this.#bar !== null) {
      this.#bar.update(value, payload);
      return;
    }
    const now = performance.now() / 1000;
    if (force || now - this.#last >= this.#every) {
      this.#last = now;
      say(line());
    }
  }

  stop(): void {
    this.#bar?.stop();
    this.#bar = null;
  }
}

// --------------------------------------------------------- option parsing

type OptionDef = {
  type: "string" | "boolean";
  multiple?: boolean;
  short?: string;
};

function parse(
  command: string,
  args: string[],
  options: Record<string, OptionDef>,
): Record<string, string | boolean | string[] | undefined> {
  try {
    const { values } = parseArgs({
      args,
      options: { help: { type: "boolean", short: "h" }, ...options },
      strict: true,
      allowPositionals: false,
      allowNegative: true,
    });
    for (const [key, v] of Object.entries(values)) {
      if (v === false && options[key]?.type === "string") {
        throw new UsageError(
          `--no-${key} is not an option; give --${key} a value`,
        );
      }
    }
    return values as Record<string, string | boolean | string[] | undefined>;
  } catch (e) {
    if (e instanceof UsageError) throw e;
    const code = (e as { code?: string }).code;
    const msg = (e as Error).message;
    const opt = /'(-[^' ]+)/.exec(msg)?.[1];
    if (code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") {
      throw new UsageError(`unknown option ${opt ?? msg}`);
    }
    if (code === "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL") {
      const arg = /'([^']*)'/.exec(msg)?.[1] ?? "";
      throw new UsageError(
        `unexpected argument "${arg}" (${command} takes only --options)`,
      );
    }
    if (code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") {
      if (/argument missing/.test(msg)) {
        throw new UsageError(`${opt} needs a value`);
      }
      if (/does not take an argument/.test(msg)) {
        throw new UsageError(`${opt} takes no value`);
      }
      throw new UsageError(oneLine(msg));
    }
    throw e;
  }
}

function str(
  values: Record<string, unknown>,
  name: string,
): string | undefined {
  const v = values[name];
  return typeof v === "string" ? v : undefined;
}

function intOpt(
  values: Record<string, unknown>,
  name: string,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number | undefined {
  const text = str(values, name);
  if (text === undefined) return undefined;
  const v = Number(text);
  if (text.trim() === "" || !Number.isInteger(v) || v < min || v > max) {
    const range = max === Number.MAX_SAFE_INTEGER
      ? `an integer >= ${min}`
      : `an integer in [${min}, ${max}]`;
    throw new UsageError(
      `--${name} out of range (got "${text}", expected ${range})`,
    );
  }
  return v;
}

function numOpt(
  values: Record<string, unknown>,
  name: string,
  ok: (v: number) => boolean,
  expected: string,
): number | undefined {
  const text = str(values, name);
  if (text === undefined) return undefined;
  const v = Number(text);
  if (text.trim() === "" || !Number.isFinite(v) || !ok(v)) {
    throw new UsageError(
      `--${name} out of range (got "${text}", expected ${expected})`,
    );
  }
  return v;
}

function choiceOpt<T extends string>(
  values: Record<string, unknown>,
  name: string,
  choices: readonly T[],
): T | undefined {
  const text = str(values, name);
  if (text === undefined) return undefined;
  if (!(choices as readonly string[]).includes(text)) {
    throw new UsageError(
      `unknown --${name} (got "${text}", expected ${choices.join(", ")})`,
    );
  }
  return text as T;
}

const BACKENDS: readonly BackendName[] = ["auto", "webgpu", "wasm", "cpu"];
const DATASET_NAMES: readonly DatasetName[] = [
  "mnist",
  "fashion-mnist",
  "mnist-lite",
];

/** --backend, checked (before anything is written), "auto" by default. */
function backendOpt(values: Record<string, unknown>) {
  return choiceOpt(values, "backend", BACKENDS) ?? "auto";
}

async function startBackend(name: ReturnType<typeof backendOpt>) {
  const got = await initBackend(name);
  const threads = got.backend === "wasm"
    ? `, ${wasmThreads()} thread${wasmThreads() === 1 ? "" : "s"}`
    : "";
  say(`backend ${got.backend}${threads} (${got.reason})`);
  return got;
}

/** Fail early, before minutes of work, when `dir` cannot take a new file. */
async function checkWritableDir(dir: string, what: string): Promise<void> {
  const probe = join(dir, `.ddpm-write-test-${crypto.randomUUID()}`);
  try {
    await Deno.writeFile(probe, new Uint8Array());
    await Deno.remove(probe);
  } catch (e) {
    throw new Error(
      `Cannot write ${what} "${dir}": ${
        e instanceof Deno.errors.NotFound
          ? "no such folder"
          : oneLine((e as Error).message)
      }`,
    );
  }
}

// ------------------------------------------------------------------ data

function downloadReporter(): (p: DownloadProgress) => void {
  const tty = Deno.stderr.isTerminal();
  let last = 0;
  return (p) => {
    const now = performance.now();
    if (tty) {
      Deno.stderr.writeSync(
        new TextEncoder().encode(
          `\r${formatProgress(p)}${p.done ? "\n" : ""}\x1b[K`,
        ),
      );
    } else if ((p.done && p.received > 0) || now - last > 5000) {
      last = now;
      say(`download ${formatProgress(p)}`);
    }
  };
}

async function loadData(
  data: DataDescription,
  values: Record<string, unknown>,
  fallback = values.fallback !== false,
): Promise<LoadedDataset> {
  const mirrors = values.mirror as string[] | undefined;
  const loaded = await loadDataset({
    name: data.dataset as DatasetName,
    dataDir: data.dataDir,
    cacheDir: str(values, "cache-dir"),
    mirrors: mirrors && mirrors.length > 0 ? mirrors : undefined,
    fallback,
    onProgress: downloadReporter(),
  });
  if (loaded.warning !== null) warn(loaded.warning);
  return loaded;
}

// ----------------------------------------------------------------- train

/** What the batches of a run are made of: recorded in the checkpoint's `data`. */
interface DataDescription {
  dataset: string;
  dataDir?: string;
  batchSize: number;
  resize: ResizeMode;
  seed: number;
  imageSize: number;
}

interface Profile {
  name: string;
  why: string;
  dataset: DatasetName;
  base: number;
  batchSize: number;
  epochs: number;
  lr: number;
  ema: { decay: number; warmup: boolean };
  timeLimitMin: number;
  checkpointEvery: number;
  sampleEvery: number;
}

/** The configuration `train` picks when no flag says otherwise. */
function pickProfile(got: BackendInfo): Profile {
  if (got.backend === "webgpu" && !got.softwareAdapter) {
    return {
      name: "reference",
      why: `a hardware GPU (${got.adapter}) runs the reference's configuration`,
      dataset: "mnist",
      base: 64,
      batchSize: 128,
      epochs: 30,
      lr: 2e-4,
      ema: { decay: 0.9999, warmup: false },
      timeLimitMin: 0,
      checkpointEvery: 500,
      sampleEvery: 2000,
    };
  }
  return {
    name: "cpu",
    why:
      `no hardware GPU (backend ${got.backend}): the reference's base-64 UNet would take seconds a step, so a base-16 UNet, batch 32, lr 2e-3, an EMA with warm-up and 12-minute sessions on the bundled mnist-lite digits (--resume continues)`,
    dataset: "mnist-lite",
    base: 16,
    batchSize: 32,
    epochs: 30,
    lr: 2e-3,
    ema: { decay: 0.9999, warmup: true },
    timeLimitMin: 12,
    checkpointEvery: 100,
    sampleEvery: 0,
  };
}

const TRAIN_OPTIONS: Record<string, OptionDef> = {
  dataset: { type: "string" },
  "data-dir": { type: "string" },
  "cache-dir": { type: "string" },
  mirror: { type: "string", multiple: true },
  fallback: { type: "boolean" },
  steps: { type: "string" },
  epochs: { type: "string" },
  "time-limit": { type: "string" },
  workers: { type: "string" },
  "batch-size": { type: "string" },
  lr: { type: "string" },
  base: { type: "string" },
  schedule: { type: "string" },
  timesteps: { type: "string" },
  "ema-decay": { type: "string" },
  "ema-warmup": { type: "boolean" },
  ema: { type: "boolean" },
  resize: { type: "string" },
  seed: { type: "string" },
  backend: { type: "string" },
  out: { type: "string" },
  resume: { type: "boolean" },
  force: { type: "boolean" },
  "checkpoint-every": { type: "string" },
  "sample-every": { type: "string" },
  sampler: { type: "string" },
  "sample-steps": { type: "string" },
  "sample-n": { type: "string" },
  samples: { type: "boolean" },
};

/** The run-defining flags given on the command line (undefined when absent). */
function runFlags(values: Record<string, unknown>) {
  const emaDecay = numOpt(
    values,
    "ema-decay",
    (v) => v >= 0 && v <= 1,
    "a number in [0, 1]",
  );
  return {
    dataset: choiceOpt(values, "dataset", DATASET_NAMES),
    dataDir: str(values, "data-dir"),
    batchSize: intOpt(values, "batch-size", 1),
    lr: numOpt(values, "lr", (v) => v > 0, "a number > 0"),
    base: intOpt(values, "base", 8, 1024),
    schedule: choiceOpt(values, "schedule", ["linear", "cosine"] as const),
    timesteps: intOpt(values, "timesteps", 2, 100000),
    emaDecay,
    emaWarmup: values["ema-warmup"] as boolean | undefined,
    ema: values.ema as boolean | undefined,
    resize: choiceOpt(values, "resize", ["bilinear", "pad"] as const),
    seed: intOpt(values, "seed", 0, 2 ** 32 - 1),
  };
}

/** Refuse run-defining flags that disagree with the checkpoint being resumed. */
function checkResumeFlags(
  flags: ReturnType<typeof runFlags>,
  setup: RunSetup,
): void {
  const data = setup.data as unknown as DataDescription;
  const recorded: [string, unknown, unknown][] = [
    ["--dataset", flags.dataset, data.dataset],
    ["--data-dir", flags.dataDir, data.dataDir],
    ["--batch-size", flags.batchSize, data.batchSize],
    ["--lr", flags.lr, setup.optimizer.lr],
    ["--base", flags.base, setup.model.base],
    ["--schedule", flags.schedule, setup.schedule.kind],
    ["--timesteps", flags.timesteps, setup.schedule.T],
    ["--ema-decay", flags.emaDecay, setup.ema?.decay],
    ["--ema-warmup", flags.emaWarmup, setup.ema && setup.ema.mode === "warmup"],
    ["--ema", flags.ema, setup.ema !== null],
    ["--resize", flags.resize, data.resize],
    ["--seed", flags.seed, setup.seed],
  ];
  for (const [flag, given, has] of recorded) {
    if (given !== undefined && given !== has) {
      throw new UsageError(
        `${flag} cannot change on --resume (got ${given}, the checkpoint has ${has}); use --force or another --out to start a new run`,
      );
    }
  }
}

/** --workers or --threads: "auto" (the default) or an integer in [1, 8]. */
function countOpt(
  values: Record<string, unknown>,
  name: "workers" | "threads",
): number | "auto" {
  const raw = str(values, name);
  if (raw === undefined || raw === "auto") return "auto";
  const n = Number(raw);
  if (raw.trim() === "" || !Number.isInteger(n) || n < 1 || n > 8) {
    throw new UsageError(
      `--${name} out of range (got "${raw}", expected auto or an integer in [1, 8])`,
    );
  }
  return n;
}

/**
 * --threads of sample and eval (checked by {@linkcode countOpt}): the wasm
 * backend's threads, one per core (up to 8) by default; without the flag,
 * DDPM_WASM_THREADS still decides when it is set. Takes effect when the
 * backend starts.
 */
function chooseThreads(given: boolean, n: number | "auto"): void {
  if (!given && Deno.env.get("DDPM_WASM_THREADS")) {
    setWasmThreads(null);
    return;
  }
  setWasmThreads(
    n === "auto" ? Math.min(8, navigator.hardwareConcurrency || 1) : n,
  );
}

async function train(args: string[]): Promise<number> {
  const values = parse("train", args, TRAIN_OPTIONS);
  if (values.help) {
    console.log(TRAIN_HELP);
    return 0;
  }
  const flags = runFlags(values);
  const steps = intOpt(values, "steps", 1);
  const epochs = intOpt(values, "epochs", 1);
  if (steps !== undefined && epochs !== undefined) {
    throw new UsageError("give --steps or --epochs, not both");
  }
  const timeLimitMin = numOpt(
    values,
    "time-limit",
    (v) => v >= 0,
    "minutes >= 0",
  );
  const checkpointEvery = intOpt(values, "checkpoint-every", 0);
  const sampleEvery = intOpt(values, "sample-every", 0);
  const workers = countOpt(values, "workers");
  const backendName = backendOpt(values);
  const samplerName = str(values, "sampler") ?? "ddim";
  let sampler: SamplerPlugin;
  try {
    sampler = getSampler(samplerName);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const sampleSteps = intOpt(values, "sample-steps", 1);
  if (sampleSteps !== undefined && !("numSteps" in sampler.options)) {
    throw new UsageError(
      `--sample-steps does not apply to sampler ${sampler.name} (it has no numSteps option)`,
    );
  }
  const grid = {
    sampler,
    n: intOpt(values, "sample-n", 1, 4096) ?? 64,
    numSteps: sampleSteps,
    enabled: values.samples !== false,
  };
  const out = str(values, "out") ?? "out";
  const resume = values.resume === true;
  if (resume && values.force === true) {
    throw new UsageError("give --resume or --force, not both");
  }
  if (flags.dataset !== undefined && flags.dataDir !== undefined) {
    throw new UsageError("give --dataset or --data-dir, not both");
  }
  const ckptPath = join(out, RUN_FILES.checkpoint);
  const hasCheckpoint = await Deno.stat(ckptPath).then(() => true, () => false);
  if (resume && !hasCheckpoint) {
    throw new Error(
      `Cannot resume: no checkpoint in "${out}" (got no ${RUN_FILES.checkpoint}, expected one written by ddpm train); run without --resume to start`,
    );
  }
  if (!resume && hasCheckpoint && values.force !== true) {
    throw new UsageError(
      `"${ckptPath}" already exists: pass --resume to continue it, --force to start over, or another --out`,
    );
  }
  try {
    await Deno.mkdir(out, { recursive: true });
  } catch (e) {
    throw new Error(
      `Cannot write output folder "${out}": ${oneLine((e as Error).message)}`,
    );
  }
  await checkWritableDir(out, "output folder");

  const backend = await startBackend(backendName);
  const overrides = {
    checkpointEvery,
    sampleEvery,
    timeLimitSec: timeLimitMin === undefined ? undefined : timeLimitMin * 60,
  };
  let run: TrainingRun;
  let batcher: ImageBatcher;
  if (resume) {
    run = await TrainingRun.resume(out, { ...overrides, steps, workers });
    try {
      checkResumeFlags(flags, run.setup);
      const data = run.setup.data as unknown as DataDescription;
      // No fallback: a resumed run must see the data it started on.
      const { dataset } = await loadData(data, values, false);
      batcher = new ImageBatcher(dataset, data);
      if (epochs !== undefined) {
        run.setup.steps = epochs * batcher.batchesPerEpoch;
      }
      say(
        `resuming "${ckptPath}" at step ${run.step} of ${run.setup.steps} (${
          describeSetup(run.setup)
        })`,
      );
    } catch (e) {
      run.dispose();
      throw e;
    }
  } else {
    const profile = pickProfile(backend);
    const flagged = Object.entries(flags).filter(([, v]) => v !== undefined)
      .length + [steps, epochs, timeLimitMin].filter((v) => v !== undefined)
      .length;
    say(
      `config: ${profile.name} defaults${
        flagged > 0 ? " (flags override)" : ""
      }: ${profile.why}`,
    );
    const data: DataDescription = {
      dataset: flags.dataDir !== undefined
        ? "folder"
        : flags.dataset ?? profile.dataset,
      ...(flags.dataDir !== undefined ? { dataDir: flags.dataDir } : {}),
      batchSize: flags.batchSize ?? profile.batchSize,
      resize: flags.resize ?? "bilinear",
      seed: flags.seed ?? 0,
      imageSize: 32,
    };
    const loaded = await loadData(data, values);
    if (flags.dataDir === undefined) data.dataset = loaded.dataset.name;
    const count = loaded.dataset.count;
    if (data.batchSize > count) {
      throw new UsageError(
        `--batch-size out of range (got ${data.batchSize}, expected at most the dataset's ${count} images)`,
      );
    }
    batcher = new ImageBatcher(loaded.dataset, data);
    const emaOn = flags.ema ?? true;
    const warmup = flags.emaWarmup ?? profile.ema.warmup;
    const setup: RunSetupInput = {
      model: { base: flags.base ?? profile.base },
      schedule: {
        kind: flags.schedule ?? "linear",
        T: flags.timesteps ?? 1000,
      },
      seed: flags.seed ?? 0,
      optimizer: { lr: flags.lr ?? profile.lr },
      ema: emaOn
        ? {
          decay: flags.emaDecay ?? profile.ema.decay,
          ...(warmup ? { mode: "warmup" as const, power: 3 / 4 } : {}),
        }
        : null,
      data: { ...data },
      steps: steps ??
        (epochs ?? profile.epochs) * batcher.batchesPerEpoch,
      checkpointEvery: checkpointEvery ?? profile.checkpointEvery,
      sampleEvery: sampleEvery ?? profile.sampleEvery,
      timeLimitSec: overrides.timeLimitSec ?? profile.timeLimitMin * 60,
    };
    run = await TrainingRun.create(out, setup, {
      overwrite: values.force === true,
      workers,
    });
    say(
      `training "${out}": ${
        describeSetup(run.setup)
      }, ${run.setup.steps} steps${
        run.setup.timeLimitSec > 0
          ? ` or ${fmtDuration(run.setup.timeLimitSec)}`
          : ""
      }`,
    );
  }
  try {
    return await trainLoop(run, batcher, grid);
  } finally {
    run.dispose();
  }
}

function describeSetup(setup: RunSetup): string {
  const data = setup.data as unknown as DataDescription;
  const ema = setup.ema === null
    ? "no EMA"
    : `EMA ${setup.ema.decay}${
      setup.ema.mode === "warmup" ? " with warm-up" : ""
    }`;
  return `${data.dataset}, base ${setup.model.base}, batch ${data.batchSize}, lr ${setup.optimizer.lr}, ${ema}, ${setup.schedule.kind} schedule (T = ${setup.schedule.T})`;
}

async function trainLoop(
  run: TrainingRun,
  batcher: ImageBatcher,
  grid: {
    sampler: SamplerPlugin;
    n: number;
    numSteps?: number;
    enabled: boolean;
  },
): Promise<number> {
  const controller = new AbortController();
  let stopSignal: Deno.Signal = "SIGINT";
  const onSignal = (sig: Deno.Signal) => {
    if (!controller.signal.aborted) {
      stopSignal = sig;
      progress.stop();
      say(
        `ddpm: interrupted (${sig}); finishing the current step and writing the checkpoint`,
      );
      controller.abort(new Interrupted(stopCode(sig)));
    }
  };
  const total = run.setup.steps;
  const limit = run.setup.timeLimitSec;
  const progress = new Progress(
    total,
    run.step,
    "step {value}/{total} |{bar}| loss {loss} | {ips} img/s | {elapsed} | ETA {left}",
    { loss: "-", ips: "-", elapsed: "-", left: "-" },
  );
  let smooth = 0;
  let weight = 0;
  let spi = 0;
  const t0 = performance.now();
  const first = run.step;
  const line = (m: StepMetrics, loss: string, eta: string) =>
    `step ${m.step}/${total} loss ${loss} (last ${m.loss.toPrecision(3)}) ${
      (1 / spi).toFixed(1)
    } img/s elapsed ${fmtDuration(m.elapsedSec)} eta ${eta}`;
  const data = run.setup.data as unknown as DataDescription;
  const stopListening = onStopSignal(onSignal);
  let result;
  try {
    result = await run.train({
      batchesPerEpoch: batcher.batchesPerEpoch,
      batch: (epoch, index) => {
        const b = batcher.batch(epoch, index);
        b.labels.dispose();
        return b.images;
      },
      sample: grid.enabled
        ? ({ model, schedule, signal, final, step }) => {
          const spec = grid.sampler.options.numSteps;
          const numSteps = grid.numSteps ??
            (spec?.type === "int" && spec.default !== undefined
              ? Math.min(spec.default, schedule.T)
              : undefined);
          const what = `${grid.n} images with ${grid.sampler.name}${
            numSteps !== undefined ? ` (${numSteps} steps)` : ""
          }`;
          if (final) {
            progress.stop();
            say(`sampling the final grid: ${what}`);
          } else if (!Deno.stderr.isTerminal()) {
            say(`sampling a grid at step ${step}: ${what}`);
          }
          return grid.sampler.sample(model, schedule, {
            n: grid.n,
            ...(numSteps !== undefined ? { numSteps } : {}),
            imgSize: data.imageSize,
            channels: run.unet.config.inChannels,
            seed: run.setup.seed,
            signal,
          });
        }
        : undefined,
      signal: controller.signal,
      onStep: (m) => {
        weight = 0.98 * weight + 0.02;
        smooth = 0.98 * smooth + 0.02 * m.loss;
        // Averaged as seconds per image (a harmonic mean of the rates): a
        // step whose work overlapped the one before (a step started ahead
        // on WebGPU) reports a short interval, which must not swing it.
        spi = spi === 0 ? 1 / m.imagesPerSec : 0.9 * spi + 0.1 / m.imagesPerSec;
        const ips = 1 / spi;
        const session = (performance.now() - t0) / 1000;
        const rate = (m.step - first) / session;
        let eta = (total - m.step) / rate;
        if (limit > 0) eta = Math.min(eta, limit - session);
        const loss = (smooth / weight).toFixed(4);
        progress.update(
          m.step,
          {
            loss,
            ips: ips.toFixed(1),
            elapsed: fmtDuration(m.elapsedSec),
            left: fmtDuration(eta),
          },
          () => line(m, loss, fmtDuration(eta)),
          m.step === first + 1,
        );
      },
      onFile: (f) => {
        if (f.kind === "checkpoint" && !Deno.stderr.isTerminal()) {
          say(`checkpoint "${f.path}" at step ${f.step}`);
        }
      },
    });
  } finally {
    stopListening();
    progress.stop();
  }
  const why = {
    steps: `reached ${total} steps`,
    time: `time limit of ${fmtDuration(limit)} reached at step ${result.step}`,
    signal: `interrupted at step ${result.step}`,
  }[result.stopped];
  say(
    `done: ${why}; ${fmtDuration(result.sessionSec)} this session${
      result.step < total
        ? `; continue with: ddpm train --resume --out ${run.outDir}`
        : ""
    }`,
  );
  console.log(result.checkpoint);
  console.log(result.metrics);
  console.log(result.lossCurve);
  if (result.samples !== null) console.log(result.samples);
  return result.stopped === "signal" ? stopCode(stopSignal) : 0;
}

// ---------------------------------------------------------------- sample

function kebab(name: string): string {
  return name.replace(/([a-z0-9])([A-Z])/g, "$1-$2").toLowerCase();
}

const SAMPLE_OPTIONS: Record<string, OptionDef> = {
  checkpoint: { type: "string" },
  sampler: { type: "string" },
  steps: { type: "string" },
  n: { type: "string" },
  seed: { type: "string" },
  ema: { type: "boolean" },
  live: { type: "boolean" },
  out: { type: "string" },
  format: { type: "string" },
  backend: { type: "string" },
  threads: { type: "string" },
};

/** The sampler's own options as flags: option name -> flag name (common ones excluded). */
function pluginFlags(plugin: SamplerPlugin): Map<string, string> {
  const flags = new Map<string, string>();
  for (const name of Object.keys(plugin.options)) {
    if (name in COMMON_OPTIONS) continue;
    const flag = kebab(name);
    if (flag in SAMPLE_OPTIONS || flag === "help") continue;
    flags.set(name, flag);
  }
  return flags;
}

function describeOption(name: string, spec: OptionSpec): string {
  const range = spec.type === "choice"
    ? spec.choices.join("|")
    : spec.type === "boolean"
    ? ""
    : spec.min !== undefined && spec.max !== undefined
    ? `${spec.type} in [${spec.min}, ${spec.max}]`
    : spec.min !== undefined
    ? `${spec.type} >= ${spec.min}`
    : spec.type;
  const def = spec.default === undefined ? "" : `, default ${spec.default}`;
  const flag = spec.type === "boolean"
    ? `--${kebab(name)} / --no-${kebab(name)}`
    : `--${kebab(name)} ${range}`;
  const lead = flag.length > 33
    ? `${flag}\n  ${" ".repeat(34)}`
    : flag.padEnd(34);
  return `  ${lead} ${spec.description}${def}`;
}

function sampleHelp(): string {
  const lines = [SAMPLE_HELP_HEAD, "SAMPLER OPTIONS"];
  for (const plugin of listSamplers()) {
    lines.push(`  ${plugin.name}: ${plugin.description}`);
    for (const name of pluginFlags(plugin).keys()) {
      lines.push("  " + describeOption(name, plugin.options[name]));
    }
  }
  return lines.join("\n") + "\n";
}

/** Pick `--NAME VALUE` (or `--NAME=VALUE`) out of the arguments before the full parse. */
function findFlag(args: string[], name: string, fallback: string): string {
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--") break;
    if (args[i] === `--${name}` && i + 1 < args.length) return args[i + 1];
    if (args[i].startsWith(`--${name}=`)) return args[i].slice(name.length + 3);
  }
  return fallback;
}

/** The sampler named by `--sampler` (ddim by default). */
function findSampler(args: string[]): string {
  return findFlag(args, "sampler", "ddim");
}

/** What {@linkcode sampleFromArgs} made: images the caller owns, and how. */
interface Sampled {
  images: tf.Tensor4D;
  values: Record<string, unknown>;
  checkpoint: string;
  plugin: SamplerPlugin;
  seconds: number;
  describe: string;
}

/**
 * Parse a sampling command's flags (common + the sampler's own + `extra`),
 * load the checkpoint and sample it. `beforeLoad` checks the command's own
 * flags before anything heavy happens.
 */
async function sampleFromArgs(
  command: "sample" | "eval",
  args: string[],
  extra: Record<string, OptionDef>,
  defaultN: number,
  beforeLoad: (
    values: Record<string, unknown>,
    checkpoint: string,
  ) => Promise<void>,
): Promise<Sampled> {
  let plugin: SamplerPlugin;
  try {
    plugin = getSampler(findSampler(args));
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const own = pluginFlags(plugin);
  const defs: Record<string, OptionDef> = { ...SAMPLE_OPTIONS, ...extra };
  for (const [name, flag] of own) {
    defs[flag] = {
      type: plugin.options[name].type === "boolean" ? "boolean" : "string",
    };
  }
  let values;
  try {
    values = parse(command, args, defs);
  } catch (e) {
    if (e instanceof UsageError && /^unknown option/.test(e.message)) {
      const known = [...own.values()].map((f) => `--${f}`).join(", ");
      throw new UsageError(
        `${e.message} for sampler ${plugin.name} (its options: ${
          known || "none"
        }; see ddpm samplers)`,
      );
    }
    throw e;
  }
  const checkpoint = str(values, "checkpoint");
  if (checkpoint === undefined) {
    throw new UsageError("--checkpoint FILE is required");
  }
  if (values.ema === true && values.live === true) {
    throw new UsageError("give --ema or --live, not both");
  }
  // Checked now, applied before the backend starts.
  const threads = countOpt(values, "threads");
  // The sampler's options, typed by its schema.
  const opts: Record<string, unknown> = {};
  for (const [name, flag] of own) {
    const v = values[flag];
    if (v === undefined) continue;
    try {
      opts[name] = typeof v === "boolean"
        ? v
        : parseOptionValue(`--${flag}`, plugin.options[name], v as string);
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
  }
  const steps = intOpt(values, "steps", 1);
  if (steps !== undefined) {
    if (!("numSteps" in plugin.options)) {
      throw new UsageError(
        `--steps does not apply to sampler ${plugin.name} (it has no numSteps option; it runs every timestep)`,
      );
    }
    if (opts.numSteps !== undefined && opts.numSteps !== steps) {
      throw new UsageError("give --steps or --num-steps, not both");
    }
    opts.numSteps = steps;
  }
  opts.n = intOpt(values, "n", 1, command === "eval" ? 100000 : 4096) ??
    defaultN;
  const seedGiven = intOpt(values, "seed", 0, 2 ** 32 - 1);
  const seed = seedGiven ?? Math.floor(Math.random() * 2 ** 31);
  opts.seed = seed;
  try {
    const st = await Deno.stat(checkpoint);
    if (!st.isFile) throw new Error("not a file");
  } catch (e) {
    throw new Error(
      `Cannot read checkpoint "${checkpoint}": ${
        e instanceof Deno.errors.NotFound
          ? "no such file"
          : oneLine((e as Error).message)
      }`,
    );
  }
  await beforeLoad(values, checkpoint);

  chooseThreads(values.threads !== undefined, threads);
  await startBackend(backendOpt(values));
  const model = await loadTrainedModel(checkpoint, {
    weights: values.live === true
      ? "live"
      : values.ema === true
      ? "ema"
      : undefined,
  });
  try {
    // A default step count above the model's T becomes T.
    const numSteps = plugin.options.numSteps;
    if (
      opts.numSteps === undefined && numSteps?.type === "int" &&
      numSteps.default !== undefined && numSteps.default > model.schedule.T
    ) {
      opts.numSteps = model.schedule.T;
    }
    let checked: OptionValues;
    try {
      checked = validateSamplerOptions(
        plugin.name,
        plugin.options,
        {
          ...opts,
          imgSize: model.imageSize,
          channels: model.unet.config.inChannels,
        },
        model.schedule.T,
      );
    } catch (e) {
      // Name the flags, not the schema's option names.
      let message = (e as Error).message;
      for (const [name, flag] of own) {
        message = message.replace(
          new RegExp(`\\b${name}\\b`, "g"),
          `--${flag}`,
        );
      }
      throw new UsageError(message);
    }
    const describe = `${plugin.name} (${
      Object.entries(checked)
        .filter(([k]) => !(k in COMMON_OPTIONS))
        .map(([k, v]) => `${kebab(k)} ${v}`).join(", ")
    }), seed ${seed}, ${model.weights} weights of step ${model.step}`;
    say(`sampling ${checked.n} images with ${describe}`);
    const controller = new AbortController();
    let progress: Progress | null = null;
    const stopListening = onStopSignal((sig) =>
      controller.abort(new Interrupted(stopCode(sig)))
    );
    let images: tf.Tensor4D;
    const t0 = performance.now();
    // On WebGPU the UNet's dispatches are recorded once and replayed.
    const unet = model.unet;
    const eps = replayOnWebGpu((x, t) => unet.predict(x, t));
    try {
      images = await plugin.sample(eps, model.schedule, {
        ...checked,
        signal: controller.signal,
        onStep: ({ i, steps }) => {
          progress ??= new Progress(
            steps,
            0,
            "sample {value}/{total} |{bar}| {elapsed} | ETA {eta_formatted}",
            { elapsed: "-" },
          );
          const sec = (performance.now() - t0) / 1000;
          progress.update(
            i + 1,
            { elapsed: fmtDuration(sec) },
            () =>
              `sample step ${i + 1}/${steps} elapsed ${fmtDuration(sec)} eta ${
                fmtDuration(sec / (i + 1) * (steps - i - 1))
              }`,
            i === 0,
          );
        },
      });
    } catch (e) {
      if (controller.signal.aborted) throw controller.signal.reason;
      throw e;
    } finally {
      stopListening();
      (progress as Progress | null)?.stop();
      eps.dispose();
    }
    return {
      images,
      values,
      checkpoint,
      plugin,
      seconds: (performance.now() - t0) / 1000,
      describe,
    };
  } finally {
    model.unet.dispose();
    model.schedule.dispose();
  }
}

async function sample(args: string[]): Promise<number> {
  if (args.includes("--help") || args.includes("-h")) {
    console.log(sampleHelp());
    return 0;
  }
  let out = "";
  let format = "png" as "png" | "npy";
  const { images, plugin, seconds } = await sampleFromArgs(
    "sample",
    args,
    {},
    64,
    async (values, checkpoint) => {
      const fmtFlag = choiceOpt(values, "format", ["png", "npy"] as const);
      const outFlag = str(values, "out");
      format = fmtFlag ??
        (outFlag?.toLowerCase().endsWith(".npy") ? "npy" : "png");
      out = outFlag ??
        join(dirname(checkpoint), `sample_${findSampler(args)}.${format}`);
      await checkWritableDir(dirname(out) || ".", "the output folder");
    },
  );
  try {
    if (format === "npy") {
      await writeNpy(out, images);
    } else {
      await writePng(out, await imagesToGrid(images, { nrow: 8 }));
    }
  } finally {
    images.dispose();
  }
  say(`${plugin.name}: done in ${fmtDuration(seconds)}`);
  console.log(out);
  return 0;
}

const EVAL_HELP =
  `ddpm eval: score a checkpoint's samples with a Fréchet distance on digit-classifier features

USAGE
  deno run -A cli.ts eval --checkpoint FILE [--sampler NAME] [options]

Samples N images, embeds them with the shipped digit classifier (98.7% on
held-out digits; 64-d penultimate features) and prints the Fréchet distance
to N real held-out digits, the real-vs-real floor for the same N (what a
perfect generator scores), the classifier's mean confidence and the class
histogram of the samples. Compare distances only at the same N.

The reference set: with --dataset mnist-lite (the default) the 2,000 held-out
digits of the bundled set (floor: N training digits), with --dataset mnist the
10,000 test digits (floor: N training digits). Sampler options are those of
\`ddpm sample\` (see \`ddpm sample --help\`).

OPTIONS
  --checkpoint FILE       a .safetensors checkpoint (required)
  --dataset NAME          mnist-lite (default) or mnist
  --cache-dir DIR         download cache for mnist
  --n N                   images per set (default: all of the reference set, 2,000 or 10,000)
  --sampler NAME          a registered sampler (default ddim) and its --options
  --steps N               alias of the sampler's --num-steps
  --seed N                seed of the noise (default: random, printed)
  --ema | --live          which weights (EMA by default when the file has them)
  --json FILE             also write the result as JSON
  --backend NAME          auto (default), webgpu, wasm or cpu
  --threads N|auto        wasm threads (default auto: one per core, up to 8)
  -h, --help              show this help
`;

/** The real digits `eval` compares with: the reference set and the floor's set. */
async function evalSets(name: string, cacheDir: string | undefined) {
  if (name === "mnist-lite") {
    const { dataset } = await loadDataset({ name: "mnist-lite" });
    const { train, heldOut } = holdoutSplit(dataset);
    return { reference: heldOut, floor: train };
  }
  const load = async (split: "train" | "test") =>
    (await loadDataset({
      name: "mnist",
      split,
      cacheDir,
      fallback: false,
      onProgress: downloadReporter(),
    })).dataset;
  return { reference: await load("test"), floor: await load("train") };
}

async function evaluate(args: string[]): Promise<number> {
  if (args.includes("--help") || args.includes("-h")) {
    console.log(EVAL_HELP);
    return 0;
  }
  const dataset = findFlag(args, "dataset", "mnist-lite");
  if (dataset !== "mnist-lite" && dataset !== "mnist") {
    throw new UsageError(
      `unknown --dataset (got "${dataset}", expected mnist-lite or mnist: the classifier knows digits only)`,
    );
  }
  const maxN = dataset === "mnist-lite" ? 2000 : 10000;
  let jsonPath: string | undefined;
  let cacheDir: string | undefined;
  let n = maxN;
  const { images, checkpoint, seconds, describe } = await sampleFromArgs(
    "eval",
    args,
    {
      dataset: { type: "string" },
      "cache-dir": { type: "string" },
      json: { type: "string" },
    },
    maxN,
    async (values) => {
      n = intOpt(values, "n", 2, maxN) ?? maxN;
      jsonPath = str(values, "json");
      cacheDir = str(values, "cache-dir");
      if (values.out !== undefined || values.format !== undefined) {
        throw new UsageError(
          "--out and --format belong to sample; eval takes --json FILE",
        );
      }
      if (jsonPath !== undefined) {
        await checkWritableDir(dirname(jsonPath) || ".", "the --json folder");
      }
    },
  );
  let result: Evaluation;
  const classifier = await DigitClassifier.load();
  try {
    const sets = await evalSets(dataset, cacheDir);
    const real = spreadImages(sets.reference, n);
    const floorImages = spreadImages(sets.floor, n);
    try {
      result = await evaluateSamples(images, real, { classifier, floorImages });
    } finally {
      tf.dispose([real, floorImages]);
    }
  } finally {
    images.dispose();
    classifier.dispose();
  }
  const report = {
    checkpoint,
    sampler: describe,
    dataset,
    n,
    distance: result.distance,
    floor: result.floor,
    meanConfidence: result.meanConfidence,
    realMeanConfidence: result.realMeanConfidence,
    classHistogram: result.classHistogram,
    sampleSeconds: seconds,
    imagesPerSec: n / seconds,
    backend: tf.getBackend(),
  };
  const f = (x: number, d: number) => x.toFixed(d);
  console.log(
    `distance ${f(report.distance, 2)} (floor ${
      f(report.floor, 2)
    } at N = ${n}), ` +
      `confidence ${f(report.meanConfidence, 3)} (real ${
        f(report.realMeanConfidence, 3)
      }), ` +
      `classes [${report.classHistogram.join(", ")}], ` +
      `${f(seconds, 1)} s sampling (${
        f(report.imagesPerSec, 2)
      } images/s, ${report.backend})`,
  );
  if (jsonPath !== undefined) {
    await writeFileAtomic(
      jsonPath,
      new TextEncoder().encode(JSON.stringify(report, null, 2) + "\n"),
    );
    console.log(jsonPath);
  }
  return 0;
}

// ---------------------------------------------------- download, samplers, info

async function download(args: string[]): Promise<number> {
  const values = parse("download", args, {
    dataset: { type: "string" },
    "cache-dir": { type: "string" },
    mirror: { type: "string", multiple: true },
  });
  if (values.help) {
    console.log(DOWNLOAD_HELP);
    return 0;
  }
  const name = choiceOpt(values, "dataset", DATASET_NAMES) ?? "mnist";
  if (name === "mnist-lite") {
    const { dataset } = await loadDataset({ name });
    say(
      `mnist-lite is bundled (${dataset.count} digits from ${dataset.source}); nothing to download`,
    );
    return 0;
  }
  const mirrors = values.mirror as string[] | undefined;
  for (const split of ["train", "test"] as const) {
    const { dataset } = await loadDataset({
      name,
      split,
      cacheDir: str(values, "cache-dir"),
      mirrors: mirrors && mirrors.length > 0 ? mirrors : undefined,
      fallback: false,
      onProgress: downloadReporter(),
    });
    say(`${name} ${split}: ${dataset.count} images, verified`);
    for (const path of dataset.source.split(/,\s*/)) console.log(path);
  }
  return 0;
}

function samplers(args: string[]): number {
  const values = parse("samplers", args, {});
  if (values.help) {
    console.log(SAMPLERS_HELP);
    return 0;
  }
  const lines = [
    "Options every sampler takes (ddpm sample): --n, --seed; image size and channels come from the checkpoint.",
    "",
  ];
  for (const plugin of listSamplers()) {
    lines.push(`${plugin.name}: ${plugin.description}`);
    const flags = pluginFlags(plugin);
    if (flags.size === 0) lines.push("  (no options of its own)");
    for (const name of flags.keys()) {
      lines.push(describeOption(name, plugin.options[name]));
    }
    lines.push("");
  }
  console.log(lines.join("\n"));
  return 0;
}

async function info(args: string[]): Promise<number> {
  const values = parse("info", args, { backend: { type: "string" } });
  if (values.help) {
    console.log(INFO_HELP);
    return 0;
  }
  const name = choiceOpt(values, "backend", BACKENDS) ?? "auto";
  const got = await initBackend(name);
  const v = Deno.version;
  console.log(`deno ${v.deno} (v8 ${v.v8}, typescript ${v.typescript})`);
  console.log(`tfjs-core ${tf.version_core}`);
  console.log(
    `backend ${got.backend}${
      got.fellBack ? " (fell back)" : ""
    }: ${got.reason}`,
  );
  console.log(
    `webgpu adapter ${got.adapter ?? "none"}${
      got.adapter !== null
        ? got.softwareAdapter ? " (software fallback)" : " (hardware)"
        : ""
    }`,
  );
  if (got.backend === "wasm") {
    const simd = await tf.env().getAsync("WASM_HAS_SIMD_SUPPORT");
    const threads = await tf.env().getAsync("WASM_HAS_MULTITHREAD_SUPPORT");
    console.log(
      `wasm simd ${simd ? "yes" : "no"}, threads ${
        threads ? "yes" : "no"
      } (${wasmThreads()} in use), ddpm's wasm kernels ${
        wasmKernelsReady() ? "yes" : "no"
      }`,
    );
  }
  console.log(
    `${navigator.hardwareConcurrency} CPU cores, ${Deno.build.target}`,
  );
  return 0;
}

// ------------------------------------------------------------------- main

const COMMANDS: Record<string, (args: string[]) => Promise<number> | number> = {
  train,
  sample,
  eval: evaluate,
  download,
  samplers,
  info,
};

/**
 * Run the command line.
 *
 * @param args The arguments after the program name.
 * @returns The exit code: 0 ok, 1 failure, 2 usage error, 130 interrupted, 143
 * stopped by SIGTERM.
 * @example
 * ```ts ignore
 * import { main } from "./cli.ts";
 * console.log(await main(["samplers"])); // 0, after listing the samplers
 * ```
 */
export async function main(args: string[]): Promise<number> {
  const [command, ...rest] = args;
  if (command === undefined || command === "-h" || command === "--help") {
    if (command === undefined) {
      console.error(USAGE);
      return 2;
    }
    console.log(USAGE);
    return 0;
  }
  const run = COMMANDS[command];
  if (run === undefined) {
    say(
      `ddpm: unknown command "${command}" (expected one of: ${
        Object.keys(COMMANDS).join(", ")
      }); see ddpm --help`,
    );
    return 2;
  }
  try {
    return await run(rest);
  } catch (e) {
    if (e instanceof UsageError) {
      say(
        `ddpm ${command}: ${oneLine(e.message)} (see ddpm ${command} --help)`,
      );
      return 2;
    }
    if (e instanceof Interrupted) {
      say("ddpm: interrupted");
      return e.code;
    }
    const message = e instanceof Error ? e.message : String(e);
    say(`ddpm ${command}: ${oneLine(message)}`);
    if (Deno.env.get("DDPM_DEBUG") === "1" && e instanceof Error) {
      say(e.stack ?? "");
    }
    return 1;
  }
}

if (import.meta.main) {
  // Not Deno.exit: the process ends when its work has, after the training
  // workers' threads have been torn down (exiting while they were once
  // aborted the process with a heap corruption).
  Deno.exitCode = await main(Deno.args);
}
