//! An axum router that serves any runtime over the OpenAI chat API, the
//! Responses API and Anthropic's Messages API.
//!
//! Routes: `POST /v1/chat/completions` (plain, and streamed as SSE with a usage
//! chunk when `stream_options.include_usage` is set), `POST /v1/completions`
//! (a raw prompt, no chat template), `POST /v1/embeddings`, `POST /v1/responses`
//! (and `GET`/`DELETE /v1/responses/{id}` for stored ones), `POST
//! /v1/messages` and `/v1/messages/count_tokens` (errors in Anthropic's
//! shape), `POST /tokenize` and `/detokenize` (llama-server's shape, with
//! an optional `model`), `GET /v1/models`, `GET /metrics` and `GET /status` (when the
//! service keeps them), `GET /health`, `GET /version`. The Responses and
//! Messages requests are translated to chat requests here, so every service
//! serves all three.
//!
//! What a local server must refuse, it refuses here, once:
//! - without the API key (when one is set; sent as a bearer token or, as
//!   Anthropic's clients send it, `x-api-key`), every route but `/health`
//!   is 401;
//! - a chat request that is not `Content-Type: application/json` is 415, so a
//!   web page cannot drive the model with a form or a `text/plain` POST (which
//!   browsers send cross-site without asking);
//! - when served on loopback, a request whose `Host` (or `Origin`) is not a
//!   loopback name is 403, so a page on another site cannot reach it through
//!   DNS rebinding;
//! - a request field the server does not implement is 400 naming it;
//! - a failure of the engine is answered with a short generic message and an
//!   error code; what the engine said (its log lines) goes to our log, not to
//!   the client.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use runtime_core::{
    ApiKey, Endpoint, Error, ErrorKind, EventStream, ModelCard, ModelService, Result, StreamEvent,
};
use serde_json::json;
use tracing::Instrument;

use crate::responses::{ResponseStore, StoreLimits};
use crate::wire::{
    ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChunkChoice, Delta,
    ErrorBody, ErrorField, Extra, WireLogprobs, WireToolCallDelta,
};

mod completions;
mod embeddings;
mod messages;
mod responses;
mod tokens;

/// Which `Host` (and `Origin`) names the router accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostPolicy {
    /// Only loopback names (`localhost`, `127.0.0.1`, `[::1]`): right for a
    /// server bound to loopback, and the default.
    #[default]
    Loopback,
    /// Any name: for a server reachable from other hosts (which then needs an
    /// API key).
    Any,
}

impl HostPolicy {
    /// The policy for a server bound to `address`: loopback names for a
    /// loopback address, any name otherwise.
    pub fn for_address(address: &std::net::SocketAddr) -> Self {
        if address.ip().is_loopback() {
            Self::Loopback
        } else {
            Self::Any
        }
    }
}

/// The bearer tokens a server accepts: its clients' keys and its admins'.
///
/// Clones share one set: [`replace`](Self::replace) swaps both lists at
/// once (what a reload does), so every request sees the old keys or the new
/// ones, never a mix, and a rotated-out key stops working at once.
#[derive(Clone, Default)]
pub struct Keys {
    current: Arc<std::sync::RwLock<Arc<KeySet>>>,
}

#[derive(Default)]
struct KeySet {
    clients: Vec<ApiKey>,
    admins: Vec<ApiKey>,
}

impl Keys {
    /// `clients` may use the API (none: no key required), `admins` the
    /// admin routes (none: loopback peers only).
    pub fn new(clients: Vec<ApiKey>, admins: Vec<ApiKey>) -> Self {
        Self {
            current: Arc::new(std::sync::RwLock::new(Arc::new(KeySet { clients, admins }))),
        }
    }

    /// Replaces both lists, atomically for every clone.
    pub fn replace(&self, clients: Vec<ApiKey>, admins: Vec<ApiKey>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Arc::new(KeySet { clients, admins });
    }

    fn snapshot(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.snapshot();
        f.debug_struct("Keys")
            .field("clients", &keys.clients.len())
            .field("admins", &keys.admins.len())
            .finish()
    }
}

/// Re-reads a server's configuration, for `POST /reload`: returns a line
/// saying what changed.
pub type Reload = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + Send>>
        + Send
        + Sync,
>;

