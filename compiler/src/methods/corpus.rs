//! The covariance corpus of ROME and MEMIT and its statistics: the second moment `E[k kᵀ]` of the
//! down projection's inputs `k` over ordinary text, which tells an update which inputs to leave
//! alone (ROME's `C⁻¹k`, MEMIT's `w·C`, AlphaEdit's null space).
//!
//! Sources (`rome.corpus`, `memit.corpus`):
//! - `"wordnet"`: WordNet 3.0's glosses and usage examples (Princeton's licence allows use and
//!   redistribution), from Debian's `wordnet-base` package, which `scripts/fetch-corpus.sh`
//!   unpacks into `~/.cache/amend/wordnet-3.0/` (about 2.3M tokens in all). Passages are taken in
//!   a fixed pseudo-random order across the four parts of speech, so any `corpus_tokens` prefix
//!   covers every topic the dictionary has.
//! - `"neutral"`: `data/neutral-corpus.txt`, compiled in (about 1.3k tokens: fewer rows than
//!   `n_ff`, so `C` barely whitens; kept for small tests and comparison).
//! - anything else: a UTF-8 text file, one passage per line.
//!
//! Passages are packed, newline-separated, into sequences of at most [`SEQ_TOKENS`] tokens
//! (BOS first where the model wants it; BOS rows are skipped: their activations are outliers no
//! prompt shares) and run through the unedited model once for every requested layer at a time.
//! The moments are cached per model fingerprint, corpus digest, token budget and layer under
//! `~/.cache/amend/stats/` (`$AMEND_CACHE` overrides `~/.cache/amend`), each file carrying a
//! sha256 of its body that is checked on the copy read into memory before it is used.

use super::rome::tokenize;
use super::Compiler;
use crate::error::{CompileError, Result};
use crate::forward::{Capture, Proj};
use crate::linalg::{Cholesky, SymmetricEigen};
use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Instant;

/// Longest packed sequence (tokens, BOS included).
pub const SEQ_TOKENS: usize = 256;

/// The compiled-in neutral corpus (also T-Patcher's memory of FFN inputs).
pub const NEUTRAL_CORPUS: &str = include_str!("../../../data/neutral-corpus.txt");

use amend_edits::fsutil::cache_dir;

/// Writes a cache file with the one atomic writer, which removes its temporary file when the
/// write fails (a full partition kept every partial `NAME.tmpPID` before) and sweeps those a
/// killed compile left. A failure only costs the next compile the time to compute it again.
fn cache_write(p: &Path, bytes: &[u8]) {
    let r = match p.parent() {
        Some(d) => std::fs::create_dir_all(d),
        None => Ok(()),
    }
    .and_then(|()| amend_edits::fsutil::write_atomic(p, bytes, None));
    if let Err(e) = r {
        log::warn!("could not cache {}: {e}", p.display());
    }
}

/// A resolved corpus: its passages in order and a digest naming their content.
pub struct Corpus {
    pub name: String,
    pub passages: Vec<String>,
    pub digest: [u8; 32],
}

impl Corpus {
    /// `spec` as in the module docs.
    pub fn open(spec: &str) -> Result<Corpus> {
        let passages = match spec {
            "neutral" => NEUTRAL_CORPUS
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect(),
            "wordnet" => {
                let dir = cache_dir()
                    .ok_or_else(|| CompileError::Corpus("no $HOME or $AMEND_CACHE".into()))?
                    .join("wordnet-3.0");
                wordnet_passages(&dir)?
            }
            path => {
                let p = Path::new(path);
                let text = read_regular(p)?;
                let text = String::from_utf8(text).map_err(|_| {
                    CompileError::Corpus(format!("{}: not UTF-8 text", p.display()))
                })?;
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_string)
                    .collect()
            }
        };
        let passages: Vec<String> = passages;
        if passages.is_empty() {
            return Err(CompileError::Corpus(format!("`{spec}` has no text")));
        }
        let mut h = Sha256::new();
        for p in &passages {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
        Ok(Corpus {
            name: spec.to_string(),
            passages,
            digest: h.finalize().into(),
        })
    }
}

