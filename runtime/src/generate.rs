//! Text generation: sampling, stop strings, streaming, cancellation.

use std::ops::ControlFlow;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use llama_cpp_sys_2 as sys;

use crate::backend::Backend;
use crate::detok::Detokenizer;
use crate::error::RuntimeError;
use crate::session::{EvalOptions, Logits, Session};
use crate::Token;

/// Smallest positive temperature: at 1e-6 the draw is already greedy for any logit gap above
/// 1e-4, and far smaller values overflow the scaled logits.
pub const MIN_TEMPERATURE: f32 = 1e-6;

/// Sampling and stopping parameters. `temperature <= 0` means greedy (argmax).
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub temperature: f32,
    /// 0 = off.
    pub top_k: i32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off.
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at: 0..=the session's `n_ctx` (it
    /// cannot look further back than the context holds). Read, and checked, only when
    /// `repeat_penalty` is not 1, so the default (64) fits any context while the penalty is off.
    pub repeat_last_n: i32,
    /// Any value but `u32::MAX` (llama.cpp's "pick a random seed", which would break the
    /// same-seed-same-tokens promise).
    pub seed: u32,
    /// Generation stops before any of these strings; the text never contains them (not even
    /// partially: text that might start a stop string is held back until it cannot).
    pub stop: Vec<String>,
    /// Prepend BOS to the prompt when the model's tokenizer wants it.
    pub add_bos: bool,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 128,
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
            stop: Vec::new(),
            add_bos: true,
            ignore_eos: false,
        }
    }
}

impl GenerateParams {
    pub fn greedy(max_tokens: usize) -> Self {
        GenerateParams {
            max_tokens,
            ..Default::default()
        }
    }

