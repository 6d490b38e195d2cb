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
    ChatMessage, Choice as Answer, Error, FinishReason, InferenceRequest, InferenceResponse,
    ResponseFormat, Result, Role, Timings, TokenLogprob, Tool, ToolCall, ToolCallDelta, ToolChoice,
    TopLogprob, Usage,
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
    /// Functions the model may call: `[{"type":"function","function":{...}}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// `"none"`, `"auto"`, `"required"` or `{"type":"function","function":{"name":...}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Whether an answer may call several tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type":"text"}`, `{"type":"json_object"}` or
    /// `{"type":"json_schema","json_schema":{"name":...,"schema":...}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Report each token's log-probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// Alternatives per token, with `logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<i64>,
    /// How many answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<i64>,
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
    pub(crate) fn into_vec(self) -> Vec<String> {
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
    /// The calls an assistant message made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<WireToolCall>>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// A tool call on the wire: `{"id","type":"function","function":{"name","arguments"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireToolCall {
    /// The call's id.
    #[serde(default)]
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: WireFunctionCall,
}

/// The function part of a tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments as JSON text. Some engines send an object: it is
    /// taken as its JSON text.
    #[serde(deserialize_with = "arguments_text")]
    pub arguments: String,
}

fn function_type() -> String {
    "function".to_owned()
}

/// Arguments are JSON text; an object (as some engines send) is written out.
fn arguments_text<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(text) => text,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

impl From<&ToolCall> for WireToolCall {
    fn from(call: &ToolCall) -> Self {
        Self {
            id: call.id.clone(),
            kind: function_type(),
            function: WireFunctionCall {
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            },
        }
    }
}

impl From<WireToolCall> for ToolCall {
    fn from(call: WireToolCall) -> Self {
        ToolCall::new(call.id, call.function.name, call.function.arguments)
    }
}

/// A piece of a tool call in a stream chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireToolCallDelta {
    /// Which call of the answer.
    #[serde(default)]
    pub index: u32,
    /// The call's id, in its first piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function`, in its first piece.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The name (first piece) and an arguments fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<WireFunctionDelta>,
}

/// The function part of a tool-call piece.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFunctionDelta {
    /// The name, in the first piece.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A fragment of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

impl From<&ToolCallDelta> for WireToolCallDelta {
    fn from(delta: &ToolCallDelta) -> Self {
        Self {
            index: delta.index,
            id: delta.id.clone(),
            kind: delta.id.as_ref().map(|_| function_type()),
            function: Some(WireFunctionDelta {
                name: delta.name.clone(),
                arguments: Some(delta.arguments.clone()),
            }),
        }
    }
}

impl From<WireToolCallDelta> for ToolCallDelta {
    fn from(delta: WireToolCallDelta) -> Self {
        let (name, arguments) = delta
            .function
            .map(|f| (f.name, f.arguments.unwrap_or_default()))
            .unwrap_or_default();
        let mut out = ToolCallDelta::arguments(delta.index, arguments);
        out.id = delta.id;
        out.name = name;
        out
    }
}

/// `logprobs` of a choice: `{"content":[...],"refusal":null}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WireLogprobs {
    /// One entry per generated token.
    #[serde(default)]
    pub content: Option<Vec<WireTokenLogprob>>,
    /// Always null here.
    #[serde(default)]
    pub refusal: Option<Vec<WireTokenLogprob>>,
}

/// One token's log-probability on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability (a very negative finite number for "impossible").
    pub logprob: f64,
    /// Its bytes, or null.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    /// The most likely tokens at its position.
    #[serde(default)]
    pub top_logprobs: Vec<WireTopLogprob>,
}

/// An alternative token on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its bytes, or null.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
}

/// JSON has no infinity: an impossible token is reported with the lowest
/// finite `f32`, as llama.cpp does.
fn finite(logprob: f32) -> f64 {
    if logprob.is_finite() {
        f64::from(logprob)
    } else {
        f64::from(f32::MIN)
    }
}

