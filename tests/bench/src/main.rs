//! `cargo xtask bench [TARGET...]`: the benchmarks against the real engines,
//! and the report made of them (`target/bench/report.md` with SVG charts).
//!
//! Every comparison runs its sides alternately in the same process, so
//! machine noise hits both; each figure is the median of its runs with the
//! least and greatest beside it, and ratios come from the same runs.
//!
//! Targets: `candle` (candle against llama.cpp on the same GGUF: speed at 1
//! and 2 threads and three prompt lengths, concurrent streams, and candle's
//! own start, stop and layers), `llamacpp` and `vllm` (start, stop, our
//! layers against the engine directly; vLLM's speed too), `gateway` (many
//! models), `distributed` (llama.cpp over an RPC worker, and a server we
//! attach to), `structured` (a schema's cost to decode and twenty tools'
//! cost to the first token, candle and llama.cpp each against itself).
//! `report` only renders what earlier runs saved.
#![allow(clippy::print_stdout)]

mod embeddings;
mod measure;
mod report;
mod structured;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use conformance::Backend;
use futures::StreamExt;
use runtime_core::{InferenceRequest, ModelRuntime, StreamEvent};

use measure::{
    Pairs, config_on_free_port, direct_client, direct_http, direct_http_to, direct_to, ms,
    streamed_request, through_runtime, watch_ready,
};
use report::{ConcurrencyRow, LifecycleRow, OverheadRow, Results, SpeedRow, Stat};

/// Where results and the report go (`cargo xtask bench` sets it to the
/// workspace's `target/bench`).
const DIR_ENV: &str = "MODEL_RUNTIME_BENCH_DIR";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    conformance::init_tracing();
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "candle".to_owned());
    let dir =
        std::env::var_os(DIR_ENV).map_or_else(|| PathBuf::from("target/bench"), PathBuf::from);
    if target != "report" {
        println!("bench: {target} (medians over interleaved runs)");
        let mut results = Results::new(&target);
        match target.as_str() {
            "candle" => candle(&mut results).await,
            "llamacpp" => server_backend(&mut results, &conformance::backends::llamacpp()).await,
            "vllm" => vllm(&mut results).await,
            "gateway" => many_models(&mut results).await,
            "distributed" => distributed(&mut results).await,
            "structured" => structured::structured(&mut results).await,
            "embeddings" => embeddings::embeddings(&mut results).await,
            other => panic!("unknown bench target {other:?}"),
        }
        let saved = results.save(&dir).expect("the results are saved");
        println!("results: {}", saved.display());
    }
    let report = report::render(&dir).expect("the report is written");
    println!("report: {}", report.display());
}

/// How many times each measurement repeats. Starting vLLM takes the better
/// part of a minute here, so it gets fewer starts; the streaming pairs, which
/// share one engine, stay the same.
#[derive(Debug, Clone, Copy)]
struct Runs {
    lifecycle: usize,
    stream: usize,
    speed: usize,
}

impl Runs {
    fn for_backend(backend: &Backend) -> Self {
        if backend.start_budget > Duration::from_secs(60) {
            Self {
                lifecycle: 3,
                stream: 21,
                speed: 3,
            }
        } else {
            Self {
                lifecycle: 7,
                stream: 31,
                speed: 5,
            }
        }
    }
}

/// The prompt lengths of the speed matrix: sentences of filler after the
/// chat template, about 64, 512 and 2048 tokens in all.
const LENGTHS: [usize; 3] = [1, 24, 102];

/// The threads of the speed matrix.
const THREADS: [u32; 2] = [1, 2];

/// The tokens each speed request generates at most.
const SPEED_TOKENS: u32 = 128;

/// The context every speed run gets: the longest prompt and its answer fit.
const SPEED_CONTEXT: u32 = 4096;

fn speed_request(run: usize, sentences: usize) -> InferenceRequest {
    conformance::workload::story_request(run, sentences, SPEED_TOKENS)
}

/// What one streamed request measured, from the client's side: the time
/// to the first token, prefill (prompt tokens over that time) and decode
/// (tokens after the first over the time after it).
struct Sample {
    prompt_tokens: u64,
    first_token_ms: f64,
    prefill_tps: f64,
    decode_tps: Option<f64>,
    completion_tokens: u64,
}

