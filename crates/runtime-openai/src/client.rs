//! An HTTP client for OpenAI-compatible engines.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::completions::CompletionRequest;
use crate::embeddings::{EmbeddingsRequest, EmbeddingsResponse};
use crate::wire::{ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ErrorBody};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use runtime_core::{
    ApiKey, EmbeddingInput, Embeddings, Error, EventStream, FinishReason, InferenceRequest,
    InferenceResponse, Result, StreamEvent, Timings, Usage, collect_events,
};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::heartbeat::{Heartbeat, Pulse};
use crate::sse::{SseDecoder, SseEvent};
use crate::tls;

/// Chunks buffered between the task reading a response body and its reader.
const PUMP_BUFFER: usize = 64;

/// Timeouts of an [`OpenAiClient`].
///
/// There is deliberately no whole-request timeout: a long generation must not
/// be cut. Connecting is bounded; a response that sends no bytes at all (not
/// even a keep-alive) for `idle` fails, as a backstop; and with a
/// [`Heartbeat`] a hung engine fails its requests within its hang timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientTimeouts {
    /// Bound on establishing the TCP connection.
    pub connect: Duration,
    /// Bound on the silence between two chunks of a response (default 300 s).
    pub idle: Duration,
    /// Bound on waiting for a response's headers, if any (a remote server
    /// answers headers at once; a local engine with every slot busy does not).
    pub request: Option<Duration>,
}

/// How an [`OpenAiClient`] reaches its server: fresh connections to an
/// engine on loopback ([`ClientOptions::loopback`]), or pooled ones (with TLS
/// where the URL says `https`) to a server elsewhere ([`ClientOptions::remote`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Connect, idle and request bounds.
    pub timeouts: ClientTimeouts,
    /// Keep connections for reuse. Off for loopback engines, which close
    /// idle connections on their own schedule (a request written to one that
    /// is closing cannot be retried safely); on for remote servers over
    /// HTTPS, where a TLS handshake per request would cost.
    pub pooled: bool,
    /// How many times to try again a request whose connection could not be
    /// made: it provably never reached the server. Nothing else is retried.
    pub connect_retries: u32,
    /// PEM certificates to trust besides the system's (a private CA, a
    /// self-signed gateway). Needs the `tls` feature.
    pub root_certificates: Vec<Vec<u8>>,
    /// Reach the server through this Unix socket instead of TCP (an engine
    /// listening on a private socket); the URL's host is then only the
    /// `Host` header.
    pub unix_socket: Option<std::path::PathBuf>,
}

impl ClientOptions {
    /// A fresh connection per request, no retries: for an engine on loopback.
    pub fn loopback(timeouts: ClientTimeouts) -> Self {
        Self {
            timeouts,
            ..Self::default()
        }
    }

    /// Two retries of a failed connect, for a server elsewhere; connections
    /// pooled when the URL is `https` (a TLS handshake per request costs
    /// round trips), fresh ones over plain HTTP, where a new connection
    /// costs one and pooling loses more with servers that close connections
    /// after each response (llama-server: about 100 ms a request, measured by
    /// `cargo xtask bench distributed`).
    pub fn remote(base_url: &str, timeouts: ClientTimeouts) -> Self {
        Self {
            timeouts,
            pooled: base_url.starts_with("https://"),
            connect_retries: 2,
            root_certificates: Vec::new(),
            unix_socket: None,
        }
    }

    /// A fresh connection per request over the Unix socket at `path`: for
    /// an engine listening on a private socket.
    pub fn unix_socket(path: impl Into<std::path::PathBuf>, timeouts: ClientTimeouts) -> Self {
        Self {
            unix_socket: Some(path.into()),
            ..Self::loopback(timeouts)
        }
    }

    /// Trusts `pem` (one or more certificates) besides the system's roots.
    #[must_use]
    pub fn with_root_certificate(mut self, pem: Vec<u8>) -> Self {
        self.root_certificates.push(pem);
        self
    }
}

impl ClientTimeouts {
    /// Timeouts with the given idle bound and a 5 s connect bound.
    pub fn with_idle(idle: Duration) -> Self {
        Self {
            idle,
            ..Self::default()
        }
    }
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            idle: Duration::from_secs(300),
            request: None,
        }
    }
}

