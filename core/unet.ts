/**
 * The reference UNet (tests/reference/ddpm_reference.py), NHWC, with
 * parameters keyed by the PyTorch `state_dict` names.
 *
 * ```
 * t -> sinusoidal(timeDim) -> Linear -> SiLU -> Linear          "time.mlp.{0,2}"
 * x -> in_conv 3x3 -> down1 = s1 -> ds1 3x3 s2 -> down2 = s2 -> ds2 3x3 s2
 *   -> mid1 -> mid2 -> us2 (4x4 s2 transposed) -> cat(., s2) -> up2
 *   -> us1 (4x4 s2 transposed) -> cat(., s1) -> up1
 *   -> out_norm -> SiLU -> out_conv 3x3 -> eps
 * ResBlock: h = conv1(SiLU(norm1(x))) + time_proj(SiLU(temb))
 *           return conv2(SiLU(norm2(h))) + skip(x)
 * ```
 *
 * Weights live in TF layouts: conv `[kh, kw, in, out]`, transposed conv
 * `[kh, kw, out, in]`, linear `[in, out]`, the rest `[C]`. PyTorch's layouts
 * (conv OIHW, transposed conv `[in, out, kh, kw]`, linear `[out, in]`)
 * convert with transpose perm [2, 3, 1, 0] for rank 4 and a plain transpose
 * for rank 2. The convolutions come from `_conv.ts`, so gradients work on
 * every backend, wasm included.
 *
 * @module
 */
import { tf } from "./backend.ts";
import { conv2d, conv2dTranspose } from "./_conv.ts";
import { linear, silu, sinusoidalEmbedding } from "./_layers.ts";
import { normActConv, resBlock } from "./_resblock.ts";

/** The UNet's hyper-parameters, as the reference's `UNet(in_ch, base, time_dim)`. */
export interface UNetConfig {
  /** Image channels in and out (1 for MNIST). */
  inChannels: number;
  /** Channels at full resolution; 2 base and 4 base below. A multiple of 8 (GroupNorm(8)). */
  base: number;
  /** Width of the timestep embedding; even and at least 4. */
  timeDim: number;
}

/** The UNet's trainable weights by PyTorch `state_dict` name, in TF layouts. */
export type ParamMap = Map<string, tf.Variable>;

const GROUPS = 8;

/** Validate a config, filling the reference's defaults (1, 64, 4 base). */
function resolveConfig(config: Partial<UNetConfig>, what: string): UNetConfig {
  const base = config.base ?? 64;
  const full = {
    inChannels: config.inChannels ?? 1,
    base,
    timeDim: config.timeDim ?? 4 * base,
  };
  for (const [key, value] of Object.entries(full)) {
    if (typeof value !== "number") {
      throw new TypeError(
        `Cannot ${what}: ${key} must be a number (got ${typeof value}, expected a positive integer)`,
      );
    }
    if (!Number.isInteger(value) || value < 1) {
      throw new RangeError(
        `Cannot ${what}: ${key} must be a positive integer (got ${value}, expected 1, 2, ...)`,
      );
    }
  }
  if (full.base % GROUPS !== 0) {
    throw new RangeError(
      `Cannot ${what}: base must be a multiple of ${GROUPS} for GroupNorm(${GROUPS}) (got ${full.base}, expected 8, 16, ...)`,
    );
  }
  if (full.timeDim % 2 !== 0 || full.timeDim < 4) {
    throw new RangeError(
      `Cannot ${what}: timeDim must be even and at least 4 (got ${full.timeDim}, expected 4, 6, 8, ...)`,
    );
  }
  return full;
}

/** The (name, in, out) of each ResBlock, and where the other layers sit, in state_dict order. */
type Layer =
  | { kind: "linear"; name: string; in: number; out: number }
  | { kind: "conv"; name: string; in: number; out: number; k: number }
  | { kind: "convT"; name: string; in: number; out: number; k: number }
  | { kind: "norm"; name: string; channels: number }
  | { kind: "block"; name: string; in: number; out: number };

function layers(c: UNetConfig): Layer[] {
  const { inChannels: ch, base: b, timeDim: d } = c;
  return [
    { kind: "linear", name: "time.mlp.0", in: d, out: d },
    { kind: "linear", name: "time.mlp.2", in: d, out: d },
    { kind: "conv", name: "in_conv", in: ch, out: b, k: 3 },
    { kind: "block", name: "down1", in: b, out: b },
    { kind: "conv", name: "ds1", in: b, out: b, k: 3 },
    { kind: "block", name: "down2", in: b, out: 2 * b },
    { kind: "conv", name: "ds2", in: 2 * b, out: 2 * b, k: 3 },
    { kind: "block", name: "mid1", in: 2 * b, out: 4 * b },
    { kind: "block", name: "mid2", in: 4 * b, out: 4 * b },
    { kind: "convT", name: "us2", in: 4 * b, out: 2 * b, k: 4 },
    { kind: "block", name: "up2", in: 4 * b, out: 2 * b },
    { kind: "convT", name: "us1", in: 2 * b, out: b, k: 4 },
    { kind: "block", name: "up1", in: 2 * b, out: b },
    { kind: "norm", name: "out_norm", channels: b },
    { kind: "conv", name: "out_conv", in: b, out: ch, k: 3 },
  ];
}

