//! Model files built to hurt: structurally valid GGUFs whose metadata or tensor table lies
//! (a head count of 0, a NaN epsilon, a vocabulary shorter than the embedding table, a tensor
//! with its dimensions swapped, ...). Each mutant is opened and run by the `amend` binary in a
//! child process, on llama.cpp and on ONNX Runtime's CPU and OpenVINO EPs (where installed; `make
//! ort` installs both): the child must either generate or
//! exit with an error message. A signal (llama.cpp's `GGML_ASSERT` aborts, a division by zero,
//! a segfault), a Rust panic or a hang is a failure, because inside a host app it would take the
//! app down.
//!
//! The mutations are systematic, not random: every metadata key gets edge values of its own
//! type and of another type and is deleted; every tensor gets its dimensions swapped or changed,
//! its type changed, or is deleted. `HOSTILE_MODELS_REAL=1` adds the real model's metadata
//! mutations (each mutant is a 253 MB copy, so they are off by default). A graph named with
//! `--onnx` gets byte-level mutants of its own (`named_graph_mutants_never_crash_the_process`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use amend_edits::gguf::{GgmlType, GgufArray, GgufFile, GgufValue, GgufWriter};
use amend_runtime::testutil::write_tiny_model_typed;
use amend_runtime::Architecture;

fn tmp() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("amend-hostile-models-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

/// Edge values for a metadata value: of its own type, then of other types.
fn edge_values(v: &GgufValue) -> Vec<(&'static str, GgufValue)> {
    use GgufValue as V;
    let mut out: Vec<(&'static str, GgufValue)> = match v {
        V::U32(_) | V::U64(_) | V::I32(_) | V::I64(_) | V::U16(_) | V::U8(_) => vec![
            ("0", V::U32(0)),
            ("1", V::U32(1)),
            ("3", V::U32(3)),
            ("1000", V::U32(1000)),
            ("2^31", V::U32(1 << 31)),
            ("u32::MAX", V::U32(u32::MAX)),
            ("-1 (i32)", V::I32(-1)),
            ("2^40 (u64)", V::U64(1 << 40)),
        ],
        V::F32(_) | V::F64(_) => vec![
            ("0.0", V::F32(0.0)),
            ("-1.0", V::F32(-1.0)),
            ("NaN", V::F32(f32::NAN)),
            ("inf", V::F32(f32::INFINITY)),
            ("1e30", V::F32(1e30)),
            ("1e-30", V::F32(1e-30)),
        ],
        V::Bool(b) => vec![("flipped", V::Bool(!b))],
        V::String(_) => vec![
            ("empty", V::String(String::new())),
            ("llama", V::String("llama".into())),
            ("gemma3", V::String("gemma3".into())),
            ("bert", V::String("bert".into())),
            ("4 KB", V::String("x".repeat(4096))),
        ],
        V::Array(a) => array_edges(a),
        V::I8(_) | V::I16(_) => vec![("-1", V::I32(-1))],
    };
    // Another type than the reader expects.
    match v {
        V::String(_) | V::Array(_) => out.push(("a u32", V::U32(7))),
        _ => out.push(("a string", V::String("7".into()))),
    }
    // The same value under another type of its kind (llama.cpp reads each key as one exact
    // type; a reader that converts would run what it refuses).
    if let Some(x) = v.as_u64() {
        out.push(("the same value as u64", V::U64(x)));
        out.push(("the same value as i32", V::I32(x as i32)));
        out.push(("the same value as u16", V::U16(x as u16)));
    }
    if let V::F32(x) = v {
        out.push(("the same value as f64", V::F64(*x as f64)));
    }
    out
}

fn array_edges(a: &GgufArray) -> Vec<(&'static str, GgufValue)> {
    use GgufArray as A;
    let n = a.len();
    let half = n / 2;
    let mut out = vec![];
    let cut = |k: usize| -> GgufArray {
        match a {
            A::U8(v) => A::U8(v[..k].to_vec()),
            A::I8(v) => A::I8(v[..k].to_vec()),
            A::U16(v) => A::U16(v[..k].to_vec()),
            A::I16(v) => A::I16(v[..k].to_vec()),
            A::U32(v) => A::U32(v[..k].to_vec()),
            A::I32(v) => A::I32(v[..k].to_vec()),
            A::U64(v) => A::U64(v[..k].to_vec()),
            A::I64(v) => A::I64(v[..k].to_vec()),
            A::F32(v) => A::F32(v[..k].to_vec()),
            A::F64(v) => A::F64(v[..k].to_vec()),
            A::Bool(v) => A::Bool(v[..k].to_vec()),
            A::String(v) => A::String(v[..k].to_vec()),
            A::Array(v) => A::Array(v[..k].to_vec()),
        }
    };
    out.push(("empty array", GgufValue::Array(cut(0))));
    if n > 1 {
        out.push(("one element", GgufValue::Array(cut(1))));
        out.push(("first half", GgufValue::Array(cut(half))));
        out.push(("one short", GgufValue::Array(cut(n - 1))));
    }
    // Values inside the array that lie.
    match a {
        A::I32(v) => {
            out.push(("all -1", GgufValue::Array(A::I32(vec![-1; v.len()]))));
            out.push(("all 99", GgufValue::Array(A::I32(vec![99; v.len()]))));
        }
        A::U32(v) => {
            out.push((
                "all u32::MAX",
                GgufValue::Array(A::U32(vec![u32::MAX; v.len()])),
            ));
        }
        A::F32(v) => {
            out.push(("all NaN", GgufValue::Array(A::F32(vec![f32::NAN; v.len()]))));
        }
        A::String(v) => {
            out.push((
                "all empty strings",
                GgufValue::Array(A::String(vec![String::new(); v.len()])),
            ));
            let mut d = v.clone();
            if d.len() > 4 {
                d[3] = d[4].clone();
            }
            out.push(("a duplicate token", GgufValue::Array(A::String(d))));
            let mut e = v.clone();
            if e.len() > 300 {
                e[300] = String::new();
            }
            out.push(("one empty token", GgufValue::Array(A::String(e))));
            // SentencePiece's byte fallback looks these up while tokenizing.
            let renamed: Vec<String> = v
                .iter()
                .map(|t| match t.strip_prefix("<0x") {
                    Some(rest) => format!("<byte{rest}"),
                    None => t.clone(),
                })
                .collect();
            out.push(("byte tokens renamed", GgufValue::Array(A::String(renamed))));
            out.push(("an f32 array", GgufValue::Array(A::F32(vec![0.0; v.len()]))));
        }
        _ => {}
    }
    out
}

/// Rewrites `f` with its metadata replaced by `meta` and its tensors by `tensors` (name, type,
/// dims, data).
fn rewrite(
    meta: &[(String, GgufValue)],
    tensors: &[(String, GgmlType, Vec<u64>, Vec<u8>)],
) -> Option<Vec<u8>> {
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.add(k, v.clone());
    }
    for (name, ty, ne, data) in tensors {
        w.add_tensor_raw(name, *ty, ne, data.clone()).ok()?;
    }
    Some(w.to_bytes())
}

