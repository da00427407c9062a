/**
 * Checkpoints: one `.safetensors` file that PyTorch reads and writes.
 *
 * | key                         | holds                                         |
 * |-----------------------------|-----------------------------------------------|
 * | `<name>`                    | live UNet weights, PyTorch layout             |
 * | `ema.<name>`                | EMA weights                                   |
 * | `optim.exp_avg.<name>`      | AdamW first moments m (`exp_avg`)             |
 * | `optim.exp_avg_sq.<name>`   | AdamW second moments v (`exp_avg_sq`)         |
 * | `__metadata__`              | `format` "ddpm", `config` (UNetConfig JSON),  |
 * |                             | `step`, `training` (JSON)                     |
 *
 * `<name>` runs over the reference's `state_dict` names, so after dropping
 * the prefixed keys `model.load_state_dict(load_file(path))` works, and a
 * plain `safetensors.torch.save_file(model.state_dict(), path)` loads here.
 *
 * Layouts: PyTorch on disk, TF in memory. A rank-4 weight goes torch -> TF
 * by transpose perm [2, 3, 1, 0] (conv OIHW -> HWIO; transposed conv
 * [in, out, kh, kw] -> [kh, kw, out, in]) and back by [3, 2, 0, 1]; a
 * rank-2 (linear) weight is transposed; everything else is unchanged.
 *
 * @module
 */
import { fileURLToPath } from "node:url";
import { tf } from "./backend.ts";
import { writeFileAtomic } from "./atomic.ts";
import {
  decodeSafetensors,
  encodeSafetensors,
  type SafetensorsInput,
  type SafetensorsTensor,
} from "./safetensors.ts";
import { UNet, type UNetConfig, unetParamShapes } from "./unet.ts";

/** A tensor on the host: row-major float32 values and their shape. */
export interface HostTensor {
  /** The shape. */
  shape: number[];
  /** The values, row-major; length is the product of `shape`. */
  data: Float32Array;
}

/** What {@linkcode saveCheckpoint} writes; tensors in TF layouts, keyed by state_dict names. */
export interface CheckpointState {
  /** The UNet's configuration. */
  config: UNetConfig;
  /** The live weights (for example `unet.params`). */
  params: ReadonlyMap<string, tf.Tensor>;
  /** EMA weights, same keys and shapes; omitted when absent. */
  ema?: ReadonlyMap<string, tf.Tensor>;
  /** AdamW moments, same keys and shapes as `params`; omitted when absent. */
  optimizer?: {
    /** First moments m. */
    expAvg: ReadonlyMap<string, tf.Tensor>;
    /** Second moments v. */
    expAvgSq: ReadonlyMap<string, tf.Tensor>;
  };
  /** Training steps taken; 0 by default. */
  step?: number;
  /** Training state to resume from (optimizer hyper-parameters, EMA settings, RNG seed): JSON-serializable. */
  training?: Record<string, unknown>;
}

/** A loaded checkpoint: tensors in TF layouts, owned by the caller until `dispose()`. */
export interface Checkpoint {
  /** The UNet's configuration, inferred from the weights' shapes. */
  config: UNetConfig;
  /** The live weights. */
  params: Map<string, tf.Tensor>;
  /** EMA weights, or null when the file has none. */
  ema: Map<string, tf.Tensor> | null;
  /** AdamW moments, or null when the file has none. */
  optimizer: {
    /** First moments m. */
    expAvg: Map<string, tf.Tensor>;
    /** Second moments v. */
    expAvgSq: Map<string, tf.Tensor>;
  } | null;
  /** Training steps taken (0 when the file does not say). */
  step: number;
  /** The `training` JSON, or null when the file has none. */
  training: Record<string, unknown> | null;
  /** The file's raw `__metadata__` strings. */
  metadata: Record<string, string>;
  /** Free every tensor of the checkpoint. */
  dispose(): void;
}

/** Options of {@linkcode loadUNet}. */
export interface LoadUNetOptions {
  /** Which weights to load: "ema" or "live"; by default EMA when the file has them, else live. */
  weights?: "ema" | "live";
}

type Group = "params" | "ema" | "expAvg" | "expAvgSq";

