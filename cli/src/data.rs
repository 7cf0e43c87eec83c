//! `amend data synth`: synthetic distractor edits for scale tests.

use std::path::PathBuf;

use anyhow::{bail, Context};

use amend_compiler::dataset::{synthetic, to_knowedit};

/// Ten times the 10,000-edit benchmarks: the whole set is built in memory (a million records
/// took 3.8 GB), and a bigger file is almost certainly a typo.
const MAX_RECORDS: usize = 100_000;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Write N synthetic edits (fictional subjects, both prompt styles, one rephrase and one
    /// same-relation locality probe each) as KnowEdit JSON.
    Synth(SynthArgs),
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Number of records.
    #[arg(long)]
    n: usize,
    /// Generator seed (the same n and seed always give the same file).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output file: JSON lines when its name ends in .jsonl, else a KnowEdit JSON array.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Synth(a) => synth(a),
    }
}

fn synth(args: SynthArgs) -> anyhow::Result<()> {
    if args.n == 0 || args.n > MAX_RECORDS {
        bail!("--n must be between 1 and {MAX_RECORDS}, got {}", args.n);
    }
    // First: it refuses what is there but no regular file, with or without --force.
    crate::check_output_path("--out", &args.out, true)?;
    if !args.force && std::fs::metadata(&args.out).is_ok() {
        bail!(
            "--out {}: exists; pass --force to replace it",
            args.out.display()
        );
    }
    let records = synthetic(args.n, args.seed);
    let mut json = to_knowedit(&records);
    // The style field the repository's data sets carry (eval reports styles apart).
    for r in json.as_array_mut().into_iter().flatten() {
        let question = r["prompt"].as_str().is_some_and(|p| p.ends_with('?'));
        r["style"] = (if question { "question" } else { "statement" }).into();
    }
    // `compile --format auto` reads a .jsonl name as JSON lines.
    let jsonl = args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let text = if jsonl {
        let mut t = String::new();
        for r in json.as_array().into_iter().flatten() {
            t += &(serde_json::to_string(r)? + "\n");
        }
        t
    } else {
        serde_json::to_string_pretty(&json)? + "\n"
    };
    amend_edits::fsutil::write_atomic(&args.out, text.as_bytes(), None)
        .with_context(|| format!("--out {}", args.out.display()))?;
    eprintln!(
        "wrote {} synthetic edits (seed {}) to {}",
        records.len(),
        args.seed,
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_loadable_file_and_rejects_bad_counts() {
        let dir = std::env::temp_dir().join(format!("amend-cli-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("syn.json");
        let args = |n| SynthArgs {
            n,
            seed: 4,
            out: out.clone(),
            force: true,
        };
        synth(args(25)).unwrap();
        let loaded = amend_compiler::dataset::load(&out, Default::default()).unwrap();
        assert_eq!(loaded, synthetic(25, 4));
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        for r in raw.as_array().unwrap() {
            let q = r["prompt"].as_str().unwrap().ends_with('?');
            assert_eq!(r["style"], if q { "question" } else { "statement" });
        }
        assert!(synth(args(0)).is_err());
        assert!(synth(args(MAX_RECORDS + 1)).is_err());
        // A directory is not overwritten, and is named as one with or without --force.
        for force in [true, false] {
            let err = synth(SynthArgs {
                n: 3,
                seed: 1,
                out: dir.clone(),
                force,
            })
            .unwrap_err();
            assert!(err.to_string().contains("that is a directory"), "{err}");
        }
        // An existing file is kept without --force; a .jsonl name gets JSON lines.
        let keep = |out: &std::path::Path| SynthArgs {
            n: 3,
            seed: 1,
            out: out.to_path_buf(),
            force: false,
        };
        let err = synth(keep(&out)).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(
            amend_compiler::dataset::load(&out, Default::default())
                .unwrap()
                .len(),
            25
        );
        let lines = dir.join("syn.jsonl");
        synth(keep(&lines)).unwrap();
        let text = std::fs::read_to_string(&lines).unwrap();
        assert_eq!(text.lines().count(), 3);
        let loaded = amend_compiler::dataset::load(&lines, Default::default()).unwrap();
        assert_eq!(loaded, synthetic(3, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
