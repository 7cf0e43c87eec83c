//! Issue 11, "hold under hostile input": one test per attack, each asserting the specific error
//! and that the live edit set (or the process) is unchanged. Built as an integration test of
//! `amend-cli` (cli/Cargo.toml), so `make test` runs it and the `amend` binary is fresh.
//!
//! The tests that run the real model skip without it unless AMEND_REQUIRE_MODEL=1 (as under
//! `make test`). Time and memory bounds asked for by the issue are checked with wide margins:
//! refusing a FIFO or a 5 GB sparse file must cost well under 50 ms and 10 MB.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use amend_edits::bundle::{BundleError, OpenError};
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::editset::{AddOptions, EditSet, EditSetError, ManualClock};
use amend_edits::fsutil::FileError;
use amend_edits::keys::{to_hex, TrustStore};
use amend_edits::version_store::VersionStore;
use amend_edits::{Bundle, BundleBuilder, BundleMeta, ModelBinding, Site};
use amend_runtime::{GenerateParams, Model, RuntimeError, Session, SessionOptions};

const PROMPT: &str = "The capital of France is";
const T0: u64 = 1_700_000_000;

/// Serializes the tests that measure time and resident memory (the harness runs tests on
/// several threads; another test's allocations would count).
static MEASURE: Mutex<()> = Mutex::new(());

fn tmp() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("amend-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .clone()
}

fn real_model() -> Option<PathBuf> {
    let path = std::env::var_os("AMEND_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            amend_edits::fsutil::cache_dir()
                .unwrap_or_default()
                .join("gemma3-270m-q4_k_m.gguf")
        });
    if path.exists() {
        return Some(path);
    }
    if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!("AMEND_REQUIRE_MODEL=1 but {} is missing", path.display());
    }
    eprintln!("skipped: {} is missing", path.display());
    None
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn trust() -> TrustStore {
    TrustStore::with_key(key().verifying_key())
}

fn fake_binding() -> ModelBinding {
    ModelBinding {
        fingerprint: [3; 32],
        arch: "gemma3".into(),
        n_layer: 18,
        n_embd: 8,
    }
}

fn meta(binding: &ModelBinding, channel: &str, version: u64, expires: u64) -> BundleMeta {
    BundleMeta {
        bundle_id: format!("{channel}-v{version}"),
        channel: channel.into(),
        version,
        created: T0,
        not_before: 0,
        expires,
        model: binding.clone(),
    }
}

/// A codebook at layer 10 whose single entry (normalized distance, radius 2: the whole range)
/// replaces the FFN output of the last prompt token with `value`.
fn codebook_bundle(binding: &ModelBinding, version: u64, value: f32, expires: u64) -> Vec<u8> {
    let d = binding.n_embd as usize;
    let mut b = BundleBuilder::new(meta(binding, "main", version, expires));
    let mut k = vec![0.0; d];
    k[0] = 1.0;
    let p = b.add_codebook(
        10,
        Site::FfnOutput,
        Site::FfnOutput,
        1,
        false,
        d,
        &k,
        &vec![value; d],
        &[2.0],
    );
    b.add_edit("e0", 10, Site::FfnOutput, "p", "t", p, 0, 1);
    b.build_signed(&key()).unwrap().as_slice().to_vec()
}

/// VmRSS and VmHWM of this process, in kB.
fn rss_kb() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Runs `f`, asserting it takes < 50 ms and grows resident memory (current and peak) by
/// < 10 MB.
fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let _g = MEASURE.lock().unwrap_or_else(|e| e.into_inner());
    let (rss0, hwm0) = rss_kb();
    let t = Instant::now();
    let r = f();
    let dt = t.elapsed();
    let (rss1, hwm1) = rss_kb();
    eprintln!(
        "{what}: {:.2} ms, RSS +{} kB, peak +{} kB",
        dt.as_secs_f64() * 1e3,
        rss1.saturating_sub(rss0),
        hwm1.saturating_sub(hwm0)
    );
    assert!(dt < Duration::from_millis(50), "{what} took {dt:?}");
    assert!(rss1.saturating_sub(rss0) < 10 << 10, "{what}: RSS grew");
    assert!(
        hwm1.saturating_sub(hwm0) < 10 << 10,
        "{what}: peak RSS grew"
    );
    r
}

fn mkfifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn sparse(p: &Path, len: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(len).unwrap();
}

