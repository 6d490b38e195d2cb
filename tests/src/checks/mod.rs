//! The checks, one function per group. Those declared `shared` in
//! [`CONFORMANCE`] run on the suite's one running engine and leave it idle
//! and healthy; the others start their own (or several, where the group is
//! about starting) and leave nothing running.

use std::time::{Duration, Instant};

use futures::StreamExt;
use runtime_core::{
    ChatMessage, Error, FinishReason, InferenceRequest, ModelRuntime, RuntimeConfig, StreamEvent,
};
use tokio::io::AsyncBufReadExt;

use crate::wire::{self, SseAnswer};
use crate::{Activity, Backend, not_applicable, procs};

mod faults;
mod generation;
mod lifecycle;
mod load;
mod protocols;
mod structured;
mod surface;

pub use faults::*;
pub use generation::*;
pub use lifecycle::*;
pub use load::*;
pub use protocols::*;
pub use structured::*;
pub use surface::*;

const QUESTION: &str = "What is the capital of France?";

/// Every check of the conformance suite, in the order they run. `shared`
/// checks only need a running engine; `own` ones start, stop, break or
/// configure their engine, which is what they check.
///
/// `lifecycle` comes first: the engine it starts again after a shutdown
/// becomes the shared one. The sharing checks follow, `secrets` last but one
/// (it reads the log of all of them), then `slow_readers`, which ends the
/// shared engine.
pub const CONFORMANCE: &[crate::harness::Check] = &[
    crate::check!(lifecycle, own),
    crate::check!(generation, shared),
    crate::check!(streaming_utf8, shared),
    crate::check!(concurrency, shared),
    crate::check!(cancellation, shared),
    crate::check!(bad_requests, shared),
    crate::check!(http_surface, shared),
    crate::check!(engine_routes_need_the_key, shared),
    crate::check!(fault_port_taken, shared),
    crate::check!(gateway_load, shared),
    crate::check!(structured_output, shared),
    crate::check!(tool_calls, shared),
    crate::check!(logprobs, shared),
    crate::check!(messages_api, shared),
    crate::check!(responses_api, shared),
    crate::check!(completions_api, shared),
    crate::check!(tokenize_api, shared),
    crate::check!(assistant_prefill, shared),
    crate::check!(secrets, shared),
    crate::check!(slow_readers, shared),
    crate::check!(shutdown_in_flight, own),
    crate::check!(fault_bad_models, own),
    crate::check!(fault_bad_options, own),
    crate::check!(fault_missing_binary, own),
    crate::check!(fault_port_squatted, own),
    crate::check!(fault_engine_killed, own),
    crate::check!(fault_engine_hung, own),
    crate::check!(fault_dropped_runtime, own),
    crate::check!(fault_owner_killed, own),
];

/// Long enough to be still generating when a check interrupts it, short
/// enough to fit the suite's 1024-token context with the prompt (vLLM refuses
/// max_tokens beyond the context).
const LONG_ANSWER: u32 = 800;

/// A started runtime for `backend`, or a panic with the error chain.
pub async fn start(backend: &Backend) -> Box<dyn ModelRuntime> {
    start_with(backend, backend.config.clone()).await
}

/// A started runtime for `backend` on `config`, or a panic with the error chain.
pub async fn start_with(backend: &Backend, config: RuntimeConfig) -> Box<dyn ModelRuntime> {
    let mut runtime = (backend.new_runtime)();
    if let Err(err) = runtime.initialize(config).await {
        panic!("{} failed to initialize: {}", backend.name, chain(&err));
    }
    runtime
}

/// An error and its sources, one per line, with the log tail.
pub fn chain(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    for line in err.log_tail() {
        text.push_str(&format!("\n  | {line}"));
    }
    text
}

/// A greedy request that is still generating when a check (or a benchmark) interrupts it.
pub fn long_request() -> InferenceRequest {
    greedy("Write a very long story about a dragon.", LONG_ANSWER)
}

