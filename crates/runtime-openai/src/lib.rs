//! The protocols on the wire for model-runtime, written once.
//!
//! This crate owns:
//! - [`wire`]: the chat-completions request, response, chunk and error types
//!   as engines really send them, and their mapping to `runtime-core`'s types;
//! - [`responses`] and [`anthropic`]: OpenAI's Responses API and Anthropic's
//!   Messages API, mapped onto the same chat types, with encoders that turn
//!   a chat event stream into their event sequences, and the bounded store
//!   of responses kept for `previous_response_id`;
//! - [`SseDecoder`]: a byte-level server-sent-events decoder (LF, CR and CRLF
//!   line ends, multi-line data, comments, events and UTF-8 characters split
//!   across network chunks);
//! - [`OpenAiClient`]: chat completions (plain and streamed), health and
//!   arbitrary JSON endpoints of an engine, with connect and idle timeouts,
//!   never a whole-request timeout that would cut a long generation, and a
//!   [`Heartbeat`] that fails requests to a hung engine while leaving a slow
//!   one alone;
//! - with the `server` feature, [`router`]: an axum router serving any
//!   [`ModelService`](runtime_core::ModelService) (every
//!   [`ModelRuntime`](runtime_core::ModelRuntime) is one) over all three, hardened for a local server (key, `Host` and content-type
//!   checks, generic 5xx bodies), and [`serve`], which runs it with a
//!   header-read timeout, a connection cap and a graceful drain; used by the
//!   in-process candle backend and by the gateway.
//!
//! It does not start processes (`runtime-process`), manage an engine's
//! lifecycle (`runtime-managed`) or know any particular engine. The router is
//! behind a feature because it is the only part that needs an HTTP server
//! (axum): a program that only drives a server backend compiles none.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod anthropic;
mod client;
pub mod completions;
pub mod embeddings;
mod heartbeat;
mod io;
mod key;
pub mod responses;
#[cfg(feature = "server")]
mod serve;
#[cfg(feature = "server")]
mod server;
mod sse;
mod tls;
pub mod wire;

pub use client::{ClientOptions, ClientTimeouts, OpenAiClient, http_base_url};
pub use heartbeat::Heartbeat;
pub use io::WriteTimeout;
pub use key::random_api_key;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub use serve::{ServeLimits, serve};
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub use server::{ApiError, HostPolicy, Keys, Reload, ServeOptions, check_exposure, router};
pub use sse::{SseDecoder, SseEvent};