async fn sample(runtime: &dyn ModelRuntime, request: InferenceRequest) -> Sample {
    let started = Instant::now();
    let mut events = runtime.generate_events(request).await.expect("a stream");
    let mut first = None;
    let mut usage = None;
    while let Some(event) = events.next().await {
        match event.expect("an event") {
            StreamEvent::Delta(text) if !text.is_empty() => {
                first.get_or_insert_with(|| started.elapsed());
            }
            StreamEvent::Finished { usage: u, .. } => usage = u,
            _ => {}
        }
    }
    let total = started.elapsed();
    let first = first.expect("at least one token");
    let usage = usage.expect("the engine reports usage");
    let after_first = (total - first).as_secs_f64();
    Sample {
        prompt_tokens: usage.prompt_tokens,
        first_token_ms: ms(first),
        prefill_tps: usage.prompt_tokens as f64 / first.as_secs_f64(),
        decode_tps: (usage.completion_tokens > 8 && after_first > 0.0)
            .then(|| (usage.completion_tokens - 1) as f64 / after_first),
        completion_tokens: usage.completion_tokens,
    }
}

/// `backend` started as configured, with its engine's version noted.
async fn started(
    backend: &Backend,
    config: runtime_core::RuntimeConfig,
    results: &mut Results,
) -> Box<dyn ModelRuntime> {
    let mut runtime = (backend.new_runtime)();
    runtime.initialize(config).await.unwrap_or_else(|err| {
        panic!(
            "{} starts: {}",
            backend.name,
            conformance::checks::chain(&err)
        )
    });
    results.versions.insert(
        engine_name(backend).to_owned(),
        runtime.metadata().version.clone(),
    );
    runtime
}

fn engine_name(backend: &Backend) -> &'static str {
    match backend.name {
        "llamacpp" => "llama-server",
        "vllm" => "vLLM",
        other => other,
    }
}

/// Prefill, decode and first-token time of each backend at each thread
/// count and prompt length, requests interleaved across the backends.
async fn speed_matrix(results: &mut Results, backends: &[Backend], threads: &[u32], runs: usize) {
    for &t in threads {
        let mut runtimes = Vec::new();
        for backend in backends {
            let config = backend
                .config
                .clone()
                .with_threads(t)
                .with_parallel(1)
                .with_context_size(SPEED_CONTEXT);
            let runtime = started(backend, config, results).await;
            // Warm each engine once (caches, page faults, the pool's threads).
            sample(runtime.as_ref(), speed_request(usize::MAX, LENGTHS[0])).await;
            runtimes.push(runtime);
        }
        // samples[backend][length]
        let mut samples: Vec<Vec<Vec<Sample>>> = backends
            .iter()
            .map(|_| LENGTHS.iter().map(|_| Vec::new()).collect())
            .collect();
        for run in 0..runs {
            for (l, &sentences) in LENGTHS.iter().enumerate() {
                // Each run starts with another backend.
                for k in 0..backends.len() {
                    let b = (k + run) % backends.len();
                    let sample = sample(runtimes[b].as_ref(), speed_request(run, sentences)).await;
                    samples[b][l].push(sample);
                }
            }
        }
        for (b, backend) in backends.iter().enumerate() {
            for (l, runs) in samples[b].iter().enumerate() {
                let decode: Vec<f64> = runs.iter().filter_map(|s| s.decode_tps).collect();
                if decode.is_empty() {
                    results.notes.push(format!(
                        "{} at {t} threads, prompt {}: every answer ended within 8 tokens, no decode speed",
                        engine_name(backend),
                        LENGTHS[l]
                    ));
                    continue;
                }
                let row = SpeedRow {
                    engine: engine_name(backend).to_owned(),
                    threads: t,
                    prompt_tokens: runs[0].prompt_tokens,
                    prefill_tps: Stat::of(&runs.iter().map(|s| s.prefill_tps).collect::<Vec<_>>()),
                    decode_tps: Stat::of(&decode),
                    first_token_ms: Stat::of(
                        &runs.iter().map(|s| s.first_token_ms).collect::<Vec<_>>(),
                    ),
                };
                println!(
                    "{:<13} {t} thr, {:>5} prompt tokens: prefill {:>7.1} tok/s, decode {:>6.1} tok/s, first token {:>7.1} ms",
                    row.engine,
                    row.prompt_tokens,
                    row.prefill_tps.median,
                    row.decode_tps.median,
                    row.first_token_ms.median
                );
                results.speed.push(row);
            }
        }
        for mut runtime in runtimes {
            runtime.shutdown().await.unwrap();
        }
    }
}

