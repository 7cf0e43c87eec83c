//! Low-rank weight deltas (LoRA; ROME / MEMIT rank-one and rank-k updates).
//!
//! A tensor delta is `ΔW = (alpha / rank) · B A` on a base weight `W` of `n_out` rows of `n_in`
//! (llama.cpp / GGUF: `ne = [n_in, n_out]`), with `A` `[rank, n_in]` and `B` `[n_out, rank]`,
//! both row-major. The runtime never applies this math itself: it hands llama.cpp a GGUF-LoRA
//! adapter ([`LowRank::to_gguf_lora`]) whose layout is exactly these matrices:
//! `<base>.lora_a` has `ne = [n_in, rank]` (rank rows of `n_in`) and `<base>.lora_b` has
//! `ne = [rank, n_out]` (`n_out` rows of `rank`); llama.cpp scales by `user_scale · alpha / rank`.
//! [`LowRankTensor::delta_apply`] is the reference math for tests.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::InvalidPayload;
use crate::gguf::{cast_f32, GgmlType, GgufError, GgufFile, GgufWriter};

/// ggml's `GGML_MAX_NAME` (64, including the terminating NUL).
const MAX_TENSOR_NAME: usize = 63;
const SUFFIX_A: &str = ".lora_a";
const SUFFIX_B: &str = ".lora_b";

/// A low-rank delta for one base tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowRankTensor<'a> {
    /// The base model tensor, e.g. `blk.5.ffn_down.weight`.
    pub name: &'a str,
    pub n_in: usize,
    pub n_out: usize,
    pub rank: usize,
    /// `[rank, n_in]`, row-major.
    pub a: &'a [f32],
    /// `[n_out, rank]`, row-major.
    pub b: &'a [f32],
    /// The delta is scaled by `alpha / rank`.
    pub alpha: f32,
}

