/**
 * The downloader for real, against a loopback HTTP server (Deno.serve on
 * 127.0.0.1, port 0) serving gzipped IDX files that these tests write. The
 * cache is always a temporary folder; nothing leaves the machine.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { DownloadError, type DownloadProgress } from "../data/download.ts";
import { defaultCacheDir, loadDataset } from "../data/mnist.ts";
import { gzip, idx } from "./_util.ts";

/** SHA-256 through Web Crypto: a second implementation beside the code's node:crypto. */
async function sha256(bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest(
    "SHA-256",
    bytes as Uint8Array<ArrayBuffer>,
  );
  return Array.from(
    new Uint8Array(digest),
    (b) => b.toString(16).padStart(2, "0"),
  ).join("");
}

const md5 = (bytes: Uint8Array): string =>
  createHash("md5").update(bytes).digest("hex");

const IMAGES = "train-images-idx3-ubyte.gz";
const LABELS = "train-labels-idx1-ubyte.gz";

// Three 2x2 images with pixels 10*i + p, labels 7 8 9.
const IMAGE_PIXELS = [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23];
const imagesGz = await gzip(idx(0x08, [3, 2, 2], IMAGE_PIXELS));
const labelsGz = await gzip(idx(0x08, [3], [7, 8, 9]));
const truncatedImagesGz = imagesGz.subarray(0, imagesGz.length - 5);

/** Checksums of the files the server serves from /good/. */
const CHECKSUMS = {
  [IMAGES]: await sha256(imagesGz),
  [LABELS]: md5(labelsGz),
};

interface Server {
  base: string;
  requests: string[];
  close(): Promise<void>;
}

/** /good/ serves the files; /missing/ answers 404; /trunc/ serves the images cut short. */
function serve(): Server {
  const requests: string[] = [];
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    (request) => {
      const path = new URL(request.url).pathname;
      requests.push(path);
      const [, dir, file] = path.split("/");
      const body = dir === "good"
        ? { [IMAGES]: imagesGz, [LABELS]: labelsGz }[file]
        : dir === "trunc"
        ? { [IMAGES]: truncatedImagesGz, [LABELS]: labelsGz }[file]
        : undefined;
      if (body === undefined) {
        return new Response("not here", {
          status: 404,
          statusText: "Not Found",
        });
      }
      return new Response(body as Uint8Array<ArrayBuffer>, {
        headers: { "content-type": "application/gzip" },
      });
    },
  );
  return {
    base: `http://127.0.0.1:${server.addr.port}`,
    requests,
    close: () => server.shutdown(),
  };
}

/** A port with nothing listening: bind one, note it, release it. */
function closedPort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  try {
    for await (const entry of Deno.readDir(dir)) {
      const path = join(dir, entry.name);
      if (entry.isDirectory) out.push(...await filesUnder(path));
      else out.push(path);
    }
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
  return out.sort();
}

async function withCache(
  fn: (cacheDir: string) => Promise<void>,
): Promise<void> {
  const cacheDir = await Deno.makeTempDir({ prefix: "ddpm_cache_test_" });
  try {
    await fn(cacheDir);
  } finally {
    await Deno.remove(cacheDir, { recursive: true });
  }
}

Deno.test("loadDataset downloads, verifies, caches and parses MNIST-style files", async () => {
  const server = serve();
  try {
    await withCache(async (cacheDir) => {
      const progress: DownloadProgress[] = [];
      const { dataset, warning } = await loadDataset({
        name: "mnist",
        cacheDir,
        mirrors: [`${server.base}/good/`],
        checksums: CHECKSUMS,
        onProgress: (p) => progress.push({ ...p }),
      });
      assert.equal(warning, null);
      assert.equal(dataset.name, "mnist");
      assert.equal(dataset.count, 3);
      assert.equal(dataset.height, 2);
      assert.equal(dataset.width, 2);
      assert.deepEqual(Array.from(dataset.images), IMAGE_PIXELS);
      assert.deepEqual(Array.from(dataset.labels), [7, 8, 9]);
      // The cache holds exactly the two verified .gz files, byte for byte.
      assert.deepEqual(await filesUnder(cacheDir), [
        join(cacheDir, "mnist", IMAGES),
        join(cacheDir, "mnist", LABELS),
      ]);
      assert.deepEqual(
        await Deno.readFile(join(cacheDir, "mnist", IMAGES)),
        imagesGz,
      );
      // Progress ends with all bytes counted, for each file.
      const last = progress.filter((p) => p.done && p.file === IMAGES).at(-1)!;
      assert.equal(last.received, imagesGz.length);
      assert.equal(last.total, imagesGz.length);
      assert.equal(last.url, `${server.base}/good/${IMAGES}`);

      // A second load comes from the cache: no request, even with dead mirrors.
      server.requests.length = 0;
      const again = await loadDataset({
        name: "mnist",
        cacheDir,
        mirrors: [`http://127.0.0.1:${closedPort()}/`],
        checksums: CHECKSUMS,
      });
      assert.deepEqual(Array.from(again.dataset.labels), [7, 8, 9]);
      assert.deepEqual(server.requests, []);
    });
  } finally {
    await server.close();
  }
});

