//! Reloading: a new configuration applied while requests keep flowing.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use runtime_core::Result;

use super::model::{Model, State};
use super::routes::Routes;
use super::{Inner, RuntimeManager};
use crate::config::{GatewayConfig, ModelSpec};

impl RuntimeManager {
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
        // Counted against the limits from their start until they are routed
        // (or the reload is given up).
        let incoming = Incoming::register(&self.inner, swaps.iter().map(|(_, new)| new.clone()));
        for (current, replacement) in &swaps {
            if !matches!(&*current.state(), State::Loaded { .. }) {
                continue;
            }
            // Start the new runtime while the old one serves.
            if let Err(err) = self.inner.start_beside(replacement, current).await {
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
        drop(incoming);
        for (name, model) in &old.by_name {
            let kept = routes
                .by_name
                .get(name)
                .is_some_and(|now| Arc::ptr_eq(now, model));
            if !kept {
                model.removed.store(true, Ordering::SeqCst);
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
}

/// Replacements listed in [`Inner::incoming`] for as long as it lives.
struct Incoming<'a> {
    inner: &'a Inner,
    models: Vec<Arc<Model>>,
}

impl<'a> Incoming<'a> {
    fn register(inner: &'a Inner, models: impl Iterator<Item = Arc<Model>>) -> Self {
        let models: Vec<_> = models.collect();
        inner
            .incoming
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(models.iter().cloned());
        Self { inner, models }
    }
}

impl Drop for Incoming<'_> {
    fn drop(&mut self) {
        self.inner
            .incoming
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|model| !self.models.iter().any(|new| Arc::ptr_eq(new, model)));
    }
}
