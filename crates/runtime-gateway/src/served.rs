//! [`ServedRuntime`]: one runtime behind a gateway, with what serving it
//! takes: counting requests in flight, draining, and retiring it properly.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use futures::Stream;
use runtime_core::{
    EmbeddingRequest, Embeddings, Error, EventStream, InferenceRequest, ModelRuntime, Result,
    StreamEvent,
};
use tokio::sync::{Notify, RwLock, watch};

/// A runtime serving requests on behalf of a gateway.
///
/// Requests hold a [`Lease`] while they run (a stream until it is dropped), so
/// the gateway knows what is in flight. Retiring waits for those to finish up
/// to a deadline; past it, the requests still open end with
/// [`Error::ShutDown`] and the runtime is shut down properly (SIGTERM, grace,
/// SIGKILL for an engine), not merely dropped.
pub(crate) struct ServedRuntime {
    runtime: RwLock<Option<Box<dyn ModelRuntime>>>,
    in_flight: AtomicUsize,
    idle: Notify,
    retiring: watch::Sender<bool>,
}

impl std::fmt::Debug for ServedRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedRuntime")
            .field("in_flight", &self.in_flight())
            .field("retiring", &*self.retiring.borrow())
            .finish_non_exhaustive()
    }
}

impl ServedRuntime {
    /// Serves `runtime`, which is initialized already.
    pub(crate) fn new(runtime: Box<dyn ModelRuntime>) -> Arc<Self> {
        Arc::new(Self {
            runtime: RwLock::new(Some(runtime)),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            retiring: watch::channel(false).0,
        })
    }

    /// Requests running now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The memory the runtime's engine holds, if it can tell.
    pub(crate) async fn resident_memory(&self) -> Option<u64> {
        self.runtime.read().await.as_ref()?.resident_memory()
    }

    /// What the runtime is and accepts (`None` once retired).
    pub(crate) async fn metadata(&self) -> Option<runtime_core::RuntimeMetadata> {
        Some(self.runtime.read().await.as_ref()?.metadata())
    }

    /// The engine's recent log lines.
    pub(crate) async fn log_tail(&self) -> Vec<String> {
        self.runtime
            .read()
            .await
            .as_ref()
            .map(|runtime| runtime.log_tail())
            .unwrap_or_default()
    }

    /// Whether the runtime is being (or has been) retired.
    pub(crate) fn is_retiring(&self) -> bool {
        *self.retiring.borrow()
    }

    /// Whether the runtime is ready (false once retired).
    pub(crate) async fn is_ready(&self) -> bool {
        match self.runtime.read().await.as_ref() {
            Some(runtime) => !*self.retiring.borrow() && runtime.is_ready().await,
            None => false,
        }
    }

    /// Runs `f` on the runtime, unless it is retired.
    pub(crate) async fn with_runtime<T>(
        &self,
        f: impl AsyncFnOnce(&dyn ModelRuntime) -> T,
    ) -> Result<T> {
        let guard = self.runtime.read().await;
        let runtime = guard.as_deref().ok_or(Error::ShutDown)?;
        Ok(f(runtime).await)
    }

    /// Counts a request in flight until the lease is dropped.
    pub(crate) fn lease(self: &Arc<Self>) -> Result<Lease> {
        if *self.retiring.borrow() {
            return Err(Error::ShutDown);
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Ok(Lease {
            served: self.clone(),
        })
    }

    /// Stops taking requests, waits up to `drain` for those in flight to
    /// finish, ends the rest with [`Error::ShutDown`], and shuts the runtime
    /// down. Idempotent.
    pub(crate) async fn retire(&self, drain: Duration) {
        let deadline = Instant::now() + drain;
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                tracing::warn!(
                    in_flight = self.in_flight(),
                    drain_ms = drain.as_millis() as u64,
                    "requests still open after the drain deadline; ending them and stopping the runtime"
                );
                break;
            }
        }
        self.retiring.send_replace(true);
        // Plain requests release the read lock as soon as they see the signal.
        let runtime = self.runtime.write().await.take();
        if let Some(mut runtime) = runtime
            && let Err(err) = runtime.shutdown().await
        {
            tracing::warn!(error = %err, "shutting down a retired runtime failed");
        }
    }
}

/// A request in flight on a [`ServedRuntime`].
#[derive(Debug)]
pub(crate) struct Lease {
    served: Arc<ServedRuntime>,
}

impl Lease {
    /// Runs `f` on the runtime this lease holds.
    pub(crate) async fn with_runtime<T>(
        &self,
        f: impl AsyncFnOnce(&dyn ModelRuntime) -> T,
    ) -> Result<T> {
        self.served.with_runtime(f).await
    }

    /// The runtime's tokens for `text` ([`ModelRuntime::tokenize`]).
    pub(crate) async fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let guard = self.served.runtime.read().await;
        let runtime = guard.as_deref().ok_or(Error::ShutDown)?;
        runtime.tokenize(text, add_special).await
    }

    /// The runtime's vectors for `request` ([`ModelRuntime::embed`]);
    /// ended with [`Error::ShutDown`] if the runtime is retired first, so a
    /// long request never holds up its retirement.
    pub(crate) async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings> {
        let retiring = wait_retiring(self.served.retiring.subscribe());
        let guard = self.served.runtime.read().await;
        let runtime = guard.as_deref().ok_or(Error::ShutDown)?;
        tokio::select! {
            embedded = runtime.embed(request) => embedded,
            () = retiring => Err(Error::ShutDown),
        }
    }

    /// The text of the runtime's `tokens` ([`ModelRuntime::detokenize`]).
    pub(crate) async fn detokenize(&self, tokens: &[u32]) -> Result<String> {
        let guard = self.served.runtime.read().await;
        let runtime = guard.as_deref().ok_or(Error::ShutDown)?;
        runtime.detokenize(tokens).await
    }

    /// An answer as events; the stream keeps the lease until it is dropped,
    /// and ends with [`Error::ShutDown`] if the runtime is retired first.
    pub(crate) async fn generate_events(self, request: InferenceRequest) -> Result<EventStream> {
        let events = {
            let guard = self.served.runtime.read().await;
            let runtime = guard.as_deref().ok_or(Error::ShutDown)?;
            runtime.generate_events(request).await?
        };
        let retiring = Box::pin(wait_retiring(self.served.retiring.subscribe()));
        Ok(Box::new(LeasedStream {
            events: Some(events),
            lease: Some(self),
            retiring,
        }))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.served.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.served.idle.notify_waiters();
        }
    }
}

async fn wait_retiring(mut retiring: watch::Receiver<bool>) {
    if retiring.wait_for(|retiring| *retiring).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A stream holding a lease on its runtime, ended when the runtime retires.
struct LeasedStream {
    events: Option<EventStream>,
    lease: Option<Lease>,
    retiring: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Stream for LeasedStream {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(events) = self.events.as_mut() else {
            return Poll::Ready(None);
        };
        let next = Pin::new(events).poll_next(cx);
        if let Poll::Ready(item) = next {
            if item.is_none() || matches!(item, Some(Err(_))) {
                self.events = None;
                self.lease = None;
            }
            return Poll::Ready(item);
        }
        if self.retiring.as_mut().poll(cx).is_ready() {
            self.events = None;
            self.lease = None;
            return Poll::Ready(Some(Err(Error::ShutDown)));
        }
        Poll::Pending
    }
}
