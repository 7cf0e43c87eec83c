//! 8 readers snapshot the EditSet while a writer swaps, rolls back and restores thousands of
//! times. Every transaction replaces the bundles of two channels with the same version and
//! rolls back the same edits in both, so a mixed state is detectable: each snapshot must show
//! both channels at one version, codebook values equal to that version, identical masks, and
//! generations never go backwards.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use amend_edits::editset::{ActiveSet, AddOptions};
use common::*;

const ROUNDS: u64 = 3000;
const READERS: usize = 8;

fn check(s: &ActiveSet) -> Option<u64> {
    if s.bundles.is_empty() {
        return None;
    }
    assert_eq!(s.bundles.len(), 2, "generation {}", s.generation);
    let va = s.bundles[0].bundle.manifest().version;
    let vb = s.bundles[1].bundle.manifest().version;
    assert_eq!(va, vb, "mixed versions in generation {}", s.generation);
    assert_eq!(
        s.bundles[0].rolled_back[..],
        s.bundles[1].rolled_back[..],
        "mixed masks"
    );
    let mut rows = [0usize; 2];
    for (id, cb) in s.codebook_views() {
        let k = usize::from(id.starts_with('b'));
        rows[k] += cb.rows.len();
        assert!(
            cb.values.iter().all(|&x| x == va as f32),
            "stale payload under version {va}"
        );
    }
    assert_eq!(rows[0], rows[1]);
    Some(va)
}

#[test]
fn readers_always_see_one_consistent_version() {
    let (set, _clock) = editset();
    let set = Arc::new(set);
    // Prepare and verify all bundles first so the writer loop is only swaps.
    let bundles: Vec<_> = (1..=ROUNDS)
        .map(|k| {
            (
                set.open_bytes(
                    builder(&format!("a{k}"), "a", k, k as f32)
                        .build_signed(&key(1))
                        .unwrap()
                        .as_slice(),
                )
                .unwrap(),
                set.open_bytes(
                    builder(&format!("b{k}"), "b", k, k as f32)
                        .build_signed(&key(1))
                        .unwrap()
                        .as_slice(),
                )
                .unwrap(),
            )
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (set, done, checks) = (set.clone(), done.clone(), checks.clone());
            thread::spawn(move || {
                let mut last_gen = 0;
                let mut seen = std::collections::BTreeSet::new();
                while !done.load(Ordering::Acquire) {
                    let s = set.snapshot();
                    assert!(s.generation >= last_gen, "generation went backwards");
                    last_gen = s.generation;
                    if let Some(v) = check(&s) {
                        seen.insert(v);
                    }
                    checks.fetch_add(1, Ordering::Relaxed);
                }
                seen.len()
            })
        })
        .collect();

    // Start swapping only once every reader is running, and give them the CPU between swaps
    // (this machine may have 2 cores for 9 threads).
    while checks.load(Ordering::Relaxed) < READERS as u64 * 10 {
        thread::yield_now();
    }
    let mut swaps = 0u64;
    for (k, (a, b)) in bundles.into_iter().enumerate() {
        let k = k as u64 + 1;
        set.update(|tx| {
            tx.add(a, AddOptions::default())?;
            tx.add(b, AddOptions::default())?;
            if k.is_multiple_of(3) {
                // Roll back the same edit in both bundles (topmost first, then the other).
                tx.rollback_edit("e-cb-0")?;
                tx.rollback_edit("e-cb-0")?;
            }
            Ok(())
        })
        .unwrap();
        swaps += 1;
        if k.is_multiple_of(4) {
            thread::sleep(std::time::Duration::from_micros(50));
        }
        if k.is_multiple_of(7) {
            set.restore_previous().unwrap();
            swaps += 1;
        }
        if k.is_multiple_of(11) {
            set.update(|tx| {
                tx.rollback_edit("e-mem-1")?;
                tx.rollback_edit("e-mem-1")
            })
            .unwrap();
            swaps += 1;
        }
    }
    done.store(true, Ordering::Release);
    let distinct: Vec<usize> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let final_snap = set.snapshot();
    assert_eq!(check(&final_snap), Some(ROUNDS));
    assert_eq!(final_snap.generation, swaps);
    let total = checks.load(Ordering::Relaxed);
    eprintln!("{swaps} swaps, {total} reader snapshots checked, distinct versions seen per reader: {distinct:?}");
    assert!(total > READERS as u64 * 100, "readers did not run");
    assert!(
        distinct.iter().sum::<usize>() > 100,
        "readers did not overlap the swaps"
    );
}
