//! Every numeric parameter of the C ABI at its extremes, on the tiny model: out-of-range values
//! give `AMEND_ERR_INVALID_ARGUMENT` with a message naming the parameter, never a wrapped value,
//! an abort inside llama.cpp or a C++ exception (`repeat_last_n` = INT32_MAX used to throw
//! `bad_alloc`, `n_threads` = 100000 aborted in ggml, values above INT32_MAX wrapped negative).

use std::ffi::CStr;
use std::ptr;

use amend::*;

#[path = "common/util.rs"]
mod util;
use util::{last_error, load_bundle, trust_store};

fn open_model(params: &amend_model_params) -> (amend_result, *mut amend_model) {
    let path = std::ffi::CString::new(util::tiny_model_path("numeric").to_str().unwrap()).unwrap();
    let mut m = ptr::null_mut();
    let r = amend_model_open(path.as_ptr(), params, &mut m);
    (r, m)
}

/// The tiny model on `backend` with a codebook slot at layer 1 (ONNX Runtime), and a session.
fn open_slotted(backend: u32) -> (*mut amend_model, *mut amend_session) {
    let slots = std::ffi::CString::new("cb:1:ffn_input:ffn_output").unwrap();
    let (r, m) = open_model(&amend_model_params {
        backend,
        n_threads: 1,
        edit_slots: slots.as_ptr(),
        ..amend_model_default_params()
    });
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    (m, util::open_session(m))
}

/// The ONNX Runtime library is there (a skip without it; a failure under AMEND_REQUIRE_MODEL=1).
fn ort_library() -> bool {
    let lib = amend_runtime::onnxruntime::default_library(&amend_runtime::onnxruntime::Ep::Cpu);
    if lib.exists() {
        return true;
    }
    if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!("AMEND_REQUIRE_MODEL=1 but {} is missing", lib.display());
    }
    eprintln!("skipped: {} missing", lib.display());
    false
}

/// A bundle builder for the tiny model, id and channel `id`, valid from 0 to forever.
fn tiny_bundle_builder(id: &str) -> amend_edits::BundleBuilder {
    amend_edits::BundleBuilder::new(amend_edits::BundleMeta {
        bundle_id: id.into(),
        channel: id.into(),
        version: 1,
        created: 0,
        not_before: 0,
        expires: u64::MAX,
        model: amend_edits::fingerprint::model_binding(util::tiny_model_path("numeric")).unwrap(),
    })
}

/// Greedy tokens of "hello world" on `s` (up to `max_tokens`).
fn greedy_tokens(s: *mut amend_session, max_tokens: u32) -> Vec<amend_token> {
    extern "C" fn collect(
        ud: *mut std::ffi::c_void,
        t: amend_token,
        _: *const std::ffi::c_char,
        _: usize,
    ) -> bool {
        unsafe { (*(ud as *mut Vec<amend_token>)).push(t) };
        true
    }
    let prompt = "hello world";
    let params = amend_generate_params {
        max_tokens,
        ..amend_generate_default_params()
    };
    let mut toks: Vec<amend_token> = Vec::new();
    let r = amend_session_generate(
        s,
        prompt.as_ptr() as *const _,
        prompt.len(),
        &params,
        Some(collect),
        &mut toks as *mut Vec<amend_token> as *mut std::ffi::c_void,
        ptr::null_mut(),
    );
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    toks
}

/// `r` is an invalid-argument error whose message names `param`.
fn refused(r: amend_result, param: &str) {
    assert_eq!(
        r,
        amend_result::AMEND_ERR_INVALID_ARGUMENT,
        "{param}: {}",
        last_error()
    );
    let msg = last_error();
    assert!(msg.contains(param), "{param}: {msg}");
}

#[test]
fn model_thread_count() {
    for n in [513u32, 100_000, i32::MAX as u32 + 1, u32::MAX] {
        let (r, m) = open_model(&amend_model_params {
            n_threads: n,
            ..amend_model_default_params()
        });
        refused(r, "n_threads");
        assert!(m.is_null());
    }
    for n in [0u32, 1, 512] {
        let (r, m) = open_model(&amend_model_params {
            n_threads: n,
            ..amend_model_default_params()
        });
        assert_eq!(r, amend_result::AMEND_OK, "n_threads {n}: {}", last_error());
        amend_model_free(m);
    }
}

