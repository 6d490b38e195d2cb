//! `cargo xtask bench <backend>`: readiness lag, streaming overhead against
//! direct HTTP, and stop time, as medians over interleaved runs.
//!
//! Every comparison runs its two sides alternately in the same process, so
//! machine noise hits both; only medians and their ratios are reported.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use conformance::Backend;
use futures::StreamExt;
use runtime_core::{ChatMessage, InferenceRequest, ModelRuntime, RuntimeConfig, Timings};

use runtime_process::{ServerProcess, StopPolicy};

/// How many times each measurement repeats. Starting vLLM takes the better
/// part of a minute here, so it gets fewer starts; the streaming pairs, which
/// share one engine, stay the same.
#[derive(Debug, Clone, Copy)]
struct Runs {
    ready: usize,
    baseline: usize,
    stream: usize,
    stop: usize,
}

impl Runs {
    fn for_backend(backend: &Backend) -> Self {
        if backend.start_budget > Duration::from_secs(60) {
            Self {
                ready: 3,
                baseline: 3,
                stream: 31,
                stop: 3,
            }
        } else {
            Self {
                ready: 7,
                baseline: 5,
                stream: 31,
                stop: 7,
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    conformance::init_tracing();
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "llamacpp".to_owned());
    println!("bench: {name} (medians over interleaved runs)");
    if name == "gateway" {
        many_models().await;
        return;
    }
    let backend =
        conformance::backends::by_name(&name).unwrap_or_else(|| panic!("unknown backend {name:?}"));

    if name == "candle" {
        candle_against_llama_cpp().await;
        return;
    }
    let runs = Runs::for_backend(&backend);
    readiness(&backend, runs).await;
    streaming(&backend, runs).await;
    stopping(&backend, runs).await;
    gateway(&backend, runs).await;
}

/// `model-runtime serve`'s path (the router over a RuntimeManager) against
/// talking to the engine directly, both as plain streaming HTTP clients.
async fn gateway(backend: &Backend, runs: Runs) {
    let (manager, gateway_url, server) =
        conformance::gateway::start(backend, backend.config.clone()).await;
    let (engine_url, engine_key) = manager
        .with_runtime(None, async |runtime| {
            (runtime.completions_url(), conformance::bearer(runtime))
        })
        .await
        .unwrap();
    let request = streamed_request();
    let http = direct_client();
    let pairs = Pairs::measure(
        runs.stream,
        || direct_http(&http, &gateway_url, None, &request),
        || direct_http(&http, &engine_url, Some(&engine_key), &request),
    )
    .await;
    println!(
        "gateway (model-runtime serve's router + RuntimeManager), 64 tokens streamed: {:.1} ms vs \
         the engine directly {:.1} ms; ratio {:.3}{}",
        pairs.median(|via, _| ms(via.total)),
        pairs.median(|_, straight| ms(straight.total)),
        pairs.median(|via, straight| ms(via.total) / ms(straight.total)),
        pairs.note()
    );
    server.abort();
    manager.shutdown_within(Duration::ZERO).await;
}

/// The gateway over several models: its warm overhead against the engine
/// directly, a cold request's time to first token beyond the engine's own
/// start, and the time to switch between two models.
async fn many_models() {
    let llama = conformance::backends::llamacpp();
    gateway(&llama, Runs::for_backend(&llama)).await;

    use runtime_gateway::{BackendChoice, GatewayConfig, ModelSpec, RuntimeManager};
    let spec = |name: &str, backend: &Backend, choice| {
        ModelSpec::from_runtime_config(name, &backend.config).with_backend(choice)
    };
    let candle = conformance::backends::candle();
    let request = streamed_request();
    let http = direct_client();

    // Cold: a gateway with the model unloaded, whose first request starts
    // it, against the same cold path without the gateway: starting the
    // engine directly, then its first request. Interleaved.
    let mut through = Vec::new();
    let mut direct = Vec::new();
    let mut overhead = Vec::new();
    for _ in 0..RUNS_COLD {
        let mut runtime = (llama.new_runtime)();
        let started = Instant::now();
        runtime.initialize(llama.config.clone()).await.unwrap();
        let first = direct_to(&http, runtime.as_ref(), &request).await;
        let direct_total = ms(started.elapsed() - first.total + first.first_token);
        runtime.shutdown().await.unwrap();

        let mut config = GatewayConfig::default();
        config.models = vec![spec("llama", &llama, BackendChoice::LlamaCpp)];
        let manager = RuntimeManager::new(config).unwrap();
        let (base, server) = conformance::gateway::serve(manager.clone()).await;
        let url = format!("{base}/v1/chat/completions");
        let cold = direct_http_to(&http, &url, "llama", &request).await;
        manager.shutdown_within(Duration::ZERO).await;
        server.abort();

        through.push(ms(cold.first_token));
        direct.push(direct_total);
        overhead.push(ms(cold.first_token) - direct_total);
    }
    println!(
        "cold request, first token: through the gateway {:.1} ms; the engine started directly, \
         then its first request {:.1} ms; the gateway's share {:+.1} ms (goal <= 20 ms)",
        median(through),
        median(direct),
        median(overhead)
    );

    // Switching: two models, one loaded at a time, then both loaded.
    for (max_loaded, what) in [
        (1, "one loaded at a time (evict, start)"),
        (2, "both loaded"),
    ] {
        let mut config = GatewayConfig::default();
        config.max_loaded = Some(max_loaded);
        config.models = vec![
            spec("llama", &llama, BackendChoice::LlamaCpp),
            spec("candle", &candle, BackendChoice::Candle),
        ];
        let manager = RuntimeManager::new(config).unwrap();
        let (base, server) = conformance::gateway::serve(manager.clone()).await;
        let url = format!("{base}/v1/chat/completions");
        let mut switches = Vec::new();
        for run in 0..RUNS_COLD * 2 {
            let model = if run % 2 == 0 { "llama" } else { "candle" };
            let mut body = request.clone();
            body.messages[0].content = format!("{} ({model})", body.messages[0].content);
            let timed = direct_http_to(&http, &url, model, &body).await;
            if run >= 2 {
                switches.push(ms(timed.first_token));
            }
        }
        println!(
            "switching between two models, {what}: first token {:.1} ms after the request",
            median(switches)
        );
        manager.shutdown_within(Duration::ZERO).await;
        server.abort();
    }
}

const RUNS_COLD: usize = 5;

/// The request every streaming comparison sends.
fn streamed_request() -> InferenceRequest {
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
struct Pairs {
    kept: Vec<(Timed, Timed)>,
    differed: usize,
}

impl Pairs {
    /// Warms both paths (the engine's prompt cache), then runs `count` pairs,
    /// alternating which side goes first.
    async fn measure<O, B>(count: usize, ours: impl Fn() -> O, baseline: impl Fn() -> B) -> Self
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

    /// The median over the kept pairs of `value(ours, baseline)`.
    fn median(&self, value: impl Fn(&Timed, &Timed) -> f64) -> f64 {
        median(self.kept.iter().map(|(o, b)| value(o, b)).collect())
    }

    /// A remark on the pairs left out, if any.
    fn note(&self) -> String {
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

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Polls `/health` every millisecond until it answers 200: an independent
/// observer of the moment the engine is ready.
fn watch_ready(port: u16) -> tokio::task::JoinHandle<Instant> {
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

fn config_on_free_port(backend: &Backend) -> RuntimeConfig {
    let port = runtime_process::free_port("127.0.0.1").unwrap();
    backend.config.clone().with_port(port)
}

async fn readiness(backend: &Backend, runs: Runs) {
    let Some(server) = &backend.server else {
        println!("readiness lag: in-process backend, no engine to wait for");
        return;
    };
    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    let mut startup = Vec::new();
    for run in 0..runs.ready {
        let config = config_on_free_port(backend);
        let observer = watch_ready(config.port);
        let mut runtime = (backend.new_runtime)();
        let started = Instant::now();
        runtime.initialize(config).await.expect("initialize");
        let returned = Instant::now();
        let ready = observer.await.unwrap();
        ours.push(ms(returned.saturating_duration_since(ready)));
        startup.push(ms(returned - started));
        runtime.shutdown().await.unwrap();

        if run < runs.baseline {
            baseline.push(seed_design_lag(backend, server).await);
        }
    }
    println!(
        "readiness lag (engine ready -> initialize returns): {:.1} ms; \
         seed design (poll every 2 s): {:.1} ms; startup total {:.0} ms",
        median(ours),
        median(baseline),
        median(startup)
    );
}

/// The seed's approach: spawn the same command line, then poll `/health`
/// every 2 s.
async fn seed_design_lag(backend: &Backend, server: &conformance::EngineProcess) -> f64 {
    let config = config_on_free_port(backend);
    let observer = watch_ready(config.port);
    let process = ServerProcess::spawn(&(server.command)(&config, config.port)).unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/health", config.port);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if matches!(http.get(&url).send().await, Ok(r) if r.status() == 200) {
            break;
        }
    }
    let returned = Instant::now();
    let ready = observer.await.unwrap();
    process
        .stop(StopPolicy::new(backend.config.shutdown_grace))
        .await;
    ms(returned.saturating_duration_since(ready))
}

struct Timed {
    first_token: Duration,
    total: Duration,
    text: String,
}

async fn through_runtime(runtime: &dyn ModelRuntime, request: InferenceRequest) -> Timed {
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
fn direct_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client")
}

/// A plain streaming POST to the runtime's own endpoint.
async fn direct_to(
    http: &reqwest::Client,
    runtime: &dyn ModelRuntime,
    request: &InferenceRequest,
) -> Timed {
    let key = conformance::bearer(runtime);
    direct_http(http, &runtime.completions_url(), Some(&key), request).await
}

/// [`direct_http`] naming `model` in the request.
async fn direct_http_to(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    request: &InferenceRequest,
) -> Timed {
    post_streamed(http, url, None, Some(model), request).await
}

/// A plain streaming POST with reqwest, reading `data:` lines as they come.
async fn direct_http(
    http: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    request: &InferenceRequest,
) -> Timed {
    post_streamed(http, url, key, None, request).await
}

async fn post_streamed(
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

async fn streaming(backend: &Backend, runs: Runs) {
    let mut runtime = (backend.new_runtime)();
    runtime
        .initialize(backend.config.clone())
        .await
        .expect("initialize");
    let request = streamed_request();
    let http = direct_client();
    let pairs = Pairs::measure(
        runs.stream,
        || through_runtime(runtime.as_ref(), request.clone()),
        || direct_to(&http, runtime.as_ref(), &request),
    )
    .await;
    println!(
        "streaming (64 tokens): generate_stream {:.1} ms vs direct HTTP {:.1} ms; \
         ratio {:.3} (median of per-pair ratios); first token {:.1} ms, {:+.2} ms vs direct{}",
        pairs.median(|ours, _| ms(ours.total)),
        pairs.median(|_, direct| ms(direct.total)),
        pairs.median(|ours, direct| ms(ours.total) / ms(direct.total)),
        pairs.median(|ours, _| ms(ours.first_token)),
        pairs.median(|ours, direct| ms(ours.first_token) - ms(direct.first_token)),
        pairs.note()
    );
    runtime.shutdown().await.unwrap();
}

async fn stopping(backend: &Backend, runs: Runs) {
    let mut idle = Vec::new();
    let mut in_flight = Vec::new();
    for _ in 0..runs.stop {
        let mut runtime = (backend.new_runtime)();
        runtime
            .initialize(backend.config.clone())
            .await
            .expect("initialize");
        let started = Instant::now();
        runtime.shutdown().await.unwrap();
        idle.push(ms(started.elapsed()));

        let mut runtime = (backend.new_runtime)();
        runtime
            .initialize(backend.config.clone())
            .await
            .expect("initialize");
        let mut stream = runtime
            .generate_stream(conformance::checks::long_request())
            .await
            .unwrap();
        stream.next().await.unwrap().unwrap();
        let started = Instant::now();
        runtime.shutdown().await.unwrap();
        in_flight.push(ms(started.elapsed()));
        drop(stream);
    }
    println!(
        "stop: idle {:.1} ms; with a stream in flight {:.1} ms",
        median(idle),
        median(in_flight)
    );
}

const RUNS_SPEED: usize = 5;

/// A prompt of a few hundred tokens that no engine has cached: the system
/// message differs per run, so llama-server's prompt cache cannot help.
fn speed_request(run: usize) -> InferenceRequest {
    let filler =
        "The quick brown fox jumps over the lazy dog while the river runs to the sea. ".repeat(16);
    InferenceRequest::new(vec![
        ChatMessage::system(format!("Session {run}. You are a careful assistant.")),
        ChatMessage::user(format!(
            "{filler}\nSummarise the text above, then write a long story about it."
        )),
    ])
    .with_max_tokens(96)
    .with_temperature(0.0)
}

fn peak_rss_mib(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

struct Speed {
    prefill: Vec<f64>,
    decode: Vec<f64>,
}

impl Speed {
    fn new() -> Self {
        Self {
            prefill: Vec::new(),
            decode: Vec::new(),
        }
    }

    fn record(&mut self, timings: Option<Timings>) {
        let timings = timings.expect("the engine reports timings");
        self.prefill
            .push(timings.prompt_tokens_per_second.expect("prefill speed"));
        self.decode
            .push(timings.tokens_per_second.expect("decode speed"));
    }
}

/// candle (as loaded and re-quantized) against llama-server on the same GGUF,
/// two threads each, the same prompts, runs interleaved.
async fn candle_against_llama_cpp() {
    let llama_backend = conformance::backends::llamacpp();
    let candle_backend = conformance::backends::candle();
    let mut llama = (llama_backend.new_runtime)();
    llama
        .initialize(llama_backend.config.clone().with_parallel(1))
        .await
        .expect("llama-server");
    let variants = ["keep", "q8_0", "q4_0"];
    let mut candles = Vec::new();
    for variant in variants {
        let mut runtime = (candle_backend.new_runtime)();
        let config = candle_backend
            .config
            .clone()
            .with_parallel(1)
            .with_extra_config("requantize", variant);
        runtime.initialize(config).await.expect("candle");
        candles.push(runtime);
    }
    // Warm up every engine once.
    llama.generate(speed_request(1000)).await.unwrap();
    for runtime in &candles {
        runtime.generate(speed_request(1001)).await.unwrap();
    }

    let mut llama_speed = Speed::new();
    let mut candle_speed: Vec<Speed> = variants.iter().map(|_| Speed::new()).collect();
    for run in 0..RUNS_SPEED {
        let request = speed_request(run);
        llama_speed.record(llama.generate(request.clone()).await.unwrap().timings);
        for (runtime, speed) in candles.iter().zip(&mut candle_speed) {
            speed.record(runtime.generate(request.clone()).await.unwrap().timings);
        }
    }
    let prompt_tokens = llama
        .generate(speed_request(0))
        .await
        .unwrap()
        .usage
        .unwrap()
        .prompt_tokens;

    let llama_prefill = median(llama_speed.prefill.clone());
    let llama_decode = median(llama_speed.decode.clone());
    println!(
        "same GGUF (SmolLM2-135M Q4_1), 2 threads, {prompt_tokens}-token prompts, 96 tokens, greedy"
    );
    println!(
        "{:<22} {:>14} {:>14} {:>10} {:>10}",
        "engine", "prefill tok/s", "decode tok/s", "prefill x", "decode x"
    );
    println!(
        "{:<22} {:>14.1} {:>14.1} {:>10} {:>10}",
        "llama-server", llama_prefill, llama_decode, "1.00", "1.00"
    );
    for (variant, speed) in variants.iter().zip(candle_speed) {
        let prefill = median(speed.prefill);
        let decode = median(speed.decode);
        println!(
            "{:<22} {:>14.1} {:>14.1} {:>10.2} {:>10.2}",
            format!("candle ({variant})"),
            prefill,
            decode,
            prefill / llama_prefill,
            decode / llama_decode
        );
    }
    let engine_pid =
        conformance::procs::engine_on_port(conformance::procs::port_of(&llama.base_url()))
            .first()
            .map(|p| p.pid.to_string())
            .unwrap_or_default();
    println!(
        "peak RSS: this process with three candle models loaded {:.0} MiB; llama-server {:.0} MiB",
        peak_rss_mib("self"),
        peak_rss_mib(&engine_pid)
    );
    llama.shutdown().await.unwrap();
    for mut runtime in candles {
        runtime.shutdown().await.unwrap();
    }
}
