//! What tools and structured output promise: a schema-valid answer or a
//! typed error, on the real engine; every answer is validated here again,
//! independently of the runtime's own check.

use runtime_core::{ResponseFormat, Tool, ToolCall, ToolChoice};
use serde_json::{Value, json};

use super::*;

/// The seeds each schema is tried with, at [`WARM`].
const SEEDS: [u64; 5] = [1, 2, 3, 4, 5];
/// The sampling temperature of the schema checks: far from greedy, so the
/// constraint, not the model's habits, is what keeps answers valid.
const WARM: f32 = 0.8;

/// Five schemas covering the shapes clients send: nested objects, arrays
/// with bounds on their length, enums, integers with bounds, required keys
/// with `additionalProperties: false`.
fn schemas() -> Vec<(&'static str, &'static str, Value)> {
    // Words, not any string: at temperature 0.8 a small model otherwise
    // strays into escaped control characters, each several tokens, until
    // the token limit cuts the answer off (which is then refused, rightly).
    let name = json!({"type": "string", "pattern": "^[A-Za-z][A-Za-z '-]{0,39}$"});
    vec![
        (
            "nested",
            "Give a city and its country as JSON.",
            json!({
                "type": "object",
                "properties": {"city": {
                    "type": "object",
                    "properties": {"name": name, "country": name},
                    "required": ["name", "country"],
                    "additionalProperties": false
                }},
                "required": ["city"],
                "additionalProperties": false
            }),
        ),
        (
            "array",
            "List some colours as JSON.",
            json!({
                "type": "object",
                "properties": {"colours": {
                    "type": "array", "items": name, "minItems": 2, "maxItems": 4
                }},
                "required": ["colours"],
                "additionalProperties": false
            }),
        ),
        (
            "enum",
            "Is Paris in France? Answer as JSON.",
            json!({
                "type": "object",
                "properties": {"answer": {"enum": ["yes", "no", "maybe"]}},
                "required": ["answer"],
                "additionalProperties": false
            }),
        ),
        (
            "bounds",
            "Rate the year 1999 as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                    "stars": {"type": "integer", "minimum": 1, "maximum": 5}
                },
                "required": ["year", "stars"],
                "additionalProperties": false
            }),
        ),
        (
            "required",
            "Describe a person as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "name": name,
                    "age": {"type": "integer", "minimum": 0, "maximum": 150},
                    "email": name,
                    "admin": {"type": "boolean"}
                },
                "required": ["name", "age", "admin"],
                "additionalProperties": false
            }),
        ),
    ]
}

/// `schema` compiled by an independent validator (the suite's own).
pub(super) fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::validator_for(schema).expect("the suite's schemas compile")
}

/// Refuses, as `structured_output` would see it, a backend that serves
/// plain chat only: every feature is refused by name, none dropped.
async fn refused_by_name(runtime: &dyn ModelRuntime, request: InferenceRequest, field: &str) {
    match runtime.generate(request).await {
        Err(Error::InvalidRequest { field: named, .. }) if named == field => {}
        other => panic!("`{field}` must be refused by name, got {other:?}"),
    }
}

/// What a check needs of a backend.
#[derive(Clone, Copy)]
enum Feature {
    /// `response_format` schemas and objects, and `n`.
    Schemas,
    Tools,
    Logprobs,
}

/// Whether the backend serves `feature`; when not, checks that it refuses
/// it by name and records the check as not applicable.
async fn serves(
    backend: &Backend,
    runtime: &dyn ModelRuntime,
    check: &str,
    feature: Feature,
) -> bool {
    let capabilities = runtime.metadata().capabilities;
    let plain = greedy(QUESTION, 4);
    let (served, refused) = match feature {
        Feature::Schemas => (
            capabilities.json_schema && capabilities.max_choices > 1,
            "schemas (`response_format`) and several answers (`n`) are",
        ),
        Feature::Tools => (capabilities.tools, "tools are"),
        Feature::Logprobs => (capabilities.logprobs, "log-probabilities are"),
    };
    if served {
        return true;
    }
    match feature {
        Feature::Schemas if !capabilities.json_schema => {
            refused_by_name(
                runtime,
                plain.with_json_schema("s", json!({"type": "object"})),
                "response_format",
            )
            .await;
        }
        Feature::Schemas => refused_by_name(runtime, plain.with_n(2), "n").await,
        Feature::Tools => refused_by_name(runtime, plain.with_tool(weather()), "tools").await,
        Feature::Logprobs => refused_by_name(runtime, plain.with_logprobs(5), "logprobs").await,
    }
    not_applicable(
        backend,
        check,
        &format!("not served here so far: {refused} refused by name"),
    );
    false
}