/// Which mutations [`mutants`] makes.
#[derive(Clone, Copy, PartialEq)]
enum Scope {
    /// Metadata and every tensor.
    All,
    /// Metadata, and the tensors outside the layers plus layer 0's.
    FirstLayer,
    /// Metadata only.
    Metadata,
}

/// Every mutation of the model in `bytes`: each metadata key, then (per `scope`) tensors. Each
/// mutant goes to `each` (what it is, the rewritten file) as it is made: the real model's are
/// 253 MB apiece.
/// Architecture keys (after `{arch}.`) llama.cpp's loader and context read, for the added-key
/// mutants: the base hyperparameters, RoPE scaling, mixture-of-experts counts, sliding-window
/// and other architectures' knobs.
const ADDED_ARCH_KEYS: &[&str] = &[
    "embedding_length_out",
    "attention.causal",
    "pooling_type",
    "nextn_predict_layers",
    "expert_count",
    "expert_used_count",
    "expert_group_count",
    "expert_group_used_count",
    "expert_shared_count",
    "rope.scaling.finetuned",
    "rope.scaling.original_context_length",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    "rope.scaling.attn_factor",
    "rope.scaling.alpha",
    "rope.scaling.yarn_log_multiplier",
    "rope.scaling.yarn_ext_factor",
    "rope.scaling.yarn_attn_factor",
    "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow",
    "attention.key_length_swa",
    "attention.value_length_swa",
    "rope.dimension_count_swa",
    "vocab_size",
    "attention.sliding_window",
    "attention.sliding_window_pattern",
    "rope.freq_base_swa",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "attention.scale",
    "attention.layer_norm_epsilon",
    "logit_scale",
    "residual_scale",
    "embedding_scale",
    "attention.clamp_kqv",
    "attention.max_alibi_bias",
    "use_parallel_residual",
    "decoder_start_token_id",
];

/// Tokenizer keys llama.cpp's vocabulary load reads, for the added-key mutants.
const ADDED_TOKENIZER_KEYS: &[&str] = &[
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_sep_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.ggml.remove_extra_whitespaces",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.precompiled_charsmap",
];

