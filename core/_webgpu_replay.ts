/**
 * Replaying a model's WebGPU work: the dispatches of one call, recorded once
 * and re-encoded for every later call with inputs of the same shapes, without
 * running tfjs's per-op JavaScript again (the idea of CUDA graphs, or
 * PyTorch's `torch.compile(mode="reduce-overhead")`).
 *
 * Why: under Deno each tfjs WebGPU op costs the host about 50-100 us (kernel
 * lookup, shader key, uniforms, bind group, encoding), so a UNet forward pass
 * of about 130 dispatches is bound by the host, not the GPU (see the README's
 * performance section). A replayed call costs three WebGPU calls per dispatch.
 *
 * How:
 * 1. **Capture.** The model runs once through tfjs on inputs that live in
 *    buffers of the replay's own (`x` and `t` are copied in), while every
 *    `setPipeline`, `setBindGroup`, `dispatchWorkgroups`,
 *    `copyBufferToBuffer` and `writeBuffer` is recorded. A read back during
 *    the call (data-dependent control flow), a profile's timestamp queries or
 *    an API call that cannot be replayed makes the model non-replayable: it
 *    then runs through tfjs as before.
 * 2. **Hold.** Every buffer the recording touches stays the replay's: tfjs's
 *    pool does not hand it out again (its releases are intercepted) until the
 *    replay is disposed. Intermediate results therefore keep their buffers,
 *    uniforms and uploaded constants their contents. A write into a buffer
 *    that a dispatch of the same call also writes becomes an ordered copy
 *    from a staging buffer.
 * 3. **Verify.** The first replay runs beside a plain call, and the two
 *    outputs are compared bit for bit (read back asynchronously; plain calls
 *    are used until the answer comes). Any difference makes the model
 *    non-replayable.
 * 4. **Replay.** Copy the new `x` and `t` in, encode the recorded dispatches
 *    into tfjs's own command encoder (so the order with tfjs's work holds),
 *    and copy the output into a new tensor for the caller.
 *
 * A weight that the model read is released (disposed or reassigned) while
 * the replay holds its buffer: the recording is stale and the next call
 * captures again. Calls under a gradient tape and while tfjs profiles run
 * through tfjs.
 *
 * A training step ({@linkcode recordStep}, used by core/train.ts) changes
 * state: it reads the weights, moments and average and replaces them. Its
 * recording carries that state from call to call: while it is captured, the
 * state's old buffers are kept out of tfjs's pool (so that the call cannot
 * reuse them), and each replay first copies the state tensors' current
 * buffers into those old ones, then runs; the state tensors keep their
 * buffers, which then hold the new values (and tfjs keeps no host copy of
 * them from a read, which it would answer the next read with). Such a step is not verified
 * against a plain call (it cannot run twice); its caller's tests compare.
 *
 * @module
 */
import { tf } from "./backend.ts";
import { bindGroupBuffers, FastUploadBackend } from "./_webgpu_backend.ts";

/** A noise model: NHWC images and int32 timesteps to NHWC noise. */
export type ModelFn = (x: tf.Tensor4D, t: tf.Tensor1D) => tf.Tensor4D;

/** A model whose WebGPU dispatches are replayed; dispose it to free what it holds. */
export interface ReplayedModel extends ModelFn {
  /** Free the recordings and hand their buffers back to tfjs. */
  dispose(): void;
  /** Calls served by a replay, calls captured, calls run through tfjs. */
  readonly stats: { replayed: number; captured: number; plain: number };
  /** Why the model runs through tfjs, if it does ("" while it replays or may). */
  readonly fallback: string;
  /**
   * Resolves once every pending check of a first replay is answered: from
   * then on, calls with the shapes seen so far replay (unless `fallback`
   * says otherwise).
   */
  settled(): Promise<void>;
}

