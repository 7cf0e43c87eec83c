//! Resuming a long compilation: the finished edits' trained results, kept in a signed file next
//! to the output (`OUT.ckpt`) so a compile killed halfway starts again after them.
//!
//! - **What is kept.** Per finished edit, what its method needs to replay it without training
//!   ([`Done`]: its report and a few f32 vectors, e.g. GRACE's key and value). Replaying the
//!   stored edits in order rebuilds the exact state training had reached, so the remaining
//!   edits train on the same inputs and the bundle is byte-identical to an uninterrupted run
//!   (its `created` time is kept too).
//! - **What binds it.** Named sha256 digests ([`Part`]) of everything that determines the
//!   result: the model fingerprint, the method, its hyperparameters in effect, the layer, the
//!   edit requests, the base bundle and the bundle identity. A checkpoint whose digests differ
//!   is refused naming what differs (`amend compile --restart` ignores it).
//! - **Who wrote it.** The file is signed with the key that signs the bundle (ed25519 over the
//!   sha256 of the body): a checkpoint planted next to `--out` by someone without that key
//!   would otherwise put trained values of their choosing into a bundle signed by it. It is
//!   opened through [`amend_edits::fsutil::open_regular`] with a size cap from the number of
//!   records, its signature checked before anything is parsed, and every length checked
//!   against the bytes left.
//! - **When it is written.** After an edit finishes, when at least [`Checkpoint::interval`]
//!   has passed since the last write and at least 20 times the last write's duration (so
//!   writing stays under ~5% of the time as the file grows), and at exit on an error.
//!   Atomically: [`amend_edits::fsutil::write_atomic`] (temporary file, fsync, rename).

use crate::error::{CompileError, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"AMCKPT01";
const SIG_LEN: usize = 64;
/// Longest edit id and action text kept.
const MAX_TEXT: usize = 1 << 16;
/// Most vectors per edit (MEMIT: 3 per layer of its window).
const MAX_VECS: usize = 256;
/// Most f32 values per edit (64 MiB).
pub const MAX_VALUES_PER_EDIT: usize = 1 << 24;
/// Most bytes of one edit's entry.
const MAX_EDIT_BYTES: u64 = 4 * MAX_VALUES_PER_EDIT as u64 + 2 * MAX_TEXT as u64 + 8192;
/// Cap on the whole file whatever the record count.
const MAX_FILE_LEN: u64 = 1 << 36;

/// The checkpoint of `out`: `OUT.ckpt` beside it.
pub fn path_for(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".ckpt");
    PathBuf::from(p)
}

/// Checks, before any training, that the directory of `out` takes a checkpoint's first write
/// and the bundle: a page is written atomically beside `out` and removed again. A full or
/// read-only partition is refused here rather than at the first checkpoint write, after the
/// first edit has trained.
pub fn probe_dir(out: &Path) -> Result<()> {
    let mut p = path_for(out).into_os_string();
    p.push(".probe");
    let probe = PathBuf::from(p);
    amend_edits::fsutil::probe_write(&probe, 4096).map_err(|e| {
        CompileError::Checkpoint(format!(
            "cannot write beside {} ({}: {e})",
            out.display(),
            probe.display()
        ))
    })
}

/// One named digest of an input the result depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub digest: [u8; 32],
}

impl Part {
    pub fn new(name: &str, bytes: &[u8]) -> Part {
        Part {
            name: name.to_string(),
            digest: Sha256::digest(bytes).into(),
        }
    }
}

/// A finished edit: its report and the values its method replays it from.
#[derive(Clone, Debug, PartialEq)]
pub struct Done {
    pub id: String,
    pub loss: f32,
    pub steps: u64,
    pub success: bool,
    pub action: String,
    pub vecs: Vec<Vec<f32>>,
}

impl Done {
    /// What a checkpoint keeps of a trained edit: its report and the values to replay it from.
    pub fn of(rep: &crate::EditReport, vecs: Vec<Vec<f32>>) -> Done {
        Done {
            id: rep.id.clone(),
            loss: rep.loss,
            steps: rep.steps as u64,
            success: rep.success,
            action: rep.action.clone(),
            vecs,
        }
    }

    /// The compile report of a replayed edit (`seconds`: what replaying it took).
    pub fn report(&self, seconds: f64) -> crate::EditReport {
        crate::EditReport {
            id: self.id.clone(),
            loss: self.loss,
            steps: self.steps as usize,
            seconds,
            success: self.success,
            action: self.action.clone(),
        }
    }

