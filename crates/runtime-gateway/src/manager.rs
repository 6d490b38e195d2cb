//! [`RuntimeManager`]: owns the current runtime, serves requests through it,
//! and swaps it for another without dropping requests.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{
    Error, EventStream, InferenceRequest, InferenceResponse, ModelRuntime, Result, RuntimeConfig,
};
use runtime_openai::ChatService;
use tokio::sync::{Mutex, RwLock};

use crate::served::ServedRuntime;

/// Builds an uninitialized runtime for a configuration (picks the backend).
pub type RuntimeFactory =
    Box<dyn Fn(&RuntimeConfig) -> Result<Box<dyn ModelRuntime>> + Send + Sync>;

/// How long a swapped-out runtime may take to finish its in-flight requests
/// by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Owns the runtime that serves requests, and replaces it on demand.
///
/// A [`hot_swap`](Self::hot_swap) lets requests in flight finish on the old
/// runtime while new ones go to the new one. Once they are done, or at the
/// drain deadline, the old runtime is shut down properly: requests still open
/// then end with [`Error::ShutDown`], and its engine gets its grace period.
pub struct RuntimeManager {
    current: RwLock<Option<Arc<ServedRuntime>>>,
    factory: RuntimeFactory,
    drain_timeout: Duration,
    /// One swap at a time.
    swapping: Mutex<()>,
}

impl std::fmt::Debug for RuntimeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeManager")
            .field("drain_timeout", &self.drain_timeout)
            .finish_non_exhaustive()
    }
}

impl RuntimeManager {
    /// A manager with no runtime yet; `factory` builds one per configuration.
    pub fn new(factory: RuntimeFactory) -> Self {
        Self {
            current: RwLock::new(None),
            factory,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            swapping: Mutex::new(()),
        }
    }

    /// Sets how long a retired runtime's requests may take to finish
    /// (default [`DEFAULT_DRAIN_TIMEOUT`]).
    #[must_use]
    pub fn with_drain_timeout(mut self, drain: Duration) -> Self {
        self.drain_timeout = drain;
        self
    }

    /// Starts a runtime for `config` and switches traffic to it once it is
    /// ready; then drains and shuts down the previous one (within the drain
    /// timeout and its engine's grace period) before returning.
    ///
    /// If the new runtime fails to start, the current one keeps serving and the
    /// error is returned.
    pub async fn hot_swap(&self, config: RuntimeConfig) -> Result<()> {
        let _one_at_a_time = self.swapping.lock().await;
        let mut runtime = (self.factory)(&config)?;
        runtime.initialize(config).await?;
        let new = ServedRuntime::new(runtime);
        let old = self.current.write().await.replace(new);
        if let Some(old) = old {
            old.retire(self.drain_timeout).await;
        }
        Ok(())
    }

    /// Runs `f` on the runtime serving now.
    pub async fn with_current<T>(&self, f: impl AsyncFnOnce(&dyn ModelRuntime) -> T) -> Result<T> {
        self.served().await?.with_runtime(f).await
    }

    /// Requests running now on the current runtime.
    pub async fn in_flight(&self) -> usize {
        self.served().await.map_or(0, |served| served.in_flight())
    }

    /// Stops serving: drains the current runtime's requests (within the drain
    /// timeout) and shuts it down. Idempotent.
    pub async fn shutdown(&self) -> Result<()> {
        self.shutdown_within(self.drain_timeout).await;
        Ok(())
    }

    /// Like [`shutdown`](Self::shutdown), with its own drain deadline: zero
    /// ends every request in flight at once, as a server that was told to
    /// stop does.
    pub async fn shutdown_within(&self, drain: Duration) {
        let _one_at_a_time = self.swapping.lock().await;
        let served = self.current.write().await.take();
        if let Some(served) = served {
            served.retire(drain).await;
        }
    }

    async fn served(&self) -> Result<Arc<ServedRuntime>> {
        self.current
            .read()
            .await
            .clone()
            .ok_or(Error::NotInitialized)
    }
}

#[async_trait]
impl ChatService for RuntimeManager {
    async fn is_ready(&self) -> bool {
        match self.served().await {
            Ok(served) => served.is_ready().await,
            Err(_) => false,
        }
    }

    async fn generate(
        &self,
        _model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<InferenceResponse> {
        self.served().await?.generate(request).await
    }

    async fn generate_events(
        &self,
        _model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        self.served().await?.generate_events(request).await
    }
}