/// Every `json_schema` answer, at temperature 0.8 with five seeds, parses
/// and validates; `json_object` answers parse as objects; `n` answers are
/// each checked; a keyword the engine cannot enforce is refused by name.
pub async fn structured_output(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    if !serves(backend, runtime, "structured_output", Feature::Schemas).await {
        return;
    }
    for (label, prompt, schema) in schemas() {
        let check = validator(&schema);
        let answers = futures::future::join_all(SEEDS.map(|seed| {
            let request = InferenceRequest::from_prompt(prompt)
                .with_max_tokens(160)
                .with_temperature(WARM)
                .with_seed(seed)
                .with_json_schema(label, schema.clone());
            runtime.generate(request)
        }))
        .await;
        for (seed, answer) in SEEDS.iter().zip(answers) {
            let answer = answer.unwrap_or_else(|err| panic!("{label}, seed {seed}: {err}"));
            let value: Value = serde_json::from_str(&answer.content).unwrap_or_else(|err| {
                panic!(
                    "{label}, seed {seed}: not JSON ({err}): {:?}",
                    answer.content
                )
            });
            if let Err(err) = check.validate(&value) {
                panic!("{label}, seed {seed}: {err} in {value}");
            }
            assert_eq!(answer.finish_reason, Some(FinishReason::Stop), "{label}");
        }
    }

    // A streamed answer is the same checked text.
    let (label, prompt, schema) = schemas().swap_remove(2);
    let request = InferenceRequest::from_prompt(prompt)
        .with_max_tokens(160)
        .with_temperature(0.0)
        .with_json_schema(label, schema.clone());
    let whole = runtime
        .generate(request.clone())
        .await
        .expect("enum answer");
    let streamed = collect_stream(runtime, request).await.concat();
    assert_eq!(
        streamed, whole.content,
        "a streamed schema answer equals the plain one"
    );

    // A free-form object may go on repeating keys until the token limit (a
    // sampled loop seen on one kind of CPU and not another): that answer is
    // the typed cut-off refusal, never an unchecked partial object; every
    // answer that ends is an object, and at least one does.
    let mut whole_objects = 0;
    for seed in [7, 8, 9] {
        let request =
            InferenceRequest::from_prompt("Describe the weather in Paris as a JSON object.")
                .with_max_tokens(300)
                .with_temperature(WARM)
                .with_seed(seed)
                .with_response_format(ResponseFormat::JsonObject);
        match runtime.generate(request).await {
            Ok(answer) => {
                let value: Value = serde_json::from_str(&answer.content).unwrap_or_else(|err| {
                    panic!("json_object, seed {seed}: {err}: {:?}", answer.content)
                });
                assert!(value.is_object(), "json_object, seed {seed}: {value}");
                whole_objects += 1;
            }
            Err(Error::OutputInvalid { reason, .. }) if reason.contains("token limit") => {
                tracing::info!(seed, "a json_object answer ran to the token limit");
            }
            Err(err) => panic!("json_object, seed {seed}: {err}"),
        }
    }
    assert!(whole_objects > 0, "no json_object answer ended");

    // Several answers: each one checked.
    let (label, prompt, schema) = schemas().swap_remove(3);
    let check = validator(&schema);
    let several = runtime
        .generate(
            InferenceRequest::from_prompt(prompt)
                .with_max_tokens(160)
                .with_temperature(WARM)
                .with_seed(11)
                .with_n(3)
                .with_json_schema(label, schema),
        )
        .await
        .expect("n = 3");
    let choices = several.choices();
    assert_eq!(choices.len(), 3, "n = 3 gives three answers");
    for choice in choices {
        let value: Value = serde_json::from_str(&choice.content).expect("each answer parses");
        assert!(check.is_valid(&value), "each answer validates: {value}");
    }

    // What no engine here enforces is refused before generation, by name.
    let unique = json!({"type": "object", "properties": {"ids": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": true
    }}});
    match runtime
        .generate(greedy(QUESTION, 8).with_json_schema("u", unique))
        .await
    {
        Err(Error::InvalidRequest { field, reason }) => {
            assert_eq!(field, "response_format.json_schema.schema");
            assert!(reason.contains("uniqueItems"), "{reason}");
        }
        other => panic!("uniqueItems must be refused by name, got {other:?}"),
    }
}

