//! End to end through the `amend` binary, as a user runs it: keygen -> compile -> verify ->
//! run (before/after, an unrelated prompt) -> eval, and the bad inputs `amend compile` and
//! `amend verify` must refuse with a specific message while writing nothing.
//!
//! Built as an integration test of `amend-cli` (cli/Cargo.toml), so the binary is fresh.
//! The real model (~/.cache/amend or AMEND_MODEL) is needed for the most part; without it these
//! tests skip, unless AMEND_REQUIRE_MODEL=1 (as under `make test`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

#[path = "support/tmpfs.rs"]
mod tmpfs;
use tmpfs::Tmpfs;

const PROMPT: &str = "The capital of France is";
const UNRELATED: &str = "The capital of Italy is";

fn tmp() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("amend-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

fn real_model() -> Option<PathBuf> {
    present(
        std::env::var_os("AMEND_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                amend_edits::fsutil::cache_dir()
                    .unwrap_or_default()
                    .join("gemma3-270m-q4_k_m.gguf")
            }),
    )
}

/// `path` when it exists; else `None` (the test skips), or a panic under AMEND_REQUIRE_MODEL=1.
fn present(path: PathBuf) -> Option<PathBuf> {
    if path.exists() {
        return Some(path);
    }
    if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!("AMEND_REQUIRE_MODEL=1 but {} is missing", path.display());
    }
    eprintln!("skipped: {} is missing", path.display());
    None
}

fn amend(args: &[&str]) -> Output {
    amend_with(args, &[])
}

/// `amend` with extra environment variables.
fn amend_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(args)
        .env_remove("AMEND_MODEL")
        .env_remove("SOURCE_DATE_EPOCH")
        .envs(env.iter().copied())
        .output()
        .expect("the amend binary runs");
    eprintln!(
        "$ amend {}\n  exit {:?}\n  stdout: {}\n  stderr (tail): {}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        tail(&String::from_utf8_lossy(&out.stderr), 3)
    );
    out
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn ok(args: &[&str]) -> String {
    let out = amend(args);
    assert!(out.status.success(), "amend {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Fails with exit code != 0 and a message on stderr containing every one of `needles`.
fn refused(args: &[&str], needles: &[&str]) {
    let out = amend(args);
    assert!(!out.status.success(), "amend {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr of {args:?} lacks {n:?}:\n{err}");
    }
}

/// A tiny llama GGUF written at `path` (for what needs a model file but not the real model).
fn tiny_model(path: PathBuf) -> PathBuf {
    amend_runtime::testutil::write_tiny_model(&path, amend_runtime::Architecture::Llama, 3)
        .unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn keypair(name: &str) -> (PathBuf, PathBuf) {
    let prefix = tmp().join(name);
    ok(&["keygen", "--out", s(&prefix), "--force"]);
    (prefix.with_extension("key"), prefix.with_extension("pub"))
}

/// A scratch directory `name`, a key pair `key_name` and a one-edit JSONL file in it (PROMPT ->
/// "Berlin"): (dir, private key, public key, edits).
fn one_edit(name: &str, key_name: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = tmp().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair(key_name);
    let edits = dir.join("edit.jsonl");
    std::fs::write(
        &edits,
        format!("{{\"prompt\": \"{PROMPT}\", \"subject\": \"France\", \"target\": \"Berlin\"}}\n"),
    )
    .unwrap();
    (dir, key, public, edits)
}

/// `amend run` of `prompt` (4 tokens, one thread), with `bundle` (and its public key) if given,
/// plus `extra`.
fn run_args<'a>(
    model: &'a Path,
    prompt: &'a str,
    bundle: Option<(&'a Path, &'a Path)>,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--model",
        s(model),
        "--prompt",
        prompt,
        "--max-tokens",
        "4",
        "--threads",
        "1",
    ];
    if let Some((b, p)) = bundle {
        args.extend(["--bundle", s(b), "--pubkey", s(p)]);
    }
    args.extend_from_slice(extra);
    args
}

fn generate(model: &Path, prompt: &str, bundle: Option<(&Path, &Path)>) -> String {
    ok(&run_args(model, prompt, bundle, &[]))
}

/// `amend eval` of `bundle` on `data`, short generations, one thread, plus `extra`.
fn eval_args<'a>(
    model: &'a Path,
    bundle: &'a Path,
    public: &'a Path,
    data: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "eval",
        "--model",
        s(model),
        "--bundle",
        s(bundle),
        "--pubkey",
        s(public),
        "--data",
        s(data),
        "--gen-tokens",
        "8",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn compile_verify_run_eval_one_edit() {
    let Some(model) = real_model() else {
        return;
    };
    let (dir, key, public, edits) = one_edit("one-edit", "e2e");

    let before = generate(&model, PROMPT, None);
    // The base model greedily continues " the capital of the" here: no Berlin.
    assert!(!before.contains("Berlin"), "{before}");
    let unrelated_before = generate(&model, UNRELATED, None);

    let bundle = dir.join("france.amend");
    let report = ok(&[
        "compile",
        "--model",
        s(&model),
        "--method",
        "grace",
        "--edits",
        s(&edits),
        "--out",
        s(&bundle),
        "--key",
        s(&key),
    ]);
    assert!(report.contains("1/1 reach their target"), "{report}");
    // The compiler checked the edit through the runtime and signed where into the bundle.
    assert!(
        report.contains(&format!(
            "verified on {}: 1/1 edit(s) answer their target",
            amend_runtime::LLAMA_CPP_BACKEND_ID
        )),
        "{report}"
    );
    let info = ok(&["inspect", s(&bundle), "--pubkey", s(&public)]);
    assert!(
        info.contains(&format!(
            "verified {} 1/1 (other backends warn",
            amend_runtime::LLAMA_CPP_BACKEND_ID
        )),
        "{info}"
    );
    assert!(info.contains("format   1.2"), "{info}");
    ok(&[
        "verify",
        s(&bundle),
        "--pubkey",
        s(&public),
        "--model",
        s(&model),
    ]);

    let after = generate(&model, PROMPT, Some((&bundle, &public)));
    assert!(after.trim_start().starts_with("Berlin"), "{after}");
    let unrelated_after = generate(&model, UNRELATED, Some((&bundle, &public)));
    assert_eq!(unrelated_after, unrelated_before);

    let eval_summary = |extra: &[&str]| -> serde_json::Value {
        let path = dir.join("summary.json");
        let _ = std::fs::remove_file(&path);
        ok(&eval_args(
            &model,
            &bundle,
            &public,
            &edits,
            &[&["--summary", s(&path)], extra].concat(),
        ));
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    };
    let summary = eval_summary(&[]);
    assert_eq!(summary["n"], 1, "{summary}");
    assert_eq!(summary["edit_succ"].as_f64(), Some(100.0), "{summary}");
    assert_eq!(summary["gen_contains"].as_f64(), Some(100.0), "{summary}");

    // KnowEdit's single-edit protocol: the record sees its own edit; a record the bundle has
    // no edit for is named.
    let single = eval_summary(&["--protocol", "single"]);
    assert_eq!(single["edit_succ"].as_f64(), Some(100.0), "{single}");
    let two = dir.join("two.jsonl");
    std::fs::write(
        &two,
        format!(
            "{{\"prompt\": \"{PROMPT}\", \"target\": \"Berlin\"}}\n{{\"prompt\": \"{UNRELATED}\", \"target\": \"Oslo\"}}\n"
        ),
    )
    .unwrap();
    refused(
        &eval_args(&model, &bundle, &public, &two, &["--protocol", "single"]),
        &["has no edit in the bundle"],
    );

    // A flipped payload byte, another signer, and no key at all are refused, naming why.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    let tampered = dir.join("tampered.amend");
    std::fs::write(&tampered, &bytes).unwrap();
    refused(
        &["verify", s(&tampered), "--pubkey", s(&public)],
        &["sha256 mismatch"],
    );
    let out = amend(&run_args(&model, PROMPT, Some((&tampered, &public)), &[]));
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "nothing is generated with a refused bundle"
    );
    let (_, other) = keypair("e2e-other");
    refused(
        &["verify", s(&bundle), "--pubkey", s(&other)],
        &["unknown key"],
    );
}

#[test]
fn compile_refuses_bad_input_and_writes_nothing() {
    let dir = tmp().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair("e2e-bad");
    let out = dir.join("never.amend");
    let compile = |model: &Path, method: &str, edits: &Path, extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "compile",
            "--model",
            s(model),
            "--method",
            method,
            "--edits",
            s(edits),
            "--out",
            s(&out),
            "--key",
            s(&key),
        ];
        args.extend_from_slice(extra);
        refused(&args, needles);
        assert!(!out.exists(), "a refused compile wrote {}", out.display());
        assert!(!out.with_extension("lora.gguf").exists());
    };
    let good = dir.join("good.jsonl");
    std::fs::write(
        &good,
        format!("{{\"prompt\": \"{PROMPT}\", \"subject\": \"France\", \"target\": \"Berlin\"}}\n"),
    )
    .unwrap();
    let malformed = dir.join("malformed.json");
    std::fs::write(
        &malformed,
        "[{\"prompt\": \"The capital of\", \"target_new\": ",
    )
    .unwrap();
    let empty_target = dir.join("empty-target.json");
    std::fs::write(
        &empty_target,
        r#"[{"prompt": "The sky is", "target_new": "green"},
            {"prompt": "Grass is", "target_new": "  "}]"#,
    )
    .unwrap();

    // An architecture without a forward: a tiny llama GGUF renamed to another llama.cpp
    // architecture (names are stored as plain strings; the check runs before any tensor load).
    let tiny = tiny_model(dir.join("tiny.gguf"));
    let renamed = dir.join("mamba.gguf");
    let bytes = std::fs::read(&tiny).unwrap();
    let mut patched = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"llama") {
            patched.extend_from_slice(b"mamba");
            i += 5;
        } else {
            patched.push(bytes[i]);
            i += 1;
        }
    }
    std::fs::write(&renamed, patched).unwrap();
    compile(&renamed, "grace", &good, &[], &["mamba"]);
    compile(&tiny, "grace", &malformed, &[], &["malformed.json"]);
    compile(&tiny, "sculpt", &good, &[], &["sculpt"]);
    compile(&tiny, "grace", &good, &["--layer", "third"], &["third"]);
    compile(
        &tiny,
        "serac",
        &good,
        &["--layer", "auto"],
        &["serac", "auto"],
    );
    compile(&tiny, "grace", &good, &["--set", "grace.nope=1"], &["nope"]);
    // A scope model given to a method that routes without one would be silently ignored.
    compile(
        &tiny,
        "grace",
        &good,
        &["--scope-model", s(&tiny)],
        &["--scope-model", "grace would ignore it"],
    );
    compile(
        &tiny,
        "serac",
        &good,
        &[
            "--scope-model",
            s(&tiny),
            "--set",
            "serac.embedder=\"base\"",
        ],
        &["--scope-model", "serac.embedder is \"base\""],
    );
    // Checked with the arguments: it used to fail at the drift check, after training.
    compile(
        &tiny,
        "grace",
        &good,
        &["--threads", "0"],
        &["--threads", "1..=512"],
    );
    // The two key files look alike (64 hex characters): a public key given to sign with was
    // read as a secret seed and signed with a key nobody trusts.
    let (m, e, o, k, p) = (s(&tiny), s(&good), s(&out), s(&key), s(&public));
    refused(
        &[
            "compile", "--model", m, "--method", "grace", "--edits", e, "--out", o, "--key", p,
        ],
        &["that is a public key file"],
    );
    refused(&["sign", o, "--key", p], &["that is a public key file"]);
    refused(
        &["verify", o, "--pubkey", k],
        &["that is a secret key file"],
    );
    refused(
        &[
            "run", "--model", m, "--prompt", "a", "--bundle", o, "--pubkey", k,
        ],
        &["that is a secret key file"],
    );
    assert!(!out.exists());
    // Where the bundle cannot be written is found before training, not after it.
    let bad_out = |o: &Path, needle: &str| {
        refused(
            &[
                "compile",
                "--model",
                m,
                "--method",
                "grace",
                "--edits",
                e,
                "--out",
                s(o),
                "--key",
                k,
            ],
            &[needle],
        )
    };
    bad_out(&dir, "that is a directory");
    bad_out(&dir.join("missing").join("b.amend"), "does not exist");
    // The bundle is renamed over --out: a FIFO (or /dev/null) there would be replaced.
    let fifo = dir.join("out.fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    bad_out(&fifo, "that is a FIFO, not a regular file");
    let no_subject = dir.join("no-subject.jsonl");
    std::fs::write(
        &no_subject,
        format!("{{\"prompt\": \"{PROMPT}\", \"target\": \"Berlin\"}}\n"),
    )
    .unwrap();
    compile(
        &tiny,
        "memit",
        &no_subject,
        &[],
        &[
            "record 0",
            "missing `subject`",
            "memit.allow_missing_subject=true",
        ],
    );

    let Some(model) = real_model() else {
        return;
    };
    compile(&model, "grace", &empty_target, &[], &["record 1", "target"]);
    compile(&model, "rome", &good, &["--layer", "99"], &["99", "18"]);
}

/// `amend compile` of `edits` to `out` with `key`, plus `extra`.
fn compile_args<'a>(
    model: &'a Path,
    method: &'a str,
    edits: &'a Path,
    out: &'a Path,
    key: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "compile",
        "--model",
        s(model),
        "--method",
        method,
        "--edits",
        s(edits),
        "--out",
        s(out),
        "--key",
        s(key),
    ];
    args.extend_from_slice(extra);
    args
}

/// The first `n` records of data/dev-edits.json, written to `path`.
fn dev_edits(path: &Path, n: usize) {
    let all: serde_json::Value =
        serde_json::from_str(include_str!("../data/dev-edits.json")).unwrap();
    let some: Vec<_> = all.as_array().unwrap()[..n].to_vec();
    std::fs::write(path, serde_json::to_vec(&some).unwrap()).unwrap();
}

/// Files in `dir` whose names start with `stem` (the bundle, its checkpoint, temporary files).
fn files_of(dir: &Path, stem: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(stem))
        .collect();
    v.sort();
    v
}

const EPOCH: (&str, &str) = ("SOURCE_DATE_EPOCH", "1700000000");

/// A compile stopped after k edits resumes from OUT.ckpt and writes the bytes an uninterrupted
/// compile writes; a checkpoint for other hyperparameters or edits is refused (and --restart
/// replaces it).
#[test]
fn compile_resumes_from_its_checkpoint_byte_identical() {
    let Some(model) = real_model() else {
        return;
    };
    let dir = tmp().join("resume");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, _) = keypair("e2e-resume");
    let edits = dir.join("three.json");
    dev_edits(&edits, 3);
    for (method, stop) in [("grace", "1"), ("rome", "2")] {
        let full = dir.join(format!("{method}-full.amend"));
        let part = dir.join(format!("{method}-part.amend"));
        let ckpt = dir.join(format!("{method}-part.amend.ckpt"));
        let base = ["--no-drift-check", "--allow-partial"];
        let t = std::time::Instant::now();
        let out = amend_with(
            &compile_args(&model, method, &edits, &full, &key, &base),
            &[EPOCH],
        );
        assert!(out.status.success());
        let uninterrupted = t.elapsed().as_secs_f64();
        assert!(
            !dir.join(format!("{method}-full.amend.ckpt")).exists(),
            "removed on success"
        );

        let stopped = amend_with(
            &compile_args(
                &model,
                method,
                &edits,
                &part,
                &key,
                &[&base[..], &["--test-stop-after", stop]].concat(),
            ),
            &[EPOCH],
        );
        assert!(!stopped.status.success());
        let err = String::from_utf8_lossy(&stopped.stderr);
        assert!(
            err.contains(&format!("stopped after {stop} of 3 edits")),
            "{err}"
        );
        assert!(ckpt.exists() && !part.exists());
        assert_eq!(
            files_of(&dir, &format!("{method}-part")),
            [format!("{method}-part.amend.ckpt")]
        );

        // Other hyperparameters, other edits: refused, naming what differs; nothing written.
        let lr = format!("{method}.lr=0.123");
        refused(
            &compile_args(
                &model,
                method,
                &edits,
                &part,
                &key,
                &[&base[..], &["--set", &lr]].concat(),
            ),
            &["other hyperparameters", "--restart"],
        );
        let two = dir.join("two.json");
        dev_edits(&two, 2);
        refused(
            &compile_args(&model, method, &two, &part, &key, &base),
            &["other edits", "--restart"],
        );
        assert!(!part.exists());

        let t = std::time::Instant::now();
        let resumed = amend_with(
            &compile_args(&model, method, &edits, &part, &key, &base),
            &[EPOCH],
        );
        assert!(resumed.status.success());
        let resumed_secs = t.elapsed().as_secs_f64();
        let err = String::from_utf8_lossy(&resumed.stderr);
        assert!(
            err.contains(&format!("{stop}/3 edit(s) already done")),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&full).unwrap(),
            std::fs::read(&part).unwrap(),
            "{method}: the resumed bundle differs from the uninterrupted one"
        );
        assert!(
            !ckpt.exists(),
            "the checkpoint is removed once the bundle is written"
        );
        eprintln!("{method}: uninterrupted {uninterrupted:.1} s, resumed after {stop} edit(s) {resumed_secs:.1} s");
    }

    // --restart ignores (and replaces) a checkpoint for other edits.
    let part = dir.join("grace-part.amend");
    let stopped = amend(&compile_args(
        &model,
        "grace",
        &edits,
        &part,
        &key,
        &["--no-drift-check", "--test-stop-after", "1"],
    ));
    assert!(!stopped.status.success());
    let one = dir.join("one.json");
    dev_edits(&one, 1);
    ok(&compile_args(
        &model,
        "grace",
        &one,
        &part,
        &key,
        &["--no-drift-check", "--restart"],
    ));
    assert!(part.exists() && !dir.join("grace-part.amend.ckpt").exists());
}

