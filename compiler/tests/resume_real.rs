//! Resuming from a checkpoint gives the bundle an uninterrupted compile gives, byte for byte,
//! for the methods that replay stored edits in code paths the CLI e2e test (grace, rome) does
//! not reach: tpatcher and lora per edit, memit per batch. Real model; skipped without it.

mod common;

use amend_compiler::checkpoint::{Checkpoint, Part};
use amend_compiler::dataset::{self, DataFormat};
use amend_compiler::{BundleIdentity, CompileError, Compiler, Hparams, Method};
use common::{real_model_path, repo_file, tmp_dir};

fn identity() -> BundleIdentity {
    BundleIdentity {
        created: Some(1_700_000_000),
        ..Default::default()
    }
}

#[test]
fn tpatcher_lora_memit_resume_byte_identical() {
    let Some(path) = real_model_path() else {
        return;
    };
    let records = dataset::load(&repo_file("data/dev-edits.json"), DataFormat::Auto).unwrap();
    let records: Vec<_> = records.into_iter().take(3).collect();
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    let mut c = Compiler::open(&path).unwrap();
    let mut hp = Hparams::resolve(c.fwd.cfg.arch, None, &[]).unwrap();
    hp.memit.batch = 2;
    // Resumption is what this tests: the relation KL terms would triple MEMIT's compile time.
    hp.memit.relation_kl_factor = 0.0;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    for (method, stop) in [(Method::TPatcher, 1), (Method::Lora, 2), (Method::Memit, 2)] {
        let t0 = std::time::Instant::now();
        c.checkpoint = None;
        let full = c
            .compile(method, &records, &hp, None, None, &identity(), &mut |_| {})
            .unwrap();
        let full = full.builder.build_signed(&key).unwrap();
        let uninterrupted = t0.elapsed().as_secs_f64();

        let ckpt = tmp_dir().join(format!("{}.amend.ckpt", method.name()));
        let parts = vec![Part::new("method", method.name().as_bytes())];
        let mut k = Checkpoint::new(ckpt.clone(), parts.clone(), 1_700_000_000, 3, key.clone());
        k.stop_after = Some(stop);
        c.checkpoint = Some(k);
        let e = c
            .compile(method, &records, &hp, None, None, &identity(), &mut |_| {})
            .err()
            .expect("stopped");
        assert!(
            matches!(e, CompileError::Interrupted { done, total: 3, .. } if done == stop),
            "{e}"
        );

        let t1 = std::time::Instant::now();
        let k = Checkpoint::load(&ckpt, &parts, &ids, &key)
            .unwrap()
            .unwrap();
        assert_eq!(k.resumed, stop);
        c.checkpoint = Some(k);
        let resumed = c
            .compile(method, &records, &hp, None, None, &identity(), &mut |_| {})
            .unwrap();
        let resumed = resumed.builder.build_signed(&key).unwrap();
        eprintln!(
            "{}: uninterrupted {uninterrupted:.1} s, resumed after {stop} edit(s) {:.1} s",
            method.name(),
            t1.elapsed().as_secs_f64()
        );
        assert!(
            full.as_slice() == resumed.as_slice(),
            "{}: the resumed bundle differs",
            method.name()
        );
    }
}
