//! What a gateway serves: [`GatewayConfig`], usually read from a TOML file
//! ([`GatewayConfig::from_file`]).
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! max_loaded = 2
//! memory_budget = "4GiB"
//!
//! [[models]]
//! name = "smollm2"
//! aliases = ["smol"]
//! path = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! backend = "llamacpp"
//! context_size = 2048
//! parallel = 2
//! queue = 16
//! ttl = "5m"
//! options = { flash_attention = "on" }
//! ```
//!
//! Unknown keys and bad values are refused when the file is read, naming the
//! file, the key and the reason; each model's backend options are checked by
//! that backend, as `initialize` would.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runtime_core::{
    ApiKey, DEFAULT_PARALLEL, DEFAULT_QUEUE, Error, MAX_PARALLEL, MAX_QUEUE, Result, RuntimeConfig,
};
use serde::{Deserialize, Deserializer};

use model_runtime::{Backend, BackendChoice, choose};

/// The gateway's settings and the models it serves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// Where `model-runtime serve --config` listens (default `127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer tokens clients may send; none means no key is required (only
    /// allowed on loopback unless `allow_unauthenticated`).
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// Bearer tokens for the admin routes (`/status`, `/metrics`, `POST
    /// /reload`); none means those answer loopback clients only. An admin
    /// key is not a client key.
    #[serde(default)]
    pub admin_keys: Vec<ApiKey>,
    /// Listen on a non-loopback address without a key.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// The most models loaded at once (default: no limit).
    #[serde(default)]
    pub max_loaded: Option<usize>,
    /// The most memory the loaded models may hold together, in bytes (`"4GiB"`
    /// or a number): starting one past it unloads the least recently used
    /// idle model first.
    #[serde(default, deserialize_with = "bytes::optional")]
    pub memory_budget: Option<u64>,
    /// How long a request may wait for a free slot of its model (default 60 s).
    #[serde(
        default = "default_queue_timeout",
        with = "runtime_core::duration::serde"
    )]
    pub queue_timeout: Duration,
    /// How long a model that is removed or replaced may take to finish its
    /// requests (default 30 s).
    #[serde(
        default = "default_drain_timeout",
        with = "runtime_core::duration::serde"
    )]
    pub drain_timeout: Duration,
    /// How often loaded engines are checked for a crash or a hang (default 1 s).
    #[serde(
        default = "default_health_interval",
        with = "runtime_core::duration::serde"
    )]
    pub health_interval: Duration,
    /// How long an answer may wait for its client to take bytes before the
    /// connection is closed and its slot freed (default 30 s): a client that
    /// stops reading a stream cannot hold its model's slot forever.
    #[serde(
        default = "default_client_write_timeout",
        with = "runtime_core::duration::serde"
    )]
    pub client_write_timeout: Duration,
    /// The model that requests naming no model go to.
    #[serde(default)]
    pub default_model: Option<String>,
    /// The models, by the name clients send as `model`.
    #[serde(default)]
    pub models: Vec<ModelSpec>,
}

/// One model a gateway serves: the names clients send, the backend, how
/// requests queue and how long it stays loaded, and the [`RuntimeConfig`]
/// its engine starts with.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ModelSpec {
    /// What clients send as `model`.
    pub name: String,
    /// Other names clients may send.
    pub aliases: Vec<String>,
    /// Which backend runs it (default `auto`).
    pub backend: BackendChoice,
    /// How its engine starts: the model, sizes, timeouts, the backend's
    /// options. Its `parallel` is how many requests run at once (default
    /// [`DEFAULT_PARALLEL`]); its `served_model_name`, the model's name on
    /// its engine when that differs from `name` (a remote server's model id).
    pub runtime: RuntimeConfig,
    /// Requests that may wait for a slot before more get 429 (default
    /// [`DEFAULT_QUEUE`]).
    pub queue: Option<u32>,
    /// Unload after this long without a request (since the last one
    /// finished); never while one is open. Default: stay loaded.
    pub ttl: Option<Duration>,
    /// Load at start (and restart at once after a crash) rather than on the
    /// first request.
    pub preload: bool,
}

