/**
 * The fused WebGPU clipping + AdamW + EMA (core/_webgpu_optim.ts) against
 * the per-parameter tfjs-op path on the cpu backend: same weights, moments,
 * averages and norms up to float32 rounding, over three steps with clipping
 * active and inactive and weight decay on, at awkward sizes (a scalar, 1, 3,
 * 67 elements, more than one reducing workgroup, more than the first
 * reduction pass's grid). Also the kernel count of one step for a UNet's
 * parameter set. Skipped where `initBackend("webgpu")` gives no WebGPU.
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { AdamW, type AdamWConfig } from "../core/optim.ts";
import { Ema } from "../core/ema.ts";
import { clipGradNorm, Trainer } from "../core/train.ts";
import { makeSchedule } from "../core/schedule.ts";
import { unetParamShapes } from "../core/unet.ts";
import { flatNorm, flattenInOrder, STEP_FLAT } from "../core/_webgpu_optim.ts";
import { randoms, readAll, relErr } from "./_util.ts";

const SHAPES: number[][] = [[], [1], [3], [67], [3, 3, 2, 5], [33, 41], [
  270001,
]];
// eps large enough that leaving it out shows.
const CONFIG: Partial<AdamWConfig> = { lr: 1e-2, weightDecay: 0.05, eps: 1e-3 };
const EMA_DECAY = 0.9;

interface Run {
  norms: number[];
  params: Map<string, Float32Array>;
  m: Map<string, Float32Array>;
  v: Map<string, Float32Array>;
  ema: Map<string, Float32Array>;
}

/**
 * How a step is taken: "trainer" as Trainer does on WebGPU (norm, then the
 * fused step with clipping folded in), "public" through clipGradNorm and
 * AdamW.step, "partial" through AdamW.step with the second step missing
 * some gradients (per-key fallback, then packed again).
 */
type Mode = "trainer" | "public" | "partial";

/** Three clipped AdamW steps and EMA updates on `backend`; null when it cannot be had. */
async function run(
  backend: "cpu" | "webgpu",
  maxNorm: number,
  mode: Mode,
): Promise<Run | null> {
  const got = await initBackend(backend);
  if (got.backend !== backend) return null;
  tf.engine().startScope();
  try {
    const keys = SHAPES.map((_, i) => `p${i}`);
    const params = new Map(SHAPES.map((s, i) => {
      const n = s.reduce((a, b) => a * b, 1);
      return [keys[i], tf.variable(tf.tensor(randoms(n, 100 + i), s))];
    }));
    const opt = new AdamW(params, CONFIG);
    const ema = new Ema(params, { decay: EMA_DECAY });
    const norms: number[] = [];
    for (let step = 0; step < 3; step++) {
      const grads = new Map(SHAPES.map((s, i) => {
        const n = s.reduce((a, b) => a * b, 1);
        const scale = (i + 1) / (4 * Math.sqrt(n));
        const g = randoms(n, 1000 * step + i).map((x) => x * scale);
        return [keys[i], tf.tensor(g, s)];
      }));
      if (mode === "partial" && step === 1) {
        grads.get(keys[3])!.dispose();
        grads.delete(keys[3]);
      }
      let norm: tf.Scalar;
      if (mode === "trainer" && backend === "webgpu") {
        const flat = flattenInOrder(grads, keys);
        norm = flatNorm(flat);
        opt[STEP_FLAT](flat, { norm, maxNorm });
        flat.dispose();
      } else {
        const clipped = clipGradNorm(grads, maxNorm);
        norm = clipped.norm;
        opt.step(clipped.grads);
        tf.dispose([...clipped.grads.values()]);
      }
      norms.push((await norm.data())[0]);
      norm.dispose();
      tf.dispose([...grads.values()]);
      ema.update(params);
    }
    const state = opt.getState();
    const result = {
      norms,
      params: await readAll(params),
      m: await readAll(state.expAvg),
      v: await readAll(state.expAvgSq),
      ema: await readAll(ema.params),
    };
    tf.dispose([...state.expAvg.values(), ...state.expAvgSq.values()]);
    opt.dispose();
    ema.dispose();
    tf.dispose([...params.values()]);
    return result;
  } finally {
    tf.engine().endScope();
    await initBackend("cpu");
  }
}

