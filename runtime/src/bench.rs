//! Hook overhead benchmark: plain llama.cpp vs amend with no hook, an observing hook and a
//! writing hook, interleaved in the same run (`amend bench`).

use std::sync::Arc;

use amend_edits::{HookPoint, Site};

use crate::error::RuntimeError;
use crate::generate::GenerateParams;
use crate::hooks::{FnHook, HookRows};
use crate::model::Model;
use crate::reference::{thread_cpu_time, RawContext};
use crate::session::{Session, SessionOptions};
use crate::Token;

#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Prompt length in tokens (<= 512).
    pub prompt_tokens: usize,
    /// Generated tokens per run.
    pub gen_tokens: usize,
    /// Rounds; each round runs every variant once, in rotating order. Medians are reported.
    pub rounds: usize,
    pub n_threads: Option<usize>,
    /// Layer of the hooks (default: the middle layer).
    pub layer: Option<u32>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            prompt_tokens: 128,
            gen_tokens: 32,
            rounds: 5,
            n_threads: None,
            layer: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Raw,
    NoHooks,
    Observe,
    Write,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::Raw,
        Variant::NoHooks,
        Variant::Observe,
        Variant::Write,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Variant::Raw => "llama.cpp (raw)",
            Variant::NoHooks => "amend, no hooks",
            Variant::Observe => "amend, observing hook",
            Variant::Write => "amend, writing hook",
        }
    }
}

#[derive(Clone, Debug)]
pub struct VariantResult {
    pub variant: Variant,
    /// Median tokens/s over the rounds.
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub prefill_samples: Vec<f64>,
    pub decode_samples: Vec<f64>,
    /// Median tokens per second of the calling thread's CPU time; `Some` only with one
    /// llama.cpp thread (then all compute runs on the calling thread, so this is insensitive to
    /// other load on the machine).
    pub prefill_cpu_tok_s: Option<f64>,
    pub decode_cpu_tok_s: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub config: BenchConfig,
    pub point: HookPoint,
    pub results: Vec<VariantResult>,
}

impl BenchReport {
    fn get(&self, v: Variant) -> &VariantResult {
        self.results
            .iter()
            .find(|r| r.variant == v)
            .expect("every variant is measured")
    }

    /// (prefill, decode) ratio of `v`'s median tokens/s to raw llama.cpp's.
    pub fn ratio(&self, v: Variant) -> (f64, f64) {
        let (raw, x) = (self.get(Variant::Raw), self.get(v));
        (
            x.prefill_tok_s / raw.prefill_tok_s,
            x.decode_tok_s / raw.decode_tok_s,
        )
    }

    /// (prefill, decode) ratio of `v`'s median CPU-time tokens/s to raw llama.cpp's; `None`
    /// unless the benchmark ran with one thread.
    pub fn cpu_ratio(&self, v: Variant) -> Option<(f64, f64)> {
        let (raw, x) = (self.get(Variant::Raw), self.get(v));
        Some((
            x.prefill_cpu_tok_s? / raw.prefill_cpu_tok_s?,
            x.decode_cpu_tok_s? / raw.decode_cpu_tok_s?,
        ))
    }

    /// (prefill, decode) ratio of `v`'s best round to raw llama.cpp's best round: on a shared
    /// machine the fastest round is the one least disturbed by other load.
    pub fn best_ratio(&self, v: Variant) -> (f64, f64) {
        let best = |xs: &[f64]| xs.iter().copied().fold(0.0, f64::max);
        let (raw, x) = (self.get(Variant::Raw), self.get(v));
        (
            best(&x.prefill_samples) / best(&raw.prefill_samples),
            best(&x.decode_samples) / best(&raw.decode_samples),
        )
    }

    /// A human-readable table: wall-clock medians with their ratios to raw llama.cpp and the
    /// best-round ratios, then (single-threaded runs) CPU-time medians and ratios.
    pub fn table(&self) -> String {
        let mut s = format!(
            "prompt {} tokens, {} generated, {} rounds, hooks at {}\n\
             wall clock:\n{:<24} {:>13} {:>7} {:>7} {:>13} {:>7} {:>7}\n",
            self.config.prompt_tokens,
            self.config.gen_tokens,
            self.config.rounds,
            self.point,
            "variant",
            "prefill tok/s",
            "ratio",
            "best",
            "decode tok/s",
            "ratio",
            "best",
        );
        for r in &self.results {
            let (rp, rd) = self.ratio(r.variant);
            let (bp, bd) = self.best_ratio(r.variant);
            s.push_str(&format!(
                "{:<24} {:>13.1} {:>7.3} {:>7.3} {:>13.1} {:>7.3} {:>7.3}\n",
                r.variant.name(),
                r.prefill_tok_s,
                rp,
                bp,
                r.decode_tok_s,
                rd,
                bd
            ));
        }
        if self.cpu_ratio(Variant::Raw).is_some() {
            s.push_str(&format!(
                "thread CPU time (insensitive to other load):\n{:<24} {:>13} {:>7} {:>13} {:>7}\n",
                "variant", "prefill tok/s", "ratio", "decode tok/s", "ratio"
            ));
            for r in &self.results {
                let (cp, cd) = self.cpu_ratio(r.variant).unwrap_or_default();
                s.push_str(&format!(
                    "{:<24} {:>13.1} {:>7.3} {:>13.1} {:>7.3}\n",
                    r.variant.name(),
                    r.prefill_cpu_tok_s.unwrap_or_default(),
                    cp,
                    r.decode_cpu_tok_s.unwrap_or_default(),
                    cd
                ));
            }
        }
        s
    }
}