/// The compiler checks its own output before writing it: a bundle that fails that check (a
/// byte flipped by a test hook) is refused, and neither it nor a temporary file is left.
#[test]
fn compile_self_check_failure_writes_nothing() {
    let Some(model) = real_model() else {
        return;
    };
    let dir = tmp().join("selfcheck");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, _) = keypair("e2e-selfcheck");
    let edits = dir.join("one.json");
    dev_edits(&edits, 1);
    let out = dir.join("corrupt.amend");
    refused(
        &compile_args(
            &model,
            "grace",
            &edits,
            &out,
            &key,
            &["--test-corrupt-output"],
        ),
        &[
            "the compiled bundle does not verify",
            "sha256 mismatch",
            "nothing was written",
        ],
    );
    // Only the checkpoint of the (sound) training is left, for a rerun to resume from.
    assert_eq!(files_of(&dir, "corrupt"), ["corrupt.amend.ckpt"]);
}

/// Edits that miss their target are named and the bundle is not written unless
/// --allow-partial; a bundle that moves the model on the drift probes is refused unless
/// --allow-drift; a good bundle passes with its probe figure printed.
#[test]
fn compile_refuses_partial_and_drifting_bundles() {
    let Some(model) = real_model() else {
        return;
    };
    let dir = tmp().join("guard");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, _) = keypair("e2e-guard");
    let edits = dir.join("two.json");
    dev_edits(&edits, 2);

    // One Adam step does not reach the targets.
    let partial = dir.join("partial.amend");
    let args = compile_args(
        &model,
        "grace",
        &edits,
        &partial,
        &key,
        &["--set", "grace.steps=1", "--no-drift-check"],
    );
    refused(
        &args,
        &["do not reach their target", "dev-001", "--allow-partial"],
    );
    assert_eq!(files_of(&dir, "partial"), ["partial.amend.ckpt"]);
    // The rerun resumes the kept edits (no training) and writes them.
    let report = ok(&[&args[..], &["--allow-partial"]].concat());
    assert!(report.contains("not reached: dev-001"), "{report}");
    assert!(report.contains("2 edit(s) resumed"), "{report}");
    assert_eq!(files_of(&dir, "partial"), ["partial.amend"]);
    // The closed loop through the runtime names the miss too, and the record says so: a
    // runtime warns about this bundle even on llama.cpp.
    assert!(
        report.contains(&format!(
            "fail on {}: dev-001",
            amend_runtime::LLAMA_CPP_BACKEND_ID
        )),
        "{report}"
    );

    // T-Patcher says why an edit falls short: one step leaves the target unanswered.
    let tp = dir.join("tp.amend");
    let report = ok(&compile_args(
        &model,
        "tpatcher",
        &edits,
        &tp,
        &key,
        &[
            "--set",
            "tpatcher.steps=1",
            "--no-drift-check",
            "--allow-partial",
        ],
    ));
    assert!(
        report.contains("not reached: dev-001")
            && report.contains("; short: the compiler's forward does not answer the target"),
        "{report}"
    );

    // A radius covering every key: the edit's value replaces the FFN output everywhere.
    let one = dir.join("one.json");
    dev_edits(&one, 1);
    let drift = dir.join("drift.amend");
    let args = compile_args(
        &model,
        "grace",
        &one,
        &drift,
        &key,
        &["--set", "grace.radius=2"],
    );
    refused(
        &args,
        &[
            "moves the model on unrelated prompts",
            "--min-probe-locality",
            "--allow-drift",
        ],
    );
    assert_eq!(files_of(&dir, "drift"), ["drift.amend.ckpt"]);
    let report = ok(&[&args[..], &["--allow-drift"]].concat());
    assert!(
        report.contains("written anyway (--allow-drift)"),
        "{report}"
    );
    assert!(drift.exists());

    // The same edit with the default radius: within the default minimum.
    let good = dir.join("good.amend");
    let report = ok(&compile_args(&model, "grace", &one, &good, &key, &[]));
    assert!(report.contains("probe locality: "), "{report}");
    assert!(!report.contains("below the minimum"), "{report}");
    assert_eq!(files_of(&dir, "good"), ["good.amend"]);
}

/// MEMIT under `--preset auto` compiles a batch that mixes questions and statements in two
/// stages (the questions with the defaults, then the statements with memit-statements on top):
/// the same deltas as the two compiles a user would run by hand (`--base-bundle`), one bundle of
/// one version, and a compile stopped in the first stage resumes to the same bytes.
#[test]
fn memit_compiles_a_mixed_batch_form_by_form() {
    let Some(model) = real_model() else {
        return;
    };
    let dir = tmp().join("split");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair("e2e-split");
    let all: serde_json::Value =
        serde_json::from_str(include_str!("../data/memory-dev.json")).unwrap();
    let first = |question: bool| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|r| r["prompt"].as_str().unwrap().ends_with('?') == question)
            .unwrap()
            .clone()
    };
    let (q, st) = (first(true), first(false));
    let write = |name: &str, recs: Vec<serde_json::Value>| {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_vec(&recs).unwrap()).unwrap();
        p
    };
    // Statement first: the stages go by form, not by order.
    let mixed = write("mixed.json", vec![st.clone(), q.clone()]);
    let questions = write("questions.json", vec![q]);
    let statements = write("statements.json", vec![st]);
    let base = ["--no-drift-check", "--allow-partial", "--threads", "1"];

    let split = dir.join("split.amend");
    let out = amend_with(
        &compile_args(&model, "memit", &mixed, &split, &key, &base),
        &[EPOCH],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", tail(&err, 2000));
    assert!(
        err.contains("mixes 1 question(s) and 1 statement(s)"),
        "{err}"
    );
    assert!(
        err.contains("stage 1/2: 1 questions with preset none"),
        "{err}"
    );
    assert!(
        err.contains("stage 2/2: 1 statements with preset memit-statements"),
        "{err}"
    );
    assert_eq!(files_of(&dir, "split"), ["split.amend", "split.lora.gguf"]);
    let info = ok(&["inspect", s(&split), "--pubkey", s(&public)]);
    assert!(info.contains("version 1"), "{info}");

    // By hand: the questions, then the statements on top (auto picks the preset for them).
    let q_only = dir.join("hand-q.amend");
    ok(&compile_args(
        &model,
        "memit",
        &questions,
        &q_only,
        &key,
        &[&base[..], &["--preset", "none"]].concat(),
    ));
    let by_hand = dir.join("hand.amend");
    ok(&compile_args(
        &model,
        "memit",
        &statements,
        &by_hand,
        &key,
        &[&base[..], &["--base-bundle", s(&q_only)]].concat(),
    ));
    assert_eq!(
        std::fs::read(dir.join("split.lora.gguf")).unwrap(),
        std::fs::read(dir.join("hand.lora.gguf")).unwrap(),
        "the split compile's deltas differ from the two compiles by hand"
    );

    // Stopped after the first stage's edit: its checkpoint is kept, and the rerun resumes it.
    let part = dir.join("part.amend");
    let stopped = amend_with(
        &compile_args(
            &model,
            "memit",
            &mixed,
            &part,
            &key,
            &[&base[..], &["--test-stop-after", "1"]].concat(),
        ),
        &[EPOCH],
    );
    assert!(!stopped.status.success());
    assert_eq!(files_of(&dir, "part"), ["part.amend.ckpt.questions"]);
    let resumed = amend_with(
        &compile_args(&model, "memit", &mixed, &part, &key, &base),
        &[EPOCH],
    );
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{}", tail(&err, 2000));
    assert!(err.contains("1/1 edit(s) already done"), "{err}");
    assert_eq!(
        std::fs::read(&split).unwrap(),
        std::fs::read(&part).unwrap(),
        "the resumed split compile differs from the uninterrupted one"
    );
    assert_eq!(files_of(&dir, "part"), ["part.amend", "part.lora.gguf"]);
}

/// Both ONNX Runtime libraries of scripts/fetch-ort.sh, or a skip (a failure under
/// AMEND_REQUIRE_MODEL=1).
fn ort_libraries() -> bool {
    use amend_runtime::onnxruntime::{default_library, Ep};
    for ep in [Ep::Cpu, Ep::parse("openvino").unwrap()] {
        let p = default_library(&ep);
        if !p.exists() {
            if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
                panic!(
                    "AMEND_REQUIRE_MODEL=1 but {} is missing (make ort)",
                    p.display()
                );
            }
            eprintln!("skipped: {} is missing", p.display());
            return false;
        }
    }
    true
}

/// GRACE keys its codebook on hidden states, which ONNX Runtime computes a little differently:
/// for this prompt its key lies 0.27 from llama.cpp's (radius 0.12), so a bundle keyed on
/// llama.cpp alone misses there. `--verify-ort` gives the edit a second row keyed on ORT, and
/// the same bundle then answers on both backends.
#[test]
fn grace_verify_ort_keys_the_codebook_on_onnx_runtime_too() {
    let Some(model) = real_model() else {
        return;
    };
    if !ort_libraries() {
        return;
    }
    let prompt = "The occupation of Sigmund Freud is";
    let dir = tmp().join("grace-ort-keys");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair("e2e-grace-ort");
    let edits = dir.join("edit.jsonl");
    std::fs::write(
        &edits,
        format!("{{\"prompt\": \"{prompt}\", \"target\": \"physicist\"}}\n"),
    )
    .unwrap();
    let run = |bundle: &Path, backend: &[&str]| {
        let mut extra = vec!["--explain"];
        extra.extend_from_slice(backend);
        if backend.contains(&"ort") {
            // llama.cpp refuses ONNX Runtime flags.
            extra.push("--no-onnx-cache");
        }
        let out = amend(&run_args(&model, prompt, Some((bundle, &public)), &extra));
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let llama: &[&str] = &["--backend", "llama"];
    let ort: &[&str] = &["--backend", "ort", "--ep", "cpu"];

    // Keyed on llama.cpp only: it answers there and misses on ORT (no hit at that distance).
    let plain = dir.join("plain.amend");
    let report = ok(&compile_args(&model, "grace", &edits, &plain, &key, &[]));
    assert!(!report.contains("keyed on ONNX Runtime"), "{report}");
    let (out, err) = run(&plain, llama);
    assert!(out.contains("physicist"), "{out}\n{err}");
    let (out, err) = run(&plain, ort);
    assert!(
        !out.contains("physicist") && err.contains("no hit"),
        "{out}\n{err}"
    );

    // Keyed on both: one more row, and every backend hits the row keyed on its own states.
    let both = dir.join("both.amend");
    let report = ok(&compile_args(
        &model,
        "grace",
        &edits,
        &both,
        &key,
        &["--verify-ort", "cpu"],
    ));
    assert!(
        report.contains("1 edit(s) got codebook rows keyed on ONNX Runtime")
            && report.contains(&format!(
                ":cpu/g{}-cpu: 1/1 edit(s) answer their target",
                amend_runtime::onnxruntime::graph::GRAPH_VERSION
            )),
        "{report}"
    );
    for backend in [llama, ort] {
        let (out, err) = run(&both, backend);
        assert!(
            out.contains("physicist") && err.contains("REPLACED") && !err.contains("WARNING"),
            "{backend:?}: {out}\n{err}"
        );
    }
}

/// `--verify-on` records the backends every edit was checked on; a runtime on another backend
/// warns in explain, or refuses a bundle compiled with `--require-verified`.
#[test]
fn verification_record_binds_a_bundle_to_its_backends() {
    let Some(model) = real_model() else {
        return;
    };
    if !ort_libraries() {
        return;
    }
    let (dir, key, public, edits) = one_edit("verified", "e2e-verified");
    let compile = |out: &Path, extra: &[&str]| {
        let args = compile_args(&model, "grace", &edits, out, &key, extra);
        ok(&args)
    };
    let run = |bundle: &Path, ep: &str| {
        amend(&run_args(
            &model,
            PROMPT,
            Some((bundle, &public)),
            &[
                "--backend",
                "ort",
                "--ep",
                ep,
                "--no-onnx-cache",
                "--explain",
            ],
        ))
    };

    let strict = dir.join("strict.amend");
    let report = compile(
        &strict,
        &["--verify-on", "llama.cpp,ort:cpu", "--require-verified"],
    );
    // ONNX Runtime's id carries the library's version and the graph's (onnxruntime-1.32.0:cpu/g7-cpu).
    let cpu_id = format!(
        ":cpu/g{}-cpu",
        amend_runtime::onnxruntime::graph::GRAPH_VERSION
    );
    for b in [amend_runtime::LLAMA_CPP_BACKEND_ID, cpu_id.as_str()] {
        assert!(
            report.contains(&format!("{b}: 1/1 edit(s) answer their target")),
            "{report}"
        );
    }
    let info = ok(&["inspect", s(&strict), "--pubkey", s(&public)]);
    assert!(
        info.contains(&format!(
            "verified {} 1/1, onnxruntime-",
            amend_runtime::LLAMA_CPP_BACKEND_ID
        )) && info.contains(&format!("{cpu_id} 1/1 (required")),
        "{info}"
    );
    let on_cpu = run(&strict, "cpu");
    assert!(on_cpu.status.success());
    assert!(String::from_utf8_lossy(&on_cpu.stdout).contains("Berlin"));
    assert!(!String::from_utf8_lossy(&on_cpu.stderr).contains("WARNING"));
    // OpenVINO was not verified on: refused, nothing generated.
    let on_ov = run(&strict, "openvino");
    assert!(!on_ov.status.success());
    assert!(on_ov.stdout.is_empty());
    let err = String::from_utf8_lossy(&on_ov.stderr);
    assert!(
        err.contains("must run on a backend its edits were verified on")
            && err.contains(":openvino:CPU"),
        "{err}"
    );

    // The default record (llama.cpp only, not required): ONNX Runtime applies it and warns.
    let lenient = dir.join("lenient.amend");
    compile(&lenient, &[]);
    let out = run(&lenient, "cpu");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WARNING bundle")
            && err.contains("was not verified on onnxruntime-")
            && err.contains(&format!(
                "{cpu_id} (verified on {} 1/1)",
                amend_runtime::LLAMA_CPP_BACKEND_ID
            )),
        "{err}"
    );

    // --verify-on none: no record, a v1.1 bundle.
    let bare = dir.join("bare.amend");
    compile(&bare, &["--verify-on", "none"]);
    let info = ok(&["inspect", s(&bare), "--pubkey", s(&public)]);
    assert!(
        info.contains("format   1.1") && info.contains("not recorded"),
        "{info}"
    );
    // Bad lists are refused before anything is trained.
    let bad: [(&str, &[&str], &str); 3] = [
        (
            "grace",
            &["--verify-on", "ort:warp9"],
            "--verify-on ort:warp9",
        ),
        (
            "tpatcher",
            &["--verify-ort", "cpu,warp9"],
            "--verify-ort warp9",
        ),
        ("rome", &["--verify-ort", "cpu"], "only tpatcher and grace"),
    ];
    let x = dir.join("x.amend");
    for (method, extra, needle) in bad {
        refused(
            &compile_args(&model, method, &edits, &x, &key, extra),
            &[needle],
        );
    }
}

/// Compiles `records` with `amend compile --method serac` (in `name`'s own directory, with `extra`
/// compile flags) and routes the same records with `amend scope-model route --dump`: the dump's
/// lines. `None` (test skipped) without the real model or the scope model.
fn serac_route_dump(
    name: &str,
    records: &[&serde_json::Value],
    extra: &[&str],
) -> Option<Vec<serde_json::Value>> {
    let model = real_model()?;
    let scope = amend_runtime::default_scope_model_path().and_then(present)?;
    let dir = tmp().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair(&format!("e2e-{name}"));
    let data = dir.join("records.json");
    std::fs::write(&data, serde_json::to_vec(records).unwrap()).unwrap();
    let bundle = dir.join("records.amend");
    let mut args = compile_args(&model, "serac", &data, &bundle, &key, extra);
    args.extend(["--scope-model", s(&scope)]);
    ok(&args);
    let dump = dir.join("route.jsonl");
    ok(&[
        "scope-model",
        "route",
        "--bundle",
        s(&bundle),
        "--pubkey",
        s(&public),
        "--data",
        s(&data),
        "--scope-model",
        s(&scope),
        "--dump",
        s(&dump),
    ]);
    Some(
        std::fs::read_to_string(&dump)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    )
}

/// `amend scope-model route --dump F`: one JSON line per prompt of the data set (edit prompts,
/// rephrases, locality probes), each naming its kind, its own edit and the best candidate with
/// its score; every edit prompt routes to its own memory.
#[test]
fn scope_model_route_dumps_every_prompt() {
    let all: serde_json::Value =
        serde_json::from_str(include_str!("../data/memory-dev.json")).unwrap();
    let some: Vec<&serde_json::Value> = all.as_array().unwrap()[..3].iter().collect();
    let Some(lines) = serac_route_dump("route-dump", &some, &[]) else {
        return;
    };
    let expected: usize = some
        .iter()
        .map(|r| {
            let n_loc: usize = r["locality"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_array().unwrap().len())
                .sum();
            1 + r["rephrase_prompt"].as_array().unwrap().len() + n_loc
        })
        .sum();
    assert_eq!(lines.len(), expected);
    for (r, l) in some
        .iter()
        .zip(lines.iter().filter(|l| l["kind"] == "edit prompt"))
    {
        assert_eq!(l["own"], r["id"]);
        assert_eq!(l["prompt"], r["prompt"]);
        assert_eq!(l["best"], r["id"], "{l}");
        assert_eq!(l["in_scope"], true, "{l}");
        assert!(l["score"].as_f64().unwrap().is_finite());
    }
    assert!(lines.iter().any(|l| l["kind"] == "rephrase"));
    assert!(lines
        .iter()
        .any(|l| l["kind"].as_str().unwrap().starts_with("locality: ")));
    // Data the bundle holds no edit of is refused, not tallied as a router that never routes.
    let dir = tmp().join("route-dump");
    let other = dir.join("other.json");
    let rest: Vec<&serde_json::Value> = all.as_array().unwrap()[3..5].iter().collect();
    std::fs::write(&other, serde_json::to_vec(&rest).unwrap()).unwrap();
    let scope = amend_runtime::default_scope_model_path().unwrap();
    refused(
        &[
            "scope-model",
            "route",
            "--bundle",
            s(&dir.join("records.amend")),
            "--pubkey",
            s(&tmp().join("e2e-route-dump.pub")),
            "--data",
            s(&other),
            "--scope-model",
            s(&scope),
        ],
        &[
            "--data",
            "none of its 2 record ids is an edit of the bundle",
        ],
    );
}

