//! What the edit benchmarks share: bundle builders for the measured edit sets and the decode
//! timing, for any backend.
#![allow(dead_code)]

use std::ops::ControlFlow;
use std::sync::Arc;

use amend_edits::bundle::{BundleBuilder, BundleMeta};
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::families::LowRankTensor;
use amend_edits::{AddOptions, Bundle, EditSet, ModelBinding, Site, TrustStore};
use amend_runtime::{Backend, GenerateParams};

pub const D: usize = 640;
pub const LAYER: u32 = 12;

pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
    pub fn unit_rows(&mut self, n: usize) -> Vec<f32> {
        let mut v = self.vec(n * D, 1.0);
        for r in v.chunks_mut(D) {
            amend_edits::families::l2_normalize(r);
        }
        v
    }
}

pub fn meta(binding: &ModelBinding, id: &str) -> BundleMeta {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    BundleMeta {
        bundle_id: id.into(),
        channel: id.into(),
        version: 1,
        created: now - 10,
        not_before: now - 10,
        expires: now + 3600,
        model: binding.clone(),
    }
}

pub fn set_of(binding: &ModelBinding, key: &SigningKey, b: &BundleBuilder) -> Arc<EditSet> {
    let set = EditSet::new(binding.clone(), TrustStore::with_key(key.verifying_key()));
    let bytes = b.build_signed(key).unwrap();
    let bundle = Bundle::from_bytes(bytes.as_slice(), set.trust()).unwrap();
    set.add(Arc::new(bundle), AddOptions::default()).unwrap();
    Arc::new(set)
}

pub fn codebook(
    binding: &ModelBinding,
    rng: &mut Rng,
    n: usize,
    with_neurons: usize,
) -> BundleBuilder {
    let mut b = BundleBuilder::new(meta(binding, &format!("cb{n}")));
    let keys = rng.unit_rows(n);
    let values = rng.vec(n * D, 1.0);
    // Radius 0: random keys never match a real prompt, which is the common case (a lookup that
    // finds nothing) and keeps the generated text identical across variants.
    let radii = vec![0.0f32; n];
    let p = b.add_codebook(
        LAYER,
        Site::FfnInput,
        Site::FfnOutput,
        1,
        false,
        D,
        &keys,
        &values,
        &radii,
    );
    b.add_edit("cb", LAYER, Site::FfnOutput, "p", " t", p, 0, n as u32);
    if with_neurons > 0 {
        let k = rng.vec(with_neurons * D, 1e-3);
        // Very negative biases: the neurons are evaluated at every position but never fire.
        let biases = vec![-1e6f32; with_neurons];
        let v = rng.vec(with_neurons * D, 1.0);
        let q = b.add_patch_neurons(
            LAYER,
            Site::FfnInput,
            Site::FfnOutput,
            0,
            D,
            &k,
            &biases,
            &v,
        );
        b.add_edit(
            "pn",
            LAYER,
            Site::FfnOutput,
            "p",
            " t",
            q,
            0,
            with_neurons as u32,
        );
    }
    b
}

pub fn low_rank(binding: &ModelBinding, rng: &mut Rng, rank: usize) -> BundleBuilder {
    let mut b = BundleBuilder::new(meta(binding, &format!("lr{rank}")));
    let a = rng.vec(rank * 2048, 1e-3);
    let bm = rng.vec(D * rank, 1e-3);
    let name = format!("blk.{LAYER}.ffn_down.weight");
    let t = LowRankTensor {
        name: &name,
        n_in: 2048,
        n_out: D,
        rank,
        a: &a,
        b: &bm,
        alpha: rank as f32,
    };
    let p = b.add_low_rank(&[t]);
    b.add_edit("lr", LAYER, Site::FfnOutput, "p", " t", p, 0, 1);
    b
}

/// Decode tokens/s of one greedy generation of `n` tokens as a request.
pub fn decode_tok_s(s: &mut dyn Backend, prompt: &str, n: usize) -> f64 {
    timings(s, prompt, n).1
}

/// Prefill and decode tokens/s of one greedy generation of `n` tokens as a request.
pub fn timings(s: &mut dyn Backend, prompt: &str, n: usize) -> (f64, f64) {
    let params = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(n)
    };
    let out = s
        .generate_text(prompt, &params, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    (out.timings.prefill_tok_s(), out.timings.decode_tok_s())
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
