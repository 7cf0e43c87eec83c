//! A session: one llama.cpp context (KV cache, logits) over a shared model.

use std::os::raw::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use crate::error::RuntimeError;
use crate::hooks::{eval_callback, Hook, HookId, HookState, Phase, RowInfo};
use crate::model::Model;
use crate::Token;

/// Most threads a session may use: ggml's `GGML_MAX_N_THREADS` (more aborts inside ggml).
pub const MAX_THREADS: usize = 512;
/// Largest context a session may ask for (it is also capped at the model's training context).
pub const MAX_N_CTX: u32 = 1 << 20;

/// How to create a session.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Context length in tokens (prompt + generated), 1..=[`MAX_N_CTX`]. Default 2048, capped
    /// at the model's training context.
    pub n_ctx: u32,
    /// Largest batch llama.cpp computes at once, >= 1 (capped at `n_ctx`); longer inputs are
    /// evaluated in chunks.
    pub n_ubatch: u32,
    /// Threads for single-token decode, 1..=[`MAX_THREADS`]; `None` = the model's default
    /// (available parallelism, at most [`MAX_THREADS`]).
    pub n_threads: Option<usize>,
    /// Threads for prompt batches, 1..=[`MAX_THREADS`]; `None` = same as `n_threads`.
    pub n_threads_batch: Option<usize>,
}

/// Checks a thread count given by a caller (`what` names it in the error).
pub(crate) fn check_threads(n: Option<usize>, what: &str) -> Result<(), RuntimeError> {
    match n {
        Some(t) if !(1..=MAX_THREADS).contains(&t) => Err(RuntimeError::InvalidOptions(format!(
            "{what} {t} is outside 1..={MAX_THREADS}"
        ))),
        _ => Ok(()),
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            n_ctx: 2048,
            n_ubatch: 512,
            n_threads: None,
            n_threads_batch: None,
        }
    }
}

/// Which positions of an evaluation produce logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    None,
    /// Only the last token (generation).
    Last,
    /// Every token (teacher forcing: the logits at index i predict token i+1).
    All,
    /// Tokens from this index on (e.g. the prompt's last token and the target tokens).
    From(usize),
}

impl Logits {
    pub(crate) fn wants(self, i: usize, n: usize) -> bool {
        match self {
            Logits::None => false,
            Logits::Last => i + 1 == n,
            Logits::All => true,
            Logits::From(k) => i >= k,
        }
    }
}

/// Options of one [`Session::eval`] call.
#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    pub logits: Logits,
    /// Reported to hooks ([`crate::HookRows::phase`]).
    pub phase: Phase,
    /// Index (into the evaluated tokens) of the last prompt token, reported to hooks as
    /// `is_last_prompt_token`. Default for prefill: the last token.
    pub last_prompt_token: Option<usize>,
}

impl EvalOptions {
    pub fn prefill(logits: Logits) -> Self {
        EvalOptions {
            logits,
            phase: Phase::Prefill,
            last_prompt_token: None,
        }
    }
    pub fn decode() -> Self {
        EvalOptions {
            logits: Logits::Last,
            phase: Phase::Decode,
            last_prompt_token: None,
        }
    }

    /// The last prompt token's index among `n` evaluated tokens: `last_prompt_token`, else the
    /// last token of a prefill, else none.
    pub fn last_prompt(&self, n: usize) -> Option<usize> {
        match (self.last_prompt_token, self.phase) {
            (Some(i), _) => Some(i),
            (None, Phase::Prefill) => n.checked_sub(1),
            (None, Phase::Decode) => None,
        }
    }
}

/// Stops a running generation or evaluation from any thread. Clone freely.
///
/// A request is consumed by the evaluation it stops: `cancel()` while nothing runs stops the
/// next evaluation or generation of the session instead (call [`CancelHandle::reset`] to drop it).
#[derive(Clone, Debug)]
pub struct CancelHandle(pub(crate) Arc<AtomicBool>);

