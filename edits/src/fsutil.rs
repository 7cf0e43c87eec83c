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
/// share it. Temporary files of `path` left by a killed process are removed first
/// ([`remove_stale_temps`]); on failure (`ENOSPC`, `EROFS`) this call's own is removed and an
/// existing `path` is untouched. A file longer than the process's `RLIMIT_FSIZE` is refused
/// before anything is written ([`within_file_size_limit`]).
pub fn write_atomic(path: &Path, data: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    stage(path, data, mode)?.commit()
}

/// A file written and synced beside its final name, not yet in place: [`Staged::commit`]
/// renames it there, dropping it removes it. Several files that belong together (a key and its
/// public half, a trace and its heatmap) are all staged before any is committed, so running out
/// of space or permission on one leaves every old file as it was; only a failed rename between
/// two commits (same directory: practically never) can leave a mix.
#[must_use = "a staged file is removed when dropped; commit it to put it in place"]
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl Staged {
    /// The final name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rename the staged file over its final name and sync the directory. On error the staged
    /// file is removed and the final name is as it was.
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        sync_dir(&self.path);
        Ok(())
    }
}

/// Commit files staged together, in order. A failed rename names its path ("renaming the new
/// PATH into place"); the files after it are dropped, so removed.
pub fn commit_all(staged: impl IntoIterator<Item = Staged>) -> std::io::Result<()> {
    for s in staged {
        let path = s.path.clone();
        s.commit().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("renaming the new {} into place: {e}", path.display()),
            )
        })?;
    }
    Ok(())
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The first half of [`write_atomic`] (every check, the temporary file written and synced under
/// `mode`), for callers that put several files in place together. A process killed between
/// the two halves leaves a temporary file named after `path`, which the next write of `path`
/// removes ([`remove_stale_temps`]).
pub fn stage(path: &Path, data: &[u8], mode: Option<u32>) -> std::io::Result<Staged> {
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
    within_file_size_limit(path, data.len() as u64)?;
    remove_stale_temps(path);
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
    // From here the temporary file is removed on every error (the guard's drop).
    let staged = Staged {
        tmp,
        path: path.to_path_buf(),
        committed: false,
    };
    #[cfg(unix)]
    if let Some(m) = mode {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(m))?;
    }
    f.write_all(data)?;
    f.sync_all()?;
    Ok(staged)
}

/// How old (by mtime) a dead process's temporary file must be before [`write_atomic`] removes
/// it: a process in another PID namespace sharing the directory can look dead to us, and a
/// writer keeps its file's mtime fresh until the rename.
pub const STALE_TMP_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Remove the temporary files an earlier [`write_atomic`] of `path` left when its process was
/// killed mid-write (`NAME.tmpPID.N`; `.amend.tmpPID.N` for long names): on a full partition each
/// one holds space forever. Only regular files whose process is gone (never this process's own:
/// another thread may be writing one) and whose mtime is older than [`STALE_TMP_AGE`]. Best
/// effort: whatever cannot be listed or removed stays.
fn remove_stale_temps(path: &Path) {
    let Some(prefix) = tmp_name(path, ".tmp").file_name().map(|n| n.to_owned()) else {
        return;
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = stale_tmp_pid(name.as_encoded_bytes(), prefix.as_encoded_bytes()) else {
            continue;
        };
        if pid == me || process_alive(pid) {
            continue;
        }
        // symlink_metadata: a planted link is not ours to judge; only plain files go.
        let old = std::fs::symlink_metadata(e.path()).ok().filter(|md| {
            md.is_file()
                && md
                    .modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= STALE_TMP_AGE)
        });
        if old.is_some() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The PID in `name` when it is exactly `prefix` + `PID.N` (both decimal), as
/// [`write_atomic`] names its temporary files.
fn stale_tmp_pid(name: &[u8], prefix: &[u8]) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let dot = rest.iter().position(|&b| b == b'.')?;
    let (pid, seq) = (&rest[..dot], &rest[dot + 1..]);
    let digits = |s: &[u8]| !s.is_empty() && s.len() <= 20 && s.iter().all(u8::is_ascii_digit);
    if !digits(pid) || !digits(seq) {
        return None;
    }
    std::str::from_utf8(pid)
        .ok()?
        .parse()
        .ok()
        .filter(|&p| p > 0)
}

