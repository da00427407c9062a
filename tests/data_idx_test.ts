import assert from "node:assert/strict";
import { join } from "node:path";
import {
  decodeIdx,
  gunzip,
  IdxFormatError,
  parseIdx,
  readIdxFile,
} from "../data/idx.ts";
import { imageDatasetFromIdx } from "../data/dataset.ts";
import { loadIdxDir } from "../data/idx_dir.ts";
import { gzip, idx } from "./_util.ts";

function rejects(
  fn: () => unknown,
  offset: number,
  pattern: RegExp,
  file = "x.idx",
): void {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof IdxFormatError, `not an IdxFormatError: ${e}`);
    assert.ok(e instanceof SyntaxError);
    assert.equal(e.offset, offset, e.message);
    assert.equal(e.file, file);
    assert.match(e.message, pattern);
    assert.ok(e.message.includes(file), e.message);
    assert.ok(e.message.includes(`at byte ${offset}`), e.message);
    assert.ok(!e.message.includes("\n"));
    return;
  }
  assert.fail("did not throw");
}

Deno.test("parseIdx reads every IDX type, big-endian, with hand-decoded values", () => {
  const ubyte = parseIdx(idx(0x08, [2, 2], [0, 1, 254, 255]));
  assert.equal(ubyte.dtype, "ubyte");
  assert.deepEqual(ubyte.shape, [2, 2]);
  assert.ok(ubyte.data instanceof Uint8Array);
  assert.deepEqual(Array.from(ubyte.data), [0, 1, 254, 255]);

  const sbyte = parseIdx(idx(0x09, [3], [0x7f, 0x80, 0xff]));
  assert.equal(sbyte.dtype, "sbyte");
  assert.deepEqual(Array.from(sbyte.data), [127, -128, -1]);

  // 0x0102 = 258, 0xff00 = -256 as int16.
  const short = parseIdx(idx(0x0b, [2], [0x01, 0x02, 0xff, 0x00]));
  assert.equal(short.dtype, "short");
  assert.ok(short.data instanceof Int16Array);
  assert.deepEqual(Array.from(short.data), [258, -256]);

  // 0x01020304 = 16909060, 0xfffffffe = -2.
  const int = parseIdx(
    idx(0x0c, [2], [1, 2, 3, 4, 0xff, 0xff, 0xff, 0xfe]),
  );
  assert.equal(int.dtype, "int");
  assert.deepEqual(Array.from(int.data), [16909060, -2]);

  // IEEE 754 single: 0x3fc00000 = 1.5, 0xc0200000 = -2.5.
  const float = parseIdx(
    idx(0x0d, [1, 2], [0x3f, 0xc0, 0, 0, 0xc0, 0x20, 0, 0]),
  );
  assert.equal(float.dtype, "float");
  assert.ok(float.data instanceof Float32Array);
  assert.deepEqual(Array.from(float.data), [1.5, -2.5]);

  // IEEE 754 double: 0x3ff8000000000000 = 1.5.
  const double = parseIdx(idx(0x0e, [1], [0x3f, 0xf8, 0, 0, 0, 0, 0, 0]));
  assert.equal(double.dtype, "double");
  assert.ok(double.data instanceof Float64Array);
  assert.deepEqual(Array.from(double.data), [1.5]);

  // Dimensions are big-endian: bytes 00 00 01 00 are 256, not 65536.
  const wide = parseIdx(idx(0x08, [1, 256], new Array(256).fill(3)));
  assert.deepEqual(wide.shape, [1, 256]);
});

Deno.test("parseIdx reads a payload that does not start at byte 0 of its buffer", () => {
  const inner = idx(0x0b, [1], [0x12, 0x34]);
  const outer = new Uint8Array(inner.length + 3);
  outer.set(inner, 3);
  const parsed = parseIdx(outer.subarray(3));
  assert.deepEqual(Array.from(parsed.data), [0x1234]);
});

Deno.test("parseIdx rejects a wrong magic number, naming the file and byte", () => {
  const bytes = idx(0x08, [1], [0]);
  bytes[0] = 0x12;
  rejects(() => parseIdx(bytes, { file: "x.idx" }), 0, /wrong magic number/);
  const second = idx(0x08, [1], [0]);
  second[1] = 0x08;
  rejects(() => parseIdx(second, { file: "x.idx" }), 1, /wrong magic number/);
});