fn mutants(bytes: &[u8], scope: Scope, each: &mut dyn FnMut(String, Vec<u8>)) {
    let f = GgufFile::parse(bytes).expect("the seed model parses");
    let meta: Vec<(String, GgufValue)> = f
        .metadata
        .iter()
        .filter(|(k, _)| k != "general.alignment")
        .cloned()
        .collect();
    let tensors: Vec<(String, GgmlType, Vec<u64>, Vec<u8>)> = f
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.ggml_type,
                t.ne.clone(),
                f.data_of(t).unwrap().to_vec(),
            )
        })
        .collect();
    for (i, (k, v)) in meta.iter().enumerate() {
        for (label, nv) in edge_values(v) {
            let mut m = meta.clone();
            m[i].1 = nv;
            if let Some(b) = rewrite(&m, &tensors) {
                each(format!("{k} = {label}"), b);
            }
        }
        let mut m = meta.clone();
        m.remove(i);
        if let Some(b) = rewrite(&m, &tensors) {
            each(format!("{k} deleted"), b);
        }
    }
    // Keys llama.cpp reads that the seed lacks, added under values of several types: mutating
    // the seed's own keys never reached them, and six such keys aborted the process (session
    // 33: an unknown `rope.scaling.type`, expert counts, `nextn_predict_layers`).
    let arch = match f.get("general.architecture") {
        Some(GgufValue::String(a)) => a.clone(),
        _ => String::new(),
    };
    // Models only: a LoRA adapter's loader reads none of these.
    let adapter = meta.iter().any(|(k, _)| k == "adapter.type");
    let arch_keys: &[&str] = if adapter {
        &[]
    } else if arch == "llama" || arch == "gemma3" {
        ADDED_ARCH_KEYS
    } else {
        &[]
    };
    let added = arch_keys.iter().map(|k| format!("{arch}.{k}")).chain(
        ADDED_TOKENIZER_KEYS
            .iter()
            .filter(|_| !adapter)
            .map(|k| k.to_string()),
    );
    for key in added {
        if meta.iter().any(|(k, _)| *k == key) {
            continue;
        }
        for (label, v) in [
            ("u32 0", GgufValue::U32(0)),
            ("u32 2", GgufValue::U32(2)),
            ("u32 max", GgufValue::U32(u32::MAX)),
            ("f32 4", GgufValue::F32(4.0)),
            ("false", GgufValue::Bool(false)),
            ("a string", GgufValue::String("foo".into())),
        ] {
            let mut m = meta.clone();
            m.push((key.clone(), v));
            if let Some(b) = rewrite(&m, &tensors) {
                each(format!("{key} added as {label}"), b);
            }
        }
    }
    if scope == Scope::Metadata {
        return;
    }
    for (i, (name, ty, ne, data)) in tensors.iter().enumerate() {
        if scope == Scope::FirstLayer && name.starts_with("blk.") && !name.starts_with("blk.0.") {
            continue;
        }
        let mut with = |what: String, t: Option<(GgmlType, Vec<u64>, Vec<u8>)>| {
            let mut ts = tensors.clone();
            match t {
                Some((ty, ne, d)) => ts[i] = (name.clone(), ty, ne, d),
                None => {
                    ts.remove(i);
                }
            }
            if let Some(b) = rewrite(&meta, &ts) {
                each(what, b);
            }
        };
        with(format!("{name} deleted"), None);
        if ne.len() == 2 && ne[0] != ne[1] && *ty == GgmlType::F32 {
            with(
                format!("{name} dims swapped"),
                Some((*ty, vec![ne[1], ne[0]], data.clone())),
            );
        }
        if *ty == GgmlType::F32 {
            let n: u64 = ne.iter().product();
            // Half the rows (or half the length): a shape that disagrees with the hparams.
            let mut half = ne.clone();
            let last = half.len() - 1;
            if half[last] > 1 {
                half[last] /= 2;
                let len = (half.iter().product::<u64>() * 4) as usize;
                with(
                    format!("{name} half its last dim"),
                    Some((*ty, half, data[..len].to_vec())),
                );
            }
            // One more dimension of 1 is harmless; of 2 it is not.
            let mut more = ne.clone();
            more.push(2);
            let mut d = data.clone();
            d.extend_from_slice(data);
            with(format!("{name} an extra dim of 2"), Some((*ty, more, d)));
            // The same values as f16 under an f32 name: type changed.
            let h: Vec<u8> = (0..n as usize)
                .flat_map(|_| 0x3c00u16.to_le_bytes())
                .collect();
            with(
                format!("{name} as F16"),
                Some((GgmlType::F16, ne.clone(), h)),
            );
            // Types llama.cpp's matmuls and the graph builder may not take.
            if ne.len() == 2 {
                with(
                    format!("{name} as I32"),
                    Some((GgmlType(26), ne.clone(), data.clone())),
                );
                let h: Vec<u8> = (0..n as usize)
                    .flat_map(|_| 0x3f80u16.to_le_bytes())
                    .collect();
                with(
                    format!("{name} as BF16"),
                    Some((GgmlType::BF16, ne.clone(), h)),
                );
            }
            // NaN weights.
            let nan: Vec<u8> = (0..n as usize)
                .flat_map(|_| f32::NAN.to_le_bytes())
                .collect();
            with(format!("{name} all NaN"), Some((*ty, ne.clone(), nan)));
        }
        if *ty == GgmlType::Q8_0 {
            // A NaN scale (the f16 `d` that starts each 34-byte block) in the last block.
            let mut d = data.clone();
            let last = d.len() - 34;
            d[last..last + 2].copy_from_slice(&0x7e00u16.to_le_bytes());
            with(format!("{name} a NaN scale"), Some((*ty, ne.clone(), d)));
        }
    }
    // A tensor nobody asked for, and one with a layer index past block_count.
    let mut ts = tensors.clone();
    ts.push((
        "blk.99.attn_norm.weight".into(),
        GgmlType::F32,
        vec![tensors[1].2[0]],
        vec![0; tensors[1].2[0] as usize * 4],
    ));
    if let Some(b) = rewrite(&meta, &ts) {
        each("blk.99.attn_norm.weight added".into(), b);
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Ran,
    Refused,
    Panicked,
    Signal(i32),
    Hung,
}

/// Where a mutant is opened: `amend run` on a backend, or the scope model's open and encode
/// in a child of this test binary (the scope model has no CLI command of its own to load it).
#[derive(Clone, Copy, Debug)]
enum Opener {
    Run(&'static [&'static str]),
    Scope,
}

const LLAMA: Opener = Opener::Run(&[]);
const ORT_CPU: Opener = Opener::Run(&["--backend", "ort", "--ep", "cpu", "--no-onnx-cache"]);
const ORT_OPENVINO: Opener =
    Opener::Run(&["--backend", "ort", "--ep", "openvino", "--no-onnx-cache"]);
const PROMPT: &str = "the cat sat on the é\n";

/// Opens `model` in a child process, with a deadline.
fn run_child(model: &Path, how: Opener) -> (Outcome, String) {
    run_child_with(model, how, &[])
}

/// [`run_child`] with more arguments for `amend run`.
fn run_child_with(model: &Path, how: Opener, extra: &[&std::ffi::OsStr]) -> (Outcome, String) {
    outcome_of(child_command(model, how, 1, extra))
}

/// The child that opens `model` with `threads` compute threads.
fn child_command(model: &Path, how: Opener, threads: u32, extra: &[&std::ffi::OsStr]) -> Command {
    match how {
        Opener::Run(backend) => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_amend"));
            c.args(["run", "--model"]).arg(model).args([
                "--prompt",
                PROMPT,
                "--max-tokens",
                "3",
                "--threads",
                &threads.to_string(),
                "--ctx",
                "64",
            ]);
            c.args(backend).args(extra);
            c
        }
        Opener::Scope => {
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args([
                "--exact",
                "scope_model_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(SCOPE_CHILD, model)
            .env(SCOPE_CHILD_THREADS, threads.to_string());
            c
        }
    }
}

/// Runs `cmd` with a deadline and says how it ended.
fn outcome_of(mut cmd: Command) -> (Outcome, String) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .env_remove("AMEND_MODEL")
        .env("RUST_LOG", "off")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let deadline = Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = child.wait_with_output().unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let outcome = match status {
        None => Outcome::Hung,
        Some(s) if s.success() => Outcome::Ran,
        Some(s) => match s.signal() {
            Some(sig) => Outcome::Signal(sig),
            None if err.contains("panicked") && !err.contains(REFUSED) => Outcome::Panicked,
            None => Outcome::Refused,
        },
    };
    (outcome, err)
}

