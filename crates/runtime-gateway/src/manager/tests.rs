//! The manager's state machine without engines: fake runtimes through the
//! factory, under paused time, so ttl, backoff and timeouts pass in an
//! instant and every test is deterministic.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use runtime_core::{Error, InferenceRequest, ModelService, StreamEvent};

use super::RuntimeManager;
use super::fake::{Engines, gguf_file};
use crate::config::{GatewayConfig, ModelSpec};
use model_runtime::BackendChoice;

/// A model of the fake engines, named `name`.
fn spec(name: &str, model: &std::path::Path) -> ModelSpec {
    ModelSpec::new(name, model).with_backend(BackendChoice::Candle)
}

fn request(tokens: u32) -> InferenceRequest {
    InferenceRequest::from_prompt("hi").with_max_tokens(tokens)
}

fn manager(config: GatewayConfig, engines: &Engines) -> Arc<RuntimeManager> {
    RuntimeManager::with_factory(config, engines.factory()).expect("a valid configuration")
}

/// Lets every task that can run, run (time is paused: nothing advances it
/// but sleeping).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

async fn state_of(manager: &RuntimeManager, name: &str) -> &'static str {
    manager
        .status()
        .await
        .into_iter()
        .find(|status| status.name == name)
        .map(|status| status.state)
        .expect("the model is listed")
}

