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

const QUESTION: &str = "What is the capital of France?";

/// Every check of the conformance suite, in the order they run. `shared`
/// checks only need a running engine; `own` ones start, stop, break or
/// configure their engine, which is what they check.
pub const CONFORMANCE: &[crate::harness::Check] = &[
    crate::check!(lifecycle, own),
    crate::check!(generation, shared),
    crate::check!(streaming_utf8, shared),
    crate::check!(concurrency, shared),
    crate::check!(cancellation, shared),
    crate::check!(bad_requests, shared),
    crate::check!(http_surface, shared),
    crate::check!(shutdown_in_flight, own),
    crate::check!(fault_bad_models, own),
    crate::check!(fault_bad_options, own),
    crate::check!(fault_missing_binary, own),
    crate::check!(fault_port_taken, shared),
    crate::check!(fault_port_squatted, own),
    crate::check!(fault_engine_killed, own),
    crate::check!(fault_engine_hung, own),
    crate::check!(fault_dropped_runtime, own),
    crate::check!(fault_owner_killed, own),
    crate::check!(slow_readers, own),
    crate::check!(secrets, own),
    crate::check!(gateway_load, own),
];

/// Long enough to be still generating when a check interrupts it, short
/// enough to fit the suite's 1024-token context with the prompt (vLLM refuses
/// max_tokens beyond the context).
const LONG_ANSWER: u32 = 800;

/// A started runtime for `backend`, or a panic with the error chain.
pub async fn start(backend: &Backend) -> Box<dyn ModelRuntime> {
    start_with(backend, backend.config.clone()).await
}

async fn start_with(backend: &Backend, config: RuntimeConfig) -> Box<dyn ModelRuntime> {
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
            let values: Vec<f64> = text
                .lines()
                .filter(|line| line.starts_with(gauge))
                .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
                .collect();
            assert!(!values.is_empty(), "{gauge} is in /metrics:\n{text}");
            values.iter().sum::<f64>() as usize
        }
    }
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
fn engine_processes(backend: &Backend, runtime: &dyn ModelRuntime) -> Vec<procs::Proc> {
    match backend.server {
        Some(_) => {
            let found = procs::engine_on_port(procs::port_of(&runtime.base_url()));
            assert!(
                !found.is_empty(),
                "found {}'s engine by its port ({})",
                backend.name,
                runtime.base_url()
            );
            found
        }
        None => Vec::new(),
    }
}

fn pids(procs: &[procs::Proc]) -> Vec<i32> {
    procs.iter().map(|p| p.pid).collect()
}

