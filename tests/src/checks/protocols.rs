//! The other protocols clients speak: Anthropic's Messages API and OpenAI's
//! Responses API, served by the gateway over the real engine. Each is held
//! to the chat answer of the same conversation (temperature 0): the same
//! text and the same prompt token count prove the translation rendered the
//! same prompt with the same settings, not merely some answer.

use serde_json::{Value, json};

use super::structured::{validator, weather};
use super::*;

const SYSTEM: &str = "You are a helpful assistant. Answer briefly.";

/// The chat request every protocol's plain request must equal.
fn chat_twin(max_tokens: u32) -> InferenceRequest {
    InferenceRequest::new(vec![
        ChatMessage::system(SYSTEM),
        ChatMessage::user(QUESTION),
    ])
    .with_max_tokens(max_tokens)
    .with_temperature(0.0)
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = http
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|err| panic!("POST {url}: {err}"));
    let status = response.status().as_u16();
    let text = response.text().await.expect("a body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("POST {url}: not JSON ({err}): {text:?}"));
    (status, value)
}

/// A streamed request's events: `(event name, data)`, in order.
async fn post_events(http: &reqwest::Client, url: &str, body: &Value) -> Vec<(String, Value)> {
    let response = http
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|err| panic!("POST {url}: {err}"));
    assert_eq!(response.status(), 200, "POST {url} streamed");
    let mut decoder = runtime_openai::SseDecoder::new();
    let mut events = Vec::new();
    let mut bytes = response.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(STREAM_TIMEOUT, bytes.next())
        .await
        .expect("the stream moves")
    {
        decoder
            .feed(&chunk.expect("a chunk"), &mut events)
            .expect("well-formed SSE");
    }
    events
        .into_iter()
        .map(|event| {
            let data = serde_json::from_str(&event.data)
                .unwrap_or_else(|err| panic!("an event's data is JSON ({err}): {:?}", event.data));
            (event.event.expect("every event is named"), data)
        })
        .collect()
}

/// The gateway over the suite's shared engine, on a free port.
struct LentGateway {
    /// Its root URL.
    base: String,
    manager: std::sync::Arc<runtime_gateway::RuntimeManager>,
    server: tokio::task::JoinHandle<()>,
}

impl LentGateway {
    async fn over(backend: &Backend, shared: &crate::harness::SharedRuntime) -> Self {
        let (manager, chat_url, server) =
            crate::gateway::start_lent(backend, backend.config.clone(), shared.clone()).await;
        let base = chat_url.trim_end_matches("/v1/chat/completions").to_owned();
        Self {
            base,
            manager,
            server,
        }
    }

    /// Stops the gateway and waits until nothing of it holds the engine
    /// any more (the check that ends the shared engine takes it whole).
    async fn stop(self) {
        self.manager.shutdown_within(Duration::ZERO).await;
        drop(self.manager);
        self.server.abort();
        let _ = self.server.await;
    }
}

/// The schema of the structured answers both protocols are asked for.
fn answer_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no", "maybe"]}},
        "required": ["answer"],
        "additionalProperties": false
    })
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(name, _)| name.as_str()).collect()
}

