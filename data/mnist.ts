/**
 * MNIST and Fashion-MNIST: download once, verify, cache, load; with the
 * bundled `mnist-lite` digits as the offline fallback.
 *
 * The cache is `$XDG_CACHE_HOME/ddpm` when that variable is set, else
 * `~/.cache/ddpm` (`%LOCALAPPDATA%\ddpm` on Windows), with one folder per
 * dataset holding the `.gz` files exactly as published, so they are checked
 * against the published MD5 each time they are used.
 *
 * @module
 */
import { join } from "node:path";
import { type ImageDataset, imageDatasetFromIdx } from "./dataset.ts";
import {
  DownloadError,
  downloadFile,
  type DownloadProgress,
} from "./download.ts";
import { readIdxFile } from "./idx.ts";
import { loadIdxDir } from "./idx_dir.ts";
import { loadMnistLite, MNIST_LITE_PACKAGE } from "./mnist_lite.ts";

/** The datasets {@linkcode loadDataset} knows by name. */
export type DatasetName = "mnist" | "fashion-mnist" | "mnist-lite";

/** A dataset's train or test split. */
export type Split = "train" | "test";

/** Where a downloadable dataset lives and what its files must hash to. */
export interface RemoteDataset {
  /** The dataset's name. */
  name: "mnist" | "fashion-mnist";
  /** Base URLs, tried in order. */
  mirrors: readonly string[];
  /** The images and labels file of each split. */
  files: Readonly<Record<Split, { images: string; labels: string }>>;
  /** The published MD5 of each `.gz` file. */
  md5: Readonly<Record<string, string>>;
}

/** The file names MNIST and Fashion-MNIST share (Fashion-MNIST was made a drop-in replacement). */
const IDX_GZ_FILES: RemoteDataset["files"] = {
  train: {
    images: "train-images-idx3-ubyte.gz",
    labels: "train-labels-idx1-ubyte.gz",
  },
  test: {
    images: "t10k-images-idx3-ubyte.gz",
    labels: "t10k-labels-idx1-ubyte.gz",
  },
};

/**
 * The downloadable datasets: mirrors and published checksums.
 *
 * MNIST MD5s: torchvision `torchvision/datasets/mnist.py`, class `MNIST`,
 * `resources` (github.com/pytorch/vision). Fashion-MNIST MD5s: the table in
 * the authors' README (github.com/zalandoresearch/fashion-mnist, "Get the
 * Data"), the same values as torchvision's `FashionMNIST.resources`. Mirrors:
 * torchvision's (ossci-datasets S3 and yann.lecun.com, which now often
 * refuses plain downloads, so it comes last), Google's CVDF mirror that
 * TensorFlow's examples use, and for Fashion-MNIST the authors' S3 website
 * and their GitHub repository's `data/fashion` folder.
 *
 * @example
 * ```ts
 * import { DATASETS } from "./mnist.ts";
 * console.log(DATASETS.mnist.md5["train-labels-idx1-ubyte.gz"]);
 * // d53e105ee54ea40749a09fcbcd1e9432
 * ```
 */
export const DATASETS: Readonly<
  Record<"mnist" | "fashion-mnist", RemoteDataset>
