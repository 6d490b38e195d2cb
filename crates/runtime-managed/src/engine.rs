//! What a server backend tells [`ManagedServer`](crate::ManagedServer) about its
//! engine: [`ServerEngine`], and the [`LaunchSpec`] of one start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{BackendOptions, Capabilities, ModelFormat, Result, RuntimeConfig};
use runtime_openai::OpenAiClient;
use runtime_process::{ServerCommand, StopPolicy};
use runtime_structured::Support;

/// Bound on one readiness or health probe.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything one start of the engine is built from: what
/// [`ServerEngine::command`] turns into a command line.
#[derive(Debug)]
#[non_exhaustive]
pub struct LaunchSpec<'a, O> {
    /// The engine binary (or interpreter).
    pub binary: &'a Path,
    /// The user's configuration.
    pub config: &'a RuntimeConfig,
    /// The backend's typed options, read from the configuration.
    pub options: &'a O,
    /// The port to listen on (never 0: chosen already), unless
    /// [`socket`](Self::socket) is set.
    pub port: u16,
    /// The Unix socket to listen on instead of `host:port`, for engines that
    /// [support one](ServerEngine::supports_unix_socket): a path in a
    /// directory only this process's user may enter.
    pub socket: Option<&'a Path>,
    /// The API key the engine must require. Engines take it from their
    /// environment, never from the command line, which other local users can
    /// read.
    pub api_key: &'a str,
    /// The name to serve the model under.
    pub model_name: &'a str,
}

impl<'a, O> LaunchSpec<'a, O> {
    /// The launch parameters; for engines' own tests of [`ServerEngine::command`].
    pub fn new(
        binary: &'a Path,
        config: &'a RuntimeConfig,
        options: &'a O,
        port: u16,
        api_key: &'a str,
        model_name: &'a str,
    ) -> Self {
        Self {
            binary,
            config,
            options,
            port,
            socket: None,
            api_key,
            model_name,
        }
    }

    /// Listens on the Unix socket at `socket` instead of a port.
    #[must_use]
    pub fn with_socket(mut self, socket: &'a Path) -> Self {
        self.socket = Some(socket);
        self
    }
}

/// One engine that runs as an OpenAI-compatible server process.
///
/// A backend crate implements it for a unit struct (`LlamaServer`) and exposes
/// `ManagedServer<ThatStruct>` as its runtime.
#[async_trait]
pub trait ServerEngine: Send + Sync + 'static {
    /// The engine's typed options, read strictly from
    /// [`RuntimeConfig::extra_config`].
    type Options: BackendOptions + Send + Sync;

    /// The process's name in logs and errors (`llama-server`).
    fn engine_name(&self) -> &'static str;

    /// The runtime's name in [`RuntimeMetadata`](runtime_core::RuntimeMetadata) (`llama.cpp`).
    fn runtime_name(&self) -> &'static str;

    /// The model format the engine takes.
    fn supported_format(&self) -> ModelFormat;

    /// Whether the engine can use a GPU.
    fn supports_gpu(&self) -> bool;

    /// Checks the configuration, the options and the model before anything is
    /// started.
    fn validate(&self, config: &RuntimeConfig, options: &Self::Options) -> Result<()>;

    /// Finds the binary to run.
    fn find_binary(&self, config: &RuntimeConfig) -> Result<PathBuf>;

    /// The engine's version from the binary, before it starts; `None` if the
    /// engine only reports it over HTTP ([`served_version`](Self::served_version)).
    /// Failing here also catches a binary that cannot run at all.
    async fn binary_version(&self, binary: &Path, config: &RuntimeConfig)
    -> Result<Option<String>>;

    /// The command line and environment for one start.
    fn command(&self, launch: &LaunchSpec<'_, Self::Options>) -> Result<ServerCommand>;

    /// How long startup may go without log progress when the config says nothing.
    fn default_startup_timeout(&self) -> Duration;

    /// Whether the engine can listen on a Unix socket ([`LaunchSpec::socket`]).
    /// Such an engine is run on a private socket, behind a listener of ours
    /// that requires its key on every route but `/health`: no other local
    /// user can reach the engine, whatever routes its own key guards.
    fn supports_unix_socket(&self) -> bool {
        false
    }

    /// How to stop the engine, given the configured grace period.
    fn stop_policy(&self, grace: Duration) -> StopPolicy {
        StopPolicy::new(grace)
    }

    /// Whether the engine's last log lines say its port was taken, so a fresh
    /// port is worth a retry.
    fn port_conflict(&self, log_tail: &[String]) -> bool;

    /// Whether the engine is ready; by default `GET /health` answers 200.
    async fn probe_ready(&self, client: &OpenAiClient) -> bool {
        client.is_healthy(PROBE_TIMEOUT).await
    }

    /// The version the running engine reports over HTTP (vLLM's `/version`).
    async fn served_version(&self, _client: &OpenAiClient) -> Result<String> {
        Ok(String::new())
    }

    /// The effective context size of the running engine, if it says.
    async fn context_size(&self, _client: &OpenAiClient) -> Option<u32> {
        None
    }

    /// The running engine's token ids for `text`
    /// ([`ModelRuntime::tokenize`](runtime_core::ModelRuntime::tokenize));
    /// the default answers [`Error::Unsupported`](runtime_core::Error::Unsupported).
    async fn tokenize(
        &self,
        _client: &OpenAiClient,
        _text: &str,
        _add_special: bool,
    ) -> runtime_core::Result<Vec<u32>> {
        Err(runtime_core::Error::unsupported(
            "tokenize",
            self.runtime_name(),
        ))
    }

    /// The text of the running engine's `tokens`; the default answers
    /// [`Error::Unsupported`](runtime_core::Error::Unsupported).
    async fn detokenize(
        &self,
        _client: &OpenAiClient,
        _tokens: &[u32],
    ) -> runtime_core::Result<String> {
        Err(runtime_core::Error::unsupported(
            "detokenize",
            self.runtime_name(),
        ))
    }

    /// Whether the engine continues a conversation's final assistant message
    /// only when told so in the request (vLLM's `continue_final_message`);
    /// the default, no, is for engines that do it by themselves
    /// (llama-server) or not at all.
    fn continues_final_message_when_told(&self) -> bool {
        false
    }

    /// Whether the engine's answer to a continued assistant message starts
    /// with that message's text (llama-server's does); the runtime then
    /// takes the text off, so the answer is the continuation alone, as it
    /// is on every engine.
    fn echoes_continued_message(&self) -> bool {
        false
    }

    /// What the running engine does for tools and schemas, and what the
    /// model accepts, derived from the engine and the model's template.
    /// `None`, the default, serves plain chat only: tools, schemas,
    /// log-probabilities and `n > 1` are refused by name.
    async fn structured(
        &self,
        _client: &OpenAiClient,
        _config: &RuntimeConfig,
        _options: &Self::Options,
    ) -> Option<(Support, Capabilities)> {
        None
    }
}
