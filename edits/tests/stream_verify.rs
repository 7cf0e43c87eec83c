//! The streaming (firmware) verifier: accepts what the reader accepts at every chunk size, has
//! its own errors for a stream that ends early or runs on, and verifies a 256 MB bundle in a
//! fixed state plus a measured stack (printed: `cargo test --release -p amend-edits --test
//! stream_verify -- --nocapture`). The corrupt-bundle cases are swept in `bad_inputs.rs`
//! (every `refuse` there also streams the bytes).

mod common;

use amend_edits::bundle::*;
use amend_edits::keys::TrustStore;
use common::stream::{stream, stream_random, CHUNKS};
use common::*;

fn good() -> AlignedBuf {
    signed("b1", "main", 5)
}

#[test]
fn valid_bundle_streams_at_every_chunk_size() {
    let g = good();
    let want = StreamVerified {
        key_id: amend_edits::keys::key_id(&key(1).verifying_key()),
        total_len: g.len() as u64,
        manifest_len: read_header(g.as_slice()).unwrap().manifest_len.get(),
        sections: manifest_of(g.as_slice()).sections.len() as u32,
    };
    // Every chunk size from 1 byte to the whole bundle, and random splits.
    for chunk in (1..=g.len()).chain(CHUNKS.iter().copied()) {
        assert_eq!(
            stream(g.as_slice(), &trust(), chunk),
            Ok(want),
            "chunk {chunk}"
        );
    }
    for seed in 1..50 {
        assert_eq!(stream_random(g.as_slice(), &trust(), seed), Ok(want));
    }
}

fn manifest_of(buf: &[u8]) -> Manifest {
    let h = read_header(buf).unwrap();
    decode_manifest(&buf[HEADER_LEN..HEADER_LEN + h.manifest_len.get() as usize]).unwrap()
}

#[test]
fn stream_that_ends_early() {
    let g = good();
    let t = trust();
    let mut v = StreamVerifier::from_trust(&t);
    assert_eq!(
        v.finish(),
        Err(BundleError::EndedEarly {
            needed: 64,
            have: 0
        })
    );
    for cut in [1, 63, 64, 100, g.len() / 2, g.len() - 1] {
        let needed = if cut < 64 { 64 } else { g.len() as u64 };
        for chunk in [1, 7, 4096] {
            assert_eq!(
                stream(&g.as_slice()[..cut], &t, chunk),
                Err(BundleError::EndedEarly {
                    needed,
                    have: cut as u64
                }),
                "cut {cut} chunk {chunk}"
            );
        }
    }
}

#[test]
fn stream_that_continues_past_the_declared_length() {
    let g = good();
    let t = trust();
    let declared = g.len() as u64;
    // Extra bytes inside the last chunk, or as a later chunk: refused as they arrive.
    let mut more = g.as_slice().to_vec();
    more.extend_from_slice(&[0; 64]);
    for chunk in [1, 3, 64, 4096, usize::MAX] {
        assert_eq!(
            stream(&more, &t, chunk),
            Err(BundleError::PastDeclaredLength { declared }),
            "chunk {chunk}"
        );
    }
    let mut v = StreamVerifier::from_trust(&t);
    v.update(g.as_slice()).unwrap();
    assert_eq!(
        v.update(&[0]),
        Err(BundleError::PastDeclaredLength { declared })
    );
    // The error sticks: a refused stream cannot be finished into success.
    assert_eq!(
        v.update(&[]),
        Err(BundleError::PastDeclaredLength { declared })
    );
    assert_eq!(
        v.finish(),
        Err(BundleError::PastDeclaredLength { declared })
    );
    // An empty chunk changes nothing.
    let mut v = StreamVerifier::from_trust(&t);
    v.update(&[]).unwrap();
    v.update(g.as_slice()).unwrap();
    v.update(&[]).unwrap();
    assert!(v.finish().is_ok());
}

