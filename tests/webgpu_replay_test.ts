/**
 * core/_webgpu_replay.ts's `replayOnWebGpu` against the plain, un-replayed
 * model: sampling (DDIM and DDPM) through the wrapper gives the plain
 * sampler's images bit for bit, before and after replays take over; the
 * wrapper hands back every tensor and pooled buffer it held; a released
 * weight makes the recording stale; a read back during the call, the
 * DDPM_WEBGPU_REPLAY=0 switch, a gradient tape and a non-WebGPU backend all
 * send calls through tfjs. Small models (UNet base 8, 8x8 images) so that
 * llvmpipe runs the file in seconds; skipped where no WebGPU adapter exists.
 */
import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { replayOnWebGpu } from "../core/_webgpu_replay.ts";
import { makeSchedule } from "../core/schedule.ts";
import { UNet } from "../core/unet.ts";
import { sampleDdim } from "../samplers/ddim.ts";
import { sampleDdpm } from "../samplers/ddpm.ts";
import { randoms } from "./_util.ts";

const hasWebGpu = (globalThis.navigator as Navigator | undefined)?.gpu !==
  undefined;

type Model = (x: tf.Tensor4D, t: tf.Tensor1D) => tf.Tensor4D;

/** The parts of tfjs's WebGPU buffer pool the resource test reads. */
interface Pool {
  numUsedBuffers: number;
  numBytesUsed: number;
}

function pool(): Pool {
  return (tf.backend() as unknown as { bufferManager: Pool }).bufferManager;
}

/** A tensor's values, read back (and the tensor disposed). */
async function take(t: tf.Tensor): Promise<Float32Array> {
  try {
    return await t.data() as Float32Array;
  } finally {
    t.dispose();
  }
}

/** Bit-for-bit equality of two float32 arrays (NaN equals NaN, 0 is not -0). */
function assertBitEqual(got: Float32Array, want: Float32Array, what: string) {
  assert.equal(got.length, want.length, `${what}: length`);
  const g = new Uint32Array(got.buffer, got.byteOffset, got.length);
  const w = new Uint32Array(want.buffer, want.byteOffset, want.length);
  for (let i = 0; i < g.length; i++) {
    if (g[i] !== w[i]) {
      assert.fail(
        `${what}: element ${i} differs (got ${got[i]}, expected ${want[i]})`,
      );
    }
  }
}

/** Wraps `f` so that its calls are counted in `n.calls`. */
function counted(f: Model): Model & { calls: number } {
  const g = ((x: tf.Tensor4D, t: tf.Tensor1D) => {
    g.calls++;
    return f(x, t);
  }) as Model & { calls: number };
  g.calls = 0;
  return g;
}

/** A noisy batch and its timesteps. */
function batch(n: number, seed: number, steps: number[]) {
  return {
    x: tf.tensor4d(randoms(n * 8 * 8, seed), [n, 8, 8, 1]),
    t: tf.tensor1d(steps, "int32"),
  };
}

/**
 * Run `fn` on the webgpu backend (back to cpu afterwards); false where
 * WebGPU does not start.
 */
async function onWebGpu(fn: () => Promise<void>): Promise<boolean> {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") return false;
  try {
    await fn();
  } finally {
    await initBackend("cpu");
  }
  return true;
}

