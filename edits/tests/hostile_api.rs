//! The public API driven as a careless or hostile integrator would (session 37 QA): state files
//! named through links or edited by hand, planted lock files, long file names, degenerate math
//! inputs. Each case was seen failing before its fix.

use std::path::{Path, PathBuf};

use amend_edits::families::subject_relation;
use amend_edits::fsutil::write_atomic;
use amend_edits::version_store::{Mark, StoreError, VersionStore};

#[path = "../../tests/support/tmpfs.rs"]
mod tmpfs;
use tmpfs::Tmpfs;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("amend-hostile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mark(version: u64) -> Mark {
    Mark {
        version,
        digest: [version as u8; 32],
    }
}

/// A state file kept on a persistent partition and named through a link (`/etc/amend/state ->
/// /data/amend/state`) was replaced by a plain file at the link on the first write: the
/// target never got the mark and a process naming the target (another lock file) accepted v1
/// after v9.
#[cfg(unix)]
#[test]
fn version_store_named_through_a_link_writes_the_target_and_shares_its_lock() {
    let d = dir("link");
    let real = d.join("real.state");
    let link = d.join("link.state");
    std::os::unix::fs::symlink("real.state", &link).unwrap();
    let via_link = VersionStore::open(&link).unwrap();
    via_link.set("main", mark(9)).unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let direct = VersionStore::open(&real).unwrap();
    assert_eq!(direct.get("main").unwrap(), Some(mark(9)));
    assert!(matches!(
        direct.check_and_raise(&[("main".into(), 1, [1; 32], false)]),
        Ok(Err(_))
    ));
    // One lock file, beside the target.
    assert_eq!(names(&d), ["link.state", "real.state", "real.state.lock"]);
    // A link loop is an error naming the path, not a hang.
    let a = d.join("loop-a");
    std::os::unix::fs::symlink("loop-b", &a).unwrap();
    std::os::unix::fs::symlink("loop-a", d.join("loop-b")).unwrap();
    let e = VersionStore::open(&a).unwrap_err().to_string();
    assert!(e.contains("loop-a") && e.contains("symbolic links"), "{e}");
}

/// A hand-edited or damaged state file was read leniently: a second line for a channel
/// silently lowered its mark, a 32-character non-hex digest was taken as raw bytes, `+1` and
/// uppercase hex passed, a last line cut short was used, and an empty file said only
/// "malformed line 1".
#[test]
fn state_file_not_in_the_writers_form_is_refused_with_the_reason() {
    let d = dir("strict");
    let p = d.join("s");
    let z = "00".repeat(32);
    let cases: &[(String, usize, &str)] = &[
        (String::new(), 1, "empty file"),
        (
            format!("amend-versions-v1\n9 {z} 6d61696e\n1 {z} 6d61696e\n"),
            3,
            "same channel",
        ),
        (
            "amend-versions-v1\n5 abcdefghijklmnopqrstuvwxyz012345 6d61696e\n".into(),
            2,
            "digest",
        ),
        (
            format!("amend-versions-v1\n+5 {z} 6d61696e\n"),
            2,
            "version",
        ),
        (
            format!("amend-versions-v1\n05 {z} 6d61696e\n"),
            2,
            "version",
        ),
        (format!("amend-versions-v1\n5 {z} 6D61696E\n"), 2, "channel"),
        (
            format!("amend-versions-v1\n5 {} 6d61696e\n", "AB".repeat(32)),
            2,
            "digest",
        ),
        (format!("amend-versions-v1\n5 {z} 6d61"), 2, "truncated"),
    ];
    for (text, line, why) in cases {
        std::fs::write(&p, text).unwrap();
        let before = std::fs::read(&p).unwrap();
        let e = VersionStore::open(&p).unwrap_err();
        assert!(
            matches!(e, StoreError::Malformed { line: l, .. } if l == *line),
            "{text:?}: {e}"
        );
        assert!(e.to_string().contains(why), "{text:?}: {e}");
        assert_eq!(std::fs::read(&p).unwrap(), before, "nothing rewritten");
    }
    // The writer's own output still reads back.
    std::fs::remove_file(&p).unwrap();
    let s = VersionStore::open(&p).unwrap();
    s.set("", mark(0)).unwrap();
    s.set("main", mark(u64::MAX)).unwrap();
    let again = VersionStore::open(&p).unwrap();
    assert_eq!(again.get("").unwrap(), Some(mark(0)));
    assert_eq!(again.get("main").unwrap(), Some(mark(u64::MAX)));
}

/// A dangling link planted as `STATE.lock` made `open` create the link's target (as root, a
/// file anywhere); a lock path that is a directory was reported against the state file.
#[cfg(unix)]
#[test]
fn planted_lock_files_are_refused_and_named() {
    let d = dir("lock");
    let p = d.join("s");
    let victim = d.join("victim");
    std::os::unix::fs::symlink(&victim, d.join("s.lock")).unwrap();
    let e = VersionStore::open(&p).unwrap_err().to_string();
    assert!(e.contains("s.lock"), "{e}");
    assert!(!victim.exists(), "the link's target was created");
    let q = d.join("q");
    std::fs::create_dir(d.join("q.lock")).unwrap();
    let e = VersionStore::open(&q).unwrap_err().to_string();
    assert!(e.contains("q.lock"), "{e}");
}