    /// The vectors, checked to have exactly the lengths `lens` and finite values (a checkpoint
    /// is input: a wrong shape must be an error, not a panic or a malformed bundle).
    pub fn vecs_of(&self, lens: &[usize]) -> Result<&[Vec<f32>]> {
        let ok = self.vecs.len() == lens.len()
            && self.vecs.iter().zip(lens).all(|(v, &n)| v.len() == n)
            && self.vecs.iter().flatten().all(|x| x.is_finite());
        if !ok {
            return Err(CompileError::Checkpoint(format!(
                "edit {:?}: stored values have the wrong shape for this model and method \
                 (delete the checkpoint or pass --restart)",
                self.id
            )));
        }
        Ok(&self.vecs)
    }
}

/// The finished edits of one compilation and where they are written.
pub struct Checkpoint {
    path: PathBuf,
    parts: Vec<Part>,
    /// The bundle's `created` time (kept so a resumed bundle is the uninterrupted one's).
    pub created: u64,
    n_records: usize,
    done: BTreeMap<usize, Done>,
    key: SigningKey,
    dirty: bool,
    last_write: Option<Instant>,
    last_write_secs: f64,
    /// Least time between two writes.
    pub interval: Duration,
    /// Test hook (`amend compile --test-stop-after K`): fail with
    /// [`CompileError::Interrupted`] once K edits are done, as a killed compile would stop.
    pub stop_after: Option<usize>,
    /// Edits loaded from the file.
    pub resumed: usize,
    /// Writes so far and their total seconds.
    pub writes: usize,
    pub write_secs: f64,
}

