//! The `model-runtime` binary as a user runs it, and `RuntimeManager` hot swaps,
//! against the real engines.

use std::process::Stdio;

use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use conformance::backends::{candle, llamacpp};
use conformance::{MODEL_ENV, procs, required_env};
use model_runtime::BackendChoice;
use runtime_core::ModelService;
use runtime_core::{Error, InferenceRequest, RuntimeConfig};
use runtime_gateway::{GatewayConfig, ModelSpec, RuntimeManager};

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
    conformance::init_tracing();
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
    conformance::init_tracing();
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
    conformance::init_tracing();
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
    conformance::init_tracing();
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

/// The key the gateway tests require; passed in the environment, as the
/// README says, so it is not on the command line.
const GATEWAY_KEY: &str = "gateway-key";

/// A running `model-runtime serve` on llama.cpp.
struct Serve {
    child: tokio::process::Child,
    base: String,
    engine: Vec<i32>,
}

impl Serve {
    /// Starts `serve` with `extra` arguments and waits until it is healthy.
    async fn start(extra: &[&str]) -> Self {
        Self::start_model(model().as_ref(), extra).await
    }

    /// Starts `serve` for `model` on llama.cpp with `extra` arguments and
    /// waits until it is healthy.
    async fn start_model(model: &std::ffi::OsStr, extra: &[&str]) -> Self {
        let binary = required_env(runtime_llamacpp::BINARY_ENV);
        let port = runtime_process::free_port("127.0.0.1").unwrap();
        let child = cli()
            .arg("serve")
            .arg(model)
            .args(["--backend", "llamacpp", "--port", &port.to_string()])
            .args(extra)
            .env("MODEL_RUNTIME_API_KEY", GATEWAY_KEY)
            .env(runtime_llamacpp::BINARY_ENV, &binary)
            .stderr(Stdio::piped())
            .spawn()
            .expect("model-runtime serve starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(http.get(format!("{base}/health")).send().await, Ok(r) if r.status() == 200)
        {
            assert!(Instant::now() < deadline, "serve became healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let engine = pids_of(&binary);
        assert!(!engine.is_empty(), "the gateway runs llama-server");
        Self {
            child,
            base,
            engine,
        }
    }

    /// Runs the official-client script `clients/{script}` (with the clients
    /// at `clients` on its path) against this gateway's first model, then
    /// stops the gateway and proves its engine gone; returns the JSON the
    /// script printed. A script that fails fails the test with its stderr.
    async fn drive_with_client(
        mut self,
        script: &str,
        clients: &std::path::Path,
    ) -> serde_json::Value {
        let models = self.models().await;
        let model = models["data"][0]["id"]
            .as_str()
            .expect("a model id")
            .to_owned();
        let output =
            tokio::process::Command::new(std::env::var_os("PYTHON").unwrap_or("python3".into()))
                .arg(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("clients")
                        .join(script),
                )
                .env("PYTHONPATH", clients)
                .env("BASE_URL", &self.base)
                .env("API_KEY", GATEWAY_KEY)
                .env("MODEL", &model)
                .kill_on_drop(true)
                .output()
                .await
                .expect("python runs");
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.exit_within(Duration::from_secs(10)).await;
        self.assert_engine_gone(Duration::from_secs(2)).await;
        assert!(
            output.status.success(),
            "{script} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&output.stdout)))
    }

    fn completions(&self) -> String {
        format!("{}/v1/chat/completions", self.base)
    }

    /// `/v1/models`, with the key.
    async fn models(&self) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!("{}/v1/models", self.base))
            .bearer_auth(GATEWAY_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32),
            signal,
        )
        .unwrap();
    }

    /// Waits for `serve` to exit; fails the test after `within`.
    async fn exit_within(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("serve exits within {within:?}"))
            .unwrap()
    }

    async fn assert_engine_gone(&self, within: Duration) {
        let left = procs::wait_gone(&self.engine, within).await;
        assert!(left.is_empty(), "no engine left: {left:?}");
    }
}

