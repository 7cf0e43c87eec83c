//! `amend_session_set_lora_scale` on the tiny model: scale 0 gives back the base model's
//! score bitwise, 1 the edited one; a scale out of range, NaN, a NULL or unknown id is refused
//! with its result code and leaves the scale in use as it was.

use std::ffi::CString;
use std::ptr;

use amend::*;

#[path = "common/util.rs"]
mod util;
use util::last_error;

/// The score of " x" after "hello" (the bits of `logprob_sum`).
fn score_bits(s: *mut amend_session) -> u64 {
    let (prompt, target) = ("hello", " x");
    let mut out = amend_score {
        n_target_tokens: 0,
        logprob_sum: 0.0,
        logprob_mean: 0.0,
        n_argmax_match: 0,
    };
    let r = amend_session_score(
        s,
        prompt.as_ptr() as *const _,
        prompt.len(),
        target.as_ptr() as *const _,
        target.len(),
        &mut out,
    );
    assert_eq!(r, amend_result::AMEND_OK, "{}", last_error());
    out.logprob_sum.to_bits()
}

/// A signed rank-one delta on layer 0's FFN down-projection, bundle id `lr`.
fn lora_bundle(key: &amend_edits::ed25519_dalek::SigningKey) -> Vec<u8> {
    use amend_edits::families::LowRankTensor;
    use amend_edits::Site;
    let (u, v) = amend_runtime::testutil::rank_one_ffn_down_factors();
    let mut b = amend_edits::BundleBuilder::new(amend_edits::BundleMeta {
        bundle_id: "lr".into(),
        channel: "lr".into(),
        version: 1,
        created: 0,
        not_before: 0,
        expires: u64::MAX,
        model: amend_edits::fingerprint::model_binding(util::tiny_model_path("lora")).unwrap(),
    });
    let p = b.add_low_rank(&[LowRankTensor::rank_one("blk.0.ffn_down.weight", &u, &v)]);
    b.add_edit("rank1", 0, Site::FfnOutput, "hello", " x", p, 0, 1);
    b.build_signed(key).unwrap().as_slice().to_vec()
}

#[test]
fn set_lora_scale_scales_the_adapter_and_refuses_bad_arguments() {
    let m = util::open_tiny_model("lora");
    let s = util::open_session(m);
    let id = CString::new("lr").unwrap();
    // No bundle active yet: the id is unknown.
    assert_eq!(
        amend_session_set_lora_scale(s, id.as_ptr(), 0.5),
        amend_result::AMEND_ERR_NOT_FOUND
    );
    let base = score_bits(s);

    let key = amend_edits::ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let trust = util::trust_store(&key);
    let b = util::load_bundle(trust, m, &lora_bundle(&key));
    assert_eq!(amend_session_activate(s, b), amend_result::AMEND_OK);
    let edited = score_bits(s);
    assert_ne!(edited, base, "the adapter changes the score");

    assert_eq!(
        amend_session_set_lora_scale(s, id.as_ptr(), 0.0),
        amend_result::AMEND_OK,
        "{}",
        last_error()
    );
    assert_eq!(score_bits(s), base, "scale 0 is the base model, bitwise");

    // Refusals leave scale 0 in place.
    for bad in [1e30, -1e30, 100.5, f32::INFINITY, f32::NAN] {
        assert_eq!(
            amend_session_set_lora_scale(s, id.as_ptr(), bad),
            amend_result::AMEND_ERR_INVALID_ARGUMENT,
            "{bad}"
        );
        let msg = last_error();
        assert!(msg.contains("LoRA scale") && msg.contains("100"), "{msg}");
    }
    assert_eq!(
        amend_session_set_lora_scale(s, ptr::null(), 1.0),
        amend_result::AMEND_ERR_NULL_ARGUMENT
    );
    assert!(last_error().contains("bundle_id"), "{}", last_error());
    assert_eq!(
        amend_session_set_lora_scale(ptr::null_mut(), id.as_ptr(), 1.0),
        amend_result::AMEND_ERR_NULL_ARGUMENT
    );
    let bad_utf8 = c"\xff";
    assert_eq!(
        amend_session_set_lora_scale(s, bad_utf8.as_ptr(), 1.0),
        amend_result::AMEND_ERR_INVALID_UTF8
    );
    let other = CString::new("no-such-bundle").unwrap();
    assert_eq!(
        amend_session_set_lora_scale(s, other.as_ptr(), 1.0),
        amend_result::AMEND_ERR_NOT_FOUND
    );
    assert!(last_error().contains("no-such-bundle"), "{}", last_error());
    assert_eq!(score_bits(s), base, "the refusals changed the scale");

    assert_eq!(
        amend_session_set_lora_scale(s, id.as_ptr(), 1.0),
        amend_result::AMEND_OK
    );
    assert_eq!(score_bits(s), edited, "scale 1 is the adapter as compiled");

    amend_bundle_free(b);
    amend_trust_store_free(trust);
    amend_session_free(s);
    amend_model_free(m);
}
