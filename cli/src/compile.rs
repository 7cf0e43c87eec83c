//! `amend compile`: edit requests -> a signed bundle, trained on the model the device runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};

use std::sync::Arc;

use amend_compiler::checkpoint::{self, Checkpoint, Part};
use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::eval;
use amend_compiler::locate::{self, TraceConfig};
use amend_compiler::methods::median;
use amend_compiler::{BundleIdentity, Compiler, Hparams, Method};
use amend_edits::bundle::Bundle;
use amend_edits::keys::TrustStore;
use amend_edits::{AddOptions, EditSet};

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
    /// With `--layer auto`: how many records (those with a subject) are traced (default 4).
    #[arg(long)]
    auto_records: Option<usize>,
    /// llama.cpp threads for `--layer auto`'s tracing (default: all cores; 1 is much faster on
    /// a machine other work keeps busy, where llama.cpp's thread pool spin-waits) and for the
    /// drift probes (default 1).
    #[arg(long, value_parser = crate::parse_threads)]
    threads: Option<usize>,
    /// Compile on top of this bundle (signed by --key): the output is its next version.
    #[arg(long)]
    base_bundle: Option<PathBuf>,
    /// A built-in preset laid over the defaults before --hparams and --set: `auto` (MEMIT on a
    /// batch whose prompts are all statements takes `memit-statements`; a MEMIT batch that mixes
    /// questions and statements is compiled in two stages into one bundle, the questions with
    /// the defaults, then the statements on top with `memit-statements`; anything else the
    /// defaults), `none`, or a preset's name (runtime/hparams/presets/).
    #[arg(long, default_value = "auto", value_name = "auto|none|NAME")]
    preset: String,
    /// A TOML file overriding the model's default hyperparameters.
    #[arg(long)]
    hparams: Option<PathBuf>,
    /// Override one hyperparameter: --set grace.lr=4 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Bundle id and channel written into the manifest.
    #[arg(long, default_value = "amend-edits")]
    bundle_id: String,
    /// Default `default`; with --base-bundle, the base's channel (the next version stays on it).
    #[arg(long)]
    channel: Option<String>,
    /// Print the hyperparameters in effect and exit.
    #[arg(long)]
    print_hparams: bool,
    /// The scope model serac's memories route with (a `bert` GGUF; default $AMEND_SCOPE_MODEL,
    /// else all-minilm-l6-v2-q8_0.gguf in $AMEND_CACHE or ~/.cache/amend, made by
    /// scripts/fetch-scope-model.sh).
    #[arg(long)]
    scope_model: Option<PathBuf>,
    /// Hand the records' rephrase, locality and portability prompts to the compiler (serac
    /// calibrates on them). Off by default: they are the test set (docs/eval.md).
    #[arg(long)]
    use_probes: bool,
    /// Write the bundle even when some edits do not reach their target (they are named).
    #[arg(long)]
    allow_partial: bool,
    /// Least probe locality, in percent: the next-token (argmax) agreement of the edited model
    /// with the base model on the fixed drift probes (data/drift-probes.txt, 50 ordinary
    /// prompts no edit is about; two prompt batches each: about 9 s of one core for
    /// gemma3-270m, more for larger models). Below it the bundle is not written.
    /// Default 95.
    #[arg(long, value_name = "PERCENT")]
    min_probe_locality: Option<f64>,
    /// Write the bundle even when its probe locality is below --min-probe-locality.
    #[arg(long)]
    allow_drift: bool,
    /// Skip the drift probes (huge runs where the few seconds matter, or a check done apart).
    #[arg(long)]
    no_drift_check: bool,
    /// Ignore (and replace) a checkpoint OUT.ckpt left by an interrupted compile instead of
    /// resuming from it. A checkpoint written for other inputs (model, method,
    /// hyperparameters, layer, edits, base bundle, bundle id) is refused without this.
    #[arg(long)]
    restart: bool,
    /// Least seconds between two checkpoint writes, 0 to 604800 (a week) (the finished edits
    /// are also kept when the compile fails).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = parse_checkpoint_every)]
    checkpoint_every: f64,
    /// Also key and check the edits on ONNX Runtime with these execution providers
    /// (comma-separated: cpu, openvino, ...): T-Patcher's neurons, and GRACE's codebook rows,
    /// are then keyed on every backend's hidden states and each edit must pass the closed-loop
    /// check on each (docs/backends.md). Adds `ort:EP` to `--verify-on`.
    #[arg(long, value_name = "EPS")]
    verify_ort: Option<String>,
    /// Backends to check every edit on through the runtime after compiling (closed loop: the
    /// edit's prompt must answer its target, teacher-forced and greedy), recorded in the signed
    /// bundle (format 1.2): `llama.cpp`, `ort:EP` (e.g. `ort:cpu`, `ort:openvino`), comma-separated,
    /// or `none` (no record: a v1.1 bundle). A runtime on a backend not recorded warns in
    /// explain. `--verify-ort EP` adds `ort:EP`.
    #[arg(long, default_value = "llama.cpp", value_name = "LIST")]
    verify_on: String,
    /// Make runtimes refuse the bundle on a backend where not every edit was verified
    /// (AMEND_ERR_BUNDLE_UNVERIFIED) instead of warning.
    #[arg(long)]
    require_verified: bool,
    /// Test hook: stop with an error once K edits are done, as a killed compile would.
    #[arg(long, hide = true, value_name = "K")]
    test_stop_after: Option<usize>,
    /// Test hook: flip a byte of the signed bundle before the compiler's own check of it.
    #[arg(long, hide = true)]
    test_corrupt_output: bool,
}

/// The longest `--checkpoint-every`: a week, in seconds (larger values never write one, and
/// do not fit a `Duration`).
const MAX_CHECKPOINT_EVERY: f64 = 7.0 * 24.0 * 3600.0;

