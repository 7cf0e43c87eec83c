//! Persistent anti-rollback state shared by every session and process of one trust domain.
//!
//! An [`EditSet`](crate::EditSet) remembers per channel the highest version it accepted, but only
//! in memory: a new process would accept v1 after v9. A `VersionStore` keeps those high-water
//! marks in a small file (what TUF and Uptane require of a client): one file per trust domain
//! (the set of keys bundles are accepted from), read and raised under an exclusive `flock` on a
//! companion `FILE.lock`, and replaced atomically (temp file, fsync, rename, fsync of the
//! directory), so a crash leaves the old or the new marks, never a torn file.
//!
//! Per channel the store holds the version and the sha256 of the accepted bundle's signed bytes
//! (header + manifest). A version below the mark is a downgrade; the same version is accepted
//! only for the very same bundle (a restart re-activating what was active), any other bundle
//! with that version is a replay.
//!
//! File format (text): a line `amend-versions-v1`, then one line per channel:
//! `<version> <digest hex> <channel as hex>`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::keys::to_hex;

const MAGIC: &str = "amend-versions-v1";
/// A state file holds at most this many bytes (a few thousand channels).
pub const MAX_STATE_LEN: u64 = 16 << 20;

/// One channel's high-water mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub version: u64,
    /// sha256 of the accepted bundle's header + manifest.
    pub digest: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("version store {}: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] crate::fsutil::FileError),
    #[error("version store {}: malformed line {line}: {reason}", .path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
}

/// A channel's mark refused an offered bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The same version as the mark but another bundle.
    Replay { channel: String, version: u64 },
    Downgrade {
        channel: String,
        current: u64,
        offered: u64,
    },
}

/// The high-water marks of one trust domain, in a file.
#[derive(Debug)]
pub struct VersionStore {
    path: PathBuf,
    /// `path` with the symlinks of its last component resolved: the file read and replaced and
    /// the one `.lock` beside it, so every path naming one state file shares one lock and a
    /// write does not replace the link with a file of its own.
    file: PathBuf,
    /// Opened by [`VersionStore::open_read_only`]: reads take no lock and create nothing.
    read_only: bool,
}

impl VersionStore {
    /// Use (and create when missing) the state file at `path`. The file itself is only read and
    /// replaced under the lock; a missing file means no marks yet. In a directory that cannot be
    /// written (a read-only or full partition) the marks are still read and enforced, and an
    /// activation that needs no new mark (a restart) works; one that would raise a mark fails
    /// with the reason, and nothing is activated.
    pub fn open(path: impl AsRef<Path>) -> Result<VersionStore, StoreError> {
        let store = VersionStore::at(path.as_ref(), false)?;
        // Fail early on a path that is not a readable state file (a FIFO, a directory, junk),
        // before the lock file is created: a refused path leaves nothing behind. Reading
        // without the lock is safe: the file is only ever replaced whole, by rename.
        store.read()?;
        drop(store.lock()?);
        Ok(store)
    }