#[test]
fn manifest_over_the_stream_cap_is_refused_precisely() {
    // Fine for the in-memory reader (strings up to 16 KiB), over the streaming verifier's cap.
    let v = craft(good().as_slice(), true, |m, _| {
        m.edits[0].prompt = "x".repeat(STREAM_MAX_MANIFEST_LEN as usize)
    });
    assert!(verify(v.as_slice(), &trust()).is_ok());
    let len = read_header(v.as_slice()).unwrap().manifest_len.get();
    assert_eq!(
        stream(v.as_slice(), &trust(), 4096),
        Err(BundleError::ManifestTooLarge {
            len,
            cap: STREAM_MAX_MANIFEST_LEN
        })
    );
    // Exactly at the cap is accepted.
    let base = manifest_of(good().as_slice());
    let prompt_len = base.edits[0].prompt.len();
    let base_len = read_header(good().as_slice()).unwrap().manifest_len.get() as usize;
    let mut grow = STREAM_MAX_MANIFEST_LEN as usize - base_len;
    // The prompt's varint length prefix grows by one byte past 127.
    let v = loop {
        let g = grow;
        let v = craft(good().as_slice(), true, move |m, _| {
            m.edits[0].prompt = "y".repeat(prompt_len + g)
        });
        let len = read_header(v.as_slice()).unwrap().manifest_len.get();
        if len <= STREAM_MAX_MANIFEST_LEN {
            break v;
        }
        grow -= 1;
    };
    assert_eq!(
        read_header(v.as_slice()).unwrap().manifest_len.get(),
        STREAM_MAX_MANIFEST_LEN
    );
    assert!(stream(v.as_slice(), &trust(), 7).is_ok());
}

#[test]
fn trusted_keys_are_checked() {
    // Not a point on the curve (y = 2 has no x).
    let mut bad = [0u8; 32];
    bad[0] = 2;
    assert_eq!(
        StreamVerifier::new(&[*key(1).verifying_key().as_bytes(), bad]).map(drop),
        Err(BundleError::BadTrustedKey(1))
    );
    let many = [*key(1).verifying_key().as_bytes(); 17];
    assert_eq!(
        StreamVerifier::new(&many).map(drop),
        Err(BundleError::TooManyKeys)
    );
    // Raw keys work like a trust store.
    let g = good();
    let mut v = StreamVerifier::new(&[*key(1).verifying_key().as_bytes()]).unwrap();
    v.update(g.as_slice()).unwrap();
    assert!(v.finish().is_ok());
    let mut v = StreamVerifier::new(&[]).unwrap();
    v.update(g.as_slice()).unwrap_err();
    assert!(matches!(
        stream(g.as_slice(), &TrustStore::new(), 1),
        Err(BundleError::UnknownKeyId(_))
    ));
}

// ---- peak memory on a 256 MB bundle ----

const PAINT: usize = 256 << 10;
const COLOR: u8 = 0xa5;

/// Fill a 256 KiB stack frame with a colour and return its lowest address. After it returns,
/// the calls that follow reuse that memory.
#[inline(never)]
fn paint() -> usize {
    let mut buf = [0u8; PAINT];
    for b in buf.iter_mut() {
        // SAFETY: a write to a local.
        unsafe { core::ptr::write_volatile(b, COLOR) };
    }
    std::hint::black_box(&mut buf);
    buf.as_ptr() as usize
}

/// Stack bytes `f` used: the painted region's top minus the lowest byte `f` overwrote (stack
/// painting, as embedded toolchains measure it). Runs on a fresh 4 MiB thread.
fn stack_used<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> (T, usize) {
    std::thread::Builder::new()
        .stack_size(4 << 20)
        .spawn(move || {
            let base = paint();
            let out = f();
            let mut lowest = base + PAINT;
            for off in 0..PAINT {
                // SAFETY: [base, base + PAINT) is this thread's own stack memory (below the
                // current frame, mapped, painted by `paint`); read only, as bytes.
                let b = unsafe { core::ptr::read_volatile((base + off) as *const u8) };
                if b != COLOR {
                    lowest = base + off;
                    break;
                }
            }
            (out, base + PAINT - lowest)
        })
        .unwrap()
        .join()
        .unwrap()
}

