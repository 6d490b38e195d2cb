//! Run a language model locally, whatever the engine.
//!
//! This is the crate most programs depend on. It owns:
//! - the re-export of the contract, [`ModelRuntime`] and its types (from
//!   `runtime-core`), at the top of this crate;
//! - every backend, behind a cargo feature of the same name (all on by
//!   default): [`llamacpp`] (llama.cpp's `llama-server`), [`vllm`] (vLLM's
//!   OpenAI server), [`candle`] (the embedded engine, no binary to install),
//!   [`remote`] (a server run elsewhere);
//! - choosing the backend for a model: [`Backend`], [`BackendChoice`],
//!   [`choose`], and [`start`], which chooses and initializes in one call;
//!   [`survey`] says which backends are usable on this machine.
//!
//! It runs no engine of its own and serves no HTTP: serving many models
//! behind one endpoint is `runtime-gateway`, which builds on this crate; the
//! HTTP protocols are `runtime-openai`. Programs that want less depend on
//! `runtime-core` and the one backend crate they use.
//!
//! # Example
//!
//! The backend that suits the model: llama.cpp for a GGUF when
//! `llama-server` is installed, vLLM for a Hugging Face directory when vLLM
//! is, the embedded candle engine otherwise.
//!
//! ```no_run
//! use model_runtime::{InferenceRequest, RuntimeConfig};
//!
//! # async fn demo() -> model_runtime::Result<()> {
//! let config = RuntimeConfig::new("SmolLM2-135M-Instruct.Q4_1.gguf");
//! let (mut runtime, backend) = model_runtime::start(config).await?;
//! let request = InferenceRequest::from_prompt("What is the capital of France?");
//! let answer = runtime.generate(request).await?;
//! println!("{backend} says: {}", answer.content);
//! runtime.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! A backend by name, through its own type:
//!
//! ```no_run
//! # #[cfg(feature = "candle")]
//! # async fn demo() -> model_runtime::Result<()> {
//! use model_runtime::candle::CandleRuntime;
//! use model_runtime::{ModelRuntime, RuntimeConfig};
//!
//! let mut runtime = CandleRuntime::new();
//! runtime.initialize(RuntimeConfig::new("SmolLM2-135M-Instruct.Q4_1.gguf")).await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod survey;

pub use backend::{Backend, BackendChoice, choose, is_url, start};
pub use runtime_core::*;
pub use survey::{BackendReport, survey};

/// llama.cpp's `llama-server` (and its RPC workers): `runtime-llamacpp`.
#[cfg(feature = "llamacpp")]
#[cfg_attr(docsrs, doc(cfg(feature = "llamacpp")))]
pub use runtime_llamacpp as llamacpp;

/// vLLM's OpenAI server (and its headless ranks): `runtime-vllm`.
#[cfg(feature = "vllm")]
#[cfg_attr(docsrs, doc(cfg(feature = "vllm")))]
pub use runtime_vllm as vllm;

/// The embedded candle engine: `runtime-candle`.
#[cfg(feature = "candle")]
#[cfg_attr(docsrs, doc(cfg(feature = "candle")))]
pub use runtime_candle as candle;

/// An OpenAI-compatible server run elsewhere: `runtime-remote`.
#[cfg(feature = "remote")]
#[cfg_attr(docsrs, doc(cfg(feature = "remote")))]
pub use runtime_remote as remote;
