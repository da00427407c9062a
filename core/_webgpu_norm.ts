/**
 * GroupNorm (optionally followed by SiLU) as four WebGPU programs: the
 * per-(image, group) statistics, the elementwise apply, the input gradient
 * and the per-channel parameter gradients. Each replaces a dozen or more
 * small tfjs kernels (means, broadcasts, tiles) with one dispatch; the math
 * is that of core/_layers.ts's `normStats`, `normActApply` and
 * `normActGrad`, and the results equal theirs up to float32 rounding.
 *
 * The statistics are packed as `[N, groups, 2]`: (mean, r) per (image,
 * group), r = 1 / sqrt(v + eps) with v the biased variance (two passes over
 * the group in workgroup memory).
 *
 * @module
 */
import { tf } from "./backend.ts";
import { flatFrame, registerProgramKernel } from "./_webgpu.ts";
import {
  COLUMN_UNIFORMS,
  columnPlan,
  columnProgram,
  finishColumnSums,
} from "./_webgpu_reduce.ts";

/** Invocations per workgroup of the reducing programs (a power of two). */
const WG = 256;

/** WGSL: a workgroup-wide sum of one value per invocation, and of two. */
const REDUCE = `
  var<workgroup> red : array<vec2<f32>, ${WG}>;
  fn groupSum2(v : vec2<f32>, lid : i32) -> vec2<f32> {
    red[lid] = v;
    workgroupBarrier();
    for (var s = ${WG / 2}; s > 0; s = s >> 1u) {
      if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
      workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
  }
  fn groupSum(v : f32, lid : i32) -> f32 {
    return groupSum2(vec2<f32>(v, 0.0), lid).x;
  }
`;

/**
 * WGSL of a loop over i = lid, lid + WG, ... below `count`, four indices at a
 * time and then the rest one by one: `body(i, slot)` is WGSL for index
 * expression `i` (slot 0-3 within the four; 0 for the rest), so that four
 * loads are in flight where a plain loop would wait on each in turn.
 */
function strided4(
  count: string,
  body: (i: string, slot: number) => string,
): string {
  const four = [0, 1, 2, 3].map((q) =>
    `{ let i = i4 + ${q * WG}; ${body("i", q)} }`
  );
  return `var i4 = lid;
    loop {
      if (i4 + ${3 * WG} >= ${count}) { break; }
      ${four.join("\n      ")}
      i4 += ${4 * WG};
    }
    loop {
      if (i4 >= ${count}) { break; }
      { let i = i4; ${body("i", 0)} }
      i4 += ${WG};
    }`;
}

/** WGSL: the flat index of element i of a group (per channels, from `base`). */
const GROUP_AT = `
  fn groupAt(base : i32, i : i32, per : i32) -> i32 {
    let p = i / per;
    return base + p * uniforms.c + i - p * per;
  }
`;

/**
 * WGSL: the gradient w.r.t. the norm's output y = gamma xhat + beta and
 * xhat itself, from x, dz (the gradient of z = silu(y) when `act`, else of y)
 * and the group's (mean, r).
 */
function dyCode(act: boolean): string {
  return `
  fn dyXhat(xv : f32, dzv : f32, ch : i32, mean : f32, r : f32) -> vec2<f32> {
    let xhat = (xv - mean) * r;
    ${
    act
      ? `let y = xhat * gamma[ch] + beta[ch];
    let s = 1.0 / (1.0 + exp(-y));
    return vec2<f32>(dzv * (s * (1.0 + y * (1.0 - s))), xhat);`
      : `return vec2<f32>(dzv, xhat);`
  }
  }
`;
}

/**
 * The inputs a gradient program reads, in binding order: WebGPU drops unread
 * bindings from the pipeline's layout, and binding one anyway is a
 * validation error that silently voids the whole command batch.
 */
function gradInputs(act: boolean, needGamma: boolean): string[] {
  if (act) return ["x", "stats", "gamma", "beta", "dz"];
  return needGamma ? ["x", "stats", "gamma", "dz"] : ["x", "stats", "dz"];
}

/** Shape attributes shared by the programs: spatial size, channels, groups. */
function dims(x: tf.TensorInfo, groups: number) {
  const [n, h, w, c] = x.shape;
  return { n, hw: h * w, c, groups, per: c / groups };
}

