//! What each backend looks like on this machine: [`survey`].

use std::path::PathBuf;

use runtime_core::RuntimeConfig;

use crate::Backend;

/// One backend as found on this machine, for `model-runtime backends`.
#[derive(Debug)]
#[non_exhaustive]
pub struct BackendReport {
    /// The backend.
    pub backend: Backend,
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

impl BackendReport {
    fn new(backend: Backend, formats: &'static str) -> Self {
        Self {
            backend,
            usable: false,
            binary: None,
            version: None,
            formats,
            note: String::new(),
        }
    }
}

/// Whether a server engine is installed here and runs.
#[cfg(any(feature = "llamacpp", feature = "vllm"))]
async fn server_report(
    engine: &impl runtime_managed::ServerEngine,
    mut report: BackendReport,
    config: &RuntimeConfig,
) -> BackendReport {
    let binary = match engine.find_binary(config) {
        Ok(binary) => binary,
        Err(err) => {
            report.note = err.to_string();
            return report;
        }
    };
    match engine.binary_version(&binary, config).await {
        Ok(version) => {
            report.usable = true;
            if version.is_none() {
                report.note = "version is read from the running server".to_owned();
            }
            report.version = version;
        }
        Err(err) => report.note = format!("{} does not run: {err}", engine.engine_name()),
    }
    report.binary = Some(binary);
    report
}

/// What each backend looks like on this machine.
#[cfg_attr(
    not(any(feature = "llamacpp", feature = "vllm")),
    allow(unused_variables)
)]
pub async fn survey() -> Vec<BackendReport> {
    let config = RuntimeConfig::default();
    let mut reports = Vec::new();
    for backend in Backend::ALL {
        let report = match backend {
            Backend::LlamaCpp => BackendReport::new(backend, "GGUF"),
            Backend::Vllm => BackendReport::new(backend, "Hugging Face safetensors directories"),
            Backend::Candle => BackendReport::new(
                backend,
                "GGUF (llama architecture), Hugging Face safetensors directories",
            ),
            Backend::Remote => BackendReport::new(backend, "whatever the server's engine takes"),
        };
        let report = match backend {
            #[cfg(feature = "llamacpp")]
            Backend::LlamaCpp => {
                server_report(&runtime_llamacpp::LlamaServer, report, &config).await
            }
            #[cfg(feature = "vllm")]
            Backend::Vllm => server_report(&runtime_vllm::VllmServer, report, &config).await,
            #[cfg(feature = "candle")]
            Backend::Candle => BackendReport {
                usable: true,
                version: Some(format!("candle {}", runtime_candle::ENGINE_VERSION)),
                note: "embedded, no engine binary needed".to_owned(),
                ..report
            },
            #[cfg(feature = "remote")]
            Backend::Remote => BackendReport {
                usable: true,
                note: "attaches to an OpenAI-compatible server given by URL".to_owned(),
                ..report
            },
            #[allow(unreachable_patterns)]
            _ => BackendReport {
                note: format!("not in this build (the `{backend}` feature of runtime-gateway)"),
                ..report
            },
        };
        reports.push(report);
    }
    reports
}
