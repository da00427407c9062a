import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { decodeSafetensors } from "../core/safetensors.ts";
import { groupNorm, sinusoidalEmbedding } from "../core/_layers.ts";
import { UNet, type UNetConfig, unetParamShapes } from "../core/unet.ts";
import { groupNormF64, randoms, relErr } from "./_util.ts";

await initBackend("cpu");

const TINY: UNetConfig = { inChannels: 1, base: 8, timeDim: 32 };
// At base 8 each GroupNorm group is one channel, which makes some gradients
// exactly zero (a bias followed by a norm); base 16 has none.
const SMALL: UNetConfig = { inChannels: 1, base: 16, timeDim: 32 };
const size = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

function leakCheck<T>(f: () => T): T {
  const before = tf.memory().numTensors;
  const out = f();
  assert.equal(tf.memory().numTensors, before, "tensors leaked");
  return out;
}

// ------------------------------------------------------------ parameter shapes

/**
 * Parameter count of the reference, from its layer list (ddpm_reference.py),
 * written out here independently of unet.ts.
 */
function referenceCount(c: number, b: number, T: number): number {
  const convP = (i: number, o: number, k: number) => o * i * k * k + o;
  const linearP = (i: number, o: number) => o * i + o;
  const normP = (ch: number) => 2 * ch;
  const res = (i: number, o: number) =>
    normP(i) + convP(i, o, 3) + linearP(T, o) + normP(o) + convP(o, o, 3) +
    (i !== o ? convP(i, o, 1) : 0);
  // ConvTranspose2d(i, o, 4): weight [i, o, 4, 4], bias [o].
  const convTP = (i: number, o: number) => i * o * 16 + o;
  return linearP(T, T) + linearP(T, T) + // time.mlp.0, time.mlp.2
    convP(c, b, 3) + // in_conv
    res(b, b) + convP(b, b, 3) + // down1, ds1
    res(b, 2 * b) + convP(2 * b, 2 * b, 3) + // down2, ds2
    res(2 * b, 4 * b) + res(4 * b, 4 * b) + // mid1, mid2
    convTP(4 * b, 2 * b) + res(4 * b, 2 * b) + // us2, up2
    convTP(2 * b, b) + res(2 * b, b) + // us1, up1
    normP(b) + convP(b, c, 3); // out_norm, out_conv
}

Deno.test("unetParamShapes sums to the reference's parameter count", () => {
  // Hand-computed from the formula above (also numpy_unet.param_shapes):
  // the reference at base 64, time_dim 256 has 4,203,393 parameters in 86 tensors.
  assert.equal(referenceCount(1, 64, 256), 4_203_393);
  for (
    const c of [
      { inChannels: 1, base: 64, timeDim: 256 },
      { inChannels: 1, base: 8, timeDim: 32 },
      { inChannels: 3, base: 8, timeDim: 32 },
      { inChannels: 3, base: 16, timeDim: 40 },
    ]
  ) {
    const shapes = unetParamShapes(c);
    const total = [...shapes.values()].reduce((a, s) => a + size(s), 0);
    assert.equal(total, referenceCount(c.inChannels, c.base, c.timeDim));
    // 2 time linears + in_conv + out_conv + ds1 + ds2 + us1 + us2 (2 each),
    // out_norm (2), 6 ResBlocks of 10 plus 4 skips of 2.
    assert.equal(shapes.size, 8 * 2 + 2 + 6 * 10 + 4 * 2);
  }
});

