//! The scope model: a small sentence encoder (all-MiniLM-L6-v2 as a llama.cpp `bert` GGUF, see
//! `amend scope-model convert`) that decides which memory, if any, a request routes to. It is
//! separate from the base model because the base model's own hidden states cannot tell "The
//! capital of Italy is" from "The capital of France is" (docs/methods.md).
//!
//! Opened once per process and shared by sessions (`Arc<ScopeModel>`): the llama.cpp context
//! sits behind a mutex, an encode takes a few milliseconds. One encode gives both the mean-pooled
//! unit vector (sentence-transformers' pooling: every token, `[CLS]` and `[SEP]` included) and the
//! per-token unit rows of the content tokens (for the subject and relation terms of routing).

use std::cell::OnceCell;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use amend_edits::families::l2_normalize;
use llama_cpp_sys_2 as sys;

use crate::error::RuntimeError;
use crate::Token;

/// Tokens one encode sees, `[CLS]` and `[SEP]` included: sentence-transformers' `max_seq_length`
/// for all-MiniLM-L6-v2. Longer prompts keep their first `MAX_TOKENS - 2` content tokens.
pub const MAX_TOKENS: usize = 256;

/// Encoder threads when the caller names none. One: a prompt of a few dozen tokens gains little
/// from a second thread on a quiet machine (5.2 against 3.0 ms), while ggml's workers spin at a
/// barrier after every node, so with the cores shared by other work two threads took 784 ms an
/// encode against 7 ms for one (`cargo bench -p amend-runtime --bench busy_cores`, 2 cores).
pub const DEFAULT_SCOPE_THREADS: usize = 1;

/// One encoded text.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeEncoding {
    /// Mean of every token's output row (`[CLS]` and `[SEP]` included), L2-normalized.
    pub pooled: Vec<f32>,
    /// The content tokens' rows (no `[CLS]`/`[SEP]`), each L2-normalized, `[tokens.len(), n_embd]`.
    pub rows: Vec<f32>,
    /// The content token ids, after truncation.
    pub tokens: Vec<Token>,
    /// The text had more than `MAX_TOKENS - 2` content tokens; the rest was not read.
    pub truncated: bool,
}

/// A prompt to route, encoded once: its own encode, and the encode of its form without
/// descriptions in passing, made on first need and kept for every further memory routed.
#[derive(Debug)]
pub struct RouteQuery<'a> {
    prompt: &'a str,
    encoding: ScopeEncoding,
    core: OnceCell<Option<(String, ScopeEncoding)>>,
}

struct Ctx {
    ctx: NonNull<sys::llama_context>,
    batch: sys::llama_batch,
    /// The context's compute threads (none for one thread); dropped after `ctx` is freed.
    pool: Option<crate::threads::ComputePool>,
}

/// A loaded scope model (see the module docs). `Send + Sync`.
pub struct ScopeModel {
    model: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    ctx: Mutex<Ctx>,
    n_embd: usize,
    max_tokens: usize,
    cls: Token,
    sep: Token,
    fingerprint: [u8; 32],
    path: PathBuf,
    n_threads: usize,
    /// The sealed copy llama.cpp runs from (kept open for the model's life).
    _copy: Option<crate::model::PrivateCopy>,
}

// SAFETY: the model is read-only after loading; the context and batch are only used under the
// mutex.
unsafe impl Send for ScopeModel {}
unsafe impl Sync for ScopeModel {}

