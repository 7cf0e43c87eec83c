//! `amend eval`: the KnowEdit metrics for the base model and each bundle, side by side.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::eval::{self, EvalConfig, Summary, Variant, VariantReport};
use amend_runtime::Model;
use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model the bundles were compiled for.
    #[arg(long, env = "AMEND_MODEL")]
    model: PathBuf,
    /// A signed patch bundle to evaluate (repeat for several, compared side by side).
    #[arg(long = "bundle")]
    bundles: Vec<PathBuf>,
    /// Public key the bundles must be signed with (required with --bundle).
    #[arg(long)]
    pubkey: Option<PathBuf>,
    /// Edit requests: KnowEdit/EasyEdit JSON or JSONL.
    #[arg(long)]
    data: PathBuf,
    /// Input format: auto, knowedit or jsonl.
    #[arg(long, default_value = "auto")]
    data_format: DataFormat,
    /// Write the summary JSON here (one bundle: its summary; several: an object by name).
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Write per-record results (with the generated texts) as JSONL here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the markdown table here (it is always printed on stdout).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Evaluate only the first N records.
    #[arg(long)]
    limit: Option<usize>,
    /// Greedy tokens generated per prompt for fluency and generation metrics.
    #[arg(long, default_value_t = 100)]
    gen_tokens: usize,
    /// Threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut records = dataset::load(&args.data, args.data_format)
        .with_context(|| format!("reading edit requests from {}", args.data.display()))?;
    if let Some(n) = args.limit {
        if n == 0 {
            anyhow::bail!("--limit must be at least 1");
        }
        records.truncate(n);
    }
    if !args.bundles.is_empty() && args.pubkey.is_none() {
        anyhow::bail!("--pubkey is required with --bundle (bundles are verified before use)");
    }
    let model = Model::open(&args.model, Default::default())
        .with_context(|| format!("loading model {}", args.model.display()))?;

    let mut variants = vec![Variant::base()];
    for path in &args.bundles {
        variants.push(bundle_variant(
            path,
            args.pubkey.as_deref().unwrap_or(Path::new("")),
        )?);
    }
    let config = EvalConfig {
        gen_tokens: args.gen_tokens,
        n_threads: args.threads,
        ..Default::default()
    };

    let total = (records.len() * variants.len()) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:>12} [{bar:30}] {pos}/{len} records  {elapsed} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let reports = eval::evaluate(&model, &records, &mut variants, &config, |p| {
        bar.set_message(p.variant.to_string());
        bar.set_position(p.done as u64);
    })?;
    bar.finish_and_clear();
    let elapsed = started.elapsed();

    if let Some(path) = &args.out {
        write_records(path, &reports)?;
    }
    if let Some(path) = &args.summary {
        let value = summary_json(&reports);
        std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let rows: Vec<(String, Summary)> = reports
        .iter()
        .map(|r| (r.name.clone(), r.summary.clone()))
        .collect();
    let table = eval::markdown_table(&rows);
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{table}");
    eprintln!(
        "evaluated {} records x {} variants in {:.1} s",
        records.len(),
        reports.len(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// The summary file: the edited model's summary when one bundle was evaluated (the base model's
/// with none); with several bundles an object mapping each variant name (and "base") to one.
fn summary_json(reports: &[VariantReport]) -> serde_json::Value {
    match reports {
        [only] => serde_json::to_value(&only.summary).expect("serializable"),
        [_, edited] => serde_json::to_value(&edited.summary).expect("serializable"),
        _ => serde_json::Value::Object(
            reports
                .iter()
                .map(|r| {
                    (
                        r.name.clone(),
                        serde_json::to_value(&r.summary).expect("serializable"),
                    )
                })
                .collect(),
        ),
    }
}

fn write_records(path: &Path, reports: &[VariantReport]) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for report in reports {
        for r in &report.records {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")?;
        }
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A variant running the model with the bundle at `path` applied (verified against `pubkey`).
/// Its name is the bundle's file stem.
fn bundle_variant(path: &Path, _pubkey: &Path) -> anyhow::Result<Variant> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    if !path.exists() {
        anyhow::bail!("bundle {} not found", path.display());
    }
    // Applying bundles goes through the runtime's edit wiring, which is not available yet.
    anyhow::bail!(
        "cannot evaluate bundle `{name}`: applying bundles in the runtime is not wired yet"
    )
}
