//! The in-process candle backend: [`CandleRuntime`] runs a llama-architecture
//! model inside the calling process with candle, no external binary, and serves
//! it over the OpenAI API on a loopback port of its own, so
//! [`base_url`](runtime_core::ModelRuntime::base_url) means what it means for the
//! server backends.
//!
//! This crate owns:
//! - a forward pass of its own for llama-architecture GGUF models stored in
//!   Q4_1 or Q8_0 (SmolLM2 and many small models): SIMD kernels on the file's
//!   own blocks against 8-bit activations, as llama.cpp does, and the model's
//!   whole trained context;
//! - Gemma 3 GGUF (any quantization: the real 270M file mixes Q4_K, Q6_K,
//!   Q5_0 and Q8_0) on candle's tensor operations and quantized matrix
//!   products, with llama.cpp's Gemma 3 arithmetic (sliding-window and global
//!   layers, q/k norms, tanh-GELU, the embedding scale) and the model's whole
//!   trained context;
//! - other GGUF models through candle's quantized llama (capped at 4096
//!   positions), and Hugging Face safetensors directories (`config.json`,
//!   `*.safetensors`, `tokenizer.json`) through candle's llama;
//! - embedding models: BERT-family encoders from a sentence-transformers
//!   directory (`config.json`, `model.safetensors`, `tokenizer.json`,
//!   `modules.json`) through candle-transformers' BERT, pooled as its
//!   `1_Pooling/config.json` says and normalised
//!   ([`embed`](runtime_core::ModelRuntime::embed), `/v1/embeddings`); the
//!   longest input is `context_size`, else the model's `max_seq_length`;
//! - the tokenizer: `tokenizer.json` beside the model, or one built from the
//!   GGUF's own metadata the way llama.cpp reads it (byte-level BPE, and
//!   SentencePiece with byte fallback: Gemma, Llama 2, Mistral, Phi-3);
//! - the model's own chat template, rendered with minijinja;
//! - sampling (temperature, top-p, seed), stop strings, EOS, UTF-8-safe streaming;
//! - structured answers: a `json_schema` or `json_object` held to its schema
//!   token by token with llguidance (the mask of allowed tokens applied to the
//!   logits before each draw), tool calls planned by `runtime-structured` on
//!   top of it, `n` answers as sequences of their own, and log-probabilities
//!   from the logits;
//! - a scheduler thread of its own (never the async runtime's) that runs the
//!   sequences in its slots together, one batch per step, behind a bounded
//!   queue: a full queue is [`Error::Busy`], not a hang.
//!
//! It serves HTTP with `runtime-openai`'s router and does not manage processes.
//!
//! Settings: `context_size` (at most the model's trained context; 4096 for
//! models on candle's quantized llama), `threads` (compute threads, default
//! all cores), `parallel` (slots: sequences generated at once, default 4), and
//! [`CandleOptions`]: `queue` (waiting requests, default 16), `kv_cache`
//! (`f16`, the default, or `f32`) and `requantize`.
//!
//! ```no_run
//! use runtime_core::{InferenceRequest, ModelRuntime, RuntimeConfig};
//! use runtime_candle::CandleRuntime;
//!
//! # async fn demo() -> runtime_core::Result<()> {
//! let mut runtime = CandleRuntime::new();
//! runtime.initialize(RuntimeConfig::new("SmolLM2-135M-Instruct.Q4_1.gguf")).await?;
//! let answer = runtime.generate(InferenceRequest::from_prompt("Hello!")).await?;
//! println!("{} (served at {})", answer.content, runtime.completions_url());
//! runtime.shutdown().await?;
//! # Ok(())
//! # }
//! ```

mod constraint;
mod encoder;
mod engine;
mod gemma3;
mod kernels;
mod logprobs;
mod model;
mod native;
mod options;
mod runner;
mod sampling;
mod scheduler;
mod stop;
mod template;
mod tokenizer;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{
    ApiKey, EmbeddingRequest, Embeddings, Error, EventStream, InferenceRequest, InferenceResponse,
    ModelFormat, ModelRuntime, ModelService, Result, RuntimeConfig, RuntimeMetadata, TextStream,
    text_deltas,
};
use runtime_openai::{
    ClientTimeouts, HostPolicy, OpenAiClient, ServeLimits, ServeOptions, http_base_url,
    random_api_key,
};
use tokio::sync::oneshot;

use crate::encoder::{Encoder, EncoderModel};
use crate::engine::{Engine, EngineOptions};
use crate::model::LoadedModel;
pub use crate::model::Requantize;
pub use crate::options::{CacheType, CandleOptions};
pub use crate::tokenizer::TextTokenizer;

