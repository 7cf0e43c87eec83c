//! The ONNX Runtime backend (issue 13): the same GGUF run by ONNX Runtime on an execution
//! provider (CPU, OpenVINO, QNN, CoreML, NNAPI, XNNPACK), from a graph built from the GGUF with
//! its exact weights ([`graph`], [`quant`]), written as an ONNX file by [`onnx`].
//!
//! - The library is loaded at run time from a path ([`load_library`]); `ort` never downloads
//!   anything. One library per process (ONNX Runtime has one environment per process).
//! - Tokenization is llama.cpp's, from a vocabulary-only load of the same file, so both backends
//!   tokenize identically.
//! - [`OrtModel`] holds the built ONNX Runtime session; [`OrtSession`] a conversation's KV cache
//!   (graph inputs and outputs) and its last logits.

pub mod embedding;
pub mod graph;
pub mod onnx;
pub mod quant;
pub mod slots;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use amend_edits::gguf::{GgufFile, ModelHparams};
use ort::session::Session as OrtRunner;
use ort::value::{DynValue, Tensor};

pub use graph::{Emulation, Profile};
pub use slots::{CodebookSlot, NeuronSlot, SlotCapacity, SlotLayout};

use crate::arch::Architecture;
use crate::config::ModelConfig;
use crate::editing::{EditHost, EditPlan, PlanTarget, SessionEdits};
use crate::error::RuntimeError;
use crate::model::{Model, ModelOptions};
use crate::session::{EvalOptions, Logits};
use crate::Token;

/// An execution provider, as named on the command line (`--ep`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ep {
    Cpu,
    /// OpenVINO with a device (`CPU`, `GPU`, `NPU`; default `CPU`).
    OpenVino(String),
    Qnn,
    CoreMl,
    Nnapi,
    Xnnpack,
}

/// An OpenVINO device name as its EP takes it: CPU, GPU or NPU, optionally `.N`, or AUTO:,
/// HETERO: or MULTI: with a comma list of those; written in any case, given upper case. The EP
/// takes no node of the graph on a name it does not know, so without this check a typo
/// surfaced as "nodes assigned to the CPU EP" (or as a silent CPU fallback).
fn openvino_device(d: &str) -> Result<String, RuntimeError> {
    let up = d.trim().to_ascii_uppercase();
    let plain = |n: &str| {
        let (root, index) = n.split_once('.').unwrap_or((n, "0"));
        matches!(root, "CPU" | "GPU" | "NPU")
            && !index.is_empty()
            && index.bytes().all(|b| b.is_ascii_digit())
    };
    let ok = match up.split_once(':') {
        Some(("AUTO" | "HETERO" | "MULTI", list)) => list.split(',').all(plain),
        Some(_) => false,
        None => plain(&up) || up == "AUTO",
    };
    if ok {
        Ok(up)
    } else {
        Err(RuntimeError::InvalidOptions(format!(
            "OpenVINO device `{d}`: expected CPU, GPU or NPU (optionally .N, e.g. GPU.1), or \
             AUTO:, HETERO: or MULTI: with a comma list of them"
        )))
    }
}

impl Ep {
    /// Whether the loaded ONNX Runtime library was built with this EP (None: it could not say).
    fn in_library(&self) -> Option<bool> {
        use ort::ep::{self, ExecutionProvider};
        match self {
            Ep::Cpu => Some(true),
            Ep::OpenVino(_) => ep::OpenVINO::is_available().ok(),
            Ep::Qnn => ep::QNN::is_available().ok(),
            Ep::CoreMl => ep::CoreML::is_available().ok(),
            Ep::Nnapi => ep::NNAPI::is_available().ok(),
            Ep::Xnnpack => ep::XNNPACK::is_available().ok(),
        }
    }

    pub fn parse(s: &str) -> Result<Ep, RuntimeError> {
        let (name, dev) = match s.split_once(':') {
            Some((n, d)) => (n, Some(d)),
            None => (s, None),
        };
        let ep = match name.to_ascii_lowercase().as_str() {
            "cpu" => Ep::Cpu,
            "openvino" => Ep::OpenVino(openvino_device(dev.unwrap_or("CPU"))?),
            "qnn" => Ep::Qnn,
            "coreml" => Ep::CoreMl,
            "nnapi" => Ep::Nnapi,
            "xnnpack" => Ep::Xnnpack,
            _ => {
                return Err(RuntimeError::InvalidOptions(format!(
                    "unknown execution provider `{s}` (cpu, openvino[:DEVICE], qnn, coreml, nnapi, xnnpack)"
                )))
            }
        };
        if dev.is_some() && !matches!(ep, Ep::OpenVino(_)) {
            return Err(RuntimeError::InvalidOptions(format!(
                "execution provider `{name}` takes no device (`{s}`)"
            )));
        }
        Ok(ep)
    }

    pub fn name(&self) -> String {
        match self {
            Ep::Cpu => "cpu".into(),
            Ep::OpenVino(d) => format!("openvino:{d}"),
            Ep::Qnn => "qnn".into(),
            Ep::CoreMl => "coreml".into(),
            Ep::Nnapi => "nnapi".into(),
            Ep::Xnnpack => "xnnpack".into(),
        }
    }

    /// Provider options amend sets unless [`OrtOptions::ep_options`] gives the same key.
    /// `n_threads` is [`OrtOptions::n_threads`]: OpenVINO takes it as its own option (ONNX
    /// Runtime's intra-op threads do not reach it).
    pub fn default_options(&self, n_threads: Option<usize>) -> Vec<(String, String)> {
        match self {
            // OpenVINO's CPU device requantizes activations to int8 in blocks of its own
            // (dynamic quantization): rounding noise independent of llama.cpp's, on top of it.
            // Off, the graph computes with f32 activations: top-1 agreement with llama.cpp
            // 96.28 -> 96.81%, mean logit error 0.230 -> 0.190 (docs/backends.md).
            Ep::OpenVino(_) => {
                let mut o = vec![(
                    "load_config".to_string(),
                    r#"{"CPU":{"DYNAMIC_QUANTIZATION_GROUP_SIZE":"0"}}"#.to_string(),
                )];
                if let Some(n) = n_threads {
                    o.push(("num_of_threads".into(), n.to_string()));
                }
                o
            }
            _ => Vec::new(),
        }
    }

    /// amend's default options, then `extra` (a same key replaces the default); checked.
    fn provider_options(
        &self,
        n_threads: Option<usize>,
        extra: &[(String, String)],
    ) -> Result<Vec<(String, String)>, RuntimeError> {
        let mut options = self.default_options(n_threads);
        for (k, v) in extra {
            if k.is_empty() {
                return Err(RuntimeError::InvalidOptions(format!(
                    "{}: a provider option needs a key (`={v}`)",
                    self.name()
                )));
            }
            // The library takes C strings: a NUL would cut the option (`ort` panics on it).
            if k.contains('\0') || v.contains('\0') {
                return Err(RuntimeError::InvalidOptions(format!(
                    "{}: provider option {k:?} holds a NUL byte",
                    self.name()
                )));
            }
            options.retain(|(d, _)| d != k);
            options.push((k.clone(), v.clone()));
        }
        if !options.is_empty() && matches!(self, Ep::Cpu | Ep::Nnapi) {
            return Err(RuntimeError::InvalidOptions(format!(
                "{} takes no provider options (got `{}`)",
                self.name(),
                options[0].0
            )));
        }
        Ok(options)
    }

    /// The EP with its [`Ep::provider_options`].
    fn dispatch(
        &self,
        n_threads: Option<usize>,
        extra: &[(String, String)],
    ) -> Result<Option<ort::ep::ExecutionProviderDispatch>, RuntimeError> {
        use ort::ep::{self, ArbitrarilyConfigurableExecutionProvider as Configure};
        let options = self.provider_options(n_threads, extra)?;
        fn with<E: Configure>(mut e: E, options: &[(String, String)]) -> E {
            for (k, v) in options {
                e = e.with_arbitrary_config(k, v);
            }
            e
        }
        Ok(Some(match self {
            Ep::Cpu => return Ok(None),
            Ep::OpenVino(d) => with(ep::OpenVINO::default().with_device_type(d), &options).build(),
            Ep::Qnn => with(ep::QNN::default(), &options).build(),
            Ep::CoreMl => with(ep::CoreML::default(), &options).build(),
            Ep::Nnapi => ep::NNAPI::default().build(),
            Ep::Xnnpack => with(ep::XNNPACK::default(), &options).build(),
        }))
    }
}

/// Where scripts/fetch-ort.sh puts the library an EP needs (`$AMEND_ORT_LIB` overrides).
pub fn default_library(ep: &Ep) -> PathBuf {
    if let Some(p) = std::env::var_os("AMEND_ORT_LIB") {
        return PathBuf::from(p);
    }
    let cache = amend_edits::fsutil::cache_dir().unwrap_or_default();
    match ep {
        Ep::OpenVino(_) => cache.join("ort/openvino/libonnxruntime.so.1.24.1"),
        _ => cache.join("ort/cpu/libonnxruntime.so.1.32.0"),
    }
}

struct Loaded {
    path: PathBuf,
    env: ort::environment::Environment,
    /// `1.24.1`, the library's own version string (`unknown` if it does not say).
    version: String,
}

/// The version of the ONNX Runtime library this process loaded (`None`: none loaded yet).
pub fn library_version() -> Option<&'static str> {
    LOADED.get().map(|l| l.version.as_str())
}

/// The version string of the ONNX Runtime library at `path`, which this process has loaded
/// (`OrtGetApiBase()->GetVersionString()`, e.g. `1.24.1`); `unknown` if it cannot be read or is
/// not a plain dotted number.
fn version_of(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let read = || -> Option<String> {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: RTLD_NOLOAD only returns a handle to a library already mapped (ort loaded it
        // above; nothing is initialized twice), and the matching dlclose drops that reference.
        // OrtGetApiBase has this signature in every ONNX Runtime release (ort_sys declares it),
        // returns a static struct, and GetVersionString a static NUL-terminated string.
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if h.is_null() {
                return None;
            }
            let sym = libc::dlsym(h, c"OrtGetApiBase".as_ptr());
            let v = if sym.is_null() {
                None
            } else {
                let get: unsafe extern "C" fn() -> *const ort::sys::OrtApiBase =
                    std::mem::transmute(sym);
                let base = get();
                if base.is_null() {
                    None
                } else {
                    let s = ((*base).GetVersionString)();
                    (!s.is_null())
                        .then(|| std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
                }
            };
            libc::dlclose(h);
            v
        }
    };
    plain_version(read().as_deref().unwrap_or(""))
}

/// `v` if it is a plain dotted version (`1.24.1`), else `unknown` (it becomes part of an id).
fn plain_version(v: &str) -> String {
    if !v.is_empty() && v.len() <= 32 && v.chars().all(|c| c.is_ascii_digit() || c == '.') {
        v.to_string()
    } else {
        "unknown".to_string()
    }
}

/// ONNX Runtime keeps a session configuration entry whose key it does not know and never reads
/// it, so a misspelt key (`session.intra_op.allow_spining`) would silently do nothing. The keys
/// it reads are string literals in its libraries: a key found in none of them (the loaded
/// library and the `libonnxruntime_providers_*` beside it) is refused. For `ep.NAME.OPTION`,
/// which ONNX Runtime builds from an EP's name, OPTION must be found instead.
fn check_session_config(library: &Path, entries: &[(String, String)]) -> Result<(), RuntimeError> {
    if entries.is_empty() {
        return Ok(());
    }
    let library = std::fs::canonicalize(library).unwrap_or_else(|_| library.to_path_buf());
    let mut files = vec![library.clone()];
    if let Some(dir) = library.parent().and_then(|d| std::fs::read_dir(d).ok()) {
        let mut providers: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime_providers_"))
            })
            .collect();
        providers.sort();
        files.extend(providers);
    }
    // The loaded library is a regular file (load_library checked it); a provider library
    // that cannot be read only narrows what is known.
    let images: Vec<Vec<u8>> = files
        .iter()
        .filter_map(|f| amend_edits::fsutil::read_regular(f, 1 << 31).ok())
        .collect();
    // A literal ends with its NUL; the linker may share its tail with a longer string, so
    // only the end is anchored.
    let known = |name: &str| {
        let mut needle = name.as_bytes().to_vec();
        needle.push(0);
        images
            .iter()
            .any(|img| img.windows(needle.len()).any(|w| w == needle.as_slice()))
    };
    for (key, _) in entries {
        let option = key
            .strip_prefix("ep.")
            .and_then(|rest| rest.split_once('.'))
            .map(|(_, option)| option);
        // Every key ONNX Runtime defines is `AREA[.SUBAREA...].NAME`.
        let shaped = key.contains('.') && !key.starts_with('.') && !key.ends_with('.');
        if !shaped || !(known(key) || option.is_some_and(|o| !o.is_empty() && known(o))) {
            return Err(RuntimeError::InvalidOptions(format!(
                "ONNX Runtime session configuration key {key:?} is not one this ONNX Runtime \
                 ({}) reads: it is in none of its libraries, and ONNX Runtime would ignore it \
                 without a word (check the spelling against \
                 onnxruntime_session_options_config_keys.h of this version)",
                library.display()
            )));
        }
    }
    Ok(())
}

static LOADED: OnceLock<Loaded> = OnceLock::new();
static LOAD_LOCK: Mutex<()> = Mutex::new(());

/// ONNX Runtime's telemetry opt-out. Since 1.29 its builds for Linux, macOS, Android and iOS
/// (the PyPI 1.32.0 wheel `make ort` installs among them) keep a persistent device id and an
/// SQLite event store under `~/.cache/Microsoft/DeveloperTools/.onnxruntime` and upload events
/// to Microsoft's collector; only this variable, set before its first environment, turns all of
/// that off (`DisableTelemetryEvents` comes after the environment, and the id, exist). An edge
/// runtime inside someone else's app must not do that on its own: [`load_library`] sets it to
/// `1` unless the process already has it (a host that wants ONNX Runtime's telemetry sets it to
/// `0` first).
pub const ORT_TELEMETRY_VAR: &str = "ORT_DISABLE_TELEMETRY";

/// Whether ONNX Runtime's telemetry stays off: the variable is set to `1` where the process
/// has none (once, under `LOAD_LOCK`, before the library is loaded), and any value but `0`
/// counts as off. Setting a variable races with `getenv` on other threads: a host that starts
/// such threads before its first ONNX Runtime model sets the variable itself at startup, and
/// then amend leaves the environment alone.
fn disable_telemetry_unless_set() -> bool {
    match std::env::var_os(ORT_TELEMETRY_VAR) {
        Some(v) => v != "0",
        None => {
            std::env::set_var(ORT_TELEMETRY_VAR, "1");
            true
        }
    }
}

