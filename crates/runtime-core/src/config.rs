//! How a runtime is started: [`RuntimeConfig`].

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::options::{self, BackendOptions};
use crate::{ApiKey, Error, ModelFormat, Result};

/// The longest [`RuntimeConfig::startup_timeout`] accepted: a day.
pub const MAX_STARTUP_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The longest [`RuntimeConfig::shutdown_grace`] accepted: an hour.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);
/// The most requests served at once ([`RuntimeConfig::parallel`]) accepted.
pub const MAX_PARALLEL: u32 = 1024;
/// The most CPU threads ([`RuntimeConfig::threads`]) accepted.
pub const MAX_THREADS: u32 = 1024;
/// Requests served at once when [`RuntimeConfig::parallel`] is unset, by
/// the engines of ours (candle's slots, a gateway's model); llama.cpp and
/// vLLM keep their own defaults.
pub const DEFAULT_PARALLEL: u32 = 4;
/// The most requests that may wait for one engine or model, wherever a
/// queue length is configured.
pub const MAX_QUEUE: u32 = 4096;
/// Requests that may wait for one engine or model when no queue length is
/// configured.
pub const DEFAULT_QUEUE: u32 = 16;

/// Everything a backend needs to start its engine and load a model.
///
/// Build one with [`RuntimeConfig::new`] and adjust fields or use the `with_*`
/// methods. Fields left at `None` take the backend's default, which each backend
/// documents.
///
/// ```
/// use std::time::Duration;
/// use runtime_core::RuntimeConfig;
///
/// let config = RuntimeConfig::new("models/smollm2.gguf")
///     .with_port(0) // pick a free port
///     .with_context_size(2048)
///     .with_startup_timeout(Duration::from_secs(30));
/// assert_eq!(config.host, "127.0.0.1");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RuntimeConfig {
    /// The model: a file (GGUF) or a directory (Hugging Face safetensors).
    pub model_path: PathBuf,
    /// The model's format; `None` detects it from content with [`ModelFormat::detect`].
    pub format: Option<ModelFormat>,
    /// The address the engine listens on. Defaults to loopback, `127.0.0.1`.
    pub host: String,
    /// The port the engine listens on; `0` picks a free one.
    pub port: u16,
    /// Context window in tokens.
    pub context_size: Option<u32>,
    /// Prompt-processing batch size in tokens.
    pub batch_size: Option<u32>,
    /// CPU threads for generation.
    pub threads: Option<u32>,
    /// Layers to offload to the GPU (`0` = CPU only).
    pub gpu_layers: Option<u32>,
    /// Requests served concurrently (llama.cpp's slots, candle's workers).
    pub parallel: Option<u32>,
    /// An explicit engine binary; otherwise each backend looks for its own.
    pub runtime_binary: Option<PathBuf>,
    /// The name the model is served under at `/v1/models`; defaults to the file name.
    pub served_model_name: Option<String>,
    /// How long [`initialize`](crate::ModelRuntime::initialize) waits for the engine
    /// while its log shows no progress. `None` uses the backend's default.
    #[serde(with = "crate::duration::serde::optional")]
    pub startup_timeout: Option<Duration>,
    /// How long [`shutdown`](crate::ModelRuntime::shutdown) waits after SIGTERM
    /// before SIGKILL.
    #[serde(with = "crate::duration::serde")]
    pub shutdown_grace: Duration,
    /// How long a server engine may leave its health probe unanswered while
    /// requests wait on it before they fail with
    /// [`Error::EngineUnresponsive`] (default 15 s). A slow engine (a long
    /// prefill sends no bytes) still answers the probe and is left alone; a
    /// hung or stopped one does not.
    #[serde(with = "crate::duration::serde")]
    pub hang_timeout: Duration,
    /// The backstop: how long a response may send no bytes at all (not even a
    /// keep-alive) before it fails (default 300 s).
    #[serde(with = "crate::duration::serde")]
    pub idle_timeout: Duration,
    /// The API key clients must send. Server backends generate a random one per
    /// instance when this is `None`, so other local users cannot use the engine.
    pub api_key: Option<ApiKey>,
    /// A Jinja chat template that replaces the model's own, for a model
    /// whose template knows no tools (or has none). The file must exist;
    /// every backend renders chat with it.
    pub chat_template: Option<PathBuf>,
    /// Extra command-line arguments appended to the engine's command line.
    pub extra_args: Vec<String>,
    /// Extra environment variables for the engine process.
    pub env: BTreeMap<String, String>,
    /// Backend-specific settings: the fields of the backend's
    /// [`BackendOptions`] struct (for example vLLM's `tensor_parallel_size`).
    /// Set them from code with [`with_options`](Self::with_options); an
    /// unknown key or a value of the wrong type fails `initialize` before
    /// anything starts.
    pub extra_config: BTreeMap<String, serde_json::Value>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::new(),
            format: None,
            host: "127.0.0.1".to_owned(),
            port: 0,
            context_size: None,
            batch_size: None,
            threads: None,
            gpu_layers: None,
            parallel: None,
            runtime_binary: None,
            served_model_name: None,
            startup_timeout: None,
            shutdown_grace: Duration::from_secs(5),
            hang_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(300),
            api_key: None,
            chat_template: None,
            extra_args: Vec::new(),
            env: BTreeMap::new(),
            extra_config: BTreeMap::new(),
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident => $field:ident: $ty:ty = $wrap:expr;)*) => {
        $(
            $(#[$doc])*
            #[must_use]
            pub fn $name(mut self, value: $ty) -> Self {
                #[allow(clippy::redundant_closure_call)]
                { self.$field = ($wrap)(value); }
                self
            }
        )*
    };
}

