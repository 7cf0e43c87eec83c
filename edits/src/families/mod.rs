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
//! compiler vectorizes them on stable Rust (SSE2 on baseline x86_64). With `std` on x86_64 the
//! table scans run an AVX2 version picked at run time, written with `core::arch` 256-bit loads
//! because LLVM's own AVX2 build of the same loop was slower here (measured); it keeps the same
//! lanes, the same multiply-then-add (no FMA) and the same reduction, so results are bitwise
//! identical whichever path runs: a radius decision never depends on the CPU. With `std` on
//! aarch64 the table scans and the neuron pass run NEON versions picked the same way (NEON is
//! baseline there, the run-time check keeps one dispatch shape): four 128-bit registers hold
//! the same 16 lanes, again multiply-then-add and the same reduction, so again bitwise equal.
//!
//! The scans are memory-bound (a 10,000 x 640 f32 table is 25.6 MB); [`Memory::with_f16_index`]
//! adds a half-size first pass with exact f32 rescoring.

use alloc::vec::Vec;
use core::fmt;

mod codebook;
mod low_rank;
mod memory;
mod neurons;
mod subject;

pub use codebook::{Codebook, CodebookHit, Distance};
pub use low_rank::{
    inspect_gguf_lora, GgufLoraInfo, GgufLoraTensor, LowRank, LowRankMerger, LowRankTensor,
};
pub use memory::{
    subject_relation, subject_relation_rest, without_appositives, Embedder, Memory, MemoryHit,
    MemoryRecord, RelationGroups, RouteHit, ScopeHead, ScopeRouting, MAX_PLACEHOLDER_USES,
};
pub use neurons::{Activation, PatchNeurons};
pub use subject::{find_subject, find_subject_as_typed, fold, strip_subject};

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

/// Scale `v` to unit L2 norm in place; an all-zero or non-finite `v` is left unchanged (returns
/// false), since there is no direction to keep. A huge or tiny but finite `v`, whose `|v|²`
/// leaves f32's normal range, is first divided by its largest magnitude.
pub fn l2_normalize(v: &mut [f32]) -> bool {
    let mut n2 = dot(v, v);
    if !(n2.is_finite() && n2 >= f32::MIN_POSITIVE) {
        let Some(m) = max_abs(v) else { return false };
        v.iter_mut().for_each(|x| *x /= m);
        n2 = dot(v, v);
    }
    let inv = 1.0 / libm::sqrtf(n2);
    v.iter_mut().for_each(|x| *x *= inv);
    true
}

/// The largest `|x|` of `v`; `None` when it is 0 or `v` holds a NaN or an infinity.
fn max_abs(v: &[f32]) -> Option<f32> {
    let mut m = 0.0f32;
    for &x in v {
        if !x.is_finite() {
            return None;
        }
        m = m.max(x.abs());
    }
    (m > 0.0).then_some(m)
}

/// A query's direction for a cosine against unit rows: `q` itself and its L2 norm; or, where
/// `|q|²` over- or underflows f32 (elements above about 1.8e19, or all below about 1e-19),
/// `q` divided by its largest magnitude (every element then in [-1, 1], one at ±1, so the norm
/// is in [1, √len]) and that copy's norm: a huge or tiny but finite query keeps its nearest
/// row, and the scan's dot products cannot overflow either. `None` for an all-zero query or one
/// with a NaN or an infinity. The usual path is the one dot product it always was; only such
/// a query is copied.
pub(crate) fn direction(q: &[f32]) -> Option<(alloc::borrow::Cow<'_, [f32]>, f32)> {
    use alloc::borrow::Cow;
    let n2 = dot(q, q);
    if n2.is_finite() && n2 >= f32::MIN_POSITIVE {
        return Some((Cow::Borrowed(q), libm::sqrtf(n2)));
    }
    let m = max_abs(q)?;
    let s: Vec<f32> = q.iter().map(|&x| x / m).collect();
    let n = libm::sqrtf(dot(&s, &s));
    Some((Cow::Owned(s), n))
}

