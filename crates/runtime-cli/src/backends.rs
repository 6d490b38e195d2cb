//! Which backends exist, which are usable here, and picking one for a model.

use std::fmt;
use std::path::PathBuf;

use runtime_candle::CandleRuntime;
use runtime_core::{Error, ModelFormat, ModelRuntime, Result, RuntimeConfig};
use runtime_llamacpp::{LlamaCppRuntime, LlamaServer};
use runtime_openai::ServerEngine;
use runtime_vllm::{VllmRuntime, VllmServer};

use crate::manager::RuntimeFactory;

/// What the user asked for with `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// Pick by the model's format and what is installed.
    #[default]
    Auto,
    /// llama.cpp's llama-server.
    Llamacpp,
    /// vLLM's OpenAI server.
    Vllm,
    /// The embedded candle engine.
    Candle,
}

/// A backend this build can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// llama.cpp's llama-server.
    LlamaCpp,
    /// vLLM's OpenAI server.
    Vllm,
    /// The embedded candle engine.
    Candle,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LlamaCpp => "llamacpp",
            Self::Vllm => "vllm",
            Self::Candle => "candle",
        })
    }
}

impl Backend {
    /// A fresh runtime of this backend.
    pub fn runtime(self) -> Box<dyn ModelRuntime> {
        match self {
            Self::LlamaCpp => Box::new(LlamaCppRuntime::new()),
            Self::Vllm => Box::new(VllmRuntime::new()),
            Self::Candle => Box::new(CandleRuntime::new()),
        }
    }
}

/// The backend for `config` under `choice`, and a sentence saying why.
pub fn choose(choice: BackendChoice, config: &RuntimeConfig) -> Result<(Backend, String)> {
    match choice {
        BackendChoice::Llamacpp => Ok((Backend::LlamaCpp, "as asked".to_owned())),
        BackendChoice::Candle => Ok((Backend::Candle, "as asked".to_owned())),
        BackendChoice::Vllm => Ok((Backend::Vllm, "as asked".to_owned())),
        BackendChoice::Auto => {
            let format = config.resolve_format()?;
            match format {
                ModelFormat::Gguf => Ok(server_or_embedded(
                    &LlamaServer,
                    Backend::LlamaCpp,
                    ("GGUF model", "llama-server"),
                    config,
                )),
                ModelFormat::Safetensors => Ok(server_or_embedded(
                    &VllmServer,
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
    }
}

/// `backend` when its engine is installed, else the embedded engine; with the
/// reason, naming the model kind and the engine as `(model, engine)` say.
fn server_or_embedded(
    engine: &impl ServerEngine,
    backend: Backend,
    (model, name): (&str, &str),
    config: &RuntimeConfig,
) -> (Backend, String) {
    match engine.find_binary(config) {
        Ok(binary) => (
            backend,
            format!("{model} and {name} found at {}", binary.display()),
        ),
        Err(_) => (
            Backend::Candle,
            format!("{model} and no {name} installed: using the embedded engine"),
        ),
    }
}

/// A factory that builds the backend `choice` picks for each configuration.
pub fn factory(choice: BackendChoice) -> RuntimeFactory {
    Box::new(move |config| {
        let (backend, why) = choose(choice, config)?;
        tracing::info!(%backend, why, "backend chosen");
        Ok(backend.runtime())
    })
}

/// One line of `model-runtime backends`.
#[derive(Debug)]
pub struct BackendReport {
    /// The backend's name for `--backend`.
    pub name: &'static str,
    /// Whether it can run here.
    pub usable: bool,
    /// The engine binary found, for server backends.
    pub binary: Option<PathBuf>,
    /// The engine's version, as it reports it.
    pub version: Option<String>,
    /// The model formats it takes.
    pub formats: &'static str,
    /// Why it is not usable, or other remarks.
    pub note: String,
}

/// Whether a server engine is installed here and runs.
async fn server_report(
    engine: &impl ServerEngine,
    name: &'static str,
    formats: &'static str,
    config: &RuntimeConfig,
) -> BackendReport {
    let report = BackendReport {
        name,
        usable: false,
        binary: None,
        version: None,
        formats,
        note: String::new(),
    };
    let binary = match engine.find_binary(config) {
        Ok(binary) => binary,
        Err(err) => {
            return BackendReport {
                note: err.to_string(),
                ..report
            };
        }
    };
    match engine.binary_version(&binary, config).await {
        Ok(version) => BackendReport {
            usable: true,
            note: if version.is_none() {
                "version is read from the running server".to_owned()
            } else {
                String::new()
            },
            binary: Some(binary),
            version,
            ..report
        },
        Err(err) => BackendReport {
            note: format!("{} does not run: {err}", engine.engine_name()),
            binary: Some(binary),
            ..report
        },
    }
}

/// What each backend looks like on this machine.
pub async fn survey() -> Vec<BackendReport> {
    let config = RuntimeConfig::default();
    vec![
        server_report(&LlamaServer, "llamacpp", "GGUF", &config).await,
        server_report(
            &VllmServer,
            "vllm",
            "Hugging Face safetensors directories",
            &config,
        )
        .await,
        BackendReport {
            name: "candle",
            usable: true,
            binary: None,
            version: Some(format!("candle {}", runtime_candle::ENGINE_VERSION)),
            formats: "GGUF (llama architecture), Hugging Face safetensors directories",
            note: "embedded, no engine binary needed".to_owned(),
        },
    ]
}
