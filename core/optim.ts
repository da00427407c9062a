/**
 * AdamW (Loshchilov and Hutter 2019), step for step as `torch.optim.AdamW`.
 *
 * Notation (torch's documentation of AdamW):
 *
 * | code                 | torch                              |
 * |----------------------|------------------------------------|
 * | `lr`                 | gamma                              |
 * | `beta1`, `beta2`     | beta_1, beta_2                     |
 * | `weightDecay`        | lambda                             |
 * | `expAvg[key]`        | m_t (`exp_avg`)                    |
 * | `expAvgSq[key]`      | v_t (`exp_avg_sq`)                 |
 * | `step`               | t, the number of steps taken       |
 *
 * One step, for every parameter p with gradient g (torch's single-tensor path):
 *
 * 1. decoupled weight decay: p = p (1 - lr weightDecay)
 * 2. moments: m = m + (1 - beta1)(g - m);  v = beta2 v + (1 - beta2) g^2
 * 3. bias corrections: stepSize = lr / (1 - beta1^t);
 *    denom = sqrt(v) / sqrt(1 - beta2^t) + eps
 * 4. update: p = p - stepSize m / denom
 *
 * On WebGPU, when every parameter has a gradient, the step runs as a few
 * fused programs (core/_webgpu_optim.ts) over the gradients concatenated
 * into one vector, and the moments are kept packed in one variable
 * `[m of every parameter | v of every parameter]` (parameter order);
 * {@linkcode AdamW.getState} still hands them out per key. Elsewhere each
 * parameter takes the tfjs ops below, with the moments kept per key.
 *
 * @module
 */
import { tf } from "./backend.ts";
import { wasmAdamW } from "./_wasm_kernels.ts";
import {
  adamwMoments,
  adamwParam,
  adamwStepScalars,
  type FlatClip,
  flattenInOrder,
  PACKED,
  REWIND,
  sliceInOrder,
  STEP_FLAT,
  STEP_SCALARS,
} from "./_webgpu_optim.ts";

/** Hyper-parameters of {@linkcode AdamW}. */
export interface AdamWConfig {
  /** Learning rate; 2e-4 by default (the project's choice; torch's default is 1e-3). */
  lr: number;
  /** Decay of the first moment; 0.9 by default. */
  beta1: number;
  /** Decay of the second moment; 0.999 by default. */
  beta2: number;
  /** Added to the denominator; 1e-8 by default. */
  eps: number;
  /** Decoupled weight decay; 0.01 by default, as torch. */
  weightDecay: number;
}

/**
 * Everything needed to resume {@linkcode AdamW} exactly.
 *
 * Moments are keyed like the parameters and kept in their (TF) layouts.
 */
export interface AdamWState {
  /** The hyper-parameters. */
  config: AdamWConfig;
  /** Number of steps taken (torch's `state["step"]`). */
  step: number;
  /** First moments m, one per parameter key. */
  expAvg: Map<string, tf.Tensor>;
  /** Second moments v, one per parameter key. */
  expAvgSq: Map<string, tf.Tensor>;
}

/** The defaults of {@linkcode AdamW}: torch's, with lr 2e-4. */
export const ADAMW_DEFAULTS: Readonly<AdamWConfig> = Object.freeze({
  lr: 2e-4,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  weightDecay: 0.01,
});

