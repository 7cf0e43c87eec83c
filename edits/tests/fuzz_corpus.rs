//! The fuzz targets' logic as a plain test (runs on stable, in `cargo test`): every seed of
//! `fuzz/seeds/` must verify, and thousands of random mutations of the seeds (bit flips,
//! truncations, byte splices) must be refused without panicking.

mod common;

use amend_edits::bundle::{check_manifest, decode_manifest, encode_manifest, AlignedBuf, Bundle};

fn seeds(kind: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(kind);
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    v
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
        }
        1 => v.truncate(rng.below(v.len())),
        2 => {
            let i = rng.below(v.len());
            let x = rng.next() as u8;
            v.insert(i, x);
        }
        _ => {
            let i = rng.below(v.len());
            v[i] = rng.next() as u8;
        }
    }
    v
}

fn read_all(data: &[u8]) -> bool {
    let trust = common::trust();
    match Bundle::open(AlignedBuf::from_slice(data), &trust) {
        Ok(b) => {
            for p in 0..b.payloads().len() {
                let n = b.units(p);
                let _ = b.codebook(p, 0..n);
                let _ = b.patch_neurons(p, 0..n);
                let _ = b.memory(p, 0..n);
                let _ = b.low_rank(p, |_| true);
                let _ = b.gguf_lora(p);
            }
            true
        }
        Err(_) => false,
    }
}

#[test]
fn bundle_reader_seeds_and_mutations() {
    let seeds = seeds("bundle_reader");
    for s in &seeds {
        assert!(read_all(s), "a seed does not verify");
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let s = &seeds[rng.below(seeds.len())];
        let m = mutate(&mut rng, s);
        if read_all(&m) {
            // Only a mutation that changed nothing may verify.
            assert!(seeds.contains(&m), "a modified bundle verified");
            accepted += 1;
        }
    }
    assert!(accepted < 100);
}

#[test]
fn manifest_decoder_seeds_and_mutations() {
    let seeds = seeds("manifest_decoder");
    let mut rng = Rng(42);
    for i in 0..50_000 {
        let s = &seeds[i % seeds.len()];
        let data = if i < seeds.len() {
            s.clone()
        } else {
            mutate(&mut rng, s)
        };
        if let Ok(m) = decode_manifest(&data) {
            let _ = check_manifest(&m, None);
            let again = decode_manifest(&encode_manifest(&m).unwrap()).unwrap();
            assert_eq!(again, m);
        } else {
            assert!(i >= seeds.len(), "a seed manifest does not decode");
        }
    }
}