fn parse_checkpoint_every(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=MAX_CHECKPOINT_EVERY).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds in 0..={MAX_CHECKPOINT_EVERY} (a week)"
        )),
    }
}

impl Args {
    fn min_locality(&self) -> f64 {
        self.min_probe_locality.unwrap_or(95.0)
    }
}

/// A bundle id or channel as the bundle format takes it (edits/src/bundle/reader.rs
/// `check_manifest`): not empty, at most `MAX_STRING_LEN` bytes, no control characters.
fn check_manifest_name(flag: &str, v: &str) -> anyhow::Result<()> {
    let max = amend_edits::bundle::format::MAX_STRING_LEN;
    if v.is_empty() {
        bail!("{flag} is empty; give a name");
    }
    if v.len() > max {
        bail!("{flag}: {} bytes, at most {max} are accepted", v.len());
    }
    if amend_edits::bundle::stream::has_control(v) {
        bail!(
            "{flag} {v:?}: control and invisible characters (line breaks, escapes, bidi and \
             zero-width marks) are not accepted"
        );
    }
    Ok(())
}

/// Two records with the same prompt: one bundle cannot answer it two ways, and an exact
/// duplicate compiles two rows for one fact.
fn check_distinct_prompts(records: &[dataset::EditRecord]) -> anyhow::Result<()> {
    let mut seen = std::collections::HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if let Some(&j) = seen.get(r.prompt.trim()) {
            let first: &dataset::EditRecord = &records[j];
            let what = if first.target_new.trim() == r.target_new.trim() {
                format!("the same target {:?} (a duplicate)", r.target_new)
            } else {
                format!(
                    "different targets ({:?} and {:?})",
                    first.target_new, r.target_new
                )
            };
            bail!(
                "--edits: records {j} (id {:?}) and {i} (id {:?}) have the same prompt {:?} with \
                 {what}; give each prompt once",
                first.id,
                r.id,
                r.prompt.trim()
            );
        }
        seen.insert(r.prompt.trim(), i);
    }
    Ok(())
}

/// Records without an id of their own are numbered on from the base bundle's numeric ids, so
/// that `0, 1, ...` of an appended file do not clash with the base's own automatic ids.
fn continue_auto_ids(records: &mut [dataset::EditRecord], base: &Bundle) {
    let mut used: std::collections::HashSet<String> =
        base.manifest().edits.iter().map(|e| e.id.clone()).collect();
    used.extend(
        records
            .iter()
            .filter(|r| !r.id_from_index)
            .map(|r| r.id.clone()),
    );
    let mut next = base
        .manifest()
        .edits
        .iter()
        .filter_map(|e| e.id.parse::<u64>().ok())
        .max()
        .map_or(0, |m| m + 1);
    for r in records.iter_mut().filter(|r| r.id_from_index) {
        while used.contains(&next.to_string()) {
            next += 1;
        }
        r.id = next.to_string();
        used.insert(r.id.clone());
        next += 1;
    }
}