impl WireLogprobs {
    /// The wire form of `tokens`.
    pub fn from_tokens(tokens: &[TokenLogprob]) -> Self {
        Self {
            content: Some(
                tokens
                    .iter()
                    .map(|token| WireTokenLogprob {
                        token: token.token.clone(),
                        logprob: finite(token.logprob),
                        bytes: token.bytes.clone(),
                        top_logprobs: token
                            .top_logprobs
                            .iter()
                            .map(|top| WireTopLogprob {
                                token: top.token.clone(),
                                logprob: finite(top.logprob),
                                bytes: top.bytes.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
            ),
            refusal: None,
        }
    }

    /// The crate's form.
    pub fn into_tokens(self) -> Vec<TokenLogprob> {
        self.content
            .unwrap_or_default()
            .into_iter()
            .map(|token| {
                let mut out = TokenLogprob::new(
                    token.token,
                    token.logprob as f32,
                    token
                        .top_logprobs
                        .into_iter()
                        .map(|top| {
                            let mut alt = TopLogprob::new(top.token, top.logprob as f32);
                            alt.bytes = top.bytes;
                            alt
                        })
                        .collect(),
                );
                out.bytes = token.bytes;
                out
            })
            .collect()
    }
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
        let calls = !message.tool_calls.is_empty();
        Self {
            role: message.role.as_str().to_owned(),
            // An assistant message that only calls tools has no content.
            content: (!(calls && message.content.is_empty()))
                .then(|| MessageContent::Text(message.content.clone())),
            tool_calls: calls.then(|| message.tool_calls.iter().map(WireToolCall::from).collect()),
            tool_call_id: message.tool_call_id.clone(),
        }
    }
}

/// The wire form of a tool.
pub fn tool_to_wire(tool: &Tool) -> Value {
    let mut function = Map::new();
    function.insert("name".to_owned(), tool.name.clone().into());
    if let Some(description) = &tool.description {
        function.insert("description".to_owned(), description.clone().into());
    }
    function.insert("parameters".to_owned(), tool.parameters_schema());
    if tool.strict {
        function.insert("strict".to_owned(), true.into());
    }
    serde_json::json!({"type": "function", "function": function})
}

/// The wire form of a tool choice.
pub fn tool_choice_to_wire(choice: &ToolChoice) -> Value {
    match choice {
        ToolChoice::None => "none".into(),
        ToolChoice::Auto => "auto".into(),
        ToolChoice::Required => "required".into(),
        ToolChoice::Function(name) => {
            serde_json::json!({"type": "function", "function": {"name": name}})
        }
        _ => "auto".into(),
    }
}

/// The wire form of a response format.
pub fn response_format_to_wire(format: &ResponseFormat) -> Value {
    match format {
        ResponseFormat::JsonObject => serde_json::json!({"type": "json_object"}),
        ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        } => serde_json::json!({
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": strict},
        }),
        _ => serde_json::json!({"type": "text"}),
    }
}

fn tool_from_wire(index: usize, value: Value) -> Result<Tool> {
    let field = |name: &str| format!("tools[{index}]{name}");
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("function");
    if kind != "function" {
        return Err(Error::invalid_request(
            field(".type"),
            format!("is `{kind}`; only `function` tools are served"),
        ));
    }
    let function = value
        .get("function")
        .filter(|function| function.is_object())
        .ok_or_else(|| Error::invalid_request(field(".function"), "is missing"))?;
    function_tool(function, &field(".function"))
}

/// A function tool from its object (`name`, `description`, `parameters`,
/// `strict`), nested in chat's `tools` and flat in the Responses API's;
/// `at` names the object in errors.
pub(crate) fn function_tool(function: &Value, at: &str) -> Result<Tool> {
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::invalid_request(format!("{at}.name"), "is missing"))?;
    let mut tool = Tool::function(name, Value::Null);
    tool.parameters = function
        .get("parameters")
        .filter(|parameters| !parameters.is_null())
        .cloned();
    tool.description = function
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_owned);
    tool.strict = function
        .get("strict")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(tool)
}

fn tool_choice_from_wire(value: &Value) -> Result<Option<ToolChoice>> {
    tool_choice(
        value,
        |object| object.get("function")?.get("name")?.as_str(),
        "{\"type\": \"function\", \"function\": {\"name\": ...}}",
    )
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or a function object
/// (`{"type": "function", ...}`) whose name `name_of` reads; `form` is that
/// object's shape, for the error.
pub(crate) fn tool_choice(
    value: &Value,
    name_of: fn(&Value) -> Option<&str>,
    form: &str,
) -> Result<Option<ToolChoice>> {
    let refuse = || {
        Error::invalid_request(
            "tool_choice",
            format!("is {value}; use \"none\", \"auto\", \"required\" or {form}"),
        )
    };
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::String(text) => match text.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => return Err(refuse()),
        },
        Value::Object(object) if object.get("type").and_then(Value::as_str) == Some("function") => {
            ToolChoice::Function(name_of(value).ok_or_else(refuse)?.to_owned())
        }
        _ => return Err(refuse()),
    }))
}