impl RuntimeConfig {
    /// A configuration with defaults for the model at `model_path`.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            ..Self::default()
        }
    }

    setters! {
        /// Sets [`format`](Self::format).
        with_format => format: ModelFormat = Some;
        /// Sets [`port`](Self::port).
        with_port => port: u16 = |v| v;
        /// Sets [`context_size`](Self::context_size).
        with_context_size => context_size: u32 = Some;
        /// Sets [`batch_size`](Self::batch_size).
        with_batch_size => batch_size: u32 = Some;
        /// Sets [`threads`](Self::threads).
        with_threads => threads: u32 = Some;
        /// Sets [`gpu_layers`](Self::gpu_layers).
        with_gpu_layers => gpu_layers: u32 = Some;
        /// Sets [`parallel`](Self::parallel).
        with_parallel => parallel: u32 = Some;
        /// Sets [`startup_timeout`](Self::startup_timeout).
        with_startup_timeout => startup_timeout: Duration = Some;
        /// Sets [`shutdown_grace`](Self::shutdown_grace).
        with_shutdown_grace => shutdown_grace: Duration = |v| v;
        /// Sets [`hang_timeout`](Self::hang_timeout).
        with_hang_timeout => hang_timeout: Duration = |v| v;
        /// Sets [`idle_timeout`](Self::idle_timeout).
        with_idle_timeout => idle_timeout: Duration = |v| v;
    }

    /// Sets [`host`](Self::host).
    #[must_use]
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Sets [`runtime_binary`](Self::runtime_binary).
    #[must_use]
    pub fn with_runtime_binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.runtime_binary = Some(binary.into());
        self
    }

    /// Sets [`api_key`](Self::api_key).
    #[must_use]
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(ApiKey::new(key));
        self
    }

    /// Sets [`served_model_name`](Self::served_model_name).
    #[must_use]
    pub fn with_served_model_name(mut self, name: impl Into<String>) -> Self {
        self.served_model_name = Some(name.into());
        self
    }

    /// Sets [`chat_template`](Self::chat_template).
    #[must_use]
    pub fn with_chat_template(mut self, template: impl Into<PathBuf>) -> Self {
        self.chat_template = Some(template.into());
        self
    }

    /// The [`chat_template`](Self::chat_template) file's text, read now: a
    /// missing or unreadable file is a config error naming it.
    pub fn read_chat_template(&self) -> Result<Option<String>> {
        let Some(path) = &self.chat_template else {
            return Ok(None);
        };
        std::fs::read_to_string(path).map(Some).map_err(|err| {
            Error::invalid_config(
                "chat_template",
                format!(
                    "{} cannot be read ({err}); point it at a Jinja template file",
                    path.display()
                ),
            )
        })
    }

    /// Appends one argument to [`extra_args`](Self::extra_args).
    #[must_use]
    pub fn with_extra_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Adds one variable to [`env`](Self::env).
    #[must_use]
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Adds one backend-specific setting to [`extra_config`](Self::extra_config).
    #[must_use]
    pub fn with_extra_config(
        mut self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.extra_config.insert(key.into(), value.into());
        self
    }

    /// Sets the backend's typed options: every field that is set becomes an
    /// [`extra_config`](Self::extra_config) entry (replacing one of the same key).
    ///
    /// ```
    /// # use runtime_core::{BackendOptions, RuntimeConfig};
    /// # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
    /// # #[serde(default)]
    /// # struct EngineOptions { #[serde(skip_serializing_if = "Option::is_none")] queue: Option<u32> }
    /// # impl BackendOptions for EngineOptions { const BACKEND: &'static str = "engine"; }
    /// let config = RuntimeConfig::new("m.gguf").with_options(&EngineOptions { queue: Some(8) });
    /// assert_eq!(config.extra_config["queue"], 8);
    /// assert_eq!(config.options::<EngineOptions>().unwrap().queue, Some(8));
    /// ```
    #[must_use]
    pub fn with_options<O: BackendOptions>(mut self, options: &O) -> Self {
        self.extra_config.extend(options::to_entries(options));
        self
    }

    /// The backend's typed options, read from [`extra_config`](Self::extra_config).
    ///
    /// Fails with [`Error::InvalidConfig`] on a key `O` does not have (naming
    /// the known keys and the closest one) or a value of the wrong type.
    pub fn options<O: BackendOptions>(&self) -> Result<O> {
        options::parse(&self.extra_config)
    }

    /// The name to serve the model under: [`served_model_name`](Self::served_model_name)
    /// or the model's file name without extension.
    pub fn model_name(&self) -> String {
        if let Some(name) = &self.served_model_name {
            return name.clone();
        }
        self.model_path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".to_owned())
    }

    /// The model's format: [`format`](Self::format) if set, else detected from content.
    pub fn resolve_format(&self) -> Result<ModelFormat> {
        match self.format {
            Some(format) => {
                if !self.model_path.exists() {
                    return Err(Error::ModelNotFound {
                        path: self.model_path.clone(),
                    });
                }
                Ok(format)
            }
            None => ModelFormat::detect(&self.model_path),
        }
    }

    /// Checks the fields every backend relies on: a model path, a host, positive sizes.
    pub fn validate(&self) -> Result<()> {
        if self.model_path.as_os_str().is_empty() {
            return Err(Error::invalid_config("model_path", "is empty"));
        }
        if self.host.trim().is_empty() {
            return Err(Error::invalid_config(
                "host",
                "is empty; use 127.0.0.1 for loopback",
            ));
        }
        if let Some(template) = &self.chat_template
            && !template.is_file()
        {
            return Err(Error::invalid_config(
                "chat_template",
                format!(
                    "{} is not a file; point it at a Jinja template file",
                    template.display()
                ),
            ));
        }
        for (field, value) in [
            ("context_size", self.context_size),
            ("batch_size", self.batch_size),
            ("threads", self.threads),
            ("parallel", self.parallel),
        ] {
            if value == Some(0) {
                return Err(Error::invalid_config(
                    field,
                    "must be at least 1 (leave it unset for the default)",
                ));
            }
        }
        if let Some(threads) = self.threads
            && threads > MAX_THREADS
        {
            return Err(Error::invalid_config(
                "threads",
                format!("is {threads}; it must be between 1 and {MAX_THREADS}"),
            ));
        }
        if let Some(parallel) = self.parallel
            && parallel > MAX_PARALLEL
        {
            return Err(Error::invalid_config(
                "parallel",
                format!("is {parallel}; at most {MAX_PARALLEL} requests can be served at once"),
            ));
        }
        const SHORTEST: Duration = Duration::from_millis(100);
        if let Some(timeout) = self.startup_timeout {
            within("startup_timeout", timeout, SHORTEST..=MAX_STARTUP_TIMEOUT)?;
        }
        within(
            "shutdown_grace",
            self.shutdown_grace,
            Duration::ZERO..=MAX_SHUTDOWN_GRACE,
        )?;
        within(
            "hang_timeout",
            self.hang_timeout,
            SHORTEST..=MAX_STARTUP_TIMEOUT,
        )?;
        within(
            "idle_timeout",
            self.idle_timeout,
            SHORTEST..=MAX_STARTUP_TIMEOUT,
        )?;
        if self
            .api_key
            .as_ref()
            .is_some_and(|key| key.expose().is_empty())
        {
            return Err(Error::invalid_config(
                "api_key",
                "is empty; leave it unset to get a random key",
            ));
        }
        Ok(())
    }
}