// ---------------------------------------------------------------------------------------------
// 1. Verified bytes are the bytes used.

/// The model, a session with the bundle at `path` active (loaded from the file) and the text
/// and codebook explain of a greedy request.
struct Live {
    session: Session,
    set: Arc<EditSet>,
}

fn live_from_file(model_path: &Path, path: &Path) -> Live {
    let binding = amend_edits::fingerprint::model_binding(model_path).unwrap();
    let model = Model::open(model_path, Default::default()).unwrap();
    let set = Arc::new(EditSet::new(binding, trust()));
    let b = Bundle::open_file(path, set.trust()).unwrap();
    set.add(Arc::new(b), AddOptions::default()).unwrap();
    let mut session = Session::new(
        &model,
        SessionOptions {
            n_threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    session.set_edit_set(Some(set.clone())).unwrap();
    Live { session, set }
}

fn request(s: &mut Session) -> (String, Vec<(usize, f32, f32, bool)>) {
    let p = GenerateParams {
        max_tokens: 4,
        ..Default::default()
    };
    let out = s
        .generate(PROMPT, &p, |_| ControlFlow::Continue(()))
        .unwrap();
    let ex = s.explain();
    let cb = ex
        .codebook
        .iter()
        .map(|c| (c.entry, c.distance, c.radius, c.replaced))
        .collect();
    (out.text, cb)
}

/// Writes a bundle for the real model to `name` and returns (path, bytes, live session).
fn loaded(name: &str) -> Option<(PathBuf, Vec<u8>, Live)> {
    let model = real_model()?;
    let binding = amend_edits::fingerprint::model_binding(&model).unwrap();
    let bytes = codebook_bundle(&binding, 1, 0.5, u64::MAX);
    let path = tmp().join(name);
    std::fs::write(&path, &bytes).unwrap();
    let live = live_from_file(&model, &path);
    Some((path, bytes, live))
}

#[test]
fn bundle_rewritten_in_place_after_load_changes_nothing() {
    let Some((path, bytes, mut live)) = loaded("rewrite.amend") else {
        return;
    };
    let before = request(&mut live.session);
    assert!(
        before.1.iter().any(|c| c.3),
        "the radius-2 entry replaces: {before:?}"
    );
    // Rewrite the value row and the radius in place (same file, same inode), as an attacker
    // with write access to the file would: radius 0 would stop the edit, values of 7 change it.
    let b = Bundle::from_bytes(&bytes, &trust()).unwrap();
    let secs = &b.manifest().sections;
    let mut evil = bytes.clone();
    for s in secs {
        let r = s.offset as usize..(s.offset + s.len) as usize;
        let fill: f32 = if s.kind == 3 { 0.0 } else { 7.0 };
        if s.kind != 1 {
            for c in evil[r].chunks_mut(4) {
                c.copy_from_slice(&fill.to_le_bytes());
            }
        }
    }
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&evil).unwrap();
    }
    assert_eq!(std::fs::read(&path).unwrap(), evil);
    let after = request(&mut live.session);
    assert_eq!(before, after, "a rewrite of the file changed generation");
    let snap = live.set.snapshot();
    assert_eq!(snap.bundles[0].bundle.bytes(), &bytes[..]);
}

#[test]
fn bundle_truncated_after_load_no_sigbus() {
    let Some((path, bytes, mut live)) = loaded("truncate.amend") else {
        return;
    };
    let before = request(&mut live.session);
    // With a shared mapping this was SIGBUS on the next access.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(64)
        .unwrap();
    let after = request(&mut live.session);
    assert_eq!(before, after);
    assert_eq!(live.set.snapshot().bundles[0].bundle.bytes(), &bytes[..]);
}

#[test]
fn bundle_replaced_by_cp_after_load_changes_nothing() {
    let Some((path, bytes, mut live)) = loaded("cp.amend") else {
        return;
    };
    let before = request(&mut live.session);
    // `cp new live` writes into the same inode: v2's bytes over v1's verified layout.
    let model = real_model().unwrap();
    let binding = amend_edits::fingerprint::model_binding(&model).unwrap();
    let v2 = tmp().join("cp-v2.amend");
    std::fs::write(&v2, codebook_bundle(&binding, 2, -3.0, u64::MAX)).unwrap();
    std::fs::copy(&v2, &path).unwrap();
    let after = request(&mut live.session);
    assert_eq!(before, after);
    assert_eq!(live.set.snapshot().bundles[0].bundle.bytes(), &bytes[..]);
}

