/**
 * Exponential moving average (EMA) of model parameters, as diffusers' `EMAModel`.
 *
 * Notation:
 *
 * | code                 | diffusers `EMAModel`             | meaning                         |
 * |----------------------|----------------------------------|---------------------------------|
 * | `decay`              | `decay`                          | the largest decay used          |
 * | `minDecay`           | `min_decay`                      | the smallest decay used         |
 * | `updateAfterStep`    | `update_after_step`              | updates that only copy          |
 * | `invGamma`, `power`  | `inv_gamma`, `power`             | warm-up shape                   |
 * | `optimizationStep` n | `optimization_step`              | updates taken, this one counted |
 * | k                    | `step`                           | max(0, n - updateAfterStep - 1) |
 *
 * One update with decay d: ema = ema - (1 - d)(ema - p).
 *
 * The decay d at update n, by {@linkcode EmaDecayMode}:
 *
 * - `"constant"` (the default, the reference's `ema.mul_(0.9999).add_(p, alpha=1e-4)`):
 *   d = decay from the first update on; d = 0 (copy) for the first
 *   `updateAfterStep` updates.
 * - `"warmup"` (diffusers with `use_ema_warmup=True`): d = 0 while k = 0,
 *   else d = 1 - (1 + k / invGamma)^-power.
 * - `"ramp"` (diffusers' default, `use_ema_warmup=False`): d = 0 while k = 0,
 *   else d = (1 + k) / (10 + k).
 *
 * In the last two, d is then capped at `decay` and floored at `minDecay`,
 * exactly as diffusers' `get_decay`; in `"constant"` mode it is floored at
 * `minDecay` too (which only matters if minDecay > decay).
 *
 * On WebGPU each tensor's update is one fused program
 * (core/_webgpu_optim.ts) instead of three tfjs ops and an upload.
 *
 * @module
 */
import { tf } from "./backend.ts";
import { wasmEmaStep } from "./_wasm_kernels.ts";
import {
  emaStep,
  flattenInOrder,
  PACKED,
  REPLAYED,
  REWIND,
  sliceInOrder,
  STEP_SCALARS,
} from "./_webgpu_optim.ts";

/** How the EMA decay grows with the number of updates; see the module notes. */
export type EmaDecayMode = "constant" | "warmup" | "ramp";

/** Settings of {@linkcode Ema}. */
export interface EmaConfig {
  /** The decay, and the cap of the warm-up modes; 0.9999 by default. */
  decay: number;
  /** "constant" (default, as the reference), "warmup" or "ramp" (as diffusers). */
  mode: EmaDecayMode;
  /** Number of first updates that copy the parameters (decay 0); 0 by default. */
  updateAfterStep: number;
  /** Floor of the decay once updates average; 0 by default. */
  minDecay: number;
  /** Warm-up inverse multiplicative factor; 1 by default. */
  invGamma: number;
  /** Warm-up exponent; 2/3 by default (diffusers suggests 3/4 for short runs). */
  power: number;
}

/** Everything needed to resume an {@linkcode Ema} exactly. */
export interface EmaState {
  /** The settings. */
  config: EmaConfig;
  /** Number of updates taken. */
  optimizationStep: number;
  /** The averaged parameters, keyed as the model's. */
  params: Map<string, tf.Tensor>;
}

/**
 * The key of {@linkcode Ema}'s update gated by a training step's
 * `finiteGate`: `(params, gate?) => decay`, for the trainer, kept off the
 * public API.
 */
export const UPDATE_GATED: unique symbol = Symbol("Ema.updateGated");

/** The defaults of {@linkcode Ema}: a constant decay of 0.9999, as the reference. */
export const EMA_DEFAULTS: Readonly<EmaConfig> = Object.freeze({
  decay: 0.9999,
  mode: "constant",
  updateAfterStep: 0,
  minDecay: 0,
  invGamma: 1,
  power: 2 / 3,
});

