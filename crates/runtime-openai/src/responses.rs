//! OpenAI's Responses API on the wire (`POST /v1/responses`), mapped onto
//! `runtime-core`'s chat types so that every engine, and the gateway, serves
//! it through one [`ModelService`](runtime_core::ModelService); and the
//! bounded store that `store` and `previous_response_id` use.
//!
//! Fail-closed like the chat API: a field is honoured or refused by name.
//! Input is text or items (messages, `function_call`, `function_call_output`);
//! tools are function tools; `text.format` asks for structured output.
//! Stateless by default: a response is kept only when the request sets
//! `store: true`, for a bounded time and number ([`ResponseStore`]), and a
//! `previous_response_id` that is not kept (never stored, expired or
//! evicted) is refused with what to do instead.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use runtime_core::{
    ChatMessage, Error, FinishReason, InferenceRequest, InferenceResponse, ResponseFormat, Result,
    Role, StreamEvent, Tool, ToolCall, ToolChoice, Usage,
};

use crate::wire::{Extra, function_tool, tool_choice};

/// `POST /v1/responses` request body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponsesRequest {
    /// The model to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A string (one user message) or a list of input items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// The system prompt; not carried over by `previous_response_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// Function tools, flat: `{"type": "function", "name", "parameters", ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "name": ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Whether an answer may call several tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<Value>,
    /// The most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<i64>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Whether to stream the answer as events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Keep the response, so a later request can continue from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<bool>,
    /// Continue the conversation of a stored response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_response_id: Option<String>,
    /// The caller's tags, echoed in the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Fields this crate does not model: refused unless they change nothing.
    #[serde(flatten)]
    pub extra: Extra,
}

/// What a response echoes of its request, and how it continues.
#[derive(Debug, Clone, PartialEq)]
pub struct Echo {
    instructions: Option<String>,
    tools: Vec<Value>,
    tool_choice: Value,
    parallel_tool_calls: bool,
    text: Value,
    max_output_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    store: bool,
    previous_response_id: Option<String>,
    metadata: Value,
    /// The conversation without the instructions: what a stored response
    /// continues from, once the answer is added.
    pub conversation: Vec<ChatMessage>,
}

impl Echo {
    /// Whether the response is to be kept.
    pub fn store(&self) -> bool {
        self.store
    }
}

/// Fields that describe the caller or the transport and change nothing
/// about the answer.
const METADATA_FIELDS: &[&str] = &[
    "user",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "stream_options",
];

fn neutral(field: &str, value: &Value) -> bool {
    match field {
        "truncation" => value.as_str() == Some("disabled"),
        "include" => value.as_array().is_some_and(Vec::is_empty),
        "background" => value.as_bool() == Some(false),
        "top_logprobs" => value.as_u64() == Some(0),
        "reasoning" => value
            .as_object()
            .is_some_and(|r| r.values().all(Value::is_null)),
        _ => false,
    }
}

fn refuse_unsupported(extra: &Extra) -> Result<()> {
    for (field, value) in extra {
        if value.is_null() || METADATA_FIELDS.contains(&field.as_str()) || neutral(field, value) {
            continue;
        }
        let how = match field.as_str() {
            "truncation" => {
                "only `disabled` is served: a conversation that does not fit is refused"
            }
            "conversation" => {
                "conversations are not kept; use `previous_response_id` with `store: true`"
            }
            "background" => "background responses are not served; stream instead",
            "reasoning" => "reasoning settings are not served; leave them out",
            _ => "this server does not implement it; leave it out",
        };
        return Err(Error::invalid_request(
            field.clone(),
            format!("is {value}: {how}"),
        ));
    }
    Ok(())
}

fn text_of_parts(field: &str, content: &Value) -> Result<String> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (k, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""));
                    }
                    Some("refusal") => {
                        text.push_str(part.get("refusal").and_then(Value::as_str).unwrap_or(""));
                    }
                    other => {
                        return Err(Error::invalid_request(
                            format!("{field}[{k}]"),
                            format!(
                                "is a {} part; this server takes text only",
                                other.map_or("untyped".to_owned(), |kind| format!("`{kind}`"))
                            ),
                        ));
                    }
                }
            }
            Ok(text)
        }
        other => Err(Error::invalid_request(
            field.to_owned(),
            format!("is {other}; send a string or content parts"),
        )),
    }
}

