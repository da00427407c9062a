/**
 * tfjs's WebGPU backend made cheaper on the host, without changing what the
 * GPU computes: uploads through `queue.writeBuffer`, uniform buffers kept
 * per content, a buffer pool that hands out the same buffers step after
 * step, and bind groups reused. Each tfjs dispatch costs the host about
 * 0.1 ms under Deno on NVIDIA's Vulkan driver (bind group, uniform write,
 * encoding), which bounds a training step more than the GPU does; see the
 * README's performance section.
 *
 * @module
 */
import * as tf from "@tensorflow/tfjs-core";
import { WebGPUBackend } from "@tensorflow/tfjs-backend-webgpu";

/** The parts of tfjs's WebGPU backend that {@linkcode FastUploadBackend} touches. */
interface WebGpuInternals {
  tensorMap: {
    get(dataId: object): {
      resource: unknown;
      values: ArrayLike<number> | null;
      dtype: string;
      shape: number[];
    };
  };
  bufferManager: {
    acquireBuffer(
      size: number,
      usage: number,
      mappedAtCreation?: boolean,
      reuse?: boolean,
    ): GPUBuffer;
    freeBuffers: Map<string, GPUBuffer[]>;
  };
  queue: GPUQueue;
}

/** A number per object, in the order first seen. */
const objectIds = new WeakMap<object, number>();
let nextObjectId = 1;
function objectId(o: object): number {
  let v = objectIds.get(o);
  if (v === undefined) {
    v = nextObjectId++;
    objectIds.set(o, v);
  }
  return v;
}

/**
 * Make tfjs's buffer pool hand out, of the free buffers of a size, the one
 * first seen, instead of the last freed. The pool then assigns the same
 * buffers to the same dispatches step after step, so that the bind groups
 * and uniform contents repeat and {@linkcode reuseDeviceObjects} can reuse
 * them; what is computed does not change.
 */
function pickLowestFreeBuffer(backend: WebGpuInternals): void {
  const pool = backend.bufferManager;
  const acquire = pool.acquireBuffer.bind(pool);
  pool.acquireBuffer = (
    size,
    usage,
    mappedAtCreation = false,
    reuse = true,
  ) => {
    const free = pool.freeBuffers.get(`${size}_${usage}`);
    if (reuse && free !== undefined && free.length > 1) {
      // tfjs pops from the end: put the lowest-numbered buffer there.
      let best = free.length - 1;
      for (let i = 0; i < free.length - 1; i++) {
        if (objectId(free[i]) < objectId(free[best])) best = i;
      }
      const last = free.length - 1;
      [free[best], free[last]] = [free[last], free[best]];
    }
    return acquire(size, usage, mappedAtCreation, reuse);
  };
}

/** A program's uniform values, as tfjs passes them to `makeUniforms`. */
export type UniformData = { type: string; data: number[] }[];

/**
 * The bytes of a program's uniforms, laid out as tfjs's WebGPU backend
 * lays them out (WGSL alignment of i32/f32 scalars and vectors of 2 to 6;
 * vec5 and vec6 are padded to 16-byte alignment), from its `makeUniforms`.
 */
export function uniformBytes(uniforms: UniformData): ArrayBuffer {
  let offset = 0;
  let previousLength = 0;
  let maxAlignment = 1;
  const offsets: number[] = [];
  for (const d of uniforms) {
    if (d.data.length === 0) d.data = [1];
    const n = d.data.length;
    let alignment = n === 1 ? 4 : n === 2 ? 8 : 16;
    if (n > 6) {
      throw new RangeError(
        `Cannot lay out uniforms: a value has too many components (got ${n}, expected at most 6)`,
      );
    }
    if (previousLength === 5 || previousLength === 6) alignment = 16;
    maxAlignment = Math.max(maxAlignment, alignment);
    offset = Math.ceil(offset / alignment) * alignment;
    previousLength = n;
    offsets.push(offset);
    offset += n * 4;
  }
  offset = Math.ceil(offset / maxAlignment) * maxAlignment;
  const bytes = new ArrayBuffer(offset);
  uniforms.forEach((d, i) => {
    const View = d.type === "int32"
      ? Int32Array
      : d.type === "uint32"
      ? Uint32Array
      : Float32Array;
    new View(bytes, offsets[i], d.data.length).set(d.data);
  });
  return bytes;
}

/** Uniform buffers kept by {@linkcode keepUniformBuffers}. */
let uniformCacheSize = 4096;

/**
 * Set how many uniform buffers {@linkcode keepUniformBuffers} keeps (tests
 * shrink it to exercise the hand-back path).
 *
 * @param n The number of distinct uniform contents kept, at least 1.
 * @returns The previous number.
 */