impl CancelHandle {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

unsafe extern "C" fn abort_callback(data: *mut c_void) -> bool {
    // SAFETY: data is the session's Arc<AtomicBool>, alive as long as the context.
    !data.is_null() && unsafe { &*(data as *const AtomicBool) }.load(Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug)]
enum LogitLoc {
    Absent,
    /// Copied out of an earlier chunk: offset into `stored`.
    Stored(usize),
    /// In llama.cpp's buffer from the last chunk: batch index.
    Live(i32),
}

/// One llama.cpp context (KV cache and logits) over a shared [`Model`]: tokenize, evaluate,
/// read logits, generate, with hooks. `Send` (move it to its own thread), not `Sync`.
/// A model can have any number of sessions.
pub struct Session {
    model: Arc<Model>,
    ctx: NonNull<sys::llama_context>,
    hooks: NonNull<HookState>,
    cancel: Arc<AtomicBool>,
    batch: sys::llama_batch,
    n_ctx: u32,
    n_ubatch: usize,
    n_vocab: usize,
    n_past: usize,
    logit_locs: Vec<LogitLoc>,
    stored: Vec<f32>,
    /// The attached edit set and the plan of the pinned snapshot (see `editing`).
    edits: crate::editing::SessionEdits,
    /// The routed memory's answer for the current request (see `answer`).
    answer: Option<crate::answer::AnswerPlan>,
    /// The context's compute threads (none for one thread); dropped after `ctx` is freed.
    pool: Option<crate::threads::ComputePool>,
}

// SAFETY: the context and hook state are owned by the session and used only through &mut self
// (llama_decode runs the hook callback synchronously on the calling thread).
unsafe impl Send for Session {}

impl Session {
    pub fn new(model: &Arc<Model>, options: SessionOptions) -> Result<Session, RuntimeError> {
        let info = model.info();
        if model.options().vocab_only {
            return Err(RuntimeError::InvalidOptions(
                "the model was opened vocabulary-only (ModelOptions::vocab_only); it has no weights for a llama.cpp session".into(),
            ));
        }
        if options.n_ubatch == 0 || options.n_ctx == 0 {
            return Err(RuntimeError::InvalidOptions(
                "n_ctx and n_ubatch must be > 0".into(),
            ));
        }
        if options.n_ctx > MAX_N_CTX {
            return Err(RuntimeError::InvalidOptions(format!(
                "n_ctx {} is above the limit {MAX_N_CTX}",
                options.n_ctx
            )));
        }
        check_threads(options.n_threads, "n_threads")?;
        check_threads(options.n_threads_batch, "n_threads_batch")?;
        let n_ctx = if info.n_ctx_train > 0 {
            options.n_ctx.min(info.n_ctx_train)
        } else {
            options.n_ctx
        };
        let n_ubatch = options.n_ubatch.min(n_ctx);
        let threads = options
            .n_threads
            .or(model.options().n_threads)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .clamp(1, MAX_THREADS) as i32;
        // Checked above: within 1..=MAX_THREADS, so the cast cannot wrap.
        let threads_batch = options.n_threads_batch.map_or(threads, |n| n as i32);
        // Before the context: a thread limit is an error here, never an abort in a decode.
        let pool = crate::threads::ComputePool::new(threads.max(threads_batch) as usize)?;
        let hooks = NonNull::from(Box::leak(Box::new(HookState::new(info.n_embd as usize))));
        let cancel = Arc::new(AtomicBool::new(false));
        // SAFETY: FFI; the user-data pointers outlive the context (freed after it in Drop).
        let ctx = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = n_ctx;
            p.n_batch = n_ubatch;
            p.n_ubatch = n_ubatch;
            p.n_seq_max = 1;
            p.n_threads = threads;
            p.n_threads_batch = threads_batch;
            p.cb_eval = Some(eval_callback);
            p.cb_eval_user_data = hooks.as_ptr() as *mut c_void;
            p.abort_callback = Some(abort_callback);
            p.abort_callback_data = Arc::as_ptr(&cancel) as *mut c_void;
            p.no_perf = true;
            sys::llama_init_from_model(model.as_ptr(), p)
        };
        let Some(ctx) = NonNull::new(ctx) else {
            // SAFETY: from Box::leak above, not shared with llama.cpp.
            drop(unsafe { Box::from_raw(hooks.as_ptr()) });
            return Err(RuntimeError::ContextCreate { n_ctx });
        };
        if let Some(pool) = &pool {
            // SAFETY: both live; the pool outlives the context (freed after it in Drop).
            unsafe { pool.attach(ctx.as_ptr()) };
        }
        // SAFETY: allocates token/pos/seq arrays for n_ubatch tokens, 1 sequence each.
        let batch = unsafe { sys::llama_batch_init(n_ubatch as i32, 0, 1) };
        Ok(Session {
            model: model.clone(),
            ctx,
            hooks,
            cancel,
            batch,
            n_ctx,
            n_ubatch: n_ubatch as usize,
            n_vocab: info.n_vocab as usize,
            n_past: 0,
            logit_locs: Vec::new(),
            stored: Vec::new(),
            edits: Default::default(),
            answer: None,
            pool,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// Number of positions in the KV cache (the next token's position).
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// The raw llama.cpp context, for the runtime's own calls (samplers); not public API.
    pub(crate) fn as_ptr(&self) -> *mut sys::llama_context {
        self.ctx.as_ptr()
    }

    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle(self.cancel.clone())
    }

    pub(crate) fn take_cancel(&self) -> bool {
        self.cancel.swap(false, Ordering::SeqCst)
    }

    /// See [`Model::tokenize`].
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<Token>, RuntimeError> {
        self.model.tokenize(text, add_bos)
    }

    /// See [`Model::detokenize`].
    pub fn detokenize(&self, tokens: &[Token]) -> Result<String, RuntimeError> {
        self.model.detokenize(tokens)
    }

    pub(crate) fn edits_ref(&self) -> &crate::editing::SessionEdits {
        &self.edits
    }

    pub(crate) fn edits_mut(&mut self) -> &mut crate::editing::SessionEdits {
        &mut self.edits
    }

    fn hooks_mut(&mut self) -> &mut HookState {
        // SAFETY: owned by self; llama.cpp only touches it inside llama_decode, which needs
        // &mut self, so no other reference exists while this one does.
        unsafe { self.hooks.as_mut() }
    }

    /// Registers a hook for the following evaluations. Every point is validated first
    /// ([`RuntimeError::LayerOutOfRange`], [`RuntimeError::SiteUnavailable`]).
    pub fn add_hook(&mut self, hook: Box<dyn Hook>) -> Result<HookId, RuntimeError> {
        let points = hook.points();
        for &p in &points {
            self.model.node_name(p)?;
        }
        let model = self.model.clone();
        let state = self.hooks_mut();
        let id = state.add(hook, points);
        state.rebuild(|p| model.node_name(p));
        Ok(id)
    }

    /// Unregisters a hook and gives it back.
    pub fn remove_hook(&mut self, id: HookId) -> Option<Box<dyn Hook>> {
        let model = self.model.clone();
        let state = self.hooks_mut();
        let h = state.remove(id);
        state.rebuild(|p| model.node_name(p));
        h
    }

    pub fn clear_hooks(&mut self) {
        self.hooks_mut().clear();
    }

    pub fn n_hooks(&self) -> usize {
        // SAFETY: see hooks_mut.
        unsafe { self.hooks.as_ref() }.len()
    }

    /// Empties the KV cache (a fresh conversation).
    pub fn kv_clear(&mut self) {
        // SAFETY: live context.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true) };
        self.n_past = 0;
        self.logit_locs.clear();
        if let Some(a) = &mut self.answer {
            a.truncate(0);
        }
    }

    /// The answer the next evaluations force after the prompt (set per request by the edit
    /// layer; `None`: the model's own logits).
    pub(crate) fn set_answer(&mut self, plan: Option<crate::answer::AnswerPlan>) {
        self.answer = plan;
    }

    /// The answer tokens of the current request's routed memory, if any.
    pub fn answer_tokens(&self) -> Option<&[Token]> {
        self.answer.as_ref().map(|a| a.tokens())
    }

    /// Keeps the first `keep` positions of the KV cache and drops the rest (e.g. to reuse a
    /// shared prompt prefix). Fails when the cache cannot drop a range (then nothing changed
    /// or the cache was cleared; `n_past()` tells which).
    pub fn kv_truncate(&mut self, keep: usize) -> Result<(), RuntimeError> {
        if keep >= self.n_past {
            return Ok(());
        }
        // SAFETY: live context.
        let ok = unsafe {
            sys::llama_memory_seq_rm(sys::llama_get_memory(self.ctx.as_ptr()), 0, keep as i32, -1)
        };
        self.logit_locs.clear();
        if !ok {
            self.resync_n_past();
            return Err(RuntimeError::KvTruncate {
                keep,
                reason: "the KV cache refused to remove a partial range".into(),
            });
        }
        self.n_past = keep;
        if let Some(a) = &mut self.answer {
            a.truncate(keep);
        }
        Ok(())
    }

    fn resync_n_past(&mut self) {
        // SAFETY: live context.
        let max =
            unsafe { sys::llama_memory_seq_pos_max(sys::llama_get_memory(self.ctx.as_ptr()), 0) };
        self.n_past = if max < 0 { 0 } else { max as usize + 1 };
    }

    /// Evaluates `tokens` at the next positions (after `n_past()`), in chunks of at most
    /// `n_ubatch`, running the hooks. Logits of the requested positions are then available
    /// through [`Session::logits`] (index = position within `tokens`).
    pub fn eval(&mut self, tokens: &[Token], options: EvalOptions) -> Result<(), RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        for &t in tokens {
            self.model.check_token(t)?;
        }
        let n = tokens.len();
        if self.n_past + n > self.n_ctx as usize {
            return Err(RuntimeError::ContextFull {
                needed: self.n_past + n,
                n_ctx: self.n_ctx,
            });
        }
        let last_prompt = options.last_prompt(n);
        self.logit_locs.clear();
        self.logit_locs.resize(n, LogitLoc::Absent);
        self.stored.clear();
        let n_chunks = n.div_ceil(self.n_ubatch);
        for (c, chunk) in tokens.chunks(self.n_ubatch).enumerate() {
            let base = c * self.n_ubatch;
            let hooks_on = {
                let pos0 = self.n_past;
                let state = self.hooks_mut();
                if state.is_empty() {
                    false
                } else {
                    state.meta.clear();
                    state.outputs.clear();
                    state.phase = options.phase;
                    state.error = None;
                    for (j, &tok) in chunk.iter().enumerate() {
                        let i = base + j;
                        let is_output = options.logits.wants(i, n);
                        if is_output {
                            state.outputs.push(j);
                        }
                        state.meta.push(RowInfo {
                            token: tok,
                            pos: (pos0 + j) as i32,
                            seq_id: 0,
                            is_last_prompt_token: last_prompt == Some(i),
                            is_output,
                        });
                    }
                    true
                }
            };
            // SAFETY: the batch was allocated for n_ubatch tokens and one sequence id each.
            unsafe {
                let b = &mut self.batch;
                b.n_tokens = chunk.len() as i32;
                for (j, &tok) in chunk.iter().enumerate() {
                    *b.token.add(j) = tok;
                    *b.pos.add(j) = (self.n_past + j) as i32;
                    *b.n_seq_id.add(j) = 1;
                    **b.seq_id.add(j) = 0;
                    *b.logits.add(j) = options.logits.wants(base + j, n) as i8;
                }
            }
            if let Some(pool) = &self.pool {
                // SAFETY: the live context the pool is attached to.
                unsafe { pool.check_fork(self.ctx.as_ptr()) };
            }
            // SAFETY: live context and a well-formed batch; hooks run inside on this thread.
            let rc = unsafe { crate::generate::decode_raw(self.ctx.as_ptr(), &self.batch, false) };
            let hook_error = if hooks_on {
                self.hooks_mut().error.take()
            } else {
                None
            };
            let rc = match rc {
                Ok(rc) => rc,
                Err(e) => {
                    // llama.cpp threw: what it kept of this chunk is unknown, so re-read it.
                    self.logit_locs.clear();
                    self.resync_n_past();
                    return Err(e);
                }
            };
            if rc != 0 {
                self.logit_locs.clear();
                self.resync_n_past();
                if rc == 2 && self.take_cancel() {
                    return Err(RuntimeError::Aborted);
                }
                return Err(RuntimeError::Decode { code: rc });
            }
            let pos0 = self.n_past;
            self.n_past += chunk.len();
            if let Some(e) = hook_error {
                self.logit_locs.clear();
                return Err(e);
            }
            if let Some(mut plan) = self.answer.take() {
                let mut res = Ok(());
                for (j, &tok) in chunk.iter().enumerate() {
                    plan.observe(pos0 + j, tok, last_prompt == Some(base + j));
                    if !options.logits.wants(base + j, n) {
                        continue;
                    }
                    if let Some(t) = plan.forced(pos0 + j) {
                        // SAFETY: batch index j has logits (requested above); the buffer holds
                        // n_vocab floats that nothing else references during this call.
                        let p = unsafe { sys::llama_get_logits_ith(self.ctx.as_ptr(), j as i32) };
                        if p.is_null() {
                            res = Err(RuntimeError::NoLogits { index: base + j });
                            break;
                        }
                        crate::answer::force(
                            unsafe { std::slice::from_raw_parts_mut(p, self.n_vocab) },
                            t,
                        );
                    }
                }
                self.answer = Some(plan);
                if let Err(e) = res {
                    self.logit_locs.clear();
                    return Err(e);
                }
            }
            let last_chunk = c + 1 == n_chunks;
            for j in 0..chunk.len() {
                if !options.logits.wants(base + j, n) {
                    continue;
                }
                self.logit_locs[base + j] = if last_chunk {
                    LogitLoc::Live(j as i32)
                } else {
                    // The next chunk overwrites llama.cpp's logits buffer: copy these out.
                    let src = self.live_logits(j as i32)?;
                    let off = self.stored.len();
                    let src = src.to_vec();
                    self.stored.extend_from_slice(&src);
                    LogitLoc::Stored(off)
                };
            }
        }
        Ok(())
    }

