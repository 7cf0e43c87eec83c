//! `amend run`: generate text, streaming tokens to stdout.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use amend_runtime::{GenerateParams, Model, ModelOptions, Session, SessionOptions};
use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file.
    #[arg(long, env = "AMEND_MODEL")]
    pub model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 or less = greedy.
    #[arg(long = "temp", default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Top-k (0 = off) [default: 40]. Sampling only (--temp above 0).
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i32>,
    /// Top-p (1 = off) [default: 0.95]. Sampling only.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Min-p (0 = off) [default: 0.05]. Sampling only.
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at, at most the context [default:
    /// 64, or the session's context when that is smaller].
    #[arg(long, allow_negative_numbers = true)]
    pub repeat_last_n: Option<i32>,
    /// Sampling seed (default: random). Sampling only.
    #[arg(long)]
    pub seed: Option<u32>,
    /// CPU threads (default: all available).
    #[arg(long, value_parser = crate::parse_threads)]
    pub threads: Option<usize>,
    /// Context length in tokens, at most the model's trained context [default: 2048, or the
    /// model's trained context when that is smaller].
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<u32>::new()
          .range(1..=amend_runtime::MAX_N_CTX as u64))]
    pub ctx: Option<u32>,
    /// Stop before this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Patch bundle to apply (repeatable; applied in order).
    #[arg(long = "bundle")]
    pub bundles: Vec<PathBuf>,
    /// Trusted public key (PREFIX.pub) that bundles must be signed with (repeatable).
    #[arg(long = "pubkey")]
    pub pubkeys: Vec<PathBuf>,
    /// Version store: an anti-rollback state file shared by every process of this trust
    /// domain. A bundle whose version is below its channel's mark is refused; activating one
    /// raises the mark.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Report on stderr which edits fired (codebook entries and distances, neuron activations,
    /// memory hit and score, low-rank adapters).
    #[arg(long)]
    pub explain: bool,
    /// The scope model for bundles whose memories route with one (default $AMEND_SCOPE_MODEL,
    /// else all-minilm-l6-v2-q8_0.gguf in $AMEND_CACHE or ~/.cache/amend); opened only when a
    /// bundle needs it.
    #[arg(long)]
    pub scope_model: Option<PathBuf>,
    /// The engine: llama.cpp (CPU) or ONNX Runtime on an execution provider (--ep).
    #[arg(long, value_enum, default_value_t = crate::backends::BackendName::Llama)]
    pub backend: crate::backends::BackendName,
    #[command(flatten)]
    pub ort: crate::backends::OrtArgs,
}

/// Opens a model for the CLI with the given thread count.
pub fn open_model(path: &std::path::Path, threads: Option<usize>) -> anyhow::Result<Arc<Model>> {
    Model::open(
        path,
        ModelOptions {
            n_threads: threads,
            ..Default::default()
        },
    )
    .with_context(|| format!("opening model {}", path.display()))
}

/// Verifies the bundles into a live edit set (`None` without bundles).
fn load_edits(args: &Args) -> anyhow::Result<Option<Arc<amend_edits::EditSet>>> {
    if args.bundles.is_empty() {
        return Ok(None);
    }
    Ok(Some(crate::keys::load_edit_set(
        &args.model,
        &args.bundles,
        &args.pubkeys,
        args.state.as_deref(),
    )?))
}

/// Attaches the edit set to the session (pinned per request), with the scope model its
/// memories need.
fn apply_edits(
    session: &mut dyn amend_runtime::Backend,
    set: Option<Arc<amend_edits::EditSet>>,
    args: &Args,
) -> anyhow::Result<()> {
    let Some(set) = set else {
        return Ok(());
    };
    let mut scope = None;
    for ab in set.snapshot().bundles.iter() {
        // The scope model on its default one thread, whatever --threads gives the base model.
        crate::eval::scope_for(&ab.bundle, args.scope_model.as_deref(), None, &mut scope)?;
    }
    if let (Some(p), None) = (&args.scope_model, &scope) {
        // Opened only when a bundle routes with it: say so, or a wrong path passes unseen.
        eprintln!(
            "note: --scope-model {} not used: no bundle given has memories that route with a scope model",
            p.display()
        );
    }
    session.set_scope_model(scope)?;
    session.set_edit_set(Some(set))?;
    Ok(())
}

