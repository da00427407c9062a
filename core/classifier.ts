/**
 * A small LeNet-like digit classifier whose penultimate activations are the
 * features of the Fréchet distance ({@linkcode ./frechet.ts}).
 *
 * Input: NHWC float32 `[N, 32, 32, 1]` in [-1, 1], exactly the model's
 * image format (MNIST resized bilinearly 28 -> 32, as `ImageBatcher` makes it).
 *
 * | layer   | op                                   | output        |
 * |---------|--------------------------------------|---------------|
 * | `conv1` | 5x5 conv, pad 2, 1 -> 16, ReLU, 2x2 max-pool   | 16 x 16 x 16 |
 * | `conv2` | 5x5 conv, pad 2, 16 -> 32, ReLU, 2x2 max-pool  | 8 x 8 x 32   |
 * | `conv3` | 3x3 conv, pad 1, 32 -> 64, ReLU, 2x2 max-pool  | 4 x 4 x 64   |
 * | `fc1`   | flatten (NHWC order) 1024 -> 64, ReLU: **the features** | 64  |
 * | `fc2`   | 64 -> 10: the logits                 | 10            |
 *
 * Parameters are a map from names (`conv1.weight`, `conv1.bias`, ...) to
 * tensors in TF layouts (conv `[kh, kw, in, out]`, linear `[in, out]`);
 * the forward pass is a pure function of them. The project ships weights it
 * trained itself (`core/assets/lenet_mnist.safetensors`, retrained by
 * `deno run -A tests/tools/train_classifier.ts`); {@linkcode DigitClassifier.load}
 * reads them.
 *
 * @module
 */
import "./_gradients.ts";
import { tf } from "./backend.ts";
import { conv2d } from "./_conv.ts";
import { AdamW } from "./optim.ts";
import { decodeSafetensors, encodeSafetensors } from "./safetensors.ts";

/** Side of the square input images. */
export const CLASSIFIER_IMAGE_SIZE = 32;
/** Length of the feature vectors (the penultimate layer). */
export const CLASSIFIER_FEATURES = 64;
/** Number of classes. */
export const CLASSIFIER_CLASSES = 10;

/** The weights the project trained on mnist-lite (see the module doc). */
export const CLASSIFIER_WEIGHTS: URL = new URL(
  "./assets/lenet_mnist.safetensors",
  import.meta.url,
);

/** What {@linkcode classifierForward} computes for a batch. */
export interface ClassifierOutput {
  /** `[N, 10]` unnormalised class scores. */
  logits: tf.Tensor2D;
  /** `[N, 64]` penultimate activations (after ReLU): the Fréchet features. */
  features: tf.Tensor2D;
}

/** Options of {@linkcode classifierForward}. */
export interface ClassifierForwardOptions {
  /** Dropout rate on the features, for training; 0 (none) by default. */
  dropout?: number;
  /** Seed of the dropout mask. */
  seed?: number;
}

/**
 * The parameter names and TF-layout shapes, in layer order.
 *
 * @returns Name -> shape.
 * @example
 * ```ts
 * import { classifierParamShapes } from "./classifier.ts";
 * console.log(classifierParamShapes().get("fc1.weight")); // [1024, 64]
 * ```
 */
export function classifierParamShapes(): Map<string, number[]> {
  return new Map<string, number[]>([
    ["conv1.weight", [5, 5, 1, 16]],
    ["conv1.bias", [16]],
    ["conv2.weight", [5, 5, 16, 32]],
    ["conv2.bias", [32]],
    ["conv3.weight", [3, 3, 32, 64]],
    ["conv3.bias", [64]],
    ["fc1.weight", [4 * 4 * 64, CLASSIFIER_FEATURES]],
    ["fc1.bias", [CLASSIFIER_FEATURES]],
    ["fc2.weight", [CLASSIFIER_FEATURES, CLASSIFIER_CLASSES]],
    ["fc2.bias", [CLASSIFIER_CLASSES]],
  ]);
}

function checkSeed(what: string, seed: number): void {
  if (!Number.isInteger(seed) || seed < 0 || seed >= 2 ** 32) {
    throw new RangeError(
      `Cannot ${what}: seed must be an integer in [0, 2^32) (got ${seed}, expected e.g. 0)`,
    );
  }
}