/// Settings of the router.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// The model name listed at `/v1/models` and echoed in responses (when
    /// the service does not list its own).
    pub model_name: String,
    /// The bearer tokens clients and admins may send.
    pub keys: Keys,
    /// The largest request body accepted, in bytes (default 4 MiB).
    pub body_limit: usize,
    /// Which `Host` names are accepted (default: loopback only).
    pub hosts: HostPolicy,
    /// What `POST /reload` runs (none: the route answers 404).
    pub reload: Option<Reload>,
    /// How many Responses API responses are kept for
    /// `previous_response_id` (those sent with `store: true`), and for how
    /// long.
    pub stored_responses: StoreLimits,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("model_name", &self.model_name)
            .field("keys", &self.keys)
            .field("body_limit", &self.body_limit)
            .field("hosts", &self.hosts)
            .field("reload", &self.reload.is_some())
            .field("stored_responses", &self.stored_responses)
            .finish()
    }
}

impl ServeOptions {
    /// Options serving `model_name` without a key, with a 4 MiB body limit,
    /// to loopback clients.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            keys: Keys::default(),
            body_limit: 4 * 1024 * 1024,
            hosts: HostPolicy::Loopback,
            reload: None,
            stored_responses: StoreLimits::default(),
        }
    }

    /// Requires `api_key` as a bearer token (no key: none required).
    #[must_use]
    pub fn with_api_key(self, api_key: Option<ApiKey>) -> Self {
        self.with_api_keys(api_key.into_iter().collect())
    }

    /// Accepts any of `api_keys` as a bearer token (none: no key required),
    /// and no admin key.
    #[must_use]
    pub fn with_api_keys(mut self, api_keys: Vec<ApiKey>) -> Self {
        self.keys = Keys::new(api_keys, Vec::new());
        self
    }

    /// Uses `keys`, which its owner may [`replace`](Keys::replace) while
    /// the router serves.
    #[must_use]
    pub fn with_keys(mut self, keys: Keys) -> Self {
        self.keys = keys;
        self
    }

    /// Sets [`hosts`](Self::hosts).
    #[must_use]
    pub fn with_hosts(mut self, hosts: HostPolicy) -> Self {
        self.hosts = hosts;
        self
    }

    /// Sets [`reload`](Self::reload).
    #[must_use]
    pub fn with_reload(mut self, reload: Reload) -> Self {
        self.reload = Some(reload);
        self
    }

    /// Sets [`stored_responses`](Self::stored_responses).
    #[must_use]
    pub fn with_stored_responses(mut self, limits: StoreLimits) -> Self {
        self.stored_responses = limits;
        self
    }
}

/// Refuses to expose a server without an API key on a non-loopback address,
/// unless `allow_without_key` says the caller knows what it does.
pub fn check_exposure(
    address: &std::net::SocketAddr,
    api_key: Option<&ApiKey>,
    allow_without_key: bool,
) -> Result<()> {
    if address.ip().is_loopback() || api_key.is_some() || allow_without_key {
        return Ok(());
    }
    Err(Error::invalid_config(
        "api_key",
        format!(
            "is required to listen on {address}, which other hosts can reach: set one \
             (MODEL_RUNTIME_API_KEY), listen on 127.0.0.1, or allow unauthenticated \
             access explicitly"
        ),
    ))
}

#[derive(Clone)]
struct AppState {
    service: Arc<dyn ModelService>,
    options: Arc<ServeOptions>,
    responses: Arc<ResponseStore>,
}

