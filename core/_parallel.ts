/**
 * Data parallelism for the training step: the batch is cut into contiguous
 * shards, the main thread computes the first and Deno module workers (each
 * with a UNet replica on its own tfjs) the others; the gradients are summed
 * on the main thread, which then clips and updates once.
 *
 * Each shard's loss is its share of the batch's mean, sum((pred - eps)^2)
 * over the shard divided by the element count of the whole batch, so the
 * shards' losses and gradients add up to the full batch's (up to float
 * summation order).
 *
 * @module
 */
import { Worker as NodeWorker } from "node:worker_threads";
import { tf } from "./backend.ts";
import type { UNetConfig } from "./unet.ts";

/**
 * A shard's share of the batch's mean squared error: sum((pred - eps)^2) / total.
 *
 * @param pred The shard's noise prediction.
 * @param eps The shard's noise.
 * @param total Number of elements in the whole batch.
 * @returns A scalar; the shards' values add up to the batch's mean.
 */
export function shardLoss(
  pred: tf.Tensor,
  eps: tf.Tensor,
  total: number,
): tf.Scalar {
  return tf.tidy(() =>
    tf.div(tf.sum(tf.squaredDifference(pred, eps)), total) as tf.Scalar
  );
}

/**
 * Cut `n` rows into at most `k` contiguous shards whose sizes differ by at
 * most one, the larger first; empty shards are left out.
 *
 * @param n Rows (batch size).
 * @param k Shards wanted.
 * @returns `[start, count]` per shard, in order.
 */
export function shardRows(n: number, k: number): [number, number][] {
  const out: [number, number][] = [];
  const size = Math.floor(n / k);
  const extra = n % k;
  let start = 0;
  for (let i = 0; i < k; i++) {
    const count = size + (i < extra ? 1 : 0);
    if (count > 0) out.push([start, count]);
    start += count;
  }
  return out;
}

/** What a worker returns for its shard. */
export interface ShardResult {
  /** The shard's share of the batch loss. */
  loss: number;
  /** Gradients in the pool's key order. */
  grads: Float32Array[];
}

/** One shard's inputs, host arrays. */
export interface ShardInput {
  /** Current weights in the pool's key order, or null if the worker has them. */
  weights: Float32Array[] | null;
  /** x_t of the shard, NHWC. */
  xt: Float32Array;
  /** Timesteps of the shard. */
  t: Int32Array;
  /** Noise of the shard, NHWC. */
  eps: Float32Array;
  /** `[count, H, W, C]`. */
  shape: [number, number, number, number];
  /** Elements in the whole batch. */
  total: number;
}

/**
 * A step's message to a worker: the shard's arrays travel in a
 * SharedArrayBuffer of the pool's, kept per worker and reused, not in the
 * message: Deno delivers a `node:worker_threads` message to a worker at
 * about 50 MB/s (a base-64 UNet's 17 MB of weights took 300-500 ms a step,
 * a tenth of it), transferred buffers included, where a shared buffer costs
 * its copy in (about 3 ms).
 */
export interface StepMessage {
  kind: "step";
  id: number;
  /** Holds, in order: the weights (if sent), xt, eps and t. */
  buffer: SharedArrayBuffer;
  /** Elements of each weight, or null if the worker has them. */
  weights: number[] | null;
  shape: [number, number, number, number];
  total: number;
}

/** A shard's arrays in {@linkcode StepMessage}'s order. */
function shardArrays(input: ShardInput): (Float32Array | Int32Array)[] {
  return [...(input.weights ?? []), input.xt, input.eps, input.t];
}

/**
 * The bytes a shard's arrays take in the shared buffer.
 *
 * @param input The shard's inputs.
 * @returns Their total byte length.
 */
export function packedBytes(input: ShardInput): number {
  return shardArrays(input).reduce((s, a) => s + a.byteLength, 0);
}

/**
 * Pack a shard's arrays into `buffer` (at least {@linkcode packedBytes}
 * long) in {@linkcode StepMessage}'s order.
 *
 * @param buffer The shared buffer.
 * @param input The shard's inputs.
 */
