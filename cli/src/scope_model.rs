//! `amend scope-model`: the scope model memories route with (all-MiniLM-L6-v2 as a bert GGUF).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::keys::esc;
use anyhow::Context;

use amend_compiler::scope_model::{self, WeightType};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Convert a sentence-transformers BERT checkpoint (config.json, tokenizer.json,
    /// model.safetensors) to a llama.cpp `bert` GGUF.
    Convert(ConvertArgs),
    /// The router alone: where each prompt of a data set routes with a bundle's scope-model
    /// memory (edit prompts and rephrases should reach their own edit, locality prompts
    /// nothing). Needs no base model.
    Route(RouteArgs),
    /// Train the scope head (an ensemble of small perceptrons over a query-record pair's
    /// features) on a labelled data set: positives are each record's prompt and rephrases,
    /// negatives its locality prompts and every other pair the router examines. The threshold
    /// is chosen on out-of-fold scores. Train on data you do not evaluate on.
    TrainHead(TrainHeadArgs),
    /// Tune the scope model: train low-rank factors on its top layers so that rephrases land
    /// nearer their prompt than the same subject under another relation (labelled records and
    /// a relation lexicon). `convert --tune` merges the factors. Train on data you do not
    /// evaluate on.
    Tune(TuneArgs),
}

#[derive(clap::Args)]
struct TuneArgs {
    /// The unzipped sentence-transformers checkpoint (as for `convert`).
    #[arg(long)]
    from: PathBuf,
    /// Labelled KnowEdit/EasyEdit JSON (rephrases, locality prompts); more than once for
    /// several sets.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// A relation lexicon (`name|template|...`) whose templates give more pairs: a file,
    /// "wikidata" (data/relation-groups-wikidata.txt, built in), "builtin"
    /// (data/relation-groups.txt, built in) or "none".
    #[arg(long, default_value = "wikidata")]
    lexicon: String,
    /// Records only reported on (rephrase-against-same-subject AUC), never trained on.
    #[arg(long)]
    validation: Vec<PathBuf>,
    /// The factors to write (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// The scope model whose tokenizer is used (default: the cached one).
    #[arg(long)]
    scope_model: Option<PathBuf>,
    // Counts are bounded here (they size allocations); --layers and --rank again against the
    // checkpoint's config.json before anything is loaded.
    /// Top layers adapted: 1..=the checkpoint's layer count.
    #[arg(long, default_value_t = amend_compiler::scope_tune::TuneOptions::default().layers,
          value_parser = count(1..=amend_compiler::scope_model::MAX_LAYERS))]
    layers: usize,
    /// Rank of the factors: 1..=the checkpoint's hidden size.
    #[arg(long, default_value_t = amend_compiler::scope_tune::TuneOptions::default().rank,
          value_parser = count(1..=amend_compiler::scope_model::MAX_EMBD))]
    rank: usize,
    /// Passes over the training pairs: 1..=1000.
    #[arg(long, default_value_t = amend_compiler::scope_tune::TuneOptions::default().epochs,
          value_parser = count(1..=amend_compiler::scope_tune::MAX_EPOCHS as u64))]
    epochs: usize,
    /// Learning rate: finite, > 0.
    #[arg(long, default_value_t = amend_compiler::scope_tune::TuneOptions::default().lr, value_parser = positive)]
    lr: f64,
    /// InfoNCE temperature: finite, > 0.
    #[arg(long, default_value_t = amend_compiler::scope_tune::TuneOptions::default().temperature, value_parser = positive_f32)]
    temperature: f32,
    #[arg(long, default_value_t = amend_compiler::scope_tune::TuneOptions::default().lexicon_items,
          value_parser = count(0..=amend_compiler::scope_tune::MAX_LEXICON_ITEMS as u64))]
    lexicon_items: usize,
    #[arg(long, default_value_t = amend_compiler::scope_tune::TuneOptions::default().seed)]
    seed: u64,
}

