//! The measuring tools every benchmark shares: interleaved pairs, timed
//! streams through a runtime or over plain HTTP.

use std::time::{Duration, Instant};

use conformance::Backend;
use futures::StreamExt;
use runtime_core::{InferenceRequest, ModelRuntime, RuntimeConfig};

use crate::report::{OverheadRow, Stat};

/// The request every streaming comparison sends.
pub(crate) fn streamed_request() -> InferenceRequest {
    InferenceRequest::from_prompt("What is the capital of France?")
        .with_max_tokens(64)
        .with_temperature(0.0)
}

/// Timings of one path against a baseline, run in interleaved pairs.
///
/// Greedy answers to the same prompt can still differ between requests (an
/// engine reusing a cached prompt prefix computes it in other batches, and a
/// near-tie can tip). Pairs whose texts differ did different work, so they are
/// left out of the comparison and counted.
pub(crate) struct Pairs {
    kept: Vec<(Timed, Timed)>,
    differed: usize,
}

impl Pairs {
    /// Warms both paths (the engine's prompt cache), then runs `count` pairs,
    /// alternating which side goes first.
    pub(crate) async fn measure<O, B>(
        count: usize,
        ours: impl Fn() -> O,
        baseline: impl Fn() -> B,
    ) -> Self
    where
        O: Future<Output = Timed>,
        B: Future<Output = Timed>,
    {
        ours().await;
        baseline().await;
        let mut pairs = Self {
            kept: Vec::new(),
            differed: 0,
        };
        for run in 0..count {
            let (ours, baseline) = if run % 2 == 0 {
                let ours = ours().await;
                (ours, baseline().await)
            } else {
                let baseline = baseline().await;
                (ours().await, baseline)
            };
            if ours.text == baseline.text {
                pairs.kept.push((ours, baseline));
            } else {
                pairs.differed += 1;
            }
        }
        assert!(
            pairs.differed < pairs.kept.len(),
            "{} of {count} pairs got different answers: nothing left to compare",
            pairs.differed
        );
        pairs
    }

    /// `value(ours, baseline)` over the kept pairs.
    pub(crate) fn stat(&self, value: impl Fn(&Timed, &Timed) -> f64) -> Stat {
        Stat::of(
            &self
                .kept
                .iter()
                .map(|(o, b)| value(o, b))
                .collect::<Vec<_>>(),
        )
    }

    /// The median of [`Pairs::stat`].
    pub(crate) fn median(&self, value: impl Fn(&Timed, &Timed) -> f64) -> f64 {
        self.stat(value).median
    }

    /// Our side's total time, the baseline's, and their ratio, as a report row.
    pub(crate) fn overhead(&self, engine: &str, layer: &str, baseline: &str) -> OverheadRow {
        OverheadRow {
            engine: engine.to_owned(),
            layer: layer.to_owned(),
            baseline: baseline.to_owned(),
            ours_ms: self.stat(|ours, _| ms(ours.total)),
            baseline_ms: self.stat(|_, base| ms(base.total)),
            ratio: self.stat(|ours, base| ms(ours.total) / ms(base.total)),
        }
    }

    /// A remark on the pairs left out, if any.
    pub(crate) fn note(&self) -> String {
        if self.differed == 0 {
            String::new()
        } else {
            format!(
                " ({} of {} pairs left out: the two answers differed)",
                self.differed,
                self.differed + self.kept.len()
            )
        }
    }
}

pub(crate) fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Polls `/health` every millisecond until it answers 200: an independent
/// observer of the moment the engine is ready.
pub(crate) fn watch_ready(port: u16) -> tokio::task::JoinHandle<Instant> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}/health");
        loop {
            if let Ok(response) = http.get(&url).send().await
                && response.status() == 200
            {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

pub(crate) fn config_on_free_port(backend: &Backend) -> RuntimeConfig {
    let port = runtime_process::free_port("127.0.0.1").unwrap();
    backend.config.clone().with_port(port)
}

pub(crate) struct Timed {
    pub(crate) first_token: Duration,
    pub(crate) total: Duration,
    pub(crate) text: String,
}

pub(crate) async fn through_runtime(
    runtime: &dyn ModelRuntime,
    request: InferenceRequest,
) -> Timed {
    let started = Instant::now();
    let mut stream = runtime.generate_stream(request).await.expect("stream");
    let mut first_token = None;
    let mut text = String::new();
    while let Some(delta) = stream.next().await {
        let delta = delta.expect("delta");
        if !delta.is_empty() {
            first_token.get_or_insert_with(|| started.elapsed());
        }
        text.push_str(&delta);
    }
    Timed {
        first_token: first_token.expect("at least one delta"),
        total: started.elapsed(),
        text,
    }
}

/// The baseline's HTTP client: plain reqwest, with connections not pooled,
/// as the runtime's client does (llama-server closes idle connections
/// unannounced, and a request landing on one fails).
pub(crate) fn direct_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client")
}

/// A plain streaming POST to the runtime's own endpoint.
pub(crate) async fn direct_to(
    http: &reqwest::Client,
    runtime: &dyn ModelRuntime,
    request: &InferenceRequest,
) -> Timed {
    let key = conformance::bearer(runtime);
    direct_http(http, &runtime.completions_url(), Some(&key), request).await
}

/// [`direct_http`] naming `model` in the request.
pub(crate) async fn direct_http_to(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    request: &InferenceRequest,
) -> Timed {
    post_streamed(http, url, None, Some(model), request).await
}

/// A plain streaming POST with reqwest, reading `data:` lines as they come.
pub(crate) async fn direct_http(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    request: &InferenceRequest,
) -> Timed {
    post_streamed(http, url, key, None, request).await
}

pub(crate) async fn post_streamed(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    model: Option<&str>,
    request: &InferenceRequest,
) -> Timed {
    let mut body = serde_json::json!({
        "messages": [{"role": "user", "content": request.messages[0].content}],
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(model) = model {
        body["model"] = model.into();
    }
    let started = Instant::now();
    let mut builder = http.post(url).json(&body);
    if let Some(key) = key {
        builder = builder.bearer_auth(key);
    }
    let response = builder.send().await.expect("direct request");
    assert!(
        response.status().is_success(),
        "{url} answered {}",
        response.status()
    );
    let mut bytes = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut first_token = None;
    let mut text = String::new();
    'body: while let Some(chunk) = bytes.next().await {
        buffer.extend_from_slice(&chunk.expect("chunk"));
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            if data.starts_with(b"[DONE]") {
                break 'body;
            }
            let chunk: serde_json::Value = serde_json::from_slice(data).expect("chunk JSON");
            if let Some(content) = chunk["choices"][0]["delta"]["content"].as_str()
                && !content.is_empty()
            {
                first_token.get_or_insert_with(|| started.elapsed());
                text.push_str(content);
            }
        }
    }
    Timed {
        first_token: first_token.expect("at least one delta"),
        total: started.elapsed(),
        text,
    }
}
