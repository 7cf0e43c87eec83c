//! `amend compile`: edit requests -> a signed bundle, trained on the model the device runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::locate::{self, TraceConfig};
use amend_compiler::methods::median;
use amend_compiler::{BundleIdentity, Compiler, Hparams, Method};
use amend_edits::bundle::Bundle;
use amend_edits::keys::{signing_key_from_file_bytes, TrustStore};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file (the one the device runs).
    #[arg(long, env = "AMEND_MODEL")]
    model: PathBuf,
    /// grace | tpatcher | rome | memit | lora | serac
    #[arg(long)]
    method: String,
    /// Edit requests: KnowEdit/EasyEdit JSON or JSONL of {prompt, target}.
    #[arg(long)]
    edits: PathBuf,
    /// Input format: auto, knowedit or jsonl.
    #[arg(long, default_value = "auto")]
    format: String,
    /// The bundle to write.
    #[arg(long)]
    out: PathBuf,
    /// PREFIX.key written by `amend keygen`: signs the bundle.
    #[arg(long)]
    key: PathBuf,
    /// The layer to edit: an index, or `auto` for the layer causal tracing recommends on the
    /// records (see `amend locate`). Default: the method's, from the hyperparameters.
    #[arg(long)]
    layer: Option<LayerArg>,
    /// With `--layer auto`: how many records (those with a subject) are traced.
    #[arg(long, default_value_t = 4)]
    auto_records: usize,
    /// llama.cpp threads for `--layer auto`'s tracing (default: all cores; 1 is much faster on
    /// a machine other work keeps busy, where llama.cpp's thread pool spin-waits).
    #[arg(long)]
    threads: Option<usize>,
    /// Compile on top of this bundle (signed by --key): the output is its next version.
    #[arg(long)]
    base_bundle: Option<PathBuf>,
    /// A TOML file overriding the model's default hyperparameters.
    #[arg(long)]
    hparams: Option<PathBuf>,
    /// Override one hyperparameter: --set grace.lr=4 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Bundle id and channel written into the manifest.
    #[arg(long, default_value = "amend-edits")]
    bundle_id: String,
    #[arg(long, default_value = "default")]
    channel: String,
    /// Print the hyperparameters in effect and exit.
    #[arg(long)]
    print_hparams: bool,
    /// The scope model serac's memories route with (a `bert` GGUF; default
    /// $AMEND_SCOPE_MODEL or ~/.cache/amend/all-minilm-l6-v2-q8_0.gguf, made by
    /// scripts/fetch-scope-model.sh).
    #[arg(long)]
    scope_model: Option<PathBuf>,
    /// Hand the records' rephrase, locality and portability prompts to the compiler (serac
    /// calibrates on them). Off by default: they are the test set (docs/eval.md).
    #[arg(long)]
    use_probes: bool,
}

/// `--layer`: an index or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LayerArg {
    Index(usize),
    Auto,
}

