/**
 * Sums over rows on WebGPU, for the reductions of a training step that run
 * down the channels-last layout: a bias's gradient (sum over all pixels), the
 * time embedding's (sum over each image's pixels) and GroupNorm's parameter
 * gradients (core/_webgpu_norm.ts).
 *
 * A `[rows, C]` matrix is cut into `segments` equal runs of rows (one per
 * image, or one in all), and each run's column sums are wanted. A workgroup
 * takes a tile of `cw` columns of one part of one run: its 256 invocations
 * are `lanes = 256 / cw` rows by `cw` columns, so that neighbouring
 * invocations read neighbouring floats of a row (one wide, coalesced read
 * per row instead of one strided read per channel), each lane walks down
 * every `lanes`-th row (four rows at a time into four sums, so that four
 * loads are in flight), and the lanes are added in workgroup memory. Runs
 * long enough for it are split into parts (up to about a thousand
 * workgroups in all, each lane reading at least 16 rows): a GPU hides a
 * load's latency only across many invocations, and a long serial loop per
 * invocation waits on each load in turn. The partial sums `[parts, runs,
 * C]` are again column sums, of a `[parts, runs C]` matrix, taken the same
 * way until one part is left (two or three dispatches for a whole batch).
 * All sums are in a fixed order, so the results do not change from call to
 * call.
 *
 * @module
 */
import { tf } from "./backend.ts";
import {
  flatFrame,
  type ProgramUniform,
  registerProgramKernel,
  type WebGpuProgram,
} from "./_webgpu.ts";

/** Invocations per workgroup of a column reduction. */
const WG = 256;
/** Workgroups to aim for. */
const TARGET_WORKGROUPS = 1024;
/** The fewest rows per lane in a part. */
const MIN_ROWS_PER_LANE = 16;

/** How a column reduction is cut up. */
export interface ColumnPlan {
  /** Columns per workgroup (a power of two, 4 to 64). */
  cw: number;
  /** Rows a workgroup reads at once: 256 / cw. */
  lanes: number;
  /** Workgroups across the columns. */
  colTiles: number;
  /** Parts per run. */
  parts: number;
  /** Rows per part (the last part may be shorter). */
  partLen: number;
}

/**
 * The plan of column sums of `segments` runs of `rows / segments` rows of
 * `c` columns.
 *
 * @param rows All rows (a multiple of `segments`).
 * @param c Columns.
 * @param segments Runs of rows summed separately.
 * @returns Tiles, lanes and parts.
 */
export function columnPlan(
  rows: number,
  c: number,
  segments: number,
): ColumnPlan {
  let cw = 4;
  while (cw < Math.min(c, 64)) cw *= 2;
  const lanes = WG / cw;
  const colTiles = Math.ceil(c / cw);
  const seg = rows / segments;
  const wanted = Math.ceil(TARGET_WORKGROUPS / (colTiles * segments));
  const longest = Math.floor(seg / (lanes * MIN_ROWS_PER_LANE));
  const parts = Math.max(1, Math.min(wanted, longest));
  const partLen = Math.max(1, Math.ceil(seg / parts));
  return { cw, lanes, colTiles, parts: Math.ceil(seg / partLen), partLen };
}

/** Uniforms every column reduction declares first. */
export const COLUMN_UNIFORMS =
  "c : i32, seg : i32, segments : i32, partLen : i32,";

/**
 * The program frame, uniforms and WGSL of a column reduction.
 *
 * @param plan From {@linkcode columnPlan}.
 * @param rows All rows.
 * @param c Columns.
 * @param segments Runs of rows.
 * @param valueFn WGSL defining `fn columnValue(r : i32, col : i32) -> f32`,
 *   the value summed at row r and column col.
 * @param shape The result's shape when there is one part (else the result
 *   is `[parts, segments, c]` partial sums, for {@linkcode finishColumnSums}).
 * @returns Frame, WGSL and the leading uniforms (append your own).
 */
export function columnProgram(
  plan: ColumnPlan,
  rows: number,
  c: number,
  segments: number,
  valueFn: string,
  shape: number[],
): {
  frame: Pick<
    WebGpuProgram,
    "outputShape" | "dispatchLayout" | "dispatch" | "workgroupSize"
  >;
  source: string;
  uniforms: ProgramUniform[];
} {
  const { cw, lanes } = plan;
  const source = `
  var<workgroup> colRed : array<f32, ${WG}>;
  ${valueFn}
  fn main(index : i32) {
    let lid = i32(localId.x);
    let col = i32(workgroupId.x) * ${cw} + lid % ${cw};
    let lane = lid / ${cw};
    let run = i32(workgroupId.y);
    let part = i32(workgroupId.z);
    let runStart = run * uniforms.seg;
    let r0 = runStart + part * uniforms.partLen;
    let r1 = min(r0 + uniforms.partLen, runStart + uniforms.seg);
    var s0 = 0.0;
    var s1 = 0.0;
    var s2 = 0.0;
    var s3 = 0.0;
    if (col < uniforms.c) {
      var r = r0 + lane;
      loop {
        if (r + ${3 * lanes} >= r1) { break; }
        s0 += columnValue(r, col);
        s1 += columnValue(r + ${lanes}, col);
        s2 += columnValue(r + ${2 * lanes}, col);
        s3 += columnValue(r + ${3 * lanes}, col);
        r += ${4 * lanes};
      }
      loop {
        if (r >= r1) { break; }
        s0 += columnValue(r, col);
        r += ${lanes};
      }
    }
    colRed[lid] = (s0 + s1) + (s2 + s3);
    workgroupBarrier();
    for (var half = ${lanes >> 1}; half > 0; half = half >> 1u) {
      if (lane < half) { colRed[lid] += colRed[lid + half * ${cw}]; }
      workgroupBarrier();
    }
    if (lane == 0 && col < uniforms.c) {
      setOutputAtIndex((part * uniforms.segments + run) * uniforms.c + col,
        colRed[lid]);
    }
  }`;
  return {
    frame: {
      outputShape: plan.parts === 1 ? shape : [plan.parts, segments, c],
      dispatchLayout: { x: [0] },
      dispatch: [plan.colTiles, segments, plan.parts],
      workgroupSize: [WG, 1, 1],
    },
    source,
    uniforms: [c, rows / segments, segments, plan.partLen].map((v) => ({
      type: "int32" as const,
      data: [v],
    })),
  };
}

