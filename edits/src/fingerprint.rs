//! The base-model fingerprint bundles are bound to.
//!
//! `sha256("amend-model-fp-v2" || arch || n_layer || n_embd || hyperparameters || tensor table
//! bytes || tensor data)`: the hyperparameters are the validated [`ModelHparams`] llama.cpp builds
//! the graph from (head counts, head sizes, epsilons, vocabulary, special tokens), so two files
//! that differ only in metadata differ; the tensor table carries every tensor's name, type, shape
//! and offset, so another quantization of the same model differs there; the data makes a
//! fine-tune of the same shape differ too.
//! Hashing all data costs about a tenth of a second per 250 MB with SHA-NI, so the result is cached
//! next to the model in `<model>.amendfp`, keyed by file length, mtime and a hash of the header.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::bundle::ModelBinding;
use crate::gguf::{GgufError, GgufFile, GgufHeader, HparamError, ModelHparams};

#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    #[error("cannot read model: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a valid GGUF: {0}")]
    Gguf(#[from] GgufError),
    #[error("invalid model hyperparameters: {0}")]
    Hparams(#[from] HparamError),
}

const DOMAIN: &[u8] = b"amend-model-fp-v2";
const CACHE_MAGIC: &str = "amendfp2";

/// Where the hashed parts of a GGUF lie (from its parsed header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelLayout {
    /// Byte range of the tensor table.
    pub tensor_table: (u64, u64),
    /// Start of the tensor data.
    pub data_offset: u64,
}

impl From<&GgufHeader> for ModelLayout {
    fn from(h: &GgufHeader) -> Self {
        ModelLayout {
            tensor_table: h.tensor_table,
            data_offset: h.data_offset,
        }
    }
}

/// The binding (fingerprint, architecture, dims) of a GGUF in memory.
pub fn binding_of_bytes(bytes: &[u8]) -> Result<ModelBinding, FingerprintError> {
    let f = GgufFile::parse(bytes)?;
    let hp = ModelHparams::from_header(&f)?;
    hash_model(bytes, &ModelLayout::from(&f.header), &hp)
}

/// The fingerprint of the file `bytes` whose header was already parsed and validated into
/// `layout` and `hp` (no second parse).
fn hash_model(
    bytes: &[u8],
    layout: &ModelLayout,
    hp: &ModelHparams,
) -> Result<ModelBinding, FingerprintError> {
    let (t0, t1) = layout.tensor_table;
    let len = bytes.len() as u64;
    if t0 > t1 || t1 > len || layout.data_offset > len {
        // The file changed since its header was parsed.
        return Err(GgufError::Truncated {
            what: "tensor table",
            offset: t0,
            needed: t1.saturating_sub(t0),
            len,
        }
        .into());
    }
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update((hp.arch.len() as u32).to_le_bytes());
    h.update(hp.arch.as_bytes());
    h.update(hp.n_layer.to_le_bytes());
    h.update(hp.n_embd.to_le_bytes());
    h.update(hp.hash_bytes());
    h.update(&bytes[t0 as usize..t1 as usize]);
    h.update(&bytes[layout.data_offset as usize..]);
    Ok(ModelBinding {
        fingerprint: h.finalize().into(),
        arch: hp.arch.clone(),
        n_layer: hp.n_layer,
        n_embd: hp.n_embd,
    })
}

/// The cache file next to a model.
pub fn cache_path(model: &Path) -> PathBuf {
    let mut s = model.as_os_str().to_owned();
    s.push(".amendfp");
    PathBuf::from(s)
}

fn cache_key(model: &Path, head: &[u8]) -> Result<String, std::io::Error> {
    let md = std::fs::metadata(model)?;
    let mtime = md
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let hh = Sha256::digest(head);
    Ok(format!(
        "{CACHE_MAGIC} {} {} {}",
        md.len(),
        mtime,
        crate::keys::to_hex(&hh)
    ))
}

/// Fingerprint, architecture and dims of the GGUF at `path`, using (and refreshing) the cache
/// `<path>.amendfp` when the model's length, mtime and first 1 MiB are unchanged.
pub fn model_binding(path: impl AsRef<Path>) -> Result<ModelBinding, FingerprintError> {
    model_binding_with(path.as_ref(), None)
}

/// [`model_binding`] of a model whose header the caller already parsed and validated (the
/// runtime's [`Model::open`](../../amend_runtime/struct.Model.html)): the file is not parsed again.
pub fn model_binding_parsed(
    path: impl AsRef<Path>,
    layout: &ModelLayout,
    hp: &ModelHparams,
) -> Result<ModelBinding, FingerprintError> {
    model_binding_with(path.as_ref(), Some((layout, hp)))
}

fn model_binding_with(
    path: &Path,
    parsed: Option<(&ModelLayout, &ModelHparams)>,
) -> Result<ModelBinding, FingerprintError> {
    let file = std::fs::File::open(path)?;
    // SAFETY: read-only mapping of a model file nobody writes while it is open.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let head = &map[..map.len().min(1 << 20)];
    let key = cache_key(path, head)?;
    if let Ok(text) = std::fs::read_to_string(cache_path(path)) {
        if let Some(b) = parse_cache(&text, &key) {
            return Ok(b);
        }
    }
    let b = match parsed {
        Some((layout, hp)) => hash_model(&map, layout, hp)?,
        None => binding_of_bytes(&map)?,
    };
    // Best effort: a read-only model directory just means no cache.
    let _ = write_cache(path, &key, &b);
    Ok(b)
}

/// Fingerprint without the cache (always hashes everything).
pub fn model_binding_uncached(path: impl AsRef<Path>) -> Result<ModelBinding, FingerprintError> {
    let file = std::fs::File::open(path.as_ref())?;
    // SAFETY: as in `model_binding`.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    binding_of_bytes(&map)
}

/// Just the 32-byte fingerprint.
pub fn fingerprint(path: impl AsRef<Path>) -> Result<[u8; 32], FingerprintError> {
    Ok(model_binding(path)?.fingerprint)
}

fn parse_cache(text: &str, key: &str) -> Option<ModelBinding> {
    let mut lines = text.lines();
    if lines.next()? != key {
        return None;
    }
    let fp = crate::keys::decode_key_bytes(lines.next()?.as_bytes()).ok()?;
    let arch = lines.next()?.to_string();
    let n_layer = lines.next()?.parse().ok()?;
    let n_embd = lines.next()?.parse().ok()?;
    Some(ModelBinding {
        fingerprint: fp,
        arch,
        n_layer,
        n_embd,
    })
}

fn write_cache(model: &Path, key: &str, b: &ModelBinding) -> std::io::Result<()> {
    let target = cache_path(model);
    let tmp = target.with_extension(format!("amendfp.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(
        f,
        "{key}\n{}\n{}\n{}\n{}",
        crate::keys::to_hex(&b.fingerprint),
        b.arch,
        b.n_layer,
        b.n_embd
    )?;
    drop(f);
    std::fs::rename(tmp, target)
}
