//! The OpenAI chat-completions wire format, as engines really send it.
//!
//! Lenient on input: every field an engine may leave out is optional, unknown
//! fields are kept in a flattened `extra` map (llama.cpp's `timings`, vLLM's
//! `stop_reason`), and an error body may be an object or a bare string (vLLM's
//! `{"error":"Unauthorized"}`). Conversions to and from `runtime-core`'s
//! [`InferenceRequest`] and [`InferenceResponse`] live here too, so the HTTP
//! client and the HTTP server agree on one mapping.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use runtime_core::{
    ChatMessage, Error, FinishReason, InferenceRequest, InferenceResponse, Result, Role, Timings,
    Usage,
};

/// Extra fields kept as JSON.
pub type Extra = Map<String, Value>;

/// `POST /v1/chat/completions` request body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// The model to use; engines serving one model often ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The conversation.
    #[serde(default)]
    pub messages: Vec<WireMessage>,
    /// The most tokens to generate (the older name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// The most tokens to generate (the name OpenAI's API uses now); when both
    /// are sent the smaller wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<i64>,
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
    /// Fields this crate does not model, passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `stop` is a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A message on the wire: the role as a string, content as text or parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireMessage {
    /// `system`, `user`, `assistant`, `tool`.
    pub role: String,
    /// The content; `null` in some assistant messages.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// Message content: a string, or a list of typed parts of which the text ones count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Typed parts (`{"type":"text","text":"..."}`).
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// The part's type; only `text` is understood.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

impl MessageContent {
    /// The text of the content, parts joined.
    pub fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter(|part| part.kind == "text")
                .filter_map(|part| part.text.as_deref())
                .collect(),
        }
    }
}

impl From<&ChatMessage> for WireMessage {
    fn from(message: &ChatMessage) -> Self {
        Self {
            role: message.role.as_str().to_owned(),
            content: Some(MessageContent::Text(message.content.clone())),
        }
    }
}

impl ChatCompletionRequest {
    /// The wire form of `request`, addressed to `model`.
    ///
    /// When `stream` is set, usage is requested (`stream_options.include_usage`)
    /// so the final usage and timings reach the caller.
    pub fn from_inference(request: &InferenceRequest, model: Option<&str>, stream: bool) -> Self {
        Self {
            model: model.map(str::to_owned),
            messages: request.messages.iter().map(WireMessage::from).collect(),
            max_tokens: request.max_tokens.map(i64::from),
            max_completion_tokens: None,
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed,
            stop: (!request.stop.is_empty()).then(|| Stop::Many(request.stop.clone())),
            stream: stream.then_some(true),
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
            extra: Extra::new(),
        }
    }

    /// The crate's request type, validated; errors name the offending field.
    pub fn into_inference(self) -> Result<InferenceRequest> {
        let messages = self
            .messages
            .into_iter()
            .map(|message| {
                let role = match message.role.as_str() {
                    "system" | "developer" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    "tool" => Role::Tool,
                    other => {
                        return Err(Error::invalid_request(
                            "messages",
                            format!(
                                "has unknown role {other:?}; use system, user, assistant or tool"
                            ),
                        ));
                    }
                };
                if let Some(MessageContent::Parts(parts)) = &message.content
                    && let Some(part) = parts.iter().find(|part| part.kind != "text")
                {
                    return Err(Error::invalid_request(
                        "messages",
                        format!(
                            "has a `{}` content part; this server takes text only",
                            part.kind
                        ),
                    ));
                }
                let content = message
                    .content
                    .as_ref()
                    .map(MessageContent::text)
                    .unwrap_or_default();
                Ok(ChatMessage::new(role, content))
            })
            .collect::<Result<Vec<_>>>()?;
        refuse_unsupported(&self.extra)?;
        let max_tokens = match (
            token_limit("max_tokens", self.max_tokens)?,
            token_limit("max_completion_tokens", self.max_completion_tokens)?,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut request = InferenceRequest::new(messages);
        request.max_tokens = max_tokens;
        request.temperature = self.temperature;
        request.top_p = self.top_p;
        request.seed = self.seed;
        request.stop = self.stop.map(Stop::into_vec).unwrap_or_default();
        request.stream = self.stream.unwrap_or(false);
        request.validate()?;
        Ok(request)
    }

    /// Whether a streamed answer should end with a usage chunk.
    pub fn wants_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|options| options.include_usage)
    }
}