/// Whether a process with this id exists (as far as this process can tell). When unsure, it
/// is alive: a temp file is only removed when its writer is surely gone.
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        if unsafe { libc::kill(pid, 0) } == 0 {
            return true;
        }
        // EPERM: it exists under another user.
        std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
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

/// This process's file size limit (`RLIMIT_FSIZE`) in bytes; `None` when there is none.
pub fn file_size_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut r) } == 0
            && r.rlim_cur != libc::RLIM_INFINITY
        {
            // rlim_t is 32 bits on some targets (32-bit Android).
            #[allow(clippy::unnecessary_cast)]
            return Some(r.rlim_cur as u64);
        }
    }
    None
}

/// `FileTooLarge` naming `path` when a file of `len` bytes would pass this process's
/// `RLIMIT_FSIZE`. The kernel does not fail such a write: it sends `SIGXFSZ`, whose default
/// action ends the process, so a host app would die for a cache file amend chose to write.
/// Checked before every write that can be large (the atomic writer, the model's private copy).
pub fn within_file_size_limit(path: &Path, len: u64) -> std::io::Result<()> {
    match file_size_limit() {
        Some(limit) if len > limit => Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!(
                "{}: {len} bytes are more than this process's file size limit (RLIMIT_FSIZE, \
                 {limit} bytes); nothing was written",
                path.display()
            ),
        )),
        _ => Ok(()),
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

/// Writes `len` bytes to `path` through [`write_atomic`] and removes the file again: whether
/// the directory takes a file now (a full or read-only partition does not), checked by a long
/// command before its work rather than at its first real write.
pub fn probe_write(path: &Path, len: usize) -> std::io::Result<()> {
    let res = write_atomic(path, &vec![0u8; len], None);
    let _ = std::fs::remove_file(path);
    res
}

/// amend's cache directory: `$AMEND_CACHE`, else `~/.cache/amend` (an empty variable counts
/// as unset, as in the shell's `${AMEND_CACHE:-...}` of `scripts/fetch-*.sh`, which install
/// the default model, the scope model and the ONNX Runtime libraries there); `None` without
/// either. The one place this is decided.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    var("AMEND_CACHE")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/amend")))
}

