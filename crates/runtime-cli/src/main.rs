//! `model-runtime`: run, chat with, or serve a local language model.
//!
//! The command line only: backends are chosen by `model-runtime`, runtimes
//! managed by `runtime-gateway` and served by `runtime-openai`'s router.
#![forbid(unsafe_code)]
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod progress;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use model_runtime::llamacpp::{RpcWorker, RpcWorkerConfig};
use model_runtime::{
    ApiKey, BackendChoice, ChatMessage, Error, InferenceRequest, ModelRuntime, ModelService,
    ResponseFormat, RuntimeConfig, choose, survey,
};
use runtime_gateway::{GatewayConfig, ModelSpec, RuntimeManager};
use runtime_openai::{HostPolicy, Keys, ServeLimits, ServeOptions, check_exposure};
use tokio::io::AsyncBufReadExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::progress::{ENGINE_LOG_TARGET, LatestLine, Spinner};

#[derive(Parser)]
#[command(
    name = "model-runtime",
    version,
    about = "Run a language model locally, whatever the engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// The model: a GGUF file or a Hugging Face safetensors directory.
    model: PathBuf,
    #[command(flatten)]
    engine: EngineArgs,
}

/// How the engine for a model given on the command line runs.
#[derive(clap::Args, Clone)]
struct EngineArgs {
    /// Which engine runs it: auto, llamacpp, vllm or candle.
    #[arg(long, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Context window in tokens (default: the engine's).
    #[arg(long)]
    context_size: Option<u32>,
    /// CPU threads for generation (default: the engine's).
    #[arg(long)]
    threads: Option<u32>,
    /// How long an engine may leave its health probe unanswered before its
    /// requests fail, like "15s" (default 15s; a slow engine still answers it).
    #[arg(long, value_name = "DURATION", value_parser = model_runtime::duration::parse)]
    hang_timeout: Option<Duration>,
}

#[derive(clap::Args)]
struct SamplingArgs {
    /// The most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Sampling temperature, 0 to 2; 0 is deterministic.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// A system prompt.
    #[arg(long)]
    system: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt, streaming the answer to stdout.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt.
        #[arg(long, short)]
        prompt: String,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Answer with JSON valid against the JSON Schema in FILE, printed
        /// whole once it is checked; a model that cannot be held to it fails
        /// with an error instead.
        #[arg(long, value_name = "FILE", conflicts_with = "json")]
        json_schema: Option<PathBuf>,
        /// Answer with a JSON object, printed whole once it is checked.
        #[arg(long)]
        json: bool,
        /// Continue the prompt as raw text, with no chat template (the
        /// completions API): for base models, which have none.
        #[arg(long, conflicts_with_all = ["json", "json_schema", "system"])]
        raw: bool,
    },
    /// Talk with the model: Ctrl-C stops an answer, Ctrl-D leaves.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Serve an OpenAI-compatible API in front of one model, or of the models
    /// of a configuration file (SIGHUP re-reads it).
    Serve {
        /// The model to serve (a GGUF file or a Hugging Face directory).
        #[arg(required_unless_present = "config", conflicts_with = "config")]
        model: Option<PathBuf>,
        /// A models.toml to serve instead (see runtime-gateway's GatewayConfig).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        engine: EngineArgs,
        /// Address to listen on (default 127.0.0.1, or the file's `listen`).
        #[arg(long)]
        host: Option<String>,
        /// Port to listen on (default 8080, or the file's `listen`).
        #[arg(long)]
        port: Option<u16>,
        /// Require this bearer token from clients. Prefer the environment
        /// variable: other local users can read a command line.
        #[arg(long, env = "MODEL_RUNTIME_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Listen on a non-loopback address without an API key (anyone who
        /// can reach the address can use the model).
        #[arg(long)]
        allow_unauthenticated: bool,
    },
    /// Lend this machine's devices to a llama-server elsewhere: run a
    /// llama.cpp RPC worker until Ctrl-C or SIGTERM. The protocol has no
    /// authentication: listen on a private network only.
    RpcWorker {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 50052)]
        port: u16,
        /// CPU threads of the worker.
        #[arg(long)]
        threads: Option<u32>,
        /// Keep received tensors in a local file cache.
        #[arg(long)]
        cache: bool,
        /// Listen on a non-loopback --host. Refused without it: the protocol
        /// has no authentication and a history of memory-safety flaws.
        #[arg(long)]
        allow_network: bool,
    },
    /// List the backends, whether they are usable here, and what they take.
    Backends,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let latest = LatestLine::default();
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(
                    EnvFilter::try_from_env("MODEL_RUNTIME_LOG")
                        .unwrap_or_else(|_| EnvFilter::new("warn")),
                ),
        )
        .with(
            latest.clone().with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(ENGINE_LOG_TARGET, tracing::Level::DEBUG),
            ),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("model-runtime: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, latest)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("model-runtime: {}", render_error(&err));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, latest: LatestLine) -> Result<(), Error> {
    match cli.command {
        Command::Run {
            model,
            prompt,
            sampling,
            json_schema,
            json,
            raw,
        } => {
            if raw {
                return run_raw(model, prompt, sampling, latest).await;
            }
            let format = match (json_schema, json) {
                (Some(file), _) => Some(schema_format(&file)?),
                (None, true) => Some(ResponseFormat::JsonObject),
                (None, false) => None,
            };
            run_once(model, prompt, sampling, format, latest).await
        }
        Command::Chat { model, sampling } => chat(model, sampling, latest).await,
        Command::Serve {
            model,
            config,
            engine,
            host,
            port,
            api_key,
            allow_unauthenticated,
        } => {
            let what = match (model, config) {
                (Some(model), _) => Served::Model(ModelArgs { model, engine }),
                (None, Some(file)) => Served::File(file),
                (None, None) => unreachable!("clap requires a model or --config"),
            };
            let api_key = match api_key {
                Some(key) if key.trim().is_empty() => {
                    return Err(Error::invalid_config(
                        "api_key",
                        "is empty (MODEL_RUNTIME_API_KEY or --api-key is set to nothing), \
                         which is no key at all: give a key, or unset it to serve loopback \
                         clients without one",
                    ));
                }
                key => key.map(ApiKey::new),
            };
            let access = Access {
                host,
                port,
                api_key,
                allow_unauthenticated,
            };
            serve(what, access, latest).await
        }
        Command::RpcWorker {
            host,
            port,
            threads,
            cache,
            allow_network,
        } => {
            let mut config = RpcWorkerConfig::new()
                .with_host(host)
                .with_port(port)
                .with_allow_network(allow_network);
            config.threads = threads;
            config.cache = cache;
            rpc_worker(config).await
        }
        Command::Backends => {
            backends().await;
            Ok(())
        }
    }
}