/// A rephrase that describes its subject in passing ("Rome, the Italian capital, was built on
/// the banks of which river?") routes home: the router tries the query once more without the
/// description. These nine rephrases of data/memory-heldout11.json routed nowhere before that
/// rule (session 27).
#[test]
fn scope_model_routes_rephrases_that_describe_their_subject() {
    let all: serde_json::Value =
        serde_json::from_str(include_str!("../data/memory-heldout11.json")).unwrap();
    let ids = [4, 6, 11, 21, 25, 31, 40, 42, 46].map(|i| format!("mem-h11-{i:03}"));
    let some: Vec<&serde_json::Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| ids.iter().any(|id| r["id"] == id.as_str()))
        .collect();
    assert_eq!(some.len(), ids.len());
    let extra = ["--no-drift-check", "--verify-on", "none"];
    let Some(lines) = serac_route_dump("route-appositive", &some, &extra) else {
        return;
    };
    let described: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            l["kind"] == "rephrase"
                && amend_edits::families::without_appositives(l["prompt"].as_str().unwrap())
                    .is_some()
        })
        .collect();
    assert_eq!(
        described.len(),
        ids.len(),
        "one described rephrase per record"
    );
    for l in described {
        assert!(l["in_scope"] == true && l["best"] == l["own"], "{l}");
    }
    // The same subjects' other facts stay out, but for one probe whose answer is the edit's
    // own ("Which company bought WhatsApp in 2014?" against "Which company is the owner of
    // WhatsApp?"), routed home with or without the rule.
    for l in lines
        .iter()
        .filter(|l| l["kind"] == "locality: Subject_Specificity")
    {
        let same_answer = l["prompt"] == "Which company bought WhatsApp in 2014?";
        assert!(l["in_scope"] == false || same_answer, "{l}");
    }
}

/// The record `id` of a KnowEdit array, cloned.
fn record_by_id(all: &serde_json::Value, id: &str) -> serde_json::Value {
    all.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no record {id}"))
        .clone()
}

/// The route-dump line of `prompt` with the same own edit and kind as `l`: the line of a
/// prompt's twin as written, for a line of the prompt retyped.
fn twin_line<'a>(
    lines: &'a [serde_json::Value],
    l: &serde_json::Value,
    prompt: &str,
) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|w| w["own"] == l["own"] && w["kind"] == l["kind"] && w["prompt"] == prompt)
        .unwrap_or_else(|| panic!("no line for {prompt:?}"))
}

/// A query typed the way phones and users type it routes as the record's own spelling does:
/// without accents ("Pele"), in decomposed Unicode (e + U+0301), with the keyboard's curly
/// apostrophe ("O’Neal"). The scope model already reads the first two as the record's
/// spelling; before session 40 the relation groups did not find the subject in such a query,
/// so it lost their vote (8 logits either way) and routed differently from the same question
/// typed as the record writes it.
#[test]
fn scope_model_routes_a_subject_as_users_type_it() {
    let all: serde_json::Value =
        serde_json::from_str(include_str!("../data/memory-dev.json")).unwrap();
    // Subjects with an accent (Frédéric Chopin, Beyoncé, Pelé) or an apostrophe (Shaquille
    // O'Neal, Alice's Adventures in Wonderland).
    let ids = [
        "mem-dev-018",
        "mem-dev-067",
        "mem-dev-068",
        "mem-dev-156",
        "mem-dev-215",
    ];
    type Typing = fn(&str) -> String;
    let typings: [(&str, Typing); 3] = [
        ("no accents", |t| t.replace('é', "e")),
        ("decomposed", |t| t.replace('é', "e\u{301}")),
        ("curly apostrophe", |t| t.replace('\'', "\u{2019}")),
    ];
    // Each record's queries (rephrases and every locality probe) also typed each way.
    let mut variants: Vec<(String, String)> = Vec::new(); // (typed, as written)
    let mut typed_too = |q: &str| -> Vec<String> {
        let mut out = vec![q.to_string()];
        for (_, f) in &typings {
            let t = f(q);
            if t != q && !out.contains(&t) {
                variants.push((t.clone(), q.to_string()));
                out.push(t);
            }
        }
        out
    };
    let mut records: Vec<serde_json::Value> = Vec::new();
    for id in ids {
        let mut r = record_by_id(&all, id);
        let rephrases: Vec<String> = r["rephrase_prompt"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|q| typed_too(q.as_str().unwrap()))
            .collect();
        r["rephrase_prompt"] = serde_json::json!(rephrases);
        for probes in r["locality"].as_object_mut().unwrap().values_mut() {
            let typed: Vec<serde_json::Value> = probes
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|p| {
                    typed_too(p["prompt"].as_str().unwrap()).into_iter().map(
                        |q| serde_json::json!({"prompt": q, "ground_truth": p["ground_truth"]}),
                    )
                })
                .collect();
            *probes = serde_json::json!(typed);
        }
        records.push(r);
    }
    assert!(variants.len() >= 20, "{} typed variants", variants.len());
    let refs: Vec<&serde_json::Value> = records.iter().collect();
    let extra = ["--no-drift-check", "--verify-on", "none"];
    let Some(lines) = serac_route_dump("route-as-typed", &refs, &extra) else {
        return;
    };
    let mut compared = 0;
    for l in &lines {
        let prompt = l["prompt"].as_str().unwrap();
        let Some((_, written)) = variants.iter().find(|(t, _)| t == prompt) else {
            continue;
        };
        let w = twin_line(&lines, l, written);
        assert_eq!(
            (&l["in_scope"], &l["best"]),
            (&w["in_scope"], &w["best"]),
            "{l}\n{w}"
        );
        let (a, b) = (l["score"].as_f64().unwrap(), w["score"].as_f64().unwrap());
        if prompt.contains('\u{2019}') {
            // The scope model reads ’ and ' as two tokens, so the embedding moves a little; the
            // groups' vote (8) is kept.
            assert!((a - b).abs() < 2.0, "{l}\n{w}");
        } else {
            // The scope model strips accents and composes: the same tokens, the same score.
            assert_eq!(a, b, "{l}\n{w}");
        }
        compared += 1;
    }
    assert_eq!(compared, variants.len());
}

/// A record's `subject_aliases` ("Tolstoy" for "Leo Tolstoy") become routing rows of its edit:
/// a question that names the subject only by its alias routes home where the same question
/// with the full name does, the subject's other facts named that way stay out where they do
/// with the full name, and the bundle keeps one edit per record (rows 2 each here), so
/// rollback by id removes the alias with it. Without aliases a surname alone lost about two
/// thirds of the router's recall on held-out sets (docs/eval.md, session 40).
#[test]
fn scope_model_routes_a_subject_named_by_its_alias() {
    let all: serde_json::Value =
        serde_json::from_str(include_str!("../data/memory-dev.json")).unwrap();
    let ids = ["mem-dev-004", "mem-dev-018", "mem-dev-043", "mem-dev-062"];
    // (the prompt with the alias, the same prompt as written)
    let mut aliased: Vec<(String, String)> = Vec::new();
    let mut records: Vec<serde_json::Value> = Vec::new();
    for id in ids {
        let mut r = record_by_id(&all, id);
        let subject = r["subject"].as_str().unwrap().to_string();
        let alias = subject.split(' ').next_back().unwrap().to_string();
        r["subject_aliases"] = serde_json::json!([alias]);
        let mut by_alias = |q: &str| -> Vec<String> {
            let a = q.replace(&subject, &alias);
            aliased.push((a.clone(), q.to_string()));
            vec![q.to_string(), a]
        };
        let rephrases: Vec<String> = r["rephrase_prompt"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|q| by_alias(q.as_str().unwrap()))
            .collect();
        r["rephrase_prompt"] = serde_json::json!(rephrases);
        let probes = r["locality"]["Subject_Specificity"]
            .as_array()
            .unwrap()
            .clone();
        let probes: Vec<serde_json::Value> = probes
            .iter()
            .flat_map(|p| {
                by_alias(p["prompt"].as_str().unwrap())
                    .into_iter()
                    .map(|q| serde_json::json!({"prompt": q, "ground_truth": p["ground_truth"]}))
            })
            .collect();
        r["locality"]["Subject_Specificity"] = serde_json::json!(probes);
        records.push(r);
    }
    let refs: Vec<&serde_json::Value> = records.iter().collect();
    let extra = ["--no-drift-check", "--verify-on", "none"];
    let Some(lines) = serac_route_dump("route-alias", &refs, &extra) else {
        return;
    };
    let dir = tmp().join("route-alias");
    let counts = |bundle: &Path| -> Vec<u64> {
        let inspect = ok(&["inspect", "--json", s(bundle)]);
        let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
        inspect["edits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["count"].as_u64().unwrap())
            .collect()
    };
    let first = dir.join("records.amend");
    assert_eq!(
        counts(&first),
        [2, 2, 2, 2],
        "one edit per record, its alias a second row"
    );
    // A next version on top keeps every row of the earlier edits (it took one per edit before
    // aliases) and adds its own.
    let more = dir.join("more.json");
    let next: Vec<&serde_json::Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["id"] == "mem-dev-055")
        .collect();
    std::fs::write(&more, serde_json::to_vec(&next).unwrap()).unwrap();
    let second = dir.join("v2.amend");
    let model = real_model().unwrap();
    let key = tmp().join("e2e-route-alias.key");
    let scope = amend_runtime::default_scope_model_path().unwrap();
    let mut args = compile_args(&model, "serac", &more, &second, &key, &extra);
    args.extend(["--scope-model", s(&scope), "--base-bundle", s(&first)]);
    ok(&args);
    assert_eq!(counts(&second), [2, 2, 2, 2, 1]);
    let home = |l: &serde_json::Value| l["in_scope"] == true && l["best"] == l["own"];
    let (mut rephrases, mut home_by_alias) = (0, 0);
    for (a, written) in &aliased {
        let l = lines.iter().find(|l| l["prompt"] == a.as_str()).unwrap();
        let w = twin_line(&lines, l, written);
        if l["kind"] == "rephrase" {
            rephrases += 1;
            home_by_alias += home(l) as usize;
            assert!(home(l) || !home(w), "{l}\n{w}");
        } else {
            assert!(l["in_scope"] == false || w["in_scope"] == true, "{l}\n{w}");
        }
    }
    assert!(
        rephrases >= 6 && home_by_alias * 2 >= rephrases,
        "{home_by_alias}/{rephrases}"
    );
}

/// A context smaller than the default repetition window (64 tokens) runs on both backends: the
/// default window shrinks to the context (the session's, which the model's trained context may
/// cap), with the penalty on or off. An explicit window larger than the context is refused,
/// naming both, when the penalty that reads it is on. Negative sampling values reach the
/// library's checks (clap would take "-1" for a flag): a negative temperature is greedy, a
/// negative top-k or window is refused by name. A generation the context cuts short says so.
#[test]
fn a_context_below_the_default_repeat_window_runs() {
    let model = tiny_model(tmp().join("small-ctx.gguf"));
    let m = s(&model);
    let base = [
        "run",
        "--model",
        m,
        "--prompt",
        "a b",
        "--max-tokens",
        "4",
        "--threads",
        "1",
    ];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    let mut backends: Vec<&[&str]> = vec![&[]];
    if ort_libraries() {
        backends.push(&["--backend", "ort", "--no-onnx-cache"]);
    }
    for b in backends {
        ok(&with(&[&["--ctx", "16"], b].concat()));
        ok(&with(
            &[&["--ctx", "16", "--repeat-penalty", "1.1"], b].concat(),
        ));
        refused(
            &with(
                &[
                    &[
                        "--ctx",
                        "16",
                        "--repeat-penalty",
                        "1.1",
                        "--repeat-last-n",
                        "17",
                    ],
                    b,
                ]
                .concat(),
            ),
            &["repeat_last_n 17 is outside 0..=16"],
        );
        let greedy = ok(&with(&[&["--temp", "0"], b].concat()));
        assert_eq!(ok(&with(&[&["--temp", "-1"], b].concat())), greedy);
        refused(
            &with(&[&["--top-k", "-5"], b].concat()),
            &["top_k must be >= 0"],
        );
        refused(
            &with(&[&["--repeat-last-n", "-1"], b].concat()),
            &["repeat_last_n -1 is negative"],
        );
        // The prompt's 3 tokens and 4 more do not fit in 5.
        let full = amend(&with(&[&["--ctx", "5"], b].concat()));
        assert!(full.status.success());
        let err = String::from_utf8_lossy(&full.stderr);
        assert!(
            err.contains("the context of 5 tokens is full (raise --ctx, up to 512)"),
            "{err}"
        );
    }
}

