import assert from "node:assert/strict";
import {
  decodeSafetensors,
  encodeSafetensors,
  SafetensorsError,
} from "../core/safetensors.ts";

const FIXTURE = new URL("./fixtures/unet_base8.safetensors", import.meta.url);

/** Bytes of a Python bytes literal (latin-1 with \xNN escapes already decoded). */
function latin1(s: string): Uint8Array {
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

/** A file from a raw header string and a buffer, with the length field set to the header's byte length. */
function build(
  header: string,
  buffer: Uint8Array = new Uint8Array(),
): Uint8Array {
  const json = new TextEncoder().encode(header);
  const out = new Uint8Array(8 + json.length + buffer.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  out.set(buffer, 8 + json.length);
  return out;
}

function rejects(
  bytes: Uint8Array,
  fault: RegExp,
  offset?: number,
): SafetensorsError {
  let caught: unknown;
  try {
    decodeSafetensors(bytes, { name: "bad.safetensors" });
  } catch (e) {
    caught = e;
  }
  assert.ok(
    caught instanceof SafetensorsError,
    `expected SafetensorsError, got ${caught}`,
  );
  assert.ok(caught instanceof SyntaxError);
  assert.match(caught.message, /^Cannot read "bad\.safetensors": /);
  assert.match(caught.message, fault);
  assert.ok(!caught.message.includes("\n"), "one-line message");
  assert.equal(caught.file, "bad.safetensors");
  if (offset !== undefined) assert.equal(caught.offset, offset);
  return caught;
}

Deno.test("encodeSafetensors writes the reference implementation's bytes (test_simple.py vector)", () => {
  // huggingface/safetensors bindings/python/tests/test_simple.py, test_serialization:
  // save({"test": np.zeros((2, 2), dtype=np.int32)}) with the header padded to 8 bytes.
  const expected = latin1(
    '@\x00\x00\x00\x00\x00\x00\x00{"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}    ' +
      "\x00".repeat(16),
  );
  const got = encodeSafetensors(
    new Map([["test", { shape: [2, 2], data: new Int32Array(4) }]]),
  );
  assert.deepEqual(got, expected);
});

Deno.test("decodeSafetensors reads an unpadded header (older writers)", () => {
  const bytes = latin1(
    '<\x00\x00\x00\x00\x00\x00\x00{"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}' +
      "\x00".repeat(12) + "\x01\x00\x00\x00",
  );
  const { tensors, metadata } = decodeSafetensors(bytes);
  assert.deepEqual(metadata, {});
  const t = tensors.get("test")!;
  assert.equal(t.dtype, "I32");
  assert.deepEqual(t.shape, [2, 2]);
  assert.deepEqual(t.data, new Int32Array([0, 0, 0, 1]));
});

Deno.test("decodeSafetensors reads the file numpy_unet.py wrote by hand", async () => {
  const { tensors, metadata } = decodeSafetensors(await Deno.readFile(FIXTURE));
  assert.deepEqual(metadata, { format: "pt" });
  assert.deepEqual(tensors.get("fixture.t")!.data, new Int32Array([0, 637]));
  assert.equal(tensors.get("fixture.t")!.dtype, "I32");
  assert.deepEqual(tensors.get("fixture.x")!.shape, [2, 32, 32, 1]);
  assert.deepEqual(tensors.get("in_conv.weight")!.shape, [8, 1, 3, 3]);
  assert.deepEqual(tensors.get("us2.weight")!.shape, [32, 16, 4, 4]);
  assert.ok(tensors.get("fixture.x")!.data instanceof Float32Array);
  const x = tensors.get("fixture.x")!.data;
  assert.ok(x.every((v) => v >= -1 && v <= 1) && x.some((v) => v !== 0));
});

Deno.test("decodeSafetensors converts F16, BF16, F64 and I64 by hand-derived values", () => {
  const buf = new Uint8Array(10 + 4 + 16 + 16);
  const v = new DataView(buf.buffer);
  // F16: 1, -2, 65504 (max), 2^-24 (smallest subnormal), +inf
  [0x3c00, 0xc000, 0x7bff, 0x0001, 0x7c00].forEach((h, i) =>
    v.setUint16(2 * i, h, true)
  );
  // BF16: 1, -3
  [0x3f80, 0xc040].forEach((h, i) => v.setUint16(10 + 2 * i, h, true));
  // F64: 0.1, -1e300 (narrowed to float32: -inf)
  v.setFloat64(14, 0.1, true);
  v.setFloat64(22, -1e300, true);
  // I64: -5, 2^31 - 1
  v.setBigInt64(30, -5n, true);
  v.setBigInt64(38, 2147483647n, true);
  const header = JSON.stringify({
    a: { dtype: "F16", shape: [5], data_offsets: [0, 10] },
    b: { dtype: "BF16", shape: [2], data_offsets: [10, 14] },
    c: { dtype: "F64", shape: [2], data_offsets: [14, 30] },
    d: { dtype: "I64", shape: [2, 1], data_offsets: [30, 46] },
  });
  const { tensors } = decodeSafetensors(build(header, buf));
  assert.deepEqual(
    tensors.get("a")!.data,
    new Float32Array([1, -2, 65504, 2 ** -24, Infinity]),
  );
  assert.deepEqual(tensors.get("b")!.data, new Float32Array([1, -3]));
  assert.deepEqual(tensors.get("c")!.data, new Float32Array([0.1, -Infinity]));
  assert.deepEqual(tensors.get("d")!.data, new Int32Array([-5, 2147483647]));
  assert.deepEqual(tensors.get("d")!.shape, [2, 1]);
  assert.equal(tensors.get("a")!.dtype, "F16");
});

Deno.test("encodeSafetensors orders F32 before I32, each by name, pads the header, and round-trips", () => {
  const data = new Map([
    ["zeta", { shape: [3], data: new Float32Array([1.5, -2.25, 3e-8]) }],
    ["alpha", { shape: [2], data: new Int32Array([-7, 9]) }],
    ["beta", { shape: [1, 2], data: new Float32Array([NaN, -0]) }],
    ["empty", { shape: [0, 4], data: new Float32Array(0) }],
    ["scalar", { shape: [], data: new Float32Array([42]) }],
  ]);
  const bytes = encodeSafetensors(data, { format: "pt", note: "héllo" });
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal(n % 8, 0);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const order = Object.entries(header)
    .filter(([k]) => k !== "__metadata__")
    .sort((a, b) =>
      (a[1] as { data_offsets: number[] }).data_offsets[0] -
        (b[1] as { data_offsets: number[] }).data_offsets[0] ||
      (a[1] as { data_offsets: number[] }).data_offsets[1] -
        (b[1] as { data_offsets: number[] }).data_offsets[1]
    )
    .map(([k]) => k);
  assert.deepEqual(order, ["beta", "empty", "scalar", "zeta", "alpha"]);
  assert.deepEqual(header.beta.data_offsets, [0, 8]);
  assert.deepEqual(header.alpha.data_offsets, [24, 32]);
  assert.equal(bytes.length, 8 + n + 32);

  const back = decodeSafetensors(bytes);
  assert.deepEqual(back.metadata, { format: "pt", note: "héllo" });
  for (const [name, t] of data) {
    const got = back.tensors.get(name)!;
    assert.deepEqual(got.shape, t.shape, name);
    assert.deepEqual(
      new Uint8Array(got.data.buffer, got.data.byteOffset, got.data.byteLength),
      new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength),
      `${name} bitwise`,
    );
  }
});

Deno.test("decodeSafetensors reads from a subarray at an odd byte offset", () => {
  const bytes = encodeSafetensors(
    new Map([["w", { shape: [2], data: new Float32Array([0.5, -1]) }]]),
  );
  const shifted = new Uint8Array(bytes.length + 3);
  shifted.set(bytes, 3);
  const { tensors } = decodeSafetensors(shifted.subarray(3));
  assert.deepEqual(tensors.get("w")!.data, new Float32Array([0.5, -1]));
});

Deno.test("encodeSafetensors rejects a shape that does not match the data", () => {
  assert.throws(
    () =>
      encodeSafetensors(
        new Map([["w", { shape: [2, 2], data: new Float32Array(3) }]]),
      ),
    (e: unknown) =>
      e instanceof TypeError &&
      /^Cannot write safetensors: tensor "w" shape/.test(e.message),
  );
});

Deno.test("decodeSafetensors rejects a file shorter than 8 bytes", () => {
  rejects(new Uint8Array(5), /too short.*got 5 bytes, expected at least 8/, 0);
});

Deno.test("decodeSafetensors rejects a header length past the end of the file", () => {
  const bytes = build(
    '{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}',
    new Uint8Array(4),
  );
  new DataView(bytes.buffer).setBigUint64(0, 1000n, true);
  rejects(
    bytes,
    /header length runs past the end.*got 1000, expected at most/,
    0,
  );
  // A length that needs all 64 bits.
  new DataView(bytes.buffer).setBigUint64(0, 0xffffffffffffffffn, true);
  rejects(bytes, /got 18446744073709551615/, 0);
});

Deno.test("decodeSafetensors rejects a header that is not JSON, or not an object", () => {
  rejects(build('{"a": '), /header is not valid JSON/, 8);
  rejects(build("[1, 2]"), /not a JSON object \(got array/, 8);
  rejects(build("null"), /not a JSON object \(got null/, 8);
  rejects(build('"hi"'), /not a JSON object \(got string/, 8);
  // invalid UTF-8 inside the header
  const bytes = build('{"a":1}');
  bytes[10] = 0xff;
  rejects(bytes, /header is not valid JSON/, 8);
});

Deno.test("decodeSafetensors rejects malformed tensor entries and metadata", () => {
  rejects(build('{"a": 3}'), /tensor "a" entry is not an object/);
  rejects(
    build(
      '{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}',
      new Uint8Array(4),
    ),
    /tensor "a" shape is not a list of non-negative integers/,
  );
  rejects(
    build(
      '{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}',
      new Uint8Array(4),
    ),
    /tensor "a" data_offsets is not \[begin, end\]/,
  );
  rejects(
    build('{"a":{"dtype":"F32","shape":[1]}}', new Uint8Array(4)),
    /tensor "a" data_offsets/,
  );
  rejects(
    build('{"__metadata__":{"k":1}}'),
    /__metadata__ value "k" is not a string/,
  );
  rejects(build('{"__metadata__":[]}'), /__metadata__ is not an object/);
});

Deno.test("decodeSafetensors rejects an unknown or unsupported dtype", () => {
  rejects(
    build(
      '{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}',
      new Uint8Array(4),
    ),
    /tensor "a" has an unknown dtype \(got "F33", expected one of /,
    8,
  );
  rejects(
    build(
      '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
      new Uint8Array(4),
    ),
    /tensor "a" has an unsupported dtype \(got U8/,
  );
});

Deno.test("decodeSafetensors rejects offsets that do not match dtype size * shape", () => {
  rejects(
    build(
      '{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}',
      new Uint8Array(20),
    ),
    /tensor "a" byte length does not match F32 \[2,3\] \(got 20, expected 24\)/,
  );
});

Deno.test("decodeSafetensors rejects offsets out of range, overlaps and holes", () => {
  const hdr = (a: number[], b: number[]) =>
    JSON.stringify({
      a: { dtype: "F32", shape: [2], data_offsets: a },
      b: { dtype: "F32", shape: [1], data_offsets: b },
    });
  // Out of range: b ends at 16 but the buffer holds 12 bytes.
  const oob = build(hdr([0, 8], [12, 16]), new Uint8Array(12));
  const headerBytes = oob.length - 12;
  rejects(
    oob,
    /tensor "b" data_offsets run past the end of the file \(got \[12, 16\], expected end <= 12\)/,
    headerBytes + 12,
  );
  // Overlap: b starts inside a.
  rejects(
    build(hdr([0, 8], [4, 8]), new Uint8Array(8)),
    /tensor "b" overlaps the tensor before it \(got begin 4, expected 8\)/,
  );
  // Hole between tensors.
  const hole = build(hdr([0, 8], [12, 16]), new Uint8Array(16));
  rejects(
    hole,
    /hole in the byte buffer before tensor "b" \(got begin 12, expected 8\)/,
    hole.length - 16 + 8,
  );
  // Hole at the start.
  rejects(
    build(hdr([4, 12], [12, 16]), new Uint8Array(16)),
    /hole .* before tensor "a" \(got begin 4, expected 0\)/,
  );
  // Trailing bytes no tensor covers.
  rejects(
    build(hdr([0, 8], [8, 12]), new Uint8Array(20)),
    /byte buffer has 8 bytes no tensor covers \(got buffer length 20, expected 12\)/,
  );
});

Deno.test("decodeSafetensors rejects an I64 value outside int32", () => {
  const buf = new Uint8Array(8);
  new DataView(buf.buffer).setBigInt64(0, 2n ** 40n, true);
  rejects(
    build('{"i":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}', buf),
    /I64 tensor "i" holds a value outside int32/,
  );
});

Deno.test("decodeSafetensors names <bytes> when no file name is given", () => {
  assert.throws(
    () => decodeSafetensors(new Uint8Array(3)),
    /^SafetensorsError: Cannot read "<bytes>": file too short/,
  );
});