/// `max_tokens` or `max_completion_tokens`: unset or -1 (llama.cpp's "no
/// limit") is no limit; otherwise it must fit a `u32`.
fn token_limit(field: &'static str, value: Option<i64>) -> Result<Option<u32>> {
    match value {
        None | Some(-1) => Ok(None),
        Some(n) => u32::try_from(n).map(Some).map_err(|_| {
            Error::invalid_request(
                field,
                format!("must be between 1 and {}, got {n}", u32::MAX),
            )
        }),
    }
}

/// Request fields that only describe the caller and change nothing about the
/// answer: accepted and ignored.
const METADATA_FIELDS: &[&str] = &["user", "metadata", "store", "service_tier"];

/// Fields of the chat API this crate does not implement, with the values that
/// mean "not used" (so a client that always sends the defaults still works).
/// Anything else the request carries is refused rather than silently dropped:
/// a client that asks for two choices or JSON output must not get one plain
/// answer and a 200.
fn neutral(field: &str, value: &Value) -> bool {
    match field {
        "n" => value.as_u64() == Some(1),
        "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
        "tools" | "functions" => value.as_array().is_some_and(Vec::is_empty),
        "tool_choice" | "function_call" => value.as_str() == Some("none"),
        "parallel_tool_calls" => true,
        "logprobs" => value.as_bool() == Some(false),
        "top_logprobs" => value.as_u64() == Some(0),
        "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
        "logit_bias" => value.as_object().is_some_and(Map::is_empty),
        _ => false,
    }
}

fn refuse_unsupported(extra: &Extra) -> Result<()> {
    for (field, value) in extra {
        if value.is_null() || METADATA_FIELDS.contains(&field.as_str()) || neutral(field, value) {
            continue;
        }
        return Err(Error::invalid_request(
            field.clone(),
            format!(
                "is {value}, which this server does not implement; leave it out or send its default"
            ),
        ));
    }
    Ok(())
}

/// `POST /v1/chat/completions` response body (non-streamed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    /// Completion id.
    #[serde(default)]
    pub id: String,
    /// `chat.completion`.
    #[serde(default)]
    pub object: String,
    /// Unix time of creation.
    #[serde(default)]
    pub created: u64,
    /// The model that answered.
    #[serde(default)]
    pub model: String,
    /// The answers (one unless `n` was set).
    #[serde(default)]
    pub choices: Vec<Choice>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Engine extras, such as llama.cpp's `timings`.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One answer of a non-streamed response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Index among the choices.
    #[serde(default)]
    pub index: u32,
    /// The answer.
    #[serde(default)]
    pub message: ResponseMessage,
    /// Why generation ended.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

/// The assistant message of an answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponseMessage {
    /// `assistant`.
    #[serde(default)]
    pub role: String,
    /// The text, `null` for some tool calls.
    #[serde(default)]
    pub content: Option<String>,
}

impl ChatCompletionResponse {
    /// The crate's response type: the first choice, usage, and timings from
    /// llama.cpp's `timings` extra when present.
    pub fn into_inference(self) -> InferenceResponse {
        let timings = timings_from_extra(&self.extra);
        let choice = self.choices.into_iter().next().unwrap_or_default();
        let mut response = InferenceResponse::new(choice.message.content.unwrap_or_default());
        response.finish_reason = choice.finish_reason;
        response.usage = self.usage;
        response.timings = timings;
        response.model = (!self.model.is_empty()).then_some(self.model);
        response
    }

    /// The wire form of `response`.
    pub fn from_inference(
        response: &InferenceResponse,
        id: &str,
        model: &str,
        created: u64,
    ) -> Self {
        Self {
            id: id.to_owned(),
            object: "chat.completion".to_owned(),
            created,
            model: model.to_owned(),
            choices: vec![Choice {
                index: 0,
                message: ResponseMessage {
                    role: "assistant".to_owned(),
                    content: Some(response.content.clone()),
                },
                finish_reason: response.finish_reason.clone(),
            }],
            usage: response.usage,
            extra: Extra::new(),
        }
    }
}

