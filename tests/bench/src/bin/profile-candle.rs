//! Runs candle on the demo GGUF for a while, for a sampling profiler (`perf
//! record`): `profile-candle [PROMPT_TOKENS] [DECODE_TOKENS] [THREADS] [RUNS]`
//! with the benchmark's prompts; `PAUSE_MS` waits between runs (the compute
//! threads park when idle). Prints prefill and decode speed of each run.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use conformance::backends::candle;
use conformance::workload::story_request;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = |i: usize, default: u32| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (prompt, decode, threads, runs) = (arg(1, 64), arg(2, 128), arg(3, 2), arg(4, 3));
    let pause = std::env::var("PAUSE_MS").ok().and_then(|v| v.parse().ok());
    let backend = candle();
    let config = backend
        .config
        .clone()
        .with_threads(threads)
        .with_parallel(1)
        .with_context_size(8192);
    let mut runtime = (backend.new_runtime)();
    runtime.initialize(config).await.expect("candle starts");
    // About 20 tokens a sentence, after about 37 of template.
    let sentences = (prompt as usize).saturating_sub(37).div_ceil(20).max(1);
    for run in 0..runs as usize {
        if let Some(pause) = pause {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        let answer = runtime
            .generate(story_request(run, sentences, decode))
            .await
            .expect("an answer");
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
