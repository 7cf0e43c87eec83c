//! Backend parity: does a candidate backend pick the same next token as the reference along the
//! reference's own greedy continuations? (issue 13: ONNX Runtime against llama.cpp.)
//!
//! For each prompt the reference generates `n_tokens` greedily (end-of-generation ignored, so
//! every prompt gives the same number of positions) and keeps its logits. The candidate then
//! evaluates the same tokens, token by token as the reference did ([`Mode::Incremental`]) or in
//! one teacher-forced pass ([`Mode::Batch`]); at each position its top-1 is compared with the
//! reference's token, and its logits with the reference's. llama.cpp compared with itself in
//! batch mode is the noise floor (docs/backends.md).

/// How the candidate evaluates the continuation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Prompt, then one token at a time (what generation does).
    Incremental,
    /// Prompt and continuation in one pass.
    Batch,
}

use std::time::Instant;

use crate::backend::Backend;
use crate::error::RuntimeError;
use crate::session::{EvalOptions, Logits};
use crate::Token;

/// What [`parity`] measured.
#[derive(Clone, Debug, Default)]
pub struct ParityReport {
    pub prompts: usize,
    pub positions: usize,
    /// Positions where the candidate's top-1 is the reference's token.
    pub agree: usize,
    /// Largest |candidate - reference| over every logit of every position.
    pub max_abs_err: f64,
    /// Mean over positions of the mean |candidate - reference| over the vocabulary.
    pub mean_abs_err: f64,
    /// Mean over positions of the reference logits' standard deviation (a scale for the errors).
    pub mean_ref_std: f64,
    /// Prompts whose first position disagrees (listed by index).
    pub first_token_misses: Vec<usize>,
    pub reference_s: f64,
    pub candidate_s: f64,
}

impl ParityReport {
    pub fn agreement(&self) -> f64 {
        if self.positions == 0 {
            0.0
        } else {
            100.0 * self.agree as f64 / self.positions as f64
        }
    }

    pub fn table(&self, reference: &str, candidate: &str) -> String {
        format!(
            "| reference | candidate | prompts | positions | top-1 agreement | max abs logit error | mean abs logit error | mean logit std |\n\
             |---|---|---:|---:|---:|---:|---:|---:|\n\
             | {reference} | {candidate} | {} | {} | {:.2}% ({}/{}) | {:.4} | {:.5} | {:.3} |\n",
            self.prompts,
            self.positions,
            self.agreement(),
            self.agree,
            self.positions,
            self.max_abs_err,
            self.mean_abs_err,
            self.mean_ref_std,
        )
    }
}

/// Compares `candidate` with `reference` along the reference's greedy continuations of
/// `prompts` (token lists), `n_tokens` positions each.
pub fn parity(
    reference: &mut dyn Backend,
    candidate: &mut dyn Backend,
    prompts: &[Vec<Token>],
    n_tokens: usize,
    mode: Mode,
    mut progress: impl FnMut(usize, &ParityReport),
) -> Result<ParityReport, RuntimeError> {
    if n_tokens == 0 {
        return Err(RuntimeError::InvalidParams("n_tokens must be > 0".into()));
    }
    let mut r = ParityReport::default();
    let (mut sum_mean, mut sum_std) = (0f64, 0f64);
    for (pi, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        // Reference: greedy continuation, keeping the logits that chose each token.
        let t0 = Instant::now();
        reference.kv_clear()?;
        reference.eval(prompt, EvalOptions::prefill(Logits::Last))?;
        let mut cont: Vec<Token> = Vec::with_capacity(n_tokens);
        let mut ref_logits: Vec<Vec<f32>> = Vec::with_capacity(n_tokens);
        for i in 0..n_tokens {
            let l = reference.last_logits()?.to_vec();
            let tok = crate::reference::argmax(&l) as Token;
            cont.push(tok);
            ref_logits.push(l);
            if i + 1 < n_tokens {
                reference.eval(&[tok], EvalOptions::decode())?;
            }
        }
        r.reference_s += t0.elapsed().as_secs_f64();

        // Candidate: the same tokens, forced.
        let t1 = Instant::now();
        candidate.kv_clear()?;
        let mut cand_logits: Vec<Vec<f32>> = Vec::with_capacity(n_tokens);
        match mode {
            Mode::Batch => {
                let mut seq = prompt.clone();
                seq.extend_from_slice(&cont[..n_tokens - 1]);
                candidate.eval(&seq, EvalOptions::prefill(Logits::From(prompt.len() - 1)))?;
                for i in 0..n_tokens {
                    cand_logits.push(candidate.logits(prompt.len() - 1 + i)?.to_vec());
                }
            }
            Mode::Incremental => {
                candidate.eval(prompt, EvalOptions::prefill(Logits::Last))?;
                for (i, &tok) in cont.iter().enumerate() {
                    cand_logits.push(candidate.last_logits()?.to_vec());
                    if i + 1 < n_tokens {
                        candidate.eval(&[tok], EvalOptions::decode())?;
                    }
                }
            }
        }
        for (i, want) in cont.iter().enumerate() {
            let l = &cand_logits[i];
            let rl = &ref_logits[i];
            if crate::reference::argmax(l) as Token == *want {
                r.agree += 1;
            } else if i == 0 {
                r.first_token_misses.push(pi);
            }
            let (mut max, mut sum) = (0f64, 0f64);
            for (a, b) in l.iter().zip(rl) {
                let d = (*a as f64 - *b as f64).abs();
                max = max.max(d);
                sum += d;
            }
            r.max_abs_err = r.max_abs_err.max(max);
            sum_mean += sum / l.len() as f64;
            let mean = rl.iter().map(|&x| x as f64).sum::<f64>() / rl.len() as f64;
            let var = rl.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / rl.len() as f64;
            sum_std += var.sqrt();
            r.positions += 1;
        }
        r.candidate_s += t1.elapsed().as_secs_f64();
        r.prompts += 1;
        r.mean_abs_err = sum_mean / r.positions as f64;
        r.mean_ref_std = sum_std / r.positions as f64;
        progress(pi, &r);
    }
    Ok(r)
}
