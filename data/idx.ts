/**
 * The IDX file format of MNIST, Fashion-MNIST, KMNIST, EMNIST and QMNIST.
 *
 * An IDX file is a 4-byte magic number (two zero bytes, a type byte and the
 * rank), the rank dimensions as big-endian uint32, then the payload in
 * row-major order, big-endian:
 *
 * | type byte | type     | bytes |
 * | --------- | -------- | ----- |
 * | 0x08      | "ubyte"  | 1     |
 * | 0x09      | "sbyte"  | 1     |
 * | 0x0B      | "short"  | 2     |
 * | 0x0C      | "int"    | 4     |
 * | 0x0D      | "float"  | 4     |
 * | 0x0E      | "double" | 8     |
 *
 * Files are often stored gzipped; {@linkcode decodeIdx} and
 * {@linkcode readIdxFile} recognise the gzip magic (1f 8b) and decompress
 * with the web-standard `DecompressionStream`.
 *
 * @module
 */

/** The element types the IDX format defines. */
export type IdxDataType =
  | "ubyte"
  | "sbyte"
  | "short"
  | "int"
  | "float"
  | "double";

/** A parsed IDX file: its element type, its dimensions and its payload. */
export interface IdxArray {
  /** The element type named by the type byte. */
  dtype: IdxDataType;
  /** The dimensions, outermost first (MNIST images: [N, 28, 28]). */
  shape: number[];
  /** The payload in row-major order, converted to host byte order. */
  data:
    | Uint8Array
    | Int8Array
    | Int16Array
    | Int32Array
    | Float32Array
    | Float64Array;
}

/** Options for {@linkcode parseIdx} and {@linkcode decodeIdx}. */
export interface ParseIdxOptions {
  /** The file name to put in error messages; "<bytes>" by default. */
  file?: string;
  /** The rank the file must have (3 for images, 1 for labels); any by default. */
  rank?: number;
}

/**
 * A malformed IDX file: names the file and the byte offset where it went wrong.
 *
 * @example
 * ```ts
 * import { IdxFormatError, parseIdx } from "./idx.ts";
 * try {
 *   parseIdx(new Uint8Array([0, 0, 0x07, 1, 0, 0, 0, 0]), { file: "a.idx" });
 * } catch (e) {
 *   console.log(e instanceof IdxFormatError && e.offset === 2); // true
 * }
 * ```
 */
export class IdxFormatError extends SyntaxError {
  /** The file (path, URL or "<bytes>") the error is about. */
  readonly file: string;
  /** The byte offset in the (decompressed) file where the problem starts. */
  readonly offset: number;

  /**
   * Make the error; the message becomes
   * `Cannot parse IDX file <file>: <why> at byte <offset>`.
   *
   * @param file The file name.
   * @param offset The byte offset.
   * @param why What is wrong, with the got / expected values.
   */
  constructor(file: string, offset: number, why: string) {
    super(`Cannot parse IDX file ${file}: ${why} at byte ${offset}`);
    this.name = "IdxFormatError";
    this.file = file;
    this.offset = offset;
  }
}

const TYPES: Record<number, { dtype: IdxDataType; size: number }> = {
  0x08: { dtype: "ubyte", size: 1 },
  0x09: { dtype: "sbyte", size: 1 },
  0x0b: { dtype: "short", size: 2 },
  0x0c: { dtype: "int", size: 4 },
  0x0d: { dtype: "float", size: 4 },
  0x0e: { dtype: "double", size: 8 },
};

const hex = (n: number): string => `0x${n.toString(16).padStart(2, "0")}`;

/**
 * Parse the bytes of an uncompressed IDX file.
 *
 * @param bytes The whole file.
 * @param options The file name for messages and the rank expected.
 * @returns The element type, the dimensions and the payload.
 * @throws {IdxFormatError} On a wrong magic, an unknown type, a rank other
 * than `options.rank`, or a payload shorter or longer than the dimensions say.
 * @example
 * ```ts
 * import { parseIdx } from "./idx.ts";
 * // ubyte, rank 1, one dimension of 3, payload 7 8 9
 * const bytes = new Uint8Array([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 8, 9]);
 * const idx = parseIdx(bytes);
 * console.log(idx.dtype, idx.shape, Array.from(idx.data)); // ubyte [ 3 ] [ 7, 8, 9 ]
 * ```
 */
