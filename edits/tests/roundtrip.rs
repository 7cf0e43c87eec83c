//! Property test: random valid bundles write, read and verify back identically.

mod common;

use amend_edits::bundle::*;
use amend_edits::Site;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Spec {
    dim: usize,
    version: u64,
    codebooks: Vec<(u32, usize, u8, bool, Vec<f32>)>,
    neurons: Vec<(u32, usize, u8, Vec<f32>)>,
    low_rank: Vec<(usize, usize, usize, f32, Vec<f32>)>,
    memories: Vec<(usize, usize, f32, String)>,
    blob: Option<Vec<u8>>,
}

fn finite() -> impl Strategy<Value = f32> {
    -1e6f32..1e6f32
}

fn spec() -> impl Strategy<Value = Spec> {
    (1usize..12, any::<u64>()).prop_flat_map(|(dim, version)| {
        (
            Just(dim),
            Just(version),
            prop::collection::vec(
                (
                    0u32..18,
                    1usize..6,
                    0u8..3,
                    any::<bool>(),
                    prop::collection::vec(finite(), 64),
                ),
                0..3,
            ),
            prop::collection::vec(
                (
                    0u32..18,
                    1usize..5,
                    0u8..2,
                    prop::collection::vec(finite(), 64),
                ),
                0..3,
            ),
            prop::collection::vec(
                (
                    1usize..6,
                    1usize..6,
                    1usize..4,
                    finite(),
                    prop::collection::vec(finite(), 64),
                ),
                0..3,
            ),
            prop::collection::vec((1usize..5, 1usize..6, -1.0f32..=1.0, "[a-z ]{0,20}"), 0..2),
            prop::option::of(Just(common::gguf_lora_blob())),
        )
            .prop_map(
                |(dim, version, codebooks, neurons, low_rank, memories, blob)| Spec {
                    dim,
                    version,
                    codebooks,
                    neurons,
                    low_rank,
                    memories,
                    blob,
                },
            )
    })
}

