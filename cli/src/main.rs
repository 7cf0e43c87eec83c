//! `amend`: the command-line tool. Each subcommand lives in its own module, except that the
//! key and bundle-file commands (keygen, sign, verify, inspect) share `keys.rs`.
use clap::{Parser, Subcommand};

/// The one progress-bar style of the CLI: `{unit}` names what is counted ("records", "runs").
pub fn progress_bar(len: u64, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let template = format!(
        "{{spinner}} {{msg:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{elapsed}} (eta {{eta}})"
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Every `--threads`: a count the runtime takes (1..=MAX_THREADS), checked when the arguments
/// are read, so a compile never trains for hours to fail at its drift check.
pub fn parse_threads(s: &str) -> Result<usize, String> {
    let max = amend_runtime::MAX_THREADS;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a thread count in 1..={max}")),
    }
}

/// A count of at least 1 (`--epochs`, `--tokens`, `--limit`, ...): 0 would do nothing, or fail
/// only after the work.
pub fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number >= 1")),
    }
}

/// An output file a long command writes at its end (`compile --out`, `eval --summary`): it must
/// name a file in a directory that takes new files, checked before the work, so that hours of
/// training or evaluation are not the first to find out. A file written by renaming a new one
/// over it (`replaced`: bundles, factors, heads) must be a regular file if it exists: the rename
/// would replace a device node such as /dev/null. Eval's reports are written in place, so
/// /dev/null or a pipe (`--summary >(jq .)`) serve there.
pub fn check_output_path(flag: &str, out: &std::path::Path, replaced: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Ok(md) = std::fs::metadata(out) {
        if md.is_dir() {
            anyhow::bail!(
                "{flag} {}: that is a directory; give a file name",
                out.display()
            );
        }
        if replaced && !md.is_file() {
            anyhow::bail!(
                "{flag} {}: that is a {}, not a regular file",
                out.display(),
                amend_edits::fsutil::kind_name(&md.file_type())
            );
        }
        if !md.is_file() {
            // A device or pipe written in place (/dev/null, `>(jq .)`): its directory (/dev,
            // /dev/fd) need not take new files, so the probe below would refuse it wrongly.
            return Ok(());
        }
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "{flag} {}: the directory {} does not exist",
            out.display(),
            dir.display()
        );
    }
    let probe = dir.join(format!(".amend-out-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "{flag} {}: cannot create files in {}",
                out.display(),
                dir.display()
            )
        })
}

/// Which file a path names, so that two spellings of one file (a link, `./x`, a hard link)
/// compare equal: its device and inode when it exists, else its directory's canonical path
/// and its name.
#[derive(PartialEq)]
enum FileIdentity {
    Inode(u64, u64),
    Path(std::path::PathBuf),
}

