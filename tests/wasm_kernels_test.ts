import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { conv2d } from "../core/_conv.ts";
import { assembleKernels, BIN_PATH, binSource } from "./tools/wasm_kernels.ts";

Deno.test("the committed wasm kernels are the ones tests/tools/wasm_kernels.ts assembles from its text", async () => {
  const { plain, shared } = await assembleKernels();
  const committed = await Deno.readTextFile(BIN_PATH);
  assert.equal(
    committed,
    binSource(plain, shared),
    "stale: run deno run -A tests/tools/wasm_kernels.ts",
  );
});

/** Which kernels a conv's weight gradient ran, and the gradient. */
async function weightGrad(
  x: tf.Tensor4D,
  w: tf.Tensor4D,
  stride: number,
): Promise<{ names: string[]; dw: Float32Array }> {
  const info = await tf.profile(() =>
    tf.grad((v) => tf.sum(conv2d(x, v as tf.Tensor4D, stride, 1)))(w)
  );
  const result = info.result as tf.Tensor;
  const dw = await result.data() as Float32Array;
  result.dispose();
  return { names: info.kernelNames, dw };
}

Deno.test("on wasm, stride-1 conv weight gradients with Cout a multiple of 8 run ddpm's kernel, others tfjs's way", async () => {
  await initBackend("wasm");
  const x = tf.randomNormal([2, 6, 6, 5], 0, 1, "float32", 1) as tf.Tensor4D;
  const before = tf.memory().numTensors;
  for (
    const [cout, stride, ours] of [
      [8, 1, true],
      [24, 1, true],
      [12, 1, false],
      [8, 2, false],
    ] as const
  ) {
    const w = tf.randomNormal(
      [3, 3, 5, cout],
      0,
      1,
      "float32",
      2,
    ) as tf.Tensor4D;
    const { names, dw } = await weightGrad(x, w, stride);
    assert.equal(
      names.includes("DdpmFilterGrad"),
      ours,
      `Cout ${cout}, stride ${stride}: ${names.join(" ")}`,
    );
    // d sum(y) / dW[i, j, c, o] is the sum of x[c] over the pixels tap
    // (i, j) reaches, the same for every o: the centre tap at stride 1
    // reaches every pixel.
    if (stride === 1) {
      const xs = await x.data();
      let want = 0;
      for (let p = 0; p < 2 * 36; p++) want += xs[p * 5 + 3];
      const got = dw[(4 * 5 + 3) * cout + cout - 1];
      assert.ok(Math.abs(got - want) < 1e-4, `${got} vs ${want}`);
    }
    w.dispose();
  }
  assert.equal(tf.memory().numTensors, before);
  x.dispose();
  await initBackend("cpu");
});
