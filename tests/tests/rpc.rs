//! llama.cpp split across RPC workers (two on loopback), against the real
//! engine: the lifecycle, generation and streaming checks; greedy answers
//! that equal the single-process ones up to near ties; a worker killed
//! mid-stream; no process left behind.

use std::time::Duration;

use conformance::backends::llamacpp;
use conformance::checks::{self, chain, start};
use conformance::identity::{self, PROMPTS, Reference};
use conformance::{Backend, procs, required_env};
use futures::StreamExt;
use runtime_core::{Error, InferenceRequest};
use runtime_llamacpp::{LlamaCppOptions, RPC_BINARY_ENV, RpcWorker, RpcWorkerConfig};

/// Two workers on loopback.
async fn two_workers() -> Vec<RpcWorker> {
    let binary = required_env(RPC_BINARY_ENV);
    let mut workers = Vec::new();
    for _ in 0..2 {
        let worker = RpcWorker::start(RpcWorkerConfig::new().with_binary(&binary))
            .await
            .unwrap_or_else(|err| panic!("an RPC worker starts: {}", chain(&err)));
        workers.push(worker);
    }
    workers
}

/// llama.cpp with its layers split across `workers` and itself.
fn over(workers: &[RpcWorker]) -> Backend {
    let mut backend = llamacpp();
    let options = workers
        .iter()
        .fold(LlamaCppOptions::new(), |options, worker| {
            options.with_rpc_worker(worker.address().to_string())
        });
    backend.config = backend.config.clone().with_options(&options);
    backend
}

/// Stops the workers and proves that neither they nor an engine is left.
async fn stop(backend: &Backend, workers: Vec<RpcWorker>) {
    let pids: Vec<i32> = workers.iter().map(|w| w.pid() as i32).collect();
    for worker in &workers {
        worker.stop().await;
    }
    assert!(
        procs::wait_gone(&pids, Duration::from_secs(2))
            .await
            .is_empty(),
        "the workers are gone"
    );
    assert!(procs::running(&required_env(RPC_BINARY_ENV)).is_empty());
    checks::assert_no_engine_left(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_server_over_two_rpc_workers_passes_lifecycle_generation_and_streaming() {
    conformance::init_tracing();
    let workers = two_workers().await;
    let backend = over(&workers);
    conformance::harness::sharing_an_engine(&backend, async |backend| {
        checks::lifecycle(backend).await;
        checks::generation(backend).await;
        checks::streaming_utf8(backend).await;
    })
    .await;
    assert!(
        workers.iter().all(RpcWorker::is_running),
        "the workers served the engine throughout"
    );
    stop(&backend, workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_answers_over_rpc_equal_the_single_process_ones_exactly() {
    conformance::init_tracing();
    let workers = two_workers().await;
    let backend = over(&workers);
    let mut split = start(&backend).await;
    let mut answers = Vec::new();
    for prompt in PROMPTS {
        let request = InferenceRequest::from_prompt(*prompt)
            .with_max_tokens(48)
            .with_temperature(0.0);
        answers.push(split.generate(request).await.expect("over RPC").content);
    }
    split.shutdown().await.unwrap();
    stop(&backend, workers).await;

    // The same ggml CPU kernels on the same machine, the layers only split
    // between processes: every answer is the same, bit for bit.
    let mut single = start(&llamacpp()).await;
    let mut differing = Vec::new();
    for (prompt, answer) in PROMPTS.iter().zip(&answers) {
        let request = InferenceRequest::from_prompt(*prompt)
            .with_max_tokens(48)
            .with_temperature(0.0);
        let local = single
            .generate(request)
            .await
            .expect("single process")
            .content;
        if &local != answer {
            differing.push((*prompt, local, answer.clone()));
        }
    }
    // Where they differ, how far apart (near ties or not) helps the diagnosis.
    let scored = if differing.is_empty() {
        None
    } else {
        let reference = Reference::new(single.as_ref());
        Some(identity::score_answers(&reference, PROMPTS, &answers).await)
    };
    single.shutdown().await.unwrap();
    assert!(
        differing.is_empty(),
        "answers over RPC differ from the single process's on {} of {} prompts: {differing:#?}\n{scored:?}",
        differing.len(),
        PROMPTS.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_is_a_typed_error_within_seconds() {
    conformance::init_tracing();
    let workers = two_workers().await;
    let backend = over(&workers);
    let mut runtime = start(&backend).await;
    let mut stream = runtime
        .generate_stream(checks::long_request())
        .await
        .expect("a stream");
    stream.next().await.expect("a delta").expect("a delta");
    let victim = nix::unistd::Pid::from_raw(workers[1].pid() as i32);
    nix::sys::signal::kill(victim, nix::sys::signal::Signal::SIGKILL).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(item) = stream.next().await {
            if let Err(err) = item {
                return Some(err);
            }
        }
        None
    })
    .await
    .expect("the stream ends within 15 s of the worker's death");
    assert!(
        matches!(
            outcome,
            Some(Error::EngineExited { .. } | Error::EngineUnresponsive { .. })
        ),
        "a typed error: {outcome:?}"
    );
    runtime.shutdown().await.unwrap();
    stop(&backend, workers).await;
}