/// A signed, valid codebook bundle of `n` rows of width 640 (two `[n, 640]` f32 sections).
fn big_bundle(n: u64) -> AlignedBuf {
    use sha2::Digest;
    let d = 640u64;
    let rows = vec![0u8; (n * d * 4) as usize];
    let radii: Vec<u8> = (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    let sha = |b: &[u8]| -> [u8; 32] { sha2::Sha256::digest(b).into() };
    let sec = |kind: SectionKind, shape: Vec<u64>, bytes: &[u8]| SectionEntry {
        kind: kind as u16,
        dtype: Dtype::F32 as u8,
        shape,
        offset: 0,
        len: bytes.len() as u64,
        sha256: sha(bytes),
    };
    let rows_sec = sec(SectionKind::CodebookKeys, vec![n, d], &rows);
    let mut values_sec = rows_sec.clone();
    values_sec.kind = SectionKind::CodebookValues as u16;
    let mut model = model();
    model.n_embd = d as u32;
    let mut m = Manifest {
        bundle_id: "big".into(),
        channel: "main".into(),
        version: 1,
        created: T0,
        not_before: T0,
        expires: u64::MAX,
        model,
        sections: vec![
            rows_sec,
            values_sec,
            sec(SectionKind::CodebookRadii, vec![n], &radii),
        ],
        payloads: vec![Payload::Codebook(CodebookDesc {
            layer: 3,
            key_site: 2,
            replace_site: 3,
            distance: 0,
            all_positions: false,
            keys: 0,
            values: 1,
            radii: 2,
        })
        .to_entry()],
        edits: vec![EditEntry {
            id: "all".into(),
            layer: 3,
            site: 3,
            prompt: "p".into(),
            target: "t".into(),
            payload: 0,
            first: 0,
            count: n as u32,
        }],
        verification: None,
    };
    layout(&mut m).unwrap();
    let mut buf = assemble(&m, &[&rows, &rows, &radii]).unwrap();
    sign_in_place(buf.as_mut_slice(), &key(1)).unwrap();
    buf
}

#[test]
fn peak_memory_on_a_256_mb_bundle() {
    let n = 52_400; // 2 x 52,400 x 640 x 4 bytes = 268 MB = 256 MiB
    let big = std::sync::Arc::new(big_bundle(n));
    assert!(big.len() as u64 >= 256 << 20, "{}", big.len());
    verify(big.as_slice(), &trust()).expect("the in-memory reader accepts it");

    let state = core::mem::size_of::<StreamVerifier>();
    let b = big.clone();
    let t0 = std::time::Instant::now();
    let (res, stack) = stack_used(move || {
        // The state lives on the heap here so that the stack figure is the verifier's own.
        let mut slot = Box::<StreamVerifier>::new_uninit();
        let v = StreamVerifier::init_from_trust(&mut slot, &trust());
        for chunk in b.as_slice().chunks(4096) {
            v.update(chunk)?;
        }
        v.finish()
    });
    let secs = t0.elapsed().as_secs_f64();
    let ok = res.expect("streamed 256 MB bundle verifies");
    assert_eq!(ok.total_len, big.len() as u64);
    println!(
        "stream verifier, {} byte bundle in 4 KiB chunks: state {} B (size_of) + peak stack {} B \
         = {} B (budget 16384); {:.2} s ({:.0} MB/s)",
        big.len(),
        state,
        stack,
        state + stack,
        secs,
        big.len() as f64 / secs / 1e6
    );
    // The state is the verifier's whole memory besides the stack; most of the stack is
    // ed25519 (curve25519-dalek). On x86_64 that crate picks its AVX2 backend at run time,
    // whose point tables take ~13 KiB of stack; the serial backend that every ARM target
    // (aarch64 here under qemu, Cortex-M) uses takes ~8 KiB, and that is where the firmware
    // budget of 16 KiB applies. docs/targets.md lists both figures.
    assert!(state <= STREAM_SIGNED_CAP + 1536, "state {state}");
    let budget = if cfg!(target_arch = "x86_64") {
        24 << 10
    } else {
        16 << 10
    };
    assert!(
        state + stack <= budget,
        "state {state} + stack {stack} over {budget}"
    );
    // A flipped byte deep in the second section is caught at that section's end.
    let mut bad = big.as_slice().to_vec();
    let at = bad.len() - 1000;
    bad[at] ^= 1;
    let last = manifest_of(&bad)
        .sections
        .iter()
        .position(|s| (s.offset..s.offset + s.len).contains(&(at as u64)));
    let got = stream(&bad, &trust(), 1 << 20);
    match last {
        Some(index) => assert_eq!(got, Err(BundleError::SectionHash { index })),
        None => assert_eq!(got, Err(BundleError::NonZeroPadding { offset: at as u64 })),
    }
}

/// A v1.1 memory routed by the scope model (relation and subject-row sections): the stream
/// accepts what the in-memory reader accepts, and both refuse a subject count of zero.
#[test]
fn scope_model_memory_streams_like_the_reader() {
    both_read(&scope_bundle(vec![2, 1], None), true, "subject counts 2, 1");
    both_read(
        &scope_bundle(vec![3, 0], None),
        false,
        "a subject count of zero",
    );
}

/// The in-memory reader and the stream, at every chunk size, both accept or both refuse.
fn both_read(b: &AlignedBuf, ok: bool, why: &str) {
    assert_eq!(
        Bundle::from_bytes(b.as_slice(), &trust()).is_ok(),
        ok,
        "{why}"
    );
    for chunk in CHUNKS.iter().copied() {
        assert_eq!(
            stream(b.as_slice(), &trust(), chunk).is_ok(),
            ok,
            "{why}: chunk {chunk}"
        );
    }
}

/// A two-record scope-model memory over 4-d rows, optionally with a trained scope head.
fn scope_bundle(counts: Vec<u32>, head: Option<(ScopeHeadDesc, Vec<f32>)>) -> AlignedBuf {
    scope_bundle_with(counts, head, None)
}

/// [`scope_bundle`], optionally with relation groups (format 1.4).
fn scope_bundle_with(
    counts: Vec<u32>,
    head: Option<(ScopeHeadDesc, Vec<f32>)>,
    groups: Option<(RelationGroupsDesc, Vec<f32>)>,
) -> AlignedBuf {
    scope_bundle_margin(counts, head, groups, 0.0)
}

/// [`scope_bundle_with`] with a relation-group margin (format 1.5 when it is not 0).
fn scope_bundle_margin(
    counts: Vec<u32>,
    head: Option<(ScopeHeadDesc, Vec<f32>)>,
    groups: Option<(RelationGroupsDesc, Vec<f32>)>,
    margin: f32,
) -> AlignedBuf {
    scope_bundle_vote(counts, head, groups, margin, None)
}

/// [`scope_bundle_margin`] whose groups vote with the head (format 1.6 with a head).
fn scope_bundle_vote(
    counts: Vec<u32>,
    head: Option<(ScopeHeadDesc, Vec<f32>)>,
    groups: Option<(RelationGroupsDesc, Vec<f32>)>,
    margin: f32,
    vote: Option<f32>,
) -> AlignedBuf {
    {
        let mut b = BundleBuilder::new(meta("scope", "main", 1));
        let s = 0.5f32;
        let rows = vec![s, s, s, s, 1.0, 0.0, 0.0, 0.0];
        let subject_rows = vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, s, s, s, s];
        let routing = ScopeRoutingDesc {
            model_id: "all-MiniLM-L6-v2 Q8_0".into(),
            fingerprint: [7; 32],
            relation: 0,
            subject_rows: 0,
            subject_counts: counts,
            subjects: vec!["a".into(), "c".into()],
            subject_threshold: 0.5,
            relation_threshold: 0.4,
        };
        let records = ["a", "c"]
            .iter()
            .map(|p| MemoryRecordDesc {
                edit_id: format!("e-{p}"),
                prompt: (*p).into(),
                target: "t".into(),
                text: format!("{p} t"),
            })
            .collect();
        let mem = b.add_scope_memory(
            4,
            &rows,
            &rows,
            &subject_rows,
            0.3,
            "{edit}\n{prompt}",
            routing,
            head.as_ref().map(|(d, w)| (d.clone(), w.as_slice())),
            groups.as_ref().map(|(g, t)| (g.clone(), t.as_slice())),
            margin,
            vote,
            records,
        );
        b.add_edit(
            "e-a",
            0,
            amend_edits::Site::ResidualOut,
            "a",
            "t",
            mem,
            0,
            1,
        );
        b.add_edit(
            "e-c",
            0,
            amend_edits::Site::ResidualOut,
            "c",
            "t",
            mem,
            1,
            1,
        );
        b.build_signed(&key(1)).unwrap()
    }
}

