//! Which backends exist, and picking one for a model.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use runtime_core::{Error, ModelFormat, ModelRuntime, Result, RuntimeConfig};
use serde::{Deserialize, Serialize};

/// A backend of model-runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Backend {
    /// llama.cpp's llama-server (`runtime-llamacpp`).
    #[serde(rename = "llamacpp")]
    LlamaCpp,
    /// vLLM's OpenAI server (`runtime-vllm`).
    #[serde(rename = "vllm")]
    Vllm,
    /// The embedded candle engine (`runtime-candle`).
    #[serde(rename = "candle")]
    Candle,
    /// An OpenAI-compatible server run elsewhere (`runtime-remote`); the
    /// model's path is the server's URL.
    #[serde(rename = "remote")]
    Remote,
}

/// Which backend runs a model: one by name, or [`Auto`](Self::Auto).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BackendChoice {
    /// Pick by the model's format and what is installed ([`choose`]).
    #[default]
    Auto,
    /// llama.cpp's llama-server.
    #[serde(rename = "llamacpp")]
    LlamaCpp,
    /// vLLM's OpenAI server.
    Vllm,
    /// The embedded candle engine.
    Candle,
    /// A server run elsewhere.
    Remote,
}

/// Whether a model's "path" is a server's URL (a model served elsewhere,
/// for the [`Remote`](Backend::Remote) backend).
pub fn is_url(path: &std::path::Path) -> bool {
    path.to_str()
        .is_some_and(|p| p.starts_with("http://") || p.starts_with("https://"))
}

impl Backend {
    /// Every backend, in the order `model-runtime backends` lists them.
    pub const ALL: [Backend; 4] = [Self::LlamaCpp, Self::Vllm, Self::Candle, Self::Remote];

    /// The name used on the command line and in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            Self::LlamaCpp => "llamacpp",
            Self::Vllm => "vllm",
            Self::Candle => "candle",
            Self::Remote => "remote",
        }
    }

    /// A fresh, uninitialized runtime of this backend, or an error if this
    /// build of the gateway was compiled without it.
    pub fn runtime(self) -> Result<Box<dyn ModelRuntime>> {
        match self {
            #[cfg(feature = "llamacpp")]
            Self::LlamaCpp => Ok(Box::new(runtime_llamacpp::LlamaCppRuntime::new())),
            #[cfg(feature = "vllm")]
            Self::Vllm => Ok(Box::new(runtime_vllm::VllmRuntime::new())),
            #[cfg(feature = "candle")]
            Self::Candle => Ok(Box::new(runtime_candle::CandleRuntime::new())),
            #[cfg(feature = "remote")]
            Self::Remote => Ok(Box::new(runtime_remote::RemoteRuntime::new())),
            #[allow(unreachable_patterns)]
            other => Err(Error::invalid_config(
                "backend",
                format!(
                    "is {other}, which this build does not include; enable the \
                     `{other}` feature of model-runtime"
                ),
            )),
        }
    }
}

impl Backend {
    /// Reads `config`'s backend options as this backend would at `initialize`,
    /// so a bad key is refused before anything starts.
    pub fn check_options(self, config: &RuntimeConfig) -> Result<()> {
        match self {
            #[cfg(feature = "llamacpp")]
            Self::LlamaCpp => config
                .options::<runtime_llamacpp::LlamaCppOptions>()
                .map(drop),
            #[cfg(feature = "vllm")]
            Self::Vllm => config.options::<runtime_vllm::VllmOptions>().map(drop),
            #[cfg(feature = "candle")]
            Self::Candle => config.options::<runtime_candle::CandleOptions>().map(drop),
            #[cfg(feature = "remote")]
            Self::Remote => config.options::<runtime_remote::RemoteOptions>().map(drop),
            #[allow(unreachable_patterns)]
            _ => self.runtime().map(drop),
        }
    }
}

impl BackendChoice {
    /// The backend named, or `None` for [`Auto`](Self::Auto).
    pub fn backend(self) -> Option<Backend> {
        match self {
            Self::Auto => None,
            Self::LlamaCpp => Some(Backend::LlamaCpp),
            Self::Vllm => Some(Backend::Vllm),
            Self::Candle => Some(Backend::Candle),
            Self::Remote => Some(Backend::Remote),
        }
    }
}

