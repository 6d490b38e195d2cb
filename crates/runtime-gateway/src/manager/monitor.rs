//! The monitor: every health interval, engines that died or hang are
//! restarted (with backoff; at once for preloaded models) and idle ones past
//! their ttl unloaded.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::Inner;
use super::model::{Failure, Model, STABLE_AFTER, State};
use crate::served::ServedRuntime;

/// The monitor task: checks every loaded engine each health interval.
pub(super) async fn monitor(inner: Weak<Inner>) {
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

impl Inner {
    /// One round of the monitor: engines that died or hang are restarted
    /// (with backoff; at once for preloaded models), idle ones past their
    /// ttl are unloaded.
    pub(super) async fn check(self: &Arc<Self>) {
        for model in self.routes().by_name.values() {
            if model.spec.preload {
                self.revive(model);
            }
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
    pub(super) async fn restart(
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
        let (inner, served) = (self.clone(), served.clone());
        let memory = model.memory.load(Ordering::SeqCst);
        tokio::spawn(async move { inner.retire(&served, memory, Duration::ZERO).await });
        self.publish_loaded();
        self.capacity_freed.notify_waiters();
        // A preloaded model is started again by the next rounds (`revive`),
        // as many times as it takes; others on their next request.
    }

    /// A preloaded model that is not running (its start or restart failed,
    /// and its backoff is over) is started again, without waiting for a
    /// request: it is meant to be up.
    fn revive(self: &Arc<Self>, model: &Arc<Model>) {
        let due = match &*model.state() {
            State::Unloaded => true,
            State::Failed(failure) => failure.at.elapsed() >= failure.retry_after,
            State::Loading(_) | State::Loaded { .. } => false,
        };
        if !due || self.closed.load(Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        let model = model.clone();
        tokio::spawn(async move {
            if let Err(err) = inner.lease(&model).await {
                tracing::warn!(model = model.name(), error = %err, "restarting a preloaded model failed; it is tried again after its backoff");
            }
        });
    }
}
