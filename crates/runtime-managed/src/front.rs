//! The engine's front door: our own listener at the address `base_url`
//! names, in front of an engine that listens on a private Unix socket (a
//! directory only we may enter), so no other local user reaches the engine
//! at all.
//!
//! Every request but `GET /health` must carry the engine's key, whatever its
//! route: engines guard some routes only (vLLM's `--api-key` leaves
//! `/invocations`, `/tokenize` and `/metrics` open to anyone who can connect).
//! Accepted requests are forwarded to the socket and their answers streamed
//! back as they come; a client that goes away drops its request in the
//! engine, as it would have with a direct connection.
//!
//! The runtime itself talks to the socket directly: the front is the price
//! of `base_url` for other clients (one more local hop; `cargo xtask bench
//! llamacpp` measures it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use runtime_core::{ApiKey, Error, Result};
use runtime_openai::WriteTimeout;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a client of the front may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an answer may wait for a client that stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

type Body = BoxBody<Bytes, std::io::Error>;

/// A running front: its address, and the task serving it.
#[derive(Debug)]
pub(crate) struct Front {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Front {
    /// Serves `listener`, forwarding what carries `key` to the engine on
    /// `socket`.
    pub(crate) fn start(listener: TcpListener, socket: &Path, key: ApiKey) -> Result<Self> {
        let address = listener
            .local_addr()
            .map_err(|err| Error::io("error reading the front's address", err))?;
        let upstream = reqwest::Client::builder()
            .unix_socket(socket)
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .map_err(|err| Error::Transport(Box::new(err)))?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept(listener, upstream, key, stopped));
        Ok(Self {
            address,
            stop: Some(stop),
            task,
        })
    }

    /// Where clients reach it.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Front {
    /// Stops accepting and closes every connection at once: the engine
    /// behind it is going away.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    upstream: reqwest::Client,
    key: ApiKey,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "the engine's front failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (upstream, key) = (upstream.clone(), key.clone());
        let service = hyper::service::service_fn(move |request| {
            let (upstream, key) = (upstream.clone(), key.clone());
            async move { Ok::<_, Infallible>(handle(request, &upstream, &key).await) }
        });
        let connection = builder.serve_connection(
            TokioIo::new(WriteTimeout::new(stream, WRITE_TIMEOUT)),
            service,
        );
        connections.spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "a connection to the engine's front ended");
            }
        });
        // Reap finished connections as we go.
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}

/// One request: refused without the key (but `GET /health`), else forwarded.
async fn handle(
    request: Request<Incoming>,
    upstream: &reqwest::Client,
    key: &ApiKey,
) -> Response<Body> {
    let open = request.method() == hyper::Method::GET && request.uri().path() == "/health";
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|given| key.matches(given));
    if !(open || authorized) {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key",
            "authentication_error",
        );
    }
    match forward(request, upstream).await {
        Ok(response) => response,
        Err(err) => {
            tracing::debug!(error = %err, "the engine did not answer its front");
            refusal(
                StatusCode::BAD_GATEWAY,
                "the engine did not answer",
                "server_error",
            )
        }
    }
}

/// Headers that describe one hop, not the message, and so are not forwarded.
fn hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

async fn forward(
    request: Request<Incoming>,
    upstream: &reqwest::Client,
) -> std::result::Result<Response<Body>, reqwest::Error> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |path| path.as_str());
    let mut outgoing = upstream.request(parts.method, format!("http://localhost{path}"));
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    let body =
        BodyStream::new(body).try_filter_map(|frame| async move { Ok(frame.into_data().ok()) });
    let answer = outgoing
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?;
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !hop_by_hop(name) {
            response = response.header(name, value);
        }
    }
    let body = StreamBody::new(
        answer
            .bytes_stream()
            .map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other)),
    );
    Ok(response.body(BodyExt::boxed(body)).unwrap_or_else(|_| {
        refusal(
            StatusCode::BAD_GATEWAY,
            "the engine's answer was malformed",
            "server_error",
        )
    }))
}

/// An error in the OpenAI shape.
fn refusal(status: StatusCode, message: &str, kind: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "code": status.as_u16()}
    })
    .to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("a static response is well formed")
}