fn config_of(args: &ModelArgs) -> Result<RuntimeConfig, Error> {
    let mut config = RuntimeConfig::new(&args.model);
    let engine = &args.engine;
    config.context_size = engine.context_size;
    config.threads = engine.threads;
    if let Some(hang) = engine.hang_timeout {
        config.hang_timeout = hang;
    }
    config.validate()?;
    Ok(config)
}

/// Chooses, says which, starts with a spinner.
async fn start(args: &ModelArgs, latest: LatestLine) -> Result<Box<dyn ModelRuntime>, Error> {
    let config = config_of(args)?;
    let (backend, why) = choose(args.engine.backend, &config)?;
    eprintln!("model-runtime: using {backend} ({why})");
    let mut runtime = backend.runtime()?;
    let spinner = Spinner::start(format!("starting {backend}"), latest);
    let started = runtime.initialize(config).await;
    spinner.finish();
    started?;
    Ok(runtime)
}

fn request_of(messages: Vec<ChatMessage>, sampling: &SamplingArgs) -> InferenceRequest {
    InferenceRequest::new(messages)
        .with_max_tokens(sampling.max_tokens)
        .with_temperature(sampling.temperature)
}

fn opening(sampling: &SamplingArgs) -> Vec<ChatMessage> {
    sampling.system.iter().map(ChatMessage::system).collect()
}

/// `--json-schema FILE`: the schema, named after the file (OpenAI's name
/// rules: letters, digits, `_` and `-`, at most 64).
fn schema_format(file: &std::path::Path) -> Result<ResponseFormat, Error> {
    let text = std::fs::read_to_string(file)
        .map_err(|err| Error::io(format!("reading the schema {}", file.display()), err))?;
    let schema: serde_json::Value = serde_json::from_str(&text).map_err(|err| {
        Error::invalid_request(
            "--json-schema",
            format!(
                "{} is not JSON ({err}): give a JSON Schema document",
                file.display()
            ),
        )
    })?;
    if !(schema.is_object() || schema.is_boolean()) {
        return Err(Error::invalid_request(
            "--json-schema",
            format!(
                "{} holds a JSON {}, not a schema: a JSON Schema is an object (or true/false)",
                file.display(),
                json_kind(&schema)
            ),
        ));
    }
    let stem = file
        .file_stem()
        .map(|stem| stem.to_string_lossy())
        .unwrap_or_default();
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        name.push_str("schema");
    }
    Ok(ResponseFormat::json_schema(name, schema))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

