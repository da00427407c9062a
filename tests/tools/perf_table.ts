/**
 * The README's performance table: UNet forward, training step and DDIM
 * sampling throughput (images/s and GFLOP/s) per backend and threading
 * mode, with the native float32 GEMM of the same machine (numpy) for scale.
 *
 * ```sh
 * deno run -A tests/tools/perf_table.ts                 # wasm (1 thread, workers, threads), webgpu if a hardware adapter
 * deno run -A tests/tools/perf_table.ts --full          # the issue's sizes: base 64, training batch 64
 * deno run -A tests/tools/perf_table.ts --backends wasm,cpu,webgpu --json out.json
 * deno run -A tests/tools/perf_table.ts --torch out/torch.json   # add a PyTorch row (tests/reference/bench_reference.py)
 * deno run -A tests/tools/perf_table.ts --rounds 3     # each variant 3 times, interleaved; medians
 * ```
 *
 * Each variant runs in its own process (tfjs picks the wasm build, threaded
 * or not, once per process): `--one '<variant JSON>'` measures one and
 * prints a JSON line. Forward passes and training steps are timed as
 * `--reps` calls back to back with one wait for the device at the end (a
 * training step reads its loss and gradient norm back itself); sampling as
 * the median over `--reps` calls, each ending with its images read back. A
 * training iteration includes the AdamW and EMA updates; each starts before
 * the previous one's loss is awaited, as a training run's do. FLOPs come from
 * the layer list (tests/tools/unet_flops.ts), a training step counted as
 * three forward passes. Peak RSS is the process's VmHWM (workers included).
 *
 * @module
 */
import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { initBackend, tf } from "../../core/backend.ts";
import { makeSchedule } from "../../core/schedule.ts";
import { Trainer } from "../../core/train.ts";
import { UNet } from "../../core/unet.ts";
import { setWasmThreads, wasmThreads } from "../../core/wasm_threads.ts";
import { replayOnWebGpu } from "../../core/_webgpu_replay.ts";
import { sampleDdim } from "../../samplers/ddim.ts";
import { unetForwardFlops, unetTrainFlops } from "./unet_flops.ts";

/** One measured configuration. */
export interface Variant {
  /** Label of the row. */
  label: string;
  /** tfjs backend. */
  backend: "wasm" | "cpu" | "webgpu";
  /** wasm threads (tfjs's threaded build when > 1). */
  threads: number;
  /** Trainer `workers` option. */
  workers: number | "auto";
  /** UNet base channels. */
  base: number;
  /** Forward batch. */
  forwardBatch: number;
  /** Training batch. */
  trainBatch: number;
  /** Images sampled, and DDIM steps. */
  sampleBatch: number;
  sampleSteps: number;
  /** Timed repetitions (after one warm-up). */
  reps: number;
  /** Which parts to measure. */
  parts: ("forward" | "train" | "sample")[];
  /** Forward passes and sampling through {@linkcode replayOnWebGpu}. */
  replay?: boolean;
  /** Environment variables of the variant's process (e.g. DDPM_WEBGPU_CONV). */
  env?: Record<string, string>;
}

/** What a variant measured (seconds are medians). */
export interface Result extends Variant {
  adapter: string | null;
  threadsUsed: number;
  /** What the replay did: calls replayed, captured and run plainly, and why not if not. */
  replayStats?: { replayed: number; captured: number; plain: number };
  replayFallback?: string;
  /** On WebGPU, training steps recorded and replayed (`Trainer.replayStats`). */
  trainReplay?: { recorded: number; replayed: number; fallback: string };
  forwardSeconds?: number;
  trainSeconds?: number;
  sampleSeconds?: number;
  peakRssMB: number;
}

/** The median of `v` (the upper one of an even count). */
export function median(v: number[]): number {
  const s = [...v].sort((a, b) => a - b);
  return s[s.length >> 1];
}

function peakRssMB(): number {
  try {
    const status = Deno.readTextFileSync("/proc/self/status");
    const m = /VmHWM:\s+(\d+) kB/.exec(status);
    if (m) return Math.round(Number(m[1]) / 1024);
  } catch {
    // not Linux: the current RSS instead
  }
  return Math.round(Deno.memoryUsage().rss / 2 ** 20);
}

