//! OpenAI's legacy completions API (`POST /v1/completions`) on the wire: a
//! raw prompt the model continues with no chat template, what code
//! completion plugins and base models use. Both directions: the body our
//! client sends an engine ([`CompletionRequest::from_inference`]) and the
//! body our router reads ([`CompletionRequest::into_inference`]).
//!
//! One prompt per request, text or token ids (several prompts are refused);
//! `suffix` asks for fill-in-the-middle, served for models with FIM tokens
//! ([`runtime_core::FimTokens`]); `echo` is served by the router; `logprobs`
//! and `best_of` are refused by name. `max_tokens` defaults to 16, as in
//! OpenAI's API.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use runtime_core::{
    Error, FinishReason, InferenceRequest, InferenceResponse, Prompt, Result, Usage,
};

use crate::wire::{Extra, Stop, StreamOptions};

/// The tokens a completion may have when the request does not say, as in
/// OpenAI's API.
pub const DEFAULT_MAX_TOKENS: u32 = 16;

/// `POST /v1/completions` request body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The model to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// What to continue: a string or token ids (or a list holding one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Value>,
    /// Fill-in-the-middle: the text after the gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// The most tokens to generate (16 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Whether to stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Return the prompt before the completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    /// Fields this crate does not model: refused unless they change nothing.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fields that describe the caller and change nothing about the answer.
const METADATA_FIELDS: &[&str] = &["user"];

fn neutral(field: &str, value: &Value) -> bool {
    match field {
        "n" | "best_of" => value.as_u64() == Some(1),
        "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
        "logit_bias" => value.as_object().is_some_and(serde_json::Map::is_empty),
        _ => false,
    }
}

fn refuse_unsupported(extra: &Extra) -> Result<()> {
    for (field, value) in extra {
        if value.is_null() || METADATA_FIELDS.contains(&field.as_str()) || neutral(field, value) {
            continue;
        }
        let how = match field.as_str() {
            "logprobs" => {
                "log-probabilities are served by the chat API (`logprobs`, `top_logprobs`)"
            }
            "n" | "best_of" => "one completion per request is served; send several requests",
            _ => "this server does not implement it; leave it out or send its default",
        };
        return Err(Error::invalid_request(
            field.clone(),
            format!("is {value}: {how}"),
        ));
    }
    Ok(())
}

/// The prompt: a string, token ids, or a list holding one of them.
fn parse_prompt(prompt: Option<Value>) -> Result<Prompt> {
    let refuse = |what: &str| Err(Error::invalid_request("prompt", what.to_owned()));
    let one = |value: Value| match value {
        Value::String(text) => Some(Prompt::Text(text)),
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect::<Option<Vec<u32>>>()
            .map(Prompt::Tokens),
        _ => None,
    };
    let invalid = "is neither a string nor a list of token ids (integers from 0)";
    match prompt {
        None | Some(Value::Null) => refuse("is missing; send the text to continue"),
        Some(Value::String(text)) => Ok(Prompt::Text(text)),
        Some(Value::Array(mut items)) => match items.as_slice() {
            [] => refuse("is an empty list; send the text or token ids to continue"),
            // One prompt in a list: `["text"]` or `[[1, 2, 3]]`.
            [Value::String(_) | Value::Array(_)] => match one(items.remove(0)) {
                Some(prompt) => Ok(prompt),
                None => refuse(invalid),
            },
            several if several.iter().all(|p| p.is_string() || p.is_array()) => {
                refuse("holds several prompts; send one per request")
            }
            [Value::String(_) | Value::Array(_), ..] => refuse(invalid),
            _ => match one(Value::Array(items)) {
                Some(prompt) => Ok(prompt),
                None => refuse(invalid),
            },
        },
        Some(other) => Err(Error::invalid_request(
            "prompt",
            format!("is {other}; send a string or a list of token ids"),
        )),
    }
}

impl CompletionRequest {
    /// The body for an engine's `/v1/completions`, addressed to `model`
    /// (usage requested when streamed).
    pub fn from_inference(request: &InferenceRequest, model: Option<&str>, stream: bool) -> Self {
        Self {
            model: model.map(str::to_owned),
            // A string or token ids, as `Prompt` is written.
            prompt: Some(json!(
                request
                    .prompt
                    .as_ref()
                    .unwrap_or(&Prompt::Text(String::new()))
            )),
            suffix: request.suffix.clone(),
            max_tokens: request.max_tokens.map(i64::from),
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed,
            stop: (!request.stop.is_empty()).then(|| Stop::Many(request.stop.clone())),
            stream: stream.then_some(true),
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
            echo: None,
            extra: Extra::new(),
        }
    }

    /// The crate's request type, validated, and whether the prompt is to be
    /// echoed before the completion; errors name the offending field.
    pub fn into_inference(self) -> Result<(InferenceRequest, bool)> {
        refuse_unsupported(&self.extra)?;
        let mut request = InferenceRequest::completion_of(parse_prompt(self.prompt)?);
        // An empty suffix leaves no gap: a plain completion, as OpenAI's.
        request.suffix = self.suffix.filter(|suffix| !suffix.is_empty());
        request.max_tokens = match self.max_tokens {
            None => Some(DEFAULT_MAX_TOKENS),
            Some(n) => Some(u32::try_from(n).map_err(|_| {
                Error::invalid_request(
                    "max_tokens",
                    format!("must be between 1 and {}, got {n}", u32::MAX),
                )
            })?),
        };
        request.temperature = self.temperature;
        request.top_p = self.top_p;
        request.seed = self.seed;
        request.stop = self.stop.map(Stop::into_vec).unwrap_or_default();
        request.stream = self.stream.unwrap_or(false);
        request.validate()?;
        Ok((request, self.echo.unwrap_or(false)))
    }

