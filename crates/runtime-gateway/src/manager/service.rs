//! What the router calls ([`ModelService`]), and the status report.

use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use runtime_core::{
    Capabilities, EmbeddingRequest, Embeddings, Endpoint, EventStream, InferenceRequest,
    InferenceResponse, ModelCard, ModelService, Result,
};
use serde::Serialize;

use super::model::State;
use super::{Inner, RuntimeManager};

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
    /// While loaded: the context window in effect, in tokens.
    pub context_size: Option<u32>,
    /// While loaded: what it accepts beyond plain chat (tools, schemas,
    /// log-probabilities, answers per request), as its engine and template
    /// serve them.
    pub capabilities: Option<Capabilities>,
}

impl Inner {
    pub(super) async fn status(&self) -> Vec<ModelStatus> {
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
            let metadata = match &state {
                State::Loaded { served, .. } => served.metadata().await,
                _ => None,
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
                context_size: metadata.as_ref().and_then(|m| m.context_size),
                capabilities: metadata.map(|m| m.capabilities),
            });
        }
        report
    }
}

#[async_trait]
#[async_trait]
impl ModelService for RuntimeManager {
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
        self.generate_at(Endpoint::ChatCompletions, model, request)
            .await
    }

    async fn generate_events(
        &self,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        self.inner
            .serve_events(Endpoint::ChatCompletions, model, request)
            .await
    }

    async fn generate_at(
        &self,
        endpoint: Endpoint,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<InferenceResponse> {
        let events = self.inner.serve_events(endpoint, model, request).await?;
        runtime_core::collect_events(events).await
    }

    async fn generate_events_at(
        &self,
        endpoint: Endpoint,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        self.inner.serve_events(endpoint, model, request).await
    }

    async fn tokenize(
        &self,
        model: Option<&str>,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>> {
        let model = self.inner.resolve(model)?;
        let lease = self.inner.lease(&model).await?;
        lease.tokenize(text, add_special).await
    }

    async fn detokenize(&self, model: Option<&str>, tokens: &[u32]) -> Result<String> {
        let model = self.inner.resolve(model)?;
        let lease = self.inner.lease(&model).await?;
        lease.detokenize(tokens).await
    }

    async fn embed(&self, model: Option<&str>, request: EmbeddingRequest) -> Result<Embeddings> {
        self.inner.serve_embeddings(model, request).await
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
                    .with("context_size", status.context_size)
                    .with(
                        "capabilities",
                        serde_json::to_value(status.capabilities).unwrap_or_default(),
                    )
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