/// One `data:` event of a streamed response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// Completion id, the same in every chunk.
    #[serde(default)]
    pub id: String,
    /// `chat.completion.chunk`.
    #[serde(default)]
    pub object: String,
    /// Unix time of creation.
    #[serde(default)]
    pub created: u64,
    /// The model that answers.
    #[serde(default)]
    pub model: String,
    /// Deltas; empty in the final usage chunk.
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Token counts, in the usage chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Engine extras (llama.cpp's `timings`) and, in an error event, `error`.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One choice's delta in a chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Index among the choices.
    #[serde(default)]
    pub index: u32,
    /// What is new.
    #[serde(default)]
    pub delta: Delta,
    /// Set on the last content chunk.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

/// The new part of the answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// `assistant`, in the first chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text; `null` or absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl ChatCompletionChunk {
    /// The text this chunk adds (empty when none).
    pub fn content(&self) -> &str {
        self.choices
            .first()
            .and_then(|choice| choice.delta.content.as_deref())
            .unwrap_or("")
    }

    /// The finish reason, on the chunk that ends the answer.
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.choices
            .first()
            .and_then(|choice| choice.finish_reason.as_ref())
    }

    /// llama.cpp's timings, when this chunk carries them.
    pub fn timings(&self) -> Option<Timings> {
        timings_from_extra(&self.extra)
    }

    /// An error reported inside the stream (`{"error": {...}}` as a data event).
    pub fn error(&self) -> Option<ErrorDetail> {
        let value = self.extra.get("error")?;
        serde_json::from_value::<ErrorField>(value.clone())
            .ok()
            .map(ErrorField::into_detail)
    }
}

/// An error response body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error, as an object or (vLLM's 401) a bare string.
    pub error: ErrorField,
}

/// The `error` field: an object, or a bare message string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ErrorField {
    /// The OpenAI shape.
    Detail(ErrorDetail),
    /// Just a message.
    Message(String),
}

impl ErrorField {
    /// The error as an object, whichever shape it came in.
    pub fn into_detail(self) -> ErrorDetail {
        match self {
            Self::Detail(detail) => detail,
            Self::Message(message) => ErrorDetail {
                message,
                ..ErrorDetail::default()
            },
        }
    }
}

/// The OpenAI error object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong.
    #[serde(default)]
    pub message: String,
    /// The error type (`invalid_request_error`, `exceed_context_size_error`, ...).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The offending parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// A code: llama.cpp and vLLM send the HTTP status as a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Value>,
    /// Engine extras (llama.cpp's `n_prompt_tokens`, `n_ctx`).
    #[serde(flatten)]
    pub extra: Extra,
}

impl ErrorBody {
    /// An error body in the OpenAI shape.
    pub fn new(message: impl Into<String>, kind: impl Into<String>, status: u16) -> Self {
        Self {
            error: ErrorField::Detail(ErrorDetail {
                message: message.into(),
                kind: Some(kind.into()),
                param: None,
                code: Some(Value::from(status)),
                extra: Extra::new(),
            }),
        }
    }

    /// Turns an engine's error response into an [`Error`].
    ///
    /// The body is parsed leniently: an unparsable body becomes the message as
    /// text. llama.cpp's `exceed_context_size_error` becomes
    /// [`Error::ContextExceeded`] with the counts the engine gave.
    pub fn to_error(status: u16, body: &[u8]) -> Error {
        let detail = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(parsed) => parsed.error.into_detail(),
            Err(_) => ErrorDetail {
                message: String::from_utf8_lossy(body).trim().to_owned(),
                ..ErrorDetail::default()
            },
        };
        detail.into_error(status)
    }
}

impl ErrorDetail {
    /// Turns the detail into an [`Error`], given the HTTP status it came with.
    pub fn into_error(self, status: u16) -> Error {
        if self.kind.as_deref() == Some("exceed_context_size_error") {
            let number = |key: &str| self.extra.get(key).and_then(Value::as_u64);
            if let (Some(prompt_tokens), Some(context_size)) =
                (number("n_prompt_tokens"), number("n_ctx"))
            {
                return Error::ContextExceeded {
                    prompt_tokens,
                    context_size,
                };
            }
        }
        Error::Api {
            status,
            kind: self.kind,
            message: self.message,
        }
    }
}

/// Reads llama.cpp's `timings` object (`prompt_ms`, `prompt_per_second`,
/// `predicted_ms`, `predicted_per_second`).
fn timings_from_extra(extra: &Extra) -> Option<Timings> {
    let timings = extra.get("timings")?.as_object()?;
    let number = |key: &str| timings.get(key).and_then(Value::as_f64);
    let millis = |key: &str| {
        number(key)
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
    };
    let mut parsed = Timings::default();
    parsed.time_to_first_token = millis("prompt_ms");
    parsed.generation_time = millis("predicted_ms");
    parsed.prompt_tokens_per_second = number("prompt_per_second");
    parsed.tokens_per_second = number("predicted_per_second");
    Some(parsed)
}
