//! Many models behind one OpenAI endpoint: [`RuntimeManager`] owns the
//! runtimes of a gateway, as configured by a [`GatewayConfig`] (a
//! `models.toml`).
//!
//! This crate owns running runtimes on behalf of an application:
//! - routing a request to its model by the name (or alias) it sends, with a
//!   404 listing what exists for an unknown one;
//! - starting a model's engine on its first request (one start however many
//!   requests wait for it), unloading it after its `ttl` without requests,
//!   and evicting the least recently used idle model when a start would pass
//!   `max_loaded` or the memory budget (measured resident memory of each
//!   engine);
//! - per model, at most `parallel` requests in the engine and `queue` waiting
//!   (past that, 429 with `Retry-After`);
//! - restarting an engine that crashed or hangs, with backoff (at once for
//!   `preload` models), and counting it;
//! - swapping a model's runtime while requests keep flowing
//!   ([`RuntimeManager::reload`], [`RuntimeManager::hot_swap`]);
//! - metrics in the Prometheus format, a status report, the engines' recent
//!   log lines.
//!
//! It speaks no HTTP: [`RuntimeManager`] is a
//! [`ModelService`](runtime_core::ModelService), which `runtime-openai`'s
//! router serves. It parses no command line (that is the `model-runtime`
//! binary in `runtime-cli`), and it does not choose backends itself: that is
//! `model-runtime`'s [`choose`](model_runtime::choose). Each backend is a
//! cargo feature (`llamacpp`, `vllm`, `candle`, `remote`; all on by default),
//! so an application that fronts only server engines compiles no candle.
//!
//! ```no_run
//! use std::sync::Arc;
//! use runtime_gateway::{GatewayConfig, RuntimeManager};
//! use runtime_core::ModelService;
//! use runtime_openai::{ServeLimits, ServeOptions, router, serve};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = GatewayConfig::from_file("models.toml".as_ref())?;
//! let manager = RuntimeManager::new(config.clone())?;
//! let app = router(manager.clone() as Arc<dyn ModelService>, ServeOptions::new("gateway"));
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! serve(listener, app, ServeLimits::default(), std::future::pending()).await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod manager;
mod metrics;
mod served;

pub use config::{GatewayConfig, MAX_LOADED, MAX_WAIT, ModelSpec};
pub use manager::{ModelStatus, RuntimeFactory, RuntimeManager};
