//! Anthropic's Messages API on the wire (`POST /v1/messages` and
//! `/v1/messages/count_tokens`), mapped onto `runtime-core`'s chat types so
//! that every engine, and the gateway, serves it through one
//! [`ModelService`](runtime_core::ModelService).
//!
//! Fail-closed like the chat API: a field is honoured or refused by name,
//! never accepted and dropped. `max_tokens` is required, as Anthropic
//! requires it. Content blocks are `text`, `tool_use` (assistant turns) and
//! `tool_result` (user turns); images, documents and thinking are refused.
//! Structured output is `output_config.format` (`json_schema`), or the older
//! `output_format`.
//!
//! One thing the engines do not report: which stop sequence ended an answer.
//! An answer that stopped (at its end or at a stop sequence) reports
//! `stop_reason: "end_turn"` and `stop_sequence: null`.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use runtime_core::{
    ChatMessage, Error, FinishReason, InferenceRequest, InferenceResponse, ResponseFormat, Result,
    Role, StreamEvent, Tool, ToolCall, ToolChoice, Usage,
};

use crate::wire::Extra;

/// `POST /v1/messages` request body (and, without `max_tokens`,
/// `/v1/messages/count_tokens`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessagesRequest {
    /// The model to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The most tokens to generate: required by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// The conversation, alternating `user` and `assistant` turns.
    #[serde(default)]
    pub messages: Vec<AnthropicMessage>,
    /// The system prompt: a string or a list of text blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Content>,
    /// `[{"name", "description", "input_schema"}]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name"?, "disable_parallel_tool_use"?}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Strings that end the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Whether to stream the answer as events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// `{"format": {"type": "json_schema", "schema": {...}}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_config: Option<Value>,
    /// The older form of `output_config.format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_format: Option<Value>,
    /// Fields this crate does not model: refused unless they change nothing.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnthropicMessage {
    /// `user` or `assistant`.
    pub role: String,
    /// A string or a list of content blocks.
    pub content: Content,
}

/// Content: a string, or a list of blocks (kept as JSON, read by `type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content blocks.
    Blocks(Vec<Value>),
}

/// Fields that describe the caller or hint at how to serve it (prompt
/// caching, which our engines do or not on their own; where and how fast to
/// run) and change nothing about the answer.
const METADATA_FIELDS: &[&str] = &[
    "metadata",
    "service_tier",
    "cache_control",
    "inference_geo",
    "speed",
    "diagnostics",
    "user_profile_id",
    "workspace_id",
];

fn refuse_unsupported(extra: &Extra) -> Result<()> {
    for (field, value) in extra {
        let neutral = value.is_null()
            || METADATA_FIELDS.contains(&field.as_str())
            || (field == "thinking"
                && value.get("type").and_then(Value::as_str) == Some("disabled"));
        if neutral {
            continue;
        }
        let how = match field.as_str() {
            "top_k" => "top-k sampling is not implemented; use `top_p`",
            "thinking" => "extended thinking is not served; leave it out or disable it",
            _ => "this server does not implement it; leave it out",
        };
        return Err(Error::invalid_request(
            field.clone(),
            format!("is {value}: {how}"),
        ));
    }
    Ok(())
}

fn text_of_blocks(field: &str, blocks: &[Value]) -> Result<String> {
    let mut text = String::new();
    for (j, block) in blocks.iter().enumerate() {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            other => {
                return Err(Error::invalid_request(
                    format!("{field}[{j}]"),
                    format!(
                        "is a {} block where only text blocks are taken",
                        other.map_or("untyped".to_owned(), |kind| format!("`{kind}`"))
                    ),
                ));
            }
        }
    }
    Ok(text)
}

