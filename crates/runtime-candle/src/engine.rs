//! The in-process engine: a bounded queue of requests served by worker threads
//! of its own, each with a session (shared weights, own KV cache), inside a
//! rayon pool sized by `threads`.
//!
//! A worker never waits for a reader: each generation's events go into a
//! channel without a bound, which its length bounds (at most one event per
//! generated token, and a request generates at most the context's tokens). A
//! client that never reads holds its own request's memory, never a worker.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use runtime_core::{
    Error, EventStream, FinishReason, InferenceRequest, InferenceResponse, Result, StreamEvent,
    Timings, Usage, collect_events,
};
use runtime_openai::ChatService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::model::{LoadedModel, Session};
use crate::stop::StopScanner;

/// Where a generation's events go.
type Events = mpsc::UnboundedSender<Result<StreamEvent>>;

/// How the engine runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EngineOptions {
    /// Requests generated at once, each on its own worker thread.
    pub(crate) workers: usize,
    /// Requests that may wait for a worker before new ones are refused.
    pub(crate) queue: usize,
    /// Threads of the compute pool the workers share.
    pub(crate) threads: usize,
}

/// A prepared request.
struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: Sampling,
    seed: u64,
    stop: Vec<String>,
    events: Events,
    queued_at: Instant,
}

/// The engine: shared model, job queue, workers.
#[derive(Debug)]
pub(crate) struct Engine {
    model: Arc<LoadedModel>,
    jobs: Mutex<Option<SyncSender<Job>>>,
    shutting_down: Arc<AtomicBool>,
    /// Generations running now (not those waiting in the queue).
    active: Arc<AtomicUsize>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Starts the workers for `model`.
    pub(crate) fn start(model: LoadedModel, options: EngineOptions) -> Result<Self> {
        let model = Arc::new(model);
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(options.threads.max(1))
                .thread_name(|i| format!("candle-compute-{i}"))
                .build()
                .map_err(|err| Error::engine("error starting the compute pool", err))?,
        );
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(options.queue);
        let queue = Arc::new(Mutex::new(queue));
        let shutting_down = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::with_capacity(options.workers);
        for index in 0..options.workers.max(1) {
            let session = Session::new(&model.weights)?;
            let worker = Worker {
                model: model.clone(),
                queue: queue.clone(),
                pool: pool.clone(),
                shutting_down: shutting_down.clone(),
                active: active.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("candle-worker-{index}"))
                .spawn(move || worker.run(session))
                .map_err(|err| Error::io("error starting a candle worker thread", err))?;
            workers.push(handle);
        }
        Ok(Self {
            model,
            jobs: Mutex::new(Some(jobs)),
            shutting_down,
            active,
            workers: Mutex::new(workers),
        })
    }

    pub(crate) fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// Generations running now.
    pub(crate) fn active_generations(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Stops taking jobs, ends in-flight generations with [`Error::ShutDown`]
    /// at their next token, and waits up to `budget` for the workers to
    /// finish. Workers still inside a long step after that (a long prompt's
    /// prefill) exit on their own when it ends; they hold nothing a caller
    /// waits for.
    pub(crate) fn stop(&self, budget: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let workers =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        let deadline = Instant::now() + budget;
        for worker in workers {
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if worker.is_finished() {
                let _ = worker.join();
            } else {
                tracing::warn!(
                    budget_ms = budget.as_millis() as u64,
                    "a candle worker is still in a step after the shutdown budget; leaving it to finish"
                );
            }
        }
    }
}