#[tokio::test]
async fn serve_answers_chat_completions_and_stops_on_sigterm() {
    conformance::init_tracing();
    let mut serve = Serve::start(&[]).await;
    let http = reqwest::Client::new();
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12, "temperature": 0
    });
    let completions = serve.completions();
    let unauthorized = http.post(&completions).json(&body).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);
    let authorized = |body: &serde_json::Value| {
        http.post(&completions)
            .bearer_auth(GATEWAY_KEY)
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
    let answer = conformance::wire::SseAnswer::parse(&streamed);
    assert!(answer.is_well_formed(), "{streamed}");
    assert_eq!(
        answer.text, content,
        "streamed and plain answers agree at temperature 0"
    );
    assert!(
        streamed.contains("\"completion_tokens\""),
        "a usage chunk when include_usage is set"
    );

    let cmdline = std::fs::read(format!("/proc/{}/cmdline", serve.child.id().unwrap())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(GATEWAY_KEY),
        "the key is not on serve's command line"
    );
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let status = serve.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    serve.assert_engine_gone(Duration::from_secs(2)).await;
}

/// On the first signal, open streams end with an error event (they are not
/// waited for), the engine is stopped, and serve exits.
#[tokio::test]
async fn the_first_signal_ends_open_streams_and_stops_the_engine() {
    conformance::init_tracing();
    let mut serve = Serve::start(&[]).await;
    let http = reqwest::Client::new();
    let long = conformance::wire::chat_body("Write a very long story about a dragon.", 800, true);
    let response = http
        .post(serve.completions())
        .bearer_auth(GATEWAY_KEY)
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"") {
        seen.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    let signalled = Instant::now();
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => seen.extend_from_slice(&chunk),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(rest.is_ok(), "the open stream ended");
    let text = String::from_utf8_lossy(&seen);
    let answer = conformance::wire::SseAnswer::parse(&text);
    assert!(
        answer.errors.iter().any(|e| e["code"] == "shutting_down"),
        "the client was told: {:?}",
        answer.errors
    );
    let status = serve.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(8),
        "serve did not wait for the generation to finish ({:?})",
        signalled.elapsed()
    );
    serve.assert_engine_gone(Duration::from_secs(2)).await;
}

/// A second signal exits at once, and the engine still goes.
#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_engine_still_goes() {
    conformance::init_tracing();
    let mut serve = Serve::start(&[]).await;
    // A stopped engine ignores SIGTERM: the orderly stop has to wait for its
    // grace period before SIGKILL, which the second signal cuts short.
    let engine: Vec<procs::Proc> = procs::all()
        .into_iter()
        .filter(|p| serve.engine.contains(&p.pid))
        .collect();
    procs::signal_all(&engine, nix::sys::signal::Signal::SIGSTOP);
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let signalled = Instant::now();
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let status = serve.exit_within(Duration::from_secs(2)).await;
    assert!(
        signalled.elapsed() < Duration::from_secs(1),
        "the second signal exits at once ({:?})",
        signalled.elapsed()
    );
    assert!(!status.success(), "an interrupted stop is not a clean exit");
    serve.assert_engine_gone(Duration::from_secs(2)).await;
}

/// With the engine stopped (SIGSTOP), requests through the gateway fail
/// with a 502 `engine_unresponsive` within the hang timeout, and the
/// gateway's `/health` says it is unhealthy.
#[tokio::test]
async fn requests_to_a_hung_engine_fail_and_health_says_so() {
    conformance::init_tracing();
    let mut serve = Serve::start(&["--hang-timeout", "2s"]).await;
    let http = reqwest::Client::new();
    let engine: Vec<procs::Proc> = procs::all()
        .into_iter()
        .filter(|p| serve.engine.contains(&p.pid))
        .collect();
    procs::signal_all(&engine, nix::sys::signal::Signal::SIGSTOP);
    let started = Instant::now();
    let body = conformance::wire::chat_body("Hi", 8, false);
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        http.post(serve.completions())
            .bearer_auth(GATEWAY_KEY)
            .json(&body)
            .send(),
    )
    .await
    .expect("an answer within 10 s")
    .unwrap();
    assert_eq!(response.status(), 502);
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "engine_unresponsive", "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let health = http
        .get(format!("{}/health", serve.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503, "a hung engine is unhealthy");
    procs::signal_all(&engine, nix::sys::signal::Signal::SIGCONT);
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    serve.exit_within(Duration::from_secs(10)).await;
    serve.assert_engine_gone(Duration::from_secs(2)).await;
}

