//! What a caller asks for: [`InferenceRequest`] and its messages.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The most stop strings a request may carry.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string accepted, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;

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
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
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
}

/// A chat completion request, shaped like OpenAI's.
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
    /// The conversation so far; the model answers the last message.
    pub messages: Vec<ChatMessage>,
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
}

impl InferenceRequest {
    /// A request for the given conversation with every option at its default.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages,
            max_tokens: None,
            temperature: None,
            top_p: None,
            seed: None,
            stop: Vec::new(),
            stream: false,
        }
    }

    /// A request with one user message.
    pub fn from_prompt(prompt: impl Into<String>) -> Self {
        Self::new(vec![ChatMessage::user(prompt)])
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

    /// Checks the request before it reaches an engine, naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        if self.messages.is_empty() {
            return Err(Error::invalid_request(
                "messages",
                "is empty; send at least one message",
            ));
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