/// Loads the ONNX Runtime library at `path` for this process. A second call with the same file
/// is free; with another file it is an error (ONNX Runtime cannot be unloaded). A missing file,
/// a FIFO, a library without the ONNX Runtime API or one older than 1.24 is a specific error,
/// never an abort.
pub fn load_library(path: &Path) -> Result<&'static ort::environment::Environment, RuntimeError> {
    let _guard = LOAD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let bad = |detail: String| RuntimeError::OrtLibrary {
        path: path.to_path_buf(),
        detail,
    };
    let canonical = std::fs::canonicalize(path).map_err(|e| bad(e.to_string()))?;
    if let Some(l) = LOADED.get() {
        if l.path == canonical {
            return Ok(&l.env);
        }
        return Err(bad(format!(
            "this process already runs ONNX Runtime from {}; one library per process",
            l.path.display()
        )));
    }
    // A FIFO would block dlopen; a directory or device is refused by name.
    amend_edits::fsutil::open_regular(&canonical, 1 << 31).map_err(|e| bad(e.to_string()))?;
    let telemetry_off = disable_telemetry_unless_set();
    let builder = ort::init_from(&canonical).map_err(|e| bad(e.to_string()))?;
    // ONNX Runtime's log goes to the `log` crate (target `onnxruntime`), never to stderr: the
    // errors it logs are returned to the caller anyway.
    let logger: ort::logging::LoggerFunction =
        std::sync::Arc::new(|level, category, _id, location, message| {
            use ort::logging::LogLevel as L;
            let lvl = match level {
                L::Verbose => log::Level::Trace,
                L::Info | L::Warning => log::Level::Debug,
                L::Error | L::Fatal => log::Level::Info,
            };
            log::log!(target: "onnxruntime", lvl, "[{category}] {location}: {message}");
        });
    let env = builder
        .with_name("amend")
        .with_logger(logger)
        // Also off through the API (Windows builds' ETW events honour only this).
        .with_telemetry(!telemetry_off)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let version = version_of(&canonical);
    let _ = LOADED.set(Loaded {
        path: canonical,
        env,
        version,
    });
    Ok(&LOADED.get().expect("just set").env)
}

/// The weights ONNX Runtime computes with for a GGUF tensor (`ne = [k, n]`, type `t`):
/// `X = I_k` through the graph form of the weight ([`graph::linear_probe`]), read back as
/// `W^T` (`[k, n]`, row-major). Tests compare it bitwise with ggml's dequantization.
#[doc(hidden)]
pub fn probe_linear(
    data: &[u8],
    t: amend_edits::gguf::GgmlType,
    k: usize,
    n: usize,
    profile: Profile,
    library: &Path,
) -> Result<Vec<f32>, RuntimeError> {
    let lw = quant::linear_weight("w", t, k, n, data)
        .map_err(|e| RuntimeError::OrtGraph(e.to_string()))?;
    let options = OrtOptions {
        library: Some(library.to_path_buf()),
        n_threads: Some(1),
        ..Default::default()
    };
    // The graph as written: ORT's CPU optimizer would fuse DequantizeLinear + MatMul into
    // MatMulNBits with int8 activations, which is not what a probe of the weights wants.
    let mut runner = graph_session(&graph::linear_probe(lw, profile), &options, false)?;
    let mut eye = vec![0f32; k * k];
    for i in 0..k {
        eye[i * k + i] = 1.0;
    }
    let x = Tensor::from_array((vec![k as i64, k as i64], eye)).map_err(ort_err("probe input"))?;
    let out = runner
        .run(vec![("x".to_string(), x.into_dyn())])
        .map_err(ort_err("probe run"))?;
    let (_, y) = out["y"]
        .try_extract_tensor::<f32>()
        .map_err(ort_err("probe output"))?;
    Ok(y.to_vec())
}

/// The f32 values of a graph output, exactly `want` of them. The graph may come from a named
/// `.onnx` file that is damaged or built for other shapes, and an EP may run a graph whose shapes
/// its checker let through: a missing output, another type or another count is an error here,
/// never an out-of-range read later.
fn output_f32<'a>(
    v: Option<&'a DynValue>,
    name: &str,
    want: usize,
) -> Result<&'a [f32], RuntimeError> {
    let v = v.ok_or_else(|| RuntimeError::Ort(format!("the graph returned no `{name}`")))?;
    let (_, data) = v
        .try_extract_tensor::<f32>()
        .map_err(|e| RuntimeError::Ort(format!("the graph's `{name}`: {e}")))?;
    if data.len() != want {
        return Err(RuntimeError::Ort(format!(
            "the graph's `{name}` has {} values where this model needs {want}: the graph does not \
             compute this model",
            data.len()
        )));
    }
    Ok(data)
}

/// Creates (and drops) a session for an arbitrary graph with `options`' library, EP and
/// fallback rule: tests use it to show what an EP refuses.
#[doc(hidden)]
pub fn check_graph(g: &onnx::Graph, options: &OrtOptions) -> Result<(), RuntimeError> {
    graph_session(g, options, true).map(drop)
}

/// A session for a small in-memory graph (probes and checks) on `options`' library and EP.
fn graph_session(
    g: &onnx::Graph,
    options: &OrtOptions,
    optimize: bool,
) -> Result<OrtRunner, RuntimeError> {
    let env = load_library(&options.library_path())?;
    let bytes = onnx::ModelProto {
        graph: g,
        opsets: OPSETS,
        producer: "amend check",
        metadata: &[],
    }
    .to_bytes();
    OrtModel::session(env, options, &bytes, optimize, None).map(|(r, _)| r)
}

/// How to open a model on ONNX Runtime.
#[derive(Clone, Debug)]
pub struct OrtOptions {
    pub ep: Ep,
    pub profile: Profile,
    /// The library; `None` = [`default_library`] for the EP.
    pub library: Option<PathBuf>,
    /// Intra-op threads, 1..=[`crate::MAX_THREADS`]; `None` = ONNX Runtime's default.
    pub n_threads: Option<usize>,
    /// Let nodes the EP does not take run on the CPU EP. Off by default: nothing falls back
    /// silently.
    pub cpu_fallback: bool,
    /// Also write the built graph here, with its sidecar (`amend export-onnx`).
    pub export: Option<PathBuf>,
    /// Where the built graph is kept between runs.
    pub cache: OnnxCache,
    /// llama.cpp roundings the graph reproduces (none by default; docs/backends.md).
    pub emulation: Emulation,
    /// Extra ONNX Runtime session configuration entries (`key`, `value`), e.g.
    /// `session.intra_op.allow_spinning`. A key the loaded library does not read is refused at
    /// open (ONNX Runtime itself would keep it and ignore it).
    pub session_config: Vec<(String, String)>,
    /// Options for the execution provider (`key`, `value`), given to it as they are after
    /// amend's own ([`Ep::default_options`]; a same key replaces amend's): QNN's
    /// `backend_path`, OpenVINO's `load_config`, ... The CPU EP and NNAPI take none.
    pub ep_options: Vec<(String, String)>,
    /// The edit slots the graph is built with ([`slots`]): a bundle whose edits need a slot
    /// the layout lacks is refused by name. Empty: the base graph, which takes no edits.
    pub slots: SlotLayout,
    /// Hook sites whose rows every evaluation returns ([`OrtSession::captured`]): what the
    /// compiler reads to key edits on this backend's own hidden states.
    pub capture: Vec<amend_edits::HookPoint>,
    /// Fixed shapes for EPs that need them (QNN): two graphs, a prefill of `chunk` tokens and
    /// a one-token decode, over a KV window of `window` positions ([`graph::Shapes::Static`]).
    /// `None`: one graph with dynamic shapes.
    pub static_shapes: Option<StaticShapes>,
    /// Write ONNX Runtime's own profile (every node's time, per run) to
    /// `PREFIX_<date>_<time>.json` when a session ends: where the time goes on an EP.
    pub trace: Option<PathBuf>,
    /// Where the graph's weights live once the session is open ([`WeightMemory`]).
    pub weight_memory: WeightMemory,
}

/// Where the graph's weights live ([`weights`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightMemory {
    /// In the ONNX bytes ONNX Runtime parses: its parsed copy stays beside the copy
    /// `MatMulNBits` prepacks, so the quantized weights are held twice.
    Inline,
    /// In pages this process owns, read by ONNX Runtime in place as external data; nothing
    /// released (what a graph whose weights are read at run time needs).
    Owned,
    /// On the CPU EP, as `Owned`, and the pages of the weights only `MatMulNBits` reads (it
    /// computes from its prepacked copy) are given back once a probe's logits are checked
    /// bitwise equal before and after: each of those weights held once. On other EPs, which
    /// compile their own copy, as `Inline` (measured: pages beside OpenVINO's copy add 280 MB).
    #[default]
    Lean,
}

impl OrtOptions {
    /// The id bundles' verification records name this backend by, on the ONNX Runtime
    /// library of `version`: `onnxruntime-1.32.0:cpu/g7-cpu`, or with non-default settings
    /// `onnxruntime-1.24.1:openvino:CPU/g7-portable-1a2b3c4d`. Everything in it changes the
    /// numbers an edit is checked against: the release (kernels change: T-Patcher neurons keyed
    /// on 1.32.0's CPU EP missed on 1.24.1's, 2 of 34 dev edits), the EP and device, the graph's
    /// version and profile (v7 moved GRACE keys), and, as the first 8 hex digits of a SHA-256
    /// (record names are at most 64 bytes), the roundings, fixed shapes and provider options
    /// the user gave (amend's own defaults are part of the graph version). Slots, capture and
    /// threads are not: empty slots are bitwise the base graph.
    pub fn backend_id(&self, version: &str) -> String {
        let mut id = format!(
            "onnxruntime-{version}:{}/g{}-{}",
            self.ep.name(),
            graph::GRAPH_VERSION,
            self.profile.name()
        );
        let mut extra = Vec::new();
        let emu = self.emulation.name();
        if emu != "none" {
            extra.push(format!("roundings={emu}"));
        }
        if let Some(st) = &self.static_shapes {
            extra.push(format!("static={}x{}", st.chunk, st.window));
        }
        let mut given = self.ep_options.clone();
        given.sort();
        extra.extend(given.into_iter().map(|(k, v)| format!("{k}={v}")));
        if !extra.is_empty() {
            use sha2::{Digest, Sha256};
            let h = Sha256::digest(extra.join("\n").as_bytes());
            id.push('-');
            id.push_str(&cache::hex(&h[..4]));
        }
        id
    }
}

impl WeightMemory {
    pub fn parse(s: &str) -> Result<WeightMemory, RuntimeError> {
        match s {
            "inline" => Ok(WeightMemory::Inline),
            "owned" => Ok(WeightMemory::Owned),
            "lean" => Ok(WeightMemory::Lean),
            _ => Err(RuntimeError::InvalidOptions(format!(
                "weight memory `{s}`: expected inline, owned or lean"
            ))),
        }
    }
}

/// A fixed prefill chunk and KV window ([`OrtOptions::static_shapes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticShapes {
    /// Tokens per prefill run, 1..=512 (a shorter chunk is padded; one token runs the decode
    /// graph).
    pub chunk: usize,
    /// Cached positions the graphs attend over: the session's context is at most this.
    pub window: usize,
    /// What each edit slot holds (slot inputs have fixed sizes too).
    pub capacity: SlotCapacity,
}

impl StaticShapes {
    /// `CHUNK,WINDOW` (e.g. `64,1024`), optionally followed by the slots' capacity
    /// `,ENTRIES,NEURONS,RANK` (default [`SlotCapacity::default`]).
    pub fn parse(s: &str) -> Result<StaticShapes, RuntimeError> {
        let bad = |d: &str| RuntimeError::InvalidOptions(format!("static shapes `{s}`: {d}"));
        let parts: Vec<&str> = s.splitn(3, ',').collect();
        let [c, w, ref rest @ ..] = parts[..] else {
            return Err(bad("expected CHUNK,WINDOW[,ENTRIES,NEURONS,RANK]"));
        };
        let num = |x: &str| x.trim().parse::<usize>().map_err(|_| bad("not a number"));
        let capacity = match *rest {
            [] => SlotCapacity::default(),
            [cap] => SlotCapacity::parse(cap).map_err(|e| bad(&e))?,
            _ => unreachable!("splitn(3) gives at most three parts"),
        };
        StaticShapes::new(num(c)?, num(w)?, capacity)
    }

    /// Checked: `chunk` 1..=512, `window` 1..=[`crate::MAX_N_CTX`].
    pub fn new(
        chunk: usize,
        window: usize,
        capacity: SlotCapacity,
    ) -> Result<StaticShapes, RuntimeError> {
        let shapes = StaticShapes {
            chunk,
            window,
            capacity,
        };
        shapes.check()?;
        Ok(shapes)
    }

    fn check(&self) -> Result<(), RuntimeError> {
        // A prefill chunk is appended to the KV window, so it cannot be longer than it.
        if !(1..=512).contains(&self.chunk)
            || self.window == 0
            || self.window > crate::MAX_N_CTX as usize
            || self.chunk > self.window
        {
            return Err(RuntimeError::InvalidOptions(format!(
                "static shapes: chunk must be 1..=512 and window 1..={}, the chunk no longer than the window (got {},{})",
                crate::MAX_N_CTX,
                self.chunk,
                self.window
            )));
        }
        // The fields are public: a capacity built by hand gets the check `SlotCapacity::parse`
        // makes (0 failed inside ONNX Runtime at the first run, 2^40 aborted allocating).
        if !self.capacity.in_range() {
            return Err(RuntimeError::InvalidOptions(format!(
                "static shapes: slot capacity {} (entries, neurons, rank) must be 1..={} each",
                self.capacity.describe(),
                slots::MAX_SLOT_CAPACITY
            )));
        }
        Ok(())
    }

    /// The graphs: the prefill (the only one when `chunk` is 1), then the decode.
    fn graphs(&self) -> Vec<graph::Shapes> {
        let mut g = vec![graph::Shapes::Static {
            tokens: self.chunk,
            window: self.window,
        }];
        if self.chunk > 1 {
            g.push(graph::Shapes::Static {
                tokens: 1,
                window: self.window,
            });
        }
        g
    }
}

/// Refuses an export that would replace one of the open's own inputs (the model, the library,
/// a named graph): the export renames a new file over its path, so `export: Some(model)`
/// replaced the GGUF with the graph.
fn check_export(model: &Path, options: &OrtOptions) -> Result<(), RuntimeError> {
    let Some(out) = &options.export else {
        return Ok(());
    };
    let mut inputs = vec![("model", model.to_path_buf())];
    inputs.push(("ONNX Runtime library", options.library_path()));
    if let OnnxCache::File(g) = &options.cache {
        inputs.extend(
            export_paths(g, options.static_shapes.as_ref())
                .into_iter()
                .map(|p| ("named ONNX graph", p)),
        );
    }
    for target in export_paths(out, options.static_shapes.as_ref()) {
        let id = amend_edits::fsutil::file_id(&target);
        for (what, input) in &inputs {
            if id.is_some() && amend_edits::fsutil::file_id(input) == id {
                return Err(RuntimeError::InvalidOptions(format!(
                    "export {}: that is the {what} {}; exporting would replace it, give another path; nothing was written",
                    target.display(),
                    input.display()
                )));
            }
        }
    }
    Ok(())
}

/// The files an export to `out` writes: the graph and its sidecar, and for a static pair the
/// decode graph and its sidecar too.
pub fn export_paths(out: &Path, static_shapes: Option<&StaticShapes>) -> Vec<PathBuf> {
    let mut graphs = vec![out.to_path_buf()];
    if static_shapes.is_some_and(|s| s.chunk > 1) {
        graphs.push(decode_graph_path(out));
    }
    graphs
        .into_iter()
        .flat_map(|g| [cache::sidecar(&g), g].into_iter().rev())
        .collect()
}

