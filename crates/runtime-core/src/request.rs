//! What a caller asks for: [`InferenceRequest`] and its messages.

use serde::{Deserialize, Serialize};

use crate::tools::{MAX_TOOL_NAME, MAX_TOOLS, ResponseFormat, Tool, ToolCall, ToolChoice};
use crate::{Error, Result};

/// The most stop strings a request may carry.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string accepted, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;
/// The most answers one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;
/// The most alternatives per token `top_logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: u8 = 20;
/// The most token ids a [`Prompt::Tokens`] may hold (far past any context
/// served here; the engine's context is the real limit).
pub const MAX_PROMPT_TOKEN_IDS: usize = 1 << 20;

/// What a raw-prompt completion continues
/// ([`InferenceRequest::prompt`]). On the wire, a string or a list of
/// token ids, as in OpenAI's completions API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Prompt {
    /// Text, tokenized by the engine, with the tokens the model starts a
    /// prompt with (its beginning-of-text token, where it has one).
    Text(String),
    /// Token ids of the model's vocabulary, fed as they are: nothing is
    /// added, so the caller decides about a beginning-of-text token.
    Tokens(Vec<u32>),
}

impl Prompt {
    /// The text, when the prompt is text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text),
            Self::Tokens(_) => None,
        }
    }
}

impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(tokens: Vec<u32>) -> Self {
        Self::Tokens(tokens)
    }
}

/// Who wrote a chat message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person talking to the model.
    User,
    /// The model.
    Assistant,
    /// The output of a tool call.
    Tool,
}

impl Role {
    /// The role as the chat API spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text (empty for an assistant message that only calls tools).
    pub content: String,
    /// The tools an assistant message called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a [`Role::Tool`] message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// An assistant message that called `calls` (what an answer with
    /// [`InferenceResponse::tool_calls`](crate::InferenceResponse::tool_calls)
    /// becomes in the history).
    pub fn assistant_calls(calls: Vec<ToolCall>) -> Self {
        Self {
            tool_calls: calls,
            ..Self::new(Role::Assistant, "")
        }
    }

    /// The result of the tool call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// Whether a model can go on writing this message: an assistant's that
    /// calls no tools ([`InferenceRequest::prefill`]).
    pub fn is_continuable(&self) -> bool {
        self.role == Role::Assistant && self.tool_calls.is_empty()
    }
}

/// A chat completion request, shaped like OpenAI's; or, with
/// [`prompt`](Self::prompt), a completion of raw text (the legacy
/// completions API).
///
/// ```
/// use runtime_core::{ChatMessage, InferenceRequest};
///
/// let request = InferenceRequest::new(vec![ChatMessage::user("What is the capital of France?")])
///     .with_max_tokens(32)
///     .with_temperature(0.0);
/// request.validate().expect("a valid request");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InferenceRequest {
    /// The conversation so far; the model answers the last message. Empty
    /// when [`prompt`](Self::prompt) is set.
    pub messages: Vec<ChatMessage>,
    /// What the model continues, as is: no chat template, so a base model
    /// without one can be used. Tools, output formats, log-probabilities
    /// and `n` are chat features and refused with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Prompt>,
    /// Fill-in-the-middle: the text after the gap. The model writes what
    /// goes between a text [`prompt`](Self::prompt) and this, in the
    /// prefix-suffix-middle order of the model's own FIM tokens
    /// ([`FimTokens`](crate::FimTokens)); a model without them refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// The most tokens to generate; `None` lets the engine decide.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature in `0.0..=2.0`; `0.0` is greedy and deterministic.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// reaches `top_p`, in `(0.0, 1.0]`.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Seed for sampling; the same seed repeats the same output.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Strings that end generation when produced (not included in the output).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Whether the caller wants a stream. The trait's `generate` and
    /// `generate_stream` decide this themselves; HTTP front ends read it.
    #[serde(default)]
    pub stream: bool,
    /// Functions the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    /// Whether and which tool must be called; `None` is
    /// [`ToolChoice::Auto`] with tools and [`ToolChoice::None`] without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Whether an answer may call several tools (default: yes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// The shape the answer's text must have; `None` is free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Report each generated token's log-probability.
    #[serde(default)]
    pub logprobs: bool,
    /// With [`logprobs`](Self::logprobs): this many most likely alternatives
    /// per token, at most [`MAX_TOP_LOGPROBS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u8>,
    /// How many answers to generate, at most [`MAX_CHOICES`] (default one).
    /// More than one is served by non-streamed requests only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
}