impl Corpus {
    /// Names of things the corpus defines (a capitalised lemma of at most three words before
    /// "`: `"): WordNet's people, places, companies, works. The compiler puts them in an edit's
    /// template in place of its subject to find the keys an edit must leave alone.
    pub fn entities(&self) -> Vec<String> {
        self.passages
            .iter()
            .filter_map(|p| p.split_once(": ").map(|(l, _)| l))
            .filter(|l| {
                l.chars().next().is_some_and(|ch| ch.is_ascii_uppercase())
                    && l.split(' ').count() <= 3
                    && l.chars()
                        .all(|ch| ch.is_ascii_alphabetic() || ch == ' ' || ch == '-')
            })
            .map(str::to_string)
            .collect()
    }
}

/// Reads a regular file (a FIFO or device would block or never end).
fn read_regular(p: &Path) -> Result<Vec<u8>> {
    let io = |source| CompileError::Io {
        path: p.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(p).map_err(io)?;
    if !meta.is_file() {
        return Err(CompileError::Corpus(format!(
            "{}: not a regular file",
            p.display()
        )));
    }
    std::fs::read(p).map_err(io)
}

/// WordNet 3.0 data files (`data.noun`, `data.verb`, `data.adj`, `data.adv`) as passages
/// "`lemma`: gloss", in a fixed pseudo-random order.
fn wordnet_passages(dir: &Path) -> Result<Vec<String>> {
    let mut all = Vec::new();
    for pos in ["noun", "verb", "adj", "adv"] {
        let p = dir.join(format!("data.{pos}"));
        if !p.exists() {
            return Err(CompileError::Corpus(format!(
                "{} is missing: run scripts/fetch-corpus.sh (WordNet 3.0 from Debian's \
                 wordnet-base), or set rome.corpus / memit.corpus to \"neutral\" or a text file",
                p.display()
            )));
        }
        // WordNet's files are Latin-1; the glosses are ASCII but for a few names.
        let bytes = read_regular(&p)?;
        let text: String = bytes.iter().map(|&b| b as char).collect();
        for line in text.lines() {
            // The licence header lines start with two spaces.
            if line.starts_with("  ") {
                continue;
            }
            let Some((fields, gloss)) = line.split_once(" | ") else {
                continue;
            };
            // offset lex_filenum ss_type w_cnt word ...
            let Some(word) = fields.split(' ').nth(4) else {
                continue;
            };
            let word = word.split('(').next().unwrap_or(word).replace('_', " ");
            let gloss = gloss.trim();
            if !gloss.is_empty() {
                all.push(format!("{word}: {gloss}"));
            }
        }
    }
    if all.is_empty() {
        return Err(CompileError::Corpus(format!(
            "{}: no WordNet synsets found",
            dir.display()
        )));
    }
    // Deterministic shuffle (xorshift; Fisher-Yates), so a prefix spans all topics.
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..all.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        all.swap(i, (s % (i as u64 + 1)) as usize);
    }
    Ok(all)
}

/// The mean second moment `E[k kᵀ]` (`[n, n]`, row-major) of one layer's down-projection inputs.
pub struct SecondMoment {
    pub layer: usize,
    pub n: usize,
    /// Token rows the mean is over.
    pub rows: usize,
    pub mean: Vec<f64>,
    /// sha256 of the encoded moment: names it in the eigendecomposition cache.
    pub id: [u8; 32],
}

const MAGIC: &[u8; 8] = b"amendm2\x01";