/// Where the decode graph of a static pair lives, beside the prefill graph `p`:
/// `m.onnx` -> `m.decode.onnx`.
pub fn decode_graph_path(p: &Path) -> PathBuf {
    let stem = p.file_stem().unwrap_or_default().to_os_string();
    let mut name = stem;
    name.push(".decode");
    if let Some(ext) = p.extension() {
        name.push(".");
        name.push(ext);
    }
    p.with_file_name(name)
}

/// Where the built ONNX graph is kept between runs. A cached graph is used only when its
/// sidecar (`FILE.amend`) names this model's fingerprint and this builder, and the file's
/// sha256 matches the sidecar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnnxCache {
    /// Always build from the GGUF.
    Off,
    /// `MODEL.PROFILE.onnx` beside the model: used when it matches; built and (when the
    /// directory is writable) written when it is missing, stale or damaged.
    BesideModel,
    /// This file (e.g. from `amend export-onnx`): it must exist and match; anything else is
    /// an [`RuntimeError::OrtCache`] error.
    File(PathBuf),
}

impl OrtOptions {
    /// The library these options load: `library`, else [`default_library`] for the EP.
    pub fn library_path(&self) -> PathBuf {
        self.library
            .clone()
            .unwrap_or_else(|| default_library(&self.ep))
    }
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            ep: Ep::Cpu,
            profile: Profile::Cpu,
            library: None,
            n_threads: None,
            cpu_fallback: false,
            export: None,
            cache: OnnxCache::BesideModel,
            emulation: Emulation::default(),
            session_config: Vec::new(),
            ep_options: Vec::new(),
            slots: SlotLayout::default(),
            capture: Vec::new(),
            static_shapes: None,
            trace: None,
            weight_memory: WeightMemory::default(),
        }
    }
}

/// Build and load figures of an [`OrtModel`].
#[derive(Clone, Debug, Default)]
pub struct OrtLoadStats {
    /// The graph came from the cache ([`OnnxCache`]); `graph_build_s` is then its read time.
    pub from_cache: bool,
    pub graph_build_s: f64,
    pub onnx_bytes: usize,
    pub session_create_s: f64,
    pub n_nodes: usize,
}

/// A GGUF model running on ONNX Runtime. One ONNX Runtime session serves all of its
/// [`OrtSession`]s: their evaluations take turns (each session keeps its own KV cache).
pub struct OrtModel {
    vocab: Arc<Model>,
    cfg: ModelConfig,
    runner: Mutex<OrtRunner>,
    /// With static shapes and a chunk over one token: the one-token decode graph's session.
    decode: Option<Mutex<OrtRunner>>,
    options: OrtOptions,
    stats: OrtLoadStats,
    rope_freqs: Option<Vec<f32>>,
    binding: amend_edits::bundle::ModelBinding,
    /// `(n_in, n_out)` of each weight with a low-rank slot.
    slot_dims: Vec<(String, usize, usize)>,
    /// Every slot's sentinel: what runs without edits feed.
    empty_feeds: OnceLock<Arc<slots::SlotFeeds>>,
    /// The token-embedding rows the host feeds ([`graph::EmbeddingInput`]).
    embd: embedding::EmbeddingRows,
    /// The graphs' weights, read in place by the sessions above ([`WeightMemory`]); declared
    /// after them so that they are dropped after the sessions.
    weights: Mutex<Vec<(PageValues, weights::Externalized)>>,
}

impl std::fmt::Debug for OrtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtModel")
            .field("arch", &self.cfg.arch)
            .field("ep", &self.options.ep)
            .finish()
    }
}

fn ort_err(context: &str) -> impl Fn(ort::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::Ort(format!("{context}: {e}"))
}

impl OrtModel {
    /// Validates the GGUF at `path` (the same checks as [`Model::open`]), builds its ONNX graph
    /// from bytes this process owns and creates the ONNX Runtime session on the EP.
    pub fn open(
        path: impl AsRef<Path>,
        options: OrtOptions,
    ) -> Result<Arc<OrtModel>, RuntimeError> {
        let path = path.as_ref();
        crate::session::check_threads(options.n_threads, "n_threads")?;
        check_export(path, &options)?;
        // Before the library loads: options no EP could take are the caller's mistake.
        options
            .ep
            .provider_options(options.n_threads, &options.ep_options)?;
        let library = options.library_path();
        let env = load_library(&library)?;
        check_session_config(&library, &options.session_config)?;
        // The vocabulary (and every pre-load check of the file) through llama.cpp.
        let vocab = Model::open(
            path,
            ModelOptions {
                vocab_only: true,
                n_threads: Some(1),
                ..Default::default()
            },
        )?;
        let arch = vocab.architecture();
        if let Some(st) = &options.static_shapes {
            st.check()?;
        }
        // The header the checks passed on and llama.cpp read the vocabulary from (its sealed copy):
        // the graph's configuration agrees with the vocabulary even if the file is rewritten now.
        let checked = vocab.checked_path();
        let (header, hp) = {
            let header = amend_edits::gguf::GgufFile::read_header(&checked).map_err(|e| {
                RuntimeError::InvalidGguf {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                }
            })?;
            let hp = ModelHparams::from_header(&header).map_err(|source| {
                RuntimeError::InvalidHparams {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            (header, hp)
        };
        let cfg = ModelConfig::from_hparams(&hp, arch)
            .map_err(|e| RuntimeError::OrtGraph(e.to_string()))?;
        options
            .slots
            .check(cfg.n_layer)
            .map_err(RuntimeError::OrtGraph)?;
        let mut slot_dims = Vec::with_capacity(options.slots.low_rank.len());
        for name in &options.slots.low_rank {
            match header.tensor(name).map(|t| &t.ne[..]) {
                Some(&[k, n]) => slot_dims.push((name.clone(), k as usize, n as usize)),
                _ => {
                    return Err(RuntimeError::OrtGraph(format!(
                        "low-rank slot on `{name}`: the model has no such matrix"
                    )))
                }
            }
        }
        // One graph, or a static pair: the prefill, then the one-token decode.
        let all_shapes = match &options.static_shapes {
            None => vec![graph::Shapes::Dynamic],
            Some(st) => st.graphs(),
        };
        let mut stats = OrtLoadStats {
            from_cache: true,
            ..Default::default()
        };
        let mut runners = Vec::with_capacity(all_shapes.len());
        let mut weight_pages = Vec::new();
        let mut embd = None;
        let mut first = None;
        // The automatic cache needs this installation's key (read once per open); a named file
        // does not. Without a key the automatic cache is neither read nor written.
        let cache_key = match &options.cache {
            OnnxCache::BesideModel => match cache::key() {
                Ok(k) => Some(k),
                Err(why) => {
                    log::info!("ort: no graph cache ({why}): the graph is built");
                    None
                }
            },
            _ => None,
        };
        for (gi, &shapes) in all_shapes.iter().enumerate() {
            let builder_id = graph::builder_id(
                options.profile,
                &options.emulation,
                &options.slots,
                &options.capture,
                shapes,
                &options
                    .static_shapes
                    .map(|s| s.capacity)
                    .unwrap_or_default(),
            );
            // The second graph of a static pair sits beside the first as `NAME.decode.onnx`.
            let second = |p: PathBuf| if gi == 0 { p } else { decode_graph_path(&p) };
            let mut cache_path = match &options.cache {
                OnnxCache::Off => None,
                OnnxCache::File(p) => Some(second(p.clone())),
                OnnxCache::BesideModel => {
                    let mut name = path.file_name().unwrap_or_default().to_os_string();
                    name.push(format!(".{}", options.profile.name()));
                    if !options.slots.is_empty()
                        || !options.capture.is_empty()
                        || shapes != graph::Shapes::Dynamic
                    {
                        // One cached graph per slot layout, capture list and shapes.
                        let h = amend_edits::keys::to_hex(&<sha2::Sha256 as sha2::Digest>::digest(
                            builder_id.as_bytes(),
                        ));
                        name.push(format!(".slots-{}", &h[..12]));
                    }
                    name.push(".onnx");
                    Some(path.with_file_name(name))
                }
            };
            let t0 = Instant::now();
            // A model on a read-only (or full) partition cannot have its graph beside it: the
            // automatic cache then lives in amend's cache directory, named by the model's
            // fingerprint (one entry per model whatever its path), and is read from there when
            // the graph beside the model is missing or unusable (another installation's).
            // A cached graph is bound to the file's fingerprint (the runtime's fingerprint cache).
            let fp = match &cache_path {
                Some(_) => Some(vocab.binding().map_err(|e| RuntimeError::InvalidGguf {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?),
                None => None,
            };
            let fallback_path = match (&options.cache, &cache_path, &fp) {
                (OnnxCache::BesideModel, Some(cp), Some(fp)) => amend_edits::fsutil::cache_dir()
                    .map(|d| {
                        let mut name = amend_edits::keys::to_hex(&fp.fingerprint[..8]);
                        name.push('-');
                        name.push_str(&cp.file_name().unwrap_or_default().to_string_lossy());
                        d.join("graphs").join(name)
                    }),
                _ => None,
            };
            let mut cached = None;
            if let (Some(cp), Some(fp)) = (cache_path.clone(), fp) {
                let read = |cp: &Path| match (&options.cache, &cache_key) {
                    (OnnxCache::BesideModel, None) => Err("no cache key".into()),
                    (_, key) => cache::read(cp, &fp.fingerprint, &builder_id, key.as_ref()),
                };
                let mut r = read(&cp);
                if let (Err(detail), Some(fb)) = (&r, &fallback_path) {
                    if fb.exists() {
                        match read(fb) {
                            Ok(bytes) => {
                                if cp.exists() {
                                    log::info!("ort: not using {}: {detail}", cp.display());
                                }
                                r = Ok(bytes);
                                cache_path = Some(fb.clone());
                            }
                            Err(e) => log::info!("ort: not using {}: {e}", fb.display()),
                        }
                    }
                }
                let cp = cache_path.clone().unwrap_or(cp);
                match r {
                    Ok(bytes) => cached = Some((bytes, fp)),
                    Err(detail) => {
                        if matches!(options.cache, OnnxCache::File(_)) {
                            return Err(RuntimeError::OrtCache {
                                path: cp.clone(),
                                detail,
                            });
                        }
                        log::info!("ort: not using the cached graph {}: {detail}", cp.display());
                    }
                }
            }
            let (mut onnx, binding, rope_freqs, n_nodes, from_cache) = match cached {
                Some((bytes, fp)) => {
                    // From the sealed copy the vocabulary loaded from (it holds these bytes too):
                    // the values the fingerprint `fp` was taken over.
                    let rope_freqs = read_rope_freqs(&checked, path, &header)?;
                    // A malformed graph is ONNX Runtime's to refuse, below.
                    let n_nodes = weights::count_nodes(&bytes).unwrap_or(0);
                    (bytes, fp, rope_freqs, n_nodes, true)
                }
                None => {
                    let Built {
                        onnx,
                        binding,
                        rope_freqs,
                        n_nodes,
                    } = build_onnx(path, &checked, &cfg, &options, shapes, &builder_id)?;
                    if let (Some(cp), OnnxCache::BesideModel, Some(k)) =
                        (&cache_path, &options.cache, &cache_key)
                    {
                        let put = |at: &Path| {
                            cache::write(at, &onnx, &binding.fingerprint, &builder_id, Some(k))
                        };
                        match (put(cp), &fallback_path) {
                            (Ok(()), _) => {}
                            (Err(e), Some(fb)) => {
                                log::info!("ort: graph not cached at {}: {e}", cp.display());
                                let w = fb
                                    .parent()
                                    .map_or(Ok(()), std::fs::create_dir_all)
                                    .and_then(|()| put(fb));
                                match w {
                                    Ok(()) => log::info!("ort: graph cached at {}", fb.display()),
                                    Err(e) => log::info!(
                                        "ort: graph not cached at {} either: {e}",
                                        fb.display()
                                    ),
                                }
                            }
                            (Err(e), None) => {
                                log::info!("ort: graph not cached at {}: {e}", cp.display())
                            }
                        }
                    }
                    (onnx, binding, rope_freqs, n_nodes, false)
                }
            };
            let graph_build_s = t0.elapsed().as_secs_f64();
            if let Some(out) = &options.export {
                let out = second(out.clone());
                let key = cache::key().ok();
                cache::write(&out, &onnx, &binding.fingerprint, &builder_id, key.as_ref())
                    .map_err(|source| RuntimeError::Write {
                        path: out.clone(),
                        source,
                    })?;
            }
            let t1 = Instant::now();
            let onnx_len = onnx.len();
            // A graph read from a file that turns out unusable is that file's fault, not the
            // builder's.
            let graph_err = |detail: String| match (&cache_path, from_cache) {
                (Some(p), true) => RuntimeError::OrtCache {
                    path: p.clone(),
                    detail,
                },
                _ => RuntimeError::OrtGraph(detail),
            };
            let ext = match options.weight_memory {
                // Another EP compiles its own copy of the weights: pages beside it only add.
                WeightMemory::Inline => None,
                WeightMemory::Lean if !matches!(options.ep, Ep::Cpu) => None,
                WeightMemory::Owned | WeightMemory::Lean => {
                    let e = weights::externalize(&onnx).map_err(|e| {
                        graph_err(format!("moving the weights out of the graph: {e}"))
                    })?;
                    // The pages hold the weights now: the inline bytes need not overlap with
                    // ONNX Runtime's prepacking (the peak while opening).
                    onnx = Vec::new();
                    release_free_heap();
                    Some(e)
                }
            };
            // The model ONNX Runtime parses: without the weights when they moved to pages.
            let model_bytes: &[u8] = ext.as_ref().map_or(&onnx, |e| &e.onnx);
            // The first graph's embedding table gives the host's row digests, computed on a
            // second thread while ONNX Runtime creates the session (both only read the bytes).
            let table = |name: &str| -> Result<&[u8], RuntimeError> {
                match &ext {
                    Some(e) => e.bytes_of(name),
                    None => weights::find_initializer(model_bytes, name),
                }
                .map_err(|e| graph_err(format!("the graph: {e}")))?
                .ok_or_else(|| graph_err(format!("the graph has no {name}")))
            };
            let digest_rows = || -> Result<embedding::EmbeddingRows, RuntimeError> {
                let t = Instant::now();
                let te = header.tensor("token_embd.weight").ok_or_else(|| {
                    RuntimeError::OrtGraph("the model has no token_embd.weight".into())
                })?;
                let form = graph::EmbeddingInput::of(te.ggml_type, options.profile);
                let (codes, scales) = match form {
                    graph::EmbeddingInput::Q8_0 => (
                        table(graph::EMBD_Q8_CODES_TABLE)?,
                        table(graph::EMBD_Q8_SCALES_TABLE)?,
                    ),
                    graph::EmbeddingInput::F32 => (table(graph::EMBD_TABLE)?, &[][..]),
                };
                let rows = embedding::EmbeddingRows::open(path, &header, form, codes, scales)?;
                log::info!(
                    "ort: token-embedding rows ({form:?}) fed by the host, digests in {:.2} s",
                    t.elapsed().as_secs_f64()
                );
                Ok(rows)
            };
            let (session, rows) = std::thread::scope(|sc| {
                // At the process's thread limit the digests run here, after the session.
                let spawned = (gi == 0).then(|| {
                    std::thread::Builder::new()
                        .name("amend-digests".into())
                        .spawn_scoped(sc, digest_rows)
                });
                let session = Self::session(env, &options, model_bytes, true, ext.as_ref());
                let rows = spawned.map(|h| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        Err(RuntimeError::OrtGraph(
                            "the embedding digests' thread panicked".into(),
                        ))
                    }),
                    Err(e) => {
                        log::debug!("ort: no thread for the embedding digests ({e}): inline");
                        digest_rows()
                    }
                });
                (session, rows)
            });
            let (runner, values) = session?;
            if let Some(rows) = rows {
                embd = Some(rows?);
            }
            runners.push(runner);
            if let (Some(mut e), Some(v)) = (ext, values) {
                e.onnx = Vec::new();
                weight_pages.push((v, e));
            }
            let session_create_s = t1.elapsed().as_secs_f64();
            log::info!(
                "ort: {} on {} ({} profile, {:?}): graph {} {:.2} s, {} nodes, {:.1} MB; session {:.2} s",
                path.display(),
                options.ep.name(),
                options.profile.name(),
                shapes,
                if from_cache {
                    "read from cache in"
                } else {
                    "built in"
                },
                graph_build_s,
                n_nodes,
                onnx_len as f64 / 1e6,
                session_create_s
            );
            stats.from_cache &= from_cache;
            stats.graph_build_s += graph_build_s;
            stats.onnx_bytes += onnx_len;
            stats.session_create_s += session_create_s;
            stats.n_nodes += n_nodes;
            drop(onnx);
            release_free_heap();
            if first.is_none() {
                first = Some((binding, rope_freqs));
            }
        }
        let (binding, rope_freqs) = first.expect("at least one graph");
        let mut runners = runners.into_iter();
        let runner = runners.next().expect("at least one graph");
        let decode = runners.next().map(Mutex::new);
        // Pages exist for `lean` on the CPU EP only (other EPs take the inline bytes).
        let lean = options.weight_memory == WeightMemory::Lean && !weight_pages.is_empty();
        let model = Arc::new(OrtModel {
            vocab,
            cfg,
            runner: Mutex::new(runner),
            decode,
            options,
            stats,
            rope_freqs,
            binding,
            slot_dims,
            empty_feeds: OnceLock::new(),
            embd: embd.expect("the first graph's embedding rows"),
            weights: Mutex::new(weight_pages),
        });
        if lean {
            if let Err(e) = model.release_prepacked_weights() {
                // A library that still reads a prepacked weight: open again keeping the pages
                // (correct, just larger), rather than refusing a model that works.
                let options = OrtOptions {
                    weight_memory: WeightMemory::Owned,
                    ..model.options.clone()
                };
                let why = match &e {
                    RuntimeError::OrtSession { detail, .. } => detail.clone(),
                    e => e.to_string(),
                };
                log::warn!("ort: {why}; opening again with weight memory `owned`");
                drop(model);
                return Self::open(path, options);
            }
        }
        Ok(model)
    }

    /// Gives back the pages of the weights only `MatMulNBits` reads (it computes from its
    /// prepacked copy), checked by a probe: the last logits of a 4-token prompt and of one
    /// decoded token, computed before and after, must be bitwise equal. If they are not, the ONNX
    /// Runtime library read a released weight: an error, and `open` opens the model again
    /// with [`WeightMemory::Owned`].
    fn release_prepacked_weights(self: &Arc<Self>) -> Result<(), RuntimeError> {
        let t0 = Instant::now();
        let probe = |model: &Arc<OrtModel>| -> Result<Vec<f32>, RuntimeError> {
            let mut s = OrtSession::new(model, 16)?;
            let mut tokens = model.vocab.tokenize("The capital of France is", true)?;
            tokens.truncate(4);
            // Every weight is read by the prefill (several rows) and by the decode (one row);
            // the last rows' logits depend on all of them.
            s.eval(&tokens, Logits::Last)?;
            let mut out = s.last_logits()?.to_vec();
            let next = crate::reference::argmax(s.last_logits()?) as Token;
            s.eval_with(&[next], EvalOptions::decode())?;
            out.extend_from_slice(s.last_logits()?);
            Ok(out)
        };
        let before = probe(self)?;
        let released = {
            let mut w = self.weights.lock().unwrap_or_else(|p| p.into_inner());
            let mut n = 0;
            for (_, e) in w.iter_mut() {
                n += e
                    .release_prepacked()
                    .map_err(|e| RuntimeError::OrtGraph(format!("releasing weight pages: {e}")))?;
            }
            n
        };
        let after = probe(self)?;
        if before
            .iter()
            .zip(&after)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(RuntimeError::OrtSession {
                ep: self.options.ep.name(),
                detail: "this ONNX Runtime library reads MatMulNBits weights after prepacking \
                         them (a probe's logits changed once their pages were given back)"
                    .into(),
            });
        }
        log::info!(
            "ort: {:.1} MB of prepacked weights' pages released, probe equal ({:.2} s)",
            released as f64 / 1e6,
            t0.elapsed().as_secs_f64()
        );
        release_free_heap();
        Ok(())
    }

    /// Bytes of weight pages the process owns, and how many of them it gave back.
    pub fn weight_pages(&self) -> (usize, usize) {
        let w = self.weights.lock().unwrap_or_else(|p| p.into_inner());
        (
            w.iter().map(|(_, e)| e.pages.len()).sum(),
            w.iter().map(|(_, e)| e.pages.released()).sum(),
        )
    }

    fn session(
        env: &ort::environment::Environment,
        options: &OrtOptions,
        onnx: &[u8],
        optimize: bool,
        pages: Option<&weights::Externalized>,
    ) -> Result<(OrtRunner, Option<PageValues>), RuntimeError> {
        let ep_name = options.ep.name();
        let ep_err = |detail: String| RuntimeError::OrtEp {
            ep: ep_name.clone(),
            detail,
        };
        let mut b = OrtRunner::builder(env).map_err(|e| ep_err(e.to_string()))?;
        if let Some(n) = options.n_threads {
            b = b.with_intra_threads(n).map_err(|e| ep_err(e.to_string()))?;
        }
        if let Some(p) = &options.trace {
            b = b
                .with_profiling(p)
                .map_err(|e| ep_err(format!("profiling to {}: {e}", p.display())))?;
        }
        if !optimize {
            b = b
                .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Disable)
                .map_err(|e| ep_err(e.to_string()))?;
        }
        for (k, v) in &options.session_config {
            b = b
                .with_config_entry(k, v)
                .map_err(|e| ep_err(format!("session config {k}={v}: {e}")))?;
        }
        if let Some(d) = options
            .ep
            .dispatch(options.n_threads, &options.ep_options)?
        {
            b = b
                .with_execution_providers([d.error_on_failure()])
                .map_err(|e| {
                    // ONNX Runtime gives one message for every cause; the library's list of
                    // EPs tells a missing EP from one that failed to start.
                    let in_library = options.ep.in_library();
                    let device = match &options.ep {
                        Ep::OpenVino(d) => format!(" on device {d} (is it present on this machine?)"),
                        _ => String::new(),
                    };
                    let options = &options.ep_options;
                    ep_err(if in_library == Some(true) {
                        let given = if options.is_empty() {
                            String::new()
                        } else {
                            let keys: Vec<&str> =
                                options.iter().map(|(k, _)| k.as_str()).collect();
                            format!(", with the provider options given ({})", keys.join(", "))
                        };
                        format!("this ONNX Runtime library has it, but it did not start{device}{given}: {e}")
                    } else if options.is_empty() {
                        format!("not available in this ONNX Runtime library: {e}")
                    } else {
                        let keys: Vec<&str> = options.iter().map(|(k, _)| k.as_str()).collect();
                        format!(
                            "not available in this ONNX Runtime library, or it refused the \
                             provider options given ({}): {e}",
                            keys.join(", ")
                        )
                    })
                })?;
            if !options.cpu_fallback {
                // Nodes the EP does not take are an error instead of a silent CPU fallback.
                b = b
                    .with_config_entry("session.disable_cpu_ep_fallback", "1")
                    .map_err(|e| ep_err(e.to_string()))?;
            }
        }
        let values =
            match pages {
                Some(p) => Some(add_weight_pages(&mut b, p).map_err(|detail| {
                    RuntimeError::OrtSession {
                        ep: ep_name.clone(),
                        detail,
                    }
                })?),
                None => None,
            };
        b.commit_from_memory(onnx)
            .map(|r| (r, values))
            .map_err(|e| {
                let mut detail = e.to_string();
                if !options.cpu_fallback && detail.contains("fallback") {
                    detail.push_str(" (CPU fallback is off: --cpu-fallback, or cpu_fallback in the APIs, allows it)");
                }
                RuntimeError::OrtSession {
                    ep: ep_name.clone(),
                    detail,
                }
            })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn architecture(&self) -> Architecture {
        self.cfg.arch
    }

    /// The vocabulary-only llama.cpp model: tokenization shared with the llama.cpp backend.
    pub fn vocab(&self) -> &Arc<Model> {
        &self.vocab
    }

    /// The fingerprint and dimensions of the GGUF bytes the graph was built from.
    pub fn binding(&self) -> &amend_edits::bundle::ModelBinding {
        &self.binding
    }

    pub fn stats(&self) -> &OrtLoadStats {
        &self.stats
    }

    pub fn options(&self) -> &OrtOptions {
        &self.options
    }

    pub fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<Token>, RuntimeError> {
        self.vocab.tokenize(text, add_bos)
    }

    pub fn detokenize(&self, tokens: &[Token]) -> Result<String, RuntimeError> {
        self.vocab.detokenize(tokens)
    }

    /// The edit slots the graph was built with.
    pub fn slots(&self) -> &SlotLayout {
        &self.options.slots
    }

    /// Checks that the graph has a slot for every edit `bundle` carries (what activating it
    /// needs); memories need none. Errors: [`RuntimeError::EditSlot`] naming the first missing.
    pub fn check_fits(&self, bundle: &amend_edits::Bundle) -> Result<(), RuntimeError> {
        let have = &self.options.slots;
        let missing = SlotLayout::for_bundles([bundle])?.missing_from(have);
        if missing.is_empty() {
            return Ok(());
        }
        Err(RuntimeError::EditSlot(format!(
            "bundle {} needs the slots {} and the graph has {}",
            bundle.id(),
            missing.describe(),
            if have.is_empty() {
                "none".to_string()
            } else {
                have.describe()
            }
        )))
    }

    /// Checks that the edit-set state `set` fits the static-capacity slots (a no-op on a
    /// dynamic graph): a host calls it inside the edit set's transaction on the state it
    /// is about to publish ([`amend_edits::EditSet::update_with`]), so a bundle that overflows a slot is refused when it is activated
    /// and nothing of it applies. Errors: [`RuntimeError::EditSlot`] naming the slot.
    pub fn check_capacity(
        &self,
        set: Arc<amend_edits::ActiveSet>,
        scope: Option<&crate::ScopeModel>,
    ) -> Result<(), RuntimeError> {
        if self.options.static_shapes.is_none() {
            return Ok(());
        }
        let plan = EditPlan::build(self, scope, set, &Default::default())?;
        self.feeds(Some(&plan)).map(|_| ())
    }

    fn weight_dims(&self, name: &str) -> Option<(usize, usize)> {
        self.slot_dims
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|&(_, k, n)| (k, n))
    }

