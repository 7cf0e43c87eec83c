//! `amend eval`: the KnowEdit metrics for the base model and each bundle, side by side.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::eval::{self, EvalConfig, Summary, Variant, VariantReport};
use std::sync::Arc;

use amend_edits::{AddOptions, EditSet, TrustStore};
use amend_runtime::{Model, Session};
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
    /// Greedy tokens generated per prompt for fluency and generation metrics (at least 1:
    /// with none, fluency would score the prompt alone and the generation metrics nothing).
    #[arg(long, default_value_t = 100, value_parser = crate::parse_count)]
    gen_tokens: usize,
    /// Threads (default: all cores).
    #[arg(long, value_parser = crate::parse_threads)]
    threads: Option<usize>,
    /// `batch`: every edit of a bundle active for every record (what a device runs).
    /// `single`: each record sees only its own edit(s), the others rolled back (KnowEdit's
    /// single-edit protocol, comparable with the paper's tables; the bundle is still compiled
    /// once, sequentially).
    #[arg(long, default_value = "batch")]
    protocol: Protocol,
    /// The scope model for bundles whose memories route with one (default $AMEND_SCOPE_MODEL,
    /// else all-minilm-l6-v2-q8_0.gguf in $AMEND_CACHE or ~/.cache/amend); opened only when a
    /// bundle needs it.
    #[arg(long)]
    scope_model: Option<PathBuf>,
    /// The engine the variants run on: llama.cpp, or ONNX Runtime on an execution provider
    /// (--ep), with the bundles' edits fed into the graph's edit slots.
    #[arg(long, value_enum, default_value_t = crate::backends::BackendName::Llama)]
    backend: crate::backends::BackendName,
    #[command(flatten)]
    ort: crate::backends::OrtArgs,
}

