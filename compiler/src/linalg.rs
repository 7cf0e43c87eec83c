//! Dense symmetric linear algebra the editing methods need beyond candle's matmul: a Cholesky
//! factor (solves with `C`, rank-one updates) and a symmetric eigendecomposition (the null space
//! of the preserved keys' second moment, AlphaEdit). f64 throughout: both are computed once per
//! compile on matrices of at most `n_ff²`.

use crate::error::{CompileError, Result};

/// Lower-triangular Cholesky factor of a symmetric positive-definite matrix.
#[derive(Clone, Debug)]
pub struct Cholesky {
    n: usize,
    /// Row-major `[n, n]`, zero above the diagonal.
    l: Vec<f64>,
}

impl Cholesky {
    /// Factors `a` (row-major `[n, n]`, symmetric; only its lower triangle is read). `None` when
    /// it is not positive definite.
    pub fn new(mut a: Vec<f64>, n: usize) -> Option<Cholesky> {
        assert_eq!(a.len(), n * n, "Cholesky::new: not an n×n matrix");
        // Row-oriented: the inner dot products are contiguous.
        for j in 0..n {
            let (done, rest) = a.split_at_mut(j * n);
            let row_j = &mut rest[..n];
            for k in 0..j {
                let row_k = &done[k * n..k * n + n];
                let dot: f64 = row_j[..k].iter().zip(&row_k[..k]).map(|(x, y)| x * y).sum();
                row_j[k] = (row_j[k] - dot) / row_k[k];
            }
            let d = row_j[j] - row_j[..j].iter().map(|x| x * x).sum::<f64>();
            if !(d > 0.0) || !d.is_finite() {
                return None;
            }
            row_j[j] = d.sqrt();
            row_j[j + 1..].iter_mut().for_each(|x| *x = 0.0);
        }
        Some(Cholesky { n, l: a })
    }

    pub fn dim(&self) -> usize {
        self.n
    }

    /// `A⁻¹ b`.
    pub fn solve(&self, b: &[f64]) -> Vec<f64> {
        let n = self.n;
        let mut y = b.to_vec();
        for i in 0..n {
            let dot: f64 = self.l[i * n..i * n + i]
                .iter()
                .zip(&y[..i])
                .map(|(a, b)| a * b)
                .sum();
            y[i] = (y[i] - dot) / self.l[i * n + i];
        }
        for i in (0..n).rev() {
            let mut s = y[i];
            for (j, yj) in y.iter().enumerate().skip(i + 1) {
                s -= self.l[j * n + i] * yj;
            }
            y[i] = s / self.l[i * n + i];
        }
        y
    }

    /// `A += x xᵀ` (rank-one update of the factor).
    pub fn add(&mut self, x: &[f64]) {
        let n = self.n;
        let mut x = x.to_vec();
        for i in 0..n {
            let lii = self.l[i * n + i];
            let r = (lii * lii + x[i] * x[i]).sqrt();
            let (c, s) = (r / lii, x[i] / lii);
            self.l[i * n + i] = r;
            for (j, xj) in x.iter_mut().enumerate().skip(i + 1) {
                let lji = (self.l[j * n + i] + s * *xj) / c;
                *xj = c * *xj - s * lji;
                self.l[j * n + i] = lji;
            }
        }
    }
}

/// Eigendecomposition of a symmetric matrix: `values` ascending, `vectors` row-major with row
/// `i` the unit eigenvector of `values[i]`.
#[derive(Clone, Debug)]
pub struct SymmetricEigen {
    pub n: usize,
    pub values: Vec<f64>,
    pub vectors: Vec<f64>,
}

