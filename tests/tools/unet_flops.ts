/**
 * Floating-point operations of the reference UNet, counted from its layer
 * list: 2 multiply-adds per weight use (convolutions, transposed
 * convolutions, linear layers), plus about 10 per element for each
 * GroupNorm + SiLU and 1 per element for each bias, skip and time add.
 * A training step is counted as three forward passes (forward, input
 * gradients, weight gradients), the usual convention.
 *
 * @module
 */
import type { UNetConfig } from "../../core/unet.ts";

/**
 * FLOPs of one UNet forward pass on one `size` x `size` image.
 *
 * @param config The UNet's hyper-parameters.
 * @param size Image side (divisible by 4); 32 by default.
 * @returns FLOPs per image.
 * @example
 * ```ts
 * import { unetForwardFlops } from "./unet_flops.ts";
 * const f = unetForwardFlops({ inChannels: 1, base: 64, timeDim: 256 });
 * console.log((f / 1e9).toFixed(2)); // 1.21 (GFLOP)
 * ```
 */
export function unetForwardFlops(config: UNetConfig, size = 32): number {
  const { inChannels: ch, base: b, timeDim: d } = config;
  let flops = 0;
  const conv = (res: number, k: number, cin: number, cout: number) => {
    flops += 2 * res * res * k * k * cin * cout + res * res * cout;
  };
  const norm = (res: number, c: number) => {
    flops += 10 * res * res * c;
  };
  const block = (res: number, cin: number, cout: number) => {
    norm(res, cin);
    conv(res, 3, cin, cout);
    flops += 2 * d * cout + res * res * cout; // time_proj and its add
    norm(res, cout);
    conv(res, 3, cout, cout);
    if (cin !== cout) conv(res, 1, cin, cout);
    flops += res * res * cout; // residual add
  };
  const r1 = size;
  const r2 = size / 2;
  const r3 = size / 4;
  flops += 2 * 2 * d * d; // time MLP
  conv(r1, 3, ch, b); // in_conv
  block(r1, b, b); // down1
  conv(r2, 3, b, b); // ds1 (stride 2: output resolution)
  block(r2, b, 2 * b); // down2
  conv(r3, 3, 2 * b, 2 * b); // ds2
  block(r3, 2 * b, 4 * b); // mid1
  block(r3, 4 * b, 4 * b); // mid2
  // Transposed 4x4 stride 2: every input pixel meets 16 taps.
  flops += 2 * r3 * r3 * 16 * 4 * b * 2 * b; // us2
  block(r2, 4 * b, 2 * b); // up2
  flops += 2 * r2 * r2 * 16 * 2 * b * b; // us1
  block(r1, 2 * b, b); // up1
  norm(r1, b);
  conv(r1, 3, b, ch); // out_conv
  return flops;
}

/**
 * FLOPs of one training step per image: three forward passes.
 *
 * @param config The UNet's hyper-parameters.
 * @param size Image side; 32 by default.
 * @returns FLOPs per image.
 * @example
 * ```ts
 * import { unetForwardFlops, unetTrainFlops } from "./unet_flops.ts";
 * const c = { inChannels: 1, base: 32, timeDim: 128 };
 * console.log(unetTrainFlops(c) === 3 * unetForwardFlops(c)); // true
 * ```
 */
export function unetTrainFlops(config: UNetConfig, size = 32): number {
  return 3 * unetForwardFlops(config, size);
}
