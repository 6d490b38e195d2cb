//! The in-process engine: a bounded queue of requests served by worker threads
//! of its own, each with a session (shared weights, own KV cache), inside a
//! rayon pool sized by `threads`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use futures::StreamExt;
use runtime_core::{
    Error, EventStream, FinishReason, InferenceRequest, InferenceResponse, Result, StreamEvent,
    Timings, Usage,
};
use runtime_openai::ChatService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::model::{LoadedModel, Session};
use crate::stop::StopScanner;

/// Events buffered between a worker and a slow reader before the worker waits.
const EVENT_BUFFER: usize = 256;

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
    events: mpsc::Sender<Result<StreamEvent>>,
    queued_at: Instant,
}

/// The engine: shared model, job queue, workers.
#[derive(Debug)]
pub(crate) struct Engine {
    model: Arc<LoadedModel>,
    jobs: Mutex<Option<SyncSender<Job>>>,
    shutting_down: Arc<AtomicBool>,
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
        let mut workers = Vec::with_capacity(options.workers);
        for index in 0..options.workers.max(1) {
            let session = Session::new(&model.weights)?;
            let worker = Worker {
                model: model.clone(),
                queue: queue.clone(),
                pool: pool.clone(),
                shutting_down: shutting_down.clone(),
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
            workers: Mutex::new(workers),
        })
    }

    pub(crate) fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// Stops taking jobs, ends in-flight generations with [`Error::ShutDown`],
    /// and waits for the workers to finish.
    pub(crate) fn stop(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let workers =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        for worker in workers {
            let _ = worker.join();
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

    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse> {
        let mut events = ChatService::generate_events(self, request).await?;
        let mut response = InferenceResponse::default();
        while let Some(event) = events.next().await {
            match event? {
                StreamEvent::Delta(text) => response.content.push_str(&text),
                StreamEvent::Finished {
                    finish_reason,
                    usage,
                    timings,
                } => {
                    response.finish_reason = finish_reason;
                    response.usage = usage;
                    response.timings = timings;
                }
                _ => {}
            }
        }
        Ok(response)
    }

    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream> {
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
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
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
        Ok(Box::new(ReceiverStream::new(receiver)))
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
            let outcome = self.pool.install(|| self.generate(&mut session, job));
            match outcome {
                Ok(Ok(())) | Ok(Err(Interrupted::Cancelled)) => {}
                Ok(Err(Interrupted::ShutDown)) => {
                    let _ = events.blocking_send(Err(Error::ShutDown));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "generation failed");
                    let _ = events.blocking_send(Err(err));
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
            if !ready.is_empty()
                && job
                    .events
                    .blocking_send(Ok(StreamEvent::Delta(ready)))
                    .is_err()
            {
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
        if !rest.is_empty()
            && job
                .events
                .blocking_send(Ok(StreamEvent::Delta(rest)))
                .is_err()
        {
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
        let _ = job.events.blocking_send(Ok(finished));
        Ok(Ok(()))
    }
}
