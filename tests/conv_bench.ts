/**
 * Convolution kernels on the wasm backend, one core: the UNet's 3 x 3,
 * stride-1 convolutions at base 64, batch 16 (forward) and 64 (weight
 * gradient), XNNPACK's direct convolution against ddpm's Winograd, and
 * ddpm's direct weight-gradient kernel against its Winograd one.
 *
 * Run with `deno bench -A tests/conv_bench.ts`; GFLOP/s = 2 N H W Cin Cout
 * 9 / time (the direct convolution's count, for both).
 *
 * @module
 */
import { initBackend, tf } from "../core/backend.ts";
import {
  wasmConv3x3,
  wasmConv3x3FilterGrad,
  wasmKernelsReady,
} from "../core/_wasm_kernels.ts";

await initBackend("wasm");

/** [N, H, W, Cin, Cout]: the UNet's levels at base 64 on 32 x 32 images. */
const SHAPES: [number, number, number, number, number][] = [
  [16, 32, 32, 64, 64],
  [16, 16, 16, 128, 128],
  [16, 8, 8, 256, 256],
];

if (wasmKernelsReady()) {
  for (const [n, h, w, ci, co] of SHAPES) {
    const x = tf.randomNormal([n, h, w, ci], 0, 1, "float32", 1) as tf.Tensor4D;
    const k = tf.randomNormal(
      [3, 3, ci, co],
      0,
      1,
      "float32",
      2,
    ) as tf.Tensor4D;
    const group = `conv 3x3 [${n}, ${h}, ${w}, ${ci}] -> ${co}`;
    Deno.bench({
      name: `${group}: XNNPACK direct`,
      group,
      baseline: true,
      fn: () => tf.conv2d(x, k, 1, "same").dispose(),
    });
    Deno.bench({
      name: `${group}: ddpm Winograd F(2x2, 3x3)`,
      group,
      fn: () => wasmConv3x3(x, k)!.dispose(),
    });
  }
  for (const [, h, w, ci, co] of SHAPES) {
    const n = 64;
    const x = tf.randomNormal([n, h, w, ci], 0, 1, "float32", 3) as tf.Tensor4D;
    const dy = tf.randomNormal(
      [n, h, w, co],
      0,
      1,
      "float32",
      4,
    ) as tf.Tensor4D;
    const group = `weight gradient 3x3 [${n}, ${h}, ${w}, ${ci}] -> ${co}`;
    Deno.bench({
      name: `${group}: ddpm direct`,
      group,
      baseline: true,
      fn: () =>
        tf.tidy(() =>
          tf.engine().runKernel("DdpmFilterGrad", {
            x: tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]),
            dy: tf.pad(dy, [[0, 0], [0, 2], [0, 2], [0, 0]]),
          }, { kh: 3, kw: 3 }) as tf.Tensor
        ).dispose(),
    });
    Deno.bench({
      name: `${group}: ddpm Winograd F(3x3, 2x2)`,
      group,
      fn: () => wasmConv3x3FilterGrad(x, dy).dispose(),
    });
  }
}
