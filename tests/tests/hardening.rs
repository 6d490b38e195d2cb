//! What an operator's probes of `model-runtime serve` found, each as the
//! behaviour that holds now: keys that rotate, values refused where they
//! are read, an admin scope, an RPC worker that does not listen on the
//! network unasked. Against the built binary and the real candle engine.

use std::time::Duration;

use conformance::serve::{ConfigFile, Serving, candle_model, command, failed_start};
use conformance::{MODEL_ENV, required_env};

fn free_port() -> u16 {
    runtime_process::free_port("127.0.0.1").expect("a free port")
}

/// A short chat with the model every test here serves, `smol`.
async fn chat(base: &str, key: &str) -> u16 {
    let mut body = conformance::wire::chat_body("Name a color.", 2, false);
    body["model"] = "smol".into();
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("the gateway answers")
        .status()
        .as_u16()
}

async fn get(url: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .expect("the gateway answers")
        .status()
        .as_u16()
}

#[tokio::test]
async fn an_empty_client_key_is_refused_at_start() {
    conformance::init_tracing();
    let model = required_env(MODEL_ENV);
    let mut serve = command(["serve"]);
    serve
        .arg(&model)
        .args(["--backend", "candle", "--host", "0.0.0.0"])
        .args(["--port", &free_port().to_string()])
        .env("MODEL_RUNTIME_API_KEY", "");
    let (status, stderr) = failed_start(serve, Duration::from_secs(20)).await;
    assert!(!status.success(), "an empty key is not a key: {stderr}");
    assert!(stderr.contains("MODEL_RUNTIME_API_KEY"), "{stderr}");
    assert!(stderr.contains("empty"), "{stderr}");

    let port = free_port();
    let file = ConfigFile::new(&format!(
        "listen = \"127.0.0.1:{port}\"\napi_keys = [\"\"]\n\n{}",
        candle_model("smol", "")
    ));
    let mut serve = command(["serve", "--config"]);
    serve.arg(file.path());
    let (status, stderr) = failed_start(serve, Duration::from_secs(20)).await;
    assert!(
        !status.success(),
        "an empty key in the file is refused: {stderr}"
    );
    assert!(stderr.contains("api_keys"), "{stderr}");
}

#[tokio::test]
async fn a_rotated_client_key_takes_effect_on_sighup() {
    conformance::init_tracing();
    let port = free_port();
    let text = |key: &str| {
        format!(
            "listen = \"127.0.0.1:{port}\"\napi_keys = [\"{key}\"]\n\n{}",
            candle_model("smol", "")
        )
    };
    let file = ConfigFile::new(&text("old-key"));
    let serving = Serving::start(&file, port, &[]).await;
    assert_eq!(chat(&serving.base, "old-key").await, 200);
    assert_eq!(chat(&serving.base, "new-key").await, 401);

    file.write(&text("new-key"));
    serving.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while chat(&serving.base, "new-key").await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new key is accepted after SIGHUP: {}",
            serving.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        chat(&serving.base, "old-key").await,
        401,
        "the rotated-out key is refused"
    );
    assert!(serving.stop().await.success());
}

#[tokio::test]
async fn a_duration_past_its_range_is_refused_with_its_line_not_a_panic() {
    conformance::init_tracing();
    let port = free_port();
    for (line, key) in [
        ("queue_timeout = 1e19", "queue_timeout"),
        ("queue_timeout = \"1e19s\"", "queue_timeout"),
        ("drain_timeout = \"400d\"", "drain_timeout"),
    ] {
        let file = ConfigFile::new(&format!(
            "listen = \"127.0.0.1:{port}\"\n{line}\n\n{}",
            candle_model("smol", "")
        ));
        let mut serve = command(["serve", "--config"]);
        serve.arg(file.path());
        let (status, stderr) = failed_start(serve, Duration::from_secs(20)).await;
        assert!(!status.success(), "{line}: refused: {stderr}");
        assert!(
            stderr.contains("line 2"),
            "{line}: names the line: {stderr}"
        );
        assert!(stderr.contains(key), "{line}: names the key: {stderr}");
        assert!(!stderr.contains("panicked"), "{line}: no panic: {stderr}");
    }
    for (extra, key) in [
        ("threads = 100000", "threads"),
        ("ttl = \"0s\"", "ttl"),
        ("hang_timeout = \"1ms\"", "hang_timeout"),
    ] {
        let file = ConfigFile::new(&format!(
            "listen = \"127.0.0.1:{port}\"\n\n{}",
            candle_model("smol", extra)
        ));
        let mut serve = command(["serve", "--config"]);
        serve.arg(file.path());
        let (status, stderr) = failed_start(serve, Duration::from_secs(20)).await;
        assert!(!status.success(), "{extra}: refused: {stderr}");
        assert!(stderr.contains(key), "{extra}: names the key: {stderr}");
        assert!(!stderr.contains("panicked"), "{extra}: no panic: {stderr}");
    }
}

