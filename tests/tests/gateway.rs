//! Many models behind one gateway, against the real engines: two candle
//! models and one llama.cpp model (the demo GGUF under different names and
//! options) with `max_loaded = 2`, served by `runtime_openai::serve` as
//! `model-runtime serve --config` runs them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use conformance::backends::{candle, llamacpp};
use conformance::wire::{self, SseAnswer};
use conformance::{procs, required_env};
use futures::StreamExt;
use model_runtime::BackendChoice;
use runtime_gateway::{GatewayConfig, ModelSpec, RuntimeManager};
use serde_json::{Value, json};

/// The model every entry serves.
fn model() -> std::path::PathBuf {
    required_env(conformance::MODEL_ENV)
}

fn llama_spec(name: &str) -> ModelSpec {
    ModelSpec::from_runtime_config(name, &llamacpp().config).with_backend(BackendChoice::LlamaCpp)
}

fn candle_spec(name: &str) -> ModelSpec {
    ModelSpec::from_runtime_config(name, &candle().config).with_backend(BackendChoice::Candle)
}

/// `llama` (llama.cpp), `candle-a` and `candle-b` (candle, the second with
/// the Q8_0 re-quantization), at most two loaded.
fn three_models() -> GatewayConfig {
    let mut b = candle_spec("candle-b");
    b.runtime
        .extra_config
        .insert("requantize".into(), "q8_0".into());
    b.aliases = vec!["smol-q8".into()];
    let mut config = GatewayConfig::default();
    config.max_loaded = Some(2);
    config.models = vec![llama_spec("llama"), candle_spec("candle-a"), b];
    config
}