impl SymmetricEigen {
    /// Householder reduction to tridiagonal form, then implicit QL with Wilkinson shifts
    /// (O(n³); about 20 s single-threaded for n = 2048). `a` is row-major `[n, n]`, symmetric.
    pub fn new(mut a: Vec<f64>, n: usize) -> Result<SymmetricEigen> {
        assert_eq!(a.len(), n * n, "SymmetricEigen::new: not an n×n matrix");
        if a.iter().any(|x| !x.is_finite()) {
            return Err(CompileError::Numeric(
                "eigendecomposition of a matrix with non-finite entries".into(),
            ));
        }
        if n == 0 {
            return Ok(SymmetricEigen {
                n,
                values: Vec::new(),
                vectors: Vec::new(),
            });
        }
        // qt = Qᵀ, row-major: row i of Qᵀ is column i of Q. The QL rotations mix adjacent
        // columns of Q, i.e. adjacent (contiguous) rows of Qᵀ.
        let mut qt = vec![0.0f64; n * n];
        for i in 0..n {
            qt[i * n + i] = 1.0;
        }
        let mut d = vec![0.0f64; n];
        let mut e = vec![0.0f64; n];
        let mut v = vec![0.0f64; n];
        let mut p = vec![0.0f64; n];
        // Householder: column k below the diagonal is reflected onto its first entry; the
        // trailing block becomes H A H (a symmetric rank-two update) and Q accumulates H.
        for k in 0..n.saturating_sub(2) {
            let m = n - k - 1; // length of the reflected part, rows k+1..n
            let x: Vec<f64> = (k + 1..n).map(|i| a[i * n + k]).collect();
            let norm = x.iter().map(|t| t * t).sum::<f64>().sqrt();
            if norm == 0.0 {
                e[k] = 0.0;
                continue;
            }
            let alpha = if x[0] > 0.0 { -norm } else { norm };
            v[..m].copy_from_slice(&x);
            v[0] -= alpha;
            let vtv: f64 = v[..m].iter().map(|t| t * t).sum();
            if vtv == 0.0 {
                e[k] = x[0];
                continue;
            }
            let beta = 2.0 / vtv;
            // p = beta A' v (A' the trailing block), K = beta/2 vᵀp, w = p − K v.
            for i in 0..m {
                let row = &a[(k + 1 + i) * n + k + 1..(k + 1 + i) * n + n];
                p[i] = beta * row.iter().zip(&v[..m]).map(|(r, s)| r * s).sum::<f64>();
            }
            let kk = 0.5 * beta * p[..m].iter().zip(&v[..m]).map(|(r, s)| r * s).sum::<f64>();
            for i in 0..m {
                p[i] -= kk * v[i];
            }
            for i in 0..m {
                let (vi, wi) = (v[i], p[i]);
                let row = &mut a[(k + 1 + i) * n + k + 1..(k + 1 + i) * n + n];
                for ((r, vj), wj) in row.iter_mut().zip(&v[..m]).zip(&p[..m]) {
                    *r -= vi * wj + wi * vj;
                }
            }
            e[k] = alpha;
            // Qᵀ rows k+1..n: Qᵀ_S -= beta v (vᵀ Qᵀ_S).
            let mut u = vec![0.0f64; n];
            for i in 0..m {
                let row = &qt[(k + 1 + i) * n..(k + 2 + i) * n];
                for (uj, r) in u.iter_mut().zip(row) {
                    *uj += v[i] * r;
                }
            }
            for i in 0..m {
                let f = beta * v[i];
                let row = &mut qt[(k + 1 + i) * n..(k + 2 + i) * n];
                for (r, uj) in row.iter_mut().zip(&u) {
                    *r -= f * uj;
                }
            }
        }
        for i in 0..n {
            d[i] = a[i * n + i];
        }
        if n >= 2 {
            e[n - 2] = a[(n - 1) * n + n - 2];
        }
        e[n.saturating_sub(1)] = 0.0;
        // Implicit QL on the tridiagonal (d, e), e[i] coupling i and i+1.
        for l in 0..n {
            let mut iter = 0;
            loop {
                let mut m = l;
                while m + 1 < n {
                    let dd = d[m].abs() + d[m + 1].abs();
                    if e[m].abs() <= f64::EPSILON * dd {
                        break;
                    }
                    m += 1;
                }
                if m == l {
                    break;
                }
                iter += 1;
                if iter > 64 {
                    return Err(CompileError::Numeric(
                        "eigendecomposition did not converge".into(),
                    ));
                }
                let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
                let mut r = g.hypot(1.0);
                g = d[m] - d[l] + e[l] / (g + r.copysign(g));
                let (mut s, mut c, mut pp) = (1.0f64, 1.0f64, 0.0f64);
                let mut i = m;
                let mut deflated = false;
                while i > l {
                    i -= 1;
                    let f = s * e[i];
                    let b = c * e[i];
                    r = f.hypot(g);
                    e[i + 1] = r;
                    if r == 0.0 {
                        d[i + 1] -= pp;
                        e[m] = 0.0;
                        deflated = true;
                        break;
                    }
                    s = f / r;
                    c = g / r;
                    g = d[i + 1] - pp;
                    r = (d[i] - g) * s + 2.0 * c * b;
                    pp = s * r;
                    d[i + 1] = g + pp;
                    g = c * r - b;
                    let (lo, hi) = qt.split_at_mut((i + 1) * n);
                    let zi = &mut lo[i * n..];
                    let zi1 = &mut hi[..n];
                    for (a0, a1) in zi.iter_mut().zip(zi1.iter_mut()) {
                        let t = *a1;
                        *a1 = s * *a0 + c * t;
                        *a0 = c * *a0 - s * t;
                    }
                }
                if deflated {
                    continue;
                }
                d[l] -= pp;
                e[l] = g;
                e[m] = 0.0;
            }
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| d[x].total_cmp(&d[y]));
        let values = order.iter().map(|&i| d[i]).collect();
        let mut vectors = Vec::with_capacity(n * n);
        for &i in &order {
            vectors.extend_from_slice(&qt[i * n..(i + 1) * n]);
        }
        Ok(SymmetricEigen { n, values, vectors })
    }

