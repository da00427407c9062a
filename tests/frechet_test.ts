import assert from "node:assert/strict";
import {
  type FeatureMoments,
  featureMoments,
  frechetDistance,
} from "../core/frechet.ts";
import { symmetricEigen, traceSqrtProduct } from "../core/_linalg.ts";
import { uniform } from "./_util.ts";

/** Standard normals by Box-Muller. */
function normal(seed: number): () => number {
  const u = uniform(seed);
  return () => Math.sqrt(-2 * Math.log(1 - u())) * Math.cos(2 * Math.PI * u());
}

function moments(mean: number[], cov: number[]): FeatureMoments {
  return {
    count: 100,
    dim: mean.length,
    mean: Float64Array.from(mean),
    cov: Float64Array.from(cov),
  };
}

function diag(values: number[]): number[] {
  const d = values.length;
  const m = new Array(d * d).fill(0);
  values.forEach((v, i) => (m[i * d + i] = v));
  return m;
}

/** A random orthogonal matrix: Gram-Schmidt on normal columns. */
function randomRotation(d: number, seed: number): number[][] {
  const g = normal(seed);
  const q: number[][] = [];
  for (let c = 0; c < d; c++) {
    const v = Array.from({ length: d }, g);
    for (const u of q) {
      const dot = u.reduce((s, ui, i) => s + ui * v[i], 0);
      for (let i = 0; i < d; i++) v[i] -= dot * u[i];
    }
    const norm = Math.hypot(...v);
    q.push(v.map((x) => x / norm));
  }
  return q; // rows are orthonormal
}

/** R^T diag(values) R with R's rows orthonormal. */
function rotated(values: number[], r: number[][]): number[] {
  const d = values.length;
  const m = new Array(d * d).fill(0);
  for (let i = 0; i < d; i++) {
    for (let j = 0; j < d; j++) {
      for (let k = 0; k < d; k++) m[i * d + j] += r[k][i] * values[k] * r[k][j];
    }
  }
  return m;
}

function mul(a: number[], b: number[], d: number): number[] {
  const out = new Array(d * d).fill(0);
  for (let i = 0; i < d; i++) {
    for (let j = 0; j < d; j++) {
      for (let k = 0; k < d; k++) out[i * d + j] += a[i * d + k] * b[k * d + j];
    }
  }
  return out;
}

/** Gauss-Jordan inverse with partial pivoting. */
function inverse(a: number[], d: number): number[] {
  const m = a.slice();
  const inv = diag(new Array(d).fill(1));
  for (let c = 0; c < d; c++) {
    let p = c;
    for (let r = c + 1; r < d; r++) {
      if (Math.abs(m[r * d + c]) > Math.abs(m[p * d + c])) p = r;
    }
    for (let k = 0; k < d; k++) {
      [m[c * d + k], m[p * d + k]] = [m[p * d + k], m[c * d + k]];
      [inv[c * d + k], inv[p * d + k]] = [inv[p * d + k], inv[c * d + k]];
    }
    const piv = m[c * d + c];
    for (let k = 0; k < d; k++) {
      m[c * d + k] /= piv;
      inv[c * d + k] /= piv;
    }
    for (let r = 0; r < d; r++) {
      if (r === c) continue;
      const f = m[r * d + c];
      for (let k = 0; k < d; k++) {
        m[r * d + k] -= f * m[c * d + k];
        inv[r * d + k] -= f * inv[c * d + k];
      }
    }
  }
  return inv;
}

/**
 * A second implementation of tr sqrt(A B): the Denman-Beavers iteration on
 * the non-symmetric product itself (no eigen-decomposition).
 */
function traceSqrtDenmanBeavers(a: number[], b: number[], d: number): number {
  let y = mul(a, b, d);
  let z = diag(new Array(d).fill(1));
  for (let k = 0; k < 60; k++) {
    const yi = inverse(y, d);
    const zi = inverse(z, d);
    y = y.map((v, i) => 0.5 * (v + zi[i]));
    z = z.map((v, i) => 0.5 * (v + yi[i]));
  }
  let trace = 0;
  for (let i = 0; i < d; i++) trace += y[i * d + i];
  return trace;
}