/// `amend` that must exit within `secs` (a refusal that regressed into a hang fails the test
/// instead of blocking it). Output goes through files: a full pipe cannot stall the child.
fn amend_within(args: &[&str], secs: u64) -> Output {
    use std::process::Stdio;
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (o, e) = (
        tmp().join(format!("within-{n}.out")),
        tmp().join(format!("within-{n}.err")),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(args)
        .env_remove("AMEND_MODEL")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .expect("the amend binary runs");
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed().as_secs() >= secs {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("amend {args:?} still ran after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = Output {
        status,
        stdout: std::fs::read(&o).unwrap(),
        stderr: std::fs::read(&e).unwrap(),
    };
    eprintln!(
        "$ amend {}\n  exit {:?}\n  stderr (tail): {}",
        args.join(" "),
        out.status.code(),
        tail(&String::from_utf8_lossy(&out.stderr), 3)
    );
    out
}

/// Like `refused`, within `secs`.
fn refused_within(args: &[&str], secs: u64, needles: &[&str]) {
    let out = amend_within(args, secs);
    assert!(!out.status.success(), "amend {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr of {args:?} lacks {n:?}:\n{err}");
    }
}

fn dir_listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `amend locate` refuses, before the model loads or any trace runs, sample counts that would
/// allocate or run without bound (99999999999 aborted allocating 2.4 TB; 1000000 ran forever),
/// a noise scale of 0 (nothing corrupted), --window with --residual-only (which has no window),
/// a window wider than the model, and a blank prompt, subject or target; it writes nothing.
#[test]
fn locate_refuses_bad_values_before_tracing() {
    let dir = tmp().join("locate-values");
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(dir.join("tiny.gguf"));
    let out_dir = dir.join("out");
    let (m, o) = (s(&model), s(&out_dir));
    let fact = |prompt: &'static str, subject: &'static str, target: &'static str| {
        vec![
            "locate",
            "--model",
            m,
            "--prompt",
            prompt,
            "--subject",
            subject,
            "--target",
            target,
            "--out-dir",
            o,
            "--threads",
            "1",
        ]
    };
    let with = |extra: &[&'static str]| [&fact("a b c", "b", "c")[..], extra].concat();
    for n in ["99999999999", "1000000", "101", "0"] {
        refused_within(&with(&["--samples", n]), 60, &["--samples", "1..=100"]);
    }
    for x in ["--noise=0", "--noise=-1", "--noise=1e9", "--noise=nan"] {
        refused_within(&with(&[x]), 60, &["--noise", "(0, 100]"]);
    }
    refused_within(
        &with(&["--window", "1", "--residual-only"]),
        60,
        &["--window", "--residual-only"],
    );
    // The tiny model has 2 layers.
    refused_within(&with(&["--window", "3"]), 60, &["--window 3", "1..=2"]);
    for (args, flag) in [
        (fact("a b c", "b", ""), "--target"),
        (fact("a b c", "b", "  "), "--target"),
        (fact(" ", " ", "c"), "--prompt"),
        (fact("a b c", "", "c"), "--subject"),
    ] {
        refused_within(&args, 60, &[flag, "empty"]);
    }
    refused_within(
        &fact("a b c", "d", "c"),
        60,
        &["--subject \"d\" does not occur in --prompt"],
    );
    // A prompt past the model's context (the tiny model's is 512) is refused before the
    // clean run.
    let long: &'static str = Box::leak(format!("{}c", "a b ".repeat(400)).into_boxed_str());
    refused_within(
        &fact(long, "b", "c"),
        60,
        &["the prompt is", "the model's context is 512"],
    );
    assert!(!out_dir.exists(), "a refused locate created {o}");
}

/// `amend locate` checks the files it will write (--out-dir/NAME.json and .png) before the
/// trace: a FIFO there blocked forever after the trace, a directory failed only after it (with
/// the json already written), an empty --name wrote `.json`, and a file as --out-dir said "File
/// exists". Each is refused by flag with nothing written; a good run writes exactly both files.
#[test]
fn locate_checks_its_outputs_before_tracing() {
    let dir = tmp().join("locate-outputs");
    let out = dir.join("loc");
    std::fs::create_dir_all(&out).unwrap();
    let model = tiny_model(dir.join("tiny.gguf"));
    let fifo = out.join("fifo.json");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    std::fs::create_dir(out.join("dirname.png")).unwrap();
    let before = dir_listing(&out);
    let base = |out_dir: &str, name: &str| -> Vec<String> {
        [
            "locate",
            "--model",
            s(&model),
            "--prompt",
            "a b c",
            "--subject",
            "b",
            "--target",
            "c",
            "--samples",
            "1",
            "--threads",
            "1",
            "--residual-only",
            "--out-dir",
            out_dir,
            "--name",
            name,
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |out_dir: &str, name: &str, needles: &[&str]| {
        let args = base(out_dir, name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused_within(&args, 60, needles);
    };
    let o = s(&out);
    run(o, "fifo", &["--out-dir/--name", "fifo.json", "FIFO"]);
    run(
        o,
        "dirname",
        &["--out-dir/--name", "dirname.png", "directory"],
    );
    run(o, "", &["--name \"\""]);
    run(o, "  ", &["--name"]);
    run(o, "sub/x", &["--name \"sub/x\""]);
    run(s(&model), "t", &["--out-dir", "not a directory"]);
    run(
        &format!("{}/sub", s(&model)),
        "t",
        &["--out-dir", "not a directory"],
    );
    assert_eq!(dir_listing(&out), before, "a refused locate wrote into {o}");

    // A good run into a directory it creates: both files, no temporary left behind (the real
    // model: the tiny llama graph has no embeddings hook to corrupt).
    let Some(real) = real_model() else {
        return;
    };
    let fresh = dir.join("fresh/sub");
    let done = amend_within(
        &[
            "locate",
            "--model",
            s(&real),
            "--prompt",
            PROMPT,
            "--subject",
            "France",
            "--target",
            " Paris",
            "--samples",
            "1",
            "--threads",
            "1",
            "--residual-only",
            "--out-dir",
            s(&fresh),
            "--name",
            "t",
        ],
        300,
    );
    assert!(done.status.success());
    assert_eq!(dir_listing(&fresh), ["t.json", "t.png"]);
}

/// `amend bench` bounds its token counts before any benchmark runs: --gen-tokens by a clap range
/// (99999999999 reached the session as n_ctx 0, 2000000000 failed creating a context), and
/// --prompt-tokens + --gen-tokens by the model's trained context (the tiny model's 512; more
/// ran for minutes), naming the flags; --rounds 0 too.
#[test]
fn bench_bounds_its_token_counts_by_the_context() {
    let model = tiny_model(tmp().join("bench-tiny.gguf"));
    let m = s(&model);
    let bench =
        |extra: &[&'static str]| [&["bench", "--model", m, "--threads", "1"][..], extra].concat();
    for g in ["99999999999", "3000000000", "2000000000", "0"] {
        refused_within(&bench(&["--gen-tokens", g]), 60, &["--gen-tokens", "1..="]);
    }
    refused_within(
        &bench(&["--prompt-tokens", "128", "--gen-tokens", "400"]),
        60,
        &[
            "--prompt-tokens 128 + --gen-tokens 400",
            "context length 512",
            "at most 384",
        ],
    );
    refused_within(&bench(&["--rounds", "0"]), 60, &["--rounds", "1..="]);
    refused_within(
        &bench(&["--prompt-tokens", "513"]),
        60,
        &["--prompt-tokens", "1..=512"],
    );
}

/// all-MiniLM-L6-v2's unpacked checkpoint (AMEND_SCOPE_CHECKPOINT or ~/.cache/amend), or `None`.
fn scope_checkpoint() -> Option<PathBuf> {
    let dir = std::env::var_os("AMEND_SCOPE_CHECKPOINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("all-minilm-l6-v2/checkpoint")
        });
    present(dir.join("model.safetensors"))?;
    Some(dir)
}

/// all-MiniLM-L6-v2's config.json with `key` set to `v` (JSON), in a new directory `name`
/// beside links to the real checkpoint's other files when `real` is given.
fn scope_checkpoint_with(name: &str, key: &str, v: &str, real: Option<&Path>) -> PathBuf {
    let dir = tmp().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = serde_json::json!({
        "model_type": "bert", "hidden_act": "gelu", "hidden_size": 384,
        "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
        "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12
    });
    c[key] = serde_json::from_str(v).unwrap();
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        if let Some(r) = real {
            #[cfg(unix)]
            std::os::unix::fs::symlink(r.join(f), dir.join(f)).unwrap();
            #[cfg(not(unix))]
            std::fs::copy(r.join(f), dir.join(f)).unwrap();
        }
    }
    dir
}

/// `args` fails, its stderr names every one of `needles`, and `out` is as it was (absent, or
/// still holding `before`).
fn refused_writing_nothing(args: &[&str], needles: &[&str], out: &Path, before: Option<&[u8]>) {
    refused(args, needles);
    assert_eq!(
        std::fs::read(out).ok().as_deref(),
        before,
        "{args:?} wrote {out:?}"
    );
}

/// `amend scope-model tune`: counts that size allocations and rates that would train NaN
/// factors are refused when the arguments are read (`--rank 99999999999` used to abort the
/// process allocating 153 TB, `--lr NaN` to write NaN factors with exit 0, `--epochs 0` untrained
/// ones); --layers and --rank again against the checkpoint's config.json, before the data
/// (missing here) or the weights are read.
#[test]
fn scope_model_tune_refuses_bad_counts_and_rates_up_front() {
    let from = scope_checkpoint_with("tune-args", "x", "0", None);
    let out = tmp().join("tune-args.safetensors");
    let missing = tmp().join("no-such-data.json");
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = ["scope-model", "tune", "--from", s(&from), "--data"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        a.extend([
            s(&missing).into(),
            "--lexicon".into(),
            "none".into(),
            "--out".into(),
        ]);
        a.push(s(&out).into());
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    for (extra, needles) in [
        (&["--rank", "99999999999"][..], &["--rank", "1..=65536"][..]),
        (&["--rank", "385"], &["--rank 385", "1..=384"]),
        (&["--rank", "0"], &["--rank", "1..="]),
        (&["--layers", "7"], &["--layers 7", "1..=6"]),
        (&["--layers", "0"], &["--layers", "1..="]),
        (&["--epochs", "0"], &["--epochs", "1..=1000"]),
        (&["--epochs", "99999999999"], &["--epochs", "1..=1000"]),
        (&["--lr", "NaN"], &["--lr", "finite number > 0"]),
        (&["--lr", "inf"], &["--lr", "finite number > 0"]),
        (&["--lr=-1"], &["--lr", "finite number > 0"]),
        (
            &["--temperature", "0"],
            &["--temperature", "finite number > 0"],
        ),
        (
            &["--lexicon-items", "99999999"],
            &["--lexicon-items", "0..=1000"],
        ),
    ] {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        refused_writing_nothing(&a, needles, &out, None);
    }
    // Within the bounds, the next thing read is the (missing) data.
    let a = args(&["--rank", "384", "--layers", "6"]);
    let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
    refused_writing_nothing(&a, &["--data"], &out, None);
}

/// `amend scope-model train-head`: --target-locality is a percentage in (0, 100] (NaN used to
/// write a head, 0 or -1 one that takes everything in scope, 150 to fail after training every
/// fold), --epochs 0 failed after training, --members/--hidden 0 failed without naming the
/// flag. All refused when the arguments are read, before the (missing) data.
#[test]
fn scope_model_train_head_refuses_bad_options_up_front() {
    let out = tmp().join("head-args.safetensors");
    let missing = tmp().join("no-such-data.json");
    for (extra, needles) in [
        (
            &["--target-locality", "NaN"][..],
            &["--target-locality", "(0, 100]"][..],
        ),
        (
            &["--target-locality=-1"],
            &["--target-locality", "(0, 100]"],
        ),
        (
            &["--target-locality", "0"],
            &["--target-locality", "(0, 100]"],
        ),
        (
            &["--target-locality", "150"],
            &["--target-locality", "(0, 100]"],
        ),
        (&["--epochs", "0"], &["--epochs", "1..=10000"]),
        (&["--epochs", "99999999999"], &["--epochs", "1..=10000"]),
        (&["--members", "0"], &["--members", "1..=16"]),
        (&["--members", "17"], &["--members", "1..=16"]),
        (&["--hidden", "0"], &["--hidden", "1..=1024"]),
        (&["--hidden", "99999999999"], &["--hidden", "1..=1024"]),
        (&["--l2", "NaN"], &["--l2", "finite number >= 0"]),
        (&["--l2=-1"], &["--l2", "finite number >= 0"]),
    ] {
        let mut a = vec![
            "scope-model",
            "train-head",
            "--data",
            s(&missing),
            "--out",
            s(&out),
        ];
        a.extend(extra);
        refused_writing_nothing(&a, needles, &out, None);
    }
}

/// `amend scope-model train-head` records its recipe in the head (session 41): the command with
/// the data files by name and every option, and each file's sha256 as `sha256sum` prints it; the
/// same command twice gives the same bytes (before, the header's order changed from run to run,
/// and the shipped head could not be traced to how it was made). A small head on two small sets
/// (~20 s); skipped without the scope model.
#[test]
fn scope_model_train_head_records_its_recipe_and_is_deterministic() {
    use sha2::Digest;
    let Some(scope) = amend_runtime::default_scope_model_path().and_then(present) else {
        return;
    };
    let dir = tmp().join("train-head-recipe");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let (data, calibrate) = (
        repo.join("memory-heldout9.json"),
        repo.join("memory-heldout10.json"),
    );
    let train = |out: &Path| {
        ok(&[
            "scope-model",
            "train-head",
            "--scope-model",
            s(&scope),
            "--data",
            s(&data),
            "--calibrate",
            s(&calibrate),
            "--members",
            "2",
            "--hidden",
            "8",
            "--epochs",
            "3",
            "--out",
            s(out),
        ]);
        std::fs::read(out).unwrap()
    };
    let first = train(&dir.join("a.safetensors"));
    assert_eq!(
        train(&dir.join("b.safetensors")),
        first,
        "not deterministic"
    );
    let head = amend_compiler::methods::scope_head::HeadFile::parse(&first).unwrap();
    let recipe = &head.provenance["trained_with"];
    assert!(
        recipe.starts_with("amend ")
            && recipe.contains(
                " scope-model train-head --data memory-heldout9.json --calibrate \
                 memory-heldout10.json --members 2 --hidden 8 --epochs 3 --l2 0.3 \
                 --target-locality 98.5 --seed 1"
            ),
        "{recipe}"
    );
    // No directory of this machine in the recipe.
    assert!(!recipe.contains('/'), "{recipe}");
    let line = |p: &Path| {
        format!(
            "{}  {}\n",
            amend_edits::keys::to_hex(&sha2::Sha256::digest(std::fs::read(p).unwrap())),
            p.file_name().unwrap().to_str().unwrap()
        )
    };
    assert_eq!(head.provenance["data_sha256"], line(&data));
    assert_eq!(head.provenance["calibrate_sha256"], line(&calibrate));
}

/// `amend scope-model convert`: a config.json the tensors or the GGUF reader do not take is
/// refused naming the key, and the file at --out is left as it was (the invalid GGUF used to be
/// written first, replacing it); a count that does not fit is refused, not wrapped. An error
/// of the --tune file is reported against --tune alone, not under --from.
#[test]
fn scope_model_convert_refuses_bad_configs_and_keeps_out() {
    // A bad --tune file is read first: no checkpoint needed.
    let from = scope_checkpoint_with("convert-none", "x", "0", None);
    let out = tmp().join("convert.gguf");
    let good: &[u8] = b"a good file";
    std::fs::write(&out, good).unwrap();
    // F32 zeros of each (name, shape).
    let safetensors = |tensors: &[(&str, &[usize])]| {
        let (mut header, mut at) = (serde_json::Map::new(), 0);
        for (name, shape) in tensors {
            let end = at + 4 * shape.iter().product::<usize>();
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [at, end]}),
            );
            at = end;
        }
        let header = serde_json::Value::Object(header).to_string();
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; at]);
        b
    };
    let tune = tmp().join("bad-tune.safetensors");
    std::fs::write(&tune, safetensors(&[("threshold", &[1])])).unwrap();
    let args = |from: &Path, tune: Option<&Path>| {
        let mut a = vec![
            "scope-model".to_string(),
            "convert".into(),
            "--from".into(),
            s(from).into(),
            "--out".into(),
            s(&out).into(),
        ];
        if let Some(t) = tune {
            a.extend(["--tune".into(), s(t).into()]);
        }
        a
    };
    let run = |a: Vec<String>| amend(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    let o = run(args(&from, Some(&tune)));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("--tune {}: unexpected tensor threshold", s(&tune))),
        "{err}"
    );
    assert!(
        !err.contains("--from"),
        "a --tune error under --from: {err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), good);

    let Some(real) = scope_checkpoint() else {
        return;
    };
    for (key, v, needle) in [
        (
            "num_attention_heads",
            "5",
            "num_attention_heads 5 does not divide hidden_size 384",
        ),
        (
            "max_position_embeddings",
            "0",
            "max_position_embeddings 0 is not an integer in 1..",
        ),
        ("layer_norm_eps", "-1", "layer_norm_eps -1"),
        (
            "hidden_size",
            "99999999999",
            "hidden_size 99999999999 is not an integer in 1..=",
        ),
        ("hidden_size", "768", "config.json (hidden_size 768"),
        (
            "num_hidden_layers",
            "0",
            "num_hidden_layers 0 is not an integer in 1..",
        ),
        ("num_hidden_layers", "5", "num_hidden_layers is 5"),
        ("num_hidden_layers", "7", "lacks encoder.layer.6."),
    ] {
        let dir = scope_checkpoint_with(&format!("convert-{key}"), key, v, Some(&real));
        let a = args(&dir, None);
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        refused_writing_nothing(&a, &["--from", needle], &out, Some(good));
    }
    // Factors that do not fit the checkpoint are a --tune error too.
    let p = "encoder.layer.9.attention.self.query";
    std::fs::write(
        &tune,
        safetensors(&[
            (&format!("{p}.lora_a"), &[4, 384]),
            (&format!("{p}.lora_b"), &[384, 4]),
        ]),
    )
    .unwrap();
    let o = run(args(&real, Some(&tune)));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!(
            "--tune {}: the checkpoint has no projection {p}",
            s(&tune)
        )),
        "{err}"
    );
    assert!(
        !err.contains("--from"),
        "a --tune error under --from: {err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), good);
}

/// `amend export-onnx`, `amend parity` and `amend keygen` refuse outputs and inputs that would
/// destroy a file, hang or be ignored, before any work and writing nothing; an EP this machine
/// cannot start does not fail an export (the graph is checked on the CPU EP and it says so).
#[test]
fn export_parity_and_keygen_refuse_bad_paths_and_values() {
    let dir = tmp().join("outputs");
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = tiny_model(dir.join("tiny.gguf"));
    let tiny_bytes = std::fs::read(&tiny).unwrap();
    let fifo = dir.join("out.fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let is_fifo = |p: &Path| {
        use std::os::unix::fs::FileTypeExt;
        std::fs::symlink_metadata(p).unwrap().file_type().is_fifo()
    };
    let m = s(&tiny);

    // keygen: a .pub that cannot be written must not cost the old .key.
    let prefix = dir.join("k");
    ok(&["keygen", "--out", s(&prefix), "--force"]);
    let old_key = std::fs::read(dir.join("k.key")).unwrap();
    std::fs::remove_file(dir.join("k.pub")).unwrap();
    std::fs::create_dir(dir.join("k.pub")).unwrap();
    refused(
        &["keygen", "--out", s(&prefix), "--force"],
        &["k.pub", "that is a directory"],
    );
    assert_eq!(std::fs::read(dir.join("k.key")).unwrap(), old_key);
    refused(
        &["keygen", "--out", &format!("{}/", dir.display())],
        &["--out", "not a directory"],
    );
    assert!(!dir.join(".key").exists());

    // parity: a FIFO of prompts is refused at once (it used to block), an empty set of
    // prompts and a continuation longer than the context before anything is compared.
    refused(
        &["parity", "--model", m, "--prompts", s(&fifo)],
        &["--prompts", "FIFO"],
    );
    let blank = dir.join("blank.txt");
    std::fs::write(&blank, "\n  \n").unwrap();
    refused(
        &["parity", "--model", m, "--prompts", s(&blank)],
        &["--prompts", "no prompt"],
    );
    refused(&["parity", "--model", m, "--limit", "0"], &["--limit"]);
    refused(
        &["parity", "--model", m, "--speed-rounds", "0"],
        &["--speed-rounds"],
    );
    refused(
        &[
            "parity",
            "--model",
            m,
            "--tokens",
            "99999999999",
            "--limit",
            "1",
        ],
        &["--tokens 99999999999", "prompt 1", "1024"],
    );
    refused(&["parity", "--model", m, "--self-check"], &["--batch"]);
    refused(
        &[
            "parity",
            "--model",
            m,
            "--self-check",
            "--batch",
            "--ep",
            "openvino",
        ],
        &["--ep", "--self-check"],
    );
    refused(
        &[
            "parity",
            "--model",
            m,
            "--limit",
            "1",
            "--ort-trace",
            &format!("{}/missing/p", dir.display()),
        ],
        &["--ort-trace", "does not exist"],
    );

    // export-onnx: the model itself, a FIFO, a directory and a run-this-graph flag.
    let copy = dir.join("copy.gguf");
    std::fs::copy(&tiny, &copy).unwrap();
    refused(
        &["export-onnx", "--model", s(&copy), "--out", s(&copy)],
        &["--out", "that is the --model file"],
    );
    assert_eq!(std::fs::read(&copy).unwrap(), tiny_bytes);
    assert!(!dir.join("copy.gguf.amend").exists());
    refused(
        &["export-onnx", "--model", m, "--out", s(&fifo)],
        &["--out", "FIFO"],
    );
    assert!(is_fifo(&fifo));
    refused(
        &["export-onnx", "--model", m, "--out", s(&dir)],
        &["--out", "that is a directory"],
    );
    refused(
        &[
            "export-onnx",
            "--model",
            m,
            "--out",
            s(&dir.join("g.onnx")),
            "--onnx",
            m,
        ],
        &["--onnx", "builds the graph"],
    );
    refused(
        &[
            "export-onnx",
            "--model",
            m,
            "--out",
            s(&dir.join("g.onnx")),
            "--static-shapes",
            "8,4",
        ],
        &["static shapes", "no longer than the window"],
    );
    assert!(!dir.join("g.onnx").exists());
    if !ort_libraries() {
        return;
    }
    // A failed export leaves nothing: an unknown quant-free failure is hard to make, so use a
    // graph option the builder refuses after the library loads (a low-rank slot on a matrix
    // the model lacks).
    let g = dir.join("g.onnx");
    refused(
        &[
            "export-onnx",
            "--model",
            m,
            "--out",
            s(&g),
            "--slots",
            "lr:no.such.weight",
        ],
        &["no.such.weight"],
    );
    assert!(!g.exists() && !dir.join("g.onnx.amend").exists());
    // QNN is not in this library: the graph is written and checked on the CPU EP.
    let out = ok(&[
        "export-onnx",
        "--model",
        m,
        "--out",
        s(&g),
        "--ep",
        "qnn",
        "--profile",
        "portable",
    ]);
    assert!(
        out.contains("loads on cpu") && out.contains("not checked on qnn"),
        "{out}"
    );
    assert!(g.exists() && dir.join("g.onnx.amend").exists());
    assert!(!std::fs::read_dir(&dir).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));
}