Deno.test("unetParamShapes lists state_dict names in order with PyTorch layouts", () => {
  const shapes = unetParamShapes({ inChannels: 1, base: 64, timeDim: 256 });
  const keys = [...shapes.keys()];
  assert.deepEqual(keys.slice(0, 6), [
    "time.mlp.0.weight",
    "time.mlp.0.bias",
    "time.mlp.2.weight",
    "time.mlp.2.bias",
    "in_conv.weight",
    "in_conv.bias",
  ]);
  const down2 = keys.filter((k) => k.startsWith("down2."));
  assert.deepEqual(down2, [
    "down2.norm1.weight",
    "down2.norm1.bias",
    "down2.conv1.weight",
    "down2.conv1.bias",
    "down2.time_proj.weight",
    "down2.time_proj.bias",
    "down2.norm2.weight",
    "down2.norm2.bias",
    "down2.conv2.weight",
    "down2.conv2.bias",
    "down2.skip.weight",
    "down2.skip.bias",
  ]);
  const modules = [
    ...new Set(keys.map((k) => k.split(".").slice(0, -1).join("."))),
  ]
    .filter((m) => !m.includes("."));
  assert.deepEqual(modules, [
    "in_conv",
    "ds1",
    "ds2",
    "us2",
    "us1",
    "out_norm",
    "out_conv",
  ]);
  const blocks = [
    ...new Set(
      keys.filter((k) => k.split(".").length === 3 && !k.startsWith("time"))
        .map((k) => k.split(".")[0]),
    ),
  ];
  assert.deepEqual(blocks, [
    "down1",
    "down2",
    "mid1",
    "mid2",
    "up2",
    "up1",
  ]);
  assert.deepEqual(keys.slice(-4), [
    "out_norm.weight",
    "out_norm.bias",
    "out_conv.weight",
    "out_conv.bias",
  ]);
  // Skips exactly where channels change.
  const skips = keys.filter((k) => k.endsWith(".skip.weight"));
  assert.deepEqual(skips, [
    "down2.skip.weight",
    "mid1.skip.weight",
    "up2.skip.weight",
    "up1.skip.weight",
  ]);
  assert.deepEqual(shapes.get("time.mlp.0.weight"), [256, 256]);
  assert.deepEqual(shapes.get("in_conv.weight"), [64, 1, 3, 3]);
  assert.deepEqual(shapes.get("ds2.weight"), [128, 128, 3, 3]);
  assert.deepEqual(shapes.get("mid1.time_proj.weight"), [256, 256]);
  assert.deepEqual(shapes.get("us2.weight"), [256, 128, 4, 4]);
  assert.deepEqual(shapes.get("us1.weight"), [128, 64, 4, 4]);
  assert.deepEqual(shapes.get("up2.conv1.weight"), [128, 256, 3, 3]);
  assert.deepEqual(shapes.get("up1.skip.weight"), [64, 128, 1, 1]);
  assert.deepEqual(shapes.get("out_conv.weight"), [1, 64, 3, 3]);
});

Deno.test("UNet params are the state_dict keys in TF layouts", () => {
  const unet = new UNet({ ...TINY, seed: 0 });
  const shapes = unetParamShapes(TINY);
  assert.deepEqual([...unet.params.keys()], [...shapes.keys()]);
  for (const [k, torch] of shapes) {
    const v = unet.params.get(k)!;
    const want = torch.length === 4
      ? [torch[2], torch[3], torch[1], torch[0]]
      : torch.length === 2
      ? [torch[1], torch[0]]
      : torch;
    assert.deepEqual(v.shape, want, k);
    assert.ok(v instanceof tf.Variable && v.trainable, k);
  }
  assert.deepEqual(unet.params.get("us1.weight")!.shape, [4, 4, 8, 16]);
  assert.deepEqual(new UNet({ base: 16 }).config, {
    inChannels: 1,
    base: 16,
    timeDim: 64,
  });
  unet.dispose();
});

// ------------------------------------------------------------------ forward

Deno.test("UNet.predict returns finite NHWC noise of the input's shape and leaks nothing", async () => {
  for (const inChannels of [1, 3]) {
    const unet = new UNet({ inChannels, base: 8, seed: 1 });
    const x = tf.tensor4d(randoms(2 * 16 * 16 * inChannels, 7), [
      2,
      16,
      16,
      inChannels,
    ]);
    const t = tf.tensor1d([3, 900], "int32");
    const before = tf.memory().numTensors;
    const eps = unet.predict(x, t);
    assert.equal(tf.memory().numTensors, before + 1);
    assert.deepEqual(eps.shape, [2, 16, 16, inChannels]);
    assert.equal(eps.dtype, "float32");
    const v = await eps.data();
    assert.ok(v.every(Number.isFinite));
    assert.ok(v.some((a) => a !== 0));
    eps.dispose();
    leakCheck(() => unet.apply(unet.params, x, t).dispose());
    tf.dispose([x, t]);
    unet.dispose();
  }
});