> = {
  "mnist": {
    name: "mnist",
    mirrors: [
      "https://ossci-datasets.s3.amazonaws.com/mnist/",
      "https://storage.googleapis.com/cvdf-datasets/mnist/",
      "http://yann.lecun.com/exdb/mnist/",
    ],
    files: IDX_GZ_FILES,
    md5: {
      "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
      "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
      "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
      "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
  },
  "fashion-mnist": {
    name: "fashion-mnist",
    mirrors: [
      "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ],
    files: IDX_GZ_FILES,
    md5: {
      "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
      "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
      "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
      "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
  },
};

/**
 * The folder downloads are cached in: `$XDG_CACHE_HOME/ddpm`, else
 * `$HOME/.cache/ddpm` (`%LOCALAPPDATA%\ddpm` on Windows).
 *
 * @returns The folder's path (it may not exist yet).
 * @throws {Error} When none of those variables is set.
 * @example
 * ```ts
 * import { defaultCacheDir } from "./mnist.ts";
 * console.log(defaultCacheDir().endsWith("ddpm")); // true
 * ```
 */
export function defaultCacheDir(): string {
  const xdg = Deno.env.get("XDG_CACHE_HOME");
  if (xdg) return join(xdg, "ddpm");
  if (Deno.build.os === "windows") {
    const local = Deno.env.get("LOCALAPPDATA");
    if (local) return join(local, "ddpm");
  }
  const home = Deno.env.get("HOME") ?? Deno.env.get("USERPROFILE");
  if (home) return join(home, ".cache", "ddpm");
  throw new Error(
    "Cannot find a cache folder: XDG_CACHE_HOME and HOME are unset (pass cacheDir)",
  );
}

/** Options for {@linkcode loadDataset}. */
export interface LoadDatasetOptions {
  /** "mnist" (default), "fashion-mnist" or "mnist-lite". Ignored with `dataDir`. */
  name?: DatasetName;
  /** "train" (default) or "test"; mnist-lite has only "train". */
  split?: Split;
  /** The cache folder; {@linkcode defaultCacheDir} by default. */
  cacheDir?: string;
  /** Base URLs to download from instead of the dataset's own mirrors (`--mirror`). */
  mirrors?: readonly string[];
  /** Expected hex digests by file name, replacing the published MD5s. */
  checksums?: Readonly<Record<string, string>>;
  /** Read IDX files (plain or .gz) from this folder instead of downloading (`--data-dir`). */
  dataDir?: string;
  /**
   * Continue with mnist-lite when MNIST cannot be downloaded for want of a
   * network (no mirror delivered any data); true by default (`--no-fallback`
   * sets it false). Corrupt downloads always fail.
   */
  fallback?: boolean;
  /** Called as bytes arrive; the library itself prints nothing. */
  onProgress?: (progress: DownloadProgress) => void;
  /** Give up on a mirror after this long without data; 15000 ms by default. */
  timeoutMs?: number;
}

/** What {@linkcode loadDataset} got. */
export interface LoadedDataset {
  /** The images and labels. */
  dataset: ImageDataset;
  /** One line to show the user when the data is not what was asked for, else null. */
  warning: string | null;
}

/**
 * Load a dataset by name: from `dataDir`, from the cache, by download, or
 * from the bundled mnist-lite digits.
 *
 * @param options The dataset, split, cache folder, mirrors and fallback.
 * @returns The dataset, and a one-line warning when it fell back to mnist-lite.
 * @throws {DownloadError} When a download fails and no fallback applies.
 * @throws {IdxFormatError} When a file is malformed.
 * @throws {RangeError} On an unknown dataset name or split.
 * @example
 * ```ts
 * import { loadDataset } from "./mnist.ts";
 * const { dataset, warning } = await loadDataset({ name: "mnist-lite" });
 * console.log(dataset.count, warning); // 10000 null
 * ```
 */
export async function loadDataset(
  options: LoadDatasetOptions = {},
): Promise<LoadedDataset> {
  const name = options.name ?? "mnist";
  const split = options.split ?? "train";
  if (split !== "train" && split !== "test") {
    throw new RangeError(
      `Cannot load dataset: unknown split (got "${split}", expected train or test)`,
    );
  }
  if (options.dataDir !== undefined) {
    return {
      dataset: await loadIdxDir(options.dataDir, { split }),
      warning: null,
    };
  }
  if (name === "mnist-lite") {
    if (split !== "train") {
      throw new RangeError(
        `Cannot load dataset mnist-lite: it has only a train split (got "${split}", expected train)`,
      );
    }
    return { dataset: await loadMnistLite(), warning: null };
  }
  const remote = DATASETS[name as "mnist" | "fashion-mnist"];
  if (remote === undefined) {
    throw new RangeError(
      `Cannot load dataset: unknown name (got "${name}", expected mnist, fashion-mnist or mnist-lite)`,
    );
  }
  try {
    return { dataset: await loadRemote(remote, split, options), warning: null };
  } catch (e) {
    const canFallBack = e instanceof DownloadError && e.unreachable &&
      name === "mnist" && split === "train" && options.fallback !== false;
    if (!canFallBack) throw e;
    const reasons = [...new Set(e.attempts.map((a) => a.reason))].join(", ");
    const warning =
      `Cannot download MNIST (${e.file} from ${e.attempts.length} mirror${
        e.attempts.length === 1 ? "" : "s"
      }: ${reasons}); continuing with mnist-lite, the 10,000 digits bundled in ${MNIST_LITE_PACKAGE}`;
    return { dataset: await loadMnistLite(), warning };
  }
}

async function loadRemote(
  remote: RemoteDataset,
  split: Split,
  options: LoadDatasetOptions,
): Promise<ImageDataset> {
  const dir = join(options.cacheDir ?? defaultCacheDir(), remote.name);
  const files = remote.files[split];
  const paths: string[] = [];
  for (const file of [files.images, files.labels]) {
    paths.push(
      await downloadFile(file, {
        mirrors: options.mirrors ?? remote.mirrors,
        dir,
        checksum: options.checksums?.[file] ?? remote.md5[file],
        onProgress: options.onProgress,
        timeoutMs: options.timeoutMs,
      }),
    );
  }
  const [images, labels] = await Promise.all([
    readIdxFile(paths[0], { rank: 3 }),
    readIdxFile(paths[1], { rank: 1 }),
  ]);
  return imageDatasetFromIdx(images, labels, {
    name: remote.name,
    images: paths[0],
    labels: paths[1],
  });
}
