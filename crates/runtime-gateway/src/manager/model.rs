//! One configured model: its state (unloaded, loading, loaded, failed),
//! when it was last used, and the backoff between attempts to start it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use futures::future::{BoxFuture, Shared};
use runtime_core::Error;
use tokio::sync::Semaphore;

use crate::config::ModelSpec;
use crate::served::ServedRuntime;

/// Restarts after a crash wait this long at first, doubling up to
/// [`MAX_BACKOFF`]; failed starts begin at [`FIRST_BACKOFF`].
pub(super) const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The longest wait between two attempts to start a model.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// An engine that stayed up this long resets its crash backoff.
pub(super) const STABLE_AFTER: Duration = Duration::from_secs(60);

/// One configured model and its life.
pub(super) struct Model {
    pub(super) spec: ModelSpec,
    pub(super) state: Mutex<State>,
    /// `parallel` requests run at once.
    pub(super) permits: Arc<Semaphore>,
    /// Requests waiting for a permit.
    pub(super) waiting: AtomicUsize,
    pub(super) last_used: Mutex<Instant>,
    pub(super) restarts: AtomicU64,
    /// Failed starts or crashes in a row, for the backoff.
    pub(super) streak: AtomicU32,
    /// Resident memory, measured after load (the model's size before).
    pub(super) memory: AtomicU64,
    /// A reload took it out of the configuration: requests still holding it
    /// (queued for a slot) are refused rather than starting it again.
    pub(super) removed: AtomicBool,
    /// Room was made for its start: while loading it counts against the
    /// limits (a start still waiting for room does not).
    pub(super) has_room: AtomicBool,
}

#[derive(Clone)]
pub(super) enum State {
    Unloaded,
    Loading(Shared<BoxFuture<'static, std::result::Result<(), Failure>>>),
    Loaded {
        served: Arc<ServedRuntime>,
        since: SystemTime,
        at: Instant,
    },
    Failed(Failure),
}

/// Why a model cannot serve, for clients (no engine log text) and retries.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) reason: String,
    pub(super) at: Instant,
    pub(super) retry_after: Duration,
}

impl Failure {
    pub(super) fn error(&self, model: &str) -> Error {
        Error::ModelUnavailable {
            model: model.to_owned(),
            reason: self.reason.clone(),
            retry_after: Some(self.retry_after.saturating_sub(self.at.elapsed())),
        }
    }
}

impl Model {
    pub(super) fn new(spec: ModelSpec) -> Arc<Self> {
        let estimate = size_on_disk(spec.path());
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(spec.parallel() as usize)),
            spec,
            state: Mutex::new(State::Unloaded),
            waiting: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            restarts: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            memory: AtomicU64::new(estimate),
            removed: AtomicBool::new(false),
            has_room: AtomicBool::new(false),
        })
    }

    pub(super) fn name(&self) -> &str {
        &self.spec.name
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether it is known, without starting it, that its engine cannot
    /// embed: a model here that is no embedding model (its files say so). A
    /// server's URL or an unreadable file is not known: its engine answers
    /// for itself. Reads the model's header, off the async workers.
    pub(super) async fn cannot_embed(&self) -> bool {
        let path = self.spec.path().to_owned();
        if model_runtime::is_url(&path) {
            return false;
        }
        tokio::task::spawn_blocking(move || runtime_core::is_embedding_model(&path))
            .await
            .is_ok_and(|read| matches!(read, Ok(false)))
    }

    /// Whether its engine counts against the limits: loaded, or loading
    /// with room made for it.
    pub(super) fn holds_room(&self) -> bool {
        match &*self.state() {
            State::Loaded { .. } => true,
            State::Loading(_) => self.has_room.load(Ordering::SeqCst),
            State::Unloaded | State::Failed(_) => false,
        }
    }

    pub(super) fn touch(&self) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    pub(super) fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }

    /// The loaded runtime, if loaded and nothing runs or waits on it.
    pub(super) fn idle_runtime(&self) -> Option<Arc<ServedRuntime>> {
        match &*self.state() {
            State::Loaded { served, .. }
                if served.in_flight() == 0 && self.waiting.load(Ordering::SeqCst) == 0 =>
            {
                Some(served.clone())
            }
            _ => None,
        }
    }

    /// The next backoff after a failure, growing with the streak.
    pub(super) fn next_backoff(&self, first: Duration) -> Duration {
        let streak = self.streak.fetch_add(1, Ordering::SeqCst);
        if first.is_zero() && streak == 0 {
            return Duration::ZERO;
        }
        let base = if first.is_zero() {
            FIRST_BACKOFF
        } else {
            first
        };
        base.saturating_mul(1 << streak.min(6)).min(MAX_BACKOFF)
    }
}

/// The size of a model on disk: the file, or a directory's files.
pub(super) fn size_on_disk(path: &std::path::Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.metadata().ok())
            .filter(std::fs::Metadata::is_file)
            .map(|meta| meta.len())
            .sum(),
        Ok(meta) => meta.len(),
        Err(_) => 0,
    }
}

/// What a client may learn about a failed start: the kind of failure, not
/// the engine's log.
pub(super) fn describe_start_failure(err: &Error) -> String {
    let what = match err {
        Error::ModelNotFound { .. } => "its model file is missing",
        Error::InvalidModel { .. } | Error::UnsupportedFormat { .. } => {
            "its model cannot be loaded by its backend"
        }
        Error::BinaryNotFound { .. } => "its engine is not installed",
        Error::Spawn { .. } => "its engine could not be started",
        Error::StartupTimeout { .. } => "its engine did not become ready in time",
        Error::EngineExited { .. } => "its engine exited while starting",
        Error::ModelUnavailable { reason, .. } => return reason.clone(),
        Error::InvalidConfig { .. } => "its configuration is invalid",
        _ => "it failed to start",
    };
    format!("{what}; the server log says more")
}