impl InferenceRequest {
    /// A request for the given conversation with every option at its default.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages,
            prompt: None,
            suffix: None,
            max_tokens: None,
            temperature: None,
            top_p: None,
            seed: None,
            stop: Vec::new(),
            stream: false,
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            logprobs: false,
            top_logprobs: None,
            n: None,
        }
    }

    /// A request with one user message.
    pub fn from_prompt(prompt: impl Into<String>) -> Self {
        Self::new(vec![ChatMessage::user(prompt)])
    }

    /// A completion of raw text: the model continues `text` as is, with no
    /// chat template ([`prompt`](Self::prompt)).
    pub fn completion(text: impl Into<String>) -> Self {
        Self::completion_of(Prompt::Text(text.into()))
    }

    /// A completion of a [`Prompt`], text or token ids.
    pub fn completion_of(prompt: Prompt) -> Self {
        Self {
            prompt: Some(prompt),
            ..Self::new(Vec::new())
        }
    }

    /// Fill-in-the-middle: the model writes what goes between `prefix` and
    /// `suffix` ([`suffix`](Self::suffix)).
    pub fn infill(prefix: impl Into<String>, suffix: impl Into<String>) -> Self {
        Self {
            suffix: Some(suffix.into()),
            ..Self::completion(prefix)
        }
    }

    /// Sets [`max_tokens`](Self::max_tokens).
    #[must_use]
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Sets [`temperature`](Self::temperature).
    #[must_use]
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sets [`top_p`](Self::top_p).
    #[must_use]
    pub fn with_top_p(mut self, top_p: f32) -> Self {
        self.top_p = Some(top_p);
        self
    }

    /// Sets [`seed`](Self::seed).
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Adds a stop string.
    #[must_use]
    pub fn with_stop(mut self, stop: impl Into<String>) -> Self {
        self.stop.push(stop.into());
        self
    }

    /// Offers the model `tool`.
    #[must_use]
    pub fn with_tool(mut self, tool: Tool) -> Self {
        self.tools.push(tool);
        self
    }

    /// Sets [`tool_choice`](Self::tool_choice).
    #[must_use]
    pub fn with_tool_choice(mut self, choice: ToolChoice) -> Self {
        self.tool_choice = Some(choice);
        self
    }

    /// Sets [`parallel_tool_calls`](Self::parallel_tool_calls).
    #[must_use]
    pub fn with_parallel_tool_calls(mut self, parallel: bool) -> Self {
        self.parallel_tool_calls = Some(parallel);
        self
    }

    /// Sets [`response_format`](Self::response_format).
    #[must_use]
    pub fn with_response_format(mut self, format: ResponseFormat) -> Self {
        self.response_format = Some(format);
        self
    }

    /// Asks for an answer valid against `schema`
    /// ([`ResponseFormat::JsonSchema`]).
    #[must_use]
    pub fn with_json_schema(self, name: impl Into<String>, schema: serde_json::Value) -> Self {
        self.with_response_format(ResponseFormat::json_schema(name, schema))
    }

    /// Asks for each token's log-probability and its `top` most likely
    /// alternatives.
    #[must_use]
    pub fn with_logprobs(mut self, top: u8) -> Self {
        self.logprobs = true;
        self.top_logprobs = Some(top);
        self
    }

    /// Sets [`n`](Self::n).
    #[must_use]
    pub fn with_n(mut self, n: u32) -> Self {
        self.n = Some(n);
        self
    }

    /// The tool choice in effect: the one set, else `auto` with tools and
    /// `none` without.
    pub fn effective_tool_choice(&self) -> ToolChoice {
        match &self.tool_choice {
            Some(choice) => choice.clone(),
            None if self.tools.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
        }
    }

    /// How many answers are asked for.
    pub fn choices(&self) -> u32 {
        self.n.unwrap_or(1)
    }

    /// The text the answer continues, when the conversation ends with an
    /// assistant message (one that calls no tools): the model goes on
    /// writing that message rather than starting a new one, as
    /// llama-server and Anthropic's API do (a "prefill"). The answer is
    /// what follows it.
    pub fn prefill(&self) -> Option<&str> {
        match self.messages.last() {
            Some(last) if last.is_continuable() => Some(&last.content),
            _ => None,
        }
    }

    /// [`validate`](Self::validate), for a request to be streamed: one
    /// answer streams at a time, so `n` must be 1.
    pub fn validate_for_stream(&self) -> Result<()> {
        self.validate()?;
        if self.choices() > 1 {
            return Err(Error::invalid_request(
                "n",
                "must be 1 on a stream (one answer streams at a time); ask for several \
                 answers without streaming",
            ));
        }
        Ok(())
    }

    /// Checks the request before it reaches an engine, naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        match &self.prompt {
            None if self.suffix.is_some() => {
                return Err(Error::invalid_request(
                    "suffix",
                    "is served with a raw text `prompt` (the completions API) only",
                ));
            }
            None if self.messages.is_empty() => {
                return Err(Error::invalid_request(
                    "messages",
                    "is empty; send at least one message",
                ));
            }
            None => {}
            Some(prompt) => self.validate_completion(prompt)?,
        }
        if self.max_tokens == Some(0) {
            return Err(Error::invalid_request(
                "max_tokens",
                "must be at least 1 (leave it unset for the engine's default)",
            ));
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(Error::invalid_request(
                "temperature",
                format!("must be between 0 and 2, got {t}"),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::invalid_request(
                "top_p",
                format!("must be in (0, 1], got {p}"),
            ));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::invalid_request(
                "stop",
                "contains an empty string, which would stop at once",
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(Error::invalid_request(
                "stop",
                format!(
                    "has {} strings; at most {MAX_STOP_STRINGS} are accepted",
                    self.stop.len()
                ),
            ));
        }
        if let Some(long) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(Error::invalid_request(
                "stop",
                format!(
                    "has a string of {} bytes; at most {MAX_STOP_BYTES} are accepted",
                    long.len()
                ),
            ));
        }
        self.validate_tools()?;
        self.validate_response_format()?;
        self.validate_prefill()?;
        if let Some(n) = self.n
            && !(1..=MAX_CHOICES).contains(&n)
        {
            return Err(Error::invalid_request(
                "n",
                format!("must be between 1 and {MAX_CHOICES}, got {n}"),
            ));
        }
        if let Some(top) = self.top_logprobs {
            if top > MAX_TOP_LOGPROBS {
                return Err(Error::invalid_request(
                    "top_logprobs",
                    format!("must be between 0 and {MAX_TOP_LOGPROBS}, got {top}"),
                ));
            }
            if top > 0 && !self.logprobs {
                return Err(Error::invalid_request(
                    "top_logprobs",
                    "needs `logprobs: true`",
                ));
            }
        }
        Ok(())
    }

    /// A continued assistant message is free text: a schema or a tool call
    /// would have to start where the message already did.
    fn validate_prefill(&self) -> Result<()> {
        let Some(last) = self.messages.last() else {
            return Ok(());
        };
        if last.role == Role::Assistant && !last.tool_calls.is_empty() {
            return Err(Error::invalid_request(
                "messages",
                "ends with an assistant message that calls tools; send each call's result \
                 (a `tool` message) after it",
            ));
        }
        let Some(text) = self.prefill() else {
            return Ok(());
        };
        if text.trim().is_empty() {
            return Err(Error::invalid_request(
                "messages",
                "ends with an empty assistant message; leave it out to have the model answer",
            ));
        }
        if text.ends_with(char::is_whitespace) {
            // vLLM trims the text it continues, llama-server does not.
            return Err(Error::invalid_request(
                "messages",
                "ends with an assistant message that ends in whitespace, which engines \
                 continue differently; trim it (as Anthropic's API requires)",
            ));
        }
        let structured = !self.tools.is_empty()
            || !matches!(self.response_format, None | Some(ResponseFormat::Text));
        if structured {
            return Err(Error::invalid_request(
                "messages",
                "ends with an assistant message, which the model continues (a prefill); that \
                 is served without tools and output formats: drop them, or end the \
                 conversation with a user message",
            ));
        }
        if self.choices() > 1 {
            return Err(Error::invalid_request(
                "n",
                "must be 1 when the conversation ends with an assistant message, which the \
                 model continues; send one request per answer",
            ));
        }
        if self.messages.len() >= 2
            && self.messages[self.messages.len() - 2].role == Role::Assistant
        {
            return Err(Error::invalid_request(
                "messages",
                "ends with two assistant messages; only the last one can be continued, so \
                 join them into one",
            ));
        }
        Ok(())
    }

    /// A raw-text completion takes none of chat's features.
    fn validate_completion(&self, prompt: &Prompt) -> Result<()> {
        match prompt {
            Prompt::Tokens(tokens) if tokens.is_empty() => {
                return Err(Error::invalid_request(
                    "prompt",
                    "holds no token ids; send at least one",
                ));
            }
            Prompt::Tokens(tokens) if tokens.len() > MAX_PROMPT_TOKEN_IDS => {
                return Err(Error::invalid_request(
                    "prompt",
                    format!(
                        "holds {} token ids; at most {MAX_PROMPT_TOKEN_IDS} are accepted",
                        tokens.len()
                    ),
                ));
            }
            Prompt::Tokens(_) if self.suffix.is_some() => {
                return Err(Error::invalid_request(
                    "suffix",
                    "needs a text `prompt` (the text before the gap), not token ids",
                ));
            }
            _ => {}
        }
        if !self.messages.is_empty() {
            return Err(Error::invalid_request(
                "messages",
                "cannot be sent with a raw `prompt`; send one or the other",
            ));
        }
        let refused = if !self.tools.is_empty() {
            Some("tools")
        } else if !matches!(self.response_format, None | Some(ResponseFormat::Text)) {
            Some("response_format")
        } else if self.logprobs {
            Some("logprobs")
        } else if self.choices() > 1 {
            Some("n")
        } else {
            None
        };
        match refused {
            Some(field) => Err(Error::invalid_request(
                field,
                "is not served with a raw prompt; use the chat API for it",
            )),
            None => Ok(()),
        }
    }

    fn validate_tools(&self) -> Result<()> {
        if self.tools.len() > MAX_TOOLS {
            return Err(Error::invalid_request(
                "tools",
                format!(
                    "has {} tools; at most {MAX_TOOLS} are accepted",
                    self.tools.len()
                ),
            ));
        }
        for (i, tool) in self.tools.iter().enumerate() {
            let valid_name = !tool.name.is_empty()
                && tool.name.len() <= MAX_TOOL_NAME
                && tool
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name {
                return Err(Error::invalid_request(
                    format!("tools[{i}].function.name"),
                    format!(
                        "is {:?}; use 1 to {MAX_TOOL_NAME} letters, digits, `_` or `-`",
                        tool.name
                    ),
                ));
            }
            if self.tools[..i].iter().any(|other| other.name == tool.name) {
                return Err(Error::invalid_request(
                    format!("tools[{i}].function.name"),
                    format!("`{}` is offered twice", tool.name),
                ));
            }
            if let Some(parameters) = &tool.parameters {
                let is_object = parameters
                    .as_object()
                    .is_some_and(|schema| schema.get("type").is_none_or(|kind| *kind == "object"));
                if !is_object {
                    return Err(Error::invalid_request(
                        format!("tools[{i}].function.parameters"),
                        "must be a JSON Schema of an object (`\"type\": \"object\"`)",
                    ));
                }
            }
        }
        match &self.tool_choice {
            Some(ToolChoice::Required) if self.tools.is_empty() => Err(Error::invalid_request(
                "tool_choice",
                "is `required` but no tools are offered; send `tools` too",
            )),
            Some(ToolChoice::Function(name)) if !self.tools.iter().any(|t| &t.name == name) => {
                Err(Error::invalid_request(
                    "tool_choice",
                    format!("names `{name}`, which is not among `tools`"),
                ))
            }
            _ => Ok(()),
        }
    }

    fn validate_response_format(&self) -> Result<()> {
        if let Some(ResponseFormat::JsonSchema { schema, name, .. }) = &self.response_format {
            if !(schema.is_object() || schema.is_boolean()) {
                return Err(Error::invalid_request(
                    "response_format.json_schema.schema",
                    "must be a JSON Schema (an object)",
                ));
            }
            if name.len() > MAX_TOOL_NAME {
                return Err(Error::invalid_request(
                    "response_format.json_schema.name",
                    format!("is longer than {MAX_TOOL_NAME} bytes"),
                ));
            }
        }
        let constrained = !matches!(self.response_format, None | Some(ResponseFormat::Text));
        let calls = matches!(
            self.effective_tool_choice(),
            ToolChoice::Required | ToolChoice::Function(_)
        );
        if constrained && calls {
            return Err(Error::invalid_request(
                "response_format",
                "cannot be combined with a required tool call (`tool_choice` `required` or a \
                 named function): the answer is the call; leave one of them out",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidRequest { field, .. } => field.into_owned(),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    fn valid() -> InferenceRequest {
        InferenceRequest::from_prompt("hi")
    }

    #[test]
    fn a_raw_prompt_takes_no_messages_and_no_chat_features() {
        InferenceRequest::completion("Once upon a time")
            .validate()
            .unwrap();
        let mut both = InferenceRequest::completion("x");
        both.messages.push(ChatMessage::user("y"));
        assert_eq!(field_of(both.validate().unwrap_err()), "messages");
        let tools = InferenceRequest::completion("x").with_tool(crate::Tool::function(
            "f",
            serde_json::json!({"type": "object"}),
        ));
        assert_eq!(field_of(tools.validate().unwrap_err()), "tools");
        let several = InferenceRequest::completion("x").with_n(2);
        assert_eq!(field_of(several.validate().unwrap_err()), "n");
    }

    #[test]
    fn a_token_prompt_needs_ids_and_takes_no_suffix() {
        InferenceRequest::completion_of(Prompt::Tokens(vec![1, 2]))
            .validate()
            .unwrap();
        let empty = InferenceRequest::completion_of(Prompt::Tokens(Vec::new()));
        assert_eq!(field_of(empty.validate().unwrap_err()), "prompt");
        let mut gap = InferenceRequest::completion_of(Prompt::Tokens(vec![1]));
        gap.suffix = Some("}".into());
        assert_eq!(field_of(gap.validate().unwrap_err()), "suffix");
    }

    #[test]
    fn a_trailing_assistant_message_is_continued_as_free_text() {
        let prefill = InferenceRequest::new(vec![
            ChatMessage::user("Count to ten."),
            ChatMessage::assistant("1, 2, 3,"),
        ]);
        prefill.validate().unwrap();
        assert_eq!(prefill.prefill(), Some("1, 2, 3,"));
        assert_eq!(valid().prefill(), None);
        let with_format = prefill
            .clone()
            .with_response_format(ResponseFormat::JsonObject);
        assert_eq!(field_of(with_format.validate().unwrap_err()), "messages");
        let mut twice = prefill.clone();
        twice.messages.push(ChatMessage::assistant("4,"));
        assert_eq!(field_of(twice.validate().unwrap_err()), "messages");
        for text in ["", "  ", "1, 2, "] {
            let mut odd = prefill.clone();
            odd.messages[1] = ChatMessage::assistant(text);
            assert_eq!(
                field_of(odd.validate().unwrap_err()),
                "messages",
                "{text:?}"
            );
        }
        let calls = InferenceRequest::new(vec![
            ChatMessage::user("Weather?"),
            ChatMessage::assistant_calls(vec![crate::ToolCall::new("c1", "weather", "{}")]),
        ]);
        assert_eq!(field_of(calls.validate().unwrap_err()), "messages");
    }

    #[test]
    fn a_suffix_needs_a_raw_text_prompt() {
        InferenceRequest::infill("fn main() {", "}")
            .validate()
            .unwrap();
        let mut chat = valid();
        chat.suffix = Some("}".into());
        assert_eq!(field_of(chat.validate().unwrap_err()), "suffix");
    }

    #[test]
    fn a_prompt_is_a_string_or_token_ids_on_the_wire() {
        let text: Prompt = serde_json::from_str(r#""Once""#).unwrap();
        assert_eq!(text, Prompt::Text("Once".into()));
        let tokens: Prompt = serde_json::from_str("[1, 2, 3]").unwrap();
        assert_eq!(tokens, Prompt::Tokens(vec![1, 2, 3]));
        assert_eq!(serde_json::to_string(&tokens).unwrap(), "[1,2,3]");
    }

    #[test]
    fn empty_messages_are_rejected() {
        let request = InferenceRequest::new(Vec::new());
        assert_eq!(field_of(request.validate().unwrap_err()), "messages");
    }

    #[test]
    fn zero_max_tokens_is_rejected() {
        let request = valid().with_max_tokens(0);
        assert_eq!(field_of(request.validate().unwrap_err()), "max_tokens");
    }

    #[test]
    fn temperature_above_two_is_rejected() {
        let request = valid().with_temperature(2.5);
        assert_eq!(field_of(request.validate().unwrap_err()), "temperature");
    }

    #[test]
    fn negative_temperature_is_rejected() {
        let request = valid().with_temperature(-0.1);
        assert_eq!(field_of(request.validate().unwrap_err()), "temperature");
    }

    #[test]
    fn nan_temperature_is_rejected() {
        let request = valid().with_temperature(f32::NAN);
        assert_eq!(field_of(request.validate().unwrap_err()), "temperature");
    }

    #[test]
    fn top_p_of_zero_is_rejected() {
        let request = valid().with_top_p(0.0);
        assert_eq!(field_of(request.validate().unwrap_err()), "top_p");
    }

    #[test]
    fn empty_stop_string_is_rejected() {
        let request = valid().with_stop("");
        assert_eq!(field_of(request.validate().unwrap_err()), "stop");
    }

    #[test]
    fn thousands_of_stop_strings_or_a_huge_one_are_rejected() {
        let mut many = valid();
        many.stop = (0..5000).map(|i| i.to_string()).collect();
        assert_eq!(field_of(many.validate().unwrap_err()), "stop");
        let huge = valid().with_stop("x".repeat(MAX_STOP_BYTES + 1));
        assert_eq!(field_of(huge.validate().unwrap_err()), "stop");
    }

    #[test]
    fn boundary_values_are_accepted() {
        valid()
            .with_temperature(0.0)
            .with_top_p(1.0)
            .with_max_tokens(1)
            .validate()
            .unwrap();
        valid().with_temperature(2.0).validate().unwrap();
    }
}