const PREFIX: Record<Group, string> = {
  params: "",
  ema: "ema.",
  expAvg: "optim.exp_avg.",
  expAvgSq: "optim.exp_avg_sq.",
};

const FLOAT_DTYPES = new Set(["F32", "F16", "BF16", "F64"]);

// ---------------------------------------------------------------- layouts

function permute(
  t: HostTensor,
  perm: readonly number[],
): HostTensor {
  const { shape, data } = t;
  const rank = shape.length;
  const strides = new Array<number>(rank);
  for (let i = rank - 1, s = 1; i >= 0; i--) {
    strides[i] = s;
    s *= shape[i];
  }
  const outShape = perm.map((p) => shape[p]);
  const outStrides = perm.map((p) => strides[p]);
  const out = new Float32Array(data.length);
  if (rank === 2) {
    const [a, b] = outShape;
    const [sa, sb] = outStrides;
    let k = 0;
    for (let i = 0; i < a; i++) {
      for (let j = 0; j < b; j++) out[k++] = data[i * sa + j * sb];
    }
  } else {
    const [a, b, c, d] = outShape;
    const [sa, sb, sc, sd] = outStrides;
    let k = 0;
    for (let i = 0; i < a; i++) {
      for (let j = 0; j < b; j++) {
        for (let l = 0; l < c; l++) {
          const base = i * sa + j * sb + l * sc;
          for (let m = 0; m < d; m++) out[k++] = data[base + m * sd];
        }
      }
    }
  }
  return { shape: outShape, data: out };
}

function checkHost(what: string, t: HostTensor): void {
  const count = t.shape.reduce((a, b) => a * b, 1);
  if (count !== t.data.length) {
    throw new TypeError(
      `Cannot convert ${what}: shape does not match data (got [${t.shape}] for ${t.data.length} values, expected ${count} values)`,
    );
  }
}

/**
 * Convert a host tensor from PyTorch layout to TF layout.
 *
 * Rank 4 (conv OIHW, transposed conv [in, out, kh, kw]): perm [2, 3, 1, 0];
 * rank 2 (linear [out, in]): transpose; other ranks: unchanged (copied).
 *
 * @param t The tensor in PyTorch layout.
 * @returns A new tensor in TF layout.
 * @example
 * ```ts
 * import { toTfLayout } from "./checkpoint.ts";
 * // Linear weight [out 2, in 3] -> [in 3, out 2].
 * const w = toTfLayout({ shape: [2, 3], data: new Float32Array([1, 2, 3, 4, 5, 6]) });
 * console.log(w.shape, w.data); // [ 3, 2 ] Float32Array(6) [ 1, 4, 2, 5, 3, 6 ]
 * ```
 */
export function toTfLayout(t: HostTensor): HostTensor {
  checkHost("to TF layout", t);
  if (t.shape.length === 4) return permute(t, [2, 3, 1, 0]);
  if (t.shape.length === 2) return permute(t, [1, 0]);
  return { shape: [...t.shape], data: t.data.slice() };
}

/**
 * Convert a host tensor from TF layout to PyTorch layout: the inverse of {@linkcode toTfLayout}.
 *
 * Rank 4: perm [3, 2, 0, 1]; rank 2: transpose; other ranks: unchanged (copied).
 *
 * @param t The tensor in TF layout.
 * @returns A new tensor in PyTorch layout.
 * @example
 * ```ts
 * import { toTorchLayout } from "./checkpoint.ts";
 * // A 1x1 conv in TF layout [kh 1, kw 1, in 2, out 3] -> OIHW [3, 2, 1, 1].
 * const w = toTorchLayout({ shape: [1, 1, 2, 3], data: new Float32Array([1, 2, 3, 4, 5, 6]) });
 * console.log(w.shape, w.data); // [ 3, 2, 1, 1 ] Float32Array(6) [ 1, 4, 2, 5, 3, 6 ]
 * ```
 */
export function toTorchLayout(t: HostTensor): HostTensor {
  checkHost("to PyTorch layout", t);
  if (t.shape.length === 4) return permute(t, [3, 2, 0, 1]);
  if (t.shape.length === 2) return permute(t, [1, 0]);
  return { shape: [...t.shape], data: t.data.slice() };
}

