//! [`RuntimeManager`]: many models behind one gateway, each started on
//! demand, queued, unloaded when idle, evicted for room, restarted after a
//! crash, and swapped without dropping requests.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, Stream};
use runtime_core::{
    Error, EventStream, InferenceRequest, InferenceResponse, ModelRuntime, Result, StreamEvent,
};
use runtime_openai::{ChatService, ModelCard};
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{GatewayConfig, ModelSpec};
use crate::metrics::Metrics;
use crate::served::{Lease, ServedRuntime};

/// Builds an uninitialized runtime for a model. The default picks the backend
/// named in the model's spec ([`ModelSpec::resolved_backend`]); embedders
/// pass their own to run runtimes of their own.
pub type RuntimeFactory = Box<dyn Fn(&ModelSpec) -> Result<Box<dyn ModelRuntime>> + Send + Sync>;

/// Restarts after a crash wait this long at first, doubling up to
/// [`MAX_BACKOFF`]; failed starts begin at [`FIRST_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two attempts to start a model.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// An engine that stayed up this long resets its crash backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Owns the runtimes behind a gateway: routes each request to its model,
/// starts the model's engine on demand (one start for any number of waiting
/// requests), limits what runs and what waits, unloads idle models after
/// their ttl, evicts the least recently used idle model when a start needs
/// room, restarts engines that crash or hang, and swaps a model's runtime
/// without dropping requests ([`reload`](Self::reload),
/// [`hot_swap`](Self::hot_swap)).
///
/// It is a [`ChatService`]: `runtime_openai::router` serves it, with
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
    metrics: Metrics,
    closed: AtomicBool,
}

/// The models by name, and every name (aliases too) to its model's name.
#[derive(Default)]
struct Routes {
    by_name: BTreeMap<String, Arc<Model>>,
    names: HashMap<String, String>,
}

/// One configured model and its life.
struct Model {
    spec: ModelSpec,
    state: Mutex<State>,
    /// `parallel` requests run at once.
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit.
    waiting: AtomicUsize,
    last_used: Mutex<Instant>,
    restarts: AtomicU64,
    /// Failed starts or crashes in a row, for the backoff.
    streak: AtomicU32,
    /// Resident memory, measured after load (the model's size before).
    memory: AtomicU64,
}

#[derive(Clone)]
enum State {
    Unloaded,
    Loading(Shared<BoxFuture<'static, std::result::Result<(), Failure>>>),
    Loaded {
        served: Arc<ServedRuntime>,
        since: SystemTime,
        at: Instant,
    },
    Failed(Failure),
}

/// Why a model cannot serve, for clients (no engine log text) and retries.
#[derive(Debug, Clone)]
struct Failure {
    reason: String,
    at: Instant,
    retry_after: Duration,
}

impl Failure {
    fn error(&self, model: &str) -> Error {
        Error::ModelUnavailable {
            model: model.to_owned(),
            reason: self.reason.clone(),
            retry_after: Some(self.retry_after.saturating_sub(self.at.elapsed())),
        }
    }
}

/// What a model is doing, as `/status` and [`RuntimeManager::status`] report it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ModelStatus {
    /// The model's name.
    pub name: String,
    /// Its other names.
    pub aliases: Vec<String>,
    /// The backend that runs it.
    pub backend: String,
    /// `loaded`, `loading`, `unloaded` or `failed`.
    pub state: &'static str,
    /// Unix time it was loaded, while loaded.
    pub loaded_since: Option<u64>,
    /// The memory its engine holds (measured) or is expected to (its size).
    pub resident_bytes: u64,
    /// Requests running in its engine.
    pub in_flight: usize,
    /// Requests waiting for a slot.
    pub waiting: usize,
    /// Restarts after a crash or a hang.
    pub restarts: u64,
    /// Why it failed, while failed.
    pub failure: Option<String>,
    /// Its engine's most recent log lines.
    pub log_tail: Vec<String>,
}