/// A client for one engine's OpenAI-compatible API.
///
/// Cheap to clone; clones share their heartbeat and
/// [`close_streams`](Self::close_streams). Every request opens a connection of
/// its own (see [`OpenAiClient::new`]).
#[derive(Debug, Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<ApiKey>,
    model: Option<String>,
    timeouts: ClientTimeouts,
    connect_retries: u32,
    /// Set by [`OpenAiClient::close_streams`]; every request watches it.
    closing: Arc<watch::Sender<bool>>,
    /// The engine's liveness, when a heartbeat runs.
    pulse: Option<Arc<Pulse>>,
    /// Whether chat bodies ask for a final assistant message to be continued
    /// ([`with_continue_final_message`](Self::with_continue_final_message)).
    continue_final_message: bool,
}

impl OpenAiClient {
    /// A client for the engine at `base_url` (`http://127.0.0.1:8080`), sending
    /// `api_key` as a bearer token when given, and `model` as the request's model.
    ///
    /// Connections are not pooled: each request connects afresh, because an
    /// engine may close an idle connection just as a request is written to it.
    pub fn new(
        base_url: impl Into<String>,
        api_key: Option<ApiKey>,
        model: Option<String>,
        timeouts: ClientTimeouts,
    ) -> Result<Self> {
        Self::with_options(base_url, api_key, model, ClientOptions::loopback(timeouts))
    }