/** The parts of tfjs's WebGPU backend a replay works with. */
interface Backend {
  tensorMap: {
    get(dataId: object): { resource: unknown; values: unknown } | undefined;
  };
  bufferManager: {
    acquireBuffer(size: number, usage: number): GPUBuffer;
    releaseBuffer(buffer: GPUBuffer, reuse?: boolean): void;
    freeBuffers: Map<string, GPUBuffer[]>;
    usedBuffers: Map<string, GPUBuffer[]>;
    numFreeBuffers: number;
    numUsedBuffers: number;
    numBytesUsed: number;
  };
  device: GPUDevice;
  commandEncoder: GPUCommandEncoder | null;
  commandQueueOwnedIds: WeakSet<object>;
  dispatchCountInPass: number;
  activeTimers: unknown;
  uploadToGPU(dataId: object): void;
  ensureCommandEncoderReady(): void;
  endComputePassEncoder(): void;
  submitQueue(): void;
  makeTensorInfo(shape: number[], dtype: string): tf.TensorInfo;
}

type Step =
  | {
    kind: "dispatch";
    pipeline: GPUComputePipeline;
    group: GPUBindGroup;
    x: number;
    y: number;
    z: number;
  }
  | {
    kind: "copy";
    src: GPUBuffer;
    srcOffset: number;
    dst: GPUBuffer;
    dstOffset: number;
    size: number;
  }
  | { kind: "write"; dst: GPUBuffer; offset: number; data: Uint8Array };

/** What a capture records. */
interface Recording {
  steps: Step[];
  pipeline: GPUComputePipeline | null;
  group: GPUBindGroup | null;
  /** Why the call cannot be replayed, once something says so. */
  bad: string;
  /** Buffers tfjs's pool handed out during the call. */
  acquired: Set<GPUBuffer>;
}

/** The capture in progress, if any (one at a time: the model runs synchronously). */
let recording: Recording | null = null;

/** Wrap one prototype method so that, while recording, `spy` sees each call first. */
function spyOn(
  cls: string,
  name: string,
  spy: (rec: Recording, args: unknown[]) => void,
): void {
  const proto =
    (globalThis as unknown as Record<string, { prototype: object }>)[
      cls
    ]?.prototype as Record<string, unknown> | undefined;
  const f = proto?.[name];
  if (proto === undefined || typeof f !== "function") return;
  proto[name] = function (this: unknown, ...args: unknown[]) {
    if (recording !== null) spy(recording, args);
    return f.apply(this, args);
  };
}

let spiesInstalled = false;

/** Install the recording spies on Deno's WebGPU classes (once). */
function installSpies(): void {
  if (spiesInstalled) return;
  spiesInstalled = true;
  const refuse = (why: string) => (rec: Recording) => {
    rec.bad ||= why;
  };
  spyOn("GPUComputePassEncoder", "setPipeline", (rec, [p]) => {
    rec.pipeline = p as GPUComputePipeline;
  });
  spyOn("GPUComputePassEncoder", "setBindGroup", (rec, [index, group, dyn]) => {
    if (index !== 0 || (dyn !== undefined && (dyn as number[]).length > 0)) {
      rec.bad ||= "a bind group other than group 0 without offsets";
    }
    rec.group = group as GPUBindGroup;
  });
  spyOn("GPUComputePassEncoder", "dispatchWorkgroups", (rec, [x, y, z]) => {
    if (rec.pipeline === null || rec.group === null) {
      rec.bad ||= "a dispatch without pipeline or bind group";
      return;
    }
    rec.steps.push({
      kind: "dispatch",
      pipeline: rec.pipeline,
      group: rec.group,
      x: x as number,
      y: (y as number | undefined) ?? 1,
      z: (z as number | undefined) ?? 1,
    });
  });
  spyOn(
    "GPUComputePassEncoder",
    "dispatchWorkgroupsIndirect",
    refuse("an indirect dispatch"),
  );
  spyOn("GPUCommandEncoder", "beginComputePass", (rec, [d]) => {
    if ((d as GPUComputePassDescriptor | undefined)?.timestampWrites) {
      rec.bad ||= "timestamp queries (a profile)";
    }
  });
  spyOn("GPUCommandEncoder", "copyBufferToBuffer", (rec, args) => {
    // copyBufferToBuffer(src, srcOffset, dst, dstOffset, size)
    if (args.length !== 5) {
      rec.bad ||= "a whole-buffer copy";
      return;
    }
    const [src, srcOffset, dst, dstOffset, size] = args;
    rec.steps.push({
      kind: "copy",
      src: src as GPUBuffer,
      srcOffset: srcOffset as number,
      dst: dst as GPUBuffer,
      dstOffset: dstOffset as number,
      size: size as number,
    });
  });
  for (
    const name of [
      "clearBuffer",
      "copyBufferToTexture",
      "copyTextureToBuffer",
      "copyTextureToTexture",
      "resolveQuerySet",
      "beginRenderPass",
    ]
  ) spyOn("GPUCommandEncoder", name, refuse(`a ${name}`));
  spyOn("GPUQueue", "writeBuffer", (rec, args) => {
    const [dst, offset, data, dataOffset, size] = args as [
      GPUBuffer,
      number,
      ArrayBuffer | ArrayBufferView,
      number | undefined,
      number | undefined,
    ];
    // Offsets and sizes count elements of a typed array, bytes otherwise.
    const view = ArrayBuffer.isView(data)
      ? data
      : new Uint8Array(data as ArrayBuffer);
    const unit = "BYTES_PER_ELEMENT" in view
      ? (view as unknown as { BYTES_PER_ELEMENT: number }).BYTES_PER_ELEMENT
      : 1;
    const start = view.byteOffset + (dataOffset ?? 0) * unit;
    const length = size !== undefined
      ? size * unit
      : view.byteLength - (dataOffset ?? 0) * unit;
    rec.steps.push({
      kind: "write",
      dst,
      offset,
      data: new Uint8Array(view.buffer, start, length).slice(),
    });
  });
  spyOn("GPUQueue", "writeTexture", refuse("a texture upload"));
  spyOn("GPUBuffer", "mapAsync", refuse("a read back"));
}