const SCOPE_CHILD: &str = "AMEND_HOSTILE_SCOPE_MODEL";
const SCOPE_CHILD_THREADS: &str = "AMEND_HOSTILE_SCOPE_THREADS";
/// What the scope-model child prints when the open or encode returned an error.
const REFUSED: &str = "scope model refused:";

/// The child side of [`Opener::Scope`]: a no-op unless the parent set the variable.
#[test]
fn scope_model_child() {
    let Some(path) = std::env::var_os(SCOPE_CHILD) else {
        return;
    };
    let threads = std::env::var(SCOPE_CHILD_THREADS)
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let r = amend_runtime::ScopeModel::open(&path, Some(threads)).and_then(|m| m.encode(PROMPT));
    if let Err(e) = r {
        println!("{REFUSED} {e}");
        std::process::exit(2);
    }
}

/// Opens every mutant of `bytes` on each opener; returns the failures (signal, panic, hang).
fn check(seed: &str, bytes: &[u8], scope: Scope, openers: &[Opener]) -> Vec<String> {
    let filter = std::env::var("HOSTILE_MODELS_FILTER").ok();
    check_filtered(seed, bytes, scope, filter.as_deref(), openers)
}

/// [`check`] for the tensor mutants whose description names `tensor` only.
fn check_only(seed: &str, bytes: &[u8], tensor: &str, openers: &[Opener]) -> Vec<String> {
    check_filtered(seed, bytes, Scope::All, Some(tensor), openers)
}

fn check_filtered(
    seed: &str,
    bytes: &[u8],
    scope: Scope,
    filter: Option<&str>,
    openers: &[Opener],
) -> Vec<String> {
    let mut bad = vec![];
    let (mut n, mut ran, mut refused) = (0, 0, 0);
    let path = mutant_dir().join(format!("{seed}-mutant.gguf"));
    mutants(bytes, scope, &mut |what, b| {
        if filter.is_some_and(|f| !what.contains(f)) {
            return;
        }
        n += 1;
        std::fs::write(&path, &b).unwrap();
        let mut outcomes = vec![];
        for &how in openers {
            let r = run_child(&path, how);
            outcomes.push(match &r.0 {
                Outcome::Ran => "ran".to_string(),
                Outcome::Refused => format!("refused ({})", r.1.lines().last().unwrap_or("")),
                other => format!("{other:?}"),
            });
            match r {
                (Outcome::Ran, _) => ran += 1,
                (Outcome::Refused, _) => refused += 1,
                (o, err) => {
                    // Keep the file for a look (the directory is per run, under the temp dir).
                    let keep = tmp().join(format!("crash-{seed}-{}.gguf", bad.len()));
                    std::fs::write(&keep, &b).unwrap();
                    let line = err
                        .lines()
                        .find(|l| l.contains("GGML_ASSERT") || l.contains("what()"))
                        .unwrap_or_else(|| err.lines().next().unwrap_or(""));
                    bad.push(format!(
                        "{seed}: {what} {how:?}: {o:?}: {line} ({})",
                        keep.display()
                    ));
                    eprintln!("FAIL {}", bad.last().unwrap());
                }
            }
        }
        // The backends take the same files: a file one runs and another refuses is a check
        // missing on one side.
        let ran_on = outcomes.iter().filter(|o| *o == "ran").count();
        if ran_on != 0 && ran_on != outcomes.len() {
            bad.push(format!(
                "{seed}: {what}: the backends disagree: {outcomes:?}"
            ));
            eprintln!("FAIL {}", bad.last().unwrap());
        }
    });
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(path.with_extension("gguf.amendfp"));
    let _ = std::fs::remove_dir(mutant_dir());
    eprintln!(
        "{seed}: {n} mutants x {} openers: ran {ran}, refused {refused}, failed {}",
        openers.len(),
        bad.len()
    );
    bad
}

/// Mutants are written to RAM where there is a tmpfs (the real models' are 25-253 MB each).
fn mutant_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let d = shm.join(format!("amend-hostile-models-{}", std::process::id()));
        if std::fs::create_dir_all(&d).is_ok() {
            return d;
        }
    }
    tmp()
}

/// Where scripts/fetch-*.sh install ($AMEND_CACHE, else ~/.cache/amend).
fn cache() -> PathBuf {
    amend_edits::fsutil::cache_dir().unwrap_or_default()
}

fn ort_installed() -> bool {
    let installed = cache().join("ort/cpu").exists();
    if !installed {
        assert!(
            !std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1"),
            "AMEND_REQUIRE_MODEL=1 but ONNX Runtime is not installed (make ort)"
        );
        eprintln!("ONNX Runtime is not installed: llama.cpp only");
    }
    installed
}

fn cache_file(name: &str) -> Option<PathBuf> {
    let p = cache().join(name);
    if p.exists() {
        return Some(p);
    }
    assert!(
        !std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1"),
        "AMEND_REQUIRE_MODEL=1 but {} is missing",
        p.display()
    );
    eprintln!("skipped: {} is missing", p.display());
    None
}

/// llama.cpp, and ONNX Runtime's CPU and OpenVINO EPs where installed (OpenVINO compiles the
/// graph again with its own plugin, and its own checks).
fn backends() -> Vec<Opener> {
    let mut backends = vec![LLAMA];
    if ort_installed() {
        backends.push(ORT_CPU);
        if cache().join("ort/openvino").exists() {
            backends.push(ORT_OPENVINO);
        }
    }
    backends
}

