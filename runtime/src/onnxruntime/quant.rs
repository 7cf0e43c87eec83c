//! GGUF weights in ONNX terms, keeping their exact values (../shared/notes/onnxruntime-facts.md):
//! each quant type maps onto `MatMulNBits` (com.microsoft) with `W[n,k] = (B - zp) * scale`,
//! where ggml computes the same products in the same order, so the dequantized weights are
//! bitwise ggml's. Q4_K's per-block minimum becomes a second, tiny matmul over block sums.
//!
//! GGUF stores a linear weight as `ne = [K (in), N (out)]`, rows of K elements in blocks; so
//! does `MatMulNBits` (B is `[N, K/block, block*bits/8]`), which makes the repacking local to
//! a block.

use amend_edits::gguf::{bf16_to_f32, f16_to_f32, GgmlType};

/// Why a tensor cannot be expressed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error("tensor `{tensor}` has ggml type {ty}, which the ONNX graph builder does not map (supported: F32, F16, BF16, Q4_0, Q8_0, Q5_0, Q4_K, Q6_K)")]
    Unsupported { tensor: String, ty: String },
    #[error("tensor `{tensor}`: {detail}")]
    Shape { tensor: String, detail: String },
    #[error("tensor `{tensor}`: not enough memory for its {bytes}-byte conversion")]
    OutOfMemory { tensor: String, bytes: u64 },
}

/// `n` zeros, or [`QuantError::OutOfMemory`]: a tensor's conversion buffers are as large as
/// the tensor (160 MB for the default model's embedding table), the allocations a tight
/// address space refuses first, and a refused one must not abort the host.
fn zeroed<T: Clone + Default>(tensor: &str, n: usize) -> Result<Vec<T>, QuantError> {
    let mut v = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        return Err(QuantError::OutOfMemory {
            tensor: tensor.into(),
            bytes: (n as u64).saturating_mul(std::mem::size_of::<T>() as u64),
        });
    }
    v.resize(n, T::default());
    Ok(v)
}

/// A linear weight `[N, K]` (out, in) as the graph takes it.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `MatMul(A, W^T)`: f32 `[K, N]`, already transposed (F32, F16, BF16 sources: each value
    /// exactly, as ggml converts it).
    Float { k: usize, n: usize, wt: Vec<f32> },
    /// `MatMulNBits`: B `[N, K/block, block*bits/8]`, scales `[N, K/block]`, an optional
    /// explicit zero point (packed like B) and, for Q4_K, `mins` `[K/32, N]`: subtract
    /// `ReduceSum(A over each 32-block) x mins` from the product.
    NBits {
        k: usize,
        n: usize,
        bits: u8,
        block: usize,
        b: Vec<u8>,
        scales: Vec<f32>,
        zero_points: Option<Vec<u8>>,
        mins: Option<Vec<f32>>,
    },
}

fn type_name(t: GgmlType) -> String {
    t.name()
        .map(str::to_string)
        .unwrap_or_else(|| format!("#{}", t.0))
}

/// Block size (elements) and bytes per block of the types handled here.
fn block_shape(t: GgmlType) -> Option<(usize, usize)> {
    Some(match t {
        GgmlType::F32 => (1, 4),
        GgmlType::F16 | GgmlType::BF16 => (1, 2),
        GgmlType::Q4_0 => (32, 18),
        GgmlType::Q8_0 => (32, 34),
        GgmlType::Q5_0 => (32, 22),
        GgmlType::Q4_K => (256, 144),
        GgmlType::Q6_K => (256, 210),
        _ => return None,
    })
}

fn check(name: &str, t: GgmlType, k: usize, n: usize, data: &[u8]) -> Result<(), QuantError> {
    let (bs, bytes) = block_shape(t).ok_or_else(|| QuantError::Unsupported {
        tensor: name.to_string(),
        ty: type_name(t),
    })?;
    let shape = |detail: String| QuantError::Shape {
        tensor: name.to_string(),
        detail,
    };
    if !k.is_multiple_of(bs) {
        return Err(shape(format!("row length {k} is not a multiple of {bs}")));
    }
    let want = (k / bs)
        .checked_mul(bytes)
        .and_then(|r| r.checked_mul(n))
        .ok_or_else(|| shape("size overflows".into()))?;
    if data.len() != want {
        return Err(shape(format!("{} bytes, expected {want}", data.len())));
    }
    Ok(())
}