/// A `[[models]]` entry as the file spells it: [`ModelSpec`]'s fields and
/// the [`RuntimeConfig`] fields a file may set, under the file's names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    name: String,
    #[serde(default)]
    aliases: Vec<String>,
    /// The model: a GGUF file, a Hugging Face directory, or a server's URL.
    path: PathBuf,
    #[serde(default)]
    backend: BackendChoice,
    /// The backend's typed options (`RuntimeConfig::extra_config`).
    #[serde(default)]
    options: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    context_size: Option<u32>,
    #[serde(default)]
    threads: Option<u32>,
    #[serde(default)]
    parallel: Option<u32>,
    #[serde(default)]
    queue: Option<u32>,
    #[serde(default, with = "runtime_core::duration::serde::optional")]
    ttl: Option<Duration>,
    #[serde(default)]
    preload: bool,
    #[serde(default)]
    runtime_binary: Option<PathBuf>,
    #[serde(default, with = "runtime_core::duration::serde::optional")]
    hang_timeout: Option<Duration>,
    #[serde(default, with = "runtime_core::duration::serde::optional")]
    startup_timeout: Option<Duration>,
    #[serde(default, with = "runtime_core::duration::serde::optional")]
    shutdown_grace: Option<Duration>,
    /// A Jinja chat template replacing the model's own
    /// (`RuntimeConfig::chat_template`).
    #[serde(default)]
    chat_template: Option<PathBuf>,
    #[serde(default)]
    extra_args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// The key the engine requires: a remote server's key (local engines
    /// get a random one of their own when unset).
    #[serde(default)]
    api_key: Option<ApiKey>,
    /// The model's name on its engine (`RuntimeConfig::served_model_name`).
    #[serde(default)]
    upstream_model: Option<String>,
}

impl From<ModelEntry> for ModelSpec {
    fn from(entry: ModelEntry) -> Self {
        let mut runtime = RuntimeConfig::new(entry.path);
        runtime.extra_config = entry.options;
        runtime.context_size = entry.context_size;
        runtime.threads = entry.threads;
        runtime.parallel = entry.parallel;
        runtime.runtime_binary = entry.runtime_binary;
        runtime.startup_timeout = entry.startup_timeout;
        runtime.chat_template = entry.chat_template;
        runtime.extra_args = entry.extra_args;
        runtime.env = entry.env;
        runtime.api_key = entry.api_key;
        runtime.served_model_name = entry.upstream_model;
        if let Some(hang) = entry.hang_timeout {
            runtime.hang_timeout = hang;
        }
        if let Some(grace) = entry.shutdown_grace {
            runtime.shutdown_grace = grace;
        }
        Self {
            name: entry.name,
            aliases: entry.aliases,
            backend: entry.backend,
            runtime,
            queue: entry.queue,
            ttl: entry.ttl,
            preload: entry.preload,
        }
    }
}

impl<'de> Deserialize<'de> for ModelSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        ModelEntry::deserialize(d).map(Self::from)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_queue_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_health_interval() -> Duration {
    Duration::from_secs(1)
}

fn default_client_write_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The longest `queue_timeout` and `drain_timeout`: an hour.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// The most models a gateway may keep loaded at once.
pub const MAX_LOADED: usize = 1024;

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            allow_unauthenticated: false,
            max_loaded: None,
            memory_budget: None,
            queue_timeout: default_queue_timeout(),
            drain_timeout: default_drain_timeout(),
            health_interval: default_health_interval(),
            client_write_timeout: default_client_write_timeout(),
            default_model: None,
            models: Vec::new(),
        }
    }
}

