//! [`ManagedServer`]: a [`ModelRuntime`] for any engine that is a server process
//! speaking the OpenAI API, described by a [`ServerEngine`].

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use runtime_core::{
    ApiKey, Capabilities, EmbeddingInput, EmbeddingRequest, Embeddings, Error, EventStream,
    FimTokens, InferenceRequest, InferenceResponse, ModelFormat, ModelRuntime, Result,
    RuntimeConfig, RuntimeMetadata, StreamEvent, TextStream, resolve_infill, text_deltas,
    truncate_tokens,
};
use runtime_openai::{
    ClientOptions, ClientTimeouts, Heartbeat, OpenAiClient, http_base_url, random_api_key,
};
use runtime_process::{ServerProcess, StopPolicy, ensure_port_free, free_port};
use runtime_structured::{Plan, Support};

use crate::engine::PROBE_TIMEOUT;
use crate::{LaunchSpec, ServerEngine};

/// The most tokens a tokenizer adds to a text beyond one per byte (its
/// special tokens, a space prefix): a text this much shorter than the
/// context fits without being tokenized.
const MAX_SPECIAL_TOKENS: usize = 8;

/// How long a broken connection waits for the exit watcher before it is
/// reported as a transport error rather than as the engine's exit.
const EXIT_CONFIRMATION: Duration = Duration::from_millis(500);
/// Attempts at a fresh port when the engine reports the address in use.
const PORT_ATTEMPTS: usize = 3;

/// A running engine and what is known about it.
#[derive(Debug)]
struct Running {
    process: Arc<ServerProcess>,
    /// How the runtime reaches the engine: over its private socket, or its port.
    client: OpenAiClient,
    /// Where other clients reach it (`base_url`): the front in front of the
    /// private socket, or the engine's own port.
    base_url: String,
    /// The front and the socket's directory, for engines on a private socket.
    private: Option<Private>,
    api_key: ApiKey,
    format: ModelFormat,
    version: String,
    context_size: Option<u32>,
    /// What the engine does for tools and schemas; `None`: plain chat only.
    structured: Option<(Support, Capabilities)>,
    stop_policy: StopPolicy,
    /// The model's fill-in-the-middle tokens, found through the engine's
    /// tokenizer on the first request with a `suffix`.
    fim: tokio::sync::OnceCell<Option<FimTokens>>,
}

/// An engine on a private socket: the front that is its only door, and the
/// directory that holds the socket (removed with it).
#[derive(Debug)]
struct Private {
    front: crate::front::Front,
    _dir: tempfile::TempDir,
}

/// A [`ModelRuntime`] over an OpenAI-compatible engine server `E`.
///
/// Backends expose it as a type alias (`LlamaCppRuntime = ManagedServer<LlamaServer>`).
/// Dropping it without [`shutdown`](ModelRuntime::shutdown) kills the engine's
/// process group.
#[derive(Debug)]
pub struct ManagedServer<E> {
    engine: E,
    running: Option<Running>,
}

impl<E: ServerEngine + Default> ManagedServer<E> {
    /// A runtime that has not started its engine yet.
    pub fn new() -> Self {
        Self::with_engine(E::default())
    }
}

impl<E: ServerEngine + Default> Default for ManagedServer<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: ServerEngine> ManagedServer<E> {
    /// A runtime for the given engine description.
    pub fn with_engine(engine: E) -> Self {
        Self {
            engine,
            running: None,
        }
    }

    /// The engine description.
    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// The HTTP client of the running engine, for engine-specific endpoints.
    pub fn client(&self) -> Result<&OpenAiClient> {
        Ok(&self.running()?.client)
    }