function tfShape(torchShape: readonly number[]): number[] {
  const s = torchShape;
  if (s.length === 4) return [s[2], s[3], s[1], s[0]];
  if (s.length === 2) return [s[1], s[0]];
  return [...s];
}

const fmt = (s: readonly number[]) => `[${s.join(", ")}]`;
const sameShape = (a: readonly number[], b: readonly number[]) =>
  a.length === b.length && a.every((d, i) => d === b[i]);

// ---------------------------------------------------------------- saving

/**
 * Serialize a checkpoint to safetensors bytes (weights in PyTorch layout).
 *
 * @param state The config, live weights and optionally EMA weights, AdamW
 *   moments, step and training state; tensors in TF layouts.
 * @returns The file's bytes.
 * @throws {TypeError} When a map lacks a parameter, has an extra one, or one has the wrong shape.
 * @example
 * ```ts
 * import { encodeCheckpoint } from "./checkpoint.ts";
 * import { initBackend } from "./backend.ts";
 * import { UNet } from "./unet.ts";
 * await initBackend("cpu");
 * const unet = new UNet({ base: 8, seed: 0 });
 * const bytes = await encodeCheckpoint({ config: unet.config, params: unet.params, step: 3 });
 * console.log(bytes.length > 0); // true
 * unet.dispose();
 * ```
 */
export async function encodeCheckpoint(
  state: CheckpointState,
): Promise<Uint8Array<ArrayBuffer>> {
  const { config } = state;
  const shapes = unetParamShapes(config);
  const groups: [Group, ReadonlyMap<string, tf.Tensor>][] = [[
    "params",
    state.params,
  ]];
  if (state.ema) groups.push(["ema", state.ema]);
  if (state.optimizer) {
    groups.push(["expAvg", state.optimizer.expAvg]);
    groups.push(["expAvgSq", state.optimizer.expAvgSq]);
  }
  const step = state.step ?? 0;
  if (!Number.isSafeInteger(step) || step < 0) {
    throw new RangeError(
      `Cannot save checkpoint: step must be a non-negative integer (got ${step})`,
    );
  }
  // Validate everything before reading anything back from the device.
  for (const [group, map] of groups) {
    for (const [key, torchShape] of shapes) {
      const t = map.get(key);
      const expected = tfShape(torchShape);
      if (t === undefined) {
        throw new TypeError(
          `Cannot save checkpoint: ${group} has no "${key}" (got none, expected shape ${
            fmt(expected)
          })`,
        );
      }
      if (!sameShape(t.shape, expected)) {
        throw new TypeError(
          `Cannot save checkpoint: ${group} "${key}" has the wrong shape (got ${
            fmt(t.shape)
          }, expected ${fmt(expected)})`,
        );
      }
      if (t.dtype !== "float32") {
        throw new TypeError(
          `Cannot save checkpoint: ${group} "${key}" is not float32 (got ${t.dtype}, expected float32)`,
        );
      }
    }
    for (const key of map.keys()) {
      if (!shapes.has(key)) {
        throw new TypeError(
          `Cannot save checkpoint: ${group} has an unexpected key "${key}" (got it, expected only the UNet's ${shapes.size} parameters)`,
        );
      }
    }
  }
  const training = state.training === undefined
    ? undefined
    : JSON.stringify(state.training);
  const tensors = new Map<string, SafetensorsInput>();
  for (const [group, map] of groups) {
    for (const key of shapes.keys()) {
      const t = map.get(key)!;
      const data = await t.data() as Float32Array;
      tensors.set(PREFIX[group] + key, toTorchLayout({ shape: t.shape, data }));
    }
  }
  const metadata: Record<string, string> = {
    format: "ddpm",
    config: JSON.stringify({
      inChannels: config.inChannels,
      base: config.base,
      timeDim: config.timeDim,
    }),
    step: String(step),
  };
  if (training !== undefined) metadata.training = training;
  return encodeSafetensors(tensors, metadata);
}

