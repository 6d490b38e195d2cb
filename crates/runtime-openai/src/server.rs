//! An axum router that serves any runtime over the OpenAI chat API.
//!
//! Routes: `POST /v1/chat/completions` (plain, and streamed as SSE with a usage
//! chunk when `stream_options.include_usage` is set), `GET /v1/models`,
//! `GET /health`. Errors use the OpenAI error shape with 4xx codes for the
//! caller's mistakes. An API key, when configured, is required on every route
//! but `/health`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::wire::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChunkChoice, Delta,
    ErrorBody, Extra,
};
use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use runtime_core::{
    Error, EventStream, InferenceRequest, InferenceResponse, ModelRuntime, Result, StreamEvent,
};
use serde_json::json;

/// What the router needs from whatever serves the chat API: a runtime, a
/// runtime manager that can swap engines, or an in-process engine.
#[async_trait]
pub trait ChatService: Send + Sync + 'static {
    /// Whether requests can be served now.
    async fn is_ready(&self) -> bool;
    /// A complete answer.
    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse>;
    /// An answer as events ending in [`StreamEvent::Finished`].
    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream>;
}

#[async_trait]
impl<R: ModelRuntime + ?Sized + 'static> ChatService for R {
    async fn is_ready(&self) -> bool {
        ModelRuntime::is_ready(self).await
    }

    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse> {
        ModelRuntime::generate(self, request).await
    }

    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream> {
        ModelRuntime::generate_events(self, request).await
    }
}

/// Settings of the router.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// The model name listed at `/v1/models` and echoed in responses.
    pub model_name: String,
    /// The bearer token clients must send, if any.
    pub api_key: Option<String>,
    /// The largest request body accepted, in bytes (default 4 MiB).
    pub body_limit: usize,
}

impl ServeOptions {
    /// Options serving `model_name` without a key and with a 4 MiB body limit.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            api_key: None,
            body_limit: 4 * 1024 * 1024,
        }
    }

    /// Requires `api_key` as a bearer token.
    #[must_use]
    pub fn with_api_key(mut self, api_key: Option<String>) -> Self {
        self.api_key = api_key;
        self
    }
}

#[derive(Clone)]
struct AppState {
    service: Arc<dyn ChatService>,
    options: Arc<ServeOptions>,
}

/// The OpenAI router for `service`.
pub fn router(service: Arc<dyn ChatService>, options: ServeOptions) -> Router {
    let body_limit = options.body_limit;
    let state = AppState {
        service,
        options: Arc::new(options),
    };
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// An error response in the OpenAI shape.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl ApiError {
    fn status(&self) -> StatusCode {
        match &self.0 {
            Error::InvalidRequest { .. } | Error::ContextExceeded { .. } => StatusCode::BAD_REQUEST,
            Error::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::NotInitialized | Error::ShutDown => StatusCode::SERVICE_UNAVAILABLE,
            Error::EngineExited { .. } | Error::Transport(_) | Error::StreamProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            Error::Api { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &str {
        match &self.0 {
            Error::InvalidRequest { .. } => "invalid_request_error",
            Error::ContextExceeded { .. } => "exceed_context_size_error",
            Error::Busy(_) => "rate_limit_error",
            Error::NotInitialized | Error::ShutDown => "unavailable_error",
            Error::Api {
                kind: Some(kind), ..
            } => kind,
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = ErrorBody::new(self.0.to_string(), self.kind(), status.as_u16());
        if let (Error::InvalidRequest { field, .. }, crate::wire::ErrorField::Detail(detail)) =
            (&self.0, &mut body.error)
        {
            detail.param = Some((*field).to_owned());
        }
        (status, Json(body)).into_response()
    }
}

/// Every route but `/health` requires the API key, when one is configured.
async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if authorized(&state.options, request.headers()) {
        next.run(request).await
    } else {
        let body = ErrorBody::new("invalid or missing API key", "authentication_error", 401);
        (StatusCode::UNAUTHORIZED, Json(body)).into_response()
    }
}

fn authorized(options: &ServeOptions, headers: &HeaderMap) -> bool {
    let Some(expected) = &options.api_key else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes()))
}

/// Compares without an early exit, so timing does not reveal the key's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(state): State<AppState>) -> Response {
    if state.service.is_ready().await {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError(Error::NotInitialized).into_response()
    }
}

