//! The in-process engine: a bounded queue of requests and one scheduler
//! thread ([`crate::scheduler`]) that runs them together, so every weight is
//! read once per step however many sequences there are (llama-server's
//! continuous batching). The batch runs on the compute threads (`threads`),
//! of which the scheduler is one.
//!
//! A sequence never waits for its reader: its events go into a channel
//! without a bound, which its length bounds (at most one event per generated
//! token, and a request generates at most the context's tokens). A client
//! that never reads holds its own request's memory, never a slot or a step.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use candle_transformers::generation::Sampling;
use runtime_core::{
    Capabilities, Error, EventStream, FimTokens, InferenceRequest, InferenceResponse, MAX_CHOICES,
    ModelService, Prompt, Result, StreamEvent, Usage, collect_events,
};
use runtime_structured::{Enforcer, Plan, Support};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::constraint::Constraint;
use crate::model::LoadedModel;
use crate::runner::Runner;
use crate::sampling::{random_seed, sampling_of};
use crate::scheduler::Scheduler;
use crate::tokenizer::TextTokenizer;

/// Where a generation's events go.
pub(crate) type Events = mpsc::UnboundedSender<Result<StreamEvent>>;

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
pub(crate) struct Job {
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) sampling: Sampling,
    pub(crate) seed: u64,
    pub(crate) stop: Vec<String>,
    /// The grammar a structured answer is held to, token by token.
    pub(crate) constraint: Option<Constraint>,
    /// With log-probabilities: how many of the most likely tokens each
    /// token's entry lists.
    pub(crate) logprobs: Option<usize>,
    pub(crate) events: Events,
    pub(crate) queued_at: Instant,
}

