//! `$AMEND_CACHE` is honoured everywhere: scripts/fetch-*.sh install the models, ONNX Runtime
//! and the corpus into `${AMEND_CACHE:-$HOME/.cache/amend}`, and a script, Makefile line or Rust
//! helper that names `~/.cache/amend` itself looks for them where they are not (`AMEND_CACHE=/data
//! make demo` fetched the model to /data and then did not find it). Scans the repository's text;
//! no build, no model. A cli test (cli/Cargo.toml) only to run under `cargo test`.

use std::path::{Path, PathBuf};

const NEEDLE: &str = ".cache/amend";

/// What may come right before `.cache/amend` in the shell and the Makefile: the cache directory's
/// one default, `$AMEND_CACHE` unless unset or empty.
const ALLOWED_PREFIXES: &[&str] = &[
    "${AMEND_CACHE:-$HOME/",
    "${AMEND_CACHE:-${HOME}/",
    "$(or $(strip $(AMEND_CACHE)),$(HOME)/",
    "$(or $(AMEND_CACHE),$(HOME)/",
];

/// The Rust file that decides the cache directory (the one place), and this scanner.
const RUST_EXEMPT: &[&str] = &["edits/src/fsutil.rs", "tests/scripts.rs"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `file:line: text` for each line of `text` that names `.cache/amend` other than as the
/// default of `$AMEND_CACHE`; comment lines (starting with `comment`) are prose, not paths used.
fn bad_lines(name: &str, text: &str, comment: &str, allowed: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with(comment) {
            continue;
        }
        let ok = line
            .match_indices(NEEDLE)
            .all(|(at, _)| allowed.iter().any(|p| line[..at].ends_with(p)));
        if !ok {
            bad.push(format!("{name}:{}: {}", i + 1, line.trim()));
        }
    }
    bad
}

fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        // Build output and VCS data, not the project's text.
        if name == "target" || name == ".git" {
            continue;
        }
        if p.is_dir() {
            files_under(&p, keep, out);
        } else if keep(&p) {
            out.push(p);
        }
    }
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// The Makefile, scripts/, every binding's test.sh and .ci/.
fn shell_files() -> Vec<PathBuf> {
    let r = root();
    let mut files = vec![r.join("Makefile")];
    files_under(&r.join("scripts"), &|_| true, &mut files);
    files_under(&r.join(".ci"), &|_| true, &mut files);
    for b in std::fs::read_dir(r.join("bindings")).unwrap().flatten() {
        let t = b.path().join("test.sh");
        if t.is_file() {
            files.push(t);
        }
    }
    files
}

#[test]
fn scripts_and_makefile_take_the_cache_from_amend_cache() {
    let files = shell_files();
    assert!(files.len() > 5, "found only {files:?}");
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        bad.extend(bad_lines(&rel(f), &text, "#", ALLOWED_PREFIXES));
    }
    assert!(
        bad.is_empty(),
        "these name ~/.cache/amend instead of ${{AMEND_CACHE:-$HOME/.cache/amend}} \
         (Makefile: $(or $(strip $(AMEND_CACHE)),$(HOME)/.cache/amend)):\n{}",
        bad.join("\n")
    );
}

#[test]
fn rust_code_takes_the_cache_from_cache_dir() {
    let r = root();
    let mut files = Vec::new();
    files_under(
        &r,
        &|p| p.extension().is_some_and(|e| e == "rs"),
        &mut files,
    );
    assert!(files.len() > 50, "found only {} Rust files", files.len());
    let mut bad = Vec::new();
    for f in &files {
        let name = rel(f);
        if RUST_EXEMPT.contains(&name.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        bad.extend(bad_lines(&name, &text, "//", &[]));
    }
    assert!(
        bad.is_empty(),
        "these name ~/.cache/amend instead of amend_edits::fsutil::cache_dir():\n{}",
        bad.join("\n")
    );
}

/// The scanner itself, on the lines this test was written against.
#[test]
fn the_scanner_tells_the_default_from_a_fixed_path() {
    let old = "export AMEND_MODEL ?= $(HOME)/.cache/amend/gemma3-270m-q4_k_m.gguf\n\
               MODEL=\"${AMEND_MODEL:-$HOME/.cache/amend/gemma3-270m-q4_k_m.gguf}\"\n\
               # Fetches into ~/.cache/amend\n\
               CACHE=\"${AMEND_CACHE:-$HOME/.cache/amend}\"\n\
               AMEND_CACHE_DIR := $(or $(strip $(AMEND_CACHE)),$(HOME)/.cache/amend)\n\
               X=\"${AMEND_CACHE:-$HOME/.cache/amend}\" Y=\"$HOME/.cache/amend\"\n";
    let bad = bad_lines("f", old, "#", ALLOWED_PREFIXES);
    let lines: Vec<&str> = bad.iter().map(|b| &b[..4]).collect();
    assert_eq!(lines, ["f:1:", "f:2:", "f:6:"], "{bad:?}");
}
