//! The LoRA (FT-L) baseline on the real gemma3 model: compile dev edits, apply the signed bundle through the
//! runtime's edit set (llama.cpp LoRA adapters), and measure teacher-forced edit success,
//! rephrase success, locality (argmax tokens unchanged vs the base model) and time per edit.
//! `AMEND_LORA_N` sets how many dev edits (default 4; `all` for every record),
//! `AMEND_LORA_LAYER` the layer, `AMEND_LORA_SET` extra `section.key=value` overrides
//! separated by `;`.

mod common;

use amend_compiler::Method;
use amend_edits::families::inspect_gguf_lora;

#[test]
fn lora_edits_gemma3_through_the_runtime() {
    let Some(common::Compiled {
        path,
        records,
        compiler: c,
        hp,
        layer,
        out,
        ..
    }) = common::compile_dev("LORA", 4, Method::Lora)
    else {
        return;
    };
    let n = records.len();

    // The GGUF-LoRA file: one rank-n tensor on the edited down projection.
    let lora = out
        .gguf_lora
        .as_ref()
        .expect("lora writes a GGUF-LoRA file");
    let info = inspect_gguf_lora(lora).unwrap();
    assert_eq!(info.architecture, "gemma3");
    assert_eq!(info.tensors.len(), 1);
    assert_eq!(info.tensors[0].rank as usize, n * hp.lora.rank);

    let mut applied = common::apply_bundle(&out.builder, &path, c.runtime.clone());
    assert_eq!(applied.edits, n);
    let common::Measured {
        succ,
        reph,
        reph_n,
        loc_same,
        loc_n,
        unrelated_same,
        edit_ok,
        low_rank,
        ..
    } = common::measure(&mut applied, &records);
    assert!(
        low_rank.iter().all(|&l| l == n * hp.lora.rank),
        "every edit's delta is installed (merged rank): {low_rank:?}"
    );
    let last_ok = edit_ok.last() == Some(&true);
    let unrelated_n = common::UNRELATED.len();
    let median = common::median_seconds(&out.reports);
    eprintln!(
        "LoRA (FT-L) gemma3 layer {:?}: {n} edits, edit success {succ}/{n} on the runtime (candle: {}), rephrase {reph}/{reph_n}, locality {loc_same}/{loc_n} tokens, unrelated next token unchanged {unrelated_same}/{}, median {:.2} s/edit",
        layer.unwrap_or(hp.lora.layer),
        common::trained_successes(&out.reports),
        unrelated_n,
        median,
    );
    common::print_reports(&out.reports);
    // FT-L is the baseline that forgets: sequential LoRA edits of one relation override each
    // other (measured: 1/4 earlier edits survive). Each edit must reach its target when trained
    // and the most recent one must hold on the runtime (training and device agree).
    assert!(
        out.reports.iter().all(|r| r.success),
        "an edit did not reach its target in training"
    );
    assert!(last_ok, "the most recent edit does not hold on the runtime");
    assert!(
        unrelated_same as f64 >= 0.6 * unrelated_n as f64,
        "unrelated prompts changed: {unrelated_same}/{unrelated_n} unchanged"
    );
    assert!(median <= 30.0, "median {median:.1} s/edit");
}
