//! `embeddings`: texts embedded per second by candle's BERT encoder and by
//! llama-server on all-MiniLM-L6-v2 (the same weights, f32, both with the
//! same threads), one text per request and 32 per request, in interleaved
//! pairs on both engines running at once (an idle engine costs nothing).

use std::time::Instant;

use runtime_core::{EmbeddingRequest, ModelRuntime};

use crate::report::{OverheadRow, Results, Stat};
use crate::{engine_name, started};

/// Pairs per comparison.
const RUNS: usize = 7;
/// Texts per measurement.
const TEXTS: usize = 32;

/// Thirty-two sentences of ten to forty tokens, different in every run so
/// no engine can reuse an answer.
fn texts(run: usize) -> Vec<String> {
    (0..TEXTS)
        .map(|i| {
            let words = "retrieval augmented generation needs fast local embeddings of every \
                         document chunk in the index so that queries find their neighbours";
            let take = 8 + (i * 7) % 24;
            let words: Vec<&str> = words.split(' ').cycle().skip(i).take(take).collect();
            format!("Run {run}, text {i}: {}.", words.join(" "))
        })
        .collect()
}

/// Seconds `runtime` takes to embed `texts`, `per_request` at a time.
async fn seconds(runtime: &dyn ModelRuntime, texts: &[String], per_request: usize) -> f64 {
    let started = Instant::now();
    for chunk in texts.chunks(per_request) {
        let answer = runtime
            .embed(EmbeddingRequest::new(chunk.iter().map(String::as_str)))
            .await
            .expect("embedded");
        assert_eq!(answer.vectors.len(), chunk.len());
    }
    started.elapsed().as_secs_f64()
}

pub(crate) async fn embeddings(results: &mut Results) {
    let backends = conformance::backends::embedding_backends();
    let named = |name: &str| {
        backends
            .iter()
            .find(|b| b.name == name)
            .expect("an embedding backend of that name")
    };
    let (llama, candle) = (named("llamacpp"), named("candle"));
    let mut llama_runtime = started(llama, llama.config.clone(), results).await;
    let mut candle_runtime = started(candle, candle.config.clone(), results).await;
    // Warm: page faults, the engines' first allocations.
    for runtime in [&llama_runtime, &candle_runtime] {
        seconds(runtime.as_ref(), &texts(usize::MAX), TEXTS).await;
    }
    for per_request in [1, TEXTS] {
        let (mut ours, mut baseline, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..RUNS {
            let texts = texts(run);
            // Who goes first alternates, so drift favours neither.
            let (c, l) = if run % 2 == 0 {
                let c = seconds(candle_runtime.as_ref(), &texts, per_request).await;
                (
                    c,
                    seconds(llama_runtime.as_ref(), &texts, per_request).await,
                )
            } else {
                let l = seconds(llama_runtime.as_ref(), &texts, per_request).await;
                (
                    seconds(candle_runtime.as_ref(), &texts, per_request).await,
                    l,
                )
            };
            ours.push(c * 1000.0 / TEXTS as f64);
            baseline.push(l * 1000.0 / TEXTS as f64);
            ratio.push(c / l);
        }
        let row = OverheadRow {
            engine: engine_name(candle).to_owned(),
            layer: format!("embeddings, {per_request} per request: ms per text"),
            baseline: engine_name(llama).to_owned(),
            ours_ms: Stat::of(&ours),
            baseline_ms: Stat::of(&baseline),
            ratio: Stat::of(&ratio),
        };
        let speedup = 1.0 / row.ratio.median;
        println!(
            "embeddings, {per_request:>2} per request: candle {:>7.1} texts/s, llama-server {:>7.1} \
             texts/s: candle at {speedup:.2}x llama-server",
            1000.0 / row.ours_ms.median,
            1000.0 / row.baseline_ms.median,
        );
        results.notes.push(format!(
            "embeddings, {per_request} per request: candle {:.1} texts/s against llama-server's \
             {:.1} (median of {RUNS} interleaved pairs): {speedup:.2}x",
            1000.0 / row.ours_ms.median,
            1000.0 / row.baseline_ms.median,
        ));
        results.overheads.push(row);
    }
    llama_runtime.shutdown().await.expect("llama-server stops");
    candle_runtime.shutdown().await.expect("candle stops");
}
