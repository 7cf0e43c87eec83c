//! Validates a GGUF file's header, metadata and tensor table against the file's length before
//! llama.cpp sees it: llama.cpp can abort the process (not return an error) on some truncated
//! or malformed files, so anything structurally wrong must be caught here.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::RuntimeError;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
// Limits far above any real model; they only stop absurd counts from driving huge allocations.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;

/// What the check learned about a structurally valid GGUF file.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    pub version: u32,
    pub n_tensors: u64,
    pub n_kv: u64,
    /// `general.architecture`, when present.
    pub architecture: Option<String>,
    pub file_size: u64,
    /// Offset of the tensor data section.
    pub data_offset: u64,
}

struct Reader<R: Read> {
    inner: R,
    pos: u64,
    len: u64,
    path: PathBuf,
}

impl<R: Read> Reader<R> {
    fn truncated(&self, what: &str) -> RuntimeError {
        RuntimeError::Truncated {
            path: self.path.clone(),
            detail: format!("file ends at byte {} while reading {what}", self.len),
        }
    }

    fn invalid(&self, detail: String) -> RuntimeError {
        RuntimeError::InvalidGguf {
            path: self.path.clone(),
            detail,
        }
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, RuntimeError> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(self.truncated(what));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => self.truncated(what),
                _ => RuntimeError::Io {
                    path: self.path.clone(),
                    source: e,
                },
            })?;
        self.pos += n;
        Ok(buf)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), RuntimeError> {
        if self.pos.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(self.truncated(what));
        }
        let copied =
            std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink()).map_err(|e| {
                RuntimeError::Io {
                    path: self.path.clone(),
                    source: e,
                }
            })?;
        if copied != n {
            return Err(self.truncated(what));
        }
        self.pos += n;
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32, RuntimeError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Result<u64, RuntimeError> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap()))
    }

    fn string(&mut self, what: &str) -> Result<Vec<u8>, RuntimeError> {
        let n = self.u64(what)?;
        self.bytes(n, what)
    }

    fn skip_string(&mut self, what: &str) -> Result<(), RuntimeError> {
        let n = self.u64(what)?;
        self.skip(n, what)
    }
}

/// Size in bytes of a scalar GGUF metadata value type, `None` for string/array/unknown.
fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1), // u8 i8 bool
        2 | 3 => Some(2),     // u16 i16
        4..=6 => Some(4),     // u32 i32 f32
        10..=12 => Some(8),   // u64 i64 f64
        _ => None,
    }
}

/// Byte size of a tensor of `ggml_type` with dims `ne`, or an explanation of why it is invalid.
fn tensor_bytes(ty: u32, ne: &[u64]) -> Result<u64, String> {
    if ty >= llama_cpp_sys_2::GGML_TYPE_COUNT {
        return Err(format!("unknown ggml type {ty}"));
    }
    // SAFETY: `ty` is in range; these only read ggml's static type table.
    let (blck, type_size) = unsafe {
        (
            llama_cpp_sys_2::ggml_blck_size(ty),
            llama_cpp_sys_2::ggml_type_size(ty) as u64,
        )
    };
    if blck <= 0 || type_size == 0 {
        return Err(format!("ggml type {ty} is not supported (removed type)"));
    }
    let blck = blck as u64;
    let ne0 = ne.first().copied().unwrap_or(1);
    if ne0 % blck != 0 {
        return Err(format!(
            "row length {ne0} is not a multiple of the block size {blck}"
        ));
    }
    let mut bytes = (ne0 / blck)
        .checked_mul(type_size)
        .ok_or_else(|| "tensor size overflows".to_string())?;
    for &d in ne.iter().skip(1) {
        bytes = bytes
            .checked_mul(d)
            .ok_or_else(|| "tensor size overflows".to_string())?;
    }
    Ok(bytes)
}

