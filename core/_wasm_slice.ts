/**
 * Slicing on the wasm backend without a copy of the whole input: tfjs's
 * wasm `Slice` first reads its input out of the heap into a fresh array
 * (`readSync`), so cutting one 3x3 tap out of a 256 x 256 kernel copies
 * the whole kernel, and splitting a skip connection's channels took 59 ms
 * where a copy of the tensor takes 3 (on the 2-core development machine).
 * ddpm's `Slice`, and the `SplitV` and `Unpack` built on it, copy each
 * contiguous run of the output once, heap to heap (`copyWithin`).
 *
 * Registered in place of tfjs's wasm kernels when imported; strings, and
 * DDPM_WASM_KERNELS=0, go to tfjs's own.
 *
 * @module
 */
import { tf } from "./backend.ts";

/**
 * DDPM_WASM_KERNELS=0: tfjs's own ops instead of ddpm's wasm kernels (to
 * compare, or to rule them out).
 *
 * @returns True when switched off.
 */
export function wasmKernelsSwitchedOff(): boolean {
  try {
    return globalThis.Deno?.env.get("DDPM_WASM_KERNELS") === "0";
  } catch {
    return false; // no --allow-env
  }
}

/** What ddpm's wasm code uses of tfjs's wasm backend. */
export interface WasmBackendLike {
  wasm: {
    /** The heap, as bytes (a fresh view after the memory grows). */
    HEAPU8: Uint8Array;
    /** The memory of tfjs's threaded build. */
    wasmMemory?: WebAssembly.Memory;
    /** The exports of its single-threaded build, memory among them. */
    asm?: { memory?: WebAssembly.Memory };
  };
  dataIdMap: { get(dataId: object): { memoryOffset: number } };
  makeOutput(shape: number[], dtype: tf.DataType): tf.TensorInfo;
  disposeData(dataId: object): boolean;
}

/**
 * Where a tensor's data starts in the wasm heap.
 *
 * @param b The wasm backend.
 * @param t A tensor on it.
 * @returns Its byte offset.
 */
export function heapOffset(b: WasmBackendLike, t: tf.TensorInfo): number {
  return b.dataIdMap.get(t.dataId).memoryOffset;
}

/**
 * Copy `x[begin : begin + size]` into a new tensor: the output's dims from
 * the innermost one not taken whole inwards are one contiguous run of the
 * input, copied with one `copyWithin` per index of the dims outside it.
 *
 * @param b The wasm backend.
 * @param x The input (not a string tensor).
 * @param begin Start per dim (normalised).
 * @param size Extent per dim (normalised, no -1).
 * @returns The output's tensor info.
 */
export function sliceHeap(
  b: WasmBackendLike,
  x: tf.TensorInfo,
  begin: number[],
  size: number[],
): tf.TensorInfo {
  const out = b.makeOutput(size, x.dtype);
  if (size.reduce((p, s) => p * s, 1) === 0) return out;
  const bpe = x.dtype === "bool" ? 1 : 4;
  const shape = x.shape; // rank >= 1: tfjs does not slice scalars
  const rank = shape.length;
  const strides = new Array<number>(rank).fill(1);
  for (let d = rank - 2; d >= 0; d--) {
    strides[d] = strides[d + 1] * shape[d + 1];
  }
  // Dims k+1.. are taken whole: a run is size[k] of dim k with all inside it.
  let k = rank - 1;
  while (k > 0 && size[k] === shape[k]) k--;
  const runBytes = size[k] * strides[k] * bpe;
  // The heap may have grown in makeOutput: read it afterwards.
  const heap = b.wasm.HEAPU8;
  const src0 = heapOffset(b, x);
  let dst = heapOffset(b, out);
  let start = 0;
  for (let d = 0; d <= k; d++) start += begin[d] * strides[d];
  // Odometer over dims 0..k-1.
  const idx = new Array<number>(k).fill(0);
  for (;;) {
    let off = start;
    for (let d = 0; d < k; d++) off += idx[d] * strides[d];
    const src = src0 + off * bpe;
    heap.copyWithin(dst, src, src + runBytes);
    dst += runBytes;
    let d = k - 1;
    while (d >= 0 && ++idx[d] === size[d]) idx[d--] = 0;
    if (d < 0) break;
  }
  return out;
}

/** tfjs's own wasm kernel, before ours replaces it. */
function original(name: string): tf.KernelFunc {
  return tf.getKernel(name, "wasm")!.kernelFunc as tf.KernelFunc;
}

const theirSlice = original("Slice");
const theirSplitV = original("SplitV");
const theirUnpack = original("Unpack");

/** Whether tfjs's own kernel should run (strings, or ours switched off). */
function theirs(x: tf.TensorInfo): boolean {
  return x.dtype === "string" || wasmKernelsSwitchedOff();
}

function replace(name: string, kernelFunc: tf.KernelFunc): void {
  tf.unregisterKernel(name, "wasm");
  tf.registerKernel({ kernelName: name, backendName: "wasm", kernelFunc });
}

/** ddpm's wasm `Slice`. */
export const sliceKernel: tf.KernelFunc = (args) => {
  const { x } = args.inputs as { x: tf.TensorInfo };
  if (theirs(x)) return theirSlice(args);
  const { begin, size } = args.attrs as unknown as {
    begin: number | number[];
    size: number | number[];
  };
  const [b, s] = tf.slice_util.parseSliceParams(x as tf.Tensor, begin, size);
  return sliceHeap(args.backend as unknown as WasmBackendLike, x, b, s);
};

replace("Slice", sliceKernel);

replace("SplitV", (args) => {
  const { x } = args.inputs as { x: tf.TensorInfo };
  if (theirs(x)) return theirSplitV(args);
  const { numOrSizeSplits, axis } = args.attrs as unknown as {
    numOrSizeSplits: number | number[];
    axis: number;
  };
  const a = tf.util.parseAxisParam(axis, x.shape)[0];
  const sizes = tf.backend_util.prepareSplitSize(
    x as tf.Tensor,
    numOrSizeSplits,
    a,
  );
  const begin = new Array<number>(x.shape.length).fill(0);
  return sizes.map((s) => {
    const size = [...x.shape];
    size[a] = s;
    const part = sliceHeap(
      args.backend as unknown as WasmBackendLike,
      x,
      begin,
      size,
    );
    begin[a] += s;
    return part;
  });
});

replace("Unpack", (args) => {
  const { value } = args.inputs as { value: tf.TensorInfo };
  if (theirs(value)) return theirUnpack(args);
  const rank = value.shape.length;
  let { axis } = args.attrs as unknown as { axis: number };
  if (axis < 0) axis += rank;
  const outShape = value.shape.filter((_, i) => i !== axis);
  const begin = new Array<number>(rank).fill(0);
  const size = [...value.shape];
  size[axis] = 1;
  return Array.from({ length: value.shape[axis] }, (_, i) => {
    begin[axis] = i;
    const part = sliceHeap(
      args.backend as unknown as WasmBackendLike,
      value,
      begin,
      size,
    );
    return { ...part, shape: outShape };
  });
});