Deno.test({
  name:
    "replayed DDIM sampling equals plain sampling bit for bit, before and after replays take over",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const unet = new UNet({ base: 8, seed: 1 });
      const schedule = makeSchedule({ T: 100 });
      const eps = replayOnWebGpu((x, t) => unet.predict(x, t));
      try {
        const opts = { n: 2, imgSize: 8, numSteps: 4, seed: 7 };
        const want = await take(await sampleDdim(unet, schedule, opts));
        // First sampling: capture, the check beside a plain call, plain calls.
        const first = counted(eps);
        assertBitEqual(
          await take(await sampleDdim(first, schedule, opts)),
          want,
          "first replayed sampling",
        );
        assert.ok(first.calls >= 4);
        assert.equal(eps.stats.captured, 1);
        await eps.settled();
        assert.equal(eps.fallback, "");
        // Second sampling: every call replayed.
        const before = eps.stats;
        const second = counted(eps);
        assertBitEqual(
          await take(await sampleDdim(second, schedule, opts)),
          want,
          "second replayed sampling",
        );
        assert.equal(eps.fallback, "");
        assert.deepEqual(eps.stats, {
          replayed: before.replayed + second.calls,
          captured: before.captured,
          plain: before.plain,
        });
        assert.equal(second.calls, first.calls);
        // Another seed, through replays, equals its plain sampling too.
        const other = { ...opts, seed: 8 };
        const wantOther = await take(await sampleDdim(unet, schedule, other));
        assertBitEqual(
          await take(await sampleDdim(eps, schedule, other)),
          wantOther,
          "replayed sampling with another seed",
        );
        assert.equal(eps.stats.replayed, before.replayed + 2 * second.calls);
      } finally {
        eps.dispose();
        unet.dispose();
        schedule.dispose();
      }
    });
  },
});

Deno.test({
  name: "replayed DDPM sampling (stochastic, seeded) equals plain sampling",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const unet = new UNet({ base: 8, seed: 2 });
      const schedule = makeSchedule({ T: 12 });
      const eps = replayOnWebGpu((x, t) => unet.predict(x, t));
      try {
        const opts = { n: 1, imgSize: 8, seed: 3 };
        const want = await take(await sampleDdpm(unet, schedule, opts));
        assertBitEqual(
          await take(await sampleDdpm(eps, schedule, opts)),
          want,
          "first replayed DDPM sampling",
        );
        await eps.settled();
        const before = eps.stats;
        assertBitEqual(
          await take(await sampleDdpm(eps, schedule, opts)),
          want,
          "second replayed DDPM sampling",
        );
        assert.equal(eps.fallback, "");
        assert.equal(eps.stats.replayed, before.replayed + schedule.T);
        assert.equal(eps.stats.plain, before.plain);
      } finally {
        eps.dispose();
        unet.dispose();
        schedule.dispose();
      }
    });
  },
});

Deno.test({
  name:
    "a disposed replay hands back every tensor and every pooled buffer it held",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const unet = new UNet({ base: 8, seed: 4 });
      const schedule = makeSchedule({ T: 100 });
      const opts = { n: 2, imgSize: 8, numSteps: 3, seed: 5 };
      const lifecycle = async () => {
        const eps = replayOnWebGpu((x, t) => unet.predict(x, t));
        try {
          await take(await sampleDdim(eps, schedule, opts));
          await eps.settled();
          await take(await sampleDdim(eps, schedule, opts));
          assert.ok(eps.stats.replayed > 0, "replays ran");
        } finally {
          eps.dispose();
        }
      };
      try {
        // Warm-up: the same ops outside a replay, and one whole lifecycle.
        await take(await sampleDdim(unet, schedule, opts));
        await lifecycle();
        // A read submits tfjs's queue and frees what waited on it.
        await take(tf.tidy(() => tf.add(tf.zeros([1]), 1)));
        const tensors = tf.memory().numTensors;
        const used = pool().numUsedBuffers;
        const bytes = pool().numBytesUsed;
        await lifecycle();
        await take(tf.tidy(() => tf.add(tf.zeros([1]), 1)));
        assert.equal(tf.memory().numTensors, tensors, "tensors");
        assert.equal(pool().numUsedBuffers, used, "used buffers");
        assert.equal(pool().numBytesUsed, bytes, "bytes used");
      } finally {
        unet.dispose();
        schedule.dispose();
      }
    });
  },
});