/// Pool `rows` (`[t, dim]` row-major, `t >= 1`) into one `dim`-vector (not normalized).
pub fn pooled(rows: &[f32], dim: usize, pooling: Pooling) -> Result<Vec<f32>, InvalidPayload> {
    if dim == 0 || rows.is_empty() || !rows.len().is_multiple_of(dim) {
        return Err(InvalidPayload(
            "pooled: rows must be a non-empty [t, dim] matrix",
        ));
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

/// A `chunks_exact(LANES)` chunk as an array reference (the length always matches).
#[inline(always)]
fn lanes(c: &[f32]) -> &[f32; LANES] {
    match c.try_into() {
        Ok(a) => a,
        Err(_) => unreachable!("chunks_exact yields LANES-long chunks"),
    }
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
        // Fixed-size views let LLVM drop bounds checks and vectorize the lanes as a block.
        let (x, y) = (lanes(x), lanes(y));
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
        let (x, y) = (lanes(x), lanes(y));
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

/// Rows of `keys` (`[n, dim]`) that are active, scored by `k·q` (or, with `NEG_SQ`, by
/// `−‖k − q‖²`); returns the index and score of the best (largest) one; the first wins ties.
/// Skips NaN scores. No closures: everything must inline into the AVX2 wrappers.
#[inline(always)]
fn scan_best<const NEG_SQ: bool>(
    keys: &[f32],
    dim: usize,
    q: &[f32],
    active: Option<&[bool]>,
) -> Option<(usize, f32)> {
    let mut best: Option<(usize, f32)> = None;
    for (i, k) in keys.chunks_exact(dim).enumerate() {
        if !is_active(active, i) {
            continue;
        }
        let s = if NEG_SQ { -sq_dist(k, q) } else { dot(k, q) };
        if s.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if s <= b => {}
            _ => best = Some((i, s)),
        }
    }
    best
}

// Inlined into the AVX2 wrappers so the scan is compiled for AVX2 there.
#[inline(always)]
fn max_dot_portable(
    keys: &[f32],
    dim: usize,
    q: &[f32],
    active: Option<&[bool]>,
) -> Option<(usize, f32)> {
    scan_best::<false>(keys, dim, q, active)
}

#[inline(always)]
fn min_sq_dist_portable(
    keys: &[f32],
    dim: usize,
    q: &[f32],
    active: Option<&[bool]>,
) -> Option<(usize, f32)> {
    scan_best::<true>(keys, dim, q, active).map(|(i, s)| (i, -s))
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
mod avx2 {
    use super::*;

    /// [`super::dot`] with explicit 256-bit registers: lanes 0..8 and 8..16 of the portable
    /// accumulator, the same multiply-then-add per lane (no FMA) and the same reduction, so the
    /// result is bitwise identical.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn dot_ymm(a: &[f32], b: &[f32]) -> f32 {
        use core::arch::x86_64::*;
        let n = a.len().min(b.len());
        let full = n / LANES * LANES;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut j = 0;
        while j < full {
            // SAFETY: j + 16 <= full <= n.
            lo = _mm256_add_ps(
                lo,
                _mm256_mul_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j))),
            );
            hi = _mm256_add_ps(
                hi,
                _mm256_mul_ps(
                    _mm256_loadu_ps(pa.add(j + 8)),
                    _mm256_loadu_ps(pb.add(j + 8)),
                ),
            );
            j += LANES;
        }
        let mut acc = [0.0f32; LANES];
        _mm256_storeu_ps(acc.as_mut_ptr(), lo);
        _mm256_storeu_ps(acc.as_mut_ptr().add(8), hi);
        let mut tail = 0.0f32;
        for i in full..n {
            tail += a[i] * b[i];
        }
        reduce(acc) + tail
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn max_dot(
        keys: &[f32],
        dim: usize,
        q: &[f32],
        active: Option<&[bool]>,
    ) -> Option<(usize, f32)> {
        let mut best: Option<(usize, f32)> = None;
        for (i, k) in keys.chunks_exact(dim).enumerate() {
            if !is_active(active, i) {
                continue;
            }
            let s = dot_ymm(k, q);
            if s.is_nan() {
                continue;
            }
            match best {
                Some((_, b)) if s <= b => {}
                _ => best = Some((i, s)),
            }
        }
        best
    }

    /// [`super::sq_dist`] with explicit 256-bit registers, bitwise identical (see `dot_ymm`).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn sq_dist_ymm(a: &[f32], b: &[f32]) -> f32 {
        use core::arch::x86_64::*;
        let n = a.len().min(b.len());
        let full = n / LANES * LANES;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut j = 0;
        while j < full {
            // SAFETY: j + 16 <= full <= n.
            let d0 = _mm256_sub_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j)));
            let d1 = _mm256_sub_ps(
                _mm256_loadu_ps(pa.add(j + 8)),
                _mm256_loadu_ps(pb.add(j + 8)),
            );
            lo = _mm256_add_ps(lo, _mm256_mul_ps(d0, d0));
            hi = _mm256_add_ps(hi, _mm256_mul_ps(d1, d1));
            j += LANES;
        }
        let mut acc = [0.0f32; LANES];
        _mm256_storeu_ps(acc.as_mut_ptr(), lo);
        _mm256_storeu_ps(acc.as_mut_ptr().add(8), hi);
        let mut tail = 0.0f32;
        for i in full..n {
            let d = a[i] - b[i];
            tail += d * d;
        }
        reduce(acc) + tail
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn min_sq_dist(
        keys: &[f32],
        dim: usize,
        q: &[f32],
        active: Option<&[bool]>,
    ) -> Option<(usize, f32)> {
        let mut best: Option<(usize, f32)> = None;
        for (i, k) in keys.chunks_exact(dim).enumerate() {
            if !is_active(active, i) {
                continue;
            }
            let s = sq_dist_ymm(k, q);
            if s.is_nan() {
                continue;
            }
            match best {
                Some((_, b)) if s >= b => {}
                _ => best = Some((i, s)),
            }
        }
        best
    }

    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    pub(super) fn f16_available() -> bool {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("fma")
    }

    /// f32 -> f16 bits with F16C (round to nearest even, like `gguf::f32_to_f16`).
    #[target_feature(enable = "avx2,f16c,fma")]
    pub(super) unsafe fn to_f16(src: &[f32], dst: &mut [u16]) {
        use core::arch::x86_64::*;
        let n = src.len().min(dst.len());
        let full = n / 8 * 8;
        let mut j = 0;
        while j < full {
            // SAFETY: j + 8 <= full <= n for both slices.
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(j)));
            _mm_storeu_si128(dst.as_mut_ptr().add(j) as *mut __m128i, h);
            j += 8;
        }
        for i in full..n {
            dst[i] = crate::gguf::f32_to_f16(src[i]);
        }
    }

    /// Approximate `k·q` of one f16 row (F16C conversion, FMA, 32 lanes).
    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn dot_f16(k: &[u16], q: &[f32]) -> f32 {
        use core::arch::x86_64::*;
        let n = k.len().min(q.len());
        let full = n / 32 * 32;
        let (pk, pq) = (k.as_ptr(), q.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut j = 0;
        while j < full {
            for (r, a) in acc.iter_mut().enumerate() {
                let o = j + 8 * r;
                // SAFETY: o + 8 <= full <= n, within both slices.
                let kv = _mm256_cvtph_ps(_mm_loadu_si128(pk.add(o) as *const __m128i));
                *a = _mm256_fmadd_ps(kv, _mm256_loadu_ps(pq.add(o)), *a);
            }
            j += 32;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let mut total: f32 = lanes.iter().sum();
        for i in full..n {
            total += crate::gguf::f16_to_f32(k[i]) * q[i];
        }
        total
    }

    /// [`super::max_dot`] over unit-norm `keys` via their f16 copy: a first pass over half the
    /// bytes, then exact f32 rescoring of every row the f16 error bound cannot rule out. The
    /// result is the same as the full f32 scan (same index, bitwise the same score).
    #[target_feature(enable = "avx2,f16c,fma")]
    pub(super) unsafe fn max_dot_f16(
        keys: &[f32],
        idx: &F16Rows,
        q: &[f32],
        active: Option<&[bool]>,
    ) -> Option<(usize, f32)> {
        let dim = idx.dim;
        let mut approx: Vec<f32> = Vec::with_capacity(idx.bits.len() / dim);
        let mut best_approx = f32::NEG_INFINITY;
        for (i, k) in idx.bits.chunks_exact(dim).enumerate() {
            let a = if is_active(active, i) {
                dot_f16(k, q)
            } else {
                f32::NEG_INFINITY
            };
            best_approx = best_approx.max(a);
            approx.push(a);
        }
        if best_approx == f32::NEG_INFINITY {
            return None;
        }
        // |approx - exact| <= (f16 rounding 2^-11 + f32 summation d*2^-24, twice) * |k||q|, with
        // |k| <= 1.002 for validated unit rows, plus f16 subnormal flushing 2^-25 * sqrt(d) |q|.
        let qn = libm::sqrtf(dot(q, q));
        let d = dim as f32;
        let margin =
            ((1.0 / 2048.0 + 2.2 * d / 16_777_216.0) * 1.01 + libm::sqrtf(d) / 33_554_432.0) * qn;
        let floor = best_approx - 2.0 * margin;
        let mut best: Option<(usize, f32)> = None;
        for (i, &a) in approx.iter().enumerate() {
            if a < floor {
                continue;
            }
            let s = dot(&keys[i * dim..(i + 1) * dim], q);
            if s.is_nan() {
                continue;
            }
            match best {
                Some((_, b)) if s <= b => {}
                _ => best = Some((i, s)),
            }
        }
        best
    }
}

#[cfg(all(feature = "std", target_arch = "aarch64"))]
mod neon {
    use super::*;
    use core::arch::aarch64::*;

    /// [`super::dot`] in four 128-bit registers: lanes 0..4, 4..8, 8..12 and 12..16 of the
    /// portable accumulator, the same multiply-then-add per lane (`fmul` + `fadd`, never the
    /// fused `fmla`) and the same reduction, so the result is bitwise identical.
    #[target_feature(enable = "neon")]
    #[inline]
    pub(super) unsafe fn dot_q(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let full = n / LANES * LANES;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut j = 0;
        while j < full {
            for (r, v) in acc.iter_mut().enumerate() {
                let o = j + 4 * r;
                // SAFETY: o + 4 <= j + 16 <= full <= n, within both slices.
                *v = vaddq_f32(*v, vmulq_f32(vld1q_f32(pa.add(o)), vld1q_f32(pb.add(o))));
            }
            j += LANES;
        }
        let mut lanes = [0.0f32; LANES];
        for (r, v) in acc.iter().enumerate() {
            vst1q_f32(lanes.as_mut_ptr().add(4 * r), *v);
        }
        let mut tail = 0.0f32;
        for i in full..n {
            tail += a[i] * b[i];
        }
        reduce(lanes) + tail
    }

    /// [`super::sq_dist`] in four 128-bit registers, bitwise identical (see `dot_q`).
    #[target_feature(enable = "neon")]
    #[inline]
    pub(super) unsafe fn sq_dist_q(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let full = n / LANES * LANES;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut j = 0;
        while j < full {
            for (r, v) in acc.iter_mut().enumerate() {
                let o = j + 4 * r;
                // SAFETY: o + 4 <= full <= n.
                let d = vsubq_f32(vld1q_f32(pa.add(o)), vld1q_f32(pb.add(o)));
                *v = vaddq_f32(*v, vmulq_f32(d, d));
            }
            j += LANES;
        }
        let mut lanes = [0.0f32; LANES];
        for (r, v) in acc.iter().enumerate() {
            vst1q_f32(lanes.as_mut_ptr().add(4 * r), *v);
        }
        let mut tail = 0.0f32;
        for i in full..n {
            let d = a[i] - b[i];
            tail += d * d;
        }
        reduce(lanes) + tail
    }

    /// [`super::axpy`]: `y + a·x` per element, multiply then add, bitwise identical.
    #[target_feature(enable = "neon")]
    #[inline]
    pub(super) unsafe fn axpy_q(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let full = n / 4 * 4;
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let av = vdupq_n_f32(a);
        let mut j = 0;
        while j < full {
            // SAFETY: j + 4 <= full <= n, within both slices.
            let v = vaddq_f32(vld1q_f32(py.add(j)), vmulq_f32(av, vld1q_f32(px.add(j))));
            vst1q_f32(py.add(j), v);
            j += 4;
        }
        for i in full..n {
            y[i] += a * x[i];
        }
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn max_dot(
        keys: &[f32],
        dim: usize,
        q: &[f32],
        active: Option<&[bool]>,
    ) -> Option<(usize, f32)> {
        let mut best: Option<(usize, f32)> = None;
        for (i, k) in keys.chunks_exact(dim).enumerate() {
            if !is_active(active, i) {
                continue;
            }
            let s = dot_q(k, q);
            if s.is_nan() {
                continue;
            }
            match best {
                Some((_, b)) if s <= b => {}
                _ => best = Some((i, s)),
            }
        }
        best
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn min_sq_dist(
        keys: &[f32],
        dim: usize,
        q: &[f32],
        active: Option<&[bool]>,
    ) -> Option<(usize, f32)> {
        let mut best: Option<(usize, f32)> = None;
        for (i, k) in keys.chunks_exact(dim).enumerate() {
            if !is_active(active, i) {
                continue;
            }
            let s = sq_dist_q(k, q);
            if s.is_nan() {
                continue;
            }
            match best {
                Some((_, b)) if s >= b => {}
                _ => best = Some((i, s)),
            }
        }
        best
    }

    pub(super) fn available() -> bool {
        std::arch::is_aarch64_feature_detected!("neon")
    }

    /// The NEON [`Kernels`].
    pub(crate) struct Neon;

    impl Kernels for Neon {
        #[inline(always)]
        unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
            dot_q(a, b)
        }
        #[inline(always)]
        unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
            axpy_q(a, x, y)
        }
    }
}

/// The dense kernels of one instruction set, so a pass (the neuron pass) is written once and
/// compiled per set. Implementations are bitwise equal; `unsafe` because a SIMD set may only
/// be used after its run-time check.
pub(crate) trait Kernels {
    /// # Safety
    /// The CPU supports the implementation's instruction set.
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32;
    /// # Safety
    /// As for `dot`.
    unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]);
}