// ---------------------------------------------------------------------------------------------
// 2. Bounded work before authentication.

#[test]
fn fifo_as_bundle_refused_at_once() {
    let p = tmp().join("bundle.fifo");
    mkfifo(&p);
    let e = bounded("FIFO as bundle", || Bundle::open_file(&p, &trust())).unwrap_err();
    assert!(
        matches!(
            &e,
            OpenError::File(FileError::NotRegular { kind: "FIFO", .. })
        ),
        "{e}"
    );
}

#[test]
fn sparse_5gb_as_bundle_refused_at_once() {
    let p = tmp().join("sparse-bundle.amend");
    sparse(&p, 5 << 30);
    let e = bounded("5 GB sparse bundle", || Bundle::open_file(&p, &trust())).unwrap_err();
    assert!(
        matches!(&e, OpenError::File(FileError::TooLarge { len, .. }) if *len == 5 << 30),
        "{e}"
    );
    // Under the cap the 64-byte header is read first: a 3 GB sparse file is "bad magic"
    // without reading (or allocating) the rest.
    let p3 = tmp().join("sparse3-bundle.amend");
    sparse(&p3, 3 << 30);
    let e = bounded("3 GB sparse bundle", || Bundle::open_file(&p3, &trust())).unwrap_err();
    assert!(
        matches!(&e, OpenError::Bundle(BundleError::BadMagic)),
        "{e}"
    );
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_file(&p3);
}

#[test]
fn fifo_as_model_refused_at_once() {
    let p = tmp().join("model.fifo");
    mkfifo(&p);
    let e = bounded("FIFO as model", || {
        Model::open(&p, Default::default()).map(|_| ())
    })
    .unwrap_err();
    assert!(
        matches!(
            &e,
            RuntimeError::File(FileError::NotRegular { kind: "FIFO", .. })
        ),
        "{e}"
    );
    let e = bounded("FIFO as model (fingerprint)", || {
        amend_edits::fingerprint::model_binding(&p)
    })
    .unwrap_err();
    assert!(e.to_string().contains("FIFO"), "{e}");
}

#[test]
fn sparse_5gb_as_model_refused_at_once() {
    let p = tmp().join("sparse-model.gguf");
    sparse(&p, 5 << 30);
    let e = bounded("5 GB sparse model", || {
        Model::open(&p, Default::default()).map(|_| ())
    })
    .unwrap_err();
    assert!(matches!(&e, RuntimeError::NotGguf { .. }), "{e}");
    let e = bounded("5 GB sparse model (fingerprint)", || {
        amend_edits::fingerprint::model_binding(&p)
    })
    .unwrap_err();
    assert!(e.to_string().contains("GGUF"), "{e}");
    let _ = std::fs::remove_file(&p);
}