/// Tokens per second over all streams when 1, 2 and 4 requests run at once
/// (4 slots, 2 threads), interleaved across the backends.
async fn concurrency(results: &mut Results, backends: &[Backend], runs: usize) {
    const STREAMS: [usize; 3] = [1, 2, 4];
    let mut runtimes = Vec::new();
    for backend in backends {
        let config = backend
            .config
            .clone()
            .with_threads(2)
            .with_parallel(4)
            .with_context_size(SPEED_CONTEXT);
        let runtime = started(backend, config, results).await;
        sample(runtime.as_ref(), speed_request(usize::MAX - 1, LENGTHS[0])).await;
        runtimes.push(runtime);
    }
    let mut aggregate: Vec<Vec<Vec<f64>>> = backends
        .iter()
        .map(|_| STREAMS.iter().map(|_| Vec::new()).collect())
        .collect();
    for run in 0..runs {
        for (s, &streams) in STREAMS.iter().enumerate() {
            for k in 0..backends.len() {
                let b = (k + run) % backends.len();
                let runtime = runtimes[b].as_ref();
                let started = Instant::now();
                let samples = futures::future::join_all(
                    (0..streams)
                        .map(|i| sample(runtime, speed_request(1000 + run * 10 + i, LENGTHS[0]))),
                )
                .await;
                let tokens: u64 = samples.iter().map(|s| s.completion_tokens).sum();
                aggregate[b][s].push(tokens as f64 / started.elapsed().as_secs_f64());
            }
        }
    }
    for (b, backend) in backends.iter().enumerate() {
        for (s, &streams) in STREAMS.iter().enumerate() {
            let row = ConcurrencyRow {
                engine: engine_name(backend).to_owned(),
                streams,
                aggregate_tps: Stat::of(&aggregate[b][s]),
            };
            println!(
                "{:<13} {streams} concurrent streams: {:.1} tok/s in all",
                row.engine, row.aggregate_tps.median
            );
            results.concurrency.push(row);
        }
    }
    for mut runtime in runtimes {
        runtime.shutdown().await.unwrap();
    }
}

/// candle against llama.cpp on the same GGUF, then candle's own start, stop
/// and layers.
async fn candle(results: &mut Results) {
    let llama = conformance::backends::llamacpp();
    let candle = conformance::backends::candle();
    let pair = [llama, candle];
    let runs = Runs::for_backend(&pair[1]);
    speed_matrix(results, &pair, &THREADS, runs.speed).await;
    concurrency(results, &pair, 3).await;
    lifecycle(results, &pair[1], runs).await;
    streaming(results, &pair[1], runs).await;
    gateway(results, &pair[1], runs).await;
    for threads in THREADS {
        let ratio = |metric: fn(&SpeedRow) -> f64| -> Vec<String> {
            results
                .speed
                .iter()
                .filter(|r| r.engine == "candle" && r.threads == threads)
                .filter_map(|c| {
                    let l = results.speed.iter().find(|l| {
                        l.engine == "llama-server"
                            && l.threads == threads
                            && l.prompt_tokens.abs_diff(c.prompt_tokens) * 10 <= c.prompt_tokens
                    })?;
                    Some(format!("{:.2}", metric(c) / metric(l)))
                })
                .collect()
        };
        let note = format!(
            "candle against llama.cpp at {threads} thread(s), by prompt length: decode × {}, prefill × {}",
            ratio(|r| r.decode_tps.median).join(" / "),
            ratio(|r| r.prefill_tps.median).join(" / ")
        );
        println!("{note}");
        results.notes.push(note);
    }
}