/// A count flag in `range` (`usize`).
fn count(range: impl std::ops::RangeBounds<u64>) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(range)
}

fn float(s: &str) -> Result<f64, String> {
    s.parse::<f64>().map_err(|e| format!("{s:?}: {e}"))
}

/// A rate or temperature: finite and > 0 (NaN or a negative rate trains NaN factors).
fn positive(s: &str) -> Result<f64, String> {
    match float(s)? {
        x if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s} is not a finite number > 0")),
    }
}

fn positive_f32(s: &str) -> Result<f32, String> {
    match positive(s)? as f32 {
        x if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s} is not a finite f32 > 0")),
    }
}

/// A penalty: finite and >= 0.
fn non_negative(s: &str) -> Result<f64, String> {
    match float(s)? {
        x if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s} is not a finite number >= 0")),
    }
}

/// A percentage in (0, 100]: 0 or less lets every pair in scope, above 100 none.
fn percent(s: &str) -> Result<f64, String> {
    match float(s)? {
        x if x > 0.0 && x <= 100.0 => Ok(x),
        _ => Err(format!("{s} is not a percentage in (0, 100]")),
    }
}

fn load_sets(
    paths: &[PathBuf],
    flag: &str,
) -> anyhow::Result<Vec<amend_compiler::dataset::EditRecord>> {
    load_sets_hashed(paths, flag).map(|(records, _)| records)
}

/// [`load_sets`], and one `sha256  file name` line per file (as `sha256sum` prints them).
fn load_sets_hashed(
    paths: &[PathBuf],
    flag: &str,
) -> anyhow::Result<(Vec<amend_compiler::dataset::EditRecord>, String)> {
    let mut records = Vec::new();
    let mut lines = String::new();
    for d in paths {
        let (r, digest) = amend_compiler::dataset::load_hashed(d, Default::default())
            .with_context(|| format!("{flag} {}", d.display()))?;
        records.extend(r);
        lines += &format!("{}  {}\n", amend_edits::keys::to_hex(&digest), file_name(d));
    }
    Ok((records, lines))
}

/// How a shipped file was made, for its metadata ([`amend_compiler::artifact`]): the command
/// `amend VERSION scope-model SUB` with the files by name (a path would carry this machine's
/// directories) and every option as a flag, and the training sets' sha256 lines.
fn recipe(
    sub: &str,
    files: &[(&str, &[PathBuf])],
    options: &[(&str, String)],
    data_sha256: String,
) -> std::collections::BTreeMap<String, String> {
    let mut command = format!("amend {} scope-model {sub}", env!("CARGO_PKG_VERSION"));
    for (flag, paths) in files {
        for p in *paths {
            command += &format!(" {flag} {}", file_name(p));
        }
    }
    for (flag, value) in options {
        command += &format!(" {flag} {value}");
    }
    use amend_compiler::artifact::{DATA_SHA256, TRAINED_WITH};
    [(TRAINED_WITH, command), (DATA_SHA256, data_sha256)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// A path's file name, lossily (for records, not for opening).
fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or(p.as_os_str())
        .to_string_lossy()
        .into_owned()
}

/// `--scope-model`, else the default path (`None`: no HOME).
fn scope_path(path: Option<&PathBuf>) -> Option<PathBuf> {
    path.cloned()
        .or_else(amend_runtime::default_scope_model_path)
}

/// `--from`, checked to be a directory, and the checkpoint files in it that a command reads
/// (outputs must not replace them). The library's "cannot read FILE/config.json: Not a
/// directory" does not say what --from is meant to name, so that is said first.
fn checkpoint_inputs(from: &Path) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    match std::fs::metadata(from) {
        Ok(md) if md.is_dir() => {}
        Ok(md) => anyhow::bail!(
            "--from {}: that is a {}, not a directory; give the unzipped checkpoint's directory \
             (config.json, tokenizer.json, model.safetensors)",
            from.display(),
            if md.is_file() {
                "file"
            } else {
                amend_edits::fsutil::kind_name(&md.file_type())
            }
        ),
        Err(e) => return Err(e).with_context(|| format!("--from {}", from.display())),
    }
    Ok([
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ]
    .iter()
    .map(|f| ("--from", from.join(f)))
    .collect())
}