/** Median seconds of `reps` calls of `f`, after one warm-up call. */
export async function timeIt(
  reps: number,
  f: () => Promise<void>,
): Promise<number> {
  await f();
  const t: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await f();
    t.push((performance.now() - t0) / 1000);
  }
  return median(t);
}

/**
 * Seconds per call of `run`, calls back to back, with one wait for the
 * device at the end (`sync`), after a warm-up call: the throughput of a
 * loop, as training and sampling run. (Under Deno every read back from a
 * WebGPU device costs at least 10 ms, so a read after each call would
 * measure that instead.)
 */
async function timeLoop(
  reps: number,
  run: () => Promise<void>,
  sync: () => Promise<void>,
): Promise<number> {
  await run();
  await sync();
  const t0 = performance.now();
  for (let i = 0; i < reps; i++) await run();
  await sync();
  return (performance.now() - t0) / 1000 / reps;
}

/** Measure a variant in a process of its own; null if it failed. */
async function measureInChild(
  self: string,
  v: Variant,
  round: number,
  rounds: number,
): Promise<Result | null> {
  console.error(
    `measuring ${v.label}${
      rounds > 1 ? ` (round ${round + 1}/${rounds})` : ""
    } ...`,
  );
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", self, "--one", JSON.stringify(v)],
    env: v.env ?? {},
    stdout: "piped",
    stderr: "inherit",
  }).output();
  const text = new TextDecoder().decode(out.stdout).trim().split("\n").pop();
  if (!out.success || text === undefined || text === "") {
    console.error(`  ${v.label} failed`);
    return null;
  }
  const r = JSON.parse(text) as Result;
  if (r.replayStats !== undefined) {
    console.error(
      `  replay: ${JSON.stringify(r.replayStats)}${
        r.replayFallback ? `, ${r.replayFallback}` : ""
      }`,
    );
  }
  if (r.trainReplay !== undefined) {
    console.error(`  training replay: ${JSON.stringify(r.trainReplay)}`);
  }
  return r;
}

/** One variant's results over several rounds: the median of each timing, the largest peak RSS. */
export function medianResult(rs: Result[]): Result {
  const out: Result = { ...rs[0] };
  for (
    const key of ["forwardSeconds", "trainSeconds", "sampleSeconds"] as const
  ) {
    const v = rs.map((r) => r[key]).filter((x): x is number => x !== undefined);
    if (v.length > 0) out[key] = median(v);
  }
  out.peakRssMB = Math.max(...rs.map((r) => r.peakRssMB));
  return out;
}

