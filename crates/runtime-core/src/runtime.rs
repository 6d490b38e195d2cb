//! The [`ModelRuntime`] trait.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures_core::Stream;

use crate::{
    EmbeddingRequest, Embeddings, Error, InferenceRequest, InferenceResponse, ModelFormat, Result,
    RuntimeConfig, RuntimeMetadata, StreamEvent,
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
    /// as soon as the engine process has died, and while it does not answer
    /// its health probe ([`RuntimeConfig::hang_timeout`](crate::RuntimeConfig::hang_timeout)).
    async fn is_ready(&self) -> bool;

    /// Probes the engine and returns its status text, or the reason it is not
    /// healthy ([`Error::NotInitialized`](crate::Error::NotInitialized),
    /// [`Error::EngineExited`](crate::Error::EngineExited) with the log tail,
    /// [`Error::EngineUnresponsive`](crate::Error::EngineUnresponsive), a
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
    fn api_key(&self) -> Option<crate::ApiKey> {
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
    /// [`Error::EngineExited`](crate::Error::EngineExited) and ends; if it
    /// hangs, [`Error::EngineUnresponsive`](crate::Error::EngineUnresponsive).
    /// A stream never ends silently before the answer is complete.
    ///
    /// Text only: an answer's tool calls and log-probabilities come with
    /// [`generate_events`](Self::generate_events) and
    /// [`generate`](Self::generate). A request with `n > 1` is refused
    /// (served non-streamed only).
    async fn generate_stream(&self, request: InferenceRequest) -> Result<TextStream>;

    /// Like [`generate_stream`](Self::generate_stream), but the stream ends with a
    /// [`StreamEvent::Finished`] that carries the finish reason, usage and timings
    /// where the backend knows them, and carries the answer's tool calls
    /// ([`StreamEvent::ToolCall`]) and log-probabilities
    /// ([`StreamEvent::Logprobs`]) as they come. A call's arguments are
    /// validated once complete: an invalid answer ends the stream with
    /// [`Error::OutputInvalid`](crate::Error::OutputInvalid).
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

    /// The model's token ids for `text`. With `add_special`, the tokens the
    /// model adds to a raw prompt (its start token, where it has one) come
    /// first, as a completion's prompt is counted; special tokens written in
    /// the text are read as such either way.
    ///
    /// The provided implementation answers [`Error::Unsupported`].
    async fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let _ = (text, add_special);
        Err(Error::unsupported("tokenize", self.metadata().runtime_name))
    }

    /// The text of `tokens`, special tokens included as written.
    ///
    /// The provided implementation answers [`Error::Unsupported`].
    async fn detokenize(&self, tokens: &[u32]) -> Result<String> {
        let _ = tokens;
        Err(Error::unsupported(
            "detokenize",
            self.metadata().runtime_name,
        ))
    }

    /// One vector per input of `request`, in order, pooled as the model says
    /// (an embedding model's sentence-transformers configuration, or the
    /// pooling in its GGUF) and normalised to unit length.
    ///
    /// The request is validated first ([`EmbeddingRequest::validate`]); an
    /// input past the engine's context is refused with
    /// [`Error::ContextExceeded`](crate::Error::ContextExceeded) unless the
    /// request asks to truncate it.
    ///
    /// The provided implementation answers [`Error::Unsupported`].
    async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings> {
        let _ = request;
        Err(Error::unsupported(
            "embeddings",
            self.metadata().runtime_name,
        ))
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

    /// The memory the engine holds now, in bytes, where the backend can tell:
    /// the resident memory of a server engine's whole process group, or what an
    /// in-process engine allocated for the model. `None` when not running or
    /// unknown.
    fn resident_memory(&self) -> Option<u64> {
        None
    }

    /// The process id of the engine's process (the leader of its process
    /// group, which holds every process of the engine), for backends that run
    /// one, while running; `None` for in-process engines and before
    /// `initialize`. For monitoring, and for proving an engine stopped.
    fn engine_pid(&self) -> Option<u32> {
        None
    }

    /// The engine's most recent log lines, oldest first (empty for engines
    /// that do not log, or before `initialize`).
    fn log_tail(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The text deltas of an event stream: what
/// [`ModelRuntime::generate_stream`] returns for backends that implement
/// [`ModelRuntime::generate_events`] natively. Errors pass through; the
/// `Finished` event is dropped. An event stream that ends without `Finished`
/// ends the deltas with an error ([`ensure_finished`]).
pub fn text_deltas(events: EventStream) -> TextStream {
    Box::new(EventsToDeltas {
        events: ensure_finished(events),
    })
}

struct EventsToDeltas {
    events: EventStream,
}

impl Stream for EventsToDeltas {
    type Item = Result<String>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            return match Pin::new(&mut self.events).poll_next(cx) {
                Poll::Ready(Some(Ok(StreamEvent::Delta(delta)))) => Poll::Ready(Some(Ok(delta))),
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

/// The same events, ending at the first error, and with
/// [`Error::StreamProtocol`] in place of a silent end when the stream stops
/// before its `Finished` event (its producer died): a cut-off answer is never
/// mistaken for a whole one.
pub fn ensure_finished(events: EventStream) -> EventStream {
    Box::new(EnsureFinished {
        events,
        state: Progress::Open,
    })
}

struct EnsureFinished {
    events: EventStream,
    state: Progress,
}

#[derive(PartialEq)]
enum Progress {
    Open,
    Finished,
    Ended,
}

impl Stream for EnsureFinished {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.state == Progress::Ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.events).poll_next(cx) {
            Poll::Ready(Some(Ok(event))) => {
                if matches!(event, StreamEvent::Finished { .. }) {
                    self.state = Progress::Finished;
                }
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.state = Progress::Ended;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                let finished = self.state == Progress::Finished;
                self.state = Progress::Ended;
                Poll::Ready((!finished).then(|| Err(unfinished())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn unfinished() -> Error {
    Error::StreamProtocol("the generation ended without finishing".to_owned())
}

/// Reads an event stream to its end into one response: the deltas joined,
/// tool calls assembled from their pieces, log-probabilities in order, the
/// finish reason, usage and timings of its `Finished` event. The first
/// error is returned, and so is [`Error::StreamProtocol`] if the stream ends
/// without `Finished`.
pub async fn collect_events(mut events: EventStream) -> Result<InferenceResponse> {
    let mut response = InferenceResponse::default();
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut events).poll_next(cx)).await;
        match next {
            Some(Ok(StreamEvent::Delta(text))) => response.content.push_str(&text),
            Some(Ok(StreamEvent::ToolCall(delta))) => delta.apply_to(&mut response.tool_calls)?,
            Some(Ok(StreamEvent::Logprobs(tokens))) => response
                .logprobs
                .get_or_insert_with(Vec::new)
                .extend(tokens),
            Some(Ok(StreamEvent::Finished {
                finish_reason,
                usage,
                timings,
            })) => {
                response.finish_reason = finish_reason;
                response.usage = usage;
                response.timings = timings;
                return Ok(response);
            }
            Some(Err(err)) => return Err(err),
            None => return Err(unfinished()),
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

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn events(items: Vec<Result<StreamEvent>>) -> EventStream {
        Box::new(futures::stream::iter(items))
    }

    fn finished() -> StreamEvent {
        StreamEvent::Finished {
            finish_reason: None,
            usage: None,
            timings: None,
        }
    }

    #[tokio::test]
    async fn a_stream_that_ends_without_finished_is_an_error_not_a_short_answer() {
        let cut = || events(vec![Ok(StreamEvent::Delta("Par".into()))]);
        let deltas: Vec<_> = text_deltas(cut()).collect().await;
        assert_eq!(deltas.len(), 2);
        assert!(matches!(&deltas[1], Err(Error::StreamProtocol(_))));
        assert!(matches!(
            collect_events(cut()).await,
            Err(Error::StreamProtocol(_))
        ));
    }

    #[tokio::test]
    async fn a_finished_stream_collects_into_the_whole_answer() {
        let whole = events(vec![
            Ok(StreamEvent::Delta("Pa".into())),
            Ok(StreamEvent::Delta("ris".into())),
            Ok(finished()),
        ]);
        assert_eq!(collect_events(whole).await.unwrap().content, "Paris");
        let whole = events(vec![Ok(StreamEvent::Delta("Paris".into())), Ok(finished())]);
        let deltas: Vec<String> = text_deltas(whole).map(|d| d.unwrap()).collect().await;
        assert_eq!(deltas, ["Paris"]);
    }

    #[tokio::test]
    async fn errors_end_the_deltas() {
        let failed = events(vec![
            Err(Error::ShutDown),
            Ok(StreamEvent::Delta("x".into())),
        ]);
        let deltas: Vec<_> = text_deltas(failed).collect().await;
        assert_eq!(deltas.len(), 1);
    }
}
