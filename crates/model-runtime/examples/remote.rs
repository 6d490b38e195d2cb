//! Attach to an OpenAI-compatible server someone else runs (a llama-server,
//! a vLLM, another model-runtime): the model's path is the server's URL.
//! Shutting down closes our connections and leaves the server running.
//!
//! ```sh
//! cargo run -p model-runtime --example remote -- http://127.0.0.1:8080 MODEL_NAME
//! ```
//! The server's key, if it needs one, comes from `$REMOTE_API_KEY`.
#![allow(clippy::print_stdout)]

use model_runtime::remote::RemoteRuntime;
use model_runtime::{InferenceRequest, ModelRuntime, RuntimeConfig};

#[tokio::main]
async fn main() -> model_runtime::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("usage: remote URL [MODEL]");
    let mut config = RuntimeConfig::new(url);
    if let Some(model) = args.next() {
        config = config.with_served_model_name(model);
    }
    if let Ok(key) = std::env::var("REMOTE_API_KEY") {
        config = config.with_api_key(key);
    }

    let mut runtime = RemoteRuntime::new();
    runtime.initialize(config).await?;
    let metadata = runtime.metadata();
    println!("attached to {} {}", metadata.runtime_name, metadata.version);
    let answer = runtime
        .generate(InferenceRequest::from_prompt("Say hello.").with_max_tokens(16))
        .await;
    runtime.shutdown().await?;
    println!("{}", answer?.content);
    Ok(())
}
