//! What generation promises: determinism, streams equal to plain answers,
//! whole UTF-8 deltas, concurrency, cancellation inside the engine.

use super::*;

/// Content, finish reason and usage; determinism; streamed equals plain;
/// max_tokens; stop strings; seeds.
pub async fn generation(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    let request = greedy(QUESTION, 24);

    let first = runtime.generate(request.clone()).await.expect("generate");
    assert!(!first.content.trim().is_empty(), "content");
    assert!(first.finish_reason.is_some(), "finish reason");
    let usage = first.usage.expect("usage");
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    let second = runtime
        .generate(request.clone())
        .await
        .expect("generate again");
    assert_eq!(
        first.content, second.content,
        "temperature 0 is deterministic"
    );

    let streamed = collect_stream(runtime, request.clone()).await.concat();
    assert_eq!(
        streamed, first.content,
        "streamed deltas concatenate to the plain answer"
    );

    let mut events = runtime
        .generate_events(request.clone())
        .await
        .expect("events");
    let mut finished = None;
    while let Some(event) = events.next().await {
        if let StreamEvent::Finished {
            usage,
            finish_reason,
            ..
        } = event.expect("event")
        {
            finished = Some((usage, finish_reason));
        }
    }
    let (stream_usage, stream_finish) = finished.expect("the event stream ends with Finished");
    assert_eq!(stream_usage, first.usage, "streamed usage matches");
    assert_eq!(stream_finish, first.finish_reason);

    let short = runtime.generate(greedy(QUESTION, 5)).await.expect("short");
    assert_eq!(short.finish_reason, Some(FinishReason::Length));
    assert_eq!(short.usage.expect("usage").completion_tokens, 5);

    // Stop at a word the model is known (from the run above) to produce.
    let words: Vec<&str> = first.content.split_whitespace().collect();
    assert!(
        words.len() >= 3,
        "enough words to pick a stop string: {:?}",
        first.content
    );
    let stop = words[2];
    let cut = first
        .content
        .find(stop)
        .expect("the stop word is in the content");
    let stopped = runtime
        .generate(request.clone().with_stop(stop))
        .await
        .expect("generate with stop");
    assert_eq!(
        stopped.content,
        &first.content[..cut],
        "stops before {stop:?}"
    );
    assert_eq!(stopped.finish_reason, Some(FinishReason::Stop));

    let sampled = |seed| {
        InferenceRequest::from_prompt("Write a short poem about the sea.")
            .with_max_tokens(24)
            .with_temperature(0.8)
            .with_seed(seed)
    };
    let a = runtime.generate(sampled(42)).await.expect("seeded");
    let b = runtime.generate(sampled(42)).await.expect("seeded again");
    assert_eq!(a.content, b.content, "a seed at temperature 0.8 repeats");
    // An engine that ignored temperature or seed would answer these alike.
    let mut others = std::collections::BTreeSet::new();
    for seed in [1, 2, 3] {
        others.insert(
            runtime
                .generate(sampled(seed))
                .await
                .expect("seeded")
                .content,
        );
    }
    others.insert(a.content);
    assert!(
        others.len() >= 3,
        "four seeds at temperature 0.8 give at least three different answers: {others:?}"
    );
}

/// Non-ASCII output arrives as valid UTF-8 deltas with no replacement characters.
pub async fn streaming_utf8(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    let mut non_ascii = false;
    for prompt in [
        QUESTION,
        "Réponds en français : où se trouve la tour Eiffel ?",
        "写一句关于春天的中文句子。",
        "Reply with three emoji that describe happiness.",
    ] {
        let request = greedy(prompt, 32);
        let deltas = collect_stream(runtime, request.clone()).await;
        let streamed = deltas.concat();
        assert!(
            !streamed.contains('\u{fffd}'),
            "no replacement characters: {streamed:?}"
        );
        let plain = runtime.generate(request).await.expect("generate");
        assert_eq!(streamed, plain.content, "{prompt}");
        non_ascii |= !streamed.is_ascii();
    }
    assert!(
        non_ascii,
        "at least one answer (French, Chinese, emoji) is not ASCII"
    );
}

