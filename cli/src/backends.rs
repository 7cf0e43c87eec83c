//! The ONNX Runtime backend on the command line (issue 13): the options `run` shares, `amend
//! parity` (top-1 agreement, logit error, speed and memory against llama.cpp in one run) and
//! `amend export-onnx`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use amend_edits::fsutil::file_id;
use amend_runtime::onnxruntime::{
    Emulation, Ep, OnnxCache, OrtModel, OrtOptions, OrtSession, Profile, SlotLayout, StaticShapes,
    WeightMemory,
};
use amend_runtime::{Backend, GenerateParams, Session, SessionOptions};
use anyhow::Context;

/// Which engine runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendName {
    /// llama.cpp on the CPU.
    Llama,
    /// ONNX Runtime on an execution provider (--ep).
    Ort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileName {
    /// ORT contrib ops (MatMulNBits): CPU and OpenVINO EPs.
    Cpu,
    /// Standard ONNX ops only, for EPs without contrib ops.
    Portable,
}

/// ONNX Runtime options (used with `--backend ort`).
#[derive(clap::Args, Clone, Debug)]
pub struct OrtArgs {
    /// Execution provider: cpu, openvino[:CPU|GPU|NPU], qnn, coreml, nnapi, xnnpack.
    #[arg(long, default_value = "cpu")]
    pub ep: String,
    /// The ONNX Runtime library (default $AMEND_ORT_LIB, else what scripts/fetch-ort.sh
    /// installed for the EP under $AMEND_CACHE/ort, default ~/.cache/amend/ort).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Operator profile of the graph.
    #[arg(long, value_enum, default_value_t = ProfileName::Cpu)]
    pub profile: ProfileName,
    /// Let nodes the EP does not take run on the CPU EP (off: such a graph is an error).
    #[arg(long)]
    pub cpu_fallback: bool,
    /// Run this graph (from `amend export-onnx`) instead of building one; it must match the
    /// model. Default: build, cached as MODEL.PROFILE.onnx beside the model.
    #[arg(long)]
    pub onnx: Option<PathBuf>,
    /// Neither read nor write the graph cache beside the model.
    #[arg(long)]
    pub no_onnx_cache: bool,
    /// llama.cpp roundings to reproduce in the graph: none, or a list of kv, gelu, q80, q8k,
    /// q6kf32 (docs/backends.md).
    #[arg(long, default_value = "none")]
    pub emulate: String,
    /// An ONNX Runtime session configuration entry KEY=VALUE (repeatable).
    #[arg(long = "ort-config")]
    pub ort_config: Vec<String>,
    /// An option for the execution provider KEY=VALUE (repeatable), given to it as it is:
    /// QNN's `backend_path=libQnnHtp.so`, OpenVINO's `load_config={...}` (which replaces
    /// amend's default, docs/backends.md).
    #[arg(long = "ep-option")]
    pub ep_option: Vec<String>,
    /// Edit slots the graph gets besides those of the bundles given at open, so that bundles
    /// swapped in later fit: `cb:LAYER:KEY_SITE:REPLACE_SITE`, `pn:LAYER:READ:WRITE:relu|gelu`,
    /// `lr:TENSOR`, `;`-separated (docs/backends.md).
    #[arg(long, default_value = "")]
    pub slots: String,
    /// Fixed shapes, as QNN needs: `CHUNK,WINDOW` builds a prefill graph of CHUNK tokens and a
    /// one-token decode graph over a KV window of WINDOW positions (the context's limit);
    /// `,ENTRIES,NEURONS,RANK` sets what each edit slot holds (default 1024,256,64).
    #[arg(long)]
    pub static_shapes: Option<String>,
    /// Write ONNX Runtime's per-node profile to PREFIX_<date>_<time>.json, one file per
    /// session, when it ends (docs/backends.md: reading it).
    #[arg(long, value_name = "PREFIX")]
    pub ort_trace: Option<PathBuf>,
    /// Where the graph's weights live: `lean` (pages the process owns, those only the
    /// prepacking MatMulNBits reads given back after a bitwise probe), `owned` (nothing given
    /// back) or `inline` (ONNX Runtime's own copy beside the prepacked one; docs/backends.md).
    #[arg(long, default_value = "lean")]
    pub ort_weights: String,
}