/// A server backend's start, stop and our layers over it.
async fn server_backend(results: &mut Results, backend: &Backend) {
    let runs = Runs::for_backend(backend);
    lifecycle(results, backend, runs).await;
    streaming(results, backend, runs).await;
    gateway(results, backend, runs).await;
}

async fn vllm(results: &mut Results) {
    let backend = conformance::backends::vllm();
    let runs = Runs::for_backend(&backend);
    server_backend(results, &backend).await;
    speed_matrix(
        results,
        std::slice::from_ref(&backend),
        &THREADS,
        runs.speed,
    )
    .await;
    concurrency(results, std::slice::from_ref(&backend), 2).await;
}

/// `initialize` until ready, and shutdown idle and with a stream in flight.
async fn lifecycle(results: &mut Results, backend: &Backend, runs: Runs) {
    let (mut ready, mut idle, mut in_flight) = (Vec::new(), Vec::new(), Vec::new());
    let mut lag = Vec::new();
    for _ in 0..runs.lifecycle {
        let mut runtime = (backend.new_runtime)();
        let config = config_on_free_port(backend);
        // An independent observer of the moment the engine answers.
        let observer = backend.server.is_some().then(|| watch_ready(config.port));
        let started = Instant::now();
        runtime.initialize(config).await.expect("initialize");
        let returned = Instant::now();
        ready.push(ms(returned - started));
        if let Some(observer) = observer {
            lag.push(ms(
                returned.saturating_duration_since(observer.await.unwrap())
            ));
        }
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
    let row = LifecycleRow {
        engine: engine_name(backend).to_owned(),
        ready_ms: Stat::of(&ready),
        stop_idle_ms: Stat::of(&idle),
        stop_in_flight_ms: Stat::of(&in_flight),
    };
    println!(
        "{}: ready in {:.0} ms; stop idle {:.1} ms, with a stream in flight {:.1} ms",
        row.engine, row.ready_ms.median, row.stop_idle_ms.median, row.stop_in_flight_ms.median
    );
    if !lag.is_empty() {
        let lag = Stat::of(&lag);
        let note = format!(
            "{}: initialize returns {:.1} ms ({:.1}–{:.1}) after the engine first answers /health",
            row.engine, lag.median, lag.min, lag.max
        );
        println!("{note}");
        results.notes.push(note);
    }
    results.lifecycle.push(row);
}

/// `generate_stream` against a plain streaming HTTP client to the engine.
async fn streaming(results: &mut Results, backend: &Backend, runs: Runs) {
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
    let row = pairs.overhead(
        engine_name(backend),
        "generate_stream, 64 tokens",
        "plain HTTP to its base_url",
    );
    println!(
        "{}: generate_stream {:.1} ms vs direct HTTP {:.1} ms; ratio {:.3}; first token {:+.2} ms vs direct{}",
        row.engine,
        row.ours_ms.median,
        row.baseline_ms.median,
        row.ratio.median,
        pairs.median(|ours, direct| ms(ours.first_token) - ms(direct.first_token)),
        pairs.note()
    );
    results.overheads.push(row);
    if let Some(socket) = engine_socket(runtime.as_ref()) {
        front(results, backend, runtime.as_ref(), &socket, runs).await;
    }
    runtime.shutdown().await.unwrap();
}

/// The engine's private socket, from its command line (`--host X.sock` for
/// llama-server, `--uds X` for vLLM), when it runs on one.
fn engine_socket(runtime: &dyn ModelRuntime) -> Option<std::path::PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", runtime.engine_pid()?)).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
    args.windows(2).find_map(|pair| {
        let flag = std::str::from_utf8(pair[0]).ok()?;
        let value = std::str::from_utf8(pair[1]).ok()?;
        let socket = (flag == "--uds") || (flag == "--host" && value.ends_with(".sock"));
        socket.then(|| value.into())
    })
}

