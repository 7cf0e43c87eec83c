//! The base-model fingerprint bundles are bound to.
//!
//! `sha256("amend-model-fp-v2" || arch || n_layer || n_embd || hyperparameters || tensor table
//! bytes || tensor data)`: the hyperparameters are the validated [`ModelHparams`] llama.cpp builds
//! the graph from (head counts, head sizes, epsilons, vocabulary, special tokens, and since session 33
//! the forward constants where a file sets any: RoPE scaling and the sliding-window base, window
//! and pattern, soft-capping, attention scale), so two files
//! that differ only in metadata differ; the tensor table carries every tensor's name, type, shape
//! and offset, so another quantization of the same model differs there; the data makes a
//! fine-tune of the same shape differ too. The same pass checks that every tensor's floats
//! (float weights, quantized blocks' scales) are finite, so a file that hashes, and its cache
//! entry, vouch for that too.
//! Hashing all data costs about half a second per 250 MB, so the result is cached next to the
//! model in `<model>.amendfp` (or, where the model's directory cannot be written, in
//! [`fallback_cache_path`]), keyed by what a content change cannot keep equal: device, inode,
//! length, mtime and the inode change time (ctime), which the kernel sets on every write and
//! which no unprivileged call can set back (`touch -d` restores mtime, not ctime). As in git's
//! "racy" index rule, a cache entry whose ctime was less than [`RACY_NS`] before the hash began
//! is not trusted (a second write within the file system's timestamp granularity could keep the
//! ctime equal), so a just-written model is hashed again on its next use.

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
    #[error("the model's header changed since it was checked")]
    Changed,
}

const DOMAIN: &[u8] = b"amend-model-fp-v2";
// amendfp3: the v2 fingerprint (hyperparameters hashed); a v1-era entry is never reused.
// amendfp4: entries also vouch that every tensor's floats are finite (checked as they are hashed).
// amendfp5: the forward constants are hashed too, where a file sets them.
const CACHE_MAGIC: &str = "amendfp5";
/// A cache entry is trusted only when the model's ctime is at least this much older than the
/// moment its hash began.
pub const RACY_NS: u128 = 2_000_000_000;

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
    hash_parsed(&f, &hp)
}

/// The fingerprint of the file `bytes` whose header was already parsed and validated into
/// `layout` and `hp`. The tensor table is parsed again (milliseconds, against the hash's half
/// second) to check every tensor's floats in the same pass over the data.
fn hash_model(
    bytes: &[u8],
    layout: &ModelLayout,
    hp: &ModelHparams,
) -> Result<ModelBinding, FingerprintError> {
    let f = GgufFile::parse(bytes)?;
    if ModelLayout::from(&f.header) != *layout {
        return Err(FingerprintError::Changed);
    }
    hash_parsed(&f, hp)
}

