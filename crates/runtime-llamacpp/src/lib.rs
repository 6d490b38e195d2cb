//! The llama.cpp backend: [`LlamaCppRuntime`] manages a `llama-server` process
//! behind the [`ModelRuntime`](runtime_core::ModelRuntime) trait.
//!
//! This crate owns only what is particular to llama.cpp: finding `llama-server`
//! (explicit [`RuntimeConfig::runtime_binary`], then `$LLAMA_SERVER_BIN`, then
//! `PATH`), checking that the model is GGUF by content, turning
//! [`RuntimeConfig`] and [`LlamaCppOptions`] into llama-server flags, reading
//! the version from `llama-server --version`, and the effective context from
//! `/props`. The server lifecycle is `runtime-managed`'s [`ManagedServer`];
//! process supervision and HTTP are `runtime-process` and `runtime-openai`.
//!
//! Defaults that matter:
//! - the engine binds `127.0.0.1` and, unless the config names a key, requires a
//!   random per-instance API key ([`ModelRuntime::api_key`](runtime_core::ModelRuntime::api_key)),
//!   so other local users cannot use it; the key reaches the engine through its
//!   environment (`LLAMA_API_KEY`), never its command line;
//! - `port = 0` picks a free port, and a fresh one if it was taken meanwhile;
//! - stopping sends SIGTERM, a second SIGTERM after 250 ms (llama-server keeps
//!   serving an in-flight request after the first), SIGKILL after the grace period;
//! - a GGUF whose architecture has a pooling type (a converted
//!   sentence-transformers model) is an embedding model: llama-server runs in
//!   its embeddings mode (`--embeddings`, one KV cache for all slots, a
//!   micro-batch as large as the context) and the runtime serves
//!   [`embed`](runtime_core::ModelRuntime::embed) only. Its WordPiece
//!   tokenizer splits some scripts otherwise than the model's own tokenizer
//!   (Korean: it drops Hangul vowels); send token ids for those.
//!
//! Splitting a model across machines: start an [`RpcWorker`] (llama.cpp's
//! `rpc-server`) on each, and list their addresses in
//! [`LlamaCppOptions::rpc_workers`] (with [`LlamaCppOptions::tensor_split`]
//! to weigh them).
//!
//! Config mapping: `context_size` → `-c`, `batch_size` → `-b`, `threads` → `-t`
//! and `-tb`, `gpu_layers` → `-ngl`, `parallel` → `-np`, `served_model_name` →
//! `--alias`, [`LlamaCppOptions`] as documented on each field, `extra_args`
//! appended last (they may override anything).
//!
//! ```no_run
//! use runtime_core::{InferenceRequest, ModelRuntime, RuntimeConfig};
//! use runtime_llamacpp::LlamaCppRuntime;
//!
//! # async fn demo() -> runtime_core::Result<()> {
//! let mut runtime = LlamaCppRuntime::new();
//! runtime
//!     .initialize(RuntimeConfig::new("SmolLM2-135M-Instruct.Q4_1.gguf").with_context_size(2048))
//!     .await?;
//! let answer = runtime.generate(InferenceRequest::from_prompt("Hello!")).await?;
//! println!("{} ({:?})", answer.content, answer.usage);
//! runtime.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod options;
mod rpc;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{Capabilities, Error, ModelFormat, Result, RuntimeConfig};
pub use runtime_managed::ManagedServer;
use runtime_managed::{Enforcer, LaunchSpec, ServerEngine, Support};
use runtime_openai::OpenAiClient;
use runtime_process::{BinarySearch, ServerCommand, StopPolicy};

pub use crate::options::{FlashAttention, LlamaCppOptions};
pub use crate::rpc::{RPC_BINARY_ENV, RpcWorker, RpcWorkerConfig};

/// The environment variable that may name the `llama-server` binary.
pub const BINARY_ENV: &str = "LLAMA_SERVER_BIN";

const INSTALL_HINT: &str = "install llama.cpp's llama-server and put it on PATH, set \
     $LLAMA_SERVER_BIN, or set RuntimeConfig::runtime_binary (in the model-runtime \
     repository, `cargo xtask provision llamacpp` provides one)";

/// llama.cpp through a managed `llama-server`.
pub type LlamaCppRuntime = ManagedServer<LlamaServer>;

/// The description of `llama-server` that [`ManagedServer`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct LlamaServer;

#[async_trait]
impl ServerEngine for LlamaServer {
    type Options = LlamaCppOptions;

