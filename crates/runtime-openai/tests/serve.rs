//! `serve`'s limits, with raw clients: a client trickling its headers is cut
//! off, and connections past the cap wait their turn.

use std::sync::Arc;
use std::time::Duration;

use runtime_core::{EventStream, InferenceRequest, InferenceResponse, ModelService, Result};
use runtime_openai::{ServeLimits, ServeOptions, router, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A service with nothing to serve but `/health`.
struct Idle;

#[async_trait::async_trait]
impl ModelService for Idle {
    async fn is_ready(&self) -> bool {
        true
    }

    async fn generate(&self, _: Option<&str>, _: InferenceRequest) -> Result<InferenceResponse> {
        Err(runtime_core::Error::NotInitialized)
    }

    async fn generate_events(&self, _: Option<&str>, _: InferenceRequest) -> Result<EventStream> {
        Err(runtime_core::Error::NotInitialized)
    }
}

async fn serving(limits: ServeLimits) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = router(Arc::new(Idle), ServeOptions::new("idle"));
    tokio::spawn(serve(listener, app, limits, std::future::pending()));
    address
}

async fn health(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    let read = stream.read(&mut buffer).await.unwrap();
    String::from_utf8_lossy(&buffer[..read]).into_owned()
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_cut_off() {
    let limits = ServeLimits::default().with_header_read_timeout(Duration::from_millis(300));
    let address = serving(limits).await;
    let mut slow = TcpStream::connect(address).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    let outcome = tokio::time::timeout(Duration::from_secs(3), slow.read(&mut buffer)).await;
    let read = outcome.expect("the server closes the connection within 3 s");
    // Closed (0 bytes, or a reset), or an error response: never kept open.
    if let Ok(read) = read {
        let text = String::from_utf8_lossy(&buffer[..read]);
        assert!(read == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let address = serving(ServeLimits::default().with_max_connections(1)).await;
    let mut first = TcpStream::connect(address).await.unwrap();
    assert!(health(&mut first).await.starts_with("HTTP/1.1 200"));
    let mut second = TcpStream::connect(address).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(500), health(&mut second)).await;
    assert!(
        waiting.is_err(),
        "the second connection is not served while the first is open"
    );
    drop(first);
    let served = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buffer = [0u8; 1024];
        let read = second.read(&mut buffer).await.unwrap();
        String::from_utf8_lossy(&buffer[..read]).into_owned()
    })
    .await
    .expect("served once the first closed");
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
}

/// A service whose every answer is an endless stream of large deltas, and
/// which counts the streams still alive.
struct Endless {
    alive: Arc<std::sync::atomic::AtomicUsize>,
}

struct Counted {
    alive: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl ModelService for Endless {
    async fn is_ready(&self) -> bool {
        true
    }

    async fn generate(&self, _: Option<&str>, _: InferenceRequest) -> Result<InferenceResponse> {
        Err(runtime_core::Error::NotInitialized)
    }

    async fn generate_events(&self, _: Option<&str>, _: InferenceRequest) -> Result<EventStream> {
        use futures::StreamExt;
        self.alive.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let counted = Counted {
            alive: self.alive.clone(),
        };
        let delta = "x".repeat(16 * 1024);
        let events = futures::stream::repeat(delta).map(move |delta| {
            let _held = &counted;
            Ok(runtime_core::StreamEvent::Delta(delta))
        });
        Ok(Box::new(events))
    }
}

#[tokio::test]
async fn a_client_that_never_reads_its_stream_is_cut_off_after_the_write_timeout() {
    let alive = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = router(
        Arc::new(Endless {
            alive: alive.clone(),
        }),
        ServeOptions::new("endless"),
    );
    let limits = ServeLimits::default().with_write_timeout(Duration::from_millis(500));
    tokio::spawn(serve(listener, app, limits, std::future::pending()));

    let body = r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let mut client = TcpStream::connect(address).await.unwrap();
    client
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The stream starts, then the client stops reading: the buffers fill.
    let mut first = [0u8; 256];
    let read = client.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"));
    assert_eq!(alive.load(std::sync::atomic::Ordering::SeqCst), 1);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive.load(std::sync::atomic::Ordering::SeqCst) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream of a client that never reads is dropped (its slot freed)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(client);
}