/** A random symmetric positive-definite matrix G G^T / d + shift I. */
function randomSpd(d: number, seed: number, shift = 0.1): number[] {
  const g = normal(seed);
  const m = Array.from({ length: d * d }, g);
  const out = new Array(d * d).fill(0);
  for (let i = 0; i < d; i++) {
    for (let j = 0; j < d; j++) {
      for (let k = 0; k < d; k++) {
        out[i * d + j] += m[i * d + k] * m[j * d + k] / d;
      }
    }
    out[i * d + i] += shift;
  }
  return out;
}

function close(actual: number, expected: number, tol: number, what: string) {
  assert.ok(
    Math.abs(actual - expected) <= tol,
    `${what}: got ${actual}, expected ${expected} +- ${tol}`,
  );
}

Deno.test("featureMoments gives the mean and the n - 1 covariance by hand", () => {
  // Vectors (1, 2), (3, 0), (5, 4): mean (3, 2);
  // deviations (-2, 0), (0, -2), (2, 2); sums of products xx 8, xy 4, yy 8; / 2.
  const m = featureMoments(new Float32Array([1, 2, 3, 0, 5, 4]), 2);
  assert.equal(m.count, 3);
  assert.deepEqual([...m.mean], [3, 2]);
  assert.deepEqual([...m.cov], [4, 2, 2, 4]);
});

Deno.test("featureMoments rejects bad input with one-line errors", () => {
  assert.throws(() => featureMoments(new Float32Array(5), 2), TypeError);
  assert.throws(() => featureMoments(new Float32Array(2), 2), RangeError);
  assert.throws(
    () => featureMoments(new Float32Array([0, NaN, 1, 2]), 2),
    RangeError,
  );
  assert.throws(() => featureMoments(new Float32Array(4), 0), RangeError);
});

Deno.test("symmetricEigen reconstructs a random symmetric matrix", () => {
  const d = 7;
  const a = Float64Array.from(randomSpd(d, 3, -0.5)); // indefinite
  const { values, vectors: v } = symmetricEigen(a, d);
  for (let i = 0; i < d; i++) {
    for (let j = 0; j < d; j++) {
      let sum = 0;
      for (let k = 0; k < d; k++) {
        sum += v[i * d + k] * values[k] * v[j * d + k];
      }
      close(sum, a[i * d + j], 1e-12, `A[${i},${j}]`);
    }
  }
});

Deno.test("frechetDistance of a set with itself is 0", () => {
  const g = normal(11);
  const d = 16;
  const f = new Float32Array(500 * d);
  for (let n = 0; n < 500; n++) {
    const z = Array.from({ length: d }, g);
    for (let j = 0; j < d; j++) f[n * d + j] = z[j] + 0.8 * z[(j + 1) % d] + 3;
  }
  const m = featureMoments(f, d);
  close(frechetDistance(m, m), 0, 1e-9, "d(A, A)");
});

Deno.test("frechetDistance matches the closed form for diagonal covariances", () => {
  const a = [0.5, 1, 2, 4, 9, 0];
  const b = [2, 1, 0.25, 1, 16, 3];
  const mu1 = [0, 1, 2, 3, 4, 5];
  const mu2 = [1, 1, 0, 3, 4, 2];
  let expected = 0;
  for (let i = 0; i < a.length; i++) {
    expected += (Math.sqrt(a[i]) - Math.sqrt(b[i])) ** 2 +
      (mu1[i] - mu2[i]) ** 2;
  }
  const got = frechetDistance(moments(mu1, diag(a)), moments(mu2, diag(b)));
  close(got, expected, 1e-10, "diagonal");
});

