/**
 * The safetensors file format, read and written by hand.
 *
 * Layout (https://github.com/huggingface/safetensors):
 *
 * | bytes          | content                                                   |
 * |----------------|-----------------------------------------------------------|
 * | 0 .. 8         | N, the header length, unsigned 64-bit little-endian        |
 * | 8 .. 8 + N     | UTF-8 JSON object `{name: {dtype, shape, data_offsets}}`   |
 * |                | plus an optional `"__metadata__": {string: string}`        |
 * | 8 + N .. end   | the byte buffer; `data_offsets` `[begin, end)` index it    |
 *
 * Tensors are little-endian, row-major, and tile the buffer exactly: no
 * overlaps, no holes. Writing pads the header with spaces to a multiple of
 * 8 bytes and orders tensors as the reference implementation does (by dtype,
 * then by name), so a file written here reads back byte-identical there.
 *
 * @module
 */

/** The dtypes {@linkcode decodeSafetensors} reads. */
export type SafetensorsDtype = "F32" | "F16" | "BF16" | "F64" | "I32" | "I64";

/** One tensor as read: floats widen or narrow to Float32Array, integers to Int32Array. */
export interface SafetensorsTensor {
  /** The dtype stored in the file. */
  dtype: SafetensorsDtype;
  /** The shape, row-major. */
  shape: number[];
  /** The values: Float32Array for F32, F16, BF16 and F64; Int32Array for I32 and I64. */
  data: Float32Array | Int32Array;
}

/** One tensor to write: a Float32Array is written as F32, an Int32Array as I32. */
export interface SafetensorsInput {
  /** The shape, row-major; its product must equal `data.length`. */
  shape: readonly number[];
  /** The values. */
  data: Float32Array | Int32Array;
}

/** A decoded safetensors file. */
export interface SafetensorsFile {
  /** The tensors by name, in the file's header order. */
  tensors: Map<string, SafetensorsTensor>;
  /** The `__metadata__` strings; empty when the file has none. */
  metadata: Record<string, string>;
}

/** A malformed safetensors file: the message names the file and the fault. */
export class SafetensorsError extends SyntaxError {
  /** The file name (or "<bytes>") the fault was found in. */
  readonly file: string;
  /** The byte offset in the file where the fault is, when one applies. */
  readonly offset: number | undefined;

  /**
   * Make the error.
   *
   * @param file The file name.
   * @param message What is wrong, one line.
   * @param offset The byte offset of the fault in the file, if meaningful.
   * @example
   * ```ts
   * import { SafetensorsError } from "./safetensors.ts";
   * const e = new SafetensorsError("a.safetensors", "header is not JSON", 8);
   * console.log(e.message); // Cannot read "a.safetensors": header is not JSON
   * ```
   */
  constructor(file: string, message: string, offset?: number) {
    super(`Cannot read "${file}": ${message}`);
    this.name = "SafetensorsError";
    this.file = file;
    this.offset = offset;
  }
}

/** Bytes per element of every dtype the format defines (for validation). */
const DTYPE_SIZE: Record<string, number> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E5M2: 1,
  F8_E4M3: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  F64: 8,
  I64: 8,
  U64: 8,
};

const SUPPORTED: readonly SafetensorsDtype[] = [
  "F32",
  "F16",
  "BF16",
  "F64",
  "I32",
  "I64",
];

/** The reference writer's dtype order (its enum order); larger first on write. */
const WRITE_RANK: Record<string, number> = { I32: 0, F32: 1 };

/** The reference reader's cap on the header length (100 MB). */
const MAX_HEADER = 100_000_000;

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

interface Entry {
  name: string;
  dtype: SafetensorsDtype;
  shape: number[];
  begin: number;
  end: number;
}

function isNonNegInt(v: unknown): v is number {
  return typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
}

function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac === 0 ? sign * Infinity : NaN;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