#[test]
fn tiny_model_mutants_never_crash_the_process() {
    let backends = backends();
    let mut bad = vec![];
    for (arch, ty) in [
        (Architecture::Llama, GgmlType::F32),
        (Architecture::Qwen3, GgmlType::F32),
        (Architecture::Qwen2, GgmlType::Q8_0),
    ] {
        let p = tmp().join(format!("seed-{}.gguf", arch.name()));
        write_tiny_model_typed(&p, arch, 7, ty).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        // The seed itself runs on every backend.
        for &b in &backends {
            let (o, err) = run_child(&p, b);
            assert_eq!(o, Outcome::Ran, "seed {arch:?} {b:?}: {err}");
        }
        bad.extend(check(arch.name(), &bytes, Scope::All, &backends));
    }
    // llama3-style RoPE frequency factors, which the ONNX Runtime backend reads on the host:
    // only mutants of that tensor (the rest is the llama seed's above).
    let p = tmp().join("seed-llama-rope.gguf");
    let freqs = [1.0f32, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0];
    amend_runtime::testutil::write_tiny_model_rope_freqs(&p, Architecture::Llama, 7, &freqs)
        .unwrap();
    for &b in &backends {
        let (o, err) = run_child(&p, b);
        assert_eq!(o, Outcome::Ran, "seed rope_freqs {b:?}: {err}");
    }
    let bytes = std::fs::read(&p).unwrap();
    bad.extend(check_only("llama-rope", &bytes, "rope_freqs", &backends));
    assert_none_crashed(&bad);
}