    /// A client reaching its server as `options` say.
    pub fn with_options(
        base_url: impl Into<String>,
        api_key: Option<ApiKey>,
        model: Option<String>,
        options: ClientOptions,
    ) -> Result<Self> {
        let base_url = base_url.into().trim_end_matches('/').to_owned();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.timeouts.connect)
            .tcp_nodelay(true);
        if !options.pooled {
            // No idle connections are kept. Engines close them on their own
            // schedule (llama-server after every chat response and after 5 s
            // of keep-alive), and a request written to one that is closing
            // fails with an incomplete message that cannot be retried safely:
            // the engine may have seen it. A fresh loopback connection costs
            // a fraction of a millisecond against a generation.
            builder = builder.pool_max_idle_per_host(0).no_proxy();
        }
        builder = tls::configure(builder, &base_url, &options.root_certificates)?;
        if let Some(path) = &options.unix_socket {
            builder = unix_socket(builder, path)?;
        }
        let http = builder.build().map_err(transport)?;
        Ok(Self {
            http,
            base_url,
            api_key,
            model,
            timeouts: options.timeouts,
            connect_retries: options.connect_retries,
            closing: Arc::new(watch::channel(false).0),
            pulse: None,
            continue_final_message: false,
        })
    }

    /// Tells the server, in vLLM's words (`continue_final_message`), to
    /// continue a conversation's final assistant message rather than answer
    /// it anew ([`InferenceRequest::prefill`]). For a server that does so only
    /// when told; llama-server does it by itself, and other servers may
    /// refuse the fields.
    #[must_use]
    pub fn with_continue_final_message(mut self, on: bool) -> Self {
        self.continue_final_message = on;
        self
    }

    fn chat_body(&self, request: &InferenceRequest, stream: bool) -> ChatCompletionRequest {
        let mut body =
            ChatCompletionRequest::from_inference(request, self.model.as_deref(), stream);
        if self.continue_final_message && request.prefill().is_some() {
            body.ask_to_continue_final_message();
        }
        body
    }

    /// Starts a heartbeat: from now on the engine is probed in the background,
    /// and when it has answered no probe for the heartbeat's hang timeout,
    /// every request waiting on it (for its headers or for the next chunk)
    /// fails with [`Error::EngineUnresponsive`], as do new requests until it
    /// answers again. A slow engine still answers its probes and is left
    /// alone. Must be called within a tokio runtime; the heartbeat stops when
    /// the last clone of this client is dropped.
    #[must_use]
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        let probe = self.clone();
        self.pulse = Some(Arc::new(Pulse::start(heartbeat, probe)));
        self
    }

    /// Whether the engine answers its heartbeat (always true without one).
    pub fn is_responsive(&self) -> bool {
        self.pulse
            .as_ref()
            .is_none_or(|pulse| pulse.silent_for().is_none())
    }

    /// [`Error::EngineUnresponsive`] if the heartbeat says the engine hangs.
    pub fn unresponsive_error(&self) -> Option<Error> {
        let pulse = self.pulse.as_ref()?;
        let silent_for = pulse.silent_for()?;
        Some(Error::EngineUnresponsive {
            engine: pulse.engine.clone(),
            silent_for,
        })
    }

    /// Ends every open stream of this client and its clones with
    /// [`Error::ShutDown`] and closes their connections at once, whether or not
    /// anyone is reading them; requests still waiting for their response end
    /// the same way. Engines such as llama-server wait for open connections
    /// before they exit.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// The engine's HTTP root.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET {base_url}{path}`: the status and body, whatever the status.
    ///
    /// `timeout` bounds the whole exchange: meant for probes and small documents.
    pub async fn get(&self, path: &str, timeout: Duration) -> Result<(u16, Bytes)> {
        self.get_with(path, timeout, true).await
    }

    /// `GET {base_url}{path}` without the API key, for endpoints that need
    /// none (`/health`): a probe must not hand the key to whatever answers.
    pub async fn get_anonymous(&self, path: &str, timeout: Duration) -> Result<(u16, Bytes)> {
        self.get_with(path, timeout, false).await
    }

    async fn get_with(
        &self,
        path: &str,
        timeout: Duration,
        authorized: bool,
    ) -> Result<(u16, Bytes)> {
        let mut builder = self.http.get(self.url(path)).timeout(timeout);
        if authorized {
            builder = self.authorized(builder);
        }
        let response = builder.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(transport)?;
        Ok((status, body))
    }

    /// `GET {base_url}{path}` as JSON; a non-2xx status is an [`Error::Api`].
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<T> {
        let (status, body) = self.get(path, timeout).await?;
        if !(200..300).contains(&status) {
            return Err(ErrorBody::to_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|err| Error::Api {
            status,
            kind: None,
            message: format!("{path} answered with unexpected JSON: {err}"),
        })
    }

    /// `POST {base_url}{path}` with a JSON body, answered as JSON within
    /// `timeout`; a non-2xx status is the engine's error.
    pub async fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &(impl serde::Serialize + Sync),
        timeout: Duration,
    ) -> Result<T> {
        let answered = async {
            let response = self.post(path, body).await?;
            let status = response.status().as_u16();
            let bytes = response.bytes().await.map_err(transport)?;
            serde_json::from_slice(&bytes).map_err(|err| Error::Api {
                status,
                kind: None,
                message: format!("{path} answered with unexpected JSON: {err}"),
            })
        };
        tokio::time::timeout(timeout, answered)
            .await
            .map_err(|_| Error::Transport(format!("{path}: no answer within {timeout:?}").into()))?
    }

    /// Whether `GET /health` (sent without the key) answers 200 within `timeout`.
    pub async fn is_healthy(&self, timeout: Duration) -> bool {
        matches!(self.get_anonymous("/health", timeout).await, Ok((200, _)))
    }

    /// A chat completion, whole.
    ///
    /// Run over the streamed API and collected, so that it has the same
    /// protection as a stream: the idle backstop, the heartbeat, and
    /// cancellation in the engine the moment the future is dropped (a
    /// non-streamed request is noticed by llama-server only at its next 1 s
    /// check). Several answers (`n > 1`) are the exception: they are asked
    /// for whole, as a stream would interleave their chunks, with the
    /// heartbeat still ending the request if the engine hangs.
    pub async fn chat(&self, request: &InferenceRequest) -> Result<InferenceResponse> {
        if request.choices() == 1 {
            return collect_events(self.chat_stream(request).await?).await;
        }
        // Several answers come whole: a stream interleaves their chunks.
        let body = self.chat_body(request, false);
        let mut interrupts = self.interrupts();
        let answer = async {
            let response = self.post("/v1/chat/completions", &body).await?;
            let bytes = response.bytes().await.map_err(transport)?;
            serde_json::from_slice::<ChatCompletionResponse>(&bytes).map_err(|err| {
                Error::StreamProtocol(format!(
                    "the engine's chat completion does not parse: {err}"
                ))
            })
        };
        let span = tracing::debug_span!("engine_request", url = %self.url("/v1/chat/completions"));
        tokio::select! {
            answer = answer.instrument(span) => Ok(answer?.into_inference()),
            err = interrupts.fired() => Err(err),
        }
    }

    /// A streamed chat completion, as events ending in [`StreamEvent::Finished`].
    ///
    /// Usage is requested (`stream_options.include_usage`). The stream ends after
    /// `data: [DONE]`; an error object inside the stream becomes a typed error.
    /// Dropping the stream closes the connection at once (the body is read by a
    /// task of its own), which makes the engine cancel the generation;
    /// [`close_streams`](Self::close_streams) does the same for every stream.
    pub async fn chat_stream(&self, request: &InferenceRequest) -> Result<EventStream> {
        let body = self.chat_body(request, true);
        self.stream_from("/v1/chat/completions", &body).await
    }

    /// One vector per input from the engine's `/v1/embeddings`, in input
    /// order, with the heartbeat ending the request if the engine hangs.
    /// `truncate` asks the server to cut overlong inputs (an extension of
    /// ours and text-embeddings-inference's; sent only when set).
    pub async fn embeddings(
        &self,
        inputs: &[EmbeddingInput],
        truncate: bool,
    ) -> Result<Embeddings> {
        let body = EmbeddingsRequest::for_engine(inputs, self.model.as_deref(), truncate);
        let mut interrupts = self.interrupts();
        let answer = async {
            let response = self.post("/v1/embeddings", &body).await?;
            let bytes = response.bytes().await.map_err(transport)?;
            serde_json::from_slice::<EmbeddingsResponse>(&bytes).map_err(|err| {
                Error::StreamProtocol(format!("the engine's embeddings do not parse: {err}"))
            })
        };
        let span = tracing::debug_span!("engine_request", url = %self.url("/v1/embeddings"));
        tokio::select! {
            answer = answer.instrument(span) => answer?.into_embeddings(inputs.len()),
            err = interrupts.fired() => Err(err),
        }
    }

    /// A raw-prompt request ([`InferenceRequest::prompt`]) completed through
    /// the engine's legacy `/v1/completions`, streamed and collected as
    /// [`chat`](Self::chat) is.
    pub async fn complete(&self, request: &InferenceRequest) -> Result<InferenceResponse> {
        collect_events(self.complete_stream(request).await?).await
    }

    /// A raw-prompt request ([`InferenceRequest::prompt`]) streamed from the
    /// engine's `/v1/completions`, as events ending in
    /// [`StreamEvent::Finished`], with the same protection as
    /// [`chat_stream`](Self::chat_stream).
    pub async fn complete_stream(&self, request: &InferenceRequest) -> Result<EventStream> {
        let body = CompletionRequest::from_inference(request, self.model.as_deref(), true);
        self.stream_from("/v1/completions", &body).await
    }

    async fn stream_from(
        &self,
        path: &str,
        body: &(impl serde::Serialize + Sync),
    ) -> Result<EventStream> {
        let started = Instant::now();
        let mut interrupts = self.interrupts();
        let span = tracing::debug_span!("engine_request", url = %self.url(path));
        let response = tokio::select! {
            response = self.post(path, body).instrument(span) => response?,
            err = interrupts.fired() => return Err(err),
        };
        let bytes = pump(response, interrupts);
        Ok(Box::new(
            chunk_events(bytes, self.timeouts.idle, started).boxed(),
        ))
    }

    async fn post(
        &self,
        path: &str,
        body: &(impl serde::Serialize + Sync),
    ) -> Result<reqwest::Response> {
        if let Some(err) = self.unresponsive_error() {
            return Err(err);
        }
        let mut attempt = 0;
        let response = loop {
            let sent = self
                .authorized(self.http.post(self.url(path)))
                .json(body)
                .send();
            let sent = match self.timeouts.request {
                Some(bound) => tokio::time::timeout(bound, sent).await.map_err(|_| {
                    Error::Transport(format!("no response within {bound:?}").into())
                })?,
                None => sent.await,
            };
            match sent {
                Ok(response) => break response,
                // The connection was never made: the server has not seen it.
                Err(err) if err.is_connect() && attempt < self.connect_retries => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %err, "connecting failed; trying again");
                    tokio::time::sleep(Duration::from_millis(100) * 2u32.pow(attempt)).await;
                }
                Err(err) => return Err(transport(err)),
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.map_err(transport)?;
        Err(ErrorBody::to_error(status.as_u16(), &body))
    }

    fn interrupts(&self) -> Interrupts {
        Interrupts {
            closing: self.closing.subscribe(),
            pulse: self
                .pulse
                .as_ref()
                .map(|pulse| (pulse.engine.clone(), pulse.state.subscribe())),
        }
    }

    fn authorized(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => builder.bearer_auth(key.expose()),
            None => builder,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }
}

