//! Token-embedding rows read by the host ([`super::graph::fed_embedding_rows`]).
//!
//! A `Gather` in the graph would keep the whole table resident beside the copy the tied output
//! projection's `MatMulNBits` prepacks (189 MB twice for gemma3-270m). Instead the host reads the
//! rows a run needs from the GGUF file, converts them exactly as the graph builder does, and
//! feeds them. Those bytes are read after open, from a file another process could rewrite, so
//! every row is checked against a digest taken at open from the graph's own copy of the table
//! (bytes already verified: built from the fingerprinted file, or a cached graph checked by its
//! sha256). A row that does not match is an error, never an input.

use std::fs::File;
use std::path::{Path, PathBuf};

use amend_edits::gguf::GgmlType;
use sha2::{Digest, Sha256};

use super::quant::{self, LinearWeight};
use crate::error::RuntimeError;

/// Digest bytes kept per row (a truncated SHA-256: 4 MB for a 262,144-row vocabulary).
const DIGEST: usize = 16;

pub struct EmbeddingRows {
    file: File,
    path: PathBuf,
    /// Absolute offset of the table in the file.
    offset: u64,
    /// Bytes per row in the file (Q8_0: n_embd / 32 blocks of 34 bytes).
    row_bytes: usize,
    n_embd: usize,
    digests: Vec<[u8; DIGEST]>,
}

impl std::fmt::Debug for EmbeddingRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingRows")
            .field("path", &self.path)
            .field("rows", &self.digests.len())
            .finish()
    }
}

fn digest(codes: &[u8], scales: &[f32]) -> [u8; DIGEST] {
    let mut h = Sha256::new();
    h.update(codes);
    for s in scales {
        h.update(s.to_le_bytes());
    }
    h.finalize()[..DIGEST].try_into().expect("16 of 32 bytes")
}

impl EmbeddingRows {
    /// Opens the table `token_embd.weight` of the GGUF at `path` (`header` already read from
    /// it), with one digest per row from `codes` (`[n_vocab * n_embd]`) and `scales`
    /// (`[n_vocab * n_embd / 32]` f32, little-endian): the graph's own copy.
    pub fn open(
        path: &Path,
        header: &amend_edits::gguf::GgufHeader,
        codes: &[u8],
        scales: &[u8],
    ) -> Result<EmbeddingRows, RuntimeError> {
        let bad = |detail: String| RuntimeError::OrtGraph(format!("token embeddings: {detail}"));
        let t = header
            .tensor("token_embd.weight")
            .ok_or_else(|| bad("the model has no token_embd.weight".into()))?;
        if t.ggml_type != GgmlType::Q8_0 || t.ne.len() != 2 {
            return Err(bad("expected a 2-D Q8_0 table".into()));
        }
        let (n_embd, n_rows) = (t.ne[0] as usize, t.ne[1] as usize);
        if n_embd == 0 || n_embd % 32 != 0 {
            return Err(bad(format!("row length {n_embd} is not a multiple of 32")));
        }
        let kb = n_embd / 32;
        if codes.len() != n_rows * n_embd || scales.len() != n_rows * kb * 4 {
            return Err(bad(format!(
                "the graph's table holds {} codes and {} scale bytes, the file {n_rows} rows of {n_embd}",
                codes.len(),
                scales.len()
            )));
        }
        let offset = header
            .data_offset
            .checked_add(t.offset)
            .ok_or_else(|| bad("offset overflows".into()))?;
        let (file, _) = amend_edits::fsutil::open_regular(path, amend_edits::fsutil::MAX_MODEL_LEN)
            .map_err(RuntimeError::File)?;
        let digests = codes
            .chunks_exact(n_embd)
            .zip(scales.chunks_exact(kb * 4))
            .map(|(c, s)| {
                let s: Vec<f32> = s
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                digest(c, &s)
            })
            .collect();
        Ok(EmbeddingRows {
            file,
            path: path.to_path_buf(),
            offset,
            row_bytes: kb * 34,
            n_embd,
            digests,
        })
    }

    /// The rows of `ids` as the graph takes them: codes `[T * n_embd]` and scales
    /// `[T * n_embd / 32]`. Errors: an id out of range, a read that fails, or a row whose bytes
    /// differ from the table's at open ([`RuntimeError::ModelChanged`]).
    pub fn rows(&self, ids: &[i64]) -> Result<(Vec<u8>, Vec<f32>), RuntimeError> {
        let mut codes = Vec::with_capacity(ids.len() * self.n_embd);
        let mut scales = Vec::with_capacity(ids.len() * self.n_embd / 32);
        let mut raw = vec![0u8; self.row_bytes];
        for &id in ids {
            let row = usize::try_from(id)
                .ok()
                .filter(|&r| r < self.digests.len())
                .ok_or(RuntimeError::InvalidToken {
                    token: id as i32,
                    n_vocab: self.digests.len() as u32,
                })?;
            let at = self.offset + (row * self.row_bytes) as u64;
            read_exact_at(&self.file, &mut raw, at).map_err(|source| RuntimeError::Io {
                path: self.path.clone(),
                source,
            })?;
            let LinearWeight::NBits {
                b: c, scales: s, ..
            } = quant::linear_weight("token_embd.weight", GgmlType::Q8_0, self.n_embd, 1, &raw)
                .map_err(|e| RuntimeError::OrtGraph(e.to_string()))?
            else {
                unreachable!("Q8_0 maps to MatMulNBits")
            };
            if digest(&c, &s) != self.digests[row] {
                return Err(RuntimeError::ModelChanged {
                    path: self.path.clone(),
                    detail: format!("token embedding row {row} differs from the one opened"),
                });
            }
            codes.extend_from_slice(&c);
            scales.extend_from_slice(&s);
        }
        Ok((codes, scales))
    }
}

#[cfg(unix)]
fn read_exact_at(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, at)
}

#[cfg(windows)]
fn read_exact_at(f: &File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(f, buf, at)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                at += n as u64;
            }
        }
    }
    Ok(())
}
