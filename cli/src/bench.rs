//! `amend bench`: prefill/decode speed of plain llama.cpp vs amend without hooks, with an
//! observing hook and with a writing hook, interleaved in one run.

use std::path::PathBuf;

use amend_runtime::bench::{run_bench, BenchConfig, Variant};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file.
    #[arg(long, env = "AMEND_MODEL")]
    pub model: PathBuf,
    /// Prompt length in tokens (1..=512).
    #[arg(long, default_value_t = 128,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=512))]
    pub prompt_tokens: usize,
    /// Generated tokens per run: at least 2 (the first comes from the prefill; decode is timed
    /// over the rest) and, with --prompt-tokens, at most the model's context length.
    #[arg(long, default_value_t = 32,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
              .range(1..=MAX_GEN_TOKENS))]
    pub gen_tokens: usize,
    /// Rounds (each runs every variant once, in rotating order; medians are reported; 1..=1000).
    #[arg(long, default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub rounds: usize,
    /// CPU threads (default: all available).
    #[arg(long, value_parser = crate::parse_threads)]
    pub threads: Option<usize>,
    /// Layer of the hooks (default: the middle layer).
    #[arg(long)]
    pub layer: Option<u32>,
}

/// With 512 prompt tokens and run_bench's 8 spare, the context it sizes (the next power of two)
/// stays within the runtime's limit even for a model that does not state its trained context.
const MAX_GEN_TOKENS: u64 = amend_runtime::MAX_N_CTX as u64 - 520;

/// Ratios below this are flagged.
const TARGET_RATIO: f64 = 0.97;

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.gen_tokens < 2 {
        // One token is all prefill: every decode rate would be 0 and its ratio NaN, which no
        // verdict flags.
        anyhow::bail!(
            "--gen-tokens {}: give at least 2 (the first token comes from the prefill; decode \
             is timed over the rest)",
            args.gen_tokens
        );
    }
    let model = crate::run::open_model(&args.model, args.threads)?;
    let n_layer = model.info().n_layer;
    if let Some(l) = args.layer.filter(|&l| l >= n_layer) {
        anyhow::bail!(
            "--layer {l}: the model has {n_layer} layers; give 0..={}",
            n_layer.saturating_sub(1)
        );
    }
    // Sessions are capped at the trained context (and the raw llama.cpp context is not): a run
    // longer than it would fail or measure an overflowing context, after minutes of work.
    let n_ctx_train = model.info().n_ctx_train as usize;
    let total = args.prompt_tokens + args.gen_tokens;
    if n_ctx_train > 0 && total > n_ctx_train {
        anyhow::bail!(
            "--prompt-tokens {} + --gen-tokens {} = {total} tokens do not fit in the model's context length {n_ctx_train}; give --gen-tokens at most {}",
            args.prompt_tokens,
            args.gen_tokens,
            n_ctx_train.saturating_sub(args.prompt_tokens)
        );
    }
    let config = BenchConfig {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        rounds: args.rounds,
        n_threads: args.threads,
        layer: args.layer,
    };
    let report = run_bench(&model, &config, |line| log::info!("{line}"))?;
    println!(
        "model {} ({})",
        args.model.display(),
        model.info().description
    );
    print!("{}", report.table());
    // The verdict uses CPU-time ratios when measured (single thread: undisturbed by other load),
    // else best-round wall-clock ratios (the fastest round is the least disturbed one).
    let (basis, ratio): (&str, &dyn Fn(Variant) -> (f64, f64)) =
        if report.cpu_ratio(Variant::Raw).is_some() {
            ("CPU-time", &|v| report.cpu_ratio(v).unwrap_or_default())
        } else {
            ("best-round wall-clock", &|v| report.best_ratio(v))
        };
    let mut below = Vec::new();
    for v in Variant::ALL.into_iter().skip(1) {
        let (p, d) = ratio(v);
        if p < TARGET_RATIO || d < TARGET_RATIO {
            below.push(format!("{} (prefill {p:.3}, decode {d:.3})", v.name()));
        }
    }
    if below.is_empty() {
        println!("all {basis} ratios >= {TARGET_RATIO}");
    } else {
        println!(
            "{basis} ratios below {TARGET_RATIO}: {} ({} rounds; on a busy machine rerun with more --rounds, or --threads 1 for CPU-time ratios)",
            below.join(", "),
            args.rounds
        );
    }
    Ok(())
}
