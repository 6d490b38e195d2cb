//! The lifecycle of a model engine that is a server process speaking the
//! OpenAI API.
//!
//! This crate owns [`ManagedServer`], a complete
//! [`ModelRuntime`](runtime_core::ModelRuntime) over any such engine, written
//! once for every server backend: the order of validation (configuration,
//! typed options, model, binary, its version), choosing a port and retrying on
//! a conflict, the per-instance API key, readiness, turning a broken connection
//! into the engine's exit with its last log lines, and stopping the whole
//! process group. A backend describes its engine with a [`ServerEngine`] and a
//! [`LaunchSpec`] becomes its command line.
//!
//! It does not supervise processes itself (`runtime-process`), speak HTTP
//! (`runtime-openai`), or know any particular engine (`runtime-llamacpp`,
//! `runtime-vllm`).
//!
//! ```no_run
//! use runtime_core::{ModelRuntime, RuntimeConfig};
//! use runtime_managed::{ManagedServer, ServerEngine};
//!
//! // A backend exposes `ManagedServer<ItsEngine>` as its runtime type.
//! async fn start<E: ServerEngine + Default>(model: &str) -> runtime_core::Result<ManagedServer<E>> {
//!     let mut runtime = ManagedServer::<E>::new();
//!     runtime.initialize(RuntimeConfig::new(model)).await?;
//!     Ok(runtime)
//! }
//! ```
#![forbid(unsafe_code)]

mod engine;
mod front;
mod managed;

pub use engine::{LaunchSpec, ServerEngine};
pub use managed::ManagedServer;
/// What an engine does for tools and schemas ([`ServerEngine::structured`]).
pub use runtime_structured::{Enforcer, Support};