/// `--explain`: one line per thing that fired (or was looked up), on stderr.
pub fn print_explain(ex: &amend_runtime::Explain) {
    let id = |e: &Option<String>| e.clone().unwrap_or_else(|| "-".into());
    for e in &ex.expired {
        eprintln!(
            "explain: bundle {} EXPIRED at {} (now {}): removed, no longer applied",
            e.bundle, e.expires, e.now
        );
    }
    for u in &ex.unverified {
        // The record lists this backend when some of its edits failed the check there.
        if u.verified.contains(&format!("{} ", u.backend)) {
            eprintln!(
                "explain: WARNING bundle {}: not every edit passed verification on {} (verified \
                 on {}): the failed ones may miss here",
                u.bundle, u.backend, u.verified
            );
        } else {
            eprintln!(
                "explain: WARNING bundle {} was not verified on {} (verified on {}): its edits \
                 may miss here",
                u.bundle, u.backend, u.verified
            );
        }
    }
    if let Some(m) = &ex.memory {
        eprintln!(
            "explain: memory {} edit {} record {} score {:.4} threshold {:.4} {}",
            m.bundle,
            id(&m.edit_id),
            m.record,
            m.score,
            m.threshold,
            match (m.in_scope, &m.answer) {
                (true, Some(_)) => "IN SCOPE (answered)",
                (true, None) => "IN SCOPE (counterfactual prompt)",
                _ => "out of scope",
            }
        );
        if let Some(a) = &m.answer {
            eprintln!("explain: memory answer {a:?}");
        }
        match &m.scope_terms {
            Some(t @ amend_runtime::ScopeTerms {
                head: Some((logit, threshold)),
                ..
            }) => {
                eprintln!(
                    "explain: scope model: pooled {:.4} subject {:.4} relation {:.4}; scope head logit {:.3} (threshold {:.3}); {} candidate(s) in scope",
                    t.pooled, t.subject, t.relation, logit, threshold, t.n_in_scope
                );
            }
            Some(t) => eprintln!(
                "explain: scope model: pooled {:.4} subject {:.4} (threshold {:.4}) relation {:.4} (threshold {:.4}); {} candidate(s) in scope",
                t.pooled, t.subject, t.subject_threshold, t.relation, t.relation_threshold, t.n_in_scope
            ),
            None => {}
        }
        if let Some(t) = &m.scope_terms {
            if let Some((record, query)) = &t.groups {
                let how = match t.vote {
                    Some(v) => format!("voted {v:+.1} on the head's logit"),
                    None => "decided".to_string(),
                };
                eprintln!(
                    "explain: relation groups {how}: the record's relation is {record:?}, the query's {}",
                    query.as_deref().map_or("none (no template close enough)".to_string(), |q| format!("{q:?}"))
                );
            }
        }
    }
    for c in &ex.codebook {
        eprintln!(
            "explain: codebook {} layer {} entry {} (edit {}) at pos {}: distance {:.4} radius {:.4} {}",
            c.bundle,
            c.layer,
            c.entry,
            id(&c.edit_id),
            c.pos,
            c.distance,
            c.radius,
            if c.replaced { "REPLACED" } else { "no hit" }
        );
    }
    for n in &ex.neurons {
        eprintln!(
            "explain: neuron {} layer {} #{} (edit {}) fired at {} position(s), max activation {:.4}",
            n.bundle,
            n.layer,
            n.neuron,
            id(&n.edit_id),
            n.positions,
            n.max_activation
        );
    }
    for l in &ex.low_rank {
        eprintln!(
            "explain: low-rank {} ({} tensors, rank up to {}) scale {}",
            l.bundle, l.tensors, l.rank, l.scale
        );
    }
    if ex.generation.is_some()
        && ex.memory.is_none()
        && ex.codebook.is_empty()
        && ex.neurons.is_empty()
        && ex.low_rank.is_empty()
    {
        eprintln!("explain: no edit fired");
    }
}

/// Sampling defaults (llama.cpp's common ones), applied when the flags are not given.
const DEFAULT_TOP_K: i32 = 40;
const DEFAULT_TOP_P: f32 = 0.95;
const DEFAULT_MIN_P: f32 = 0.05;

/// The context a run asks for before the model is known.
const DEFAULT_CTX: u32 = 2048;