Deno.test("parseIdx rejects an unknown type byte at offset 2", () => {
  rejects(
    () => parseIdx(idx(0x0a, [1], [0]), { file: "x.idx" }),
    2,
    /unknown type byte \(got 0x0a/,
  );
});

Deno.test("parseIdx rejects a rank other than the one expected at offset 3", () => {
  // A labels-shaped file where images (rank 3) are expected.
  rejects(
    () => parseIdx(idx(0x08, [2], [1, 2]), { file: "x.idx", rank: 3 }),
    3,
    /wrong rank \(got 1, expected 3\)/,
  );
});

Deno.test("parseIdx rejects files that end inside the header", () => {
  rejects(
    () => parseIdx(new Uint8Array([0, 0, 8]), { file: "x.idx" }),
    3,
    /ends inside the magic number/,
  );
  // Rank 3 needs 4 + 12 = 16 header bytes; give 10.
  const short = new Uint8Array([0, 0, 8, 3, 0, 0, 0, 1, 0, 0]);
  rejects(
    () => parseIdx(short, { file: "x.idx" }),
    10,
    /ends inside the dimensions \(got 10 bytes, expected at least 16/,
  );
});

Deno.test("parseIdx rejects a payload shorter than the dimensions say", () => {
  // [2, 3] ubyte needs 6 payload bytes; the header is 12 bytes; give 5.
  rejects(
    () => parseIdx(idx(0x08, [2, 3], [1, 2, 3, 4, 5]), { file: "x.idx" }),
    17,
    /shorter than the dimensions say \(got 5 bytes, expected 6/,
  );
  // [2] int needs 8 bytes; give 7.
  rejects(
    () => parseIdx(idx(0x0c, [2], [0, 0, 0, 1, 0, 0, 0]), { file: "x.idx" }),
    15,
    /got 7 bytes, expected 8/,
  );
  // Dimensions are unsigned: 80 00 00 00 is 2^31, not negative.
  rejects(
    () => parseIdx(idx(0x08, [0x80000000], []), { file: "x.idx" }),
    8,
    /got 0 bytes, expected 2147483648 for ubyte \[2147483648\]/,
  );
});

Deno.test("parseIdx rejects a payload longer than the dimensions say", () => {
  // [2] ubyte: header 8 bytes + 2 payload; the extra byte starts at 10.
  rejects(
    () => parseIdx(idx(0x08, [2], [1, 2, 3]), { file: "x.idx" }),
    10,
    /longer than the dimensions say \(got 3 bytes, expected 2/,
  );
});

Deno.test("parseIdx refuses gzip bytes and decodeIdx decompresses them", async () => {
  const plain = idx(0x08, [3], [5, 6, 7]);
  const gz = await gzip(plain);
  assert.equal(gz[0], 0x1f);
  rejects(() => parseIdx(gz, { file: "x.idx" }), 0, /gzip-compressed/);
  const decoded = await decodeIdx(gz, { rank: 1 });
  assert.deepEqual(Array.from(decoded.data), [5, 6, 7]);
  assert.deepEqual(Array.from((await decodeIdx(plain)).data), [5, 6, 7]);
});

Deno.test("a truncated gzip is an IdxFormatError naming the file", async () => {
  const gz = await gzip(idx(0x08, [100], new Array(100).fill(9)));
  const cut = gz.subarray(0, gz.length - 6);
  await assert.rejects(
    () => gunzip(cut, "t.gz"),
    (e: unknown) =>
      e instanceof IdxFormatError && e.file === "t.gz" &&
      e.offset === cut.length && /truncated or corrupt gzip/.test(e.message),
  );
  await assert.rejects(
    () => decodeIdx(cut, { file: "t.gz" }),
    IdxFormatError,
  );
});

Deno.test("images and labels that disagree in count are rejected at the labels' first dimension", () => {
  const images = parseIdx(idx(0x08, [2, 1, 1], [10, 20]));
  const labels = parseIdx(idx(0x08, [3], [1, 2, 3]));
  try {
    imageDatasetFromIdx(images, labels, {
      name: "t",
      images: "img.idx",
      labels: "lab.idx",
    });
    assert.fail("did not throw");
  } catch (e) {
    assert.ok(e instanceof IdxFormatError);
    assert.equal(e.file, "lab.idx");
    assert.equal(e.offset, 4);
    assert.match(
      e.message,
      /lab\.idx.*got 3 labels, expected 2 as in img\.idx/,
    );
  }
});

Deno.test("imageDatasetFromIdx checks types and takes QMNIST's first label column", () => {
  const images = parseIdx(idx(0x08, [2, 1, 2], [0, 1, 2, 3]));
  // QMNIST labels: int [N, 8], the class first.
  const qmnist = parseIdx(
    idx(0x0c, [2, 2], [0, 0, 0, 7, 0, 0, 0, 99, 0, 0, 0, 3, 0, 0, 0, 98]),
  );
  const ds = imageDatasetFromIdx(images, qmnist, {
    name: "q",
    images: "i",
    labels: "l",
  });
  assert.deepEqual(Array.from(ds.labels), [7, 3]);
  assert.equal(ds.height, 1);
  assert.equal(ds.width, 2);
  const floatImages = parseIdx(idx(0x0d, [1, 1, 1], [0, 0, 0, 0]));
  assert.throws(
    () =>
      imageDatasetFromIdx(floatImages, parseIdx(idx(0x08, [1], [0])), {
        name: "f",
        images: "i",
        labels: "l",
      }),
    /wrong type for images \(got float, expected ubyte\)/,
  );
});

Deno.test("readIdxFile and loadIdxDir read plain and gzipped files from a folder", async () => {
  const dir = await Deno.makeTempDir();
  try {
    // EMNIST-style names, train gzipped, test plain.
    await Deno.writeFile(
      join(dir, "emnist-digits-train-images-idx3-ubyte.gz"),
      await gzip(idx(0x08, [2, 2, 2], [0, 1, 2, 3, 4, 5, 6, 7])),
    );
    await Deno.writeFile(
      join(dir, "emnist-digits-train-labels-idx1-ubyte.gz"),
      await gzip(idx(0x08, [2], [4, 9])),
    );
    await Deno.writeFile(
      join(dir, "emnist-digits-test-images-idx3-ubyte"),
      idx(0x08, [1, 2, 2], [9, 9, 9, 9]),
    );
    await Deno.writeFile(
      join(dir, "emnist-digits-test-labels-idx1-ubyte"),
      idx(0x08, [1], [2]),
    );
    const train = await loadIdxDir(dir);
    assert.equal(train.count, 2);
    assert.deepEqual(Array.from(train.images), [0, 1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(Array.from(train.labels), [4, 9]);
    const test = await loadIdxDir(dir, { split: "test", name: "emnist" });
    assert.equal(test.name, "emnist");
    assert.deepEqual(Array.from(test.labels), [2]);
    const direct = await readIdxFile(
      join(dir, "emnist-digits-test-labels-idx1-ubyte"),
    );
    assert.deepEqual(Array.from(direct.data), [2]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loadIdxDir names the folder and what it found when files are missing or ambiguous", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(join(dir, "notes.txt"), "hi");
    await assert.rejects(
      () => loadIdxDir(dir),
      (e: unknown) =>
        e instanceof Deno.errors.NotFound && e.message.includes(dir) &&
        /no train images files \(got notes\.txt/.test(e.message),
    );
    await Deno.writeFile(
      join(dir, "train-images-idx3-ubyte"),
      idx(0x08, [1, 1, 1], [1]),
    );
    await assert.rejects(
      () => loadIdxDir(dir),
      /no labels files for train-images-idx3-ubyte/,
    );
    await Deno.writeFile(
      join(dir, "kmnist-train-images-idx3-ubyte"),
      idx(0x08, [1, 1, 1], [1]),
    );
    await assert.rejects(
      () => loadIdxDir(dir),
      /several train images files \(got kmnist-train-images-idx3-ubyte, train-images-idx3-ubyte/,
    );
    await assert.rejects(
      () => loadIdxDir(join(dir, "missing")),
      /no such folder/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loadIdxDir reports a count mismatch between the folder's files", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(
      join(dir, "train-images-idx3-ubyte"),
      idx(0x08, [2, 1, 1], [1, 2]),
    );
    await Deno.writeFile(
      join(dir, "train-labels-idx1-ubyte"),
      idx(0x08, [1], [1]),
    );
    await assert.rejects(
      () => loadIdxDir(dir),
      (e: unknown) =>
        e instanceof IdxFormatError && e.offset === 4 &&
        e.file === join(dir, "train-labels-idx1-ubyte"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
