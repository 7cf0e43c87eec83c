//! Structure-aware: the fuzzer's bytes choose the *contents* of a bundle (dims, payload kinds,
//! section indices, shapes' rows, float values including NaN/huge/denormal, strings, edits,
//! validity times), which is then assembled and signed with the test key [1; 32]. Every
//! mutation therefore gets past the signature, so what is fuzzed is everything after it:
//! manifest checks, section refs, value bounds, the families' own checks, activation in an
//! EditSet and the inference math over the views.
#![no_main]

use std::sync::Arc;

use amend_edits::bundle::{
    CodebookDesc, EmbedderDesc, MemoryRecordDesc, ModelBinding, PatchNeuronsDesc, Payload,
    RelationGroupsDesc, ScopeHeadDesc, ScopeRoutingDesc, SectionKind,
};
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::editset::{AddOptions, EditSet, ManualClock};
use amend_edits::families::{self, LowRankTensor};
use amend_edits::keys::TrustStore;
use amend_edits::{BundleBuilder, BundleMeta, Site};
use libfuzzer_sys::fuzz_target;

struct Cur<'a>(&'a [u8]);

impl Cur<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn below(&mut self, n: u32) -> u32 {
        if n == 0 {
            0
        } else {
            self.u8() as u32 % n
        }
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |a, _| (a << 8) | self.u8() as u64)
    }
    fn f32(&mut self) -> f32 {
        const PALETTE: [f32; 12] = [
            0.0,
            1.0,
            -1.0,
            0.5,
            2.0,
            1.0e6,
            1.000_001e6,
            -3.0e38,
            1.0e-40,
            0.25,
            4.0,
            -0.75,
        ];
        match self.u8() {
            0..=199 => PALETTE[self.below(PALETTE.len() as u32) as usize],
            200..=219 => f32::NAN,
            220..=229 => f32::INFINITY,
            _ => f32::from_bits(self.u64() as u32),
        }
    }
    fn floats(&mut self, n: usize, unit_rows_of: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|_| self.f32()).collect();
        // Most of the time, normalize rows so the families' unit-norm checks pass.
        if unit_rows_of > 0 && self.u8() < 200 {
            for row in v.chunks_mut(unit_rows_of) {
                let _ = families::l2_normalize(row);
            }
        }
        v
    }
    /// Like [`Cur::floats`], but most of the time from finite values within the format's
    /// bounds, so that structures with many sections (a scope memory) get past the reader's
    /// value checks often enough to reach the math.
    fn tame_floats(&mut self, n: usize, unit_rows_of: usize) -> Vec<f32> {
        if self.u8() < 16 {
            return self.floats(n, unit_rows_of);
        }
        const TAME: [f32; 8] = [0.0, 1.0, -1.0, 0.5, 0.25, -0.75, 2.0, 1.0e-3];
        let mut v: Vec<f32> = (0..n).map(|_| TAME[self.below(8) as usize]).collect();
        if unit_rows_of > 0 && self.u8() < 240 {
            for row in v.chunks_mut(unit_rows_of) {
                if !families::l2_normalize(row) {
                    row[0] = 1.0;
                }
            }
        }
        v
    }
    /// A cosine-like threshold, now and then outside [-1, 1] or not finite.
    fn cosine(&mut self) -> f32 {
        match self.u8() {
            0..=239 => self.below(21) as f32 / 10.0 - 1.0,
            _ => self.f32(),
        }
    }
    fn string(&mut self) -> String {
        const WORDS: [&str; 6] = ["e0", "e1", "", "blk.0.ffn_down.weight", "ü\u{0}x", "e0"];
        match self.u8() {
            0..=239 => WORDS[self.below(WORDS.len() as u32) as usize].to_string(),
            _ => {
                let n = self.below(24) as usize;
                String::from_utf8_lossy(&(0..n).map(|_| self.u8()).collect::<Vec<_>>()).into()
            }
        }
    }
    fn records(&mut self, n: usize) -> Vec<MemoryRecordDesc> {
        (0..n)
            .map(|_| MemoryRecordDesc {
                edit_id: self.string(),
                prompt: self.string(),
                target: self.string(),
                text: self.string(),
            })
            .collect()
    }
    fn site(&mut self) -> Site {
        Site::from_code(self.below(5) as u8).unwrap_or(Site::FfnOutput)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Cur(data);
    let key = SigningKey::from_bytes(&[1; 32]);
    let dim = 1 + c.below(6) as usize;
    let n_layer = 1 + c.below(4);
    let model = ModelBinding {
        fingerprint: [7; 32],
        arch: "gemma3".into(),
        n_layer,
        n_embd: dim as u32,
    };
    let meta = BundleMeta {
        bundle_id: if c.u8() < 250 { "b".into() } else { c.string() },
        channel: c.string(),
        version: c.below(4) as u64,
        created: 0,
        not_before: c.below(3) as u64 * 500,
        expires: if c.u8() < 128 {
            u64::MAX
        } else {
            c.below(4) as u64 * 500
        },
        model: model.clone(),
    };
    let mut b = BundleBuilder::new(meta);
    let mut units = Vec::new();
    for _ in 0..c.below(4) {
        let layer = c.below(n_layer + 1);
        let (p, n) = match c.below(8) {
            0 => {
                let n = 1 + c.below(3) as usize;
                let dist = c.below(4) as u8;
                let keys = c.floats(n * dim, dim);
                let values = c.floats(n * dim, 0);
                let radii = c.floats(n, 0);
                let (ks, rs) = (c.site(), c.site());
                let ap = c.u8() & 1 == 1;
                (
                    b.add_codebook(layer, ks, rs, dist, ap, dim, &keys, &values, &radii),
                    n,
                )
            }
            1 => {
                let n = 1 + c.below(3) as usize;
                let act = c.below(3) as u8;
                let keys = c.floats(n * dim, 0);
                let biases = c.floats(n, 0);
                let values = c.floats(n * dim, 0);
                let (r, w) = (c.site(), c.site());
                (
                    b.add_patch_neurons(layer, r, w, act, dim, &keys, &biases, &values),
                    n,
                )
            }
            2 => {
                let nt = 1 + c.below(2) as usize;
                let mut store = Vec::new();
                for _ in 0..nt {
                    let (n_in, n_out, rank) = (
                        1 + c.below(4) as usize,
                        1 + c.below(4) as usize,
                        1 + c.below(3) as usize,
                    );
                    let a = c.floats(rank * n_in, 0);
                    let bb = c.floats(n_out * rank, 0);
                    let name = format!("blk.{}.ffn_down.weight", c.below(n_layer + 1));
                    store.push((name, n_in, n_out, rank, a, bb, c.f32()));
                }
                let ts: Vec<LowRankTensor<'_>> = store
                    .iter()
                    .map(|(name, n_in, n_out, rank, a, bb, alpha)| LowRankTensor {
                        name,
                        n_in: *n_in,
                        n_out: *n_out,
                        rank: *rank,
                        a,
                        b: bb,
                        alpha: *alpha,
                    })
                    .collect();
                // A valid GGUF-LoRA of the same tensors, maybe with one byte changed.
                let gguf = families::LowRank::new(ts.clone())
                    .ok()
                    .map(|lr| lr.to_gguf_lora("gemma3"));
                if let (Some(mut blob), true) = (gguf, c.u8() < 100) {
                    if c.u8() < 128 && !blob.is_empty() {
                        let at = c.u64() as usize % blob.len();
                        blob[at] ^= c.u8() | 1;
                    }
                    (b.add_gguf_lora(blob), 1)
                } else {
                    (b.add_low_rank(&ts), nt)
                }
            }
            3 => {
                let n = 1 + c.below(3) as usize;
                let e = 1 + c.below(6) as usize;
                let emb = c.floats(n * e, e);
                let records = c.records(n);
                let embedder = if c.u8() < 200 {
                    EmbedderDesc::BaseModel {
                        layer: c.below(n_layer + 1),
                        site: c.below(6) as u8,
                        pooling: c.below(3) as u8,
                    }
                } else {
                    EmbedderDesc::External {
                        model_id: c.string(),
                    }
                };
                let (thr, tpl) = (c.f32(), c.string());
                (b.add_memory(e, &emb, thr, &tpl, embedder, records), n)
            }
            4 => {
                // Raw descriptor over fuzzed section indices (wrong kinds, reuse, dangling).
                let n = 1 + c.below(2) as u64;
                let s0 = b.add_f32(
                    SectionKind::CodebookKeys,
                    vec![n, dim as u64],
                    &c.floats(n as usize * dim, dim),
                );
                let s1 = b.add_f32(
                    SectionKind::CodebookValues,
                    vec![n, dim as u64],
                    &c.floats(n as usize * dim, 0),
                );
                let s2 = b.add_f32(
                    SectionKind::CodebookRadii,
                    vec![n],
                    &c.floats(n as usize, 0),
                );
                let pick = |c: &mut Cur, s: u32| if c.u8() < 200 { s } else { c.below(s + 3) };
                let desc = CodebookDesc {
                    layer,
                    key_site: c.below(6) as u8,
                    replace_site: c.below(6) as u8,
                    distance: c.below(3) as u8,
                    all_positions: false,
                    keys: pick(&mut c, s0),
                    values: pick(&mut c, s1),
                    radii: pick(&mut c, s2),
                };
                (b.add_payload(Payload::Codebook(desc)), n as usize)
            }
            5 => {
                let n = 1 + c.below(2) as u64;
                let s0 = b.add_f32(
                    SectionKind::NeuronKeys,
                    vec![n, dim as u64],
                    &c.floats(n as usize * dim, 0),
                );
                let s1 = b.add_f32(
                    SectionKind::NeuronBiases,
                    vec![n + c.below(2) as u64],
                    &c.floats(n as usize, 0),
                );
                let s2 = b.add_f32(
                    SectionKind::NeuronValues,
                    vec![n, dim as u64],
                    &c.floats(n as usize * dim, 0),
                );
                let desc = PatchNeuronsDesc {
                    layer,
                    read_site: c.below(6) as u8,
                    write_site: c.below(6) as u8,
                    activation: c.below(3) as u8,
                    keys: s0,
                    biases: s1,
                    values: s2,
                };
                (b.add_payload(Payload::PatchNeurons(desc)), n as usize)
            }
            6 => {
                // A scope-model memory (the default `serac` bundle): subject rows, relation rows,
                // a scope head, relation groups with their margin or vote.
                let n = 1 + c.below(3) as usize;
                let e = 1 + c.below(5) as usize;
                let emb = c.tame_floats(n * e, e);
                let relation = c.tame_floats(n * e, e);
                let subject_counts: Vec<u32> = (0..n + (c.u8() > 250) as usize)
                    .map(|_| if c.u8() < 240 { 1 + c.below(2) } else { 0 })
                    .collect();
                let total = subject_counts.iter().sum::<u32>() as usize + (c.u8() > 250) as usize;
                let subject_rows = c.tame_floats(total * e, e);
                let routing = ScopeRoutingDesc {
                    model_id: c.string(),
                    fingerprint: [c.u8(); 32],
                    relation: 0,
                    subject_rows: 0,
                    subject_counts,
                    subjects: (0..n).map(|_| c.string()).collect(),
                    subject_threshold: c.cosine(),
                    relation_threshold: c.cosine(),
                };
                let head = (c.u8() < 170).then(|| {
                    let (members, hidden) = (1 + c.below(3), 1 + c.below(3));
                    let cols = 3 * e + 5 + (c.u8() > 250) as usize;
                    let w = c.tame_floats((members * hidden) as usize * cols, 0);
                    let out_bias = (0..members + (c.u8() > 250) as u32)
                        .map(|_| c.cosine())
                        .collect();
                    let h = ScopeHeadDesc {
                        members,
                        hidden,
                        weights: 0,
                        out_bias,
                        threshold: c.cosine() * 8.0,
                    };
                    (h, w)
                });
                let groups = (c.u8() < 170).then(|| {
                    let (nt, ng) = (1 + c.below(4) as usize, 1 + c.below(3));
                    let templates = c.tame_floats(nt * e, e);
                    let g = RelationGroupsDesc {
                        templates: 0,
                        template_group: (0..nt)
                            .map(|_| {
                                let extra = (c.u8() > 250) as u32;
                                c.below(ng + extra) as u16
                            })
                            .collect(),
                        names: (0..ng).map(|_| c.string()).collect(),
                        record_group: (0..n + (c.u8() > 250) as usize)
                            .map(|_| {
                                let extra = (c.u8() > 250) as u32;
                                if c.u8() < 200 {
                                    c.below(ng + extra) as u16
                                } else {
                                    u16::MAX
                                }
                            })
                            .collect(),
                        min_score: c.cosine(),
                    };
                    (g, templates)
                });
                let margin = if c.u8() < 128 { 0.0 } else { c.cosine() };
                let vote = (c.u8() < 128).then(|| c.cosine() * 16.0);
                let records = c.records(n);
                let thr = c.cosine();
                let tpl = if c.u8() < 230 {
                    "{prompt}{answer}".to_string()
                } else {
                    c.string()
                };
                let p = b.add_scope_memory(
                    e,
                    &emb,
                    &relation,
                    &subject_rows,
                    thr,
                    &tpl,
                    routing,
                    head.as_ref().map(|(h, w)| (h.clone(), &w[..])),
                    groups.as_ref().map(|(g, t)| (g.clone(), &t[..])),
                    margin,
                    vote,
                    records,
                );
                (p, n)
            }
            _ => {
                let n = c.below(40) as usize;
                let blob: Vec<u8> = (0..n).map(|_| c.u8()).collect();
                (b.add_gguf_lora(blob), 1)
            }
        };
        units.push((p, n));
    }
    for _ in 0..c.below(5) {
        let (p, n) = if units.is_empty() || c.u8() > 240 {
            (c.below(3), 2)
        } else {
            units[c.below(units.len() as u32) as usize]
        };
        let first = c.below(n as u32 + 1);
        let count = c.below(n as u32 + 1);
        let (id, layer, site) = (c.string(), c.below(n_layer + 1), c.site());
        b.add_edit(&id, layer, site, "p", "t", p, first, count);
    }
    let Ok(bytes) = b.build_signed(&key) else {
        return;
    };
    let clock = Arc::new(ManualClock::new(c.below(3) as u64 * 500));
    let set = EditSet::with_clock(
        model,
        TrustStore::with_key(key.verifying_key()),
        clock.clone(),
    );
    let Ok(bundle) = set.open_bytes(bytes.as_slice()) else {
        return;
    };
    if set.add(bundle.clone(), AddOptions::default()).is_err() {
        return;
    }
    // Run the math over every view with a query built from the remaining bytes.
    let q = c.floats(dim, dim);
    let snap = set.snapshot();
    for (_, cb) in snap.codebooks() {
        let mut row = vec![0.0; dim];
        let _ = cb.apply(&q, &mut row);
    }
    for (_, pn) in snap.patch_neurons() {
        let mut out = vec![0.0; dim];
        let _ = pn.apply(&q, &mut out, None);
    }
    for (_, m) in snap.memories() {
        let e = q.len().min(m.embed_dim());
        let _ = m.nearest(&q[..e], None);
        // Routing as the runtime does it: one encode's pooled row and token rows, the
        // subject-stripped encodes on demand, then what a hit renders and explains.
        let e = m.embed_dim();
        let pooled = c.tame_floats(e, e);
        let n_rows = c.below(4) as usize;
        let rows = c.tame_floats(e * n_rows, e);
        let active: Vec<bool> = (0..m.len()).map(|_| c.u8() < 220).collect();
        let more = c.tame_floats(4 * e, e);
        let mut k = 0;
        let hit = m.route_with(&pooled, &rows, Some(&active), &mut |_| {
            k += 1;
            (k % 5 != 0).then(|| more[(k % 4) * e..(k % 4 + 1) * e].to_vec())
        });
        if let Some(h) = hit {
            let _ = m.render(h.index, "p");
            let _ = m.answer(h.index);
            let _ = m.record(h.index);
            if let Some(r) = m.routing() {
                let _ = r.subject(h.index);
                if let (Some(g), Some((rg, qg))) = (r.groups(), h.groups) {
                    let _ = g.name(rg);
                    let _ = qg.map(|q| g.name(q));
                }
            }
        }
    }
    for (_, lr) in snap.low_ranks() {
        let _ = lr.tensors().len();
    }
    if let Some(e) = bundle.manifest().edits.first() {
        let _ = set.rollback_edit(&e.id);
        let _ = set.snapshot().codebooks().count();
    }
    // u64::MAX means "never expires".
    clock.set(u64::MAX - 1);
    let _ = set.drop_expired();
    assert!(
        set.snapshot()
            .bundles
            .iter()
            .all(|b| b.bundle.manifest().expires == u64::MAX),
        "an expired bundle stayed active"
    );
});