Deno.test({
  name:
    "a released weight makes the recording stale: the next call captures again with the new weight",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const unet = new UNet({ base: 8, seed: 6 });
      // Weights of our own, each in its own buffer (not shared with unet's).
      const params = new Map<string, tf.Tensor>();
      for (const [k, v] of unet.params) {
        params.set(k, tf.tensor(await v.data(), v.shape));
      }
      const { x, t } = batch(2, 21, [5, 700]);
      const eps = replayOnWebGpu((x, t) => unet.apply(params, x, t));
      try {
        const want = await take(unet.apply(params, x, t));
        for (let i = 0; i < 3; i++) {
          assertBitEqual(await take(eps(x, t)), want, `call ${i}`);
        }
        await eps.settled();
        const replayed = eps.stats.replayed;
        assertBitEqual(await take(eps(x, t)), want, "replayed call");
        assert.equal(eps.stats.replayed, replayed + 1);
        assert.equal(eps.stats.captured, 1);
        // Replace the first convolution's weight with other values.
        const key = [...params.keys()].find((k) =>
          k.endsWith(".weight") && params.get(k)!.rank === 4
        )!;
        const old = params.get(key)!;
        const values = await old.data();
        const scaled = Float32Array.from(values, (v, i) => v * (1 + i % 3));
        old.dispose();
        params.set(key, tf.tensor(scaled, old.shape));
        const want2 = await take(unet.apply(params, x, t));
        assert.notDeepEqual(want2, want, "the new weight changes the output");
        const stats = eps.stats;
        assertBitEqual(await take(eps(x, t)), want2, "call after the release");
        assert.equal(eps.stats.captured, stats.captured + 1, "captured again");
        assert.equal(eps.stats.replayed, stats.replayed);
        // And replays resume with the new weight.
        assertBitEqual(await take(eps(x, t)), want2, "check call");
        await eps.settled();
        assertBitEqual(await take(eps(x, t)), want2, "replay, new weight");
        assert.equal(eps.stats.replayed, stats.replayed + 1);
        assert.equal(eps.fallback, "");
      } finally {
        eps.dispose();
        tf.dispose([x, t, ...params.values()]);
        unet.dispose();
      }
    });
  },
});

Deno.test({
  name: "a model that reads data back during the call runs through tfjs",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const unet = new UNet({ base: 8, seed: 8 });
      const { x, t } = batch(1, 31, [40]);
      const reads: Promise<unknown>[] = [];
      const sums: tf.Tensor[] = [];
      const eps = replayOnWebGpu((x, t) => {
        const s = tf.sum(x);
        sums.push(s);
        reads.push(s.data());
        return unet.predict(x, t);
      });
      try {
        const tensors = tf.memory().numTensors;
        const want = await take(unet.predict(x, t));
        for (let i = 0; i < 3; i++) {
          assertBitEqual(await take(eps(x, t)), want, `call ${i}`);
        }
        await eps.settled();
        assert.match(eps.fallback, /read back/);
        assert.deepEqual(eps.stats, { replayed: 0, captured: 1, plain: 2 });
        // The reads themselves were answered, with x's sum.
        const sum = Array.from(await x.data()).reduce((a, b) => a + b, 0);
        for (const r of await Promise.all(reads)) {
          assert.ok(Math.abs((r as Float32Array)[0] - sum) < 1e-4);
        }
        tf.dispose(sums);
        assert.equal(tf.memory().numTensors, tensors, "nothing kept");
      } finally {
        eps.dispose();
        tf.dispose([x, t]);
        unet.dispose();
      }
    });
  },
});

