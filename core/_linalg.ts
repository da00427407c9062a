/**
 * Small dense float64 linear algebra on the host, for the Fréchet distance.
 *
 * Matrices are row-major `Float64Array`s of `d * d` entries.
 *
 * @module
 */

/** A symmetric matrix's eigen-decomposition: A = V diag(values) V^T. */
export interface SymmetricEigen {
  /** The eigenvalues, unordered. */
  values: Float64Array;
  /** The eigenvectors as columns, row-major `d * d`. */
  vectors: Float64Array;
}

/**
 * Eigen-decompose a symmetric matrix by cyclic Jacobi rotations.
 *
 * Each rotation zeroes one off-diagonal pair (Rutishauser's formulation, as
 * in Numerical Recipes' `jacobi`); sweeps stop when the off-diagonal mass is
 * below 1e-30 of the total, or after 100 sweeps. Jacobi is slow (O(d^3) per
 * sweep) but accurate to the last bits on small eigenvalues, which is what a
 * matrix square root of a nearly singular covariance needs.
 *
 * @param a Symmetric `d * d` matrix (only read; the upper triangle must mirror the lower).
 * @param d Its order.
 * @returns Eigenvalues and column eigenvectors.
 */
export function symmetricEigen(a: Float64Array, d: number): SymmetricEigen {
  const m = Float64Array.from(a);
  const v = new Float64Array(d * d);
  for (let i = 0; i < d; i++) v[i * d + i] = 1;
  let total = 0;
  for (let i = 0; i < d * d; i++) total += m[i] * m[i];
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    for (let p = 0; p < d; p++) {
      for (let q = p + 1; q < d; q++) off += m[p * d + q] * m[p * d + q];
    }
    if (off <= 1e-30 * total || off === 0) break;
    for (let p = 0; p < d - 1; p++) {
      for (let q = p + 1; q < d; q++) {
        const apq = m[p * d + q];
        if (apq === 0) continue;
        const app = m[p * d + p];
        const aqq = m[q * d + q];
        // t = tan(phi), the smaller root of t^2 + 2 theta t - 1 = 0.
        const theta = (aqq - app) / (2 * apq);
        const t = Math.sign(theta || 1) /
          (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        // A' = J^T A J with J the rotation in the (p, q) plane.
        for (let k = 0; k < d; k++) {
          const akp = m[k * d + p];
          const akq = m[k * d + q];
          m[k * d + p] = c * akp - s * akq;
          m[k * d + q] = s * akp + c * akq;
        }
        for (let k = 0; k < d; k++) {
          const apk = m[p * d + k];
          const aqk = m[q * d + k];
          m[p * d + k] = c * apk - s * aqk;
          m[q * d + k] = s * apk + c * aqk;
        }
        m[p * d + q] = 0;
        m[q * d + p] = 0;
        for (let k = 0; k < d; k++) {
          const vkp = v[k * d + p];
          const vkq = v[k * d + q];
          v[k * d + p] = c * vkp - s * vkq;
          v[k * d + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  const values = new Float64Array(d);
  for (let i = 0; i < d; i++) values[i] = m[i * d + i];
  return { values, vectors: v };
}

/**
 * The principal square root of a symmetric positive semi-definite matrix,
 * V diag(sqrt(max(lambda, 0))) V^T (round-off negatives clamp to 0).
 *
 * @param a Symmetric `d * d` matrix.
 * @param d Its order.
 * @returns Its square root, symmetric, row-major.
 */
export function sqrtmPsd(a: Float64Array, d: number): Float64Array {
  const { values, vectors: v } = symmetricEigen(a, d);
  const root = values.map((x) => Math.sqrt(Math.max(x, 0)));
  const out = new Float64Array(d * d);
  for (let i = 0; i < d; i++) {
    for (let j = i; j < d; j++) {
      let sum = 0;
      for (let k = 0; k < d; k++) sum += v[i * d + k] * root[k] * v[j * d + k];
      out[i * d + j] = sum;
      out[j * d + i] = sum;
    }
  }
  return out;
}

/**
 * The product of two `d * d` matrices.
 *
 * @param a Left factor.
 * @param b Right factor.
 * @param d Their order.
 * @returns a b, row-major.
 */
export function matMul(
  a: Float64Array,
  b: Float64Array,
  d: number,
): Float64Array {
  const out = new Float64Array(d * d);
  for (let i = 0; i < d; i++) {
    for (let k = 0; k < d; k++) {
      const aik = a[i * d + k];
      if (aik === 0) continue;
      for (let j = 0; j < d; j++) out[i * d + j] += aik * b[k * d + j];
    }
  }
  return out;
}

/**
 * tr sqrt(A B) for symmetric PSD A and B, through the symmetric form
 * tr sqrt(A^(1/2) B A^(1/2)) (the same eigenvalues as A B, all real and
 * non-negative), with round-off negatives clamped to 0.
 *
 * @param a Symmetric PSD `d * d`.
 * @param b Symmetric PSD `d * d`.
 * @param d Their order.
 * @returns The trace of the principal square root of A B.
 */
export function traceSqrtProduct(
  a: Float64Array,
  b: Float64Array,
  d: number,
): number {
  const root = sqrtmPsd(a, d);
  const m = matMul(matMul(root, b, d), root, d);
  // Symmetrise away round-off before the symmetric eigen-solver sees it.
  for (let i = 0; i < d; i++) {
    for (let j = i + 1; j < d; j++) {
      const s = 0.5 * (m[i * d + j] + m[j * d + i]);
      m[i * d + j] = s;
      m[j * d + i] = s;
    }
  }
  const { values } = symmetricEigen(m, d);
  let trace = 0;
  for (const x of values) trace += Math.sqrt(Math.max(x, 0));
  return trace;
}