/**
 * Fresh trainable parameters: He-uniform weights (bound sqrt(6 / fan_in)),
 * zero biases, seeded.
 *
 * @param seed The initialisation seed; the same seed gives the same weights.
 * @returns Name -> variable; the caller owns and disposes them.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { initClassifierParams } from "./classifier.ts";
 * await initBackend("cpu");
 * const params = initClassifierParams(0);
 * console.log(params.size); // 10
 * tf.dispose([...params.values()]);
 * ```
 */
export function initClassifierParams(seed = 0): Map<string, tf.Variable> {
  checkSeed("initialise classifier", seed);
  const params = new Map<string, tf.Variable>();
  let i = 0;
  for (const [name, shape] of classifierParamShapes()) {
    const init = tf.tidy(() => {
      if (shape.length === 1) return tf.zeros(shape);
      const fanIn = shape.slice(0, -1).reduce((a, b) => a * b, 1);
      const bound = Math.sqrt(6 / fanIn);
      return tf.randomUniform(shape, -bound, bound, "float32", seed * 16 + i);
    });
    params.set(name, tf.variable(init, true));
    init.dispose();
    i++;
  }
  return params;
}

function checkParams(
  what: string,
  params: ReadonlyMap<string, tf.Tensor>,
): void {
  for (const [name, shape] of classifierParamShapes()) {
    const p = params.get(name);
    if (p === undefined) {
      throw new TypeError(
        `Cannot ${what}: parameter "${name}" is missing (got ${
          [...params.keys()].join(", ") || "none"
        }, expected ${name} among them)`,
      );
    }
    if (p.shape.join(",") !== shape.join(",") || p.dtype !== "float32") {
      throw new TypeError(
        `Cannot ${what}: parameter "${name}" has the wrong shape or dtype (got ${p.dtype} [${p.shape}], expected float32 [${shape}])`,
      );
    }
  }
}

function checkImages(what: string, x: tf.Tensor): void {
  const s = CLASSIFIER_IMAGE_SIZE;
  if (
    x.rank !== 4 || x.dtype !== "float32" || x.shape[1] !== s ||
    x.shape[2] !== s || x.shape[3] !== 1
  ) {
    throw new TypeError(
      `Cannot ${what}: images must be float32 [N, ${s}, ${s}, 1] (got ${x.dtype} [${x.shape}], expected float32 [N, ${s}, ${s}, 1])`,
    );
  }
}

/**
 * The classifier's forward pass: logits and penultimate features.
 *
 * @param params Weights by name (TF layouts; see {@linkcode classifierParamShapes}).
 * @param x Images `[N, 32, 32, 1]` float32 in [-1, 1].
 * @param options Dropout on the features (training only) and its seed.
 * @returns Logits `[N, 10]` and features `[N, 64]`; the caller disposes both.
 * @throws {TypeError} On a wrong image shape or a missing parameter.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { classifierForward, initClassifierParams } from "./classifier.ts";
 * await initBackend("cpu");
 * const params = initClassifierParams(0);
 * const x = tf.zeros([2, 32, 32, 1]) as tf.Tensor4D;
 * const { logits, features } = classifierForward(params, x);
 * console.log(logits.shape, features.shape); // [2, 10] [2, 64]
 * tf.dispose([x, logits, features, ...params.values()]);
 * ```
 */
export function classifierForward(
  params: ReadonlyMap<string, tf.Tensor>,
  x: tf.Tensor4D,
  options: ClassifierForwardOptions = {},
): ClassifierOutput {
  checkImages("classify images", x);
  checkParams("classify images", params);
  const { dropout = 0, seed = 0 } = options;
  if (!(dropout >= 0 && dropout < 1)) {
    throw new RangeError(
      `Cannot classify images: dropout out of range (got ${dropout}, expected 0 <= dropout < 1)`,
    );
  }
  const p = (name: string) => params.get(name)!;
  return tf.tidy(() => {
    const block = (h: tf.Tensor4D, name: string, pad: number) => {
      const y = conv2d(h, p(`${name}.weight`) as tf.Tensor4D, 1, pad);
      const a = tf.relu(tf.add(y, p(`${name}.bias`))) as tf.Tensor4D;
      return tf.maxPool(a, 2, 2, "valid") as tf.Tensor4D;
    };
    let h = block(x, "conv1", 2);
    h = block(h, "conv2", 2);
    h = block(h, "conv3", 1);
    const flat = tf.reshape(h, [x.shape[0], -1]) as tf.Tensor2D;
    const features = tf.relu(
      tf.add(tf.matMul(flat, p("fc1.weight") as tf.Tensor2D), p("fc1.bias")),
    ) as tf.Tensor2D;
    const kept = dropout > 0
      ? tf.dropout(features, dropout, undefined, seed)
      : features;
    const logits = tf.add(
      tf.matMul(kept as tf.Tensor2D, p("fc2.weight") as tf.Tensor2D),
      p("fc2.bias"),
    ) as tf.Tensor2D;
    return { logits, features };
  });
}

