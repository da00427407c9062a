import assert from "node:assert/strict";
import { initBackend, tf } from "../mod.ts";

Deno.test("initBackend gives the cpu and wasm backends on request", async () => {
  for (const name of ["cpu", "wasm"] as const) {
    const got = await initBackend(name);
    assert.equal(got.backend, name);
    assert.equal(tf.getBackend(), name);
    assert.equal(got.fellBack, false);
    const y = tf.matMul(tf.tensor2d([[1, 2]]), tf.tensor2d([[3], [4]]));
    assert.deepEqual(Array.from(await y.data()), [11]);
    y.dispose();
  }
});

Deno.test("auto takes webgpu only on a hardware adapter, wasm otherwise, and says why", async () => {
  const got = await initBackend("auto");
  const adapter = await navigator.gpu?.requestAdapter();
  const software = adapter == null ||
    (adapter.info as { isFallbackAdapter?: boolean }).isFallbackAdapter ===
      true ||
    /llvmpipe|lavapipe|swiftshader/i.test(adapter.info.description);
  assert.equal(got.backend, software ? "wasm" : "webgpu");
  assert.match(
    got.reason,
    software ? /software fallback|no WebGPU adapter/ : /hardware/,
  );
  assert.equal(got.softwareAdapter, adapter != null && software);
});

Deno.test("webgpu on request runs a convolution (software adapter here)", async () => {
  const got = await initBackend("webgpu");
  if (got.backend !== "webgpu") {
    assert.equal(got.fellBack, true);
    return;
  }
  const y = tf.conv2d(
    tf.ones([1, 4, 4, 2]) as tf.Tensor4D,
    tf.ones([3, 3, 2, 1]) as tf.Tensor4D,
    1,
    "same",
  );
  const d = await y.data();
  assert.equal(d[5], 18); // interior pixel: 3 * 3 * 2 ones
  assert.equal(d[0], 8); // corner: 2 * 2 * 2 ones
  y.dispose();
  await initBackend("cpu");
});

Deno.test("initBackend rejects an unknown name in one line", async () => {
  await assert.rejects(
    () => initBackend("cuda" as never),
    /unknown name \(got "cuda", expected auto, webgpu, wasm or cpu\)/,
  );
});