/// Runs after every check: no process of the engine binary may be left but
/// the suite's shared engine ([`crate::harness::shared_runtime`]).
pub async fn assert_no_engine_left(backend: &Backend) {
    let Some(server) = &backend.server else {
        return;
    };
    let shared = backend
        .shared
        .as_ref()
        .map(|shared| shared.groups())
        .unwrap_or_default();
    let left: Vec<i32> = procs::all()
        .iter()
        .filter(|p| {
            p.args
                .first()
                .is_some_and(|program| std::path::Path::new(program) == server.binary)
                || server.process_markers.iter().any(|m| p.cmdline.contains(m))
        })
        .filter(|p| !shared.contains(&p.pgid))
        .map(|p| p.pid)
        .collect();
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

/// initialize, is_ready, health_check, base_url over HTTP, metadata, shutdown,
/// shutdown twice, initialize twice, initialize again after shutdown.
pub async fn lifecycle(backend: &Backend) {
    let mut runtime = (backend.new_runtime)();
    assert!(!runtime.is_ready().await, "not ready before initialize");
    assert!(matches!(
        runtime.health_check().await,
        Err(Error::NotInitialized)
    ));
    assert!(matches!(
        runtime.generate(greedy(QUESTION, 4)).await,
        Err(Error::NotInitialized)
    ));
    runtime
        .shutdown()
        .await
        .expect("shutdown before initialize is fine");

    runtime
        .initialize(backend.config.clone())
        .await
        .unwrap_or_else(|err| panic!("initialize: {}", chain(&err)));
    assert!(runtime.is_ready().await);
    let health = runtime.health_check().await.expect("healthy");
    assert!(!health.is_empty());

    let metadata = runtime.metadata();
    assert!(!metadata.version.is_empty(), "version read from the engine");
    assert_eq!(metadata.format, runtime.supported_format());
    if let Some(server) = &backend.server {
        let reported = match server.version_source {
            crate::VersionSource::VersionFlag => {
                let output = std::process::Command::new(&server.binary)
                    .arg("--version")
                    .env("LD_LIBRARY_PATH", server.binary.parent().unwrap())
                    .output()
                    .expect("the engine binary runs");
                String::from_utf8_lossy(&output.stderr).to_string()
                    + &String::from_utf8_lossy(&output.stdout)
            }
            crate::VersionSource::HttpVersion => {
                reqwest::get(format!("{}/version", runtime.base_url()))
                    .await
                    .expect("GET /version")
                    .text()
                    .await
                    .expect("a version body")
            }
        };
        assert!(
            reported.contains(&metadata.version),
            "metadata version {:?} is what the engine reports: {reported}",
            metadata.version
        );
    }

    // base_url is a real OpenAI endpoint for any HTTP client.
    let base_url = runtime.base_url();
    assert!(base_url.starts_with("http://127.0.0.1:"), "{base_url}");
    assert_eq!(
        runtime.completions_url(),
        format!("{base_url}/v1/chat/completions")
    );
    let http = reqwest::Client::new();
    let key = runtime.api_key();
    let authorized = |builder: reqwest::RequestBuilder| match &key {
        Some(key) => builder.bearer_auth(key.expose()),
        None => builder,
    };
    let models = authorized(http.get(format!("{base_url}/v1/models")))
        .send()
        .await
        .expect("GET /v1/models");
    assert_eq!(models.status(), 200);
    let body: serde_json::Value = authorized(http.post(runtime.completions_url()))
        .json(&serde_json::json!({
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 8,
            "temperature": 0
        }))
        .send()
        .await
        .expect("POST /v1/chat/completions")
        .json()
        .await
        .expect("a JSON chat completion");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("");
    assert!(!content.is_empty(), "{body}");
    if key.is_some() {
        let anonymous = http
            .post(runtime.completions_url())
            .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("POST without a key");
        assert_eq!(
            anonymous.status(),
            401,
            "the per-instance API key is enforced"
        );
    }

    // A second initialize is an error and starts nothing.
    let before = engine_processes(backend, runtime.as_ref());
    let running_before = backend
        .server
        .as_ref()
        .map(|s| procs::running(&s.binary).len());
    let err = runtime
        .initialize(backend.config.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyInitialized), "{err:?}");
    assert!(runtime.is_ready().await, "the running engine is untouched");
    let running_after = backend
        .server
        .as_ref()
        .map(|s| procs::running(&s.binary).len());
    assert_eq!(
        running_before, running_after,
        "no second engine was started"
    );

    runtime.shutdown().await.expect("shutdown");
    assert!(!runtime.is_ready().await, "not ready after shutdown");
    assert!(matches!(
        runtime.health_check().await,
        Err(Error::NotInitialized)
    ));
    assert!(runtime.base_url().is_empty());
    let left = procs::wait_gone(&pids(&before), Duration::from_secs(1)).await;
    assert!(
        left.is_empty(),
        "shutdown stops every engine process: {left:?}"
    );
    runtime.shutdown().await.expect("shutdown twice is fine");

    runtime
        .initialize(backend.config.clone())
        .await
        .unwrap_or_else(|err| panic!("initialize after shutdown: {}", chain(&err)));
    assert!(runtime.is_ready().await);
    runtime.shutdown().await.expect("shutdown");
}

/// Content, finish reason and usage; determinism; streamed equals plain;
/// max_tokens; stop strings; seeds.
pub async fn generation(backend: &Backend) {
    let runtime = crate::harness::shared_runtime(backend).await;
    let request = greedy(QUESTION, 24);

    let first = runtime.generate(request.clone()).await.expect("generate");
    assert!(!first.content.trim().is_empty(), "content");
    assert!(first.finish_reason.is_some(), "finish reason");
    let usage = first.usage.expect("usage");
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    let second = runtime
        .generate(request.clone())
        .await
        .expect("generate again");
    assert_eq!(
        first.content, second.content,
        "temperature 0 is deterministic"
    );

    let streamed = collect_stream(runtime, request.clone()).await.concat();
    assert_eq!(
        streamed, first.content,
        "streamed deltas concatenate to the plain answer"
    );

    let mut events = runtime
        .generate_events(request.clone())
        .await
        .expect("events");
    let mut finished = None;
    while let Some(event) = events.next().await {
        if let StreamEvent::Finished {
            usage,
            finish_reason,
            ..
        } = event.expect("event")
        {
            finished = Some((usage, finish_reason));
        }
    }
    let (stream_usage, stream_finish) = finished.expect("the event stream ends with Finished");
    assert_eq!(stream_usage, first.usage, "streamed usage matches");
    assert_eq!(stream_finish, first.finish_reason);

    let short = runtime.generate(greedy(QUESTION, 5)).await.expect("short");
    assert_eq!(short.finish_reason, Some(FinishReason::Length));
    assert_eq!(short.usage.expect("usage").completion_tokens, 5);

    // Stop at a word the model is known (from the run above) to produce.
    let words: Vec<&str> = first.content.split_whitespace().collect();
    assert!(
        words.len() >= 3,
        "enough words to pick a stop string: {:?}",
        first.content
    );
    let stop = words[2];
    let cut = first
        .content
        .find(stop)
        .expect("the stop word is in the content");
    let stopped = runtime
        .generate(request.clone().with_stop(stop))
        .await
        .expect("generate with stop");
    assert_eq!(
        stopped.content,
        &first.content[..cut],
        "stops before {stop:?}"
    );
    assert_eq!(stopped.finish_reason, Some(FinishReason::Stop));

    let sampled = |seed| {
        InferenceRequest::from_prompt("Write a short poem about the sea.")
            .with_max_tokens(24)
            .with_temperature(0.8)
            .with_seed(seed)
    };
    let a = runtime.generate(sampled(42)).await.expect("seeded");
    let b = runtime.generate(sampled(42)).await.expect("seeded again");
    assert_eq!(a.content, b.content, "a seed at temperature 0.8 repeats");
    // An engine that ignored temperature or seed would answer these alike.
    let mut others = std::collections::BTreeSet::new();
    for seed in [1, 2, 3] {
        others.insert(
            runtime
                .generate(sampled(seed))
                .await
                .expect("seeded")
                .content,
        );
    }
    others.insert(a.content);
    assert!(
        others.len() >= 3,
        "four seeds at temperature 0.8 give at least three different answers: {others:?}"
    );
}

