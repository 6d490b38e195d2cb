//! What an engine answers: [`InferenceResponse`], stream events, metadata.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tools::{ResponseFormat, TokenLogprob, ToolCall, ToolCallDelta};
use crate::{Error, InferenceRequest, ModelFormat, Result};

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FinishReason {
    /// The model ended its answer or a stop string was produced.
    Stop,
    /// `max_tokens` (or the context) was reached.
    Length,
    /// The engine filtered the content.
    ContentFilter,
    /// The model called a tool.
    ToolCalls,
    /// A reason this crate does not know, as the engine spelled it.
    Other(String),
}

impl FinishReason {
    /// The reason as the chat API spells it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ContentFilter => "content_filter",
            Self::ToolCalls => "tool_calls",
            Self::Other(other) => other,
        }
    }
}

impl From<&str> for FinishReason {
    fn from(value: &str) -> Self {
        match value {
            "stop" | "eos" => Self::Stop,
            "length" => Self::Length,
            "content_filter" => Self::ContentFilter,
            "tool_calls" | "function_call" => Self::ToolCalls,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FinishReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FinishReason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(Self::from(text.as_str()))
    }
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the rendered prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// The sum of both.
    pub total_tokens: u64,
}

impl Usage {
    /// Usage from prompt and completion counts.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// How fast a request was served, when the engine (or the runtime) measured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Timings {
    /// From the request to the first generated token (prompt processing).
    pub time_to_first_token: Option<Duration>,
    /// Time spent generating after the first token.
    pub generation_time: Option<Duration>,
    /// Prompt processing speed.
    pub prompt_tokens_per_second: Option<f64>,
    /// Decoding speed.
    pub tokens_per_second: Option<f64>,
}

impl Timings {
    /// Timings from the two phase durations and their token counts.
    pub fn from_phases(
        prompt: Duration,
        prompt_tokens: u64,
        generation: Duration,
        generated_tokens: u64,
    ) -> Self {
        let rate = |tokens: u64, time: Duration| {
            let secs = time.as_secs_f64();
            (secs > 0.0 && tokens > 0).then(|| tokens as f64 / secs)
        };
        Self {
            time_to_first_token: Some(prompt),
            generation_time: Some(generation),
            prompt_tokens_per_second: rate(prompt_tokens, prompt),
            tokens_per_second: rate(generated_tokens, generation),
        }
    }
}

/// The answer to a non-streamed request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InferenceResponse {
    /// The generated text (empty when the answer is tool calls only).
    pub content: String,
    /// The tools the answer calls, in order; their arguments are valid
    /// against their tools' parameters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Why generation ended, if the engine said
    /// ([`FinishReason::ToolCalls`] when the answer calls tools).
    pub finish_reason: Option<FinishReason>,
    /// Each generated token's log-probability, when the request asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Token counts, if the engine reported them (over every answer when
    /// `n > 1`).
    pub usage: Option<Usage>,
    /// Speed figures, if the engine reported them.
    pub timings: Option<Timings>,
    /// The model name the engine answered under.
    pub model: Option<String>,
    /// With `n > 1`: the answers after the first, in order (the first is
    /// this response's own `content`, `tool_calls`, `finish_reason` and
    /// `logprobs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<Choice>,
}

impl InferenceResponse {
    /// A response with just content; the rest can be filled in field by field.
    pub fn new(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            ..Self::default()
        }
    }

    /// Every answer, the first included, in order.
    pub fn choices(&self) -> Vec<Choice> {
        let first = Choice {
            content: self.content.clone(),
            tool_calls: self.tool_calls.clone(),
            finish_reason: self.finish_reason.clone(),
            logprobs: self.logprobs.clone(),
        };
        std::iter::once(first)
            .chain(self.alternatives.iter().cloned())
            .collect()
    }
}

/// One answer of several (`n > 1`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Choice {
    /// The generated text.
    pub content: String,
    /// The tools it calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Why its generation ended.
    pub finish_reason: Option<FinishReason>,
    /// Its tokens' log-probabilities, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

impl Choice {
    /// The answer as a response of its own.
    pub fn into_response(self) -> InferenceResponse {
        InferenceResponse {
            content: self.content,
            tool_calls: self.tool_calls,
            finish_reason: self.finish_reason,
            logprobs: self.logprobs,
            ..InferenceResponse::default()
        }
    }
}

