//! Opening files an attacker may have put in a path: a FIFO must not block, a directory or a
//! device must not be read, and a size cap is checked from the opened file's metadata before
//! any byte is read. Every file amend opens (bundles, models, keys, edit files, state files)
//! goes through [`open_regular`].

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    // No #[source]: the message already says it, and a source would print it twice.
    #[error("{}: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} is a {kind}, not a regular file", .path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} is {len} bytes, over the cap of {cap} bytes", .path.display())]
    TooLarge { path: PathBuf, len: u64, cap: u64 },
}

impl FileError {
    /// The I/O error kind, when there is one (NotFound is reported as such by callers).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            FileError::Io { error, .. } => Some(error.kind()),
            _ => None,
        }
    }
}

/// What a file that is not a regular file is, for messages ("FIFO", "character device", ...).
pub fn kind_name(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "FIFO";
        }
        if ft.is_char_device() {
            return "character device";
        }
        if ft.is_block_device() {
            return "block device";
        }
        if ft.is_socket() {
            return "socket";
        }
    }
    if ft.is_dir() {
        "directory"
    } else {
        "non-regular file"
    }
}

/// Open `path` for reading without blocking (`O_NONBLOCK`: opening a FIFO with no writer returns
/// at once), `fstat` the opened descriptor (not the path, which could be swapped in between) and
/// refuse anything that is not a regular file or is longer than `max_len`. Returns the file and
/// its length.
pub fn open_regular(path: &Path, max_len: u64) -> Result<(File, u64), FileError> {
    let io = |error| FileError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = opts.open(path).map_err(io)?;
    let md = file.metadata().map_err(io)?;
    if !md.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_name(&md.file_type()),
        });
    }
    if md.len() > max_len {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            len: md.len(),
            cap: max_len,
        });
    }
    Ok((file, md.len()))
}

/// [`open_regular`] and read the whole file (at most `max_len` bytes, even if it grows).
pub fn read_regular(path: &Path, max_len: u64) -> Result<Vec<u8>, FileError> {
    let (file, len) = open_regular(path, max_len)?;
    let mut buf = Vec::with_capacity(len as usize);
    file.take(max_len + 1)
        .read_to_end(&mut buf)
        .map_err(|error| FileError::Io {
            path: path.to_path_buf(),
            error,
        })?;
    if buf.len() as u64 > max_len {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            len: buf.len() as u64,
            cap: max_len,
        });
    }
    Ok(buf)
}

/// [`read_regular`] as UTF-8 text.
pub fn read_regular_string(path: &Path, max_len: u64) -> Result<String, FileError> {
    let bytes = read_regular(path, max_len)?;
    String::from_utf8(bytes).map_err(|_| FileError::Io {
        path: path.to_path_buf(),
        error: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
    })
}

/// Caps for the files amend reads whole.
pub const MAX_KEY_FILE_LEN: u64 = 4096;
/// Edit-request JSON/JSONL and hyperparameter files.
pub const MAX_TEXT_FILE_LEN: u64 = 1 << 30;
/// GGUF models (weights are mapped by llama.cpp, not read whole).
pub const MAX_MODEL_LEN: u64 = 1 << 40;

