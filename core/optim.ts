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
 * @module
 */
import { tf } from "./backend.ts";

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
  #expAvg = new Map<string, tf.Variable>();
  #expAvgSq = new Map<string, tf.Variable>();

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
    const { lr, beta1, beta2, eps, weightDecay } = this.config;
    const t = this.#step + 1;
    const stepSize = lr / (1 - beta1 ** t);
    const biasCorrection2Sqrt = Math.sqrt(1 - beta2 ** t);
    tf.tidy(() => {
      for (const [key, g] of grads) {
        const p = this.params.get(key)!;
        const m = this.#expAvg.get(key)!;
        const v = this.#expAvgSq.get(key)!;
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
    const copy = (m: Map<string, tf.Variable>) =>
      new Map([...m].map(([k, v]) => [k, tf.clone(v)] as [string, tf.Tensor]));
    return {
      config: { ...this.config },
      step: this.#step,
      expAvg: copy(this.#expAvg),
      expAvgSq: copy(this.#expAvgSq),
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
    for (
      const [name, src, dst] of [
        ["expAvg", state.expAvg, this.#expAvg],
        ["expAvgSq", state.expAvgSq, this.#expAvgSq],
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
    for (const v of this.#expAvg.values()) v.dispose();
    for (const v of this.#expAvgSq.values()) v.dispose();
    this.#expAvg.clear();
    this.#expAvgSq.clear();
  }
}
