//! Attaching to an OpenAI-compatible server run elsewhere: [`RemoteRuntime`].
//!
//! This crate owns only what is particular to a server we did not start:
//! checking at `initialize` that it answers and lists the model, probing its
//! health, and leaving it alone at `shutdown` (only our own streams are
//! closed). The protocol is `runtime-openai`'s client, here with pooled
//! connections over HTTPS (fresh ones over plain HTTP), TLS (rustls; the system's roots plus
//! [`RemoteOptions::ca_certificate`]), a request retried only when its
//! connection could not be made, and per-request and idle timeouts.
//!
//! The configuration reads naturally: the "model path" is the server's URL,
//! the served model name is the model to use there, and the API key is the
//! server's.
//!
//! ```no_run
//! use runtime_core::{InferenceRequest, ModelRuntime, RuntimeConfig};
//! use runtime_remote::{RemoteOptions, RemoteRuntime};
//!
//! # async fn demo() -> runtime_core::Result<()> {
//! let mut runtime = RemoteRuntime::new();
//! let config = RuntimeConfig::new("https://gpu-box.internal:8000")
//!     .with_served_model_name("llama-3-8b")
//!     .with_api_key("team-key")
//!     .with_options(&RemoteOptions::new().with_ca_certificate("/etc/ssl/internal-ca.pem"));
//! runtime.initialize(config).await?;
//! let answer = runtime.generate(InferenceRequest::from_prompt("Hello!")).await?;
//! runtime.shutdown().await?; // the server keeps running
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{
    ApiKey, BackendOptions, Capabilities, EmbeddingRequest, Embeddings, Error, EventStream,
    InferenceRequest, InferenceResponse, ModelFormat, ModelRuntime, Result, RuntimeConfig,
    RuntimeMetadata, TextStream, text_deltas,
};
use runtime_openai::{ClientOptions, ClientTimeouts, Heartbeat, OpenAiClient};
use runtime_structured::{Enforcer, Plan, Support};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How long `initialize` and health probes wait for the server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for response headers unless the options say.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The remote runtime's settings beyond [`RuntimeConfig`] (whose
/// `model_path` is the server's URL, `served_model_name` the model, and
/// `api_key` the server's key).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// A PEM file of certificates to trust besides the system's (a private
    /// CA, a self-signed server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<PathBuf>,
    /// How long a request may wait for the server's response headers, like
    /// `"60s"` (the default); the answer itself may take as long as it
    /// streams.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "runtime_core::duration::serde::optional"
    )]
    pub request_timeout: Option<Duration>,
    /// What to probe for liveness (default `/v1/models`, with the key:
    /// every OpenAI-compatible server has it; `/health` where there is one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// How many times a request whose connection failed is tried again
    /// (default 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_retries: Option<u32>,
    /// Send the key over plain `http://` to a host other than this machine
    /// (default false: refused, as anyone on the path reads it; use
    /// `https://`, or set this for a network you trust).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_plain_http_key: Option<bool>,
}

impl RemoteOptions {
    /// Every option at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ca_certificate`](Self::ca_certificate).
    #[must_use]
    pub fn with_ca_certificate(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_certificate = Some(path.into());
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Sets [`health_path`](Self::health_path).
    #[must_use]
    pub fn with_health_path(mut self, path: impl Into<String>) -> Self {
        self.health_path = Some(path.into());
        self
    }

    /// Sets [`allow_plain_http_key`](Self::allow_plain_http_key).
    #[must_use]
    pub fn with_allow_plain_http_key(mut self, allow: bool) -> Self {
        self.allow_plain_http_key = Some(allow);
        self
    }
}

impl BackendOptions for RemoteOptions {
    const BACKEND: &'static str = "remote";

    fn validate(&self) -> Result<()> {
        if let Some(timeout) = self.request_timeout
            && (timeout.is_zero() || timeout > Duration::from_secs(86_400))
        {
            return Err(Error::invalid_config(
                "extra_config.request_timeout",
                format!(
                    "is {}; give a duration between 1ms and a day, like \"60s\"",
                    runtime_core::duration::format(timeout)
                ),
            ));
        }
        if let Some(path) = &self.health_path
            && !path.starts_with('/')
        {
            return Err(Error::invalid_config(
                "extra_config.health_path",
                format!("is {path:?}; give a path such as /health"),
            ));
        }
        Ok(())
    }
}

/// A [`ModelRuntime`] over an OpenAI-compatible server run elsewhere.
#[derive(Debug, Default)]
pub struct RemoteRuntime {
    attached: Option<Attached>,
}

#[derive(Debug)]
struct Attached {
    client: OpenAiClient,
    api_key: Option<ApiKey>,
    model: String,
    version: String,
    health_path: String,
}

impl RemoteRuntime {
    /// A runtime attached to nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The model used on the server, once attached.
    pub fn model(&self) -> Option<&str> {
        self.attached.as_ref().map(|a| a.model.as_str())
    }

