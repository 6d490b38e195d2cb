//! The checks, one function per group. Each starts its own engine (or several,
//! where the group is about starting), and leaves nothing running.

use std::time::{Duration, Instant};

use futures::StreamExt;
use runtime_core::{
    ChatMessage, Error, FinishReason, InferenceRequest, ModelRuntime, RuntimeConfig, StreamEvent,
};
use tokio::io::AsyncBufReadExt;

use crate::{Backend, procs};

const QUESTION: &str = "What is the capital of France?";

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

async fn collect_stream(runtime: &dyn ModelRuntime, request: InferenceRequest) -> Vec<String> {
    let mut stream = runtime
        .generate_stream(request)
        .await
        .expect("stream starts");
    let mut deltas = Vec::new();
    while let Some(delta) = stream.next().await {
        deltas.push(delta.unwrap_or_else(|err| panic!("stream failed: {}", chain(&err))));
    }
    deltas
}

/// The engine processes of a running server backend (empty for in-process ones).
fn engine_processes(backend: &Backend, runtime: &dyn ModelRuntime) -> Vec<procs::Proc> {
    match backend.server {
        Some(_) => procs::engine_on_port(procs::port_of(&runtime.base_url())),
        None => Vec::new(),
    }
}

fn pids(procs: &[procs::Proc]) -> Vec<i32> {
    procs.iter().map(|p| p.pid).collect()
}

/// Runs after every check: no process of the engine binary may be left.
pub async fn assert_no_engine_left(backend: &Backend) {
    let Some(server) = &backend.server else {
        return;
    };
    let mut left = pids(&procs::running(&server.binary));
    left.extend(
        procs::all()
            .iter()
            .filter(|p| server.process_markers.iter().any(|m| p.cmdline.contains(m)))
            .map(|p| p.pid),
    );
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
    let runtime = start(backend).await;
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

    let streamed = collect_stream(runtime.as_ref(), request.clone())
        .await
        .concat();
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

    let sampled = InferenceRequest::from_prompt("Write a short poem about the sea.")
        .with_max_tokens(24)
        .with_temperature(0.8)
        .with_seed(42);
    let a = runtime.generate(sampled.clone()).await.expect("seeded");
    let b = runtime.generate(sampled).await.expect("seeded again");
    assert_eq!(a.content, b.content, "a seed at temperature 0.8 repeats");
}

/// Non-ASCII output arrives as valid UTF-8 deltas with no replacement characters.
pub async fn streaming_utf8(backend: &Backend) {
    let runtime = start(backend).await;
    let mut non_ascii = false;
    for prompt in [
        QUESTION,
        "Réponds en français : où se trouve la tour Eiffel ?",
        "写一句关于春天的中文句子。",
        "Reply with three emoji that describe happiness.",
    ] {
        let request = greedy(prompt, 32);
        let deltas = collect_stream(runtime.as_ref(), request.clone()).await;
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

/// Four requests at once all succeed.
pub async fn concurrency(backend: &Backend) {
    let runtime = start(backend).await;
    let prompts = [
        "Name a color.",
        "Name an animal.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
    ];
    let answers = futures::future::join_all(
        prompts
            .iter()
            .map(|prompt| runtime.generate(greedy(prompt, 16))),
    )
    .await;
    for (prompt, answer) in prompts.iter().zip(answers) {
        let answer = answer.unwrap_or_else(|err| panic!("{prompt}: {}", chain(&err)));
        assert!(!answer.content.is_empty(), "{prompt}");
    }
    let streams = futures::future::join_all(
        prompts
            .iter()
            .map(|prompt| collect_stream(runtime.as_ref(), greedy(prompt, 16))),
    )
    .await;
    assert!(streams.iter().all(|deltas| !deltas.is_empty()));
}

/// Dropping a stream after a few deltas cancels the generation in the engine.
pub async fn cancellation(backend: &Backend) {
    let runtime = start(backend).await;
    let long = long_request();
    let mut stream = runtime.generate_stream(long).await.expect("stream");
    for _ in 0..3 {
        stream.next().await.expect("a delta").expect("a delta");
    }
    let dropped = Instant::now();
    drop(stream);

    if backend
        .server
        .as_ref()
        .is_some_and(|s| s.has_slots_endpoint)
    {
        let idle_after = wait_for_idle_slots(runtime.as_ref(), Duration::from_secs(2)).await;
        assert!(
            idle_after.is_some(),
            "the engine kept generating after the stream was dropped"
        );
        tracing::info!(idle_after = ?idle_after.unwrap(), "engine idle after the stream was dropped");
    }
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
    let mut ended_with = None;
    while let Some(item) = stream.next().await {
        if let Err(err) = item {
            ended_with = Some(err);
            break;
        }
    }
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

async fn wait_for_idle_slots(runtime: &dyn ModelRuntime, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let http = reqwest::Client::new();
    while started.elapsed() < within {
        let mut request = http.get(format!("{}/slots", runtime.base_url()));
        if let Some(key) = runtime.api_key() {
            request = request.bearer_auth(key.expose());
        }
        let slots: serde_json::Value = request.send().await.ok()?.json().await.ok()?;
        let busy = slots
            .as_array()?
            .iter()
            .any(|slot| slot["is_processing"].as_bool().unwrap_or(true));
        if !busy {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Empty messages, max_tokens 0 and a prompt over the context are typed errors,
/// and the engine stays healthy.
pub async fn bad_requests(backend: &Backend) {
    let runtime = start(backend).await;
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
        tracing::info!("{}: in-process, no binary to miss", backend.name);
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

    let runtime = start(backend).await;
    assert_ne!(procs::port_of(&runtime.base_url()), 0);
}

/// The engine SIGKILLed mid-stream: the stream ends with EngineExited carrying
/// the log tail within a second, and is_ready turns false.
pub async fn fault_engine_killed(backend: &Backend) {
    if backend.server.is_none() {
        tracing::info!("{}: in-process, no engine process to kill", backend.name);
        return;
    }
    let mut runtime = start(backend).await;
    let engine = engine_processes(backend, runtime.as_ref());
    assert!(!engine.is_empty(), "found the engine by its port");
    let long = long_request();
    let mut stream = runtime.generate_stream(long).await.expect("stream");
    stream.next().await.expect("a delta").expect("a delta");

    let killed = Instant::now();
    for process in &engine {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(process.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let outcome = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(item) = stream.next().await {
            if let Err(err) = item {
                return Some(err);
            }
        }
        None
    })
    .await
    .expect("the stream ends within 1 s of the kill");
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
    if backend.server.is_some() {
        assert!(!engine.is_empty(), "found the engine of hold-runtime");
    }

    child.start_kill().expect("SIGKILL hold-runtime");
    child.wait().await.expect("reap hold-runtime");
    let left = procs::wait_gone(&pids(&engine), backend.exit_budget).await;
    assert!(left.is_empty(), "the engine dies with its owner: {left:?}");
    wait_port_closed(port, Duration::from_secs(1)).await;
}