impl Checkpoint {
    /// An empty checkpoint for `n_records` edits bound to `parts`, written to `path`, signed
    /// with `key`.
    pub fn new(
        path: PathBuf,
        parts: Vec<Part>,
        created: u64,
        n_records: usize,
        key: SigningKey,
    ) -> Checkpoint {
        Checkpoint {
            path,
            parts,
            created,
            n_records,
            done: BTreeMap::new(),
            key,
            dirty: false,
            last_write: Some(Instant::now()),
            last_write_secs: 0.0,
            interval: Duration::from_secs(30),
            stop_after: None,
            resumed: 0,
            writes: 0,
            write_secs: 0.0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Edits done so far.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// The checkpoint at `path` for a compilation of the records with ids `ids`, bound to
    /// `parts` and signed by `key`: `Ok(None)` when there is no file, an error when it is
    /// unreadable, not signed by `key`, or written for other inputs.
    pub fn load(
        path: &Path,
        parts: &[Part],
        ids: &[&str],
        key: &SigningKey,
    ) -> Result<Option<Checkpoint>> {
        let cap = (4096 + ids.len() as u64 * MAX_EDIT_BYTES).min(MAX_FILE_LEN);
        let bytes = match amend_edits::fsutil::read_regular(path, cap) {
            Ok(b) => b,
            Err(e) if e.io_kind() == Some(std::io::ErrorKind::NotFound) => return Ok(None),
            Err(e) => return Err(CompileError::Checkpoint(e.to_string())),
        };
        let bad = |m: &str| {
            CompileError::Checkpoint(format!(
                "{}: {m} (delete it or pass --restart)",
                path.display()
            ))
        };
        if bytes.len() < MAGIC.len() + SIG_LEN || &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad("not an amend compile checkpoint"));
        }
        let (body, sig) = bytes.split_at(bytes.len() - SIG_LEN);
        let sig = Signature::from_slice(sig).map_err(|_| bad("malformed signature"))?;
        key.verifying_key()
            .verify(&Sha256::digest(body), &sig)
            .map_err(|_| bad("not signed by --key (this compile did not write it)"))?;
        let mut r = Reader {
            b: &body[MAGIC.len()..],
        };
        let parse = |r: &mut Reader| -> Option<Parsed> {
            let n_parts = r.u32()? as usize;
            if n_parts > 64 {
                return None;
            }
            let mut stored = Vec::with_capacity(n_parts);
            for _ in 0..n_parts {
                let name = r.text()?;
                let digest: [u8; 32] = r.take(32)?.try_into().ok()?;
                stored.push(Part { name, digest });
            }
            let created = r.u64()?;
            let n_records = r.u64()?;
            let n_done = r.u64()?;
            let mut done = BTreeMap::new();
            for _ in 0..n_done {
                let index = r.u64()? as usize;
                let id = r.text()?;
                let loss = f32::from_bits(r.u32()?);
                let steps = r.u64()?;
                let success = match r.take(1)?[0] {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                let action = r.text()?;
                let n_vecs = r.u32()? as usize;
                if n_vecs > MAX_VECS {
                    return None;
                }
                let mut vecs = Vec::with_capacity(n_vecs);
                let mut total = 0usize;
                for _ in 0..n_vecs {
                    let n = r.u64()? as usize;
                    total = total.checked_add(n)?;
                    if total > MAX_VALUES_PER_EDIT {
                        return None;
                    }
                    let raw = r.take(n.checked_mul(4)?)?;
                    vecs.push(
                        raw.chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    );
                }
                let d = Done {
                    id,
                    loss,
                    steps,
                    success,
                    action,
                    vecs,
                };
                if done.insert(index, d).is_some() {
                    return None;
                }
            }
            if !r.b.is_empty() {
                return None;
            }
            Some((stored, created, n_records, done))
        };
        let (stored, created, n_records, done) =
            parse(&mut r).ok_or_else(|| bad("malformed or truncated"))?;
        let differ: Vec<&str> = parts
            .iter()
            .filter(|p| !stored.contains(p))
            .map(|p| p.name.as_str())
            .collect();
        if !differ.is_empty() || stored.len() != parts.len() || n_records != ids.len() as u64 {
            let what = if differ.is_empty() {
                "inputs".to_string()
            } else {
                differ.join(", ")
            };
            return Err(CompileError::Checkpoint(format!(
                "{} was written by a compile with other {what}; it cannot resume this one \
                 (delete it, or pass --restart to start over and replace it)",
                path.display()
            )));
        }
        for (&i, d) in &done {
            if ids.get(i) != Some(&d.id.as_str()) {
                return Err(bad(&format!("edit {i} is not record {i}'s id")));
            }
        }
        let resumed = done.len();
        Ok(Some(Checkpoint {
            path: path.to_path_buf(),
            parts: parts.to_vec(),
            created,
            n_records: ids.len(),
            done,
            key: key.clone(),
            dirty: false,
            last_write: Some(Instant::now()),
            last_write_secs: 0.0,
            interval: Duration::from_secs(30),
            stop_after: None,
            resumed,
            writes: 0,
            write_secs: 0.0,
        }))
    }

    /// The stored result of edit `index` (`id`), if it finished before.
    pub fn get(&self, index: usize, id: &str) -> Option<&Done> {
        self.done.get(&index).filter(|d| d.id == id)
    }

    /// Records a finished edit and writes the file when due.
    pub fn put(&mut self, index: usize, done: Done) -> Result<()> {
        if index >= self.n_records {
            return Err(CompileError::Checkpoint(format!(
                "edit index {index} out of range"
            )));
        }
        self.done.insert(index, done);
        self.dirty = true;
        if let Some(k) = self.stop_after {
            if self.done.len() >= k {
                self.flush()?;
                return Err(CompileError::Interrupted {
                    done: self.done.len(),
                    total: self.n_records,
                    path: self.path.clone(),
                });
            }
        }
        let due = match self.last_write {
            None => true,
            Some(t) => {
                let wait = self
                    .interval
                    .max(Duration::from_secs_f64(20.0 * self.last_write_secs));
                t.elapsed() >= wait
            }
        };
        if due {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the file now if anything changed since the last write.
    pub fn flush(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let t0 = Instant::now();
        let body = self.encode();
        let sig = self.key.sign(&Sha256::digest(&body));
        let mut bytes = body;
        bytes.extend_from_slice(&sig.to_bytes());
        amend_edits::fsutil::write_atomic(&self.path, &bytes, Some(0o600)).map_err(|e| {
            CompileError::Checkpoint(format!("writing {}: {e}", self.path.display()))
        })?;
        self.dirty = false;
        self.last_write = Some(Instant::now());
        self.last_write_secs = t0.elapsed().as_secs_f64();
        self.writes += 1;
        self.write_secs += self.last_write_secs;
        Ok(())
    }

    /// Deletes the file (after the bundle is written).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(MAGIC);
        w.extend_from_slice(&(self.parts.len() as u32).to_le_bytes());
        let text = |w: &mut Vec<u8>, s: &str| {
            let s = &s.as_bytes()[..s.len().min(MAX_TEXT)];
            w.extend_from_slice(&(s.len() as u32).to_le_bytes());
            w.extend_from_slice(s);
        };
        for p in &self.parts {
            text(&mut w, &p.name);
            w.extend_from_slice(&p.digest);
        }
        w.extend_from_slice(&self.created.to_le_bytes());
        w.extend_from_slice(&(self.n_records as u64).to_le_bytes());
        w.extend_from_slice(&(self.done.len() as u64).to_le_bytes());
        for (&i, d) in &self.done {
            w.extend_from_slice(&(i as u64).to_le_bytes());
            text(&mut w, &d.id);
            w.extend_from_slice(&d.loss.to_bits().to_le_bytes());
            w.extend_from_slice(&d.steps.to_le_bytes());
            w.push(d.success as u8);
            // Truncated at a char boundary so the text stays valid UTF-8.
            let mut a = d.action.as_str();
            while a.len() > MAX_TEXT {
                let mut end = MAX_TEXT;
                while !a.is_char_boundary(end) {
                    end -= 1;
                }
                a = &a[..end];
            }
            text(&mut w, a);
            w.extend_from_slice(&(d.vecs.len() as u32).to_le_bytes());
            for v in &d.vecs {
                w.extend_from_slice(&(v.len() as u64).to_le_bytes());
                for x in v {
                    w.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        w
    }
}

/// A parsed body: the stored parts, `created`, the record count and the finished edits.
type Parsed = (Vec<Part>, u64, u64, BTreeMap<usize, Done>);

/// A cursor over untrusted bytes: every read is checked against what is left.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn text(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > MAX_TEXT {
            return None;
        }
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("amend-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn done(id: &str, n: usize) -> Done {
        Done {
            id: id.into(),
            loss: 0.25,
            steps: 7,
            success: true,
            action: "added".into(),
            vecs: vec![vec![1.5; n], vec![-2.0; 3]],
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let p = dir().join("a.amend.ckpt");
        let parts = vec![Part::new("model", b"m"), Part::new("edits", b"e")];
        let ids = ["x", "y", "z"];
        let mut c = Checkpoint::new(p.clone(), parts.clone(), 42, 3, key(1));
        c.put(0, done("x", 5)).unwrap();
        c.put(1, done("y", 5)).unwrap();
        c.flush().unwrap();
        let l = Checkpoint::load(&p, &parts, &ids, &key(1))
            .unwrap()
            .unwrap();
        assert_eq!(l.created, 42);
        assert_eq!(l.resumed, 2);
        assert_eq!(l.get(1, "y"), Some(&done("y", 5)));
        assert_eq!(l.get(2, "z"), None);

        // Other edits: refused naming the part.
        let other = vec![Part::new("model", b"m"), Part::new("edits", b"E")];
        let e = Checkpoint::load(&p, &other, &ids, &key(1))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("other edits") && e.contains("--restart"), "{e}");
        // Another key: refused before parsing.
        let e = Checkpoint::load(&p, &parts, &ids, &key(2))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not signed by --key"), "{e}");
        // A flipped byte: the signature fails.
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 1;
        std::fs::write(&p, &b).unwrap();
        assert!(Checkpoint::load(&p, &parts, &ids, &key(1)).is_err());
        // Truncated: refused, no panic.
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        assert!(Checkpoint::load(&p, &parts, &ids, &key(1)).is_err());
        // Missing: None.
        std::fs::remove_file(&p).unwrap();
        assert!(Checkpoint::load(&p, &parts, &ids, &key(1))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_signed_but_lying_length_is_refused() {
        // A body whose vector length claims more than the file holds, validly signed.
        let p = dir().join("lying.ckpt");
        let parts = vec![Part::new("model", b"m")];
        let mut c = Checkpoint::new(p.clone(), parts.clone(), 1, 1, key(3));
        c.put(0, done("x", 2)).unwrap();
        let mut body = c.encode();
        // The last vector's length field sits 8 + 3*4 bytes before the end.
        let at = body.len() - 12 - 8;
        body[at..at + 8].copy_from_slice(&(u64::MAX / 8).to_le_bytes());
        let sig = key(3).sign(&Sha256::digest(&body));
        body.extend_from_slice(&sig.to_bytes());
        std::fs::write(&p, &body).unwrap();
        let e = Checkpoint::load(&p, &parts, &["x"], &key(3))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("malformed"), "{e}");
    }

    #[test]
    fn wrong_shapes_are_an_error() {
        let d = done("x", 4);
        assert!(d.vecs_of(&[4, 3]).is_ok());
        assert!(d.vecs_of(&[5, 3]).is_err());
        assert!(d.vecs_of(&[4]).is_err());
    }

    #[test]
    fn stop_after_flushes_and_interrupts() {
        let p = dir().join("stop.ckpt");
        let parts = vec![Part::new("model", b"m")];
        let mut c = Checkpoint::new(p.clone(), parts.clone(), 1, 3, key(4));
        c.stop_after = Some(2);
        c.interval = Duration::from_secs(3600);
        c.put(0, done("a", 1)).unwrap();
        let e = c.put(1, done("b", 1)).unwrap_err();
        assert!(matches!(
            e,
            CompileError::Interrupted {
                done: 2,
                total: 3,
                ..
            }
        ));
        let l = Checkpoint::load(&p, &parts, &["a", "b", "c"], &key(4))
            .unwrap()
            .unwrap();
        assert_eq!(l.len(), 2);
    }
}