impl Default for OrtArgs {
    /// The command line's defaults (tests build `Args` by hand).
    fn default() -> Self {
        OrtArgs {
            ep: "cpu".into(),
            ort_lib: None,
            profile: ProfileName::Cpu,
            cpu_fallback: false,
            onnx: None,
            no_onnx_cache: false,
            emulate: "none".into(),
            ort_config: Vec::new(),
            ep_option: Vec::new(),
            slots: String::new(),
            static_shapes: None,
            ort_trace: None,
            ort_weights: "lean".into(),
        }
    }
}

/// `KEY=VALUE` pairs of a repeatable flag (the value may hold `=`).
fn key_values(flag: &str, items: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("{flag} {kv:?}: expected KEY=VALUE"))
        })
        .collect()
}

impl OrtArgs {
    /// The first ONNX Runtime flag given a value other than its default (for commands that
    /// would ignore it).
    pub fn changed_flag(&self) -> Option<&'static str> {
        let d = OrtArgs::default();
        [
            ("--ep", self.ep != d.ep),
            ("--ort-lib", self.ort_lib.is_some()),
            ("--profile", self.profile != d.profile),
            ("--cpu-fallback", self.cpu_fallback),
            ("--onnx", self.onnx.is_some()),
            ("--no-onnx-cache", self.no_onnx_cache),
            ("--emulate", self.emulate != d.emulate),
            ("--ort-config", !self.ort_config.is_empty()),
            ("--ep-option", !self.ep_option.is_empty()),
            ("--slots", self.slots != d.slots),
            ("--static-shapes", self.static_shapes.is_some()),
            ("--ort-trace", self.ort_trace.is_some()),
            ("--ort-weights", self.ort_weights != d.ort_weights),
        ]
        .into_iter()
        .find_map(|(flag, changed)| changed.then_some(flag))
    }

    /// With the llama.cpp backend every ONNX Runtime flag would be ignored: an error naming
    /// the first one given.
    pub fn check_backend(&self, backend: BackendName) -> anyhow::Result<()> {
        match (backend, self.changed_flag()) {
            (BackendName::Llama, Some(flag)) => {
                anyhow::bail!("{flag} is an ONNX Runtime option: it needs --backend ort")
            }
            _ => Ok(()),
        }
    }

    pub fn options(&self, threads: Option<usize>) -> anyhow::Result<OrtOptions> {
        if let Some(t) = &self.ort_trace {
            // ONNX Runtime writes the profile when the session ends and says nothing if it
            // cannot: a missing directory would lose it silently.
            let dir = match t.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                anyhow::bail!(
                    "--ort-trace {}: the directory {} does not exist",
                    t.display(),
                    dir.display()
                );
            }
        }
        // Each value's error names its flag: the library's messages alone ("invalid session
        // options: ...") do not say which of a dozen flags to change.
        Ok(OrtOptions {
            ep: Ep::parse(&self.ep).with_context(|| format!("--ep {:?}", self.ep))?,
            profile: match self.profile {
                ProfileName::Cpu => Profile::Cpu,
                ProfileName::Portable => Profile::Portable,
            },
            library: self.ort_lib.clone(),
            n_threads: threads,
            cpu_fallback: self.cpu_fallback,
            export: None,
            cache: match (&self.onnx, self.no_onnx_cache) {
                (Some(p), _) => OnnxCache::File(p.clone()),
                (None, true) => OnnxCache::Off,
                (None, false) => OnnxCache::BesideModel,
            },
            emulation: Emulation::parse(&self.emulate)
                .map_err(|e| anyhow::anyhow!("--emulate {:?}: {e}", self.emulate))?,
            session_config: key_values("--ort-config", &self.ort_config)?,
            ep_options: key_values("--ep-option", &self.ep_option)?,
            slots: SlotLayout::parse(&self.slots).map_err(|e| anyhow::anyhow!("--slots: {e}"))?,
            capture: Vec::new(),
            static_shapes: self
                .static_shapes
                .as_deref()
                .map(|v| StaticShapes::parse(v).with_context(|| format!("--static-shapes {v:?}")))
                .transpose()?,
            trace: self.ort_trace.clone(),
            weight_memory: WeightMemory::parse(&self.ort_weights)
                .with_context(|| format!("--ort-weights {:?}", self.ort_weights))?,
        })
    }
}