async fn run_once(
    args: ModelArgs,
    prompt: String,
    sampling: SamplingArgs,
    format: Option<ResponseFormat>,
    latest: LatestLine,
) -> Result<(), Error> {
    let mut runtime = start(&args, latest).await?;
    let mut messages = opening(&sampling);
    messages.push(ChatMessage::user(prompt));
    let request = request_of(messages, &sampling);
    let answered = match format {
        // Whole, so stdout only ever holds an answer that passed the check.
        Some(format) => json_answer(runtime.as_ref(), request.with_response_format(format)).await,
        None => stream_answer(runtime.as_ref(), request).await.map(drop),
    };
    let stopped = runtime.shutdown().await;
    answered?;
    stopped
}

/// Streams the model's continuation of `prompt`, taken as raw text.
async fn run_raw(
    args: ModelArgs,
    prompt: String,
    sampling: SamplingArgs,
    latest: LatestLine,
) -> Result<(), Error> {
    let mut runtime = start(&args, latest).await?;
    let request = InferenceRequest::completion(prompt)
        .with_max_tokens(sampling.max_tokens)
        .with_temperature(sampling.temperature);
    let answered = stream_answer(runtime.as_ref(), request).await.map(drop);
    let stopped = runtime.shutdown().await;
    answered?;
    stopped
}

/// Generates a structured answer and prints it once the runtime has
/// checked it against its format.
async fn json_answer(runtime: &dyn ModelRuntime, request: InferenceRequest) -> Result<(), Error> {
    let answer = runtime.generate(request).await?;
    println!("{}", answer.content);
    Ok(())
}

/// Streams an answer to stdout; Ctrl-C stops it. Returns the text shown.
async fn stream_answer(
    runtime: &dyn ModelRuntime,
    request: InferenceRequest,
) -> Result<String, Error> {
    let mut stream = runtime.generate_stream(request).await?;
    let mut answer = String::new();
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            delta = stream.next() => match delta {
                Some(delta) => {
                    let delta = delta?;
                    let _ = stdout.write_all(delta.as_bytes());
                    let _ = stdout.flush();
                    answer.push_str(&delta);
                }
                None => break,
            },
            _ = tokio::signal::ctrl_c() => {
                eprint!(" [stopped]");
                break;
            }
        }
    }
    println!();
    Ok(answer)
}

async fn chat(args: ModelArgs, sampling: SamplingArgs, latest: LatestLine) -> Result<(), Error> {
    let mut runtime = start(&args, latest).await?;
    eprintln!("model-runtime: ready. Ctrl-C stops an answer, Ctrl-D leaves.");
    let mut messages = opening(&sampling);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let outcome = loop {
        eprint!("> ");
        let line = tokio::select! {
            line = lines.next_line() => line,
            // Ctrl-C at the prompt leaves, as Ctrl-D does.
            _ = tokio::signal::ctrl_c() => Ok(None),
        };
        let line = match line {
            Ok(Some(line)) => line,
            Ok(None) => break Ok(()),
            Err(err) => break Err(Error::io("error reading the prompt", err)),
        };
        if line.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage::user(line));
        match stream_answer(runtime.as_ref(), request_of(messages.clone(), &sampling)).await {
            Ok(answer) => messages.push(ChatMessage::assistant(answer)),
            Err(err) => {
                eprintln!("model-runtime: {}", render_error(&err));
                messages.pop();
            }
        }
    };
    eprintln!();
    let stopped = runtime.shutdown().await;
    outcome.and(stopped)
}

/// What `serve` fronts.
#[derive(Clone)]
enum Served {
    /// One model from the command line.
    Model(ModelArgs),
    /// The models of a configuration file, re-read on SIGHUP.
    File(PathBuf),
}

/// Where `serve` listens and who may use it; flags override the file.
struct Access {
    host: Option<String>,
    port: Option<u16>,
    api_key: Option<ApiKey>,
    allow_unauthenticated: bool,
}

/// How long open connections get to finish once the engines are stopped.
const CONNECTION_GRACE: Duration = Duration::from_secs(5);

/// The gateway configuration `serve` runs.
fn gateway_config(what: &Served) -> Result<GatewayConfig, Error> {
    match what {
        Served::File(path) => GatewayConfig::from_file(path),
        Served::Model(args) => {
            let runtime = config_of(args)?;
            let (backend, why) = choose(args.engine.backend, &runtime)?;
            eprintln!("model-runtime: using {backend} ({why})");
            // The backend just chosen and reported, not a second choice.
            let spec = ModelSpec::from_runtime_config(runtime.model_name(), &runtime)
                .with_backend(backend.into());
            Ok(GatewayConfig::single(spec))
        }
    }
}