/// A layer given in `--set METHOD.layer=L` or the `--hparams` file must be in the model: only
/// the built-in defaults (made for 16-28 layer models) are clamped to a smaller one.
fn check_explicit_layer(
    args: &Args,
    method: Method,
    hp: &Hparams,
    given: &amend_compiler::hparams::Given,
    n_layer: usize,
) -> anyhow::Result<()> {
    // memit checks its window against the model before any work.
    let Some(layer) = hp.layer(method) else {
        return Ok(());
    };
    let key = format!("{}.layer", method.name());
    let Some(origin) = given.get(&key) else {
        return Ok(());
    };
    let what = origin.describe(&key);
    if args.layer.is_some() {
        bail!("{what} and --layer both give the layer; give one");
    }
    if layer >= n_layer {
        bail!(
            "{what}: the model has {n_layer} layers, so the layer must be in 0..={}",
            n_layer.saturating_sub(1)
        );
    }
    Ok(())
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
    let targets = verify_targets(&args)?;
    if args.layer == Some(LayerArg::Auto) {
        if method == Method::Serac {
            bail!("--layer auto: serac's layer is its embedder's, which causal tracing does not choose; give an index");
        }
        if args.auto_records == Some(0) {
            bail!("--auto-records must be at least 1");
        }
    } else if let Some(n) = args.auto_records {
        bail!("--auto-records {n}: only --layer auto traces records; give --layer auto or drop --auto-records");
    }
    // Flags the chosen combination would ignore.
    if args.no_drift_check {
        if let Some(p) = args.min_probe_locality {
            bail!("--min-probe-locality {p} with --no-drift-check: no drift check runs to compare with it; give one of the two");
        }
        if args.allow_drift {
            bail!("--allow-drift with --no-drift-check: no drift check runs; give one of the two");
        }
    }
    if args.use_probes && method != Method::Serac {
        bail!(
            "--use-probes: only serac reads the records' rephrase and locality prompts; {} would ignore them",
            method.name()
        );
    }
    check_manifest_name("--bundle-id", &args.bundle_id)?;
    if let Some(c) = &args.channel {
        check_manifest_name("--channel", c)?;
    }
    // A --set key only the chosen method's section is read from, each given once.
    for s in &args.set {
        let section = s.split(['.', '=']).next().unwrap_or("").trim();
        if section != method.name() {
            bail!(
                "--set {s}: --method {} reads only the `{}.` keys; `{section}` would be ignored",
                method.name(),
                method.name()
            );
        }
    }
    if args.scope_model.is_some() && method != Method::Serac {
        bail!(
            "--scope-model: only serac routes its memories with a scope model; {} would ignore it",
            method.name()
        );
    }
    if !(0.0..=100.0).contains(&args.min_locality()) {
        bail!("--min-probe-locality must be a percentage in 0..=100");
    }
    if !(args.checkpoint_every.is_finite() && args.checkpoint_every >= 0.0) {
        bail!("--checkpoint-every must be a number of seconds >= 0");
    }
    let key = crate::keys::read_signing_key(&args.key)?;
    crate::check_output_path("--out", &args.out, true)?;
    // Nothing written may replace an input: the bundle, its checkpoints and LoRA file.
    let ckpt = checkpoint::path_for(&args.out);
    let stage_ckpts: Vec<PathBuf> = ["questions", "statements"]
        .iter()
        .map(|l| {
            let mut p = ckpt.clone().into_os_string();
            p.push(format!(".{l}"));
            PathBuf::from(p)
        })
        .collect();
    let lora_out = args.out.with_extension("lora.gguf");
    let mut outputs: Vec<(&str, &Path)> = vec![("--out", &args.out), ("--out's checkpoint", &ckpt)];
    if method == Method::Memit {
        outputs.extend(
            stage_ckpts
                .iter()
                .map(|p| ("--out's stage checkpoint", p.as_path())),
        );
    }
    if method == Method::Lora {
        outputs.push(("--out's GGUF-LoRA", &lora_out));
    }
    let public = args.key.with_extension("pub");
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("--model", &args.model),
        ("--edits", &args.edits),
        ("--key", &args.key),
        ("--key's public key", &public),
    ];
    for (flag, p) in [
        ("--base-bundle", &args.base_bundle),
        ("--hparams", &args.hparams),
        ("--scope-model", &args.scope_model),
    ] {
        if let Some(p) = p {
            inputs.push((flag, p));
        }
    }
    crate::check_outputs_apart(&outputs, &inputs)?;
    let mut records = dataset::load(&args.edits, format)
        .with_context(|| format!("--edits {}", args.edits.display()))?;
    check_distinct_prompts(&records)?;
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
    if let Some(b) = &base {
        let theirs = &b.manifest().channel;
        if let Some(c) = args.channel.as_ref().filter(|c| *c != theirs) {
            bail!(
                "--channel {c:?}: --base-bundle is on channel {theirs:?}, and its next version \
                 stays there; drop --channel (or compile without --base-bundle)"
            );
        }
        continue_auto_ids(&mut records, b);
    }
    amend_compiler::methods::check_unique_ids(&records, base.as_ref())?;
    // One edit per record: a bundle holds at most MAX_EDITS, which the writer would find only
    // after training them all.
    let base_edits = base.as_ref().map_or(0, |b| b.manifest().edits.len());
    if records.len() + base_edits > amend_edits::bundle::MAX_EDITS {
        bail!(
            "--edits {}: {} record(s){}; a bundle holds at most {} edits: split the file",
            args.edits.display(),
            records.len(),
            if base_edits > 0 {
                format!(" on top of --base-bundle's {base_edits}")
            } else {
                String::new()
            },
            amend_edits::bundle::MAX_EDITS
        );
    }

    // Before the model loads and anything trains: a directory that cannot take the checkpoint
    // and the bundle (full, read-only) failed only at the first checkpoint write, after an edit.
    checkpoint::probe_dir(&args.out).with_context(|| {
        format!(
            "--out {}: its directory cannot take the checkpoint and the bundle; nothing was trained",
            args.out.display()
        )
    })?;
    let t0 = Instant::now();
    let mut compiler =
        Compiler::open(&args.model).with_context(|| format!("--model {}", args.model.display()))?;
    // The plan: one batch, or, for MEMIT under `--preset auto` when the batch mixes the two
    // prompt forms, the questions with the defaults and then the statements on top of them with
    // the statements preset: one bundle. Measured on heldout5: one mixed batch 89.7 edit
    // success / 82.5 locality, the forms compiled apart 98.3 / 85.3 (docs/eval.md).
    let (n_questions, n_statements) =
        amend_compiler::hparams::prompt_forms(records.iter().map(|r| r.prompt.as_str()));
    let split =
        method == Method::Memit && args.preset == "auto" && n_questions > 0 && n_statements > 0;
    let stages: Vec<Stage> = if split {
        eprintln!(
            "preset auto: the batch mixes {n_questions} question(s) and {n_statements} statement(s): \
             the questions are compiled first with the defaults, then the statements on top of them \
             with memit-statements, into one bundle (--preset none: one batch with the defaults; \
             docs/eval.md)"
        );
        let (questions, statements): (Vec<_>, Vec<_>) = records
            .iter()
            .cloned()
            .partition(|r| amend_compiler::hparams::is_question(&r.prompt));
        vec![
            Stage {
                label: "questions",
                preset: None,
                records: questions,
            },
            Stage {
                label: "statements",
                preset: Some("memit-statements"),
                records: statements,
            },
        ]
    } else {
        let preset = match args.preset.as_str() {
            "none" => None,
            "auto" => {
                let p = amend_compiler::hparams::auto_preset(
                    method,
                    records.iter().map(|r| r.prompt.as_str()),
                );
                if let Some(p) = p {
                    eprintln!("preset {p}: every prompt is a statement (--preset none for the defaults; docs/eval.md)");
                }
                p
            }
            name => Some(name),
        };
        vec![Stage {
            label: "",
            preset,
            records: records.clone(),
        }]
    };
    let resolved = stages
        .iter()
        .map(|s| {
            Hparams::resolve_given(
                compiler.fwd.cfg.arch,
                s.preset,
                args.hparams.as_deref(),
                &args.set,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The user's keys are the same in every stage (only the preset differs).
    let given = resolved[0].1.clone();
    let hps: Vec<Hparams> = resolved.into_iter().map(|(hp, _)| hp).collect();
    check_explicit_layer(&args, method, &hps[0], &given, compiler.fwd.cfg.n_layer)?;
    if args.print_hparams {
        for (s, hp) in stages.iter().zip(&hps) {
            if stages.len() > 1 {
                println!("# the {}' stage", s.label);
            }
            println!("{}", toml::to_string_pretty(hp)?);
        }
        return Ok(());
    }
    // What the steps below read (one stage unless MEMIT splits, and MEMIT reads none of it).
    let hp = &hps[0];
    let layer = match args.layer {
        None => None,
        Some(LayerArg::Index(l)) => Some(l),
        Some(LayerArg::Auto) => Some(auto_layer(
            &compiler,
            &records,
            args.auto_records.unwrap_or(4),
            args.threads,
        )?),
    };
    if method == Method::Serac && hp.serac.embedder != "scope" && args.scope_model.is_some() {
        bail!(
            "--scope-model: serac.embedder is {:?}, which routes without a scope model; it would be ignored",
            hp.serac.embedder
        );
    }
    if method == Method::Serac && hp.serac.embedder == "scope" {
        let path = args
            .scope_model
            .clone()
            .or_else(amend_runtime::default_scope_model_path)
            .context("--scope-model: no default path (HOME unset)")?;
        // The scope model's own default (one thread), not --threads: see DEFAULT_SCOPE_THREADS.
        let scope = amend_runtime::ScopeModel::open(&path, None).with_context(|| {
            format!(
                "--scope-model {} (make it with scripts/fetch-scope-model.sh)",
                path.display()
            )
        })?;
        compiler.scope_model = Some(scope);
    }
    if args.verify_ort.is_some() {
        if !matches!(method, Method::TPatcher | Method::Grace) {
            bail!("--verify-ort: only tpatcher and grace key their edits on hidden states a backend computes; the other methods carry over as they are (docs/backends.md)");
        }
        for ep in verify_ort_eps(&args)? {
            compiler
                .verify_ort
                .push(amend_runtime::onnxruntime::OrtOptions {
                    ep,
                    n_threads: Some(1),
                    cache: amend_runtime::onnxruntime::OnnxCache::Off,
                    library: ort_library_for(&targets),
                    ..Default::default()
                });
        }
    }
    eprintln!(
        "loaded {} ({}) in {:.1} s; {} edit(s), method {}",
        args.model.display(),
        compiler.fwd.cfg.arch.name(),
        t0.elapsed().as_secs_f64(),
        records.len(),
        method.name()
    );

    let identity_base = BundleIdentity {
        bundle_id: args.bundle_id.clone(),
        channel: args.channel.clone().unwrap_or_else(|| "default".into()),
        version: None,
        expires: u64::MAX,
        created: None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Reproducible output: SOURCE_DATE_EPOCH, else the interrupted run's time, else now.
    let pinned = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => Some(
            v.trim()
                .parse::<u64>()
                .context("SOURCE_DATE_EPOCH: not a number of seconds")?,
        ),
        Err(_) => None,
    };
    let mut created = None;
    // Without a terminal (CI, a log file, nohup) the bar draws nothing: print one log line per
    // finished edit instead.
    let log_lines = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (n_records, mut n_done) = (records.len(), 0usize);
    let bar = crate::progress_bar(records.len() as u64, "edits");
    let mut progress = |p: &amend_compiler::methods::Progress| {
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
    };
    let t_compile = Instant::now();
    // Each stage's checkpoint, kept (flushed) once the stage is trained.
    let mut ckpts: Vec<Checkpoint> = Vec::new();
    // The earlier stages' output, the next stage's base (signed by --key, never written).
    let mut stage_base: Option<Bundle> = None;
    let mut reports = Vec::new();
    let mut last = None;
    for (k, (stage, hp)) in stages.iter().zip(&hps).enumerate() {
        let stage_base_ref = stage_base.as_ref().or(base.as_ref());
        // The checkpoint: bound to everything that determines the stage's output, signed with
        // --key.
        let ckpt_path = if stages.len() == 1 {
            checkpoint::path_for(&args.out)
        } else {
            let mut p = checkpoint::path_for(&args.out).into_os_string();
            p.push(format!(".{}", stage.label));
            PathBuf::from(p)
        };
        let ids: Vec<&str> = stage.records.iter().map(|r| r.id.as_str()).collect();
        // A later stage is the same version as the first (the bundle written is one version).
        let identity_k = BundleIdentity {
            version: stage_base.as_ref().map(|b| b.manifest().version),
            created,
            ..identity_base.clone()
        };
        let parts = checkpoint_parts(
            &compiler,
            method,
            hp,
            layer,
            &stage.records,
            stage_base_ref.map(|b| b.bytes()),
            &identity_k,
        )?;
        let stored = if method.checkpoints().is_none() || args.restart {
            None
        } else {
            Checkpoint::load(&ckpt_path, &parts, &ids, &key)?
        };
        // The first stage fixes the time every stage's bundle is built with.
        let created = *created
            .get_or_insert_with(|| pinned.or(stored.as_ref().map(|c| c.created)).unwrap_or(now));
        if method.checkpoints().is_some() {
            let mut ckpt = match stored {
                Some(c) => {
                    eprintln!(
                        "resuming from {}: {}/{} edit(s) already done",
                        ckpt_path.display(),
                        c.len(),
                        stage.records.len()
                    );
                    c
                }
                None => Checkpoint::new(
                    ckpt_path.clone(),
                    parts,
                    created,
                    stage.records.len(),
                    key.clone(),
                ),
            };
            ckpt.interval = std::time::Duration::from_secs_f64(args.checkpoint_every);
            ckpt.stop_after = args.test_stop_after;
            compiler.checkpoint = Some(ckpt);
        }
        let identity = BundleIdentity {
            created: Some(created),
            ..identity_k
        };
        if stages.len() > 1 {
            eprintln!(
                "stage {}/{}: {} {} with preset {}",
                k + 1,
                stages.len(),
                stage.records.len(),
                stage.label,
                stage.preset.unwrap_or("none")
            );
        }
        let out = compiler.compile(
            method,
            &stage.records,
            hp,
            layer,
            stage_base_ref,
            &identity,
            &mut progress,
        );
        let mut out = match out {
            Ok(o) => o,
            Err(e) => {
                // Keep what finished: the same command resumes after it.
                if let Some(c) = compiler.checkpoint.as_mut() {
                    if !c.is_empty()
                        && !matches!(e, amend_compiler::CompileError::Interrupted { .. })
                    {
                        match c.flush() {
                            Ok(()) => eprintln!(
                                "{}/{} edit(s) finished are kept in {}: run the same command again to resume",
                                c.len(),
                                stage.records.len(),
                                c.path().display()
                            ),
                            Err(fe) => eprintln!("could not keep the finished edits: {fe}"),
                        }
                    }
                }
                bar.finish_and_clear();
                return Err(e.into());
            }
        };
        // Everything is trained: keep it all, so a refusal below (--allow-partial,
        // --allow-drift) costs a rerun no training.
        if let Some(mut c) = compiler.checkpoint.take() {
            c.flush()?;
            ckpts.push(c);
        }
        if k + 1 < stages.len() {
            let bytes = out
                .builder
                .build_signed(&key)
                .map_err(|e| anyhow::anyhow!("building the {}' bundle: {e}", stage.label))?;
            stage_base = Some(
                Bundle::from_bytes(bytes.as_slice(), &trust)
                    .map_err(|e| anyhow::anyhow!("the {}' bundle: {e}", stage.label))?,
            );
        }
        reports.append(&mut out.reports);
        last = Some(out);
    }
    bar.finish_and_clear();
    let compile_secs = t_compile.elapsed().as_secs_f64();
    // The last stage's bundle carries every stage's edits; the reports are every stage's (an
    // earlier stage's were checked before the later stages' edits: the runtime check below
    // sees them all).
    let out = amend_compiler::methods::CompileOutput {
        reports,
        ..last.context("no stage compiled")?
    };

    // The compiler checks its own output with the reader every device uses, before writing:
    // a bundle that no verifier accepts is never signed onto disk.
    let build_checked = |b: &amend_edits::BundleBuilder| -> anyhow::Result<(_, Bundle)> {
        let mut bytes = b
            .build_signed(&key)
            .map_err(|e| anyhow::anyhow!("building the bundle: {e}"))?;
        if args.test_corrupt_output {
            let n = bytes.len();
            bytes.as_mut_slice()[n / 2] ^= 0x40;
        }
        let verified = Bundle::from_bytes(bytes.as_slice(), &trust).map_err(|e| {
            anyhow::anyhow!(
                "the compiled bundle does not verify ({e}); nothing was written to {}",
                args.out.display()
            )
        })?;
        Ok((bytes, verified))
    };
    let (bytes, verified) = build_checked(&out.builder)?;
    for p in verified.payloads() {
        if let amend_edits::bundle::Payload::Memory(d) = p {
            if let Some(g) = d.embedder.relation_groups() {
                let grouped = g.record_group.iter().filter(|&&x| x != u16::MAX).count();
                let rule = match d.embedder.group_vote() {
                    Some(w) => format!("they vote {w:.1} on the head's logit; the head decides"),
                    None => {
                        "their query's group decides in scope; the head decides the rest".into()
                    }
                };
                println!(
                    "serac relation groups: {} groups, {} templates, min score {:.2}, margin {:.2}: {grouped}/{} records have a group ({rule})",
                    g.names.len(),
                    g.template_group.len(),
                    g.min_score,
                    d.embedder.relation_margin(),
                    g.record_group.len()
                );
            }
            if let Some(h) = d.embedder.scope_head() {
                println!(
                    "serac scope head: {} x {} perceptrons, threshold {:.3}: it decides in scope (the cosine thresholds below are stored, not used)",
                    h.members, h.hidden, h.threshold
                );
            }
        }
    }
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

    let times: Vec<f64> = out.reports.iter().map(|r| r.seconds).collect();
    let losses: Vec<f64> = out.reports.iter().map(|r| r.loss as f64).collect();
    let missed: Vec<&str> = out
        .reports
        .iter()
        .filter(|r| !r.success)
        .map(|r| r.id.as_str())
        .collect();
    println!(
        "compiled {} edit(s) with {}, {}/{} reach their target (teacher-forced, compiler forward{})",
        out.reports.len(),
        method.name(),
        out.reports.len() - missed.len(),
        out.reports.len(),
        if stages.len() > 1 {
            "; each stage's edits checked when it was made: the runtime check below sees every edit"
        } else {
            ""
        }
    );
    println!(
        "time per edit: median {:.2} s (total {:.1} s); final loss: median {:.3}, max {:.3}",
        median(&times),
        compile_secs,
        median(&losses),
        losses.iter().cloned().fold(0.0, f64::max)
    );
    let ort_keyed = out
        .reports
        .iter()
        .filter(|r| r.action.contains("keyed on ONNX Runtime"))
        .count();
    if ort_keyed > 0 {
        println!(
            "{ort_keyed} edit(s) got codebook rows keyed on ONNX Runtime too (--verify-ort: the \
             key there lay beyond half the edit's radius)"
        );
    }
    let weighted: Vec<&str> = out
        .reports
        .iter()
        .filter(|r| r.action.contains(", weighted "))
        .map(|r| r.id.as_str())
        .collect();
    if !weighted.is_empty() {
        println!(
            "{} edit(s) weighted up and solved again by memit's margin loop (short of \
             memit.margin_nll after the batch's solve): {}",
            weighted.len(),
            weighted.join(", ")
        );
    }
    for c in &ckpts {
        println!(
            "checkpoint {}: {} edit(s) resumed, {} write(s) in {:.2} s",
            c.path().display(),
            c.resumed,
            c.writes,
            c.write_secs
        );
    }
    for r in out.reports.iter().filter(|r| !r.success) {
        println!(
            "  not reached: {} (loss {:.3} after {} steps; {})",
            r.id, r.loss, r.steps, r.action
        );
    }
    let keep_note = || {
        if ckpts.is_empty() {
            return String::new();
        }
        let paths: Vec<String> = ckpts
            .iter()
            .map(|c| c.path().display().to_string())
            .collect();
        format!(
            "; the trained edits are kept in {}, so rerunning costs no training",
            paths.join(" and ")
        )
    };
    if !missed.is_empty() && !args.allow_partial {
        bail!(
            "{} of {} edit(s) do not reach their target: {}; nothing was written to {} \
             (raise the method's steps or lr with --set, drop those edits, or pass \
             --allow-partial to write the bundle anyway{})",
            missed.len(),
            out.reports.len(),
            name_some(&missed, 20),
            args.out.display(),
            keep_note()
        );
    }

    // Verification: every edit through the runtime on each backend asked for; the record is
    // signed into the bundle (the payloads do not change, so neither do the results).
    let mut record = amend_edits::bundle::Verification {
        backends: Vec::new(),
        required: args.require_verified,
    };
    let verified = Arc::new(verified);
    for t in &targets {
        let v = verify_on(&compiler, verified.clone(), &trust, t, &targets, &args)?;
        let failed: Vec<&str> = v.failed.iter().map(String::as_str).collect();
        println!(
            "verified on {}: {}/{} edit(s) answer their target (teacher-forced and greedy; {:.1} s)",
            v.backend,
            v.total - v.failed.len(),
            v.total,
            v.seconds
        );
        if !v.failed.is_empty() {
            println!("  fail on {}: {}", v.backend, name_some(&failed, 20));
            if !args.allow_partial {
                bail!(
                    "{} of {} edit(s) do not answer their target on {}: {}; nothing was written \
                     to {} (pass --allow-partial to write the bundle anyway, with the record \
                     saying so{})",
                    v.failed.len(),
                    v.total,
                    v.backend,
                    name_some(&failed, 20),
                    args.out.display(),
                    keep_note()
                );
            }
        }
        record.backends.push(amend_edits::bundle::VerifiedBackend {
            backend: v.backend,
            passed: (v.total - v.failed.len()) as u32,
            total: v.total as u32,
        });
    }
    // The same payloads again, with the record in the manifest (signed and checked anew).
    let (bytes, verified) = if targets.is_empty() {
        (bytes, verified)
    } else {
        let mut b = out.builder.clone();
        b.set_verification(Some(record));
        let (bytes, verified) = build_checked(&b)?;
        (bytes, Arc::new(verified))
    };

    // Drift: the new bundle through the runtime, on prompts no edit is about.
    if args.no_drift_check {
        println!("drift check: skipped (--no-drift-check)");
    } else {
        let drift = drift_check(&compiler, verified, &trust, &records, base.as_ref(), &args)?;
        let pct = 100.0 * drift.agreement;
        println!(
            "probe locality: {pct:.1}% next-token agreement with the base model on {} drift \
             probe(s) (minimum {:.1}%; {:.1} s)",
            drift.probes,
            args.min_locality(),
            drift.seconds
        );
        for (p, a) in &drift.worst {
            println!("  drifts: {p:?} ({:.0}% agreement)", 100.0 * a);
        }
        if pct < args.min_locality() {
            if !args.allow_drift {
                bail!(
                    "the bundle moves the model on unrelated prompts: probe locality {pct:.1}% \
                     is below --min-probe-locality {:.1}%; nothing was written to {} (pass \
                     --allow-drift to write it anyway{})",
                    args.min_locality(),
                    args.out.display(),
                    keep_note()
                );
            }
            println!("  below the minimum: written anyway (--allow-drift)");
        }
    }

    // The bundle and its GGUF-LoRA are both staged before either is put in place: a LoRA that
    // cannot be written leaves the old bundle too.
    let lora_path = args.out.with_extension("lora.gguf");
    let mut staged = vec![stage(&args.out, bytes.as_slice())?];
    if let Some(lora) = &out.gguf_lora {
        staged.push(stage(&lora_path, lora)?);
    }
    amend_edits::fsutil::commit_all(staged)?;
    if out.gguf_lora.is_some() {
        println!("wrote {} (GGUF-LoRA for llama.cpp)", lora_path.display());
    }
    println!(
        "wrote {} ({} bytes){}",
        args.out.display(),
        bytes.len(),
        if missed.is_empty() {
            String::new()
        } else {
            format!(
                " with {} edit(s) that do not reach their target (--allow-partial)",
                missed.len()
            )
        }
    );
    for c in &ckpts {
        c.remove()
            .with_context(|| format!("removing {}", c.path().display()))?;
    }
    Ok(())
}

/// One compile of a batch: its records and the preset its hyperparameters start from.
struct Stage<'a> {
    /// "questions" or "statements" when MEMIT compiles the forms apart; empty otherwise.
    label: &'static str,
    preset: Option<&'a str>,
    records: Vec<dataset::EditRecord>,
}

/// At most `n` of `ids`, then "and K more".
fn name_some(ids: &[&str], n: usize) -> String {
    let mut s = ids.iter().take(n).copied().collect::<Vec<_>>().join(", ");
    if ids.len() > n {
        s.push_str(&format!(" and {} more", ids.len() - n));
    }
    s
}

/// The named digests a checkpoint is bound to (see `amend_compiler::checkpoint`).
fn checkpoint_parts(
    compiler: &Compiler,
    method: Method,
    hp: &Hparams,
    layer: Option<usize>,
    records: &[dataset::EditRecord],
    base: Option<&[u8]>,
    identity: &BundleIdentity,
) -> anyhow::Result<Vec<Part>> {
    // The method's own section of the hyperparameters in effect (another section's values do
    // not change this method's result).
    let hp_value = toml::Value::try_from(hp).context("hyperparameters")?;
    let section = hp_value
        .get(method.name())
        .map(|v| v.to_string())
        .unwrap_or_else(|| hp_value.to_string());
    Ok(vec![
        Part::new("model", &compiler.binding.fingerprint),
        Part::new("method", method.name().as_bytes()),
        Part::new("hyperparameters", section.as_bytes()),
        Part::new("layer", format!("{layer:?}").as_bytes()),
        Part::new("edits", &serde_json::to_vec(records)?),
        Part::new("base bundle", base.unwrap_or(b"none")),
        Part::new(
            "bundle identity",
            format!(
                "{:?} {:?} {}",
                identity.bundle_id, identity.channel, identity.expires
            )
            .as_bytes(),
        ),
    ])
}

/// The drift figure of `bundle` (verified, not yet written).
struct Drift {
    agreement: f64,
    probes: usize,
    worst: Vec<(String, f64)>,
    seconds: f64,
}

/// A backend `--verify-on` names.
#[derive(Clone, Debug, PartialEq)]
enum VerifyTarget {
    Llama,
    /// ONNX Runtime on this execution provider.
    Ort(amend_runtime::onnxruntime::Ep),
}

impl VerifyTarget {
    /// One key per backend (`openvino` and `openvino:CPU` are one); the record names it by the
    /// session's `backend_id`, which adds the ONNX Runtime version once a library is loaded.
    fn id(&self) -> String {
        match self {
            VerifyTarget::Llama => amend_runtime::LLAMA_CPP_BACKEND_ID.into(),
            VerifyTarget::Ort(ep) => format!("ort:{}", ep.name()),
        }
    }
}

fn verify_targets(args: &Args) -> anyhow::Result<Vec<VerifyTarget>> {
    let mut out = Vec::new();
    let list = args.verify_on.trim();
    if !list.eq_ignore_ascii_case("none") {
        for item in list.split(',').map(str::trim) {
            let t = match item {
                "llama.cpp" | "llama" => VerifyTarget::Llama,
                _ => match item
                    .strip_prefix("ort:")
                    .or_else(|| item.strip_prefix("onnxruntime:"))
                {
                    Some(ep) => VerifyTarget::Ort(
                        amend_runtime::onnxruntime::Ep::parse(ep)
                            .with_context(|| format!("--verify-on {item}"))?,
                    ),
                    None => bail!(
                        "--verify-on {item:?}: expected llama.cpp, ort:EP (e.g. ort:cpu, \
                         ort:openvino) or none"
                    ),
                },
            };
            out.push(t);
        }
    }
    out.extend(verify_ort_eps(args)?.into_iter().map(VerifyTarget::Ort));
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|t| seen.insert(t.id()));
    if args.require_verified && out.is_empty() {
        bail!("--require-verified needs at least one backend in --verify-on");
    }
    Ok(out)
}

