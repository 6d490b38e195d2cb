//! The OpenAI wire types parse what llama-server and vLLM really send.

mod common;

use common::{capture, sse_payloads};
use runtime_core::{
    ChatMessage, Error, FinishReason, InferenceRequest, ResponseFormat, ToolChoice, Usage,
};
use runtime_openai::wire::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ErrorBody,
};

#[test]
fn llama_server_chat_response_becomes_an_inference_response_with_timings() {
    let wire: ChatCompletionResponse =
        serde_json::from_str(&capture("llama-server/chat.json")).unwrap();
    let response = wire.into_inference();
    assert!(response.content.starts_with("L'Étoile, la Marseillaise"));
    assert_eq!(response.finish_reason, Some(FinishReason::Length));
    assert_eq!(response.usage, Some(Usage::new(37, 24)));
    let timings = response.timings.expect("llama-server sends timings");
    let ttft = timings.time_to_first_token.unwrap().as_secs_f64();
    assert!(
        (ttft - 0.068214).abs() < 1e-9,
        "prompt_ms becomes time to first token"
    );
    assert!((timings.tokens_per_second.unwrap() - 34.876_756).abs() < 1e-3);
}

#[test]
fn vllm_chat_response_becomes_an_inference_response_without_timings() {
    let wire: ChatCompletionResponse = serde_json::from_str(&capture("vllm/chat.json")).unwrap();
    assert!(wire.extra.contains_key("stop_reason") || wire.extra.contains_key("service_tier"));
    let response = wire.into_inference();
    assert!(response.content.starts_with("L'Étoile"));
    assert_eq!(response.finish_reason, Some(FinishReason::Length));
    assert_eq!(response.usage, Some(Usage::new(37, 24)));
    assert_eq!(response.timings, None);
    assert_eq!(response.model.as_deref(), Some("smollm2"));
}

#[test]
fn every_llama_server_stream_chunk_parses_and_concatenates() {
    let chunks: Vec<ChatCompletionChunk> = sse_payloads("llama-server/chat-stream-usage.sse")
        .iter()
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let first = &chunks[0];
    assert_eq!(first.choices[0].delta.role.as_deref(), Some("assistant"));
    assert_eq!(first.content(), "", "first chunk has content: null");
    let text: String = chunks.iter().map(ChatCompletionChunk::content).collect();
    assert_eq!(text, "Hello there, welcome to my world!");
    let finish = chunks.iter().find_map(ChatCompletionChunk::finish_reason);
    assert_eq!(finish, Some(&FinishReason::Length));
    let last = chunks.last().unwrap();
    assert!(last.choices.is_empty(), "the usage chunk has no choices");
    assert_eq!(last.usage, Some(Usage::new(32, 8)));
    assert!(last.timings().unwrap().tokens_per_second.unwrap() > 30.0);
}

#[test]
fn every_vllm_stream_chunk_parses_and_carries_usage_last() {
    let chunks: Vec<ChatCompletionChunk> = sse_payloads("vllm/chat-stream-usage.sse")
        .iter()
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert_eq!(chunks[0].choices[0].delta.content.as_deref(), Some(""));
    assert!(chunks.iter().any(|c| c.finish_reason().is_some()));
    assert!(chunks.last().unwrap().usage.is_some());
    for data in sse_payloads("vllm/chat-stream.sse") {
        serde_json::from_str::<ChatCompletionChunk>(&data).unwrap();
    }
}

#[test]
fn llama_server_context_overflow_becomes_context_exceeded() {
    let err = ErrorBody::to_error(
        400,
        capture("llama-server/error-exceed-context.json").as_bytes(),
    );
    assert!(matches!(
        err,
        Error::ContextExceeded {
            prompt_tokens: 3031,
            context_size: 1024
        }
    ));
}

