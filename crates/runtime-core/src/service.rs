//! [`ModelService`]: what an HTTP front end serves, whether one runtime, an
//! in-process engine, or a gateway over many models.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    EmbeddingRequest, Embeddings, Error, EventStream, InferenceRequest, InferenceResponse,
    ModelRuntime, Result, ToolChoice,
};

/// The API a generation request came through, for a service that counts
/// requests by it (the gateway's `gateway_requests_total{endpoint}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `/v1/chat/completions`, and a direct call of
    /// [`ModelService::generate`].
    ChatCompletions,
    /// `/v1/completions`.
    Completions,
    /// `/v1/responses`.
    Responses,
    /// `/v1/messages`.
    Messages,
    /// `/v1/messages/count_tokens`.
    CountTokens,
}

impl Endpoint {
    /// Its name as a metric label: `chat_completions`, `completions`,
    /// `responses`, `messages`, `count_tokens`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Responses => "responses",
            Self::Messages => "messages",
            Self::CountTokens => "count_tokens",
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The requests a server answers, by the model each names.
///
/// `model` is the request's `model` field: a service in front of one model
/// may ignore it, one in front of several routes by it (and answers
/// [`Error::ModelNotServed`](crate::Error::ModelNotServed) for a name it
/// does not know).
///
/// Every [`ModelRuntime`] is a `ModelService` for its one model. The HTTP
/// router (`runtime-openai`'s `router`) serves any `ModelService`; the gateway
/// (`runtime-gateway`) is one over many runtimes. Kinds of request beyond
/// chat are added here as methods with a default that refuses them, so an
/// implementor that does not serve a kind need not mention it.
#[async_trait]
pub trait ModelService: Send + Sync + 'static {
    /// Whether requests can be served now.
    async fn is_ready(&self) -> bool;

    /// A complete chat answer.
    async fn generate(
        &self,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<InferenceResponse>;

    /// A chat answer as events ending in
    /// [`StreamEvent::Finished`](crate::StreamEvent::Finished).
    async fn generate_events(
        &self,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream>;

    /// [`generate`](Self::generate), for a request that came through
    /// `endpoint`. A service that counts requests by endpoint overrides it;
    /// the provided implementation forwards to `generate`. The router
    /// calls this one.
    async fn generate_at(
        &self,
        endpoint: Endpoint,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<InferenceResponse> {
        let _ = endpoint;
        self.generate(model, request).await
    }

    /// [`generate_events`](Self::generate_events), for a request that came
    /// through `endpoint` (as [`generate_at`](Self::generate_at)).
    async fn generate_events_at(
        &self,
        endpoint: Endpoint,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        let _ = endpoint;
        self.generate_events(model, request).await
    }

    /// How many tokens the prompt of `request` is, as the engine serving
    /// `model` counts them: what Anthropic's `/v1/messages/count_tokens`
    /// answers.
    ///
    /// The provided implementation asks that engine, through
    /// [`generate`](Self::generate): it reads the prompt and generates one
    /// token (dropped) at temperature 0, and the prompt tokens it reports
    /// are the count (a request at [`Endpoint::CountTokens`]). The tools are kept in the prompt but not required
    /// (`tool_choice: none`) and the output format is dropped, so the one
    /// token cannot be an invalid answer; a model whose template renders
    /// tools only when they may be called counts them out.
    async fn count_prompt_tokens(
        &self,
        model: Option<&str>,
        mut request: InferenceRequest,
    ) -> Result<u64> {
        request.max_tokens = Some(1);
        request.temperature = Some(0.0);
        request.stream = false;
        request.n = None;
        request.logprobs = false;
        request.top_logprobs = None;
        request.response_format = None;
        if !request.tools.is_empty() {
            request.tool_choice = Some(ToolChoice::None);
        }
        let response = self
            .generate_at(Endpoint::CountTokens, model, request)
            .await?;
        response
            .usage
            .map(|usage| usage.prompt_tokens)
            .ok_or_else(|| {
                Error::StreamProtocol(
                    "the engine answered without token counts, so the prompt cannot be counted"
                        .to_owned(),
                )
            })
    }

    /// `model`'s token ids for `text` ([`ModelRuntime::tokenize`]).
    async fn tokenize(
        &self,
        model: Option<&str>,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>> {
        let _ = (text, add_special);
        Err(Error::unsupported(
            "tokenize",
            model.unwrap_or("this server").to_owned(),
        ))
    }

    /// The text of `model`'s `tokens` ([`ModelRuntime::detokenize`]).
    async fn detokenize(&self, model: Option<&str>, tokens: &[u32]) -> Result<String> {
        let _ = tokens;
        Err(Error::unsupported(
            "detokenize",
            model.unwrap_or("this server").to_owned(),
        ))
    }

    /// One vector per input ([`ModelRuntime::embed`]) from `model`.
    async fn embed(&self, model: Option<&str>, request: EmbeddingRequest) -> Result<Embeddings> {
        let _ = request;
        Err(Error::unsupported(
            "embeddings",
            model.unwrap_or("this server").to_owned(),
        ))
    }

    /// The models served, as `/v1/models` lists them; empty means the one
    /// model the server was started for.
    async fn models(&self) -> Vec<ModelCard> {
        Vec::new()
    }

    /// Metrics in the Prometheus text format, if the service keeps any.
    async fn metrics(&self) -> Option<String> {
        None
    }

    /// A JSON report of what the service is doing, if it keeps one.
    async fn status(&self) -> Option<Value> {
        None
    }
}

#[async_trait]
impl<R: ModelRuntime + ?Sized + 'static> ModelService for R {
    async fn is_ready(&self) -> bool {
        ModelRuntime::is_ready(self).await
    }

    async fn generate(
        &self,
        _model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<InferenceResponse> {
        ModelRuntime::generate(self, request).await
    }

    async fn generate_events(
        &self,
        _model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        ModelRuntime::generate_events(self, request).await
    }

    async fn tokenize(
        &self,
        _model: Option<&str>,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>> {
        ModelRuntime::tokenize(self, text, add_special).await
    }

    async fn detokenize(&self, _model: Option<&str>, tokens: &[u32]) -> Result<String> {
        ModelRuntime::detokenize(self, tokens).await
    }

    async fn embed(&self, _model: Option<&str>, request: EmbeddingRequest) -> Result<Embeddings> {
        ModelRuntime::embed(self, request).await
    }
}

/// One served model, in the shape of OpenAI's `/v1/models` entries, with
/// whatever a service adds (a gateway's `state`, `backend`, `aliases`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ModelCard {
    /// What clients send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix time the entry was made.
    pub created: u64,
    /// Who serves it.
    pub owned_by: &'static str,
    /// Fields the service adds, flattened into the entry.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ModelCard {
    /// An entry for `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            object: "model",
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            owned_by: "model-runtime",
            extra: Map::new(),
        }
    }

    /// Adds a field.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }
}