    fn engine_name(&self) -> &'static str {
        "llama-server"
    }

    fn runtime_name(&self) -> &'static str {
        "llama.cpp"
    }

    fn supported_format(&self) -> ModelFormat {
        ModelFormat::Gguf
    }

    fn supports_gpu(&self) -> bool {
        true
    }

    fn validate(&self, config: &RuntimeConfig, options: &LlamaCppOptions) -> Result<()> {
        let format = config.resolve_format()?;
        if format != ModelFormat::Gguf {
            return Err(Error::UnsupportedFormat {
                backend: "llama.cpp",
                expected: ModelFormat::Gguf.name().to_owned(),
                found: format.name().to_owned(),
            });
        }
        // resolve_format trusts an explicit format; the content must agree.
        if ModelFormat::detect(&config.model_path)? != ModelFormat::Gguf {
            return Err(Error::InvalidModel {
                path: config.model_path.clone(),
                reason: "configured as GGUF but the content is not GGUF".to_owned(),
            });
        }
        // An embedding model embeds an input in one micro-batch: a smaller
        // one would refuse inputs the context admits.
        if is_embedding_model(config)
            && let (Some(ubatch), Some(context)) = (options.ubatch_size, embedding_context(config))
            && ubatch < context
        {
            return Err(Error::invalid_config(
                "ubatch_size",
                format!(
                    "is {ubatch}, less than the context of {context} tokens; an embedding model \
                     reads each input in one micro-batch, so leave it out or raise it"
                ),
            ));
        }
        Ok(())
    }

    fn find_binary(&self, config: &RuntimeConfig) -> Result<PathBuf> {
        BinarySearch {
            name: "llama-server",
            also: &[],
            explicit: config.runtime_binary.as_deref(),
            env_var: BINARY_ENV,
            install_hint: INSTALL_HINT,
        }
        .find()
    }

    async fn binary_version(
        &self,
        binary: &Path,
        config: &RuntimeConfig,
    ) -> Result<Option<String>> {
        let mut command = tokio::process::Command::new(binary);
        command.arg("--version").kill_on_drop(true);
        for (key, value) in library_path(binary, &config.env) {
            command.env(key, value);
        }
        let output = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .map_err(|_| Error::StartupTimeout {
                engine: "llama-server --version".to_owned(),
                elapsed: Duration::from_secs(30),
                log_tail: Vec::new(),
            })?
            .map_err(|source| Error::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        // llama-server prints its version on stderr; accept either stream.
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        match parse_version(&text) {
            Some(version) if output.status.success() => Ok(Some(version)),
            _ => Err(Error::EngineExited {
                engine: "llama-server --version".to_owned(),
                status: output.status.to_string(),
                log_tail: text.lines().map(str::to_owned).collect(),
            }),
        }
    }

    fn command(&self, launch: &LaunchSpec<'_, LlamaCppOptions>) -> Result<ServerCommand> {
        let config = launch.config;
        let options = launch.options;
        let mut command = ServerCommand::new("llama-server", launch.binary);
        command
            .arg("--model")
            .arg(&config.model_path)
            .args(["--alias", launch.model_name]);
        // The model's own Jinja template renders chat (and tools, where it
        // knows them), as the chat API means it, not llama.cpp's built-in
        // approximations of known formats.
        command.arg("--jinja");
        if let Some(template) = &config.chat_template {
            command.arg("--chat-template-file").arg(template);
        }
        match launch.socket {
            // llama-server listens on a Unix socket when its host ends in `.sock`.
            Some(socket) => command.arg("--host").arg(socket),
            None => command
                .args(["--host", &config.host])
                .args(["--port", &launch.port.to_string()]),
        };
        let numeric = [
            ("--ctx-size", config.context_size),
            ("--batch-size", config.batch_size),
            ("--threads", config.threads),
            ("--threads-batch", config.threads),
            ("--n-gpu-layers", config.gpu_layers),
            ("--parallel", config.parallel),
        ];
        for (flag, value) in numeric {
            if let Some(value) = value {
                command.args([flag, &value.to_string()]);
            }
        }
        let texts = [
            (
                "--flash-attn",
                options.flash_attention.map(FlashAttention::as_str),
            ),
            ("--cache-type-k", options.cache_type_k.as_deref()),
            ("--cache-type-v", options.cache_type_v.as_deref()),
            ("--load-mode", options.load_mode.as_deref()),
        ];
        for (flag, value) in texts {
            if let Some(value) = value {
                command.args([flag, value]);
            }
        }
        // An embedding model is served by llama-server's embeddings mode,
        // with the pooling its GGUF names. An input is embedded in one
        // micro-batch, so that is as large as the context, and every slot
        // may use the whole context (one cache for all slots), so the
        // longest input is the context whatever `parallel` is.
        let embedding = is_embedding_model(config).then(|| embedding_context(config));
        if let Some(context) = embedding {
            command.args(["--embeddings", "--kv-unified"]);
            // Without a configured context, the model's own (llama-server
            // would take 4096, past a BERT's positions).
            if let (None, Some(context)) = (config.context_size, context) {
                command.args(["--ctx-size", &context.to_string()]);
            }
            if config.batch_size.is_none()
                && let Some(context) = context
            {
                command.args(["--batch-size", &context.to_string()]);
            }
        }
        let ubatch = options.ubatch_size.or(embedding.flatten());
        if let Some(ubatch) = ubatch {
            command.args(["--ubatch-size", &ubatch.to_string()]);
        }
        if options.metrics {
            command.arg("--metrics");
        }
        if !options.rpc_workers.is_empty() {
            command.args(["--rpc", &options.rpc_workers.join(",")]);
        }
        if !options.tensor_split.is_empty() {
            let split: Vec<String> = options.tensor_split.iter().map(f32::to_string).collect();
            command.args(["--tensor-split", &split.join(",")]);
        }
        command.args(&config.extra_args);
        for (key, value) in library_path(launch.binary, &config.env) {
            command.env(key, value);
        }
        // Last, so no configured variable can replace it.
        command.env("LLAMA_API_KEY", launch.api_key);
        Ok(command)
    }

    fn default_startup_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    fn supports_unix_socket(&self) -> bool {
        true
    }

    fn stop_policy(&self, grace: Duration) -> StopPolicy {
        StopPolicy {
            grace,
            repeat_term_after: Some(Duration::from_millis(250)),
        }
    }

    fn port_conflict(&self, log_tail: &[String]) -> bool {
        log_tail.iter().any(|line| {
            line.contains("couldn't bind HTTP server socket")
                || line.contains("Address already in use")
        })
    }

    async fn tokenize(
        &self,
        client: &OpenAiClient,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>> {
        #[derive(serde::Deserialize)]
        struct Tokens {
            tokens: Vec<u32>,
        }
        let body = serde_json::json!({
            "content": text,
            "add_special": add_special,
            "parse_special": true,
        });
        let answer: Tokens = client
            .post_json("/tokenize", &body, Duration::from_secs(30))
            .await?;
        Ok(answer.tokens)
    }

    async fn detokenize(&self, client: &OpenAiClient, tokens: &[u32]) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct Text {
            content: String,
        }
        let body = serde_json::json!({ "tokens": tokens });
        let answer: Text = client
            .post_json("/detokenize", &body, Duration::from_secs(30))
            .await?;
        Ok(answer.content)
    }

    async fn context_size(&self, client: &OpenAiClient) -> Option<u32> {
        let props: serde_json::Value = client
            .get_json("/props", Duration::from_secs(5))
            .await
            .ok()?;
        let n_ctx = props
            .pointer("/default_generation_settings/n_ctx")
            .or_else(|| props.get("n_ctx"))?;
        u32::try_from(n_ctx.as_u64()?).ok()
    }

    /// llama-server continues a final assistant message by itself, and
    /// answers with the message's text before the continuation.
    fn echoes_continued_message(&self) -> bool {
        true
    }

    async fn structured(
        &self,
        client: &OpenAiClient,
        config: &RuntimeConfig,
        _options: &LlamaCppOptions,
    ) -> Option<(Support, Capabilities)> {
        if is_embedding_model(config) {
            let support = Support {
                enforcer: Enforcer::LlamaCpp,
                native_auto: false,
                renders_tools: false,
            };
            return Some((support, Capabilities::embedding_only()));
        }
        // Without a template of its own or the configuration's, llama-server
        // formats chat as chatml, which a base model never saw: its answers
        // are noise. Such a model takes raw prompts only.
        let chat = config.chat_template.is_some()
            || runtime_core::gguf_has_metadata(&config.model_path, "tokenizer.chat_template")
                .unwrap_or_else(|err| {
                    tracing::warn!(error = %err, "could not read the model's metadata; taking chat");
                    true
                });
        // What the template does with tools, as llama-server read it. Its
        // `auto` parser is trusted only where the template renders the tools;
        // a template that does not gets no tools at all (llama-server would
        // drop them silently) and is asked for `<tool_call>` tags instead.
        let props: serde_json::Value = client
            .get_json("/props", Duration::from_secs(5))
            .await
            .ok()?;
        let caps = |key: &str| {
            props
                .pointer(&format!("/chat_template_caps/{key}"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false)
        };
        let renders_tools = caps("supports_tools") && caps("supports_tool_calls");
        let support = Support {
            enforcer: Enforcer::LlamaCpp,
            native_auto: renders_tools,
            renders_tools,
        };
        let capabilities = Capabilities::full(runtime_core::MAX_CHOICES)
            .with_template_tools(renders_tools)
            .with_chat(chat);
        Some((support, capabilities))
    }
}

/// Whether the configured model is an embedding model
/// ([`runtime_core::is_embedding_model`]); an unreadable header is taken for
/// a generative model, as llama-server will say what is wrong with it.
fn is_embedding_model(config: &RuntimeConfig) -> bool {
    runtime_core::is_embedding_model(&config.model_path).unwrap_or(false)
}

/// The longest input of an embedding model: the configured context, else
/// the one it was trained for.
fn embedding_context(config: &RuntimeConfig) -> Option<u32> {
    config.context_size.or_else(|| {
        runtime_core::gguf_context_length(&config.model_path)
            .ok()
            .flatten()
            .and_then(|n| u32::try_from(n).ok())
    })
}

/// A llama.cpp binary's environment: the user's variables, and the binary's
/// directory first on the library path so a relocatable build finds the
/// shared libraries shipped beside it.
pub(crate) fn library_path(
    binary: &Path,
    user: &std::collections::BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    if let Some(dir) = binary.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        let existing = user
            .get("LD_LIBRARY_PATH")
            .cloned()
            .or_else(|| std::env::var("LD_LIBRARY_PATH").ok())
            .filter(|value| !value.is_empty());
        let value = match existing {
            Some(existing) => format!("{}:{existing}", dir.display()),
            None => dir.display().to_string(),
        };
        env.push(("LD_LIBRARY_PATH".to_owned(), value));
    }
    env.extend(
        user.iter()
            .filter(|(key, _)| key.as_str() != "LD_LIBRARY_PATH")
            .map(|(key, value)| (key.clone(), value.clone())),
    );
    env
}