fn f16(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Q4_K's 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes one block into unsigned codes `q` (the `B` value before the offset) and calls
/// `emit(sub_block, scale, min, codes)` per sub-block, where `w = scale * (code - offset) - min`.
/// Offsets: Q8_0 128 (codes = qs + 128), Q5_0 16, Q4_0 8, Q6_K 32, Q4_K 0.
/// `emit(sub_block, scale, min, codes)`.
type Emit<'a> = dyn FnMut(usize, f32, f32, &[u8]) + 'a;

fn decode_block(t: GgmlType, blk: &[u8], emit: &mut Emit<'_>) {
    let mut codes = [0u8; 32];
    match t {
        GgmlType::Q8_0 => {
            let d = f16(blk, 0);
            for (c, &q) in codes.iter_mut().zip(&blk[2..34]) {
                *c = (q as i8 as i16 + 128) as u8;
            }
            emit(0, d, 0.0, &codes);
        }
        GgmlType::Q4_0 => {
            let d = f16(blk, 0);
            let qs = &blk[2..18];
            for j in 0..16 {
                codes[j] = qs[j] & 0xF;
                codes[j + 16] = qs[j] >> 4;
            }
            emit(0, d, 0.0, &codes);
        }
        GgmlType::Q5_0 => {
            let d = f16(blk, 0);
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let qs = &blk[6..22];
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                codes[j] = (qs[j] & 0xF) | h0;
                codes[j + 16] = (qs[j] >> 4) | h1;
            }
            emit(0, d, 0.0, &codes);
        }
        GgmlType::Q4_K => {
            let d = f16(blk, 0);
            let dmin = f16(blk, 2);
            let sc = &blk[4..16];
            let qs = &blk[16..144];
            for j in 0..4 {
                let q = &qs[32 * j..32 * j + 32];
                let (s0, m0) = scale_min_k4(2 * j, sc);
                let (s1, m1) = scale_min_k4(2 * j + 1, sc);
                for l in 0..32 {
                    codes[l] = q[l] & 0xF;
                }
                emit(2 * j, d * s0 as f32, dmin * m0 as f32, &codes);
                for l in 0..32 {
                    codes[l] = q[l] >> 4;
                }
                emit(2 * j + 1, d * s1 as f32, dmin * m1 as f32, &codes);
            }
        }
        GgmlType::Q6_K => {
            let ql = &blk[0..128];
            let qh = &blk[128..192];
            let sc = &blk[192..208];
            let d = f16(blk, 208);
            // 256 values in two halves of 128; sub-blocks of 16 values share a scale.
            let mut vals = [0u8; 256];
            for half in 0..2 {
                let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                let y = &mut vals[128 * half..];
                for l in 0..32 {
                    y[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            for s in 0..16 {
                emit(s, d * (sc[s] as i8) as f32, 0.0, &vals[16 * s..16 * s + 16]);
            }
        }
        _ => unreachable!("checked by block_shape"),
    }
}

/// `(bits, sub-block size, offset)` of the MatMulNBits form of a quant type.
fn nbits_form(t: GgmlType) -> (u8, usize, u8) {
    match t {
        GgmlType::Q8_0 => (8, 32, 128),
        // No 5-bit kernel: 5-bit codes are stored in 8 bits, re-centred on 128.
        GgmlType::Q5_0 => (8, 32, 16),
        GgmlType::Q4_0 => (4, 32, 8),
        GgmlType::Q4_K => (4, 32, 0),
        GgmlType::Q6_K => (8, 16, 32),
        _ => unreachable!(),
    }
}

/// The exact graph form of a GGUF linear weight (`ne = [k, n]`).
pub fn linear_weight(
    name: &str,
    t: GgmlType,
    k: usize,
    n: usize,
    data: &[u8],
) -> Result<LinearWeight, QuantError> {
    check(name, t, k, n, data)?;
    match t {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return float_weight(name, t, k, n, data),
        _ => {}
    }
    let (bits, block, offset) = nbits_form(t);
    let (gbs, gbytes) = block_shape(t).unwrap();
    let kb = k / block;
    let blob = block * bits as usize / 8;
    let mut b = zeroed::<u8>(name, n * kb * blob)?;
    let mut scales = zeroed::<f32>(name, n * kb)?;
    let mut mins = match t {
        GgmlType::Q4_K => Some(zeroed::<f32>(name, kb * n)?),
        _ => None,
    };
    for row in 0..n {
        for g in 0..k / gbs {
            let blk = &data[(row * (k / gbs) + g) * gbytes..][..gbytes];
            decode_block(t, blk, &mut |sub, scale, min, codes| {
                let sb = g * (gbs / block) + sub;
                scales[row * kb + sb] = scale;
                if let Some(m) = mins.as_mut() {
                    m[sb * n + row] = min;
                }
                let out = &mut b[(row * kb + sb) * blob..][..blob];
                if bits == 8 {
                    for (o, &c) in out.iter_mut().zip(codes) {
                        // Re-centre so that MatMulNBits' default zero point (128) subtracts
                        // exactly ggml's offset.
                        *o = c.wrapping_add(128 - offset);
                    }
                } else {
                    for i in 0..blob {
                        out[i] = (codes[2 * i] & 0xF) | (codes[2 * i + 1] << 4);
                    }
                }
            });
        }
    }
    // 4-bit: default zero point is 8, which is Q4_0's offset; Q4_K needs an explicit 0.
    let zero_points = match t {
        GgmlType::Q4_K => Some(zeroed::<u8>(name, n * kb.div_ceil(2))?),
        _ => None,
    };
    Ok(LinearWeight::NBits {
        k,
        n,
        bits,
        block,
        b,
        scales,
        zero_points,
        mins,
    })
}

/// Any supported type as exact f32 weights for a plain `MatMul` (`W^T`, `[k, n]`).
pub fn float_weight(
    name: &str,
    t: GgmlType,
    k: usize,
    n: usize,
    data: &[u8],
) -> Result<LinearWeight, QuantError> {
    let w = dequantize(name, t, k, n, data)?;
    let mut wt = zeroed::<f32>(name, k * n)?;
    for r in 0..n {
        for c in 0..k {
            wt[c * n + r] = w[r * k + c];
        }
    }
    Ok(LinearWeight::Float { k, n, wt })
}

/// The f32 values of a tensor (`[n, k]` row-major), computed as ggml does.
pub fn dequantize(
    name: &str,
    t: GgmlType,
    k: usize,
    n: usize,
    data: &[u8],
) -> Result<Vec<f32>, QuantError> {
    check(name, t, k, n, data)?;
    match t {
        GgmlType::F32 => {
            return Ok(data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
        GgmlType::F16 => return Ok((0..k * n).map(|i| f16(data, 2 * i)).collect()),
        GgmlType::BF16 => {
            return Ok(data
                .chunks_exact(2)
                .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect())
        }
        _ => {}
    }
    let (_, block, offset) = nbits_form(t);
    let (gbs, gbytes) = block_shape(t).unwrap();
    let mut out = zeroed::<f32>(name, k * n)?;
    for (i, blk) in data.chunks_exact(gbytes).enumerate() {
        let base = i * gbs;
        decode_block(t, blk, &mut |sub, scale, min, codes| {
            for (j, &c) in codes.iter().enumerate() {
                let q = c as i32 - offset as i32;
                // ggml: Q4_K `d1 * q - m1`; the others `scale * q` (Q6_K: `(d * sc) * q`).
                out[base + sub * block + j] = scale * q as f32 - min;
            }
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_type_names_the_tensor() {
        let e =
            linear_weight("blk.0.attn_q.weight", GgmlType::Q5_K, 256, 1, &[0; 176]).unwrap_err();
        assert!(e.to_string().contains("blk.0.attn_q.weight"), "{e}");
        assert!(
            e.to_string().contains("q5_K") || e.to_string().contains("Q5_K"),
            "{e}"
        );
    }

    #[test]
    fn wrong_length_is_refused() {
        let e = linear_weight("w", GgmlType::Q8_0, 64, 2, &[0; 67]).unwrap_err();
        assert!(matches!(e, QuantError::Shape { .. }), "{e}");
    }
}
