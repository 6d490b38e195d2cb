//! The surface a client meets: bad requests, the API key, our HTTP
//! servers' refusals.

use super::*;

/// Empty messages, max_tokens 0 and a prompt over the context are typed errors,
/// and the engine stays healthy.
pub async fn bad_requests(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
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

/// The API key never shows: not on any engine process's command line (which
/// every local user can read), not in what the engine or we log, not in
/// `Debug` output.
///
/// On the shared engine, started with the key [`SharedEngine::key`](crate::harness::SharedEngine::key)
/// and with the log captured from before its start: everything the suite's
/// sharing checks made it log so far is looked at.
pub async fn secrets(backend: &Backend) {
    let key = backend
        .shared
        .as_ref()
        .expect("a harness backend")
        .key()
        .to_owned();
    let config = backend.config.clone().with_api_key(&key);
    let shown = format!("{config:?}");
    assert!(!shown.contains(&key), "Debug shows the key: {shown}");
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    assert_eq!(
        runtime.api_key().map(|k| k.expose().to_owned()).as_deref(),
        Some(key.as_str()),
        "the shared engine runs with the sentinel key"
    );
    for process in engine_processes(backend, runtime) {
        assert!(
            !process.cmdline.contains(&key),
            "the key is on the command line of {}: {}",
            process.pid,
            process.cmdline
        );
    }
    let answer = runtime.generate(greedy(QUESTION, 4)).await;
    assert!(
        answer.is_ok(),
        "the engine takes the key: {:?}",
        answer.map_err(|e| chain(&e))
    );
    let logged = crate::log_capture::take();
    assert!(!logged.is_empty(), "the log was captured");
    assert!(!logged.contains(&key), "the key is in the log");
}

/// The runtime's own HTTP server (candle serves one; server backends expose
/// the engine's, which is not ours): a cross-site `text/plain` POST, a foreign
/// `Host` or `Origin`, and fields we do not implement are refused;
/// `max_completion_tokens` is honoured.
pub async fn http_surface(backend: &Backend) {
    if backend.server.is_some() {
        not_applicable(
            backend,
            "http_surface",
            "base_url is the engine's own server; the gateway's is checked in the cli suite",
        );
        return;
    }
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    check_http_surface(&runtime.completions_url(), &crate::bearer(runtime)).await;
}

/// What every HTTP server of ours must refuse and honour (used for candle's
/// and the gateway's).
pub async fn check_http_surface(completions_url: &str, key: &str) {
    let http = reqwest::Client::new();
    let body = wire::chat_body(QUESTION, 3, false);
    let post = |body: &serde_json::Value| {
        http.post(completions_url)
            .bearer_auth(key)
            .json(body)
            .send()
    };

    let plain = http
        .post(completions_url)
        .bearer_auth(key)
        .header("Content-Type", "text/plain")
        .header("Origin", "http://evil.example")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(
        plain.status() == 415 || plain.status() == 403,
        "a cross-site text/plain POST is refused: {}",
        plain.status()
    );
    let no_type = http
        .post(completions_url)
        .bearer_auth(key)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        no_type.status(),
        415,
        "a body without Content-Type is refused"
    );
    let rebound = http
        .post(completions_url)
        .bearer_auth(key)
        .header("Host", "evil.example")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403, "a foreign Host name is refused");
    let foreign_origin = http
        .post(completions_url)
        .bearer_auth(key)
        .header("Origin", "http://evil.example")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign_origin.status(), 403, "a foreign Origin is refused");

    for (field, value) in [
        // OpenAI's deprecated spelling of tools: refused with a pointer to
        // `tools`, never taken as plain chat.
        (
            "functions",
            serde_json::json!([{"name": "f", "parameters": {}}]),
        ),
        ("frequency_penalty", serde_json::json!(0.5)),
        ("top_k", serde_json::json!(40)),
        ("response_format", serde_json::json!({"type": "xml"})),
    ] {
        let mut asking = body.clone();
        asking[field] = value;
        let response = post(&asking).await.unwrap();
        assert_eq!(response.status(), 400, "{field} is refused");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], field, "{error}");
    }

    let mut limited = body.clone();
    limited["max_tokens"] = serde_json::Value::Null;
    limited["max_completion_tokens"] = serde_json::json!(3);
    limited["messages"][0]["content"] = "Write a long story about the sea.".into();
    let answer: serde_json::Value = post(&limited).await.unwrap().json().await.unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 3, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
}

