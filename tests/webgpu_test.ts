/**
 * The WebGPU path against the cpu backend: the same UNet weights and the
 * same draws must give the same forward pass and the same training steps
 * within float32 tolerance. The cpu backend computes with tfjs's own
 * kernels, so this checks every WebGPU-only piece (the upload path and any
 * custom WebGPU program) against an independent implementation. Runs on
 * Mesa's llvmpipe here; skipped where no WebGPU adapter exists.
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { makeSchedule } from "../core/schedule.ts";
import { Trainer, type TrainerOptions } from "../core/train.ts";
import { UNet } from "../core/unet.ts";
import { Ema } from "../core/ema.ts";
import { RUN_FILES, TrainingRun } from "../core/run.ts";
import { randoms, readAll, relErr, safetensorsData } from "./_util.ts";
import { noiseBatch } from "./_runs.ts";

const hasWebGpu = (globalThis.navigator as Navigator | undefined)?.gpu !==
  undefined;

interface Run {
  eps: Float32Array;
  losses: number[];
  norms: number[];
  params: Map<string, Float32Array>;
  ema: Map<string, Float32Array>;
  m: Map<string, Float32Array>;
}

/** A forward pass and `steps` training steps of a base-16 UNet (two channels per GroupNorm group, so that no gradient is zero by symmetry) on `backend`. */
async function run(
  backend: "cpu" | "webgpu",
  steps: number,
  options: TrainerOptions,
): Promise<Run | null> {
  const got = await initBackend(backend);
  if (got.backend !== backend) return null;
  tf.engine().startScope();
  try {
    const unet = new UNet({ base: 16, seed: 3 });
    const schedule = makeSchedule({ T: 1000 });
    const x = tf.tensor4d(
      Array.from(randoms(2 * 8 * 8, 11), (v) => Math.max(-1, Math.min(1, v))),
      [2, 8, 8, 1],
    );
    const t = tf.tensor1d([17, 901], "int32");
    const eps = await unet.predict(x, t).data() as Float32Array;
    const x0 = tf.tensor4d(
      Array.from(randoms(4 * 8 * 8, 12), (v) => Math.max(-1, Math.min(1, v))),
      [4, 8, 8, 1],
    );
    const trainer = new Trainer(unet, schedule, { seed: 5, ...options });
    const losses: number[] = [];
    const norms: number[] = [];
    for (let i = 0; i < steps; i++) {
      const r = await trainer.trainStep(x0);
      losses.push(r.loss);
      norms.push(r.gradNorm);
    }
    const state = trainer.getState();
    const result: Run = {
      eps,
      losses,
      norms,
      params: await readAll(unet.params),
      ema: trainer.ema === null ? new Map() : await readAll(trainer.ema.params),
      m: await readAll(state.optimizer.expAvg),
    };
    trainer.dispose();
    unet.dispose();
    schedule.dispose();
    return result;
  } finally {
    tf.engine().endScope();
    await initBackend("cpu");
  }
}

/**
 * Each tensor of `a` close to `b`'s relative to the larger of its own norm
 * and `floor` times the largest norm in `b` (gradients of biases that a
 * GroupNorm follows are rounding noise around zero).
 */
function assertMapsClose(
  a: Map<string, Float32Array>,
  b: Map<string, Float32Array>,
  tol: number,
  what: string,
  floor = 0,
): void {
  assert.deepEqual([...a.keys()], [...b.keys()], `${what}: keys`);
  const norm = (v: Float32Array) => Math.hypot(...v);
  const largest = Math.max(...[...b.values()].map(norm));
  for (const [k, v] of a) {
    const ref = b.get(k)!;
    const diff = norm(v.map((x, i) => x - ref[i]));
    const scale = Math.max(norm(ref), floor * largest);
    assert.ok(
      diff <= tol * scale,
      `${what} ${k}: error ${diff} against scale ${scale}`,
    );
  }
}

