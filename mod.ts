/**
 * ddpm: train denoising diffusion models and sample them with pluggable
 * solvers, on TensorFlow.js (WebGPU, wasm or cpu) under Deno.
 *
 * @example
 * ```ts
 * import { initBackend, makeSchedule } from "./mod.ts";
 * await initBackend("cpu");
 * const schedule = makeSchedule({ T: 1000, kind: "linear" });
 * console.log(schedule.alphasBar[999] < 1e-4); // true
 * schedule.dispose();
 * ```
 *
 * @module
 */
export {
  type BackendInfo,
  type BackendName,
  initBackend,
  tf,
} from "./core/backend.ts";
export {
  extract,
  makeSchedule,
  qSample,
  type Schedule,
  type ScheduleKind,
  type ScheduleOptions,
} from "./core/schedule.ts";
