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
use crate::bundle::MAX_ABS_VALUE;
use crate::gguf::{cast_f32, GgmlType, GgufError, GgufFile, GgufValue, GgufWriter, TensorInfo};

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
            return Err(InvalidPayload(
                "low-rank: n_in, n_out and rank must be positive",
            ));
        }
        if self.rank.checked_mul(self.n_in) != Some(self.a.len()) {
            return Err(InvalidPayload("low-rank: A must be [rank, n_in]"));
        }
        if self.n_out.checked_mul(self.rank) != Some(self.b.len()) {
            return Err(InvalidPayload("low-rank: B must be [n_out, rank]"));
        }
        // The bundle reader bounds f32 sections as it hashes them; a GGUF-LoRA carries its
        // values inside a blob, so the same bound is checked here for both.
        let bounded = |x: f32| x.abs() <= MAX_ABS_VALUE; // false for NaN
        if !(bounded(self.alpha) && self.alpha != 0.0) {
            return Err(InvalidPayload(
                "low-rank: alpha must be non-zero, finite and within the magnitude bound 1e6",
            ));
        }
        if !self.a.iter().chain(self.b).all(|&x| bounded(x)) {
            return Err(InvalidPayload(
                "low-rank: a value in A or B is not finite or exceeds the magnitude bound 1e6",
            ));
        }
        Ok(())
    }

    /// Reference math: `out += (alpha / rank) · B (A x)` for one input row `x` (`n_in`) and
    /// output row `out` (`n_out`).
    pub fn delta_apply(&self, x: &[f32], out: &mut [f32]) -> Result<(), InvalidPayload> {
        if x.len() != self.n_in || out.len() != self.n_out {
            return Err(InvalidPayload(
                "low-rank: x must be n_in long and out n_out long",
            ));
        }
        let ax: Vec<f32> = self
            .a
            .chunks_exact(self.n_in)
            .map(|row| super::dot(row, x))
            .collect();
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

/// Low-rank deltas merged per base tensor: deltas on the same weight are concatenated along the
/// rank with their scales folded into `B` (`alpha = rank`, scale 1), so `Σ_t s_t B_t A_t` is one
/// tensor. One adapter instead of many matters beyond speed: llama.cpp keeps a context's active
/// adapters in a hash map keyed by address, so with several adapters the order of the float sums
/// (and, on near-ties, the argmax) changes from run to run.
#[derive(Clone, Debug, Default)]
pub struct LowRankMerger {
    merged: Vec<MergedTensor>,
}

#[derive(Clone, Debug)]
struct MergedTensor {
    name: String,
    n_in: usize,
    n_out: usize,
    rank: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl LowRankMerger {
    /// Adds `t` (its shape against an earlier delta on the same name is checked).
    pub fn add(&mut self, t: &LowRankTensor<'_>) -> Result<(), InvalidPayload> {
        t.validate()?;
        let s = t.scale();
        let Some(m) = self.merged.iter_mut().find(|m| m.name == t.name) else {
            self.merged.push(MergedTensor {
                name: t.name.to_string(),
                n_in: t.n_in,
                n_out: t.n_out,
                rank: t.rank,
                a: t.a.to_vec(),
                b: t.b.iter().map(|x| x * s).collect(),
            });
            return Ok(());
        };
        if m.n_in != t.n_in || m.n_out != t.n_out {
            return Err(InvalidPayload(
                "low-rank: deltas on one tensor disagree on its shape",
            ));
        }
        m.a.extend_from_slice(t.a);
        let (r0, r1) = (m.rank, t.rank);
        let mut b = Vec::with_capacity(m.n_out * (r0 + r1));
        for o in 0..m.n_out {
            b.extend_from_slice(&m.b[o * r0..(o + 1) * r0]);
            b.extend(t.b[o * r1..(o + 1) * r1].iter().map(|x| x * s));
        }
        m.b = b;
        m.rank = r0 + r1;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.merged.is_empty()
    }

    /// The merged deltas, one per base tensor, in first-seen order.
    pub fn to_low_rank(&self) -> Result<LowRank<'_>, InvalidPayload> {
        LowRank::new(
            self.merged
                .iter()
                .map(|m| LowRankTensor {
                    name: &m.name,
                    n_in: m.n_in,
                    n_out: m.n_out,
                    rank: m.rank,
                    a: &m.a,
                    b: &m.b,
                    alpha: m.rank as f32,
                })
                .collect(),
        )
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
    pub fn delta_apply(
        &self,
        name: &str,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), InvalidPayload> {
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
    /// llama.cpp, so each tensor's alpha becomes its rank. Adapters with F16/BF16/quantized
    /// tensors are refused here (this math cannot borrow them): the runtime validates those with
    /// [`inspect_gguf_lora`] and hands them to llama.cpp as they are (`amend_runtime`'s
    /// `editing::Adapter::load`), so they apply there but not in the no_std math of this crate.
    pub fn from_gguf_blob(blob: &'a [u8]) -> Result<LowRank<'a>, InvalidPayload> {
        let f = parse_blob(blob)?;
        let (arch, alpha, pairs) = lora_pairs(&f)?;
        let mut tensors = Vec::with_capacity(pairs.len());
        for p in pairs {
            if p.a.ggml_type != GgmlType::F32 || p.b.ggml_type != GgmlType::F32 {
                return Err(InvalidPayload(
                    "GGUF-LoRA: only F32 tensors can be borrowed (convert F16/BF16 first)",
                ));
            }
            let data = |t: &TensorInfo| {
                f.data_of(t).ok().and_then(cast_f32).ok_or(InvalidPayload(
                    "GGUF-LoRA: tensor data not 4-byte aligned in memory",
                ))
            };
            // Borrow the base name from the blob itself (the parser recorded where it lies).
            let (s, _) = p.a.name_range;
            let base_len = p.a.name.len() - SUFFIX_A.len();
            let name = core::str::from_utf8(&blob[s as usize..s as usize + base_len])
                .map_err(|_| InvalidPayload("GGUF-LoRA: tensor name is not UTF-8"))?;
            let as_usize = |x: u64| {
                usize::try_from(x).map_err(|_| InvalidPayload("GGUF-LoRA: dimension too large"))
            };
            let rank = as_usize(p.rank)?;
            tensors.push(LowRankTensor {
                name,
                n_in: as_usize(p.n_in)?,
                n_out: as_usize(p.n_out)?,
                rank,
                a: data(p.a)?,
                b: data(p.b)?,
                alpha: if alpha == 0.0 { rank as f32 } else { alpha },
            });
        }
        let mut lr = LowRank::new(tensors)?;
        lr.blob = Some(blob);
        lr.arch = Some(arch);
        Ok(lr)
    }
}

/// What a GGUF-LoRA adapter holds, for adapters of any tensor type (see [`inspect_gguf_lora`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufLoraInfo {
    pub architecture: String,
    /// `adapter.lora.alpha` (0 when absent: llama.cpp then uses scale 1).
    pub alpha: f32,
    pub tensors: Vec<GgufLoraTensor>,
}

/// One adapted base tensor of a GGUF-LoRA.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufLoraTensor {
    /// The base tensor, e.g. `blk.5.ffn_down.weight`.
    pub name: String,
    pub n_in: u64,
    pub n_out: u64,
    pub rank: u64,
    pub a_type: GgmlType,
    pub b_type: GgmlType,
    /// What llama.cpp multiplies `B A` by at user scale 1: `alpha / rank` (1 when alpha is 0).
    pub scale: f32,
}

/// Validate a llama.cpp GGUF-LoRA of any tensor types (F32, F16, BF16, quantized): header keys,
/// `lora_a`/`lora_b` pairing and shapes, data bounds. The runtime refuses a blob this rejects;
/// llama.cpp then checks each tensor's `n_in`/`n_out` against the model's tensors.
pub fn inspect_gguf_lora(blob: &[u8]) -> Result<GgufLoraInfo, InvalidPayload> {
    let f = parse_blob(blob)?;
    let (architecture, alpha, pairs) = lora_pairs(&f)?;
    let tensors = pairs
        .into_iter()
        .map(|p| GgufLoraTensor {
            name: p.a.name[..p.a.name.len() - SUFFIX_A.len()].to_string(),
            n_in: p.n_in,
            n_out: p.n_out,
            rank: p.rank,
            a_type: p.a.ggml_type,
            b_type: p.b.ggml_type,
            scale: if alpha == 0.0 {
                1.0
            } else {
                alpha / p.rank as f32
            },
        })
        .collect();
    Ok(GgufLoraInfo {
        architecture,
        alpha,
        tensors,
    })
}

fn parse_blob(blob: &[u8]) -> Result<GgufFile<'_>, InvalidPayload> {
    GgufFile::parse(blob).map_err(|e| match e {
        GgufError::Truncated { .. } => InvalidPayload("GGUF-LoRA: truncated file"),
        GgufError::BadMagic(_) => InvalidPayload("GGUF-LoRA: not a GGUF file"),
        _ => InvalidPayload("GGUF-LoRA: malformed GGUF"),
    })
}

struct Pair<'f> {
    a: &'f TensorInfo,
    b: &'f TensorInfo,
    n_in: u64,
    n_out: u64,
    rank: u64,
}