/** Measure one variant in this process. */
export async function measure(v: Variant): Promise<Result> {
  setWasmThreads(v.threads);
  const got = await initBackend(v.backend);
  if (got.backend !== v.backend) {
    throw new Error(
      `Cannot measure ${v.label}: backend ${v.backend} did not start (got ${got.backend}: ${got.reason})`,
    );
  }
  const result: Result = {
    ...v,
    adapter: got.adapter,
    threadsUsed: v.backend === "wasm" ? wasmThreads() : 1,
    peakRssMB: 0,
  };
  const x = (n: number, seed: number) =>
    tf.tidy(() =>
      tf.clipByValue(
        tf.randomNormal([n, 32, 32, 1], 0, 0.5, "float32", seed),
        -1,
        1,
      )
    ) as tf.Tensor4D;
  const schedule = makeSchedule({ T: 1000 });
  const unet = new UNet({ base: v.base, seed: 1 });
  const plain = (x: tf.Tensor4D, t: tf.Tensor1D) => unet.predict(x, t);
  const replayed = v.replay ? replayOnWebGpu(plain) : null;
  const model = replayed ?? plain;
  try {
    if (v.parts.includes("forward")) {
      const xf = x(v.forwardBatch, 1);
      const t = tf.tensor1d(
        Array.from({ length: v.forwardBatch }, (_, i) => (i * 37) % 1000),
        "int32",
      );
      let last: tf.Tensor | null = null;
      if (replayed !== null) {
        // Capture, then the first replay's check.
        for (let i = 0; i < 2; i++) tf.dispose(replayed(xf, t));
        await replayed.settled();
      }
      result.forwardSeconds = await timeLoop(v.reps, () => {
        last?.dispose();
        last = model(xf, t);
        return Promise.resolve();
      }, async () => {
        await last!.data();
      });
      (last as tf.Tensor | null)?.dispose();
      tf.dispose([xf, t]);
    }
    if (v.parts.includes("sample")) {
      result.sampleSeconds = await timeIt(v.reps, async () => {
        const images = await sampleDdim(model, schedule, {
          n: v.sampleBatch,
          imgSize: 32,
          numSteps: v.sampleSteps,
          seed: 0,
        });
        await images.data();
        images.dispose();
      });
    }
    if (v.parts.includes("train")) {
      const x0 = x(v.trainBatch, 2);
      const trainer = new Trainer(unet, schedule, {
        seed: 1,
        workers: v.workers,
      });
      // Each step is started before the previous one's loss is awaited, as
      // TrainingRun does (on WebGPU the trainer queues a step's work ahead
      // of its read back; elsewhere steps wait for each other anyway).
      // DDPM_PERF_AWAIT_STEPS=1: each step awaited before the next starts.
      const awaitEach = Deno.env.get("DDPM_PERF_AWAIT_STEPS") === "1";
      let previous: Promise<unknown> = Promise.resolve();
      try {
        result.trainSeconds = await timeLoop(
          v.reps,
          async () => {
            if (awaitEach) await previous;
            const next = trainer.trainStep(x0);
            await previous;
            previous = next;
          },
          async () => {
            await previous;
            // A read orders after every earlier dispatch, the EMA update included.
            await unet.params.get("out_conv.bias")!.data();
          },
        );
      } finally {
        if (tf.getBackend() === "webgpu") {
          result.trainReplay = trainer.replayStats;
        }
        trainer.dispose();
        x0.dispose();
      }
    }
  } finally {
    if (replayed !== null) {
      result.replayStats = replayed.stats;
      result.replayFallback = replayed.fallback;
      replayed.dispose();
    }
    unet.dispose();
    schedule.dispose();
  }
  result.peakRssMB = peakRssMB();
  return result;
}

/** Native float32 GEMM GFLOP/s from numpy, one thread and all, or null without numpy. */
async function nativeGemm(): Promise<{ one: number; all: number } | null> {
  const code = [
    "import numpy as np, time",
    "a = np.random.rand(2048, 2048).astype(np.float32)",
    "b = a @ a; b = a @ a",
    "t = time.perf_counter(); n = 5",
    "for _ in range(n): b = a @ a",
    "print(2 * 2048**3 * n / (time.perf_counter() - t) / 1e9)",
  ].join("\n");
  const run = async (threads: string | null) => {
    const env: Record<string, string> = threads === null ? {} : {
      OPENBLAS_NUM_THREADS: threads,
      OMP_NUM_THREADS: threads,
      MKL_NUM_THREADS: threads,
    };
    const out = await new Deno.Command("python3", {
      args: ["-c", code],
      env,
      stdout: "piped",
      stderr: "null",
    }).output();
    if (!out.success) return null;
    return Number(new TextDecoder().decode(out.stdout).trim());
  };
  try {
    const one = await run("1");
    const all = await run(null);
    return one === null || all === null ? null : { one, all };
  } catch {
    return null;
  }
}

function fmt(x: number | undefined, digits = 1): string {
  return x === undefined || !Number.isFinite(x) ? "-" : x.toFixed(digits);
}

