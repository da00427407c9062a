/**
 * Where a WebGPU training step spends its time: the adapter's features and
 * limits, the wall time of a forward pass and a training step under several
 * command-buffer batch sizes (tfjs's WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE), and
 * a per-kernel breakdown from `tf.profile` (GPU time per kernel where the
 * adapter offers `timestamp-query`, else dispatch counts only). The sum of
 * kernel times against the wall time says whether a step is bound by the GPU
 * or by the host's dispatch overhead.
 *
 * ```sh
 * deno run -A tests/tools/gpu_profile.ts --base 64 --train-batch 64 --json out.json
 * # forward passes only, for a sampling profiler:
 * deno run -A --v8-flags=--prof tests/tools/gpu_profile.ts --loop 30
 * ```
 *
 * @module
 */
import { parseArgs } from "node:util";
import { initBackend, tf } from "../../core/backend.ts";
import { makeSchedule } from "../../core/schedule.ts";
import { Trainer } from "../../core/train.ts";
import { UNet } from "../../core/unet.ts";
import { median, timeIt } from "./perf_table.ts";

/** Host time spent inside WebGPU API calls, by method, while wrapped. */
const apiTime = new Map<string, { count: number; ms: number }>();
let apiWrapped = false;
/** Whether the wrappers time calls (off: they only forward them). */
let apiOn = false;

/** Wrap the WebGPU classes' methods to count calls and time them. */
function wrapWebGpuApi(): void {
  if (apiWrapped) return;
  apiWrapped = true;
  const g = globalThis as unknown as Record<string, { prototype: object }>;
  for (
    const cls of [
      "GPUDevice",
      "GPUQueue",
      "GPUCommandEncoder",
      "GPUComputePassEncoder",
      "GPUBuffer",
    ]
  ) {
    const proto = g[cls]?.prototype as Record<string, unknown> | undefined;
    if (proto === undefined) continue;
    for (const name of Object.getOwnPropertyNames(proto)) {
      const d = Object.getOwnPropertyDescriptor(proto, name);
      if (!d || typeof d.value !== "function" || name === "constructor") {
        continue;
      }
      const f = d.value as (...a: unknown[]) => unknown;
      const key = `${cls}.${name}`;
      proto[name] = function (this: unknown, ...a: unknown[]) {
        if (!apiOn) return f.apply(this, a);
        const t0 = performance.now();
        const r = f.apply(this, a);
        const row = apiTime.get(key) ?? { count: 0, ms: 0 };
        row.count++;
        row.ms += performance.now() - t0;
        apiTime.set(key, row);
        return r;
      };
    }
  }
}

/** Per-dispatch cost of a chain of tiny element-wise kernels. */
async function dispatchCost(size: number, n: number): Promise<{
  enqueueUs: number;
  totalUs: number;
}> {
  const a = tf.ones([size]);
  let best = { enqueueUs: Infinity, totalUs: Infinity };
  for (let rep = 0; rep < 3; rep++) {
    const t0 = performance.now();
    let x = a;
    for (let i = 0; i < n; i++) {
      const y = tf.add(x, a);
      if (x !== a) x.dispose();
      x = y;
    }
    const t1 = performance.now();
    await x.data();
    const t2 = performance.now();
    x.dispose();
    if (t2 - t0 < best.totalUs * n / 1000) {
      best = { enqueueUs: (t1 - t0) * 1000 / n, totalUs: (t2 - t0) * 1000 / n };
    }
  }
  a.dispose();
  return best;
}

interface KernelRow {
  name: string;
  count: number;
  ms: number;
}

/** Kernel time grouped by kernel name and output shape, largest first. */
async function profileRows(
  f: () => Promise<void>,
): Promise<{ rows: KernelRow[]; kernels: number; kernelMs: number }> {
  const info = await tf.profile(f);
  const byKey = new Map<string, KernelRow>();
  let kernelMs = 0;
  for (const k of info.kernels) {
    const ms = Number(k.kernelTimeMs) || 0;
    kernelMs += ms;
    const key = `${k.name} ${JSON.stringify(k.outputShapes)}`;
    const row = byKey.get(key) ?? { name: key, count: 0, ms: 0 };
    row.count++;
    row.ms += ms;
    byKey.set(key, row);
  }
  const rows = [...byKey.values()].sort((a, b) => b.ms - a.ms);
  return { rows, kernels: info.kernels.length, kernelMs };
}