/// `version: 0.1.0-dev (build 1, commit 7e4c0a9)` → `0.1.0-dev (build 1, commit 7e4c0a9)`.
fn parse_version(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix("version:"))
        .map(|version| version.trim().to_owned())
        .filter(|version| !version.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(config: &RuntimeConfig) -> ServerCommand {
        let options = config.options::<LlamaCppOptions>().unwrap();
        LlamaServer
            .command(&LaunchSpec::new(
                Path::new("/opt/llama/bin/llama-server"),
                config,
                &options,
                8123,
                "k",
                "smol",
            ))
            .unwrap()
    }

    fn launch_args(config: &RuntimeConfig) -> Vec<String> {
        launch(config)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_version_is_read_from_the_captured_output() {
        let captured = "version: 0.1.0-dev (build 1, commit 7e4c0a9)\nbuilt with GNU 11.4.0 for Linux x86_64\n";
        assert_eq!(
            parse_version(captured).unwrap(),
            "0.1.0-dev (build 1, commit 7e4c0a9)"
        );
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn config_fields_map_to_llama_server_flags() {
        let config = RuntimeConfig::new("/m/smol.gguf")
            .with_context_size(2048)
            .with_batch_size(256)
            .with_threads(2)
            .with_gpu_layers(0)
            .with_parallel(2)
            .with_extra_arg("--no-webui");
        let args = launch_args(&config).join(" ");
        assert_eq!(
            args,
            "--model /m/smol.gguf --alias smol --jinja --host 127.0.0.1 --port 8123 \
             --ctx-size 2048 --batch-size 256 --threads 2 --threads-batch 2 \
             --n-gpu-layers 0 --parallel 2 --no-webui"
        );
    }

    #[test]
    fn a_configured_chat_template_replaces_the_models_own() {
        let config = RuntimeConfig::new("/m/smol.gguf").with_chat_template("/t/tools.jinja");
        let args = launch_args(&config).join(" ");
        assert!(
            args.contains("--jinja --chat-template-file /t/tools.jinja"),
            "{args}"
        );
    }

    #[test]
    fn on_a_private_socket_the_host_is_the_socket_and_there_is_no_port() {
        let config = RuntimeConfig::new("/m/smol.gguf");
        let options = LlamaCppOptions::default();
        let socket = std::path::Path::new("/run/user/1/model-runtime-x/engine.sock");
        let command = LlamaServer
            .command(
                &LaunchSpec::new(
                    Path::new("/opt/llama-server"),
                    &config,
                    &options,
                    0,
                    "k",
                    "smol",
                )
                .with_socket(socket),
            )
            .unwrap();
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args = args.join(" ");
        assert!(
            args.contains(&format!("--host {}", socket.display())),
            "{args}"
        );
        assert!(!args.contains("--port"), "{args}");
    }

    #[test]
    fn the_api_key_goes_through_the_environment_not_the_command_line() {
        let command = launch(&RuntimeConfig::new("/m/smol.gguf").with_env("LLAMA_API_KEY", "mine"));
        assert!(
            !launch_args(&RuntimeConfig::new("/m/smol.gguf"))
                .iter()
                .any(|a| a == "k" || a == "--api-key")
        );
        assert_eq!(command.env_value("LLAMA_API_KEY"), Some("k".as_ref()));
    }

    #[test]
    fn typed_options_map_to_llama_server_flags() {
        let options = LlamaCppOptions::new()
            .with_flash_attention(FlashAttention::Off)
            .with_cache_types("q8_0", "q8_0")
            .with_ubatch_size(128)
            .with_metrics(true)
            .with_rpc_worker("127.0.0.1:50052")
            .with_rpc_worker("127.0.0.1:50053")
            .with_tensor_split(vec![1.0, 1.0]);
        let args =
            launch_args(&RuntimeConfig::new("/m/smol.gguf").with_options(&options)).join(" ");
        for expected in [
            "--flash-attn off",
            "--cache-type-k q8_0 --cache-type-v q8_0",
            "--ubatch-size 128",
            "--metrics",
            "--rpc 127.0.0.1:50052,127.0.0.1:50053",
            "--tensor-split 1,1",
        ] {
            assert!(args.contains(expected), "{expected} in {args}");
        }
    }

    #[test]
    fn a_misspelled_option_is_refused_with_the_closest_key() {
        let config = RuntimeConfig::new("/m/smol.gguf").with_extra_config("flash_atention", "on");
        let err = config.options::<LlamaCppOptions>().unwrap_err().to_string();
        assert!(err.contains("`extra_config.flash_atention`"), "{err}");
        assert!(err.contains("did you mean `flash_attention`?"), "{err}");
    }

    #[test]
    fn an_rpc_worker_must_be_host_and_port() {
        let config = RuntimeConfig::new("/m/smol.gguf")
            .with_extra_config("rpc_workers", serde_json::json!(["localhost"]));
        let err = config.options::<LlamaCppOptions>().unwrap_err();
        assert!(err.to_string().contains("host:port"), "{err}");
    }

    #[test]
    fn unset_fields_leave_llama_server_defaults() {
        let args = launch_args(&RuntimeConfig::new("/m/smol.gguf"));
        assert!(!args.iter().any(|a| a == "--ctx-size" || a == "--threads"));
    }

    #[test]
    fn the_binary_directory_leads_the_library_path() {
        let config = RuntimeConfig::new("/m.gguf")
            .with_env("LD_LIBRARY_PATH", "/usr/local/lib")
            .with_env("A", "1");
        let env = library_path(Path::new("/opt/llama/bin/llama-server"), &config.env);
        assert_eq!(
            env[0],
            (
                "LD_LIBRARY_PATH".into(),
                "/opt/llama/bin:/usr/local/lib".into()
            )
        );
        assert_eq!(env[1], ("A".into(), "1".into()));
    }

    #[test]
    fn port_conflicts_are_recognised_from_the_log() {
        let log = vec!["0.00.101.000 E srv    start: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 8080".to_owned()];
        assert!(LlamaServer.port_conflict(&log));
        assert!(!LlamaServer.port_conflict(&["failed to open GGUF file".to_owned()]));
    }

    #[test]
    fn a_safetensors_model_is_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0; 4]);
        std::fs::write(&path, bytes).unwrap();
        let err = LlamaServer
            .validate(&RuntimeConfig::new(&path), &LlamaCppOptions::new())
            .unwrap_err();
        assert!(matches!(err, Error::UnsupportedFormat { .. }), "{err:?}");
    }
}