    /// Prefill convenience: `eval(tokens, EvalOptions::prefill(logits))`.
    pub fn prefill(&mut self, tokens: &[Token], logits: Logits) -> Result<(), RuntimeError> {
        self.eval(tokens, EvalOptions::prefill(logits))
    }

    /// One generated token, logits for it: `eval(&[token], EvalOptions::decode())`.
    pub fn decode(&mut self, token: Token) -> Result<(), RuntimeError> {
        self.eval(&[token], EvalOptions::decode())
    }

    fn live_logits(&self, batch_index: i32) -> Result<&[f32], RuntimeError> {
        // SAFETY: llama.cpp returns null for an index without logits; otherwise n_vocab floats
        // that stay valid until the next decode (which needs &mut self).
        let p = unsafe { sys::llama_get_logits_ith(self.ctx.as_ptr(), batch_index) };
        if p.is_null() {
            return Err(RuntimeError::NoLogits {
                index: batch_index as usize,
            });
        }
        Ok(unsafe { std::slice::from_raw_parts(p, self.n_vocab) })
    }

    /// Logits (n_vocab) at index `i` of the tokens of the last [`Session::eval`].
    pub fn logits(&self, i: usize) -> Result<&[f32], RuntimeError> {
        match self.logit_locs.get(i) {
            Some(LogitLoc::Stored(off)) => Ok(&self.stored[*off..*off + self.n_vocab]),
            Some(LogitLoc::Live(j)) => self.live_logits(*j),
            _ => Err(RuntimeError::NoLogits { index: i }),
        }
    }