#[test]
fn engine_error_bodies_keep_status_type_and_message() {
    let cases = [
        (
            "llama-server/error-malformed-json.json",
            500,
            Some("server_error"),
        ),
        (
            "llama-server/error-max-tokens.json",
            400,
            Some("invalid_request_error"),
        ),
        (
            "llama-server/error-unauthorized.json",
            401,
            Some("authentication_error"),
        ),
        (
            "vllm/error-exceed-context.json",
            400,
            Some("BadRequestError"),
        ),
        ("vllm/error-malformed-json.json", 400, Some("Bad Request")),
        ("vllm/error-max-tokens.json", 400, Some("BadRequestError")),
        ("vllm/error-unknown-model.json", 404, Some("NotFoundError")),
        ("vllm/error-unauthorized.json", 401, None),
    ];
    for (file, status, kind) in cases {
        match ErrorBody::to_error(status, capture(file).as_bytes()) {
            Error::Api {
                status: got,
                kind: got_kind,
                message,
            } => {
                assert_eq!(got, status, "{file}");
                assert_eq!(got_kind.as_deref(), kind, "{file}");
                assert!(!message.is_empty(), "{file} has a message");
            }
            other => panic!("{file}: expected Api, got {other:?}"),
        }
    }
}

#[test]
fn unparsable_error_body_keeps_its_text() {
    let err = ErrorBody::to_error(502, b"Bad Gateway\n");
    assert!(matches!(err, Error::Api { status: 502, ref message, .. } if message == "Bad Gateway"));
}

#[test]
fn streaming_requests_ask_for_usage_and_round_trip() {
    let request = InferenceRequest::new(vec![
        ChatMessage::system("be brief"),
        ChatMessage::user("hi"),
    ])
    .with_max_tokens(8)
    .with_temperature(0.0)
    .with_seed(7)
    .with_stop("\n");
    let wire = ChatCompletionRequest::from_inference(&request, Some("m"), true);
    let json = serde_json::to_value(&wire).unwrap();
    assert_eq!(json["stream"], true);
    assert_eq!(json["stream_options"]["include_usage"], true);
    assert_eq!(json["messages"][0]["role"], "system");
    let back: ChatCompletionRequest = serde_json::from_value(json).unwrap();
    let mut expected = request.clone();
    expected.stream = true;
    assert_eq!(back.into_inference().unwrap(), expected);

    let plain =
        serde_json::to_value(ChatCompletionRequest::from_inference(&request, None, false)).unwrap();
    assert!(plain.get("stream").is_none() && plain.get("model").is_none());
}

fn parse(json: &str) -> runtime_core::Result<InferenceRequest> {
    serde_json::from_str::<ChatCompletionRequest>(json)
        .unwrap()
        .into_inference()
}

#[test]
fn wire_requests_accept_string_stop_and_text_parts() {
    let request = parse(
        r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
            "stop":"END","max_tokens":-1,"user":"alice","n":1,"presence_penalty":0}"#,
    )
    .unwrap();
    assert_eq!(request.messages[0].content, "ab");
    assert_eq!(request.stop, vec!["END".to_owned()]);
    assert_eq!(request.max_tokens, None);
}

