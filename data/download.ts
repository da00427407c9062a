/**
 * Download one file from a list of mirrors into a cache folder, verified.
 *
 * Each mirror is tried in order until one gives bytes that pass the checks:
 * the length the server announced, the checksum (MD5 or SHA-256), and, for a
 * `.gz` name, a complete gzip stream. The bytes go to a temporary file in the
 * cache folder that is renamed to its final name only after every check
 * passed, so an interrupted or corrupt download never leaves a file that a
 * later run trusts.
 *
 * @module
 */
import { join } from "node:path";
import { checksumAlgorithm, checksumProblem } from "./_checksum.ts";
import { gunzip, isGzip } from "./idx.ts";

/** How far a download has got; passed to `onProgress`. */
export interface DownloadProgress {
  /** The file's name, e.g. "train-images-idx3-ubyte.gz". */
  file: string;
  /** The URL being fetched. */
  url: string;
  /** Bytes received so far. */
  received: number;
  /** The announced length in bytes, or null when the server sent none. */
  total: number | null;
  /** True on the last call for this URL (complete or failed). */
  done: boolean;
}

/** Why one mirror failed. */
export interface DownloadAttempt {
  /** The URL tried. */
  url: string;
  /** What went wrong: "connection refused", "HTTP 404 Not Found", "checksum mismatch (...)". */
  reason: string;
  /**
   * "network": no connection (refused, DNS, timeout, dropped); "http": the
   * server answered with an error status; "integrity": bytes arrived but were
   * truncated, corrupt or did not match the checksum.
   */
  kind: "network" | "http" | "integrity";
}

/**
 * Every mirror failed to give a good copy of a file; the message lists each
 * URL and why it failed.
 *
 * @example
 * ```ts
 * import { DownloadError } from "./download.ts";
 * const e = new DownloadError("a.gz", [
 *   { url: "http://x/a.gz", reason: "connection refused", kind: "network" },
 * ]);
 * console.log(e.message); // Cannot download a.gz: http://x/a.gz failed (connection refused)
 * console.log(e.unreachable); // true
 * ```
 */
export class DownloadError extends Error {
  /** The file's name. */
  readonly file: string;
  /** One entry per mirror tried, in order. */
  readonly attempts: DownloadAttempt[];

  /**
   * Make the error from the failed attempts.
   *
   * @param file The file's name.
   * @param attempts Why each mirror failed.
   */
  constructor(file: string, attempts: DownloadAttempt[]) {
    super(
      `Cannot download ${file}: ${
        attempts.map((a) => `${a.url} failed (${a.reason})`).join("; ")
      }`,
    );
    this.name = "DownloadError";
    this.file = file;
    this.attempts = attempts;
  }

  /**
   * True when no mirror delivered any data (no network, or every server
   * answered with an error status): the case where falling back to bundled
   * data makes sense. False when some data arrived but was corrupt.
   */
  get unreachable(): boolean {
    return this.attempts.every((a) => a.kind !== "integrity");
  }
}

/** Options for {@linkcode downloadFile}. */
export interface DownloadOptions {
  /** Base URLs tried in order; the file's name is appended ("/" added when missing). */
  mirrors: readonly string[];
  /** The folder the verified file is stored in (created when missing). */
  dir: string;
  /** The expected hex digest (32 digits MD5, 64 SHA-256); unchecked when omitted. */
  checksum?: string;
  /** Called as bytes arrive; the library prints nothing itself. */
  onProgress?: (progress: DownloadProgress) => void;
  /** Give up on a mirror after this long without a response or data; 15000 ms by default. */
  timeoutMs?: number;
}

class AttemptFailure extends Error {
  constructor(readonly kind: DownloadAttempt["kind"], reason: string) {
    super(reason);
  }
}

/**
 * Get a verified copy of a file into `options.dir`: reuse the copy there when
 * it passes the checksum, otherwise download it from the first mirror that
 * gives good bytes.
 *
 * @param file The file's name, appended to each mirror's base URL.
 * @param options The mirrors, the folder, the checksum and a progress callback.
 * @returns The path of the verified file.
 * @throws {DownloadError} When every mirror failed; nothing new is left in
 * the folder then.
 * @example
 * ```ts
 * import { downloadFile } from "./download.ts";
 * const dir = await Deno.makeTempDir();
 * const src = await Deno.makeTempDir();
 * await Deno.writeTextFile(`${src}/hello.txt`, "hello");
 * const path = await downloadFile("hello.txt", {
 *   mirrors: [`file://${src}/`],
 *   dir,
 *   checksum: "5d41402abc4b2a76b9719d911017c592", // md5("hello")
 * });
 * console.log(await Deno.readTextFile(path)); // hello
 * await Deno.remove(dir, { recursive: true });
 * await Deno.remove(src, { recursive: true });
 * ```
 */
export async function downloadFile(
  file: string,
  options: DownloadOptions,
): Promise<string> {
  if (options.mirrors.length === 0) {
    throw new RangeError(
      `Cannot download ${file}: no mirrors (got 0, expected at least one base URL)`,
    );
  }
  if (options.checksum !== undefined) checksumAlgorithm(options.checksum, file);
  const dest = join(options.dir, file);
  if (await isVerified(dest, options.checksum, file)) return dest;
  const attempts: DownloadAttempt[] = [];
  for (const mirror of options.mirrors) {
    const url = mirror.endsWith("/") ? mirror + file : `${mirror}/${file}`;
    try {
      const bytes = await fetchVerified(url, file, options);
      await Deno.mkdir(options.dir, { recursive: true });
      const tmp = `${dest}.${crypto.randomUUID().slice(0, 8)}.part`;
      try {
        await Deno.writeFile(tmp, bytes);
        await Deno.rename(tmp, dest);
      } catch (e) {
        await Deno.remove(tmp).catch(() => {});
        throw e;
      }
      return dest;
    } catch (e) {
      if (!(e instanceof AttemptFailure)) throw e;
      attempts.push({ url, reason: e.message, kind: e.kind });
    }
  }
  throw new DownloadError(file, attempts);
}