/**
 * The parameters' PyTorch shapes in state_dict order, with the fan-in that
 * PyTorch's default init uses (0 for GroupNorm, initialised to 1 and 0).
 */
function torchParams(
  c: UNetConfig,
): { name: string; shape: number[]; fanIn: number }[] {
  const out: { name: string; shape: number[]; fanIn: number }[] = [];
  const add = (name: string, weight: number[], bias: number[]) => {
    // PyTorch: fan_in = weight.size(1) * receptive field size.
    const fanIn = weight.slice(1).reduce((a, b) => a * b, 1);
    out.push({ name: `${name}.weight`, shape: weight, fanIn });
    out.push({ name: `${name}.bias`, shape: bias, fanIn });
  };
  const norm = (name: string, ch: number) => {
    out.push({ name: `${name}.weight`, shape: [ch], fanIn: 0 });
    out.push({ name: `${name}.bias`, shape: [ch], fanIn: 0 });
  };
  for (const l of layers(c)) {
    switch (l.kind) {
      case "linear":
        add(l.name, [l.out, l.in], [l.out]);
        break;
      case "conv":
        add(l.name, [l.out, l.in, l.k, l.k], [l.out]);
        break;
      case "convT":
        add(l.name, [l.in, l.out, l.k, l.k], [l.out]);
        break;
      case "norm":
        norm(l.name, l.channels);
        break;
      case "block":
        norm(`${l.name}.norm1`, l.in);
        add(`${l.name}.conv1`, [l.out, l.in, 3, 3], [l.out]);
        add(`${l.name}.time_proj`, [l.out, c.timeDim], [l.out]);
        norm(`${l.name}.norm2`, l.out);
        add(`${l.name}.conv2`, [l.out, l.out, 3, 3], [l.out]);
        if (l.in !== l.out) add(`${l.name}.skip`, [l.out, l.in, 1, 1], [l.out]);
        break;
    }
  }
  return out;
}

/** PyTorch layout -> TF layout, for shapes. */
function tfShape(shape: number[]): number[] {
  if (shape.length === 4) return [shape[2], shape[3], shape[1], shape[0]];
  if (shape.length === 2) return [shape[1], shape[0]];
  return shape;
}

/**
 * The parameter names and PyTorch shapes of a UNet, in the reference's
 * `state_dict` order (TF layouts are these permuted: rank 4 by [2, 3, 1, 0],
 * rank 2 transposed).
 *
 * @param config The UNet's hyper-parameters.
 * @returns A map from `state_dict` name to PyTorch shape.
 * @example
 * ```ts
 * import { unetParamShapes } from "./unet.ts";
 * const shapes = unetParamShapes({ inChannels: 1, base: 64, timeDim: 256 });
 * console.log(shapes.get("in_conv.weight")); // [64, 1, 3, 3]
 * console.log(shapes.get("us1.weight")); // [128, 64, 4, 4]
 * ```
 */
export function unetParamShapes(config: UNetConfig): Map<string, number[]> {
  const c = resolveConfig(config, "list UNet parameters");
  return new Map(torchParams(c).map((p) => [p.name, p.shape]));
}

/** Check that `params` holds exactly the UNet's keys, float32, in TF layouts. */
function checkParams(
  params: ReadonlyMap<string, tf.Tensor>,
  config: UNetConfig,
  what: string,
): void {
  const want = torchParams(config);
  for (const { name, shape } of want) {
    const t = params.get(name);
    const expected = tfShape(shape);
    if (t === undefined) {
      throw new TypeError(
        `Cannot ${what}: parameter ${name} is missing (got none, expected shape [${expected}])`,
      );
    }
    if (
      t.dtype !== "float32" || t.shape.length !== expected.length ||
      t.shape.some((s, i) => s !== expected[i])
    ) {
      throw new TypeError(
        `Cannot ${what}: parameter ${name} has the wrong shape or type (got ${t.dtype} [${t.shape}], expected float32 [${expected}] in TF layout)`,
      );
    }
  }
  if (params.size !== want.length) {
    const known = new Set(want.map((p) => p.name));
    const extra = [...params.keys()].filter((k) => !known.has(k));
    throw new TypeError(
      `Cannot ${what}: unknown parameters (got ${
        extra.join(", ")
      }, expected only the ${want.length} UNet keys)`,
    );
  }
}