/// One turn as chat messages: an assistant turn is one message (its text and
/// its calls); a user turn is its tool results, one message each, then its
/// text, if any.
fn turn_to_chat(index: usize, turn: AnthropicMessage, out: &mut Vec<ChatMessage>) -> Result<()> {
    let field = format!("messages[{index}]");
    let role = match turn.role.as_str() {
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "system" => Role::System,
        other => {
            return Err(Error::invalid_request(
                format!("{field}.role"),
                format!("is {other:?}; use `user` or `assistant` (the system prompt is `system`)"),
            ));
        }
    };
    let blocks = match turn.content {
        Content::Text(text) => {
            out.push(ChatMessage::new(role, text));
            return Ok(());
        }
        Content::Blocks(blocks) => blocks,
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.into_iter().enumerate() {
        let at = format!("{field}.content[{j}]");
        let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
        match (kind, &role) {
            ("text", _) => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            ("tool_use", Role::Assistant) => {
                let string = |key: &str| {
                    block
                        .get(key)
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| Error::invalid_request(format!("{at}.{key}"), "is missing"))
                };
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                if !input.is_object() {
                    return Err(Error::invalid_request(
                        format!("{at}.input"),
                        "must be a JSON object",
                    ));
                }
                calls.push(ToolCall::new(
                    string("id")?,
                    string("name")?,
                    input.to_string(),
                ));
            }
            ("tool_result", Role::User) => {
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        Error::invalid_request(format!("{at}.tool_use_id"), "is missing")
                    })?;
                let mut result = match block.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(text)) => text.clone(),
                    Some(Value::Array(parts)) => text_of_blocks(&format!("{at}.content"), parts)?,
                    Some(other) => {
                        return Err(Error::invalid_request(
                            format!("{at}.content"),
                            format!("is {other}; send a string or text blocks"),
                        ));
                    }
                };
                // The model learns the tool failed the way it reads any result.
                if block.get("is_error").and_then(Value::as_bool) == Some(true) {
                    result = format!("Error: {result}");
                }
                out.push(ChatMessage::tool_result(id, result));
            }
            ("tool_use" | "tool_result", _) => {
                return Err(Error::invalid_request(
                    at,
                    format!(
                        "is a `{kind}` block in a {} turn; tool_use belongs to assistant turns \
                         and tool_result to user turns",
                        turn.role
                    ),
                ));
            }
            _ => {
                return Err(Error::invalid_request(
                    at,
                    format!(
                        "is a `{kind}` block; this server takes text, tool_use and tool_result \
                         blocks"
                    ),
                ));
            }
        }
    }
    if !calls.is_empty() {
        let mut message = ChatMessage::assistant_calls(calls);
        message.content = text;
        out.push(message);
    } else if !text.is_empty() || out.last().is_none_or(|m| m.role != Role::Tool) {
        out.push(ChatMessage::new(role, text));
    }
    Ok(())
}

fn tool_from_wire(index: usize, value: &Value) -> Result<Tool> {
    let field = |name: &str| format!("tools[{index}]{name}");
    if let Some(kind) = value.get("type").and_then(Value::as_str)
        && kind != "custom"
    {
        return Err(Error::invalid_request(
            field(".type"),
            format!("is `{kind}`; only client tools (`custom`, or no type) are served"),
        ));
    }
    let name = value
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::invalid_request(field(".name"), "is missing"))?;
    let schema = value.get("input_schema").cloned().ok_or_else(|| {
        Error::invalid_request(
            field(".input_schema"),
            "is missing; send the JSON Schema of the tool's input",
        )
    })?;
    let mut tool = Tool::function(name, schema);
    tool.description = value
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_owned);
    tool.strict = value
        .get("strict")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(tool)
}

/// The tool choice and whether parallel calls are allowed.
fn tool_choice_from_wire(value: &Value) -> Result<(Option<ToolChoice>, Option<bool>)> {
    let refuse = || {
        Error::invalid_request(
            "tool_choice",
            format!(
                "is {value}; use {{\"type\": \"auto\"}}, {{\"type\": \"any\"}}, \
                 {{\"type\": \"tool\", \"name\": ...}} or {{\"type\": \"none\"}}"
            ),
        )
    };
    if value.is_null() {
        return Ok((None, None));
    }
    let choice = match value.get("type").and_then(Value::as_str) {
        Some("auto") => ToolChoice::Auto,
        Some("any") => ToolChoice::Required,
        Some("none") => ToolChoice::None,
        Some("tool") => ToolChoice::Function(
            value
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(refuse)?
                .to_owned(),
        ),
        _ => return Err(refuse()),
    };
    let parallel = value
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .map(|disabled| !disabled);
    Ok((Some(choice), parallel))
}

