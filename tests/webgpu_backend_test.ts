/**
 * The host-side shortcuts of core/_webgpu_backend.ts against tfjs's own
 * code: the uniform layout must be byte for byte what tfjs's
 * `makeUniforms` writes (run here on stand-ins for the queue and the
 * buffer pool, no GPU needed), and uniform buffers kept per content must
 * never serve stale values (a whole training step is compared with the
 * cpu backend in tests/webgpu_test.ts).
 */
import assert from "node:assert/strict";
import { WebGPUBackend } from "@tensorflow/tfjs-backend-webgpu";
import {
  setUniformCacheSize,
  uniformBytes,
  type UniformData,
} from "../core/_webgpu_backend.ts";
import { initBackend, tf } from "../core/backend.ts";

/** The bytes tfjs's own makeUniforms writes for `uniforms`. */
function tfjsUniformBytes(uniforms: UniformData): Uint8Array {
  let written: Uint8Array | null = null;
  const stand = {
    bufferManager: {
      acquireBuffer: (size: number) => ({ size }),
    },
    queue: {
      writeBuffer: (
        _b: unknown,
        _o: number,
        data: ArrayBuffer,
        offset: number,
        size: number,
      ) => {
        written = new Uint8Array(data, offset, size).slice();
      },
    },
    uniformPendingDisposal: [] as unknown[],
  };
  const make = (WebGPUBackend.prototype as unknown as {
    makeUniforms: (this: unknown, u: UniformData) => unknown;
  }).makeUniforms;
  make.call(stand, structuredClone(uniforms));
  return written!;
}

const f = (...data: number[]) => ({ type: "float32", data });
const i = (...data: number[]) => ({ type: "int32", data });
const u = (...data: number[]) => ({ type: "uint32", data });

Deno.test("uniform layout equals tfjs's makeUniforms, byte for byte", () => {
  const cases: UniformData[] = [
    [f(NaN), f(Infinity), i(2, 3, 4, 5), i(60, 20, 5)],
    [f(NaN), f(Infinity), i(7), i(1, 2), i(3, 4, 5)],
    [i(1, 2, 3, 4, 5), i(9), f(0.5)],
    [i(1, 2, 3, 4, 5, 6), i(1, 2), f(-1.25, 3)],
    [u(4294967295), f(1e-8), i(-3)],
    [f(1, 2, 3), f(4)],
    [i()],
  ];
  for (const c of cases) {
    const ours = new Uint8Array(uniformBytes(structuredClone(c)));
    assert.deepEqual(ours, tfjsUniformBytes(c), JSON.stringify(c));
  }
});

Deno.test("the uniform cache size must be a positive integer", () => {
  assert.throws(
    () => setUniformCacheSize(0),
    /Cannot set the uniform cache size: not a positive integer \(got 0, expected an integer >= 1\)/,
  );
});

Deno.test("uniform layout rejects values of more than six components", () => {
  assert.throws(
    () => uniformBytes([i(1, 2, 3, 4, 5, 6, 7)]),
    /Cannot lay out uniforms: a value has too many components \(got 7, expected at most 6\)/,
  );
});

Deno.test({
  name: "kept uniform buffers follow changing values on webgpu",
  ignore: (globalThis.navigator as Navigator | undefined)?.gpu === undefined,
  fn: async () => {
    const got = await initBackend("webgpu");
    if (got.backend !== "webgpu") return;
    try {
      // tf.clipByValue's bounds are uniforms: the same program with new
      // values must see the new values, old ones again the old. (4,096
      // elements: above tfjs's size for running small ops on the CPU.)
      const values = Array.from({ length: 4096 }, (_, k) => (k % 9) - 4);
      const x = tf.tensor1d(values);
      const bounds = [[-1, 1], [0, 0.25], [-1, 1], [-3, -1]];
      // Then more distinct bounds than a shrunken cache holds, twice over,
      // so that buffers are handed back and reused for other contents.
      for (let k = 1; k <= 12; k++) bounds.push([-k / 4, k / 3]);
      for (let k = 1; k <= 12; k++) bounds.push([-k / 4, k / 3]);
      const previous = setUniformCacheSize(5);
      try {
        // All dispatched before any is read: a buffer handed back too early
        // would be rewritten before an earlier dispatch ran.
        const ys = bounds.map(([lo, hi]) => tf.clipByValue(x, lo, hi));
        for (const [k, [lo, hi]] of bounds.entries()) {
          const want = values.map((v) =>
            Math.fround(Math.min(hi, Math.max(lo, v)))
          );
          assert.deepEqual(
            [...await ys[k].data()],
            want,
            `bounds ${lo}, ${hi}`,
          );
        }
        tf.dispose(ys);
      } finally {
        setUniformCacheSize(previous);
      }
      x.dispose();
    } finally {
      await initBackend("cpu");
    }
  },
});

Deno.test({
  name: "tf.addN on webgpu adds every input, past the storage-buffer limit too",
  ignore: (globalThis.navigator as Navigator | undefined)?.gpu === undefined,
  fn: async () => {
    const got = await initBackend("webgpu");
    if (got.backend !== "webgpu") return;
    try {
      // tfjs's own kernel returned the sum of the first 7 of 86 inputs.
      for (const n of [2, 7, 8, 40, 86, 300]) {
        const xs = Array.from(
          { length: n },
          (_, i) => tf.fill([4096], i + 1),
        );
        const sum = tf.addN(xs);
        const values = await sum.data();
        assert.ok(
          values.every((v) => v === n * (n + 1) / 2),
          `${n} inputs: got ${values[0]}, expected ${n * (n + 1) / 2}`,
        );
        tf.dispose([sum, ...xs]);
      }
    } finally {
      await initBackend("cpu");
    }
  },
});