/// Renders, tokenizes and checks a request: blocking work, run off the async workers.
/// Returns the prompt's tokens and how many may be generated.
fn prepare(model: &LoadedModel, request: &InferenceRequest) -> Result<(Vec<u32>, usize)> {
    let template = model.template.as_ref().ok_or_else(|| {
        Error::invalid_request(
            "messages",
            "cannot be formatted: the model has no chat template (none in the GGUF, \
             tokenizer_config.json or chat_template.jinja)",
        )
    })?;
    let prompt = template.render(&request.messages)?;
    let tokens = model.tokenizer.encode(&prompt)?;
    let limit = model.context_limit;
    if tokens.len() >= limit {
        return Err(Error::ContextExceeded {
            prompt_tokens: tokens.len() as u64,
            context_size: limit as u64,
        });
    }
    let room = limit - tokens.len();
    let max_tokens = request.max_tokens.map_or(room, |n| (n as usize).min(room));
    Ok((tokens, max_tokens))
}

#[async_trait]
impl ChatService for Engine {
    async fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::SeqCst)
    }

    async fn generate(
        &self,
        model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<InferenceResponse> {
        collect_events(ChatService::generate_events(self, model, request).await?).await
    }

    async fn metrics(&self) -> Option<String> {
        Some(format!(
            "# HELP candle_generations_active Generations running in the engine now.\n\
             # TYPE candle_generations_active gauge\n\
             candle_generations_active {}\n",
            self.active_generations()
        ))
    }

    async fn generate_events(
        &self,
        _model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        request.validate()?;
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::NotInitialized);
        }
        let (prompt, max_tokens) = {
            let model = self.model.clone();
            let request = request.clone();
            tokio::task::spawn_blocking(move || prepare(&model, &request))
                .await
                .map_err(|err| Error::engine("request preparation panicked", err))??
        };
        let (events, receiver) = mpsc::unbounded_channel();
        let job = Job {
            prompt,
            max_tokens,
            sampling: sampling_of(&request),
            seed: match request.seed {
                Some(seed) => seed,
                None => random_seed()?,
            },
            stop: request.stop.clone(),
            events,
            queued_at: Instant::now(),
        };
        let sender = self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(sender) = sender else {
            return Err(Error::ShutDown);
        };
        match sender.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(Error::Busy(
                    "the request queue is full; retry later or raise `parallel`".to_owned(),
                ));
            }
            Err(TrySendError::Disconnected(_)) => return Err(Error::ShutDown),
        }
        Ok(Box::new(UnboundedReceiverStream::new(receiver)))
    }
}

fn sampling_of(request: &InferenceRequest) -> Sampling {
    let temperature = f64::from(request.temperature.unwrap_or(0.8));
    if temperature <= 0.0 {
        return Sampling::ArgMax;
    }
    match request.top_p {
        Some(p) if p < 1.0 => Sampling::TopP {
            p: f64::from(p),
            temperature,
        },
        _ => Sampling::All { temperature },
    }
}

fn sample(sampler: &mut LogitsProcessor, logits: &candle_core::Tensor) -> Result<u32> {
    sampler
        .sample(logits)
        .map_err(|err| Error::engine("error sampling", err))
}

fn random_seed() -> Result<u64> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|err| {
        Error::io(
            "error drawing a seed",
            std::io::Error::other(err.to_string()),
        )
    })?;
    Ok(u64::from_le_bytes(bytes))
}

/// One worker thread.
struct Worker {
    model: Arc<LoadedModel>,
    queue: Arc<Mutex<Receiver<Job>>>,
    pool: Arc<rayon::ThreadPool>,
    shutting_down: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
}

/// How a generation ended early.
enum Interrupted {
    /// The reader dropped the stream: nobody to tell.
    Cancelled,
    /// The runtime is shutting down.
    ShutDown,
}