/// The weights of a one-member, one-unit head over 4-d embeddings whose unit reads the relation
/// cosine (feature 2) with output weight 10: its logit is `10 relu(relation) + out_bias`.
fn relation_head_weights() -> Vec<f32> {
    let f = amend_edits::families::ScopeHead::n_features(4) + 2;
    let mut w = vec![0f32; f];
    w[2] = 1.0;
    w[f - 1] = 10.0;
    w
}

/// A one-member, one-unit scope head descriptor (its weights section filled in by the writer).
fn head_desc(out_bias: Vec<f32>, threshold: f32) -> ScopeHeadDesc {
    ScopeHeadDesc {
        members: 1,
        hidden: 1,
        weights: 0,
        out_bias,
        threshold,
    }
}

/// A v1.3 memory with a trained scope head: written under minor 3, read and streamed alike,
/// routed by the head; a head whose shape, biases or threshold are wrong is refused by both
/// readers, and so is a head under a v1.2 header (re-signed, so only the minor rule catches it).
#[test]
fn scope_head_memory_streams_like_the_reader() {
    // One member, one hidden unit reading the relation cosine (feature 2): z = 10 rel - 5.
    let w = relation_head_weights();
    let f = w.len();
    let desc = head_desc;
    let good = scope_bundle(vec![2, 1], Some((desc(vec![-5.0], 0.0), w.clone())));
    assert_eq!(
        u16::from_le_bytes([good.as_slice()[10], good.as_slice()[11]]),
        3
    );
    both_read(&good, true, "a valid head");
    let b = Bundle::from_bytes(good.as_slice(), &trust()).unwrap();
    let view = b.memory(0, 0..2).unwrap();
    let mem = view.to_family().unwrap();
    let head = mem.routing().unwrap().head().unwrap();
    assert_eq!(
        (head.members(), head.hidden(), head.threshold()),
        (1, 1, 0.0)
    );
    // A query about record "c": its subject row matched, the rest the record's relation.
    let q = [1.0f32, 0.0, 0.0, 0.0];
    let hit = mem
        .route(&q, &[0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], None)
        .unwrap();
    assert!(hit.in_scope, "{hit:?}");
    // The head alone decides: its logit is the score, 10 relu(relation) - 5.
    assert!(
        (hit.score - (10.0 * hit.relation.max(0.0) - 5.0)).abs() < 1e-4,
        "{hit:?}"
    );
    let refuse_both = |bad: &AlignedBuf, why: &str| both_read(bad, false, why);
    refuse_both(
        &scope_bundle(vec![2, 1], Some((desc(vec![f32::NAN], 0.0), w.clone()))),
        "NaN output bias",
    );
    refuse_both(
        &scope_bundle(vec![2, 1], Some((desc(vec![0.0, 0.0], 0.0), w.clone()))),
        "two biases for one member",
    );
    refuse_both(
        &scope_bundle(
            vec![2, 1],
            Some((desc(vec![0.0], f32::INFINITY), w.clone())),
        ),
        "infinite threshold",
    );
    refuse_both(
        &scope_bundle(
            vec![2, 1],
            Some((desc(vec![0.0], 0.0), w[..f - 1].to_vec())),
        ),
        "weights one value short",
    );
    let mut nan_w = w.clone();
    nan_w[0] = f32::NAN;
    refuse_both(
        &scope_bundle(vec![2, 1], Some((desc(vec![0.0], 0.0), nan_w))),
        "NaN weight",
    );
    refused_under_minor(&good, 2, "minor: a scope head needs format 1.3");
}

