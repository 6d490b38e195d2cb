//! Loading: one start however many requests wait for it, room made first
//! (the least recently used idle model evicted past `max_loaded` or the
//! memory budget), and unloading with a drain.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use runtime_core::{Error, Result};

use super::Inner;
use super::model::{FIRST_BACKOFF, Failure, Model, State, describe_start_failure};
use crate::served::{Lease, ServedRuntime};

impl Inner {
    pub(super) fn preload(self: &Arc<Self>) {
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

    /// A lease on `model`'s runtime, starting it first if needed (one start
    /// however many requests wait for it).
    pub(super) async fn lease(self: &Arc<Self>, model: &Arc<Model>) -> Result<Lease> {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(Error::ShutDown);
            }
            if model.removed.load(Ordering::SeqCst) {
                return Err(self.gone(model));
            }
            let loading = {
                let mut state = model.state();
                match &*state {
                    State::Loaded { served, .. } => match served.lease() {
                        Ok(lease) => return Ok(lease),
                        // Being retired (unloaded or crashed): start anew.
                        Err(_) => self.begin_loading(model, &mut state, None),
                    },
                    State::Loading(loading) => loading.clone(),
                    State::Failed(failure) if failure.at.elapsed() < failure.retry_after => {
                        return Err(failure.error(model.name()));
                    }
                    State::Unloaded | State::Failed(_) => {
                        self.begin_loading(model, &mut state, None)
                    }
                }
            };
            if let Err(failure) = loading.await {
                return Err(failure.error(model.name()));
            }
        }
    }

    /// The error for a request that waited on a model a reload took out:
    /// the model's new version, if it has one, is for a new request.
    fn gone(&self, model: &Model) -> Error {
        match self.resolve(Some(model.name())) {
            Ok(_) => Error::ModelUnavailable {
                model: model.name().to_owned(),
                reason: "it was reloaded while the request waited; send it again".to_owned(),
                retry_after: Some(Duration::ZERO),
            },
            Err(not_served) => not_served,
        }
    }

    /// Starts loading `model` in a task of its own (so a caller that goes
    /// away does not cancel the start others wait for). `beside`: the
    /// version of the model it replaces, whose engine may run beside the new
    /// one until the swap (it is not counted against the limits).
    pub(super) fn begin_loading(
        self: &Arc<Self>,
        model: &Arc<Model>,
        state: &mut State,
        beside: Option<Arc<Model>>,
    ) -> Shared<BoxFuture<'static, std::result::Result<(), Failure>>> {
        let task = tokio::spawn(self.clone().load(model.clone(), beside));
        let name = model.name().to_owned();
        let loading = async move {
            task.await.unwrap_or_else(|err| {
                // A panic's message may hold anything (paths, values): the
                // log gets it, a client only the fact.
                tracing::error!(model = name, error = %err, "the model's start panicked");
                Err(Failure {
                    reason: "its start failed unexpectedly; the server log says why".to_owned(),
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

    /// Starts a changed model's runtime beside `current`, its running
    /// version: the two overlap until the swap, and only they (room is made
    /// for the new one as for any start, `current` aside).
    pub(super) async fn start_beside(
        self: &Arc<Self>,
        model: &Arc<Model>,
        current: &Arc<Model>,
    ) -> Result<()> {
        let loading = self.begin_loading(model, &mut model.state(), Some(current.clone()));
        loading.await.map_err(|failure| failure.error(model.name()))
    }

    /// Makes room, starts the engine, and records the outcome in the
    /// model's state.
    pub(super) async fn load(
        self: Arc<Self>,
        model: Arc<Model>,
        beside: Option<Arc<Model>>,
    ) -> std::result::Result<(), Failure> {
        let outcome = self.start(&model, beside.as_ref()).await;
        let mut state = model.state();
        // Loaded or failed: the state itself says whether it holds room.
        model.has_room.store(false, Ordering::SeqCst);
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

    pub(super) async fn start(
        &self,
        model: &Arc<Model>,
        beside: Option<&Arc<Model>>,
    ) -> Result<Arc<ServedRuntime>> {
        self.make_room(model, beside).await?;
        // A reload may have taken the model out while the start waited.
        if model.removed.load(Ordering::SeqCst) {
            return Err(self.gone(model));
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
    pub(super) async fn make_room(
        &self,
        model: &Arc<Model>,
        beside: Option<&Arc<Model>>,
    ) -> Result<()> {
        let _one_decision = self.capacity.lock().await;
        let deadline = Instant::now() + self.settings().queue_timeout;
        loop {
            if model.removed.load(Ordering::SeqCst) {
                return Err(self.gone(model));
            }
            let (max_loaded, budget) = {
                let settings = self.settings();
                (settings.max_loaded, settings.memory_budget)
            };
            let routes = self.routes();
            let incoming = self
                .incoming
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let others: Vec<Arc<Model>> = routes
                .by_name
                .values()
                .chain(&incoming)
                .filter(|other| !Arc::ptr_eq(other, model))
                // The version a swap replaces: its overlap is the swap's.
                .filter(|other| beside.is_none_or(|current| !Arc::ptr_eq(other, current)))
                .filter(|other| other.holds_room())
                .cloned()
                .collect();
            // Engines still stopping (retired, or of removed models) hold
            // their memory until they are gone.
            let used = others
                .iter()
                .fold(self.retiring.memory.load(Ordering::SeqCst), |sum, other| {
                    sum.saturating_add(other.memory.load(Ordering::SeqCst))
                });
            let needed = model.memory.load(Ordering::SeqCst);
            let running = others.len() + self.retiring.count.load(Ordering::SeqCst);
            let fits = max_loaded.is_none_or(|max| running < max)
                && budget.is_none_or(|budget| used.saturating_add(needed) <= budget);
            if fits {
                model.has_room.store(true, Ordering::SeqCst);
                return Ok(());
            }
            // Preloaded models are meant to be up (the monitor would start
            // them again at once): never evicted.
            // Nor are a reload's replacements, which are not routed yet.
            let victim = others
                .iter()
                .filter(|other| !incoming.iter().any(|new| Arc::ptr_eq(new, other)))
                .filter(|other| !other.spec.preload && other.idle_runtime().is_some())
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
    pub(super) async fn unload(&self, model: &Arc<Model>, drain: Duration) {
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
            self.retire(&served, model.memory.load(Ordering::SeqCst), drain)
                .await;
        }
        self.publish_loaded();
        self.capacity_freed.notify_waiters();
    }

    /// Retires `served` (its requests get `drain`), counting its engine's
    /// `memory` against the limits until it is stopped.
    pub(super) async fn retire(&self, served: &ServedRuntime, memory: u64, drain: Duration) {
        self.retiring.count.fetch_add(1, Ordering::SeqCst);
        self.retiring.memory.fetch_add(memory, Ordering::SeqCst);
        served.retire(drain).await;
        self.retiring.memory.fetch_sub(memory, Ordering::SeqCst);
        self.retiring.count.fetch_sub(1, Ordering::SeqCst);
        self.capacity_freed.notify_waiters();
    }

    pub(super) fn publish_loaded(&self) {
        let routes = self.routes();
        let loaded = routes
            .by_name
            .values()
            .filter(|model| matches!(&*model.state(), State::Loaded { .. }))
            .count();
        self.metrics.set_loaded(loaded);
    }
}
