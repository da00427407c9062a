import assert from "node:assert/strict";
import { encodeNpy } from "../core/image.ts";

/** The header bytes, spelled out from the NPY format 1.0 specification. */
function header(dict: string): Uint8Array {
  const pad = 64 - (10 + dict.length + 1) % 64;
  const text = dict + " ".repeat(pad % 64) + "\n";
  return new Uint8Array([
    0x93,
    ..."NUMPY".split("").map((c) => c.charCodeAt(0)),
    1,
    0,
    text.length & 0xff,
    text.length >> 8,
    ...text.split("").map((c) => c.charCodeAt(0)),
  ]);
}

Deno.test("encodeNpy writes the v1.0 preamble, a 64-aligned header and little-endian float32", () => {
  const npy = encodeNpy(new Float32Array([1, -2, 0.5, 3, 4, 5]), [1, 2, 3, 1]);
  const want = header(
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3, 1), }",
  );
  assert.deepEqual(npy.subarray(0, want.length), want);
  assert.equal(want.length % 64, 0);
  // 1.0 is 0x3f800000, -2.0 is 0xc0000000: little-endian bytes.
  assert.deepEqual([...npy.subarray(want.length, want.length + 8)], [
    0,
    0,
    0x80,
    0x3f,
    0,
    0,
    0,
    0xc0,
  ]);
  assert.equal(npy.length, want.length + 6 * 4);
});

Deno.test("encodeNpy writes a 1-d shape as a one-tuple and rejects a shape that does not match", () => {
  const npy = encodeNpy(new Float32Array(3), [3]);
  const text = new TextDecoder().decode(npy.subarray(10, 10 + npy[8]));
  assert.match(text, /'shape': \(3,\), }/);
  assert.throws(() => encodeNpy(new Float32Array(5), [2, 3]), TypeError);
});

Deno.test("numpy loads what encodeNpy writes (when python3 with numpy is installed)", async (t) => {
  const check = await new Deno.Command("python3", {
    args: ["-c", "import numpy"],
    stdout: "null",
    stderr: "null",
  }).output().catch(() => null);
  if (check === null || !check.success) {
    await t.step({ name: "numpy missing: skipped", ignore: true, fn() {} });
    return;
  }
  const dir = await Deno.makeTempDir();
  const values = Float32Array.from({ length: 24 }, (_, i) => i / 7 - 1);
  await Deno.writeFile(`${dir}/a.npy`, encodeNpy(values, [2, 3, 4, 1]));
  const out = await new Deno.Command("python3", {
    args: [
      "-c",
      "import sys, numpy; a = numpy.load(sys.argv[1]); print(a.dtype, a.shape, repr(float(a[1, 2, 3, 0])))",
      `${dir}/a.npy`,
    ],
  }).output();
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  // a[1, 2, 3, 0] is element 1*12 + 2*4 + 3 = 23 in C order.
  assert.equal(
    new TextDecoder().decode(out.stdout).trim(),
    `float32 (2, 3, 4, 1) ${Math.fround(23 / 7 - 1)}`,
  );
  await Deno.remove(dir, { recursive: true });
});
