//! Fake runtimes for the manager's tests: engines that start, stream and stop
//! in (paused) time, fail to start when told, and record what happened.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{
    Error, EventStream, FinishReason, InferenceRequest, InferenceResponse, ModelFormat,
    ModelRuntime, Result, RuntimeConfig, RuntimeMetadata, StreamEvent, TextStream, Usage,
    collect_events, text_deltas,
};

use super::RuntimeFactory;

/// A file that passes for a GGUF model (its magic and an empty header), so
/// a configuration naming it validates.
pub(super) fn gguf_file() -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .suffix(".gguf")
        .tempfile()
        .expect("a temporary file");
    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend(0u64.to_le_bytes());
    header.extend(0u64.to_le_bytes());
    std::fs::write(file.path(), header).expect("writing the fake model");
    file
}

/// What a running fake engine is.
#[derive(Debug)]
pub(super) struct EngineState {
    /// Its id, `model#n`.
    pub(super) id: String,
    /// The model it serves.
    pub(super) model: String,
    /// The context size it was started with (what a reload changes).
    pub(super) context: Option<u32>,
    /// The memory it holds: its model file's size, as the manager estimates.
    pub(super) memory: u64,
    alive: AtomicBool,
    hung: AtomicBool,
}

/// Every fake engine the factory made, and how the next ones behave.
#[derive(Clone, Default)]
pub(super) struct Engines {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    next_id: AtomicUsize,
    /// Per model name: the ids of its engines, oldest first.
    by_model: Mutex<HashMap<String, Vec<String>>>,
    /// Engines that are running (initialized, not shut down), by id.
    running: Mutex<HashMap<String, Arc<EngineState>>>,
    /// Engine ids that were shut down, with how many times.
    shut_down: Mutex<HashMap<String, usize>>,
    /// Models whose starts fail.
    failing: Mutex<Vec<String>>,
    /// Models whose starts panic.
    panicking: Mutex<Vec<String>>,
    /// How long each generated token takes, in the engine.
    token_millis: AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engines {
    /// The factory to give the manager.
    pub(super) fn factory(&self) -> RuntimeFactory {
        let shared = self.shared.clone();
        Box::new(move |spec| {
            let id = format!(
                "{}#{}",
                spec.name,
                shared.next_id.fetch_add(1, Ordering::SeqCst)
            );
            lock(&shared.by_model)
                .entry(spec.name.clone())
                .or_default()
                .push(id.clone());
            Ok(Box::new(Fake {
                id: id.clone(),
                model: spec.name.clone(),
                shared: shared.clone(),
                state: Arc::new(EngineState {
                    id: id.clone(),
                    model: spec.name.clone(),
                    context: spec.runtime.context_size,
                    memory: std::fs::metadata(spec.path()).map_or(0, |m| m.len()),
                    alive: AtomicBool::new(false),
                    hung: AtomicBool::new(false),
                }),
            }))
        })
    }

    /// Starts of `model`'s engine from now on fail.
    pub(super) fn fail_starts(&self, model: &str) {
        lock(&self.shared.failing).push(model.to_owned());
    }

    /// Starts of `model`'s engine succeed again.
    pub(super) fn allow_starts(&self, model: &str) {
        lock(&self.shared.failing).retain(|m| m != model);
        lock(&self.shared.panicking).retain(|m| m != model);
    }

    /// Starts of `model`'s engine from now on panic, with a message that
    /// holds a path (as a real one might).
    pub(super) fn panic_starts(&self, model: &str) {
        lock(&self.shared.panicking).push(model.to_owned());
    }

    /// Each token of every stream takes `time`.
    pub(super) fn set_token_time(&self, time: Duration) {
        self.shared
            .token_millis
            .store(time.as_millis() as usize, Ordering::SeqCst);
    }

    /// How many engines were made for `model` (each one start).
    pub(super) fn starts(&self, model: &str) -> usize {
        lock(&self.shared.by_model).get(model).map_or(0, Vec::len)
    }

    /// The id of `model`'s newest engine.
    pub(super) fn last_engine(&self, model: &str) -> String {
        lock(&self.shared.by_model)
            .get(model)
            .and_then(|ids| ids.last().cloned())
            .expect("an engine was made for the model")
    }

    /// Engines running now, over every model.
    pub(super) fn running(&self) -> usize {
        self.alive().len()
    }

    /// The engines running now.
    pub(super) fn alive(&self) -> Vec<Arc<EngineState>> {
        lock(&self.shared.running)
            .values()
            .filter(|state| state.alive.load(Ordering::SeqCst))
            .cloned()
            .collect()
    }

    /// Shutdowns of `model`'s engines, all together.
    pub(super) fn shut_down(&self, model: &str) -> usize {
        let prefix = format!("{model}#");
        lock(&self.shared.shut_down)
            .iter()
            .filter(|(id, _)| id.starts_with(&prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Shutdowns of the engine `id`.
    pub(super) fn shut_down_engine(&self, id: &str) -> usize {
        lock(&self.shared.shut_down).get(id).copied().unwrap_or(0)
    }

    /// Kills `model`'s running engine: it stops being ready, as a crashed
    /// engine does.
    pub(super) fn crash(&self, model: &str) {
        let id = self.last_engine(model);
        if let Some(state) = lock(&self.shared.running).get(&id) {
            state.alive.store(false, Ordering::SeqCst);
        }
    }

    /// `model`'s running engine hangs: it stops answering its probe, and its
    /// streams stop (until it is shut down).
    pub(super) fn hang(&self, model: &str) {
        let Some(id) = lock(&self.shared.by_model)
            .get(model)
            .and_then(|ids| ids.last().cloned())
        else {
            return;
        };
        if let Some(state) = lock(&self.shared.running).get(&id) {
            state.hung.store(true, Ordering::SeqCst);
        }
    }
}

/// One fake engine: each token of an answer is its own id, after the
/// configured token time.
struct Fake {
    id: String,
    model: String,
    shared: Arc<Shared>,
    state: Arc<EngineState>,
}

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fake").field("id", &self.id).finish()
    }
}

#[async_trait]
impl ModelRuntime for Fake {
    fn supported_format(&self) -> ModelFormat {
        ModelFormat::Gguf
    }

    async fn initialize(&mut self, _config: RuntimeConfig) -> Result<()> {
        if lock(&self.shared.panicking).contains(&self.model) {
            panic!("overflow when adding duration to instant at /home/alice/models/secret.gguf");
        }
        if lock(&self.shared.failing).contains(&self.model) {
            return Err(Error::StartupTimeout {
                engine: "fake".to_owned(),
                elapsed: Duration::from_secs(1),
                log_tail: vec!["the fake engine was told to fail".to_owned()],
            });
        }
        self.state.alive.store(true, Ordering::SeqCst);
        lock(&self.shared.running).insert(self.id.clone(), self.state.clone());
        Ok(())
    }

    async fn is_ready(&self) -> bool {
        self.state.alive.load(Ordering::SeqCst) && !self.state.hung.load(Ordering::SeqCst)
    }

    async fn health_check(&self) -> Result<String> {
        if self.is_ready().await {
            Ok("ok".to_owned())
        } else {
            Err(Error::NotInitialized)
        }
    }

    fn base_url(&self) -> String {
        String::new()
    }

    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse> {
        collect_events(self.generate_events(request).await?).await
    }

    async fn generate_stream(&self, request: InferenceRequest) -> Result<TextStream> {
        Ok(text_deltas(self.generate_events(request).await?))
    }

    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream> {
        if !self.state.alive.load(Ordering::SeqCst) {
            return Err(Error::NotInitialized);
        }
        let tokens = request.max_tokens.unwrap_or(4) as usize;
        let token_time =
            Duration::from_millis(self.shared.token_millis.load(Ordering::SeqCst) as u64);
        let id = self.id.clone();
        let state = self.state.clone();
        let stream = futures::stream::unfold(0usize, move |sent| {
            let id = id.clone();
            let state = state.clone();
            async move {
                if sent > tokens {
                    return None;
                }
                // A hung engine sends nothing more (its reader gives up, or
                // the manager retires it).
                while state.hung.load(Ordering::SeqCst) && state.alive.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if !state.alive.load(Ordering::SeqCst) {
                    let exited = Error::EngineExited {
                        engine: "fake".to_owned(),
                        status: "signal: 9".to_owned(),
                        log_tail: Vec::new(),
                    };
                    // One error, then the end.
                    return Some((Err(exited), tokens + 1));
                }
                if sent == tokens {
                    let finished = StreamEvent::Finished {
                        finish_reason: Some(FinishReason::Length),
                        usage: Some(Usage::new(1, tokens as u64)),
                        timings: None,
                    };
                    return Some((Ok(finished), sent + 1));
                }
                tokio::time::sleep(token_time).await;
                Some((Ok(StreamEvent::Delta(id)), sent + 1))
            }
        });
        Ok(Box::new(Box::pin(stream)))
    }

    async fn shutdown(&mut self) -> Result<()> {
        if self.state.alive.swap(false, Ordering::SeqCst) {
            *lock(&self.shared.shut_down)
                .entry(self.id.clone())
                .or_default() += 1;
        }
        lock(&self.shared.running).remove(&self.id);
        Ok(())
    }

    fn metadata(&self) -> RuntimeMetadata {
        RuntimeMetadata::new(ModelFormat::Gguf, "fake", "0")
    }

    fn resident_memory(&self) -> Option<u64> {
        self.state
            .alive
            .load(Ordering::SeqCst)
            .then_some(self.state.memory)
    }
}
