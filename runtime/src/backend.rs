//! The backend seam: what generation (and, next, the edit layer; issue 14) needs from an engine
//! that runs a model. Two engines implement it: llama.cpp ([`crate::Session`]) and ONNX Runtime
//! ([`crate::onnxruntime::OrtSession`]). Tokenization is llama.cpp's on both (the ONNX Runtime
//! backend loads the same file vocabulary-only), and so is sampling (the same sampler chain,
//! applied to each backend's logits).

use std::sync::Arc;

use crate::error::RuntimeError;
use crate::generate::Sampler;
use crate::model::Model;
use crate::session::EvalOptions;
use crate::Token;

/// A capability a backend may lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Reading and rewriting rows at hook sites during evaluation (codebooks, neurons).
    HookRows,
    /// Low-rank weight deltas (LoRA, ROME, MEMIT).
    LowRank,
    /// Retrieval memories (routing happens on the host; the answer path needs the prompt).
    Memory,
}

/// An engine that evaluates tokens and keeps a KV cache.
pub trait Backend {
    /// For logs and errors: `llama.cpp`, `onnxruntime (openvino:CPU)`.
    fn backend_name(&self) -> String;
    /// The llama.cpp vocabulary every backend tokenizes with.
    fn vocab(&self) -> &Arc<Model>;
    fn n_ctx(&self) -> usize;
    fn n_past(&self) -> usize;
    fn kv_clear(&mut self) -> Result<(), RuntimeError>;
    fn kv_truncate(&mut self, keep: usize) -> Result<(), RuntimeError>;
    /// Evaluates `tokens` at the next positions.
    fn eval(&mut self, tokens: &[Token], options: EvalOptions) -> Result<(), RuntimeError>;
    /// Logits at index `i` of the last evaluated tokens.
    fn logits(&self, i: usize) -> Result<&[f32], RuntimeError>;
    fn last_logits(&self) -> Result<&[f32], RuntimeError>;
    /// Draws the next token from the last logits with `sampler` (which then accepts it).
    fn sample(&mut self, sampler: &Sampler) -> Result<Token, RuntimeError>;
    /// A pending cancellation request, consumed.
    fn take_cancel(&mut self) -> bool;
    fn supports(&self, capability: Capability) -> bool;

    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<Token>, RuntimeError> {
        self.vocab().tokenize(text, add_bos)
    }

    fn detokenize(&self, tokens: &[Token]) -> Result<String, RuntimeError> {
        self.vocab().detokenize(tokens)
    }
}