fn response_format_from_wire(value: &Value) -> Result<Option<ResponseFormat>> {
    let kind = value.get("type").and_then(Value::as_str);
    Ok(match kind {
        None if value.is_null() => None,
        Some("text") => None,
        Some("json_object") => Some(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let spec = value.get("json_schema").ok_or_else(|| {
                Error::invalid_request("response_format.json_schema", "is missing")
            })?;
            let schema = spec.get("schema").cloned().ok_or_else(|| {
                Error::invalid_request(
                    "response_format.json_schema.schema",
                    "is missing; send the JSON Schema the answer must follow",
                )
            })?;
            let name = spec
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("response")
                .to_owned();
            let strict = spec.get("strict").and_then(Value::as_bool).unwrap_or(false);
            Some(ResponseFormat::JsonSchema {
                name,
                schema,
                strict,
            })
        }
        _ => {
            return Err(Error::invalid_request(
                "response_format",
                format!("is {value}; use type `text`, `json_object` or `json_schema`"),
            ));
        }
    })
}

impl ChatCompletionRequest {
    /// Asks for the conversation's final assistant message to be continued
    /// ([`InferenceRequest::prefill`]) in vLLM's words:
    /// `continue_final_message`, and no new turn opened. llama-server
    /// continues such a message by itself; other servers may refuse the
    /// fields, so only a client told to send them does.
    pub fn ask_to_continue_final_message(&mut self) {
        self.extra
            .insert("continue_final_message".to_owned(), Value::Bool(true));
        self.extra
            .insert("add_generation_prompt".to_owned(), Value::Bool(false));
    }

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
            tools: (!request.tools.is_empty())
                .then(|| request.tools.iter().map(tool_to_wire).collect()),
            tool_choice: request.tool_choice.as_ref().map(tool_choice_to_wire),
            parallel_tool_calls: request.parallel_tool_calls,
            response_format: request
                .response_format
                .as_ref()
                .filter(|format| !matches!(format, ResponseFormat::Text))
                .map(response_format_to_wire),
            logprobs: request.logprobs.then_some(true),
            top_logprobs: request
                .top_logprobs
                .filter(|_| request.logprobs)
                .map(i64::from),
            n: request.n.filter(|n| *n > 1).map(i64::from),
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
                let mut out = ChatMessage::new(role, content);
                out.tool_calls = message
                    .tool_calls
                    .unwrap_or_default()
                    .into_iter()
                    .map(ToolCall::from)
                    .collect();
                out.tool_call_id = message.tool_call_id;
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut extra = self.extra;
        check_prefill_fields(&mut extra, &messages)?;
        refuse_unsupported(&extra)?;
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
        request.tools = self
            .tools
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(index, tool)| tool_from_wire(index, tool))
            .collect::<Result<_>>()?;
        request.tool_choice = match &self.tool_choice {
            Some(choice) => tool_choice_from_wire(choice)?,
            None => None,
        };
        request.parallel_tool_calls = self.parallel_tool_calls;
        request.response_format = match &self.response_format {
            Some(format) => response_format_from_wire(format)?,
            None => None,
        };
        request.logprobs = self.logprobs.unwrap_or(false);
        request.top_logprobs = match self.top_logprobs {
            None => None,
            Some(top) => Some(u8::try_from(top).map_err(|_| {
                Error::invalid_request(
                    "top_logprobs",
                    format!(
                        "must be between 0 and {}, got {top}",
                        runtime_core::MAX_TOP_LOGPROBS
                    ),
                )
            })?),
        };
        request.n = match self.n {
            None => None,
            Some(n) => Some(u32::try_from(n).map_err(|_| {
                Error::invalid_request(
                    "n",
                    format!(
                        "must be between 1 and {}, got {n}",
                        runtime_core::MAX_CHOICES
                    ),
                )
            })?),
        };
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
        "functions" => value.as_array().is_some_and(Vec::is_empty),
        "function_call" => value.as_str() == Some("none"),
        "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
        "logit_bias" => value.as_object().is_some_and(Map::is_empty),
        _ => false,
    }
}