fn format_from_wire(field: &str, format: &Value) -> Result<ResponseFormat> {
    match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            let schema = format.get("schema").cloned().ok_or_else(|| {
                Error::invalid_request(
                    format!("{field}.schema"),
                    "is missing; send the JSON Schema the answer must follow",
                )
            })?;
            Ok(ResponseFormat::JsonSchema {
                name: "output".to_owned(),
                schema,
                strict: true,
            })
        }
        _ => Err(Error::invalid_request(
            field.to_owned(),
            format!("is {format}; use {{\"type\": \"json_schema\", \"schema\": {{...}}}}"),
        )),
    }
}

fn output_format(config: Option<&Value>, older: Option<&Value>) -> Result<Option<ResponseFormat>> {
    if let Some(config) = config.filter(|c| !c.is_null()) {
        let Some(object) = config.as_object() else {
            return Err(Error::invalid_request(
                "output_config",
                "must be an object such as {\"format\": {\"type\": \"json_schema\", ...}}",
            ));
        };
        if let Some((key, _)) = object.iter().find(|(k, v)| *k != "format" && !v.is_null()) {
            return Err(Error::invalid_request(
                format!("output_config.{key}"),
                "is not implemented by this server; leave it out",
            ));
        }
        if let Some(format) = object.get("format").filter(|f| !f.is_null()) {
            return format_from_wire("output_config.format", format).map(Some);
        }
    }
    match older.filter(|f| !f.is_null()) {
        Some(format) => format_from_wire("output_format", format).map(Some),
        None => Ok(None),
    }
}

impl MessagesRequest {
    /// The chat request this asks for, validated; errors name the field.
    ///
    /// `counting` is for `/v1/messages/count_tokens`, which takes no
    /// `max_tokens`.
    pub fn into_inference(self, counting: bool) -> Result<InferenceRequest> {
        refuse_unsupported(&self.extra)?;
        let max_tokens = match self.max_tokens {
            Some(n) if n >= 1 => Some(u32::try_from(n).map_err(|_| {
                Error::invalid_request("max_tokens", format!("must fit 32 bits, got {n}"))
            })?),
            Some(n) => {
                return Err(Error::invalid_request(
                    "max_tokens",
                    format!("must be at least 1, got {n}"),
                ));
            }
            None if counting => None,
            None => {
                return Err(Error::invalid_request(
                    "max_tokens",
                    "is required (as in Anthropic's API): the most tokens the answer may have",
                ));
            }
        };
        let mut messages = Vec::new();
        if let Some(system) = self.system {
            let text = match system {
                Content::Text(text) => text,
                Content::Blocks(blocks) => text_of_blocks("system", &blocks)?,
            };
            messages.push(ChatMessage::system(text));
        }
        for (index, turn) in self.messages.into_iter().enumerate() {
            turn_to_chat(index, turn, &mut messages)?;
        }
        let mut request = InferenceRequest::new(messages);
        request.max_tokens = max_tokens;
        request.temperature = self.temperature;
        request.top_p = self.top_p;
        request.stop = self.stop_sequences.unwrap_or_default();
        request.stream = self.stream.unwrap_or(false);
        request.tools = self
            .tools
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(index, tool)| tool_from_wire(index, tool))
            .collect::<Result<_>>()?;
        if let Some(choice) = &self.tool_choice {
            (request.tool_choice, request.parallel_tool_calls) = tool_choice_from_wire(choice)?;
        }
        request.response_format =
            output_format(self.output_config.as_ref(), self.output_format.as_ref())?;
        request.validate()?;
        Ok(request)
    }
}

/// Anthropic's name for why an answer ended.
pub fn stop_reason(reason: Option<&FinishReason>) -> &'static str {
    match reason {
        Some(FinishReason::Length) => "max_tokens",
        Some(FinishReason::ToolCalls) => "tool_use",
        Some(FinishReason::ContentFilter) => "refusal",
        _ => "end_turn",
    }
}