fn file_identity(p: &std::path::Path) -> FileIdentity {
    if let Some((dev, ino)) = amend_edits::fsutil::file_id(p) {
        return FileIdentity::Inode(dev, ino);
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    FileIdentity::Path(dir.join(p.file_name().unwrap_or_default()))
}

/// Outputs that must not be any of the command's inputs, nor one another: writing one would
/// replace a model, a signing key, the edit requests or another output before (or instead of)
/// the result. Checked before any work; `outputs` and `inputs` are (flag, path) pairs, and an
/// input that does not exist is skipped (its own check reports it).
pub fn check_outputs_apart(
    outputs: &[(&str, &std::path::Path)],
    inputs: &[(&str, &std::path::Path)],
) -> anyhow::Result<()> {
    for (i, (flag, out)) in outputs.iter().enumerate() {
        let id = file_identity(out);
        for (in_flag, input) in inputs {
            if std::fs::metadata(input).is_ok() && file_identity(input) == id {
                anyhow::bail!(
                    "{flag} {}: that is the {in_flag} file ({}); writing it would replace it, \
                     give another name",
                    out.display(),
                    input.display()
                );
            }
        }
        for (other_flag, other) in &outputs[..i] {
            if file_identity(other) == id {
                anyhow::bail!(
                    "{flag} {} and {other_flag} {} name the same file; give each its own",
                    out.display(),
                    other.display()
                );
            }
        }
    }
    Ok(())
}

/// Standard output that cannot be written (a closed pipe, a full disk) ends the command with an
/// error instead of std's panic: these shadow std's `println!` and `print!` in every module.
macro_rules! println {
    () => {
        $crate::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

macro_rules! print {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

/// What `println!` and `print!` call.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(e);
    }
}

/// Ends the process after a failed write to standard output. A reader that went away (`| head`)
/// ends it quietly with the status a shell gives a process killed by SIGPIPE, as other tools
/// do; anything else (a full disk) is an error.
pub fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("amend: error: writing standard output: {e}");
    std::process::exit(1);
}

mod backends;
mod bench;
mod compile;
mod data;
mod eval;
mod info;
mod keys;
mod locate;
mod run;
mod scope_model;

#[derive(Parser)]
#[command(
    name = "amend",
    version,
    about = "An edge runtime for edited language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a model, optionally with patch bundles applied.
    Run(run::Args),
    /// Compare the ONNX Runtime backend with llama.cpp: top-1 agreement along llama.cpp's
    /// greedy continuations, logit error, speed and memory, in one run.
    Parity(backends::ParityArgs),
    /// Build a model's ONNX graph (exact GGUF weights) and write it as a .onnx file.
    ExportOnnx(backends::ExportArgs),
    /// Print a model's dimensions and the hook sites found in its graph.
    Info(info::Args),
    /// Benchmark prefill/decode against plain llama.cpp.
    Bench(bench::Args),
    /// Write a new ed25519 signing key pair (PREFIX.key, PREFIX.pub).
    Keygen(keys::KeygenArgs),
    /// Sign a bundle in place.
    Sign(keys::SignArgs),
    /// Verify a bundle's signature and hashes (exit 0 only when valid).
    Verify(keys::VerifyArgs),
    /// Describe a bundle (text or --json).
    Inspect(keys::InspectArgs),
    /// Compile edit requests into a bundle.
    ///
    /// Refuses to write a bundle with edits that do not reach their target (--allow-partial)
    /// or that moves the model on unrelated probe prompts (--min-probe-locality,
    /// --allow-drift, --no-drift-check). A long compile keeps its finished edits in OUT.ckpt
    /// and resumes from it when run again with the same inputs (--restart ignores it):
    /// grace, tpatcher, rome and lora per edit, memit per batch of memit.batch edits; serac
    /// (no training) keeps none.
    Compile(compile::Args),
    /// Evaluate bundles with the KnowEdit metrics on the deployed model.
    Eval(eval::Args),
    /// Causal tracing: where does the model store a fact?
    Locate(locate::Args),
    /// Edit data tools (synthetic edits for scale tests).
    Data(data::Args),
    /// The scope model memories route with: convert a checkpoint to GGUF.
    ScopeModel(scope_model::Args),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Parity(a) => backends::parity(a),
        Command::ExportOnnx(a) => backends::export_onnx(a),
        Command::Info(a) => info::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Keygen(a) => keys::keygen(a),
        Command::Sign(a) => keys::sign(a),
        Command::Verify(a) => keys::verify(a),
        Command::Inspect(a) => keys::inspect(a),
        Command::Compile(a) => compile::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Locate(a) => locate::run(a),
        Command::Data(a) => data::run(a),
        Command::ScopeModel(a) => scope_model::run(a),
    };
    if let Err(e) = result {
        eprintln!("amend: error: {}", error_chain(&e));
        std::process::exit(1);
    }
    // Text still buffered (a line not ended) is written now; a failure is the command's.
    if let Err(e) = std::io::Write::flush(&mut std::io::stdout()) {
        stdout_failed(e);
    }
}

/// The error and its causes joined with ": " (as `{:#}`), leaving out a cause the message
/// before it already ends with: error types that print their source and also return it
/// (`RuntimeError::Io`) would otherwise say it twice.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if !out.is_empty() && out.ends_with(&m) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&m);
    }
    out
}

#[cfg(test)]
mod error_tests {
    use super::error_chain;
    use anyhow::Context;

    #[test]
    fn a_cause_the_message_already_ends_with_is_said_once() {
        let io = amend_runtime::RuntimeError::Io {
            path: "d1".into(),
            source: std::io::Error::from_raw_os_error(21),
        };
        let e = Err::<(), _>(io).context("building the graph").unwrap_err();
        let text = error_chain(&e);
        assert_eq!(text.matches("os error 21").count(), 1, "{text}");
        assert!(
            text.starts_with("building the graph: cannot read d1: "),
            "{text}"
        );
        // Causes that add something are all kept, in order.
        let e = Err::<(), _>(std::io::Error::other("disk full"))
            .context("writing b.amend")
            .context("--out b.amend")
            .unwrap_err();
        assert_eq!(error_chain(&e), "--out b.amend: writing b.amend: disk full");
    }
}