/// Adds one input item to the conversation.
fn item_to_chat(index: usize, item: &Value, out: &mut Vec<ChatMessage>) -> Result<()> {
    let field = format!("input[{index}]");
    let string = |key: &str| {
        item.get(key)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::invalid_request(format!("{field}.{key}"), "is missing"))
    };
    let kind = item.get("type").and_then(Value::as_str);
    match kind {
        None | Some("message") => {
            let role = match string("role")?.as_str() {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "system" | "developer" => Role::System,
                other => {
                    return Err(Error::invalid_request(
                        format!("{field}.role"),
                        format!("is {other:?}; use user, assistant, system or developer"),
                    ));
                }
            };
            let content = text_of_parts(
                &format!("{field}.content"),
                item.get("content").unwrap_or(&Value::Null),
            )?;
            out.push(ChatMessage::new(role, content));
        }
        Some("function_call") => {
            let call = ToolCall::new(string("call_id")?, string("name")?, string("arguments")?);
            // Calls of one turn are one assistant message, after its text.
            match out.last_mut() {
                Some(last) if last.role == Role::Assistant => last.tool_calls.push(call),
                _ => out.push(ChatMessage::assistant_calls(vec![call])),
            }
        }
        Some("function_call_output") => {
            let output = text_of_parts(
                &format!("{field}.output"),
                item.get("output").unwrap_or(&Value::Null),
            )?;
            out.push(ChatMessage::tool_result(string("call_id")?, output));
        }
        Some(other) => {
            return Err(Error::invalid_request(
                format!("{field}.type"),
                format!(
                    "is `{other}`; this server takes `message`, `function_call` and \
                     `function_call_output` items"
                ),
            ));
        }
    }
    Ok(())
}

fn tool_from_wire(index: usize, value: &Value) -> Result<Tool> {
    let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "function" {
        return Err(Error::invalid_request(
            format!("tools[{index}].type"),
            format!("is `{kind}`; only `function` tools are served"),
        ));
    }
    function_tool(value, &format!("tools[{index}]"))
}

fn tool_choice_from_wire(value: &Value) -> Result<Option<ToolChoice>> {
    tool_choice(
        value,
        |object| object.get("name")?.as_str(),
        "{\"type\": \"function\", \"name\": ...}",
    )
}

fn format_from_wire(text: Option<&Value>) -> Result<Option<ResponseFormat>> {
    let Some(text) = text.filter(|t| !t.is_null()) else {
        return Ok(None);
    };
    if let Some(verbosity) = text.get("verbosity").filter(|v| !v.is_null()) {
        return Err(Error::invalid_request(
            "text.verbosity",
            format!("is {verbosity}, which this server does not implement; leave it out"),
        ));
    }
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    Ok(match format.get("type").and_then(Value::as_str) {
        Some("text") => None,
        Some("json_object") => Some(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let schema = format.get("schema").cloned().ok_or_else(|| {
                Error::invalid_request(
                    "text.format.schema",
                    "is missing; send the JSON Schema the answer must follow",
                )
            })?;
            Some(ResponseFormat::JsonSchema {
                name: format
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("response")
                    .to_owned(),
                schema,
                strict: format
                    .get("strict")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            })
        }
        _ => {
            return Err(Error::invalid_request(
                "text.format",
                format!("is {format}; use type `text`, `json_object` or `json_schema`"),
            ));
        }
    })
}

