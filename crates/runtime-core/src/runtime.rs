//! The [`ModelRuntime`] trait.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures_core::Stream;

use crate::{
    InferenceRequest, InferenceResponse, ModelFormat, Result, RuntimeConfig, RuntimeMetadata,
    StreamEvent,
};

/// A stream of generated text deltas, as returned by
/// [`ModelRuntime::generate_stream`].
pub type TextStream = Box<dyn Stream<Item = Result<String>> + Send + Unpin>;

/// A stream of [`StreamEvent`]s, as returned by [`ModelRuntime::generate_events`].
pub type EventStream = Box<dyn Stream<Item = Result<StreamEvent>> + Send + Unpin>;

/// A local language-model engine, started, used and stopped through one interface.
///
/// The lifecycle is `initialize` → any number of `generate` / `generate_stream`
/// calls (concurrently: the methods take `&self`) → `shutdown`. Every backend also
/// serves the OpenAI chat-completions API at [`base_url`](Self::base_url) while it
/// is running, so any OpenAI client can talk to it directly.
///
/// The trait is object safe: programs hold a `Box<dyn ModelRuntime>` or
/// `Arc<dyn ModelRuntime>` and pick the backend at run time.
#[async_trait]
pub trait ModelRuntime: Send + Sync {
    /// The model format this backend takes (backends may accept others too and
    /// say so in their docs).
    fn supported_format(&self) -> ModelFormat;

    /// Validates `config`, starts the engine, loads the model, and returns once the
    /// engine answers a real health probe.
    ///
    /// Validation comes first: a missing model, a model of the wrong format, a
    /// missing engine binary or bad settings fail before anything is started. On
    /// any failure nothing is left running, and the error carries the cause and,
    /// when the engine got as far as logging, its last log lines
    /// ([`Error::log_tail`](crate::Error::log_tail)).
    ///
    /// Calling it on a runtime that is already initialized returns
    /// [`Error::AlreadyInitialized`](crate::Error::AlreadyInitialized) and leaves the
    /// running engine as it was. After [`shutdown`](Self::shutdown) it may be called
    /// again.
    async fn initialize(&mut self, config: RuntimeConfig) -> Result<()>;

    /// Whether the engine is running and ready. Cheap (no network round trip where
    /// the backend can avoid one); `false` before `initialize`, after `shutdown`,
    /// and as soon as the engine process has died.
    async fn is_ready(&self) -> bool;

    /// Probes the engine and returns its status text, or the reason it is not
    /// healthy ([`Error::NotInitialized`](crate::Error::NotInitialized),
    /// [`Error::EngineExited`](crate::Error::EngineExited) with the log tail, a
    /// transport error).
    async fn health_check(&self) -> Result<String>;

    /// The engine's HTTP root, e.g. `http://127.0.0.1:8001`, once initialized;
    /// an empty string before.
    fn base_url(&self) -> String;

    /// The OpenAI-compatible chat-completions endpoint, `{base_url}/v1/chat/completions`.
    fn completions_url(&self) -> String {
        format!("{}/v1/chat/completions", self.base_url())
    }

    /// The API key an HTTP client must send to [`base_url`](Self::base_url)
    /// (`Authorization: Bearer …`), if the engine requires one.
    fn api_key(&self) -> Option<String> {
        None
    }

    /// Generates a complete answer.
    ///
    /// The request is validated first ([`InferenceRequest::validate`]). At
    /// temperature 0 the answer is deterministic for a backend, and equal to the
    /// concatenated deltas of [`generate_stream`](Self::generate_stream) for the
    /// same request. Fails with [`Error::NotInitialized`](crate::Error::NotInitialized)
    /// before `initialize` or after `shutdown`, and with
    /// [`Error::EngineExited`](crate::Error::EngineExited) if the engine died.
    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse>;

    /// Generates an answer as a stream of text deltas.
    ///
    /// Every delta is valid UTF-8, even when a character was split across tokens
    /// or network chunks. Dropping the stream cancels the generation in the engine.
    /// If the engine dies mid-stream, the stream yields
    /// [`Error::EngineExited`](crate::Error::EngineExited) and ends.
    async fn generate_stream(&self, request: InferenceRequest) -> Result<TextStream>;

    /// Like [`generate_stream`](Self::generate_stream), but the stream ends with a
    /// [`StreamEvent::Finished`] that carries the finish reason, usage and timings
    /// where the backend knows them.
    ///
    /// The provided implementation wraps `generate_stream` and reports no finish
    /// details; backends override it.
    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream> {
        let deltas = self.generate_stream(request).await?;
        Ok(Box::new(DeltasToEvents {
            deltas,
            finished: false,
        }))
    }

    /// Stops the engine and frees the model.
    ///
    /// Idempotent: calling it twice, or before `initialize`, is fine. Server
    /// backends send SIGTERM to the engine's process group, wait
    /// [`shutdown_grace`](crate::RuntimeConfig::shutdown_grace), then SIGKILL, and
    /// reap. Dropping a runtime without calling it still stops the engine.
    async fn shutdown(&mut self) -> Result<()>;

    /// What this runtime is. `version` is read from the engine and may be empty
    /// before `initialize`.
    fn metadata(&self) -> RuntimeMetadata;
}

/// The text deltas of an event stream: what
/// [`ModelRuntime::generate_stream`] returns for backends that implement
/// [`ModelRuntime::generate_events`] natively. Errors pass through; the
/// `Finished` event is dropped.
pub fn text_deltas(events: EventStream) -> TextStream {
    Box::new(EventsToDeltas { events })
}

struct EventsToDeltas {
    events: EventStream,
}

impl Stream for EventsToDeltas {
    type Item = Result<String>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match Pin::new(&mut self.events).poll_next(cx) {
                Poll::Ready(Some(Ok(StreamEvent::Delta(delta)))) => {
                    return Poll::Ready(Some(Ok(delta)));
                }
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Adapts a text-delta stream to events, ending with an empty `Finished`.
struct DeltasToEvents {
    deltas: TextStream,
    finished: bool,
}

impl Stream for DeltasToEvents {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.deltas).poll_next(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item.map(StreamEvent::Delta))),
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(Some(Ok(StreamEvent::Finished {
                    finish_reason: None,
                    usage: None,
                    timings: None,
                })))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