pub fn open_ort(
    path: &Path,
    args: &OrtArgs,
    threads: Option<usize>,
) -> anyhow::Result<Arc<OrtModel>> {
    open_ort_with_slots(path, args, threads, SlotLayout::default())
}

/// Opens the model on ONNX Runtime with `slots` (the bundles' edits) plus `--slots`.
pub fn open_ort_with_slots(
    path: &Path,
    args: &OrtArgs,
    threads: Option<usize>,
    slots: SlotLayout,
) -> anyhow::Result<Arc<OrtModel>> {
    let mut options = args.options(threads)?;
    options.slots.merge(&slots);
    if !options.slots.is_empty() {
        log::info!("ort: edit slots {}", options.slots.describe());
    }
    OrtModel::open(path, options)
        .with_context(|| format!("opening {} on ONNX Runtime", path.display()))
}

#[derive(clap::Args)]
pub struct ParityArgs {
    /// GGUF model file.
    #[arg(long, env = "AMEND_MODEL")]
    pub model: PathBuf,
    #[command(flatten)]
    pub ort: OrtArgs,
    /// Prompts, one per line (default: the 100 prompts of data/prompts-100.txt, built in).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Only the first N prompts.
    #[arg(long, value_parser = crate::parse_count)]
    pub limit: Option<usize>,
    /// Greedy tokens per prompt (positions compared); each prompt and its tokens must fit
    /// the context of 1,024 positions.
    #[arg(long, default_value_t = 32, value_parser = crate::parse_count)]
    pub tokens: usize,
    /// CPU threads for both backends.
    #[arg(long, value_parser = crate::parse_threads, default_value_t = 1)]
    pub threads: usize,
    /// Tokens generated per backend in the speed comparison: 0 skips it, else at least 2 (the
    /// first comes from the prefill; decode is timed over the rest).
    #[arg(long, default_value_t = 64)]
    pub speed_tokens: usize,
    /// Speed rounds (1..=1000), the backends alternating; medians are reported (this
    /// machine's run-to-run noise on one round is several percent).
    #[arg(long, default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub speed_rounds: usize,
    /// Evaluate the continuation in one teacher-forced pass instead of token by token.
    #[arg(long)]
    pub batch: bool,
    /// Compare llama.cpp with itself instead (teacher-forced batch vs token-by-token, so it
    /// needs --batch): the floor any other backend is measured against.
    #[arg(long, requires = "batch")]
    pub self_check: bool,
    /// Also measure each backend's memory in a process of its own (this command run again
    /// with `--rss-probe`): opened, then the speed prompt and decode run once. In the shared
    /// process the ONNX Runtime figure after the run also holds what llama.cpp's runs grew.
    #[arg(long)]
    pub rss_alone: bool,
    /// Internal (`--rss-alone`): open this backend only (llama or ort), run the speed
    /// workload once, print its memory and exit.
    #[arg(long, hide = true)]
    pub rss_probe: Option<String>,
}

use amend_runtime::bench::median;