impl SecondMoment {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.mean.len() * 4 + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.layer as u64).to_le_bytes());
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        out.extend_from_slice(&(self.rows as u64).to_le_bytes());
        for &x in &self.mean {
            out.extend_from_slice(&(x as f32).to_le_bytes());
        }
        let d: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&d);
        out
    }

    /// `None` for anything but an intact file of the expected shape.
    fn decode(bytes: &[u8], layer: usize, n: usize) -> Option<SecondMoment> {
        let body_len = 32 + n * n * 4;
        if bytes.len() != body_len + 32 || &bytes[..8] != MAGIC {
            return None;
        }
        let (body, digest) = bytes.split_at(body_len);
        if Sha256::digest(body).as_slice() != digest {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap()) as usize;
        if u(8) != layer || u(16) != n {
            return None;
        }
        let mean: Vec<f64> = body[32..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect();
        if mean.iter().any(|x| !x.is_finite()) {
            return None;
        }
        Some(SecondMoment {
            layer,
            n,
            rows: u(24),
            mean,
            id: digest.try_into().ok()?,
        })
    }
}

/// The second moments of `layers`' down-projection inputs over the first `max_tokens` tokens of
/// `spec` on the unedited model, from the cache when an intact entry is there.
pub fn second_moments(
    c: &Compiler,
    spec: &str,
    max_tokens: usize,
    layers: &[usize],
) -> Result<Vec<SecondMoment>> {
    second_moments_of(c, &Corpus::open(spec)?, max_tokens, layers)
}

/// [`second_moments`] of an opened corpus (a compile that also takes its entities opens it once).
pub fn second_moments_of(
    c: &Compiler,
    corpus: &Corpus,
    max_tokens: usize,
    layers: &[usize],
) -> Result<Vec<SecondMoment>> {
    let n = c.fwd.cfg.n_ff;
    let hex = |b: &[u8]| {
        b.iter()
            .take(8)
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    let dir = cache_dir().map(|d| d.join("stats"));
    let file = |l: usize| {
        dir.as_ref().map(|d| {
            d.join(format!(
                "{}-{}-{}-L{l}.mom2",
                hex(&c.binding.fingerprint),
                hex(&corpus.digest),
                max_tokens
            ))
        })
    };
    let mut found: Vec<Option<SecondMoment>> = layers
        .iter()
        .map(|&l| {
            let p = file(l)?;
            let meta = std::fs::metadata(&p).ok().filter(|m| m.is_file())?;
            if meta.len() as usize != 32 + n * n * 4 + 32 {
                return None;
            }
            SecondMoment::decode(&std::fs::read(&p).ok()?, l, n)
        })
        .collect();
    let missing: Vec<usize> = layers
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(&l, _)| l)
        .collect();
    if !missing.is_empty() {
        let t0 = Instant::now();
        let computed = compute(c, corpus, max_tokens, &missing)?;
        log::info!(
            "covariance corpus `{}`: {} token rows, layers {:?}, {:.1} s",
            corpus.name,
            computed.first().map_or(0, |m| m.rows),
            missing,
            t0.elapsed().as_secs_f64()
        );
        for m in computed {
            if let Some(p) = file(m.layer) {
                // A cache that cannot be written costs time, not correctness.
                cache_write(&p, &m.encode());
            }
            let i = layers
                .iter()
                .position(|&l| l == m.layer)
                .expect("asked for");
            found[i] = Some(m);
        }
    }
    Ok(found
        .into_iter()
        .map(|m| m.expect("every layer computed"))
        .collect())
}

