//! Writes the signed test bundles the C, Python and Java tests load:
//!
//! make_test_bundles MODEL.gguf OUT_DIR [SCOPE_MODEL.gguf]
//!
//! - `key.pub`: the trusting public key (64 hex digits) and `key.raw` (32 bytes)
//! - `good.amend`: one GRACE codebook edit (`e-paris`), bound to MODEL
//! - `other-model.amend`: the same edit bound to another model's fingerprint
//! - `untrusted.amend`: bound to MODEL but signed by a key that is not trusted
//! - `lora.amend`: a low-rank delta on the last layer's FFN down-projection (`e-lora`), large
//!   enough to change what greedy generation produces: tests compare the tokens generated with
//!   it active through C, Python and Java against the Rust API's.
//!
//! With SCOPE_MODEL (the scope model, e.g. ~/.cache/amend/all-minilm-l6-v2-q8_0.gguf):
//!
//! - `serac.amend`: two serac edits (`s-france`: "The capital of France is" -> " Berlin",
//!   `s-japan`) whose memory routes with SCOPE_MODEL, compiled as `amend compile --method serac`
//!   does (~15 s): activating it needs that scope model
//! - `scope-other.gguf`: a copy of SCOPE_MODEL with one weight changed: it loads, but its
//!   fingerprint differs, so `serac.amend` is refused with it (AMEND_ERR_SCOPE_MODEL_MISMATCH)

use std::path::PathBuf;

#[path = "../tests/common/serac.rs"]
mod serac;

use amend_edits::bundle::{BundleBuilder, BundleMeta, ModelBinding};
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::families::LowRankTensor;
use amend_edits::keys::to_hex;
use amend_edits::Site;

/// A deterministic pseudo-random value in [-scale, scale] (no RNG dependency, same on every
/// machine).
fn wave(i: usize, scale: f32) -> f32 {
    ((i as f32 * 12.9898).sin() * 43758.547).fract() * scale
}

fn lora_builder(model: ModelBinding, n_ff: usize) -> BundleBuilder {
    let dim = model.n_embd as usize;
    let layer = model.n_layer - 1;
    let mut b = BundleBuilder::new(BundleMeta {
        bundle_id: "test-lora".into(),
        channel: "test-lora".into(),
        version: 1,
        created: 1_700_000_000,
        not_before: 0,
        expires: u64::MAX,
        model,
    });
    let rank = 4;
    let a: Vec<f32> = (0..rank * n_ff).map(|i| wave(i, 0.05)).collect();
    let bm: Vec<f32> = (0..dim * rank).map(|i| wave(i + 7, 0.05)).collect();
    let name = format!("blk.{layer}.ffn_down.weight");
    let lr = b.add_low_rank(&[LowRankTensor {
        name: &name,
        n_in: n_ff,
        n_out: dim,
        rank,
        a: &a,
        b: &bm,
        alpha: 64.0,
    }]);
    b.add_edit(
        "e-lora",
        layer,
        Site::FfnOutput,
        "The capital of France is",
        " Paris",
        lr,
        0,
        1,
    );
    b
}

fn builder(id: &str, model: ModelBinding) -> BundleBuilder {
    let dim = model.n_embd as usize;
    let layer = model.n_layer / 2;
    let mut b = BundleBuilder::new(BundleMeta {
        bundle_id: id.into(),
        channel: "test".into(),
        version: 1,
        created: 1_700_000_000,
        not_before: 0,
        expires: u64::MAX,
        model,
    });
    // A key far from any real hidden state: the edit never fires on ordinary prompts, so
    // generation is unchanged and comparable with the Rust API.
    let keys: Vec<f32> = (0..dim).map(|i| if i == 0 { 1.0e6 } else { 0.0 }).collect();
    let values = vec![0.0f32; dim];
    let cb = b.add_codebook(
        layer,
        Site::ResidualOut,
        Site::ResidualOut,
        0,
        false,
        dim,
        &keys,
        &values,
        &[1.0],
    );
    b.add_edit(
        "e-paris",
        layer,
        Site::ResidualOut,
        "The capital of France is",
        " Paris",
        cb,
        0,
        1,
    );
    b
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, out, scope) = match args.as_slice() {
        [model, out] => (model, out, None),
        [model, out, scope] => (model, out, Some(PathBuf::from(scope))),
        _ => return Err("usage: make_test_bundles MODEL.gguf OUT_DIR [SCOPE_MODEL.gguf]".into()),
    };
    let n_ff = amend_runtime::Model::open(model, amend_runtime::ModelOptions::default())?
        .info()
        .n_ff as usize;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let binding = amend_edits::fingerprint::model_binding(model)?;
    let key = SigningKey::from_bytes(&[42; 32]);
    let stranger = SigningKey::from_bytes(&[43; 32]);
    std::fs::write(
        out.join("key.pub"),
        format!("{}\n", to_hex(key.verifying_key().as_bytes())),
    )?;
    std::fs::write(out.join("key.raw"), key.verifying_key().as_bytes())?;
    let good = builder("test-good", binding.clone()).build_signed(&key)?;
    std::fs::write(out.join("good.amend"), good.as_slice())?;
    let other = ModelBinding {
        fingerprint: [9; 32],
        ..binding.clone()
    };
    let other = builder("test-other-model", other).build_signed(&key)?;
    std::fs::write(out.join("other-model.amend"), other.as_slice())?;
    let lora = lora_builder(binding.clone(), n_ff).build_signed(&key)?;
    std::fs::write(out.join("lora.amend"), lora.as_slice())?;
    let untrusted = builder("test-untrusted", binding).build_signed(&stranger)?;
    std::fs::write(out.join("untrusted.amend"), untrusted.as_slice())?;
    if let Some(scope) = scope {
        let bundle = serac::compile_serac(model.as_ref(), &scope, &key, "test-serac")?;
        std::fs::write(out.join("serac.amend"), bundle)?;
        serac::modified_copy(&scope, &out.join("scope-other.gguf"))?;
    }
    println!("{}", out.display());
    Ok(())
}
