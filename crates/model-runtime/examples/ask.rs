//! Ask one question and print the answer.
//!
//! ```sh
//! cargo run -p model-runtime --example ask -- MODEL.gguf "What is the capital of France?"
//! ```
//!
//! The backend is chosen for the model: llama.cpp for a GGUF when
//! `llama-server` is installed, vLLM for a Hugging Face directory when vLLM
//! is, the embedded candle engine otherwise.
#![allow(clippy::print_stdout)]

use model_runtime::{InferenceRequest, RuntimeConfig};

#[tokio::main]
async fn main() -> model_runtime::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().expect("usage: ask MODEL [QUESTION]");
    let question = args
        .next()
        .unwrap_or_else(|| "What is the capital of France?".to_owned());

    let (mut runtime, backend) = model_runtime::start(RuntimeConfig::new(model)).await?;
    let request = InferenceRequest::from_prompt(question)
        .with_max_tokens(64)
        .with_temperature(0.0);
    let answer = runtime.generate(request).await;
    // Stop the engine whether or not the question was answered.
    runtime.shutdown().await?;
    println!("{backend}: {}", answer?.content);
    Ok(())
}