/// A graph named with `--onnx` is the caller's file, checked by its sidecar (sha256, length,
/// model fingerprint), not rebuilt: a damaged one whose sidecar was written to match is handed
/// to ONNX Runtime. Mutants of the tiny model's exported graph: every integer attribute `axis`
/// set to 0, 1 and 3, and 300 random byte changes in the graph's structure (its first 4 KB and
/// last 8 KB; the weights between are numbers only), each run on the CPU and OpenVINO EPs.
/// OpenVINO ran a graph with a wrong concatenation axis, and amend panicked reading its empty
/// logits; every output is now checked before it is read.
#[test]
fn named_graph_mutants_never_crash_the_process() {
    use std::ffi::OsStr;
    if !ort_installed() {
        return;
    }
    let mut eps: Vec<&str> = vec!["cpu"];
    if cache().join("ort/openvino").exists() {
        eps.push("openvino");
    }
    let dir = tmp().join("named-graph");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("m.gguf");
    write_tiny_model_typed(&model, Architecture::Llama, 7, GgmlType::F32).unwrap();
    let graph = dir.join("m.onnx");
    let out = Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(["export-onnx", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(&graph)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let good = std::fs::read(&graph).unwrap();
    let sidecar = std::fs::read_to_string(dir.join("m.onnx.amend")).unwrap();
    let mut mutants: Vec<(String, Vec<u8>)> = vec![];
    let pattern = b"\n\x04axis\x18";
    for at in (0..good.len() - pattern.len()).filter(|&i| &good[i..i + pattern.len()] == pattern) {
        for v in [0u8, 1, 3] {
            let mut b = good.clone();
            b[at + pattern.len()] = v;
            mutants.push((format!("axis at {at} = {v}"), b));
        }
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let structure = |r: u64| {
        let r = r as usize;
        if r.is_multiple_of(2) {
            r / 2 % 4096
        } else {
            good.len() - 1 - r / 2 % 8192
        }
    };
    for i in 0..300 {
        let mut b = good.clone();
        let what = match next() % 3 {
            0 => {
                for _ in 0..1 + next() % 3 {
                    let at = structure(next());
                    b[at] ^= 1 << (next() % 8);
                }
                "bit flips"
            }
            1 => {
                let at = structure(next());
                b[at] = [0u8, 0xff, 0x7f, 0x80][(next() % 4) as usize];
                "a byte set"
            }
            _ => {
                b.truncate(structure(next()));
                "truncated"
            }
        };
        mutants.push((format!("random {i}: {what}"), b));
    }
    let path = dir.join("mutant.onnx");
    let (mut ran, mut refused, mut bad) = (0, 0, vec![]);
    for (what, b) in &mutants {
        std::fs::write(path.with_extension("onnx.amend"), &sidecar).unwrap();
        amend_runtime::testutil::forge_graph_sidecar(&path, b).unwrap();
        for ep in &eps {
            let args = [
                OsStr::new("--backend"),
                OsStr::new("ort"),
                OsStr::new("--ep"),
                OsStr::new(ep),
                OsStr::new("--onnx"),
                path.as_os_str(),
            ];
            match run_child_with(&model, LLAMA, &args) {
                (Outcome::Ran, _) => ran += 1,
                (Outcome::Refused, _) => refused += 1,
                (o, err) => {
                    let keep = tmp().join(format!("crash-graph-{}.onnx", bad.len()));
                    std::fs::write(&keep, b).unwrap();
                    let line = err.lines().find(|l| l.contains("panicked")).unwrap_or("");
                    bad.push(format!(
                        "{what} on {ep}: {o:?}: {line} ({})",
                        keep.display()
                    ));
                    eprintln!("FAIL {}", bad.last().unwrap());
                }
            }
        }
    }
    eprintln!(
        "named graphs: {} mutants x {} EPs: ran {ran}, refused {refused}, failed {}",
        mutants.len(),
        eps.len(),
        bad.len()
    );
    assert!(refused > 0 && ran > 0, "the mutants exercised nothing");
    assert_none_crashed(&bad);
}

fn assert_none_crashed(bad: &[String]) {
    assert!(
        bad.is_empty(),
        "{} mutants crashed:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// The scope model (a `bert` encoder with a WordPiece vocabulary, opened by the runtime when a
/// bundle's memories need it): its metadata, and the tensors outside layers 1 and up.
#[test]
fn scope_model_mutants_never_crash_the_process() {
    let Some(p) = cache_file("all-minilm-l6-v2-q8_0.gguf") else {
        return;
    };
    let bytes = std::fs::read(&p).unwrap();
    let (o, err) = run_child(&p, Opener::Scope);
    assert_eq!(o, Outcome::Ran, "the scope model itself: {err}");
    let bad = check("scope", &bytes, Scope::FirstLayer, &[Opener::Scope]);
    assert_none_crashed(&bad);
}

/// The default model's metadata (each mutant a 253 MB copy: run with HOSTILE_MODELS_REAL=1).
#[test]
fn real_model_metadata_mutants_never_crash_the_process() {
    if std::env::var("HOSTILE_MODELS_REAL").is_err() {
        eprintln!("skipped: set HOSTILE_MODELS_REAL=1 (253 MB per mutant)");
        return;
    }
    let Some(p) = cache_file("gemma3-270m-q4_k_m.gguf") else {
        return;
    };
    let bytes = std::fs::read(&p).unwrap();
    let mut backends = vec![LLAMA];
    if std::env::var("HOSTILE_MODELS_REAL").as_deref() == Ok("ort") {
        backends.push(ORT_CPU);
    }
    // `HOSTILE_MODELS_REAL_FILTER=TEXT`: only the mutants whose label holds TEXT (e.g.
    // " added as " for the added keys).
    let filter = std::env::var("HOSTILE_MODELS_REAL_FILTER").ok();
    let bad = check_filtered(
        "gemma3",
        &bytes,
        Scope::Metadata,
        filter.as_deref(),
        &backends,
    );
    assert_none_crashed(&bad);
}

/// A bundle's GGUF-LoRA goes whole to llama.cpp's adapter loader (and, on ONNX Runtime, into the
/// graph's low-rank slots), and a signing key can ship any adapter the format allows. Mutants of
/// a valid adapter for the tiny model, each signed into a bundle bound to it and applied by `amend
/// run` in a child on llama.cpp and on ONNX Runtime's CPU and OpenVINO EPs: every metadata key and tensor
/// mutated as the models' are, plus adapters on tensors the model lacks or treats specially
/// (the token embedding, whose adapter llama.cpp applies by row lookup), of other shapes.
#[test]
fn gguf_lora_bundle_mutants_never_crash_the_process() {
    use amend_edits::ed25519_dalek::SigningKey;
    use amend_edits::families::{LowRank, LowRankTensor};
    use amend_edits::keys::to_hex;
    use amend_edits::{BundleBuilder, BundleMeta, Site};
    use amend_runtime::testutil::{TINY_N_EMBD, TINY_N_FF};
    use std::ffi::OsStr;
    let backends = backends();
    let dir = tmp().join("lora");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("m.gguf");
    write_tiny_model_typed(&model, Architecture::Llama, 7, GgmlType::F32).unwrap();
    let binding = amend_edits::fingerprint::model_binding(&model).unwrap();
    let n_vocab = {
        let bytes = std::fs::read(&model).unwrap();
        let f = GgufFile::parse(&bytes).unwrap();
        f.tensor("token_embd.weight").unwrap().ne[1] as usize
    };
    let key = SigningKey::from_bytes(&[9; 32]);
    let pubkey = dir.join("k.pub");
    std::fs::write(&pubkey, to_hex(key.verifying_key().as_bytes()) + "\n").unwrap();
    let bundle = dir.join("b.amend");
    let (ff, e) = (TINY_N_FF as usize, TINY_N_EMBD as usize);
    let vals = |n: usize, s: f32| (0..n).map(|i| ((i * 7919 % 13) as f32 - 6.0) * s).collect();
    let (a0, b0): (Vec<f32>, Vec<f32>) = (vals(2 * ff, 0.05), vals(e * 2, 0.05));
    let (a1, b1): (Vec<f32>, Vec<f32>) = (vals(2 * e, 0.05), vals(e * 2, 0.05));
    let seed = LowRank::new(vec![
        LowRankTensor {
            name: "blk.0.ffn_down.weight",
            n_in: ff,
            n_out: e,
            rank: 2,
            a: &a0,
            b: &b0,
            alpha: 2.0,
        },
        LowRankTensor {
            name: "blk.1.attn_q.weight",
            n_in: e,
            n_out: e,
            rank: 2,
            a: &a1,
            b: &b1,
            alpha: 2.0,
        },
    ])
    .unwrap()
    .to_gguf_lora("llama");
    let args = [
        OsStr::new("--bundle"),
        bundle.as_os_str(),
        OsStr::new("--pubkey"),
        pubkey.as_os_str(),
    ];
    use std::cell::{Cell, RefCell};
    let (n, ran, refused, bad) = (
        Cell::new(0),
        Cell::new(0),
        Cell::new(0),
        RefCell::new(vec![]),
    );
    let apply = |what: String, blob: Vec<u8>| {
        n.set(n.get() + 1);
        let mut bb = BundleBuilder::new(BundleMeta {
            bundle_id: "lora".into(),
            channel: "main".into(),
            version: 1,
            created: 0,
            not_before: 0,
            expires: u64::MAX,
            model: binding.clone(),
        });
        let p = bb.add_gguf_lora(blob.clone());
        bb.add_edit("e0", 0, Site::FfnOutput, "p", "t", p, 0, 1);
        std::fs::write(&bundle, bb.build_signed(&key).unwrap().as_slice()).unwrap();
        for &how in &backends {
            match run_child_with(&model, how, &args) {
                (Outcome::Ran, _) => ran.set(ran.get() + 1),
                (Outcome::Refused, _) => refused.set(refused.get() + 1),
                (o, err) => {
                    let mut bad = bad.borrow_mut();
                    let keep = tmp().join(format!("crash-lora-{}.gguf", bad.len()));
                    std::fs::write(&keep, &blob).unwrap();
                    let line = err
                        .lines()
                        .find(|l| l.contains("GGML_ASSERT") || l.contains("what()"))
                        .unwrap_or_else(|| err.lines().next().unwrap_or(""));
                    bad.push(format!(
                        "lora: {what} {how:?}: {o:?}: {line} ({})",
                        keep.display()
                    ));
                    eprintln!("FAIL {}", bad.last().unwrap());
                }
            }
        }
    };
    // The seed applies on every backend.
    apply("the seed".into(), seed.clone());
    assert_eq!(
        (ran.get(), n.get()),
        (backends.len(), 1),
        "the seed adapter did not run: {:?}",
        bad.borrow()
    );
    mutants(&seed, Scope::All, &mut |what, blob| apply(what, blob));
    // Adapters a converter would not write: shapes that pair up (so the format's checks pass)
    // on tensors the model lacks, has in another shape, or applies by row lookup.
    let raw = |tensors: &[(&str, Vec<u64>, Vec<u64>)]| {
        let mut w = GgufWriter::new();
        w.add("general.architecture", "llama")
            .add("general.type", "adapter")
            .add("adapter.type", "lora")
            .add("adapter.lora.alpha", 1.0f32);
        for (name, na, nb) in tensors {
            let len = |ne: &Vec<u64>| ne.iter().product::<u64>() as usize;
            w.add_tensor_f32(&format!("{name}.lora_a"), na, &vals(len(na), 0.01))
                .unwrap()
                .add_tensor_f32(&format!("{name}.lora_b"), nb, &vals(len(nb), 0.01))
                .unwrap();
        }
        w.to_bytes()
    };
    let (e64, ff64, v64) = (e as u64, ff as u64, n_vocab as u64);
    for (what, tensors) in [
        (
            "a layer past the model's",
            vec![("blk.7.ffn_down.weight", vec![ff64, 2], vec![2, e64])],
        ),
        (
            "a tensor the model lacks",
            vec![("blk.0.ffn_gate_exps.weight", vec![e64, 2], vec![2, ff64])],
        ),
        (
            "a norm (1-D in the model)",
            vec![("output_norm.weight", vec![e64, 2], vec![2, e64])],
        ),
        (
            "transposed",
            vec![("blk.0.ffn_down.weight", vec![e64, 2], vec![2, ff64])],
        ),
        (
            "the output projection",
            vec![("output.weight", vec![e64, 2], vec![2, v64])],
        ),
        (
            "the token embedding as a matrix",
            vec![("token_embd.weight", vec![e64, 2], vec![2, v64])],
        ),
        // llama.cpp checks a token-embedding adapter as B [_, n_embd] and A [_, n_vocab] only,
        // then multiplies B by A's rows: unless A's rows are B's width, ggml asserts.
        (
            "the token embedding by rows",
            vec![("token_embd.weight", vec![5, v64], vec![v64, e64])],
        ),
        (
            "the token embedding by rows, agreeing",
            vec![("token_embd.weight", vec![v64, v64], vec![v64, e64])],
        ),
    ] {
        apply(what.into(), raw(&tensors));
    }
    let bad = bad.into_inner();
    eprintln!(
        "GGUF-LoRA bundles: {} adapters x {} backends: ran {}, refused {}, failed {}",
        n.get(),
        backends.len(),
        ran.get(),
        refused.get(),
        bad.len()
    );
    assert!(refused.get() > 0, "the mutants exercised nothing");
    assert_none_crashed(&bad);
}

/// A resource limit a child runs under (`setrlimit` between fork and exec).
#[derive(Clone, Copy)]
enum Limit {
    /// `RLIMIT_NPROC`: processes and threads of the user.
    Threads(u64),
    /// `RLIMIT_AS`, bytes.
    AddressSpace(u64),
    /// `RLIMIT_FSIZE`, bytes.
    FileSize(u64),
}

/// Runs `cmd` under `limit`, as `nobody` (uid and gid 65534, no groups) when `as_nobody`.
fn with_limit(cmd: &mut Command, limit: Limit, as_nobody: bool) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if as_nobody
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0)
            {
                return fail();
            }
            let (resource, value) = match limit {
                Limit::Threads(n) => (libc::RLIMIT_NPROC, n),
                Limit::AddressSpace(n) => (libc::RLIMIT_AS, n),
                Limit::FileSize(n) => (libc::RLIMIT_FSIZE, n),
            };
            let lim = libc::rlimit {
                rlim_cur: value as libc::rlim_t,
                rlim_max: value as libc::rlim_t,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return fail();
            }
            Ok(())
        });
    }
}