    /// The engine's process id (also its process group id), while running.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|running| running.process.pid())
    }

    /// The engine's recent log lines, while running.
    pub fn log_tail(&self) -> Vec<String> {
        self.running
            .as_ref()
            .map(|running| running.process.log().lines())
            .unwrap_or_default()
    }

    fn running(&self) -> Result<&Running> {
        self.running.as_ref().ok_or(Error::NotInitialized)
    }

    /// The inputs of `request` as the engine is sent them: texts as they
    /// are, unless the request asks to truncate, when each text that may be
    /// too long is tokenized (all at once) and cut to `limit` tokens keeping
    /// its special tokens; token ids past the limit are cut or refused.
    /// Texts and token ids may be mixed in one request: llama-server and
    /// vLLM both take the mix (checked by the embeddings suite).
    async fn fit_inputs(
        &self,
        running: &Running,
        request: &EmbeddingRequest,
        limit: usize,
    ) -> Result<Vec<EmbeddingInput>> {
        let tokens_of = |text: &str| {
            let client = &running.client;
            let text = text.to_owned();
            async move {
                let with = self.engine.tokenize(client, &text, true).await?;
                let without = if request.truncate && with.len() > limit {
                    self.engine.tokenize(client, &text, false).await?
                } else {
                    Vec::new()
                };
                Ok::<_, Error>((with, without))
            }
        };
        let fitted: Vec<EmbeddingInput> =
            futures::future::try_join_all(request.inputs.iter().map(|input| async move {
                Ok::<_, Error>(match input {
                    EmbeddingInput::Tokens(tokens) if tokens.len() > limit => {
                        if !request.truncate {
                            return Err(Error::ContextExceeded {
                                prompt_tokens: tokens.len() as u64,
                                context_size: limit as u64,
                            });
                        }
                        EmbeddingInput::Tokens(tokens[..limit].to_vec())
                    }
                    // No text has more tokens than bytes, bar a few specials.
                    EmbeddingInput::Text(text)
                        if request.truncate && text.len() + MAX_SPECIAL_TOKENS > limit =>
                    {
                        let (with, without) = tokens_of(text).await?;
                        if with.len() <= limit {
                            input.clone()
                        } else {
                            EmbeddingInput::Tokens(truncate_tokens(&with, &without, limit))
                        }
                    }
                    other => other.clone(),
                })
            }))
            .await?;
        Ok(fitted)
    }

    /// [`Error::ContextExceeded`] for the first of `inputs` longer than
    /// `limit` tokens, if one is.
    async fn overlong(
        &self,
        running: &Running,
        inputs: &[EmbeddingInput],
        limit: usize,
    ) -> Option<Error> {
        for input in inputs {
            let EmbeddingInput::Text(text) = input else {
                continue;
            };
            if text.len() + MAX_SPECIAL_TOKENS <= limit {
                continue;
            }
            let tokens = self
                .engine
                .tokenize(&running.client, text, true)
                .await
                .ok()?;
            if tokens.len() > limit {
                return Some(Error::ContextExceeded {
                    prompt_tokens: tokens.len() as u64,
                    context_size: limit as u64,
                });
            }
        }
        None
    }

    /// `request` planned for the running engine: what it cannot serve is
    /// refused by name before anything is sent.
    fn plan(&self, running: &Running, request: &InferenceRequest) -> Result<Plan> {
        let name = self.engine.runtime_name();
        match &running.structured {
            Some((support, capabilities)) => {
                capabilities.admit(request, name)?;
                Plan::new(request, support)
            }
            None => {
                Capabilities::default().admit(request, name)?;
                Ok(Plan::plain(request))
            }
        }
    }

    async fn start(&self, config: &RuntimeConfig) -> Result<Running> {
        config.validate()?;
        let options = config.options::<E::Options>()?;
        self.engine.validate(config, &options)?;
        let format = config.resolve_format()?;
        let binary = self.engine.find_binary(config)?;
        let binary_version = self.engine.binary_version(&binary, config).await?;
        let api_key = match &config.api_key {
            Some(key) => key.clone(),
            None => random_api_key()?,
        };
        let model_name = config.model_name();
        let stall_timeout = config
            .startup_timeout
            .unwrap_or_else(|| self.engine.default_startup_timeout());
        let stop_policy = self.engine.stop_policy(config.shutdown_grace);

        let timeouts = ClientTimeouts::with_idle(config.idle_timeout);
        let (process, client, private) = if self.engine.supports_unix_socket() {
            // Our listener first: a taken port fails now, before the engine.
            let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
                .await
                .map_err(|err| match err.kind() {
                    std::io::ErrorKind::AddrInUse => Error::port_in_use(&config.host, config.port),
                    _ => Error::io(
                        format!("error binding {}:{}", config.host, config.port),
                        err,
                    ),
                })?;
            let dir = private_dir()?;
            let socket = dir.path().join("engine.sock");
            let launch =
                LaunchSpec::new(&binary, config, &options, 0, api_key.expose(), &model_name)
                    .with_socket(&socket);
            let command = self.engine.command(&launch)?;
            let process = ServerProcess::spawn(&command)?;
            let client = OpenAiClient::with_options(
                "http://localhost",
                Some(api_key.clone()),
                Some(model_name.clone()),
                ClientOptions::unix_socket(&socket, timeouts),
            )?;
            // Nobody else can create the socket in our directory: the
            // engine's answer is the engine's.
            let ready = process
                .wait_until_ready(stall_timeout, || self.engine.probe_ready(&client))
                .await;
            if let Err(err) = ready {
                process.stop(stop_policy).await;
                return Err(err);
            }
            let front = crate::front::Front::start(listener, &socket, api_key.clone())?;
            let private = Private { front, _dir: dir };
            (process, client, Some(private))
        } else {
            let (process, client) = self
                .start_on_port(
                    config,
                    (&binary, &options),
                    stall_timeout,
                    stop_policy,
                    &api_key,
                    &model_name,
                )
                .await?;
            (process, client, None)
        };
        let client =
            client.with_continue_final_message(self.engine.continues_final_message_when_told());
        let base_url = match &private {
            Some(private) => http_base_url(&config.host, private.front.address().port()),
            None => client.base_url().to_owned(),
        };

        let version = match binary_version {
            Some(version) => version,
            None => match self.engine.served_version(&client).await {
                Ok(version) => version,
                Err(err) => {
                    process.stop(stop_policy).await;
                    return Err(err);
                }
            },
        };
        let context_size = self.engine.context_size(&client).await;
        let structured = self.engine.structured(&client, config, &options).await;
        let client = client.with_heartbeat(Heartbeat::new(
            self.engine.engine_name(),
            config.hang_timeout,
        ));
        tracing::info!(
            engine = self.engine.engine_name(),
            base_url = client.base_url(),
            version,
            "engine ready"
        );
        Ok(Running {
            process: Arc::new(process),
            client,
            base_url,
            private,
            api_key,
            format,
            version,
            context_size,
            structured,
            stop_policy,
            fim: tokio::sync::OnceCell::new(),
        })
    }

    /// The text the engine's answer to `request` starts with before its
    /// continuation ([`ServerEngine::echoes_continued_message`]).
    fn echoed_prefill<'r>(&self, request: &'r InferenceRequest) -> Option<&'r str> {
        request
            .prefill()
            .filter(|_| self.engine.echoes_continued_message())
    }

    /// The request as the engine is sent it, and its plan: one with a
    /// `suffix` becomes the token-id prompt of its fill-in-the-middle,
    /// tokenized by the engine, once the model is known to take it.
    async fn planned(
        &self,
        running: &Running,
        request: InferenceRequest,
    ) -> Result<(InferenceRequest, Plan)> {
        let plan = self.plan(running, &request)?;
        if request.suffix.is_none() {
            return Ok((request, plan));
        }
        let fim = *running
            .fim
            .get_or_try_init(|| FimTokens::detect(self))
            .await?;
        let request = resolve_infill(self, fim, request).await?;
        let plan = self.plan(running, &request)?;
        Ok((request, plan))
    }

    /// Starts an engine that listens on a TCP port of its own: on `config`'s
    /// port, or on a free one (tried again with a fresh one when the engine
    /// reports it taken).
    async fn start_on_port(
        &self,
        config: &RuntimeConfig,
        (binary, options): (&std::path::Path, &E::Options),
        stall_timeout: Duration,
        stop_policy: StopPolicy,
        api_key: &ApiKey,
        model_name: &str,
    ) -> Result<(ServerProcess, OpenAiClient)> {
        // A port another process holds fails now, not after the engine has
        // spent its start (up to a minute) learning it cannot bind.
        if config.port != 0 {
            ensure_port_free(&config.host, config.port)?;
        }
        let mut attempt = 0;
        let started = loop {
            attempt += 1;
            let port = match config.port {
                0 => free_port(&config.host)?,
                port => port,
            };
            let launch =
                LaunchSpec::new(binary, config, options, port, api_key.expose(), model_name);
            let command = self.engine.command(&launch)?;
            let process = ServerProcess::spawn(&command)?;
            let client = OpenAiClient::new(
                http_base_url(&config.host, port),
                Some(api_key.clone()),
                Some(model_name.to_owned()),
                ClientTimeouts::with_idle(config.idle_timeout),
            )?;
            // Ready means: the engine's own process group holds the listening
            // socket, and the engine answers its probe (sent without the key).
            // A process squatting on the port may answer the probe, but the
            // socket is not ours: our engine then dies on "address in use".
            let ready = process
                .wait_until_ready(stall_timeout, || async {
                    process.listens_on(port) != Some(false)
                        && self.engine.probe_ready(&client).await
                })
                .await;
            match ready {
                Ok(()) => break (process, client),
                Err(err) => {
                    process.stop(stop_policy).await;
                    let retry = config.port == 0
                        && attempt < PORT_ATTEMPTS
                        && matches!(err, Error::EngineExited { .. })
                        && self.engine.port_conflict(err.log_tail());
                    if !retry {
                        return Err(err);
                    }
                    tracing::info!(
                        engine = self.engine.engine_name(),
                        port,
                        "port taken; retrying with a fresh one"
                    );
                }
            }
        };
        Ok(started)
    }
}