Deno.test("frechetDistance is the diagonal closed form after a common rotation", () => {
  const d = 8;
  const r = randomRotation(d, 5);
  const a = [0.1, 0.5, 1, 2, 3, 5, 8, 13];
  const b = [1, 1, 4, 0.5, 3, 2, 1e-6, 20];
  let expected = 0;
  for (let i = 0; i < d; i++) {
    expected += (Math.sqrt(a[i]) - Math.sqrt(b[i])) ** 2;
  }
  const mu = new Array(d).fill(0);
  const got = frechetDistance(
    moments(mu, rotated(a, r)),
    moments(mu, rotated(b, r)),
  );
  close(got, expected, 1e-9, "rotated");
});

Deno.test("tr sqrt(A B) matches the 2x2 closed form for non-commuting A and B", () => {
  // For 2x2 M with positive eigenvalues: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
  const a = [2, 1, 1, 3];
  const b = [1, -0.5, -0.5, 4];
  const ab = mul(a, b, 2);
  const expected = Math.sqrt(
    ab[0] + ab[3] + 2 * Math.sqrt(ab[0] * ab[3] - ab[1] * ab[2]),
  );
  close(
    traceSqrtProduct(Float64Array.from(a), Float64Array.from(b), 2),
    expected,
    1e-12,
    "2x2",
  );
  // And the distance: tr A + tr B - 2 tr sqrt(AB), means equal.
  close(
    frechetDistance(moments([0, 0], a), moments([0, 0], b)),
    5 + 5 - 2 * expected,
    1e-12,
    "2x2 distance",
  );
});

Deno.test("tr sqrt(A B) agrees with a Denman-Beavers iteration on random 6x6 matrices", () => {
  for (const seed of [1, 2, 3]) {
    const a = randomSpd(6, seed);
    const b = randomSpd(6, seed + 100);
    const expected = traceSqrtDenmanBeavers(a, b, 6);
    close(
      traceSqrtProduct(Float64Array.from(a), Float64Array.from(b), 6),
      expected,
      1e-9,
      `seed ${seed}`,
    );
  }
});

Deno.test("frechetDistance is symmetric and finite on rank-deficient covariances", () => {
  // 20 vectors in 32 dimensions: both covariances have rank at most 19.
  const g = normal(9);
  const d = 32;
  const f1 = Float32Array.from({ length: 20 * d }, g);
  const f2 = Float32Array.from({ length: 20 * d }, () => 2 * g());
  const m1 = featureMoments(f1, d);
  const m2 = featureMoments(f2, d);
  const ab = frechetDistance(m1, m2);
  const ba = frechetDistance(m2, m1);
  assert.ok(Number.isFinite(ab) && ab > 0);
  close(ab, ba, 1e-8 * ab, "symmetry");
  close(frechetDistance(m1, m1), 0, 1e-9, "d(A, A) rank-deficient");
});

Deno.test("frechetDistance of large Gaussian samples approaches the closed form", () => {
  // N(mu1, diag(a)) vs N(mu2, diag(b)) sampled 20000 times each, d = 4.
  const g = normal(21);
  const a = [1, 4, 0.25, 9];
  const b = [4, 1, 0.25, 1];
  const mu1 = [0, 0, 1, 0];
  const mu2 = [1, 0, 1, 0];
  const n = 20000;
  const f1 = new Float64Array(n * 4);
  const f2 = new Float64Array(n * 4);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < 4; j++) {
      f1[i * 4 + j] = mu1[j] + Math.sqrt(a[j]) * g();
      f2[i * 4 + j] = mu2[j] + Math.sqrt(b[j]) * g();
    }
  }
  let expected = 0;
  for (let j = 0; j < 4; j++) {
    expected += (Math.sqrt(a[j]) - Math.sqrt(b[j])) ** 2 +
      (mu1[j] - mu2[j]) ** 2;
  }
  // expected = 1 + 1 + 0 + 4 + 1 = 7; sampling error is about 0.1 at this n.
  close(
    frechetDistance(featureMoments(f1, 4), featureMoments(f2, 4)),
    expected,
    0.2,
    "sampled",
  );
});

Deno.test("frechetDistance rejects moments of different dimensions", () => {
  assert.throws(
    () => frechetDistance(moments([0], [1]), moments([0, 0], diag([1, 1]))),
    TypeError,
  );
});