/// A host app at its thread limit (`RLIMIT_NPROC`, a cgroup's `pids.max`, systemd's
/// `TasksMax`). ggml started a llama.cpp context's threads at every decode and aborted the
/// process (`GGML_ASSERT(rc == 0)`, signal 6) when it could not; the ONNX Runtime backend's
/// open panicked spawning a helper thread. Each child runs with no room for one more thread
/// (`RLIMIT_NPROC` 1, as `nobody` when this test is root, whom the limit does not bind): one
/// compute thread runs, more are refused at open with an error naming the thread limit.
#[test]
fn thread_limit_never_crashes_the_process() {
    let root = unsafe { libc::geteuid() } == 0;
    // Everything the child reads, where `nobody` can read it.
    let dir = tmp().join("thread-limit");
    let cache_dir = dir.join("cache");
    std::fs::create_dir_all(&cache_dir).unwrap();
    let link = |from: &Path, to: &Path| {
        if !to.exists() && std::fs::hard_link(from, to).is_err() {
            std::fs::copy(from, to).unwrap();
        }
    };
    let model = dir.join("tiny.gguf");
    write_tiny_model_typed(&model, Architecture::Llama, 7, GgmlType::F32).unwrap();
    let mut openers = vec![LLAMA];
    if ort_installed() {
        let ort = cache_dir.join("ort/cpu");
        std::fs::create_dir_all(&ort).unwrap();
        for e in std::fs::read_dir(cache().join("ort/cpu")).unwrap() {
            let e = e.unwrap();
            link(&e.path(), &ort.join(e.file_name()));
        }
        openers.push(ORT_CPU);
    }
    let scope = cache_file("all-minilm-l6-v2-q8_0.gguf").map(|p| {
        let to = dir.join("scope.gguf");
        link(&p, &to);
        to
    });
    if root {
        // `nobody` writes the fingerprint caches here (and reads the rest).
        let mode = |p: &Path, m: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        };
        mode(&tmp(), 0o755);
        mode(&dir, 0o777);
        mode(&cache_dir, 0o777);
    }
    let limited = |model: &Path, how: Opener, threads: u32| {
        let mut cmd = child_command(model, how, threads, &[]);
        cmd.env("AMEND_CACHE", &cache_dir);
        // Root is not bound by RLIMIT_NPROC: the child runs as `nobody`.
        with_limit(&mut cmd, Limit::Threads(1), root);
        outcome_of(cmd)
    };
    let mut cases: Vec<(&Path, Opener)> = openers.iter().map(|&o| (model.as_path(), o)).collect();
    if let Some(s) = &scope {
        cases.push((s, Opener::Scope));
    }
    for (path, how) in cases {
        let (o, err) = limited(path, how, 1);
        assert_eq!(
            o,
            Outcome::Ran,
            "{how:?}, 1 thread, at the thread limit: {err}"
        );
        for threads in [2, 4] {
            let (o, err) = limited(path, how, threads);
            assert_eq!(o, Outcome::Refused, "{how:?}, {threads} threads: {err}");
            assert!(
                err.contains("thread limit") || err.contains("pthread_create failed"),
                "{how:?}, {threads} threads: the error does not say why: {err}"
            );
        }
    }
}