/// The gateway refuses what a hostile web page or an over-ambitious client
/// sends, and honours `max_completion_tokens`.
#[tokio::test]
async fn the_gateway_refuses_cross_site_and_unimplemented_requests() {
    conformance::init_tracing();
    let mut serve = Serve::start(&[]).await;
    conformance::checks::check_http_surface(&serve.completions(), GATEWAY_KEY).await;
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    serve.exit_within(Duration::from_secs(10)).await;
    serve.assert_engine_gone(Duration::from_secs(2)).await;
}

/// Tools and schemas pass through the gateway to llama-server and back:
/// `/v1/models` says what the model accepts, a `json_schema` answer is valid
/// JSON of the schema, a required tool choice is a call with valid
/// arguments, and a keyword llama.cpp cannot enforce is a 400 naming it.
#[tokio::test]
async fn the_gateway_serves_tools_and_schemas_and_says_what_a_model_accepts() {
    conformance::init_tracing();
    let mut serve = Serve::start(&[]).await;
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        http.post(serve.completions())
            .bearer_auth(GATEWAY_KEY)
            .json(&body)
            .send()
    };
    let models = serve.models().await;
    let capabilities = &models["data"][0]["capabilities"];
    assert_eq!(capabilities["tools"], true, "{models}");
    assert_eq!(capabilities["json_schema"], true, "{models}");

    let schema = serde_json::json!({
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": false
    });
    let answer: serde_json::Value = post(serde_json::json!({
        "messages": [{"role": "user", "content": "Is Paris in France?"}],
        "max_tokens": 32,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    }))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let content: serde_json::Value =
        serde_json::from_str(answer["choices"][0]["message"]["content"].as_str().unwrap())
            .unwrap_or_else(|err| panic!("{err}: {answer}"));
    assert!(
        content["answer"] == "yes" || content["answer"] == "no",
        "{answer}"
    );

    let call: serde_json::Value = post(serde_json::json!({
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "max_tokens": 64,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,30}$"}},
            "required": ["city"], "additionalProperties": false
        }}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}
    }))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let choice = &call["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{call}");
    let function = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(function["name"], "get_weather", "{call}");
    let arguments: serde_json::Value =
        serde_json::from_str(function["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{call}");

    let refused = post(serde_json::json!({
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
            "type": "object", "properties": {"x": {"type": "number", "maximum": 1.5}}
        }}}
    }))
    .await
    .unwrap();
    assert_eq!(refused.status(), 400);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(
        error["error"]["param"], "response_format.json_schema.schema",
        "{error}"
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum"),
        "{error}"
    );
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    serve.exit_within(Duration::from_secs(10)).await;
    serve.assert_engine_gone(Duration::from_secs(2)).await;
}