fn rss_kb() -> Option<u64> {
    status_kb("VmRSS:")
}

/// A `/proc/self/status` figure in kB (`VmRSS:`, `VmHWM:`).
fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The speed test's prompt: the first prompts joined to about 128 tokens.
fn speed_prompt(prompts: &[Vec<i32>]) -> Vec<i32> {
    let mut long = Vec::new();
    for p in prompts {
        if long.len() >= 128 {
            break;
        }
        long.extend_from_slice(if long.is_empty() { &p[..] } else { &p[1..] });
    }
    long
}

/// `--rss-probe`: one backend alone in this process. Prints
/// `rss-probe BACKEND open_kb=.. run_kb=.. peak_kb=..` (growth over the process before opening).
fn rss_probe(args: &ParityArgs, which: &str, lines: &[&str]) -> anyhow::Result<()> {
    let rss0 = rss_kb().unwrap_or(0);
    // Memory right after opening, then after the speed workload.
    let measure = |b: &mut dyn Backend| -> anyhow::Result<(u64, u64)> {
        let open = rss_kb().unwrap_or(0).saturating_sub(rss0);
        let prompts: Vec<Vec<i32>> = lines
            .iter()
            .map(|l| b.vocab().tokenize(l, true))
            .collect::<Result<_, _>>()?;
        speed(b, &speed_prompt(&prompts), args.speed_tokens.max(1))?;
        Ok((open, rss_kb().unwrap_or(0).saturating_sub(rss0)))
    };
    let (open_kb, run_kb) = match which {
        "llama" => {
            let llama = crate::run::open_model(&args.model, Some(args.threads))?;
            let mut s = Session::new(
                &llama,
                SessionOptions {
                    n_ctx: 1024,
                    n_threads: Some(args.threads),
                    ..Default::default()
                },
            )?;
            measure(&mut s)?
        }
        "ort" => {
            let ort = open_ort(&args.model, &args.ort, Some(args.threads))?;
            measure(&mut OrtSession::new(&ort, 1024)?)?
        }
        other => anyhow::bail!("--rss-probe {other:?}: expected llama or ort"),
    };
    let peak = status_kb("VmHWM:").unwrap_or(0).saturating_sub(rss0);
    println!("rss-probe {which} open_kb={open_kb} run_kb={run_kb} peak_kb={peak}");
    Ok(())
}

/// `--rss-alone`: runs this command again once per backend with `--rss-probe`, and reads the
/// figures it prints.
fn rss_alone(which: &str) -> anyhow::Result<[u64; 3]> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let out = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .args(["--rss-probe", which])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the memory probe")?;
    anyhow::ensure!(out.status.success(), "the {which} memory probe failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("rss-probe "))
        .with_context(|| format!("the {which} memory probe printed no figures"))?;
    let mut v = [0u64; 3];
    for (slot, key) in v.iter_mut().zip(["open_kb=", "run_kb=", "peak_kb="]) {
        *slot = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|x| x.parse().ok())
            .with_context(|| format!("the {which} memory probe: no {key}"))?;
    }
    Ok(v)
}

/// Prefill and decode speed of a backend: one prompt of `prompt_len` tokens, then `n` greedy
/// single-token decodes (end of generation ignored).
fn speed(b: &mut dyn Backend, prompt: &[i32], n: usize) -> anyhow::Result<(f64, f64)> {
    let params = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(n)
    };
    let out = amend_runtime::generate_with(b, prompt, &params)?;
    Ok((out.timings.prefill_tok_s(), out.timings.decode_tok_s()))
}

/// The context both backends get in `amend parity`.
const PARITY_N_CTX: usize = 1024;

