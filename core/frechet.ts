/**
 * The Fréchet distance between two sets of feature vectors, each summarised
 * by a Gaussian (Heusel et al. 2017, the "FID" when the features are
 * Inception's; here they are a digit classifier's).
 *
 * Notation:
 *
 * | code           | formula                                               |
 * |----------------|-------------------------------------------------------|
 * | `mean`         | mu = (1/n) sum_i f_i                                  |
 * | `cov`          | Sigma = (1/(n-1)) sum_i (f_i - mu)(f_i - mu)^T (as `numpy.cov`) |
 * | the distance   | \|mu_1 - mu_2\|^2 + tr Sigma_1 + tr Sigma_2 - 2 tr (Sigma_1 Sigma_2)^(1/2) |
 *
 * The value is the *squared* Fréchet (2-Wasserstein) distance between the
 * two Gaussians, which is the number FID papers report. Everything is
 * float64 on the host. tr (Sigma_1 Sigma_2)^(1/2) is computed through the
 * symmetric form tr (Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2))^(1/2), two Jacobi
 * eigen-decompositions, so no complex round-off appears as it can with a
 * general `sqrtm` of the non-symmetric product.
 *
 * @module
 */
import { traceSqrtProduct } from "./_linalg.ts";

/** The mean and covariance of a set of feature vectors, in float64. */
export interface FeatureMoments {
  /** Number of vectors summarised. */
  count: number;
  /** Length of each vector. */
  dim: number;
  /** The mean, length `dim`. */
  mean: Float64Array;
  /** The unbiased covariance (divided by count - 1), row-major `dim * dim`. */
  cov: Float64Array;
}

/**
 * Mean and unbiased covariance of `features.length / dim` vectors, in float64.
 *
 * @param features The vectors, row-major: vector i is `features[i * dim .. (i + 1) * dim)`.
 * @param dim The length of each vector.
 * @returns The count, mean and covariance.
 * @throws {TypeError} When `features.length` is not a multiple of `dim`.
 * @throws {RangeError} On fewer than 2 vectors, or a non-finite value.
 * @example
 * ```ts
 * import { featureMoments } from "./frechet.ts";
 * const m = featureMoments(new Float32Array([0, 0, 2, 4]), 2); // vectors (0, 0) and (2, 4)
 * console.log(m.mean, m.cov); // Float64Array [1, 2], Float64Array [2, 4, 4, 8]
 * ```
 */
export function featureMoments(
  features: Float32Array | Float64Array,
  dim: number,
): FeatureMoments {
  if (!Number.isInteger(dim) || dim < 1) {
    throw new RangeError(
      `Cannot summarise features: dim must be a positive integer (got ${dim}, expected >= 1)`,
    );
  }
  if (features.length % dim !== 0) {
    throw new TypeError(
      `Cannot summarise features: length is not a multiple of dim (got ${features.length}, expected a multiple of ${dim})`,
    );
  }
  const count = features.length / dim;
  if (count < 2) {
    throw new RangeError(
      `Cannot summarise features: a covariance needs at least 2 vectors (got ${count}, expected >= 2)`,
    );
  }
  const mean = new Float64Array(dim);
  for (let i = 0; i < features.length; i++) {
    const v = features[i];
    if (!Number.isFinite(v)) {
      throw new RangeError(
        `Cannot summarise features: vector ${
          Math.floor(i / dim)
        } has a non-finite value (got ${v}, expected a finite number)`,
      );
    }
    mean[i % dim] += v;
  }
  for (let j = 0; j < dim; j++) mean[j] /= count;
  const cov = new Float64Array(dim * dim);
  const centred = new Float64Array(dim);
  for (let n = 0; n < count; n++) {
    for (let j = 0; j < dim; j++) centred[j] = features[n * dim + j] - mean[j];
    for (let i = 0; i < dim; i++) {
      const ci = centred[i];
      if (ci === 0) continue;
      for (let j = i; j < dim; j++) cov[i * dim + j] += ci * centred[j];
    }
  }
  for (let i = 0; i < dim; i++) {
    for (let j = i; j < dim; j++) {
      const c = cov[i * dim + j] / (count - 1);
      cov[i * dim + j] = c;
      cov[j * dim + i] = c;
    }
  }
  return { count, dim, mean, cov };
}

/**
 * The squared Fréchet distance between the Gaussians N(mu_1, Sigma_1) and N(mu_2, Sigma_2).
 *
 * d^2 = |mu_1 - mu_2|^2 + tr Sigma_1 + tr Sigma_2 - 2 tr (Sigma_1 Sigma_2)^(1/2),
 * clamped at 0 against round-off.
 *
 * @param a The first set's moments (from {@linkcode featureMoments}).
 * @param b The second set's moments, of the same dimension.
 * @returns The squared distance, >= 0; 0 for identical moments.
 * @throws {TypeError} When the dimensions differ.
 * @example
 * ```ts
 * import { frechetDistance } from "./frechet.ts";
 * // 1-D: N(0, 4) and N(3, 1): (0 - 3)^2 + (2 - 1)^2 = 10
 * const a = { count: 2, dim: 1, mean: new Float64Array([0]), cov: new Float64Array([4]) };
 * const b = { count: 2, dim: 1, mean: new Float64Array([3]), cov: new Float64Array([1]) };
 * console.log(frechetDistance(a, b)); // 10
 * ```
 */
export function frechetDistance(a: FeatureMoments, b: FeatureMoments): number {
  const d = a.dim;
  if (
    b.dim !== d || a.mean.length !== d || b.mean.length !== d ||
    a.cov.length !== d * d || b.cov.length !== d * d
  ) {
    throw new TypeError(
      `Cannot compute Fréchet distance: feature dimensions differ (got ${a.dim} and ${b.dim}, expected equal, with mean length dim and cov dim * dim)`,
    );
  }
  let meanTerm = 0;
  for (let i = 0; i < d; i++) meanTerm += (a.mean[i] - b.mean[i]) ** 2;
  let traces = 0;
  for (let i = 0; i < d; i++) traces += a.cov[i * d + i] + b.cov[i * d + i];
  const cross = traceSqrtProduct(a.cov, b.cov, d);
  return Math.max(0, meanTerm + traces - 2 * cross);
}
