import assert from "node:assert/strict";
import { join } from "node:path";
import { initBackend, tf } from "../core/backend.ts";
import {
  type CheckpointState,
  encodeCheckpoint,
  loadCheckpoint,
  loadUNet,
  saveCheckpoint,
  toTfLayout,
  toTorchLayout,
} from "../core/checkpoint.ts";
import {
  decodeSafetensors,
  encodeSafetensors,
  SafetensorsError,
  type SafetensorsInput,
} from "../core/safetensors.ts";
import { UNet } from "../core/unet.ts";

await initBackend("cpu");

const FIXTURES = new URL("./fixtures/", import.meta.url);

interface Fixture {
  /** The state_dict alone (PyTorch layouts), as a plain torch file would hold it. */
  weights: Map<string, SafetensorsInput>;
  metadata: Record<string, string>;
  x: SafetensorsInput;
  t: SafetensorsInput;
  eps: SafetensorsInput;
}

async function readFixture(name: string): Promise<Fixture> {
  const { tensors, metadata } = decodeSafetensors(
    await Deno.readFile(new URL(name, FIXTURES)),
  );
  const weights = new Map<string, SafetensorsInput>();
  for (const [k, v] of tensors) {
    if (!k.startsWith("fixture.")) weights.set(k, v);
  }
  return {
    weights,
    metadata,
    x: tensors.get("fixture.x")!,
    t: tensors.get("fixture.t")!,
    eps: tensors.get("fixture.eps")!,
  };
}

function bits(a: Float32Array | Int32Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "ddpm_ckpt_test_" });
}

async function listDir(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(dir)) names.push(e.name);
  return names.sort();
}

/** Expect loading `bytes` (written to `dir/name`) to fail with a TypeError whose message matches. */
async function rejectsLoad(
  dir: string,
  name: string,
  bytes: Uint8Array,
  fault: RegExp,
): Promise<void> {
  const path = join(dir, name);
  await Deno.writeFile(path, bytes);
  const before = tf.memory().numTensors;
  for (const load of [() => loadCheckpoint(path), () => loadUNet(path)]) {
    await assert.rejects(load, (e: unknown) => {
      assert.ok(e instanceof TypeError, `expected TypeError, got ${e}`);
      assert.ok(e.message.startsWith("Cannot load "), e.message);
      assert.ok(
        e.message.includes(`"${path}"`),
        `names the file: ${e.message}`,
      );
      assert.match(e.message, fault);
      assert.ok(!e.message.includes("\n"));
      return true;
    });
  }
  assert.equal(tf.memory().numTensors, before, "no tensor leaks on failure");
}

for (
  const [file, channels] of [["unet_base8.safetensors", 1], [
    "unet_base8_rgb.safetensors",
    3,
  ]] as const
) {
  Deno.test(`loadUNet reproduces the numpy reference forward (${file}, inChannels ${channels})`, async () => {
    const fx = await readFixture(file);
    const before = tf.memory().numTensors;
    const unet = await loadUNet(encodeSafetensors(fx.weights, fx.metadata));
    assert.deepEqual(unet.config, {
      inChannels: channels,
      base: 8,
      timeDim: 32,
    });
    const x = tf.tensor4d(
      fx.x.data as Float32Array,
      fx.x.shape as [number, number, number, number],
    );
    const t = tf.tensor1d(fx.t.data as Int32Array, "int32");
    const eps = unet.predict(x, t);
    assert.deepEqual(eps.shape, fx.eps.shape);
    const got = await eps.data();
    const err = maxAbsDiff(got, fx.eps.data);
    assert.ok(err < 1e-4, `max |ddpm - numpy| = ${err}`);
    tf.dispose([x, t, eps]);
    unet.dispose();
    assert.equal(tf.memory().numTensors, before);
  });
}