/** Options of {@linkcode ClassifierTrainer}. */
export interface ClassifierTrainerOptions {
  /** AdamW learning rate; 1e-3 by default. */
  lr?: number;
  /** AdamW decoupled weight decay; 1e-4 by default. */
  weightDecay?: number;
  /** Dropout rate on the features; 0.25 by default. */
  dropout?: number;
  /** Seed of the dropout masks; 0 by default. */
  seed?: number;
}

/** What one {@linkcode ClassifierTrainer.trainStep} did. */
export interface ClassifierStepResult {
  /** Steps taken, this one included. */
  step: number;
  /** Mean cross-entropy of the batch, before the update. */
  loss: number;
  /** Fraction of the batch classified right, before the update. */
  accuracy: number;
}

/**
 * Trains classifier parameters with cross-entropy and AdamW, one batch at
 * a time; the caller supplies (and owns) the batches.
 *
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { ClassifierTrainer, initClassifierParams } from "./classifier.ts";
 * await initBackend("cpu");
 * const params = initClassifierParams(0);
 * const trainer = new ClassifierTrainer(params, { lr: 1e-3 });
 * const x = tf.randomUniform([4, 32, 32, 1], -1, 1, "float32", 1) as tf.Tensor4D;
 * const y = tf.tensor1d([0, 1, 2, 3], "int32");
 * const r = await trainer.trainStep(x, y);
 * console.log(r.step, r.loss > 0); // 1 true
 * trainer.dispose();
 * tf.dispose([x, y, ...params.values()]);
 * ```
 */
export class ClassifierTrainer {
  /** The parameters trained (the caller's). */
  readonly params: ReadonlyMap<string, tf.Variable>;
  /** The optimizer over them. */
  readonly optimizer: AdamW;
  /** The dropout rate on the features. */
  readonly dropout: number;
  /** Seed of the dropout masks. */
  readonly seed: number;
  #step = 0;

  /**
   * Make a trainer over `params`.
   *
   * @param params The variables to train, e.g. from {@linkcode initClassifierParams}.
   * @param options Learning rate, weight decay, dropout and seed.
   */
  constructor(
    params: ReadonlyMap<string, tf.Variable>,
    options: ClassifierTrainerOptions = {},
  ) {
    const { lr = 1e-3, weightDecay = 1e-4, dropout = 0.25, seed = 0 } = options;
    checkParams("train classifier", params);
    checkSeed("train classifier", seed);
    if (!(dropout >= 0 && dropout < 1)) {
      throw new RangeError(
        `Cannot train classifier: dropout out of range (got ${dropout}, expected 0 <= dropout < 1)`,
      );
    }
    this.params = params;
    this.dropout = dropout;
    this.seed = seed;
    this.optimizer = new AdamW(params, { lr, weightDecay });
  }

  /** Steps taken. */
  get step(): number {
    return this.#step;
  }