    /// Checks every parameter for a session with context `n_ctx` (generation does; a caller
    /// may too, before any work).
    pub fn validate(&self, n_ctx: u32) -> Result<(), RuntimeError> {
        let bad = |m: &str| Err(RuntimeError::InvalidParams(m.to_string()));
        if self.repeat_last_n < 0 {
            return Err(RuntimeError::InvalidParams(format!(
                "repeat_last_n {} is negative",
                self.repeat_last_n
            )));
        }
        // The window is allocated only for the penalty sampler (`Sampler::new`): with the
        // penalty off the value is not used, and the default must not fail a small context.
        if self.repeat_penalty != 1.0 && self.repeat_last_n as i64 > n_ctx as i64 {
            return Err(RuntimeError::InvalidParams(format!(
                "repeat_last_n {} is outside 0..={n_ctx} (the session's n_ctx)",
                self.repeat_last_n
            )));
        }
        if self.seed == u32::MAX {
            return bad("seed 4294967295 is llama.cpp's random-seed value; use another seed");
        }
        if !self.temperature.is_finite() {
            return bad(&format!(
                "temperature {} is not finite; 0 or less is greedy, else {MIN_TEMPERATURE:e} or more",
                self.temperature
            ));
        }
        // llama.cpp divides the logits by it: below this they overflow to infinity and the
        // draw is neither greedy nor random (1e-40 gave the same wrong text for every seed).
        if self.temperature > 0.0 && self.temperature < MIN_TEMPERATURE {
            return Err(RuntimeError::InvalidParams(format!(
                "temperature {:e} is below {MIN_TEMPERATURE:e}, where the scaled logits overflow; \
                 0 is greedy",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(&format!(
                "top_p {} is outside (0, 1] (1 is off)",
                self.top_p
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(&format!(
                "min_p {} is outside [0, 1] (0 is off)",
                self.min_p
            ));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad(&format!(
                "repeat_penalty {} is not a finite number > 0 (1 is off)",
                self.repeat_penalty
            ));
        }
        if self.top_k < 0 {
            return bad(&format!(
                "top_k must be >= 0 (0 is off), got {}",
                self.top_k
            ));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop strings must not be empty");
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    /// The model produced an end-of-generation token (not included in the output).
    Eos,
    /// This stop string was found (not included in the text).
    StopString(String),
    /// The per-token callback returned `ControlFlow::Break`.
    Callback,
    Cancelled,
    /// The session's context is full.
    ContextFull,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    pub prefill: Duration,
    pub decode: Duration,
    pub n_prompt: usize,
    /// Tokens whose logits were computed by single-token decodes.
    pub n_decoded: usize,
}

impl Timings {
    pub fn prefill_tok_s(&self) -> f64 {
        self.n_prompt as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        self.n_decoded as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOutput {
    /// Generated text (without the prompt and without a matched stop string).
    pub text: String,
    /// Every sampled token (including those of a matched stop string, excluding EOS).
    pub tokens: Vec<Token>,
    pub n_prompt: usize,
    pub n_generated: usize,
    pub stop_reason: StopReason,
    pub timings: Timings,
}

/// [`TokenEvent::token`] of the final event that flushes held-back text at the end.
pub const FLUSH_TOKEN: Token = -1;

/// Passed to the streaming callback once per sampled token, plus possibly one final event with
/// `token == FLUSH_TOKEN` carrying text held back until the end.
#[derive(Debug)]
pub struct TokenEvent<'a> {
    pub token: Token,
    /// Index of this token among the generated ones.
    pub index: usize,
    /// Text that became final with this token (may be empty: an incomplete UTF-8 character or
    /// a possible stop-string prefix is held back).
    pub text: &'a str,
}

// The C++ shim (src/shim.cpp): llama.cpp calls that can throw, with the exception caught on
// the C++ side and returned as a code (0 done, 1 out of memory, 2 another exception).
extern "C" {
    fn amend_decode(
        ctx: *mut sys::llama_context,
        batch: *const sys::llama_batch,
        encode: bool,
        out: *mut i32,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn amend_tokenize(
        vocab: *const sys::llama_vocab,
        text: *const std::ffi::c_char,
        text_len: i32,
        tokens: *mut sys::llama_token,
        n_tokens_max: i32,
        add_special: bool,
        parse_special: bool,
        out: *mut i32,
    ) -> i32;
    fn amend_token_to_piece(
        vocab: *const sys::llama_vocab,
        token: sys::llama_token,
        buf: *mut std::ffi::c_char,
        length: i32,
        lstrip: i32,
        special: bool,
        out: *mut i32,
    ) -> i32;
    fn amend_sampler_init_penalties(
        n_vocab: i32,
        penalty_last_n: i32,
        penalty_repeat: f32,
        penalty_freq: f32,
        penalty_present: f32,
        out: *mut *mut sys::llama_sampler,
    ) -> i32;
    fn amend_sampler_sample_logits(
        smpl: *mut sys::llama_sampler,
        logits: *const f32,
        n_vocab: i32,
        out: *mut Token,
    ) -> i32;
    fn amend_sampler_sample(
        smpl: *mut sys::llama_sampler,
        ctx: *mut sys::llama_context,
        idx: i32,
        out: *mut Token,
    ) -> i32;
}

/// The error for a shim code other than 0.
/// llama.cpp's tokenizer through the shim: a C++ exception is `CppException`, never an abort.
///
/// # Safety
/// As `llama_tokenize`: a live vocabulary, `text` valid for `text_len` bytes, `tokens` for
/// `n_max` tokens.
pub(crate) unsafe fn tokenize_raw(
    vocab: *const sys::llama_vocab,
    text: &[u8],
    tokens: &mut [sys::llama_token],
    add_special: bool,
) -> Result<i32, RuntimeError> {
    let len =
        i32::try_from(text.len()).map_err(|_| RuntimeError::Tokenize("text too long".into()))?;
    let n_max =
        i32::try_from(tokens.len()).map_err(|_| RuntimeError::Tokenize("text too long".into()))?;
    let mut n = 0;
    // SAFETY: the caller's vocabulary; the slices give the pointers and lengths.
    let code = unsafe {
        amend_tokenize(
            vocab,
            text.as_ptr() as *const std::ffi::c_char,
            len,
            tokens.as_mut_ptr(),
            n_max,
            add_special,
            false,
            &mut n,
        )
    };
    if code != 0 {
        return Err(cpp_exception("llama_tokenize", code));
    }
    Ok(n)
}

/// llama.cpp's `llama_token_to_piece` through the shim (no special tokens rendered).
///
/// # Safety
/// A live vocabulary and a token id below its size.
pub(crate) unsafe fn token_to_piece_raw(
    vocab: *const sys::llama_vocab,
    token: sys::llama_token,
    buf: &mut [u8],
) -> Result<i32, RuntimeError> {
    let len = i32::try_from(buf.len()).unwrap_or(i32::MAX);
    let mut n = 0;
    // SAFETY: the caller's vocabulary and token; `buf` has `len` bytes of room.
    let code = unsafe {
        amend_token_to_piece(
            vocab,
            token,
            buf.as_mut_ptr() as *mut std::ffi::c_char,
            len,
            0,
            false,
            &mut n,
        )
    };
    if code != 0 {
        return Err(cpp_exception("llama_token_to_piece", code));
    }
    Ok(n)
}

/// `llama_decode` (or, with `encode`, `llama_encode`) through the shim: llama.cpp's return code,
/// or `CppException` where it threw.
///
/// # Safety
/// As `llama_decode`: a live context and a well-formed batch.
pub(crate) unsafe fn decode_raw(
    ctx: *mut sys::llama_context,
    batch: &sys::llama_batch,
    encode: bool,
) -> Result<i32, RuntimeError> {
    let mut rc = 0;
    // SAFETY: per this function's contract; the shim reads the batch by value.
    let code = unsafe { amend_decode(ctx, batch, encode, &mut rc) };
    if code != 0 {
        let call = if encode {
            "llama_encode"
        } else {
            "llama_decode"
        };
        return Err(cpp_exception(call, code));
    }
    Ok(rc)
}

fn cpp_exception(call: &'static str, code: i32) -> RuntimeError {
    RuntimeError::CppException {
        call,
        what: if code == 1 {
            "out of memory (std::bad_alloc)"
        } else {
            "a C++ exception"
        },
    }
}

/// llama.cpp's sampler chain for [`GenerateParams`]: every backend samples with it.
pub struct Sampler(NonNull<sys::llama_sampler>);

impl Sampler {
    pub(crate) fn new(p: &GenerateParams, n_vocab: i32) -> Result<Sampler, RuntimeError> {
        // SAFETY: FFI constructors; the chain takes ownership of the samplers added to it, and
        // `Sampler` frees the chain (also on the error path below).
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            let sampler =
                Sampler(NonNull::new(chain).expect("llama_sampler_chain_init returned null"));
            let add = |s| sys::llama_sampler_chain_add(chain, s);
            if p.repeat_penalty != 1.0 {
                // Allocates a window of `repeat_last_n` tokens: the one sampler that can throw.
                let mut penalties = std::ptr::null_mut();
                let code = amend_sampler_init_penalties(
                    n_vocab,
                    p.repeat_last_n,
                    p.repeat_penalty,
                    0.0,
                    0.0,
                    &mut penalties,
                );
                if code != 0 {
                    return Err(cpp_exception("llama_sampler_init_penalties", code));
                }
                add(penalties);
            }
            if p.temperature <= 0.0 {
                add(sys::llama_sampler_init_greedy());
            } else {
                if p.top_k > 0 {
                    add(sys::llama_sampler_init_top_k(p.top_k));
                }
                if p.top_p < 1.0 {
                    add(sys::llama_sampler_init_top_p(p.top_p, 1));
                }
                if p.min_p > 0.0 {
                    add(sys::llama_sampler_init_min_p(p.min_p, 1));
                }
                add(sys::llama_sampler_init_temp(p.temperature));
                add(sys::llama_sampler_init_dist(p.seed));
            }
            Ok(sampler)
        }
    }

    /// Samples from the logits of batch index `idx` of `ctx`'s last evaluation.
    ///
    /// # Safety
    /// `ctx` is a live context whose last evaluation produced logits at `idx`.
    pub(crate) unsafe fn sample(
        &self,
        ctx: *mut sys::llama_context,
        idx: i32,
    ) -> Result<Token, RuntimeError> {
        let mut tok = 0;
        // SAFETY: per this function's contract; the sampler chain is live.
        let code = unsafe { amend_sampler_sample(self.0.as_ptr(), ctx, idx, &mut tok) };
        if code != 0 {
            return Err(cpp_exception("llama_sampler_sample", code));
        }
        Ok(tok)
    }

    /// Samples from a logits row of any backend (the chain then accepts the token).
    pub(crate) fn sample_logits(&self, logits: &[f32]) -> Result<Token, RuntimeError> {
        let n = i32::try_from(logits.len())
            .map_err(|_| RuntimeError::InvalidParams("logits row too long".into()))?;
        let mut tok = 0;
        // SAFETY: the chain is live; `logits` holds `n` floats; the shim catches exceptions.
        let code =
            unsafe { amend_sampler_sample_logits(self.0.as_ptr(), logits.as_ptr(), n, &mut tok) };
        if code != 0 {
            return Err(cpp_exception("llama_sampler_apply", code));
        }
        Ok(tok)
    }
}

#[cfg(test)]
mod shim_tests {
    extern "C" {
        fn amend_shim_selftest(kind: i32) -> i32;
        fn amend_shim_batch_size() -> usize;
    }

    /// The shim's `llama_batch` (passed by value to `llama_decode`) is llama.h's.
    #[test]
    fn shim_batch_layout_is_llama_h() {
        // SAFETY: a plain C function without arguments.
        let n = unsafe { amend_shim_batch_size() };
        assert_eq!(n, std::mem::size_of::<llama_cpp_sys_2::llama_batch>());
    }

    /// The shim's try/catch is linked and works: a thrown `bad_alloc` or `runtime_error` comes
    /// back as a code instead of aborting the process.
    #[test]
    fn exceptions_become_codes() {
        // SAFETY: a plain C function without pointers.
        unsafe {
            assert_eq!(amend_shim_selftest(0), 0);
            assert_eq!(amend_shim_selftest(1), 1);
            assert_eq!(amend_shim_selftest(2), 2);
        }
        let e = super::cpp_exception("llama_sampler_sample", 1).to_string();
        assert!(
            e.contains("llama_sampler_sample") && e.contains("bad_alloc"),
            "{e}"
        );
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        unsafe { sys::llama_sampler_free(self.0.as_ptr()) }
    }
}

/// Longest suffix of `s` (at a char boundary) that is a proper prefix of some stop string.
fn held_suffix_len(s: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for stop in stops {
        let max = stop.len().saturating_sub(1).min(s.len());
        for k in (1..=max).rev() {
            let start = s.len() - k;
            if s.is_char_boundary(start) && stop.as_bytes().starts_with(&s.as_bytes()[start..]) {
                best = best.max(k);
                break;
            }
        }
    }
    best
}

impl Session {
    /// Generates from a text prompt (KV cache cleared first). See [`Session::generate_tokens`].
    pub fn generate(
        &mut self,
        prompt: &str,
        params: &GenerateParams,
        on_token: impl FnMut(&TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput, RuntimeError> {
        // amend.h promises an empty prompt is refused (a BOS alone would otherwise be "a prompt").
        if prompt.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        // Pins the attached edit set for this request; a memory edit may route the prompt.
        let request = self.begin_request(prompt)?;
        let tokens = self.tokenize(&request.prompt, params.add_bos)?;
        self.generate_pinned(&tokens, params, on_token)
    }

    /// Clears the KV cache, prefills `prompt` and samples up to `max_tokens` tokens, calling
    /// `on_token` after each. Hooks run during prefill (`Phase::Prefill`, the last prompt
    /// token marked) and each decode step (`Phase::Decode`). A [`crate::CancelHandle`] stops it
    /// within one token (`StopReason::Cancelled`).
    /// Memory edits (which route a text prompt) do not apply here; codebooks, neurons and
    /// low-rank edits of the attached set do.
    pub fn generate_tokens(
        &mut self,
        prompt: &[Token],
        params: &GenerateParams,
        on_token: impl FnMut(&TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput, RuntimeError> {
        self.pin_edits()?;
        self.generate_pinned(prompt, params, on_token)
    }

    fn generate_pinned(
        &mut self,
        prompt: &[Token],
        params: &GenerateParams,
        mut on_token: impl FnMut(&TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput, RuntimeError> {
        generate_on(self, prompt, params, &mut on_token)
    }
}

/// Generates from prompt tokens on any backend, without edits and without streaming.
pub fn generate_with(
    b: &mut dyn Backend,
    prompt: &[Token],
    params: &GenerateParams,
) -> Result<GenerateOutput, RuntimeError> {
    generate_on(b, prompt, params, &mut |_| ControlFlow::Continue(()))
}

/// Refuses a logits row no token can be drawn from: a NaN or +inf anywhere, or no finite value
/// (-inf alone is a masked token). The common case is one branch-free pass over the exponent
/// bits, which vectorizes (about 20 us for gemma3's 262,144 logits against a ~20 ms token);
/// only a row holding a non-finite value is walked again.
fn check_logits(row: &[f32], index: usize) -> Result<(), RuntimeError> {
    const EXP: u32 = 0x7f80_0000; // all exponent bits set: inf or NaN
    let any_non_finite = row
        .iter()
        .fold(0u32, |acc, x| acc | ((x.to_bits() & EXP == EXP) as u32));
    if any_non_finite == 0 && !row.is_empty() {
        return Ok(());
    }
    let mut finite = false;
    for (t, &x) in row.iter().enumerate() {
        if x.is_nan() || x == f32::INFINITY {
            return Err(RuntimeError::NonFiniteLogits {
                index,
                detail: format!("the logit of token {t} is {x}"),
            });
        }
        finite |= x.is_finite();
    }
    if !finite {
        return Err(RuntimeError::NonFiniteLogits {
            index,
            detail: format!("all {} logits are -inf", row.len()),
        });
    }
    Ok(())
}

/// The generation loop of every backend: clears the KV cache, prefills `prompt` and samples up
/// to `max_tokens` tokens, streaming text through `on_token` (stop strings held back).
pub(crate) fn generate_on<B: Backend + ?Sized>(
    b: &mut B,
    prompt: &[Token],
    params: &GenerateParams,
    on_token: &mut dyn FnMut(&TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<GenerateOutput, RuntimeError> {
    params.validate(b.n_ctx().min(u32::MAX as usize) as u32)?;
    if prompt.is_empty() {
        return Err(RuntimeError::EmptyInput);
    }
    b.kv_clear()?;
    let mut out = GenerateOutput {
        text: String::new(),
        tokens: Vec::new(),
        n_prompt: prompt.len(),
        n_generated: 0,
        stop_reason: StopReason::MaxTokens,
        timings: Timings {
            n_prompt: prompt.len(),
            ..Default::default()
        },
    };
    let t0 = Instant::now();
    match b.eval(prompt, EvalOptions::prefill(Logits::Last)) {
        Ok(()) => {}
        Err(RuntimeError::Aborted) => {
            out.stop_reason = StopReason::Cancelled;
            return Ok(out);
        }
        Err(e) => return Err(e),
    }
    out.timings.prefill = t0.elapsed();

    let model = b.vocab().clone();
    let greedy = params.temperature <= 0.0 && params.repeat_penalty == 1.0;
    let sampler = if greedy {
        None
    } else {
        Some(Sampler::new(params, model.info().n_vocab as i32)?)
    };
    let mut detok = Detokenizer::new();
    let mut held = String::new();
    let t1 = Instant::now();
    let reason = loop {
        if b.take_cancel() {
            break StopReason::Cancelled;
        }
        if out.n_generated >= params.max_tokens {
            break StopReason::MaxTokens;
        }
        let row = b.last_logits()?;
        check_logits(row, out.n_generated)?;
        let tok = match &sampler {
            // Plain greedy: argmax in place (first maximum, as llama.cpp's greedy sampler)
            // instead of building llama.cpp's n_vocab candidate array every token.
            None => crate::reference::argmax(row) as Token,
            Some(s) => b.sample(s)?,
        };
        if !params.ignore_eos && model.is_eog(tok) {
            break StopReason::Eos;
        }
        out.tokens.push(tok);
        out.n_generated += 1;
        held.push_str(&detok.push(&model.token_bytes(tok)?));
        let mut stop_hit = None;
        let emit_len = if params.stop.is_empty() {
            held.len()
        } else if let Some((pos, s)) = params
            .stop
            .iter()
            .filter_map(|s| held.find(s.as_str()).map(|p| (p, s)))
            .min_by_key(|(p, _)| *p)
        {
            stop_hit = Some(s.clone());
            pos
        } else {
            held.len() - held_suffix_len(&held, &params.stop)
        };
        let emitted: String = held.drain(..emit_len).collect();
        out.text.push_str(&emitted);
        let flow = on_token(&TokenEvent {
            token: tok,
            index: out.n_generated - 1,
            text: &emitted,
        });
        if let Some(s) = stop_hit {
            held.clear();
            break StopReason::StopString(s);
        }
        if flow.is_break() {
            break StopReason::Callback;
        }
        if out.n_generated >= params.max_tokens {
            break StopReason::MaxTokens;
        }
        if b.n_past() + 1 > b.n_ctx() {
            break StopReason::ContextFull;
        }
        match b.eval(&[tok], EvalOptions::decode()) {
            Ok(()) => out.timings.n_decoded += 1,
            Err(RuntimeError::Aborted) => break StopReason::Cancelled,
            Err(e) => return Err(e),
        }
    };
    out.timings.decode = t1.elapsed();
    if !matches!(reason, StopReason::StopString(_)) {
        // Held-back text did not complete a stop string: it is part of the output.
        held.push_str(&detok.finish());
        if !held.is_empty() {
            out.text.push_str(&held);
            let _ = on_token(&TokenEvent {
                token: FLUSH_TOKEN,
                index: out.n_generated,
                text: &held,
            });
        }
    }
    out.stop_reason = reason;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{held_suffix_len, GenerateParams};

    #[test]
    fn the_penalty_window_is_checked_when_the_penalty_is_on() {
        // The defaults (penalty off, window 64) fit a context smaller than the window.
        GenerateParams::default().validate(16).unwrap();
        let on = GenerateParams {
            repeat_penalty: 1.1,
            ..Default::default()
        };
        let e = on.validate(16).unwrap_err().to_string();
        assert!(e.contains("repeat_last_n 64 is outside 0..=16"), "{e}");
        on.validate(64).unwrap();
        GenerateParams {
            repeat_last_n: 16,
            ..on.clone()
        }
        .validate(16)
        .unwrap();
        for p in [on, GenerateParams::default()] {
            let e = GenerateParams {
                repeat_last_n: -1,
                ..p
            }
            .validate(16)
            .unwrap_err()
            .to_string();
            assert!(e.contains("repeat_last_n -1 is negative"), "{e}");
        }
    }

    #[test]
    fn holds_possible_stop_prefixes() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(held_suffix_len("abc\n", &stops), 1);
        assert_eq!(held_suffix_len("abcEN", &stops), 2);
        assert_eq!(held_suffix_len("abcE", &stops), 1);
        assert_eq!(held_suffix_len("abc", &stops), 0);
        assert_eq!(held_suffix_len("é", &["éx".to_string()]), 2);
    }
}
