//! [`RuntimeManager`]: many models behind one gateway, each started on
//! demand, queued, unloaded when idle, evicted for room, restarted after a
//! crash, and swapped without dropping requests.
//!
//! One concept per file: [`routes`] (names to models), [`model`] (a model's
//! state and backoff), [`admission`] (slots and the queue), [`loading`]
//! (starting, capacity, eviction, unloading), [`monitor`] (crashes, hangs,
//! ttl), [`reload`] (a new configuration), [`tracked`] (a request's stream),
//! [`service`] (what the router calls, and the status report).

mod admission;
#[cfg(test)]
mod fake;
mod loading;
mod model;
#[cfg(test)]
mod model_based;
mod monitor;
mod reload;
mod routes;
mod service;
#[cfg(test)]
mod tests;
mod tracked;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use runtime_core::{ModelRuntime, Result};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::{GatewayConfig, ModelSpec};
use crate::metrics::Metrics;
use model::{Model, State};
use routes::Routes;
pub use service::ModelStatus;

/// Builds an uninitialized runtime for a model. The default picks the backend
/// named in the model's spec ([`ModelSpec::resolved_backend`]); embedders
/// pass their own to run runtimes of their own.
pub type RuntimeFactory = Box<dyn Fn(&ModelSpec) -> Result<Box<dyn ModelRuntime>> + Send + Sync>;

/// Owns the runtimes behind a gateway: routes each request to its model,
/// starts the model's engine on demand (one start for any number of waiting
/// requests), limits what runs and what waits, unloads idle models after
/// their ttl, evicts the least recently used idle model when a start needs
/// room, restarts engines that crash or hang, and swaps a model's runtime
/// without dropping requests ([`reload`](Self::reload),
/// [`hot_swap`](Self::hot_swap)).
///
/// It is a [`ModelService`](runtime_core::ModelService): `runtime_openai::router` serves it, with
/// `/v1/models` listing every model and its state, `/metrics` in the
/// Prometheus format and `/status`.
pub struct RuntimeManager {
    inner: Arc<Inner>,
    monitor: JoinHandle<()>,
}

impl std::fmt::Debug for RuntimeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeManager")
            .field(
                "models",
                &self.inner.routes().by_name.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Drop for RuntimeManager {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

struct Inner {
    settings: RwLock<GatewayConfig>,
    routes: RwLock<Arc<Routes>>,
    factory: RuntimeFactory,
    /// One capacity decision (what to evict, whether a start fits) at a time.
    capacity: tokio::sync::Mutex<()>,
    /// Signalled whenever a model goes idle or is unloaded.
    capacity_freed: Notify,
    /// Runtimes being retired (draining, then stopping): out of the routes,
    /// but their engines still hold memory and count against the limits.
    retiring: Retiring,
    /// Replacements a reload is starting beside the versions they replace:
    /// not routed yet, but their engines count against the limits.
    incoming: std::sync::Mutex<Vec<Arc<Model>>>,
    metrics: Metrics,
    closed: AtomicBool,
}

/// How many runtimes are being retired, and the memory they hold.
#[derive(Default)]
struct Retiring {
    count: std::sync::atomic::AtomicUsize,
    memory: std::sync::atomic::AtomicU64,
}

impl RuntimeManager {
    /// A manager for `config`, starting each model's backend as its spec
    /// says. Must be called within a tokio runtime; preloaded models start
    /// loading at once.
    pub fn new(config: GatewayConfig) -> Result<Arc<Self>> {
        Self::with_factory(
            config,
            Box::new(|spec: &ModelSpec| spec.resolved_backend()?.runtime()),
        )
    }

    /// A manager for `config` whose runtimes `factory` builds.
    pub fn with_factory(config: GatewayConfig, factory: RuntimeFactory) -> Result<Arc<Self>> {
        config.validate()?;
        let inner = Arc::new(Inner {
            routes: RwLock::new(Arc::new(Routes::build(
                config.models.iter().cloned().map(Model::new),
            ))),
            settings: RwLock::new(config),
            factory,
            capacity: tokio::sync::Mutex::new(()),
            capacity_freed: Notify::new(),
            retiring: Retiring::default(),
            incoming: std::sync::Mutex::default(),
            metrics: Metrics::new(),
            closed: AtomicBool::new(false),
        });
        let monitor = tokio::spawn(monitor::monitor(Arc::downgrade(&inner)));
        inner.preload();
        Ok(Arc::new(Self { inner, monitor }))
    }

    /// Loads `model` now (if it is not), waiting until it is ready.
    pub async fn load(&self, model: &str) -> Result<()> {
        let model = self.inner.resolve(Some(model))?;
        drop(self.inner.lease(&model).await?);
        Ok(())
    }

    /// Unloads `model` after its requests finish (within the drain timeout).
    pub async fn unload(&self, model: &str) -> Result<()> {
        let model = self.inner.resolve(Some(model))?;
        let drain = self.inner.settings().drain_timeout;
        self.inner.unload(&model, drain).await;
        Ok(())
    }

    /// Runs `f` on `model`'s loaded runtime (starting it if needed).
    pub async fn with_runtime<T>(
        &self,
        model: Option<&str>,
        f: impl AsyncFnOnce(&dyn ModelRuntime) -> T,
    ) -> Result<T> {
        let model = self.inner.resolve(model)?;
        let lease = self.inner.lease(&model).await?;
        lease.with_runtime(f).await
    }

    /// What every model is doing.
    pub async fn status(&self) -> Vec<ModelStatus> {
        self.inner.status().await
    }

    /// Requests running in every engine together.
    pub fn in_flight(&self) -> usize {
        self.inner
            .routes()
            .by_name
            .values()
            .filter_map(|model| match &*model.state() {
                State::Loaded { served, .. } => Some(served.in_flight()),
                _ => None,
            })
            .sum()
    }

    /// The metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.render()
    }

    /// Stops serving: new requests are refused, requests in flight get up to
    /// `drain` to finish (then end with [`Error::ShutDown`](runtime_core::Error::ShutDown)), and every engine
    /// is shut down. Idempotent.
    pub async fn shutdown_within(&self, drain: Duration) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.monitor.abort();
        let models: Vec<Arc<Model>> = self.inner.routes().by_name.values().cloned().collect();
        let unloads = models.iter().map(|model| self.inner.unload(model, drain));
        futures::future::join_all(unloads).await;
    }

    /// [`shutdown_within`](Self::shutdown_within) the configured drain timeout.
    pub async fn shutdown(&self) -> Result<()> {
        let drain = self.inner.settings().drain_timeout;
        self.shutdown_within(drain).await;
        Ok(())
    }
}

impl Inner {
    fn settings(&self) -> std::sync::RwLockReadGuard<'_, GatewayConfig> {
        self.settings.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