  /**
   * One AdamW step on the mean cross-entropy of a batch.
   *
   * @param images `[N, 32, 32, 1]` float32 in [-1, 1]; not disposed.
   * @param labels `[N]` int32 classes in [0, 10); not disposed.
   * @returns The step count, and the batch's loss and accuracy before the update.
   * @throws {TypeError} On wrong shapes.
   * @throws {RangeError} On a non-finite loss (no weight changed).
   */
  async trainStep(
    images: tf.Tensor4D,
    labels: tf.Tensor1D,
  ): Promise<ClassifierStepResult> {
    checkImages("train classifier", images);
    if (
      labels.rank !== 1 || labels.dtype !== "int32" ||
      labels.shape[0] !== images.shape[0]
    ) {
      throw new TypeError(
        `Cannot train classifier: labels must be int32 [${
          images.shape[0]
        }] (got ${labels.dtype} [${labels.shape}], expected int32 [${
          images.shape[0]
        }])`,
      );
    }
    const index = this.#step;
    const vars = [...this.params.values()];
    const keyOf = new Map(
      [...this.params].map(([k, v]) => [v.name, k] as [string, string]),
    );
    const { stats, grads } = tf.tidy(() => {
      const oneHot = tf.oneHot(labels, CLASSIFIER_CLASSES);
      let logits: tf.Tensor2D | undefined;
      const { value, grads: named } = tf.variableGrads(() => {
        const out = classifierForward(this.params, images, {
          dropout: this.dropout,
          seed: (this.seed * 1000003 + index) >>> 0,
        });
        logits = tf.keep(out.logits);
        return tf.neg(
          tf.mean(tf.sum(tf.mul(oneHot, tf.logSoftmax(out.logits)), 1)),
        ) as tf.Scalar;
      }, vars);
      const hits = tf.mean(
        tf.cast(tf.equal(tf.argMax(logits!, 1), labels), "float32"),
      );
      logits!.dispose();
      const grads = new Map<string, tf.Tensor>();
      for (const [name, g] of Object.entries(named)) {
        if (g !== null) grads.set(keyOf.get(name)!, g);
      }
      return {
        stats: tf.stack([value, hits]),
        grads: Object.fromEntries(grads),
      };
    });
    const gradMap = new Map(Object.entries(grads) as [string, tf.Tensor][]);
    let values: Float32Array;
    try {
      values = await stats.data() as Float32Array;
    } finally {
      stats.dispose();
    }
    const [loss, accuracy] = values;
    try {
      if (!Number.isFinite(loss)) {
        throw new RangeError(
          `Cannot train classifier: the loss is not finite at step ${
            index + 1
          } (got ${loss}, expected a finite number); no weight was changed`,
        );
      }
      this.optimizer.step(gradMap);
    } finally {
      tf.dispose([...gradMap.values()]);
    }
    this.#step = index + 1;
    return { step: this.#step, loss, accuracy };
  }

  /** Free the optimizer's moments (not the parameters). */
  dispose(): void {
    this.optimizer.dispose();
  }
}

/**
 * Serialise classifier parameters as safetensors (TF layouts, F32).
 *
 * @param params Weights by name.
 * @param metadata Strings to store; `format: "ddpm-classifier"` and `layout: "tf"` are added.
 * @returns The file's bytes.
 * @throws {TypeError} On a missing or misshapen parameter.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { encodeClassifier, initClassifierParams } from "./classifier.ts";
 * await initBackend("cpu");
 * const params = initClassifierParams(0);
 * const bytes = await encodeClassifier(params);
 * console.log(bytes.length > 98_000 * 4); // true
 * tf.dispose([...params.values()]);
 * ```
 */
export async function encodeClassifier(
  params: ReadonlyMap<string, tf.Tensor>,
  metadata: Readonly<Record<string, string>> = {},
): Promise<Uint8Array<ArrayBuffer>> {
  checkParams("save classifier", params);
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const name of classifierParamShapes().keys()) {
    const p = params.get(name)!;
    tensors.set(name, {
      shape: p.shape,
      data: await p.data() as Float32Array,
    });
  }
  return encodeSafetensors(tensors, {
    ...metadata,
    format: "ddpm-classifier",
    layout: "tf",
  });
}

/** Host copies of what {@linkcode DigitClassifier.embed} computed. */
export interface Embedding {
  /** Number of images. */
  count: number;
  /** `count * 64` features, row-major. */
  features: Float32Array;
  /** `count * 10` class probabilities (softmax of the logits), row-major. */
  probs: Float32Array;
}

/**
 * A trained digit classifier: its weights and the forward pass over them.
 *
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { DigitClassifier } from "./classifier.ts";
 * await initBackend("cpu");
 * const classifier = await DigitClassifier.load(); // the shipped weights
 * const x = tf.fill([3, 32, 32, 1], -1) as tf.Tensor4D;
 * const { features, probs } = await classifier.embed(x);
 * console.log(features.length, probs.length); // 192 30
 * x.dispose();
 * classifier.dispose();
 * ```
 */
export class DigitClassifier {
  /** The weights by name (TF layouts). */
  readonly params: Map<string, tf.Tensor>;
  /** The metadata stored with the weights (how they were trained, held-out accuracy). */
  readonly metadata: Readonly<Record<string, string>>;