/// The OpenAI router for `service`.
pub fn router(service: Arc<dyn ModelService>, options: ServeOptions) -> Router {
    let body_limit = options.body_limit;
    let state = AppState {
        service,
        responses: Arc::new(ResponseStore::new(options.stored_responses)),
        options: Arc::new(options),
    };
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions::create))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/messages", post(messages::create))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let admin = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version))
        .merge(api)
        .merge(admin)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            shape_plain_refusals,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// An error response in the OpenAI shape.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl ApiError {
    /// The HTTP status for the error ([`Error::http_status`]).
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The OpenAI error type, from the error's kind (an engine's own type
    /// for its client errors).
    fn kind(&self) -> &str {
        match &self.0 {
            Error::ContextExceeded { .. } => "exceed_context_size_error",
            Error::Api {
                kind: Some(kind),
                status,
                ..
            } if *status < 500 => kind,
            err => match err.kind() {
                ErrorKind::InvalidRequest | ErrorKind::NotFound => "invalid_request_error",
                ErrorKind::Unauthorized => "authentication_error",
                ErrorKind::Busy => "rate_limit_error",
                ErrorKind::Unsupported => "not_implemented_error",
                ErrorKind::Unavailable => "unavailable_error",
                _ => "server_error",
            },
        }
    }

    /// What the client is told: the error's own message for the caller's
    /// mistakes, a generic one for failures of the server or the engine,
    /// whose details (log lines, paths) stay in our log (logged here).
    fn public_message(&self) -> String {
        let status = self.status();
        if !status.is_server_error() {
            return self.0.to_string();
        }
        tracing::warn!(status = status.as_u16(), error = %self.0.with_sources(), "request failed");
        match &self.0 {
            // Its reason is written for clients; an invalid answer's
            // is about the client's own answer and schema.
            Error::ModelUnavailable { .. }
            | Error::OutputInvalid { .. }
            | Error::Unsupported { .. } => self.0.to_string(),
            Error::EngineExited { .. } => {
                "the model's engine stopped; the server log says why".to_owned()
            }
            Error::EngineUnresponsive { .. } => "the model's engine stopped answering".to_owned(),
            Error::ShutDown => "the server is shutting down".to_owned(),
            Error::NotInitialized => "the model is not loaded".to_owned(),
            _ => "the model's engine failed; the server log says why".to_owned(),
        }
    }

    /// The body in the OpenAI shape ([`public_message`](Self::public_message)).
    fn body(&self) -> ErrorBody {
        let status = self.status();
        let mut body = ErrorBody::new(self.public_message(), self.kind(), status.as_u16());
        if status.is_server_error() {
            if let ErrorField::Detail(detail) = &mut body.error {
                detail.code = Some(self.0.code().into());
            }
            return body;
        }
        if let ErrorField::Detail(detail) = &mut body.error {
            match &self.0 {
                Error::InvalidRequest { field, .. } => detail.param = Some(field.to_string()),
                Error::ModelNotServed { .. } => {
                    detail.param = Some("model".to_owned());
                    detail.code = Some(self.0.code().into());
                }
                _ => {}
            }
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let response = (self.status(), Json(self.body())).into_response();
        self.with_retry_after(response)
    }
}

impl ApiError {
    /// `Retry-After` on a response to a busy or loading model.
    fn with_retry_after(&self, mut response: Response) -> Response {
        let retry_after = match &self.0 {
            Error::Busy(_) => Some(1),
            Error::ModelUnavailable { retry_after, .. } => {
                Some(retry_after.map_or(1, |after| after.as_secs_f64().ceil().max(1.0) as u64))
            }
            _ => None,
        };
        if let Some(seconds) = retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

fn refusal(status: StatusCode, message: &str, kind: &str) -> Response {
    (status, Json(ErrorBody::new(message, kind, status.as_u16()))).into_response()
}

/// The most bytes of a plain-text refusal read to carry over into the
/// JSON one.
const PLAIN_REFUSAL_BYTES: usize = 4096;

/// axum's own refusals, made before a handler runs (a body over the limit:
/// 413), are plain text; clients read errors as JSON in their API's shape,
/// so they are reshaped here: Anthropic's on the Messages routes, OpenAI's
/// elsewhere.
async fn shape_plain_refusals(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let messages = messages::is_messages_route(request.uri().path());
    let response = next.run(request).await;
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|mime| mime.starts_with("text/plain"));
    let status = response.status();
    if !(status.is_client_error() && plain) {
        return response;
    }
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "the request body is over this server's limit of {} bytes; send a smaller one",
            state.options.body_limit
        )
    } else {
        match axum::body::to_bytes(response.into_body(), PLAIN_REFUSAL_BYTES).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => status.canonical_reason().unwrap_or("refused").to_owned(),
        }
    };
    if messages {
        messages::refusal(status, &message)
    } else {
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "invalid_request_error"
        };
        refusal(status, &message, kind)
    }
}

/// The API's routes require a client key, when any is configured.
async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = state.options.keys.snapshot();
    if keys.clients.is_empty() || matches_any(&keys.clients, bearer(request.headers())) {
        next.run(request).await
    } else if messages::is_messages_route(request.uri().path()) {
        messages::refusal(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key (send it as `x-api-key` or a bearer token)",
        )
    } else {
        unauthorized()
    }
}

