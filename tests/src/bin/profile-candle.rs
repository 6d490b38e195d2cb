//! Runs candle on the demo GGUF for a while, for a sampling profiler:
//! `profile-candle [PROMPT_TOKENS] [DECODE_TOKENS] [THREADS] [RUNS]`.
//! Prints prefill and decode speed of each run.
#![allow(clippy::print_stdout)]

use conformance::backends::candle;
use runtime_core::InferenceRequest;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = |i: usize, default: u32| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (prompt, decode, threads, runs) = (arg(1, 64), arg(2, 128), arg(3, 2), arg(4, 3));
    let backend = candle();
    let config = backend
        .config
        .clone()
        .with_threads(threads)
        .with_parallel(1)
        .with_context_size(4096);
    let mut runtime = (backend.new_runtime)();
    runtime.initialize(config).await.expect("candle starts");
    // About `prompt` tokens: one word and a space is a token or two.
    let words = "river ".repeat(prompt as usize);
    for run in 0..runs {
        let request = InferenceRequest::from_prompt(format!("Run {run}. {words}\nWrite a story."))
            .with_max_tokens(decode)
            .with_temperature(0.0);
        let answer = runtime.generate(request).await.expect("an answer");
        if run == 0 {
            println!("{}", answer.content.chars().take(300).collect::<String>());
        }
        let timings = answer.timings.expect("timings");
        let usage = answer.usage.expect("usage");
        println!(
            "run {run}: prompt {} tokens at {:.1} tok/s; {} generated at {:.1} tok/s",
            usage.prompt_tokens,
            timings.prompt_tokens_per_second.unwrap_or_default(),
            usage.completion_tokens,
            timings.tokens_per_second.unwrap_or_default()
        );
    }
    runtime.shutdown().await.unwrap();
}
