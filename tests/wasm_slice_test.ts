import assert from "node:assert/strict";
import { initBackend, tf } from "../core/backend.ts";
import { sliceKernel } from "../core/_wasm_slice.ts";
import { mulberry32 } from "../core/_random.ts";

/** x[begin : begin + size] of a row-major array, by the definition. */
function naiveSlice(
  values: ArrayLike<number>,
  shape: number[],
  begin: number[],
  size: number[],
): number[] {
  const out: number[] = [];
  const idx = new Array<number>(shape.length).fill(0);
  const total = size.reduce((a, b) => a * b, 1);
  for (let n = 0; n < total; n++) {
    let flat = 0;
    for (let d = 0; d < shape.length; d++) {
      flat = flat * shape[d] + begin[d] + idx[d];
    }
    out.push(values[flat]);
    for (let d = shape.length - 1; d >= 0; d--) {
      if (++idx[d] < size[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

Deno.test("ddpm's wasm Slice is the one registered, and slices like the definition: 400 random cases, ranks 1-5, float32, int32 and bool", async () => {
  await initBackend("wasm");
  assert.equal(tf.getKernel("Slice", "wasm")?.kernelFunc, sliceKernel);
  const rand = mulberry32(7);
  const int = (n: number) => Math.floor(rand() * n);
  const before = tf.memory().numTensors;
  for (let c = 0; c < 400; c++) {
    const rank = 1 + int(5);
    const shape = Array.from({ length: rank }, () => 1 + int(5));
    const begin = shape.map((s) => int(s));
    // Extents: to the end (-1), zero, or anything that fits.
    const size = shape.map((s, d) => {
      const r = rand();
      if (r < 0.15) return -1;
      if (r < 0.2) return 0;
      if (r < 0.45) return s - begin[d];
      return int(s - begin[d] + 1);
    });
    const dtype = (["float32", "int32", "bool"] as const)[c % 3];
    const count = shape.reduce((a, b) => a * b, 1);
    const values = Array.from(
      { length: count },
      (_, i) => dtype === "bool" ? (i * 7) % 3 === 0 ? 1 : 0 : i * 3 - 50,
    );
    const x = tf.tensor(values, shape, dtype);
    const y = tf.slice(x, begin, size);
    const full = size.map((s, d) => s === -1 ? shape[d] - begin[d] : s);
    const what = `[${shape}] ${dtype} begin [${begin}] size [${size}]`;
    assert.deepEqual(y.shape, full, what);
    assert.deepEqual(
      Array.from(await y.data(), Number),
      naiveSlice(values, shape, begin, full),
      what,
    );
    tf.dispose([x, y]);
  }
  assert.equal(tf.memory().numTensors, before);
  await initBackend("cpu");
});

Deno.test("on wasm, split and unstack (ddpm's SplitV and Unpack) give the definition's parts on every axis", async () => {
  await initBackend("wasm");
  const shape = [3, 4, 2, 6];
  const values = Array.from({ length: 144 }, (_, i) => i - 70);
  const x = tf.tensor(values, shape);
  for (let axis = -1; axis < 4; axis++) {
    const a = axis < 0 ? axis + 4 : axis;
    const splits: (number | number[])[] = shape[a] % 2 === 0
      ? [2, [1, shape[a] - 1]]
      : [[1, shape[a] - 1]];
    for (const s of splits) {
      const parts = tf.split(x, s, axis);
      const sizes = typeof s === "number"
        ? new Array<number>(s).fill(shape[a] / s)
        : s;
      let start = 0;
      for (const [i, part] of parts.entries()) {
        const begin = [0, 0, 0, 0];
        begin[a] = start;
        const size = [...shape];
        size[a] = sizes[i];
        assert.deepEqual(
          Array.from(await part.data()),
          naiveSlice(values, shape, begin, size),
          `split ${JSON.stringify(s)} on axis ${axis}, part ${i}`,
        );
        start += sizes[i];
      }
      tf.dispose(parts);
    }
    const rows = tf.unstack(x, axis);
    assert.equal(rows.length, shape[a]);
    for (const [i, row] of rows.entries()) {
      const begin = [0, 0, 0, 0];
      begin[a] = i;
      const size = [...shape];
      size[a] = 1;
      assert.deepEqual(row.shape, shape.filter((_, d) => d !== a));
      assert.deepEqual(
        Array.from(await row.data()),
        naiveSlice(values, shape, begin, size),
        `unstack on axis ${axis}, row ${i}`,
      );
    }
    tf.dispose(rows);
  }
  // Strings go to tfjs's own kernel.
  const words = tf.tensor(["a", "b", "c", "d"], [2, 2], "string");
  const cut = tf.slice(words, [1, 0], [1, 2]);
  assert.deepEqual(await cut.data(), ["c", "d"]);
  tf.dispose([x, words, cut]);
  await initBackend("cpu");
});