#[async_trait]
impl<E: ServerEngine> ModelRuntime for ManagedServer<E> {
    fn supported_format(&self) -> ModelFormat {
        self.engine.supported_format()
    }

    async fn initialize(&mut self, config: RuntimeConfig) -> Result<()> {
        if self.running.is_some() {
            return Err(Error::AlreadyInitialized);
        }
        self.running = Some(self.start(&config).await?);
        Ok(())
    }

    async fn is_ready(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|running| running.process.is_running() && running.client.is_responsive())
    }

    async fn health_check(&self) -> Result<String> {
        let running = self.running()?;
        if let Some(exited) = running.process.exit_status() {
            return Err(running.process.exited_error(&exited));
        }
        if let Some(err) = running.client.unresponsive_error() {
            return Err(err);
        }
        match running
            .client
            .get_anonymous("/health", PROBE_TIMEOUT * 5)
            .await
        {
            Ok((200, body)) => {
                let text = String::from_utf8_lossy(&body).trim().to_owned();
                Ok(if text.is_empty() {
                    "ok".to_owned()
                } else {
                    text
                })
            }
            Ok((status, body)) => Err(runtime_openai::wire::ErrorBody::to_error(status, &body)),
            Err(err) => Err(attribute_to_exit(&running.process, err).await),
        }
    }

    fn base_url(&self) -> String {
        self.running
            .as_ref()
            .map(|running| running.base_url.clone())
            .unwrap_or_default()
    }

    fn engine_pid(&self) -> Option<u32> {
        self.pid()
    }

    fn api_key(&self) -> Option<ApiKey> {
        self.running.as_ref().map(|running| running.api_key.clone())
    }

    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse> {
        request.validate()?;
        let running = self.running()?;
        let (request, plan) = self.planned(running, request).await?;
        // A raw prompt goes to the engine's legacy completions endpoint,
        // which applies no chat template.
        let answered = match request.prompt {
            Some(_) => running.client.complete(plan.engine_request()).await,
            None => running.client.chat(plan.engine_request()).await,
        };
        match answered {
            Ok(mut response) => {
                if let Some(continued) = self.echoed_prefill(&request) {
                    match response.content.strip_prefix(continued) {
                        Some(rest) => response.content = rest.to_owned(),
                        None => warn_unechoed(self.engine.engine_name()),
                    }
                }
                plan.finish(response)
            }
            Err(err) => Err(attribute_to_exit(&running.process, err).await),
        }
    }

    async fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let running = self.running()?;
        self.engine
            .tokenize(&running.client, text, add_special)
            .await
    }

    async fn detokenize(&self, tokens: &[u32]) -> Result<String> {
        let running = self.running()?;
        self.engine.detokenize(&running.client, tokens).await
    }

    async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings> {
        request.validate()?;
        let running = self.running()?;
        let name = self.engine.runtime_name();
        let embeds = running
            .structured
            .as_ref()
            .is_some_and(|(_, capabilities)| capabilities.embeddings);
        if !embeds {
            return Err(Error::unsupported(
                "embeddings",
                format!("{name} for this model, which is not an embedding model"),
            ));
        }
        let limit = running.context_size.map_or(usize::MAX, |n| n as usize);
        let inputs = self.fit_inputs(running, &request, limit).await?;
        let embeddings = match running.client.embeddings(&inputs, false).await {
            Ok(embeddings) => embeddings,
            // The engine refuses what does not fit; say which input, and by
            // how much, in our own terms.
            Err(
                err @ Error::Api {
                    status: 400 | 413 | 500,
                    ..
                },
            ) if !request.truncate => {
                return Err(self.overlong(running, &inputs, limit).await.unwrap_or(err));
            }
            Err(err) => return Err(attribute_to_exit(&running.process, err).await),
        };
        if let Some(vector) = embeddings.vectors.first() {
            request.check_dimensions(vector.len())?;
        }
        Ok(embeddings)
    }

    async fn generate_stream(&self, request: InferenceRequest) -> Result<TextStream> {
        Ok(text_deltas(self.generate_events(request).await?))
    }

    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream> {
        request.validate_for_stream()?;
        let running = self.running()?;
        let (request, plan) = self.planned(running, request).await?;
        let started = match request.prompt {
            Some(_) => running.client.complete_stream(plan.engine_request()).await,
            None => running.client.chat_stream(plan.engine_request()).await,
        };
        let mut events = match started {
            Ok(events) => events,
            Err(err) => return Err(attribute_to_exit(&running.process, err).await),
        };
        if let Some(continued) = self.echoed_prefill(&request) {
            events = without_echoed_prefix(events, continued.to_owned(), self.engine.engine_name());
        }
        let supervised = Supervised {
            events,
            // Weak: an abandoned stream must not keep a dropped runtime's engine alive.
            process: Arc::downgrade(&running.process),
            done: false,
        };
        Ok(plan.events(Box::new(
            futures::stream::unfold(supervised, Supervised::next).boxed(),
        )))
    }

    async fn shutdown(&mut self) -> Result<()> {
        if let Some(running) = self.running.take() {
            let Running {
                process,
                client,
                private,
                stop_policy,
                ..
            } = running;
            // Close our open streams first (they end with ShutDown), and the
            // front's connections: llama-server waits for open connections
            // before it exits.
            client.close_streams();
            drop(client);
            drop(private.map(|private| private.front));
            let exited = process.stop(stop_policy).await;
            tracing::info!(engine = self.engine.engine_name(), %exited, "engine shut down");
        }
        Ok(())
    }

    fn resident_memory(&self) -> Option<u64> {
        self.running.as_ref()?.process.resident_memory()
    }

    fn log_tail(&self) -> Vec<String> {
        ManagedServer::log_tail(self)
    }

    fn metadata(&self) -> RuntimeMetadata {
        let (format, version, context_size, capabilities) = match &self.running {
            Some(running) => (
                running.format,
                running.version.clone(),
                running.context_size,
                running
                    .structured
                    .as_ref()
                    .map(|(_, capabilities)| capabilities.clone())
                    .unwrap_or_default(),
            ),
            None => (
                self.engine.supported_format(),
                String::new(),
                None,
                Capabilities::default(),
            ),
        };
        RuntimeMetadata::new(format, self.engine.runtime_name(), version)
            .with_gpu(self.engine.supports_gpu())
            .with_context_size(context_size)
            .with_capabilities(capabilities)
    }
}