export function setUniformCacheSize(n: number): number {
  if (!(Number.isInteger(n) && n >= 1)) {
    throw new RangeError(
      `Cannot set the uniform cache size: not a positive integer (got ${n}, expected an integer >= 1)`,
    );
  }
  const previous = uniformCacheSize;
  uniformCacheSize = n;
  return previous;
}

/**
 * Give every distinct uniform content its own buffer, written once, instead
 * of tfjs's pooled buffer rewritten for each dispatch (about 20 us of host
 * time per write on NVIDIA under Deno). A training step repeats nearly all
 * of its uniforms (shapes, strides); the few that change (step sizes) get
 * new buffers, and the least recently used are handed back to tfjs's pool
 * after the next submit, when nothing queued can still read them.
 */
function keepUniformBuffers(backend: WebGpuInternals): void {
  const kept = new Map<string, GPUBufferBinding>();
  const self = backend as unknown as {
    makeUniforms: (u: UniformData) => GPUBufferBinding;
    uniformPendingDisposal: GPUBuffer[];
  };
  self.makeUniforms = (uniforms) => {
    const bytes = uniformBytes(uniforms);
    const key = new Uint32Array(bytes).join(",");
    let binding = kept.get(key);
    if (binding === undefined) {
      const buffer = backend.bufferManager.acquireBuffer(
        bytes.byteLength,
        GPUBufferUsage.COPY_DST | GPUBufferUsage.UNIFORM,
      );
      backend.queue.writeBuffer(buffer, 0, bytes);
      binding = { offset: 0, size: bytes.byteLength, buffer };
      while (kept.size >= uniformCacheSize) {
        const [oldest, old] = kept.entries().next().value!;
        kept.delete(oldest);
        self.uniformPendingDisposal.push(old.buffer);
      }
    } else {
      kept.delete(key);
    }
    kept.set(key, binding);
    return binding;
  };
}

/**
 * tfjs's WebGPU backend with a cheaper upload: data created on the host
 * (`tf.tensor`, scalars) is written with `queue.writeBuffer` into a pooled
 * buffer instead of a freshly mapped staging buffer. On NVIDIA's Vulkan
 * driver under Deno a mapped upload costs about 0.4 ms of host time and
 * `writeBuffer` about 0.02 ms; a training step makes hundreds of uploads.
 * Ordering holds: the write runs at the next submit, before its command
 * buffers and after every earlier submit, and tfjs returns buffers to its
 * pool only once the work that used them has been submitted.
 */
export class FastUploadBackend extends WebGPUBackend {
  /**
   * @param device The device to compute on.
   * @param info The adapter's description (tfjs reads its vendor and architecture).
   */
  constructor(device: GPUDevice, info?: GPUAdapterInfo) {
    super(device, info as ConstructorParameters<typeof WebGPUBackend>[1]);
    const self = this as unknown as WebGpuInternals;
    pickLowestFreeBuffer(self);
    keepUniformBuffers(self);
  }

  override uploadToGPU(dataId: object): void {
    const self = this as unknown as WebGpuInternals;
    const data = self.tensorMap.get(dataId);
    const dtype = data.dtype;
    if (
      data.resource != null || data.values == null ||
      !(dtype === "float32" || dtype === "int32" || dtype === "bool") ||
      data.values.length === 0
    ) {
      return super.uploadToGPU(dataId);
    }
    const n = data.values.length;
    // writeBuffer copies: pass typed arrays of the right kind as they are.
    const values = data.values;
    const host = dtype === "float32"
      ? (values instanceof Float32Array ? values : Float32Array.from(values))
      : (values instanceof Int32Array ? values : Int32Array.from(values));
    const buffer = self.bufferManager.acquireBuffer(
      n * 4,
      GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC |
        GPUBufferUsage.COPY_DST,
    );
    self.queue.writeBuffer(buffer, 0, host as BufferSource);
    data.values = null;
    data.resource = buffer;
  }
}

/** The buffers each bind group made on a device set up by {@linkcode reuseDeviceObjects} binds, by binding number. */
const groupBuffers = new WeakMap<GPUBindGroup, (GPUBuffer | null)[]>();

/**
 * The buffers a bind group binds, by binding number (`null` for a binding
 * that is not a buffer), when it was made on a device set up by
 * {@linkcode reuseDeviceObjects}; `undefined` otherwise.
 *
 * @param group A bind group.
 * @returns Its buffers, or `undefined`.
 */
export function bindGroupBuffers(
  group: GPUBindGroup,
): readonly (GPUBuffer | null)[] | undefined {
  return groupBuffers.get(group);
}