Deno.test({
  name:
    "uploads round-trip float32, int32 and bool on webgpu, pooled buffers included",
  ignore: !hasWebGpu,
  fn: async () => {
    const got = await initBackend("webgpu");
    if (got.backend !== "webgpu") return;
    try {
      for (let round = 0; round < 3; round++) {
        const f = tf.tensor1d([1.5, -2, 3e-8, round]);
        const i = tf.tensor1d([7, -1, 2 ** 30, round], "int32");
        const b = tf.tensor1d([true, false, true, round === 1], "bool");
        // Through a kernel, so that the data must live on the GPU.
        const f2 = tf.add(f, 0);
        const i2 = tf.add(i, 0);
        const b2 = tf.logicalAnd(b, true);
        assert.deepEqual(
          [...await f2.data()],
          [...new Float32Array([1.5, -2, 3e-8, round])],
        );
        assert.deepEqual([...await i2.data()], [7, -1, 2 ** 30, round]);
        assert.deepEqual([...await b2.data()], [1, 0, 1, round === 1 ? 1 : 0]);
        tf.dispose([f, i, b, f2, i2, b2]);
      }
    } finally {
      await initBackend("cpu");
    }
  },
});

Deno.test({
  name: "webgpu forward pass and training steps equal the cpu backend's",
  ignore: !hasWebGpu,
  fn: async () => {
    const options: TrainerOptions = {
      optimizer: { lr: 1e-3 },
      ema: { decay: 0.9, mode: "constant" },
    };
    const gpu = await run("webgpu", 3, options);
    if (gpu === null) return;
    const cpu = (await run("cpu", 3, options))!;
    assert.ok(relErr(gpu.eps, cpu.eps) < 1e-4, "forward pass");
    for (let i = 0; i < cpu.losses.length; i++) {
      assert.ok(
        Math.abs(gpu.losses[i] - cpu.losses[i]) < 1e-4 * cpu.losses[i],
        `loss ${i}: ${gpu.losses[i]} vs ${cpu.losses[i]}`,
      );
      assert.ok(
        Math.abs(gpu.norms[i] - cpu.norms[i]) < 1e-3 * cpu.norms[i],
        `gradient norm ${i}: ${gpu.norms[i]} vs ${cpu.norms[i]}`,
      );
    }
    // AdamW's first steps move each weight by about lr sign(g): compare
    // the moments and the weights' change rather than the weights alone.
    assertMapsClose(gpu.m, cpu.m, 2e-3, "first moment", 1e-3);
    assertMapsClose(gpu.params, cpu.params, 1e-4, "weights");
    assertMapsClose(gpu.ema, cpu.ema, 1e-4, "EMA weights");
  },
});

/** tfjs kernel records that issue no GPU dispatch. */
const NO_DISPATCH = new Set([
  "Reshape",
  "Identity",
  "Cast",
  "fusedConv2d__op",
  "unnamed scope",
]);

Deno.test({
  name:
    "a webgpu training step stays within its kernel budget (fused norm, weight gradient and optimizer in use)",
  ignore: !hasWebGpu,
  fn: async () => {
    const got = await initBackend("webgpu");
    if (got.backend !== "webgpu") return;
    tf.engine().startScope();
    try {
      const unet = new UNet({ base: 16, seed: 3 });
      const schedule = makeSchedule({ T: 1000 });
      const x0 = tf.zeros([2, 8, 8, 1]) as tf.Tensor4D;
      const trainer = new Trainer(unet, schedule, { seed: 5 });
      await trainer.trainStep(x0);
      const info = await tf.profile(async () => {
        await trainer.trainStep(x0);
      });
      const names = info.kernels.map((k) => k.name);
      const dispatching = names.filter((n) => !NO_DISPATCH.has(n)).length;
      const count = (n: string) => names.filter((m) => m === n).length;
      // Each GroupNorm 2 kernels forward (13 norms), its backward 4; each
      // parameter tensor 1 (its weight); the EMA 1 over all of them, packed.
      // 2,392 before these were fused.
      assert.equal(count("DdpmNormStats"), 13);
      assert.equal(count("DdpmAdamWParam"), unet.params.size);
      assert.equal(count("DdpmEma"), 1);
      // 389 here (tfjs's Concat of the 86 tensors counts once).
      assert.ok(dispatching <= 430, `${dispatching} dispatching kernels`);
      trainer.dispose();
      unet.dispose();
      schedule.dispose();
    } finally {
      tf.engine().endScope();
      await initBackend("cpu");
    }
  },
});