impl Worker {
    fn run(self, mut session: Session) {
        loop {
            let job = {
                let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                queue.recv()
            };
            let Ok(job) = job else {
                return; // the queue's sender is gone: shutting down
            };
            let events = job.events.clone();
            self.active.fetch_add(1, Ordering::SeqCst);
            let outcome = guarded(|| self.pool.install(|| self.generate(&mut session, job)));
            self.active.fetch_sub(1, Ordering::SeqCst);
            match outcome {
                Ok(Ok(())) | Ok(Err(Interrupted::Cancelled)) => {}
                Ok(Err(Interrupted::ShutDown)) => {
                    let _ = events.send(Err(Error::ShutDown));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "generation failed");
                    let _ = events.send(Err(err));
                    // A step that failed or panicked may have left the KV
                    // cache half written: the next job starts from a fresh one.
                    match Session::new(&self.model.weights) {
                        Ok(fresh) => session = fresh,
                        Err(err) => {
                            tracing::error!(error = %err, "a candle worker cannot renew its session; it stops");
                            return;
                        }
                    }
                }
            }
        }
    }

    fn generate(
        &self,
        session: &mut Session,
        job: Job,
    ) -> Result<std::result::Result<(), Interrupted>> {
        let tokenizer = &self.model.tokenizer;
        let prompt_len = job.prompt.len();
        tracing::debug!(
            prompt_tokens = prompt_len,
            queued_ms = job.queued_at.elapsed().as_millis() as u64,
            "generation starts"
        );
        session.reset()?;
        let started = Instant::now();
        let mut sampler = LogitsProcessor::from_sampling(job.seed, job.sampling.clone());
        let logits = session.forward(&job.prompt, 0)?;
        let mut next = sample(&mut sampler, &logits)?;
        let prefill = started.elapsed();
        let decode_started = Instant::now();

        let mut decoder = tokenizer.inner().decode_stream(true);
        let mut stops = StopScanner::new(job.stop);
        let mut generated = 0usize;
        let finish = loop {
            if self.shutting_down.load(Ordering::Relaxed) {
                return Ok(Err(Interrupted::ShutDown));
            }
            if job.events.is_closed() {
                return Ok(Err(Interrupted::Cancelled));
            }
            if tokenizer.end_tokens.contains(&next) {
                break FinishReason::Stop;
            }
            generated += 1;
            let piece = decoder
                .step(next)
                .map_err(|err| Error::engine("error decoding a token", err))?;
            let (ready, stopped) = stops.push(piece.as_deref().unwrap_or(""));
            if !ready.is_empty() && job.events.send(Ok(StreamEvent::Delta(ready))).is_err() {
                return Ok(Err(Interrupted::Cancelled));
            }
            if stopped {
                break FinishReason::Stop;
            }
            if generated >= job.max_tokens {
                break FinishReason::Length;
            }
            let logits = session.forward(&[next], prompt_len + generated - 1)?;
            next = sample(&mut sampler, &logits)?;
        };
        let rest = stops.finish();
        if !rest.is_empty() && job.events.send(Ok(StreamEvent::Delta(rest))).is_err() {
            return Ok(Err(Interrupted::Cancelled));
        }
        let finished = StreamEvent::Finished {
            finish_reason: Some(finish),
            usage: Some(Usage::new(prompt_len as u64, generated as u64)),
            timings: Some(Timings::from_phases(
                prefill,
                prompt_len as u64,
                decode_started.elapsed(),
                generated.saturating_sub(1) as u64,
            )),
        };
        let _ = job.events.send(Ok(finished));
        Ok(Ok(()))
    }
}

/// Runs one generation, turning a panic into an error: a panicking step must
/// neither take its worker down (the pool would shrink for good) nor end its
/// stream without a word (its reader would take a cut-off answer for a whole
/// one).
fn guarded<T>(generate: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(generate)) {
        Ok(outcome) => outcome,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(Error::engine(
                "the generation panicked",
                std::io::Error::other(message),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_generation_becomes_an_error_and_the_caller_goes_on() {
        let outcome: Result<()> = guarded(|| panic!("index out of bounds"));
        let err = outcome.unwrap_err();
        assert!(matches!(err, Error::Engine { .. }), "{err:?}");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(source, "index out of bounds");
        assert_eq!(guarded(|| Ok(7)).unwrap(), 7);
    }
}