impl<'a> LowRankTensor<'a> {
    /// The ROME / MEMIT rank-one form `ΔW = v uᵀ`: `A = uᵀ` (`u` is `n_in` long), `B = v`
    /// (`n_out` long), `alpha = rank = 1`.
    pub fn rank_one(name: &'a str, u: &'a [f32], v: &'a [f32]) -> LowRankTensor<'a> {
        LowRankTensor {
            name,
            n_in: u.len(),
            n_out: v.len(),
            rank: 1,
            a: u,
            b: v,
            alpha: 1.0,
        }
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    fn validate(&self) -> Result<(), InvalidPayload> {
        if self.name.is_empty() || self.name.len() + SUFFIX_A.len() > MAX_TENSOR_NAME {
            return Err(InvalidPayload(
                "low-rank: tensor name must be 1..=56 bytes (llama.cpp's 64-byte name limit)",
            ));
        }
        if self.n_in == 0 || self.n_out == 0 || self.rank == 0 {
            return Err(InvalidPayload("low-rank: n_in, n_out and rank must be positive"));
        }
        if self.rank.checked_mul(self.n_in) != Some(self.a.len()) {
            return Err(InvalidPayload("low-rank: A must be [rank, n_in]"));
        }
        if self.n_out.checked_mul(self.rank) != Some(self.b.len()) {
            return Err(InvalidPayload("low-rank: B must be [n_out, rank]"));
        }
        if !(self.alpha.is_finite() && self.alpha != 0.0) {
            return Err(InvalidPayload("low-rank: alpha must be finite and non-zero"));
        }
        if !self.a.iter().chain(self.b).all(|x| x.is_finite()) {
            return Err(InvalidPayload("low-rank: non-finite value in A or B"));
        }
        Ok(())
    }

    /// Reference math: `out += (alpha / rank) · B (A x)` for one input row `x` (`n_in`) and
    /// output row `out` (`n_out`).
    pub fn delta_apply(&self, x: &[f32], out: &mut [f32]) -> Result<(), InvalidPayload> {
        if x.len() != self.n_in || out.len() != self.n_out {
            return Err(InvalidPayload("low-rank: x must be n_in long and out n_out long"));
        }
        let ax: Vec<f32> = self.a.chunks_exact(self.n_in).map(|row| super::dot(row, x)).collect();
        let s = self.scale();
        for (o, brow) in out.iter_mut().zip(self.b.chunks_exact(self.rank)) {
            *o += s * super::dot(brow, &ax);
        }
        Ok(())
    }

    /// The dense `ΔW` as `[n_out, n_in]` row-major (tests and the compiler's checks).
    pub fn dense_delta(&self) -> Vec<f32> {
        let s = self.scale();
        let mut w = alloc::vec![0.0f32; self.n_out * self.n_in];
        for (o, wrow) in w.chunks_exact_mut(self.n_in).enumerate() {
            for r in 0..self.rank {
                let coef = s * self.b[o * self.rank + r];
                super::axpy(coef, &self.a[r * self.n_in..(r + 1) * self.n_in], wrow);
            }
        }
        w
    }
}

/// A set of low-rank deltas applied together (one llama.cpp adapter).
#[derive(Clone, Debug)]
pub struct LowRank<'a> {
    tensors: Vec<LowRankTensor<'a>>,
    /// The original bytes when built by [`LowRank::from_gguf_blob`].
    blob: Option<&'a [u8]>,
    /// `general.architecture` of a parsed blob.
    arch: Option<String>,
}

impl<'a> LowRank<'a> {
    /// Validate every tensor (shapes, finite values, alpha) and that base names are unique.
    pub fn new(tensors: Vec<LowRankTensor<'a>>) -> Result<LowRank<'a>, InvalidPayload> {
        if tensors.is_empty() {
            return Err(InvalidPayload("low-rank: no tensors"));
        }
        for (i, t) in tensors.iter().enumerate() {
            t.validate()?;
            if tensors[..i].iter().any(|u| u.name == t.name) {
                return Err(InvalidPayload("low-rank: duplicate base tensor name"));
            }
        }
        Ok(LowRank {
            tensors,
            blob: None,
            arch: None,
        })
    }

    pub fn tensors(&self) -> &[LowRankTensor<'a>] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&LowRankTensor<'a>> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The GGUF-LoRA bytes this was parsed from, if any (the runtime can hand them to llama.cpp
    /// verbatim).
    pub fn gguf_blob(&self) -> Option<&'a [u8]> {
        self.blob
    }

    /// `general.architecture` of the parsed GGUF-LoRA, if any.
    pub fn architecture(&self) -> Option<&str> {
        self.arch.as_deref()
    }

    /// Reference math for the tensor named `name`: `out += alpha/rank · B (A x)`.
    pub fn delta_apply(&self, name: &str, x: &[f32], out: &mut [f32]) -> Result<(), InvalidPayload> {
        self.tensor(name)
            .ok_or(InvalidPayload("low-rank: no such tensor"))?
            .delta_apply(x, out)
    }

    /// A llama.cpp GGUF-LoRA adapter for a model of architecture `arch` (F32 tensors).
    ///
    /// A GGUF-LoRA has one alpha; it is the first tensor's, and any tensor with a different alpha
    /// has its `B` rescaled by `alpha_t / alpha` so every delta keeps its own `alpha_t / rank_t`.
    pub fn to_gguf_lora(&self, arch: &str) -> Vec<u8> {
        let alpha = self.tensors[0].alpha;
        let mut w = GgufWriter::new();
        w.add("general.architecture", arch)
            .add("general.type", "adapter")
            .add("adapter.type", "lora")
            .add("adapter.lora.alpha", alpha);
        for t in &self.tensors {
            let (n_in, n_out, r) = (t.n_in as u64, t.n_out as u64, t.rank as u64);
            let name_a = [t.name, SUFFIX_A].concat();
            let name_b = [t.name, SUFFIX_B].concat();
            let res = w.add_tensor_f32(&name_a, &[n_in, r], t.a).and_then(|w| {
                if t.alpha == alpha {
                    w.add_tensor_f32(&name_b, &[r, n_out], t.b)
                } else {
                    let k = t.alpha / alpha;
                    let b: Vec<f32> = t.b.iter().map(|x| x * k).collect();
                    w.add_tensor_f32(&name_b, &[r, n_out], &b)
                }
            });
            // Shapes, name lengths and uniqueness were validated in `new`.
            debug_assert!(res.is_ok(), "{res:?}");
        }
        w.to_bytes()
    }

    /// Accept a llama.cpp GGUF-LoRA file (`general.type = adapter`, `adapter.type = lora`), zero
    /// copy: tensors must be F32 and the blob 4-byte aligned (GGUF aligns tensor data to 32 bytes
    /// from the start of the file). `adapter.lora.alpha` missing or 0 means scale 1, as in
    /// llama.cpp, so each tensor's alpha becomes its rank.
    pub fn from_gguf_blob(blob: &'a [u8]) -> Result<LowRank<'a>, InvalidPayload> {
        let f = GgufFile::parse(blob).map_err(|e| match e {
            GgufError::Truncated { .. } => InvalidPayload("GGUF-LoRA: truncated file"),
            GgufError::BadMagic(_) => InvalidPayload("GGUF-LoRA: not a GGUF file"),
            _ => InvalidPayload("GGUF-LoRA: malformed GGUF"),
        })?;
        if f.get_str("general.type") != Some("adapter") {
            return Err(InvalidPayload("GGUF-LoRA: general.type is not \"adapter\""));
        }
        if f.get_str("adapter.type") != Some("lora") {
            return Err(InvalidPayload("GGUF-LoRA: adapter.type is not \"lora\""));
        }
        let arch = f
            .architecture()
            .ok_or(InvalidPayload("GGUF-LoRA: general.architecture missing"))?
            .to_string();
        let alpha = match f.get("adapter.lora.alpha") {
            None => 0.0,
            Some(v) => v
                .as_f32()
                .ok_or(InvalidPayload("GGUF-LoRA: adapter.lora.alpha is not a float"))?,
        };
        let mut tensors = Vec::new();
        for ta in &f.tensors {
            let base_len = match ta.name.strip_suffix(SUFFIX_A) {
                Some(base) => base.len(),
                None if ta.name.ends_with(SUFFIX_B) => continue,
                None => return Err(InvalidPayload("GGUF-LoRA: tensor name without .lora_a/.lora_b")),
            };
            // Borrow the base name from the blob itself (the parser recorded where it lies).
            let (s, _) = ta.name_range;
            let name = core::str::from_utf8(&blob[s as usize..s as usize + base_len])
                .map_err(|_| InvalidPayload("GGUF-LoRA: tensor name is not UTF-8"))?;
            let tb = f
                .tensor(&[name, SUFFIX_B].concat())
                .ok_or(InvalidPayload("GGUF-LoRA: lora_a without matching lora_b"))?;
            let (n_in, rank) = match ta.ne[..] {
                [n_in, r] => (n_in, r),
                _ => return Err(InvalidPayload("GGUF-LoRA: lora_a must be 2-d [n_in, r]")),
            };
            let n_out = match tb.ne[..] {
                [r, n_out] if r == rank => n_out,
                _ => return Err(InvalidPayload("GGUF-LoRA: lora_b must be 2-d [r, n_out] with lora_a's r")),
            };
            if ta.ggml_type != GgmlType::F32 || tb.ggml_type != GgmlType::F32 {
                return Err(InvalidPayload("GGUF-LoRA: only F32 tensors can be borrowed (convert F16/BF16 first)"));
            }
            let data = |t: &crate::gguf::TensorInfo| {
                f.data_of(t)
                    .ok()
                    .and_then(cast_f32)
                    .ok_or(InvalidPayload("GGUF-LoRA: tensor data not 4-byte aligned in memory"))
            };
            let (a, b) = (data(ta)?, data(tb)?);
            let as_usize = |x: u64| usize::try_from(x).map_err(|_| InvalidPayload("GGUF-LoRA: dimension too large"));
            let rank = as_usize(rank)?;
            tensors.push(LowRankTensor {
                name,
                n_in: as_usize(n_in)?,
                n_out: as_usize(n_out)?,
                rank,
                a,
                b,
                alpha: if alpha == 0.0 { rank as f32 } else { alpha },
            });
        }
        // Every lora_b must have been paired.
        let n_b = f.tensors.iter().filter(|t| t.name.ends_with(SUFFIX_B)).count();
        if n_b != tensors.len() {
            return Err(InvalidPayload("GGUF-LoRA: lora_b without matching lora_a"));
        }
        let mut lr = LowRank::new(tensors)?;
        lr.blob = Some(blob);
        lr.arch = Some(arch);
        Ok(lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// A 4-byte aligned copy of `bytes` (a Vec<u32> backing store).
    fn aligned(bytes: &[u8]) -> Vec<u32> {
        let mut v = vec![0u32; bytes.len().div_ceil(4)];
        // SAFETY: u32 has no invalid bit patterns; we write within the allocation.
        let dst = unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 4) };
        dst[..bytes.len()].copy_from_slice(bytes);
        v
    }

    fn as_bytes(v: &[u32], len: usize) -> &[u8] {
        // SAFETY: viewing initialized u32s as bytes.
        unsafe { core::slice::from_raw_parts(v.as_ptr() as *const u8, len) }
    }

    #[test]
    fn delta_matches_dense() {
        // n_in 3, n_out 2, rank 2, alpha 4 => scale 2.
        let a = [1.0, 0.0, 2.0, 0.0, 1.0, -1.0];
        let b = [1.0, 2.0, -1.0, 0.5];
        let t = LowRankTensor { name: "blk.0.ffn_down.weight", n_in: 3, n_out: 2, rank: 2, a: &a, b: &b, alpha: 4.0 };
        let lr = LowRank::new(vec![t]).unwrap();
        let x = [1.0, 2.0, 3.0];
        // A x = [7, -1]; B (A x) = [7 - 2, -7 - 0.5] = [5, -7.5]; * 2 = [10, -15].
        let mut out = [1.0, 1.0];
        lr.delta_apply("blk.0.ffn_down.weight", &x, &mut out).unwrap();
        assert_eq!(out, [11.0, -14.0]);
        let dw = t.dense_delta();
        for o in 0..2 {
            let y: f32 = (0..3).map(|i| dw[o * 3 + i] * x[i]).sum();
            assert_eq!(y + 1.0, out[o]);
        }
        assert!(lr.delta_apply("nope", &x, &mut out).is_err());
        assert!(t.delta_apply(&x[..2], &mut out).is_err());

        // Rank one: ΔW = v uᵀ.
        let (u, v) = ([1.0, 2.0], [3.0, 4.0, 5.0]);
        let r1 = LowRankTensor::rank_one("blk.1.ffn_down.weight", &u, &v);
        assert_eq!((r1.n_in, r1.n_out, r1.rank, r1.scale()), (2, 3, 1, 1.0));
        assert_eq!(r1.dense_delta(), vec![3.0, 6.0, 4.0, 8.0, 5.0, 10.0]);
    }

    #[test]
    fn gguf_lora_round_trip() {
        let a1 = [0.5, -1.0, 2.0, 0.25, 0.0, 1.0]; // rank 2, n_in 3
        let b1 = [1.0, 2.0, 3.0, 4.0]; // n_out 2
        let (u, v) = ([1.0, 2.0, 3.0], [4.0, 5.0]);
        let t1 = LowRankTensor { name: "blk.3.ffn_down.weight", n_in: 3, n_out: 2, rank: 2, a: &a1, b: &b1, alpha: 8.0 };
        let t2 = LowRankTensor::rank_one("blk.4.ffn_down.weight", &u, &v);
        let lr = LowRank::new(vec![t1, t2]).unwrap();
        let bytes = lr.to_gguf_lora("gemma3");

        let f = GgufFile::parse(&bytes).unwrap();
        assert_eq!(f.architecture(), Some("gemma3"));
        assert_eq!(f.get_str("general.type"), Some("adapter"));
        assert_eq!(f.get_str("adapter.type"), Some("lora"));
        assert_eq!(f.get_f32("adapter.lora.alpha"), Some(8.0));
        assert_eq!(f.tensor("blk.3.ffn_down.weight.lora_a").unwrap().ne, vec![3, 2]);
        assert_eq!(f.tensor("blk.3.ffn_down.weight.lora_b").unwrap().ne, vec![2, 2]);
        assert_eq!(f.tensor("blk.4.ffn_down.weight.lora_a").unwrap().ne, vec![3, 1]);
        assert_eq!(f.tensor("blk.4.ffn_down.weight.lora_b").unwrap().ne, vec![1, 2]);

        let store = aligned(&bytes);
        let back = LowRank::from_gguf_blob(as_bytes(&store, bytes.len())).unwrap();
        assert_eq!(back.architecture(), Some("gemma3"));
        assert_eq!(back.tensors().len(), 2);
        // Each tensor's effective delta (what llama.cpp computes with scale alpha/r) is unchanged,
        // including the rank-one tensor whose alpha 1 was folded into B under the file's alpha 8.
        for t in lr.tensors() {
            let b = back.tensor(t.name).unwrap();
            assert_eq!((b.n_in, b.n_out, b.rank), (t.n_in, t.n_out, t.rank));
            assert_eq!(b.alpha, 8.0);
            let (d0, d1) = (t.dense_delta(), b.dense_delta());
            for (x, y) in d0.iter().zip(&d1) {
                assert!((x - y).abs() < 1e-6, "{} {x} {y}", t.name);
            }
        }
        assert_eq!(back.gguf_blob().map(<[u8]>::len), Some(bytes.len()));
    }

    #[test]
    fn gguf_blob_validation() {
        let (u, v) = ([1.0, 2.0], [3.0]);
        let lr = LowRank::new(vec![LowRankTensor::rank_one("w", &u, &v)]).unwrap();
        let bytes = lr.to_gguf_lora("llama");
        // Not an adapter.
        let mut w = GgufWriter::new();
        w.add("general.architecture", "llama").add("general.type", "model");
        let store = aligned(&w.to_bytes());
        let err = LowRank::from_gguf_blob(as_bytes(&store, w.to_bytes().len())).unwrap_err();
        assert_eq!(err.0, "GGUF-LoRA: general.type is not \"adapter\"");
        // Missing lora_b.
        let mut w = GgufWriter::new();
        w.add("general.architecture", "llama").add("general.type", "adapter").add("adapter.type", "lora");
        w.add_tensor_f32("w.lora_a", &[2, 1], &[1.0, 2.0]).unwrap();
        let b = w.to_bytes();
        let store = aligned(&b);
        assert!(LowRank::from_gguf_blob(as_bytes(&store, b.len())).is_err());
        // Missing alpha means scale 1.
        w.add_tensor_f32("w.lora_b", &[1, 1], &[3.0]).unwrap();
        let b = w.to_bytes();
        let store = aligned(&b);
        let got = LowRank::from_gguf_blob(as_bytes(&store, b.len())).unwrap();
        assert_eq!(got.tensors()[0].scale(), 1.0);
        assert_eq!(got.tensors()[0].name, "w");
        // F16 tensors are refused with a clear message.
        let mut w16 = GgufWriter::new();
        w16.add("general.architecture", "llama").add("general.type", "adapter").add("adapter.type", "lora");
        w16.add_tensor_f16("w.lora_a", &[2, 1], &[1.0, 2.0]).unwrap();
        w16.add_tensor_f16("w.lora_b", &[1, 1], &[3.0]).unwrap();
        let b = w16.to_bytes();
        let store = aligned(&b);
        assert!(LowRank::from_gguf_blob(as_bytes(&store, b.len())).unwrap_err().0.contains("F32"));
        // Misaligned memory is refused, not read unaligned.
        let mut shifted = vec![0u8; 1];
        shifted.extend_from_slice(&bytes);
        let store = aligned(&shifted);
        let err = LowRank::from_gguf_blob(&as_bytes(&store, shifted.len())[1..]).unwrap_err();
        assert!(err.0.contains("aligned"));
        // Truncations never panic.
        let store = aligned(&bytes);
        let full = as_bytes(&store, bytes.len());
        for cut in 0..bytes.len() {
            let _ = LowRank::from_gguf_blob(&full[..cut]);
        }
    }

    #[test]
    fn rejects_bad_tensors() {
        let ok = LowRankTensor::rank_one("w", &[1.0, 2.0], &[3.0]);
        assert!(LowRank::new(vec![]).is_err());
        assert!(LowRank::new(vec![ok, ok]).is_err());
        assert!(LowRank::new(vec![LowRankTensor { rank: 2, ..ok }]).is_err());
        assert!(LowRank::new(vec![LowRankTensor { alpha: 0.0, ..ok }]).is_err());
        assert!(LowRank::new(vec![LowRankTensor { a: &[f32::NAN, 1.0], ..ok }]).is_err());
        assert!(LowRank::new(vec![LowRankTensor { name: "", ..ok }]).is_err());
        let long = "x".repeat(57);
        assert!(LowRank::new(vec![LowRankTensor { name: &long, ..ok }]).is_err());
        assert!(LowRank::new(vec![LowRankTensor { name: &long[..56], ..ok }]).is_ok());
    }
}