/// What ends a request early: the client closing its streams, or the engine
/// hanging.
struct Interrupts {
    closing: watch::Receiver<bool>,
    pulse: Option<(String, watch::Receiver<Option<Duration>>)>,
}

impl Interrupts {
    /// Resolves with the error to end the request with, once one of them fires.
    async fn fired(&mut self) -> Error {
        let closing = async {
            // Only an explicit close counts, not the client being dropped.
            if self.closing.wait_for(|closing| *closing).await.is_err() {
                std::future::pending::<()>().await;
            }
            Error::ShutDown
        };
        let hung = async {
            let Some((engine, state)) = &mut self.pulse else {
                return std::future::pending().await;
            };
            let silent = state.wait_for(Option::is_some).await.map(|silent| *silent);
            match silent {
                Ok(silent) => Error::EngineUnresponsive {
                    engine: engine.clone(),
                    silent_for: silent.unwrap_or_default(),
                },
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            err = closing => err,
            err = hung => err,
        }
    }
}

/// Connects through the Unix socket at `path`.
#[cfg(unix)]
fn unix_socket(
    builder: reqwest::ClientBuilder,
    path: &std::path::Path,
) -> Result<reqwest::ClientBuilder> {
    Ok(builder.unix_socket(path))
}

#[cfg(not(unix))]
fn unix_socket(
    _builder: reqwest::ClientBuilder,
    path: &std::path::Path,
) -> Result<reqwest::ClientBuilder> {
    Err(Error::invalid_config(
        "unix_socket",
        format!(
            "is {}, but this platform has no Unix sockets",
            path.display()
        ),
    ))
}

/// The HTTP root of a server listening on `host:port`, as a client reaches it:
/// IPv6 literals bracketed, the wildcard addresses replaced by loopback (a
/// client cannot connect to `0.0.0.0`).
///
/// ```
/// use runtime_openai::http_base_url;
/// assert_eq!(http_base_url("0.0.0.0", 8080), "http://127.0.0.1:8080");
/// assert_eq!(http_base_url("::1", 8080), "http://[::1]:8080");
/// ```
pub fn http_base_url(host: &str, port: u16) -> String {
    let host = match host {
        "0.0.0.0" => "127.0.0.1".to_owned(),
        "::" | "[::]" => "[::1]".to_owned(),
        host if host.contains(':') && !host.starts_with('[') => format!("[{host}]"),
        host => host.to_owned(),
    };
    format!("http://{host}:{port}")
}

fn transport(err: reqwest::Error) -> Error {
    Error::Transport(Box::new(err))
}

/// Reads `response`'s body on a task of its own, so the connection closes the
/// moment the reader drops the stream, the client closes its streams or the
/// engine is found hung, not when the next chunk happens to arrive or the
/// reader next polls.
fn pump(
    response: reqwest::Response,
    mut interrupts: Interrupts,
) -> impl Stream<Item = Result<Bytes>> + Send + Unpin {
    let (sender, receiver) = mpsc::channel(PUMP_BUFFER);
    let mut body = response.bytes_stream();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = sender.closed() => return,
                err = interrupts.fired() => {
                    let _ = sender.send(Err(err)).await;
                    return;
                }
                chunk = body.next() => {
                    let Some(chunk) = chunk else { return };
                    let failed = chunk.is_err();
                    if sender.send(chunk.map_err(transport)).await.is_err() || failed {
                        return;
                    }
                }
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// What the stream has learned so far.
struct ChunkState<S> {
    bytes: S,
    decoder: SseDecoder,
    ready: VecDeque<Result<StreamEvent>>,
    idle: Duration,
    started: Instant,
    first_delta: Option<Instant>,
    finish_reason: Option<FinishReason>,
    usage: Option<Usage>,
    timings: Option<Timings>,
    done: bool,
}

/// Turns a body of SSE bytes into chat stream events.
fn chunk_events<S>(
    bytes: S,
    idle: Duration,
    started: Instant,
) -> impl Stream<Item = Result<StreamEvent>> + Send
where
    S: Stream<Item = Result<Bytes>> + Send + Unpin,
{
    let state = ChunkState {
        bytes,
        decoder: SseDecoder::new(),
        ready: VecDeque::new(),
        idle,
        started,
        first_delta: None,
        finish_reason: None,
        usage: None,
        timings: None,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(item) = state.ready.pop_front() {
                return Some((item, state));
            }
            if state.done {
                return None;
            }
            match tokio::time::timeout(state.idle, state.bytes.next()).await {
                Err(_) => {
                    state.done = true;
                    let message = format!("no data from the engine for {:?}", state.idle);
                    return Some((Err(Error::Transport(message.into())), state));
                }
                Ok(Some(Ok(chunk))) => {
                    let mut events = Vec::new();
                    if let Err(err) = state.decoder.feed(&chunk, &mut events) {
                        state.done = true;
                        return Some((Err(err), state));
                    }
                    for event in events {
                        state.handle(event);
                        if state.done {
                            break;
                        }
                    }
                }
                Ok(Some(Err(err))) => {
                    state.done = true;
                    return Some((Err(err), state));
                }
                Ok(None) => {
                    state.done = true;
                    let err =
                        Error::StreamProtocol("the stream ended before `data: [DONE]`".to_owned());
                    return Some((Err(err), state));
                }
            }
        }
    })
}