/// Relation groups (format 1.4): written as minor 4, read and streamed alike, routed by group
/// (the query's group decides for a record that has one; without a stripped query the
/// thresholds do); every malformed field refused by both readers; a 1.3 header refused.
#[test]
fn relation_groups_stream_like_the_reader_and_decide_routing() {
    let none = amend_edits::families::RelationGroups::NONE;
    // Two groups, one template each: "g0" = e2, "g1" = e3; record "a" in g0, "c" in g1.
    let templates = vec![0.0f32, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
    let desc =
        |template_group: Vec<u16>, record_group: Vec<u16>, min_score: f32| RelationGroupsDesc {
            templates: 0,
            template_group,
            names: vec!["g0".into(), "g1".into()],
            record_group,
            min_score,
        };
    let good = scope_bundle_with(
        vec![2, 1],
        None,
        Some((desc(vec![0, 1], vec![0, 1], 0.6), templates.clone())),
    );
    assert_eq!(
        u16::from_le_bytes([good.as_slice()[10], good.as_slice()[11]]),
        4
    );
    both_read(&good, true, "valid relation groups");
    let b = Bundle::from_bytes(good.as_slice(), &trust()).unwrap();
    let mem = b.memory(0, 0..2).unwrap().to_family().unwrap();
    let routing = mem.routing().unwrap();
    let groups = routing.groups().unwrap();
    assert_eq!(
        (groups.record_group(0), groups.record_group(1)),
        (Some(0), Some(1))
    );
    assert_eq!(groups.name(1), "g1");
    assert_eq!(routing.subject(1), Some("c"));
    // A query about "a": pooled like a's row, its subject's rows matched, one other row.
    let s = 0.5f32;
    let (q, rows) = (
        [s, s, s, s],
        [
            1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
        ],
    );
    let route = |stripped: Option<[f32; 4]>| {
        mem.route_with(&q, &rows, None, &mut |_| stripped.map(|v| v.to_vec()))
            .unwrap()
    };
    let hit = route(Some([0.0, 0.0, 1.0, 0.0]));
    assert!(hit.in_scope && hit.index == 0, "{hit:?}");
    assert_eq!(hit.groups, Some((0, Some(0))));
    // In g1: "a" is out; "c" (its subject half-matched) is in, by its own group.
    let hit = route(Some([0.0, 0.0, 0.0, 1.0]));
    assert!(hit.in_scope && hit.index == 1, "{hit:?}");
    assert_eq!(hit.groups, Some((1, Some(1))));
    // Near no template (cosine 0.5 < 0.6): nothing is in scope.
    let hit = route(Some([s, s, s, s]));
    assert!(!hit.in_scope, "{hit:?}");
    // No stripped query: the thresholds decide ("a": relation 0.5 >= 0.4).
    let hit = route(None);
    assert!(
        hit.in_scope && hit.index == 0 && hit.groups.is_none(),
        "{hit:?}"
    );
    assert_eq!(mem.route(&q, &rows, None).unwrap().groups, None);

    let refuse_both = |g: RelationGroupsDesc, t: Vec<f32>, why: &str| {
        both_read(
            &scope_bundle_with(vec![2, 1], None, Some((g, t))),
            false,
            why,
        )
    };
    refuse_both(
        desc(vec![0, 1], vec![0], 0.6),
        templates.clone(),
        "one group for two records",
    );
    refuse_both(
        desc(vec![0, 2], vec![0, 1], 0.6),
        templates.clone(),
        "template group 2 of 2",
    );
    refuse_both(
        desc(vec![0, 1], vec![0, 7], 0.6),
        templates.clone(),
        "record group 7 of 2",
    );
    refuse_both(
        desc(vec![0, 1], vec![0, 1], f32::NAN),
        templates.clone(),
        "NaN min_score",
    );
    refuse_both(
        desc(vec![0, 1], vec![0, 1], 1.5),
        templates.clone(),
        "min_score 1.5",
    );
    refuse_both(desc(vec![], vec![none, none], 0.6), vec![], "no templates");
    refuse_both(
        desc(vec![0, 1], vec![0, 1], 0.6),
        templates[..7].to_vec(),
        "templates one value short",
    );
    // A record without a group is valid.
    both_read(
        &scope_bundle_with(
            vec![2, 1],
            None,
            Some((desc(vec![0, 1], vec![none, 1], 0.6), templates.clone())),
        ),
        true,
        "a record without a group",
    );
    refused_under_minor(&good, 3, "minor: relation groups need format 1.4");
}

/// A relation-group margin (format 1.5): written as minor 5 only when it is not 0, read and
/// streamed alike; a query whose best template is in another group but whose record's group is
/// within the margin routes home; a margin outside [0, 2] and a 1.4 header refused by both.
#[test]
fn relation_margin_streams_like_the_reader_and_widens_the_group() {
    let templates = vec![0.0f32, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
    let desc = || RelationGroupsDesc {
        templates: 0,
        template_group: vec![0, 1],
        names: vec!["g0".into(), "g1".into()],
        record_group: vec![0, 1],
        min_score: 0.6,
    };
    let minor = |b: &AlignedBuf| u16::from_le_bytes([b.as_slice()[10], b.as_slice()[11]]);
    let plain = scope_bundle_margin(vec![2, 1], None, Some((desc(), templates.clone())), 0.0);
    assert_eq!(minor(&plain), 4, "no margin: the bundle stays 1.4");
    let wide = scope_bundle_margin(vec![2, 1], None, Some((desc(), templates.clone())), 0.05);
    assert_eq!(minor(&wide), 5);
    both_read(&wide, true, "margin 0.05");
    // A query about "a" whose stripped relation is a little nearer g1 (0.714) than g0 (0.700).
    let s = 0.5f32;
    let q = [s, s, s, s];
    let rows = [
        1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
    ];
    let n = (0.7f32 * 0.7 + 0.714 * 0.714).sqrt();
    let stripped = [0.0, 0.0, 0.7 / n, 0.714 / n];
    let route = |b: &AlignedBuf| {
        let b = Bundle::from_bytes(b.as_slice(), &trust()).unwrap();
        let mem = b.memory(0, 0..2).unwrap().to_family().unwrap();
        let margin = mem.routing().unwrap().groups().unwrap().margin();
        let hit = mem
            .route_with(&q, &rows, None, &mut |_| Some(stripped.to_vec()))
            .unwrap();
        (margin, hit.index, hit.in_scope, hit.groups)
    };
    // Without the margin only "c" (group g1) takes it; with it "a" stays in scope and wins.
    assert_eq!(route(&plain), (0.0, 1, true, Some((1, Some(1)))));
    assert_eq!(route(&wide), (0.05, 0, true, Some((0, Some(1)))));
    for (m, why) in [
        (f32::NAN, "NaN margin"),
        (-0.1, "margin -0.1"),
        (2.5, "margin 2.5"),
    ] {
        both_read(
            &scope_bundle_margin(vec![2, 1], None, Some((desc(), templates.clone())), m),
            false,
            why,
        );
    }
    refused_under_minor(&wide, 4, "minor: a relation-group margin needs format 1.5");
}

/// Relation groups voting with the head (format 1.6): written as minor 6, read and streamed
/// alike; the head's logit moves up by the weight for a query in the record's group, down for
/// one in another group, and not at all for a query in no group, which the groups alone
/// (format 1.4) refuse; a weight outside [0, 1000] and a 1.5 header refused by both.
#[test]
fn group_vote_streams_like_the_reader_and_moves_the_heads_logit() {
    // z = 10 relu(relation) - 4: 1 for record "a" under the query below (relation 0.5).
    let w = relation_head_weights();
    let head = || Some((head_desc(vec![-4.0], 0.0), w.clone()));
    let templates = vec![0.0f32, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
    let groups = || {
        Some((
            RelationGroupsDesc {
                templates: 0,
                template_group: vec![0, 1],
                names: vec!["g0".into(), "g1".into()],
                record_group: vec![0, 1],
                min_score: 0.6,
            },
            templates.clone(),
        ))
    };
    let minor = |b: &AlignedBuf| u16::from_le_bytes([b.as_slice()[10], b.as_slice()[11]]);
    let head_only = scope_bundle(vec![2, 1], head());
    let decide = scope_bundle_vote(vec![2, 1], head(), groups(), 0.0, None);
    let vote = scope_bundle_vote(vec![2, 1], head(), groups(), 0.0, Some(3.0));
    assert_eq!((minor(&decide), minor(&vote)), (4, 6));
    // Without a head there is nothing to vote on: the groups decide and the bundle stays 1.4.
    assert_eq!(
        minor(&scope_bundle_vote(
            vec![2, 1],
            None,
            groups(),
            0.0,
            Some(3.0)
        )),
        4
    );
    both_read(&vote, true, "vote 3");
    // Record "a" alone; the query's rows: its subject's two, then [0, 0, 1, 0].
    let s = 0.5f32;
    let q = [s, s, s, s];
    let rows = [
        1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
    ];
    let route = |b: &AlignedBuf, stripped: [f32; 4]| {
        let b = Bundle::from_bytes(b.as_slice(), &trust()).unwrap();
        let mem = b.memory(0, 0..2).unwrap().to_family().unwrap();
        let hit = mem
            .route_with(&q, &rows, Some(&[true, false]), &mut |_| {
                Some(stripped.to_vec())
            })
            .unwrap();
        (hit.in_scope, hit.score, hit.groups)
    };
    let (in_g0, in_g1, in_none) = (
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [1.0, 0.0, 0.0, 0.0],
    );
    let (z_in, z, _) = route(&head_only, in_none);
    assert!(z_in && (z - 1.0).abs() < 1e-4, "head alone: {z}");
    let close = |got: (bool, f32, Option<(u16, Option<u16>)>), want: (bool, f32, Option<u16>)| {
        assert_eq!((got.0, got.2), (want.0, Some((0, want.2))), "{got:?}");
        assert!((got.1 - want.1).abs() < 1e-4, "{got:?} against {want:?}");
    };
    close(route(&vote, in_g0), (true, z + 3.0, Some(0)));
    close(route(&vote, in_g1), (false, z - 3.0, Some(1)));
    // A query in no group: the head decides alone under a vote; the groups alone refuse it.
    close(route(&vote, in_none), (true, z, None));
    assert!(!route(&decide, in_none).0);
    assert!(route(&decide, in_g0).0);
    for (v, why) in [
        (f32::NAN, "NaN weight"),
        (-1.0, "weight -1"),
        (1001.0, "weight 1001"),
    ] {
        both_read(
            &scope_bundle_vote(vec![2, 1], head(), groups(), 0.0, Some(v)),
            false,
            why,
        );
    }
    refused_under_minor(
        &vote,
        5,
        "minor: relation groups voting with the head need format 1.6",
    );
}

/// `b` re-signed with header minor `minor` is refused by both readers with `reason`.
fn refused_under_minor(b: &AlignedBuf, minor: u8, reason: &'static str) {
    let mut v = b.as_slice().to_vec();
    v[10] = minor;
    let mut v = AlignedBuf::from_slice(&v);
    sign_in_place(v.as_mut_slice(), &key(1)).unwrap();
    assert!(matches!(
        Bundle::from_bytes(v.as_slice(), &trust()),
        Err(e) if e.to_string().contains(reason.trim_start_matches("minor: "))
    ));
    for chunk in CHUNKS.iter().copied() {
        assert_eq!(
            stream(v.as_slice(), &trust(), chunk),
            Err(BundleError::BadHeader(reason)),
            "chunk {chunk}"
        );
    }
}
