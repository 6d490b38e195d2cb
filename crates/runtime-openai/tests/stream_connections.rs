//! No request is sent on a connection the engine may be closing.
//!
//! Engines close connections on their own schedule: llama-server after every
//! chat response and after 5 s of keep-alive. A request written to a pooled
//! connection just as the engine closes it fails with an incomplete message
//! (the benchmark hit it in about one run in two, 30 streams each), and a
//! POST cannot be retried safely. The race is timing-dependent with the real
//! engine, so this mock makes it certain: it answers one request per
//! connection and drops the connection, unanswered, when a second request
//! arrives on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::StreamExt;
use runtime_core::{InferenceRequest, StreamEvent};
use runtime_openai::{ClientTimeouts, OpenAiClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A real llama-server stream (`stream_options.include_usage`).
fn captured_stream() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/captures/llama-server/chat-stream-usage.sse"
    );
    std::fs::read(path).expect("the captured stream")
}

/// Reads one request (headers and a Content-Length body); false on EOF.
async fn read_request(socket: &mut TcpStream) -> bool {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let headers = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = headers
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            if buffer.len() >= end + 4 + length {
                return true;
            }
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Serves the captured stream chunked, once per connection, like
/// llama-server; counts requests that arrive on a used connection.
async fn one_stream_per_connection(listener: TcpListener, reused: Arc<AtomicUsize>) {
    let body = captured_stream();
    loop {
        let (mut socket, _) = listener.accept().await.unwrap();
        let body = body.clone();
        let reused = reused.clone();
        tokio::spawn(async move {
            if !read_request(&mut socket).await {
                return;
            }
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                        Transfer-Encoding: chunked\r\n\r\n";
            let mut response = head.as_bytes().to_vec();
            response.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
            response.extend_from_slice(&body);
            response.extend_from_slice(b"\r\n0\r\n\r\n");
            socket.write_all(&response).await.unwrap();
            if read_request(&mut socket).await {
                // The engine has gone from this connection: no answer.
                reused.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_requests_never_reuse_a_connection_the_engine_may_close() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let reused = Arc::new(AtomicUsize::new(0));
    let server = tokio::spawn(one_stream_per_connection(listener, reused.clone()));
    let client = OpenAiClient::new(base_url, None, None, ClientTimeouts::default()).unwrap();

    for attempt in 0..5 {
        let mut stream = client
            .chat_stream(&InferenceRequest::from_prompt("Hello"))
            .await
            .unwrap_or_else(|err| panic!("stream {attempt} did not start: {err}"));
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            match event.unwrap_or_else(|err| panic!("stream {attempt} failed: {err}")) {
                StreamEvent::Delta(delta) => text.push_str(&delta),
                StreamEvent::Finished { .. } => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
        assert_eq!(text, "Hello there, welcome to my world!");
    }
    assert_eq!(
        reused.load(Ordering::SeqCst),
        0,
        "no request was sent on a streamed response's connection"
    );
    server.abort();
}