/// What the front (our listener before an engine on a private socket, the
/// runtime's `base_url`) costs: the same streamed request through it and
/// straight to the engine's socket, for a long answer (its cost per chunk)
/// and a one-token one (its cost per request).
async fn front(
    results: &mut Results,
    backend: &Backend,
    runtime: &dyn ModelRuntime,
    socket: &std::path::Path,
    runs: Runs,
) {
    let http = direct_client();
    let to_socket = reqwest::Client::builder()
        .unix_socket(socket)
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client over the engine's socket");
    let key = conformance::bearer(runtime);
    // The host part is ignored over a Unix socket.
    let socket_url = "http://engine/v1/chat/completions";
    for (request, what) in [
        (streamed_request(), "front, 64 tokens"),
        (streamed_request().with_max_tokens(1), "front, 1 token"),
    ] {
        let pairs = Pairs::measure(
            runs.stream,
            || direct_to(&http, runtime, &request),
            || direct_http(&to_socket, socket_url, Some(&key), &request),
        )
        .await;
        let row = pairs.overhead(engine_name(backend), what, "the engine's socket directly");
        println!(
            "{}: {what}: through the front {:.2} ms vs the socket directly {:.2} ms; ratio {:.3}{}",
            row.engine,
            row.ours_ms.median,
            row.baseline_ms.median,
            row.ratio.median,
            pairs.note()
        );
        results.overheads.push(row);
    }
}

/// `model-runtime serve`'s path (the router over a RuntimeManager) against
/// talking to the engine directly, both as plain streaming HTTP clients.
async fn gateway(results: &mut Results, backend: &Backend, runs: Runs) {
    let (manager, gateway_url, server) =
        conformance::gateway::start(backend, backend.config.clone()).await;
    let (engine_url, engine_key, version) = manager
        .with_runtime(None, async |runtime| {
            (
                runtime.completions_url(),
                conformance::bearer(runtime),
                runtime.metadata().version.clone(),
            )
        })
        .await
        .unwrap();
    results
        .versions
        .insert(engine_name(backend).to_owned(), version);
    let request = streamed_request();
    let http = direct_client();
    let pairs = Pairs::measure(
        runs.stream,
        || direct_http(&http, &gateway_url, None, &request),
        || direct_http(&http, &engine_url, Some(&engine_key), &request),
    )
    .await;
    let row = pairs.overhead(
        engine_name(backend),
        "gateway (serve), 64 tokens",
        "plain HTTP to its base_url",
    );
    println!(
        "{}: through the gateway {:.1} ms vs the engine directly {:.1} ms; ratio {:.3}{}",
        row.engine,
        row.ours_ms.median,
        row.baseline_ms.median,
        row.ratio.median,
        pairs.note()
    );
    results.overheads.push(row);
    server.abort();
    manager.shutdown_within(Duration::ZERO).await;
}

const RUNS_COLD: usize = 5;

/// The gateway over several models: its warm overhead against the engine
/// directly, a cold request's time to first token beyond the engine's own
/// start, and the time to switch between two models.
async fn many_models(results: &mut Results) {
    use model_runtime::BackendChoice;
    use runtime_gateway::{GatewayConfig, ModelSpec, RuntimeManager};
    let llama = conformance::backends::llamacpp();
    gateway(results, &llama, Runs::for_backend(&llama)).await;
    let spec = |name: &str, backend: &Backend, choice| {
        ModelSpec::from_runtime_config(name, &backend.config).with_backend(choice)
    };
    let candle = conformance::backends::candle();
    let request = streamed_request();
    let http = direct_client();

    // Cold: a gateway with the model unloaded, whose first request starts
    // it, against the same cold path without the gateway: starting the
    // engine directly, then its first request. Interleaved.
    let (mut through, mut direct, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let mut share = Vec::new();
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
        ratio.push(ms(cold.first_token) / direct_total);
        share.push(ms(cold.first_token) - direct_total);
    }
    let row = OverheadRow {
        engine: "llama-server".to_owned(),
        layer: "cold request through the gateway (first token)".to_owned(),
        baseline: "start the engine, then request it".to_owned(),
        ours_ms: Stat::of(&through),
        baseline_ms: Stat::of(&direct),
        ratio: Stat::of(&ratio),
    };
    let share = Stat::of(&share);
    let note = format!(
        "cold request: the gateway's share of the first token is {:+.1} ms ({:+.1} to {:+.1}; goal <= 20 ms)",
        share.median, share.min, share.max
    );
    println!("{note}");
    results.notes.push(note);
    results.overheads.push(row);

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
        let switch = Stat::of(&switches);
        let note = format!(
            "switching between two models, {what}: first token {:.1} ms ({:.1}–{:.1}) after the request",
            switch.median, switch.min, switch.max
        );
        println!("{note}");
        results.notes.push(note);
        manager.shutdown_within(Duration::ZERO).await;
        server.abort();
    }
}

