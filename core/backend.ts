/**
 * The TensorFlow.js instance the library computes with, and backend choice.
 *
 * `tf` is re-exported so that callers build tensors on the same instance.
 * {@linkcode initBackend} picks WebGPU on a hardware adapter, the wasm
 * (SIMD) backend otherwise, and the pure-JS cpu backend on request.
 *
 * @module
 */
import * as tf from "@tensorflow/tfjs-core";
import "@tensorflow/tfjs-backend-cpu";
import "@tensorflow/tfjs-backend-wasm";
import {
  chunkAddN,
  FastUploadBackend,
  reuseDeviceObjects,
} from "./_webgpu_backend.ts";
// Lets DDPM_WASM_THREADS / setWasmThreads start wasm multithreaded under Deno.
import "./wasm_threads.ts";

/** The TensorFlow.js (tfjs-core 4.22.0) namespace the library computes with: build tensors with it. */
export { tf };

// tfjs registers its own WebGPU backend on import; under Deno that
// registration breaks on real GPUs (tfjs issue 8518). Drop it so that the
// default is wasm until initBackend registers WebGPU on a device of ours.
if (tf.engine().registryFactory["webgpu"] !== undefined) {
  tf.removeBackend("webgpu");
}
chunkAddN();
// Silence tfjs's "install tfjs-node" banner: Deno looks like Node to it.
tf.env().set("PROD", true);

/** The backends {@linkcode initBackend} accepts. */
export type BackendName = "auto" | "webgpu" | "wasm" | "cpu";

/** What {@linkcode initBackend} got. */
export interface BackendInfo {
  /** The tfjs backend now active: "webgpu", "wasm" or "cpu". */
  backend: "webgpu" | "wasm" | "cpu";
  /** The WebGPU adapter's description, or null when none was used or found. */
  adapter: string | null;
  /** Whether the WebGPU adapter is a software fallback (Mesa's llvmpipe, SwiftShader, WARP). */
  softwareAdapter: boolean;
  /** True when the backend asked for could not be had and another was taken. */
  fellBack: boolean;
  /** One line saying why this backend was chosen. */
  reason: string;
}

interface AdapterProbe {
  adapter: GPUAdapter;
  description: string;
  software: boolean;
}

const SOFTWARE_ADAPTERS =
  /llvmpipe|lavapipe|softpipe|swiftshader|warp|microsoft basic render/i;

function describeAdapter(info: GPUAdapterInfo): string {
  const parts = [info.description, info.vendor, info.architecture, info.device]
    .filter((s) => s && s !== "0");
  return parts.length > 0 ? parts.join(" / ") : "unknown adapter";
}

async function probeAdapter(): Promise<AdapterProbe | null> {
  const gpu = (globalThis.navigator as Navigator | undefined)?.gpu;
  if (!gpu) return null;
  let adapter: GPUAdapter | null = null;
  try {
    adapter = await gpu.requestAdapter({ powerPreference: "high-performance" });
  } catch {
    return null;
  }
  if (!adapter) return null;
  const info = adapter.info;
  const fallback =
    (info as { isFallbackAdapter?: boolean }).isFallbackAdapter === true;
  const description = describeAdapter(info);
  return {
    adapter,
    description,
    software: fallback || SOFTWARE_ADAPTERS.test(description),
  };
}

let webgpuDevice: GPUDevice | null = null;

/**
 * Register tfjs's WebGPU backend on a device we create ourselves.
 *
 * tfjs's stock registration fails under Deno on real GPUs (tfjs issue 8518),
 * so it is removed and replaced. The backend must be registered as "webgpu":
 * tfjs keys its WebGPU kernels by that name.
 */
