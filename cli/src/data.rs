//! `amend data synth`: synthetic distractor edits for scale tests.

use std::path::PathBuf;

use anyhow::{bail, Context};

use amend_compiler::dataset::{synthetic, to_knowedit};

/// Enough for the 10,000-edit benchmarks with room to spare; the generator's name space holds far
/// more, but a bigger file is almost certainly a typo.
const MAX_RECORDS: usize = 1_000_000;

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
    /// Output JSON file.
    #[arg(long)]
    out: PathBuf,
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
    if let Ok(meta) = std::fs::metadata(&args.out) {
        if !meta.is_file() {
            bail!(
                "--out {}: exists and is not a regular file",
                args.out.display()
            );
        }
    }
    let records = synthetic(args.n, args.seed);
    let mut json = to_knowedit(&records);
    // The style field the repository's data sets carry (eval reports styles apart).
    for r in json.as_array_mut().into_iter().flatten() {
        let question = r["prompt"].as_str().is_some_and(|p| p.ends_with('?'));
        r["style"] = (if question { "question" } else { "statement" }).into();
    }
    let text = serde_json::to_string_pretty(&json)? + "\n";
    std::fs::write(&args.out, text).with_context(|| format!("--out {}", args.out.display()))?;
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
        // A directory is not overwritten.
        let err = synth(SynthArgs {
            n: 3,
            seed: 1,
            out: dir.clone(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