/** The markdown table of results. */
export function table(
  results: Result[],
  gemm: { one: number; all: number } | null,
  torch: Record<string, number | string>[] = [],
): string {
  const lines = [
    "| backend | forward img/s | forward GFLOP/s | train img/s | train GFLOP/s | DDIM img/s | peak RSS |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ];
  for (const r of results) {
    const config = { inChannels: 1, base: r.base, timeDim: 4 * r.base };
    const ff = unetForwardFlops(config);
    const tfl = unetTrainFlops(config);
    const fImg = r.forwardSeconds && r.forwardBatch / r.forwardSeconds;
    const tImg = r.trainSeconds && r.trainBatch / r.trainSeconds;
    const sImg = r.sampleSeconds && r.sampleBatch / r.sampleSeconds;
    lines.push(
      `| ${r.label} | ${fmt(fImg)} | ${fmt(fImg && (fImg * ff) / 1e9)} | ${
        fmt(tImg, 2)
      } | ${fmt(tImg && (tImg * tfl) / 1e9)} | ${
        fmt(sImg, 2)
      } | ${r.peakRssMB} MB |`,
    );
  }
  for (const t of torch) {
    const base = Number(t.base);
    const config = { inChannels: 1, base, timeDim: 4 * base };
    const fImg = Number(t.forward_img_s);
    const tImg = Number(t.train_img_s);
    lines.push(
      `| PyTorch ${t.device} (reference) | ${fmt(fImg)} | ${
        fmt(fImg * unetForwardFlops(config) / 1e9)
      } | ${fmt(tImg, 2)} | ${fmt(tImg * unetTrainFlops(config) / 1e9)} | ${
        fmt(Number(t.ddim_img_s), 2)
      } | - |`,
    );
  }
  const t0 = torch[0];
  const r0 = results[0] ?? (t0 === undefined ? undefined : {
    base: Number(t0.base),
    forwardBatch: Number(t0.forward_batch),
    trainBatch: Number(t0.train_batch),
    sampleBatch: Number(t0.sample_batch),
    sampleSteps: Number(t0.sample_steps),
  });
  const sizes = r0 === undefined
    ? ""
    : `UNet base ${r0.base}, 32x32x1; forward batch ${r0.forwardBatch}, training batch ${r0.trainBatch} (AdamW, clip, EMA included), DDIM ${r0.sampleSteps} steps on ${r0.sampleBatch} images.`;
  const native = gemm === null
    ? "numpy not available"
    : `${gemm.one.toFixed(0)} GFLOP/s on one core, ${
      gemm.all.toFixed(0)
    } GFLOP/s on all ${navigator.hardwareConcurrency}`;
  return [
    ...lines,
    "",
    `${sizes} Native float32 GEMM (numpy, 2048^2): ${native}. Deno ${Deno.version.deno}, tfjs ${tf.version_core}.`,
  ].join("\n");
}

const USAGE = `USAGE
  deno run -A tests/tools/perf_table.ts [OPTIONS]

OPTIONS
  --backends LIST     wasm,cpu,webgpu (default: wasm, and webgpu on a hardware adapter)
  --base N            UNet base channels (default 32; 64 with --full)
  --forward-batch N   forward batch (default 16)
  --train-batch N     training batch (default 32; 64 with --full)
  --sample-batch N    images sampled (default 8)
  --sample-steps N    DDIM steps (default 10)
  --reps N            timed repetitions after a warm-up (default 2)
  --threads N         wasm threads for the threaded row (default: the core count)
  --full              the issue's sizes: base 64, training batch 64
  --torch FILE        add PyTorch rows from bench_reference.py's JSON
  --json FILE         also write the results as JSON
  --rounds N          measure every variant N times, interleaved, and report
                      the median of each figure (default 1; for noisy hosts)
  --one JSON          measure one variant and print its result (internal)
  -h, --help          this help
`;

async function main(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      backends: { type: "string" },
      base: { type: "string" },
      "forward-batch": { type: "string" },
      "train-batch": { type: "string" },
      "sample-batch": { type: "string" },
      "sample-steps": { type: "string" },
      reps: { type: "string" },
      threads: { type: "string" },
      full: { type: "boolean", default: false },
      torch: { type: "string" },
      json: { type: "string" },
      one: { type: "string" },
      rounds: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  if (values.one !== undefined) {
    const r = await measure(JSON.parse(values.one) as Variant);
    console.log(JSON.stringify(r));
    return 0;
  }
  const num = (s: string | undefined, d: number) =>
    s === undefined ? d : Number(s);
  const cores = navigator.hardwareConcurrency;
  const common = {
    base: num(values.base, values.full ? 64 : 32),
    forwardBatch: num(values["forward-batch"], 16),
    trainBatch: num(values["train-batch"], values.full ? 64 : 32),
    sampleBatch: num(values["sample-batch"], 8),
    sampleSteps: num(values["sample-steps"], 10),
    reps: num(values.reps, 2),
  };
  let backends = values.backends?.split(",").map((s) => s.trim());
  if (backends === undefined) {
    backends = ["wasm"];
    const probe = await initBackend("auto");
    if (probe.backend === "webgpu") backends.push("webgpu");
  }
  const threads = num(values.threads, cores);
  const variants: Variant[] = [];
  const all = ["forward", "train", "sample"] as Variant["parts"];
  for (const b of backends) {
    if (b === "wasm") {
      variants.push({
        ...common,
        label: "wasm, 1 thread",
        backend: "wasm",
        threads: 1,
        workers: 1,
        parts: all,
      });
      if (cores > 1) {
        variants.push({
          ...common,
          label: `wasm, ${cores} workers (training)`,
          backend: "wasm",
          threads: 1,
          workers: "auto",
          parts: ["train"],
        });
      }
      if (threads > 1) {
        variants.push({
          ...common,
          label: `wasm, ${threads} threads (DDPM_WASM_THREADS)`,
          backend: "wasm",
          threads,
          workers: 1,
          parts: all,
        });
      }
    } else if (b === "cpu" || b === "webgpu") {
      variants.push({
        ...common,
        label: b,
        backend: b,
        threads: 1,
        workers: 1,
        parts: all,
      });
      if (b === "webgpu") {
        variants.push({
          ...common,
          label: "webgpu, training steps awaited one by one",
          backend: b,
          threads: 1,
          workers: 1,
          parts: ["train"],
          env: { DDPM_PERF_AWAIT_STEPS: "1" },
        });
        variants.push({
          ...common,
          label: "webgpu, training steps not replayed (DDPM_WEBGPU_REPLAY=0)",
          backend: b,
          threads: 1,
          workers: 1,
          parts: ["train"],
          env: { DDPM_WEBGPU_REPLAY: "0" },
        });
        variants.push({
          ...common,
          label: "webgpu, tfjs's convolutions",
          backend: b,
          threads: 1,
          workers: 1,
          parts: all,
          env: { DDPM_WEBGPU_CONV: "tfjs" },
        });
        variants.push({
          ...common,
          label: "webgpu, replayed (sampling)",
          backend: b,
          threads: 1,
          workers: 1,
          parts: ["forward", "sample"],
          replay: true,
        });
      }
    } else {
      console.error(`unknown backend ${b}`);
      return 2;
    }
  }
  const self = fileURLToPath(import.meta.url);
  const rounds = Number(values.rounds ?? "1");
  if (!(Number.isInteger(rounds) && rounds >= 1)) {
    console.error(`--rounds must be a positive integer (got ${values.rounds})`);
    return 2;
  }
  // Round r measures every variant once, so that a host whose speed drifts
  // (a shared VM) affects all of them alike; each figure is then the median
  // over the rounds.
  const perVariant: Result[][] = variants.map(() => []);
  for (let round = 0; round < rounds; round++) {
    for (const [i, v] of variants.entries()) {
      const r = await measureInChild(self, v, round, rounds);
      if (r !== null) perVariant[i].push(r);
    }
  }
  const results = perVariant.filter((rs) => rs.length > 0).map(medianResult);
  const gemm = await nativeGemm();

  let torch: Record<string, number | string>[] = [];
  if (values.torch !== undefined) {
    try {
      torch = [JSON.parse(await Deno.readTextFile(values.torch))].flat();
    } catch (e) {
      console.error(`no PyTorch rows: cannot read ${values.torch} (${e})`);
    }
  }
  console.log(table(results, gemm, torch));
  if (values.json !== undefined) {
    await Deno.writeTextFile(
      values.json,
      JSON.stringify({ results, gemm, torch }, null, 2) + "\n",
    );
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