/// A process whose address space cannot hold the model (`RLIMIT_AS`: a 32-bit app, a sandbox).
/// The ONNX Runtime backend's model-sized buffers (the model's bytes, each tensor's conversion,
/// the serialized graph) aborted the process (`memory allocation of 253113024 bytes failed`);
/// they are now checked and refused. llama.cpp's own load fails cleanly. Smaller Rust
/// allocations still abort when they fail, so this limit is set below the model's size, where
/// the first large buffer is the one refused.
#[test]
fn address_space_smaller_than_the_model_is_an_error() {
    let Some(model) = cache_file("gemma3-270m-q4_k_m.gguf") else {
        return;
    };
    // (opener, whether amend's own check gives the message)
    let mut openers = vec![(LLAMA, false)];
    if ort_installed() {
        openers.push((ORT_CPU, true));
    }
    for (how, ours) in openers {
        let mut cmd = child_command(&model, how, 1, &[]);
        with_limit(&mut cmd, Limit::AddressSpace(300 << 20), false);
        let (o, err) = outcome_of(cmd);
        assert_eq!(
            o,
            Outcome::Refused,
            "{how:?} in 300 MB of address space: {err}"
        );
        if ours {
            assert!(err.contains("not enough memory"), "{how:?}: {err}");
        }
    }
}

/// A process with a file size limit (`RLIMIT_FSIZE`). The kernel does not fail a write past it:
/// it sends `SIGXFSZ`, which ends the process. amend wrote the model's private copy (a memfd is
/// a file) and the ONNX graph cache beside the model on its own, so opening a model killed the
/// host (signal 25). Now the private copy is skipped (llama.cpp maps the file, with a warning),
/// a cache file over the limit is not written (the model runs), and a file the user asked for
/// (`export-onnx --out`) is a clear error.
#[test]
fn file_size_limit_never_kills_the_process() {
    let dir = tmp().join("file-size-limit");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("tiny.gguf");
    write_tiny_model_typed(&model, Architecture::Llama, 7, GgmlType::F32).unwrap();
    let limit = 4096;
    assert!(std::fs::metadata(&model).unwrap().len() > limit);
    let mut openers = vec![LLAMA];
    if ort_installed() {
        // The graph cache on: it writes the tiny graph (more than the limit) beside the model.
        openers.push(Opener::Run(&["--backend", "ort", "--ep", "cpu"]));
    }
    if let Some(scope) = cache_file("all-minilm-l6-v2-q8_0.gguf") {
        let (o, err) = {
            let mut cmd = child_command(&scope, Opener::Scope, 1, &[]);
            with_limit(&mut cmd, Limit::FileSize(limit), false);
            outcome_of(cmd)
        };
        assert_eq!(
            o,
            Outcome::Ran,
            "scope model under RLIMIT_FSIZE {limit}: {err}"
        );
    }
    for how in openers {
        let mut cmd = child_command(&model, how, 1, &[]);
        with_limit(&mut cmd, Limit::FileSize(limit), false);
        let (o, err) = outcome_of(cmd);
        assert_eq!(o, Outcome::Ran, "{how:?} under RLIMIT_FSIZE {limit}: {err}");
    }
    if ort_installed() {
        let out_path = dir.join("exported.onnx");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amend"));
        cmd.args(["export-onnx", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out_path);
        with_limit(&mut cmd, Limit::FileSize(limit), false);
        let (o, err) = outcome_of(cmd);
        assert_eq!(o, Outcome::Refused, "export-onnx --out: {err}");
        assert!(err.contains("file size limit"), "{err}");
        assert!(!out_path.exists(), "a cut graph was left");
    }
}

/// ONNX Runtime 1.29+ (the 1.32.0 CPU wheel `make ort` installs) wrote a persistent device id
/// and an SQLite event store for Microsoft's telemetry collector under
/// `$HOME/.cache/Microsoft/DeveloperTools/.onnxruntime` from inside the host app, unasked.
/// amend sets `ORT_DISABLE_TELEMETRY=1` before loading the library unless the process has the
/// variable: opening and running a model on each ONNX Runtime build leaves `$HOME` empty.
#[test]
fn onnx_runtime_writes_nothing_to_home() {
    if !ort_installed() {
        return;
    }
    let mut openers = vec![ORT_CPU];
    if cache().join("ort/openvino").exists() {
        openers.push(ORT_OPENVINO);
    }
    let dir = tmp().join("telemetry");
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let model = dir.join("tiny.gguf");
    write_tiny_model_typed(&model, Architecture::Llama, 7, GgmlType::F32).unwrap();
    for how in openers {
        let mut cmd = child_command(&model, how, 1, &[]);
        cmd.env("HOME", &home)
            .env("AMEND_CACHE", cache())
            .env_remove(amend_runtime::onnxruntime::ORT_TELEMETRY_VAR);
        let (o, err) = outcome_of(cmd);
        assert_eq!(o, Outcome::Ran, "{how:?}: {err}");
        let left: Vec<_> = walk(&home);
        assert!(left.is_empty(), "{how:?} wrote under $HOME: {left:?}");
    }
}

/// Every path below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}