impl GatewayConfig {
    /// Reads and checks a TOML configuration file. Every error names the
    /// file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| Error::io(format!("error reading {}", path.display()), err))?;
        Self::from_toml(&text).map_err(|err| match err {
            Error::InvalidConfig { field, reason } => {
                Error::invalid_config(format!("{}: {field}", path.display()), reason)
            }
            other => other,
        })
    }

    /// Parses and checks a TOML configuration.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|err| {
            let place = err.span().map_or_else(
                || "the file".to_owned(),
                |span| describe_place(text, span.start),
            );
            Error::invalid_config(place, err.message().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// A configuration serving the one model `spec`, loaded at once, that
    /// requests without a `model` go to: what `model-runtime serve MODEL` runs.
    pub fn single(spec: ModelSpec) -> Self {
        Self {
            max_loaded: Some(1),
            default_model: Some(spec.name.clone()),
            models: vec![ModelSpec {
                preload: true,
                ..spec
            }],
            ..Self::default()
        }
    }

    /// Checks the settings and every model (names unique across names and
    /// aliases, the model exists, the backend's options are valid).
    pub fn validate(&self) -> Result<()> {
        if let Some(max) = self.max_loaded
            && !(1..=MAX_LOADED).contains(&max)
        {
            return Err(Error::invalid_config(
                "max_loaded",
                format!(
                    "is {max}; it must be between 1 and {MAX_LOADED} (leave it out for no limit)"
                ),
            ));
        }
        for (field, keys) in [
            ("api_keys", &self.api_keys),
            ("admin_keys", &self.admin_keys),
        ] {
            if keys.iter().any(|key| key.expose().trim().is_empty()) {
                return Err(Error::invalid_config(
                    field,
                    "holds an empty key, which is no key at all; remove it or give a key",
                ));
            }
        }
        for (field, wait) in [
            ("queue_timeout", self.queue_timeout),
            ("drain_timeout", self.drain_timeout),
        ] {
            if wait > MAX_WAIT {
                return Err(Error::invalid_config(
                    field,
                    format!(
                        "is {}; it must be at most {}",
                        runtime_core::duration::format(wait),
                        runtime_core::duration::format(MAX_WAIT)
                    ),
                ));
            }
        }
        if self.client_write_timeout < Duration::from_millis(100)
            || self.client_write_timeout > MAX_WAIT
        {
            return Err(Error::invalid_config(
                "client_write_timeout",
                format!(
                    "is {}; it must be between 100ms and {}",
                    runtime_core::duration::format(self.client_write_timeout),
                    runtime_core::duration::format(MAX_WAIT)
                ),
            ));
        }
        if self.memory_budget == Some(0) {
            return Err(Error::invalid_config(
                "memory_budget",
                "must be more than zero (leave it out for no limit)",
            ));
        }
        if self.health_interval.is_zero() || self.health_interval > Duration::from_secs(60) {
            return Err(Error::invalid_config(
                "health_interval",
                "must be between a millisecond and a minute",
            ));
        }
        let mut names = HashSet::new();
        for (index, model) in self.models.iter().enumerate() {
            let at = |key: &str| format!("models[{index}].{key}");
            model.validate(&at)?;
            for name in std::iter::once(&model.name).chain(&model.aliases) {
                if !names.insert(name.as_str()) {
                    return Err(Error::invalid_config(
                        at("name"),
                        format!("`{name}` is used by another model or alias"),
                    ));
                }
            }
        }
        if let Some(default) = &self.default_model
            && !names.contains(default.as_str())
        {
            return Err(Error::invalid_config(
                "default_model",
                format!("`{default}` is not a configured model"),
            ));
        }
        let preloaded = self.models.iter().filter(|m| m.preload).count();
        if let Some(max) = self.max_loaded
            && preloaded > max
        {
            return Err(Error::invalid_config(
                "max_loaded",
                format!("is {max}, but {preloaded} models are preloaded"),
            ));
        }
        Ok(())
    }
}

