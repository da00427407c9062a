/**
 * Multithreaded wasm under Deno: tfjs's threaded-SIMD build with its
 * Emscripten pthreads hosted in workers Deno can run.
 *
 * tfjs turns wasm threads off when it sees Node.js (Deno exposes `process`),
 * and forcing them on fails three ways under Deno, each undone here while
 * the wasm backend initialises (and only then):
 *
 * 1. Emscripten, on its Node.js path, starts each pthread with
 *    `new (require("worker_threads").Worker)(blobUrl)`; Deno's Node workers
 *    take file paths only. The `Worker` of `node:worker_threads` is swapped
 *    for {@linkcode PthreadWorker}, which starts `_wasm_pthread_worker.js`
 *    (a file) and hands it the pthread script.
 * 2. That script is a classic web-worker script, and seeing `process` it
 *    would `require` Node modules; the worker file runs it and the module
 *    factory with `process` and `require` hidden (see that file).
 * 3. tfjs sizes XNNPACK's pool as `navigator.hardwareConcurrency / 2`
 *    (it assumes two hyper-threads a core), read through `os.cpus()` on
 *    the Node path: one thread on a two-core machine. `os.cpus()` reports
 *    twice the threads wanted while the module starts.
 *
 * Import for the effect (core/backend.ts does); {@linkcode setWasmThreads}
 * or DDPM_WASM_THREADS choose the count, 1 (tfjs's single-threaded
 * build, the stock behaviour under Deno) by default.
 *
 * The workers are unref'd: an idle pool does not keep the process alive.
 * Emscripten also sets the global `Worker` to the Node one; it is restored.
 * If the threaded build fails to start, the single-threaded one is used.
 *
 * @module
 */
import * as tf from "@tensorflow/tfjs-core";
import {
  getThreadsCount,
  setThreadsCount,
} from "@tensorflow/tfjs-backend-wasm";
import os from "node:os";
import workerThreads from "node:worker_threads";

/** Most threads tfjs's build can run (its pthread pool is eight workers). */
const MAX_THREADS = 8;

/** The Node.js worker class Deno provides (`ref`, `unref`, `on`). */
type NodeWorker = InstanceType<typeof workerThreads.Worker>;

/**
 * What Emscripten's Node.js path expects of a pthread worker, on a Deno
 * Node worker running `_wasm_pthread_worker.js`.
 */
class PthreadWorker {
  #worker: NodeWorker;
  #listeners = new Map<string, ((x: unknown) => void)[]>();
  onmessage: ((e: { data: unknown }) => void) | null = null;
  onerror: ((e: unknown) => void) | null = null;

  constructor(scriptUrl: string | URL) {
    this.#worker = new NodeWorkerClass(
      new URL("./_wasm_pthread_worker.js", import.meta.url),
    );
    this.#worker.postMessage({ __pthreadScript: String(scriptUrl) });
    this.#worker.on("message", (d: unknown) => this.#emit("message", d));
    this.#worker.on("error", (e: unknown) => this.#emit("error", e));
    this.#worker.unref();
  }

  #emit(kind: string, x: unknown): void {
    for (const f of this.#listeners.get(kind) ?? []) f(x);
  }

  on(kind: string, f: (x: unknown) => void): this {
    this.#listeners.set(kind, [...(this.#listeners.get(kind) ?? []), f]);
    return this;
  }

  ref(): void {}

  unref(): void {}

  postMessage(message: unknown, transfer?: Transferable[]): void {
    // deno-lint-ignore no-explicit-any
    this.#worker.postMessage(message, transfer as any);
  }

  terminate(): void {
    this.#worker.terminate();
  }
}

const NodeWorkerClass = workerThreads.Worker;

/**
 * Threads asked for: DDPM_WASM_THREADS, else 1. Not the core count by
 * default in the library: the trainer's gradient workers (its `workers`,
 * one per core by default) already use the other cores, and a threaded
 * main thread beside them would oversubscribe. `ddpm sample` and `ddpm
 * eval` ask for one thread per core (`--threads`).
 */