/** Buffers held by replays: how many hold each, and who to tell when its owner lets go. */
const held = new Map<
  GPUBuffer,
  { holders: Set<Replay>; released: boolean }
>();
const patchedPools = new WeakSet<object>();

/**
 * Intercept the pool's releases: a held buffer is kept out of the pool (its
 * owner's release is noted), and a replay whose pre-existing buffer (a
 * weight) is released goes stale.
 */
function patchPool(pool: Backend["bufferManager"]): void {
  if (patchedPools.has(pool)) return;
  patchedPools.add(pool);
  const release = pool.releaseBuffer.bind(pool);
  pool.releaseBuffer = (buffer, reuse = true) => {
    const h = held.get(buffer);
    if (h === undefined || h.released) return release(buffer, reuse);
    h.released = true;
    for (const r of h.holders) r.ownerReleased(buffer);
  };
  (pool as unknown as { releaseHeld: typeof release }).releaseHeld = release;
}

/** Take `buffer` out of the pool's free lists, as an acquire would, if it is there. */
function takeFromPool(pool: Backend["bufferManager"], buffer: GPUBuffer) {
  const key = `${buffer.size}_${buffer.usage}`;
  const free = pool.freeBuffers.get(key);
  const i = free?.indexOf(buffer) ?? -1;
  if (free === undefined || i < 0) return false;
  free.splice(i, 1);
  pool.numFreeBuffers--;
  let used = pool.usedBuffers.get(key);
  if (used === undefined) pool.usedBuffers.set(key, used = []);
  used.push(buffer);
  pool.numUsedBuffers++;
  pool.numBytesUsed += buffer.size;
  return true;
}

const STORAGE = () =>
  GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/**
 * State a recorded training step carries from one call to the next: the
 * step read `before` (an old weight, moment or average) and wrote `after`
 * (its new value, which the state's tensor holds afterwards). A replay
 * first copies `after` into `before`, then runs the recording.
 */
interface Carried {
  before: GPUBuffer;
  after: GPUBuffer;
  /** The state tensor's bytes (a pooled buffer may be larger). */
  bytes: number;
}

/** One recorded call, for one shape of inputs. */
class Replay {
  readonly steps: Step[];
  readonly dispatches: number;
  stale = false;
  /** Buffers whose release by their owner makes the recording stale. */
  readonly #watched: Set<GPUBuffer>;
  readonly #buffers: Set<GPUBuffer>;
  readonly #staging: GPUBuffer[] = [];