pub(super) fn weather() -> Tool {
    Tool::function(
        "get_weather",
        json!({
            "type": "object",
            "properties": {
                "city": {"type": "string", "pattern": "^[A-Z][A-Za-z ]{0,39}$"},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            },
            "required": ["city", "unit"],
            "additionalProperties": false
        }),
    )
    .with_description("The current weather in a city")
}

fn clock() -> Tool {
    Tool::function(
        "get_time",
        json!({
            "type": "object",
            "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][A-Za-z_/ ]{0,39}$"}},
            "required": ["timezone"],
            "additionalProperties": false
        }),
    )
    .with_description("The current time in a timezone")
}

fn asking(choice: ToolChoice) -> InferenceRequest {
    InferenceRequest::new(vec![ChatMessage::user(
        "What is the weather in Paris right now, and what time is it there?",
    )])
    .with_max_tokens(160)
    .with_temperature(0.0)
    .with_tool(weather())
    .with_tool(clock())
    .with_tool_choice(choice)
}

/// Every call names a tool of the request and has valid arguments, by the
/// suite's own validator.
fn assert_valid_calls(calls: &[ToolCall], context: &str) {
    let tools = [weather(), clock()];
    assert!(!calls.is_empty(), "{context}: no call");
    for call in calls {
        let tool = tools
            .iter()
            .find(|tool| tool.name == call.name)
            .unwrap_or_else(|| panic!("{context}: unknown tool {}", call.name));
        assert!(!call.id.is_empty(), "{context}: a call has an id");
        let arguments: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|err| {
            panic!("{context}: arguments not JSON ({err}): {}", call.arguments)
        });
        let check = validator(tool.parameters.as_ref().expect("parameters"));
        if let Err(err) = check.validate(&arguments) {
            panic!("{context}: {err} in {arguments}");
        }
    }
}

/// `required` and a named choice give calls of those tools with valid
/// arguments; a streamed call assembles to exactly the plain one; the
/// tool's result in a `tool` message is rendered and answered;
/// `parallel_tool_calls: false` gives one call; `none` gives text.
pub async fn tool_calls(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    if !serves(backend, runtime, "tool_calls", Feature::Tools).await {
        return;
    }

    let required = runtime
        .generate(asking(ToolChoice::Required))
        .await
        .expect("required");
    assert_eq!(required.finish_reason, Some(FinishReason::ToolCalls));
    assert_valid_calls(&required.tool_calls, "required");

    let named = runtime
        .generate(asking(ToolChoice::Function("get_time".into())))
        .await
        .expect("named");
    assert_eq!(named.tool_calls.len(), 1, "a named choice is one call");
    assert_eq!(named.tool_calls[0].name, "get_time");
    assert_valid_calls(&named.tool_calls, "named");

    let single = runtime
        .generate(asking(ToolChoice::Required).with_parallel_tool_calls(false))
        .await
        .expect("single");
    assert_eq!(
        single.tool_calls.len(),
        1,
        "parallel_tool_calls false: one call"
    );
    assert_valid_calls(&single.tool_calls, "single");

    // Streamed: the pieces assemble to the plain call, name and arguments
    // exactly (ids are fresh per answer).
    let mut events = runtime
        .generate_events(asking(ToolChoice::Required).with_parallel_tool_calls(false))
        .await
        .expect("streamed call");
    let mut calls: Vec<ToolCall> = Vec::new();
    let mut text = String::new();
    let mut finish = None;
    let mut pieces = 0;
    while let Some(event) = tokio::time::timeout(STREAM_TIMEOUT, events.next())
        .await
        .expect("the stream moves")
    {
        match event.expect("event") {
            StreamEvent::ToolCall(delta) => {
                pieces += 1;
                delta.apply_to(&mut calls).expect("call pieces in order");
            }
            StreamEvent::Delta(delta) => text.push_str(&delta),
            StreamEvent::Finished { finish_reason, .. } => finish = finish_reason,
            _ => {}
        }
    }
    assert_eq!(text, "", "a call streams no text");
    assert_eq!(finish, Some(FinishReason::ToolCalls));
    assert!(
        pieces > 2,
        "the call streams in pieces as it is generated ({pieces})"
    );
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].name, single.tool_calls[0].name, "streamed name");
    assert_eq!(
        calls[0].arguments, single.tool_calls[0].arguments,
        "streamed arguments"
    );
    assert!(!calls[0].id.is_empty(), "a streamed call has an id");

    // `none`: text, no call.
    let none = runtime
        .generate(asking(ToolChoice::None).with_max_tokens(16))
        .await
        .expect("none");
    assert!(none.tool_calls.is_empty(), "none gives no call");
    assert!(!none.content.is_empty(), "none gives text");

    // `auto`: text or valid calls, whichever the model chooses.
    let auto = runtime
        .generate(asking(ToolChoice::Auto).with_max_tokens(96))
        .await
        .expect("auto");
    if !auto.tool_calls.is_empty() {
        assert_valid_calls(&auto.tool_calls, "auto");
    }

    // The result of the call goes back in a `tool` message and is answered.
    // That it reached the prompt, not dropped by a template that knows no
    // tools: the prompt grows by the result's text, against a one-word
    // result (a call without its result is refused).
    let call = single.tool_calls[0].clone();
    let history = |result: &str| {
        let mut messages = asking(ToolChoice::Auto).messages;
        messages.push(ChatMessage::assistant_calls(vec![call.clone()]));
        messages.push(ChatMessage::tool_result(call.id.clone(), result));
        InferenceRequest::new(messages)
            .with_max_tokens(24)
            .with_temperature(0.0)
            .with_tool(weather())
            .with_tool(clock())
            .with_tool_choice(ToolChoice::None)
    };
    let result = "It is 18 degrees Celsius and sunny in Paris, with a light wind from the west.";
    let answered = runtime
        .generate(history(result))
        .await
        .expect("answer to the tool result");
    assert!(
        !answered.content.trim().is_empty(),
        "the result is answered"
    );
    let without = runtime
        .generate(history("ok"))
        .await
        .expect("the same with a one-word result");
    let grown =
        answered.usage.expect("usage").prompt_tokens - without.usage.expect("usage").prompt_tokens;
    assert!(
        grown >= 15,
        "the tool result is rendered into the prompt: it grew by {grown} tokens"
    );
}