/// Each prompt plus `tokens` must fit `n_ctx`, and the speed prompt plus its decode too:
/// checked before any comparison runs, not found when the context fills.
fn check_parity_lengths(
    args: &ParityArgs,
    prompts: &[Vec<i32>],
    n_ctx: usize,
    what: &str,
) -> anyhow::Result<()> {
    if let Some((i, p)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() + args.tokens > n_ctx)
    {
        anyhow::bail!(
            "--tokens {}: prompt {} has {} tokens, and with its continuation it needs {} positions; {what} has {n_ctx}",
            args.tokens,
            i + 1,
            p.len(),
            p.len() + args.tokens
        );
    }
    if args.speed_tokens > 0 && !args.self_check {
        let long = speed_prompt(prompts).len();
        if long + args.speed_tokens > n_ctx {
            anyhow::bail!(
                "--speed-tokens {}: the speed prompt has {long} tokens, so it needs {} positions; {what} has {n_ctx}",
                args.speed_tokens,
                long + args.speed_tokens
            );
        }
    }
    Ok(())
}

pub fn parity(args: ParityArgs) -> anyhow::Result<()> {
    let text = match &args.prompts {
        Some(p) => {
            amend_edits::fsutil::read_regular_string(p, amend_edits::fsutil::MAX_TEXT_FILE_LEN)
                .with_context(|| format!("--prompts {}", p.display()))?
        }
        None => include_str!("../../data/prompts-100.txt").to_string(),
    };
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if let Some(n) = args.limit {
        lines.truncate(n);
    }
    if lines.is_empty() {
        anyhow::bail!(
            "--prompts {}: no prompt in it (one per line; blank lines are skipped)",
            args.prompts.as_deref().unwrap_or(Path::new("")).display()
        );
    }
    if args.self_check {
        if let Some(flag) = args.ort.changed_flag() {
            anyhow::bail!("{flag}: --self-check compares llama.cpp with itself; no ONNX Runtime option applies");
        }
        if args.rss_alone {
            anyhow::bail!("--rss-alone: --self-check measures no memory");
        }
    }
    if args.speed_tokens == 1 {
        // One token is all prefill: decode would be timed over nothing (0 tok/s, NaN ratio).
        anyhow::bail!(
            "--speed-tokens 1: give 0 (no speed comparison) or at least 2 (the first token \
             comes from the prefill; decode is timed over the rest)"
        );
    }
    if let Some(which) = &args.rss_probe {
        return rss_probe(&args, which, &lines);
    }
    let rss0 = rss_kb().unwrap_or(0);
    let llama = crate::run::open_model(&args.model, Some(args.threads))?;
    let session = || {
        Session::new(
            &llama,
            SessionOptions {
                n_ctx: PARITY_N_CTX as u32,
                n_threads: Some(args.threads),
                ..Default::default()
            },
        )
    };
    let mut reference = session()?;
    let rss_llama = rss_kb().unwrap_or(0).saturating_sub(rss0);
    let prompts: Vec<Vec<i32>> = lines
        .iter()
        .map(|l| llama.tokenize(l, true))
        .collect::<Result<_, _>>()?;
    check_parity_lengths(&args, &prompts, PARITY_N_CTX, "the context")?;
    let mode = if args.batch {
        amend_runtime::parity::Mode::Batch
    } else {
        amend_runtime::parity::Mode::Incremental
    };
    if args.self_check {
        let mut other = session()?;
        let r = amend_runtime::parity::parity(
            &mut reference,
            &mut other,
            &prompts,
            args.tokens,
            mode,
            |_, _| {},
        )?;
        print!("{}", r.table("llama.cpp", &format!("llama.cpp ({mode:?})")));
        return Ok(());
    }
    let t = Instant::now();
    let ort = open_ort(&args.model, &args.ort, Some(args.threads))?;
    let open_s = t.elapsed().as_secs_f64();
    let rss_ort_open = rss_kb().unwrap_or(0).saturating_sub(rss0 + rss_llama);
    // A static KV window bounds the context.
    let n_ctx = ort
        .options()
        .static_shapes
        .map_or(PARITY_N_CTX, |s| s.window.min(PARITY_N_CTX));
    check_parity_lengths(&args, &prompts, n_ctx, "the static KV window")?;
    let mut candidate = OrtSession::new(&ort, n_ctx)?;
    let candidate_name = format!("onnxruntime {}", ort.options().ep.name());
    let report = amend_runtime::parity::parity(
        &mut reference,
        &mut candidate,
        &prompts,
        args.tokens,
        mode,
        |i, r| {
            log::info!(
                "prompt {}/{}: agreement {:.2}% over {} positions",
                i + 1,
                prompts.len(),
                r.agreement(),
                r.positions
            )
        },
    )?;
    let rss_both = rss_kb().unwrap_or(0).saturating_sub(rss0);
    println!(
        "model {} ({} profile, {mode:?} evaluation)",
        args.model.display(),
        ort.options().profile.name()
    );
    print!("{}", report.table("llama.cpp", &candidate_name));
    if !report.first_token_misses.is_empty() {
        println!(
            "first-token misses at prompts {:?}",
            report.first_token_misses
        );
    }
    let st = ort.stats();
    println!(
        "ort open {:.2} s (graph {} {:.2} s, {} nodes, {:.1} MB ONNX; session {:.2} s)",
        open_s,
        if st.from_cache {
            "read from cache in"
        } else {
            "built in"
        },
        st.graph_build_s,
        st.n_nodes,
        st.onnx_bytes as f64 / 1e6,
        st.session_create_s
    );
    if args.speed_tokens > 0 {
        let long = speed_prompt(&prompts);
        let prompt = &long;
        let rounds = args.speed_rounds;
        let (mut lps, mut lds, mut ops, mut ods) = (vec![], vec![], vec![], vec![]);
        let (mut pr, mut dr) = (vec![], vec![]);
        for _ in 0..rounds {
            let (lp, ld) = speed(&mut reference, prompt, args.speed_tokens)?;
            let (op, od) = speed(&mut candidate, prompt, args.speed_tokens)?;
            lps.push(lp);
            lds.push(ld);
            ops.push(op);
            ods.push(od);
            pr.push(op / lp);
            dr.push(od / ld);
        }
        let span = |v: &[f64]| {
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(0.0, f64::max);
            format!("{lo:.2}-{hi:.2}")
        };
        println!(
            "| backend | prefill tok/s ({} tokens) | decode tok/s ({} tokens) |\n|---|---:|---:|\n| llama.cpp | {:.1} | {:.1} |\n| {candidate_name} | {:.1} ({:.2}x) | {:.1} ({:.2}x) |",
            prompt.len(),
            args.speed_tokens,
            median(&lps),
            median(&lds),
            median(&ops),
            median(&pr),
            median(&ods),
            median(&dr)
        );
        println!(
            "medians of {rounds} alternating round(s); ratio per round: prefill {}, decode {}",
            span(&pr),
            span(&dr)
        );
    }
    let rss_ort = rss_both.saturating_sub(rss_llama);
    println!(
        "RSS: llama.cpp model+session {:.0} MB, ONNX Runtime model+session {:.0} MB ({:.2}x; {:.0} MB right after opening)",
        rss_llama as f64 / 1024.0,
        rss_ort as f64 / 1024.0,
        rss_ort as f64 / rss_llama.max(1) as f64,
        rss_ort_open as f64 / 1024.0
    );
    if args.rss_alone {
        let l = rss_alone("llama")?;
        let o = rss_alone("ort")?;
        let mb = |kb: u64| kb as f64 / 1024.0;
        println!(
            "RSS, each backend alone in a process (growth over the process before opening; the \
             speed prompt and {} decoded tokens):\n| | llama.cpp | ONNX Runtime | ratio |\n|---|---:|---:|---:|",
            args.speed_tokens.max(1)
        );
        for (i, what) in ["after opening", "after the run", "peak"]
            .iter()
            .enumerate()
        {
            println!(
                "| {what} | {:.0} MB | {:.0} MB | {:.2}x |",
                mb(l[i]),
                mb(o[i]),
                o[i] as f64 / l[i].max(1) as f64
            );
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// GGUF model file.
    #[arg(long, env = "AMEND_MODEL")]
    pub model: PathBuf,
    /// Where to write the .onnx file.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub ort: OrtArgs,
}

/// Builds the graph (loading it on the EP as a check) and writes it. A failed export leaves
/// nothing it wrote; an EP this machine cannot start (QNN on a workstation) does not fail it:
/// the graph is checked on the CPU EP instead, and the output says so.
pub fn export_onnx(args: ExportArgs) -> anyhow::Result<()> {
    if let Some(p) = &args.ort.onnx {
        anyhow::bail!(
            "--onnx {}: export-onnx builds the graph from --model (`amend run --onnx` runs a graph)",
            p.display()
        );
    }
    let mut options = args.ort.options(None)?;
    let files = amend_runtime::onnxruntime::export_paths(&args.out, options.static_shapes.as_ref());
    // The model and the ONNX Runtime library (and the provider library beside it) are read:
    // --out naming one would replace it with the graph.
    let lib = options.library_path();
    let lib_flag = if args.ort.ort_lib.is_some() {
        "--ort-lib"
    } else {
        "ONNX Runtime library"
    };
    let shared = lib.with_file_name("libonnxruntime_providers_shared.so");
    let outs: Vec<(&str, &Path)> = files.iter().map(|f| ("--out", f.as_path())).collect();
    crate::check_outputs_apart(
        &outs,
        &[
            ("--model", args.model.as_path()),
            (lib_flag, lib.as_path()),
            (lib_flag, shared.as_path()),
        ],
    )?;
    for f in &files {
        crate::check_output_path("--out", f, true)?;
    }
    let before: Vec<_> = files.iter().map(|f| file_id(f)).collect();
    // What this run wrote (a new file, or a new inode renamed over an old one).
    let written = || -> Vec<&PathBuf> {
        files
            .iter()
            .zip(&before)
            .filter_map(|(f, b)| {
                let now = file_id(f);
                (now.is_some() && now != *b).then_some(f)
            })
            .collect()
    };
    let remove_written = || {
        for f in written() {
            let _ = std::fs::remove_file(f);
        }
    };
    options.export = Some(args.out.clone());
    options.cache = OnnxCache::Off;
    let what = || format!("building the ONNX graph of {}", args.model.display());
    let (m, unchecked) = match OrtModel::open(&args.model, options.clone()) {
        Ok(m) => (m, None),
        Err(amend_runtime::RuntimeError::OrtEp { ep, detail })
            if written().len() == files.len() =>
        {
            // The graph was written before the session: check it loads on the CPU EP.
            let cpu = OrtOptions {
                ep: Ep::Cpu,
                ep_options: Vec::new(),
                export: None,
                cache: OnnxCache::File(args.out.clone()),
                ..options
            };
            match OrtModel::open(&args.model, cpu) {
                Ok(m) => (m, Some((ep, detail))),
                Err(e) => {
                    remove_written();
                    return Err(e)
                        .with_context(|| format!("{}: checking it on the CPU EP", what()));
                }
            }
        }
        Err(e) => {
            remove_written();
            return Err(e).with_context(what);
        }
    };
    println!(
        "{}: {} nodes, {:.1} MB, built in {:.2} s, loads on {}",
        args.out.display(),
        m.stats().n_nodes,
        m.stats().onnx_bytes as f64 / 1e6,
        m.stats().graph_build_s,
        m.options().ep.name()
    );
    if let Some((ep, detail)) = unchecked {
        println!(
            "not checked on {ep}: it does not start with this ONNX Runtime library ({detail}); \
             load the file on the target device"
        );
    }
    Ok(())
}