function convert(
  bytes: Uint8Array,
  start: number,
  entry: Entry,
  count: number,
  file: string,
): Float32Array | Int32Array {
  const view = new DataView(
    bytes.buffer,
    bytes.byteOffset + start,
    entry.end - entry.begin,
  );
  switch (entry.dtype) {
    case "F32": {
      if (LITTLE_ENDIAN) {
        return new Float32Array(
          bytes.slice(start, start + count * 4).buffer,
        );
      }
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getFloat32(i * 4, true);
      return out;
    }
    case "I32": {
      if (LITTLE_ENDIAN) {
        return new Int32Array(bytes.slice(start, start + count * 4).buffer);
      }
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getInt32(i * 4, true);
      return out;
    }
    case "F16": {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) {
        out[i] = halfToFloat(view.getUint16(i * 2, true));
      }
      return out;
    }
    case "BF16": {
      const out = new Float32Array(count);
      const word = new DataView(new ArrayBuffer(4));
      for (let i = 0; i < count; i++) {
        word.setUint32(0, view.getUint16(i * 2, true) << 16);
        out[i] = word.getFloat32(0);
      }
      return out;
    }
    case "F64": {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getFloat64(i * 8, true);
      return out;
    }
    case "I64": {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) {
        const v = view.getBigInt64(i * 8, true);
        if (v < -2147483648n || v > 2147483647n) {
          throw new SafetensorsError(
            file,
            `I64 tensor "${entry.name}" holds a value outside int32 (got ${v}, expected |value| < 2^31)`,
            start + i * 8,
          );
        }
        out[i] = Number(v);
      }
      return out;
    }
  }
}

/**
 * Parse a safetensors file, validating it as strictly as the reference reader.
 *
 * @param bytes The whole file.
 * @param options `name`: the file name errors report ("<bytes>" by default).
 * @returns The tensors (converted to Float32Array / Int32Array) and metadata.
 * @throws {SafetensorsError} When the file is malformed.
 * @example
 * ```ts
 * import { decodeSafetensors, encodeSafetensors } from "./safetensors.ts";
 * const bytes = encodeSafetensors(
 *   new Map([["w", { shape: [2], data: new Float32Array([1, 2]) }]]),
 * );
 * const { tensors } = decodeSafetensors(bytes);
 * console.log(tensors.get("w")?.data); // Float32Array(2) [ 1, 2 ]
 * ```
 */