registerProgramKernel("DdpmNormStats", (inputs, attrs) => {
  const { n, hw, c, groups } = dims(inputs[0], attrs.groups as number);
  return {
    program: {
      variableNames: ["x"],
      shaderKey: "ddpmNormStats",
      uniforms: "hw : i32, c : i32, groups : i32, eps : f32,",
      ...flatFrame([n, groups, 2], n * groups * WG, WG),
      getUserCode: () => `
  ${REDUCE}
  ${GROUP_AT}
  fn main(index : i32) {
    let lid = i32(localId.x);
    let grp = index / ${WG};
    let per = uniforms.c / uniforms.groups;
    let count = uniforms.hw * per;
    let base = (grp / uniforms.groups) * uniforms.hw * uniforms.c +
      (grp % uniforms.groups) * per;
    var s = vec4<f32>(0.0);
    {
    ${strided4("count", (i, q) => `s[${q}] += x[groupAt(base, ${i}, per)];`)}
    }
    let mean = groupSum((s.x + s.y) + (s.z + s.w), lid) / f32(count);
    var sq = vec4<f32>(0.0);
    {
    ${
        strided4(
          "count",
          (i, q) =>
            `let d = x[groupAt(base, ${i}, per)] - mean; sq[${q}] += d * d;`,
        )
      }
    }
    let v = groupSum((sq.x + sq.y) + (sq.z + sq.w), lid) / f32(count);
    if (lid == 0) {
      setOutputAtIndex(grp * 2, mean);
      setOutputAtIndex(grp * 2 + 1, 1.0 / sqrt(v + uniforms.eps));
    }
  }`,
    },
    uniforms: [
      { type: "int32", data: [hw] },
      { type: "int32", data: [c] },
      { type: "int32", data: [groups] },
      { type: "float32", data: [attrs.eps as number] },
    ],
  };
});

registerProgramKernel("DdpmNormAct", (inputs, attrs) => {
  const { hw, c, groups } = dims(inputs[0], attrs.groups as number);
  const act = attrs.act as boolean;
  return {
    program: {
      variableNames: ["x", "stats", "gamma", "beta"],
      shaderKey: `ddpmNormAct${act ? "Silu" : ""}`,
      size: true,
      uniforms: "hw : i32, c : i32, groups : i32,",
      ...flatFrame(inputs[0].shape),
      getUserCode: () => `
  fn main(index : i32) {
    if (index < uniforms.size) {
      let ch = index % uniforms.c;
      let grp = (index / (uniforms.hw * uniforms.c)) * uniforms.groups +
        ch / (uniforms.c / uniforms.groups);
      let y = (x[index] - stats[grp * 2]) * (stats[grp * 2 + 1] * gamma[ch]) +
        beta[ch];
      ${
        act
          ? "setOutputAtIndex(index, y * (1.0 / (1.0 + exp(-y))));"
          : "setOutputAtIndex(index, y);"
      }
    }
  }`,
    },
    uniforms: [
      { type: "int32", data: [hw] },
      { type: "int32", data: [c] },
      { type: "int32", data: [groups] },
    ],
  };
});

registerProgramKernel("DdpmNormGradX", (inputs, attrs) => {
  const { n, hw, c, groups } = dims(inputs[0], attrs.groups as number);
  const act = attrs.act as boolean;
  return {
    program: {
      variableNames: gradInputs(act, true),
      shaderKey: `ddpmNormGradX${act ? "Silu" : ""}`,
      uniforms: "hw : i32, c : i32, groups : i32,",
      ...flatFrame(inputs[0].shape, n * groups * WG, WG),
      getUserCode: () => `
  ${REDUCE}
  ${dyCode(act)}
  fn main(index : i32) {
    let lid = i32(localId.x);
    let grp = index / ${WG};
    let per = uniforms.c / uniforms.groups;
    let count = uniforms.hw * per;
    let c0 = (grp % uniforms.groups) * per;
    let base = (grp / uniforms.groups) * uniforms.hw * uniforms.c + c0;
    let mean = stats[grp * 2];
    let r = stats[grp * 2 + 1];
    // Sums over the group of gamma dy and gamma dy xhat.
    var acc : array<vec2<f32>, 4>;
    {
    ${
        strided4("count", (i, q) =>
          `let p = ${i} / per;
        let k = ${i} - p * per;
        let at = base + p * uniforms.c + k;
        let d = dyXhat(x[at], dz[at], c0 + k, mean, r);
        let gdy = gamma[c0 + k] * d.x;
        acc[${q}] += vec2<f32>(gdy, gdy * d.y);`)
      }
    }
    let sums = groupSum2((acc[0] + acc[1]) + (acc[2] + acc[3]), lid) /
      f32(count);
    // dx = dy (r gamma) - xhat (r b) - r a, a and b the group means.
    {
    ${
        strided4("count", (i) =>
          `let p = ${i} / per;
        let k = ${i} - p * per;
        let at = base + p * uniforms.c + k;
        let d = dyXhat(x[at], dz[at], c0 + k, mean, r);
        setOutputAtIndex(at,
          d.x * (r * gamma[c0 + k]) - d.y * (r * sums.y) - r * sums.x);`)
      }
    }
  }`,
    },
    uniforms: [
      { type: "int32", data: [hw] },
      { type: "int32", data: [c] },
      { type: "int32", data: [groups] },
    ],
  };
});