Deno.test("a 404 on the first mirror falls through to the second", async () => {
  const server = serve();
  try {
    await withCache(async (cacheDir) => {
      const { dataset } = await loadDataset({
        name: "mnist",
        cacheDir,
        mirrors: [`${server.base}/missing/`, `${server.base}/good`],
        checksums: CHECKSUMS,
      });
      assert.deepEqual(Array.from(dataset.labels), [7, 8, 9]);
      assert.deepEqual(server.requests, [
        `/missing/${IMAGES}`,
        `/good/${IMAGES}`,
        `/missing/${LABELS}`,
        `/good/${LABELS}`,
      ]);
    });
  } finally {
    await server.close();
  }
});

/** Run a load that must fail; check the message and that the cache holds no file. */
async function failsCleanly(
  mirrors: string[],
  checksums: Record<string, string>,
  expected: RegExp,
): Promise<DownloadError> {
  let error: unknown;
  await withCache(async (cacheDir) => {
    try {
      await loadDataset({
        name: "mnist",
        cacheDir,
        mirrors,
        checksums,
        fallback: false,
      });
    } catch (e) {
      error = e;
    }
    assert.deepEqual(await filesUnder(cacheDir), []);
  });
  assert.ok(error instanceof DownloadError, `not a DownloadError: ${error}`);
  assert.match(error.message, expected);
  assert.ok(!error.message.includes("\n"));
  return error;
}

Deno.test("a truncated gzip fails, names the URL and leaves no file in the cache", async () => {
  const server = serve();
  try {
    // The checksum is the truncated file's own, so only the gzip check can catch it.
    const url = `${server.base}/trunc/${IMAGES}`;
    const e = await failsCleanly(
      [`${server.base}/trunc/`],
      { ...CHECKSUMS, [IMAGES]: md5(truncatedImagesGz) },
      new RegExp(
        `^Cannot download ${IMAGES}: ${url} failed \\(truncated or corrupt gzip`,
      ),
    );
    assert.equal(e.unreachable, false);
    assert.equal(e.attempts[0].kind, "integrity");
  } finally {
    await server.close();
  }
});

Deno.test("a checksum mismatch fails, names the URL and both digests, and leaves no file", async () => {
  const server = serve();
  try {
    const wrong = "0".repeat(64);
    const url = `${server.base}/good/${IMAGES}`;
    const e = await failsCleanly(
      [`${server.base}/good/`],
      { ...CHECKSUMS, [IMAGES]: wrong },
      new RegExp(
        `${url} failed \\(checksum mismatch \\(got sha256 ${
          CHECKSUMS[IMAGES]
        }, expected ${wrong}\\)\\)`,
      ),
    );
    assert.equal(e.unreachable, false);
  } finally {
    await server.close();
  }
});

Deno.test("a connection refused fails, names the URL, and leaves no file", async () => {
  const base = `http://127.0.0.1:${closedPort()}`;
  const e = await failsCleanly(
    [`${base}/`],
    CHECKSUMS,
    new RegExp(`${base}/${IMAGES} failed \\(connection refused\\)`),
  );
  assert.equal(e.unreachable, true);
  assert.equal(e.attempts[0].kind, "network");
});

Deno.test("when every mirror fails the message lists each URL and why", async () => {
  const server = serve();
  try {
    const refused = `http://127.0.0.1:${closedPort()}`;
    const e = await failsCleanly(
      [`${server.base}/missing/`, `${refused}/`],
      CHECKSUMS,
      new RegExp(
        `${server.base}/missing/${IMAGES} failed \\(HTTP 404 Not Found\\); ${refused}/${IMAGES} failed \\(connection refused\\)`,
      ),
    );
    assert.deepEqual(e.attempts.map((a) => a.kind), ["http", "network"]);
    assert.equal(e.unreachable, true);
  } finally {
    await server.close();
  }
});

Deno.test("a corrupt cached file is not trusted: it is downloaded again", async () => {
  const server = serve();
  try {
    await withCache(async (cacheDir) => {
      await Deno.mkdir(join(cacheDir, "mnist"));
      await Deno.writeFile(
        join(cacheDir, "mnist", IMAGES),
        imagesGz.subarray(0, 10),
      );
      const { dataset } = await loadDataset({
        name: "mnist",
        cacheDir,
        mirrors: [`${server.base}/good/`],
        checksums: CHECKSUMS,
      });
      assert.deepEqual(Array.from(dataset.images), IMAGE_PIXELS);
      assert.deepEqual(server.requests, [`/good/${IMAGES}`, `/good/${LABELS}`]);
      assert.deepEqual(
        await Deno.readFile(join(cacheDir, "mnist", IMAGES)),
        imagesGz,
      );
    });
  } finally {
    await server.close();
  }
});

