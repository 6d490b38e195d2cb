//! A gateway over model runtimes: [`RuntimeManager`] owns the runtime that
//! serves requests and swaps it for another while requests keep flowing; the
//! backend for a model is chosen by [`choose`].
//!
//! This crate owns running runtimes on behalf of an application: which backend
//! takes a model ([`Backend`], [`BackendChoice`]), what is usable on this
//! machine ([`survey`]), and the runtime's life behind a server (hot swap,
//! draining). It serves HTTP through `runtime-openai`'s router ([`RuntimeManager`]
//! is a [`ChatService`](runtime_openai::ChatService)), and does not parse
//! command lines: that is the `model-runtime` binary in `runtime-cli`.
//!
//! Each backend is a cargo feature (`llamacpp`, `vllm`, `candle`; all on by
//! default), so an application that fronts only server engines compiles no
//! candle.
//!
//! ```no_run
//! use std::sync::Arc;
//! use runtime_core::RuntimeConfig;
//! use runtime_gateway::{BackendChoice, RuntimeManager, factory};
//! use runtime_openai::{ChatService, ServeOptions, router};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let manager = Arc::new(RuntimeManager::new(factory(BackendChoice::Auto)));
//! manager.hot_swap(RuntimeConfig::new("SmolLM2-135M-Instruct.Q4_1.gguf")).await?;
//! let app = router(manager.clone() as Arc<dyn ChatService>, ServeOptions::new("smollm2"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backends;
mod manager;
mod served;

pub use backends::{Backend, BackendChoice, BackendReport, choose, factory, survey};
pub use manager::{DEFAULT_DRAIN_TIMEOUT, RuntimeFactory, RuntimeManager};
