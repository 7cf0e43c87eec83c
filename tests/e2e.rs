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
                PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/amend/gemma3-270m-q4_k_m.gguf")
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
    let tiny = dir.join("tiny.gguf");
    amend_runtime::testutil::write_tiny_model(&tiny, amend_runtime::Architecture::Llama, 3)
        .unwrap();
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
        let mut extra = vec!["--explain", "--no-onnx-cache"];
        extra.extend_from_slice(backend);
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

/// A context smaller than the default repetition window (64 tokens) runs on both backends: the
/// default window shrinks to the context (the session's, which the model's trained context may
/// cap), with the penalty on or off. An explicit window larger than the context is refused,
/// naming both, when the penalty that reads it is on. Negative sampling values reach the
/// library's checks (clap would take "-1" for a flag): a negative temperature is greedy, a
/// negative top-k or window is refused by name. A generation the context cuts short says so.
#[test]
fn a_context_below_the_default_repeat_window_runs() {
    let model = tmp().join("small-ctx.gguf");
    amend_runtime::testutil::write_tiny_model(&model, amend_runtime::Architecture::Llama, 3)
        .unwrap();
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
            err.contains("the context of 5 tokens is full (raise --ctx)"),
            "{err}"
        );
    }
}