Deno.test("without a network MNIST falls back to mnist-lite with a one-line warning", async () => {
  await withCache(async (cacheDir) => {
    const base = `http://127.0.0.1:${closedPort()}`;
    const { dataset, warning } = await loadDataset({
      name: "mnist",
      cacheDir,
      mirrors: [`${base}/`],
    });
    assert.equal(dataset.name, "mnist-lite");
    assert.equal(dataset.count, 10000);
    assert.ok(warning !== null);
    assert.ok(!warning.includes("\n"));
    assert.match(
      warning,
      /Cannot download MNIST .*connection refused.*mnist-lite/,
    );
    assert.deepEqual(await filesUnder(cacheDir), []);
  });
});

Deno.test("fallback: false, Fashion-MNIST, and corrupt data never fall back to mnist-lite", async () => {
  const base = `http://127.0.0.1:${closedPort()}`;
  await withCache(async (cacheDir) => {
    await assert.rejects(
      () =>
        loadDataset({
          name: "mnist",
          cacheDir,
          mirrors: [`${base}/`],
          fallback: false,
        }),
      DownloadError,
    );
    await assert.rejects(
      () =>
        loadDataset({ name: "fashion-mnist", cacheDir, mirrors: [`${base}/`] }),
      (e: unknown) =>
        e instanceof DownloadError &&
        e.message.includes(`${base}/train-images-idx3-ubyte.gz`),
    );
  });
  const server = serve();
  try {
    await withCache(async (cacheDir) => {
      await assert.rejects(
        () =>
          loadDataset({
            name: "mnist",
            cacheDir,
            mirrors: [`${server.base}/good/`],
            checksums: { ...CHECKSUMS, [IMAGES]: "1".repeat(32) },
          }),
        /checksum mismatch/,
      );
    });
  } finally {
    await server.close();
  }
});

Deno.test("the default cache is $XDG_CACHE_HOME/ddpm, else ~/.cache/ddpm", () => {
  const saved = {
    xdg: Deno.env.get("XDG_CACHE_HOME"),
    home: Deno.env.get("HOME"),
  };
  try {
    Deno.env.set("XDG_CACHE_HOME", "/tmp/xdg-test");
    assert.equal(defaultCacheDir(), join("/tmp/xdg-test", "ddpm"));
    Deno.env.delete("XDG_CACHE_HOME");
    Deno.env.set("HOME", "/tmp/home-test");
    if (Deno.build.os !== "windows") {
      assert.equal(defaultCacheDir(), join("/tmp/home-test", ".cache", "ddpm"));
    }
  } finally {
    for (
      const [name, value] of [["XDG_CACHE_HOME", saved.xdg], [
        "HOME",
        saved.home,
      ]]
    ) {
      if (value === undefined) Deno.env.delete(name!);
      else Deno.env.set(name!, value);
    }
  }
});

Deno.test("loadDataset rejects unknown names and splits, and mnist-lite's test split", async () => {
  await assert.rejects(
    // deno-lint-ignore no-explicit-any
    () => loadDataset({ name: "cifar" as any }),
    (e: unknown) => e instanceof RangeError && /got "cifar"/.test(e.message),
  );
  await assert.rejects(
    // deno-lint-ignore no-explicit-any
    () => loadDataset({ name: "mnist-lite", split: "val" as any }),
    RangeError,
  );
  await assert.rejects(
    () => loadDataset({ name: "mnist-lite", split: "test" }),
    /only a train split/,
  );
});

Deno.test("a connection cut mid-body fails, names the URL, and leaves no file", async () => {
  // A raw TCP server announces the whole file but sends half of it, then closes.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const served = (async () => {
    for await (const conn of listener) {
      await conn.read(new Uint8Array(4096));
      const head = new TextEncoder().encode(
        `HTTP/1.1 200 OK\r\ncontent-length: ${imagesGz.length}\r\nconnection: close\r\n\r\n`,
      );
      await conn.write(head);
      await conn.write(imagesGz.subarray(0, imagesGz.length >> 1));
      conn.close();
    }
  })();
  try {
    const url = `http://127.0.0.1:${port}/${IMAGES}`;
    const e = await failsCleanly(
      [`http://127.0.0.1:${port}/`],
      CHECKSUMS,
      new RegExp(`${url} failed \\((connection lost|truncated download)`),
    );
    assert.equal(e.attempts[0].kind, "integrity");
  } finally {
    listener.close();
    await served.catch(() => {});
  }
});

Deno.test("a server that never answers times out, names the URL, and leaves no file", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const held: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) held.push(conn);
  })();
  try {
    let error: unknown;
    await withCache(async (cacheDir) => {
      try {
        await loadDataset({
          name: "mnist",
          cacheDir,
          mirrors: [`http://127.0.0.1:${port}/`],
          fallback: false,
          timeoutMs: 200,
        });
      } catch (e) {
        error = e;
      }
      assert.deepEqual(await filesUnder(cacheDir), []);
    });
    assert.ok(error instanceof DownloadError);
    assert.match(
      error.message,
      new RegExp(
        `http://127.0.0.1:${port}/${IMAGES} failed \\(timed out: no response for 0.2 s\\)`,
      ),
    );
    assert.equal(error.unreachable, true);
  } finally {
    listener.close();
    await accepting.catch(() => {});
    for (const conn of held) conn.close();
  }
});
