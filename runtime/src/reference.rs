//! Plain llama.cpp, no amend layer: the reference the tests and `amend bench` compare against.
//! Drives `llama_cpp_sys_2` directly with its own context (no eval callback, no abort callback).

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use llama_cpp_sys_2 as sys;

use crate::error::RuntimeError;
use crate::model::Model;
use crate::Token;

/// A bare llama.cpp context with the same parameters a [`crate::Session`] would use.
pub struct RawContext {
    ctx: NonNull<sys::llama_context>,
    n_vocab: usize,
}

// SAFETY: owned context, used through &mut self only.
unsafe impl Send for RawContext {}

/// Timings of [`RawContext::greedy`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RawTimings {
    pub prefill: Duration,
    pub decode: Duration,
    /// CPU time of the calling thread (see [`thread_cpu_time`]).
    pub prefill_cpu: Duration,
    pub decode_cpu: Duration,
    pub n_prompt: usize,
    pub n_decoded: usize,
}

impl RawContext {
    /// `n_ctx`, `n_ubatch`, `n_threads` as in [`crate::SessionOptions`].
    pub fn new(
        model: &Model,
        n_ctx: u32,
        n_ubatch: u32,
        n_threads: usize,
    ) -> Result<Self, RuntimeError> {
        crate::session::check_threads(Some(n_threads), "n_threads")?;
        let ctx = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = n_ctx;
            p.n_batch = n_ubatch;
            p.n_ubatch = n_ubatch;
            p.n_seq_max = 1;
            p.n_threads = n_threads as i32;
            p.n_threads_batch = n_threads as i32;
            p.no_perf = true;
            sys::llama_init_from_model(model.as_ptr(), p)
        };
        let ctx = NonNull::new(ctx).ok_or(RuntimeError::ContextCreate { n_ctx })?;
        Ok(RawContext {
            ctx,
            n_vocab: model.info().n_vocab as usize,
        })
    }

    /// Greedy generation of exactly `n` tokens (no EOS stop) after prefilling `prompt` in one
    /// batch (it must fit in n_ubatch), choosing tokens with llama.cpp's greedy sampler.
    pub fn greedy(
        &mut self,
        prompt: &[Token],
        n: usize,
    ) -> Result<(Vec<Token>, RawTimings), RuntimeError> {
        self.greedy_with(prompt, n, true)
    }

    /// As [`RawContext::greedy`]; `llama_sampler == false` takes the argmax of the logits in
    /// Rust instead (what amend's greedy path does; the benchmark uses it for a like-for-like
    /// comparison).
    pub fn greedy_with(
        &mut self,
        prompt: &[Token],
        n: usize,
        llama_sampler: bool,
    ) -> Result<(Vec<Token>, RawTimings), RuntimeError> {
        let mut t = RawTimings {
            n_prompt: prompt.len(),
            ..Default::default()
        };
        unsafe {
            sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true);
            let mut batch = sys::llama_batch_init(prompt.len().max(1) as i32, 0, 1);
            let fill = |b: &mut sys::llama_batch, toks: &[Token], pos0: usize| {
                b.n_tokens = toks.len() as i32;
                for (j, &tok) in toks.iter().enumerate() {
                    *b.token.add(j) = tok;
                    *b.pos.add(j) = (pos0 + j) as i32;
                    *b.n_seq_id.add(j) = 1;
                    **b.seq_id.add(j) = 0;
                    *b.logits.add(j) = (j + 1 == toks.len()) as i8;
                }
            };
            let smpl = sys::llama_sampler_init_greedy();
            let result = (|| {
                let mut out = Vec::with_capacity(n);
                let t0 = Instant::now();
                let c0 = thread_cpu_time();
                fill(&mut batch, prompt, 0);
                let rc = crate::generate::decode_raw(self.ctx.as_ptr(), &batch, false)?;
                if rc != 0 {
                    return Err(RuntimeError::Decode { code: rc });
                }
                t.prefill = t0.elapsed();
                let c1 = thread_cpu_time();
                t.prefill_cpu = c1.saturating_sub(c0);
                let t1 = Instant::now();
                for i in 0..n {
                    let tok = if llama_sampler {
                        sys::llama_sampler_sample(smpl, self.ctx.as_ptr(), -1)
                    } else {
                        let logits = std::slice::from_raw_parts(
                            sys::llama_get_logits_ith(self.ctx.as_ptr(), -1),
                            self.n_vocab,
                        );
                        argmax(logits) as Token
                    };
                    out.push(tok);
                    if i + 1 == n {
                        break;
                    }
                    fill(&mut batch, &[tok], prompt.len() + i);
                    let rc = crate::generate::decode_raw(self.ctx.as_ptr(), &batch, false)?;
                    if rc != 0 {
                        return Err(RuntimeError::Decode { code: rc });
                    }
                    t.n_decoded += 1;
                }
                t.decode = t1.elapsed();
                t.decode_cpu = thread_cpu_time().saturating_sub(c1);
                Ok(out)
            })();
            sys::llama_batch_free(batch);
            sys::llama_sampler_free(smpl);
            result.map(|out| (out, t))
        }
    }

    /// Logits of every prompt position, in one batch (for bitwise comparisons).
    pub fn all_logits(&mut self, prompt: &[Token]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        unsafe {
            sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true);
            let mut batch = sys::llama_batch_init(prompt.len() as i32, 0, 1);
            batch.n_tokens = prompt.len() as i32;
            for (j, &tok) in prompt.iter().enumerate() {
                *batch.token.add(j) = tok;
                *batch.pos.add(j) = j as i32;
                *batch.n_seq_id.add(j) = 1;
                **batch.seq_id.add(j) = 0;
                *batch.logits.add(j) = 1;
            }
            let rc = crate::generate::decode_raw(self.ctx.as_ptr(), &batch, false);
            sys::llama_batch_free(batch);
            let rc = rc?;
            if rc != 0 {
                return Err(RuntimeError::Decode { code: rc });
            }
            Ok((0..prompt.len())
                .map(|j| {
                    std::slice::from_raw_parts(
                        sys::llama_get_logits_ith(self.ctx.as_ptr(), j as i32),
                        self.n_vocab,
                    )
                    .to_vec()
                })
                .collect())
        }
    }
}

impl Drop for RawContext {
    fn drop(&mut self) {
        unsafe { sys::llama_free(self.ctx.as_ptr()) }
    }
}

/// Index of the largest value (the first on ties, as llama.cpp's greedy sampler).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// CPU time consumed by the calling thread so far. With one llama.cpp thread all compute runs
/// on the calling thread, so this measures the work itself, undisturbed by other load on a shared
/// machine. Zero where unsupported.
pub fn thread_cpu_time() -> Duration {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: plain syscall writing into `ts`.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        }
    }
    Duration::ZERO
}
