//! MEMIT on the real gemma3 model: compile a batch of dev edits over the default layer window,
//! apply the signed bundle through the runtime's edit set (llama.cpp LoRA adapters), measure
//! teacher-forced edit success, rephrases, locality and unrelated prompts, then roll one edit
//! back and check that the others still hold. `AMEND_MEMIT_N` sets how many dev edits
//! (default 8; `all` for every record), `AMEND_MEMIT_LAYER` the window's top layer,
//! `AMEND_MEMIT_SET` extra `section.key=value` overrides separated by `;`.

mod common;

use amend_compiler::Method;
use amend_edits::families::inspect_gguf_lora;

#[test]
fn memit_edits_gemma3_through_the_runtime() {
    let Some(common::Compiled {
        path,
        records,
        compiler: c,
        hp,
        layer,
        out,
        ..
    }) = common::compile_dev("MEMIT", 8, Method::Memit)
    else {
        return;
    };
    let n = records.len();

    // The GGUF-LoRA file: one rank-n tensor per edited down projection.
    let layers = hp.memit.layers.len();
    let info =
        inspect_gguf_lora(out.gguf_lora.as_ref().expect("memit writes a GGUF-LoRA")).unwrap();
    assert_eq!(info.architecture, "gemma3");
    assert_eq!(info.tensors.len(), layers);
    assert!(info.tensors.iter().all(|t| t.rank as usize == n));

    let mut applied = common::apply_bundle(&out.builder, &path, c.runtime.clone());
    assert_eq!(applied.edits, n);
    let m = common::measure(&mut applied, &records);
    assert_eq!(m.low_rank_installed, n, "every edit's adapter is installed");
    let median = common::median_seconds(&out.reports);
    let unrelated_n = common::UNRELATED.len();
    eprintln!(
        "MEMIT gemma3 layers {:?} (top {:?}): {n} edits, edit success {}/{n} on the runtime (candle: {}), rephrase {}/{}, locality {}/{} tokens, unrelated next token unchanged {}/{unrelated_n}, median {:.2} s/edit",
        hp.memit.layers,
        layer,
        m.succ,
        common::trained_successes(&out.reports),
        m.reph,
        m.reph_n,
        m.loc_same,
        m.loc_n,
        m.unrelated_same,
        median,
    );
    common::print_reports(&out.reports);
    assert!(
        m.succ as f64 >= 0.9 * n as f64,
        "edit success {}/{n}",
        m.succ
    );
    assert!(
        m.unrelated_same as f64 >= 0.8 * unrelated_n as f64,
        "unrelated prompts changed: {}/{unrelated_n} unchanged",
        m.unrelated_same
    );
    // Same-relation probes leak ("The capital of Italy is" after editing France's capital), as
    // for ROME: measured 9/17 tokens unchanged on the default 8 edits with the default window
    // 3..=6 (5/17 with 4..=6, 4/17 with 5..=7); asserted at 30%.
    assert!(
        m.loc_same as f64 >= 0.3 * m.loc_n as f64,
        "locality {}/{} tokens",
        m.loc_same,
        m.loc_n
    );

    // Roll the first edit back: its adapters go, the others stay and still hold.
    let gone = &records[0];
    applied.set.rollback_edit(&gone.id).unwrap();
    let rt = applied.rt.clone();
    let kept = records[1..]
        .iter()
        .filter(|r| common::edit_succeeds(&rt, &mut applied.edited, r))
        .count();
    let rank: usize = applied
        .edited
        .explain()
        .low_rank
        .iter()
        .map(|e| e.rank)
        .sum();
    assert_eq!(
        rank,
        n - 1,
        "the rolled-back edit's rank-one terms are gone"
    );
    let before: usize = records[1..]
        .iter()
        .filter(|r| !m.failed.contains(&r.id))
        .count();
    eprintln!(
        "after rolling back {}: {kept}/{} of the others hold (before: {before})",
        gone.id,
        n - 1
    );
    // Measured: all 7 still hold. One may flip, since the batch was solved together (each
    // edit's update was computed with the others' keys in the covariance).
    assert!(
        kept + 1 >= before,
        "rollback of one edit broke others: {kept} of {before} hold"
    );
    assert!(
        !common::edit_succeeds(&rt, &mut applied.edited, gone),
        "the rolled-back edit {} still reaches its target",
        gone.id
    );
    assert!(median <= 60.0, "median {median:.1} s/edit");
}
