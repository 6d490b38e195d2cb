//! Tools and structured output, fail-closed: every answer to a request with a
//! JSON Schema is valid against it, or the request fails with
//! [`Error::OutputInvalid`](runtime_core::Error::OutputInvalid).
//!
//! Engines differ in what they promise. llama-server given `tools` and
//! `tool_choice: "required"` may answer plain text; vLLM refuses a required
//! choice without a tool parser; both enforce a `json_schema` response
//! format, each with its own gaps in the keywords it honours. This crate
//! makes the promise the same on every engine:
//!
//! - A schema keyword the engine's constrained decoding cannot enforce is
//!   refused before any token is spent, with a 400 naming the keyword and
//!   where it is ([`schema::check_enforceable`]).
//! - A required or named tool choice becomes a schema constraint on the
//!   engine's output, `{"name": ..., "arguments": {...}}` (an array with
//!   parallel calls), which is read back into tool calls ([`calls`]).
//! - `auto` is left to the engine's own tool-call parser where it has one,
//!   and every call it returns is checked like the others.
//! - After generation, every `json_schema` answer and every call's
//!   arguments are validated ([`schema::Validator`]); a cut-off answer is
//!   invalid too. On a stream the failure is the final event.
//!
//! A [`Plan`] is made per request from what the engine supports
//! ([`Support`]): it says what to send the engine and checks and reshapes
//! what comes back, whole ([`Plan::finish`]) or streamed ([`Plan::events`]).
//!
//! This crate owns no engine and no transport: `runtime-managed` applies a
//! plan to llama-server and vLLM, `runtime-remote` to engines elsewhere.

pub mod calls;
mod plan;
mod prompt;
pub mod schema;
pub mod template;

pub use plan::{Plan, Support};
pub use schema::{Enforcer, Validator};