/// Opens the scope model when `bundle` needs one (once per process: `slot` caches it).
pub fn scope_for(
    bundle: &amend_edits::Bundle,
    path: Option<&Path>,
    threads: Option<usize>,
    slot: &mut Option<Arc<amend_runtime::ScopeModel>>,
) -> anyhow::Result<Option<Arc<amend_runtime::ScopeModel>>> {
    let needs = bundle.payloads().iter().any(|p| {
        matches!(p, amend_edits::bundle::Payload::Memory(d)
            if d.embedder.scope_routing().is_some())
    });
    if needs && slot.is_none() {
        let path = path
            .map(Path::to_path_buf)
            .or_else(amend_runtime::default_scope_model_path)
            .context("--scope-model: no default path (HOME unset)")?;
        let m = amend_runtime::ScopeModel::open(&path, threads).with_context(|| {
            format!(
                "bundle {} needs the scope model: --scope-model {}",
                bundle.id(),
                path.display()
            )
        })?;
        *slot = Some(m);
    }
    amend_runtime::check_scope_model(bundle, slot.as_deref())?;
    Ok(slot.clone())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Batch,
    Single,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.ort.check_backend(args.backend)?;
    if !args.bundles.is_empty() && args.pubkey.is_none() {
        anyhow::bail!("--pubkey is required with --bundle (bundles are verified before use)");
    }
    if let (Some(p), true) = (&args.pubkey, args.bundles.is_empty()) {
        anyhow::bail!(
            "--pubkey {} without --bundle: the key verifies bundles and none is given; add \
             --bundle FILE or drop --pubkey",
            p.display()
        );
    }
    let names = variant_names(&args.bundles)?;
    check_outputs(&args)?;
    let mut records = dataset::load(&args.data, args.data_format)
        .with_context(|| format!("reading edit requests from {}", args.data.display()))?;
    // As `compile` does: per-record lines are keyed by id.
    amend_compiler::methods::check_unique_ids(&records, None)
        .with_context(|| format!("--data {}", args.data.display()))?;
    if let Some(n) = args.limit {
        if n == 0 {
            anyhow::bail!("--limit must be at least 1");
        }
        records.truncate(n);
    }
    let prepare = |flag, path: &Option<PathBuf>| {
        path.as_deref()
            .map(|p| Output::prepare(flag, p))
            .transpose()
    };
    let out = prepare("--out", &args.out)?;
    let summary = prepare("--summary", &args.summary)?;
    let markdown = prepare("--markdown", &args.markdown)?;
    let mut scope = None;
    let mut loaded = Vec::new();
    for (path, name) in args.bundles.iter().zip(names) {
        let pubkey = args.pubkey.as_deref().expect("checked above");
        loaded.push(load_bundle(
            &args.model,
            path,
            name,
            pubkey,
            // The scope model on its default one thread, whatever --threads gives the base model.
            (args.scope_model.as_deref(), None, &mut scope),
        )?);
    }
    let (model, ort) = match args.backend {
        crate::backends::BackendName::Llama => (
            Model::open(&args.model, Default::default())
                .with_context(|| format!("loading model {}", args.model.display()))?,
            None,
        ),
        crate::backends::BackendName::Ort => {
            // One graph for every variant: slots for all the bundles' edits.
            let mut layout = amend_runtime::onnxruntime::SlotLayout::default();
            for l in &loaded {
                layout.merge(&amend_runtime::onnxruntime::SlotLayout::for_bundles([
                    &*l.bundle
                ])?);
            }
            let m =
                crate::backends::open_ort_with_slots(&args.model, &args.ort, args.threads, layout)?;
            (m.vocab().clone(), Some(m))
        }
    };
    let mut variants = vec![match &ort {
        None => Variant::base(),
        Some(m) => {
            let m = m.clone();
            Variant::new("base", move |_, opts| {
                Ok(amend_runtime::onnxruntime::OrtSession::new(
                    &m,
                    opts.n_ctx as usize,
                )?)
            })
        }
    }];
    for l in loaded {
        variants.push(l.variant(args.protocol, ort.clone())?);
    }
    let config = EvalConfig {
        gen_tokens: args.gen_tokens,
        n_threads: args.threads,
        ..Default::default()
    };

    let total = (records.len() * variants.len()) as u64;
    let bar = crate::progress_bar(total, "records");
    let started = Instant::now();
    let reports = eval::evaluate(&model, &records, &mut variants, &config, |p| {
        bar.set_message(p.variant.to_string());
        bar.set_position(p.done as u64);
    })?;
    bar.finish_and_clear();
    let elapsed = started.elapsed();

    if let Some(out) = out {
        out.write(&records_jsonl(&reports)?)?;
    }
    if let Some(summary) = summary {
        let value = summary_json(&reports);
        summary.write((serde_json::to_string_pretty(&value)? + "\n").as_bytes())?;
    }
    let rows: Vec<(String, Summary)> = reports
        .iter()
        .map(|r| (r.name.clone(), r.summary.clone()))
        .collect();
    let table = eval::markdown_table(&rows);
    if let Some(markdown) = markdown {
        markdown.write(table.as_bytes())?;
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

fn records_jsonl(reports: &[VariantReport]) -> anyhow::Result<Vec<u8>> {
    let mut w = Vec::new();
    for report in reports {
        for r in &report.records {
            serde_json::to_writer(&mut w, r)?;
            w.push(b'\n');
        }
    }
    Ok(w)
}

/// The variants' names, the bundles' file stems: each must be its own and not `base`, or the
/// summary's keys, the table's rows and the per-record lines would mix two variants.
fn variant_names(bundles: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for path in bundles {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        if name == "base" {
            anyhow::bail!(
                "--bundle {}: variants are named by the bundle's file stem, and `base` is the \
                 base model's; give the bundle another file name (a symbolic link serves)",
                path.display()
            );
        }
        if let Some(i) = names.iter().position(|n| *n == name) {
            if bundles[i] == *path {
                anyhow::bail!("--bundle {} is given twice", path.display());
            }
            anyhow::bail!(
                "--bundle {} and --bundle {} would both be the variant `{name}` (variants are \
                 named by the bundle's file stem); give one another file name (a symbolic link \
                 serves)",
                bundles[i].display(),
                path.display()
            );
        }
        names.push(name);
    }
    Ok(names)
}

/// No output may be an input or another output (`--out d.jsonl --data d.jsonl` replaced the
/// edit requests). A character device (/dev/null) may serve several outputs.
fn check_outputs(args: &Args) -> anyhow::Result<()> {
    let outputs: Vec<(&str, &Path)> = [
        ("--out", &args.out),
        ("--summary", &args.summary),
        ("--markdown", &args.markdown),
    ]
    .into_iter()
    .filter_map(|(flag, p)| Some((flag, p.as_deref()?)))
    .filter(|(_, p)| {
        use std::os::unix::fs::FileTypeExt;
        !std::fs::metadata(p).is_ok_and(|m| m.file_type().is_char_device())
    })
    .collect();
    let scope = args
        .scope_model
        .clone()
        .or_else(amend_runtime::default_scope_model_path);
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", &args.model), ("--data", &args.data)];
    inputs.extend(args.bundles.iter().map(|b| ("--bundle", b.as_path())));
    inputs.extend(args.pubkey.as_deref().map(|p| ("--pubkey", p)));
    inputs.extend(scope.as_deref().map(|p| ("--scope-model", p)));
    inputs.extend(args.ort.ort_lib.as_deref().map(|p| ("--ort-lib", p)));
    inputs.extend(args.ort.onnx.as_deref().map(|p| ("--onnx", p)));
    crate::check_outputs_apart(&outputs, &inputs)
}

/// A report file, checked before the evaluation and written after it, in place (so /dev/null
/// or a pipe serve). A FIFO or a device is opened now: opening a FIFO for writing waits for a
/// reader, and with none `--out FIFO` hung after the whole evaluation.
struct Output {
    flag: &'static str,
    path: PathBuf,
    file: Option<std::fs::File>,
}

/// How long a FIFO output may wait for its reader before it is refused.
const FIFO_READER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Output {
    fn prepare(flag: &'static str, path: &Path) -> anyhow::Result<Output> {
        use std::os::unix::fs::FileTypeExt;
        let cannot = || format!("{flag} {}: cannot write it", path.display());
        let file = match std::fs::metadata(path) {
            Ok(md) if md.file_type().is_fifo() => Some(open_fifo(flag, path)?),
            Ok(md) if !md.is_file() && !md.is_dir() => Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(cannot)?,
            ),
            Ok(_) => {
                // A regular file (a directory is refused here), writable now: opened, not
                // truncated, so a refused or failed run keeps it.
                crate::check_output_path(flag, path, false)?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(cannot)?;
                None
            }
            Err(_) => {
                crate::check_output_path(flag, path, false)?;
                None
            }
        };
        Ok(Output {
            flag,
            path: path.to_path_buf(),
            file,
        })
    }

    fn write(self, bytes: &[u8]) -> anyhow::Result<()> {
        let written = match self.file {
            Some(mut f) => f.write_all(bytes).and_then(|()| f.flush()),
            // Replaced whole, as every other output: a full disk leaves the old file, not a
            // truncated one.
            None => amend_edits::fsutil::write_atomic(&self.path, bytes, None),
        };
        written.with_context(|| format!("{} {}: cannot write it", self.flag, self.path.display()))
    }
}

/// Opens the FIFO at `path` for writing once a reader has it open, refusing it when none does
/// within [`FIFO_READER_WAIT`]. The open blocks until a reader comes, so it runs on a thread
/// (portable, unlike O_NONBLOCK's value); one left waiting ends with the process.
fn open_fifo(flag: &str, path: &Path) -> anyhow::Result<std::fs::File> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::Builder::new()
        .spawn(move || {
            let _ = tx.send(std::fs::OpenOptions::new().write(true).open(p));
        })
        .with_context(|| {
            format!(
                "{flag} {}: cannot start a thread to open it",
                path.display()
            )
        })?;
    match rx.recv_timeout(FIFO_READER_WAIT) {
        Ok(file) => file.with_context(|| format!("{flag} {}: cannot write it", path.display())),
        Err(_) => anyhow::bail!(
            "{flag} {}: a FIFO that nothing reads (no reader opened it within {} s); start its \
             reader first (e.g. `cat {} &`) or give a file",
            path.display(),
            FIFO_READER_WAIT.as_secs(),
            path.display()
        ),
    }
}