/**
 * Write a checkpoint to `path`, crash-safely: to a temporary name in the same directory, then renamed.
 *
 * @param path The `.safetensors` file to write (a path or a file: URL).
 * @param state The config, live weights and optionally EMA weights, AdamW
 *   moments, step and training state; tensors in TF layouts.
 * @returns Nothing; resolves once the file is in place.
 * @throws {TypeError} When the state does not match its config.
 * @example
 * ```ts
 * import { loadCheckpoint, saveCheckpoint } from "./checkpoint.ts";
 * import { initBackend } from "./backend.ts";
 * import { UNet } from "./unet.ts";
 * await initBackend("cpu");
 * const unet = new UNet({ base: 8, seed: 0 });
 * const dir = await Deno.makeTempDir();
 * await saveCheckpoint(`${dir}/unet.safetensors`, { config: unet.config, params: unet.params, step: 10 });
 * const ckpt = await loadCheckpoint(`${dir}/unet.safetensors`);
 * console.log(ckpt.step, ckpt.config.base); // 10 8
 * ckpt.dispose();
 * unet.dispose();
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function saveCheckpoint(
  path: string | URL,
  state: CheckpointState,
): Promise<void> {
  const file = path instanceof URL ? fileURLToPath(path) : path;
  await writeFileAtomic(file, await encodeCheckpoint(state));
}

// ---------------------------------------------------------------- loading

async function readSource(
  source: string | URL | Uint8Array,
): Promise<{ bytes: Uint8Array; name: string }> {
  if (source instanceof Uint8Array) return { bytes: source, name: "<bytes>" };
  if (source instanceof URL && source.protocol !== "file:") {
    const res = await fetch(source);
    if (!res.ok) {
      await res.body?.cancel();
      throw new Error(
        `Cannot load checkpoint "${source.href}": HTTP ${res.status} ${res.statusText} (expected 200)`,
      );
    }
    return {
      bytes: new Uint8Array(await res.arrayBuffer()),
      name: source.href,
    };
  }
  const name = source instanceof URL ? fileURLToPath(source) : source;
  return { bytes: await Deno.readFile(name), name };
}

interface Parsed {
  config: UNetConfig;
  groups: Map<Group, Map<string, SafetensorsTensor>>;
  metadata: Record<string, string>;
}

function groupOf(key: string): [Group, string] {
  if (key.startsWith(PREFIX.ema)) return ["ema", key.slice(PREFIX.ema.length)];
  if (key.startsWith(PREFIX.expAvgSq)) {
    return ["expAvgSq", key.slice(PREFIX.expAvgSq.length)];
  }
  if (key.startsWith(PREFIX.expAvg)) {
    return ["expAvg", key.slice(PREFIX.expAvg.length)];
  }
  return ["params", key];
}

/** Decode, group by prefix, infer the config, and check every key's presence, dtype and shape. */
function parse(bytes: Uint8Array, file: string): Parsed {
  const { tensors, metadata } = decodeSafetensors(bytes, { name: file });
  const fail = (why: string) =>
    new TypeError(`Cannot load checkpoint "${file}": ${why}`);

  const groups = new Map<Group, Map<string, SafetensorsTensor>>();
  for (const [key, t] of tensors) {
    const [group, name] = groupOf(key);
    if (!groups.has(group)) groups.set(group, new Map());
    groups.get(group)!.set(name, t);
  }

  // Infer the config from the live weights, or from the EMA ones when alone.
  const source = groups.get("params") ?? groups.get("ema");
  const prefix = groups.has("params") ? "" : "ema.";
  const inConv = source?.get("in_conv.weight");
  if (inConv === undefined) {
    throw fail(
      `missing key "${prefix}in_conv.weight" (got none, expected shape [base, inChannels, 3, 3])`,
    );
  }
  if (inConv.shape.length !== 4) {
    throw fail(
      `key "${prefix}in_conv.weight" has the wrong shape (got ${
        fmt(inConv.shape)
      }, expected [base, inChannels, 3, 3])`,
    );
  }
  const time0 = source!.get("time.mlp.0.weight");
  if (time0 === undefined) {
    throw fail(
      `missing key "${prefix}time.mlp.0.weight" (got none, expected shape [timeDim, timeDim])`,
    );
  }
  if (time0.shape.length !== 2) {
    throw fail(
      `key "${prefix}time.mlp.0.weight" has the wrong shape (got ${
        fmt(time0.shape)
      }, expected [timeDim, timeDim])`,
    );
  }
  const config: UNetConfig = {
    inChannels: inConv.shape[1],
    base: inConv.shape[0],
    timeDim: time0.shape[0],
  };
  let shapes: Map<string, number[]>;
  try {
    shapes = unetParamShapes(config);
  } catch (e) {
    throw fail(
      `weights describe no valid UNet (got inChannels ${config.inChannels}, base ${config.base}, timeDim ${config.timeDim}: ${
        e instanceof Error ? e.message : e
      })`,
    );
  }

  if (metadata.config !== undefined) {
    let stated: Partial<UNetConfig>;
    try {
      stated = JSON.parse(metadata.config);
    } catch {
      throw fail(
        `metadata "config" is not JSON (got ${
          JSON.stringify(metadata.config)
        })`,
      );
    }
    const keys = ["inChannels", "base", "timeDim"] as const;
    if (keys.some((k) => stated?.[k] !== config[k])) {
      throw fail(
        `metadata "config" disagrees with the weights' shapes (got ${metadata.config}, expected ${
          JSON.stringify(config)
        })`,
      );
    }
  }

  for (const [group, map] of groups) {
    for (const [name, torchShape] of shapes) {
      const t = map.get(name);
      const key = PREFIX[group] + name;
      if (t === undefined) {
        throw fail(
          `missing key "${key}" (got none, expected shape ${fmt(torchShape)})`,
        );
      }
      if (!sameShape(t.shape, torchShape)) {
        throw fail(
          `key "${key}" has the wrong shape (got ${fmt(t.shape)}, expected ${
            fmt(torchShape)
          })`,
        );
      }
      if (!FLOAT_DTYPES.has(t.dtype)) {
        throw fail(
          `key "${key}" is not a float tensor (got ${t.dtype}, expected F32, F16, BF16 or F64)`,
        );
      }
    }
    for (const [name, t] of map) {
      if (!shapes.has(name)) {
        throw fail(
          `unexpected key "${PREFIX[group] + name}" (got shape ${
            fmt(t.shape)
          }, expected none: not a parameter of UNet ${JSON.stringify(config)})`,
        );
      }
    }
  }
  if (groups.has("expAvg") !== groups.has("expAvgSq")) {
    const missing = groups.has("expAvg") ? "expAvgSq" : "expAvg";
    throw fail(
      `missing key "${
        PREFIX[missing]
      }in_conv.weight" (got none, expected both AdamW moments or neither)`,
    );
  }
  return { config, groups, metadata };
}