    fn attached(&self) -> Result<&Attached> {
        self.attached.as_ref().ok_or(Error::NotInitialized)
    }
}

/// The server's root from the configured URL (a trailing `/v1` is the API's,
/// not the server's).
fn base_url(config: &RuntimeConfig) -> Result<String> {
    let url = config
        .model_path
        .to_string_lossy()
        .trim_end_matches('/')
        .to_owned();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Error::invalid_config(
            "model_path",
            format!("is {url:?}; give the server's URL (http:// or https://)"),
        ));
    }
    Ok(url.strip_suffix("/v1").unwrap_or(&url).to_owned())
}

/// Refuses to send a key in the clear to another machine: over plain
/// `http://` anyone on the path reads it, and the heartbeat would repeat it
/// every few seconds. Loopback never leaves the machine; `https://` is
/// encrypted; `allow_plain_http_key` is the operator's word that the network
/// is trusted.
fn check_key_transport(
    base_url: &str,
    config: &RuntimeConfig,
    options: &RemoteOptions,
) -> Result<()> {
    let Some(rest) = base_url.strip_prefix("http://") else {
        return Ok(());
    };
    if config.api_key.is_none() || options.allow_plain_http_key == Some(true) {
        return Ok(());
    }
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Ok(());
    }
    Err(Error::invalid_config(
        "api_key",
        format!(
            "would go over plain http:// to {host}, where anyone on the path reads it: use \
             https://, or set allow_plain_http_key for a network you trust"
        ),
    ))
}

#[async_trait]
impl ModelRuntime for RemoteRuntime {
    fn supported_format(&self) -> ModelFormat {
        // The server's business: any format its engine takes.
        ModelFormat::Safetensors
    }

    async fn initialize(&mut self, config: RuntimeConfig) -> Result<()> {
        if self.attached.is_some() {
            return Err(Error::AlreadyInitialized);
        }
        config.validate()?;
        let options = config.options::<RemoteOptions>()?;
        let base_url = base_url(&config)?;
        check_key_transport(&base_url, &config, &options)?;
        let mut timeouts = ClientTimeouts::with_idle(config.idle_timeout);
        timeouts.request = Some(options.request_timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT));
        let mut client_options = ClientOptions::remote(&base_url, timeouts);
        client_options.connect_retries = options.connect_retries.unwrap_or(2);
        if let Some(path) = &options.ca_certificate {
            let pem = std::fs::read(path).map_err(|err| {
                Error::io(
                    format!("error reading the CA certificate {}", path.display()),
                    err,
                )
            })?;
            client_options = client_options.with_root_certificate(pem);
        }
        let probe = OpenAiClient::with_options(
            &base_url,
            config.api_key.clone(),
            None,
            client_options.clone(),
        )?;
        let listed: Value = probe.get_json("/v1/models", PROBE_TIMEOUT).await?;
        let names: Vec<String> = listed["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect();
        let model = match &config.served_model_name {
            Some(name) if names.contains(name) => name.clone(),
            Some(name) => {
                return Err(Error::ModelNotServed {
                    requested: name.clone(),
                    available: names,
                });
            }
            None if names.len() == 1 => names[0].clone(),
            None => {
                return Err(Error::invalid_config(
                    "served_model_name",
                    format!(
                        "is not set and {base_url} serves {}; name the model to use",
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        }
                    ),
                ));
            }
        };
        let version = server_version(&probe).await;
        let health_path = options
            .health_path
            .unwrap_or_else(|| "/v1/models".to_owned());
        let client = OpenAiClient::with_options(
            &base_url,
            config.api_key.clone(),
            Some(model.clone()),
            client_options,
        )?
        .with_heartbeat(
            Heartbeat::new(format!("the server at {base_url}"), config.hang_timeout)
                .with_path(&health_path, true),
        );
        tracing::info!(base_url, model, version, "attached to a remote server");
        self.attached = Some(Attached {
            client,
            api_key: config.api_key,
            model,
            version,
            health_path,
        });
        Ok(())
    }

    async fn is_ready(&self) -> bool {
        self.attached
            .as_ref()
            .is_some_and(|attached| attached.client.is_responsive())
    }

    async fn health_check(&self) -> Result<String> {
        let attached = self.attached()?;
        if let Some(err) = attached.client.unresponsive_error() {
            return Err(err);
        }
        let (status, body) = attached
            .client
            .get(&attached.health_path, PROBE_TIMEOUT)
            .await?;
        if (200..300).contains(&status) {
            Ok(format!("ok ({} answered {status})", attached.health_path))
        } else {
            Err(runtime_openai::wire::ErrorBody::to_error(status, &body))
        }
    }

    fn base_url(&self) -> String {
        self.attached
            .as_ref()
            .map(|a| a.client.base_url().to_owned())
            .unwrap_or_default()
    }

    fn api_key(&self) -> Option<ApiKey> {
        self.attached.as_ref()?.api_key.clone()
    }

    async fn generate(&self, request: InferenceRequest) -> Result<InferenceResponse> {
        request.validate()?;
        let plan = Plan::new(&request, &REMOTE)?;
        let client = &self.attached()?.client;
        // A raw prompt goes to the server's legacy completions endpoint.
        let answered = match request.prompt {
            Some(_) => client.complete(plan.engine_request()).await?,
            None => client.chat(plan.engine_request()).await?,
        };
        plan.finish(answered)
    }

    async fn generate_stream(&self, request: InferenceRequest) -> Result<TextStream> {
        Ok(text_deltas(self.generate_events(request).await?))
    }

    async fn generate_events(&self, request: InferenceRequest) -> Result<EventStream> {
        request.validate()?;
        let plan = Plan::new(&request, &REMOTE)?;
        let client = &self.attached()?.client;
        let events = match request.prompt {
            Some(_) => client.complete_stream(plan.engine_request()).await?,
            None => client.chat_stream(plan.engine_request()).await?,
        };
        Ok(plan.events(events))
    }

    /// The server's `/v1/embeddings`; truncation, where asked, is the
    /// server's to do, and the vectors are the server's as they come (not
    /// listed in the capabilities: whether the model embeds is not known
    /// here).
    async fn embed(&self, request: EmbeddingRequest) -> Result<Embeddings> {
        request.validate()?;
        let client = &self.attached()?.client;
        let embeddings = client.embeddings(&request.inputs, request.truncate).await?;
        if let Some(vector) = embeddings.vectors.first() {
            request.check_dimensions(vector.len())?;
        }
        Ok(embeddings)
    }

    /// Closes our streams (they end with [`Error::ShutDown`]) and detaches;
    /// the server keeps running.
    async fn shutdown(&mut self) -> Result<()> {
        if let Some(attached) = self.attached.take() {
            attached.client.close_streams();
        }
        Ok(())
    }

    fn metadata(&self) -> RuntimeMetadata {
        let version = self
            .attached
            .as_ref()
            .map(|a| a.version.clone())
            .unwrap_or_default();
        // What the server enforces is not known here: everything is passed
        // on, and every answer checked.
        RuntimeMetadata::new(ModelFormat::Safetensors, "remote", version)
            .with_gpu(true)
            .with_capabilities(
                Capabilities::full(runtime_core::MAX_CHOICES).with_template_tools(true),
            )
    }
}

