//! `RemoteRuntime` attached to engines it did not start: a llama-server and a
//! vLLM started here outside any runtime, and our own gateway over TLS with a
//! certificate made in the test. The conformance checks that apply to a
//! server we do not own run against each; shutting the runtime down leaves
//! the server running.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use conformance::backends::{candle, llamacpp, vllm};
use conformance::checks::{self, chain};
use conformance::{Activity, Backend, procs};
use model_runtime::BackendChoice;
use runtime_core::{Error, ModelRuntime, RuntimeConfig};
use runtime_gateway::{GatewayConfig, ModelSpec, RuntimeManager};
use runtime_process::{ServerProcess, StopPolicy};
use runtime_remote::{RemoteOptions, RemoteRuntime};

/// The engine's own command (key `bench`, model `bench`), started by hand.
async fn start_outside(backend: &Backend) -> (ServerProcess, u16) {
    let engine = backend.server.as_ref().expect("a server backend");
    let port = runtime_process::free_port("127.0.0.1").unwrap();
    let process = ServerProcess::spawn(&(engine.command)(&backend.config, port)).unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/health");
    process
        .wait_until_ready(backend.start_budget, || {
            let http = http.clone();
            let url = url.clone();
            async move { matches!(http.get(&url).send().await, Ok(r) if r.status() == 200) }
        })
        .await
        .unwrap_or_else(|err| panic!("{} starts by hand: {}", backend.name, chain(&err)));
    (process, port)
}

/// Stops a server started by [`start_outside`], and checks it is gone.
async fn stop_outside(server: ServerProcess) {
    let pids = vec![server.pid() as i32];
    server.stop(StopPolicy::new(Duration::from_secs(3))).await;
    assert!(
        procs::wait_gone(&pids, Duration::from_secs(2))
            .await
            .is_empty(),
        "the server is gone"
    );
}

/// A remote backend for the checks: `config` attaches to the server.
fn attached(name: &'static str, config: RuntimeConfig, activity: Activity) -> Backend {
    Backend {
        name,
        new_runtime: || Box::new(RemoteRuntime::new()) as Box<dyn ModelRuntime>,
        config,
        server: None,
        start_budget: Duration::from_secs(30),
        exit_budget: Duration::from_secs(1),
        misspelled_option: ("request_timeot", "request_timeout"),
        load_requests: 200,
        activity,
        trusted_certificate: None,
        hold_runtime: None,
        shared: None,
    }
}