/// vLLM's `continue_final_message` and `add_generation_prompt` (taken out
/// of `extra`), accepted where they say what is done anyway: a trailing
/// assistant message is continued, any other conversation gets the
/// assistant's turn opened.
fn check_prefill_fields(extra: &mut Extra, messages: &[ChatMessage]) -> Result<()> {
    let continues = messages.last().is_some_and(ChatMessage::is_continuable);
    for (field, done) in [
        ("continue_final_message", continues),
        ("add_generation_prompt", !continues),
    ] {
        match extra.remove(field) {
            None | Some(Value::Null) => {}
            Some(Value::Bool(asked)) if asked == done => {}
            Some(value) => {
                return Err(Error::invalid_request(
                    field,
                    format!(
                        "is {value}, but a conversation that ends with an assistant message is \
                         always continued and any other gets the assistant's turn opened; \
                         leave it out"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn refuse_unsupported(extra: &Extra) -> Result<()> {
    for (field, value) in extra {
        if value.is_null() || METADATA_FIELDS.contains(&field.as_str()) || neutral(field, value) {
            continue;
        }
        if field == "functions" || field == "function_call" {
            return Err(Error::invalid_request(
                field.clone(),
                "is the deprecated form of tools; send `tools` and `tool_choice` instead",
            ));
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
    /// The tokens' log-probabilities, when asked (else null).
    #[serde(default)]
    pub logprobs: Option<WireLogprobs>,
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
    /// The tools the answer calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<WireToolCall>>,
    /// Always null: no answer is refused here. Sent so clients that read it
    /// (`parse()` helpers) find it.
    #[serde(default)]
    pub refusal: Option<String>,
}

impl Choice {
    fn into_answer(self) -> Answer {
        let mut answer = Answer::default();
        answer.content = self.message.content.unwrap_or_default();
        answer.tool_calls = self
            .message
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .map(ToolCall::from)
            .collect();
        answer.logprobs = self.logprobs.map(|logprobs| {
            let mut tokens = logprobs.into_tokens();
            // vLLM counts the stop token among the answer's (see the stream's
            // reader); it spells nothing of the content.
            let spelled: String = tokens.iter().map(|token| token.token.as_str()).collect();
            if self.finish_reason == Some(FinishReason::Stop)
                && let Some(last) = tokens.last()
                && spelled != answer.content
                && spelled.strip_suffix(last.token.as_str()) == Some(answer.content.as_str())
            {
                tokens.pop();
            }
            tokens
        });
        answer.finish_reason = self.finish_reason;
        answer
    }

    fn from_answer(index: u32, answer: &Answer) -> Self {
        let calls = !answer.tool_calls.is_empty();
        Self {
            index,
            message: ResponseMessage {
                role: "assistant".to_owned(),
                content: (!(calls && answer.content.is_empty())).then(|| answer.content.clone()),
                tool_calls: calls
                    .then(|| answer.tool_calls.iter().map(WireToolCall::from).collect()),
                refusal: None,
            },
            finish_reason: answer.finish_reason.clone(),
            logprobs: answer.logprobs.as_deref().map(WireLogprobs::from_tokens),
        }
    }
}

impl ChatCompletionResponse {
    /// The crate's response type: the first choice, usage, and timings from
    /// llama.cpp's `timings` extra when present.
    pub fn into_inference(self) -> InferenceResponse {
        let timings = timings_from_extra(&self.extra);
        let mut choices = self.choices;
        choices.sort_by_key(|choice| choice.index);
        let mut answers = choices.into_iter().map(Choice::into_answer);
        let mut response = answers.next().unwrap_or_default().into_response();
        response.alternatives = answers.collect();
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
            choices: response
                .choices()
                .iter()
                .zip(0..)
                .map(|(answer, index)| Choice::from_answer(index, answer))
                .collect(),
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
    /// The log-probabilities of this chunk's tokens, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<WireLogprobs>,
    /// New text of a legacy completion's chunk (`/v1/completions`), which
    /// has no `delta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
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
    /// Pieces of tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<WireToolCallDelta>>,
}

impl ChatCompletionChunk {
    /// The text this chunk adds (empty when none): a chat chunk's
    /// `delta.content`, or a legacy completion chunk's `text`.
    pub fn content(&self) -> &str {
        self.choices
            .first()
            .and_then(|choice| choice.delta.content.as_deref().or(choice.text.as_deref()))
            .unwrap_or("")
    }

    /// The tool-call pieces this chunk adds.
    pub fn tool_calls(&self) -> Vec<ToolCallDelta> {
        self.choices
            .first()
            .and_then(|choice| choice.delta.tool_calls.clone())
            .unwrap_or_default()
            .into_iter()
            .map(ToolCallDelta::from)
            .collect()
    }

    /// The log-probabilities of this chunk's tokens.
    pub fn logprobs(&self) -> Vec<TokenLogprob> {
        self.choices
            .first()
            .and_then(|choice| choice.logprobs.clone())
            .map(WireLogprobs::into_tokens)
            .unwrap_or_default()
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
