//! Stream an answer as it is generated, then print its usage.
//!
//! ```sh
//! cargo run -p model-runtime --example stream -- MODEL.gguf
//! ```
#![allow(clippy::print_stdout)]

use std::io::Write;

use futures::StreamExt;
use model_runtime::{InferenceRequest, ModelRuntime, RuntimeConfig, StreamEvent};

/// Prints the answer as its deltas arrive; the last event says why it ended.
async fn stream(runtime: &dyn ModelRuntime, prompt: &str) -> model_runtime::Result<()> {
    let request = InferenceRequest::from_prompt(prompt).with_max_tokens(128);
    let mut events = runtime.generate_events(request).await?;
    while let Some(event) = events.next().await {
        match event? {
            // Deltas are whole UTF-8 characters.
            StreamEvent::Delta(text) => {
                print!("{text}");
                std::io::stdout().flush().ok();
            }
            StreamEvent::Finished {
                finish_reason,
                usage,
                ..
            } => {
                println!();
                println!("finished: {finish_reason:?}, usage: {usage:?}");
            }
            _ => {}
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> model_runtime::Result<()> {
    let model = std::env::args().nth(1).expect("usage: stream MODEL");
    let (mut runtime, _) = model_runtime::start(RuntimeConfig::new(model)).await?;
    let streamed = stream(runtime.as_ref(), "Why is the sky blue?").await;
    runtime.shutdown().await?;
    streamed
}