/// `n` values cycled from `pool`.
fn take(pool: &[f32], n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| pool[(i + salt) % pool.len()]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_bundles_round_trip(s in spec()) {
        let mut meta = common::meta("rt", "ch", s.version);
        meta.model.n_embd = s.dim as u32;
        let mut b = BundleBuilder::new(meta.clone());
        let d = s.dim;
        let mut expect_cb = Vec::new();
        for (i, (layer, n, dist, allpos, pool)) in s.codebooks.iter().enumerate() {
            let mut keys = take(pool, n * d, 0);
            if *dist != 0 {
                // The normalized distances need unit-norm keys.
                for row in keys.chunks_mut(d) {
                    let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                    if norm > 0.0 {
                        row.iter_mut().for_each(|x| *x /= norm);
                    } else {
                        row[0] = 1.0;
                    }
                }
            }
            let values = take(pool, n * d, 1);
            // Radii of the normalized distances lie in their range [0, 2] (checked at open).
            let r_max = if *dist != 0 { 2.0 } else { f32::MAX };
            let radii: Vec<f32> = take(pool, *n, 2).iter().map(|x| x.abs().min(r_max)).collect();
            let p = b.add_codebook(*layer, Site::FfnOutput, Site::ResidualOut, *dist, *allpos, d, &keys, &values, &radii);
            b.add_edit(&format!("cb{i}"), *layer, Site::FfnOutput, "p", "t", p, 0, *n as u32);
            expect_cb.push((p, keys, values, radii));
        }
        let mut expect_pn = Vec::new();
        for (i, (layer, m, act, pool)) in s.neurons.iter().enumerate() {
            let keys = take(pool, m * d, 3);
            let biases = take(pool, *m, 4);
            let values = take(pool, m * d, 5);
            let p = b.add_patch_neurons(*layer, Site::FfnInput, Site::FfnOutput, *act, d, &keys, &biases, &values);
            b.add_edit(&format!("pn{i}"), *layer, Site::FfnOutput, "p", "t", p, 0, *m as u32);
            expect_pn.push((p, keys, biases, values));
        }
        let mut expect_lr = Vec::new();
        for (i, (n_in, n_out, rank, alpha, pool)) in s.low_rank.iter().enumerate() {
            let a = take(pool, rank * n_in, 6);
            let bm = take(pool, n_out * rank, 7);
            let name = format!("blk.{i}.ffn_down.weight");
            let p = b.add_low_rank(&[amend_edits::families::LowRankTensor {
                name: &name, n_in: *n_in, n_out: *n_out, rank: *rank, a: &a, b: &bm, alpha: *alpha,
            }]);
            b.add_edit(&format!("lr{i}"), 0, Site::FfnOutput, "p", "t", p, 0, 1);
            expect_lr.push((p, a, bm));
        }
        for (i, (e, n, thr, template)) in s.memories.iter().enumerate() {
            // One-hot rows: L2-normalized as the memory family requires.
            let emb: Vec<f32> = (0..e * n).map(|j| if j % e == (j / e) % e { 1.0 } else { 0.0 }).collect();
            let template = format!("{{edit}} {template} {{prompt}}");
            let recs = (0..*n).map(|k| MemoryRecordDesc {
                edit_id: format!("m{i}-{k}"), prompt: "p".into(), target: "t".into(), text: template.clone(),
            }).collect();
            let p = b.add_memory(*e, &emb, *thr, &template, EmbedderDesc::External { model_id: "minilm".into() }, recs);
            b.add_edit(&format!("mem{i}"), 0, Site::ResidualOut, "p", "t", p, 0, *n as u32);
        }
        if let Some(blob) = &s.blob {
            let p = b.add_gguf_lora(blob.clone());
            b.add_edit("gguf", 0, Site::FfnOutput, "p", "t", p, 0, 1);
        }
        let bytes = b.build_signed(&common::key(1)).unwrap();
        // Deterministic: building twice gives the same bytes.
        let again = b.build_signed(&common::key(1)).unwrap();
        prop_assert_eq!(bytes.as_slice(), again.as_slice());
        let bundle = Bundle::open(bytes.as_slice(), &common::trust()).unwrap();
        let m = bundle.manifest();
        prop_assert_eq!(&m.bundle_id, &meta.bundle_id);
        prop_assert_eq!(m.version, s.version);
        prop_assert_eq!(&m.model, &meta.model);
        prop_assert_eq!(m.payloads.len(), s.codebooks.len() + s.neurons.len() + s.low_rank.len() + s.memories.len() + s.blob.iter().count());
        for (p, keys, values, radii) in expect_cb {
            let v = bundle.codebook(p as usize, 0..radii.len()).unwrap();
            prop_assert_eq!(v.keys, &keys[..]);
            prop_assert_eq!(v.values, &values[..]);
            prop_assert_eq!(v.radii, &radii[..]);
        }
        for (p, keys, biases, values) in expect_pn {
            let v = bundle.patch_neurons(p as usize, 0..biases.len()).unwrap();
            prop_assert_eq!(v.keys, &keys[..]);
            prop_assert_eq!(v.biases, &biases[..]);
            prop_assert_eq!(v.values, &values[..]);
        }
        for (p, a, bm) in expect_lr {
            let v = bundle.low_rank(p as usize, |_| true).unwrap();
            prop_assert_eq!(v[0].a, &a[..]);
            prop_assert_eq!(v[0].b, &bm[..]);
        }
        if let Some(blob) = &s.blob {
            let p = bundle.payloads().iter().position(|p| matches!(p, Payload::LowRankGguf(_))).unwrap();
            prop_assert_eq!(bundle.gguf_lora(p).unwrap(), &blob[..]);
        }
        // The manifest re-encodes to the signed bytes exactly.
        let h = read_header(bytes.as_slice()).unwrap();
        let raw = &bytes.as_slice()[HEADER_LEN..HEADER_LEN + h.manifest_len.get() as usize];
        prop_assert_eq!(postcard::to_allocvec(m).unwrap(), raw.to_vec());
    }
}