/// Past one machine: llama.cpp with its layers on an RPC worker against
/// llama.cpp alone, and a server we attach to against plain HTTP to it.
async fn distributed(results: &mut Results) {
    use model_runtime::llamacpp::{LlamaCppOptions, RPC_BINARY_ENV, RpcWorker, RpcWorkerConfig};
    use model_runtime::remote::RemoteRuntime;
    let llama = conformance::backends::llamacpp();
    let runs = Runs::for_backend(&llama);

    // Attach: RemoteRuntime over the engine a LlamaCppRuntime started.
    let mut local = started(&llama, llama.config.clone(), results).await;
    let mut remote = RemoteRuntime::new();
    let attach = runtime_core::RuntimeConfig::new(local.base_url())
        .with_served_model_name(llama.config.model_name())
        .with_api_key(local.api_key().expect("the engine key").expose());
    remote.initialize(attach).await.expect("attach");
    let request = streamed_request();
    let http = direct_client();
    let pairs = Pairs::measure(
        runs.stream,
        || through_runtime(&remote, request.clone()),
        || direct_to(&http, local.as_ref(), &request),
    )
    .await;
    let row = pairs.overhead(
        "llama-server",
        "RemoteRuntime (attach), 64 tokens",
        "plain HTTP to its base_url",
    );
    println!(
        "attach: RemoteRuntime {:.1} ms vs direct HTTP {:.1} ms; ratio {:.3}{}",
        row.ours_ms.median,
        row.baseline_ms.median,
        row.ratio.median,
        pairs.note()
    );
    results.overheads.push(row);

    remote.shutdown().await.unwrap();
    local.shutdown().await.unwrap();

    // RPC: the same requests to llama.cpp alone and over one worker on
    // loopback, one slot each with room for the prompt.
    let speed_config = llama
        .config
        .clone()
        .with_parallel(1)
        .with_context_size(SPEED_CONTEXT);
    let mut local = started(&llama, speed_config.clone(), results).await;
    let binary = conformance::required_env(RPC_BINARY_ENV);
    let worker = RpcWorker::start(RpcWorkerConfig::new().with_binary(&binary))
        .await
        .expect("an RPC worker");
    let split_config = speed_config
        .clone()
        .with_options(&LlamaCppOptions::new().with_rpc_worker(worker.address().to_string()));
    let split = started(&llama, split_config, results).await;
    let (mut alone, mut over) = (Vec::new(), Vec::new());
    for run in 0..runs.speed {
        let request = speed_request(run, LENGTHS[1]);
        let (a, o) = if run % 2 == 0 {
            let a = sample(local.as_ref(), request.clone()).await;
            (a, sample(split.as_ref(), request).await)
        } else {
            let o = sample(split.as_ref(), request.clone()).await;
            (sample(local.as_ref(), request).await, o)
        };
        alone.push(a);
        over.push(o);
    }
    for (what, value) in [
        (
            "prefill",
            (|s: &Sample| Some(s.prefill_tps)) as fn(&Sample) -> Option<f64>,
        ),
        ("decode", |s: &Sample| s.decode_tps),
    ] {
        let ratios: Vec<f64> = alone
            .iter()
            .zip(&over)
            .filter_map(|(a, o)| Some(value(o)? / value(a)?))
            .collect();
        if ratios.is_empty() {
            continue;
        }
        let ratio = Stat::of(&ratios);
        let note = format!(
            "llama.cpp over one RPC worker on loopback against llama.cpp alone, {} prompt tokens: {what} × {:.2} ({:.2}–{:.2})",
            alone[0].prompt_tokens, ratio.median, ratio.min, ratio.max
        );
        println!("{note}");
        results.notes.push(note);
    }
    let mut split = split;
    split.shutdown().await.unwrap();
    worker.stop().await;
    local.shutdown().await.unwrap();
}