  /**
   * @param inBufs Where each call's inputs are copied, in order.
   * @param inputs Tensors made on `inBufs` (disposed with the replay).
   * @param outputs The call's outputs, copied out for each call.
   * @param carried The state carried from call to call.
   */
  constructor(
    readonly backend: Backend,
    readonly inBufs: GPUBuffer[],
    readonly inputs: tf.Tensor[],
    readonly outputs: tf.Tensor[],
    rec: Recording,
    readonly carried: Carried[] = [],
  ) {
    // Buffers written by the call's own commands.
    const written = new Set<GPUBuffer>();
    const buffers = new Set<GPUBuffer>(inBufs);
    for (const o of outputs) buffers.add(bufferOf(backend, o));
    for (const c of carried) buffers.add(c.before).add(c.after);
    for (const s of rec.steps) {
      if (s.kind === "dispatch") {
        const bound = bindGroupBuffers(s.group);
        if (bound === undefined) {
          throw new Error("a bind group made elsewhere");
        }
        for (const b of bound) if (b !== null) buffers.add(b);
        // tfjs binds a program's output first.
        if (bound[0]) written.add(bound[0]);
      } else if (s.kind === "copy") {
        buffers.add(s.src).add(s.dst);
        written.add(s.dst);
      } else {
        buffers.add(s.dst);
      }
    }
    // Writes into a buffer that the call's commands or another write also
    // fill are replayed in order, as copies from staging buffers; the rest
    // keep their contents.
    const writes = new Map<GPUBuffer, number>();
    for (const s of rec.steps) {
      if (s.kind === "write") writes.set(s.dst, (writes.get(s.dst) ?? 0) + 1);
    }
    this.steps = [];
    for (const s of rec.steps) {
      if (s.kind !== "write") {
        this.steps.push(s);
      } else if (written.has(s.dst) || writes.get(s.dst)! > 1) {
        const size = Math.ceil(s.data.byteLength / 4) * 4;
        const staging = backend.device.createBuffer({
          size,
          usage: GPUBufferUsage.COPY_SRC,
          mappedAtCreation: true,
        });
        new Uint8Array(staging.getMappedRange()).set(s.data);
        staging.unmap();
        this.#staging.push(staging);
        this.steps.push({
          kind: "copy",
          src: staging,
          srcOffset: 0,
          dst: s.dst,
          dstOffset: s.offset,
          size,
        });
      }
    }
    this.dispatches = this.steps.filter((s) => s.kind === "dispatch").length;
    this.#buffers = buffers;
    // Buffers that existed before the capture (weights, kept uniforms), but
    // not the inputs' nor the carried state's old ones (released in the
    // call), and the carried state's new ones.
    const mine = new Set<GPUBuffer>([
      ...inBufs,
      ...carried.map((c) => c.before),
    ]);
    this.#watched = new Set([
      ...[...buffers].filter((b) => !rec.acquired.has(b) && !mine.has(b)),
      ...carried.map((c) => c.after),
    ]);
    const pool = backend.bufferManager;
    for (const b of buffers) {
      let h = held.get(b);
      if (h === undefined) {
        // A buffer released during the call sits in the pool's free lists.
        const inPool = takeFromPool(pool, b);
        h = { holders: new Set(), released: inPool };
        held.set(b, h);
      }
      h.holders.add(this);
    }
  }

  /** The pool was asked to take back a held buffer. */
  ownerReleased(buffer: GPUBuffer): void {
    if (this.#watched.has(buffer)) this.stale = true;
  }

  /** Encode the recorded work for new inputs; returns the outputs, new tensors. */
  run(inputs: readonly tf.Tensor[]): tf.Tensor[] {
    const b = this.backend;
    inputs.forEach((x, i) => copyInto(b, x, this.inBufs[i]));
    const enc = b.commandEncoder!;
    for (const { before, after, bytes } of this.carried) {
      enc.copyBufferToBuffer(after, 0, before, 0, bytes);
    }
    let pass: GPUComputePassEncoder | null = null;
    for (const s of this.steps) {
      if (s.kind === "dispatch") {
        pass ??= enc.beginComputePass();
        pass.setPipeline(s.pipeline);
        pass.setBindGroup(0, s.group);
        pass.dispatchWorkgroups(s.x, s.y, s.z);
      } else if (s.kind === "copy") {
        pass?.end();
        pass = null;
        enc.copyBufferToBuffer(s.src, s.srcOffset, s.dst, s.dstOffset, s.size);
      }
    }
    pass?.end();
    b.dispatchCountInPass += this.dispatches;
    return this.outputs.map((o) => copyTensor(b, o));
  }

  /** Hand every held buffer back (to the pool where its owner let go). */
  dispose(): void {
    // Nothing queued may still use them.
    flush(this.backend);
    tf.dispose([...this.outputs, ...this.inputs]);
    const pool = this.backend.bufferManager as unknown as {
      releaseHeld(b: GPUBuffer): void;
    };
    for (const buf of this.#buffers) {
      const h = held.get(buf)!;
      h.holders.delete(this);
      if (h.holders.size > 0) continue;
      held.delete(buf);
      if (h.released) pool.releaseHeld(buf);
    }
    for (const buf of this.inBufs) pool.releaseHeld(buf);
    for (const s of this.#staging) s.destroy();
  }
}

/** The GPU buffer of a tensor on the WebGPU backend (uploaded first if need be). */
function bufferOf(b: Backend, t: tf.Tensor): GPUBuffer {
  b.uploadToGPU(t.dataId);
  return b.tensorMap.get(t.dataId)!.resource as GPUBuffer;
}

/**
 * A new float32 tensor with `src`'s values, copied through tfjs's command
 * encoder (submitted with tfjs's next batch).
 */
function copyTensor<T extends tf.Tensor>(b: Backend, src: T): T {
  const info = b.makeTensorInfo(src.shape, src.dtype);
  b.uploadToGPU(info.dataId);
  copyInto(b, src, b.tensorMap.get(info.dataId)!.resource as GPUBuffer);
  b.commandQueueOwnedIds.add(info.dataId);
  if (
    b.dispatchCountInPass >=
      (tf.env().get("WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE") as number)
  ) {
    b.submitQueue();
  }
  return tf.engine().makeTensorFromTensorInfo(info) as T;
}

/** Submit tfjs's pending commands, ending its compute pass first. */
function flush(b: Backend): void {
  if (b.commandEncoder === null) return;
  b.endComputePassEncoder();
  b.submitQueue();
}

/** Copy a tensor's data into `dst` through tfjs's command encoder. */
function copyInto(b: Backend, src: tf.Tensor, dst: GPUBuffer): void {
  b.uploadToGPU(src.dataId);
  const buf = b.tensorMap.get(src.dataId)!.resource as GPUBuffer;
  b.ensureCommandEncoderReady();
  b.endComputePassEncoder();
  b.commandEncoder!.copyBufferToBuffer(buf, 0, dst, 0, src.size * 4);
  b.commandQueueOwnedIds.add(src.dataId);
}

/** Hand pinned buffers that no replay holds back to their owners, or to the pool where they let go. */
function unpin(pool: Backend["bufferManager"], pinned: GPUBuffer[]): void {
  for (const buf of pinned) {
    const h = held.get(buf)!;
    if (h.holders.size > 0) continue;
    held.delete(buf);
    if (h.released) {
      (pool as unknown as { releaseHeld(b: GPUBuffer): void }).releaseHeld(buf);
    }
  }
}

/** What {@linkcode captureCall} made: the call's outputs, and its replay or why there is none. */
interface Captured {
  /** The outputs of this call, new tensors the caller owns. */
  outputs: tf.Tensor[];
  replay: Replay | null;
  /** Why `replay` is null. */
  why: string;
  /** The state tensors after the call (empty without `state`). */
  stateAfter: tf.Tensor[];
}

/**
 * Run `body` once through tfjs on copies of `inputs` that live in buffers
 * of the replay's own, recording its WebGPU work (see the module's notes).
 *
 * `state`, where given, lists tensors that `body` replaces (a training
 * step's weights, moments, averages): read before and after the call, each
 * changed one becomes carried state, and the replay copies its new buffer
 * into the old one before it runs again. Their old buffers are kept out of
 * tfjs's pool during the call, so that the call cannot reuse them; an old
 * value that something else still holds cannot be carried.
 */
function captureCall(
  b: Backend,
  body: (inputs: tf.Tensor[]) => tf.Tensor[],
  inputs: readonly tf.Tensor[],
  state?: () => tf.Tensor[],
): Captured {
  installSpies();
  patchPool(b.bufferManager);
  const pool = b.bufferManager;
  const before = state?.().map((t) => bufferOf(b, t)) ?? [];
  const pinned = before.filter((buf) => !held.has(buf));
  for (const buf of pinned) {
    held.set(buf, { holders: new Set(), released: false });
  }
  const inBufs = inputs.map((x) => pool.acquireBuffer(x.size * 4, STORAGE()));
  const made = inputs.map((x, i) => {
    copyInto(b, x, inBufs[i]);
    return tf.keep(
      tf.tensor({ buffer: inBufs[i], zeroCopy: true }, x.shape, x.dtype),
    );
  });
  const rec: Recording = {
    steps: [],
    pipeline: null,
    group: null,
    bad: "",
    acquired: new Set(),
  };
  const acquire = pool.acquireBuffer;
  pool.acquireBuffer = (size, usage) => {
    const buf = acquire.call(pool, size, usage);
    rec.acquired.add(buf);
    return buf;
  };
  let outputs: tf.Tensor[];
  recording = rec;
  try {
    outputs = body(made);
  } catch (e) {
    recording = null;
    pool.acquireBuffer = acquire;
    flush(b);
    unpin(pool, pinned);
    tf.dispose(made);
    for (const buf of inBufs) pool.releaseBuffer(buf);
    throw e;
  } finally {
    recording = null;
    pool.acquireBuffer = acquire;
  }
  outputs.forEach((o) => tf.keep(o));
  const carried: Carried[] = [];
  const now = state?.() ?? [];
  if (state !== undefined) {
    const after = now.map((t) => bufferOf(b, t));
    // Let tfjs release what the call disposed (it waits for a submit).
    flush(b);
    if (after.length !== before.length) rec.bad ||= "the state changed length";
    before.forEach((buf, i) => {
      if (after[i] === buf) return;
      if (!held.get(buf)?.released) {
        rec.bad ||= "a state tensor's old value is still in use";
      }
      // A copy between them must be valid, or WebGPU would drop the whole
      // command buffer of a replay.
      const bytes = now[i].size * 4;
      if (
        now[i].dtype !== "float32" || buf.size < bytes ||
        after[i].size < bytes ||
        !(after[i].usage & GPUBufferUsage.COPY_SRC) ||
        !(buf.usage & GPUBufferUsage.COPY_DST)
      ) {
        rec.bad ||= "a state tensor cannot be copied between its buffers";
      }
      carried.push({ before: buf, after: after[i], bytes });
    });
  }
  let replay: Replay | null = null;
  if (!rec.bad) {
    if (
      outputs.some((o) =>
        !(b.tensorMap.get(o.dataId)?.resource instanceof GPUBuffer)
      )
    ) {
      rec.bad = "an output is not in a GPU buffer";
    } else {
      try {
        replay = new Replay(b, inBufs, made, outputs, rec, carried);
      } catch (e) {
        rec.bad = (e as Error).message;
      }
    }
  }
  // After the replay has taken its buffers out of the pool.
  const copies = outputs.map((o) => copyTensor(b, o));
  unpin(pool, pinned);
  if (replay === null) {
    flush(b);
    tf.dispose([...made, ...outputs]);
    for (const buf of inBufs) pool.releaseBuffer(buf);
  }
  return { outputs: copies, replay, why: rec.bad, stateAfter: now };
}

/** Whether replays are switched off (`DDPM_WEBGPU_REPLAY=0`). */
function switchedOff(): boolean {
  try {
    return Deno.env.get("DDPM_WEBGPU_REPLAY") === "0";
  } catch {
    return false;
  }
}

/**
 * Wrap a noise model so that, on ddpm's WebGPU backend, its dispatches are
 * recorded once per input shape and replayed afterwards (see the module's
 * notes). On other backends, under a gradient tape, while tfjs profiles and
 * with `DDPM_WEBGPU_REPLAY=0`, calls go straight to the model.
 *
 * The model must be a pure function of its inputs and of tensors that stay
 * unchanged (its weights) while the wrapper lives: a weight released in the
 * meantime is noticed and the model is captured again, but host-side state
 * the model reads (a JavaScript number that changes between calls) is not.
 *
 * @param model The noise model, e.g. `(x, t) => unet.predict(x, t)`.
 * @returns The same function, replayed; `dispose()` it when done.
 * @example
 * ```ts ignore
 * const eps = replayOnWebGpu((x, t) => unet.predict(x, t));
 * const images = await sampleDdim(eps, schedule, { n: 16, numSteps: 50 });
 * eps.dispose();
 * ```
 */
export function replayOnWebGpu(model: ModelFn): ReplayedModel {
  const byShape = new Map<
    string,
    { replay: Replay; state: "verify" | "checking" | "ok" }
  >();
  const stats = { replayed: 0, captured: 0, plain: 0 };
  const pending = new Set<Promise<void>>();
  let fallback = switchedOff() ? "DDPM_WEBGPU_REPLAY=0" : "";
  const plain = (x: tf.Tensor4D, t: tf.Tensor1D) => {
    stats.plain++;
    return model(x, t);
  };
  const clear = () => {
    for (const s of byShape.values()) s.replay.dispose();
    byShape.clear();
  };
  const giveUp = (why: string) => {
    fallback = why;
    clear();
  };

  const capture = (b: Backend, x: tf.Tensor4D, t: tf.Tensor1D) => {
    const { outputs, replay, why } = captureCall(
      b,
      ([xIn, tIn]) => [model(xIn as tf.Tensor4D, tIn as tf.Tensor1D)],
      [x, t],
    );
    stats.captured++;
    if (replay === null) giveUp(`cannot replay: ${why}`);
    return { out: outputs[0] as tf.Tensor4D, replay };
  };

  const fn = ((x: tf.Tensor4D, t: tf.Tensor1D) => {
    if (fallback || replayUnavailable() !== "") return plain(x, t);
    const b = tf.backend() as unknown as Backend;
    const key = `${x.shape}|${t.shape}|${x.dtype}|${t.dtype}`;
    let s = byShape.get(key);
    if (s?.replay.stale) {
      s.replay.dispose();
      s = undefined;
      byShape.delete(key);
    }
    if (s === undefined) {
      const { out, replay } = capture(b, x, t);
      if (replay !== null) byShape.set(key, { replay, state: "verify" });
      return out;
    }
    const replay = s.replay;
    if (s.state === "ok") {
      stats.replayed++;
      return replay.run([x, t])[0] as tf.Tensor4D;
    }
    if (s.state === "verify") {
      // Run both; compare bit for bit on the GPU, read the answer later.
      const want = plain(x, t);
      const got = replay.run([x, t])[0];
      // Equal, or both NaN.
      const differ = tf.keep(tf.tidy(() =>
        tf.any(tf.logicalAnd(
          tf.notEqual(got, want),
          tf.logicalNot(tf.logicalAnd(tf.isNaN(got), tf.isNaN(want))),
        ))
      ));
      got.dispose();
      const entry = s;
      entry.state = "checking";
      const check = differ.data().then((v) => {
        differ.dispose();
        if (byShape.get(key) !== entry) return;
        if (v[0]) giveUp("cannot replay: a replayed call differed from tfjs's");
        else entry.state = "ok";
      }, () => {
        differ.dispose();
        giveUp("cannot replay: the check could not be read back");
      }).finally(() => pending.delete(check));
      pending.add(check);
      return want;
    }
    return plain(x, t);
  }) as ReplayedModel;
  Object.defineProperties(fn, {
    stats: { get: () => ({ ...stats }) },
    fallback: { get: () => fallback },
    settled: {
      value: async () => {
        while (pending.size > 0) await Promise.all(pending);
      },
    },
    dispose: { value: clear },
  });
  return fn;
}

/**
 * Why a step cannot be recorded now ("" when it can): another backend than
 * ddpm's WebGPU one, an open gradient tape, a tfjs profile, or
 * `DDPM_WEBGPU_REPLAY=0`.
 *
 * @returns The reason, or "".
 */
export function replayUnavailable(): string {
  const active = tf.backend();
  if (switchedOff()) return "DDPM_WEBGPU_REPLAY=0";
  if (!(active instanceof FastUploadBackend)) {
    return "not ddpm's WebGPU backend";
  }
  if (tf.engine().isTapeOn()) return "a gradient tape is open";
  if ((active as unknown as Backend).activeTimers != null) {
    return "tfjs is profiling";
  }
  return "";
}

/**
 * Whether any of `tensors` shares its data with another tensor (a clone, a
 * reshape, a saved state): a replayed step would then change that tensor's
 * values too, since it writes its state in place. Such a step must run
 * through tfjs, which gives the state new buffers.
 *
 * @param tensors Tensors on the WebGPU backend.
 * @returns True when one of them shares its data.
 */
export function sharesData(tensors: readonly tf.Tensor[]): boolean {
  const b = tf.backend() as unknown as {
    refCount(dataId: object): number;
  };
  return tensors.some((t) => b.refCount(t.dataId) > 1);
}

/** Data whose values a replay changes in place (see {@linkcode noHostCopies}). */
const changedInPlace = new WeakSet<object>();
const patchedBackends = new WeakSet<object>();

/**
 * Keep tfjs from answering reads of `tensors` from the host: it keeps what
 * it read of a tensor and returns that copy on the next read, but replays
 * change their values in place. Drops the copies kept now, and keeps none
 * from here on, also of a read under way while a replay is queued.
 */
function noHostCopies(b: Backend, tensors: readonly tf.Tensor[]): void {
  const self = b as unknown as {
    convertAndCacheOnCPU(dataId: object, data: unknown): unknown;
  };
  if (!patchedBackends.has(b)) {
    patchedBackends.add(b);
    const cache = self.convertAndCacheOnCPU.bind(b);
    self.convertAndCacheOnCPU = (dataId, data) =>
      changedInPlace.has(dataId) ? data : cache(dataId, data);
  }
  for (const t of tensors) {
    changedInPlace.add(t.dataId);
    b.tensorMap.get(t.dataId)!.values = null;
  }
}

/** A call recorded by {@linkcode recordStep}, replayed by `run`. */
export interface RecordedStep {
  /** WebGPU dispatches per call. */
  readonly dispatches: number;
  /**
   * Encode the recorded work for new inputs (shaped and typed as the
   * recorded ones). Null, with nothing queued, when the recording is stale
   * (a state tensor is not the one the recording left: it was replaced or
   * reassigned since; or a tensor the call read was released), or when a
   * state tensor shares its data (see {@linkcode sharesData}).
   *
   * @param inputs The call's inputs, in the recorded order.
   * @param state The state tensors, in the recorded order.
   * @returns The outputs, new tensors the caller owns, or null.
   */
  run(
    inputs: readonly tf.Tensor[],
    state: readonly tf.Tensor[],
  ): tf.Tensor[] | null;
  /** Free what the recording holds. */
  dispose(): void;
}

/**
 * Run a step `body` once through tfjs and record its WebGPU work, so that
 * later calls replay it with new inputs, as a training step that changes
 * its state (see {@linkcode captureCall}; the module's notes say what
 * cannot be recorded). Unlike {@linkcode replayOnWebGpu} nothing verifies
 * the first replay against a plain call, since a step cannot run twice:
 * the caller's tests must.
 *
 * @param body The step: inputs to outputs, replacing the state tensors.
 * @param inputs This call's inputs; copied, not disposed.
 * @param state The tensors `body` replaces, before and after it runs.
 * @returns This call's outputs (new tensors), and the recording or why there is none.
 */
export function recordStep(
  body: (inputs: tf.Tensor[]) => tf.Tensor[],
  inputs: readonly tf.Tensor[],
  state: () => tf.Tensor[],
): { outputs: tf.Tensor[]; step: RecordedStep | null; why: string } {
  const b = tf.backend() as unknown as Backend;
  const { outputs, replay, why, stateAfter } = captureCall(
    b,
    body,
    inputs,
    state,
  );
  if (replay === null) return { outputs, step: null, why };
  const after = stateAfter.map((t) => bufferOf(b, t));
  // From here on the replays change these tensors' values in place.
  noHostCopies(b, stateAfter);
  const step: RecordedStep = {
    dispatches: replay.dispatches,
    run: (ins, now) => {
      if (
        replay.stale || now.length !== after.length ||
        now.some((t, i) => b.tensorMap.get(t.dataId)?.resource !== after[i]) ||
        sharesData(now)
      ) return null;
      return replay.run(ins);
    },
    dispose: () => replay.dispose(),
  };
  return { outputs, step, why: "" };
}
