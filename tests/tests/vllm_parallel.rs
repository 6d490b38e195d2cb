//! vLLM split into two pipeline ranks on this machine (the CPU build), and
//! the settings it cannot run refused before anything starts.
//!
//! One engine start serves every check of the first test: a pipeline of two
//! ranks takes about two and a half minutes to start here.

use std::time::{Duration, Instant};

use conformance::backends::vllm;
use conformance::checks::{self, chain, engine_activity};
use conformance::procs;
use futures::StreamExt;
use runtime_core::{Error, InferenceRequest, RuntimeConfig};
use runtime_vllm::VllmOptions;

/// The suite's vLLM configuration with two pipeline ranks (and without
/// eager mode, which the CPU build cannot run with pipeline ranks).
fn pipeline_of_two() -> RuntimeConfig {
    let mut config = vllm().config;
    config.extra_config.remove("enforce_eager");
    config.with_options(&VllmOptions::new().with_pipeline_parallel_size(2))
}

fn greedy(prompt: &str, max_tokens: u32) -> InferenceRequest {
    InferenceRequest::from_prompt(prompt)
        .with_max_tokens(max_tokens)
        .with_temperature(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pipeline_ranks_serve_the_lifecycle_generation_and_streaming_and_all_go() {
    conformance::init_tracing();
    let backend = vllm();
    let mut runtime = (backend.new_runtime)();
    let started = Instant::now();
    runtime
        .initialize(pipeline_of_two())
        .await
        .unwrap_or_else(|err| panic!("two pipeline ranks start: {}", chain(&err)));
    tracing::info!(took = ?started.elapsed(), "vLLM with two pipeline ranks is ready");

    // Lifecycle.
    assert!(runtime.is_ready().await);
    runtime.health_check().await.expect("healthy");
    assert!(!runtime.metadata().version.is_empty());
    let again = runtime.initialize(pipeline_of_two()).await.unwrap_err();
    assert!(matches!(again, Error::AlreadyInitialized), "{again:?}");
    let engine = conformance::checks::engine_processes(&backend, runtime.as_ref());
    let workers = engine
        .iter()
        .filter(|p| p.cmdline.contains("VLLM::Worker") || p.cmdline.contains("Worker_PP"))
        .count();
    assert!(
        workers >= 2 || engine.len() >= 4,
        "two ranks run (the API server, the engine core and a worker per rank): {:?}",
        engine.iter().map(|p| &p.cmdline).collect::<Vec<_>>()
    );

    // Generation: deterministic, streamed equals plain, max_tokens.
    let request = greedy("What is the capital of France?", 24);
    let first = runtime.generate(request.clone()).await.expect("generate");
    let second = runtime
        .generate(request.clone())
        .await
        .expect("generate again");
    assert!(!first.content.is_empty());
    assert_eq!(first.content, second.content, "temperature 0 repeats");
    let mut stream = runtime.generate_stream(request).await.expect("stream");
    let mut streamed = String::new();
    while let Some(delta) = stream.next().await {
        streamed.push_str(&delta.expect("a delta"));
    }
    assert_eq!(streamed, first.content, "streamed equals plain");
    let short = runtime
        .generate(greedy("Name a color.", 5))
        .await
        .expect("short");
    assert_eq!(short.usage.expect("usage").completion_tokens, 5);

    // Streaming: whole UTF-8 characters.
    let french = greedy("Réponds en français : où se trouve la tour Eiffel ?", 32);
    let mut stream = runtime.generate_stream(french).await.expect("stream");
    let mut text = String::new();
    while let Some(delta) = stream.next().await {
        text.push_str(&delta.expect("a delta"));
    }
    assert!(!text.contains('\u{fffd}'), "{text:?}");

    // Cancellation reaches the engine.
    let mut long = runtime
        .generate_stream(checks::long_request())
        .await
        .expect("a long stream");
    long.next().await.expect("a delta").expect("a delta");
    drop(long);
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine_activity(&backend, runtime.as_ref()).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the dropped stream stops in the engine"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Shutdown: every rank's process goes.
    let pids: Vec<i32> = engine.iter().map(|p| p.pid).collect();
    runtime.shutdown().await.expect("shutdown");
    let left = procs::wait_gone(&pids, backend.exit_budget).await;
    assert!(left.is_empty(), "every rank's process is gone: {left:?}");
    checks::assert_no_engine_left(&backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_the_model_or_the_cpu_build_cannot_run_are_refused_before_starting() {
    conformance::init_tracing();
    let backend = vllm();
    let base = {
        let mut config = vllm().config;
        config.extra_config.remove("enforce_eager");
        config
    };
    for (options, key, says) in [
        (
            VllmOptions::new().with_tensor_parallel_size(2),
            "extra_config.tensor_parallel_size",
            "9 attention heads",
        ),
        (
            VllmOptions::new()
                .with_pipeline_parallel_size(2)
                .with_enforce_eager(true),
            "extra_config.enforce_eager",
            "intermediate_tensors",
        ),
    ] {
        let mut runtime = (backend.new_runtime)();
        let started = Instant::now();
        let err = runtime
            .initialize(base.clone().with_options(&options))
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused before vLLM starts ({:?})",
            started.elapsed()
        );
        match &err {
            Error::InvalidConfig { field, reason } => {
                assert_eq!(field, key);
                assert!(reason.contains(says), "{reason}");
            }
            other => panic!("a typed refusal naming {key}, got {other:?}"),
        }
        assert!(!runtime.is_ready().await);
    }
    checks::assert_no_engine_left(&backend).await;
}