    /// Read the state file at `path` without ever writing: no lock file is created (the file
    /// is replaced atomically, so an unlocked read sees the old or the new marks, never a mix).
    /// [`check_and_raise`](Self::check_and_raise) and [`set`](Self::set) refuse. A missing
    /// file means no marks yet.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<VersionStore, StoreError> {
        let store = VersionStore::at(path.as_ref(), true)?;
        store.read()?;
        Ok(store)
    }

    fn at(path: &Path, read_only: bool) -> Result<VersionStore, StoreError> {
        let file = resolve_links(path).map_err(|error| StoreError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(VersionStore {
            path: path.to_path_buf(),
            file,
            read_only,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, error: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            error,
        }
    }

    fn lock(&self) -> Result<Lock, StoreError> {
        if self.read_only {
            return Err(self.io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "opened read-only",
            )));
        }
        let mut p = self.file.as_os_str().to_owned();
        p.push(".lock");
        let lock_path = PathBuf::from(p);
        // Errors name the lock file: a read-only directory refuses it, not the state file.
        let io = |error| StoreError::Io {
            path: lock_path.clone(),
            error,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        // A link planted as the lock file must not make us create its target.
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
        }
        let f = match opts.open(&lock_path) {
            Ok(f) => f,
            // A read-only state directory (EROFS, or no write permission): nothing can be
            // written there, so no raise can be persisted and `write` refuses one. Reads still
            // work: under the existing lock file opened for reading (flock needs no write
            // access), or unlocked when there is none (the file is only replaced whole).
            Err(e) if read_only_dir(&e) => {
                let mut ro = std::fs::OpenOptions::new();
                ro.read(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    ro.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
                }
                match ro.open(&lock_path) {
                    Ok(f) => f,
                    Err(e2) if e2.kind() == std::io::ErrorKind::NotFound => return Ok(Lock(None)),
                    Err(_) => return Err(io(e)),
                }
            }
            Err(e) => return Err(io(e)),
        };
        if !f.metadata().map_err(io)?.is_file() {
            return Err(io(std::io::Error::other(
                "the lock file is not a regular file",
            )));
        }
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor we own; released when the file is closed.
            loop {
                let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
                if rc == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(io(e));
                }
            }
        }
        Ok(Lock(Some(f)))
    }

    fn read(&self) -> Result<BTreeMap<String, Mark>, StoreError> {
        let text = match crate::fsutil::read_regular_string(&self.file, MAX_STATE_LEN) {
            Ok(t) => t,
            Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => {
                return Ok(BTreeMap::new())
            }
            Err(e) => return Err(e.into()),
        };
        let bad = |line, reason| StoreError::Malformed {
            path: self.path.clone(),
            line,
            reason,
        };
        // The writer's exact form only: a hand-edited or corrupted file is refused, never read
        // as fewer or lower marks.
        let mut lines = text.split_terminator('\n');
        match lines.next() {
            Some(MAGIC) => {}
            None => return Err(bad(1, "empty file (expected the header amend-versions-v1)")),
            Some(_) => return Err(bad(1, "not the header amend-versions-v1")),
        }
        if !text.ends_with('\n') {
            return Err(bad(text.lines().count(), "truncated (no final newline)"));
        }
        let mut marks = BTreeMap::new();
        for (i, l) in lines.enumerate() {
            let n = i + 2;
            let mut f = l.split(' ');
            let (Some(v), Some(d), Some(c), None) = (f.next(), f.next(), f.next(), f.next()) else {
                return Err(bad(n, "expected '<version> <digest hex> <channel hex>'"));
            };
            let canonical = !v.is_empty()
                && v.bytes().all(|b| b.is_ascii_digit())
                && (v == "0" || !v.starts_with('0'));
            let version: u64 = v
                .parse()
                .ok()
                .filter(|_| canonical)
                .ok_or_else(|| bad(n, "version is not a decimal u64"))?;
            let digest: [u8; 32] = from_hex(d)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad(n, "digest is not 64 lowercase hex characters"))?;
            let channel = from_hex(c)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| bad(n, "channel is not lowercase hex of UTF-8 text"))?;
            if marks.insert(channel, Mark { version, digest }).is_some() {
                return Err(bad(n, "a second line for the same channel"));
            }
        }
        Ok(marks)
    }

    fn write(&self, marks: &BTreeMap<String, Mark>) -> Result<(), StoreError> {
        let mut text = String::from(MAGIC);
        text.push('\n');
        for (c, m) in marks {
            text.push_str(&format!(
                "{} {} {}\n",
                m.version,
                to_hex(&m.digest),
                to_hex(c.as_bytes())
            ));
        }
        // The caller publishes nothing on this error: a mark that is not on disk must not be
        // acted on as if it were (a restart would accept the older bundle again).
        crate::fsutil::write_atomic(&self.file, text.as_bytes(), None).map_err(|e| {
            self.io(std::io::Error::new(
                e.kind(),
                format!("the new marks could not be saved ({e}); the old marks are kept"),
            ))
        })
    }

    /// All marks (read under the lock).
    pub fn marks(&self) -> Result<BTreeMap<String, Mark>, StoreError> {
        if self.read_only {
            return self.read();
        }
        let _lock = self.lock()?;
        self.read()
    }

    /// The mark of one channel.
    pub fn get(&self, channel: &str) -> Result<Option<Mark>, StoreError> {
        Ok(self.marks()?.remove(channel))
    }

    /// Check `offers` (channel, version, digest, allow_downgrade) against the marks and, when
    /// none is refused, raise the marks to them, all under one lock: two processes racing to
    /// activate bundles of one channel cannot both pass with stale marks. A refused offer
    /// writes nothing. An allowed downgrade sets the mark to the offered version (the operator's
    /// explicit rollback).
    pub fn check_and_raise(
        &self,
        offers: &[(String, u64, [u8; 32], bool)],
    ) -> Result<Result<(), Refusal>, StoreError> {
        let _lock = self.lock()?;
        let mut marks = self.read()?;
        let before = marks.clone();
        for (channel, version, digest, allow_downgrade) in offers {
            if let Some(m) = marks.get(channel) {
                if !allow_downgrade {
                    if *version < m.version {
                        return Ok(Err(Refusal::Downgrade {
                            channel: channel.clone(),
                            current: m.version,
                            offered: *version,
                        }));
                    }
                    if *version == m.version && *digest != m.digest {
                        return Ok(Err(Refusal::Replay {
                            channel: channel.clone(),
                            version: *version,
                        }));
                    }
                }
            }
            marks.insert(
                channel.clone(),
                Mark {
                    version: *version,
                    digest: *digest,
                },
            );
        }
        // Nothing to persist when every mark already holds (a restart re-activating what was
        // active): a full or read-only state partition must not refuse that.
        if marks != before {
            self.write(&marks)?;
        }
        Ok(Ok(()))
    }

    /// Set a channel's mark (an operator resetting or seeding the store).
    pub fn set(&self, channel: &str, mark: Mark) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        let mut marks = self.read()?;
        marks.insert(channel.to_string(), mark);
        self.write(&marks)
    }
}