async function isVerified(
  path: string,
  checksum: string | undefined,
  file: string,
): Promise<boolean> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
  return checksum === undefined ||
    checksumProblem(bytes, checksum, file) === null;
}

/** Fetch a URL and run every check; throws AttemptFailure with the reason. */
async function fetchVerified(
  url: string,
  file: string,
  options: DownloadOptions,
): Promise<Uint8Array> {
  const timeoutMs = options.timeoutMs ?? 15000;
  const controller = new AbortController();
  let timer = setTimeout(() => controller.abort(), timeoutMs);
  const stall = (): void => {
    clearTimeout(timer);
    timer = setTimeout(() => controller.abort(), timeoutMs);
  };
  const timedOut = (what: string): AttemptFailure =>
    new AttemptFailure(
      "network",
      `timed out: ${what} for ${timeoutMs / 1000} s`,
    );
  let received = 0;
  let total: number | null = null;
  const progress = (done: boolean): void =>
    options.onProgress?.({ file, url, received, total, done });
  try {
    let response: Response;
    try {
      response = await fetch(url, { signal: controller.signal });
    } catch (e) {
      if (controller.signal.aborted) throw timedOut("no response");
      throw new AttemptFailure("network", describeFetchError(e));
    }
    if (!response.ok) {
      await response.body?.cancel();
      throw new AttemptFailure(
        "http",
        `HTTP ${response.status}${
          response.statusText ? " " + response.statusText : ""
        }`,
      );
    }
    const length = Number(response.headers.get("content-length"));
    total = Number.isFinite(length) && length > 0 ? length : null;
    progress(false);
    const chunks: Uint8Array[] = [];
    if (response.body !== null) {
      const reader = response.body.getReader();
      for (;;) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch (e) {
          if (controller.signal.aborted) {
            throw timedOut(`no data after ${received} bytes`);
          }
          throw new AttemptFailure(
            "integrity",
            `connection lost after ${received} of ${total ?? "?"} bytes: ${
              describeFetchError(e)
            }`,
          );
        }
        if (chunk.done) break;
        stall();
        chunks.push(chunk.value);
        received += chunk.value.length;
        progress(false);
      }
    }
    const bytes = concat(chunks, received);
    if (total !== null && received !== total) {
      throw new AttemptFailure(
        "integrity",
        `truncated download (got ${received} bytes, expected ${total})`,
      );
    }
    if (options.checksum !== undefined) {
      const problem = checksumProblem(bytes, options.checksum, file);
      if (problem !== null) throw new AttemptFailure("integrity", problem);
    }
    if (file.endsWith(".gz")) {
      if (!isGzip(bytes)) {
        const head = Array.from(
          bytes.subarray(0, 2),
          (b) => b.toString(16).padStart(2, "0"),
        ).join(" ");
        throw new AttemptFailure(
          "integrity",
          `not gzip data (got magic ${head || "nothing"}, expected 1f 8b)`,
        );
      }
      try {
        await gunzip(bytes, url);
      } catch {
        throw new AttemptFailure(
          "integrity",
          `truncated or corrupt gzip (got ${received} bytes that do not decompress)`,
        );
      }
    }
    return bytes;
  } finally {
    clearTimeout(timer);
    progress(true);
  }
}

function concat(chunks: Uint8Array[], length: number): Uint8Array {
  const out = new Uint8Array(length);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** A short reason from fetch's nested error: "connection refused", "host not found". */
function describeFetchError(e: unknown): string {
  const parts: string[] = [];
  for (
    let x: unknown = e;
    x instanceof Error && parts.length < 4;
    x = x.cause
  ) {
    parts.push(x.message);
  }
  const text = parts.join(": ") || String(e);
  if (/connection refused/i.test(text)) return "connection refused";
  if (
    /dns error|failed to lookup|name or service not known|nodename nor servname|no such host/i
      .test(text)
  ) {
    return "host not found (DNS lookup failed)";
  }
  if (/timed out/i.test(text)) return "connection timed out";
  if (/connection reset/i.test(text)) return "connection reset";
  if (/network is unreachable|no route to host/i.test(text)) {
    return "network unreachable";
  }
  return text.split("\n")[0];
}

/**
 * One line describing a download's progress: bytes and percent.
 *
 * @param progress What `onProgress` was given.
 * @returns E.g. "train-images-idx3-ubyte.gz: 4.2 / 9.9 MB (42%)".
 * @example
 * ```ts
 * import { formatProgress } from "./download.ts";
 * const line = formatProgress({
 *   file: "a.gz", url: "http://x/a.gz", received: 512 * 1024, total: 1024 * 1024, done: false,
 * });
 * console.log(line); // a.gz: 0.5 / 1.0 MB (50%)
 * ```
 */
export function formatProgress(progress: DownloadProgress): string {
  const mb = (n: number): string => (n / (1024 * 1024)).toFixed(1);
  if (progress.total === null) {
    return `${progress.file}: ${mb(progress.received)} MB`;
  }
  const percent = Math.floor(100 * progress.received / progress.total);
  return `${progress.file}: ${mb(progress.received)} / ${
    mb(progress.total)
  } MB (${percent}%)`;
}