impl std::str::FromStr for LayerArg {
    type Err = String;
    fn from_str(s: &str) -> Result<LayerArg, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(LayerArg::Auto);
        }
        s.parse()
            .map(LayerArg::Index)
            .map_err(|_| format!("{s:?} is neither a layer index nor `auto`"))
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Everything that can be checked cheaply is checked before the model is loaded.
    let method: Method = args.method.parse()?;
    let format: DataFormat = args.format.parse().context("--format")?;
    if args.layer == Some(LayerArg::Auto) {
        if method == Method::Serac {
            bail!("--layer auto: serac's layer is its embedder's, which causal tracing does not choose; give an index");
        }
        if args.auto_records == 0 {
            bail!("--auto-records must be at least 1");
        }
    }
    let key_bytes =
        amend_edits::fsutil::read_regular(&args.key, amend_edits::fsutil::MAX_KEY_FILE_LEN)
            .with_context(|| "--key")?;
    let key = signing_key_from_file_bytes(&key_bytes)
        .map_err(|e| anyhow::anyhow!("--key {}: {e}", args.key.display()))?;
    let mut records = dataset::load(&args.edits, format)
        .with_context(|| format!("--edits {}", args.edits.display()))?;
    if !args.use_probes {
        // The honest protocol: the compiler sees only the edit requests.
        for r in &mut records {
            r.rephrase_prompts.clear();
            r.locality.clear();
            r.portability.clear();
        }
    }
    let base_bytes = match &args.base_bundle {
        Some(p) => Some(amend_edits::bundle::read_file(p).with_context(|| "--base-bundle")?),
        None => None,
    };
    let trust = TrustStore::with_key(key.verifying_key());
    // Cheap checks before the model loads: the base verifies and no id is used twice.
    let base = match base_bytes {
        Some(b) => Some(
            Bundle::open(b, &trust)
                .map_err(|e| anyhow::anyhow!("--base-bundle: {e} (it must be signed by --key)"))?,
        ),
        None => None,
    };
    amend_compiler::methods::check_unique_ids(&records, base.as_ref())?;

    let t0 = Instant::now();
    let mut compiler =
        Compiler::open(&args.model).with_context(|| format!("--model {}", args.model.display()))?;
    let hp = Hparams::resolve(compiler.fwd.cfg.arch, args.hparams.as_deref(), &args.set)?;
    if args.print_hparams {
        println!("{}", toml::to_string_pretty(&hp)?);
        return Ok(());
    }
    let layer = match args.layer {
        None => None,
        Some(LayerArg::Index(l)) => Some(l),
        Some(LayerArg::Auto) => Some(auto_layer(
            &compiler,
            &records,
            args.auto_records,
            args.threads,
        )?),
    };
    if method == Method::Serac && hp.serac.embedder == "scope" {
        let path = args
            .scope_model
            .clone()
            .or_else(amend_runtime::default_scope_model_path)
            .context("--scope-model: no default path (HOME unset)")?;
        let scope = amend_runtime::ScopeModel::open(&path, args.threads).with_context(|| {
            format!(
                "--scope-model {} (make it with scripts/fetch-scope-model.sh)",
                path.display()
            )
        })?;
        compiler.scope_model = Some(scope);
    }
    eprintln!(
        "loaded {} ({}) in {:.1} s; {} edit(s), method {}",
        args.model.display(),
        compiler.fwd.cfg.arch.name(),
        t0.elapsed().as_secs_f64(),
        records.len(),
        method.name()
    );

    // Without a terminal (CI, a log file, nohup) the bar draws nothing: print one log line per
    // finished edit instead.
    let log_lines = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (n_records, mut n_done) = (records.len(), 0usize);
    let bar = crate::progress_bar(records.len() as u64, "edits");
    let identity = BundleIdentity {
        bundle_id: args.bundle_id.clone(),
        channel: args.channel.clone(),
        version: None,
        expires: u64::MAX,
    };
    let out = compiler.compile(
        method,
        &records,
        &hp,
        layer,
        base.as_ref(),
        &identity,
        &mut |p| {
            bar.set_message(format!("{} step {} loss {:.3}", p.id, p.step, p.loss));
            if p.done {
                bar.inc(1);
                n_done += 1;
                if log_lines {
                    eprintln!(
                        "compile: {n_done}/{n_records} edit {} done: {} steps, loss {:.3} [{:.1} s]",
                        p.id,
                        p.step,
                        p.loss,
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
        },
    );
    bar.finish_and_clear();
    let out = out?;

    let bytes = out
        .builder
        .build_signed(&key)
        .map_err(|e| anyhow::anyhow!("building the bundle: {e}"))?;
    // The compiler checks its own output with the reader every device uses, before writing:
    // a bundle that no verifier accepts is never signed onto disk.
    Bundle::from_bytes(bytes.as_slice(), &trust).map_err(|e| {
        anyhow::anyhow!(
            "the compiled bundle does not verify ({e}); nothing was written to {}",
            args.out.display()
        )
    })?;
    write_atomic(&args.out, bytes.as_slice())?;
    if let Some(sc) = out.calibration.as_ref().and_then(|c| c.scope.as_ref()) {
        println!(
            "serac scope model: subject threshold {:.4}, relation threshold {:.4}, pooled floor {:.2}: {}/{} synthesized hard negatives rejected{}",
            sc.subject_threshold,
            sc.relation_threshold,
            out.calibration.as_ref().map_or(0.0, |c| c.threshold),
            sc.rejected.0,
            sc.rejected.1,
            if sc.capped { " (a threshold hit its cap)" } else { "" }
        );
    } else if let Some(cal) = &out.calibration {
        println!(
            "serac scope threshold {:.4} (cosine): rephrases in scope {}/{}, locality prompts out of scope {}/{}{}",
            cal.threshold,
            cal.rephrases_in.0,
            cal.rephrases_in.1,
            cal.locality_out.0,
            cal.locality_out.1,
            if cal.separable { "" } else { " (not separable: accuracy-maximizing threshold)" }
        );
    }
    if let Some(lora) = &out.gguf_lora {
        let p = args.out.with_extension("lora.gguf");
        write_atomic(&p, lora)?;
        println!("wrote {} (GGUF-LoRA for llama.cpp)", p.display());
    }

    let times: Vec<f64> = out.reports.iter().map(|r| r.seconds).collect();
    let losses: Vec<f64> = out.reports.iter().map(|r| r.loss as f64).collect();
    let ok = out.reports.iter().filter(|r| r.success).count();
    println!(
        "wrote {} ({} bytes): {} edit(s) with {}, {}/{} reach their target (teacher-forced, compiler forward)",
        args.out.display(),
        bytes.len(),
        out.reports.len(),
        method.name(),
        ok,
        out.reports.len()
    );
    println!(
        "time per edit: median {:.2} s (total {:.1} s); final loss: median {:.3}, max {:.3}",
        median(&times),
        times.iter().sum::<f64>(),
        median(&losses),
        losses.iter().cloned().fold(0.0, f64::max)
    );
    for r in out.reports.iter().filter(|r| !r.success) {
        println!(
            "  not reached: {} (loss {:.3} after {} steps)",
            r.id, r.loss, r.steps
        );
    }
    Ok(())
}

/// `--layer auto`: the layer whose FFN output at the subject's last token restores the most of
/// p(answer) under causal tracing, averaged over the first `max_records` records with a subject.
/// That is where ROME-style methods write; GRACE and T-Patcher key on the last prompt token, for
/// which a later layer usually separates facts better (docs/eval.md compares the two).
fn auto_layer(
    compiler: &Compiler,
    records: &[dataset::EditRecord],
    max_records: usize,
    n_threads: Option<usize>,
) -> anyhow::Result<usize> {
    let t0 = Instant::now();
    let config = TraceConfig {
        samples: 2,
        n_threads,
        ..Default::default()
    };
    let l = locate::recommend_layer(&compiler.runtime, records, max_records, &config).map_err(
        |e| match e {
            locate::LocateError::NoRecords => anyhow::anyhow!(
                "--layer auto: no edit record has a `subject` inside its prompt to trace; give --layer N"
            ),
            e => anyhow::anyhow!("--layer auto: {e}"),
        },
    )? as usize;
    eprintln!(
        "--layer auto: causal tracing on {} record(s) recommends layer {l} ({:.1} s)",
        records
            .iter()
            .filter(|r| r.subject_span().is_some())
            .count()
            .min(max_records),
        t0.elapsed().as_secs_f64()
    );
    Ok(l)
}

/// Write to a temporary file next to `path`, then rename: a failure leaves nothing half-written.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    amend_edits::fsutil::write_atomic(path, bytes, None)
        .with_context(|| format!("writing {}", path.display()))
}
