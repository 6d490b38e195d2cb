//! The surface a client meets: bad requests, the API key, our HTTP
//! servers' refusals.

use super::*;

/// Empty messages, max_tokens 0 and a prompt over the context are typed errors,
/// and the engine stays healthy.
pub async fn bad_requests(backend: &Backend) {
    let runtime = crate::harness::shared_runtime(backend).await;
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
pub async fn secrets(backend: &Backend) {
    let key = format!("sentinel-{}", std::process::id());
    let config = backend.config.clone().with_api_key(&key);
    let shown = format!("{config:?}");
    assert!(!shown.contains(&key), "Debug shows the key: {shown}");
    crate::log_capture::start();
    let mut runtime = start_with(backend, config).await;
    for process in engine_processes(backend, runtime.as_ref()) {
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
    runtime.shutdown().await.expect("shutdown");
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
    let runtime = crate::harness::shared_runtime(backend).await;
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
        ("n", serde_json::json!(2)),
        (
            "response_format",
            serde_json::json!({"type": "json_object"}),
        ),
        (
            "tools",
            serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ),
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