/// An output that must not be any of the command's input files (nor a link to one): each is
/// written by renaming over the path, which would replace the data, a bundle, a key, a
/// checkpoint file or the scope model with the output.
fn check_out_apart(flag: &str, out: &Path, inputs: &[(&str, PathBuf)]) -> anyhow::Result<()> {
    let inputs: Vec<(&str, &Path)> = inputs.iter().map(|(f, p)| (*f, p.as_path())).collect();
    crate::check_outputs_apart(&[(flag, out)], &inputs)
}

/// The scope model at `path`, or the default one.
fn open_scope(
    path: Option<PathBuf>,
    threads: Option<usize>,
) -> anyhow::Result<std::sync::Arc<amend_runtime::ScopeModel>> {
    let path = path
        .or_else(amend_runtime::default_scope_model_path)
        .context("--scope-model: no default path (HOME unset)")?;
    amend_runtime::ScopeModel::open(&path, threads)
        .with_context(|| format!("--scope-model {}", path.display()))
}

fn tune(a: TuneArgs) -> anyhow::Result<()> {
    use amend_compiler::scope_tune;
    crate::check_output_path("--out", &a.out, true)?;
    let mut inputs = checkpoint_inputs(&a.from)?;
    inputs.extend(a.data.iter().map(|d| ("--data", d.clone())));
    inputs.extend(a.validation.iter().map(|d| ("--validation", d.clone())));
    inputs.push(("--lexicon", PathBuf::from(&a.lexicon)));
    inputs.extend(scope_path(a.scope_model.as_ref()).map(|p| ("--scope-model", p)));
    check_out_apart("--out", &a.out, &inputs)?;
    let o = scope_tune::TuneOptions {
        layers: a.layers,
        rank: a.rank,
        epochs: a.epochs,
        lr: a.lr,
        temperature: a.temperature,
        lexicon_items: a.lexicon_items,
        seed: a.seed,
        ..Default::default()
    };
    // Against the checkpoint's sizes before the data, the scope model or the weights load.
    let cfg = amend_compiler::scope_model::BertConfig::read(&a.from)
        .with_context(|| format!("--from {}", a.from.display()))?;
    o.check(&cfg)?;
    let (records, data_sha256) = load_sets_hashed(&a.data, "--data")?;
    let validation = load_sets(&a.validation, "--validation")?;
    let lexicon = amend_compiler::methods::relation_groups::Lexicon::load(&a.lexicon)
        .with_context(|| format!("--lexicon {}", a.lexicon))?;
    let scope = open_scope(a.scope_model.clone(), Some(1))?;
    let (enc, rep) = scope_tune::tune(
        &a.from,
        &scope,
        &records,
        lexicon.as_ref(),
        &validation,
        &o,
        &mut |m| eprintln!("{m}"),
    )?;
    // A lexicon file is named by its file name; "wikidata", "builtin" and "none" as given.
    let lexicon_name = file_name(Path::new(&a.lexicon));
    let provenance = recipe(
        "tune",
        &[("--data", &a.data)],
        &[
            ("--lexicon", lexicon_name),
            ("--layers", a.layers.to_string()),
            ("--rank", a.rank.to_string()),
            ("--epochs", a.epochs.to_string()),
            ("--lr", a.lr.to_string()),
            ("--temperature", a.temperature.to_string()),
            ("--lexicon-items", a.lexicon_items.to_string()),
            ("--seed", a.seed.to_string()),
        ],
        data_sha256,
    );
    crate::compile::write_atomic(
        &a.out,
        &scope_tune::factors_to_bytes(&enc.bert, provenance)?,
    )?;
    println!(
        "wrote {}: rank {} on the top {} layers; {} items, {} texts, {} steps, last loss {:.4}; {:.0} s",
        a.out.display(),
        a.rank,
        a.layers,
        rep.items,
        rep.texts,
        rep.steps,
        rep.last_loss,
        rep.seconds
    );
    Ok(())
}

