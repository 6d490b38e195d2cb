//! Faults: bad models and options, a missing binary, a taken or squatted
//! port, an engine killed, hung, dropped or orphaned.

use super::*;

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
    assert!(
        own_engine_processes(backend).is_empty(),
        "no engine process was started"
    );
}

/// A missing engine binary is a typed error naming what to do.
pub async fn fault_missing_binary(backend: &Backend) {
    if backend.server.is_none() {
        not_applicable(
            backend,
            "fault_missing_binary",
            "in process, no binary to miss",
        );
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
    match &err {
        Error::InvalidConfig { field, reason } if field == "port" => {
            assert!(reason.contains(&port.to_string()), "{reason}");
        }
        other => panic!(
            "a taken port is refused by name before a start: {}",
            chain(other)
        ),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused before the engine started: {:?}",
        started.elapsed()
    );
    drop(listener);

    // The suite's engines are configured with port 0: it found a free one.
    assert_eq!(backend.config.port, 0);
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    assert_ne!(procs::port_of(&runtime.base_url()), 0);
}

/// The engine SIGKILLed mid-stream: the stream ends with EngineExited carrying
/// the log tail within a second, and is_ready turns false.
pub async fn fault_engine_killed(backend: &Backend) {
    if backend.server.is_none() {
        not_applicable(
            backend,
            "fault_engine_killed",
            "in process, no engine process to kill",
        );
        return;
    }
    let mut runtime = start(backend).await;
    let engine = engine_processes(backend, runtime.as_ref());
    let long = long_request();
    let mut stream = runtime.generate_stream(long).await.expect("stream");
    stream.next().await.expect("a delta").expect("a delta");

    let killed = Instant::now();
    procs::signal_all(&engine, nix::sys::signal::Signal::SIGKILL);
    let outcome = stream_outcome(&mut stream, Duration::from_secs(1)).await;
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
///
/// For an in-process engine: its threads stop.
pub async fn fault_dropped_runtime(backend: &Backend) {
    let threads = engine_threads();
    let runtime = start(backend).await;
    if backend.server.is_none() {
        assert!(
            engine_threads() > threads,
            "the engine runs threads of its own"
        );
    }
    let engine = engine_processes(backend, runtime.as_ref());
    let port = procs::port_of(&runtime.base_url());
    drop(runtime);
    let left = procs::wait_gone(&pids(&engine), backend.exit_budget).await;
    assert!(
        left.is_empty(),
        "dropping the runtime stops the engine: {left:?}"
    );
    let threads_left = wait_engine_threads(threads, backend.exit_budget).await;
    assert_eq!(
        threads_left, 0,
        "dropping the runtime stops the engine's threads"
    );
    wait_port_closed(port, Duration::from_secs(1)).await;
}

/// The process owning the runtime is SIGKILLed: the engine is gone within a second.
pub async fn fault_owner_killed(backend: &Backend) {
    if backend.server.is_none() {
        not_applicable(
            backend,
            "fault_owner_killed",
            "in process: the engine is threads of its owner, which die with it",
        );
        return;
    }
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
    // `READY <base_url> <engine pid, or 0 in process>`
    let mut words = ready
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("unexpected hold-runtime output {ready:?}"))
        .split(' ');
    let base_url = words.next().expect("the base URL");
    let pid: i32 = words
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("the engine's pid");
    let port = procs::port_of(base_url);
    let engine = match backend.server {
        Some(_) => procs::group(pid),
        None => Vec::new(),
    };
    if let Some(server) = &backend.server {
        assert!(!engine.is_empty(), "found the engine of hold-runtime");
        // A leader that cannot act on its parent-death signal: the engine's
        // other processes must still go (the group's watcher, or SIGKILL).
        let leaders: Vec<procs::Proc> = engine
            .iter()
            .filter(|p| {
                p.args
                    .first()
                    .is_some_and(|a| std::path::Path::new(a) == server.binary)
            })
            .cloned()
            .collect();
        assert!(!leaders.is_empty(), "found the engine's leader");
        procs::signal_all(&leaders, nix::sys::signal::Signal::SIGSTOP);
    }

    child.start_kill().expect("SIGKILL hold-runtime");
    child.wait().await.expect("reap hold-runtime");
    let left = procs::wait_gone(&pids(&engine), backend.exit_budget).await;
    assert!(left.is_empty(), "the engine dies with its owner: {left:?}");
    wait_port_closed(port, Duration::from_secs(1)).await;
}

/// A process squatting on the configured port and answering every request
/// with 200 cannot pass for the engine: initialize refuses the port before
/// starting anything, and the squatter never receives a request, let alone
/// the API key. (A squatter that takes the port after that check, while the
/// engine starts, is not taken for the engine either: readiness requires
/// the engine's own group to hold the socket; runtime-managed's
/// `a_squatter_on_the_engines_port_is_not_taken_for_the_engine` proves it.)
pub async fn fault_port_squatted(backend: &Backend) {
    if backend.server.is_none() {
        not_applicable(
            backend,
            "fault_port_squatted",
            "binds its own listener before loading: a taken port fails at once",
        );
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (saw, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    let squatter = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let saw = saw.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 8192];
                let read = socket.read(&mut buffer).await.unwrap_or(0);
                let _ = saw.send(String::from_utf8_lossy(&buffer[..read]).into_owned());
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}")
                    .await;
            });
        }
    });
    let key = "squatter-must-never-see-this-key";
    let config = backend.config.clone().with_port(port).with_api_key(key);
    let started = Instant::now();
    let err = init_err(backend, config).await;
    squatter.abort();
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field == "port"),
        "the squatted port is refused by name: {}",
        chain(&err)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused before the engine started: {:?}",
        started.elapsed()
    );
    let mut requests = Vec::new();
    while let Ok(request) = seen.try_recv() {
        requests.push(request);
    }
    assert!(
        requests.iter().all(|r| !r.contains(key)),
        "the squatter received the key: {requests:?}"
    );
}

