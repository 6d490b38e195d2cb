//! What the gateway counts, in the Prometheus text format: requests by model,
//! endpoint and status, tokens, latencies, engine starts, memory, queues, restarts and
//! evictions.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use runtime_core::Endpoint;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointRequestLabels {
    model: String,
    endpoint: &'static str,
    status: u16,
}

fn latency_histogram() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn start_histogram() -> Histogram {
    // 50 ms to about 14 minutes.
    Histogram::new(exponential_buckets(0.05, 2.0, 15))
}

type Histograms = Family<ModelLabel, Histogram, fn() -> Histogram>;

/// The gateway's metrics and the registry that renders them.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<EndpointRequestLabels, Counter>,
    embedding_requests: Family<RequestLabels, Counter>,
    prompt_tokens: Family<ModelLabel, Counter>,
    generated_tokens: Family<ModelLabel, Counter>,
    time_to_first_token: Histograms,
    request_duration: Histograms,
    engine_start: Histograms,
    loaded: Gauge,
    resident: Family<ModelLabel, Gauge<u64, AtomicU64>>,
    queue_depth: Family<ModelLabel, Gauge>,
    in_flight: Family<ModelLabel, Gauge>,
    restarts: Family<ModelLabel, Counter>,
    evictions: Family<ModelLabel, Counter>,
    unloads: Family<ModelLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn label(model: &str) -> ModelLabel {
    ModelLabel {
        model: model.to_owned(),
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("gateway");
        let requests = Family::default();
        registry.register(
            "requests",
            "Generation requests answered, by model, endpoint (chat_completions, completions, \
             responses, messages, count_tokens) and HTTP status",
            requests.clone(),
        );
        let embedding_requests = Family::default();
        registry.register(
            "embedding_requests",
            "Embedding requests answered, by model and HTTP status",
            embedding_requests.clone(),
        );
        let prompt_tokens = Family::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        let generated_tokens = Family::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let time_to_first_token: Histograms = Family::new_with_constructor(latency_histogram);
        registry.register(
            "time_to_first_token_seconds",
            "From a request's arrival to its first generated text",
            time_to_first_token.clone(),
        );
        let request_duration: Histograms = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "From a request's arrival to its last byte",
            request_duration.clone(),
        );
        let engine_start: Histograms = Family::new_with_constructor(start_histogram);
        registry.register(
            "engine_start_seconds",
            "How long starting a model's engine took",
            engine_start.clone(),
        );
        let loaded = Gauge::default();
        registry.register("models_loaded", "Models loaded now", loaded.clone());
        let resident = Family::default();
        registry.register(
            "model_resident_bytes",
            "Memory a loaded model's engine holds",
            resident.clone(),
        );
        let queue_depth = Family::default();
        registry.register(
            "queue_depth",
            "Requests waiting for a slot of their model",
            queue_depth.clone(),
        );
        let in_flight = Family::default();
        registry.register(
            "requests_in_flight",
            "Requests running in a model's engine",
            in_flight.clone(),
        );
        let restarts = Family::default();
        registry.register(
            "engine_restarts",
            "Engines restarted after a crash or a hang",
            restarts.clone(),
        );
        let evictions = Family::default();
        registry.register(
            "evictions",
            "Models unloaded to make room for another",
            evictions.clone(),
        );
        let unloads = Family::default();
        registry.register(
            "idle_unloads",
            "Models unloaded after their ttl without requests",
            unloads.clone(),
        );
        Self {
            registry,
            requests,
            embedding_requests,
            prompt_tokens,
            generated_tokens,
            time_to_first_token,
            request_duration,
            engine_start,
            loaded,
            resident,
            queue_depth,
            in_flight,
            restarts,
            evictions,
            unloads,
        }
    }

    /// The metrics in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    pub(crate) fn request(&self, model: &str, endpoint: Endpoint, status: u16, duration: Duration) {
        self.requests
            .get_or_create(&EndpointRequestLabels {
                model: model.to_owned(),
                endpoint: endpoint.as_str(),
                status,
            })
            .inc();
        self.observe_duration(model, duration);
    }

    pub(crate) fn embedding_request(
        &self,
        model: &str,
        status: u16,
        tokens: u64,
        duration: Duration,
    ) {
        self.embedding_requests
            .get_or_create(&RequestLabels {
                model: model.to_owned(),
                status,
            })
            .inc();
        self.observe_duration(model, duration);
        self.prompt_tokens
            .get_or_create(&label(model))
            .inc_by(tokens);
    }

    fn observe_duration(&self, model: &str, duration: Duration) {
        self.request_duration
            .get_or_create(&label(model))
            .observe(duration.as_secs_f64());
    }

    pub(crate) fn first_token(&self, model: &str, after: Duration) {
        self.time_to_first_token
            .get_or_create(&label(model))
            .observe(after.as_secs_f64());
    }

    pub(crate) fn tokens(&self, model: &str, prompt: u64, generated: u64) {
        self.prompt_tokens
            .get_or_create(&label(model))
            .inc_by(prompt);
        self.generated_tokens
            .get_or_create(&label(model))
            .inc_by(generated);
    }

    pub(crate) fn engine_started(&self, model: &str, took: Duration) {
        self.engine_start
            .get_or_create(&label(model))
            .observe(took.as_secs_f64());
    }

    pub(crate) fn set_loaded(&self, count: usize) {
        self.loaded.set(count as i64);
    }

    pub(crate) fn set_resident(&self, model: &str, bytes: u64) {
        self.resident.get_or_create(&label(model)).set(bytes);
    }

    pub(crate) fn set_queue_depth(&self, model: &str, waiting: usize) {
        self.queue_depth
            .get_or_create(&label(model))
            .set(waiting as i64);
    }

    pub(crate) fn request_started(&self, model: &str) {
        self.in_flight.get_or_create(&label(model)).inc();
    }

    pub(crate) fn request_ended(&self, model: &str) {
        self.in_flight.get_or_create(&label(model)).dec();
    }

    pub(crate) fn restarted(&self, model: &str) {
        self.restarts.get_or_create(&label(model)).inc();
    }

    pub(crate) fn evicted(&self, model: &str) {
        self.evictions.get_or_create(&label(model)).inc();
    }

    pub(crate) fn unloaded_idle(&self, model: &str) {
        self.unloads.get_or_create(&label(model)).inc();
    }
}
