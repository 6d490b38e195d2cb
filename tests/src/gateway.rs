//! The gateway as `model-runtime serve` runs it (the OpenAI router over a
//! `RuntimeManager`, served by `runtime_openai::serve`), in process, for the
//! checks and the benchmarks.

use std::sync::Arc;

use runtime_core::RuntimeConfig;
use runtime_gateway::{GatewayConfig, ModelSpec, RuntimeManager};
use runtime_openai::{ChatService, ServeLimits, ServeOptions};

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

/// Serves `manager` on a free loopback port without an API key; returns the
/// gateway's root URL and the server task.
pub async fn serve(manager: Arc<RuntimeManager>) -> (String, tokio::task::JoinHandle<()>) {
    let router = runtime_openai::router(
        manager as Arc<dyn ChatService>,
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
