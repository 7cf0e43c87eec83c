//! The ONNX Runtime backend on the OpenVINO EP (CPU device), the non-default EP these machines
//! can run (issue 13). Its own test binary: one ONNX Runtime library per process, and this one
//! is the `onnxruntime-openvino` build. Skipped without it unless AMEND_REQUIRE_MODEL=1.

mod common;

use amend_runtime::onnxruntime::{self as ortb, Ep, OrtModel, OrtOptions, Profile};
use amend_runtime::parity::Mode;
use amend_runtime::{Architecture, RuntimeError};

fn options(device: &str) -> Option<OrtOptions> {
    let ep = Ep::OpenVino(device.into());
    let lib = ortb::default_library(&ep);
    if !lib.exists() {
        if std::env::var("AMEND_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
            panic!(
                "AMEND_REQUIRE_MODEL=1 but {} is missing (run `make ort`)",
                lib.display()
            );
        }
        eprintln!(
            "skipped: {} is missing (run scripts/fetch-ort.sh)",
            lib.display()
        );
        return None;
    }
    Some(OrtOptions {
        ep,
        profile: Profile::Cpu,
        library: Some(lib),
        n_threads: Some(1),
        // Tests leave no graph beside the models.
        cache: ortb::OnnxCache::Off,
        ..Default::default()
    })
}

#[test]
fn tiny_model_agrees_with_llama_cpp_on_openvino() {
    let Some(opts) = options("CPU") else { return };
    let llama = common::tiny(Architecture::Llama);
    let toks: Vec<Vec<i32>> = [
        "The capital of France is",
        "hello world",
        "water is made of",
    ]
    .iter()
    .map(|p| llama.tokenize(p, true).unwrap())
    .collect();
    let r = common::ort_parity(&llama, opts, &toks, 12, Mode::Incremental);
    eprintln!(
        "openvino tiny: {:.1}% max err {:.2e}",
        r.agreement(),
        r.max_abs_err
    );
    assert!(r.agreement() >= 97.0, "{:.1}%", r.agreement());
}

#[test]
fn an_absent_device_is_a_specific_error() {
    // No Intel NPU here: the EP must refuse, never fall back to the CPU silently.
    let Some(opts) = options("NPU") else { return };
    let path = common::tiny_path(Architecture::Llama);
    let e = OrtModel::open(&path, opts).unwrap_err();
    assert!(
        matches!(
            e,
            RuntimeError::OrtEp { .. } | RuntimeError::OrtSession { .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("openvino:NPU"), "{e}");
}

#[test]
fn gemma3_agrees_on_openvino() {
    let Some(opts) = options("CPU") else { return };
    let Some(llama) = common::real_model() else {
        return;
    };
    let prompts = common::prompts_100(&llama, 8);
    // OpenVINO's own dynamic quantization back on (an empty `load_config` replaces amend's).
    let requantized = OrtOptions {
        ep_options: vec![("load_config".into(), "{}".into())],
        ..opts.clone()
    };
    // Batch mode: OpenVINO compiles once per input shape, and token by token every step has one.
    let r = common::ort_parity(&llama, opts, &prompts, 16, Mode::Batch);
    let q = common::ort_parity(&llama, requantized, &prompts, 16, Mode::Batch);
    eprintln!(
        "gemma3 openvino: {}\nwith its dynamic quantization: {}",
        r.table("llama.cpp", "ort openvino:CPU"),
        q.table("llama.cpp", "ort openvino:CPU, int8 activations")
    );
    assert!(r.agreement() >= 93.0, "{:.1}%", r.agreement());
    // amend's default (f32 activations) adds no rounding of its own to llama.cpp's: closer
    // (100 prompts: mean logit error 0.190 against 0.230, docs/backends.md). OpenVINO's CPU
    // device requantizes only where the CPU has int8 dot products (VNNI, AMX): on an AVX2-only
    // CPU (a 2-core AMD EPYC here, session 34) both settings give the same logits.
    let int8_dots = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.split_whitespace()
            .any(|f| matches!(f, "avx512_vnni" | "avx_vnni" | "amx_int8"))
    });
    let same = r.mean_abs_err == q.mean_abs_err && r.agreement() == q.agreement();
    if same && !int8_dots {
        eprintln!("this CPU has no VNNI or AMX: OpenVINO did not requantize, nothing to compare");
        return;
    }
    assert!(
        r.mean_abs_err < q.mean_abs_err * 0.95,
        "default {:.4} against requantized {:.4}",
        r.mean_abs_err,
        q.mean_abs_err
    );
}