/// The engine: shared model, job queue, scheduler.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) model: Arc<LoadedModel>,
    pub(crate) jobs: Mutex<Option<SyncSender<Job>>>,
    pub(crate) shutting_down: Arc<AtomicBool>,
    /// Generations in a slot now (not those waiting in the queue).
    pub(crate) active: Arc<AtomicUsize>,
    /// Tokens generated since the engine started.
    generated_total: Arc<AtomicU64>,
    pub(crate) scheduler: Mutex<Option<std::thread::JoinHandle<()>>>,
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
        let generated_total = Arc::new(AtomicU64::new(0));
        let scheduler = Scheduler {
            model: model.clone(),
            runner,
            queue,
            slots,
            shutting_down: shutting_down.clone(),
            active: active.clone(),
            generated_total: generated_total.clone(),
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
            generated_total,
            scheduler: Mutex::new(Some(handle)),
        })
    }

    pub(crate) fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// `request` (validated) planned for candle: what it does not serve is
    /// refused by name, a schema it cannot enforce by its keyword.
    fn plan(&self, request: &InferenceRequest) -> Result<Plan> {
        capabilities().admit(request, "candle")?;
        Plan::new(request, &SUPPORT)
    }

    /// Queues one answer to `request` (as planned) and returns its events;
    /// a full queue is [`Error::Busy`].
    pub(crate) async fn submit(&self, request: InferenceRequest) -> Result<EventStream> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::NotInitialized);
        }
        let (prompt, max_tokens, constraint) = {
            let model = self.model.clone();
            let request = request.clone();
            tokio::task::spawn_blocking(move || {
                let (prompt, max_tokens) = prepare(&model, &request)?;
                let constraint = model
                    .grammars
                    .constraint(&model.tokenizer, request.response_format.as_ref())?;
                if request.logprobs {
                    // Built here, not in the scheduler's step.
                    model.grammars.words(&model.tokenizer)?;
                }
                Ok::<_, Error>((prompt, max_tokens, constraint))
            })
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
            constraint,
            logprobs: request
                .logprobs
                .then(|| usize::from(request.top_logprobs.unwrap_or(0))),
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

    /// Whether the engine takes requests (false once stopping).
    pub(crate) fn is_serving(&self) -> bool {
        !self.shutting_down.load(Ordering::SeqCst)
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

/// The fill-in-the-middle prompt of `prefix` and `suffix`, in the
/// vocabulary's own FIM tokens (refused when it has none).
fn infill_prompt(tokenizer: &TextTokenizer, prefix: &str, suffix: &str) -> Result<Vec<u32>> {
    let fim = FimTokens::find(|marker| tokenizer.inner().token_to_id(marker))
        .ok_or_else(runtime_core::no_fim_tokens)?;
    Ok(fim.prompt(
        &tokenizer.encode_prompt("")?,
        &tokenizer.encode(prefix)?,
        &tokenizer.encode(suffix)?,
    ))
}

/// Refuses token ids past the vocabulary, naming `field`.
fn check_vocabulary(tokenizer: &TextTokenizer, tokens: &[u32], field: &'static str) -> Result<()> {
    let vocabulary = tokenizer.inner().get_vocab_size(true);
    match tokens.iter().find(|&&t| t as usize >= vocabulary) {
        Some(bad) => Err(Error::invalid_request(
            field,
            format!("holds token id {bad}, past the vocabulary of {vocabulary} tokens"),
        )),
        None => Ok(()),
    }
}

/// Renders, tokenizes and checks a request: blocking work, run off the async workers.
/// Returns the prompt's tokens and how many may be generated.
fn prepare(model: &LoadedModel, request: &InferenceRequest) -> Result<(Vec<u32>, usize)> {
    let tokens = match &request.prompt {
        // A raw prompt is continued as is: no template.
        Some(Prompt::Text(prefix)) => match &request.suffix {
            Some(suffix) => infill_prompt(&model.tokenizer, prefix, suffix)?,
            None => model.tokenizer.encode_prompt(prefix)?,
        },
        Some(Prompt::Tokens(tokens)) => {
            check_vocabulary(&model.tokenizer, tokens, "prompt")?;
            tokens.clone()
        }
        Some(_) => {
            return Err(Error::invalid_request(
                "prompt",
                "is of a kind candle does not serve; send text or token ids",
            ));
        }
        None => {
            let template = model.template.as_ref().ok_or_else(|| {
                Error::invalid_request(
                    "messages",
                    "cannot be formatted: the model has no chat template (none in the GGUF, \
                     tokenizer_config.json or chat_template.jinja); send a raw `prompt` \
                     (the completions API) instead",
                )
            })?;
            model
                .tokenizer
                .encode(&template.render(&request.messages)?)?
        }
    };
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

/// What candle does for tools and schemas: llguidance enforces schemas;
/// calls are read here (from the schema of a required call, or `<tool_call>`
/// tags for `auto`), and tools and earlier calls are written into the
/// conversation as text.
const SUPPORT: Support = Support {
    enforcer: Enforcer::LlGuidance,
    native_auto: false,
    renders_tools: false,
};

/// What candle serves beyond plain chat (`metadata().capabilities`): tools,
/// schemas, log-probabilities and several answers.
pub(crate) fn capabilities() -> Capabilities {
    Capabilities::full(MAX_CHOICES)
}

/// The `index`th of a request's answers, asked for alone: a seeded request's
/// answers are reproducible and differ from each other.
fn one_of(request: &InferenceRequest, index: u32) -> InferenceRequest {
    let mut one = request.clone();
    one.n = None;
    one.seed = request.seed.map(|seed| seed.wrapping_add(u64::from(index)));
    one
}

/// Several answers as one response: the first's, the rest as alternatives,
/// and the tokens of all of them (the prompt counted once).
fn several(answers: Vec<InferenceResponse>) -> InferenceResponse {
    let mut answers = answers.into_iter();
    let mut first = answers.next().unwrap_or_default();
    for answer in answers {
        if let (Some(total), Some(usage)) = (&mut first.usage, &answer.usage) {
            *total = Usage::new(
                total.prompt_tokens,
                total.completion_tokens + usage.completion_tokens,
            );
        }
        first.alternatives.extend(answer.choices());
    }
    first
}

#[async_trait]
impl ModelService for Engine {
    async fn is_ready(&self) -> bool {
        self.is_serving()
    }

    async fn tokenize(
        &self,
        _model: Option<&str>,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>> {
        let model = self.model.clone();
        let text = text.to_owned();
        // Tokenizing a long text is blocking work: off the async workers.
        tokio::task::spawn_blocking(move || {
            if add_special {
                model.tokenizer.encode_prompt(&text)
            } else {
                model.tokenizer.encode(&text)
            }
        })
        .await
        .map_err(|err| Error::engine("the tokenizer task failed", err))?
    }

    async fn embed(
        &self,
        _model: Option<&str>,
        _request: runtime_core::EmbeddingRequest,
    ) -> Result<runtime_core::Embeddings> {
        Err(Error::unsupported(
            "embeddings",
            "candle for this model, which is not an embedding model (load a \
             sentence-transformers directory to embed)",
        ))
    }

    async fn detokenize(&self, _model: Option<&str>, tokens: &[u32]) -> Result<String> {
        check_vocabulary(&self.model.tokenizer, tokens, "tokens")?;
        self.model.tokenizer.decode(tokens)
    }

    async fn generate(
        &self,
        _model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<InferenceResponse> {
        request.validate()?;
        let plan = self.plan(&request)?;
        let engine = plan.engine_request();
        // Several answers are sequences of their own, generated together.
        let answers = futures::future::try_join_all((0..request.choices()).map(|index| {
            let one = one_of(engine, index);
            async move { collect_events(self.submit(one).await?).await }
        }))
        .await?;
        plan.finish(several(answers))
    }

    async fn metrics(&self) -> Option<String> {
        Some(format!(
            "# HELP candle_generations_active Generations running in the engine now.\n\
             # TYPE candle_generations_active gauge\n\
             candle_generations_active {}\n\
             # HELP candle_generated_tokens_total Tokens generated since the engine started.\n\
             # TYPE candle_generated_tokens_total counter\n\
             candle_generated_tokens_total {}\n",
            self.active_generations(),
            self.generated_total.load(Ordering::Relaxed)
        ))
    }

    async fn generate_events(
        &self,
        _model: Option<&str>,
        request: InferenceRequest,
    ) -> Result<EventStream> {
        request.validate_for_stream()?;
        let plan = self.plan(&request)?;
        let events = self.submit(plan.engine_request().clone()).await?;
        Ok(plan.events(events))
    }
}