/// `top_logprobs: 5` gives five alternatives per token, sorted, the chosen
/// token among them (first, when greedy); streamed log-probabilities
/// cover every token.
pub async fn logprobs(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    if !serves(backend, runtime, "logprobs", Feature::Logprobs).await {
        return;
    }
    // Cut off by the limit, so every generated token is one of the answer's.
    let request = greedy(QUESTION, 6).with_logprobs(5);
    let answer = runtime.generate(request.clone()).await.expect("logprobs");
    assert_eq!(answer.finish_reason, Some(FinishReason::Length));
    let tokens = answer.logprobs.expect("log-probabilities are given");
    let generated = answer.usage.expect("usage").completion_tokens as usize;
    assert_eq!(tokens.len(), generated, "one entry per generated token");
    assert_eq!(
        tokens.iter().map(|t| t.token.as_str()).collect::<String>(),
        answer.content,
        "the tokens spell the answer"
    );
    // Ended by the model: the stop token is no token of the answer, on any
    // engine.
    let stopped = runtime
        .generate(greedy("What is 2+2?", 64).with_logprobs(1))
        .await
        .expect("logprobs to the end");
    assert_eq!(
        stopped.finish_reason,
        Some(FinishReason::Stop),
        "the answer ends by itself"
    );
    let spelled: String = stopped
        .logprobs
        .expect("log-probabilities are given")
        .iter()
        .map(|t| t.token.clone())
        .collect();
    assert_eq!(
        spelled, stopped.content,
        "the tokens spell the answer, without the stop token"
    );
    for (i, token) in tokens.iter().enumerate() {
        assert!(token.logprob <= 0.0, "token {i}: {}", token.logprob);
        assert_eq!(token.top_logprobs.len(), 5, "token {i}: five alternatives");
        let sorted = token
            .top_logprobs
            .windows(2)
            .all(|pair| pair[0].logprob >= pair[1].logprob);
        assert!(
            sorted,
            "token {i}: alternatives sorted: {:?}",
            token.top_logprobs
        );
        let top = &token.top_logprobs[0];
        assert_eq!(
            top.token, token.token,
            "token {i}: greedy picks the first alternative"
        );
        assert!(
            (top.logprob - token.logprob).abs() < 1e-3,
            "token {i}: its own log-probability is the first alternative's"
        );
    }
    let mut events = runtime.generate_events(request).await.expect("streamed");
    let mut streamed = Vec::new();
    while let Some(event) = events.next().await {
        if let StreamEvent::Logprobs(tokens) = event.expect("event") {
            streamed.extend(tokens);
        }
    }
    assert_eq!(
        streamed.len(),
        tokens.len(),
        "a stream carries every token's"
    );
    for (plain, streamed) in tokens.iter().zip(&streamed) {
        assert_eq!(plain.token, streamed.token);
        assert!((plain.logprob - streamed.logprob).abs() < 1e-3);
    }
}