/// A call's arguments as the `input` object of a `tool_use` block. The
/// runtime has checked them against the tool's schema, so they parse.
fn input_of(call: &ToolCall) -> Result<Value> {
    serde_json::from_str(&call.arguments).map_err(|err| {
        Error::output_invalid(
            format!("the arguments of {}", call.name),
            format!("not JSON: {err}"),
        )
    })
}

fn usage_of(usage: Option<&Usage>) -> Value {
    let (input, output) = usage.map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
    json!({"input_tokens": input, "output_tokens": output})
}

/// The `message` object of a whole answer.
pub fn message_from_inference(
    response: &InferenceResponse,
    id: &str,
    model: &str,
) -> Result<Value> {
    let mut content = Vec::new();
    if !response.content.is_empty() || response.tool_calls.is_empty() {
        content.push(json!({"type": "text", "text": response.content}));
    }
    for call in &response.tool_calls {
        content.push(json!({
            "type": "tool_use",
            "id": call.id,
            "name": call.name,
            "input": input_of(call)?,
        }));
    }
    Ok(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(response.finish_reason.as_ref()),
        "stop_sequence": null,
        "usage": usage_of(response.usage.as_ref()),
    }))
}

/// Anthropic's error `type` for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ if status < 500 => "invalid_request_error",
        _ => "api_error",
    }
}

/// An error body in Anthropic's shape.
pub fn error_body(status: u16, message: &str) -> Value {
    json!({
        "type": "error",
        "error": {"type": error_type(status), "message": message},
    })
}

/// Which content block is open in a streamed answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    None,
    Text,
    Call(u32),
}

/// Turns a chat event stream into the Messages API's events, as
/// `(event name, data)` pairs: `message_start`, then for each block
/// `content_block_start`, its deltas and `content_block_stop`, then
/// `message_delta` (stop reason and usage) and `message_stop`. An error ends
/// the events with an `error` event.
#[derive(Debug)]
pub struct MessagesStream {
    id: String,
    model: String,
    started: bool,
    /// `message_stop` or `error` went out: nothing follows it.
    done: bool,
    open: Open,
    blocks: u32,
    /// Tool calls started so far.
    calls: u32,
}

