//! Shared helpers: a small valid bundle with all four families, keys, a model binding.
#![allow(dead_code)]

pub mod stream;

use std::sync::Arc;

use amend_edits::bundle::*;
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::editset::{EditSet, ManualClock};
use amend_edits::keys::TrustStore;
use amend_edits::Site;

pub const T0: u64 = 1_700_000_000;
pub const DIM: usize = 8;

pub fn model() -> ModelBinding {
    ModelBinding {
        fingerprint: [7; 32],
        arch: "gemma3".into(),
        n_layer: 18,
        n_embd: DIM as u32,
    }
}

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn trust() -> TrustStore {
    TrustStore::with_key(key(1).verifying_key())
}

pub fn meta(id: &str, channel: &str, version: u64) -> BundleMeta {
    BundleMeta {
        bundle_id: id.into(),
        channel: channel.into(),
        version,
        created: T0 - 100,
        not_before: T0 - 10,
        expires: T0 + 1000,
        model: model(),
    }
}

pub fn ramp(n: usize, base: f32) -> Vec<f32> {
    (0..n).map(|i| base + i as f32 * 0.25).collect()
}

/// A bundle with a 3-row codebook (edits e-cb-0: rows 0..2, e-cb-1: row 2), 2 patch neurons
/// (edit e-pn), one low-rank tensor (e-lr), a 2-record memory (e-mem-0, e-mem-1), and a tiny
/// GGUF-LoRA blob (e-gguf). Codebook values are filled with `fill`.
pub fn builder(id: &str, channel: &str, version: u64, fill: f32) -> BundleBuilder {
    let mut b = BundleBuilder::new(meta(id, channel, version));
    let cb = b.add_codebook(
        3,
        Site::FfnOutput,
        Site::FfnOutput,
        0,
        false,
        DIM,
        &ramp(3 * DIM, 0.0),
        &[fill; 3 * DIM],
        &[1.0, 2.0, 3.0],
    );
    b.add_edit(
        "e-cb-0",
        3,
        Site::FfnOutput,
        "The capital of X is",
        " Y",
        cb,
        0,
        2,
    );
    b.add_edit("e-cb-1", 3, Site::FfnOutput, "Z plays", " chess", cb, 2, 1);
    let pn = b.add_patch_neurons(
        5,
        Site::FfnInput,
        Site::FfnOutput,
        0,
        DIM,
        &ramp(2 * DIM, 1.0),
        &[0.5, -0.5],
        &ramp(2 * DIM, -1.0),
    );
    b.add_edit("e-pn", 5, Site::FfnOutput, "p", " t", pn, 0, 2);
    let a = ramp(2 * 4, 0.1);
    let bb = ramp(6 * 2, 0.2);
    let lr = b.add_low_rank(&[amend_edits::families::LowRankTensor {
        name: "blk.5.ffn_down.weight",
        n_in: 4,
        n_out: 6,
        rank: 2,
        a: &a,
        b: &bb,
        alpha: 8.0,
    }]);
    b.add_edit("e-lr", 5, Site::FfnOutput, "q", " u", lr, 0, 1);
    let emb = {
        let s = 0.5f32; // two unit vectors of width 4
        vec![s, s, s, s, 1.0, 0.0, 0.0, 0.0]
    };
    let mem = b.add_memory(
        4,
        &emb,
        0.8,
        "{edit}\n{prompt}",
        EmbedderDesc::BaseModel {
            layer: 6,
            site: 4,
            pooling: 0,
        },
        vec![
            MemoryRecordDesc {
                edit_id: "e-mem-0".into(),
                prompt: "a".into(),
                target: "b".into(),
                text: "a is b".into(),
            },
            MemoryRecordDesc {
                edit_id: "e-mem-1".into(),
                prompt: "c".into(),
                target: "d".into(),
                text: "c is d".into(),
            },
        ],
    );
    b.add_edit("e-mem-0", 6, Site::ResidualOut, "a", "b", mem, 0, 1);
    b.add_edit("e-mem-1", 6, Site::ResidualOut, "c", "d", mem, 1, 1);
    let g = b.add_gguf_lora(gguf_lora_blob());
    b.add_edit("e-gguf", 0, Site::FfnOutput, "r", " v", g, 0, 1);
    b
}

pub fn signed(id: &str, channel: &str, version: u64) -> AlignedBuf {
    builder(id, channel, version, version as f32)
        .build_signed(&key(1))
        .unwrap()
}

pub fn editset() -> (EditSet, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    (EditSet::with_clock(model(), trust(), clock.clone()), clock)
}

/// Decode a valid bundle's manifest and section bytes, let `f` change them, lay out again
/// (unless `relayout` is false) and re-sign with key(1): a bundle whose signature is good but
/// whose content is wrong.
pub fn craft(
    base: &[u8],
    relayout: bool,
    f: impl FnOnce(&mut Manifest, &mut Vec<Vec<u8>>),
) -> AlignedBuf {
    let h = read_header(base).unwrap();
    let m_end = HEADER_LEN + h.manifest_len.get() as usize;
    let mut m = decode_manifest(&base[HEADER_LEN..m_end]).unwrap();
    let mut blobs: Vec<Vec<u8>> = m
        .sections
        .iter()
        .map(|s| base[s.offset as usize..(s.offset + s.len) as usize].to_vec())
        .collect();
    f(&mut m, &mut blobs);
    if relayout {
        layout(&mut m).unwrap();
    }
    let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    let mut out = assemble(&m, &refs).unwrap();
    sign_in_place(out.as_mut_slice(), &key(1)).unwrap();
    out
}

/// A tiny valid llama.cpp GGUF-LoRA file (one rank-1 tensor pair).
pub fn gguf_lora_blob() -> Vec<u8> {
    use amend_edits::families::{LowRank, LowRankTensor};
    let a = [0.5f32, -0.25, 1.0, 0.0];
    let b = [1.0f32, 2.0];
    let t = LowRankTensor {
        name: "blk.2.ffn_down.weight",
        n_in: 4,
        n_out: 2,
        rank: 1,
        a: &a,
        b: &b,
        alpha: 1.0,
    };
    LowRank::new(vec![t]).unwrap().to_gguf_lora("gemma3")
}
