//! Load: clients that never read, and many streams through the gateway.

use super::*;

/// Three clients that never read their streamed answers hold only their own
/// requests: a fourth, ordinary request is answered, and shutdown finishes
/// within its budget.
///
/// It ends the shared engine: the last of the checks that share it.
pub async fn slow_readers(backend: &Backend) {
    let mut runtime = crate::harness::take_shared_runtime(backend).await;
    let address: std::net::SocketAddr = runtime
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .expect("a socket address");
    let key = crate::bearer(runtime.as_ref());
    let long = wire::chat_body("Write a very long story about a dragon.", 800, true);
    let mut sleepers = Vec::new();
    for _ in 0..3 {
        sleepers.push(wire::never_reading_client(address, &key, &long).await);
    }
    // Let them fill what the network buffers hold.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answered = tokio::time::timeout(
        Duration::from_secs(60),
        runtime.generate(greedy(QUESTION, 8)),
    )
    .await
    .expect("a fourth request is answered while three clients never read");
    assert!(answered.is_ok(), "{:?}", answered.map_err(|e| chain(&e)));

    let started = Instant::now();
    runtime.shutdown().await.expect("shutdown");
    let budget = backend.config.shutdown_grace + backend.exit_budget;
    assert!(
        started.elapsed() < budget,
        "shutdown with clients that never read took {:?} (budget {budget:?})",
        started.elapsed()
    );
    drop(sleepers);
}

/// Through the gateway (the router over a RuntimeManager, as
/// `model-runtime serve` runs it): 200 streamed requests, 16 at a time, 50
/// of them abandoned mid-stream: no error, every completed answer whole, the
/// engine idle and healthy afterwards, nothing left in flight. Then the same
/// with the engine SIGKILLed midway: every request ends.
///
/// The first half runs on the shared engine, lent to the gateway's factory
/// (what is checked is the gateway's behaviour under load, not its start);
/// the second starts an engine of its own, to kill it.
pub async fn gateway_load(backend: &Backend) {
    let shared = crate::harness::shared_runtime(backend).await;
    let (manager, url, server) =
        crate::gateway::start_lent(backend, backend.config.clone(), shared).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let requests = backend.load_requests;
    let outcomes = load(&http, &url, requests, 16, |i| i % 4 == 3).await;
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:?}",
        failures.len()
    );
    assert_eq!(outcomes.len(), requests);
    assert_eq!(manager.in_flight(), 0, "nothing left in flight");
    let idle = manager
        .with_runtime(None, async |runtime| {
            wait_engine_idle(backend, runtime, Duration::from_secs(5)).await
        })
        .await
        .unwrap();
    assert!(idle.is_some(), "the engine runs no generation afterwards");
    let healthy = manager
        .with_runtime(None, async |runtime| runtime.health_check().await)
        .await
        .unwrap();
    assert!(healthy.is_ok(), "healthy afterwards: {healthy:?}");
    manager.shutdown_within(Duration::ZERO).await;
    server.abort();

    if backend.server.is_none() {
        return;
    }
    let (manager, url, server) = crate::gateway::start(backend, backend.config.clone()).await;
    let engine = manager
        .with_runtime(None, async |runtime| engine_processes(backend, runtime))
        .await
        .unwrap();
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        procs::signal_all(&engine, nix::sys::signal::Signal::SIGKILL);
    });
    let outcomes = load(&http, &url, requests, 16, |_| false).await;
    killer.await.unwrap();
    let hung: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err())
        .filter(|e| e.starts_with("no answer"))
        .collect();
    assert!(
        hung.is_empty(),
        "requests hung after the engine was killed: {hung:?}"
    );
    assert!(
        outcomes.iter().any(Result::is_err),
        "the kill was noticed by some request"
    );
    manager.shutdown_within(Duration::ZERO).await;
    server.abort();
}

/// Sends `count` streamed requests, `concurrency` at a time; those for which
/// `abandon` holds are dropped after their first delta. Each outcome is `Ok`
/// for a whole answer (or a clean abandon) and `Err` with what went wrong.
async fn load(
    http: &reqwest::Client,
    url: &str,
    count: usize,
    concurrency: usize,
    abandon: impl Fn(usize) -> bool,
) -> Vec<Result<(), String>> {
    let prompts = [
        "Name a color.",
        "What is 2 + 2?",
        "Say hello.",
        "Name a fruit.",
    ];
    futures::stream::iter(0..count)
        .map(|i| {
            let body = wire::chat_body(prompts[i % prompts.len()], 16, true);
            let abandoned = abandon(i);
            async move {
                let timeout = Duration::from_secs(90);
                if abandoned {
                    wire::stream_then_hang_up(http, url, "", &body, timeout).await
                } else {
                    let answer: SseAnswer =
                        wire::stream_chat(http, url, "", &body, timeout).await?;
                    if answer.is_well_formed() {
                        Ok(())
                    } else {
                        Err(format!("malformed answer: {answer:?}"))
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}
