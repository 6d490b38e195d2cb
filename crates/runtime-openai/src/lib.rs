//! OpenAI-compatible HTTP for model-runtime.
//!
//! This crate owns the HTTP side of server backends, written once:
//! - [`OpenAiClient`]: chat completions (plain and streamed), health, arbitrary
//!   JSON endpoints; connect and idle timeouts, never a whole-request timeout, so
//!   a long generation is not cut;
//! - [`SseDecoder`]: a byte-level server-sent-events decoder (LF, CR and CRLF line
//!   ends, multi-line data, comments, events and UTF-8 characters split across
//!   network chunks);
//! - with the `managed` feature, [`ManagedServer`]: a complete
//!   [`ModelRuntime`](runtime_core::ModelRuntime) over any engine that runs as an
//!   OpenAI-compatible server process, described by a [`ServerEngine`];
//! - with the `server` feature, [`router`]: an axum router serving any runtime
//!   (or any [`ChatService`]) over the same API, used by the in-process candle
//!   backend and by `model-runtime serve`.
//!
//! It does not start processes itself (that is `runtime-process`) and knows no
//! particular engine (those are the backend crates).
#![forbid(unsafe_code)]

mod client;
mod key;
#[cfg(feature = "managed")]
mod managed;
#[cfg(feature = "server")]
mod server;
mod sse;

pub use client::{ClientTimeouts, OpenAiClient};
pub use key::random_api_key;
#[cfg(feature = "managed")]
pub use managed::{Launch, ManagedServer, ServerEngine};
#[cfg(feature = "server")]
pub use server::{ApiError, ChatService, ServeOptions, router};
pub use sse::{SseDecoder, SseEvent};