/// `--verify-ort`'s EPs, without repeats (`openvino` and `openvino:CPU` are one).
fn verify_ort_eps(args: &Args) -> anyhow::Result<Vec<amend_runtime::onnxruntime::Ep>> {
    let mut out: Vec<amend_runtime::onnxruntime::Ep> = Vec::new();
    for item in args
        .verify_ort
        .iter()
        .flat_map(|l| l.split(','))
        .map(str::trim)
    {
        let ep = amend_runtime::onnxruntime::Ep::parse(item)
            .with_context(|| format!("--verify-ort {item}"))?;
        if !out.contains(&ep) {
            out.push(ep);
        }
    }
    Ok(out)
}

/// The ONNX Runtime library every ORT backend of this compile runs on. A process can load only
/// one, so with an OpenVINO EP in the list it is the OpenVINO build's (which has the CPU EP
/// too); otherwise the default (`--ep`'s, or $AMEND_ORT_LIB).
fn ort_library_for(targets: &[VerifyTarget]) -> Option<PathBuf> {
    use amend_runtime::onnxruntime::{default_library, Ep};
    targets.iter().find_map(|t| match t {
        VerifyTarget::Ort(ep @ Ep::OpenVino(_)) => Some(default_library(ep)),
        _ => None,
    })
}