/// A verified bundle in its own live edit set, ready to become a variant.
struct LoadedBundle {
    name: String,
    set: Arc<EditSet>,
    bundle: Arc<amend_edits::Bundle>,
    ids: Vec<String>,
    scope: Option<Arc<amend_runtime::ScopeModel>>,
}

/// Verifies the bundle at `path` against `pubkey`, bound to `model_path`'s fingerprint, and
/// adds it to a live edit set of its own, as the variant `name`.
fn load_bundle(
    model_path: &Path,
    path: &Path,
    name: String,
    pubkey: &Path,
    scope: (
        Option<&Path>,
        Option<usize>,
        &mut Option<Arc<amend_runtime::ScopeModel>>,
    ),
) -> anyhow::Result<LoadedBundle> {
    let key = crate::keys::read_verifying_key(pubkey)?;
    let binding = amend_edits::fingerprint::model_binding(model_path)
        .with_context(|| format!("fingerprinting model {}", model_path.display()))?;
    let set = Arc::new(EditSet::new(binding, TrustStore::with_key(key)));
    let bytes = amend_edits::bundle::read_file(path)?;
    let bundle = set
        .open_buffer(bytes)
        .with_context(|| format!("bundle {}", path.display()))?;
    let scope = scope_for(&bundle, scope.0, scope.1, scope.2)
        .with_context(|| format!("bundle {}", path.display()))?;
    let ids: Vec<String> = bundle
        .manifest()
        .edits
        .iter()
        .map(|e| e.id.clone())
        .collect();
    set.add(bundle.clone(), AddOptions::default())
        .with_context(|| format!("bundle {}", path.display()))?;
    Ok(LoadedBundle {
        name,
        set,
        bundle,
        ids,
        scope,
    })
}