export function parseIdx(
  bytes: Uint8Array,
  options: ParseIdxOptions = {},
): IdxArray {
  const file = options.file ?? "<bytes>";
  if (bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b) {
    throw new IdxFormatError(
      file,
      0,
      "the file is gzip-compressed (got magic 1f 8b, expected 00 00; use decodeIdx or readIdxFile)",
    );
  }
  if (bytes.length < 4) {
    throw new IdxFormatError(
      file,
      bytes.length,
      `the file ends inside the magic number (got ${bytes.length} bytes, expected at least 4)`,
    );
  }
  if (bytes[0] !== 0 || bytes[1] !== 0) {
    throw new IdxFormatError(
      file,
      bytes[0] !== 0 ? 0 : 1,
      `wrong magic number (got ${hex(bytes[0])} ${
        hex(bytes[1])
      }, expected 0x00 0x00)`,
    );
  }
  const type = TYPES[bytes[2]];
  if (type === undefined) {
    throw new IdxFormatError(
      file,
      2,
      `unknown type byte (got ${
        hex(bytes[2])
      }, expected 0x08, 0x09, 0x0b, 0x0c, 0x0d or 0x0e)`,
    );
  }
  const rank = bytes[3];
  if (options.rank !== undefined && rank !== options.rank) {
    throw new IdxFormatError(
      file,
      3,
      `wrong rank (got ${rank}, expected ${options.rank})`,
    );
  }
  const headerEnd = 4 + 4 * rank;
  if (bytes.length < headerEnd) {
    throw new IdxFormatError(
      file,
      bytes.length,
      `the file ends inside the dimensions (got ${bytes.length} bytes, expected at least ${headerEnd} for rank ${rank})`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const shape: number[] = [];
  let count = 1;
  for (let d = 0; d < rank; d++) {
    const n = view.getUint32(4 + 4 * d, false);
    shape.push(n);
    count *= n;
  }
  const payload = bytes.length - headerEnd;
  const expected = count * type.size;
  if (payload < expected) {
    throw new IdxFormatError(
      file,
      bytes.length,
      `the payload is shorter than the dimensions say (got ${payload} bytes, expected ${expected} for ${type.dtype} [${shape}])`,
    );
  }
  if (payload > expected) {
    throw new IdxFormatError(
      file,
      headerEnd + expected,
      `the payload is longer than the dimensions say (got ${payload} bytes, expected ${expected} for ${type.dtype} [${shape}])`,
    );
  }
  return {
    dtype: type.dtype,
    shape,
    data: readPayload(view, headerEnd, count, type.dtype),
  };
}

function readPayload(
  view: DataView,
  start: number,
  count: number,
  dtype: IdxDataType,
): IdxArray["data"] {
  switch (dtype) {
    case "ubyte":
      return new Uint8Array(view.buffer, view.byteOffset + start, count)
        .slice();
    case "sbyte":
      return new Int8Array(view.buffer, view.byteOffset + start, count).slice();
    case "short": {
      const out = new Int16Array(count);
      for (let i = 0; i < count; i++) {
        out[i] = view.getInt16(start + 2 * i, false);
      }
      return out;
    }
    case "int": {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) {
        out[i] = view.getInt32(start + 4 * i, false);
      }
      return out;
    }
    case "float": {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) {
        out[i] = view.getFloat32(start + 4 * i, false);
      }
      return out;
    }
    case "double": {
      const out = new Float64Array(count);
      for (let i = 0; i < count; i++) {
        out[i] = view.getFloat64(start + 8 * i, false);
      }
      return out;
    }
  }
}

/**
 * Whether bytes start with the gzip magic number 1f 8b.
 *
 * @param bytes The bytes to look at.
 * @returns True for gzip data.
 * @example
 * ```ts
 * import { isGzip } from "./idx.ts";
 * console.log(isGzip(new Uint8Array([0x1f, 0x8b, 8]))); // true
 * ```
 */
export function isGzip(bytes: Uint8Array): boolean {
  return bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b;
}

/**
 * Decompress gzip bytes with the web-standard `DecompressionStream`.
 *
 * @param bytes The gzip data.
 * @param file The file name or URL for the error message.
 * @returns The decompressed bytes.
 * @throws {IdxFormatError} When the stream is truncated or corrupt (offset:
 * the compressed length, where the data ran out or stopped making sense).
 * @example
 * ```ts
 * import { gunzip } from "./idx.ts";
 * const gz = new Uint8Array(await new Response(
 *   new Blob([new Uint8Array([1, 2, 3])]).stream()
 *     .pipeThrough(new CompressionStream("gzip")),
 * ).arrayBuffer());
 * console.log(Array.from(await gunzip(gz))); // [ 1, 2, 3 ]
 * ```
 */
export async function gunzip(
  bytes: Uint8Array,
  file = "<bytes>",
): Promise<Uint8Array> {
  try {
    const stream = new Blob([bytes as Uint8Array<ArrayBuffer>]).stream()
      .pipeThrough(new DecompressionStream("gzip"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    throw new IdxFormatError(
      file,
      bytes.length,
      `truncated or corrupt gzip data (got ${bytes.length} compressed bytes: ${why})`,
    );
  }
}

/**
 * Parse IDX bytes, decompressing them first when they are gzipped.
 *
 * @param bytes The file's bytes, plain or gzipped.
 * @param options The file name for messages and the rank expected.
 * @returns The element type, the dimensions and the payload.
 * @throws {IdxFormatError} On corrupt gzip data or a malformed IDX file.
 * @example
 * ```ts
 * import { decodeIdx } from "./idx.ts";
 * const plain = new Uint8Array([0, 0, 0x0b, 1, 0, 0, 0, 2, 0xff, 0xfe, 1, 0]);
 * const idx = await decodeIdx(plain, { rank: 1 });
 * console.log(idx.dtype, Array.from(idx.data)); // short [ -2, 256 ]
 * ```
 */
export async function decodeIdx(
  bytes: Uint8Array,
  options: ParseIdxOptions = {},
): Promise<IdxArray> {
  const plain = isGzip(bytes) ? await gunzip(bytes, options.file) : bytes;
  return parseIdx(plain, options);
}

/**
 * Read and parse an IDX file, plain or gzipped.
 *
 * @param path The file's path.
 * @param options The rank expected (the path is the name in messages).
 * @returns The element type, the dimensions and the payload.
 * @throws {IdxFormatError} On corrupt gzip data or a malformed IDX file.
 * @example
 * ```ts
 * import { readIdxFile } from "./idx.ts";
 * const path = await Deno.makeTempFile();
 * await Deno.writeFile(path, new Uint8Array([0, 0, 8, 1, 0, 0, 0, 1, 42]));
 * console.log(Array.from((await readIdxFile(path)).data)); // [ 42 ]
 * await Deno.remove(path);
 * ```
 */
export async function readIdxFile(
  path: string,
  options: Omit<ParseIdxOptions, "file"> = {},
): Promise<IdxArray> {
  return decodeIdx(await Deno.readFile(path), { ...options, file: path });
}