/// What a server elsewhere is trusted with: its own template and tool
/// parser, and no keyword refused up front (its enforcement is not known
/// here); every answer is validated after.
const REMOTE: Support = Support {
    enforcer: Enforcer::Unknown,
    native_auto: true,
    renders_tools: true,
};

/// The version the server reports: vLLM's and our gateway's `/version`,
/// llama-server's `/props` build, else what `/v1/models` says owns the model.
async fn server_version(client: &OpenAiClient) -> String {
    if let Ok(body) = client.get_json::<Value>("/version", PROBE_TIMEOUT).await
        && let Some(version) = body["version"].as_str()
    {
        return version.to_owned();
    }
    if let Ok(props) = client.get_json::<Value>("/props", PROBE_TIMEOUT).await
        && let Some(build) = props["build_info"].as_str()
    {
        return format!("llama.cpp {build}");
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_is_the_servers_root_with_or_without_v1() {
        let root = |url: &str| base_url(&RuntimeConfig::new(url));
        assert_eq!(root("http://h:8000/v1/").unwrap(), "http://h:8000");
        assert_eq!(root("https://h").unwrap(), "https://h");
        assert!(root("/models/smol.gguf").is_err());
    }

    #[test]
    fn options_are_read_strictly() {
        let config = RuntimeConfig::new("http://h").with_extra_config("request_timeot", 5);
        let err = config.options::<RemoteOptions>().unwrap_err().to_string();
        assert!(err.contains("did you mean `request_timeout`"), "{err}");
        let bad = RuntimeConfig::new("http://h").with_extra_config("health_path", "health");
        assert!(bad.options::<RemoteOptions>().is_err());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_an_error_and_nothing_is_attached() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut runtime = RemoteRuntime::new();
        let err = runtime
            .initialize(RuntimeConfig::new(format!("http://127.0.0.1:{port}")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Transport(_)), "{err:?}");
        assert!(!runtime.is_ready().await);
    }
}
