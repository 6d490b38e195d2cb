//! The contract of model-runtime: one async trait, [`ModelRuntime`], that every
//! local language-model engine implements, and the types around it.
//!
//! This crate owns:
//! - [`ModelRuntime`], the lifecycle and generation interface, with the semantics
//!   every backend honours documented on each method;
//! - the request, response, configuration and metadata types
//!   ([`InferenceRequest`], [`InferenceResponse`], [`RuntimeConfig`],
//!   [`RuntimeMetadata`]);
//! - [`ModelService`], what an HTTP front end serves: one runtime, an
//!   in-process engine or a gateway over many models, by the model a request
//!   names (and the [`Endpoint`] it came through);
//! - fill-in-the-middle as a token prompt every backend builds alike
//!   ([`FimTokens`], [`resolve_infill`]);
//! - [`Error`], one enum whose variants a caller can act on, and
//!   [`ErrorKind`], the one table of what each means (HTTP status, client or
//!   server fault, metric label);
//! - [`ModelFormat`] and detection of a model's format from its content;
//! - [`BackendOptions`]: how a backend's typed options travel in
//!   [`RuntimeConfig::extra_config`] and are read back strictly.
//!
//! It deliberately does not start processes, speak HTTP or run models: that is
//! the job of the backend crates (`runtime-llamacpp`, `runtime-vllm`,
//! `runtime-candle`), and the OpenAI wire format belongs to `runtime-openai`.
//! Library code that only *drives* a runtime depends on this crate alone; the
//! application picks the backends.
//!
//! # Example
//!
//! A program written against the trait works with any backend:
//!
//! ```
//! use futures::StreamExt;
//! use runtime_core::{InferenceRequest, ModelRuntime, Result, RuntimeConfig};
//!
//! async fn ask(mut runtime: Box<dyn ModelRuntime>, model: &str) -> Result<String> {
//!     runtime.initialize(RuntimeConfig::new(model)).await?;
//!     let request = InferenceRequest::from_prompt("What is the capital of France?")
//!         .with_max_tokens(32)
//!         .with_temperature(0.0);
//!
//!     // Streamed: deltas are whole UTF-8 characters.
//!     let mut stream = runtime.generate_stream(request.clone()).await?;
//!     let mut streamed = String::new();
//!     while let Some(delta) = stream.next().await {
//!         streamed.push_str(&delta?);
//!     }
//!
//!     // Or all at once; at temperature 0 both agree.
//!     let answer = runtime.generate(request).await?;
//!     assert_eq!(answer.content, streamed);
//!
//!     runtime.shutdown().await?;
//!     Ok(answer.content)
//! }
//! # fn main() { let _ = ask; }
//! ```
#![forbid(unsafe_code)]

mod config;
pub mod duration;
mod embed;
mod error;
mod format;
mod infill;
mod options;
mod request;
mod response;
mod runtime;
mod secret;
mod service;
mod tools;

pub use async_trait::async_trait;
pub use config::{
    DEFAULT_PARALLEL, DEFAULT_QUEUE, MAX_PARALLEL, MAX_QUEUE, MAX_SHUTDOWN_GRACE,
    MAX_STARTUP_TIMEOUT, MAX_THREADS, RuntimeConfig,
};
pub use embed::{
    EmbeddingInput, EmbeddingRequest, Embeddings, MAX_EMBEDDING_INPUTS, cosine_similarity,
    truncate_tokens,
};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use format::{ModelFormat, gguf_context_length, gguf_has_metadata, is_embedding_model};
pub use infill::{FIM_MARKERS, FimTokens, no_fim_tokens, resolve_infill};
pub use options::{BackendOptions, option_keys};
pub use request::{
    ChatMessage, InferenceRequest, MAX_CHOICES, MAX_PROMPT_TOKEN_IDS, MAX_STOP_BYTES,
    MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, Prompt, Role,
};
pub use response::{
    Capabilities, Choice, FinishReason, InferenceResponse, RuntimeMetadata, StreamEvent, Timings,
    Usage,
};
pub use runtime::{
    EventStream, ModelRuntime, TextStream, collect_events, ensure_finished, text_deltas,
};
pub use secret::ApiKey;
pub use service::{Endpoint, ModelCard, ModelService};
pub use tools::{
    MAX_TOOL_NAME, MAX_TOOLS, ResponseFormat, TokenLogprob, Tool, ToolCall, ToolCallDelta,
    ToolChoice, TopLogprob,
};