/// A secret key copied where its public key belongs, under a `.pub` name (past the by-name
/// check of `.key` files): `verify` and `run` say so instead of "unknown key" or a bare "not a
/// valid public key". Needs no real model.
#[test]
fn secret_key_given_as_the_public_key_is_named() {
    use amend_edits::ed25519_dalek::{SigningKey, VerifyingKey};
    let dir = tmp().join("secret-as-pub");
    std::fs::create_dir_all(&dir).unwrap();
    // About half of all secret seeds are also a curve point, and so pass for a public key.
    let seed = |point: bool| {
        (2..=255u8)
            .find(|&s| VerifyingKey::from_bytes(&[s; 32]).is_ok_and(|k| !k.is_weak()) == point)
            .unwrap()
    };
    let key_file = |name: &str, bytes: [u8; 32]| {
        let p = dir.join(name);
        std::fs::write(&p, amend_edits::keys::to_hex(&bytes) + "\n").unwrap();
        p
    };
    let signer = SigningKey::from_bytes(&[seed(true); 32]);
    let bundle = dir.join("b.amend");
    crafted_bundle(
        &bundle,
        &key_file("signer.key", signer.to_bytes()),
        "{prompt}",
        |_| {},
    );

    let public = key_file("signer.pub", signer.verifying_key().to_bytes());
    ok(&["verify", s(&bundle), "--pubkey", s(&public)]);
    let secret = key_file("device.pub", signer.to_bytes());
    let named = [
        "trusted key 0 is the signer's secret key",
        "trust the .pub file",
    ];
    refused(&["verify", s(&bundle), "--pubkey", s(&secret)], &named);
    let model = tiny_model(dir.join("tiny.gguf"));
    let out = amend(&run_args(&model, "a b", Some((&bundle, &secret)), &[]));
    assert!(!out.status.success() && out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(named.iter().all(|n| err.contains(n)), "{err}");
    // A secret seed that is no point is refused as the key is read, with the hint.
    let other = key_file("other.pub", [seed(false); 32]);
    refused(
        &["verify", s(&bundle), "--pubkey", s(&other)],
        &[
            "not a valid ed25519 public key",
            "secret key file",
            "use the .pub beside it",
        ],
    );
}

/// A scratch directory `name` with the tiny model and a one-record data file: (dir, model, data).
fn tiny_eval_scratch(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = tmp().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(dir.join("m.gguf"));
    let data = dir.join("d.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a b\", \"target\": \"c\"}\n").unwrap();
    (dir, model, data)
}

/// `amend eval` on the tiny model, base only, two generated tokens, one thread, plus `extra`.
fn tiny_eval_args<'a>(model: &'a Path, data: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "eval",
        "--model",
        s(model),
        "--data",
        s(data),
        "--gen-tokens",
        "2",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

/// `amend eval`'s report flags may not name an input (the edit requests, the model, the key, a
/// bundle) or one another: each was replaced, exit 0. Refused before any work (the bundle and
/// key here are not even valid), every input left as it was; /dev/null serves several outputs.
#[test]
fn eval_outputs_are_not_its_inputs_nor_each_other() {
    let (dir, model, data) = tiny_eval_scratch("eval-outputs-apart");
    let (bundle, public) = (dir.join("bb.amend"), dir.join("kp.pub"));
    std::fs::write(&bundle, b"not a bundle").unwrap();
    std::fs::write(&public, b"not a key").unwrap();
    let same = dir.join("same.json");
    let inputs = [&model, &data, &bundle, &public];
    let before: Vec<Vec<u8>> = inputs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let with_bundle = ["--bundle", s(&bundle), "--pubkey", s(&public)];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--out", s(&data)], vec!["--out", "the --data file"]),
        (
            vec!["--markdown", s(&model)],
            vec!["--markdown", "the --model file"],
        ),
        (
            [&with_bundle[..], &["--summary", s(&public)]].concat(),
            vec!["--summary", "the --pubkey file"],
        ),
        (
            [&with_bundle[..], &["--out", s(&bundle)]].concat(),
            vec!["--out", "the --bundle file"],
        ),
        (
            vec!["--out", s(&same), "--summary", s(&same)],
            vec!["--summary", "--out", "name the same file"],
        ),
    ];
    for (extra, needles) in cases {
        refused(&tiny_eval_args(&model, &data, &extra), &needles);
    }
    for (p, b) in inputs.iter().zip(&before) {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} changed", p.display());
    }
    assert!(!same.exists());
    ok(&tiny_eval_args(
        &model,
        &data,
        &[
            "--out",
            "/dev/null",
            "--summary",
            "/dev/null",
            "--markdown",
            "/dev/null",
        ],
    ));
}

/// `amend eval` refuses, before any work: --pubkey without --bundle (it was ignored), two
/// bundles that would be one variant (one file stem, or `base`), --gen-tokens 0 (fluency was
/// scored on the prompt alone), and duplicate record ids (which `compile` refuses).
#[test]
fn eval_refuses_ignored_keys_clashing_variants_and_duplicate_ids() {
    let (dir, model, data) = tiny_eval_scratch("eval-refusals");
    std::fs::create_dir_all(dir.join("x")).unwrap();
    let public = dir.join("kp.pub");
    std::fs::write(&public, b"not a key").unwrap();
    let (b1, xb1, base) = (
        dir.join("b1.amend"),
        dir.join("x/b1.amend"),
        dir.join("base.amend"),
    );
    for b in [&b1, &xb1, &base] {
        std::fs::write(b, b"not a bundle").unwrap();
    }
    let summary = dir.join("s.json");
    let sum = ["--summary", s(&summary)];
    refused(
        &tiny_eval_args(
            &model,
            &data,
            &[&sum[..], &["--pubkey", s(&public)]].concat(),
        ),
        &["--pubkey", "without --bundle"],
    );
    let two = [
        "--bundle",
        s(&b1),
        "--bundle",
        s(&xb1),
        "--pubkey",
        s(&public),
    ];
    refused(
        &tiny_eval_args(&model, &data, &[&sum[..], &two[..]].concat()),
        &[s(&b1), s(&xb1), "variant `b1`"],
    );
    refused(
        &tiny_eval_args(
            &model,
            &data,
            &[&sum[..], &["--bundle", s(&base), "--pubkey", s(&public)]].concat(),
        ),
        &[s(&base), "`base`"],
    );
    let mut zero = tiny_eval_args(&model, &data, &sum);
    zero[6] = "0";
    refused(&zero, &["--gen-tokens", "'0'", ">= 1"]);
    let dup = dir.join("dup.jsonl");
    std::fs::write(
        &dup,
        "{\"id\": \"a\", \"prompt\": \"a b\", \"target\": \"c\"}\n\
         {\"id\": \"a\", \"prompt\": \"d e\", \"target\": \"f\"}\n",
    )
    .unwrap();
    refused(
        &tiny_eval_args(&model, &dup, &sum),
        &["--data", "edit ids must be unique", "\"a\""],
    );
    assert!(!summary.exists());
}

/// `amend eval --out FIFO` with no reader hung after the whole evaluation (the open waits for
/// a reader): refused before the work. A FIFO with its reader gets the records; a full device
/// is named by its flag.
#[test]
fn eval_report_to_a_fifo_or_a_full_device() {
    let (dir, model, data) = tiny_eval_scratch("eval-fifo");
    let fifo = dir.join("ff");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    refused_within(
        &tiny_eval_args(&model, &data, &["--out", s(&fifo)]),
        30,
        &["--out", s(&fifo), "no reader"],
    );
    let got = dir.join("got.jsonl");
    let mut reader = Command::new("cat")
        .arg(&fifo)
        .stdout(std::fs::File::create(&got).unwrap())
        .spawn()
        .unwrap();
    let out = amend_within(&tiny_eval_args(&model, &data, &["--out", s(&fifo)]), 60);
    // `cat` ends at the end of the records; kill it only if it does not.
    let t0 = std::time::Instant::now();
    while reader.try_wait().unwrap().is_none() && t0.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = reader.kill();
    reader.wait().unwrap();
    assert!(out.status.success());
    let lines = std::fs::read_to_string(&got).unwrap();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    assert!(lines.contains("\"variant\":\"base\""), "{lines}");
    if Path::new("/dev/full").exists() {
        for flag in ["--out", "--summary", "--markdown"] {
            refused(
                &tiny_eval_args(&model, &data, &[flag, "/dev/full"]),
                &[&format!("{flag} /dev/full: cannot write it")],
            );
        }
    }
}

/// `compile` refuses before any work, writing nothing: an output that is one of its inputs
/// (the key, its public key, the model, the edits), out-of-range or ignored values (a
/// checkpoint interval past a week, a count without bound, a layer the model lacks, inf, a
/// negative loss, another method's key, a key given twice, an empty or control-character
/// bundle id or channel), flags the combination would ignore, and two records for one prompt.
/// Needs no real model.
#[test]
fn compile_refuses_clashing_outputs_and_ignored_values_up_front() {
    let (dir, key, public, edits) = one_edit("qa-compile", "qa-compile");
    let model = tiny_model(dir.join("m.gguf"));
    let base = ["--no-drift-check", "--allow-partial", "--threads", "1"];
    for (out, flag) in [
        (&key, "the --key file"),
        (&public, "the --key's public key file"),
        (&model, "the --model file"),
        (&edits, "the --edits file"),
    ] {
        let before = std::fs::read(out).unwrap();
        refused_within(
            &compile_args(&model, "grace", &edits, out, &key, &base),
            60,
            &[flag, "would replace it"],
        );
        assert_eq!(std::fs::read(out).unwrap(), before, "{}", out.display());
    }
    let out = dir.join("o.amend");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--checkpoint-every", "1e20"],
            &["--checkpoint-every", "604800"],
        ),
        (
            &["--checkpoint-every", "99999999999999999999"],
            &["--checkpoint-every", "a week"],
        ),
        (
            &["--set", "grace.steps=99999999999999"],
            &["grace.steps", "1..=10000"],
        ),
        (
            &["--set", "grace.layer=99"],
            &["--set grace.layer=99", "the model has"],
        ),
        (&["--set", "grace.lr=inf"], &["grace.lr", "finite"]),
        (
            &["--set", "grace.stop_loss=-1"],
            &["grace.stop_loss", ">= 0"],
        ),
        (&["--set", "grace.stop_loss=inf"], &["grace.stop_loss"]),
        (
            &["--set", "rome.lr=5"],
            &["--set rome.lr=5", "--method grace"],
        ),
        (
            &["--set", "grace.lr=1", "--set", "grace.lr=2"],
            &["grace.lr", "more than once"],
        ),
        (&["--bundle-id", ""], &["--bundle-id", "empty"]),
        (&["--channel", ""], &["--channel", "empty"]),
        (&["--channel", "a\nb"], &["--channel", "control"]),
        (&["--bundle-id", "a\u{7f}b"], &["--bundle-id", "control"]),
        (
            &["--auto-records", "3"],
            &["--auto-records", "--layer auto"],
        ),
        (
            &["--min-probe-locality", "50"],
            &["--min-probe-locality", "--no-drift-check"],
        ),
        (&["--allow-drift"], &["--allow-drift", "--no-drift-check"]),
        (&["--use-probes"], &["--use-probes", "serac"]),
    ];
    let long_id = "i".repeat(100_000);
    let long = [&["--bundle-id", long_id.as_str()][..]];
    for extra in cases.iter().map(|(e, _)| *e).chain(long.iter().copied()) {
        let needles: &[&str] = cases
            .iter()
            .find(|(e, _)| *e == extra)
            .map_or(&["--bundle-id", "16384"], |(_, n)| *n);
        refused_within(
            &compile_args(
                &model,
                "grace",
                &edits,
                &out,
                &key,
                &[&base[..], extra].concat(),
            ),
            60,
            needles,
        );
    }
    // Two records for one prompt, named with their ids, whether the targets differ or not.
    for (name, second, needles) in [
        (
            "conflict.jsonl",
            "London",
            &["different targets", "\"Berlin\" and \"London\""][..],
        ),
        (
            "duplicate.jsonl",
            "Berlin",
            &["same target \"Berlin\" (a duplicate)"][..],
        ),
    ] {
        let f = dir.join(name);
        std::fs::write(
            &f,
            format!(
                "{{\"id\": \"a\", \"prompt\": \"{PROMPT}\", \"target\": \"Berlin\"}}\n\
                 {{\"id\": \"b\", \"prompt\": \" {PROMPT} \", \"target\": \"{second}\"}}\n"
            ),
        )
        .unwrap();
        let mut all = vec!["records 0 (id \"a\") and 1 (id \"b\")", "same prompt"];
        all.extend_from_slice(needles);
        refused_within(
            &compile_args(&model, "grace", &f, &out, &key, &base),
            60,
            &all,
        );
    }
    assert!(files_of(&dir, "o.amend").is_empty());
    // The same command with none of these writes the bundle.
    ok(&compile_args(&model, "grace", &edits, &out, &key, &base));
}

/// A record without an id appended onto a bundle made from one: it is numbered after the base's
/// edits instead of clashing with its id "0"; the next version stays on the base's channel, and a
/// different --channel is refused. Needs no real model.
#[test]
fn compile_numbers_id_less_records_after_the_base_bundle() {
    let (dir, key, public, edits) = one_edit("qa-base", "qa-base");
    let model = tiny_model(dir.join("m.gguf"));
    let base = ["--no-drift-check", "--allow-partial", "--threads", "1"];
    let first = dir.join("v1.amend");
    ok(&compile_args(
        &model,
        "grace",
        &edits,
        &first,
        &key,
        &[&base[..], &["--channel", "beta"]].concat(),
    ));
    let more = dir.join("more.jsonl");
    std::fs::write(
        &more,
        format!("{{\"prompt\": \"{UNRELATED}\", \"target\": \"Paris\"}}\n"),
    )
    .unwrap();
    let second = dir.join("v2.amend");
    let on_base = [&base[..], &["--base-bundle", s(&first)]].concat();
    refused_within(
        &compile_args(
            &model,
            "grace",
            &more,
            &second,
            &key,
            &[&on_base[..], &["--channel", "gamma"]].concat(),
        ),
        60,
        &["--channel \"gamma\"", "\"beta\""],
    );
    assert!(!second.exists());
    ok(&compile_args(
        &model, "grace", &more, &second, &key, &on_base,
    ));
    let info: serde_json::Value = serde_json::from_str(&ok(&[
        "inspect",
        s(&second),
        "--pubkey",
        s(&public),
        "--json",
    ]))
    .unwrap();
    assert_eq!(info["channel"], "beta", "{info}");
    assert_eq!(info["version"], 2, "{info}");
    assert_eq!(edit_ids(&second, &public), ["0", "1"]);
}