/// Non-ASCII output arrives as valid UTF-8 deltas with no replacement characters.
pub async fn streaming_utf8(backend: &Backend) {
    let runtime = crate::harness::shared_runtime(backend).await;
    let mut non_ascii = false;
    for prompt in [
        QUESTION,
        "Réponds en français : où se trouve la tour Eiffel ?",
        "写一句关于春天的中文句子。",
        "Reply with three emoji that describe happiness.",
    ] {
        let request = greedy(prompt, 32);
        let deltas = collect_stream(runtime, request.clone()).await;
        let streamed = deltas.concat();
        assert!(
            !streamed.contains('\u{fffd}'),
            "no replacement characters: {streamed:?}"
        );
        let plain = runtime.generate(request).await.expect("generate");
        assert_eq!(streamed, plain.content, "{prompt}");
        non_ascii |= !streamed.is_ascii();
    }
    assert!(
        non_ascii,
        "at least one answer (French, Chinese, emoji) is not ASCII"
    );
}

/// Four requests at once all succeed, each with the answer the same request
/// gets alone.
pub async fn concurrency(backend: &Backend) {
    let runtime = crate::harness::shared_runtime(backend).await;
    let prompts = [
        "Name a color.",
        "Name an animal.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
    ];
    let mut alone = Vec::new();
    for prompt in prompts {
        let answer = runtime.generate(greedy(prompt, 16)).await;
        alone.push(
            answer
                .unwrap_or_else(|err| panic!("{prompt}: {}", chain(&err)))
                .content,
        );
    }
    let together = futures::future::join_all(
        prompts
            .iter()
            .map(|prompt| runtime.generate(greedy(prompt, 16))),
    )
    .await;
    for ((prompt, answer), expected) in prompts.iter().zip(together).zip(&alone) {
        let answer = answer.unwrap_or_else(|err| panic!("{prompt}: {}", chain(&err)));
        assert_eq!(
            &answer.content, expected,
            "{prompt}: concurrent and sequential answers"
        );
    }
    let streams = futures::future::join_all(
        prompts
            .iter()
            .map(|prompt| collect_stream(runtime, greedy(prompt, 16))),
    )
    .await;
    for ((prompt, deltas), expected) in prompts.iter().zip(streams).zip(&alone) {
        assert_eq!(&deltas.concat(), expected, "{prompt}: concurrent streams");
    }
}

/// Dropping a stream after a few deltas cancels the generation in the engine.
pub async fn cancellation(backend: &Backend) {
    let runtime = crate::harness::shared_runtime(backend).await;
    let long = long_request();
    let mut stream = runtime.generate_stream(long).await.expect("stream");
    for _ in 0..3 {
        stream.next().await.expect("a delta").expect("a delta");
    }
    assert_eq!(
        engine_activity(backend, runtime).await,
        1,
        "the engine reports the generation running"
    );
    let dropped = Instant::now();
    drop(stream);

    let idle_after = wait_engine_idle(backend, runtime, Duration::from_secs(3)).await;
    assert!(
        idle_after.is_some(),
        "the engine kept generating after the stream was dropped"
    );
    tracing::info!(idle_after = ?idle_after.unwrap(), "engine idle after the stream was dropped");
    // Either way the engine is free for the next request at once.
    let next = runtime
        .generate(greedy(QUESTION, 8))
        .await
        .expect("next request");
    assert!(!next.content.is_empty());
    assert!(
        dropped.elapsed() < Duration::from_secs(10),
        "the next request was served promptly ({:?})",
        dropped.elapsed()
    );
}