/** Check the forward's inputs: x NHWC float32, square, side divisible by 4; t int32 [N]. */
function checkInputs(
  x: tf.Tensor,
  t: tf.Tensor,
  config: UNetConfig,
  what: string,
): void {
  const c = config.inChannels;
  if (
    !(x instanceof tf.Tensor) || x.rank !== 4 || x.dtype !== "float32" ||
    x.shape[3] !== c
  ) {
    const got = x instanceof tf.Tensor ? `${x.dtype} [${x.shape}]` : String(x);
    throw new TypeError(
      `Cannot ${what}: x must be NHWC float32 with ${c} channel(s) (got ${got}, expected float32 [N, H, W, ${c}])`,
    );
  }
  const [n, h, w] = x.shape;
  if (h !== w || h % 4 !== 0 || h === 0) {
    throw new TypeError(
      `Cannot ${what}: images must be square with a side divisible by 4 (got ${h}x${w}, expected e.g. 32x32)`,
    );
  }
  if (
    !(t instanceof tf.Tensor) || t.rank !== 1 || t.dtype !== "int32" ||
    t.shape[0] !== n
  ) {
    const got = t instanceof tf.Tensor ? `${t.dtype} [${t.shape}]` : String(t);
    throw new TypeError(
      `Cannot ${what}: t must be int32 with one timestep per image (got ${got}, expected int32 [${n}])`,
    );
  }
}

/** The reference forward: params in TF layouts, x NHWC, t int32. */
function forward(
  p: ReadonlyMap<string, tf.Tensor>,
  x: tf.Tensor4D,
  t: tf.Tensor1D,
  config: UNetConfig,
): tf.Tensor4D {
  const get = (name: string) => p.get(name)!;
  const dense = (name: string, h: tf.Tensor2D) =>
    linear(h, get(`${name}.weight`), get(`${name}.bias`));
  const conv = (name: string, h: tf.Tensor4D, stride: number, pad: number) =>
    conv2d(
      h,
      get(`${name}.weight`) as tf.Tensor4D,
      stride,
      pad,
      get(`${name}.bias`),
    );
  const up = (name: string, h: tf.Tensor4D) => {
    const w = get(`${name}.weight`) as tf.Tensor4D;
    const [n, hh, ww] = h.shape;
    return conv2dTranspose(
      h,
      w,
      [n, 2 * hh, 2 * ww, w.shape[2]],
      2,
      1,
      get(`${name}.bias`),
    );
  };
  const pair = (name: string): [tf.Tensor, tf.Tensor] => [
    get(`${name}.weight`),
    get(`${name}.bias`),
  ];
  const kernel = (name: string): [tf.Tensor4D, tf.Tensor] => [
    get(`${name}.weight`) as tf.Tensor4D,
    get(`${name}.bias`),
  ];

  const emb = sinusoidalEmbedding(t, config.timeDim);
  const temb = dense("time.mlp.2", silu(dense("time.mlp.0", emb)));
  // Every ResBlock's time_proj sees SiLU(temb).
  const tact = silu(temb);
  // A ResBlock is one op with its own gradient (core/_resblock.ts), so
  // that training keeps few of its activations alive.
  const block = (name: string, h: tf.Tensor4D) =>
    resBlock(h, dense(`${name}.time_proj`, tact), {
      norm1: pair(`${name}.norm1`),
      conv1: kernel(`${name}.conv1`),
      norm2: pair(`${name}.norm2`),
      conv2: kernel(`${name}.conv2`),
      skip: p.has(`${name}.skip.weight`) ? kernel(`${name}.skip`) : undefined,
    }, GROUPS);

  const h0 = conv("in_conv", x, 1, 1);
  const s1 = block("down1", h0);
  const s2 = block("down2", conv("ds1", s1, 2, 1));
  let h = block("mid2", block("mid1", conv("ds2", s2, 2, 1)));
  h = block("up2", tf.concat([up("us2", h), s2], 3));
  h = block("up1", tf.concat([up("us1", h), s1], 3));
  return normActConv(h, pair("out_norm"), kernel("out_conv"), GROUPS);
}

/** Set by {@linkcode UNet.fromParams} while it constructs: the weights to adopt. */
let adopting: ParamMap | null = null;

/**
 * The reference DDPM UNet: parameters (trainable variables keyed by
 * PyTorch `state_dict` names, TF layouts) plus the forward pass.
 *
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { UNet } from "./unet.ts";
 * await initBackend("cpu");
 * const unet = new UNet({ base: 8, seed: 1 });
 * const x = tf.zeros([2, 8, 8, 1]) as tf.Tensor4D;
 * const t = tf.tensor1d([0, 999], "int32");
 * const eps = unet.predict(x, t);
 * console.log(eps.shape); // [2, 8, 8, 1]
 * tf.dispose([x, t, eps]);
 * unet.dispose();
 * ```
 */