/// The checks that apply to a server we attach to (not the ones about our
/// own processes), then: shutdown leaves the server running, and a model it
/// does not list is refused.
async fn checks_that_apply(backend: &Backend, server: Option<&ServerProcess>) {
    conformance::harness::sharing_an_engine(backend, async |backend| {
        checks::generation(backend).await;
        checks::streaming_utf8(backend).await;
        checks::concurrency(backend).await;
        checks::cancellation(backend).await;
        checks::bad_requests(backend).await;
    })
    .await;
    checks::fault_bad_options(backend).await;

    let mut runtime = checks::start(backend).await;
    assert!(runtime.is_ready().await);
    runtime.health_check().await.expect("healthy");
    assert!(
        !runtime.metadata().version.is_empty(),
        "the server's version"
    );
    runtime.shutdown().await.unwrap();
    assert!(!runtime.is_ready().await);
    if let Some(server) = server {
        assert!(server.is_running(), "shutdown left the server alone");
    }
    let mut wrong = backend.config.clone();
    wrong.served_model_name = Some("not-served-here".to_owned());
    let err = RemoteRuntime::new().initialize(wrong).await.unwrap_err();
    assert!(matches!(err, Error::ModelNotServed { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_to_a_llama_server_started_elsewhere() {
    conformance::init_tracing();
    let llama = llamacpp();
    let (server, port) = start_outside(&llama).await;
    let config = RuntimeConfig::new(format!("http://127.0.0.1:{port}"))
        .with_api_key("bench")
        .with_served_model_name("bench");
    checks_that_apply(
        &attached("remote-llamacpp", config, Activity::Slots),
        Some(&server),
    )
    .await;
    server.stop(StopPolicy::new(Duration::from_secs(3))).await;
    checks::assert_no_engine_left(&llama).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_to_a_vllm_started_elsewhere() {
    conformance::init_tracing();
    let engine = vllm();
    let (server, port) = start_outside(&engine).await;
    let config = RuntimeConfig::new(format!("http://127.0.0.1:{port}/v1"))
        .with_api_key("bench")
        .with_served_model_name("bench")
        .with_options(&RemoteOptions::new().with_health_path("/health"));
    checks_that_apply(
        &attached("remote-vllm", config, Activity::VllmMetrics),
        Some(&server),
    )
    .await;
    server.stop(StopPolicy::new(Duration::from_secs(10))).await;
    checks::assert_no_engine_left(&engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_to_our_gateway_over_tls_with_a_certificate_it_is_told_to_trust() {
    conformance::init_tracing();
    let spec = ModelSpec::from_runtime_config("smol", &candle().config)
        .with_backend(BackendChoice::Candle);
    let manager = RuntimeManager::new(GatewayConfig::single(spec)).unwrap();
    manager
        .load("smol")
        .await
        .expect("candle behind the gateway");
    let (base, pem, server) = conformance::gateway::serve_tls(manager.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("gateway.pem");
    std::fs::write(&ca, &pem).unwrap();

    // Without being told to trust the certificate, the runtime refuses it.
    let untrusted = RuntimeConfig::new(&base).with_served_model_name("smol");
    let err = RemoteRuntime::new()
        .initialize(untrusted)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{}", chain(&err));

    let config = RuntimeConfig::new(&base)
        .with_served_model_name("smol")
        .with_options(&RemoteOptions::new().with_ca_certificate(&ca));
    let mut backend = attached("remote-gateway-tls", config, Activity::GatewayMetrics);
    backend.trusted_certificate = Some(pem);
    checks_that_apply(&backend, None).await;
    manager.shutdown_within(Duration::ZERO).await;
    server.abort();
}

/// The gateway fronts a model served elsewhere as easily as a local one:
/// one gateway, several machines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_routes_a_model_to_an_attached_server_beside_a_local_one() {
    conformance::init_tracing();
    let llama = llamacpp();
    let (server, port) = start_outside(&llama).await;
    let mut elsewhere = ModelSpec::new("elsewhere", format!("http://127.0.0.1:{port}"))
        .with_backend(BackendChoice::Remote);
    elsewhere.runtime.api_key = Some("bench".into());
    elsewhere.runtime.served_model_name = Some("bench".to_owned());
    let here = ModelSpec::from_runtime_config("here", &candle().config)
        .with_backend(BackendChoice::Candle);
    let mut config = GatewayConfig::default();
    config.models = vec![elsewhere, here];
    let manager = RuntimeManager::new(config).expect("a valid configuration");
    let (base, gateway) = conformance::gateway::serve(manager.clone()).await;
    let http = reqwest::Client::new();
    for model in ["here", "elsewhere"] {
        let mut body = conformance::wire::chat_body("Name a color.", 4, false);
        body["model"] = model.into();
        let response = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "{model}: {text}");
    }
    manager.shutdown_within(Duration::ZERO).await;
    gateway.abort();
    assert!(
        server.is_running(),
        "the gateway left the attached server alone"
    );
    stop_outside(server).await;
}

/// A man in the middle between a runtime and a real engine: it forwards every
/// request and, while `corrupt` is set, drops the first `}` of each chat
/// answer's text, whole or streamed, as a buggy engine or a broken link
/// might. `broken` counts the answers it changed.
struct CorruptingProxy {
    url: String,
    corrupt: Arc<AtomicBool>,
    broken: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    corrupt: Arc<AtomicBool>,
    broken: Arc<AtomicUsize>,
}

impl CorruptingProxy {
    async fn start(upstream: String) -> Self {
        let corrupt = Arc::new(AtomicBool::new(false));
        let broken = Arc::new(AtomicUsize::new(0));
        let state = ProxyState {
            upstream,
            http: reqwest::Client::new(),
            corrupt: corrupt.clone(),
            broken: broken.clone(),
        };
        let app = axum::Router::new().fallback(forward).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            corrupt,
            broken,
            task,
        }
    }
}

/// Drops the first `}` of `text`, if it has one.
fn drop_a_brace(text: &str) -> Option<String> {
    let at = text.find('}')?;
    Some(format!("{}{}", &text[..at], &text[at + 1..]))
}

async fn forward(
    axum::extract::State(state): axum::extract::State<ProxyState>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut upstream = state
        .http
        .request(parts.method.clone(), format!("{}{path}", state.upstream))
        .body(body);
    for name in [
        axum::http::header::AUTHORIZATION,
        axum::http::header::CONTENT_TYPE,
    ] {
        if let Some(value) = parts.headers.get(&name) {
            upstream = upstream.header(name, value);
        }
    }
    let response = upstream.send().await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(axum::http::HeaderValue::from_static("application/json"));
    let corrupt = path.ends_with("/chat/completions") && state.corrupt.load(Ordering::SeqCst);
    let text = response.text().await.unwrap();
    let text = if !corrupt {
        text
    } else if content_type
        .to_str()
        .unwrap_or("")
        .starts_with("text/event-stream")
    {
        // Each `data:` chunk on its own; only the first brace of the answer goes.
        let mut dropped = false;
        let events: Vec<String> = text
            .split("\n\n")
            .map(|event| {
                let Some(data) = event.strip_prefix("data: ") else {
                    return event.to_owned();
                };
                let Ok(mut chunk) = serde_json::from_str::<serde_json::Value>(data) else {
                    return event.to_owned();
                };
                let Some(delta) = chunk.pointer_mut("/choices/0/delta/content") else {
                    return event.to_owned();
                };
                match delta.as_str().and_then(drop_a_brace) {
                    Some(changed) if !dropped => {
                        dropped = true;
                        *delta = changed.into();
                        format!("data: {chunk}")
                    }
                    _ => event.to_owned(),
                }
            })
            .collect();
        if dropped {
            state.broken.fetch_add(1, Ordering::SeqCst);
        }
        events.join("\n\n")
    } else {
        let mut answer: serde_json::Value = serde_json::from_str(&text).unwrap();
        if let Some(content) = answer.pointer_mut("/choices/0/message/content")
            && let Some(changed) = content.as_str().and_then(drop_a_brace)
        {
            *content = changed.into();
            state.broken.fetch_add(1, Ordering::SeqCst);
        }
        answer.to_string()
    };
    (
        status,
        [(axum::http::header::CONTENT_TYPE, content_type)],
        text,
    )
        .into_response()
}

/// Fail-closed end to end: a real engine's answer to a schema, corrupted on
/// its way (a brace dropped), reaches the gateway's client as the typed
/// error, whole (502 `output_invalid`) or streamed (a final error event and
/// no `[DONE]`), never as a 200 with the wrong shape. The same request
/// through the same proxy left alone is valid, so the error is the
/// corruption's; and the model still answers after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_engine_answer_reaches_the_client_as_output_invalid() {
    conformance::init_tracing();
    let llama = llamacpp();
    let (server, port) = start_outside(&llama).await;
    let proxy = CorruptingProxy::start(format!("http://127.0.0.1:{port}")).await;
    let mut elsewhere = ModelSpec::new("elsewhere", &proxy.url).with_backend(BackendChoice::Remote);
    elsewhere.runtime.api_key = Some("bench".into());
    elsewhere.runtime.served_model_name = Some("bench".to_owned());
    let manager = RuntimeManager::new(GatewayConfig::single(elsewhere)).unwrap();
    let (base, gateway) = conformance::gateway::serve(manager.clone()).await;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": false
    });
    let body = |stream: bool| {
        serde_json::json!({
            "model": "elsewhere",
            "messages": [{"role": "user", "content": "Is Paris in France?"}],
            "max_tokens": 32,
            "temperature": 0,
            "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
        })
    };
    let http = reqwest::Client::new();
    let post = async |stream: bool| {
        let response = http
            .post(format!("{base}/v1/chat/completions"))
            .json(&body(stream))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    };
    let valid = async |(status, text): (reqwest::StatusCode, String)| {
        assert_eq!(status, 200, "{text}");
        let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        let content: serde_json::Value =
            serde_json::from_str(content).unwrap_or_else(|err| panic!("{err}: {answer}"));
        assert!(
            jsonschema::validator_for(&schema)
                .unwrap()
                .is_valid(&content),
            "{answer}"
        );
    };

    valid(post(false).await).await;
    assert_eq!(proxy.broken.load(Ordering::SeqCst), 0);

    proxy.corrupt.store(true, Ordering::SeqCst);
    let (status, text) = post(false).await;
    assert_eq!(proxy.broken.load(Ordering::SeqCst), 1, "the proxy broke it");
    assert_eq!(status, 502, "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error["error"]["code"], "output_invalid", "{error}");

    let (status, text) = post(true).await;
    assert_eq!(
        proxy.broken.load(Ordering::SeqCst),
        2,
        "the proxy broke the stream"
    );
    assert_eq!(
        status, 200,
        "a stream's status is sent before its answer: {text}"
    );
    let streamed = conformance::wire::SseAnswer::parse(&text);
    assert_eq!(
        streamed.errors.last().map(|error| &error["code"]),
        Some(&serde_json::json!("output_invalid")),
        "{text}"
    );
    assert!(!streamed.done, "no [DONE] after the error: {text}");
    assert_eq!(
        streamed.finish_reason, None,
        "no finish before the error: {text}"
    );

    proxy.corrupt.store(false, Ordering::SeqCst);
    valid(post(false).await).await;

    manager.shutdown_within(Duration::ZERO).await;
    gateway.abort();
    proxy.task.abort();
    stop_outside(server).await;
}