/// A base model without a chat template (Gemma 3 270M, Q4_K_M, on
/// llama.cpp) is served by the completions API: a raw prompt is continued
/// (its prompt is the text's tokens and the start token, no template),
/// temperature 0 repeats, a streamed completion joins to the plain one,
/// `echo` returns the prompt first, and `stop` cuts the same answer where
/// the stop string begins; chat is refused (llama-server would format it
/// as chatml, which the model never saw); `model-runtime run --raw` prints
/// the same continuation.
#[tokio::test]
async fn a_base_model_without_a_chat_template_is_served_by_the_completions_api() {
    conformance::init_tracing();
    let gemma = required_env("MODEL_RUNTIME_TEST_GEMMA_GGUF");
    let binary = required_env(runtime_llamacpp::BINARY_ENV);
    let mut serve = Serve::start_model(gemma.as_os_str(), &[]).await;
    let base = serve.base.clone();
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/completions");
    let post = |body: serde_json::Value| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let response = http
                .post(&url)
                .bearer_auth(GATEWAY_KEY)
                .json(&body)
                .send()
                .await
                .expect("the gateway answers");
            assert_eq!(response.status(), 200);
            response.text().await.expect("a body")
        }
    };
    let prompt = "The capital of France is";
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 12, "temperature": 0});
    let plain: serde_json::Value = serde_json::from_str(&post(body.clone()).await).unwrap();
    let text = plain["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_owned();
    assert!(
        text.contains("Paris") || text.contains("capital"),
        "{plain}"
    );
    // The start token and the text's own: nothing of a template.
    assert!(
        plain["usage"]["prompt_tokens"].as_u64().expect("usage") <= 8,
        "a raw prompt, no template: {plain}"
    );
    let again: serde_json::Value = serde_json::from_str(&post(body.clone()).await).unwrap();
    assert_eq!(
        again["choices"][0]["text"],
        text.as_str(),
        "temperature 0 repeats"
    );

    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let answer = conformance::wire::SseAnswer::parse(&post(streamed).await);
    assert!(answer.is_well_formed(), "a whole stream");
    assert_eq!(
        answer.text, text,
        "the streamed completion is the plain one"
    );

    let mut echoing = body.clone();
    echoing["echo"] = true.into();
    let echoed: serde_json::Value = serde_json::from_str(&post(echoing).await).unwrap();
    assert_eq!(echoed["choices"][0]["text"], format!("{prompt}{text}"));

    let word = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("three words to cut at in {text:?}"));
    let cut_at = text.find(word).expect("the word is in the text");
    let mut stopping = body.clone();
    stopping["stop"] = serde_json::json!([word]);
    let stopped: serde_json::Value = serde_json::from_str(&post(stopping).await).unwrap();
    assert_eq!(
        stopped["choices"][0]["text"],
        text[..cut_at],
        "stop {word:?} cuts the answer where it begins"
    );

    // Chat would be formatted with a template the model never saw: refused,
    // pointing at the completions API, and `/v1/models` says so.
    let chat = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(GATEWAY_KEY)
        .json(&serde_json::json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 4}))
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(chat.status(), 400);
    let refused: serde_json::Value = chat.json().await.expect("an error body");
    assert_eq!(refused["error"]["param"], "messages", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no chat template")),
        "{refused}"
    );
    let listed: serde_json::Value = http
        .get(format!("{base}/v1/models"))
        .bearer_auth(GATEWAY_KEY)
        .send()
        .await
        .expect("GET /v1/models")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        listed["data"][0]["endpoints"],
        serde_json::json!(["/v1/completions"]),
        "{listed}"
    );

    serve.signal(nix::sys::signal::Signal::SIGTERM);
    let status = serve.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "serve exits cleanly");
    serve.assert_engine_gone(Duration::from_secs(2)).await;

    // `run --raw` continues the prompt the same way, on the command line.
    let output = cli()
        .arg("run")
        .arg(&gemma)
        .args(["--backend", "llamacpp", "--raw", "--prompt", prompt])
        .args(["--max-tokens", "12", "--temperature", "0"])
        .env(runtime_llamacpp::BINARY_ENV, &binary)
        .output()
        .await
        .expect("model-runtime run");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim_end(),
        text.trim_end(),
        "run --raw prints the continuation"
    );
}