/** Device tensors in TF layout for one validated group, in state_dict order. */
function toTensors(
  config: UNetConfig,
  map: Map<string, SafetensorsTensor>,
): Map<string, tf.Tensor> {
  const out = new Map<string, tf.Tensor>();
  for (const key of unetParamShapes(config).keys()) {
    const t = map.get(key)!;
    const { shape, data } = toTfLayout({
      shape: t.shape,
      data: t.data as Float32Array,
    });
    out.set(key, tf.tensor(data, shape, "float32"));
  }
  return out;
}

/**
 * Read a checkpoint: live weights, and EMA weights, AdamW moments, step and training state when present.
 *
 * A plain PyTorch state_dict (no metadata, no prefixed keys) loads too.
 *
 * @param source A path, a URL (file:, http: or https:), or the file's bytes.
 * @returns The checkpoint, tensors in TF layouts; call `dispose()` to free them.
 * @throws {SafetensorsError} When the file is not valid safetensors.
 * @throws {TypeError} When a key is missing, unexpected or mis-shaped, or the metadata is malformed.
 * @example
 * ```ts
 * import { encodeCheckpoint, loadCheckpoint } from "./checkpoint.ts";
 * import { initBackend } from "./backend.ts";
 * import { UNet } from "./unet.ts";
 * await initBackend("cpu");
 * const unet = new UNet({ base: 8, seed: 0 });
 * const bytes = await encodeCheckpoint({ config: unet.config, params: unet.params, ema: unet.params });
 * const ckpt = await loadCheckpoint(bytes);
 * console.log(ckpt.config, ckpt.ema !== null); // { inChannels: 1, base: 8, timeDim: 32 } true
 * ckpt.dispose();
 * unet.dispose();
 * ```
 */
