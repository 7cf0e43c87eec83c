//! Loading a GGUF model.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Once};

use llama_cpp_sys_2 as sys;

use amend_edits::fingerprint::{FingerprintError, ModelLayout};
use amend_edits::gguf::{GgufError, GgufFile, ModelHparams};
use amend_edits::ModelBinding;

use crate::arch::Architecture;
use crate::error::RuntimeError;
use crate::Token;

static BACKEND_INIT: Once = Once::new();

/// Routes llama.cpp/ggml log lines to the `log` crate: llama.cpp is chatty on stderr by default,
/// and the CLI's stdout/stderr must carry only what amend means to print.
unsafe extern "C" fn log_to_log_crate(
    level: sys::ggml_log_level,
    text: *const c_char,
    _: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated string valid for the duration of the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let msg = msg.trim_end();
    if msg.is_empty() {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR | sys::GGML_LOG_LEVEL_WARN => {
            log::debug!(target: "llama.cpp", "{msg}")
        }
        _ => log::trace!(target: "llama.cpp", "{msg}"),
    }
}

/// Initialises llama.cpp once per process (backend, logging). Called by [`Model::open`].
pub fn init_backend() {
    BACKEND_INIT.call_once(|| unsafe {
        sys::llama_log_set(Some(log_to_log_crate), std::ptr::null_mut());
        sys::llama_backend_init();
    });
}

/// How to load a model.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// Memory-map the weights (default true): loading is near-instant and pages are shared
    /// between processes.
    pub use_mmap: bool,
    /// Default thread count for sessions of this model, 1..=[`crate::MAX_THREADS`]; `None` =
    /// available parallelism.
    pub n_threads: Option<usize>,
    /// Load only the vocabulary (no weights): tokenization for a backend that runs the
    /// weights elsewhere (ONNX Runtime). Such a model cannot back a [`crate::Session`].
    pub vocab_only: bool,
    /// Run from a private, sealed in-memory copy of the file (default true, Linux): the checks,
    /// the fingerprint and llama.cpp all read that copy, so a process that rewrites the model
    /// file after (or while) it is opened changes nothing this model computes. Costs one copy of
    /// the file at open (about 0.1-0.3 s for 253 MB from the page cache) and makes the weights
    /// unevictable memory (`Shmem`) instead of file pages the kernel can drop and re-read.
    /// Off, llama.cpp maps the file itself. With `vocab_only` only the header is copied (the
    /// tensor data stays a hole): the vocabulary llama.cpp parses is the one checked.
    pub private_copy: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            use_mmap: true,
            n_threads: None,
            vocab_only: false,
            private_copy: true,
        }
    }
}

/// A model's dimensions and identity.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    pub architecture: Architecture,
    /// llama.cpp's description, e.g. "gemma3 270M Q4_K - Medium".
    pub description: String,
    pub n_layer: u32,
    pub n_embd: u32,
    /// FFN hidden size (of layer 0 when it varies per layer).
    pub n_ff: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_vocab: u32,
    pub n_ctx_train: u32,
    /// The file type, e.g. "Q4_K - Medium".
    pub quantization: String,
    pub n_params: u64,
    /// Bytes of tensor data.
    pub size_bytes: u64,
    pub bos: Option<Token>,
    pub eos: Option<Token>,
    /// Whether the tokenizer prepends BOS to a prompt.
    pub add_bos: bool,
}

/// A loaded model: immutable weights shared by any number of [`crate::Session`]s.
/// `Send + Sync`; share it as `Arc<Model>`.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
    info: ModelInfo,
    path: PathBuf,
    options: ModelOptions,
    /// What the pre-load check read: the fingerprint hashes it without parsing the file again.
    layout: ModelLayout,
    hparams: ModelHparams,
    /// The 2-D tensors' shapes, from the checked header (what low-rank deltas are checked
    /// against before llama.cpp sees them).
    matrices: Matrices,
    /// The sealed copy llama.cpp loaded: the whole file, or its header for `vocab_only`.
    copy: Option<PrivateCopy>,
    /// The binding of a whole-file copy (computed at open from the copy).
    copy_binding: Option<ModelBinding>,
}