/// The per-call part of [`write_atomic`]'s temporary names.
static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Write `data` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. Readers see the old or the new file, never a mix; on unix the file
/// gets exactly `mode` (0o600 for secrets; not narrowed by the umask, so a replaced file can
/// keep its own bits) before any byte is written.
///
/// An existing `path` must be a regular file (a link to one is replaced as a link): renaming
/// over a FIFO, a device or a directory would replace the node itself (`--out /dev/null` as
/// root), so that is an `InvalidInput` error and nothing is written. The temporary file is
/// created exclusively (`O_EXCL`, which also refuses a planted symlink in a shared directory)
/// under a name unique to this process and call, so two threads writing one path do not
/// share it.
pub fn write_atomic(path: &Path, data: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    use std::io::Write;
    if let Ok(md) = std::fs::metadata(path) {
        if !md.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is a {}, not a regular file; nothing was written",
                    path.display(),
                    kind_name(&md.file_type())
                ),
            ));
        }
    }
    let (tmp, mut f) = loop {
        let suffix = format!(
            ".tmp{}.{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let tmp = tmp_name(path, &suffix);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        if let Some(m) = mode {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(m);
        }
        let _ = mode;
        match opts.open(&tmp) {
            Ok(f) => break (tmp, f),
            // A leftover of an earlier process with this id: take the next name.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let res = (|| {
        #[cfg(unix)]
        if let Some(m) = mode {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(m))?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(path);
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Longest file name that gets its temporary file named after it: `NAME.tmpPID.N` must fit in
/// the 255 bytes most file systems allow, or a name that is itself valid could not be written.
const MAX_NAMED_TMP: usize = 200;

/// The temporary name beside `path`: `PATH` + `suffix`, or, for a file name too long to extend,
/// `.amend` + `suffix` in the same directory.
fn tmp_name(path: &Path, suffix: &str) -> PathBuf {
    match path.file_name() {
        Some(name) if name.len() > MAX_NAMED_TMP => path.with_file_name(format!(".amend{suffix}")),
        _ => {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(suffix);
            PathBuf::from(tmp)
        }
    }
}

/// fsync the directory holding `path` so a rename survives a power cut (best effort: not every
/// file system lets a directory be opened).
pub fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("amend-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    #[test]
    fn directory_is_refused_with_its_kind() {
        let d = tmp("dir");
        std::fs::create_dir_all(&d).unwrap();
        let e = open_regular(&d, 1 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e
            .to_string()
            .ends_with("is a directory, not a regular file"));
    }

    #[cfg(unix)]
    #[test]
    fn fifo_is_refused_without_blocking() {
        let p = tmp("fifo");
        let _ = std::fs::remove_file(&p);
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = Instant::now();
        let e = open_regular(&p, 1 << 20).unwrap_err();
        assert!(
            matches!(e, FileError::NotRegular { kind: "FIFO", .. }),
            "{e}"
        );
        assert!(t.elapsed().as_secs() < 5);
    }

    #[test]
    fn size_cap_is_checked_before_reading() {
        let p = tmp("big");
        let f = File::create(&p).unwrap();
        f.set_len(10 << 30).unwrap(); // sparse
        let e = read_regular(&p, 1 << 20).unwrap_err();
        assert!(
            matches!(e, FileError::TooLarge { len, .. } if len == 10 << 30),
            "{e}"
        );
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn atomic_write_replaces() {
        let p = tmp("atomic");
        write_atomic(&p, b"one", None).unwrap();
        write_atomic(&p, b"two", Some(0o600)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // The mode applies to the new file (the one renamed into place).
            let m = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(m & 0o777, 0o600, "{m:o}");
            // Exactly the mode asked for, whatever the umask takes away from new files
            // (`sign` keeps a replaced bundle's bits this way).
            write_atomic(&p, b"three", Some(0o666)).unwrap();
            let m = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(m & 0o777, 0o666, "{m:o}");
        }
    }

    #[test]
    fn atomic_write_refuses_a_node_that_is_not_a_regular_file() {
        let d = tmp("atomic-dir");
        std::fs::create_dir_all(&d).unwrap();
        let e = write_atomic(&d, b"x", None).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert!(d.is_dir());
        #[cfg(unix)]
        {
            let fifo = tmp("atomic-fifo");
            let _ = std::fs::remove_file(&fifo);
            let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = write_atomic(&fifo, b"x", None).unwrap_err();
            assert!(e.to_string().contains("is a FIFO"), "{e}");
            use std::os::unix::fs::FileTypeExt;
            assert!(std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo());
            // No temporary file is left beside it.
            let parent = fifo.parent().unwrap();
            let left: Vec<_> = std::fs::read_dir(parent)
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("atomic-fifo.tmp")
                })
                .collect();
            assert!(left.is_empty());
            let _ = std::fs::remove_file(&fifo);
        }
    }

    #[cfg(unix)]
    #[test]
    fn atomic_write_never_writes_through_a_planted_temporary_name() {
        // Another user plants `PATH.tmpPID.N` as a link to a file of ours: exclusive creation
        // refuses it and the next name is taken, so the link's target is untouched.
        let p = tmp("atomic-planted");
        let victim = tmp("atomic-victim");
        std::fs::write(&victim, b"keep").unwrap();
        let _ = std::fs::remove_file(&p);
        let mut planted = Vec::new();
        let next = TMP_SEQ.load(std::sync::atomic::Ordering::Relaxed);
        for n in next..next + 256 {
            let name = PathBuf::from(format!("{}.tmp{}.{n}", p.display(), std::process::id()));
            let _ = std::fs::remove_file(&name);
            std::os::unix::fs::symlink(&victim, &name).unwrap();
            planted.push(name);
        }
        for _ in 0..3 {
            write_atomic(&p, b"new", None).unwrap();
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        for name in planted {
            let _ = std::fs::remove_file(name);
        }
    }

    #[test]
    fn atomic_writes_from_threads_to_one_path_do_not_collide() {
        let p = tmp("atomic-threads");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(p, &[t; 4096], None).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got.iter().all(|&b| b == got[0]), "a mix of two writers");
    }
}
