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
    let path = std::env::var_os("AMEND_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/amend/gemma3-270m-q4_k_m.gguf")
        });
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
    let out = Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(args)
        .env_remove("AMEND_MODEL")
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

fn generate(model: &Path, prompt: &str, bundle: Option<(&Path, &Path)>) -> String {
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
    ok(&args)
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
    let dir = tmp().join("one-edit");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, public) = keypair("e2e");
    let edits = dir.join("edit.jsonl");
    std::fs::write(
        &edits,
        format!("{{\"prompt\": \"{PROMPT}\", \"target\": \"Berlin\"}}\n"),
    )
    .unwrap();

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
    let out = amend(&[
        "run",
        "--model",
        s(&model),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "4",
        "--threads",
        "1",
        "--bundle",
        s(&tampered),
        "--pubkey",
        s(&public),
    ]);
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
    let (key, _) = keypair("e2e-bad");
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
        format!("{{\"prompt\": \"{PROMPT}\", \"target\": \"Berlin\"}}\n"),
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

    let Some(model) = real_model() else {
        return;
    };
    compile(&model, "grace", &empty_target, &[], &["record 1", "target"]);
    compile(&model, "rome", &good, &["--layer", "99"], &["99", "18"]);
}