async fn models(State(state): State<AppState>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.options.model_name,
            "object": "model",
            "created": unix_time(),
            "owned_by": "model-runtime",
        }],
    }))
    .into_response()
}

async fn chat_completions(State(state): State<AppState>, body: Bytes) -> Response {
    // Parsed here rather than by axum's Json extractor so malformed JSON gets
    // the OpenAI error shape too.
    let wire: ChatCompletionRequest = match serde_json::from_slice(&body) {
        Ok(wire) => wire,
        Err(err) => {
            return ApiError(Error::invalid_request(
                "body",
                format!("is not a valid chat completion request: {err}"),
            ))
            .into_response();
        }
    };
    let include_usage = wire.wants_usage();
    let request = match wire.into_inference() {
        Ok(request) => request,
        Err(err) => return ApiError(err).into_response(),
    };
    let id = completion_id();
    let model = state.options.model_name.clone();
    if request.stream {
        match state.service.generate_events(request).await {
            Ok(events) => {
                let chunks = sse_chunks(events, id, model, include_usage);
                Sse::new(chunks)
                    .keep_alive(KeepAlive::default())
                    .into_response()
            }
            Err(err) => ApiError(err).into_response(),
        }
    } else {
        match state.service.generate(request).await {
            Ok(response) => Json(ChatCompletionResponse::from_inference(
                &response,
                &id,
                &model,
                unix_time(),
            ))
            .into_response(),
            Err(err) => ApiError(err).into_response(),
        }
    }
}

/// The SSE body: a role chunk, content chunks, the finish chunk, an optional
/// usage chunk, `[DONE]`. An error mid-stream is sent as an `error` event
/// object, as OpenAI-compatible engines do, and ends the stream.
fn sse_chunks(
    events: EventStream,
    id: String,
    model: String,
    include_usage: bool,
) -> impl Stream<Item = std::result::Result<Event, Infallible>> + Send {
    let created = unix_time();
    let chunk = move |delta: Delta, finish_reason, usage| ChatCompletionChunk {
        id: id.clone(),
        object: "chat.completion.chunk".to_owned(),
        created,
        model: model.clone(),
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason,
        }],
        usage,
        extra: Extra::new(),
    };
    let first = chunk(
        Delta {
            role: Some("assistant".to_owned()),
            content: None,
        },
        None,
        None,
    );
    let head = futures::stream::once(async move { data_event(&first) });
    let body = events.flat_map(move |event| {
        let out: Vec<Event> = match event {
            Ok(StreamEvent::Delta(text)) => vec![data_event(&chunk(
                Delta {
                    role: None,
                    content: Some(text),
                },
                None,
                None,
            ))],
            Ok(StreamEvent::Finished {
                finish_reason,
                usage,
                ..
            }) => {
                let mut out = vec![data_event(&chunk(Delta::default(), finish_reason, None))];
                if include_usage {
                    let mut last = chunk(Delta::default(), None, usage);
                    last.choices.clear();
                    out.push(data_event(&last));
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
            Ok(_) => Vec::new(),
            Err(err) => {
                let api = ApiError(err);
                let body = ErrorBody::new(api.0.to_string(), api.kind(), api.status().as_u16());
                vec![data_event(&body)]
            }
        };
        futures::stream::iter(out.into_iter().map(Ok))
    });
    head.map(Ok).chain(body)
}

fn data_event(value: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|err| {
        json!({"error": {"message": format!("serialising a chunk: {err}")}}).to_string()
    }))
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn completion_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "chatcmpl-{:x}{:08x}",
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
    }

    #[test]
    fn client_mistakes_map_to_4xx_and_engine_failures_to_5xx() {
        let status = |err| ApiError(err).status().as_u16();
        assert_eq!(status(Error::invalid_request("messages", "is empty")), 400);
        assert_eq!(
            status(Error::ContextExceeded {
                prompt_tokens: 9,
                context_size: 4
            }),
            400
        );
        assert_eq!(status(Error::Busy("full".into())), 429);
        assert_eq!(status(Error::NotInitialized), 503);
        assert_eq!(
            status(Error::Api {
                status: 404,
                kind: None,
                message: String::new()
            }),
            404
        );
        assert_eq!(
            status(Error::engine("boom", std::io::Error::other("x"))),
            500
        );
    }
}