Deno.test("toTfLayout moves each element where TF expects it, and toTorchLayout undoes it bitwise", () => {
  // A transposed-conv weight [in 3, out 2, kh 4, kw 5] with distinct values.
  const shape = [3, 2, 4, 5];
  const data = Float32Array.from({ length: 120 }, (_, i) => i * 1.25 - 17);
  const tfw = toTfLayout({ shape, data });
  assert.deepEqual(tfw.shape, [4, 5, 2, 3]);
  for (let c = 0; c < 3; c++) {
    for (let o = 0; o < 2; o++) {
      for (let u = 0; u < 4; u++) {
        for (let v = 0; v < 5; v++) {
          const torchIndex = ((c * 2 + o) * 4 + u) * 5 + v;
          const tfIndex = ((u * 5 + v) * 2 + o) * 3 + c; // [kh, kw, out, in]
          assert.equal(tfw.data[tfIndex], data[torchIndex]);
        }
      }
    }
  }
  // Against tfjs's own transpose, a second implementation.
  const ref = tf.tidy(() =>
    tf.transpose(tf.tensor(data, shape), [2, 3, 1, 0]).dataSync()
  );
  assert.deepEqual(tfw.data, ref);
  const back = toTorchLayout(tfw);
  assert.deepEqual(back.shape, shape);
  assert.deepEqual(bits(back.data), bits(data));

  // Linear [out 2, in 3] <-> [in 3, out 2]; vectors unchanged.
  const lin = toTfLayout({
    shape: [2, 3],
    data: new Float32Array([1, 2, 3, 4, 5, 6]),
  });
  assert.deepEqual(lin, {
    shape: [3, 2],
    data: new Float32Array([1, 4, 2, 5, 3, 6]),
  });
  assert.deepEqual(
    toTorchLayout(lin).data,
    new Float32Array([1, 2, 3, 4, 5, 6]),
  );
  const vec = new Float32Array([NaN, -0, 3]);
  assert.deepEqual(bits(toTfLayout({ shape: [3], data: vec }).data), bits(vec));
  assert.throws(
    () => toTfLayout({ shape: [2, 2], data: new Float32Array(3) }),
    TypeError,
  );
});

function randomMap(
  unet: UNet,
  seed: number,
): Map<string, tf.Tensor> {
  const out = new Map<string, tf.Tensor>();
  let s = seed;
  for (const [k, p] of unet.params) {
    out.set(k, tf.randomNormal(p.shape, 0, 1, "float32", s++));
  }
  return out;
}