export async function loadCheckpoint(
  source: string | URL | Uint8Array,
): Promise<Checkpoint> {
  const { bytes, name } = await readSource(source);
  const { config, groups, metadata } = parse(bytes, name);
  const fail = (why: string) =>
    new TypeError(`Cannot load checkpoint "${name}": ${why}`);
  if (!groups.has("params")) {
    throw fail(
      `missing key "in_conv.weight" (got only prefixed keys, expected the live weights unprefixed)`,
    );
  }
  let step = 0;
  if (metadata.step !== undefined) {
    step = Number(metadata.step);
    if (!/^\d+$/.test(metadata.step) || !Number.isSafeInteger(step)) {
      throw fail(
        `metadata "step" is not a non-negative integer (got ${
          JSON.stringify(metadata.step)
        })`,
      );
    }
  }
  let training: Record<string, unknown> | null = null;
  if (metadata.training !== undefined) {
    try {
      training = JSON.parse(metadata.training);
    } catch {
      training = null;
    }
    if (
      training === null || typeof training !== "object" ||
      Array.isArray(training)
    ) {
      throw fail(
        `metadata "training" is not a JSON object (got ${
          JSON.stringify(metadata.training.slice(0, 40))
        })`,
      );
    }
  }
  const params = toTensors(config, groups.get("params")!);
  const ema = groups.has("ema") ? toTensors(config, groups.get("ema")!) : null;
  const optimizer = groups.has("expAvg")
    ? {
      expAvg: toTensors(config, groups.get("expAvg")!),
      expAvgSq: toTensors(config, groups.get("expAvgSq")!),
    }
    : null;
  return {
    config,
    params,
    ema,
    optimizer,
    step,
    training,
    metadata,
    dispose() {
      for (const map of [params, ema, optimizer?.expAvg, optimizer?.expAvgSq]) {
        if (map) tf.dispose([...map.values()]);
      }
    },
  };
}

/**
 * Load a UNet from a checkpoint or a plain PyTorch state_dict, its config inferred from the shapes.
 *
 * EMA weights are preferred when the file has them, unless `weights: "live"`.
 *
 * @param source A path, a URL (file:, http: or https:), or the file's bytes.
 * @param options `weights`: "ema" or "live" to choose; by default EMA when present.
 * @returns The UNet; call `dispose()` when done.
 * @throws {SafetensorsError} When the file is not valid safetensors.
 * @throws {TypeError} When a key is missing, unexpected or mis-shaped, or the chosen weights are absent.
 * @example
 * ```ts
 * import { encodeCheckpoint, loadUNet } from "./checkpoint.ts";
 * import { initBackend, tf } from "./backend.ts";
 * import { UNet } from "./unet.ts";
 * await initBackend("cpu");
 * const trained = new UNet({ base: 8, seed: 1 });
 * const bytes = await encodeCheckpoint({ config: trained.config, params: trained.params });
 * const unet = await loadUNet(bytes);
 * const eps = unet.predict(tf.zeros([1, 32, 32, 1]), tf.tensor1d([10], "int32"));
 * console.log(eps.shape); // [1, 32, 32, 1]
 * tf.dispose(eps);
 * unet.dispose();
 * trained.dispose();
 * ```
 */
export async function loadUNet(
  source: string | URL | Uint8Array,
  options: LoadUNetOptions = {},
): Promise<UNet> {
  const { weights } = options;
  if (weights !== undefined && weights !== "ema" && weights !== "live") {
    throw new RangeError(
      `Cannot load UNet: unknown weights option (got ${
        JSON.stringify(weights)
      }, expected "ema" or "live")`,
    );
  }
  const { bytes, name } = await readSource(source);
  const { config, groups } = parse(bytes, name);
  const group: Group = weights === "live"
    ? "params"
    : weights === "ema" || groups.has("ema")
    ? "ema"
    : "params";
  const chosen = groups.get(group);
  if (chosen === undefined) {
    throw new TypeError(
      `Cannot load UNet from "${name}": no ${
        group === "ema" ? "EMA" : "live"
      } weights in the file (got none, expected keys like "${
        PREFIX[group]
      }in_conv.weight")`,
    );
  }
  const params = toTensors(config, chosen);
  try {
    return UNet.fromParams(config, params);
  } catch (e) {
    tf.dispose([...params.values()]);
    throw e;
  }
}