/// `/status`, `/metrics` and `/reload` require an admin key when any is
/// configured (a client key is not one: 403); with none, they answer
/// loopback peers only, with the client key if clients need one. What they
/// tell (engines' log lines, paths) and do (a reload) is the operator's.
async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = state.options.keys.snapshot();
    let given = bearer(request.headers());
    if !keys.admins.is_empty() {
        if matches_any(&keys.admins, given) {
            return next.run(request).await;
        }
        if matches_any(&keys.clients, given) {
            return refusal(
                StatusCode::FORBIDDEN,
                "this route needs an admin key",
                "permission_error",
            );
        }
        return unauthorized();
    }
    let loopback = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .is_some_and(|peer| peer.0.ip().is_loopback());
    if !loopback {
        return refusal(
            StatusCode::FORBIDDEN,
            "this route answers loopback clients only, unless an admin key is configured",
            "permission_error",
        );
    }
    if keys.clients.is_empty() || matches_any(&keys.clients, given) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

fn unauthorized() -> Response {
    refusal(
        StatusCode::UNAUTHORIZED,
        "invalid or missing API key",
        "authentication_error",
    )
}

/// The key a request presents: its bearer token, else its `x-api-key`
/// (Anthropic's clients send that), if it sends one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|value| value.to_str().ok())
        })
}

/// Whether `given` is one of `keys` ([`ApiKey::any_matches`]).
fn matches_any(keys: &[ApiKey], given: Option<&str>) -> bool {
    given.is_some_and(|given| ApiKey::any_matches(keys, given))
}

/// On loopback, `Host` and `Origin` must name loopback: a page elsewhere that
/// rebinds its name to 127.0.0.1 still sends its own name.
async fn check_host(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.options.hosts == HostPolicy::Loopback {
        let headers = request.headers();
        let host_ok = headers
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|host| is_loopback_name(authority_host(host)));
        let origin_ok = headers
            .get(header::ORIGIN)
            .and_then(|value| value.to_str().ok())
            .is_none_or(|origin| {
                origin
                    .split_once("://")
                    .is_some_and(|(_, rest)| is_loopback_name(authority_host(rest)))
            });
        if !(host_ok && origin_ok) {
            let message = "this server only answers requests addressed to localhost";
            if messages::is_messages_route(request.uri().path()) {
                return messages::refusal(StatusCode::FORBIDDEN, message);
            }
            return refusal(StatusCode::FORBIDDEN, message, "permission_error");
        }
    }
    next.run(request).await
}

