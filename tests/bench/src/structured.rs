//! `structured`: what holding an answer to a schema costs decode, and what
//! twenty tools cost the first token, on each engine against itself without
//! them, in interleaved pairs on one running engine.

use std::time::Instant;

use futures::StreamExt;
use runtime_core::{ChatMessage, InferenceRequest, ModelRuntime, StreamEvent, Tool, ToolChoice};
use serde_json::json;

use crate::report::{OverheadRow, Results, Stat};
use crate::{engine_name, started};

/// Pairs per comparison.
const RUNS: usize = 7;

/// What one streamed answer measured: the first piece of it (text or a
/// call), and the time per token after it.
struct Timed {
    first_ms: f64,
    per_token_ms: Option<f64>,
    generated: u64,
}

async fn timed(runtime: &dyn ModelRuntime, request: InferenceRequest) -> Timed {
    let started = Instant::now();
    let mut events = runtime.generate_events(request).await.expect("a stream");
    let mut first = None;
    let mut generated = 0;
    while let Some(event) = events.next().await {
        match event.expect("an event (a structured answer that fails its check fails the bench)") {
            StreamEvent::Delta(text) if !text.is_empty() => {
                first.get_or_insert_with(|| started.elapsed());
            }
            StreamEvent::ToolCall(_) => {
                first.get_or_insert_with(|| started.elapsed());
            }
            StreamEvent::Finished { usage, .. } => {
                generated = usage.map_or(0, |u| u.completion_tokens);
            }
            _ => {}
        }
    }
    let total = started.elapsed();
    let first = first.expect("some answer");
    // Too short an answer says nothing about decode speed.
    let per_token_ms =
        (generated > 16).then(|| (total - first).as_secs_f64() * 1000.0 / (generated - 1) as f64);
    Timed {
        first_ms: first.as_secs_f64() * 1000.0,
        per_token_ms,
        generated,
    }
}

/// A long free answer, and the same asked for as a schema: the story as one
/// long string field, so both answers are mostly the model's own prose.
fn story(run: usize, schema: bool) -> InferenceRequest {
    // Room for the longest answer the schema allows (every token is at least
    // one character of it), so no answer is cut off and refused.
    let request = conformance::workload::story_request(run, 1, 400)
        .with_temperature(0.8)
        .with_seed(run as u64);
    if !schema {
        return request;
    }
    request.with_json_schema(
        "story",
        json!({
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "story": {"type": "string", "minLength": 200, "maxLength": 300}
            },
            "required": ["title", "story"],
            "additionalProperties": false
        }),
    )
}

/// Twenty tools and one required call, or the same question without them.
fn agent(run: usize, tools: bool) -> InferenceRequest {
    let request = InferenceRequest::new(vec![ChatMessage::user(format!(
        "Request {run}: look up the opening hours of the museum."
    ))])
    .with_max_tokens(96)
    .with_temperature(0.0);
    if !tools {
        return request;
    }
    (0..20)
        .fold(request, |request, i| {
            request.with_tool(
                Tool::function(
                    format!("tool_{i:02}"),
                    json!({
                        "type": "object",
                        "properties": {"query": {"type": "string", "maxLength": 40}},
                        "required": ["query"],
                        "additionalProperties": false
                    }),
                )
                .with_description(format!("Looks things up in catalogue number {i}")),
            )
        })
        .with_tool_choice(ToolChoice::Required)
        // One call: with twenty tools a small model would call many.
        .with_parallel_tool_calls(false)
}

pub(crate) async fn structured(results: &mut Results) {
    let backends = [
        conformance::backends::candle(),
        conformance::backends::llamacpp(),
    ];
    for backend in &backends {
        let config = backend.config.clone().with_parallel(1);
        let mut runtime = started(backend, config, results).await;
        let runtime_ref = runtime.as_ref();
        // Warm: caches, the grammar vocabulary, page faults.
        timed(runtime_ref, story(usize::MAX, true)).await;
        timed(runtime_ref, agent(usize::MAX, true)).await;
        let mut decode = (Vec::new(), Vec::new(), Vec::new());
        let mut first = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..RUNS {
            // The free answer is held to the schema answer's length, so both
            // decode the same positions (a token costs more the longer the
            // context); one that ends sooner by itself is no fair pair.
            let schema = timed(runtime_ref, story(run, true)).await;
            let free = timed(
                runtime_ref,
                story(run, false).with_max_tokens(schema.generated.max(1) as u32),
            )
            .await;
            let same_length = free.generated * 10 >= schema.generated * 9;
            if let (true, Some(ours), Some(base)) =
                (same_length, schema.per_token_ms, free.per_token_ms)
            {
                decode.0.push(ours);
                decode.1.push(base);
                decode.2.push(ours / base);
            }
            let (tools, bare) = if run % 2 == 0 {
                let tools = timed(runtime_ref, agent(run, true)).await;
                (tools, timed(runtime_ref, agent(run, false)).await)
            } else {
                let bare = timed(runtime_ref, agent(run, false)).await;
                (timed(runtime_ref, agent(run, true)).await, bare)
            };
            first.0.push(tools.first_ms);
            first.1.push(bare.first_ms);
            first.2.push(tools.first_ms / bare.first_ms);
        }
        let engine = engine_name(backend).to_owned();
        if decode.2.is_empty() {
            results.notes.push(format!(
                "{engine}: no pair of answers of the same length over 16 tokens; no decode figure"
            ));
        } else {
            results.overheads.push(OverheadRow {
                engine: engine.clone(),
                layer: "json_schema answer, ms per token".to_owned(),
                baseline: "free text".to_owned(),
                ours_ms: Stat::of(&decode.0),
                baseline_ms: Stat::of(&decode.1),
                ratio: Stat::of(&decode.2),
            });
        }
        results.overheads.push(OverheadRow {
            engine: engine.clone(),
            layer: "20 tools, required call: first piece, ms".to_owned(),
            baseline: "no tools".to_owned(),
            ours_ms: Stat::of(&first.0),
            baseline_ms: Stat::of(&first.1),
            ratio: Stat::of(&first.2),
        });
        for row in results.overheads.iter().filter(|row| row.engine == engine) {
            println!(
                "{:<13} {:<42} {:>8.2} ms against {:>8.2} ms ({}): × {:.3}",
                row.engine,
                row.layer,
                row.ours_ms.median,
                row.baseline_ms.median,
                row.baseline,
                row.ratio.median
            );
        }
        runtime.shutdown().await.expect("stops");
    }
}