    /// Whether a streamed answer should end with a usage chunk.
    pub fn wants_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|options| options.include_usage)
    }
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    })
}

/// The `text_completion` object of a whole answer (`text` is the prompt and
/// the completion when echoed).
pub fn completion_response(
    response: &InferenceResponse,
    text: &str,
    id: &str,
    model: &str,
    created: u64,
) -> Value {
    json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "text": text,
            "index": 0,
            "logprobs": null,
            "finish_reason": response.finish_reason.as_ref().map(FinishReason::as_str),
        }],
        "usage": response.usage.as_ref().map(usage_json),
    })
}

/// One chunk of a streamed completion: new text, or (with `finish_reason`)
/// the end; with `usage`, the usage chunk, whose `choices` is empty.
pub fn completion_chunk(
    id: &str,
    model: &str,
    created: u64,
    text: &str,
    finish_reason: Option<&FinishReason>,
    usage: Option<&Usage>,
) -> Value {
    let choices = match usage {
        Some(_) => json!([]),
        None => json!([{
            "text": text,
            "index": 0,
            "logprobs": null,
            "finish_reason": finish_reason.map(FinishReason::as_str),
        }]),
    };
    json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage.map(usage_json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<(InferenceRequest, bool)> {
        serde_json::from_value::<CompletionRequest>(body)
            .expect("a completions body")
            .into_inference()
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidRequest { field, .. } => field.into_owned(),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn a_raw_prompt_is_continued_with_sixteen_tokens_unless_told() {
        let (request, echo) = parse(json!({"prompt": "Once upon a time", "stop": "\n"})).unwrap();
        assert_eq!(
            request.prompt,
            Some(Prompt::Text("Once upon a time".into()))
        );
        assert!(request.messages.is_empty());
        assert_eq!(request.max_tokens, Some(DEFAULT_MAX_TOKENS));
        assert_eq!(request.stop, ["\n"]);
        assert!(!echo);
        let (request, echo) =
            parse(json!({"prompt": ["x"], "max_tokens": 5, "echo": true})).unwrap();
        assert_eq!(request.max_tokens, Some(5));
        assert!(echo);
    }

    #[test]
    fn what_is_not_served_is_refused_by_name() {
        for (body, field) in [
            (json!({"prompt": ["a", "b"]}), "prompt"),
            (json!({"prompt": [[1], [2]]}), "prompt"),
            (json!({"prompt": [1, -2]}), "prompt"),
            (json!({"prompt": [1, "a"]}), "prompt"),
            (json!({"prompt": [[]]}), "prompt"),
            (json!({}), "prompt"),
            (json!({"prompt": [1, 2], "suffix": "}"}), "suffix"),
            (json!({"prompt": "x", "logprobs": 2}), "logprobs"),
            (json!({"prompt": "x", "n": 2}), "n"),
            (json!({"prompt": "x", "best_of": 3}), "best_of"),
            (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        ] {
            assert_eq!(field_of(parse(body).unwrap_err()), field);
        }
        parse(json!({"prompt": "x", "n": 1, "best_of": 1, "suffix": "", "user": "u"})).unwrap();
    }

    #[test]
    fn token_ids_and_a_suffix_are_read() {
        for body in [json!({"prompt": [1, 2, 3]}), json!({"prompt": [[1, 2, 3]]})] {
            let (request, _) = parse(body).unwrap();
            assert_eq!(request.prompt, Some(Prompt::Tokens(vec![1, 2, 3])));
        }
        let (request, _) = parse(json!({"prompt": "def f(", "suffix": "\n"})).unwrap();
        assert_eq!(request.suffix.as_deref(), Some("\n"));
        let (request, _) = parse(json!({"prompt": "x", "suffix": ""})).unwrap();
        assert_eq!(request.suffix, None, "an empty suffix leaves no gap");
    }

    #[test]
    fn an_engine_is_sent_token_ids_and_the_suffix_as_they_are() {
        let tokens = InferenceRequest::completion_of(Prompt::Tokens(vec![7, 8]));
        let body =
            serde_json::to_value(CompletionRequest::from_inference(&tokens, None, false)).unwrap();
        assert_eq!(body["prompt"], json!([7, 8]));
        let infill = InferenceRequest::infill("a", "b");
        let body =
            serde_json::to_value(CompletionRequest::from_inference(&infill, None, false)).unwrap();
        assert_eq!(
            (&body["prompt"], &body["suffix"]),
            (&json!("a"), &json!("b"))
        );
    }

    #[test]
    fn an_engine_is_sent_the_prompt_and_asked_for_usage_when_streaming() {
        let request = InferenceRequest::completion("def f(").with_max_tokens(8);
        let body =
            serde_json::to_value(CompletionRequest::from_inference(&request, Some("m"), true))
                .unwrap();
        assert_eq!(body["prompt"], "def f(");
        assert_eq!(body["max_tokens"], 8);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert!(body.get("messages").is_none());
    }
}