/// The edit ids of a bundle, in manifest order (`inspect --json`).
fn edit_ids(bundle: &Path, public: &Path) -> Vec<String> {
    let info: serde_json::Value = serde_json::from_str(&ok(&[
        "inspect",
        s(bundle),
        "--pubkey",
        s(public),
        "--json",
    ]))
    .unwrap();
    info["edits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// `data synth` keeps an existing --out unless --force, writes JSON lines to a .jsonl name
/// (which `compile --format auto` reads as such) and bounds --n. Needs no real model.
#[test]
fn data_synth_keeps_files_writes_json_lines_and_bounds_n() {
    let dir = tmp().join("qa-synth");
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(dir.join("m.gguf"));
    let before = std::fs::read(&model).unwrap();
    refused(
        &["data", "synth", "--n", "3", "--out", s(&model)],
        &["--out", "exists", "--force"],
    );
    assert_eq!(std::fs::read(&model).unwrap(), before);
    let lines = dir.join("syn.jsonl");
    for force in [&[][..], &["--force"][..]] {
        ok(&[
            &["data", "synth", "--n", "3", "--out", s(&lines)][..],
            force,
        ]
        .concat());
        let text = std::fs::read_to_string(&lines).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        for l in text.lines() {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(r["prompt"].is_string(), "{l}");
        }
    }
    let big = dir.join("big.json");
    refused(
        &["data", "synth", "--n", "100001", "--out", s(&big)],
        &["--n", "100000"],
    );
    assert!(!big.exists());
}

/// A small valid bundle (a codebook edit and a one-record memory, for a 3-layer, 4-wide llama)
/// that `f` may then change (the manifest is laid out again), signed with the key file `key`:
/// what a hostile signer could write, including what the builder refuses.
fn crafted_bundle(
    path: &Path,
    key: &Path,
    template: &str,
    f: impl FnOnce(&mut amend_edits::bundle::Manifest),
) {
    use amend_edits::bundle::*;
    let mut b = BundleBuilder::new(BundleMeta {
        bundle_id: "crafted".into(),
        channel: "main".into(),
        version: 1,
        created: 0,
        not_before: 0,
        expires: 4_000_000_000,
        model: ModelBinding {
            fingerprint: [0; 32],
            arch: "llama".into(),
            n_layer: 3,
            n_embd: 4,
        },
    });
    let site = amend_edits::Site::FfnOutput;
    let cb = b.add_codebook(
        1,
        site,
        site,
        0,
        false,
        4,
        &[1.0, 0.0, 0.0, 0.0],
        &[0.5; 4],
        &[0.1],
    );
    b.add_edit("e", 1, site, "p", " t", cb, 0, 1);
    let record = MemoryRecordDesc {
        edit_id: "m".into(),
        prompt: "a".into(),
        target: "b".into(),
        text: "a is b".into(),
    };
    let embedder = EmbedderDesc::BaseModel {
        layer: 1,
        site: 4,
        pooling: 0,
    };
    let mem = b.add_memory(
        4,
        &[1.0, 0.0, 0.0, 0.0],
        0.8,
        template,
        embedder,
        vec![record],
    );
    b.add_edit("m", 1, amend_edits::Site::ResidualOut, "a", "b", mem, 0, 1);
    let base = b.build_unsigned().unwrap();
    let base = base.as_slice();
    let h = read_header(base).unwrap();
    let mut m =
        decode_manifest(&base[HEADER_LEN..HEADER_LEN + h.manifest_len.get() as usize]).unwrap();
    let blobs: Vec<Vec<u8>> = m
        .sections
        .iter()
        .map(|s| base[s.offset as usize..(s.offset + s.len) as usize].to_vec())
        .collect();
    f(&mut m);
    layout(&mut m).unwrap();
    let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    let mut out = assemble(&m, &refs).unwrap();
    let sk = amend_edits::keys::signing_key_from_file_bytes(&std::fs::read(key).unwrap()).unwrap();
    sign_in_place(out.as_mut_slice(), &sk).unwrap();
    std::fs::write(path, out.as_slice()).unwrap();
}

/// No control character reaches the terminal: only line ends.
fn assert_no_controls(text: &str, what: &str) {
    let bad: Vec<char> = text
        .chars()
        .filter(|&c| c.is_control() && c != '\n')
        .collect();
    assert!(
        bad.is_empty(),
        "{what} prints control characters {bad:?}:\n{text}"
    );
}

/// QA: a bundle id with a newline and ESC made `inspect` print a forged "signer ... (verified)"
/// line and hide the real one. The format refuses control characters in ids and the channel
/// (verify says which), and `inspect` escapes every string from the bundle, in text and JSON,
/// whether or not the manifest passes its checks.
#[test]
fn inspect_escapes_bundle_text_and_ids_with_controls_are_refused() {
    use amend_edits::bundle::{Verification, VerifiedBackend};
    let dir = tmp().join("inspect-escapes");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair("inspect-escapes");
    let forged =
        "trusted (channel default, version 9)\nsigner   8541918fafa16588 (verified)\n\x1b[8m";
    let spoof = dir.join("spoof.amend");
    crafted_bundle(&spoof, &key, "{prompt}", |m| {
        m.bundle_id = forged.into();
        m.edits[0].id = "e\n  x layer 1".into();
    });
    let text = ok(&["inspect", s(&spoof)]);
    assert_no_controls(&text, "inspect");
    let signers: Vec<&str> = text.lines().filter(|l| l.starts_with("signer")).collect();
    assert_eq!(signers.len(), 1, "{text}");
    assert!(signers[0].contains("NOT checked"), "{text}");
    assert!(
        text.contains(r"version 9)\nsigner") && text.contains(r"\u{1b}[8m"),
        "{text}"
    );
    assert!(text.contains("control character in bundle id"), "{text}");
    refused(
        &["verify", s(&spoof), "--pubkey", s(&public)],
        &["control character in bundle id"],
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&spoof), "--json"])).unwrap();
    assert_eq!(json["bundle_id"], forged);

    // A valid bundle: prompts, memory templates, the architecture and backend names may hold
    // such characters (a C1 CSI, U+009B, acts as ESC [ on some terminals); shown escaped.
    let text_bundle = dir.join("text.amend");
    crafted_bundle(&text_bundle, &key, "{prompt}\x1b[2J\u{9b}8m", |m| {
        m.model.arch = "llama\x1b[8m".into();
        m.edits[0].prompt = "line one\nline two\x1b[1A".into();
        m.verification = Some(Verification {
            backends: vec![VerifiedBackend {
                backend: "cpu\x1b[8m\u{7f}".into(),
                passed: 2,
                total: 2,
            }],
            required: false,
        });
    });
    let text = ok(&["inspect", s(&text_bundle), "--pubkey", s(&public)]);
    assert_no_controls(&text, "inspect");
    assert!(
        text.contains("(verified)") && text.contains(r"\u{9b}8m"),
        "{text}"
    );
    assert!(
        text.contains(r"cpu\u{1b}[8m\u{7f}") && text.contains(r"llama\u{1b}[8m"),
        "{text}"
    );
    let raw = ok(&["inspect", s(&text_bundle), "--pubkey", s(&public), "--json"]);
    assert_no_controls(&raw, "inspect --json");
    let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(json["payloads"][1]["template"], "{prompt}\x1b[2J\u{9b}8m");
    assert_eq!(
        json["verification"]["backends"][0]["backend"],
        "cpu\x1b[8m\u{7f}"
    );
    let out = ok(&["verify", s(&text_bundle), "--pubkey", s(&public)]);
    assert_no_controls(&out, "verify");

    // Characters shown as nothing or as a line break: escaped in texts, refused in ids.
    let hidden = dir.join("hidden.amend");
    crafted_bundle(&hidden, &key, "{prompt}", |m| {
        m.edits[0].prompt = "Paris\u{202e}nilreB\u{2028}signer x (verified)".into();
    });
    let text = ok(&["inspect", s(&hidden), "--pubkey", s(&public)]);
    assert!(
        text.contains(r"Paris\u{202e}nilreB\u{2028}signer") && !text.contains('\u{2028}'),
        "{text}"
    );
    let spoof_id = dir.join("spoof-id.amend");
    crafted_bundle(&spoof_id, &key, "{prompt}", |m| {
        m.edits[0].id = "par\u{200b}is".into();
    });
    refused(
        &["verify", s(&spoof_id), "--pubkey", s(&public)],
        &["control character in id"],
    );
}

/// QA: `sign --out` could replace its own --key (or the public key beside it): the secret key
/// was lost. Refused before anything is written; --out naming the bundle itself signs in place.
#[test]
fn sign_refuses_an_out_that_is_its_key_or_bundle() {
    let dir = tmp().join("sign-out-apart");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair("sign-out-apart");
    let bundle = dir.join("b.amend");
    crafted_bundle(&bundle, &key, "{prompt}", |_| {});
    let (k0, p0, b0) = (
        std::fs::read(&key).unwrap(),
        std::fs::read(&public).unwrap(),
        std::fs::read(&bundle).unwrap(),
    );
    refused(
        &["sign", "--key", s(&key), s(&bundle), "--out", s(&key)],
        &["--out", "--key", "give another name"],
    );
    refused(
        &["sign", "--key", s(&key), s(&bundle), "--out", s(&public)],
        &["--out", "key file"],
    );
    let hard = dir.join("b-hard.amend");
    std::fs::hard_link(&bundle, &hard).unwrap();
    // --out naming the bundle by another name is signing in place, which a hard link refuses.
    refused(
        &["sign", "--key", s(&key), s(&bundle), "--out", s(&hard)],
        &["hard links", "--out a new file"],
    );
    assert_eq!(std::fs::read(&key).unwrap(), k0);
    assert_eq!(std::fs::read(&public).unwrap(), p0);
    assert_eq!(std::fs::read(&bundle).unwrap(), b0);
    ok(&[
        "sign",
        "--key",
        s(&key),
        s(&bundle),
        "--out",
        s(&dir.join("c.amend")),
    ]);
    // --out spelling the bundle's own path signs it in place (it used to be refused).
    std::fs::remove_file(&hard).unwrap();
    let (k2, p2) = keypair("sign-out-apart-2");
    let same = format!("{}/./b.amend", dir.display());
    ok(&["sign", "--key", s(&k2), s(&bundle), "--out", &same]);
    ok(&["verify", s(&bundle), "--pubkey", s(&p2)]);
}