impl ResponsesRequest {
    /// The chat request this asks for, validated, and what the response
    /// echoes. `previous` is the stored conversation `previous_response_id`
    /// names (the caller looks it up: [`ResponseStore::conversation`]).
    pub fn into_inference(
        self,
        previous: Option<&[ChatMessage]>,
    ) -> Result<(InferenceRequest, Echo)> {
        refuse_unsupported(&self.extra)?;
        let mut conversation: Vec<ChatMessage> = previous.map(<[_]>::to_vec).unwrap_or_default();
        let stored = conversation.len();
        match self.input.as_ref() {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => conversation.push(ChatMessage::user(text.clone())),
            Some(Value::Array(items)) => {
                for (index, item) in items.iter().enumerate() {
                    item_to_chat(index, item, &mut conversation)?;
                }
            }
            Some(other) => {
                return Err(Error::invalid_request(
                    "input",
                    format!("is {other}; send a string or a list of input items"),
                ));
            }
        }
        if conversation.is_empty() {
            return Err(Error::invalid_request(
                "input",
                "is empty; send the text or the items to answer",
            ));
        }
        if previous.is_some() && conversation.len() == stored {
            // The stored answer would be last: continued, not answered.
            return Err(Error::invalid_request(
                "input",
                "is empty; with `previous_response_id`, send the next turn's text or items",
            ));
        }
        let mut messages = Vec::with_capacity(conversation.len() + 1);
        if let Some(instructions) = &self.instructions {
            messages.push(ChatMessage::system(instructions.clone()));
        }
        messages.extend(conversation.iter().cloned());
        let mut request = InferenceRequest::new(messages);
        request.max_tokens = match self.max_output_tokens {
            None => None,
            Some(n) => Some(u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                Error::invalid_request(
                    "max_output_tokens",
                    format!("must be between 1 and {}, got {n}", u32::MAX),
                )
            })?),
        };
        request.temperature = self.temperature;
        request.top_p = self.top_p;
        request.stream = self.stream.unwrap_or(false);
        let tools = self.tools.unwrap_or_default();
        request.tools = tools
            .iter()
            .enumerate()
            .map(|(index, tool)| tool_from_wire(index, tool))
            .collect::<Result<_>>()?;
        request.tool_choice = match &self.tool_choice {
            Some(choice) => tool_choice_from_wire(choice)?,
            None => None,
        };
        request.parallel_tool_calls = self.parallel_tool_calls;
        request.response_format = format_from_wire(self.text.as_ref())?;
        request.validate()?;
        let echo = Echo {
            instructions: self.instructions,
            tools,
            tool_choice: self.tool_choice.unwrap_or_else(|| json!("auto")),
            parallel_tool_calls: self.parallel_tool_calls.unwrap_or(true),
            text: self
                .text
                .filter(|t| t.get("format").is_some_and(|f| !f.is_null()))
                .unwrap_or_else(|| json!({"format": {"type": "text"}})),
            max_output_tokens: request.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            store: self.store.unwrap_or(false),
            previous_response_id: self.previous_response_id,
            metadata: self.metadata.unwrap_or_else(|| json!({})),
            conversation,
        };
        Ok((request, echo))
    }
}

fn usage_of(usage: Option<&Usage>) -> Value {
    let (input, output) = usage.map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output,
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "in_progress" {
        json!([])
    } else {
        json!([output_text(text)])
    };
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": content})
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn call_item(id: &str, call: &ToolCall, status: &str) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    })
}

/// The ids of a response's output items: `msg_…` and `fc_…` beside the
/// response's own `resp_…`.
fn item_id(response_id: &str, prefix: &str, index: usize) -> String {
    let suffix = response_id.strip_prefix("resp_").unwrap_or(response_id);
    format!("{prefix}_{suffix}_{index}")
}

/// A response object: what `POST /v1/responses` answers, what the stream's
/// `response.*` events carry, and what `GET /v1/responses/{id}` returns.
#[derive(Debug)]
struct ResponseObject<'a> {
    id: &'a str,
    model: &'a str,
    created_at: u64,
    echo: &'a Echo,
}

impl ResponseObject<'_> {
    fn render(
        &self,
        status: &str,
        output: Vec<Value>,
        finish: Option<&FinishReason>,
        usage: Option<Value>,
        error: Option<Value>,
    ) -> Value {
        let incomplete = match finish {
            Some(FinishReason::Length) => Some(json!({"reason": "max_output_tokens"})),
            Some(FinishReason::ContentFilter) => Some(json!({"reason": "content_filter"})),
            _ => None,
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": self.echo.instructions,
            "max_output_tokens": self.echo.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.echo.parallel_tool_calls,
            "previous_response_id": self.echo.previous_response_id,
            "reasoning": {"effort": null, "summary": null},
            "store": self.echo.store,
            "temperature": self.echo.temperature.unwrap_or(1.0),
            "text": self.echo.text,
            "tool_choice": self.echo.tool_choice,
            "tools": self.echo.tools,
            "top_p": self.echo.top_p.unwrap_or(1.0),
            "truncation": "disabled",
            "usage": usage,
            "user": null,
            "metadata": self.echo.metadata,
        })
    }
}

fn status_of(finish: Option<&FinishReason>) -> &'static str {
    match finish {
        Some(FinishReason::Length | FinishReason::ContentFilter) => "incomplete",
        _ => "completed",
    }
}

/// The response object of a whole answer.
pub fn response_from_inference(
    response: &InferenceResponse,
    echo: &Echo,
    id: &str,
    model: &str,
    created_at: u64,
) -> Value {
    let mut output = Vec::new();
    if !response.content.is_empty() || response.tool_calls.is_empty() {
        output.push(message_item(
            &item_id(id, "msg", 0),
            &response.content,
            "completed",
        ));
    }
    for call in &response.tool_calls {
        let index = output.len();
        output.push(call_item(&item_id(id, "fc", index), call, "completed"));
    }
    let status = status_of(response.finish_reason.as_ref());
    ResponseObject {
        id,
        model,
        created_at,
        echo,
    }
    .render(
        status,
        output,
        response.finish_reason.as_ref(),
        Some(usage_of(response.usage.as_ref())),
        None,
    )
}