fn with_session(
    params: amend_session_params,
) -> (amend_result, *mut amend_model, *mut amend_session) {
    let (r, m) = open_model(&amend_model_default_params());
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    let mut s = ptr::null_mut();
    let r = amend_session_open(m, &params, &mut s);
    (r, m, s)
}

#[test]
fn session_sizes_and_threads() {
    let d = amend_session_default_params;
    let cases: [(amend_session_params, &str); 9] = [
        (amend_session_params { n_ctx: 0, ..d() }, "n_ctx"),
        (
            amend_session_params {
                n_ctx: u32::MAX,
                ..d()
            },
            "n_ctx",
        ),
        (
            amend_session_params {
                n_ctx: (1 << 20) + 1,
                ..d()
            },
            "n_ctx",
        ),
        (amend_session_params { n_ubatch: 0, ..d() }, "n_ubatch"),
        (
            amend_session_params {
                n_threads: 513,
                ..d()
            },
            "n_threads",
        ),
        (
            amend_session_params {
                n_threads: 100_000,
                ..d()
            },
            "n_threads",
        ),
        (
            amend_session_params {
                n_threads: u32::MAX,
                ..d()
            },
            "n_threads",
        ),
        (
            amend_session_params {
                n_threads_batch: i32::MAX as u32 + 1,
                ..d()
            },
            "n_threads_batch",
        ),
        (
            amend_session_params {
                n_threads_batch: u32::MAX,
                ..d()
            },
            "n_threads_batch",
        ),
    ];
    for (p, name) in cases {
        let (r, m, s) = with_session(p);
        refused(r, name);
        assert!(s.is_null());
        amend_model_free(m);
    }
    // Large but meaningful values are capped, not refused: n_ctx at the training context,
    // n_ubatch at n_ctx.
    let (r, m, s) = with_session(amend_session_params {
        n_ctx: 1 << 20,
        n_ubatch: u32::MAX,
        n_threads: 1,
        n_threads_batch: 1,
    });
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    amend_session_free(s);
    amend_model_free(m);
}

/// `amend_session_generate` of "hello" with `p`, no callback.
fn generate_hello(s: *mut amend_session, p: amend_generate_params) -> amend_result {
    let prompt = "hello";
    amend_session_generate(
        s,
        prompt.as_ptr() as *const _,
        prompt.len(),
        &p,
        None,
        ptr::null_mut(),
        ptr::null_mut(),
    )
}

