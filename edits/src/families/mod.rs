//! The four edit families' inference-time math (pure, unit-tested).
//!
//! Every family borrows its payload as row-major little-endian `f32` slices (zero-copy over a
//! bundle's bytes) and validates shapes and values once in `new`; the per-token paths then never
//! fail and never allocate.
//!
//! - [`Codebook`] (GRACE): nearest-key lookup with per-entry radii, replacing a row.
//! - [`PatchNeurons`] (T-Patcher): `out += act(K x + b)ᵀ V`.
//! - [`LowRank`] (LoRA / ROME / MEMIT): `ΔW = alpha/r · B A`, exported as a llama.cpp GGUF-LoRA.
//! - [`Memory`] (SERAC): cosine retrieval over edit embeddings plus a counterfactual prompt.
//!
//! The dense kernels ([`dot`], [`sq_dist`], [`axpy`]) use 16 independent f32 accumulators so the
//! compiler vectorizes them on stable Rust; with `std` on x86_64 the scans are additionally
//! compiled for AVX2 and picked at run time. The summation order is the same on every path, so
//! results are bitwise identical whichever path runs.

use alloc::vec::Vec;
use core::fmt;

mod codebook;
mod low_rank;
mod memory;
mod neurons;

pub use codebook::{Codebook, CodebookHit, Distance};
pub use low_rank::{LowRank, LowRankTensor};
pub use memory::{Embedder, Memory, MemoryHit, MemoryRecord};
pub use neurons::{Activation, PatchNeurons};

/// A payload that cannot be used: wrong shape, non-finite value, bad parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidPayload(pub &'static str);

impl fmt::Display for InvalidPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid edit payload: {}", self.0)
    }
}

impl core::error::Error for InvalidPayload {}

/// How per-token rows become one embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[repr(u8)]
pub enum Pooling {
    /// Mean over all rows (tokens).
    Mean = 0,
    /// The last row (last token).
    Last = 1,
}

impl Pooling {
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Pooling> {
        match code {
            0 => Some(Pooling::Mean),
            1 => Some(Pooling::Last),
            _ => None,
        }
    }
}

/// Scale `v` to unit L2 norm in place; a zero or non-finite norm leaves `v` unchanged (returns
/// false), since there is no direction to keep.
pub fn l2_normalize(v: &mut [f32]) -> bool {
    let norm = libm::sqrtf(dot(v, v));
    if !(norm.is_finite() && norm > 0.0) {
        return false;
    }
    let inv = 1.0 / norm;
    v.iter_mut().for_each(|x| *x *= inv);
    true
}