registerProgramKernel("DdpmColumnSums", (inputs, attrs) => {
  const [rows, c] = inputs[0].shape;
  const segments = attrs.segments as number;
  const plan = columnPlan(rows, c, segments);
  const p = columnProgram(
    plan,
    rows,
    c,
    segments,
    `fn columnValue(r : i32, col : i32) -> f32 { return x[r * uniforms.c + col]; }`,
    [segments, c],
  );
  return {
    program: {
      variableNames: ["x"],
      shaderKey: `ddpmColumnSums_${plan.cw}`,
      uniforms: COLUMN_UNIFORMS,
      ...p.frame,
      getUserCode: () => p.source,
    },
    uniforms: p.uniforms,
  };
});

registerProgramKernel("DdpmSplitKSum", (inputs, attrs) => {
  const shape = attrs.shape as number[];
  return {
    program: {
      variableNames: ["partial"],
      shaderKey: "ddpmSplitKSum",
      size: true,
      uniforms: "parts : i32,",
      ...flatFrame(shape),
      getUserCode: () => `
  fn main(index : i32) {
    if (index < uniforms.size) {
      // Four parts at a time into four sums: four loads in flight.
      let n = uniforms.size;
      var a0 = 0.0;
      var a1 = 0.0;
      var a2 = 0.0;
      var a3 = 0.0;
      var s = 0;
      loop {
        if (s + 3 >= uniforms.parts) { break; }
        a0 += partial[s * n + index];
        a1 += partial[(s + 1) * n + index];
        a2 += partial[(s + 2) * n + index];
        a3 += partial[(s + 3) * n + index];
        s += 4;
      }
      loop {
        if (s >= uniforms.parts) { break; }
        a0 += partial[s * n + index];
        s += 1;
      }
      setOutputAtIndex(index, (a0 + a1) + (a2 + a3));
    }
  }`,
    },
    uniforms: [{ type: "int32", data: [inputs[0].shape[0]] }],
  };
});

/**
 * A program's result of the given shape: itself when it has that rank, else
 * (partial sums `[parts, ...]`) the sum of its parts in a fixed order (four
 * interleaved sums), one dispatch.
 *
 * @param partial The program's output.
 * @param shape The result's shape.
 * @returns The result (a new tensor, or `partial` itself).
 */
export function sumPartials(partial: tf.Tensor, shape: number[]): tf.Tensor {
  if (partial.rank === shape.length) return partial;
  return tf.engine().runKernel("DdpmSplitKSum", { partial }, { shape });
}

/**
 * The result of a column reduction's program: its output when it ran in
 * one part, else the column sums of its partial sums `[parts, ...shape]`
 * (with {@linkcode webgpuColumnSums}, itself split where there are many).
 *
 * @param partial The program's output.
 * @param shape The result's shape.
 * @returns The result (a new tensor, or `partial` itself).
 */
export function finishColumnSums(
  partial: tf.Tensor,
  shape: number[],
): tf.Tensor {
  if (partial.rank === shape.length) return partial;
  return tf.tidy(() => {
    const rows = partial.shape[0];
    const flat = tf.reshape(partial, [rows, partial.size / rows]);
    return tf.reshape(webgpuColumnSums(flat as tf.Tensor2D, 1), shape);
  });
}

/**
 * Column sums of each of `segments` equal runs of rows of `x` on WebGPU:
 * `out[s, c] = sum over r in run s of x[r, c]`.
 *
 * @param x `[rows, C]`, rows a multiple of `segments`.
 * @param segments Runs of rows summed separately.
 * @returns `[segments, C]`.
 * @example
 * ```ts ignore
 * import { initBackend, tf } from "./backend.ts";
 * import { webgpuColumnSums } from "./_webgpu_reduce.ts";
 * await initBackend("webgpu");
 * const x = tf.tensor2d([1, 2, 3, 4, 5, 6, 7, 8], [4, 2]);
 * console.log(webgpuColumnSums(x, 2).dataSync()); // [4, 6, 12, 14]
 * ```
 */
export function webgpuColumnSums(
  x: tf.Tensor2D,
  segments: number,
): tf.Tensor2D {
  const [rows, c] = x.shape;
  if (!Number.isInteger(rows / segments) || segments < 1) {
    throw new RangeError(
      `Cannot sum columns: rows are not a whole number of runs (got ${rows} rows, ${segments} runs, expected a positive divisor of the rows)`,
    );
  }
  if (rows === 0 || c === 0) return tf.zeros([segments, c]);
  return tf.tidy(() =>
    finishColumnSums(
      tf.engine().runKernel("DdpmColumnSums", { x }, { segments }) as tf.Tensor,
      [segments, c],
    ) as tf.Tensor2D
  );
}
