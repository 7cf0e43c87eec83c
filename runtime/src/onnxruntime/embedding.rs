//! Token-embedding rows read by the host ([`super::graph::EmbeddingInput`]).
//!
//! A `Gather` in the graph would keep the whole table resident: beside the copy the tied output
//! projection's `MatMulNBits` prepacks (189 MB twice for gemma3-270m on the `cpu` profile), or as
//! an f32 table (671 MB on the `portable` profile). Instead the host reads the rows a run needs
//! from the GGUF file, converts them exactly as the graph builder does, and feeds them. Those
//! bytes are read after open, from a file another process could rewrite, so every row is checked
//! against a digest taken at open from the graph's own copy of the table (bytes already
//! verified: built from the fingerprinted file, or a cached graph checked by its sha256). A row
//! that does not match is an error, never an input.

use std::fs::File;
use std::path::{Path, PathBuf};

use amend_edits::gguf::GgmlType;
use sha2::{Digest, Sha256};

use super::graph::EmbeddingInput;
use super::quant::{self, LinearWeight};
use crate::error::RuntimeError;

/// Digest bytes kept per row (a truncated SHA-256: 4 MB for a 262,144-row vocabulary).
const DIGEST: usize = 16;

pub struct EmbeddingRows {
    file: File,
    path: PathBuf,
    /// Absolute offset of the table in the file.
    offset: u64,
    /// The table's type in the file.
    ty: GgmlType,
    /// Bytes per row in the file.
    row_bytes: usize,
    n_embd: usize,
    form: EmbeddingInput,
    digests: Vec<[u8; DIGEST]>,
}

/// Rows as the graph takes them ([`EmbeddingInput`]).
pub enum Rows {
    /// Codes `[T * n_embd]` and scales `[T * n_embd / 32]`.
    Q8_0(Vec<u8>, Vec<f32>),
    /// `[T * n_embd]`.
    F32(Vec<f32>),
}

impl std::fmt::Debug for EmbeddingRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingRows")
            .field("path", &self.path)
            .field("form", &self.form)
            .field("rows", &self.digests.len())
            .finish()
    }
}

fn digest(parts: &[&[u8]]) -> [u8; DIGEST] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()[..DIGEST].try_into().expect("16 of 32 bytes")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl EmbeddingRows {
    /// Opens the table `token_embd.weight` of the GGUF at `path` (`header` already read from
    /// it), taking one digest per row from the graph's own copy: for [`EmbeddingInput::Q8_0`]
    /// `table` is the codes (`[n_vocab * n_embd]`) and `scales` the f32 scales
    /// (`[n_vocab * n_embd / 32]`, little-endian); for [`EmbeddingInput::F32`] `table` is the
    /// GGUF's bytes ([`super::graph::EMBD_TABLE`]) and `scales` is empty.
    pub fn open(
        path: &Path,
        header: &amend_edits::gguf::GgufHeader,
        form: EmbeddingInput,
        table: &[u8],
        scales: &[u8],
    ) -> Result<EmbeddingRows, RuntimeError> {
        let bad = |detail: String| RuntimeError::OrtGraph(format!("token embeddings: {detail}"));
        let t = header
            .tensor("token_embd.weight")
            .ok_or_else(|| bad("the model has no token_embd.weight".into()))?;
        if t.ne.len() != 2 || (form == EmbeddingInput::Q8_0 && t.ggml_type != GgmlType::Q8_0) {
            return Err(bad("expected a 2-D table of the graph's type".into()));
        }
        let (n_embd, n_rows) = (t.ne[0] as usize, t.ne[1] as usize);
        let size = t.byte_size().map_err(|e| bad(e.to_string()))? as usize;
        if n_embd == 0 || n_rows == 0 || !size.is_multiple_of(n_rows) {
            return Err(bad(format!("{n_rows} rows of {n_embd} in {size} bytes")));
        }
        let row_bytes = size / n_rows;
        let digests: Vec<[u8; DIGEST]> = match form {
            EmbeddingInput::Q8_0 => {
                if n_embd % 32 != 0 {
                    return Err(bad(format!("row length {n_embd} is not a multiple of 32")));
                }
                let kb = n_embd / 32;
                if table.len() != n_rows * n_embd || scales.len() != n_rows * kb * 4 {
                    return Err(bad(format!(
                        "the graph's table holds {} codes and {} scale bytes, the file {n_rows} rows of {n_embd}",
                        table.len(),
                        scales.len()
                    )));
                }
                table
                    .chunks_exact(n_embd)
                    .zip(scales.chunks_exact(kb * 4))
                    .map(|(c, s)| digest(&[c, s]))
                    .collect()
            }
            EmbeddingInput::F32 => {
                if table.len() != size {
                    return Err(bad(format!(
                        "the graph's table holds {} bytes, the file {size}",
                        table.len()
                    )));
                }
                table
                    .chunks_exact(row_bytes)
                    .map(|r| digest(&[r]))
                    .collect()
            }
        };
        let offset = header
            .data_offset
            .checked_add(t.offset)
            .ok_or_else(|| bad("offset overflows".into()))?;
        let (file, _) = amend_edits::fsutil::open_regular(path, amend_edits::fsutil::MAX_MODEL_LEN)
            .map_err(RuntimeError::File)?;
        Ok(EmbeddingRows {
            file,
            path: path.to_path_buf(),
            offset,
            ty: t.ggml_type,
            row_bytes,
            n_embd,
            form,
            digests,
        })
    }

    /// The rows of `ids` as the graph takes them. Errors: an id out of range, a read that
    /// fails, or a row whose bytes differ from the table's at open
    /// ([`RuntimeError::ModelChanged`]).
    pub fn rows(&self, ids: &[i64]) -> Result<Rows, RuntimeError> {
        let n = ids.len() * self.n_embd;
        let mut out = match self.form {
            EmbeddingInput::Q8_0 => Rows::Q8_0(Vec::with_capacity(n), Vec::with_capacity(n / 32)),
            EmbeddingInput::F32 => Rows::F32(Vec::with_capacity(n)),
        };
        let mut raw = vec![0u8; self.row_bytes];
        let graph_err = |e: quant::QuantError| RuntimeError::OrtGraph(e.to_string());
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
            let changed = || RuntimeError::ModelChanged {
                path: self.path.clone(),
                detail: format!("token embedding row {row} differs from the one opened"),
            };
            match &mut out {
                Rows::Q8_0(codes, scales) => {
                    let LinearWeight::NBits {
                        b: c, scales: s, ..
                    } = quant::linear_weight("token_embd.weight", self.ty, self.n_embd, 1, &raw)
                        .map_err(graph_err)?
                    else {
                        unreachable!("Q8_0 maps to MatMulNBits")
                    };
                    if digest(&[&c, &f32_bytes(&s)]) != self.digests[row] {
                        return Err(changed());
                    }
                    codes.extend_from_slice(&c);
                    scales.extend_from_slice(&s);
                }
                Rows::F32(rows) => {
                    if digest(&[&raw]) != self.digests[row] {
                        return Err(changed());
                    }
                    rows.extend(
                        quant::dequantize("token_embd.weight", self.ty, self.n_embd, 1, &raw)
                            .map_err(graph_err)?,
                    );
                }
            }
        }
        Ok(out)
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