/// The conversation a stored response continues: `conversation` (the
/// request's) with the answer as the assistant's turn; an answer that
/// continued a final assistant message (a prefill) completes that message.
pub fn with_answer(
    mut conversation: Vec<ChatMessage>,
    content: &str,
    calls: &[ToolCall],
) -> Vec<ChatMessage> {
    match conversation.last_mut() {
        Some(last) if last.is_continuable() => {
            last.content.push_str(content);
            last.tool_calls = calls.to_vec();
        }
        _ => {
            let mut turn = ChatMessage::assistant_calls(calls.to_vec());
            turn.content = content.to_owned();
            conversation.push(turn);
        }
    }
    conversation
}

/// Which output item is open in a streamed answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    None,
    Message(usize),
    Call { item: usize, call: usize },
}

/// Turns a chat event stream into the Responses API's events, as
/// `(event type, data)` pairs, numbered by `sequence_number`:
/// `response.created` and `response.in_progress`; for text
/// `response.output_item.added`, `response.content_part.added`,
/// `response.output_text.delta`s, then their `.done`s; for each call
/// `response.output_item.added`, `response.function_call_arguments.delta`s
/// and their `.done`s; then `response.completed` (or `response.incomplete`
/// when the answer reached `max_output_tokens`) with the whole response.
/// A failure ends the events with `response.failed`.
#[derive(Debug)]
pub struct ResponsesStream {
    id: String,
    model: String,
    created_at: u64,
    echo: Echo,
    sequence: u64,
    started: bool,
    /// A terminal event (`response.completed`, `.incomplete`, `.failed`)
    /// went out: nothing follows it.
    done: bool,
    open: Open,
    output: Vec<Value>,
    /// The open message item's text.
    item_text: String,
    /// All the answer's text, for the stored turn.
    content: String,
    calls: Vec<ToolCall>,
    completed: Option<Value>,
}

