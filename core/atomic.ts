/**
 * Crash-safe file writes: write to a temporary name beside the target, then rename.
 *
 * @module
 */
import { basename, dirname, join } from "node:path";

/**
 * Write bytes to `path` so that a reader sees either the old file or the whole new one.
 *
 * The bytes go to `.<name>.<random>.tmp` in the same directory (so the rename
 * stays on one file system) and are renamed over `path` once written; on any
 * failure the temporary file is removed.
 *
 * @param path The file to write.
 * @param bytes Its new contents.
 * @returns Nothing; resolves once the file is in place.
 * @example
 * ```ts
 * import { writeFileAtomic } from "./atomic.ts";
 * const dir = await Deno.makeTempDir();
 * await writeFileAtomic(`${dir}/notes.txt`, new TextEncoder().encode("hello\n"));
 * console.log(await Deno.readTextFile(`${dir}/notes.txt`)); // "hello\n"
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function writeFileAtomic(
  path: string,
  bytes: Uint8Array,
): Promise<void> {
  const tmp = join(
    dirname(path),
    `.${basename(path)}.${crypto.randomUUID().slice(0, 8)}.tmp`,
  );
  try {
    await Deno.writeFile(tmp, bytes);
    await Deno.rename(tmp, path);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw err;
  }
}