impl LoadedBundle {
    /// The variant: each session (llama.cpp, or ONNX Runtime on `ort`) follows the live set.
    fn variant(
        self,
        protocol: Protocol,
        ort: Option<Arc<amend_runtime::onnxruntime::OrtModel>>,
    ) -> anyhow::Result<Variant> {
        let LoadedBundle {
            name,
            set,
            ids,
            scope,
            ..
        } = self;
        let for_sessions = set.clone();
        let variant = match ort {
            None => Variant::new(name.clone(), move |model, opts| {
                let mut session = Session::new(model, opts.clone())?;
                session.set_scope_model(scope.clone())?;
                session.set_edit_set(Some(for_sessions.clone()))?;
                Ok(session)
            }),
            Some(m) => Variant::new(name.clone(), move |_, opts| {
                let mut session =
                    amend_runtime::onnxruntime::OrtSession::new(&m, opts.n_ctx as usize)?;
                session.set_scope_model(scope.clone())?;
                session.set_edit_set(Some(for_sessions.clone()))?;
                Ok(session)
            }),
        };
        if protocol == Protocol::Batch {
            return Ok(variant);
        }
        // Single: everything starts rolled back; each record restores its own edits (one
        // snapshot per record, so a request never sees a half-switched set).
        set.update(|tx| ids.iter().try_for_each(|id| tx.rollback_edit(id)))
            .with_context(|| format!("bundle {name}"))?;
        let mut active: Option<String> = None;
        Ok(variant.before_each_record(move |record| {
            let fail = |reason: String| eval::EvalError::Variant {
                name: name.clone(),
                reason,
            };
            if !ids.contains(&record.id) {
                return Err(fail(format!(
                    "--protocol single: record `{}` has no edit in the bundle (edit ids are the records' ids)",
                    record.id
                )));
            }
            let prev = active.replace(record.id.clone());
            set.update(|tx| {
                if let Some(prev) = &prev {
                    tx.rollback_edit(prev)?;
                }
                tx.restore_edit(&record.id)
            })
            .map_err(|e| fail(e.to_string()))?;
            Ok(())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_path() -> Option<PathBuf> {
        let path = std::env::var_os("AMEND_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                amend_edits::fsutil::cache_dir()
                    .unwrap_or_default()
                    .join("gemma3-270m-q4_k_m.gguf")
            });
        if path.exists() {
            return Some(path);
        }
        if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
            panic!(
                "AMEND_REQUIRE_MODEL=1 but the model {} is missing",
                path.display()
            );
        }
        eprintln!("skipped: real model {} not found", path.display());
        None
    }

    fn args(model: PathBuf, data: PathBuf, dir: &Path) -> Args {
        Args {
            model,
            bundles: vec![],
            pubkey: None,
            data,
            data_format: DataFormat::Auto,
            summary: Some(dir.join("summary.json")),
            out: Some(dir.join("records.jsonl")),
            markdown: Some(dir.join("table.md")),
            limit: Some(2),
            gen_tokens: 8,
            threads: None,
            protocol: Protocol::Batch,
            scope_model: None,
            backend: crate::backends::BackendName::Llama,
            ort: Default::default(),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("amend-eval-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn base_only_writes_summary_records_and_table() {
        let Some(model) = model_path() else { return };
        let dir = temp_dir("base");
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/dev-edits.json");
        run(args(model, data, &dir)).unwrap();
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["n"], 2);
        assert_eq!(summary["locality"], 100.0);
        let records = std::fs::read_to_string(dir.join("records.jsonl")).unwrap();
        assert_eq!(records.lines().count(), 2);
        assert!(std::fs::read_to_string(dir.join("table.md"))
            .unwrap()
            .contains("| base | 2 |"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let dir = temp_dir("bad");
        let data = dir.join("bad.json");
        std::fs::write(
            &data,
            r#"[{"prompt": "a", "target_new": "b"}, {"prompt": "c"}]"#,
        )
        .unwrap();
        let err = run(args(dir.join("no-model.gguf"), data.clone(), &dir)).unwrap_err();
        assert!(
            format!("{err:#}").contains("record 1: field `target_new`: missing"),
            "{err:#}"
        );

        std::fs::write(&data, r#"[{"prompt": "a", "target_new": "b"}]"#).unwrap();
        let mut a = args(dir.join("no-model.gguf"), data, &dir);
        a.bundles = vec![dir.join("x.amb")];
        let err = run(a).unwrap_err();
        assert!(err.to_string().contains("--pubkey"), "{err}");
        assert!(!dir.join("summary.json").exists());
        // Output paths are checked before the model loads (an evaluation can take an hour).
        let mut a = args(dir.join("no-model.gguf"), dir.join("bad.json"), &dir);
        a.summary = Some(dir.clone());
        let err = run(a).unwrap_err();
        assert!(
            err.to_string().contains("--summary") && err.to_string().contains("directory"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