type Events = Vec<(&'static str, Value)>;

impl ResponsesStream {
    /// The events of the response `id` from `model`.
    pub fn new(
        id: impl Into<String>,
        model: impl Into<String>,
        created_at: u64,
        echo: Echo,
    ) -> Self {
        Self {
            id: id.into(),
            model: model.into(),
            created_at,
            echo,
            sequence: 0,
            started: false,
            done: false,
            open: Open::None,
            output: Vec::new(),
            item_text: String::new(),
            content: String::new(),
            calls: Vec::new(),
            completed: None,
        }
    }

    /// What the response echoes of its request.
    pub fn echo(&self) -> &Echo {
        &self.echo
    }

    fn object(&self) -> ResponseObject<'_> {
        ResponseObject {
            id: &self.id,
            model: &self.model,
            created_at: self.created_at,
            echo: &self.echo,
        }
    }

    fn push(&mut self, out: &mut Events, kind: &'static str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        out.push((kind, data));
    }

    fn begin(&mut self, out: &mut Events) {
        if self.started {
            return;
        }
        self.started = true;
        let snapshot = self
            .object()
            .render("in_progress", Vec::new(), None, None, None);
        self.push(
            out,
            "response.created",
            json!({"response": snapshot.clone()}),
        );
        self.push(out, "response.in_progress", json!({"response": snapshot}));
    }

    fn close(&mut self, out: &mut Events) {
        match self.open {
            Open::None => {}
            Open::Message(item) => {
                let item_id = item_id(&self.id, "msg", item);
                let text = std::mem::take(&mut self.item_text);
                let at = json!({"item_id": item_id, "output_index": item, "content_index": 0});
                let mut done = at.clone();
                done["text"] = json!(text);
                done["logprobs"] = json!([]);
                self.push(out, "response.output_text.done", done);
                let mut part = at;
                part["part"] = output_text(&text);
                self.push(out, "response.content_part.done", part);
                let finished = message_item(&item_id, &text, "completed");
                self.output[item] = finished.clone();
                self.push(
                    out,
                    "response.output_item.done",
                    json!({"output_index": item, "item": finished}),
                );
            }
            Open::Call { item, call } => {
                let item_id = item_id(&self.id, "fc", item);
                let call = self.calls[call].clone();
                self.push(
                    out,
                    "response.function_call_arguments.done",
                    json!({
                        "item_id": item_id,
                        "output_index": item,
                        "name": call.name,
                        "arguments": call.arguments,
                    }),
                );
                let finished = call_item(&item_id, &call, "completed");
                self.output[item] = finished.clone();
                self.push(
                    out,
                    "response.output_item.done",
                    json!({"output_index": item, "item": finished}),
                );
            }
        }
        self.open = Open::None;
    }

    /// The events that open the stream.
    pub fn start(&mut self) -> Events {
        let mut out = Vec::new();
        self.begin(&mut out);
        out
    }

    /// The events for one chat event.
    ///
    /// # Errors
    ///
    /// A tool call piece out of order ([`Error::StreamProtocol`]).
    pub fn event(&mut self, event: StreamEvent) -> Result<Events> {
        let mut out = Vec::new();
        if self.done {
            return Ok(out);
        }
        self.begin(&mut out);
        match event {
            StreamEvent::Delta(text) => {
                if text.is_empty() {
                    return Ok(out);
                }
                if !matches!(self.open, Open::Message(_)) {
                    self.close(&mut out);
                    let item = self.output.len();
                    let item_id = item_id(&self.id, "msg", item);
                    let added = message_item(&item_id, "", "in_progress");
                    self.output.push(added.clone());
                    self.push(
                        &mut out,
                        "response.output_item.added",
                        json!({"output_index": item, "item": added}),
                    );
                    self.push(
                        &mut out,
                        "response.content_part.added",
                        json!({"item_id": item_id, "output_index": item, "content_index": 0,
                               "part": {"type": "output_text", "text": "", "annotations": []}}),
                    );
                    self.open = Open::Message(item);
                }
                let Open::Message(item) = self.open else {
                    unreachable!("a message item was just opened")
                };
                self.item_text.push_str(&text);
                self.content.push_str(&text);
                self.push(
                    &mut out,
                    "response.output_text.delta",
                    json!({"item_id": item_id(&self.id, "msg", item), "output_index": item,
                           "content_index": 0, "delta": text, "logprobs": []}),
                );
            }
            StreamEvent::ToolCall(piece) => {
                let call = piece.index as usize;
                let open_now = matches!(self.open, Open::Call { call: open, .. } if open == call);
                if call < self.calls.len() && !open_now {
                    return Err(Error::StreamProtocol(format!(
                        "a piece of tool call {call} came after the answer moved on"
                    )));
                }
                let arguments = piece.arguments.clone();
                piece.apply_to(&mut self.calls)?;
                if !matches!(self.open, Open::Call { call: open, .. } if open == call) {
                    self.close(&mut out);
                    let item = self.output.len();
                    let mut started = self.calls[call].clone();
                    started.arguments.clear();
                    let added = call_item(&item_id(&self.id, "fc", item), &started, "in_progress");
                    self.output.push(added.clone());
                    self.push(
                        &mut out,
                        "response.output_item.added",
                        json!({"output_index": item, "item": added}),
                    );
                    self.open = Open::Call { item, call };
                }
                let Open::Call { item, .. } = self.open else {
                    unreachable!("a call item was just opened")
                };
                if !arguments.is_empty() {
                    self.push(
                        &mut out,
                        "response.function_call_arguments.delta",
                        json!({"item_id": item_id(&self.id, "fc", item), "output_index": item,
                               "delta": arguments}),
                    );
                }
            }
            StreamEvent::Finished {
                finish_reason,
                usage,
                ..
            } => {
                if self.output.is_empty() {
                    // Every answer has an item, if an empty message.
                    let item = self.output.len();
                    self.output.push(message_item(
                        &item_id(&self.id, "msg", item),
                        "",
                        "completed",
                    ));
                    self.push(
                        &mut out,
                        "response.output_item.added",
                        json!({"output_index": item, "item": self.output[item]}),
                    );
                    self.push(
                        &mut out,
                        "response.output_item.done",
                        json!({"output_index": item, "item": self.output[item]}),
                    );
                }
                self.close(&mut out);
                let status = status_of(finish_reason.as_ref());
                let whole = self.object().render(
                    status,
                    self.output.clone(),
                    finish_reason.as_ref(),
                    Some(usage_of(usage.as_ref())),
                    None,
                );
                self.completed = Some(whole.clone());
                self.done = true;
                let kind = if status == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                self.push(&mut out, kind, json!({"response": whole}));
            }
            _ => {}
        }
        Ok(out)
    }

    /// The event that ends a failed stream: `code` and `message` as the
    /// error response would carry them.
    pub fn error(&mut self, code: &str, message: &str) -> Events {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        self.done = true;
        self.begin(&mut out);
        let failed = self.object().render(
            "failed",
            self.output.clone(),
            None,
            None,
            Some(json!({"code": code, "message": message})),
        );
        self.push(&mut out, "response.failed", json!({"response": failed}));
        out
    }

    /// Once the stream completed: the whole response, and the conversation
    /// it continues (the request's, then the answer).
    pub fn completed(&self) -> Option<(Value, Vec<ChatMessage>)> {
        let response = self.completed.clone()?;
        let conversation = with_answer(self.echo.conversation.clone(), &self.content, &self.calls);
        Some((response, conversation))
    }
}

