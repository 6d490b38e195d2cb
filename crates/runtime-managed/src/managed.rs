//! [`ManagedServer`]: a [`ModelRuntime`] for any engine that is a server process
//! speaking the OpenAI API, described by a [`ServerEngine`].

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use runtime_core::{
    ApiKey, Error, EventStream, InferenceRequest, InferenceResponse, ModelFormat, ModelRuntime,
    Result, RuntimeConfig, RuntimeMetadata, StreamEvent, TextStream, text_deltas,
};
use runtime_openai::{ClientTimeouts, Heartbeat, OpenAiClient, http_base_url, random_api_key};
use runtime_process::{ServerProcess, StopPolicy, free_port};

use crate::engine::PROBE_TIMEOUT;
use crate::{LaunchSpec, ServerEngine};

/// How long a broken connection waits for the exit watcher before it is
/// reported as a transport error rather than as the engine's exit.
const EXIT_CONFIRMATION: Duration = Duration::from_millis(500);
/// Attempts at a fresh port when the engine reports the address in use.
const PORT_ATTEMPTS: usize = 3;

/// A running engine and what is known about it.
#[derive(Debug)]
struct Running {
    process: Arc<ServerProcess>,
    client: OpenAiClient,
    api_key: ApiKey,
    format: ModelFormat,
    version: String,
    context_size: Option<u32>,
    stop_policy: StopPolicy,
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

        let mut attempt = 0;
        let (process, client) = loop {
            attempt += 1;
            let port = match config.port {
                0 => free_port(&config.host)?,
                port => port,
            };
            let launch = LaunchSpec::new(
                &binary,
                config,
                &options,
                port,
                api_key.expose(),
                &model_name,
            );
            let command = self.engine.command(&launch)?;
            let process = ServerProcess::spawn(&command)?;
            let client = OpenAiClient::new(
                http_base_url(&config.host, port),
                Some(api_key.clone()),
                Some(model_name.clone()),
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
            api_key,
            format,
            version,
            context_size,
            stop_policy,
        })
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
            .map(|running| running.client.base_url().to_owned())
            .unwrap_or_default()
    }

    fn api_key(&self) -> Option<ApiKey> {
        self.running.as_ref().map(|running| running.api_key.clone())
    }

    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse> {
        request.validate()?;
        let running = self.running()?;
        match running.client.chat(&request).await {
            Ok(response) => Ok(response),
            Err(err) => Err(attribute_to_exit(&running.process, err).await),
        }
    }

    async fn generate_stream(&self, request: InferenceRequest) -> Result<TextStream> {
        Ok(text_deltas(self.generate_events(request).await?))
    }

    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream> {
        request.validate()?;
        let running = self.running()?;
        let events = match running.client.chat_stream(&request).await {
            Ok(events) => events,
            Err(err) => return Err(attribute_to_exit(&running.process, err).await),
        };
        let supervised = Supervised {
            events,
            // Weak: an abandoned stream must not keep a dropped runtime's engine alive.
            process: Arc::downgrade(&running.process),
            done: false,
        };
        Ok(Box::new(
            futures::stream::unfold(supervised, Supervised::next).boxed(),
        ))
    }

    async fn shutdown(&mut self) -> Result<()> {
        if let Some(running) = self.running.take() {
            let Running {
                process,
                client,
                stop_policy,
                ..
            } = running;
            // Close our open streams first (they end with ShutDown):
            // llama-server waits for open connections before it exits.
            client.close_streams();
            drop(client);
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
        let (format, version, context_size) = match &self.running {
            Some(running) => (
                running.format,
                running.version.clone(),
                running.context_size,
            ),
            None => (self.engine.supported_format(), String::new(), None),
        };
        RuntimeMetadata::new(format, self.engine.runtime_name(), version)
            .with_gpu(self.engine.supports_gpu())
            .with_context_size(context_size)
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