/// One event of a streamed generation, richer than the text deltas of
/// [`ModelRuntime::generate_stream`](crate::ModelRuntime::generate_stream).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// A piece of generated text; always whole UTF-8 characters.
    Delta(String),
    /// A piece of a tool call: its id and name first, then fragments of
    /// its arguments.
    ToolCall(ToolCallDelta),
    /// The log-probabilities of the tokens generated since the last such
    /// event, when the request asked for them.
    Logprobs(Vec<TokenLogprob>),
    /// The end of the generation, sent once, last.
    Finished {
        /// Why generation ended.
        finish_reason: Option<FinishReason>,
        /// Token counts, if known.
        usage: Option<Usage>,
        /// Speed figures, if known.
        timings: Option<Timings>,
    },
}

/// What a model accepts beyond plain chat, as its runtime serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// Tool calls (`tools`, every `tool_choice`).
    pub tools: bool,
    /// `response_format` `json_schema` (and `json_object`).
    pub json_schema: bool,
    /// Token log-probabilities (`logprobs`, `top_logprobs`).
    pub logprobs: bool,
    /// The most answers one request may ask for (`n`).
    pub max_choices: u32,
    /// Whether the model's chat template renders tools and tool calls
    /// itself; when not, they are written into the conversation as text.
    pub template_tools: bool,
    /// Whether chat requests are served: the model has a chat template (its
    /// own or the configuration's). A base model without one takes raw
    /// prompts only (`InferenceRequest::completion`, `/v1/completions`).
    #[serde(default = "served")]
    pub chat: bool,
    /// Whether text is generated at all (chat or raw prompts); false for an
    /// encoder, which only embeds.
    #[serde(default = "served")]
    pub generation: bool,
    /// Whether inputs are embedded ([`ModelRuntime::embed`](crate::ModelRuntime::embed),
    /// `/v1/embeddings`).
    #[serde(default)]
    pub embeddings: bool,
}

fn served() -> bool {
    true
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            tools: false,
            json_schema: false,
            logprobs: false,
            max_choices: 1,
            template_tools: false,
            chat: true,
            generation: true,
            embeddings: false,
        }
    }
}

impl Capabilities {
    /// Tools, schemas and log-probabilities, up to `max_choices` answers.
    pub fn full(max_choices: u32) -> Self {
        Self {
            tools: true,
            json_schema: true,
            logprobs: true,
            max_choices,
            template_tools: false,
            chat: true,
            generation: true,
            embeddings: false,
        }
    }

    /// An encoder's: embeddings, and no generation of any kind.
    pub fn embedding_only() -> Self {
        Self {
            chat: false,
            generation: false,
            embeddings: true,
            ..Self::default()
        }
    }

    /// Sets [`chat`](Self::chat).
    #[must_use]
    pub fn with_chat(mut self, chat: bool) -> Self {
        self.chat = chat;
        self
    }

    /// Sets [`embeddings`](Self::embeddings).
    #[must_use]
    pub fn with_embeddings(mut self, embeddings: bool) -> Self {
        self.embeddings = embeddings;
        self
    }

    /// Sets [`template_tools`](Self::template_tools).
    #[must_use]
    pub fn with_template_tools(mut self, template_tools: bool) -> Self {
        self.template_tools = template_tools;
        self
    }

    /// Refuses, naming the field, what `request` asks for beyond these
    /// capabilities, so nothing is silently dropped: `runtime` names the
    /// runtime in the message.
    pub fn admit(&self, request: &InferenceRequest, runtime: &str) -> Result<()> {
        let refuse = |field: &'static str, what: &str| {
            Err(Error::invalid_request(
                field,
                format!(
                    "{runtime} does not serve {what} for this model; leave `{field}` out, or \
                     serve the model on a backend whose capabilities (in `/v1/models`) list it"
                ),
            ))
        };
        if !self.generation {
            return Err(Error::unsupported(
                "generating text (chat, completions, responses, messages)",
                format!("{runtime} for this model, an embedding model; send it to /v1/embeddings"),
            ));
        }
        if !self.chat && request.prompt.is_none() {
            return Err(Error::invalid_request(
                "messages",
                format!(
                    "cannot be answered: the model has no chat template, so {runtime} would \
                     format the conversation the wrong way; send a raw prompt (the completions \
                     API) instead, or give the model a template (`chat_template`)"
                ),
            ));
        }
        if !self.tools && !request.tools.is_empty() {
            return refuse("tools", "tool calls");
        }
        let calls_in_history = request
            .messages
            .iter()
            .any(|message| !message.tool_calls.is_empty() || message.role == crate::Role::Tool);
        if !self.tools && calls_in_history {
            return refuse(
                "messages",
                "tool calls and tool results in the conversation",
            );
        }
        let structured = matches!(
            request.response_format,
            Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. })
        );
        if !self.json_schema && structured {
            return refuse("response_format", "structured output");
        }
        if !self.logprobs && request.logprobs {
            return refuse("logprobs", "token log-probabilities");
        }
        if request.choices() > self.max_choices {
            return Err(Error::invalid_request(
                "n",
                format!(
                    "is {}; {runtime} serves at most {} answers per request for this model",
                    request.choices(),
                    self.max_choices
                ),
            ));
        }
        Ok(())
    }
}