/// A model holding a NaN or infinite weight, or a NaN scale in a quantized block, is refused at
/// open on every backend, naming the tensor and where in it (ggml computes with whatever the file
/// holds: llama.cpp answered garbage, ONNX Runtime nothing), and leaves no fingerprint cache
/// entry behind, so nothing later takes it for checked.
#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    use amend_edits::gguf::{GgmlType, GgufFile};
    use amend_runtime::{testutil, Architecture, ModelOptions};
    let dir = tmp().join("non-finite");
    std::fs::create_dir_all(&dir).unwrap();
    let seed = dir.join("seed.gguf");
    testutil::write_tiny_model_typed(&seed, Architecture::Qwen2, 7, GgmlType::Q8_0).unwrap();
    let bytes = std::fs::read(&seed).unwrap();
    let f = GgufFile::parse(&bytes).unwrap();
    let at = |name: &str, byte: u64| {
        let t = f.tensor(name).unwrap();
        (f.data_offset + t.offset + byte) as usize
    };
    let patch = |name: &str, at: usize, with: &[u8]| {
        let mut b = bytes.clone();
        b[at..at + with.len()].copy_from_slice(with);
        let p = dir.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let cases = [
        (
            // Q8_0 blocks are 34 bytes, the f16 scale first.
            patch(
                "scale.gguf",
                at("blk.0.attn_q.weight", 3 * 34),
                &0x7e00u16.to_le_bytes(),
            ),
            "tensor \"blk.0.attn_q.weight\" holds NaN (the d of block 3)",
        ),
        (
            patch(
                "norm.gguf",
                at("output_norm.weight", 5 * 4),
                &f32::INFINITY.to_le_bytes(),
            ),
            "tensor \"output_norm.weight\" holds infinity (element 5)",
        ),
    ];
    let ort = amend_edits::fsutil::cache_dir()
        .unwrap_or_default()
        .join("ort/cpu")
        .exists();
    for (path, why) in &cases {
        for private_copy in [true, false] {
            let o = ModelOptions {
                private_copy,
                ..Default::default()
            };
            match Model::open(path, o) {
                Err(RuntimeError::InvalidGguf { detail, .. }) => {
                    assert!(detail.contains(why), "{detail}")
                }
                Err(e) => panic!("{}: {e}", path.display()),
                Ok(_) => panic!("{} opened", path.display()),
            }
        }
        // ONNX Runtime, building the graph, and with the graph cache (which binds the cached
        // graph to the fingerprint first).
        let ort_runs: &[&[&str]] = if ort {
            &[&["--no-onnx-cache"], &[]]
        } else {
            &[]
        };
        for extra in ort_runs {
            let mut args = vec![os("run"), os("--model"), path.as_os_str()];
            args.extend(
                [
                    "--backend",
                    "ort",
                    "--ep",
                    "cpu",
                    "--prompt",
                    "x",
                    "--max-tokens",
                    "1",
                ]
                .map(os),
            );
            args.extend(extra.iter().map(os));
            let (ok, _, err) = amend(&args);
            assert!(!ok && err.contains(why), "ort {extra:?}: {err}");
        }
        assert!(
            !amend_edits::fingerprint::cache_path(path).exists(),
            "a refused model left a fingerprint cache entry"
        );
    }
    // The seed itself opens (the patches, not the model, are refused).
    Model::open(&seed, Default::default()).unwrap();
}

fn keypair(name: &str) -> (PathBuf, PathBuf) {
    let prefix = tmp().join(name);
    let (k, p) = (prefix.with_extension("key"), prefix.with_extension("pub"));
    std::fs::write(&k, format!("{}\n", to_hex(&key().to_bytes()))).unwrap();
    std::fs::write(
        &p,
        format!("{}\n", to_hex(key().verifying_key().as_bytes())),
    )
    .unwrap();
    (k, p)
}

fn amend(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(args)
        .env_remove("AMEND_MODEL")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("$ amend {args:?}\n  stdout: {o}\n  stderr: {e}");
    (out.status.success(), o, e)
}

fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

#[test]
fn directory_as_bundle_one_clear_error() {
    let (_, pubkey) = keypair("dir");
    let d = tmp().join("a-directory.amend");
    std::fs::create_dir_all(&d).unwrap();
    for cmd in ["verify", "inspect"] {
        let (ok, _, err) = amend(&[os(cmd), os(&d), os("--pubkey"), os(&pubkey)]);
        assert!(!ok);
        assert_eq!(
            err.matches("is a directory, not a regular file").count(),
            1,
            "{cmd}: {err}"
        );
        assert!(!err.contains("os error 19"), "{err}");
    }
}

#[test]
fn inspect_reads_only_header_and_manifest() {
    // A valid-looking header for a 3 GB bundle with a garbage manifest: inspect must fail at
    // the manifest without reading the 3 GB (which before took seconds and GBs of RSS).
    let p = tmp().join("inspect-sparse.amend");
    let total: u64 = 3 << 30;
    let m_len: u32 = 16;
    let sig = (64 + m_len as u64).div_ceil(8) * 8;
    let payload = (sig + 72).div_ceil(64) * 64;
    let mut h = Vec::new();
    h.extend_from_slice(b"AMENDBDL");
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&64u32.to_le_bytes());
    h.extend_from_slice(&m_len.to_le_bytes());
    h.extend_from_slice(&sig.to_le_bytes());
    h.extend_from_slice(&72u32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&payload.to_le_bytes());
    h.extend_from_slice(&total.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    h.extend_from_slice(&[0xff; 16]);
    std::fs::write(&p, &h).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(total)
        .unwrap();
    let t = Instant::now();
    let (ok, _, err) = amend(&[os("inspect"), os(&p)]);
    let dt = t.elapsed();
    assert!(!ok);
    assert!(err.contains("manifest does not decode"), "{err}");
    assert!(dt < Duration::from_secs(3), "inspect took {dt:?}");
    let _ = std::fs::remove_file(&p);
}