/// Two handles on one file in one process (and threads racing on each) lose no raise: the
/// flock is per open file, so it excludes within a process too.
#[test]
fn two_stores_on_one_file_lose_no_update() {
    let d = dir("race");
    let p = d.join("s");
    let (a, b) = (
        VersionStore::open(&p).unwrap(),
        VersionStore::open(&p).unwrap(),
    );
    std::thread::scope(|s| {
        for (t, store) in [&a, &b, &a, &b].into_iter().enumerate() {
            s.spawn(move || {
                for v in 1..=10u64 {
                    let ch = format!("ch{t}");
                    assert_eq!(
                        store
                            .check_and_raise(&[(ch, v, [v as u8; 32], false)])
                            .unwrap(),
                        Ok(())
                    );
                }
            });
        }
    });
    let marks = VersionStore::open(&p).unwrap().marks().unwrap();
    assert_eq!(marks.len(), 4);
    assert!(marks.values().all(|m| m.version == 10));
    assert_eq!(names(&d), ["s", "s.lock"], "no temporary file left");
}

/// A file name of 250 bytes is valid, but `NAME.tmpPID.N` is not: write_atomic failed with
/// "File name too long" for it.
#[test]
fn write_atomic_takes_long_file_names() {
    let d = dir("long");
    let p = d.join("y".repeat(250));
    write_atomic(&p, b"one", None).unwrap();
    write_atomic(&p, b"two", Some(0o600)).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"two");
    assert_eq!(names(&d), ["y".repeat(250)], "no temporary file left");
}