/// What a runtime is and what it can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RuntimeMetadata {
    /// The model format the runtime takes.
    pub format: ModelFormat,
    /// The runtime's name (`llama.cpp`, `vllm`, `candle`).
    pub runtime_name: String,
    /// The engine's version, as the engine itself reports it; empty before
    /// [`initialize`](crate::ModelRuntime::initialize) when it cannot be known yet.
    pub version: String,
    /// Whether the runtime can offload to a GPU.
    pub supports_gpu: bool,
    /// Whether `generate_stream` streams token by token.
    pub supports_streaming: bool,
    /// The context window in effect once initialized, in tokens.
    pub context_size: Option<u32>,
    /// What the model accepts beyond plain chat, once initialized.
    #[serde(default)]
    pub capabilities: Capabilities,
}

impl RuntimeMetadata {
    /// Metadata with the given identity; other fields default to false / unknown.
    pub fn new(
        format: ModelFormat,
        runtime_name: impl Into<String>,
        version: impl Into<String>,
    ) -> Self {
        Self {
            format,
            runtime_name: runtime_name.into(),
            version: version.into(),
            supports_gpu: false,
            supports_streaming: true,
            context_size: None,
            capabilities: Capabilities::default(),
        }
    }

    /// Sets [`supports_gpu`](Self::supports_gpu).
    #[must_use]
    pub fn with_gpu(mut self, supports_gpu: bool) -> Self {
        self.supports_gpu = supports_gpu;
        self
    }

    /// Sets [`capabilities`](Self::capabilities).
    #[must_use]
    pub fn with_capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// Sets [`context_size`](Self::context_size).
    #[must_use]
    pub fn with_context_size(mut self, context_size: Option<u32>) -> Self {
        self.context_size = context_size;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_refuse_by_name_what_they_lack_and_admit_what_they_have() {
        use crate::{ChatMessage, Tool};
        let plain = InferenceRequest::new(vec![ChatMessage::user("x")]);
        let none = Capabilities::default();
        assert!(none.admit(&plain, "candle").is_ok());
        let cases = [
            (
                "tools",
                plain
                    .clone()
                    .with_tool(Tool::function("f", serde_json::json!({"type": "object"}))),
            ),
            (
                "response_format",
                plain
                    .clone()
                    .with_response_format(ResponseFormat::JsonObject),
            ),
            ("logprobs", plain.clone().with_logprobs(2)),
            ("n", plain.clone().with_n(2)),
        ];
        for (field, request) in &cases {
            let err = none.admit(request, "candle").unwrap_err();
            assert!(
                matches!(&err, Error::InvalidRequest { field: named, .. } if named == field),
                "{field}: {err:?}"
            );
            assert!(
                Capabilities::full(2).admit(request, "llama.cpp").is_ok(),
                "{field}"
            );
        }
        assert!(Capabilities::full(1).admit(&plain.with_n(2), "x").is_err());
    }

    #[test]
    fn finish_reasons_round_trip_and_keep_unknown_ones() {
        for text in ["stop", "length", "content_filter", "tool_calls", "abort"] {
            let reason: FinishReason = serde_json::from_value(text.into()).unwrap();
            assert_eq!(serde_json::to_value(&reason).unwrap(), text);
        }
        assert_eq!(
            FinishReason::from("abort"),
            FinishReason::Other("abort".into())
        );
    }

    #[test]
    fn timings_from_phases_compute_rates() {
        let t = Timings::from_phases(Duration::from_millis(100), 50, Duration::from_secs(2), 40);
        assert_eq!(t.prompt_tokens_per_second, Some(500.0));
        assert_eq!(t.tokens_per_second, Some(20.0));
        let none = Timings::from_phases(Duration::ZERO, 0, Duration::ZERO, 0);
        assert_eq!(none.tokens_per_second, None);
    }
}