// ---------------------------------------------------------------------------------------------
// 3. Persistent, shared anti-rollback state.

/// Helper run in a child process by `replay_across_processes_with_a_state_file`: activates the
/// bundle in $HOSTILE_BUNDLE with the version store $HOSTILE_STATE and prints the outcome.
#[test]
#[ignore = "child process of replay_across_processes_with_a_state_file"]
fn state_child() {
    let (Some(bundle), Some(state)) = (
        std::env::var_os("HOSTILE_BUNDLE"),
        std::env::var_os("HOSTILE_STATE"),
    ) else {
        return;
    };
    let store = Arc::new(VersionStore::open(&state).unwrap());
    let set = EditSet::new(fake_binding(), trust()).with_version_store(store);
    let b = Bundle::open_file(&bundle, set.trust()).unwrap();
    match set.add(Arc::new(b), AddOptions::default()) {
        Ok(_) => println!("OUTCOME activated"),
        Err(e) => println!("OUTCOME refused: {e}"),
    }
}

fn child(bundle: &Path, state: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "state_child", "--nocapture"])
        .env("HOSTILE_BUNDLE", bundle)
        .env("HOSTILE_STATE", state)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    // Anywhere in a line: with one test thread (RUST_TEST_THREADS=1, as `make test` runs) libtest
    // prints "test state_child ... " before the test runs, on the line its output continues.
    s.lines()
        .find_map(|l| l.find("OUTCOME ").map(|at| &l[at + "OUTCOME ".len()..]))
        .unwrap_or_else(|| panic!("child printed no outcome: {s}"))
        .to_string()
}

#[test]
fn replay_across_processes_with_a_state_file() {
    let b = fake_binding();
    let (v1, v9) = (tmp().join("rp-v1.amend"), tmp().join("rp-v9.amend"));
    std::fs::write(&v1, codebook_bundle(&b, 1, 0.5, u64::MAX)).unwrap();
    std::fs::write(&v9, codebook_bundle(&b, 9, 0.5, u64::MAX)).unwrap();
    let state = tmp().join("rp.state");
    let _ = std::fs::remove_file(&state);
    assert_eq!(child(&v9, &state), "activated");
    // A second process (a restart) replaying v1: refused by the mark the first one left.
    let second = child(&v1, &state);
    assert!(
        second.contains("channel \"main\" is at version 9; 1 would be a downgrade"),
        "{second}"
    );
    // The same v9 again (a restart of the device with its current bundle) is fine.
    assert_eq!(child(&v9, &state), "activated");
    // The mark stayed at 9.
    let store = VersionStore::open(&state).unwrap();
    assert_eq!(store.get("main").unwrap().unwrap().version, 9);
    // `amend verify --state` refuses the replay too, without a model.
    let (_, pubkey) = keypair("rp");
    let (ok, _, err) = amend(&[
        os("verify"),
        os(&v1),
        os("--pubkey"),
        os(&pubkey),
        os("--state"),
        os(&state),
    ]);
    assert!(!ok && err.contains("would be a downgrade"), "{err}");
}

#[test]
fn bundle_expiring_mid_session_stops_applying() {
    let Some(model_path) = real_model() else {
        return;
    };
    let binding = amend_edits::fingerprint::model_binding(&model_path).unwrap();
    let model = Model::open(&model_path, Default::default()).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let set = Arc::new(EditSet::with_clock(binding.clone(), trust(), clock.clone()));
    let bytes = codebook_bundle(&binding, 1, 0.5, T0 + 60);
    set.add(set.open_bytes(&bytes).unwrap(), AddOptions::default())
        .unwrap();
    let opts = SessionOptions {
        n_threads: Some(1),
        ..Default::default()
    };
    let mut base = Session::new(&model, opts.clone()).unwrap();
    let (base_text, _) = request(&mut base);
    let mut s = Session::new(&model, opts).unwrap();
    s.set_edit_set(Some(set.clone())).unwrap();
    let (edited, cb) = request(&mut s);
    assert!(cb.iter().any(|c| c.3), "the edit applies while valid");
    assert!(s.explain().expired.is_empty());
    // Time passes while the bundle is active.
    clock.set(T0 + 60);
    let (after, cb) = request(&mut s);
    let ex = s.explain();
    assert_eq!(ex.expired.len(), 1, "{ex:?}");
    assert_eq!(ex.expired[0].bundle, "main-v1");
    assert!(cb.is_empty(), "an expired bundle still looked up: {cb:?}");
    assert_eq!(after, base_text, "expired edit still changes the output");
    assert!(set.snapshot().bundles.is_empty());
    eprintln!("edited {edited:?}, base/expired {after:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. The compiler: unique ids, verified output, nothing written on error.

fn compile_args<'a>(
    edits: &'a Path,
    out: &'a Path,
    key: &'a Path,
    base: Option<&'a Path>,
) -> Vec<&'a std::ffi::OsStr> {
    let mut v = vec![
        os("compile"),
        os("--model"),
        os("/nonexistent/model.gguf"),
        os("--method"),
        os("grace"),
        os("--edits"),
        os(edits),
        os("--out"),
        os(out),
        os("--key"),
        os(key),
    ];
    if let Some(b) = base {
        v.push(os("--base-bundle"));
        v.push(os(b));
    }
    v
}

