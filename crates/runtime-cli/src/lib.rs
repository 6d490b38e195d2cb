//! The building blocks of the `model-runtime` command.
//!
//! This crate owns the command line (`run`, `chat`, `serve`, `backends`), the
//! choice of a backend for a model ([`choose`]), and [`RuntimeManager`], which
//! owns the runtime behind `serve` and can swap it for another while requests
//! keep flowing. The engines themselves live in the backend crates.

mod backends;
mod manager;
mod progress;

pub use backends::{Backend, BackendChoice, BackendReport, choose, factory, survey};
pub use manager::{RuntimeFactory, RuntimeManager};
pub use progress::{ENGINE_LOG_TARGET, LatestLine, Spinner};
