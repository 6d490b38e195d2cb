//! A request's stream through the gateway: its slot held until it ends,
//! its first token, tokens and outcome counted.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

use futures::Stream;
use runtime_core::{
    EmbeddingRequest, Embeddings, Endpoint, Error, EventStream, InferenceRequest, Result,
    StreamEvent,
};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::Inner;
use super::model::{Model, State};

/// A request's stream, with its slot held and its outcome counted.
pub(super) struct Tracked {
    pub(super) events: EventStream,
    pub(super) model: Arc<Model>,
    /// The API it came through, a label of its count.
    pub(super) endpoint: Endpoint,
    pub(super) inner: Arc<Inner>,
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) started: Instant,
    pub(super) first_token: bool,
    pub(super) done: bool,
}

impl Stream for Tracked {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = Pin::new(&mut self.events).poll_next(cx);
        if let Poll::Ready(item) = &item {
            match item {
                Some(Ok(StreamEvent::Delta(_))) if !self.first_token => {
                    self.first_token = true;
                    self.inner
                        .metrics
                        .first_token(self.model.name(), self.started.elapsed());
                }
                Some(Ok(StreamEvent::Finished { usage, .. })) => {
                    if let Some(usage) = usage {
                        self.inner.metrics.tokens(
                            self.model.name(),
                            usage.prompt_tokens,
                            usage.completion_tokens,
                        );
                    }
                    self.finish(200);
                }
                Some(Err(err)) => {
                    let status = err.http_status();
                    self.finish(status);
                }
                _ => {}
            }
        }
        item
    }
}

impl Tracked {
    pub(super) fn finish(&mut self, status: u16) {
        if !self.done {
            self.done = true;
            self.inner.metrics.request(
                self.model.name(),
                self.endpoint,
                status,
                self.started.elapsed(),
            );
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // 499: the client went away before the answer was complete.
        self.finish(499);
        self.inner.metrics.request_ended(self.model.name());
        self.model.touch();
        self.inner.capacity_freed.notify_waiters();
    }
}

impl Inner {
    pub(super) async fn serve_events(
        self: &Arc<Self>,
        endpoint: Endpoint,
        requested: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        let started = Instant::now();
        let model = match self.resolve(requested) {
            Ok(model) => model,
            Err(err) => {
                // Not the name the client sent: any client could add labels.
                self.metrics
                    .request("(unknown)", endpoint, err.http_status(), started.elapsed());
                return Err(err);
            }
        };
        // Within the caller's request span (the router's `chat`), this
        // request's time in the gateway: the queue, the start, the engine.
        let span = tracing::info_span!("gateway", model = model.name());
        let outcome = async {
            let permit = self.admit(&model).await?;
            tracing::debug!("admitted");
            let lease = self.lease(&model).await?;
            let events = lease.generate_events(request).await?;
            Ok::<_, Error>((events, permit))
        }
        .instrument(span)
        .await;
        match outcome {
            Ok((events, permit)) => {
                self.metrics.request_started(model.name());
                Ok(Box::new(Tracked {
                    events,
                    model,
                    endpoint,
                    inner: self.clone(),
                    _permit: permit,
                    started,
                    first_token: false,
                    done: false,
                }))
            }
            Err(err) => {
                self.metrics
                    .request(model.name(), endpoint, err.http_status(), started.elapsed());
                model.touch();
                Err(err)
            }
        }
    }

    /// The vectors of `request` from the model it names, admitted through
    /// that model's queue as a chat request is.
    pub(super) async fn serve_embeddings(
        self: &Arc<Self>,
        requested: Option<&str>,
        request: EmbeddingRequest,
    ) -> Result<Embeddings> {
        let started = Instant::now();
        let model = match self.resolve(requested) {
            Ok(model) => model,
            Err(err) => {
                self.metrics.embedding_request(
                    "(unknown)",
                    err.http_status(),
                    0,
                    started.elapsed(),
                );
                return Err(err);
            }
        };
        let span = tracing::info_span!("gateway", model = model.name());
        let mut outcome = EmbeddingOutcome {
            inner: self,
            model: &model,
            started,
            // 499 unless answered: the client went away first.
            status: 499,
            tokens: 0,
            in_flight: false,
        };
        // A model that is not running and cannot embed is not started only
        // to say so.
        let loaded = matches!(&*model.state(), State::Loaded { .. });
        if !loaded && model.cannot_embed().await {
            let err = Error::unsupported(
                "embeddings",
                format!(
                    "model `{}`, which is not an embedding model (serve a sentence-transformers \
                     directory, or a GGUF with a pooling type, for /v1/embeddings)",
                    model.name()
                ),
            );
            outcome.status = err.http_status();
            return Err(err);
        }
        let embedded = async {
            let _permit = self.admit(&model).await?;
            let lease = self.lease(&model).await?;
            self.metrics.request_started(model.name());
            outcome.in_flight = true;
            lease.embed(request).await
        }
        .instrument(span)
        .await;
        match &embedded {
            Ok(embeddings) => {
                outcome.status = 200;
                outcome.tokens = embeddings.prompt_tokens;
            }
            Err(err) => outcome.status = err.http_status(),
        }
        embedded
    }
}

/// An embedding request's bookkeeping, done when it ends however it ends
/// (answered, refused, or dropped with its client): the request counted
/// with its status and time, the model touched, waiting loads told that
/// capacity may be free.
struct EmbeddingOutcome<'a> {
    inner: &'a Inner,
    model: &'a Model,
    started: Instant,
    status: u16,
    tokens: u64,
    /// Counted in flight (admitted and leased).
    in_flight: bool,
}

impl Drop for EmbeddingOutcome<'_> {
    fn drop(&mut self) {
        let name = self.model.name();
        self.inner.metrics.embedding_request(
            name,
            self.status,
            self.tokens,
            self.started.elapsed(),
        );
        if self.in_flight {
            self.inner.metrics.request_ended(name);
        }
        self.model.touch();
        self.inner.capacity_freed.notify_waiters();
    }
}