#[tokio::test]
async fn status_metrics_and_reload_need_the_admin_key() {
    conformance::init_tracing();
    let port = free_port();
    let file = ConfigFile::new(&format!(
        "listen = \"127.0.0.1:{port}\"\napi_keys = [\"client\"]\nadmin_keys = [\"admin\"]\n\n{}",
        candle_model("smol", "")
    ));
    let serving = Serving::start(&file, port, &[]).await;
    let base = &serving.base;
    for route in ["/status", "/metrics"] {
        assert_eq!(
            get(&format!("{base}{route}"), "client").await,
            403,
            "{route} is not for client keys"
        );
        assert_eq!(
            get(&format!("{base}{route}"), "nobody").await,
            401,
            "{route}"
        );
        assert_eq!(
            get(&format!("{base}{route}"), "admin").await,
            200,
            "{route}"
        );
    }
    // The admin key is not a client key.
    assert_eq!(chat(base, "admin").await, 401);
    assert_eq!(chat(base, "client").await, 200);

    let http = reqwest::Client::new();
    let reload = |key: &'static str| http.post(format!("{base}/reload")).bearer_auth(key).send();
    assert_eq!(reload("client").await.unwrap().status(), 403);
    file.write(&format!(
        "listen = \"127.0.0.1:{port}\"\napi_keys = [\"client\"]\nadmin_keys = [\"admin\"]\n\n{}\n{}",
        candle_model("smol", ""),
        candle_model("smol-2", "")
    ));
    let reloaded = reload("admin").await.unwrap();
    assert_eq!(reloaded.status(), 200, "{}", reloaded.text().await.unwrap());
    let models: serde_json::Value = http
        .get(format!("{base}/v1/models"))
        .bearer_auth("client")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        models.to_string().contains("smol-2"),
        "the reload took effect: {models}"
    );
    assert!(serving.stop().await.success());
}

#[tokio::test]
async fn without_an_admin_key_the_admin_routes_answer_loopback_peers_only() {
    conformance::init_tracing();
    // Another address of this machine, so a request can come from a
    // non-loopback peer.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe
        .connect("192.0.2.1:9")
        .expect("a route off this machine");
    let outside = probe.local_addr().unwrap().ip();
    assert!(!outside.is_loopback(), "{outside}");

    let port = free_port();
    let file = ConfigFile::new(&format!(
        "listen = \"0.0.0.0:{port}\"\napi_keys = [\"client\"]\n\n{}",
        candle_model("smol", "")
    ));
    let serving = Serving::start(&file, port, &[]).await;
    assert_eq!(
        get(&format!("{}/status", serving.base), "client").await,
        200
    );
    let from_outside = format!("http://{outside}:{port}");
    assert_eq!(
        chat(&from_outside, "client").await,
        200,
        "clients may come from anywhere"
    );
    assert_eq!(
        get(&format!("{from_outside}/status"), "client").await,
        403,
        "the status report is for loopback peers when no admin key is set"
    );
    assert_eq!(get(&format!("{from_outside}/metrics"), "client").await, 403);
    assert!(serving.stop().await.success());
}

#[tokio::test]
async fn an_rpc_worker_refuses_a_network_address_unless_told() {
    conformance::init_tracing();
    let mut worker = command(["rpc-worker", "--host", "0.0.0.0", "--port", "0"]);
    worker.env(
        runtime_llamacpp::RPC_BINARY_ENV,
        required_env(runtime_llamacpp::RPC_BINARY_ENV),
    );
    let (status, stderr) = failed_start(worker, Duration::from_secs(20)).await;
    assert!(!status.success(), "refused: {stderr}");
    assert!(
        stderr.contains("--allow-network"),
        "says how to insist: {stderr}"
    );
    assert!(
        conformance::procs::running(&required_env(runtime_llamacpp::RPC_BINARY_ENV)).is_empty(),
        "no worker was started"
    );
}