struct Verified {
    backend: String,
    total: usize,
    failed: Vec<String>,
    seconds: f64,
}

/// Runs every edit of `bundle` through the runtime on `target`: the edit's prompt as a request
/// (memories routed, edits pinned), then its target teacher-forced and greedy.
fn verify_on(
    compiler: &Compiler,
    bundle: Arc<Bundle>,
    trust: &TrustStore,
    target: &VerifyTarget,
    targets: &[VerifyTarget],
    args: &Args,
) -> anyhow::Result<Verified> {
    use amend_runtime::Backend;
    let t0 = Instant::now();
    let set = Arc::new(EditSet::new(compiler.binding.clone(), trust.clone()));
    set.add(bundle.clone(), AddOptions::default())
        .map_err(|e| anyhow::anyhow!("the compiled bundle does not load into an edit set: {e}"))?;
    let threads = Some(args.threads.unwrap_or(1));
    let edits = &bundle.manifest().edits;
    // One session per worker: llama.cpp sessions of one thread each run side by side (one
    // session with all cores spin-waits on small batches); an ONNX Runtime model runs one
    // request at a time, so it gets one worker.
    let workers = match target {
        VerifyTarget::Llama => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8)
            .min(edits.len().max(1)),
        VerifyTarget::Ort(_) => 1,
    };
    let ort_model = match target {
        VerifyTarget::Llama => None,
        VerifyTarget::Ort(ep) => {
            // No graph cache: a compile's slot layout is its own (building takes ~2 s).
            let ort = crate::backends::OrtArgs {
                ep: ep.name(),
                no_onnx_cache: true,
                ort_lib: ort_library_for(targets),
                ..Default::default()
            };
            let slots = amend_runtime::onnxruntime::SlotLayout::for_bundles([&*bundle])?;
            Some(crate::backends::open_ort_with_slots(
                &args.model,
                &ort,
                threads,
                slots,
            )?)
        }
    };
    // Only what the workers share (the compiler itself holds a session, which is not Sync).
    let (runtime, scope) = (compiler.runtime.clone(), compiler.scope_model.clone());
    let open = || -> anyhow::Result<Box<dyn Backend>> {
        let mut session: Box<dyn Backend> = match &ort_model {
            None => Box::new(amend_runtime::Session::new(
                &runtime,
                amend_runtime::SessionOptions {
                    n_ctx: 1024,
                    n_threads: Some(1),
                    ..Default::default()
                },
            )?),
            Some(m) => Box::new(amend_runtime::onnxruntime::OrtSession::new(m, 1024)?),
        };
        session.set_scope_model(scope.clone())?;
        session.set_edit_set(Some(set.clone()))?;
        Ok(session)
    };
    // Worker w checks edits w, w + workers, ...: (index, passed) per edit, and the backend id.
    let check = |w: usize| -> anyhow::Result<(String, Vec<(usize, bool)>)> {
        let mut session = open()?;
        let mut out = Vec::new();
        for (i, e) in edits.iter().enumerate().skip(w).step_by(workers) {
            let req = session.begin_request(&e.prompt)?;
            let (p, a) =
                amend_runtime::prompt_answer_tokens(session.vocab(), &req.prompt, &e.target)?;
            let (tf, greedy) = eval::answer_check(&mut *session, &p, &a)?;
            out.push((i, tf && greedy));
        }
        Ok((session.backend_id(), out))
    };
    // Per worker: the backend's id and, per request checked, whether it answered its target.
    type Checked = anyhow::Result<(String, Vec<(usize, bool)>)>;
    let results: Vec<Checked> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                std::thread::Builder::new()
                    .spawn_scoped(sc, move || check(w))
                    .map_err(|_| w)
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a verification worker panicked"))),
                // At the process's thread limit: that worker's share runs here.
                Err(w) => check(w),
            })
            .collect()
    });
    let mut backend = String::new();
    let mut passed = vec![false; edits.len()];
    for r in results {
        let (id, out) = r?;
        backend = id;
        for (i, ok) in out {
            passed[i] = ok;
        }
    }
    let failed = edits
        .iter()
        .zip(&passed)
        .filter(|(_, ok)| !**ok)
        .map(|(e, _)| e.id.clone())
        .collect();
    Ok(Verified {
        backend,
        total: edits.len(),
        failed,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Probe locality of `bundle` on the model the compiler holds: the fixed drift probes minus
/// those about an edit (the new records' or the base bundle's), scored by
/// `amend_compiler::eval::probe_locality` with the bundle in a live edit set.
fn drift_check(
    compiler: &Compiler,
    bundle: Arc<Bundle>,
    trust: &TrustStore,
    records: &[dataset::EditRecord],
    base: Option<&Bundle>,
    args: &Args,
) -> anyhow::Result<Drift> {
    let t0 = Instant::now();
    let mut about = records.to_vec();
    if let Some(b) = base {
        about.extend(b.manifest().edits.iter().map(|e| dataset::EditRecord {
            prompt: e.prompt.clone(),
            ..Default::default()
        }));
    }
    let probes = eval::drift_probes(&about);
    let set = Arc::new(EditSet::new(compiler.binding.clone(), trust.clone()));
    set.add(bundle, AddOptions::default())
        .map_err(|e| anyhow::anyhow!("the compiled bundle does not load into an edit set: {e}"))?;
    let scope = compiler.scope_model.clone();
    let mut variant = eval::Variant::new("compiled", move |model, opts| {
        let mut session = amend_runtime::Session::new(model, opts.clone())?;
        session.set_scope_model(scope.clone())?;
        session.set_edit_set(Some(set.clone()))?;
        Ok(session)
    });
    // One thread unless --threads: these batches are small, and llama.cpp's spinning thread
    // pool made them take ~1.6 s each on 2 busy cores (50 probes: 9 minutes instead of seconds).
    let config = eval::EvalConfig {
        n_threads: Some(args.threads.unwrap_or(1)),
        ..Default::default()
    };
    let r = eval::probe_locality(&compiler.runtime, &probes, &mut variant, &config, 1)
        .map_err(|e| anyhow::anyhow!("drift check: {e}"))?;
    Ok(Drift {
        agreement: r.agreement,
        probes: r.probes,
        worst: r.worst,
        seconds: t0.elapsed().as_secs_f64(),
    })
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

/// The first half of [`write_atomic`]: written and synced beside `path`, put in place by
/// `commit` (removed if dropped).
fn stage(path: &Path, bytes: &[u8]) -> anyhow::Result<amend_edits::fsutil::Staged> {
    amend_edits::fsutil::stage(path, bytes, None)
        .with_context(|| format!("writing {}; nothing was written", path.display()))
}

#[cfg(test)]
mod tests {
    use super::name_some;

    #[test]
    fn long_id_lists_are_cut() {
        assert_eq!(name_some(&["a", "b"], 20), "a, b");
        let ids: Vec<String> = (0..25).map(|i| format!("e{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let s = name_some(&refs, 20);
        assert!(
            s.starts_with("e0, e1,") && s.ends_with("e19 and 5 more"),
            "{s}"
        );
    }
}