fn greedy(prompt: &str, max_tokens: u32) -> InferenceRequest {
    InferenceRequest::from_prompt(prompt)
        .with_max_tokens(max_tokens)
        .with_temperature(0.0)
}

/// How long any one stream in the suite may take before the check fails
/// rather than blocking the run.
const STREAM_TIMEOUT: Duration = Duration::from_secs(120);

async fn collect_stream(runtime: &dyn ModelRuntime, request: InferenceRequest) -> Vec<String> {
    let collected = async {
        let mut stream = runtime
            .generate_stream(request)
            .await
            .expect("stream starts");
        let mut deltas = Vec::new();
        while let Some(delta) = stream.next().await {
            deltas.push(delta.unwrap_or_else(|err| panic!("stream failed: {}", chain(&err))));
        }
        deltas
    };
    tokio::time::timeout(STREAM_TIMEOUT, collected)
        .await
        .unwrap_or_else(|_| panic!("a stream took longer than {STREAM_TIMEOUT:?}"))
}

/// The first error a stream ends with, or `None` if it ends cleanly; fails
/// the check if the stream does not end within `within`.
async fn stream_outcome(stream: &mut runtime_core::TextStream, within: Duration) -> Option<Error> {
    let outcome = async {
        while let Some(item) = stream.next().await {
            if let Err(err) = item {
                return Some(err);
            }
        }
        None
    };
    tokio::time::timeout(within, outcome)
        .await
        .unwrap_or_else(|_| panic!("the stream did not end within {within:?}"))
}

/// An HTTP client for the checks' own requests to `backend`'s endpoint.
pub fn http_client(backend: &Backend) -> reqwest::Client {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut builder = reqwest::Client::builder();
    if let Some(pem) = &backend.trusted_certificate {
        // As runtime-remote verifies: the system's roots and this one.
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|certificate| certificate.expect("a PEM certificate"))
            .collect();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(roots, provider.clone())
                .expect("a verifier");
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
            .with_no_client_auth();
        builder = builder.tls_backend_preconfigured(config);
    }
    builder.build().expect("an HTTP client")
}

/// How many generations the engine is running, asked of the engine itself.
pub async fn engine_activity(backend: &Backend, runtime: &dyn ModelRuntime) -> usize {
    let http = http_client(backend);
    let get = |path: &str| {
        http.get(format!("{}{path}", runtime.base_url()))
            .bearer_auth(crate::bearer(runtime))
            .timeout(Duration::from_secs(5))
            .send()
    };
    match backend.activity {
        Activity::Slots => {
            let slots: serde_json::Value = get("/slots")
                .await
                .expect("GET /slots")
                .json()
                .await
                .expect("slots JSON");
            slots
                .as_array()
                .expect("a list of slots")
                .iter()
                .filter(|slot| slot["is_processing"].as_bool().unwrap_or(true))
                .count()
        }
        Activity::VllmMetrics | Activity::CandleMetrics | Activity::GatewayMetrics => {
            let gauge = match backend.activity {
                Activity::VllmMetrics => "vllm:num_requests_running",
                Activity::GatewayMetrics => "gateway_requests_in_flight",
                _ => "candle_generations_active",
            };
            let text = get("/metrics")
                .await
                .expect("GET /metrics")
                .text()
                .await
                .expect("metrics text");
            metric_sum(&text, gauge) as usize
        }
    }
}

/// How many tokens the engine has generated since it started, by its own
/// counter (llama-server's and vLLM's Prometheus metrics, candle's); `None`
/// where the endpoint keeps none (a gateway counts finished answers only).
pub async fn engine_generated_tokens(backend: &Backend, runtime: &dyn ModelRuntime) -> Option<u64> {
    let counter = match backend.activity {
        Activity::Slots => "llamacpp:tokens_predicted_total",
        Activity::VllmMetrics => "vllm:generation_tokens_total",
        Activity::CandleMetrics => "candle_generated_tokens_total",
        Activity::GatewayMetrics => return None,
    };
    let text = http_client(backend)
        .get(format!("{}/metrics", runtime.base_url()))
        .bearer_auth(crate::bearer(runtime))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    Some(metric_sum(&text, counter) as u64)
}

