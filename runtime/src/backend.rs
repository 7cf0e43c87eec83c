//! The backend seam: what generation and the edit layer need from an engine that runs a model. Two engines implement it: llama.cpp ([`crate::Session`]) and ONNX Runtime
//! ([`crate::onnxruntime::OrtSession`]). Tokenization is llama.cpp's on both (the ONNX Runtime
//! backend loads the same file vocabulary-only), and so is sampling (the same sampler chain,
//! applied to each backend's logits).

use std::ops::ControlFlow;
use std::sync::Arc;

use amend_edits::EditSet;

use crate::editing::{Explain, Request};
use crate::error::RuntimeError;
use crate::generate::Sampler;
use crate::generate::{GenerateOutput, GenerateParams, TokenEvent};
use crate::model::Model;
use crate::scope::ScopeModel;
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
    /// The id bundles' verification records name this backend by: `llama.cpp`,
    /// `onnxruntime-1.24.1:openvino:CPU/g7-cpu`: the ONNX Runtime release, EP and device, and
    /// the graph's version and profile (`OrtOptions::backend_id`; see `check_verified`).
    fn backend_id(&self) -> String;
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

    /// Attaches a live edit set: each later request pins its current snapshot (`None`: the
    /// base model). The edit layer above the seam (`editing`) is shared by both backends.
    fn set_edit_set(&mut self, set: Option<Arc<EditSet>>) -> Result<(), RuntimeError>;
    /// The scope model that routes scope-model memories.
    fn set_scope_model(&mut self, scope: Option<Arc<ScopeModel>>) -> Result<(), RuntimeError>;
    fn scope_model(&self) -> Option<&Arc<ScopeModel>>;
    /// Scales bundle `bundle_id`'s low-rank adapters (`Session::set_lora_scale`).
    fn set_lora_scale(&mut self, bundle_id: &str, scale: f32) -> Result<(), RuntimeError>;
    /// Starts a request: pins the snapshot, routes `prompt` through the memories, applies the
    /// edits to the evaluations that follow.
    fn begin_request(&mut self, prompt: &str) -> Result<Request, RuntimeError>;
    /// What fired during the last request.
    fn explain(&self) -> Explain;
    /// Generates from a text prompt as a request (edits pinned, the prompt routed).
    fn generate_text(
        &mut self,
        prompt: &str,
        params: &GenerateParams,
        on_token: &mut dyn FnMut(&TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<GenerateOutput, RuntimeError>;

    fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<Token>, RuntimeError> {
        self.vocab().tokenize(text, add_bos)
    }

    fn detokenize(&self, tokens: &[Token]) -> Result<String, RuntimeError> {
        self.vocab().detokenize(tokens)
    }
}