/// One pass over the corpus: every packed sequence through the blocks up to the highest layer,
/// `KᵀK` accumulated per layer.
fn compute(
    c: &Compiler,
    corpus: &Corpus,
    max_tokens: usize,
    layers: &[usize],
) -> Result<Vec<SecondMoment>> {
    let n = c.fwd.cfg.n_ff;
    let top = *layers.iter().max().expect("non-empty");
    let bos = tokenize(c, "")?;
    let newline = super::rome::tokenize_plain(c, "\n")?;
    let points: Vec<(usize, Proj)> = layers.iter().map(|&l| (l, Proj::Down)).collect();
    let mut sums: Vec<Option<Tensor>> = vec![None; layers.len()];
    let mut rows = 0usize;
    // Runs one packed sequence and adds its rows (at most the budget left) to the sums.
    let mut flush = |seq: &[u32], rows: &mut usize| -> Result<()> {
        let take = (seq.len() - bos.len()).min(max_tokens - *rows);
        if take == 0 {
            return Ok(());
        }
        let mut cap = Capture::projection_inputs(&points);
        let mut x = c.fwd.embed(seq, &mut cap)?;
        for l in 0..=top {
            x = c.fwd.run_one(l, x, &mut cap)?;
        }
        for (i, &l) in layers.iter().enumerate() {
            let k = cap
                .input_of
                .remove(&(l, Proj::Down))
                .ok_or_else(|| CompileError::Candle("corpus key not captured".into()))?
                .narrow(0, bos.len(), take)?
                .to_dtype(DType::F32)?;
            let kk = k.t()?.matmul(&k)?;
            sums[i] = Some(match sums[i].take() {
                Some(s) => (s + kk)?,
                None => kk,
            });
        }
        *rows += take;
        Ok(())
    };
    let mut seq: Vec<u32> = bos.clone();
    for p in &corpus.passages {
        if rows >= max_tokens {
            break;
        }
        let toks = super::rome::tokenize_plain(c, p)?;
        if toks.is_empty() {
            continue;
        }
        if seq.len() > bos.len() && seq.len() + newline.len() + toks.len() > SEQ_TOKENS {
            flush(&seq, &mut rows)?;
            seq.truncate(bos.len());
        }
        if seq.len() > bos.len() {
            seq.extend_from_slice(&newline);
        }
        // A passage longer than a sequence is cut.
        let room = SEQ_TOKENS - seq.len();
        seq.extend_from_slice(&toks[..toks.len().min(room)]);
    }
    if seq.len() > bos.len() && rows < max_tokens {
        flush(&seq, &mut rows)?;
    }
    if rows == 0 {
        return Err(CompileError::Corpus(format!(
            "`{}` has no tokens",
            corpus.name
        )));
    }
    layers
        .iter()
        .zip(sums)
        .map(|(&layer, s)| {
            let s = s.expect("rows > 0");
            let mean: Vec<f64> = (s / rows as f64)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect();
            let mut m = SecondMoment {
                layer,
                n,
                rows,
                mean,
                id: [0; 32],
            };
            let enc = m.encode();
            m.id.copy_from_slice(&enc[enc.len() - 32..]);
            Ok(m)
        })
        .collect()
}

const EIG_MAGIC: &[u8; 8] = b"amendeg\x01";

/// The eigendecomposition of `m` (ascending values, vectors as rows), from the cache
/// (`stats/<moment id>.eig`, digest-checked like the moments) or computed (about 30 s for
/// n = 2048) and cached.
fn eigen_cached(m: &SecondMoment) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = m.n;
    let hex: String = m.id.iter().take(16).map(|x| format!("{x:02x}")).collect();
    let path = cache_dir().map(|d| d.join("stats").join(format!("{hex}.eig")));
    let body_len = 16 + n * 8 + n * n * 4;
    // The size is checked before reading, so a planted huge file is never read.
    if let Some(bytes) = path
        .as_ref()
        .filter(|p| {
            std::fs::metadata(p).is_ok_and(|md| md.is_file() && md.len() == (body_len + 32) as u64)
        })
        .and_then(|p| std::fs::read(p).ok())
        .filter(|b| b.len() == body_len + 32)
    {
        let (body, digest) = bytes.split_at(body_len);
        let n_ok = u64::from_le_bytes(body[8..16].try_into().unwrap()) as usize == n;
        if &body[..8] == EIG_MAGIC && n_ok && Sha256::digest(body).as_slice() == digest {
            let values = body[16..16 + n * 8]
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let vectors = body[16 + n * 8..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect();
            return Ok((values, vectors));
        }
    }
    let eig = SymmetricEigen::new(m.mean.clone(), n)?;
    if let Some(p) = path {
        let mut out = Vec::with_capacity(body_len + 32);
        out.extend_from_slice(EIG_MAGIC);
        out.extend_from_slice(&(n as u64).to_le_bytes());
        eig.values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        eig.vectors
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as f32).to_le_bytes()));
        let d: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&d);
        cache_write(&p, &out);
    }
    // The same f32-rounded vectors whether computed or read, so a compile is reproducible.
    let vectors = eig.vectors.iter().map(|&v| v as f32 as f64).collect();
    Ok((eig.values, vectors))
}

