/**
 * Gradient clipping, AdamW and the EMA update as a handful of WebGPU
 * programs, instead of about 13 tfjs kernels (and a scalar upload per JS
 * number) per parameter tensor.
 *
 * Layout: the gradients are concatenated into one flat vector g (in the
 * optimizer's parameter order); the AdamW moments live in one packed
 * vector `mv = [m of every parameter | v of every parameter]`. One step is
 *
 * 1. the global norm of g: partial sums of squares per workgroup, then
 *    their sum and square root (2 dispatches, {@linkcode flatNorm});
 * 2. the new moments, with the clip coefficient
 *    min(maxNorm / (norm + 1e-6), 1) folded in (1 dispatch,
 *    {@linkcode adamwMoments});
 * 3. per parameter, the new weight from the old weight and the new moments
 *    (1 dispatch each, {@linkcode adamwParam});
 * 4. the EMA, kept packed in the same order by core/ema.ts: the new
 *    weights concatenated, then one {@linkcode emaStep} over the vectors
 *    (2 dispatches where tfjs's Concat takes every tensor at once).
 *
 * Each formula is written in the same order of operations as the tfjs-op
 * path of core/optim.ts, core/ema.ts and core/train.ts, so the results equal
 * theirs up to float32 rounding (WGSL's division and square root are not
 * correctly rounded, and the compiler may fuse a multiply-add).
 *
 * @module
 */
import { tf } from "./backend.ts";
import { flatFrame, registerProgramKernel } from "./_webgpu.ts";

/** Invocations per workgroup of the reducing programs (a power of two). */
const WG = 256;
/** Most workgroups of the first reduction pass (each strides over the vector). */
const MAX_PARTIALS = 1024;

/** WGSL: sum of one value per invocation over the workgroup (all invocations must call it). */
const GROUP_SUM = `
  var<workgroup> red : array<f32, ${WG}>;
  fn groupSum(v : f32, lid : i32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = ${WG / 2}; s > 0; s = s >> 1u) {
      if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
      workgroupBarrier();
    }
    return red[0];
  }
`;

/**
 * WGSL: leave the output element at `unchanged` when the step's gate (see
 * {@linkcode finiteGate}) is closed.
 */
const GATE_CHECK = (unchanged: string) =>
  `if (gate[0] == 0.0) { setOutputAtIndex(index, ${unchanged}); return; }`;

registerProgramKernel("DdpmFiniteGate", () => ({
  program: {
    variableNames: ["stats", "prev"],
    shaderKey: "ddpmFiniteGate",
    size: true,
    ...flatFrame([1]),
    getUserCode: () => `
  fn finite(x : f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
  }
  fn main(index : i32) {
    if (index < uniforms.size) {
      let open = prev[0] != 0.0 && finite(stats[0]) && finite(stats[1]);
      setOutputAtIndex(index, select(0.0, 1.0, open));
    }
  }`,
  },
}));

/** WGSL: the clip coefficient of core/train.ts's clipGradNorm, from `norm[0]`. */
const CLIP_COEF = `min(uniforms.maxNorm / (norm[0] + 1e-6), 1.0)`;

registerProgramKernel("DdpmSumSquaresPartial", (inputs) => {
  const n = tf.util.sizeFromShape(inputs[0].shape);
  const groups = Math.max(1, Math.min(MAX_PARTIALS, Math.ceil(n / WG)));
  return {
    program: {
      variableNames: ["x"],
      shaderKey: "ddpmSumSquaresPartial",
      uniforms: "n : i32,",
      ...flatFrame([groups], groups * WG, WG),
      getUserCode: () => `
  ${GROUP_SUM}
  fn main(index : i32) {
    let lid = i32(localId.x);
    let grp = i32(workgroupId.x);
    let stride = i32(numWorkgroups.x) * ${WG};
    var s = 0.0;
    for (var i = grp * ${WG} + lid; i < uniforms.n; i = i + stride) {
      let v = x[i];
      s = s + v * v;
    }
    let total = groupSum(s, lid);
    if (lid == 0) { setOutputAtIndex(grp, total); }
  }`,
    },
    uniforms: [{ type: "int32", data: [n] }],
  };
});

registerProgramKernel("DdpmSqrtSum", (inputs) => {
  const n = tf.util.sizeFromShape(inputs[0].shape);
  return {
    program: {
      variableNames: ["x"],
      shaderKey: "ddpmSqrtSum",
      uniforms: "n : i32,",
      ...flatFrame([], WG, WG),
      getUserCode: () => `
  ${GROUP_SUM}
  fn main(index : i32) {
    let lid = i32(localId.x);
    var s = 0.0;
    for (var i = lid; i < uniforms.n; i = i + ${WG}) { s = s + x[i]; }
    let total = groupSum(s, lid);
    if (lid == 0) { setOutputAtIndex(0, sqrt(total)); }
  }`,
    },
    uniforms: [{ type: "int32", data: [n] }],
  };
});

