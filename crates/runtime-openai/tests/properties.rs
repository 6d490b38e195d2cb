//! Property tests: what a peer sends, however malformed, never panics the
//! decoder or the request parser, and the decoder's memory stays bounded.

use proptest::prelude::*;
use runtime_openai::SseDecoder;
use runtime_openai::wire::{ChatCompletionChunk, ChatCompletionRequest};

/// Bytes that look like an event stream often enough to reach deep paths.
fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"event: x".to_vec()),
        Just(b": ping".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just("é🙂".as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..16),
    ];
    prop::collection::vec(piece, 0..64).prop_map(|pieces| pieces.concat())
}

proptest! {
    #[test]
    fn the_sse_decoder_never_panics_and_stays_bounded(
        bytes in sse_bytes(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        let mut start = 0;
        for end in points.into_iter().chain([bytes.len()]) {
            if decoder.feed(&bytes[start..end], &mut events).is_err() {
                return Ok(());
            }
            prop_assert!(decoder.buffered_bytes() <= bytes.len());
            start = end;
        }
        for event in &events {
            // Whatever was dispatched is valid UTF-8 and parses (or not) without panicking.
            let _ = serde_json::from_str::<ChatCompletionChunk>(&event.data);
        }
    }

    #[test]
    fn arbitrary_bytes_as_a_request_body_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(request) = serde_json::from_slice::<ChatCompletionRequest>(&bytes) {
            let _ = request.into_inference();
        }
    }

    #[test]
    fn json_shaped_request_bodies_never_panic(
        max_tokens in any::<i64>(),
        max_completion_tokens in any::<i64>(),
        temperature in any::<f32>(),
        top_p in any::<f32>(),
        role in "[a-z]{0,10}",
        content in ".{0,64}",
        extra_key in "[a-z_]{1,12}",
        extra_value in any::<i32>(),
    ) {
        let body = serde_json::json!({
            "messages": [{"role": role, "content": content}],
            "max_tokens": max_tokens,
            "max_completion_tokens": max_completion_tokens,
            "temperature": temperature,
            "top_p": top_p,
            extra_key: extra_value,
        });
        if let Ok(request) = serde_json::from_value::<ChatCompletionRequest>(body) {
            let _ = request.into_inference();
        }
    }
}

#[test]
fn an_event_that_never_ends_is_refused_before_it_exhausts_memory() {
    let mut decoder = SseDecoder::new();
    let mut events = Vec::new();
    let chunk = vec![b'x'; 1024 * 1024];
    let mut refused = false;
    decoder.feed(b"data: ", &mut events).unwrap();
    for _ in 0..64 {
        if decoder.feed(&chunk, &mut events).is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "a 64 MiB event is refused");
    assert!(decoder.buffered_bytes() <= 17 * 1024 * 1024);
}
