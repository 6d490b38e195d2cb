//! The `model-runtime` binary as a user runs it, and `RuntimeManager` hot swaps,
//! against the real engines.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use conformance::backends::{candle, llamacpp};
use conformance::{MODEL_ENV, procs, required_env};
use runtime_core::{Error, InferenceRequest, RuntimeConfig};
use runtime_gateway::{Backend, RuntimeManager};
use runtime_openai::ChatService;

fn cli() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(required_env("MODEL_RUNTIME_CLI_BIN"));
    command.kill_on_drop(true).stdin(Stdio::null());
    command
}

fn model() -> String {
    required_env(MODEL_ENV).display().to_string()
}

#[tokio::test]
async fn run_streams_the_answer_and_exits_zero() {
    let output = cli()
        .args([
            "run",
            &model(),
            "--backend",
            "candle",
            "--max-tokens",
            "16",
            "--temperature",
            "0",
        ])
        .args(["--prompt", "What is the capital of France?"])
        .output()
        .await
        .expect("model-runtime runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}: {stderr}",
        output.status
    );
    assert!(stdout.trim().len() > 3, "an answer on stdout: {stdout:?}");
    assert!(
        stderr.contains("using candle"),
        "it says which backend: {stderr}"
    );
    assert!(
        !stderr.contains('\r'),
        "no spinner when stderr is not a terminal"
    );
}

#[tokio::test]
async fn run_picks_llama_cpp_for_gguf_when_llama_server_is_installed() {
    let output = cli()
        .args([
            "run",
            &model(),
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--prompt",
            "Hi",
        ])
        .env(
            runtime_llamacpp::BINARY_ENV,
            required_env(runtime_llamacpp::BINARY_ENV),
        )
        .output()
        .await
        .expect("model-runtime runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("using llamacpp"), "{stderr}");
    let binary = required_env(runtime_llamacpp::BINARY_ENV);
    assert!(
        procs::wait_gone(&pids_of(&binary), Duration::from_secs(2))
            .await
            .is_empty()
    );
}

fn pids_of(binary: &std::path::Path) -> Vec<i32> {
    procs::running(binary).iter().map(|p| p.pid).collect()
}

#[tokio::test]
async fn backends_lists_the_three_backends() {
    let output = cli()
        .arg("backends")
        .output()
        .await
        .expect("model-runtime runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    for name in ["llamacpp", "vllm", "candle"] {
        assert!(stdout.contains(name), "{name} is listed: {stdout}");
    }
}

#[tokio::test]
async fn a_bad_model_path_is_a_readable_error() {
    let output = cli()
        .args(["run", "/nonexistent/model.gguf", "--prompt", "hi"])
        .output()
        .await
        .expect("model-runtime runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("model not found at /nonexistent/model.gguf"),
        "{stderr}"
    );
    assert!(stderr.lines().count() <= 4, "one short paragraph: {stderr}");
}

#[tokio::test]
async fn serve_answers_chat_completions_and_stops_on_sigterm() {
    let binary = required_env(runtime_llamacpp::BINARY_ENV);
    let port = runtime_process::free_port("127.0.0.1").unwrap();
    let mut server = cli()
        .args([
            "serve",
            &model(),
            "--backend",
            "llamacpp",
            "--port",
            &port.to_string(),
        ])
        .args(["--api-key", "gateway-key"])
        .env(runtime_llamacpp::BINARY_ENV, &binary)
        .stderr(Stdio::piped())
        .spawn()
        .expect("model-runtime serve starts");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http.get(format!("{base}/health")).send().await, Ok(r) if r.status() == 200) {
        assert!(Instant::now() < deadline, "serve became healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12, "temperature": 0
    });
    let completions = format!("{base}/v1/chat/completions");
    let unauthorized = http.post(&completions).json(&body).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);
    let authorized = |body: &serde_json::Value| {
        http.post(&completions)
            .bearer_auth("gateway-key")
            .json(body)
            .send()
    };
    let plain: serde_json::Value = authorized(&body).await.unwrap().json().await.unwrap();
    let content = plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!content.is_empty(), "{plain}");

    let mut streamed_body = body.clone();
    streamed_body["stream"] = true.into();
    streamed_body["stream_options"] = serde_json::json!({"include_usage": true});
    let streamed = authorized(&streamed_body)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut text = String::new();
    let mut saw_usage = false;
    for line in streamed.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let chunk: serde_json::Value = serde_json::from_str(line).unwrap();
        text.push_str(
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or(""),
        );
        saw_usage |= chunk["usage"]["completion_tokens"].as_u64().is_some();
    }
    assert!(streamed.trim_end().ends_with("data: [DONE]"), "{streamed}");
    assert_eq!(
        text, content,
        "streamed and plain answers agree at temperature 0"
    );
    assert!(saw_usage, "a usage chunk when include_usage is set");

    let engine = pids_of(&binary);
    assert!(!engine.is_empty(), "the gateway runs llama-server");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("serve exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        procs::wait_gone(&engine, Duration::from_secs(2))
            .await
            .is_empty(),
        "no engine left"
    );
}

/// Runs requests back to back until told to stop; counts successes and failures.
fn trickle(
    manager: Arc<RuntimeManager>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut errors = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let request = InferenceRequest::from_prompt("Say hi.")
                .with_max_tokens(4)
                .with_temperature(0.0);
            match manager.generate(None, request).await {
                Ok(_) => {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
                Err(err) => {
                    failed.fetch_add(1, Ordering::SeqCst);
                    errors.push(err.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        errors
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_a_trickle_of_requests_fails_none() {
    // The configuration says which engine: a runtime binary means llama.cpp.
    let manager = Arc::new(RuntimeManager::new(Box::new(|config: &RuntimeConfig| {
        Ok(if config.runtime_binary.is_some() {
            Backend::LlamaCpp.runtime()?
        } else {
            Backend::Candle.runtime()?
        })
    })));
    let on_candle = candle().config;
    let on_llama = llamacpp().config;
    manager
        .hot_swap(on_candle.clone())
        .await
        .expect("first runtime");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..2)
        .map(|_| trickle(manager.clone(), stop.clone(), ok.clone(), failed.clone()))
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    manager
        .hot_swap(on_llama.clone())
        .await
        .expect("swap to llama.cpp");
    let served_before = ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A swap that cannot start keeps the current runtime serving.
    let mut broken = on_candle.clone();
    broken.model_path = "/nonexistent/model.gguf".into();
    let err = manager.hot_swap(broken).await.unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }));
    assert!(manager.is_ready().await);

    manager
        .hot_swap(on_candle)
        .await
        .expect("swap back to candle");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut errors = Vec::new();
    for worker in workers {
        errors.extend(worker.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "failed requests during swaps: {errors:?}"
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert!(
        ok.load(Ordering::SeqCst) > served_before,
        "requests kept flowing after the swaps"
    );

    let binary = required_env(runtime_llamacpp::BINARY_ENV);
    assert!(
        procs::wait_gone(&pids_of(&binary), Duration::from_secs(2))
            .await
            .is_empty(),
        "the swapped-out llama-server was shut down"
    );
    manager.shutdown().await.unwrap();
}
