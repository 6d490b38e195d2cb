//! OpenAI's legacy completions API (`POST /v1/completions`) on the wire: a
//! raw prompt the model continues with no chat template, what code
//! completion plugins and base models use. Both directions: the body our
//! client sends an engine ([`CompletionRequest::from_inference`]) and the
//! body our router reads ([`CompletionRequest::into_inference`]).
//!
//! Fail-closed: one text prompt per request (token-id prompts and several
//! prompts are refused), `echo` is served by the router, and `suffix`
//! (fill-in-the-middle), `logprobs` and `best_of` are refused by name.
//! `max_tokens` defaults to 16, as in OpenAI's API.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use runtime_core::{Error, FinishReason, InferenceRequest, InferenceResponse, Result, Usage};

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
    /// The text to continue: a string (or a list holding one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Value>,
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
        "suffix" => value.as_str() == Some(""),
        _ => false,
    }
}

fn refuse_unsupported(extra: &Extra) -> Result<()> {
    for (field, value) in extra {
        if value.is_null() || METADATA_FIELDS.contains(&field.as_str()) || neutral(field, value) {
            continue;
        }
        let how = match field.as_str() {
            "suffix" => {
                "fill-in-the-middle is not served; send the text before the gap as `prompt`"
            }
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

fn prompt_text(prompt: Option<Value>) -> Result<String> {
    let refuse = |what: &str| Err(Error::invalid_request("prompt", what.to_owned()));
    match prompt {
        None | Some(Value::Null) => refuse("is missing; send the text to continue"),
        Some(Value::String(text)) => Ok(text),
        Some(Value::Array(mut items)) => match items.len() {
            1 if items[0].is_string() => match items.remove(0) {
                Value::String(text) => Ok(text),
                _ => unreachable!("checked to be a string"),
            },
            0 => refuse("is an empty list; send the text to continue"),
            _ if items.iter().all(Value::is_string) => {
                refuse("holds several prompts; send one per request")
            }
            _ => refuse("is token ids, which are not served; send the text"),
        },
        Some(other) => Err(Error::invalid_request(
            "prompt",
            format!("is {other}; send a string"),
        )),
    }
}

impl CompletionRequest {
    /// The body for an engine's `/v1/completions`, addressed to `model`
    /// (usage requested when streamed).
    pub fn from_inference(request: &InferenceRequest, model: Option<&str>, stream: bool) -> Self {
        Self {
            model: model.map(str::to_owned),
            prompt: Some(Value::String(request.prompt.clone().unwrap_or_default())),
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
        let mut request = InferenceRequest::completion(prompt_text(self.prompt)?);
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
        assert_eq!(request.prompt.as_deref(), Some("Once upon a time"));
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
            (json!({"prompt": [1, 2, 3]}), "prompt"),
            (json!({"prompt": ["a", "b"]}), "prompt"),
            (json!({}), "prompt"),
            (json!({"prompt": "x", "suffix": "}"}), "suffix"),
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
