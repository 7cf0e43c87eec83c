//! Arbitrary bytes as a manifest: postcard decoding and every semantic check (what runs after
//! the signature has verified, i.e. what a holder of a signing key could feed a device).
#![no_main]

use amend_edits::bundle::{check_manifest, decode_manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode_manifest(data) {
        let _ = check_manifest(&m, None);
        // Re-encoding what decoded must decode to the same thing.
        let again = postcard_roundtrip(&m);
        assert_eq!(again.as_ref(), Some(&m));
    }
});

fn postcard_roundtrip(m: &amend_edits::bundle::Manifest) -> Option<amend_edits::bundle::Manifest> {
    let bytes = amend_edits::bundle::encode_manifest(m).ok()?;
    decode_manifest(&bytes).ok()
}