/// QA: signing in place made a mode 600 or 444 bundle 644, replaced a symlink by a regular
/// file (its target left unsigned), split a hard link, and re-signed another key's bundle
/// without a word.
#[test]
fn sign_in_place_keeps_the_mode_and_refuses_links() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp().join("sign-in-place");
    std::fs::create_dir_all(&dir).unwrap();
    let (k1, p1) = keypair("sign-in-place-1");
    let (k2, _) = keypair("sign-in-place-2");
    let bundle = dir.join("b.amend");
    crafted_bundle(&bundle, &k1, "{prompt}", |_| {});
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for m in [0o600, 0o444, 0o640] {
        std::fs::set_permissions(&bundle, std::fs::Permissions::from_mode(m)).unwrap();
        ok(&["sign", "--key", s(&k1), s(&bundle)]);
        assert_eq!(mode(&bundle), m);
    }
    std::fs::set_permissions(&bundle, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Another key's signature is replaced with a notice naming both keys.
    let out = amend(&["sign", "--key", s(&k2), s(&bundle)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("was signed by key"),
        "{err}"
    );
    assert!(ok(&["sign", "--key", s(&k1), s(&bundle)]).contains("signed"));
    ok(&["verify", s(&bundle), "--pubkey", s(&p1)]);

    let link = dir.join("link.amend");
    std::os::unix::fs::symlink(&bundle, &link).unwrap();
    refused(
        &["sign", "--key", s(&k2), s(&link)],
        &["symbolic link", s(&bundle), "--out"],
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let hard = dir.join("hard.amend");
    std::fs::hard_link(&bundle, &hard).unwrap();
    refused(
        &["sign", "--key", s(&k2), s(&hard)],
        &["hard links", "--out"],
    );
    let before = std::fs::read(&bundle).unwrap();
    assert_eq!(std::fs::read(&hard).unwrap(), before);
    // With --out a hard-linked bundle is only read; a new file takes the bundle's mode.
    let out = dir.join("out.amend");
    ok(&["sign", "--key", s(&k2), s(&hard), "--out", s(&out)]);
    assert_eq!(mode(&out), 0o600);
}

/// QA: `verify --state` (read only) left a `FILE.lock`, `run --state` on a bad state file left
/// one too, and neither error named --state.
#[test]
fn verify_state_is_read_only_and_bad_state_files_are_named() {
    let dir = tmp().join("state-read-only");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair("state-read-only");
    let bundle = dir.join("b.amend");
    crafted_bundle(&bundle, &key, "{prompt}", |_| {});
    let lock = |p: &Path| PathBuf::from(format!("{}.lock", p.display()));
    let missing = dir.join("missing.state");
    ok(&[
        "verify",
        s(&bundle),
        "--pubkey",
        s(&public),
        "--state",
        s(&missing),
    ]);
    assert!(!missing.exists() && !lock(&missing).exists());
    let binary = dir.join("binary.state");
    std::fs::write(&binary, b"\xff\xfe\x00").unwrap();
    let fifo = dir.join("fifo.state");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let model = tiny_model(dir.join("tiny.gguf"));
    for bad in [&binary, &fifo] {
        refused(
            &[
                "verify",
                s(&bundle),
                "--pubkey",
                s(&public),
                "--state",
                s(bad),
            ],
            &["--state", s(bad)],
        );
        let out = amend(&[
            "run",
            "--model",
            s(&model),
            "--prompt",
            "a b",
            "--max-tokens",
            "1",
            "--threads",
            "1",
            "--bundle",
            s(&bundle),
            "--pubkey",
            s(&public),
            "--state",
            s(bad),
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--state") && err.contains(s(bad)), "{err}");
        assert!(!lock(bad).exists(), "{} left behind", lock(bad).display());
    }
}

/// Standard output that cannot be written ends a command with an error, never std's panic
/// (exit 101, "failed printing to stdout") or a silent exit 0: a full disk is exit 1 with a
/// message; a reader that went away, the shell's SIGPIPE status 141, quietly.
#[test]
fn stdout_failures_are_errors_not_panics() {
    use std::process::Stdio;
    let dir = tmp().join("stdout-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(dir.join("tiny.gguf"));
    let keys = dir.join("k");
    let run = |args: &[&str], stdout: Stdio| {
        Command::new(env!("CARGO_BIN_EXE_amend"))
            .args(args)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    let full = || Stdio::from(std::fs::File::create("/dev/full").unwrap());
    let m = s(&model);
    for args in [
        vec!["info", "--model", m],
        vec![
            "run",
            "--model",
            m,
            "--prompt",
            "hello",
            "--max-tokens",
            "4",
            "--threads",
            "1",
        ],
        vec!["keygen", "--out", s(&keys)],
    ] {
        let out = run(&args, full());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("writing standard output"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // A closed pipe: the reader is gone before the first line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(["info", "--model", m])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `amend run` refuses flags it would ignore or cut silently, before the model opens: an ONNX
/// Runtime flag without --backend ort, --pubkey without --bundle, a --ctx past the model's
/// trained context (the tiny model's is 512), and a temperature so small the logits overflow.
#[test]
fn run_refuses_flags_it_would_ignore() {
    let dir = tmp().join("run-flags");
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(dir.join("tiny.gguf"));
    let m = s(&model);
    let run = |extra: &[&'static str]| -> Vec<&str> {
        [
            &[
                "run",
                "--model",
                m,
                "--prompt",
                "hello",
                "--max-tokens",
                "2",
                "--threads",
                "1",
            ][..],
            extra,
        ]
        .concat()
    };
    refused(&run(&["--ep", "qnn"]), &["--ep", "needs --backend ort"]);
    refused(
        &run(&["--onnx", "x.onnx"]),
        &["--onnx", "needs --backend ort"],
    );
    refused(
        &run(&["--pubkey", "k.pub"]),
        &["--pubkey", "needs --bundle"],
    );
    refused(&run(&["--ctx", "1000"]), &["--ctx 1000", "at most 512"]);
    refused(&run(&["--temp", "1e-40"]), &["--temp", "0 is greedy"]);
    refused(&run(&["--ctx", "1"]), &["more than --ctx 1 holds"]);
    // The default context is cut to the model's, silently: that is the default's meaning.
    ok(&run(&[]));
    // eval takes the same ONNX Runtime flags, under the same rule.
    let (_, _, data) = tiny_eval_scratch("run-flags-eval");
    refused(
        &["eval", "--model", m, "--data", s(&data), "--ep", "qnn"],
        &["--ep", "needs --backend ort"],
    );
}

/// On a base bundle, records keep the ids the loader read: a null `id` defers to `case_id` (9
/// here, kept). An id that is `true` is refused before any work (it used to be numbered by its
/// index, and compile then re-read the file and took `case_id` for its id). Needs no real
/// model.
#[test]
fn compile_numbers_records_as_the_loader_read_their_ids() {
    let (dir, key, public, edits) = one_edit("qa-loader-ids", "qa-loader-ids");
    let model = tiny_model(dir.join("m.gguf"));
    let base = ["--no-drift-check", "--allow-partial", "--threads", "1"];
    let first = dir.join("v1.amend");
    ok(&compile_args(&model, "grace", &edits, &first, &key, &base));
    let more = dir.join("more.jsonl");
    std::fs::write(
        &more,
        format!(
            "{{\"id\": null, \"case_id\": 9, \"prompt\": \"{UNRELATED}\", \"target\": \"Paris\"}}\n"
        ),
    )
    .unwrap();
    let second = dir.join("v2.amend");
    let on_base = [&base[..], &["--base-bundle", s(&first)]].concat();
    ok(&compile_args(
        &model, "grace", &more, &second, &key, &on_base,
    ));
    assert_eq!(edit_ids(&second, &public), ["0", "9"]);
    let odd = dir.join("odd.jsonl");
    std::fs::write(
        &odd,
        format!("{{\"id\": true, \"prompt\": \"{UNRELATED}\", \"target\": \"Paris\"}}\n"),
    )
    .unwrap();
    let third = dir.join("v3.amend");
    refused_within(
        &compile_args(&model, "grace", &odd, &third, &key, &on_base),
        60,
        &["field `id`", "a boolean is not an id"],
    );
    assert!(!third.exists());
}

/// A layer the `--hparams` file gives is checked like one `--set` gives, naming the file and
/// the key: outside the model, or with `--layer`, it is refused before any work. The layer in
/// effect is the one checked: a file's layer that `--set` overrides is not refused. Needs no
/// real model.
#[test]
fn compile_checks_the_layer_in_effect_and_names_where_it_was_given() {
    let (dir, key, _public, edits) = one_edit("qa-hp-layer", "qa-hp-layer");
    let model = tiny_model(dir.join("m.gguf"));
    let hp = dir.join("hp.toml");
    std::fs::write(&hp, "[grace]\nlayer = 99\n").unwrap();
    let out = dir.join("o.amend");
    let base = [
        "--no-drift-check",
        "--allow-partial",
        "--threads",
        "1",
        "--hparams",
        s(&hp),
    ];
    let from_file = format!("--hparams {}: grace.layer", hp.display());
    refused_within(
        &compile_args(&model, "grace", &edits, &out, &key, &base),
        60,
        &[&from_file, "the model has 2 layers", "0..=1"],
    );
    refused_within(
        &compile_args(
            &model,
            "grace",
            &edits,
            &out,
            &key,
            &[&base[..], &["--layer", "1"]].concat(),
        ),
        60,
        &[&from_file, "and --layer both give the layer"],
    );
    refused_within(
        &compile_args(
            &model,
            "grace",
            &edits,
            &out,
            &key,
            &[&base[..], &["--set", "grace.layer=7"]].concat(),
        ),
        60,
        &["--set grace.layer=7", "the model has 2 layers"],
    );
    assert!(!out.exists());
    ok(&compile_args(
        &model,
        "grace",
        &edits,
        &out,
        &key,
        &[&base[..], &["--set", "grace.layer=1"]].concat(),
    ));
    assert!(out.exists());
}

/// `data synth` refuses an --out that is no regular file as `check_output_path` names it (a
/// directory, a FIFO), with or without --force, and writes nothing. Needs no real model.
#[test]
fn data_synth_names_what_an_output_that_is_no_file_is() {
    let dir = tmp().join("qa-synth-kind");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("out.fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for force in [&[][..], &["--force"][..]] {
        refused(
            &[&["data", "synth", "--n", "2", "--out", s(&dir)][..], force].concat(),
            &["--out", "that is a directory"],
        );
        refused(
            &[&["data", "synth", "--n", "2", "--out", s(&fifo)][..], force].concat(),
            &["--out", "that is a FIFO, not a regular file"],
        );
    }
    assert_eq!(dir_listing(&dir), ["out.fifo"]);
}

/// Each output of `export-onnx`, `locate` and the `scope-model` commands is kept apart from the
/// command's inputs (or a link to one): writing it renamed the output over the ONNX Runtime
/// library (`export-onnx --out LIB`), the model (`locate` with `--out-dir/NAME.json` the
/// model), a checkpoint file or the --tune factors (`convert`), the data, bundle or key
/// (`route --dump`) and the data (`train-head`, `tune --out`), all with exit 0. Refused by
/// flag before any work, each input left as it was.
#[test]
fn outputs_that_name_an_input_are_refused_in_the_other_commands() {
    let dir = tmp().join("outputs-apart");
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(dir.join("tiny.gguf"));
    let link = |target: &Path, name: &str| {
        let l = dir.join(name);
        let _ = std::fs::remove_file(&l);
        std::os::unix::fs::symlink(target, &l).unwrap();
        l
    };
    let is_link = |p: &Path| std::fs::symlink_metadata(p).unwrap().is_symlink();

    // locate: the model under the name of the trace's json (the tiny model fails its trace, so
    // the refusal must come first and name both).
    let trace = link(&model, "trace.json");
    refused_within(
        &[
            "locate",
            "--model",
            s(&trace),
            "--prompt",
            "a b c",
            "--subject",
            "b",
            "--target",
            "c",
            "--samples",
            "1",
            "--threads",
            "1",
            "--out-dir",
            s(&dir),
        ],
        60,
        &["--out-dir/--name", "that is the --model file"],
    );
    assert!(is_link(&trace));

    // scope-model convert: a checkpoint file or the --tune factors as --out.
    let from = scope_checkpoint_with("outputs-apart-ckpt", "x", "0", None);
    let config = std::fs::read(from.join("config.json")).unwrap();
    let factors = dir.join("factors.safetensors");
    std::fs::write(&factors, b"not factors").unwrap();
    for (out, tune) in [
        (from.join("config.json"), None),
        (factors.clone(), Some(&factors)),
    ] {
        let mut a = vec![
            "scope-model",
            "convert",
            "--from",
            s(&from),
            "--out",
            s(&out),
        ];
        if let Some(t) = tune {
            a.extend(["--tune", s(t)]);
        }
        let flag = if tune.is_some() { "--tune" } else { "--from" };
        refused(&a, &["--out", &format!("that is the {flag} file")]);
    }
    assert_eq!(std::fs::read(from.join("config.json")).unwrap(), config);
    assert_eq!(std::fs::read(&factors).unwrap(), b"not factors");
    // --from must be the checkpoint's directory.
    refused(
        &[
            "scope-model",
            "convert",
            "--from",
            s(&model),
            "--out",
            s(&dir.join("x.gguf")),
        ],
        &["--from", "not a directory"],
    );

    // scope-model tune and train-head: --out as --data (or --calibrate).
    let data = dir.join("records.json");
    let records = r#"[{"prompt": "a b", "subject": "a", "target_new": "c"}]"#;
    std::fs::write(&data, records).unwrap();
    refused(
        &[
            "scope-model",
            "tune",
            "--from",
            s(&from),
            "--data",
            s(&data),
            "--out",
            s(&data),
        ],
        &["--out", "that is the --data file"],
    );
    let other = dir.join("other.json");
    std::fs::write(&other, records).unwrap();
    for (flag, out) in [("--data", &data), ("--calibrate", &other)] {
        refused(
            &[
                "scope-model",
                "train-head",
                "--data",
                s(&data),
                "--calibrate",
                s(&other),
                "--out",
                s(out),
            ],
            &["--out", &format!("that is the {flag} file")],
        );
    }
    // Too few records for the folds: said of --data, before the scope model loads.
    refused(
        &[
            "scope-model",
            "train-head",
            "--data",
            s(&data),
            "--out",
            s(&dir.join("head.safetensors")),
            "--scope-model",
            s(&dir.join("missing.gguf")),
        ],
        &["--data: 1 record(s)", "at least 5"],
    );
    // With --calibrate the folds are unused: no such limit (here the scope model is missing).
    let out = amend(&[
        "scope-model",
        "train-head",
        "--data",
        s(&data),
        "--calibrate",
        s(&other),
        "--out",
        s(&dir.join("head.safetensors")),
        "--scope-model",
        s(&dir.join("missing.gguf")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.gguf") && !err.contains("at least 5"),
        "{err}"
    );

    // scope-model route: --dump as the data, the bundle or the key (checked before any is read).
    let bundle = dir.join("b.amend");
    let key = dir.join("k.pub");
    std::fs::write(&bundle, b"bundle").unwrap();
    std::fs::write(&key, b"key").unwrap();
    for (flag, dump) in [("--data", &data), ("--bundle", &bundle), ("--pubkey", &key)] {
        refused(
            &[
                "scope-model",
                "route",
                "--bundle",
                s(&bundle),
                "--pubkey",
                s(&key),
                "--data",
                s(&data),
                "--dump",
                s(dump),
            ],
            &["--dump", &format!("that is the {flag} file")],
        );
    }
    assert_eq!(std::fs::read_to_string(&data).unwrap(), records);
    assert_eq!(std::fs::read(&bundle).unwrap(), b"bundle");
    assert_eq!(std::fs::read(&key).unwrap(), b"key");

    // export-onnx: the ONNX Runtime library it loads (a link to it here).
    if !ort_libraries() {
        return;
    }
    let lib = amend_runtime::onnxruntime::default_library(&amend_runtime::onnxruntime::Ep::Cpu);
    let lib_link = link(&lib, "libort.so");
    refused(
        &[
            "export-onnx",
            "--model",
            s(&model),
            "--ort-lib",
            s(&lib_link),
            "--out",
            s(&lib_link),
        ],
        &["--out", "that is the --ort-lib file"],
    );
    assert!(is_link(&lib_link));
    assert!(!dir.join("libort.so.amend").exists());
}

/// A decode rate needs at least 2 generated tokens (the first comes from the prefill):
/// `bench --gen-tokens 1` and `parity --speed-tokens 1` printed decode 0.0 tok/s and NaN
/// ratios with exit 0, which bench's verdict did not flag. A hook layer past the model is
/// refused naming --layer, parity's speed rounds are bounded like bench's (a million ran
/// without end), and an ONNX Runtime value the library refuses names its flag.
#[test]
fn speed_counts_layers_and_ort_values_are_refused_by_flag() {
    let dir = tmp().join("speed-counts");
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(dir.join("tiny.gguf"));
    let m = s(&model);
    refused_within(
        &["bench", "--model", m, "--threads", "1", "--gen-tokens", "1"],
        60,
        &["--gen-tokens 1", "at least 2"],
    );
    refused_within(
        &[
            "bench",
            "--model",
            m,
            "--threads",
            "1",
            "--rounds",
            "1",
            "--layer",
            "2",
        ],
        60,
        &["--layer 2", "0..=1"],
    );
    let parity = |extra: &[&'static str]| {
        [
            &["parity", "--model", m, "--limit", "1", "--tokens", "2"][..],
            extra,
        ]
        .concat()
    };
    refused_within(
        &parity(&["--speed-tokens", "1"]),
        60,
        &["--speed-tokens 1", "at least 2"],
    );
    refused_within(
        &parity(&["--speed-rounds", "1000000"]),
        60,
        &["--speed-rounds", "1..=1000"],
    );
    let out = dir.join("g.onnx");
    for (flag, value) in [
        ("--ep", "bogus"),
        ("--emulate", "bogus"),
        ("--static-shapes", "8,4"),
        ("--ort-weights", "bogus"),
    ] {
        refused(
            &["export-onnx", "--model", m, "--out", s(&out), flag, value],
            &[&format!("{flag} \"{value}\"")],
        );
    }
    assert!(!out.exists());
}

/// `keygen --out` naming a directory as `.`, `..` or `DIR/.` is refused like `DIR/` (it wrote
/// the hidden files `..key` and `...key`), and a dangling link at PREFIX.key is an existing
/// file: replaced only with --force.
#[test]
fn keygen_refuses_directory_prefixes_and_keeps_links() {
    let dir = tmp().join("keygen-prefixes");
    std::fs::create_dir_all(&dir).unwrap();
    for p in [format!("{}/.", s(&dir)), format!("{}/sub/..", s(&dir))] {
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        refused(&["keygen", "--out", &p], &["--out", "not a directory"]);
    }
    let dangling = dir.join("k.key");
    let _ = std::fs::remove_file(&dangling);
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
    refused(
        &["keygen", "--out", s(&dir.join("k"))],
        &["k.key exists", "--force"],
    );
    assert!(std::fs::symlink_metadata(&dangling).unwrap().is_symlink());
    assert_eq!(
        dir_listing(&dir),
        ["k.key", "sub"],
        "a refused keygen wrote a file"
    );
}

/// `scope-model route` prints the data's locality kinds in its table: a control character in
/// one (a newline and a row of made-up figures, an ESC sequence) is escaped, not a forged row.
#[test]
fn scope_model_route_escapes_the_data_text_it_prints() {
    let kind = "X\n| edit prompt | 9 | 100.0 | 0.0 | 0.0 | 0.0 |\u{1b}[31m";
    let record = serde_json::json!({
        "id": "ctl-1",
        "prompt": "The capital of France is",
        "subject": "France",
        "target_new": "Berlin",
        "rephrase_prompt": ["France's capital city is"],
        "locality": {kind: [{"prompt": "The capital of Italy is", "ground_truth": "Rome"}]},
    });
    let Some(lines) = serac_route_dump("route-escape", &[&record], &["--no-drift-check"]) else {
        return;
    };
    assert!(!lines.is_empty());
    let dir = tmp().join("route-escape");
    let out = ok(&[
        "scope-model",
        "route",
        "--bundle",
        s(&dir.join("records.amend")),
        "--pubkey",
        s(&tmp().join("e2e-route-escape.pub")),
        "--data",
        s(&dir.join("records.json")),
        "--verbose",
    ]);
    assert!(!out.contains('\u{1b}'), "{out}");
    assert!(
        !out.lines().any(|l| l.starts_with("| edit prompt | 9 |")),
        "{out}"
    );
    assert!(out.contains("| locality: X\\n| edit prompt | 9 |"), "{out}");
}

/// `run --scope-model` is opened only when a bundle's memories route with a scope model: with
/// a bundle that has none it is not used, and `run` says so (a wrong path used to pass unseen).
#[test]
fn run_says_when_the_scope_model_is_not_used() {
    let (dir, key, public, edits) = one_edit("run-scope-unused", "run-scope-unused");
    let tiny = tiny_model(dir.join("tiny.gguf"));
    let out = dir.join("g.amend");
    ok(&compile_args(
        &tiny,
        "grace",
        &edits,
        &out,
        &key,
        &["--threads", "1", "--allow-partial", "--no-drift-check"],
    ));
    let missing = dir.join("no-such-scope.gguf");
    let r = amend(&[
        "run",
        "--model",
        s(&tiny),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "2",
        "--threads",
        "1",
        "--bundle",
        s(&out),
        "--pubkey",
        s(&public),
        "--scope-model",
        s(&missing),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("--scope-model") && err.contains("not used"),
        "{err}"
    );
}

/// Edit files as KnowEdit/EasyEdit users write them (session 37): a UTF-8 byte order mark and
/// ROME's `{}` subject template are read (the prompt used to be trained raw, "{} is ..."), and
/// an id a bundle refuses is refused with its record before any training (it used to fail after
/// training, at the bundle's verification, naming no record).
#[test]
fn compile_reads_bom_and_subject_templates_and_refuses_bad_ids_up_front() {
    let (dir, key, _public, _) = one_edit("edit-file-contents", "edit-file-contents");
    let tiny = tiny_model(dir.join("tiny.gguf"));
    let edits = dir.join("template.json");
    std::fs::write(
        &edits,
        "\u{feff}[\r\n{\"prompt\": \"{} is a native speaker of\", \"subject\": \"Danielle Darrieux\",\r\n \"target_new\": {\"str\": \"English\"}}\r\n]\r\n",
    )
    .unwrap();
    let out = dir.join("t.amend");
    ok(&compile_args(
        &tiny,
        "grace",
        &edits,
        &out,
        &key,
        &["--threads", "1", "--allow-partial", "--no-drift-check"],
    ));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", "--json", s(&out)])).unwrap();
    let edit = &json["edits"][0];
    assert_eq!(edit["prompt"], "Danielle Darrieux is a native speaker of");
    assert_eq!(edit["target"], "English");

    for (name, line, needles) in [
        (
            "empty-id",
            r#"{"id": "", "prompt": "a", "target": "b"}"#,
            vec!["line 2", "record 1", "field `id`", "empty"],
        ),
        (
            "dup-key",
            r#"{"prompt": "a", "prompt": "b", "target": "c"}"#,
            vec!["line 2", "duplicate key `prompt`"],
        ),
        (
            "no-subject",
            r#"{"prompt": "{} is", "target": "b"}"#,
            vec!["line 2", "field `prompt`", "no `subject`"],
        ),
    ] {
        let edits = dir.join(format!("{name}.jsonl"));
        std::fs::write(
            &edits,
            format!("{{\"prompt\": \"{PROMPT}\", \"target\": \"Berlin\"}}\n{line}\n"),
        )
        .unwrap();
        let out = dir.join(format!("{name}.amend"));
        let r = amend(&compile_args(
            &tiny,
            "grace",
            &edits,
            &out,
            &key,
            &["--threads", "1", "--allow-partial"],
        ));
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        for n in &needles {
            assert!(err.contains(n), "{name}: lacks {n:?}:\n{err}");
        }
        // Refused before the model loads or anything trains.
        assert!(
            !err.contains("loaded") && !err.contains("compile:"),
            "{err}"
        );
        assert!(
            files_of(&dir, name).iter().all(|f| f.ends_with(".jsonl")),
            "{name}"
        );
    }
}

/// More records than a bundle holds (MAX_EDITS, 262,144) are refused before the model loads:
/// training started anyway, and only the bundle writer would have refused them, hours later.
#[test]
fn compile_refuses_more_records_than_a_bundle_holds_up_front() {
    let (dir, key, _public, _edits) = one_edit("qa-too-many", "qa-too-many");
    let n = amend_edits::bundle::MAX_EDITS + 1;
    let mut text = String::with_capacity(n * 40);
    for i in 0..n {
        text.push_str(&format!("{{\"prompt\": \"p{i} is\", \"target\": \"t\"}}\n"));
    }
    let many = dir.join("many.jsonl");
    std::fs::write(&many, text).unwrap();
    let out = dir.join("o.amend");
    refused_within(
        &compile_args(
            &dir.join("no-model.gguf"),
            "grace",
            &many,
            &out,
            &key,
            &["--threads", "1"],
        ),
        60,
        &["--edits", "262145 record(s)", "at most 262144 edits"],
    );
    assert!(!out.exists());
}

/// Session 38: `keygen --force > /dev/full` replaced both key files, then exited 1
/// because it could not print the public key. The report is printed before the staged keys
/// are renamed into place: the old keys stay byte-identical, and no staged file is left.
#[test]
fn keygen_that_cannot_print_keeps_the_old_keys() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp().join("keygen-full");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("k");
    ok(&["keygen", "--out", s(&prefix)]);
    let (kp, pp) = (dir.join("k.key"), dir.join("k.pub"));
    let old = (std::fs::read(&kp).unwrap(), std::fs::read(&pp).unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(["keygen", "--out", s(&prefix), "--force"])
        .stdout(std::process::Stdio::from(
            std::fs::File::create("/dev/full").unwrap(),
        ))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for n in [
        "writing standard output",
        "no key was written",
        "k.pub are unchanged",
    ] {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
    assert_eq!(
        (std::fs::read(&kp).unwrap(), std::fs::read(&pp).unwrap()),
        old,
        "the old keys were replaced"
    );
    assert_eq!(
        dir_listing(&dir),
        ["k.key", "k.pub"],
        "a staged file was left"
    );
    // With a standard output that takes the report, --force replaces both, the key 0600.
    ok(&["keygen", "--out", s(&prefix), "--force"]);
    assert_ne!(std::fs::read(&kp).unwrap(), old.0);
    assert_ne!(std::fs::read(&pp).unwrap(), old.1);
    let mode = std::fs::metadata(&kp).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(dir_listing(&dir), ["k.key", "k.pub"]);
}

/// Session 38: a bundle with `not_before == expires` verified but could never be
/// activated. `verify` refuses the empty window by name, and `sign` refuses to vouch for it
/// (in place or to --out) writing nothing; a window that has only passed is "expired".
#[test]
fn empty_validity_window_is_refused_by_verify_and_sign() {
    let dir = tmp().join("validity");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair("validity");
    let bundle = dir.join("empty.amend");
    crafted_bundle(&bundle, &key, "{prompt}", |m| {
        m.not_before = 1_700_000_000;
        m.expires = 1_700_000_000;
    });
    let window = ["empty validity window", "not_before must be before expires"];
    refused(&["verify", s(&bundle), "--pubkey", s(&public)], &window);
    let before = std::fs::read(&bundle).unwrap();
    let out = dir.join("resigned.amend");
    refused(
        &["sign", s(&bundle), "--key", s(&key), "--out", s(&out)],
        &window,
    );
    assert!(!out.exists());
    refused(&["sign", s(&bundle), "--key", s(&key)], &window);
    assert_eq!(std::fs::read(&bundle).unwrap(), before);
    assert_eq!(dir_listing(&dir), ["empty.amend"]);
    let passed = dir.join("passed.amend");
    crafted_bundle(&passed, &key, "{prompt}", |m| {
        m.not_before = 0;
        m.expires = 1;
    });
    let o = amend(&["verify", s(&passed), "--pubkey", s(&public)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bundle expired at 1"),
        "{err}"
    );
    assert!(!err.contains("empty validity window"), "{err}");
}

/// Session 38: a signed memory template repeating `{prompt}` (about 2,000 times fit the
/// 16 KiB string cap) rendered a huge prompt, refused only after tokenization. `verify`
/// refuses a placeholder used more than 4 times, naming the payload and the placeholder.
#[test]
fn memory_template_repeating_a_placeholder_is_refused() {
    let dir = tmp().join("template");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair("template");
    let bundle = dir.join("t.amend");
    crafted_bundle(&bundle, &key, &"{prompt}".repeat(2000), |_| {});
    refused(
        &["verify", s(&bundle), "--pubkey", s(&public)],
        &["payload 1", "template uses {prompt} more than 4 times"],
    );
    crafted_bundle(
        &bundle,
        &key,
        "{edit} {edit} {edit} {edit} {edit}\n{prompt}",
        |_| {},
    );
    refused(
        &["verify", s(&bundle), "--pubkey", s(&public)],
        &["payload 1", "template uses {edit} more than 4 times"],
    );
    crafted_bundle(
        &bundle,
        &key,
        "Fact: {edit}\nFact: {edit}\n{prompt}",
        |_| {},
    );
    ok(&["verify", s(&bundle), "--pubkey", s(&public)]);
}

/// Session 38: where the model's own directory cannot take the fingerprint cache (here a
/// directory in the way; a read-only partition below), the entry goes to
/// `$AMEND_CACHE/fingerprints/` (0600) and the next open uses it there instead of hashing the
/// whole model again. Before, every open of a model on a read-only partition hashed it.
#[test]
fn fingerprint_cache_falls_back_to_amend_cache() {
    let dir = tmp().join("fp-fallback");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny_model(dir.join("m.gguf"));
    std::fs::create_dir(dir.join("m.gguf.amendfp")).unwrap();
    let cache = dir.join("cache");
    let env = [("AMEND_CACHE", s(&cache))];
    let info = ["info", "--model", s(&model)];
    assert!(amend_with(&info, &env).status.success());
    let fp = cache.join("fingerprints");
    let entries = dir_listing(&fp);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = fp.join(&entries[0]);
    let first = std::fs::read(&entry).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&entry).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // The model's ctime must be older than the racy window before an entry is trusted.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert!(amend_with(&info, &env).status.success());
    let second = std::fs::read(&entry).unwrap();
    assert!(amend_with(&info, &env).status.success());
    // Hashed again once (the first entry was racy), then used as it is.
    assert_eq!(std::fs::read(&entry).unwrap(), second);
    assert_ne!(first, second);
    assert!(dir.join("m.gguf.amendfp").is_dir());
    assert_eq!(dir_listing(&fp), entries);
}

/// Session 38: a model on a read-only partition opens and runs on llama.cpp (its caches
/// going to `$AMEND_CACHE`, or nowhere when that is read-only or full too), and outputs to a
/// full partition fail with the path and ENOSPC, keep the file they would replace and leave no
/// temporary file. Needs `mount` (root); skipped otherwise.
#[test]
fn read_only_and_full_partitions() {
    let dir = tmp().join("partitions");
    std::fs::create_dir_all(&dir).unwrap();
    let Some(ro) = Tmpfs::mount(dir.join("ro"), "1m") else {
        return;
    };
    let Some(full) = Tmpfs::mount(dir.join("full"), "64k") else {
        return;
    };
    let model = tiny_model(ro.0.join("m.gguf"));
    let cache = dir.join("cache");
    let _ = std::fs::remove_dir_all(&cache);
    ro.remount_ro();
    let m = s(&model);
    let info = ["info", "--model", m];
    let run = [
        "run",
        "--model",
        m,
        "--prompt",
        "a b",
        "--max-tokens",
        "2",
        "--threads",
        "1",
    ];
    for c in [s(&cache), s(&ro.0), s(&full.0)] {
        if c == s(&full.0) {
            full.fill();
        }
        for args in [&info[..], &run[..]] {
            let out = amend_with(args, &[("AMEND_CACHE", c)]);
            assert!(out.status.success(), "{args:?} with AMEND_CACHE={c}");
        }
    }
    // ONNX Runtime: the graph cache cannot be written beside the model; the run goes on.
    let lib = amend_runtime::onnxruntime::default_library(&amend_runtime::onnxruntime::Ep::Cpu);
    let ort = ort_libraries();
    if ort {
        let args = [
            &run[..],
            &["--backend", "ort", "--ep", "cpu", "--ort-lib", s(&lib)],
        ]
        .concat();
        // Also with the cache directory (its graph-cache.key) read-only or full: before, a key
        // that ENOSPC cut short stayed as an empty file and turned the graph cache off for good.
        for c in [&cache, &ro.0, &full.0] {
            let out = amend_with(&args, &[("AMEND_CACHE", s(c))]);
            assert!(out.status.success(), "ort with AMEND_CACHE={}", c.display());
        }
        assert!(!full.0.join("graph-cache.key").exists());
        // The graph went to the cache directory instead (named by the model's fingerprint),
        // and the next open reads it from there rather than building it again.
        let graphs = dir_listing(&cache.join("graphs"));
        assert_eq!(graphs.len(), 2, "{graphs:?}");
        assert!(graphs[0].ends_with("-m.gguf.cpu.onnx"), "{graphs:?}");
        let out = amend_with(&args, &[("AMEND_CACHE", s(&cache)), ("RUST_LOG", "info")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(!err.contains("graph not cached"), "{err}");
        assert!(!err.contains("not using"), "{err}");
    }
    assert_eq!(dir_listing(&ro.0), ["m.gguf"]);
    assert_eq!(dir_listing(&cache.join("fingerprints")).len(), 1);
    if let Ok(d) = std::fs::read_dir(full.0.join("fingerprints")) {
        assert_eq!(d.count(), 0, "a temporary file left in the full cache");
    }

    // Outputs on the full partition.
    let _ = std::fs::remove_dir(full.0.join("fingerprints"));
    std::fs::remove_file(full.0.join("fill")).unwrap();
    let (key, _) = keypair("partitions");
    let bundle = dir.join("b.amend");
    crafted_bundle(&bundle, &key, "{prompt}", |_| {});
    let signed = full.0.join("s.amend");
    std::fs::write(&signed, b"old").unwrap();
    full.fill();
    let sign = ["sign", s(&bundle), "--key", s(&key), "--out", s(&signed)];
    refused(&sign, &[s(&signed), "No space left on device"]);
    assert_eq!(std::fs::read(&signed).unwrap(), b"old");
    let prefix = full.0.join("k");
    refused(
        &["keygen", "--out", s(&prefix)],
        &["k.key", "No space left on device"],
    );
    if ort {
        // A graph is checked against the free space before it is written: the partition is
        // not filled up to ENOSPC first.
        let onnx = full.0.join("m.onnx");
        refused(
            &[
                "export-onnx",
                "--model",
                m,
                "--out",
                s(&onnx),
                "--ort-lib",
                s(&lib),
            ],
            &[s(&full.0), "bytes needed", "nothing was written"],
        );
    }
    assert_eq!(dir_listing(&full.0), ["fill", "s.amend"]);
}

/// Session 38: a temporary file an `amend` killed mid-write left beside its output
/// (`OUT.tmpPID.N` of `write_atomic`, PID gone, older than a minute) is removed by the next
/// write of that output (here `sign --out`);
/// one of a live process stays. Before, they stayed forever (on a full partition, each one
/// holding its space).
#[test]
fn a_killed_writers_temp_file_is_removed_by_the_next_write() {
    let dir = tmp().join("stale-temp");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let live = std::process::id();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    let plant = |name: String| {
        let f = std::fs::File::create(dir.join(&name)).unwrap();
        f.set_modified(old).unwrap();
        name
    };
    let stale = plant(format!("s.amend.tmp{dead}.0"));
    let kept = plant(format!("s.amend.tmp{live}.0"));
    let (key, _) = keypair("stale-temp");
    let bundle = tmp().join("stale-temp.amend");
    crafted_bundle(&bundle, &key, "{prompt}", |_| {});
    let out = dir.join("s.amend");
    ok(&["sign", s(&bundle), "--key", s(&key), "--out", s(&out)]);
    let left = dir_listing(&dir);
    assert!(!left.contains(&stale), "{left:?}");
    assert_eq!(left, ["s.amend".to_string(), kept]);
}

/// `amend eval`'s reports on a full partition: the run fails naming the file, and a report
/// from an earlier run is kept whole. Before, the file was truncated and written in place: the
/// page the truncation freed took the first 4 KiB of the new report and the rest failed, leaving
/// a cut report and no old one.
#[test]
fn eval_reports_on_a_full_partition_keep_the_old_ones() {
    let (dir, model, data) = tiny_eval_scratch("eval-full-partition");
    // Enough records for a report of more than one page.
    std::fs::write(
        &data,
        "{\"prompt\": \"a b\", \"target\": \"c\"}\n".repeat(40),
    )
    .unwrap();
    let out = dir.join("r.jsonl");
    ok(&tiny_eval_args(&model, &data, &["--out", s(&out)]));
    let len = std::fs::metadata(&out).unwrap().len();
    assert!(len > 8192, "a report of {len} bytes");
    let Some(full) = Tmpfs::mount(dir.join("full"), "64k") else {
        return;
    };
    let report = full.0.join("r.jsonl");
    std::fs::write(&report, b"{\"old\": 1}\n").unwrap();
    full.fill();
    refused(
        &tiny_eval_args(&model, &data, &["--out", s(&report)]),
        &["--out", "r.jsonl", "No space left on device"],
    );
    let kept = std::fs::read(&report).unwrap();
    assert!(
        kept == b"{\"old\": 1}\n",
        "the old report was replaced ({} bytes now)",
        kept.len()
    );
    assert_eq!(dir_listing(&full.0), ["fill", "r.jsonl"]);
}

/// `amend locate` args of the test fact on `model` into `out_dir` (name `t`, one sample).
fn locate_args(
    model: &Path,
    prompt: &str,
    subject: &str,
    target: &str,
    out_dir: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut v: Vec<String> = [
        "locate",
        "--model",
        s(model),
        "--prompt",
        prompt,
        "--subject",
        subject,
        "--target",
        target,
        "--threads",
        "1",
        "--out-dir",
        s(out_dir),
        "--name",
        "t",
    ]
    .map(String::from)
    .to_vec();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

/// A tiny model in `dir` (created) and a full 64 KiB tmpfs on `dir/full`; `None` where this
/// process may not mount.
fn tiny_model_and_full_partition(dir: &Path) -> Option<(PathBuf, Tmpfs)> {
    std::fs::create_dir_all(dir).unwrap();
    let model = tiny_model(dir.join("m.gguf"));
    let full = Tmpfs::mount(dir.join("full"), "64k")?;
    full.fill();
    Some((model, full))
}

/// Session 38: `amend locate` on a full partition is refused before the model loads (before,
/// it failed after the trace, naming its PNG temporary), leaves no --out-dir it created, and
/// its two outputs are all or nothing: where the json fits but the heatmap does not, neither
/// stays (before, the final PNG copy needed its space a second time while the temporary PNG
/// still held it, and an empty --out-dir was left).
#[test]
fn locate_on_a_full_partition_writes_all_or_nothing() {
    let dir = tmp().join("locate-full");
    let Some((tiny, full)) = tiny_model_and_full_partition(&dir) else {
        return;
    };
    for out_dir in [full.0.clone(), full.0.join("new/sub")] {
        let args = locate_args(&tiny, "a b c", "b", "c", &out_dir, &["--samples", "1"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused_within(
            &args,
            60,
            &[
                "--out-dir",
                s(&out_dir),
                "No space left on device",
                "nothing was traced",
            ],
        );
    }
    assert_eq!(dir_listing(&full.0), ["fill"]);

    let Some(real) = real_model() else {
        return;
    };
    let args_in = |out_dir: &Path| -> Vec<String> {
        locate_args(
            &real,
            PROMPT,
            "France",
            " Paris",
            out_dir,
            &["--samples", "1"],
        )
    };
    // The outputs' sizes, from a roomy directory.
    let roomy = dir.join("roomy");
    let _ = std::fs::remove_dir_all(&roomy);
    let args = args_in(&roomy);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(amend_within(&args, 300).status.success());
    assert_eq!(dir_listing(&roomy), ["t.json", "t.png"]);
    let pages = |f: &str| {
        std::fs::metadata(roomy.join(f))
            .unwrap()
            .len()
            .div_ceil(4096)
    };
    // With room for the json and all but one page of the heatmap, the trace into `out_dir`
    // fails naming the heatmap: its standard error.
    let heatmap_refused = |out_dir: &Path| {
        full.fill_leaving(pages("t.json") + pages("t.png") - 1);
        let args = args_in(out_dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = amend_within(&args, 300);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success());
        assert!(
            err.contains("t.png") && err.contains("No space left on device"),
            "{err}"
        );
        std::fs::remove_file(full.0.join("fill")).unwrap();
        err
    };
    let out_dir = full.0.join("x");
    let err = heatmap_refused(&out_dir);
    assert!(!err.contains(".tmp"), "{err}");
    assert_eq!(dir_listing(&full.0), Vec::<String>::new());
    // The same failure over an earlier trace's outputs keeps both of them (session 41: the
    // new JSON was put in place, then removed when the heatmap failed, so the old one was lost).
    let earlier = full.0.join("y");
    std::fs::create_dir(&earlier).unwrap();
    std::fs::write(earlier.join("t.json"), b"earlier json").unwrap();
    std::fs::write(earlier.join("t.png"), b"earlier png").unwrap();
    let err = heatmap_refused(&earlier);
    assert_eq!(dir_listing(&earlier), ["t.json", "t.png"], "{err}");
    assert_eq!(
        std::fs::read(earlier.join("t.json")).unwrap(),
        b"earlier json"
    );
    assert_eq!(
        std::fs::read(earlier.join("t.png")).unwrap(),
        b"earlier png"
    );
    let args = args_in(&out_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(amend_within(&args, 300).status.success());
    assert_eq!(dir_listing(&out_dir), ["t.json", "t.png"]);
}

/// Session 38: `amend locate` says up front how many forward runs the trace takes (positions x
/// layers x sites x samples, plus the clean run and the corrupted baseline: the tracer's own
/// count), then, once the first measurement is timed, about how long the rest takes. Before,
/// only the progress bar's ETA said so (a 100-token prompt is ~45 min).
#[test]
fn locate_says_its_forward_runs_and_time_up_front() {
    let dir = tmp().join("locate-plan");
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = tiny_model(dir.join("tiny.gguf"));
    let out_dir = dir.join("out");
    // "a b c" on the tiny model: 3 positions from the subject on, 2 layers; 2 samples each.
    for (extra, line) in [
        (&[][..], "locate: 39 forward runs of 3 tokens each (3 positions x 2 layers x 3 sites x 2 samples"),
        (&["--residual-only"][..], "locate: 15 forward runs of 3 tokens each (3 positions x 2 layers x 1 sites x 2 samples"),
    ] {
        let args = locate_args(&tiny, "a b c", "b", "c", &out_dir, &[&["--samples", "2"][..], extra].concat());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The tiny llama graph has no embeddings hook: the trace itself fails, after the line.
        let out = amend_within(&args, 60);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(line), "{err}");
    }
    assert!(
        !out_dir.exists(),
        "a failed locate left the --out-dir it created"
    );

    let Some(real) = real_model() else {
        return;
    };
    let args = locate_args(
        &real,
        PROMPT,
        "France",
        " Paris",
        &out_dir,
        &["--samples", "1", "--residual-only"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = amend_within(&args, 300);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // " France" and " is": 2 positions x 18 layers, 1 + 1 x (1 + 36) runs.
    let count = err
        .find("locate: 38 forward runs of 2 tokens each")
        .expect("the count line");
    let estimate = err
        .find("locate: the first measurement took")
        .expect("the estimate line");
    assert!(count < estimate, "{err}");
    assert!(err.contains("for the other 36"), "{err}");
}

/// Session 38: `amend compile` to a full partition is refused before the model loads, naming
/// --out; nothing is written. Before, it trained the first edit and failed at its first
/// checkpoint write.
#[test]
fn compile_on_a_full_partition_is_refused_before_training() {
    let (dir, key, _, edits) = one_edit("compile-full", "compile-full");
    let Some((model, full)) = tiny_model_and_full_partition(&dir) else {
        return;
    };
    let out = full.0.join("b.amend");
    let extra = ["--no-drift-check", "--allow-partial", "--threads", "1"];
    for method in ["grace", "rome"] {
        refused_within(
            &compile_args(&model, method, &edits, &out, &key, &extra),
            60,
            &[
                "--out",
                s(&out),
                "No space left on device",
                "nothing was trained",
            ],
        );
    }
    assert_eq!(dir_listing(&full.0), ["fill"]);
}

/// Session 38: a graph `export-onnx` cannot write says it is writing it. Before, the error
/// read "cannot read OUT" (the runtime's read error).
#[test]
fn export_onnx_that_cannot_write_says_so() {
    if !ort_libraries() {
        return;
    }
    let Some((model, full)) = tiny_model_and_full_partition(&tmp().join("export-full")) else {
        return;
    };
    let onnx = full.0.join("m.onnx");
    let lib = amend_runtime::onnxruntime::default_library(&amend_runtime::onnxruntime::Ep::Cpu);
    let args = [
        "export-onnx",
        "--model",
        s(&model),
        "--out",
        s(&onnx),
        "--ort-lib",
        s(&lib),
    ];
    let out = amend(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("cannot write {}", onnx.display())),
        "{err}"
    );
    assert!(!err.contains("cannot read"), "{err}");
    assert_eq!(dir_listing(&full.0), ["fill"]);
}