/// Turns a transport failure into [`Error::EngineExited`] when the engine died.
async fn attribute_to_exit(process: &ServerProcess, err: Error) -> Error {
    if !matches!(err, Error::Transport(_) | Error::StreamProtocol(_)) {
        return err;
    }
    process.exit_error(EXIT_CONFIRMATION).await.unwrap_or(err)
}

/// An engine's event stream whose errors are explained by the process's state.
struct Supervised {
    events: EventStream,
    process: Weak<ServerProcess>,
    done: bool,
}

impl Supervised {
    async fn next(mut self) -> Option<(Result<StreamEvent>, Self)> {
        if self.done {
            return None;
        }
        let event = self.events.next().await?;
        let event = match (event, self.process.upgrade()) {
            (Err(err), Some(process)) => Err(attribute_to_exit(&process, err).await),
            (event, _) => event,
        };
        if event.is_err() {
            self.done = true;
            // Release the connection now rather than when the caller drops us.
            self.events = Box::new(futures::stream::empty());
        }
        Some((event, self))
    }
}

/// Private directories are named `model-runtime-<owner pid>-<random>`.
const PRIVATE_DIR_PREFIX: &str = "model-runtime-";

/// A new directory that only this process's user may enter (`0700`), for an
/// engine's socket: in `$XDG_RUNTIME_DIR` where there is one, else the
/// temporary directory. Socket paths are short (about 100 bytes), so long
/// directory names fall back to `/tmp`. Directories that killed owners
/// left behind are removed on the way.
fn private_dir() -> Result<tempfile::TempDir> {
    const MAX_SOCKET_PATH: usize = 100;
    let candidates = [
        std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from),
        Some(std::env::temp_dir()),
        Some(std::path::PathBuf::from("/tmp")),
    ];
    let parent = candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.is_dir() && dir.as_os_str().len() + 40 < MAX_SOCKET_PATH)
        .unwrap_or_else(|| std::path::PathBuf::from("/tmp"));
    let prefix = format!("{PRIVATE_DIR_PREFIX}{}-", std::process::id());
    let dir = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in(&parent)
        .map_err(|err| {
            Error::io(
                format!("error creating a private directory in {}", parent.display()),
                err,
            )
        })?;
    // tempfile makes it 0700 already; say so, whatever the umask did.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(|err| Error::io("error restricting the engine's directory", err))?;
    }
    sweep_dead_owners(&parent, dir.path());
    Ok(dir)
}