impl Model {
    fn new(spec: ModelSpec) -> Arc<Self> {
        let estimate = size_on_disk(&spec.path);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(spec.parallel() as usize)),
            spec,
            state: Mutex::new(State::Unloaded),
            waiting: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            restarts: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            memory: AtomicU64::new(estimate),
        })
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn touch(&self) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }

    /// The loaded runtime, if loaded and nothing runs or waits on it.
    fn idle_runtime(&self) -> Option<Arc<ServedRuntime>> {
        match &*self.state() {
            State::Loaded { served, .. }
                if served.in_flight() == 0 && self.waiting.load(Ordering::SeqCst) == 0 =>
            {
                Some(served.clone())
            }
            _ => None,
        }
    }

    /// The next backoff after a failure, growing with the streak.
    fn next_backoff(&self, first: Duration) -> Duration {
        let streak = self.streak.fetch_add(1, Ordering::SeqCst);
        if first.is_zero() && streak == 0 {
            return Duration::ZERO;
        }
        let base = if first.is_zero() {
            FIRST_BACKOFF
        } else {
            first
        };
        base.saturating_mul(1 << streak.min(6)).min(MAX_BACKOFF)
    }
}

/// The size of a model on disk: the file, or a directory's files.
fn size_on_disk(path: &std::path::Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.metadata().ok())
            .filter(std::fs::Metadata::is_file)
            .map(|meta| meta.len())
            .sum(),
        Ok(meta) => meta.len(),
        Err(_) => 0,
    }
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
            metrics: Metrics::new(),
            closed: AtomicBool::new(false),
        });
        let monitor = tokio::spawn(monitor(Arc::downgrade(&inner)));
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

    /// Applies a new configuration: new models appear (preloaded ones start),
    /// removed ones stop taking requests and drain, changed ones are started
    /// anew and swapped in once ready (the old runtime drains), unchanged
    /// ones are not touched. If a changed model cannot start, it keeps its
    /// old runtime and the error is returned; the rest of the reload stands.
    pub async fn reload(&self, config: GatewayConfig) -> Result<()> {
        config.validate()?;
        let old = self.inner.routes();
        let mut models = Vec::new();
        let mut swaps = Vec::new();
        for spec in &config.models {
            match old.by_name.get(&spec.name) {
                Some(model) if &model.spec == spec => models.push(model.clone()),
                Some(model) => {
                    let replacement = Model::new(spec.clone());
                    swaps.push((model.clone(), replacement.clone()));
                    models.push(replacement);
                }
                None => models.push(Model::new(spec.clone())),
            }
        }
        let mut first_error = None;
        for (current, replacement) in &swaps {
            if !matches!(&*current.state(), State::Loaded { .. }) {
                continue;
            }
            // Start the new runtime while the old one serves.
            if let Err(err) = self.inner.start_beside(replacement).await {
                tracing::warn!(model = current.name(), error = %err, "the changed model did not start; it keeps its running version");
                let index = models
                    .iter()
                    .position(|m| Arc::ptr_eq(m, replacement))
                    .expect("the replacement was listed");
                models[index] = current.clone();
                first_error.get_or_insert(err);
            }
        }
        let routes = Arc::new(Routes::build(models.into_iter()));
        let drain = config.drain_timeout;
        *self
            .inner
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = config;
        let old = std::mem::replace(
            &mut *self
                .inner
                .routes
                .write()
                .unwrap_or_else(PoisonError::into_inner),
            routes.clone(),
        );
        for (name, model) in &old.by_name {
            let kept = routes
                .by_name
                .get(name)
                .is_some_and(|now| Arc::ptr_eq(now, model));
            if !kept {
                let inner = self.inner.clone();
                let model = model.clone();
                tokio::spawn(async move { inner.unload(&model, drain).await });
            }
        }
        self.inner.preload();
        self.inner.publish_loaded();
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Replaces `model`'s runtime with one started from `spec` (the same
    /// name), once it is ready; requests in flight finish on the old one.
    pub async fn hot_swap(&self, spec: ModelSpec) -> Result<()> {
        let mut config = self.inner.settings().clone();
        match config.models.iter_mut().find(|m| m.name == spec.name) {
            Some(slot) => *slot = spec,
            None => config.models.push(spec),
        }
        self.reload(config).await
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
    /// `drain` to finish (then end with [`Error::ShutDown`]), and every engine
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

impl Routes {
    fn build(models: impl Iterator<Item = Arc<Model>>) -> Self {
        let mut routes = Self::default();
        for model in models {
            let name = model.name().to_owned();
            for alias in std::iter::once(&name).chain(&model.spec.aliases) {
                routes.names.insert(alias.clone(), name.clone());
            }
            routes.by_name.insert(name, model);
        }
        routes
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

    /// The model a request names (or the default model), or a 404 error
    /// listing what exists.
    fn resolve(&self, requested: Option<&str>) -> Result<Arc<Model>> {
        let routes = self.routes();
        let default = self.settings().default_model.clone();
        let wanted = requested.map(str::to_owned).or(default);
        let found = wanted
            .as_ref()
            .and_then(|name| routes.names.get(name))
            .and_then(|name| routes.by_name.get(name));
        match found {
            Some(model) => Ok(model.clone()),
            None => Err(Error::ModelNotServed {
                requested: wanted.unwrap_or_else(|| "(none)".to_owned()),
                available: {
                    let mut names: Vec<String> = routes.names.keys().cloned().collect();
                    names.sort_unstable();
                    names
                },
            }),
        }
    }

    fn preload(self: &Arc<Self>) {
        for model in self.routes().by_name.values() {
            if model.spec.preload && matches!(&*model.state(), State::Unloaded) {
                let inner = self.clone();
                let model = model.clone();
                tokio::spawn(async move {
                    if let Err(err) = inner.lease(&model).await {
                        tracing::warn!(model = model.name(), error = %err, "preloading failed");
                    }
                });
            }
        }
    }

    /// Waits for a slot of `model`: at most `queue` requests wait, for at
    /// most the queue timeout; a request whose caller gives up leaves the
    /// queue (the future is dropped).
    async fn admit(&self, model: &Arc<Model>) -> Result<OwnedSemaphorePermit> {
        if let Ok(permit) = model.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queue = model.spec.queue() as usize;
        let waiting = model.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = Waiting {
            model: model.clone(),
            metrics: &self.metrics,
        };
        if waiting >= queue {
            return Err(Error::Busy(format!(
                "model `{}` has {queue} requests waiting already; retry later",
                model.name()
            )));
        }
        self.metrics.set_queue_depth(model.name(), waiting + 1);
        let timeout = self.settings().queue_timeout;
        match tokio::time::timeout(timeout, model.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::ShutDown),
            Err(_) => Err(Error::ModelUnavailable {
                model: model.name().to_owned(),
                reason: format!("no slot was free within {timeout:?}"),
                retry_after: Some(Duration::from_secs(1)),
            }),
        }
    }

    /// A lease on `model`'s runtime, starting it first if needed (one start
    /// however many requests wait for it).
    async fn lease(self: &Arc<Self>, model: &Arc<Model>) -> Result<Lease> {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(Error::ShutDown);
            }
            let loading = {
                let mut state = model.state();
                match &*state {
                    State::Loaded { served, .. } => match served.lease() {
                        Ok(lease) => return Ok(lease),
                        // Being retired (unloaded or crashed): start anew.
                        Err(_) => self.begin_loading(model, &mut state, false),
                    },
                    State::Loading(loading) => loading.clone(),
                    State::Failed(failure) if failure.at.elapsed() < failure.retry_after => {
                        return Err(failure.error(model.name()));
                    }
                    State::Unloaded | State::Failed(_) => {
                        self.begin_loading(model, &mut state, false)
                    }
                }
            };
            if let Err(failure) = loading.await {
                return Err(failure.error(model.name()));
            }
        }
    }

    /// Starts loading `model` in a task of its own (so a caller that goes
    /// away does not cancel the start others wait for). `beside`: next to the
    /// model's running runtime, outside the capacity limits.
    fn begin_loading(
        self: &Arc<Self>,
        model: &Arc<Model>,
        state: &mut State,
        beside: bool,
    ) -> Shared<BoxFuture<'static, std::result::Result<(), Failure>>> {
        let task = tokio::spawn(self.clone().load(model.clone(), beside));
        let loading = async move {
            task.await.unwrap_or_else(|err| {
                Err(Failure {
                    reason: format!("its start was interrupted ({err})"),
                    at: Instant::now(),
                    retry_after: FIRST_BACKOFF,
                })
            })
        }
        .boxed()
        .shared();
        *state = State::Loading(loading.clone());
        loading
    }

    /// Starts a changed model's runtime beside the running one, outside the
    /// capacity limits (the two overlap only until the swap).
    async fn start_beside(self: &Arc<Self>, model: &Arc<Model>) -> Result<()> {
        let loading = self.begin_loading(model, &mut model.state(), true);
        loading.await.map_err(|failure| failure.error(model.name()))
    }

    /// Makes room, starts the engine, and records the outcome in the
    /// model's state.
    async fn load(
        self: Arc<Self>,
        model: Arc<Model>,
        beside: bool,
    ) -> std::result::Result<(), Failure> {
        let outcome = self.start(&model, beside).await;
        let mut state = model.state();
        match outcome {
            Ok(served) => {
                model.touch();
                *state = State::Loaded {
                    served,
                    since: SystemTime::now(),
                    at: Instant::now(),
                };
                drop(state);
                self.publish_loaded();
                Ok(())
            }
            Err(err) => {
                let retry_after = model.next_backoff(FIRST_BACKOFF);
                tracing::warn!(model = model.name(), error = %err.with_sources(), retry_after_ms = retry_after.as_millis() as u64, "the model failed to start");
                let failure = Failure {
                    reason: describe_start_failure(&err),
                    at: Instant::now(),
                    retry_after,
                };
                *state = State::Failed(failure.clone());
                drop(state);
                self.publish_loaded();
                Err(failure)
            }
        }
    }

    async fn start(&self, model: &Arc<Model>, beside: bool) -> Result<Arc<ServedRuntime>> {
        if !beside {
            self.make_room(model).await?;
        }
        let started = Instant::now();
        let mut runtime = (self.factory)(&model.spec)?;
        runtime.initialize(model.spec.runtime_config()).await?;
        self.metrics.engine_started(model.name(), started.elapsed());
        let served = ServedRuntime::new(runtime);
        if let Some(bytes) = served.resident_memory().await {
            model.memory.store(bytes, Ordering::SeqCst);
        }
        self.metrics
            .set_resident(model.name(), model.memory.load(Ordering::SeqCst));
        tracing::info!(
            model = model.name(),
            took_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(served)
    }

    /// Evicts least recently used idle models until `model` fits under
    /// `max_loaded` and the memory budget, waiting (up to the queue timeout)
    /// when every loaded model is busy.
    async fn make_room(&self, model: &Arc<Model>) -> Result<()> {
        let _one_decision = self.capacity.lock().await;
        let deadline = Instant::now() + self.settings().queue_timeout;
        loop {
            let (max_loaded, budget) = {
                let settings = self.settings();
                (settings.max_loaded, settings.memory_budget)
            };
            let others: Vec<Arc<Model>> = self
                .routes()
                .by_name
                .values()
                .filter(|other| !Arc::ptr_eq(other, model))
                .filter(|other| matches!(&*other.state(), State::Loaded { .. } | State::Loading(_)))
                .cloned()
                .collect();
            let used: u64 = others.iter().map(|o| o.memory.load(Ordering::SeqCst)).sum();
            let needed = model.memory.load(Ordering::SeqCst);
            let fits = max_loaded.is_none_or(|max| others.len() < max)
                && budget.is_none_or(|budget| used + needed <= budget);
            if fits {
                return Ok(());
            }
            let victim = others
                .iter()
                .filter(|other| other.idle_runtime().is_some())
                .max_by_key(|other| other.idle_for());
            match victim {
                Some(victim) => {
                    tracing::info!(
                        model = victim.name(),
                        for_model = model.name(),
                        "evicting the least recently used idle model"
                    );
                    self.metrics.evicted(victim.name());
                    self.unload(victim, Duration::ZERO).await;
                }
                None => {
                    let freed = self.capacity_freed.notified();
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || tokio::time::timeout(left, freed).await.is_err() {
                        return Err(Error::ModelUnavailable {
                            model: model.name().to_owned(),
                            reason: format!(
                                "no room to load it: {} models loaded and busy",
                                others.len()
                            ),
                            retry_after: Some(Duration::from_secs(1)),
                        });
                    }
                }
            }
        }
    }

    /// Stops routing to `model`'s runtime and retires it (requests in flight
    /// get `drain`), leaving the model unloaded.
    async fn unload(&self, model: &Arc<Model>, drain: Duration) {
        let previous = std::mem::replace(&mut *model.state(), State::Unloaded);
        let served = match previous {
            State::Loaded { served, .. } => Some(served),
            State::Loading(loading) => {
                // Let the start finish, then stop what it started.
                let _ = loading.await;
                let previous = std::mem::replace(&mut *model.state(), State::Unloaded);
                match previous {
                    State::Loaded { served, .. } => Some(served),
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(served) = served {
            served.retire(drain).await;
        }
        self.publish_loaded();
        self.capacity_freed.notify_waiters();
    }

    fn publish_loaded(&self) {
        let routes = self.routes();
        let loaded = routes
            .by_name
            .values()
            .filter(|model| matches!(&*model.state(), State::Loaded { .. }))
            .count();
        self.metrics.set_loaded(loaded);
    }

    /// One round of the monitor: engines that died or hang are restarted
    /// (with backoff; at once for preloaded models), idle ones past their
    /// ttl are unloaded.
    async fn check(self: &Arc<Self>) {
        for model in self.routes().by_name.values() {
            let loaded = match &*model.state() {
                State::Loaded { served, at, .. } => Some((served.clone(), *at)),
                _ => None,
            };
            let Some((served, loaded_at)) = loaded else {
                continue;
            };
            if served.is_retiring() {
                continue;
            }
            if !served.is_ready().await {
                self.restart(model, &served, loaded_at).await;
                continue;
            }
            if let Some(ttl) = model.spec.ttl
                && model.idle_for() >= ttl
                && model.idle_runtime().is_some()
            {
                tracing::info!(
                    model = model.name(),
                    ttl_ms = ttl.as_millis() as u64,
                    "unloading an idle model"
                );
                self.metrics.unloaded_idle(model.name());
                self.unload(model, Duration::ZERO).await;
            }
        }
    }

    /// The engine behind `served` stopped (crashed, or hangs): its requests
    /// end with an error, and it is started again after the backoff.
    async fn restart(
        self: &Arc<Self>,
        model: &Arc<Model>,
        served: &Arc<ServedRuntime>,
        loaded_at: Instant,
    ) {
        if loaded_at.elapsed() >= STABLE_AFTER {
            model.streak.store(0, Ordering::SeqCst);
        }
        let retry_after = model.next_backoff(Duration::ZERO);
        {
            let mut state = model.state();
            let same = matches!(&*state, State::Loaded { served: current, .. } if Arc::ptr_eq(current, served));
            if !same {
                return;
            }
            *state = State::Failed(Failure {
                reason: "its engine stopped; it is being restarted".to_owned(),
                at: Instant::now(),
                retry_after,
            });
        }
        model.restarts.fetch_add(1, Ordering::SeqCst);
        self.metrics.restarted(model.name());
        tracing::warn!(
            model = model.name(),
            retry_after_ms = retry_after.as_millis() as u64,
            "the engine stopped; restarting it"
        );
        let served = served.clone();
        tokio::spawn(async move { served.retire(Duration::ZERO).await });
        self.publish_loaded();
        self.capacity_freed.notify_waiters();
        if model.spec.preload {
            let inner = self.clone();
            let model = model.clone();
            tokio::spawn(async move {
                tokio::time::sleep(retry_after).await;
                if let Err(err) = inner.lease(&model).await {
                    tracing::warn!(model = model.name(), error = %err, "restarting a preloaded model failed");
                }
            });
        }
    }

    async fn status(&self) -> Vec<ModelStatus> {
        let mut report = Vec::new();
        for model in self.routes().by_name.values() {
            let state = model.state().clone();
            let (name, loaded_since, in_flight, failure, log_tail) = match &state {
                State::Unloaded => ("unloaded", None, 0, None, Vec::new()),
                State::Loading(_) => ("loading", None, 0, None, Vec::new()),
                State::Failed(failure) => {
                    ("failed", None, 0, Some(failure.reason.clone()), Vec::new())
                }
                State::Loaded { served, since, .. } => (
                    "loaded",
                    since.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs()),
                    served.in_flight(),
                    None,
                    served.log_tail().await,
                ),
            };
            report.push(ModelStatus {
                name: model.name().to_owned(),
                aliases: model.spec.aliases.clone(),
                backend: model
                    .spec
                    .resolved_backend()
                    .map_or_else(|_| model.spec.backend.to_string(), |b| b.to_string()),
                state: name,
                loaded_since,
                resident_bytes: model.memory.load(Ordering::SeqCst),
                in_flight,
                waiting: model.waiting.load(Ordering::SeqCst),
                restarts: model.restarts.load(Ordering::SeqCst),
                failure,
                log_tail: log_tail.into_iter().rev().take(20).rev().collect(),
            });
        }
        report
    }
}

/// The monitor task: checks every loaded engine each health interval.
async fn monitor(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let interval = strong.settings().health_interval;
        strong.check().await;
        drop(strong);
        tokio::time::sleep(interval).await;
    }
}

/// A waiting request; leaving (admitted, refused, or dropped by a caller
/// that went away) takes it out of the count.
struct Waiting<'a> {
    model: Arc<Model>,
    metrics: &'a Metrics,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let left = self.model.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.set_queue_depth(self.model.name(), left);
    }
}

