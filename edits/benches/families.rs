//! Timings of the edit families' per-request / per-row math (prints numbers; `harness = false`).
//!
//! `cargo bench -p amend-edits --bench families`

use std::hint::black_box;
use std::time::Instant;

use amend_edits::families::{
    l2_normalize, Activation, Codebook, Distance, Embedder, Memory, MemoryRecord, PatchNeurons,
    Pooling,
};
use amend_edits::Site;

const D: usize = 640;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
    fn unit_rows(&mut self, rows: usize, dim: usize) -> Vec<f32> {
        let mut v = self.vec(rows * dim);
        v.chunks_exact_mut(dim).for_each(|r| {
            l2_normalize(r);
        });
        v
    }
}

/// Median microseconds per call of `f` over `iters` calls (after one warm-up call).
fn time_us(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut samples: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

fn main() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let query: Vec<f32> = rng.vec(D).iter().map(|x| x * 20_000.0).collect();

    for n in [1_000usize, 10_000, 100_000] {
        let keys = rng.unit_rows(n, D);
        let values = rng.vec(n * D);
        let radii = vec![0.3f32; n];
        let t = Instant::now();
        let cb = Codebook::new(
            12,
            Site::FfnInput,
            Site::FfnOutput,
            D,
            &keys,
            &values,
            &radii,
            Distance::NormalizedEuclidean,
            false,
        )
        .unwrap();
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        let iters = if n >= 100_000 { 21 } else { 201 };
        let us = time_us(iters, || {
            black_box(cb.nearest(black_box(&query), None));
        });
        let mask = vec![true; n];
        let us_masked = time_us(iters, || {
            black_box(cb.nearest(black_box(&query), Some(&mask)));
        });
        let keys_e: Vec<f32> = rng.vec(n * D);
        let cb_e = Codebook::new(
            12,
            Site::FfnInput,
            Site::FfnOutput,
            D,
            &keys_e,
            &values,
            &radii,
            Distance::Euclidean,
            false,
        )
        .unwrap();
        let us_e = time_us(iters, || {
            black_box(cb_e.nearest(black_box(&query), None));
        });
        println!(
            "codebook nearest n={n:>6} d={D}: {us:9.1} us/lookup (normalized), {us_masked:9.1} us with mask, \
             {us_e:9.1} us euclidean; new() validation {open_ms:.1} ms; {:.1} GB/s",
            (n * D * 4) as f64 / us / 1e3
        );
    }

    let m = 1_000;
    let keys = rng.unit_rows(m, D);
    let biases = vec![-0.5f32; m];
    let values = rng.vec(m * D);
    let x = rng.unit_rows(1, D);
    for act in [Activation::Relu, Activation::Gelu] {
        let p = PatchNeurons::new(
            12,
            Site::FfnInput,
            Site::FfnOutput,
            D,
            &keys,
            &biases,
            &values,
            act,
        )
        .unwrap();
        let mut out = vec![0.0f32; D];
        let mut fired = 0;
        let us = time_us(1001, || {
            fired = p.apply(black_box(&x), &mut out, None);
        });
        println!("neurons apply m={m} d={D} {act:?}: {us:.1} us/row ({fired} fired)");
    }

    let n = 10_000;
    let emb = rng.unit_rows(n, D);
    let texts: Vec<String> = (0..n).map(|i| format!("edit {i}")).collect();
    let records: Vec<MemoryRecord> = texts
        .iter()
        .map(|t| MemoryRecord {
            edit_id: t,
            prompt: t,
            target: t,
            text: t,
        })
        .collect();
    let t = Instant::now();
    let mem = Memory::new(
        D,
        &emb,
        0.9,
        records,
        Memory::DEFAULT_TEMPLATE,
        Embedder::BaseModel {
            layer: 6,
            site: Site::ResidualOut,
            pooling: Pooling::Mean,
        },
    )
    .unwrap();
    println!(
        "memory new() n={n}: {:.1} ms (validation)",
        t.elapsed().as_secs_f64() * 1e3
    );
    let us = time_us(201, || {
        black_box(mem.nearest(black_box(&query), None));
    });
    let t = Instant::now();
    let mem16 = mem.clone().with_f16_index();
    let index_ms = t.elapsed().as_secs_f64() * 1e3;
    let us16 = time_us(201, || {
        black_box(mem16.nearest(black_box(&query), None));
    });
    // An in-scope query (a stored embedding, scaled) exercises the rescoring step too.
    let hit_q: Vec<f32> = emb[1234 * D..1235 * D].iter().map(|x| x * 9000.0).collect();
    let us16_hit = time_us(201, || {
        black_box(mem16.nearest(black_box(&hit_q), None));
    });
    println!(
        "memory nearest n={n} e={D}: {us:.1} us/request f32; {us16:.1} us with f16 index \
         ({us16_hit:.1} us in scope; index built: {}, {index_ms:.1} ms)",
        mem16.has_f16_index()
    );
}