/// The portable [`Kernels`] ([`dot`], [`axpy`]).
pub(crate) struct Portable;

impl Kernels for Portable {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
    #[inline(always)]
    unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        axpy(a, x, y)
    }
}

/// Whether this CPU runs the NEON kernels (aarch64 with `std` only).
#[cfg(all(feature = "std", target_arch = "aarch64"))]
pub(crate) fn neon_available() -> bool {
    neon::available()
}

#[cfg(all(feature = "std", target_arch = "aarch64"))]
pub(crate) use neon::Neon;

/// A half-precision copy of unit-norm rows: the first pass of [`max_dot_indexed`] reads half the
/// bytes (large tables are memory-bound). Owned (built at load); exactness comes from f32 rescoring.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct F16Rows {
    bits: Vec<u16>,
    dim: usize,
}

impl F16Rows {
    /// The copy, only where this CPU can use it (saves the memory elsewhere).
    pub(crate) fn if_useful(rows: &[f32], dim: usize) -> Option<F16Rows> {
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        if avx2::f16_available() {
            let mut bits = alloc::vec![0u16; rows.len()];
            // SAFETY: the CPU features were just checked at run time.
            unsafe { avx2::to_f16(rows, &mut bits) };
            return Some(F16Rows { bits, dim });
        }
        let _ = (rows, dim);
        None
    }