/// How many responses a [`ResponseStore`] keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// The most responses kept; the oldest goes first.
    pub capacity: usize,
    /// The most bytes of conversation kept, all responses together.
    pub max_bytes: usize,
    /// How long a response is kept.
    pub ttl: Duration,
}

impl Default for StoreLimits {
    /// 1024 responses, 64 MiB, one hour.
    fn default() -> Self {
        Self {
            capacity: 1024,
            max_bytes: 64 << 20,
            ttl: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug)]
struct Stored {
    at: Instant,
    bytes: usize,
    response: Arc<Value>,
    conversation: Arc<Vec<ChatMessage>>,
}

#[derive(Debug, Default)]
struct Entries {
    by_id: HashMap<String, Stored>,
    order: VecDeque<String>,
    bytes: usize,
}

/// The responses kept for `previous_response_id` and `GET /v1/responses/{id}`:
/// in memory, bounded in number, bytes and age ([`StoreLimits`]).
#[derive(Debug, Default)]
pub struct ResponseStore {
    limits: StoreLimits,
    entries: Mutex<Entries>,
}

impl ResponseStore {
    /// An empty store with these limits.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            entries: Mutex::new(Entries::default()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `response` (its id is its `id` field) with the conversation it
    /// continues, evicting the oldest beyond the limits.
    pub fn put(&self, response: Value, conversation: Vec<ChatMessage>) {
        let Some(id) = response
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return;
        };
        let bytes = response.to_string().len()
            + conversation
                .iter()
                .map(|m| {
                    m.content.len()
                        + m.tool_calls
                            .iter()
                            .map(|c| c.arguments.len() + c.name.len() + c.id.len())
                            .sum::<usize>()
                })
                .sum::<usize>();
        if bytes > self.limits.max_bytes {
            tracing::warn!(id, bytes, "a response too large to keep was not stored");
            return;
        }
        let mut entries = self.entries();
        Self::expire(&mut entries, self.limits.ttl);
        if let Some(old) = entries.by_id.remove(&id) {
            entries.bytes -= old.bytes;
            entries.order.retain(|kept| kept != &id);
        }
        while entries.order.len() >= self.limits.capacity.max(1)
            || entries.bytes + bytes > self.limits.max_bytes
        {
            let Some(oldest) = entries.order.pop_front() else {
                break;
            };
            if let Some(evicted) = entries.by_id.remove(&oldest) {
                entries.bytes -= evicted.bytes;
            }
        }
        entries.bytes += bytes;
        entries.order.push_back(id.clone());
        entries.by_id.insert(
            id,
            Stored {
                at: Instant::now(),
                bytes,
                response: Arc::new(response),
                conversation: Arc::new(conversation),
            },
        );
    }

    fn expire(entries: &mut Entries, ttl: Duration) {
        while let Some(oldest) = entries.order.front() {
            let expired = entries
                .by_id
                .get(oldest)
                .is_none_or(|stored| stored.at.elapsed() >= ttl);
            if !expired {
                break;
            }
            let oldest = entries.order.pop_front().expect("a front entry");
            if let Some(gone) = entries.by_id.remove(&oldest) {
                entries.bytes -= gone.bytes;
            }
        }
    }

    /// The conversation the stored response `id` continues.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] on `previous_response_id`, saying why it is
    /// not kept and what to send instead.
    pub fn conversation(&self, id: &str) -> Result<Arc<Vec<ChatMessage>>> {
        let mut entries = self.entries();
        Self::expire(&mut entries, self.limits.ttl);
        entries
            .by_id
            .get(id)
            .map(|stored| stored.conversation.clone())
            .ok_or_else(|| {
                Error::invalid_request(
                    "previous_response_id",
                    format!(
                        "`{id}` is not kept here: responses are kept only when their request \
                         set `store: true`, for {} s and at most {} of them; send the whole \
                         conversation as `input` instead",
                        self.limits.ttl.as_secs(),
                        self.limits.capacity
                    ),
                )
            })
    }

    /// The stored response `id`, if it is kept.
    pub fn get(&self, id: &str) -> Option<Arc<Value>> {
        let mut entries = self.entries();
        Self::expire(&mut entries, self.limits.ttl);
        entries.by_id.get(id).map(|stored| stored.response.clone())
    }

