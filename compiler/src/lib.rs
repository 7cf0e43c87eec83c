//! amend compiler: trains edits on the quantized model (candle), evaluates them on the runtime,
//! and locates knowledge (causal tracing).

// `!(x > 0.0)` is how this crate rejects NaN together with out-of-range values (hyperparameters,
// degenerate keys): the negation is the point.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

// Edit requests (KnowEdit/EasyEdit JSON, JSONL) and the KnowEdit metrics.
pub mod dataset;
pub mod metrics;
// Evaluation on the deployed model and causal tracing (runtime-based).
pub mod eval;
pub mod locate;

// The compiler: a differentiable forward of the GGUF model and the editing methods.
pub mod checkpoint;
pub mod error;
pub mod forward;
pub mod hparams;
pub mod linalg;
pub mod methods;
// The scope model (all-MiniLM-L6-v2) converted to a llama.cpp GGUF.
pub mod scope_model;
// Tuning the scope model (LoRA on its top layers, contrastive).
pub mod scope_tune;
// Shipped trained files: deterministic bytes, their recipe in the metadata.
pub mod artifact;

pub use error::CompileError;
pub use hparams::Hparams;
pub use methods::{BundleIdentity, CompileOutput, Compiler, EditReport, Method, Progress};