    /// The feeds of `plan` (`None`: every slot's sentinel).
    fn feeds(&self, plan: Option<&EditPlan>) -> Result<slots::SlotFeeds, RuntimeError> {
        slots::SlotFeeds::build(
            plan,
            &self.options.slots,
            self.cfg.n_embd,
            &|n| self.weight_dims(n),
            self.options.static_shapes.map(|s| s.capacity),
        )
    }

    fn empty_feeds(&self) -> Result<Arc<slots::SlotFeeds>, RuntimeError> {
        if let Some(f) = self.empty_feeds.get() {
            return Ok(f.clone());
        }
        let f = Arc::new(self.feeds(None)?);
        Ok(self.empty_feeds.get_or_init(|| f).clone())
    }
}

impl PlanTarget for OrtModel {
    fn check_point(&self, p: amend_edits::HookPoint) -> Result<(), RuntimeError> {
        if slots::point_exists(p, self.cfg.n_layer as u32) {
            Ok(())
        } else {
            Err(RuntimeError::LayerOutOfRange {
                point: p,
                n_layer: self.cfg.n_layer as u32,
            })
        }
    }
    fn backend_id(&self) -> String {
        self.options
            .backend_id(library_version().unwrap_or("unknown"))
    }
    /// The same tensors as on llama.cpp (the vocabulary's checked header), so that a bundle
    /// fits both backends or neither.
    fn check_low_rank(&self, name: &str, n_in: u64, n_out: u64) -> Result<(), RuntimeError> {
        self.vocab.check_low_rank(name, n_in, n_out)
    }
}

/// A graph built from a GGUF.
struct Built {
    onnx: Vec<u8>,
    /// The fingerprint of the very bytes the graph was built from.
    binding: amend_edits::bundle::ModelBinding,
    rope_freqs: Option<Vec<f32>>,
    n_nodes: usize,
}

/// An empty buffer with room for `len` bytes, or [`RuntimeError::OutOfMemory`]: the model and
/// its graph are the allocations as large as the input (253 MB for the default model), the ones
/// a tight address space (a 32-bit process, `RLIMIT_AS`) refuses first.
fn byte_buffer(len: u64, what: &str) -> Result<Vec<u8>, RuntimeError> {
    let mut v = Vec::new();
    usize::try_from(len)
        .ok()
        .and_then(|n| v.try_reserve_exact(n).ok())
        .ok_or_else(|| RuntimeError::OutOfMemory {
            what: what.into(),
            bytes: len,
        })?;
    Ok(v)
}

