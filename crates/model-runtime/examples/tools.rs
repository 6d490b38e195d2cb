//! Ask for a tool call and print it: the call is guaranteed, with arguments
//! valid against the tool's schema, or the request fails with
//! `Error::OutputInvalid`.
//!
//! ```sh
//! cargo run -p model-runtime --example tools -- MODEL.gguf
//! ```
#![allow(clippy::print_stdout)]

use model_runtime::{InferenceRequest, RuntimeConfig, Tool, ToolChoice};

#[tokio::main]
async fn main() -> model_runtime::Result<()> {
    let model = std::env::args().nth(1).expect("usage: tools MODEL");
    let (mut runtime, backend) = model_runtime::start(RuntimeConfig::new(model)).await?;
    let weather = Tool::function(
        "get_weather",
        serde_json::json!({
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": false
        }),
    )
    .with_description("The current weather in a city");
    let request = InferenceRequest::from_prompt("What is the weather in Paris?")
        .with_tool(weather)
        .with_tool_choice(ToolChoice::Required)
        .with_max_tokens(128);
    let answer = runtime.generate(request).await;
    // Stop the engine whether or not the call came.
    runtime.shutdown().await?;
    for call in answer?.tool_calls {
        println!("{backend}: {}({})", call.name, call.arguments);
    }
    Ok(())
}