#[derive(clap::Args)]
struct TrainHeadArgs {
    /// KnowEdit/EasyEdit JSON or JSONL with subjects, rephrases and locality prompts; give it
    /// more than once to train on several sets (their records in the order given).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// The head to write (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// The scope model (default $AMEND_SCOPE_MODEL, else all-minilm-l6-v2-q8_0.gguf in
    /// $AMEND_CACHE or ~/.cache/amend).
    #[arg(long)]
    scope_model: Option<PathBuf>,
    /// Threads for the scope model (default 1).
    #[arg(long, value_parser = crate::parse_threads)]
    threads: Option<usize>,
    /// Ensemble members: 1..=16 (what a bundle's reader accepts).
    #[arg(long, default_value_t = amend_compiler::methods::scope_head::TrainOptions::default().members,
          value_parser = count(1..=amend_edits::bundle::MAX_SCOPE_HEAD_MEMBERS as u64))]
    members: usize,
    /// Hidden units per member: 1..=1024 (what a bundle's reader accepts).
    #[arg(long, default_value_t = amend_compiler::methods::scope_head::TrainOptions::default().hidden,
          value_parser = count(1..=amend_edits::bundle::MAX_SCOPE_HEAD_HIDDEN as u64))]
    hidden: usize,
    /// Passes over the labelled pairs: 1..=10000.
    #[arg(long, default_value_t = amend_compiler::methods::scope_head::TrainOptions::default().epochs,
          value_parser = count(1..=amend_compiler::methods::scope_head::MAX_EPOCHS as u64))]
    epochs: usize,
    /// L2 penalty: finite, >= 0.
    #[arg(long, default_value_t = amend_compiler::methods::scope_head::TrainOptions::default().l2, value_parser = non_negative)]
    l2: f64,
    /// Records the threshold is chosen on instead of out-of-fold scores (more than once for
    /// several sets): data neither the head nor the scope model's tune was trained on. Skips
    /// the folds.
    #[arg(long)]
    calibrate: Vec<PathBuf>,
    /// Locality (%) the threshold must reach, out of fold or on the calibration records:
    /// in (0, 100].
    #[arg(long, default_value_t = amend_compiler::methods::scope_head::TrainOptions::default().target_locality, value_parser = percent)]
    target_locality: f64,
    #[arg(long, default_value_t = amend_compiler::methods::scope_head::TrainOptions::default().seed)]
    seed: u64,
}

