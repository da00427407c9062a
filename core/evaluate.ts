/**
 * Sample quality as numbers: the Fréchet distance between a digit
 * classifier's features of generated and of real images, beside the same
 * distance between two disjoint sets of real images of the same size (the
 * floor: what a perfect generator would score at this N), the classifier's
 * mean confidence on the samples, and their class histogram (mode collapse
 * shows up there).
 *
 * The Fréchet distance is biased upwards at finite N (the covariance
 * estimates are noisy), so numbers are comparable only at the same N: read
 * a distance against the floor printed beside it.
 *
 * @module
 */
import { tf } from "./backend.ts";
import {
  CLASSIFIER_CLASSES,
  CLASSIFIER_FEATURES,
  DigitClassifier,
  type Embedding,
} from "./classifier.ts";
import { featureMoments, frechetDistance } from "./frechet.ts";

/** Options of {@linkcode evaluateSamples}. */
export interface EvaluateOptions {
  /** The feature extractor; the shipped weights ({@linkcode DigitClassifier.load}) by default, loaded and freed inside. */
  classifier?: DigitClassifier;
  /**
   * Real images for the floor, at least N of them (N spread evenly over the
   * set are used); by default the floor uses N images of `real` interleaved
   * with the reference's, which must then hold 2N.
   */
  floorImages?: tf.Tensor4D;
  /** Images per classifier forward pass; 500 by default. */
  batchSize?: number;
}

/** What {@linkcode evaluateSamples} measured. */
export interface Evaluation {
  /** N: the number of samples, and of real images each set is compared with. */
  count: number;
  /** Squared Fréchet distance between the samples' features and the N reference images'. */
  distance: number;
  /** The same between the N reference images and N other real images: the floor at this N. */
  floor: number;
  /** Mean over the samples of the classifier's largest class probability. */
  meanConfidence: number;
  /** The same over the N reference images, for comparison. */
  realMeanConfidence: number;
  /** How many samples the classifier assigns to each digit 0..9. */
  classHistogram: number[];
}

function confidence(e: Embedding): { mean: number; histogram: number[] } {
  const histogram = new Array(CLASSIFIER_CLASSES).fill(0);
  let sum = 0;
  for (let i = 0; i < e.count; i++) {
    let best = 0;
    for (let c = 1; c < CLASSIFIER_CLASSES; c++) {
      if (
        e.probs[i * CLASSIFIER_CLASSES + c] >
          e.probs[i * CLASSIFIER_CLASSES + best]
      ) best = c;
    }
    histogram[best]++;
    sum += e.probs[i * CLASSIFIER_CLASSES + best];
  }
  return { mean: sum / e.count, histogram };
}

/** k indices spread evenly over [0, count): floor(i count / k). */
function spread(count: number, k: number): Int32Array {
  return Int32Array.from({ length: k }, (_, i) => Math.floor(i * count / k));
}

/**
 * Score generated digits against real ones: Fréchet distance, floor,
 * confidence and class histogram.
 *
 * @param samples N generated images `[N, 32, 32, 1]` float32 in [-1, 1]; not disposed.
 * @param real Real images in the same format, in any order: N of them,
 * spread evenly over the set, are the reference; without
 * `options.floorImages`, N others interleaved with them give the floor
 * (so at least 2N).
 * @param options The classifier, the floor's images and the batch size.
 * @returns The measurements; see {@linkcode Evaluation}.
 * @throws {TypeError} On images of the wrong shape.
 * @throws {RangeError} When there are fewer than 2 samples or too few real images.
 * @example
 * ```ts
 * import { initBackend, tf } from "./backend.ts";
 * import { evaluateSamples } from "./evaluate.ts";
 * await initBackend("cpu");
 * // Stand-ins: real digits come from spreadImages (data/holdout.ts), samples from a sampler.
 * const real = tf.randomUniform([8, 32, 32, 1], -1, 1, "float32", 1) as tf.Tensor4D;
 * const samples = tf.randomUniform([4, 32, 32, 1], -1, 1, "float32", 2) as tf.Tensor4D;
 * const r = await evaluateSamples(samples, real);
 * console.log(r.count, r.classHistogram.length); // 4 10
 * tf.dispose([real, samples]);
 * ```
 */
export async function evaluateSamples(
  samples: tf.Tensor4D,
  real: tf.Tensor4D,
  options: EvaluateOptions = {},
): Promise<Evaluation> {
  for (const [what, x] of [["samples", samples], ["real", real]] as const) {
    if (
      x.rank !== 4 || x.shape[1] !== 32 || x.shape[2] !== 32 || x.shape[3] !== 1
    ) {
      throw new TypeError(
        `Cannot evaluate samples: ${what} must be [N, 32, 32, 1] (got [${x.shape}], expected [N, 32, 32, 1])`,
      );
    }
  }
  const n = samples.shape[0];
  if (n < 2) {
    throw new RangeError(
      `Cannot evaluate samples: a covariance needs at least 2 samples (got ${n}, expected >= 2)`,
    );
  }
  const floorImages = options.floorImages;
  if (floorImages === undefined && real.shape[0] < 2 * n) {
    throw new RangeError(
      `Cannot evaluate samples: too few real images for the reference and the floor (got ${
        real.shape[0]
      }, expected at least 2N = ${2 * n}, or pass floorImages)`,
    );
  }
  if (real.shape[0] < n || (floorImages?.shape[0] ?? n) < n) {
    throw new RangeError(
      `Cannot evaluate samples: too few real images (got ${
        real.shape[0]
      } real and ${
        floorImages?.shape[0]
      } for the floor, expected at least N = ${n} each)`,
    );
  }
  // Indices spread evenly over each set, so that a set sorted by class
  // still gives every class its share.
  let refIndices: Int32Array;
  let floorIndices: Int32Array;
  if (floorImages === undefined) {
    const both = spread(real.shape[0], 2 * n);
    refIndices = both.filter((_, i) => i % 2 === 0);
    floorIndices = both.filter((_, i) => i % 2 === 1);
  } else {
    refIndices = spread(real.shape[0], n);
    floorIndices = spread(floorImages.shape[0], n);
  }
  const classifier = options.classifier ?? await DigitClassifier.load();
  const batch = { batchSize: options.batchSize };
  try {
    const embed = async (x: tf.Tensor4D, indices?: Int32Array) => {
      if (indices === undefined) return await classifier.embed(x, batch);
      const part = tf.gather(x, indices);
      try {
        return await classifier.embed(part, batch);
      } finally {
        part.dispose();
      }
    };
    const fake = await embed(samples);
    const ref = await embed(real, refIndices);
    const other = await embed(floorImages ?? real, floorIndices);
    const dim = CLASSIFIER_FEATURES;
    const refMoments = featureMoments(ref.features, dim);
    const fakeConfidence = confidence(fake);
    return {
      count: n,
      distance: frechetDistance(featureMoments(fake.features, dim), refMoments),
      floor: frechetDistance(featureMoments(other.features, dim), refMoments),
      meanConfidence: fakeConfidence.mean,
      realMeanConfidence: confidence(ref).mean,
      classHistogram: fakeConfidence.histogram,
    };
  } finally {
    if (options.classifier === undefined) classifier.dispose();
  }
}