    /// Forgets the response `id`; whether it was kept.
    pub fn delete(&self, id: &str) -> bool {
        let mut entries = self.entries();
        let Some(gone) = entries.by_id.remove(id) else {
            return false;
        };
        entries.bytes -= gone.bytes;
        entries.order.retain(|kept| kept != id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime_core::ToolCallDelta;

    fn parse(body: Value) -> Result<(InferenceRequest, Echo)> {
        serde_json::from_value::<ResponsesRequest>(body)
            .expect("a Responses body")
            .into_inference(None)
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidRequest { field, .. } => field.into_owned(),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn items_become_the_chat_history_with_instructions_first() {
        let (chat, echo) = parse(json!({
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tomorrow?"}]}
            ],
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": "required",
            "max_output_tokens": 32
        }))
        .unwrap();
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(chat.messages[2].tool_calls[0].name, "weather");
        assert_eq!(chat.tool_choice, Some(ToolChoice::Required));
        assert_eq!(chat.max_tokens, Some(32));
        assert_eq!(
            echo.conversation.len(),
            4,
            "the instructions are not carried over"
        );
        assert!(!echo.store(), "stateless unless asked");
    }

    #[test]
    fn text_format_asks_for_a_schema_and_unserved_fields_are_refused() {
        let (chat, _) = parse(json!({"input": "hi", "text": {"format": {
            "type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": true}}}))
        .unwrap();
        assert!(matches!(
            chat.response_format,
            Some(ResponseFormat::JsonSchema { .. })
        ));
        for (field, value) in [
            ("truncation", json!("auto")),
            ("background", json!(true)),
            ("conversation", json!("conv_1")),
            ("reasoning", json!({"effort": "high"})),
            ("include", json!(["message.output_text.logprobs"])),
        ] {
            let mut body = json!({"input": "hi"});
            body[field] = value;
            assert_eq!(field_of(parse(body).unwrap_err()), field);
        }
        parse(json!({"input": "hi", "truncation": "disabled", "include": [], "user": "u"}))
            .unwrap();
        let image = parse(
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
        );
        assert_eq!(field_of(image.unwrap_err()), "input[0].content[0]");
        assert_eq!(field_of(parse(json!({"input": []})).unwrap_err()), "input");
    }

    fn echo() -> Echo {
        parse(json!({"input": "hi", "store": true})).unwrap().1
    }

    #[test]
    fn a_whole_answer_is_a_message_then_its_calls() {
        let mut answer = InferenceResponse::new("Checking.");
        answer.tool_calls = vec![ToolCall::new("call_1", "weather", "{}")];
        answer.finish_reason = Some(FinishReason::ToolCalls);
        answer.usage = Some(Usage::new(10, 4));
        let response = response_from_inference(&answer, &echo(), "resp_1", "m", 7);
        assert_eq!(response["status"], "completed");
        assert_eq!(response["output"][0]["content"][0]["text"], "Checking.");
        assert_eq!(response["output"][1]["type"], "function_call");
        assert_eq!(response["output"][1]["call_id"], "call_1");
        assert_eq!(response["usage"]["total_tokens"], 14);
        let mut cut = InferenceResponse::new("Par");
        cut.finish_reason = Some(FinishReason::Length);
        let response = response_from_inference(&cut, &echo(), "resp_2", "m", 7);
        assert_eq!(response["status"], "incomplete");
        assert_eq!(
            response["incomplete_details"]["reason"],
            "max_output_tokens"
        );
    }

    #[test]
    fn stream_events_are_numbered_and_end_with_the_whole_response() {
        let mut stream = ResponsesStream::new("resp_1", "m", 7, echo());
        let mut events = stream.start();
        for event in [
            StreamEvent::Delta("Checking.".into()),
            StreamEvent::ToolCall(ToolCallDelta::start(0, "call_1", "weather")),
            StreamEvent::ToolCall(ToolCallDelta::arguments(0, "{\"city\":")),
            StreamEvent::ToolCall(ToolCallDelta::arguments(0, "\"Paris\"}")),
            StreamEvent::Finished {
                finish_reason: Some(FinishReason::ToolCalls),
                usage: Some(Usage::new(3, 5)),
                timings: None,
            },
        ] {
            events.extend(stream.event(event).unwrap());
        }
        let kinds: Vec<&str> = events.iter().map(|(kind, _)| *kind).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (n, (kind, data)) in events.iter().enumerate() {
            assert_eq!(data["sequence_number"], n as u64);
            assert_eq!(data["type"], *kind);
        }
        assert_eq!(events[8].1["item"]["arguments"], "");
        assert_eq!(events[11].1["arguments"], "{\"city\":\"Paris\"}");
        let (whole, conversation) = stream.completed().unwrap();
        assert_eq!(whole["output"][1]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(conversation.last().unwrap().tool_calls[0].name, "weather");
        assert_eq!(conversation.last().unwrap().content, "Checking.");
    }

    #[test]
    fn each_message_item_has_its_own_text_and_nothing_follows_the_end() {
        let mut stream = ResponsesStream::new("resp_1", "m", 7, echo());
        let mut events = stream.start();
        for event in [
            StreamEvent::Delta("First.".into()),
            StreamEvent::ToolCall(ToolCallDelta::start(0, "call_1", "weather")),
            StreamEvent::ToolCall(ToolCallDelta::arguments(0, "{}")),
            StreamEvent::Delta("Second.".into()),
            StreamEvent::Finished {
                finish_reason: Some(FinishReason::Stop),
                usage: None,
                timings: None,
            },
        ] {
            events.extend(stream.event(event).unwrap());
        }
        let (whole, conversation) = stream.completed().unwrap();
        assert_eq!(whole["output"][0]["content"][0]["text"], "First.");
        assert_eq!(whole["output"][2]["content"][0]["text"], "Second.");
        assert_eq!(conversation.last().unwrap().content, "First.Second.");
        let texts: Vec<&Value> = events
            .iter()
            .filter(|(kind, _)| *kind == "response.output_text.done")
            .map(|(_, data)| &data["text"])
            .collect();
        assert_eq!(texts, [&json!("First."), &json!("Second.")]);
        assert!(
            stream
                .event(StreamEvent::Delta("late".into()))
                .unwrap()
                .is_empty(),
            "nothing after response.completed"
        );
        assert!(
            stream.error("x", "y").is_empty(),
            "no failure after completion"
        );
    }

    #[test]
    fn a_call_piece_after_the_answer_moved_on_is_a_protocol_error() {
        let mut stream = ResponsesStream::new("resp_1", "m", 7, echo());
        for event in [
            StreamEvent::ToolCall(ToolCallDelta::start(0, "call_1", "weather")),
            StreamEvent::Delta("text".into()),
        ] {
            stream.event(event).unwrap();
        }
        let late = stream.event(StreamEvent::ToolCall(ToolCallDelta::arguments(0, "{}")));
        assert!(matches!(late, Err(Error::StreamProtocol(_))), "{late:?}");
        let failed = stream.error("engine_error", "out of order");
        assert_eq!(failed.last().unwrap().0, "response.failed");
        assert!(
            stream
                .event(StreamEvent::Delta("more".into()))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_store_evicts_the_oldest_by_bytes_and_frees_what_it_deletes() {
        let entry = |id: &str| (json!({"id": id}), vec![ChatMessage::user("x".repeat(100))]);
        let size = {
            let (response, conversation) = entry("resp_0");
            response.to_string().len() + conversation[0].content.len()
        };
        let store = ResponseStore::new(StoreLimits {
            capacity: 100,
            max_bytes: 2 * size,
            ttl: Duration::from_secs(60),
        });
        for id in ["resp_0", "resp_1", "resp_2"] {
            let (response, conversation) = entry(id);
            store.put(response, conversation);
        }
        assert!(
            store.get("resp_0").is_none(),
            "the oldest went for the bytes"
        );
        assert!(store.get("resp_1").is_some() && store.get("resp_2").is_some());
        assert!(store.delete("resp_1"));
        let (response, conversation) = entry("resp_3");
        store.put(response, conversation);
        assert!(
            store.get("resp_2").is_some() && store.get("resp_3").is_some(),
            "a deleted response's bytes are free again"
        );
    }

    #[test]
    fn the_store_keeps_what_it_may_and_says_why_it_forgot() {
        let store = ResponseStore::new(StoreLimits {
            capacity: 2,
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
        });
        for id in ["resp_a", "resp_b", "resp_c"] {
            store.put(json!({"id": id}), vec![ChatMessage::user(id)]);
        }
        let evicted = store.conversation("resp_a").unwrap_err();
        assert_eq!(field_of(evicted), "previous_response_id");
        assert_eq!(store.conversation("resp_c").unwrap()[0].content, "resp_c");
        assert!(store.delete("resp_b"));
        assert!(store.get("resp_b").is_none());
        let brief = ResponseStore::new(StoreLimits {
            ttl: Duration::ZERO,
            ..StoreLimits::default()
        });
        brief.put(json!({"id": "resp_x"}), Vec::new());
        assert!(brief.get("resp_x").is_none(), "expired at once");
        let small = ResponseStore::new(StoreLimits {
            max_bytes: 64,
            ..StoreLimits::default()
        });
        small.put(
            json!({"id": "resp_big"}),
            vec![ChatMessage::user("x".repeat(100))],
        );
        assert!(small.get("resp_big").is_none(), "too large to keep");
    }
}