async function registerWebGpu(probe: AdapterProbe): Promise<void> {
  if (webgpuDevice !== null && tf.findBackend("webgpu") !== null) return;
  const limits = probe.adapter.limits;
  const requiredLimits: Record<string, number> = {
    maxComputeWorkgroupStorageSize: limits.maxComputeWorkgroupStorageSize,
    maxComputeWorkgroupsPerDimension: limits.maxComputeWorkgroupsPerDimension,
    maxStorageBufferBindingSize: limits.maxStorageBufferBindingSize,
    maxBufferSize: limits.maxBufferSize,
    maxComputeWorkgroupSizeX: limits.maxComputeWorkgroupSizeX,
    maxComputeInvocationsPerWorkgroup: limits.maxComputeInvocationsPerWorkgroup,
    // tfjs's Concat takes this many inputs, less one, per dispatch; the
    // default of 8 splits the trainer's concatenation of 86 gradients into
    // about 15 dispatches.
    maxStorageBuffersPerShaderStage: Math.min(
      limits.maxStorageBuffersPerShaderStage,
      128,
    ),
  };
  // Kernel timing in tf.profile / tf.time needs timestamp queries.
  const requiredFeatures = (["timestamp-query"] as GPUFeatureName[]).filter((
    f,
  ) => probe.adapter.features.has(f));
  const device = await probe.adapter.requestDevice({
    requiredLimits,
    requiredFeatures,
  });
  reuseDeviceObjects(device);
  if (tf.engine().registryFactory["webgpu"] !== undefined) {
    tf.removeBackend("webgpu");
  }
  const info = probe.adapter.info;
  tf.registerBackend("webgpu", () => new FastUploadBackend(device, info));
  webgpuDevice = device;
}

/**
 * Activate a CPU backend without asking for a WebGPU adapter: for worker
 * threads, where an adapter opened only to be described is one more
 * graphics-driver instance to tear down at exit (Mesa's, on a machine
 * without a GPU).
 *
 * @param name "wasm" or "cpu"; wasm falls back to cpu if it fails to start.
 * @returns The backend now active.
 */
export async function activateCpuBackend(
  name: "wasm" | "cpu",
): Promise<"wasm" | "cpu"> {
  if (await activate(name)) return name;
  if (name === "wasm" && await activate("cpu")) return "cpu";
  throw new Error(`Cannot initialise backend: ${name} failed to start`);
}

async function activate(name: "webgpu" | "wasm" | "cpu"): Promise<boolean> {
  try {
    const ok = await tf.setBackend(name);
    await tf.ready();
    return ok && tf.getBackend() === name;
  } catch {
    return false;
  }
}

/**
 * Choose and activate the tfjs backend.
 *
 * "auto" takes WebGPU on a hardware adapter and wasm otherwise: on a
 * software adapter (llvmpipe) wasm runs the UNet more than 10x faster. Asking for
 * "webgpu" where no adapter exists falls back to wasm and says so.
 *
 * @param name The backend to use; "auto" by default.
 * @returns The backend obtained, the adapter, and why.
 * @example
 * ```ts
 * import { initBackend } from "./backend.ts";
 * const got = await initBackend("cpu");
 * console.log(got.backend); // "cpu"
 * ```
 */
export async function initBackend(
  name: BackendName = "auto",
): Promise<BackendInfo> {
  if (!["auto", "webgpu", "wasm", "cpu"].includes(name)) {
    throw new RangeError(
      `Cannot initialise backend: unknown name (got "${name}", expected auto, webgpu, wasm or cpu)`,
    );
  }
  if (name === "cpu" || name === "wasm") {
    const probe = await probeAdapter().catch(() => null);
    const backend = await activateCpuBackend(name);
    return {
      backend,
      adapter: probe?.description ?? null,
      softwareAdapter: probe?.software ?? false,
      fellBack: backend !== name,
      reason: backend === name
        ? `${name} was asked for`
        : "the wasm backend failed to start; using the cpu backend",
    };
  }
  const probe = await probeAdapter();
  const wantGpu = name === "webgpu" || (probe !== null && !probe.software);
  if (probe !== null && wantGpu) {
    try {
      await registerWebGpu(probe);
      if (await activate("webgpu")) {
        return {
          backend: "webgpu",
          adapter: probe.description,
          softwareAdapter: probe.software,
          fellBack: false,
          reason: name === "webgpu"
            ? "webgpu was asked for"
            : `auto: hardware WebGPU adapter found (${probe.description})`,
        };
      }
    } catch {
      // fall through to wasm below
    }
  }
  const why = probe === null
    ? "no WebGPU adapter found"
    : probe.software
    ? `the WebGPU adapter is a software fallback (${probe.description}), where wasm is more than 10x faster`
    : `the WebGPU backend failed to start on ${probe.description}`;
  if (await activate("wasm")) {
    return {
      backend: "wasm",
      adapter: probe?.description ?? null,
      softwareAdapter: probe?.software ?? false,
      fellBack: name === "webgpu",
      reason: `${name}: ${why}; using wasm`,
    };
  }
  await activate("cpu");
  return {
    backend: "cpu",
    adapter: probe?.description ?? null,
    softwareAdapter: probe?.software ?? false,
    fellBack: true,
    reason: `${name}: ${why}, and wasm failed to start; using cpu`,
  };
}