function checkConfig(config: AdamWConfig): void {
  const { lr, beta1, beta2, eps, weightDecay } = config;
  const bad = (name: string, value: number, expected: string) =>
    new RangeError(
      `Cannot configure AdamW: ${name} out of range (got ${value}, expected ${expected})`,
    );
  if (!(Number.isFinite(lr) && lr >= 0)) throw bad("lr", lr, "lr >= 0");
  if (!(beta1 >= 0 && beta1 < 1)) throw bad("beta1", beta1, "0 <= beta1 < 1");
  if (!(beta2 >= 0 && beta2 < 1)) throw bad("beta2", beta2, "0 <= beta2 < 1");
  if (!(Number.isFinite(eps) && eps >= 0)) throw bad("eps", eps, "eps >= 0");
  if (!(Number.isFinite(weightDecay) && weightDecay >= 0)) {
    throw bad("weightDecay", weightDecay, "weightDecay >= 0");
  }
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** Whether the fused WebGPU programs of core/_webgpu_optim.ts apply. */
function onWebGpu(): boolean {
  return tf.getBackend() === "webgpu";
}

/**
 * The AdamW optimizer over a map of variables, as `torch.optim.AdamW`.
 *
 * The moments are variables updated in place with `assign`; the
 * optimizer owns them and frees them in {@linkcode AdamW.dispose}.
 *
 * @example
 * ```ts
 * import { AdamW } from "./optim.ts";
 * import { initBackend, tf } from "./backend.ts";
 * await initBackend("cpu");
 * const params = new Map([["w", tf.variable(tf.tensor1d([1, -1]))]]);
 * const opt = new AdamW(params, { lr: 0.1, weightDecay: 0 });
 * const g = tf.tensor1d([0.5, -2]);
 * opt.step(new Map([["w", g]]));
 * console.log(await params.get("w")!.data()); // ~[0.9, -0.9]: the first step moves lr against sign(g)
 * g.dispose();
 * opt.dispose();
 * params.get("w")!.dispose();
 * ```
 */
export class AdamW {
  /** The hyper-parameters in use. */
  readonly config: Readonly<AdamWConfig>;
  /** The parameters this optimizer updates, in place. */
  readonly params: ReadonlyMap<string, tf.Variable>;
  #step = 0;
  /** The moments per key (the tfjs-op path); empty while they are packed. */
  #expAvg = new Map<string, tf.Variable>();
  #expAvgSq = new Map<string, tf.Variable>();
  /** The moments packed as [m | v] (the fused WebGPU path), or null while per key. */
  #packed: tf.Variable | null = null;
  /** Where each parameter starts in either half of the packed moments. */
  #starts = new Map<string, number>();
  /** The number of parameter elements: the length of either half. */
  #total = 0;
  /** Whether the moments can be packed (some elements, all float32). */
  #packable: boolean;

  /**
   * Make an optimizer over `params`, with zero moments.
   *
   * @param params The variables to update, by key (the UNet's `params`).
   * @param config Hyper-parameters; {@linkcode ADAMW_DEFAULTS} fill the rest.
   */
  constructor(
    params: ReadonlyMap<string, tf.Variable>,
    config: Partial<AdamWConfig> = {},
  ) {
    const full = { ...ADAMW_DEFAULTS, ...config };
    checkConfig(full);
    this.config = Object.freeze(full);
    this.params = params;
    for (const [key, p] of params) {
      this.#starts.set(key, this.#total);
      this.#total += p.size;
    }
    this.#packable = this.#total > 0 &&
      [...params.values()].every((p) => p.dtype === "float32");
    if (onWebGpu() && this.#packable) {
      this.#packed = tf.tidy(() =>
        tf.variable(tf.zeros([2 * this.#total]), false)
      );
      return;
    }
    for (const [key, p] of params) {
      this.#expAvg.set(key, tf.tidy(() => tf.variable(tf.zerosLike(p), false)));
      this.#expAvgSq.set(
        key,
        tf.tidy(() => tf.variable(tf.zerosLike(p), false)),
      );
    }
  }

  /** Number of steps taken (torch's `state["step"]`). */
  get stepCount(): number {
    return this.#step;
  }

  /**
   * Take one AdamW step with the given gradients; parameters without a gradient are left alone.
   *
   * @param grads Gradients by parameter key, shaped as the parameters; not disposed.
   * @returns Nothing; parameters and moments are updated in place.
   * @example
   * ```ts
   * import { AdamW } from "./optim.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const params = new Map([["w", tf.variable(tf.scalar(1))]]);
   * const opt = new AdamW(params);
   * const g = tf.scalar(1);
   * opt.step(new Map([["w", g]]));
   * console.log(opt.stepCount); // 1
   * g.dispose();
   * opt.dispose();
   * params.get("w")!.dispose();
   * ```
   */
  step(grads: ReadonlyMap<string, tf.Tensor>): void {
    for (const [key, g] of grads) {
      const p = this.params.get(key);
      if (p === undefined) {
        throw new TypeError(
          `Cannot take AdamW step: gradient for an unknown parameter (got "${key}", expected one of the ${this.params.size} parameter keys)`,
        );
      }
      if (!sameShape(g.shape, p.shape)) {
        throw new TypeError(
          `Cannot take AdamW step: gradient shape differs from "${key}" (got [${g.shape}], expected [${p.shape}])`,
        );
      }
    }
    if (
      onWebGpu() && this.#packable && grads.size === this.params.size
    ) {
      const flat = flattenInOrder(grads, [...this.params.keys()]);
      try {
        this[STEP_FLAT](flat, null);
      } finally {
        flat.dispose();
      }
      return;
    }
    this.#unpack();
    const { lr, beta1, beta2, eps, weightDecay } = this.config;
    const t = this.#step + 1;
    const [stepSize, biasCorrection2Sqrt] = adamwStepScalars(this.config, t);
    tf.tidy(() => {
      for (const [key, g] of grads) {
        const p = this.params.get(key)!;
        const m = this.#expAvg.get(key)!;
        const v = this.#expAvgSq.get(key)!;
        // On wasm, the steps below in one kernel, with the same results.
        const fused = wasmAdamW(p, m, v, g, {
          decay: weightDecay === 0 ? 1 : 1 - lr * weightDecay,
          beta1,
          beta2,
          biasCorrection2Sqrt,
          eps,
          stepSize,
        });
        if (fused !== null) {
          m.assign(fused[1]);
          v.assign(fused[2]);
          p.assign(fused[0]);
          continue;
        }
        // 1. decoupled weight decay
        const decayed = weightDecay === 0 ? p : tf.mul(p, 1 - lr * weightDecay);
        // 2. moments (torch: exp_avg.lerp_(g, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2))
        m.assign(tf.add(m, tf.mul(tf.sub(g, m), 1 - beta1)));
        v.assign(tf.add(tf.mul(v, beta2), tf.mul(tf.mul(g, g), 1 - beta2)));
        // 3. denominator with the bias correction of v
        const denom = tf.add(tf.div(tf.sqrt(v), biasCorrection2Sqrt), eps);
        // 4. update, with the bias correction of m folded into the step size
        p.assign(tf.sub(decayed, tf.mul(tf.div(m, denom), stepSize)));
      }
    });
    this.#step = t;
  }

  /**
   * The fused WebGPU step (core/_webgpu_optim.ts): every parameter, with
   * gradients concatenated in parameter order, clipped first by `clip`.
   * The Trainer calls it; kept off the public API by its symbol key.
   */
  [STEP_FLAT](
    flat: tf.Tensor,
    clip: FlatClip | null,
    gate?: tf.Tensor,
    step?: tf.Tensor,
  ): void {
    if (flat.size !== this.#total || !this.#packable) {
      throw new TypeError(
        `Cannot take fused AdamW step: the flat gradients do not cover the parameters (got ${flat.size} elements, expected ${this.#total} float32 ones)`,
      );
    }
    this.#pack();
    const packed = this.#packed!;
    const { lr, beta1, beta2, eps, weightDecay } = this.config;
    const t = this.#step + 1;
    const update = { decay: weightDecay === 0 ? 1 : 1 - lr * weightDecay, eps };
    tf.tidy(() => {
      const scalars = step ?? tf.tensor1d(this[STEP_SCALARS]());
      packed.assign(adamwMoments(flat, packed, { beta1, beta2 }, clip, gate));
      for (const [key, p] of this.params) {
        const at = { start: this.#starts.get(key)!, total: this.#total };
        p.assign(adamwParam(p, packed, at, update, scalars, gate));
      }
    });
    this.#step = t;
  }

  /**
   * The next step's `[stepSize, biasCorrection2Sqrt]` (see
   * `adamwStepScalars`): what `STEP_FLAT` reads from its `step` tensor.
   */
  [STEP_SCALARS](): [number, number] {
    return adamwStepScalars(this.config, this.#step + 1);
  }

  /** The packed moments `[m | v]` of the fused WebGPU step, or null before it. */
  get [PACKED](): tf.Variable | null {
    return this.#packed;
  }

  /** Set the step count back (see `REWIND` in core/_webgpu_optim.ts). */
  [REWIND](count: number): void {
    this.#step = count;
  }

  /** Move per-key moments into the packed variable (no-op when packed). */
  #pack(): void {
    if (this.#packed !== null) return;
    const keys = [...this.params.keys()];
    this.#packed = tf.tidy(() =>
      tf.variable(
        tf.concat([
          ...keys.map((k) => tf.reshape(this.#expAvg.get(k)!, [-1])),
          ...keys.map((k) => tf.reshape(this.#expAvgSq.get(k)!, [-1])),
        ]),
        false,
      )
    );
    for (const v of this.#expAvg.values()) v.dispose();
    for (const v of this.#expAvgSq.values()) v.dispose();
    this.#expAvg.clear();
    this.#expAvgSq.clear();
  }

  /** Move packed moments into per-key variables (no-op when per key). */
  #unpack(): void {
    if (this.#packed === null) return;
    const half = this.#moments(0);
    const halfSq = this.#moments(1);
    for (const [key, m] of half) {
      this.#expAvg.set(key, tf.variable(m, false));
      this.#expAvgSq.set(key, tf.variable(halfSq.get(key)!, false));
    }
    tf.dispose([...half.values(), ...halfSq.values()]);
    this.#packed.dispose();
    this.#packed = null;
  }

  /** New per-key copies of the first (0) or second (1) moments, from either layout. */
  #moments(which: 0 | 1): Map<string, tf.Tensor> {
    const packed = this.#packed;
    if (packed === null) {
      const m = which === 0 ? this.#expAvg : this.#expAvgSq;
      return new Map(
        [...m].map(([k, v]) => [k, tf.clone(v)] as [string, tf.Tensor]),
      );
    }
    return sliceInOrder(packed, this.params, which * this.#total);
  }

  /**
   * Copy out the optimizer state (hyper-parameters, step, moments) to save it.
   *
   * @returns The state; its tensors are copies the caller owns and must dispose.
   * @example
   * ```ts
   * import { AdamW } from "./optim.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const params = new Map([["w", tf.variable(tf.zeros([2]))]]);
   * const opt = new AdamW(params);
   * const state = opt.getState();
   * console.log(state.step, state.expAvg.get("w")!.shape); // 0 [2]
   * tf.dispose([...state.expAvg.values(), ...state.expAvgSq.values()]);
   * opt.dispose();
   * params.get("w")!.dispose();
   * ```
   */
  getState(): AdamWState {
    return {
      config: { ...this.config },
      step: this.#step,
      expAvg: this.#moments(0),
      expAvgSq: this.#moments(1),
    };
  }

  /**
   * Restore a state saved by {@linkcode AdamW.getState}: step and moments are copied in.
   *
   * The hyper-parameters of `state.config` must equal this optimizer's:
   * build the optimizer with them to resume.
   *
   * @param state The state to restore; its tensors stay the caller's.
   * @returns Nothing.
   * @example
   * ```ts
   * import { AdamW } from "./optim.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const params = new Map([["w", tf.variable(tf.zeros([2]))]]);
   * const opt = new AdamW(params);
   * const m = tf.ones([2]);
   * opt.setState({ config: { ...opt.config }, step: 7, expAvg: new Map([["w", m]]), expAvgSq: new Map([["w", m]]) });
   * console.log(opt.stepCount); // 7
   * m.dispose();
   * opt.dispose();
   * params.get("w")!.dispose();
   * ```
   */
  setState(state: AdamWState): void {
    for (const name of Object.keys(ADAMW_DEFAULTS) as (keyof AdamWConfig)[]) {
      if (state.config[name] !== this.config[name]) {
        throw new RangeError(
          `Cannot restore AdamW state: ${name} differs (got ${
            state.config[name]
          }, expected ${this.config[name]})`,
        );
      }
    }
    if (!(Number.isInteger(state.step) && state.step >= 0)) {
      throw new RangeError(
        `Cannot restore AdamW state: step must be a non-negative integer (got ${state.step})`,
      );
    }
    // The moments are shaped as the parameters, in either layout.
    const dst = this.params;
    for (
      const [name, src] of [
        ["expAvg", state.expAvg],
        ["expAvgSq", state.expAvgSq],
      ] as const
    ) {
      for (const [key, v] of dst) {
        const s = src.get(key);
        if (s === undefined || !sameShape(s.shape, v.shape)) {
          throw new TypeError(
            `Cannot restore AdamW state: ${name} "${key}" is missing or misshapen (got ${
              s === undefined ? "none" : `[${s.shape}]`
            }, expected [${v.shape}])`,
          );
        }
      }
      if (src.size !== dst.size) {
        const extra = [...src.keys()].find((k) => !dst.has(k));
        throw new TypeError(
          `Cannot restore AdamW state: ${name} has a key no parameter has (got "${extra}", expected ${dst.size} keys)`,
        );
      }
    }
    const packed = this.#packed;
    if (packed !== null) {
      const keys = [...this.params.keys()];
      const flat = (k: string, m: ReadonlyMap<string, tf.Tensor>) =>
        tf.reshape(tf.cast(m.get(k)!, "float32"), [-1]);
      tf.tidy(() => {
        packed.assign(tf.concat([
          ...keys.map((k) => flat(k, state.expAvg)),
          ...keys.map((k) => flat(k, state.expAvgSq)),
        ]));
      });
      this.#step = state.step;
      return;
    }
    tf.tidy(() => {
      for (const [key, v] of this.#expAvg) {
        v.assign(tf.cast(state.expAvg.get(key)!, "float32"));
      }
      for (const [key, v] of this.#expAvgSq) {
        v.assign(tf.cast(state.expAvgSq.get(key)!, "float32"));
      }
    });
    this.#step = state.step;
  }

  /**
   * Free the moments (the parameters stay the caller's).
   *
   * @returns Nothing.
   * @example
   * ```ts
   * import { AdamW } from "./optim.ts";
   * import { initBackend, tf } from "./backend.ts";
   * await initBackend("cpu");
   * const w = tf.variable(tf.zeros([2]));
   * new AdamW(new Map([["w", w]])).dispose();
   * w.dispose();
   * ```
   */
  dispose(): void {
    this.#packed?.dispose();
    this.#packed = null;
    for (const v of this.#expAvg.values()) v.dispose();
    for (const v of this.#expAvgSq.values()) v.dispose();
    this.#expAvg.clear();
    this.#expAvgSq.clear();
  }
}