/// The Responses API, Anthropic's Messages API and the legacy completions
/// API through their official Python clients against the gateway
/// (`clients/responses_and_messages.py`):
/// plain and streamed answers agree, through the SDKs' own stream
/// accumulators; `responses.parse` fills a pydantic model; a stored
/// response is continued with its history; a raw prompt is continued, plain
/// and streamed alike; `count_tokens` counts what the
/// answer's usage says; a required tool call and its result round-trip as
/// the SDK's blocks; a wrong `x-api-key` raises the SDK's
/// `AuthenticationError`.
#[tokio::test]
async fn official_clients_speak_the_responses_messages_and_completions_apis() {
    conformance::init_tracing();
    let clients = required_env("MODEL_RUNTIME_TEST_API_CLIENTS");
    let serve = Serve::start(&[]).await;
    let got = serve
        .drive_with_client("responses_and_messages.py", &clients)
        .await;

    let plain = &got["responses_plain"];
    let text = plain["text"].as_str().expect("output_text");
    assert!(!text.is_empty(), "{got}");
    assert_eq!(plain["status"], "completed", "a whole answer: {got}");
    assert_eq!(got["responses_stream"]["deltas"], text, "{got}");
    assert_eq!(got["responses_stream"]["text"], text, "{got}");
    for field in ["city", "country"] {
        assert!(
            got["responses_parsed"][field].is_string(),
            "parsed into City: {got}"
        );
    }
    let continued = &got["responses_continued"];
    let number = |value: &serde_json::Value| value.as_u64().expect("a count");
    assert!(
        number(&continued["second_input"])
            > number(&continued["first_input"]) + number(&continued["first_output"]),
        "the continued response's prompt holds the stored conversation: {continued}"
    );

    let completion = &got["completions"];
    let continued_text = completion["text"].as_str().expect("a completion");
    assert!(
        continued_text.trim_start().starts_with('7'),
        "a raw prompt is continued: {got}"
    );
    assert_eq!(completion["streamed"], continued_text, "{got}");

    let message = &got["messages_plain"];
    let said = message["text"].as_str().expect("a text block");
    assert!(!said.is_empty(), "{got}");
    assert_eq!(got["messages_stream"]["text"], said, "{got}");
    assert_eq!(got["messages_stream"]["final"], said, "{got}");
    assert_eq!(
        got["messages_stream"]["output_tokens"], message["output_tokens"],
        "{got}"
    );
    assert_eq!(got["count_tokens"], message["input_tokens"], "{got}");
    let call = &got["tool_use"];
    assert_eq!(call["stop_reason"], "tool_use", "{got}");
    assert_eq!(call["name"], "get_weather", "{got}");
    assert!(call["input"]["city"].is_string(), "{got}");
    assert!(
        call["reply"].as_str().is_some_and(|t| !t.trim().is_empty()),
        "{got}"
    );
    assert_eq!(got["wrong_key"]["type"], "error", "{got}");
    assert_eq!(
        got["wrong_key"]["error"]["type"], "authentication_error",
        "{got}"
    );
}