/// Shutdown with a stream in flight ends the stream with `ShutDown` and does
/// not wait for the generation to finish.
pub async fn shutdown_in_flight(backend: &Backend) {
    let mut runtime = start(backend).await;
    let engine = engine_processes(backend, runtime.as_ref());
    let long = long_request();
    let mut stream = runtime.generate_stream(long).await.expect("stream");
    stream.next().await.expect("a delta").expect("a delta");
    let started = Instant::now();
    runtime.shutdown().await.expect("shutdown");
    let took = started.elapsed();
    assert!(
        took < backend.exit_budget,
        "shutdown took {took:?} with a stream in flight"
    );
    let ended_with = stream_outcome(&mut stream, Duration::from_secs(5)).await;
    assert!(
        matches!(ended_with, Some(Error::ShutDown)),
        "the stream ends with ShutDown, got {ended_with:?}"
    );
    assert!(
        procs::wait_gone(&pids(&engine), Duration::from_secs(1))
            .await
            .is_empty()
    );
}

/// Empty messages, max_tokens 0 and a prompt over the context are typed errors,
/// and the engine stays healthy.
pub async fn bad_requests(backend: &Backend) {
    let runtime = crate::harness::shared_runtime(backend).await;
    let empty = InferenceRequest::new(Vec::new());
    assert!(matches!(
        runtime.generate(empty.clone()).await,
        Err(Error::InvalidRequest { field, .. }) if field == "messages"
    ));
    assert!(matches!(
        runtime.generate_stream(empty).await.map(|_| ()),
        Err(Error::InvalidRequest { field, .. }) if field == "messages"
    ));
    let zero = InferenceRequest::from_prompt("hi").with_max_tokens(0);
    assert!(matches!(
        runtime.generate(zero).await,
        Err(Error::InvalidRequest { field, .. }) if field == "max_tokens"
    ));
    let hot = InferenceRequest::from_prompt("hi").with_temperature(3.0);
    assert!(matches!(
        runtime.generate(hot).await,
        Err(Error::InvalidRequest { field, .. }) if field == "temperature"
    ));

    let long_prompt = "hello ".repeat(crate::backends::CONTEXT_SIZE as usize * 3);
    let long = InferenceRequest::new(vec![ChatMessage::user(long_prompt)]).with_max_tokens(8);
    for result in [
        runtime.generate(long.clone()).await.map(|_| ()),
        runtime.generate_stream(long).await.map(|_| ()),
    ] {
        match result {
            Err(Error::ContextExceeded {
                prompt_tokens,
                context_size,
            }) => {
                assert!(prompt_tokens > context_size);
            }
            Err(err @ Error::Api { .. }) if err.is_client_error() => {}
            other => panic!("a prompt over the context is a typed client error, got {other:?}"),
        }
    }
    assert!(
        runtime.health_check().await.is_ok(),
        "healthy after bad requests"
    );
    let ok = runtime
        .generate(greedy(QUESTION, 4))
        .await
        .expect("still serving");
    assert!(!ok.content.is_empty());
}

/// Missing model, random bytes named .gguf, a GGUF truncated at 10 MB.
pub async fn fault_bad_models(backend: &Backend) {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("missing.gguf");
    let err = init_err(backend, config_for(backend, &missing)).await;
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err:?}");

    let noise = dir.path().join("noise.gguf");
    let bytes: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&noise, bytes).unwrap();
    let err = init_err(backend, config_for(backend, &noise)).await;
    assert!(matches!(err, Error::InvalidModel { .. }), "{err:?}");

    let truncated = dir.path().join("truncated.gguf");
    let real = std::fs::read(crate::required_env(crate::MODEL_ENV)).unwrap();
    std::fs::write(&truncated, &real[..10 * 1024 * 1024]).unwrap();
    let started = Instant::now();
    let err = init_err(backend, config_for(backend, &truncated)).await;
    assert!(
        started.elapsed() < backend.start_budget,
        "a truncated model fails promptly ({:?})",
        started.elapsed()
    );
    match &err {
        Error::EngineExited { log_tail, .. } => {
            assert!(!log_tail.is_empty(), "the error carries the engine's log")
        }
        // Backends that do not take GGUF (vLLM) refuse it before starting.
        Error::InvalidModel { .. } | Error::Engine { .. } | Error::UnsupportedFormat { .. } => {}
        other => panic!("a truncated GGUF is reported as such, got {other:?}"),
    }
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