/// Flags checked before any work: ones that would be ignored in this combination are errors
/// (or, for sampling knobs that greedy decoding does not read, a note), and the sampling values
/// are checked as generation will.
fn check_flags(args: &Args) -> anyhow::Result<()> {
    args.ort.check_backend(args.backend)?;
    if args.bundles.is_empty() {
        for (flag, given) in [
            ("--pubkey", !args.pubkeys.is_empty()),
            ("--state", args.state.is_some()),
            ("--scope-model", args.scope_model.is_some()),
        ] {
            if given {
                anyhow::bail!("{flag} applies to bundles: it needs --bundle");
            }
        }
    }
    if args.prompt.is_empty() {
        anyhow::bail!("--prompt is empty; give the text to continue");
    }
    if args.temperature <= 0.0 {
        let unused: Vec<&str> = [
            ("--seed", args.seed.is_some()),
            ("--top-k", args.top_k.is_some()),
            ("--top-p", args.top_p.is_some()),
            ("--min-p", args.min_p.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, given)| given.then_some(f))
        .collect();
        if !unused.is_empty() {
            let verb = if unused.len() == 1 {
                "applies"
            } else {
                "apply"
            };
            eprintln!(
                "amend: note: {} only {verb} when sampling (--temp above 0); this run is greedy",
                unused.join(", ")
            );
        }
    }
    if args.repeat_penalty == 1.0 && args.repeat_last_n.is_some() {
        eprintln!("amend: note: --repeat-last-n only applies with a --repeat-penalty other than 1");
    }
    let ctx = args.ctx.unwrap_or(DEFAULT_CTX);
    generate_params(args, ctx as usize)
        .validate(ctx)
        .map_err(|e| {
            // The runtime names the parameter's field (`repeat_last_n 5000 is outside ...`):
            // say which flag gave it.
            let m = match &e {
                amend_runtime::RuntimeError::InvalidParams(m) => m.clone(),
                other => other.to_string(),
            };
            match SAMPLING_FLAGS
                .iter()
                .find(|(field, _)| m.starts_with(field))
            {
                Some((_, flag)) => anyhow::anyhow!("{flag}: {m}"),
                None => anyhow::anyhow!(
                    "sampling flags (--temp, --top-k, --top-p, --min-p, --repeat-penalty, \
                     --repeat-last-n, --seed, --stop): {m}"
                ),
            }
        })
}

/// The runtime's generation-parameter fields, as its messages begin, and the flags that set them.
const SAMPLING_FLAGS: [(&str, &str); 8] = [
    ("temperature", "--temp"),
    ("top_k", "--top-k"),
    ("top_p", "--top-p"),
    ("min_p", "--min-p"),
    ("repeat_penalty", "--repeat-penalty"),
    ("repeat_last_n", "--repeat-last-n"),
    ("seed", "--seed"),
    ("stop strings", "--stop"),
];