/// OpenAI's own Python client against `serve` of an embedding model (the
/// all-MiniLM-L6-v2 GGUF on llama.cpp), as RAG pipelines call it
/// (`clients/embeddings.py`): the SDK's default base64 answers decode to the
/// same unit vectors as floats, one text alone is the batch's first, the
/// usage counts tokens, and chat is refused with 501 naming the endpoint to
/// use.
#[tokio::test]
async fn openais_python_client_embeds_through_serve() {
    conformance::init_tracing();
    let Some(gguf) = std::env::var_os(conformance::backends::EMBEDDING_GGUF_ENV) else {
        let mut backend = conformance::backends::llamacpp();
        backend.name = "cli";
        conformance::not_applicable(
            &backend,
            "openais_python_client_embeds_through_serve",
            "the embedding model is provisioned only when llamacpp, candle and vllm are all \
             selected (vLLM's Python converts its GGUF)",
        );
        return;
    };
    let clients = required_env("MODEL_RUNTIME_TEST_API_CLIENTS");
    let serve = Serve::start_model(&gguf, &[]).await;
    let models = serve.models().await;
    assert_eq!(
        models["data"][0]["endpoints"],
        serde_json::json!(["/v1/embeddings"]),
        "{models}"
    );
    let got = serve.drive_with_client("embeddings.py", &clients).await;
    assert_eq!(
        got["sent_base64"], true,
        "the SDK's default was answered in base64"
    );
    assert_eq!(got["dims"], serde_json::json!([384, 384, 384]), "{got}");
    assert_eq!(got["indices"], serde_json::json!([0, 1, 2]), "{got}");
    for norm in got["norms"].as_array().expect("norms") {
        assert!(
            (norm.as_f64().unwrap() - 1.0).abs() < 1e-4,
            "unit vectors: {got}"
        );
    }
    // base64 carries the f32 bits; floats are printed from the same f32s.
    let vectors =
        |key: &str| -> Vec<Vec<f32>> { serde_json::from_value(got[key].clone()).expect("vectors") };
    assert_eq!(
        vectors("default"),
        vectors("float"),
        "base64 and floats agree"
    );
    let single: Vec<f32> = serde_json::from_value(got["single"].clone()).unwrap();
    let same = runtime_core::cosine_similarity(&single, &vectors("float")[0]);
    assert!(
        same > 1.0 - 1e-5,
        "one text alone is the batch's first: {same}"
    );
    assert!(got["prompt_tokens"].as_u64().unwrap() > 3, "{got}");
    assert_eq!(got["chat"]["refused"], true, "{got}");
    assert_eq!(got["chat"]["status"], 501, "{got}");
    assert!(
        got["chat"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/v1/embeddings")),
        "{got}"
    );
}

/// OpenAI's own Python client against the gateway, as agent frameworks drive
/// it: `chat.completions.parse` into a pydantic model, a required tool call
/// parsed into one, the call and its result sent back, and a streamed call
/// assembled by the SDK's accumulator. The script raises on anything the SDK
/// cannot parse; the assertions below check what it got.
#[tokio::test]
async fn openais_python_client_parses_schemas_and_round_trips_tool_calls() {
    conformance::init_tracing();
    let client = required_env("MODEL_RUNTIME_TEST_API_CLIENTS");
    let serve = Serve::start(&[]).await;
    let got = serve.drive_with_client("openai_client.py", &client).await;

    for field in ["city", "country"] {
        assert!(got["parsed"][field].is_string(), "parsed into City: {got}");
    }
    let call = &got["call"];
    assert_eq!(call["finish_reason"], "tool_calls", "{got}");
    assert_eq!(call["name"], "GetWeather", "{got}");
    assert!(call["arguments"]["city"].is_string(), "{got}");
    assert!(
        call["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{got}"
    );
    let reply = &got["reply"];
    assert!(reply["tool_calls"].is_null(), "tool_choice none: {got}");
    assert!(
        reply["content"]
            .as_str()
            .is_some_and(|text| !text.is_empty()),
        "{got}"
    );
    let streamed = &got["streamed"];
    assert_eq!(streamed["finish_reason"], "tool_calls", "{got}");
    assert_eq!(streamed["name"], "GetWeather", "{got}");
    assert!(streamed["arguments"]["city"].is_string(), "{got}");
    assert!(
        streamed["deltas"].as_u64().is_some_and(|n| n > 1),
        "the arguments came in pieces, as a stream: {got}"
    );
}

/// `run --json-schema FILE` prints only an answer valid against the schema,
/// on llama.cpp and on candle; a schema the engine cannot enforce is refused
/// by its keyword, leaving stdout empty; a file that is not a schema is
/// refused before any engine starts.
#[tokio::test]
async fn run_with_a_json_schema_prints_json_valid_against_it_or_fails() {
    conformance::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "pattern": "^[A-Za-z ]{1,40}$"},
            "country": {"type": "string"}
        },
        "required": ["city", "country"],
        "additionalProperties": false
    });
    let file = dir.path().join("city.json");
    std::fs::write(&file, schema.to_string()).unwrap();
    let run = |backend: &'static str, schema: std::path::PathBuf| {
        let mut command = cli();
        command
            .args(["run", &model(), "--backend", backend, "--max-tokens", "64"])
            .args(["--prompt", "Where is the Eiffel tower?", "--json-schema"])
            .arg(schema)
            .env(
                runtime_llamacpp::BINARY_ENV,
                required_env(runtime_llamacpp::BINARY_ENV),
            );
        command.output()
    };

    // The suite's own validator, not the one the runtime checked with.
    let validator = jsonschema::validator_for(&schema).unwrap();
    for backend in ["llamacpp", "candle"] {
        let output = run(backend, file.clone()).await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{backend}: {stderr}");
        let answer: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
                panic!(
                    "{backend}: {err}: {}",
                    String::from_utf8_lossy(&output.stdout)
                )
            });
        assert!(validator.is_valid(&answer), "{backend}: {answer}");
    }

    let unique = dir.path().join("unique.json");
    std::fs::write(
        &unique,
        r#"{"type": "array", "items": {"type": "integer"}, "uniqueItems": true}"#,
    )
    .unwrap();
    let output = run("candle", unique).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "llguidance cannot enforce uniqueItems"
    );
    assert!(output.stdout.is_empty(), "nothing unchecked on stdout");
    assert!(stderr.contains("uniqueItems"), "{stderr}");

    let not_a_schema = dir.path().join("list.json");
    std::fs::write(&not_a_schema, "[1, 2]").unwrap();
    let output = run("llamacpp", not_a_schema).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("not a schema"), "{stderr}");
    assert!(
        !stderr.contains("using"),
        "refused before choosing an engine: {stderr}"
    );
}