#[test]
fn generation_parameters() {
    let (r, m, s) = with_session(amend_session_params {
        n_ctx: 64,
        n_threads: 1,
        n_threads_batch: 1,
        ..amend_session_default_params()
    });
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    let generate = |p: amend_generate_params| generate_hello(s, p);
    let d = || amend_generate_params {
        max_tokens: 4,
        temperature: 0.7,
        repeat_penalty: 1.1,
        ..amend_generate_default_params()
    };
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    let cases: Vec<(amend_generate_params, &str)> = vec![
        (
            amend_generate_params {
                temperature: nan,
                ..d()
            },
            "temperature",
        ),
        (
            amend_generate_params {
                temperature: inf,
                ..d()
            },
            "temperature",
        ),
        (
            amend_generate_params {
                temperature: -inf,
                ..d()
            },
            "temperature",
        ),
        (
            amend_generate_params {
                top_k: u32::MAX,
                ..d()
            },
            "top_k",
        ),
        (
            amend_generate_params {
                top_k: i32::MAX as u32 + 1,
                ..d()
            },
            "top_k",
        ),
        (amend_generate_params { top_p: nan, ..d() }, "top_p"),
        (amend_generate_params { top_p: 0.0, ..d() }, "top_p"),
        (amend_generate_params { top_p: 1.5, ..d() }, "top_p"),
        (amend_generate_params { top_p: -1.0, ..d() }, "top_p"),
        (amend_generate_params { min_p: nan, ..d() }, "min_p"),
        (amend_generate_params { min_p: -0.1, ..d() }, "min_p"),
        (amend_generate_params { min_p: 1.1, ..d() }, "min_p"),
        (
            amend_generate_params {
                repeat_penalty: nan,
                ..d()
            },
            "repeat_penalty",
        ),
        (
            amend_generate_params {
                repeat_penalty: 0.0,
                ..d()
            },
            "repeat_penalty",
        ),
        (
            amend_generate_params {
                repeat_penalty: -1.0,
                ..d()
            },
            "repeat_penalty",
        ),
        (
            amend_generate_params {
                repeat_penalty: inf,
                ..d()
            },
            "repeat_penalty",
        ),
        // INT32_MAX threw std::bad_alloc inside llama.cpp; 2^28 cost 1 GiB.
        (
            amend_generate_params {
                repeat_last_n: i32::MAX as u32,
                ..d()
            },
            "repeat_last_n",
        ),
        (
            amend_generate_params {
                repeat_last_n: u32::MAX,
                ..d()
            },
            "repeat_last_n",
        ),
        (
            amend_generate_params {
                repeat_last_n: 1 << 28,
                ..d()
            },
            "repeat_last_n",
        ),
        (
            amend_generate_params {
                repeat_last_n: 65,
                ..d()
            },
            "repeat_last_n",
        ),
        (
            amend_generate_params {
                seed: u32::MAX,
                ..d()
            },
            "seed",
        ),
    ];
    for (p, name) in cases {
        refused(generate(p), name);
    }
    // The extremes that are meaningful work: greedy below zero, the whole context for the
    // penalty window, any other seed, top_k above the vocabulary, max_tokens until the context
    // is full.
    for p in [
        amend_generate_params {
            temperature: -1.0,
            ..d()
        },
        amend_generate_params {
            repeat_last_n: 64,
            ..d()
        },
        amend_generate_params {
            repeat_last_n: 0,
            ..d()
        },
        amend_generate_params {
            seed: u32::MAX - 1,
            ..d()
        },
        amend_generate_params { seed: 0, ..d() },
        amend_generate_params {
            top_k: i32::MAX as u32,
            ..d()
        },
        amend_generate_params {
            top_p: 1.0,
            min_p: 0.0,
            top_k: 0,
            ..d()
        },
        amend_generate_params {
            max_tokens: u32::MAX,
            stop_at_eos: false,
            ..d()
        },
        amend_generate_params {
            max_tokens: 0,
            ..d()
        },
    ] {
        assert_eq!(
            generate(p),
            amend_result::AMEND_OK,
            "{p:?}: {}",
            last_error()
        );
    }
    amend_session_free(s);
    amend_model_free(m);
}

/// The default generation parameters work on a session whose context is smaller than their
/// repetition window (64 tokens): the window is read only with the penalty on, and then a
/// window beyond the context is refused by name.
#[test]
fn default_generation_fits_a_small_context() {
    let (r, m, s) = with_session(amend_session_params {
        n_ctx: 16,
        n_threads: 1,
        n_threads_batch: 1,
        ..amend_session_default_params()
    });
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    let generate = |p: amend_generate_params| generate_hello(s, p);
    let d = || amend_generate_params {
        max_tokens: 4,
        ..amend_generate_default_params()
    };
    assert!(d().repeat_last_n > 16);
    assert_eq!(generate(d()), amend_result::AMEND_OK, "{}", last_error());
    let penalty = amend_generate_params {
        repeat_penalty: 1.1,
        ..d()
    };
    refused(generate(penalty), "repeat_last_n");
    assert!(last_error().contains("outside 0..=16"), "{}", last_error());
    let fits = amend_generate_params {
        repeat_last_n: 16,
        ..penalty
    };
    assert_eq!(generate(fits), amend_result::AMEND_OK, "{}", last_error());
    amend_session_free(s);
    amend_model_free(m);
}