fn train_head(a: TrainHeadArgs) -> anyhow::Result<()> {
    use amend_compiler::methods::scope_head;
    crate::check_output_path("--out", &a.out, true)?;
    let mut inputs: Vec<(&str, PathBuf)> = a.data.iter().map(|d| ("--data", d.clone())).collect();
    inputs.extend(a.calibrate.iter().map(|d| ("--calibrate", d.clone())));
    inputs.extend(scope_path(a.scope_model.as_ref()).map(|p| ("--scope-model", p)));
    check_out_apart("--out", &a.out, &inputs)?;
    let o = scope_head::TrainOptions {
        members: a.members,
        hidden: a.hidden,
        epochs: a.epochs,
        l2: a.l2,
        target_locality: a.target_locality,
        seed: a.seed,
        ..Default::default()
    };
    o.check()?;
    let (records, data_sha256) = load_sets_hashed(&a.data, "--data")?;
    let (calibration, calibrate_sha256) = load_sets_hashed(&a.calibrate, "--calibrate")?;
    // Without --calibrate the trainer needs a record per fold; its own message names no flag
    // and comes after the scope model loads.
    if calibration.is_empty() && records.len() < o.folds {
        anyhow::bail!(
            "--data: {} record(s); train-head needs at least {} (the threshold's out-of-fold \
             check splits them into {} folds)",
            records.len(),
            o.folds,
            o.folds
        );
    }
    let scope = open_scope(a.scope_model.clone(), a.threads)?;
    let (mut head, rep) = scope_head::train(&scope, &records, &calibration, &o, &mut |m| {
        eprintln!("{m}")
    })?;
    head.provenance = recipe(
        "train-head",
        &[("--data", &a.data), ("--calibrate", &a.calibrate)],
        &[
            ("--members", o.members.to_string()),
            ("--hidden", o.hidden.to_string()),
            ("--epochs", o.epochs.to_string()),
            ("--l2", o.l2.to_string()),
            ("--target-locality", o.target_locality.to_string()),
            ("--seed", o.seed.to_string()),
        ],
        data_sha256,
    );
    if !a.calibrate.is_empty() {
        head.provenance
            .insert("calibrate_sha256".into(), calibrate_sha256);
    }
    crate::compile::write_atomic(&a.out, &head.to_bytes()?)?;
    println!(
        "wrote {}: {} members x {} hidden, threshold {:.3}; {} pairs ({} positive); {}: rephrase {:.1}, locality {:.1}; {:.0} s",
        a.out.display(),
        head.members,
        head.hidden,
        rep.threshold,
        rep.pairs,
        rep.positives,
        if rep.calibrated { "on the calibration records" } else { "out of fold" },
        rep.oof_rephrase,
        rep.oof_locality,
        rep.seconds
    );
    Ok(())
}

#[derive(clap::Args)]
struct RouteArgs {
    /// A bundle compiled with `--method serac` (scope model).
    #[arg(long)]
    bundle: PathBuf,
    /// Public key the bundle is signed with.
    #[arg(long)]
    pubkey: PathBuf,
    /// KnowEdit/EasyEdit JSON or JSONL: edit ids are the records' ids.
    #[arg(long)]
    data: PathBuf,
    /// The scope model (default $AMEND_SCOPE_MODEL, else all-minilm-l6-v2-q8_0.gguf in
    /// $AMEND_CACHE or ~/.cache/amend).
    #[arg(long)]
    scope_model: Option<PathBuf>,
    /// Threads for the scope model (default 1).
    #[arg(long, value_parser = crate::parse_threads)]
    threads: Option<usize>,
    /// Print every misrouted prompt.
    #[arg(long)]
    verbose: bool,
    /// Also write one JSON line per prompt (kind, own edit, the best candidate, its terms and
    /// score, in scope or not) for offline analysis.
    #[arg(long)]
    dump: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// The unzipped checkpoint directory.
    #[arg(long)]
    from: PathBuf,
    /// The GGUF to write.
    #[arg(long)]
    out: PathBuf,
    /// Weight type of the matrices: q8_0 or f16.
    #[arg(long = "type", default_value = "q8_0")]
    ty: String,
    /// Low-rank factors from `amend scope-model tune` to merge into the weights.
    #[arg(long)]
    tune: Option<PathBuf>,
}

/// Counts for one kind of prompt.
#[derive(Default)]
struct Tally {
    n: usize,
    own: usize,
    other: usize,
    out: usize,
    several: usize,
}