#[test]
fn compile_refuses_duplicate_record_ids_and_writes_nothing() {
    let (k, _) = keypair("dup");
    let edits = tmp().join("dup.jsonl");
    std::fs::write(
        &edits,
        "{\"id\": \"x\", \"prompt\": \"a\", \"target\": \"b\"}\n{\"id\": \"y\", \"prompt\": \"c\", \"target\": \"d\"}\n{\"id\": \"x\", \"prompt\": \"e\", \"target\": \"f\"}\n",
    )
    .unwrap();
    let out = tmp().join("dup.amend");
    let (ok, _, err) = amend(&compile_args(&edits, &out, &k, None));
    assert!(!ok);
    assert!(
        err.contains("edit ids must be unique: [\"x\"] appear more than once"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn compile_refuses_ids_colliding_with_the_base_bundle_and_writes_nothing() {
    let (k, _) = keypair("base");
    // A base bundle with edits "0" and "1", signed by --key.
    let b = fake_binding();
    let mut bb = BundleBuilder::new(meta(&b, "main", 1, u64::MAX));
    let mut keys = vec![0.0; 16];
    keys[0] = 1.0;
    keys[9] = 1.0;
    let p = bb.add_codebook(
        10,
        Site::FfnOutput,
        Site::FfnOutput,
        1,
        false,
        8,
        &keys,
        &[0.5; 16],
        &[1.0, 1.0],
    );
    bb.add_edit("0", 10, Site::FfnOutput, "p", "t", p, 0, 1);
    bb.add_edit("1", 10, Site::FfnOutput, "p", "t", p, 1, 1);
    let base = tmp().join("base.amend");
    std::fs::write(&base, bb.build_signed(&key()).unwrap().as_slice()).unwrap();
    // New records whose own ids are the base's "0", "1" (id-less records are numbered after
    // the base's ids: e2e::compile_numbers_id_less_records_after_the_base_bundle).
    let edits = tmp().join("new.jsonl");
    std::fs::write(
        &edits,
        "{\"id\": \"0\", \"prompt\": \"a\", \"target\": \"b\"}\n\
         {\"id\": \"1\", \"prompt\": \"c\", \"target\": \"d\"}\n",
    )
    .unwrap();
    let out = tmp().join("next.amend");
    let (ok, _, err) = amend(&compile_args(&edits, &out, &k, Some(&base)));
    assert!(!ok);
    assert!(
        err.contains(
            "edit ids [\"0\", \"1\"] of the new records are already used by --base-bundle"
        ),
        "{err}"
    );
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------------
// 6. Value bounds, 7. smaller holes.

fn live_set_with_good_bundle() -> (EditSet, u64) {
    let set = EditSet::with_clock(fake_binding(), trust(), Arc::new(ManualClock::new(T0)));
    let g = set
        .add(
            set.open_bytes(&codebook_bundle(&fake_binding(), 1, 0.5, u64::MAX))
                .unwrap(),
            AddOptions::default(),
        )
        .unwrap();
    (set, g)
}

#[test]
fn signed_values_of_3e38_are_refused() {
    let (set, g) = live_set_with_good_bundle();
    let bytes = codebook_bundle(&fake_binding(), 2, 3.0e38, u64::MAX);
    let e = set.open_bytes(&bytes).unwrap_err();
    assert!(
        matches!(
            e,
            EditSetError::Bundle(BundleError::ValueOutOfRange { index: 1 })
        ),
        "{e}"
    );
    assert_eq!(set.snapshot().generation, g);
    assert_eq!(set.list()[0].version, 1);
}

/// A GGUF-LoRA payload carries its values inside a blob, not in f32 sections: the same bound
/// applies to them (and to its alpha), so a trusted key cannot ship 3e38 through llama.cpp's
/// adapter either.
#[test]
fn signed_gguf_lora_values_of_3e38_are_refused() {
    let (set, g) = live_set_with_good_bundle();
    let lora = |value: f32, alpha: f32| {
        let mut w = amend_edits::gguf::GgufWriter::new();
        w.add("general.architecture", "gemma3")
            .add("general.type", "adapter")
            .add("adapter.type", "lora")
            .add("adapter.lora.alpha", alpha);
        let mut a = vec![0.25f32; 8];
        a[3] = value;
        w.add_tensor_f32("blk.10.ffn_down.weight.lora_a", &[8, 1], &a)
            .unwrap()
            .add_tensor_f32("blk.10.ffn_down.weight.lora_b", &[1, 8], &[0.5; 8])
            .unwrap();
        let b = fake_binding();
        let mut bb = BundleBuilder::new(meta(&b, "main", 2, u64::MAX));
        let p = bb.add_gguf_lora(w.to_bytes());
        bb.add_edit("e0", 10, Site::FfnOutput, "p", "t", p, 0, 1);
        bb.build_signed(&key()).unwrap()
    };
    // The same adapter with ordinary values opens.
    assert!(set.open_bytes(lora(0.5, 1.0).as_slice()).is_ok());
    for (value, alpha, want) in [
        (3.0e38f32, 1.0f32, "value"),
        (-2.0e6, 1.0, "value"),
        (0.5, 3.0e38, "alpha"),
    ] {
        let e = set.open_bytes(lora(value, alpha).as_slice()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("magnitude bound") && text.contains(want),
            "{value} {alpha}: {text}"
        );
    }
    assert_eq!(set.snapshot().generation, g);
}

#[test]
fn signed_radius_of_1e30_is_refused() {
    let (set, g) = live_set_with_good_bundle();
    for (distance, radius, want_bound) in
        [(0u8, 1.0e30f32, true), (1, 1.0e30, true), (1, 3.0, false)]
    {
        let b = fake_binding();
        let mut bb = BundleBuilder::new(meta(&b, "main", 2, u64::MAX));
        let mut k = vec![0.0; 8];
        k[0] = 1.0;
        let p = bb.add_codebook(
            10,
            Site::FfnOutput,
            Site::FfnOutput,
            distance,
            false,
            8,
            &k,
            &[0.5; 8],
            &[radius],
        );
        bb.add_edit("e0", 10, Site::FfnOutput, "p", "t", p, 0, 1);
        let bytes = bb.build_signed(&key()).unwrap();
        let e = set.open_bytes(bytes.as_slice()).unwrap_err();
        if want_bound {
            assert!(
                matches!(
                    e,
                    EditSetError::Bundle(BundleError::ValueOutOfRange { index: 2 })
                ),
                "{e}"
            );
        } else {
            // Finite and small, but beyond the normalized distances' range [0, 2].
            assert!(e.to_string().contains("radius above 2"), "{e}");
        }
    }
    assert_eq!(set.snapshot().generation, g);
}

#[test]
fn small_order_public_key_is_refused() {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let p = tmp().join("weak.pub");
    std::fs::write(&p, to_hex(&identity)).unwrap();
    let b = tmp().join("weak-target.amend");
    std::fs::write(&b, codebook_bundle(&fake_binding(), 1, 0.5, u64::MAX)).unwrap();
    let (ok, _, err) = amend(&[os("verify"), os(&b), os("--pubkey"), os(&p)]);
    assert!(!ok);
    assert!(err.contains("weak ed25519 public key"), "{err}");
}

#[test]
fn empty_prompt_is_refused() {
    let Some(model_path) = real_model() else {
        return;
    };
    let model = Model::open(&model_path, Default::default()).unwrap();
    let mut s = Session::new(&model, Default::default()).unwrap();
    // add_bos = true (the default) used to turn "" into [BOS] and generate from it.
    let e = s
        .generate(
            "",
            &GenerateParams::default(),
            |_| ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(matches!(e, RuntimeError::EmptyInput), "{e}");
}