/// Anthropic's Messages API through the gateway: a plain answer equals the
/// chat answer of the same conversation, with the same prompt token count
/// (which `count_tokens` gives too); the streamed events come in the order
/// the SDK accumulates and join to the plain text; a required tool call is a
/// `tool_use` block with schema-valid input, streamed as the same input,
/// and its result is answered; `output_config` gives schema-valid JSON;
/// `max_tokens` is required, and errors take Anthropic's shape (a refused
/// `Host` included).
pub async fn messages_api(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let twin = shared.generate(chat_twin(24)).await.expect("the chat twin");
    let twin_usage = twin.usage.expect("usage");
    let gateway = LentGateway::over(backend, &shared).await;
    let base = gateway.base.clone();
    let url = format!("{base}/v1/messages");
    let http = reqwest::Client::new();
    let plain_body = json!({
        "model": "conformance",
        "max_tokens": 24,
        "temperature": 0,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": QUESTION}],
    });

    let (status, plain) = post(&http, &url, &plain_body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["type"], "message");
    assert_eq!(plain["role"], "assistant");
    assert!(
        plain["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_"))
    );
    let text = plain["content"][0]["text"].as_str().expect("a text block");
    assert_eq!(text, twin.content, "the Messages answer is the chat answer");
    assert_eq!(plain["usage"]["input_tokens"], twin_usage.prompt_tokens);
    assert_eq!(
        plain["usage"]["output_tokens"],
        twin_usage.completion_tokens
    );
    let expected_stop = match twin.finish_reason {
        Some(FinishReason::Length) => "max_tokens",
        _ => "end_turn",
    };
    assert_eq!(plain["stop_reason"], expected_stop);

    let mut counting = plain_body.clone();
    counting.as_object_mut().unwrap().remove("max_tokens");
    let (status, counted) = post(&http, &format!("{url}/count_tokens"), &counting).await;
    assert_eq!(status, 200, "{counted}");
    assert_eq!(
        counted["input_tokens"], twin_usage.prompt_tokens,
        "count_tokens counts the prompt the engine reads"
    );

    let mut streamed_body = plain_body.clone();
    streamed_body["stream"] = json!(true);
    let events = post_events(&http, &url, &streamed_body).await;
    let order = names(&events);
    assert_eq!(order.first(), Some(&"message_start"), "{order:?}");
    assert_eq!(order.last(), Some(&"message_stop"), "{order:?}");
    assert_eq!(order[1], "content_block_start");
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let joined: String = events
        .iter()
        .filter(|(name, _)| name == "content_block_delta")
        .map(|(_, data)| data["delta"]["text"].as_str().expect("a text delta"))
        .collect();
    assert_eq!(joined, text, "the streamed text is the plain text");
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["type"], "message_delta");
    assert_eq!(delta["delta"]["stop_reason"], expected_stop);
    assert_eq!(
        delta["usage"]["output_tokens"],
        twin_usage.completion_tokens
    );

    // A required call, plain and streamed.
    let tool = weather();
    let schema = tool.parameters.clone().expect("parameters");
    let calling = json!({
        "model": "conformance",
        "max_tokens": 160,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the weather in Paris right now?"}],
        "tools": [{"name": tool.name, "description": tool.description, "input_schema": schema}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
    });
    let (status, called) = post(&http, &url, &calling).await;
    assert_eq!(status, 200, "{called}");
    assert_eq!(called["stop_reason"], "tool_use", "{called}");
    let use_block = called["content"]
        .as_array()
        .expect("blocks")
        .iter()
        .find(|block| block["type"] == "tool_use")
        .cloned()
        .unwrap_or_else(|| panic!("a tool_use block in {called}"));
    assert_eq!(use_block["name"], tool.name);
    assert!(
        use_block["id"].as_str().is_some_and(|id| !id.is_empty()),
        "a tool_use block has an id: {use_block}"
    );
    assert!(
        use_block["input"].is_object(),
        "input is an object: {use_block}"
    );
    if let Err(err) = validator(&schema).validate(&use_block["input"]) {
        panic!("the tool's input: {err} in {}", use_block["input"]);
    }
    let mut streamed_call = calling.clone();
    streamed_call["stream"] = json!(true);
    let events = post_events(&http, &url, &streamed_call).await;
    let start = events
        .iter()
        .find(|(name, data)| {
            name == "content_block_start" && data["content_block"]["type"] == "tool_use"
        })
        .unwrap_or_else(|| panic!("a tool_use block starts: {:?}", names(&events)));
    assert_eq!(start.1["content_block"]["name"], tool.name);
    assert!(
        start.1["content_block"]["id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "a streamed tool_use block has an id"
    );
    assert_eq!(start.1["content_block"]["input"], json!({}));
    let ending = events
        .iter()
        .find(|(name, _)| name == "message_delta")
        .expect("a message_delta");
    assert_eq!(ending.1["delta"]["stop_reason"], "tool_use");
    let index = start.1["index"].clone();
    let partial: String = events
        .iter()
        .filter(|(name, data)| name == "content_block_delta" && data["index"] == index)
        .map(|(_, data)| {
            data["delta"]["partial_json"]
                .as_str()
                .expect("a JSON delta")
        })
        .collect();
    let streamed_input: Value = serde_json::from_str(&partial).expect("the pieces join to JSON");
    assert_eq!(
        streamed_input, use_block["input"],
        "streamed input is the plain input"
    );

    // The call's result goes back as a tool_result block and is answered.
    let answering = json!({
        "model": "conformance",
        "max_tokens": 24,
        "temperature": 0,
        "messages": [
            {"role": "user", "content": "What is the weather in Paris right now?"},
            {"role": "assistant", "content": [use_block]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use_block["id"],
                "content": "It is 18 degrees Celsius and sunny in Paris."}]},
        ],
        "tools": calling["tools"],
        "tool_choice": {"type": "none"},
    });
    let (status, answered) = post(&http, &url, &answering).await;
    assert_eq!(status, 200, "{answered}");
    assert!(
        answered["content"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.trim().is_empty()),
        "the result is answered: {answered}"
    );

    // Structured output.
    let enum_schema = answer_schema();
    let (status, shaped) = post(
        &http,
        &url,
        &json!({
            "model": "conformance",
            "max_tokens": 64,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Is Paris in France? Answer as JSON."}],
            "output_config": {"format": {"type": "json_schema", "schema": enum_schema}},
        }),
    )
    .await;
    assert_eq!(status, 200, "{shaped}");
    let value: Value = serde_json::from_str(shaped["content"][0]["text"].as_str().expect("text"))
        .expect("the answer is JSON");
    assert!(validator(&enum_schema).is_valid(&value), "{value}");

    // Anthropic's errors.
    let mut no_limit = plain_body.clone();
    no_limit.as_object_mut().unwrap().remove("max_tokens");
    let (status, refused) = post(&http, &url, &no_limit).await;
    assert_eq!(status, 400);
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["error"]["type"], "invalid_request_error");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let rebound = http
        .post(&url)
        .header(reqwest::header::HOST, "attacker.example")
        .json(&plain_body)
        .send()
        .await
        .expect("a request under another name");
    assert_eq!(rebound.status(), 403);
    let refused: Value = rebound.json().await.expect("an error body");
    assert_eq!(refused["type"], "error", "Anthropic's shape: {refused}");
    assert_eq!(refused["error"]["type"], "permission_error", "{refused}");
    let mut unknown = plain_body.clone();
    unknown["model"] = json!("no-such-model");
    let (status, refused) = post(&http, &url, &unknown).await;
    assert_eq!(status, 404, "{refused}");
    assert_eq!(refused["error"]["type"], "not_found_error");

    gateway.stop().await;
}

fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .expect("output items")
        .iter()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|part| part["text"].as_str().map(str::to_owned))
        .collect()
}

/// OpenAI's Responses API through the gateway: a plain answer equals the
/// chat answer, with the same prompt token count; streamed events are
/// numbered, start with `response.created`, join to the plain text and end
/// with the whole response; a required call is a `function_call` item with
/// schema-valid arguments, streamed as the same arguments; `text.format`
/// gives schema-valid JSON; a stored response is continued by
/// `previous_response_id` with exactly the history's prompt, and one that
/// is not kept is refused by name.
pub async fn responses_api(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let twin = shared.generate(chat_twin(24)).await.expect("the chat twin");
    let twin_usage = twin.usage.expect("usage");
    let gateway = LentGateway::over(backend, &shared).await;
    let base = gateway.base.clone();
    let url = format!("{base}/v1/responses");
    let http = reqwest::Client::new();
    let plain_body = json!({
        "model": "conformance",
        "instructions": SYSTEM,
        "input": QUESTION,
        "max_output_tokens": 24,
        "temperature": 0,
    });

    let (status, plain) = post(&http, &url, &plain_body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["object"], "response");
    assert_eq!(
        output_text(&plain),
        twin.content,
        "the Responses answer is the chat answer"
    );
    assert_eq!(plain["usage"]["input_tokens"], twin_usage.prompt_tokens);
    assert_eq!(
        plain["usage"]["output_tokens"],
        twin_usage.completion_tokens
    );
    let expected_status = match twin.finish_reason {
        Some(FinishReason::Length) => "incomplete",
        _ => "completed",
    };
    assert_eq!(plain["status"], expected_status);

    let mut streamed_body = plain_body.clone();
    streamed_body["stream"] = json!(true);
    let events = post_events(&http, &url, &streamed_body).await;
    for (n, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str(), "each event's data names it");
        assert_eq!(
            data["sequence_number"], n as u64,
            "events are numbered in order"
        );
    }
    let order = names(&events);
    assert_eq!(&order[..2], ["response.created", "response.in_progress"]);
    assert_eq!(events[0].1["response"]["output"], json!([]));
    let last = events.last().expect("events");
    assert_eq!(last.0, format!("response.{expected_status}"));
    let joined: String = events
        .iter()
        .filter(|(name, _)| name == "response.output_text.delta")
        .map(|(_, data)| data["delta"].as_str().expect("a delta"))
        .collect();
    assert_eq!(
        joined,
        output_text(&plain),
        "the streamed text is the plain text"
    );
    assert_eq!(
        output_text(&last.1["response"]),
        joined,
        "the last event is the whole response"
    );

    // A required call, plain and streamed.
    let tool = weather();
    let schema = tool.parameters.clone().expect("parameters");
    let calling = json!({
        "model": "conformance",
        "input": "What is the weather in Paris right now?",
        "max_output_tokens": 160,
        "temperature": 0,
        "tools": [{"type": "function", "name": tool.name, "description": tool.description,
                   "parameters": schema, "strict": true}],
        "tool_choice": "required",
        "parallel_tool_calls": false,
    });
    let (status, called) = post(&http, &url, &calling).await;
    assert_eq!(status, 200, "{called}");
    let call = called["output"]
        .as_array()
        .expect("output items")
        .iter()
        .find(|item| item["type"] == "function_call")
        .cloned()
        .unwrap_or_else(|| panic!("a function_call item in {called}"));
    assert_eq!(call["name"], tool.name);
    let arguments: Value =
        serde_json::from_str(call["arguments"].as_str().expect("arguments text")).expect("JSON");
    if let Err(err) = validator(&schema).validate(&arguments) {
        panic!("the call's arguments: {err} in {arguments}");
    }
    let mut streamed_call = calling.clone();
    streamed_call["stream"] = json!(true);
    let events = post_events(&http, &url, &streamed_call).await;
    let done = events
        .iter()
        .find(|(name, _)| name == "response.function_call_arguments.done")
        .unwrap_or_else(|| panic!("the arguments complete: {:?}", names(&events)));
    assert_eq!(
        done.1["arguments"], call["arguments"],
        "streamed arguments are the plain ones"
    );
    assert_eq!(done.1["name"], tool.name);
    let pieces: String = events
        .iter()
        .filter(|(name, _)| name == "response.function_call_arguments.delta")
        .map(|(_, data)| data["delta"].as_str().expect("a delta"))
        .collect();
    assert_eq!(
        pieces,
        call["arguments"].as_str().unwrap(),
        "the deltas join to the arguments"
    );

    // Structured output.
    let enum_schema = answer_schema();
    let (status, shaped) = post(
        &http,
        &url,
        &json!({
            "model": "conformance",
            "input": "Is Paris in France? Answer as JSON.",
            "max_output_tokens": 64,
            "temperature": 0,
            "text": {"format": {"type": "json_schema", "name": "answer", "schema": enum_schema,
                                "strict": true}},
        }),
    )
    .await;
    assert_eq!(status, 200, "{shaped}");
    let value: Value = serde_json::from_str(&output_text(&shaped)).expect("the answer is JSON");
    assert!(validator(&enum_schema).is_valid(&value), "{value}");

    // A stored response, continued: the prompt is exactly the history's.
    let mut stored_body = plain_body.clone();
    stored_body["store"] = json!(true);
    let (status, first) = post(&http, &url, &stored_body).await;
    assert_eq!(status, 200, "{first}");
    let id = first["id"].as_str().expect("an id").to_owned();
    let follow_up = "And what is the capital of Germany?";
    let (status, second) = post(
        &http,
        &url,
        &json!({
            "model": "conformance",
            "previous_response_id": id,
            "input": follow_up,
            "max_output_tokens": 8,
            "temperature": 0,
        }),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    let history = InferenceRequest::new(vec![
        ChatMessage::user(QUESTION),
        ChatMessage::assistant(output_text(&first)),
        ChatMessage::user(follow_up),
    ])
    .with_max_tokens(8)
    .with_temperature(0.0);
    let continued = shared.generate(history).await.expect("the history as chat");
    assert_eq!(
        second["usage"]["input_tokens"],
        continued.usage.expect("usage").prompt_tokens,
        "previous_response_id continues from the stored conversation, without its instructions"
    );
    assert_eq!(output_text(&second), continued.content);
    let fetched: Value = http
        .get(format!("{url}/{id}"))
        .send()
        .await
        .expect("GET the stored response")
        .json()
        .await
        .expect("JSON");
    assert_eq!(fetched["id"], id.as_str());
    let deleted = http
        .delete(format!("{url}/{id}"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(deleted.status(), 200);
    let (status, refused) = post(
        &http,
        &url,
        &json!({"model": "conformance", "previous_response_id": id, "input": follow_up,
                "max_output_tokens": 8}),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "previous_response_id");
    // Without `store: true`, nothing is kept.
    let unstored = plain["id"].as_str().expect("an id");
    let gone = http
        .get(format!("{url}/{unstored}"))
        .send()
        .await
        .expect("GET");
    assert_eq!(
        gone.status(),
        404,
        "a response not asked to be stored is not kept"
    );

    gateway.stop().await;
}

/// The legacy completions API, through the gateway: a raw prompt is
/// continued as text, with no chat template (a counting prompt is carried
/// on, and its prompt is far shorter than the same text as a chat turn);
/// temperature 0 repeats and equals the runtime's own completion; a
/// streamed completion joins to the plain one; `stop` cuts the same answer
/// where the stop string was; `echo` returns the prompt first; unset
/// `max_tokens` is OpenAI's 16; the text's token ids are the same prompt
/// (echoed as their text) and an id past the vocabulary is refused; a
/// `suffix` is refused by name for this model, which has no
/// fill-in-the-middle tokens; chat features are refused by name; and
/// `/v1/models` lists the endpoints the model is served at.
pub async fn completions_api(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let counting = "1, 2, 3, 4, 5, 6,";
    let own = shared
        .generate(
            InferenceRequest::completion(counting)
                .with_max_tokens(8)
                .with_temperature(0.0),
        )
        .await
        .expect("a raw completion");
    assert!(
        own.content.trim_start().starts_with('7'),
        "a raw prompt is continued, not answered: {:?}",
        own.content
    );
    let own_usage = own.usage.expect("usage");
    let as_chat = shared
        .generate(greedy(counting, 1))
        .await
        .expect("the same text as a chat turn");
    assert!(
        own_usage.prompt_tokens + 5 <= as_chat.usage.expect("usage").prompt_tokens,
        "no chat template around a raw prompt: {} tokens raw, {} as chat",
        own_usage.prompt_tokens,
        as_chat.usage.expect("usage").prompt_tokens
    );

    let gateway = LentGateway::over(backend, &shared).await;
    let base = gateway.base.clone();
    let url = format!("{base}/v1/completions");
    let http = reqwest::Client::new();
    let listed: Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .expect("GET /v1/models")
        .json()
        .await
        .expect("JSON");
    let endpoints = &listed["data"][0]["endpoints"];
    for endpoint in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
    ] {
        assert!(
            endpoints
                .as_array()
                .is_some_and(|e| e.iter().any(|x| x == endpoint)),
            "/v1/models lists {endpoint} for the model: {listed}"
        );
    }
    let body =
        json!({"model": "conformance", "prompt": counting, "max_tokens": 8, "temperature": 0});
    let (status, plain) = post(&http, &url, &body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(plain["object"], "text_completion");
    let text = plain["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_owned();
    assert_eq!(
        text, own.content,
        "the gateway's completion is the runtime's"
    );
    assert_eq!(plain["usage"]["prompt_tokens"], own_usage.prompt_tokens);
    let (_, again) = post(&http, &url, &body).await;
    assert_eq!(
        again["choices"][0]["text"],
        text.as_str(),
        "temperature 0 repeats"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = http
        .post(&url)
        .json(&streamed)
        .send()
        .await
        .expect("a stream");
    assert_eq!(response.status(), 200);
    let answer = SseAnswer::parse(&response.text().await.expect("the stream's body"));
    assert!(answer.is_well_formed(), "ends with [DONE]");
    assert_eq!(
        answer.text, text,
        "the streamed completion is the plain one"
    );

    // `stop`: the same answer, cut where the stop string begins.
    let cut_at = text
        .char_indices()
        .filter(|(_, c)| c.is_ascii_digit())
        .nth(1)
        .map(|(at, _)| at)
        .unwrap_or_else(|| panic!("two numbers to cut between in {text:?}"));
    let stop = &text[cut_at..=cut_at];
    let mut stopping = body.clone();
    stopping["stop"] = json!([stop]);
    let (_, stopped) = post(&http, &url, &stopping).await;
    assert_eq!(
        stopped["choices"][0]["text"],
        text[..cut_at],
        "stop {stop:?} ends the answer where it begins"
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    let mut echoing = body.clone();
    echoing["echo"] = json!(true);
    let (_, echoed) = post(&http, &url, &echoing).await;
    assert_eq!(
        echoed["choices"][0]["text"],
        format!("{counting}{text}"),
        "echo"
    );

    let (_, unbounded) = post(
        &http,
        &url,
        &json!({"model": "conformance", "prompt": counting, "temperature": 0}),
    )
    .await;
    assert_eq!(
        unbounded["usage"]["completion_tokens"], 16,
        "max_tokens defaults to 16: {unbounded}"
    );
    assert_eq!(unbounded["choices"][0]["finish_reason"], "length");

    // Token ids: the engine's own tokens of the text (start token
    // included) are the same prompt, fed as they are.
    let ids = shared.tokenize(counting, true).await.expect("tokenize");
    let mut by_ids = body.clone();
    by_ids["prompt"] = json!(ids);
    let (status, from_ids) = post(&http, &url, &by_ids).await;
    assert_eq!(status, 200, "{from_ids}");
    assert_eq!(
        from_ids["choices"][0]["text"],
        text.as_str(),
        "the text's token ids are continued as the text is"
    );
    assert_eq!(
        from_ids["usage"]["prompt_tokens"],
        ids.len(),
        "the ids are the prompt, nothing added"
    );
    by_ids["echo"] = json!(true);
    let (_, echoed_ids) = post(&http, &url, &by_ids).await;
    let spelled = shared.detokenize(&ids).await.expect("detokenize");
    assert_eq!(
        echoed_ids["choices"][0]["text"],
        format!("{spelled}{text}"),
        "token ids are echoed as their text"
    );
    let mut past = body.clone();
    past["prompt"] = json!([u32::MAX - 1]);
    let (status, error) = post(&http, &url, &past).await;
    assert_eq!(status, 400, "a token past the vocabulary: {error}");

    // The model has no fill-in-the-middle tokens (its tokenizer reads none
    // of the markers as one token), so a suffix is refused by name.
    for [prefix, ..] in runtime_core::FIM_MARKERS {
        let read = shared.tokenize(prefix, false).await.expect("tokenize");
        assert!(
            read.len() > 1,
            "{prefix} is no token of the model: {read:?}"
        );
    }
    let mut infill = body.clone();
    infill["suffix"] = json!("\n");
    let (status, error) = post(&http, &url, &infill).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["param"], "suffix", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("fill-in-the-middle")),
        "{error}"
    );

    for (extra, field) in [
        (json!({"logprobs": 3}), "logprobs"),
        (json!({"prompt": [[1], [2]]}), "prompt"),
    ] {
        let mut refused = body.clone();
        for (key, value) in extra.as_object().unwrap() {
            refused[key] = value.clone();
        }
        let (status, error) = post(&http, &url, &refused).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], field, "{error}");
    }

    gateway.stop().await;
}

/// `/tokenize` and `/detokenize` through the gateway, in llama-server's
/// shape: the gateway's tokens are the runtime's; text comes back from its
/// tokens whole (CJK, RTL, emoji, whitespace runs, digits); a special token
/// written in the text is one token; and with `add_special` the count is
/// exactly the prompt tokens the engine reports for the same raw prompt.
pub async fn tokenize_api(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let gateway = LentGateway::over(backend, &shared).await;
    let base = gateway.base.clone();
    let http = reqwest::Client::new();
    let texts = [
        "Hello, world!",
        "東京は日本の首都です。",
        "emoji 🙂👍🏽 and a flag 🇫🇷",
        "  leading spaces\t\ttabs\n\n\nnewlines   ",
        "1234567 89.01 -42",
        "مرحبا بالعالم",
    ];
    for text in texts {
        let (status, tokenized) = post(
            &http,
            &format!("{base}/tokenize"),
            &json!({"model": "conformance", "content": text}),
        )
        .await;
        assert_eq!(status, 200, "{tokenized}");
        let tokens: Vec<u32> = serde_json::from_value(tokenized["tokens"].clone()).expect("ids");
        assert!(!tokens.is_empty(), "{text:?} has tokens");
        let own = shared
            .tokenize(text, false)
            .await
            .expect("the runtime tokenizes");
        assert_eq!(
            tokens, own,
            "the gateway's tokens are the runtime's for {text:?}"
        );
        let (status, back) = post(
            &http,
            &format!("{base}/detokenize"),
            &json!({"model": "conformance", "tokens": tokens}),
        )
        .await;
        assert_eq!(status, 200, "{back}");
        assert_eq!(back["content"], text, "{text:?} comes back from its tokens");
    }
    let special = shared
        .tokenize("<|im_start|>", false)
        .await
        .expect("a special token");
    assert_eq!(
        special.len(),
        1,
        "a special token in the text is one token: {special:?}"
    );

    let prompt = "Count the tokens of this prompt, please.";
    let counted = shared.tokenize(prompt, true).await.expect("tokenize");
    let completed = shared
        .generate(
            InferenceRequest::completion(prompt)
                .with_max_tokens(1)
                .with_temperature(0.0),
        )
        .await
        .expect("a raw completion");
    assert_eq!(
        counted.len() as u64,
        completed.usage.expect("usage").prompt_tokens,
        "with add_special, the count is the engine's own for the raw prompt"
    );

    gateway.stop().await;
}

/// A conversation that ends with an assistant message is continued, not
/// answered anew (a prefill, as llama-server and Anthropic's API do it):
/// the prompt is the conversation before it with the assistant's turn
/// opened, then the message's text (the engine counts exactly the opened
/// prompt's tokens and the text's), and a count goes on from where the
/// message stopped; Anthropic's Messages API continues it the same way
/// through the gateway, plain and streamed; with an output schema it is
/// refused by name.
pub async fn assistant_prefill(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let user = ChatMessage::user("Count from 1 to 20, separated by commas.");
    let started = "1, 2, 3, 4, 5, 6,";
    let greedy_of = |messages: Vec<ChatMessage>, max_tokens: u32| {
        InferenceRequest::new(messages)
            .with_max_tokens(max_tokens)
            .with_temperature(0.0)
    };
    let opened = shared
        .generate(greedy_of(vec![user.clone()], 1))
        .await
        .expect("the conversation before the message");
    let continued = shared
        .generate(greedy_of(
            vec![user.clone(), ChatMessage::assistant(started)],
            8,
        ))
        .await
        .expect("a continued message");
    let text_tokens = shared.tokenize(started, false).await.expect("tokenize");
    assert_eq!(
        continued.usage.expect("usage").prompt_tokens,
        opened.usage.expect("usage").prompt_tokens + text_tokens.len() as u64,
        "the prompt is the opened turn and the message's text, no turn closed"
    );
    assert!(
        continued.content.trim_start().starts_with('7'),
        "the count goes on from 6: {:?}",
        continued.content
    );

    let gateway = LentGateway::over(backend, &shared).await;
    let url = format!("{}/v1/messages", gateway.base);
    let http = reqwest::Client::new();
    let body = json!({
        "model": "conformance",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [
            {"role": "user", "content": user.content},
            {"role": "assistant", "content": started},
        ],
    });
    let (status, plain) = post(&http, &url, &body).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(
        plain["content"][0]["text"],
        continued.content.as_str(),
        "the Messages API continues the message as chat does"
    );
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let joined: String = post_events(&http, &url, &streamed)
        .await
        .iter()
        .filter(|(name, _)| name == "content_block_delta")
        .map(|(_, data)| {
            data["delta"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(joined, continued.content, "streamed as plain");
    let mut with_schema = body.clone();
    with_schema["output_config"] =
        json!({"format": {"type": "json_schema", "schema": answer_schema()}});
    let (status, refused) = post(&http, &url, &with_schema).await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("prefill")),
        "{refused}"
    );
    gateway.stop().await;
}
