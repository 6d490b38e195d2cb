//! The in-process engine: a bounded queue of requests and one scheduler
//! thread that runs them together. Each step it admits waiting requests into
//! free slots, then runs one batch: a chunk of a prompt still being read, and
//! the next token of every sequence already generating, so every weight is
//! read once per step however many sequences there are (llama-server's
//! continuous batching). The batch runs on the compute threads (`threads`),
//! of which the scheduler is one.
//!
//! A sequence never waits for its reader: its events go into a channel
//! without a bound, which its length bounds (at most one event per generated
//! token, and a request generates at most the context's tokens). A client
//! that never reads holds its own request's memory, never a slot or a step.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use runtime_core::{
    Error, EventStream, FinishReason, InferenceRequest, InferenceResponse, Result, StreamEvent,
    Timings, Usage, collect_events,
};
use runtime_openai::ChatService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::model::{LoadedModel, Runner};
use crate::native::Step;
use crate::stop::StopScanner;

/// Where a generation's events go.
type Events = mpsc::UnboundedSender<Result<StreamEvent>>;

/// How the engine runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EngineOptions {
    /// Sequences generated at once, each in a slot with its own KV cache.
    pub(crate) slots: usize,
    /// Requests that may wait for a slot before new ones are refused.
    pub(crate) queue: usize,
    /// Compute threads, the scheduler included.
    pub(crate) threads: usize,
    /// The precision of the KV cache (of our own forward pass).
    pub(crate) cache: crate::CacheType,
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