/// The context to open: `--ctx`, which must fit the model's trained context (a session would
/// cut it silently), else the default cut to it.
fn context_for(args: &Args, n_ctx_train: u32) -> anyhow::Result<u32> {
    match args.ctx {
        Some(c) if n_ctx_train > 0 && c > n_ctx_train => anyhow::bail!(
            "--ctx {c}: the model was trained on a context of {n_ctx_train} tokens; give at most \
             {n_ctx_train}"
        ),
        Some(c) => Ok(c),
        None if n_ctx_train > 0 => Ok(DEFAULT_CTX.min(n_ctx_train)),
        None => Ok(DEFAULT_CTX),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_flags(&args)?;
    if args.backend == crate::backends::BackendName::Ort {
        return run_ort(args);
    }
    // Bundles, keys and the version store first: a bad one is found before the model loads.
    let set = load_edits(&args)?;
    let model = open_model(&args.model, args.threads)?;
    let n_ctx_train = model.info().n_ctx_train;
    let mut session = Session::new(
        &model,
        SessionOptions {
            n_ctx: context_for(&args, n_ctx_train)?,
            n_threads: args.threads,
            ..Default::default()
        },
    )?;
    apply_edits(&mut session, set, &args)?;
    let n_ctx = session.n_ctx() as usize;
    let params = generate_params(&args, n_ctx);
    let result = to_stdout(|on| session.generate(&args.prompt, &params, on), n_ctx)?;
    if args.explain {
        print_explain(&session.explain());
    }
    log_result(&result, n_ctx, n_ctx_train as usize);
    Ok(())
}

/// `--backend ort`: the same generation on ONNX Runtime, the bundles' edits fed into the
/// graph's edit slots (the graph gets a slot for each of their edits, plus `--slots`).
fn run_ort(args: Args) -> anyhow::Result<()> {
    let set = load_edits(&args)?;
    let layout = match &set {
        Some(s) => amend_runtime::onnxruntime::SlotLayout::for_bundles(
            s.snapshot().bundles.iter().map(|b| &*b.bundle),
        )?,
        None => Default::default(),
    };
    let model = crate::backends::open_ort_with_slots(&args.model, &args.ort, args.threads, layout)?;
    let n_ctx_train = model.vocab().info().n_ctx_train;
    let mut session = amend_runtime::onnxruntime::OrtSession::new(
        &model,
        context_for(&args, n_ctx_train)? as usize,
    )?;
    apply_edits(&mut session, set, &args)?;
    let n_ctx = session.n_ctx();
    let params = generate_params(&args, n_ctx);
    let result = to_stdout(|on| session.generate(&args.prompt, &params, on), n_ctx)?;
    if args.explain {
        print_explain(&session.explain());
    }
    log_result(&result, n_ctx, n_ctx_train as usize);
    Ok(())
}

/// Runs a generation that streams its text to stdout (either backend), then ends the line.
fn to_stdout(
    generate: impl FnOnce(
        &mut dyn FnMut(&amend_runtime::TokenEvent<'_>) -> ControlFlow<()>,
    ) -> amend_runtime::Result<amend_runtime::GenerateOutput>,
    n_ctx: usize,
) -> anyhow::Result<amend_runtime::GenerateOutput> {
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let result = generate(&mut |ev| {
        if let Err(e) = out.write_all(ev.text.as_bytes()).and_then(|_| out.flush()) {
            // stdout closed (e.g. piped into `head`): stop generating.
            write_err = Some(e);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })
    .map_err(|e| match e {
        // The prompt alone does not fit: say which flag sets the room.
        amend_runtime::RuntimeError::ContextFull { needed, .. } => {
            anyhow::anyhow!("the prompt needs {needed} positions, more than --ctx {n_ctx} holds")
        }
        e => e.into(),
    })?;
    match write_err {
        None => {
            if let Err(e) = writeln!(out).and_then(|()| out.flush()) {
                crate::stdout_failed(e);
            }
        }
        // The text did not reach the reader: not a success (a full disk), or the end a
        // closed pipe asks for.
        Some(e) => crate::stdout_failed(e),
    }
    Ok(result)
}

fn log_result(result: &amend_runtime::GenerateOutput, n_ctx: usize, n_ctx_train: usize) {
    // Generation cut short by the context is not an error, but the user asked for more.
    if result.stop_reason == amend_runtime::StopReason::ContextFull {
        let hint = if n_ctx_train > 0 && n_ctx >= n_ctx_train {
            "the model's whole trained context; shorten the prompt".to_string()
        } else if n_ctx_train > 0 {
            format!("raise --ctx, up to {n_ctx_train}")
        } else {
            "raise --ctx".to_string()
        };
        eprintln!(
            "amend: stopped after {} generated token(s): the context of {n_ctx} tokens is full \
             ({hint})",
            result.n_generated
        );
    }
    let t = &result.timings;
    log::info!(
        "{} prompt tokens ({:.1} tok/s), {} generated ({:.1} tok/s), stop: {:?}",
        result.n_prompt,
        t.prefill_tok_s(),
        result.n_generated,
        t.decode_tok_s(),
        result.stop_reason
    );
}

/// The sampling parameters of `args` for a session of `n_ctx` tokens (the context asked for, or
/// less: sessions cap it at the model's trained context).
fn generate_params(args: &Args, n_ctx: usize) -> GenerateParams {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32)
            % u32::MAX // u32::MAX is llama.cpp's "random seed", refused as a seed
    });
    let params = GenerateParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k.unwrap_or(DEFAULT_TOP_K),
        top_p: args.top_p.unwrap_or(DEFAULT_TOP_P),
        min_p: args.min_p.unwrap_or(DEFAULT_MIN_P),
        repeat_penalty: args.repeat_penalty,
        // An explicit value out of range is the session's error; the default fits any context.
        repeat_last_n: args.repeat_last_n.unwrap_or_else(|| {
            GenerateParams::default()
                .repeat_last_n
                .min(n_ctx.min(i32::MAX as usize) as i32)
        }),
        seed,
        stop: args.stop.clone(),
        ..Default::default()
    };
    log::info!("sampling: temp {} seed {seed}", params.temperature);
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use amend_runtime::{testutil::write_tiny_model, Architecture};

    fn tiny_model_path(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("amend-cli-{}-{name}.gguf", std::process::id()));
        write_tiny_model(&p, Architecture::Llama, 3).unwrap();
        p
    }

    fn args(model: PathBuf) -> Args {
        Args {
            model,
            prompt: "hello world".into(),
            max_tokens: 4,
            temperature: 0.7,
            top_k: Some(40),
            top_p: Some(0.95),
            min_p: Some(0.05),
            repeat_penalty: 1.1,
            repeat_last_n: None,
            seed: Some(1),
            threads: Some(1),
            ctx: Some(128),
            stop: vec!["zz".into()],
            bundles: vec![],
            pubkeys: vec![],
            explain: false,
            state: None,
            scope_model: None,
            backend: crate::backends::BackendName::Llama,
            ort: Default::default(),
        }
    }

    #[test]
    fn runs_on_a_tiny_model() {
        run(args(tiny_model_path("run"))).unwrap();
    }

    /// Flags that would be ignored in this combination, and sampling values generation would
    /// refuse, are errors before the model opens (the model path does not exist here).
    #[test]
    fn flags_are_checked_before_any_work() {
        let base = || Args {
            temperature: 0.0,
            ..args(PathBuf::from("/nonexistent/model.gguf"))
        };
        let refused = |a: Args, needles: &[&str]| {
            let msg = format!("{:#}", run(a).unwrap_err());
            for n in needles {
                assert!(msg.contains(n), "{n:?} not in {msg}");
            }
            assert!(!msg.contains("model file not found"), "{msg}");
        };
        let ort = crate::backends::OrtArgs {
            ep: "qnn".into(),
            ..Default::default()
        };
        refused(Args { ort, ..base() }, &["--ep", "--backend ort"]);
        let ort = crate::backends::OrtArgs {
            ort_config: vec!["a=b".into()],
            ..Default::default()
        };
        refused(Args { ort, ..base() }, &["--ort-config", "--backend ort"]);
        refused(
            Args {
                pubkeys: vec!["k.pub".into()],
                ..base()
            },
            &["--pubkey", "needs --bundle"],
        );
        refused(
            Args {
                state: Some("s".into()),
                ..base()
            },
            &["--state", "needs --bundle"],
        );
        refused(
            Args {
                scope_model: Some("m.gguf".into()),
                ..base()
            },
            &["--scope-model", "needs --bundle"],
        );
        refused(
            Args {
                prompt: String::new(),
                ..base()
            },
            &["--prompt is empty"],
        );
        for t in [1e-40f32, 1e-9] {
            refused(
                Args {
                    temperature: t,
                    ..base()
                },
                &["--temp: temperature", "0 is greedy"],
            );
        }
        refused(
            Args {
                top_p: Some(0.0),
                ..base()
            },
            &["--top-p: top_p"],
        );
        // The flag given is named, not the whole group of sampling flags.
        let msg = format!(
            "{:#}",
            run(Args {
                repeat_last_n: Some(5000),
                ctx: Some(128),
                ..base()
            })
            .unwrap_err()
        );
        assert!(
            msg.starts_with("--repeat-last-n: repeat_last_n 5000") && !msg.contains("--seed"),
            "{msg}"
        );
    }

    /// `--ctx` past the model's trained context is refused (a session would cut it silently);
    /// without it the default is cut to fit.
    #[test]
    fn context_fits_the_model() {
        let a = |ctx| Args {
            ctx,
            ..args(PathBuf::from("m.gguf"))
        };
        assert_eq!(context_for(&a(None), 512).unwrap(), 512);
        assert_eq!(context_for(&a(None), 32768).unwrap(), DEFAULT_CTX);
        assert_eq!(context_for(&a(Some(512)), 512).unwrap(), 512);
        let e = context_for(&a(Some(1000)), 512).unwrap_err().to_string();
        assert!(e.contains("--ctx 1000") && e.contains("at most 512"), "{e}");
        let p = tiny_model_path("ctx");
        let e = format!(
            "{:#}",
            run(Args {
                ctx: Some(100_000),
                ..args(p)
            })
            .unwrap_err()
        );
        assert!(e.contains("--ctx 100000"), "{e}");
    }

    #[test]
    fn missing_model_is_a_clear_error() {
        let e = run(args(PathBuf::from("/nonexistent/model.gguf"))).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("model file not found"), "{msg}");
    }
}