/// A non-loopback address without a key is refused before anything starts.
#[tokio::test]
async fn serve_refuses_a_public_address_without_a_key() {
    conformance::init_tracing();
    let output = cli()
        .args([
            "serve",
            &model(),
            "--backend",
            "candle",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ])
        .env_remove("MODEL_RUNTIME_API_KEY")
        .output()
        .await
        .expect("model-runtime runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("api_key") && stderr.contains("0.0.0.0"),
        "{stderr}"
    );
}

/// When the engine dies, clients learn that it did, not what it logged.
#[tokio::test]
async fn an_engine_crash_reaches_clients_without_its_log_lines() {
    conformance::init_tracing();
    let mut serve = Serve::start(&[]).await;
    let engine: Vec<procs::Proc> = procs::all()
        .into_iter()
        .filter(|p| serve.engine.contains(&p.pid))
        .collect();
    // At once: the gateway restarts a crashed engine within a second or two.
    procs::signal_all(&engine, nix::sys::signal::Signal::SIGKILL);
    let response = reqwest::Client::new()
        .post(serve.completions())
        .bearer_auth(GATEWAY_KEY)
        .json(&conformance::wire::chat_body("Hi", 8, false))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_server_error());
    let text = response.text().await.unwrap();
    assert!(text.contains("engine_exited"), "{text}");
    for leak in ["llama", ".gguf", "/", "signal"] {
        assert!(!text.contains(leak), "the body holds {leak:?}: {text}");
    }
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    serve.exit_within(Duration::from_secs(10)).await;
}

