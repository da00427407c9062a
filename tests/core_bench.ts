/**
 * Core benchmarks: UNet forward (batch 1 and 16) and one training step
 * (batch 32) at base 16 and 32, on 32x32 single-channel images, on every
 * backend that starts here (cpu, wasm, webgpu).
 *
 * Run with `deno bench -A tests/core_bench.ts`. Each group compares the
 * backends for one workload, wasm as the baseline. Every iteration awaits
 * its result (a device read), so GPU time counts.
 *
 * Sized to run in about five minutes on a two-core machine without a GPU
 * (WebGPU there is Mesa's llvmpipe): iterations that take seconds are
 * measured once or twice, and the cpu backend's training step at base 32
 * (about a minute per step there) is left out unless DDPM_BENCH_ALL is
 * set. DDPM_BENCH_BACKENDS (e.g. "wasm,webgpu") chooses the backends.
 *
 * @module
 */
import { initBackend, tf } from "../core/backend.ts";
import { makeSchedule, type Schedule } from "../core/schedule.ts";
import { Trainer } from "../core/train.ts";
import { UNet } from "../core/unet.ts";

type Backend = "wasm" | "cpu" | "webgpu";

const SIZE = 32;
const WANTED = (Deno.env.get("DDPM_BENCH_BACKENDS") ?? "wasm,cpu,webgpu")
  .split(",").map((s) => s.trim()) as Backend[];

/** The backends that start as themselves (no fallback), with the adapter for the report. */
const available: Backend[] = [];
for (const name of WANTED) {
  try {
    const got = await initBackend(name);
    if (got.backend === name && !got.fellBack) {
      available.push(name);
      if (name === "webgpu") {
        console.error(`webgpu adapter: ${got.adapter}`);
      }
    }
  } catch {
    // skip a backend that does not start
  }
}

async function use(backend: Backend): Promise<void> {
  if (tf.getBackend() !== backend) await tf.setBackend(backend);
}

/** Per-backend resources, built on the backend they run on the first time a bench needs them. */
const cache = new Map<string, unknown>();
function once<T>(key: string, make: () => T): T {
  if (!cache.has(key)) cache.set(key, make());
  return cache.get(key) as T;
}

function batch(n: number, seed: number): tf.Tensor4D {
  return tf.tidy(() =>
    tf.clipByValue(
      tf.randomNormal([n, SIZE, SIZE, 1], 0, 0.5, "float32", seed),
      -1,
      1,
    )
  ) as tf.Tensor4D;
}

interface ForwardSetup {
  unet: UNet;
  x: tf.Tensor4D;
  t: tf.Tensor1D;
}

interface TrainSetup {
  unet: UNet;
  schedule: Schedule;
  trainer: Trainer;
  x0: tf.Tensor4D;
}

const FORWARD: [base: number, n: number][] = [[16, 1], [16, 16], [32, 1], [
  32,
  16,
]];
const TRAIN: [base: number, n: number][] = [[16, 32], [32, 32]];

/** Slow combinations left out unless asked for (see the module notes). */
function skipped(backend: Backend, kind: string, base: number): boolean {
  return Deno.env.get("DDPM_BENCH_ALL") === undefined && backend === "cpu" &&
    kind === "train" && base === 32;
}

/**
 * Measured iterations, from what one iteration costs on two cores: many for
 * the fast ones, one for those that take ten seconds or more (cpu and
 * llvmpipe training steps, the cpu forward at base 32 and batch 16).
 */
function iterations(
  backend: Backend,
  kind: "forward" | "train",
  base: number,
  n: number,
): number {
  if (backend === "wasm") return kind === "forward" && n === 1 ? 20 : 3;
  if (kind === "train") return 1;
  if (n === 1) return 10;
  return backend === "cpu" && base === 32 ? 1 : 2;
}

for (const [base, n] of FORWARD) {
  const group = `UNet forward, base ${base}, batch ${n}`;
  for (const backend of available) {
    Deno.bench({
      name: `${backend}: forward base ${base} batch ${n}`,
      group,
      baseline: backend === "wasm",
      n: iterations(backend, "forward", base, n),
      warmup: 1,
      async fn(b) {
        await use(backend);
        const s = once<ForwardSetup>(`f${backend}${base}${n}`, () => ({
          unet: new UNet({ base, seed: 1 }),
          x: batch(n, 1),
          t: tf.tensor1d(Array.from({ length: n }, (_, i) => i * 37), "int32"),
        }));
        b.start();
        const y = s.unet.predict(s.x, s.t);
        await y.data();
        b.end();
        y.dispose();
      },
    });
  }
}

for (const [base, n] of TRAIN) {
  const group = `training step, base ${base}, batch ${n}`;
  for (const backend of available) {
    if (skipped(backend, "train", base)) continue;
    Deno.bench({
      name: `${backend}: train step base ${base} batch ${n}`,
      group,
      baseline: backend === "wasm",
      n: iterations(backend, "train", base, n),
      warmup: 1,
      async fn(b) {
        await use(backend);
        const s = once<TrainSetup>(`t${backend}${base}${n}`, () => {
          const unet = new UNet({ base, seed: 1 });
          const schedule = makeSchedule({ T: 1000 });
          return {
            unet,
            schedule,
            trainer: new Trainer(unet, schedule, { seed: 1 }),
            x0: batch(n, 2),
          };
        });
        b.start();
        await s.trainer.trainStep(s.x0);
        // The AdamW and EMA updates are queued after the step's one read: wait for them too.
        // A read orders after every earlier dispatch, the EMA update included.
        await s.trainer.model.params.get("out_conv.bias")!.data();
        b.end();
      },
    });
  }
}