/// Check the adapter keys and pair every `X.lora_a` with its `X.lora_b`.
fn lora_pairs<'f>(f: &'f GgufFile<'_>) -> Result<(String, f32, Vec<Pair<'f>>), InvalidPayload> {
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
    // llama.cpp reads alpha with `gguf_get_val_f32`, which asserts the type: an f64 (or any
    // other type) there aborts the process, so exactly an f32 is taken.
    let alpha = match f.get("adapter.lora.alpha") {
        None => 0.0,
        Some(GgufValue::F32(a)) if a.is_finite() => *a,
        Some(_) => {
            return Err(InvalidPayload(
                "GGUF-LoRA: adapter.lora.alpha is not a finite f32",
            ))
        }
    };
    // An activated LoRA applies only after its invocation tokens: not what a bundle's low-rank
    // edit means, and not applied alike by both backends.
    if f.get("adapter.alora.invocation_tokens").is_some() {
        return Err(InvalidPayload(
            "GGUF-LoRA: activated LoRA (adapter.alora.invocation_tokens) is not supported",
        ));
    }
    let mut pairs = Vec::new();
    for a in &f.tensors {
        let base = match a.name.strip_suffix(SUFFIX_A) {
            Some(base) if !base.is_empty() => base,
            _ if a.name.ends_with(SUFFIX_B) => continue,
            _ => {
                return Err(InvalidPayload(
                    "GGUF-LoRA: tensor name without <base>.lora_a/.lora_b",
                ))
            }
        };
        let b = f
            .tensor(&[base, SUFFIX_B].concat())
            .ok_or(InvalidPayload("GGUF-LoRA: lora_a without matching lora_b"))?;
        let (n_in, rank) = match a.ne[..] {
            [n_in, r] => (n_in, r),
            _ => return Err(InvalidPayload("GGUF-LoRA: lora_a must be 2-d [n_in, r]")),
        };
        let n_out = match b.ne[..] {
            [r, n_out] if r == rank => n_out,
            _ => {
                return Err(InvalidPayload(
                    "GGUF-LoRA: lora_b must be 2-d [r, n_out] with lora_a's r",
                ))
            }
        };
        // llama.cpp multiplies both through type-specific dot products: an integer or
        // activation-only type has none (a segfault inside llama.cpp).
        if !a.ggml_type.is_weight_type() || !b.ggml_type.is_weight_type() {
            return Err(InvalidPayload(
                "GGUF-LoRA: tensor type is not a weight type llama.cpp computes with",
            ));
        }
        // Data must be present and sized (also rejects types this reader cannot size).
        f.data_of(a)
            .and(f.data_of(b))
            .map_err(|_| InvalidPayload("GGUF-LoRA: tensor data missing or of an unknown type"))?;
        pairs.push(Pair {
            a,
            b,
            n_in,
            n_out,
            rank,
        });
    }
    let n_b = f
        .tensors
        .iter()
        .filter(|t| t.name.ends_with(SUFFIX_B))
        .count();
    if n_b != pairs.len() {
        return Err(InvalidPayload("GGUF-LoRA: lora_b without matching lora_a"));
    }
    if pairs.is_empty() {
        return Err(InvalidPayload("GGUF-LoRA: no lora tensors"));
    }
    Ok((arch, alpha, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// A 4-byte aligned copy of `bytes` (a Vec<u32> backing store).
    fn aligned(bytes: &[u8]) -> Vec<u32> {
        let mut v = vec![0u32; bytes.len().div_ceil(4)];
        // SAFETY: u32 has no invalid bit patterns; we write within the allocation.
        let dst =
            unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 4) };
        dst[..bytes.len()].copy_from_slice(bytes);
        v
    }

    fn as_bytes(v: &[u32], len: usize) -> &[u8] {
        // SAFETY: viewing initialized u32s as bytes.
        unsafe { core::slice::from_raw_parts(v.as_ptr() as *const u8, len) }
    }

    /// A LoRA written by the `gguf` Python package 0.19.0 (GGUFWriter(path, "gemma3"), alpha 16,
    /// lora_a = arange(6).reshape(2, 3) * 0.5, lora_b = arange(8).reshape(4, 2) - 3, float32).
    const PY_LORA_HEX: &str = concat!(
        "474755460300000002000000000000000400000000000000140000000000000067656e6572616c2e6172636869746563",
        "7475726508000000060000000000000067656d6d61330c0000000000000067656e6572616c2e74797065080000000700",
        "000000000000616461707465720c00000000000000616461707465722e747970650800000004000000000000006c6f72",
        "611200000000000000616461707465722e6c6f72612e616c70686106000000000080411c00000000000000626c6b2e30",
        "2e66666e5f646f776e2e7765696768742e6c6f72615f6102000000030000000000000002000000000000000000000000",
        "000000000000001c00000000000000626c6b2e302e66666e5f646f776e2e7765696768742e6c6f72615f620200000002",
        "0000000000000004000000000000000000000020000000000000000000000000000000000000003f0000803f0000c03f",
        "00000040000020400000000000000000000040c0000000c0000080bf000000000000803f000000400000404000008040",
    );

    #[test]
    fn reads_gguf_python_lora() {
        let bytes: Vec<u8> = (0..PY_LORA_HEX.len() / 2)
            .map(|i| u8::from_str_radix(&PY_LORA_HEX[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let store = aligned(&bytes);
        let lr = LowRank::from_gguf_blob(as_bytes(&store, bytes.len())).unwrap();
        assert_eq!(lr.architecture(), Some("gemma3"));
        let t = lr.tensor("blk.0.ffn_down.weight").unwrap();
        assert_eq!((t.n_in, t.n_out, t.rank, t.alpha), (3, 4, 2, 16.0));
        assert_eq!(t.a, &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!(t.b, &[-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]);
        let info = inspect_gguf_lora(&bytes).unwrap();
        assert_eq!(info.tensors[0].scale, 8.0);
    }

    /// Merging keeps each delta's own scale: the merged tensor applies the sum of the parts, a
    /// second base tensor stays separate, and a shape clash on one name is refused.
    #[test]
    fn merger_sums_deltas_per_tensor() {
        let (a1, b1) = ([1.0, 0.0, 2.0], [1.0, -1.0]);
        let (a2, b2) = ([0.0, 1.0, 1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]);
        let t1 = LowRankTensor::rank_one("blk.0.ffn_down.weight", &a1, &b1);
        let t2 = LowRankTensor {
            name: "blk.0.ffn_down.weight",
            n_in: 3,
            n_out: 2,
            rank: 2,
            a: &a2,
            b: &b2,
            alpha: 6.0,
        };
        let other = LowRankTensor::rank_one("blk.1.ffn_down.weight", &a1, &b1);
        let mut m = LowRankMerger::default();
        assert!(m.is_empty());
        for t in [&t1, &other, &t2] {
            m.add(t).unwrap();
        }
        let lr = m.to_low_rank().unwrap();
        assert_eq!(lr.tensors().len(), 2);
        let merged = lr.tensor("blk.0.ffn_down.weight").unwrap();
        assert_eq!((merged.rank, merged.scale()), (3, 1.0));
        let x = [0.5, -1.0, 2.0];
        let (mut want, mut got) = ([0.0f32; 2], [0.0f32; 2]);
        t1.delta_apply(&x, &mut want).unwrap();
        t2.delta_apply(&x, &mut want).unwrap();
        merged.delta_apply(&x, &mut got).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        let bad = LowRankTensor::rank_one("blk.0.ffn_down.weight", &a2[..2], &b1);
        assert!(m.add(&bad).is_err());
    }

    #[test]
    fn delta_matches_dense() {
        // n_in 3, n_out 2, rank 2, alpha 4 => scale 2.
        let a = [1.0, 0.0, 2.0, 0.0, 1.0, -1.0];
        let b = [1.0, 2.0, -1.0, 0.5];
        let t = LowRankTensor {
            name: "blk.0.ffn_down.weight",
            n_in: 3,
            n_out: 2,
            rank: 2,
            a: &a,
            b: &b,
            alpha: 4.0,
        };
        let lr = LowRank::new(vec![t]).unwrap();
        let x = [1.0, 2.0, 3.0];
        // A x = [7, -1]; B (A x) = [7 - 2, -7 - 0.5] = [5, -7.5]; * 2 = [10, -15].
        let mut out = [1.0, 1.0];
        lr.delta_apply("blk.0.ffn_down.weight", &x, &mut out)
            .unwrap();
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
        let t1 = LowRankTensor {
            name: "blk.3.ffn_down.weight",
            n_in: 3,
            n_out: 2,
            rank: 2,
            a: &a1,
            b: &b1,
            alpha: 8.0,
        };
        let t2 = LowRankTensor::rank_one("blk.4.ffn_down.weight", &u, &v);
        let lr = LowRank::new(vec![t1, t2]).unwrap();
        let bytes = lr.to_gguf_lora("gemma3");

        let f = GgufFile::parse(&bytes).unwrap();
        assert_eq!(f.architecture(), Some("gemma3"));
        assert_eq!(f.get_str("general.type"), Some("adapter"));
        assert_eq!(f.get_str("adapter.type"), Some("lora"));
        assert_eq!(f.get_f32("adapter.lora.alpha"), Some(8.0));
        assert_eq!(
            f.tensor("blk.3.ffn_down.weight.lora_a").unwrap().ne,
            vec![3, 2]
        );
        assert_eq!(
            f.tensor("blk.3.ffn_down.weight.lora_b").unwrap().ne,
            vec![2, 2]
        );
        assert_eq!(
            f.tensor("blk.4.ffn_down.weight.lora_a").unwrap().ne,
            vec![3, 1]
        );
        assert_eq!(
            f.tensor("blk.4.ffn_down.weight.lora_b").unwrap().ne,
            vec![1, 2]
        );

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
        w.add("general.architecture", "llama")
            .add("general.type", "model");
        let store = aligned(&w.to_bytes());
        let err = LowRank::from_gguf_blob(as_bytes(&store, w.to_bytes().len())).unwrap_err();
        assert_eq!(err.0, "GGUF-LoRA: general.type is not \"adapter\"");
        // Missing lora_b.
        let mut w = GgufWriter::new();
        w.add("general.architecture", "llama")
            .add("general.type", "adapter")
            .add("adapter.type", "lora");
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
        // Keys llama.cpp reads with type-asserting getters take exactly that type (an f64 alpha
        // aborted the process inside llama.cpp), and an activated LoRA is refused.
        for (key, value, why) in [
            (
                "adapter.lora.alpha",
                GgufValue::F64(8.0),
                "not a finite f32",
            ),
            ("adapter.lora.alpha", GgufValue::U32(8), "not a finite f32"),
            (
                "adapter.alora.invocation_tokens",
                GgufValue::Array(crate::gguf::GgufArray::U32(vec![1, 2])),
                "activated LoRA",
            ),
        ] {
            let mut w2 = w.clone();
            w2.add(key, value);
            let b = w2.to_bytes();
            let store = aligned(&b);
            let err = LowRank::from_gguf_blob(as_bytes(&store, b.len())).unwrap_err();
            assert!(err.0.contains(why), "{key}: {}", err.0);
            assert!(inspect_gguf_lora(&b).unwrap_err().0.contains(why), "{key}");
        }
        // F16 tensors are refused with a clear message.
        let mut w16 = GgufWriter::new();
        w16.add("general.architecture", "llama")
            .add("general.type", "adapter")
            .add("adapter.type", "lora");
        w16.add_tensor_f16("w.lora_a", &[2, 1], &[1.0, 2.0])
            .unwrap();
        w16.add_tensor_f16("w.lora_b", &[1, 1], &[3.0]).unwrap();
        let b = w16.to_bytes();
        let store = aligned(&b);
        assert!(LowRank::from_gguf_blob(as_bytes(&store, b.len()))
            .unwrap_err()
            .0
            .contains("F32"));
        // ... but inspect accepts them, with llama.cpp's scale (alpha absent -> 1).
        let info = inspect_gguf_lora(&b).unwrap();
        assert_eq!(info.architecture, "llama");
        assert_eq!(
            info.tensors,
            vec![GgufLoraTensor {
                name: "w".into(),
                n_in: 2,
                n_out: 1,
                rank: 1,
                a_type: GgmlType::F16,
                b_type: GgmlType::F16,
                scale: 1.0
            }]
        );
        // Integer and activation-only types are refused by both (llama.cpp has no matmul).
        for ty in [GgmlType(26), GgmlType(24), GgmlType(28), GgmlType::Q8_K] {
            let mut w = GgufWriter::new();
            w.add("general.architecture", "llama")
                .add("general.type", "adapter")
                .add("adapter.type", "lora");
            let (n, bytes_per) = if ty == GgmlType::Q8_K {
                (256, 292)
            } else {
                (2, 0)
            };
            let size = |rows: u64| {
                if bytes_per > 0 {
                    vec![0u8; bytes_per * rows as usize]
                } else {
                    vec![0u8; ty.byte_size("w", &[n, rows]).unwrap() as usize]
                }
            };
            w.add_tensor_raw("w.lora_a", ty, &[n, 1], size(1)).unwrap();
            w.add_tensor_raw("w.lora_b", GgmlType::F32, &[1, 1], vec![0; 4])
                .unwrap();
            let b = w.to_bytes();
            let err = inspect_gguf_lora(&b).unwrap_err();
            assert!(err.0.contains("weight type"), "{ty}: {}", err.0);
        }
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
        assert!(LowRank::new(vec![LowRankTensor {
            a: &[f32::NAN, 1.0],
            ..ok
        }])
        .is_err());
        assert!(LowRank::new(vec![LowRankTensor { name: "", ..ok }]).is_err());
        let long = "x".repeat(57);
        assert!(LowRank::new(vec![LowRankTensor { name: &long, ..ok }]).is_err());
        assert!(LowRank::new(vec![LowRankTensor {
            name: &long[..56],
            ..ok
        }])
        .is_ok());
    }
}