/// What a client may learn about a failed start: the kind of failure, not
/// the engine's log.
fn describe_start_failure(err: &Error) -> String {
    let what = match err {
        Error::ModelNotFound { .. } => "its model file is missing",
        Error::InvalidModel { .. } | Error::UnsupportedFormat { .. } => {
            "its model cannot be loaded by its backend"
        }
        Error::BinaryNotFound { .. } => "its engine is not installed",
        Error::Spawn { .. } => "its engine could not be started",
        Error::StartupTimeout { .. } => "its engine did not become ready in time",
        Error::EngineExited { .. } => "its engine exited while starting",
        Error::ModelUnavailable { reason, .. } => return reason.clone(),
        Error::InvalidConfig { .. } => "its configuration is invalid",
        _ => "it failed to start",
    };
    format!("{what}; the server log says more")
}

/// A request's stream, with its slot held and its outcome counted.
struct Tracked {
    events: EventStream,
    model: Arc<Model>,
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
    started: Instant,
    first_token: bool,
    done: bool,
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
                    let status = runtime_openai::status_of(err);
                    self.finish(status);
                }
                _ => {}
            }
        }
        item
    }
}

impl Tracked {
    fn finish(&mut self, status: u16) {
        if !self.done {
            self.done = true;
            self.inner
                .metrics
                .request(self.model.name(), status, self.started.elapsed());
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
    async fn serve_events(
        self: &Arc<Self>,
        requested: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        let started = Instant::now();
        let model = match self.resolve(requested) {
            Ok(model) => model,
            Err(err) => {
                // Not the name the client sent: any client could add labels.
                self.metrics.request(
                    "(unknown)",
                    runtime_openai::status_of(&err),
                    started.elapsed(),
                );
                return Err(err);
            }
        };
        let outcome = async {
            let permit = self.admit(&model).await?;
            let lease = self.lease(&model).await?;
            let events = lease.generate_events(request).await?;
            Ok::<_, Error>((events, permit))
        }
        .await;
        match outcome {
            Ok((events, permit)) => {
                self.metrics.request_started(model.name());
                Ok(Box::new(Tracked {
                    events,
                    model,
                    inner: self.clone(),
                    _permit: permit,
                    started,
                    first_token: false,
                    done: false,
                }))
            }
            Err(err) => {
                self.metrics.request(
                    model.name(),
                    runtime_openai::status_of(&err),
                    started.elapsed(),
                );
                model.touch();
                Err(err)
            }
        }
    }
}

#[async_trait]
impl ChatService for RuntimeManager {
    async fn is_ready(&self) -> bool {
        if self.inner.closed.load(Ordering::SeqCst) {
            return false;
        }
        for model in self.inner.routes().by_name.values() {
            let served = match &*model.state() {
                State::Loaded { served, .. } => Some(served.clone()),
                State::Failed(_) if model.spec.preload => return false,
                _ => None,
            };
            if let Some(served) = served
                && !served.is_ready().await
            {
                return false;
            }
        }
        true
    }

    async fn generate(
        &self,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<InferenceResponse> {
        let events = self.inner.serve_events(model, request).await?;
        runtime_core::collect_events(events).await
    }

    async fn generate_events(
        &self,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        self.inner.serve_events(model, request).await
    }

    async fn models(&self) -> Vec<ModelCard> {
        self.status()
            .await
            .into_iter()
            .map(|status| {
                ModelCard::new(&status.name)
                    .with("state", status.state)
                    .with("backend", status.backend)
                    .with("aliases", status.aliases)
            })
            .collect()
    }

    async fn metrics(&self) -> Option<String> {
        Some(self.metrics_text())
    }

    async fn status(&self) -> Option<serde_json::Value> {
        serde_json::to_value(RuntimeManager::status(self).await)
            .ok()
            .map(|models| serde_json::json!({ "models": models }))
    }
}