export class UNet {
  /** The hyper-parameters, defaults filled in. */
  readonly config: UNetConfig;
  /** The trainable weights by `state_dict` name, in TF layouts and state_dict order. */
  readonly params: ParamMap;
  #disposed = false;

  /**
   * A UNet initialised as PyTorch initialises the reference: Conv2d and
   * Linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
   * fan_in = in kh kw (for ConvTranspose2d, out kh kw), GroupNorm weight 1
   * and bias 0.
   *
   * @param config `inChannels` (1), `base` (64), `timeDim` (4 base), and
   * `seed` (0): the same seed gives the same weights.
   */
  constructor(config: Partial<UNetConfig> & { seed?: number } = {}) {
    this.config = Object.freeze(resolveConfig(config, "build UNet"));
    if (adopting !== null) {
      this.params = adopting;
      adopting = null;
      return;
    }
    const seed = config.seed ?? 0;
    if (typeof seed !== "number" || !Number.isSafeInteger(seed)) {
      throw new RangeError(
        `Cannot build UNet: seed must be an integer (got ${seed}, expected e.g. 0)`,
      );
    }
    this.params = new Map();
    for (const { name, shape, fanIn } of torchParams(this.config)) {
      const s = tfShape(shape);
      const init = fanIn === 0
        ? (name.endsWith(".weight") ? tf.ones(s) : tf.zeros(s))
        : tf.randomUniform(
          s,
          -1 / Math.sqrt(fanIn),
          1 / Math.sqrt(fanIn),
          "float32",
          `${seed}/${name}`,
        );
      this.params.set(name, tf.variable(init));
      init.dispose();
    }
  }

  /**
   * A UNet on given weights (TF layouts, keyed by `state_dict` name); it
   * takes ownership of the tensors (they become its variables). On an error
   * nothing is disposed.
   *
   * @param config The hyper-parameters the weights belong to.
   * @param params Every parameter of {@linkcode unetParamShapes}, float32, in TF layout.
   * @returns The UNet.
   * @example
   * ```ts
   * import { initBackend, tf } from "./backend.ts";
   * import { UNet } from "./unet.ts";
   * await initBackend("cpu");
   * const a = new UNet({ base: 8, seed: 3 });
   * const copy = new Map([...a.params].map(([k, v]) => [k, tf.clone(v)]));
   * const b = UNet.fromParams(a.config, copy);
   * console.log(b.params.size === a.params.size); // true
   * a.dispose();
   * b.dispose();
   * ```
   */
  static fromParams(
    config: UNetConfig,
    params: Map<string, tf.Tensor>,
  ): UNet {
    const c = resolveConfig(config, "load UNet");
    checkParams(params, c, "load UNet");
    const owned: ParamMap = new Map();
    for (const { name } of torchParams(c)) {
      const t = params.get(name)!;
      owned.set(name, tf.variable(t));
      t.dispose();
    }
    adopting = owned;
    try {
      return new UNet(c);
    } finally {
      adopting = null;
    }
  }

  /**
   * Predict the noise in x_t with this UNet's weights.
   *
   * @param x Noisy images x_t, NHWC float32, square with a side divisible by 4.
   * @param t Timesteps, int32 `[N]`.
   * @returns eps_theta(x_t, t), NHWC float32 like x.
   */
  predict(x: tf.Tensor4D, t: tf.Tensor1D): tf.Tensor4D {
    this.#checkLive("predict noise");
    checkInputs(x, t, this.config, "predict noise");
    return tf.tidy(() => forward(this.params, x, t, this.config));
  }

  /**
   * The same forward with other weights of this architecture (an EMA copy).
   *
   * @param params Every parameter of {@linkcode unetParamShapes}, float32, in TF layout.
   * @param x Noisy images x_t, NHWC float32, square with a side divisible by 4.
   * @param t Timesteps, int32 `[N]`.
   * @returns eps_theta(x_t, t) under `params`.
   */
  apply(
    params: ReadonlyMap<string, tf.Tensor>,
    x: tf.Tensor4D,
    t: tf.Tensor1D,
  ): tf.Tensor4D {
    checkParams(params, this.config, "apply UNet");
    checkInputs(x, t, this.config, "apply UNet");
    return tf.tidy(() => forward(params, x, t, this.config));
  }

  /** Free the weights; the UNet cannot predict afterwards. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const v of this.params.values()) v.dispose();
  }

  #checkLive(what: string): void {
    if (this.#disposed) {
      throw new Error(
        `Cannot ${what}: the UNet was disposed (got a disposed UNet, expected a live one)`,
      );
    }
  }
}