/// The candle version this crate is built against (pinned exactly in Cargo.toml).
pub const ENGINE_VERSION: &str = "0.11.1";

/// candle, in process, behind the [`ModelRuntime`] trait.
#[derive(Debug, Default)]
pub struct CandleRuntime {
    running: Option<Running>,
}

/// What a runtime runs: a generative model's scheduler, or an encoder.
#[derive(Debug, Clone)]
enum Loaded {
    Generator(Arc<Engine>),
    Encoder(Encoder),
}

impl Loaded {
    /// What the router and the runtime's methods serve.
    fn service(&self) -> Arc<dyn ModelService> {
        match self {
            Self::Generator(engine) => engine.clone(),
            Self::Encoder(encoder) => Arc::new(encoder.clone()),
        }
    }

    fn is_serving(&self) -> bool {
        match self {
            Self::Generator(engine) => engine.is_serving(),
            Self::Encoder(encoder) => encoder.is_serving(),
        }
    }

    /// Stops generating or embedding within `grace` (blocking).
    fn stop(&self, grace: Duration) {
        match self {
            Self::Generator(engine) => engine.stop(grace),
            Self::Encoder(encoder) => encoder.stop(),
        }
    }
}

#[derive(Debug)]
struct Running {
    engine: Loaded,
    base_url: String,
    api_key: ApiKey,
    context_limit: usize,
    format: ModelFormat,
    shutdown_grace: Duration,
    server: Option<Server>,
}

#[derive(Debug)]
struct Server {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl CandleRuntime {
    /// A runtime with no model loaded.
    pub fn new() -> Self {
        Self::default()
    }

    fn running(&self) -> Result<&Running> {
        self.running.as_ref().ok_or(Error::NotInitialized)
    }
}

fn engine_options(config: &RuntimeConfig, options: &CandleOptions) -> EngineOptions {
    let threads = config
        .threads
        .map(|n| n as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    EngineOptions {
        slots: config.parallel.unwrap_or(runtime_core::DEFAULT_PARALLEL) as usize,
        queue: options.queue.unwrap_or(runtime_core::DEFAULT_QUEUE) as usize,
        threads,
        cache: options.kv_cache,
    }
}

async fn start(config: &RuntimeConfig) -> Result<Running> {
    config.validate()?;
    let options = config.options::<CandleOptions>()?;
    let format = config.resolve_format()?;
    if !matches!(format, ModelFormat::Gguf | ModelFormat::Safetensors) {
        return Err(Error::UnsupportedFormat {
            backend: "candle",
            expected: "GGUF or a Hugging Face safetensors directory".to_owned(),
            found: format.name().to_owned(),
        });
    }
    let engine_options = engine_options(config, &options);
    let requantize = options.requantize;
    // Bind before loading: a taken port fails in milliseconds, not after the load.
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::AddrInUse => Error::port_in_use(&config.host, config.port),
            _ => Error::io(
                format!("error binding {}:{}", config.host, config.port),
                err,
            ),
        })?;
    let address = listener
        .local_addr()
        .map_err(|err| Error::io("error reading the bound address", err))?;

    let path = config.model_path.clone();
    let context_size = config.context_size;
    let encoder = format == ModelFormat::Safetensors && runtime_core::is_embedding_model(&path)?;
    let engine = tokio::task::spawn_blocking(move || {
        if encoder {
            let admitted = engine_options.slots + engine_options.queue;
            return Encoder::load(&path, context_size, engine_options.threads, admitted)
                .map(Loaded::Encoder);
        }
        let model = LoadedModel::load(&path, format, context_size, requantize)?;
        Engine::start(model, engine_options).map(|engine| Loaded::Generator(Arc::new(engine)))
    })
    .await
    .map_err(|err| Error::engine("model loading panicked", err))??;
    let context_limit = match &engine {
        Loaded::Generator(engine) => engine.model().context_limit,
        Loaded::Encoder(encoder) => encoder.context_limit,
    };

