import assert from "node:assert/strict";
import { decode } from "fast-png";
import { initBackend, tf } from "../mod.ts";
import { encodePng, imagesToGrid, plotCurve, writePng } from "../core/image.ts";

await initBackend("cpu");

Deno.test("imagesToGrid maps [-1, 1] to bytes and places images as make_grid does", async () => {
  // image k has the constant value v_k; 3 images, 2 per row, padding 1
  const vals = [-1, 0, 1];
  const x = tf.tidy(() =>
    tf.concat(vals.map((v) => tf.fill([1, 2, 3, 1], v))) as tf.Tensor4D
  );
  const g = await imagesToGrid(x, { nrow: 2, padding: 1, padValue: 7 });
  assert.equal(g.width, 2 * (3 + 1) + 1);
  assert.equal(g.height, 2 * (2 + 1) + 1);
  const at = (x: number, y: number) => g.data[y * g.width + x];
  assert.equal(at(0, 0), 7); // padding
  assert.equal(at(1, 1), 0); // image 0: -1 -> 0
  assert.equal(at(5, 2), 128); // image 1: 0 -> round(127.5) = 128
  assert.equal(at(1, 4), 255); // image 2 (second row): 1 -> 255
  assert.equal(at(5, 4), 7); // empty cell stays padding
  x.dispose();
});

Deno.test("imagesToGrid clamps out-of-range values and rejects bad shapes", async () => {
  const x = tf.tensor4d([-3, 3], [1, 1, 2, 1]);
  const g = await imagesToGrid(x, { padding: 0 });
  assert.deepEqual(Array.from(g.data), [0, 255]);
  const bad = tf.zeros([1, 2, 2, 2]) as tf.Tensor4D;
  await assert.rejects(
    () => imagesToGrid(bad),
    /expected NHWC with 1 or 3 channels \(got shape \[1,2,2,2\]\)/,
  );
  tf.dispose([x, bad]);
});

Deno.test("encodePng output decodes back to the same pixels", () => {
  const data = new Uint8Array([
    0,
    10,
    20,
    30,
    40,
    50,
    60,
    70,
    80,
    90,
    100,
    110,
  ]);
  const png = decode(encodePng({ width: 2, height: 2, channels: 3, data }));
  assert.equal(png.width, 2);
  assert.equal(png.channels, 3);
  assert.deepEqual(Array.from(png.data), Array.from(data));
});

Deno.test("writePng writes the whole file and leaves no temporary behind", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/grid.png`;
  await writePng(path, plotCurve([3, 2, 1], { width: 20, height: 10 }));
  assert.equal(decode(await Deno.readFile(path)).width, 20);
  assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["grid.png"]);
  await assert.rejects(() =>
    writePng(`${dir}/missing/grid.png`, plotCurve([1]))
  );
  assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["grid.png"]);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("plotCurve draws a falling series from top left to bottom right", () => {
  const r = plotCurve([100, 10, 1], { width: 30, height: 20 });
  const col = (x: number) =>
    [...Array(20).keys()].filter((y) => r.data[y * 30 + x] === 0);
  assert.deepEqual(col(4), [4]); // first point at the top margin
  assert.deepEqual(col(25), [15]); // last point at the bottom margin
});