/// A gateway for `config`, served on loopback.
struct Gateway {
    manager: Arc<RuntimeManager>,
    base: String,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Gateway {
    async fn start(config: GatewayConfig) -> Self {
        let _ = model();
        conformance::init_tracing();
        let manager = RuntimeManager::new(config).expect("a valid configuration");
        let (base, server) = conformance::gateway::serve(manager.clone()).await;
        Self {
            manager,
            base,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            server,
        }
    }

    fn completions(&self) -> String {
        format!("{}/v1/chat/completions", self.base)
    }

    /// A plain chat request to `model`: the status and the body.
    async fn chat(&self, model: &str, max_tokens: u32) -> (u16, Value) {
        let mut body = wire::chat_body("Name a color.", max_tokens, false);
        body["model"] = model.into();
        let response = self
            .http
            .post(self.completions())
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn stream(
        &self,
        model: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> Result<SseAnswer, String> {
        let mut body = wire::chat_body(prompt, max_tokens, true);
        body["model"] = model.into();
        wire::stream_chat(
            &self.http,
            &self.completions(),
            "",
            &body,
            Duration::from_secs(120),
        )
        .await
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn models(&self) -> Vec<Value> {
        let (status, text) = self.get("/v1/models").await;
        assert_eq!(status, 200);
        let list: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(list["object"], "list");
        list["data"].as_array().unwrap().clone()
    }

    async fn state(&self, model: &str) -> String {
        self.models()
            .await
            .into_iter()
            .find(|m| m["id"] == model)
            .map(|m| m["state"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{model} is listed"))
    }

    async fn metrics(&self) -> prometheus_parse::Scrape {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200);
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("the Prometheus text format")
    }

    async fn stop(self) {
        self.manager.shutdown_within(Duration::ZERO).await;
        self.server.abort();
    }
}

/// The value of `name` with these labels in a scrape (0 when absent).
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            _ => 0.0,
        })
        .sum()
}

/// `name`'s entry in a `/status` report.
fn model_status<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["models"]
        .as_array()
        .and_then(|models| models.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("{name} in {report}"))
}

fn llama_pids() -> Vec<i32> {
    procs::running(&required_env(runtime_llamacpp::BINARY_ENV))
        .iter()
        .map(|p| p.pid)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_model_answers_and_a_third_load_evicts_the_least_recently_used() {
    let gateway = Gateway::start(three_models()).await;
    for card in gateway.models().await {
        for field in ["id", "object", "created", "owned_by", "state"] {
            assert!(!card[field].is_null(), "{field} in {card}");
        }
        assert_eq!(card["object"], "model");
        assert_eq!(
            card["state"], "unloaded",
            "nothing loads before it is asked for"
        );
    }
    let (status, llama) = gateway.chat("llama", 8).await;
    assert_eq!(status, 200, "{llama}");
    let engine = llama_pids();
    assert_eq!(engine.len(), 1, "llama.cpp runs");
    let (status, a) = gateway.chat("candle-a", 8).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(gateway.state("llama").await, "loaded");

    // Two are loaded; the third evicts llama, the least recently used.
    let (status, b) = gateway.chat("smol-q8", 8).await;
    assert_eq!(status, 200, "an alias routes to its model: {b}");
    for answer in [&llama, &a, &b] {
        assert!(
            !answer["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("")
                .is_empty(),
            "{answer}"
        );
    }
    assert_eq!(gateway.state("llama").await, "unloaded");
    assert_eq!(gateway.state("candle-a").await, "loaded");
    assert_eq!(gateway.state("candle-b").await, "loaded");
    assert!(
        procs::wait_gone(&engine, Duration::from_secs(2))
            .await
            .is_empty(),
        "the evicted engine's process is gone"
    );
    let scrape = gateway.metrics().await;
    assert_eq!(
        sample(&scrape, "gateway_evictions_total", &[("model", "llama")]),
        1.0
    );
    assert_eq!(sample(&scrape, "gateway_models_loaded", &[]), 2.0);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_model_unloads_after_its_ttl_but_never_while_a_stream_is_open() {
    let ttl = Duration::from_secs(2);
    let mut config = three_models();
    config.models[0].ttl = Some(ttl);
    // One slot, so the whole context is the stream's: it outlasts the ttl.
    config.models[0].runtime.parallel = Some(1);
    config.health_interval = Duration::from_millis(200);
    let gateway = Gateway::start(config).await;

    // A stream longer than the ttl keeps the model loaded (800 tokens take
    // longer than the ttl and the second below it: it is still open when dropped).
    let mut body = wire::chat_body("Write a very long story about a dragon.", 800, true);
    body["model"] = "llama".into();
    let response = gateway
        .http
        .post(gateway.completions())
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut chunks = response.bytes_stream();
    let opened = Instant::now();
    let engine = loop {
        chunks.next().await.unwrap().unwrap();
        let pids = llama_pids();
        if !pids.is_empty() {
            break pids;
        }
    };
    while opened.elapsed() < ttl + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            gateway.state("llama").await,
            "loaded",
            "unloaded under an open stream"
        );
        let _ = chunks.next().await;
    }
    // Still open past the ttl (not an answer that ended early and left the
    // model idle): the next chunk is more of the answer, not its end.
    let next = chunks.next().await.expect("the stream goes on").unwrap();
    assert!(
        !String::from_utf8_lossy(&next).contains("[DONE]"),
        "the stream was still open past the ttl"
    );
    drop(chunks);

    let finished = Instant::now();
    while gateway.state("llama").await == "loaded" {
        assert!(
            finished.elapsed() < ttl * 3,
            "unloaded within its ttl after the last request"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = gateway.state("llama").await;
    assert!(
        finished.elapsed() >= ttl - Duration::from_millis(300),
        "not before its ttl: {state} after {:?}",
        finished.elapsed()
    );
    assert!(
        procs::wait_gone(&engine, Duration::from_secs(2))
            .await
            .is_empty(),
        "its engine is gone"
    );
    let scrape = gateway.metrics().await;
    assert_eq!(
        sample(&scrape, "gateway_idle_unloads_total", &[("model", "llama")]),
        1.0
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_requests_to_a_cold_model_start_one_engine_and_all_succeed() {
    let mut config = three_models();
    config.models[0].queue = Some(32);
    let gateway = Gateway::start(config).await;
    let answers = futures::future::join_all((0..32).map(|_| gateway.chat("llama", 4))).await;
    let failed: Vec<&(u16, Value)> = answers
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert_eq!(llama_pids().len(), 1, "one engine");
    let scrape = gateway.metrics().await;
    assert_eq!(
        sample(
            &scrape,
            "gateway_engine_start_seconds_count",
            &[("model", "llama")]
        ),
        1.0,
        "one engine start"
    );
    assert_eq!(
        sample(
            &scrape,
            "gateway_requests_total",
            &[("model", "llama"), ("status", "200")]
        ),
        32.0
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_overflow_is_429_with_retry_after_and_nothing_else_breaks() {
    let mut config = three_models();
    config.models[0].runtime.parallel = Some(1);
    config.models[0].queue = Some(2);
    let gateway = Gateway::start(config).await;
    assert_eq!(gateway.chat("llama", 4).await.0, 200, "warm");
    let mut body = wire::chat_body("Write a long story about a dragon.", 64, false);
    body["model"] = "llama".into();
    let responses = futures::future::join_all(
        (0..8).map(|_| gateway.http.post(gateway.completions()).json(&body).send()),
    )
    .await;
    let mut ok = 0;
    let mut refused = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status().as_u16() {
            200 => ok += 1,
            429 => {
                refused += 1;
                let retry = response.headers().get("retry-after").cloned();
                assert!(retry.is_some(), "429 says when to retry");
                let error: Value = response.json().await.unwrap();
                assert_eq!(error["error"]["type"], "rate_limit_error", "{error}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused >= 1, "past parallel + queue, requests are refused");
    assert!(ok >= 3, "one running and two queued are served ({ok})");
    assert_eq!(
        gateway.chat("llama", 4).await.0,
        200,
        "serving after the burst"
    );
    assert_eq!(
        gateway.chat("candle-a", 4).await.0,
        200,
        "other models untouched"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_fails_its_requests_and_the_next_request_restarts_it() {
    let gateway = Gateway::start(three_models()).await;
    assert_eq!(gateway.chat("llama", 4).await.0, 200);
    let engine: Vec<procs::Proc> = procs::running(&required_env(runtime_llamacpp::BINARY_ENV));
    let mut body = wire::chat_body("Write a very long story about a dragon.", 400, true);
    body["model"] = "llama".into();
    let streaming = {
        let http = gateway.http.clone();
        let url = gateway.completions();
        tokio::spawn(async move {
            wire::stream_chat(&http, &url, "", &body, Duration::from_secs(30)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    procs::signal_all(&engine, nix::sys::signal::Signal::SIGKILL);
    let in_flight = streaming.await.unwrap().expect("the stream ends");
    assert!(
        !in_flight.errors.is_empty(),
        "the in-flight request ends with an error: {in_flight:?}"
    );

    let detected = Instant::now();
    while gateway.state("llama").await == "loaded" {
        assert!(
            detected.elapsed() < Duration::from_secs(3),
            "the crash is noticed within seconds"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, answer) = gateway.chat("llama", 4).await;
    assert_eq!(
        status, 200,
        "the next request is served by a restarted engine: {answer}"
    );
    assert_eq!(llama_pids().len(), 1);
    let scrape = gateway.metrics().await;
    assert_eq!(
        sample(
            &scrape,
            "gateway_engine_restarts_total",
            &[("model", "llama")]
        ),
        1.0
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_is_a_404_in_openais_shape_listing_the_models() {
    let gateway = Gateway::start(three_models()).await;
    let (status, error) = gateway.chat("gpt-4", 4).await;
    assert_eq!(status, 404);
    let detail = &error["error"];
    assert_eq!(detail["code"], "model_not_found", "{error}");
    assert_eq!(detail["param"], "model");
    assert_eq!(detail["type"], "invalid_request_error");
    let message = detail["message"].as_str().unwrap();
    for name in ["llama", "candle-a", "candle-b", "smol-q8"] {
        assert!(message.contains(name), "{name} is listed: {message}");
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_models_while_another_streams_undisturbed() {
    let gateway = Gateway::start(three_models()).await;
    assert_eq!(gateway.chat("candle-a", 4).await.0, 200);
    let streaming = {
        let http = gateway.http.clone();
        let url = gateway.completions();
        let mut body = wire::chat_body("Write a long story about the sea.", 120, true);
        body["model"] = "candle-a".into();
        tokio::spawn(async move {
            let answer = wire::stream_chat(&http, &url, "", &body, Duration::from_secs(120)).await;
            (answer, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut reloaded = three_models();
    reloaded.models.retain(|m| m.name != "candle-b");
    reloaded.models.push(candle_spec("candle-c"));
    gateway.manager.reload(reloaded).await.expect("reload");
    let reloaded_at = Instant::now();
    assert_eq!(
        gateway.chat("candle-c", 4).await.0,
        200,
        "a new model answers"
    );
    assert_eq!(
        gateway.chat("candle-b", 4).await.0,
        404,
        "a removed model is gone"
    );
    assert_eq!(
        gateway.chat("smol-q8", 4).await.0,
        404,
        "and so is its alias"
    );
    let (answer, ended_at) = streaming.await.unwrap();
    let answer = answer.expect("the stream");
    assert!(
        answer.is_well_formed(),
        "the stream on the unchanged model was not disturbed: {answer:?}"
    );
    assert!(
        ended_at > reloaded_at,
        "the stream was open across the reload (it ended before it, testing nothing)"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_the_requests_made_by_endpoint() {
    let gateway = Gateway::start(three_models()).await;
    for _ in 0..3 {
        assert_eq!(gateway.chat("candle-a", 4).await.0, 200);
    }
    let streamed = gateway.stream("candle-a", "Say hello.", 4).await.unwrap();
    assert!(streamed.is_well_formed());
    assert_eq!(gateway.chat("nobody", 4).await.0, 404);
    let scrape = gateway.metrics().await;
    let ok = sample(
        &scrape,
        "gateway_requests_total",
        &[("model", "candle-a"), ("status", "200")],
    );
    assert_eq!(ok, 4.0, "three plain and one streamed request");
    assert_eq!(
        sample(
            &scrape,
            "gateway_requests_total",
            &[
                ("model", "candle-a"),
                ("endpoint", "chat_completions"),
                ("status", "200")
            ],
        ),
        4.0,
        "chat requests are counted at their endpoint"
    );
    assert!(
        sample(
            &scrape,
            "gateway_generated_tokens_total",
            &[("model", "candle-a")]
        ) >= 4.0
    );
    assert!(
        sample(
            &scrape,
            "gateway_prompt_tokens_total",
            &[("model", "candle-a")]
        ) > 0.0
    );
    assert_eq!(
        sample(
            &scrape,
            "gateway_request_duration_seconds_count",
            &[("model", "candle-a")]
        ),
        4.0
    );
    assert_eq!(
        sample(
            &scrape,
            "gateway_time_to_first_token_seconds_count",
            &[("model", "candle-a")]
        ),
        4.0
    );
    assert!(
        sample(
            &scrape,
            "gateway_model_resident_bytes",
            &[("model", "candle-a")]
        ) > 1e6
    );
    // Each API's requests are counted at its own endpoint.
    let posted = [
        (
            "/v1/completions",
            json!({"model": "candle-a", "prompt": "Once", "max_tokens": 2}),
        ),
        (
            "/v1/responses",
            json!({"model": "candle-a", "input": "Name a color.", "max_output_tokens": 2}),
        ),
        (
            "/v1/messages",
            json!({"model": "candle-a", "max_tokens": 2,
                   "messages": [{"role": "user", "content": "Name a color."}]}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "candle-a",
                   "messages": [{"role": "user", "content": "Name a color."}]}),
        ),
    ];
    for (path, body) in &posted {
        let response = gateway
            .http
            .post(format!("{}{path}", gateway.base))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let scrape = gateway.metrics().await;
    for endpoint in ["completions", "responses", "messages", "count_tokens"] {
        assert_eq!(
            sample(
                &scrape,
                "gateway_requests_total",
                &[
                    ("model", "candle-a"),
                    ("endpoint", endpoint),
                    ("status", "200")
                ],
            ),
            1.0,
            "one request at {endpoint}"
        );
    }
    assert_eq!(
        sample(
            &scrape,
            "gateway_requests_total",
            &[("model", "candle-a"), ("endpoint", "chat_completions")],
        ),
        4.0,
        "the other APIs' requests are not counted as chat"
    );
    let (status, report) = gateway.get("/status").await;
    assert_eq!(status, 200);
    let report: Value = serde_json::from_str(&report).unwrap();
    let candle_a = model_status(&report, "candle-a");
    assert_eq!(candle_a["state"], "loaded", "{report}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_request_to_a_chat_model_is_refused_without_starting_it() {
    let gateway = Gateway::start(three_models()).await;
    let response = gateway
        .http
        .post(format!("{}/v1/embeddings", gateway.base))
        .json(&json!({"model": "llama", "input": "Hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 501);
    let refused: Value = response.json().await.unwrap();
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not an embedding model")),
        "{refused}"
    );
    assert!(llama_pids().is_empty(), "no engine started to refuse it");
    let (_, report) = gateway.get("/status").await;
    let report: Value = serde_json::from_str(&report).unwrap();
    let llama = model_status(&report, "llama");
    assert_eq!(llama["state"], "unloaded", "{report}");
    gateway.stop().await;
}