function fullConfig(config: Partial<EmaConfig>): EmaConfig {
  const c = { ...EMA_DEFAULTS, ...config };
  const bad = (name: string, value: unknown, expected: string) =>
    new RangeError(
      `Cannot configure EMA: ${name} out of range (got ${value}, expected ${expected})`,
    );
  if (!(c.decay >= 0 && c.decay <= 1)) {
    throw bad("decay", c.decay, "0 <= decay <= 1");
  }
  if (!(c.minDecay >= 0 && c.minDecay <= 1)) {
    throw bad("minDecay", c.minDecay, "0 <= minDecay <= 1");
  }
  if (!["constant", "warmup", "ramp"].includes(c.mode)) {
    throw bad("mode", `"${c.mode}"`, `"constant", "warmup" or "ramp"`);
  }
  if (!(Number.isInteger(c.updateAfterStep) && c.updateAfterStep >= 0)) {
    throw bad("updateAfterStep", c.updateAfterStep, "an integer >= 0");
  }
  if (!(c.invGamma > 0 && Number.isFinite(c.invGamma))) {
    throw bad("invGamma", c.invGamma, "invGamma > 0");
  }
  if (!(c.power > 0 && Number.isFinite(c.power))) {
    throw bad("power", c.power, "power > 0");
  }
  return c;
}

/**
 * The decay used by update number `optimizationStep` (1 for the first update).
 *
 * @param optimizationStep The update's number, counting from 1.
 * @param config The EMA settings; {@linkcode EMA_DEFAULTS} fill the rest.
 * @returns The decay d in [0, 1].
 * @example
 * ```ts
 * import { emaDecay } from "./ema.ts";
 * console.log(emaDecay(1, {})); // 0.9999: the reference's constant decay
 * console.log(emaDecay(2, { mode: "ramp" })); // (1 + 1) / (10 + 1) = 0.1818...
 * ```
 */