function wantedThreads(): number {
  let fromEnv: string | undefined;
  try {
    fromEnv = Deno.env.get("DDPM_WASM_THREADS");
  } catch {
    fromEnv = undefined; // no --allow-env: use the default
  }
  const n = fromEnv !== undefined && fromEnv !== "" ? Number(fromEnv) : 1;
  if (!Number.isFinite(n) || n < 1) return 1;
  return Math.min(Math.floor(n), MAX_THREADS);
}

let requested: number | null = null;
let started = 0;

/**
 * Choose the wasm backend's thread count; takes effect when the wasm
 * backend initialises (call before the first `initBackend("wasm")` of the
 * process). More than one runs tfjs's threaded-SIMD build, XNNPACK
 * splitting every op over the threads.
 *
 * @param n Threads, 1 (single-threaded) to 8; null for the default
 * (DDPM_WASM_THREADS, else 1).
 * @returns Nothing.
 * @example
 * ```ts
 * import { setWasmThreads } from "./wasm_threads.ts";
 * setWasmThreads(2); // before initBackend("wasm")
 * setWasmThreads(null); // back to the default
 * ```
 */
export function setWasmThreads(n: number | null): void {
  if (n !== null && !(Number.isInteger(n) && n >= 1 && n <= MAX_THREADS)) {
    throw new RangeError(
      `Cannot set wasm threads: count must be an integer in [1, ${MAX_THREADS}] (got ${n}, expected e.g. 2)`,
    );
  }
  requested = n;
}

/**
 * Threads the running wasm backend uses (0 before it has started).
 *
 * @returns The thread count of XNNPACK's pool, or 0.
 * @example
 * ```ts
 * import { initBackend } from "./backend.ts";
 * import { wasmThreads } from "./wasm_threads.ts";
 * await initBackend("wasm");
 * console.log(wasmThreads()); // 1 unless DDPM_WASM_THREADS says otherwise
 * ```
 */
export function wasmThreads(): number {
  return started;
}

async function startThreaded<T>(n: number, start: () => Promise<T>) {
  const wt = workerThreads as unknown as { Worker: unknown };
  const host = os as unknown as { cpus: () => unknown[] };
  const savedWorker = wt.Worker;
  const savedCpus = host.cpus;
  const savedGlobal = globalThis.Worker;
  wt.Worker = PthreadWorker;
  host.cpus = () => Array.from({ length: 2 * n }, () => savedCpus()[0] ?? {});
  // The pthread workers are unref'd from the start; while the backend waits
  // for them to load, a timer keeps the event loop from counting as idle
  // (Deno's test runner otherwise ends a test awaiting the start).
  const keepAlive = setInterval(() => {}, 1000);
  try {
    return await start();
  } finally {
    clearInterval(keepAlive);
    wt.Worker = savedWorker;
    host.cpus = savedCpus;
    globalThis.Worker = savedGlobal;
  }
}

/** Wrap tfjs's wasm factory so that it starts threaded, falling back to one thread. */
function install(): void {
  const entry = tf.engine().registryFactory["wasm"];
  if (entry === undefined) return;
  const original = entry.factory as () => Promise<tf.KernelBackend>;
  entry.factory = async () => {
    const n = requested ?? wantedThreads();
    if (n > 1 && typeof SharedArrayBuffer !== "undefined") {
      tf.env().set("WASM_HAS_MULTITHREAD_SUPPORT", true);
      setThreadsCount(n);
      try {
        const backend = await startThreaded(n, original);
        started = getThreadsCount();
        return backend;
      } catch {
        // fall back to the single-threaded build below
      }
    }
    tf.env().set("WASM_HAS_MULTITHREAD_SUPPORT", false);
    setThreadsCount(1);
    const backend = await original();
    started = 1;
    return backend;
  };
}

install();
