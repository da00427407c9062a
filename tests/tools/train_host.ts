/**
 * The host's time per WebGPU training step, replayed or not: from
 * `trainStep` until the step's read back is issued, less the time inside
 * `queue.submit` (where a software adapter such as llvmpipe computes), and
 * the whole step less `submit`. The batch is tiny (2 images of 8 x 8) so
 * that the GPU's share is small; the host's work per step does not depend
 * on it.
 *
 * ```sh
 * deno run -A tests/tools/train_host.ts --base 64            # replayed
 * deno run -A tests/tools/train_host.ts --base 64 --plain    # through tfjs
 * ```
 *
 * @module
 */
import { parseArgs } from "node:util";
import { initBackend, tf } from "../../core/backend.ts";
import { makeSchedule } from "../../core/schedule.ts";
import { Trainer } from "../../core/train.ts";
import { UNet } from "../../core/unet.ts";
import { median } from "./perf_table.ts";

const { values } = parseArgs({
  options: {
    base: { type: "string", default: "64" },
    steps: { type: "string", default: "10" },
    plain: { type: "boolean", default: false },
  },
});
const got = await initBackend("webgpu");
if (got.backend !== "webgpu") {
  console.error(`Cannot measure: no WebGPU adapter (got ${got.backend})`);
  Deno.exit(1);
}
const unet = new UNet({ base: Number(values.base), seed: 0 });
const schedule = makeSchedule({ T: 1000 });
const x = tf.randomNormal([2, 8, 8, 1], 0, 1, "float32", 3) as tf.Tensor4D;
const trainer = new Trainer(unet, schedule, {
  seed: 1,
  replay: !values.plain,
});
// Shader compilation, packing and the recording.
for (let i = 0; i < 4; i++) await trainer.trainStep(x);

let inSubmit = 0;
const submit = GPUQueue.prototype.submit;
GPUQueue.prototype.submit = function (this: GPUQueue, buffers) {
  const t0 = performance.now();
  try {
    return submit.call(this, buffers);
  } finally {
    inSubmit += performance.now() - t0;
  }
};
let readAt = 0;
const mapAsync = GPUBuffer.prototype.mapAsync;
GPUBuffer.prototype.mapAsync = function (this: GPUBuffer, ...args) {
  readAt = performance.now();
  return mapAsync.apply(this, args);
};
const queued: number[] = [];
const whole: number[] = [];
for (let i = 0; i < Number(values.steps); i++) {
  const s0 = inSubmit;
  const t0 = performance.now();
  await trainer.trainStep(x);
  const submitted = inSubmit - s0;
  whole.push(performance.now() - t0 - submitted);
  queued.push(readAt - t0 - submitted);
}
GPUQueue.prototype.submit = submit;
GPUBuffer.prototype.mapAsync = mapAsync;
console.log(
  `base ${values.base}, ${values.plain ? "through tfjs" : "replayed"}: ` +
    `host until the read back ${median(queued).toFixed(1)} ms, ` +
    `whole step ${median(whole).toFixed(1)} ms (medians of ${queued.length}, ` +
    `submit excluded); ${JSON.stringify(trainer.replayStats)}`,
);
trainer.dispose();
unet.dispose();
schedule.dispose();
x.dispose();