async function main(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      base: { type: "string", default: "64" },
      "forward-batch": { type: "string", default: "16" },
      "train-batch": { type: "string", default: "64" },
      reps: { type: "string", default: "5" },
      batches: { type: "string", default: "15,64,512" },
      loop: { type: "string" },
      json: { type: "string" },
    },
  });
  const base = Number(values.base);
  const fb = Number(values["forward-batch"]);
  const tb = Number(values["train-batch"]);
  const reps = Number(values.reps);
  // Wrap before the device exists, so that calls the backend routes through
  // its own caches (core/backend.ts) are counted only when they reach WebGPU.
  wrapWebGpuApi();
  const got = await initBackend("webgpu");
  console.log(`backend ${got.backend}: ${got.reason}`);
  if (got.backend !== "webgpu") return 1;
  const backend = tf.backend() as unknown as {
    device: GPUDevice;
    supportTimestampQuery: boolean;
  };
  const features = [...backend.device.features].sort();
  const adapter = await navigator.gpu.requestAdapter({
    powerPreference: "high-performance",
  });
  const adapterFeatures = [...(adapter?.features ?? [])].sort();
  console.log(`adapter features: ${adapterFeatures.join(", ")}`);
  console.log(`adapter: ${got.adapter}`);
  console.log(`device features (as requested): ${features.join(", ")}`);
  const out: Record<string, unknown> = {
    adapter: got.adapter,
    features,
    adapterFeatures,
    base,
    forwardBatch: fb,
    trainBatch: tb,
    wall: [],
  };

  out.dispatch = [];
  for (const size of [16, 262144]) {
    const d = await dispatchCost(size, 1000);
    (out.dispatch as unknown[]).push({ size, ...d });
    console.log(
      `dispatch cost, add of ${size} floats: ${
        d.enqueueUs.toFixed(1)
      } us to enqueue, ${d.totalUs.toFixed(1)} us until done`,
    );
  }

  // The latency of one small kernel and its read back to the host.
  {
    // Above tfjs's CPU hand-off size (1,000), so that the add runs on the GPU.
    const a = tf.ones([4096]);
    const times: number[] = [];
    for (let i = 0; i < 30; i++) {
      const t0 = performance.now();
      const b = tf.add(a, a);
      await b.data();
      times.push(performance.now() - t0);
      b.dispose();
    }
    a.dispose();
    out.readbackMs = median(times);
    console.log(
      `one small kernel and its read back: ${median(times).toFixed(3)} ms`,
    );
  }

  // Where the host time of a chain of large element-wise kernels goes.
  wrapWebGpuApi();
  apiOn = true;
  apiTime.clear();
  const big = await dispatchCost(262144, 300);
  const chain = [...apiTime.entries()].sort((a, b) => b[1].ms - a[1].ms);
  out.chainApi = { perDispatchUs: big.totalUs, rows: chain };
  console.log(
    `add chain of 262144 floats, API wrapped: ${
      big.totalUs.toFixed(1)
    } us per dispatch; calls (3 reps x 300):`,
  );
  for (const [k, r] of chain.slice(0, 8)) {
    console.log(
      `  ${r.ms.toFixed(2).padStart(8)} ms  ${
        String(r.count).padStart(5)
      }x  ${k}`,
    );
  }
  apiTime.clear();
  apiOn = false;

  const schedule = makeSchedule({ T: 1000 });
  const unet = new UNet({ base, seed: 1 });
  const xf = tf.tidy(() =>
    tf.clipByValue(
      tf.randomNormal([fb, 32, 32, 1], 0, 0.5, "float32", 1),
      -1,
      1,
    )
  ) as tf.Tensor4D;
  const tf_ = tf.tensor1d(
    Array.from({ length: fb }, (_, i) => (i * 37) % 1000),
    "int32",
  );
  const x0 = tf.tidy(() =>
    tf.clipByValue(
      tf.randomNormal([tb, 32, 32, 1], 0, 0.5, "float32", 2),
      -1,
      1,
    )
  ) as tf.Tensor4D;
  const trainer = new Trainer(unet, schedule, { seed: 1 });
  const forward = async () => {
    const y = unet.predict(xf, tf_);
    await y.data();
    y.dispose();
  };
  const stepOf = (t: Trainer) => async () => {
    await t.trainStep(x0);
    // A read orders after every earlier dispatch, the EMA update included.
    await unet.params.get("out_conv.bias")!.data();
  };
  const step = stepOf(trainer);
  if (values.loop !== undefined) {
    // Only forward passes, e.g. under a sampling profiler.
    await forward();
    const n = Number(values.loop);
    const t1 = performance.now();
    for (let i = 0; i < n; i++) await forward();
    console.log(
      `${n} forward passes: ${
        ((performance.now() - t1) / n).toFixed(1)
      } ms each`,
    );
    return 0;
  }
  const t0 = performance.now();
  await forward();
  await step();
  console.log(
    `first forward + step (shader compilation): ${
      (performance.now() - t0).toFixed(0)
    } ms`,
  );
  for (const b of values.batches!.split(",").map(Number)) {
    tf.env().set("WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE", b);
    const f = await timeIt(reps, forward) * 1000;
    const s = await timeIt(reps, step) * 1000;
    (out.wall as unknown[]).push({ submitBatch: b, forwardMs: f, trainMs: s });
    console.log(
      `submit batch ${b}: forward(${fb}) ${f.toFixed(1)} ms = ${
        (fb / f * 1000).toFixed(0)
      } img/s; train step(${tb}) ${s.toFixed(1)} ms = ${
        (tb / s * 1000).toFixed(0)
      } img/s`,
    );
  }
  tf.env().set("WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE", 15);
  apiOn = true;
  for (const [label, f] of [["forward", forward], ["train", step]] as const) {
    await f();
    apiTime.clear();
    const t0 = performance.now();
    await f();
    const wall = performance.now() - t0;
    const rows = [...apiTime.entries()].sort((a, b) => b[1].ms - a[1].ms);
    const inApi = rows.reduce((s, [, r]) => s + r.ms, 0);
    out[`${label}Api`] = { wall, inApi, rows };
    console.log(
      `\n${label}: wall ${wall.toFixed(1)} ms, of which ${
        inApi.toFixed(1)
      } ms inside WebGPU calls`,
    );
    for (const [k, r] of rows.slice(0, 12)) {
      console.log(
        `  ${r.ms.toFixed(2).padStart(8)} ms  ${
          String(r.count).padStart(5)
        }x  ${k}`,
      );
    }
  }
  apiOn = false;
  console.log(`\ntrainer's replays: ${JSON.stringify(trainer.replayStats)}`);
  // A replayed step runs no tfjs kernel, so the per-kernel breakdown takes
  // steps through tfjs: a second trainer on the same model, not replayed.
  const plain = new Trainer(unet, schedule, { seed: 1, replay: false });
  const plainStep = stepOf(plain);
  for (
    const [key, label, f] of [
      ["forward", "forward", forward],
      ["train", "train (not replayed)", plainStep],
    ] as const
  ) {
    await f(); // the plain trainer's first step packs its state
    const p = await profileRows(f);
    out[`${key}Profile`] = p;
    console.log(
      `\n${label}: ${p.kernels} kernels, GPU time ${
        p.kernelMs.toFixed(1)
      } ms (timestamp-query ${backend.supportTimestampQuery})`,
    );
    for (const r of p.rows.slice(0, 25)) {
      console.log(
        `  ${r.ms.toFixed(2).padStart(8)} ms  ${
          String(r.count).padStart(4)
        }x  ${r.name}`,
      );
    }
  }
  trainer.dispose();
  plain.dispose();
  unet.dispose();
  schedule.dispose();
  tf.dispose([xf, tf_, x0]);
  if (values.json) {
    await Deno.writeTextFile(values.json, JSON.stringify(out, null, 2) + "\n");
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
