//! [`RuntimeManager`]: owns the current runtime, serves requests through it,
//! and swaps it for another without dropping requests.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::Stream;
use runtime_core::{
    Error, EventStream, InferenceRequest, InferenceResponse, ModelRuntime, Result, RuntimeConfig,
    StreamEvent,
};
use runtime_openai::ChatService;
use tokio::sync::{Mutex, RwLock};

/// Builds an uninitialized runtime for a configuration (picks the backend).
pub type RuntimeFactory =
    Box<dyn Fn(&RuntimeConfig) -> Result<Box<dyn ModelRuntime>> + Send + Sync>;

/// How long a swapped-out runtime may take to finish its in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Owns the runtime that serves requests, and replaces it on demand.
///
/// Requests hold a reference to the runtime that started them, so a
/// [`hot_swap`](Self::hot_swap) lets them finish on the old runtime while new
/// requests go to the new one; the old one is shut down once drained.
pub struct RuntimeManager {
    current: RwLock<Option<Arc<dyn ModelRuntime>>>,
    factory: RuntimeFactory,
    /// One swap at a time.
    swapping: Mutex<()>,
}

impl std::fmt::Debug for RuntimeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeManager").finish_non_exhaustive()
    }
}

impl RuntimeManager {
    /// A manager with no runtime yet; `factory` builds one per configuration.
    pub fn new(factory: RuntimeFactory) -> Self {
        Self {
            current: RwLock::new(None),
            factory,
            swapping: Mutex::new(()),
        }
    }

    /// Starts a runtime for `config` and switches traffic to it once it is
    /// ready; then drains and shuts down the previous one.
    ///
    /// If the new runtime fails to start, the current one keeps serving and the
    /// error is returned.
    pub async fn hot_swap(&self, config: RuntimeConfig) -> Result<()> {
        let _one_at_a_time = self.swapping.lock().await;
        let mut runtime = (self.factory)(&config)?;
        runtime.initialize(config).await?;
        let new: Arc<dyn ModelRuntime> = Arc::from(runtime);
        let old = self.current.write().await.replace(new);
        if let Some(old) = old {
            retire(old).await;
        }
        Ok(())
    }

    /// The runtime serving now.
    pub async fn current(&self) -> Result<Arc<dyn ModelRuntime>> {
        self.current
            .read()
            .await
            .clone()
            .ok_or(Error::NotInitialized)
    }

    /// Shuts the current runtime down (after its in-flight requests finish).
    pub async fn shutdown(&self) -> Result<()> {
        let _one_at_a_time = self.swapping.lock().await;
        if let Some(old) = self.current.write().await.take() {
            retire(old).await;
        }
        Ok(())
    }
}

/// Waits until nothing but us holds `runtime`, then shuts it down. A runtime
/// still in use after the drain timeout is dropped, which stops its engine.
async fn retire(mut runtime: Arc<dyn ModelRuntime>) {
    let started = Instant::now();
    loop {
        if let Some(owned) = Arc::get_mut(&mut runtime) {
            if let Err(err) = owned.shutdown().await {
                tracing::warn!(error = %err, "shutting down the retired runtime failed");
            }
            return;
        }
        if started.elapsed() >= DRAIN_TIMEOUT {
            tracing::warn!(
                users = Arc::strong_count(&runtime) - 1,
                "retired runtime still in use after the drain timeout; stopping it"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[async_trait]
impl ChatService for RuntimeManager {
    async fn is_ready(&self) -> bool {
        match self.current().await {
            Ok(runtime) => runtime.is_ready().await,
            Err(_) => false,
        }
    }

    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse> {
        self.current().await?.generate(request).await
    }

    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream> {
        let runtime = self.current().await?;
        let events = runtime.generate_events(request).await?;
        Ok(Box::new(HoldingRuntime {
            events,
            _runtime: runtime,
        }))
    }
}

/// A stream that keeps the runtime it came from alive (and so undrained).
struct HoldingRuntime {
    events: EventStream,
    _runtime: Arc<dyn ModelRuntime>,
}

impl Stream for HoldingRuntime {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.events).poll_next(cx)
    }
}