registerProgramKernel("DdpmNormGradParam", (inputs, attrs) => {
  const { n, hw, c, groups } = dims(inputs[0], attrs.groups as number);
  const act = attrs.act as boolean;
  // Column sums over all N HW pixels (core/_webgpu_reduce.ts): a wide read
  // of neighbouring channels per pixel, split into parts.
  const plan = columnPlan(n * hw, c, 1);
  const p = columnProgram(
    plan,
    n * hw,
    c,
    1,
    `${dyCode(act)}
  // which = 0: dgamma = sum dy xhat; which = 1: dbeta = sum dy.
  fn columnValue(r : i32, ch : i32) -> f32 {
    let grp = (r / uniforms.hw) * uniforms.groups +
      ch / (uniforms.c / uniforms.groups);
    let at = r * uniforms.c + ch;
    let d = dyXhat(x[at], dz[at], ch, stats[grp * 2], stats[grp * 2 + 1]);
    return select(d.x * d.y, d.x, uniforms.which == 1);
  }`,
    [c],
  );
  return {
    program: {
      variableNames: gradInputs(act, false),
      shaderKey: `ddpmNormGradParam${act ? "Silu" : ""}_${plan.cw}`,
      uniforms: `${COLUMN_UNIFORMS} hw : i32, groups : i32, which : i32,`,
      ...p.frame,
      getUserCode: () => p.source,
    },
    uniforms: [
      ...p.uniforms,
      { type: "int32", data: [hw] },
      { type: "int32", data: [groups] },
      { type: "int32", data: [attrs.which as number] },
    ],
  };
});

/**
 * GroupNorm's statistics on WebGPU, one dispatch.
 *
 * @param x `[N, H, W, C]`, C divisible by `groups`.
 * @param groups Number of groups.
 * @param eps Added to the variance.
 * @returns `[N, groups, 2]`: (mean, 1 / sqrt(biased variance + eps)) per (image, group).
 */
export function gpuNormStats(
  x: tf.Tensor4D,
  groups: number,
  eps: number,
): tf.Tensor3D {
  return tf.engine().runKernel(
    "DdpmNormStats",
    { x },
    { groups, eps },
  ) as tf.Tensor3D;
}

/**
 * GroupNorm (and SiLU) from packed statistics on WebGPU, one dispatch:
 * y = (x - mean) (r gamma) + beta, and y sigmoid(y) when `act`.
 *
 * @param x `[N, H, W, C]`.
 * @param stats From {@linkcode gpuNormStats}.
 * @param gamma Per-channel scale `[C]`.
 * @param beta Per-channel shift `[C]`.
 * @param act Whether SiLU follows.
 * @returns `[N, H, W, C]`.
 */
export function gpuNormAct(
  x: tf.Tensor4D,
  stats: tf.Tensor,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  act: boolean,
): tf.Tensor4D {
  return tf.engine().runKernel(
    "DdpmNormAct",
    { x, stats, gamma, beta },
    { groups: stats.shape[1] as number, act },
  ) as tf.Tensor4D;
}

/**
 * The gradients of {@linkcode gpuNormAct} (with the statistics' dependence
 * on x) on WebGPU, three to seven dispatches: dx (one workgroup per (image,
 * group)), dgamma and dbeta (column sums over the pixels, each in one to
 * three dispatches: its parts, then the sums of their partial sums).
 *
 * @param x `[N, H, W, C]`.
 * @param stats From {@linkcode gpuNormStats}.
 * @param gamma Per-channel scale `[C]`.
 * @param beta Per-channel shift `[C]`.
 * @param dz The gradient of the output.
 * @param groups Number of groups.
 * @param act Whether SiLU follows.
 * @returns `[dx, dgamma, dbeta]`.
 */
export function gpuNormGrad(
  x: tf.Tensor4D,
  stats: tf.Tensor,
  gamma: tf.Tensor,
  beta: tf.Tensor,
  dz: tf.Tensor4D,
  groups: number,
  act: boolean,
): [tf.Tensor4D, tf.Tensor1D, tf.Tensor1D] {
  const all: Record<string, tf.Tensor> = { x, stats, gamma, beta, dz };
  const run = (name: string, which = 0) => {
    const names = gradInputs(act, name === "DdpmNormGradX");
    const inputs = Object.fromEntries(names.map((k) => [k, all[k]]));
    return tf.engine().runKernel(name, inputs, { groups, act, which });
  };
  const param = (which: number) =>
    tf.tidy(() =>
      finishColumnSums(run("DdpmNormGradParam", which) as tf.Tensor, [
        x.shape[3],
      ]) as tf.Tensor1D
    );
  return [run("DdpmNormGradX") as tf.Tensor4D, param(0), param(1)];
}
