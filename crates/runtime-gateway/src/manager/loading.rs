//! Loading: one start however many requests wait for it, room made first
//! (the least recently used idle model evicted past `max_loaded` or the
//! memory budget), and unloading with a drain.

use std::sync::Arc;
use std::sync::atomic::Ordering;
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
    pub(super) fn begin_loading(
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
    pub(super) async fn start_beside(self: &Arc<Self>, model: &Arc<Model>) -> Result<()> {
        let loading = self.begin_loading(model, &mut model.state(), true);
        loading.await.map_err(|failure| failure.error(model.name()))
    }

    /// Makes room, starts the engine, and records the outcome in the
    /// model's state.
    pub(super) async fn load(
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

    pub(super) async fn start(
        &self,
        model: &Arc<Model>,
        beside: bool,
    ) -> Result<Arc<ServedRuntime>> {
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
    pub(super) async fn make_room(&self, model: &Arc<Model>) -> Result<()> {
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
            served.retire(drain).await;
        }
        self.publish_loaded();
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