/// `value` of `field` must lie in `range`.
fn within(field: &'static str, value: Duration, range: RangeInclusive<Duration>) -> Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    let secs = |d: &Duration| format!("{} s", d.as_secs_f64());
    Err(Error::invalid_config(
        field,
        format!(
            "is {}; it must be between {} and {}",
            secs(&value),
            secs(range.start()),
            secs(range.end())
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_bind_loopback_and_pick_a_free_port() {
        let config = RuntimeConfig::new("m.gguf");
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.port, 0);
        assert_eq!(config.model_name(), "m");
        config.validate().expect("defaults are valid");
    }

    #[test]
    fn zero_sizes_are_rejected_by_name() {
        let err = RuntimeConfig::new("m.gguf")
            .with_context_size(0)
            .validate()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { field, .. } if field == "context_size"));
    }

    #[test]
    fn durations_and_sizes_past_their_limits_are_typed_errors() {
        let near_max = RuntimeConfig::new("m.gguf").with_startup_timeout(Duration::MAX);
        let err = near_max.validate().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { field, .. } if field == "startup_timeout"),
            "{err}"
        );
        for config in [
            RuntimeConfig::new("m.gguf").with_startup_timeout(Duration::ZERO),
            RuntimeConfig::new("m.gguf").with_shutdown_grace(Duration::from_secs(u64::MAX)),
            RuntimeConfig::new("m.gguf").with_hang_timeout(Duration::ZERO),
            RuntimeConfig::new("m.gguf").with_idle_timeout(Duration::MAX),
            RuntimeConfig::new("m.gguf").with_parallel(u32::MAX),
        ] {
            assert!(
                matches!(config.validate(), Err(Error::InvalidConfig { .. })),
                "{config:?}"
            );
        }
    }

    #[test]
    fn debug_output_never_shows_the_api_key() {
        let config = RuntimeConfig::new("m.gguf").with_api_key("s3cret-key");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret-key"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn config_round_trips_through_json_with_durations_spelled_with_units() {
        let config = RuntimeConfig::new("m.gguf")
            .with_startup_timeout(Duration::from_millis(1500))
            .with_env("A", "b")
            .with_extra_config("tensor_parallel_size", 2);
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["startup_timeout"], "1500ms");
        assert_eq!(json["shutdown_grace"], "5s");
        let back: RuntimeConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn partial_json_fills_in_defaults() {
        let config: RuntimeConfig = serde_json::from_str(r#"{"model_path":"x.gguf"}"#).unwrap();
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));
    }
}
