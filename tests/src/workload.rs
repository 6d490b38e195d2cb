//! The prompts the benchmark and the profiler send: long, varied, and never
//! the same twice, so no engine's prompt cache can help.

use runtime_core::{ChatMessage, InferenceRequest};

/// A request whose prompt holds `sentences` varied sentences (about 20
/// tokens each, after about 37 of template and instructions) and asks for a
/// long answer of at most `max_tokens`. The system message names `run`, so
/// two runs never share a prefix.
pub fn story_request(run: usize, sentences: usize, max_tokens: u32) -> InferenceRequest {
    const ANIMALS: [&str; 7] = ["fox", "heron", "otter", "lynx", "badger", "crane", "hare"];
    const PLACES: [&str; 5] = ["river", "meadow", "ridge", "harbour", "forest"];
    let filler: String = (0..sentences)
        .map(|i| {
            format!(
                "On day {i} the {} crossed the {} and the village counted {} boats. ",
                ANIMALS[i % ANIMALS.len()],
                PLACES[i % PLACES.len()],
                i * 7 % 31
            )
        })
        .collect();
    InferenceRequest::new(vec![
        ChatMessage::system(format!(
            "Session {run}-{sentences}. You are a careful assistant."
        )),
        ChatMessage::user(format!(
            "{filler}\nTell the long story of these days, in detail."
        )),
    ])
    .with_max_tokens(max_tokens)
    .with_temperature(0.0)
}
