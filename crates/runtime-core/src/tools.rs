//! Tools and structured output: what a request may ask the model to call
//! ([`Tool`], [`ToolChoice`]) or to produce ([`ResponseFormat`]), and the
//! calls an answer carries ([`ToolCall`]).
//!
//! The guarantee every backend gives: an answer to a request with a
//! [`ResponseFormat::JsonSchema`] is valid against the schema, and every
//! [`ToolCall`]'s arguments are valid against its tool's parameters, or the
//! request fails with [`Error::OutputInvalid`](crate::Error::OutputInvalid).
//! A schema keyword an engine cannot enforce is refused before generation
//! with [`Error::InvalidRequest`](crate::Error::InvalidRequest) naming it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The longest tool name accepted, as OpenAI's API has it.
pub const MAX_TOOL_NAME: usize = 64;
/// The most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

/// A function the model may call.
///
/// ```
/// use runtime_core::Tool;
/// use serde_json::json;
///
/// let weather = Tool::function("get_weather", json!({
///     "type": "object",
///     "properties": {"city": {"type": "string"}},
///     "required": ["city"],
///     "additionalProperties": false,
/// }))
/// .with_description("The weather in a city now");
/// assert_eq!(weather.name, "get_weather");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Tool {
    /// The function's name: letters, digits, `_` and `-`, at most
    /// [`MAX_TOOL_NAME`] bytes.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON Schema of its arguments (an object schema); `None` takes no
    /// arguments but an empty object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// The caller asked for strict schema adherence (OpenAI's `strict`).
    /// Arguments are always validated here; the flag is kept for the wire.
    #[serde(default)]
    pub strict: bool,
}

impl Tool {
    /// A function tool called `name` whose arguments follow `parameters`.
    pub fn function(name: impl Into<String>, parameters: Value) -> Self {
        Self {
            name: name.into(),
            description: None,
            parameters: Some(parameters),
            strict: false,
        }
    }

    /// Sets [`description`](Self::description).
    #[must_use]
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The schema its arguments must follow: its parameters, or an object
    /// without properties when it has none.
    pub fn parameters_schema(&self) -> Value {
        self.parameters.clone().unwrap_or_else(|| {
            serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false})
        })
    }
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ToolChoice {
    /// Answer with text; call nothing.
    None,
    /// The model decides (the default when tools are given).
    Auto,
    /// Call at least one of the tools.
    Required,
    /// Call this function.
    Function(String),
}

/// A call of a tool in an answer, or in an assistant message of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ToolCall {
    /// The call's id, which the tool's result refers to.
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments, as JSON text (an object).
    pub arguments: String,
}

impl ToolCall {
    /// A call of `name` with `arguments` (JSON text).
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    /// The arguments parsed.
    pub fn arguments_json(&self) -> serde_json::Result<Value> {
        serde_json::from_str(&self.arguments)
    }
}

/// A piece of a tool call in a stream: the first piece of each call carries
/// its id and name, later ones fragments of its arguments, which
/// concatenated are the call's [`arguments`](ToolCall::arguments).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ToolCallDelta {
    /// Which call of the answer (0, 1, ...), in order.
    pub index: u32,
    /// The call's id, in its first piece.
    pub id: Option<String>,
    /// The function's name, in its first piece.
    pub name: Option<String>,
    /// The next fragment of the arguments (may be empty).
    pub arguments: String,
}

impl ToolCallDelta {
    /// The first piece of call `index`.
    pub fn start(index: u32, id: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            index,
            id: Some(id.into()),
            name: Some(name.into()),
            arguments: String::new(),
        }
    }

    /// A fragment of call `index`'s arguments.
    pub fn arguments(index: u32, fragment: impl Into<String>) -> Self {
        Self {
            index,
            id: None,
            name: None,
            arguments: fragment.into(),
        }
    }

    /// Adds this piece to the calls assembled so far: the start of the
    /// next call, or more of the one at its index. A piece for a call past
    /// the next is a protocol error.
    pub fn apply_to(self, calls: &mut Vec<ToolCall>) -> crate::Result<()> {
        let index = self.index as usize;
        if index > calls.len() {
            return Err(crate::Error::StreamProtocol(format!(
                "tool call {index} came before call {}",
                calls.len()
            )));
        }
        if index == calls.len() {
            calls.push(ToolCall::new("", "", String::new()));
        }
        let call = &mut calls[index];
        if let Some(id) = self.id {
            call.id = id;
        }
        if let Some(name) = self.name {
            call.name = name;
        }
        call.arguments.push_str(&self.arguments);
        Ok(())
    }
}

/// What shape the answer's text must have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `schema`.
    JsonSchema {
        /// The schema's name (OpenAI requires one; it reaches no model).
        name: String,
        /// The JSON Schema (draft 2020-12).
        schema: Value,
        /// The caller asked for strict adherence. The answer is validated
        /// either way.
        #[serde(default)]
        strict: bool,
    },
}

impl ResponseFormat {
    /// JSON valid against `schema`, named `name`.
    pub fn json_schema(name: impl Into<String>, schema: Value) -> Self {
        Self::JsonSchema {
            name: name.into(),
            schema,
            strict: true,
        }
    }
}

/// The log-probability of one generated token and its most likely
/// alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TokenLogprob {
    /// The token's text (lossy where its bytes are not UTF-8 alone).
    pub token: String,
    /// Its natural-log probability under the model's distribution at that
    /// position (before sampling settings).
    pub logprob: f32,
    /// Its bytes, when it has a byte representation.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    /// The most likely tokens at that position, most likely first, as many
    /// as `top_logprobs` asked.
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f32,
    /// Its bytes, when it has a byte representation.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
}

impl TokenLogprob {
    /// A token with its log-probability and alternatives.
    pub fn new(token: impl Into<String>, logprob: f32, top_logprobs: Vec<TopLogprob>) -> Self {
        let token = token.into();
        Self {
            bytes: Some(token.as_bytes().to_vec()),
            token,
            logprob,
            top_logprobs,
        }
    }
}

impl TopLogprob {
    /// An alternative token with its log-probability.
    pub fn new(token: impl Into<String>, logprob: f32) -> Self {
        let token = token.into();
        Self {
            bytes: Some(token.as_bytes().to_vec()),
            token,
            logprob,
        }
    }
}
