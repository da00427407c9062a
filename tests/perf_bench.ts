/**
 * Performance benchmarks: UNet forward, training step and every sampler at
 * base 16, 32 and 64 on 32x32 single-channel images, on one backend, with
 * the ways this library uses several cores compared in the same run.
 *
 * Run with `deno bench -A tests/perf_bench.ts` (about five minutes on wasm
 * with two busy cores). Environment:
 *
 * - DDPM_BENCH_BACKEND: "wasm" (default), "cpu" or "webgpu".
 * - DDPM_BENCH_HEAVY=1: add the issue's target sizes (training base 64
 *   batch 64, forward base 64 batch 64) and every sampler at base 32 and 64.
 * - DDPM_WASM_THREADS=k: run wasm as tfjs's threaded-SIMD build with k
 *   threads (see core/wasm_threads.ts); compare against a run without.
 *
 * Groups and their baselines:
 *
 * - "forward, base B": batch 1 and 16 (64 with HEAVY); batch 16 is the baseline.
 * - "training step, base B, batch N": one thread (baseline) against
 *   `workers: "auto"` (the batch split over Deno workers; on wasm or cpu).
 * - "samplers, base 16": each solver with ten steps (DDPM on a ten-step
 *   schedule, Heun's ten steps making 19 model calls) on 8 images, DDIM
 *   the baseline; base 32 and 64 get DDIM alone unless HEAVY.
 *
 * Every iteration awaits its result (a device read), so GPU time counts;
 * training iterations also wait for the AdamW and EMA updates. The
 * trainers' workers live until `deno bench` ends the process.
 *
 * @module
 */
import { type BackendName, initBackend, tf } from "../core/backend.ts";
import { makeSchedule, type Schedule } from "../core/schedule.ts";
import { Trainer } from "../core/train.ts";
import { UNet } from "../core/unet.ts";
import { wasmThreads } from "../core/wasm_threads.ts";
import { sampleDdpm } from "../samplers/ddpm.ts";
import { sampleDdim } from "../samplers/ddim.ts";
import { sampleDpmSolver } from "../samplers/dpm_solver.ts";
import { sampleEuler } from "../samplers/euler.ts";
import { sampleHeun } from "../samplers/heun.ts";

const SIZE = 32;
const HEAVY = (Deno.env.get("DDPM_BENCH_HEAVY") ?? "") !== "";
const wanted = (Deno.env.get("DDPM_BENCH_BACKEND") ?? "wasm") as BackendName;
const got = await initBackend(wanted);
const hostBackend = got.backend === "wasm" || got.backend === "cpu";
console.error(
  `perf bench on ${got.backend}${
    got.backend === "wasm" ? ` (${wasmThreads()} thread(s))` : ""
  }; ${got.reason}; cores ${navigator.hardwareConcurrency}${
    HEAVY ? "; heavy cases on" : ""
  }`,
);

/** Resources built the first time a bench needs them, kept for the run. */
const cache = new Map<string, unknown>();
function once<T>(key: string, make: () => T): T {
  if (!cache.has(key)) cache.set(key, make());
  return cache.get(key) as T;
}

function unet(base: number): UNet {
  return once(`unet${base}`, () => new UNet({ base, seed: 1 }));
}

function schedule(T = 1000): Schedule {
  return once(`schedule${T}`, () => makeSchedule({ T }));
}

function batch(n: number, seed: number): tf.Tensor4D {
  return once(`x${n}/${seed}`, () =>
    tf.tidy(() =>
      tf.clipByValue(
        tf.randomNormal([n, SIZE, SIZE, 1], 0, 0.5, "float32", seed),
        -1,
        1,
      )
    ) as tf.Tensor4D);
}

function timesteps(n: number): tf.Tensor1D {
  return once(
    `t${n}`,
    () =>
      tf.tensor1d(
        Array.from({ length: n }, (_, i) => (i * 37) % 1000),
        "int32",
      ),
  );
}

/**
 * Measured iterations from the rough cost of one (seconds on two wasm
 * cores): many for the cheap ones, one for those that take several seconds.
 */
