//! ROME on the real gemma3 model: compile dev edits, apply the signed bundle through the
//! runtime's edit set (llama.cpp LoRA adapters), and measure teacher-forced edit success,
//! rephrase success, locality (argmax tokens unchanged vs the base model) and time per edit.
//! `AMEND_ROME_N` sets how many dev edits (default 6; `all` for every record),
//! `AMEND_ROME_LAYER` the layer, `AMEND_ROME_SET` extra `section.key=value` overrides
//! separated by `;`.

mod common;

use amend_compiler::Method;
use amend_edits::families::inspect_gguf_lora;

#[test]
fn rome_edits_gemma3_through_the_runtime() {
    let Some(common::Compiled {
        path,
        records,
        compiler: c,
        hp,
        layer,
        out,
        ..
    }) = common::compile_dev("ROME", 6, Method::Rome)
    else {
        return;
    };
    let n = records.len();

    // The GGUF-LoRA file: one rank-n tensor on the edited down projection.
    let lora = out
        .gguf_lora
        .as_ref()
        .expect("rome writes a GGUF-LoRA file");
    let info = inspect_gguf_lora(lora).unwrap();
    assert_eq!(info.architecture, "gemma3");
    assert_eq!(info.tensors.len(), 1);
    assert_eq!(info.tensors[0].rank as usize, n);

    let mut applied = common::apply_bundle(&out.builder, &path, c.runtime.clone());
    assert_eq!(applied.edits, n);
    let common::Measured {
        succ,
        reph,
        reph_n,
        loc_same,
        loc_n,
        unrelated_same,
        low_rank_installed,
        ..
    } = common::measure(&mut applied, &records);
    assert_eq!(low_rank_installed, n, "every edit's adapter is installed");
    let unrelated_n = common::UNRELATED.len();
    let median = common::median_seconds(&out.reports);
    eprintln!(
        "ROME gemma3 layer {:?}: {n} edits, edit success {succ}/{n} on the runtime (candle: {}), rephrase {reph}/{reph_n}, locality {loc_same}/{loc_n} tokens, unrelated next token unchanged {unrelated_same}/{}, median {:.2} s/edit",
        layer.unwrap_or(hp.rome.layer),
        common::trained_successes(&out.reports),
        unrelated_n,
        median,
    );
    common::print_reports(&out.reports);
    assert!(succ as f64 >= 0.8 * n as f64, "edit success {succ}/{n}");
    // Locality on the same relation ("The capital of Italy is" after editing France's capital)
    // is ROME's known weakness and is reported, not asserted; unrelated prompts must hold.
    assert!(
        unrelated_same as f64 >= 0.8 * unrelated_n as f64,
        "unrelated prompts changed: {unrelated_same}/{} unchanged",
        unrelated_n
    );
    assert!(median <= 30.0, "median {median:.1} s/edit");
}
