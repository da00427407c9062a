/**
 * The sampler plugins: the contract, the registry (with the built-in
 * solvers registered), each solver, DDIM inversion and the shared grids.
 *
 * @example
 * ```ts
 * import { getSampler, listSamplers } from "./mod.ts";
 * import { initBackend, makeSchedule, tf } from "../mod.ts";
 * await initBackend("cpu");
 * console.log(listSamplers().map((s) => s.name)); // ["ddpm", "ddim", "dpm_solver", "euler", "heun"]
 * const schedule = makeSchedule();
 * const model = (x: tf.Tensor4D) => tf.mul(x, 0.5) as tf.Tensor4D; // stand-in eps model
 * const x = await getSampler("ddim").sample(model, schedule, { n: 1, imgSize: 8, numSteps: 10 });
 * x.dispose();
 * schedule.dispose();
 * ```
 *
 * @module
 */
export {
  type AnySampleOptions,
  type EpsModel,
  type EpsPredictor,
  getSampler,
  listSamplers,
  type ModelLike,
  registerSampler,
  type SampleOptions,
  type SamplerPlugin,
  type StepInfo,
} from "./registry.ts";
export {
  type BooleanOptionSpec,
  type ChoiceOptionSpec,
  COMMON_OPTIONS,
  type IntOptionSpec,
  type NumberOptionSpec,
  type OptionSpec,
  type OptionsSchema,
  type OptionValues,
  parseOptionValue,
  validateOptions,
  validateSamplerOptions,
} from "./options.ts";
export {
  makeDdimTimesteps,
  makeSolverSteps,
  makeTimesteps,
  type SolverStep,
  type Spacing,
  SPACINGS,
  type TimestepOptions,
} from "./math.ts";
export { type DdpmOptions, sampleDdpm } from "./ddpm.ts";
export { type DdimOptions, sampleDdim } from "./ddim.ts";
export { type DpmSolverOptions, sampleDpmSolver } from "./dpm_solver.ts";
export { type EulerOptions, sampleEuler } from "./euler.ts";
export { sampleHeun } from "./heun.ts";
export { invertDdim, type InvertOptions, slerp } from "./ddim_inversion.ts";