/// No route of an engine we start serves a request that lacks its key:
/// every TCP port the engine's processes listen on, and `base_url`, refuse
/// every route but `/health` without the key (vLLM's own key once guarded
/// `/v1` only: `/invocations` answered a chat completion to anyone); and a
/// server engine answers HTTP only on its private socket, in a directory
/// only its owner may enter.
pub async fn engine_routes_need_the_key(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    let mut bases = vec![runtime.base_url()];
    if backend.server.is_some() {
        let groups: std::collections::BTreeSet<i32> = engine_processes(backend, runtime)
            .iter()
            .map(|p| p.pgid)
            .collect();
        for group in groups {
            for port in procs::listening_ports(group) {
                bases.push(format!("http://127.0.0.1:{port}"));
            }
        }
    }
    bases.sort();
    bases.dedup();
    tracing::info!(?bases, "the engine's listeners");
    // Short: a port that does not speak HTTP (an engine's internal queue)
    // may accept and never answer, which serves nothing either.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let chat = wire::chat_body(QUESTION, 2, false);
    let probes: [(&str, &str, Option<&serde_json::Value>); 14] = [
        ("POST", "/v1/chat/completions", Some(&chat)),
        ("POST", "/invocations", Some(&chat)),
        ("POST", "/v1/completions", Some(&chat)),
        ("POST", "/completion", Some(&chat)),
        ("POST", "/v1/embeddings", Some(&chat)),
        ("POST", "/v1/responses", Some(&chat)),
        ("POST", "/v1/messages", Some(&chat)),
        ("POST", "/tokenize", Some(&chat)),
        ("POST", "/detokenize", Some(&chat)),
        ("GET", "/metrics", None),
        ("GET", "/v1/models", None),
        ("GET", "/slots", None),
        ("GET", "/props", None),
        ("GET", "/load", None),
    ];
    let mut served = Vec::new();
    let mut http_bases = Vec::new();
    for base in &bases {
        // Ports that do not answer HTTP at all (an engine's internal queues,
        // torch's stores) serve no route; probe only the ones that do.
        let speaks_http = http
            .get(format!("{base}/health"))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .is_ok();
        if speaks_http {
            http_bases.push(base.clone());
        }
    }
    tracing::info!(?http_bases, "of which speak HTTP");
    for base in &http_bases {
        for (method, path, body) in probes {
            let url = format!("{base}{path}");
            let request = match method {
                "POST" => http
                    .post(&url)
                    .json(body.unwrap_or(&serde_json::Value::Null)),
                _ => http.get(&url),
            };
            let sent = request.send().await;
            tracing::debug!(method, %url, outcome = ?sent.as_ref().map(|r| r.status()), "probe");
            let Ok(response) = sent else {
                continue;
            };
            if response.status().is_success() {
                served.push(format!("{method} {url}: {}", response.status()));
            }
        }
    }
    assert!(
        served.is_empty(),
        "served without the key (HTTP listeners: {http_bases:?}): {served:#?}"
    );
    if backend.server.is_some() {
        // The engine itself serves HTTP on no TCP port: only through its
        // private socket, in a directory only we may enter.
        let engine_http: Vec<&String> = http_bases
            .iter()
            .filter(|base| **base != runtime.base_url())
            .collect();
        assert!(
            engine_http.is_empty(),
            "the engine answers HTTP on a port of its own: {engine_http:?}"
        );
        let engine = engine_processes(backend, runtime);
        let socket = engine
            .iter()
            .flat_map(|p| p.args.windows(2))
            .find(|pair| (pair[0] == "--uds" || pair[0] == "--host") && pair[1].ends_with(".sock"))
            .map(|pair| std::path::PathBuf::from(&pair[1]))
            .expect("the engine listens on a Unix socket");
        use std::os::unix::fs::PermissionsExt;
        let dir = socket.parent().expect("the socket's directory");
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is for its owner only", dir.display());
    }
    // And with the key, the chat route does answer (the probes reached a server).
    let with_key = http
        .post(runtime.completions_url())
        .bearer_auth(crate::bearer(runtime))
        .json(&chat)
        .send()
        .await
        .expect("the chat route answers");
    assert!(with_key.status().is_success(), "{}", with_key.status());
}