    /// Portable (software) conversion; the reference the F16C path is tested against.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn new(rows: &[f32], dim: usize) -> F16Rows {
        F16Rows {
            bits: rows.iter().map(|&x| crate::gguf::f32_to_f16(x)).collect(),
            dim,
        }
    }
}

/// [`max_dot`] over unit-norm rows, using `idx` (their f16 copy) when the CPU has AVX2, F16C
/// and FMA; the same result either way. `q` must be finite.
#[allow(unused_variables)]
pub(crate) fn max_dot_indexed(
    keys: &[f32],
    dim: usize,
    idx: Option<&F16Rows>,
    q: &[f32],
    active: Option<&[bool]>,
) -> Option<(usize, f32)> {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if let Some(idx) = idx {
        if idx.dim == dim && q.len() == dim && idx.bits.len() == keys.len() && avx2::f16_available()
        {
            // SAFETY: the CPU features were just checked at run time.
            return unsafe { avx2::max_dot_f16(keys, idx, q, active) };
        }
    }
    max_dot(keys, dim, q, active)
}

/// Index and dot product of the active row of `keys` with the largest `k·q`.
pub(crate) fn max_dot(
    keys: &[f32],
    dim: usize,
    q: &[f32],
    active: Option<&[bool]>,
) -> Option<(usize, f32)> {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::available() {
        // SAFETY: AVX2 support was just checked at run time.
        return unsafe { avx2::max_dot(keys, dim, q, active) };
    }
    #[cfg(all(feature = "std", target_arch = "aarch64"))]
    if neon::available() {
        // SAFETY: NEON support was just checked at run time.
        return unsafe { neon::max_dot(keys, dim, q, active) };
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
    #[cfg(all(feature = "std", target_arch = "aarch64"))]
    if neon::available() {
        // SAFETY: NEON support was just checked at run time.
        return unsafe { neon::min_sq_dist(keys, dim, q, active) };
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
pub(crate) fn check_unit_rows(
    m: &[f32],
    dim: usize,
    err: &'static str,
) -> Result<(), InvalidPayload> {
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
            let s: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                .sum();
            assert!((dot(&a, &b) as f64 - d).abs() < 1e-3, "{n}");
            assert!((sq_dist(&a, &b) as f64 - s).abs() < 1e-3, "{n}");
        }
        let mut y = vec![1.0, 2.0];
        axpy(2.0, &[3.0, -1.0], &mut y);
        assert_eq!(y, vec![7.0, 0.0]);
    }

    #[test]
    fn dispatch_is_bitwise_portable() {
        for dim in [37usize, 640] {
            let keys: Vec<f32> = (0..dim * 50).map(|i| (i as f32 * 0.013).sin()).collect();
            let q: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.7).cos() * 1e3).collect();
            let mut mask = [true; 50];
            mask[3] = false;
            for m in [None, Some(&mask[..])] {
                let a = max_dot(&keys, dim, &q, m).unwrap();
                let b = max_dot_portable(&keys, dim, &q, m).unwrap();
                assert_eq!((a.0, a.1.to_bits()), (b.0, b.1.to_bits()));
                let a = min_sq_dist(&keys, dim, &q, m).unwrap();
                let b = min_sq_dist_portable(&keys, dim, &q, m).unwrap();
                assert_eq!((a.0, a.1.to_bits()), (b.0, b.1.to_bits()));
            }
            // Every row's score, not just the winner's, matches bitwise.
            for k in keys.chunks_exact(dim) {
                let one = max_dot(k, dim, &q, None).unwrap().1;
                assert_eq!(one.to_bits(), dot(k, &q).to_bits());
                let one = min_sq_dist(k, dim, &q, None).unwrap().1;
                assert_eq!(one.to_bits(), sq_dist(k, &q).to_bits());
            }
        }
    }

    /// Inputs that stress rounding: mixed magnitudes, signed zeros, subnormals, a NaN and an
    /// infinity in some rows, lengths with and without a 16-lane tail.
    #[cfg(all(feature = "std", target_arch = "aarch64"))]
    fn awkward(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                    / (1u32 << 24) as f32
                    - 0.5;
                match i % 13 {
                    0 => x * 1e30,
                    1 => x * 1e-40, // subnormal
                    2 => -0.0,
                    3 => x * 3e4,
                    _ => x,
                }
            })
            .collect()
    }

    #[test]
    #[cfg(all(feature = "std", target_arch = "aarch64"))]
    fn neon_kernels_are_bitwise_portable() {
        assert!(neon::available(), "NEON is baseline on aarch64");
        for n in [0usize, 1, 3, 4, 15, 16, 17, 31, 33, 640, 643] {
            for seed in 0..4u32 {
                let a = awkward(n, seed);
                let mut b = awkward(n, seed ^ 0x55);
                if seed == 3 && n > 5 {
                    b[5] = f32::NAN;
                    b[n - 1] = f32::INFINITY;
                }
                let (d0, d1) = (dot(&a, &b), unsafe { neon::dot_q(&a, &b) });
                assert!(
                    d0.to_bits() == d1.to_bits() || (d0.is_nan() && d1.is_nan()),
                    "dot n={n}"
                );
                let (s0, s1) = (sq_dist(&a, &b), unsafe { neon::sq_dist_q(&a, &b) });
                assert!(
                    s0.to_bits() == s1.to_bits() || (s0.is_nan() && s1.is_nan()),
                    "sq n={n}"
                );
                let (mut y0, mut y1) = (b.clone(), b.clone());
                axpy(0.37, &a, &mut y0);
                unsafe { neon::axpy_q(0.37, &a, &mut y1) };
                for (u, v) in y0.iter().zip(&y1) {
                    assert!(
                        u.to_bits() == v.to_bits() || (u.is_nan() && v.is_nan()),
                        "axpy n={n}"
                    );
                }
            }
        }
        // Whole scans, through the dispatch (which picks NEON here), against the portable scan.
        for dim in [37usize, 640] {
            let keys = awkward(dim * 60, 9);
            let q = awkward(dim, 10);
            let mut mask = [true; 60];
            mask[4] = false;
            for m in [None, Some(&mask[..])] {
                let a = unsafe { neon::max_dot(&keys, dim, &q, m) }.unwrap();
                let b = max_dot_portable(&keys, dim, &q, m).unwrap();
                assert_eq!((a.0, a.1.to_bits()), (b.0, b.1.to_bits()));
                let a = unsafe { neon::min_sq_dist(&keys, dim, &q, m) }.unwrap();
                let b = min_sq_dist_portable(&keys, dim, &q, m).unwrap();
                assert_eq!((a.0, a.1.to_bits()), (b.0, b.1.to_bits()));
            }
        }
    }

    #[test]
    fn f16_index_gives_the_exact_scan_result() {
        let (n, d) = (500, 70);
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let mut keys: Vec<f32> = (0..n * d).map(|_| next()).collect();
        // Near-duplicates that f16 cannot tell apart: rows 10 and 11 differ by 1e-6.
        for j in 0..d {
            keys[11 * d + j] = keys[10 * d + j] + if j == 0 { 1e-6 } else { 0.0 };
        }
        keys.chunks_exact_mut(d).for_each(|r| {
            l2_normalize(r);
        });
        let idx = F16Rows::new(&keys, d);
        if let Some(hw) = F16Rows::if_useful(&keys, d) {
            assert_eq!(hw, idx, "F16C and software conversions agree");
        }
        let mut mask = vec![true; n];
        mask[7] = false;
        for t in 0..20 {
            let q: Vec<f32> = if t == 0 {
                keys[10 * d..11 * d].iter().map(|x| x * 3e4).collect()
            } else {
                (0..d).map(|_| next() * 100.0).collect()
            };
            for m in [None, Some(&mask[..])] {
                let want = max_dot(&keys, d, &q, m).unwrap();
                let got = max_dot_indexed(&keys, d, Some(&idx), &q, m).unwrap();
                assert_eq!(
                    (got.0, got.1.to_bits()),
                    (want.0, want.1.to_bits()),
                    "query {t}"
                );
            }
        }
        assert!(max_dot_indexed(&keys, d, Some(&idx), &[1.0; 70], Some(&[])).is_none());
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