export function pack(buffer: SharedArrayBuffer, input: ShardInput): void {
  let at = 0;
  for (const a of shardArrays(input)) {
    new Uint8Array(buffer, at, a.byteLength).set(
      new Uint8Array(a.buffer, a.byteOffset, a.byteLength),
    );
    at += a.byteLength;
  }
}

/**
 * Unpack a step's arrays, as copies (a backend may keep an array it is
 * given, and the pool rewrites the buffer for the next step).
 *
 * @param m The step message.
 * @returns The shard's inputs.
 */
export function unpack(m: StepMessage): ShardInput {
  let at = 0;
  const take = <T extends Float32Array | Int32Array>(
    make: (b: SharedArrayBuffer, at: number, n: number) => T,
    n: number,
  ): T => {
    const view = make(m.buffer, at, n);
    at += view.byteLength;
    return view.slice() as T;
  };
  const f32 = (b: SharedArrayBuffer, o: number, n: number) =>
    new Float32Array(b, o, n);
  const per = m.shape.reduce((a, b) => a * b, 1);
  const weights = m.weights?.map((n) => take(f32, n)) ?? null;
  const xt = take(f32, per);
  const eps = take(f32, per);
  const t = take((b, o, n) => new Int32Array(b, o, n), m.shape[0]);
  return { weights, xt, eps, t, shape: m.shape, total: m.total };
}

interface Pending {
  resolve: (r: ShardResult) => void;
  reject: (e: Error) => void;
}

/**
 * Workers, each a UNet replica that computes a shard's loss and gradients.
 * Start with the constructor; free with {@linkcode GradientPool.dispose}.
 *
 * They are `node:worker_threads` workers, which Deno lets a process
 * unref: a worker holds the process open only while it starts or computes
 * a shard, so a trainer that is never disposed does not keep a finished
 * program from exiting.
 */
/** The longest a disposed pool keeps the process alive for its threads to end. */
const GRACE_MS = 5000;

export class GradientPool {
  /** Number of workers. */
  readonly size: number;
  /** Parameter keys, in the order weights and gradients travel. */
  readonly keys: readonly string[];
  #workers: NodeWorker[] = [];
  #busy: number[] = [];
  /** Per worker, the buffer its steps' arrays travel in. */
  #buffers: (SharedArrayBuffer | null)[] = [];
  #ready: Promise<void>;
  #pending = new Map<number, Pending & { worker: number }>();
  #nextId = 1;
  #failure: Error | null = null;
  #disposed = false;