/// The engine stops (SIGSTOP: its socket still accepts connections, nothing
/// answers): an open stream, a plain request and a new stream all end with
/// `EngineUnresponsive` within the hang timeout and a probe's margin;
/// `is_ready` and `health_check` say so; when it resumes, it serves again.
/// Before that, a slow but live engine (a long prefill, no bytes for a
/// while) is left alone.
pub async fn fault_engine_hung(backend: &Backend) {
    if backend.server.is_none() {
        not_applicable(
            backend,
            "fault_engine_hung",
            "in process: no engine process to stop",
        );
        return;
    }
    // Shorter than the long prompt's prefill (about 1.5 s for llama.cpp here),
    // which must not count as a hang. One slot, so the prompt fits.
    const HANG: Duration = Duration::from_secs(1);
    let config = backend
        .config
        .clone()
        .with_parallel(1)
        .with_hang_timeout(HANG);
    let mut runtime = start_with(backend, config).await;
    let engine = engine_processes(backend, runtime.as_ref());

    // Slow but alive: a request with no bytes for longer than the hang
    // timeout (a long prefill, then a plain answer's decode, if the model goes on). How long that
    // takes depends on the machine (vLLM's CPU path on an AMX Xeon prefills
    // these 1,500 tokens in well under a second), so the answer grows until
    // the request outlasts the timeout: only such a request proves the
    // heartbeat told slow from hung; a quick one would have passed anyway.
    let prompt = "Tell me about the sea. ".repeat(250);
    let mut took = Duration::ZERO;
    for max_tokens in [16, 96, 384] {
        let slow = InferenceRequest::from_prompt(prompt.as_str())
            .with_max_tokens(max_tokens)
            .with_temperature(0.0);
        let prefill_started = Instant::now();
        let answered = runtime.generate(slow).await;
        took = prefill_started.elapsed();
        assert!(
            answered.is_ok(),
            "a long silent request is not taken for a hang: {:?}",
            answered.map_err(|e| chain(&e))
        );
        if took > HANG * 2 {
            break;
        }
    }
    assert!(
        took > HANG,
        "the longest request took {took:?}, no longer than the hang timeout {HANG:?}: \
         lengthen it so it tests something"
    );
    tracing::info!(?took, hang = ?HANG, "a long silent request was left alone");

    let mut open = runtime
        .generate_stream(long_request())
        .await
        .expect("stream");
    open.next().await.expect("a delta").expect("a delta");
    let stopped = Instant::now();
    procs::signal_all(&engine, nix::sys::signal::Signal::SIGSTOP);
    let limit = HANG * 5;
    let (plain, new_stream, open_end) = tokio::join!(
        tokio::time::timeout(limit, runtime.generate(greedy(QUESTION, 8))),
        tokio::time::timeout(limit, async {
            match runtime.generate_stream(greedy(QUESTION, 8)).await {
                Ok(mut stream) => stream_outcome(&mut stream, limit).await,
                Err(err) => Some(err),
            }
        }),
        stream_outcome(&mut open, limit),
    );
    let waited = stopped.elapsed();
    let unresponsive = |err: &Option<Error>| matches!(err, Some(Error::EngineUnresponsive { .. }));
    let plain = plain.expect("the plain request ends").err();
    let new_stream = new_stream.expect("the new stream ends");
    let verdicts = (
        unresponsive(&plain),
        unresponsive(&new_stream),
        unresponsive(&open_end),
    );
    assert_eq!(
        verdicts,
        (true, true, true),
        "every request ends with EngineUnresponsive: {plain:?} / {new_stream:?} / {open_end:?}"
    );
    assert!(waited < HANG * 5, "they ended within {waited:?}");
    assert!(!runtime.is_ready().await, "a hung engine is not ready");
    assert!(matches!(
        runtime.health_check().await,
        Err(Error::EngineUnresponsive { .. })
    ));

    procs::signal_all(&engine, nix::sys::signal::Signal::SIGCONT);
    let deadline = Instant::now() + HANG * 5;
    while !runtime.is_ready().await {
        assert!(
            Instant::now() < deadline,
            "ready again once the engine answers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = runtime.generate(greedy(QUESTION, 4)).await;
    assert!(
        again.is_ok(),
        "serving again: {:?}",
        again.map_err(|e| chain(&e))
    );
    runtime.shutdown().await.expect("shutdown");
}