/// Reads the GGUF at `path` into memory this process owns and builds its graph from that one
/// read, which must begin with the header at `checked` (the one `cfg` and the vocabulary come
/// from), else [`RuntimeError::ModelChanged`].
fn build_onnx(
    path: &Path,
    checked: &Path,
    cfg: &ModelConfig,
    options: &OrtOptions,
    shapes: graph::Shapes,
    builder_id: &str,
) -> Result<Built, RuntimeError> {
    let (mut file, len) =
        amend_edits::fsutil::open_regular(path, amend_edits::fsutil::MAX_MODEL_LEN)
            .map_err(RuntimeError::File)?;
    let mut bytes = byte_buffer(len, "the model's bytes")?;
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |detail: String| RuntimeError::InvalidGguf {
        path: path.to_path_buf(),
        detail,
    };
    let gguf = GgufFile::parse(&bytes).map_err(|e| invalid(e.to_string()))?;
    if !starts_with_header(&bytes, checked, gguf.header.data_offset)? {
        return Err(RuntimeError::ModelChanged {
            path: path.to_path_buf(),
            detail: "the header read for the graph differs from the one checked at open".into(),
        });
    }
    // The header is the checked one (above), whose shape check holds these to `[n_rot / 2]` f32.
    let rope_freqs = match gguf.header.tensor("rope_freqs.weight") {
        Some(t) => Some(
            quant::dequantize(
                "rope_freqs.weight",
                t.ggml_type,
                t.n_elements() as usize,
                1,
                gguf.data_of(t).map_err(|e| invalid(e.to_string()))?,
            )
            .map_err(|e| RuntimeError::OrtGraph(e.to_string()))?,
        ),
        None => None,
    };
    // The fingerprint of the very bytes the graph is built from.
    let binding =
        amend_edits::fingerprint::binding_of_bytes(&bytes).map_err(|e| invalid(e.to_string()))?;
    let g = graph::build(
        cfg,
        &gguf,
        options.profile,
        options.emulation,
        &options.slots,
        &options.capture,
        shapes,
        options
            .static_shapes
            .map(|s| s.capacity)
            .unwrap_or_default(),
    )
    .map_err(|e| RuntimeError::OrtGraph(e.to_string()))?;
    drop(gguf);
    drop(bytes);
    let fingerprint = cache::hex(&binding.fingerprint);
    let metadata = vec![
        ("amend.model_fingerprint".to_string(), fingerprint),
        ("amend.graph".to_string(), builder_id.to_string()),
        (
            "amend.architecture".to_string(),
            cfg.arch.name().to_string(),
        ),
    ];
    let n_nodes = g.nodes.len();
    let onnx = onnx::ModelProto {
        graph: &g,
        opsets: OPSETS,
        producer: concat!("amend ", env!("CARGO_PKG_VERSION")),
        metadata: &metadata,
    }
    .try_to_bytes()
    .map_err(|n| RuntimeError::OutOfMemory {
        what: "the serialized graph".into(),
        bytes: n as u64,
    })?;
    Ok(Built {
        onnx,
        binding,
        rope_freqs,
        n_nodes,
    })
}

/// ONNX Runtime tensors over a graph's [`weights::WeightPages`], one per moved initializer,
/// handed to its session with `AddInitializer`: the session computes from (and prepacks from)
/// the pages themselves instead of a copy. Released after the session (`OrtModel` field order).
struct PageValues(Vec<*mut ort::sys::OrtValue>);

// SAFETY: the values are only released (in Drop); ONNX Runtime values may move between threads.
unsafe impl Send for PageValues {}
unsafe impl Sync for PageValues {}

impl Drop for PageValues {
    fn drop(&mut self) {
        let api = ort::api();
        for &v in &self.0 {
            // SAFETY: each value was created by CreateTensorWithDataAsOrtValue and is released once.
            unsafe { (api.ReleaseValue)(v) };
        }
    }
}

/// Reads and releases a non-null status: its message.
///
/// # Safety
/// `status` must be a status returned by an ONNX Runtime call, not yet released.
unsafe fn status_message(status: *mut ort::sys::OrtStatus) -> String {
    let api = ort::api();
    let msg = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status))
        .to_string_lossy()
        .into_owned();
    (api.ReleaseStatus)(status);
    msg
}

/// Lets the session read the external data [`weights::FILE_NAME`] from `ext`'s pages and hands
/// it a tensor over the pages for every moved initializer, so that it neither reads nor copies
/// them elsewhere. The pages and the returned values must outlive the session.
fn add_weight_pages(
    b: &mut ort::session::builder::SessionBuilder,
    ext: &weights::Externalized,
) -> Result<PageValues, String> {
    use ort::AsPointer;
    let api = ort::api();
    let check = |status: ort::sys::OrtStatusPtr, what: &str| -> Result<(), String> {
        if status.0.is_null() {
            Ok(())
        } else {
            // SAFETY: a non-null status just returned by ONNX Runtime.
            Err(format!("{what}: {}", unsafe { status_message(status.0) }))
        }
    };
    let name: Vec<ort::sys::os_char> = weights::FILE_NAME
        .bytes()
        .map(|c| c as ort::sys::os_char)
        .chain([0])
        .collect();
    let names = [name.as_ptr()];
    let buffers = [ext.pages.as_ptr().cast_mut().cast::<std::ffi::c_char>()];
    let lengths = [ext.pages.len()];
    // SAFETY: the builder's options pointer is live; the arrays hold one entry each and outlive
    // the call; ONNX Runtime only reads the buffer (it is mapped read-only).
    check(
        unsafe {
            (api.AddExternalInitializersFromMemory)(
                b.ptr_mut(),
                names.as_ptr(),
                buffers.as_ptr(),
                lengths.as_ptr(),
                1,
            )
        },
        "external weights",
    )?;
    let mut info = std::ptr::null_mut();
    // SAFETY: an out-pointer to a local.
    check(
        unsafe {
            (api.CreateCpuMemoryInfo)(
                ort::sys::OrtAllocatorType::OrtDeviceAllocator,
                ort::sys::OrtMemType::OrtMemTypeDefault,
                &mut info,
            )
        },
        "memory info",
    )?;
    let mut values = PageValues(Vec::with_capacity(ext.tensors.len()));
    let mut result = Ok(());
    for t in &ext.tensors {
        let dtype = match t.dtype {
            1 => ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
            2 => ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
            3 => ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8,
            6 => ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,
            7 => ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
            10 => ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
            d => {
                result = Err(format!("{}: element type {d} not handled", t.name));
                break;
            }
        };
        let Ok(cname) = std::ffi::CString::new(t.name.as_str()) else {
            result = Err(format!("{:?}: a NUL in the name", t.name));
            break;
        };
        let mut v = std::ptr::null_mut();
        // SAFETY: the range lies inside the pages (built by `externalize`), which outlive the
        // value; ONNX Runtime does not take ownership of the data.
        let status = unsafe {
            (api.CreateTensorWithDataAsOrtValue)(
                info,
                ext.pages.as_ptr().add(t.range.start).cast_mut().cast(),
                t.range.len(),
                t.dims.as_ptr(),
                t.dims.len(),
                dtype,
                &mut v,
            )
        };
        if let Err(e) = check(status, &t.name) {
            result = Err(e);
            break;
        }
        values.0.push(v);
        // SAFETY: live options, a NUL-terminated name and a value kept alive by `values`.
        if let Err(e) = check(
            unsafe { (api.AddInitializer)(b.ptr_mut(), cname.as_ptr(), v) },
            &t.name,
        ) {
            result = Err(e);
            break;
        }
    }
    // SAFETY: created above; the values keep their own copy of it.
    unsafe { (api.ReleaseMemoryInfo)(info) };
    result.map(|()| values)
}

/// Hands the heap's free pages back to the system. Building the graph and creating the session
/// free hundreds of megabytes in pieces below glibc's mmap threshold (the GGUF and ONNX bytes'
/// neighbours, ONNX Runtime's parse and prepack scratch), which glibc otherwise keeps resident:
/// 70 MB of the RSS after opening gemma3-270m (docs/backends.md).
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// ONNX opset 21 (blockwise DequantizeLinear) and ORT's contrib ops.
const OPSETS: &[(&str, i64)] = &[("", 21), ("com.microsoft", 1)];

/// Whether `bytes` begins with the `n` header bytes of the file at `checked` (which is as long
/// as `bytes`).
fn starts_with_header(bytes: &[u8], checked: &Path, n: u64) -> Result<bool, RuntimeError> {
    let io = |source| RuntimeError::Io {
        path: checked.to_path_buf(),
        source,
    };
    let (mut file, len) =
        amend_edits::fsutil::open_regular(checked, amend_edits::fsutil::MAX_MODEL_LEN)
            .map_err(RuntimeError::File)?;
    if len != bytes.len() as u64 || n > len {
        return Ok(false);
    }
    let mut header = vec![0u8; n as usize];
    std::io::Read::read_exact(&mut file, &mut header).map_err(io)?;
    Ok(header == bytes[..n as usize])
}

/// RoPE frequency factors (llama3-style models) from `checked` (the model's sealed copy, which
/// holds them: [`crate::model::HOST_READ_TENSORS`]), without reading the weights; errors name
/// `path`, the model the caller gave.
fn read_rope_freqs(
    checked: &Path,
    path: &Path,
    header: &amend_edits::gguf::GgufHeader,
) -> Result<Option<Vec<f32>>, RuntimeError> {
    let Some(t) = header.tensor("rope_freqs.weight") else {
        return Ok(None);
    };
    let io = |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = t.byte_size().map_err(|e| RuntimeError::InvalidGguf {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if size > crate::model::HOST_READ_TENSOR_MAX {
        return Err(RuntimeError::OrtGraph(
            "rope_freqs.weight is implausibly large".into(),
        ));
    }
    let (mut f, _) = amend_edits::fsutil::open_regular(checked, amend_edits::fsutil::MAX_MODEL_LEN)
        .map_err(RuntimeError::File)?;
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(header.data_offset + t.offset))
        .map_err(io)?;
    let mut raw = vec![0u8; size as usize];
    f.read_exact(&mut raw).map_err(io)?;
    quant::dequantize(
        "rope_freqs.weight",
        t.ggml_type,
        t.n_elements() as usize,
        1,
        &raw,
    )
    .map(Some)
    .map_err(|e| RuntimeError::OrtGraph(e.to_string()))
}

/// The graph cache: `FILE` (the ONNX model) and `FILE.amend` (a text sidecar binding it to a
/// model fingerprint and a graph builder, with the file's sha256 and length).
///
/// The cache beside the model lives in the model's directory, which others may be able to
/// write: anyone can compute a sha256, so a planted graph with a matching sidecar would run
/// under the model's fingerprint, and bundles bound to that fingerprint would apply to it. So the
/// automatic cache's sidecar also carries an HMAC-SHA256 under a random key of this installation
/// (`~/.cache/amend/graph-cache.key`, or `$AMEND_CACHE`, created 0600 on first use and refused
/// if others can read it): a graph this installation did not write is not used, only rebuilt.
/// A file named explicitly (`--onnx`, from `amend export-onnx`, possibly on another machine)
/// needs no MAC: the caller chose it.
mod cache {
    use sha2::{Digest, Sha256};
    use std::path::{Path, PathBuf};

    const MAGIC: &str = "amend-onnx-cache 1";
    const MAX_ONNX: u64 = 1 << 33;

    /// HMAC-SHA256 (RFC 2104) of `msg` under a 32-byte key.
    fn hmac(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(key);
        let pad = |x: u8| k.map(|b| b ^ x);
        let inner = Sha256::new()
            .chain_update(pad(0x36))
            .chain_update(msg)
            .finalize();
        Sha256::new()
            .chain_update(pad(0x5c))
            .chain_update(inner)
            .finalize()
            .into()
    }

    /// Constant-time equality of two MACs given as hex.
    fn same(a: &str, b: &str) -> bool {
        a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
    }

    /// This installation's cache key: read, or created (0600, exclusively) on first use.
    /// `Err` says why there is none (the automatic cache is then neither read nor written).
    pub fn key() -> Result<[u8; 32], String> {
        let dir = amend_edits::fsutil::cache_dir()
            .ok_or("no $HOME or $AMEND_CACHE for the graph cache key")?;
        let path = dir.join("graph-cache.key");
        if let Some(k) = read_key(&path)? {
            return Ok(k);
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let key = amend_edits::keys::generate_signing_key()
            .map_err(|e| e.to_string())?
            .to_bytes();
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        match opts.open(&path) {
            Ok(mut f) => {
                let text = format!("{}\n", amend_edits::keys::to_hex(&key));
                let written =
                    std::io::Write::write_all(&mut f, text.as_bytes()).and_then(|_| f.sync_all());
                if let Err(e) = written {
                    // An empty or partial key (ENOSPC) would turn the cache off for good.
                    let _ = std::fs::remove_file(&path);
                    return Err(format!("{}: {e}", path.display()));
                }
                Ok(key)
            }
            // Another process created it first: use theirs, with the same checks.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                read_key(&path)?.ok_or_else(|| {
                    format!("{}: created and removed by another process", path.display())
                })
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// The key in `path`, `None` when there is no such file; an error when it is unusable
    /// (others may read or write it, another user owns it, not a key).
    fn read_key(path: &Path) -> Result<Option<[u8; 32]>, String> {
        let (mut f, _) = match amend_edits::fsutil::open_regular(path, 256) {
            Ok(f) => f,
            Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let md = f.metadata().map_err(|e| e.to_string())?;
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if md.uid() != me || md.mode() & 0o077 != 0 {
                return Err(format!(
                    "{} is readable or writable by others (mode {:o}, owner {}): not used",
                    path.display(),
                    md.mode() & 0o777,
                    md.uid()
                ));
            }
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text).map_err(|e| e.to_string())?;
        amend_edits::keys::decode_key_bytes(text.trim().as_bytes())
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    #[cfg(test)]
    #[test]
    fn hmac_is_rfc_4231() {
        // RFC 4231 test case 2 (a short key is zero-padded, as here).
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hex(&hmac(&key, b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(same("ab", "ab") && !same("ab", "ac") && !same("ab", "abc"));
    }

    pub fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    pub(super) fn sidecar(p: &Path) -> PathBuf {
        let mut s = p.as_os_str().to_os_string();
        s.push(".amend");
        PathBuf::from(s)
    }

    /// The sidecar's text; with `key`, a last line `mac HEX` over everything before it.
    fn text(bytes: &[u8], fingerprint: &[u8], builder: &str, key: Option<&[u8; 32]>) -> String {
        let mut t = format!(
            "{MAGIC}\nmodel {}\ngraph {builder}\nsha256 {}\nbytes {}\n",
            hex(fingerprint),
            hex(&Sha256::digest(bytes)),
            bytes.len()
        );
        if let Some(k) = key {
            let mac = hex(&hmac(k, t.as_bytes()));
            t.push_str(&format!("mac {mac}\n"));
        }
        t
    }

    /// The cached bytes, or why they cannot be used. With `key` (the automatic cache) the
    /// sidecar must carry this installation's MAC.
    pub fn read(
        p: &Path,
        fingerprint: &[u8],
        builder: &str,
        key: Option<&[u8; 32]>,
    ) -> Result<Vec<u8>, String> {
        // The graph first: a missing graph is named as such, not by its sidecar.
        let (mut graph, len) =
            amend_edits::fsutil::open_regular(p, MAX_ONNX).map_err(|e| e.to_string())?;
        let side = sidecar(p);
        let (mut f, _) =
            amend_edits::fsutil::open_regular(&side, 4096).map_err(|e| match e.io_kind() {
                Some(std::io::ErrorKind::NotFound) => format!(
                    "its sidecar {} is missing (`amend export-onnx` writes the two together)",
                    side.display()
                ),
                _ => e.to_string(),
            })?;
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).map_err(|e| format!("sidecar: {e}"))?;
        let field = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix(' ')))
                .map(str::to_string)
        };
        if s.lines().next() != Some(MAGIC) {
            return Err("the sidecar is not an amend graph cache".into());
        }
        if let Some(k) = key {
            let signed = s.find("\nmac ").map(|i| &s[..i + 1]);
            let ok = match (signed, field("mac")) {
                (Some(signed), Some(mac)) => same(&mac, &hex(&hmac(k, signed.as_bytes()))),
                _ => false,
            };
            if !ok {
                return Err("this installation did not write it (no valid MAC)".into());
            }
        }
        let want_model = hex(fingerprint);
        match field("model") {
            Some(m) if m == want_model => {}
            Some(m) => {
                return Err(format!(
                    "it was built from another model (fingerprint {m}, this model {want_model})"
                ))
            }
            None => return Err("the sidecar names no model".into()),
        }
        if field("graph").as_deref() != Some(builder) {
            return Err(format!(
                "it was built by another graph builder ({:?}, this one {builder:?})",
                field("graph").unwrap_or_default()
            ));
        }
        if field("bytes") != Some(len.to_string()) {
            return Err(format!(
                "the file has {len} bytes, the sidecar says {:?}",
                field("bytes")
            ));
        }
        let mut bytes = super::byte_buffer(len, "the cached graph").map_err(|e| e.to_string())?;
        std::io::Read::read_to_end(&mut graph, &mut bytes).map_err(|e| e.to_string())?;
        let sha = hex(&Sha256::digest(&bytes));
        if field("sha256").as_deref() != Some(sha.as_str()) {
            return Err(format!(
                "the file is damaged (sha256 {sha} does not match its sidecar)"
            ));
        }
        Ok(bytes)
    }

    /// `StorageFull` naming the directory when the file system holding `dest` has fewer than
    /// `need` bytes free for this user (`statvfs`; unknown counts as room).
    fn room_for(dest: &Path, need: u64) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            let dir = match dest.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
                return Ok(());
            };
            // SAFETY: a NUL-terminated path and a zeroed struct statvfs fills.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
                return Ok(());
            }
            // Root may use the blocks reserved for it; others only the available ones.
            // SAFETY: geteuid has no preconditions.
            let blocks = if unsafe { libc::geteuid() } == 0 {
                st.f_bfree
            } else {
                st.f_bavail
            };
            let free = (blocks as u64).saturating_mul(st.f_frsize as u64);
            if free < need {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!(
                        "{}: {need} bytes needed, {free} free; nothing was written",
                        dir.display()
                    ),
                ));
            }
        }
        let _ = (dest, need);
        Ok(())
    }

    /// Writes the graph and its sidecar, each atomically (temp file, fsync, rename); with `key`,
    /// the sidecar carries this installation's MAC.
    pub fn write(
        p: &Path,
        bytes: &[u8],
        fingerprint: &[u8],
        builder: &str,
        key: Option<&[u8; 32]>,
    ) -> std::io::Result<()> {
        // The one atomic writer: it refuses a FIFO or device at `dest` and leaves no
        // temporary file behind on failure.
        let put = |dest: &Path, data: &[u8]| amend_edits::fsutil::write_atomic(dest, data, None);
        // A graph is hundreds of MB: on a nearly full partition, writing it until ENOSPC would
        // fill the partition (for every other writer) before failing. Checked first instead.
        room_for(p, bytes.len() as u64 + 4096)?;
        // The sidecar goes last: a crash in between leaves a graph no sidecar vouches for.
        let _ = std::fs::remove_file(sidecar(p));
        put(p, bytes)?;
        put(
            &sidecar(p),
            text(bytes, fingerprint, builder, key).as_bytes(),
        )
    }
}

