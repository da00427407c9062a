/**
 * Worker side of the data-parallel training step (see `_parallel.ts`): a
 * UNet replica that, given the current weights and a shard of the batch,
 * returns the shard's share of the loss and its gradients.
 *
 * A `node:worker_threads` worker. Messages in: `{ kind: "init", config, backend, keys, threads }`, then
 * `{ kind: "step", id, buffer, weights, shape, total }` (the arrays in a
 * shared buffer: see `StepMessage` in `_parallel.ts`). Out:
 * `{ kind: "ready" }`, `{ kind: "grads", id, loss, grads }` or
 * `{ kind: "error", id, message }`.
 *
 * @module
 */
import { parentPort } from "node:worker_threads";
import { setWasmThreads } from "./wasm_threads.ts";
import { activateCpuBackend, tf } from "./backend.ts";
import { UNet, type UNetConfig } from "./unet.ts";
import { shardLoss, type StepMessage, unpack } from "./_parallel.ts";

interface InitMessage {
  kind: "init";
  config: UNetConfig;
  backend: "wasm" | "cpu";
  keys: string[];
  threads: number;
}

let unet: UNet | null = null;
let keys: string[] = [];

function post(message: unknown, transfer: ArrayBuffer[] = []): void {
  parentPort!.postMessage(message, transfer);
}

async function init(m: InitMessage): Promise<void> {
  setWasmThreads(m.threads);
  await activateCpuBackend(m.backend);
  unet = new UNet({ ...m.config, seed: 0 });
  keys = m.keys;
  post({ kind: "ready", backend: tf.getBackend() });
}

async function step(message: StepMessage): Promise<void> {
  const m = unpack(message);
  const model = unet!;
  if (m.weights !== null) {
    tf.tidy(() => {
      keys.forEach((k, i) => {
        const v = model.params.get(k)!;
        v.assign(tf.tensor(m.weights![i], v.shape, "float32"));
      });
    });
  }
  const { loss, grads } = tf.tidy(() => {
    const xt = tf.tensor4d(m.xt, m.shape);
    const eps = tf.tensor4d(m.eps, m.shape);
    const t = tf.tensor1d(m.t, "int32");
    const vars = keys.map((k) => model.params.get(k)!);
    const { value, grads } = tf.variableGrads(
      () => shardLoss(model.predict(xt, t), eps, m.total),
      vars,
    );
    return {
      loss: value,
      grads: vars.map((v) => grads[v.name] ?? tf.zerosLike(v)),
    };
  });
  const values = await Promise.all([loss, ...grads].map((g) => g.data()));
  tf.dispose([loss, ...grads]);
  // Copies: a cpu-backend read may be the tensor's own storage.
  const arrays = values.slice(1).map((a) => (a as Float32Array).slice());
  post(
    { kind: "grads", id: message.id, loss: values[0][0], grads: arrays },
    arrays.map((a) => a.buffer as ArrayBuffer),
  );
}

let queue = Promise.resolve();
// Inert when imported outside a worker (a doc-test run imports every module).
parentPort?.on("message", (data: unknown) => {
  const m = data as InitMessage | StepMessage;
  queue = queue.then(async () => {
    try {
      if (m.kind === "init") await init(m);
      else await step(m);
    } catch (err) {
      post({
        kind: "error",
        id: m.kind === "step" ? m.id : -1,
        message: err instanceof Error ? err.message : String(err),
      });
    }
  });
});