/// A misspelled backend option fails `initialize` at once with an error that
/// names the key and the closest known one; no engine process is started.
pub async fn fault_bad_options(backend: &Backend) {
    let (typo, intended) = backend.misspelled_option;
    let config = backend.config.clone().with_extra_config(typo, 2);
    let started = Instant::now();
    let err = init_err(backend, config).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused before anything started ({:?})",
        started.elapsed()
    );
    match &err {
        Error::InvalidConfig { field, reason } => {
            assert_eq!(field, &format!("extra_config.{typo}"));
            assert!(
                reason.contains(&format!("did you mean `{intended}`?")),
                "{reason}"
            );
        }
        other => panic!("expected InvalidConfig naming {typo}, got {other:?}"),
    }
    if let Some(server) = &backend.server {
        assert!(
            procs::running(&server.binary).is_empty(),
            "no engine process was started"
        );
    }
}

/// A missing engine binary is a typed error naming what to do.
pub async fn fault_missing_binary(backend: &Backend) {
    if backend.server.is_none() {
        not_applicable(
            backend,
            "fault_missing_binary",
            "in process, no binary to miss",
        );
        return;
    }
    let mut config = backend.config.clone();
    config.runtime_binary = Some("/nonexistent/engine-binary".into());
    let err = init_err(backend, config).await;
    match err {
        Error::BinaryNotFound { hint, .. } => assert!(hint.contains("/nonexistent/engine-binary")),
        other => panic!("expected BinaryNotFound, got {other:?}"),
    }
}

/// A port taken by another socket fails cleanly; port 0 finds a free one.
pub async fn fault_port_taken(backend: &Backend) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = backend.config.clone();
    config.port = port;
    let started = Instant::now();
    let err = init_err(backend, config).await;
    assert!(
        started.elapsed() < backend.start_budget,
        "fails promptly: {:?}",
        started.elapsed()
    );
    let text = chain(&err);
    assert!(
        matches!(err, Error::EngineExited { .. } | Error::Io { .. }),
        "a taken port is reported: {text}"
    );
    drop(listener);

    // The suite's engines are configured with port 0: it found a free one.
    assert_eq!(backend.config.port, 0);
    let runtime = crate::harness::shared_runtime(backend).await;
    assert_ne!(procs::port_of(&runtime.base_url()), 0);
}

/// The engine SIGKILLed mid-stream: the stream ends with EngineExited carrying
/// the log tail within a second, and is_ready turns false.
pub async fn fault_engine_killed(backend: &Backend) {
    if backend.server.is_none() {
        not_applicable(
            backend,
            "fault_engine_killed",
            "in process, no engine process to kill",
        );
        return;
    }
    let mut runtime = start(backend).await;
    let engine = engine_processes(backend, runtime.as_ref());
    let long = long_request();
    let mut stream = runtime.generate_stream(long).await.expect("stream");
    stream.next().await.expect("a delta").expect("a delta");

    let killed = Instant::now();
    procs::signal_all(&engine, nix::sys::signal::Signal::SIGKILL);
    let outcome = stream_outcome(&mut stream, Duration::from_secs(1)).await;
    match outcome {
        Some(Error::EngineExited {
            log_tail, status, ..
        }) => {
            assert!(!log_tail.is_empty(), "the log tail is carried");
            assert!(status.contains('9') || status.contains("KILL"), "{status}");
        }
        other => panic!("expected EngineExited, got {other:?}"),
    }
    assert!(killed.elapsed() < Duration::from_secs(1));
    assert!(
        !runtime.is_ready().await,
        "is_ready is false once the engine died"
    );
    assert!(matches!(
        runtime.health_check().await,
        Err(Error::EngineExited { .. })
    ));
    runtime.shutdown().await.expect("shutdown after a crash");
}