async fn serve(what: Served, access: Access, latest: LatestLine) -> Result<(), Error> {
    let mut config = gateway_config(&what)?;
    let host = access
        .host
        .clone()
        .unwrap_or_else(|| config.listen.ip().to_string());
    let port = access.port.unwrap_or(config.listen.port());
    config.api_keys.extend(access.api_key.clone());
    config.allow_unauthenticated |= access.allow_unauthenticated;
    // Bind first: a taken port is reported before an engine is started.
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|err| Error::io(format!("error binding {host}:{port}"), err))?;
    let address = listener
        .local_addr()
        .map_err(|err| Error::io("error reading the bound address", err))?;
    check_exposure(
        &address,
        config.api_keys.first(),
        config.allow_unauthenticated,
    )?;
    let mut signals = Signals::listen()?;
    let manager = RuntimeManager::new(config.clone())?;

    // Preloaded models are ready before we say we serve.
    let preloaded: Vec<String> = config
        .models
        .iter()
        .filter(|m| m.preload)
        .map(|m| m.name.clone())
        .collect();
    let spinner = Spinner::start(format!("starting {}", preloaded.join(", ")), latest);
    let loads = futures::future::join_all(preloaded.iter().map(|name| manager.load(name)));
    let loaded = tokio::select! {
        loaded = loads => Some(loaded),
        Signal::Stop = signals.next() => None,
    };
    spinner.finish();
    let Some(loaded) = loaded else {
        eprintln!("model-runtime: stopped before the engines were ready");
        manager.shutdown_within(Duration::ZERO).await;
        return Ok(());
    };
    for (name, outcome) in preloaded.iter().zip(loaded) {
        if let Err(err) = outcome {
            if let Served::Model(_) = what {
                manager.shutdown_within(Duration::ZERO).await;
                return Err(err);
            }
            eprintln!(
                "model-runtime: {name} did not start: {}",
                render_error(&err)
            );
        }
    }

    let keys = Keys::new(config.api_keys.clone(), config.admin_keys.clone());
    let reloader = Arc::new(Reloader {
        what: what.clone(),
        api_key: access.api_key.clone(),
        manager: manager.clone(),
        keys: keys.clone(),
    });
    let mut options = ServeOptions::new(config.default_model.clone().unwrap_or_default())
        .with_keys(keys)
        .with_hosts(HostPolicy::for_address(&address));
    if let Served::File(_) = what {
        let reloader = reloader.clone();
        options = options.with_reload(Arc::new(move || {
            let reloader = reloader.clone();
            Box::pin(async move { reloader.reload().await })
        }));
    }
    let router = runtime_openai::router(manager.clone() as Arc<dyn ModelService>, options);
    let names: Vec<&str> = config.models.iter().map(|m| m.name.as_str()).collect();
    eprintln!(
        "model-runtime: serving {} at http://{address}/v1/chat/completions",
        names.join(", ")
    );
    let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(runtime_openai::serve(
        listener,
        router,
        ServeLimits::default().with_write_timeout(config.client_write_timeout),
        async move {
            let _ = stopped.await;
        },
    ));
    let served = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop => break Ok(()),
                Signal::Reload => match reloader.reload().await {
                    Ok(detail) => eprintln!("model-runtime: {detail}"),
                    Err(err) => eprintln!("model-runtime: not reloaded: {}", render_error(&err)),
                },
            },
            ended = &mut server => break match ended {
                Ok(result) => result.map_err(|err| Error::io("the HTTP server failed", err)),
                Err(err) => Err(Error::io("the HTTP server failed", std::io::Error::other(err))),
            },
        }
    };
    eprintln!("model-runtime: shutting down (a second Ctrl-C exits at once)");
    let _ = stop_accepting.send(());
    let orderly = async {
        // Open streams end now with an error event, and the engines get
        // their grace period; then the connections have a moment to close.
        manager.shutdown_within(Duration::ZERO).await;
        let _ = tokio::time::timeout(CONNECTION_GRACE, &mut server).await;
    };
    tokio::select! {
        () = orderly => {}
        Signal::Stop = signals.next() => {
            // Engines die with us: their parent-death signal (and, for
            // engines with processes of their own, the group's watcher).
            eprintln!("model-runtime: second signal, exiting now");
            std::process::exit(130);
        }
    }
    served
}