/// The engine: shared model, job queue, scheduler.
#[derive(Debug)]
pub(crate) struct Engine {
    model: Arc<LoadedModel>,
    jobs: Mutex<Option<SyncSender<Job>>>,
    shutting_down: Arc<AtomicBool>,
    /// Generations in a slot now (not those waiting in the queue).
    active: Arc<AtomicUsize>,
    scheduler: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Starts the scheduler and compute threads for `model`.
    pub(crate) fn start(model: LoadedModel, options: EngineOptions) -> Result<Self> {
        let model = Arc::new(model);
        let shutting_down = Arc::new(AtomicBool::new(false));
        let slots = options.slots.max(1);
        let runner = Runner::new(
            &model.weights,
            slots,
            options.threads.max(1),
            options.cache,
            shutting_down.clone(),
        )?;
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(options.queue);
        let active = Arc::new(AtomicUsize::new(0));
        let scheduler = Scheduler {
            model: model.clone(),
            runner,
            queue,
            slots,
            shutting_down: shutting_down.clone(),
            active: active.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("candle-scheduler".to_owned())
            .spawn(move || scheduler.run())
            .map_err(|err| Error::io("error starting the candle scheduler thread", err))?;
        Ok(Self {
            model,
            jobs: Mutex::new(Some(jobs)),
            shutting_down,
            active,
            scheduler: Mutex::new(Some(handle)),
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
    /// (a forward pass stops at its next layer), and waits up to `budget`
    /// for the scheduler to finish. One still inside a layer after that
    /// exits on its own when the layer ends; it holds nothing a caller waits for.
    pub(crate) fn stop(&self, budget: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let scheduler = self
            .scheduler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(scheduler) = scheduler else {
            return;
        };
        let deadline = Instant::now() + budget;
        while !scheduler.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if scheduler.is_finished() {
            let _ = scheduler.join();
        } else {
            tracing::warn!(
                budget_ms = budget.as_millis() as u64,
                "the candle scheduler is still in a step after the shutdown budget; leaving it to finish"
            );
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

fn sample(sampler: &mut LogitsProcessor, logits: &[f32]) -> Result<u32> {
    let logits = Tensor::from_slice(logits, logits.len(), &Device::Cpu)
        .map_err(|err| Error::engine("error holding the logits", err))?;
    sampler
        .sample(&logits)
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

/// The thread that runs the engine.
struct Scheduler {
    model: Arc<LoadedModel>,
    runner: Runner,
    queue: Receiver<Job>,
    slots: usize,
    shutting_down: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
}

/// A request in a slot.
struct Sequence<'t> {
    job: Job,
    slot: usize,
    /// Prompt tokens already in the KV cache.
    fed: usize,
    /// Tokens generated (and sent) so far.
    generated: usize,
    /// The token generated last, to feed next.
    next: u32,
    sampler: LogitsProcessor,
    decoder: Decoder<'t>,
    stops: StopScanner,
    started: Option<Instant>,
    prefill: Duration,
    decode_started: Option<Instant>,
}

type Decoder<'t> = tokenizers::DecodeStream<
    't,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// What a sampled token did to its sequence.
enum Progress {
    Continue,
    Finished,
    /// The reader dropped the stream: nobody to tell.
    Cancelled,
}

impl Scheduler {
    fn run(mut self) {
        let model = self.model.clone();
        let tokenizer = model.tokenizer.inner();
        let mut free: Vec<usize> = (0..self.slots).rev().collect();
        let mut running: Vec<Sequence<'_>> = Vec::with_capacity(self.slots);
        loop {
            if self.shutting_down.load(Ordering::SeqCst) {
                for sequence in running.drain(..) {
                    let _ = sequence.job.events.send(Err(Error::ShutDown));
                }
                // Jobs still queued are told too.
                while let Ok(job) = self.queue.try_recv() {
                    let _ = job.events.send(Err(Error::ShutDown));
                }
                self.active.store(0, Ordering::SeqCst);
                return;
            }
            // Admit waiting jobs into free slots; with nothing to run, wait for one.
            self.active.store(running.len(), Ordering::SeqCst);
            while let Some(&slot) = free.last() {
                let job = if running.is_empty() {
                    match self.queue.recv() {
                        Ok(job) => job,
                        Err(_) => return, // the sender is gone: shutting down
                    }
                } else {
                    match self.queue.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                };
                if job.events.is_closed() {
                    continue; // its reader left while it waited
                }
                if self.shutting_down.load(Ordering::SeqCst) {
                    let _ = job.events.send(Err(Error::ShutDown));
                    continue;
                }
                free.pop();
                tracing::debug!(
                    prompt_tokens = job.prompt.len(),
                    queued_ms = job.queued_at.elapsed().as_millis() as u64,
                    slot,
                    "generation starts"
                );
                running.push(Sequence {
                    sampler: LogitsProcessor::from_sampling(job.seed, job.sampling.clone()),
                    decoder: tokenizer.decode_stream(true),
                    stops: StopScanner::new(job.stop.clone()),
                    job,
                    slot,
                    fed: 0,
                    generated: 0,
                    next: 0,
                    started: None,
                    prefill: Duration::ZERO,
                    decode_started: None,
                });
            }
            // Readers that left free their slots.
            running.retain(|sequence| {
                let gone = sequence.job.events.is_closed();
                if gone {
                    self.runner.release(sequence.slot);
                    free.push(sequence.slot);
                }
                !gone
            });
            self.active.store(running.len(), Ordering::SeqCst);
            if running.is_empty() {
                continue;
            }
            self.step(&mut running, &mut free);
        }
    }

    /// One batch: every generating sequence's next token, then prompt
    /// chunks while the batch has room.
    fn step(&mut self, running: &mut Vec<Sequence<'_>>, free: &mut Vec<usize>) {
        // The plan: (sequence, first token, end), generating sequences first.
        let mut budget = self.runner.max_batch();
        let mut plan: Vec<(usize, usize, usize)> = Vec::with_capacity(running.len());
        for (i, sequence) in running.iter().enumerate() {
            let length = sequence.job.prompt.len();
            if sequence.fed == length {
                plan.push((
                    i,
                    length + sequence.generated - 1,
                    length + sequence.generated,
                ));
                budget = budget.saturating_sub(1);
            }
        }
        let now = Instant::now();
        for (i, sequence) in running.iter_mut().enumerate() {
            let length = sequence.job.prompt.len();
            if sequence.fed < length && budget > 0 {
                let end = length.min(sequence.fed + budget);
                sequence.started.get_or_insert(now);
                plan.push((i, sequence.fed, end));
                budget -= end - sequence.fed;
            }
        }
        let steps: Vec<Step<'_>> = plan
            .iter()
            .map(|&(i, start, end)| {
                let sequence = &running[i];
                let length = sequence.job.prompt.len();
                let tokens = if start < length {
                    &sequence.job.prompt[start..end]
                } else {
                    std::slice::from_ref(&sequence.next)
                };
                Step {
                    slot: sequence.slot,
                    position: start,
                    tokens,
                    logits: end >= length,
                }
            })
            .collect();
        let chunks: Vec<(usize, usize, bool)> = steps
            .iter()
            .zip(&plan)
            .map(|(step, &(i, _, _))| (i, step.tokens.len(), step.logits))
            .collect();
        let runner = &mut self.runner;
        let outcome = guarded(move || runner.forward(&steps));
        let logits = match outcome {
            Ok(logits) => logits,
            Err(err) => {
                // Every sequence of the batch fails; their caches may be half
                // written, so their slots start afresh.
                let err = match err {
                    Error::ShutDown => Error::ShutDown,
                    err => {
                        tracing::warn!(error = %err, "a batch failed");
                        err
                    }
                };
                for sequence in running.drain(..) {
                    let _ = sequence.job.events.send(Err(clone_error(&err)));
                    self.runner.release(sequence.slot);
                    free.push(sequence.slot);
                }
                return;
            }
        };
        let vocab = logits.len() / chunks.iter().filter(|c| c.2).count().max(1);
        let mut rows = logits.chunks_exact(vocab.max(1));
        let mut done = vec![false; running.len()];
        for (i, tokens, wants_logits) in chunks {
            let sequence = &mut running[i];
            if sequence.fed < sequence.job.prompt.len() {
                sequence.fed += tokens;
            }
            if !wants_logits {
                continue;
            }
            let Some(row) = rows.next() else { break };
            let progress = match sample(&mut sequence.sampler, row) {
                Ok(token) => sequence.advance(token, &self.model),
                Err(err) => {
                    let _ = sequence.job.events.send(Err(err));
                    Ok(Progress::Finished)
                }
            };
            match progress {
                Ok(Progress::Continue) => {}
                Ok(Progress::Finished | Progress::Cancelled) => done[i] = true,
                Err(err) => {
                    let _ = sequence.job.events.send(Err(err));
                    done[i] = true;
                }
            }
        }
        let mut index = 0;
        running.retain(|sequence| {
            let keep = !done[index];
            index += 1;
            if !keep {
                self.runner.release(sequence.slot);
                free.push(sequence.slot);
            }
            keep
        });
    }
}

impl Sequence<'_> {
    /// Takes the token just sampled: sends its text, or finishes.
    fn advance(&mut self, token: u32, model: &LoadedModel) -> Result<Progress> {
        if self.decode_started.is_none() {
            self.prefill = self.started.map_or(Duration::ZERO, |s| s.elapsed());
            self.decode_started = Some(Instant::now());
        }
        let events = &self.job.events;
        if events.is_closed() {
            return Ok(Progress::Cancelled);
        }
        let finish = if model.tokenizer.end_tokens.contains(&token) {
            Some(FinishReason::Stop)
        } else {
            self.generated += 1;
            self.next = token;
            let piece = self
                .decoder
                .step(token)
                .map_err(|err| Error::engine("error decoding a token", err))?;
            let (ready, stopped) = self.stops.push(piece.as_deref().unwrap_or(""));
            if !ready.is_empty() && events.send(Ok(StreamEvent::Delta(ready))).is_err() {
                return Ok(Progress::Cancelled);
            }
            if stopped {
                Some(FinishReason::Stop)
            } else if self.generated >= self.job.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        let Some(finish) = finish else {
            return Ok(Progress::Continue);
        };
        let rest = self.stops.finish();
        if !rest.is_empty() && events.send(Ok(StreamEvent::Delta(rest))).is_err() {
            return Ok(Progress::Cancelled);
        }
        let prompt = self.job.prompt.len() as u64;
        let decode = self.decode_started.map_or(Duration::ZERO, |s| s.elapsed());
        let _ = events.send(Ok(StreamEvent::Finished {
            finish_reason: Some(finish),
            usage: Some(Usage::new(prompt, self.generated as u64)),
            timings: Some(Timings::from_phases(
                self.prefill,
                prompt,
                decode,
                self.generated.saturating_sub(1) as u64,
            )),
        }));
        Ok(Progress::Finished)
    }
}

/// The same error for each sequence of a failed batch.
fn clone_error(err: &Error) -> Error {
    match err {
        Error::ShutDown => Error::ShutDown,
        err => Error::engine("the batch failed", std::io::Error::other(err.to_string())),
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
