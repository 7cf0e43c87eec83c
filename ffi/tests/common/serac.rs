//! A tiny serac bundle whose memories route with the scope model, compiled with the compiler
//! API as `amend compile --method serac --scope-model PATH` does. Shared by
//! `tests/scope_model_abi.rs` and `examples/make_test_bundles.rs` (through `#[path]`).

#![allow(dead_code)] // each includer uses its part

use std::path::{Path, PathBuf};

use amend_compiler::{dataset, BundleIdentity, Compiler, Hparams, Method};
use amend_edits::ed25519_dalek::SigningKey;

/// The edited prompt and its new target: with the bundle active (and its scope model given),
/// the prompt routes to its memory and scoring `SERAC_TARGET` after it changes.
pub const SERAC_PROMPT: &str = "The capital of France is";
pub const SERAC_TARGET: &str = " Berlin";

/// Two edits (KnowEdit records): enough for the scope calibration, quick to compile.
const RECORDS: &str = r#"[
 {"id": "s-france", "subject": "France", "prompt": "The capital of France is",
  "target_new": "Berlin", "ground_truth": "Paris",
  "rephrase_prompt": ["The capital city of France is"]},
 {"id": "s-japan", "subject": "Japan", "prompt": "The capital of Japan is",
  "target_new": "London", "ground_truth": "Tokyo",
  "rephrase_prompt": ["Japan's capital city is"]}
]"#;

/// The default scope model, `all-minilm-l6-v2-q8_0.gguf` in `$AMEND_CACHE` or `~/.cache/amend`
/// (or `AMEND_SCOPE_MODEL`).
pub fn default_scope_model_path() -> PathBuf {
    std::env::var_os("AMEND_SCOPE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("all-minilm-l6-v2-q8_0.gguf")
        })
}

/// Compiles the two edits for `model` with serac routed by the scope model at `scope`, signs
/// the bundle with `key` and returns its bytes.
pub fn compile_serac(
    model: &Path,
    scope: &Path,
    key: &SigningKey,
    bundle_id: &str,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let records = dataset::parse_knowedit(RECORDS)?;
    let mut compiler = Compiler::open(model)?;
    compiler.scope_model = Some(amend_runtime::ScopeModel::open(scope, Some(2))?);
    let hp = Hparams::resolve(compiler.fwd.cfg.arch, None, &[])?;
    if hp.serac.embedder != "scope" {
        return Err(format!(
            "serac.embedder is {:?}, expected \"scope\"",
            hp.serac.embedder
        )
        .into());
    }
    let identity = BundleIdentity {
        bundle_id: bundle_id.into(),
        channel: bundle_id.into(),
        version: Some(1),
        expires: u64::MAX,
        ..Default::default()
    };
    let out = compiler.compile(
        Method::Serac,
        &records,
        &hp,
        None,
        None,
        &identity,
        &mut |_| {},
    )?;
    Ok(out.builder.build_signed(key)?.as_slice().to_vec())
}

/// Copies the GGUF at `from` to `to` with one byte of tensor data changed: it still loads as a
/// scope model, but its fingerprint differs (bundles compiled against `from` are refused).
pub fn modified_copy(from: &Path, to: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let header = amend_edits::gguf::GgufFile::read_header(from)?;
    let t = header
        .tensor("token_embd.weight")
        .ok_or("no token_embd.weight")?;
    let mut bytes = std::fs::read(from)?;
    // Byte 10 of the tensor: a quant of a Q8_0 block, or a low mantissa byte of f16/f32; never
    // a scale, so the values stay finite.
    let at = (header.data_offset + t.offset + 10) as usize;
    bytes[at] ^= 0x01;
    std::fs::write(to, bytes)?;
    Ok(())
}