Deno.test({
  name: "DDPM_WEBGPU_REPLAY=0 switches replays off: plain calls, same outputs",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const unet = new UNet({ base: 8, seed: 9 });
      const { x, t } = batch(2, 41, [1, 99]);
      const previous = Deno.env.get("DDPM_WEBGPU_REPLAY");
      Deno.env.set("DDPM_WEBGPU_REPLAY", "0");
      let eps;
      try {
        eps = replayOnWebGpu((x, t) => unet.predict(x, t));
      } finally {
        if (previous === undefined) Deno.env.delete("DDPM_WEBGPU_REPLAY");
        else Deno.env.set("DDPM_WEBGPU_REPLAY", previous);
      }
      try {
        const want = await take(unet.predict(x, t));
        for (let i = 0; i < 4; i++) {
          assertBitEqual(await take(eps(x, t)), want, `call ${i}`);
        }
        await eps.settled();
        assert.equal(eps.fallback, "DDPM_WEBGPU_REPLAY=0");
        assert.deepEqual(eps.stats, { replayed: 0, captured: 0, plain: 4 });
      } finally {
        eps.dispose();
        tf.dispose([x, t]);
        unet.dispose();
      }
    });
  },
});

Deno.test({
  name:
    "under a gradient tape calls run through tfjs, with the plain model's gradients",
  ignore: !hasWebGpu,
  fn: async () => {
    await onWebGpu(async () => {
      const unet = new UNet({ base: 8, seed: 10 });
      const { x, t } = batch(2, 51, [3, 300]);
      const target = tf.tensor4d(randoms(2 * 8 * 8, 52), [2, 8, 8, 1]);
      const eps = replayOnWebGpu((x, t) => unet.predict(x, t));
      const lossOf = (f: Model) => () =>
        tf.mean(tf.square(tf.sub(f(x, t), target))) as tf.Scalar;
      try {
        // Replays running first.
        for (let i = 0; i < 2; i++) tf.dispose(eps(x, t));
        await eps.settled();
        tf.dispose(eps(x, t));
        assert.equal(eps.stats.replayed, 1);
        const stats = eps.stats;
        const plainGrads = tf.variableGrads(
          lossOf((x, t) => unet.predict(x, t)),
        );
        const gotGrads = tf.variableGrads(lossOf(eps));
        try {
          assert.deepEqual(eps.stats, { ...stats, plain: stats.plain + 1 });
          assertBitEqual(
            await gotGrads.value.data() as Float32Array,
            await plainGrads.value.data() as Float32Array,
            "loss",
          );
          const names = Object.keys(plainGrads.grads);
          assert.equal(names.length, unet.params.size);
          assert.deepEqual(Object.keys(gotGrads.grads).sort(), names.sort());
          for (const name of names) {
            assertBitEqual(
              await gotGrads.grads[name].data() as Float32Array,
              await plainGrads.grads[name].data() as Float32Array,
              `gradient of ${name}`,
            );
          }
          // tf.grad with respect to x, too.
          const dx = tf.grad((x) => eps(x as tf.Tensor4D, t))(x);
          const dxPlain = tf.grad((x) => unet.predict(x as tf.Tensor4D, t))(x);
          assertBitEqual(await take(dx), await take(dxPlain), "gradient of x");
          assert.equal(eps.stats.plain, stats.plain + 2);
          assert.equal(eps.stats.replayed, stats.replayed);
        } finally {
          tf.dispose([plainGrads.value, gotGrads.value]);
          tf.dispose(Object.values(plainGrads.grads));
          tf.dispose(Object.values(gotGrads.grads));
        }
      } finally {
        eps.dispose();
        tf.dispose([x, t, target]);
        unet.dispose();
      }
    });
  },
});

Deno.test("on the cpu backend the wrapper passes calls straight through", async () => {
  await initBackend("cpu");
  const unet = new UNet({ base: 8, seed: 11 });
  const { x, t } = batch(1, 61, [10]);
  const model = counted((x, t) => unet.predict(x, t));
  const eps = replayOnWebGpu(model);
  try {
    const want = await take(unet.predict(x, t));
    for (let i = 0; i < 3; i++) {
      assertBitEqual(await take(eps(x, t)), want, `call ${i}`);
    }
    await eps.settled();
    assert.deepEqual(eps.stats, { replayed: 0, captured: 0, plain: 3 });
    assert.equal(model.calls, 3);
    assert.equal(eps.fallback, "");
  } finally {
    eps.dispose();
    tf.dispose([x, t]);
    unet.dispose();
  }
});