registerProgramKernel("DdpmClipScale", (inputs, attrs) => ({
  program: {
    variableNames: ["g", "norm"],
    shaderKey: "ddpmClipScale",
    size: true,
    uniforms: "maxNorm : f32,",
    ...flatFrame(inputs[0].shape),
    getUserCode: () => `
  fn main(index : i32) {
    if (index < uniforms.size) {
      setOutputAtIndex(index, g[index] * ${CLIP_COEF});
    }
  }`,
  },
  uniforms: [{ type: "float32", data: [attrs.maxNorm as number] }],
}));

registerProgramKernel("DdpmAdamWMoments", (inputs, attrs) => {
  const clip = attrs.clip === 1;
  const gated = attrs.gated === 1;
  return {
    program: {
      // Every declared input must be read: WebGPU drops unread bindings.
      variableNames: [
        "g",
        "mv",
        ...(clip ? ["norm"] : []),
        ...(gated ? ["gate"] : []),
      ],
      shaderKey: `ddpmAdamWMoments${clip ? "Clip" : ""}${gated ? "Gated" : ""}`,
      size: true,
      uniforms:
        "total : i32, oneMinusBeta1 : f32, beta2 : f32, oneMinusBeta2 : f32," +
        (clip ? " maxNorm : f32," : ""),
      ...flatFrame(inputs[1].shape),
      getUserCode: () => `
  fn main(index : i32) {
    if (index < uniforms.size) {
      ${gated ? GATE_CHECK("mv[index]") : ""}
      let n = uniforms.total;
      let coef = ${clip ? CLIP_COEF : "1.0"};
      if (index < n) {
        let gi = g[index] * coef;
        let m = mv[index];
        setOutputAtIndex(index, m + (gi - m) * uniforms.oneMinusBeta1);
      } else {
        let gi = g[index - n] * coef;
        setOutputAtIndex(index,
          mv[index] * uniforms.beta2 + (gi * gi) * uniforms.oneMinusBeta2);
      }
    }
  }`,
    },
    uniforms: [
      { type: "int32", data: [tf.util.sizeFromShape(inputs[0].shape)] },
      { type: "float32", data: [attrs.oneMinusBeta1 as number] },
      { type: "float32", data: [attrs.beta2 as number] },
      { type: "float32", data: [attrs.oneMinusBeta2 as number] },
      ...(clip
        ? [{ type: "float32" as const, data: [attrs.maxNorm as number] }]
        : []),
    ],
  };
});

registerProgramKernel("DdpmAdamWParam", (inputs, attrs) => ({
  program: {
    variableNames: attrs.gated === 1
      ? ["p", "mv", "step", "gate"]
      : ["p", "mv", "step"],
    shaderKey: `ddpmAdamWParam${attrs.gated === 1 ? "Gated" : ""}`,
    size: true,
    uniforms: "start : i32, total : i32, decay : f32, eps : f32,",
    ...flatFrame(inputs[0].shape),
    // step = [stepSize, biasCorrection2Sqrt]: a tensor, not uniforms, since
    // they change every step (see adamwStepScalars).
    getUserCode: () => `
  fn main(index : i32) {
    if (index < uniforms.size) {
      ${attrs.gated === 1 ? GATE_CHECK("p[index]") : ""}
      let m = mv[uniforms.start + index];
      let v = mv[uniforms.total + uniforms.start + index];
      let denom = sqrt(v) / step[1] + uniforms.eps;
      setOutputAtIndex(index, p[index] * uniforms.decay - (m / denom) * step[0]);
    }
  }`,
  },
  uniforms: [
    { type: "int32", data: [attrs.start as number] },
    { type: "int32", data: [attrs.total as number] },
    { type: "float32", data: [attrs.decay as number] },
    { type: "float32", data: [attrs.eps as number] },
  ],
}));

registerProgramKernel("DdpmEma", (inputs, attrs) => ({
  program: {
    // oneMinusDecay: a one-element tensor (the decay may change every update).
    variableNames: attrs.gated === 1
      ? ["e", "p", "oneMinusDecay", "gate"]
      : ["e", "p", "oneMinusDecay"],
    shaderKey: `ddpmEma${attrs.gated === 1 ? "Gated" : ""}`,
    size: true,
    ...flatFrame(inputs[0].shape),
    getUserCode: () => `
  fn main(index : i32) {
    if (index < uniforms.size) {
      let ei = e[index];
      ${attrs.gated === 1 ? GATE_CHECK("ei") : ""}
      setOutputAtIndex(index, ei - (ei - p[index]) * oneMinusDecay[0]);
    }
  }`,
  },
}));