#[tokio::test(start_paused = true)]
async fn a_start_past_max_loaded_evicts_the_least_recently_used_idle_model() {
    let file = gguf_file();
    let engines = Engines::default();
    let config = GatewayConfig {
        max_loaded: Some(2),
        models: ["a", "b", "c"].map(|n| spec(n, file.path())).to_vec(),
        ..GatewayConfig::default()
    };
    let manager = manager(config, &engines);

    manager.generate(Some("a"), request(2)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    manager.generate(Some("b"), request(2)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // a is the least recently used: c's start unloads it, not b.
    manager.generate(Some("c"), request(2)).await.unwrap();
    assert_eq!(state_of(&manager, "a").await, "unloaded");
    assert_eq!(state_of(&manager, "b").await, "loaded");
    assert_eq!(state_of(&manager, "c").await, "loaded");
    assert_eq!(engines.running(), 2, "never more than max_loaded engines");
    assert_eq!(
        engines.shut_down("a"),
        1,
        "the evicted engine was shut down"
    );
    manager.shutdown().await.unwrap();
    assert_eq!(engines.running(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_busy_model_is_not_evicted_and_the_start_waits_for_room() {
    let file = gguf_file();
    let engines = Engines::default();
    let config = GatewayConfig {
        max_loaded: Some(1),
        queue_timeout: Duration::from_secs(30),
        models: ["a", "b"].map(|n| spec(n, file.path())).to_vec(),
        ..GatewayConfig::default()
    };
    let manager = manager(config, &engines);

    // a streams for 10 s; b's start must wait for it, not cut it off.
    engines.set_token_time(Duration::from_secs(1));
    let mut open = manager
        .generate_events(Some("a"), request(10))
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let manager = manager.clone();
        async move { manager.generate(Some("b"), request(1)).await }
    });
    let mut deltas = 0;
    while let Some(event) = open.next().await {
        if let StreamEvent::Delta(_) = event.expect("a's stream is not cut") {
            deltas += 1;
        }
    }
    assert_eq!(deltas, 10, "a's answer is whole");
    drop(open);
    waiting.await.unwrap().expect("b started once a was idle");
    assert_eq!(state_of(&manager, "a").await, "unloaded");
    manager.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_model_that_fails_to_start_is_retried_after_a_growing_backoff() {
    let file = gguf_file();
    let engines = Engines::default();
    engines.fail_starts("bad");
    let config = GatewayConfig {
        models: vec![spec("bad", file.path())],
        ..GatewayConfig::default()
    };
    let manager = manager(config, &engines);

    let first = manager.generate(Some("bad"), request(1)).await.unwrap_err();
    let Error::ModelUnavailable { retry_after, .. } = &first else {
        panic!("a failed start is ModelUnavailable, got {first:?}");
    };
    assert_eq!(*retry_after, Some(Duration::from_secs(1)));
    assert_eq!(engines.starts("bad"), 1);

    // Within the backoff, no new attempt: the failure is answered at once.
    let again = manager.generate(Some("bad"), request(1)).await.unwrap_err();
    assert!(matches!(again, Error::ModelUnavailable { .. }));
    assert_eq!(engines.starts("bad"), 1, "no start within the backoff");

    tokio::time::sleep(Duration::from_millis(1001)).await;
    let second = manager.generate(Some("bad"), request(1)).await.unwrap_err();
    let Error::ModelUnavailable { retry_after, .. } = &second else {
        panic!("{second:?}");
    };
    assert_eq!(engines.starts("bad"), 2, "retried after the backoff");
    assert_eq!(
        *retry_after,
        Some(Duration::from_secs(2)),
        "the backoff doubles"
    );

    // Once it starts, the backoff no longer applies.
    engines.allow_starts("bad");
    tokio::time::sleep(Duration::from_secs(2)).await;
    manager.generate(Some("bad"), request(1)).await.unwrap();
    manager.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn past_parallel_and_queue_a_request_is_refused_as_busy() {
    let file = gguf_file();
    let engines = Engines::default();
    engines.set_token_time(Duration::from_secs(1));
    let mut model = spec("a", file.path());
    model.runtime.parallel = Some(1);
    model.queue = Some(1);
    let config = GatewayConfig {
        models: vec![model],
        ..GatewayConfig::default()
    };
    let manager = manager(config, &engines);

    let running = manager
        .generate_events(Some("a"), request(5))
        .await
        .unwrap();
    let queued = tokio::spawn({
        let manager = manager.clone();
        async move { manager.generate(Some("a"), request(1)).await }
    });
    settle().await;
    let refused = manager.generate(Some("a"), request(1)).await.unwrap_err();
    assert!(matches!(refused, Error::Busy(_)), "{refused:?}");
    assert_eq!(refused.http_status(), 429);

    drop(running);
    queued
        .await
        .unwrap()
        .expect("the queued request runs once the slot frees");
    manager.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_idle_model_is_unloaded_after_its_ttl_and_not_while_streaming() {
    let file = gguf_file();
    let engines = Engines::default();
    let mut model = spec("a", file.path());
    model.ttl = Some(Duration::from_secs(10));
    let config = GatewayConfig {
        models: vec![model],
        ..GatewayConfig::default()
    };
    let manager = manager(config, &engines);

    // A stream longer than the ttl keeps the model loaded.
    engines.set_token_time(Duration::from_secs(1));
    let mut stream = manager
        .generate_events(Some("a"), request(15))
        .await
        .unwrap();
    while let Some(event) = stream.next().await {
        event.expect("the stream runs to its end");
    }
    drop(stream);
    assert_eq!(
        state_of(&manager, "a").await,
        "loaded",
        "loaded while streaming"
    );
    assert_eq!(engines.shut_down("a"), 0);

    // Idle for less than the ttl: still loaded; past it: unloaded.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(state_of(&manager, "a").await, "loaded");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state_of(&manager, "a").await, "unloaded");
    assert_eq!(engines.shut_down("a"), 1);

    // The next request loads it again.
    manager.generate(Some("a"), request(1)).await.unwrap();
    assert_eq!(engines.starts("a"), 2);
    manager.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_reload_swaps_a_changed_model_while_its_open_stream_finishes_on_the_old_engine() {
    let file = gguf_file();
    let engines = Engines::default();
    let config = GatewayConfig {
        models: vec![spec("a", file.path())],
        ..GatewayConfig::default()
    };
    let manager = manager(config.clone(), &engines);
    manager.generate(Some("a"), request(1)).await.unwrap();
    let old = engines.last_engine("a");

    engines.set_token_time(Duration::from_secs(1));
    let mut open = manager
        .generate_events(Some("a"), request(5))
        .await
        .unwrap();
    let first = open.next().await.unwrap().unwrap();
    assert_eq!(first, StreamEvent::Delta(old.clone()));

    let mut changed = config.clone();
    changed.models[0].runtime.context_size = Some(512);
    manager
        .reload(changed)
        .await
        .expect("the changed model starts");
    let new = engines.last_engine("a");
    assert_ne!(new, old, "a new engine serves the changed model");

    // New requests go to the new engine at once ...
    engines.set_token_time(Duration::ZERO);
    let answer = manager.generate(Some("a"), request(1)).await.unwrap();
    assert_eq!(answer.content, new);
    // ... while the open stream finishes, whole, on the old one.
    let mut rest = Vec::new();
    while let Some(event) = open.next().await {
        if let StreamEvent::Delta(text) = event.expect("the open stream is not cut") {
            rest.push(text);
        }
    }
    assert_eq!(rest, vec![old.clone(); 4]);
    drop(open);
    settle().await;
    assert_eq!(
        engines.shut_down_engine(&old),
        1,
        "the old engine is retired"
    );
    assert_eq!(engines.running(), 1);
    manager.shutdown().await.unwrap();
    assert_eq!(engines.running(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_engine_ends_its_stream_and_is_started_anew_after_the_backoff() {
    let file = gguf_file();
    let engines = Engines::default();
    let config = GatewayConfig {
        models: vec![spec("a", file.path())],
        ..GatewayConfig::default()
    };
    let manager = manager(config, &engines);
    engines.set_token_time(Duration::from_secs(1));
    let mut open = manager
        .generate_events(Some("a"), request(10))
        .await
        .unwrap();
    open.next().await.unwrap().unwrap();

    engines.crash("a");
    let ended = loop {
        match open.next().await {
            Some(Ok(StreamEvent::Delta(_))) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(ended, Some(Err(Error::EngineExited { .. }))),
        "the open stream ends with the engine's exit: {ended:?}"
    );
    drop(open);
    // The monitor notices within a health interval and marks it failed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = manager.status().await.remove(0);
    assert_eq!(status.restarts, 1);

    // The first crash restarts without delay; the next request gets a new engine.
    engines.set_token_time(Duration::ZERO);
    let answer = manager.generate(Some("a"), request(1)).await.unwrap();
    assert_eq!(engines.starts("a"), 2);
    assert_eq!(answer.content, engines.last_engine("a"));
    manager.shutdown().await.unwrap();
    assert_eq!(engines.running(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_queued_for_a_model_a_reload_removed_is_refused_and_starts_no_engine() {
    let file = gguf_file();
    let engines = Engines::default();
    engines.set_token_time(Duration::from_secs(1));
    let mut model = spec("a", file.path());
    model.runtime.parallel = Some(1);
    let config = GatewayConfig {
        models: vec![model, spec("b", file.path())],
        ..GatewayConfig::default()
    };
    let manager = manager(config.clone(), &engines);
    let mut running = manager
        .generate_events(Some("a"), request(5))
        .await
        .unwrap();
    let queued = tokio::spawn({
        let manager = manager.clone();
        async move { manager.generate(Some("a"), request(1)).await }
    });
    settle().await;

    let mut without_a = config.clone();
    without_a.models.remove(0);
    manager.reload(without_a).await.unwrap();
    // The running stream drains (it is not cut), then a is unloaded.
    while let Some(event) = running.next().await {
        event.expect("the running stream finishes");
    }
    drop(running);
    let refused = queued.await.unwrap().unwrap_err();
    assert!(
        matches!(
            refused,
            Error::ModelNotServed { .. } | Error::ModelUnavailable { .. }
        ),
        "the queued request is refused: {refused:?}"
    );
    settle().await;
    assert_eq!(
        engines.starts("a"),
        1,
        "no engine is started for a removed model"
    );
    assert_eq!(engines.running(), 0);
    manager.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_preloaded_model_keeps_restarting_after_a_failed_restart_without_a_request() {
    let file = gguf_file();
    let engines = Engines::default();
    let mut model = spec("a", file.path());
    model.preload = true;
    let config = GatewayConfig {
        models: vec![model],
        ..GatewayConfig::default()
    };
    let manager = manager(config, &engines);
    manager.load("a").await.unwrap();
    assert!(manager.is_ready().await);

    // It crashes, and the first restart fails too.
    engines.fail_starts("a");
    engines.crash("a");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(engines.starts("a") >= 2, "a restart was tried");
    assert!(!manager.is_ready().await, "not ready while it cannot start");

    // Once it can start, it is restarted with no request arriving.
    engines.allow_starts("a");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !manager.is_ready().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the preloaded model is back within its backoff"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(state_of(&manager, "a").await, "loaded");
    assert_eq!(engines.running(), 1);
    manager.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_start_that_panics_reaches_clients_as_a_reason_without_the_panic_text() {
    let file = gguf_file();
    let engines = Engines::default();
    engines.panic_starts("a");
    let config = GatewayConfig {
        models: vec![spec("a", file.path())],
        ..GatewayConfig::default()
    };
    let manager = manager(config, &engines);
    let err = manager.generate(Some("a"), request(1)).await.unwrap_err();
    let Error::ModelUnavailable { reason, .. } = &err else {
        panic!("a panicking start is ModelUnavailable, got {err:?}");
    };
    for leak in ["panicked", "overflow", "alice", ".gguf", "task"] {
        assert!(
            !reason.contains(leak),
            "the reason holds {leak:?}: {reason}"
        );
    }
    assert_eq!(err.http_status(), 503);
    manager.shutdown().await.unwrap();
}