// SAFETY: llama.cpp's model (weights, vocab) is read-only after loading and is documented to be
// shared by several contexts on several threads; all mutation happens in per-session contexts.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    /// Validates and loads a GGUF model. Errors: [`RuntimeError::NotFound`], `NotGguf`,
    /// `Truncated`, `InvalidGguf`, `UnsupportedArchitecture`, `LoadFailed`.
    pub fn open(path: impl AsRef<Path>, options: ModelOptions) -> Result<Arc<Model>, RuntimeError> {
        let path = path.as_ref();
        crate::session::check_threads(options.n_threads, "n_threads")?;
        // Refuse a FIFO (which would block the open below), a directory or a device before
        // anything reads the path.
        if let Err(e) = amend_edits::fsutil::open_regular(path, amend_edits::fsutil::MAX_MODEL_LEN)
        {
            return Err(match e.io_kind() {
                Some(std::io::ErrorKind::NotFound) => RuntimeError::NotFound {
                    path: path.to_path_buf(),
                },
                _ => RuntimeError::File(e),
            });
        }
        // The file as given is checked first, so that nothing is copied of a file that is not a
        // model (a 5 GB sparse file is refused in microseconds).
        let checked = check_gguf(path, path)?;
        let copy = match (options.private_copy, options.vocab_only) {
            (false, _) => None,
            (true, false) => PrivateCopy::of(path, None)?,
            // Vocabulary-only: the header is all llama.cpp reads (and the file's length, which
            // it checks the tensor extents against: the rest of the copy is a hole), plus the
            // small tensors the ONNX Runtime backend reads at open (`HOST_READ_TENSORS`), so that
            // they too are the bytes that were fingerprinted.
            (true, true) => PrivateCopy::of(path, Some(&checked.vocab_only_parts))?,
        };
        // What llama.cpp reads is what is checked: the sealed copy where there is one.
        let (load_path, checked) = match &copy {
            Some(c) => (c.path(), check_gguf(&c.path(), path)?),
            None => (path.to_path_buf(), checked),
        };
        let Checked {
            architecture,
            layout,
            hparams,
            matrices,
            ..
        } = checked;
        let copy_binding = match &copy {
            Some(c) if !options.vocab_only => Some(
                amend_edits::fingerprint::model_binding_of_copy(
                    path, &c.key, &c.file, &layout, &hparams,
                )
                .map_err(|e| RuntimeError::InvalidGguf {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?,
            ),
            _ => None,
        };
        if copy.is_none() && !options.vocab_only {
            // The check of every tensor's floats rides on the fingerprint's pass over the data
            // (cached next to the model): without a copy it runs here all the same.
            amend_edits::fingerprint::model_binding_parsed(path, &layout, &hparams).map_err(
                |e| RuntimeError::InvalidGguf {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                },
            )?;
        }
        let arch_name = hparams.arch.clone();
        init_backend();
        let cpath = CString::new(load_path.as_os_str().as_encoded_bytes()).map_err(|_| {
            RuntimeError::InvalidGguf {
                path: path.to_path_buf(),
                detail: "path contains a NUL byte".into(),
            }
        })?;
        // SAFETY: plain FFI; the params struct is a value, the path a valid C string.
        let ptr = unsafe {
            let mut p = sys::llama_model_default_params();
            p.n_gpu_layers = 0;
            p.vocab_only = options.vocab_only;
            p.load_mode = if options.use_mmap {
                sys::LLAMA_LOAD_MODE_MMAP
            } else {
                sys::LLAMA_LOAD_MODE_NONE
            };
            sys::llama_model_load_from_file(cpath.as_ptr(), p)
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| RuntimeError::LoadFailed {
            path: path.to_path_buf(),
        })?;
        // SAFETY: `ptr` is a live model; the vocab lives as long as it.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        let Some(vocab) = NonNull::new(vocab as *mut sys::llama_vocab) else {
            unsafe { sys::llama_model_free(ptr.as_ptr()) };
            return Err(RuntimeError::LoadFailed {
                path: path.to_path_buf(),
            });
        };
        let info = if options.vocab_only {
            // llama.cpp loads no hyperparameters vocabulary-only (its per-layer getters would
            // abort): the dimensions come from our own validated read of the header.
            unsafe { read_vocab_info(vocab.as_ptr(), architecture, &hparams) }
        } else {
            unsafe { read_info(ptr.as_ptr(), vocab.as_ptr(), architecture, &arch_name) }
        };
        log::debug!(
            "loaded {} ({}, {} layers, n_embd {})",
            path.display(),
            info.description,
            info.n_layer,
            info.n_embd
        );
        Ok(Arc::new(Model {
            ptr,
            vocab,
            info,
            path: path.to_path_buf(),
            options,
            layout,
            hparams,
            matrices,
            copy,
            copy_binding,
        }))
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn architecture(&self) -> Architecture {
        self.info.architecture
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn options(&self) -> &ModelOptions {
        &self.options
    }

    /// The hyperparameters validated before loading.
    pub fn hparams(&self) -> &ModelHparams {
        &self.hparams
    }

    /// The fingerprint bundles are bound to (cached next to the model; see
    /// [`amend_edits::fingerprint`]), from the header already read by [`Model::open`].
    pub fn binding(&self) -> Result<ModelBinding, FingerprintError> {
        if let Some(b) = &self.copy_binding {
            return Ok(b.clone());
        }
        amend_edits::fingerprint::model_binding_parsed(&self.path, &self.layout, &self.hparams)
    }

    /// Whether llama.cpp loaded a private, sealed copy of the file ([`ModelOptions::private_copy`];
    /// of its header only, for `vocab_only`).
    pub fn runs_from_private_copy(&self) -> bool {
        self.copy.is_some()
    }

    /// Whether a low-rank delta `W += B A` of `[n_in] -> [n_out]` on the tensor `name` is one
    /// llama.cpp applies as a plain matrix product: the model has `name` as a `[n_in, n_out]`
    /// matrix, and it is not the token embedding. llama.cpp applies an adapter on the token
    /// embedding by row lookup, with A and B in another layout that it checks only in part: a
    /// mismatch there is a `GGML_ASSERT` abort at the first decode, so it is refused here.
    pub(crate) fn check_low_rank(
        &self,
        name: &str,
        n_in: u64,
        n_out: u64,
    ) -> Result<(), RuntimeError> {
        let fail = |why: String| {
            Err(RuntimeError::InvalidEdit(format!(
                "low-rank tensor {name:?}: {why}"
            )))
        };
        if name == "token_embd.weight" {
            return fail("deltas on the token embedding are not supported".into());
        }
        match self.matrices.get(name) {
            None => fail(format!(
                "the model has no such matrix ({} layers)",
                self.info().n_layer
            )),
            Some(&[a, b]) if [a, b] != [n_in, n_out] => fail(format!(
                "[{n_in}, {n_out}] does not fit the model's [{a}, {b}]"
            )),
            Some(_) => Ok(()),
        }
    }

    /// The file the pre-load checks passed on and llama.cpp loaded: the sealed copy where there
    /// is one (`/proc/self/fd/N`, valid while `self` lives), else the model's path.
    pub(crate) fn checked_path(&self) -> PathBuf {
        match &self.copy {
            Some(c) => c.path(),
            None => self.path.clone(),
        }
    }

    /// The graph node name a hook point maps to on this model (validated against the layer count).
    pub fn node_name(&self, point: amend_edits::HookPoint) -> Result<String, RuntimeError> {
        self.info.architecture.node_name(point, self.info.n_layer)
    }

    /// The raw llama.cpp model, for the runtime's own calls into llama.cpp (not public API: no
    /// caller outside this crate may hold llama.cpp pointers). Valid while `self` lives.
    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    /// A metadata value as a string (llama.cpp's rendering), e.g. `general.name`.
    pub fn meta(&self, key: &str) -> Option<String> {
        unsafe { meta_str(self.ptr.as_ptr(), key) }
    }

    /// Tokenizes `text`. With `add_bos`, BOS is prepended when the model's tokenizer asks for it.
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<Token>, RuntimeError> {
        let mut out: Vec<Token> = vec![0; text.len() + 2];
        for _ in 0..2 {
            // SAFETY: a live vocabulary; the slices give pointers and lengths.
            let n = unsafe {
                crate::generate::tokenize_raw(
                    self.vocab.as_ptr(),
                    text.as_bytes(),
                    &mut out,
                    add_bos,
                )?
            };
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            if n == i32::MIN {
                return Err(RuntimeError::Tokenize("token count overflows".into()));
            }
            out.resize((-n) as usize, 0);
        }
        Err(RuntimeError::Tokenize("tokenizer size mismatch".into()))
    }

    /// The bytes of one token's text (special tokens render as empty). A piece can be part of a
    /// UTF-8 sequence; use [`crate::Detokenizer`] to build text.
    pub fn token_bytes(&self, token: Token) -> Result<Vec<u8>, RuntimeError> {
        self.check_token(token)?;
        let mut buf = vec![0u8; 32];
        for _ in 0..2 {
            // SAFETY: a live vocabulary and a checked token.
            let n = unsafe {
                crate::generate::token_to_piece_raw(self.vocab.as_ptr(), token, &mut buf)?
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            buf.resize((-n) as usize, 0);
        }
        Err(RuntimeError::Tokenize(format!(
            "cannot render token {token}"
        )))
    }

    /// Text of a token sequence (invalid UTF-8 replaced by U+FFFD).
    pub fn detokenize(&self, tokens: &[Token]) -> Result<String, RuntimeError> {
        let mut d = crate::Detokenizer::new();
        let mut s = String::new();
        for &t in tokens {
            s.push_str(&d.push(&self.token_bytes(t)?));
        }
        s.push_str(&d.finish());
        Ok(s)
    }

    pub fn is_eog(&self, token: Token) -> bool {
        unsafe { sys::llama_vocab_is_eog(self.vocab.as_ptr(), token) }
    }

    pub(crate) fn check_token(&self, token: Token) -> Result<(), RuntimeError> {
        if token < 0 || token as u32 >= self.info.n_vocab {
            return Err(RuntimeError::InvalidToken {
                token,
                n_vocab: self.info.n_vocab,
            });
        }
        Ok(())
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: sessions hold an Arc<Model>, so none is alive here.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish()
    }
}

/// A private copy of a model file in a sealed memfd (Linux): nothing, not even this process,
/// can write, grow or shrink it once sealed, and no other process holds it.
pub(crate) struct PrivateCopy {
    file: std::fs::File,
    /// The source file's key (device, inode, length, mtime, ctime), the same before and after
    /// the copy.
    key: String,
}

impl PrivateCopy {
    /// Copies `path` into a sealed memfd: all of it, or only the byte ranges `parts` gives
    /// (`(offset, length)`, the header first) with the rest left a hole of the file's length (no
    /// memory). `None` where the platform has no memfd (llama.cpp then maps the file itself); an
    /// error where the file changed while it was copied.
    #[cfg(target_os = "linux")]
    pub(crate) fn of(
        path: &Path,
        parts: Option<&[(u64, u64)]>,
    ) -> Result<Option<PrivateCopy>, RuntimeError> {
        // A file replaced while it is copied (an update renamed over it: the inode read loses a
        // link, which changes its ctime) is copied again from the path, which names the new one;
        // a file written in place throughout is refused.
        let mut tries = 0;
        loop {
            match Self::copy_once(path, parts) {
                Err(RuntimeError::ModelChanged { .. }) if tries < 2 => {
                    tries += 1;
                    log::info!(
                        "{}: changed while it was copied; copying again",
                        path.display()
                    );
                }
                r => return r,
            }
        }
    }

    #[cfg(target_os = "linux")]
    fn copy_once(
        path: &Path,
        parts: Option<&[(u64, u64)]>,
    ) -> Result<Option<PrivateCopy>, RuntimeError> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let io = |source: std::io::Error| RuntimeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (mut src, len) =
            amend_edits::fsutil::open_regular(path, amend_edits::fsutil::MAX_MODEL_LEN)
                .map_err(RuntimeError::File)?;
        let key = amend_edits::fingerprint::file_key(&src).map_err(io)?;
        // Each part clipped to the file (the caller read the ranges from a header that the copy
        // is checked against again).
        let whole = [(0, len)];
        let parts: Vec<(u64, u64)> = parts
            .unwrap_or(&whole)
            .iter()
            .map(|&(at, n)| (at.min(len), n.min(len - at.min(len))))
            .collect();
        let n: u64 = parts.iter().map(|p| p.1).sum();
        // A copy takes RAM the page cache would otherwise lend and take back: a model that would
        // fill more than half of what is available runs from the mapped file instead.
        if let Some(avail) = mem_available() {
            if n > avail / 2 {
                log::warn!(
                    "{}: {n} bytes to copy is more than half the available memory ({avail}): \
                     llama.cpp maps the file itself, without a private copy",
                    path.display()
                );
                return Ok(None);
            }
        }
        // A memfd is a file: writing (or sizing) it past RLIMIT_FSIZE would end the process
        // with SIGXFSZ. Such a process runs from the mapped file, as without memfd.
        if let Err(e) = amend_edits::fsutil::within_file_size_limit(path, len) {
            log::warn!("{e}: llama.cpp maps the file itself, without a private copy");
            return Ok(None);
        }
        // SAFETY: plain syscall with a static NUL-terminated name.
        let fd = unsafe {
            libc::memfd_create(
                c"amend-model".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            log::warn!(
                "no memfd ({}): llama.cpp maps {} itself",
                std::io::Error::last_os_error(),
                path.display()
            );
            return Ok(None);
        }
        // SAFETY: a fresh descriptor this function owns.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        let t0 = std::time::Instant::now();
        let mut copied = 0;
        for &(at, n) in &parts {
            use std::io::Seek;
            src.seek(std::io::SeekFrom::Start(at)).map_err(io)?;
            file.seek(std::io::SeekFrom::Start(at)).map_err(io)?;
            // std copies in the kernel (copy_file_range / sendfile) where it can.
            copied +=
                std::io::copy(&mut std::io::Read::take(&mut src, n), &mut file).map_err(io)?;
        }
        // The file's full length (its tail a hole): llama.cpp checks tensor extents against it.
        file.set_len(len).map_err(io)?;
        let after = amend_edits::fingerprint::file_key(&src).map_err(io)?;
        if copied != n || after != key {
            return Err(RuntimeError::ModelChanged {
                path: path.to_path_buf(),
                detail: "the model file changed while it was read".into(),
            });
        }
        let seals =
            libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            // Unsealed, the copy can still only be written through this process's descriptor
            // (/proc/PID/fd, ptrace rights needed): better than the file, so keep it, and say so.
            log::warn!(
                "{}: cannot seal the private copy ({}); running from it unsealed",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        log::debug!(
            "{}: private sealed copy of {n} of {len} bytes in {:.3} s",
            path.display(),
            t0.elapsed().as_secs_f64()
        );
        Ok(Some(PrivateCopy { file, key }))
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn of(
        _: &Path,
        _: Option<&[(u64, u64)]>,
    ) -> Result<Option<PrivateCopy>, RuntimeError> {
        log::debug!("no memfd on this platform: llama.cpp maps the model file itself");
        Ok(None)
    }

    /// A path that opens the copy (llama.cpp loads from a path).
    pub(crate) fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn file(&self) -> &std::fs::File {
        &self.file
    }
}

/// Tensors the ONNX Runtime backend reads from the model at open besides its graph (RoPE
/// frequency factors, for the host's RoPE tables): a vocabulary-only load copies them with the
/// header ([`check_gguf`]). At most [`HOST_READ_TENSOR_MAX`] bytes each.
pub(crate) const HOST_READ_TENSORS: &[&str] = &["rope_freqs.weight"];
pub(crate) const HOST_READ_TENSOR_MAX: u64 = 1 << 20;

/// `MemAvailable` from /proc/meminfo, in bytes.
#[cfg(target_os = "linux")]
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The pre-load check (of the file at `path`; errors name `shown`, the path the caller gave):
/// the GGUF structure (header, tensor table, extents against the file
/// length), a supported architecture, hyperparameters llama.cpp cannot abort on, and the tensors
/// the architecture needs. llama.cpp aborts the process (not returns an error) on some malformed
/// files, so everything it would trip on must be refused here.
fn check_gguf(path: &Path, shown: &Path) -> Result<Checked, RuntimeError> {
    let header = GgufFile::read_header(path).map_err(|e| gguf_error(shown, e))?;
    let Some(arch_name) = header.architecture() else {
        return Err(RuntimeError::InvalidGguf {
            path: shown.to_path_buf(),
            detail: "no general.architecture key".into(),
        });
    };
    let architecture = Architecture::from_name(arch_name).ok_or_else(|| {
        RuntimeError::UnsupportedArchitecture {
            arch: arch_name.to_string(),
            supported: Architecture::supported_list(),
        }
    })?;
    let invalid = |source| RuntimeError::InvalidHparams {
        path: shown.to_path_buf(),
        source,
    };
    let hparams = ModelHparams::from_header(&header).map_err(invalid)?;
    architecture
        .check_tensors(&header, &hparams)
        .map_err(invalid)?;
    let matrices = (header.tensors.iter())
        .filter_map(|t| match t.ne[..] {
            [n_in, n_out] => Some((t.name.clone(), [n_in, n_out])),
            _ => None,
        })
        .collect();
    // The header, and each of HOST_READ_TENSORS the model has within the size bound (one that
    // is not copied is refused by whoever reads it, under the same bound).
    let mut vocab_only_parts = vec![(0, header.data_offset)];
    for t in HOST_READ_TENSORS.iter().filter_map(|n| header.tensor(n)) {
        if let Some(n) = t.byte_size().ok().filter(|&n| n <= HOST_READ_TENSOR_MAX) {
            vocab_only_parts.push((header.data_offset + t.offset, n));
        }
    }
    Ok(Checked {
        architecture,
        layout: ModelLayout::from(&header),
        hparams,
        matrices,
        vocab_only_parts,
    })
}

/// What [`check_gguf`] learns of a model.
struct Checked {
    architecture: Architecture,
    layout: ModelLayout,
    hparams: ModelHparams,
    /// The shapes (`[n_in, n_out]`) of its 2-D tensors.
    matrices: Matrices,
    /// The byte ranges `(offset, length)` a vocabulary-only private copy holds.
    vocab_only_parts: Vec<(u64, u64)>,
}

type Matrices = std::collections::HashMap<String, [u64; 2]>;

fn gguf_error(path: &Path, e: GgufError) -> RuntimeError {
    let path = path.to_path_buf();
    match e {
        GgufError::BadMagic(magic) => {
            // Only the bytes the file has (the parser pads a short file's magic with zeros).
            let len = std::fs::metadata(&path).map_or(4, |m| m.len().min(4) as usize);
            RuntimeError::NotGguf {
                path,
                magic: magic[..len].to_vec(),
            }
        }
        GgufError::Truncated { .. } | GgufError::CountTooLarge { .. } => RuntimeError::Truncated {
            path,
            detail: e.to_string(),
        },
        GgufError::Io { .. } if !path.exists() => RuntimeError::NotFound { path },
        GgufError::Io { message, .. } => RuntimeError::Io {
            source: std::io::Error::other(message),
            path,
        },
        other => RuntimeError::InvalidGguf {
            path,
            detail: other.to_string(),
        },
    }
}

unsafe fn meta_str(model: *const sys::llama_model, key: &str) -> Option<String> {
    let key = CString::new(key).ok()?;
    let mut buf = vec![0u8; 256];
    for _ in 0..2 {
        let n = unsafe {
            sys::llama_model_meta_val_str(
                model,
                key.as_ptr(),
                buf.as_mut_ptr() as *mut c_char,
                buf.len(),
            )
        };
        if n < 0 {
            return None;
        }
        if (n as usize) < buf.len() {
            buf.truncate(n as usize);
            return Some(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.resize(n as usize + 1, 0);
    }
    None
}

/// [`ModelInfo`] of a vocabulary-only load.
///
/// # Safety
/// `vocab` is a live vocabulary.
unsafe fn read_vocab_info(
    vocab: *const sys::llama_vocab,
    architecture: Architecture,
    hp: &ModelHparams,
) -> ModelInfo {
    let tok = |t: sys::llama_token| (t >= 0).then_some(t);
    unsafe {
        ModelInfo {
            architecture,
            description: format!("{} (vocabulary only)", hp.arch),
            n_layer: hp.n_layer,
            n_embd: hp.n_embd,
            n_ff: hp.n_ff.first().copied().unwrap_or(0),
            n_head: hp.n_head.first().copied().unwrap_or(0),
            n_head_kv: hp.n_head_kv.first().copied().unwrap_or(0),
            n_vocab: sys::llama_vocab_n_tokens(vocab).max(0) as u32,
            n_ctx_train: hp.n_ctx_train,
            quantization: String::new(),
            n_params: 0,
            size_bytes: 0,
            bos: tok(sys::llama_vocab_bos(vocab)),
            eos: tok(sys::llama_vocab_eos(vocab)),
            add_bos: sys::llama_vocab_get_add_bos(vocab),
        }
    }
}

unsafe fn read_info(
    model: *const sys::llama_model,
    vocab: *const sys::llama_vocab,
    architecture: Architecture,
    arch_name: &str,
) -> ModelInfo {
    unsafe {
        let mut desc = vec![0u8; 256];
        let n = sys::llama_model_desc(model, desc.as_mut_ptr() as *mut c_char, desc.len());
        desc.truncate(n.clamp(0, 255) as usize);
        let ftype = sys::llama_model_ftype(model);
        let quantization = CStr::from_ptr(sys::llama_ftype_name(ftype))
            .to_string_lossy()
            .into_owned();
        // n_ff may be an array (per layer); llama.cpp renders arrays as "[a, b, ...]".
        let n_ff = meta_str(model, &format!("{arch_name}.feed_forward_length"))
            .and_then(|s| {
                s.trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .next()
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        let tok = |t: sys::llama_token| (t >= 0).then_some(t);
        ModelInfo {
            architecture,
            description: String::from_utf8_lossy(&desc).into_owned(),
            n_layer: sys::llama_model_n_layer(model).max(0) as u32,
            n_embd: sys::llama_model_n_embd(model).max(0) as u32,
            n_ff,
            n_head: sys::llama_model_n_head(model).max(0) as u32,
            n_head_kv: sys::llama_model_n_head_kv(model).max(0) as u32,
            n_vocab: sys::llama_vocab_n_tokens(vocab).max(0) as u32,
            n_ctx_train: sys::llama_model_n_ctx_train(model).max(0) as u32,
            quantization,
            n_params: sys::llama_model_n_params(model),
            size_bytes: sys::llama_model_size(model),
            bos: tok(sys::llama_vocab_bos(vocab)),
            eos: tok(sys::llama_vocab_eos(vocab)),
            add_bos: sys::llama_vocab_get_add_bos(vocab),
        }
    }
}
