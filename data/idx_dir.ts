/**
 * Read a dataset from a folder of IDX files the user already has: MNIST,
 * Fashion-MNIST, KMNIST, EMNIST, QMNIST, plain or gzipped.
 *
 * Files are recognised by name: an images file `<prefix>images-idx3-ubyte`
 * (or `images.idx3-ubyte`, Kaggle's spelling), optionally `.gz`, whose name
 * holds "train" for the train split and "t10k" or "test" for the test split;
 * its labels file has the same prefix and `labels-idx<rank>-<type>`.
 *
 * @module
 */
import { basename, join, resolve } from "node:path";
import { type ImageDataset, imageDatasetFromIdx } from "./dataset.ts";
import { readIdxFile } from "./idx.ts";

/** Options for {@linkcode loadIdxDir}. */
export interface LoadIdxDirOptions {
  /** Which split to read; "train" by default. */
  split?: "train" | "test";
  /** The dataset's name; the folder's name by default. */
  name?: string;
}

const IMAGES = /^(.*)images[-.]idx3[-.]ubyte(\.gz)?$/i;
const LABELS = /^(.*)labels[-.]idx[12][-.](ubyte|sbyte|short|int)(\.gz)?$/i;

function inSplit(name: string, split: "train" | "test"): boolean {
  return split === "train" ? /train/i.test(name) : /t10k|test/i.test(name);
}

/** Of `x` and `x.gz` both present, keep the plain one. */
function preferPlain(names: string[]): string[] {
  return names.filter((n) =>
    !(n.endsWith(".gz") && names.includes(n.slice(0, -3)))
  );
}

/**
 * Read one split of an IDX dataset from a folder.
 *
 * @param dir The folder holding the IDX files.
 * @param options The split and the dataset's name.
 * @returns The dataset.
 * @throws {Deno.errors.NotFound} When the folder has no images or labels
 * file for the split, or several (the message lists what it found).
 * @throws {IdxFormatError} When a file is malformed or the counts differ.
 * @example
 * ```ts
 * import { loadIdxDir } from "./idx_dir.ts";
 * const dir = await Deno.makeTempDir();
 * const be = (n: number) => [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];
 * await Deno.writeFile(`${dir}/train-images-idx3-ubyte`,
 *   new Uint8Array([0, 0, 8, 3, ...be(1), ...be(2), ...be(2), 0, 64, 128, 255]));
 * await Deno.writeFile(`${dir}/train-labels-idx1-ubyte`,
 *   new Uint8Array([0, 0, 8, 1, ...be(1), 5]));
 * const ds = await loadIdxDir(dir);
 * console.log(ds.count, ds.height, ds.labels[0]); // 1 2 5
 * await Deno.remove(dir, { recursive: true });
 * ```
 */
export async function loadIdxDir(
  dir: string,
  options: LoadIdxDirOptions = {},
): Promise<ImageDataset> {
  const split = options.split ?? "train";
  const names: string[] = [];
  try {
    for await (const entry of Deno.readDir(dir)) {
      if (entry.isFile || entry.isSymlink) names.push(entry.name);
    }
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new Deno.errors.NotFound(
        `Cannot read IDX files from ${dir}: no such folder`,
      );
    }
    throw e;
  }
  names.sort();
  const images = preferPlain(
    names.filter((n) => IMAGES.test(n) && inSplit(n, split)),
  );
  const listing = names.length === 0
    ? "an empty folder"
    : names.slice(0, 8).join(", ") + (names.length > 8 ? ", ..." : "");
  if (images.length !== 1) {
    throw new Deno.errors.NotFound(
      `Cannot read IDX files from ${dir}: ${
        images.length === 0 ? "no" : "several"
      } ${split} images files (got ${
        images.length === 0 ? listing : images.join(", ")
      }, expected one named like ${
        split === "train" ? "train" : "t10k"
      }-images-idx3-ubyte[.gz]; put one dataset per folder)`,
    );
  }
  const prefix = IMAGES.exec(images[0])![1];
  const labels = preferPlain(
    names.filter((n) => {
      const m = LABELS.exec(n);
      return m !== null && m[1] === prefix;
    }),
  );
  if (labels.length !== 1) {
    throw new Deno.errors.NotFound(
      `Cannot read IDX files from ${dir}: ${
        labels.length === 0 ? "no" : "several"
      } labels files for ${images[0]} (got ${
        labels.length === 0 ? listing : labels.join(", ")
      }, expected one named ${prefix}labels-idx1-ubyte[.gz])`,
    );
  }
  const imagesPath = join(dir, images[0]);
  const labelsPath = join(dir, labels[0]);
  const [imageIdx, labelIdx] = await Promise.all([
    readIdxFile(imagesPath, { rank: 3 }),
    readIdxFile(labelsPath),
  ]);
  return imageDatasetFromIdx(imageIdx, labelIdx, {
    name: options.name ?? basename(resolve(dir)),
    images: imagesPath,
    labels: labelsPath,
  });
}