Deno.test("UNet construction and disposal leave no tensor behind", () => {
  leakCheck(() => {
    const unet = new UNet({ ...TINY, seed: 2 });
    const copy = new Map([...unet.params].map(([k, v]) => [k, tf.clone(v)]));
    const other = UNet.fromParams(unet.config, copy);
    // fromParams takes ownership: the given tensors now live in `other`.
    assert.ok([...copy.values()].every((t) => t.isDisposed));
    unet.dispose();
    other.dispose();
  });
});

Deno.test("UNet with the same seed has the same weights, another seed others", () => {
  const a = new UNet({ ...TINY, seed: 5 });
  const b = new UNet({ ...TINY, seed: 5 });
  const c = new UNet({ ...TINY, seed: 6 });
  for (const [k, v] of a.params) {
    assert.deepEqual(v.dataSync(), b.params.get(k)!.dataSync(), k);
    if (!k.includes("norm")) {
      assert.notDeepEqual(v.dataSync(), c.params.get(k)!.dataSync(), k);
    }
  }
  // Within one UNet, same-shaped tensors are drawn independently.
  assert.notDeepEqual(
    a.params.get("down1.conv1.weight")!.dataSync(),
    a.params.get("down1.conv2.weight")!.dataSync(),
  );
  [a, b, c].forEach((u) => u.dispose());
});

Deno.test("UNet init is PyTorch's: U(+-1/sqrt(fan_in)), ConvTranspose fan_in from out channels, GroupNorm 1 and 0", () => {
  const unet = new UNet({ inChannels: 1, base: 16, timeDim: 64, seed: 11 });
  /** PyTorch's fan_in of a module's weight, read off its TF layout. */
  const fanIn = (module: string): number => {
    const s = unet.params.get(`${module}.weight`)!.shape;
    if (s.length === 2) return s[0]; // linear [in, out]
    // conv [kh, kw, in, out]; transposed conv [kh, kw, out, in], whose
    // PyTorch weight [in, out, kh, kw] has size(1) = out.
    return s[0] * s[1]! * s[2]!;
  };
  assert.equal(fanIn("us1"), 16 * 16); // ConvTranspose2d(32, 16, 4): out 16 x 4 x 4
  assert.equal(fanIn("us2"), 16 * 32);
  assert.equal(fanIn("up2.conv1"), 9 * 64);
  let checkedStd = 0;
  for (const [k, v] of unet.params) {
    const module = k.slice(0, k.lastIndexOf("."));
    const data = v.dataSync() as Float32Array;
    if (module.endsWith("norm") || /norm\d$/.test(module)) {
      const want = k.endsWith(".weight") ? 1 : 0;
      assert.ok(data.every((a) => a === want), k);
      continue;
    }
    const bound = 1 / Math.sqrt(fanIn(module));
    assert.ok(data.every((a) => Math.abs(a) <= bound), `${k} within bound`);
    if (data.length >= 2000) {
      const mean = data.reduce((a, b) => a + b, 0) / data.length;
      const std = Math.sqrt(
        data.reduce((a, b) => a + (b - mean) ** 2, 0) / data.length,
      );
      // U(-b, b) has std b / sqrt(3); 2000+ draws pin it within a few %.
      assert.ok(
        Math.abs(std / (bound / Math.sqrt(3)) - 1) < 0.05,
        `${k} std ${std} vs ${bound / Math.sqrt(3)}`,
      );
      assert.ok(Math.abs(mean) < 0.1 * bound, `${k} mean ${mean}`);
      checkedStd++;
    }
  }
  assert.ok(checkedStd >= 20);
  unet.dispose();
});