export function decodeSafetensors(
  bytes: Uint8Array,
  options: { name?: string } = {},
): SafetensorsFile {
  const file = options.name ?? "<bytes>";
  if (bytes.length < 8) {
    throw new SafetensorsError(
      file,
      `file too short for the 8-byte header length (got ${bytes.length} bytes, expected at least 8)`,
      0,
    );
  }
  const lengths = new DataView(bytes.buffer, bytes.byteOffset, 8);
  const n64 = lengths.getBigUint64(0, true);
  if (n64 > BigInt(bytes.length - 8)) {
    throw new SafetensorsError(
      file,
      `header length runs past the end of the file (got ${n64}, expected at most ${
        bytes.length - 8
      })`,
      0,
    );
  }
  const n = Number(n64);
  if (n > MAX_HEADER) {
    throw new SafetensorsError(
      file,
      `header too large (got ${n} bytes, expected at most ${MAX_HEADER})`,
      0,
    );
  }
  let header: unknown;
  try {
    const text = new TextDecoder("utf-8", { fatal: true }).decode(
      bytes.subarray(8, 8 + n),
    );
    header = JSON.parse(text);
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    throw new SafetensorsError(
      file,
      `header is not valid JSON (${why.split("\n")[0]})`,
      8,
    );
  }
  if (header === null || typeof header !== "object" || Array.isArray(header)) {
    throw new SafetensorsError(
      file,
      `header is not a JSON object (got ${
        Array.isArray(header)
          ? "array"
          : header === null
          ? "null"
          : typeof header
      }, expected object)`,
      8,
    );
  }

  const metaPairs: [string, string][] = [];
  const entries: Entry[] = [];
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") {
      if (info === null || typeof info !== "object" || Array.isArray(info)) {
        throw new SafetensorsError(
          file,
          `__metadata__ is not an object of strings (got ${
            JSON.stringify(info)
          })`,
          8,
        );
      }
      for (const [k, v] of Object.entries(info)) {
        if (typeof v !== "string") {
          throw new SafetensorsError(
            file,
            `__metadata__ value "${k}" is not a string (got ${
              JSON.stringify(v)
            })`,
            8,
          );
        }
        metaPairs.push([k, v]);
      }
      continue;
    }
    entries.push(parseEntry(file, name, info));
  }

  // The tensors must tile the buffer [0, bufferLength) exactly.
  const start = 8 + n;
  const bufferLength = bytes.length - start;
  const sorted = [...entries].sort((a, b) =>
    a.begin - b.begin || a.end - b.end
  );
  let expected = 0;
  for (const e of sorted) {
    if (e.end > bufferLength) {
      throw new SafetensorsError(
        file,
        `tensor "${e.name}" data_offsets run past the end of the file (got [${e.begin}, ${e.end}], expected end <= ${bufferLength})`,
        start + e.begin,
      );
    }
    if (e.begin < expected) {
      throw new SafetensorsError(
        file,
        `tensor "${e.name}" overlaps the tensor before it (got begin ${e.begin}, expected ${expected})`,
        start + e.begin,
      );
    }
    if (e.begin > expected) {
      throw new SafetensorsError(
        file,
        `hole in the byte buffer before tensor "${e.name}" (got begin ${e.begin}, expected ${expected})`,
        start + expected,
      );
    }
    expected = e.end;
  }
  if (expected !== bufferLength) {
    throw new SafetensorsError(
      file,
      `byte buffer has ${
        bufferLength - expected
      } bytes no tensor covers (got buffer length ${bufferLength}, expected ${expected})`,
      start + expected,
    );
  }

  const tensors = new Map<string, SafetensorsTensor>();
  for (const e of entries) {
    const count = e.shape.reduce((a, b) => a * b, 1);
    tensors.set(e.name, {
      dtype: e.dtype,
      shape: e.shape,
      data: convert(bytes, start + e.begin, e, count, file),
    });
  }
  return { tensors, metadata: Object.fromEntries(metaPairs) };
}

function parseEntry(file: string, name: string, info: unknown): Entry {
  if (info === null || typeof info !== "object" || Array.isArray(info)) {
    throw new SafetensorsError(
      file,
      `tensor "${name}" entry is not an object (got ${JSON.stringify(info)})`,
      8,
    );
  }
  const { dtype, shape, data_offsets: offsets } = info as Record<
    string,
    unknown
  >;
  if (typeof dtype !== "string" || !(dtype in DTYPE_SIZE)) {
    throw new SafetensorsError(
      file,
      `tensor "${name}" has an unknown dtype (got ${
        JSON.stringify(dtype)
      }, expected one of ${Object.keys(DTYPE_SIZE).join(", ")})`,
      8,
    );
  }
  if (!(SUPPORTED as readonly string[]).includes(dtype)) {
    throw new SafetensorsError(
      file,
      `tensor "${name}" has an unsupported dtype (got ${dtype}, expected one of ${
        SUPPORTED.join(", ")
      })`,
      8,
    );
  }
  if (!Array.isArray(shape) || !shape.every(isNonNegInt)) {
    throw new SafetensorsError(
      file,
      `tensor "${name}" shape is not a list of non-negative integers (got ${
        JSON.stringify(shape)
      })`,
      8,
    );
  }
  if (
    !Array.isArray(offsets) || offsets.length !== 2 ||
    !offsets.every(isNonNegInt) || offsets[0] > offsets[1]
  ) {
    throw new SafetensorsError(
      file,
      `tensor "${name}" data_offsets is not [begin, end] with 0 <= begin <= end (got ${
        JSON.stringify(offsets)
      })`,
      8,
    );
  }
  const count = shape.reduce((a: number, b: number) => a * b, 1);
  const nbytes = count * DTYPE_SIZE[dtype];
  const [begin, end] = offsets as number[];
  if (!Number.isSafeInteger(nbytes) || end - begin !== nbytes) {
    throw new SafetensorsError(
      file,
      `tensor "${name}" byte length does not match ${dtype} [${shape}] (got ${
        end - begin
      }, expected ${nbytes})`,
      8,
    );
  }
  return { name, dtype: dtype as SafetensorsDtype, shape, begin, end };
}

