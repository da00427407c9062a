/**
 * Custom WebGPU kernels: the small frame that tfjs's WebGPU backend runs a
 * WGSL program in, and their registration as tfjs kernels (so that
 * `tf.profile`, tidy and the tape see them as any other kernel).
 *
 * A program lists its inputs in `variableNames` (each bound as
 * `var<storage, read> name: array<f32>` and readable as `name[i]`), its
 * `outputShape`, and WGSL in `getUserCode()` defining `fn main(index : i32)`
 * (flat dispatch: one invocation per `index`, test it against
 * `uniforms.size`) that writes with `setOutputAtIndex(i, value)`. Extra
 * uniforms are declared in `uniforms` (`"name : f32, other : i32,"`) and
 * passed as `{ type, data }` records, in that order.
 *
 * @module
 */
import { tf } from "./backend.ts";
import {
  webgpu_util,
  type WebGPUBackend,
} from "@tensorflow/tfjs-backend-webgpu";

/** A uniform value passed to a program, in the order of its `uniforms` declaration. */
export interface ProgramUniform {
  type: "float32" | "int32" | "uint32";
  data: number[];
}

/** What tfjs's WebGPU backend needs of a program. */
export interface WebGpuProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[]; y?: number[]; z?: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number];
  /** Declare `uniforms.size` (the output's element count). */
  size?: boolean;
  /** Components per element of each input binding (4: `array<vec4<f32>>`); default 1. */
  variableComponents?: number[];
  /** Components per element of the output binding; default 1. */
  outputComponent?: number;
  /** Extra uniform declarations. */
  uniforms?: string;
  getUserCode(): string;
}

/**
 * The frame of a program with a flat dispatch over `threads` invocations
 * (default: one per output element) in workgroups of `workgroup`.
 *
 * @param outputShape Shape of the output.
 * @param threads Number of invocations (`uniforms.size` is the output size only when equal).
 * @param workgroup Invocations per workgroup.
 * @returns `outputShape`, `dispatchLayout`, `dispatch`, `workgroupSize`.
 */
export function flatFrame(
  outputShape: number[],
  threads = outputShape.reduce((a, b) => a * b, 1),
  workgroup = 64,
): Pick<
  WebGpuProgram,
  "outputShape" | "dispatchLayout" | "dispatch" | "workgroupSize"
> {
  const workgroupSize: [number, number, number] = [workgroup, 1, 1];
  const layout = webgpu_util.flatDispatchLayout([threads]);
  return {
    outputShape,
    dispatchLayout: layout,
    dispatch: webgpu_util.computeDispatch(layout, [threads], workgroupSize),
    workgroupSize,
  };
}

/**
 * Register a WebGPU-only tfjs kernel that runs one program.
 *
 * @param kernelName A name of ours ("Ddpm...").
 * @param make Builds the program and its uniforms from the inputs and attributes.
 * @returns Nothing; run it with `tf.engine().runKernel(kernelName, inputs, attrs)`.
 */
export function registerProgramKernel(
  kernelName: string,
  make: (
    inputs: tf.TensorInfo[],
    attrs: Record<string, unknown>,
  ) => { program: WebGpuProgram; uniforms?: ProgramUniform[] },
): void {
  if (tf.getKernel(kernelName, "webgpu") !== undefined) return;
  tf.registerKernel({
    kernelName,
    backendName: "webgpu",
    kernelFunc: ({ inputs, backend, attrs }) => {
      const list = Object.values(inputs) as tf.TensorInfo[];
      const { program, uniforms } = make(
        list,
        (attrs ?? {}) as Record<string, unknown>,
      );
      return (backend as unknown as WebGPUBackend).runWebGPUProgram(
        program as never,
        list,
        "float32",
        uniforms,
      );
    },
  });
}