/** Bind groups kept by {@linkcode reuseDeviceObjects}, least recently used first out. */
const BIND_GROUP_CACHE = 4096;

/**
 * Make the host's side of each tfjs dispatch cheaper on `device`, without
 * changing what runs. tfjs creates a bind group for every dispatch, which
 * costs about 40 us of host time on NVIDIA's Vulkan driver under Deno. With
 * {@linkcode pickLowestFreeBuffer} its pool hands mostly the same buffers to
 * the same dispatches step after step, so:
 *
 * - a pipeline's bind-group layout is looked up once (Deno makes a new
 *   object per call);
 * - a bind group for the same layout and the same buffer ranges is reused
 *   (bind groups are immutable; a buffer is keyed by its object, so a
 *   destroyed buffer's entries are never hit again and age out).
 *
 * Uniform contents are kept by {@linkcode keepUniformBuffers}.
 */
export function reuseDeviceObjects(device: GPUDevice): void {
  const id = objectId;
  const memoLayouts = (pipeline: GPUComputePipeline) => {
    const get = pipeline.getBindGroupLayout.bind(pipeline);
    const layouts = new Map<number, GPUBindGroupLayout>();
    pipeline.getBindGroupLayout = (index: number) => {
      let layout = layouts.get(index);
      if (layout === undefined) {
        layout = get(index);
        layouts.set(index, layout);
      }
      return layout;
    };
    return pipeline;
  };
  const createPipeline = device.createComputePipeline.bind(device);
  device.createComputePipeline = (d) => memoLayouts(createPipeline(d));
  const createPipelineAsync = device.createComputePipelineAsync.bind(device);
  device.createComputePipelineAsync = async (d) =>
    memoLayouts(await createPipelineAsync(d));

  const groups = new Map<string, GPUBindGroup>();
  const create = device.createBindGroup.bind(device);
  const createBindGroup = (d: GPUBindGroupDescriptor) => {
    const group = create(d);
    const buffers: (GPUBuffer | null)[] = [];
    for (const e of d.entries) {
      const b = (e.resource as GPUBufferBinding | undefined)?.buffer;
      buffers[e.binding] = b instanceof GPUBuffer ? b : null;
    }
    groupBuffers.set(group, buffers);
    return group;
  };
  device.createBindGroup = (d: GPUBindGroupDescriptor) => {
    let key = String(id(d.layout));
    for (const e of d.entries) {
      const r = e.resource as GPUBufferBinding;
      if (r === undefined || !(r.buffer instanceof GPUBuffer)) {
        return createBindGroup(d);
      }
      key += `|${e.binding}:${id(r.buffer)}:${r.offset ?? 0}:${r.size ?? -1}`;
    }
    let group = groups.get(key);
    if (group === undefined) {
      group = createBindGroup(d);
      if (groups.size >= BIND_GROUP_CACHE) {
        groups.delete(groups.keys().next().value!);
      }
    } else {
      groups.delete(key);
    }
    groups.set(key, group);
    return group;
  };
}

/**
 * Make tfjs's WebGPU `AddN` correct for any number of inputs. Its program
 * binds every input, and past the device's storage-buffer limit (less one
 * for the output) WebGPU rejects it and tfjs silently returns a stale
 * buffer (the sum of the first 7 of 86 tensors, with the default limit of
 * 8). Longer lists are now added in rounds of at most that many.
 */
export function chunkAddN(): void {
  const original = tf.getKernel("AddN", "webgpu");
  if (original === undefined) return;
  const kernelFunc: tf.KernelFunc = (args) => {
    const inputs = args.inputs as unknown as tf.TensorInfo[];
    const backend = args.backend as unknown as {
      device: GPUDevice;
      disposeData(dataId: object): void;
    };
    const most = backend.device.limits.maxStorageBuffersPerShaderStage - 1;
    let parts = inputs;
    const made: tf.TensorInfo[] = [];
    while (parts.length > most) {
      const next: tf.TensorInfo[] = [];
      for (let i = 0; i < parts.length; i += most) {
        const chunk = parts.slice(i, i + most);
        next.push(
          chunk.length === 1 ? chunk[0] : original.kernelFunc({
            ...args,
            inputs: chunk as unknown as tf.NamedTensorInfoMap,
          }) as tf.TensorInfo,
        );
      }
      made.push(...next.filter((t) => !inputs.includes(t)));
      parts = next;
    }
    const out = original.kernelFunc({
      ...args,
      inputs: parts as unknown as tf.NamedTensorInfoMap,
    });
    for (const t of made) backend.disposeData(t.dataId);
    return out;
  };
  tf.unregisterKernel("AddN", "webgpu");
  tf.registerKernel({ ...original, kernelFunc });
}