Deno.test("sinusoidalEmbedding matches hand-computed sin and cos values", () => {
  // dim 8: half 4, frequencies 10000^(-k/3) for k = 0..3.
  const t = tf.tensor1d([0, 5, 999], "int32");
  const e = sinusoidalEmbedding(t, 8);
  assert.deepEqual(e.shape, [3, 8]);
  const v = e.dataSync();
  assert.deepEqual([...v.slice(0, 8)], [0, 0, 0, 0, 1, 1, 1, 1]);
  // t = 5, first frequency 1: sin 5 = -0.958924274663, cos 5 = 0.283662185463.
  assert.ok(Math.abs(v[8] - -0.958924274663) < 1e-6);
  assert.ok(Math.abs(v[12] - 0.283662185463) < 1e-6);
  // t = 5, k = 1: 5 * 10^(-4/3) = 0.232079441681; sin = 0.229999..., cos 0.973190...
  assert.ok(Math.abs(v[9] - Math.sin(0.232079441681)) < 1e-6);
  assert.ok(Math.abs(v[13] - Math.cos(0.232079441681)) < 1e-6);
  // t = 999, k = 3: 999e-4 = 0.0999; sin 0.0999 = 0.099733916...
  assert.ok(Math.abs(v[19] - 0.0997339166) < 1e-6);
  assert.ok(Math.abs(v[23] - Math.cos(0.0999)) < 1e-6);
  // t = 999, k = 0: large arguments, float32 rounding of the product.
  assert.ok(Math.abs(v[16] - Math.sin(999)) < 1e-4);
  tf.dispose([t, e]);
});

Deno.test("groupNorm matches a direct per-group computation", () => {
  const [n, h, w, c, groups] = [2, 3, 4, 16, 8];
  const xs = randoms(n * h * w * c, 21).map((a, i) => a * 3 + (i % c)); // offsets per channel
  const gamma = randoms(c, 22);
  const beta = randoms(c, 23);
  const x = tf.tensor4d(xs, [n, h, w, c]);
  const g = tf.tensor1d(gamma);
  const b = tf.tensor1d(beta);
  const got = groupNorm(x, g, b, groups).dataSync();
  const want = groupNormF64(xs, [n, h, w, c], gamma, beta, groups);
  assert.ok(relErr(got, want) < 1e-5);
  tf.dispose([x, g, b]);
});

Deno.test("UNet reproduces the numpy reference fixtures on cpu and wasm", async () => {
  for (const backend of ["cpu", "wasm"] as const) {
    await initBackend(backend);
    for (const name of ["unet_base8", "unet_base8_rgb"]) {
      const path = new URL(`./fixtures/${name}.safetensors`, import.meta.url);
      const { tensors } = decodeSafetensors(await Deno.readFile(path));
      const params = new Map<string, tf.Tensor>();
      for (const [k, v] of tensors) {
        if (k.startsWith("fixture.")) continue;
        // PyTorch -> TF layout, by the contract's permutations.
        const torch = tf.tensor(v.data, v.shape);
        params.set(
          k,
          v.shape.length === 4
            ? tf.transpose(torch, [2, 3, 1, 0])
            : v.shape.length === 2
            ? tf.transpose(torch)
            : tf.clone(torch),
        );
        torch.dispose();
      }
      const w = tensors.get("in_conv.weight")!.shape;
      const config = {
        inChannels: w[1],
        base: w[0],
        timeDim: tensors.get("time.mlp.0.weight")!.shape[0],
      };
      const unet = UNet.fromParams(config, params);
      const fx = tensors.get("fixture.x")!;
      const ft = tensors.get("fixture.t")!;
      const x = tf.tensor4d(
        fx.data,
        fx.shape as [number, number, number, number],
      );
      const t = tf.tensor1d(ft.data, "int32");
      const eps = unet.predict(x, t);
      const err = relErr(await eps.data(), tensors.get("fixture.eps")!.data);
      assert.ok(err < 1e-5, `${name} on ${backend}: relative error ${err}`);
      tf.dispose([x, t, eps]);
      unet.dispose();
    }
  }
  await initBackend("cpu");
});

// ------------------------------------------------------------------- errors

Deno.test("UNet rejects bad configs with one-line errors", () => {
  const oneLine = (e: unknown) =>
    e instanceof Error && !e.message.includes("\n") &&
    /^Cannot .+: .+ \(got .+, expected .+\)$/.test(e.message);
  const bad: [Partial<UNetConfig>, typeof RangeError | typeof TypeError][] = [
    [{ base: 12 }, RangeError],
    [{ base: 0 }, RangeError],
    [{ base: -8 }, RangeError],
    [{ base: 8.5 }, RangeError],
    [{ base: 8, timeDim: 5 }, RangeError],
    [{ base: 8, timeDim: 2 }, RangeError],
    [{ base: 8, inChannels: 0 }, RangeError],
    [{ base: "8" as unknown as number }, TypeError],
  ];
  for (const [config, kind] of bad) {
    assert.throws(
      () => new UNet(config),
      (e) => e instanceof kind && oneLine(e),
    );
  }
  assert.throws(() => new UNet({ base: 8, seed: 0.5 }), RangeError);
  assert.throws(
    () => unetParamShapes({ inChannels: 1, base: 10, timeDim: 32 }),
    RangeError,
  );
  // timeDim 6 is even and >= 4: fine.
  new UNet({ base: 8, timeDim: 6 }).dispose();
});