function assertMapsClose(
  got: Map<string, Float32Array>,
  want: Map<string, Float32Array>,
  tol: number,
  what: string,
): void {
  assert.deepEqual([...got.keys()], [...want.keys()], `${what}: keys`);
  for (const [k, w] of want) {
    const e = relErr(got.get(k)!, w);
    assert.ok(e <= tol, `${what} ${k}: relative error ${e} > ${tol}`);
  }
}

async function compare(maxNorm: number, mode: Mode, clipping: boolean) {
  const gpu = await run("webgpu", maxNorm, mode);
  if (gpu === null) return;
  const cpu = (await run("cpu", maxNorm, mode))!;
  // The gradients' norms are about 2: clipped at 1, not at 100.
  assert.ok(cpu.norms.every((n) => (n > maxNorm) === clipping), "clipping");
  // A few float32 ulps: WGSL's division and square root may be off by
  // 2.5 and 1 ulp on a real GPU (llvmpipe gives the cpu backend's bits).
  const tol = 4e-6;
  assert.ok(relErr(gpu.norms, cpu.norms) <= tol, "norms");
  assertMapsClose(gpu.params, cpu.params, tol, "params");
  assertMapsClose(gpu.m, cpu.m, tol, "m");
  assertMapsClose(gpu.v, cpu.v, tol, "v");
  assertMapsClose(gpu.ema, cpu.ema, tol, "ema");
}

Deno.test("fused WebGPU clip + AdamW + EMA (trainer's path) match cpu, clipping active", async () => {
  await compare(1, "trainer", true);
});

Deno.test("fused WebGPU clip + AdamW + EMA (trainer's path) match cpu, clipping inactive", async () => {
  await compare(100, "trainer", false);
});

Deno.test("clipGradNorm and AdamW.step on WebGPU match cpu, clipping active", async () => {
  await compare(1, "public", true);
});

Deno.test("AdamW on WebGPU with a gradient missing in one step matches cpu", async () => {
  await compare(100, "partial", false);
});

Deno.test("AdamW state round-trips on WebGPU: getState of a packed optimizer resumes in another", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  tf.engine().startScope();
  try {
    const p1 = tf.variable(tf.tensor(randoms(67, 1), [67]));
    const p2 = tf.variable(tf.tensor(randoms(3, 2), [3]));
    const q1 = tf.variable(tf.clone(p1));
    const q2 = tf.variable(tf.clone(p2));
    const g = new Map([["a", tf.tensor(randoms(67, 3))], [
      "b",
      tf.tensor(randoms(3, 4)),
    ]]);
    const a = new AdamW(new Map([["a", p1], ["b", p2]]), CONFIG);
    a.step(g);
    const b = new AdamW(new Map([["a", q1], ["b", q2]]), CONFIG);
    b.step(g); // packed, then overwritten
    const state = a.getState();
    b.setState(state);
    a.step(g);
    b.step(g);
    assert.deepEqual(await p1.data(), await q1.data());
    const sa = a.getState();
    const sb = b.getState();
    assert.deepEqual(
      await sa.expAvgSq.get("b")!.data(),
      await sb.expAvgSq.get("b")!.data(),
    );
    assert.deepEqual(sa.expAvg.get("a")!.shape, [67]);
  } finally {
    tf.engine().endScope();
    await initBackend("cpu");
  }
});