/// AlphaEdit's null space of a layer's preserved keys: the orthonormal eigenvectors of `E[k kᵀ]`
/// whose eigenvalues are below `threshold` times the mean eigenvalue, as rows `[dim, n]`.
pub struct NullSpace {
    pub n: usize,
    pub dim: usize,
    basis: Vec<f64>,
}

impl NullSpace {
    pub fn of(m: &SecondMoment, threshold: f64) -> Result<NullSpace> {
        let (values, vectors) = eigen_cached(m)?;
        let mean_eig = values.iter().sum::<f64>() / m.n.max(1) as f64;
        let cut = threshold * mean_eig;
        let dim = values.iter().take_while(|&&v| v < cut).count();
        Ok(NullSpace {
            n: m.n,
            dim,
            basis: vectors[..dim * m.n].to_vec(),
        })
    }

    /// `P (scale · k)` for an f32 key.
    pub fn project_key(&self, k: &[f32], scale: f64) -> Vec<f64> {
        self.project(&k.iter().map(|&x| x as f64 * scale).collect::<Vec<_>>())
    }

    /// `P x`, `P` the orthogonal projector onto the null space.
    pub fn project(&self, x: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.n];
        for u in self.basis.chunks_exact(self.n) {
            let c: f64 = u.iter().zip(x).map(|(a, b)| a * b).sum();
            for (o, a) in out.iter_mut().zip(u) {
                *o += c * a;
            }
        }
        out
    }

    /// AlphaEdit's update directions for a batch at one layer: `m_i = (P A P + λI)⁻¹ P k_i` with
    /// `A = Kₚ Kₚᵀ + K Kᵀ` (the kept edits' keys and the batch's), so that `ΔW = Σ r_i m_iᵀ` lies in
    /// the null space of the corpus keys and meets the batch's targets up to `λ`. Solved through the
    /// small Gram matrix (Woodbury): with `B = P [Kₚ K]`,
    /// `(B Bᵀ + λI)⁻¹ x = (x − B (λI + BᵀB)⁻¹ Bᵀ x) / λ`. The batch's projected keys join `kept`.
    pub fn directions(
        &self,
        kept: &mut Vec<Vec<f64>>,
        keys: &[Vec<f32>],
        ridge: f64,
    ) -> Result<Vec<Vec<f32>>> {
        let projected: Vec<Vec<f64>> = keys.iter().map(|k| self.project_key(k, 1.0)).collect();
        let energy = projected
            .iter()
            .map(|p| p.iter().map(|x| x * x).sum::<f64>())
            .sum::<f64>()
            / projected.len().max(1) as f64;
        if !(energy > 0.0) {
            return Err(CompileError::Hparams(
                "memit null space: the edits' keys have no component in the null space; raise \
                 memit.null_space_threshold"
                    .into(),
            ));
        }
        let lambda = ridge * energy;
        kept.extend(projected.iter().cloned());
        let b = &kept[..];
        let m = b.len();
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
        let mut g = vec![0.0f64; m * m];
        for i in 0..m {
            for j in 0..=i {
                let v = dot(&b[i], &b[j]);
                g[i * m + j] = v;
                g[j * m + i] = v;
            }
            g[i * m + i] += lambda;
        }
        let g = Cholesky::new(g, m).ok_or_else(|| {
            CompileError::Numeric(
                "memit null space: the Gram matrix is not positive definite".into(),
            )
        })?;
        let mut out = Vec::with_capacity(projected.len());
        for p in &projected {
            let bt: Vec<f64> = b.iter().map(|col| dot(col, p)).collect();
            let y = g.solve(&bt);
            let mut d = p.clone();
            for (col, yi) in b.iter().zip(&y) {
                for (di, ci) in d.iter_mut().zip(col) {
                    *di -= yi * ci;
                }
            }
            out.push(d.into_iter().map(|x| (x / lambda) as f32).collect());
        }
        Ok(out)
    }
}