export function emaDecay(
  optimizationStep: number,
  config: Partial<EmaConfig> = {},
): number {
  const c = fullConfig(config);
  if (c.mode === "constant") {
    if (optimizationStep <= c.updateAfterStep) return 0;
    return Math.max(c.decay, c.minDecay);
  }
  const k = Math.max(0, optimizationStep - c.updateAfterStep - 1);
  if (k <= 0) return 0;
  const d = c.mode === "warmup"
    ? 1 - (1 + k / c.invGamma) ** -c.power
    : (1 + k) / (10 + k);
  return Math.max(Math.min(d, c.decay), c.minDecay);
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/**
 * A moving average of a model's parameters, a second set of variables with the same keys.
 *
 * Built as a copy of the parameters (the reference's `deepcopy(model)`);
 * {@linkcode Ema.update} after each optimizer step. Evaluate the average
 * with `unet.apply(ema.params, x, t)`.
 *
 * @example
 * ```ts
 * import { Ema } from "./ema.ts";
 * import { initBackend, tf } from "./backend.ts";
 * await initBackend("cpu");
 * const w = tf.variable(tf.tensor1d([0, 0]));
 * const ema = new Ema(new Map([["w", w]]), { decay: 0.9 });
 * w.assign(tf.tensor1d([1, -1]));
 * ema.update(new Map([["w", w]]));
 * console.log(await ema.params.get("w")!.data()); // ~[0.1, -0.1]
 * ema.dispose();
 * w.dispose();
 * ```
 */
export class Ema {
  /** The settings in use. */
  readonly config: Readonly<EmaConfig>;
  #params = new Map<string, tf.Variable>();
  /**
   * On WebGPU, the average of every parameter in one vector (parameter
   * order), updated in 2 dispatches instead of one per tensor; `params`
   * is then refreshed from it when read. Null elsewhere, and until the
   * first update.
   */
  #packed: tf.Variable | null = null;
  /** Which copy is current: the per-key variables, the packed one, or both. */
  #current: "params" | "packed" | "both" = "params";
  #optimizationStep = 0;

  /**
   * The averaged parameters, keyed as the model's; owned by this object.
   * Read it after the updates you want to see: on WebGPU the average lives
   * in one packed vector while training and these variables are refreshed
   * from it (one slice each) when this property is read.
   */
  get params(): Map<string, tf.Variable> {
    if (this.#current === "packed") {
      for (const [k, v] of sliceInOrder(this.#packed!, this.#params)) {
        this.#params.get(k)!.assign(v);
      }
      this.#current = "both";
    }
    return this.#params;
  }

  /**
   * Start an average at a copy of `params`.
   *
   * @param params The model's parameters; copied, not kept.
   * @param config Settings; {@linkcode EMA_DEFAULTS} fill the rest.
   */
  constructor(
    params: ReadonlyMap<string, tf.Tensor>,
    config: Partial<EmaConfig> = {},
  ) {
    this.config = Object.freeze(fullConfig(config));
    for (const [key, p] of params) {
      this.#params.set(
        key,
        tf.tidy(() => tf.variable(tf.cast(p, "float32"), false)),
      );
    }
  }

  /** Number of updates taken (diffusers' `optimization_step`). */
  get optimizationStep(): number {
    return this.#optimizationStep;
  }

  /**
   * Move the average towards `params`: ema = ema - (1 - d)(ema - p).
   *
   * @param params The model's current parameters, same keys and shapes.
   * @returns The decay d this update used.
   * @example
   * ```ts
   * import { Ema } from "./ema.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.scalar(1));
   * const ema = new Ema(new Map([["w", w]]), { mode: "ramp" });
   * console.log(ema.update(new Map([["w", w]]))); // 0: diffusers copies on the first update
   * ema.dispose();
   * w.dispose();
   * ```
   */
  update(params: ReadonlyMap<string, tf.Tensor>): number {
    return this[UPDATE_GATED](params);
  }

  /**
   * {@linkcode Ema.update}, on WebGPU optionally gated by a training step's
   * `finiteGate` (core/_webgpu_optim.ts): where it is 0 the averages stay
   * as they were (the update count still advances; the trainer rewinds it).
   */
  [UPDATE_GATED](
    params: ReadonlyMap<string, tf.Tensor>,
    gate?: tf.Tensor,
    oneMinusDecay?: tf.Tensor,
  ): number {
    for (const [key, e] of this.#params) {
      const p = params.get(key);
      if (p === undefined || !sameShape(p.shape, e.shape)) {
        throw new TypeError(
          `Cannot update EMA: parameter "${key}" is missing or misshapen (got ${
            p === undefined ? "none" : `[${p.shape}]`
          }, expected [${e.shape}])`,
        );
      }
    }
    const n = this.#optimizationStep + 1;
    const d = emaDecay(n, this.config);
    const keys = [...this.#params.keys()];
    const packable = tf.getBackend() === "webgpu" && keys.length > 0 &&
      keys.every((k) => params.get(k)!.dtype === "float32");
    if (packable) {
      // Concatenate the parameters (tfjs's Concat takes many inputs per
      // dispatch) and average the two vectors in one program.
      if (this.#current === "params" || this.#packed === null) {
        const fresh = flattenInOrder(this.#params, keys);
        if (this.#packed === null) {
          this.#packed = tf.variable(fresh, false);
        } else {
          this.#packed.assign(fresh);
        }
        fresh.dispose();
      }
      const packed = this.#packed!;
      tf.tidy(() => {
        const rate = oneMinusDecay ?? tf.tensor1d([1 - d]);
        packed.assign(
          emaStep(packed, flattenInOrder(params, keys), rate, gate),
        );
      });
      this.#current = "packed";
    } else {
      if (gate !== undefined) {
        throw new TypeError(
          "Cannot update EMA: a gated update needs float32 parameters on webgpu (got an ungated backend or dtype, expected webgpu and float32)",
        );
      }
      const current = this.params;
      tf.tidy(() => {
        for (const [key, e] of current) {
          const p = params.get(key)!;
          // On wasm one kernel, with the same results as the three ops.
          e.assign(
            wasmEmaStep(e, p, 1 - d) ??
              tf.sub(e, tf.mul(tf.sub(e, p), 1 - d)),
          );
        }
      });
      this.#current = "params";
    }
    this.#optimizationStep = n;
    return d;
  }

  /** Set the update count back (see `REWIND` in core/_webgpu_optim.ts). */
  [REWIND](count: number): void {
    this.#optimizationStep = count;
  }

  /** The next update's `[1 - decay]` (see `STEP_SCALARS` in core/_webgpu_optim.ts). */
  [STEP_SCALARS](): [number] {
    return [1 - emaDecay(this.#optimizationStep + 1, this.config)];
  }

  /** The packed average of the WebGPU updates, or null (see `PACKED` in core/_webgpu_optim.ts). */
  get [PACKED](): tf.Variable | null {
    return this.#current === "params" ? null : this.#packed;
  }

  /**
   * Account for a packed update that ran without this object (a replayed
   * training step, core/_webgpu_replay.ts): count it, and mark the packed
   * average as the current one.
   */
  [REPLAYED](): void {
    this.#optimizationStep++;
    this.#current = "packed";
  }

  /**
   * Copy out the state (settings, update count, averaged parameters) to save it.
   *
   * @returns The state; its tensors are copies the caller owns and must dispose.
   * @example
   * ```ts
   * import { Ema } from "./ema.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.zeros([3]));
   * const ema = new Ema(new Map([["w", w]]));
   * const state = ema.getState();
   * console.log(state.config.decay, state.params.get("w")!.shape); // 0.9999 [3]
   * tf.dispose([...state.params.values()]);
   * ema.dispose();
   * w.dispose();
   * ```
   */
  getState(): EmaState {
    return {
      config: { ...this.config },
      optimizationStep: this.#optimizationStep,
      params: new Map(
        [...this.params].map(([k, v]) =>
          [k, tf.clone(v)] as [string, tf.Tensor]
        ),
      ),
    };
  }

  /**
   * Restore a state saved by {@linkcode Ema.getState}: update count and averages are copied in.
   *
   * The settings of `state.config` must equal this object's: build the
   * EMA with them to resume.
   *
   * @param state The state to restore; its tensors stay the caller's.
   * @returns Nothing.
   * @example
   * ```ts
   * import { Ema } from "./ema.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.zeros([2]));
   * const ema = new Ema(new Map([["w", w]]));
   * const saved = tf.ones([2]);
   * ema.setState({ config: { ...ema.config }, optimizationStep: 5, params: new Map([["w", saved]]) });
   * console.log(ema.optimizationStep, await ema.params.get("w")!.data()); // 5 [1, 1]
   * saved.dispose();
   * ema.dispose();
   * w.dispose();
   * ```
   */
  setState(state: EmaState): void {
    for (const name of Object.keys(EMA_DEFAULTS) as (keyof EmaConfig)[]) {
      if (state.config[name] !== this.config[name]) {
        throw new RangeError(
          `Cannot restore EMA state: ${name} differs (got ${
            state.config[name]
          }, expected ${this.config[name]})`,
        );
      }
    }
    if (
      !(Number.isInteger(state.optimizationStep) && state.optimizationStep >= 0)
    ) {
      throw new RangeError(
        `Cannot restore EMA state: optimizationStep must be a non-negative integer (got ${state.optimizationStep})`,
      );
    }
    for (const [key, e] of this.#params) {
      const s = state.params.get(key);
      if (s === undefined || !sameShape(s.shape, e.shape)) {
        throw new TypeError(
          `Cannot restore EMA state: "${key}" is missing or misshapen (got ${
            s === undefined ? "none" : `[${s.shape}]`
          }, expected [${e.shape}])`,
        );
      }
    }
    if (state.params.size !== this.#params.size) {
      const extra = [...state.params.keys()].find((k) => !this.#params.has(k));
      throw new TypeError(
        `Cannot restore EMA state: a key no parameter has (got "${extra}", expected ${this.#params.size} keys)`,
      );
    }
    tf.tidy(() => {
      for (const [key, e] of this.#params) {
        e.assign(tf.cast(state.params.get(key)!, "float32"));
      }
    });
    this.#current = "params";
    this.#optimizationStep = state.optimizationStep;
  }

  /**
   * Free the averaged parameters.
   *
   * @returns Nothing.
   * @example
   * ```ts
   * import { Ema } from "./ema.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.zeros([2]));
   * new Ema(new Map([["w", w]])).dispose();
   * w.dispose();
   * ```
   */
  dispose(): void {
    for (const v of this.#params.values()) v.dispose();
    this.#params.clear();
    this.#packed?.dispose();
    this.#packed = null;
    this.#current = "params";
  }
}