impl From<Backend> for BackendChoice {
    /// That backend, as asked (no choosing left to do).
    fn from(backend: Backend) -> Self {
        match backend {
            Backend::LlamaCpp => Self::LlamaCpp,
            Backend::Vllm => Self::Vllm,
            Backend::Candle => Self::Candle,
            Backend::Remote => Self::Remote,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.backend() {
            Some(backend) => backend.fmt(f),
            None => f.write_str("auto"),
        }
    }
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name {
            "auto" => Ok(Self::Auto),
            "llamacpp" => Ok(Self::LlamaCpp),
            "vllm" => Ok(Self::Vllm),
            "candle" => Ok(Self::Candle),
            "remote" => Ok(Self::Remote),
            other => Err(format!(
                "unknown backend `{other}`; use auto, llamacpp, vllm, candle or remote"
            )),
        }
    }
}

/// The backend for `config` under `choice`, and a sentence saying why.
///
/// `Auto` takes llama.cpp for a GGUF and vLLM for a Hugging Face directory
/// when their engine is installed, else the embedded candle engine.
pub fn choose(choice: BackendChoice, config: &RuntimeConfig) -> Result<(Backend, String)> {
    if let Some(backend) = choice.backend() {
        return Ok((backend, "as asked".to_owned()));
    }
    if is_url(&config.model_path) {
        return Ok((Backend::Remote, "a server's URL".to_owned()));
    }
    match config.resolve_format()? {
        ModelFormat::Gguf => Ok(server_or_embedded(
            Backend::LlamaCpp,
            ("GGUF model", "llama-server"),
            config,
        )),
        ModelFormat::Safetensors => Ok(server_or_embedded(
            Backend::Vllm,
            ("Hugging Face model", "vLLM"),
            config,
        )),
        other => Err(Error::UnsupportedFormat {
            backend: "any backend of model-runtime",
            expected: "GGUF or a Hugging Face safetensors directory".to_owned(),
            found: other.name().to_owned(),
        }),
    }
}

/// Chooses the backend for `config` ([`choose`] with
/// [`BackendChoice::Auto`]), starts it and returns the running runtime with
/// the backend that runs it. Nothing is left running if initialization
/// fails.
pub async fn start(config: RuntimeConfig) -> Result<(Box<dyn ModelRuntime>, Backend)> {
    let (backend, why) = choose(BackendChoice::Auto, &config)?;
    tracing::info!(%backend, why, "chose the backend");
    let mut runtime = backend.runtime()?;
    runtime.initialize(config).await?;
    Ok((runtime, backend))
}

/// `backend` when its engine is installed, else the embedded engine; with the
/// reason, which names the kind of model and the engine (`model`, `name`).
fn server_or_embedded(
    backend: Backend,
    (model, name): (&str, &str),
    config: &RuntimeConfig,
) -> (Backend, String) {
    match find_engine(backend, config) {
        Some(Ok(binary)) => (
            backend,
            format!("{model} and {name} found at {}", binary.display()),
        ),
        _ => (
            Backend::Candle,
            format!("{model} and no {name} installed: using the embedded engine"),
        ),
    }
}

/// The engine binary of a server backend, if this build includes it.
#[cfg_attr(
    not(any(feature = "llamacpp", feature = "vllm")),
    allow(unused_variables)
)]
fn find_engine(backend: Backend, config: &RuntimeConfig) -> Option<Result<PathBuf>> {
    match backend {
        #[cfg(feature = "llamacpp")]
        Backend::LlamaCpp => Some(runtime_managed::ServerEngine::find_binary(
            &runtime_llamacpp::LlamaServer,
            config,
        )),
        #[cfg(feature = "vllm")]
        Backend::Vllm => Some(runtime_managed::ServerEngine::find_binary(
            &runtime_vllm::VllmServer,
            config,
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_by_their_configuration_names() {
        for name in ["auto", "llamacpp", "vllm", "candle", "remote"] {
            let choice: BackendChoice = name.parse().unwrap();
            assert_eq!(choice.to_string(), name);
            let json = serde_json::to_value(choice).unwrap();
            assert_eq!(json, name);
        }
        assert!("llama.cpp".parse::<BackendChoice>().is_err());
        assert_eq!(BackendChoice::LlamaCpp.backend(), Some(Backend::LlamaCpp));
        assert_eq!(BackendChoice::from(Backend::Vllm), BackendChoice::Vllm);
    }

    #[test]
    fn a_named_backend_is_chosen_as_asked() {
        let config = RuntimeConfig::new("/nonexistent.gguf");
        let (backend, why) = choose(BackendChoice::Candle, &config).unwrap();
        assert_eq!(backend, Backend::Candle);
        assert_eq!(why, "as asked");
        assert!(matches!(
            choose(BackendChoice::Auto, &config),
            Err(Error::ModelNotFound { .. })
        ));
    }
}