Deno.test("UNet.predict rejects bad inputs with one-line errors and leaks nothing", () => {
  const unet = new UNet({ ...TINY, seed: 0 });
  const t2 = tf.tensor1d([1, 2], "int32");
  const cases: [tf.Tensor, tf.Tensor, RegExp][] = [
    [tf.zeros([2, 8, 8]), t2, /x must be NHWC float32 with 1 channel/],
    [tf.zeros([2, 8, 8, 3]), t2, /got float32 \[2,8,8,3\]/],
    [tf.zeros([2, 8, 8, 1], "int32"), t2, /x must be NHWC float32/],
    [tf.zeros([2, 8, 12, 1]), t2, /square .* \(got 8x12/],
    [tf.zeros([2, 6, 6, 1]), t2, /divisible by 4 \(got 6x6/],
    [
      tf.zeros([2, 8, 8, 1]),
      tf.tensor1d([1, 2]),
      /t must be int32 .*got float32 \[2\]/,
    ],
    [
      tf.zeros([2, 8, 8, 1]),
      tf.tensor1d([1], "int32"),
      /expected int32 \[2\]\)$/,
    ],
  ];
  for (const [x, t, re] of cases) {
    leakCheck(() =>
      assert.throws(
        () => unet.predict(x as tf.Tensor4D, t as tf.Tensor1D),
        (e) =>
          e instanceof TypeError && re.test(e.message) &&
          !e.message.includes("\n"),
      )
    );
  }
  tf.dispose(cases.flatMap(([x, t]) => [x, t]));
  unet.dispose();
  const x = tf.zeros([2, 8, 8, 1]) as tf.Tensor4D;
  assert.throws(() => unet.predict(x, t2), /UNet was disposed/);
  tf.dispose([x, t2]);
});

Deno.test("UNet.fromParams and apply reject missing, extra and mis-laid-out weights", () => {
  const unet = new UNet({ ...TINY, seed: 0 });
  const x = tf.zeros([1, 8, 8, 1]) as tf.Tensor4D;
  const t = tf.tensor1d([1], "int32");
  const missing = new Map<string, tf.Tensor>(unet.params);
  missing.delete("mid1.skip.bias");
  assert.throws(
    () => UNet.fromParams(TINY, missing),
    /parameter mid1.skip.bias is missing/,
  );
  assert.throws(() => unet.apply(missing, x, t), TypeError);
  const extra = new Map<string, tf.Tensor>(unet.params);
  const z = tf.zeros([8]);
  extra.set("mid2.skip.bias", z);
  assert.throws(
    () => UNet.fromParams(TINY, extra),
    /unknown parameters \(got mid2.skip.bias/,
  );
  // PyTorch layout where TF layout is due.
  const torchLayout = new Map<string, tf.Tensor>(unet.params);
  const oihw = tf.zeros([8, 1, 3, 3]);
  torchLayout.set("in_conv.weight", oihw);
  assert.throws(
    () => UNet.fromParams(TINY, torchLayout),
    /in_conv.weight has the wrong shape .*got float32 \[8,1,3,3\], expected float32 \[3,3,1,8\]/,
  );
  // Nothing was disposed on error.
  assert.ok(!oihw.isDisposed && !z.isDisposed);
  assert.ok([...unet.params.values()].every((v) => !v.isDisposed));
  tf.dispose([x, t, z, oihw]);
  unet.dispose();
});

// ---------------------------------------------------------------- gradients

/** The loss mean((eps_theta(x, t) - target)^2) of a tiny UNet, and its inputs. */
function lossSetup() {
  const x = tf.tensor4d(randoms(2 * 8 * 8, 31), [2, 8, 8, 1]);
  const target = tf.tensor4d(randoms(2 * 8 * 8, 32), [2, 8, 8, 1]);
  const t = tf.tensor1d([17, 640], "int32");
  return { x, target, t };
}

function lossOf(
  unet: UNet,
  params: ReadonlyMap<string, tf.Tensor>,
  s: ReturnType<typeof lossSetup>,
): tf.Scalar {
  return tf.tidy(() =>
    tf.mean(tf.square(tf.sub(unet.apply(params, s.x, s.t), s.target)))
  );
}

/** Gradients of the loss with respect to every parameter, read back. */
function gradients(unet: UNet): Map<string, Float32Array> {
  const s = lossSetup();
  const keys = [...unet.params.keys()];
  const g = tf.grads((...ps: tf.Tensor[]) =>
    lossOf(unet, new Map(keys.map((k, i) => [k, ps[i]])), s)
  );
  const grads = g(keys.map((k) => unet.params.get(k)!));
  const out = new Map(
    keys.map((k, i) => [k, grads[i].dataSync() as Float32Array]),
  );
  tf.dispose([...grads, s.x, s.t, s.target]);
  return out;
}

Deno.test("UNet loss gradients agree with a finite difference on cpu", () => {
  const unet = new UNet({ ...SMALL, seed: 4 });
  const grads = gradients(unet);
  for (const [k, g] of grads) {
    assert.ok(g.every(Number.isFinite), k);
    assert.ok(g.some((a) => a !== 0), `${k} has a zero gradient`);
  }
  // Directional derivative along a random direction d: (L(p + h d) - L(p - h d)) / 2h = <grad, d>.
  const s = lossSetup();
  const keys = [...unet.params.keys()];
  const dirs = new Map(
    keys.map((k, i) => [k, randoms(unet.params.get(k)!.size, 500 + i)]),
  );
  const h = 1e-3;
  const shifted = (sign: number) =>
    tf.tidy(() => {
      const p = new Map(keys.map((k) => {
        const v = unet.params.get(k)!;
        return [
          k,
          tf.add(v, tf.mul(tf.tensor(dirs.get(k)!, v.shape), sign * h)),
        ];
      }));
      return lossOf(unet, p, s).dataSync()[0];
    });
  // Central differences: truncation error O(h^2), float32 rounding of the
  // loss (about 1e-7) divided by h.
  const fd = (shifted(1) - shifted(-1)) / (2 * h);
  let dot = 0;
  for (const k of keys) {
    const g = grads.get(k)!;
    const d = dirs.get(k)!;
    for (let i = 0; i < g.length; i++) dot += g[i] * d[i];
  }
  assert.ok(
    Math.abs(fd - dot) < 0.02 * Math.abs(dot),
    `finite difference ${fd} vs gradient ${dot}`,
  );
  tf.dispose([s.x, s.t, s.target]);
  unet.dispose();
});

Deno.test("UNet loss gradients on wasm run and match the cpu backend", async () => {
  await initBackend("cpu");
  const cpu = new UNet({ ...SMALL, seed: 9 });
  const weights = new Map(
    [...cpu.params].map((
      [k, v],
    ) => [k, { data: v.dataSync(), shape: v.shape }]),
  );
  const want = gradients(cpu);
  cpu.dispose();

  assert.equal((await initBackend("wasm")).backend, "wasm");
  const unet = UNet.fromParams(
    SMALL,
    new Map([...weights].map(([k, w]) => [k, tf.tensor(w.data, w.shape)])),
  );
  const before = tf.memory().numTensors;
  const got = gradients(unet);
  assert.equal(tf.memory().numTensors, before);
  for (const [k, g] of want) {
    const err = relErr(got.get(k)!, g);
    assert.ok(err < 1e-3, `${k}: relative error ${err}`);
  }
  // The trainer's path: variableGrads over the UNet's own variables.
  const s = lossSetup();
  const { value, grads } = tf.variableGrads(() =>
    tf.mean(tf.square(tf.sub(unet.predict(s.x, s.t), s.target)))
  );
  const byName = new Map(
    [...unet.params].map(([k, v]) => [k, grads[v.name]]),
  );
  assert.ok([...byName.values()].every((g) => g !== undefined));
  assert.ok(
    relErr(
      byName.get("in_conv.weight")!.dataSync(),
      want.get("in_conv.weight")!,
    ) < 1e-3,
  );
  tf.dispose([value, ...Object.values(grads), s.x, s.t, s.target]);
  unet.dispose();
  await initBackend("cpu");
});