/// A host tensor the run owns (bound without a copy: the binding keeps it alive).
fn host_tensor<T>(shape: &[usize], data: Vec<T>) -> Result<DynValue, RuntimeError>
where
    T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static,
{
    let shape: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
    Ok(Tensor::from_array((shape, data))
        .map_err(ort_err("building inputs"))?
        .into_dyn())
}

/// `past_key.{il}` or `past_value.{il}` for entry `i` of a KV list interleaved by layer.
fn past_name(i: usize) -> String {
    if i.is_multiple_of(2) {
        graph::past_key(i / 2)
    } else {
        graph::past_value(i / 2)
    }
}

/// `present_key.{il}` or `present_value.{il}`, likewise.
fn present_name(i: usize) -> String {
    if i.is_multiple_of(2) {
        graph::present_key(i / 2)
    } else {
        graph::present_value(i / 2)
    }
}

/// A session's [`ort::session::IoBinding`] on one of the model's runners. What does not change
/// from run to run stays bound: the fed snapshot's slot inputs ([`slots::BoundFeeds`]: a bundle
/// swap or rollback rebinds them, the graph stays), the dynamic graph's KV cache (rebound to
/// each run's `present_*`), a static graph's outputs.
struct Bound {
    io: ort::session::IoBinding,
    /// Every output of the graph: a binding returns only the outputs bound, and logits, K and
    /// V, captured sites and the slots' explain outputs are all read.
    outputs: Vec<String>,
    feeds: slots::BoundFeeds,
}

impl Bound {
    fn new(runner: &OrtRunner) -> Result<Bound, RuntimeError> {
        let io = runner
            .create_binding()
            .map_err(ort_err("creating an IoBinding"))?;
        let outputs = runner
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let mut b = Bound {
            io,
            outputs,
            feeds: Default::default(),
        };
        b.bind_outputs()?;
        Ok(b)
    }

    /// Binds every output to host memory, unallocated: ONNX Runtime allocates it at the next
    /// run and writes later runs into that tensor while it stays bound (same shape required).
    fn bind_outputs(&mut self) -> Result<(), RuntimeError> {
        use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
        let host = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(ort_err("host memory info"))?;
        for name in &self.outputs {
            self.io
                .bind_output_to_device(name.as_str(), &host)
                .map_err(ort_err("binding outputs"))?;
        }
        Ok(())
    }

    /// Binds an input. An owned tensor is not copied (ONNX Runtime reads it in place on host
    /// memory); a borrowed view would be.
    fn input<T: ort::value::ValueTypeMarker + ?Sized>(
        &mut self,
        name: &str,
        v: &ort::value::Value<T>,
    ) -> Result<(), RuntimeError> {
        self.io
            .bind_input(name, v)
            .map_err(|e| RuntimeError::Ort(format!("binding `{name}`: {e}")))
    }

    /// The dynamic graph's `past_*`.
    fn bind_kv(&mut self, kv: &[DynValue]) -> Result<(), RuntimeError> {
        for (i, v) in kv.iter().enumerate() {
            self.input(&past_name(i), v)?;
        }
        Ok(())
    }
}

// A session moves between threads (the C ABI holds it as `Box<dyn Backend + Send>`): its
// `IoBinding`s are `Send`, not `Sync`.
const _: () = {
    const fn send<T: Send>() {}
    send::<OrtSession>();
};

/// One conversation on an [`OrtModel`]: the KV cache and the last evaluation's logits.
pub struct OrtSession {
    model: Arc<OrtModel>,
    n_ctx: usize,
    n_past: usize,
    /// `past_key.{il}`, `past_value.{il}`, interleaved by layer.
    kv: Vec<DynValue>,
    /// With static shapes, the KV window instead: per layer K then V, `[1, n_head_kv, window,
    /// head_dim]`, positions `0..n_past` filled (the graphs mask the rest). Tensors ONNX
    /// Runtime reads in place (binding a borrowed view would copy it) and the session writes
    /// each run's new rows into.
    window: Vec<Tensor<f32>>,
    /// This session's bindings on the model's runners (`[0]`: `OrtModel::runner`, `[1]`: the
    /// static decode graph), made at the first run; a failed run drops its binding.
    bound: [Option<Bound>; 2],
    /// Logits of the last evaluation, `rows.len() x n_vocab`; `rows[j]` is the index (into
    /// the evaluated tokens) of row j.
    logits: Vec<f32>,
    rows: Vec<usize>,
    cancel: crate::CancelHandle,
    /// The edit layer's state (shared code with the llama.cpp backend: `editing`).
    edits: SessionEdits,
    /// What the pinned plan feeds into the graph's slots.
    feeds: Option<Arc<slots::SlotFeeds>>,
    /// The feeds apply to evaluations (off while a memory routes with the base model).
    installed: bool,
    answer: Option<crate::answer::AnswerPlan>,
    /// Rows of the captured sites in the last evaluation (`OrtOptions::capture`), `[T, n_embd]`.
    captured: Vec<(amend_edits::HookPoint, Vec<f32>)>,
}