function run(
  name: string,
  inputs: Record<string, tf.Tensor>,
  attrs: Record<string, number> = {},
): tf.Tensor {
  return tf.engine().runKernel(
    name,
    inputs as unknown as tf.NamedTensorMap,
    attrs as unknown as tf.NamedAttrMap,
  ) as tf.Tensor;
}

/**
 * The gradients of `keys`, flattened and concatenated in that order (rank 1).
 *
 * @param grads Gradients by key; each key must be present.
 * @param keys The order (the optimizer's parameter order).
 * @returns A new float32 vector.
 */
export function flattenInOrder(
  grads: ReadonlyMap<string, tf.Tensor>,
  keys: readonly string[],
): tf.Tensor1D {
  return tf.tidy(() => {
    // (A vector needs no reshape: each would be one more tfjs kernel call.)
    const parts = keys.map((k) => {
      const t = grads.get(k)!;
      return t.rank === 1 ? t : tf.reshape(t, [-1]);
    });
    // tf.concat, not tf.addN-like kernels: tfjs's WebGPU Concat splits
    // inputs beyond its binding limit into rounds itself.
    return (parts.length === 1
      ? tf.clone(parts[0])
      : tf.concat(parts)) as tf.Tensor1D;
  });
}

/**
 * The inverse of {@linkcode flattenInOrder}: pieces of `flat`, from
 * `offset` on, shaped and keyed as `like` in its order.
 *
 * @param flat A vector holding the tensors back to back.
 * @param like The shapes, by key, in the order they were flattened.
 * @param offset Where the first piece starts.
 * @returns New tensors, one per key of `like`; the caller owns them.
 */
export function sliceInOrder(
  flat: tf.Tensor,
  like: ReadonlyMap<string, { shape: number[]; size: number }>,
  offset = 0,
): Map<string, tf.Tensor> {
  const out = new Map<string, tf.Tensor>();
  let start = offset;
  for (const [k, t] of like) {
    out.set(
      k,
      tf.tidy(() => tf.reshape(tf.slice(flat, start, t.size), t.shape)),
    );
    start += t.size;
  }
  return out;
}

/**
 * The Euclidean norm of a vector (any shape, read flat): 2 WebGPU dispatches.
 *
 * @param x A float32 tensor on the WebGPU backend.
 * @returns sqrt(sum(x^2)), a new scalar.
 */
export function flatNorm(x: tf.Tensor): tf.Scalar {
  return tf.tidy(() =>
    run("DdpmSqrtSum", { x: run("DdpmSumSquaresPartial", { x }) }) as tf.Scalar
  );
}

/**
 * A gradient times clipGradNorm's coefficient min(maxNorm / (norm + 1e-6), 1).
 *
 * @param g The gradient.
 * @param norm The global pre-clip norm (a scalar tensor).
 * @param maxNorm The clipping threshold (finite, positive).
 * @returns The clipped gradient, a new tensor shaped as `g`.
 */
export function clipScale(
  g: tf.Tensor,
  norm: tf.Scalar,
  maxNorm: number,
): tf.Tensor {
  return run("DdpmClipScale", { g, norm }, { maxNorm });
}

/** Clipping applied inside {@linkcode adamwMoments}: the pre-clip norm and the threshold. */
export interface FlatClip {
  /** The gradients' global pre-clip norm. */
  norm: tf.Scalar;
  /** The threshold; an infinite one means no clipping. */
  maxNorm: number;
}

/**
 * The new packed moments `[m | v]` from the flat gradients (clipped first when `clip` is given).
 *
 * @param g The flat gradients, N elements.
 * @param mv The packed moments, 2N elements.
 * @param betas beta1 and beta2 of AdamW.
 * @param clip The clipping, or null.
 * @param gate Optional {@linkcode finiteGate}: where it is 0, `mv` unchanged.
 * @returns The new packed moments, a new tensor shaped as `mv`.
 */
export function adamwMoments(
  g: tf.Tensor,
  mv: tf.Tensor,
  betas: { beta1: number; beta2: number },
  clip: FlatClip | null,
  gate?: tf.Tensor,
): tf.Tensor {
  const clipping = clip !== null && Number.isFinite(clip.maxNorm);
  const inputs: Record<string, tf.Tensor> = { g, mv };
  if (clipping) inputs.norm = clip.norm;
  if (gate !== undefined) inputs.gate = gate;
  return run("DdpmAdamWMoments", inputs, {
    oneMinusBeta1: 1 - betas.beta1,
    beta2: betas.beta2,
    oneMinusBeta2: 1 - betas.beta2,
    clip: clipping ? 1 : 0,
    gated: gate === undefined ? 0 : 1,
    ...(clipping ? { maxNorm: clip.maxNorm } : {}),
  });
}