function reps(seconds: number): number {
  return seconds < 0.2 ? 10 : seconds < 1 ? 4 : seconds < 4 ? 2 : 1;
}

/** Rough seconds per forward image on wasm, one thread, by base. */
const FORWARD_SECONDS: Record<number, number> = {
  16: 0.006,
  32: 0.02,
  64: 0.08,
};

// ------------------------------------------------------------- forward

for (const base of [16, 32, 64]) {
  const sizes = HEAVY ? [1, 16, 64] : [1, 16];
  for (const n of sizes) {
    Deno.bench({
      name: `forward base ${base} batch ${n}`,
      group: `forward, base ${base}`,
      baseline: n === 16,
      n: reps(FORWARD_SECONDS[base] * n),
      warmup: 1,
      async fn(b) {
        const model = unet(base);
        const x = batch(n, 1);
        const t = timesteps(n);
        b.start();
        const y = model.predict(x, t);
        await y.data();
        b.end();
        y.dispose();
      },
    });
  }
}

// ------------------------------------------------------- training step

const TRAIN: [base: number, n: number][] = [[16, 32], [32, 32], [64, 32]];
if (HEAVY) TRAIN.push([64, 64]);
for (const [base, n] of TRAIN) {
  const variants: ("one" | "auto")[] = hostBackend &&
      navigator.hardwareConcurrency > 1
    ? ["one", "auto"]
    : ["one"];
  for (const variant of variants) {
    const label = variant === "one" ? "1 thread" : "workers auto";
    Deno.bench({
      name: `train base ${base} batch ${n}, ${label}`,
      group: `training step, base ${base}, batch ${n}`,
      baseline: variant === "one",
      n: reps(3 * FORWARD_SECONDS[base] * n),
      // The first step of a trainer with workers also starts them.
      warmup: 1,
      async fn(b) {
        const s = once(`trainer${base}/${n}/${variant}`, () => {
          // A UNet of its own: the trainers must not step each other's weights.
          const model = new UNet({ base, seed: 1 });
          return {
            model,
            trainer: new Trainer(model, schedule(), {
              seed: 1,
              workers: variant === "one" ? 1 : "auto",
            }),
          };
        });
        const x0 = batch(n, 2);
        b.start();
        await s.trainer.trainStep(x0);
        // A read orders after every earlier dispatch, the EMA update included.
        await s.trainer.model.params.get("out_conv.bias")!.data();
        b.end();
      },
    });
  }
}

// ------------------------------------------------------------ samplers

type Sampler = (
  model: UNet,
  schedule: Schedule,
  options: { n: number; imgSize: number; seed: number; numSteps: number },
) => Promise<tf.Tensor4D>;

/** Each solver with ten steps; DDPM walks a ten-step schedule. */
const SAMPLERS: [name: string, calls: number, run: Sampler][] = [
  ["ddim", 10, (m, _s, o) => sampleDdim(m, schedule(), o)],
  [
    "ddpm",
    10,
    (m, _s, { numSteps: _, ...o }) => sampleDdpm(m, schedule(10), o),
  ],
  ["dpm-solver++", 10, (m, _s, o) => sampleDpmSolver(m, schedule(), o)],
  ["euler", 10, (m, _s, o) => sampleEuler(m, schedule(), o)],
  ["heun", 19, (m, _s, o) => sampleHeun(m, schedule(), o)],
];
const SAMPLE_N = 8;

for (const base of [16, 32, 64]) {
  const solvers = base === 16 || HEAVY ? SAMPLERS : SAMPLERS.slice(0, 1);
  for (const [name, calls, run] of solvers) {
    Deno.bench({
      name: `${name} 10 steps, base ${base}, ${SAMPLE_N} images`,
      group: `samplers, base ${base}`,
      baseline: name === "ddim",
      n: reps(FORWARD_SECONDS[base] * SAMPLE_N * calls),
      warmup: 0,
      async fn(b) {
        const model = unet(base);
        b.start();
        const images = await run(model, schedule(), {
          n: SAMPLE_N,
          imgSize: SIZE,
          seed: 0,
          numSteps: 10,
        });
        await images.data();
        b.end();
        images.dispose();
      },
    });
  }
}