/// Checks that `path` is a complete, structurally valid GGUF file.
pub fn check_file(path: &Path) -> Result<GgufSummary, RuntimeError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RuntimeError::NotFound {
                path: path.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(RuntimeError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    let meta = file.metadata().map_err(|e| RuntimeError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    if meta.is_dir() {
        return Err(RuntimeError::InvalidGguf {
            path: path.to_path_buf(),
            detail: "is a directory".into(),
        });
    }
    let len = meta.len();
    let mut r = Reader {
        inner: BufReader::with_capacity(1 << 16, file),
        pos: 0,
        len,
        path: path.to_path_buf(),
    };

    // A short file that does not start like GGUF is "not GGUF", not "truncated".
    let head_len = len.min(4);
    let head = r.bytes(head_len, "the magic")?;
    if head.as_slice() != &MAGIC[..head_len as usize] || head_len == 0 {
        return Err(RuntimeError::NotGguf {
            path: path.to_path_buf(),
            magic: head,
        });
    }
    if head_len < 4 {
        return Err(r.truncated("the magic"));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(r.invalid(format!(
            "unsupported GGUF version {version} (expected 2 or 3)"
        )));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    if n_tensors > MAX_TENSORS || n_kv > MAX_KV {
        return Err(r.invalid(format!(
            "implausible counts: {n_tensors} tensors, {n_kv} metadata keys"
        )));
    }

    let mut architecture = None;
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..n_kv {
        let key = r.string("a metadata key")?;
        let ty = r.u32("a metadata type")?;
        let what = format!("metadata value #{i} ({})", String::from_utf8_lossy(&key));
        match ty {
            8 => {
                let v = r.string(&what)?;
                if key == b"general.architecture" {
                    architecture = Some(String::from_utf8_lossy(&v).into_owned());
                }
            }
            9 => {
                let ety = r.u32(&what)?;
                let n = r.u64(&what)?;
                if let Some(sz) = scalar_size(ety) {
                    let total = n
                        .checked_mul(sz)
                        .ok_or_else(|| r.invalid(format!("{what}: array too large")))?;
                    r.skip(total, &what)?;
                } else if ety == 8 {
                    if n > len {
                        return Err(r.truncated(&what));
                    }
                    for _ in 0..n {
                        r.skip_string(&what)?;
                    }
                } else {
                    return Err(r.invalid(format!("{what}: unsupported array element type {ety}")));
                }
            }
            _ => match scalar_size(ty) {
                Some(sz) => {
                    let v = r.bytes(sz, &what)?;
                    if key == b"general.alignment" && ty == 4 {
                        alignment = u32::from_le_bytes(v[..4].try_into().unwrap()) as u64;
                        if alignment == 0 || !alignment.is_power_of_two() {
                            return Err(r.invalid(format!(
                                "general.alignment {alignment} is not a power of two"
                            )));
                        }
                    }
                }
                None => return Err(r.invalid(format!("{what}: unknown value type {ty}"))),
            },
        }
    }

    let mut data_extent = 0u64;
    for i in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let name = String::from_utf8_lossy(&name).into_owned();
        let what = format!("tensor info #{i} ({name})");
        let n_dims = r.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.invalid(format!("{what}: {n_dims} dimensions")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(r.u64(&what)?);
        }
        let ty = r.u32(&what)?;
        let offset = r.u64(&what)?;
        if offset % alignment != 0 {
            return Err(r.invalid(format!(
                "{what}: data offset {offset} is not aligned to {alignment}"
            )));
        }
        let bytes = tensor_bytes(ty, &ne).map_err(|e| r.invalid(format!("{what}: {e}")))?;
        let end = offset
            .checked_add(bytes)
            .ok_or_else(|| r.invalid(format!("{what}: offset overflows")))?;
        data_extent = data_extent.max(end);
    }
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    let needed = data_offset
        .checked_add(data_extent)
        .ok_or_else(|| r.invalid("tensor data extent overflows".into()))?;
    if n_tensors > 0 && needed > len {
        return Err(RuntimeError::Truncated {
            path: path.to_path_buf(),
            detail: format!("tensor data needs {needed} bytes, the file has {len}"),
        });
    }
    Ok(GgufSummary {
        version,
        n_tensors,
        n_kv,
        architecture,
        file_size: len,
        data_offset,
    })
}
