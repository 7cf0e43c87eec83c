//! verify + open + activate of codebook bundles (d = 640, gemma3-270m's width), and the model
//! fingerprint cost. Prints milliseconds and resident memory added relative to the payload.
//!
//! `cargo bench -p amend-edits --bench bundle_open` (env AMEND_BENCH_ROWS=1000,100000 to choose).

use std::sync::Arc;
use std::time::Instant;

use amend_edits::bundle::{Bundle, BundleBuilder, BundleMeta, ModelBinding};
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::editset::{AddOptions, EditSet, ManualClock};
use amend_edits::keys::TrustStore;
use amend_edits::Site;

const D: usize = 640;

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|x| x.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn model() -> ModelBinding {
    ModelBinding {
        fingerprint: [3; 32],
        arch: "gemma3".into(),
        n_layer: 18,
        n_embd: D as u32,
    }
}

fn write_bundle(rows: usize, key: &SigningKey, path: &std::path::Path) -> u64 {
    let mut b = BundleBuilder::new(BundleMeta {
        bundle_id: format!("bench-{rows}"),
        channel: "bench".into(),
        version: 1,
        created: 0,
        not_before: 0,
        expires: u64::MAX,
        model: model(),
    });
    // Deterministic, finite, non-trivial values.
    let keys: Vec<f32> = (0..rows * D)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
        .collect();
    let values: Vec<f32> = keys.iter().map(|x| 1.0 - x).collect();
    let radii = vec![0.5f32; rows];
    let p = b.add_codebook(
        6,
        Site::FfnOutput,
        Site::FfnOutput,
        0,
        false,
        D,
        &keys,
        &values,
        &radii,
    );
    drop((keys, values));
    // One edit per 10 rows: realistic manifests carry prompts and targets.
    for e in 0..rows / 10 {
        b.add_edit(
            &format!("edit-{e}"),
            6,
            Site::FfnOutput,
            "The capital of Freedonia is",
            " Sylvania",
            p,
            (e * 10) as u32,
            10,
        );
    }
    let buf = b.build_signed(key).expect("build");
    std::fs::write(path, buf.as_slice()).expect("write bundle");
    (rows * (2 * D + 1) * 4) as u64
}

fn main() {
    let rows_list: Vec<usize> = std::env::var("AMEND_BENCH_ROWS")
        .unwrap_or_else(|_| "1000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let key = SigningKey::from_bytes(&[9; 32]);
    let trust = TrustStore::with_key(key.verifying_key());
    let dir = std::env::temp_dir().join(format!("amend-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for rows in rows_list {
        let path = dir.join(format!("cb{rows}.amend"));
        let payload = write_bundle(rows, &key, &path);
        let file_len = std::fs::metadata(&path).unwrap().len();
        let iters = if rows <= 10_000 { 30 } else { 3 };
        let mut times = Vec::new();
        let mut growth = Vec::new();
        for _ in 0..iters {
            let set = EditSet::with_clock(model(), trust.clone(), Arc::new(ManualClock::new(1)));
            let rss0 = rss_bytes();
            let t = Instant::now();
            // verify (signature, hashes, finiteness) + open (mmap, views) + activate (one swap)
            let b = Bundle::open_file(&path, &trust).expect("open");
            set.add(Arc::new(b), AddOptions::default())
                .expect("activate");
            let snap = set.snapshot();
            let n: usize = snap.codebook_views().map(|(_, v)| v.radii.len()).sum();
            let dt = t.elapsed();
            assert_eq!(n, rows);
            growth.push(rss_bytes().saturating_sub(rss0));
            times.push(dt.as_secs_f64() * 1e3);
            drop(snap);
            drop(set);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let g = growth.iter().copied().max().unwrap_or(0);
        println!(
            "codebook rows={rows:>6} d={D}: payload {:.1} MB (file {:.1} MB): verify+open+activate median {:.2} ms (min {:.2}, max {:.2}, n={iters}); RSS growth {:.1} MB = {:.3}x payload",
            payload as f64 / 1e6,
            file_len as f64 / 1e6,
            times[times.len() / 2],
            times[0],
            times[times.len() - 1],
            g as f64 / 1e6,
            g as f64 / payload as f64
        );
        let _ = std::fs::remove_file(&path);
    }
    let _ = std::fs::remove_dir(&dir);

    // Model fingerprint on the default model, when present.
    let model_path = std::env::var("AMEND_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("gemma3-270m-q4_k_m.gguf")
        });
    if model_path.exists() {
        let t = Instant::now();
        let full =
            amend_edits::fingerprint::model_binding_uncached(&model_path).expect("fingerprint");
        let full_ms = t.elapsed().as_secs_f64() * 1e3;
        let _ = amend_edits::fingerprint::model_binding(&model_path).expect("fingerprint");
        let t = Instant::now();
        let cached = amend_edits::fingerprint::model_binding(&model_path).expect("fingerprint");
        let cached_ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(full, cached);
        println!(
            "model fingerprint of {} ({:.0} MB): full sha256 {full_ms:.1} ms, cached {cached_ms:.2} ms",
            model_path.display(),
            std::fs::metadata(&model_path).map_or(0, |m| m.len()) as f64 / 1e6
        );
    } else {
        println!(
            "model fingerprint: skipped, {} not found",
            model_path.display()
        );
    }
}