impl ModelSpec {
    /// A model named `name` at `path`, every setting at its default.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self::from_runtime_config(name, &RuntimeConfig::new(path))
    }

    /// A model named `name` whose engine starts with `config`: for programs
    /// that build their configurations in code.
    pub fn from_runtime_config(name: impl Into<String>, config: &RuntimeConfig) -> Self {
        Self {
            name: name.into(),
            aliases: Vec::new(),
            backend: BackendChoice::Auto,
            runtime: config.clone(),
            queue: None,
            ttl: None,
            preload: false,
        }
    }

    /// Sets [`backend`](Self::backend).
    #[must_use]
    pub fn with_backend(mut self, backend: BackendChoice) -> Self {
        self.backend = backend;
        self
    }

    /// The model's path (a file, a directory, or a server's URL).
    pub fn path(&self) -> &Path {
        &self.runtime.model_path
    }

    /// The requests this model runs at once.
    pub fn parallel(&self) -> u32 {
        self.runtime.parallel.unwrap_or(DEFAULT_PARALLEL)
    }

    /// The requests that may wait for this model.
    pub fn queue(&self) -> u32 {
        self.queue.unwrap_or(DEFAULT_QUEUE)
    }

    /// The runtime configuration the engine starts with: [`runtime`](Self::runtime),
    /// served under the model's name unless it names another, with its
    /// `parallel` filled in.
    pub fn runtime_config(&self) -> RuntimeConfig {
        let mut config = self.runtime.clone();
        config
            .served_model_name
            .get_or_insert_with(|| self.name.clone());
        config.parallel = Some(self.parallel());
        config
    }

    /// The backend that runs it: the one named, or what `auto` picks now.
    pub fn resolved_backend(&self) -> Result<Backend> {
        Ok(choose(self.backend, &self.runtime_config())?.0)
    }

    fn validate(&self, at: &dyn Fn(&str) -> String) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(Error::invalid_config(at("name"), "is empty"));
        }
        if let Some(alias) = self.aliases.iter().find(|a| a.trim().is_empty()) {
            return Err(Error::invalid_config(
                at("aliases"),
                format!("has an empty alias {alias:?}"),
            ));
        }
        if !model_runtime::is_url(self.path()) && !self.path().exists() {
            return Err(Error::invalid_config(
                at("path"),
                format!("{} does not exist", self.path().display()),
            ));
        }
        let parallel = self.parallel();
        if !(1..=MAX_PARALLEL).contains(&parallel) {
            return Err(Error::invalid_config(
                at("parallel"),
                format!("is {parallel}; it must be between 1 and {MAX_PARALLEL}"),
            ));
        }
        if self.queue() > MAX_QUEUE {
            return Err(Error::invalid_config(
                at("queue"),
                format!("is {}; at most {MAX_QUEUE} requests may wait", self.queue()),
            ));
        }
        if let Some(ttl) = self.ttl
            && ttl > runtime_core::duration::MAX
        {
            return Err(Error::invalid_config(at("ttl"), "must be at most a year"));
        }
        if self.preload && self.ttl.is_some() {
            return Err(Error::invalid_config(
                at("ttl"),
                "is set on a preloaded model, which stays loaded: drop one of the two",
            ));
        }
        if self.ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err(Error::invalid_config(
                at("ttl"),
                "must be longer than zero (leave it out to stay loaded)",
            ));
        }
        let config = self.runtime_config();
        config.validate().map_err(|err| rename(err, at))?;
        let backend = self.resolved_backend().map_err(|err| rename(err, at))?;
        backend
            .check_options(&config)
            .map_err(|err| rename(err, at))
    }
}

/// `line 9 (ttl)`: where byte `offset` of `text` lies, and the key written
/// on that line.
fn describe_place(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_text = text.lines().nth(line - 1).unwrap_or_default();
    match line_text.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() => format!("line {line} ({})", key.trim()),
        _ => format!("line {line}"),
    }
}

/// Puts an error about a runtime setting under the model's key.
fn rename(err: Error, at: &dyn Fn(&str) -> String) -> Error {
    match err {
        Error::InvalidConfig { field, reason } => {
            let key = field
                .strip_prefix("extra_config.")
                .map_or_else(|| field.to_string(), |option| format!("options.{option}"));
            Error::invalid_config(at(&key), reason)
        }
        other => Error::invalid_config(at("backend"), other.to_string()),
    }
}

/// `"1.5GiB"` as `(1.5, "GiB")`: the leading number and the unit after it
/// (`""` when there is none); `None` when it does not start with a number.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit.trim()))
}