/// Removes the private directories in `parent` whose owner died without
/// removing them (killed, so no destructor ran): ours (same user) only, and
/// only when the process named in the name is gone. `ours`: a directory
/// this process just made, whose owner is us. Best effort.
fn sweep_dead_owners(parent: &std::path::Path, ours: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|name| name.strip_prefix(PRIVATE_DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner == std::process::id() || runtime_process::process_exists(owner) {
            continue;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let Ok(us) = std::fs::metadata(ours).map(|meta| meta.uid()) else {
                return;
            };
            let mine = entry
                .metadata()
                .is_ok_and(|meta| meta.is_dir() && meta.uid() == us);
            if !mine {
                continue;
            }
        }
        #[cfg(not(unix))]
        let _ = ours;
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                tracing::debug!(dir = %entry.path().display(), "removed the private directory of a dead owner")
            }
            Err(err) => {
                tracing::debug!(dir = %entry.path().display(), error = %err, "could not remove the private directory of a dead owner")
            }
        }
    }
}

fn warn_unechoed(engine: &str) {
    tracing::warn!(
        engine,
        "the answer to a continued message does not start with the message; kept whole"
    );
}

/// `events` without the `prefix` an engine puts before a continuation:
/// deltas are taken off until the prefix is spent. Deltas that do not
/// spell it are passed on whole (and a warning logged).
fn without_echoed_prefix(events: EventStream, prefix: String, engine: &'static str) -> EventStream {
    let mut rest = prefix;
    Box::new(
        events
            .filter_map(move |event| {
                let kept = match event {
                    Ok(StreamEvent::Delta(text)) if !rest.is_empty() => {
                        if let Some(after) = text.strip_prefix(rest.as_str()) {
                            rest.clear();
                            (!after.is_empty()).then(|| Ok(StreamEvent::Delta(after.to_owned())))
                        } else if let Some(left) = rest.strip_prefix(text.as_str()) {
                            rest = left.to_owned();
                            None
                        } else {
                            rest.clear();
                            warn_unechoed(engine);
                            Some(Ok(StreamEvent::Delta(text)))
                        }
                    }
                    other => Some(other),
                };
                futures::future::ready(kept)
            })
            .boxed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deltas(texts: &[&str]) -> EventStream {
        let events: Vec<Result<StreamEvent>> = texts
            .iter()
            .map(|t| Ok(StreamEvent::Delta((*t).to_owned())))
            .collect();
        Box::new(futures::stream::iter(events))
    }

    async fn text_of(events: EventStream) -> Vec<String> {
        events
            .filter_map(|event| async move {
                match event {
                    Ok(StreamEvent::Delta(text)) => Some(text),
                    _ => None,
                }
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn an_echoed_message_is_taken_off_however_its_deltas_split_it() {
        let stripped = without_echoed_prefix(
            deltas(&["1, 2", ", 3,", " 4", ","]),
            "1, 2, 3,".to_owned(),
            "test",
        );
        assert_eq!(text_of(stripped).await, [" 4", ","]);
        let across = without_echoed_prefix(deltas(&["1, 2, 3, 4"]), "1, 2,".to_owned(), "test");
        assert_eq!(text_of(across).await, [" 3, 4"]);
        let other = without_echoed_prefix(deltas(&["Sure", "!"]), "1,".to_owned(), "test");
        assert_eq!(text_of(other).await, ["Sure", "!"], "kept whole");
    }

    #[cfg(unix)]
    #[test]
    fn a_private_directory_left_by_a_dead_owner_is_removed_and_live_ones_are_kept() {
        let parent = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let left = parent
            .path()
            .join(format!("{PRIVATE_DIR_PREFIX}{dead}-abc"));
        std::fs::create_dir(&left).unwrap();
        std::fs::write(left.join("engine.sock"), b"").unwrap();
        let live = parent.path().join(format!("{PRIVATE_DIR_PREFIX}1-abc"));
        std::fs::create_dir(&live).unwrap();
        let unrelated = parent.path().join("model-runtime-notes");
        std::fs::create_dir(&unrelated).unwrap();
        let ours = parent
            .path()
            .join(format!("{PRIVATE_DIR_PREFIX}{}-new", std::process::id()));
        std::fs::create_dir(&ours).unwrap();

        sweep_dead_owners(parent.path(), &ours);

        assert!(!left.exists(), "the dead owner's directory is removed");
        assert!(live.exists(), "a live process's directory is kept");
        assert!(unrelated.exists(), "a name not ours is kept");
        assert!(ours.exists(), "our own directory is kept");
    }
}