/// The fingerprint turned every open error into `ErrorKind::Other`: a host could not tell a
/// missing model from a broken one.
#[test]
fn fingerprint_of_a_missing_model_is_not_found() {
    let d = dir("fp");
    match amend_edits::fingerprint::model_binding(d.join("nope.gguf")) {
        Err(amend_edits::fingerprint::FingerprintError::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
            assert!(e.to_string().contains("nope.gguf"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

/// `subject_relation` divided by zero for a zero width, and gave NaN for a subject shorter
/// than one row.
#[test]
fn subject_relation_of_degenerate_shapes_is_zero() {
    assert_eq!(subject_relation(&[], &[], &[], 0), (0.0, 0.0));
    assert_eq!(subject_relation(&[1.0], &[], &[1.0], 0), (0.0, 0.0));
    assert_eq!(
        subject_relation(&[1.0], &[1.0, 0.0], &[1.0, 0.0, 0.0, 1.0], 2),
        (0.0, 0.0)
    );
}

/// Session 38: `Codebook::nearest` and `Memory::nearest` took a query whose squared norm
/// overflows f32 (elements above about 1.8e19) for one without a direction and returned None;
/// a huge (or tiny) but finite query now finds its nearest entry, and NaN / infinity / zero
/// still give None.
#[test]
fn nearest_of_a_huge_finite_query_is_found() {
    use amend_edits::families::{Codebook, Distance, Embedder, Memory, MemoryRecord};
    use amend_edits::Site;
    let keys = [1.0, 0.0, 0.0, 1.0];
    let values = [7.0, 7.0, 8.0, 8.0];
    let cb = |d| {
        Codebook::new(
            0,
            Site::FfnInput,
            Site::FfnOutput,
            2,
            &keys,
            &values,
            &[0.1, 0.1],
            d,
            false,
        )
        .unwrap()
    };
    let rec = MemoryRecord {
        edit_id: "a",
        prompt: "p",
        target: "t",
        text: "x",
    };
    let mem = Memory::new(
        2,
        &keys,
        0.9,
        vec![rec, rec],
        "{prompt}",
        Embedder::External {
            model_id: "m",
            fingerprint: None,
        },
    )
    .unwrap();
    let dirs = [(1.0f32, 0.05f32, 0usize), (-0.05, 1.0, 1)];
    for scale in [1.0f32, 3e19, 1e30, f32::MAX / 2.0, 1e-30, 1e-36] {
        for (x, y, want) in dirs {
            let q = [x * scale, y * scale];
            assert!(q.iter().all(|v| v.is_finite()));
            for d in [Distance::NormalizedEuclidean, Distance::Cosine] {
                let h = cb(d)
                    .nearest(&q, None)
                    .unwrap_or_else(|| panic!("{scale:e} {d:?}: no hit"));
                assert_eq!(h.index, want, "{scale:e} {d:?}");
                assert!(h.distance.is_finite() && h.within_radius, "{scale:e} {h:?}");
            }
            let h = mem
                .nearest(&q, None)
                .unwrap_or_else(|| panic!("{scale:e}: no memory hit"));
            assert_eq!(h.index, want, "{scale:e}");
            assert!(
                (h.score - 0.99875).abs() < 1e-4 && h.in_scope,
                "{scale:e} {h:?}"
            );
        }
    }
    for q in [
        [f32::NAN, 1.0],
        [f32::INFINITY, 0.0],
        [f32::NEG_INFINITY, 1e30],
        [0.0, 0.0],
        [-0.0, 0.0],
    ] {
        assert!(cb(Distance::Cosine).nearest(&q, None).is_none(), "{q:?}");
        assert!(mem.nearest(&q, None).is_none(), "{q:?}");
    }
    // l2_normalize keeps the direction of a huge vector too.
    let mut v = [3e30f32, 4e30];
    assert!(amend_edits::families::l2_normalize(&mut v));
    assert!(
        (v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6,
        "{v:?}"
    );
    let mut nan = [f32::NAN, 1.0];
    assert!(!amend_edits::families::l2_normalize(&mut nan));
}

/// Session 38: a state partition that is full. Raising a mark fails with the reason and
/// leaves the old marks and no temporary file, and re-activating what is already marked (a
/// restart) works: before, every activation rewrote the file, so a full partition refused the
/// restart too.
#[test]
fn version_store_on_a_full_partition() {
    let Some(fs) = Tmpfs::mount(dir("vs-full"), "64k") else {
        return;
    };
    let p = fs.0.join("s.state");
    let s = VersionStore::open(&p).unwrap();
    s.check_and_raise(&[("main".into(), 1, [1; 32], false)])
        .unwrap()
        .unwrap();
    let before = std::fs::read(&p).unwrap();
    fs.fill();
    // A restart with the marked bundle: nothing to persist.
    assert_eq!(
        s.check_and_raise(&[("main".into(), 1, [1; 32], false)])
            .unwrap(),
        Ok(())
    );
    // A raise: refused, naming the store and the cause.
    let e = s
        .check_and_raise(&[("main".into(), 2, [2; 32], false)])
        .unwrap_err();
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
    let msg = e.to_string();
    for n in [p.to_str().unwrap(), "No space left", "old marks are kept"] {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(
        VersionStore::open(&p).unwrap().get("main").unwrap(),
        Some(mark(1))
    );
    assert_eq!(names(&fs.0), ["fill", "s.state", "s.state.lock"]);
}

/// Session 38: a state partition mounted read-only. The store opens (before: the lock
/// file's EROFS refused it, so no bundle could be activated even on a restart), enforces its
/// marks, lets the marked bundle be activated again, and refuses a raise it cannot persist
/// with the reason; nothing changes. With no lock file there, the same.
#[test]
fn version_store_on_a_read_only_partition() {
    let Some(fs) = Tmpfs::mount(dir("vs-ro"), "64k") else {
        return;
    };
    let p = fs.0.join("s.state");
    let q = fs.0.join("t.state");
    VersionStore::open(&p)
        .unwrap()
        .set("main", mark(3))
        .unwrap();
    VersionStore::open(&q)
        .unwrap()
        .set("main", mark(3))
        .unwrap();
    let mut ql = q.as_os_str().to_owned();
    ql.push(".lock");
    std::fs::remove_file(PathBuf::from(ql)).unwrap();
    let before = std::fs::read(&p).unwrap();
    fs.remount_ro();
    for path in [&p, &q] {
        let s = VersionStore::open(path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.get("main").unwrap(), Some(mark(3)));
        assert_eq!(
            s.check_and_raise(&[("main".into(), 3, [3; 32], false)])
                .unwrap(),
            Ok(())
        );
        assert!(matches!(
            s.check_and_raise(&[("main".into(), 2, [2; 32], false)])
                .unwrap(),
            Err(amend_edits::version_store::Refusal::Downgrade { .. })
        ));
        let msg = s
            .check_and_raise(&[("main".into(), 4, [4; 32], false)])
            .unwrap_err()
            .to_string();
        for n in [
            path.to_str().unwrap(),
            "Read-only file system",
            "not be saved",
        ] {
            assert!(msg.contains(n), "{msg:?} lacks {n:?}");
        }
        assert_eq!(s.get("main").unwrap(), Some(mark(3)));
    }
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(names(&fs.0), ["s.state", "s.state.lock", "t.state"]);
}

/// Session 38: the one atomic writer on a full partition: ENOSPC is the error, the
/// existing destination keeps its bytes and no temporary file is left (a write that fails part
/// way through included).
#[test]
fn atomic_write_on_a_full_partition_keeps_the_old_file() {
    let Some(fs) = Tmpfs::mount(dir("aw-full"), "64k") else {
        return;
    };
    let p = fs.0.join("out.bin");
    write_atomic(&p, b"old", None).unwrap();
    // Room for some of it, not all.
    let e = write_atomic(&p, &vec![7u8; 256 << 10], None).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_enospc()), "{e}");
    fs.fill();
    let e = write_atomic(&p, b"new", None).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_enospc()), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), b"old");
    assert_eq!(names(&fs.0), ["fill", "out.bin"]);
}

fn libc_enospc() -> i32 {
    28
}