/// Four requests at once all succeed, each with the answer the same request
/// gets alone.
pub async fn concurrency(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    let prompts = [
        "Name a color.",
        "Name an animal.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
    ];
    let mut alone = Vec::new();
    for prompt in prompts {
        let answer = runtime.generate(greedy(prompt, 16)).await;
        alone.push(
            answer
                .unwrap_or_else(|err| panic!("{prompt}: {}", chain(&err)))
                .content,
        );
    }
    let together = futures::future::join_all(
        prompts
            .iter()
            .map(|prompt| runtime.generate(greedy(prompt, 16))),
    )
    .await;
    for ((prompt, answer), expected) in prompts.iter().zip(together).zip(&alone) {
        let answer = answer.unwrap_or_else(|err| panic!("{prompt}: {}", chain(&err)));
        assert_eq!(
            &answer.content, expected,
            "{prompt}: concurrent and sequential answers"
        );
    }
    let streams = futures::future::join_all(
        prompts
            .iter()
            .map(|prompt| collect_stream(runtime, greedy(prompt, 16))),
    )
    .await;
    for ((prompt, deltas), expected) in prompts.iter().zip(streams).zip(&alone) {
        assert_eq!(&deltas.concat(), expected, "{prompt}: concurrent streams");
    }
}

/// Dropping a stream after a few deltas cancels the generation in the engine.
///
/// That the drop is the cause, not an answer ending anyway: the same greedy
/// request is first shown to run past `UNCUT` tokens, and the engine's own
/// count of generated tokens grows by far fewer while the dropped stream
/// runs.
pub async fn cancellation(backend: &Backend) {
    const UNCUT: u32 = 64;
    /// Tokens the engine may generate past the third delta before it notices
    /// the drop (a step or two, a batch of buffered deltas).
    const SLACK: u64 = 24;
    let shared = crate::harness::shared_runtime(backend).await;
    let runtime = &*shared;
    let long = long_request();
    let mut probe = long.clone();
    probe.max_tokens = Some(UNCUT);
    let uncut = runtime.generate(probe).await.expect("the long request");
    assert_eq!(
        uncut.finish_reason,
        Some(FinishReason::Length),
        "the long request runs past {UNCUT} tokens when nothing stops it"
    );
    let before = engine_generated_tokens(backend, runtime).await;
    let mut stream = runtime.generate_stream(long).await.expect("stream");
    for _ in 0..3 {
        stream.next().await.expect("a delta").expect("a delta");
    }
    assert_eq!(
        engine_activity(backend, runtime).await,
        1,
        "the engine reports the generation running"
    );
    let dropped = Instant::now();
    drop(stream);

    let idle_after = wait_engine_idle(backend, runtime, Duration::from_secs(3)).await;
    assert!(
        idle_after.is_some(),
        "the engine kept generating after the stream was dropped"
    );
    tracing::info!(idle_after = ?idle_after.unwrap(), "engine idle after the stream was dropped");
    if let Some(before) = before {
        let after = engine_generated_tokens(backend, runtime)
            .await
            .expect("the counter is still there");
        let generated = after - before;
        assert!(
            generated <= 3 + SLACK,
            "the engine stopped because the stream was dropped: it generated {generated} \
             tokens for an answer that runs past {UNCUT}"
        );
    }
    // Either way the engine is free for the next request at once.
    let next = runtime
        .generate(greedy(QUESTION, 8))
        .await
        .expect("next request");
    assert!(!next.content.is_empty());
    assert!(
        dropped.elapsed() < Duration::from_secs(10),
        "the next request was served promptly ({:?})",
        dropped.elapsed()
    );
}