    /// Logits of the last token of the last evaluation.
    pub fn last_logits(&self) -> Result<&[f32], RuntimeError> {
        match self.logit_locs.len() {
            0 => Err(RuntimeError::NoLogits { index: 0 }),
            n => self.logits(n - 1),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: frees in reverse order of creation; the hook state outlives the context.
        unsafe {
            sys::llama_batch_free(self.batch);
            sys::llama_free(self.ctx.as_ptr());
            // The plan's LoRA adapters belong to the model: free them while it is alive (the
            // `model` field may hold its last reference and drops before `edits`).
            self.edits.release();
            drop(Box::from_raw(self.hooks.as_ptr()));
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("n_ctx", &self.n_ctx)
            .field("n_past", &self.n_past)
            .field("n_hooks", &self.n_hooks())
            .finish()
    }
}

impl crate::backend::Backend for Session {
    fn backend_name(&self) -> String {
        "llama.cpp".into()
    }
    fn backend_id(&self) -> String {
        crate::editing::LLAMA_CPP_BACKEND_ID.into()
    }
    fn vocab(&self) -> &Arc<Model> {
        self.model()
    }
    fn n_ctx(&self) -> usize {
        Session::n_ctx(self) as usize
    }
    fn n_past(&self) -> usize {
        Session::n_past(self)
    }
    fn kv_clear(&mut self) -> Result<(), RuntimeError> {
        Session::kv_clear(self);
        Ok(())
    }
    fn kv_truncate(&mut self, keep: usize) -> Result<(), RuntimeError> {
        Session::kv_truncate(self, keep)
    }
    fn eval(&mut self, tokens: &[Token], options: EvalOptions) -> Result<(), RuntimeError> {
        Session::eval(self, tokens, options)
    }
    fn logits(&self, i: usize) -> Result<&[f32], RuntimeError> {
        Session::logits(self, i)
    }
    fn last_logits(&self) -> Result<&[f32], RuntimeError> {
        Session::last_logits(self)
    }
    fn sample(&mut self, sampler: &crate::generate::Sampler) -> Result<Token, RuntimeError> {
        // SAFETY: the last evaluation produced logits for its last token (batch index -1);
        // generation asks only after an evaluation.
        unsafe { sampler.sample(self.as_ptr(), -1) }
    }
    fn take_cancel(&mut self) -> bool {
        Session::take_cancel(self)
    }
    fn supports(&self, _: crate::backend::Capability) -> bool {
        true
    }
    fn set_edit_set(&mut self, set: Option<Arc<amend_edits::EditSet>>) -> Result<(), RuntimeError> {
        Session::set_edit_set(self, set)
    }
    fn set_scope_model(
        &mut self,
        scope: Option<Arc<crate::ScopeModel>>,
    ) -> Result<(), RuntimeError> {
        Session::set_scope_model(self, scope)
    }
    fn set_lora_scale(&mut self, bundle_id: &str, scale: f32) -> Result<(), RuntimeError> {
        Session::set_lora_scale(self, bundle_id, scale)
    }
    fn begin_request(&mut self, prompt: &str) -> Result<crate::Request, RuntimeError> {
        Session::begin_request(self, prompt)
    }
    fn scope_model(&self) -> Option<&Arc<crate::ScopeModel>> {
        Session::scope_model(self)
    }
    fn explain(&self) -> crate::Explain {
        Session::explain(self)
    }
    fn generate_text(
        &mut self,
        prompt: &str,
        params: &crate::GenerateParams,
        on_token: &mut dyn FnMut(&crate::TokenEvent<'_>) -> std::ops::ControlFlow<()>,
    ) -> Result<crate::GenerateOutput, RuntimeError> {
        Session::generate(self, prompt, params, on_token)
    }
}