Deno.test("saveCheckpoint -> loadCheckpoint keeps every tensor bitwise, and the file holds PyTorch layouts", async () => {
  const dir = await tempDir();
  const path = join(dir, "ckpt.safetensors");
  const before = tf.memory().numTensors;
  const unet = new UNet({ inChannels: 3, base: 8, timeDim: 16, seed: 3 });
  const ema = randomMap(unet, 100);
  const expAvg = randomMap(unet, 200);
  const expAvgSq = randomMap(unet, 300);
  const training = {
    optimizer: { lr: 2e-4, beta1: 0.9 },
    ema: { decay: 0.9999 },
    seed: 7,
  };
  const state: CheckpointState = {
    config: unet.config,
    params: unet.params,
    ema,
    optimizer: { expAvg, expAvgSq },
    step: 1234,
    training,
  };
  const afterSetup = tf.memory().numTensors;
  await saveCheckpoint(path, state);
  assert.equal(
    tf.memory().numTensors,
    afterSetup,
    "saveCheckpoint leaks nothing",
  );
  assert.deepEqual(
    await listDir(dir),
    ["ckpt.safetensors"],
    "no temporary file left",
  );

  // The raw file: PyTorch layouts, prefixes, metadata.
  const raw = decodeSafetensors(await Deno.readFile(path));
  assert.deepEqual(raw.metadata, {
    format: "ddpm",
    config: JSON.stringify({ inChannels: 3, base: 8, timeDim: 16 }),
    step: "1234",
    training: JSON.stringify(training),
  });
  assert.equal(raw.tensors.size, 4 * unet.params.size);
  const w = raw.tensors.get("down2.conv1.weight")!; // OIHW [16, 8, 3, 3]
  assert.deepEqual(w.shape, [16, 8, 3, 3]);
  const live = unet.params.get("down2.conv1.weight")!
    .arraySync() as number[][][][]; // HWIO
  for (
    const [o, i, h, ww] of [[0, 0, 0, 0], [15, 7, 2, 1], [3, 5, 1, 2], [
      9,
      2,
      2,
      0,
    ]]
  ) {
    assert.equal(w.data[((o * 8 + i) * 3 + h) * 3 + ww], live[h][ww][i][o]);
  }
  const lin = raw.tensors.get("ema.time.mlp.2.weight")!; // [out, in]
  const linTf = ema.get("time.mlp.2.weight")!.arraySync() as number[][]; // [in, out]
  assert.equal(lin.data[3 * 16 + 5], linTf[5][3]);
  assert.deepEqual(raw.tensors.get("optim.exp_avg_sq.us1.weight")!.shape, [
    16,
    8,
    4,
    4,
  ]);

  const ckpt = await loadCheckpoint(new URL(`file://${path}`));
  assert.deepEqual(ckpt.config, { inChannels: 3, base: 8, timeDim: 16 });
  assert.equal(ckpt.step, 1234);
  assert.deepEqual(ckpt.training, training);
  const pairs: [
    ReadonlyMap<string, tf.Tensor>,
    ReadonlyMap<string, tf.Tensor> | undefined,
  ][] = [
    [unet.params, ckpt.params],
    [ema, ckpt.ema ?? undefined],
    [expAvg, ckpt.optimizer?.expAvg],
    [expAvgSq, ckpt.optimizer?.expAvgSq],
  ];
  for (const [want, got] of pairs) {
    assert.ok(got !== undefined);
    assert.deepEqual([...got.keys()].sort(), [...want.keys()].sort());
    for (const [k, t] of want) {
      const g: tf.Tensor = got.get(k)!;
      assert.deepEqual(g.shape, t.shape, k);
      assert.deepEqual(
        bits(g.dataSync() as Float32Array),
        bits(t.dataSync() as Float32Array),
        k,
      );
    }
  }
  ckpt.dispose();
  tf.dispose([...ema.values(), ...expAvg.values(), ...expAvgSq.values()]);
  unet.dispose();
  assert.equal(tf.memory().numTensors, before);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("a plain state_dict (torch save_file, no metadata) loads, live weights only", async () => {
  const fx = await readFixture("unet_base8.safetensors");
  const before = tf.memory().numTensors;
  const bytes = encodeSafetensors(fx.weights); // no __metadata__ at all
  const ckpt = await loadCheckpoint(bytes);
  assert.deepEqual(ckpt.config, { inChannels: 1, base: 8, timeDim: 32 });
  assert.equal(ckpt.ema, null);
  assert.equal(ckpt.optimizer, null);
  assert.equal(ckpt.step, 0);
  assert.equal(ckpt.training, null);
  assert.deepEqual(ckpt.metadata, {});
  assert.equal(ckpt.params.size, fx.weights.size);
  const torchW = fx.weights.get("time.mlp.0.weight")!; // [out, in]
  const tfW = ckpt.params.get("time.mlp.0.weight")!.arraySync() as number[][];
  assert.equal(tfW[7][2], torchW.data[2 * 32 + 7]);
  ckpt.dispose();
  const unet = await loadUNet(bytes);
  assert.deepEqual(unet.config, { inChannels: 1, base: 8, timeDim: 32 });
  unet.dispose();
  assert.equal(tf.memory().numTensors, before);
});

Deno.test("loadUNet prefers EMA weights, and takes live ones when told", async () => {
  const before = tf.memory().numTensors;
  const a = new UNet({ base: 8, timeDim: 16, seed: 1 });
  const b = new UNet({ base: 8, timeDim: 16, seed: 2 });
  const withEma = await encodeCheckpoint({
    config: a.config,
    params: a.params,
    ema: b.params,
  });
  const liveOnly = await encodeCheckpoint({
    config: a.config,
    params: a.params,
  });
  const x = tf.randomNormal([1, 32, 32, 1], 0, 1, "float32", 5) as tf.Tensor4D;
  const t = tf.tensor1d([500], "int32");
  const outA = tf.tidy(() => a.predict(x, t).dataSync() as Float32Array);
  const outB = tf.tidy(() => b.predict(x, t).dataSync() as Float32Array);
  assert.ok(maxAbsDiff(outA, outB) > 1e-3, "the two UNets differ");
  const check = async (
    bytes: Uint8Array,
    weights: "ema" | "live" | undefined,
    want: Float32Array,
  ) => {
    const u = await loadUNet(bytes, weights ? { weights } : {});
    const out = tf.tidy(() => u.predict(x, t).dataSync() as Float32Array);
    assert.deepEqual(bits(out), bits(want), `weights ${weights}`);
    u.dispose();
  };
  await check(withEma, undefined, outB);
  await check(withEma, "ema", outB);
  await check(withEma, "live", outA);
  await check(liveOnly, undefined, outA);
  await assert.rejects(
    () => loadUNet(liveOnly, { weights: "ema" }),
    /^TypeError: Cannot load UNet from "<bytes>": no EMA weights in the file/,
  );
  await assert.rejects(
    // deno-lint-ignore no-explicit-any
    () => loadUNet(liveOnly, { weights: "best" as any }),
    RangeError,
  );
  tf.dispose([x, t]);
  a.dispose();
  b.dispose();
  assert.equal(tf.memory().numTensors, before);
});

Deno.test("loading rejects a missing, unexpected or mis-shaped key, naming the file and the key", async () => {
  const dir = await tempDir();
  const fx = await readFixture("unet_base8.safetensors");
  const edit = (
    f: (m: Map<string, SafetensorsInput>) => void,
    meta = fx.metadata,
  ) => {
    const m = new Map(fx.weights);
    f(m);
    return encodeSafetensors(m, meta);
  };
  await rejectsLoad(
    dir,
    "missing.safetensors",
    edit((m) => m.delete("down2.skip.bias")),
    /missing key "down2\.skip\.bias" \(got none, expected shape \[16\]\)/,
  );
  await rejectsLoad(
    dir,
    "extra.safetensors",
    edit((m) =>
      m.set("down1.norm3.weight", { shape: [8], data: new Float32Array(8) })
    ),
    /unexpected key "down1\.norm3\.weight" \(got shape \[8\]/,
  );
  await rejectsLoad(
    dir,
    "shape.safetensors",
    edit((m) =>
      m.set("down1.conv1.weight", {
        shape: [8, 8, 1, 9],
        data: new Float32Array(576),
      })
    ),
    /key "down1\.conv1\.weight" has the wrong shape \(got \[8, 8, 1, 9\], expected \[8, 8, 3, 3\]\)/,
  );
  await rejectsLoad(
    dir,
    "transposed.safetensors",
    // A TF-layout transposed conv saved by mistake: [kh, kw, out, in].
    edit((m) =>
      m.set("us2.weight", {
        shape: [4, 4, 16, 32],
        data: new Float32Array(8192),
      })
    ),
    /key "us2\.weight" has the wrong shape \(got \[4, 4, 16, 32\], expected \[32, 16, 4, 4\]\)/,
  );
  await rejectsLoad(
    dir,
    "noinconv.safetensors",
    edit((m) => m.delete("in_conv.weight")),
    /missing key "in_conv\.weight"/,
  );
  await rejectsLoad(
    dir,
    "int.safetensors",
    edit((m) => m.set("in_conv.bias", { shape: [8], data: new Int32Array(8) })),
    /key "in_conv\.bias" is not a float tensor \(got I32/,
  );
  await rejectsLoad(
    dir,
    "config.safetensors",
    edit(() => {}, {
      format: "ddpm",
      config: JSON.stringify({ inChannels: 1, base: 16, timeDim: 32 }),
    }),
    /metadata "config" disagrees with the weights' shapes/,
  );
  const ema = new Map<string, SafetensorsInput>();
  for (const [k, v] of fx.weights) {
    if (k !== "mid2.conv2.bias") ema.set(`ema.${k}`, v);
  }
  await rejectsLoad(
    dir,
    "ema.safetensors",
    edit((m) => ema.forEach((v, k) => m.set(k, v))),
    /missing key "ema\.mid2\.conv2\.bias" \(got none, expected shape \[32\]\)/,
  );
  // A malformed safetensors file is a SafetensorsError naming the file.
  const bad = join(dir, "truncated.safetensors");
  await Deno.writeFile(
    bad,
    (await Deno.readFile(new URL("unet_base8.safetensors", FIXTURES))).subarray(
      0,
      100,
    ),
  );
  await assert.rejects(() => loadUNet(bad), (e: unknown) => {
    assert.ok(e instanceof SafetensorsError);
    assert.ok(e.message.includes(`"${bad}"`), e.message);
    return true;
  });
  await Deno.remove(dir, { recursive: true });
});

Deno.test("saveCheckpoint into a missing directory fails cleanly and leaves nothing behind", async () => {
  const dir = await tempDir();
  const unet = new UNet({ base: 8, timeDim: 16, seed: 0 });
  const before = tf.memory().numTensors;
  await assert.rejects(
    () =>
      saveCheckpoint(join(dir, "no_such_dir", "ckpt.safetensors"), {
        config: unet.config,
        params: unet.params,
      }),
    Deno.errors.NotFound,
  );
  assert.deepEqual(await listDir(dir), []);
  // The target is a directory: the rename fails and the temporary file is removed.
  await Deno.mkdir(join(dir, "taken.safetensors"));
  await assert.rejects(() =>
    saveCheckpoint(join(dir, "taken.safetensors"), {
      config: unet.config,
      params: unet.params,
    })
  );
  assert.deepEqual(await listDir(dir), ["taken.safetensors"]);
  // An invalid state is rejected before anything is written, and an old file survives.
  const path = join(dir, "ckpt.safetensors");
  await saveCheckpoint(path, {
    config: unet.config,
    params: unet.params,
    step: 1,
  });
  const old = await Deno.readFile(path);
  const partial = new Map(unet.params);
  partial.delete("out_conv.bias");
  await assert.rejects(
    () =>
      saveCheckpoint(path, { config: unet.config, params: partial, step: 2 }),
    /^TypeError: Cannot save checkpoint: params has no "out_conv\.bias" \(got none, expected shape \[1\]\)/,
  );
  const ema = new Map(unet.params);
  ema.set("extra", unet.params.get("out_conv.bias")!);
  await assert.rejects(
    () =>
      saveCheckpoint(path, { config: unet.config, params: unet.params, ema }),
    /^TypeError: Cannot save checkpoint: ema has an unexpected key "extra"/,
  );
  assert.deepEqual(await Deno.readFile(path), old);
  assert.deepEqual(await listDir(dir), [
    "ckpt.safetensors",
    "taken.safetensors",
  ]);
  assert.equal(tf.memory().numTensors, before);
  unet.dispose();
  await Deno.remove(dir, { recursive: true });
});

Deno.test("loadUNet reads from an http URL, and reports an HTTP error status", async () => {
  const fx = await readFixture("unet_base8.safetensors");
  const bytes = encodeSafetensors(fx.weights, fx.metadata);
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    (req) =>
      new URL(req.url).pathname === "/unet.safetensors"
        ? new Response(bytes)
        : new Response("no", { status: 404, statusText: "Not Found" }),
  );
  const root = `http://127.0.0.1:${server.addr.port}`;
  try {
    const before = tf.memory().numTensors;
    const unet = await loadUNet(new URL(`${root}/unet.safetensors`));
    assert.deepEqual(unet.config, { inChannels: 1, base: 8, timeDim: 32 });
    unet.dispose();
    await assert.rejects(
      () => loadUNet(new URL(`${root}/missing.safetensors`)),
      (e: unknown) => {
        assert.ok(e instanceof Error);
        assert.equal(
          e.message,
          `Cannot load checkpoint "${root}/missing.safetensors": HTTP 404 Not Found (expected 200)`,
        );
        return true;
      },
    );
    assert.equal(tf.memory().numTensors, before);
  } finally {
    await server.shutdown();
  }
});
