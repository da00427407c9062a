/**
 * Sampler wall times with the same small UNet (base 16, 32x32, one image):
 * DDPM over all 1000 steps against DDIM at 50, 20 and 10 steps and
 * DPM-Solver++(2M) at 20 and 10 steps. Each runs once (n: 1, no warm-up,
 * after one untimed forward pass compiles the kernels); the ratios to DDPM
 * are the result, and they track the number of model calls.
 *
 * Run with `deno bench -A tests/samplers_bench.ts`; under a minute on wasm
 * with two cores. The backend is `initBackend("auto")`'s choice, or
 * DDPM_BENCH_BACKEND ("wasm", "cpu", "webgpu").
 *
 * @module
 */
import { type BackendName, initBackend, tf } from "../core/backend.ts";
import { makeSchedule } from "../core/schedule.ts";
import { UNet } from "../core/unet.ts";
import { sampleDdpm } from "../samplers/ddpm.ts";
import { sampleDdim } from "../samplers/ddim.ts";
import { sampleDpmSolver } from "../samplers/dpm_solver.ts";

const got = await initBackend(
  (Deno.env.get("DDPM_BENCH_BACKEND") ?? "auto") as BackendName,
);
console.error(`samplers bench on ${got.backend} (${got.reason})`);

const schedule = makeSchedule({ T: 1000 });
const unet = new UNet({ base: 16, seed: 0 });
const common = { n: 1, imgSize: 32, seed: 0 };

{
  // compile the kernels once, outside the timings
  const x = tf.zeros([1, 32, 32, 1]) as tf.Tensor4D;
  const t = tf.tensor1d([999], "int32");
  const eps = unet.predict(x, t);
  await eps.data();
  tf.dispose([x, t, eps]);
}

/** Sample, read the result back (so device time counts), and free it. */
async function timed(run: () => Promise<tf.Tensor4D>): Promise<void> {
  const images = await run();
  await images.data();
  images.dispose();
}

const once = { group: "samplers", n: 1, warmup: 0 };

Deno.bench({
  ...once,
  name: "ddpm 1000 steps",
  baseline: true,
  fn: () => timed(() => sampleDdpm(unet, schedule, common)),
});
for (const numSteps of [50, 20, 10]) {
  Deno.bench({
    ...once,
    name: `ddim ${numSteps} steps`,
    fn: () => timed(() => sampleDdim(unet, schedule, { ...common, numSteps })),
  });
}
for (const numSteps of [20, 10]) {
  Deno.bench({
    ...once,
    name: `dpm_solver ${numSteps} steps`,
    fn: () =>
      timed(() => sampleDpmSolver(unet, schedule, { ...common, numSteps })),
  });
}
