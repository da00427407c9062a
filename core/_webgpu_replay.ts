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

/** One recorded call, for one shape of inputs. */
class Replay {
  readonly steps: Step[];
  readonly dispatches: number;
  stale = false;
  /** Buffers that existed before the capture (weights, kept uniforms). */
  readonly #preexisting: Set<GPUBuffer>;
  readonly #buffers: Set<GPUBuffer>;
  readonly #staging: GPUBuffer[] = [];

  constructor(
    readonly backend: Backend,
    readonly xBuf: GPUBuffer,
    readonly tBuf: GPUBuffer,
    readonly inputs: tf.Tensor[],
    readonly output: tf.Tensor4D,
    rec: Recording,
  ) {
    const out = backend.tensorMap.get(output.dataId)?.resource as GPUBuffer;
    // Buffers written by the call's own commands.
    const written = new Set<GPUBuffer>();
    const buffers = new Set<GPUBuffer>([xBuf, tBuf, out]);
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
    this.#preexisting = new Set(
      [...buffers].filter((b) =>
        !rec.acquired.has(b) && b !== xBuf && b !== tBuf
      ),
    );
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
    if (this.#preexisting.has(buffer)) this.stale = true;
  }

  /** Encode the recorded work for new inputs; returns the output, a new tensor. */
  run(x: tf.Tensor4D, t: tf.Tensor1D): tf.Tensor4D {
    const b = this.backend;
    copyInto(b, x, this.xBuf);
    copyInto(b, t, this.tBuf);
    const enc = b.commandEncoder!;
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
    return copyTensor(b, this.output);
  }

  /** Hand every held buffer back (to the pool where its owner let go). */
  dispose(): void {
    // Nothing queued may still use them.
    flush(this.backend);
    tf.dispose([this.output, ...this.inputs]);
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
    pool.releaseHeld(this.xBuf);
    pool.releaseHeld(this.tBuf);
    for (const s of this.#staging) s.destroy();
  }
}

/**
 * A new float32 tensor with `src`'s values, copied through tfjs's command
 * encoder (submitted with tfjs's next batch).
 */
function copyTensor(b: Backend, src: tf.Tensor4D): tf.Tensor4D {
  const info = b.makeTensorInfo(src.shape, "float32");
  b.uploadToGPU(info.dataId);
  copyInto(b, src, b.tensorMap.get(info.dataId)!.resource as GPUBuffer);
  b.commandQueueOwnedIds.add(info.dataId);
  if (
    b.dispatchCountInPass >=
      (tf.env().get("WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE") as number)
  ) {
    b.submitQueue();
  }
  return tf.engine().makeTensorFromTensorInfo(info) as tf.Tensor4D;
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
    installSpies();
    patchPool(b.bufferManager);
    const pool = b.bufferManager;
    const xBuf = pool.acquireBuffer(x.size * 4, STORAGE());
    const tBuf = pool.acquireBuffer(t.size * 4, STORAGE());
    const xIn = tf.tensor({ buffer: xBuf, zeroCopy: true }, x.shape, x.dtype);
    const tIn = tf.tensor({ buffer: tBuf, zeroCopy: true }, t.shape, t.dtype);
    copyInto(b, x, xBuf);
    copyInto(b, t, tBuf);
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
    let y: tf.Tensor4D;
    recording = rec;
    try {
      y = model(xIn as tf.Tensor4D, tIn as tf.Tensor1D);
    } finally {
      recording = null;
      pool.acquireBuffer = acquire;
    }
    stats.captured++;
    tf.keep(xIn);
    tf.keep(tIn);
    tf.keep(y);
    let replay: Replay | null = null;
    if (
      !rec.bad && y.dtype === "float32" &&
      b.tensorMap.get(y.dataId)?.resource instanceof GPUBuffer
    ) {
      try {
        replay = new Replay(b, xBuf, tBuf, [xIn, tIn], y, rec);
      } catch (e) {
        rec.bad = (e as Error).message;
      }
    }
    // After the replay has taken its buffers out of the pool.
    const out = copyTensor(b, y);
    if (replay === null) {
      flush(b);
      tf.dispose([xIn, tIn, y]);
      pool.releaseBuffer(xBuf);
      pool.releaseBuffer(tBuf);
      giveUp(
        `cannot replay: ${rec.bad || "the output is not a float32 buffer"}`,
      );
    }
    return { out, replay };
  };

  const fn = ((x: tf.Tensor4D, t: tf.Tensor1D) => {
    const active = tf.backend();
    const b = active as unknown as Backend;
    if (
      fallback || !(active instanceof FastUploadBackend) ||
      tf.engine().isTapeOn() || b.activeTimers != null
    ) {
      return plain(x, t);
    }
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
      return replay.run(x, t);
    }
    if (s.state === "verify") {
      // Run both; compare bit for bit on the GPU, read the answer later.
      const want = plain(x, t);
      const got = replay.run(x, t);
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
