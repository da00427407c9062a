/**
 * A helper thread of ddpm's Winograd convolution in tfjs's threaded wasm
 * build (see core/_wasm_winograd.ts for the protocol). A
 * `node:worker_threads` worker, so that Deno can unref it: an idle helper,
 * blocked in `Atomics.wait`, does not keep the process alive. One message
 * in: `{ memory, ctrl, index }` (tfjs's shared memory, the control block,
 * this helper's index); then it waits for jobs for as long as it lives.
 *
 * @module
 */
import { parentPort } from "node:worker_threads";
import { kernelBytes } from "./_wasm_kernels_bin.ts";
import {
  CHUNKS,
  DONE,
  FAILED,
  JOB,
  readJob,
  READY,
  runChunks,
  SCRATCH,
  TAKEN,
  type WinogradKernels,
} from "./_wasm_winograd.ts";

parentPort?.once("message", (data: unknown) => {
  const { memory, ctrl: buffer, index } = data as {
    memory: WebAssembly.Memory;
    ctrl: SharedArrayBuffer;
    index: number;
  };
  const ctrl = new Int32Array(buffer);
  const k = new WebAssembly.Instance(
    new WebAssembly.Module(kernelBytes(true)),
    {
      env: { memory },
    },
  ).exports as unknown as WinogradKernels;
  let seen = Atomics.load(ctrl, JOB);
  Atomics.store(ctrl, READY + index, 1);
  for (;;) {
    Atomics.wait(ctrl, JOB, seen);
    const job = Atomics.load(ctrl, JOB);
    seen = job;
    // Claim the job, unless the caller (or another helper) already moved on.
    const taken = TAKEN + index;
    if (Atomics.compareExchange(ctrl, taken, job - 1, job) !== job - 1) {
      continue;
    }
    try {
      runChunks(
        k,
        readJob(ctrl),
        ctrl,
        ctrl[SCRATCH + 2 * index],
        ctrl[SCRATCH + 2 * index + 1],
        CHUNKS + index,
      );
    } catch {
      Atomics.store(ctrl, FAILED, 1);
    }
    Atomics.store(ctrl, DONE + index, job);
    Atomics.notify(ctrl, DONE + index);
  }
});