/// A `struct_size` that is none of the struct's versions, and an unknown backend, are refused
/// by name; the first version's size (an older caller) keeps the defaults for the fields it
/// lacks.
#[test]
fn model_params_size_and_backend() {
    let full = std::mem::size_of::<amend_model_params>();
    let v1 = std::mem::offset_of!(amend_model_params, static_chunk);
    for size in [0usize, 1, v1 - 1, v1 + 4, full - 1, full + 8, usize::MAX] {
        let (r, m) = open_model(&amend_model_params {
            struct_size: size,
            ..amend_model_default_params()
        });
        refused(r, "struct_size");
        assert!(m.is_null());
    }
    for backend in [2u32, 99, u32::MAX] {
        let (r, m) = open_model(&amend_model_params {
            backend,
            ..amend_model_default_params()
        });
        refused(r, "backend");
        assert!(m.is_null());
    }
    let bad = std::ffi::CString::new("lr").unwrap();
    let (r, m) = open_model(&amend_model_params {
        backend: AMEND_BACKEND_ONNXRUNTIME,
        edit_slots: bad.as_ptr(),
        ..amend_model_default_params()
    });
    refused(r, "edit_slots");
    assert!(m.is_null());
    let ep = std::ffi::CString::new("tpu").unwrap();
    let (r, m) = open_model(&amend_model_params {
        backend: AMEND_BACKEND_ONNXRUNTIME,
        ep: ep.as_ptr(),
        ..amend_model_default_params()
    });
    assert_ne!(r, amend_result::AMEND_OK);
    assert!(last_error().contains("tpu"), "{}", last_error());
    assert!(m.is_null());
    // Static shapes: both or neither, in range, and only on ONNX Runtime (checked before any
    // library is loaded).
    for (backend, chunk, window) in [
        (AMEND_BACKEND_ONNXRUNTIME, 4, 0),
        (AMEND_BACKEND_ONNXRUNTIME, 0, 64),
        (AMEND_BACKEND_ONNXRUNTIME, 513, 1024),
        (AMEND_BACKEND_ONNXRUNTIME, 4, usize::MAX),
        (AMEND_BACKEND_LLAMA_CPP, 4, 64),
    ] {
        let (r, m) = open_model(&amend_model_params {
            backend,
            static_chunk: chunk,
            static_window: window,
            ..amend_model_default_params()
        });
        refused(r, "static_");
        assert!(m.is_null());
    }
    // Provider options: KEY=VALUE lines, only on ONNX Runtime, only for EPs that take them
    // (checked before any library is loaded).
    let line = std::ffi::CString::new("backend_path=libQnnHtp.so\nno equals sign").unwrap();
    let one = std::ffi::CString::new("num_of_threads=1").unwrap();
    for (backend, options, named) in [
        (AMEND_BACKEND_ONNXRUNTIME, &line, "no equals sign"),
        (AMEND_BACKEND_LLAMA_CPP, &one, "ep_options"),
        (
            AMEND_BACKEND_ONNXRUNTIME,
            &one,
            "cpu takes no provider options",
        ),
    ] {
        let (r, m) = open_model(&amend_model_params {
            backend,
            ep_options: options.as_ptr(),
            ..amend_model_default_params()
        });
        refused(r, named);
        assert!(m.is_null());
    }
    // A caller built against the first version (no static fields), the second (no provider
    // options) or the third (no private_copy) keeps the defaults for what it lacks.
    for (size, name) in [
        (std::mem::offset_of!(amend_model_params, static_chunk), "v1"),
        (std::mem::offset_of!(amend_model_params, ep_options), "v2"),
        (std::mem::offset_of!(amend_model_params, private_copy), "v3"),
    ] {
        let (r, m) = open_model(&amend_model_params {
            struct_size: size,
            n_threads: 1,
            static_chunk: if name == "v1" { 7 } else { 0 },
            static_window: if name == "v1" { 7 } else { 0 },
            ep_options: if name == "v3" {
                std::ptr::null()
            } else {
                line.as_ptr()
            },
            private_copy: false,
            ..amend_model_default_params()
        });
        assert_eq!(r, amend_result::AMEND_OK, "{name}: {}", last_error());
        amend_model_free(m);
    }
    // The model file mapped as it is (no private copy), as a caller may choose.
    let (r, m) = open_model(&amend_model_params {
        n_threads: 1,
        private_copy: false,
        ..amend_model_default_params()
    });
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    amend_model_free(m);
}

