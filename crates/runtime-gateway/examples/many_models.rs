//! Several models behind one manager, from code: each starts on its first
//! request, and the least recently used idle one is unloaded when a start
//! would pass `max_loaded`.
//!
//! ```sh
//! cargo run -p runtime-gateway --example many_models -- A.gguf B.gguf
//! ```
//!
//! `runtime-openai`'s router serves the same manager over HTTP (what
//! `model-runtime serve --config` does).
#![allow(clippy::print_stdout)]

use model_runtime::{InferenceRequest, ModelService};
use runtime_gateway::{GatewayConfig, ModelSpec, RuntimeManager};

#[tokio::main]
async fn main() -> model_runtime::Result<()> {
    let models: Vec<String> = std::env::args().skip(1).collect();
    assert!(!models.is_empty(), "usage: many_models MODEL...");

    let mut config = GatewayConfig::default();
    config.max_loaded = Some(1);
    for (index, path) in models.iter().enumerate() {
        config
            .models
            .push(ModelSpec::new(format!("model-{index}"), path));
    }
    let manager = RuntimeManager::new(config)?;

    for index in 0..models.len() {
        let name = format!("model-{index}");
        let request = InferenceRequest::from_prompt("Say hello.").with_max_tokens(16);
        let answer = manager.generate(Some(&name), request).await?;
        println!("{name}: {}", answer.content.trim());
    }
    for status in manager.status().await {
        println!("{} is {} on {}", status.name, status.state, status.backend);
    }
    manager.shutdown().await
}