fn route(a: RouteArgs) -> anyhow::Result<()> {
    use amend_edits::bundle::Payload;
    if let Some(d) = &a.dump {
        crate::check_output_path("--dump", d, true)?;
        let mut inputs = vec![
            ("--bundle", a.bundle.clone()),
            ("--pubkey", a.pubkey.clone()),
            ("--data", a.data.clone()),
        ];
        inputs.extend(scope_path(a.scope_model.as_ref()).map(|p| ("--scope-model", p)));
        check_out_apart("--dump", d, &inputs)?;
    }
    let records = amend_compiler::dataset::load(&a.data, Default::default())
        .with_context(|| format!("--data {}", a.data.display()))?;
    let trust = crate::keys::trust_from(std::slice::from_ref(&a.pubkey))?;
    let bundle = crate::keys::open(&a.bundle, &trust)?;
    let mut slot = None;
    let scope = crate::eval::scope_for(&bundle, a.scope_model.as_deref(), a.threads, &mut slot)?
        .context("the bundle has no scope-model memory")?;
    let (p, n) = bundle
        .payloads()
        .iter()
        .enumerate()
        .find_map(|(p, pl)| matches!(pl, Payload::Memory(_)).then(|| (p, bundle.units(p))))
        .context("the bundle has no memory payload")?;
    let view = bundle.memory(p, 0..n).context("memory view")?;
    let mem = view
        .to_family()
        .map_err(|e| anyhow::anyhow!("memory payload: {e}"))?;
    let routing = mem.routing().context("the memory has no routing data")?;
    // Records the bundle holds no edit for can never route home: data that does not belong to
    // the bundle would print a table of zeros that reads like a broken router.
    let ids: std::collections::HashSet<&str> = (0..mem.len())
        .filter_map(|i| mem.record(i).map(|r| r.edit_id))
        .collect();
    let foreign = records
        .iter()
        .filter(|r| !ids.contains(r.id.as_str()))
        .count();
    if foreign == records.len() {
        anyhow::bail!(
            "--data {}: none of its {} record ids is an edit of the bundle (route the data the bundle was compiled from)",
            a.data.display(),
            records.len()
        );
    }
    if foreign > 0 {
        eprintln!(
            "warning: {foreign} of the {} records of --data are not edits of the bundle: their prompts cannot route home",
            records.len()
        );
    }
    match routing.head() {
        Some(h) => println!(
            "{} memories; scope head ({} x {}), threshold {:.3}",
            mem.len(),
            h.members(),
            h.hidden(),
            h.threshold()
        ),
        None => println!(
            "{} memories; pooled floor {:.3}, subject threshold {:.3}, relation threshold {:.3}",
            mem.len(),
            mem.threshold(),
            routing.subject_threshold(),
            routing.relation_threshold()
        ),
    }
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let t0 = std::time::Instant::now();
    let mut n_encodes = 0usize;
    // Collected, then written once through the CLI's atomic writer.
    let mut dump: Option<Vec<u8>> = a.dump.as_ref().map(|_| Vec::new());
    let mut check = |kind: &str, prompt: &str, own: &str| -> anyhow::Result<()> {
        let q = scope.query(prompt)?;
        n_encodes += 1;
        let hit = scope.route(&mem, &q);
        if let Some(w) = dump.as_mut() {
            use std::io::Write;
            let line = match &hit {
                Some(h) => serde_json::json!({
                    "kind": kind, "own": own, "prompt": prompt,
                    "best": mem.record(h.index).map_or("", |r| r.edit_id),
                    "pooled": h.pooled, "subject": h.subject, "relation": h.relation,
                    "score": h.score, "in_scope": h.in_scope,
                }),
                None => serde_json::json!({"kind": kind, "own": own, "prompt": prompt}),
            };
            writeln!(w, "{line}")?;
        }
        let t = tallies.entry(kind.to_string()).or_default();
        t.n += 1;
        let (verdict, id) = match hit {
            Some(h) if h.in_scope => {
                t.several += (h.n_in_scope > 1) as usize;
                let id = mem.record(h.index).map_or("", |r| r.edit_id);
                if id == own {
                    t.own += 1;
                    ("own", id)
                } else {
                    t.other += 1;
                    ("other", id)
                }
            }
            _ => {
                t.out += 1;
                ("out", "")
            }
        };
        let wanted = if kind.starts_with("locality") {
            "out"
        } else {
            "own"
        };
        if a.verbose && verdict != wanted {
            // A rephrase routed nowhere has no hit at all (no candidate): no terms to print.
            let Some(h) = hit else {
                println!("  {}: {verdict} (no candidate): {prompt:?}", esc(kind));
                return Ok(());
            };
            // Which rule spoke: the groups (record's / query's, "-" for none) and their vote.
            let groups = match (h.groups, routing.groups()) {
                (Some((rg, qg)), Some(g)) => format!(
                    " groups {}/{}{}",
                    g.name(rg),
                    qg.map_or("-", |q| g.name(q)),
                    h.vote.map_or(String::new(), |v| format!(" vote {v:+.1}"))
                ),
                _ => String::new(),
            };
            let (kind, id) = (esc(kind), esc(id));
            println!(
                "  {kind}: {verdict} {id} pooled {:.3} subject {:.3} relation {:.3} score {:.2}{groups} ({}): {prompt:?}",
                h.pooled,
                h.subject,
                h.relation,
                h.score,
                esc(mem.record(h.index).map_or("", |r| r.edit_id))
            );
        }
        Ok(())
    };
    for r in &records {
        check("edit prompt", &r.prompt, &r.id)?;
        for q in &r.rephrase_prompts {
            check("rephrase", q, &r.id)?;
        }
        for l in &r.locality {
            check(&format!("locality: {}", l.kind), &l.prompt, &r.id)?;
        }
    }
    let per = t0.elapsed().as_secs_f64() * 1e3 / n_encodes.max(1) as f64;
    if let (Some(path), Some(bytes)) = (&a.dump, &dump) {
        crate::compile::write_atomic(path, bytes)?;
    }
    println!("| prompts | n | own edit | another edit | out of scope | several in scope |");
    println!("|---|---|---|---|---|---|");
    let pct = |x: usize, n: usize| 100.0 * x as f64 / n.max(1) as f64;
    for (k, t) in &tallies {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            esc(k),
            t.n,
            pct(t.own, t.n),
            pct(t.other, t.n),
            pct(t.out, t.n),
            pct(t.several, t.n)
        );
    }
    println!(
        "scope check: {per:.2} ms per prompt (encode + lookup, {} memories)",
        mem.len()
    );
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Route(a) => route(a),
        Command::TrainHead(a) => train_head(a),
        Command::Tune(a) => tune(a),
        Command::Convert(a) => {
            let ty: WeightType = a.ty.parse().map_err(|e| anyhow::anyhow!("--type {e}"))?;
            crate::check_output_path("--out", &a.out, true)?;
            let mut inputs = checkpoint_inputs(&a.from)?;
            inputs.extend(a.tune.iter().map(|t| ("--tune", t.clone())));
            check_out_apart("--out", &a.out, &inputs)?;
            let c = match scope_model::convert_checked(&a.from, ty, a.tune.as_deref()) {
                Ok(c) => c,
                Err(scope_model::ConvertError::Tune(m)) => {
                    let t = a.tune.as_deref().unwrap_or(std::path::Path::new(""));
                    // A read error names the file already.
                    if m.starts_with(&t.display().to_string()) {
                        anyhow::bail!("--tune {m}")
                    }
                    anyhow::bail!("--tune {}: {m}", t.display())
                }
                Err(scope_model::ConvertError::Checkpoint(e)) => {
                    return Err(e).with_context(|| format!("--from {}", a.from.display()))
                }
            };
            // Checked before the write: an invalid file never replaces the one at --out.
            let fp = amend_edits::fingerprint::binding_of_bytes(&c.bytes).map_err(|e| {
                anyhow::anyhow!(
                    "--from {}: the converted file does not parse: {e}",
                    a.from.display()
                )
            })?;
            crate::compile::write_atomic(&a.out, &c.bytes)?;
            println!(
                "wrote {} ({} bytes, {} tensors, {} parameters, vocabulary {}); fingerprint {}",
                a.out.display(),
                c.bytes.len(),
                c.n_tensors,
                c.n_params,
                c.n_vocab,
                amend_edits::keys::to_hex(&fp.fingerprint)
            );
            Ok(())
        }
    }
}