/// The sum of a Prometheus metric's samples in `text` (every label set),
/// or a panic when the metric is missing.
fn metric_sum(text: &str, metric: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with(metric))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!values.is_empty(), "{metric} is in /metrics:\n{text}");
    values.iter().sum()
}

/// Waits up to `within` for the engine to run no generation; returns how long it took.
async fn wait_engine_idle(
    backend: &Backend,
    runtime: &dyn ModelRuntime,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if engine_activity(backend, runtime).await == 0 {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// The engine processes of a running server backend (empty for in-process
/// ones); for a server backend, finding none fails the check.
pub fn engine_processes(backend: &Backend, runtime: &dyn ModelRuntime) -> Vec<procs::Proc> {
    match backend.server {
        Some(_) => {
            let pid = runtime
                .engine_pid()
                .unwrap_or_else(|| panic!("{}'s runtime names its engine's pid", backend.name));
            let found = procs::group(pid as i32);
            assert!(
                !found.is_empty(),
                "found {}'s engine, process group {pid}",
                backend.name
            );
            found
        }
        None => Vec::new(),
    }
}

/// How many threads of an in-process engine (candle's scheduler and
/// compute threads, by name) this process runs now: what an in-process
/// engine leaves behind, where a server engine would leave processes.
fn engine_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .filter(|name| name.starts_with("candle-"))
        .count()
}

/// Waits up to `within` for the in-process engine threads to be back to
/// `baseline` (those of the suite's shared engine); returns how many are left
/// above it.
async fn wait_engine_threads(baseline: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let extra = engine_threads().saturating_sub(baseline);
        if extra == 0 || Instant::now() >= deadline {
            return extra;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pids(procs: &[procs::Proc]) -> Vec<i32> {
    procs.iter().map(|p| p.pid).collect()
}

/// The processes of `backend`'s engine binary (and its helpers) running now,
/// but the suite's shared engine's ([`crate::harness::shared_runtime`]).
pub fn own_engine_processes(backend: &Backend) -> Vec<procs::Proc> {
    let Some(server) = &backend.server else {
        return Vec::new();
    };
    let shared = backend
        .shared
        .as_ref()
        .map(|shared| shared.groups())
        .unwrap_or_default();
    procs::all()
        .into_iter()
        .filter(|p| {
            p.args
                .first()
                .is_some_and(|program| std::path::Path::new(program) == server.binary)
                || server.process_markers.iter().any(|m| p.cmdline.contains(m))
        })
        .filter(|p| !shared.contains(&p.pgid))
        .collect()
}

/// Runs after every check: no process of the engine binary may be left but
/// the suite's shared engine.
pub async fn assert_no_engine_left(backend: &Backend) {
    if backend.server.is_none() {
        return;
    }
    let left = pids(&own_engine_processes(backend));
    let still = procs::wait_gone(&left, Duration::from_secs(5)).await;
    assert!(
        still.is_empty(),
        "{} left engine processes behind: {:?}",
        backend.name,
        procs::all()
            .into_iter()
            .filter(|p| still.contains(&p.pid))
            .collect::<Vec<_>>()
    );
}

fn config_for(backend: &Backend, model: &std::path::Path) -> RuntimeConfig {
    let mut config = backend.config.clone();
    config.model_path = model.to_owned();
    config
}

async fn init_err(backend: &Backend, config: RuntimeConfig) -> Error {
    let mut runtime = (backend.new_runtime)();
    let err = runtime
        .initialize(config)
        .await
        .expect_err("initialize must fail");
    assert!(
        !runtime.is_ready().await,
        "nothing is ready after a failed initialize"
    );
    err
}

async fn wait_port_closed(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "port {port} still answers");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