impl MessagesStream {
    /// The events of the answer `id` from `model`.
    pub fn new(id: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            model: model.into(),
            started: false,
            done: false,
            open: Open::None,
            blocks: 0,
            calls: 0,
        }
    }

    /// The events that open the stream.
    pub fn start(&mut self) -> Vec<(&'static str, Value)> {
        self.started = true;
        vec![(
            "message_start",
            json!({
                "type": "message_start",
                "message": {
                    "id": self.id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                },
            }),
        )]
    }

    fn close(&mut self, out: &mut Vec<(&'static str, Value)>) {
        if self.open != Open::None {
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": self.blocks - 1}),
            ));
            self.open = Open::None;
        }
    }

    fn open(&mut self, block: Open, content_block: Value, out: &mut Vec<(&'static str, Value)>) {
        self.close(out);
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": self.blocks, "content_block": content_block}),
        ));
        self.blocks += 1;
        self.open = block;
    }

    /// The events for one chat event.
    pub fn event(&mut self, event: StreamEvent) -> Vec<(&'static str, Value)> {
        if self.done {
            return Vec::new();
        }
        let mut out = if self.started {
            Vec::new()
        } else {
            self.start()
        };
        match event {
            StreamEvent::Delta(text) => {
                if text.is_empty() {
                    return out;
                }
                if self.open != Open::Text {
                    self.open(Open::Text, json!({"type": "text", "text": ""}), &mut out);
                }
                out.push((
                    "content_block_delta",
                    json!({
                        "type": "content_block_delta",
                        "index": self.blocks - 1,
                        "delta": {"type": "text_delta", "text": text},
                    }),
                ));
            }
            StreamEvent::ToolCall(piece) => {
                if piece.index < self.calls && self.open != Open::Call(piece.index) {
                    out.extend(self.error(
                        502,
                        "the model's engine sent the pieces of a tool call out of order",
                    ));
                    return out;
                }
                if self.open != Open::Call(piece.index) {
                    self.calls = piece.index + 1;
                    let block = json!({
                        "type": "tool_use",
                        "id": piece.id.clone().unwrap_or_default(),
                        "name": piece.name.clone().unwrap_or_default(),
                        "input": {},
                    });
                    self.open(Open::Call(piece.index), block, &mut out);
                }
                if !piece.arguments.is_empty() {
                    out.push((
                        "content_block_delta",
                        json!({
                            "type": "content_block_delta",
                            "index": self.blocks - 1,
                            "delta": {"type": "input_json_delta", "partial_json": piece.arguments},
                        }),
                    ));
                }
            }
            StreamEvent::Finished {
                finish_reason,
                usage,
                ..
            } => {
                if self.blocks == 0 {
                    // Every answer has a block, if an empty one.
                    self.open(Open::Text, json!({"type": "text", "text": ""}), &mut out);
                }
                self.close(&mut out);
                out.push((
                    "message_delta",
                    json!({
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": stop_reason(finish_reason.as_ref()),
                            "stop_sequence": null,
                        },
                        "usage": usage_of(usage.as_ref()),
                    }),
                ));
                out.push(("message_stop", json!({"type": "message_stop"})));
                self.done = true;
            }
            _ => {}
        }
        out
    }

    /// The event that ends a failed stream: `status` and `message` as the
    /// error response would carry them.
    pub fn error(&mut self, status: u16, message: &str) -> Vec<(&'static str, Value)> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        let mut out = if self.started {
            Vec::new()
        } else {
            self.start()
        };
        out.push(("error", error_body(status, message)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime_core::ToolCallDelta;

    fn request(body: Value) -> Result<InferenceRequest> {
        serde_json::from_value::<MessagesRequest>(body)
            .expect("a Messages body")
            .into_inference(false)
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidRequest { field, .. } => field.into_owned(),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn system_blocks_tool_use_and_tool_results_become_the_chat_history() {
        let chat = request(json!({
            "model": "m", "max_tokens": 64,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                    {"type": "text", "text": "And tomorrow?"}
                ]}
            ],
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"]
        }))
        .unwrap();
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(chat.messages[0].content, "Be brief.");
        assert_eq!(chat.messages[2].content, "Checking.");
        assert_eq!(
            chat.messages[2].tool_calls[0].arguments,
            r#"{"city":"Paris"}"#
        );
        assert_eq!(chat.messages[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(chat.messages[3].content, "18C");
        assert_eq!(chat.tool_choice, Some(ToolChoice::Required));
        assert_eq!(chat.parallel_tool_calls, Some(false));
        assert_eq!(chat.stop, ["END"]);
        assert_eq!(chat.max_tokens, Some(64));
    }

    #[test]
    fn max_tokens_is_required_except_when_counting() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(field_of(request(body.clone()).unwrap_err()), "max_tokens");
        let counted = serde_json::from_value::<MessagesRequest>(body)
            .unwrap()
            .into_inference(true)
            .unwrap();
        assert_eq!(counted.max_tokens, None);
    }

    #[test]
    fn what_is_not_served_is_refused_by_name() {
        let base = |extra: (&str, Value)| {
            let mut body = json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
            body[extra.0] = extra.1;
            request(body)
        };
        assert_eq!(field_of(base(("top_k", json!(5))).unwrap_err()), "top_k");
        assert_eq!(
            field_of(
                base((
                    "thinking",
                    json!({"type": "enabled", "budget_tokens": 1024})
                ))
                .unwrap_err()
            ),
            "thinking"
        );
        base(("thinking", json!({"type": "disabled"}))).unwrap();
        base(("metadata", json!({"user_id": "u"}))).unwrap();
        let image = request(
            json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": "http://x"}}
            ]}]}),
        );
        assert_eq!(field_of(image.unwrap_err()), "messages[0].content[0]");
        let server_tool = base((
            "tools",
            json!([{"type": "web_search_20250305", "name": "web_search"}]),
        ));
        assert_eq!(field_of(server_tool.unwrap_err()), "tools[0].type");
    }

    #[test]
    fn output_config_asks_for_a_schema() {
        let chat = request(json!({"model": "m", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}))
        .unwrap();
        assert!(matches!(
            chat.response_format,
            Some(ResponseFormat::JsonSchema { .. })
        ));
        let effort = request(json!({"model": "m", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
            "output_config": {"effort": "high"}}));
        assert_eq!(field_of(effort.unwrap_err()), "output_config.effort");
    }

    #[test]
    fn a_whole_answer_has_text_and_tool_use_blocks_with_parsed_input() {
        let mut response = InferenceResponse::new("");
        response.tool_calls = vec![ToolCall::new("call_1", "weather", r#"{"city":"Paris"}"#)];
        response.finish_reason = Some(FinishReason::ToolCalls);
        response.usage = Some(Usage::new(12, 7));
        let message = message_from_inference(&response, "msg_1", "m").unwrap();
        assert_eq!(message["content"][0]["type"], "tool_use");
        assert_eq!(message["content"][0]["input"]["city"], "Paris");
        assert_eq!(message["stop_reason"], "tool_use");
        assert_eq!(
            message["usage"],
            json!({"input_tokens": 12, "output_tokens": 7})
        );
        let text = message_from_inference(&InferenceResponse::new("Paris."), "msg_2", "m").unwrap();
        assert_eq!(text["content"], json!([{"type": "text", "text": "Paris."}]));
    }

    #[test]
    fn stream_events_come_in_the_order_the_sdk_accumulates() {
        let mut stream = MessagesStream::new("msg_1", "m");
        let mut names = Vec::new();
        let mut events = Vec::new();
        for event in [
            StreamEvent::Delta("Let me check.".into()),
            StreamEvent::ToolCall(ToolCallDelta::start(0, "call_1", "weather")),
            StreamEvent::ToolCall(ToolCallDelta::arguments(0, r#"{"city":"#)),
            StreamEvent::ToolCall(ToolCallDelta::arguments(0, r#""Paris"}"#)),
            StreamEvent::Finished {
                finish_reason: Some(FinishReason::ToolCalls),
                usage: Some(Usage::new(5, 9)),
                timings: None,
            },
        ] {
            for (name, data) in stream.event(event) {
                assert_eq!(data["type"], name, "each event's data names it");
                names.push(name);
                events.push(data);
            }
        }
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[4]["index"], 1);
        assert_eq!(events[4]["content_block"]["name"], "weather");
        assert_eq!(events[8]["delta"]["stop_reason"], "tool_use");
        assert_eq!(events[8]["usage"]["output_tokens"], 9);
    }

    #[test]
    fn out_of_order_call_pieces_end_the_stream_and_nothing_follows_the_end() {
        let mut stream = MessagesStream::new("msg_1", "m");
        let _ = stream.event(StreamEvent::ToolCall(ToolCallDelta::start(
            0, "call_1", "f",
        )));
        let _ = stream.event(StreamEvent::Delta("text".into()));
        let late = stream.event(StreamEvent::ToolCall(ToolCallDelta::arguments(0, "{}")));
        assert_eq!(late.last().unwrap().0, "error");
        assert!(stream.event(StreamEvent::Delta("more".into())).is_empty());
        let mut whole = MessagesStream::new("msg_2", "m");
        let _ = whole.event(StreamEvent::Finished {
            finish_reason: None,
            usage: None,
            timings: None,
        });
        assert!(
            whole.error(503, "late").is_empty(),
            "nothing after message_stop"
        );
    }

    #[test]
    fn an_error_mid_stream_is_an_error_event() {
        let mut stream = MessagesStream::new("msg_1", "m");
        let _ = stream.event(StreamEvent::Delta("x".into()));
        let out = stream.error(503, "the server is shutting down");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, "error");
        assert_eq!(out[0].1["error"]["type"], "overloaded_error");
    }
}