fn invalid(path: &Path, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::ScopeModelInvalid {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// The scope model's pre-load checks of the file at `path` (errors name `shown`): the header and
/// hyperparameters the base model gets, a `bert` encoder with a WordPiece vocabulary, and what
/// llama.cpp's bert graph would abort on.
fn check_scope_file(
    path: &Path,
    shown: &Path,
) -> Result<
    (
        amend_edits::gguf::GgufHeader,
        amend_edits::gguf::ModelHparams,
    ),
    RuntimeError,
> {
    let header = amend_edits::gguf::GgufFile::read_header(path)
        .map_err(|e| invalid(shown, e.to_string()))?;
    let hp = amend_edits::gguf::ModelHparams::from_header(&header)
        .map_err(|e| invalid(shown, e.to_string()))?;
    if header.architecture() != Some("bert") {
        return Err(invalid(
            shown,
            format!(
                "architecture {:?}, expected \"bert\" (convert one with `amend scope-model convert`)",
                header.architecture().unwrap_or("none")
            ),
        ));
    }
    if header.get_str("tokenizer.ggml.model") != Some("bert") {
        return Err(invalid(shown, "no WordPiece (\"bert\") vocabulary"));
    }
    for t in ["token_embd.weight", "position_embd.weight"] {
        if header.tensor(t).is_none() {
            return Err(invalid(shown, format!("no tensor {t}")));
        }
    }
    // llama.cpp's bert graph adds the first row of the token-type table to f32 activations:
    // any other type aborts in ggml's binary ops.
    if let Some(t) = header.tensor("token_types.weight") {
        if t.ggml_type != amend_edits::gguf::GgmlType::F32 {
            return Err(invalid(
                shown,
                format!("token_types.weight must be F32, got {}", t.ggml_type),
            ));
        }
    }
    Ok((header, hp))
}

impl ScopeModel {
    /// Validates and loads a scope-model GGUF with `n_threads` encoder threads (`None`:
    /// [`DEFAULT_SCOPE_THREADS`]). Errors: `NotFound`, `ScopeModelInvalid` (not a
    /// GGUF, truncated, not a `bert` encoder with a WordPiece vocabulary), `LoadFailed`,
    /// `InvalidOptions` (threads outside 1..=[`crate::MAX_THREADS`]), `Threads`.
    pub fn open(
        path: impl AsRef<Path>,
        n_threads: Option<usize>,
    ) -> Result<Arc<ScopeModel>, RuntimeError> {
        let path = path.as_ref();
        crate::session::check_threads(n_threads, "n_threads")?;
        // Refuse a FIFO, directory or device before anything reads the path, then the same
        // header and hyperparameter checks the base model gets (llama.cpp can abort otherwise).
        if let Err(e) = amend_edits::fsutil::open_regular(path, amend_edits::fsutil::MAX_MODEL_LEN)
        {
            return Err(match e.io_kind() {
                Some(std::io::ErrorKind::NotFound) => RuntimeError::NotFound {
                    path: path.to_path_buf(),
                },
                _ => invalid(path, e.to_string()),
            });
        }
        // The file as given first (nothing is copied of a file that is not a scope model), then
        // the private sealed copy llama.cpp will read (see `ModelOptions::private_copy`).
        check_scope_file(path, path)?;
        let copy = crate::model::PrivateCopy::of(path, None)?;
        let (load_path, fingerprint) = match &copy {
            Some(c) => {
                let (header, hp) = check_scope_file(&c.path(), path)?;
                let layout = amend_edits::fingerprint::ModelLayout::from(&header);
                let b = amend_edits::fingerprint::model_binding_of_copy(
                    path,
                    c.key(),
                    c.file(),
                    &layout,
                    &hp,
                )
                .map_err(|e| invalid(path, e.to_string()))?;
                (c.path(), b.fingerprint)
            }
            None => {
                let b = amend_edits::fingerprint::model_binding(path)
                    .map_err(|e| invalid(path, e.to_string()))?;
                (path.to_path_buf(), b.fingerprint)
            }
        };
        crate::init_backend();
        let cpath = CString::new(load_path.as_os_str().as_encoded_bytes())
            .map_err(|_| invalid(path, "path contains a NUL byte"))?;
        // SAFETY: plain FFI; the params struct is a value, the path a valid C string.
        let model = unsafe {
            let mut p = sys::llama_model_default_params();
            p.n_gpu_layers = 0;
            sys::llama_model_load_from_file(cpath.as_ptr(), p)
        };
        let model = NonNull::new(model).ok_or_else(|| RuntimeError::LoadFailed {
            path: path.to_path_buf(),
        })?;
        // From here on `guard` frees the model on every early return.
        struct Guard(Option<NonNull<sys::llama_model>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                if let Some(m) = self.0 {
                    unsafe { sys::llama_model_free(m.as_ptr()) }
                }
            }
        }
        let mut guard = Guard(Some(model));
        // SAFETY: live model.
        let (n_embd, n_ctx_train, vocab) = unsafe {
            (
                sys::llama_model_n_embd(model.as_ptr()),
                sys::llama_model_n_ctx_train(model.as_ptr()),
                sys::llama_model_get_vocab(model.as_ptr()),
            )
        };
        let vocab = NonNull::new(vocab as *mut sys::llama_vocab)
            .ok_or_else(|| invalid(path, "no vocabulary"))?;
        let (cls, sep) = unsafe {
            (
                sys::llama_vocab_bos(vocab.as_ptr()),
                sys::llama_vocab_sep(vocab.as_ptr()),
            )
        };
        if n_embd <= 0 || n_ctx_train < 3 || cls < 0 || sep < 0 {
            return Err(invalid(path, "missing dimensions or [CLS]/[SEP] ids"));
        }
        let max_tokens = MAX_TOKENS.min(n_ctx_train as usize);
        // Checked at the top: within 1..=MAX_THREADS.
        let threads = n_threads.unwrap_or(DEFAULT_SCOPE_THREADS) as i32;
        let pool = crate::threads::ComputePool::new(threads as usize)?;
        // SAFETY: FFI with a live model.
        let ctx = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = max_tokens as u32;
            p.n_batch = max_tokens as u32;
            // A non-causal encoder sees the whole prompt in one ubatch.
            p.n_ubatch = max_tokens as u32;
            p.n_seq_max = 1;
            p.n_threads = threads;
            p.n_threads_batch = threads;
            p.embeddings = true;
            p.pooling_type = sys::LLAMA_POOLING_TYPE_NONE;
            p.no_perf = true;
            sys::llama_init_from_model(model.as_ptr(), p)
        };
        let ctx = NonNull::new(ctx).ok_or(RuntimeError::ContextCreate {
            n_ctx: max_tokens as u32,
        })?;
        if let Some(pool) = &pool {
            // SAFETY: both live; the pool outlives the context (dropped after it).
            unsafe { pool.attach(ctx.as_ptr()) };
        }
        // SAFETY: token/pos/seq arrays for max_tokens tokens, 1 sequence each.
        let batch = unsafe { sys::llama_batch_init(max_tokens as i32, 0, 1) };
        guard.0 = None;
        Ok(Arc::new(ScopeModel {
            model,
            vocab,
            ctx: Mutex::new(Ctx { ctx, batch, pool }),
            n_embd: n_embd as usize,
            max_tokens,
            cls,
            sep,
            fingerprint,
            path: path.to_path_buf(),
            n_threads: threads as usize,
            _copy: copy,
        }))
    }

    /// The fingerprint bundles pin the scope model by ([`amend_edits::fingerprint`]).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Encoder threads (llama.cpp's `n_threads`).
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The content tokens of `text` (WordPiece, no `[CLS]`/`[SEP]`), not truncated.
    pub fn tokenize(&self, text: &str) -> Result<Vec<Token>, RuntimeError> {
        let mut out: Vec<Token> = vec![0; text.len() + 2];
        for _ in 0..2 {
            // SAFETY: a live vocabulary; the slices give pointers and lengths.
            let n = unsafe {
                crate::generate::tokenize_raw(
                    self.vocab.as_ptr(),
                    text.as_bytes(),
                    &mut out,
                    false,
                )?
            };
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            if n == i32::MIN {
                return Err(RuntimeError::Tokenize("token count overflows".into()));
            }
            out.resize((-n) as usize, 0);
        }
        Err(RuntimeError::Tokenize("tokenizer size mismatch".into()))
    }

    /// Encodes `text` (see [`ScopeEncoding`]). Longer texts are cut to their first
    /// `MAX_TOKENS - 2` content tokens, as sentence-transformers does.
    pub fn encode(&self, text: &str) -> Result<ScopeEncoding, RuntimeError> {
        self.encode_tokens(self.tokenize(text)?)
    }

    /// The pooled embedding of `query` with `subject` replaced by "it"
    /// ([`amend_edits::families::strip_subject`]): what relation groups classify. `None` when
    /// the subject does not occur in the query or the encode fails (routing then falls back to
    /// the head or the thresholds for that record).
    pub fn stripped_pooled(&self, query: &str, subject: &str) -> Option<Vec<f32>> {
        let text = amend_edits::families::strip_subject(query, subject)?;
        self.encode(&text).ok().map(|e| e.pooled)
    }

    /// `prompt` encoded for routing ([`ScopeModel::route`]).
    pub fn query<'a>(&self, prompt: &'a str) -> Result<RouteQuery<'a>, RuntimeError> {
        Ok(RouteQuery {
            prompt,
            encoding: self.encode(prompt)?,
            core: OnceCell::new(),
        })
    }

    /// Routes a query ([`ScopeModel::query`]) through a scope-model memory, relation groups
    /// included (their stripped queries encoded here): what the runtime and
    /// `amend scope-model route` both do.
    ///
    /// A prompt that routes nowhere and describes something in passing ("Rome, the Italian
    /// capital, was built on") is routed once more without the description
    /// ([`amend_edits::families::without_appositives`]; one more encode, for those prompts only,
    /// made once per query whatever the number of memories), and that route is taken when it
    /// is in scope.
    pub fn route(
        &self,
        mem: &amend_edits::families::Memory<'_>,
        q: &RouteQuery<'_>,
    ) -> Option<amend_edits::families::RouteHit> {
        let hit = self.route_one(mem, q.prompt, &q.encoding);
        if hit.as_ref().is_some_and(|h| h.in_scope) {
            return hit;
        }
        let core = q.core.get_or_init(|| {
            let text = amend_edits::families::without_appositives(q.prompt)?;
            let encoding = self.encode(&text).ok()?;
            Some((text, encoding))
        });
        let Some((text, encoding)) = core else {
            return hit;
        };
        match self.route_one(mem, text, encoding) {
            Some(h) if h.in_scope => Some(h),
            _ => hit,
        }
    }

    fn route_one(
        &self,
        mem: &amend_edits::families::Memory<'_>,
        prompt: &str,
        q: &ScopeEncoding,
    ) -> Option<amend_edits::families::RouteHit> {
        mem.route_with(&q.pooled, &q.rows, None, &mut |i| {
            self.stripped_pooled(prompt, mem.routing()?.subject(i)?)
        })
    }

    /// Encodes content tokens (from [`ScopeModel::tokenize`], no `[CLS]`/`[SEP]`): routing encodes
    /// a prompt with its subject's tokens taken out this way, so the relation is compared
    /// without the subject's words. Ids outside the vocabulary are an error.
    pub fn encode_tokens(&self, mut tokens: Vec<Token>) -> Result<ScopeEncoding, RuntimeError> {
        // SAFETY: the vocab lives as long as the model.
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(self.vocab.as_ptr()) };
        if let Some(t) = tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
            return Err(RuntimeError::Tokenize(format!(
                "scope model: token id {t} outside the vocabulary"
            )));
        }
        let keep = self.max_tokens - 2;
        let truncated = tokens.len() > keep;
        tokens.truncate(keep);
        let mut all = Vec::with_capacity(tokens.len() + 2);
        all.push(self.cls);
        all.extend_from_slice(&tokens);
        all.push(self.sep);
        let d = self.n_embd;
        let mut raw = vec![0f32; all.len() * d];
        {
            let mut c = self.ctx.lock().unwrap_or_else(|e| e.into_inner());
            let c = &mut *c;
            // SAFETY: the batch has room for max_tokens >= all.len() tokens with one sequence id
            // each; the context is live and used only under this lock.
            unsafe {
                let b = &mut c.batch;
                b.n_tokens = all.len() as i32;
                for (i, &t) in all.iter().enumerate() {
                    *b.token.add(i) = t;
                    *b.pos.add(i) = i as i32;
                    *b.n_seq_id.add(i) = 1;
                    *(*b.seq_id.add(i)).add(0) = 0;
                    *b.logits.add(i) = 1;
                }
                if let Some(pool) = &c.pool {
                    pool.check_fork(c.ctx.as_ptr());
                }
                let rc = crate::generate::decode_raw(c.ctx.as_ptr(), b, true)?;
                if rc != 0 {
                    return Err(RuntimeError::Decode { code: rc });
                }
                for i in 0..all.len() {
                    let p = sys::llama_get_embeddings_ith(c.ctx.as_ptr(), i as i32);
                    if p.is_null() {
                        return Err(RuntimeError::NoLogits { index: i });
                    }
                    raw[i * d..(i + 1) * d].copy_from_slice(std::slice::from_raw_parts(p, d));
                }
            }
        }
        let mut pooled = vec![0f32; d];
        for row in raw.chunks_exact(d) {
            for (p, x) in pooled.iter_mut().zip(row) {
                *p += x;
            }
        }
        let n = all.len() as f32;
        pooled.iter_mut().for_each(|p| *p /= n);
        if !l2_normalize(&mut pooled) {
            return Err(RuntimeError::InvalidEdit(
                "scope model: the pooled embedding has no direction".into(),
            ));
        }
        let mut rows = raw[d..raw.len() - d].to_vec();
        for r in rows.chunks_exact_mut(d) {
            l2_normalize(r);
        }
        Ok(ScopeEncoding {
            pooled,
            rows,
            tokens,
            truncated,
        })
    }
}

impl Drop for ScopeModel {
    fn drop(&mut self) {
        let c = self.ctx.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: created in `open`, owned by self, no one else holds them.
        unsafe {
            sys::llama_batch_free(c.batch);
            sys::llama_free(c.ctx.as_ptr());
            sys::llama_model_free(self.model.as_ptr());
        }
    }
}

impl std::fmt::Debug for ScopeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopeModel")
            .field("path", &self.path)
            .field("n_embd", &self.n_embd)
            .finish()
    }
}

/// File name of the default scope model in amend's cache directory
/// (scripts/fetch-scope-model.sh).
pub const DEFAULT_FILE: &str = "all-minilm-l6-v2-q8_0.gguf";

/// The default scope-model path: `$AMEND_SCOPE_MODEL`, else [`DEFAULT_FILE`] in
/// `$AMEND_CACHE` or `~/.cache/amend`, where the fetch script puts it (`None` without either).
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AMEND_SCOPE_MODEL") {
        return Some(PathBuf::from(p));
    }
    Some(amend_edits::fsutil::cache_dir()?.join(DEFAULT_FILE))
}
