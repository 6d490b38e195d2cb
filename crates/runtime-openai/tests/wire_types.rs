//! The OpenAI wire types parse what llama-server and vLLM really send.

mod common;

use common::{capture, sse_payloads};
use runtime_core::{ChatMessage, Error, FinishReason, InferenceRequest, Usage};
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
        ("n", "2"),
        ("response_format", r#"{"type":"json_object"}"#),
        ("tools", r#"[{"type":"function","function":{"name":"f"}}]"#),
        ("tool_choice", r#""required""#),
        ("logprobs", "true"),
        ("frequency_penalty", "0.5"),
        ("n_probs", "3"),
        ("top_k", "40"),
    ] {
        let err = parse(&format!(r#"{{{base},"{field}":{value}}}"#)).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidRequest { field: named, .. } if named == field),
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