    /// Row `i` of the eigenvectors.
    pub fn vector(&self, i: usize) -> &[f64] {
        &self.vectors[i * self.n..(i + 1) * self.n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f64 / 1000.0 - 1.0
        };
        let b: Vec<f64> = (0..n * n).map(|_| next()).collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = b[i * n + j] + b[j * n + i];
            }
        }
        a
    }

    #[test]
    fn eigen_reconstructs_and_is_orthonormal() {
        for (n, seed) in [(1, 3), (2, 5), (7, 11), (64, 13)] {
            let a = sym(n, seed);
            let eig = SymmetricEigen::new(a.clone(), n).unwrap();
            assert!(eig.values.windows(2).all(|w| w[0] <= w[1]));
            for i in 0..n {
                let v = eig.vector(i);
                // A v = λ v
                for r in 0..n {
                    let av: f64 = (0..n).map(|c| a[r * n + c] * v[c]).sum();
                    assert!(
                        (av - eig.values[i] * v[r]).abs() < 1e-9,
                        "n {n}: residual at {i},{r}"
                    );
                }
                for j in 0..n {
                    let dot: f64 = v.iter().zip(eig.vector(j)).map(|(x, y)| x * y).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-9, "n {n}: not orthonormal {i},{j}");
                }
            }
        }
    }

    #[test]
    fn eigen_of_a_rank_deficient_moment_has_a_null_space() {
        // K Kᵀ with 3 keys in 10 dimensions: 7 eigenvalues are zero.
        let n = 10;
        let k = sym(n, 21);
        let mut m = vec![0.0; n * n];
        for key in k.chunks(n).take(3) {
            for i in 0..n {
                for j in 0..n {
                    m[i * n + j] += key[i] * key[j];
                }
            }
        }
        let eig = SymmetricEigen::new(m, n).unwrap();
        let zero = eig.values.iter().filter(|v| v.abs() < 1e-9).count();
        assert_eq!(zero, 7);
        // Null-space vectors are orthogonal to every key.
        for i in 0..7 {
            for key in k.chunks(n).take(3) {
                let dot: f64 = key.iter().zip(eig.vector(i)).map(|(x, y)| x * y).sum();
                assert!(dot.abs() < 1e-9);
            }
        }
    }

    #[test]
    fn eigen_refuses_non_finite() {
        assert!(SymmetricEigen::new(vec![1.0, f64::NAN, f64::NAN, 1.0], 2).is_err());
    }

    #[test]
    fn cholesky_solves_and_updates() {
        let n = 6;
        let mut a = sym(n, 7);
        for i in 0..n {
            a[i * n + i] += 20.0;
        }
        let ch = Cholesky::new(a.clone(), n).unwrap();
        let b: Vec<f64> = (0..n).map(|i| i as f64 - 2.0).collect();
        let x = ch.solve(&b);
        for r in 0..n {
            let ax: f64 = (0..n).map(|c| a[r * n + c] * x[c]).sum();
            assert!((ax - b[r]).abs() < 1e-10);
        }
        let u: Vec<f64> = (0..n).map(|i| 0.5 - i as f64 * 0.1).collect();
        let mut up = ch.clone();
        up.add(&u);
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] += u[i] * u[j];
            }
        }
        let x = up.solve(&b);
        for r in 0..n {
            let ax: f64 = (0..n).map(|c| a[r * n + c] * x[c]).sum();
            assert!((ax - b[r]).abs() < 1e-9);
        }
        assert!(Cholesky::new(vec![1.0, 2.0, 2.0, 1.0], 2).is_none());
    }
}