/// Checks that every tensor's floats are finite (so a cached fingerprint also vouches for
/// that: see the module docs) and hashes.
fn hash_parsed(f: &GgufFile<'_>, hp: &ModelHparams) -> Result<ModelBinding, FingerprintError> {
    f.check_finite()?;
    let bytes = f.bytes();
    let layout = ModelLayout::from(&f.header);
    let (t0, t1) = layout.tensor_table;
    let len = bytes.len() as u64;
    if t0 > t1 || t1 > len || layout.data_offset > len {
        return Err(GgufError::Truncated {
            what: "tensor data",
            offset: layout.data_offset,
            needed: 0,
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
    // Since session 33; absent (and the fingerprint unchanged) for files without them.
    if let Some(forward) = hp.forward_hash_bytes() {
        h.update(b"forward constants");
        h.update(forward);
    }
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

/// The cache key of an opened model file: `amendfp5 dev ino len mtime_ns ctime_ns`, and the
/// ctime in ns.
fn cache_key(file: &std::fs::File) -> Result<(String, u128), std::io::Error> {
    let md = file.metadata()?;
    let ns = |t: std::io::Result<std::time::SystemTime>| {
        t.ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos())
    };
    let mtime = ns(md.modified());
    #[cfg(unix)]
    let (dev, ino, ctime) = {
        use std::os::unix::fs::MetadataExt;
        (
            md.dev(),
            md.ino(),
            (md.ctime().max(0) as u128) * 1_000_000_000 + md.ctime_nsec().max(0) as u128,
        )
    };
    #[cfg(not(unix))]
    let (dev, ino, ctime) = (0u64, 0u64, mtime);
    Ok((
        format!("{CACHE_MAGIC} {dev} {ino} {} {mtime} {ctime}", md.len()),
        ctime,
    ))
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn open_model(path: &Path) -> Result<std::fs::File, FingerprintError> {
    let (file, _) =
        crate::fsutil::open_regular(path, crate::fsutil::MAX_MODEL_LEN).map_err(|e| {
            // Keep the kind (NotFound, PermissionDenied) for callers that branch on it.
            let kind = e.io_kind().unwrap_or(std::io::ErrorKind::InvalidInput);
            FingerprintError::Io(std::io::Error::new(kind, e.to_string()))
        })?;
    Ok(file)
}

/// Fingerprint, architecture and dims of the GGUF at `path`, using (and refreshing) the cache
/// `<path>.amendfp` when the model's device, inode, length, mtime and ctime are unchanged and
/// the entry is not racy (see the module docs).
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
    let file = open_model(path)?;
    let (key, ctime) = cache_key(&file)?;
    if let Some(b) = cached(path, &key, ctime) {
        return Ok(b);
    }
    let started = now_ns();
    // SAFETY: read-only mapping; a model truncated while it is hashed is outside the threat
    // model (llama.cpp maps the same file to run it), see docs/security.md.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let b = match parsed {
        Some((layout, hp)) => hash_model(&map, layout, hp)?,
        None => binding_of_bytes(&map)?,
    };
    // Best effort: a read-only model directory just means no cache. Only write an entry whose
    // key still holds after hashing; a racy one is written but not trusted (see above).
    if cache_key(&file).ok().is_some_and(|(k, _)| k == key) {
        let _ = write_cache(path, &key, started, &b);
    } else {
        let _ = std::fs::remove_file(cache_path(path));
    }
    Ok(b)
}

/// The cache key of an open model file (device, inode, length, mtime, ctime): equal before and
/// after a read means no write reached the file in between (see the module docs).
pub fn file_key(file: &std::fs::File) -> Result<String, std::io::Error> {
    cache_key(file).map(|(k, _)| k)
}

/// The binding of `copy`, a private copy of the model at `path` made while `path`'s key was
/// `key` before and after the copy (the caller checks both with [`file_key`]): the cached
/// fingerprint of `path` when its entry has that key and is not racy (the copy then holds the
/// bytes that were hashed), else the hash of the copy itself, cached for `path` if its key still
/// holds.
pub fn model_binding_of_copy(
    path: &Path,
    key: &str,
    copy: &std::fs::File,
    layout: &ModelLayout,
    hp: &ModelHparams,
) -> Result<ModelBinding, FingerprintError> {
    let file = open_model(path).ok();
    let current = file.as_ref().and_then(|f| cache_key(f).ok());
    let hit = current
        .as_ref()
        .filter(|(k, _)| k == key)
        .and_then(|(_, ctime)| cached(path, key, *ctime));
    if let Some(b) = hit {
        return Ok(b);
    }
    let started = now_ns();
    // SAFETY: read-only mapping of the caller's private, sealed copy (nothing can write it).
    let map = unsafe { memmap2::Mmap::map(copy)? };
    let b = hash_model(&map, layout, hp)?;
    if current.is_some_and(|(k, _)| k == key) {
        let _ = write_cache(path, key, started, &b);
    }
    Ok(b)
}

/// The cache entry of `path` for `key` (the file's current key, ctime `ctime`), unless it is
/// racy (see the module docs).
fn cached(path: &Path, key: &str, ctime: u128) -> Option<ModelBinding> {
    let entry = |p: &Path| {
        let text = crate::fsutil::read_regular_string(p, crate::fsutil::MAX_KEY_FILE_LEN).ok()?;
        let (b, hashed_at) = parse_cache(&text, key)?;
        (hashed_at >= ctime + RACY_NS).then_some(b)
    };
    entry(&cache_path(path)).or_else(|| {
        let p = fallback_cache_path(path)?;
        private(&p).then(|| entry(&p))?
    })
}

/// Whether `p` is a file of this user that no one else can write: an `$AMEND_CACHE` in a shared
/// directory must not let another user plant a fingerprint.
fn private(p: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        std::fs::symlink_metadata(p)
            .is_ok_and(|md| md.is_file() && md.uid() == me && md.mode() & 0o022 == 0)
    }
    #[cfg(not(unix))]
    {
        let _ = p;
        true
    }
}

/// Where a model's cache entry goes when its own directory cannot take one (a read-only
/// partition, a full one): `$AMEND_CACHE/fingerprints/` (else `~/.cache/amend/fingerprints/`),
/// named by a digest of the model's absolute path. The entry's key (device, inode, ...) still
/// decides whether it is the file's, so another file at that path later is hashed afresh.
pub fn fallback_cache_path(model: &Path) -> Option<PathBuf> {
    let dir = crate::fsutil::cache_dir()?;
    let abs = std::fs::canonicalize(model)
        .or_else(|_| std::path::absolute(model))
        .ok()?;
    let digest = Sha256::digest(abs.as_os_str().as_encoded_bytes());
    Some(
        dir.join("fingerprints")
            .join(format!("{}.amendfp", &crate::keys::to_hex(&digest)[..32])),
    )
}

/// Fingerprint without the cache (always hashes everything).
pub fn model_binding_uncached(path: impl AsRef<Path>) -> Result<ModelBinding, FingerprintError> {
    let file = open_model(path.as_ref())?;
    // SAFETY: as in `model_binding`.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    binding_of_bytes(&map)
}

/// Just the 32-byte fingerprint.
pub fn fingerprint(path: impl AsRef<Path>) -> Result<[u8; 32], FingerprintError> {
    Ok(model_binding(path)?.fingerprint)
}

fn parse_cache(text: &str, key: &str) -> Option<(ModelBinding, u128)> {
    let mut lines = text.lines();
    if lines.next()? != key {
        return None;
    }
    let hashed_at: u128 = lines.next()?.strip_prefix("hashed_at ")?.parse().ok()?;
    let fp = crate::keys::decode_key_bytes(lines.next()?.as_bytes()).ok()?;
    let arch = lines.next()?.to_string();
    let n_layer = lines.next()?.parse().ok()?;
    let n_embd = lines.next()?.parse().ok()?;
    Some((
        ModelBinding {
            fingerprint: fp,
            arch,
            n_layer,
            n_embd,
        },
        hashed_at,
    ))
}

fn write_cache(model: &Path, key: &str, hashed_at: u128, b: &ModelBinding) -> std::io::Result<()> {
    let target = cache_path(model);
    let text = format!(
        "{key}\nhashed_at {hashed_at}\n{}\n{}\n{}\n{}\n",
        crate::keys::to_hex(&b.fingerprint),
        b.arch,
        b.n_layer,
        b.n_embd
    );
    let beside = crate::fsutil::write_atomic(&target, text.as_bytes(), None);
    if beside.is_ok() {
        return beside;
    }
    // Best effort, as the entry beside the model: a read-only or full cache directory just
    // means the next open hashes again.
    let Some(fallback) = fallback_cache_path(model) else {
        return beside;
    };
    if let Some(dir) = fallback.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::fsutil::write_atomic(&fallback, text.as_bytes(), Some(0o600))
}