#[test]
fn max_completion_tokens_is_honoured_and_the_smaller_limit_wins() {
    let base = r#""messages":[{"role":"user","content":"x"}]"#;
    let only_new = parse(&format!(r#"{{{base},"max_completion_tokens":3}}"#)).unwrap();
    assert_eq!(only_new.max_tokens, Some(3));
    let both = parse(&format!(
        r#"{{{base},"max_tokens":10,"max_completion_tokens":3}}"#
    ))
    .unwrap();
    assert_eq!(both.max_tokens, Some(3));
    let both = parse(&format!(
        r#"{{{base},"max_tokens":2,"max_completion_tokens":30}}"#
    ))
    .unwrap();
    assert_eq!(both.max_tokens, Some(2));
}

#[test]
fn fields_this_server_does_not_implement_are_refused_by_name() {
    let base = r#""messages":[{"role":"user","content":"x"}]"#;
    for (field, value) in [
        ("functions", r#"[{"name":"f"}]"#),
        ("function_call", r#""auto""#),
        ("n", "0"),
        ("response_format", r#"{"type":"xml"}"#),
        ("tools", r#"[{"type":"retrieval"}]"#),
        ("tool_choice", r#""sometimes""#),
        ("top_logprobs", "3"),
        ("frequency_penalty", "0.5"),
        ("n_probs", "3"),
        ("top_k", "40"),
    ] {
        let err = parse(&format!(r#"{{{base},"{field}":{value}}}"#)).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidRequest { field: named, .. } if named.starts_with(field)),
            "{field}: {err:?}"
        );
    }
    let image = parse(
        r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
    )
    .unwrap_err();
    assert!(
        matches!(&image, Error::InvalidRequest { field, .. } if field == "messages"),
        "{image:?}"
    );
}

#[test]
fn wire_requests_with_an_unknown_role_or_negative_max_tokens_are_rejected() {
    let unknown_role: ChatCompletionRequest =
        serde_json::from_str(r#"{"messages":[{"role":"robot","content":"x"}]}"#).unwrap();
    assert!(matches!(
        unknown_role.into_inference(),
        Err(Error::InvalidRequest { field, .. }) if field == "messages"
    ));
    let negative: ChatCompletionRequest =
        serde_json::from_str(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-5}"#)
            .unwrap();
    assert!(matches!(
        negative.into_inference(),
        Err(Error::InvalidRequest { field, .. }) if field == "max_tokens"
    ));
}

#[test]
fn tools_formats_logprobs_and_n_map_to_core_and_back_exactly() {
    let body = r#"{"messages":[
        {"role":"user","content":"weather?"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"weather","arguments":"{\"city\":\"Paris\"}"}}]},
        {"role":"tool","tool_call_id":"call_1","content":"sunny"}],
      "tools":[{"type":"function","function":{"name":"weather","description":"Weather by city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]},"strict":true}}],
      "tool_choice":{"type":"function","function":{"name":"weather"}},
      "parallel_tool_calls":false,
      "logprobs":true,"top_logprobs":5,"n":3}"#;
    let request = parse(body).unwrap();
    assert_eq!(request.tools.len(), 1);
    assert_eq!(request.tools[0].name, "weather");
    assert_eq!(
        request.tools[0].description.as_deref(),
        Some("Weather by city")
    );
    assert!(request.tools[0].strict);
    assert_eq!(
        request.tool_choice,
        Some(ToolChoice::Function("weather".into()))
    );
    assert_eq!(request.parallel_tool_calls, Some(false));
    assert!(request.logprobs);
    assert_eq!(request.top_logprobs, Some(5));
    assert_eq!(request.n, Some(3));
    let calls = &request.messages[1].tool_calls;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].id, "call_1");
    assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
    assert_eq!(request.messages[2].tool_call_id.as_deref(), Some("call_1"));

    // Back to the wire and in again: nothing lost, nothing added.
    let wire = ChatCompletionRequest::from_inference(&request, Some("m"), false);
    let again =
        serde_json::from_value::<ChatCompletionRequest>(serde_json::to_value(&wire).unwrap())
            .unwrap()
            .into_inference()
            .unwrap();
    assert_eq!(again, request);

    let format = parse(
        r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"w","schema":{"type":"object"},"strict":true}}}"#,
    )
    .unwrap();
    assert!(matches!(
        &format.response_format,
        Some(ResponseFormat::JsonSchema { name, strict: true, .. }) if name == "w"
    ));
    let wire = ChatCompletionRequest::from_inference(&format, None, false);
    let again =
        serde_json::from_value::<ChatCompletionRequest>(serde_json::to_value(&wire).unwrap())
            .unwrap()
            .into_inference()
            .unwrap();
    assert_eq!(again, format);
}

#[test]
fn tool_call_arguments_given_as_an_object_are_kept_as_json_text() {
    let body = r#"{"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":{"a":1}}}]},{"role":"tool","tool_call_id":"c","content":"1"}]}"#;
    let request = parse(body).unwrap();
    let arguments: serde_json::Value =
        serde_json::from_str(&request.messages[0].tool_calls[0].arguments).unwrap();
    assert_eq!(arguments, serde_json::json!({"a": 1}));
}