/// Dropping a runtime without shutdown leaves no process behind.
pub async fn fault_dropped_runtime(backend: &Backend) {
    let runtime = start(backend).await;
    let engine = engine_processes(backend, runtime.as_ref());
    let port = procs::port_of(&runtime.base_url());
    drop(runtime);
    let left = procs::wait_gone(&pids(&engine), backend.exit_budget).await;
    assert!(
        left.is_empty(),
        "dropping the runtime stops the engine: {left:?}"
    );
    wait_port_closed(port, Duration::from_secs(1)).await;
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

/// The process owning the runtime is SIGKILLed: the engine is gone within a second.
pub async fn fault_owner_killed(backend: &Backend) {
    let helper = backend
        .hold_runtime
        .expect("suite! sets the path of the hold-runtime helper");
    let mut child = tokio::process::Command::new(helper)
        .arg(backend.name)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("hold-runtime starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(backend.start_budget, lines.next_line())
        .await
        .expect("hold-runtime reports ready")
        .expect("reading hold-runtime")
        .expect("hold-runtime printed a line");
    let base_url = ready
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("unexpected hold-runtime output {ready:?}"));
    let port = procs::port_of(base_url);
    let engine = match backend.server {
        Some(_) => procs::engine_on_port(port),
        None => Vec::new(),
    };
    if let Some(server) = &backend.server {
        assert!(!engine.is_empty(), "found the engine of hold-runtime");
        // A leader that cannot act on its parent-death signal: the engine's
        // other processes must still go (the group's watcher, or SIGKILL).
        let leaders: Vec<procs::Proc> = engine
            .iter()
            .filter(|p| {
                p.args
                    .first()
                    .is_some_and(|a| std::path::Path::new(a) == server.binary)
            })
            .cloned()
            .collect();
        assert!(!leaders.is_empty(), "found the engine's leader");
        procs::signal_all(&leaders, nix::sys::signal::Signal::SIGSTOP);
    }

    child.start_kill().expect("SIGKILL hold-runtime");
    child.wait().await.expect("reap hold-runtime");
    let left = procs::wait_gone(&pids(&engine), backend.exit_budget).await;
    assert!(left.is_empty(), "the engine dies with its owner: {left:?}");
    wait_port_closed(port, Duration::from_secs(1)).await;
}

/// A process squatting on the configured port and answering every request
/// with 200 cannot pass for the engine: initialize fails (the engine cannot
/// bind), and the squatter never receives the API key.
pub async fn fault_port_squatted(backend: &Backend) {
    if backend.server.is_none() {
        not_applicable(
            backend,
            "fault_port_squatted",
            "binds its own listener before loading: a taken port fails at once",
        );
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (saw, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    let squatter = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let saw = saw.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 8192];
                let read = socket.read(&mut buffer).await.unwrap_or(0);
                let _ = saw.send(String::from_utf8_lossy(&buffer[..read]).into_owned());
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}")
                    .await;
            });
        }
    });
    let key = "squatter-must-never-see-this-key";
    let config = backend.config.clone().with_port(port).with_api_key(key);
    let err = init_err(backend, config).await;
    squatter.abort();
    assert!(
        matches!(
            err,
            Error::EngineExited { .. } | Error::StartupTimeout { .. }
        ),
        "the engine could not bind, so it is not ready: {}",
        chain(&err)
    );
    let mut requests = Vec::new();
    while let Ok(request) = seen.try_recv() {
        requests.push(request);
    }
    assert!(
        requests.iter().all(|r| !r.contains(key)),
        "the squatter received the key: {requests:?}"
    );
}

