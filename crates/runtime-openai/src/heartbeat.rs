//! Telling a hung engine from a slow one: [`Heartbeat`].
//!
//! A long prefill sends no bytes for as long as it takes, so silence on a
//! request proves nothing. An engine that is alive still answers a cheap probe
//! from another thread (llama-server's HTTP threads, vLLM's API server), while
//! a stopped or wedged one does not: its socket may even accept connections
//! (the kernel's backlog does that) but nothing answers them.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::OpenAiClient;

/// How an [`OpenAiClient`] probes its engine's liveness
/// ([`OpenAiClient::with_heartbeat`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Heartbeat {
    /// The engine's name, for [`Error::EngineUnresponsive`](runtime_core::Error::EngineUnresponsive).
    pub engine: String,
    /// What to probe (default `/health`). Any HTTP answer counts as alive,
    /// whatever its status.
    pub path: String,
    /// Whether the probe carries the API key. Off by default: local engines
    /// answer `/health` without it, and a probe must not hand the key to
    /// whatever listens on the port.
    pub authorized: bool,
    /// How long the engine may answer no probe before its requests fail.
    pub hang_timeout: Duration,
}

impl Heartbeat {
    /// A heartbeat probing `GET /health` without the key.
    pub fn new(engine: impl Into<String>, hang_timeout: Duration) -> Self {
        Self {
            engine: engine.into(),
            path: "/health".to_owned(),
            authorized: false,
            hang_timeout,
        }
    }

    /// Probes `path` instead, with the key when `authorized` (remote servers
    /// without a `/health` route: `/v1/models`).
    #[must_use]
    pub fn with_path(mut self, path: impl Into<String>, authorized: bool) -> Self {
        self.path = path.into();
        self.authorized = authorized;
        self
    }

    /// How often to probe: often enough that a hang is seen within about the
    /// hang timeout, never more than every 50 ms.
    fn interval(&self) -> Duration {
        (self.hang_timeout / 5).clamp(Duration::from_millis(50), Duration::from_secs(3))
    }

    /// How long one probe may take before it counts as unanswered.
    fn probe_timeout(&self) -> Duration {
        (self.hang_timeout / 3).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

/// A running heartbeat: its state, and the task that keeps it.
#[derive(Debug)]
pub(crate) struct Pulse {
    pub(crate) engine: String,
    /// `None` while the engine answers; once it has been silent for the hang
    /// timeout, for how long.
    pub(crate) state: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

impl Pulse {
    pub(crate) fn start(heartbeat: Heartbeat, client: OpenAiClient) -> Self {
        let (state, _) = watch::channel(None);
        let sender = state.clone();
        let engine = heartbeat.engine.clone();
        let task = tokio::spawn(async move {
            let mut last_answer = Instant::now();
            loop {
                let answered = if heartbeat.authorized {
                    client.get(&heartbeat.path, heartbeat.probe_timeout()).await
                } else {
                    client
                        .get_anonymous(&heartbeat.path, heartbeat.probe_timeout())
                        .await
                }
                .is_ok();
                if answered {
                    last_answer = Instant::now();
                    sender.send_if_modified(|state| state.take().is_some());
                } else if last_answer.elapsed() >= heartbeat.hang_timeout {
                    let silent = last_answer.elapsed();
                    if sender.borrow().is_none() {
                        tracing::warn!(
                            engine = heartbeat.engine,
                            silent_ms = silent.as_millis() as u64,
                            "the engine stopped answering its health probe"
                        );
                    }
                    sender.send_replace(Some(silent));
                }
                tokio::time::sleep(heartbeat.interval()).await;
            }
        });
        Self {
            engine,
            state,
            task,
        }
    }

    pub(crate) fn silent_for(&self) -> Option<Duration> {
        *self.state.borrow()
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        self.task.abort();
    }
}