/** The constant scalars of AdamW's weight update (see core/optim.ts). */
export interface AdamWUpdate {
  /** 1 - lr weightDecay (1 when weightDecay is 0). */
  decay: number;
  /** eps. */
  eps: number;
}

/**
 * The scalars of AdamW's weight update that change with the step t, as the
 * `step` tensor of {@linkcode adamwParam} takes them: lr / (1 - beta1^t)
 * and sqrt(1 - beta2^t).
 *
 * @param config lr, beta1 and beta2.
 * @param t The step being taken (1 for the first).
 * @returns `[stepSize, biasCorrection2Sqrt]`.
 */
export function adamwStepScalars(
  config: { lr: number; beta1: number; beta2: number },
  t: number,
): [number, number] {
  const { lr, beta1, beta2 } = config;
  return [lr / (1 - beta1 ** t), Math.sqrt(1 - beta2 ** t)];
}

/**
 * One parameter's new weight from its packed new moments.
 *
 * @param p The parameter.
 * @param mv The new packed moments, 2 `total` elements.
 * @param at Where p's moments start in each half, and the half's length.
 * @param u The update's constant scalars.
 * @param step The step's scalars, a float32 tensor from {@linkcode adamwStepScalars}.
 * @param gate Optional {@linkcode finiteGate}: where it is 0, `p` unchanged.
 * @returns The new weight, a new tensor shaped as `p`.
 */
export function adamwParam(
  p: tf.Tensor,
  mv: tf.Tensor,
  at: { start: number; total: number },
  u: AdamWUpdate,
  step: tf.Tensor,
  gate?: tf.Tensor,
): tf.Tensor {
  const attrs = { ...at, ...u, gated: gate === undefined ? 0 : 1 };
  return gate === undefined
    ? run("DdpmAdamWParam", { p, mv, step }, attrs)
    : run("DdpmAdamWParam", { p, mv, step, gate }, attrs);
}

/**
 * One EMA update of one tensor: e - (e - p)(1 - decay).
 *
 * @param e The average.
 * @param p The parameter, shaped as `e`.
 * @param oneMinusDecay 1 - d, a one-element float32 tensor.
 * @param gate Optional {@linkcode finiteGate}: where it is 0, `e` unchanged.
 * @returns The new average, a new tensor shaped as `e`.
 */
export function emaStep(
  e: tf.Tensor,
  p: tf.Tensor,
  oneMinusDecay: tf.Tensor,
  gate?: tf.Tensor,
): tf.Tensor {
  return gate === undefined
    ? run("DdpmEma", { e, p, oneMinusDecay }, { gated: 0 })
    : run("DdpmEma", { e, p, oneMinusDecay, gate }, { gated: 1 });
}

/**
 * The gate of one training step: 1 while every step so far (`prev`) and
 * this one's loss and gradient norm (`stats`) are finite, else 0. Gated
 * updates leave their tensors unchanged where it is 0, so a step whose
 * numbers are not finite, and every step queued after it, change nothing,
 * without the host reading the numbers first.
 *
 * @param stats `[loss, gradNorm]` of the step.
 * @param prev The previous step's gate (a scalar 1 at the start).
 * @returns A new scalar, 1 or 0.
 */
export function finiteGate(stats: tf.Tensor, prev: tf.Tensor): tf.Scalar {
  return run("DdpmFiniteGate", { stats, prev }) as tf.Scalar;
}

/**
 * The key of a method `(count: number) => void` of {@linkcode AdamW} and
 * `Ema` that sets their step counters back to `count`: for the trainer,
 * after the GPU's gate skipped the steps from there on.
 */
export const REWIND: unique symbol = Symbol("rewind");

/**
 * The key of {@linkcode AdamW}'s fused step over flat gradients: a method
 * `(flat: tf.Tensor1D, clip: FlatClip | null) => void` for the trainer, kept
 * off the public API.
 */
export const STEP_FLAT: unique symbol = Symbol("AdamW.stepFlat");

/**
 * The key of {@linkcode AdamW}'s next-step scalars `[stepSize,
 * biasCorrection2Sqrt]`, a method `() => [number, number]`; and of
 * `Ema`'s next `[1 - decay]`, a method `() => [number]`: the tensors their
 * fused steps read (the trainer passes them in, so that a replayed step
 * gets new values).
 */
export const STEP_SCALARS: unique symbol = Symbol("stepScalars");

/**
 * The key of a getter of {@linkcode AdamW} and `Ema`: their packed WebGPU
 * variable (moments, or averages), or null while they keep one variable
 * per key.
 */
export const PACKED: unique symbol = Symbol("packed");

/**
 * The key of `Ema`'s method `() => void` that counts a packed update run
 * without it (a replayed training step) and marks the packed average
 * current.
 */
export const REPLAYED: unique symbol = Symbol("replayed");