/// The engine stops (SIGSTOP: its socket still accepts connections, nothing
/// answers): an open stream, a plain request and a new stream all end with
/// `EngineUnresponsive` within the hang timeout and a probe's margin;
/// `is_ready` and `health_check` say so; when it resumes, it serves again.
/// Before that, a slow but live engine (a long prefill, no bytes for a
/// while) is left alone.
pub async fn fault_engine_hung(backend: &Backend) {
    if backend.server.is_none() {
        not_applicable(
            backend,
            "fault_engine_hung",
            "in process: no engine process to stop",
        );
        return;
    }
    // Shorter than the long prompt's prefill (about 1.5 s for llama.cpp here),
    // which must not count as a hang. One slot, so the prompt fits.
    const HANG: Duration = Duration::from_secs(1);
    let config = backend
        .config
        .clone()
        .with_parallel(1)
        .with_hang_timeout(HANG);
    let mut runtime = start_with(backend, config).await;
    let engine = engine_processes(backend, runtime.as_ref());

    // Slow but alive: a prompt that takes longer to prefill than the hang timeout.
    let slow = InferenceRequest::from_prompt("Tell me about the sea. ".repeat(120))
        .with_max_tokens(4)
        .with_temperature(0.0);
    let prefill_started = Instant::now();
    let prefilled = runtime.generate(slow).await;
    assert!(
        prefilled.is_ok(),
        "a long prefill is not taken for a hang: {:?}",
        prefilled.map_err(|e| chain(&e))
    );
    tracing::info!(took = ?prefill_started.elapsed(), hang = ?HANG, "a long prefill was left alone");

    let mut open = runtime
        .generate_stream(long_request())
        .await
        .expect("stream");
    open.next().await.expect("a delta").expect("a delta");
    let stopped = Instant::now();
    procs::signal_all(&engine, nix::sys::signal::Signal::SIGSTOP);
    let limit = HANG * 5;
    let (plain, new_stream, open_end) = tokio::join!(
        tokio::time::timeout(limit, runtime.generate(greedy(QUESTION, 8))),
        tokio::time::timeout(limit, async {
            match runtime.generate_stream(greedy(QUESTION, 8)).await {
                Ok(mut stream) => stream_outcome(&mut stream, limit).await,
                Err(err) => Some(err),
            }
        }),
        stream_outcome(&mut open, limit),
    );
    let waited = stopped.elapsed();
    let unresponsive = |err: &Option<Error>| matches!(err, Some(Error::EngineUnresponsive { .. }));
    let plain = plain.expect("the plain request ends").err();
    let new_stream = new_stream.expect("the new stream ends");
    let verdicts = (
        unresponsive(&plain),
        unresponsive(&new_stream),
        unresponsive(&open_end),
    );
    assert_eq!(
        verdicts,
        (true, true, true),
        "every request ends with EngineUnresponsive: {plain:?} / {new_stream:?} / {open_end:?}"
    );
    assert!(waited < HANG * 5, "they ended within {waited:?}");
    assert!(!runtime.is_ready().await, "a hung engine is not ready");
    assert!(matches!(
        runtime.health_check().await,
        Err(Error::EngineUnresponsive { .. })
    ));

    procs::signal_all(&engine, nix::sys::signal::Signal::SIGCONT);
    let deadline = Instant::now() + HANG * 5;
    while !runtime.is_ready().await {
        assert!(
            Instant::now() < deadline,
            "ready again once the engine answers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = runtime.generate(greedy(QUESTION, 4)).await;
    assert!(
        again.is_ok(),
        "serving again: {:?}",
        again.map_err(|e| chain(&e))
    );
    runtime.shutdown().await.expect("shutdown");
}

/// Three clients that never read their streamed answers hold only their own
/// requests: a fourth, ordinary request is answered, and shutdown finishes
/// within its budget.
pub async fn slow_readers(backend: &Backend) {
    let mut runtime = start(backend).await;
    let address: std::net::SocketAddr = runtime
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .expect("a socket address");
    let key = crate::bearer(runtime.as_ref());
    let long = wire::chat_body("Write a very long story about a dragon.", 800, true);
    let mut sleepers = Vec::new();
    for _ in 0..3 {
        sleepers.push(wire::never_reading_client(address, &key, &long).await);
    }
    // Let them fill what the network buffers hold.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answered = tokio::time::timeout(
        Duration::from_secs(60),
        runtime.generate(greedy(QUESTION, 8)),
    )
    .await
    .expect("a fourth request is answered while three clients never read");
    assert!(answered.is_ok(), "{:?}", answered.map_err(|e| chain(&e)));

    let started = Instant::now();
    runtime.shutdown().await.expect("shutdown");
    let budget = backend.config.shutdown_grace + backend.exit_budget;
    assert!(
        started.elapsed() < budget,
        "shutdown with clients that never read took {:?} (budget {budget:?})",
        started.elapsed()
    );
    drop(sleepers);
}

/// The API key never shows: not on any engine process's command line (which
/// every local user can read), not in what the engine or we log, not in
/// `Debug` output.
pub async fn secrets(backend: &Backend) {
    let key = format!("sentinel-{}", std::process::id());
    let config = backend.config.clone().with_api_key(&key);
    let shown = format!("{config:?}");
    assert!(!shown.contains(&key), "Debug shows the key: {shown}");
    crate::log_capture::start();
    let mut runtime = start_with(backend, config).await;
    for process in engine_processes(backend, runtime.as_ref()) {
        assert!(
            !process.cmdline.contains(&key),
            "the key is on the command line of {}: {}",
            process.pid,
            process.cmdline
        );
    }
    let answer = runtime.generate(greedy(QUESTION, 4)).await;
    assert!(
        answer.is_ok(),
        "the engine takes the key: {:?}",
        answer.map_err(|e| chain(&e))
    );
    runtime.shutdown().await.expect("shutdown");
    let logged = crate::log_capture::take();
    assert!(!logged.is_empty(), "the log was captured");
    assert!(!logged.contains(&key), "the key is in the log");
}

/// The runtime's own HTTP server (candle serves one; server backends expose
/// the engine's, which is not ours): a cross-site `text/plain` POST, a foreign
/// `Host` or `Origin`, and fields we do not implement are refused;
/// `max_completion_tokens` is honoured.
pub async fn http_surface(backend: &Backend) {
    if backend.server.is_some() {
        not_applicable(
            backend,
            "http_surface",
            "base_url is the engine's own server; the gateway's is checked in the cli suite",
        );
        return;
    }
    let runtime = crate::harness::shared_runtime(backend).await;
    check_http_surface(&runtime.completions_url(), &crate::bearer(runtime)).await;
}

/// What every HTTP server of ours must refuse and honour (used for candle's
/// and the gateway's).
pub async fn check_http_surface(completions_url: &str, key: &str) {
    let http = reqwest::Client::new();
    let body = wire::chat_body(QUESTION, 3, false);
    let post = |body: &serde_json::Value| {
        http.post(completions_url)
            .bearer_auth(key)
            .json(body)
            .send()
    };

    let plain = http
        .post(completions_url)
        .bearer_auth(key)
        .header("Content-Type", "text/plain")
        .header("Origin", "http://evil.example")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(
        plain.status() == 415 || plain.status() == 403,
        "a cross-site text/plain POST is refused: {}",
        plain.status()
    );
    let no_type = http
        .post(completions_url)
        .bearer_auth(key)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        no_type.status(),
        415,
        "a body without Content-Type is refused"
    );
    let rebound = http
        .post(completions_url)
        .bearer_auth(key)
        .header("Host", "evil.example")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403, "a foreign Host name is refused");
    let foreign_origin = http
        .post(completions_url)
        .bearer_auth(key)
        .header("Origin", "http://evil.example")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign_origin.status(), 403, "a foreign Origin is refused");

    for (field, value) in [
        ("n", serde_json::json!(2)),
        (
            "response_format",
            serde_json::json!({"type": "json_object"}),
        ),
        (
            "tools",
            serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ),
    ] {
        let mut asking = body.clone();
        asking[field] = value;
        let response = post(&asking).await.unwrap();
        assert_eq!(response.status(), 400, "{field} is refused");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], field, "{error}");
    }

    let mut limited = body.clone();
    limited["max_tokens"] = serde_json::Value::Null;
    limited["max_completion_tokens"] = serde_json::json!(3);
    limited["messages"][0]["content"] = "Write a long story about the sea.".into();
    let answer: serde_json::Value = post(&limited).await.unwrap().json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 3, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
}