  /**
   * Wrap weights; takes ownership of the tensors.
   *
   * @param params Weights by name, as {@linkcode classifierParamShapes} lists them.
   * @param metadata Free-form strings describing them.
   * @throws {TypeError} On a missing or misshapen parameter.
   */
  constructor(
    params: Map<string, tf.Tensor>,
    metadata: Readonly<Record<string, string>> = {},
  ) {
    checkParams("make classifier", params);
    this.params = params;
    this.metadata = metadata;
  }

  /**
   * Load weights from safetensors bytes, a path, or a URL (file:, http:, https:).
   *
   * @param source Where the weights are; the shipped {@linkcode CLASSIFIER_WEIGHTS} by default.
   * @returns The classifier; dispose it when done.
   * @throws {SafetensorsError} On a malformed file.
   * @throws {TypeError} On missing or misshapen weights.
   */
  static async load(
    source: string | URL | Uint8Array = CLASSIFIER_WEIGHTS,
  ): Promise<DigitClassifier> {
    let bytes: Uint8Array;
    let name = "<bytes>";
    if (source instanceof Uint8Array) {
      bytes = source;
    } else if (source instanceof URL && source.protocol !== "file:") {
      name = source.href;
      const res = await fetch(source);
      if (!res.ok) {
        await res.body?.cancel();
        throw new Error(
          `Cannot load classifier "${name}": HTTP ${res.status} ${res.statusText} (expected 200)`,
        );
      }
      bytes = new Uint8Array(await res.arrayBuffer());
    } else {
      name = source instanceof URL ? source.pathname : source;
      bytes = await Deno.readFile(source);
    }
    const { tensors, metadata } = decodeSafetensors(bytes, { name });
    const params = new Map<string, tf.Tensor>();
    for (const [key, t] of tensors) {
      if (t.data instanceof Float32Array) {
        params.set(key, tf.tensor(t.data, t.shape, "float32"));
      }
    }
    try {
      return new DigitClassifier(params, metadata);
    } catch (e) {
      tf.dispose([...params.values()]);
      throw e;
    }
  }

  /**
   * Logits and features of a batch (no dropout).
   *
   * @param x Images `[N, 32, 32, 1]` float32 in [-1, 1].
   * @returns Logits `[N, 10]` and features `[N, 64]`; the caller disposes both.
   */
  forward(x: tf.Tensor4D): ClassifierOutput {
    return classifierForward(this.params, x);
  }

  /**
   * Features and class probabilities of many images, read to the host in batches.
   *
   * @param images `[N, 32, 32, 1]` float32 in [-1, 1]; not disposed.
   * @param options `batchSize`: images per forward pass; 500 by default.
   * @returns The features and probabilities on the host.
   */
  async embed(
    images: tf.Tensor4D,
    options: { batchSize?: number } = {},
  ): Promise<Embedding> {
    checkImages("embed images", images);
    const batchSize = options.batchSize ?? 500;
    if (!Number.isInteger(batchSize) || batchSize < 1) {
      throw new RangeError(
        `Cannot embed images: batchSize must be a positive integer (got ${batchSize}, expected >= 1)`,
      );
    }
    const count = images.shape[0];
    const features = new Float32Array(count * CLASSIFIER_FEATURES);
    const probs = new Float32Array(count * CLASSIFIER_CLASSES);
    for (let start = 0; start < count; start += batchSize) {
      const n = Math.min(batchSize, count - start);
      const both = tf.tidy(() => {
        const x = tf.slice(images, [start, 0, 0, 0], [n, -1, -1, -1]);
        const out = this.forward(x);
        return tf.concat([out.features, tf.softmax(out.logits)], 1);
      });
      let data: Float32Array;
      try {
        data = await both.data() as Float32Array;
      } finally {
        both.dispose();
      }
      const width = CLASSIFIER_FEATURES + CLASSIFIER_CLASSES;
      for (let i = 0; i < n; i++) {
        const row = data.subarray(i * width, (i + 1) * width);
        features.set(
          row.subarray(0, CLASSIFIER_FEATURES),
          (start + i) * CLASSIFIER_FEATURES,
        );
        probs.set(
          row.subarray(CLASSIFIER_FEATURES),
          (start + i) * CLASSIFIER_CLASSES,
        );
      }
    }
    return { count, features, probs };
  }

  /** Free the weights. */
  dispose(): void {
    tf.dispose([...this.params.values()]);
  }
}