impl OrtSession {
    /// A session of `n_ctx` positions, at most the model's trained context, as a llama.cpp
    /// [`crate::Session`] clamps it (so that both backends stop, and check sampling windows,
    /// at the same length).
    pub fn new(model: &Arc<OrtModel>, n_ctx: usize) -> Result<OrtSession, RuntimeError> {
        if n_ctx == 0 || n_ctx > crate::MAX_N_CTX as usize {
            return Err(RuntimeError::InvalidOptions(format!(
                "n_ctx {n_ctx} is outside 1..={}",
                crate::MAX_N_CTX
            )));
        }
        let n_ctx = match model.vocab.info().n_ctx_train as usize {
            0 => n_ctx,
            train => n_ctx.min(train),
        };
        if let Some(st) = model.options.static_shapes {
            if n_ctx > st.window {
                return Err(RuntimeError::InvalidOptions(format!(
                    "n_ctx {n_ctx} exceeds the static KV window of {} positions",
                    st.window
                )));
            }
        }
        let window = match model.options.static_shapes {
            Some(st) => {
                let c = &model.cfg;
                let shape = vec![
                    1i64,
                    c.n_head_kv as i64,
                    st.window as i64,
                    c.head_dim as i64,
                ];
                (0..2 * c.n_layer)
                    .map(|_| {
                        Tensor::from_array((
                            shape.clone(),
                            vec![0f32; c.n_head_kv * st.window * c.head_dim],
                        ))
                        .map_err(ort_err("KV window"))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => Vec::new(),
        };
        let mut s = OrtSession {
            model: model.clone(),
            n_ctx,
            n_past: 0,
            kv: Vec::new(),
            window,
            bound: [None, None],
            logits: Vec::new(),
            rows: Vec::new(),
            cancel: crate::CancelHandle(Arc::new(std::sync::atomic::AtomicBool::new(false))),
            edits: SessionEdits::default(),
            feeds: None,
            installed: false,
            answer: None,
            captured: Vec::new(),
        };
        s.kv_clear()?;
        Ok(s)
    }

    pub fn model(&self) -> &Arc<OrtModel> {
        &self.model
    }

    pub fn n_past(&self) -> usize {
        self.n_past
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn empty_kv(&self, len: usize, data: Vec<f32>) -> Result<DynValue, RuntimeError> {
        let c = &self.model.cfg;
        let shape = vec![1i64, c.n_head_kv as i64, len as i64, c.head_dim as i64];
        Ok(Tensor::from_array((shape, data))
            .map_err(ort_err("KV tensor"))?
            .into_dyn())
    }

    /// Empties the KV cache.
    pub fn kv_clear(&mut self) -> Result<(), RuntimeError> {
        let n = 2 * self.model.cfg.n_layer;
        let mut kv = Vec::with_capacity(n);
        if self.window.is_empty() {
            for _ in 0..n {
                kv.push(self.empty_kv(0, Vec::new())?);
            }
        }
        self.kv = kv;
        self.bind_kv();
        self.n_past = 0;
        self.logits.clear();
        self.rows.clear();
        if let Some(a) = &mut self.answer {
            a.truncate(0);
        }
        Ok(())
    }

    /// Binds the dynamic graph's `past_*` to `self.kv` (the binding keeps `kv`'s values
    /// alive, so a replaced cache is released here rather than at the next run); a binding
    /// that fails is dropped.
    fn bind_kv(&mut self) {
        if self.model.options.static_shapes.is_some() {
            return;
        }
        if let Some(b) = &mut self.bound[0] {
            if b.bind_kv(&self.kv).is_err() {
                self.bound[0] = None;
            }
        }
    }

    /// Keeps the first `keep` positions of the KV cache.
    pub fn kv_truncate(&mut self, keep: usize) -> Result<(), RuntimeError> {
        if keep > self.n_past {
            return Err(RuntimeError::KvTruncate {
                keep,
                reason: format!("only {} positions are cached", self.n_past),
            });
        }
        let c = &self.model.cfg;
        let (nkv, hd, past) = (c.n_head_kv, c.head_dim, self.n_past);
        // The static window keeps its rows; the graphs mask positions from n_past on.
        let mut kv = Vec::with_capacity(self.kv.len());
        for v in &self.kv {
            let (_, data) = v
                .try_extract_tensor::<f32>()
                .map_err(ort_err("reading the KV cache"))?;
            let mut out = Vec::with_capacity(nkv * keep * hd);
            for h in 0..nkv {
                out.extend_from_slice(&data[h * past * hd..][..keep * hd]);
            }
            kv.push(self.empty_kv(keep, out)?);
        }
        self.kv = kv;
        self.bind_kv();
        self.n_past = keep;
        self.logits.clear();
        self.rows.clear();
        if let Some(a) = &mut self.answer {
            a.truncate(keep);
        }
        Ok(())
    }

    /// cos/sin `[T, hd/2]` of positions `p0..p0+t`, computed as ggml's RoPE does (theta
    /// multiplied up per dimension pair in f32; frequency factors divide it).
    fn rope(&self, p0: usize, t: usize, base: f32, freq_scale: f32) -> (Vec<f32>, Vec<f32>) {
        let hd = self.model.cfg.head_dim;
        let half = hd / 2;
        let theta_scale = base.powf(-2.0 / hd as f32);
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in p0..p0 + t {
            let mut theta_extrap = p as f32;
            for i in 0..half {
                let ff = self
                    .model
                    .rope_freqs
                    .as_ref()
                    .and_then(|f| f.get(i).copied())
                    .unwrap_or(1.0);
                let theta = freq_scale * (theta_extrap / ff);
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta_extrap *= theta_scale;
            }
        }
        (cos, sin)
    }

    /// Evaluates `tokens` at the next positions as a prompt (its last token marked as the last
    /// prompt token); the logits of the positions `logits` selects are then available through
    /// [`OrtSession::logits`].
    pub fn eval(&mut self, tokens: &[Token], logits: Logits) -> Result<(), RuntimeError> {
        self.eval_with(tokens, EvalOptions::prefill(logits))
    }

    /// Evaluates `tokens` at the next positions with the pinned edits applied (see
    /// [`EvalOptions`]: the phase and last prompt token gate codebook lookups).
    pub fn eval_with(
        &mut self,
        tokens: &[Token],
        options: EvalOptions,
    ) -> Result<(), RuntimeError> {
        let logits = options.logits;
        if tokens.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        let model = self.model.clone();
        let c = &model.cfg;
        for &t in tokens {
            if t < 0 || t as usize >= c.n_vocab {
                return Err(RuntimeError::InvalidToken {
                    token: t,
                    n_vocab: c.n_vocab as u32,
                });
            }
        }
        let (t, p) = (tokens.len(), self.n_past);
        let s = p + t;
        if s > self.n_ctx {
            return Err(RuntimeError::ContextFull {
                needed: s,
                n_ctx: self.n_ctx as u32,
            });
        }
        if let Some(st) = model.options.static_shapes {
            return self.eval_static(st, tokens, options);
        }
        let mut rows: Vec<usize> = (0..t).filter(|&i| logits.wants(i, t)).collect();
        // The graph always yields at least one row; an unwanted last row is dropped below.
        let none = rows.is_empty();
        if none {
            rows.push(t - 1);
        }
        let half = c.head_dim / 2;
        // The binding is out of the session while it is used: an error drops it, and the next
        // run makes a fresh one (nothing half-bound survives).
        let mut b = match self.bound[0].take() {
            Some(b) => b,
            None => {
                let mut b = Bound::new(&model.runner.lock().unwrap_or_else(|e| e.into_inner()))?;
                b.bind_kv(&self.kv)?;
                b
            }
        };
        let last_prompt = options.last_prompt(t);
        let (feeds, record) = self.slot_feeds()?;
        let n_layer = c.n_layer;
        let capture = &model.options.capture;
        let mut captured = Vec::with_capacity(capture.len());
        let plan = self.edits.plan().cloned();
        let explain = self.edits.explain.clone();
        let this = &*self;
        let ran = (|| -> Result<(Vec<f32>, Vec<DynValue>), RuntimeError> {
            // The run's own inputs, rebound every run.
            let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
            match model.embd.rows(&ids)? {
                embedding::Rows::Q8_0(codes, scales) => {
                    let kb = c.n_embd / 32;
                    b.input(graph::EMBD_CODES, &host_tensor(&[1, t, kb, 32], codes)?)?;
                    b.input(graph::EMBD_SCALES, &host_tensor(&[1, t, kb, 1], scales)?)?;
                }
                embedding::Rows::F32(rows) => {
                    b.input(graph::EMBD_ROWS, &host_tensor(&[1, t, c.n_embd], rows)?)?
                }
            }
            let mask = |window: Option<usize>| {
                let mut m = vec![0f32; t * s];
                for i in 0..t {
                    let qp = p + i;
                    for j in 0..s {
                        // llama.cpp masks a key after the query, or (sliding window) when
                        // query pos - key pos >= n_swa.
                        if j > qp || window.is_some_and(|w| qp - j >= w) {
                            m[i * s + j] = f32::NEG_INFINITY;
                        }
                    }
                }
                m
            };
            let (cos, sin) = this.rope(p, t, c.rope_base, c.rope_freq_scale);
            b.input("rope_cos", &host_tensor(&[t, half], cos)?)?;
            b.input("rope_sin", &host_tensor(&[t, half], sin)?)?;
            b.input("mask", &host_tensor(&[t, s], mask(None))?)?;
            if graph::has_swa(c) {
                let (cos, sin) = this.rope(p, t, c.rope_base_swa, 1.0);
                b.input("rope_cos_swa", &host_tensor(&[t, half], cos)?)?;
                b.input("rope_sin_swa", &host_tensor(&[t, half], sin)?)?;
                b.input("mask_swa", &host_tensor(&[t, s], mask(c.sliding_window))?)?;
            }
            let r: Vec<i64> = rows.iter().map(|&x| x as i64).collect();
            b.input(graph::LOGIT_ROWS, &host_tensor(&[r.len()], r)?)?;
            // The slots: bound again only when the fed snapshot changes (or a codebook's gate).
            if let Some(f) = &feeds {
                b.feeds.bind(&mut b.io, f, t, last_prompt)?;
            }
            // `past_*` are bound already: to the previous run's `present_*` (or a cleared or
            // truncated cache).
            let mut runner = model.runner.lock().unwrap_or_else(|e| e.into_inner());
            let mut out = runner
                .run_binding(&b.io)
                .map_err(|err| RuntimeError::Ort(format!("run: {err}")))?;
            if let (true, Some(f), Some(plan)) = (record, feeds.as_deref(), plan.as_ref()) {
                let mut ex = explain.lock().unwrap_or_else(|e| e.into_inner());
                f.record_run(plan, t, last_prompt, p, &out, &mut ex);
            }
            for &point in capture {
                let name = graph::site_tensor(point);
                let rows = output_f32(out.get(name.as_str()), &name, t * c.n_embd)?;
                captured.push((point, rows.to_vec()));
            }
            let l = output_f32(
                out.get(graph::LOGITS),
                graph::LOGITS,
                rows.len() * c.n_vocab,
            )?;
            let l = l.to_vec();
            let mut kv = Vec::with_capacity(2 * n_layer);
            for il in 0..n_layer {
                for name in [graph::present_key(il), graph::present_value(il)] {
                    let v = out.remove(&name);
                    output_f32(v.as_ref(), &name, c.n_head_kv * s * c.head_dim)?;
                    kv.push(v.expect("checked by output_f32"));
                }
            }
            drop(out);
            drop(runner);
            // Every output back to unallocated: a bound output keeps its tensor for the next
            // run, whose shapes differ here (ONNX Runtime refuses that), and the binding would
            // hold this run's logits. The new cache becomes the next run's `past_*`.
            b.bind_outputs()?;
            b.bind_kv(&kv)?;
            Ok((l, kv))
        })();
        let (l, kv) = match ran {
            Ok(x) => x,
            Err(e) => {
                // Start over rather than keep a state the failed run may have half changed.
                drop(b);
                let _ = self.kv_clear();
                return Err(e);
            }
        };
        self.bound[0] = Some(b);
        self.logits = if none { Vec::new() } else { l };
        self.kv = kv;
        self.rows = if none { Vec::new() } else { rows };
        self.n_past = s;
        self.captured = captured;
        self.force_answer(tokens, p, last_prompt);
        Ok(())
    }

    /// What a run feeds the graph's slots: the pinned plan's feeds while they apply, else every
    /// slot's sentinel (none for a graph without slots); and whether the run records what fired.
    fn slot_feeds(&self) -> Result<(Option<Arc<slots::SlotFeeds>>, bool), RuntimeError> {
        let pinned = if self.installed {
            self.feeds.clone()
        } else {
            None
        };
        let feeds = match (pinned, self.model.options.slots.is_empty()) {
            (Some(f), _) => Some(f),
            (None, true) => None,
            (None, false) => Some(self.model.empty_feeds()?),
        };
        let record = self.installed && feeds.is_some();
        Ok((feeds, record))
    }

    /// A routed memory's answer: forced into the evaluated rows as on the llama.cpp backend.
    fn force_answer(&mut self, tokens: &[Token], p: usize, last_prompt: Option<usize>) {
        if let Some(mut plan) = self.answer.take() {
            let nv = self.model.cfg.n_vocab;
            for (j, &tok) in tokens.iter().enumerate() {
                plan.observe(p + j, tok, last_prompt == Some(j));
                if let Some(k) = self.rows.iter().position(|&r| r == j) {
                    if let Some(forced) = plan.forced(p + j) {
                        crate::answer::force(&mut self.logits[k * nv..(k + 1) * nv], forced);
                    }
                }
            }
            self.answer = Some(plan);
        }
    }

    /// [`OrtSession::eval_with`] on a static pair of graphs: the tokens run in segments of at
    /// most `chunk` (padded to the graph's length), each ending where a row of logits is
    /// wanted (the graphs return one row, their last real token's); every segment's new K and
    /// V go into the window.
    fn eval_static(
        &mut self,
        st: StaticShapes,
        tokens: &[Token],
        options: EvalOptions,
    ) -> Result<(), RuntimeError> {
        let (t, p) = (tokens.len(), self.n_past);
        let wanted: Vec<usize> = (0..t).filter(|&i| options.logits.wants(i, t)).collect();
        let nv = self.model.cfg.n_vocab;
        let last_prompt = options.last_prompt(t);
        let mut logits = Vec::with_capacity(wanted.len() * nv);
        let mut start = 0;
        while start < t {
            let mut end = (start + st.chunk).min(t);
            if let Some(&w) = wanted.iter().find(|&&w| w >= start && w < end) {
                end = w + 1;
            }
            let lp = last_prompt
                .filter(|&i| (start..end).contains(&i))
                .map(|i| i - start);
            let row = match self.run_static(st, &tokens[start..end], p + start, lp) {
                Ok(row) => row,
                Err(e) => {
                    // Segments before this one are in the window: keep them, drop the rest.
                    self.n_past = p + start;
                    self.logits.clear();
                    self.rows.clear();
                    return Err(e);
                }
            };
            if wanted.contains(&(end - 1)) {
                logits.extend_from_slice(&row);
            }
            start = end;
        }
        self.logits = logits;
        self.rows = wanted;
        self.n_past = p + t;
        self.captured.clear();
        self.force_answer(tokens, p, last_prompt);
        Ok(())
    }

    /// One run of a static graph on `seg` (1..=chunk tokens) at positions `p0..` (`last_prompt`:
    /// the index of the last prompt token within it, if there): returns the logits of its last
    /// token and writes its K and V into the window.
    fn run_static(
        &mut self,
        st: StaticShapes,
        seg: &[Token],
        p0: usize,
        last_prompt: Option<usize>,
    ) -> Result<Vec<f32>, RuntimeError> {
        let model = self.model.clone();
        let (feeds, record) = self.slot_feeds()?;
        let plan = self.edits.plan().cloned();
        let explain = self.edits.explain.clone();
        let c = &model.cfg;
        let (n, w) = (seg.len(), st.window);
        // The decode graph for one token when there is one; else the prefill graph, padded.
        let (tg, gi, runner) = match (&model.decode, n) {
            (Some(d), 1) => (1, 1, d),
            _ => (st.chunk, 0, &model.runner),
        };
        let (nkv, hd, half) = (c.n_head_kv, c.head_dim, c.head_dim / 2);
        let mut ids: Vec<i64> = seg.iter().map(|&x| x as i64).collect();
        ids.resize(tg, *ids.last().expect("a segment has a token"));
        // Query i (at p0 + i) sees the filled window positions and the chunk's keys up to
        // itself; a padded query sees the same, and nothing real attends to it.
        let mask = |swa: Option<usize>| {
            let mut m = vec![f32::NEG_INFINITY; tg * (w + tg)];
            for i in 0..tg {
                let qp = p0 + i;
                let row = &mut m[i * (w + tg)..(i + 1) * (w + tg)];
                let visible = |kp: usize| kp <= qp && swa.is_none_or(|s| qp - kp < s);
                for (j, v) in row[..p0.min(w)].iter_mut().enumerate() {
                    if visible(j) {
                        *v = 0.0;
                    }
                }
                for j in 0..=i {
                    if visible(p0 + j) {
                        row[w + j] = 0.0;
                    }
                }
            }
            m
        };
        let mut inputs: Vec<(&str, DynValue)> = Vec::new();
        match model.embd.rows(&ids)? {
            embedding::Rows::Q8_0(codes, scales) => {
                let kb = c.n_embd / 32;
                inputs.push((graph::EMBD_CODES, host_tensor(&[1, tg, kb, 32], codes)?));
                inputs.push((graph::EMBD_SCALES, host_tensor(&[1, tg, kb, 1], scales)?));
            }
            embedding::Rows::F32(rows) => {
                inputs.push((graph::EMBD_ROWS, host_tensor(&[1, tg, c.n_embd], rows)?))
            }
        }
        let (cos, sin) = self.rope(p0, tg, c.rope_base, c.rope_freq_scale);
        inputs.push(("rope_cos", host_tensor(&[tg, half], cos)?));
        inputs.push(("rope_sin", host_tensor(&[tg, half], sin)?));
        inputs.push(("mask", host_tensor(&[tg, w + tg], mask(None))?));
        if graph::has_swa(c) {
            let (cos, sin) = self.rope(p0, tg, c.rope_base_swa, 1.0);
            inputs.push(("rope_cos_swa", host_tensor(&[tg, half], cos)?));
            inputs.push(("rope_sin_swa", host_tensor(&[tg, half], sin)?));
            inputs.push((
                "mask_swa",
                host_tensor(&[tg, w + tg], mask(c.sliding_window))?,
            ));
        }
        inputs.push((graph::LOGIT_ROWS, host_tensor(&[1], vec![(n - 1) as i64])?));
        // Out of the session while used, as in `eval_with`: an error drops it. Its outputs
        // stay bound: a static graph's shapes never change, so ONNX Runtime writes every run
        // into the tensors it allocated at the first.
        let mut b = match self.bound[gi].take() {
            Some(b) => b,
            None => Bound::new(&runner.lock().unwrap_or_else(|e| e.into_inner()))?,
        };
        let window = &mut self.window;
        let ran = (|| -> Result<Vec<f32>, RuntimeError> {
            for (name, v) in &inputs {
                b.input(name, v)?;
            }
            if let Some(f) = &feeds {
                b.feeds.bind(&mut b.io, f, tg, last_prompt)?;
            }
            // The window's own tensors (no copy where ONNX Runtime reads host memory in
            // place, as on every EP here), bound again each run so that an EP that copies
            // inputs to its device at binding still sees the rows written since.
            for (i, v) in window.iter().enumerate() {
                b.input(&past_name(i), v)?;
            }
            let mut r = runner.lock().unwrap_or_else(|e| e.into_inner());
            let out = r
                .run_binding(&b.io)
                .map_err(|err| RuntimeError::Ort(format!("run: {err}")))?;
            if let (true, Some(f), Some(plan)) = (record, feeds.as_deref(), plan.as_ref()) {
                let mut ex = explain.lock().unwrap_or_else(|e| e.into_inner());
                f.record_run(plan, n, last_prompt, p0, &out, &mut ex);
            }
            let row = output_f32(out.get(graph::LOGITS), graph::LOGITS, c.n_vocab)?.to_vec();
            // New rows [n_head_kv, tg, head_dim] (the first n real) into the window at p0.
            for (i, buf) in window.iter_mut().enumerate() {
                let name = present_name(i);
                let new = output_f32(out.get(name.as_str()), &name, nkv * tg * hd)?;
                let (_, buf) = buf.extract_tensor_mut();
                for h in 0..nkv {
                    for r in 0..n {
                        let dst = (h * w + p0 + r) * hd;
                        let src = (h * tg + r) * hd;
                        buf[dst..dst + hd].copy_from_slice(&new[src..src + hd]);
                    }
                }
            }
            Ok(row)
        })();
        if ran.is_ok() {
            self.bound[gi] = Some(b);
        }
        ran
    }

    /// The rows at `point` (one of `OrtOptions::capture`) in the last evaluation: `[T, n_embd]`
    /// for its T tokens, as the site computes them (before edit slots write there).
    pub fn captured(&self, point: amend_edits::HookPoint) -> Option<&[f32]> {
        self.captured
            .iter()
            .find(|(p, _)| *p == point)
            .map(|(_, r)| r.as_slice())
    }

    /// Logits at index `i` of the last evaluated tokens.
    pub fn logits(&self, i: usize) -> Result<&[f32], RuntimeError> {
        let nv = self.model.cfg.n_vocab;
        let j = self
            .rows
            .iter()
            .position(|&r| r == i)
            .ok_or(RuntimeError::NoLogits { index: i })?;
        Ok(&self.logits[j * nv..(j + 1) * nv])
    }

    /// Logits of the last row the last evaluation produced.
    pub fn last_logits(&self) -> Result<&[f32], RuntimeError> {
        let i = *self
            .rows
            .last()
            .ok_or(RuntimeError::NoLogits { index: 0 })?;
        self.logits(i)
    }

    /// Greedy continuation of `prompt` (tokens), `n` tokens, stopping at end of generation.
    pub fn generate_greedy(
        &mut self,
        prompt: &[Token],
        n: usize,
    ) -> Result<Vec<Token>, RuntimeError> {
        self.eval(prompt, Logits::Last)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let tok = crate::reference::argmax(self.last_logits()?) as Token;
            if self.model.vocab.is_eog(tok) {
                break;
            }
            out.push(tok);
            if out.len() == n {
                break;
            }
            self.eval(&[tok], Logits::Last)?;
        }
        Ok(out)
    }
}

impl EditHost for OrtSession {
    fn edits(&self) -> &SessionEdits {
        &self.edits
    }
    fn edits_mut(&mut self) -> &mut SessionEdits {
        &mut self.edits
    }
    fn plan_target(&self) -> &dyn PlanTarget {
        &*self.model
    }
    fn vocab_model(&self) -> &Model {
        &self.model.vocab
    }
    fn prepare(&mut self, plan: &Arc<EditPlan>) -> Result<(), RuntimeError> {
        self.feeds = None;
        for m in &plan.memories {
            if let amend_edits::families::Embedder::BaseModel { .. } = m.mem.embedder() {
                return Err(RuntimeError::Unsupported(format!(
                    "bundle {}: a memory embedded with the base model's hidden states routes on llama.cpp only (recompile it with the scope model)",
                    plan.bundle_id(m.bundle)
                )));
            }
        }
        self.feeds = Some(Arc::new(self.model.feeds(Some(plan))?));
        Ok(())
    }
    fn install(&mut self, _plan: &Arc<EditPlan>) -> Result<(), RuntimeError> {
        self.installed = true;
        Ok(())
    }
    fn uninstall(&mut self) -> Result<(), RuntimeError> {
        self.installed = false;
        Ok(())
    }
    fn embed(
        &mut self,
        _text: &str,
        _layer: u32,
        _site: amend_edits::Site,
        _pooling: amend_edits::families::Pooling,
    ) -> Result<Vec<f32>, RuntimeError> {
        // `prepare` refuses such memories before any routing.
        Err(RuntimeError::Unsupported(
            "base-model memory embeddings on ONNX Runtime".into(),
        ))
    }
    fn set_answer(&mut self, plan: Option<crate::answer::AnswerPlan>) {
        self.answer = plan;
    }
}

impl OrtSession {
    /// Attaches a live edit set (as [`crate::Session::set_edit_set`]): each later request pins
    /// its current snapshot and feeds it into the graph's slots. `None` detaches.
    pub fn set_edit_set(
        &mut self,
        set: Option<Arc<amend_edits::EditSet>>,
    ) -> Result<(), RuntimeError> {
        crate::editing::set_edit_set(self, set)
    }

    /// The scope model that routes scope-model memories.
    pub fn set_scope_model(
        &mut self,
        scope: Option<Arc<crate::ScopeModel>>,
    ) -> Result<(), RuntimeError> {
        crate::editing::set_scope_model(self, scope)
    }

    /// Scales bundle `bundle_id`'s low-rank deltas (0 disables them).
    pub fn set_lora_scale(&mut self, bundle_id: &str, scale: f32) -> Result<(), RuntimeError> {
        crate::editing::set_lora_scale(self, bundle_id, scale)
    }

    /// Starts a request: see [`crate::Session::begin_request`].
    pub fn begin_request(&mut self, prompt: &str) -> Result<crate::Request, RuntimeError> {
        crate::editing::begin(self, Some(prompt))
    }

    /// Pins the attached set without a text prompt (memories are not consulted).
    pub fn pin_edits(&mut self) -> Result<Option<u64>, RuntimeError> {
        Ok(crate::editing::begin(self, None)?.generation)
    }

    /// What fired during the last request.
    pub fn explain(&self) -> crate::Explain {
        self.edits.explain_snapshot()
    }
}

impl OrtSession {
    /// A handle that stops a running generation from any thread (between tokens).
    pub fn cancel_handle(&self) -> crate::CancelHandle {
        self.cancel.clone()
    }

    /// Generates from a text prompt with llama.cpp's tokenizer and sampler chain, the attached
    /// edit set pinned for the request (a memory may route the prompt).
    pub fn generate(
        &mut self,
        prompt: &str,
        params: &crate::GenerateParams,
        mut on_token: impl FnMut(&crate::TokenEvent<'_>) -> std::ops::ControlFlow<()>,
    ) -> Result<crate::GenerateOutput, RuntimeError> {
        if prompt.is_empty() {
            return Err(RuntimeError::EmptyInput);
        }
        let request = self.begin_request(prompt)?;
        let tokens = self.model.tokenize(&request.prompt, params.add_bos)?;
        crate::generate::generate_on(self, &tokens, params, &mut on_token)
    }
}

impl crate::backend::Backend for OrtSession {
    fn backend_name(&self) -> String {
        format!("onnxruntime ({})", self.model.options.ep.name())
    }
    fn backend_id(&self) -> String {
        PlanTarget::backend_id(&*self.model)
    }
    fn vocab(&self) -> &Arc<Model> {
        &self.model.vocab
    }
    fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    fn n_past(&self) -> usize {
        self.n_past
    }
    fn kv_clear(&mut self) -> Result<(), RuntimeError> {
        OrtSession::kv_clear(self)
    }
    fn kv_truncate(&mut self, keep: usize) -> Result<(), RuntimeError> {
        OrtSession::kv_truncate(self, keep)
    }
    fn eval(&mut self, tokens: &[Token], options: crate::EvalOptions) -> Result<(), RuntimeError> {
        OrtSession::eval_with(self, tokens, options)
    }
    fn logits(&self, i: usize) -> Result<&[f32], RuntimeError> {
        OrtSession::logits(self, i)
    }
    fn last_logits(&self) -> Result<&[f32], RuntimeError> {
        OrtSession::last_logits(self)
    }
    fn sample(&mut self, sampler: &crate::generate::Sampler) -> Result<Token, RuntimeError> {
        sampler.sample_logits(self.last_logits()?)
    }
    fn take_cancel(&mut self) -> bool {
        self.cancel
            .0
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }
    fn supports(&self, capability: crate::backend::Capability) -> bool {
        use crate::backend::Capability as C;
        match capability {
            // Edits reach the graph through its slots; arbitrary row hooks do not exist here.
            C::HookRows => false,
            C::LowRank | C::Memory => true,
        }
    }
    fn set_edit_set(&mut self, set: Option<Arc<amend_edits::EditSet>>) -> Result<(), RuntimeError> {
        OrtSession::set_edit_set(self, set)
    }
    fn set_scope_model(
        &mut self,
        scope: Option<Arc<crate::ScopeModel>>,
    ) -> Result<(), RuntimeError> {
        OrtSession::set_scope_model(self, scope)
    }
    fn set_lora_scale(&mut self, bundle_id: &str, scale: f32) -> Result<(), RuntimeError> {
        OrtSession::set_lora_scale(self, bundle_id, scale)
    }
    fn begin_request(&mut self, prompt: &str) -> Result<crate::Request, RuntimeError> {
        OrtSession::begin_request(self, prompt)
    }
    fn scope_model(&self) -> Option<&Arc<crate::ScopeModel>> {
        self.edits.scope()
    }
    fn explain(&self) -> crate::Explain {
        OrtSession::explain(self)
    }
    fn generate_text(
        &mut self,
        prompt: &str,
        params: &crate::GenerateParams,
        on_token: &mut dyn FnMut(&crate::TokenEvent<'_>) -> std::ops::ControlFlow<()>,
    ) -> Result<crate::GenerateOutput, RuntimeError> {
        OrtSession::generate(self, prompt, params, on_token)
    }
}

#[cfg(test)]
mod tests {
    /// The graph is built from one read of the file, which must carry the header the vocabulary
    /// and the configuration came from: a file rewritten after the vocabulary loaded (here with
    /// other tensor types, which would build without complaint) is refused.
    #[test]
    fn a_model_rewritten_after_its_vocabulary_loaded_is_refused() {
        use super::{build_onnx, graph, OrtOptions};
        use crate::{testutil, Architecture, RuntimeError};
        use amend_edits::gguf::{GgmlType, GgufFile, ModelHparams};
        let dir = std::env::temp_dir().join(format!("amend-ort-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.gguf"), dir.join("b.gguf"));
        testutil::write_tiny_model(&a, Architecture::Llama, 7).unwrap();
        testutil::write_tiny_model_typed(&b, Architecture::Llama, 7, GgmlType::Q8_0).unwrap();
        let vocab = vocab_only(&a);
        let checked = vocab.checked_path();
        if cfg!(target_os = "linux") {
            // llama.cpp read the vocabulary from a sealed copy of the header; the tensor data is
            // a hole of the file's length.
            assert!(vocab.runs_from_private_copy());
            assert_ne!(checked, a);
            let copy = std::fs::read(&checked).unwrap();
            let file = std::fs::read(&a).unwrap();
            let d = GgufFile::read_header(&a).unwrap().data_offset as usize;
            assert_eq!(copy.len(), file.len());
            assert_eq!(copy[..d], file[..d]);
            assert!(copy[d..].iter().all(|&x| x == 0));
            assert!(file[d..].iter().any(|&x| x != 0));
        }
        let header = GgufFile::read_header(&checked).unwrap();
        let hp = ModelHparams::from_header(&header).unwrap();
        let cfg = crate::config::ModelConfig::from_hparams(&hp, Architecture::Llama).unwrap();
        let options = OrtOptions::default();
        let build = || build_onnx(&a, &checked, &cfg, &options, graph::Shapes::Dynamic, "t");
        assert!(build().is_ok());
        // Rewritten in place, after the vocabulary loaded and before the graph reads the file.
        std::fs::write(&a, std::fs::read(&b).unwrap()).unwrap();
        match build() {
            Err(RuntimeError::ModelChanged { detail, .. }) => {
                assert!(detail.contains("header"), "{detail}")
            }
            other => panic!("expected ModelChanged, got {:?}", other.map(|_| ())),
        }
        // The new file alone is a model the graph builder takes.
        let hb = GgufFile::read_header(&b).unwrap();
        let hpb = ModelHparams::from_header(&hb).unwrap();
        let cfgb = crate::config::ModelConfig::from_hparams(&hpb, Architecture::Llama).unwrap();
        assert!(build_onnx(&b, &b, &cfgb, &options, graph::Shapes::Dynamic, "t").is_ok());
        drop(vocab);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `path` opened as the ONNX Runtime backend opens it for its tokenizer.
    fn vocab_only(path: &std::path::Path) -> std::sync::Arc<crate::Model> {
        let options = crate::ModelOptions {
            vocab_only: true,
            n_threads: Some(1),
            ..Default::default()
        };
        crate::Model::open(path, options).unwrap()
    }

    /// The cache-hit path reads the RoPE frequency factors from the vocabulary's sealed copy, so
    /// a file rewritten after open does not change them.
    #[test]
    fn rope_freqs_come_from_the_sealed_copy() {
        use super::read_rope_freqs;
        use crate::{testutil, Architecture};
        use amend_edits::gguf::GgufFile;
        let dir = std::env::temp_dir().join(format!("amend-ort-rope-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.gguf"), dir.join("b.gguf"));
        let freqs = [1.0f32, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0];
        testutil::write_tiny_model_rope_freqs(&a, Architecture::Llama, 7, &freqs).unwrap();
        let other = [4.0f32; 8];
        testutil::write_tiny_model_rope_freqs(&b, Architecture::Llama, 7, &other).unwrap();
        let vocab = vocab_only(&a);
        let checked = vocab.checked_path();
        let header = GgufFile::read_header(&checked).unwrap();
        assert_eq!(
            read_rope_freqs(&checked, &a, &header).unwrap().unwrap(),
            freqs
        );
        // The file now holds other factors at the same offsets (the same layout).
        std::fs::write(&a, std::fs::read(&b).unwrap()).unwrap();
        assert_eq!(read_rope_freqs(&a, &a, &header).unwrap().unwrap(), other);
        let want: &[f32] = if cfg!(target_os = "linux") {
            assert!(vocab.runs_from_private_copy());
            // Only the header and the factors were copied: the weights are a hole.
            let copy = std::fs::read(&checked).unwrap();
            let d = header.data_offset as usize;
            let nonzero = copy[d..].iter().filter(|&&x| x != 0).count();
            assert!(nonzero > 0 && nonzero <= 4 * freqs.len(), "{nonzero}");
            &freqs
        } else {
            &other
        };
        assert_eq!(
            read_rope_freqs(&checked, &a, &header).unwrap().unwrap(),
            want
        );
        drop(vocab);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn library_version_is_a_plain_dotted_number() {
        assert_eq!(super::plain_version("1.24.1"), "1.24.1");
        assert_eq!(super::plain_version("1.2;rm"), "unknown");
        assert_eq!(super::plain_version(""), "unknown");
        assert_eq!(super::plain_version(&"1".repeat(40)), "unknown");
        // A path that is not a loaded library.
        assert_eq!(
            super::version_of(std::path::Path::new("/nonexistent.so")),
            "unknown"
        );
    }

    #[test]
    fn backend_id_names_what_changes_the_numbers() {
        use super::{graph, Ep, OrtOptions, Profile, StaticShapes};
        let g = graph::GRAPH_VERSION;
        let ov = OrtOptions {
            ep: Ep::parse("openvino").unwrap(),
            ..Default::default()
        };
        let base = format!("onnxruntime-1.24.1:openvino:CPU/g{g}-cpu");
        assert_eq!(ov.backend_id("1.24.1"), base);
        // Threads do not change the numbers; the rest does, each its own id.
        let same = OrtOptions {
            n_threads: Some(2),
            ..ov.clone()
        };
        assert_eq!(same.backend_id("1.24.1"), base);
        let variants = [
            OrtOptions {
                profile: Profile::Portable,
                ..ov.clone()
            },
            OrtOptions {
                emulation: graph::Emulation::parse("kv,gelu").unwrap(),
                ..ov.clone()
            },
            OrtOptions {
                static_shapes: Some(StaticShapes::parse("64,1024").unwrap()),
                ..ov.clone()
            },
            OrtOptions {
                static_shapes: Some(StaticShapes::parse("32,1024").unwrap()),
                ..ov.clone()
            },
            OrtOptions {
                ep_options: vec![("load_config".into(), "{}".into())],
                ..ov.clone()
            },
            OrtOptions {
                ep_options: vec![("load_config".into(), "{ }".into())],
                ..ov.clone()
            },
        ];
        let mut ids: Vec<String> = variants.iter().map(|o| o.backend_id("1.24.1")).collect();
        assert_eq!(
            ids[0],
            format!("onnxruntime-1.24.1:openvino:CPU/g{g}-portable")
        );
        for id in &ids[1..] {
            let hash = id.strip_prefix(&format!("{base}-")).expect(id);
            assert!(
                hash.len() == 8 && hash.chars().all(|c| c.is_ascii_hexdigit()),
                "{id}"
            );
        }
        // The same options in another order are the same backend.
        let two = |a: (&str, &str), b: (&str, &str)| OrtOptions {
            ep_options: vec![(a.0.into(), a.1.into()), (b.0.into(), b.1.into())],
            ..ov.clone()
        };
        let (x, y) = (("a", "1"), ("b", "2"));
        assert_eq!(
            two(x, y).backend_id("1.24.1"),
            two(y, x).backend_id("1.24.1")
        );
        ids.push(two(x, y).backend_id("1.24.1"));
        ids.push(ov.backend_id("1.32.0"));
        ids.push(base);
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "every variant is its own backend: {ids:?}");
        assert!(ids.iter().all(|id| id.len() <= 64), "{ids:?}");
    }
}