/// Through the gateway (the router over a RuntimeManager, as
/// `model-runtime serve` runs it): 200 streamed requests, 16 at a time, 50
/// of them abandoned mid-stream: no error, every completed answer whole, the
/// engine idle and healthy afterwards, nothing left in flight. Then the same
/// with the engine SIGKILLed midway: every request ends.
pub async fn gateway_load(backend: &Backend) {
    let (manager, url, server) = crate::gateway::start(backend, backend.config.clone()).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let outcomes = load(&http, &url, 200, 16, |i| i % 4 == 3).await;
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:?}",
        failures.len()
    );
    assert_eq!(outcomes.len(), 200);
    assert_eq!(manager.in_flight(), 0, "nothing left in flight");
    let idle = manager
        .with_runtime(None, async |runtime| {
            wait_engine_idle(backend, runtime, Duration::from_secs(5)).await
        })
        .await
        .unwrap();
    assert!(idle.is_some(), "the engine runs no generation afterwards");
    let healthy = manager
        .with_runtime(None, async |runtime| runtime.health_check().await)
        .await
        .unwrap();
    assert!(healthy.is_ok(), "healthy afterwards: {healthy:?}");
    manager.shutdown_within(Duration::ZERO).await;
    server.abort();

    if backend.server.is_none() {
        return;
    }
    let (manager, url, server) = crate::gateway::start(backend, backend.config.clone()).await;
    let engine = manager
        .with_runtime(None, async |runtime| engine_processes(backend, runtime))
        .await
        .unwrap();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        procs::signal_all(&engine, nix::sys::signal::Signal::SIGKILL);
    });
    let outcomes = load(&http, &url, 200, 16, |_| false).await;
    killer.await.unwrap();
    let hung: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err())
        .filter(|e| e.starts_with("no answer"))
        .collect();
    assert!(
        hung.is_empty(),
        "requests hung after the engine was killed: {hung:?}"
    );
    assert!(
        outcomes.iter().any(Result::is_err),
        "the kill was noticed by some request"
    );
    manager.shutdown_within(Duration::ZERO).await;
    server.abort();
}

/// Sends `count` streamed requests, `concurrency` at a time; those for which
/// `abandon` holds are dropped after their first delta. Each outcome is `Ok`
/// for a whole answer (or a clean abandon) and `Err` with what went wrong.
async fn load(
    http: &reqwest::Client,
    url: &str,
    count: usize,
    concurrency: usize,
    abandon: impl Fn(usize) -> bool,
) -> Vec<Result<(), String>> {
    let prompts = [
        "Name a color.",
        "What is 2 + 2?",
        "Say hello.",
        "Name a fruit.",
    ];
    futures::stream::iter(0..count)
        .map(|i| {
            let body = wire::chat_body(prompts[i % prompts.len()], 16, true);
            let abandoned = abandon(i);
            async move {
                let timeout = Duration::from_secs(90);
                if abandoned {
                    wire::stream_then_hang_up(http, url, "", &body, timeout).await
                } else {
                    let answer: SseAnswer =
                        wire::stream_chat(http, url, "", &body, timeout).await?;
                    if answer.is_well_formed() {
                        Ok(())
                    } else {
                        Err(format!("malformed answer: {answer:?}"))
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}