/// `serve --config` fronts every model of the file, by name; SIGHUP re-reads
/// the file, adding and removing models.
#[tokio::test]
async fn serve_with_a_config_file_routes_by_model_and_reloads_on_sighup() {
    conformance::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("models.toml");
    let port = runtime_process::free_port("127.0.0.1").unwrap();
    let write = |second: &str| {
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\n\n\
             [[models]]\nname = \"llama\"\npath = {model:?}\nbackend = \"llamacpp\"\n\
             runtime_binary = {binary:?}\ncontext_size = 512\n\n\
             [[models]]\nname = \"{second}\"\npath = {model:?}\nbackend = \"candle\"\ncontext_size = 512\n",
            model = model(),
            binary = required_env(runtime_llamacpp::BINARY_ENV)
                .display()
                .to_string(),
        );
        std::fs::write(&file, text).unwrap();
    };
    write("candle");
    let mut child = cli()
        .args(["serve", "--config"])
        .arg(&file)
        .env("MODEL_RUNTIME_API_KEY", GATEWAY_KEY)
        .stderr(Stdio::piped())
        .spawn()
        .expect("model-runtime serve starts");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let chat = |model: &str| {
        let mut body = conformance::wire::chat_body("Name a color.", 4, false);
        body["model"] = model.into();
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(GATEWAY_KEY)
            .json(&body)
            .send()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http.get(format!("{base}/health")).send().await, Ok(r) if r.status() == 200) {
        assert!(Instant::now() < deadline, "serve became healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(chat("llama").await.unwrap().status(), 200);
    assert_eq!(chat("candle").await.unwrap().status(), 200);

    write("candle-2");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while chat("candle-2").await.unwrap().status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the new model appears after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        chat("candle").await.unwrap().status(),
        404,
        "the removed model is gone"
    );
    assert_eq!(
        chat("llama").await.unwrap().status(),
        200,
        "the unchanged one still answers"
    );

    let engine = pids_of(&required_env(runtime_llamacpp::BINARY_ENV));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("serve exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        procs::wait_gone(&engine, Duration::from_secs(2))
            .await
            .is_empty()
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

/// The one model of the hot-swap tests.
const SWAPPED: &str = "swapped";

/// `config` as the swapped model, on `backend`.
fn spec(config: &RuntimeConfig, backend: BackendChoice) -> ModelSpec {
    ModelSpec::from_runtime_config(SWAPPED, config).with_backend(backend)
}

/// A gateway serving `spec` alone, loaded.
async fn manager_serving(spec: ModelSpec, drain: Duration) -> Arc<RuntimeManager> {
    let mut config = GatewayConfig::single(spec);
    config.drain_timeout = drain;
    let manager = RuntimeManager::new(config).expect("a valid configuration");
    manager
        .load(SWAPPED)
        .await
        .expect("the first runtime starts");
    manager
}

async fn serving_engine(manager: &RuntimeManager) -> String {
    manager
        .with_runtime(Some(SWAPPED), async |runtime| {
            runtime.metadata().runtime_name
        })
        .await
        .expect("a runtime serves")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_a_trickle_of_requests_fails_none() {
    conformance::init_tracing();
    let binary = required_env(runtime_llamacpp::BINARY_ENV);
    let on_candle = spec(&candle().config, BackendChoice::Candle);
    let on_llama = spec(&llamacpp().config, BackendChoice::LlamaCpp);
    let manager = manager_serving(on_candle.clone(), Duration::from_secs(30)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..2)
        .map(|_| trickle(manager.clone(), stop.clone(), ok.clone(), failed.clone()))
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(serving_engine(&manager).await, "candle");
    manager
        .hot_swap(on_llama.clone())
        .await
        .expect("swap to llama.cpp");
    assert_eq!(
        serving_engine(&manager).await,
        "llama.cpp",
        "the swap happened"
    );
    let llama_pids = pids_of(&binary);
    assert_eq!(llama_pids.len(), 1, "one llama-server runs the new runtime");
    let served_before = ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A swap that cannot start keeps the current runtime serving.
    let mut broken = on_candle.clone();
    broken.runtime.model_path = "/nonexistent/model.gguf".into();
    let err = manager.hot_swap(broken).await.unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
    assert!(manager.is_ready().await);
    assert_eq!(serving_engine(&manager).await, "llama.cpp");

    manager
        .hot_swap(on_candle)
        .await
        .expect("swap back to candle");
    assert_eq!(serving_engine(&manager).await, "candle", "swapped back");
    assert!(
        procs::wait_gone(&llama_pids, Duration::from_secs(2))
            .await
            .is_empty(),
        "the swapped-out llama-server was shut down"
    );
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

    manager.shutdown().await.unwrap();
}

/// A stream left open past the drain deadline does not keep the old engine
/// alive: it ends with `ShutDown`, and the old engine is stopped properly
/// (within its grace), not merely dropped whenever the stream goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_ends_streams_left_open_at_the_drain_deadline() {
    conformance::init_tracing();
    let drain = Duration::from_secs(1);
    let binary = required_env(runtime_llamacpp::BINARY_ENV);
    let on_llama = llamacpp().config;
    let manager = manager_serving(spec(&on_llama, BackendChoice::LlamaCpp), drain).await;
    let llama_pids = pids_of(&binary);
    assert!(!llama_pids.is_empty(), "llama-server runs");
    let mut open = manager
        .generate_events(None, conformance::checks::long_request())
        .await
        .expect("a stream on the old runtime");
    open.next().await.expect("an event").expect("an event");

    manager
        .hot_swap(spec(&candle().config, BackendChoice::Candle))
        .await
        .expect("swap to candle");
    assert_eq!(serving_engine(&manager).await, "candle");
    let bound = drain + on_llama.shutdown_grace + Duration::from_secs(2);
    assert!(
        procs::wait_gone(&llama_pids, bound).await.is_empty(),
        "the old engine is gone within the drain and its grace, although its stream is still held"
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = open.next().await {
            if let Err(err) = event {
                return Some(err);
            }
        }
        None
    })
    .await
    .expect("the old stream ends");
    assert!(matches!(ended, Some(Error::ShutDown)), "{ended:?}");
    manager.shutdown().await.unwrap();
}