impl<S> ChunkState<S> {
    fn handle(&mut self, event: SseEvent) {
        if event.data == "[DONE]" {
            self.done = true;
            let timings = self.timings.or_else(|| self.measured_timings());
            self.ready.push_back(Ok(StreamEvent::Finished {
                finish_reason: self.finish_reason.take(),
                usage: self.usage,
                timings,
            }));
            return;
        }
        let chunk: ChatCompletionChunk = match serde_json::from_str(&event.data) {
            Ok(chunk) => chunk,
            Err(err) => {
                self.fail(Error::StreamProtocol(format!(
                    "a stream event is not a chat completion chunk: {err}"
                )));
                return;
            }
        };
        if let Some(detail) = chunk.error() {
            let status = detail
                .code
                .as_ref()
                .and_then(serde_json::Value::as_u64)
                .and_then(|code| u16::try_from(code).ok())
                .unwrap_or(500);
            self.fail(detail.into_error(status));
            return;
        }
        if let Some(reason) = chunk.finish_reason() {
            self.finish_reason = Some(reason.clone());
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        if let Some(timings) = chunk.timings() {
            self.timings = Some(timings);
        }
        let content = chunk.content();
        if !content.is_empty() {
            self.first_delta.get_or_insert_with(Instant::now);
            self.ready
                .push_back(Ok(StreamEvent::Delta(content.to_owned())));
        }
        for call in chunk.tool_calls() {
            self.first_delta.get_or_insert_with(Instant::now);
            self.ready.push_back(Ok(StreamEvent::ToolCall(call)));
        }
        let logprobs = chunk.logprobs();
        // vLLM sends the stop token's log-probability with the empty last
        // delta; it is no token of the answer (llama-server and OpenAI
        // leave it out).
        let stop_token = content.is_empty() && chunk.finish_reason() == Some(&FinishReason::Stop);
        if !logprobs.is_empty() && !stop_token {
            self.ready.push_back(Ok(StreamEvent::Logprobs(logprobs)));
        }
    }

    fn fail(&mut self, err: Error) {
        self.done = true;
        self.ready.push_back(Err(err));
    }

    /// Timings measured here when the engine reports none (vLLM).
    fn measured_timings(&self) -> Option<Timings> {
        let first = self.first_delta?;
        let usage = self.usage?;
        Some(Timings::from_phases(
            first - self.started,
            usage.prompt_tokens,
            first.elapsed(),
            usage.completion_tokens.saturating_sub(1),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events_of(chunks: Vec<Vec<u8>>) -> Vec<Result<StreamEvent>> {
        let bytes = futures::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))));
        let stream = chunk_events(bytes, Duration::from_secs(5), Instant::now());
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(stream.collect())
    }