/// Which file a path names, links followed, so that two names of one file (a symlink, a hard
/// link, `./x`) compare equal: its device and inode; `None` when nothing is there. The one
/// "same file" test (an output that would replace an input, what an export wrote). Off unix,
/// where std has no inode, it is `(0, a hash of the canonical path)`: names still compare, but
/// a file renamed over the path keeps the id.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::fs::canonicalize(path).ok()?.hash(&mut h);
        Some((0, h.finish()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The sorted names in `d`.
    fn listing(d: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

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

    /// Files staged together: none is in place until committed, a dropped one leaves no
    /// temporary file and its old file as it was, a committed one is the new bytes.
    #[test]
    fn staged_files_are_in_place_only_when_committed() {
        let d = tmp("staged");
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a.json"), d.join("b.png"));
        write_atomic(&a, b"old a", None).unwrap();
        write_atomic(&b, b"old b", None).unwrap();
        let sa = stage(&a, b"new a", None).unwrap();
        let sb = stage(&b, b"new b", Some(0o600)).unwrap();
        assert_eq!(sb.path(), b);
        // Staged but not committed: the old files, and one temporary file each beside them.
        assert_eq!(std::fs::read(&a).unwrap(), b"old a");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 4);
        drop(sb);
        sa.commit().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"new a");
        assert_eq!(std::fs::read(&b).unwrap(), b"old b");
        assert_eq!(listing(&d), ["a.json", "b.png"]);
        // A commit whose rename fails (the final name became a directory) removes its file.
        std::fs::remove_file(&b).unwrap();
        let sb = stage(&b, b"x", None).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join("keep"), b"").unwrap();
        let e = commit_all([sb]).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("renaming the new {} into place", b.display())),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 2);
        assert!(b.join("keep").exists());
        let _ = std::fs::remove_dir_all(&d);
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

    /// An old file `name` in `d` (mtime past [`STALE_TMP_AGE`]).
    fn old_file(p: &Path) {
        let f = File::create(p).unwrap();
        f.set_modified(std::time::SystemTime::now() - 2 * STALE_TMP_AGE)
            .unwrap();
    }

    /// A PID no process has (a child that exited and was reaped).
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    #[cfg(unix)]
    #[test]
    fn stale_temps_of_dead_processes_are_removed_and_no_others() {
        let d = tmp("stale");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("out.bin");
        let dead = dead_pid();
        let me = std::process::id();
        // A live process of another id: our parent.
        let live = std::os::unix::process::parent_id();
        let gone = [
            format!("out.bin.tmp{dead}.0"),
            format!("out.bin.tmp{dead}.17"),
        ];
        let kept = [
            format!("out.bin.tmp{me}.999999"), // this process: another thread's
            format!("out.bin.tmp{live}.0"),    // a live writer
            format!("out.bin.tmp{dead}.x"),    // not write_atomic's form
            format!("out.bin.tmp{dead}"),      // no sequence number
            format!("other.bin.tmp{dead}.0"),  // another destination's
            format!("out.bin.tmp5.tmp{dead}.0"), // `out.bin.tmp5`'s
            "out.bin.tmp.0".to_string(),
        ];
        for n in gone.iter().chain(&kept) {
            old_file(&d.join(n));
        }
        // Fresh (within STALE_TMP_AGE), or not a regular file: kept too.
        let fresh = format!("out.bin.tmp{dead}.1");
        std::fs::write(d.join(&fresh), b"x").unwrap();
        let link = format!("out.bin.tmp{dead}.2");
        std::os::unix::fs::symlink("nowhere", d.join(&link)).unwrap();
        let sub = format!("out.bin.tmp{dead}.3");
        std::fs::create_dir(d.join(&sub)).unwrap();

        write_atomic(&p, b"new", None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let left = listing(&d);
        let mut want: Vec<String> = kept.to_vec();
        want.extend([fresh, link, sub, "out.bin".to_string()]);
        want.sort();
        assert_eq!(left, want);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[cfg(unix)]
    #[test]
    fn stale_temps_of_a_long_name_are_removed() {
        let d = tmp("stale-long");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("n".repeat(MAX_NAMED_TMP + 1));
        let dead = dead_pid();
        old_file(&d.join(format!(".amend.tmp{dead}.4")));
        write_atomic(&p, b"new", None).unwrap();
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn stale_tmp_names() {
        assert_eq!(stale_tmp_pid(b"a.tmp12.3", b"a.tmp"), Some(12));
        assert_eq!(stale_tmp_pid(b"a.tmp0.3", b"a.tmp"), None);
        assert_eq!(stale_tmp_pid(b"a.tmp12.", b"a.tmp"), None);
        assert_eq!(stale_tmp_pid(b"a.tmp.3", b"a.tmp"), None);
        assert_eq!(stale_tmp_pid(b"a.tmp1.2.3", b"a.tmp"), None);
        assert_eq!(stale_tmp_pid(b"b.tmp12.3", b"a.tmp"), None);
        assert_eq!(stale_tmp_pid(b"a.tmp99999999999.3", b"a.tmp"), None);
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

    #[test]
    fn links_name_one_file_and_two_files_differ() {
        let d = std::env::temp_dir().join(format!("amend-file-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"a").unwrap();
        assert!(file_id(&a).is_some());
        assert_ne!(file_id(&a), file_id(&b));
        assert_eq!(file_id(&d.join(".").join("a")), file_id(&a));
        assert_eq!(file_id(&d.join("missing")), None);
        #[cfg(unix)]
        {
            std::fs::hard_link(&a, d.join("hard")).unwrap();
            std::os::unix::fs::symlink(&a, d.join("soft")).unwrap();
            assert_eq!(file_id(&d.join("hard")), file_id(&a));
            assert_eq!(file_id(&d.join("soft")), file_id(&a));
            std::os::unix::fs::symlink(d.join("missing"), d.join("dangling")).unwrap();
            assert_eq!(file_id(&d.join("dangling")), None);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