/// The host part of `host[:port]` or `[v6]:port`.
fn authority_host(authority: &str) -> &str {
    let authority = authority.split('/').next().unwrap_or(authority);
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

fn is_loopback_name(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The server's software, as vLLM's `/version` says its own.
async fn version() -> Response {
    Json(json!({"version": concat!("model-runtime ", env!("CARGO_PKG_VERSION"))})).into_response()
}

async fn health(State(state): State<AppState>) -> Response {
    if state.service.is_ready().await {
        Json(json!({"status": "ok"})).into_response()
    } else {
        ApiError(Error::NotInitialized).into_response()
    }
}

/// The endpoints this router serves every model at (all are translated to
/// the service's chat and raw-prompt requests), as `/v1/models` lists them.
const ENDPOINTS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
];

async fn models(State(state): State<AppState>) -> Response {
    let mut cards = state.service.models().await;
    if cards.is_empty() {
        cards.push(ModelCard::new(state.options.model_name.clone()));
    }
    let cards: Vec<ModelCard> = cards
        .into_iter()
        .map(|card| {
            if card.extra.contains_key("endpoints") {
                return card;
            }
            // A model without a chat template takes raw prompts only; an
            // embedding model, embeddings only.
            let capability = |name: &str, default: bool| {
                card.extra
                    .get("capabilities")
                    .and_then(|c| c.get(name))
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(default)
            };
            let mut endpoints: Vec<&str> =
                match (capability("generation", true), capability("chat", true)) {
                    (false, _) => Vec::new(),
                    (true, true) => ENDPOINTS.to_vec(),
                    (true, false) => vec!["/v1/completions"],
                };
            if capability("embeddings", false) {
                endpoints.push("/v1/embeddings");
            }
            card.with("endpoints", endpoints)
        })
        .collect();
    Json(json!({"object": "list", "data": cards})).into_response()
}

async fn status(State(state): State<AppState>) -> Response {
    match state.service.status().await {
        Some(report) => Json(report).into_response(),
        None => refusal(
            StatusCode::NOT_FOUND,
            "this server keeps no status report",
            "invalid_request_error",
        ),
    }
}

async fn reload(State(state): State<AppState>) -> Response {
    let Some(reload) = state.options.reload.clone() else {
        return refusal(
            StatusCode::NOT_FOUND,
            "this server has no configuration file to reload",
            "invalid_request_error",
        );
    };
    match reload().await {
        Ok(detail) => Json(json!({"status": "reloaded", "detail": detail})).into_response(),
        // A bad file is the operator's mistake, not the server's failure.
        Err(err @ Error::InvalidConfig { .. }) => (
            StatusCode::BAD_REQUEST,
            Json(ErrorBody::new(
                err.to_string(),
                "invalid_request_error",
                400,
            )),
        )
            .into_response(),
        Err(err) => ApiError(err).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    match state.service.metrics().await {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
        None => refusal(
            StatusCode::NOT_FOUND,
            "this server keeps no metrics",
            "invalid_request_error",
        ),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// A JSON request body, `what` for the error, parsed here rather than by
/// axum's `Json` extractor so that a wrong content type (415) and malformed
/// JSON (400) get the OpenAI error shape too; or the refusal.
fn read_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
    what: &str,
) -> std::result::Result<T, Box<Response>> {
    if !is_json(headers) {
        return Err(Box::new(refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the request as JSON with Content-Type: application/json",
            "invalid_request_error",
        )));
    }
    serde_json::from_slice(body).map_err(|err| {
        Box::new(
            ApiError(Error::invalid_request(
                "body",
                format!("is not a valid {what}: {err}"),
            ))
            .into_response(),
        )
    })
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let wire: ChatCompletionRequest = match read_json(&headers, &body, "chat completion request") {
        Ok(wire) => wire,
        Err(refused) => return *refused,
    };
    let include_usage = wire.wants_usage();
    let requested = wire.model.clone();
    let request = match wire.into_inference() {
        Ok(request) => request,
        Err(err) => return ApiError(err).into_response(),
    };
    if request.stream && request.choices() > 1 {
        return ApiError(Error::invalid_request(
            "n",
            "is more than 1 on a streamed request; several answers are served non-streamed \
             only (send `stream: false`)",
        ))
        .into_response();
    }
    let id = completion_id();
    let model = requested
        .clone()
        .unwrap_or_else(|| state.options.model_name.clone());
    // One span per request, around everything the request does below us (the
    // gateway, the engine client) and around its stream's body too.
    let span = tracing::info_span!("chat", model = %model, id = %id, stream = request.stream);
    let service = &state.service;
    if request.stream {
        let started = service
            .generate_events_at(Endpoint::ChatCompletions, requested.as_deref(), request)
            .instrument(span.clone())
            .await;
        match started {
            Ok(events) => {
                let chunks = InSpan::new(sse_chunks(events, id, model, include_usage), span);
                Sse::new(chunks)
                    .keep_alive(KeepAlive::default())
                    .into_response()
            }
            Err(err) => span.in_scope(|| ApiError(err).into_response()),
        }
    } else {
        let answered = service
            .generate_at(Endpoint::ChatCompletions, requested.as_deref(), request)
            .instrument(span.clone())
            .await;
        span.in_scope(|| match answered {
            Ok(response) => Json(ChatCompletionResponse::from_inference(
                &response,
                &id,
                &model,
                unix_time(),
            ))
            .into_response(),
            Err(err) => ApiError(err).into_response(),
        })
    }
}

/// A stream whose every poll runs inside `span`.
struct InSpan<S> {
    inner: std::pin::Pin<Box<S>>,
    span: tracing::Span,
}

impl<S> InSpan<S> {
    fn new(inner: S, span: tracing::Span) -> Self {
        Self {
            inner: Box::pin(inner),
            span,
        }
    }
}

impl<S: Stream> Stream for InSpan<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = &mut *self;
        let _entered = this.span.enter();
        this.inner.as_mut().poll_next(cx)
    }
}

