//! amend engine: runs GGUF models on llama.cpp (CPU) with per-layer hooks.
//!
//! - [`Model`]: a validated, loaded GGUF model (shared, `Send + Sync`, behind `Arc`).
//! - [`Session`]: one context (KV cache, logits) per conversation/thread; tokenize, evaluate,
//!   read logits for any position, generate with sampling, stop strings, streaming and
//!   cancellation.
//! - [`Hook`]: read or modify hidden states at a [`HookPoint`] (layer + [`Site`]) during
//!   decode; each architecture maps sites to llama.cpp graph node names ([`Architecture`]).
//!
//! See docs/runtime.md for the concepts and threading rules.

pub mod answer;
mod arch;
pub mod backend;
pub mod bench;
mod config;
mod detok;
mod editing;
mod error;
mod generate;
mod hooks;
mod model;
pub mod onnxruntime;
pub mod parity;
pub mod reference;
mod scope;
mod session;
/// Test scaffolding (a tiny GGUF writer) for this workspace's tests: not public API, compiled
/// only for tests and with the `testutil` feature their dev-dependencies enable.
#[cfg(any(test, feature = "testutil"))]
#[doc(hidden)]
pub mod testutil;
mod threads;

pub use amend_edits::{HookPoint, Site};
pub use answer::{continuation, prompt_answer_tokens, AnswerPlan};
pub use arch::{ArchSpec, Architecture, Forward, SiteNode};
pub use backend::{Backend, Capability};
pub use config::{ConfigError, ModelConfig};
pub use detok::Detokenizer;
pub use editing::{
    check_scope_model, check_verified, CodebookEvent, ExpiredEvent, Explain, LowRankEvent,
    MemoryEvent, NeuronEvent, Request, ScopeTerms, UnverifiedEvent, LLAMA_CPP_BACKEND_ID,
    LLAMA_CPP_SYS_VERSION,
};
pub use error::{Result, RuntimeError};
pub use generate::{
    generate_with, GenerateOutput, GenerateParams, Sampler, StopReason, Timings, TokenEvent,
    FLUSH_TOKEN, MIN_TEMPERATURE,
};
pub use hooks::{FnHook, Hook, HookId, HookRows, Phase, RowInfo};
pub use model::{init_backend, Model, ModelInfo, ModelOptions};
pub use scope::{
    default_path as default_scope_model_path, RouteQuery, ScopeEncoding, ScopeModel,
    DEFAULT_SCOPE_THREADS, MAX_TOKENS as SCOPE_MAX_TOKENS,
};
pub use session::{
    CancelHandle, EvalOptions, Logits, Session, SessionOptions, MAX_N_CTX, MAX_THREADS,
};

/// A token id.
pub type Token = i32;

// Compile-time checks of the threading contract documented in docs/runtime.md.
const _: () = {
    const fn send<T: Send>() {}
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Model>();
    send_sync::<std::sync::Arc<Model>>();
    send::<Session>();
    send_sync::<CancelHandle>();
    send::<Box<dyn Hook>>();
};