    let api_key = match &config.api_key {
        Some(key) => key.clone(),
        None => random_api_key()?,
    };
    let router = runtime_openai::router(
        engine.service(),
        ServeOptions::new(config.model_name())
            .with_api_key(Some(api_key.clone()))
            .with_hosts(HostPolicy::for_address(&address)),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(err) =
            runtime_openai::serve(listener, router, ServeLimits::default(), shutdown).await
        {
            tracing::warn!(error = %err, "the candle HTTP server stopped");
        }
    });
    let base_url = http_base_url(&address.ip().to_string(), address.port());
    let mut running = Running {
        engine,
        base_url,
        api_key,
        context_limit,
        format,
        shutdown_grace: config.shutdown_grace,
        server: Some(Server { stop, task }),
    };

    // A real probe of what we serve, as for the server backends.
    let client = OpenAiClient::new(&running.base_url, None, None, ClientTimeouts::default())?;
    if !client.is_healthy(Duration::from_secs(5)).await {
        running.stop(Duration::from_secs(1)).await;
        return Err(Error::engine(
            "the embedded server does not answer its health probe",
            std::io::Error::other(running.base_url.clone()),
        ));
    }
    tracing::info!(base_url = running.base_url, context_limit, "candle ready");
    Ok(running)
}

impl Running {
    /// Ends in-flight generations (their streams get [`Error::ShutDown`]),
    /// stops the scheduler and the HTTP server, each within `grace`.
    async fn stop(&mut self, grace: Duration) {
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.stop(grace)).await;
        if let Some(server) = self.server.take() {
            let _ = server.stop.send(());
            let mut task = server.task;
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Without shutdown: stop serving and generating now; the scheduler
        // exits on its own once its current layer is done.
        if let Some(server) = self.server.take() {
            let _ = server.stop.send(());
            server.task.abort();
        }
        let engine = self.engine.clone();
        std::thread::spawn(move || engine.stop(Duration::ZERO));
    }
}

#[async_trait]
impl ModelRuntime for CandleRuntime {
    fn supported_format(&self) -> ModelFormat {
        ModelFormat::Gguf
    }

    async fn initialize(&mut self, config: RuntimeConfig) -> Result<()> {
        if self.running.is_some() {
            return Err(Error::AlreadyInitialized);
        }
        self.running = Some(start(&config).await?);
        Ok(())
    }

    async fn is_ready(&self) -> bool {
        match &self.running {
            Some(running) => {
                running
                    .server
                    .as_ref()
                    .is_some_and(|s| !s.task.is_finished())
                    && running.engine.is_serving()
            }
            None => false,
        }
    }

    async fn health_check(&self) -> Result<String> {
        let running = self.running()?;
        if !ModelRuntime::is_ready(self).await {
            return Err(Error::engine(
                "the embedded server has stopped",
                std::io::Error::other(running.base_url.clone()),
            ));
        }
        Ok(format!(
            "ok (candle {ENGINE_VERSION}, context {})",
            running.context_limit
        ))
    }

    fn base_url(&self) -> String {
        self.running
            .as_ref()
            .map(|running| running.base_url.clone())
            .unwrap_or_default()
    }

    fn api_key(&self) -> Option<ApiKey> {
        self.running.as_ref().map(|running| running.api_key.clone())
    }

    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse> {
        ModelService::generate(&*self.running()?.engine.service(), None, request).await
    }

    async fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        ModelService::tokenize(&*self.running()?.engine.service(), None, text, add_special).await
    }

    async fn detokenize(&self, tokens: &[u32]) -> Result<String> {
        ModelService::detokenize(&*self.running()?.engine.service(), None, tokens).await
    }

    async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings> {
        ModelService::embed(&*self.running()?.engine.service(), None, request).await
    }

    async fn generate_stream(&self, request: InferenceRequest) -> Result<TextStream> {
        Ok(text_deltas(
            ModelRuntime::generate_events(self, request).await?,
        ))
    }

    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream> {
        ModelService::generate_events(&*self.running()?.engine.service(), None, request).await
    }

    async fn shutdown(&mut self) -> Result<()> {
        if let Some(mut running) = self.running.take() {
            let grace = running.shutdown_grace;
            running.stop(grace).await;
        }
        Ok(())
    }

    fn resident_memory(&self) -> Option<u64> {
        Some(match &self.running.as_ref()?.engine {
            Loaded::Generator(engine) => engine.model().weight_bytes,
            Loaded::Encoder(encoder) => encoder.weight_bytes,
        })
    }

    fn metadata(&self) -> RuntimeMetadata {
        let (format, context, capabilities) = match &self.running {
            Some(running) => (
                running.format,
                u32::try_from(running.context_limit).ok(),
                match running.engine {
                    Loaded::Generator(_) => engine::capabilities(),
                    Loaded::Encoder(_) => EncoderModel::capabilities(),
                },
            ),
            None => (ModelFormat::Gguf, None, engine::capabilities()),
        };
        RuntimeMetadata::new(format, "candle", ENGINE_VERSION)
            .with_context_size(context)
            .with_capabilities(capabilities)
    }
}