/// Fixed shapes through the C ABI: the model opens with a static pair of graphs, and a session
/// whose context exceeds the window is refused by name.
#[test]
fn static_shapes_through_the_c_abi() {
    if !ort_library() {
        return;
    }
    let (r, m) = open_model(&amend_model_params {
        backend: AMEND_BACKEND_ONNXRUNTIME,
        n_threads: 1,
        static_chunk: 4,
        static_window: 64,
        ..amend_model_default_params()
    });
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    let mut s = ptr::null_mut();
    let too_long = amend_session_params {
        n_ctx: 128,
        ..amend_session_default_params()
    };
    assert_eq!(
        amend_session_open(m, &too_long, &mut s),
        amend_result::AMEND_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("window"), "{}", last_error());
    assert!(s.is_null());
    let fits = amend_session_params {
        n_ctx: 64,
        ..amend_session_default_params()
    };
    assert_eq!(
        amend_session_open(m, &fits, &mut s),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    amend_session_free(s);
    amend_model_free(m);
}

/// The same greedy generation through the C ABI on both backends (the tiny model's f32
/// weights agree to ~1e-4, so the tokens are the same), when the ONNX Runtime library is there.
#[test]
fn onnxruntime_backend_through_the_c_abi() {
    if !ort_library() {
        return;
    }
    let generate = |backend: u32| {
        let (m, s) = open_slotted(backend);
        let toks = greedy_tokens(s, 6);
        amend_session_free(s);
        amend_model_free(m);
        toks
    };
    let llama = generate(AMEND_BACKEND_LLAMA_CPP);
    let ort = generate(AMEND_BACKEND_ONNXRUNTIME);
    assert_eq!(llama.len(), 6);
    assert_eq!(llama, ort);
}

/// A bundle's verification record through the C ABI, on the tiny model: a bundle that requires
/// verification on llama.cpp only is activated there and refused on ONNX Runtime
/// (`AMEND_ERR_BUNDLE_UNVERIFIED`, nothing active); without `required` it is activated on ONNX
/// Runtime and explain reports an `"unverified"` warning.
#[test]
fn verification_record_through_the_c_abi() {
    use amend_edits::ed25519_dalek::SigningKey;
    if !ort_library() {
        return;
    }
    let key = SigningKey::from_bytes(&[9; 32]);
    let bundle = |id: &str, required: bool| -> Vec<u8> {
        let d = amend_runtime::testutil::TINY_N_EMBD as usize;
        let mut b = tiny_bundle_builder(id);
        // A key no prompt comes near: the edit never fires, so only the record matters.
        let mut k = vec![0.0f32; d];
        k[0] = 1.0;
        let p = b.add_codebook(
            1,
            amend_edits::Site::FfnInput,
            amend_edits::Site::FfnOutput,
            1,
            false,
            d,
            &k,
            &vec![0.5; d],
            &[0.01],
        );
        b.add_edit("e", 1, amend_edits::Site::FfnOutput, "p", "t", p, 0, 1);
        b.set_verification(Some(amend_edits::bundle::Verification {
            backends: vec![amend_edits::bundle::VerifiedBackend {
                backend: amend_runtime::LLAMA_CPP_BACKEND_ID.into(),
                passed: 1,
                total: 1,
            }],
            required,
        }));
        b.build_signed(&key).unwrap().as_slice().to_vec()
    };
    extern "C" fn families(ud: *mut std::ffi::c_void, a: *const amend_edit_activity) -> bool {
        let f = unsafe { CStr::from_ptr((*a).family) }
            .to_string_lossy()
            .into_owned();
        unsafe { (*(ud as *mut Vec<String>)).push(f) };
        true
    }
    let trust = trust_store(&key);
    // (activation result, active bundles, explain families after a generation)
    let run = |backend: u32, bytes: &[u8]| -> (amend_result, usize, Vec<String>) {
        let (m, s) = open_slotted(backend);
        let b = load_bundle(trust, m, bytes);
        let activated = amend_session_activate(s, b);
        if activated != amend_result::AMEND_OK {
            assert!(last_error().contains("verified on"), "{}", last_error());
        }
        let mut n = 0usize;
        assert_eq!(
            amend_session_active_bundle_count(s, &mut n),
            amend_result::AMEND_OK
        );
        let prompt = "hello world";
        let params = amend_generate_params {
            max_tokens: 1,
            ..amend_generate_default_params()
        };
        let r = amend_session_generate(
            s,
            prompt.as_ptr() as *const _,
            prompt.len(),
            &params,
            None,
            ptr::null_mut(),
            ptr::null_mut(),
        );
        assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
        let mut fams: Vec<String> = Vec::new();
        assert_eq!(
            amend_session_explain(s, Some(families), &mut fams as *mut Vec<String> as *mut _),
            amend_result::AMEND_OK
        );
        amend_bundle_free(b);
        amend_session_free(s);
        amend_model_free(m);
        (activated, n, fams)
    };
    let strict = bundle("v-strict", true);
    let lenient = bundle("v-lenient", false);
    let ok = amend_result::AMEND_OK;
    let (r, n, fams) = run(AMEND_BACKEND_LLAMA_CPP, &strict);
    assert_eq!((r, n), (ok, 1));
    assert!(!fams.iter().any(|f| f == "unverified"), "{fams:?}");
    let (r, n, fams) = run(AMEND_BACKEND_ONNXRUNTIME, &strict);
    assert_eq!((r, n), (amend_result::AMEND_ERR_BUNDLE_UNVERIFIED, 0));
    assert!(
        fams.is_empty(),
        "nothing of a refused bundle applies: {fams:?}"
    );
    let (r, n, fams) = run(AMEND_BACKEND_ONNXRUNTIME, &lenient);
    assert_eq!((r, n), (ok, 1));
    assert!(fams.iter().any(|f| f == "unverified"), "{fams:?}");
    let (_, _, fams) = run(AMEND_BACKEND_LLAMA_CPP, &lenient);
    assert!(!fams.iter().any(|f| f == "unverified"), "{fams:?}");
    amend_trust_store_free(trust);
}

/// A bundle larger than a static slot's capacity is refused by `amend_session_activate` with
/// `AMEND_ERR_EDIT_INVALID`, a message giving what it needs and what the slot holds, and
/// nothing of it applied (no active bundle, the base model's tokens); one that fits activates.
#[test]
fn static_capacity_is_checked_at_activation_through_the_c_abi() {
    use amend_edits::ed25519_dalek::SigningKey;
    if !ort_library() {
        return;
    }
    let key = SigningKey::from_bytes(&[7; 32]);
    let d = amend_runtime::testutil::TINY_N_EMBD as usize;
    // `n` codebook entries at layer 1 with distinct pseudo-random unit keys.
    let bundle = |n: usize| -> Vec<u8> {
        let mut b = tiny_bundle_builder(&format!("cap-{n}"));
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut keys = Vec::with_capacity(n * d);
        for _ in 0..n {
            let row: Vec<f32> = (0..d)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect();
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            keys.extend(row.iter().map(|x| x / norm));
        }
        let p = b.add_codebook(
            1,
            amend_edits::Site::FfnInput,
            amend_edits::Site::FfnOutput,
            1,
            false,
            d,
            &keys,
            &vec![0.5; n * d],
            &vec![0.01; n],
        );
        b.add_edit(
            "e",
            1,
            amend_edits::Site::FfnOutput,
            "p",
            "t",
            p,
            0,
            n as u32,
        );
        b.build_signed(&key).unwrap().as_slice().to_vec()
    };
    let trust = trust_store(&key);
    let slots = std::ffi::CString::new("cb:1:ffn_input:ffn_output").unwrap();
    let (r, m) = open_model(&amend_model_params {
        backend: AMEND_BACKEND_ONNXRUNTIME,
        n_threads: 1,
        edit_slots: slots.as_ptr(),
        static_chunk: 4,
        static_window: 64,
        ..amend_model_default_params()
    });
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    let s = util::open_session_with(
        m,
        &amend_session_params {
            n_ctx: 64,
            ..amend_session_default_params()
        },
    );
    let base = greedy_tokens(s, 4);
    let active = |s: *mut amend_session| {
        let mut n = usize::MAX;
        assert_eq!(
            amend_session_active_bundle_count(s, &mut n),
            amend_result::AMEND_OK
        );
        n
    };
    // 1,025 entries: one more than the static codebook slot holds.
    let b = load_bundle(trust, m, &bundle(1025));
    assert_eq!(
        amend_session_activate(s, b),
        amend_result::AMEND_ERR_EDIT_INVALID
    );
    let msg = last_error();
    assert!(msg.contains("1025") && msg.contains("1024"), "{msg}");
    assert_eq!(active(s), 0, "nothing of a refused bundle is published");
    assert_eq!(greedy_tokens(s, 4), base);
    amend_bundle_free(b);
    // Two entries fit.
    let b = load_bundle(trust, m, &bundle(2));
    assert_eq!(
        amend_session_activate(s, b),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    assert_eq!(active(s), 1);
    amend_bundle_free(b);
    amend_session_free(s);
    amend_model_free(m);
    amend_trust_store_free(trust);
}