/** EMA averages after a scripted sequence of updates, reads and a restore. */
async function emaScript(
  backend: "cpu" | "webgpu",
): Promise<Float32Array[][] | null> {
  const got = await initBackend(backend);
  if (got.backend !== backend) return null;
  tf.engine().startScope();
  try {
    const shapes = [[3], [2, 5], [1], [4, 1, 3]];
    const params = new Map(
      shapes.map((s, i) => [`p${i}`, tf.variable(tf.zeros(s))] as const),
    );
    const set = (seed: number) => {
      for (const [i, [, v]] of [...params].entries()) {
        v.assign(tf.tensor(randoms(v.size, seed + i), v.shape));
      }
    };
    const ema = new Ema(params, { decay: 0.8, mode: "constant" });
    const reads: Float32Array[][] = [];
    const read = async () =>
      reads.push(
        await Promise.all(
          [...ema.params.values()].map(async (v) =>
            await v.data() as Float32Array
          ),
        ),
      );
    set(1);
    ema.update(params);
    set(2);
    ema.update(params); // packed, not read in between
    await read();
    set(3);
    ema.update(params); // after a read: both copies current
    await read();
    const saved = ema.getState();
    set(4);
    ema.update(params);
    ema.setState(saved); // per-key values newer than the packed ones
    set(5);
    ema.update(params);
    await read();
    tf.dispose([...saved.params.values()]);
    ema.dispose();
    return reads;
  } finally {
    tf.engine().endScope();
    await initBackend("cpu");
  }
}

Deno.test({
  name:
    "the packed WebGPU EMA equals the cpu backend's through updates, reads and a restore",
  ignore: !hasWebGpu,
  fn: async () => {
    const gpu = await emaScript("webgpu");
    if (gpu === null) return;
    const cpu = (await emaScript("cpu"))!;
    for (const [r, tensors] of cpu.entries()) {
      for (const [i, want] of tensors.entries()) {
        const e = relErr(gpu[r][i], want);
        assert.ok(e < 1e-6, `read ${r}, tensor ${i}: relative error ${e}`);
      }
    }
  },
});

Deno.test({
  name:
    "webgpu training steps started before the previous one is awaited equal steps taken one by one; a failed step cancels those started after it and changes nothing",
  ignore: !hasWebGpu,
  fn: async () => {
    const got = await initBackend("webgpu");
    if (got.backend !== "webgpu") return;
    tf.engine().startScope();
    try {
      const schedule = makeSchedule({ T: 1000 });
      const good = tf.tensor4d(
        Array.from(randoms(2 * 8 * 8, 21), (v) => Math.max(-1, Math.min(1, v))),
        [2, 8, 8, 1],
      );
      const bad = tf.fill([2, 8, 8, 1], NaN) as tf.Tensor4D;
      const make = () => {
        const unet = new UNet({ base: 8, seed: 4 });
        return { unet, trainer: new Trainer(unet, schedule, { seed: 6 }) };
      };
      const snapshot = async (m: ReturnType<typeof make>) =>
        new Map([
          ...await readAll(m.unet.params),
          ...[...await readAll(m.trainer.ema!.params)].map(([k, v]) =>
            [`ema ${k}`, v] as const
          ),
        ]);
      // Bit for bit, with a short message (assert's diff of these maps is huge).
      const assertSame = (
        a: Map<string, Float32Array>,
        b: Map<string, Float32Array>,
        what: string,
      ) => {
        assert.deepEqual([...a.keys()], [...b.keys()]);
        for (const [k, v] of a) {
          const w = b.get(k)!;
          const i = v.findIndex((x, j) => !Object.is(x, w[j]));
          assert.ok(i < 0, `${what}: ${k}[${i}] is ${v[i]}, expected ${w[i]}`);
        }
      };
      // One by one: the states after 1 and 2 steps, and the losses.
      const one = make();
      const losses: number[] = [];
      losses.push((await one.trainer.trainStep(good)).loss);
      const after1 = await snapshot(one);
      losses.push((await one.trainer.trainStep(good)).loss);
      const after2 = await snapshot(one);

      // Started together: the same numbers, bit for bit.
      const two = make();
      const both = [two.trainer.trainStep(good), two.trainer.trainStep(good)];
      assert.deepEqual((await Promise.all(both)).map((r) => r.loss), losses);
      assertSame(await snapshot(two), after2, "started together");

      // Step 2 fails while step 3 is queued behind it.
      const three = make();
      const steps = [good, bad, good].map((x) => three.trainer.trainStep(x));
      steps.forEach((p) => p.catch(() => {}));
      assert.equal((await steps[0]).loss, losses[0]);
      await assert.rejects(
        steps[1],
        (e: Error) =>
          e instanceof RangeError && /step 2: the loss is not finite/.test(
            e.message,
          ),
      );
      await assert.rejects(
        steps[2],
        (e: Error) =>
          e instanceof RangeError && /step 3: an earlier step/.test(e.message),
      );
      assert.equal(three.trainer.step, 1);
      assert.equal(three.trainer.optimizer.stepCount, 1);
      assert.equal(three.trainer.ema!.optimizationStep, 1);
      assertSame(await snapshot(three), after1, "after the failed steps");
      // Training goes on from there as if the failed steps never were.
      const r = await three.trainer.trainStep(good);
      assert.deepEqual([r.step, r.loss], [2, losses[1]]);
      assertSame(await snapshot(three), after2, "after going on");
      for (const m of [one, two, three]) {
        m.trainer.dispose();
        m.unet.dispose();
      }
      tf.dispose([good, bad]);
      schedule.dispose();
    } finally {
      tf.engine().endScope();
      await initBackend("cpu");
    }
  },
});