/// Re-reads the configuration file and applies it, on SIGHUP or `POST
/// /reload`: the models through the manager, then the keys, swapped at once
/// for every request (a rotated-out key stops working).
struct Reloader {
    what: Served,
    /// The key given on the command line or in the environment, kept beside
    /// the file's.
    api_key: Option<ApiKey>,
    manager: Arc<RuntimeManager>,
    keys: Keys,
}

impl Reloader {
    async fn reload(&self) -> Result<String, Error> {
        let Served::File(path) = &self.what else {
            return Err(Error::invalid_config(
                "config",
                "there is no configuration file to re-read (serve was given a model)",
            ));
        };
        let mut config = GatewayConfig::from_file(path)?;
        config.api_keys.extend(self.api_key.clone());
        let clients = config.api_keys.clone();
        let admins = config.admin_keys.clone();
        let applied = self.manager.reload(config).await;
        // A changed model that could not start keeps its old runtime; the
        // rest of the file stands, keys included.
        self.keys.replace(clients, admins);
        applied.map(|()| format!("reloaded {}", path.display()))
    }
}

/// What a signal asks of `serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// Ctrl-C or SIGTERM.
    Stop,
    /// SIGHUP.
    Reload,
}

/// Ctrl-C, SIGTERM and SIGHUP, as they arrive.
struct Signals {
    received: tokio::sync::mpsc::UnboundedReceiver<Signal>,
}

impl Signals {
    fn listen() -> Result<Self, Error> {
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())
                .map_err(|err| Error::io("error listening for SIGTERM", err))?;
            let mut interrupt = signal(SignalKind::interrupt())
                .map_err(|err| Error::io("error listening for SIGINT", err))?;
            let mut hangup = signal(SignalKind::hangup())
                .map_err(|err| Error::io("error listening for SIGHUP", err))?;
            tokio::spawn(async move {
                loop {
                    let received = tokio::select! {
                        _ = term.recv() => Signal::Stop,
                        _ = interrupt.recv() => Signal::Stop,
                        _ = hangup.recv() => Signal::Reload,
                    };
                    if sender.send(received).is_err() {
                        return;
                    }
                }
            });
        }
        #[cfg(not(unix))]
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                if sender.send(Signal::Stop).is_err() {
                    return;
                }
            }
        });
        Ok(Self { received })
    }

    /// Waits for the next signal.
    async fn next(&mut self) -> Signal {
        match self.received.recv().await {
            Some(signal) => signal,
            None => std::future::pending().await,
        }
    }
}

async fn rpc_worker(config: RpcWorkerConfig) -> Result<(), Error> {
    let mut signals = Signals::listen()?;
    let worker = RpcWorker::start(config).await?;
    eprintln!(
        "model-runtime: llama.cpp RPC worker listening on {}; give it to llama-server as \
         --rpc {0} (or LlamaCppOptions::with_rpc_worker)",
        worker.address()
    );
    tokio::select! {
        exited = worker.wait() => {
            return Err(Error::EngineExited {
                engine: "rpc-server".to_owned(),
                status: exited,
                log_tail: worker.log_tail(),
            });
        }
        _ = signals.next() => {}
    }
    worker.stop().await;
    Ok(())
}

async fn backends() {
    for report in survey().await {
        let status = if report.usable {
            "usable"
        } else {
            "not usable"
        };
        println!("{:<9} {status}", report.backend);
        println!("          formats: {}", report.formats);
        if let Some(binary) = &report.binary {
            println!("          binary:  {}", binary.display());
        }
        if let Some(version) = &report.version {
            println!("          version: {version}");
        }
        if !report.note.is_empty() {
            println!("          note:    {}", report.note);
        }
    }
}

/// One readable paragraph: the error, its causes, what to do, the engine's last words.
fn render_error(err: &Error) -> String {
    let mut text = err.with_sources().to_string();
    let hint = match err {
        Error::ModelNotFound { .. } => {
            Some("check the path; `cargo xtask provision models` fetches the demo model")
        }
        Error::InvalidModel { .. } | Error::UnsupportedFormat { .. } => {
            Some("model-runtime takes GGUF files and Hugging Face safetensors directories")
        }
        Error::BinaryNotFound { .. } => {
            Some("or run with --backend candle, which needs no engine binary")
        }
        Error::StartupTimeout { .. } | Error::EngineExited { .. } => {
            Some("the engine's last log lines follow; MODEL_RUNTIME_LOG=debug shows all of them")
        }
        _ => None,
    };
    if let Some(hint) = hint {
        text.push_str(&format!(".\n{hint}"));
    }
    for line in err.log_tail().iter().rev().take(8).rev() {
        text.push_str(&format!("\n  | {line}"));
    }
    text
}
