//! Arbitrary bytes through the one GGUF parser and every check a model file gets before
//! llama.cpp or the ONNX graph builder sees it (structure, hyperparameters, vocabulary, tensor
//! types and shapes, every tensor's floats finite), and through the GGUF-LoRA reader a bundle's low-rank payload goes through.
//! The seeds are tiny llama/qwen3 models (Q4_0, Q8_0 layers) and a rank-1 GGUF-LoRA.
#![no_main]

use amend_edits::bundle::AlignedBuf;
use amend_edits::families::{inspect_gguf_lora, LowRank};
use amend_edits::gguf::{GgufFile, ModelHparams};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::parse(data) {
        if let Ok(hp) = ModelHparams::from_header(&f) {
            let _ = hp.hash_bytes();
        }
        for t in &f.tensors {
            let _ = f.data_of(t);
        }
        let _ = f.check_finite();
    }
    let _ = inspect_gguf_lora(data);
    let buf = AlignedBuf::from_slice(data);
    let _ = LowRank::from_gguf_blob(buf.as_slice());
});