Deno.test("one fused step of a base-64 UNet's parameter set uses at most 2 kernels per tensor + 8", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return;
  tf.engine().startScope();
  try {
    // The kernel count depends on the number of tensors only: base 64's
    // 86 tensors, at base 8's small shapes.
    const shapes = unetParamShapes({ inChannels: 1, base: 8, timeDim: 16 });
    assert.equal(
      shapes.size,
      unetParamShapes({ inChannels: 1, base: 64, timeDim: 256 }).size,
    );
    const keys = [...shapes.keys()];
    const params = new Map(
      keys.map((
        k,
        i,
      ) => [
        k,
        tf.variable(tf.randomNormal(shapes.get(k)!, 0, 1, "float32", i)),
      ]),
    );
    const grads = new Map(
      keys.map((
        k,
        i,
      ) => [k, tf.randomNormal(shapes.get(k)!, 0, 1, "float32", 99 + i)]),
    );
    const loss = tf.scalar(0.5);
    const opt = new AdamW(params);
    const ema = new Ema(params);
    // As Trainer.trainStep on WebGPU: norm, stats, fused step, EMA.
    const step = () => {
      const { stats, flat, norm } = tf.tidy(() => {
        const flat = flattenInOrder(grads, keys);
        const norm = flatNorm(flat);
        return { stats: tf.stack([loss, norm]), flat, norm };
      });
      opt[STEP_FLAT](flat, { norm, maxNorm: 1 });
      ema.update(params);
      tf.dispose([stats, flat, norm]);
    };
    step();
    const info = await tf.profile(step);
    // Reshape is no dispatch; Concat is one kernel of a few dispatches.
    const kernels = info.kernels.filter((k) => k.name !== "Reshape").length;
    assert.ok(
      kernels <= 2 * keys.length + 8,
      `${kernels} kernels for ${keys.length} tensors`,
    );
  } finally {
    tf.engine().endScope();
    await initBackend("cpu");
  }
});

/** Three Trainer steps of a toy model with odd-sized parameters on `backend`. */
async function trainToy(backend: "cpu" | "webgpu") {
  const got = await initBackend(backend);
  if (got.backend !== backend) return null;
  tf.engine().startScope();
  try {
    const a = tf.variable(tf.tensor(randoms(67, 7)));
    const b = tf.variable(tf.tensor(randoms(3, 8)));
    const c = tf.variable(tf.tensor(randoms(1, 9)));
    const model = {
      params: new Map([["a", a], ["b", b], ["c", c]]),
      predict: (x: tf.Tensor4D) =>
        tf.add(
          tf.mul(x, tf.sum(tf.mul(a, a))),
          tf.add(tf.sum(b), tf.reshape(c, [])),
        ) as tf.Tensor4D,
    };
    const schedule = makeSchedule({ T: 100 });
    const trainer = new Trainer(model, schedule, {
      seed: 1,
      maxGradNorm: 0.5,
      optimizer: { lr: 1e-2, weightDecay: 0.05 },
      ema: { decay: 0.9 },
    });
    const x0 = tf.tensor4d(randoms(3 * 5 * 5, 10), [3, 5, 5, 1]);
    const norms: number[] = [];
    norms.push((await trainer.trainStep(x0)).gradNorm);
    const tensors = tf.memory().numTensors;
    let kernelNames: string[] = [];
    const info = await tf.profile(async () => {
      norms.push((await trainer.trainStep(x0)).gradNorm);
    });
    kernelNames = info.kernels.map((k) => k.name);
    norms.push((await trainer.trainStep(x0)).gradNorm);
    const leaked = tf.memory().numTensors - tensors;
    const state = trainer.getState();
    const out = {
      norms,
      leaked,
      kernelNames,
      params: await readAll(model.params),
      m: await readAll(state.optimizer.expAvg),
      ema: await readAll(trainer.ema!.params),
    };
    trainer.dispose();
    schedule.dispose();
    return out;
  } finally {
    tf.engine().endScope();
    await initBackend("cpu");
  }
}

Deno.test("Trainer on WebGPU takes the fused path, matches cpu and leaks no tensors", async () => {
  const gpu = await trainToy("webgpu");
  if (gpu === null) return;
  const cpu = (await trainToy("cpu"))!;
  assert.ok(gpu.kernelNames.includes("DdpmAdamWMoments"), "fused step used");
  assert.ok(!cpu.kernelNames.includes("DdpmAdamWMoments"));
  assert.equal(gpu.leaked, 0);
  assert.equal(cpu.leaked, 0);
  assert.ok(cpu.norms.every((n) => n > 0.5), "clipping active");
  assert.ok(relErr(gpu.norms, cpu.norms) <= 1e-5, "norms");
  assertMapsClose(gpu.params, cpu.params, 1e-5, "params");
  assertMapsClose(gpu.m, cpu.m, 1e-5, "m");
  assertMapsClose(gpu.ema, cpu.ema, 1e-5, "ema");
});