/// Held while the store is read or replaced; dropping closes the file, which releases the flock.
/// `None`: a read-only directory without a lock file (see [`VersionStore::lock`]).
struct Lock(#[allow(dead_code)] Option<File>);

/// An error creating a file that means the directory cannot be written at all.
fn read_only_dir(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)) {
        return true;
    }
    e.kind() == std::io::ErrorKind::PermissionDenied
}

/// Lowercase hex only (what [`to_hex`] writes).
fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|c| Some((val(c[0])? << 4) | val(c[1])?))
        .collect()
}

/// `path` with the symbolic links of its last component followed (a dangling link gives its
/// missing target, which the first write creates). Links in the directories above need no
/// resolving: the lock file beside the resolved name is one file however they are named.
fn resolve_links(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    // The kernel's own limit on links followed in one lookup.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.file_type().is_symlink() => {
                let target = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(std::io::Error::other(
        "too many levels of symbolic links (a loop?)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("amend-vstore-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn marks_persist_and_refuse_lower_versions() {
        let p = tmp("a.state");
        let s = VersionStore::open(&p).unwrap();
        let ch = "ch with spaces\nand newline".to_string();
        assert_eq!(
            s.check_and_raise(&[(ch.clone(), 9, [9; 32], false)])
                .unwrap(),
            Ok(())
        );
        // A second handle (as another process would) sees the mark.
        let s2 = VersionStore::open(&p).unwrap();
        assert_eq!(s2.get(&ch).unwrap().unwrap().version, 9);
        assert!(matches!(
            s2.check_and_raise(&[(ch.clone(), 1, [1; 32], false)])
                .unwrap(),
            Err(Refusal::Downgrade {
                current: 9,
                offered: 1,
                ..
            })
        ));
        assert!(matches!(
            s2.check_and_raise(&[(ch.clone(), 9, [1; 32], false)])
                .unwrap(),
            Err(Refusal::Replay { version: 9, .. })
        ));
        // The same bundle again (a restart) is fine; nothing was lowered.
        assert_eq!(
            s2.check_and_raise(&[(ch.clone(), 9, [9; 32], false)])
                .unwrap(),
            Ok(())
        );
        assert_eq!(s.get(&ch).unwrap().unwrap().version, 9);
    }

    fn lock_of(p: &Path) -> PathBuf {
        let mut l = p.as_os_str().to_owned();
        l.push(".lock");
        PathBuf::from(l)
    }

    #[test]
    fn read_only_open_creates_nothing_and_refuses_writes() {
        let p = tmp("ro-missing.state");
        let _ = std::fs::remove_file(lock_of(&p));
        let s = VersionStore::open_read_only(&p).unwrap();
        assert_eq!(s.get("main").unwrap(), None);
        assert!(s
            .check_and_raise(&[("main".into(), 1, [1; 32], false)])
            .is_err());
        assert!(s
            .set(
                "main",
                Mark {
                    version: 1,
                    digest: [1; 32]
                }
            )
            .is_err());
        assert!(!p.exists() && !lock_of(&p).exists());
        // Marks written by a writable handle are seen, still without a lock file of its own.
        let w = tmp("ro-marks.state");
        VersionStore::open(&w)
            .unwrap()
            .set(
                "main",
                Mark {
                    version: 4,
                    digest: [4; 32],
                },
            )
            .unwrap();
        std::fs::remove_file(lock_of(&w)).unwrap();
        let r = VersionStore::open_read_only(&w).unwrap();
        assert_eq!(r.get("main").unwrap().unwrap().version, 4);
        assert!(!lock_of(&w).exists());
    }

    #[test]
    fn a_refused_state_file_leaves_no_lock_file() {
        let p = tmp("junk.state");
        let _ = std::fs::remove_file(lock_of(&p));
        std::fs::write(&p, b"\xff\xfe not text").unwrap();
        assert!(VersionStore::open(&p).is_err());
        assert!(!lock_of(&p).exists());
    }

    #[test]
    fn malformed_state_is_an_error_not_an_empty_store() {
        let p = tmp("bad.state");
        std::fs::write(&p, "amend-versions-v1\n12 zz 6162\n").unwrap();
        assert!(matches!(
            VersionStore::open(&p),
            Err(StoreError::Malformed { line: 2, .. })
        ));
    }
}
