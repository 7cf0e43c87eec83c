//! Arbitrary bytes through the whole reader: header, signature, manifest, sections, views.
//! The seeds are valid bundles signed with the test key [1; 32], so mutations that keep the
//! signature valid (none, practically) and those that do not both get exercised; the manifest
//! decoder target covers the signed-content paths.
#![no_main]

use amend_edits::bundle::{AlignedBuf, Bundle};
use amend_edits::ed25519_dalek::SigningKey;
use amend_edits::keys::TrustStore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trust = TrustStore::with_key(SigningKey::from_bytes(&[1; 32]).verifying_key());
    let buf = AlignedBuf::from_slice(data);
    if let Ok(b) = Bundle::open(buf, &trust) {
        for p in 0..b.payloads().len() {
            let n = b.units(p);
            let _ = b.codebook(p, 0..n);
            let _ = b.patch_neurons(p, 0..n);
            let _ = b.memory(p, 0..n);
            let _ = b.low_rank(p, |_| true);
            let _ = b.gguf_lora(p);
        }
    }
});