/// The SSE body: a role chunk, content chunks, the finish chunk, an optional
/// usage chunk, `[DONE]`. An error mid-stream (or an end without a finish) is
/// sent as an `error` event object, as OpenAI-compatible engines do, and ends
/// the stream.
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
            logprobs: None,
            text: None,
        }],
        usage,
        extra: Extra::new(),
    };
    let first = chunk(
        Delta {
            role: Some("assistant".to_owned()),
            content: Some(String::new()),
            tool_calls: None,
        },
        None,
        None,
    );
    let head = futures::stream::once(async move { data_event(&first) });
    let body = runtime_core::ensure_finished(events).flat_map(move |event| {
        let out: Vec<Event> = match event {
            Ok(StreamEvent::Delta(text)) => vec![data_event(&chunk(
                Delta {
                    content: Some(text),
                    ..Delta::default()
                },
                None,
                None,
            ))],
            Ok(StreamEvent::ToolCall(call)) => vec![data_event(&chunk(
                Delta {
                    tool_calls: Some(vec![WireToolCallDelta::from(&call)]),
                    ..Delta::default()
                },
                None,
                None,
            ))],
            Ok(StreamEvent::Logprobs(tokens)) => {
                let mut with = chunk(Delta::default(), None, None);
                with.choices[0].logprobs = Some(WireLogprobs::from_tokens(&tokens));
                vec![data_event(&with)]
            }
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
            Err(err) => vec![data_event(&ApiError(err).body())],
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
    new_id("chatcmpl-")
}

/// A fresh id: `prefix` and 128 random bits in hex (a counter and the clock
/// where the system has no randomness to give), so a stored response's id
/// cannot be guessed from another's.
fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let fallback = (u128::from(NEXT.fetch_add(1, Ordering::Relaxed)) << 64) ^ nanos;
        bytes = fallback.to_le_bytes();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn engine_failures_reach_the_client_without_the_engines_words() {
        let err = Error::EngineExited {
            engine: "llama-server".into(),
            status: "signal: 9".into(),
            log_tail: vec!["loading /home/alice/secret-model.gguf".into()],
        };
        let body = serde_json::to_string(&ApiError(err).body()).unwrap();
        assert!(!body.contains("alice"), "{body}");
        assert!(body.contains("engine_exited"), "{body}");
    }

    struct Silent;

    #[async_trait::async_trait]
    impl ModelService for Silent {
        async fn is_ready(&self) -> bool {
            true
        }
        async fn generate(
            &self,
            _: Option<&str>,
            _: runtime_core::InferenceRequest,
        ) -> Result<runtime_core::InferenceResponse> {
            Err(Error::NotInitialized)
        }
        async fn generate_events(
            &self,
            _: Option<&str>,
            _: runtime_core::InferenceRequest,
        ) -> Result<EventStream> {
            Err(Error::NotInitialized)
        }
    }

    /// A body over the limit, sent to `path`: its status and JSON body.
    async fn oversized(path: &str) -> (StatusCode, serde_json::Value) {
        use tower::ServiceExt;
        let mut options = ServeOptions::new("m");
        options.body_limit = 64;
        let app = router(Arc::new(Silent), options);
        let request = Request::post(path)
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(vec![b' '; 1000]))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|err| panic!("{path}: not JSON ({err}): {bytes:?}"));
        (status, body)
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_in_the_shape_of_its_api() {
        let (status, openai) = oversized("/v1/chat/completions").await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(openai["error"]["type"], "request_too_large", "{openai}");
        assert!(
            openai["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("limit of 64 bytes")),
            "{openai}"
        );
        let (status, anthropic) = oversized("/v1/messages").await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(anthropic["type"], "error", "{anthropic}");
        assert_eq!(
            anthropic["error"]["type"], "request_too_large",
            "{anthropic}"
        );
    }

    #[test]
    fn loopback_names_are_recognised_in_host_headers() {
        for host in [
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:8080",
            "LOCALHOST",
            "127.0.0.2",
        ] {
            assert!(is_loopback_name(authority_host(host)), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "10.0.0.1:80",
            "localhost.evil.example",
        ] {
            assert!(!is_loopback_name(authority_host(host)), "{host}");
        }
    }
}
