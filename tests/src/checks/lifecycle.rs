//! Starting, probing and stopping an engine.

use super::*;

/// initialize, is_ready, health_check, base_url over HTTP, metadata, shutdown,
/// shutdown twice, initialize twice, initialize again after shutdown (which
/// starts the suite's shared engine, where there is one to start).
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
            crate::VersionSource::HttpVersion => reqwest::Client::new()
                .get(format!("{}/version", runtime.base_url()))
                .bearer_auth(crate::bearer(runtime.as_ref()))
                .send()
                .await
                .expect("GET /version")
                .text()
                .await
                .expect("a version body"),
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

    // Initialize again after shutdown. In a suite that shares an engine and
    // has not started it yet, this engine becomes the shared one: one start
    // fewer, and the checks that share it run on an engine that was shut
    // down and started again.
    match crate::harness::vacancy(backend).await {
        Some(vacancy) => {
            let shared = vacancy
                .fill(runtime)
                .await
                .unwrap_or_else(|err| panic!("initialize after shutdown: {}", chain(&err)));
            assert!(shared.is_ready().await);
        }
        None => {
            runtime
                .initialize(backend.config.clone())
                .await
                .unwrap_or_else(|err| panic!("initialize after shutdown: {}", chain(&err)));
            assert!(runtime.is_ready().await);
            runtime.shutdown().await.expect("shutdown");
        }
    }
}

/// Shutdown with a stream in flight ends the stream with `ShutDown` and does
/// not wait for the generation to finish.
///
/// For an in-process engine, its threads are gone after `shutdown`, as a
/// server engine's processes are.
pub async fn shutdown_in_flight(backend: &Backend) {
    let threads = engine_threads();
    let mut runtime = start(backend).await;
    if backend.server.is_none() {
        assert!(
            engine_threads() > threads,
            "the engine runs threads of its own"
        );
    }
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
    let left = wait_engine_threads(threads, backend.exit_budget).await;
    assert_eq!(left, 0, "shutdown stops the engine's threads");
}