/// Pool `rows` (`[t, dim]` row-major, `t >= 1`) into one `dim`-vector (not normalized).
pub fn pooled(rows: &[f32], dim: usize, pooling: Pooling) -> Result<Vec<f32>, InvalidPayload> {
    if dim == 0 || rows.is_empty() || rows.len() % dim != 0 {
        return Err(InvalidPayload("pooled: rows must be a non-empty [t, dim] matrix"));
    }
    let t = rows.len() / dim;
    Ok(match pooling {
        Pooling::Last => rows[(t - 1) * dim..].to_vec(),
        Pooling::Mean => {
            let mut out = alloc::vec![0.0f32; dim];
            for row in rows.chunks_exact(dim) {
                axpy(1.0, row, &mut out);
            }
            let inv = 1.0 / t as f32;
            out.iter_mut().for_each(|x| *x *= inv);
            out
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Kernels

const LANES: usize = 16;

#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    // Fixed pairwise tree: the same order on every target.
    let mut a = [0.0f32; 8];
    for i in 0..8 {
        a[i] = acc[i] + acc[i + 8];
    }
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// `Σ a_i b_i` over the common length.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    reduce(acc) + tail
}

/// `Σ (a_i - b_i)²` over the common length.
#[inline(always)]
pub fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        let d = x - y;
        tail += d * d;
    }
    reduce(acc) + tail
}

/// `y += a · x` over the common length.
#[inline(always)]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Is row `i` enabled by the optional mask (rows past the mask's end are disabled)?
#[inline(always)]
fn is_active(active: Option<&[bool]>, i: usize) -> bool {
    match active {
        None => true,
        Some(m) => m.get(i).copied().unwrap_or(false),
    }
}

/// Rows of `keys` (`[n, dim]`) that are active, scored by `score`; returns the index and score
/// of the best (largest) one; the first wins ties. Skips non-finite scores.
#[inline(always)]
fn scan_best(
    keys: &[f32],
    dim: usize,
    active: Option<&[bool]>,
    score: impl Fn(&[f32]) -> f32,
) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    for (i, k) in keys.chunks_exact(dim).enumerate() {
        if !is_active(active, i) {
            continue;
        }
        let s = score(k);
        if s.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best
}

/// Four dot products against the same `q` in one pass (`q` is loaded once per chunk, which is
/// what bounds a single-row dot). Each result is bitwise equal to [`dot`] of that row: same
/// chunking, same accumulator lanes, same reduction.
#[inline(always)]
fn dot4(k: [&[f32]; 4], q: &[f32]) -> [f32; 4] {
    let n = q.len();
    let k = [&k[0][..n], &k[1][..n], &k[2][..n], &k[3][..n]];
    let mut acc = [[0.0f32; LANES]; 4];
    let full = n / LANES * LANES;
    let mut j = 0;
    while j < full {
        let qc = &q[j..j + LANES];
        for r in 0..4 {
            let kc = &k[r][j..j + LANES];
            for i in 0..LANES {
                acc[r][i] += kc[i] * qc[i];
            }
        }
        j += LANES;
    }
    let mut out = [0.0f32; 4];
    for r in 0..4 {
        let mut tail = 0.0f32;
        for (x, y) in k[r][full..].iter().zip(&q[full..]) {
            tail += x * y;
        }
        out[r] = reduce(acc[r]) + tail;
    }
    out
}

fn max_dot_portable(keys: &[f32], dim: usize, q: &[f32], active: Option<&[bool]>) -> Option<(usize, f32)> {
    if q.len() != dim || active.is_some() {
        return scan_best(keys, dim, active, |k| dot(k, q));
    }
    let mut best: Option<(usize, f32)> = None;
    let mut consider = |i: usize, s: f32| {
        if !s.is_nan() && best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    };
    let quads = keys.chunks_exact(4 * dim);
    let rest = quads.remainder();
    for (g, quad) in quads.enumerate() {
        let (a, b) = quad.split_at(2 * dim);
        let (k0, k1) = a.split_at(dim);
        let (k2, k3) = b.split_at(dim);
        let s = dot4([k0, k1, k2, k3], q);
        for (r, s) in s.into_iter().enumerate() {
            consider(4 * g + r, s);
        }
    }
    let base = (keys.len() - rest.len()) / dim;
    for (i, k) in rest.chunks_exact(dim).enumerate() {
        consider(base + i, dot(k, q));
    }
    best
}

fn min_sq_dist_portable(
    keys: &[f32],
    dim: usize,
    q: &[f32],
    active: Option<&[bool]>,
) -> Option<(usize, f32)> {
    scan_best(keys, dim, active, |k| -sq_dist(k, q)).map(|(i, s)| (i, -s))
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn max_dot(
        keys: &[f32],
        dim: usize,
        q: &[f32],
        active: Option<&[bool]>,
    ) -> Option<(usize, f32)> {
        max_dot_portable(keys, dim, q, active)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn min_sq_dist(
        keys: &[f32],
        dim: usize,
        q: &[f32],
        active: Option<&[bool]>,
    ) -> Option<(usize, f32)> {
        min_sq_dist_portable(keys, dim, q, active)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn neurons(p: &crate::families::PatchNeurons<'_>, x: &[f32], out: &mut [f32], acts: Option<&mut [f32]>) -> usize {
        p.apply_portable(x, out, acts)
    }

    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
    }
}

/// Index and dot product of the active row of `keys` with the largest `k·q`.
pub(crate) fn max_dot(keys: &[f32], dim: usize, q: &[f32], active: Option<&[bool]>) -> Option<(usize, f32)> {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::available() {
        // SAFETY: AVX2 support was just checked at run time.
        return unsafe { avx2::max_dot(keys, dim, q, active) };
    }
    max_dot_portable(keys, dim, q, active)
}

/// Index and squared distance of the active row of `keys` nearest to `q`.
pub(crate) fn min_sq_dist(
    keys: &[f32],
    dim: usize,
    q: &[f32],
    active: Option<&[bool]>,
) -> Option<(usize, f32)> {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::available() {
        // SAFETY: AVX2 support was just checked at run time.
        return unsafe { avx2::min_sq_dist(keys, dim, q, active) };
    }
    min_sq_dist_portable(keys, dim, q, active)
}

/// Check a `[rows, dim]` matrix: exact length and finite values.
pub(crate) fn check_matrix(
    m: &[f32],
    rows: usize,
    dim: usize,
    shape_err: &'static str,
    finite_err: &'static str,
) -> Result<(), InvalidPayload> {
    if rows.checked_mul(dim) != Some(m.len()) {
        return Err(InvalidPayload(shape_err));
    }
    if !m.iter().all(|x| x.is_finite()) {
        return Err(InvalidPayload(finite_err));
    }
    Ok(())
}

/// Check that every `dim`-row of `m` has unit L2 norm (within 1e-3, what f16 storage keeps).
pub(crate) fn check_unit_rows(m: &[f32], dim: usize, err: &'static str) -> Result<(), InvalidPayload> {
    for row in m.chunks_exact(dim) {
        if (dot(row, row) - 1.0).abs() > 2e-3 {
            return Err(InvalidPayload(err));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn kernels_match_naive() {
        for n in [0usize, 1, 15, 16, 17, 640, 643] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let d: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let s: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
            assert!((dot(&a, &b) as f64 - d).abs() < 1e-3, "{n}");
            assert!((sq_dist(&a, &b) as f64 - s).abs() < 1e-3, "{n}");
        }
        let mut y = vec![1.0, 2.0];
        axpy(2.0, &[3.0, -1.0], &mut y);
        assert_eq!(y, vec![7.0, 0.0]);
    }

    #[test]
    fn dispatch_is_bitwise_portable() {
        let dim = 37;
        let keys: Vec<f32> = (0..dim * 50).map(|i| (i as f32 * 0.013).sin()).collect();
        let q: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.7).cos()).collect();
        let a = max_dot(&keys, dim, &q, None).unwrap();
        let b = max_dot_portable(&keys, dim, &q, None).unwrap();
        assert_eq!((a.0, a.1.to_bits()), (b.0, b.1.to_bits()));
        let a = min_sq_dist(&keys, dim, &q, None).unwrap();
        let b = min_sq_dist_portable(&keys, dim, &q, None).unwrap();
        assert_eq!((a.0, a.1.to_bits()), (b.0, b.1.to_bits()));
    }

    #[test]
    fn normalize_and_pool() {
        let mut v = vec![3.0, 4.0];
        assert!(l2_normalize(&mut v));
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0, 0.0];
        assert!(!l2_normalize(&mut z));
        assert_eq!(z, vec![0.0, 0.0]);
        let rows = [1.0, 2.0, 3.0, 6.0];
        assert_eq!(pooled(&rows, 2, Pooling::Mean).unwrap(), vec![2.0, 4.0]);
        assert_eq!(pooled(&rows, 2, Pooling::Last).unwrap(), vec![3.0, 6.0]);
        assert!(pooled(&rows, 3, Pooling::Mean).is_err());
        assert!(pooled(&[], 2, Pooling::Last).is_err());
        for p in [Pooling::Mean, Pooling::Last] {
            assert_eq!(Pooling::from_code(p.code()), Some(p));
        }
        assert_eq!(Pooling::from_code(2), None);
    }
}