/// Sizes written as `"512MiB"`, `"4GiB"`, `"2GB"`, or a number of bytes.
pub(crate) mod bytes {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Bytes(u64),
        Text(String),
    }

    pub(crate) fn parse(text: &str) -> std::result::Result<u64, String> {
        let text = text.trim();
        let (number, unit) =
            number_and_unit(text).ok_or_else(|| format!("{text:?} is not a size like \"4GiB\""))?;
        let scale: f64 = match unit {
            "" | "B" => 1.0,
            "KB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?}; use B, KB, MB, GB, KiB, MiB or GiB"
                ));
            }
        };
        let bytes = number * scale;
        if !(0.0..=u64::MAX as f64).contains(&bytes) {
            return Err(format!("{text:?} is out of range"));
        }
        Ok(bytes as u64)
    }

    pub(crate) fn optional<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<u64>, D::Error> {
        match Written::deserialize(d)? {
            Written::Bytes(bytes) => Ok(Some(bytes)),
            Written::Text(text) => parse(&text).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {})",
            self.name,
            self.backend,
            self.path().display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_file() -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
        let mut header = b"GGUF".to_vec();
        header.extend(3u32.to_le_bytes());
        header.extend(0u64.to_le_bytes());
        header.extend(0u64.to_le_bytes());
        std::fs::write(file.path(), header).unwrap();
        file
    }

    fn toml_with(model: &Path, extra: &str) -> String {
        format!(
            "max_loaded = 2\nmemory_budget = \"1GiB\"\n\n[[models]]\nname = \"a\"\npath = {:?}\nbackend = \"candle\"\n{extra}\n",
            model.display().to_string()
        )
    }

    #[test]
    fn a_configuration_file_is_read_with_units() {
        let model = model_file();
        let config = GatewayConfig::from_toml(&toml_with(
            model.path(),
            "ttl = \"5m\"\nparallel = 2\naliases = [\"b\"]\noptions = { queue = 8 }",
        ))
        .unwrap();
        assert_eq!(config.memory_budget, Some(1 << 30));
        let spec = &config.models[0];
        assert_eq!(spec.ttl, Some(Duration::from_secs(300)));
        assert_eq!(spec.runtime_config().extra_config["queue"], 8);
        assert_eq!(spec.runtime_config().parallel, Some(2));
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name() {
        let model = model_file();
        let err = GatewayConfig::from_toml(&toml_with(model.path(), "tll = \"5m\"")).unwrap_err();
        assert!(err.to_string().contains("tll"), "{err}");
    }

    #[test]
    fn a_misspelled_backend_option_names_the_model_and_the_closest_key() {
        let model = model_file();
        let err = GatewayConfig::from_toml(&toml_with(
            model.path(),
            "options = { requantise = \"q8_0\" }",
        ))
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("models[0].options.requantise"), "{text}");
        assert!(text.contains("did you mean `requantize`"), "{text}");
    }

    #[test]
    fn bad_values_are_refused_by_key() {
        let model = model_file();
        for (extra, key) in [
            ("ttl = \"soon\"", "ttl"),
            ("parallel = 0", "parallel"),
            ("queue = 100000", "queue"),
        ] {
            let err = GatewayConfig::from_toml(&toml_with(model.path(), extra))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let missing = toml_with(Path::new("/nonexistent.gguf"), "");
        let err = GatewayConfig::from_toml(&missing).unwrap_err().to_string();
        assert!(err.contains("models[0].path"), "{err}");
    }

    #[test]
    fn a_name_used_twice_is_refused() {
        let model = model_file();
        let mut text = toml_with(model.path(), "aliases = [\"b\"]");
        text.push_str(&format!(
            "\n[[models]]\nname = \"b\"\npath = {:?}\nbackend = \"candle\"\n",
            model.path().display().to_string()
        ));
        let err = GatewayConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("`b` is used by another model"), "{err}");
    }

    #[test]
    fn sizes_parse_their_units() {
        assert_eq!(bytes::parse("2GB").unwrap(), 2_000_000_000);
        assert_eq!(bytes::parse("512MiB").unwrap(), 512 << 20);
        assert!(bytes::parse("1EB").is_err());
    }
}