Deno.test({
  name:
    "a webgpu training run that starts each step ahead writes the same metrics and checkpoints as one that awaits each step",
  ignore: !hasWebGpu,
  fn: async () => {
    const got = await initBackend("webgpu");
    if (got.backend !== "webgpu") return;
    const dirs: string[] = [];
    try {
      const session = async (pipeline: boolean) => {
        const dir = await Deno.makeTempDir({ prefix: "ddpm_pipeline_" });
        dirs.push(dir);
        const run = await TrainingRun.create(dir, {
          model: { base: 8 },
          steps: 5,
          checkpointEvery: 2,
          seed: 2,
          data: { name: "noise", batchSize: 2 },
        });
        // The checkpoint as written at step 2 (the final one replaces it).
        let at2: Uint8Array | null = null;
        const grids: number[] = [];
        await run.train({
          batchesPerEpoch: 4,
          batch: noiseBatch,
          pipeline,
          onFile: (f) => {
            if (f.kind === "checkpoint" && f.step === 2) {
              at2 = Deno.readFileSync(f.path);
            }
          },
          sample: (req) => {
            grids.push(req.step);
            return Promise.resolve(tf.zeros([1, 8, 8, 1]) as tf.Tensor4D);
          },
        });
        run.dispose();
        const metrics = (await Deno.readTextFile(`${dir}/${RUN_FILES.metrics}`))
          .split("\n").filter((l) => l !== "").map((l) => JSON.parse(l));
        return {
          losses: metrics.map((m) => [m.step, m.loss, m.gradNorm]),
          at2: at2!,
          final: await Deno.readFile(`${dir}/${RUN_FILES.checkpoint}`),
          grids,
        };
      };
      const awaited = await session(false);
      const ahead = await session(true);
      assert.equal(awaited.losses.length, 5);
      assert.deepEqual(ahead.losses, awaited.losses);
      assert.deepEqual(ahead.grids, awaited.grids);
      // Byte for byte, apart from the elapsed time in the header.
      assert.ok(
        safetensorsData(ahead.at2).every((v, i) =>
          v === safetensorsData(awaited.at2)[i]
        ),
        "checkpoint at step 2",
      );
      assert.ok(
        safetensorsData(ahead.final).every((v, i) =>
          v === safetensorsData(awaited.final)[i]
        ),
        "final checkpoint",
      );
    } finally {
      for (const d of dirs) await Deno.remove(d, { recursive: true });
      await initBackend("cpu");
    }
  },
});
