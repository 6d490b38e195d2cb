//! The gateway as `model-runtime serve` runs it (the OpenAI router over a
//! `RuntimeManager`, served by `runtime_openai::serve`), in process, for the
//! checks and the benchmarks.

use std::sync::Arc;

use runtime_core::{ModelService, RuntimeConfig};
use runtime_gateway::{GatewayConfig, ModelSpec, RuntimeManager};
use runtime_openai::{ServeLimits, ServeOptions};

use crate::Backend;

/// Starts `backend` on `config` behind a gateway on a free loopback port,
/// without an API key; returns the manager, the gateway's chat-completions
/// URL and the server task.
pub async fn start(
    backend: &Backend,
    config: RuntimeConfig,
) -> (Arc<RuntimeManager>, String, tokio::task::JoinHandle<()>) {
    let new_runtime = backend.new_runtime;
    let spec = ModelSpec::from_runtime_config("conformance", &config);
    let manager = RuntimeManager::with_factory(
        GatewayConfig::single(spec),
        Box::new(move |_| Ok(new_runtime())),
    )
    .expect("a gateway configuration");
    manager.load("conformance").await.unwrap_or_else(|err| {
        panic!(
            "{} behind the gateway: {}",
            backend.name,
            crate::checks::chain(&err)
        )
    });
    let (base, server) = serve(manager.clone()).await;
    (manager, format!("{base}/v1/chat/completions"), server)
}

/// Like [`start`], over the suite's shared engine, lent: the gateway starts
/// and stops nothing.
pub async fn start_lent(
    backend: &Backend,
    config: RuntimeConfig,
    shared: crate::harness::SharedRuntime,
) -> (Arc<RuntimeManager>, String, tokio::task::JoinHandle<()>) {
    let spec = ModelSpec::from_runtime_config("conformance", &config);
    let manager = RuntimeManager::with_factory(
        GatewayConfig::single(spec),
        Box::new(move |_| Ok(Box::new(crate::harness::Lent(shared.clone())))),
    )
    .expect("a gateway configuration");
    manager.load("conformance").await.unwrap_or_else(|err| {
        panic!(
            "{} behind the gateway: {}",
            backend.name,
            crate::checks::chain(&err)
        )
    });
    let (base, server) = serve(manager.clone()).await;
    (manager, format!("{base}/v1/chat/completions"), server)
}

/// Serves `manager` on a free loopback port without an API key; returns the
/// gateway's root URL and the server task.
pub async fn serve(manager: Arc<RuntimeManager>) -> (String, tokio::task::JoinHandle<()>) {
    let router = runtime_openai::router(
        manager as Arc<dyn ModelService>,
        ServeOptions::new("conformance"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = runtime_openai::serve(
            listener,
            router,
            ServeLimits::default(),
            std::future::pending(),
        )
        .await;
    });
    (base, server)
}

/// Serves `manager` over TLS on a free loopback port, with a self-signed
/// certificate for `localhost` made here; returns `https://localhost:PORT`,
/// the certificate (PEM) a client must trust, and the server task.
pub async fn serve_tls(
    manager: Arc<RuntimeManager>,
) -> (String, String, tokio::task::JoinHandle<()>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a self-signed certificate");
    let pem = certified.cert.pem();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .expect("a TLS configuration");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let router = runtime_openai::router(
        manager as Arc<dyn ModelService>,
        ServeOptions::new("conformance"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            // The peer's address, as `serve` gives it: the admin routes answer
            // loopback peers only, and a connection without one is refused.
            let router = router
                .clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
                    .await;
            });
        }
    });
    (base, pem, server)
}