#[test]
fn provider_options_reach_the_ep_and_bad_ones_are_refused() {
    let Some(opts) = options("CPU") else { return };
    let path = common::tiny_path(Architecture::Llama);
    let with = |kv: &[(&str, &str)], ep: Ep| OrtOptions {
        ep,
        ep_options: kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..opts.clone()
    };
    // A malformed value is the EP's to refuse, at open, naming the EP and the options given.
    let e = OrtModel::open(
        &path,
        with(&[("load_config", "{not json")], opts.ep.clone()),
    )
    .unwrap_err();
    assert!(matches!(e, RuntimeError::OrtEp { .. }), "{e}");
    assert!(
        e.to_string().contains("openvino:CPU") && e.to_string().contains("load_config"),
        "{e}"
    );
    // No key; options for an EP that takes none.
    let e = OrtModel::open(&path, with(&[("", "1")], opts.ep.clone())).unwrap_err();
    assert!(matches!(e, RuntimeError::InvalidOptions(_)), "{e}");
    let e = OrtModel::open(&path, with(&[("cache_dir", "a\0b")], opts.ep.clone())).unwrap_err();
    assert!(
        matches!(e, RuntimeError::InvalidOptions(_)) && e.to_string().contains("NUL"),
        "{e}"
    );
    let e = OrtModel::open(&path, with(&[("num_of_threads", "1")], Ep::Cpu)).unwrap_err();
    assert!(
        matches!(e, RuntimeError::InvalidOptions(_)) && e.to_string().contains("cpu"),
        "{e}"
    );
    // A good one opens.
    OrtModel::open(&path, with(&[("num_of_threads", "1")], opts.ep.clone())).unwrap();
    // A device the machine lacks (no GPU here): the EP is in the library but does not start,
    // which the error says instead of "not available in this library".
    if let Err(e) = OrtModel::open(&path, with(&[], Ep::OpenVino("GPU".into()))) {
        assert!(
            matches!(e, RuntimeError::OrtEp { .. })
                && e.to_string()
                    .contains("has it, but it did not start on device GPU"),
            "{e}"
        );
    }
}

#[test]
fn a_node_the_ep_does_not_take_is_an_error_unless_fallback_is_asked() {
    use amend_runtime::onnxruntime::onnx::{Attr, DataType, Dim, Graph, Node, ValueInfo};
    let Some(opts) = options("CPU") else { return };
    // String tensors: the OpenVINO EP takes none, so this node could only run on the CPU EP.
    let vi = |name: &str| ValueInfo {
        name: name.into(),
        dtype: DataType::String,
        shape: vec![Dim::Fixed(2)],
    };
    let g = Graph {
        name: "strings".into(),
        nodes: vec![Node {
            op: "StringNormalizer",
            domain: "",
            name: "lower".into(),
            inputs: vec!["s".into()],
            outputs: vec!["t".into()],
            // The "C" locale: the default en_US.UTF-8 may not be installed.
            attrs: vec![
                ("case_change_action", Attr::Str("LOWER".into())),
                ("locale", Attr::Str("C".into())),
            ],
        }],
        initializers: vec![],
        inputs: vec![vi("s")],
        outputs: vec![vi("t")],
    };
    let e = ortb::check_graph(&g, &opts).unwrap_err();
    assert!(matches!(e, RuntimeError::OrtSession { .. }), "{e}");
    assert!(e.to_string().contains("openvino:CPU"), "{e}");
    assert!(e.to_string().contains("--cpu-fallback"), "{e}");
    // Asked for, the CPU EP takes it.
    ortb::check_graph(
        &g,
        &OrtOptions {
            cpu_fallback: true,
            ..opts
        },
    )
    .unwrap();
}

/// A named graph that OpenVINO runs although it does not compute this model's shapes (here the
/// first layer's new values concatenated along the wrong axis, a one-byte change that ONNX
/// Runtime's CPU EP refuses at open and OpenVINO accepts): every run is an error naming the
/// output, never an out-of-range read (it was a panic indexing the empty logits).
#[test]
fn a_named_graph_with_wrong_output_shapes_is_an_error_not_a_panic() {
    use amend_runtime::onnxruntime::{OnnxCache, OrtSession};
    let Some(opts) = options("CPU") else { return };
    let dir = common::tmp_dir().join("wrong-shapes");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("m.gguf");
    amend_runtime::testutil::write_tiny_model(&model, Architecture::Llama, 31).unwrap();
    let graph = dir.join("m.onnx");
    OrtModel::open(
        &model,
        OrtOptions {
            export: Some(graph.clone()),
            ..opts.clone()
        },
    )
    .unwrap();
    let mut bytes = std::fs::read(&graph).unwrap();
    // AttributeProto "axis", i = 2 (the KV concatenation along the positions): made 3.
    let pattern = b"Concat*\x0b\n\x04axis\x18\x02";
    // The second such node: the values' concatenation (the keys' feeds a MatMul whose shape
    // check would refuse the graph at open).
    let at = (0..bytes.len() - pattern.len())
        .filter(|&i| &bytes[i..i + pattern.len()] == pattern)
        .nth(1)
        .expect("the graph concatenates the KV cache along axis 2");
    bytes[at + pattern.len() - 1] = 3;
    amend_runtime::testutil::forge_graph_sidecar(&graph, &bytes).unwrap();
    let m = OrtModel::open(
        &model,
        OrtOptions {
            cache: OnnxCache::File(graph.clone()),
            ..opts
        },
    );
    // OpenVINO 1.24.1's checker lets the shape through (the CPU EP's does not).
    let m = m.expect("the OpenVINO EP opens the graph");
    let mut s = OrtSession::new(&m, 64).unwrap();
    let t = m.tokenize("hello world", true).unwrap();
    let e = s.generate_greedy(&t, 4).unwrap_err();
    assert!(e.to_string().contains("does not compute this model"), "{e}");
    // The session stays usable for what it can do: the next run is an error again, not a panic.
    assert!(s.generate_greedy(&t, 1).is_err());
}
