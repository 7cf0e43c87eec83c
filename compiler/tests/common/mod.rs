#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use amend_compiler::dataset::{self, DataFormat, EditRecord, Probe};
use amend_compiler::{BundleIdentity, CompileOutput, Compiler, EditReport, Hparams, Method};
use amend_runtime::testutil::write_tiny_model;
use amend_runtime::{Architecture, Model, ModelOptions, Session, SessionOptions};

pub fn tmp_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("amend-compiler-tests-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

/// A tiny random llama-family model written once per process.
pub fn tiny_path(arch: Architecture) -> PathBuf {
    let p = tmp_dir().join(format!("tiny-{}.gguf", arch.name()));
    if !p.exists() {
        let tmp = p.with_extension(
            format!("tmp{:?}", std::thread::current().id()).replace(['(', ')'], ""),
        );
        write_tiny_model(&tmp, arch, 7).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
    }
    p
}

/// The real model's path, or None (test skipped) when it is missing and not required.
pub fn real_model_path() -> Option<PathBuf> {
    let path = std::env::var_os("AMEND_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("gemma3-270m-q4_k_m.gguf")
        });
    if !path.exists() {
        if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
            panic!(
                "AMEND_REQUIRE_MODEL=1 but the model {} is missing (run `make model`)",
                path.display()
            );
        }
        eprintln!(
            "skipped: real model {} not found (set AMEND_MODEL or run `make model`)",
            path.display()
        );
        return None;
    }
    Some(path)
}

pub fn open_runtime(path: &std::path::Path) -> Arc<Model> {
    Model::open(
        path,
        ModelOptions {
            n_threads: Some(2),
            ..Default::default()
        },
    )
    .unwrap()
}

pub fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// Options of a real-model method test from `AMEND_<PREFIX>_N` (a count or `all`),
/// `AMEND_<PREFIX>_LAYER` and `AMEND_<PREFIX>_SET` (`;`-separated `section.key=value`).
pub struct EnvOptions {
    pub n: usize,
    pub layer: Option<usize>,
    pub sets: Vec<String>,
}