    fn capture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/captures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|err| panic!("{path}: {err}"))
    }

    fn text_and_finish(events: Vec<Result<StreamEvent>>) -> (String, StreamEvent) {
        let mut text = String::new();
        let mut last = None;
        for event in events {
            match event.unwrap() {
                StreamEvent::Delta(delta) => text.push_str(&delta),
                finished => last = Some(finished),
            }
        }
        (text, last.expect("a Finished event"))
    }

    #[test]
    fn a_real_llama_server_stream_delivered_byte_by_byte_decodes_fully() {
        let body = capture("llama-server/chat-stream-usage.sse");
        let one_byte_chunks = body.iter().map(|&b| vec![b]).collect();
        let (text, finished) = text_and_finish(events_of(one_byte_chunks));
        assert_eq!(text, "Hello there, welcome to my world!");
        let StreamEvent::Finished {
            finish_reason,
            usage,
            timings,
        } = finished
        else {
            unreachable!()
        };
        assert_eq!(finish_reason, Some(FinishReason::Length));
        assert_eq!(usage, Some(Usage::new(32, 8)));
        assert!(timings.unwrap().tokens_per_second.unwrap() > 30.0);
    }

    #[test]
    fn a_real_vllm_stream_decodes_with_measured_timings() {
        let body = capture("vllm/chat-stream-usage.sse");
        let (text, finished) = text_and_finish(events_of(vec![body]));
        assert!(!text.is_empty());
        let StreamEvent::Finished { usage, timings, .. } = finished else {
            unreachable!()
        };
        assert!(usage.is_some());
        assert!(timings.unwrap().time_to_first_token.is_some());
    }

    #[test]
    fn an_error_object_inside_the_stream_becomes_a_typed_error() {
        let body = b"data: {\"error\":{\"code\":400,\"message\":\"bad\",\"type\":\"invalid_request_error\"}}\n\n".to_vec();
        let events = events_of(vec![body]);
        assert!(
            matches!(&events[0], Err(Error::Api { status: 400, message, .. }) if message == "bad")
        );
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn a_stream_cut_before_done_is_an_error() {
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n".to_vec();
        let events = events_of(vec![body]);
        assert!(matches!(&events[0], Ok(StreamEvent::Delta(d)) if d == "hi"));
        assert!(matches!(&events[1], Err(Error::StreamProtocol(_))));
    }

    #[test]
    fn a_malformed_chunk_is_a_protocol_error() {
        let events = events_of(vec![b"data: {not json\n\n".to_vec()]);
        assert!(matches!(&events[0], Err(Error::StreamProtocol(_))));
    }

    #[test]
    fn wildcard_and_ipv6_hosts_become_connectable_base_urls() {
        assert_eq!(http_base_url("0.0.0.0", 1), "http://127.0.0.1:1");
        assert_eq!(http_base_url("::", 1), "http://[::1]:1");
        assert_eq!(http_base_url("[::1]", 1), "http://[::1]:1");
        assert_eq!(http_base_url("localhost", 1), "http://localhost:1");
    }

    #[test]
    fn a_silent_stream_fails_after_the_idle_timeout() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let events: Vec<_> = runtime.block_on(async {
            let silent = futures::stream::pending::<Result<Bytes>>();
            chunk_events(silent, Duration::from_secs(30), Instant::now())
                .collect()
                .await
        });
        assert!(
            matches!(&events[0], Err(Error::Transport(e)) if e.to_string().contains("no data"))
        );
    }
}