/**
 * Serialize tensors and metadata to safetensors bytes (F32 and I32).
 *
 * @param tensors The tensors by name; Float32Array data is written as F32, Int32Array as I32.
 * @param metadata Strings for `__metadata__`; omitted from the header when empty.
 * @returns The file's bytes: header padded with spaces to a multiple of 8,
 *   tensors ordered by dtype (F32 before I32) then by name.
 * @throws {TypeError} When a shape does not match its data's length.
 * @example
 * ```ts
 * import { encodeSafetensors } from "./safetensors.ts";
 * const bytes = encodeSafetensors(
 *   new Map([["t", { shape: [2], data: new Int32Array([0, 637]) }]]),
 *   { format: "pt" },
 * );
 * console.log(bytes.length % 8); // 0
 * ```
 */
export function encodeSafetensors(
  tensors: ReadonlyMap<string, SafetensorsInput>,
  metadata: Readonly<Record<string, string>> = {},
): Uint8Array<ArrayBuffer> {
  const items = [...tensors].map(([name, t]) => {
    const dtype = t.data instanceof Float32Array
      ? "F32"
      : t.data instanceof Int32Array
      ? "I32"
      : undefined;
    if (dtype === undefined) {
      throw new TypeError(
        `Cannot write safetensors: tensor "${name}" data must be a Float32Array or Int32Array (got ${
          (t.data as object)?.constructor?.name
        })`,
      );
    }
    if (name === "__metadata__") {
      throw new TypeError(
        `Cannot write safetensors: tensor name "__metadata__" is reserved (got a tensor by that name)`,
      );
    }
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (!t.shape.every(isNonNegInt) || count !== t.data.length) {
      throw new TypeError(
        `Cannot write safetensors: tensor "${name}" shape does not match its data (got [${t.shape}] for ${t.data.length} values, expected a product of ${t.data.length})`,
      );
    }
    return { name, dtype, shape: [...t.shape], data: t.data };
  });
  items.sort((a, b) =>
    WRITE_RANK[b.dtype] - WRITE_RANK[a.dtype] ||
    (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)
  );

  const header: Record<string, unknown> = Object.create(null);
  if (Object.keys(metadata).length > 0) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") {
        throw new TypeError(
          `Cannot write safetensors: metadata "${k}" must be a string (got ${typeof v})`,
        );
      }
    }
    header.__metadata__ = metadata;
  }
  let offset = 0;
  for (const item of items) {
    const end = offset + item.data.byteLength;
    header[item.name] = {
      dtype: item.dtype,
      shape: item.shape,
      data_offsets: [offset, end],
    };
    offset = end;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const n = json.length + ((8 - (json.length % 8)) % 8);
  const out = new Uint8Array(8 + n + offset);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(n), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.length, 8 + n);
  let pos = 8 + n;
  for (const item of items) {
    if (LITTLE_ENDIAN) {
      out.set(
        new Uint8Array(
          item.data.buffer,
          item.data.byteOffset,
          item.data.byteLength,
        ),
        pos,
      );
    } else {
      for (let i = 0; i < item.data.length; i++) {
        if (item.dtype === "F32") {
          view.setFloat32(pos + 4 * i, item.data[i], true);
        } else view.setInt32(pos + 4 * i, item.data[i], true);
      }
    }
    pos += item.data.byteLength;
  }
  return out;
}