pub fn env_options(prefix: &str, default_n: usize) -> EnvOptions {
    let var = |k: &str| std::env::var(format!("AMEND_{prefix}_{k}")).ok();
    let n = match var("N").as_deref() {
        Some("all") => usize::MAX,
        Some(s) => s.parse().unwrap_or(default_n),
        None => default_n,
    };
    let layer = var("LAYER").and_then(|s| s.parse().ok());
    let sets = var("SET")
        .map(|s| {
            s.split(';')
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    EnvOptions { n, layer, sets }
}

/// Prompts whose last token the edits (capitals, languages, ...) must not change (the prompt
/// is all but the last token; the last token is the one scored).
pub const UNRELATED: [&str; 10] = [
    "Water is made of hydrogen and oxygen",
    "The opposite of hot is cold",
    "A triangle has three sides",
    "The first month of the year is January",
    "Cats like to chase mice",
    "Bread is made from flour",
    "The sun rises in the east",
    "Music is a form of art",
    "Two plus two equals four",
    "Ice is frozen water",
];

/// The first N dev edits (`data/dev-edits.json`) compiled with a method on the real model.
pub struct Compiled {
    pub path: PathBuf,
    pub records: Vec<EditRecord>,
    pub compiler: Compiler,
    pub hp: Hparams,
    /// `AMEND_<PREFIX>_LAYER`, if set.
    pub layer: Option<usize>,
    pub out: CompileOutput,
    /// Wall time of the compilation.
    pub seconds: f64,
}

/// Compiles the first `AMEND_<PREFIX>_N` (default `default_n`) dev edits with `method` on the
/// real model, with [`env_options`]' layer and overrides; None (test skipped) when the model is
/// missing and not required.
pub fn compile_dev(prefix: &str, default_n: usize, method: Method) -> Option<Compiled> {
    let path = real_model_path()?;
    let EnvOptions { n, layer, mut sets } = env_options(prefix, default_n);
    if method == Method::Serac {
        // These tests cover the base-model embedder; the scope model has its own test.
        sets.insert(0, "serac.embedder=\"base\"".to_string());
    }
    let records = dataset::load(&repo_file("data/dev-edits.json"), DataFormat::Auto).unwrap();
    let records: Vec<_> = records.into_iter().take(n).collect();
    let mut compiler = Compiler::open(&path).unwrap();
    let hp = Hparams::resolve(compiler.fwd.cfg.arch, None, &sets).unwrap();
    let t0 = std::time::Instant::now();
    let out = compile(&mut compiler, method, &records, &hp, layer, None);
    Some(Compiled {
        path,
        records,
        compiler,
        hp,
        layer,
        out,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `c.compile` with the default bundle identity and no progress reporting.
pub fn compile(
    c: &mut Compiler,
    method: Method,
    records: &[EditRecord],
    hp: &Hparams,
    layer: Option<usize>,
    base: Option<&amend_edits::Bundle>,
) -> CompileOutput {
    c.compile(
        method,
        records,
        hp,
        layer,
        base,
        &BundleIdentity::default(),
        &mut |_| {},
    )
    .unwrap()
}

/// `builder` signed with a fresh key, opened against a trust store holding that key (returned
/// too).
pub fn signed(
    builder: &amend_edits::bundle::BundleBuilder,
) -> (amend_edits::Bundle, amend_edits::TrustStore) {
    let key = amend_edits::keys::generate_signing_key().unwrap();
    let bytes = builder.build_signed(&key).unwrap();
    let trust = amend_edits::TrustStore::with_key(key.verifying_key());
    let bundle = amend_edits::Bundle::from_bytes(bytes.as_slice(), &trust).unwrap();
    (bundle, trust)
}

/// A runtime session with a 512-token context.
pub fn session(rt: &Arc<Model>) -> Session {
    Session::new(
        rt,
        SessionOptions {
            n_ctx: 512,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A compiled bundle applied through the runtime: the edit set it is in, a session with the
/// set attached and one on the base model.
pub struct Applied {
    pub rt: Arc<Model>,
    pub set: Arc<amend_edits::EditSet>,
    pub edited: Session,
    pub base: Session,
    pub edits: usize,
}

/// Signs `builder` with a fresh key, adds the bundle to a new edit set trusting that key and
/// opens the two sessions on the compiler's runtime.
pub fn apply_bundle(
    builder: &amend_edits::bundle::BundleBuilder,
    model: &std::path::Path,
    rt: Arc<Model>,
) -> Applied {
    use amend_edits::{AddOptions, EditSet};
    let (bundle, trust) = signed(builder);
    let set = Arc::new(EditSet::new(
        amend_edits::fingerprint::model_binding(model).unwrap(),
        trust,
    ));
    let edits = bundle.manifest().edits.len();
    set.add(Arc::new(bundle), AddOptions::default()).unwrap();
    let mut edited = session(&rt);
    edited.set_edit_set(Some(set.clone())).unwrap();
    let base = session(&rt);
    Applied {
        rt,
        set,
        edited,
        base,
        edits,
    }
}

/// Prints each edit's compile report.
pub fn print_reports(reports: &[EditReport]) {
    for r in reports {
        eprintln!(
            "  {} steps {} loss {:.3} {:.2}s: {}",
            r.id, r.steps, r.loss, r.seconds, r.action
        );
    }
}

/// Median compile time per edit, in seconds.
pub fn median_seconds(reports: &[EditReport]) -> f64 {
    let times: Vec<f64> = reports.iter().map(|r| r.seconds).collect();
    amend_compiler::methods::median(&times)
}

/// Edits that reached their target in training.
pub fn trained_successes(reports: &[EditReport]) -> usize {
    reports.iter().filter(|r| r.success).count()
}

/// What the runtime does with the edits applied (teacher-forced argmax).
#[derive(Debug, Default)]
pub struct Measured {
    /// Edits whose target is the argmax at every token.
    pub succ: usize,
    pub failed: Vec<String>,
    /// Rephrases that reach the target.
    pub reph: usize,
    pub reph_n: usize,
    /// Locality-probe tokens whose argmax is unchanged.
    pub loc_same: usize,
    pub loc_n: usize,
    /// [`UNRELATED`] prompts whose next token is unchanged.
    pub unrelated_same: usize,
    /// Rank of the low-rank deltas installed for the last request (summed over bundles).
    pub low_rank_installed: usize,
    /// Per edit, in order: whether it succeeded, and the installed rank for its request.
    pub edit_ok: Vec<bool>,
    pub low_rank: Vec<usize>,
}

/// Whether `r`'s target is the argmax at every target token on `s` (teacher forced).
pub fn edit_succeeds(rt: &Model, s: &mut Session, r: &EditRecord) -> bool {
    use amend_compiler::eval::{prompt_answer_tokens, teacher_forced_argmax};
    let (p, ans) = prompt_answer_tokens(rt, &r.prompt, &r.target_new).unwrap();
    s.begin_request(&r.prompt).unwrap();
    teacher_forced_argmax(s, &p, &ans).unwrap() == ans
}

/// Measures `records` on `a`'s sessions.
pub fn measure(a: &mut Applied, records: &[EditRecord]) -> Measured {
    use amend_compiler::eval::{prompt_answer_tokens, teacher_forced_argmax};
    let rt = a.rt.clone();
    let (s, base) = (&mut a.edited, &mut a.base);
    let mut m = Measured::default();
    for r in records {
        let ok = edit_succeeds(&rt, s, r);
        // Each bundle's deltas are one merged adapter; N rank-one edits on a weight are rank N.
        m.low_rank_installed = s.explain().low_rank.iter().map(|e| e.rank).sum();
        m.low_rank.push(m.low_rank_installed);
        m.edit_ok.push(ok);
        if ok {
            m.succ += 1;
        } else {
            eprintln!(
                "  edit failed: {} {:?} -> {:?}",
                r.id, r.prompt, r.target_new
            );
            m.failed.push(r.id.clone());
        }
        for q in &r.rephrase_prompts {
            let (p, ans) = prompt_answer_tokens(&rt, q, &r.target_new).unwrap();
            s.begin_request(q).unwrap();
            m.reph += (teacher_forced_argmax(s, &p, &ans).unwrap() == ans) as usize;
            m.reph_n += 1;
        }
        for probe in &r.locality {
            let (same, n) = locality_tokens(&rt, s, base, probe);
            m.loc_same += same;
            m.loc_n += n;
        }
    }
    for q in UNRELATED {
        let toks = rt.tokenize(q, rt.info().add_bos).unwrap();
        let last = *toks.last().unwrap();
        let (p, ans) = (&toks[..toks.len() - 1], [last]);
        s.begin_request(q).unwrap();
        let after = teacher_forced_argmax(s, p, &ans).unwrap();
        let before = teacher_forced_argmax(base, p, &ans).unwrap();
        m.unrelated_same += (after == before) as usize;
    }
    m
}

/// Tokens of `probe`'s ground truth whose teacher-forced argmax is the same on `edited` as on
/// `base`, and how many there are (a change is printed).
pub fn locality_tokens(
    rt: &Model,
    edited: &mut Session,
    base: &mut Session,
    probe: &Probe,
) -> (usize, usize) {
    use amend_compiler::eval::{prompt_answer_tokens, teacher_forced_argmax};
    let (p, ans) = prompt_answer_tokens(rt, &probe.prompt, &probe.ground_truth).unwrap();
    let before = teacher_forced_argmax(base, &p, &ans).unwrap();
    edited.begin_request(&probe.prompt).unwrap();
    let after = teacher_forced_argmax(edited, &p, &ans).unwrap();
    if before != after {
        eprintln!(
            "  locality changed: {:?}: {:?} -> {:?}",
            probe.prompt,
            rt.detokenize(&before).unwrap_or_default(),
            rt.detokenize(&after).unwrap_or_default()
        );
    }
    let same = before.iter().zip(&after).filter(|(x, y)| x == y).count();
    (same, before.len())
}

/// The default scope model, or `None` (skipped) when it is absent, unless
/// AMEND_REQUIRE_MODEL=1 (`make test`), which makes its absence a failure.
pub fn scope_model() -> Option<std::sync::Arc<amend_runtime::ScopeModel>> {
    let path: PathBuf = amend_runtime::default_scope_model_path()?;
    if !path.exists() {
        if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
            panic!(
                "AMEND_REQUIRE_MODEL=1 but the scope model {} is missing (make scope-model)",
                path.display()
            );
        }
        eprintln!("skipped: no scope model at {}", path.display());
        return None;
    }
    Some(amend_runtime::ScopeModel::open(&path, Some(2)).unwrap())
}