  /**
   * Start `size` workers with UNet replicas.
   *
   * @param config The UNet's configuration.
   * @param keys Parameter keys, in the order weights and gradients travel.
   * @param size Number of workers, >= 1.
   * @param backend The tfjs backend each worker computes on.
   */
  constructor(
    config: UNetConfig,
    keys: string[],
    size: number,
    backend: "wasm" | "cpu",
  ) {
    this.size = size;
    this.keys = keys;
    const readies: Promise<void>[] = [];
    for (let i = 0; i < size; i++) {
      const worker = new NodeWorker(
        new URL("./_parallel_worker.ts", import.meta.url),
      );
      this.#workers.push(worker);
      this.#busy.push(0);
      this.#buffers.push(null);
      // Held open while it starts.
      this.#hold(i);
      readies.push(
        new Promise<void>((resolve, reject) => {
          worker.on("message", (m) => {
            if (m.kind === "ready") {
              this.#release(i);
              resolve();
            } else if (m.kind === "error" && m.id === -1) {
              this.#release(i);
              reject(new Error(`Cannot train in parallel: ${m.message}`));
            } else this.#receive(m);
          });
          const failed = (why: string) => {
            const err = new Error(
              `Cannot train in parallel: a worker failed (${why})`,
            );
            this.#fail(err);
            reject(err);
          };
          worker.on("error", (e: Error) => failed(e.message));
          worker.on("exit", (code: number) => {
            if (!this.#disposed) failed(`it exited with code ${code}`);
          });
        }),
      );
      worker.postMessage({ kind: "init", config, backend, keys, threads: 1 });
    }
    this.#ready = Promise.all(readies).then(() => {});
    // A failure before anyone awaits is reported by the next run().
    this.#ready.catch(() => {});
    // A pool nobody disposed is disposed when the program has nothing else
    // to do: a process that exits while its worker threads still live or
    // are being torn down sometimes crashed in Deno 2.9 (SIGSEGV).
    globalThis.addEventListener("beforeunload", this.#onBeforeUnload);
  }

  #onBeforeUnload = (): void => this.dispose();

  /** Keep the process alive for worker i (it is starting or computing). */
  #hold(i: number): void {
    if (this.#busy[i]++ === 0) this.#workers[i].ref();
  }

  /** Worker i is done with one task; unref it when it has none left. */
  #release(i: number): void {
    if (this.#busy[i] > 0 && --this.#busy[i] === 0) this.#workers[i].unref();
  }

  #receive(
    m: { kind: string; id: number; message?: string } & Partial<ShardResult>,
  ): void {
    const p = this.#pending.get(m.id);
    if (p === undefined) return;
    this.#pending.delete(m.id);
    this.#release(p.worker);
    if (m.kind === "grads") p.resolve({ loss: m.loss!, grads: m.grads! });
    else p.reject(new Error(`Cannot train in parallel: ${m.message}`));
  }

  #fail(err: Error): void {
    this.#failure ??= err;
    for (const p of this.#pending.values()) {
      this.#release(p.worker);
      p.reject(err);
    }
    this.#pending.clear();
  }

  /** Resolves when every worker has started; rejects if one failed to. */
  ready(): Promise<void> {
    return this.#ready;
  }

  /**
   * Compute one shard's loss and gradients on worker `i`. The message goes
   * out before this returns, so the worker computes while the caller does;
   * await {@linkcode GradientPool.ready} first.
   *
   * @param i Worker index in [0, size).
   * @param input The shard and, when they changed, the weights.
   * @returns The shard's loss share and gradients.
   */
  run(i: number, input: ShardInput): Promise<ShardResult> {
    if (this.#disposed) {
      return Promise.reject(
        new Error(
          "Cannot train in parallel: the worker pool was disposed (got a disposed pool, expected a live one)",
        ),
      );
    }
    if (this.#failure !== null) return Promise.reject(this.#failure);
    const id = this.#nextId++;
    const bytes = packedBytes(input);
    // The worker is done with its last step's arrays (steps are awaited
    // before the next starts), so the buffer is rewritten in place.
    let buffer = this.#buffers[i];
    if (buffer === null || buffer.byteLength < bytes) {
      buffer = this.#buffers[i] = new SharedArrayBuffer(bytes);
    }
    pack(buffer, input);
    const message: StepMessage = {
      kind: "step",
      id,
      buffer,
      weights: input.weights?.map((w) => w.length) ?? null,
      shape: input.shape,
      total: input.total,
    };
    return new Promise<ShardResult>((resolve, reject) => {
      this.#pending.set(id, { resolve, reject, worker: i });
      this.#hold(i);
      this.#workers[i].postMessage(message);
    });
  }

  /**
   * Terminate the workers; pending runs are rejected. The process stays
   * alive until they have exited. Called by itself when the program has
   * nothing else left to do.
   */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    globalThis.removeEventListener("beforeunload", this.#onBeforeUnload);
    // Keep the process alive until every thread has ended (or GRACE_MS has
    // passed), so that it does not end while they are torn down (see the
    // constructor).
    let left = this.#workers.length;
    const hold = setTimeout(() => {}, GRACE_MS);
    for (const w of this.#workers) {
      w.once("exit", () => {
        if (--left === 0) clearTimeout(hold);
      });
      w.terminate();
    }
    this.#fail(
      new Error(
        "Cannot train in parallel: the worker pool was disposed during a step",
      ),
    );
  }
}