/// Median of `v` (0 when empty): the one median every benchmark and report uses.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the benchmark. `progress` receives one line per measurement.
pub fn run_bench(
    model: &Arc<Model>,
    config: &BenchConfig,
    mut progress: impl FnMut(&str),
) -> Result<BenchReport, RuntimeError> {
    if config.prompt_tokens == 0
        || config.prompt_tokens > 512
        || config.gen_tokens == 0
        || config.rounds == 0
    {
        return Err(RuntimeError::InvalidParams(
            "prompt_tokens must be 1..=512, gen_tokens and rounds >= 1".into(),
        ));
    }
    let info = model.info();
    let point = HookPoint::new(config.layer.unwrap_or(info.n_layer / 2), Site::ResidualOut);
    model.node_name(point)?;
    let threads = config
        .n_threads
        .or(model.options().n_threads)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(crate::MAX_THREADS)
        });
    let n_ctx = (config.prompt_tokens + config.gen_tokens + 8)
        .next_power_of_two()
        .max(256) as u32;
    let opts = SessionOptions {
        n_ctx,
        n_ubatch: 512,
        n_threads: Some(threads),
        n_threads_batch: Some(threads),
    };
    // A prompt of ordinary text tokens, repeated to length.
    let text = "The quick brown fox jumps over the lazy dog while the capital of France is Paris. ";
    let mut prompt: Vec<Token> = model.tokenize(text, true)?;
    let body = model.tokenize(text, false)?;
    while prompt.len() < config.prompt_tokens {
        prompt.extend_from_slice(&body);
    }
    prompt.truncate(config.prompt_tokens);

    let mut raw = RawContext::new(model, n_ctx, 512, threads)?;
    let mut plain = Session::new(model, opts.clone())?;
    let mut observe = Session::new(model, opts.clone())?;
    let mut write = Session::new(model, opts)?;
    let mut sink = 0f64;
    observe.add_hook(Box::new(FnHook::new(
        vec![point],
        move |_, rows: &mut HookRows<'_>| {
            // Read every value (a norm per row) as an observing edit would.
            for i in 0..rows.n_rows() {
                sink += rows
                    .row(i)
                    .iter()
                    .map(|x| (*x as f64) * (*x as f64))
                    .sum::<f64>();
            }
            std::hint::black_box(sink);
        },
    )))?;
    write.add_hook(Box::new(FnHook::new(
        vec![point],
        |_, rows: &mut HookRows<'_>| {
            // Touch every value, as a writing edit would (a negligible change).
            for x in rows.data_mut() {
                *x *= 1.0 + 1e-7;
            }
        },
    )))?;
    let params = GenerateParams {
        max_tokens: config.gen_tokens,
        ignore_eos: true,
        ..GenerateParams::greedy(config.gen_tokens)
    };

    // Warm-up (page in the weights, allocate graphs) once per variant, not measured.
    raw.greedy(&prompt, 2)?;
    for s in [&mut plain, &mut observe, &mut write] {
        s.generate_tokens(
            &prompt,
            &GenerateParams {
                max_tokens: 2,
                ..params.clone()
            },
            |_| std::ops::ControlFlow::Continue(()),
        )?;
    }
    let cpu_valid = threads == 1;
    // Per variant: wall prefill, wall decode, cpu prefill, cpu decode (tokens/s).
    let mut samples: Vec<[Vec<f64>; 4]> = vec![Default::default(); 4];
    let rate = |n: usize, t: std::time::Duration| n as f64 / t.as_secs_f64().max(1e-9);
    for round in 0..config.rounds {
        for k in 0..4 {
            let vi = (round + k) % 4;
            let variant = Variant::ALL[vi];
            let m = match variant {
                Variant::Raw => {
                    let (_, t) = raw.greedy_with(&prompt, config.gen_tokens, false)?;
                    [
                        rate(t.n_prompt, t.prefill),
                        rate(t.n_decoded, t.decode),
                        rate(t.n_prompt, t.prefill_cpu),
                        rate(t.n_decoded, t.decode_cpu),
                    ]
                }
                _ => {
                    let s = match variant {
                        Variant::NoHooks => &mut plain,
                        Variant::Observe => &mut observe,
                        _ => &mut write,
                    };
                    // The first token event comes right after the prefill and one argmax.
                    let c0 = thread_cpu_time();
                    let mut c1 = None;
                    let o = s.generate_tokens(&prompt, &params, |_| {
                        c1.get_or_insert_with(thread_cpu_time);
                        std::ops::ControlFlow::Continue(())
                    })?;
                    let c2 = thread_cpu_time();
                    let c1 = c1.unwrap_or(c2);
                    [
                        o.timings.prefill_tok_s(),
                        o.timings.decode_tok_s(),
                        rate(o.n_prompt, c1.saturating_sub(c0)),
                        rate(o.timings.n_decoded, c2.saturating_sub(c1)),
                    ]
                }
            };
            progress(&format!(
                "round {round} {:<24} prefill {:8.1} tok/s  decode {:7.1} tok/s  (cpu time: prefill {:8.1}, decode {:7.1})",
                variant.name(),
                m[0],
                m[1],
                m[2],
                m[3],
            ));
            for (dst, v) in samples[vi].iter_mut().zip(m) {
                dst.push(v);
            }
        }
    }
    let results = Variant::ALL
        .iter()
        .zip(samples)
        .map(|(&variant, [p, d, cp, cd])| VariantResult {
            variant,
            prefill_tok_s: median(&p),
            decode_tok_s: median(&d),
            prefill_samples: p,
            decode_samples: d,
            prefill_cpu_tok_s: cpu_valid.then(|| median(&cp)),
            decode_cpu_tok_s: cpu_valid.then(|| median(&cd)),
        })
        .collect();
    Ok(BenchReport {
        config: config.clone(),
        point,
        results,
    })
}
